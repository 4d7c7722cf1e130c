//! `AdapterName`: the closed set of upstream adapters a breaker, bulkhead or
//! metric label can be keyed by. Anything else parses to `unknown`, so
//! attacker-chosen names can never grow a map or a label set.

use std::convert::Infallible;
use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Counter incremented for every name that is not on the allowlist.
pub const UNKNOWN_ADAPTER_COUNTER: &str = "resilience_unknown_adapter_total";

/// At most one warning about unknown adapter names per this interval.
pub const UNKNOWN_WARN_INTERVAL: Duration = Duration::from_secs(10);

/// A validated adapter name from the allowlist.
///
/// Parsing never fails: a name that is not on the list becomes
/// [`AdapterName::Unknown`], increments [`UNKNOWN_ADAPTER_COUNTER`] and logs a
/// warning at most once per [`UNKNOWN_WARN_INTERVAL`] (with the number of
/// suppressed ones), so a flood of bad names floods neither the log nor memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
#[allow(missing_docs)] // the variants are the names themselves
pub enum AdapterName {
    GoogleAnalytics,
    Ga,
    Gsc,
    Facebook,
    Vercel,
    Linkedin,
    Twitter,
    Instagram,
    Youtube,
    Tiktok,
    Pinterest,
    Openai,
    Stability,
    Mailchimp,
    Aweber,
    Constantcontact,
    Wordpress,
    Vimeo,
    Soundcloud,
    Podcast,
    Gbp,
    Ahrefs,
    #[default]
    Unknown,
}

impl AdapterName {
    /// Every adapter name, `Unknown` last; `ALL[a.index()] == a`.
    pub const ALL: [AdapterName; 23] = [
        Self::GoogleAnalytics,
        Self::Ga,
        Self::Gsc,
        Self::Facebook,
        Self::Vercel,
        Self::Linkedin,
        Self::Twitter,
        Self::Instagram,
        Self::Youtube,
        Self::Tiktok,
        Self::Pinterest,
        Self::Openai,
        Self::Stability,
        Self::Mailchimp,
        Self::Aweber,
        Self::Constantcontact,
        Self::Wordpress,
        Self::Vimeo,
        Self::Soundcloud,
        Self::Podcast,
        Self::Gbp,
        Self::Ahrefs,
        Self::Unknown,
    ];

    /// Number of distinct names (including `unknown`).
    pub const COUNT: usize = Self::ALL.len();

    /// The canonical lowercase name, e.g. `"google-analytics"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::GoogleAnalytics => "google-analytics",
            Self::Ga => "ga",
            Self::Gsc => "gsc",
            Self::Facebook => "facebook",
            Self::Vercel => "vercel",
            Self::Linkedin => "linkedin",
            Self::Twitter => "twitter",
            Self::Instagram => "instagram",
            Self::Youtube => "youtube",
            Self::Tiktok => "tiktok",
            Self::Pinterest => "pinterest",
            Self::Openai => "openai",
            Self::Stability => "stability",
            Self::Mailchimp => "mailchimp",
            Self::Aweber => "aweber",
            Self::Constantcontact => "constantcontact",
            Self::Wordpress => "wordpress",
            Self::Vimeo => "vimeo",
            Self::Soundcloud => "soundcloud",
            Self::Podcast => "podcast",
            Self::Gbp => "gbp",
            Self::Ahrefs => "ahrefs",
            Self::Unknown => "unknown",
        }
    }

    /// Position in [`AdapterName::ALL`], usable as an array index.
    pub const fn index(self) -> usize {
        self as usize
    }

    /// Lenient parse: an allowlisted name (ASCII case-insensitive, surrounding
    /// whitespace ignored) or `Unknown`, with the counter and rate-limited
    /// warning described on the type. `"unknown"` itself is accepted silently.
    pub fn parse(name: &str) -> Self {
        match Self::from_known(name) {
            Some(adapter) => adapter,
            None => {
                note_unknown(name);
                Self::Unknown
            }
        }
    }

    /// Strict parse without side effects: `None` for a name not on the list.
    pub fn from_known(name: &str) -> Option<Self> {
        let name = name.trim();
        // Longest allowlisted name is 16 bytes; anything longer is unknown
        // without comparing.
        if name.len() > 16 {
            return None;
        }
        Self::ALL
            .iter()
            .copied()
            .find(|a| a.as_str().eq_ignore_ascii_case(name))
    }
}

impl FromStr for AdapterName {
    type Err = Infallible;

    /// Same as [`AdapterName::parse`]: never fails.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self::parse(s))
    }
}

