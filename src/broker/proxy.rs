//! Upstream-owned resources: the same claim → act → record → answer path as local ones,
//! where "act" is forwarding the call to the upstream broker that owns the service.
//!
//! Forwarding restores the upstream's own ids, keeps the rest of the query and body,
//! passes the identity headers, and answers with the upstream's status, body and
//! `Retry-After`, namespaced ids written back. A 202's `operation` is replaced by a token
//! naming the upstream (and carrying its operation), so polls route without a record.

use chrono::Utc;
use serde_json::{json, Value};
use upstreams::{Method, OsbRequest, OsbResponse, UpstreamError};

use super::{Broker, CallContext, OperationToken, Outcome, Reply};
use crate::error::OsbError;
use crate::federation::Route;
use crate::store::records::{self, Record, Stored};
use crate::store::{BindingRecord, InstanceRecord, OpKind, OpState, OperationRecord, UpstreamRef};

/// How long a forwarded call may hold its claim: Cloud Controller's 60 s and a margin.
const FORWARD_LEASE_SECS: i64 = 120;
/// An asynchronous upstream operation is the upstream's to finish; the platform polls it
/// for up to a week.
const UPSTREAM_ASYNC_LEASE_DAYS: i64 = 8;

/// How to put a record back when the upstream did not do what was asked.
enum Undo {
    Remove,
    Restore(OperationRecord),
}

/// Records that take in what an upstream answered.
pub(super) trait Forwarded: Record + Clone + 'static {
    /// `done`: the operation completed (not just accepted).
    fn absorb(&mut self, body: &Value, done: bool);
}

impl Forwarded for InstanceRecord {
    fn absorb(&mut self, body: &Value, done: bool) {
        if let Some(url) = body.get("dashboard_url").and_then(Value::as_str) {
            self.dashboard_url = Some(url.to_string());
        }
        if !done {
            return;
        }
        match self.operation.kind {
            OpKind::Provision => self.provisioned = true,
            OpKind::Update => {
                if let Some(plan) = self.operation.target_plan_id.clone() {
                    self.plan_id = plan;
                }
                if let (Some(up), Some(plan)) =
                    (&mut self.upstream, &self.operation.upstream_plan_id)
                {
                    up.plan_id = plan.clone();
                }
            }
            _ => {}
        }
    }
}

impl Forwarded for BindingRecord {
    fn absorb(&mut self, _body: &Value, _done: bool) {}
}

fn upstream_error(e: UpstreamError) -> OsbError {
    let description = e.to_string();
    match e {
        UpstreamError::CircuitOpen { .. } => OsbError::Unavailable(description),
        UpstreamError::Timeout { .. } => OsbError::GatewayTimeout(description),
        _ => OsbError::BadGateway(description),
    }
}

/// An upstream's `Retry-After` in seconds: digits only, at most a day (larger numbers
/// saturate there).
fn retry_after_secs(value: &str) -> Option<u64> {
    let value = value.trim();
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(value.parse::<u64>().unwrap_or(u64::MAX).min(86_400))
}

#[cfg(test)]
#[test]
fn retry_after_saturates_at_a_day_and_ignores_what_is_not_seconds() {
    assert_eq!(retry_after_secs(" 30 "), Some(30));
    assert_eq!(retry_after_secs("99999999999999999999999"), Some(86_400));
    assert_eq!(retry_after_secs("-1"), None);
    assert_eq!(retry_after_secs("Wed, 21 Oct 2015 07:28:00 GMT"), None);
}

/// The answer as the upstream gave it.
fn passthrough(r: OsbResponse) -> Reply {
    Reply {
        status: r.status,
        body: r.body,
        retry_after: r.retry_after.as_deref().and_then(retry_after_secs),
    }
}

impl Broker {
    fn start_forward(&self, kind: OpKind) -> OperationRecord {
        OperationRecord::start(kind, false, chrono::Duration::seconds(FORWARD_LEASE_SECS))
    }

