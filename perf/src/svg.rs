//! The latency plot (`--latency-svg`): latency against percentile on
//! HdrHistogram's stretched axis, drawn with the plotters SVG backend.

use anyhow::{anyhow, Result};
use hdrhistogram::Histogram;
use plotters::prelude::*;
use std::path::Path;

/// x position of quantile `q` on the stretched axis: log10(1 / (1 - q)),
/// so 90% sits at 1, 99% at 2, 99.9% at 3.
fn stretch(q: f64) -> f64 {
    (1.0 / (1.0 - q.min(0.999_999))).log10()
}

fn label(x: f64) -> String {
    let pct = 100.0 * (1.0 - 10f64.powf(-x));
    let s = format!("{pct:.4}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    format!("{s}%")
}

/// Draws `h` (values in ticks at `ticks_per_s`) to `path`.
pub fn latency_plot(h: &Histogram<u64>, ticks_per_s: u64, title: &str, path: &Path) -> Result<()> {
    let us = |ticks: u64| ticks as f64 * 1e6 / ticks_per_s.max(1) as f64;
    let mut points: Vec<(f64, f64)> = Vec::new();
    if !h.is_empty() {
        for v in h.iter_quantiles(4) {
            points.push((stretch(v.quantile_iterated_to()), us(v.value_iterated_to())));
        }
    }
    let x_max = points.iter().map(|p| p.0).fold(1.0f64, f64::max).ceil().max(1.0);
    let y_max = points.iter().map(|p| p.1).fold(1.0f64, f64::max) * 1.1;
    let err = |e: String| anyhow!("drawing {}: {e}", path.display());
    let root = SVGBackend::new(path, (960, 540)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..x_max, 0f64..y_max)
        .map_err(|e| err(e.to_string()))?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("latency (us)")
        .x_labels(x_max as usize + 1)
        .x_label_formatter(&|x| label(*x))
        .draw()
        .map_err(|e| err(e.to_string()))?;
    chart.draw_series(LineSeries::new(points, &BLUE)).map_err(|e| err(e.to_string()))?;
    root.present().map_err(|e| err(e.to_string()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axis_labels() {
        assert_eq!(label(stretch(0.9)), "90%");
        assert_eq!(label(stretch(0.99)), "99%");
        assert_eq!(label(0.0), "0%");
    }
}
