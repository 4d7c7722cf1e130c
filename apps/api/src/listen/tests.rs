#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::ToSocketAddrs as _;
use std::time::Duration;

use smartbeak_database::testing::TestDatabase;
use smartbeak_database::{Database, DatabaseConfig, SecretUrl};
use smartbeak_test_support::TcpForwarder;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::*;

const CHANNEL: &str = "listen_tests";

/// What the test's subscriber heard, owned.
#[derive(Debug, PartialEq, Eq)]
enum Heard {
    Subscribed,
    Notification(String),
    Lost,
}

/// A listener on [`CHANNEL`] for `db`, reporting what it hears.
fn listen(
    db: &Database,
    liveness: Duration,
) -> (
    mpsc::UnboundedReceiver<Heard>,
    CancellationToken,
    JoinHandle<()>,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    let stop = CancellationToken::new();
    let (db, token) = (db.clone(), stop.clone());
    let task = tokio::spawn(async move {
        run(
            &db,
            &[CHANNEL],
            "listen tests",
            liveness,
            |event| {
                let _ = tx.send(match event {
                    Event::Subscribed => Heard::Subscribed,
                    Event::Notification { payload, .. } => Heard::Notification(payload.to_owned()),
                    Event::Lost => Heard::Lost,
                });
            },
            &token,
        )
        .await;
    });
    (rx, stop, task)
}

async fn next(rx: &mut mpsc::UnboundedReceiver<Heard>, within: Duration) -> Heard {
    tokio::time::timeout(within, rx.recv())
        .await
        .expect("the listener said nothing in time")
        .expect("the listener ended")
}

async fn notify(db: &Database, payload: &str) {
    db.run(async |conn| {
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(CHANNEL)
            .bind(payload)
            .execute(conn)
            .await
            .map(|_| ())
    })
    .await
    .unwrap();
}

/// The pids of the listener sessions (`application_name` `<app>-listener`) in `datname`.
async fn listener_pids(db: &Database, datname: &str, app: &str) -> Vec<i32> {
    let app = format!("{app}{APPLICATION_SUFFIX}");
    db.run(async |conn| {
        sqlx::query_scalar(
            "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND application_name = $2 \
             ORDER BY pid",
        )
        .bind(datname)
        .bind(&app)
        .fetch_all(conn)
        .await
    })
    .await
    .unwrap()
}

