//! Finding or starting PostgreSQL and Redis, and `cargo xtask services up|down|status`.

use std::fs;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};
use smartbeak_database::SecretUrl;
use smartbeak_test_support::{
    Lifetime, PostgresServer, RedisServer, port_answers, redis_ping_at, services_root,
};
use url::Url;
use xshell::Shell;

/// The services a task runs against; throwaway servers stop when this drops.
pub(crate) struct Services {
    /// Admin URL of the PostgreSQL server (database `postgres`).
    pub(crate) postgres_url: SecretUrl,
    pub(crate) redis_url: String,
    postgres: Option<PostgresServer>,
    _redis: Option<RedisServer>,
}

impl Services {
    /// Uses `DATABASE_URL` when a real login succeeds and `REDIS_URL` when it answers
    /// `PING`, else starts throwaway servers; says which it chose, and why.
    pub(crate) fn find_or_start() -> Result<Self> {
        let database_url = std::env::var("DATABASE_URL").ok();
        let (postgres_url, postgres) = match choose_postgres(database_url.as_deref()) {
            PostgresChoice::Use(url) => {
                eprintln!("xtask: PostgreSQL: using {url} (login succeeded)");
                (url, None)
            }
            PostgresChoice::StartOwn(why) => {
                eprintln!("xtask: PostgreSQL: {why}; starting a throwaway server");
                let server =
                    PostgresServer::start().context("cannot start a throwaway PostgreSQL")?;
                eprintln!(
                    "xtask: PostgreSQL: throwaway server on 127.0.0.1:{}",
                    server.port()
                );
                let url = SecretUrl::parse("throwaway PostgreSQL URL", &server.url())
                    .context("the throwaway server's URL")?;
                (url, Some(server))
            }
        };
        let (redis_url, redis) = match env_if_answering("REDIS_URL", 6379, redis_ping_at) {
            Some(url) => {
                eprintln!("xtask: Redis: using {} (PING answered)", redact_redis(&url));
                (url, None)
            }
            None => {
                eprintln!("xtask: Redis: starting a throwaway server");
                let server = RedisServer::start().context("cannot start a throwaway Redis")?;
                eprintln!(
                    "xtask: Redis: throwaway server on 127.0.0.1:{}",
                    server.port()
                );
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
    pub(crate) fn database_url(&self, name: &str) -> SecretUrl {
        self.postgres_url.with_database(name)
    }
}

/// Which PostgreSQL a task runs against.
#[derive(Debug)]
pub(crate) enum PostgresChoice {
    /// `DATABASE_URL`: a login with it succeeded.
    Use(SecretUrl),
    /// A throwaway server, for the reason given (never containing a password).
    StartOwn(String),
}

/// Decides from `DATABASE_URL` (`database_url`): a server that accepts a real login
/// (`psql -w`, so it never prompts) is used; an unset or invalid URL, a server that does not
/// answer, refuses the credentials (a stock Debian cluster has scram auth on 127.0.0.1) or
/// fails the login otherwise, means throwaway servers.
pub(crate) fn choose_postgres(database_url: Option<&str>) -> PostgresChoice {
    let Some(raw) = database_url.filter(|v| !v.trim().is_empty()) else {
        return PostgresChoice::StartOwn("DATABASE_URL is not set".to_owned());
    };
    let url = match SecretUrl::parse("DATABASE_URL", raw) {
        Ok(url) => url,
        Err(e) => return PostgresChoice::StartOwn(e.to_string()),
    };
    match psql_read(&url, "SELECT 1") {
        Ok(out) if out.trim() == "1" => PostgresChoice::Use(url),
        Ok(out) => PostgresChoice::StartOwn(format!(
            "{url} answered the login probe with {:?}",
            out.trim()
        )),
        Err(e) => {
            let detail = format!("{e:#}");
            let kind = if is_auth_failure(&detail) {
                "refused the login (authentication failed)"
            } else {
                "cannot be logged into"
            };
            PostgresChoice::StartOwn(format!("{url} {kind}: {}", last_line(&detail)))
        }
    }
}

/// True if psql's error says the credentials were refused or missing.
fn is_auth_failure(detail: &str) -> bool {
    [
        "password authentication failed",
        "no password supplied",
        "authentication failed",
        "no pg_hba.conf entry",
    ]
    .iter()
    .any(|needle| detail.contains(needle))
}

fn last_line(text: &str) -> &str {
    text.lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty())
        .unwrap_or("")
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
    let parsed = Url::parse(url).ok()?;
    let host = parsed.host_str()?.trim_matches(['[', ']']).to_owned();
    (!host.is_empty()).then(|| (host, parsed.port().unwrap_or(default_port)))
}

/// A Redis URL with its password (`redis://:pass@host`, `redis://user:pass@host`) replaced
/// by `***`; an unparsable URL is not shown at all.
pub(crate) fn redact_redis(url: &str) -> String {
    match Url::parse(url) {
        Ok(mut parsed) => {
            if parsed.password().is_some() {
                let _ = parsed.set_password(Some("***"));
            }
            parsed.to_string()
        }
        Err(_) => "<unparsable REDIS_URL>".to_owned(),
    }
}

/// The psql command running `sql` against `url`: the URL goes on the command line without
/// its password, which goes through `PGPASSWORD` (argv is world-readable in `/proc`); `-w`
/// makes psql fail instead of prompting when a password is needed and missing.
pub(crate) fn psql_command(url: &SecretUrl, sql: &str) -> Command {
    let mut cmd = psql_session(url);
    cmd.arg("-c")
        .arg(sql)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// psql against `url` reading its statements from stdin (the caller sets up the pipes),
/// the password kept out of argv as in [`psql_command`]: a session that lives as long as
/// its stdin, for a lock held over several steps.
pub(crate) fn psql_session(url: &SecretUrl) -> Command {
    let (conninfo, password) = split_password(url);
    let mut cmd = Command::new("psql");
    cmd.args(["-w", "-v", "ON_ERROR_STOP=1", "-q", "-X", "-A", "-t", "-d"])
        .arg(conninfo)
        .env("PGOPTIONS", "-c client_min_messages=warning")
        .env("PGCONNECT_TIMEOUT", "5");
    if let Some(password) = password {
        cmd.env("PGPASSWORD", password);
    }
    cmd
}

/// The URL without any password (userinfo or `password=` query parameter), and the password
/// (the query parameter wins, as with sqlx).
fn split_password(url: &SecretUrl) -> (String, Option<String>) {
    let Ok(mut parsed) = Url::parse(url.expose()) else {
        return (url.redacted(), None);
    };
    let mut password = parsed.password().map(percent_decode);
    let _ = parsed.set_password(None);
    if parsed
        .query_pairs()
        .any(|(k, _)| k.eq_ignore_ascii_case("password"))
    {
        let mut kept = Vec::new();
        for (key, value) in parsed.query_pairs() {
            if key.eq_ignore_ascii_case("password") {
                password = Some(value.into_owned());
            } else {
                kept.push((key.into_owned(), value.into_owned()));
            }
        }
        if kept.is_empty() {
            parsed.set_query(None);
        } else {
            parsed.query_pairs_mut().clear().extend_pairs(kept);
        }
    }
    (parsed.to_string(), password)
}

/// Decodes `%XX` escapes (the userinfo of a URL is percent-encoded).
fn percent_decode(raw: &str) -> String {
    percent_encoding::percent_decode_str(raw)
        .decode_utf8_lossy()
        .into_owned()
}

/// Runs `sql` against `url` with psql (used for CREATE/DROP DATABASE, which cannot run in a
/// migration). Errors name the redacted URL and psql's message, never the password.
pub(crate) fn psql(url: &SecretUrl, sql: &str) -> Result<()> {
    psql_read(url, sql).map(drop)
}

/// Like [`psql`], returning psql's unaligned output (one row a line).
pub(crate) fn psql_read(url: &SecretUrl, sql: &str) -> Result<String> {
    let out = psql_command(url, sql)
        .output()
        .with_context(|| format!("cannot run psql (needed for {sql:?} on {url})"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        bail!(
            "psql failed running {sql:?} on {url} ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )
    }
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
                let redis = match RedisServer::start_with(Lifetime::Detached) {
                    Ok(redis) => redis,
                    Err(e) => {
                        // Nothing is recorded yet: leave no PostgreSQL running behind.
                        pg.discard();
                        return Err(e).context("cannot start a throwaway Redis");
                    }
                };
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
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use smartbeak_test_support::PostgresOptions;

    use super::*;

    const PASSWORD: &str = "s3cret-Pw";

    fn scram_server() -> PostgresServer {
        PostgresServer::start_with_options(PostgresOptions {
            password: Some(PASSWORD.to_owned()),
            ..PostgresOptions::default()
        })
        .unwrap()
    }

    #[test]
    fn urls_are_taken_apart_and_redis_urls_redacted() {
        assert_eq!(
            host_port("postgres://u:p@db:6000/x", 5432),
            Some(("db".into(), 6000))
        );
        assert_eq!(
            host_port("redis://127.0.0.1", 6379),
            Some(("127.0.0.1".into(), 6379))
        );
        assert_eq!(
            redact_redis("redis://:hunter2@cache:6380/0"),
            "redis://:***@cache:6380/0"
        );
        assert_eq!(redact_redis("redis://127.0.0.1"), "redis://127.0.0.1");
    }

    #[test]
    fn the_probe_logs_in_and_starts_own_servers_on_an_authentication_failure() {
        let pg = scram_server();
        let port = pg.port();
        // The port answers, but a login without the password is refused: own servers.
        let without = format!("postgres://postgres@127.0.0.1:{port}/postgres");
        match choose_postgres(Some(&without)) {
            PostgresChoice::StartOwn(why) => {
                assert!(
                    why.contains("refused the login (authentication failed)"),
                    "{why}"
                )
            }
            other => panic!("chose {other:?}"),
        }
        let wrong = format!("postgres://postgres@127.0.0.1:{port}/postgres?password=wrong-one");
        match choose_postgres(Some(&wrong)) {
            PostgresChoice::StartOwn(why) => {
                assert!(why.contains("authentication failed"), "{why}");
                assert!(
                    why.contains("password=***") && !why.contains("wrong-one"),
                    "{why}"
                );
            }
            other => panic!("chose {other:?}"),
        }
        // With the right password the server is used.
        assert!(matches!(
            choose_postgres(Some(&pg.url())),
            PostgresChoice::Use(_)
        ));
        // Nothing listening, and unset: own servers too.
        let closed = format!(
            "postgres://postgres@127.0.0.1:{}/postgres",
            smartbeak_test_support::free_port().unwrap()
        );
        assert!(matches!(
            choose_postgres(Some(&closed)),
            PostgresChoice::StartOwn(_)
        ));
        assert!(matches!(choose_postgres(None), PostgresChoice::StartOwn(_)));
    }

    #[test]
    fn passwords_go_through_the_environment_never_argv_nor_errors() {
        let url = SecretUrl::parse(
            "DATABASE_URL",
            "postgres://postgres:user%40pw@127.0.0.1:1/db?password=query-pw&sslmode=disable",
        )
        .unwrap();
        let cmd = psql_command(&url, "SELECT 1");
        let args: Vec<String> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert!(
            args.iter().all(|a| !a.contains("pw")),
            "a password on argv: {args:?}"
        );
        assert!(args.contains(&"postgres://postgres@127.0.0.1:1/db?sslmode=disable".to_owned()));
        assert!(args.contains(&"-w".to_owned()));
        let password = cmd
            .get_envs()
            .find(|(k, _)| *k == "PGPASSWORD")
            .and_then(|(_, v)| v)
            .map(|v| v.to_string_lossy().into_owned());
        assert_eq!(password.as_deref(), Some("query-pw"));
        let userinfo_only =
            SecretUrl::parse("DATABASE_URL", "postgres://u:user%40pw@h/db").unwrap();
        assert_eq!(
            split_password(&userinfo_only),
            ("postgres://u@h/db".to_owned(), Some("user@pw".to_owned()))
        );

        // Against a scram server: the login works through PGPASSWORD, and a failure's
        // message shows the URL redacted.
        let pg = scram_server();
        let url = SecretUrl::parse("DATABASE_URL", &pg.url()).unwrap();
        assert_eq!(psql_read(&url, "SELECT 1").unwrap().trim(), "1");
        let e = psql(&url.with_database("no_such_db"), "SELECT 1").unwrap_err();
        let message = format!("{e:#}");
        assert!(message.contains("postgres:***@127.0.0.1"), "{message}");
        assert!(!message.contains(PASSWORD), "{message}");
    }
}
