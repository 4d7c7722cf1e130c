//! The database layer against a real PostgreSQL: each test makes its own fresh database
//! (`TestDatabase`) and counts backends server-side, by `application_name`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU8, Ordering};
use std::time::{Duration, Instant};

use futures::future::join_all;
use smartbeak_database::testing::{self, TestDatabase};
use smartbeak_database::{Database, DatabaseConfig, DbError, ReadSource};
use sqlx::PgPool;

/// A fresh database, a pool on it with a unique application_name, and an admin pool that
/// observes the server.
struct Fixture {
    tdb: TestDatabase,
    db: Database,
    admin: PgPool,
    app: String,
}

impl Fixture {
    async fn new(tune: impl FnOnce(&mut DatabaseConfig)) -> Self {
        let tdb = TestDatabase::create().await.expect("create test database");
        let mut config = tdb.config();
        tune(&mut config);
        let app = format!("sbt-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let db = Database::connect(config, &app).await.expect("connect");
        let admin = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect(tdb.url().expose())
            .await
            .expect("admin pool");
        Self {
            tdb,
            db,
            admin,
            app,
        }
    }

    async fn backends(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE application_name = $1")
            .bind(&self.app)
            .fetch_one(&self.admin)
            .await
            .unwrap()
    }

    async fn finish(self) {
        self.db.close(Duration::from_secs(5)).await.unwrap();
        self.admin.close().await;
        self.tdb.drop_database().await.unwrap();
    }
}

/// Polls `check` every 20 ms until it holds, for at most `bound`.
async fn eventually<F, Fut>(bound: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + bound;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// True if the session is inside a transaction: two statements in a row see the same
/// `now()` (the transaction's start), which autocommit statements never do.
async fn inside_transaction(conn: &mut sqlx::PgConnection) -> bool {
    let a: String = sqlx::query_scalar("SELECT now()::text")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    let b: String = sqlx::query_scalar("SELECT now()::text")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    a == b
}

#[tokio::test]
async fn statement_timeout_is_enforced_by_the_server_and_the_pool_survives() {
    let fx = Fixture::new(|c| c.statement_timeout = Duration::from_millis(300)).await;
    let started = Instant::now();
    let result = fx
        .db
        .run(async |conn| sqlx::query("SELECT pg_sleep(5)").execute(conn).await)
        .await;
    let elapsed = started.elapsed();
    let err = result.expect_err("pg_sleep(5) must be cancelled");
    assert!(matches!(err, DbError::StatementTimeout(_)), "{err:?}");
    if let DbError::StatementTimeout(sqlx::Error::Database(e)) = &err {
        assert_eq!(e.code().as_deref(), Some("57014"));
    }
    assert!(err.is_timeout());
    // Cancelled by the server near 300 ms, well before the client-side bound (550 ms).
    assert!(elapsed < fx.db.config().query_timeout(), "{elapsed:?}");
    let one: i32 = fx
        .db
        .run(async |conn| sqlx::query_scalar("SELECT 1").fetch_one(conn).await)
        .await
        .expect("pool usable after the cancellation");
    assert_eq!(one, 1);
    assert_eq!(fx.db.metrics().query_timeouts_total, 1);
    fx.finish().await;
}

#[tokio::test]
async fn idle_transaction_is_terminated_and_the_next_acquire_is_healthy() {
    let fx = Fixture::new(|c| {
        c.idle_in_transaction_timeout = Duration::from_millis(200);
        c.pool_min = 0;
        c.pool_max = 2;
    })
    .await;
    let mut tx = fx.db.begin().await.unwrap();
    let pid: i32 = tx
        .run(async |conn| {
            sqlx::query_scalar("SELECT pg_backend_pid()")
                .fetch_one(conn)
                .await
        })
        .await
        .unwrap();
    // Leave the transaction idle; the server must end that session on its own.
    let admin = fx.admin.clone();
    let gone = eventually(Duration::from_secs(5), || {
        let admin = admin.clone();
        async move {
            let n: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE pid = $1")
                .bind(pid)
                .fetch_one(&admin)
                .await
                .unwrap();
            n == 0
        }
    })
    .await;
    assert!(
        gone,
        "backend {pid} still alive after the idle-in-transaction timeout"
    );
    assert!(
        tx.run(async |conn| sqlx::query("SELECT 1").execute(conn).await)
            .await
            .is_err()
    );
    drop(tx);
    for _ in 0..5 {
        let mut conn = fx.db.acquire().await.unwrap();
        assert!(!inside_transaction(&mut conn).await);
    }
    fx.finish().await;
}

#[tokio::test]
async fn two_hundred_acquirers_never_exceed_max_and_late_ones_time_out() {
    let fx = Fixture::new(|c| {
        c.pool_max = 20;
        c.pool_min = 0;
        c.acquire_timeout = Duration::from_millis(300);
    })
    .await;
    let peak = Arc::new(AtomicI64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (admin, app, peak, done) =
            (fx.admin.clone(), fx.app.clone(), peak.clone(), done.clone());
        tokio::spawn(async move {
            while !done.load(Ordering::Relaxed) {
                let n: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
                )
                .bind(&app)
                .fetch_one(&admin)
                .await
                .unwrap();
                peak.fetch_max(n, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let started = Instant::now();
    let results = join_all((0..200).map(|_| {
        let db = fx.db.clone();
        async move {
            let mut conn = db.acquire().await?;
            sqlx::query("SELECT pg_sleep(0.1)")
                .execute(&mut *conn)
                .await
                .map_err(DbError::Query)?;
            Ok::<_, DbError>(())
        }
    }))
    .await;
    let elapsed = started.elapsed();
    done.store(true, Ordering::Relaxed);
    sampler.await.unwrap();
    let ok = results.iter().filter(|r| r.is_ok()).count();
    let timed_out = results
        .iter()
        .filter(|r| {
            matches!(
                r,
                Err(DbError::AcquireTimeout(_) | DbError::PoolSaturated(_))
            )
        })
        .count();
    // Connections kept coming back while the rest waited: saturation, not an outage.
    let saturated = results
        .iter()
        .filter(|r| matches!(r, Err(DbError::PoolSaturated(_))))
        .count();
    assert_eq!(
        ok + timed_out,
        200,
        "only successes and acquire timeouts: {results:?}"
    );
    assert!(ok >= 20, "at least one full pool of work ran: {ok}");
    assert!(
        timed_out > 0,
        "200 x 100 ms through 20 connections cannot fit in 300 ms"
    );
    let peak = peak.load(Ordering::Relaxed);
    assert!(peak <= 20, "server saw {peak} backends for a pool of 20");
    assert!(peak > 0, "the sampler never saw the pool");
    // No hang: everyone got an answer a little after the acquire timeout.
    assert!(elapsed < Duration::from_secs(10), "{elapsed:?}");
    assert!(
        saturated > 0,
        "the pool served 100 ms queries all along: its timeouts are saturation ({timed_out} timed out)"
    );
    let message = results
        .iter()
        .find_map(|r| match r {
            Err(e @ DbError::PoolSaturated(_)) => Some(e.to_string()),
            _ => None,
        })
        .unwrap();
    assert!(
        message.contains("busy") && message.contains("connection"),
        "{message}"
    );
    assert_eq!(fx.db.metrics().acquire_timeouts_total as usize, timed_out);
    fx.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_thousand_queries_reuse_at_most_max_connections() {
    let fx = Fixture::new(|c| {
        c.pool_max = 20;
        c.pool_min = 2;
    })
    .await;
    let run = |n: usize| {
        let db = fx.db.clone();
        async move {
            let pids: Vec<i32> = futures::stream::iter(0..n)
                .map(|_| {
                    let db = db.clone();
                    async move {
                        db.run(async |conn| {
                            sqlx::query_scalar::<_, i32>("SELECT pg_backend_pid()")
                                .fetch_one(conn)
                                .await
                        })
                        .await
                        .unwrap()
                    }
                })
                .buffer_unordered(20)
                .collect()
                .await;
            pids.into_iter().collect::<HashSet<i32>>()
        }
    };
    use futures::StreamExt;
    // Sessions the server opened on this database, from its statistics (a backend reports
    // its start with its first transaction); not pids, which the OS may reuse.
    let sessions = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT sessions FROM pg_stat_database WHERE datname = current_database()",
        )
        .fetch_one(&fx.admin)
        .await
        .unwrap()
    };
    let warm = run(500).await;
    let before = sessions().await;
    let steady = run(5_000).await;
    let after = sessions().await;
    assert_eq!(after - before, 0, "sessions opened after warm-up");
    let all: HashSet<i32> = warm.union(&steady).copied().collect();
    assert!(
        all.len() <= 20,
        "{} distinct backends for a pool of 20",
        all.len()
    );
    let new_after_warmup: Vec<_> = steady.difference(&warm).collect();
    assert!(
        new_after_warmup.is_empty(),
        "sessions opened after warm-up: {new_after_warmup:?}"
    );
    fx.finish().await;
}

#[tokio::test]
async fn every_connection_carries_the_session_timeouts() {
    let fx = Fixture::new(|c| {
        c.pool_max = 8;
        c.statement_timeout = Duration::from_millis(1234);
        c.idle_in_transaction_timeout = Duration::from_millis(5678);
    })
    .await;
    let mut conns = Vec::new();
    for _ in 0..8 {
        conns.push(fx.db.acquire().await.unwrap());
    }
    let mut pids = HashSet::new();
    for conn in &mut conns {
        let st: String = sqlx::query_scalar("SHOW statement_timeout")
            .fetch_one(&mut **conn)
            .await
            .unwrap();
        let it: String = sqlx::query_scalar("SHOW idle_in_transaction_session_timeout")
            .fetch_one(&mut **conn)
            .await
            .unwrap();
        let ka: (String, String, String) = sqlx::query_as(
            "SELECT current_setting('tcp_keepalives_idle'), \
             current_setting('tcp_keepalives_interval'), current_setting('tcp_keepalives_count')",
        )
        .fetch_one(&mut **conn)
        .await
        .unwrap();
        let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(&mut **conn)
            .await
            .unwrap();
        assert_eq!(st, "1234ms");
        assert_eq!(it, "5678ms");
        // Over TCP the server reports what we asked for, in seconds ("0" would mean the
        // system default, as on a Unix socket, where keepalives do not apply).
        assert_eq!(ka, ("60".into(), "10".into(), "6".into()));
        pids.insert(pid);
    }
    assert_eq!(pids.len(), 8, "eight distinct sessions");
    assert_eq!(fx.backends().await, 8);
    drop(conns);
    fx.finish().await;
}

/// Issue 10, item 5: the session settings are the client's (`pg_settings.source`) and
/// outlive `DISCARD ALL` (which a pooler runs between clients): startup-packet values are
/// the session's reset values.
#[tokio::test]
async fn session_settings_come_from_the_client_and_survive_discard_all() {
    let fx = Fixture::new(|c| {
        c.statement_timeout = Duration::from_millis(1234);
        c.idle_in_transaction_timeout = Duration::from_millis(5678);
    })
    .await;
    let rows: Vec<(String, String, String)> = fx
        .db
        .run(async |conn| {
            sqlx::query("SET statement_timeout = 1")
                .execute(&mut *conn)
                .await?;
            sqlx::query("DISCARD ALL").execute(&mut *conn).await?;
            sqlx::query_as(
                "SELECT name, setting, source FROM pg_settings \
                 WHERE name IN ('statement_timeout', 'idle_in_transaction_session_timeout') \
                 ORDER BY name",
            )
            .fetch_all(conn)
            .await
        })
        .await
        .unwrap();
    assert_eq!(
        rows,
        [
            (
                "idle_in_transaction_session_timeout".into(),
                "5678".into(),
                "client".into()
            ),
            ("statement_timeout".into(), "1234".into(), "client".into()),
        ]
    );
    fx.finish().await;
}

/// A proxy that drops the `options` parameter from every startup packet, as PgBouncer does
/// with `ignore_startup_parameters = options`. The URL through it has `sslmode=disable`, so
/// the first client message is the startup packet.
async fn options_dropping_pooler(tdb: &TestDatabase) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut url = url::Url::parse(tdb.url().expose()).unwrap();
    let upstream = format!("{}:{}", url.host_str().unwrap(), url.port().unwrap_or(5432));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    url.set_port(Some(listener.local_addr().unwrap().port()))
        .unwrap();
    url.query_pairs_mut().append_pair("sslmode", "disable");
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let upstream = upstream.clone();
            tokio::spawn(async move {
                let mut len = [0u8; 4];
                if client.read_exact(&mut len).await.is_err() {
                    return;
                }
                let mut body = vec![0u8; (u32::from_be_bytes(len) as usize).saturating_sub(4)];
                if client.read_exact(&mut body).await.is_err() || body.len() < 4 {
                    return;
                }
                let mut fields = body[4..].split(|b| *b == 0).collect::<Vec<_>>();
                fields.retain(|f| !f.is_empty());
                let mut rebuilt = body[..4].to_vec();
                for pair in fields.chunks(2) {
                    if pair[0] == b"options" || pair.len() < 2 {
                        continue;
                    }
                    for part in pair {
                        rebuilt.extend_from_slice(part);
                        rebuilt.push(0);
                    }
                }
                rebuilt.push(0);
                let mut packet = u32::try_from(rebuilt.len() + 4)
                    .unwrap()
                    .to_be_bytes()
                    .to_vec();
                packet.extend_from_slice(&rebuilt);
                let Ok(mut server) = tokio::net::TcpStream::connect(&upstream).await else {
                    return;
                };
                if server.write_all(&packet).await.is_ok() {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                }
            });
        }
    });
    url.to_string()
}

/// Issue 10, item 5: behind a pooler that drops the startup `options`, every statement
/// would run without its timeout; `connect` refuses to start instead, naming the setting.
#[tokio::test]
async fn a_pooler_that_drops_the_session_settings_is_refused_at_connect() {
    let tdb = TestDatabase::create().await.unwrap();
    let url = options_dropping_pooler(&tdb).await;
    let config = DatabaseConfig::new(&url).unwrap();
    let err = Database::connect(config, &unique_app("sbt-pooler"))
        .await
        .expect_err("the server runs without our statement_timeout");
    match &err {
        DbError::SettingsIgnored {
            target: "primary",
            setting: "statement_timeout",
            actual,
            expected,
        } => {
            assert_eq!(actual, "0", "the server default");
            assert_eq!(expected, "8000");
        }
        other => panic!("{other:?}"),
    }
    let message = err.to_string();
    assert!(
        message.contains("statement_timeout") && message.contains("PgBouncer"),
        "{message}"
    );
    // Straight to the server, the same settings are applied and accepted.
    let direct = Database::connect(tdb.config(), &unique_app("sbt-direct"))
        .await
        .unwrap();
    direct.close(Duration::from_secs(5)).await.unwrap();
    tdb.drop_database().await.unwrap();
}

/// Issue 10, item 7: the cost of the ping bypass, measured. A connection whose backend is
/// killed within `ping_bypass` of its last use is handed out unpinged, and its next user
/// gets one error; sqlx then discards it. So killing every idle connection costs exactly
/// one error per connection, and nothing after that.
#[tokio::test]
async fn a_backend_killed_within_the_ping_bypass_costs_its_next_user_one_error() {
    let fx = Fixture::new(|c| {
        c.pool_max = 5;
        c.pool_min = 0;
        // Every reuse in this test falls inside the bypass.
        c.ping_bypass = Duration::from_secs(600);
    })
    .await;
    let conns = join_all((0..5).map(|_| fx.db.acquire())).await;
    assert!(conns.iter().all(Result::is_ok));
    drop(conns);
    assert!(
        eventually(Duration::from_secs(5), || async {
            fx.db.metrics().primary.idle == 5
        })
        .await
    );
    let killed: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
    )
    .bind(&fx.app)
    .fetch_all(&fx.admin)
    .await
    .unwrap();
    assert_eq!(killed, [true; 5]);
    assert!(
        eventually(Duration::from_secs(5), || async {
            fx.backends().await == 0
        })
        .await
    );
    let mut outcomes = Vec::new();
    for _ in 0..20 {
        let result = fx
            .db
            .run(async |conn| {
                sqlx::query_scalar::<_, i32>("SELECT 1")
                    .fetch_one(conn)
                    .await
            })
            .await;
        if let Err(e) = &result {
            // The server ended the session (57P01 admin_shutdown, or the closed socket): a
            // connection failure, never a statement error (the api answers 503, not 500).
            assert!(e.is_connection_failure(), "{e:?}");
        }
        outcomes.push(result.is_ok());
    }
    let errors = outcomes.iter().filter(|ok| !**ok).count();
    assert_eq!(errors, 5, "one error per killed connection: {outcomes:?}");
    assert!(
        outcomes[5..].iter().all(|ok| *ok),
        "the errors come first, one per dead connection, then none: {outcomes:?}"
    );
    fx.finish().await;
}

