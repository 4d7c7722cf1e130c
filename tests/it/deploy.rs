//! The `deploy/` folder checked against the real binaries: the Kubernetes manifests (every
//! variable set is one the binary's `--help` lists, commands are real subcommands, probes
//! are served on the port the binary listens on, grace periods cover the shutdown deadline,
//! the export worker's drain rule holds on the values it is given)
//! and every metric name and selector label value of the dashboard's and the alerting
//! rules' PromQL appear in `/metrics` of the running binaries after a short workload.
//!
//! The PromQL extractor is deliberately small: a metric name is an identifier followed by
//! `{`, `[` or standing alone, minus PromQL functions, keywords and the names inside
//! `by (...)` / `without (...)` / `on (...)` / `ignoring (...)` lists; string literals are
//! skipped. Its limits: it does not understand `__name__` matchers or recording-rule
//! names (there are none here); a label matcher's value is checked as a literal, or as an
//! alternation `a|b` of literals for `=~` (other regexes would be rejected by the check).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_yaml::Value;
use smartbeak_api::jobs::worker::{self, config as worker_defaults};
use smartbeak_database::DatabaseConfig;
use smartbeak_shutdown::ShutdownConfig;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::api::{Tenant, database, shared_redis_url};
use crate::support::binary;

fn deploy_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// Every document of every file the kustomization lists, plus the example Secret.
fn manifests() -> Vec<Value> {
    let base = deploy_dir().join("base");
    let kustomization: Value =
        serde_yaml::from_str(&std::fs::read_to_string(base.join("kustomization.yaml")).unwrap())
            .unwrap();
    let mut files: Vec<String> = kustomization["resources"]
        .as_sequence()
        .expect("kustomization resources")
        .iter()
        .map(|r| r.as_str().unwrap().to_owned())
        .collect();
    files.push("secret.example.yaml".to_owned());
    let mut docs = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(base.join(&file)).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let value = <Value as serde::Deserialize>::deserialize(doc)
                .unwrap_or_else(|e| panic!("{file} does not parse: {e}"));
            assert!(value["kind"].is_string(), "{file}: a document without kind");
            docs.push(value);
        }
    }
    docs
}

fn kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

/// A container of a Deployment or Job, with what the checks need.
struct Container {
    owner: String,
    command: Vec<String>,
    /// name -> literal value, or the ConfigMap value it refers to (None for Secret refs)
    env: BTreeMap<String, Option<String>>,
    grace_secs: Option<u64>,
    pre_stop_secs: u64,
    probes: Vec<(String, u16)>,
    container_ports: BTreeMap<String, u16>,
}

fn containers(docs: &[Value]) -> Vec<Container> {
    let config = &kind(docs, "ConfigMap")[0]["data"];
    let secret = &kind(docs, "Secret")[0]["stringData"];
    let mut out = Vec::new();
    for doc in docs
        .iter()
        .filter(|d| d["kind"] == "Deployment" || d["kind"] == "Job")
    {
        let owner = format!(
            "{} {}",
            doc["kind"].as_str().unwrap(),
            doc["metadata"]["name"].as_str().unwrap()
        );
        let spec = &doc["spec"]["template"]["spec"];
        for c in spec["containers"].as_sequence().unwrap() {
            let mut env = BTreeMap::new();
            for e in c["env"].as_sequence().into_iter().flatten() {
                let name = e["name"].as_str().unwrap().to_owned();
                let value = if let Some(v) = e["value"].as_str() {
                    Some(v.to_owned())
                } else if let Some(r) = e["valueFrom"]["configMapKeyRef"].as_mapping() {
                    let key = r[&Value::from("key")].as_str().unwrap();
                    let v = config[key].as_str();
                    assert!(
                        v.is_some(),
                        "{owner}: {name} refers to ConfigMap key {key}, which is not there"
                    );
                    v.map(str::to_owned)
                } else if let Some(r) = e["valueFrom"]["secretKeyRef"].as_mapping() {
                    let key = r[&Value::from("key")].as_str().unwrap();
                    assert!(
                        secret[key].is_string(),
                        "{owner}: {name} refers to Secret key {key}, missing from secret.example.yaml"
                    );
                    None
                } else {
                    assert!(
                        e["valueFrom"]["fieldRef"].is_mapping(),
                        "{owner}: {name} has no value"
                    );
                    None
                };
                env.insert(name, value);
            }
            let container_ports: BTreeMap<String, u16> = c["ports"]
                .as_sequence()
                .into_iter()
                .flatten()
                .map(|p| {
                    (
                        p["name"].as_str().unwrap().to_owned(),
                        p["containerPort"].as_u64().unwrap() as u16,
                    )
                })
                .collect();
            let mut probes = Vec::new();
            for probe in ["livenessProbe", "readinessProbe"] {
                let get = &c[probe]["httpGet"];
                if get.is_null() {
                    continue;
                }
                let port = match &get["port"] {
                    Value::Number(n) => n.as_u64().unwrap() as u16,
                    Value::String(name) => *container_ports.get(name).unwrap_or_else(|| {
                        panic!("{owner}: probe port {name} is not a container port")
                    }),
                    other => panic!("{owner}: probe port {other:?}"),
                };
                probes.push((get["path"].as_str().unwrap().to_owned(), port));
            }
            let pre_stop = &c["lifecycle"]["preStop"];
            let pre_stop_secs = pre_stop["sleep"]["seconds"].as_u64().unwrap_or(0);
            assert!(
                pre_stop["exec"].is_null(),
                "{owner}: use a preStop sleep (checked against the grace period), not exec"
            );
            out.push(Container {
                owner: owner.clone(),
                command: c["command"]
                    .as_sequence()
                    .unwrap_or_else(|| panic!("{owner}: no command"))
                    .iter()
                    .map(|s| s.as_str().unwrap().to_owned())
                    .collect(),
                env,
                grace_secs: spec["terminationGracePeriodSeconds"].as_u64(),
                pre_stop_secs,
                probes,
                container_ports,
            });
        }
    }
    out
}

