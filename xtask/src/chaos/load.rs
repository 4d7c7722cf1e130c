//! The HTTP load generator of `cargo xtask chaos` and `cargo xtask bench`: open loop
//! (requests at a fixed rate whatever the answers take) or closed loop (a fixed count over
//! N connections), each request with a deadline, every outcome recorded with its send time,
//! its scheduled time and its kind.

use std::time::{Duration, Instant};

use tokio::task::JoinSet;

/// What one request ended in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Kind {
    /// A 2xx answer.
    Ok,
    /// An error answer with the standard body `{"error": .., "code": ..}`.
    Status(u16, String),
    /// An error answer whose body is not the standard one.
    BadBody(u16),
    /// No answer within the client's deadline.
    Deadline,
    /// The connection failed (refused, reset, closed before an answer).
    Transport,
}

impl Kind {
    /// The key the scenario line counts errors under.
    pub(crate) fn label(&self) -> String {
        match self {
            Self::Ok => "ok".to_owned(),
            Self::Status(status, code) => format!("{status} {code}"),
            Self::BadBody(status) => format!("{status} non-standard body"),
            Self::Deadline => "client deadline".to_owned(),
            Self::Transport => "transport".to_owned(),
        }
    }
}

/// One request's outcome.
#[derive(Debug, Clone)]
pub(crate) struct Outcome {
    /// When it was sent, from the start of the load.
    pub(crate) sent: Duration,
    /// When the schedule said to send it, from the start of the load (open loop; the
    /// closed loop and the burst send at once: equal to `sent`).
    pub(crate) scheduled: Duration,
    /// From the send to the outcome (the service time).
    pub(crate) latency: Duration,
    pub(crate) kind: Kind,
    /// Which of the load's `urls` it went to.
    pub(crate) target: usize,
}

/// The load: `rate` requests a second for `duration`, spread round-robin over `urls`.
#[derive(Debug, Clone)]
pub(crate) struct Load {
    pub(crate) urls: Vec<String>,
    pub(crate) key: String,
    pub(crate) rate: u32,
    pub(crate) duration: Duration,
    /// The client's deadline per request: past it the request counts as hung.
    pub(crate) deadline: Duration,
    /// The instant send times count from, shared with the fault schedule.
    pub(crate) epoch: Instant,
}

/// What a load run produced: the outcomes, and how many requests were sent.
#[derive(Debug)]
pub(crate) struct Report {
    pub(crate) sent: usize,
    pub(crate) outcomes: Vec<Outcome>,
}

impl Load {
    /// Runs the load to its end and waits for every request.
    pub(crate) async fn run(self) -> Report {
        let client = match reqwest::Client::builder()
            .no_proxy()
            .pool_max_idle_per_host(256)
            .build()
        {
            Ok(client) => client,
            Err(_) => {
                return Report {
                    sent: 0,
                    outcomes: Vec::new(),
                };
            }
        };
        let start = self.epoch;
        let period = Duration::from_secs_f64(1.0 / f64::from(self.rate.max(1)));
        // Burst: a late tick is made up at once, so the rate stays fixed (open loop). The
        // first tick is due at once: request i is due `first + i * period`.
        let first = start.elapsed();
        let mut ticks = tokio::time::interval(period);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let mut tasks = JoinSet::new();
        let mut sent = 0usize;
        while start.elapsed() < self.duration {
            ticks.tick().await;
            let target = sent % self.urls.len();
            let request = client.get(&self.urls[target]).bearer_auth(&self.key);
            let deadline = self.deadline;
            let scheduled = first + period.saturating_mul(u32::try_from(sent).unwrap_or(u32::MAX));
            sent += 1;
            tasks.spawn(async move {
                let sent = start.elapsed();
                let begun = Instant::now();
                let kind = match tokio::time::timeout(deadline, one(request)).await {
                    Ok(kind) => kind,
                    Err(_) => Kind::Deadline,
                };
                Outcome {
                    sent,
                    scheduled,
                    latency: begun.elapsed(),
                    kind,
                    target,
                }
            });
        }
        let mut outcomes = Vec::with_capacity(sent);
        while let Some(done) = tasks.join_next().await {
            if let Ok(outcome) = done {
                outcomes.push(outcome);
            }
        }
        outcomes.sort_by_key(|o| o.sent);
        Report { sent, outcomes }
    }
}

