//! Acting on upstream-owned resources: forwarding a call to the upstream broker that owns
//! the service, and turning what it answers into an outcome for [`super::operation`].
//!
//! Forwarding restores the upstream's own ids, keeps the rest of the query and body,
//! passes the identity headers, and answers with the upstream's status, body and
//! `Retry-After`, namespaced ids written back. A 202's `operation` is replaced by a token
//! naming the upstream (and carrying its operation), so polls route without a record.
//! Nothing here claims a record: the callers do, in process ([`Broker::hold`]), and the
//! outcome recorded here is the call's one durable write.

use chrono::Utc;
use upstreams::osb::{Answer, Kind};
use upstreams::{Method, OsbRequest, OsbResponse};

use super::operation::{self, At, Outcome, Reply, Resource, Settled};
use super::{Broker, CallContext, OperationToken};
use crate::error::OsbError;
use crate::store::records::Stored;
use crate::store::{BindingRecord, InstanceRecord, OpKind, OpState, OperationRecord, UpstreamRef};

/// The lease a forwarded call's operation carries: Cloud Controller's 60 s and a margin.
/// The claim itself is held in process, so it is never stored while the call runs.
const FORWARD_LEASE_SECS: i64 = 120;
/// An asynchronous upstream operation is the upstream's to finish; the platform polls it
/// for up to a week.
const UPSTREAM_ASYNC_LEASE_DAYS: i64 = 8;

/// Records that take in what an upstream answered.
pub(super) trait Forwarded: Resource {
    /// `done`: the operation completed (not just accepted).
    fn absorb(&mut self, answer: &Answer, done: bool);
}

impl Forwarded for InstanceRecord {
    fn absorb(&mut self, answer: &Answer, done: bool) {
        if let Some(url) = answer.dashboard_url() {
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
    fn absorb(&mut self, _answer: &Answer, _done: bool) {}
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
        answer: r.body,
        retry_after: r.retry_after.as_deref().and_then(retry_after_secs),
    }
}

/// What an upstream's answer to a change is read as.
fn kind_of(kind: OpKind) -> Kind {
    match kind {
        OpKind::Provision => Kind::Provision,
        OpKind::Update => Kind::Update,
        OpKind::Deprovision => Kind::Deprovision,
        OpKind::Bind => Kind::Bind,
        OpKind::Unbind => Kind::Unbind,
    }
}

/// The outcome of a forwarded change: done (kept or removed), accepted (kept as an
/// asynchronous operation the upstream runs), or refused (nothing recorded changes); the
/// answer is the upstream's.
fn settle<R: Forwarded>(mut record: R, answer: Result<OsbResponse, OsbError>) -> Settled<R> {
    let kind = record.operation().kind;
    let response = match answer {
        Ok(r) => r,
        Err(e) => return (Outcome::Unchanged, Err(e)),
    };
    match response.status {
        200 | 201 if !kind.deletes() => {
            record.absorb(&response.body, true);
            record.operation_mut().finish(OpState::Succeeded, None);
            (Outcome::Keep(record), Ok(passthrough(response)))
        }
        200 | 410 if kind.deletes() => (Outcome::Remove, Ok(passthrough(response))),
        202 => {
            record.absorb(&response.body, false);
            let op = record.operation_mut();
            op.asynchronous = true;
            op.upstream_operation = response.body.operation().map(str::to_string);
            op.lease_until = Utc::now() + chrono::Duration::days(UPSTREAM_ASYNC_LEASE_DAYS);
            let mut reply = passthrough(response);
            reply.answer.set_operation(operation::token(&record));
            (Outcome::Keep(record), Ok(reply))
        }
        _ => (Outcome::Unchanged, Ok(passthrough(response))),
    }
}

impl Broker {
    /// The operation a forwarded call claims its record with.
    pub(super) fn start_forward(&self, kind: OpKind) -> OperationRecord {
        OperationRecord::start(kind, false, chrono::Duration::seconds(FORWARD_LEASE_SECS))
    }

    /// A call to forward: the platform's identity headers and API version, and
    /// `accepts_incomplete=true` when the platform sent it.
    pub(super) fn upstream_request(
        &self,
        method: Method,
        path: &str,
        accepts_incomplete: bool,
        ctx: &CallContext,
    ) -> OsbRequest {
        let mut request = OsbRequest::new(method, path, ctx.api_version.to_string());
        request.originating_identity = ctx.originating_identity.clone();
        request.request_identity = ctx.request_identity.clone();
        if accepts_incomplete {
            request
                .query
                .push(("accepts_incomplete".into(), "true".into()));
        }
        request
    }

    /// A DELETE with the upstream's own ids in its query.
    pub(super) fn delete_request(
        &self,
        path: &str,
        up: (&str, &str),
        accepts_incomplete: bool,
        ctx: &CallContext,
    ) -> OsbRequest {
        let mut request = self.upstream_request(Method::DELETE, path, accepts_incomplete, ctx);
        request.query.push(("service_id".into(), up.0.into()));
        request.query.push(("plan_id".into(), up.1.into()));
        request
    }