#[tokio::test]
async fn terminated_backends_are_replaced_without_errors() {
    let fx = Fixture::new(|c| {
        c.pool_max = 5;
        c.pool_min = 0;
        c.ping_bypass = Duration::from_millis(100);
    })
    .await;
    // Open five connections, then give them back.
    let conns = join_all((0..5).map(|_| fx.db.acquire())).await;
    drop(conns);
    let killed: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
    )
    .bind(&fx.app)
    .fetch_all(&fx.admin)
    .await
    .unwrap();
    assert_eq!(killed.len(), 5);
    assert!(
        eventually(Duration::from_secs(5), || async {
            fx.backends().await == 0
        })
        .await
    );
    // This test is about connections idle for longer than the bypass: they are pinged, so
    // no user sees the kill. (Inside the bypass the kill costs one error per connection:
    // the test above.)
    tokio::time::sleep(fx.db.config().ping_bypass).await;
    for i in 0..50 {
        let one: i32 = fx
            .db
            .run(async |conn| sqlx::query_scalar("SELECT 1").fetch_one(conn).await)
            .await
            .unwrap_or_else(|e| panic!("request {i} failed after the kill: {e:?}"));
        assert_eq!(one, 1);
    }
    assert!(fx.backends().await >= 1);
    fx.finish().await;
}

#[tokio::test]
async fn a_cancelled_acquire_stops_counting_as_a_waiter() {
    let fx = Fixture::new(|c| {
        c.pool_max = 1;
        c.pool_min = 0;
    })
    .await;
    let held = fx.db.acquire().await.unwrap();
    for _ in 0..3 {
        let cancelled = tokio::time::timeout(Duration::from_millis(50), fx.db.acquire()).await;
        assert!(cancelled.is_err(), "the only connection is held");
    }
    assert_eq!(
        fx.db.metrics().waiters,
        0,
        "cancelled acquires still counted"
    );
    // A cancelled begin: its task keeps waiting until the acquire timeout, then stops.
    let cancelled = tokio::time::timeout(Duration::from_millis(50), fx.db.begin()).await;
    assert!(cancelled.is_err());
    drop(held);
    assert!(
        eventually(Duration::from_secs(10), || async {
            fx.db.metrics().waiters == 0
        })
        .await
    );
    fx.finish().await;
}

#[tokio::test]
async fn pool_stats_count_connections_held_and_idle() {
    let fx = Fixture::new(|c| {
        c.pool_max = 5;
        c.pool_min = 0;
    })
    .await;
    let before = fx.db.metrics();
    assert_eq!(before.primary.max, 5);
    assert_eq!(before.primary.in_use, 0);
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(fx.db.acquire().await.unwrap());
    }
    let m = fx.db.metrics();
    assert_eq!(
        (
            m.primary.size,
            m.primary.idle,
            m.primary.in_use,
            m.primary.max
        ),
        (3, 0, 3, 5),
        "{m:?}"
    );
    assert_eq!(m.acquires_total, 3);
    assert_eq!(m.waiters, 0);
    assert!(m.acquire_seconds_sum > 0.0);
    assert_eq!(fx.backends().await, 3, "the server sees the same");

    // Connections go back to the pool asynchronously.
    held.truncate(1);
    assert!(
        eventually(Duration::from_secs(5), || async {
            let p = fx.db.metrics().primary;
            (p.size, p.idle, p.in_use) == (3, 2, 1)
        })
        .await,
        "{:?}",
        fx.db.metrics().primary
    );

    // `begin` counts its connection like `acquire`.
    let tx = fx.db.begin().await.unwrap();
    let m = fx.db.metrics();
    assert_eq!(m.acquires_total, 4);
    assert_eq!((m.primary.idle, m.primary.in_use), (1, 2));
    tx.rollback().await.unwrap();
    drop(held);
    fx.finish().await;
}

