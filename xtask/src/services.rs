//! Finding or starting PostgreSQL and Redis, and `cargo xtask services up|down|status`.

use std::fs;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use smartbeak_test_support::{
    Lifetime, PostgresServer, RedisServer, port_answers, redis_ping_at, services_root,
};
use xshell::Shell;

/// The services a task runs against; throwaway servers stop when this drops.
pub(crate) struct Services {
    /// Admin URL of the PostgreSQL server (database `postgres`).
    pub(crate) postgres_url: String,
    pub(crate) redis_url: String,
    postgres: Option<PostgresServer>,
    _redis: Option<RedisServer>,
}

impl Services {
    /// Uses `DATABASE_URL` / `REDIS_URL` when they answer, else starts throwaway servers.
    pub(crate) fn find_or_start() -> Result<Self> {
        let (postgres_url, postgres) = match env_if_answering("DATABASE_URL", 5432, port_answers) {
            Some(url) => {
                eprintln!("xtask: using PostgreSQL at {}", redact(&url));
                (url, None)
            }
            None => {
                eprintln!("xtask: starting a throwaway PostgreSQL");
                let server =
                    PostgresServer::start().context("cannot start a throwaway PostgreSQL")?;
                eprintln!("xtask: PostgreSQL on 127.0.0.1:{}", server.port());
                (server.url(), Some(server))
            }
        };
        let (redis_url, redis) = match env_if_answering("REDIS_URL", 6379, redis_ping_at) {
            Some(url) => {
                eprintln!("xtask: using Redis at {}", redact(&url));
                (url, None)
            }
            None => {
                eprintln!("xtask: starting a throwaway Redis");
                let server = RedisServer::start().context("cannot start a throwaway Redis")?;
                eprintln!("xtask: Redis on 127.0.0.1:{}", server.port());
                (server.url(), Some(server))
            }
        };
        Ok(Self {
            postgres_url,
            redis_url,
            postgres,
            _redis: redis,
        })
    }

    /// True when PostgreSQL is a throwaway server of ours (it vanishes with its databases).
    pub(crate) fn owns_postgres(&self) -> bool {
        self.postgres.is_some()
    }

    /// The URL of database `name` on the same server.
    pub(crate) fn database_url(&self, name: &str) -> String {
        with_database(&self.postgres_url, name)
    }
}

/// `$var` if it is set and its host:port answers.
fn env_if_answering(
    var: &str,
    default_port: u16,
    answers: impl Fn(&str, u16) -> bool,
) -> Option<String> {
    let url = std::env::var(var).ok().filter(|v| !v.trim().is_empty())?;
    let (host, port) = host_port(&url, default_port)?;
    if answers(&host, port) {
        Some(url)
    } else {
        eprintln!(
            "xtask: {var} is set but {host}:{port} does not answer; starting a throwaway server instead"
        );
        None
    }
}

/// Host and port of a `scheme://[user[:pass]@]host[:port][/path]` URL.
pub(crate) fn host_port(url: &str, default_port: u16) -> Option<(String, u16)> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split(['/', '?']).next()?;
    let hostport = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    match hostport.rsplit_once(':') {
        Some((host, port)) if !host.ends_with(']') || hostport.starts_with('[') => {
            Some((host.trim_matches(['[', ']']).to_owned(), port.parse().ok()?))
        }
        _ => Some((hostport.trim_matches(['[', ']']).to_owned(), default_port)),
    }
    .filter(|(h, _)| !h.is_empty())
}

/// The URL with the password replaced by `***`.
pub(crate) fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{host}{tail}"),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

/// The same URL with another database path.
pub(crate) fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let Some((scheme, rest)) = base.split_once("://") else {
        return url.to_owned();
    };
    let authority = rest.split('/').next().unwrap_or(rest);
    let mut out = format!("{scheme}://{authority}/{name}");
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

/// Runs `sql` against `url` with psql (used for CREATE/DROP DATABASE, which cannot run in a
/// migration); falls back to a clear error if psql is missing.
/// The command line carries the URL (and so any password): it is kept out of the echo and of
/// error messages, which name the redacted URL instead.
pub(crate) fn psql(sh: &Shell, url: &str, sql: &str) -> Result<()> {
    psql_read(sh, url, sql).map(drop)
}

/// Like [`psql`], returning psql's unaligned output (one row a line).
pub(crate) fn psql_read(sh: &Shell, url: &str, sql: &str) -> Result<String> {
    xshell::cmd!(sh, "psql -v ON_ERROR_STOP=1 -q -X -A -t {url} -c {sql}")
        .env("PGOPTIONS", "-c client_min_messages=warning")
        .quiet()
        .secret()
        .read()
        .with_context(|| format!("psql failed running {sql:?} on {}", redact(url)))
}

/// `cargo xtask services up|down|status`.
pub(crate) enum ServicesTask {
    Up,
    Down,
    Status,
}

impl ServicesTask {
    pub(crate) fn parse(args: &[String]) -> Result<Self> {
        match args.first().map(String::as_str) {
            Some("up") => Ok(Self::Up),
            Some("down") => Ok(Self::Down),
            Some("status") | None => Ok(Self::Status),
            Some(other) => bail!("unknown services command {other:?}: use up, down or status"),
        }
    }

