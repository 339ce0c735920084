//! Prometheus metrics: one registry per broker, rendered at `/metrics` behind its own
//! credentials.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::{Family, MetricConstructor};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Labels are `&'static str` and integers: counting a request allocates nothing.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub route: &'static str,
    pub method: &'static str,
    pub status: u64,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: &'static str,
    pub method: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamCallLabels {
    pub upstream: String,
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabels {
    pub upstream: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatementLabels {
    pub statement: &'static str,
}

/// What the MySQL store and backend count, process-wide: they are built before (and apart
/// from) a broker's registry, which registers these.
pub struct MysqlCounters {
    /// Store writes lost to a conflict (Galera's lost certification, a deadlock) and run again.
    pub conflicts: Family<StatementLabels, Counter>,
    /// Connections lost during a store write, whose outcome was then read back.
    pub lost_writes: Counter,
    /// Moves off a MySQL node that stopped answering or serving.
    pub failovers: Counter,
}

pub static MYSQL: std::sync::LazyLock<MysqlCounters> = std::sync::LazyLock::new(|| MysqlCounters {
    conflicts: Family::default(),
    lost_writes: Counter::default(),
    failovers: Counter::default(),
});

#[derive(Clone)]
pub struct Seconds;

impl MetricConstructor<Histogram> for Seconds {
    fn new_metric(&self) -> Histogram {
        // 0.5 ms .. ~16 s
        Histogram::new(exponential_buckets(0.0005, 2.0, 16))
    }
}

pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub request_seconds: Family<RouteLabels, Histogram, Seconds>,
    pub upstream_calls: Family<UpstreamCallLabels, Counter>,
    pub upstream_seconds: Family<UpstreamLabels, Histogram, Seconds>,
    /// 0 closed, 1 half-open, 2 open; set when scraped.
    pub breaker_state: Family<UpstreamLabels, Gauge>,
    pub operations_in_flight: Gauge,
    pub quota_cycles: Counter,
    pub quota_revocations: Counter,
    pub quota_restorations: Counter,
    pub log_lines_received: Counter,
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let mut registry = Registry::with_prefix("brokerage");
        let requests = Family::<RequestLabels, Counter>::default();
        let request_seconds =
            Family::<RouteLabels, Histogram, Seconds>::new_with_constructor(Seconds);
        let upstream_calls = Family::<UpstreamCallLabels, Counter>::default();
        let upstream_seconds =
            Family::<UpstreamLabels, Histogram, Seconds>::new_with_constructor(Seconds);
        let breaker_state = Family::<UpstreamLabels, Gauge>::default();
        let operations_in_flight = Gauge::default();
        let (quota_cycles, quota_revocations, quota_restorations) =
            (Counter::default(), Counter::default(), Counter::default());
        registry.register(
            "quota_cycles",
            "Quota enforcement passes this process made",
            quota_cycles.clone(),
        );
        registry.register(
            "quota_revocations",
            "Users whose write access was revoked for exceeding a storage quota",
            quota_revocations.clone(),
        );
        registry.register(
            "quota_restorations",
            "Users whose write access came back once usage fell below the quota",
            quota_restorations.clone(),
        );
        let log_lines_received = Counter::default();
        registry.register(
            "log_lines_received",
            "Log lines this process received on its drains",
            log_lines_received.clone(),
        );
        registry.register(
            "http_requests",
            "OSB and dashboard requests answered",
            requests.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "Time to answer a request",
            request_seconds.clone(),
        );
        registry.register(
            "upstream_calls",
            "Calls to upstream brokers by outcome",
            upstream_calls.clone(),
        );
        registry.register(
            "upstream_call_duration_seconds",
            "Time an upstream broker took to answer",
            upstream_seconds.clone(),
        );
        registry.register(
            "upstream_breaker_state",
            "Circuit breaker per upstream: 0 closed, 1 half-open, 2 open",
            breaker_state.clone(),
        );
        registry.register(
            "operations_in_flight",
            "Backend and upstream operations running now",
            operations_in_flight.clone(),
        );
        registry.register(
            "store_conflicts",
            "Store writes lost to a conflict with another node or process and run again",
            MYSQL.conflicts.clone(),
        );
        registry.register(
            "store_lost_writes",
            "Store writes whose connection broke, decided by reading the record back",
            MYSQL.lost_writes.clone(),
        );
        registry.register(
            "mysql_failovers",
            "Moves to another MySQL node after the one in use failed",
            MYSQL.failovers.clone(),
        );
        Arc::new(Metrics {
            registry,
            requests,
            request_seconds,
            upstream_calls,
            upstream_seconds,
            breaker_state,
            operations_in_flight,
            quota_cycles,
            quota_revocations,
            quota_restorations,
            log_lines_received,
        })
    }

    pub fn observe_request(
        &self,
        route: &'static str,
        method: &'static str,
        status: u16,
        elapsed: Duration,
    ) {
        self.requests
            .get_or_create(&RequestLabels {
                route,
                method,
                status: status.into(),
            })
            .inc();
        self.request_seconds
            .get_or_create(&RouteLabels { route, method })
            .observe(elapsed.as_secs_f64());
    }

    /// A route pattern as a `&'static str`: the router has a fixed set, each kept once.
    pub fn route_label(route: &str) -> &'static str {
        static ROUTES: std::sync::OnceLock<
            std::sync::Mutex<std::collections::HashSet<&'static str>>,
        > = std::sync::OnceLock::new();
        let mut known = ROUTES
            .get_or_init(Default::default)
            .lock()
            .expect("route labels");
        if let Some(r) = known.get(route) {
            return r;
        }
        let leaked: &'static str = Box::leak(route.to_string().into_boxed_str());
        known.insert(leaked);
        leaked
    }

    pub fn method_label(method: &http::Method) -> &'static str {
        use http::Method;
        match *method {
            Method::GET => "GET",
            Method::PUT => "PUT",
            Method::PATCH => "PATCH",
            Method::DELETE => "DELETE",
            Method::POST => "POST",
            Method::HEAD => "HEAD",
            Method::OPTIONS => "OPTIONS",
            _ => "OTHER",
        }
    }

    pub fn observe_upstream(&self, upstream: &str, outcome: &str, elapsed: Duration) {
        self.upstream_calls
            .get_or_create(&UpstreamCallLabels {
                upstream: upstream.into(),
                outcome: outcome.into(),
            })
            .inc();
        self.upstream_seconds
            .get_or_create(&UpstreamLabels {
                upstream: upstream.into(),
            })
            .observe(elapsed.as_secs_f64());
    }

    /// Counts an operation as running until the guard is dropped.
    pub fn in_flight(self: &Arc<Self>) -> InFlight {
        self.operations_in_flight.inc();
        InFlight(self.clone())
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String");
        out
    }
}

pub struct InFlight(Arc<Metrics>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.operations_in_flight.dec();
    }
}
