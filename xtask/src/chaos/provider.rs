//! The keyword providers of the chaos system: one local HTTP/1.1 server standing in for
//! both (`/gsc/...` and `/ahrefs/...`), speaking the keyword-sync API
//! (`GET {base}/v1/keywords?site=` answering `{"keywords": [...]}`), each provider with a
//! [`Mode`] switchable while the control-planes talk to it: ok, held (a gate), failing
//! (503), stalling mid-body; a request without that provider's key gets 401. A real server on a real socket (thread per connection, keep-alive),
//! so the control-plane's HTTP client, retries, timeouts and breakers run as in production.

use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// The two providers, by their adapter names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Adapter {
    Gsc,
    Ahrefs,
}

impl Adapter {
    pub(crate) const ALL: [Self; 2] = [Self::Gsc, Self::Ahrefs];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Gsc => "gsc",
            Self::Ahrefs => "ahrefs",
        }
    }

    /// The API key the control-planes are given for it (`CP_GSC_API_KEY`,
    /// `CP_AHREFS_API_KEY`); a request without `Authorization: Bearer <it>` gets 401.
    pub(crate) fn api_key(self) -> String {
        format!("chaos-{}-key", self.as_str())
    }

    fn index(self) -> usize {
        match self {
            Self::Gsc => 0,
            Self::Ahrefs => 1,
        }
    }
}

/// How a provider answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// 200 with two keyword rows for the site, at once.
    Ok,
    /// 503 with a small body.
    Failing,
    /// The 200 head and half the body, then nothing (the connection kept open) until the
    /// mode changes or the server stops: a provider that stalls mid-body.
    StallBody,
    /// A gate: each request is held, unanswered, until the mode changes (then answered as
    /// the new mode says), so the harness catches a run mid-way whatever the CPU load:
    /// it waits until [`Provider::held`] shows the requests in flight, acts, then opens.
    Held,
}

/// What one provider answered so far.
#[derive(Debug, Default)]
struct Counts {
    ok: AtomicU64,
    failed: AtomicU64,
    stalled: AtomicU64,
    refused: AtomicU64,
    /// Requests held by [`Mode::Held`] right now.
    held: AtomicU64,
}

/// Requests a provider got, by what it answered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Served {
    pub(crate) ok: u64,
    pub(crate) failed: u64,
    pub(crate) stalled: u64,
    /// 401: the request did not carry this provider's key.
    pub(crate) refused: u64,
}

impl Served {
    pub(crate) fn total(self) -> u64 {
        self.ok + self.failed + self.stalled + self.refused
    }

    /// What was served since `before`.
    pub(crate) fn since(self, before: Self) -> Self {
        Self {
            ok: self.ok - before.ok,
            failed: self.failed - before.failed,
            stalled: self.stalled - before.stalled,
            refused: self.refused - before.refused,
        }
    }
}

#[derive(Debug)]
struct Shared {
    modes: Mutex<[Mode; 2]>,
    counts: [Counts; 2],
    stop: AtomicBool,
}

impl Shared {
    fn mode(&self, adapter: Adapter) -> Mode {
        self.modes.lock().unwrap_or_else(PoisonError::into_inner)[adapter.index()]
    }
}

/// The server; stops on drop (its threads see the flag within 20 ms).
#[derive(Debug)]
pub(crate) struct Provider {
    port: u16,
    shared: Arc<Shared>,
}

impl Provider {
    /// Listens on a free port of 127.0.0.1, both providers [`Mode::Ok`].
    pub(crate) fn start() -> Result<Self> {
        let listener =
            TcpListener::bind("127.0.0.1:0").context("the fake keyword provider cannot listen")?;
        let port = listener.local_addr()?.port();
        listener.set_nonblocking(true)?;
        let shared = Arc::new(Shared {
            modes: Mutex::new([Mode::Ok; 2]),
            counts: [Counts::default(), Counts::default()],
            stop: AtomicBool::new(false),
        });
        let accepting = shared.clone();
        thread::spawn(move || accept(&listener, &accepting));
        Ok(Self { port, shared })
    }

    /// The base URL of `adapter` (`CP_GSC_BASE_URL`, `CP_AHREFS_BASE_URL`).
    pub(crate) fn base_url(&self, adapter: Adapter) -> String {
        format!("http://127.0.0.1:{}/{}/", self.port, adapter.as_str())
    }

