//! The benchmark suite (`./scripts/bench`): every figure is measured beside its baseline
//! in the same run and printed with the ratio. It prints; it asserts nothing.
//!
//! - catalog: a broker process serving 201 services (10 upstreams x 20 + 1 local) against
//!   a minimal hyper server (a process too: this binary with `--baseline`) returning the
//!   same bytes, at 1, 16 and 64 connections;
//! - forwarding: provision, bind and last_operation through the broker against the same
//!   calls straight to the upstream;
//! - MySQL: provision+bind+unbind+deprovision cycles through the broker against the same
//!   SQL statements issued directly, with a profile of each: MariaDB's own time per cycle
//!   and its statements (the performance schema), the rest, and the broker's CPU;
//! - scale: merging 100 upstreams x 100 services x 10 plans; the broker's resident memory
//!   idle and after the 64-connection run;
//! - forwarded provisions, binds and deprovisions at 1 and 16 connections beside the
//!   upstream directly and beside Debian's nginx in front of it, with the disk's fsync cost;
//! - a store of `BKG_BENCH_RECORDS` (1,000,000) instances made through the store API, for the
//!   embedded and the MySQL store: the broker's start-up time, resident memory after start
//!   and under load, idle CPU over 30 s, and the quota pass beside the same pass over a store
//!   holding only the local instances.
//!
//! The upstreams are minimal axum brokers in this process: they answer at once. With two
//! cores and `taskset`, the broker and nginx run on core 0 and this process on core 1.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::routing::{get, put};
use axum::{Json, Router};
use brokerage::federation::merge::{self, UpstreamCatalog};
use mysql_async::prelude::*;
use serde_json::{json, Value};

mod common;
use common::{cpu_secs, free_port, osb, Killed, PASSWORD, USER};

fn upstream_catalog(services: usize, plans: usize, tag: &str) -> Value {
    let services: Vec<Value> = (0..services)
        .map(|s| {
            json!({
                "id": format!("{tag}-svc-{s}"), "name": format!("svc-{s}"),
                "description": "a service", "bindable": true, "plan_updateable": true,
                "metadata": {"displayName": format!("Service {s}")},
                "plans": (0..plans).map(|p| json!({
                    "id": format!("{tag}-svc-{s}-plan-{p}"), "name": format!("plan-{p}"),
                    "description": "a plan", "free": true
                })).collect::<Vec<_>>()
            })
        })
        .collect();
    json!({ "services": services })
}

