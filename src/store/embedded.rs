//! The default store: one redb file owned by one broker process. Every change is committed
//! with fsync before the call returns, so what the broker acknowledged survives `kill -9`
//! and power loss. Changes go through one committer thread: those that arrive while a
//! commit is in flight share the next one (group commit: one fsync for many), each still
//! applied in order and answered only once its commit is durable.

// redb's error type is large; it only travels the (disk-bound) error path.
#![allow(clippy::result_large_err)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use async_trait::async_trait;
use redb::{
    Database, ReadableDatabase, ReadableTable, TableDefinition, TableHandle, WriteTransaction,
};

use super::{Insert, Link, StateStore, StoreError, Table, Versioned};

/// id -> (version, parent instance id or "", document)
type Docs = TableDefinition<'static, &'static str, (u64, &'static str, &'static [u8])>;
const INSTANCES: Docs = TableDefinition::new("instances");
const BINDINGS: Docs = TableDefinition::new("bindings");
const CATALOGS: Docs = TableDefinition::new("catalogs");
const LEASES: Docs = TableDefinition::new("leases");
const LOGS: Docs = TableDefinition::new("logs");
/// (instance id, binding id) -> ()
const BINDINGS_BY_INSTANCE: TableDefinition<(&str, &str), ()> =
    TableDefinition::new("bindings_by_instance");
/// (service id, instance id) -> (): the instances of each local service, whose service id
/// is also their record's parent field.
const INSTANCES_BY_GROUP: TableDefinition<(&str, &str), ()> =
    TableDefinition::new("instances_by_group");

fn docs(table: Table) -> Docs {
    match table {
        Table::Instances => INSTANCES,
        Table::Bindings => BINDINGS,
        Table::Catalogs => CATALOGS,
        Table::Leases => LEASES,
        Table::Logs => LOGS,
    }
}

mod private {
    use std::fs::{DirBuilder, OpenOptions, Permissions};
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
    use std::path::Path;

    use anyhow::Context;

    /// The store's directory (0700) and an empty file (0600) when missing; both tightened
    /// when looser. A directory that is not the broker's own (owned by another user, or
    /// shared and sticky like /tmp) is left as it is, with a warning.
    pub fn prepare(path: &Path) -> anyhow::Result<()> {
        // A store named without a directory lives in the working directory, which is not
        // the broker's own to tighten.
        let named = path.parent().filter(|d| !d.as_os_str().is_empty());
        let dir = named.unwrap_or(Path::new("."));
        if !dir.exists() {
            DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .with_context(|| format!("store.path: cannot create {}", dir.display()))?;
        }
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
        {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("store.path: cannot create {}", path.display()))
            }
        }
        let file = std::fs::metadata(path)
            .with_context(|| format!("store.path: cannot read {}", path.display()))?;
        if file.mode() & 0o077 != 0 {
            tracing::warn!(path = %path.display(), mode = format!("{:o}", file.mode() & 0o777), "the store file was readable by others: now 0600");
            std::fs::set_permissions(path, Permissions::from_mode(0o600))
                .with_context(|| format!("store.path: cannot make {} private", path.display()))?;
        }
        let d = std::fs::metadata(dir)
            .with_context(|| format!("store.path: cannot read {}", dir.display()))?;
        if d.mode() & 0o077 != 0 {
            let ours = named.is_some()
                && d.uid() == file.uid()
                && d.mode() & 0o1000 == 0
                && dir.parent().is_some();
            if ours {
                tracing::warn!(dir = %dir.display(), mode = format!("{:o}", d.mode() & 0o777), "the store's directory was open to others: now 0700");
                std::fs::set_permissions(dir, Permissions::from_mode(0o700)).with_context(
                    || format!("store.path: cannot make {} private", dir.display()),
                )?;
            } else {
                tracing::warn!(dir = %dir.display(), "the store's directory is shared with others; give the store a directory of its own");
            }
        }
        Ok(())
    }
}

pub struct EmbeddedStore {
    db: Arc<Database>,
    path: PathBuf,
    writes: std::sync::mpsc::Sender<Box<dyn Queued>>,
    committer: Option<std::thread::JoinHandle<()>>,
}

impl Drop for EmbeddedStore {
    /// Stops the committer once it has answered every queued change, so the file is free
    /// for whoever opens it next.
    fn drop(&mut self) {
        let (closed, _) = std::sync::mpsc::channel();
        drop(std::mem::replace(&mut self.writes, closed));
        if let Some(committer) = self.committer.take() {
            let _ = committer.join();
        }
    }
}

