//! The broker's domain: what each OSB call means for the records and the backends.
//!
//! Every call that changes something follows one path:
//! 1. validate the request against the catalog;
//! 2. claim the resource by recording an operation "in progress" in the state store
//!    (an insert for new resources, a compare-and-swap otherwise): whoever loses the
//!    claim is answered 200/202/409/422 from the winner's record;
//! 3. run the backend work, inline or in the background for asynchronous plans;
//! 4. record the outcome durably, and only then answer.
//!
//! A synchronous failure leaves the records as they were before step 2; an asynchronous
//! one is recorded as a failed operation that `last_operation` reports.

mod proxy;
mod token;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Map, Value};
use tokio_util::task::TaskTracker;
use upstreams::osb::{self, BindRequest, LastOperation, ProvisionRequest, UpdateRequest};

pub use token::OperationToken;

use crate::backend::{Backend, BackendError, Backends};
use crate::catalog::{LocalCatalog, LocalPlan, LocalService, ParametersOf};
use crate::error::OsbError;
use crate::federation::Federation;
use crate::store::records::{self, Inserted, Record, Stored};
use crate::store::{BindingRecord, InstanceRecord, OpKind, OpState, OperationRecord, StateStore};

/// A successful answer: the status, the JSON body and, for polls, `Retry-After`.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub status: u16,
    pub body: Value,
    pub retry_after: Option<u64>,
}

impl Reply {
    fn new(status: u16, body: Value) -> Self {
        Reply {
            status,
            body,
            retry_after: None,
        }
    }
}

/// What the platform's request carried besides its body, passed on to upstreams.
#[derive(Debug, Clone, Default)]
pub struct CallContext {
    pub api_version: String,
    pub originating_identity: Option<String>,
    pub request_identity: Option<String>,
    /// Host and path of the calling Cloud Controller's `/v2/info`.
    pub api_info_location: Option<String>,
}

/// Reads a request body as its typed form; the raw form stays with the caller.
fn parse<T: serde::de::DeserializeOwned>(body: &Value) -> Result<T, OsbError> {
    serde_json::from_value(body.clone())
        .map_err(|e| OsbError::BadRequest(format!("the body is not a valid request: {e}")))
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
    store: Arc<dyn StateStore>,
    catalog: LocalCatalog,
    backends: Backends,
    links: sso::DashboardLinks,
    timing: Timing,
    background: TaskTracker,
    federation: Arc<Federation>,
    metrics: Arc<crate::metrics::Metrics>,
}

/// What becomes of a record once its operation ends.
enum Outcome<R> {
    Keep(R),
    Remove,
}

type Settled<R> = (Outcome<R>, Result<Reply, OsbError>);

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

