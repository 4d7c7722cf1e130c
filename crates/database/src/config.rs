//! Typed database configuration read from the environment, validated at start-up.
//!
//! Every knob has a default and an environment variable; a bad value fails with an error that
//! names the variable and the reason. The URLs are held as [`SecretUrl`], whose `Debug` and
//! `Display` never show the password.

use std::fmt;
use std::time::Duration;

use url::Url;

/// Why a configuration value was refused. Each variant names the environment variable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A required variable is not set (or is empty).
    #[error("{var} is not set")]
    Missing {
        /// The environment variable.
        var: &'static str,
    },
    /// A variable is set to a value that cannot be used.
    #[error("{var} is invalid: {reason}")]
    Invalid {
        /// The environment variable.
        var: &'static str,
        /// What is wrong with it (never contains a password).
        reason: String,
    },
}

/// A PostgreSQL connection URL whose password never reaches a log or an error message.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretUrl(Url);

impl SecretUrl {
    /// Parses and checks a `postgres://` URL; `var` names the variable in errors.
    pub fn parse(var: &'static str, raw: &str) -> Result<Self, ConfigError> {
        let url = Url::parse(raw.trim()).map_err(|e| ConfigError::Invalid {
            var,
            reason: format!("not a valid URL ({e})"),
        })?;
        if !matches!(url.scheme(), "postgres" | "postgresql") {
            return Err(ConfigError::Invalid {
                var,
                reason: format!(
                    "scheme must be postgres:// or postgresql://, not {}://",
                    url.scheme()
                ),
            });
        }
        if url.host_str().is_none_or(str::is_empty) && !url.query().unwrap_or("").contains("host=")
        {
            return Err(ConfigError::Invalid {
                var,
                reason: "the URL has no host".into(),
            });
        }
        // sqlx takes the user and the password from the query string too
        // (`?user=...&password=...`), and the query wins over the userinfo part.
        let user = url
            .query_pairs()
            .filter(|(key, _)| key == "user")
            .last()
            .map_or_else(
                || url.username().to_owned(),
                |(_, value)| value.into_owned(),
            );
        let placeholder = url.password().is_some_and(|p| is_placeholder(&user, p))
            || url
                .query_pairs()
                .any(|(key, value)| is_password_key(&key) && is_placeholder(&user, &value));
        if placeholder {
            return Err(ConfigError::Invalid {
                var,
                reason: format!(
                    "the URL carries placeholder credentials (user {user:?} with a placeholder password); set the real ones"
                ),
            });
        }
        Ok(Self(url))
    }

    /// The full URL, password included: only for handing to the driver.
    pub fn expose(&self) -> &str {
        self.0.as_str()
    }

    /// The URL with every password (`user:***@` and any `password=***` query parameter)
    /// replaced by `***`, safe to log.
    pub fn redacted(&self) -> String {
        let mut url = self.0.clone();
        if url.password().is_some() {
            // Cannot fail for a URL that already has a password (it has a host).
            let _ = url.set_password(Some("***"));
        }
        if url.query_pairs().any(|(key, _)| is_password_key(&key)) {
            let pairs: Vec<(String, String)> = url
                .query_pairs()
                .map(|(key, value)| {
                    let value = if is_password_key(&key) {
                        "***".to_owned()
                    } else {
                        value.into_owned()
                    };
                    (key.into_owned(), value)
                })
                .collect();
            url.query_pairs_mut().clear().extend_pairs(pairs);
        }
        url.to_string()
    }

    /// The same server with another database name (used by tests and xtask).
    pub fn with_database(&self, name: &str) -> Self {
        let mut url = self.0.clone();
        url.set_path(&format!("/{name}"));
        Self(url)
    }

