//! The records the broker keeps, separate from the OSB wire types, and typed access to
//! them over any [`StateStore`].

use chrono::{DateTime, Duration, Utc};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::{Insert, Link, StateStore, StoreError, Table, Versioned};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OpKind {
    Provision,
    Update,
    Deprovision,
    Bind,
    Unbind,
}

impl OpKind {
    /// Whether the record is gone once this operation succeeds.
    pub fn deletes(self) -> bool {
        matches!(self, OpKind::Deprovision | OpKind::Unbind)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OpState {
    InProgress,
    Succeeded,
    Failed,
}

/// The last operation run on an instance or binding.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OperationRecord {
    pub id: String,
    pub kind: OpKind,
    pub state: OpState,
    #[serde(default)]
    pub description: Option<String>,
    pub started_at: DateTime<Utc>,
    #[serde(default)]
    pub finished_at: Option<DateTime<Utc>>,
    /// An operation still "in progress" after this moment was abandoned by a broker
    /// process that died; it reads as failed and may be taken over.
    pub lease_until: DateTime<Utc>,
    /// Whether the client was answered 202 and polls `last_operation`.
    pub asynchronous: bool,
    /// The plan an update moves to.
    #[serde(default)]
    pub target_plan_id: Option<String>,
    /// Upstream-owned: the upstream's own `operation` for this operation, if it gave one.
    #[serde(default)]
    pub upstream_operation: Option<String>,
    /// Upstream-owned: the upstream's id of the plan an update moves to.
    #[serde(default)]
    pub upstream_plan_id: Option<String>,
    /// The operation failed because what it would have made already existed (not made by
    /// Brokerage): nothing of the broker's is there, so nothing may be cleaned up for it.
    #[serde(default)]
    pub nothing_made: bool,
}

impl OperationRecord {
    pub fn start(kind: OpKind, asynchronous: bool, lease: Duration) -> Self {
        let now = Utc::now();
        OperationRecord {
            id: uuid::Uuid::new_v4().simple().to_string(),
            kind,
            state: OpState::InProgress,
            description: None,
            started_at: now,
            finished_at: None,
            lease_until: now + lease,
            asynchronous,
            target_plan_id: None,
            upstream_operation: None,
            upstream_plan_id: None,
            nothing_made: false,
        }
    }

    /// The state as clients see it: an abandoned operation has failed.
    pub fn effective_state(&self) -> OpState {
        if self.state == OpState::InProgress && Utc::now() > self.lease_until {
            OpState::Failed
        } else {
            self.state
        }
    }

    pub fn in_flight(&self) -> bool {
        self.effective_state() == OpState::InProgress
    }

    pub fn effective_description(&self) -> Option<String> {
        if self.state == OpState::InProgress && !self.in_flight() {
            Some("interrupted: the broker process running it stopped; repeat the request".into())
        } else {
            self.description.clone()
        }
    }

    pub fn finish(&mut self, state: OpState, description: Option<String>) {
        self.state = state;
        self.description = description;
        self.finished_at = Some(Utc::now());
    }
}

/// Which upstream owns a resource, and its own ids for the service and plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpstreamRef {
    pub alias: String,
    pub service_id: String,
    pub plan_id: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceRecord {
    pub id: String,
    pub service_id: String,
    pub plan_id: String,
    pub organization_guid: String,
    pub space_guid: String,
    #[serde(default)]
    pub context: Option<Map<String, Value>>,
    #[serde(default)]
    pub parameters: Option<Map<String, Value>>,
    #[serde(default)]
    pub maintenance_version: Option<String>,
    #[serde(default)]
    pub dashboard_url: Option<String>,
    /// The backend's resources exist (the first provision succeeded).
    pub provisioned: bool,
    pub created_at: DateTime<Utc>,
    pub operation: OperationRecord,
    /// Set when an upstream broker owns the instance.
    #[serde(default)]
    pub upstream: Option<UpstreamRef>,
    /// The Cloud Controller that provisioned it (`X-Api-Info-Location`), asked about
    /// dashboard permissions.
    #[serde(default)]
    pub api_info_location: Option<String>,
}

#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct BindingRecord {
    pub id: String,
    pub instance_id: String,
    pub service_id: String,
    pub plan_id: String,
    #[serde(default)]
    pub app_guid: Option<String>,
    #[serde(default)]
    pub bind_resource: Option<Map<String, Value>>,
    #[serde(default)]
    pub parameters: Option<Map<String, Value>>,
    #[serde(default)]
    pub context: Option<Map<String, Value>>,
    /// What the backend handed out; present once the bind succeeded.
    #[serde(default)]
    pub credentials: Option<Map<String, Value>>,
    /// The log drain a log service's bind handed out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain: Option<Drain>,
    pub created_at: DateTime<Utc>,
    pub operation: OperationRecord,
    /// Set when an upstream broker owns the binding.
    #[serde(default)]
    pub upstream: Option<UpstreamRef>,
}