/// A TCP proxy in front of PostgreSQL that delays every chunk from the server by `delay`
/// (so a `BEGIN` takes a known time on the wire and a caller can be cancelled while it is
/// in flight) and black-holes connections as a dead network path does: it stops forwarding
/// the server's bytes but keeps every socket open. [`Proxy::freeze`] black-holes every
/// connection, new ones included; [`Proxy::black_hole_queries`] lets a new connection
/// finish its start-up (up to the server's first ReadyForQuery) and black-holes it after
/// that. [`Proxy::restore`] lets new connections through again; a connection that was
/// black-holed stays dead (its sockets stay open, nothing is ever forwarded), as one whose
/// path state was lost.
struct Proxy {
    port: u16,
    mode: Arc<AtomicU8>,
}

const PASS: u8 = 0;
const FREEZE: u8 = 1;
const AFTER_STARTUP: u8 = 2;
const AFTER_NEXT_READY: u8 = 3;

/// Follows the server's message stream: `ready` once start-up is over (the first
/// ReadyForQuery, type `Z`), `readies` counts every ReadyForQuery.
#[derive(Default)]
struct StartupTracker {
    started: bool,
    header: Vec<u8>,
    remaining: usize,
    ready: bool,
    readies: u64,
}

impl StartupTracker {
    fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if !self.started {
                self.started = true;
                // The one-byte answer to an SSLRequest comes before any message.
                if matches!(bytes[0], b'N' | b'S') {
                    bytes = &bytes[1..];
                    continue;
                }
            }
            if self.remaining > 0 {
                let n = self.remaining.min(bytes.len());
                self.remaining -= n;
                bytes = &bytes[n..];
                continue;
            }
            let need = 5 - self.header.len();
            let n = need.min(bytes.len());
            self.header.extend_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
            if self.header.len() == 5 {
                let len = u32::from_be_bytes([
                    self.header[1],
                    self.header[2],
                    self.header[3],
                    self.header[4],
                ]);
                if self.header[0] == b'Z' {
                    self.ready = true;
                    self.readies += 1;
                }
                self.remaining = (len as usize).saturating_sub(4);
                self.header.clear();
            }
        }
    }
}