    /// The database name in the URL path, if any.
    pub fn database(&self) -> Option<&str> {
        Some(self.0.path().trim_start_matches('/')).filter(|s| !s.is_empty())
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

/// A query parameter sqlx reads a password from (`password`; any case is masked).
fn is_password_key(key: &str) -> bool {
    key.eq_ignore_ascii_case("password")
}

fn is_placeholder(user: &str, password: &str) -> bool {
    const PASSWORDS: &[&str] = &[
        "password",
        "pass",
        "passwd",
        "changeme",
        "change-me",
        "change_me",
        "your_password",
        "yourpassword",
        "<password>",
        "placeholder",
        "xxx",
        "xxxx",
    ];
    let password = password.to_ascii_lowercase();
    PASSWORDS.contains(&password.as_str())
        || (matches!(user, "user" | "username" | "<user>") && password == "secret")
}

/// Pool and session settings for the primary database and the optional analytics replica.
#[derive(Debug, Clone)]
pub struct DatabaseConfig {
    /// `DATABASE_URL`: the primary database (required).
    pub url: SecretUrl,
    /// `ANALYTICS_DB_URL`: a read replica for analytics; `None` means reads use the primary.
    pub analytics_url: Option<SecretUrl>,
    /// `DB_STATEMENT_TIMEOUT_MS` (8000): the server cancels any statement running longer.
    /// It sits below the client bound ([`DatabaseConfig::query_timeout`]), which must not
    /// exceed the caller's deadline ([`DatabaseConfig::check_deadline`]).
    pub statement_timeout: Duration,
    /// `DB_IDLE_IN_TRANSACTION_TIMEOUT_MS` (60000): the server ends a session idle inside a
    /// transaction for longer.
    pub idle_in_transaction_timeout: Duration,
    /// `DB_LONG_READ_TIMEOUT_MS` (1800000): the server's `statement_timeout` inside a
    /// [`Snapshot`](crate::Snapshot) (long reads such as exports), set per transaction.
    pub long_read_timeout: Duration,
    /// `DB_STREAM_GAP_TIMEOUT_MS` (30000): a [`Snapshot`](crate::Snapshot)'s read fails when
    /// no row or frame arrived for this long (instead of a bound on the whole read).
    pub stream_gap_timeout: Duration,
    /// `DB_POOL_MIN` (2): connections kept open.
    pub pool_min: u32,
    /// `DB_POOL_MAX` (20): the most connections a pool opens.
    pub pool_max: u32,
    /// `DB_IDLE_TIMEOUT_MS` (30000): idle connections above `pool_min` close after this.
    pub idle_timeout: Duration,
    /// `DB_ACQUIRE_TIMEOUT_MS` (5000): how long a caller waits for a connection.
    pub acquire_timeout: Duration,
    /// `DB_MAX_LIFETIME_MS` (1800000): connections are retired after this age, less up to
    /// 2.5% of jitter so a pool does not reconnect all at once.
    pub max_lifetime: Duration,
    /// `DB_PING_BYPASS_MS` (1000): a connection used more recently than this is handed out
    /// without a liveness ping. The cost: a connection killed within this window of its last
    /// use costs its next user one error; `0` pings on every acquire.
    pub ping_bypass: Duration,
    /// `DB_TCP_KEEPALIVE` (true): ask the server to probe idle client sockets
    /// (`tcp_keepalives_idle/interval/count`), so it reaps backends of vanished clients.
    pub tcp_keepalive: bool,
    /// `DB_RUN_MIGRATIONS` (true): binaries apply pending migrations on start.
    pub run_migrations: bool,
    /// First delay before retrying a failed analytics pool set-up (5 s).
    pub analytics_retry_initial: Duration,
    /// Cap on that delay, which doubles after each failure (30 s).
    pub analytics_retry_max: Duration,
    /// `ANALYTICS_DB_PING_INTERVAL_MS` (5000): how often the replica in use is pinged; one
    /// failed ping drops it (reads fall back to the primary until it answers again).
    pub analytics_ping_interval: Duration,
}

impl DatabaseConfig {
    /// A configuration for `url` with every default.
    pub fn new(url: &str) -> Result<Self, ConfigError> {
        Ok(Self {
            url: SecretUrl::parse("DATABASE_URL", url)?,
            analytics_url: None,
            statement_timeout: Duration::from_millis(8_000),
            idle_in_transaction_timeout: Duration::from_millis(60_000),
            long_read_timeout: Duration::from_millis(30 * 60 * 1000),
            stream_gap_timeout: Duration::from_millis(30_000),
            pool_min: 2,
            pool_max: 20,
            idle_timeout: Duration::from_millis(30_000),
            acquire_timeout: Duration::from_millis(5_000),
            max_lifetime: Duration::from_millis(30 * 60 * 1000),
            ping_bypass: crate::PING_BYPASS,
            tcp_keepalive: true,
            run_migrations: true,
            analytics_retry_initial: Duration::from_secs(5),
            analytics_retry_max: Duration::from_secs(30),
            analytics_ping_interval: Duration::from_secs(5),
        })
    }

    /// Reads the configuration from the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads the configuration through `lookup` (the environment, or a map in tests).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let get = |var: &'static str| lookup(var).filter(|v| !v.trim().is_empty());
        let url = get("DATABASE_URL").ok_or(ConfigError::Missing {
            var: "DATABASE_URL",
        })?;
        let mut config = Self::new(&url)?;
        if let Some(raw) = get("ANALYTICS_DB_URL") {
            config.analytics_url = Some(SecretUrl::parse("ANALYTICS_DB_URL", &raw)?);
        }
        let millis = |var: &'static str, default: Duration| -> Result<Duration, ConfigError> {
            match get(var) {
                None => Ok(default),
                Some(raw) => parse_positive(var, &raw).map(Duration::from_millis),
            }
        };
        config.statement_timeout = millis("DB_STATEMENT_TIMEOUT_MS", config.statement_timeout)?;
        config.idle_in_transaction_timeout = millis(
            "DB_IDLE_IN_TRANSACTION_TIMEOUT_MS",
            config.idle_in_transaction_timeout,
        )?;
        config.long_read_timeout = millis("DB_LONG_READ_TIMEOUT_MS", config.long_read_timeout)?;
        config.stream_gap_timeout = millis("DB_STREAM_GAP_TIMEOUT_MS", config.stream_gap_timeout)?;
        config.idle_timeout = millis("DB_IDLE_TIMEOUT_MS", config.idle_timeout)?;
        config.acquire_timeout = millis("DB_ACQUIRE_TIMEOUT_MS", config.acquire_timeout)?;
        config.max_lifetime = millis("DB_MAX_LIFETIME_MS", config.max_lifetime)?;
        config.analytics_ping_interval = millis(
            "ANALYTICS_DB_PING_INTERVAL_MS",
            config.analytics_ping_interval,
        )?;
        config.ping_bypass = match get("DB_PING_BYPASS_MS") {
            None => config.ping_bypass,
            Some(raw) => Duration::from_millis(parse_count("DB_PING_BYPASS_MS", &raw, 0)?.into()),
        };
        if let Some(raw) = get("DB_POOL_MIN") {
            config.pool_min = parse_count("DB_POOL_MIN", &raw, 0)?;
        }
        if let Some(raw) = get("DB_POOL_MAX") {
            config.pool_max = parse_count("DB_POOL_MAX", &raw, 1)?;
        }
        if let Some(raw) = get("DB_TCP_KEEPALIVE") {
            config.tcp_keepalive = parse_bool("DB_TCP_KEEPALIVE", &raw)?;
        }
        if let Some(raw) = get("DB_RUN_MIGRATIONS") {
            config.run_migrations = parse_bool("DB_RUN_MIGRATIONS", &raw)?;
        }
        config.validate()?;
        Ok(config)
    }

