//! Throwaway PostgreSQL and Redis servers for `cargo xtask` and the tests.
//!
//! Each server is a guard: it owns a temporary directory and a free port on 127.0.0.1,
//! polls until the server answers, and kills the process and removes the directory on
//! `Drop` (the directory goes on every error path of the start too). PostgreSQL is started
//! the way pgtemp does it (`initdb -N`, `fsync=off`), TCP only (no unix socket, whose path
//! could pass the kernel's limit under a long target dir), and because it refuses to run as
//! root, as an unprivileged user (`postgres` if it exists, else a `smartbeak-pg` system user
//! created on first use) through `setpriv`. Redis runs with `--save ""` and no AOF: nothing
//! reaches the disk. A port taken between [`free_port`] and the server's bind is retried on
//! another port.
//!
//! Nothing outlives its owner: a guarded server is started through `setpriv --pdeathsig
//! KILL` (when `setpriv` is on `PATH`; without it only the sweep below catches orphans, and
//! as root PostgreSQL refuses to start), so the kernel kills it when the thread that
//! started it dies, SIGKILL included (a server shared between tests should be started from
//! a thread that lives as long as the process, e.g. the main thread, and no server from a
//! tokio `spawn_blocking` task, whose thread exits after 10 s idle); and every start first
//! sweeps the services folder for run directories whose owner process (of this pid
//! namespace: a container sharing the target dir is not swept) is gone, killing a server
//! still running in one (its working directory is the run directory) and removing it.
//! Servers of [`Lifetime::Detached`] (`cargo xtask services up`) are left alone by both.
//! Signals are sent with [`signal`] (the `nix` crate), never through the `kill` binary.
//!
//! The binaries are found under `/usr/lib/postgresql/*/bin` (newest first) or on `PATH`;
//! `SMARTBEAK_PG_BIN` (a directory) and `SMARTBEAK_REDIS_SERVER` (a file) override that.
//!
//! [`TcpForwarder`] is a loopback TCP fault proxy between a client and a server, switchable
//! while traffic flows between the [`Fault`]s pass, latency, stall (a black hole: a dead
//! network), reset (RST) and cut (FIN); `cargo xtask chaos` puts one in front of each server.
//!
//! This crate is synchronous on purpose (std, plus `nix` for signals and `socket2` for the
//! proxy's RST): xtask uses it without
//! a runtime.

#![warn(missing_docs)]

mod forward;

pub use forward::{Fault, TcpForwarder};

use std::fs;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

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

/// How many ports a start tries when the one picked was taken before the server bound it.
const PORT_ATTEMPTS: usize = 5;

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

/// A run directory, removed on drop unless [`RunDir::keep`] was called: every error path of a
/// start removes what it created.
#[derive(Debug)]
struct RunDir {
    path: PathBuf,
    keep: bool,
}

impl RunDir {
    /// Creates `<root>/<kind>-<pid>-<n>` (guarded) or `<root>/<kind>-detached-<pid>-<n>`,
    /// after sweeping stale guarded directories of `root`.
    fn create(kind: &str, root: &Path, lifetime: Lifetime) -> Result<Self> {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        sweep_stale(root);
        fs::create_dir_all(root)
            .map_err(|e| err(format!("cannot create {}: {e}", root.display())))?;
        let pid = std::process::id();
        // A name already taken is never removed: it may be a live run of the same pid in
        // another pid namespace (a container sharing the target dir), or a stale one the
        // sweep of a later run takes. `create_dir` claims a name atomically.
        let path = loop {
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let name = match lifetime {
                Lifetime::Guarded => format!("{kind}-{pid}-{n}"),
                Lifetime::Detached => format!("{kind}-detached-{pid}-{n}"),
            };
            let path = root.join(name);
            match fs::create_dir(&path) {
                Ok(()) => break path,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(err(format!("cannot create {}: {e}", path.display()))),
            }
        };
        let dir = Self { path, keep: false };
        if lifetime == Lifetime::Guarded {
            // Without it the sweep of another run leaves the directory alone.
            if let Some(ns) = pid_namespace() {
                let owner = dir.path.join(OWNER_FILE);
                fs::write(&owner, ns)
                    .map_err(|e| err(format!("cannot write {}: {e}", owner.display())))?;
            }
        }
        Ok(dir)
    }

