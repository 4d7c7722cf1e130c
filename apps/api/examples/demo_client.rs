//! The HTTP part of `cargo xtask demo`: a few real calls against a running api, printing
//! what each returned.
//!
//! Usage: `SMARTBEAK_API_KEY=<key> demo_client <base url>` (the key in the environment, not
//! on the command line). The key's org is expected to hold the demo's seeded domains (the
//! database demo seeds them).
//!
//! The export part: `demo_client <base url> export-enqueue` queues a JSON export of the first
//! domain and prints `export id: <id>`; `demo_client <base url> export-fetch <id>` waits (at
//! most 60 s) for a worker to finish it, downloads it, checks its SHA-256 against the ETag
//! and the job's checksum, and prints its name, checksum and first lines.

use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use reqwest::header::HeaderMap;
use reqwest::{Client, Method, StatusCode};
use serde_json::{Value, json};

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let (Some(base), Ok(key)) = (std::env::args().nth(1), std::env::var("SMARTBEAK_API_KEY"))
    else {
        eprintln!("usage: SMARTBEAK_API_KEY=<key> demo_client <base url>");
        return ExitCode::from(2);
    };
    let mode = std::env::args().nth(2);
    let result = match mode.as_deref() {
        None => run(&base, &key).await,
        Some("export-enqueue") => export_enqueue(&base, &key).await,
        Some("export-fetch") => match std::env::args().nth(3) {
            Some(id) => export_fetch(&base, &key, &id).await,
            None => Err(anyhow::anyhow!(
                "usage: demo_client <base url> export-fetch <id>"
            )),
        },
        Some(other) => Err(anyhow::anyhow!("unknown mode {other:?}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo_client: {e:#}");
            ExitCode::FAILURE
        }
    }
}

struct Api {
    http: Client,
    base: String,
    key: String,
}

impl Api {
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<(StatusCode, Value, HeaderMap)> {
        let mut request = self
            .http
            .request(method.clone(), format!("{}{path}", self.base))
            .bearer_auth(&self.key);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request
            .send()
            .await
            .with_context(|| format!("{method} {path}"))?;
        let status = response.status();
        let headers = response.headers().clone();
        let text = response.text().await?;
        let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        println!("\n{method} {path} -> {}", status.as_u16());
        Ok((status, value, headers))
    }

    async fn expect(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
        want: StatusCode,
    ) -> Result<(Value, HeaderMap)> {
        let (status, value, headers) = self.call(method.clone(), path, body).await?;
        if status != want {
            bail!("{method} {path}: expected {want}, got {status}: {value}");
        }
        Ok((value, headers))
    }
}

