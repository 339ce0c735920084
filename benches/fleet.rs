//! The fleet benchmark (`./scripts/bench`, after the main suite): MySQL lifecycles
//! (provision, bind, unbind, deprovision of `mysql-db`) per second through one broker on one
//! Galera node against three brokers on three nodes, both behind the same haproxy that
//! health-checks `/ready`, side by side in one run. Both share the store and the backend
//! with the cluster: the single broker's URLs name node 0 only, each fleet broker's name its
//! own node first and the others after it (the README's fleet topology). It prints; it
//! asserts nothing.
//!
//! Needs `BKG_BENCH_GALERA_PORTS` (the three nodes' ports) and `BKG_BENCH_BINARY`, which
//! `./scripts/bench` sets after starting a throwaway cluster. Nothing is pinned: the three
//! nodes, the brokers and this load generator share the machine's cores.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

#[path = "../tests/resilience/balancer.rs"]
mod balancer;
mod common;
use common::{cpu_secs, free_port, osb, Killed, PASSWORD, USER};

/// Concurrent clients, each running lifecycles one after another.
const CLIENTS: usize = 8;
/// How long each topology is loaded, after a warm-up of one lifecycle per client.
const LOAD: Duration = Duration::from_secs(20);

/// A `mysql://root@...` URL naming `nodes` in that order, with `db` as its path.
fn url(nodes: &[u16], db: &str) -> String {
    let hosts: Vec<String> = nodes.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    format!("mysql://root@{}/{db}", hosts.join(","))
}

/// One broker process whose store (database `store`) and backend name `nodes`, first first.
fn broker(binary: &str, dir: &std::path::Path, nodes: &[u16], store: &str) -> (Killed, u16) {
    let port = free_port();
    let file = dir.join(format!("broker-{port}.yml"));
    std::fs::write(
        &file,
        format!(
            "listen: {{host: 127.0.0.1, port: {port}}}\n\
             auth: {{credentials: [{{username: {USER}, password: {PASSWORD}}}]}}\n\
             store: {{kind: mysql, url: \"{}\"}}\n\
             log: {{format: text, level: warn}}\n\
             broker: {{external_url: \"http://127.0.0.1:{port}\"}}\n\
             backends: {{mysql: {{url: \"{}\", connect_timeout_secs: 5, max_connections: 20}}}}\n",
            url(nodes, store),
            url(nodes, ""),
        ),
    )
    .unwrap();
    let child = Command::new(binary)
        .args(["serve", "--config"])
        .arg(&file)
        .env_remove("PORT")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join(format!("broker-{port}.log"))).unwrap())
        .spawn()
        .unwrap();
    (Killed(child), port)
}

/// Waits until every broker is ready behind the balancer: as many consecutive catalogs
/// through it as there are brokers (round robin reaches each).
async fn wait_ready(client: &reqwest::Client, base: &str, brokers: usize) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut in_a_row = 0;
    loop {
        let answer = osb(client.get(format!("{base}/v2/catalog"))).send().await;
        match answer {
            Ok(r) if r.status().is_success() => {
                in_a_row += 1;
                if in_a_row >= brokers * 3 {
                    return r.json().await.unwrap();
                }
            }
            _ => in_a_row = 0,
        }
        assert!(
            Instant::now() < deadline,
            "the brokers behind {base} never got ready"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One lifecycle of instance `id`; whether every call succeeded.
async fn lifecycle(client: &reqwest::Client, base: &str, ids: (&str, &str), id: &str) -> bool {
    let (service, plan) = ids;
    let instance = format!("{base}/v2/service_instances/{id}");
    let binding = format!("{instance}/service_bindings/{id}-b");
    let query = format!("service_id={service}&plan_id={plan}");
    let calls = [
        osb(client.put(&instance)).json(&json!({"service_id": service, "plan_id": plan,
            "organization_guid": "o", "space_guid": "s"})),
        osb(client.put(&binding)).json(&json!({"service_id": service, "plan_id": plan})),
        osb(client.delete(format!("{binding}?{query}"))),
        osb(client.delete(format!("{instance}?{query}"))),
    ];
    for call in calls {
        match call.send().await {
            Ok(r) if r.status().is_success() => {}
            _ => return false,
        }
    }
    true
}

/// CPU seconds the whole machine has been busy (all but idle and iowait).
fn machine_busy_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let values: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let idle = values.get(3).unwrap_or(&0.0) + values.get(4).unwrap_or(&0.0);
    (values.iter().sum::<f64>() - idle) / 100.0
}

struct Rate {
    /// CPU milliseconds per lifecycle: the brokers', and the whole machine's.
    broker_cpu_ms: f64,
    machine_cpu_ms: f64,
    lifecycles: usize,
    failed: usize,
    per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
}

/// `CLIENTS` clients running lifecycles through `base` for `LOAD`, with the CPU the
/// `brokers` (process ids) and the whole machine spent meanwhile.
async fn run(base: &str, ids: (String, String), tag: &str, brokers: &[u32]) -> Rate {
    let brokers_cpu = || brokers.iter().map(|&pid| cpu_secs(pid)).sum::<f64>();
    let (broker_before, machine_before) = (brokers_cpu(), machine_busy_secs());
    let started = Instant::now();
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let (base, ids, tag) = (base.to_string(), ids.clone(), tag.to_string());
            tokio::spawn(async move {
                let client = reqwest::Client::new();
                let ids = (ids.0.as_str(), ids.1.as_str());
                lifecycle(&client, &base, ids, &format!("{tag}-warm-{c}")).await;
                let mut times = Vec::new();
                let mut failed = 0;
                let mut i = 0;
                while started.elapsed() < LOAD {
                    let t = Instant::now();
                    if lifecycle(&client, &base, ids, &format!("{tag}-{c}-{i}")).await {
                        times.push(t.elapsed());
                    } else {
                        failed += 1;
                    }
                    i += 1;
                }
                (times, failed)
            })
        })
        .collect();
    let (mut times, mut failed) = (Vec::new(), 0);
    for t in tasks {
        let (mut ts, f) = t.await.unwrap();
        times.append(&mut ts);
        failed += f;
    }
    let elapsed = started.elapsed();
    // Per lifecycle run, warm-ups and failed ones included: the CPU was spent on them too.
    let per = |secs: f64| secs * 1000.0 / (times.len() + failed + CLIENTS) as f64;
    let (broker_cpu_ms, machine_cpu_ms) = (
        per(brokers_cpu() - broker_before),
        per(machine_busy_secs() - machine_before),
    );
    times.sort();
    let at = |p: f64| {
        times
            .get(((times.len().max(1) - 1) as f64 * p).round() as usize)
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    Rate {
        broker_cpu_ms,
        machine_cpu_ms,
        lifecycles: times.len(),
        failed,
        per_sec: times.len() as f64 / elapsed.as_secs_f64(),
        p50_ms: at(0.5),
        p99_ms: at(0.99),
    }
}

