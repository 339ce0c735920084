//! The broker's domain: what each OSB call means for the records and the backends.
//!
//! Every call that changes something follows one path:
//! 1. validate the request against the catalog;
//! 2. claim the resource by recording an operation "in progress" in the state store
//!    (an insert for new resources, a compare-and-swap otherwise): whoever loses the
//!    claim is answered 200/202/409/422 from the winner's record. A forwarded call's
//!    resource is the upstream's: it claims in process only, and step 4 is its one write;
//! 3. act: the backend's work, inline or in the background for asynchronous plans, or
//!    the call forwarded to the upstream that owns the service;
//! 4. record the outcome durably, and only then answer.
//!
//! A synchronous failure leaves the records as they were before step 2; an asynchronous
//! one is recorded as a failed operation that `last_operation` reports.
//!
//! Read in this order: this file (the broker and its lookups), [`operation`] (the one
//! claim → act → record → answer mechanism), `instances.rs`, `bindings.rs`,
//! `last_operation.rs` (the call kinds), `forward.rs` (acting through an upstream), and
//! `token.rs` (operation tokens).

mod bindings;
mod forward;
mod instances;
mod last_operation;
mod operation;
mod token;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::task::TaskTracker;
use upstreams::osb;

pub use operation::Reply;
pub use token::OperationToken;

use crate::backend::{Backend, BackendError, Backends};
use crate::catalog::{LocalCatalog, LocalPlan, LocalService, ParametersOf, PlanLimits};
use crate::error::OsbError;
use crate::federation::Federation;
use crate::store::{records, InstanceRecord, OpKind, OperationRecord, StateStore};

/// A backend as the call kinds hold it.
type BackendRef = Arc<dyn Backend>;

/// What the platform's request carried besides its body, passed on to upstreams.
#[derive(Debug, Clone, Default)]
pub struct CallContext {
    /// The caller's `X-Broker-API-Version`, parsed once at the door (the current one where
    /// absent; the door refuses what is not supported).
    pub api_version: upstreams::osb::ApiVersion,
    pub originating_identity: Option<String>,
    pub request_identity: Option<String>,
    /// Host and path of the calling Cloud Controller's `/v2/info`.
    pub api_info_location: Option<String>,
}

/// Timing settings of the broker.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// The longest one backend operation may run.
    pub operation_timeout: Duration,
    /// `Retry-After` on "in progress" polls.
    pub retry_after_secs: u64,
}

#[derive(Clone)]
pub struct Broker {
    inner: Arc<Inner>,
}

struct Inner {
    logs: Option<Arc<crate::logs::Logs>>,
    store: Arc<dyn StateStore>,
    catalog: LocalCatalog,
    backends: Backends,
    links: sso::DashboardLinks,
    timing: Timing,
    background: TaskTracker,
    federation: Arc<Federation>,
    metrics: Arc<crate::metrics::Metrics>,
    held: Arc<operation::Held>,
    /// Set on SIGTERM: the process is about to stop, and says so on `/ready`.
    stopping: std::sync::atomic::AtomicBool,
}

/// The longest an id may be; Cloud Foundry's are 36-character GUIDs.
const MAX_ID_LEN: usize = 128;

/// Instance and binding ids: 1 to 128 of `[A-Za-z0-9._-]`, not `.` or `..`. Anything
/// else could reach a backend's names, a path or a log line, and is refused whole.
pub fn check_id(what: &str, id: &str) -> Result<(), OsbError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id != "."
        && id != ".."
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(OsbError::BadRequest(format!(
            "{what} must be 1 to {MAX_ID_LEN} characters of A-Z, a-z, 0-9, '-', '_' and '.'"
        )))
    }
}

fn required(value: Option<String>, name: &str) -> Result<String, OsbError> {
    value.ok_or_else(|| OsbError::BadRequest(format!("{name} is required")))
}

/// A call's parameters: what the plan's schema allows, and only what the backend reads.
fn check_parameters(
    backend: &dyn Backend,
    plan: &LocalPlan,
    call: ParametersOf,
    parameters: Option<&serde_json::Map<String, serde_json::Value>>,
) -> Result<(), OsbError> {
    plan.check_parameters(call, parameters)
        .map_err(OsbError::BadRequest)?;
    crate::backend::only_known_parameters(parameters, backend.parameters(call))?;
    Ok(())
}

fn check_maintenance(
    plan: &LocalPlan,
    requested: Option<&osb::MaintenanceInfo>,
) -> Result<(), OsbError> {
    let Some(requested) = requested else {
        return Ok(());
    };
    match &plan.wire.maintenance_info {
        Some(offered) if offered.version == requested.version => Ok(()),
        Some(offered) => Err(OsbError::MaintenanceInfoConflict(format!(
            "maintenance_info.version {} does not match the plan's {}; fetch the catalog again",
            requested.version, offered.version
        ))),
        None => Err(OsbError::MaintenanceInfoConflict(format!(
            "plan {} has no maintenance_info, but {} was requested",
            plan.wire.name, requested.version
        ))),
    }
}

