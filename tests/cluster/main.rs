//! Brokerage on the seed's own database: a three-node MariaDB Galera cluster (Debian's
//! `galera-4`), started by `./scripts/test` only for these tests. Broker processes each talk
//! to their own node first and are given all three; they share one store.
//!
//! Run by `./scripts/test` after the other tests, one at a time (one of them kills a node):
//! `cargo test --test cluster -- --ignored --test-threads=1`.

#[allow(dead_code)]
mod galera;
#[allow(dead_code)]
#[path = "../api/helpers.rs"]
mod helpers;

use std::time::{Duration, Instant};

use brokerage::backend::{database_name, user_name};
use galera::Cluster;
use helpers::*;
use mysql_async::prelude::*;
use reqwest::Method;
use serde_json::Value;

/// A broker process whose store (the database `store`) and MySQL backend are the cluster,
/// `node` first.
async fn broker_on(cluster: &Cluster, node: usize, store: &str, config: TestConfig) -> Broker {
    let port = free_port();
    let config = cluster.config(node, store, config.with_port(port));
    let file = config.write();
    let log = config.dir.path().join("broker.log");
    let process = BrokerProcess::start(&file, port, &log).await;
    Broker {
        process,
        _config: config,
    }
}

struct Broker {
    process: BrokerProcess,
    _config: TestConfig,
}

impl Broker {
    fn client(&self) -> TestClient {
        self.process.client()
    }
}

fn fresh_store() -> String {
    format!("bkgstore_{}", uuid::Uuid::new_v4().simple())
}

/// The credentials as an app would use them against another node.
fn on_node(credentials: &Value, cluster: &Cluster, node: usize) -> Value {
    let mut c = credentials.clone();
    c["port"] = cluster.port(node).into();
    c
}

/// What the MySQL backend makes through one node holds on every node: the database, the
/// user and its password, its grants, the quota pass's revoke and its restoration; the
/// connection limit holds per node (documented in the README); unbind and deprovision
/// remove the user and the database everywhere.
#[tokio::test]
#[ignore = "needs the Galera cluster that ./scripts/test starts for these tests"]
async fn what_the_backend_makes_through_one_node_holds_on_every_node() {
    let cluster = Cluster::from_env();
    let broker = broker_on(&cluster, 0, &fresh_store(), TestConfig::new()).await;
    let client = broker.client();
    let id = unique("galera-backend");
    let b = format!("{id}-b");
    client.provision(&id, SMALL).await.expect(201);
    let creds = client.bind(&id, &b, SMALL).await.expect(201).body["credentials"].clone();
    for node in 0..3 {
        assert!(cluster.has_database(node, &database_name(&id)).await);
        assert!(cluster.has_user(node, &user_name(&b)).await);
    }
    // Written as the app through node 0, read through node 2.
    let mut writer = connect_as(&on_node(&creds, &cluster, 0)).await.unwrap();
    quota_tables(&mut writer).await;
    let mut reader = connect_as(&on_node(&creds, &cluster, 2)).await.unwrap();
    let kept: Option<String> = reader
        .query_first("SET STATEMENT wsrep_sync_wait = 1 FOR SELECT body FROM notes")
        .await
        .unwrap();
    assert_eq!(kept.as_deref(), Some("kept"));
    drop(reader);

    // The plan allows 2 connections: per node, as MariaDB counts them.
    let node1 = on_node(&creds, &cluster, 1);
    let held = vec![
        connect_as(&node1).await.unwrap(),
        connect_as(&node1).await.unwrap(),
    ];
    match connect_as(&node1).await {
        Err(mysql_async::Error::Server(e)) => assert_eq!(e.code, 1226, "{e}"),
        other => panic!(
            "a third connection on one node is refused: {:?}",
            other.is_ok()
        ),
    }
    connect_as(&on_node(&creds, &cluster, 2))
        .await
        .expect("the limit is counted per node");
    drop(held);

    // Over the 1 MB quota through node 0: the revoke is seen on node 1 and node 2.
    fill_blobs(&mut writer).await;
    drop(writer);
    let revoked = wait_for_insert(&on_node(&creds, &cluster, 1), true).await;
    wait_for_insert(&on_node(&creds, &cluster, 2), true).await;
    let mut cleaner = connect_as(&on_node(&creds, &cluster, 2)).await.unwrap();
    cleaner.query_drop("DELETE FROM blobs").await.unwrap();
    drop(cleaner);
    let restored = wait_for_insert(&on_node(&creds, &cluster, 1), false).await;
    wait_for_insert(&on_node(&creds, &cluster, 0), false).await;
    println!("galera backend: quota revoke seen on another node after {revoked:?}, restoration after {restored:?}");

    client.unbind(&id, &b, SMALL).await.expect(200);
    client.deprovision(&id, SERVICE, SMALL).await.expect(200);
    for node in 0..3 {
        assert!(!cluster.has_user(node, &user_name(&b)).await, "node {node}");
        assert!(
            !cluster.has_database(node, &database_name(&id)).await,
            "node {node}"
        );
    }
}