    /// Checks the relations between values (for configs built in code).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.pool_max == 0 {
            return Err(ConfigError::Invalid {
                var: "DB_POOL_MAX",
                reason: "must be at least 1".into(),
            });
        }
        if self.pool_min > self.pool_max {
            return Err(ConfigError::Invalid {
                var: "DB_POOL_MIN",
                reason: format!(
                    "DB_POOL_MIN ({}) is greater than DB_POOL_MAX ({})",
                    self.pool_min, self.pool_max
                ),
            });
        }
        for (var, value) in [
            ("DB_STATEMENT_TIMEOUT_MS", self.statement_timeout),
            (
                "DB_IDLE_IN_TRANSACTION_TIMEOUT_MS",
                self.idle_in_transaction_timeout,
            ),
            ("DB_ACQUIRE_TIMEOUT_MS", self.acquire_timeout),
            ("DB_LONG_READ_TIMEOUT_MS", self.long_read_timeout),
            ("DB_STREAM_GAP_TIMEOUT_MS", self.stream_gap_timeout),
            ("DB_IDLE_TIMEOUT_MS", self.idle_timeout),
            ("DB_MAX_LIFETIME_MS", self.max_lifetime),
            (
                "ANALYTICS_DB_PING_INTERVAL_MS",
                self.analytics_ping_interval,
            ),
        ] {
            if value.is_zero() {
                return Err(ConfigError::Invalid {
                    var,
                    reason: "must be greater than 0".into(),
                });
            }
        }
        Ok(())
    }

    /// The client-side bound on one call of `Database::run` (acquire included):
    /// `statement_timeout` plus a margin (10%, at least 250 ms), so the server's
    /// cancellation normally wins and a black-holed connection still cannot hang a caller.
    /// Always above `statement_timeout`.
    pub fn query_timeout(&self) -> Duration {
        let margin = (self.statement_timeout / 10).max(Duration::from_millis(250));
        self.statement_timeout + margin
    }

    /// Checks that timeouts nest under a caller's deadline: `deadline` (the value of `var`,
    /// e.g. the api's `HTTP_REQUEST_TIMEOUT_MS`) >= the client bound
    /// ([`DatabaseConfig::query_timeout`]) > `DB_STATEMENT_TIMEOUT_MS`. A caller that gives
    /// up first would leave its statement running and its connection checked out after it
    /// has answered. The error names both variables.
    pub fn check_deadline(&self, var: &'static str, deadline: Duration) -> Result<(), ConfigError> {
        let bound = self.query_timeout();
        if deadline < bound {
            return Err(ConfigError::Invalid {
                var,
                reason: format!(
                    "{var} ({} ms) is below the database client bound of {} ms \
                     (DB_STATEMENT_TIMEOUT_MS {} ms plus a margin of 10%, at least 250 ms): \
                     raise {var} or lower DB_STATEMENT_TIMEOUT_MS",
                    deadline.as_millis(),
                    bound.as_millis(),
                    self.statement_timeout.as_millis()
                ),
            });
        }
        Ok(())
    }
}