/// `n` requests sent at once, round-robin over `urls` (each on a connection of its own, so
/// the server sees them concurrently), each with `deadline`; waits for every one.
pub(crate) async fn burst(urls: &[String], key: &str, n: usize, deadline: Duration) -> Report {
    let Ok(client) = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(n)
        .build()
    else {
        return Report {
            sent: 0,
            outcomes: Vec::new(),
        };
    };
    let start = Instant::now();
    // Every task waits here until all are spawned: then they go together.
    let gate = std::sync::Arc::new(tokio::sync::Barrier::new(n));
    let mut tasks = JoinSet::new();
    for i in 0..n {
        let target = i % urls.len().max(1);
        let Some(url) = urls.get(target) else {
            break;
        };
        let request = client.get(url).bearer_auth(key);
        let gate = gate.clone();
        tasks.spawn(async move {
            gate.wait().await;
            let sent = start.elapsed();
            let begun = Instant::now();
            let kind = tokio::time::timeout(deadline, one(request))
                .await
                .unwrap_or(Kind::Deadline);
            Outcome {
                sent,
                scheduled: sent,
                latency: begun.elapsed(),
                kind,
                target,
            }
        });
    }
    let mut outcomes = Vec::with_capacity(n);
    while let Some(done) = tasks.join_next().await {
        if let Ok(outcome) = done {
            outcomes.push(outcome);
        }
    }
    Report { sent: n, outcomes }
}

/// `total` requests to `url` over `concurrency` connections, or as many as fit in
/// `within`, each sent as soon as the connection's previous answer came (closed loop), each
/// with `deadline`.
pub(crate) async fn closed(
    url: &str,
    key: &str,
    concurrency: usize,
    total: usize,
    within: Duration,
    deadline: Duration,
) -> Report {
    let Ok(client) = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(concurrency)
        .build()
    else {
        return Report {
            sent: 0,
            outcomes: Vec::new(),
        };
    };
    let start = Instant::now();
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = JoinSet::new();
    for _ in 0..concurrency.max(1) {
        let (client, next, url, key) =
            (client.clone(), next.clone(), url.to_owned(), key.to_owned());
        tasks.spawn(async move {
            let mut outcomes = Vec::new();
            while start.elapsed() < within
                && next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < total
            {
                let sent = start.elapsed();
                let begun = Instant::now();
                let request = client.get(&url).bearer_auth(&key);
                let kind = tokio::time::timeout(deadline, one(request))
                    .await
                    .unwrap_or(Kind::Deadline);
                outcomes.push(Outcome {
                    sent,
                    scheduled: sent,
                    latency: begun.elapsed(),
                    kind,
                    target: 0,
                });
            }
            outcomes
        });
    }
    let mut outcomes = Vec::with_capacity(total.min(1 << 20));
    while let Some(done) = tasks.join_next().await {
        if let Ok(done) = done {
            outcomes.extend(done);
        }
    }
    outcomes.sort_by_key(|o| o.sent);
    Report {
        sent: outcomes.len(),
        outcomes,
    }
}

impl Report {
    /// The latencies measured from each request's scheduled send time (open loop: what a
    /// client on that schedule saw, coordinated omission included), sorted.
    pub(crate) fn since_schedule(&self) -> Vec<Duration> {
        let mut all: Vec<Duration> = self
            .outcomes
            .iter()
            .map(|o| o.sent.saturating_sub(o.scheduled) + o.latency)
            .collect();
        all.sort_unstable();
        all
    }

    /// The service times (send to outcome), sorted.
    pub(crate) fn service_times(&self) -> Vec<Duration> {
        let mut all: Vec<Duration> = self.outcomes.iter().map(|o| o.latency).collect();
        all.sort_unstable();
        all
    }
}

/// The `p`-th percentile (0..=100) of `sorted` by the nearest-rank method; zero when empty.
pub(crate) fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    // Less an epsilon: 99.9 % of 1,000 is 999.000...01 in floating point, rank 999.
    let rank = (p / 100.0 * sorted.len() as f64 - 1e-9).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

async fn one(request: reqwest::RequestBuilder) -> Kind {
    let Ok(response) = request.send().await else {
        return Kind::Transport;
    };
    let status = response.status();
    let Ok(body) = response.text().await else {
        return Kind::Transport;
    };
    if status.is_success() {
        return Kind::Ok;
    }
    match (
        super::json_field(&body, "error"),
        super::json_field(&body, "code"),
    ) {
        (Some(_), Some(code)) => Kind::Status(status.as_u16(), code),
        _ => Kind::BadBody(status.as_u16()),
    }
}