    /// Switches `adapter` to `mode`, for requests in progress (a stall ends) and new ones.
    pub(crate) fn set(&self, adapter: Adapter, mode: Mode) {
        self.shared
            .modes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)[adapter.index()] = mode;
    }

    /// Both providers to `mode`.
    pub(crate) fn set_all(&self, mode: Mode) {
        for adapter in Adapter::ALL {
            self.set(adapter, mode);
        }
    }

    /// The requests both providers hold right now ([`Mode::Held`]).
    pub(crate) fn held(&self) -> u64 {
        self.shared
            .counts
            .iter()
            .map(|c| c.held.load(Ordering::SeqCst))
            .sum()
    }

    /// What `adapter` answered so far.
    pub(crate) fn served(&self, adapter: Adapter) -> Served {
        let c = &self.shared.counts[adapter.index()];
        Served {
            ok: c.ok.load(Ordering::SeqCst),
            failed: c.failed.load(Ordering::SeqCst),
            stalled: c.stalled.load(Ordering::SeqCst),
            refused: c.refused.load(Ordering::SeqCst),
        }
    }
}

impl Drop for Provider {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
    }
}

fn accept(listener: &TcpListener, shared: &Arc<Shared>) {
    while !shared.stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _)) => {
                let shared = shared.clone();
                thread::spawn(move || {
                    let _ = serve(stream, &shared);
                });
            }
            Err(_) => thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Answers the requests of one keep-alive connection until the client closes it.
fn serve(stream: TcpStream, shared: &Shared) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_millis(200)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = stream;
    loop {
        // The request line; a read timeout only checks the stop flag.
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                if shared.stop.load(Ordering::SeqCst) {
                    return Ok(());
                }
                continue;
            }
            Err(e) => return Err(e),
        }
        // The rest of the head (a GET has no body), keeping the credential.
        let mut authorization = None;
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header)? == 0 || header == "\r\n" || header == "\n" {
                break;
            }
            if let Some((name, value)) = header.split_once(':')
                && name.trim().eq_ignore_ascii_case("authorization")
            {
                authorization = Some(value.trim().to_owned());
            }
        }
        let target = line.split(' ').nth(1).unwrap_or("/");
        let adapter = Adapter::ALL
            .into_iter()
            .find(|a| target.starts_with(&format!("/{}/v1/keywords", a.as_str())));
        let Some(adapter) = adapter else {
            respond(&mut writer, "404 Not Found", r#"{"error":"no such path"}"#)?;
            continue;
        };
        let site = target
            .split_once("site=")
            .map_or("", |(_, s)| s.split('&').next().unwrap_or(""));
        let counts = &shared.counts[adapter.index()];
        if authorization.as_deref() != Some(format!("Bearer {}", adapter.api_key()).as_str()) {
            counts.refused.fetch_add(1, Ordering::SeqCst);
            respond(
                &mut writer,
                "401 Unauthorized",
                r#"{"error":"bad api key"}"#,
            )?;
            continue;
        }
        let mut mode = shared.mode(adapter);
        if mode == Mode::Held {
            counts.held.fetch_add(1, Ordering::SeqCst);
            let since = Instant::now();
            while mode == Mode::Held
                && !shared.stop.load(Ordering::SeqCst)
                && since.elapsed() < Duration::from_secs(60)
            {
                thread::sleep(Duration::from_millis(5));
                mode = shared.mode(adapter);
            }
            counts.held.fetch_sub(1, Ordering::SeqCst);
        }
        match mode {
            // Still held after 60 s or at the stop: answered as ok.
            Mode::Ok | Mode::Held => {
                counts.ok.fetch_add(1, Ordering::SeqCst);
                respond(&mut writer, "200 OK", &keywords(site))?;
            }
            Mode::Failing => {
                counts.failed.fetch_add(1, Ordering::SeqCst);
                respond(
                    &mut writer,
                    "503 Service Unavailable",
                    r#"{"error":"provider outage"}"#,
                )?;
            }
            Mode::StallBody => {
                counts.stalled.fetch_add(1, Ordering::SeqCst);
                let body = keywords(site);
                let half = body.len() / 2;
                write!(
                    writer,
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{}",
                    body.len(),
                    &body[..half]
                )?;
                writer.flush()?;
                let since = Instant::now();
                while shared.mode(adapter) == Mode::StallBody
                    && !shared.stop.load(Ordering::SeqCst)
                    && since.elapsed() < Duration::from_secs(60)
                {
                    thread::sleep(Duration::from_millis(20));
                }
                // The rest of that body is never sent: the connection is closed.
                let _ = writer.shutdown(Shutdown::Both);
                return Ok(());
            }
        }
    }
}

