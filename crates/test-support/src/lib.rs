//! Throwaway PostgreSQL and Redis servers for `cargo xtask` and the tests.
//!
//! Each server is a guard: it owns a temporary directory and a free port on 127.0.0.1,
//! polls until the server answers, and kills the process and removes the directory on
//! `Drop`. PostgreSQL is started the way pgtemp does it (`initdb -N`, `fsync=off`), and
//! because it refuses to run as root, as an unprivileged user (`postgres` if it exists,
//! else a `smartbeak-pg` system user created on first use) through `setpriv`. Redis runs
//! with `--save ""` and no AOF: nothing reaches the disk.
//!
//! The binaries are found under `/usr/lib/postgresql/*/bin` (newest first) or on `PATH`;
//! `SMARTBEAK_PG_BIN` (a directory) and `SMARTBEAK_REDIS_SERVER` (a file) override that.
//!
//! This crate is synchronous and std-only on purpose: xtask uses it without a runtime.

#![warn(missing_docs)]

use std::fs;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

/// What went wrong starting a server.
#[derive(Debug)]
pub struct Error(String);

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

/// The result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

fn err(message: impl Into<String>) -> Error {
    Error(message.into())
}

/// How long a server may take to answer after start.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// The Debian packages that carry the binaries, for error messages.
pub const INSTALL_HINT: &str =
    "install them with: apt-get install postgresql redis-server (Debian/Ubuntu)";

/// A free TCP port on 127.0.0.1 (the OS picks it; the listener is closed again).
pub fn free_port() -> Result<u16> {
    let listener =
        TcpListener::bind("127.0.0.1:0").map_err(|e| err(format!("no free port: {e}")))?;
    let port = listener
        .local_addr()
        .map_err(|e| err(format!("no free port: {e}")))?
        .port();
    Ok(port)
}

/// True if something accepts TCP connections at `host:port` within 500 ms.
pub fn port_answers(host: &str, port: u16) -> bool {
    use std::net::ToSocketAddrs;
    let Ok(addrs) = (host, port).to_socket_addrs() else {
        return false;
    };
    addrs
        .into_iter()
        .any(|a| TcpStream::connect_timeout(&a, Duration::from_millis(500)).is_ok())
}

/// The folder that holds the servers' temporary directories: `$SMARTBEAK_SERVICES_DIR`, else
/// `target/services` of the workspace, else the system temp dir.
pub fn services_root() -> PathBuf {
    if let Some(dir) = std::env::var_os("SMARTBEAK_SERVICES_DIR") {
        return PathBuf::from(dir);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"));
    target.join("services")
}

fn unique_dir(kind: &str, root: &Path) -> Result<PathBuf> {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let dir = root.join(format!("{kind}-{}-{n}", std::process::id()));
    if dir.exists() {
        let _ = fs::remove_dir_all(&dir);
    }
    fs::create_dir_all(&dir).map_err(|e| err(format!("cannot create {}: {e}", dir.display())))?;
    Ok(dir)
}

fn run(cmd: &mut Command, what: &str) -> Result<()> {
    let out = cmd
        .output()
        .map_err(|e| err(format!("cannot run {what}: {e}")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(err(format!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )))
    }
}

/// Sends `signal` (e.g. "TERM", "QUIT", "KILL") to `pid` with kill(1).
pub fn signal(pid: u32, signal: &str) -> Result<()> {
    run(
        Command::new("kill").args([&format!("-{signal}"), &pid.to_string()]),
        "kill",
    )
}

fn wait_exit(child: &mut Child, bound: Duration) -> bool {
    let deadline = Instant::now() + bound;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return true;
        }
        thread::sleep(Duration::from_millis(10));
    }
    false
}

/// Waits for `ready` to hold, polling every 50 ms, at most [`READY_TIMEOUT`]; fails early if
/// the child exits.
fn wait_ready(child: &mut Child, what: &str, log: &Path, ready: impl Fn() -> bool) -> Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if ready() {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            let log = fs::read_to_string(log).unwrap_or_default();
            return Err(err(format!(
                "{what} exited during start-up ({status}):\n{log}"
            )));
        }
        if Instant::now() >= deadline {
            return Err(err(format!(
                "{what} did not answer within {READY_TIMEOUT:?}"
            )));
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// The unprivileged account PostgreSQL runs under when we are root: (name, uid, gid).
fn pg_account() -> Result<Option<(String, u32, u32)>> {
    if !is_root() {
        return Ok(None);
    }
    for name in ["postgres", "smartbeak-pg"] {
        if let Some((uid, gid)) = lookup_user(name) {
            return Ok(Some((name.to_owned(), uid, gid)));
        }
    }
    run(
        Command::new("useradd").args([
            "--system",
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
            "smartbeak-pg",
        ]),
        "useradd smartbeak-pg",
    )?;
    lookup_user("smartbeak-pg")
        .map(|(uid, gid)| Some(("smartbeak-pg".to_owned(), uid, gid)))
        .ok_or_else(|| err("created user smartbeak-pg but cannot find it"))
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn lookup_user(name: &str) -> Option<(u32, u32)> {
    let passwd = fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.len() > 3 && fields[0] == name {
            Some((fields[2].parse().ok()?, fields[3].parse().ok()?))
        } else {
            None
        }
    })
}