async fn run(base: &str, key: &str) -> Result<()> {
    let api = Api {
        http: Client::new(),
        base: base.trim_end_matches('/').to_owned(),
        key: key.to_owned(),
    };

    let (ready, _) = api
        .expect(Method::GET, "/readyz", None, StatusCode::OK)
        .await?;
    println!("  {ready}");

    let (domains, headers) = api
        .expect(Method::GET, "/v1/domains", None, StatusCode::OK)
        .await?;
    let items = domains["items"].as_array().cloned().unwrap_or_default();
    for d in &items {
        println!(
            "  {}  {}  ({})",
            d["id"].as_str().unwrap_or("?"),
            d["name"].as_str().unwrap_or("?"),
            d["status"].as_str().unwrap_or("?")
        );
    }
    for name in ["ratelimit-policy", "ratelimit"] {
        if let Some(v) = headers.get(name) {
            println!("  {name}: {}", v.to_str().unwrap_or("?"));
        }
    }
    let Some(domain) = items
        .first()
        .and_then(|d| d["id"].as_str())
        .map(str::to_owned)
    else {
        bail!("the key's org has no domains; was the demo data seeded?");
    };

    let (report, _) = api
        .expect(
            Method::GET,
            &format!("/v1/domains/{domain}/analytics"),
            None,
            StatusCode::OK,
        )
        .await?;
    println!(
        "  read from: {}",
        report["read_source"].as_str().unwrap_or("?")
    );
    for k in report["keywords"].as_array().into_iter().flatten().take(3) {
        println!(
            "  keyword {:<26} avg position {:>5.1}  clicks {:>5}  impressions {:>6}  avg ctr {:.3}",
            k["keyword"].as_str().unwrap_or("?"),
            k["avg_position"].as_f64().unwrap_or(0.0),
            k["total_clicks"].as_i64().unwrap_or(0),
            k["total_impressions"].as_i64().unwrap_or(0),
            k["avg_ctr"].as_f64().unwrap_or(0.0),
        );
    }
    for c in report["content"].as_array().into_iter().flatten().take(3) {
        println!(
            "  content {:<34} views {:>6}  visitors {:>6}  revenue {:>8.2}",
            c["title"].as_str().unwrap_or("?"),
            c["page_views"].as_i64().unwrap_or(0),
            c["unique_visitors"].as_i64().unwrap_or(0),
            c["revenue_cents"].as_i64().unwrap_or(0) as f64 / 100.0,
        );
    }

    let (item, _) = api
        .expect(
            Method::POST,
            &format!("/v1/domains/{domain}/content"),
            Some(json!({"title": "Written by the demo", "slug": "written-by-the-demo", "status": "draft"})),
            StatusCode::CREATED,
        )
        .await?;
    println!(
        "  created content {} ({})",
        item["id"].as_str().unwrap_or("?"),
        item["status"].as_str().unwrap_or("?")
    );

    let (export, _) = api
        .expect(
            Method::POST,
            &format!("/v1/domains/{domain}/exports"),
            Some(json!({"format": "csv", "include_analytics": true})),
            StatusCode::ACCEPTED,
        )
        .await?;
    let export_id = export["id"].as_str().unwrap_or_default().to_owned();
    println!("  export {export_id} queued");
    let (status, _) = api
        .expect(
            Method::GET,
            &format!("/v1/exports/{export_id}"),
            None,
            StatusCode::OK,
        )
        .await?;
    println!(
        "  status {} progress {}",
        status["status"].as_str().unwrap_or("?"),
        status["progress"]
    );
    let (cancelled, _) = api
        .expect(
            Method::DELETE,
            &format!("/v1/exports/{export_id}"),
            None,
            StatusCode::OK,
        )
        .await?;
    println!(
        "  status {} (cancelled before the demo starts its export worker)",
        cancelled["status"].as_str().unwrap_or("?")
    );

    let other = uuid::Uuid::new_v4();
    let (error, _) = api
        .expect(
            Method::GET,
            &format!("/v1/domains/{other}"),
            None,
            StatusCode::NOT_FOUND,
        )
        .await?;
    println!("  {error}");
    let (error, _) = api
        .expect(
            Method::GET,
            "/v1/domains/not-a-uuid",
            None,
            StatusCode::BAD_REQUEST,
        )
        .await?;
    println!("  {error}");

    let anonymous = api
        .http
        .get(format!("{}/v1/domains", api.base))
        .send()
        .await?;
    println!(
        "\nGET /v1/domains without a key -> {}",
        anonymous.status().as_u16()
    );
    if anonymous.status() != StatusCode::UNAUTHORIZED {
        bail!("an anonymous request was not refused");
    }

    let metrics = api
        .http
        .get(format!("{}/metrics", api.base))
        .send()
        .await?
        .text()
        .await?;
    println!("\nGET /metrics (a few lines)");
    for line in metrics
        .lines()
        .filter(|l| {
            !l.starts_with('#')
                && (l.starts_with("db_pool")
                    || l.starts_with("ratelimit")
                    || l.starts_with("analytics"))
        })
        .take(8)
    {
        println!("  {line}");
    }
    Ok(())
}

