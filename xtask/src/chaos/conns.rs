//! The many-connections load of scenario 10: `connections` keep-alive HTTP/1.1 connections,
//! opened over a ramp, each sending requests one after the other for the whole duration,
//! on plain tokio sockets (so the harness, not a client library's pool, decides how many
//! connections exist). Every wait is bounded: the connect, each answer, the whole run; each
//! outcome is classified by what happened, with no guessing.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

/// The load.
#[derive(Debug, Clone)]
pub(crate) struct Connections {
    pub(crate) addr: SocketAddr,
    /// The request's path (a GET).
    pub(crate) path: String,
    pub(crate) key: String,
    pub(crate) connections: usize,
    /// The connects are spread evenly over this.
    pub(crate) ramp: Duration,
    /// How long each connection keeps sending (from the start of the load).
    pub(crate) duration: Duration,
    /// A connect not done within this counts as `connect timeout`.
    pub(crate) connect_timeout: Duration,
    /// An answer not complete within this counts as `client deadline` (the connection is
    /// then dropped and opened again).
    pub(crate) deadline: Duration,
    /// The pause between an answer and the next request on the connection.
    pub(crate) think: Duration,
}

/// What the load saw, by kind: `200`, `503 OVERLOADED`, `connect timeout`, ...
#[derive(Debug, Default)]
pub(crate) struct Tally {
    /// Requests written (each has exactly one outcome in `outcomes`).
    pub(crate) requests: usize,
    /// Request outcomes by kind.
    pub(crate) outcomes: BTreeMap<String, usize>,
    /// Connection attempts that failed, by kind (no request was sent on them).
    pub(crate) connect_errors: BTreeMap<String, usize>,
    /// Connections established.
    pub(crate) connected: usize,
    /// The most connections open at the same time (as this side counts them).
    pub(crate) peak_open: usize,
    /// The slowest answer.
    pub(crate) slowest: Duration,
    /// How late this side's own 20 ms ticker fired at worst: a harness starved of CPU
    /// sees deadlines pass that the server did not miss.
    pub(crate) harness_lag: Duration,
}

impl Tally {
    fn merge(&mut self, other: Tally) {
        self.requests += other.requests;
        for (k, n) in other.outcomes {
            *self.outcomes.entry(k).or_default() += n;
        }
        for (k, n) in other.connect_errors {
            *self.connect_errors.entry(k).or_default() += n;
        }
        self.connected += other.connected;
        self.slowest = self.slowest.max(other.slowest);
    }
}

impl Connections {
    /// Runs the load to its end; every connection task ends by `duration` plus its
    /// deadline and connect timeout.
    pub(crate) async fn run(self) -> Tally {
        let this = Arc::new(self);
        let open = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let peak = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let start = Instant::now();
        let mut tasks = JoinSet::new();
        let step = this.ramp.div_f64(this.connections.max(1) as f64);
        for i in 0..this.connections {
            let this = this.clone();
            let (open, peak) = (open.clone(), peak.clone());
            let at = start + step.mul_f64(i as f64);
            tasks.spawn(async move {
                tokio::time::sleep_until(at.into()).await;
                this.connection(start, &open, &peak).await
            });
        }
        let end = start + this.duration;
        let lag = tokio::spawn(async move {
            let mut worst = Duration::ZERO;
            let tick = Duration::from_millis(20);
            while Instant::now() < end {
                let due = Instant::now() + tick;
                tokio::time::sleep(tick).await;
                worst = worst.max(Instant::now().saturating_duration_since(due));
            }
            worst
        });
        let mut tally = Tally::default();
        while let Some(done) = tasks.join_next().await {
            match done {
                Ok(t) => tally.merge(t),
                Err(_) => {
                    *tally
                        .outcomes
                        .entry("harness task failed".into())
                        .or_default() += 1
                }
            }
        }
        tally.peak_open = peak.load(std::sync::atomic::Ordering::Relaxed);
        tally.harness_lag = lag.await.unwrap_or_default();
        tally
    }

