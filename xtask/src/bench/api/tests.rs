//! The parsing of wrk's and pgbench's output.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;

/// wrk 4.1 with `--latency` and the bench script's `done` hook (captured on this machine).
const WRK: &str = "\
Running 1s test @ http://127.0.0.1:18777/nope
  2 threads and 20 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     8.52ms    5.27ms  32.99ms   78.48%
    Req/Sec   696.64    138.43     1.01k    72.73%
  Latency Distribution
     50%    7.20ms
     75%   11.19ms
     90%   16.08ms
     99%   24.13ms
  762 requests in 1.10s, 387.13KB read
  Socket errors: connect 1, read 2, write 3, timeout 4
  Non-2xx or 3xx responses: 762
Requests/sec:    692.84
Transfer/sec:    352.00KB
bench: requests=762 duration_us=1099816 connect=1 read=2 write=3 status=762 timeout=4
bench: p50=7197 p75=11193 p90=16079 p99=24126 p999=32986 max=32986
";

#[test]
fn wrk_summary_is_read() {
    let w = parse_wrk(WRK).unwrap();
    assert_eq!(w.requests, 762);
    // Every answer of the fixture was non-2xx: no throughput.
    assert_eq!(w.rps, 0.0);
    let some = parse_wrk(&WRK.replace("status=762", "status=12")).unwrap();
    assert!((some.rps - 750.0 / 1.099816).abs() < 1e-6, "{}", some.rps);
    assert_eq!(w.p, [7.197, 11.193, 16.079, 24.126, 32.986]);
    assert_eq!(w.max_ms, 32.986);
    assert_eq!(
        (w.non2xx, w.connect, w.read, w.write, w.timeout),
        (762, 1, 2, 3, 4)
    );
    assert_eq!(w.socket_errors(), 10);
    assert_eq!(w.errors(), 772);
}

#[test]
fn the_wrk_script_prints_every_field_the_parser_reads() {
    for key in [
        "requests=",
        "duration_us=",
        "connect=",
        "read=",
        "write=",
        "status=",
        "timeout=",
        "p50=",
        "p75=",
        "p90=",
        "p99=",
        "p999=",
        "max=",
    ] {
        assert!(
            WRK_LUA.contains(&format!(" {key}%")) || WRK_LUA.contains(&format!("bench: {key}%")),
            "WRK_LUA does not print {key}"
        );
    }
}

#[test]
fn wrk_without_the_done_lines_is_an_error() {
    let plain: String = WRK
        .lines()
        .filter(|l| !l.starts_with("bench: "))
        .map(|l| format!("{l}\n"))
        .collect();
    let err = parse_wrk(&plain).unwrap_err().to_string();
    assert!(err.contains("bench: requests="), "{err}");
    let no_latency = WRK.replace("bench: p50=", "bench: x=");
    let err = parse_wrk(&no_latency).unwrap_err().to_string();
    assert!(err.contains("p50"), "{err}");
    let zero = WRK.replace("duration_us=1099816", "duration_us=0");
    assert!(parse_wrk(&zero).is_err());
    let missing = WRK.replace(" timeout=4", "");
    let err = parse_wrk(&missing).unwrap_err().to_string();
    assert!(err.contains("timeout"), "{err}");
}

/// pgbench 15 (captured on this machine).
const PGBENCH: &str = "\
pgbench (15.20 (Debian 15.20-0+deb12u1))
transaction type: target/bench/api-pgbench.sql
scaling factor: 1
query mode: prepared
number of clients: 64
number of threads: 2
maximum number of tries: 1
duration: 3 s
number of transactions actually processed: 61234
number of failed transactions: 7 (0.011%)
latency average = 3.135 ms
initial connection time = 41.622 ms
tps = 20411.623457 (without initial connection time)
";

#[test]
fn pgbench_summary_is_read() {
    let p = parse_pgbench(PGBENCH, 2).unwrap();
    assert_eq!(
        p,
        PgRun {
            round: 2,
            tps: 20411.623457,
            latency_ms: 3.135,
            failed: 7,
        }
    );
    let err = parse_pgbench(&PGBENCH.replace("tps = ", "tps: "), 1)
        .unwrap_err()
        .to_string();
    assert!(err.contains("tps"), "{err}");
}

#[test]
fn percentiles_by_nearest_rank() {
    let ms: Vec<Duration> = (1..=1000).map(Duration::from_millis).collect();
    assert_eq!(load::percentile(&ms, 50.0), Duration::from_millis(500));
    assert_eq!(load::percentile(&ms, 99.9), Duration::from_millis(999));
    assert_eq!(load::percentile(&ms, 100.0), Duration::from_millis(1000));
    assert_eq!(load::percentile(&ms, 0.0), Duration::from_millis(1));
    assert_eq!(load::percentile(&[], 50.0), Duration::ZERO);
}

#[test]
fn open_loop_latency_counts_from_the_schedule() {
    let at = |sched: u64, sent: u64, latency: u64| load::Outcome {
        sent: Duration::from_millis(sent),
        scheduled: Duration::from_millis(sched),
        latency: Duration::from_millis(latency),
        kind: load::Kind::Ok,
        target: 0,
    };
    // The second request went out 40 ms late (the generator stalled): that wait counts.
    let report = load::Report {
        sent: 3,
        outcomes: vec![at(0, 0, 5), at(10, 50, 5), at(20, 20, 7)],
    };
    let ms = |v: Vec<Duration>| v.iter().map(|d| d.as_millis()).collect::<Vec<_>>();
    assert_eq!(ms(report.since_schedule()), [5, 7, 45]);
    assert_eq!(ms(report.service_times()), [5, 5, 7]);
    let open = OpenLoop::of(&report, 100, Duration::from_millis(30));
    assert_eq!(open.max_lag_ms, 40.0);
    assert_eq!(open.errors, 0);
    assert_eq!(open.from_schedule[4], 45.0);
}