/// A change waiting for the committer: applied in its group's write transaction, then
/// answered once that transaction is durable, or failed with it.
trait Queued: Send {
    fn apply(&mut self, txn: &WriteTransaction) -> Result<(), redb::Error>;
    /// Sends the outcome, or `failure` (the group's transaction did not commit).
    fn answer(self: Box<Self>, failure: Option<&str>);
}

/// One change and its caller, typed by what the change answers.
struct Job<T, F> {
    work: F,
    outcome: Option<T>,
    reply: tokio::sync::oneshot::Sender<Result<T, StoreError>>,
}

impl<T, F> Queued for Job<T, F>
where
    T: Send,
    F: FnMut(&WriteTransaction) -> Result<T, redb::Error> + Send,
{
    fn apply(&mut self, txn: &WriteTransaction) -> Result<(), redb::Error> {
        self.outcome = Some((self.work)(txn)?);
        Ok(())
    }

    fn answer(self: Box<Self>, failure: Option<&str>) {
        let answer = match (failure, self.outcome) {
            (None, Some(outcome)) => Ok(outcome),
            (failure, _) => Err(StoreError::Unavailable(
                failure
                    .unwrap_or("the change's transaction did not commit")
                    .to_string(),
            )),
        };
        let _ = self.reply.send(answer);
    }
}

/// What a new record hangs under: the instance of a binding (at the version read), or the
/// service of a local instance. The documents' tables store it as the parent column, empty
/// for neither.
enum Owner {
    None,
    Parent(String, u64),
    Group(String),
}

/// The parent column's value: `None` for the empty string the tables store for none.
fn owner_of(column: &str) -> Option<&str> {
    Some(column).filter(|c| !c.is_empty())
}

/// Stores written before instances were grouped: each instance of a local service (one
/// with no upstream) gets its service id as parent and an entry in the group index.
fn group_instances(txn: &WriteTransaction) -> Result<(), redb::Error> {
    #[derive(serde::Deserialize)]
    struct Owner {
        service_id: String,
        #[serde(default)]
        upstream: Option<serde_json::Value>,
    }
    let mut instances = txn.open_table(INSTANCES)?;
    let mut index = txn.open_table(INSTANCES_BY_GROUP)?;
    let mut local = Vec::new();
    for entry in instances.iter()? {
        let (id, value) = entry?;
        let (version, _, doc) = value.value();
        if let Ok(owner) = serde_json::from_slice::<Owner>(doc) {
            if owner.upstream.is_none_or(|u| u.is_null()) {
                local.push((
                    id.value().to_string(),
                    version,
                    owner.service_id,
                    doc.to_vec(),
                ));
            }
        }
    }
    for (id, version, service, doc) in local {
        instances.insert(id.as_str(), (version, service.as_str(), doc.as_slice()))?;
        index.insert((service.as_str(), id.as_str()), ())?;
    }
    Ok(())
}

/// The most changes one commit takes.
const MAX_GROUP: usize = 1024;

/// Takes every change waiting, applies them in order in one write transaction, commits
/// (one fsync), then answers each. A failed commit fails every change in it.
fn committer(db: Arc<Database>, queue: std::sync::mpsc::Receiver<Box<dyn Queued>>) {
    while let Ok(first) = queue.recv() {
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match queue.try_recv() {
                Ok(next) => group.push(next),
                Err(_) => break,
            }
        }
        let applied = (|| {
            let txn = db.begin_write()?;
            for change in group.iter_mut() {
                change.apply(&txn)?;
            }
            txn.commit()?;
            Ok::<_, redb::Error>(())
        })();
        let failure = applied.err().map(|e| e.to_string());
        for change in group {
            change.answer(failure.as_deref());
        }
    }
}

fn insert(
    txn: &WriteTransaction,
    table: Table,
    id: &str,
    owner: &Owner,
    doc: &[u8],
) -> Result<Insert, redb::Error> {
    let mut t = txn.open_table(docs(table))?;
    let existing = t.get(id)?.map(|v| {
        let (version, _, doc) = v.value();
        Versioned {
            version,
            doc: doc.to_vec(),
        }
    });
    if let Some(existing) = existing {
        return Ok(Insert::Exists(existing));
    }
    if let Owner::Parent(pid, pversion) = owner {
        let instances = txn.open_table(INSTANCES)?;
        let current = instances.get(pid.as_str())?.map(|v| v.value().0);
        if current != Some(*pversion) {
            return Ok(Insert::ParentChanged);
        }
    }
    let (column, index) = match owner {
        Owner::None => ("", None),
        Owner::Parent(pid, _) => (pid.as_str(), Some(BINDINGS_BY_INSTANCE)),
        Owner::Group(group) => (group.as_str(), Some(INSTANCES_BY_GROUP)),
    };
    t.insert(id, (1u64, column, doc))?;
    if let Some(index) = index {
        txn.open_table(index)?.insert((column, id), ())?;
    }
    Ok(Insert::Inserted)
}

