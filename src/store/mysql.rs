//! The shared store: five tables (instances, bindings, catalogs, leases, logs) in a MySQL/MariaDB database that every broker process
//! behind a load balancer uses. The broker creates the database when it may, and migrates
//! its tables on start.
//!
//! On a Galera cluster (the seed's own MySQL) two things differ from one server, and both
//! are handled here, once, for every statement:
//! - a write that loses certification against another node's concurrent write is rolled
//!   back and reported as error 1213; it is run again (bounded, with jitter), and then
//!   meets the winner's row as it would on one server (a duplicate id, a version moved on);
//! - `GET_LOCK` holds only on the node that takes it, so migrations do not rely on it:
//!   every migration statement can run twice, also at once on two nodes.

use std::time::Duration;

use async_trait::async_trait;
use mysql_async::prelude::*;
use mysql_async::Conn;

use super::{Insert, Link, StateStore, StoreError, Table, Versioned};
use crate::mysql::{self, Nodes, SqlError};

const MIGRATIONS: &[&[&str]] = &[
    &[
        "CREATE TABLE IF NOT EXISTS brokerage_instances (
        id VARCHAR(255) CHARACTER SET ascii COLLATE ascii_bin NOT NULL PRIMARY KEY,
        parent VARCHAR(255) CHARACTER SET ascii COLLATE ascii_bin NOT NULL DEFAULT '',
        version BIGINT UNSIGNED NOT NULL,
        doc LONGBLOB NOT NULL
    ) ENGINE=InnoDB",
        "CREATE TABLE IF NOT EXISTS brokerage_bindings (
        id VARCHAR(255) CHARACTER SET ascii COLLATE ascii_bin NOT NULL PRIMARY KEY,
        parent VARCHAR(255) CHARACTER SET ascii COLLATE ascii_bin NOT NULL DEFAULT '',
        version BIGINT UNSIGNED NOT NULL,
        doc LONGBLOB NOT NULL,
        INDEX by_parent (parent)
    ) ENGINE=InnoDB",
    ],
    &["CREATE TABLE IF NOT EXISTS brokerage_catalogs (
        id VARCHAR(255) CHARACTER SET ascii COLLATE ascii_bin NOT NULL PRIMARY KEY,
        parent VARCHAR(255) CHARACTER SET ascii COLLATE ascii_bin NOT NULL DEFAULT '',
        version BIGINT UNSIGNED NOT NULL,
        doc LONGBLOB NOT NULL
    ) ENGINE=InnoDB"],
    &["CREATE TABLE IF NOT EXISTS brokerage_leases (
        id VARCHAR(255) CHARACTER SET ascii COLLATE ascii_bin NOT NULL PRIMARY KEY,
        parent VARCHAR(255) CHARACTER SET ascii COLLATE ascii_bin NOT NULL DEFAULT '',
        version BIGINT UNSIGNED NOT NULL,
        doc LONGBLOB NOT NULL
    ) ENGINE=InnoDB"],
    // An instance of a local service records its service id in `parent`, so periodic
    // jobs page through one service's instances by index; existing rows are filled in.
    &[
        "ALTER TABLE brokerage_instances ADD INDEX by_group (parent, id)",
        "UPDATE brokerage_instances
         SET parent = JSON_UNQUOTE(JSON_EXTRACT(CONVERT(doc USING utf8mb4), '$.service_id'))
         WHERE parent = ''
           AND COALESCE(JSON_TYPE(JSON_EXTRACT(CONVERT(doc USING utf8mb4), '$.upstream')), 'NULL') = 'NULL'",
    ],
    // Application logs: each log instance's recent lines, and the apps that feed them.
    &["CREATE TABLE IF NOT EXISTS brokerage_logs (
        id VARCHAR(255) CHARACTER SET ascii COLLATE ascii_bin NOT NULL PRIMARY KEY,
        parent VARCHAR(255) CHARACTER SET ascii COLLATE ascii_bin NOT NULL DEFAULT '',
        version BIGINT UNSIGNED NOT NULL,
        doc LONGBLOB NOT NULL
    ) ENGINE=InnoDB"],
];

const TIMEOUT: Duration = Duration::from_secs(10);

/// How often a statement that lost certification (Galera's 1213) is run again.
const CONFLICT_RETRIES: u32 = 8;

