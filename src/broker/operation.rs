//! The one mechanism every changing call runs through, local and forwarded alike:
//! **claim** the record; **act** (a backend's work, or a call to an upstream); **record**
//! the outcome; **answer**. Nothing here knows which call it serves.
//!
//! A local backend's claim is durable (an insert for a new resource, or a swap of the
//! stored one at the version read, with an operation "in progress"): what the backend
//! makes is the broker's, so a crash must leave a trace to clean up after. A forwarded
//! call's resource is the upstream's: its claim is held in this process only ([`Hold`]),
//! and the outcome is the call's one durable write (an insert, or a swap or removal at
//! the version read, so a change by another process in between is still caught).

use std::collections::HashSet;
use std::future::Future;
use std::sync::{Arc, Mutex};

use upstreams::osb::{Answer, DeleteResponse};

use super::{Broker, OperationToken};
use crate::backend::BackendError;
use crate::error::OsbError;
use crate::store::records::{self, Inserted, Record, Stored};
use crate::store::{OpKind, OpState, OperationRecord, Table};

/// An answer given: the status, the typed OSB answer (written as JSON only by the HTTP
/// layer, cut to the caller's version) and, for polls, `Retry-After`.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub status: u16,
    pub answer: Answer,
    pub retry_after: Option<u64>,
}

impl Reply {
    pub(super) fn of(status: u16, answer: Answer) -> Self {
        Reply {
            status,
            answer,
            retry_after: None,
        }
    }

    /// `{}`: a deprovision or an unbind that is done.
    pub(super) fn deleted(kind: OpKind) -> Self {
        let done = DeleteResponse::default();
        Self::of(
            200,
            match kind {
                OpKind::Unbind => Answer::Unbind(done),
                _ => Answer::Deprovision(done),
            },
        )
    }
}

/// What becomes of a record once its operation ends.
pub(super) enum Outcome<R> {
    Keep(R),
    Remove,
    /// Nothing to write: a forwarded call the upstream refused or never answered, whose
    /// claim was only ever held in process.
    Unchanged,
}

/// Where the record an operation acts on stands in the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum At {
    /// Stored at this version (claimed there, or read there by a forwarded call): the
    /// outcome swaps or removes it at this version.
    Version(u64),
    /// Not stored yet (a forwarded call's new resource): the outcome is its first write,
    /// under the instance a binding belongs to, at the version read.
    New(Option<(String, u64)>),
}

/// Ids claimed in this process by forwarded calls, each by table.
#[derive(Default)]
pub(super) struct Held(Mutex<HashSet<(Table, String)>>);

/// One id claimed in process; released when dropped.
pub(super) struct Hold {
    held: Arc<Held>,
    key: (Table, String),
}

impl Held {
    pub(super) fn holds(&self, table: Table, id: &str) -> bool {
        let held = self.0.lock().expect("not poisoned");
        held.contains(&(table, id.to_string()))
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        self.held.0.lock().expect("not poisoned").remove(&self.key);
    }
}

/// The outcome to record and the answer to give once it is recorded.
pub(super) type Settled<R> = (Outcome<R>, Result<Reply, OsbError>);

/// A record the broker answers about: what its `202` carries.
pub(super) trait Resource: Record + Clone + 'static {
    /// The `202` for the record's operation, carrying its token.
    fn accepted_answer(&self, operation: String) -> Answer;
    /// Whether a stored record was made by a request with the same attributes.
    fn same_request(&self, other: &Self) -> bool;
    /// The answer to a repeat of the request once its operation is complete; `None` when
    /// the repeat must act again (a forwarded binding keeps no credentials to repeat).
    fn done(&self) -> Option<Reply>;
    /// Whether the record is a delete's claim on an id the broker never recorded, held
    /// while the delete removes what the id's names point at.
    fn cleanup_claim(&self) -> bool;
    /// The ids of the service and plan the record is of.
    fn offering(&self) -> (&str, &str);
}

/// The token a `202` hands out for a record's operation.
pub(super) fn token<R: Record>(record: &R) -> String {
    let op = record.operation();
    OperationToken {
        target: record
            .upstream()
            .map(|u| u.alias.clone())
            .unwrap_or_else(|| OperationToken::LOCAL.to_string()),
        kind: op.kind,
        id: op.id.clone(),
        upstream: op.upstream_operation.clone(),
    }
    .encode()
}

/// The 202 for a record's operation in flight.
pub(super) fn accepted<R: Resource>(record: &R) -> Reply {
    Reply::of(202, record.accepted_answer(token(record)))
}

