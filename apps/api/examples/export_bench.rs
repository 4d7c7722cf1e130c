//! Domain export benchmark (issue 11): exports N content rows of one domain to CSV, JSON and
//! Markdown, beside `psql -c "\copy (SELECT ...) TO ... CSV"` on the same rows, each as a
//! separate process (wall time, and peak RSS: the child's `ru_maxrss`); then 5 exports of
//! N/5 rows each (disjoint date ranges of the same domain), one after another and then
//! concurrently through `smartbeak_utils::concurrency::map_bounded`.
//!
//! Usage (release build; DATABASE_URL names the server, default
//! postgres://postgres@127.0.0.1:5432/postgres):
//!
//! ```sh
//! cargo run --release -p smartbeak-api --example export_bench -- --rows 1000000
//! ```
//!
//! It creates its own database `sb_bench_<pid>`, seeds it, and drops it at the end; it
//! never touches the tables of the database DATABASE_URL names. `--only` is the child mode
//! (one export of an already seeded database, timing printed on stdout).
//!
//! `--formats` takes `FORMAT` or `FORMAT:ZIP_LEVEL` (`csv:0`: the CSV export with a stored
//! ZIP, beside the default deflate level in the same rounds). `--json FILE` writes every
//! round's figures and the 5-export speedup for `cargo xtask bench`.

use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use chrono::{DateTime, Duration, TimeZone, Utc};
use clap::Parser;
use smartbeak_api::jobs::export::{ExportDir, ExportLimits, run_export};
use smartbeak_api::jobs::queue::{ExportFormat, ExportSpec, Progress};
use smartbeak_database::{Database, DatabaseConfig, SecretUrl};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

#[derive(Debug, Parser)]
struct Args {
    /// Content rows to seed.
    #[arg(long, default_value_t = 1_000_000)]
    rows: u64,
    /// Child mode: run one export of `--database` and print its timing.
    #[arg(long)]
    only: bool,
    /// Child mode: the format.
    #[arg(long, default_value = "csv")]
    format: String,
    /// Child mode: the seeded database's name.
    #[arg(long)]
    database: Option<String>,
    /// Child mode: the org.
    #[arg(long)]
    org: Option<Uuid>,
    /// Child mode: the domain.
    #[arg(long)]
    domain: Option<Uuid>,
    /// Where the files go (a temp dir by default).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Rounds of (COPY, csv, json, markdown), interleaved; the table shows medians.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Formats to run beside COPY (comma separated; `csv:0` sets that run's ZIP level).
    #[arg(long, default_value = "csv,json,markdown")]
    formats: String,
    /// Also write the figures (every round, the 5-export speedup) to this JSON file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// EXPORT_ZIP_LEVEL of the CSV exports' ZIP: 0 stored, 1 to 9 deflate.
    #[arg(long, default_value_t = smartbeak_api::jobs::export::DEFAULT_ZIP_LEVEL)]
    zip_level: u8,
}

fn base_time() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0)
        .single()
        .unwrap_or_default()
}

fn admin_url() -> Result<SecretUrl> {
    let raw = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    Ok(SecretUrl::parse("DATABASE_URL", &raw)?)
}

async fn connect(url: &SecretUrl) -> Result<Database> {
    let mut config = DatabaseConfig::new(url.expose())?;
    // Seeding batches and ANALYZE on a shared, loaded machine can exceed the default 8 s.
    config.statement_timeout = std::time::Duration::from_secs(600);
    Ok(Database::connect(config, "export-bench").await?)
}

