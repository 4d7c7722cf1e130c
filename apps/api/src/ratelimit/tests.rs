//! Limiter tests against the shared Redis (unique key prefix per test) and headers.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use super::*;
use crate::config::{RateLimitConfig, RedisConfig, Secret};

fn policy(per_key: u32, per_ip: u32) -> RateLimitConfig {
    RateLimitConfig {
        enabled: true,
        per_key,
        per_ip,
        window: Duration::from_secs(60),
        fail_closed: false,
        replicas: 1,
        key_prefix: format!("sbtest:{}", uuid::Uuid::new_v4().simple()),
        trust_forwarded_for: false,
    }
}

fn redis(url: &str) -> RedisConfig {
    RedisConfig {
        url: Secret::new(url.to_owned()),
        connect_timeout: Duration::from_secs(1),
        command_timeout: Duration::from_millis(500),
        reconnect_min: Duration::from_millis(50),
        reconnect_max: Duration::from_millis(200),
        breaker_failures: 3,
        breaker_cooldown: Duration::from_millis(200),
    }
}

fn client(key: Option<&str>) -> ClientIdentity {
    ClientIdentity {
        key_id: key.map(str::to_owned),
        ip: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
    }
}

async fn wait_connected(limiter: &RateLimiter) {
    for _ in 0..200 {
        if limiter.redis_health() == RedisHealth::Up {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("redis did not connect");
}

#[tokio::test]
async fn redis_gcra_allows_the_limit_then_429_without_consuming() {
    let limiter = RateLimiter::new(policy(3, 100), Some(&redis("redis://127.0.0.1:6379"))).unwrap();
    wait_connected(&limiter).await;
    let c = client(Some("k1"));
    for expected_remaining in [2, 1, 0] {
        let d = limiter.check(&c).await;
        assert_eq!(d.outcome, Outcome::Allowed);
        assert_eq!(d.quotas[0].name, "key");
        assert_eq!(d.quotas[0].remaining, expected_remaining);
    }
    let d = limiter.check(&c).await;
    assert_eq!(d.outcome, Outcome::Limited);
    assert_eq!(d.quotas[0].remaining, 0);
    // 3 per 60 s: one unit every 20 s.
    assert_eq!(d.retry_after_secs, Some(20));
    // The rejected request consumed nothing from the IP quota: 3 used out of 100.
    assert_eq!(d.quotas[1].remaining, 97);
    // Another key from the same IP is independent.
    assert_eq!(
        limiter.check(&client(Some("k2"))).await.outcome,
        Outcome::Allowed
    );

    let mut headers = HeaderMap::new();
    d.apply_headers(&mut headers);
    assert_eq!(
        headers["ratelimit-policy"],
        "\"key\";q=3;w=60, \"ip\";q=100;w=60"
    );
    assert_eq!(headers["ratelimit"], "\"key\";r=0;t=60, \"ip\";r=97;t=2");
    assert_eq!(headers["retry-after"], "20");
}

#[tokio::test]
async fn ip_quota_limits_requests_without_a_key() {
    let limiter = RateLimiter::new(policy(100, 2), Some(&redis("redis://127.0.0.1:6379"))).unwrap();
    wait_connected(&limiter).await;
    assert_eq!(limiter.check(&client(None)).await.outcome, Outcome::Allowed);
    assert_eq!(
        limiter.check(&client(Some("a"))).await.outcome,
        Outcome::Allowed
    );
    let d = limiter.check(&client(Some("b"))).await;
    assert_eq!(d.outcome, Outcome::Limited);
    assert_eq!(
        d.quotas.iter().map(|q| q.name).collect::<Vec<_>>(),
        ["key", "ip"]
    );
    // All-or-nothing: key "b" was not charged for the rejected request.
    assert_eq!(d.quotas[0].remaining, 100);
}

#[tokio::test]
async fn unreachable_redis_fails_open_onto_the_local_limiter_or_closed() {
    // Port 1 is closed: every connect is refused at once.
    let mut open = policy(2, 100);
    open.replicas = 2;
    let limiter = RateLimiter::new(open, Some(&redis("redis://127.0.0.1:1"))).unwrap();
    let c = client(Some("k"));
    // limit 2 / 2 replicas = 1 per process on the fallback.
    let first = limiter.check(&c).await;
    assert_eq!(first.outcome, Outcome::Allowed);
    assert_eq!(first.quotas[0].limit, 1);
    assert_eq!(limiter.check(&c).await.outcome, Outcome::Limited);
    assert_eq!(limiter.redis_health(), RedisHealth::Down);

    let mut closed = policy(2, 100);
    closed.fail_closed = true;
    let limiter = RateLimiter::new(closed, Some(&redis("redis://127.0.0.1:1"))).unwrap();
    let d = limiter.check(&c).await;
    assert_eq!(d.outcome, Outcome::Unavailable);
    assert_eq!(d.retry_after_secs, Some(1));
}

#[tokio::test]
async fn without_redis_the_in_process_limiter_is_the_limiter() {
    let limiter = RateLimiter::new(policy(1, 100), None).unwrap();
    assert_eq!(limiter.backend_name(), "in-process");
    assert_eq!(limiter.redis_health(), RedisHealth::Disabled);
    assert_eq!(
        limiter.check(&client(Some("k"))).await.outcome,
        Outcome::Allowed
    );
    let d = limiter.check(&client(Some("k"))).await;
    assert_eq!(d.outcome, Outcome::Limited);
    assert_eq!(d.retry_after_secs, Some(60));
}

#[tokio::test]
async fn noscript_after_script_flush_reloads_once() {
    let limiter =
        RateLimiter::new(policy(10, 100), Some(&redis("redis://127.0.0.1:6379"))).unwrap();
    wait_connected(&limiter).await;
    assert_eq!(
        limiter.check(&client(Some("k"))).await.outcome,
        Outcome::Allowed
    );
    // SCRIPT FLUSH on the shared Redis only drops cached scripts (no data); every user of
    // EVALSHA must cope with it, as after a restart.
    let client = ::redis::Client::open("redis://127.0.0.1:6379").unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = ::redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut conn)
        .await
        .unwrap();
    let d = limiter.check(&client_identity()).await;
    assert_eq!(d.outcome, Outcome::Allowed);
    assert_eq!(d.quotas[0].remaining, 8);
}

fn client_identity() -> ClientIdentity {
    client(Some("k"))
}

/// A TCP proxy to the shared Redis that can start black-holing: connections stay open but
/// bytes in both directions are dropped, as when packets are lost (not refused).
struct BlackHoleProxy {
    addr: std::net::SocketAddr,
    black_hole: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl BlackHoleProxy {
    async fn start(upstream: &'static str) -> Self {
        use std::sync::atomic::Ordering;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let black_hole = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = black_hole.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
                    continue;
                };
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let (f1, f2) = (flag.clone(), flag.clone());
                tokio::spawn(async move {
                    let mut buf = [0_u8; 4096];
                    while let Ok(n) = cr.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        if !f1.load(Ordering::SeqCst) && sw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
                tokio::spawn(async move {
                    let mut buf = [0_u8; 4096];
                    while let Ok(n) = sr.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        if !f2.load(Ordering::SeqCst) && cw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        Self { addr, black_hole }
    }

    fn set_black_hole(&self, on: bool) {
        self.black_hole
            .store(on, std::sync::atomic::Ordering::SeqCst);
    }
}

#[tokio::test]
async fn black_holed_redis_costs_the_command_timeout_then_nothing_once_the_breaker_opens() {
    use std::time::Instant;

    let proxy = BlackHoleProxy::start("127.0.0.1:6379").await;
    let mut config = redis(&format!("redis://{}", proxy.addr));
    config.command_timeout = Duration::from_millis(300);
    config.breaker_failures = 3;
    config.breaker_cooldown = Duration::from_millis(500);
    let mut limits = policy(1000, 1000);
    // The fallback's quota is 1000 / 2 = 500, so a quota of 1000 means Redis decided.
    limits.replicas = 2;
    let limiter = RateLimiter::new(limits, Some(&config)).unwrap();
    wait_connected(&limiter).await;
    let c = client(Some("k"));
    let d = limiter.check(&c).await;
    assert_eq!(d.outcome, Outcome::Allowed);
    assert_eq!(d.quotas[0].remaining, 999, "served by redis");

    proxy.set_black_hole(true);
    // The first failures each cost about the command timeout, never much more; the
    // request still proceeds (fail open onto the local limiter, whose quota is untouched).
    for _ in 0..3 {
        let started = Instant::now();
        let d = limiter.check(&c).await;
        let took = started.elapsed();
        assert_eq!(d.outcome, Outcome::Allowed);
        assert!(took >= Duration::from_millis(290), "{took:?}");
        assert!(took < Duration::from_millis(900), "{took:?}");
    }
    // The breaker is open: requests skip Redis.
    for _ in 0..20 {
        let started = Instant::now();
        assert_eq!(limiter.check(&c).await.outcome, Outcome::Allowed);
        assert!(
            started.elapsed() < Duration::from_millis(100),
            "{:?}",
            started.elapsed()
        );
    }
    assert_eq!(limiter.redis_health(), RedisHealth::Down);

    // Packets flow again: after the cooldown a probe succeeds and Redis decides again
    // (the Redis quota shows the one request it counted earlier).
    proxy.set_black_hole(false);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let d = limiter.check(&c).await;
        if d.quotas[0].limit == 1000 && d.quotas[0].remaining < 999 {
            break;
        }
        assert!(Instant::now() < deadline, "redis limiting did not resume");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(limiter.redis_health(), RedisHealth::Up);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breaker_probes_cut_a_long_reconnect_backoff_short_while_traffic_flows() {
    use std::time::Instant;

    let mut server = smartbeak_test_support::RedisServer::start().unwrap();
    let mut config = redis(&server.url());
    // Without the probes' nudge the next reconnect attempt would be a minute away.
    config.reconnect_min = Duration::from_secs(60);
    config.reconnect_max = Duration::from_secs(60);
    config.breaker_cooldown = Duration::from_millis(200);
    let mut limits = policy(1000, 1000);
    limits.replicas = 2;
    let limiter = RateLimiter::new(limits, Some(&config)).unwrap();
    wait_connected(&limiter).await;
    let c = client(Some("k"));
    assert_eq!(limiter.check(&c).await.quotas[0].limit, 1000);

    server.stop();
    // Fail open (the fallback's quota is 500); meanwhile the supervisor's reconnect is
    // refused and it starts its minute-long back-off sleep.
    for _ in 0..10 {
        let d = limiter.check(&c).await;
        assert_eq!(d.outcome, Outcome::Allowed);
        assert_eq!(d.quotas[0].limit, 500);
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let server = tokio::task::spawn_blocking(move || {
        server.restart().unwrap();
        server
    })
    .await
    .unwrap();
    let restarted = Instant::now();
    loop {
        if limiter.check(&c).await.quotas[0].limit == 1000 {
            break;
        }
        assert!(
            restarted.elapsed() < Duration::from_secs(5),
            "redis limiting did not resume"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(limiter.redis_health(), RedisHealth::Up);
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_probe_does_not_wedge_the_breaker() {
    use std::time::Instant;

    // An own server: CLIENT PAUSE would stall everyone on the shared one.
    let server = smartbeak_test_support::RedisServer::start().unwrap();
    let mut config = redis(&server.url());
    config.command_timeout = Duration::from_millis(300);
    config.breaker_failures = 3;
    config.breaker_cooldown = Duration::from_millis(200);
    let mut limits = policy(1000, 1000);
    limits.replicas = 2;
    let key = format!("{{{}}}:k:k", limits.key_prefix);
    let limiter = RateLimiter::new(limits, Some(&config)).unwrap();
    wait_connected(&limiter).await;
    let c = client(Some("k"));
    assert_eq!(limiter.check(&c).await.quotas[0].limit, 1000);

    // Server errors (WRONGTYPE from the script's GET) open the breaker but keep the
    // connection, so the probe below reaches Redis.
    let admin = ::redis::Client::open(server.url()).unwrap();
    let mut admin = admin.get_multiplexed_async_connection().await.unwrap();
    let _: () = ::redis::cmd("DEL")
        .arg(&key)
        .query_async(&mut admin)
        .await
        .unwrap();
    let _: () = ::redis::cmd("RPUSH")
        .arg(&key)
        .arg("x")
        .query_async(&mut admin)
        .await
        .unwrap();
    for _ in 0..3 {
        assert_eq!(limiter.check(&c).await.quotas[0].limit, 500, "fell back");
    }
    assert_eq!(limiter.redis_health(), RedisHealth::Down);
    let _: () = ::redis::cmd("DEL")
        .arg(&key)
        .query_async(&mut admin)
        .await
        .unwrap();

    // After the cooldown the next request is the single probe. Redis hangs (paused), and
    // the request is dropped before Redis answers, as a request timeout or a client that
    // goes away would drop it. Its probe slot must come back.
    tokio::time::sleep(Duration::from_millis(250)).await;
    let _: () = ::redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(600)
        .arg("ALL")
        .query_async(&mut admin)
        .await
        .unwrap();
    let dropped = tokio::time::timeout(Duration::from_millis(100), limiter.check(&c)).await;
    assert!(
        dropped.is_err(),
        "the probe did not wait for the paused redis"
    );

    // Once the pause ends, a later probe succeeds and Redis decides again.
    let started = Instant::now();
    loop {
        if limiter.check(&c).await.quotas[0].limit == 1000 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the breaker stayed half-open after its probe was dropped"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(limiter.redis_health(), RedisHealth::Up);
}
