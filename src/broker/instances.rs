//! Service instances: provision, update, deprovision and fetch. Each call validates, then
//! claims, acts and records through [`super::operation`]; the act is the local backend's
//! work or, for an upstream-owned service, [`Broker::forward`].

use upstreams::osb::{Answer, DeleteResponse, InstanceDetails, InstanceResponse, Kind};
use upstreams::osb::{MaintenanceInfo, ProvisionRequest, UpdateRequest};
use upstreams::Method;

use super::operation::{failed, in_flight, At, Claim, Outcome, Reply, Resource};
use super::{check_id, check_maintenance, check_parameters, required, Broker, CallContext};
use crate::backend;
use crate::catalog::{LocalService, ParametersOf};
use crate::error::OsbError;
use crate::federation::Route;
use crate::store::records::{self, Stored};
use crate::store::{InstanceRecord, OpKind, OpState, Table, UpstreamRef};

fn same_instance(e: &InstanceRecord, r: &InstanceRecord) -> bool {
    e.service_id == r.service_id
        && e.plan_id == r.plan_id
        && e.organization_guid == r.organization_guid
        && e.space_guid == r.space_guid
        && e.parameters == r.parameters
}

/// The answer about a provisioned instance: its dashboard.
fn provisioned(record: &InstanceRecord, status: u16) -> Reply {
    Reply::of(status, Answer::Provision(dashboard(record)))
}

fn dashboard(record: &InstanceRecord) -> InstanceResponse {
    InstanceResponse {
        dashboard_url: record.dashboard_url.clone(),
        ..Default::default()
    }
}

fn done_instance(e: &InstanceRecord) -> Option<Reply> {
    e.provisioned.then(|| provisioned(e, 200))
}

/// The record a delete for an instance the broker never recorded holds while it removes
/// what the id's names point at ([`Resource::cleanup_claim`]).
fn cleanup_claim(
    id: &str,
    service_id: String,
    plan_id: String,
    operation: crate::store::OperationRecord,
) -> InstanceRecord {
    InstanceRecord {
        id: id.to_string(),
        service_id,
        plan_id,
        organization_guid: String::new(),
        space_guid: String::new(),
        context: None,
        parameters: None,
        maintenance_version: None,
        dashboard_url: None,
        provisioned: false,
        created_at: chrono::Utc::now(),
        operation,
        upstream: None,
        api_info_location: None,
    }
}

impl Resource for InstanceRecord {
    fn same_request(&self, other: &Self) -> bool {
        same_instance(self, other)
    }

    fn done(&self) -> Option<Reply> {
        done_instance(self)
    }

    fn offering(&self) -> (&str, &str) {
        (&self.service_id, &self.plan_id)
    }

    fn cleanup_claim(&self) -> bool {
        !self.provisioned && self.upstream.is_none() && self.operation.kind == OpKind::Deprovision
    }

    fn accepted_answer(&self, operation: String) -> Answer {
        let operation = Some(operation);
        let changed = |operation| InstanceResponse {
            operation,
            ..dashboard(self)
        };
        match self.operation.kind {
            OpKind::Deprovision => Answer::Deprovision(DeleteResponse {
                operation,
                ..Default::default()
            }),
            OpKind::Update => Answer::Update(changed(operation)),
            _ => Answer::Provision(changed(operation)),
        }
    }
}

