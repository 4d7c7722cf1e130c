//! Graceful shutdown under load: SIGTERM while 200 requests are in flight. Every one of them
//! completes with 2xx, new connections are refused, and the process exits 0.
//!
//! The requests are held in flight by their bodies: each sends its headers and half of its
//! JSON body, then waits until the test has sent SIGTERM before sending the rest; the
//! handler is meanwhile waiting for the body inside the server.

use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::sync::watch;

use super::{Api, Tenant, database};

#[tokio::test]
async fn sigterm_with_200_requests_in_flight_drains_them_and_exits_0() {
    let (db, url) = database().await.unwrap();
    let mut api = Api::start(&url, &[("RATE_LIMIT_ENABLED", "false".into())])
        .await
        .unwrap();
    let t = Tenant::create(&url, "shutdown").await.unwrap();
    let baseline = api.metric("http_requests_in_flight").await.unwrap();

    let (release, released) = watch::channel(false);
    let mut requests = Vec::new();
    for i in 0..200 {
        let http = reqwest::Client::new();
        let url = api.url("/v1/domains");
        let bearer = t.bearer();
        let mut released = released.clone();
        let first = format!("{{\"name\": \"d{i}");
        let body = futures::stream::once(async move { Ok::<_, std::io::Error>(first) }).chain(
            futures::stream::once(async move {
                let _ = released.wait_for(|r| *r).await;
                Ok(".example.com\"}".to_owned())
            }),
        );
        requests.push(tokio::spawn(async move {
            http.post(url)
                .header("authorization", bearer)
                .header("content-type", "application/json")
                .body(reqwest::Body::wrap_stream(body))
                .send()
                .await
                .map(|r| r.status().as_u16())
        }));
    }
    // Wait until the server holds all 200 (the baseline is the /metrics request itself).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let in_flight = api.metric("http_requests_in_flight").await.unwrap() - baseline;
        if in_flight >= 200.0 {
            break;
        }
        assert!(Instant::now() < deadline, "only {in_flight} in flight");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    smartbeak_test_support::signal(api.pid(), "TERM").unwrap();
    // The listener closes: new connections are refused.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::net::TcpStream::connect(api.addr).await {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => break,
            _ => {
                assert!(Instant::now() < deadline, "still accepting after SIGTERM");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }

    release.send(true).unwrap();
    let mut statuses = Vec::new();
    for request in requests {
        statuses.push(request.await.unwrap().unwrap());
    }
    assert!(statuses.iter().all(|s| *s == 201), "{statuses:?}");
    let status = api.wait(Duration::from_secs(30)).await.unwrap();
    assert_eq!(status.code(), Some(0), "{}", api.output());
    assert!(api.output().contains("shutdown complete"));
    db.drop_database().await.unwrap();
}
