//! Limiter tests against the shared Redis (`REDIS_URL`, default `redis://127.0.0.1:6379`;
//! unique key prefix per test), against Redis servers of their own where they stop, pause,
//! flush or demote one, and of the headers.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use super::redis::FailureKind;
use super::*;
use crate::config::{RateLimitConfig, RedisConfig, RedisTarget, Secret};

fn policy(per_key: u32, per_ip: u32) -> RateLimitConfig {
    RateLimitConfig {
        enabled: true,
        per_key,
        per_ip,
        window: Duration::from_secs(60),
        fail_closed: false,
        replicas: 1,
        key_prefix: format!("sbtest:{}", uuid::Uuid::new_v4().simple()),
        trusted_proxies: Vec::new(),
    }
}

/// The shared Redis: `REDIS_URL` (what `cargo xtask test` exports, possibly a throwaway
/// server on another port), else `redis://127.0.0.1:6379`.
fn shared_redis_url() -> String {
    std::env::var("REDIS_URL")
        .ok()
        .filter(|url| !url.trim().is_empty())
        .unwrap_or_else(|| "redis://127.0.0.1:6379".to_owned())
}

/// Opens an admin connection to the Redis at `url`.
async fn connect(url: &str) -> ::redis::aio::MultiplexedConnection {
    ::redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

fn redis(url: &str) -> RedisConfig {
    RedisConfig {
        target: RedisTarget::Single(Secret::new(url.to_owned())),
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
        ip: Some(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1))),
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

fn usage(quota: &QuotaState) -> QuotaUsage {
    quota.usage.expect("a consulted quota")
}

#[tokio::test]
async fn redis_gcra_allows_the_limit_then_429_without_consuming() {
    // Per hour: one key unit every 1200 s, one IP unit every 36 s, so the seconds this test
    // may take under load cannot give a unit back (exact counts below hold).
    let mut limits = policy(3, 100);
    limits.window = Duration::from_secs(3600);
    let limiter = RateLimiter::new(limits, Some(&redis(&shared_redis_url()))).unwrap();
    wait_connected(&limiter).await;
    let c = client(Some("k1"));
    for expected_remaining in [2, 1, 0] {
        let d = limiter.check(&c).await;
        assert_eq!(d.outcome, Outcome::Allowed);
        assert_eq!(d.quotas[0].name, "key");
        assert_eq!(usage(&d.quotas[0]).remaining, expected_remaining);
        // The unit spent first comes back 1200 s after it was spent (not 3600 s: that
        // would be the time until the quota is full again).
        assert!((1190..=1200).contains(&usage(&d.quotas[0]).next_secs));
    }
    let d = limiter.check(&c).await;
    assert_eq!(d.outcome, Outcome::Limited);
    assert_eq!(usage(&d.quotas[0]).remaining, 0);
    let retry_after = d.retry_after_secs.unwrap();
    assert!((1190..=1200).contains(&retry_after), "{retry_after}");
    // The exhausted key's t is the time to its next unit: Retry-After.
    assert_eq!(usage(&d.quotas[0]).next_secs, retry_after);
    // The rejected request consumed nothing from the IP quota: 3 used out of 100, and the
    // first of them comes back 36 s after it was spent.
    let ip = usage(&d.quotas[1]);
    assert_eq!(ip.remaining, 97);
    assert!((26..=36).contains(&ip.next_secs), "{}", ip.next_secs);
    // Another key from the same IP is independent.
    assert_eq!(
        limiter.check(&client(Some("k2"))).await.outcome,
        Outcome::Allowed
    );

    let mut headers = HeaderMap::new();
    d.apply_headers(&mut headers);
    assert_eq!(
        headers["ratelimit-policy"],
        "\"key\";q=3;w=3600, \"ip\";q=100;w=3600"
    );
    assert_eq!(
        headers["ratelimit"],
        format!(
            "\"key\";r=0;t={retry_after}, \"ip\";r=97;t={}",
            ip.next_secs
        )
        .as_str()
    );
    assert_eq!(headers["retry-after"], retry_after.to_string().as_str());
}

/// The GCRA script with its clock frozen: the one line reading `TIME` takes the time from
/// the last two arguments instead, so a test decides `now` and a burst is exact.
fn frozen_script() -> String {
    let line = "local t = redis.call('TIME')";
    let script = include_str!("gcra.lua");
    assert_eq!(script.matches(line).count(), 1);
    script.replace(line, "local t = {ARGV[#ARGV - 1], ARGV[#ARGV]}")
}

/// [`frozen_script`] whose keys expire after an hour instead of when replenished. The frozen
/// clock does not move but Redis counts a key's TTL in real time: at 999 per second the TTL
/// after request k is about k ms, so a burst that Redis runs slower than one request per
/// millisecond (a loaded machine) lost its state mid-burst and allowed one too many.
fn frozen_script_without_expiry() -> String {
    let line = "'PX', math.max(1, ms(tat - now))";
    let script = frozen_script();
    assert_eq!(script.matches(line).count(), 1);
    script.replace(line, "'PX', 3600000")
}

/// One `EVAL` of `script` over `keys` (key, limit, period ms), at `now_ms` if frozen.
fn gcra_call(script: &str, keys: &[(&str, u32, u64)], now_ms: Option<u64>) -> ::redis::Cmd {
    let mut cmd = ::redis::cmd("EVAL");
    cmd.arg(script).arg(keys.len());
    for (key, _, _) in keys {
        cmd.arg(*key);
    }
    for (_, limit, period) in keys {
        cmd.arg(*limit).arg(*period);
    }
    if let Some(now) = now_ms {
        cmd.arg(now / 1000).arg((now % 1000) * 1000);
    }
    cmd
}

async fn shared_connection() -> ::redis::aio::MultiplexedConnection {
    connect(&shared_redis_url()).await
}

#[tokio::test]
async fn a_limit_of_1000_per_second_allows_exactly_1000_in_a_burst() {
    let mut conn = shared_connection().await;
    let key = format!("{{sbtest:{}}}:k", uuid::Uuid::new_v4().simple());
    let script = frozen_script();
    let now = 1_900_000_000_000;
    // One transaction, so the keys' PX expiry (real time) cannot interfere.
    let mut burst = ::redis::pipe();
    burst.atomic();
    for _ in 0..1001 {
        burst.add_command(gcra_call(&script, &[(&key, 1000, 1000)], Some(now)));
    }
    let replies: Vec<Vec<i64>> = burst.query_async(&mut conn).await.unwrap();
    for (i, reply) in replies[..1000].iter().enumerate() {
        let remaining = 999 - i64::try_from(i).unwrap();
        // allowed, remaining, next unit in 1 ms, no retry
        assert_eq!(reply, &[1, remaining, 1, 0], "request {i}");
    }
    assert_eq!(replies[1000], [0, 0, 1, 1], "the 1001st waits 1 ms");
    // One millisecond later exactly one more.
    let later: Vec<i64> = gcra_call(&script, &[(&key, 1000, 1000)], Some(now + 1))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(later, [1, 0, 1, 0]);
}

/// Limits that do not divide the window into whole milliseconds are counted exactly too (in
/// milliseconds, rounding up cost up to 1 ms per request: 999 per second acted as 500).
#[tokio::test]
async fn uneven_limits_allow_their_whole_burst() {
    let mut conn = shared_connection().await;
    let script = frozen_script_without_expiry();
    let now = 1_900_000_000_000;
    for (limit, period) in [
        (999u32, 1_000u64),
        (7, 60_000),
        (600, 60_000),
        (1_000, 3_600_000),
    ] {
        let key = format!("{{sbtest:{}}}:k", uuid::Uuid::new_v4().simple());
        let mut burst = ::redis::pipe();
        burst.atomic();
        for _ in 0..=limit {
            burst.add_command(gcra_call(&script, &[(&key, limit, period)], Some(now)));
        }
        let replies: Vec<Vec<i64>> = burst.query_async(&mut conn).await.unwrap();
        let allowed = replies.iter().filter(|r| r[0] == 1).count();
        assert_eq!(allowed, limit as usize, "{limit} per {period} ms");
        assert_eq!(
            replies[limit as usize][0], 0,
            "{limit} per {period} ms: one too many"
        );
        // The stored state is an exact integer of microseconds, not 1.9e+15.
        let stored: String = ::redis::cmd("GET")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(stored.bytes().all(|b| b.is_ascii_digit()), "{stored}");
    }
}

#[tokio::test]
async fn with_the_real_clock_a_burst_of_1000_per_second_is_allowed_whole() {
    // The real script, on Redis's clock: the first 1000 of a burst pass, and what passes
    // beyond them is what the elapsed milliseconds gave back (one per millisecond).
    let mut conn = shared_connection().await;
    let key = format!("{{sbtest:{}}}:k", uuid::Uuid::new_v4().simple());
    let script = include_str!("gcra.lua");
    let mut burst = ::redis::pipe();
    burst.atomic();
    burst.cmd("TIME");
    for _ in 0..1100 {
        burst.add_command(gcra_call(script, &[(&key, 1000, 1000)], None));
    }
    burst.cmd("TIME");
    let values: Vec<::redis::Value> = burst.query_async(&mut conn).await.unwrap();
    // TIME: [seconds, microseconds]
    let micros = |v: &::redis::Value| -> u64 {
        let (secs, micros): (u64, u64) = ::redis::from_redis_value_ref(v).unwrap();
        secs * 1_000_000 + micros
    };
    let elapsed_ms = (micros(&values[1101]) - micros(&values[0])) / 1000;
    let replies: Vec<Vec<i64>> = values[1..=1100]
        .iter()
        .map(|v| ::redis::from_redis_value_ref(v).unwrap())
        .collect();
    assert!(
        replies[..1000].iter().all(|r| r[0] == 1),
        "the first 1000 pass"
    );
    let allowed = replies.iter().filter(|r| r[0] == 1).count();
    assert!(
        allowed <= 1000 + usize::try_from(elapsed_ms).unwrap() + 1,
        "{allowed} allowed in {elapsed_ms} ms"
    );
}

#[tokio::test]
async fn t_is_the_time_until_the_next_unit_and_0_when_the_quota_is_full() {
    let mut conn = shared_connection().await;
    let prefix = format!("{{sbtest:{}}}", uuid::Uuid::new_v4().simple());
    let (key, ip) = (format!("{prefix}:k"), format!("{prefix}:ip"));
    let script = frozen_script();
    let now = 1_900_000_000_000;
    let call = |at: u64, keys: &[(&str, u32, u64)]| gcra_call(&script, keys, Some(at));
    let mut run =
        async |cmd: ::redis::Cmd| -> Vec<i64> { cmd.query_async(&mut conn).await.unwrap() };
    // 3 per 60 s: each unit comes back 20 s after it was spent.
    for remaining in [2, 1, 0] {
        assert_eq!(
            run(call(now, &[(&key, 3, 60_000)])).await,
            [1, remaining, 20_000, 0]
        );
    }
    // Exhausted: t is the retry time, also 5 s later.
    assert_eq!(
        run(call(now, &[(&key, 3, 60_000)])).await,
        [0, 0, 20_000, 20_000]
    );
    assert_eq!(
        run(call(now + 5_000, &[(&key, 3, 60_000)])).await,
        [0, 0, 15_000, 15_000]
    );
    // A quota that is full (never used) has nothing to regain: t = 0. All-or-nothing: the
    // refused request did not spend the IP's unit.
    assert_eq!(
        run(call(now + 5_000, &[(&key, 3, 60_000), (&ip, 10, 60_000)])).await,
        [0, 0, 15_000, 15_000, 10, 0, 0]
    );
    // 20 s after the burst one unit is back, and the next one 20 s after that.
    assert_eq!(
        run(call(now + 20_000, &[(&key, 3, 60_000), (&ip, 10, 60_000)])).await,
        [1, 0, 20_000, 0, 9, 6_000, 0]
    );
    // 30 s after the burst: 10 s until the second unit comes back, with one left.
    assert_eq!(
        run(call(now + 50_000, &[(&key, 3, 60_000)])).await,
        [1, 0, 10_000, 0]
    );
}

#[tokio::test]
async fn ip_quota_limits_requests_without_a_key() {
    let limiter = RateLimiter::new(policy(100, 2), Some(&redis(&shared_redis_url()))).unwrap();
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
    assert_eq!(usage(&d.quotas[0]).remaining, 100);
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
    // The key quota refused, so the IP quota was not consulted: it is a policy of the
    // request, but its state is unknown and left out of RateLimit (it used to read r=0;t=60).
    let mut headers = HeaderMap::new();
    d.apply_headers(&mut headers);
    assert_eq!(
        headers["ratelimit-policy"],
        "\"key\";q=1;w=60, \"ip\";q=100;w=60"
    );
    assert_eq!(headers["ratelimit"], "\"key\";r=0;t=60");
    assert_eq!(headers["retry-after"], "60");
}

#[test]
fn forwarded_for_is_read_only_from_trusted_proxies_right_to_left() {
    let request = |peer: &str, forwarded: &[&str]| {
        let peer: std::net::SocketAddr = peer.parse().unwrap();
        let mut builder = axum::http::Request::get("/v1/domains");
        for value in forwarded {
            builder = builder.header("x-forwarded-for", *value);
        }
        let mut request = builder.body(axum::body::Body::empty()).unwrap();
        request.extensions_mut().insert(ConnectInfo(peer));
        request
    };
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    let nets =
        |list: &[&str]| -> Vec<ipnet::IpNet> { list.iter().map(|n| n.parse().unwrap()).collect() };
    let lb = "192.0.2.10:40000";
    // No trusted proxies: the peer, whatever the header says.
    assert_eq!(
        client_ip(&request(lb, &["203.0.113.7"]), &[]),
        ip("192.0.2.10")
    );
    // A peer outside the trusted set: its header is the client's own claim.
    let trusted = nets(&["10.0.0.0/8", "192.0.2.10/32"]);
    assert_eq!(
        client_ip(&request("198.51.100.1:1", &["203.0.113.7"]), &trusted),
        ip("198.51.100.1")
    );
    // Trusted peer: right to left past trusted hops; the client's spoofed entry (leftmost)
    // is never reached.
    assert_eq!(
        client_ip(&request(lb, &["1.2.3.4, 203.0.113.7, 10.1.2.3"]), &trusted),
        ip("203.0.113.7")
    );
    assert_eq!(
        client_ip(
            &request(lb, &["1.2.3.4", "5.6.7.8,  203.0.113.9 "]),
            &trusted
        ),
        ip("203.0.113.9"),
        "several header lines are one list"
    );
    assert_eq!(
        client_ip(&request(lb, &["2001:db8::1"]), &trusted),
        ip("2001:db8::1")
    );
    // Missing: the peer. Unparsable: the last trusted hop (nothing left of it is believed).
    assert_eq!(client_ip(&request(lb, &[]), &trusted), ip("192.0.2.10"));
    assert_eq!(
        client_ip(&request(lb, &["1.2.3.4, unknown, 10.0.0.5"]), &trusted),
        ip("10.0.0.5")
    );
    // Only trusted hops: the leftmost of them.
    assert_eq!(
        client_ip(&request(lb, &["10.0.0.9, 10.0.0.5"]), &trusted),
        ip("10.0.0.9")
    );
    // An IPv4-mapped peer matches an IPv4 CIDR, and mapped entries read as IPv4.
    assert_eq!(
        client_ip(
            &request("[::ffff:192.0.2.10]:1", &["::ffff:203.0.113.7"]),
            &trusted
        ),
        ip("203.0.113.7")
    );
}

#[test]
fn ipv6_clients_are_keyed_by_their_64_and_mapped_addresses_as_ipv4() {
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    assert_eq!(quota_ip(ip("203.0.113.7")), ip("203.0.113.7"));
    assert_eq!(quota_ip(ip("::ffff:203.0.113.7")), ip("203.0.113.7"));
    assert_eq!(quota_ip(ip("2001:db8:1:2:aaaa::1")), ip("2001:db8:1:2::"));
    assert_eq!(
        quota_ip(ip("2001:db8:1:2:ffff:ffff:ffff:ffff")),
        quota_ip(ip("2001:db8:1:2::5"))
    );
    assert_ne!(
        quota_ip(ip("2001:db8:1:3::1")),
        quota_ip(ip("2001:db8:1:2::1"))
    );
}

#[tokio::test]
async fn keyed_requests_skip_the_ip_quota_and_failed_keys_spend_it() {
    use axum::routing::get;
    use tower::ServiceExt;
    // One IP unit: a key with room and a client behind the same address must not share it.
    let limiter = RateLimiter::new(policy(100, 1), None).unwrap();
    // The handler stands in for authentication: key `good` passes, any other gets 401.
    let app = axum::Router::new()
        .route(
            "/v1/x",
            get(|headers: HeaderMap| async move {
                let good = headers
                    .get(header::AUTHORIZATION)
                    .is_some_and(|v| v == "Bearer sk_good");
                if good {
                    "ok".into_response()
                } else {
                    ApiError::Unauthorized.into_response()
                }
            }),
        )
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&limiter),
            limiter_only,
        ));
    let call = |key: Option<&str>| {
        let mut builder = axum::http::Request::get("/v1/x");
        if let Some(key) = key {
            builder = builder.header(header::AUTHORIZATION, format!("Bearer {key}"));
        }
        let mut request = builder.body(axum::body::Body::empty()).unwrap();
        let peer: SocketAddr = "192.0.2.10:1".parse().unwrap();
        request.extensions_mut().insert(ConnectInfo(peer));
        app.clone().oneshot(request)
    };
    for _ in 0..5 {
        let response = call(Some("sk_good")).await.unwrap();
        assert_eq!(response.status(), 200);
        // Only the key's quota is shown: the IP's would show every tenant the total.
        assert_eq!(response.headers()["ratelimit-policy"], "\"key\";q=100;w=60");
    }
    // The first bad key spends the IP's one unit and still gets its 401...
    let response = call(Some("sk_bad")).await.unwrap();
    assert_eq!(response.status(), 401);
    assert_eq!(response.headers()["ratelimit-policy"], "\"ip\";q=1;w=60");
    // ...the next is over the IP quota (429), and so is an unauthenticated request.
    assert_eq!(call(Some("sk_bad2")).await.unwrap().status(), 429);
    assert_eq!(call(None).await.unwrap().status(), 429);
    // The good key is unaffected.
    assert_eq!(call(Some("sk_good")).await.unwrap().status(), 200);
}

