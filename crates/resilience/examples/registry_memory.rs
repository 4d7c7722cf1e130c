//! Resident memory before and after 1,000,000 distinct adapter names go
//! through `AdapterName::parse` and `BreakerRegistry::get`.
//!
//! ```text
//! cargo run -p smartbeak-resilience --example registry_memory
//! ```
//!
//! Exits non-zero if the growth reaches the 5 MB target. Linux only (reads
//! `/proc/self/statm`, resident pages times a 4 KiB page, and cross-checks
//! `VmRSS` in `/proc/self/status`).

use std::fmt::Write as _;
use std::process::ExitCode;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use smartbeak_resilience::{AdapterName, BreakerPolicy, BreakerRegistry, RegistryConfig};

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

fn main() -> ExitCode {
    let registry = BreakerRegistry::new(RegistryConfig::default());
    let policy = BreakerPolicy::default();
    let mut rng = StdRng::seed_from_u64(1);
    let mut name = String::with_capacity(64);

    // Warm up lazy statics and the first breaker.
    let _ = registry.get(AdapterName::parse("warm-up-name"), &policy);
    let (Some(before), Some(before_status)) = (rss_statm(), rss_status()) else {
        eprintln!("cannot read /proc/self/statm or /proc/self/status");
        return ExitCode::FAILURE;
    };

    let mut unknown = 0usize;
    for _ in 0..NAMES {
        name.clear();
        let _ = write!(
            name,
            "attacker-{:016x}-{:08x}",
            rng.random::<u64>(),
            rng.random::<u32>()
        );
        let adapter = AdapterName::parse(&name);
        unknown += usize::from(adapter == AdapterName::Unknown);
        let _breaker = registry.get(adapter, &policy);
    }

    let (Some(after), Some(after_status)) = (rss_statm(), rss_status()) else {
        eprintln!("cannot read /proc/self/statm or /proc/self/status");
        return ExitCode::FAILURE;
    };
    let growth = after.saturating_sub(before);
    println!("names parsed:        {NAMES} ({unknown} mapped to `unknown`)");
    println!(
        "registry entries:    {} (capacity {})",
        registry.len(),
        registry.config().capacity
    );
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
    if growth >= TARGET_BYTES {
        eprintln!("growth {growth} bytes reaches the 5 MB target");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
