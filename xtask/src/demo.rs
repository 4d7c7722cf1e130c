//! `cargo xtask demo`: the main job end to end on a small realistic data set.
//!
//! 1. services (found or started) and a fresh `smartbeak_demo_<pid>` database, migrated
//!    (dropped at the end);
//! 2. the database demo: seed orgs, domains, content and 30 days of metrics, read the
//!    aggregates back, show the session settings the server sees and the pool's figures;
//! 3. the api: create a key for the seeded org with the admin CLI, start `smartbeak-api` on a
//!    free port, make real calls with the demo client, then stop it with SIGTERM and show
//!    the exit code from its shutdown report;
//! 4. the export job: enqueue a JSON export through the api, start a
//!    `smartbeak-domain-export worker`, wait (bounded) for the job to succeed, download it
//!    through the api and verify its SHA-256, print its path, checksum and first lines, then
//!    stop the worker with SIGTERM and show its exit code;
//! 5. the control-plane: one `batch` of each operation on the seeded data
//!    ([`control_plane`], with a fake keyword provider inside xtask).

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use xshell::{Shell, cmd};

use crate::services::Services;
use crate::test::FreshDatabase;

mod control_plane;

pub(crate) struct Demo;

impl Demo {
    pub(crate) fn run(&self, sh: &Shell) -> Result<()> {
        eprintln!("xtask: building the demo");
        cmd!(
            sh,
            "cargo build --quiet -p smartbeak-database --bin smartbeak-migrate --example demo"
        )
        .run()
        .context("build failed")?;
        cmd!(
            sh,
            "cargo build --quiet -p smartbeak-api --bin smartbeak-api --bin smartbeak-domain-export --example demo_client"
        )
        .run()
        .context("build failed")?;

        let services = Services::find_or_start()?;
        let database =
            FreshDatabase::named(&services, &format!("smartbeak_demo_{}", std::process::id()))?;
        let _env = [
            sh.push_env("DATABASE_URL", database.url.expose()),
            sh.push_env("REDIS_URL", &services.redis_url),
        ];
        let bin = target_dir(sh).join("debug");

        section("migrations");
        let migrate = bin.join("smartbeak-migrate");
        cmd!(sh, "{migrate}").run().context("migrations failed")?;

        section("database: seed and read back");
        let demo = bin.join("examples").join("demo");
        let output = cmd!(sh, "{demo}")
            .read()
            .context("the database demo failed")?;
        println!("{output}");
        let org = output
            .lines()
            .find_map(|l| l.strip_prefix("demo org id: "))
            .context("the database demo did not print the org id")?
            .trim()
            .to_owned();

        section("api: a key for the seeded org");
        let api = bin.join("smartbeak-api");
        let created = cmd!(sh, "{api} keys create --org {org} --name demo")
            .read()
            .context("creating an api key failed")?;
        let key = json_string(&created, "key").context("`keys create` printed no key")?;
        let prefix = json_string(&created, "prefix").unwrap_or_default();
        println!("created key {prefix}… for org {org} (stored as SHA-256 only)");

        section("api: serve and call");
        let export_dir = target_dir(sh).join(format!("demo-exports-{}", std::process::id()));
        std::fs::create_dir_all(&export_dir).context("creating the demo's export directory")?;
        let mut server = ApiProcess::start(
            &api,
            database.url.expose(),
            &services.redis_url,
            &export_dir,
        )?;
        println!("smartbeak-api listening on {}", server.base);
        let client = bin.join("examples").join("demo_client");
        let base = server.base.clone();
        // The key goes through the environment: a command line shows in `ps` and in errors.
        let calls = cmd!(sh, "{client} {base}")
            .env("SMARTBEAK_API_KEY", &key)
            .run();

        let exported = if calls.is_ok() {
            export_demo(
                sh,
                &bin,
                &client,
                &base,
                &key,
                database.url.expose(),
                &export_dir,
            )
        } else {
            Ok(())
        };
        std::fs::remove_dir_all(&export_dir).ok();

        section("api: SIGTERM");
        let code = server.terminate()?;
        for line in server.lines.try_iter() {
            if line.contains("shutdown handler finished") || line.contains("shutdown complete") {
                println!("{line}");
            }
        }
        println!("smartbeak-api exited with code {code}");
        calls.context("the demo client failed")?;
        exported.context("the export demo failed")?;
        if code != 0 {
            bail!("smartbeak-api exited with {code} after SIGTERM");
        }
        control_plane::run(sh, &bin, &database.url)?;
        section("demo finished");
        Ok(())
    }
}