impl Broker {
    pub fn new(
        store: Arc<dyn StateStore>,
        catalog: LocalCatalog,
        backends: Backends,
        links: sso::DashboardLinks,
        timing: Timing,
        federation: Arc<Federation>,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Self {
        Broker {
            inner: Arc::new(Inner {
                logs: None,
                store,
                catalog,
                backends,
                links,
                timing,
                background: TaskTracker::new(),
                stopping: Default::default(),
                federation,
                metrics,
                held: Arc::default(),
            }),
        }
    }

    pub fn federation(&self) -> &Arc<Federation> {
        &self.inner.federation
    }

    pub fn metrics(&self) -> &Arc<crate::metrics::Metrics> {
        &self.inner.metrics
    }

    pub fn catalog(&self) -> &LocalCatalog {
        &self.inner.catalog
    }

    /// The broker with the log service's queues and books; called once, before the broker
    /// is shared.
    pub fn with_logs(mut self, logs: Option<Arc<crate::logs::Logs>>) -> Self {
        Arc::get_mut(&mut self.inner)
            .expect("with_logs is called before the broker is shared")
            .logs = logs;
        self
    }

    /// The log service's queues and books, when `backends.logs` is configured.
    pub fn logs(&self) -> Option<&Arc<crate::logs::Logs>> {
        self.inner.logs.as_ref()
    }

    pub fn store(&self) -> &Arc<dyn StateStore> {
        &self.inner.store
    }

    pub fn backends(&self) -> &Backends {
        &self.inner.backends
    }

    /// Marks the process as about to stop (`/ready` then answers 503).
    pub fn announce_stop(&self) {
        self.inner
            .stopping
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn stopping(&self) -> bool {
        self.inner
            .stopping
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Waits for background operations to record their outcome (graceful shutdown).
    pub async fn drain(&self) {
        self.inner.background.close();
        self.inner.background.wait().await;
    }

    fn store_ref(&self) -> &dyn StateStore {
        &*self.inner.store
    }

    fn lease(&self) -> chrono::Duration {
        chrono::Duration::from_std(self.inner.timing.operation_timeout)
            .unwrap_or(chrono::Duration::MAX)
            + chrono::Duration::seconds(crate::backend::LINGER_SECS as i64)
    }

    fn start(&self, kind: OpKind, asynchronous: bool) -> OperationRecord {
        OperationRecord::start(kind, asynchronous, self.lease())
    }

    fn service(&self, service_id: &str) -> Result<&LocalService, OsbError> {
        self.inner.catalog.service(service_id).ok_or_else(|| {
            OsbError::BadRequest(format!("service_id {service_id:?} is not in the catalog"))
        })
    }

    fn plan<'a>(
        &self,
        service: &'a LocalService,
        plan_id: &str,
    ) -> Result<&'a LocalPlan, OsbError> {
        service.plan(plan_id).ok_or_else(|| {
            OsbError::BadRequest(format!(
                "plan_id {plan_id:?} is not a plan of service {}",
                service.wire.name
            ))
        })
    }

    /// The service and plan a stored instance uses, which the catalog must still offer.
    fn offering(&self, instance: &InstanceRecord) -> Result<(&LocalService, &LocalPlan), OsbError> {
        let service = self
            .inner
            .catalog
            .service(&instance.service_id)
            .ok_or_else(|| {
                OsbError::Unprocessable(format!(
                    "the instance's service {} is no longer in the catalog",
                    instance.service_id
                ))
            })?;
        let plan = service.plan(&instance.plan_id).ok_or_else(|| {
            OsbError::Unprocessable(format!(
                "the instance's plan {} is no longer in the catalog",
                instance.plan_id
            ))
        })?;
        Ok((service, plan))
    }

    fn backend(&self, service: &LocalService) -> Result<Arc<dyn Backend>, OsbError> {
        self.inner
            .backends
            .get(&service.backend)
            .cloned()
            .ok_or_else(|| OsbError::Internal(format!("backend {} missing", service.backend)))
    }

    /// A DELETE for an instance or binding the broker never recorded (its create timed
    /// out on the platform's side, which then cleans up: Cloud Controller's orphan
    /// mitigation). A local service's backend removes whatever the derived names point at,
    /// if anything; an upstream's gets the DELETE; either way the answer is 410 unless the
    /// upstream says otherwise.
    async fn delete_unrecorded<R, F, W>(
        &self,
        path: &str,
        claim: R,
        remove: F,
        accepts_incomplete: bool,
        ctx: &CallContext,
    ) -> Result<Reply, OsbError>
    where
        R: operation::Resource,
        F: FnOnce(BackendRef, PlanLimits) -> W,
        W: Future<Output = Result<(), BackendError>>,
    {
        let kind = claim.operation().kind;
        let (service_id, plan_id) = claim.offering();
        let Some(service) = self.inner.catalog.service(service_id) else {
            return self
                .forward_orphan_delete(path, kind, service_id, plan_id, accepts_incomplete, ctx)
                .await;
        };
        let Some(plan) = service.plan(plan_id) else {
            return Err(OsbError::Gone);
        };
        let backend = self.backend(service)?;
        tracing::info!(
            service_id,
            "a delete for an unrecorded resource: removing what its names point at"
        );
        // Held while the names are cleaned: a provision or bind of the id meanwhile is
        // told to wait (422), so the cleanup never removes what it makes.
        let inserted = records::insert(self.store_ref(), &claim, None).await?;
        if !matches!(inserted, records::Inserted::Inserted) {
            return Err(OsbError::concurrency());
        }
        let removed = self.within(remove(backend, plan.limits)).await;
        let at = operation::At::Version(1);
        self.record_outcome(claim.id(), at, operation::Outcome::<R>::Remove)
            .await?;
        removed?;
        Err(OsbError::Gone)
    }
}

#[cfg(test)]
mod mechanism;

#[cfg(test)]
mod tests {
    use super::check_id;

    #[test]
    fn ids() {
        for ok in [
            "5a0e5c2a-3b1d-4c7e-9f00-1234567890ab",
            "a",
            "A.b_c-d",
            &"x".repeat(128),
        ] {
            assert!(check_id("id", ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            "../x",
            "a/b",
            "a'b",
            "a`b",
            "a\"b",
            "é",
            "a b",
            &"x".repeat(129),
        ] {
            assert!(check_id("id", bad).is_err(), "{bad}");
        }
    }
}