    /// A call to forward: the platform's identity headers and API version, and
    /// `accepts_incomplete=true` when the platform sent it.
    fn upstream_request(
        &self,
        method: Method,
        path: &str,
        accepts_incomplete: bool,
        ctx: &CallContext,
    ) -> OsbRequest {
        let mut request = OsbRequest::new(method, path, ctx.api_version.clone());
        request.originating_identity = ctx.originating_identity.clone();
        request.request_identity = ctx.request_identity.clone();
        if accepts_incomplete {
            request
                .query
                .push(("accepts_incomplete".into(), "true".into()));
        }
        request
    }

    async fn call_upstream(
        &self,
        alias: &str,
        request: OsbRequest,
    ) -> Result<OsbResponse, OsbError> {
        let upstream = self.inner.federation.upstream(alias).ok_or_else(|| {
            OsbError::BadGateway(format!("upstream {alias} is no longer configured"))
        })?;
        tracing::debug!(upstream = alias, method = %request.method, path = %request.path, "forwarding");
        let _in_flight = self.inner.metrics.in_flight();
        upstream.send(&request).await.map_err(upstream_error)
    }

    /// The upstream's id for a namespaced plan of the same upstream service.
    fn upstream_plan(
        &self,
        up: &UpstreamRef,
        service_id: &str,
        plan_id: &str,
    ) -> Result<String, OsbError> {
        self.inner
            .federation
            .route(service_id)
            .filter(|r| r.alias == up.alias)
            .and_then(|r| r.plans.get(plan_id).cloned())
            .ok_or_else(|| {
                OsbError::BadRequest(format!("plan_id {plan_id:?} is not a plan of this service"))
            })
    }

    /// Records what the upstream answered to a claimed operation, then answers the same.
    async fn settle_forwarded<R: Forwarded>(
        &self,
        mut record: R,
        version: u64,
        undo: Undo,
        answer: Result<OsbResponse, OsbError>,
    ) -> Result<Reply, OsbError> {
        let kind = record.operation().kind;
        let response = match answer {
            Ok(r) => r,
            Err(e) => {
                self.undo(record, version, undo).await?;
                return Err(e);
            }
        };
        match response.status {
            200 | 201 if !kind.deletes() => {
                record.absorb(&response.body, true);
                record.operation_mut().finish(OpState::Succeeded, None);
                let id = record.id().to_string();
                self.record_outcome(&id, version, Outcome::Keep(record))
                    .await?;
                Ok(passthrough(response))
            }
            200 | 410 if kind.deletes() => {
                self.record_outcome::<R>(record.id(), version, Outcome::Remove)
                    .await?;
                Ok(passthrough(response))
            }
            202 => {
                record.absorb(&response.body, false);
                let op = record.operation_mut();
                op.asynchronous = true;
                op.upstream_operation = response
                    .body
                    .get("operation")
                    .and_then(Value::as_str)
                    .map(str::to_string);
                op.lease_until = Utc::now() + chrono::Duration::days(UPSTREAM_ASYNC_LEASE_DAYS);
                let mut reply = passthrough(response);
                let accepted = Self::accepted(&record);
                reply.body["operation"] = accepted.body["operation"].clone();
                let id = record.id().to_string();
                self.record_outcome(&id, version, Outcome::Keep(record))
                    .await?;
                Ok(reply)
            }
            _ => {
                self.undo(record, version, undo).await?;
                Ok(passthrough(response))
            }
        }
    }

    async fn undo<R: Forwarded>(
        &self,
        mut record: R,
        version: u64,
        undo: Undo,
    ) -> Result<(), OsbError> {
        match undo {
            Undo::Remove => {
                self.record_outcome::<R>(record.id(), version, Outcome::Remove)
                    .await
            }
            Undo::Restore(previous) => {
                *record.operation_mut() = previous;
                let id = record.id().to_string();
                self.record_outcome(&id, version, Outcome::Keep(record))
                    .await
            }
        }
    }