/// The export job end to end: enqueue through the api, a worker process completes it, the
/// download through the api is verified; the worker is stopped with SIGTERM.
fn export_demo(
    sh: &Shell,
    bin: &std::path::Path,
    client: &std::path::Path,
    base: &str,
    key: &str,
    database_url: &str,
    export_dir: &std::path::Path,
) -> Result<()> {
    section("export: enqueue through the api");
    let queued = cmd!(sh, "{client} {base} export-enqueue")
        .env("SMARTBEAK_API_KEY", key)
        .read()
        .context("enqueueing an export failed")?;
    println!("{queued}");
    let id = queued
        .lines()
        .find_map(|l| l.strip_prefix("export id: "))
        .context("the demo client printed no export id")?
        .trim()
        .to_owned();

    section("export: a worker process");
    let mut worker = WorkerProcess::start(
        &bin.join("smartbeak-domain-export"),
        database_url,
        export_dir,
    )?;
    println!(
        "smartbeak-domain-export worker up; admin on http://{}",
        worker.admin
    );

    section("export: wait, download through the api, verify");
    let fetched = cmd!(sh, "{client} {base} export-fetch {id}")
        .env("SMARTBEAK_API_KEY", key)
        .run();
    let files: Vec<String> = std::fs::read_dir(export_dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.path().display().to_string())
                .collect()
        })
        .unwrap_or_default();
    for file in &files {
        println!("  on disk: {file}");
    }

    section("export: SIGTERM the worker");
    let code = worker.terminate()?;
    for line in worker.lines.try_iter() {
        if line.contains("export succeeded")
            || line.contains("shutdown handler finished")
            || line.contains("shutdown complete")
        {
            println!("{line}");
        }
    }
    println!("smartbeak-domain-export exited with code {code}");
    fetched.context("the export did not complete and verify")?;
    if code != 0 {
        bail!("smartbeak-domain-export exited with {code} after SIGTERM");
    }
    Ok(())
}

/// The export worker as a child process whose log lines are read on a thread.
struct WorkerProcess {
    child: Child,
    admin: String,
    lines: mpsc::Receiver<String>,
}

impl WorkerProcess {
    fn start(
        bin: &std::path::Path,
        database_url: &str,
        export_dir: &std::path::Path,
    ) -> Result<Self> {
        let mut child = Command::new(bin)
            .arg("worker")
            .env("DATABASE_URL", database_url)
            .env("EXPORT_DIR", export_dir)
            .env("EXPORT_ADMIN_ADDR", "127.0.0.1:0")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("cannot start smartbeak-domain-export worker")?;
        let stdout = child.stdout.take().context("no stdout")?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut worker = Self {
            child,
            admin: String::new(),
            lines,
        };
        loop {
            match worker.lines.recv_timeout(Duration::from_secs(60)) {
                Ok(line) => {
                    if let Some(rest) = line.split("admin listening on http://").nth(1) {
                        worker.admin = rest.split_whitespace().next().unwrap_or("").to_owned();
                        return Ok(worker);
                    }
                }
                Err(_) => {
                    let _ = worker.child.kill();
                    bail!("smartbeak-domain-export worker did not start within 60 s");
                }
            }
        }
    }