/// `bin --help` and `bin <sub> --help` of a container's command; fails when the subcommand
/// is not one the binary has. `smartbeak-migrate` has no `--help` (it reads only the
/// database variables): its variables are checked against the database section of
/// `smartbeak-api --help`, which prints the same crate's variables.
fn help_of(command: &[String]) -> String {
    let (package, bin) = match command[0].as_str() {
        "smartbeak-control-plane" => ("smartbeak-control-plane", "smartbeak-control-plane"),
        "smartbeak-migrate" => {
            assert_eq!(command.len(), 1, "smartbeak-migrate takes no arguments");
            let api = binary("smartbeak-api", "smartbeak-api").unwrap();
            let help = std::process::Command::new(api)
                .arg("--help")
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&help.stdout).into_owned();
            let db = text
                .split("Database and shutdown variables")
                .nth(1)
                .expect("smartbeak-api --help has a database section");
            return db.to_owned();
        }
        "smartbeak-api" | "smartbeak-domain-export" => ("smartbeak-api", command[0].as_str()),
        other => panic!("{other} is not a binary of the workspace"),
    };
    let path = binary(package, bin).unwrap();
    let mut text = String::new();
    let mut args: Vec<&str> = command[1..].iter().map(String::as_str).collect();
    for depth in 0..=args.len() {
        let mut help_args: Vec<&str> = args[..depth].to_vec();
        help_args.push("--help");
        let out = std::process::Command::new(&path)
            .args(&help_args)
            .env_clear()
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{command:?}: `{bin} {}` fails, not a real subcommand: {}",
            help_args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        text.push_str(&String::from_utf8_lossy(&out.stdout));
    }
    args.clear();
    text
}

fn words(text: &str) -> BTreeSet<String> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| !w.is_empty())
        .map(str::to_owned)
        .collect()
}

/// A default `[N]` printed by `--help` on the line of `var`.
fn help_default(help: &str, var: &str) -> Option<u64> {
    let line = help.lines().find(|l| words(l).contains(var))?;
    let open = line.rfind('[')?;
    line[open + 1..].split(']').next()?.parse().ok()
}

