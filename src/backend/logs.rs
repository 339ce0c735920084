//! The log backend (the seed's section 2.4): an instance is a log kept in the state store
//! ([`crate::logs`]); a binding is a drain URL of its own on the broker's listener,
//! `<external_url>/drains/<binding id>/<secret token>`, which the bind answers as
//! `syslog_drain_url` (never among the credentials apps read). It needs no server.

use std::sync::Arc;

use async_trait::async_trait;
use rand::distr::{Alphanumeric, SampleString};
use serde_json::Map;

use super::{Backend, BackendError, Binding, Bound, Unbinding};
use crate::catalog::PlanLimits;
use crate::logs::{Logs, Retention};
use crate::store::{Drain, StateStore, StoreError};

pub struct LogsBackend {
    logs: Arc<Logs>,
    store: Arc<dyn StateStore>,
    /// `broker.external_url` without a trailing slash.
    base: String,
}

impl LogsBackend {
    pub fn new(logs: Arc<Logs>, store: Arc<dyn StateStore>, external_url: &str) -> Self {
        LogsBackend {
            logs,
            store,
            base: external_url.trim_end_matches('/').to_string(),
        }
    }
}

/// Whether an app GUID is one the syslog listener routes by: a safe store key.
fn routable(app: &str) -> bool {
    app.len() <= 128
        && app
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
}

fn retention(limits: PlanLimits) -> Retention {
    Retention {
        lines: limits.max_log_lines,
        bytes: limits.max_log_bytes,
    }
}

fn unavailable(e: StoreError) -> BackendError {
    BackendError::unavailable("the log store is unavailable", e)
}

#[async_trait]
impl Backend for LogsBackend {
    fn describe(&self) -> String {
        "logs (kept in the state store)".into()
    }

    async fn check(&self) -> Result<(), BackendError> {
        self.store.check().await.map_err(unavailable)
    }

    async fn provision(&self, instance_id: &str, limits: PlanLimits) -> Result<(), BackendError> {
        self.logs
            .open_book(instance_id, retention(limits))
            .await
            .map_err(unavailable)
    }

    async fn update(
        &self,
        instance_id: &str,
        _from: PlanLimits,
        to: PlanLimits,
    ) -> Result<(), BackendError> {
        self.logs
            .open_book(instance_id, retention(to))
            .await
            .map_err(unavailable)
    }

    /// Deletes the log. Bindings that go with the instance (a service that lets deprovision
    /// take its bindings along) were unbound first by the broker.
    async fn deprovision(
        &self,
        instance_id: &str,
        _limits: PlanLimits,
    ) -> Result<(), BackendError> {
        self.logs
            .delete_book(instance_id)
            .await
            .map_err(unavailable)
    }

    async fn bind(&self, binding: &Binding<'_>) -> Result<Bound, BackendError> {
        let Binding {
            instance_id,
            binding_id,
            app,
            ..
        } = *binding;
        if let Some(app) = app.filter(|a| routable(a)) {
            self.logs
                .add_app(app, instance_id, binding_id)
                .await
                .map_err(unavailable)?;
        }
        let token = Alphanumeric.sample_string(&mut rand::rng(), 40);
        let url = format!("{}/drains/{binding_id}/{token}", self.base);
        Ok(Bound {
            credentials: Map::new(),
            drain: Some(Drain { url, token }),
        })
    }

    async fn unbind(&self, binding: &Unbinding<'_>) -> Result<(), BackendError> {
        let Unbinding {
            binding_id, app, ..
        } = *binding;
        self.logs.revoke(binding_id).await;
        if let Some(app) = app.filter(|a| routable(a)) {
            self.logs
                .remove_app(app, binding_id)
                .await
                .map_err(unavailable)?;
        }
        Ok(())
    }

    /// What the plan keeps; the dashboard reads the book itself for the lines and drops.
    async fn describe_instance(
        &self,
        _instance_id: &str,
        limits: PlanLimits,
    ) -> Result<Vec<(String, String)>, BackendError> {
        Ok(vec![(
            "Keeps".into(),
            format!(
                "the last {} lines, at most {} KB",
                limits.max_log_lines,
                limits.max_log_bytes / 1024
            ),
        )])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{EmbeddedStore, Table};

    /// A bind routes an app's syslog messages by its GUID only when that GUID is a safe store
    /// key; the drain is handed out either way.
    #[tokio::test]
    async fn only_routable_app_guids_become_store_keys() {
        let store: Arc<dyn StateStore> = Arc::new(EmbeddedStore::in_memory().unwrap());
        let logs = Logs::new(store.clone(), 100);
        let backend = LogsBackend::new(logs, store.clone(), "https://broker.example.com/");
        let limits = PlanLimits {
            max_storage_mb: 0,
            max_user_connections: 0,
            purge_on_deprovision: false,
            max_log_lines: 10,
            max_log_bytes: 1024,
        };
        let hostile = format!("../{}", "x".repeat(200));
        for (binding_id, app, routed) in [
            ("b1", "0b0a5c3e-app", true),
            ("b2", hostile.as_str(), false),
            ("b3", "app with spaces", false),
        ] {
            let binding = Binding {
                instance_id: "i1",
                binding_id,
                app: Some(app),
                limits,
                parameters: None,
            };
            let bound = backend.bind(&binding).await.unwrap();
            let drain = bound.drain.unwrap();
            let url = drain.url;
            assert!(url.ends_with(&format!("/{}", drain.token)));
            assert!(url.starts_with(&format!("https://broker.example.com/drains/{binding_id}/")));
            let key = format!("app:{app}");
            let stored = store.get(Table::Logs, &key).await.unwrap();
            assert_eq!(stored.is_some(), routed, "{app:?}");
        }
        // Unbinding stops the routing: the app's entry no longer names the binding.
        let unbinding = Unbinding {
            instance_id: "i1",
            binding_id: "b1",
            app: Some("0b0a5c3e-app"),
        };
        backend.unbind(&unbinding).await.unwrap();
        let stored = store.get(Table::Logs, "app:0b0a5c3e-app").await.unwrap();
        assert!(
            stored.is_none_or(|v| !String::from_utf8_lossy(&v.doc).contains("\"b1\"")),
            "the binding is no longer routed to"
        );
    }
}