/// The directory holding `initdb`, `postgres` and `pg_isready`.
pub fn postgres_bin_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("SMARTBEAK_PG_BIN") {
        return Ok(PathBuf::from(dir));
    }
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Ok(bin);
    }
    which("initdb")
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .ok_or_else(|| err(format!("PostgreSQL's initdb was not found; {INSTALL_HINT}")))
}

/// The `redis-server` binary.
pub fn redis_server_bin() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("SMARTBEAK_REDIS_SERVER") {
        return Ok(PathBuf::from(path));
    }
    which("redis-server").ok_or_else(|| err(format!("redis-server was not found; {INSTALL_HINT}")))
}

fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/bin")])
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// How a server's process relates to ours.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifetime {
    /// Killed when the guard drops (tests, `cargo xtask test`).
    Guarded,
    /// Left running in its own process group when the guard drops (`cargo xtask services up`).
    Detached,
}

/// A throwaway PostgreSQL cluster.
#[derive(Debug)]
pub struct PostgresServer {
    dir: PathBuf,
    port: u16,
    child: Option<Child>,
    lifetime: Lifetime,
}

impl PostgresServer {
    /// Initialises and starts a cluster on a free port; user `postgres`, trust auth.
    pub fn start() -> Result<Self> {
        Self::start_with(Lifetime::Guarded)
    }

