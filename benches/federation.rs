//! Federation benchmark: prints figures, asserts nothing. Run with
//! `cargo bench --bench federation`.
//!
//! - catalog requests per second and latency with 10 upstreams x 20 services, served from
//!   the merged snapshot;
//! - the latency a forwarded provision and bind add over calling the same upstream
//!   directly, measured side by side in one run;
//! - the time to merge 100 upstreams x 100 services.
//!
//! The upstreams are minimal axum brokers in this process (they answer at once), so what
//! is measured is Brokerage's own cost: routing, claiming and recording (the embedded
//! store commits with fsync twice per call) and the extra HTTP hop.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::routing::{get, put};
use axum::{Json, Router};
use brokerage::config::Config;
use brokerage::federation::merge::{self, UpstreamCatalog};
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
            put(|| async { (axum::http::StatusCode::CREATED, Json(json!({}))) }),
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

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1000.0)
}

async fn timed(client: &reqwest::Client, req: reqwest::RequestBuilder) -> Duration {
    let _ = client;
    let t = Instant::now();
    let r = req.send().await.unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    r.bytes().await.unwrap();
    t.elapsed()
}

#[tokio::main]
async fn main() {
    // ---- merge: 100 upstreams x 100 services ------------------------------------------
    let settings: Vec<upstreams::UpstreamSettings> = (0..100)
        .map(|i| {
            serde_json::from_value(json!({"alias": format!("up{i}"), "url": "http://127.0.0.1:1"}))
                .unwrap()
        })
        .collect();
    let catalogs: Vec<Value> = (0..100)
        .map(|i| upstream_catalog(100, 3, &format!("u{i}")))
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

    // ---- an aggregator over 10 upstreams x 20 services -----------------------------------
    let mut bases = Vec::new();
    for i in 0..10 {
        bases.push(start_upstream(format!("u{i}")).await);
    }
    let dir = tempfile::tempdir().unwrap();
    let upstream_yaml: Vec<String> = bases
        .iter()
        .enumerate()
        .map(|(i, b)| format!("{{alias: up{i}, url: \"{b}\"}}"))
        .collect();
    let file = dir.path().join("bench.yml");
    std::fs::write(
        &file,
        format!(
            "auth: {{credentials: [{{username: {USER}, password: {PASSWORD}}}]}}\n\
             store: {{kind: embedded, path: {:?}}}\n\
             log: {{format: text, level: warn}}\n\
             federation: {{refresh_secs: 3600, catalog_ttl_secs: 3600}}\n\
             upstreams: [{}]\n",
            dir.path().join("state.redb").display().to_string(),
            upstream_yaml.join(", ")
        ),
    )
    .unwrap();
    let config = Config::load(Some(&file)).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let aggregator = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        brokerage::startup::serve(&config, listener, std::future::pending())
            .await
            .unwrap();
    });
    let client = reqwest::Client::new();
    let osb = |req: reqwest::RequestBuilder| {
        req.basic_auth(USER, Some(PASSWORD))
            .header("X-Broker-API-Version", "2.17")
    };
    // Wait for the first refresh: 10 x 20 upstream services plus the local one.
    let mut services = 0;
    for _ in 0..200 {
        let catalog: Value = osb(client.get(format!("{aggregator}/v2/catalog")))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        services = catalog["services"].as_array().map_or(0, Vec::len);
        if services >= 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(services >= 200, "catalog has {services} services");

    // ---- catalog throughput ---------------------------------------------------------------
    let mut catalog_rows = Vec::new();
    for concurrency in [1usize, 16, 64] {
        let per_client = 3000 / concurrency.max(1) + 50;
        let started = Instant::now();
        let tasks: Vec<_> = (0..concurrency)
            .map(|_| {
                let client = client.clone();
                let url = format!("{aggregator}/v2/catalog");
                tokio::spawn(async move {
                    let mut lat = Vec::with_capacity(per_client);
                    for _ in 0..per_client {
                        let req = client
                            .get(&url)
                            .basic_auth(USER, Some(PASSWORD))
                            .header("X-Broker-API-Version", "2.17");
                        lat.push(timed(&client, req).await);
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
        catalog_rows.push((
            concurrency,
            all.len() as f64 / elapsed.as_secs_f64(),
            percentile(&all, 0.5),
            percentile(&all, 0.99),
        ));
    }

    // ---- forwarded provision and bind vs the upstream directly -----------------------------
    let catalog: Value = osb(client.get(format!("{aggregator}/v2/catalog")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
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
    let rounds = 300;
    let (mut direct_p, mut via_p, mut direct_b, mut via_b) = (vec![], vec![], vec![], vec![]);
    for i in 0..rounds {
        let body = |s: &str, p: &str| json!({"service_id": s, "plan_id": p, "organization_guid": "o", "space_guid": "s"});
        // Alternate so both paths see the same machine state.
        direct_p.push(
            timed(
                &client,
                osb(client.put(format!("{}/v2/service_instances/d{i}", bases[0])))
                    .json(&body("u0-svc-0", "u0-svc-0-plan-0")),
            )
            .await,
        );
        via_p.push(
            timed(
                &client,
                osb(client.put(format!("{aggregator}/v2/service_instances/a{i}")))
                    .json(&body(&sid, &pid)),
            )
            .await,
        );
        let bind = |s: &str, p: &str| json!({"service_id": s, "plan_id": p});
        direct_b.push(
            timed(
                &client,
                osb(client.put(format!(
                    "{}/v2/service_instances/d{i}/service_bindings/b{i}",
                    bases[0]
                )))
                .json(&bind("u0-svc-0", "u0-svc-0-plan-0")),
            )
            .await,
        );
        via_b.push(
            timed(
                &client,
                osb(client.put(format!(
                    "{aggregator}/v2/service_instances/a{i}/service_bindings/b{i}"
                )))
                .json(&bind(&sid, &pid)),
            )
            .await,
        );
    }
    for v in [&mut direct_p, &mut via_p, &mut direct_b, &mut via_b] {
        v.sort();
    }

    println!(
        "Brokerage federation benchmark ({} cores)",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!();
    println!(
        "merge 100 upstreams x 100 services x 3 plans: median {}, best {}",
        ms(merges[2]),
        ms(merges[0])
    );
    println!();
    println!(
        "GET /v2/catalog, 201 services (10 upstreams x 20 + 1 local), served from the snapshot:"
    );
    println!(
        "{:>12} {:>12} {:>12} {:>12}",
        "connections", "req/s", "p50", "p99"
    );
    for (c, rps, p50, p99) in &catalog_rows {
        println!("{c:>12} {rps:>12.0} {:>12} {:>12}", ms(*p50), ms(*p99));
    }
    println!();
    println!("forwarded calls, {rounds} each, sequential (embedded store, fsync per commit):");
    println!(
        "{:>10} {:>14} {:>14} {:>14} {:>14}",
        "call", "direct p50", "via p50", "added p50", "added p99"
    );
    for (name, d, v) in [
        ("provision", &direct_p, &via_p),
        ("bind", &direct_b, &via_b),
    ] {
        let (dp50, vp50) = (percentile(d, 0.5), percentile(v, 0.5));
        let (dp99, vp99) = (percentile(d, 0.99), percentile(v, 0.99));
        println!(
            "{name:>10} {:>14} {:>14} {:>14} {:>14}",
            ms(dp50),
            ms(vp50),
            ms(vp50.saturating_sub(dp50)),
            ms(vp99.saturating_sub(dp99))
        );
    }
}