    async fn call_upstream(
        &self,
        alias: &str,
        request: OsbRequest,
        kind: Kind,
    ) -> Result<OsbResponse, OsbError> {
        let upstream = self.inner.federation.upstream(alias).ok_or_else(|| {
            let public = format!("upstream {alias} is no longer configured");
            OsbError::BadGateway {
                cause: public.clone(),
                public,
            }
        })?;
        tracing::debug!(upstream = alias, method = %request.method, path = %request.path, "forwarding");
        Ok(upstream.send(&request, kind).await?)
    }

    /// The upstream's id for a namespaced plan of the same upstream service.
    pub(super) fn upstream_plan(
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

    /// The "act" of a forwarded change claimed in process: sends the request to the
    /// record's upstream, records what it answered and answers the same (counted in
    /// flight by `drive`, as backend work is).
    pub(super) async fn forward<R: Forwarded>(
        &self,
        record: R,
        at: At,
        request: OsbRequest,
    ) -> Result<Reply, OsbError> {
        let alias = record.upstream().expect("upstream-owned").alias.clone();
        let kind = kind_of(record.operation().kind);
        let this = self.clone();
        let call = async move { this.call_upstream(&alias, request, kind).await };
        self.drive(record, at, call, settle).await
    }

    /// Deprovision and unbind of an upstream-owned resource: claim in process, forward the
    /// DELETE with the upstream's ids, record what it answered (a refusal changes nothing).
    pub(super) async fn forward_delete<R: Forwarded>(
        &self,
        stored: Stored<R>,
        kind: OpKind,
        path: &str,
        accepts_incomplete: bool,
        ctx: &CallContext,
    ) -> Result<Reply, OsbError> {
        let mut record = stored.record;
        let _hold = self.hold(R::TABLE, record.id())?;
        let up = record.upstream().cloned().expect("upstream-owned");
        let request =
            self.delete_request(path, (&up.service_id, &up.plan_id), accepts_incomplete, ctx);
        *record.operation_mut() = self.start_forward(kind);
        self.forward(record, At::Version(stored.version), request)
            .await
    }

    /// A claim-less call (fetch, orphan delete, poll by token): the upstream's answer.
    pub(super) async fn ask_upstream(
        &self,
        alias: &str,
        request: OsbRequest,
        kind: Kind,
    ) -> Result<Reply, OsbError> {
        let _in_flight = self.inner.metrics.in_flight();
        Ok(passthrough(self.call_upstream(alias, request, kind).await?))
    }

    /// A DELETE for something never recorded: routed by its `service_id`, so the upstream
    /// can clean up after a provision or bind that timed out. Unknown here: 410.
    pub(super) async fn forward_orphan_delete(
        &self,
        path: &str,
        kind: OpKind,
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
            (&route.service_id, upstream_plan),
            accepts_incomplete,
            ctx,
        );
        let mut reply = self
            .ask_upstream(&route.alias, request, kind_of(kind))
            .await?;
        if reply.status == 202 {
            let token = OperationToken {
                target: route.alias.clone(),
                kind,
                id: OperationToken::UNRECORDED.into(),
                upstream: reply.answer.operation().map(str::to_string),
            };
            reply.answer.set_operation(token.encode());
        }
        Ok(reply)
    }

    /// Polls the upstream for a recorded asynchronous operation and records its end.
    pub(super) async fn forward_poll<R: Forwarded>(
        &self,
        stored: Stored<R>,
        path: &str,
        ctx: &CallContext,
    ) -> Result<Reply, OsbError> {
        use upstreams::osb::OperationState::{Failed, Succeeded};
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
        let response = {
            let _in_flight = self.inner.metrics.in_flight();
            self.call_upstream(&up.alias, request, Kind::LastOperation)
                .await?
        };
        let (state, description) = match &response.body {
            Answer::LastOperation(l) if response.status == 200 => {
                (Some(l.state), l.description.clone())
            }
            _ => (None, None),
        };
        let outcome = match (response.status, state) {
            (200, Some(Succeeded)) if op.kind.deletes() => Some(Outcome::Remove),
            (410, _) if op.kind.deletes() => Some(Outcome::Remove),
            (200, Some(Succeeded)) => {
                record.absorb(&response.body, true);
                record.operation_mut().finish(OpState::Succeeded, None);
                Some(Outcome::Keep(record))
            }
            (200, Some(Failed)) => {
                record.operation_mut().finish(OpState::Failed, description);
                Some(Outcome::Keep(record))
            }
            _ => None,
        };
        if let Some(outcome) = outcome {
            // Another poll may have recorded the same end first; that is fine.
            let at = At::Version(stored.version);
            let _ = self.record_outcome::<R>(&id, at, outcome).await;
        }
        Ok(passthrough(response))
    }
}
