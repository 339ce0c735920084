//! The default store: one redb file owned by one broker process. Every change is a
//! write transaction committed with fsync before the call returns, so what the broker
//! acknowledged survives `kill -9` and power loss.

// redb's error type is large; it only travels the (disk-bound) error path.
#![allow(clippy::result_large_err)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use async_trait::async_trait;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::{Insert, StateStore, StoreError, Table, Versioned};

/// id -> (version, parent instance id or "", document)
type Docs = TableDefinition<'static, &'static str, (u64, &'static str, &'static [u8])>;
const INSTANCES: Docs = TableDefinition::new("instances");
const BINDINGS: Docs = TableDefinition::new("bindings");
const CATALOGS: Docs = TableDefinition::new("catalogs");
const LEASES: Docs = TableDefinition::new("leases");
/// (instance id, binding id) -> ()
const BINDINGS_BY_INSTANCE: TableDefinition<(&str, &str), ()> =
    TableDefinition::new("bindings_by_instance");

fn docs(table: Table) -> Docs {
    match table {
        Table::Instances => INSTANCES,
        Table::Bindings => BINDINGS,
        Table::Catalogs => CATALOGS,
        Table::Leases => LEASES,
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
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

impl EmbeddedStore {
    /// Opens (or creates) the file. It holds every binding's credentials: it is created
    /// 0600 in a directory created 0700, and both are tightened (with a warning) when found
    /// looser.
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        private::prepare(path)?;
        let db = Database::create(path)
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
        txn.open_table(INSTANCES)?;
        txn.open_table(BINDINGS)?;
        txn.open_table(CATALOGS)?;
        txn.open_table(LEASES)?;
        txn.open_table(BINDINGS_BY_INSTANCE)?;
        txn.commit()?;
        Ok(Self {
            db: Arc::new(db),
            path,
        })
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
        parent: Option<(&str, u64)>,
        doc: &[u8],
    ) -> Result<Insert, StoreError> {
        let (id, doc) = (id.to_string(), doc.to_vec());
        let parent = parent.map(|(p, v)| (p.to_string(), v));
        self.blocking(move |db| {
            let txn = db.begin_write()?;
            let outcome = {
                let mut t = txn.open_table(docs(table))?;
                let existing = t.get(id.as_str())?.map(|v| {
                    let (version, _, doc) = v.value();
                    Versioned {
                        version,
                        doc: doc.to_vec(),
                    }
                });
                if let Some(existing) = existing {
                    Insert::Exists(existing)
                } else {
                    let parent_ok = match &parent {
                        None => true,
                        Some((pid, pversion)) => {
                            let instances = txn.open_table(INSTANCES)?;
                            let current = instances.get(pid.as_str())?.map(|v| v.value().0);
                            current == Some(*pversion)
                        }
                    };
                    if parent_ok {
                        let pid = parent.as_ref().map(|(p, _)| p.as_str()).unwrap_or("");
                        t.insert(id.as_str(), (1u64, pid, doc.as_slice()))?;
                        if parent.is_some() {
                            let mut index = txn.open_table(BINDINGS_BY_INSTANCE)?;
                            index.insert((pid, id.as_str()), ())?;
                        }
                        Insert::Inserted
                    } else {
                        Insert::ParentChanged
                    }
                }
            };
            txn.commit()?;
            Ok(outcome)
        })
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
        self.blocking(move |db| {
            let txn = db.begin_write()?;
            let swapped = {
                let mut t = txn.open_table(docs(table))?;
                let parent = t
                    .get(id.as_str())?
                    .filter(|v| v.value().0 == version)
                    .map(|v| v.value().1.to_string());
                match parent {
                    Some(parent) => {
                        t.insert(id.as_str(), (version + 1, parent.as_str(), doc.as_slice()))?;
                        true
                    }
                    None => false,
                }
            };
            txn.commit()?;
            Ok(swapped)
        })
        .await
    }

    async fn remove(&self, table: Table, id: &str, version: u64) -> Result<bool, StoreError> {
        let id = id.to_string();
        self.blocking(move |db| {
            let txn = db.begin_write()?;
            let removed = {
                let mut t = txn.open_table(docs(table))?;
                let parent = t
                    .get(id.as_str())?
                    .filter(|v| v.value().0 == version)
                    .map(|v| v.value().1.to_string());
                match parent {
                    Some(parent) => {
                        t.remove(id.as_str())?;
                        let mut index = txn.open_table(BINDINGS_BY_INSTANCE)?;
                        if !parent.is_empty() {
                            index.remove((parent.as_str(), id.as_str()))?;
                        }
                        if table == Table::Instances {
                            let mut bindings = txn.open_table(BINDINGS)?;
                            let mut children = Vec::new();
                            for entry in index.range((id.as_str(), "")..)? {
                                let (key, _) = entry?;
                                let (parent, binding) = key.value();
                                if parent != id {
                                    break;
                                }
                                children.push(binding.to_string());
                            }
                            for child in children {
                                bindings.remove(child.as_str())?;
                                index.remove((id.as_str(), child.as_str()))?;
                            }
                        }
                        true
                    }
                    None => false,
                }
            };
            txn.commit()?;
            Ok(removed)
        })
        .await
    }

    async fn list(&self, table: Table) -> Result<Vec<(String, Versioned)>, StoreError> {
        self.blocking(move |db| {
            let txn = db.begin_read()?;
            let t = txn.open_table(docs(table))?;
            let mut out = Vec::new();
            for entry in t.iter()? {
                let (key, value) = entry?;
                let (version, _, doc) = value.value();
                out.push((
                    key.value().to_string(),
                    Versioned {
                        version,
                        doc: doc.to_vec(),
                    },
                ));
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