    /// Sends SIGTERM and waits for the exit code.
    fn terminate(&mut self) -> Result<i32> {
        terminate(&mut self.child, "smartbeak-domain-export")
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// How long a demo process gets to exit after SIGTERM: its shutdown deadline
/// (`SHUTDOWN_TIMEOUT_MS`, 25 s by default) and a margin.
const TERMINATE_DEADLINE: Duration = Duration::from_secs(30);

/// Sends SIGTERM to `child` and waits up to [`TERMINATE_DEADLINE`] for its exit code; a
/// child still running then is killed (SIGKILL) and the demo fails saying so.
fn terminate(child: &mut Child, name: &str) -> Result<i32> {
    terminate_within(child, name, TERMINATE_DEADLINE)
}

fn terminate_within(child: &mut Child, name: &str, deadline: Duration) -> Result<i32> {
    smartbeak_test_support::signal(child.id(), "TERM").map_err(anyhow::Error::msg)?;
    let started = std::time::Instant::now();
    loop {
        if let Some(status) = child
            .try_wait()
            .with_context(|| format!("waiting for {name}"))?
        {
            return Ok(status.code().unwrap_or(-1));
        }
        if started.elapsed() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let killed = child.kill();
    let _ = child.wait();
    bail!(
        "{name} (pid {}) did not exit within {deadline:?} of SIGTERM; it was killed with SIGKILL{}",
        child.id(),
        killed
            .err()
            .map(|e| format!(" (kill: {e})"))
            .unwrap_or_default()
    )
}

fn section(title: &str) {
    println!("\n=== {title} ===");
}

fn target_dir(sh: &Shell) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| sh.current_dir().join("target"))
}

/// The string value of `"field":"..."` in a one-line JSON object.
fn json_string(json: &str, field: &str) -> Option<String> {
    let start = json.find(&format!("\"{field}\":\""))? + field.len() + 4;
    let len = json[start..].find('"')?;
    Some(json[start..start + len].to_owned())
}

/// The api as a child process whose log lines are read on a thread.
struct ApiProcess {
    child: Child,
    base: String,
    lines: mpsc::Receiver<String>,
}

impl ApiProcess {
    fn start(
        bin: &PathBuf,
        database_url: &str,
        redis_url: &str,
        export_dir: &std::path::Path,
    ) -> Result<Self> {
        let mut child = Command::new(bin)
            .env("DATABASE_URL", database_url)
            .env("REDIS_URL", redis_url)
            .env("EXPORT_DIR", export_dir)
            .env("API_BIND", "127.0.0.1:0")
            .env(
                "RATE_LIMIT_KEY_PREFIX",
                format!("smartbeak-demo-{}", std::process::id()),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("cannot start smartbeak-api")?;
        let stdout = child.stdout.take().context("no stdout")?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut server = Self {
            child,
            base: String::new(),
            lines,
        };
        loop {
            match server.lines.recv_timeout(Duration::from_secs(60)) {
                Ok(line) => {
                    if let Some(rest) = line.split("listening on ").nth(1) {
                        server.base = rest.split_whitespace().next().unwrap_or("").to_owned();
                        return Ok(server);
                    }
                }
                Err(_) => {
                    let _ = server.child.kill();
                    bail!("smartbeak-api did not start listening within 60 s");
                }
            }
        }
    }

    /// Sends SIGTERM and waits for the exit code.
    fn terminate(&mut self) -> Result<i32> {
        terminate(&mut self.child, "smartbeak-api")
    }
}

impl Drop for ApiProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    #[allow(clippy::unwrap_used)]
    fn terminate_kills_a_child_that_ignores_sigterm() {
        // A process that ignores SIGTERM (an ignored signal stays ignored across exec) and
        // says when it is ready to be signalled.
        let mut child = std::process::Command::new("sh")
            .args(["-c", "trap '' TERM; echo ready; exec sleep 60"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        let err = super::terminate_within(
            &mut child,
            "stubborn",
            std::time::Duration::from_millis(200),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("did not exit within 200ms of SIGTERM; it was killed with SIGKILL"),
            "{err}"
        );
        assert!(child.try_wait().unwrap().is_some(), "the child is gone");
    }

    use super::*;

    #[test]
    fn reads_a_string_field() {
        let json = r#"{"id":"1","key":"sbk_abc","prefix":"sbk_a"}"#;
        assert_eq!(json_string(json, "key").as_deref(), Some("sbk_abc"));
        assert_eq!(json_string(json, "nope"), None);
    }
}
