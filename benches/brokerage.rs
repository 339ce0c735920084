//! The benchmark suite (`./scripts/bench`): every figure is measured beside its baseline
//! in the same run and printed with the ratio. It prints; it asserts nothing.
//!
//! - catalog: a broker process serving 201 services (10 upstreams x 20 + 1 local) against
//!   a minimal hyper server (a process too: this binary with `--baseline`) returning the
//!   same bytes, at 1, 16 and 64 connections;
//! - forwarding: provision, bind and last_operation through the broker against the same
//!   calls straight to the upstream;
//! - MySQL: provision+bind+unbind+deprovision cycles through the broker against the same
//!   SQL statements issued directly;
//! - scale: merging 100 upstreams x 100 services x 10 plans; the broker's resident memory
//!   idle and after the 64-connection run.
//!
//! The upstreams are minimal axum brokers in this process: they answer at once.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::routing::{get, put};
use axum::{Json, Router};
use brokerage::federation::merge::{self, UpstreamCatalog};
use mysql_async::prelude::*;
use serde_json::{json, Value};

const USER: &str = "bench";
const PASSWORD: &str = "bench-password";

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
            ),
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
            }),
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

fn osb(req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
    req.basic_auth(USER, Some(PASSWORD))
        .header("X-Broker-API-Version", "2.17")
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

/// `total` GETs of `url` over `connections` concurrent clients.
async fn load(url: &str, connections: usize, total: usize, auth: bool) -> Load {
    let per = total / connections;
    let started = Instant::now();
    let tasks: Vec<_> = (0..connections)
        .map(|_| {
            let url = url.to_string();
            tokio::spawn(async move {
                let client = reqwest::Client::new();
                let mut lat = Vec::with_capacity(per);
                for _ in 0..per {
                    let req = client.get(&url);
                    let req = if auth { osb(req) } else { req };
                    lat.push(timed(req).await);
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

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
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

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
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
    let catalogs: Vec<Value> = (0..100)
        .map(|i| upstream_catalog(100, 10, &format!("u{i}")))
        .collect();
    let inputs: Vec<UpstreamCatalog<'_>> = settings
        .iter()
        .zip(&catalogs)
        .map(|(s, c)| UpstreamCatalog {
            settings: s,
            catalog: c,
        })
        .collect();
    let local = upstreams::osb::Catalog::default();
    let mut merges = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let merged = merge::merge(&local, &inputs);
        merges.push(t.elapsed());
        assert_eq!(merged.catalog.services.len(), 10_000);
    }
    merges.sort();
    drop(inputs);
    drop(catalogs);

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
             backends: {{mysql: {{url: \"{mysql}\", connect_timeout_secs: 5, max_connections: 20}}}}\n\
             federation: {{refresh_secs: 3600, catalog_ttl_secs: 3600}}\n\
             upstreams: [{}]\n",
            dir.path().join("state.redb").display().to_string(),
            upstream_yaml.join(", ")
        ),
    )
    .unwrap();
    let broker = Killed(
        Command::new(&binary)
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
        Command::new(std::env::current_exe().unwrap())
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
    let mut conn = mysql_async::Conn::from_url(&mysql).await.unwrap();
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

    // ---- the table --------------------------------------------------------------------------
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!("Brokerage benchmark: {cores} cores; load generator, broker and baselines share them");
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
        "| MySQL provision+bind+unbind+deprovision cycles/s | {via_rate:.1} | {direct_rate:.1} (same SQL, directly) | {:.2} | >= 0.7 |",
        via_rate / direct_rate
    );
    println!(
        "| merge 100 upstreams x 100 services x 10 plans | {} ms median, {} ms best | | | < 50 ms |",
        ms(merges[2]),
        ms(merges[0])
    );
    println!(
        "| broker resident memory: idle / after the 64-connection run | {:.1} / {:.1} MB | | | < 50 MB idle |",
        rss_idle as f64 / 1024.0,
        rss_loaded as f64 / 1024.0
    );
    drop(broker);
}
