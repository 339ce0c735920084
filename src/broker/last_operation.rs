//! `last_operation` polls: answered from the record's operation, or, while an upstream
//! runs the operation, by asking it (and recording the end it reports).

use upstreams::osb::{Answer, Kind, LastOperation, OperationState};
use upstreams::Method;

use super::forward::Forwarded;
use super::operation::Reply;
use super::{check_id, Broker, CallContext, OperationToken};
use crate::error::OsbError;
use crate::store::records::{self, Stored};
use crate::store::{BindingRecord, InstanceRecord, OpKind, OpState, Table};

impl Broker {
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

    async fn last_operation<R: Forwarded>(
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
                let mut request = self.upstream_request(Method::GET, path, false, ctx);
                if let Some(operation) = &t.upstream {
                    request.query.push(("operation".into(), operation.clone()));
                }
                return self
                    .ask_upstream(&t.target, request, Kind::LastOperation)
                    .await;
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
            return self.forward_poll(stored, path, ctx).await;
        }
        let state = match op.effective_state() {
            OpState::InProgress => OperationState::InProgress,
            OpState::Succeeded => OperationState::Succeeded,
            OpState::Failed => OperationState::Failed,
        };
        let failed = state == OperationState::Failed;
        let answer = LastOperation {
            state,
            description: op.effective_description(),
            instance_usable: (failed && R::TABLE == Table::Instances)
                .then_some(matches!(op.kind, OpKind::Update | OpKind::Deprovision)),
            update_repeatable: (failed && op.kind == OpKind::Update).then_some(true),
            extra: Default::default(),
        };
        let mut reply = Reply::of(200, Answer::LastOperation(answer));
        if state == OperationState::InProgress {
            reply.retry_after = Some(self.inner.timing.retry_after_secs);
        }
        Ok(reply)
    }
}