async fn start_upstream(tag: String) -> String {
    let catalog = Arc::new(upstream_catalog(20, 3, &tag));
    let app = Router::new()
        .route(
            "/v2/catalog",
            get(move || {
                let c = catalog.clone();
                async move { Json((*c).clone()) }
            }),
        )
        .route(
            "/v2/service_instances/{id}",
            put(
                |axum::extract::RawQuery(q): axum::extract::RawQuery| async move {
                    if q.unwrap_or_default().contains("accepts_incomplete=true") {
                        (
                            axum::http::StatusCode::ACCEPTED,
                            Json(json!({"operation": "op-1"})),
                        )
                    } else {
                        (axum::http::StatusCode::CREATED, Json(json!({})))
                    }
                },
            )
            .delete(|| async { Json(json!({})) }),
        )
        .route(
            "/v2/service_instances/{id}/last_operation",
            get(|| async { Json(json!({"state": "in progress"})) }),
        )
        .route(
            "/v2/service_instances/{id}/service_bindings/{bid}",
            put(|| async {
                (
                    axum::http::StatusCode::CREATED,
                    Json(json!({"credentials": {"uri": "x://y"}})),
                )
            })
            .delete(|| async { Json(json!({})) }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    base
}

/// The baseline: plain hyper answering every request with the same bytes.
async fn baseline_server(port: u16, body: Vec<u8>) {
    use hyper::server::conn::http1;
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    let body = bytes_of(body);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    println!("LISTENING");
    loop {
        let (stream, _) = listener.accept().await.unwrap();
        let body = body.clone();
        tokio::spawn(async move {
            let service = service_fn(move |_req| {
                let body = body.clone();
                async move {
                    Ok::<_, std::convert::Infallible>(
                        hyper::Response::builder()
                            .header("content-type", "application/json")
                            .body(http_body_util::Full::new(body))
                            .unwrap(),
                    )
                }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn bytes_of(v: Vec<u8>) -> axum::body::Bytes {
    axum::body::Bytes::from(v)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1000.0)
}

fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

async fn timed(req: reqwest::RequestBuilder) -> Duration {
    let t = Instant::now();
    let r = req.send().await.unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    r.bytes().await.unwrap();
    t.elapsed()
}

struct Load {
    rps: f64,
    p50: Duration,
    p99: Duration,
}

/// `total` requests over `connections` concurrent clients; `request` makes the `i`th of
/// client `c`.
async fn load_with<F>(connections: usize, total: usize, request: F) -> Load
where
    F: Fn(&reqwest::Client, usize, usize) -> reqwest::RequestBuilder + Clone + Send + 'static,
{
    let per = total / connections;
    let started = Instant::now();
    let tasks: Vec<_> = (0..connections)
        .map(|c| {
            let request = request.clone();
            tokio::spawn(async move {
                let client = reqwest::Client::new();
                let mut lat = Vec::with_capacity(per);
                for i in 0..per {
                    lat.push(timed(request(&client, c, i)).await);
                }
                lat
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let elapsed = started.elapsed();
    all.sort();
    Load {
        rps: all.len() as f64 / elapsed.as_secs_f64(),
        p50: percentile(&all, 0.5),
        p99: percentile(&all, 0.99),
    }
}

/// `total` GETs of `url` over `connections` concurrent clients.
async fn load(url: &str, connections: usize, total: usize, auth: bool) -> Load {
    let url = url.to_string();
    load_with(connections, total, move |client, _, _| {
        let req = client.get(&url);
        if auth {
            osb(req)
        } else {
            req
        }
    })
    .await
}

/// The forwarded changes the load runs, each over the ids the provisions made.
#[derive(Clone, Copy, PartialEq)]
enum Change {
    Provision,
    Bind,
    Deprovision,
}

/// `total` calls of one kind on fresh ids under `base` over `connections` concurrent
/// clients: provisions make instances `tag-c-i`, binds bind each once, deprovisions delete
/// them (their bindings with them).
async fn changes(
    change: Change,
    base: &str,
    connections: usize,
    total: usize,
    ids: (&str, &str),
    tag: &str,
) -> Load {
    let (base, tag) = (base.to_string(), tag.to_string());
    let (sid, pid) = (ids.0.to_string(), ids.1.to_string());
    load_with(connections, total, move |client, c, i| {
        let instance = format!("{base}/v2/service_instances/{tag}-{c}-{i}");
        let query = format!("service_id={sid}&plan_id={pid}");
        match change {
            Change::Provision => osb(client.put(instance)).json(&json!({
                "service_id": sid, "plan_id": pid, "organization_guid": "o", "space_guid": "s"
            })),
            Change::Bind => osb(client.put(format!("{instance}/service_bindings/{tag}-{c}-{i}-b")))
                .json(&json!({"service_id": sid, "plan_id": pid})),
            Change::Deprovision => osb(client.delete(format!("{instance}?{query}"))),
        }
    })
    .await
}

/// Sequential catalog GETs and app-logs provisions against `base`: their p50 and p99.
async fn osb_latency(base: &str, tag: &str) -> [(Duration, Duration); 2] {
    let client = reqwest::Client::new();
    let mut catalog = Vec::new();
    for _ in 0..2000 {
        catalog.push(timed(osb(client.get(format!("{base}/v2/catalog")))).await);
    }
    let mut provision = Vec::new();
    for i in 0..300 {
        let url = format!("{base}/v2/service_instances/{tag}-{i}");
        let body = json!({"service_id": LOG_SERVICE, "plan_id": LOG_PLAN,
            "organization_guid": "o", "space_guid": "s"});
        provision.push(timed(osb(client.put(url)).json(&body)).await);
    }
    catalog.sort();
    provision.sort();
    [&catalog, &provision].map(|d| (percentile(d, 0.5), percentile(d, 0.99)))
}

/// The default catalog's log service and plan.
const LOG_SERVICE: &str = "5b8e2d41-7c3a-4f9e-8a16-2d4c6e8f0a11";
const LOG_PLAN: &str = "5b8e2d41-7c3a-4f9e-8a16-2d4c6e8f0a12";

/// Posts `lines_per_sec` log lines to `drain` until `stop`, 50 lines every 10 ms: in one
/// octet-counted POST (`batched`, as `https-batch` drains send) or as 50 POSTs of one
/// message each (as `https` drains send). Returns the lines the broker accepted (200).
async fn flood(drain: String, batched: bool, stop: tokio_util::sync::CancellationToken) -> u64 {
    let client = reqwest::Client::new();
    let message = |n: u64| {
        format!("<14>1 2026-12-02T01:02:03Z org.space.flood flood-app [APP/PROC/WEB/0] - - flood line {n} with some text to it")
    };
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let mut sent = 0u64;
    while !stop.is_cancelled() {
        tick.tick().await;
        if batched {
            let body: String = (0..50)
                .map(|i| {
                    let m = message(sent + i);
                    format!("{} {m}", m.len())
                })
                .collect();
            if client
                .post(&drain)
                .body(body)
                .send()
                .await
                .is_ok_and(|r| r.status() == 200)
            {
                sent += 50;
            }
        } else {
            let posts = (0..50).map(|i| client.post(&drain).body(message(sent + i)).send());
            let answers = futures::future::join_all(posts).await;
            sent += answers
                .iter()
                .filter(|r| r.as_ref().is_ok_and(|r| r.status() == 200))
                .count() as u64;
        }
    }
    sent
}

/// What one fsync of a small write costs on the disk the store lives on: the median of 200.
fn fsync_cost(dir: &std::path::Path) -> Duration {
    use std::io::Write;
    let mut file = std::fs::File::create(dir.join("fsync-probe")).unwrap();
    let mut all: Vec<Duration> = (0..200)
        .map(|_| {
            let t = Instant::now();
            file.write_all(&[7u8; 4096]).unwrap();
            file.sync_data().unwrap();
            t.elapsed()
        })
        .collect();
    all.sort();
    percentile(&all, 0.5)
}

/// Debian's nginx as a reverse proxy in front of `upstream` (keep-alive to it, as
/// Brokerage's client keeps), the floor any proxy hop costs; `None` without nginx.
fn start_nginx(dir: &std::path::Path, upstream: &str) -> Option<(Killed, String)> {
    let binary = std::env::var("BKG_BENCH_NGINX").ok()?;
    let port = free_port();
    let conf = dir.join("nginx.conf");
    let to = upstream.trim_start_matches("http://");
    let d = dir.display();
    std::fs::write(
        &conf,
        format!(
            "worker_processes 1; daemon off; pid {d}/nginx.pid; error_log {d}/nginx.err;\n\
             events {{ worker_connections 1024; }}\n\
             http {{ access_log off; client_body_temp_path {d}/nginx-body; proxy_temp_path {d}/nginx-proxy;\n\
               upstream u {{ server {to}; keepalive 64; }}\n\
               server {{ listen 127.0.0.1:{port}; location / {{ proxy_pass http://u; proxy_http_version 1.1;\n\
                 proxy_set_header Connection \"\"; }} }} }}\n"
        ),
    )
    .unwrap();
    let child = on_core_0(binary)
        .args(["-e", &format!("{d}/nginx.err"), "-c"])
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    Some((Killed(child), format!("http://127.0.0.1:{port}")))
}

/// Fills a store through its API: `upstream_owned` instances an upstream owns and `local`
/// ones of the local service, 64 writers at once (what group commit shares).
async fn fill_store(
    store: Arc<dyn brokerage::store::StateStore>,
    upstream_owned: usize,
    local: usize,
    service: (&str, &str),
) {
    use brokerage::store::{
        records, InstanceRecord, OpKind, OpState, OperationRecord, UpstreamRef,
    };
    let writers = 64;
    let tasks: Vec<_> = (0..writers)
        .map(|w| {
            let store = store.clone();
            let (sid, pid) = (service.0.to_string(), service.1.to_string());
            tokio::spawn(async move {
                let mut i = w;
                while i < upstream_owned + local {
                    let owned = i < upstream_owned;
                    let mut operation = OperationRecord::start(
                        OpKind::Provision,
                        false,
                        chrono::Duration::seconds(60),
                    );
                    operation.finish(OpState::Succeeded, None);
                    let record = InstanceRecord {
                        id: format!("{}-{i:08}", if owned { "up" } else { "local" }),
                        service_id: if owned {
                            "4f6e2a8c-upstream-service".into()
                        } else {
                            sid.clone()
                        },
                        plan_id: if owned {
                            "9b1d3c5e-upstream-plan".into()
                        } else {
                            pid.clone()
                        },
                        organization_guid: "5a0e5c2a-3b1d-4c7e-9f00-1234567890ab".into(),
                        space_guid: "6b1f6d3b-4c2e-5d8f-a011-2345678901bc".into(),
                        context: None,
                        parameters: None,
                        maintenance_version: None,
                        dashboard_url: None,
                        provisioned: true,
                        created_at: chrono::Utc::now(),
                        operation,
                        upstream: owned.then(|| UpstreamRef {
                            alias: "market".into(),
                            service_id: "svc".into(),
                            plan_id: "plan".into(),
                        }),
                        api_info_location: None,
                    };
                    records::insert(&*store, &record, None).await.unwrap();
                    i += writers;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
}

/// What MariaDB spent on statements between two reads of its performance schema.
struct ServerProfile {
    server_ms: f64,
    /// Statement digest, count, milliseconds: most time first.
    statements: Vec<(String, u64, f64)>,
}

const DIGESTS: &str = "performance_schema.events_statements_summary_by_digest";

/// Empties MariaDB's statement summary (the server runs with `--performance-schema`).
async fn reset_profile(conn: &mut mysql_async::Conn) {
    let _ = conn.query_drop(format!("TRUNCATE TABLE {DIGESTS}")).await;
}

/// What MariaDB spent since [`reset_profile`], the bench's own reads excluded; empty when
/// the performance schema is off.
async fn read_profile(conn: &mut mysql_async::Conn) -> ServerProfile {
    let rows: Vec<(Option<String>, u64, u64)> = conn
        .query(format!(
            "SELECT DIGEST_TEXT, COUNT_STAR, SUM_TIMER_WAIT FROM {DIGESTS}
             WHERE DIGEST_TEXT IS NULL OR DIGEST_TEXT NOT LIKE '%performance_schema%'
             ORDER BY SUM_TIMER_WAIT DESC"
        ))
        .await
        .unwrap_or_default();
    let statements: Vec<(String, u64, f64)> = rows
        .into_iter()
        .map(|(d, n, ps)| (d.unwrap_or_default(), n, ps as f64 / 1e9))
        .collect();
    ServerProfile {
        server_ms: statements.iter().map(|s| s.2).sum(),
        statements,
    }
}

struct StoreScale {
    kind: &'static str,
    filled: Duration,
    start_up: Duration,
    rss_started: u64,
    rss_loaded: u64,
    idle_cpu_percent: f64,
    pass: Duration,
    pass_local_only: Duration,
    local: u32,
}

/// One store kind at scale: filled through the API, then served by the broker process.
async fn store_at_scale(
    kind: &'static str,
    binary: &str,
    mysql: &str,
    dir: &std::path::Path,
    records: usize,
) -> StoreScale {
    use brokerage::config::{Config, Secret, StoreConfig};
    let local = 200;
    let store_config = |tag: &str| match kind {
        "embedded" => StoreConfig::Embedded {
            path: dir.join(format!("scale-{tag}.redb")),
            cache_mb: 16,
            url: None,
        },
        _ => StoreConfig::Mysql {
            url: Secret::new(format!(
                "{mysql}/bkgscale_{tag}_{}",
                uuid::Uuid::new_v4().simple()
            )),
            path: None,
            cache_mb: None,
        },
    };
    let (big, small) = (store_config("big"), store_config("small"));
    let yaml = |store: &StoreConfig, port: u16| {
        let store = match store {
            StoreConfig::Embedded { path, .. } => {
                format!("{{kind: embedded, path: {:?}}}", path.display().to_string())
            }
            StoreConfig::Mysql { url, .. } => format!("{{kind: mysql, url: \"{}\"}}", url.expose()),
        };
        format!(
            "listen: {{host: 127.0.0.1, port: {port}}}\n\
             auth: {{credentials: [{{username: {USER}, password: {PASSWORD}}}]}}\n\
             store: {store}\n\
             log: {{format: text, level: warn}}\n\
             backends: {{mysql: {{url: \"{mysql}\", connect_timeout_secs: 5, max_connections: 20}}}}\n"
        )
    };
    let file = |store: &StoreConfig, port: u16, name: &str| {
        let path = dir.join(name);
        std::fs::write(&path, yaml(store, port)).unwrap();
        path
    };
    let defaults = Config::load(Some(&file(&big, 0, "scale-probe.yml"))).unwrap();
    let service = &defaults.catalog.services[0];
    let ids = (service.service.id.clone(), service.plans[0].plan.id.clone());
    let t = Instant::now();
    for (store, owned) in [(&big, records), (&small, 0)] {
        let opened = brokerage::store::open(store).await.unwrap();
        fill_store(opened, owned, local, (&ids.0, &ids.1)).await;
    }
    let filled = t.elapsed();

    // The broker process on the big store.
    let port = free_port();
    let config_file = file(&big, port, "scale.yml");
    let started = Instant::now();
    let broker = Killed(
        on_core_0(binary)
            .args(["serve", "--config"])
            .arg(&config_file)
            .env_remove("PORT")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let base = format!("http://127.0.0.1:{port}");
    wait_up(&format!("{base}/health")).await;
    let start_up = started.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pid = broker.0.id();
    let rss_started = rss_kb(pid);
    let cpu = cpu_secs(pid);
    tokio::time::sleep(Duration::from_secs(30)).await;
    let idle_cpu_percent = (cpu_secs(pid) - cpu) / 30.0 * 100.0;
    let _ = load(&format!("{base}/v2/catalog"), 16, 4000, true).await;
    let first_local = format!("{base}/v2/service_instances/local-{records:08}");
    let _ = load(&first_local, 16, 4000, true).await;
    let rss_loaded = rss_kb(pid);
    drop(broker);
    tokio::time::sleep(Duration::from_millis(300)).await;

    // The quota pass itself, in this process, over each store.
    let mut passes = Vec::new();
    for store in [&big, &small] {
        let mut config = Config::load(Some(&file(store, 0, "scale-pass.yml"))).unwrap();
        config.listen.port = 0;
        let prepared = brokerage::startup::prepare(&config).unwrap();
        let (broker, _app) = brokerage::startup::build(&config, prepared).await.unwrap();
        let enforcer = brokerage::quota::QuotaEnforcer::new(broker, Duration::from_secs(3600));
        // The second pass, with the server's and the store's caches warm, as every pass
        // after start-up runs.
        let _ = enforcer.pass().await;
        let t = Instant::now();
        let pass = enforcer.pass().await;
        passes.push((t.elapsed(), pass.instances));
    }
    StoreScale {
        kind,
        filled,
        start_up,
        rss_started,
        rss_loaded,
        idle_cpu_percent,
        pass: passes[0].0,
        pass_local_only: passes[1].0,
        local: passes[0].1,
    }
}

/// The processes under test (the broker, nginx) run on core 0; this process (the load
/// generator, the upstreams and the baselines it starts from here) on core 1, when the
/// machine has two cores and util-linux's `taskset` is there.
fn pinning() -> bool {
    std::thread::available_parallelism().is_ok_and(|n| n.get() >= 2)
        && Command::new("taskset")
            .arg("-V")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
}

/// `program` started on core 0 when pinning.
fn on_core_0(program: impl AsRef<std::ffi::OsStr>) -> Command {
    if pinning() {
        let mut command = Command::new("taskset");
        command.args(["-c", "0"]).arg(program);
        command
    } else {
        Command::new(program)
    }
}

/// Moves every thread of this process to core 1 when pinning.
fn pin_self_to_core_1() -> bool {
    pinning()
        && Command::new("taskset")
            .args(["-a", "-p", "-c", "1", &std::process::id().to_string()])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
}

async fn wait_up(url: &str) {
    for _ in 0..400 {
        if reqwest::get(url).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{url} never answered");
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--baseline") {
        let port: u16 = args[2].parse().unwrap();
        let body = std::fs::read(&args[3]).unwrap();
        baseline_server(port, body).await;
        return;
    }
    let binary = std::env::var("BKG_BENCH_BINARY").expect("run ./scripts/bench");
    let mysql = std::env::var("BKG_BENCH_MYSQL_URL").expect("run ./scripts/bench");
    let dir = tempfile::tempdir().unwrap();

    // ---- scale: merge -------------------------------------------------------------------
    let settings: Vec<upstreams::UpstreamSettings> = (0..100)
        .map(|i| {
            serde_json::from_value(json!({"alias": format!("up{i}"), "url": "http://127.0.0.1:1"}))
                .unwrap()
        })
        .collect();
    let catalogs: Vec<Vec<u8>> = (0..100)
        .map(|i| serde_json::to_vec(&upstream_catalog(100, 10, &format!("u{i}"))).unwrap())
        .collect();
    let local = upstreams::osb::Catalog::default();
    let mut merges = Vec::new();
    for _ in 0..5 {
        // Each catalog is read as a fetch reads it, then all are merged.
        let t = Instant::now();
        let read: Vec<upstreams::osb::Checked> = catalogs
            .iter()
            .map(|c| upstreams::osb::Catalog::read_lenient(c).unwrap())
            .collect();
        let inputs: Vec<UpstreamCatalog<'_>> = settings
            .iter()
            .zip(&read)
            .map(|(s, c)| UpstreamCatalog {
                settings: s,
                catalog: c,
            })
            .collect();
        let merged = merge::merge(&local, &inputs);
        merges.push(t.elapsed());
        assert_eq!(merged.catalog.services.len(), 10_000);
    }
    merges.sort();
    drop(catalogs);
    // The merge above used both cores (rayon), as the broker's refresher does; from here on
    // the load generator keeps to its own.
    let pinned = pin_self_to_core_1();

    // ---- the broker, as its own process ---------------------------------------------------
    let mut bases = Vec::new();
    for i in 0..10 {
        bases.push(start_upstream(format!("u{i}")).await);
    }
    let port = free_port();
    let upstream_yaml: Vec<String> = bases
        .iter()
        .enumerate()
        .map(|(i, b)| format!("{{alias: up{i}, url: \"{b}\"}}"))
        .collect();
    let file = dir.path().join("bench.yml");
    std::fs::write(
        &file,
        format!(
            "listen: {{host: 127.0.0.1, port: {port}}}\n\
             auth: {{credentials: [{{username: {USER}, password: {PASSWORD}}}]}}\n\
             store: {{kind: embedded, path: {:?}}}\n\
             log: {{format: text, level: warn}}\n\
             broker: {{external_url: \"http://127.0.0.1:{port}\"}}\n\
             backends: {{mysql: {{url: \"{mysql}\", connect_timeout_secs: 5, max_connections: 20}}}}\n\
             federation: {{refresh_secs: 3600, catalog_ttl_secs: 3600}}\n\
             upstreams: [{}]\n",
            dir.path().join("state.redb").display().to_string(),
            upstream_yaml.join(", ")
        ),
    )
    .unwrap();
    let broker = Killed(
        on_core_0(&binary)
            .args(["serve", "--config"])
            .arg(&file)
            .env_remove("PORT")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let base = format!("http://127.0.0.1:{port}");
    wait_up(&format!("{base}/health")).await;
    let client = reqwest::Client::new();
    let mut catalog_bytes = Vec::new();
    for _ in 0..200 {
        catalog_bytes = osb(client.get(format!("{base}/v2/catalog")))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap()
            .to_vec();
        let v: Value = serde_json::from_slice(&catalog_bytes).unwrap();
        if v["services"].as_array().map_or(0, Vec::len) >= 201 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_idle = rss_kb(broker.0.id());

    // ---- catalog against the baseline ---------------------------------------------------------
    let body_file = dir.path().join("catalog.json");
    std::fs::write(&body_file, &catalog_bytes).unwrap();
    let baseline_port = free_port();
    let _baseline = Killed(
        on_core_0(std::env::current_exe().unwrap())
            .args(["--baseline", &baseline_port.to_string()])
            .arg(&body_file)
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let baseline = format!("http://127.0.0.1:{baseline_port}/v2/catalog");
    wait_up(&baseline).await;
    let mut catalog_rows = Vec::new();
    for connections in [1usize, 16, 64] {
        let total = 4000;
        let _ = load(&baseline, connections, 400, false).await; // warm up
        let b = load(&baseline, connections, total, false).await;
        let _ = load(&format!("{base}/v2/catalog"), connections, 400, true).await;
        let r = load(&format!("{base}/v2/catalog"), connections, total, true).await;
        catalog_rows.push((connections, r, b));
    }
    let rss_loaded = rss_kb(broker.0.id());

    // ---- forwarding against the upstream directly ----------------------------------------------
    let catalog: Value = serde_json::from_slice(&catalog_bytes).unwrap();
    let svc = catalog["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "up0-svc-0")
        .unwrap()
        .clone();
    let (sid, pid) = (
        svc["id"].as_str().unwrap().to_string(),
        svc["plans"][0]["id"].as_str().unwrap().to_string(),
    );
    let body = |s: &str, p: &str| json!({"service_id": s, "plan_id": p, "organization_guid": "o", "space_guid": "s"});
    let bind = |s: &str, p: &str| json!({"service_id": s, "plan_id": p});
    let rounds = 300;
    let mut f: [Vec<Duration>; 6] = Default::default();
    // An asynchronous instance to poll: the fake upstream keeps it "in progress".
    osb(client.put(format!(
        "{base}/v2/service_instances/polled?accepts_incomplete=true"
    )))
    .json(&body(&sid, &pid))
    .send()
    .await
    .unwrap();
    for i in 0..rounds {
        let up = &bases[0];
        f[0].push(
            timed(
                osb(client.put(format!("{up}/v2/service_instances/d{i}")))
                    .json(&body("u0-svc-0", "u0-svc-0-plan-0")),
            )
            .await,
        );
        f[1].push(
            timed(
                osb(client.put(format!("{base}/v2/service_instances/a{i}")))
                    .json(&body(&sid, &pid)),
            )
            .await,
        );
        f[2].push(
            timed(
                osb(client.put(format!(
                    "{up}/v2/service_instances/d{i}/service_bindings/b{i}"
                )))
                .json(&bind("u0-svc-0", "u0-svc-0-plan-0")),
            )
            .await,
        );
        f[3].push(
            timed(
                osb(client.put(format!(
                    "{base}/v2/service_instances/a{i}/service_bindings/b{i}"
                )))
                .json(&bind(&sid, &pid)),
            )
            .await,
        );
        f[4].push(
            timed(osb(client.get(format!(
                "{up}/v2/service_instances/polled/last_operation?operation=op-1"
            ))))
            .await,
        );
        f[5].push(
            timed(osb(client.get(format!(
                "{base}/v2/service_instances/polled/last_operation"
            ))))
            .await,
        );
    }
    for v in f.iter_mut() {
        v.sort();
    }

    // ---- forwarded provisions under load: Brokerage, the upstream directly, nginx -----------
    let fsync = fsync_cost(dir.path());
    let nginx = start_nginx(dir.path(), &bases[1]);
    if let Some((_, n)) = &nginx {
        wait_up(&format!("{n}/v2/catalog")).await;
    }
    let svc1 = catalog["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "up1-svc-0")
        .unwrap()
        .clone();
    let via = (
        svc1["id"].as_str().unwrap(),
        svc1["plans"][0]["id"].as_str().unwrap(),
    );
    let direct = ("u1-svc-0", "u1-svc-0-plan-0");
    let mut under_load = Vec::new();
    for connections in [1usize, 16] {
        let total = if connections == 1 { 1000 } else { 4000 };
        for change in [Change::Provision, Change::Bind, Change::Deprovision] {
            let tag = |who: &str| format!("l{connections}{who}");
            let up = changes(change, &bases[1], connections, total, direct, &tag("u")).await;
            let proxied = match &nginx {
                Some((_, n)) => {
                    Some(changes(change, n, connections, total, direct, &tag("n")).await)
                }
                None => None,
            };
            let ours = changes(change, &base, connections, total, via, &tag("b")).await;
            under_load.push((change, connections, ours, up, proxied));
        }
    }
    drop(nginx);

    // ---- MySQL lifecycle against the same SQL issued directly -------------------------------------
    let local = catalog["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "mysql-db")
        .unwrap()
        .clone();
    let (lsid, lpid) = (
        local["id"].as_str().unwrap().to_string(),
        local["plans"][0]["id"].as_str().unwrap().to_string(),
    );
    let cycles = 40;
    let mut profile = mysql_async::Conn::from_url(&mysql).await.unwrap();
    reset_profile(&mut profile).await;
    let broker_cpu = cpu_secs(broker.0.id());
    let t = Instant::now();
    for i in 0..cycles {
        let id = format!("bench-{i}");
        let ok = |r: reqwest::Response| assert!(r.status().is_success(), "{}", r.status());
        ok(osb(client.put(format!("{base}/v2/service_instances/{id}")))
            .json(&body(&lsid, &lpid))
            .send()
            .await
            .unwrap());
        ok(osb(client.put(format!(
            "{base}/v2/service_instances/{id}/service_bindings/{id}-b"
        )))
        .json(&bind(&lsid, &lpid))
        .send()
        .await
        .unwrap());
        ok(osb(client.delete(format!("{base}/v2/service_instances/{id}/service_bindings/{id}-b?service_id={lsid}&plan_id={lpid}"))).send().await.unwrap());
        ok(osb(client.delete(format!(
            "{base}/v2/service_instances/{id}?service_id={lsid}&plan_id={lpid}"
        )))
        .send()
        .await
        .unwrap());
    }
    let via_rate = cycles as f64 / t.elapsed().as_secs_f64();
    let via_cpu = cpu_secs(broker.0.id()) - broker_cpu;
    let via_profile = read_profile(&mut profile).await;
    let mut conn = mysql_async::Conn::from_url(&mysql).await.unwrap();
    reset_profile(&mut profile).await;
    let t = Instant::now();
    for i in 0..cycles {
        let db = format!("cf_direct_{i}");
        let user = format!("u_direct_{i:028}");
        let _: Option<String> = conn
            .exec_first(
                "SELECT SCHEMA_NAME FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = ?",
                (&db,),
            )
            .await
            .unwrap();
        conn.query_drop(format!(
            "CREATE DATABASE `{db}` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci"
        ))
        .await
        .unwrap();
        let _: Option<String> = conn
            .exec_first(
                "SELECT SCHEMA_NAME FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = ?",
                (&db,),
            )
            .await
            .unwrap();
        conn.query_drop(format!("DROP USER IF EXISTS '{user}'@'%'"))
            .await
            .unwrap();
        conn.query_drop(format!(
            "CREATE USER '{user}'@'%' IDENTIFIED BY 'x{i}Password' WITH MAX_USER_CONNECTIONS 10"
        ))
        .await
        .unwrap();
        conn.query_drop(format!(
            "GRANT ALL PRIVILEGES ON `{}`.* TO '{user}'@'%'",
            db.replace('_', "\\_")
        ))
        .await
        .unwrap();
        conn.query_drop(format!("DROP USER IF EXISTS '{user}'@'%'"))
            .await
            .unwrap();
        let _: Vec<u64> = conn
            .exec(
                "SELECT ID FROM information_schema.PROCESSLIST WHERE USER = ?",
                (&user,),
            )
            .await
            .unwrap();
        let _: Vec<String> = conn
            .exec(
                "SELECT DISTINCT User FROM mysql.db WHERE Db = ? AND Host = '%'",
                (db.replace('_', "\\_"),),
            )
            .await
            .unwrap();
        conn.query_drop(format!("DROP DATABASE IF EXISTS `{db}`"))
            .await
            .unwrap();
    }
    let direct_rate = cycles as f64 / t.elapsed().as_secs_f64();
    let direct_profile = read_profile(&mut profile).await;

    // ---- the table --------------------------------------------------------------------------
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    if pinned {
        println!("Brokerage benchmark: {cores} cores; the broker and nginx on core 0, the load generator, upstreams and baselines on core 1");
    } else {
        println!("Brokerage benchmark: {cores} cores; load generator, broker and baselines share them (no pinning)");
    }
    println!();
    println!("| measure | Brokerage | baseline | ratio | goal |");
    println!("| --- | --- | --- | --- | --- |");
    for (c, r, b) in &catalog_rows {
        println!(
            "| catalog, 201 services, {c} conn: req/s | {:.0} | {:.0} (minimal hyper, same bytes) | {:.2} | >= 0.8 |",
            r.rps,
            b.rps,
            r.rps / b.rps
        );
        println!(
            "| catalog, {c} conn: p50 / p99 ms | {} / {} | {} / {} | {:.2} / {:.2} | |",
            ms(r.p50),
            ms(r.p99),
            ms(b.p50),
            ms(b.p99),
            r.p50.as_secs_f64() / b.p50.as_secs_f64(),
            r.p99.as_secs_f64() / b.p99.as_secs_f64()
        );
    }
    for (name, d, v) in [
        ("provision", &f[0], &f[1]),
        ("bind", &f[2], &f[3]),
        ("last_operation", &f[4], &f[5]),
    ] {
        let added50 = percentile(v, 0.5).saturating_sub(percentile(d, 0.5));
        let added99 = percentile(v, 0.99).saturating_sub(percentile(d, 0.99));
        println!(
            "| forwarded {name}: p50 / p99 ms | {} / {} | {} / {} (upstream directly) | added {} / {} ms | < 1 / < 3 ms added |",
            ms(percentile(v, 0.5)),
            ms(percentile(v, 0.99)),
            ms(percentile(d, 0.5)),
            ms(percentile(d, 0.99)),
            ms(added50),
            ms(added99)
        );
    }
    println!(
        "| fsync of a 4 KiB write on the store's disk: p50 ms | {} | | | |",
        ms(fsync)
    );
    for (change, c, ours, up, proxied) in &under_load {
        let floor = match proxied {
            Some(n) => format!(
                "{:.0} req/s, p50 {} ms (nginx in front of it)",
                n.rps,
                ms(n.p50)
            ),
            None => "nginx not installed".into(),
        };
        let (name, goal) = match change {
            Change::Provision => (
                "provisions",
                "p50 added <= 0.25 ms at 1 conn; >= 0.3 of nginx's rate at 16",
            ),
            Change::Bind => ("binds", ""),
            Change::Deprovision => ("deprovisions", ""),
        };
        println!(
            "| forwarded {name}, {c} conn: req/s, p50 ms | {:.0}, {} | {:.0}, {} (upstream directly); {floor} | {:.2} of nginx's rate; p50 added {} ms (nginx: {} ms) | {goal} |",
            ours.rps,
            ms(ours.p50),
            up.rps,
            ms(up.p50),
            proxied.as_ref().map_or(f64::NAN, |n| ours.rps / n.rps),
            ms(ours.p50.saturating_sub(up.p50)),
            proxied
                .as_ref()
                .map_or("-".into(), |n| ms(n.p50.saturating_sub(up.p50))),
        );
    }
    println!(
        "| MySQL provision+bind+unbind+deprovision cycles/s | {via_rate:.1} | {direct_rate:.1} (same SQL, directly) | {:.2} | >= 0.5 |",
        via_rate / direct_rate
    );
    let per_cycle = |rate: f64| 1000.0 / rate;
    println!(
        "| MySQL cycle: ms per cycle = MariaDB's own time + the rest | {:.2} = {:.2} + {:.2} (broker CPU {:.2}) | {:.2} = {:.2} + {:.2} | | |",
        per_cycle(via_rate),
        via_profile.server_ms / cycles as f64,
        per_cycle(via_rate) - via_profile.server_ms / cycles as f64,
        via_cpu * 1000.0 / cycles as f64,
        per_cycle(direct_rate),
        direct_profile.server_ms / cycles as f64,
        per_cycle(direct_rate) - direct_profile.server_ms / cycles as f64,
    );
    for (who, p) in [
        ("through the broker", &via_profile),
        ("directly", &direct_profile),
    ] {
        let top: Vec<String> = p
            .statements
            .iter()
            .take(6)
            .map(|(digest, count, ms)| {
                format!(
                    "{:.1}x {:.2} ms `{}`",
                    *count as f64 / cycles as f64,
                    ms / cycles as f64,
                    digest.chars().take(60).collect::<String>()
                )
            })
            .collect();
        println!(
            "| MySQL cycle {who}: {:.1} statements; MariaDB's time per cycle, largest first | {} | | | |",
            p.statements.iter().map(|s| s.1).sum::<u64>() as f64 / cycles as f64,
            top.join("; ")
        );
    }
    println!(
        "| read and merge 100 upstreams x 100 services x 10 plans | {} ms median, {} ms best | | | < 50 ms |",
        ms(merges[2]),
        ms(merges[0])
    );
    println!(
        "| broker resident memory: idle / after the 64-connection run | {:.1} / {:.1} MB | | | < 50 MB idle |",
        rss_idle as f64 / 1024.0,
        rss_loaded as f64 / 1024.0
    );

    // ---- OSB latency under a log drain flood ------------------------------------------------
    let drain = {
        let instance = format!("{base}/v2/service_instances/flood-target");
        let body = json!({"service_id": LOG_SERVICE, "plan_id": LOG_PLAN,
            "organization_guid": "o", "space_guid": "s"});
        osb(client.put(&instance)).json(&body).send().await.unwrap();
        let bound: Value = osb(client.put(format!("{instance}/service_bindings/flood-b")))
            .json(&json!({"service_id": LOG_SERVICE, "plan_id": LOG_PLAN, "app_guid": "flood-app"}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        bound["syslog_drain_url"].as_str().unwrap().to_string()
    };
    let quiet = osb_latency(&base, "quiet").await;
    let mut flooded = Vec::new();
    for batched in [true, false] {
        let stop = tokio_util::sync::CancellationToken::new();
        let started = Instant::now();
        let sender = tokio::spawn(flood(drain.clone(), batched, stop.clone()));
        tokio::time::sleep(Duration::from_millis(500)).await;
        let under = osb_latency(&base, if batched { "batched" } else { "single" }).await;
        stop.cancel();
        let lines = sender.await.unwrap();
        flooded.push((
            batched,
            lines as f64 / started.elapsed().as_secs_f64(),
            under,
        ));
    }
    println!();
    println!("OSB latency while one app floods its log drain (5,000 lines/s offered, 50 every 10 ms), against the same calls without it");
    println!();
    println!("| flood | lines/s accepted | catalog p50 / p99 ms | ratio | app-logs provision p50 / p99 ms | ratio | goal |");
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    println!(
        "| none | 0 | {} / {} | | {} / {} | | |",
        ms(quiet[0].0),
        ms(quiet[0].1),
        ms(quiet[1].0),
        ms(quiet[1].1)
    );
    for (batched, rate, under) in &flooded {
        let ratio = |i: usize| under[i].0.as_secs_f64() / quiet[i].0.as_secs_f64();
        println!(
            "| {} | {rate:.0} | {} / {} | {:.2} | {} / {} | {:.2} | p50 within 1.2x |",
            if *batched {
                "batched, 50 lines per POST (https-batch)"
            } else {
                "one line per POST (https)"
            },
            ms(under[0].0),
            ms(under[0].1),
            ratio(0),
            ms(under[1].0),
            ms(under[1].1),
            ratio(1),
        );
    }
    drop(broker);

    // ---- a store of a million records ------------------------------------------------------
    let records: usize = std::env::var("BKG_BENCH_RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    println!();
    println!(
        "Store of {records} upstream-owned instances and 200 local ones, made through the store API"
    );
    println!();
    println!("| store | filled in | broker start-up | RSS after start / under load | idle CPU, 30 s | quota pass (warm) | same pass, 200 local only | goal |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    for kind in ["embedded", "mysql"] {
        let s = store_at_scale(kind, &binary, &mysql, dir.path(), records).await;
        println!(
            "| {} | {:.1} s | {:.2} s | {:.1} / {:.1} MB | {:.2} % | {} ms ({} instances) | {} ms | start-up < 2 s, RSS < 40 MB, idle CPU < 1 %, pass independent of upstream-owned |",
            s.kind,
            s.filled.as_secs_f64(),
            s.start_up.as_secs_f64(),
            s.rss_started as f64 / 1024.0,
            s.rss_loaded as f64 / 1024.0,
            s.idle_cpu_percent,
            ms(s.pass),
            s.local,
            ms(s.pass_local_only),
        );
    }
}
