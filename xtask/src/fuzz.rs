//! `cargo xtask fuzz`, also the last step of `cargo xtask test`: schemathesis against the
//! real api binary.
//!
//! Schemathesis (pinned: [`SCHEMATHESIS_VERSION`]) is installed with pip into a virtualenv
//! under the target directory the first time. The api runs on a database of its own
//! (created, migrated, dropped afterwards), with one org and a seeded key, Redis as the
//! limiter and quotas high enough that 429s do not crowd out the cases. Every check runs
//! (but one, see `apps/api/fuzz/schemathesis.toml`), stateful phase included; the step
//! fails on any failure schemathesis reports: a server error, a schema-valid request
//! rejected, an undocumented status, a response that does not match its schema.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use xshell::{Shell, cmd};

use crate::services::Services;
use crate::test::FreshDatabase;

/// The schemathesis release the contract is checked with.
pub(crate) const SCHEMATHESIS_VERSION: &str = "4.32.5";

pub(crate) struct Fuzz;

impl Fuzz {
    /// `cargo xtask fuzz`: services, the binaries, then [`run_fuzz`].
    pub(crate) fn run(&self, sh: &Shell) -> Result<bool> {
        let services = Services::find_or_start()?;
        cmd!(sh, "cargo build --workspace --bins --quiet")
            .run()
            .context("building the binaries failed")?;
        run_fuzz(sh, &services)
    }
}

/// The target directory cargo builds into.
pub(crate) fn target_dir(sh: &Shell) -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => sh.current_dir().join(dir),
        None => sh.current_dir().join("target"),
    }
}

/// Runs schemathesis against a fresh api; true when it found nothing. The binaries must
/// be built (debug profile).
pub(crate) fn run_fuzz(sh: &Shell, services: &Services) -> Result<bool> {
    let target = target_dir(sh);
    let schemathesis = install_schemathesis(sh, &target)?;
    let bin = target.join("debug");
    let database =
        FreshDatabase::named(services, &format!("smartbeak_fuzz_{}", std::process::id()))?;
    let db_url = database.url.expose().to_owned();

    eprintln!("xtask: fuzz: migrating {}", database.name);
    let migrate = Command::new(bin.join("smartbeak-migrate"))
        .env("DATABASE_URL", &db_url)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .context("running smartbeak-migrate")?;
    if !migrate.success() {
        bail!("smartbeak-migrate failed on {}", database.name);
    }
    let org = admin(&bin, &db_url, &["orgs", "create", "--name", "fuzz"])?;
    let org_id = json_field(&org, "id").context("`orgs create` printed no id")?;
    let key = admin(&bin, &db_url, &["keys", "create", "--org", &org_id])?;
    let key = json_field(&key, "key").context("`keys create` printed no key")?;

    let work = target.join("fuzz");
    let export_dir = work.join("exports");
    std::fs::create_dir_all(&export_dir)
        .with_context(|| format!("creating {}", export_dir.display()))?;
    let port = smartbeak_test_support::free_port()?;
    let log_path = work.join("api.log");
    let log =
        File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
    let api = ApiGuard(
        Command::new(bin.join("smartbeak-api"))
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("DATABASE_URL", &db_url)
            .env("REDIS_URL", &services.redis_url)
            .env("API_BIND", format!("127.0.0.1:{port}"))
            .env("EXPORT_DIR", &export_dir)
            // One request per millisecond per key and per IP: the most the limiter takes,
            // far above what the fuzzer sends, so 429s stay rare (they are documented).
            .env("RATE_LIMIT_WINDOW_SECS", "1")
            .env("RATE_LIMIT_PER_KEY", "1000")
            .env("RATE_LIMIT_PER_IP", "1000")
            .env(
                "RATE_LIMIT_KEY_PREFIX",
                format!("smartbeak:fuzz:{}", std::process::id()),
            )
            // Bodies up to 8 MiB: the document bounds fields in characters, and 200,000
            // characters of `\u0000`-style escapes are over the default 1 MiB.
            .env("HTTP_BODY_LIMIT_BYTES", "8388608")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawning smartbeak-api")?,
    );
    wait_for_port(port, Duration::from_secs(30), &log_path)?;

    let fuzz_dir = sh.current_dir().join("apps/api/fuzz");
    let config = fuzz_dir.join("schemathesis.toml");
    let hooks = fuzz_dir.join("hooks.py");
    let url = format!("http://127.0.0.1:{port}/openapi.json");
    eprintln!("xtask: fuzz: schemathesis {SCHEMATHESIS_VERSION} against {url}");
    let started = Instant::now();
    // The key goes through the environment (the config reads `${SMARTBEAK_FUZZ_KEY}`),
    // never on a command line.
    let status = Command::new(&schemathesis)
        .current_dir(&work)
        .env("SMARTBEAK_FUZZ_KEY", &key)
        .env("SCHEMATHESIS_HOOKS", &hooks)
        .arg("--config-file")
        .arg(&config)
        .args(["run", &url])
        .status()
        .context("running schemathesis")?;
    eprintln!(
        "xtask: fuzz: schemathesis finished in {:.0} s ({status}); the api's log is {}",
        started.elapsed().as_secs_f64(),
        log_path.display()
    );
    drop(api);
    drop(database);
    Ok(status.success())
}

