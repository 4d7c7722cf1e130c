//! Black-box tests of the `smartbeak-api` binary: each test starts the real binary on port 0
//! against a fresh database (and, where it matters, a Redis it owns) and talks HTTP to it.
//!
//! Finding the binary: `SMARTBEAK_API_BIN` if set, else [`crate::support::binary`] builds it.

mod analytics;
mod exports;
mod ratelimit;
mod readiness;
mod shutdown;
mod tenancy;
mod validation;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::Value;
use smartbeak_database::testing::TestDatabase;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// Path of the api binary: `SMARTBEAK_API_BIN`, else built if needed (once per process).
pub(crate) fn api_bin() -> Result<PathBuf> {
    match std::env::var_os("SMARTBEAK_API_BIN") {
        Some(bin) => Ok(PathBuf::from(bin)),
        None => crate::support::binary("smartbeak-api", "smartbeak-api"),
    }
}

/// A running api process; killed on drop.
pub(crate) struct Api {
    child: Child,
    pub(crate) addr: SocketAddr,
    pub(crate) base: String,
    pub(crate) http: reqwest::Client,
    output: Arc<Mutex<Vec<String>>>,
    /// The tasks copying stdout and stderr into `output`; each ends at its pipe's EOF.
    readers: Vec<tokio::task::JoinHandle<()>>,
}

impl Api {
    /// Starts the binary with `DATABASE_URL` and `env` (nothing else of this process's
    /// environment but `PATH`, so a `REDIS_URL` of the CI run does not leak in).
    pub(crate) async fn start(database_url: &str, env: &[(&str, String)]) -> Result<Self> {
        let mut cmd = Command::new(api_bin()?);
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("DATABASE_URL", database_url)
            .env("API_BIND", "127.0.0.1:0")
            .env("RUST_LOG", "info")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn().context("spawning smartbeak-api")?;
        let output = Arc::new(Mutex::new(Vec::new()));
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut readers = Vec::new();
        for stream in [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
        ]
        .into_iter()
        .flatten()
        {
            let output = output.clone();
            let tx = tx.clone();
            readers.push(tokio::spawn(async move {
                let mut lines = BufReader::new(stream).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if let Some(at) = line.find("listening on http://") {
                        let rest = &line[at + "listening on http://".len()..];
                        let addr: String = rest
                            .chars()
                            .take_while(|c| *c != '"' && !c.is_whitespace())
                            .collect();
                        let _ = tx.send(addr);
                    }
                    output.lock().unwrap().push(line);
                }
            }));
        }
        drop(tx);
        let addr = match tokio::time::timeout(Duration::from_secs(30), rx.recv()).await {
            Ok(Some(addr)) => addr.parse().context("parsing the listen address")?,
            _ => bail!(
                "smartbeak-api did not start listening; output:\n{}",
                output.lock().unwrap().join("\n")
            ),
        };
        Ok(Self {
            child,
            base: format!("http://{addr}"),
            addr,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()?,
            output,
            readers,
        })
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }

    /// Everything the process printed so far.
    pub(crate) fn output(&self) -> String {
        self.output.lock().unwrap().join("\n")
    }

    /// Waits for the process to exit and for its stdout and stderr to reach EOF (so
    /// [`Api::output`] then holds everything it printed), at most `bound` in all.
    pub(crate) async fn wait(&mut self, bound: Duration) -> Result<std::process::ExitStatus> {
        let deadline = tokio::time::Instant::now() + bound;
        let status = tokio::time::timeout_at(deadline, self.child.wait())
            .await
            .context("smartbeak-api did not exit in time")?
            .context("waiting for smartbeak-api")?;
        // The exit status can arrive before the reader tasks have read the last lines
        // still in the pipes: wait for their EOF.
        for reader in self.readers.drain(..) {
            tokio::time::timeout_at(deadline, reader)
                .await
                .context("smartbeak-api's output did not reach EOF in time")?
                .context("reading smartbeak-api's output")?;
        }
        Ok(status)
    }

    /// Value of an unlabelled metric (or the sum over its label sets) from `/metrics`.
    pub(crate) async fn metric(&self, name: &str) -> Result<f64> {
        self.scrape(name, None).await
    }

    /// Value of a metric series whose labels contain `label` (e.g. `decision="failed_open"`).
    pub(crate) async fn metric_with(&self, name: &str, label: &str) -> Result<f64> {
        self.scrape(name, Some(label)).await
    }

    async fn scrape(&self, name: &str, label: Option<&str>) -> Result<f64> {
        let text = self
            .http
            .get(self.url("/metrics"))
            .send()
            .await?
            .text()
            .await?;
        Ok(metric_value(&text, name, label))
    }
}

/// Sums the samples of `name` (filtered by a label substring) in Prometheus text.
pub(crate) fn metric_value(text: &str, name: &str, label: Option<&str>) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter(|l| label.is_none_or(|label| l.contains(label)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Runs a CLI subcommand of the binary and parses its JSON output.
pub(crate) async fn cli(database_url: &str, args: &[&str]) -> Result<Value> {
    let output = Command::new(api_bin()?)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("DATABASE_URL", database_url)
        .args(args)
        .output()
        .await
        .context("running smartbeak-api")?;
    if !output.status.success() {
        bail!(
            "smartbeak-api {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    serde_json::from_slice(&output.stdout).context("parsing CLI output")
}

/// An org with one API key, made through the CLI.
pub(crate) struct Tenant {
    #[allow(dead_code)]
    pub(crate) org_id: String,
    pub(crate) key_id: String,
    pub(crate) key: String,
}

impl Tenant {
    pub(crate) async fn create(database_url: &str, name: &str) -> Result<Self> {
        let org = cli(database_url, &["orgs", "create", "--name", name]).await?;
        let org_id = org["id"].as_str().context("org id")?.to_owned();
        let key = cli(database_url, &["keys", "create", "--org", &org_id]).await?;
        Ok(Self {
            org_id,
            key_id: key["id"].as_str().context("key id")?.to_owned(),
            key: key["key"].as_str().context("key")?.to_owned(),
        })
    }

    pub(crate) fn bearer(&self) -> String {
        format!("Bearer {}", self.key)
    }
}

/// The shared Redis: `REDIS_URL` (what `cargo xtask test` exports, possibly a throwaway
/// server on another port), else `redis://127.0.0.1:6379`. Tests use a key prefix of their
/// own on it, or a `RedisServer` of their own where they stop or restart it.
pub(crate) fn shared_redis_url() -> String {
    std::env::var("REDIS_URL")
        .ok()
        .filter(|url| !url.trim().is_empty())
        .unwrap_or_else(|| "redis://127.0.0.1:6379".to_owned())
}

/// A fresh database and its URL.
pub(crate) async fn database() -> Result<(TestDatabase, String)> {
    let db = TestDatabase::create().await?;
    let url = db.url().expose().to_owned();
    Ok((db, url))
}

/// Creates a domain through the api and returns its id.
pub(crate) async fn create_domain(api: &Api, tenant: &Tenant, name: &str) -> Result<String> {
    let response = api
        .http
        .post(api.url("/v1/domains"))
        .header("authorization", tenant.bearer())
        .json(&serde_json::json!({ "name": name }))
        .send()
        .await?;
    let status = response.status();
    let body: Value = response.json().await?;
    if status != 201 {
        bail!("creating domain {name}: {status} {body}");
    }
    Ok(body["id"].as_str().context("domain id")?.to_owned())
}
