//! The command line: what parses into a run, and every bad option refused
//! with an error that names it (never a panic).

use perf::cli::{parse_size, ParseError, Parsed, Target, TransportId};
use perf::Workload;

fn parse(args: &[&str]) -> Result<Parsed, ParseError> {
    perf::parse_from(std::iter::once("nvraid-perf").chain(args.iter().copied()))
}

fn spec(args: &[&str]) -> perf::RunSpec {
    match parse(args) {
        Ok(Parsed::Run(s)) => *s,
        other => panic!("{args:?} did not parse into a run: {other:?}"),
    }
}

fn invalid(args: &[&str]) -> String {
    match parse(args) {
        Err(e) => e.to_string(),
        Ok(p) => panic!("{args:?} parsed but should not: {p:?}"),
    }
}

const BASE: &[&str] = &["--json", "cfg.json", "-q", "32", "-o", "4k", "-w", "randread", "-t", "2"];

#[test]
fn a_full_command_line_parses() {
    let s = spec(&[
        "--json",
        "c.json",
        "-q",
        "128",
        "-o",
        "128KiB",
        "-w",
        "randrw",
        "-M",
        "70",
        "-t",
        "1.5",
        "-m",
        "0x3",
        "-b",
        "Malloc0,Malloc1",
        "-b",
        "Null0",
        "--seed",
        "0x2a",
        "--idle",
        "sleep",
        "--no-pin",
        "--report-json",
        "r.json",
        "--latency-svg",
        "l.svg",
    ]);
    assert_eq!(s.queue_depth, 128);
    assert_eq!(s.io_size_bytes, 128 << 10);
    assert_eq!(s.workload, Workload::RandRw);
    assert_eq!(s.read_pct, 70);
    assert_eq!(s.duration.as_millis(), 1500);
    assert_eq!(s.cores, vec![0, 1]);
    assert_eq!(s.seed, 42);
    assert!(!s.pin);
    assert!(s.stamp);
    match &s.target {
        Target::Local { bdevs, .. } => assert_eq!(bdevs, &["Malloc0", "Malloc1", "Null0"]),
        t => panic!("{t:?}"),
    }
    assert!(s.report_json.is_some() && s.latency_svg.is_some());
}

#[test]
fn defaults_and_every_workload_name() {
    for w in Workload::ALL {
        let mut args = BASE.to_vec();
        args[7] = w.name();
        let s = spec(&args);
        assert_eq!(s.workload, w);
        let expect = match w {
            Workload::Read | Workload::RandRead => 100,
            Workload::Rw | Workload::RandRw => 50,
            _ => 0,
        };
        assert_eq!(s.read_pct, expect, "{w}");
    }
    let s = spec(BASE);
    assert_eq!(s.cores, vec![0]);
    assert_eq!(s.idle, mgmt::reactor::IdlePolicy::BusyPoll, "a benchmark busy-polls by default");
    assert!(s.pin);
}

#[test]
fn sizes() {
    assert_eq!(parse_size("4096").unwrap(), 4096);
    assert_eq!(parse_size("4k").unwrap(), 4096);
    assert_eq!(parse_size("1M").unwrap(), 1 << 20);
    assert!(parse_size("4q").is_err());
    assert!(parse_size("").is_err());
    assert!(parse_size("99999999999999999999k").is_err());
}