/// Brokers on `topology` (each a list of nodes, first first) behind one balancer, loaded.
async fn topology(binary: &str, nodes: &[Vec<u16>], tag: &str) -> Rate {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("bkgbench_{tag}_{}", std::process::id());
    let brokers: Vec<(Killed, u16)> = nodes
        .iter()
        .map(|n| broker(binary, dir.path(), n, &store))
        .collect();
    let ports: Vec<u16> = brokers.iter().map(|b| b.1).collect();
    let haproxy = balancer::Balancer::start(&ports);
    let base = haproxy.base.clone();
    let client = reqwest::Client::new();
    let catalog = wait_ready(&client, &base, brokers.len()).await;
    let service = catalog["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "mysql-db")
        .expect("the default catalog's mysql-db");
    let ids = (
        service["id"].as_str().unwrap().to_string(),
        service["plans"][0]["id"].as_str().unwrap().to_string(),
    );
    let pids: Vec<u32> = brokers.iter().map(|b| b.0 .0.id()).collect();
    run(&base, ids, tag, &pids).await
}

#[tokio::main]
async fn main() {
    let binary = std::env::var("BKG_BENCH_BINARY").expect("run ./scripts/bench");
    let Ok(ports) = std::env::var("BKG_BENCH_GALERA_PORTS") else {
        println!(
            "fleet benchmark skipped: BKG_BENCH_GALERA_PORTS is not set (./scripts/bench sets it)"
        );
        return;
    };
    let ports: Vec<u16> = ports
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    assert_eq!(ports.len(), 3, "three Galera nodes");
    let one = topology(&binary, &[vec![ports[0]]], "one").await;
    let fleet: Vec<Vec<u16>> = (0..3)
        .map(|i| (0..3).map(|k| ports[(i + k) % 3]).collect())
        .collect();
    let three = topology(&binary, &fleet, "fleet").await;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!();
    println!(
        "Fleet on a three-node Galera cluster: {CLIENTS} clients running mysql-db lifecycles (provision, bind, unbind, deprovision) for {} s through haproxy; {cores} cores shared by the nodes, the brokers and the load",
        LOAD.as_secs()
    );
    println!();
    println!("| topology | lifecycles/s | lifecycle p50 / p99 ms | completed | failed | CPU ms per lifecycle: brokers / whole machine | ratio |");
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for (name, r) in [
        ("one broker, store and backend on node 0", &one),
        ("three brokers, each on its own node first", &three),
    ] {
        println!(
            "| {name} | {:.1} | {:.1} / {:.1} | {} | {} | {:.2} / {:.2} | {:.2} |",
            r.per_sec,
            r.p50_ms,
            r.p99_ms,
            r.lifecycles,
            r.failed,
            r.broker_cpu_ms,
            r.machine_cpu_ms,
            r.per_sec / one.per_sec
        );
    }
}