/// Brokers on different nodes answer a race on one id exactly as one server does, and see
/// each other's acknowledged changes at once. Three brokers start at the same moment on
/// three nodes of a fresh store: the migrations tolerate each other.
#[tokio::test]
#[ignore = "needs the Galera cluster that ./scripts/test starts for these tests"]
async fn brokers_on_three_nodes_start_together_race_as_one_server_and_read_their_writes() {
    let cluster = Cluster::from_env();
    let store = fresh_store();
    let (a, b, c) = tokio::join!(
        broker_on(&cluster, 0, &store, TestConfig::new()),
        broker_on(&cluster, 1, &store, TestConfig::new()),
        broker_on(&cluster, 2, &store, TestConfig::new()),
    );
    let clients = [a.client(), b.client(), c.client()];
    let mut outcomes = std::collections::BTreeMap::new();
    for round in 0..30 {
        let id = unique("galera-race");
        // Half the rounds the same body twice, half a different plan.
        let second = if round % 2 == 0 { SMALL } else { LARGE };
        let (x, y) = tokio::join!(
            clients[round % 3].provision(&id, SMALL),
            clients[(round + 1) % 3].provision(&id, second),
        );
        let mut pair = [x.status.as_u16(), y.status.as_u16()];
        pair.sort();
        *outcomes.entry((second, pair)).or_insert(0) += 1;
        let allowed: &[[u16; 2]] = if second == SMALL {
            &[[200, 201], [201, 422]]
        } else {
            &[[201, 409], [201, 422]]
        };
        assert!(
            allowed.contains(&pair),
            "round {round}: {pair:?}: {} / {}",
            x.raw,
            y.raw
        );
    }
    println!("galera races (plan of the second call, statuses): {outcomes:?}");

    // Each step through another broker on another node, right after the one before.
    for round in 0..20 {
        let id = unique("galera-ryw");
        let bid = format!("{id}-b");
        let at = |k: usize| &clients[(round + k) % 3];
        at(0).provision(&id, SMALL).await.expect(201);
        at(1)
            .call(Method::GET, &format!("/v2/service_instances/{id}"), None)
            .await
            .expect(200);
        let bound = at(2).bind(&id, &bid, SMALL).await;
        bound.expect(201);
        let fetched = at(0)
            .call(
                Method::GET,
                &format!("/v2/service_instances/{id}/service_bindings/{bid}"),
                None,
            )
            .await;
        fetched.expect(200);
        assert_eq!(fetched.body["credentials"], bound.body["credentials"]);
        at(1).unbind(&id, &bid, SMALL).await.expect(200);
        at(2).deprovision(&id, SERVICE, SMALL).await.expect(200);
        at(0)
            .call(Method::GET, &format!("/v2/service_instances/{id}"), None)
            .await
            .expect(404);
    }
    let conflicts = metric(&a.process.base, "brokerage_store_conflicts_total").await
        + metric(&b.process.base, "brokerage_store_conflicts_total").await
        + metric(&c.process.base, "brokerage_store_conflicts_total").await;
    println!("galera races: {conflicts} certification conflicts retried by the three brokers");
}