#[test]
fn bad_options_are_refused_by_name() {
    let with = |k: &str, v: &str| {
        let mut a: Vec<&str> = BASE.to_vec();
        let i = a.iter().position(|x| *x == k).unwrap();
        a[i + 1] = v;
        invalid(&a)
    };
    let without = |k: &str| {
        let mut a: Vec<&str> = BASE.to_vec();
        let i = a.iter().position(|x| *x == k).unwrap();
        a.drain(i..i + 2);
        invalid(&a)
    };
    assert!(with("-q", "0").contains("-q 0"));
    assert!(with("-q", "100000").contains("queue depth"));
    assert!(with("-q", "-3").contains("-3") || with("-q", "-3").contains("unexpected"));
    assert!(with("-o", "0").contains("-o 0"));
    assert!(with("-o", "1G").contains("IO size"));
    assert!(with("-o", "lots").contains("-o"));
    assert!(with("-w", "scramble").contains("unknown workload"));
    assert!(with("-t", "0").contains("-t 0"));
    assert!(with("-t", "-1").contains("-1"));
    assert!(with("-t", "NaN").contains("run time"));
    assert!(with("-t", "1e300").contains("run time"));
    assert!(without("-q").contains("missing -q"));
    assert!(without("-o").contains("missing -o"));
    assert!(without("-w").contains("missing -w"));
    assert!(without("-t").contains("missing -t"));
    assert!(without("--json").contains("--json"));
    let mut a = BASE.to_vec();
    a.extend(["-m", "0x0"]);
    assert!(invalid(&a).contains("core mask"));
    let mut a = BASE.to_vec();
    a.extend(["-M", "50"]);
    assert!(invalid(&a).contains("rw and randrw"), "-M with randread");
    let mut a = BASE.to_vec();
    a[7] = "rw";
    a.extend(["-M", "101"]);
    assert!(invalid(&a).contains("-M 101"));
    let mut a = BASE.to_vec();
    a.extend(["--seed", "zz"]);
    assert!(invalid(&a).contains("--seed"));
    let mut a = BASE.to_vec();
    a.extend(["--frobnicate"]);
    assert!(invalid(&a).contains("--frobnicate"));
    let mut a = BASE.to_vec();
    a.extend(["-r", "trtype:TCP traddr:127.0.0.1 subnqn:nqn.x"]);
    assert!(invalid(&a).contains("not both"));
    let mut a = BASE.to_vec();
    a[7] = "verify";
    a.push("--no-stamp");
    assert!(invalid(&a).contains("verify"));
}

#[test]
fn transport_ids() {
    let t =
        TransportId::parse("trtype:TCP adrfam:IPv4 traddr:127.0.0.1 trsvcid:4420 subnqn:nqn.2016-06.io.spdk:cnode1")
            .unwrap();
    assert_eq!(t.traddr, "127.0.0.1");
    assert_eq!(t.trsvcid, "4420");
    assert_eq!(t.subnqn, "nqn.2016-06.io.spdk:cnode1");
    assert!(TransportId::parse("trtype:RDMA traddr:1.2.3.4").is_err());
    assert!(TransportId::parse("trtype:TCP").unwrap_err().to_string().contains("traddr"));
    assert!(TransportId::parse("trtype:TCP traddr:x trsvcid:99999 subnqn:n").is_err());
    assert!(TransportId::parse("trtype:TCP traddr:x").unwrap_err().to_string().contains("subnqn"));
    assert!(TransportId::parse("trtype:TCP traddr:x bogus").is_err());
    assert!(TransportId::parse("trtype:TCP traddr:x color:red").is_err());
    let s = spec(&[
        "-r",
        "trtype:TCP traddr:127.0.0.1 trsvcid:4420 subnqn:nqn.x",
        "-q",
        "1",
        "-o",
        "4096",
        "-w",
        "read",
        "-t",
        "1",
    ]);
    assert!(matches!(s.target, Target::Tcp(_)));
}

#[test]
fn the_bench_subcommand_parses() {
    match parse(&["bench", "-t", "2", "--core", "1"]) {
        Ok(Parsed::Bench(b)) => {
            assert_eq!(b.time_s, 2.0);
            assert_eq!(b.core, 1);
        }
        other => panic!("{other:?}"),
    }
    assert!(parse(&["bench", "-t", "0"]).is_err());
}

#[test]
fn bench_only_takes_known_row_names() {
    match parse(&["bench", "--only", "raid5,raid0x4"]) {
        Ok(Parsed::Bench(b)) => assert_eq!(b.only, ["raid5", "raid0x4"]),
        other => panic!("{other:?}"),
    }
    match parse(&["bench"]) {
        Ok(Parsed::Bench(b)) => assert!(b.only.is_empty(), "default: every row"),
        other => panic!("{other:?}"),
    }
    let e = parse(&["bench", "--only", "raid5,raid9"]).unwrap_err().to_string();
    assert!(e.contains("raid9") && e.contains("no such rows") && e.contains("raid0x4"), "{e}");
}
