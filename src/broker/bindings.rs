//! Service bindings: bind, unbind and fetch, through the same claim → act → record →
//! answer path as instances ([`super::operation`]). A binding is inserted only while its
//! instance is still at the version the binder read, so it cannot race a deprovision.

use upstreams::osb::{Answer, BindRequest, BindingResponse, DeleteResponse, Kind};
use upstreams::Method;

use super::operation::{failed, in_flight, At, Outcome, Reply, Resource};
use super::{check_id, check_parameters, required, BackendRef, Broker, CallContext};
use crate::backend::{BackendError, Binding, Unbinding};
use crate::catalog::{LocalPlan, LocalService, ParametersOf};
use crate::error::OsbError;
use crate::store::records::{self, Stored};
use crate::store::{BindingRecord, OpKind, OpState, StateStore, UpstreamRef};

fn same_binding(e: &BindingRecord, r: &BindingRecord) -> bool {
    e.instance_id == r.instance_id
        && e.service_id == r.service_id
        && e.plan_id == r.plan_id
        && e.app_guid == r.app_guid
        && e.bind_resource == r.bind_resource
        && e.parameters == r.parameters
}

/// What a local bind handed out, as the binding record keeps it: the credentials, and
/// the drain as the answer's `syslog_drain_url`; `None` before the bind succeeded.
fn handed_out(record: &BindingRecord) -> Option<BindingResponse> {
    Some(BindingResponse {
        credentials: Some(record.credentials.clone()?),
        syslog_drain_url: record.drain.as_ref().map(|d| d.url.clone()),
        ..Default::default()
    })
}

/// The answer to a local bind.
fn bound(record: &BindingRecord, status: u16) -> Option<Reply> {
    Some(Reply::of(status, Answer::Bind(handed_out(record)?)))
}

impl Resource for BindingRecord {
    fn same_request(&self, other: &Self) -> bool {
        same_binding(self, other)
    }

    fn done(&self) -> Option<Reply> {
        bound(self, 200)
    }

    fn offering(&self) -> (&str, &str) {
        (&self.service_id, &self.plan_id)
    }

    fn cleanup_claim(&self) -> bool {
        self.credentials.is_none()
            && self.upstream.is_none()
            && self.operation.kind == OpKind::Unbind
    }

    fn accepted_answer(&self, operation: String) -> Answer {
        let operation = Some(operation);
        match self.operation.kind {
            OpKind::Unbind => Answer::Unbind(DeleteResponse {
                operation,
                ..Default::default()
            }),
            _ => Answer::Bind(BindingResponse {
                operation,
                ..Default::default()
            }),
        }
    }
}