/// Polls until exactly one listener session is left in `datname` other than `not`; returns
/// its pid.
async fn one_listener_other_than(db: &Database, datname: &str, app: &str, not: i32) -> i32 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let pids = listener_pids(db, datname, app).await;
        if pids.len() == 1 && pids[0] != not {
            return pids[0];
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "listener sessions {pids:?}, expected one other than {not}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A terminated session: the subscriber hears `Lost` (it polls meanwhile), then a new
/// session subscribes, a notification sent after it arrives, and the old session left
/// nothing behind (one listener session on the server).
#[tokio::test]
async fn a_terminated_listener_falls_back_and_resubscribes() {
    let tdb = TestDatabase::create().await.unwrap();
    let db = Database::connect(tdb.config(), "listen-kill")
        .await
        .unwrap();
    let (mut rx, stop, task) = listen(&db, Duration::from_secs(30));
    assert_eq!(
        next(&mut rx, Duration::from_secs(10)).await,
        Heard::Subscribed
    );
    let first = one_listener_other_than(&db, tdb.name(), "listen-kill", 0).await;
    let killed: bool = db
        .run(async |conn| {
            sqlx::query_scalar("SELECT pg_terminate_backend($1)")
                .bind(first)
                .fetch_one(conn)
                .await
        })
        .await
        .unwrap();
    assert!(killed);
    assert_eq!(next(&mut rx, Duration::from_secs(10)).await, Heard::Lost);
    assert_eq!(
        next(&mut rx, Duration::from_secs(10)).await,
        Heard::Subscribed
    );
    notify(&db, "after-recovery").await;
    assert_eq!(
        next(&mut rx, Duration::from_secs(10)).await,
        Heard::Notification("after-recovery".to_owned())
    );
    one_listener_other_than(&db, tdb.name(), "listen-kill", first).await;
    stop.cancel();
    task.await.unwrap();
    tdb.drop_database().await.unwrap();
}

/// A backend killed as soon as it appears, for 1.5 s: the listener reopens with growing
/// waits (a session that dies young counts as a failure), not in a hot loop.
#[tokio::test]
async fn a_listener_killed_over_and_over_backs_off() {
    let tdb = TestDatabase::create().await.unwrap();
    let db = Database::connect(tdb.config(), "listen-churn")
        .await
        .unwrap();
    let (mut rx, stop, task) = listen(&db, Duration::from_secs(30));
    assert_eq!(
        next(&mut rx, Duration::from_secs(10)).await,
        Heard::Subscribed
    );
    let app = format!("listen-churn{APPLICATION_SUFFIX}");
    let until = tokio::time::Instant::now() + Duration::from_millis(1500);
    let mut kills = 0u32;
    while tokio::time::Instant::now() < until {
        let killed: i64 = db
            .run(async |conn| {
                sqlx::query_scalar(
                    "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) \
                     FROM pg_stat_activity WHERE datname = $1 AND application_name = $2",
                )
                .bind(tdb.name())
                .bind(&app)
                .fetch_one(conn)
                .await
            })
            .await
            .unwrap();
        kills += u32::try_from(killed).unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut subscribed = 1u32;
    while let Ok(heard) = rx.try_recv() {
        if heard == Heard::Subscribed {
            subscribed += 1;
        }
    }
    // Waits of up to 100, 200, 400, 800 ms... (full jitter): a handful of sessions in
    // 1.5 s; a hot loop opens one every few milliseconds.
    assert!(
        subscribed <= 15,
        "{subscribed} sessions opened ({kills} killed) in 1.5 s: no backoff"
    );
    assert!(kills >= 1);
    stop.cancel();
    task.await.unwrap();
    tdb.drop_database().await.unwrap();
}

/// A black-holed connection (bytes swallowed, no reset): the liveness ping finds it, the
/// subscriber hears `Lost`, a new session subscribes once the network is back, a
/// notification after it arrives, and the dead session's connection is closed (its
/// backend on the server goes; no task is left waiting on the dead socket).
#[tokio::test]
async fn a_black_holed_listener_is_detected_and_replaced() {
    let tdb = TestDatabase::create().await.unwrap();
    let direct = Database::connect(tdb.config(), "listen-direct")
        .await
        .unwrap();
    let (forwarder, config) = through_forwarder(&tdb);
    let db = Database::connect(config, "listen-bh").await.unwrap();
    let (mut rx, stop, task) = listen(&db, Duration::from_millis(200));
    assert_eq!(
        next(&mut rx, Duration::from_secs(10)).await,
        Heard::Subscribed
    );
    let first = one_listener_other_than(&direct, tdb.name(), "listen-bh", 0).await;
    forwarder.black_hole();
    // Found by the ping: liveness (200 ms) plus the ping's bound (750 ms).
    assert_eq!(next(&mut rx, Duration::from_secs(10)).await, Heard::Lost);
    forwarder.restore();
    assert_eq!(
        next(&mut rx, Duration::from_secs(15)).await,
        Heard::Subscribed
    );
    notify(&direct, "after-black-hole").await;
    assert_eq!(
        next(&mut rx, Duration::from_secs(10)).await,
        Heard::Notification("after-black-hole".to_owned())
    );
    one_listener_other_than(&direct, tdb.name(), "listen-bh", first).await;
    stop.cancel();
    task.await.unwrap();
    drop(db);
    drop(forwarder);
    tdb.drop_database().await.unwrap();
}

/// A configuration whose primary goes through a fault proxy to the test database's server.
fn through_forwarder(tdb: &TestDatabase) -> (TcpForwarder, DatabaseConfig) {
    let direct = tdb.url().expose().to_owned();
    let (scheme, rest) = direct.split_once("://").unwrap();
    let (user, rest) = rest.rsplit_once('@').unwrap();
    let (host_port, path) = rest.split_once('/').unwrap();
    let target = host_port
        .to_socket_addrs()
        .unwrap()
        .find(|a| a.ip().is_loopback())
        .unwrap();
    let forwarder = TcpForwarder::start(target).unwrap();
    let via = format!("{scheme}://{user}@127.0.0.1:{}/{path}", forwarder.port());
    let mut config = tdb.config();
    config.url = SecretUrl::parse("DATABASE_URL", &via).unwrap();
    config.statement_timeout = Duration::from_millis(500);
    config.acquire_timeout = Duration::from_secs(1);
    config.pool_min = 0;
    (forwarder, config)
}