impl Proxy {
    async fn start(upstream: String, delay: Duration) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let mode = Arc::new(AtomicU8::new(PASS));
        let switch = mode.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let server = tokio::net::TcpStream::connect(&upstream).await.unwrap();
                let (mut client_read, mut client_write) = client.into_split();
                let (mut server_read, mut server_write) = server.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
                });
                let mode = switch.clone();
                tokio::spawn(async move {
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    let mut buf = vec![0u8; 64 * 1024];
                    let mut startup = StartupTracker::default();
                    // In AFTER_NEXT_READY: the ReadyForQuery count when that mode was seen.
                    let mut armed_at: Option<u64> = None;
                    loop {
                        let n = match server_read.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        let dead = match mode.load(Ordering::SeqCst) {
                            FREEZE => true,
                            AFTER_STARTUP => startup.ready,
                            AFTER_NEXT_READY => {
                                let at = *armed_at.get_or_insert(startup.readies);
                                startup.readies > at
                            }
                            _ => false,
                        };
                        if dead {
                            // Hold both sockets open and never answer again.
                            std::future::pending::<()>().await;
                        }
                        startup.feed(&buf[..n]);
                        tokio::time::sleep(delay).await;
                        if client_write.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        Self { port, mode }
    }

    /// A proxy in front of `tdb`'s server, and `tdb`'s URL through it.
    async fn in_front_of(tdb: &TestDatabase, delay: Duration) -> (Self, String) {
        let mut url = url::Url::parse(tdb.url().expose()).unwrap();
        let upstream = format!("{}:{}", url.host_str().unwrap(), url.port().unwrap_or(5432));
        let proxy = Self::start(upstream, delay).await;
        url.set_port(Some(proxy.port)).unwrap();
        (proxy, url.to_string())
    }

    fn freeze(&self) {
        self.mode.store(FREEZE, Ordering::SeqCst);
    }

    fn black_hole_queries(&self) {
        self.mode.store(AFTER_STARTUP, Ordering::SeqCst);
    }

    /// Each connection forwards the server's bytes up to and including its next
    /// ReadyForQuery (the end of the reply in flight), then black-holes.
    fn black_hole_after_the_next_reply(&self) {
        self.mode.store(AFTER_NEXT_READY, Ordering::SeqCst);
    }

    fn restore(&self) {
        self.mode.store(PASS, Ordering::SeqCst);
    }
}

#[tokio::test]
async fn a_cancelled_begin_never_leaves_a_session_inside_a_transaction() {
    let tdb = TestDatabase::create().await.unwrap();
    let (_proxy, url) = Proxy::in_front_of(&tdb, Duration::from_millis(40)).await;
    let mut config = DatabaseConfig::new(&url).unwrap();
    config.pool_max = 1;
    config.pool_min = 0;
    let db = Database::connect(config, "sbt-cancel-begin").await.unwrap();
    for i in 0..5 {
        // BEGIN's answer takes 40 ms to come back: cancel the caller half-way through.
        let cancelled = tokio::time::timeout(Duration::from_millis(20), db.begin()).await;
        assert!(
            cancelled.is_err(),
            "iteration {i}: begin finished before the cancellation"
        );
        let mut conn = db.acquire().await.unwrap();
        assert!(
            !inside_transaction(&mut conn).await,
            "iteration {i}: the pooled session is inside a leaked transaction"
        );
    }
    db.close(Duration::from_secs(5)).await.unwrap();
    tdb.drop_database().await.unwrap();
}

/// A one-connection database behind a proxy, with `statement_timeout` 200 ms, its
/// connection already open and used.
async fn behind_a_proxy(tdb: &TestDatabase, app: &str) -> (Database, Proxy) {
    behind_a_proxy_with(tdb, app, |_| {}).await
}

/// [`behind_a_proxy`] with more of the config changed by `tune`.
async fn behind_a_proxy_with(
    tdb: &TestDatabase,
    app: &str,
    tune: impl FnOnce(&mut DatabaseConfig),
) -> (Database, Proxy) {
    let (proxy, url) = Proxy::in_front_of(tdb, Duration::ZERO).await;
    let mut config = DatabaseConfig::new(&url).unwrap();
    config.pool_max = 1;
    config.pool_min = 0;
    config.statement_timeout = Duration::from_millis(200);
    tune(&mut config);
    let db = Database::connect(config, app).await.unwrap();
    let one: i32 = db
        .run(async |conn| sqlx::query_scalar("SELECT 1").fetch_one(conn).await)
        .await
        .unwrap();
    assert_eq!(one, 1);
    // sqlx pings a connection as it goes back to the pool: let that finish before a freeze.
    assert!(
        eventually(Duration::from_secs(5), || async {
            db.metrics().primary.idle == 1
        })
        .await
    );
    (db, proxy)
}

/// The guard around a call that must end by itself well before it (the bound is 450 ms).
const GUARD: Duration = Duration::from_secs(20);

#[tokio::test]
async fn a_query_on_a_black_holed_connection_ends_at_the_client_side_bound() {
    let tdb = TestDatabase::create().await.unwrap();
    let (db, proxy) = behind_a_proxy(&tdb, "sbt-frozen-query").await;
    proxy.freeze();
    // The server cancels pg_sleep at 200 ms, but its answer never arrives.
    let query = db.run(async |conn| sqlx::query("SELECT pg_sleep(5)").execute(conn).await);
    let err = tokio::time::timeout(GUARD, query)
        .await
        .expect("run() must give up by itself")
        .expect_err("nothing can come back through a frozen proxy");
    assert!(
        matches!(err, DbError::QueryTimeout(b) if b == db.config().query_timeout()),
        "{err:?}"
    );
    assert!(err.is_timeout());
    let m = db.metrics();
    assert_eq!((m.query_errors_total, m.query_timeouts_total), (1, 1));
    // The frozen connection was discarded: the pool's one slot is free.
    assert_eq!(m.primary.size, 0);
    db.close(Duration::from_secs(2)).await.unwrap();
    tdb.drop_database().await.unwrap();
}

#[tokio::test]
async fn a_begin_on_a_black_holed_connection_ends_at_the_client_side_bound() {
    let tdb = TestDatabase::create().await.unwrap();
    let (db, proxy) = behind_a_proxy(&tdb, "sbt-frozen-begin").await;
    let warm_up = db.metrics().acquires_total;
    proxy.freeze();
    let err = tokio::time::timeout(GUARD, db.begin())
        .await
        .expect("begin() must give up by itself")
        .expect_err("BEGIN's answer never arrives");
    assert!(
        matches!(err, DbError::QueryTimeout(b) if b == db.config().query_timeout()),
        "{err:?}"
    );
    assert!(err.is_timeout());
    // The task gives up at the same deadline and discards the connection.
    assert!(
        eventually(GUARD, || async {
            let m = db.metrics();
            (m.query_errors_total, m.query_timeouts_total, m.primary.size) == (1, 1, 0)
        })
        .await,
        "{:?}",
        db.metrics()
    );
    assert_eq!(
        db.metrics().acquires_total,
        warm_up + 1,
        "the connection was checked out, then BEGIN hung"
    );
    // The pool's one slot is free: a BEGIN on a fresh connection works.
    proxy.restore();
    let tx = db
        .begin()
        .await
        .expect("a new connection for the next BEGIN");
    tx.rollback().await.unwrap();
    db.close(Duration::from_secs(2)).await.unwrap();
    tdb.drop_database().await.unwrap();
}

/// Issue 10, item 1: a query cut short by the client-side bound gives its pool slot back at
/// once. Before, the timed-out query future dropped its connection, sqlx pinged it on the
/// way back with no timeout, and the slot stayed taken until the OS gave up on the socket:
/// 20 timeouts exhausted a pool of 20 and `close()` ended in its deadline.
#[tokio::test]
async fn timed_out_queries_on_black_holed_connections_give_their_pool_slots_back() {
    let tdb = TestDatabase::create().await.unwrap();
    let (proxy, url) = Proxy::in_front_of(&tdb, Duration::ZERO).await;
    let mut config = DatabaseConfig::new(&url).unwrap();
    config.pool_max = 20;
    config.pool_min = 0;
    config.statement_timeout = Duration::from_millis(200); // client bound 450 ms
    config.acquire_timeout = Duration::from_secs(3);
    // The open connections are handed out without a ping, straight into the black hole.
    config.ping_bypass = Duration::from_secs(600);
    let db = Database::connect(config, &unique_app("sbt-slots"))
        .await
        .unwrap();
    let bound = db.config().query_timeout();
    let held = join_all((0..20).map(|_| db.acquire())).await;
    assert!(held.iter().all(Result::is_ok), "{held:?}");
    drop(held);
    assert!(
        eventually(Duration::from_secs(5), || async {
            db.metrics().primary.idle == 20
        })
        .await
    );
    let select = || {
        let db = db.clone();
        async move {
            db.run(async |conn| sqlx::query("SELECT 1").execute(conn).await)
                .await
        }
    };

    proxy.black_hole_queries();
    // The pool's 20 connections, then 5 new ones (their start-up passes, their query
    // does not): 25 queries black-holed.
    let mut results = join_all((0..20).map(|_| select())).await;
    results.extend(join_all((0..5).map(|_| select())).await);
    for (i, result) in results.iter().enumerate() {
        assert!(
            matches!(result, Err(DbError::QueryTimeout(b)) if *b == bound),
            "query {i}: {result:?}"
        );
    }
    let m = db.metrics();
    assert_eq!(m.query_timeouts_total, 25);
    assert_eq!(m.acquires_total, 45, "every query got a connection: {m:?}");
    assert_eq!(
        m.primary.size, 0,
        "every black-holed connection left the pool: {m:?}"
    );

    proxy.restore();
    let one: i32 = tokio::time::timeout(GUARD, async {
        db.run(async |conn| sqlx::query_scalar("SELECT 1").fetch_one(conn).await)
            .await
    })
    .await
    .expect("run() is bounded")
    .expect("the next query gets a slot and succeeds");
    assert_eq!(one, 1);
    assert_eq!(db.metrics().acquire_timeouts_total, 0);
    db.close(Duration::from_secs(2))
        .await
        .expect("close() finishes within its deadline");
    tdb.drop_database().await.unwrap();
}

/// Item 1 for transactions: a statement of a [`smartbeak_database::Tx`] that times out
/// discards its connection, the transaction is over, and the slot is free at once.
#[tokio::test]
async fn a_timed_out_statement_in_a_transaction_gives_its_slot_back() {
    let tdb = TestDatabase::create().await.unwrap();
    let (db, proxy) = behind_a_proxy(&tdb, "sbt-frozen-tx").await;
    let mut tx = db.begin().await.unwrap();
    proxy.black_hole_queries();
    let err = tokio::time::timeout(
        GUARD,
        tx.run(async |conn| sqlx::query("SELECT 1").execute(conn).await),
    )
    .await
    .expect("Tx::run gives up by itself")
    .expect_err("nothing comes back");
    assert!(matches!(err, DbError::QueryTimeout(_)), "{err:?}");
    let again = tx
        .run(async |conn| sqlx::query("SELECT 1").execute(conn).await)
        .await;
    assert!(matches!(again, Err(DbError::Discarded)), "{again:?}");
    assert!(matches!(tx.commit().await, Err(DbError::Discarded)));
    assert_eq!(db.metrics().primary.size, 0, "the connection left the pool");
    proxy.restore();
    let one: i32 = db
        .run(async |conn| sqlx::query_scalar("SELECT 1").fetch_one(conn).await)
        .await
        .expect("the pool's only slot is free again");
    assert_eq!(one, 1);
    db.close(Duration::from_secs(2)).await.unwrap();
    tdb.drop_database().await.unwrap();
}

/// Issue 10, note (c): a query that succeeds and whose path dies before its connection is
/// back in the pool. sqlx's release ping has no timeout; the pool's `after_release` pings
/// first under the acquire timeout, so the connection is closed and its slot is free within
/// that bound (before: the slot stayed taken for the OS TCP timeout).
#[tokio::test]
async fn a_path_that_dies_after_a_successful_query_frees_the_slot_within_the_acquire_timeout() {
    let tdb = TestDatabase::create().await.unwrap();
    // Its one connection has run (and prepared) `SELECT 1` and is back in the pool, so the
    // query below is one round trip ending in one ReadyForQuery.
    let (db, proxy) = behind_a_proxy_with(&tdb, "sbt-release", |c| {
        c.acquire_timeout = Duration::from_millis(500);
    })
    .await;
    // The reply to this query passes; the release ping after it is black-holed.
    proxy.black_hole_after_the_next_reply();
    let one: i32 = db
        .run(async |conn| sqlx::query_scalar("SELECT 1").fetch_one(conn).await)
        .await
        .expect("the query's own reply passes");
    assert_eq!(one, 1);
    assert!(
        eventually(GUARD, || async { db.metrics().primary.size == 0 }).await,
        "the connection stuck in its release ping still holds the slot: {:?}",
        db.metrics()
    );
    proxy.restore();
    let one: i32 = tokio::time::timeout(GUARD, async {
        db.run(async |conn| sqlx::query_scalar("SELECT 1").fetch_one(conn).await)
            .await
    })
    .await
    .expect("run() is bounded")
    .expect("the pool's only slot is free again");
    assert_eq!(one, 1);
    db.close(Duration::from_secs(2)).await.unwrap();
    tdb.drop_database().await.unwrap();
}

/// Item 1, the caller's side: a `run` whose caller gives up first (a request dropped by its
/// own deadline or by a client that hung up) discards its connection too. Before, the
/// dropped future sent a black-holed connection back through sqlx's release ping, which has
/// no timeout, and the pool's only slot stayed taken.
#[tokio::test]
async fn a_run_dropped_by_its_caller_mid_query_gives_its_slot_back() {
    let tdb = TestDatabase::create().await.unwrap();
    let (db, proxy) = behind_a_proxy(&tdb, "sbt-dropped-run").await;
    proxy.black_hole_queries();
    let query = db.run(async |conn| sqlx::query("SELECT 1").execute(conn).await);
    // Nothing comes back through the black hole: the caller's timeout fires, whatever the
    // machine's load, and drops the `run` future mid-query.
    let gave_up = tokio::time::timeout(Duration::from_millis(50), query).await;
    assert!(gave_up.is_err(), "{gave_up:?}");
    assert_eq!(
        db.metrics().primary.size,
        0,
        "the connection left the pool when the future was dropped"
    );
    proxy.restore();
    let one: i32 = tokio::time::timeout(GUARD, async {
        db.run(async |conn| sqlx::query_scalar("SELECT 1").fetch_one(conn).await)
            .await
    })
    .await
    .expect("run() is bounded")
    .expect("the pool's only slot is free again");
    assert_eq!(one, 1);
    db.close(Duration::from_secs(2)).await.unwrap();
    tdb.drop_database().await.unwrap();
}

/// The same for a transaction: a `Tx::run` dropped mid-statement leaves the `Tx` unusable
/// and dropping the `Tx` discards its connection instead of queueing a `ROLLBACK` behind an
/// unbounded release ping.
#[tokio::test]
async fn a_tx_dropped_mid_statement_gives_its_slot_back() {
    let tdb = TestDatabase::create().await.unwrap();
    let (db, proxy) = behind_a_proxy(&tdb, "sbt-dropped-tx").await;
    let mut tx = db.begin().await.unwrap();
    proxy.black_hole_queries();
    let statement = tx.run(async |conn| sqlx::query("SELECT 1").execute(conn).await);
    let gave_up = tokio::time::timeout(Duration::from_millis(50), statement).await;
    assert!(gave_up.is_err(), "{gave_up:?}");
    let again = tx
        .run(async |conn| sqlx::query("SELECT 1").execute(conn).await)
        .await;
    assert!(matches!(again, Err(DbError::Discarded)), "{again:?}");
    drop(tx);
    assert_eq!(db.metrics().primary.size, 0, "the connection left the pool");
    proxy.restore();
    let one: i32 = tokio::time::timeout(GUARD, async {
        db.run(async |conn| sqlx::query_scalar("SELECT 1").fetch_one(conn).await)
            .await
    })
    .await
    .expect("run() is bounded")
    .expect("the pool's only slot is free again");
    assert_eq!(one, 1);
    db.close(Duration::from_secs(2)).await.unwrap();
    tdb.drop_database().await.unwrap();
}

fn unique_app(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

async fn count_backends(admin: &PgPool, application_name: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE application_name = $1")
        .bind(application_name)
        .fetch_one(admin)
        .await
        .unwrap()
}

#[tokio::test]
async fn concurrent_first_analytics_calls_create_exactly_one_pool() {
    let tdb = TestDatabase::create().await.unwrap();
    let mut config = tdb.config();
    config.analytics_url = Some(tdb.url().clone());
    let app = unique_app("sbt-analytics-one");
    let db = Database::connect(config, &app).await.unwrap();
    assert_eq!(db.read_source(), ReadSource::Primary);
    let pools = join_all((0..100).map(|_| db.analytics())).await;
    assert_eq!(pools.len(), 100);
    let m = db.metrics();
    assert_eq!(m.analytics_init_attempts_total, 1);
    assert_eq!(m.analytics_init_failures_total, 0);
    assert_eq!(db.read_source(), ReadSource::Replica);
    assert!(m.analytics.is_some());
    // Server-side: the replica's sessions carry `<app>-analytics`.
    let replica_app = format!("{app}-analytics");
    let seen: String = sqlx::query_scalar("SELECT current_setting('application_name')")
        .fetch_one(&pools[0])
        .await
        .unwrap();
    assert_eq!(seen, replica_app);
    let admin = PgPool::connect(tdb.url().expose()).await.unwrap();
    assert!(count_backends(&admin, &replica_app).await >= 1);
    admin.close().await;
    db.close(Duration::from_secs(5)).await.unwrap();
    tdb.drop_database().await.unwrap();
}

#[tokio::test]
async fn an_unreachable_replica_falls_back_to_the_primary_and_retries_with_backoff() {
    let tdb = TestDatabase::create().await.unwrap();
    let mut config = tdb.config();
    // Port 1 on loopback refuses at once (a black-holed replica: the test below).
    config.analytics_url = Some(
        smartbeak_database::SecretUrl::parse(
            "ANALYTICS_DB_URL",
            "postgres://postgres@127.0.0.1:1/none",
        )
        .unwrap(),
    );
    config.acquire_timeout = Duration::from_millis(500);
    config.analytics_retry_initial = Duration::from_millis(200);
    config.analytics_retry_max = Duration::from_millis(800);
    let db = Database::connect(config, &unique_app("sbt-analytics-down"))
        .await
        .unwrap();

    let started = Instant::now();
    let pools = join_all((0..100).map(|_| db.analytics())).await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "fallback took {:?}",
        started.elapsed()
    );
    let m = db.metrics();
    assert_eq!(
        m.analytics_init_attempts_total, 1,
        "waiters behind the failure respect the backoff"
    );
    assert_eq!(m.analytics_init_failures_total, 1);
    // Within the backoff (at least 100 ms, half the first 200 ms delay) nobody tries again.
    let _ = db.analytics().await;
    assert_eq!(db.metrics().analytics_init_attempts_total, 1);

    for pool in &pools {
        let one: i32 = sqlx::query_scalar("SELECT 1")
            .fetch_one(pool)
            .await
            .unwrap();
        assert_eq!(one, 1, "the fallback is a working pool (the primary)");
    }
    assert_eq!(db.read_source(), ReadSource::Primary);

    // After it, exactly one new attempt. Each refused attempt lasts up to the acquire
    // timeout, so measure the delay from the second attempt's failure to the third
    // attempt's start: it is the backoff (drawn from 200..400 ms). Polling sees the failure
    // late by a poll plus however long a loaded machine delays the poller, so the bound is
    // half the shortest backoff: a zero backoff (which passed before) shows as a poll or two.
    assert!(
        eventually(Duration::from_secs(3), || async {
            let _ = db.analytics().await;
            db.metrics().analytics_init_attempts_total == 2
        })
        .await
    );
    let poll = Duration::from_millis(10);
    let deadline = Instant::now() + GUARD;
    let mut second_failure = None;
    let gap = loop {
        let _ = db.analytics().await;
        let m = db.metrics();
        if second_failure.is_none() && m.analytics_init_failures_total == 2 {
            second_failure = Some(Instant::now());
        }
        if m.analytics_init_attempts_total == 3 {
            let failed_at =
                second_failure.expect("the third attempt started before the second failed");
            break failed_at.elapsed();
        }
        assert!(Instant::now() < deadline, "no third attempt: {m:?}");
        tokio::time::sleep(poll).await;
    };
    assert!(
        gap >= Duration::from_millis(100),
        "the third attempt came {gap:?} after the second failure; the backoff is at least 200 ms"
    );
    db.close(Duration::from_secs(5)).await.unwrap();
    tdb.drop_database().await.unwrap();
}

/// A replica that accepts TCP connections and never answers: each attempt costs the whole
/// acquire timeout. Only the very first callers may wait for it; a retry runs in the
/// background while callers get the primary at once.
///
/// The ordering checks rely on this test's current-thread runtime: between two awaits of
/// the test nothing else runs, so a background attempt cannot finish in between.
#[tokio::test(flavor = "current_thread")]
async fn a_black_holed_replica_is_retried_in_the_background() {
    let tdb = TestDatabase::create().await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = Arc::new(std::sync::Mutex::new(Vec::new()));
    let sockets = accepted.clone();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            // Kept open, never written to.
            sockets.lock().unwrap().push(socket);
        }
    });
    let mut config = tdb.config();
    config.analytics_url = Some(
        smartbeak_database::SecretUrl::parse(
            "ANALYTICS_DB_URL",
            &format!("postgres://postgres@127.0.0.1:{port}/none"),
        )
        .unwrap(),
    );
    config.acquire_timeout = Duration::from_millis(300);
    config.analytics_retry_initial = Duration::from_millis(100);
    config.analytics_retry_max = Duration::from_millis(400);
    let db = Database::connect(config, &unique_app("sbt-analytics-hole"))
        .await
        .unwrap();
    let primary_port = db.primary().connect_options().get_port();
    let is_primary = |pool: &PgPool| pool.connect_options().get_port() == primary_port;

    // The first call makes the one inline attempt, which ends at the acquire timeout.
    let started = Instant::now();
    let pool = tokio::time::timeout(GUARD, db.analytics())
        .await
        .expect("the first attempt is bounded");
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "the first attempt was not made inline: {:?}",
        started.elapsed()
    );
    assert!(is_primary(&pool));
    let m = db.metrics();
    assert_eq!(
        (
            m.analytics_init_attempts_total,
            m.analytics_init_failures_total
        ),
        (1, 1)
    );

    // After the backoff (50..100 ms), the call that starts the retry does not wait for it.
    let deadline = Instant::now() + GUARD;
    loop {
        let pool = db.analytics().await;
        let m = db.metrics();
        if m.analytics_init_attempts_total == 2 {
            assert_eq!(
                m.analytics_init_failures_total, 1,
                "the caller waited for the retry instead of getting the primary at once"
            );
            assert!(is_primary(&pool));
            break;
        }
        assert_eq!(m.analytics_init_attempts_total, 1);
        assert!(Instant::now() < deadline, "no retry after the backoff");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // While it is pending, every caller gets the primary and nobody starts another one.
    for _ in 0..20 {
        assert!(is_primary(&db.analytics().await));
    }
    let m = db.metrics();
    assert_eq!(
        (
            m.analytics_init_attempts_total,
            m.analytics_init_failures_total
        ),
        (2, 1)
    );
    // The background attempt ends at its acquire timeout.
    assert!(
        eventually(GUARD, || async {
            db.metrics().analytics_init_failures_total == 2
        })
        .await
    );
    assert_eq!(db.read_source(), ReadSource::Primary);
    assert!(
        accepted.lock().unwrap().len() >= 2,
        "both attempts reached the replica"
    );
    db.close(Duration::from_secs(5)).await.unwrap();
    tdb.drop_database().await.unwrap();
}