#[test]
fn manifests_agree_with_the_binaries_help_and_shutdown_deadline() {
    let docs = manifests();
    let all = containers(&docs);
    for expected in [
        "Deployment smartbeak-api",
        "Deployment smartbeak-export-worker",
        "Deployment smartbeak-control-plane",
        "Job smartbeak-migrate",
    ] {
        assert!(
            all.iter().any(|c| c.owner == expected),
            "missing {expected}"
        );
    }
    for d in kind(&docs, "Deployment") {
        assert_eq!(
            d["spec"]["replicas"].as_u64(),
            Some(2),
            "{:?} replicas",
            d["metadata"]["name"]
        );
        let labels = &d["spec"]["selector"]["matchLabels"];
        assert!(
            kind(&docs, "PodDisruptionBudget")
                .iter()
                .any(|p| &p["spec"]["selector"]["matchLabels"] == labels),
            "no PodDisruptionBudget selects {labels:?}"
        );
    }
    for c in &all {
        let help = help_of(&c.command);
        let known = words(&help);
        for var in c.env.keys() {
            assert!(
                known.contains(var),
                "{}: sets {var}, which `{} --help` does not list (renamed or removed in the code?)",
                c.owner,
                c.command.join(" ")
            );
        }
        if c.owner.starts_with("Job") {
            continue;
        }
        let ms = |var: &str| -> u64 {
            match c.env.get(var) {
                Some(Some(v)) => v
                    .parse()
                    .unwrap_or_else(|_| panic!("{}: {var}={v} is not a number", c.owner)),
                _ => help_default(&help, var)
                    .unwrap_or_else(|| panic!("{}: no default for {var} in --help", c.owner)),
            }
        };
        let deadline_ms = ms("SHUTDOWN_TIMEOUT_MS");
        let delay_ms = ms("SHUTDOWN_READINESS_DELAY_MS");
        let need_ms = c.pre_stop_secs * 1000 + delay_ms + deadline_ms + 5000;
        let grace = c.grace_secs.unwrap_or(30);
        assert!(
            grace * 1000 >= need_ms,
            "{}: terminationGracePeriodSeconds {grace} < preStop {} s + SHUTDOWN_READINESS_DELAY_MS {delay_ms} + SHUTDOWN_TIMEOUT_MS {deadline_ms} + 5 s margin",
            c.owner,
            c.pre_stop_secs
        );
        if c.command[0] == "smartbeak-domain-export" {
            check_worker_shutdown(c);
        }
        // the probes' port is the one the binary is told to listen on
        let paths: BTreeSet<&str> = c.probes.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(
            paths,
            BTreeSet::from(["/healthz", "/readyz"]),
            "{}: liveness /healthz and readiness /readyz",
            c.owner
        );
        let (_, addr_var) = listener(&c.command);
        let addr = c
            .env
            .get(addr_var)
            .cloned()
            .flatten()
            .unwrap_or_else(|| panic!("{}: {addr_var} not set", c.owner));
        for (path, port) in &c.probes {
            assert!(
                addr.ends_with(&format!(":{port}")),
                "{}: probe {path} on port {port}, but {addr_var}={addr}",
                c.owner
            );
        }
        assert!(
            c.container_ports
                .values()
                .all(|p| addr.ends_with(&format!(":{p}"))),
            "{}: container ports vs {addr_var}",
            c.owner
        );
    }
}

/// The export worker's shutdown rule on the container's values, through the functions the
/// binary itself calls (`worker::shutdown_config`, then `worker::check_shutdown`): the drain
/// holds a late claim and its release, and the drain plus the pools' close fit in
/// `SHUTDOWN_TIMEOUT_MS`. The ConfigMap shares `SHUTDOWN_TIMEOUT_MS` and
/// `DB_STATEMENT_TIMEOUT_MS` with the other binaries, so a change made for them fails here
/// rather than in a worker that exits 2 at every start.
fn check_worker_shutdown(c: &Container) {
    let lookup = |name: &str| match c.env.get(name) {
        Some(Some(value)) => Some(value.clone()),
        // a Secret ref (the database URLs): any URL will do, only the timeouts matter
        Some(None) if name.ends_with("_URL") => Some("postgres://u@localhost/smartbeak".to_owned()),
        _ => None,
    };
    let shutdown = ShutdownConfig::from_lookup(lookup)
        .unwrap_or_else(|e| panic!("{}: shutdown configuration: {e}", c.owner));
    let db = DatabaseConfig::from_lookup(lookup)
        .unwrap_or_else(|e| panic!("{}: database configuration: {e}", c.owner));
    let pool_close = Duration::from_millis(lookup("SHUTDOWN_POOL_CLOSE_MS").map_or(
        worker_defaults::DEFAULT_POOL_CLOSE_MS,
        |v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{}: SHUTDOWN_POOL_CLOSE_MS={v}", c.owner))
        },
    ));
    let shutdown = worker::shutdown_config(shutdown, pool_close);
    if let Err(reason) = worker::check_shutdown(&shutdown, &db, pool_close) {
        panic!(
            "{}: the export worker would refuse to start (exit 2): {reason}",
            c.owner
        );
    }
}