/// The record's parent (or group) when it is at `version`; `None` when it is not.
fn parent_at(
    t: &redb::Table<'_, &'static str, (u64, &'static str, &'static [u8])>,
    id: &str,
    version: u64,
) -> Result<Option<String>, redb::Error> {
    Ok(t.get(id)?
        .filter(|v| v.value().0 == version)
        .map(|v| v.value().1.to_string()))
}

fn replace(
    txn: &WriteTransaction,
    table: Table,
    id: &str,
    version: u64,
    doc: &[u8],
) -> Result<bool, redb::Error> {
    let mut t = txn.open_table(docs(table))?;
    let Some(parent) = parent_at(&t, id, version)? else {
        return Ok(false);
    };
    t.insert(id, (version + 1, parent.as_str(), doc))?;
    Ok(true)
}

fn remove(
    txn: &WriteTransaction,
    table: Table,
    id: &str,
    version: u64,
) -> Result<bool, redb::Error> {
    let mut t = txn.open_table(docs(table))?;
    let Some(parent) = parent_at(&t, id, version)? else {
        return Ok(false);
    };
    t.remove(id)?;
    let mut index = txn.open_table(BINDINGS_BY_INSTANCE)?;
    match owner_of(&parent) {
        Some(group) if table == Table::Instances => {
            let mut groups = txn.open_table(INSTANCES_BY_GROUP)?;
            groups.remove((group, id))?;
        }
        Some(instance) => {
            index.remove((instance, id))?;
        }
        None => {}
    }
    if table == Table::Instances {
        let mut bindings = txn.open_table(BINDINGS)?;
        let mut children = Vec::new();
        for entry in index.range((id, "")..)? {
            let (key, _) = entry?;
            let (parent, binding) = key.value();
            if parent != id {
                break;
            }
            children.push(binding.to_string());
        }
        for child in children {
            bindings.remove(child.as_str())?;
            index.remove((id, child.as_str()))?;
        }
    }
    Ok(true)
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

impl EmbeddedStore {
    /// Opens (or creates) the file, with a page cache of at most `cache_bytes`. It holds every binding's credentials: it is created
    /// 0600 in a directory created 0700, and both are tightened (with a warning) when found
    /// looser.
    pub fn open(path: &Path, cache_bytes: usize) -> anyhow::Result<Self> {
        private::prepare(path)?;
        let db = Database::builder()
            .set_cache_size(cache_bytes)
            .create(path)
            .with_context(|| format!("store.path: cannot open {}", path.display()))?;
        Self::with_tables(db, path.to_path_buf())
    }

    /// A store that lives and dies with the process, for commands that only look.
    pub fn in_memory() -> anyhow::Result<Self> {
        let db = Database::builder().create_with_backend(redb::backends::InMemoryBackend::new())?;
        Self::with_tables(db, PathBuf::from("(memory)"))
    }

    fn with_tables(db: Database, path: PathBuf) -> anyhow::Result<Self> {
        let txn = db.begin_write()?;
        let grouped = txn
            .list_tables()?
            .any(|t| t.name() == INSTANCES_BY_GROUP.name());
        if !grouped {
            group_instances(&txn).context("store: indexing the instances of each service")?;
        }
        txn.open_table(INSTANCES)?;
        txn.open_table(BINDINGS)?;
        txn.open_table(CATALOGS)?;
        txn.open_table(LEASES)?;
        txn.open_table(LOGS)?;
        txn.open_table(BINDINGS_BY_INSTANCE)?;
        txn.commit()?;
        let db = Arc::new(db);
        let (writes, queue) = std::sync::mpsc::channel();
        let for_committer = db.clone();
        let committer = std::thread::Builder::new()
            .name("store-committer".into())
            .spawn(move || committer(for_committer, queue))?;
        Ok(Self {
            db,
            path,
            writes,
            committer: Some(committer),
        })
    }

    /// Queues a change for the committer and waits until it is durable.
    async fn change<T: Send + 'static>(
        &self,
        work: impl FnMut(&WriteTransaction) -> Result<T, redb::Error> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (reply, outcome) = tokio::sync::oneshot::channel();
        let job = Job {
            work,
            outcome: None,
            reply,
        };
        self.writes
            .send(Box::new(job))
            .map_err(|_| unavailable("the store's committer has stopped"))?;
        outcome
            .await
            .map_err(|_| unavailable("the store's committer has stopped"))?
    }

    async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Database) -> Result<T, redb::Error> + Send + 'static,
    ) -> Result<T, StoreError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || work(&db))
            .await
            .map_err(unavailable)?
            .map_err(unavailable)
    }
}