#[tokio::main]
async fn main() -> ExitCode {
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if let [_, flag, program, rest @ ..] = argv.as_slice()
        && flag == MEASURE
    {
        return measure(program, rest);
    }
    let args = Args::parse();
    let result = if args.only {
        child(&args).await
    } else {
        parent(&args).await
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("export_bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn spec(org: Uuid, domain: Uuid, format: ExportFormat) -> ExportSpec {
    ExportSpec {
        id: Uuid::new_v4(),
        token: 0,
        org_id: org,
        domain_id: domain,
        format,
        include_content: true,
        include_keywords: false,
        include_analytics: false,
        date_from: None,
        date_to: None,
    }
}

async fn export_once(
    db: &Database,
    spec: &ExportSpec,
    dir: &ExportDir,
    zip_level: u8,
) -> Result<(u64, u64)> {
    let (progress, _) = watch::channel(Progress::default());
    let output = run_export(
        db,
        spec,
        dir,
        ExportLimits {
            max_bytes: u64::MAX,
            zip_level,
        },
        &progress,
        &CancellationToken::new(),
    )
    .await?;
    std::fs::remove_file(dir.root().join(&output.storage_path))?;
    Ok((output.record_count, output.size_bytes))
}

/// One export in this process; prints `elapsed_s rows size` for the parent.
async fn child(args: &Args) -> Result<()> {
    let (Some(name), Some(org), Some(domain), Some(out)) =
        (&args.database, args.org, args.domain, &args.out)
    else {
        bail!("--only needs --database, --org, --domain and --out");
    };
    let format: ExportFormat = args.format.parse()?;
    let db = connect(&admin_url()?.with_database(name)).await?;
    let dir = ExportDir::open(out)?;
    let started = Instant::now();
    let (rows, size) = export_once(&db, &spec(org, domain, format), &dir, args.zip_level).await?;
    let elapsed = started.elapsed().as_secs_f64();
    #[allow(clippy::print_stdout)]
    {
        println!("{elapsed:.3} {rows} {size}");
    }
    Ok(())
}

/// Seeds `rows` content items (about 250 bytes of text each), one a second from
/// [`base_time`], in statements of 20,000 rows on a dedicated session.
async fn seed(db: &Database, org: Uuid, domain: Uuid, rows: u64) -> Result<()> {
    let mut conn = db.acquire().await?;
    sqlx::query("INSERT INTO orgs (id, name) VALUES ($1, 'bench')")
        .bind(org)
        .execute(&mut *conn)
        .await?;
    sqlx::query("INSERT INTO domains (id, org_id, name) VALUES ($1, $2, 'bench.example')")
        .bind(domain)
        .bind(org)
        .execute(&mut *conn)
        .await?;
    sqlx::query(
        "INSERT INTO domain_settings (domain_id, settings) \
         VALUES ($1, '{\"theme\": \"dark\", \"locale\": \"en\"}')",
    )
    .bind(domain)
    .execute(&mut *conn)
    .await?;
    // Short statements: the session keeps its statement_timeout.
    let step: u64 = 20_000;
    let mut start = 0;
    while start < rows {
        let end = (start + step).min(rows);
        sqlx::query(
            "INSERT INTO content_items (id, domain_id, title, slug, body, status, published_at, \
             created_at, updated_at, publish_at) \
             SELECT gen_random_uuid(), $1, \
               'How to ' || (ARRAY['grow','tend','prune','water','harvest'])[1 + i % 5] \
                 || ' your ' || (ARRAY['tomatoes','roses','basil','apple trees','orchids'])[1 + (i / 5) % 5] \
                 || ' in ' || (2000 + i % 26), \
               'post-' || i || '-' || left(md5(i::text), 12), \
               format('Part %s of the series. Notes on soil, light and \"timing\", with a \
                 checklist: %s; %s. Water early, mulch well, and check the leaves weekly.', \
                 i, md5(i::text), md5((i + 1)::text)), \
               (ARRAY['draft','published','scheduled','archived'])[1 + i % 4], \
               CASE WHEN i % 4 = 1 THEN $4 + i * interval '1 second' END, \
               $4 + i * interval '1 second', $4 + i * interval '1 second', \
               CASE WHEN i % 4 = 2 THEN $4 + i * interval '1 second' END \
             FROM generate_series($2::int8, $3::int8 - 1) AS i",
        )
        .bind(domain)
        .bind(i64::try_from(start)?)
        .bind(i64::try_from(end)?)
        .bind(base_time())
        .execute(&mut *conn)
        .await?;
        start = end;
        if end.is_multiple_of(100_000) || end == rows {
            eprintln!("seeded {end} rows");
        }
    }
    sqlx::query("ANALYZE content_items")
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// The argument that starts the measuring wrapper (see [`measure`]).
const MEASURE: &str = "--measure-rss";

/// The line the wrapper ends its stderr with.
const PEAK_PREFIX: &str = "export_bench: peak_rss_kb=";

/// Wall time and peak RSS (kB) of `command`, and its stdout. The command runs under this
/// example's own measuring wrapper (`export_bench --measure-rss PROGRAM ARGS...`), which
/// reports its one child's `ru_maxrss`, what `/usr/bin/time -v` prints, without needing
/// that package.
fn timed(command: Command) -> Result<(f64, u64, String)> {
    let program = command.get_program().to_string_lossy().into_owned();
    let mut wrapped = Command::new(std::env::current_exe()?);
    wrapped.arg(MEASURE).arg(command.get_program());
    wrapped.args(command.get_args());
    for (k, v) in command.get_envs() {
        if let Some(v) = v {
            wrapped.env(k, v);
        }
    }
    let started = Instant::now();
    let output = wrapped
        .output()
        .with_context(|| format!("running {program}"))?;
    let wall = started.elapsed().as_secs_f64();
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        bail!("{program} failed ({}): {stderr}", output.status);
    }
    let rss = stderr
        .lines()
        .find_map(|l| l.trim().strip_prefix(PEAK_PREFIX))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("{program}: the wrapper printed no peak RSS: {stderr}"))?;
    Ok((
        wall,
        rss,
        String::from_utf8_lossy(&output.stdout).into_owned(),
    ))
}

/// The measuring wrapper: runs `program args...` (stdio inherited), then prints the peak
/// RSS of that one child (`getrusage(RUSAGE_CHILDREN)`: this process has no other child)
/// and exits with its status.
fn measure(program: &std::ffi::OsStr, args: &[std::ffi::OsString]) -> ExitCode {
    let status = match Command::new(program).args(args).status() {
        Ok(status) => status,
        Err(e) => {
            eprintln!("export_bench: starting {}: {e}", program.to_string_lossy());
            return ExitCode::FAILURE;
        }
    };
    match nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN) {
        // Linux reports ru_maxrss in kilobytes.
        Ok(usage) => eprintln!("{PEAK_PREFIX}{}", usage.max_rss()),
        Err(e) => {
            eprintln!("export_bench: getrusage: {e}");
            return ExitCode::FAILURE;
        }
    }
    match status.code() {
        Some(0) => ExitCode::SUCCESS,
        Some(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        None => ExitCode::FAILURE,
    }
}

async fn parent(args: &Args) -> Result<()> {
    let admin = admin_url()?;
    let name = format!("sb_bench_{}", std::process::id());
    let admin_db = connect(&admin).await?;
    {
        let mut conn = admin_db.acquire().await?;
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut *conn)
            .await?;
    }
    let result = bench(args, &admin, &name).await;
    {
        let mut conn = admin_db.acquire().await?;
        sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .execute(&mut *conn)
            .await?;
    }
    result
}

