//! Entry points for the fuzz targets in `fuzz/` and for their regression tests: the whole
//! HTTP request path (auth, version check, routing, extractors, ids, tokens) on a broker
//! with an in-memory store, and the catalog merge.

use std::sync::Arc;
use std::time::Duration;

use ::http::Request;

use crate::broker::{Broker, Timing};
use crate::catalog::LocalCatalog;
use crate::config::Config;
use crate::federation::{merge, Federation};
use crate::http::{self, AppState};
use crate::store::EmbeddedStore;

/// A broker with nothing behind it, answering requests in this thread.
pub struct RequestHarness {
    runtime: tokio::runtime::Runtime,
    app: crate::http::App,
}

impl RequestHarness {
    pub fn new() -> RequestHarness {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let app = runtime.block_on(async {
            let mut config = Config::load(None).expect("built-in defaults");
            config.catalog.services.clear();
            let links = sso::DashboardLinks::new(&config.broker.external_url).expect("default URL");
            let catalog =
                LocalCatalog::build(&[], &Default::default(), &links).expect("empty catalog");
            let store: Arc<dyn crate::store::StateStore> =
                Arc::new(EmbeddedStore::in_memory().expect("memory store"));
            let metrics = crate::metrics::Metrics::new();
            let federation = Arc::new(Federation::new(
                Vec::new(),
                catalog.published().clone(),
                store.clone(),
                Duration::from_secs(60),
                Duration::from_secs(60),
                metrics.clone(),
            ));
            let timing = Timing {
                operation_timeout: Duration::from_secs(5),
                retry_after_secs: 1,
            };
            let broker = Broker::new(
                store,
                catalog,
                Default::default(),
                links,
                timing,
                federation,
                metrics,
            );
            http::router(AppState::new(
                broker,
                &config.auth.credentials,
                &config.metrics.credentials,
                http::Limits {
                    max_body_bytes: 65536,
                    body_timeout: Duration::from_secs(5),
                    ready_interval: Duration::from_secs(5),
                },
                None,
                std::sync::Arc::new(
                    crate::dashboard::Platforms::new(&config.sso).expect("default platforms"),
                ),
            ))
        });
        RequestHarness { runtime, app }
    }

    /// Interprets the bytes as a request (first byte: method; up to the first newline:
    /// path and query; the rest: body), sends it with valid credentials, and panics when
    /// the answer is a 5xx or an OSB answer that is not a JSON object.
    pub fn run(&self, data: &[u8]) {
        let Some((&m, rest)) = data.split_first() else {
            return;
        };
        let method = ["GET", "PUT", "PATCH", "DELETE", "POST"][m as usize % 5];
        let split = rest.iter().position(|b| *b == b'\n').unwrap_or(rest.len());
        let (path, body) = rest.split_at(split);
        let path = String::from_utf8_lossy(path);
        let uri = format!("/v2/{}", path.trim_start_matches('/'));
        let Ok(request) = Request::builder()
            .method(method)
            .uri(&uri)
            .header(
                "authorization",
                "Basic YnJva2VyOmJyb2tlcmFnZS1kZXYtcGFzc3dvcmQ=",
            )
            .header("x-broker-api-version", "2.17")
            .header("content-type", "application/json")
            .body(bytes::Bytes::copy_from_slice(
                body.get(1..).unwrap_or_default(),
            ))
        else {
            return;
        };
        self.runtime.block_on(async move {
            let (status, bytes) = self.app.answer(request).await;
            assert!(
                !status.is_server_error(),
                "{method} {uri} answered {status}"
            );
            let json: Result<serde_json::Value, _> = serde_json::from_slice(&bytes);
            assert!(
                json.is_ok_and(|v| v.is_object()),
                "{method} {uri} answered {status} with a body that is no JSON object"
            );
        });
    }
}

impl Default for RequestHarness {
    fn default() -> Self {
        Self::new()
    }
}

/// Merges the bytes (as an upstream's catalog) and checks what the merge promises: unique
/// names and ids, every route leading to a served service.
pub fn catalog_merge(data: &[u8]) {
    let Ok(catalog) = upstreams::osb::Catalog::read_lenient(data) else {
        return;
    };
    let settings: upstreams::UpstreamSettings =
        serde_json::from_value(serde_json::json!({"alias": "fuzz", "url": "http://127.0.0.1:1"}))
            .expect("settings");
    let merged = merge::merge(
        &upstreams::osb::Catalog::default(),
        &[
            merge::UpstreamCatalog {
                settings: &settings,
                catalog: &catalog,
            },
            merge::UpstreamCatalog {
                settings: &settings,
                catalog: &catalog,
            },
        ],
    );
    let mut names = std::collections::HashSet::new();
    let mut ids = std::collections::HashSet::new();
    for s in &merged.catalog.services {
        assert!(names.insert(s.name.clone()), "duplicate name {}", s.name);
        assert!(ids.insert(s.id.clone()), "duplicate id {}", s.id);
        for p in &s.plans {
            assert!(ids.insert(p.id.clone()), "duplicate plan id {}", p.id);
        }
    }
    for id in merged.routes.keys() {
        assert!(ids.contains(id), "route to a service not served: {id}");
    }
}