/// A TCP relay whose upstream can be switched: the stable address of a "replica" whose
/// server is stopped and replaced. A client whose upstream cannot be reached is hung up on.
struct Relay {
    port: u16,
    upstream: Arc<std::sync::Mutex<String>>,
}

impl Relay {
    async fn start(upstream: String) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let upstream = Arc::new(std::sync::Mutex::new(upstream));
        let target = upstream.clone();
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let to = target.lock().unwrap().clone();
                tokio::spawn(async move {
                    if let Ok(mut server) = tokio::net::TcpStream::connect(&to).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
            }
        });
        Self { port, upstream }
    }

    fn point_to(&self, upstream: String) {
        *self.upstream.lock().unwrap() = upstream;
    }
}

/// Issue 10, item 3: a replica that dies after its first success is dropped, by the failed
/// reads (`db_reads`, no health ping within the test) or by the health ping alone with no
/// reads at all (`db_idle`); when a replica answers again at its address, reads return to
/// it. The replica is a throwaway PostgreSQL the test stops, then a new one behind the same
/// address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_dies_is_dropped_and_reads_return_when_it_answers() {
    use smartbeak_test_support::PostgresServer;
    let tdb = TestDatabase::create().await.unwrap();
    let mut first = tokio::task::spawn_blocking(PostgresServer::start)
        .await
        .unwrap()
        .expect("a throwaway PostgreSQL for the replica");
    let relay = Relay::start(format!("127.0.0.1:{}", first.port())).await;
    let replica_url = format!("postgres://postgres@127.0.0.1:{}/postgres", relay.port);
    let open = |app: &'static str, ping: Duration| {
        let mut config = tdb.config();
        config.analytics_url =
            Some(smartbeak_database::SecretUrl::parse("ANALYTICS_DB_URL", &replica_url).unwrap());
        config.acquire_timeout = Duration::from_secs(2);
        config.analytics_retry_initial = Duration::from_millis(100);
        config.analytics_retry_max = Duration::from_millis(200);
        config.analytics_ping_interval = ping;
        let app = unique_app(app);
        async move { Database::connect(config, &app).await }
    };
    let db_reads = open("sbt-replica-reads", Duration::from_secs(3600))
        .await
        .unwrap();
    let db_idle = open("sbt-replica-idle", Duration::from_millis(100))
        .await
        .unwrap();
    /// The port of the server that answered, and what the database layer says it was.
    async fn read(db: &Database) -> Result<(i32, ReadSource), DbError> {
        db.run_analytics(async |conn| {
            sqlx::query_scalar("SELECT current_setting('port')::int")
                .fetch_one(conn)
                .await
        })
        .await
    }
    let primary_port = i32::from(db_reads.primary().connect_options().get_port());
    let first_port = i32::from(first.port());
    for db in [&db_reads, &db_idle] {
        assert_eq!(read(db).await.unwrap(), (first_port, ReadSource::Replica));
        assert_eq!(db.metrics().read_source, ReadSource::Replica);
    }

    let mut first = tokio::task::spawn_blocking(move || {
        first.stop();
        first
    })
    .await
    .unwrap();
    // Nobody reads through db_idle: its health ping notices.
    assert!(
        eventually(GUARD, || async {
            db_idle.read_source() == ReadSource::Primary
        })
        .await,
        "the health ping never dropped the dead replica"
    );
    // db_reads: reads fail until REPLICA_ERRORS of them in a row drop the replica.
    let failures = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let fell_back = eventually(GUARD, || async {
        match read(&db_reads).await {
            Ok((port, ReadSource::Primary)) => {
                assert_eq!(port, primary_port);
                true
            }
            Ok(other) => panic!("a read succeeded on a stopped replica: {other:?}"),
            Err(e) => {
                assert!(e.is_connection_failure(), "{e:?}");
                failures.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    })
    .await;
    assert!(fell_back, "reads never fell back to the primary");
    let failures = failures.load(Ordering::Relaxed);
    assert!(
        failures <= smartbeak_database::REPLICA_ERRORS,
        "{failures} failed reads before the fallback"
    );
    for db in [&db_reads, &db_idle] {
        let m = db.metrics();
        assert_eq!(m.read_source, ReadSource::Primary);
        assert_eq!(m.analytics_replica_drops_total, 1, "{m:?}");
        assert_eq!(read(db).await.unwrap(), (primary_port, ReadSource::Primary));
    }

    // A replica answers at the same address again.
    let second = tokio::task::spawn_blocking(PostgresServer::start)
        .await
        .unwrap()
        .expect("a second throwaway PostgreSQL");
    relay.point_to(format!("127.0.0.1:{}", second.port()));
    let second_port = i32::from(second.port());
    for db in [&db_reads, &db_idle] {
        assert!(
            eventually(GUARD, || async {
                matches!(read(db).await, Ok((port, ReadSource::Replica)) if port == second_port)
            })
            .await,
            "reads never returned to the replica: {:?}",
            db.metrics()
        );
        assert_eq!(db.metrics().read_source, ReadSource::Replica);
    }
    for db in [db_reads, db_idle] {
        db.close(Duration::from_secs(5)).await.unwrap();
    }
    tokio::task::spawn_blocking(move || {
        first.stop();
        drop((first, second));
    })
    .await
    .unwrap();
    tdb.drop_database().await.unwrap();
}

#[tokio::test]
async fn close_gives_up_at_its_deadline_while_a_connection_is_held() {
    let fx = Fixture::new(|c| c.pool_min = 0).await;
    let held = fx.db.acquire().await.unwrap();
    let err = fx
        .db
        .close(Duration::from_millis(100))
        .await
        .expect_err("a checked-out connection keeps the pool open");
    assert!(
        matches!(err, DbError::CloseTimeout(d) if d == Duration::from_millis(100)),
        "{err:?}"
    );
    // Given back, the connection closes and so does the pool.
    drop(held);
    fx.finish().await;
}

#[tokio::test]
async fn close_also_closes_the_analytics_pool() {
    let fx = Fixture::new(|c| c.pool_min = 1).await;
    // A second Database on the same server whose replica is the test database itself.
    let mut config = fx.db.config().clone();
    config.analytics_url = Some(fx.tdb.url().clone());
    let app = unique_app("sbt-close-analytics");
    let db = Database::connect(config, &app).await.unwrap();
    let replica_app = format!("{app}-analytics");
    assert_eq!(count_backends(&fx.admin, &replica_app).await, 0);
    let reads = db.analytics().await;
    assert_eq!(db.read_source(), ReadSource::Replica);
    let one: i32 = sqlx::query_scalar("SELECT 1")
        .fetch_one(&reads)
        .await
        .unwrap();
    assert_eq!(one, 1);
    assert!(count_backends(&fx.admin, &replica_app).await >= 1);
    db.close(Duration::from_secs(5)).await.unwrap();
    assert!(reads.is_closed());
    assert!(
        eventually(Duration::from_secs(5), || async {
            count_backends(&fx.admin, &replica_app).await == 0
                && count_backends(&fx.admin, &app).await == 0
        })
        .await,
        "sessions left after close"
    );
    fx.finish().await;
}

/// sqlx 0.8.6's `Pool::close` misses a connection whose release (sqlx pings it on the way
/// back) is under way when the close starts: it goes back to the idle queue after close
/// last looked there. A slow proxy makes that release take 200 ms.
#[tokio::test]
async fn close_also_closes_a_connection_on_its_way_back_to_the_pool() {
    let tdb = TestDatabase::create().await.unwrap();
    let (_proxy, url) = Proxy::in_front_of(&tdb, Duration::from_millis(200)).await;
    let mut config = DatabaseConfig::new(&url).unwrap();
    config.pool_min = 0;
    config.pool_max = 2;
    let app = unique_app("sbt-close-returning");
    let db = Database::connect(config, &app).await.unwrap();
    let admin = PgPool::connect(tdb.url().expose()).await.unwrap();
    let one: i32 = db
        .run(async |conn| sqlx::query_scalar("SELECT 1").fetch_one(conn).await)
        .await
        .unwrap();
    assert_eq!(one, 1);
    // The release's ping is now on the wire; its answer takes 200 ms to come back.
    tokio::time::sleep(Duration::from_millis(50)).await;
    db.close(Duration::from_secs(5)).await.unwrap();
    assert!(
        eventually(Duration::from_secs(5), || async {
            count_backends(&admin, &app).await == 0
        })
        .await,
        "a session outlived close()"
    );
    admin.close().await;
    tdb.drop_database().await.unwrap();
}

/// Issue 10, item 6: the schema refuses an export whose domain is another org's, and a
/// performance row whose content item is another domain's, whatever the code does.
#[tokio::test]
async fn cross_tenant_rows_are_refused_by_the_schema() {
    let fx = Fixture::new(|_| {}).await;
    let (org_a, org_b) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
    let (domain_a, domain_b, item_a) = (
        uuid::Uuid::new_v4(),
        uuid::Uuid::new_v4(),
        uuid::Uuid::new_v4(),
    );
    fx.db
        .run(async |conn| {
            for (org, domain, name) in [
                (org_a, domain_a, "a.example"),
                (org_b, domain_b, "b.example"),
            ] {
                sqlx::query("INSERT INTO orgs (id, name) VALUES ($1, $2)")
                    .bind(org)
                    .bind(name)
                    .execute(&mut *conn)
                    .await?;
                sqlx::query("INSERT INTO domains (id, org_id, name) VALUES ($1, $2, $3)")
                    .bind(domain)
                    .bind(org)
                    .bind(name)
                    .execute(&mut *conn)
                    .await?;
            }
            sqlx::query(
                "INSERT INTO content_items (id, domain_id, title, slug) VALUES ($1, $2, 't', 's')",
            )
            .bind(item_a)
            .bind(domain_a)
            .execute(&mut *conn)
            .await
        })
        .await
        .unwrap();
    let insert_export = |org, domain| {
        let db = fx.db.clone();
        async move {
            db.run(async |conn| {
                sqlx::query("INSERT INTO domain_exports (id, org_id, domain_id, format) VALUES ($1, $2, $3, 'json')")
                    .bind(uuid::Uuid::new_v4())
                    .bind(org)
                    .bind(domain)
                    .execute(conn)
                    .await
            })
            .await
        }
    };
    let insert_performance = |domain, item| {
        let db = fx.db.clone();
        async move {
            db.run(async |conn| {
                sqlx::query("INSERT INTO content_performance (domain_id, content_id, recorded_at) VALUES ($1, $2, now())")
                    .bind(domain)
                    .bind(item)
                    .execute(conn)
                    .await
            })
            .await
        }
    };
    let foreign_key_violation =
        |result: Result<sqlx::postgres::PgQueryResult, DbError>| match result {
            Err(DbError::Query(sqlx::Error::Database(e))) => e.code().as_deref() == Some("23503"),
            _ => false,
        };
    // Same tenant: accepted.
    insert_export(org_a, domain_a).await.unwrap();
    insert_performance(domain_a, item_a).await.unwrap();
    // Org B exporting org A's domain, and A's content counted under B's domain: refused.
    assert!(foreign_key_violation(insert_export(org_b, domain_a).await));
    assert!(foreign_key_violation(
        insert_performance(domain_b, item_a).await
    ));
    fx.finish().await;
}

/// Item 6: the migration applies over data written under the first schema.
#[tokio::test]
async fn the_tenant_key_migration_keeps_existing_data() {
    let admin = PgPool::connect(TestDatabase::admin_url().unwrap().expose())
        .await
        .unwrap();
    let name = format!("{}{}", testing::run_prefix(), uuid::Uuid::new_v4().simple());
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&admin)
        .await
        .unwrap();
    let url = TestDatabase::admin_url().unwrap().with_database(&name);
    let pool = PgPool::connect(url.expose()).await.unwrap();
    sqlx::raw_sql(include_str!("../migrations/20261127000001_init.sql"))
        .execute(&pool)
        .await
        .unwrap();
    sqlx::raw_sql(
        "INSERT INTO orgs (id, name) VALUES ('00000000-0000-0000-0000-00000000000a', 'a');
         INSERT INTO domains (id, org_id, name) VALUES
             ('00000000-0000-0000-0000-0000000000d1', '00000000-0000-0000-0000-00000000000a', 'a.example');
         INSERT INTO content_items (id, domain_id, title, slug) VALUES
             ('00000000-0000-0000-0000-0000000000c1', '00000000-0000-0000-0000-0000000000d1', 't', 's');
         INSERT INTO content_performance (domain_id, content_id, recorded_at) VALUES
             ('00000000-0000-0000-0000-0000000000d1', '00000000-0000-0000-0000-0000000000c1', now());
         INSERT INTO domain_exports (id, org_id, domain_id, format) VALUES
             ('00000000-0000-0000-0000-0000000000e1', '00000000-0000-0000-0000-00000000000a',
              '00000000-0000-0000-0000-0000000000d1', 'csv');",
    )
    .execute(&pool)
    .await
    .unwrap();
    sqlx::raw_sql(include_str!(
        "../migrations/20261201000001_tenant_foreign_keys.sql"
    ))
    .execute(&pool)
    .await
    .expect("the migration applies over consistent data");
    let counts: (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM content_performance), (SELECT count(*) FROM domain_exports)",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(counts, (1, 1));
    // Deleting the domain still cascades through the composite keys.
    sqlx::query("DELETE FROM domains")
        .execute(&pool)
        .await
        .unwrap();
    let left: (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM content_performance), (SELECT count(*) FROM domain_exports)",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(left, (0, 0));
    pool.close().await;
    sqlx::query(&format!("DROP DATABASE {name} WITH (FORCE)"))
        .execute(&admin)
        .await
        .unwrap();
    admin.close().await;
}