/// Runs an admin command of the api binary; its stdout.
fn admin(bin: &Path, db_url: &str, args: &[&str]) -> Result<String> {
    let output = Command::new(bin.join("smartbeak-api"))
        .args(args)
        .env("DATABASE_URL", db_url)
        .stderr(Stdio::null())
        .output()
        .with_context(|| format!("running smartbeak-api {}", args.join(" ")))?;
    if !output.status.success() {
        bail!("smartbeak-api {} failed", args.join(" "));
    }
    String::from_utf8(output.stdout).context("smartbeak-api printed something other than UTF-8")
}

/// The string value of `"name":"..."` in the one-line JSON the admin commands print (no
/// escapes occur in ids and keys).
fn json_field(json: &str, name: &str) -> Option<String> {
    let start = json.find(&format!("\"{name}\":\""))? + name.len() + 4;
    let len = json[start..].find('"')?;
    Some(json[start..start + len].to_owned())
}

fn wait_for_port(port: u16, bound: Duration, log: &Path) -> Result<()> {
    let deadline = Instant::now() + bound;
    while !smartbeak_test_support::port_answers("127.0.0.1", port) {
        if Instant::now() >= deadline {
            bail!(
                "smartbeak-api did not listen on port {port} within {bound:?}; see {}",
                log.display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Kills the api when dropped, on failure too.
struct ApiGuard(Child);

impl Drop for ApiGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The `schemathesis` executable of the virtualenv under `target`, installed if missing.
fn install_schemathesis(sh: &Shell, target: &Path) -> Result<PathBuf> {
    let venv = target.join(format!("schemathesis-{SCHEMATHESIS_VERSION}"));
    let exe = venv.join("bin").join("schemathesis");
    // Written after pip succeeded: an interrupted install is redone, not used.
    let marker = venv.join(".installed");
    if exe.is_file() && marker.is_file() {
        return Ok(exe);
    }
    let python = "python3";
    if cmd!(sh, "{python} --version")
        .quiet()
        .ignore_stdout()
        .ignore_stderr()
        .run()
        .is_err()
    {
        bail!(
            "the schema fuzzing step needs Python 3 with venv and pip: install `python3` and \
             `python3-venv` (Debian/Ubuntu: apt-get install python3 python3-venv)"
        );
    }
    eprintln!(
        "xtask: fuzz: installing schemathesis {SCHEMATHESIS_VERSION} into {}",
        venv.display()
    );
    let _ = std::fs::remove_dir_all(&venv);
    if cmd!(sh, "{python} -m venv {venv}").quiet().run().is_err() {
        bail!(
            "`python3 -m venv` failed: install `python3-venv` (Debian/Ubuntu: apt-get install \
             python3-venv)"
        );
    }
    let pip = venv.join("bin").join("pip");
    let spec = format!("schemathesis=={SCHEMATHESIS_VERSION}");
    cmd!(
        sh,
        "{pip} install --quiet --disable-pip-version-check {spec}"
    )
    .run()
    .with_context(|| format!("pip install {spec} failed"))?;
    if !exe.is_file() {
        bail!(
            "pip installed schemathesis but {} is missing",
            exe.display()
        );
    }
    std::fs::write(&marker, &spec).with_context(|| format!("writing {}", marker.display()))?;
    Ok(exe)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_of_the_admin_output() {
        let line = r#"{"id":"2b8a","org_id":"o1","prefix":"sbk_12","key":"sbk_ff"}"#;
        assert_eq!(json_field(line, "id").as_deref(), Some("2b8a"));
        assert_eq!(json_field(line, "key").as_deref(), Some("sbk_ff"));
        assert_eq!(json_field(line, "missing"), None);
    }
}