    pub(crate) fn run(&self, _sh: &Shell) -> Result<()> {
        let state = state_file();
        match self {
            Self::Up => {
                if let Some(s) = read_state()?
                    && alive(&s)
                {
                    println!("already running:\n{}", exports(&s));
                    return Ok(());
                }
                let pg = PostgresServer::start_with(Lifetime::Detached)
                    .context("cannot start a throwaway PostgreSQL")?;
                let redis = RedisServer::start_with(Lifetime::Detached)
                    .context("cannot start a throwaway Redis")?;
                let s = State {
                    database_url: pg.url(),
                    redis_url: redis.url(),
                    pids: [pg.pid(), redis.pid()].into_iter().flatten().collect(),
                    dirs: vec![pg.dir().to_path_buf(), redis.dir().to_path_buf()],
                };
                fs::create_dir_all(services_root())?;
                fs::write(&state, s.encode())
                    .with_context(|| format!("cannot write {}", state.display()))?;
                println!("{}", exports(&s));
                Ok(())
            }
            Self::Down => {
                let Some(s) = read_state()? else {
                    println!("no services recorded in {}", state.display());
                    return Ok(());
                };
                // A recorded pid may have been reused since (a reboot): signal only processes
                // whose command line still names one of our ports.
                let ports: Vec<u16> = [&s.database_url, &s.redis_url]
                    .into_iter()
                    .filter_map(|url| host_port(url, 0).map(|(_, port)| port))
                    .collect();
                let ours: Vec<u32> = s
                    .pids
                    .iter()
                    .copied()
                    .filter(|pid| runs_on(*pid, &ports))
                    .collect();
                for pid in &ours {
                    let _ = smartbeak_test_support::signal(*pid, "QUIT");
                }
                std::thread::sleep(std::time::Duration::from_millis(300));
                for pid in ours.iter().filter(|pid| runs_on(**pid, &ports)) {
                    let _ = smartbeak_test_support::signal(*pid, "KILL");
                }
                for dir in &s.dirs {
                    let _ = fs::remove_dir_all(dir);
                }
                fs::remove_file(&state)?;
                println!("stopped");
                Ok(())
            }
            Self::Status => {
                match read_state()? {
                    Some(s) if alive(&s) => println!("running:\n{}", exports(&s)),
                    Some(_) => println!(
                        "recorded in {} but not answering; run `cargo xtask services down`",
                        state.display()
                    ),
                    None => println!("not running; `cargo xtask services up` starts them"),
                }
                Ok(())
            }
        }
    }
}

struct State {
    database_url: String,
    redis_url: String,
    pids: Vec<u32>,
    dirs: Vec<PathBuf>,
}

impl State {
    fn encode(&self) -> String {
        let dirs: Vec<String> = self.dirs.iter().map(|d| d.display().to_string()).collect();
        let pids: Vec<String> = self.pids.iter().map(u32::to_string).collect();
        format!(
            "DATABASE_URL={}\nREDIS_URL={}\nPIDS={}\nDIRS={}\n",
            self.database_url,
            self.redis_url,
            pids.join(","),
            dirs.join(",")
        )
    }
}

fn state_file() -> PathBuf {
    services_root().join("services.env")
}

fn read_state() -> Result<Option<State>> {
    let Ok(text) = fs::read_to_string(state_file()) else {
        return Ok(None);
    };
    let get = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
            .unwrap_or("")
            .to_owned()
    };
    Ok(Some(State {
        database_url: get("DATABASE_URL"),
        redis_url: get("REDIS_URL"),
        pids: get("PIDS")
            .split(',')
            .filter_map(|p| p.parse().ok())
            .collect(),
        dirs: get("DIRS")
            .split(',')
            .filter(|d| !d.is_empty())
            .map(PathBuf::from)
            .collect(),
    }))
}

/// True if process `pid` exists and its command line names one of `ports`.
fn runs_on(pid: u32, ports: &[u16]) -> bool {
    let Ok(raw) = fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let cmdline = String::from_utf8_lossy(&raw).replace('\0', " ");
    cmdline
        .split([' ', ':'])
        .any(|word| ports.iter().any(|port| word == port.to_string()))
}

fn alive(s: &State) -> bool {
    let pg = host_port(&s.database_url, 5432).is_some_and(|(h, p)| port_answers(&h, p));
    let redis = host_port(&s.redis_url, 6379).is_some_and(|(h, p)| redis_ping_at(&h, p));
    pg && redis
}

fn exports(s: &State) -> String {
    format!(
        "export DATABASE_URL={}\nexport REDIS_URL={}",
        s.database_url, s.redis_url
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_taken_apart_and_redacted() {
        assert_eq!(
            host_port("postgres://u:p@db:6000/x", 5432),
            Some(("db".into(), 6000))
        );
        assert_eq!(
            host_port("redis://127.0.0.1", 6379),
            Some(("127.0.0.1".into(), 6379))
        );
        assert_eq!(redact("postgres://u:hunter2@db/x"), "postgres://u:***@db/x");
        assert_eq!(
            with_database("postgres://u@h:1/postgres?sslmode=disable", "t"),
            "postgres://u@h:1/t?sslmode=disable"
        );
    }
}
