//! Durable state: instances, bindings and the operations running on them.
//!
//! [`StateStore`] is a small versioned document store: every record is a JSON document
//! with a version, and every change is a compare-and-swap on that version. The broker's
//! whole concurrency story rests on two guarantees every implementation keeps, checked by
//! the shared contract tests:
//! - `insert` of an id that exists never overwrites it: exactly one of many concurrent
//!   inserts wins, the others are shown the winner's record;
//! - `replace` and `remove` succeed only at the version the caller read.
//!
//! A binding is inserted only while its instance is still at the version the caller read,
//! so a bind racing a deprovision either lands before the deprovision sees the bindings, or
//! fails.

mod embedded;
mod mysql;
pub mod records;

use std::sync::Arc;

use async_trait::async_trait;

pub use embedded::EmbeddedStore;
pub use mysql::MysqlStore;
pub use records::{
    BindingRecord, Drain, InstanceRecord, OpKind, OpState, OperationRecord, UpstreamRef,
};

use crate::config::StoreConfig;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Table {
    Instances,
    Bindings,
    /// The last good catalog of each upstream, by alias.
    Catalogs,
    /// Leases that let one broker process of many do a periodic job (quota enforcement).
    Leases,
    /// Each log instance's recent lines, and which instances an app's syslog messages go
    /// to (`app:<guid>`).
    Logs,
}

impl Table {
    pub fn name(self) -> &'static str {
        match self {
            Table::Instances => "instances",
            Table::Bindings => "bindings",
            Table::Catalogs => "catalogs",
            Table::Leases => "leases",
            Table::Logs => "logs",
        }
    }
}

/// A stored document and the version it is at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned {
    pub version: u64,
    pub doc: Vec<u8>,
}

/// What a new record hangs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link<'a> {
    None,
    /// A binding: inserted only while its instance is at this version; removed with it.
    Parent(&'a str, u64),
    /// An instance of a local service: listed by [`StateStore::page`] under that service.
    Group(&'a str),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Insert {
    Inserted,
    /// The id was taken; this is what is stored under it.
    Exists(Versioned),
    /// The parent is gone or was changed since the caller read it.
    ParentChanged,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state store unavailable: {0}")]
    Unavailable(String),
    #[error("state store record {table}/{id} is unreadable: {reason}")]
    Corrupt {
        table: &'static str,
        id: String,
        reason: String,
    },
}

#[async_trait]
pub trait StateStore: Send + Sync {
    /// What kind of store this is, for logs and `brokerage check`.
    fn describe(&self) -> String;
    /// Reaches the store; `brokerage check` and `/ready` call it.
    async fn check(&self) -> Result<(), StoreError>;
    async fn get(&self, table: Table, id: &str) -> Result<Option<Versioned>, StoreError>;
    /// Stores `doc` at version 1 unless `id` exists. A binding (`Link::Parent`) only while
    /// its instance is at that version.
    async fn insert(
        &self,
        table: Table,
        id: &str,
        link: Link<'_>,
        doc: &[u8],
    ) -> Result<Insert, StoreError>;
    /// Replaces the document if it is still at `version`; the new version is `version + 1`.
    async fn replace(
        &self,
        table: Table,
        id: &str,
        version: u64,
        doc: &[u8],
    ) -> Result<bool, StoreError>;
    /// Removes the document if it is still at `version`; an instance takes its bindings
    /// with it.
    async fn remove(&self, table: Table, id: &str, version: u64) -> Result<bool, StoreError>;
    /// The bindings recorded under an instance, by id.
    async fn bindings_of(&self, instance_id: &str) -> Result<Vec<(String, Versioned)>, StoreError>;
    /// Up to `limit` instances of `group` (one local service) whose ids sort after `after`,
    /// in id order: periodic jobs walk them a page at a time, and never read the
    /// instances of other services or of upstreams.
    async fn page(
        &self,
        group: &str,
        after: &str,
        limit: usize,
    ) -> Result<Vec<(String, Versioned)>, StoreError>;
}

/// Opens the configured store, creating or migrating what it needs.
pub async fn open(config: &StoreConfig) -> anyhow::Result<Arc<dyn StateStore>> {
    Ok(match config {
        StoreConfig::Embedded { path, cache_mb, .. } => {
            let cache_bytes =
                usize::try_from(cache_mb.saturating_mul(1024 * 1024)).unwrap_or(usize::MAX);
            Arc::new(EmbeddedStore::open(path, cache_bytes)?)
        }
        StoreConfig::Mysql { url, .. } => Arc::new(MysqlStore::connect(url.expose()).await?),
    })
}