    /// Hands the directory over to its server (removed with it, or kept for a detached one).
    fn keep(mut self) -> PathBuf {
        self.keep = true;
        std::mem::take(&mut self.path)
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

/// The file of a guarded run directory naming its owner's pid namespace.
const OWNER_FILE: &str = "owner-pid-namespace";

/// This process's pid namespace (`pid:[inode]`), the scope in which an owner pid means
/// anything.
fn pid_namespace() -> Option<String> {
    fs::read_link("/proc/self/ns/pid")
        .ok()
        .map(|ns| ns.to_string_lossy().into_owned())
}

/// Removes the guarded run directories of `root` (`<kind>-<pid>-<n>`) whose owner process
/// is gone, killing first any server still running in one (a process whose working
/// directory is that directory or below it: PostgreSQL and Redis both change into theirs).
/// Only directories whose owner ran in this pid namespace are candidates: a run in a
/// container sharing the target dir has pids that mean nothing here, and a directory without
/// its owner file (being created, or of an older layout) is left alone too.
/// Returns the directories removed.
pub fn sweep_stale(root: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(root) else {
        return Vec::new();
    };
    let Some(ns) = pid_namespace() else {
        return Vec::new();
    };
    let mut swept = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(owner) = name.to_str().and_then(guarded_owner) else {
            continue;
        };
        if owner == std::process::id() || process_alive(owner) {
            continue;
        }
        let dir = entry.path();
        if fs::read_to_string(dir.join(OWNER_FILE)).ok().as_deref() != Some(ns.as_str()) {
            continue;
        }
        for pid in processes_inside(&dir) {
            let _ = signal(pid, "KILL");
        }
        if fs::remove_dir_all(&dir).is_ok() {
            swept.push(dir);
        }
    }
    swept
}

/// The owner pid of a guarded run directory name `<postgres|redis>-<pid>-<n>`.
fn guarded_owner(name: &str) -> Option<u32> {
    let rest = name
        .strip_prefix("postgres-")
        .or_else(|| name.strip_prefix("redis-"))?;
    let (pid, n) = rest.split_once('-')?;
    n.parse::<u32>().ok()?;
    pid.parse().ok()
}

fn process_alive(pid: u32) -> bool {
    // Signal 0 checks existence; EPERM means it exists under another user.
    i32::try_from(pid).is_ok_and(|raw| {
        !matches!(
            kill(Pid::from_raw(raw), None),
            Err(nix::errno::Errno::ESRCH)
        )
    })
}

/// Processes whose working directory is `dir` or below it.
fn processes_inside(dir: &Path) -> Vec<u32> {
    let Ok(dir) = dir.canonicalize() else {
        return Vec::new();
    };
    let Ok(procs) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .flatten()
        .filter_map(|p| p.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|cwd| cwd.starts_with(&dir))
        })
        .collect()
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

/// Sends `signal` (e.g. "TERM", "QUIT", "KILL", or "SIGTERM") to `pid`, from Rust (no
/// `kill` binary needed).
pub fn signal(pid: u32, signal: &str) -> Result<()> {
    let raw = i32::try_from(pid).map_err(|_| err(format!("invalid pid {pid}")))?;
    send(raw, signal, &pid.to_string())
}

/// Sends `signal` (as [`signal`] takes it) to every process of the process group `pgid` (a
/// child started with `process_group(0)` leads a group of its own pid).
pub fn signal_group(pgid: u32, signal: &str) -> Result<()> {
    let raw = i32::try_from(pgid).map_err(|_| err(format!("invalid process group {pgid}")))?;
    send(-raw, signal, &format!("process group {pgid}"))
}