fn parse_positive(var: &'static str, raw: &str) -> Result<u64, ConfigError> {
    let value: u64 = raw.trim().parse().map_err(|_| ConfigError::Invalid {
        var,
        reason: format!("{raw:?} is not a whole number of milliseconds"),
    })?;
    if value == 0 {
        return Err(ConfigError::Invalid {
            var,
            reason: "must be greater than 0".into(),
        });
    }
    Ok(value)
}

fn parse_count(var: &'static str, raw: &str, min: u32) -> Result<u32, ConfigError> {
    let value: u32 = raw.trim().parse().map_err(|_| ConfigError::Invalid {
        var,
        reason: format!("{raw:?} is not a whole number"),
    })?;
    if value < min {
        return Err(ConfigError::Invalid {
            var,
            reason: format!("must be at least {min}"),
        });
    }
    Ok(value)
}

fn parse_bool(var: &'static str, raw: &str) -> Result<bool, ConfigError> {
    match raw.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(ConfigError::Invalid {
            var,
            reason: format!("{raw:?} is not a boolean (true/false)"),
        }),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::collections::HashMap;

    use super::*;

    fn lookup(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    const URL: &str = "postgres://app:s3cr3t-Value@db.internal:5432/smartbeak";

    fn err(pairs: &[(&str, &str)]) -> ConfigError {
        DatabaseConfig::from_lookup(lookup(pairs)).unwrap_err()
    }

    #[test]
    fn defaults_match_the_documented_values() {
        let c = DatabaseConfig::from_lookup(lookup(&[("DATABASE_URL", URL)])).unwrap();
        assert_eq!(c.statement_timeout, Duration::from_millis(8_000));
        assert_eq!(c.analytics_ping_interval, Duration::from_secs(5));
        assert_eq!(c.long_read_timeout, Duration::from_secs(30 * 60));
        assert_eq!(c.stream_gap_timeout, Duration::from_secs(30));
        assert_eq!(c.idle_in_transaction_timeout, Duration::from_millis(60_000));
        assert_eq!((c.pool_min, c.pool_max), (2, 20));
        assert_eq!(c.idle_timeout, Duration::from_millis(30_000));
        assert_eq!(c.acquire_timeout, Duration::from_millis(5_000));
        assert_eq!(c.max_lifetime, Duration::from_secs(1800));
        assert_eq!(c.ping_bypass, Duration::from_secs(1));
        assert!(c.tcp_keepalive);
        assert!(c.analytics_url.is_none());
    }

    #[test]
    fn every_knob_is_overridable() {
        let c = DatabaseConfig::from_lookup(lookup(&[
            ("DATABASE_URL", URL),
            ("ANALYTICS_DB_URL", "postgres://ro@replica/smartbeak"),
            ("DB_STATEMENT_TIMEOUT_MS", "300"),
            ("DB_IDLE_IN_TRANSACTION_TIMEOUT_MS", "400"),
            ("DB_POOL_MIN", "0"),
            ("DB_POOL_MAX", "5"),
            ("DB_IDLE_TIMEOUT_MS", "1000"),
            ("DB_ACQUIRE_TIMEOUT_MS", "200"),
            ("DB_MAX_LIFETIME_MS", "60000"),
            ("DB_PING_BYPASS_MS", "0"),
            ("DB_TCP_KEEPALIVE", "false"),
            ("DB_RUN_MIGRATIONS", "0"),
        ]))
        .unwrap();
        assert_eq!(c.statement_timeout, Duration::from_millis(300));
        assert_eq!(c.idle_in_transaction_timeout, Duration::from_millis(400));
        assert_eq!((c.pool_min, c.pool_max), (0, 5));
        assert_eq!(c.idle_timeout, Duration::from_millis(1000));
        assert_eq!(c.acquire_timeout, Duration::from_millis(200));
        assert_eq!(c.max_lifetime, Duration::from_millis(60_000));
        assert_eq!(c.ping_bypass, Duration::ZERO);
        assert!(!c.tcp_keepalive && !c.run_migrations);
        assert!(c.analytics_url.is_some());
    }

    #[test]
    fn missing_url_is_named() {
        assert_eq!(
            err(&[]),
            ConfigError::Missing {
                var: "DATABASE_URL"
            }
        );
        assert_eq!(err(&[]).to_string(), "DATABASE_URL is not set");
    }

    #[test]
    fn each_bad_value_gets_its_own_error() {
        let cases: &[(&str, &str, &str)] = &[
            ("DB_STATEMENT_TIMEOUT_MS", "abc", "not a whole number"),
            ("DB_STATEMENT_TIMEOUT_MS", "0", "greater than 0"),
            ("DB_STATEMENT_TIMEOUT_MS", "-5", "not a whole number"),
            (
                "DB_IDLE_IN_TRANSACTION_TIMEOUT_MS",
                "1.5",
                "not a whole number",
            ),
            ("DB_POOL_MIN", "two", "not a whole number"),
            ("DB_POOL_MAX", "0", "at least 1"),
            ("DB_IDLE_TIMEOUT_MS", "x", "not a whole number"),
            ("DB_ACQUIRE_TIMEOUT_MS", "5s", "not a whole number"),
            ("DB_MAX_LIFETIME_MS", "", "unused: empty means default"),
            ("DB_TCP_KEEPALIVE", "maybe", "not a boolean"),
            ("DB_PING_BYPASS_MS", "1s", "not a whole number"),
        ];
        for (var, value, reason) in cases {
            let result =
                DatabaseConfig::from_lookup(lookup(&[("DATABASE_URL", URL), (var, value)]));
            if value.is_empty() {
                assert!(
                    result.is_ok(),
                    "{var}={value:?} should fall back to the default"
                );
                continue;
            }
            match result {
                Err(ConfigError::Invalid { var: v, reason: r }) => {
                    assert_eq!(&v, var);
                    assert!(r.contains(reason), "{var}={value:?}: {r}");
                }
                other => panic!("{var}={value:?} gave {other:?}"),
            }
        }
    }

    #[test]
    fn min_above_max_is_refused() {
        let e = err(&[
            ("DATABASE_URL", URL),
            ("DB_POOL_MIN", "30"),
            ("DB_POOL_MAX", "20"),
        ]);
        assert_eq!(
            e.to_string(),
            "DB_POOL_MIN is invalid: DB_POOL_MIN (30) is greater than DB_POOL_MAX (20)"
        );
    }

    #[test]
    fn placeholder_credentials_are_refused() {
        for url in [
            "postgres://user:password@localhost/db",
            "postgres://postgres:changeme@localhost/db",
            "postgresql://username:secret@localhost/db",
        ] {
            let e = err(&[("DATABASE_URL", url)]);
            assert!(
                e.to_string().contains("placeholder credentials"),
                "{url}: {e}"
            );
            assert!(!e.to_string().contains("changeme"), "password leaked: {e}");
        }
        let e = err(&[
            ("DATABASE_URL", URL),
            ("ANALYTICS_DB_URL", "postgres://user:password@r/db"),
        ]);
        assert!(matches!(
            e,
            ConfigError::Invalid {
                var: "ANALYTICS_DB_URL",
                ..
            }
        ));
    }

    #[test]
    fn malformed_urls_are_refused() {
        assert!(
            err(&[("DATABASE_URL", "not a url")])
                .to_string()
                .starts_with("DATABASE_URL is invalid: not a valid URL")
        );
        assert!(
            err(&[("DATABASE_URL", "mysql://a@b/c")])
                .to_string()
                .contains("scheme must be postgres")
        );
    }

    #[test]
    fn the_password_never_shows() {
        let c = DatabaseConfig::from_lookup(lookup(&[("DATABASE_URL", URL)])).unwrap();
        let debug = format!("{c:?}");
        assert!(!debug.contains("s3cr3t"), "{debug}");
        assert!(debug.contains("app:***@db.internal"), "{debug}");
        assert_eq!(
            c.url.to_string(),
            "postgres://app:***@db.internal:5432/smartbeak"
        );
        assert!(c.url.expose().contains("s3cr3t"));
    }

    #[test]
    fn a_password_in_the_query_string_never_shows() {
        for raw in [
            "postgres://app@db.internal:5432/smartbeak?sslmode=disable&password=s3cr3t-Value&application_name=x",
            "postgres://app:s3cr3t-Value@db.internal/smartbeak?password=s3cr3t-Value",
            "postgres://db.internal/smartbeak?user=app&Password=s3cr3t-Value",
            "postgres://db.internal/smartbeak?password=s3cr3t%26Value%3D",
        ] {
            let c = DatabaseConfig::from_lookup(lookup(&[
                ("DATABASE_URL", raw),
                ("ANALYTICS_DB_URL", raw),
            ]))
            .unwrap();
            let shown = [
                format!("{c:?}"),
                format!("{:?}", c.url),
                c.url.to_string(),
                c.url.redacted(),
                crate::DbError::Connect {
                    target: "primary",
                    url: c.url.redacted(),
                    source: sqlx::Error::PoolClosed,
                }
                .to_string(),
            ];
            for text in shown {
                assert!(!text.contains("s3cr3t"), "{raw}: {text}");
                assert!(text.contains("assword=***"), "{raw}: {text}");
            }
            assert!(c.url.expose().contains("s3cr3t"), "the driver gets it");
        }
        // Other parameters survive the masking.
        let url = SecretUrl::parse(
            "DATABASE_URL",
            "postgres://db/x?sslmode=disable&password=p4ss&application_name=api",
        )
        .unwrap();
        assert_eq!(
            url.redacted(),
            "postgres://db/x?sslmode=disable&password=***&application_name=api"
        );
    }

    #[test]
    fn placeholder_passwords_in_the_query_string_are_refused() {
        for url in [
            "postgres://app@localhost/db?password=password",
            "postgres://localhost/db?user=postgres&password=changeme",
            "postgres://localhost/db?user=username&password=secret",
            "postgres://user@localhost/db?sslmode=disable&PASSWORD=xxx",
        ] {
            let e = err(&[("DATABASE_URL", url)]);
            assert!(
                e.to_string().contains("placeholder credentials"),
                "{url}: {e}"
            );
            assert!(!e.to_string().contains("changeme"), "password leaked: {e}");
        }
        let e = err(&[
            ("DATABASE_URL", URL),
            (
                "ANALYTICS_DB_URL",
                "postgres://r/db?user=user&password=secret",
            ),
        ]);
        assert!(matches!(
            e,
            ConfigError::Invalid {
                var: "ANALYTICS_DB_URL",
                ..
            }
        ));
        // A real password in the query is accepted.
        assert!(SecretUrl::parse("DATABASE_URL", "postgres://h/db?password=Xk9-real").is_ok());
    }

    #[test]
    fn query_timeout_sits_a_little_above_the_statement_timeout() {
        let mut c = DatabaseConfig::new(URL).unwrap();
        assert_eq!(c.query_timeout(), Duration::from_millis(8_800));
        c.statement_timeout = Duration::from_millis(30_000);
        assert_eq!(c.query_timeout(), Duration::from_millis(33_000));
        c.statement_timeout = Duration::from_millis(300);
        assert_eq!(c.query_timeout(), Duration::from_millis(550));
    }

    #[test]
    fn a_caller_deadline_below_the_client_bound_is_refused_naming_both_variables() {
        let mut c = DatabaseConfig::new(URL).unwrap();
        // The defaults nest under the api's default request timeout of 10 s.
        assert!(
            c.check_deadline("HTTP_REQUEST_TIMEOUT_MS", Duration::from_secs(10))
                .is_ok()
        );
        assert!(c.check_deadline("X_MS", c.query_timeout()).is_ok());
        c.statement_timeout = Duration::from_millis(30_000);
        let e = c
            .check_deadline("HTTP_REQUEST_TIMEOUT_MS", Duration::from_secs(10))
            .unwrap_err();
        assert!(
            matches!(
                e,
                ConfigError::Invalid {
                    var: "HTTP_REQUEST_TIMEOUT_MS",
                    ..
                }
            ),
            "{e:?}"
        );
        let text = e.to_string();
        for part in [
            "HTTP_REQUEST_TIMEOUT_MS (10000 ms)",
            "33000 ms",
            "DB_STATEMENT_TIMEOUT_MS 30000 ms",
        ] {
            assert!(text.contains(part), "{part:?} missing from {text}");
        }
        // Just below the bound is refused too.
        let e = c.check_deadline("X_MS", c.query_timeout() - Duration::from_millis(1));
        assert!(e.is_err());
    }
}