fn respond(writer: &mut TcpStream, status: &str, body: &str) -> std::io::Result<()> {
    write!(
        writer,
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    writer.flush()
}

/// Two keyword rows of 2026-01-01 for `site` (the keys are stable, so a re-run upserts).
fn keywords(site: &str) -> String {
    let site: String = site
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '.' || *c == '-')
        .collect();
    format!(
        r#"{{"keywords":[{{"keyword":"{site} a","date":"2026-01-01","search_volume":10,"position":1.5,"clicks":3,"impressions":30,"ctr":0.1}},{{"keyword":"{site} b","date":"2026-01-01","search_volume":20,"position":2.5,"clicks":1,"impressions":40,"ctr":0.025}}]}}"#
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::io::Read;

    use super::*;

    /// One request on a fresh connection; what came back before the server closed it or
    /// went quiet for 300 ms.
    fn get(port: u16, path: &str) -> String {
        let key = Adapter::ALL
            .into_iter()
            .find(|a| path.starts_with(&format!("/{}/", a.as_str())))
            .map(Adapter::api_key);
        get_with(port, path, key.as_deref())
    }

    /// [`get`] with `Authorization: Bearer <key>` (none without a key).
    fn get_with(port: u16, path: &str, key: Option<&str>) -> String {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let key = key.map_or_else(String::new, |k| format!("Authorization: Bearer {k}\r\n"));
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: x\r\n{key}Connection: close\r\n\r\n"
        )
        .unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            match stream.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    got.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&got);
                    if text.contains("\r\n\r\n") && text.ends_with('}') {
                        break;
                    }
                }
                Err(_) => break,
            }
        }
        String::from_utf8_lossy(&got).into_owned()
    }

    #[test]
    fn each_provider_answers_in_its_own_mode_and_counts() {
        let provider = Provider::start().unwrap();
        let port = provider.port;
        assert_eq!(
            provider.base_url(Adapter::Gsc),
            format!("http://127.0.0.1:{port}/gsc/")
        );
        let ok = get(port, "/gsc/v1/keywords?site=a.example");
        assert!(ok.starts_with("HTTP/1.1 200 OK"), "{ok}");
        assert!(ok.contains(r#""keyword":"a.example a""#), "{ok}");

        provider.set(Adapter::Gsc, Mode::Failing);
        let failed = get(port, "/gsc/v1/keywords?site=a.example");
        assert!(failed.starts_with("HTTP/1.1 503"), "{failed}");
        let other = get(port, "/ahrefs/v1/keywords?site=b.example");
        assert!(other.starts_with("HTTP/1.1 200 OK"), "{other}");

        provider.set(Adapter::Gsc, Mode::StallBody);
        let stalled = get(port, "/gsc/v1/keywords?site=a.example");
        assert!(stalled.starts_with("HTTP/1.1 200 OK"), "{stalled}");
        let (head, body) = stalled.split_once("\r\n\r\n").unwrap();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .unwrap()
            .parse()
            .unwrap();
        assert!(!body.is_empty() && body.len() < length, "{stalled}");

        assert!(get(port, "/other").starts_with("HTTP/1.1 404"));
        assert_eq!(
            provider.served(Adapter::Gsc),
            Served {
                ok: 1,
                failed: 1,
                stalled: 1,
                refused: 0
            }
        );
        assert_eq!(provider.served(Adapter::Ahrefs).total(), 1);

        // Another provider's key, or none, is refused.
        let ahrefs_key = Adapter::Ahrefs.api_key();
        let wrong = get_with(port, "/gsc/v1/keywords?site=a", Some(&ahrefs_key));
        assert!(wrong.starts_with("HTTP/1.1 401"), "{wrong}");
        let none = get_with(port, "/gsc/v1/keywords?site=a", None);
        assert!(none.starts_with("HTTP/1.1 401"), "{none}");
        assert_eq!(provider.served(Adapter::Gsc).refused, 2);
    }

    #[test]
    fn a_held_request_is_answered_once_the_gate_opens() {
        let provider = Provider::start().unwrap();
        let port = provider.port;
        provider.set_all(Mode::Held);
        let request = thread::spawn(move || get(port, "/ahrefs/v1/keywords?site=h.example"));
        let deadline = Instant::now() + Duration::from_secs(5);
        while provider.held() < 1 {
            assert!(Instant::now() < deadline, "the request was never held");
            thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(
            provider.served(Adapter::Ahrefs).total(),
            0,
            "held, not answered"
        );
        provider.set_all(Mode::Ok);
        let answer = request.join().unwrap();
        assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
        assert_eq!(provider.held(), 0);
        assert_eq!(provider.served(Adapter::Ahrefs).ok, 1);
    }
}
