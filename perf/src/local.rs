//! Local mode: start reactors, create the bdevs from the daemon's config
//! format (replayed through mgmt's method table, in process), run one job
//! per core per bdev for the run time, then collect and merge the results.

use crate::cli::{ConfigSource, RunSpec, Target};
use crate::job::{Job, JobConfig, JobProgress, JobResult};
use crate::progress::Progress;
use crate::report::Report;
use anyhow::{anyhow, bail, Context, Result};
use mgmt::bdev::{self, IoType, Registry};
use mgmt::reactor::{ReactorConfig, ReactorSet};
use mgmt::{config, Ctx, MethodTable};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

/// How long config replay and job drain may take before the run gives up.
const SETUP_TIMEOUT: Duration = Duration::from_secs(60);
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// A hook that runs on reactor 0 after the config and before the jobs
/// (tests use it to inject errors).
pub type SetupHook = Box<dyn FnOnce() -> Result<(), String> + Send>;

/// One sample of the running totals, for a progress observer.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sample {
    pub elapsed: Duration,
    pub ios: u64,
    pub bytes: u64,
    pub errors: u64,
}

/// Extras for in-process callers.
#[derive(Default)]
pub struct Hooks {
    pub setup: Option<SetupHook>,
    /// Called on the main thread at each progress interval.
    pub on_sample: Option<Box<dyn FnMut(Sample)>>,
    /// No progress output.
    pub quiet: bool,
}

/// What the run needs to know about a bdev.
#[derive(Clone, Debug)]
struct BdevFacts {
    name: String,
    block_size: u64,
    num_blocks: u64,
}

/// Starts the reactors, stops them when dropped.
struct Reactors(ReactorSet);

impl Drop for Reactors {
    fn drop(&mut self) {
        self.0.stop();
        self.0.join();
    }
}

/// Runs `spec` (which must be local) and returns its report.
pub fn run(spec: &RunSpec, mut hooks: Hooks) -> Result<Report> {
    let Target::Local { config: source, bdevs: wanted } = &spec.target else {
        bail!("run_local called with a remote target");
    };
    let text = match source {
        ConfigSource::File(p) => {
            std::fs::read_to_string(p).with_context(|| format!("reading config {}", p.display()))?
        }
        ConfigSource::Text(t) => t.clone(),
    };
    let calls = config::parse(&text).map_err(|e| anyhow!("config: {e}"))?;
    if spec.no_huge {
        bdev::dma::disable_hugepages();
    }
    let mut rcfg = ReactorConfig::new(spec.cores.clone(), spec.idle);
    rcfg.pin = spec.pin;
    let set = Reactors(ReactorSet::start(rcfg, || {}).context("starting reactors")?);
    let ctx = Ctx { reactors: set.0.clone(), shutdown: Box::new(|_| {}) };
    let table = Arc::new(MethodTable::new(ctx));
    config::check_methods(&calls, &table).map_err(|e| anyhow!("config: {e}"))?;

    let (tx, rx) = mpsc::channel();
    set.0.send(0, move || config::replay(table, calls, move |r| drop(tx.send(r))));
    match rx.recv_timeout(SETUP_TIMEOUT) {
        Ok(Ok(())) => {}
        Ok(Err(e)) => bail!("config: {e}"),
        Err(_) => bail!("config replay did not finish within {} s", SETUP_TIMEOUT.as_secs()),
    }
    if let Some(hook) = hooks.setup.take() {
        set.0.call(0, hook).map_err(|e| anyhow!("setup: {e}"))?;
    }

    let wanted = wanted.clone();
    let types = spec.workload.io_types();
    let facts = set.0.call(0, move || resolve_bdevs(&wanted, types)).map_err(|e| anyhow!(e))?;
    let jobs = plan_jobs(spec, &set.0, &facts)?;

    let stop = Arc::new(AtomicBool::new(false));
    let (done_tx, done_rx) = mpsc::channel::<JobResult>();
    let progress: Vec<Arc<JobProgress>> = jobs.iter().map(|_| Arc::new(JobProgress::default())).collect();
    let ticks_per_s = bdev::tsc::tick_rate();
    let built = build_jobs(&set.0, &jobs, &progress, &stop, done_tx);
    if let Err(e) = built {
        // Drop what was staged on each reactor as that reactor.
        for r in 0..set.0.count() {
            set.0.call(r, || STAGED.with(|s| s.borrow_mut().clear()));
        }
        return Err(e);
    }
    for r in 0..set.0.count() {
        set.0
            .call(r, || {
                let staged = STAGED.with(|s| std::mem::take(&mut *s.borrow_mut()));
                staged.iter().try_for_each(|j| j.start())
            })
            .map_err(|e| anyhow!(e))?;
    }

    let started = Instant::now();
    let mut bar = Progress::new(spec.duration, hooks.quiet);
    let mut last = Sample::default();
    let sample = |elapsed| Sample {
        elapsed,
        ios: progress.iter().map(|p| p.ios.load(Ordering::Relaxed)).sum(),
        bytes: progress.iter().map(|p| p.bytes.load(Ordering::Relaxed)).sum(),
        errors: progress.iter().map(|p| p.errors.load(Ordering::Relaxed)).sum(),
    };
    loop {
        let elapsed = started.elapsed();
        if elapsed >= spec.duration {
            break;
        }
        let next = (last.elapsed + spec.progress_interval).min(spec.duration);
        std::thread::sleep(next.saturating_sub(elapsed));
        let s = sample(started.elapsed());
        bar.update(&last, &s);
        if let Some(f) = hooks.on_sample.as_mut() {
            f(s);
        }
        last = s;
    }
    stop.store(true, Ordering::Relaxed);
    bar.finish();

    let mut results = Vec::with_capacity(jobs.len());
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    while results.len() < jobs.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        match done_rx.recv_timeout(left) {
            Ok(r) => results.push(r),
            Err(_) => bail!(
                "{} of {} jobs did not drain their IO within {} s",
                jobs.len() - results.len(),
                jobs.len(),
                DRAIN_TIMEOUT.as_secs()
            ),
        }
    }
    drop(set);
    Ok(Report::from_results(results, ticks_per_s, spec.seed))
}