    pub(super) async fn proxy_provision(
        &self,
        mut record: InstanceRecord,
        route: Route,
        mut body: Value,
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
        let claimed = self
            .claim_new(
                &record,
                None,
                accepts_incomplete,
                |e| super::same_instance(e, &record),
                super::done_instance,
            )
            .await?;
        let version = match claimed {
            Ok((version, _)) => version,
            Err(answer) => return Ok(answer),
        };
        tracing::info!(instance_id = %record.id, upstream = %route.alias, "provisioning upstream");
        body["service_id"] = json!(route.service_id);
        body["plan_id"] = json!(upstream_plan);
        let mut request = self.upstream_request(
            Method::PUT,
            &format!("/v2/service_instances/{}", record.id),
            accepts_incomplete,
            ctx,
        );
        request.body = Some(body);
        let answer = self.call_upstream(&route.alias, request).await;
        self.settle_forwarded(record, version, Undo::Remove, answer)
            .await
    }

    pub(super) async fn proxy_update(
        &self,
        stored: Stored<InstanceRecord>,
        req: upstreams::osb::UpdateRequest,
        mut body: Value,
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
        let mut record = current.clone();
        record.operation = self.start_forward(OpKind::Update);
        record.operation.target_plan_id = Some(target_plan);
        record.operation.upstream_plan_id = Some(upstream_plan.clone());
        let Some(version) = records::replace(self.store_ref(), &record, stored.version).await?
        else {
            return Err(OsbError::concurrency());
        };
        body["service_id"] = json!(up.service_id);
        if req.plan_id.is_some() {
            body["plan_id"] = json!(upstream_plan);
        }
        if let Some(previous) = body
            .get_mut("previous_values")
            .and_then(Value::as_object_mut)
        {
            if previous.contains_key("service_id") {
                previous.insert("service_id".into(), json!(up.service_id));
            }
            if previous.contains_key("plan_id") {
                previous.insert("plan_id".into(), json!(up.plan_id));
            }
        }
        let mut request = self.upstream_request(
            Method::PATCH,
            &format!("/v2/service_instances/{}", record.id),
            accepts_incomplete,
            ctx,
        );
        request.body = Some(body);
        let answer = self.call_upstream(&up.alias, request).await;
        self.settle_forwarded(record, version, Undo::Restore(current.operation), answer)
            .await
    }

    pub(super) async fn proxy_deprovision(
        &self,
        stored: Stored<InstanceRecord>,
        accepts_incomplete: bool,
        ctx: &CallContext,
    ) -> Result<Reply, OsbError> {
        let path = format!("/v2/service_instances/{}", stored.record.id);
        self.proxy_delete(stored, OpKind::Deprovision, &path, accepts_incomplete, ctx)
            .await
    }

    /// Deprovision and unbind alike: claim, forward the DELETE with the upstream's ids,
    /// record what it answered (a refusal puts the previous operation back).
    async fn proxy_delete<R: Forwarded>(
        &self,
        stored: Stored<R>,
        kind: OpKind,
        path: &str,
        accepts_incomplete: bool,
        ctx: &CallContext,
    ) -> Result<Reply, OsbError> {
        let previous = stored.record.operation().clone();
        let up = stored.record.upstream().cloned().expect("upstream-owned");
        let mut record = stored.record;
        *record.operation_mut() = self.start_forward(kind);
        let Some(version) = records::replace(self.store_ref(), &record, stored.version).await?
        else {
            return Err(OsbError::concurrency());
        };
        let request =
            self.delete_request(path, &up.service_id, &up.plan_id, accepts_incomplete, ctx);
        let answer = self.call_upstream(&up.alias, request).await;
        self.settle_forwarded(record, version, Undo::Restore(previous), answer)
            .await
    }