/// The log line that gives a binary's listener and the variable setting its address.
fn listener(command: &[String]) -> (&'static str, &'static str) {
    match command[0].as_str() {
        "smartbeak-api" => ("listening on http://", "API_BIND"),
        "smartbeak-domain-export" => ("admin listening on http://", "EXPORT_ADMIN_ADDR"),
        "smartbeak-control-plane" => ("admin listening on http://", "CP_ADMIN_ADDR"),
        other => panic!("{other} has no listener"),
    }
}

/// A binary started with the manifest's command, its listener on port 0.
struct Proc {
    _child: Child,
    addr: String,
    output: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    async fn start(command: &[String], env: &[(&str, String)]) -> Result<Self> {
        let package = if command[0] == "smartbeak-control-plane" {
            "smartbeak-control-plane"
        } else {
            "smartbeak-api"
        };
        let (marker, addr_var) = listener(command);
        let mut child = Command::new(binary(package, &command[0])?)
            .args(&command[1..])
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env(addr_var, "127.0.0.1:0")
            .env("RUST_LOG", "info")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("spawning {command:?}"))?;
        let output = Arc::new(Mutex::new(Vec::new()));
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let streams: Vec<Box<dyn tokio::io::AsyncRead + Send + Unpin>> = vec![
            Box::new(child.stdout.take().context("stdout")?),
            Box::new(child.stderr.take().context("stderr")?),
        ];
        for stream in streams {
            let (output, tx) = (output.clone(), tx.clone());
            tokio::spawn(async move {
                let mut lines = BufReader::new(stream).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if let Some(at) = line.find(marker) {
                        let addr: String = line[at + marker.len()..]
                            .chars()
                            .take_while(|c| *c != '"' && !c.is_whitespace())
                            .collect();
                        let _ = tx.send(addr);
                    }
                    output.lock().unwrap().push(line);
                }
            });
        }
        drop(tx);
        match tokio::time::timeout(Duration::from_secs(30), rx.recv()).await {
            Ok(Some(addr)) => Ok(Self {
                _child: child,
                addr,
                output,
            }),
            _ => bail!(
                "{command:?} did not start; output:\n{}",
                output.lock().unwrap().join("\n")
            ),
        }
    }

    async fn get(&self, path: &str) -> (u16, String) {
        let r = reqwest::get(format!("http://{}{path}", self.addr))
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }
}

/// A metric name with the `label -> values` its selectors ask for.
type Selector = (String, Vec<(String, Vec<String>)>);

/// Metric names and `label -> values` of selectors in a PromQL expression.
fn promql_names(expr: &str) -> Vec<Selector> {
    const NOT_METRICS: &[&str] = &[
        "sum",
        "min",
        "max",
        "avg",
        "count",
        "rate",
        "irate",
        "increase",
        "delta",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "and",
        "or",
        "unless",
        "offset",
        "bool",
        "histogram_quantile",
        "absent",
        "abs",
        "clamp_min",
        "clamp_max",
        "topk",
        "bottomk",
        "quantile",
        "label_replace",
        "time",
        "vector",
        "scalar",
        "avg_over_time",
        "max_over_time",
        "min_over_time",
        "sum_over_time",
        "changes",
        "resets",
        "deriv",
        "predict_linear",
    ];
    let b = expr.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i] as char;
        if c == '"' {
            i += 1;
            while i < b.len() && b[i] != b'"' {
                i += if b[i] == b'\\' { 2 } else { 1 };
            }
            i += 1;
            continue;
        }
        if c == '[' {
            i += expr[i..].find(']').unwrap() + 1;
            continue;
        }
        if c.is_ascii_alphabetic() || c == '_' {
            let start = i;
            while i < b.len()
                && ((b[i] as char).is_ascii_alphanumeric() || b[i] == b'_' || b[i] == b':')
            {
                i += 1;
            }
            let word = &expr[start..i];
            let rest = expr[i..].trim_start();
            if matches!(word, "by" | "without" | "on" | "ignoring") && rest.starts_with('(') {
                i += expr[i..].find(')').unwrap() + 1;
                continue;
            }
            if NOT_METRICS.contains(&word) || rest.starts_with('(') {
                continue;
            }
            let mut matchers = Vec::new();
            if rest.starts_with('{') {
                let open = i + expr[i..].find('{').unwrap();
                let close = open + expr[open..].find('}').unwrap();
                for m in expr[open + 1..close]
                    .split(',')
                    .filter(|m| !m.trim().is_empty())
                {
                    let (label, value) = m
                        .split_once("=~")
                        .or_else(|| m.split_once("!="))
                        .or_else(|| m.split_once('='))
                        .unwrap_or_else(|| panic!("matcher {m} in {expr}"));
                    if m.contains("!=") || m.contains("!~") {
                        continue;
                    }
                    let value = value.trim().trim_matches('"');
                    // an HTTP status class ("5..") is a pattern, not a value
                    if value.contains('.') && label.trim() == "status" {
                        continue;
                    }
                    matchers.push((
                        label.trim().to_owned(),
                        value.split('|').map(str::to_owned).collect(),
                    ));
                }
                i = close + 1;
            }
            out.push((word.to_owned(), matchers));
            continue;
        }
        i += 1;
    }
    out
}