/// A repeated request while the resource's operation runs: the same kind, asynchronous and
/// accepted asynchronously, is answered 202 again; anything else must wait.
pub(super) fn in_flight<R: Resource>(
    current: &R,
    kind: OpKind,
    accepts_incomplete: bool,
) -> Result<Option<Reply>, OsbError> {
    let op = current.operation();
    if !op.in_flight() {
        return Ok(None);
    }
    if op.kind == kind && op.asynchronous && accepts_incomplete {
        return Ok(Some(accepted(current)));
    }
    Err(OsbError::concurrency())
}

/// A request for an id already stored: 409 for other attributes, 202 or 422 while an
/// operation runs, [`Resource::done`]'s answer once complete; `None` when a failed or
/// abandoned attempt may be taken over.
fn answer_existing<R: Resource>(
    existing: &R,
    record: &R,
    accepts_incomplete: bool,
) -> Result<Option<Reply>, OsbError> {
    // A delete cleaning up after an unrecorded attempt: wait for it, or take over once
    // its lease has run out (its attributes are not a request's).
    if existing.cleanup_claim() {
        return match existing.operation().in_flight() {
            true => Err(OsbError::concurrency()),
            false => Ok(None),
        };
    }
    if !existing.same_request(record) {
        let what = match R::TABLE {
            Table::Instances => "instance",
            _ => "binding",
        };
        return Err(OsbError::Conflict(format!(
            "{what} {} already exists with other attributes",
            record.id()
        )));
    }
    if let Some(reply) = in_flight(existing, record.operation().kind, accepts_incomplete)? {
        return Ok(Some(reply));
    }
    Ok(existing.done())
}

/// A claimed record: the version it was claimed at and whether a failed or abandoned
/// earlier attempt was taken over (and may have left something to clean up).
pub(super) struct Claim {
    pub version: u64,
    pub takeover: bool,
}

/// What an earlier request with the same id left, when it answers this one instead.
pub(super) type Claimed = Result<Claim, Reply>;

impl Broker {
    /// Claims a new resource id by inserting its record. When the id is taken, the
    /// request is answered from what is stored ([`answer_existing`]); a failed or
    /// abandoned attempt is taken over.
    pub(super) async fn claim_new<R: Resource>(
        &self,
        record: &R,
        parent: Option<(&str, u64)>,
        accepts_incomplete: bool,
    ) -> Result<Claimed, OsbError> {
        let existing = match records::insert(self.store_ref(), record, parent).await? {
            Inserted::Inserted => {
                return Ok(Ok(Claim {
                    version: 1,
                    takeover: false,
                }))
            }
            Inserted::ParentChanged => return Err(OsbError::concurrency()),
            Inserted::Exists(existing) => existing,
        };
        if let Some(reply) = answer_existing(&existing.record, record, accepts_incomplete)? {
            return Ok(Err(reply));
        }
        // Taking over a failed or abandoned attempt: clean up after it first, unless it
        // failed because what it would have made was not the broker's.
        let takeover = !existing.record.operation().nothing_made;
        match records::replace(self.store_ref(), record, existing.version).await? {
            Some(version) => Ok(Ok(Claim { version, takeover })),
            None => Err(OsbError::concurrency()),
        }
    }

    /// Claims a forwarded call's resource id in this process: another call for the same
    /// id here is refused (422) until this one is recorded. A 422 also answers an id
    /// claimed in the store by a call in flight.
    pub(super) fn hold(&self, table: Table, id: &str) -> Result<Hold, OsbError> {
        let held = &self.inner.held;
        let key = (table, id.to_string());
        if !held.0.lock().expect("not poisoned").insert(key.clone()) {
            return Err(OsbError::concurrency());
        }
        Ok(Hold {
            held: held.clone(),
            key,
        })
    }

    /// A forwarded call for a new resource id: claimed in process, and answered from what
    /// is stored when the id is taken ([`answer_existing`]); a failed attempt is taken over
    /// at the version read. A binding waits (422) while its instance is held here by a
    /// forwarded update or deprovision.
    pub(super) async fn hold_new<R: Resource>(
        &self,
        record: &R,
        parent: Option<(&str, u64)>,
        accepts_incomplete: bool,
    ) -> Result<Result<(Hold, At), Reply>, OsbError> {
        if parent.is_some_and(|(id, _)| self.inner.held.holds(Table::Instances, id)) {
            return Err(OsbError::concurrency());
        }
        let hold = self.hold(R::TABLE, record.id())?;
        let at = match records::load::<R>(self.store_ref(), record.id()).await? {
            None => At::New(parent.map(|(id, version)| (id.to_string(), version))),
            Some(existing) => {
                let e = &existing.record;
                if let Some(reply) = answer_existing(e, record, accepts_incomplete)? {
                    return Ok(Err(reply));
                }
                At::Version(existing.version)
            }
        };
        Ok(Ok((hold, at)))
    }