async fn database_exists(name: &str) -> bool {
    let admin = PgPool::connect(TestDatabase::admin_url().unwrap().expose())
        .await
        .unwrap();
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_database WHERE datname = $1")
        .bind(name)
        .fetch_one(&admin)
        .await
        .unwrap();
    admin.close().await;
    n == 1
}

#[tokio::test]
async fn test_databases_are_named_by_run_and_dropped_when_a_test_panics() {
    // A test that fails before reaching drop_database.
    let (named, name) = tokio::sync::oneshot::channel();
    let failing = tokio::spawn(async move {
        let tdb = TestDatabase::create().await.unwrap();
        named.send(tdb.name().to_owned()).unwrap();
        panic!("deliberate panic: a test failing before drop_database");
    });
    assert!(failing.await.unwrap_err().is_panic());
    let name = name.await.unwrap();
    let prefix = testing::run_prefix();
    assert!(name.starts_with(&prefix), "{name} vs {prefix}");
    let suffix = &name[prefix.len()..];
    assert!(
        suffix.len() == 32 && suffix.chars().all(|c| c.is_ascii_hexdigit()),
        "{name}"
    );
    assert!(name.len() <= 63);
    assert!(
        eventually(Duration::from_secs(15), || database_exists_not(&name)).await,
        "{name} survived the panic"
    );

    // A value dropped without drop_database drops its database too.
    let kept = TestDatabase::create().await.unwrap();
    let kept_name = kept.name().to_owned();
    assert!(database_exists(&kept_name).await);
    drop(kept);
    assert!(
        eventually(Duration::from_secs(15), || database_exists_not(&kept_name)).await,
        "{kept_name} survived its drop"
    );
    // The explicit way (which disarms the fallback).
    let explicit = TestDatabase::create().await.unwrap();
    let explicit_name = explicit.name().to_owned();
    explicit.drop_database().await.unwrap();
    assert!(!database_exists(&explicit_name).await);
}

