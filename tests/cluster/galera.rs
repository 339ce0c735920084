//! The throwaway three-node MariaDB Galera cluster `./scripts/test` starts for the cluster
//! tests (`scripts/lib/galera.sh`): its nodes' URLs, and killing and restarting a node.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use mysql_async::prelude::*;

use crate::helpers::{StoreKind, TestConfig};

pub struct Cluster {
    dir: PathBuf,
    ports: Vec<u16>,
}

impl Cluster {
    /// The cluster `./scripts/test` started (BKG_TEST_GALERA_DIR, BKG_TEST_GALERA_PORTS).
    pub fn from_env() -> Cluster {
        let var = |name: &str| {
            std::env::var(name).unwrap_or_else(|_| {
                panic!("{name} is not set: run the cluster tests with ./scripts/test, which starts a throwaway Galera cluster")
            })
        };
        let ports = var("BKG_TEST_GALERA_PORTS")
            .split_whitespace()
            .map(|p| p.parse().unwrap())
            .collect::<Vec<u16>>();
        assert_eq!(ports.len(), 3, "three nodes");
        Cluster {
            dir: PathBuf::from(var("BKG_TEST_GALERA_DIR")),
            ports,
        }
    }

    pub fn port(&self, node: usize) -> u16 {
        self.ports[node]
    }

    /// One node's admin URL, with `db` as its path (empty for none).
    pub fn node_url(&self, node: usize, db: &str) -> String {
        format!("mysql://root@127.0.0.1:{}/{db}", self.ports[node])
    }

    /// The URL a broker is given: every node, `first` first.
    pub fn url(&self, first: usize, db: &str) -> String {
        let hosts: Vec<String> = (0..3)
            .map(|k| format!("127.0.0.1:{}", self.ports[(first + k) % 3]))
            .collect();
        format!("mysql://root@{}/{db}", hosts.join(","))
    }

    /// `config` with its store (the database `store`) and its MySQL backend on the
    /// cluster, `node` first.
    pub fn config(&self, node: usize, store: &str, config: TestConfig) -> TestConfig {
        config
            .with_store(StoreKind::Url(self.url(node, store)))
            .with_backend_url(&self.url(node, ""))
    }

    pub async fn admin(&self, node: usize) -> mysql_async::Conn {
        mysql_async::Conn::from_url(self.node_url(node, ""))
            .await
            .unwrap_or_else(|e| panic!("Galera node {node} answers: {e}"))
    }

    fn pid(&self, node: usize) -> Option<i32> {
        std::fs::read_to_string(self.dir.join(format!("node{node}/pid")))
            .ok()
            .and_then(|p| p.trim().parse().ok())
    }

    /// SIGKILLs the node and waits until its port is closed.
    pub fn kill(&self, node: usize) {
        let pid = self.pid(node).expect("the node's pid file");
        let ok = Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "node {node} (pid {pid}) is killed");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::path::Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts a killed node again from its `run.sh` and waits until it has rejoined (IST)
    /// and is synced; how long that took. The process outlives this test binary:
    /// `scripts/test` stops it by its pid file.
    pub async fn start(&self, node: usize) -> Duration {
        let started = Instant::now();
        let dir = self.dir.join(format!("node{node}"));
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("stderr.log"))
            .unwrap();
        // `setsid -f` forks the node off and returns at once.
        let forked = Command::new("setsid")
            .args(["-f", "bash"])
            .arg(dir.join("run.sh"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .status()
            .expect("the node's run.sh starts");
        assert!(forked.success(), "setsid forked the node");
        let deadline = started + Duration::from_secs(120);
        loop {
            if let Ok(mut conn) = mysql_async::Conn::from_url(self.node_url(node, "")).await {
                let state: Option<(String, String)> = conn
                    .query_first("SHOW STATUS LIKE 'wsrep_local_state_comment'")
                    .await
                    .ok()
                    .flatten();
                if state.is_some_and(|(_, s)| s == "Synced") {
                    return started.elapsed();
                }
            }
            assert!(
                Instant::now() < deadline,
                "Galera node {node} did not rejoin in 120 s; see {}",
                dir.join("error.log").display()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Whether `node` holds the database `name`.
    pub async fn has_database(&self, node: usize, name: &str) -> bool {
        crate::helpers::has_database(&mut self.admin(node).await, name).await
    }

    /// Whether `node` holds the user `name`.
    pub async fn has_user(&self, node: usize, name: &str) -> bool {
        crate::helpers::has_user(&mut self.admin(node).await, name).await
    }
}
