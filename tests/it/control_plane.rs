//! Black-box tests of `smartbeak-control-plane` and the `smartbeak-domain-export`
//! placeholder: the real binaries against a fresh database.

use std::process::Stdio;
use std::time::Duration;

use smartbeak_database::testing::TestDatabase;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

use crate::support::binary;

fn control_plane(database_url: &str) -> Command {
    let mut cmd =
        Command::new(binary("smartbeak-control-plane", "smartbeak-control-plane").unwrap());
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("DATABASE_URL", database_url)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

#[tokio::test]
async fn control_plane_migrates_and_exits_zero_on_sigterm() {
    let tdb = TestDatabase::create().await.unwrap();
    let url = tdb.url().expose().to_owned();
    let mut child = control_plane(&url).spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut log = Vec::new();
    let ready = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            let done = line.contains("control-plane ready");
            log.push(line);
            if done {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(ready.ok(), Some(true), "never ready:\n{}", log.join("\n"));

    // Its sessions carry its application_name and the schema is there.
    let admin = sqlx::PgPool::connect(&url).await.unwrap();
    let sessions: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'smartbeak-control-plane'",
    )
    .fetch_one(&admin)
    .await
    .unwrap();
    assert!(sessions >= 1, "no session named smartbeak-control-plane");
    let batch_runs: Option<String> = sqlx::query_scalar("SELECT to_regclass('batch_runs')::text")
        .fetch_one(&admin)
        .await
        .unwrap();
    assert_eq!(batch_runs.as_deref(), Some("batch_runs"));

    let pid = child.id().unwrap();
    smartbeak_test_support::signal(pid, "TERM").unwrap();
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("exits after SIGTERM")
        .unwrap();
    while let Ok(Some(line)) = lines.next_line().await {
        log.push(line);
    }
    let log = log.join("\n");
    assert_eq!(status.code(), Some(0), "{log}");
    // The report says the pools were closed by their handler, in the release phase. (The
    // server may list the session for a moment after the process is gone, so this is read
    // from the report rather than from pg_stat_activity.)
    assert!(
        log.contains("handler=db-pools phase=release outcome=\"ok\""),
        "{log}"
    );
    assert!(
        log.contains("database pools closed") && log.contains("shutdown complete"),
        "{log}"
    );
    admin.close().await;
    tdb.drop_database().await.unwrap();
}

#[tokio::test]
async fn control_plane_refuses_bad_configuration_with_the_variable_named() {
    let output = control_plane("postgres://postgres@127.0.0.1:5432/postgres")
        .env("DB_POOL_MIN", "30")
        .env("DB_POOL_MAX", "20")
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("DB_POOL_MIN (30) is greater than DB_POOL_MAX (20)"),
        "{stdout}"
    );
    assert!(!stdout.contains("panicked"), "{stdout}");

    let output = control_plane("postgres://user:password@127.0.0.1:5432/postgres")
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("DATABASE_URL is invalid") && stdout.contains("placeholder"),
        "{stdout}"
    );
    assert!(
        !stdout.contains(":password@"),
        "the password reached the log: {stdout}"
    );
}

#[tokio::test]
async fn domain_export_placeholder_says_it_is_not_implemented() {
    let output = Command::new(binary("smartbeak-api", "smartbeak-domain-export").unwrap())
        .output()
        .await
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("not implemented yet"));
}