/// Whether a statement that failed is run again: one refused with error 1213 (a deadlock
/// on one server; on Galera, a lost certification: either way it was rolled back) at most
/// [`CONFLICT_RETRIES`] times after a jittered, growing wait; one a node refused because it
/// cannot serve, or a read whose connection broke, at once on the next node, as many times
/// as there are nodes (so the last try is on the node that failed first: on one server, a
/// stale pooled connection is followed by another).
/// The one retry policy for every store statement.
struct Retry {
    what: &'static str,
    conflicts: u32,
    nodes: usize,
    moves: usize,
}

impl Retry {
    fn new(what: &'static str, nodes: usize) -> Self {
        Retry {
            what,
            conflicts: 0,
            nodes,
            moves: 0,
        }
    }

    /// Waits and answers true when `result` failed in a way that may be run again. A write
    /// whose connection broke is not: it may have run, and the caller reads to decide.
    async fn again<T>(&mut self, result: &Result<T, SqlError>, write: bool) -> bool {
        match result {
            Err(SqlError::Server { code: 1213, .. }) if self.conflicts < CONFLICT_RETRIES => {
                self.conflicts += 1;
                crate::metrics::MYSQL
                    .conflicts
                    .get_or_create(&crate::metrics::StatementLabels {
                        statement: self.what,
                    })
                    .inc();
                let most = (2u64 << self.conflicts).min(200);
                tracing::debug!(
                    what = self.what,
                    retries = self.conflicts,
                    "store write lost a conflict; running it again"
                );
                tokio::time::sleep(Duration::from_millis(rand::random_range(1..=most))).await;
                true
            }
            Err(e) if self.moves < self.nodes => {
                let lost_read = matches!(e, SqlError::Lost(_)) && !write;
                if e.node_cannot_serve() || lost_read {
                    self.moves += 1;
                    return true;
                }
                false
            }
            _ => false,
        }
    }
}

pub struct MysqlStore {
    nodes: Nodes,
    describe: String,
    /// On Galera, what makes a read wait until the node has applied every write the
    /// cluster committed before it (read-your-writes across nodes); empty elsewhere.
    fresh: &'static str,
}

fn table(t: Table) -> &'static str {
    match t {
        Table::Instances => "brokerage_instances",
        Table::Bindings => "brokerage_bindings",
        Table::Catalogs => "brokerage_catalogs",
        Table::Leases => "brokerage_leases",
        Table::Logs => "brokerage_logs",
    }
}

impl From<SqlError> for StoreError {
    fn from(e: SqlError) -> Self {
        StoreError::Unavailable(e.to_string())
    }
}

impl MysqlStore {
    /// Connects, creates the database if it is missing, and migrates the schema.
    pub async fn connect(url: &str) -> anyhow::Result<Self> {
        let describe = format!("mysql store {}", mysql::redact(url));
        let mut store = MysqlStore {
            nodes: Nodes::new(url, 20, None, &[])?,
            describe,
            fresh: "",
        };
        let migrate = async {
            let mut conn = match store.nodes.conn(TIMEOUT).await {
                Err(SqlError::Server { code: 1049, .. }) => {
                    create_database(url).await?;
                    store.nodes.conn(TIMEOUT).await?
                }
                other => other?,
            };
            let node = conn.node;
            let galera = is_galera(&mut conn)
                .await
                .map_err(|e| store.nodes.failed(node, e))?;
            migrate(&mut conn)
                .await
                .map_err(|e| store.nodes.failed(node, e))?;
            Ok::<_, SqlError>(galera)
        };
        let galera = migrate
            .await
            .map_err(|e| anyhow::anyhow!("store.url ({}): {e}", store.describe))?;
        if galera {
            store.fresh = "SET STATEMENT wsrep_sync_wait = 1 FOR ";
            tracing::info!(
                nodes = store.nodes.count(),
                "the store is on a Galera cluster: record reads wait for the cluster's writes"
            );
        }
        Ok(store)
    }