#[async_trait]
impl StateStore for EmbeddedStore {
    fn describe(&self) -> String {
        format!("embedded store {}", self.path.display())
    }

    async fn check(&self) -> Result<(), StoreError> {
        self.blocking(|db| {
            let txn = db.begin_read()?;
            txn.open_table(INSTANCES)?;
            Ok(())
        })
        .await
    }

    async fn get(&self, table: Table, id: &str) -> Result<Option<Versioned>, StoreError> {
        let id = id.to_string();
        self.blocking(move |db| {
            let txn = db.begin_read()?;
            let t = txn.open_table(docs(table))?;
            Ok(t.get(id.as_str())?.map(|v| {
                let (version, _, doc) = v.value();
                Versioned {
                    version,
                    doc: doc.to_vec(),
                }
            }))
        })
        .await
    }

    async fn insert(
        &self,
        table: Table,
        id: &str,
        link: Link<'_>,
        doc: &[u8],
    ) -> Result<Insert, StoreError> {
        let owner = match link {
            Link::None => Owner::None,
            Link::Parent(p, v) => Owner::Parent(p.to_string(), v),
            Link::Group(group) => Owner::Group(group.to_string()),
        };
        let (id, doc) = (id.to_string(), doc.to_vec());
        self.change(move |txn| insert(txn, table, &id, &owner, &doc))
            .await
    }

    async fn replace(
        &self,
        table: Table,
        id: &str,
        version: u64,
        doc: &[u8],
    ) -> Result<bool, StoreError> {
        let (id, doc) = (id.to_string(), doc.to_vec());
        self.change(move |txn| replace(txn, table, &id, version, &doc))
            .await
    }

    async fn remove(&self, table: Table, id: &str, version: u64) -> Result<bool, StoreError> {
        let id = id.to_string();
        self.change(move |txn| remove(txn, table, &id, version))
            .await
    }

    async fn page(
        &self,
        group: &str,
        after: &str,
        limit: usize,
    ) -> Result<Vec<(String, Versioned)>, StoreError> {
        let (group, after) = (group.to_string(), after.to_string());
        self.blocking(move |db| {
            let txn = db.begin_read()?;
            let index = txn.open_table(INSTANCES_BY_GROUP)?;
            let instances = txn.open_table(INSTANCES)?;
            let mut out = Vec::new();
            let start = (group.as_str(), after.as_str());
            for entry in index.range(start..)? {
                let (key, _) = entry?;
                let (g, id) = key.value();
                if g != group || out.len() == limit {
                    break;
                }
                if id == after {
                    continue;
                }
                if let Some(v) = instances.get(id)? {
                    let (version, _, doc) = v.value();
                    let doc = doc.to_vec();
                    out.push((id.to_string(), Versioned { version, doc }));
                }
            }
            Ok(out)
        })
        .await
    }

    async fn bindings_of(&self, instance_id: &str) -> Result<Vec<(String, Versioned)>, StoreError> {
        let instance_id = instance_id.to_string();
        self.blocking(move |db| {
            let txn = db.begin_read()?;
            let index = txn.open_table(BINDINGS_BY_INSTANCE)?;
            let bindings = txn.open_table(BINDINGS)?;
            let mut out = Vec::new();
            for entry in index.range((instance_id.as_str(), "")..)? {
                let (key, _) = entry?;
                let (parent, binding) = key.value();
                if parent != instance_id {
                    break;
                }
                if let Some(v) = bindings.get(binding)? {
                    let (version, _, doc) = v.value();
                    out.push((
                        binding.to_string(),
                        Versioned {
                            version,
                            doc: doc.to_vec(),
                        },
                    ));
                }
            }
            Ok(out)
        })
        .await
    }
}