/// `kill(2)` of `target` (a pid, or minus a process group) with the signal named `signal`.
fn send(target: i32, signal: &str, what: &str) -> Result<()> {
    let name = if signal.starts_with("SIG") {
        signal.to_owned()
    } else {
        format!("SIG{signal}")
    };
    let sig = Signal::from_str(&name).map_err(|_| err(format!("unknown signal {signal:?}")))?;
    kill(Pid::from_raw(target), sig).map_err(|e| err(format!("cannot send {name} to {what}: {e}")))
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

/// How to start a throwaway PostgreSQL ([`PostgresServer::start_with_options`]).
#[derive(Debug, Clone)]
pub struct PostgresOptions {
    /// What happens on drop.
    pub lifetime: Lifetime,
    /// `Some`: user `postgres` gets this password and TCP logins need it (`scram-sha-256`
    /// in `pg_hba.conf`, like a stock Debian cluster); `None`: trust auth.
    pub password: Option<String>,
    /// The directory of `initdb`, `postgres` and `pg_isready`; `None`: [`postgres_bin_dir`].
    pub bin_dir: Option<PathBuf>,
    /// The folder of the run directory; `None`: [`services_root`].
    pub root: Option<PathBuf>,
    /// Further server settings, each passed as `-c name=value` (for instance
    /// `shared_preload_libraries=pg_stat_statements`, which only a start can set).
    pub settings: Vec<(String, String)>,
}

impl Default for PostgresOptions {
    fn default() -> Self {
        Self {
            lifetime: Lifetime::Guarded,
            password: None,
            bin_dir: None,
            root: None,
            settings: Vec::new(),
        }
    }
}

/// A throwaway PostgreSQL cluster.
#[derive(Debug)]
pub struct PostgresServer {
    dir: PathBuf,
    port: u16,
    password: Option<String>,
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
        Self::start_with_options(PostgresOptions {
            lifetime,
            ..PostgresOptions::default()
        })
    }

    /// Initialises and starts a cluster as `options` say. On any error the run directory is
    /// removed and no process is left running.
    pub fn start_with_options(options: PostgresOptions) -> Result<Self> {
        Self::start_on_ports(options, free_port)
    }

    /// The start, with the ports to try coming from `next_port` (tests hand it a taken one).
    fn start_on_ports(
        options: PostgresOptions,
        mut next_port: impl FnMut() -> Result<u16>,
    ) -> Result<Self> {
        let bin = match &options.bin_dir {
            Some(dir) => dir.clone(),
            None => postgres_bin_dir()?,
        };
        let account = pg_account()?;
        if let Some((name, _, _)) = &account
            && which("setpriv").is_none()
        {
            // Without it PostgreSQL would run as root, which it refuses.
            return Err(err(format!(
                "running PostgreSQL as {name} (we are root) needs setpriv (util-linux), not found on PATH"
            )));
        }
        let lifetime = options.lifetime;
        // The unprivileged account must reach the data directory through every parent; if
        // the workspace sits somewhere it cannot (a home directory with mode 700), use the
        // system temp dir instead of loosening anyone's permissions.
        let root = options.root.clone().unwrap_or_else(services_root);
        let root = if account.is_none() || world_traversable(&root) {
            root
        } else {
            std::env::temp_dir().join("smartbeak-services")
        };
        let dir = RunDir::create("postgres", &root, lifetime)?;
        let data = dir.path.join("data");
        let as_user = |program: &Path| -> Command {
            server_command(
                program,
                account.as_ref().map(|(_, uid, gid)| (*uid, *gid)),
                lifetime,
            )
        };
        let pwfile = dir.path.join("pwfile");
        if let Some(password) = &options.password {
            fs::write(&pwfile, password)
                .map_err(|e| err(format!("cannot write {}: {e}", pwfile.display())))?;
        }
        if let Some((name, _, _)) = &account {
            run(
                Command::new("chown").args([
                    "-R",
                    &format!("{name}:"),
                    &dir.path.to_string_lossy(),
                ]),
                "chown of the PostgreSQL directory",
            )?;
        }
        let mut initdb = as_user(&bin.join("initdb"));
        initdb
            .args(["-D", &data.to_string_lossy()])
            .args(["-U", "postgres", "-E", "UTF8", "--locale=C", "-N"])
            .stdin(Stdio::null());
        match &options.password {
            Some(_) => initdb
                .args(["--auth-local=trust", "--auth-host=scram-sha-256"])
                .arg(format!("--pwfile={}", pwfile.display())),
            None => initdb.args(["-A", "trust"]),
        };
        let initialised = run(&mut initdb, "initdb");
        let _ = fs::remove_file(&pwfile);
        initialised?;

        let log = dir.path.join("postgres.log");
        let pg_isready = bin.join("pg_isready");
        let mut last = None;
        for _ in 0..PORT_ATTEMPTS {
            let port = next_port()?;
            let log_file = fs::File::create(&log)
                .map_err(|e| err(format!("cannot create {}: {e}", log.display())))?;
            let log_err = log_file
                .try_clone()
                .map_err(|e| err(format!("cannot open {}: {e}", log.display())))?;
            let mut cmd = as_user(&bin.join("postgres"));
            // TCP only: an empty unix_socket_directories creates no socket, whose path could
            // pass the kernel's 107-byte limit under a long target dir.
            cmd.args(["-D", &data.to_string_lossy()])
                .args(["-p", &port.to_string()])
                .args(["-c", "listen_addresses=127.0.0.1"])
                .args(["-c", "unix_socket_directories="])
                .args(["-c", "fsync=off", "-c", "synchronous_commit=off"])
                .args(["-c", "full_page_writes=off", "-c", "max_connections=300"]);
            for (name, value) in &options.settings {
                cmd.arg("-c").arg(format!("{name}={value}"));
            }
            cmd.stdin(Stdio::null()).stdout(log_file).stderr(log_err);
            let mut child = cmd
                .spawn()
                .map_err(|e| err(format!("cannot start postgres: {e}")))?;
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
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .map(|s| s.success())
                    .unwrap_or(false)
            };
            match wait_ready(&mut child, "postgres", &log, ready) {
                Ok(()) => {
                    return Ok(Self {
                        dir: dir.keep(),
                        port,
                        password: options.password,
                        child: Some(child),
                        lifetime,
                    });
                }
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    if !port_was_taken(&e) {
                        return Err(e);
                    }
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| err("postgres could not bind any port")))
    }

    /// The server's port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `postgres://postgres[:<password>]@127.0.0.1:<port>/postgres`.
    pub fn url(&self) -> String {
        match &self.password {
            Some(password) => format!(
                "postgres://postgres:{password}@127.0.0.1:{}/postgres",
                self.port
            ),
            None => format!("postgres://postgres@127.0.0.1:{}/postgres", self.port),
        }
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

    /// Stops the server and removes its directory, whatever its [`Lifetime`] (a detached
    /// server whose companion failed to start).
    pub fn discard(mut self) {
        self.lifetime = Lifetime::Guarded;
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

/// A server process: run as `account` (uid, gid) when given, and for a guarded server
/// through `setpriv --pdeathsig KILL`, so the kernel kills it when the thread that started it
/// dies (SIGKILL of the test or xtask included); a detached one gets its own process group,
/// so the terminal's Ctrl-C does not reach it.
fn server_command(program: &Path, account: Option<(u32, u32)>, lifetime: Lifetime) -> Command {
    let pdeathsig = lifetime == Lifetime::Guarded;
    let setpriv = (account.is_some() || pdeathsig)
        .then(|| which("setpriv"))
        .flatten();
    let mut cmd = match setpriv {
        Some(setpriv) => {
            let mut cmd = Command::new(setpriv);
            if let Some((uid, gid)) = account {
                cmd.arg(format!("--reuid={uid}"))
                    .arg(format!("--regid={gid}"))
                    .arg("--clear-groups");
            }
            if pdeathsig {
                cmd.args(["--pdeathsig", "KILL"]);
            }
            cmd.arg("--").arg(program);
            cmd
        }
        None => Command::new(program),
    };
    if lifetime == Lifetime::Detached {
        use std::os::unix::process::CommandExt;
        cmd.process_group(0);
    }
    cmd
}

/// True if a start failed because its port was taken (a race with another process after
/// [`free_port`] released it).
fn port_was_taken(e: &Error) -> bool {
    e.0.contains("Address already in use")
        || e.0.contains("could not bind")
        || e.0.contains("(cluster), aborting")
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
    /// The cluster bus port of a cluster node (`--cluster-port`); `None` for a plain server.
    cluster_port: Option<u16>,
    child: Option<Child>,
    lifetime: Lifetime,
}

impl RedisServer {
    /// Starts `redis-server` on a free port with no persistence.
    pub fn start() -> Result<Self> {
        Self::start_with(Lifetime::Guarded)
    }

    /// As [`RedisServer::start`], choosing what happens on drop. On any error the run
    /// directory is removed and no process is left running.
    pub fn start_with(lifetime: Lifetime) -> Result<Self> {
        Self::start_on_ports(lifetime, &services_root(), free_port, false)
    }

    fn start_on_ports(
        lifetime: Lifetime,
        root: &Path,
        mut next_port: impl FnMut() -> Result<u16>,
        cluster: bool,
    ) -> Result<Self> {
        let dir = RunDir::create(if cluster { "redis-node" } else { "redis" }, root, lifetime)?;
        let mut last = None;
        for _ in 0..PORT_ATTEMPTS {
            let port = next_port()?;
            let cluster_port = if cluster {
                let bus = next_port()?;
                if bus == port {
                    last = Some(err("the cluster bus port equals the client port"));
                    continue;
                }
                Some(bus)
            } else {
                None
            };
            let mut server = Self {
                dir: dir.path.clone(),
                port,
                cluster_port,
                child: None,
                lifetime,
            };
            // `server` owns no directory until the start succeeded: `dir` removes it.
            server.lifetime = Lifetime::Detached;
            match server.spawn(lifetime) {
                Ok(()) => {
                    server.lifetime = lifetime;
                    server.dir = dir.keep();
                    return Ok(server);
                }
                Err(e) if port_was_taken(&e) => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| err("redis-server could not bind any port")))
    }

    fn spawn(&mut self, lifetime: Lifetime) -> Result<()> {
        let bin = redis_server_bin()?;
        let log = self.dir.join("redis.log");
        // A log of an earlier attempt would be read as this one's.
        let _ = fs::remove_file(&log);
        let mut cmd = server_command(&bin, None, lifetime);
        cmd.args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .args(["--dir", &self.dir.to_string_lossy()])
            .args(["--logfile", &log.to_string_lossy()]);
        if let Some(bus) = self.cluster_port {
            // nodes.conf lives in the node's own directory, so a restarted node rejoins
            // with its id and slots.
            cmd.args(["--cluster-enabled", "yes"])
                .args([
                    "--cluster-config-file",
                    &self.dir.join("nodes.conf").to_string_lossy(),
                ])
                .args([
                    "--cluster-node-timeout",
                    &CLUSTER_NODE_TIMEOUT_MS.to_string(),
                ])
                .args(["--cluster-port", &bus.to_string()]);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
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
            match self.spawn(self.lifetime) {
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

/// `--cluster-node-timeout` of a [`RedisCluster`] node, in milliseconds: how long a master
/// may be unreachable before the others mark it failed (and the cluster goes down, having
/// no replicas).
pub const CLUSTER_NODE_TIMEOUT_MS: u64 = 500;

/// How long [`RedisCluster`] waits for `redis-cli --cluster create` and for
/// `cluster_state:ok`.
const CLUSTER_READY_TIMEOUT: Duration = Duration::from_secs(30);

/// The `redis-cli` binary.
pub fn redis_cli_bin() -> Result<PathBuf> {
    which("redis-cli").ok_or_else(|| err(format!("redis-cli was not found; {INSTALL_HINT}")))
}

/// A throwaway Redis Cluster of masters only (no replicas), each node a [`RedisServer`]
/// with `--cluster-enabled yes`, its `nodes.conf` in its own run directory,
/// `--cluster-node-timeout 500`, no persistence, and client and bus ports picked free.
/// Every node is killed and its directory removed on drop.
#[derive(Debug)]
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts `masters` (at least 3) nodes, joins them with
    /// `redis-cli --cluster create ... --cluster-replicas 0 --cluster-yes` and waits (at
    /// most 30 s) until every node reports `cluster_state:ok`.
    pub fn start(masters: usize) -> Result<Self> {
        if masters < 3 {
            return Err(err("a Redis Cluster needs at least 3 masters"));
        }
        let cli = redis_cli_bin()?;
        let root = services_root();
        let nodes = (0..masters)
            .map(|_| RedisServer::start_on_ports(Lifetime::Guarded, &root, free_port, true))
            .collect::<Result<Vec<_>>>()?;
        let cluster = Self { nodes };
        let mut create = Command::new(&cli);
        create.arg("--cluster").arg("create");
        for node in &cluster.nodes {
            create.arg(format!("127.0.0.1:{}", node.port()));
        }
        create
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = create
            .spawn()
            .map_err(|e| err(format!("cannot run redis-cli --cluster create: {e}")))?;
        if !wait_exit(&mut child, CLUSTER_READY_TIMEOUT) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(err(format!(
                "redis-cli --cluster create did not finish within {CLUSTER_READY_TIMEOUT:?}"
            )));
        }
        let out = child
            .wait_with_output()
            .map_err(|e| err(format!("redis-cli --cluster create: {e}")))?;
        if !out.status.success() {
            return Err(err(format!(
                "redis-cli --cluster create failed ({}):\n{}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        cluster.wait_ok(CLUSTER_READY_TIMEOUT)?;
        Ok(cluster)
    }

    /// The nodes' URLs, `redis://127.0.0.1:<port>`.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// Node `index`.
    pub fn node(&self, index: usize) -> &RedisServer {
        &self.nodes[index]
    }

    /// Kills node `index` (as a crash would); its port and `nodes.conf` are kept for
    /// [`RedisCluster::restart_node`].
    pub fn stop_node(&mut self, index: usize) {
        self.nodes[index].stop();
    }

    /// Starts node `index` again on its ports with its `nodes.conf` (it rejoins with its id
    /// and slots, its data empty) and waits (at most 30 s) for `cluster_state:ok` on every node.
    pub fn restart_node(&mut self, index: usize) -> Result<()> {
        self.nodes[index].restart()?;
        self.wait_ok(CLUSTER_READY_TIMEOUT)
    }

    /// The index of the master serving `key`'s slot (`CLUSTER KEYSLOT`, `CLUSTER NODES`).
    pub fn master_of(&self, key: &str) -> Result<usize> {
        let asked = self
            .nodes
            .iter()
            .find(|n| n.pid().is_some())
            .ok_or_else(|| err("no cluster node is running"))?
            .port();
        let slot: u16 = cli(asked, &["CLUSTER", "KEYSLOT", key])?
            .trim()
            .parse()
            .map_err(|e| err(format!("CLUSTER KEYSLOT answered no slot: {e}")))?;
        let nodes = cli(asked, &["CLUSTER", "NODES"])?;
        let port = nodes
            .lines()
            .find_map(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                let master = fields.get(2)?.split(',').any(|f| f == "master");
                let serves = fields.iter().skip(8).any(|range| {
                    let (lo, hi) = range.split_once('-').unwrap_or((range, range));
                    matches!((lo.parse::<u16>(), hi.parse::<u16>()), (Ok(lo), Ok(hi)) if (lo..=hi).contains(&slot))
                });
                if !(master && serves) {
                    return None;
                }
                let addr = fields.get(1)?.split('@').next()?;
                addr.rsplit_once(':')?.1.parse::<u16>().ok()
            })
            .ok_or_else(|| err(format!("no master serves slot {slot}:\n{nodes}")))?;
        self.nodes
            .iter()
            .position(|n| n.port() == port)
            .ok_or_else(|| err(format!("slot {slot} is served by unknown port {port}")))
    }

    /// Polls `CLUSTER INFO` of every running node every 50 ms until each reports
    /// `cluster_state:ok`, at most `bound`.
    pub fn wait_ok(&self, bound: Duration) -> Result<()> {
        let deadline = Instant::now() + bound;
        loop {
            let pending: Vec<u16> = self
                .nodes
                .iter()
                .filter(|n| n.pid().is_some())
                .map(RedisServer::port)
                .filter(|&port| {
                    !cli(port, &["CLUSTER", "INFO"])
                        .is_ok_and(|info| info.lines().any(|l| l.trim() == "cluster_state:ok"))
                })
                .collect();
            if pending.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(err(format!(
                    "cluster nodes on ports {pending:?} did not reach cluster_state:ok within {bound:?}"
                )));
            }
            thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Runs `redis-cli -h 127.0.0.1 -p <port> <args>` and returns its standard output (a
/// killed node refuses the connection at once, so this does not hang).
fn cli(port: u16, args: &[&str]) -> Result<String> {
    let out = Command::new(redis_cli_bin()?)
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| err(format!("cannot run redis-cli: {e}")))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() || stdout.starts_with("ERR") || stdout.starts_with("Could not connect")
    {
        return Err(err(format!(
            "redis-cli -p {port} {}: {stdout}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(stdout)
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
    fn a_cluster_of_three_masters_serves_every_slot_and_a_killed_master_rejoins() {
        let mut cluster = RedisCluster::start(3).unwrap();
        assert_eq!(cluster.urls().len(), 3);
        let owner = cluster.master_of("{smartbeak:rl}:k:x").unwrap();
        // The hash tag alone decides the slot.
        assert_eq!(
            cluster.master_of("{smartbeak:rl}:ip:1.2.3.4").unwrap(),
            owner
        );
        let other = (owner + 1) % 3;
        let info = cli(cluster.node(other).port(), &["CLUSTER", "INFO"]).unwrap();
        assert!(info.contains("cluster_known_nodes:3"), "{info}");
        cluster.stop_node(owner);
        assert!(!redis_ping(cluster.node(owner).port()));
        // Without replicas the survivors mark the cluster down once the node timeout passed.
        assert!(eventually(|| {
            cli(cluster.node(other).port(), &["CLUSTER", "INFO"])
                .is_ok_and(|info| info.contains("cluster_state:fail"))
        }));
        cluster.restart_node(owner).unwrap();
        assert_eq!(cluster.master_of("{smartbeak:rl}:k:x").unwrap(), owner);
        let dirs: Vec<PathBuf> = (0..3).map(|i| cluster.node(i).dir().to_owned()).collect();
        let ports: Vec<u16> = (0..3).map(|i| cluster.node(i).port()).collect();
        drop(cluster);
        for (dir, port) in dirs.iter().zip(ports) {
            assert!(!dir.exists());
            assert!(!redis_ping(port));
        }
    }

    /// Polls `cond` every 20 ms for at most 10 s.
    fn eventually(mut cond: impl FnMut() -> bool) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if cond() {
                return true;
            }
            thread::sleep(Duration::from_millis(20));
        }
        false
    }

    #[test]
    fn postgres_starts_as_an_unprivileged_user_over_tcp_only_and_stops_on_drop() {
        // A run directory far past the 107-byte limit of a unix socket path.
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp
            .path()
            .join("a-very-long-target-directory-name".repeat(4));
        let pg = PostgresServer::start_with_options(PostgresOptions {
            root: Some(root.clone()),
            ..PostgresOptions::default()
        })
        .unwrap();
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
        let sockets: Vec<_> = fs::read_dir(pg.dir().join("data"))
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(".s.PGSQL"))
            .collect();
        assert!(sockets.is_empty(), "unix sockets: {sockets:?}");
        let dir = pg.dir().to_path_buf();
        drop(pg);
        assert!(!port_answers("127.0.0.1", port));
        assert!(!dir.exists());
    }

    #[test]
    fn postgres_settings_reach_the_server() {
        let pg = PostgresServer::start_with_options(PostgresOptions {
            settings: vec![("work_mem".to_owned(), "7MB".to_owned())],
            ..PostgresOptions::default()
        })
        .unwrap();
        let out = std::process::Command::new("psql")
            .args(["-X", "-A", "-t", "-d", &pg.url(), "-c", "SHOW work_mem"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "7MB");
    }

    #[test]
    fn a_failed_postgres_start_leaves_no_directory() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let bin = tmp.path().join("bin");
        fs::create_dir_all(&bin).unwrap();
        let initdb = bin.join("initdb");
        fs::write(
            &initdb,
            "#!/bin/sh\necho simulated initdb failure >&2\nexit 1\n",
        )
        .unwrap();
        fs::set_permissions(&initdb, fs::Permissions::from_mode(0o755)).unwrap();
        let root = tmp.path().join("services");
        let e = PostgresServer::start_with_options(PostgresOptions {
            bin_dir: Some(bin),
            root: Some(root.clone()),
            ..PostgresOptions::default()
        })
        .unwrap_err();
        assert!(e.to_string().contains("simulated initdb failure"), "{e}");
        let left: Vec<_> = fs::read_dir(&root).unwrap().flatten().collect();
        assert!(left.is_empty(), "left behind: {left:?}");
    }

    #[test]
    fn a_port_taken_before_the_bind_is_retried_on_another() {
        let taken = TcpListener::bind("127.0.0.1:0").unwrap();
        let taken_port = taken.local_addr().unwrap().port();
        let mut first = Some(taken_port);
        let pg = PostgresServer::start_on_ports(PostgresOptions::default(), || {
            first.take().map_or_else(free_port, Ok)
        })
        .unwrap();
        assert_ne!(pg.port(), taken_port);
        assert!(port_answers("127.0.0.1", pg.port()));

        let tmp = tempfile::tempdir().unwrap();
        let mut first = Some(taken_port);
        let redis = RedisServer::start_on_ports(
            Lifetime::Guarded,
            tmp.path(),
            || first.take().map_or_else(free_port, Ok),
            false,
        )
        .unwrap();
        assert_ne!(redis.port(), taken_port);
        assert!(redis_ping(redis.port()));
    }

    #[test]
    fn a_password_server_refuses_logins_without_it() {
        let pg = PostgresServer::start_with_options(PostgresOptions {
            password: Some("s3cret-Pw".into()),
            ..PostgresOptions::default()
        })
        .unwrap();
        assert!(pg.url().contains(":s3cret-Pw@"));
        let pg_hba = fs::read_to_string(pg.dir().join("data/pg_hba.conf")).unwrap();
        assert!(
            pg_hba
                .lines()
                .any(|l| l.starts_with("host") && l.ends_with("scram-sha-256")),
            "{pg_hba}"
        );
        assert!(!pg.dir().join("pwfile").exists(), "the password file stays");
    }

    #[test]
    fn a_guarded_server_dies_with_the_thread_that_started_it() {
        // The guard is leaked, as a SIGKILL of the owner would leave it: only the parent-death
        // signal can stop the server.
        let (port, dir) = thread::spawn(|| {
            let redis = RedisServer::start().unwrap();
            let found = (redis.port(), redis.dir().to_path_buf());
            std::mem::forget(redis);
            found
        })
        .join()
        .unwrap();
        let gone = eventually(|| !redis_ping(port));
        let _ = fs::remove_dir_all(dir);
        assert!(gone, "redis on {port} outlived its parent");
    }

    #[test]
    fn stale_run_directories_of_dead_owners_in_this_pid_namespace_are_swept() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        // A pid that existed and is gone.
        let mut gone = Command::new("true").spawn().unwrap();
        gone.wait().unwrap();
        let dead = gone.id();
        let stale = root.join(format!("postgres-{dead}-0"));
        let detached = root.join(format!("postgres-detached-{dead}-0"));
        let live = root.join(format!("redis-{}-7", std::process::id()));
        // Of another pid namespace (a container sharing the target dir), and without an
        // owner file: the pid means nothing here, so both are left alone.
        let foreign = root.join(format!("postgres-{dead}-1"));
        let unowned = root.join(format!("redis-{dead}-2"));
        let ns = pid_namespace().unwrap();
        for dir in [&stale, &detached, &live, &foreign, &unowned] {
            fs::create_dir_all(dir).unwrap();
        }
        for dir in [&stale, &detached, &live] {
            fs::write(dir.join(OWNER_FILE), &ns).unwrap();
        }
        fs::write(foreign.join(OWNER_FILE), "pid:[1]").unwrap();
        // An orphaned "server" still running inside the stale directory.
        let mut orphan = Command::new("sleep")
            .arg("600")
            .current_dir(&stale)
            .spawn()
            .unwrap();

        let swept = sweep_stale(root);

        assert_eq!(swept, std::slice::from_ref(&stale));
        assert!(!stale.exists() && detached.exists() && live.exists());
        assert!(foreign.exists() && unowned.exists());
        let killed = eventually(|| matches!(orphan.try_wait(), Ok(Some(_))));
        let _ = orphan.kill();
        assert!(killed, "the orphan in the stale directory still runs");
    }

    #[test]
    fn a_run_directory_never_takes_over_an_existing_one() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        // Directories of the names this process would pick next, as a run of the same pid in
        // another pid namespace would have made them.
        let pid = std::process::id();
        let next = RunDir::create("redis", root, Lifetime::Guarded)
            .unwrap()
            .keep();
        let n: u32 = next
            .to_string_lossy()
            .rsplit('-')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        fs::remove_dir_all(&next).unwrap();
        let taken: Vec<PathBuf> = (n + 1..n + 6)
            .map(|n| root.join(format!("redis-{pid}-{n}")))
            .collect();
        for dir in &taken {
            fs::create_dir_all(dir).unwrap();
            fs::write(dir.join("marker"), "someone else's").unwrap();
        }

        let dir = RunDir::create("redis", root, Lifetime::Guarded).unwrap();

        assert!(!taken.contains(&dir.path), "{}", dir.path.display());
        for taken in &taken {
            assert!(
                taken.join("marker").exists(),
                "{} was emptied",
                taken.display()
            );
        }
    }

    #[test]
    fn signals_are_sent_from_rust() {
        let mut child = Command::new("sleep").arg("600").spawn().unwrap();
        signal(child.id(), "TERM").unwrap();
        let status = child.wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(15));
        let e = signal(child.id(), "NOPE").unwrap_err();
        assert_eq!(e.to_string(), "unknown signal \"NOPE\"");
    }
}
