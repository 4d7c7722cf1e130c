//! The control-plane step of `cargo xtask demo`: one `batch` of each operation against the
//! seeded data, with the summaries printed.
//!
//! The seeded data gets what the operations act on: the draft item of each domain
//! become `scheduled` and due, every domain gets a keyword source (`gsc` or `ahrefs`,
//! alternately), and one export of the seeded org is a succeeded, expired file in a
//! temporary `EXPORT_DIR`. keyword-sync talks to a fake provider that lives here, in
//! xtask (a few lines of `std::net`), never in the binary.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use smartbeak_database::SecretUrl;
use xshell::{Shell, cmd};

use crate::services::psql;

pub(crate) fn run(sh: &Shell, bin: &Path, database_url: &SecretUrl) -> Result<()> {
    super::section("control-plane: one batch of each operation");
    cmd!(
        sh,
        "cargo build --quiet -p smartbeak-control-plane --bin smartbeak-control-plane"
    )
    .run()
    .context("build failed")?;
    let export_dir =
        std::env::temp_dir().join(format!("smartbeak-demo-exports-{}", std::process::id()));
    std::fs::create_dir_all(&export_dir).context("creating the demo EXPORT_DIR")?;
    // A stored name is `<id without dashes>.<ext>` (a CHECK of the schema): a fixed id, as the
    // demo's database is fresh.
    std::fs::write(
        export_dir.join("5eb0c0de000040008000000000000001.json"),
        b"{}\n",
    )
    .context("writing the demo export file")?;
    psql(
        database_url,
        "UPDATE content_items SET status = 'scheduled', publish_at = now() - interval '1 minute' \
         WHERE status = 'draft' AND slug = 'article-4'; \
         INSERT INTO domain_keyword_sources (domain_id, adapter, site) \
         SELECT id, CASE WHEN row_number() OVER (ORDER BY name) % 2 = 0 THEN 'gsc' ELSE 'ahrefs' END, name \
         FROM domains ON CONFLICT DO NOTHING; \
         INSERT INTO domain_exports (id, org_id, domain_id, format, status, storage_path, size_bytes, \
         record_count, checksum_sha256, expires_at, finished_at) \
         SELECT '5eb0c0de-0000-4000-8000-000000000001', org_id, id, 'json', 'succeeded', \
         '5eb0c0de000040008000000000000001.json', 3, 0, \
         repeat('0', 64), now() - interval '1 day', now() - interval '8 days' \
         FROM domains ORDER BY name LIMIT 1;",
    )?;
    let provider = FakeProvider::start()?;
    let control_plane = bin.join("smartbeak-control-plane");
    let base = format!("http://{}", provider.addr);
    // The children get exactly this environment on top of xtask's own (a `Command` does not
    // see the `Shell`'s pushed variables, so the database is named here).
    let env = [
        ("DATABASE_URL", database_url.expose().to_owned()),
        ("EXPORT_DIR", export_dir.display().to_string()),
        ("CP_GSC_BASE_URL", format!("{base}/gsc/")),
        ("CP_GSC_API_KEY", "demo-gsc-key".to_owned()),
        ("CP_AHREFS_BASE_URL", format!("{base}/ahrefs/")),
        ("CP_AHREFS_API_KEY", "demo-ahrefs-key".to_owned()),
        ("RUST_LOG", "warn".to_owned()),
    ];
    let mut failed = Vec::new();
    for operation in ["content-scheduler", "keyword-sync", "export-retention"] {
        let mut command = Command::new(&control_plane);
        command
            .args(["batch", operation])
            .envs(env.iter().map(|(k, v)| (k, v)));
        let (ok, stdout, stderr) = run_bounded(command, BATCH_DEADLINE)
            .with_context(|| format!("smartbeak-control-plane batch {operation}"))?;
        print!("{stdout}");
        if !ok {
            eprint!("{stderr}");
            failed.push(operation);
        }
    }
    let _ = std::fs::remove_dir_all(&export_dir);
    anyhow::ensure!(
        failed.is_empty(),
        "control-plane batches failed: {failed:?}"
    );
    Ok(())
}

/// How long one demo `batch` may take before it is killed (the demo's data is a handful of
/// rows; a hang is a bug, not a slow run).
const BATCH_DEADLINE: Duration = Duration::from_secs(120);

/// Runs `command` to its end or `deadline`, whichever comes first (then kills it and
/// fails), returning whether it succeeded and its output. The pipes are drained on threads,
/// so a chatty child cannot block on a full pipe.
fn run_bounded(mut command: Command, deadline: Duration) -> Result<(bool, String, String)> {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot start it")?;
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_string(&mut text);
            }
            text
        })
    };
    let stdout = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let stderr = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().context("waiting for it")? {
            break status;
        }
        if started.elapsed() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            anyhow::bail!("still running after {deadline:?}; killed");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stdout = stdout.join().unwrap_or_default();
    let stderr = stderr.join().unwrap_or_default();
    Ok((status.success(), stdout, stderr))
}

/// A keyword provider answering every request with two keywords (thread per process).
struct FakeProvider {
    addr: std::net::SocketAddr,
}

impl FakeProvider {
    fn start() -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").context("binding the fake provider")?;
        let addr = listener.local_addr()?;
        std::thread::spawn(move || {
            for stream in listener.incoming().map_while(Result::ok) {
                let _ = answer(stream);
            }
        });
        Ok(Self { addr })
    }
}

fn answer(mut stream: TcpStream) -> std::io::Result<()> {
    // One connection at a time: a client that stalls must not block the others for ever.
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    while reader.read_line(&mut line)? > 0 && line != "\r\n" {
        line.clear();
    }
    let body = r#"{"keywords":[{"keyword":"rust batch jobs","date":"2026-11-30","search_volume":1200,"position":4.5,"clicks":40,"impressions":900,"ctr":0.044},{"keyword":"advisory locks","date":"2026-11-30","search_volume":300,"position":2.1,"clicks":25,"impressions":260,"ctr":0.096}]}"#;
    write!(
        stream,
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )?;
    stream.flush()
}