fn dashboard() -> serde_json::Value {
    let path = deploy_dir().join("grafana/smartbeak.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap())
        .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

/// Every panel of the dashboard in order, the panels of a collapsed row included (Grafana
/// keeps those inside the row).
fn dashboard_panels(dash: &serde_json::Value) -> Vec<&serde_json::Value> {
    let mut out = Vec::new();
    for panel in dash["panels"].as_array().expect("dashboard panels") {
        out.push(panel);
        out.extend(panel["panels"].as_array().into_iter().flatten());
    }
    out
}

fn dashboard_and_rule_exprs() -> Vec<String> {
    let dir = deploy_dir();
    let mut exprs = Vec::new();
    let dash = dashboard();
    for panel in dashboard_panels(&dash) {
        for t in panel["targets"].as_array().into_iter().flatten() {
            exprs.push(t["expr"].as_str().unwrap().to_owned());
        }
    }
    let rules: Value =
        serde_yaml::from_str(&std::fs::read_to_string(dir.join("prometheus/rules.yaml")).unwrap())
            .unwrap();
    for g in rules["groups"].as_sequence().unwrap() {
        for r in g["rules"].as_sequence().unwrap() {
            exprs.push(r["expr"].as_str().unwrap().to_owned());
            for key in ["summary", "description"] {
                assert!(
                    r["annotations"][key].is_string(),
                    "{:?}: no {key}",
                    r["alert"]
                );
            }
            assert!(
                r["labels"]["severity"].is_string(),
                "{:?}: no severity",
                r["alert"]
            );
        }
    }
    assert!(
        exprs.len() > 20,
        "too few expressions read: {}",
        exprs.len()
    );
    exprs
}

/// The labels of every `by (...)` clause of `expr`.
fn grouping_labels(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = expr;
    while let Some(at) = rest.find("by (") {
        let list = &rest[at + 4..];
        let close = list.find(')').unwrap_or(list.len());
        out.extend(list[..close].split(',').map(|l| l.trim().to_owned()));
        rest = &list[close..];
    }
    out
}

/// A topic of the dashboard bullet: a panel whose query reads `metric`, grouped
/// by every label of `by`, with `matcher` (a label and one of its values) if given and
/// `contains` in its text if given.
struct Topic {
    topic: &'static str,
    metric: &'static str,
    by: &'static [&'static str],
    matcher: Option<(&'static str, &'static str)>,
    contains: Option<&'static str>,
}

const fn topic(topic: &'static str, metric: &'static str, by: &'static [&'static str]) -> Topic {
    Topic {
        topic,
        metric,
        by,
        matcher: None,
        contains: None,
    }
}

