//! `nvraid-perf`: command line entry; see the library for the workings.
#![forbid(unsafe_code)]

use perf::cli::{ParseError, Parsed};
use perf::{Hooks, RunSpec};

fn main() {
    let code = match perf::parse_from(std::env::args_os()) {
        Ok(Parsed::Run(spec)) => report_errors(run(&spec)),
        Ok(Parsed::Bench(args)) => report_errors(perf::bench::run(&args)),
        Err(ParseError::Clap(e)) => {
            // Help and version go to stdout with status 0; usage errors to stderr with 2.
            let _ = e.print();
            e.exit_code()
        }
        Err(e @ ParseError::Invalid(_)) => {
            eprintln!("nvraid-perf: error: {e}");
            eprintln!("Try 'nvraid-perf --help'.");
            2
        }
    };
    std::process::exit(code);
}

fn report_errors(r: anyhow::Result<i32>) -> i32 {
    match r {
        Ok(code) => code,
        Err(e) => {
            eprintln!("nvraid-perf: error: {e:#}");
            1
        }
    }
}

/// Runs, prints the table and writes the requested files; the exit status
/// is non-zero when any IO failed or any block did not verify.
fn run(spec: &RunSpec) -> anyhow::Result<i32> {
    println!(
        "nvraid-perf: {} qd {} io {} B for {:.1} s on cores {:?}, seed {:#x}{}",
        spec.workload,
        spec.queue_depth,
        spec.io_size_bytes,
        spec.duration.as_secs_f64(),
        spec.cores,
        spec.seed,
        if spec.stamp && spec.workload.io_types().contains(&mgmt::bdev::IoType::Write) {
            ", writes stamped"
        } else {
            ""
        }
    );
    let report = perf::run(spec, Hooks::default())?;
    print!("{}", report.table());
    for (job, m) in &report.mismatches {
        println!("verify mismatch in {job}: {m}");
    }
    if report.total.mismatch_count > report.mismatches.len() as u64 {
        println!("({} more mismatches not listed)", report.total.mismatch_count - report.mismatches.len() as u64);
    }
    for (job, e) in &report.io_errors {
        println!("IO errors in {job}: first was {e}");
    }
    if let Some(p) = &spec.report_json {
        report.write_json(spec, p)?;
    }
    if let Some(p) = &spec.latency_svg {
        let title = format!("{} qd{} {} B: latency by percentile", spec.workload, spec.queue_depth, spec.io_size_bytes);
        report.write_svg(&title, p)?;
    }
    let failed = report.total.errors > 0 || report.total.mismatch_count > 0;
    if failed {
        eprintln!(
            "nvraid-perf: {} IO errors, {} verify mismatches (replay with --seed {:#x})",
            report.total.errors, report.total.mismatch_count, report.seed
        );
    }
    Ok(i32::from(failed))
}