fn object(map: Map<String, Value>) -> Value {
    Value::Object(map)
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
                store,
                catalog,
                backends,
                links,
                timing,
                background: TaskTracker::new(),
                federation,
                metrics,
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

    pub fn store(&self) -> &Arc<dyn StateStore> {
        &self.inner.store
    }

    pub fn backends(&self) -> &Backends {
        &self.inner.backends
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
            + chrono::Duration::seconds(5)
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

    fn token(owner: Option<&str>, op: &OperationRecord) -> String {
        OperationToken {
            target: owner.unwrap_or(OperationToken::LOCAL).to_string(),
            kind: op.kind,
            id: op.id.clone(),
            upstream: op.upstream_operation.clone(),
        }
        .encode()
    }

    /// The 202 for a record's operation in flight.
    fn accepted<R: Record>(record: &R) -> Reply {
        let mut body = record.reply_fields();
        let owner = record.upstream().map(|u| u.alias.as_str());
        body.insert(
            "operation".into(),
            json!(Self::token(owner, record.operation())),
        );
        Reply::new(202, object(body))
    }

    /// Claims a new resource id by inserting its record. When the id is taken, the
    /// request is answered from what is stored: 409 for other attributes, 202 or 422
    /// while an operation runs, `done`'s answer once complete; a failed or abandoned
    /// attempt is taken over (the `bool`).
    async fn claim_new<R: Record + Clone>(
        &self,
        record: &R,
        parent: Option<(&str, u64)>,
        accepts_incomplete: bool,
        same: impl Fn(&R) -> bool,
        done: impl Fn(&R) -> Option<Reply>,
    ) -> Result<Result<(u64, bool), Reply>, OsbError> {
        match records::insert(self.store_ref(), record, parent).await? {
            Inserted::Inserted => Ok(Ok((1, false))),
            Inserted::ParentChanged => Err(OsbError::concurrency()),
            Inserted::Exists(existing) => {
                let e = &existing.record;
                if !same(e) {
                    return Err(OsbError::Conflict(format!(
                        "{} {} already exists with other attributes",
                        if R::TABLE == crate::store::Table::Instances {
                            "instance"
                        } else {
                            "binding"
                        },
                        record.id()
                    )));
                }
                let op = e.operation();
                if op.in_flight() {
                    if op.kind == record.operation().kind && op.asynchronous && accepts_incomplete {
                        return Ok(Err(Self::accepted(e)));
                    }
                    return Err(OsbError::concurrency());
                }
                if let Some(reply) = done(e) {
                    return Ok(Err(reply));
                }
                // Taking over a failed or abandoned attempt: clean up after it first,
                // unless it failed because what it would have made was not the broker's.
                let takeover = !op.nothing_made;
                match records::replace(self.store_ref(), record, existing.version).await? {
                    Some(v) => Ok(Ok((v, takeover))),
                    None => Err(OsbError::concurrency()),
                }
            }
        }
    }

    /// Runs a claimed operation's backend work and records its outcome: inline, or in the
    /// background with an immediate 202.
    async fn drive<R, T, W, S>(
        &self,
        record: R,
        version: u64,
        work: W,
        settle: S,
    ) -> Result<Reply, OsbError>
    where
        R: Record + Clone + 'static,
        T: Send + 'static,
        W: Future<Output = Result<T, BackendError>> + Send + 'static,
        S: FnOnce(R, Result<T, BackendError>) -> Settled<R> + Send + 'static,
    {
        let timeout = self.inner.timing.operation_timeout;
        let in_flight = self.inner.metrics.in_flight();
        let timed = async move {
            let _in_flight = in_flight;
            within(timeout, work).await
        };
        if !record.operation().asynchronous {
            let (outcome, reply) = settle(record.clone(), timed.await);
            self.record_outcome::<R>(record.id(), version, outcome)
                .await?;
            return reply;
        }
        let this = self.clone();
        let id = record.id().to_string();
        let accepted = Self::accepted(&record);
        self.inner.background.spawn(async move {
            let (outcome, _) = settle(record, timed.await);
            if let Err(e) = this.record_outcome::<R>(&id, version, outcome).await {
                tracing::error!(table = R::TABLE.name(), %id, error = %e, "could not record the end of a background operation");
            }
        });
        Ok(accepted)
    }

    async fn record_outcome<R: Record>(
        &self,
        id: &str,
        version: u64,
        outcome: Outcome<R>,
    ) -> Result<(), OsbError> {
        let done = match outcome {
            Outcome::Keep(record) => records::replace(self.store_ref(), &record, version)
                .await?
                .is_some(),
            Outcome::Remove => records::remove::<R>(self.store_ref(), id, version).await?,
        };
        if done {
            Ok(())
        } else {
            Err(OsbError::Internal(format!(
                "{}/{id} changed while its operation ran",
                R::TABLE.name()
            )))
        }
    }

    // ---- instances -------------------------------------------------------------------

    pub async fn provision(
        &self,
        id: &str,
        body: Value,
        accepts_incomplete: bool,
        ctx: &CallContext,
    ) -> Result<Reply, OsbError> {
        check_id("instance_id", id)?;
        let req: ProvisionRequest = parse(&body)?;
        let service_id = required(req.service_id.clone(), "service_id")?;
        let plan_id = required(req.plan_id.clone(), "plan_id")?;
        let organization_guid = required(req.organization_guid.clone(), "organization_guid")?;
        let space_guid = required(req.space_guid.clone(), "space_guid")?;
        let mut record = InstanceRecord {
            id: id.to_string(),
            service_id: service_id.clone(),
            plan_id: plan_id.clone(),
            organization_guid,
            space_guid,
            context: req.context.clone(),
            parameters: req.parameters.clone(),
            maintenance_version: req.maintenance_info.as_ref().map(|m| m.version.clone()),
            dashboard_url: None,
            provisioned: false,
            created_at: chrono::Utc::now(),
            operation: self.start(OpKind::Provision, false),
            upstream: None,
            api_info_location: ctx.api_info_location.clone(),
        };
        if self.inner.catalog.service(&service_id).is_none() {
            if let Some(route) = self.inner.federation.route(&service_id) {
                return self
                    .proxy_provision(record, route, body, accepts_incomplete, ctx)
                    .await;
            }
        }
        let service = self.service(&service_id)?;
        let plan = self.plan(service, &plan_id)?;
        plan.check_parameters(ParametersOf::Provision, req.parameters.as_ref())
            .map_err(OsbError::BadRequest)?;
        check_maintenance(plan, req.maintenance_info.as_ref())?;
        if plan.asynchronous && !accepts_incomplete {
            return Err(OsbError::AsyncRequired);
        }
        let backend = self.backend(service)?;
        self.check_capacity(service, plan.limits.max_storage_mb, Some(id))
            .await?;
        record.maintenance_version = plan
            .wire
            .maintenance_info
            .as_ref()
            .map(|m| m.version.clone());
        record.dashboard_url = service
            .wire
            .dashboard_client
            .as_ref()
            .map(|_| self.inner.links.dashboard_url(id).to_string());
        record.operation = self.start(OpKind::Provision, plan.asynchronous);
        let (version, takeover) = match self
            .claim_new(
                &record,
                None,
                accepts_incomplete,
                |e| same_instance(e, &record),
                done_instance,
            )
            .await?
        {
            Ok(claimed) => claimed,
            Err(answer) => return Ok(answer),
        };
        tracing::info!(instance_id = id, service = %service.wire.name, plan = %plan.wire.name, "provisioning");
        let limits = plan.limits;
        let parameters = record.parameters.clone();
        let instance_id = id.to_string();
        let work = async move {
            if takeover {
                backend.deprovision(&instance_id, limits).await?;
            }
            backend
                .provision(&instance_id, limits, parameters.as_ref())
                .await
        };
        self.drive(record, version, work, |mut record, result| match result {
            Ok(()) => {
                record.provisioned = true;
                record.operation.finish(OpState::Succeeded, None);
                let body = object(record.reply_fields());
                (Outcome::Keep(record), Ok(Reply::new(201, body)))
            }
            Err(e) => failed(record, e, None),
        })
        .await
    }

    pub async fn update(
        &self,
        id: &str,
        body: Value,
        accepts_incomplete: bool,
        ctx: &CallContext,
    ) -> Result<Reply, OsbError> {
        check_id("instance_id", id)?;
        let req: UpdateRequest = parse(&body)?;
        let service_id = required(req.service_id.clone(), "service_id")?;
        let stored = self.existing_instance(id).await?;
        let current = stored.record.clone();
        if current.operation.in_flight() {
            return Err(OsbError::concurrency());
        }
        if service_id != current.service_id {
            return Err(OsbError::BadRequest(format!(
                "service_id {service_id:?} is not the instance's service"
            )));
        }
        if current.upstream.is_some() {
            return self
                .proxy_update(stored, req, body, accepts_incomplete, ctx)
                .await;
        }
        let (service, from) = self.offering(&current)?;
        let to = match &req.plan_id {
            Some(plan_id) => self.plan(service, plan_id)?,
            None => from,
        };
        if to.wire.id != from.wire.id && !service.plan_updateable(from) {
            return Err(OsbError::Unprocessable(format!(
                "plan changes are not supported for {} instances on plan {}",
                service.wire.name, from.wire.name
            )));
        }
        to.check_parameters(ParametersOf::Update, req.parameters.as_ref())
            .map_err(OsbError::BadRequest)?;
        check_maintenance(to, req.maintenance_info.as_ref())?;
        if to.asynchronous && !accepts_incomplete {
            return Err(OsbError::AsyncRequired);
        }
        let backend = self.backend(service)?;
        if to.limits.max_storage_mb > from.limits.max_storage_mb {
            self.check_capacity(service, to.limits.max_storage_mb, Some(id))
                .await?;
        }
        let mut record = current.clone();
        record.operation = self.start(OpKind::Update, to.asynchronous);
        record.operation.target_plan_id = Some(to.wire.id.clone());
        let Some(version) = records::replace(self.store_ref(), &record, stored.version).await?
        else {
            return Err(OsbError::concurrency());
        };
        tracing::info!(instance_id = id, from = %from.wire.name, to = %to.wire.name, "updating");
        let (from_limits, to_limits) = (from.limits, to.limits);
        let parameters = req.parameters.clone();
        let instance_id = id.to_string();
        let work = async move {
            backend
                .update(&instance_id, from_limits, to_limits, parameters.as_ref())
                .await
        };
        let target_maintenance = to.wire.maintenance_info.as_ref().map(|m| m.version.clone());
        let previous_op = current.operation;
        let (new_parameters, new_context) = (req.parameters, req.context);
        self.drive(
            record,
            version,
            work,
            move |mut record, result| match result {
                Ok(()) => {
                    if let Some(plan) = record.operation.target_plan_id.clone() {
                        record.plan_id = plan;
                    }
                    if new_parameters.is_some() {
                        record.parameters = new_parameters;
                    }
                    if new_context.is_some() {
                        record.context = new_context;
                    }
                    record.maintenance_version = target_maintenance;
                    record.operation.finish(OpState::Succeeded, None);
                    let body = object(record.reply_fields());
                    (Outcome::Keep(record), Ok(Reply::new(200, body)))
                }
                Err(e) => failed(record, e, Some(previous_op)),
            },
        )
        .await
    }

    pub async fn deprovision(
        &self,
        id: &str,
        service_id: Option<String>,
        plan_id: Option<String>,
        accepts_incomplete: bool,
        ctx: &CallContext,
    ) -> Result<Reply, OsbError> {
        check_id("instance_id", id)?;
        let service_id = required(service_id, "service_id")?;
        let plan_id = required(plan_id, "plan_id")?;
        let Some(stored) = records::load::<InstanceRecord>(self.store_ref(), id).await? else {
            // Never recorded (a provision that timed out on Cloud Controller's side): what
            // the derived names point at may exist all the same, locally or upstream.
            if let Some(reply) = self
                .local_orphan(&service_id, &plan_id, |backend, limits| {
                    let id = id.to_string();
                    async move { backend.deprovision(&id, limits).await }
                })
                .await
            {
                return reply;
            }
            return self
                .proxy_orphan_delete(
                    &format!("/v2/service_instances/{id}"),
                    &service_id,
                    &plan_id,
                    accepts_incomplete,
                    ctx,
                )
                .await;
        };
        let current = stored.record.clone();
        if service_id != current.service_id {
            return Err(OsbError::BadRequest(format!(
                "service_id {service_id:?} is not the instance's service"
            )));
        }
        let op = &current.operation;
        if op.in_flight() {
            if op.kind == OpKind::Deprovision && op.asynchronous && accepts_incomplete {
                return Ok(Self::accepted(&current));
            }
            return Err(OsbError::concurrency());
        }
        if current.upstream.is_some() {
            return self
                .proxy_deprovision(stored, accepts_incomplete, ctx)
                .await;
        }
        let (service, plan) = self.offering(&current)?;
        if plan.asynchronous && !accepts_incomplete {
            return Err(OsbError::AsyncRequired);
        }
        let backend = self.backend(service)?;
        let mut record = current.clone();
        record.operation = self.start(OpKind::Deprovision, plan.asynchronous);
        let Some(version) = records::replace(self.store_ref(), &record, stored.version).await?
        else {
            return Err(OsbError::concurrency());
        };
        // Listed only after the claim: a bind that raced it either shows here or failed.
        let bindings = records::bindings_of(self.store_ref(), id).await?;
        if !bindings.is_empty() && service.refuse_deprovision_with_bindings {
            let mut restored = record.clone();
            restored.operation = current.operation.clone();
            self.record_outcome(id, version, Outcome::Keep(restored))
                .await?;
            return Err(OsbError::Unprocessable(format!(
                "instance {id} still has {} binding{}: unbind {} first",
                bindings.len(),
                if bindings.len() == 1 { "" } else { "s" },
                if bindings.len() == 1 { "it" } else { "them" }
            )));
        }
        tracing::info!(instance_id = id, "deprovisioning");
        let instance_id = id.to_string();
        let limits = plan.limits;
        // A provision that failed on something already there made nothing to remove: what
        // is there is not the broker's.
        let ours = current.provisioned || !current.operation.nothing_made;
        let work = async move {
            match ours {
                true => backend.deprovision(&instance_id, limits).await,
                false => Ok(()),
            }
        };
        let previous_op = current.operation;
        self.drive(record, version, work, move |record, result| match result {
            Ok(()) => (Outcome::Remove, Ok(Reply::new(200, json!({})))),
            Err(e) => failed(record, e, Some(previous_op)),
        })
        .await
    }

    /// Cloud Controller's orphan mitigation for a local service: a DELETE for an instance
    /// or binding the broker never recorded (its create timed out on the platform's side)
    /// removes whatever its derived names point at, if anything, then answers 410. `None`
    /// when the service is not a local one.
    async fn local_orphan<F, W>(
        &self,
        service_id: &str,
        plan_id: &str,
        remove: F,
    ) -> Option<Result<Reply, OsbError>>
    where
        F: FnOnce(Arc<dyn crate::backend::Backend>, crate::catalog::PlanLimits) -> W,
        W: Future<Output = Result<(), BackendError>>,
    {
        let service = self.inner.catalog.service(service_id)?;
        let Some(plan) = service.plan(plan_id) else {
            return Some(Err(OsbError::Gone));
        };
        let backend = match self.backend(service) {
            Ok(backend) => backend,
            Err(e) => return Some(Err(e)),
        };
        tracing::info!(
            service_id,
            "a delete for an unrecorded resource: removing what its names point at"
        );
        let removed = within(
            self.inner.timing.operation_timeout,
            remove(backend, plan.limits),
        )
        .await;
        Some(match removed {
            Ok(()) => Err(OsbError::Gone),
            Err(e) => Err(e.into()),
        })
    }

    /// Refuses (507) what would promise the backend more storage than it has: the plans of
    /// every other instance on it, plus `wanted`. Instances are counted from the store, so
    /// every broker process sharing it counts the same.
    async fn check_capacity(
        &self,
        service: &LocalService,
        wanted: u64,
        except: Option<&str>,
    ) -> Result<(), OsbError> {
        let Some(capacity) = self.backend(service)?.capacity_mb() else {
            return Ok(());
        };
        let mut promised = 0u64;
        for (id, doc) in self
            .store_ref()
            .list(crate::store::Table::Instances)
            .await?
        {
            if Some(id.as_str()) == except {
                continue;
            }
            let Ok(instance) = serde_json::from_slice::<InstanceRecord>(&doc.doc) else {
                continue;
            };
            let Some(other) = self.inner.catalog.service(&instance.service_id) else {
                continue;
            };
            if other.backend != service.backend || instance.upstream.is_some() {
                continue;
            }
            if let Some(plan) = other.plan(&instance.plan_id) {
                promised += plan.limits.max_storage_mb;
            }
        }
        if promised + wanted > capacity {
            return Err(OsbError::InsufficientStorage(format!(
                "the {} backend has {} MB of its {capacity} MB left; this plan needs {wanted} MB",
                service.backend,
                capacity.saturating_sub(promised)
            )));
        }
        Ok(())
    }

    async fn existing_instance(&self, id: &str) -> Result<Stored<InstanceRecord>, OsbError> {
        match records::load::<InstanceRecord>(self.store_ref(), id).await? {
            Some(stored) if stored.record.provisioned => Ok(stored),
            Some(stored) if stored.record.operation.in_flight() => Err(OsbError::concurrency()),
            _ => Err(OsbError::NotFound(format!("instance {id} does not exist"))),
        }
    }

    pub async fn fetch_instance(&self, id: &str, ctx: &CallContext) -> Result<Reply, OsbError> {
        check_id("instance_id", id)?;
        let Some(stored) = records::load::<InstanceRecord>(self.store_ref(), id).await? else {
            return Err(OsbError::NotFound(format!("instance {id} does not exist")));
        };
        let r = stored.record;
        if !r.provisioned {
            return Err(OsbError::NotFound(format!(
                "instance {id} is not provisioned"
            )));
        }
        if r.operation.kind == OpKind::Update && r.operation.in_flight() {
            return Err(OsbError::concurrency());
        }
        if r.upstream.is_some() {
            return self.proxy_fetch_instance(&r, ctx).await;
        }
        let mut body = r.reply_fields();
        body.insert("service_id".into(), json!(r.service_id));
        body.insert("plan_id".into(), json!(r.plan_id));
        if let Some(p) = r.parameters {
            body.insert("parameters".into(), Value::Object(p));
        }
        if let Some(v) = r.maintenance_version {
            body.insert("maintenance_info".into(), json!({ "version": v }));
        }
        Ok(Reply::new(200, object(body)))
    }

    // ---- bindings --------------------------------------------------------------------

    pub async fn bind(
        &self,
        instance_id: &str,
        binding_id: &str,
        body: Value,
        accepts_incomplete: bool,
        ctx: &CallContext,
    ) -> Result<Reply, OsbError> {
        check_id("instance_id", instance_id)?;
        check_id("binding_id", binding_id)?;
        let req: BindRequest = parse(&body)?;
        let service_id = required(req.service_id.clone(), "service_id")?;
        let plan_id = required(req.plan_id.clone(), "plan_id")?;
        let instance = self.existing_instance(instance_id).await?;
        if service_id != instance.record.service_id {
            return Err(OsbError::BadRequest(format!(
                "service_id {service_id:?} is not the instance's service"
            )));
        }
        if instance.record.operation.in_flight() {
            return Err(OsbError::concurrency());
        }
        let mut record = BindingRecord {
            id: binding_id.to_string(),
            instance_id: instance_id.to_string(),
            service_id,
            plan_id,
            app_guid: req.app_guid.clone(),
            bind_resource: req.bind_resource.clone(),
            parameters: req.parameters.clone(),
            context: req.context.clone(),
            credentials: None,
            created_at: chrono::Utc::now(),
            operation: self.start(OpKind::Bind, false),
            upstream: instance.record.upstream.clone(),
        };
        if record.upstream.is_some() {
            return self
                .proxy_bind(record, instance.version, body, accepts_incomplete, ctx)
                .await;
        }
        let (service, plan) = self.offering(&instance.record)?;
        self.plan(service, &record.plan_id)?;
        if !service.bindable(plan) {
            return Err(OsbError::BadRequest(format!(
                "plan {} of {} is not bindable",
                plan.wire.name, service.wire.name
            )));
        }
        let has_app = req.app_guid.is_some()
            || req.bind_resource.as_ref().is_some_and(|r| {
                r.get("app_guid")
                    .is_some_and(|a| a.as_str().is_some_and(|s| !s.is_empty()))
            });
        if service.bindings_require_app && !has_app {
            return Err(OsbError::RequiresApp);
        }
        plan.check_parameters(ParametersOf::Bind, req.parameters.as_ref())
            .map_err(OsbError::BadRequest)?;
        if plan.asynchronous && !accepts_incomplete {
            return Err(OsbError::AsyncRequired);
        }
        let backend = self.backend(service)?;
        record.operation = self.start(OpKind::Bind, plan.asynchronous);
        let parent = Some((instance_id, instance.version));
        let done = |e: &BindingRecord| {
            e.credentials
                .as_ref()
                .map(|c| Reply::new(200, json!({ "credentials": c })))
        };
        let (version, _) = match self
            .claim_new(
                &record,
                parent,
                accepts_incomplete,
                |e| same_binding(e, &record),
                done,
            )
            .await?
        {
            Ok(claimed) => claimed,
            Err(answer) => return Ok(answer),
        };
        tracing::info!(instance_id, binding_id, "binding");
        let limits = plan.limits;
        let parameters = record.parameters.clone();
        let (iid, bid) = (instance_id.to_string(), binding_id.to_string());
        let work = async move { backend.bind(&iid, &bid, limits, parameters.as_ref()).await };
        self.drive(record, version, work, |mut record, result| match result {
            Ok(credentials) => {
                let body = json!({ "credentials": credentials });
                record.credentials = Some(credentials);
                record.operation.finish(OpState::Succeeded, None);
                (Outcome::Keep(record), Ok(Reply::new(201, body)))
            }
            Err(e) => failed(record, e, None),
        })
        .await
    }

    pub async fn unbind(
        &self,
        instance_id: &str,
        binding_id: &str,
        service_id: Option<String>,
        plan_id: Option<String>,
        accepts_incomplete: bool,
        ctx: &CallContext,
    ) -> Result<Reply, OsbError> {
        check_id("instance_id", instance_id)?;
        check_id("binding_id", binding_id)?;
        let service_id = required(service_id, "service_id")?;
        let plan_id = required(plan_id, "plan_id")?;
        let stored = match records::load::<BindingRecord>(self.store_ref(), binding_id).await? {
            Some(s) if s.record.instance_id == instance_id => s,
            Some(_) => return Err(OsbError::Gone),
            None => {
                if let Some(reply) = self
                    .local_orphan(&service_id, &plan_id, |backend, _| {
                        let (instance_id, binding_id) =
                            (instance_id.to_string(), binding_id.to_string());
                        async move { backend.unbind(&instance_id, &binding_id).await }
                    })
                    .await
                {
                    return reply;
                }
                let path =
                    format!("/v2/service_instances/{instance_id}/service_bindings/{binding_id}");
                return self
                    .proxy_orphan_delete(&path, &service_id, &plan_id, accepts_incomplete, ctx)
                    .await;
            }
        };
        let current = stored.record.clone();
        let op = &current.operation;
        if op.in_flight() {
            if op.kind == OpKind::Unbind && op.asynchronous && accepts_incomplete {
                return Ok(Self::accepted(&current));
            }
            return Err(OsbError::concurrency());
        }
        if current.upstream.is_some() {
            return self.proxy_unbind(stored, accepts_incomplete, ctx).await;
        }
        let service = self.service(&current.service_id)?;
        let asynchronous = service
            .plan(&current.plan_id)
            .is_some_and(|p| p.asynchronous);
        if asynchronous && !accepts_incomplete {
            return Err(OsbError::AsyncRequired);
        }
        let backend = self.backend(service)?;
        let mut record = current.clone();
        record.operation = self.start(OpKind::Unbind, asynchronous);
        let Some(version) = records::replace(self.store_ref(), &record, stored.version).await?
        else {
            return Err(OsbError::concurrency());
        };
        tracing::info!(instance_id, binding_id, "unbinding");
        let (iid, bid) = (instance_id.to_string(), binding_id.to_string());
        let store = self.inner.store.clone();
        let work = async move {
            backend.unbind(&iid, &bid).await?;
            // Then whatever this binding made for itself that no other binding accounts for.
            let instance = iid.clone();
            let live = move || {
                let (store, iid, bid) = (store.clone(), iid.clone(), bid.clone());
                let read = async move {
                    let bindings = records::bindings_of(&*store, &iid).await.map_err(|e| {
                        BackendError::unavailable("the broker's state store is unavailable", e)
                    })?;
                    Ok(bindings
                        .into_iter()
                        .map(|b| b.record.id)
                        .filter(|id| *id != bid)
                        .collect())
                };
                Box::pin(read) as futures::future::BoxFuture<'static, _>
            };
            backend.prune(&instance, &live).await
        };
        let previous_op = current.operation;
        self.drive(record, version, work, move |record, result| match result {
            Ok(()) => (Outcome::Remove, Ok(Reply::new(200, json!({})))),
            Err(e) => failed(record, e, Some(previous_op)),
        })
        .await
    }

    pub async fn fetch_binding(
        &self,
        instance_id: &str,
        binding_id: &str,
        ctx: &CallContext,
    ) -> Result<Reply, OsbError> {
        check_id("instance_id", instance_id)?;
        check_id("binding_id", binding_id)?;
        let not_found = || OsbError::NotFound(format!("binding {binding_id} does not exist"));
        let Some(stored) = records::load::<BindingRecord>(self.store_ref(), binding_id).await?
        else {
            return Err(not_found());
        };
        let r = stored.record;
        if r.instance_id != instance_id {
            return Err(not_found());
        }
        if r.upstream.is_some() {
            if r.operation.kind == OpKind::Bind
                && r.operation.effective_state() != OpState::Succeeded
            {
                return Err(not_found());
            }
            return self.proxy_fetch_binding(&r, ctx).await;
        }
        let Some(credentials) = r.credentials else {
            return Err(not_found());
        };
        let mut body = Map::new();
        body.insert("credentials".into(), Value::Object(credentials));
        if let Some(p) = r.parameters {
            body.insert("parameters".into(), Value::Object(p));
        }
        Ok(Reply::new(200, object(body)))
    }

    // ---- last_operation --------------------------------------------------------------

    pub async fn instance_last_operation(
        &self,
        id: &str,
        operation: Option<String>,
        ctx: &CallContext,
    ) -> Result<Reply, OsbError> {
        check_id("instance_id", id)?;
        let token = operation
            .as_deref()
            .map(OperationToken::decode)
            .transpose()?;
        let stored = records::load::<InstanceRecord>(self.store_ref(), id).await?;
        let path = format!("/v2/service_instances/{id}/last_operation");
        self.last_operation(stored, token, &path, ctx).await
    }

    pub async fn binding_last_operation(
        &self,
        instance_id: &str,
        binding_id: &str,
        operation: Option<String>,
        ctx: &CallContext,
    ) -> Result<Reply, OsbError> {
        check_id("instance_id", instance_id)?;
        check_id("binding_id", binding_id)?;
        let token = operation
            .as_deref()
            .map(OperationToken::decode)
            .transpose()?;
        let stored = records::load::<BindingRecord>(self.store_ref(), binding_id)
            .await?
            .filter(|s| s.record.instance_id == instance_id);
        let path = format!(
            "/v2/service_instances/{instance_id}/service_bindings/{binding_id}/last_operation"
        );
        self.last_operation(stored, token, &path, ctx).await
    }

    async fn last_operation<R: proxy::Forwarded>(
        &self,
        stored: Option<Stored<R>>,
        token: Option<OperationToken>,
        path: &str,
        ctx: &CallContext,
    ) -> Result<Reply, OsbError> {
        let Some(stored) = stored else {
            if let Some(t) = token
                .as_ref()
                .filter(|t| t.target != OperationToken::LOCAL && t.id == OperationToken::UNRECORDED)
            {
                // Never recorded (a forwarded orphan delete): the token names the upstream.
                return self.proxy_token_poll(t, path, ctx).await;
            }
            // Gone after a delete is the success the platform waits for.
            return match &token {
                None => Err(OsbError::Gone),
                Some(t) if t.kind.deletes() => Err(OsbError::Gone),
                Some(_) => Err(OsbError::NotFound("no such resource".into())),
            };
        };
        let op = stored.record.operation();
        if let Some(t) = &token {
            if t.id != op.id {
                return Err(OsbError::BadRequest(
                    "operation is not the resource's current operation".into(),
                ));
            }
        }
        if stored.record.upstream().is_some() && op.in_flight() && op.asynchronous {
            return self.proxy_poll(stored, path, ctx).await;
        }
        let state = match op.effective_state() {
            OpState::InProgress => osb::OperationState::InProgress,
            OpState::Succeeded => osb::OperationState::Succeeded,
            OpState::Failed => osb::OperationState::Failed,
        };
        let failed = state == osb::OperationState::Failed;
        let answer = LastOperation {
            state,
            description: op.effective_description(),
            instance_usable: (failed && R::TABLE == crate::store::Table::Instances)
                .then_some(matches!(op.kind, OpKind::Update | OpKind::Deprovision)),
            update_repeatable: (failed && op.kind == OpKind::Update).then_some(true),
        };
        let mut reply = Reply::new(200, serde_json::to_value(answer).expect("serializes"));
        if state == osb::OperationState::InProgress {
            reply.retry_after = Some(self.inner.timing.retry_after_secs);
        }
        Ok(reply)
    }
}

/// A failed backend operation: an asynchronous one is recorded as failed (the platform
/// polls it); a synchronous one is undone: a new resource's record removed, a changed one's
/// previous operation restored.
/// Backend work bounded by the operation timeout: past it, the backend is unavailable.
async fn within<T>(
    timeout: std::time::Duration,
    work: impl Future<Output = Result<T, BackendError>>,
) -> Result<T, BackendError> {
    tokio::time::timeout(timeout, work)
        .await
        .unwrap_or_else(|_| {
            Err(BackendError::unavailable(
                format!("the backend did not finish within {} s", timeout.as_secs()),
                "operation timeout",
            ))
        })
}

fn failed<R: Record>(
    mut record: R,
    e: BackendError,
    previous: Option<OperationRecord>,
) -> Settled<R> {
    if record.operation().asynchronous {
        let op = record.operation_mut();
        op.finish(OpState::Failed, Some(e.public()));
        op.nothing_made = matches!(e, BackendError::Conflict(_));
        return (Outcome::Keep(record), Err(e.into()));
    }
    match previous {
        None => (Outcome::Remove, Err(e.into())),
        Some(op) => {
            *record.operation_mut() = op;
            (Outcome::Keep(record), Err(e.into()))
        }
    }
}

fn same_instance(e: &InstanceRecord, r: &InstanceRecord) -> bool {
    e.service_id == r.service_id
        && e.plan_id == r.plan_id
        && e.organization_guid == r.organization_guid
        && e.space_guid == r.space_guid
        && e.parameters == r.parameters
}

fn done_instance(e: &InstanceRecord) -> Option<Reply> {
    e.provisioned
        .then(|| Reply::new(200, object(e.reply_fields())))
}

fn same_binding(e: &BindingRecord, r: &BindingRecord) -> bool {
    e.instance_id == r.instance_id
        && e.service_id == r.service_id
        && e.plan_id == r.plan_id
        && e.app_guid == r.app_guid
        && e.bind_resource == r.bind_resource
        && e.parameters == r.parameters
}

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
