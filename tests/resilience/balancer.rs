//! Debian's haproxy in front of a fleet of brokers, configured from
//! `tests/fixtures/haproxy.cfg`: shared by the resilience tests' chaos scenario and the
//! fleet benchmark (`benches/fleet.rs` includes this file).

use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// haproxy running until dropped; `base` is its URL.
pub struct Balancer {
    child: Child,
    pub base: String,
    _dir: tempfile::TempDir,
}

impl Balancer {
    pub fn start(brokers: &[u16]) -> Balancer {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap()
            .port();
        let servers: String = brokers
            .iter()
            .enumerate()
            .map(|(i, p)| format!("  server broker{i} 127.0.0.1:{p} check\n"))
            .collect();
        let file = dir.path().join("haproxy.cfg");
        std::fs::write(
            &file,
            include_str!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/fixtures/haproxy.cfg"
            ))
            .replace("@PORT@", &port.to_string())
            .replace("@SERVERS@", &servers),
        )
        .unwrap();
        let child = Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&file)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("haproxy.log")).unwrap())
            .spawn()
            .expect("haproxy starts (./scripts/test and ./scripts/bench install it)");
        let balancer = Balancer {
            child,
            base: format!("http://127.0.0.1:{port}"),
            _dir: dir,
        };
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return balancer;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("haproxy did not listen");
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
