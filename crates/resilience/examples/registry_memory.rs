//! Resident memory before and after 1,000,000 distinct adapter names go
//! through `AdapterName::parse` and `BreakerRegistry::get`.
//!
//! ```text
//! cargo run -p smartbeak-resilience --example registry_memory -- \
//!     [--mode bounded|unbounded] [--names N] [--json FILE]
//! ```
//!
//! `--mode unbounded` is the anchor: the original's design, a `HashMap<String,
//! CircuitBreaker>` with one breaker per distinct name, fed the same names. Run
//! each mode in its own process so each growth is clean. `--json FILE` writes
//! the figures for `cargo xtask bench`.
//!
//! In bounded mode, exits non-zero if the growth reaches the 5 MB target. Linux
//! only (reads `/proc/self/statm`, resident pages times a 4 KiB page, and
//! cross-checks `VmRSS` in `/proc/self/status`).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::process::ExitCode;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use smartbeak_resilience::{
    AdapterName, BreakerPolicy, BreakerRegistry, CircuitBreaker, RegistryConfig,
};

const NAMES: usize = 1_000_000;
const TARGET_BYTES: u64 = 5 * 1024 * 1024;
const PAGE: u64 = 4096;

/// Resident set size in bytes from `/proc/self/statm`.
fn rss_statm() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let resident: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(resident * PAGE)
}

/// `VmRSS` in bytes from `/proc/self/status`.
fn rss_status() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

struct Args {
    unbounded: bool,
    names: usize,
    json: Option<String>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        unbounded: false,
        names: NAMES,
        json: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--mode" => match it.next().as_deref() {
                Some("bounded") => args.unbounded = false,
                Some("unbounded") => args.unbounded = true,
                other => return Err(format!("--mode {other:?}: bounded or unbounded")),
            },
            "--names" => {
                let value = it.next().unwrap_or_default();
                args.names = value
                    .parse()
                    .map_err(|_| format!("--names {value:?}: not a count"))?;
            }
            "--json" => args.json = Some(it.next().ok_or("--json needs a file")?),
            other => return Err(format!("unexpected argument {other:?}")),
        }
    }
    Ok(args)
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("registry_memory: {e}");
            return ExitCode::FAILURE;
        }
    };
    let registry = BreakerRegistry::new(RegistryConfig::default());
    // The anchor: one breaker per distinct name, never evicted.
    let mut unbounded: HashMap<String, CircuitBreaker> = HashMap::new();
    let policy = BreakerPolicy::default();
    let mut rng = StdRng::seed_from_u64(1);
    let mut name = String::with_capacity(64);

    // Warm up lazy statics and the first breaker.
    if args.unbounded {
        let warm = AdapterName::parse("warm-up-name");
        unbounded.insert(
            "warm-up-name".into(),
            CircuitBreaker::new(warm, policy.clone()),
        );
    } else {
        let _ = registry.get(AdapterName::parse("warm-up-name"), &policy);
    }
    let (Some(before), Some(before_status)) = (rss_statm(), rss_status()) else {
        eprintln!("cannot read /proc/self/statm or /proc/self/status");
        return ExitCode::FAILURE;
    };

    let mut unknown = 0usize;
    for _ in 0..args.names {
        name.clear();
        let _ = write!(
            name,
            "attacker-{:016x}-{:08x}",
            rng.random::<u64>(),
            rng.random::<u32>()
        );
        let adapter = AdapterName::parse(&name);
        unknown += usize::from(adapter == AdapterName::Unknown);
        if args.unbounded {
            unbounded
                .entry(name.clone())
                .or_insert_with(|| CircuitBreaker::new(adapter, policy.clone()));
        } else {
            let _breaker = registry.get(adapter, &policy);
        }
    }

    let (Some(after), Some(after_status)) = (rss_statm(), rss_status()) else {
        eprintln!("cannot read /proc/self/statm or /proc/self/status");
        return ExitCode::FAILURE;
    };
    let growth = after.saturating_sub(before);
    let entries = if args.unbounded {
        unbounded.len()
    } else {
        registry.len()
    };
    let mode = if args.unbounded {
        "unbounded"
    } else {
        "bounded"
    };
    println!("mode:                {mode}");
    println!(
        "names parsed:        {} ({unknown} mapped to `unknown`)",
        args.names
    );
    if args.unbounded {
        println!("map entries:         {entries} (unbounded HashMap<String, CircuitBreaker>)");
    } else {
        println!(
            "registry entries:    {entries} (capacity {})",
            registry.config().capacity
        );
    }
    println!("rss before (statm):  {:.2} MiB", mib(before));
    println!("rss after  (statm):  {:.2} MiB", mib(after));
    println!(
        "rss growth (statm):  {:.3} MiB ({growth} bytes)",
        mib(growth)
    );
    println!(
        "rss growth (VmRSS):  {:.3} MiB",
        mib(after_status.saturating_sub(before_status))
    );
    if let Some(path) = &args.json {
        let json = format!(
            "{{\"mode\": \"{mode}\", \"names\": {}, \"entries\": {entries}, \
             \"rss_before_bytes\": {before}, \"rss_after_bytes\": {after}, \
             \"growth_bytes\": {growth}}}\n",
            args.names
        );
        if let Err(e) = std::fs::write(path, json) {
            eprintln!("writing {path}: {e}");
            return ExitCode::FAILURE;
        }
    }
    if !args.unbounded && growth >= TARGET_BYTES {
        eprintln!("growth {growth} bytes reaches the 5 MB target");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