    /// One connection's life: connect, then request after request until the end; opened
    /// again after the server closed it or an answer missed its deadline.
    async fn connection(
        &self,
        start: Instant,
        open: &std::sync::atomic::AtomicUsize,
        peak: &std::sync::atomic::AtomicUsize,
    ) -> Tally {
        use std::sync::atomic::Ordering::Relaxed;
        let mut tally = Tally::default();
        let request = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\n\r\n",
            self.path, self.addr, self.key
        );
        while start.elapsed() < self.duration {
            let stream =
                match tokio::time::timeout(self.connect_timeout, TcpStream::connect(self.addr))
                    .await
                {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(e)) => {
                        *tally
                            .connect_errors
                            .entry(format!("connect: {:?}", e.kind()))
                            .or_default() += 1;
                        // Not a spin: the next attempt after a pause.
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                    Err(_) => {
                        *tally
                            .connect_errors
                            .entry("connect timeout".into())
                            .or_default() += 1;
                        continue;
                    }
                };
            tally.connected += 1;
            let now_open = open.fetch_add(1, Relaxed) + 1;
            peak.fetch_max(now_open, Relaxed);
            let _ = stream.set_nodelay(true);
            let mut stream = BufReader::new(stream);
            while start.elapsed() < self.duration {
                tally.requests += 1;
                let begun = Instant::now();
                let answer = tokio::time::timeout(self.deadline, async {
                    stream.get_mut().write_all(request.as_bytes()).await?;
                    read_response(&mut stream).await
                })
                .await;
                tally.slowest = tally.slowest.max(begun.elapsed());
                let (kind, keep) = match answer {
                    Ok(Ok(answer)) => (answer.label(), answer.keep_alive),
                    Ok(Err(e)) => (format!("transport: {}", io_kind(&e)), false),
                    Err(_) => ("client deadline".to_owned(), false),
                };
                *tally.outcomes.entry(kind).or_default() += 1;
                if !keep {
                    break;
                }
                tokio::time::sleep(self.think).await;
            }
            open.fetch_sub(1, Relaxed);
        }
        tally
    }
}

fn io_kind(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::UnexpectedEof => "closed before an answer".to_owned(),
        kind => format!("{kind:?}"),
    }
}

/// One HTTP/1.1 answer.
struct Answer {
    status: u16,
    /// The `code` of the standard error body, for non-2xx.
    code: Option<String>,
    keep_alive: bool,
}

impl Answer {
    fn label(&self) -> String {
        match (&self.code, self.status) {
            (_, 200..=299) => self.status.to_string(),
            (Some(code), status) => format!("{status} {code}"),
            (None, status) => format!("{status} non-standard body"),
        }
    }
}

/// Reads one answer: status line, headers, a `Content-Length` or chunked body.
async fn read_response(stream: &mut BufReader<TcpStream>) -> std::io::Result<Answer> {
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned());
    let mut line = String::new();
    if stream.read_line(&mut line).await? == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    let status: u16 = line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("no status line"))?;
    let mut length = None;
    let mut chunked = false;
    let mut keep_alive = true;
    loop {
        line.clear();
        if stream.read_line(&mut line).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        let Some((name, value)) = header.split_once(':') else {
            return Err(bad("a header without a colon"));
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            length = Some(value.parse::<usize>().map_err(|_| bad("content-length"))?);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.eq_ignore_ascii_case("chunked");
        } else if name.eq_ignore_ascii_case("connection") {
            keep_alive = !value.eq_ignore_ascii_case("close");
        }
    }
    let mut body = Vec::new();
    if chunked {
        loop {
            line.clear();
            stream.read_line(&mut line).await?;
            let size = usize::from_str_radix(line.trim_end(), 16).map_err(|_| bad("chunk size"))?;
            let mut chunk = vec![0; size + 2];
            stream.read_exact(&mut chunk).await?;
            if size == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..size]);
        }
    } else if let Some(length) = length {
        body.resize(length, 0);
        stream.read_exact(&mut body).await?;
    } else {
        return Err(bad("neither content-length nor chunked"));
    }
    let code = if (200..300).contains(&status) {
        None
    } else {
        let body = String::from_utf8_lossy(&body);
        super::json_field(&body, "error").and(super::json_field(&body, "code"))
    };
    Ok(Answer {
        status,
        code,
        keep_alive,
    })
}