fn client(base: &str, key: &str) -> Api {
    Api {
        http: Client::new(),
        base: base.trim_end_matches('/').to_owned(),
        key: key.to_owned(),
    }
}

/// Queues a JSON export of the key's first domain (every section); prints its id.
async fn export_enqueue(base: &str, key: &str) -> Result<()> {
    let api = client(base, key);
    let (domains, _) = api
        .expect(Method::GET, "/v1/domains", None, StatusCode::OK)
        .await?;
    let Some(domain) = domains["items"]
        .as_array()
        .and_then(|items| items.first())
        .and_then(|d| d["id"].as_str())
        .map(str::to_owned)
    else {
        bail!("the key's org has no domains; was the demo data seeded?");
    };
    let (export, _) = api
        .expect(
            Method::POST,
            &format!("/v1/domains/{domain}/exports"),
            Some(json!({"format": "json", "include_content": true, "include_keywords": true, "include_analytics": true})),
            StatusCode::ACCEPTED,
        )
        .await?;
    println!(
        "  status {} (no worker has claimed it yet)",
        export["status"].as_str().unwrap_or("?")
    );
    println!(
        "export id: {}",
        export["id"].as_str().context("the export has no id")?
    );
    Ok(())
}

/// Waits for export `id` to succeed, downloads it and verifies its checksum.
async fn export_fetch(base: &str, key: &str, id: &str) -> Result<()> {
    use sha2::Digest;

    let api = client(base, key);
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    let status = loop {
        let (status, value, _) = api
            .call(Method::GET, &format!("/v1/exports/{id}"), None)
            .await?;
        if status != StatusCode::OK {
            bail!("GET /v1/exports/{id}: {status}: {value}");
        }
        let state = value["status"].as_str().unwrap_or("?").to_owned();
        println!("  status {state} progress {}", value["progress"]);
        match state.as_str() {
            "succeeded" => break value,
            "failed" | "cancelled" => bail!("the export ended {state}: {value}"),
            _ if tokio::time::Instant::now() > deadline => {
                bail!("the export is still {state} after 60 s")
            }
            _ => tokio::time::sleep(std::time::Duration::from_millis(250)).await,
        }
    };
    let response = api
        .http
        .get(format!("{}/v1/exports/{id}/download", api.base))
        .bearer_auth(&api.key)
        .send()
        .await?;
    println!(
        "\nGET /v1/exports/{id}/download -> {}",
        response.status().as_u16()
    );
    if response.status() != StatusCode::OK {
        bail!("download failed: {}", response.status());
    }
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    let (etag, digest, disposition, kind) = (
        header("etag"),
        header("repr-digest"),
        header("content-disposition"),
        header("content-type"),
    );
    let body = response.bytes().await?;
    let sha = hex::encode(sha2::Sha256::digest(&body));
    println!("  content-type:        {kind}");
    println!("  content-disposition: {disposition}");
    println!("  etag:                {etag}");
    println!("  repr-digest:         {digest}");
    println!("  bytes:               {}", body.len());
    println!("  sha256 (recomputed): {sha}");
    let recorded = status["checksum_sha256"].as_str().unwrap_or("");
    if recorded.is_empty() && etag.is_empty() {
        bail!("neither the job nor the download carries a checksum");
    }
    if !recorded.is_empty() && sha != recorded {
        bail!("the download's SHA-256 {sha} is not the job's {recorded}");
    }
    if !etag.is_empty() && !etag.contains(&sha) {
        bail!("the ETag {etag} does not carry the download's SHA-256 {sha}");
    }
    println!("  checksum verified (the job's checksum_sha256 and the ETag)");
    match std::str::from_utf8(&body) {
        Ok(text) => {
            println!("  first lines:");
            for line in text.lines().take(8) {
                let shown: String = line.chars().take(160).collect();
                println!("    {shown}");
            }
        }
        Err(_) => println!("  (binary: {kind})"),
    }
    Ok(())
}