/// Builds every job on its reactor (channels, buffers), staged until all
/// are built, so that a shortage anywhere fails the run before any IO.
fn build_jobs(
    set: &ReactorSet,
    jobs: &[JobConfig],
    progress: &[Arc<JobProgress>],
    stop: &Arc<AtomicBool>,
    done_tx: mpsc::Sender<JobResult>,
) -> Result<()> {
    for r in 0..set.count() {
        let mine: Vec<(JobConfig, Arc<JobProgress>)> =
            jobs.iter().zip(progress).filter(|(j, _)| j.reactor == r).map(|(j, p)| (j.clone(), p.clone())).collect();
        let (stop, done_tx) = (stop.clone(), done_tx.clone());
        set.call(r, move || {
            for (cfg, prog) in mine {
                let h = Registry::get().lookup(&cfg.bdev).ok_or_else(|| format!("bdev {} vanished", cfg.bdev))?;
                let ch = h.channel().map_err(|e| format!("bdev {}: {e}", cfg.bdev))?;
                let job = Job::new(cfg, ch, prog, stop.clone(), done_tx.clone())?;
                STAGED.with(|s| s.borrow_mut().push(job));
            }
            Ok::<(), String>(())
        })
        .map_err(|e| anyhow!(e))?;
    }
    Ok(())
}

thread_local! {
    /// Jobs built on this reactor, waiting for the start signal.
    static STAGED: std::cell::RefCell<Vec<std::rc::Rc<Job>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Looks the bdevs up (default: every unclaimed one) and checks that each
/// does what the workload needs.
fn resolve_bdevs(wanted: &[String], types: &[IoType]) -> Result<Vec<BdevFacts>, String> {
    let registry = Registry::get();
    let all = registry.list();
    let names_of = || all.iter().map(|h| h.name().to_string()).collect::<Vec<_>>().join(", ");
    let handles = if wanted.is_empty() {
        let free: Vec<_> = all.iter().filter(|h| h.claimed_by().is_none()).cloned().collect();
        if free.is_empty() {
            return Err("the config creates no bdev to run on".into());
        }
        free
    } else {
        let mut hs = Vec::new();
        for name in wanted {
            let h = registry.lookup(name).ok_or_else(|| {
                let have = names_of();
                let have = if have.is_empty() { "none".to_string() } else { have };
                format!("-b {name}: no such bdev (bdevs in the config: {have})")
            })?;
            if let Some(by) = h.claimed_by() {
                return Err(format!("-b {name}: bdev is claimed by {by}; run on the bdev that claims it"));
            }
            hs.push(h);
        }
        hs
    };
    let mut out = Vec::new();
    for h in handles {
        for &t in types {
            if !h.bdev().io_type_supported(t) {
                return Err(format!("bdev {} ({}) does not support {} IO", h.name(), h.bdev().module(), t.name()));
            }
        }
        let p = h.props();
        out.push(BdevFacts { name: p.name.clone(), block_size: u64::from(p.block_size), num_blocks: p.num_blocks });
    }
    Ok(out)
}

/// One job per reactor per bdev. Verify jobs split each bdev between the
/// reactors (their in-flight IOs must never overlap); the others cover it all.
fn plan_jobs(spec: &RunSpec, set: &ReactorSet, facts: &[BdevFacts]) -> Result<Vec<JobConfig>> {
    let n = set.count() as u64;
    let mut jobs = Vec::new();
    for (r, &core) in spec.cores.iter().enumerate() {
        for f in facts {
            if !spec.io_size_bytes.is_multiple_of(f.block_size) {
                bail!("-o {}: not a multiple of bdev {}'s block size {}", spec.io_size_bytes, f.name, f.block_size);
            }
            let io_blocks = spec.io_size_bytes / f.block_size;
            if io_blocks > f.num_blocks {
                bail!("-o {}: larger than bdev {} ({} bytes)", spec.io_size_bytes, f.name, f.num_blocks * f.block_size);
            }
            let (start, len) = if spec.workload == crate::Workload::Verify {
                let per = f.num_blocks / n / io_blocks * io_blocks;
                (per * r as u64, per)
            } else {
                (0, f.num_blocks)
            };
            jobs.push(JobConfig {
                job_index: jobs.len() as u32,
                bdev: f.name.clone(),
                reactor: r,
                core,
                workload: spec.workload,
                read_pct: spec.read_pct,
                queue_depth: spec.queue_depth,
                io_blocks,
                block_size: f.block_size,
                range_start_blocks: start,
                range_blocks: len,
                seed: spec.seed,
                stamp: spec.stamp,
            });
        }
    }
    let per_reactor = facts.len() as u64 * u64::from(spec.queue_depth);
    if per_reactor > bdev::io::pool_size() as u64 {
        bail!(
            "-q {} x {} bdevs = {per_reactor} IOs per core, more than the {} descriptors a reactor has",
            spec.queue_depth,
            facts.len(),
            bdev::io::pool_size()
        );
    }
    Ok(jobs)
}