    /// Runs one statement under [`Retry`] on a connection from the node in use; `attempt`
    /// is given the connection and answers the statement's result.
    async fn run<T, F, Fut>(
        &self,
        what: &'static str,
        write: bool,
        mut attempt: F,
    ) -> Result<T, SqlError>
    where
        F: FnMut(Conn) -> Fut,
        Fut: std::future::Future<Output = Result<T, mysql_async::Error>>,
    {
        let mut retry = Retry::new(what, self.nodes.count());
        loop {
            let result = match self.nodes.conn(TIMEOUT).await {
                Ok(conn) => {
                    let node = conn.node;
                    attempt(conn.conn)
                        .await
                        .map_err(|e| self.nodes.failed(node, SqlError::of_statement(e)))
                }
                Err(e) => Err(e),
            };
            if !retry.again(&result, write).await {
                return result;
            }
        }
    }

    /// Reads a record as the cluster has it now, to decide a write whose connection broke.
    async fn read_back(&self, t: Table, id: &str) -> Result<Option<Versioned>, StoreError> {
        crate::metrics::MYSQL.lost_writes.inc();
        self.get(t, id).await
    }
}

/// Whether the server is a node of a Galera cluster (MySQL has no `wsrep_on`: 1193).
async fn is_galera(conn: &mut Conn) -> Result<bool, SqlError> {
    match conn.query_first::<i64, _>("SELECT @@wsrep_on").await {
        Ok(on) => Ok(on == Some(1)),
        Err(mysql_async::Error::Server(s)) if s.code == 1193 => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Creates the store's database through the first node that answers.
async fn create_database(url: &str) -> Result<(), SqlError> {
    let mut last = None;
    for node in mysql::node_urls(url) {
        match mysql::create_database_of(&node, TIMEOUT).await {
            Ok(()) => return Ok(()),
            Err(e) if e.is_unreachable() || e.node_cannot_serve() => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| SqlError::Other("no node".into())))
}

/// Brings the schema up to date. The named lock keeps processes on one server from doing
/// the work twice; on a Galera cluster it holds per node only, so each statement is one
/// that can run again (`IF NOT EXISTS`, an index already there, an `UPDATE` of rows not yet
/// filled in, `INSERT IGNORE` of the version) and two nodes migrating at once both succeed.
async fn migrate(conn: &mut Conn) -> Result<(), SqlError> {
    let locked: Option<i64> = conn
        .query_first("SELECT GET_LOCK('brokerage_schema', 30)")
        .await?;
    if locked != Some(1) {
        return Err(SqlError::Other(
            "could not take the schema migration lock within 30 s".into(),
        ));
    }
    let result = migrate_locked(conn).await;
    conn.query_drop("SELECT RELEASE_LOCK('brokerage_schema')")
        .await?;
    result
}

async fn migrate_locked(conn: &mut Conn) -> Result<(), SqlError> {
    run_again(
        conn,
        "CREATE TABLE IF NOT EXISTS brokerage_migrations (
            version INT NOT NULL PRIMARY KEY,
            applied_at TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP
        ) ENGINE=InnoDB",
    )
    .await?;
    let current: Option<i64> = conn
        .query_first("SELECT COALESCE(MAX(version), 0) FROM brokerage_migrations")
        .await?;
    for (i, statements) in MIGRATIONS.iter().enumerate() {
        let version = i as i64 + 1;
        if version <= current.unwrap_or(0) {
            continue;
        }
        for statement in *statements {
            run_again(conn, statement).await?;
        }
        run_again(
            conn,
            &format!("INSERT IGNORE INTO brokerage_migrations (version) VALUES ({version})"),
        )
        .await?;
    }
    Ok(())
}

/// Runs a migration statement that another process may have run already, or may be
/// running on another node: an index that exists (1061) is what it makes.
async fn run_again(conn: &mut Conn, statement: &str) -> Result<(), SqlError> {
    let mut retry = Retry::new("migration", 0);
    loop {
        let result = conn.query_drop(statement).await.map_err(SqlError::from);
        if retry.again(&result, true).await {
            continue;
        }
        return match result {
            Err(SqlError::Server { code: 1061, .. }) => Ok(()),
            other => other,
        };
    }
}

#[async_trait]
impl StateStore for MysqlStore {
    fn describe(&self) -> String {
        self.describe.clone()
    }

    async fn check(&self) -> Result<(), StoreError> {
        self.run("check", false, |mut conn| async move {
            conn.query_drop("SELECT 1 FROM brokerage_instances LIMIT 1")
                .await
        })
        .await?;
        Ok(())
    }

    async fn get(&self, t: Table, id: &str) -> Result<Option<Versioned>, StoreError> {
        // Every record read sees what any process acknowledged before it (see ARCHITECTURE).
        let statement = format!(
            "{}SELECT version, doc FROM {} WHERE id = ?",
            self.fresh,
            table(t)
        );
        let statement = statement.as_str();
        let row: Option<(u64, Vec<u8>)> = self
            .run("get", false, |mut conn| async move {
                conn.exec_first(statement, (id,)).await
            })
            .await?;
        Ok(row.map(|(version, doc)| Versioned { version, doc }))
    }

    async fn insert(
        &self,
        t: Table,
        id: &str,
        link: Link<'_>,
        doc: &[u8],
    ) -> Result<Insert, StoreError> {
        // One statement, one round trip, committed on its own: a binding is selected into
        // place only from its instance at the version read (none selected: the parent
        // changed); a duplicate id is the server's error 1062.
        let (statement, group, parent) = match link {
            Link::Parent(pid, pversion) => (
                format!(
                    "INSERT INTO {} (id, parent, version, doc)
                     SELECT ?, id, 1, ? FROM brokerage_instances WHERE id = ? AND version = ?",
                    table(t)
                ),
                "",
                Some((pid, pversion)),
            ),
            Link::None | Link::Group(_) => (
                format!(
                    "INSERT INTO {} (id, parent, version, doc) VALUES (?, ?, 1, ?)",
                    table(t)
                ),
                match link {
                    Link::Group(group) => group,
                    _ => "",
                },
                None,
            ),
        };
        let statement = statement.as_str();
        loop {
            let inserted = self
                .run("insert", true, |mut conn| async move {
                    match parent {
                        Some((pid, pversion)) => {
                            conn.exec_drop(statement, (id, doc, pid, pversion)).await?
                        }
                        None => conn.exec_drop(statement, (id, group, doc)).await?,
                    }
                    Ok(conn.affected_rows())
                })
                .await;
            let existing = match inserted {
                Ok(1) => return Ok(Insert::Inserted),
                Ok(_) => return Ok(Insert::ParentChanged),
                Err(SqlError::Server { code: 1062, .. }) => self.get(t, id).await?,
                Err(SqlError::Lost(_)) => match self.read_back(t, id).await? {
                    // Ours, committed before the connection broke.
                    Some(found) if found.version == 1 && found.doc == doc => {
                        return Ok(Insert::Inserted)
                    }
                    other => other,
                },
                Err(e) => return Err(e.into()),
            };
            match existing {
                Some(existing) => return Ok(Insert::Exists(existing)),
                // Removed between the two statements, or never written: try again.
                None => continue,
            }
        }
    }

    async fn replace(
        &self,
        t: Table,
        id: &str,
        version: u64,
        doc: &[u8],
    ) -> Result<bool, StoreError> {
        let statement = format!(
            "UPDATE {} SET version = version + 1, doc = ? WHERE id = ? AND version = ?",
            table(t)
        );
        let statement = statement.as_str();
        loop {
            let changed = self
                .run("replace", true, |mut conn| async move {
                    conn.exec_drop(statement, (doc, id, version)).await?;
                    Ok(conn.affected_rows())
                })
                .await;
            return match changed {
                Ok(changed) => Ok(changed == 1),
                Err(SqlError::Lost(_)) => match self.read_back(t, id).await? {
                    Some(found) if found.version == version => continue,
                    Some(found) => Ok(found.version == version + 1 && found.doc == doc),
                    None => Ok(false),
                },
                Err(e) => Err(e.into()),
            };
        }
    }

    async fn remove(&self, t: Table, id: &str, version: u64) -> Result<bool, StoreError> {
        // One statement: an instance goes with its bindings.
        let statement = match t {
            Table::Instances => "DELETE i, b FROM brokerage_instances i
                 LEFT JOIN brokerage_bindings b ON b.parent = i.id
                 WHERE i.id = ? AND i.version = ?"
                .to_string(),
            _ => format!("DELETE FROM {} WHERE id = ? AND version = ?", table(t)),
        };
        let statement = statement.as_str();
        loop {
            let removed = self
                .run("remove", true, |mut conn| async move {
                    conn.exec_drop(statement, (id, version)).await?;
                    Ok(conn.affected_rows())
                })
                .await;
            return match removed {
                Ok(removed) => Ok(removed >= 1),
                Err(SqlError::Lost(_)) => match self.read_back(t, id).await? {
                    Some(found) if found.version == version => continue,
                    Some(_) => Ok(false),
                    None => Ok(true),
                },
                Err(e) => Err(e.into()),
            };
        }
    }

    async fn page(
        &self,
        group: &str,
        after: &str,
        limit: usize,
    ) -> Result<Vec<(String, Versioned)>, StoreError> {
        let rows: Vec<(String, u64, Vec<u8>)> = self
            .run("page", false, |mut conn| async move {
                conn.exec(
                    "SELECT id, version, doc FROM brokerage_instances
                     WHERE parent = ? AND id > ? ORDER BY id LIMIT ?",
                    (group, after, limit as u64),
                )
                .await
            })
            .await?;
        Ok(rows
            .into_iter()
            .map(|(id, version, doc)| (id, Versioned { version, doc }))
            .collect())
    }

    async fn bindings_of(&self, instance_id: &str) -> Result<Vec<(String, Versioned)>, StoreError> {
        let statement = format!(
            "{}SELECT id, version, doc FROM brokerage_bindings WHERE parent = ? ORDER BY id",
            self.fresh
        );
        let statement = statement.as_str();
        let rows: Vec<(String, u64, Vec<u8>)> = self
            .run("bindings_of", false, |mut conn| async move {
                conn.exec(statement, (instance_id,)).await
            })
            .await?;
        Ok(rows
            .into_iter()
            .map(|(id, version, doc)| (id, Versioned { version, doc }))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conflict() -> SqlError {
        SqlError::Server {
            code: 1213,
            message: "Deadlock found when trying to get lock".into(),
        }
    }

    /// Runs `attempt` under [`Retry`] as [`MysqlStore::run`] does, without a server.
    async fn retried<T>(
        nodes: usize,
        write: bool,
        mut attempt: impl FnMut() -> Result<T, SqlError>,
    ) -> Result<T, SqlError> {
        let mut retry = Retry::new("test", nodes);
        loop {
            let result = attempt();
            if !retry.again(&result, write).await {
                return result;
            }
        }
    }

    #[tokio::test]
    async fn a_lost_conflict_is_run_again_a_bounded_number_of_times() {
        let mut calls = 0;
        let result = retried(1, true, || {
            calls += 1;
            if calls < 3 {
                Err(conflict())
            } else {
                Ok(calls)
            }
        })
        .await;
        assert_eq!(result.unwrap(), 3, "won on the third attempt");

        let mut calls = 0;
        let result: Result<(), _> = retried(1, true, || {
            calls += 1;
            Err(conflict())
        })
        .await;
        assert!(matches!(result, Err(SqlError::Server { code: 1213, .. })));
        assert_eq!(
            calls,
            1 + CONFLICT_RETRIES,
            "then the conflict is the answer"
        );

        let mut calls = 0;
        let result: Result<(), _> = retried(1, true, || {
            calls += 1;
            Err(SqlError::Server {
                code: 1062,
                message: "Duplicate".into(),
            })
        })
        .await;
        assert!(matches!(result, Err(SqlError::Server { code: 1062, .. })));
        assert_eq!(calls, 1, "other refusals are not retried");
    }

    #[tokio::test]
    async fn a_node_that_cannot_serve_is_left_for_each_other_node_once() {
        let refused = || SqlError::Server {
            code: 1047,
            message: "WSREP has not yet prepared node for application use".into(),
        };
        let mut calls = 0;
        let result: Result<(), _> = retried(3, true, || {
            calls += 1;
            Err(refused())
        })
        .await;
        assert!(result.unwrap_err().node_cannot_serve());
        assert_eq!(
            calls, 4,
            "the first node and then one try on each of three more"
        );

        let lost = || SqlError::Lost("connection reset".into());
        let mut calls = 0;
        let result: Result<(), _> = retried(3, false, || {
            calls += 1;
            Err(lost())
        })
        .await;
        assert!(matches!(result, Err(SqlError::Lost(_))));
        assert_eq!(calls, 4, "a read whose connection broke runs again");

        let mut calls = 0;
        let result: Result<(), _> = retried(3, true, || {
            calls += 1;
            Err(lost())
        })
        .await;
        assert!(matches!(result, Err(SqlError::Lost(_))));
        assert_eq!(
            calls, 1,
            "a write whose connection broke is decided by a read, never run blind"
        );
    }
}