    fn delete_request(
        &self,
        path: &str,
        service_id: &str,
        plan_id: &str,
        accepts_incomplete: bool,
        ctx: &CallContext,
    ) -> OsbRequest {
        let mut request = self.upstream_request(Method::DELETE, path, accepts_incomplete, ctx);
        request.query.push(("service_id".into(), service_id.into()));
        request.query.push(("plan_id".into(), plan_id.into()));
        request
    }

    /// A DELETE for something never recorded: routed by its `service_id`, so the upstream
    /// can clean up after a provision or bind that timed out. Unknown here: 410.
    pub(super) async fn proxy_orphan_delete(
        &self,
        path: &str,
        service_id: &str,
        plan_id: &str,
        accepts_incomplete: bool,
        ctx: &CallContext,
    ) -> Result<Reply, OsbError> {
        let Some(route) = self.inner.federation.route(service_id) else {
            return Err(OsbError::Gone);
        };
        let Some(upstream_plan) = route.plans.get(plan_id) else {
            return Err(OsbError::Gone);
        };
        tracing::info!(path, upstream = %route.alias, "forwarding a delete for an unrecorded resource");
        let request = self.delete_request(
            path,
            &route.service_id,
            upstream_plan,
            accepts_incomplete,
            ctx,
        );
        let response = self.call_upstream(&route.alias, request).await?;
        let mut reply = passthrough(response);
        if reply.status == 202 {
            let kind = if path.contains("/service_bindings/") {
                OpKind::Unbind
            } else {
                OpKind::Deprovision
            };
            let token = OperationToken {
                target: route.alias.clone(),
                kind,
                id: OperationToken::UNRECORDED.into(),
                upstream: reply
                    .body
                    .get("operation")
                    .and_then(Value::as_str)
                    .map(str::to_string),
            };
            reply.body["operation"] = json!(token.encode());
        }
        Ok(reply)
    }

    pub(super) async fn proxy_fetch_instance(
        &self,
        record: &InstanceRecord,
        ctx: &CallContext,
    ) -> Result<Reply, OsbError> {
        let up = record.upstream.as_ref().expect("upstream-owned");
        let request = self.upstream_request(
            Method::GET,
            &format!("/v2/service_instances/{}", record.id),
            false,
            ctx,
        );
        let mut reply = passthrough(self.call_upstream(&up.alias, request).await?);
        // Write the namespaced ids back.
        if reply.body.get("service_id").and_then(Value::as_str) == Some(&up.service_id) {
            reply.body["service_id"] = json!(record.service_id);
        }
        if let Some(plan) = reply.body.get("plan_id").and_then(Value::as_str) {
            let namespaced = if plan == up.plan_id {
                record.plan_id.clone()
            } else {
                crate::federation::merge::plan_id(&up.alias, plan)
            };
            reply.body["plan_id"] = json!(namespaced);
        }
        Ok(reply)
    }

    pub(super) async fn proxy_bind(
        &self,
        mut record: BindingRecord,
        instance_version: u64,
        mut body: Value,
        accepts_incomplete: bool,
        ctx: &CallContext,
    ) -> Result<Reply, OsbError> {
        let up = record.upstream.clone().expect("upstream-owned");
        let instance = records::load::<InstanceRecord>(self.store_ref(), &record.instance_id)
            .await?
            .ok_or_else(|| OsbError::NotFound("instance does not exist".into()))?;
        if record.plan_id != instance.record.plan_id {
            return Err(OsbError::BadRequest(format!(
                "plan_id {:?} is not the instance's plan",
                record.plan_id
            )));
        }
        record.operation = self.start_forward(OpKind::Bind);
        let parent = Some((record.instance_id.as_str(), instance_version));
        let claimed = self
            .claim_new(
                &record,
                parent,
                accepts_incomplete,
                |e| super::same_binding(e, &record),
                |_| None,
            )
            .await?;
        let version = match claimed {
            Ok((version, _)) => version,
            Err(answer) => return Ok(answer),
        };
        body["service_id"] = json!(up.service_id);
        body["plan_id"] = json!(up.plan_id);
        let path = format!(
            "/v2/service_instances/{}/service_bindings/{}",
            record.instance_id, record.id
        );
        let mut request = self.upstream_request(Method::PUT, &path, accepts_incomplete, ctx);
        request.body = Some(body);
        let answer = self.call_upstream(&up.alias, request).await;
        self.settle_forwarded(record, version, Undo::Remove, answer)
            .await
    }