impl fmt::Display for AdapterName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl AsRef<str> for AdapterName {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

/// Process start for the warning rate limiter (monotonic).
fn warn_epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Lets one event through per interval and counts the ones it holds back.
#[derive(Debug)]
struct RateLimiter {
    interval_ms: u64,
    /// Milliseconds since `warn_epoch` of the last event let through, plus
    /// one (0 = never).
    last_ms: AtomicU64,
    suppressed: AtomicU64,
}

impl RateLimiter {
    const fn new(interval: Duration) -> Self {
        Self {
            interval_ms: interval.as_millis() as u64,
            last_ms: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(suppressed since the last one)` when an event may be emitted at
    /// `now_ms` (milliseconds since some fixed epoch).
    fn permit(&self, now_ms: u64) -> Option<u64> {
        let now = now_ms.saturating_add(1);
        let last = self.last_ms.load(Ordering::Relaxed);
        let due = last == 0 || now.saturating_sub(last) >= self.interval_ms;
        if due
            && self
                .last_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

static UNKNOWN_WARNINGS: RateLimiter = RateLimiter::new(UNKNOWN_WARN_INTERVAL);

fn note_unknown(name: &str) {
    let now_ms = u64::try_from(warn_epoch().elapsed().as_millis()).unwrap_or(u64::MAX);
    note_unknown_with(&UNKNOWN_WARNINGS, now_ms, name);
}

/// Counts `name` and warns about it if `limiter` lets a warning through at
/// `now_ms` (tests drive a limiter of their own on their own time).
fn note_unknown_with(limiter: &RateLimiter, now_ms: u64, name: &str) {
    metrics::counter!(UNKNOWN_ADAPTER_COUNTER).increment(1);
    if let Some(suppressed) = limiter.permit(now_ms) {
        tracing::warn!(
            name = %truncate(name, 64).escape_debug(),
            suppressed,
            "unknown adapter name, using `unknown`"
        );
    }
}

/// At most `max` chars of `s` (on a char boundary).
fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((at, _)) => &s[..at],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use std::sync::Arc;
    use std::sync::atomic::AtomicUsize;

    use super::*;

    #[test]
    fn every_name_round_trips() {
        for (i, a) in AdapterName::ALL.iter().enumerate() {
            assert_eq!(a.index(), i);
            assert_eq!(AdapterName::parse(a.as_str()), *a);
            assert_eq!(a.as_str().parse::<AdapterName>().unwrap(), *a);
            assert_eq!(AdapterName::from_known(a.as_str()), Some(*a));
        }
    }

    #[test]
    fn parse_is_lenient_on_case_and_whitespace_only() {
        assert_eq!(
            AdapterName::parse(" Google-Analytics "),
            AdapterName::GoogleAnalytics
        );
        assert_eq!(AdapterName::parse("google_analytics"), AdapterName::Unknown);
        assert_eq!(AdapterName::parse(""), AdapterName::Unknown);
        assert_eq!(AdapterName::from_known("nope"), None);
    }

    #[test]
    fn unknown_names_are_counted() {
        let recorder = crate::test_recorder::TestRecorder::default();
        metrics::with_local_recorder(&recorder, || {
            for name in ["nope", "twitter", "x", "unknown"] {
                AdapterName::parse(name);
            }
        });
        assert_eq!(recorder.counter("resilience_unknown_adapter_total{}"), 2);
    }

    /// Counts `warn` events of this module on the thread it is installed on.
    struct WarnCounter(Arc<AtomicUsize>);

    impl tracing::Subscriber for WarnCounter {
        fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
            true
        }
        fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
            tracing::span::Id::from_u64(1)
        }
        fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
        fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
        fn event(&self, event: &tracing::Event<'_>) {
            let meta = event.metadata();
            if *meta.level() == tracing::Level::WARN
                && meta.target() == "smartbeak_resilience::adapter"
            {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        fn enter(&self, _: &tracing::span::Id) {}
        fn exit(&self, _: &tracing::span::Id) {}
    }

    #[test]
    fn a_flood_of_unknown_names_emits_a_bounded_number_of_warnings() {
        const FLOOD: u64 = 100_000;
        // The flood spans 35 s of simulated time (0.35 ms a name) on a
        // limiter of its own, so no other test can take its warnings.
        const SPAN_MS: u64 = 35_000;
        let limiter = RateLimiter::new(UNKNOWN_WARN_INTERVAL);
        let warnings = Arc::new(AtomicUsize::new(0));
        let recorder = crate::test_recorder::TestRecorder::default();
        tracing::subscriber::with_default(WarnCounter(Arc::clone(&warnings)), || {
            metrics::with_local_recorder(&recorder, || {
                for i in 0..FLOOD {
                    note_unknown_with(&limiter, i * SPAN_MS / FLOOD, &format!("attacker-{i}"));
                }
            });
        });
        // At least one warning (the flood is not silent), at most one per
        // started interval (0, 10, 20 and 30 s), however many names came in;
        // each name is still counted.
        let intervals = SPAN_MS.div_ceil(UNKNOWN_WARN_INTERVAL.as_millis() as u64);
        let emitted = warnings.load(Ordering::SeqCst) as u64;
        assert!(emitted >= 1, "no warning for {FLOOD} unknown names");
        assert!(
            emitted <= intervals,
            "{emitted} warnings for {FLOOD} names in {intervals} intervals"
        );
        assert_eq!(emitted, 4);
        assert_eq!(
            recorder.counter("resilience_unknown_adapter_total{}"),
            FLOOD
        );
    }

    #[test]
    fn parse_goes_through_the_counter_and_the_limiter() {
        let recorder = crate::test_recorder::TestRecorder::default();
        metrics::with_local_recorder(&recorder, || {
            AdapterName::parse("attacker");
        });
        assert_eq!(recorder.counter("resilience_unknown_adapter_total{}"), 1);
        // The shared limiter has let at least this process's first warning
        // through (its mark is set).
        assert_ne!(UNKNOWN_WARNINGS.last_ms.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn warnings_are_rate_limited_and_report_what_they_held_back() {
        let limiter = RateLimiter::new(Duration::from_secs(10));
        assert_eq!(limiter.permit(0), Some(0));
        let held_back = (1..10_000).filter_map(|ms| limiter.permit(ms)).count();
        assert_eq!(held_back, 0);
        assert_eq!(limiter.permit(10_000), Some(9_999));
        assert_eq!(limiter.permit(10_001), None);
        assert_eq!(limiter.permit(20_000), Some(1));
    }

    #[test]
    fn truncate_respects_char_boundaries() {
        assert_eq!(truncate("ééé", 2), "éé");
        assert_eq!(truncate("ab", 5), "ab");
    }
}