async fn database_exists_not(name: &str) -> bool {
    !database_exists(name).await
}

/// Snapshot bounds for the tests: `statement_timeout` on the server, `gap_timeout` on the
/// client.
fn snapshot_options(statement_ms: u64, gap_ms: u64) -> smartbeak_database::SnapshotOptions {
    smartbeak_database::SnapshotOptions {
        statement_timeout: Duration::from_millis(statement_ms),
        gap_timeout: Duration::from_millis(gap_ms),
    }
}

#[tokio::test]
async fn snapshot_gap_timeout_fires_on_a_stalled_copy_and_a_stalled_query() {
    // The server would let the statement run (long statement timeout): once the first row
    // came, the client's gap timeout ends it, and the connection is discarded, not returned
    // mid-answer: one pool connection, so a connection returned mid-COPY would break the
    // next query. The server sends what its 8 KiB buffer holds only when more follows: two
    // large rows before the stall, so the first arrives whole.
    let fx = Fixture::new(|c| {
        c.pool_min = 0;
        c.pool_max = 1;
    })
    .await;
    for copy in [true, false] {
        let mut snapshot = fx
            .db
            .read_snapshot_with(snapshot_options(60_000, 200))
            .await
            .unwrap();
        let pid = {
            let mut rows = snapshot
                .fetch(sqlx::query_as::<_, (i32,)>("SELECT pg_backend_pid()"))
                .unwrap();
            let (pid,) = rows.next().await.unwrap().unwrap();
            assert!(rows.next().await.unwrap().is_none());
            pid
        };
        let stall = "SELECT CASE WHEN i < 3 THEN repeat('x', 100000) \
             ELSE pg_sleep(30)::text END FROM generate_series(1, 3) i";
        let err = if copy {
            let mut out = snapshot
                .copy_out(&format!("COPY ({stall}) TO STDOUT (FORMAT csv)"))
                .await
                .unwrap();
            assert!(out.next().await.unwrap().is_some(), "the first frame");
            out.next().await.expect_err("a stalled COPY must time out")
        } else {
            let mut rows = snapshot
                .fetch(sqlx::query_as::<_, (String,)>(stall))
                .unwrap();
            assert!(rows.next().await.unwrap().is_some(), "the first row");
            rows.next()
                .await
                .expect_err("a stalled query must time out")
        };
        assert!(matches!(err, DbError::StreamGap(_)), "{err:?}");
        assert!(err.is_timeout());
        drop(snapshot);
        // The server side ends too (client_connection_check_interval), long before the
        // sleep or the statement timeout would end it.
        assert!(
            eventually(Duration::from_secs(10), || async {
                let alive: i64 = fx
                    .db
                    .run(async |conn| {
                        sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE pid = $1")
                            .bind(pid)
                            .fetch_one(conn)
                            .await
                    })
                    .await
                    .unwrap();
                alive == 0
            })
            .await,
            "backend {pid} still runs after the snapshot was discarded"
        );
    }
    fx.finish().await;
}

#[tokio::test]
async fn snapshot_waits_for_a_slow_first_row_up_to_the_statement_timeout() {
    // A blocking plan (a sort, an aggregate) answers only when done: the gap timeout
    // (200 ms) does not bound the wait for the first row or frame.
    let fx = Fixture::new(|_| {}).await;
    let mut snapshot = fx
        .db
        .read_snapshot_with(snapshot_options(10_000, 200))
        .await
        .unwrap();
    let mut rows = snapshot
        .fetch(sqlx::query_as::<_, (i32,)>("SELECT 1 FROM pg_sleep(0.5)"))
        .unwrap();
    assert_eq!(rows.next().await.unwrap().unwrap().0, 1);
    assert!(rows.next().await.unwrap().is_none());
    drop(rows);
    let mut frames = Vec::new();
    let mut copy = snapshot
        .copy_out("COPY (SELECT 1 FROM pg_sleep(0.5)) TO STDOUT (FORMAT csv)")
        .await
        .unwrap();
    while let Some(frame) = copy.next().await.unwrap() {
        frames.extend_from_slice(&frame);
    }
    drop(copy);
    assert_eq!(frames, b"1\n");
    snapshot.finish().await.unwrap();
    fx.finish().await;
}

#[tokio::test]
async fn snapshot_raises_the_statement_timeout_for_its_transaction_only() {
    let fx = Fixture::new(|c| c.statement_timeout = Duration::from_millis(300)).await;
    // Inside a snapshot with a long bound, a statement longer than the pool's 300 ms runs.
    let mut snapshot = fx
        .db
        .read_snapshot_with(snapshot_options(30_000, 10_000))
        .await
        .unwrap();
    let mut rows = snapshot
        .fetch(sqlx::query_as::<_, (String,)>(
            "SELECT current_setting('statement_timeout')",
        ))
        .unwrap();
    assert_eq!(rows.next().await.unwrap().unwrap().0, "30s");
    assert!(rows.next().await.unwrap().is_none());
    drop(rows);
    snapshot.finish().await.unwrap();
    // Outside, the pool's bound is back.
    let setting: String = fx
        .db
        .run(async |conn| {
            sqlx::query_scalar("SELECT current_setting('statement_timeout')")
                .fetch_one(conn)
                .await
        })
        .await
        .unwrap();
    assert_eq!(setting, "300ms");
    // A snapshot's own bound is enforced by the server, as a StatementTimeout.
    let mut snapshot = fx
        .db
        .read_snapshot_with(snapshot_options(100, 10_000))
        .await
        .unwrap();
    let err = match snapshot
        .copy_out("COPY (SELECT pg_sleep(30)) TO STDOUT (FORMAT csv)")
        .await
    {
        Ok(mut copy) => copy.next().await.expect_err("cancelled by the server"),
        Err(err) => err,
    };
    assert!(matches!(err, DbError::StatementTimeout(_)), "{err:?}");
    drop(snapshot);
    fx.finish().await;
}

/// A snapshot prints timestamps in UTC ISO form whatever the session was left with (a
/// session-level `SET` on a pooled connection), and its `SET LOCAL`s end with it.
#[tokio::test]
async fn snapshot_prints_timestamps_in_utc_iso_whatever_the_session_set() {
    // One connection: the snapshot gets the one the `SET`s were made on.
    let fx = Fixture::new(|c| {
        c.pool_min = 1;
        c.pool_max = 1;
    })
    .await;
    let show = async |db: &Database| {
        db.run(async |conn| {
            sqlx::query_as::<_, (String, String)>(
                "SELECT current_setting('TimeZone'), current_setting('DateStyle')",
            )
            .fetch_one(conn)
            .await
        })
        .await
        .unwrap()
    };
    fx.db
        .run(async |conn| {
            sqlx::raw_sql("SET TimeZone = 'Asia/Kolkata'; SET DateStyle = 'SQL, DMY'")
                .execute(conn)
                .await
        })
        .await
        .unwrap();
    let session = ("Asia/Kolkata".to_owned(), "SQL, DMY".to_owned());
    assert_eq!(show(&fx.db).await, session);
    let mut snapshot = fx.db.read_snapshot().await.unwrap();
    let mut csv = Vec::new();
    {
        let mut copy = snapshot
            .copy_out(
                "COPY (SELECT '2026-03-01 12:00:00.5+00'::timestamptz, \
                 '2026-03-01 12:00:00+00'::timestamptz) TO STDOUT (FORMAT csv)",
            )
            .await
            .unwrap();
        while let Some(frame) = copy.next().await.unwrap() {
            csv.extend_from_slice(&frame);
        }
    }
    snapshot.finish().await.unwrap();
    assert_eq!(
        String::from_utf8(csv).unwrap(),
        "2026-03-01 12:00:00.5+00,2026-03-01 12:00:00+00\n"
    );
    // `SET LOCAL`: the session's own settings are back after the snapshot.
    assert_eq!(show(&fx.db).await, session);
    fx.finish().await;
}

#[tokio::test]
async fn snapshot_does_not_see_rows_committed_after_it_began_and_is_read_only() {
    let fx = Fixture::new(|_| {}).await;
    fx.db
        .run(async |conn| {
            sqlx::raw_sql("CREATE TABLE snap (n int); INSERT INTO snap VALUES (1), (2)")
                .execute(conn)
                .await
        })
        .await
        .unwrap();
    let mut snapshot = fx.db.read_snapshot().await.unwrap();
    assert_eq!(snapshot.source(), ReadSource::Primary);
    // Committed after the snapshot began: invisible to it.
    fx.db
        .run(async |conn| {
            sqlx::query("INSERT INTO snap VALUES (3)")
                .execute(conn)
                .await
        })
        .await
        .unwrap();
    let mut csv = Vec::new();
    {
        let mut copy = snapshot
            .copy_out("COPY (SELECT n FROM snap ORDER BY n) TO STDOUT (FORMAT csv, HEADER)")
            .await
            .unwrap();
        while let Some(frame) = copy.next().await.unwrap() {
            csv.extend_from_slice(&frame);
        }
    }
    assert_eq!(csv, b"n\n1\n2\n");
    let mut rows = snapshot
        .fetch(sqlx::query_as::<_, (i64,)>("SELECT count(*) FROM snap"))
        .unwrap();
    assert_eq!(rows.next().await.unwrap(), Some((2,)));
    assert_eq!(rows.next().await.unwrap(), None);
    drop(rows);
    snapshot.finish().await.unwrap();

    // Read only: a write is refused (SQLSTATE 25006), as a Query error.
    let mut snapshot = fx.db.read_snapshot().await.unwrap();
    let mut rows = snapshot
        .fetch(sqlx::query_as::<_, (i32,)>(
            "INSERT INTO snap VALUES (4) RETURNING n",
        ))
        .unwrap();
    let err = rows.next().await.expect_err("read only");
    match &err {
        DbError::Query(sqlx::Error::Database(db)) => {
            assert_eq!(db.code().as_deref(), Some("25006"));
        }
        other => panic!("{other:?}"),
    }
    drop(rows);
    drop(snapshot);
    // A finished snapshot gives its connection back: the pool keeps serving.
    let n: i64 = fx
        .db
        .run(async |conn| {
            sqlx::query_scalar("SELECT count(*) FROM snap")
                .fetch_one(conn)
                .await
        })
        .await
        .unwrap();
    assert_eq!(n, 3);
    fx.finish().await;
}