impl Broker {
    pub async fn provision(
        &self,
        id: &str,
        req: ProvisionRequest,
        accepts_incomplete: bool,
        ctx: &CallContext,
    ) -> Result<Reply, OsbError> {
        check_id("instance_id", id)?;
        let service_id = required(req.service_id.clone(), "service_id")?;
        let plan_id = required(req.plan_id.clone(), "plan_id")?;
        let mut record = InstanceRecord {
            id: id.to_string(),
            service_id: service_id.clone(),
            plan_id: plan_id.clone(),
            organization_guid: required(req.organization_guid.clone(), "organization_guid")?,
            space_guid: required(req.space_guid.clone(), "space_guid")?,
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
                    .provision_upstream(record, route, req, accepts_incomplete, ctx)
                    .await;
            }
        }
        let service = self.service(&service_id)?;
        let plan = self.plan(service, &plan_id)?;
        let backend = self.backend(service)?;
        check_parameters(
            &*backend,
            plan,
            ParametersOf::Provision,
            req.parameters.as_ref(),
        )?;
        check_maintenance(plan, req.maintenance_info.as_ref())?;
        if plan.asynchronous && !accepts_incomplete {
            return Err(OsbError::AsyncRequired);
        }
        self.check_capacity(service, plan.limits.max_storage_mb, id, true)
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
        let Claim { version, takeover } =
            match self.claim_new(&record, None, accepts_incomplete).await? {
                Ok(claim) => claim,
                Err(answer) => return Ok(answer),
            };
        tracing::info!(instance_id = id, service = %service.wire.name, plan = %plan.wire.name, "provisioning");
        let limits = plan.limits;
        let instance_id = id.to_string();
        let work = self.within(async move {
            if takeover {
                backend.deprovision(&instance_id, limits).await?;
            }
            backend.provision(&instance_id, limits).await
        });
        self.drive(
            record,
            At::Version(version),
            work,
            |mut record, result| match result {
                Ok(()) => {
                    record.provisioned = true;
                    record.operation.finish(OpState::Succeeded, None);
                    let reply = provisioned(&record, 201);
                    (Outcome::Keep(record), Ok(reply))
                }
                Err(e) => failed(record, e, None),
            },
        )
        .await
    }

    async fn provision_upstream(
        &self,
        mut record: InstanceRecord,
        route: Route,
        mut req: ProvisionRequest,
        accepts_incomplete: bool,
        ctx: &CallContext,
    ) -> Result<Reply, OsbError> {
        let Some(upstream_plan) = route.plans.get(&record.plan_id).cloned() else {
            return Err(OsbError::BadRequest(format!(
                "plan_id {:?} is not a plan of service {:?}",
                record.plan_id, record.service_id
            )));
        };
        record.upstream = Some(UpstreamRef {
            alias: route.alias.clone(),
            service_id: route.service_id.clone(),
            plan_id: upstream_plan.clone(),
        });
        record.operation = self.start_forward(OpKind::Provision);
        let (_hold, at) = match self.hold_new(&record, None, accepts_incomplete).await? {
            Ok(held) => held,
            Err(answer) => return Ok(answer),
        };
        tracing::info!(instance_id = %record.id, upstream = %route.alias, "provisioning upstream");
        req.service_id = Some(route.service_id);
        req.plan_id = Some(upstream_plan);
        let path = format!("/v2/service_instances/{}", record.id);
        let mut request = self.upstream_request(Method::PUT, &path, accepts_incomplete, ctx);
        request.body = Some(serde_json::to_vec(&req).expect("requests serialize").into());
        self.forward(record, at, request).await
    }

    pub async fn update(
        &self,
        id: &str,
        req: UpdateRequest,
        accepts_incomplete: bool,
        ctx: &CallContext,
    ) -> Result<Reply, OsbError> {
        check_id("instance_id", id)?;
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
                .update_upstream(stored, req, accepts_incomplete, ctx)
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
        let backend = self.backend(service)?;
        check_parameters(&*backend, to, ParametersOf::Update, req.parameters.as_ref())?;
        check_maintenance(to, req.maintenance_info.as_ref())?;
        if to.asynchronous && !accepts_incomplete {
            return Err(OsbError::AsyncRequired);
        }
        if to.limits.max_storage_mb > from.limits.max_storage_mb {
            self.check_capacity(service, to.limits.max_storage_mb, id, false)
                .await?;
        }
        let mut operation = self.start(OpKind::Update, to.asynchronous);
        operation.target_plan_id = Some(to.wire.id.clone());
        let (record, version, previous_op) = self.claim(stored, operation).await?;
        tracing::info!(instance_id = id, from = %from.wire.name, to = %to.wire.name, "updating");
        let (from_limits, to_limits) = (from.limits, to.limits);
        let instance_id = id.to_string();
        let work = self.within(async move {
            backend::change_plan(&*backend, &instance_id, from_limits, to_limits).await
        });
        let target_maintenance = to.wire.maintenance_info.as_ref().map(|m| m.version.clone());
        let (new_parameters, new_context) = (req.parameters, req.context);
        self.drive(
            record,
            At::Version(version),
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
                    let reply = Reply::of(200, Answer::Update(dashboard(&record)));
                    (Outcome::Keep(record), Ok(reply))
                }
                Err(e) => failed(record, e, Some(previous_op)),
            },
        )
        .await
    }

    async fn update_upstream(
        &self,
        stored: Stored<InstanceRecord>,
        mut req: UpdateRequest,
        accepts_incomplete: bool,
        ctx: &CallContext,
    ) -> Result<Reply, OsbError> {
        let current = stored.record.clone();
        let up = current.upstream.clone().expect("upstream-owned");
        let target_plan = req
            .plan_id
            .clone()
            .unwrap_or_else(|| current.plan_id.clone());
        let upstream_plan = if target_plan == current.plan_id {
            up.plan_id.clone()
        } else {
            self.upstream_plan(&up, &current.service_id, &target_plan)?
        };
        let _hold = self.hold(Table::Instances, &current.id)?;
        let mut record = stored.record;
        record.operation = self.start_forward(OpKind::Update);
        record.operation.target_plan_id = Some(target_plan);
        record.operation.upstream_plan_id = Some(upstream_plan.clone());
        req.service_id = Some(up.service_id.clone());
        if req.plan_id.is_some() {
            req.plan_id = Some(upstream_plan);
        }
        if let Some(previous) = req.previous_values.as_mut() {
            for (key, value) in [("service_id", &up.service_id), ("plan_id", &up.plan_id)] {
                if previous.contains_key(key) {
                    previous.insert(key.into(), value.clone().into());
                }
            }
        }
        let path = format!("/v2/service_instances/{}", record.id);
        let mut request = self.upstream_request(Method::PATCH, &path, accepts_incomplete, ctx);
        request.body = Some(serde_json::to_vec(&req).expect("requests serialize").into());
        self.forward(record, At::Version(stored.version), request)
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
        let path = format!("/v2/service_instances/{id}");
        let Some(stored) = records::load::<InstanceRecord>(self.store_ref(), id).await? else {
            // Never recorded (a provision that timed out on Cloud Controller's side): what
            // the derived names point at may exist all the same, locally or upstream.
            let remove = |backend: super::BackendRef, limits| {
                let id = id.to_string();
                async move { backend.deprovision(&id, limits).await }
            };
            let operation = self.start(OpKind::Deprovision, false);
            let claim = cleanup_claim(id, service_id, plan_id, operation);
            return self
                .delete_unrecorded(&path, claim, remove, accepts_incomplete, ctx)
                .await;
        };
        let current = stored.record.clone();
        if service_id != current.service_id {
            return Err(OsbError::BadRequest(format!(
                "service_id {service_id:?} is not the instance's service"
            )));
        }
        if let Some(reply) = in_flight(&current, OpKind::Deprovision, accepts_incomplete)? {
            return Ok(reply);
        }
        if current.upstream.is_some() {
            return self
                .forward_delete(stored, OpKind::Deprovision, &path, accepts_incomplete, ctx)
                .await;
        }
        let (service, plan) = self.offering(&current)?;
        if plan.asynchronous && !accepts_incomplete {
            return Err(OsbError::AsyncRequired);
        }
        let backend = self.backend(service)?;
        let operation = self.start(OpKind::Deprovision, plan.asynchronous);
        let (record, version, previous_op) = self.claim(stored, operation).await?;
        // Listed only after the claim: a bind that raced it either shows here or failed.
        let bindings = records::bindings_of(self.store_ref(), id).await?;
        if !bindings.is_empty() && service.refuse_deprovision_with_bindings {
            let mut restored = record.clone();
            restored.operation = previous_op;
            self.record_outcome(id, At::Version(version), Outcome::Keep(restored))
                .await?;
            let n = bindings.len();
            let (s, them) = if n == 1 { ("", "it") } else { ("s", "them") };
            return Err(OsbError::Unprocessable(format!(
                "instance {id} still has {n} binding{s}: unbind {them} first"
            )));
        }
        tracing::info!(instance_id = id, "deprovisioning");
        let instance_id = id.to_string();
        let limits = plan.limits;
        // A provision that failed on something already there made nothing to remove: what
        // is there is not the broker's.
        let ours = record.provisioned || !previous_op.nothing_made;
        // A service that lets deprovision take its bindings along has each unbound first,
        // so no backend reads the records to find them.
        let along: Vec<(String, Option<String>)> = bindings
            .into_iter()
            .map(|b| {
                let app = b.record.app_guid().map(str::to_string);
                (b.record.id, app)
            })
            .collect();
        let work = self.within(async move {
            if !ours {
                return Ok(());
            }
            for (binding_id, app) in &along {
                let binding = backend::Unbinding {
                    instance_id: &instance_id,
                    binding_id,
                    app: app.as_deref(),
                };
                backend.unbind(&binding).await?;
            }
            backend.deprovision(&instance_id, limits).await
        });
        let at = At::Version(version);
        self.drive(record, at, work, move |record, result| match result {
            Ok(()) => (Outcome::Remove, Ok(Reply::deleted(OpKind::Deprovision))),
            Err(e) => failed(record, e, Some(previous_op)),
        })
        .await
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
        let Some(up) = &r.upstream else {
            let details = InstanceDetails {
                service_id: Some(r.service_id),
                plan_id: Some(r.plan_id),
                dashboard_url: r.dashboard_url,
                parameters: r.parameters,
                maintenance_info: r.maintenance_version.map(|version| MaintenanceInfo {
                    version,
                    description: None,
                }),
                ..Default::default()
            };
            return Ok(Reply::of(200, Answer::Instance(details)));
        };
        let path = format!("/v2/service_instances/{id}");
        let request = self.upstream_request(Method::GET, &path, false, ctx);
        let mut reply = self
            .ask_upstream(&up.alias, request, Kind::Instance)
            .await?;
        // Write the namespaced ids back.
        if let Answer::Instance(details) = &mut reply.answer {
            if details.service_id.as_ref() == Some(&up.service_id) {
                details.service_id = Some(r.service_id.clone());
            }
            if let Some(plan) = &mut details.plan_id {
                *plan = if *plan == up.plan_id {
                    r.plan_id.clone()
                } else {
                    crate::federation::merge::plan_id(&up.alias, plan)
                };
            }
        }
        Ok(reply)
    }

    /// Refuses (507) what would promise the backend more storage than it has (the plans of
    /// every other instance on it, plus `wanted`) or more instances than its
    /// `max_db_per_node` (when `adds_instance`). `id` itself is not counted. Instances are counted from the store, a page at a time and only
    /// those of services on this backend, so every broker process sharing it counts the
    /// same.
    async fn check_capacity(
        &self,
        service: &LocalService,
        wanted: u64,
        id: &str,
        adds_instance: bool,
    ) -> Result<(), OsbError> {
        let capacity = self.backend(service)?.capacity_mb();
        let max_instances = service.max_instances.filter(|_| adds_instance);
        if capacity.is_none() && max_instances.is_none() {
            return Ok(());
        }
        const PAGE: usize = 500;
        let (mut promised, mut instances) = (0u64, 0u64);
        let sharing = self.inner.catalog.services().iter();
        for other in sharing.filter(|s| s.backend == service.backend) {
            let mut after = String::new();
            loop {
                let page = records::page(self.store_ref(), &other.wire.id, &after, PAGE).await?;
                let full = page.len() == PAGE;
                for instance in page {
                    let instance = instance.record;
                    if instance.id != id {
                        instances += 1;
                        promised += other
                            .plan(&instance.plan_id)
                            .map_or(0, |p| p.limits.max_storage_mb);
                    }
                    after = instance.id;
                }
                if !full {
                    break;
                }
            }
        }
        if let Some(max) = max_instances.filter(|max| instances >= *max) {
            return Err(OsbError::InsufficientStorage(format!(
                "the {} backend holds {instances} instances, its limit (max_db_per_node) is {max}",
                service.backend
            )));
        }
        if let Some(capacity) = capacity.filter(|c| promised + wanted > *c) {
            return Err(OsbError::InsufficientStorage(format!(
                "the {} backend has {} MB of its {capacity} MB left; this plan needs {wanted} MB",
                service.backend,
                capacity.saturating_sub(promised)
            )));
        }
        Ok(())
    }

    /// The instance a call that needs one is about; 404 when it was never provisioned.
    pub(super) async fn existing_instance(
        &self,
        id: &str,
    ) -> Result<Stored<InstanceRecord>, OsbError> {
        match records::load::<InstanceRecord>(self.store_ref(), id).await? {
            Some(stored) if stored.record.provisioned => Ok(stored),
            Some(stored) if stored.record.operation.in_flight() => Err(OsbError::concurrency()),
            _ => Err(OsbError::NotFound(format!("instance {id} does not exist"))),
        }
    }
}
