//! What the benchmarks share: the brokers' credentials and OSB headers, free ports, child
//! processes killed when dropped, and the CPU a process has used.

use std::process::Child;

/// The credentials the benchmarks' brokers are configured with.
pub const USER: &str = "bench";
pub const PASSWORD: &str = "bench-password";

/// A request as Cloud Controller sends it to the broker under test.
pub fn osb(req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
    req.basic_auth(USER, Some(PASSWORD))
        .header("X-Broker-API-Version", "2.17")
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A child process, killed and reaped when dropped.
pub struct Killed(pub Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// CPU seconds a process has used (user + system).
pub fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}
