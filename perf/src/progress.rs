//! The line a run prints while it goes: an `indicatif` bar on a terminal,
//! one plain line per interval otherwise (logs, CI, the bench driver).

use crate::local::Sample;
use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::time::Duration;

pub struct Progress {
    bar: Option<ProgressBar>,
    plain: bool,
}

impl Progress {
    pub fn new(duration: Duration, quiet: bool) -> Progress {
        if quiet {
            return Progress { bar: None, plain: false };
        }
        if !std::io::stdout().is_terminal() {
            return Progress { bar: None, plain: true };
        }
        let bar = ProgressBar::new(duration.as_millis() as u64);
        let style = ProgressStyle::with_template("[{elapsed_precise}] {bar:30.cyan/blue} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar());
        bar.set_style(style);
        Progress { bar: Some(bar), plain: false }
    }

    /// Reports the interval from `prev` to `now`.
    pub fn update(&mut self, prev: &Sample, now: &Sample) {
        let dt = now.elapsed.saturating_sub(prev.elapsed).as_secs_f64();
        if dt <= 0.0 || (self.bar.is_none() && !self.plain) {
            return;
        }
        let iops = now.ios.saturating_sub(prev.ios) as f64 / dt;
        let mibs = now.bytes.saturating_sub(prev.bytes) as f64 / dt / (1u64 << 20) as f64;
        let line = format!("{iops:>12.0} IOPS {mibs:>10.2} MiB/s  errors {}", now.errors);
        if let Some(bar) = &self.bar {
            bar.set_position(now.elapsed.as_millis() as u64);
            bar.set_message(line);
        } else if self.plain {
            println!("[{:>7.1} s] {line}", now.elapsed.as_secs_f64());
        }
    }

    pub fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}