    /// As [`PostgresServer::start`], choosing what happens on drop.
    pub fn start_with(lifetime: Lifetime) -> Result<Self> {
        let bin = postgres_bin_dir()?;
        let account = pg_account()?;
        // The unprivileged account must reach the data directory through every parent; if
        // the workspace sits somewhere it cannot (a home directory with mode 700), use the
        // system temp dir instead of loosening anyone's permissions.
        let root = services_root();
        let root = if account.is_none() || world_traversable(&root) {
            root
        } else {
            std::env::temp_dir().join("smartbeak-services")
        };
        let dir = unique_dir("postgres", &root)?;
        let data = dir.join("data");
        let as_user = |program: &Path| -> Command {
            match &account {
                Some((_, uid, gid)) => {
                    let mut cmd = Command::new("setpriv");
                    cmd.arg(format!("--reuid={uid}"))
                        .arg(format!("--regid={gid}"))
                        .arg("--clear-groups")
                        .arg("--")
                        .arg(program);
                    cmd
                }
                None => Command::new(program),
            }
        };
        if let Some((name, _, _)) = &account {
            run(
                Command::new("chown").args(["-R", &format!("{name}:"), &dir.to_string_lossy()]),
                "chown of the PostgreSQL directory",
            )?;
        }
        run(
            as_user(&bin.join("initdb"))
                .args(["-D", &data.to_string_lossy()])
                .args([
                    "-U",
                    "postgres",
                    "-A",
                    "trust",
                    "-E",
                    "UTF8",
                    "--locale=C",
                    "-N",
                ])
                .stdin(Stdio::null()),
            "initdb",
        )?;
        let port = free_port()?;
        let log = dir.join("postgres.log");
        let log_file = fs::File::create(&log)
            .map_err(|e| err(format!("cannot create {}: {e}", log.display())))?;
        let log_err = log_file
            .try_clone()
            .map_err(|e| err(format!("cannot open {}: {e}", log.display())))?;
        let mut cmd = as_user(&bin.join("postgres"));
        cmd.args(["-D", &data.to_string_lossy()])
            .args(["-p", &port.to_string()])
            .args(["-c", "listen_addresses=127.0.0.1"])
            .args(["-c", &format!("unix_socket_directories={}", data.display())])
            .args(["-c", "fsync=off", "-c", "synchronous_commit=off"])
            .args(["-c", "full_page_writes=off", "-c", "max_connections=300"])
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(log_err);
        if lifetime == Lifetime::Detached {
            use std::os::unix::process::CommandExt;
            cmd.process_group(0);
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| err(format!("cannot start postgres: {e}")))?;
        let pg_isready = bin.join("pg_isready");
        let ready = || {
            Command::new(&pg_isready)
                .args([
                    "-q",
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &port.to_string(),
                    "-U",
                    "postgres",
                ])
                .status()
                .map(|s| s.success())
                .unwrap_or(false)
        };
        if let Err(e) = wait_ready(&mut child, "postgres", &log, ready) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(e);
        }
        Ok(Self {
            dir,
            port,
            child: Some(child),
            lifetime,
        })
    }

    /// The server's port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `postgres://postgres@127.0.0.1:<port>/postgres`.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// The postmaster's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The directory holding the cluster and its log.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Stops the server now (immediate shutdown), keeping the directory.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = signal(child.id(), "QUIT");
            if !wait_exit(&mut child, Duration::from_secs(10)) {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        if self.lifetime == Lifetime::Detached {
            return;
        }
        self.stop();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// True if every existing ancestor of `dir` lets others through (mode o+x).
fn world_traversable(dir: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    dir.ancestors()
        .filter_map(|a| fs::metadata(a).ok())
        .all(|meta| meta.permissions().mode() & 0o001 != 0)
}

/// A throwaway Redis server.
#[derive(Debug)]
pub struct RedisServer {
    dir: PathBuf,
    port: u16,
    child: Option<Child>,
    lifetime: Lifetime,
}

impl RedisServer {
    /// Starts `redis-server` on a free port with no persistence.
    pub fn start() -> Result<Self> {
        Self::start_with(Lifetime::Guarded)
    }

    /// As [`RedisServer::start`], choosing what happens on drop.
    pub fn start_with(lifetime: Lifetime) -> Result<Self> {
        let dir = unique_dir("redis", &services_root())?;
        let mut server = Self {
            dir,
            port: free_port()?,
            child: None,
            lifetime,
        };
        server.spawn()?;
        Ok(server)
    }

    fn spawn(&mut self) -> Result<()> {
        let bin = redis_server_bin()?;
        let log = self.dir.join("redis.log");
        let mut cmd = Command::new(bin);
        cmd.args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .args(["--dir", &self.dir.to_string_lossy()])
            .args(["--logfile", &log.to_string_lossy()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if self.lifetime == Lifetime::Detached {
            use std::os::unix::process::CommandExt;
            cmd.process_group(0);
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| err(format!("cannot start redis-server: {e}")))?;
        let port = self.port;
        if let Err(e) = wait_ready(&mut child, "redis-server", &log, || redis_ping(port)) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(e);
        }
        self.child = Some(child);
        Ok(())
    }

    /// The server's port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The server's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The directory holding the server's log.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Kills the server (as a crash would); the port stays reserved for [`RedisServer::restart`].
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port (empty: it kept nothing).
    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.spawn() {
                Ok(()) => return Ok(()),
                // The old socket may linger for a moment.
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    thread::sleep(Duration::from_millis(100));
                }
                Err(e) => return Err(e),
            }
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if self.lifetime == Lifetime::Detached {
            return;
        }
        self.stop();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// True if a Redis server at 127.0.0.1:`port` answers `PING` with `PONG`.
pub fn redis_ping(port: u16) -> bool {
    redis_ping_at("127.0.0.1", port)
}

/// True if a Redis server at `host:port` answers `PING` with `PONG` within 500 ms.
pub fn redis_ping_at(host: &str, port: u16) -> bool {
    let attempt = || -> io::Result<bool> {
        use std::net::ToSocketAddrs;
        let addr = (host, port)
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| io::Error::other("no address"))?;
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
        stream.set_read_timeout(Some(Duration::from_millis(500)))?;
        stream.write_all(b"PING\r\n")?;
        let mut buf = [0u8; 7];
        let n = stream.read(&mut buf)?;
        let _ = stream.shutdown(Shutdown::Both);
        Ok(buf[..n].starts_with(b"+PONG"))
    };
    attempt().unwrap_or(false)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn redis_starts_stops_and_restarts_on_the_same_port() {
        let mut redis = RedisServer::start().unwrap();
        let port = redis.port();
        assert!(redis_ping(port));
        redis.stop();
        assert!(!redis_ping(port));
        redis.restart().unwrap();
        assert_eq!(redis.port(), port);
        assert!(redis_ping(port));
        let dir = redis.dir.clone();
        drop(redis);
        assert!(!redis_ping(port));
        assert!(!dir.exists());
    }

    #[test]
    fn postgres_starts_as_an_unprivileged_user_and_stops_on_drop() {
        let pg = PostgresServer::start().unwrap();
        let port = pg.port();
        assert!(port_answers("127.0.0.1", port));
        // The postmaster's real and effective uids: never root, and when we are root, the
        // unprivileged account's (setpriv execs postgres, so the child's pid is its pid).
        let status = fs::read_to_string(format!("/proc/{}/status", pg.pid().unwrap())).unwrap();
        let uids: Vec<u32> = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .unwrap()
            .split_whitespace()
            .map(|u| u.parse().unwrap())
            .collect();
        assert!(
            uids.iter().all(|&u| u != 0),
            "postgres runs as root: {uids:?}"
        );
        if let Some((name, uid, _)) = pg_account().unwrap() {
            assert_eq!((uids[0], uids[1]), (uid, uid), "not running as {name}");
        }
        let dir = pg.dir().to_path_buf();
        drop(pg);
        assert!(!port_answers("127.0.0.1", port));
        assert!(!dir.exists());
    }
}