/// A log drain handed out by a bind: the URL the platform sends the app's logs to, and
/// the token in it that a delivery must carry.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Drain {
    pub url: String,
    pub token: String,
}

/// Neither the URL nor the token reaches a log through `{:?}`.
impl std::fmt::Debug for Drain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Drain(***)")
    }
}

/// Where bindings recorded before drains were typed kept the drain: a reserved key of the
/// credentials, the token the URL's last segment.
const EARLIER_DRAIN_KEY: &str = "syslog_drain_url";

impl BindingRecord {
    /// The app the binding is for: `app_guid`, or `bind_resource.app_guid`.
    pub fn app_guid(&self) -> Option<&str> {
        self.app_guid
            .as_deref()
            .filter(|a| !a.is_empty())
            .or_else(|| {
                self.bind_resource
                    .as_ref()?
                    .get("app_guid")?
                    .as_str()
                    .filter(|a| !a.is_empty())
            })
    }
}

/// Credentials never reach a log through `{:?}`.
impl std::fmt::Debug for BindingRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BindingRecord")
            .field("id", &self.id)
            .field("instance_id", &self.instance_id)
            .field("service_id", &self.service_id)
            .field("plan_id", &self.plan_id)
            .field("credentials", &self.credentials.as_ref().map(|_| "***"))
            .field("drain", &self.drain)
            .field("operation", &self.operation)
            .field("upstream", &self.upstream)
            .finish_non_exhaustive()
    }
}

/// A record type and where it lives.
pub trait Record: Serialize + DeserializeOwned + Send + Sync {
    const TABLE: Table;
    fn id(&self) -> &str;
    fn operation(&self) -> &OperationRecord;
    fn operation_mut(&mut self) -> &mut OperationRecord;
    fn upstream(&self) -> Option<&UpstreamRef>;
    /// The group the store lists the record under: a local instance's service.
    fn group(&self) -> Option<&str> {
        None
    }
    /// Brings a record written by an earlier Brokerage to this one's form. Every read
    /// applies it, so a record not yet rewritten (or written during a rolling upgrade by a
    /// process of the earlier code) reads the same; the next write stores the new form.
    fn upgrade(&mut self) {}
}

impl Record for InstanceRecord {
    const TABLE: Table = Table::Instances;
    fn id(&self) -> &str {
        &self.id
    }
    fn upstream(&self) -> Option<&UpstreamRef> {
        self.upstream.as_ref()
    }
    fn group(&self) -> Option<&str> {
        self.upstream.is_none().then_some(self.service_id.as_str())
    }
    fn operation(&self) -> &OperationRecord {
        &self.operation
    }
    fn operation_mut(&mut self) -> &mut OperationRecord {
        &mut self.operation
    }
}

impl Record for BindingRecord {
    const TABLE: Table = Table::Bindings;
    fn id(&self) -> &str {
        &self.id
    }
    /// A drain kept among the credentials moves to its own field.
    fn upgrade(&mut self) {
        if self.drain.is_some() {
            return;
        }
        let Some(credentials) = self.credentials.as_mut() else {
            return;
        };
        if let Some(Value::String(url)) = credentials.remove(EARLIER_DRAIN_KEY) {
            let token = url.rsplit('/').next().unwrap_or_default().to_string();
            self.drain = Some(Drain { url, token });
        }
    }
    fn upstream(&self) -> Option<&UpstreamRef> {
        self.upstream.as_ref()
    }
    fn operation(&self) -> &OperationRecord {
        &self.operation
    }
    fn operation_mut(&mut self) -> &mut OperationRecord {
        &mut self.operation
    }
}

/// A record read from the store with the version it was read at.
#[derive(Debug, Clone)]
pub struct Stored<R> {
    pub version: u64,
    pub record: R,
}

pub enum Inserted<R> {
    Inserted,
    Exists(Stored<R>),
    ParentChanged,
}