    /// Claims a stored record for a new operation: a compare-and-swap at the version read.
    /// Returns the claimed record, its version, and the operation it replaced (which a
    /// refusal or a synchronous failure puts back).
    pub(super) async fn claim<R: Resource>(
        &self,
        stored: Stored<R>,
        operation: OperationRecord,
    ) -> Result<(R, u64, OperationRecord), OsbError> {
        let mut record = stored.record;
        let previous = std::mem::replace(record.operation_mut(), operation);
        let version = records::replace(self.store_ref(), &record, stored.version)
            .await?
            .ok_or_else(OsbError::concurrency)?;
        Ok((record, version, previous))
    }

    /// Acts on a claimed record and records the outcome, then answers: inline, or for an
    /// asynchronous operation in the background with an immediate 202.
    pub(super) async fn drive<R, T, W, S>(
        &self,
        record: R,
        at: At,
        work: W,
        settle: S,
    ) -> Result<Reply, OsbError>
    where
        R: Resource,
        T: Send + 'static,
        W: Future<Output = T> + Send + 'static,
        S: FnOnce(R, T) -> Settled<R> + Send + 'static,
    {
        let in_flight = self.inner.metrics.in_flight();
        let work = async move {
            let _in_flight = in_flight;
            work.await
        };
        if !record.operation().asynchronous {
            let (outcome, reply) = settle(record.clone(), work.await);
            self.record_outcome::<R>(record.id(), at, outcome).await?;
            return reply;
        }
        let this = self.clone();
        let id = record.id().to_string();
        let reply = accepted(&record);
        self.inner.background.spawn(async move {
            let (outcome, _) = settle(record, work.await);
            if let Err(e) = this.record_outcome::<R>(&id, at, outcome).await {
                tracing::error!(table = R::TABLE.name(), %id, error = %e, "could not record the end of a background operation");
            }
        });
        Ok(reply)
    }

    /// Records an operation's end: the record must still be at the version claimed or
    /// read, or, when new, its id still free (and a binding's instance still there).
    pub(super) async fn record_outcome<R: Record>(
        &self,
        id: &str,
        at: At,
        outcome: Outcome<R>,
    ) -> Result<(), OsbError> {
        let store = self.store_ref();
        let done = match (outcome, at) {
            (Outcome::Unchanged, _) | (Outcome::Remove, At::New(_)) => true,
            (Outcome::Keep(record), At::Version(version)) => {
                records::replace(store, &record, version).await?.is_some()
            }
            (Outcome::Remove, At::Version(version)) => {
                records::remove::<R>(store, id, version).await?
            }
            (Outcome::Keep(record), At::New(mut parent)) => loop {
                let link = parent.as_ref().map(|(id, version)| (id.as_str(), *version));
                match records::insert(store, &record, link).await? {
                    Inserted::Inserted => break true,
                    // Another process recorded the id first.
                    Inserted::Exists(_) => return Err(OsbError::concurrency()),
                    // The instance changed since it was read (an update recorded): the
                    // binding still belongs to it while it is there.
                    Inserted::ParentChanged => {
                        let (pid, _) = parent.take().expect("only bindings have parents");
                        match store.get(Table::Instances, &pid).await? {
                            Some(current) => parent = Some((pid, current.version)),
                            None => return Err(OsbError::concurrency()),
                        }
                    }
                }
            },
        };
        if done {
            Ok(())
        } else {
            // The lease ran out while the work ran (a stalled backend or store) and another
            // process took the operation over: it finishes it, and the caller's retry sees
            // its outcome.
            tracing::warn!(
                table = R::TABLE.name(),
                id,
                "the record changed while its operation ran: another process took it over"
            );
            Err(OsbError::concurrency())
        }
    }

    /// Backend work bounded by the operation timeout: past it, the backend is unavailable.
    pub(super) fn within<T>(
        &self,
        work: impl Future<Output = Result<T, BackendError>>,
    ) -> impl Future<Output = Result<T, BackendError>> {
        let timeout = self.inner.timing.operation_timeout;
        async move {
            tokio::time::timeout(timeout, work)
                .await
                .unwrap_or_else(|_| {
                    Err(BackendError::unavailable(
                        format!("the backend did not finish within {} s", timeout.as_secs()),
                        "operation timeout",
                    ))
                })
        }
    }
}

/// A failed backend operation: an asynchronous one is recorded as failed (the platform
/// polls it); a synchronous one is undone: a new resource's record removed, a changed
/// one's previous operation restored.
pub(super) fn failed<R: Record>(
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