/// The dashboard bullet, topic by topic.
const TOPICS: &[Topic] = &[
    Topic {
        contains: Some("rate(http_requests_total"),
        ..topic(
            "api request rate",
            "http_requests_total",
            &["route", "status"],
        )
    },
    Topic {
        matcher: Some(("quantile", "0.99")),
        ..topic(
            "api latency percentiles",
            "http_request_duration_seconds",
            &["route", "quantile"],
        )
    },
    Topic {
        contains: Some("5.."),
        ..topic(
            "api errors by route and status",
            "http_requests_total",
            &["route", "status"],
        )
    },
    topic(
        "rate-limit decisions by backend and outcome",
        "rate_limit_decisions_total",
        &["backend", "decision"],
    ),
    topic("Redis connection state", "redis_connected", &[]),
    topic("Redis errors", "redis_connection_error_total", &[]),
    topic(
        "circuit breaker state per adapter",
        "circuit_breaker_state",
        &["adapter"],
    ),
    topic(
        "circuit breaker rejections per adapter",
        "circuit_breaker_rejected_total",
        &["adapter"],
    ),
    topic("db pool size", "db_pool_max_connections", &["pool"]),
    Topic {
        contains: Some("state"),
        ..topic("db pool in use", "db_pool_connections", &["pool"])
    },
    topic("db pool waiters", "db_pool_waiters", &[]),
    Topic {
        contains: Some("histogram_quantile"),
        ..topic("db acquire latency", "db_acquire_seconds_bucket", &["le"])
    },
    topic("export queue depth", "export_queue_depth", &[]),
    topic(
        "export oldest queued age",
        "export_queue_oldest_age_seconds",
        &[],
    ),
    Topic {
        contains: Some("rate(export_jobs_total"),
        ..topic("export throughput", "export_jobs_total", &["outcome"])
    },
    Topic {
        matcher: Some(("outcome", "failed")),
        ..topic("export failures", "export_jobs_total", &[])
    },
    topic(
        "batch runs by operation and outcome",
        "control_plane_runs_total",
        &["operation", "outcome"],
    ),
    Topic {
        matcher: Some(("outcome", "failed")),
        ..topic(
            "batch failed items",
            "control_plane_items_total",
            &["operation"],
        )
    },
];

impl Topic {
    fn answered_by(&self, expr: &str) -> bool {
        let by = grouping_labels(expr);
        promql_names(expr).iter().any(|(name, matchers)| {
            name == self.metric
                && self.by.iter().all(|l| by.contains(*l))
                && self.matcher.is_none_or(|(label, value)| {
                    matchers
                        .iter()
                        .any(|(l, vs)| l == label && vs.iter().any(|v| v == value))
                })
                && self.contains.is_none_or(|c| expr.contains(c))
        })
    }
}

#[test]
fn dashboard_is_an_importable_model_with_a_panel_per_topic() {
    let dash = dashboard();
    for key in ["title", "uid"] {
        assert!(
            dash[key].as_str().is_some_and(|v| !v.is_empty()),
            "dashboard {key}"
        );
    }
    assert!(dash["schemaVersion"].is_u64(), "dashboard schemaVersion");
    let variables = dash["templating"]["list"].as_array().expect("templating");
    assert!(
        variables.iter().any(|v| v["name"] == "datasource"
            && v["type"] == "datasource"
            && v["query"] == "prometheus"),
        "a `datasource` variable of type prometheus (what `${{datasource}}` refers to)"
    );
    let panels = dashboard_panels(&dash);
    assert_eq!(
        panels.first().map(|p| &p["type"]),
        Some(&serde_json::Value::from("row")),
        "the dashboard starts with a row"
    );
    let mut ids = BTreeSet::new();
    let mut exprs = Vec::new();
    let mut row = String::new();
    for panel in &panels {
        let title = panel["title"].as_str().unwrap_or_default();
        assert!(!title.is_empty(), "a panel without a title: {panel}");
        let id = panel["id"]
            .as_u64()
            .unwrap_or_else(|| panic!("{title}: no id"));
        assert!(ids.insert(id), "{title}: id {id} used twice");
        let grid = &panel["gridPos"];
        for key in ["h", "w", "x", "y"] {
            assert!(grid[key].is_u64(), "{title}: gridPos.{key}");
        }
        assert!(
            grid["x"].as_u64().unwrap() + grid["w"].as_u64().unwrap() <= 24,
            "{title}: wider than the 24 columns"
        );
        if panel["type"] == "row" {
            assert!(
                title.ends_with("?)"),
                "row {title}: names the question it answers, in brackets (README, Operations)"
            );
            assert!(panel["targets"].is_null(), "row {title} has targets");
            row = title.to_owned();
            continue;
        }
        assert!(panel["type"].is_string(), "{row} / {title}: no panel type");
        let datasource = &panel["datasource"];
        assert!(
            datasource["type"] == "prometheus" && datasource["uid"] == "${datasource}",
            "{row} / {title}: datasource {datasource}"
        );
        let targets = panel["targets"]
            .as_array()
            .filter(|t| !t.is_empty())
            .unwrap_or_else(|| panic!("{row} / {title}: no targets"));
        let mut ref_ids = BTreeSet::new();
        for t in targets {
            let expr = t["expr"]
                .as_str()
                .filter(|e| !e.trim().is_empty())
                .unwrap_or_else(|| panic!("{row} / {title}: a target without expr"));
            let ref_id = t["refId"].as_str().unwrap_or_default();
            assert!(
                !ref_id.is_empty() && ref_ids.insert(ref_id),
                "{row} / {title}: refId {ref_id:?} missing or used twice"
            );
            assert!(
                t["datasource"].is_null() || &t["datasource"] == datasource,
                "{row} / {title}: the target's datasource differs from the panel's"
            );
            exprs.push(expr.to_owned());
        }
    }
    let missing: Vec<&str> = TOPICS
        .iter()
        .filter(|t| !exprs.iter().any(|e| t.answered_by(e)))
        .map(|t| t.topic)
        .collect();
    assert!(
        missing.is_empty(),
        "no dashboard panel answers: {}",
        missing.join(", ")
    );
}