/// Posted through three brokers on three nodes at once, a flood keeps exactly what the
/// plan allows (50 lines, the quiet app's own), and the flushes' certification conflicts
/// are counted and retried, never lost.
#[tokio::test]
#[ignore = "needs the Galera cluster that ./scripts/test starts for these tests"]
async fn a_drain_flood_through_three_brokers_on_three_nodes_keeps_what_the_plan_allows() {
    let cluster = Cluster::from_env();
    let store = fresh_store();
    let (a, b, c) = tokio::join!(
        broker_on(&cluster, 0, &store, logs_config(None)),
        broker_on(&cluster, 1, &store, logs_config(None)),
        broker_on(&cluster, 2, &store, logs_config(None)),
    );
    let brokers = [&a, &b, &c];
    let id = unique("galera-flood");
    let drains = log_instance(&a.client(), &id, &["quiet-app", "loud-app"]).await;
    let paths: Vec<String> = drains
        .iter()
        .map(|d| d.strip_prefix(&a.process.base).unwrap().to_string())
        .collect();
    let http = reqwest::Client::new();
    for (i, broker) in brokers.iter().enumerate().take(3) {
        for n in 0..2 {
            let answer = http
                .post(format!("{}{}", broker.process.base, paths[0]))
                .body(cf_message("quiet-app", &format!("quiet {i}-{n}")))
                .send()
                .await
                .unwrap();
            assert_eq!(answer.status(), 200);
        }
    }
    wait_for_lines(&c.client(), &id, 6).await;
    // 4,800 lines from one app: 4 posters per broker, batches of 20.
    let loud: Vec<String> = brokers
        .iter()
        .map(|b| format!("{}{}", b.process.base, paths[1]))
        .collect();
    let flood = flood(&loud, "loud-app", 12, 20);
    for poster in flood {
        poster.await.unwrap();
    }
    // Every broker's flusher has run (100 ms) and every node applied the last write.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut seen = Vec::new();
    for broker in brokers {
        let got = read_lines(&broker.client(), &id).await;
        let lines = got["lines"].as_array().unwrap().clone();
        assert_eq!(lines.len(), 50, "the plan keeps 50 lines: {got}");
        let quiet = lines.iter().filter(|l| l["app"] == "quiet-app").count();
        assert_eq!(quiet, 6, "the quiet app keeps its lines: {got}");
        assert_eq!(got["dropped"]["loud-app"], 4800 - 44, "{}", got["dropped"]);
        seen.push(got);
    }
    assert_eq!(seen[0], seen[1]);
    assert_eq!(seen[1], seen[2]);
    let mut conflicts = 0.0;
    for broker in brokers {
        conflicts += metric(&broker.process.base, "brokerage_store_conflicts_total").await;
    }
    println!("galera drain flood: 4,806 lines through three brokers, 50 kept; {conflicts} certification conflicts retried");
}

/// The node a broker talks to dies under it: the broker goes on through another node, and
/// the time until the next acknowledged provision is printed. The node then rejoins (IST)
/// with everything acknowledged meanwhile.
#[tokio::test]
#[ignore = "needs the Galera cluster that ./scripts/test starts for these tests"]
async fn when_its_node_dies_a_broker_goes_on_through_another_within_seconds() {
    let cluster = Cluster::from_env();
    let broker = broker_on(&cluster, 1, &fresh_store(), TestConfig::new()).await;
    let client = broker.client();
    for _ in 0..3 {
        client
            .provision(&unique("galera-before"), SMALL)
            .await
            .expect(201);
    }
    cluster.kill(1);
    let killed = Instant::now();
    let mut acknowledged = Vec::new();
    let mut refused = 0;
    let first = loop {
        let id = unique("galera-after");
        let answer = client.provision(&id, SMALL).await;
        match answer.status.as_u16() {
            201 => {
                acknowledged.push(id);
                break killed.elapsed();
            }
            503 => refused += 1,
            other => panic!("during the failover: {other} {}", answer.raw),
        }
        assert!(
            killed.elapsed() < Duration::from_secs(30),
            "no failover in 30 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for _ in 0..5 {
        let id = unique("galera-after");
        client.provision(&id, SMALL).await.expect(201);
        acknowledged.push(id);
    }
    let failovers = metric(&broker.process.base, "brokerage_mysql_failovers_total").await;
    let rejoin = cluster.start(1).await;
    println!(
        "galera failover: node killed, next provision acknowledged after {} ms ({refused} clean 503s before it); {failovers} failovers counted; the node rejoined in {} ms",
        first.as_millis(),
        rejoin.as_millis()
    );
    assert!(first < Duration::from_secs(15), "{first:?}");
    assert!(failovers >= 1.0);
    for id in &acknowledged {
        assert!(
            cluster.has_database(1, &database_name(id)).await,
            "the rejoined node has {id}"
        );
        client
            .call(Method::GET, &format!("/v2/service_instances/{id}"), None)
            .await
            .expect(200);
    }
}