impl Broker {
    pub async fn bind(
        &self,
        instance_id: &str,
        binding_id: &str,
        req: BindRequest,
        accepts_incomplete: bool,
        ctx: &CallContext,
    ) -> Result<Reply, OsbError> {
        check_id("instance_id", instance_id)?;
        check_id("binding_id", binding_id)?;
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
            drain: None,
            created_at: chrono::Utc::now(),
            operation: self.start(OpKind::Bind, false),
            upstream: instance.record.upstream.clone(),
        };
        let parent = Some((instance_id, instance.version));
        if let Some(up) = instance.record.upstream.clone() {
            if record.plan_id != instance.record.plan_id {
                return Err(OsbError::BadRequest(format!(
                    "plan_id {:?} is not the instance's plan",
                    record.plan_id
                )));
            }
            let call = (req, accepts_incomplete, ctx);
            return self.forward_bind(record, up, instance.version, call).await;
        }
        let (service, plan) = self.offering(&instance.record)?;
        let backend = self.bindable(service, plan, &record, accepts_incomplete)?;
        record.operation = self.start(OpKind::Bind, plan.asynchronous);
        let version = match self.claim_new(&record, parent, accepts_incomplete).await? {
            Ok(claim) => claim.version,
            Err(answer) => return Ok(answer),
        };
        tracing::info!(instance_id, binding_id, "binding");
        let limits = plan.limits;
        let parameters = record.parameters.clone();
        let app = record.app_guid().map(str::to_string);
        let (iid, bid) = (instance_id.to_string(), binding_id.to_string());
        let work = self.within(async move {
            let binding = Binding {
                instance_id: &iid,
                binding_id: &bid,
                app: app.as_deref(),
                limits,
                parameters: parameters.as_ref(),
            };
            backend.bind(&binding).await
        });
        self.drive(
            record,
            At::Version(version),
            work,
            |mut record, result| match result {
                Ok(handed) => {
                    record.credentials = Some(handed.credentials);
                    record.drain = handed.drain;
                    record.operation.finish(OpState::Succeeded, None);
                    let reply = bound(&record, 201).expect("credentials were just set");
                    (Outcome::Keep(record), Ok(reply))
                }
                Err(e) => failed(record, e, None),
            },
        )
        .await
    }

    /// The backend that binds `record` to an instance of `service` on `plan`, once the
    /// binding's plan is the service's, the instance's plan is bindable, the app is there
    /// where the service needs one, the parameters fit the plan's schema, and an
    /// asynchronous plan is allowed to answer 202.
    fn bindable(
        &self,
        service: &LocalService,
        plan: &LocalPlan,
        record: &BindingRecord,
        accepts_incomplete: bool,
    ) -> Result<BackendRef, OsbError> {
        self.plan(service, &record.plan_id)?;
        if !service.bindable(plan) {
            return Err(OsbError::BadRequest(format!(
                "plan {} of {} is not bindable",
                plan.wire.name, service.wire.name
            )));
        }
        if service.bindings_require_app && record.app_guid().is_none() {
            return Err(OsbError::RequiresApp);
        }
        let backend = self.backend(service)?;
        let parameters = record.parameters.as_ref();
        check_parameters(&*backend, plan, ParametersOf::Bind, parameters)?;
        if plan.asynchronous && !accepts_incomplete {
            return Err(OsbError::AsyncRequired);
        }
        Ok(backend)
    }

    /// A bind of an upstream's instance: held in process, forwarded with the upstream's own
    /// ids, and recorded once, with its outcome.
    async fn forward_bind(
        &self,
        mut record: BindingRecord,
        up: UpstreamRef,
        instance_version: u64,
        (mut req, accepts_incomplete, ctx): (BindRequest, bool, &CallContext),
    ) -> Result<Reply, OsbError> {
        record.operation = self.start_forward(OpKind::Bind);
        let parent = Some((record.instance_id.as_str(), instance_version));
        let (_hold, at) = match self.hold_new(&record, parent, accepts_incomplete).await? {
            Ok(held) => held,
            Err(answer) => return Ok(answer),
        };
        req.service_id = Some(up.service_id);
        req.plan_id = Some(up.plan_id);
        let path = format!(
            "/v2/service_instances/{}/service_bindings/{}",
            record.instance_id, record.id
        );
        let mut request = self.upstream_request(Method::PUT, &path, accepts_incomplete, ctx);
        request.body = Some(serde_json::to_vec(&req).expect("requests serialize").into());
        self.forward(record, at, request).await
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
        let path = format!("/v2/service_instances/{instance_id}/service_bindings/{binding_id}");
        let stored = match records::load::<BindingRecord>(self.store_ref(), binding_id).await? {
            Some(s) if s.record.instance_id == instance_id => s,
            Some(_) => return Err(OsbError::Gone),
            None => {
                let remove = |backend: BackendRef, _| {
                    let (iid, bid) = (instance_id.to_string(), binding_id.to_string());
                    async move {
                        let binding = Unbinding {
                            instance_id: &iid,
                            binding_id: &bid,
                            app: None,
                        };
                        backend.unbind(&binding).await
                    }
                };
                let claim = BindingRecord {
                    id: binding_id.to_string(),
                    instance_id: instance_id.to_string(),
                    service_id,
                    plan_id,
                    app_guid: None,
                    bind_resource: None,
                    parameters: None,
                    context: None,
                    credentials: None,
                    drain: None,
                    created_at: chrono::Utc::now(),
                    operation: self.start(OpKind::Unbind, false),
                    upstream: None,
                };
                return self
                    .delete_unrecorded(&path, claim, remove, accepts_incomplete, ctx)
                    .await;
            }
        };
        if let Some(reply) = in_flight(&stored.record, OpKind::Unbind, accepts_incomplete)? {
            return Ok(reply);
        }
        if stored.record.upstream.is_some() {
            return self
                .forward_delete(stored, OpKind::Unbind, &path, accepts_incomplete, ctx)
                .await;
        }
        let service = self.service(&stored.record.service_id)?;
        let asynchronous = service
            .plan(&stored.record.plan_id)
            .is_some_and(|p| p.asynchronous);
        if asynchronous && !accepts_incomplete {
            return Err(OsbError::AsyncRequired);
        }
        let backend = self.backend(service)?;
        let operation = self.start(OpKind::Unbind, asynchronous);
        let (record, version, previous_op) = self.claim(stored, operation).await?;
        tracing::info!(instance_id, binding_id, "unbinding");
        let (iid, bid) = (instance_id.to_string(), binding_id.to_string());
        let app = record.app_guid().map(str::to_string);
        let store = self.inner.store.clone();
        let work = self.within(async move {
            let binding = Unbinding {
                instance_id: &iid,
                binding_id: &bid,
                app: app.as_deref(),
            };
            backend.unbind(&binding).await?;
            // Then whatever this binding made for itself that no other binding accounts for.
            let instance = iid.clone();
            let live = move || {
                let (store, iid, bid) = (store.clone(), iid.clone(), bid.clone());
                let read = async move { live_bindings(&*store, &iid, &bid).await };
                Box::pin(read) as futures::future::BoxFuture<'static, _>
            };
            backend.prune(&instance, &live).await
        });
        let at = At::Version(version);
        self.drive(record, at, work, move |record, result| match result {
            Ok(()) => (Outcome::Remove, Ok(Reply::deleted(OpKind::Unbind))),
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
        let Some(Stored { record: r, .. }) =
            records::load::<BindingRecord>(self.store_ref(), binding_id).await?
        else {
            return Err(not_found());
        };
        if r.instance_id != instance_id {
            return Err(not_found());
        }
        if let Some(up) = &r.upstream {
            if r.operation.kind == OpKind::Bind
                && r.operation.effective_state() != OpState::Succeeded
            {
                return Err(not_found());
            }
            let path = format!("/v2/service_instances/{instance_id}/service_bindings/{binding_id}");
            let request = self.upstream_request(Method::GET, &path, false, ctx);
            return self.ask_upstream(&up.alias, request, Kind::Binding).await;
        }
        let Some(handed) = handed_out(&r) else {
            return Err(not_found());
        };
        let answer = BindingResponse {
            parameters: r.parameters,
            ..handed
        };
        Ok(Reply::of(200, Answer::Binding(answer)))
    }
}

/// The ids of the instance's bindings other than `except`, for a backend's prune.
async fn live_bindings(
    store: &dyn StateStore,
    instance_id: &str,
    except: &str,
) -> Result<Vec<String>, BackendError> {
    let bindings = records::bindings_of(store, instance_id)
        .await
        .map_err(|e| BackendError::unavailable("the broker's state store is unavailable", e))?;
    Ok(bindings
        .into_iter()
        .map(|b| b.record.id)
        .filter(|id| id != except)
        .collect())
}