    pub(super) async fn proxy_unbind(
        &self,
        stored: Stored<BindingRecord>,
        accepts_incomplete: bool,
        ctx: &CallContext,
    ) -> Result<Reply, OsbError> {
        let path = format!(
            "/v2/service_instances/{}/service_bindings/{}",
            stored.record.instance_id, stored.record.id
        );
        self.proxy_delete(stored, OpKind::Unbind, &path, accepts_incomplete, ctx)
            .await
    }

    pub(super) async fn proxy_fetch_binding(
        &self,
        record: &BindingRecord,
        ctx: &CallContext,
    ) -> Result<Reply, OsbError> {
        let up = record.upstream.as_ref().expect("upstream-owned");
        let path = format!(
            "/v2/service_instances/{}/service_bindings/{}",
            record.instance_id, record.id
        );
        let request = self.upstream_request(Method::GET, &path, false, ctx);
        Ok(passthrough(self.call_upstream(&up.alias, request).await?))
    }

    /// Polls the upstream for a recorded asynchronous operation and records its end.
    pub(super) async fn proxy_poll<R: Forwarded>(
        &self,
        stored: Stored<R>,
        path: &str,
        ctx: &CallContext,
    ) -> Result<Reply, OsbError> {
        let mut record = stored.record;
        let id = record.id().to_string();
        let up = record.upstream().cloned().expect("upstream-owned");
        let op = record.operation().clone();
        let mut request = self.upstream_request(Method::GET, path, false, ctx);
        if let Some(operation) = &op.upstream_operation {
            request.query.push(("operation".into(), operation.clone()));
        }
        request
            .query
            .push(("service_id".into(), up.service_id.clone()));
        request.query.push(("plan_id".into(), up.plan_id.clone()));
        let response = self.call_upstream(&up.alias, request).await?;
        let state = response
            .body
            .get("state")
            .and_then(Value::as_str)
            .unwrap_or("");
        let outcome = match (response.status, state) {
            (200, "succeeded") if op.kind.deletes() => Some(Outcome::Remove),
            (410, _) if op.kind.deletes() => Some(Outcome::Remove),
            (200, "succeeded") => {
                record.absorb(&response.body, true);
                record.operation_mut().finish(OpState::Succeeded, None);
                Some(Outcome::Keep(record))
            }
            (200, "failed") => {
                let description = response
                    .body
                    .get("description")
                    .and_then(Value::as_str)
                    .map(str::to_string);
                record.operation_mut().finish(OpState::Failed, description);
                Some(Outcome::Keep(record))
            }
            _ => None,
        };
        if let Some(outcome) = outcome {
            // Another poll may have recorded the same end first; that is fine.
            let _ = self.record_outcome::<R>(&id, stored.version, outcome).await;
        }
        Ok(passthrough(response))
    }

    /// A poll for an operation this broker has no record of, routed by its token.
    pub(super) async fn proxy_token_poll(
        &self,
        token: &OperationToken,
        path: &str,
        ctx: &CallContext,
    ) -> Result<Reply, OsbError> {
        let mut request = self.upstream_request(Method::GET, path, false, ctx);
        if let Some(operation) = &token.upstream {
            request.query.push(("operation".into(), operation.clone()));
        }
        Ok(passthrough(
            self.call_upstream(&token.target, request).await?,
        ))
    }
}
