//! The log backend (the seed's section 2.4): an instance is a log kept in the state store
//! ([`crate::logs`]); a binding is a drain URL of its own on the broker's listener,
//! `<external_url>/drains/<binding id>/<secret token>`, which the bind answers as
//! `syslog_drain_url` (never among the credentials apps read). It needs no server.

use std::sync::Arc;

use async_trait::async_trait;
use rand::distr::{Alphanumeric, SampleString};
use serde_json::Map;

use super::{Backend, BackendError, Binding, Bound};
use crate::catalog::PlanLimits;
use crate::logs::{Logs, Retention};
use crate::store::records::{self};
use crate::store::{BindingRecord, StateStore, StoreError};

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

    async fn app_of(&self, binding_id: &str) -> Result<Option<String>, BackendError> {
        let stored = records::load::<BindingRecord>(&*self.store, binding_id)
            .await
            .map_err(unavailable)?;
        Ok(stored.and_then(|s| indexed_app(&s.record).map(str::to_string)))
    }
}

/// The binding's app, when it is one the syslog listener can route to: only app GUIDs that
/// are safe store keys are indexed.
fn indexed_app(binding: &BindingRecord) -> Option<&str> {
    binding.app_guid().filter(|a| {
        a.len() <= 128
            && a.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
    })
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

    /// Deletes the log, and stops routing syslog messages here for bindings that go with
    /// the instance (a service that lets deprovision take its bindings along).
    async fn deprovision(
        &self,
        instance_id: &str,
        _limits: PlanLimits,
    ) -> Result<(), BackendError> {
        let bindings = records::bindings_of(&*self.store, instance_id)
            .await
            .map_err(unavailable)?;
        for binding in bindings {
            self.logs.revoke(&binding.record.id).await;
            if let Some(app) = indexed_app(&binding.record) {
                self.logs
                    .remove_app(app, &binding.record.id)
                    .await
                    .map_err(unavailable)?;
            }
        }
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
        if let Some(app) = app {
            self.logs
                .add_app(app, instance_id, binding_id)
                .await
                .map_err(unavailable)?;
        }
        let token = Alphanumeric.sample_string(&mut rand::rng(), 40);
        let url = format!("{}/drains/{binding_id}/{token}", self.base);
        Ok(Bound {
            credentials: Map::new(),
            syslog_drain_url: Some(url),
        })
    }

    async fn unbind(&self, _instance_id: &str, binding_id: &str) -> Result<(), BackendError> {
        self.logs.revoke(binding_id).await;
        if let Some(app) = self.app_of(binding_id).await? {
            self.logs
                .remove_app(&app, binding_id)
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