/// `name -> label -> values` of every sample in Prometheus text.
fn samples(text: &str, into: &mut BTreeMap<String, BTreeMap<String, BTreeSet<String>>>) {
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
    {
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let name = &line[..name_end];
        let labels = into.entry(name.to_owned()).or_default();
        if line[name_end..].starts_with('{') {
            let close = line.rfind('}').unwrap();
            for pair in line[name_end + 1..close].split("\",") {
                if let Some((k, v)) = pair.split_once('=') {
                    labels
                        .entry(k.to_owned())
                        .or_default()
                        .insert(v.trim_matches('"').to_owned());
                }
            }
        }
        for suffix in ["_bucket", "_sum", "_count"] {
            if let Some(base) = name.strip_suffix(suffix) {
                into.entry(base.to_owned()).or_default();
            }
        }
    }
}

fn command_of(docs: &[Value], deployment: &str) -> Vec<String> {
    containers(docs)
        .into_iter()
        .find(|c| c.owner == format!("Deployment {deployment}"))
        .unwrap()
        .command
}

#[tokio::test]
async fn probes_are_served_and_every_promql_metric_is_emitted() {
    let docs = manifests();
    let (db, url) = database().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let export_dir = dir.path().display().to_string();
    let prefix = format!("sb_deploy_{}", uuid::Uuid::new_v4().simple());
    let api = Proc::start(
        &command_of(&docs, "smartbeak-api"),
        &[
            ("DATABASE_URL", url.clone()),
            ("EXPORT_DIR", export_dir.clone()),
            ("REDIS_URL", shared_redis_url()),
            ("RATE_LIMIT_KEY_PREFIX", prefix),
        ],
    )
    .await
    .unwrap();
    let worker = Proc::start(
        &command_of(&docs, "smartbeak-export-worker"),
        &[
            ("DATABASE_URL", url.clone()),
            ("EXPORT_DIR", export_dir.clone()),
            ("DB_RUN_MIGRATIONS", "false".to_owned()),
            ("EXPORT_POLL_MAX_MS", "200".to_owned()),
            ("EXPORT_REAPER_INTERVAL_SECS", "1".to_owned()),
        ],
    )
    .await
    .unwrap();
    let cp = Proc::start(
        &command_of(&docs, "smartbeak-control-plane"),
        &[
            ("DATABASE_URL", url.clone()),
            ("EXPORT_DIR", export_dir.clone()),
            ("DB_RUN_MIGRATIONS", "false".to_owned()),
            ("CP_CONTENT_SCHEDULER_INTERVAL_SECS", "1".to_owned()),
        ],
    )
    .await
    .unwrap();
    // the probe paths of the manifests, on each binary's listener
    for (proc, name) in [
        (&api, "smartbeak-api"),
        (&worker, "smartbeak-export-worker"),
        (&cp, "smartbeak-control-plane"),
    ] {
        let c = containers(&docs)
            .into_iter()
            .find(|c| c.owner == format!("Deployment {name}"))
            .unwrap();
        for (path, _) in &c.probes {
            let (status, body) = proc.get(path).await;
            assert_eq!(status, 200, "{name} {path}: {body}");
        }
    }
    // a short workload: authenticated requests, one export through the worker
    let tenant = Tenant::create(&url, "deploy").await.unwrap();
    let http = reqwest::Client::new();
    let base = format!("http://{}", api.addr);
    let listed = http
        .get(format!("{base}/v1/domains"))
        .header("authorization", tenant.bearer())
        .send()
        .await
        .unwrap();
    assert_eq!(listed.status(), 200);
    let domain = create_domain_via(&http, &base, &tenant).await;
    let r = http
        .post(format!("{base}/v1/domains/{domain}/exports"))
        .header("authorization", tenant.bearer())
        .json(&serde_json::json!({ "format": "json" }))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.text().await.unwrap());
    let _ = http.get(format!("{base}/v1/nope")).send().await;
    // Series registered only on their event, provoked on two more api processes: Redis on
    // a closed port (fail open, then fail closed) and one request slot, held by a request
    // whose body never finishes, so the next one is shed.
    let closed_redis = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("redis://{}", l.local_addr().unwrap())
    };
    let mut degraded = Vec::new();
    for fail_closed in ["false", "true"] {
        let proc = Proc::start(
            &command_of(&docs, "smartbeak-api"),
            &[
                ("DATABASE_URL", url.clone()),
                ("EXPORT_DIR", export_dir.clone()),
                ("DB_RUN_MIGRATIONS", "false".to_owned()),
                ("REDIS_URL", closed_redis.clone()),
                ("RATE_LIMIT_FAIL_CLOSED", fail_closed.to_owned()),
                ("HTTP_MAX_CONCURRENCY", "1".to_owned()),
            ],
        )
        .await
        .unwrap();
        let r = http
            .get(format!("http://{}/v1/domains", proc.addr))
            .header("authorization", tenant.bearer())
            .send()
            .await
            .unwrap();
        let expected = if fail_closed == "true" { 503 } else { 200 };
        assert_eq!(r.status().as_u16(), expected, "fail closed {fail_closed}");
        degraded.push(proc);
    }
    shed_one_request(&degraded[0], &tenant).await;
    // wait (bounded) for the export and a control-plane run to be counted; a run that is
    // not counted (say the metric was renamed) is left to the name check below, which says
    // which name is missing
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (_, w) = worker.get("/metrics").await;
        let (_, c) = cp.get("/metrics").await;
        let exported = w.contains("outcome=\"succeeded\"} 1");
        if exported && c.contains("control_plane_runs_total{") {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            assert!(
                exported,
                "no export counted:\n{w}\n{}",
                worker.output.lock().unwrap().join("\n")
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut emitted = BTreeMap::new();
    for proc in [&api, &worker, &cp].into_iter().chain(&degraded) {
        samples(&proc.get("/metrics").await.1, &mut emitted);
    }
    let mut problems = Vec::new();
    for expr in dashboard_and_rule_exprs() {
        for (name, matchers) in promql_names(&expr) {
            let Some(labels) = emitted.get(&name) else {
                problems.push(format!(
                    "{name} (in `{expr}`) is not in any binary's /metrics"
                ));
                continue;
            };
            for (label, values) in matchers {
                for v in values {
                    if !labels.get(&label).is_some_and(|vs| vs.contains(&v)) {
                        problems.push(format!("{name}{{{label}=\"{v}\"}} (in `{expr}`): the code emits {label} = {:?}", labels.get(&label)));
                    }
                }
            }
        }
    }
    // Every series of a bounded label set is registered at 0 when its binary starts
    // (`RateLimiter::register_metrics`, `http::register_metrics`, the worker's and the
    // control-plane's `metrics::register`), so a failed or interrupted run and a
    // dead-lettered export are in `/metrics` before they happen.
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    drop((api, worker, cp, degraded));
    db.drop_database().await.unwrap();
}

async fn create_domain_via(http: &reqwest::Client, base: &str, tenant: &Tenant) -> String {
    let r = http
        .post(format!("{base}/v1/domains"))
        .header("authorization", tenant.bearer())
        .json(&serde_json::json!({ "name": "deploy.example.com" }))
        .send()
        .await
        .unwrap();
    let body: serde_json::Value = r.json().await.unwrap();
    body["id"]
        .as_str()
        .unwrap_or_else(|| panic!("{body}"))
        .to_owned()
}

/// Holds the api's one request slot (`HTTP_MAX_CONCURRENCY=1`) with a request whose body
/// never finishes, then retries a request until it is shed (503); bounded.
async fn shed_one_request(api: &Proc, tenant: &Tenant) {
    use tokio::io::AsyncWriteExt;
    let mut held = tokio::net::TcpStream::connect(&api.addr).await.unwrap();
    let head = format!(
        "POST /v1/domains HTTP/1.1\r\nhost: {}\r\nauthorization: {}\r\n\
         content-type: application/json\r\ncontent-length: 1000\r\n\r\n{{",
        api.addr,
        tenant.bearer()
    );
    held.write_all(head.as_bytes()).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let status = reqwest::get(format!("http://{}/v1/nope", api.addr))
            .await
            .unwrap()
            .status();
        if status == 503 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no request was shed (last status {status})"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(held);
}