/// Milliseconds of `SHOW statement_timeout` (`8s`, `1799ms`, ...).
fn show_millis(shown: &str) -> u64 {
    if let Some(ms) = shown.strip_suffix("ms") {
        ms.parse().unwrap()
    } else if let Some(s) = shown.strip_suffix('s') {
        s.parse::<u64>().unwrap() * 1000
    } else {
        panic!("unexpected statement_timeout {shown}")
    }
}

#[tokio::test]
async fn a_query_never_outlives_the_deadline_of_its_scope() {
    use smartbeak_database::deadline;
    let fx = Fixture::new(|_| {}).await;
    let configured = fx.db.config().query_timeout();
    // Outside a scope: the configured bound, and the transaction keeps the session's
    // statement_timeout (8 s).
    let mut tx = fx.db.begin().await.unwrap();
    let shown: String = tx
        .run(async |conn| {
            sqlx::query_scalar("SHOW statement_timeout")
                .fetch_one(conn)
                .await
        })
        .await
        .unwrap();
    assert_eq!(show_millis(&shown), 8000);
    tx.rollback().await.unwrap();

    // A deadline 300 ms away bounds `run` by it: the client-side bound fires at it.
    let soon = tokio::time::Instant::now() + Duration::from_millis(300);
    let err = deadline::scope(soon, async {
        fx.db
            .run(async |conn| sqlx::query("SELECT pg_sleep(5)").execute(conn).await)
            .await
    })
    .await
    .expect_err("pg_sleep(5) must not outlive its deadline");
    match err {
        DbError::QueryTimeout(bound) => {
            assert!(
                bound <= Duration::from_millis(300) && bound < configured,
                "{bound:?}"
            );
        }
        other => panic!("expected the client bound, got {other:?}"),
    }
    // ...and the server side ends too: the discarded connection's socket is closed, and
    // `client_connection_check_interval` (1 s) ends the statement that no one waits for,
    // instead of letting pg_sleep(30) run to the 8 s statement_timeout.
    let sleeping = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE application_name = $1 AND query = 'SELECT pg_sleep(30)'",
        )
        .bind(&fx.app)
        .fetch_one(&fx.admin)
        .await
        .unwrap()
    };
    let soon = tokio::time::Instant::now() + Duration::from_millis(300);
    let err = deadline::scope(soon, async {
        fx.db
            .run(async |conn| sqlx::query("SELECT pg_sleep(30)").execute(conn).await)
            .await
    })
    .await
    .expect_err("pg_sleep(30) must not outlive its deadline");
    assert!(matches!(err, DbError::QueryTimeout(_)), "{err:?}");
    let cut_at = Instant::now();
    assert!(
        eventually(Duration::from_secs(4), || async { sleeping().await == 0 }).await,
        "the server still runs the statement of a request that gave up {:?} ago",
        cut_at.elapsed()
    );

    // Inside a transaction the server's timeout is lowered to fit the deadline, so the
    // server cancels the statement (57014) before the client bound.
    let later = tokio::time::Instant::now() + Duration::from_millis(2000);
    let (shown, slept) = deadline::scope(later, async {
        let mut tx = fx.db.begin().await.unwrap();
        let shown: String = tx
            .run(async |conn| {
                sqlx::query_scalar("SHOW statement_timeout")
                    .fetch_one(conn)
                    .await
            })
            .await
            .unwrap();
        let slept = tx
            .run(async |conn| sqlx::query("SELECT pg_sleep(5)").execute(conn).await)
            .await;
        (shown, slept)
    })
    .await;
    let lowered = show_millis(&shown);
    assert!(lowered > 0 && lowered <= 1800, "{shown}");
    let err = slept.expect_err("pg_sleep(5) must be cancelled");
    assert!(matches!(err, DbError::StatementTimeout(_)), "{err:?}");

    // The setting was local to that transaction.
    let shown: String = fx
        .db
        .run(async |conn| {
            sqlx::query_scalar("SHOW statement_timeout")
                .fetch_one(conn)
                .await
        })
        .await
        .unwrap();
    assert_eq!(show_millis(&shown), 8000);
    fx.finish().await;
}

/// Issue 13 gap 5: the natural-key migration applies over rows that repeat a key (written
/// before it, when the ingest inserted blindly): the last row written of each key is kept.
#[tokio::test]
async fn the_natural_key_migration_keeps_the_last_row_of_each_key() {
    const VERSION: i64 = 20261202000013;
    let admin = PgPool::connect(TestDatabase::admin_url().unwrap().expose())
        .await
        .unwrap();
    let name = format!("{}{}", testing::run_prefix(), uuid::Uuid::new_v4().simple());
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&admin)
        .await
        .unwrap();
    let url = TestDatabase::admin_url().unwrap().with_database(&name);
    let pool = PgPool::connect(url.expose()).await.unwrap();
    let mut ours = None;
    for migration in smartbeak_database::MIGRATOR.iter() {
        if migration.version < VERSION {
            sqlx::raw_sql(&migration.sql).execute(&pool).await.unwrap();
        } else if migration.version == VERSION {
            ours = Some(migration.sql.clone());
        }
    }
    let ours = ours.expect("the natural-key migration exists");
    sqlx::raw_sql(
        "INSERT INTO orgs (id, name) VALUES ('00000000-0000-0000-0000-00000000000a', 'a');
         INSERT INTO domains (id, org_id, name) VALUES
             ('00000000-0000-0000-0000-0000000000d1', '00000000-0000-0000-0000-00000000000a', 'a.example');
         INSERT INTO content_items (id, domain_id, title, slug) VALUES
             ('00000000-0000-0000-0000-0000000000c1', '00000000-0000-0000-0000-0000000000d1', 't', 's');
         -- Three writes of one api key, one other time, and a synced row of the same key
         -- (its own natural key, untouched).
         INSERT INTO keyword_metrics (domain_id, keyword, search_volume, position, recorded_at, source)
         SELECT '00000000-0000-0000-0000-0000000000d1', 'rust', v, 1, '2026-01-01', s
         FROM (VALUES (1, NULL), (2, NULL), (3, NULL), (9, 'gsc')) AS t(v, s);
         INSERT INTO keyword_metrics (domain_id, keyword, search_volume, position, recorded_at)
         VALUES ('00000000-0000-0000-0000-0000000000d1', 'rust', 4, 1, '2026-01-02');
         INSERT INTO content_performance (domain_id, content_id, page_views, recorded_at)
         SELECT '00000000-0000-0000-0000-0000000000d1', '00000000-0000-0000-0000-0000000000c1', v, '2026-01-01'
         FROM generate_series(1, 3) v;",
    )
    .execute(&pool)
    .await
    .unwrap();
    sqlx::raw_sql(&ours)
        .execute(&pool)
        .await
        .expect("the migration applies over duplicated rows");
    let keywords: Vec<(i32, Option<String>)> =
        sqlx::query_as("SELECT search_volume, source FROM keyword_metrics ORDER BY search_volume")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(
        keywords,
        vec![(3, None), (4, None), (9, Some("gsc".to_owned()))]
    );
    let views: Vec<i64> = sqlx::query_scalar("SELECT page_views FROM content_performance")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(views, vec![3]);
    // The keys hold from now on.
    let again = sqlx::query(
        "INSERT INTO keyword_metrics (domain_id, keyword, search_volume, position, recorded_at) \
         VALUES ('00000000-0000-0000-0000-0000000000d1', 'rust', 5, 1, '2026-01-01')",
    )
    .execute(&pool)
    .await;
    assert!(
        matches!(&again, Err(sqlx::Error::Database(e)) if e.is_unique_violation()),
        "{again:?}"
    );
    pool.close().await;
    sqlx::query(&format!("DROP DATABASE {name} WITH (FORCE)"))
        .execute(&admin)
        .await
        .unwrap();
}

#[tokio::test]
async fn the_pinger_answers_while_every_pool_connection_is_checked_out() {
    let fx = Fixture::new(|c| {
        c.pool_max = 2;
        c.pool_min = 0;
        c.acquire_timeout = Duration::from_millis(300);
    })
    .await;
    let pinger = fx.db.pinger();
    let held = (
        fx.db.acquire().await.unwrap(),
        fx.db.acquire().await.unwrap(),
    );
    // The pool has nothing to give: a ping through it waits out the acquire timeout...
    assert!(
        matches!(fx.db.ping().await, Err(DbError::AcquireTimeout(_))),
        "the pool should be saturated"
    );
    // ...while the pinger's own connection answers, and keeps answering.
    for _ in 0..3 {
        pinger.ping().await.unwrap();
    }
    // It is one session beside the pool's two, under the same application name.
    let sessions: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE application_name = $1")
            .bind(&fx.app)
            .fetch_one(&fx.admin)
            .await
            .unwrap();
    assert_eq!(sessions, 3);
    // A session that dies is replaced on the next check (the failed one reports the error).
    sqlx::query(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE application_name = $1 AND pid NOT IN (SELECT pg_backend_pid())",
    )
    .bind(&fx.app)
    .execute(&fx.admin)
    .await
    .unwrap();
    drop(held);
    let mut answered = false;
    for _ in 0..3 {
        if pinger.ping().await.is_ok() {
            answered = true;
            break;
        }
    }
    assert!(
        answered,
        "the pinger did not reconnect after its session was terminated"
    );
    fx.finish().await;
}