/// Calls of `EVAL` and `EVALSHA` so far, from `INFO commandstats`.
async fn script_calls(admin: &mut ::redis::aio::MultiplexedConnection) -> (u64, u64) {
    let info: String = ::redis::cmd("INFO")
        .arg("commandstats")
        .query_async(admin)
        .await
        .unwrap();
    let calls = |command: &str| {
        info.lines()
            .find_map(|line| line.strip_prefix(&format!("cmdstat_{command}:calls=")))
            .and_then(|rest| rest.split(',').next())
            .map_or(0, |n| n.parse().unwrap())
    };
    (calls("eval"), calls("evalsha"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn noscript_reloads_the_script_once_and_no_other_error_reloads_it() {
    // A server of its own: SCRIPT FLUSH and the command counts must not be shared.
    let server = smartbeak_test_support::RedisServer::start().unwrap();
    let mut limits = policy(10, 100);
    // The fallback's quota is 10 / 2 = 5, so a quota of 10 means Redis decided.
    limits.replicas = 2;
    let key = format!("{{{}}}:k:k", limits.key_prefix);
    let limiter = RateLimiter::new(limits, Some(&redis(&server.url()))).unwrap();
    wait_connected(&limiter).await;
    let mut admin = connect(&server.url()).await;
    let c = client(Some("k"));
    let decide = async || {
        let d = limiter.check(&c).await;
        assert_eq!(d.outcome, Outcome::Allowed);
        (d.quotas[0].limit, usage(&d.quotas[0]).remaining)
    };

    // A fresh server has no script: the first call's EVALSHA gets NOSCRIPT, one EVAL loads it.
    assert_eq!(decide().await, (10, 9));
    assert_eq!(script_calls(&mut admin).await, (1, 1));
    for remaining in [8, 7] {
        assert_eq!(decide().await, (10, remaining));
    }
    assert_eq!(script_calls(&mut admin).await, (1, 3), "EVALSHA only");

    // As after a restart or failover: the cache is empty, so one more EVAL, exactly once.
    let _: () = ::redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut admin)
        .await
        .unwrap();
    assert_eq!(decide().await, (10, 6));
    assert_eq!(script_calls(&mut admin).await, (2, 4));
    assert_eq!(decide().await, (10, 5));
    assert_eq!(
        script_calls(&mut admin).await,
        (2, 5),
        "loaded once, EVALSHA again"
    );

    // Any other error (WRONGTYPE: the limiter key is a hash) is not a reason to reload: the
    // request falls back (quota 5) and no EVAL is sent.
    let _: () = ::redis::cmd("DEL")
        .arg(&key)
        .query_async(&mut admin)
        .await
        .unwrap();
    let _: () = ::redis::cmd("HSET")
        .arg(&key)
        .arg("f")
        .arg("v")
        .query_async(&mut admin)
        .await
        .unwrap();
    assert_eq!(decide().await.0, 5, "fell back");
    assert_eq!(
        script_calls(&mut admin).await,
        (2, 6),
        "no reload after WRONGTYPE"
    );
    let _: () = ::redis::cmd("DEL")
        .arg(&key)
        .query_async(&mut admin)
        .await
        .unwrap();
    assert_eq!(decide().await, (10, 9), "the key starts afresh");
    assert_eq!(script_calls(&mut admin).await, (2, 7));
}

/// A TCP proxy to a Redis that can start black-holing (connections stay open but bytes in
/// both directions are dropped, as when packets are lost, not refused) and whose upstream
/// can be switched (new connections go to the new one, as after a failover behind one
/// address).
struct Proxy {
    addr: std::net::SocketAddr,
    black_hole: std::sync::Arc<std::sync::atomic::AtomicBool>,
    upstream: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Proxy {
    /// Proxies to the Redis of `url` (its host and port).
    async fn start(url: &str) -> Self {
        use std::sync::atomic::Ordering;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let black_hole = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let upstream = std::sync::Arc::new(std::sync::Mutex::new(host_port(url)));
        let flag = black_hole.clone();
        let target = upstream.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let to = target.lock().unwrap().clone();
                let Ok(server) = tokio::net::TcpStream::connect(to).await else {
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
        Self {
            addr,
            black_hole,
            upstream,
        }
    }

    /// `url` with its host and port replaced by the proxy's (user, password and database
    /// kept).
    fn url_for(&self, url: &str) -> String {
        let (scheme, rest) = url.split_once("://").unwrap();
        let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        let userinfo = authority
            .rsplit_once('@')
            .map_or(String::new(), |(user, _)| format!("{user}@"));
        format!("{scheme}://{userinfo}{}{path}", self.addr)
    }

    fn set_black_hole(&self, on: bool) {
        self.black_hole
            .store(on, std::sync::atomic::Ordering::SeqCst);
    }

    /// New connections go to the Redis of `url` from now on; open ones stay where they are.
    fn set_upstream(&self, url: &str) {
        *self.upstream.lock().unwrap() = host_port(url);
    }
}

/// `host:port` of a `redis://` URL.
fn host_port(url: &str) -> String {
    match ::redis::Client::open(url)
        .unwrap()
        .get_connection_info()
        .addr()
    {
        ::redis::ConnectionAddr::Tcp(host, port) => format!("{host}:{port}"),
        other => panic!("not a plain TCP redis URL: {other:?}"),
    }
}

#[tokio::test]
async fn black_holed_redis_costs_the_command_timeout_then_nothing_once_the_breaker_opens() {
    let shared = shared_redis_url();
    let proxy = Proxy::start(&shared).await;
    let mut config = redis(&proxy.url_for(&shared));
    config.command_timeout = Duration::from_millis(300);
    config.breaker_failures = 3;
    config.breaker_cooldown = Duration::from_millis(500);
    let mut limits = policy(1000, 1000);
    // The fallback's quota is 1000 / 2 = 500, so a quota of 1000 means Redis decided.
    limits.replicas = 2;
    let window = limits.window;
    let keys = [KeyLimit {
        key: format!("{{{}}}:k:k", limits.key_prefix),
        limit: 1000,
    }];
    let limiter = RateLimiter::new(limits, Some(&config)).unwrap();
    let backend = limiter.redis.as_ref().unwrap();
    wait_connected(&limiter).await;
    let c = client(Some("k"));
    let d = limiter.check(&c).await;
    assert_eq!(d.outcome, Outcome::Allowed);
    assert_eq!(usage(&d.quotas[0]).remaining, 999, "served by redis");

    proxy.set_black_hole(true);
    // The first failures each end at the command timeout (the kind says so: the limiter's
    // own deadline, not an error of the connection), and the request proceeds on the
    // fallback (whose quota is untouched).
    let d = limiter.check(&c).await;
    assert_eq!(d.outcome, Outcome::Allowed);
    assert_eq!(d.quotas[0].limit, 500, "failed open");
    for _ in 0..2 {
        assert_eq!(
            backend.check(&keys, window).await,
            Err(FailureKind::Timeout)
        );
    }
    // The breaker is open: Redis is not called at all.
    for _ in 0..20 {
        assert_eq!(
            backend.check(&keys, window).await,
            Err(FailureKind::BreakerOpen)
        );
    }
    assert_eq!(limiter.redis_health(), RedisHealth::Down);

    // Packets flow again: after the cooldown a probe succeeds and Redis decides again
    // (the Redis quota shows the one request it counted earlier).
    proxy.set_black_hole(false);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let d = limiter.check(&c).await;
        if d.quotas[0].limit == 1000 && usage(&d.quotas[0]).remaining < 999 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "redis limiting did not resume"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(limiter.redis_health(), RedisHealth::Up);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_failover_the_connection_to_the_demoted_node_is_replaced() {
    // Two servers of its own behind one address (the proxy). The limiter's connection goes
    // to `old`; then `old` is demoted to a replica of `new` (its writes now fail with
    // READONLY, an error that does not break the connection) and the address moves to `new`.
    let old = smartbeak_test_support::RedisServer::start().unwrap();
    let new = smartbeak_test_support::RedisServer::start().unwrap();
    let proxy = Proxy::start(&old.url()).await;
    let mut config = redis(&proxy.url_for(&old.url()));
    config.breaker_failures = 3;
    config.breaker_cooldown = Duration::from_millis(200);
    let mut limits = policy(1000, 1000);
    limits.replicas = 2;
    let key = format!("{{{}}}:k:k", limits.key_prefix);
    let limiter = RateLimiter::new(limits, Some(&config)).unwrap();
    wait_connected(&limiter).await;
    let c = client(Some("k"));
    assert_eq!(limiter.check(&c).await.quotas[0].limit, 1000);

    let mut admin_old = connect(&old.url()).await;
    let _: () = ::redis::cmd("REPLICAOF")
        .arg("127.0.0.1")
        .arg(new.port())
        .query_async(&mut admin_old)
        .await
        .unwrap();
    proxy.set_upstream(&new.url());

    // The old connection now answers READONLY: the breaker opens, which must replace the
    // connection (a new one reaches `new`); then the probe after the cooldown succeeds
    // there and Redis decides again. Without the replacement every probe would go to the
    // replica and fail, for ever.
    let started = std::time::Instant::now();
    loop {
        let d = limiter.check(&c).await;
        assert_eq!(d.outcome, Outcome::Allowed);
        // The demoted node refuses the script's writes, so a decision of Redis's came
        // from `new`.
        if d.quotas[0].limit == 1000 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the limiter stayed on the demoted node"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut admin_new = connect(&new.url()).await;
    let stored: Option<String> = ::redis::cmd("GET")
        .arg(&key)
        .query_async(&mut admin_new)
        .await
        .unwrap();
    assert!(stored.is_some(), "the key lives on the new primary");
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
    // On the test's own thread (the body runs in `block_on` there), not a blocking-pool
    // thread: the restarted server dies with the thread that started it (`--pdeathsig`), and
    // an idle blocking thread exits after 10 s.
    server.restart().unwrap();
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

    // Server errors (WRONGTYPE from the script's GET) open the breaker, which replaces the
    // connection; the supervisor has a new one long before the probe below.
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

#[tokio::test(start_paused = true)]
async fn the_fail_open_warning_is_throttled_without_a_lock() {
    let throttle = Arc::new(super::WarnThrottle::new(Duration::from_secs(10)));
    let now = tokio::time::Instant::now();
    // Many threads at the same instant: exactly one warns.
    let winners: usize = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let throttle = Arc::clone(&throttle);
                scope.spawn(move || (0..1000).filter(|_| throttle.should_warn(now)).count())
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).sum()
    });
    assert_eq!(winners, 1);
    assert!(!throttle.should_warn(now + Duration::from_secs(9)));
    assert!(throttle.should_warn(now + Duration::from_secs(10)));
    assert!(!throttle.should_warn(now + Duration::from_secs(11)));
}

fn cluster_config(urls: &[String]) -> RedisConfig {
    let mut config = redis("redis://unused");
    config.target = RedisTarget::Cluster(urls.iter().map(|u| Secret::new(u.clone())).collect());
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_limits_fails_open_or_closed_when_the_keys_master_dies_and_recovers() {
    use std::time::Instant;

    let mut cluster = smartbeak_test_support::RedisCluster::start(3).unwrap();
    for fail_closed in [false, true] {
        let mut limits = policy(3, 1000);
        limits.replicas = 1;
        limits.fail_closed = fail_closed;
        let prefix = limits.key_prefix.clone();
        let limiter = RateLimiter::new(limits, Some(&cluster_config(&cluster.urls()))).unwrap();
        wait_connected(&limiter).await;
        let c = client(Some("k"));
        for _ in 0..3 {
            assert_eq!(limiter.check(&c).await.outcome, Outcome::Allowed);
        }
        // The fourth is refused by the script in the cluster (the quota is 3).
        assert_eq!(limiter.check(&c).await.outcome, Outcome::Limited);

        let owner = cluster.master_of(&format!("{{{prefix}}}:k:k")).unwrap();
        cluster.stop_node(owner);
        let stopped = Instant::now();
        let expected = if fail_closed {
            Outcome::Unavailable
        } else {
            Outcome::Allowed
        };
        loop {
            let asked = Instant::now();
            let (d, by) = limiter.check_decided(&c).await;
            // Bounded by the command timeout (500 ms here) plus scheduling slack.
            assert!(
                asked.elapsed() < Duration::from_secs(2),
                "{:?}",
                asked.elapsed()
            );
            // The fallback decided (not Redis answering what the fallback would), and it
            // decided as configured.
            if by == DecidedBy::Fallback {
                assert_eq!(d.outcome, expected, "{d:?}");
                break;
            }
            assert!(
                stopped.elapsed() < Duration::from_secs(10),
                "no fallback: {d:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        cluster.restart_node(owner).unwrap();
        let restarted = Instant::now();
        // Recovered when a decision comes from the script in the cluster again, not when the
        // fallback's own quota (3 here, spent or not) happens to answer otherwise. The
        // restarted master is empty: the quota starts again in Redis, so its first decision
        // allows, and writes the key on that master.
        let (decision, by) = loop {
            let (decision, by) = limiter.check_decided(&c).await;
            if by == DecidedBy::Redis {
                break (decision, by);
            }
            assert!(
                restarted.elapsed() < Duration::from_secs(10),
                "cluster limiting did not resume: {by:?} {decision:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_eq!(by, DecidedBy::Redis);
        assert_eq!(decision.outcome, Outcome::Allowed, "{decision:?}");
        assert_eq!(limiter.redis_health(), RedisHealth::Up);
        let mut owner_conn = connect(&cluster.urls()[owner]).await;
        let stored: bool = ::redis::cmd("EXISTS")
            .arg(format!("{{{prefix}}}:k:k"))
            .query_async(&mut owner_conn)
            .await
            .unwrap();
        assert!(stored, "the decision left no counter on the key's master");
    }
    drop(cluster);
}