#[allow(clippy::print_stdout)]
async fn bench(args: &Args, admin: &SecretUrl, name: &str) -> Result<()> {
    let url = admin.with_database(name);
    let db = connect(&url).await?;
    smartbeak_database::migrate(db.primary()).await?;
    let (org, domain) = (Uuid::new_v4(), Uuid::new_v4());
    let seeding = Instant::now();
    seed(&db, org, domain, args.rows).await?;
    eprintln!("seeded in {:.1} s", seeding.elapsed().as_secs_f64());
    let temp = tempfile::tempdir()?;
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| temp.path().to_path_buf());
    let dir = ExportDir::open(&out)?;
    let exe = std::env::current_exe()?;
    let rows = args.rows as f64;

    println!(
        "rows: {}   zip level: {}   (load average at start: {})",
        args.rows,
        args.zip_level,
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    println!("| run | wall (s) | in-process (s) | rows/s | / COPY | peak RSS (MB) | file (MB) |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: |");

    let copy_path = out.join("copy.csv");
    // (label, format, zip level) of every run beside COPY.
    let mut formats: Vec<(&str, &str, u8)> = Vec::new();
    for label in args.formats.split(',').filter(|f| !f.is_empty()) {
        let (format, level) = match label.split_once(':') {
            Some((format, level)) => (
                format,
                level
                    .parse()
                    .with_context(|| format!("--formats {label:?}: the ZIP level is 0 to 9"))?,
            ),
            None => (label, args.zip_level),
        };
        format.parse::<ExportFormat>()?;
        formats.push((label, format, level));
    }
    // Per run: (wall, in-process, peak RSS kB, file bytes) of every round. The runs of a
    // round are interleaved (COPY, then each format), so a busier moment of the shared
    // machine hits them alike; the table shows the median of the rounds.
    let mut copy_runs = Vec::new();
    let mut runs: Vec<Vec<(f64, f64, u64, f64)>> = vec![Vec::new(); formats.len()];
    for round in 0..args.rounds.max(1) {
        let mut psql = Command::new("psql");
        // The password goes to psql's environment, never its argv (visible to `ps`).
        let (conninfo, password) = split_password(url.expose());
        if let Some(password) = password {
            psql.env("PGPASSWORD", password);
        }
        psql.arg("-X").arg("-q").arg("-d").arg(conninfo).arg("-c").arg(format!(
            "\\copy (SELECT id, title, slug, body, status, published_at, created_at, updated_at \
             FROM content_items WHERE domain_id = '{domain}' ORDER BY created_at, id) TO '{}' CSV HEADER",
            copy_path.display()
        ));
        let (wall, rss, _) = timed(psql)?;
        let size = std::fs::metadata(&copy_path)?.len();
        std::fs::remove_file(&copy_path)?;
        copy_runs.push((wall, wall, rss, size as f64));
        for (i, (_, format, level)) in formats.iter().enumerate() {
            let mut child = Command::new(&exe);
            child
                .args(["--only", "--format", format, "--database", name])
                .arg("--org")
                .arg(org.to_string())
                .arg("--domain")
                .arg(domain.to_string())
                .arg("--out")
                .arg(&out)
                .arg("--zip-level")
                .arg(level.to_string());
            let (wall, rss, stdout) = timed(child)?;
            let fields: Vec<f64> = stdout
                .split_whitespace()
                .map(str::parse)
                .collect::<Result<_, _>>()
                .with_context(|| format!("the {format} export printed {stdout:?}"))?;
            let [inside, records, size] = fields[..] else {
                bail!("the {format} export printed {stdout:?}, not `elapsed records size`");
            };
            // Every content row must be in the file (the settings add their own records): a
            // fast export that wrote less is not a figure.
            if records < args.rows as f64 {
                bail!(
                    "the {format} export wrote {records} records for {} content rows",
                    args.rows
                );
            }
            runs[i].push((wall, inside, rss, size));
        }
        eprintln!(
            "round {round}: copy {:.2} s, {}",
            copy_runs[round].0,
            formats
                .iter()
                .zip(&runs)
                .map(|((f, _, _), r)| format!(
                    "{f} {:.2} s ({:.2}x COPY)",
                    r[round].0,
                    r[round].0 / copy_runs[round].0
                ))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let median = |values: &mut Vec<f64>| {
        values.sort_by(f64::total_cmp);
        values[values.len() / 2]
    };
    let copy_wall = median(&mut copy_runs.iter().map(|r| r.0).collect());
    let copy_rss = copy_runs.iter().map(|r| r.2).max().unwrap_or(0);
    println!(
        "| psql \\copy CSV | {copy_wall:.2} | | {:.0} | 1.00 | {:.1} | {:.1} |",
        rows / copy_wall,
        copy_rss as f64 / 1024.0,
        copy_runs[0].3 / 1e6
    );
    for ((format, _, _), runs) in formats.iter().zip(&runs) {
        let wall = median(&mut runs.iter().map(|r| r.0).collect());
        let inside = median(&mut runs.iter().map(|r| r.1).collect());
        // The worst round's peak, not the median.
        let rss = runs.iter().map(|r| r.2).max().unwrap_or(0);
        println!(
            "| {format} | {wall:.2} | {inside:.2} | {:.0} | {:.2} | {:.1} | {:.1} |",
            rows / wall,
            wall / copy_wall,
            rss as f64 / 1024.0,
            runs[0].3 / 1e6
        );
    }

    // 5 exports of a fifth of the rows each: disjoint created_at ranges.
    let part = i64::try_from(args.rows / 5)?;
    let specs: Vec<ExportSpec> = (0..5)
        .map(|k| {
            let mut s = spec(org, domain, ExportFormat::Csv);
            s.date_from = Some(base_time() + Duration::seconds(k * part));
            s.date_to = Some(base_time() + Duration::seconds((k + 1) * part));
            s
        })
        .collect();
    let started = Instant::now();
    for s in &specs {
        export_once(&db, s, &dir, args.zip_level).await?;
    }
    let sequential = started.elapsed().as_secs_f64();
    let started = Instant::now();
    let results = smartbeak_utils::concurrency::map_bounded(
        specs.iter(),
        NonZeroUsize::MIN.saturating_add(4),
        |s| export_once(&db, s, &dir, args.zip_level),
        None,
    )
    .await;
    let concurrent = started.elapsed().as_secs_f64();
    for r in results {
        r.map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    println!();
    println!(
        "5 CSV exports of {part} rows: one after another {sequential:.2} s, concurrently \
         (map_bounded, limit 5) {concurrent:.2} s, speedup {:.2}x",
        sequential / concurrent
    );
    if let Some(path) = &args.json {
        let rounds: Vec<serde_json::Value> = copy_runs
            .iter()
            .enumerate()
            .map(|(round, copy)| {
                let runs: Vec<serde_json::Value> = formats
                    .iter()
                    .zip(&runs)
                    .map(|((label, format, level), r)| {
                        let (wall, inside, rss, size) = r[round];
                        serde_json::json!({
                            "label": label, "format": format, "zip_level": level,
                            "wall_s": wall, "inside_s": inside, "peak_rss_kb": rss,
                            "bytes": size,
                        })
                    })
                    .collect();
                serde_json::json!({
                    "copy": {"wall_s": copy.0, "peak_rss_kb": copy.2, "bytes": copy.3},
                    "runs": runs,
                })
            })
            .collect();
        let json = serde_json::json!({
            "rows": args.rows,
            "default_zip_level": args.zip_level,
            "rounds": rounds,
            "parallel": {
                "exports": 5, "rows_each": part, "sequential_s": sequential,
                "concurrent_s": concurrent, "speedup": sequential / concurrent,
            },
        });
        std::fs::write(path, format!("{json:#}\n"))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// `url` without its password, and the password (percent-decoded), for a `postgres://`
/// URL `user:password@host/...`: the password then goes to `PGPASSWORD`.
fn split_password(url: &str) -> (String, Option<String>) {
    let Some((scheme, rest)) = url.split_once("://") else {
        return (url.to_owned(), None);
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return (url.to_owned(), None);
    };
    let Some((user, password)) = rest[..at].split_once(':') else {
        return (url.to_owned(), None);
    };
    let stripped = format!("{scheme}://{user}{}", &rest[at..]);
    (stripped, Some(percent_decode(password)))
}

/// `%XX` escapes decoded (a malformed one is kept as it is).
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