fn decode<R: Record>(id: &str, doc: &[u8]) -> Result<R, StoreError> {
    let mut record: R = serde_json::from_slice(doc).map_err(|e| StoreError::Corrupt {
        table: R::TABLE.name(),
        id: id.to_string(),
        reason: e.to_string(),
    })?;
    record.upgrade();
    Ok(record)
}

fn encode<R: Record>(record: &R) -> Vec<u8> {
    serde_json::to_vec(record).expect("records serialize")
}

pub async fn load<R: Record>(
    store: &dyn StateStore,
    id: &str,
) -> Result<Option<Stored<R>>, StoreError> {
    match store.get(R::TABLE, id).await? {
        None => Ok(None),
        Some(v) => Ok(Some(Stored {
            version: v.version,
            record: decode(id, &v.doc)?,
        })),
    }
}

pub async fn insert<R: Record>(
    store: &dyn StateStore,
    record: &R,
    parent: Option<(&str, u64)>,
) -> Result<Inserted<R>, StoreError> {
    let link = match (parent, record.group()) {
        (Some((pid, pversion)), _) => Link::Parent(pid, pversion),
        (None, Some(group)) => Link::Group(group),
        (None, None) => Link::None,
    };
    Ok(
        match store
            .insert(R::TABLE, record.id(), link, &encode(record))
            .await?
        {
            Insert::Inserted => Inserted::Inserted,
            Insert::ParentChanged => Inserted::ParentChanged,
            Insert::Exists(v) => Inserted::Exists(Stored {
                version: v.version,
                record: decode(record.id(), &v.doc)?,
            }),
        },
    )
}

/// Compare-and-swap: the new version, or `None` when someone changed the record first.
pub async fn replace<R: Record>(
    store: &dyn StateStore,
    record: &R,
    version: u64,
) -> Result<Option<u64>, StoreError> {
    Ok(store
        .replace(R::TABLE, record.id(), version, &encode(record))
        .await?
        .then_some(version + 1))
}

pub async fn remove<R: Record>(
    store: &dyn StateStore,
    id: &str,
    version: u64,
) -> Result<bool, StoreError> {
    store.remove(R::TABLE, id, version).await
}

/// A page of the instances of one local service, in id order after `after`.
pub async fn page(
    store: &dyn StateStore,
    service_id: &str,
    after: &str,
    limit: usize,
) -> Result<Vec<Stored<InstanceRecord>>, StoreError> {
    decode_all(store.page(service_id, after, limit).await?)
}

pub async fn bindings_of(
    store: &dyn StateStore,
    instance_id: &str,
) -> Result<Vec<Stored<BindingRecord>>, StoreError> {
    decode_all(store.bindings_of(instance_id).await?)
}

fn decode_all<R: Record>(rows: Vec<(String, Versioned)>) -> Result<Vec<Stored<R>>, StoreError> {
    rows.into_iter()
        .map(|(id, v)| {
            Ok(Stored {
                version: v.version,
                record: decode(&id, &v.doc)?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_binding_recorded_with_its_drain_among_the_credentials_reads_with_a_typed_drain() {
        // As the code before typed drains recorded a log service's binding.
        let earlier = br#"{"id":"b-1","instance_id":"i-1","service_id":"s","plan_id":"p",
            "app_guid":"app-1","credentials":{"syslog_drain_url":"https://broker/drains/b-1/t0k3n"},
            "created_at":"2026-11-01T00:00:00Z",
            "operation":{"id":"o","kind":"bind","state":"succeeded","asynchronous":false,
                         "started_at":"2026-11-01T00:00:00Z","lease_until":"2026-11-01T00:01:00Z"}}"#;
        let record: BindingRecord = decode("b-1", earlier).unwrap();
        let drain = record.drain.clone().expect("the drain moved to its field");
        assert_eq!(drain.url, "https://broker/drains/b-1/t0k3n");
        assert_eq!(drain.token, "t0k3n");
        assert_eq!(record.credentials.as_ref().unwrap().len(), 0);
        // Written back, it is in the new form, and reads the same.
        let written = encode(&record);
        let raw: serde_json::Value = serde_json::from_slice(&written).unwrap();
        assert_eq!(raw["drain"]["token"], "t0k3n");
        assert_eq!(raw["credentials"], serde_json::json!({}));
        assert_eq!(decode::<BindingRecord>("b-1", &written).unwrap(), record);
        assert!(!format!("{record:?}").contains("t0k3n"));
    }
}
