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
use mysql_async::{Conn, Pool};

use super::{Insert, Link, StateStore, StoreError, Table, Versioned};
use crate::mysql::{self, SqlError};

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

/// Whether a statement refused with error 1213 (a deadlock on one server; on Galera, a lost
/// certification: either way it was rolled back) is run again: at most [`CONFLICT_RETRIES`]
/// times, after a jittered, growing wait. The one retry policy for every store statement.
struct Conflicts {
    what: &'static str,
    retries: u32,
}

impl Conflicts {
    fn new(what: &'static str) -> Self {
        Conflicts { what, retries: 0 }
    }

    /// Waits and answers true when `result` lost a conflict that may be retried.
    async fn again<T>(&mut self, result: &Result<T, SqlError>) -> bool {
        if !matches!(result, Err(SqlError::Server { code: 1213, .. }))
            || self.retries >= CONFLICT_RETRIES
        {
            return false;
        }
        self.retries += 1;
        let most = (2u64 << self.retries).min(200);
        tracing::debug!(
            what = self.what,
            retries = self.retries,
            "store write lost a conflict; running it again"
        );
        tokio::time::sleep(Duration::from_millis(rand::random_range(1..=most))).await;
        true
    }
}

/// Runs `attempt` (one statement on a pooled connection) under [`Conflicts`].
async fn certified<T, F, Fut>(what: &'static str, mut attempt: F) -> Result<T, SqlError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, SqlError>>,
{
    let mut conflicts = Conflicts::new(what);
    loop {
        let result = attempt().await;
        if !conflicts.again(&result).await {
            return result;
        }
    }
}

pub struct MysqlStore {
    pool: Pool,
    describe: String,
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
        let describe = format!(
            "mysql store {}",
            crate::config::redact_url(url).unwrap_or_default()
        );
        let pool = mysql::pool(url, 20, None)?;
        let store = MysqlStore { pool, describe };
        let migrate = async {
            let mut conn = match store.conn().await {
                Err(SqlError::Server { code: 1049, .. }) => {
                    mysql::create_database_of(url, TIMEOUT).await?;
                    store.conn().await?
                }
                other => other?,
            };
            migrate(&mut conn).await
        };
        migrate
            .await
            .map_err(|e| anyhow::anyhow!("store.url ({}): {e}", store.describe))?;
        Ok(store)
    }

    async fn conn(&self) -> Result<Conn, SqlError> {
        mysql::conn(&self.pool, TIMEOUT).await
    }
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
    let mut conflicts = Conflicts::new("migration");
    loop {
        let result = conn.query_drop(statement).await.map_err(SqlError::from);
        if conflicts.again(&result).await {
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
        let mut conn = self.conn().await?;
        conn.query_drop("SELECT 1 FROM brokerage_instances LIMIT 1")
            .await
            .map_err(SqlError::from)?;
        Ok(())
    }

    async fn get(&self, t: Table, id: &str) -> Result<Option<Versioned>, StoreError> {
        let mut conn = self.conn().await?;
        let row: Option<(u64, Vec<u8>)> = conn
            .exec_first(
                format!("SELECT version, doc FROM {} WHERE id = ?", table(t)),
                (id,),
            )
            .await
            .map_err(SqlError::from)?;
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
        loop {
            let inserted = certified("insert", || async {
                let mut conn = self.conn().await?;
                let result = match link {
                    Link::Parent(pid, pversion) => conn
                        .exec_drop(
                            format!(
                                "INSERT INTO {} (id, parent, version, doc)
                             SELECT ?, id, 1, ? FROM brokerage_instances
                             WHERE id = ? AND version = ?",
                                table(t)
                            ),
                            (id, doc, pid, pversion),
                        )
                        .await
                        .map(|()| conn.affected_rows()),
                    Link::None | Link::Group(_) => {
                        let group = match link {
                            Link::Group(group) => group,
                            _ => "",
                        };
                        conn.exec_drop(
                            format!(
                                "INSERT INTO {} (id, parent, version, doc) VALUES (?, ?, 1, ?)",
                                table(t)
                            ),
                            (id, group, doc),
                        )
                        .await
                        .map(|()| conn.affected_rows())
                    }
                };
                result.map_err(SqlError::from)
            })
            .await;
            return match inserted {
                Ok(1) => Ok(Insert::Inserted),
                Ok(_) => Ok(Insert::ParentChanged),
                Err(SqlError::Server { code: 1062, .. }) => match self.get(t, id).await? {
                    Some(existing) => Ok(Insert::Exists(existing)),
                    // Removed between the two statements: try again.
                    None => continue,
                },
                Err(e) => Err(e.into()),
            };
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
        let changed = certified("replace", || async {
            let mut conn = self.conn().await?;
            conn.exec_drop(statement.as_str(), (doc, id, version))
                .await
                .map_err(SqlError::from)?;
            Ok(conn.affected_rows())
        })
        .await?;
        Ok(changed == 1)
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
        let removed = certified("remove", || async {
            let mut conn = self.conn().await?;
            conn.exec_drop(statement.as_str(), (id, version))
                .await
                .map_err(SqlError::from)?;
            Ok(conn.affected_rows())
        })
        .await?;
        Ok(removed >= 1)
    }

    async fn page(
        &self,
        group: &str,
        after: &str,
        limit: usize,
    ) -> Result<Vec<(String, Versioned)>, StoreError> {
        let mut conn = self.conn().await?;
        let rows: Vec<(String, u64, Vec<u8>)> = conn
            .exec(
                "SELECT id, version, doc FROM brokerage_instances
                 WHERE parent = ? AND id > ? ORDER BY id LIMIT ?",
                (group, after, limit as u64),
            )
            .await
            .map_err(SqlError::from)?;
        Ok(rows
            .into_iter()
            .map(|(id, version, doc)| (id, Versioned { version, doc }))
            .collect())
    }

    async fn bindings_of(&self, instance_id: &str) -> Result<Vec<(String, Versioned)>, StoreError> {
        let mut conn = self.conn().await?;
        let rows: Vec<(String, u64, Vec<u8>)> = conn
            .exec(
                "SELECT id, version, doc FROM brokerage_bindings WHERE parent = ? ORDER BY id",
                (instance_id,),
            )
            .await
            .map_err(SqlError::from)?;
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

    #[tokio::test]
    async fn a_lost_conflict_is_run_again_a_bounded_number_of_times() {
        let mut calls = 0;
        let result = certified("test", || {
            calls += 1;
            let answer = if calls < 3 {
                Err(conflict())
            } else {
                Ok(calls)
            };
            async move { answer }
        })
        .await;
        assert_eq!(result.unwrap(), 3, "won on the third attempt");

        let mut calls = 0;
        let result: Result<(), _> = certified("test", || {
            calls += 1;
            async { Err(conflict()) }
        })
        .await;
        assert!(matches!(result, Err(SqlError::Server { code: 1213, .. })));
        assert_eq!(
            calls,
            1 + CONFLICT_RETRIES,
            "then the conflict is the answer"
        );

        let mut calls = 0;
        let result: Result<(), _> = certified("test", || {
            calls += 1;
            async {
                Err(SqlError::Server {
                    code: 1062,
                    message: "Duplicate".into(),
                })
            }
        })
        .await;
        assert!(matches!(result, Err(SqlError::Server { code: 1062, .. })));
        assert_eq!(calls, 1, "other refusals are not retried");
    }
}
