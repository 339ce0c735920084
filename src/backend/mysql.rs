//! The MySQL backend (seed section 2.5): a database per instance, a user per binding with
//! the plan's `MAX_USER_CONNECTIONS`, storage checked against the plan on downgrade.
//!
//! Names are derived from ids, never taken from them: a database is `cf_<id>` only for
//! ids of `[a-z0-9-]`, otherwise a hash; a user is a hash of the binding id (MySQL 8
//! allows 32 characters). Grants escape `_` so one instance's grant never matches another
//! instance's database.

use async_trait::async_trait;
use mysql_async::prelude::*;
use mysql_async::Conn;
use rand::distr::{Alphanumeric, SampleString};
use serde_json::{json, Map, Value};
use tracing::instrument;

pub use super::{database_name, user_name};
use super::{scrub, Backend, BackendError, Binding, Bound, Endpoint, QuotaChange, Unbinding};
use crate::catalog::{ParametersOf, PlanLimits};
use crate::config::MysqlBackendConfig;
use crate::mysql::{self, NodeConn, Nodes, SqlError};

pub struct MysqlBackend {
    /// One server, or a Galera cluster's nodes (one in use at a time).
    nodes: Nodes,
    at: Endpoint,
    capacity_mb: Option<u64>,
    /// The CA of the server's TLS certificate, when the server is reached over TLS.
    ca_certificate: Option<String>,
}

const BIND_PARAMETERS: &[&str] = &["read-only"];

/// The privileges that can make a database grow: taken away at or over quota (SELECT,
/// DELETE, DROP and the rest stay, so data can be read and removed).
const GROW: &str = "INSERT, UPDATE, CREATE, ALTER, INDEX, CREATE TEMPORARY TABLES, CREATE VIEW, \
                    CREATE ROUTINE, TRIGGER, EVENT";

impl MysqlBackend {
    pub fn new(config: &MysqlBackendConfig) -> anyhow::Result<Self> {
        // Apps are handed the first node, unless `public_host` names the cluster's proxy.
        let first = mysql::node_urls(config.url.expose()).swap_remove(0);
        let at = Endpoint::of(
            "backends.mysql.url",
            &first,
            "mysql",
            3306,
            config.public_host.as_ref(),
            config.public_port,
            config.connect_timeout_secs,
        )?;
        let ca_certificate = config
            .ca_certificate
            .as_deref()
            .map(|path| super::read_ca("backends.mysql.ca_certificate", path))
            .transpose()?;
        Ok(MysqlBackend {
            nodes: Nodes::new(
                config.url.expose(),
                config.max_connections,
                ca_certificate.as_deref().map(str::as_bytes),
                // No statement waits for a lock past the operation's lease (both variables
                // exist on MariaDB and MySQL).
                &[format!(
                    "SET SESSION lock_wait_timeout = {0}, innodb_lock_wait_timeout = {0}",
                    super::LINGER_SECS
                )],
            )
            .map_err(|e| anyhow::anyhow!("backends.mysql.url: {e}"))?,
            at,
            capacity_mb: config.max_total_storage_mb,
            ca_certificate,
        })
    }

    /// A connection to the node in use, or to the next when the node gives none. A statement
    /// that fails on it fails the call (Cloud Controller retries, or the orphan cleanup
    /// does); the backend moves to another node only when it cannot connect.
    async fn conn(&self) -> Result<NodeConn, BackendError> {
        self.nodes
            .conn(self.at.timeout)
            .await
            .map_err(|e| self.error(e))
    }

    fn error(&self, e: impl Into<SqlError>) -> BackendError {
        let e = e.into();
        if e.is_unreachable() {
            BackendError::unavailable(
                "the MySQL server is unreachable",
                format!("{}: {e}", self.at.admin_address),
            )
        } else {
            BackendError::Failed(format!("MySQL server at {}: {e}", self.at.admin_address))
        }
    }

    async fn database_exists(&self, conn: &mut Conn, db: &str) -> Result<bool, BackendError> {
        let found: Option<String> = conn
            .exec_first(
                "SELECT SCHEMA_NAME FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = ?",
                (db,),
            )
            .await
            .map_err(|e| self.error(e))?;
        Ok(found.is_some())
    }

    /// Bytes each database's tables use (data and indexes), by database; one not there
    /// is absent. Current without ANALYZE on MariaDB; on MySQL 8 the session's
    /// `information_schema_stats_expiry` is set to 0 so the sizes are read fresh, not from a
    /// cache up to a day old.
    async fn sizes(
        &self,
        conn: &mut Conn,
        databases: &[String],
    ) -> Result<std::collections::HashMap<String, u64>, BackendError> {
        // MariaDB has no such variable (and needs none): its error is expected.
        let _ = conn
            .query_drop("SET SESSION information_schema_stats_expiry = 0")
            .await;
        let marks = vec!["?"; databases.len()].join(", ");
        let rows: Vec<(String, u64)> = conn
            .exec(
                format!(
                    "SELECT table_schema, CAST(COALESCE(SUM(data_length + index_length), 0) AS UNSIGNED)
                     FROM information_schema.TABLES WHERE table_schema IN ({marks})
                     GROUP BY table_schema"
                ),
                databases.to_vec(),
            )
            .await
            .map_err(|e| self.error(e))?;
        Ok(rows.into_iter().collect())
    }

    /// Bytes the instance's tables use.
    async fn bytes_used(&self, instance_id: &str) -> Result<u64, BackendError> {
        let mut conn = self.conn().await?;
        let db = database_name(instance_id);
        let sizes = self.sizes(&mut conn, std::slice::from_ref(&db)).await?;
        Ok(sizes.get(&db).copied().unwrap_or(0))
    }

    /// The users holding grants on an instance's database.
    async fn users_of(&self, conn: &mut Conn, db: &str) -> Result<Vec<String>, BackendError> {
        let users: Vec<String> = conn
            .exec(
                "SELECT DISTINCT User FROM mysql.db WHERE Db = ? AND Host = '%'",
                (grant_pattern(db),),
            )
            .await
            .map_err(|e| self.error(e))?;
        Ok(users.into_iter().filter(|u| is_binding_user(u)).collect())
    }

    async fn drop_user(&self, conn: &mut NodeConn, user: &str) -> Result<(), BackendError> {
        assert!(is_binding_user(user), "only derived names are ever dropped");
        conn.query_drop(format!("DROP USER IF EXISTS '{user}'@'%'"))
            .await
            .map_err(|e| self.error(e))?;
        // Dropping a user leaves its sessions open: end them.
        self.kill_sessions(conn, user).await
    }

    /// Ends a user's open connections: privilege changes reach them only this way. A
    /// session lives on one server, so on a cluster every node's are ended: through `conn`
    /// on its own node (a second connection from a full pool would wait for itself), a
    /// connection of their own on the others. A node that cannot be reached holds none
    /// (its sessions ended with it).
    async fn kill_sessions(&self, conn: &mut NodeConn, user: &str) -> Result<(), BackendError> {
        for (node, address, pool) in self.nodes.each() {
            if node == conn.node {
                self.kill_sessions_on(conn, user).await?;
                continue;
            }
            match mysql::conn(pool, self.at.timeout).await {
                Ok(mut other) => self.kill_sessions_on(&mut other, user).await?,
                Err(e) if e.is_unreachable() || e.node_cannot_serve() => {
                    tracing::warn!(node = %address, error = %e, "cannot end a user's sessions on a MySQL node that does not answer");
                }
                Err(e) => return Err(self.error(e)),
            }
        }
        Ok(())
    }

    async fn kill_sessions_on(&self, conn: &mut Conn, user: &str) -> Result<(), BackendError> {
        let sessions: Vec<u64> = conn
            .exec(
                "SELECT ID FROM information_schema.PROCESSLIST WHERE USER = ?",
                (user,),
            )
            .await
            .map_err(|e| self.error(e))?;
        for id in sessions {
            // The session may have ended meanwhile (1094: unknown thread).
            match conn.query_drop(format!("KILL CONNECTION {id}")).await {
                Ok(()) => {}
                Err(mysql_async::Error::Server(s)) if s.code == 1094 => {}
                Err(e) => return Err(self.error(e)),
            }
        }
        Ok(())
    }
}

#[async_trait]
impl Backend for MysqlBackend {
    fn describe(&self) -> String {
        format!("mysql backend at {}", self.at.admin_address)
    }

    fn capacity_mb(&self) -> Option<u64> {
        self.capacity_mb
    }

    fn parameters(&self, call: ParametersOf) -> &'static [&'static str] {
        match call {
            ParametersOf::Bind => BIND_PARAMETERS,
            _ => &[],
        }
    }

    async fn usage_bytes(&self, instance_id: &str) -> Result<Option<u64>, BackendError> {
        Ok(Some(self.bytes_used(instance_id).await?))
    }

    async fn check(&self) -> Result<(), BackendError> {
        let mut conn = self.conn().await?;
        conn.query_drop("SELECT 1").await.map_err(|e| self.error(e))
    }

    #[instrument(skip(self), fields(backend = "mysql"))]
    async fn provision(&self, instance_id: &str, _limits: PlanLimits) -> Result<(), BackendError> {
        let db = database_name(instance_id);
        let mut conn = self.conn().await?;
        if self.database_exists(&mut conn, &db).await? {
            return Err(BackendError::Conflict(format!(
                "database {db} already exists on the MySQL server; Brokerage has no record of it"
            )));
        }
        conn.query_drop(format!(
            "CREATE DATABASE `{db}` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci"
        ))
        .await
        .map_err(|e| self.error(e))
    }

    #[instrument(skip(self), fields(backend = "mysql"))]
    async fn update(
        &self,
        instance_id: &str,
        _from: PlanLimits,
        to: PlanLimits,
    ) -> Result<(), BackendError> {
        let db = database_name(instance_id);
        let mut conn = self.conn().await?;
        for user in self.users_of(&mut conn, &db).await? {
            conn.query_drop(format!(
                "ALTER USER '{user}'@'%' WITH MAX_USER_CONNECTIONS {}",
                to.max_user_connections
            ))
            .await
            .map_err(|e| self.error(e))?;
        }
        Ok(())
    }

    #[instrument(skip(self), fields(backend = "mysql"))]
    async fn deprovision(
        &self,
        instance_id: &str,
        _limits: PlanLimits,
    ) -> Result<(), BackendError> {
        let db = database_name(instance_id);
        let mut conn = self.conn().await?;
        for user in self.users_of(&mut conn, &db).await? {
            self.drop_user(&mut conn, &user).await?;
        }
        conn.query_drop(format!("DROP DATABASE IF EXISTS `{db}`"))
            .await
            .map_err(|e| self.error(e))
    }

    #[instrument(skip(self, binding), fields(backend = "mysql"))]
    async fn bind(&self, binding: &Binding<'_>) -> Result<Bound, BackendError> {
        let Binding {
            instance_id,
            binding_id,
            limits,
            parameters,
            ..
        } = *binding;
        let read_only = match parameters.and_then(|p| p.get("read-only")) {
            None => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => {
                return Err(BackendError::BadRequest(
                    "parameter read-only must be true or false".into(),
                ))
            }
        };
        let db = database_name(instance_id);
        let user = user_name(binding_id);
        let password = Alphanumeric.sample_string(&mut rand::rng(), 32);
        let mut conn = self.conn().await?;
        if !self.database_exists(&mut conn, &db).await? {
            return Err(BackendError::Failed(format!(
                "database {db} is missing on the MySQL server"
            )));
        }
        // A user left by an interrupted bind of this same binding is replaced.
        self.drop_user(&mut conn, &user).await?;
        // Over TLS, the binding's user must use TLS as well.
        let require = if self.ca_certificate.is_some() {
            "REQUIRE SSL "
        } else {
            ""
        };
        conn.query_drop(format!(
            "CREATE USER '{user}'@'%' IDENTIFIED BY '{password}' {require}WITH MAX_USER_CONNECTIONS {}",
            limits.max_user_connections
        ))
        .await
        // A server error may quote the statement: keep the password out of it.
        .map_err(|e| scrub(self.error(e), &password))?;
        let privileges = if read_only {
            "SELECT"
        } else {
            "ALL PRIVILEGES"
        };
        let granted = conn
            .query_drop(format!(
                "GRANT {privileges} ON `{}`.* TO '{user}'@'%'",
                grant_pattern(&db)
            ))
            .await;
        if let Err(e) = granted {
            let e = self.error(e);
            self.drop_user(&mut conn, &user).await?;
            return Err(e);
        }
        let (host, port) = (&self.at.public_host, self.at.public_port);
        let jdbc_tls = if self.ca_certificate.is_some() {
            "&useSSL=true&requireSSL=true"
        } else {
            ""
        };
        let mut credentials = Map::new();
        credentials.insert("hostname".into(), json!(host));
        credentials.insert("port".into(), json!(port));
        credentials.insert("name".into(), json!(db));
        credentials.insert("username".into(), json!(user));
        credentials.insert("password".into(), json!(password));
        credentials.insert(
            "uri".into(),
            json!(format!(
                "mysql://{user}:{password}@{host}:{port}/{db}?reconnect=true"
            )),
        );
        credentials.insert(
            "jdbcUrl".into(),
            json!(format!(
                "jdbc:mysql://{host}:{port}/{db}?user={user}&password={password}{jdbc_tls}"
            )),
        );
        if let Some(ca) = &self.ca_certificate {
            credentials.insert("ca_certificate".into(), json!(ca));
        }
        Ok(credentials.into())
    }

    fn enforces_quota(&self) -> bool {
        true
    }

    async fn enforce_quota(
        &self,
        instances: &[(String, PlanLimits)],
    ) -> Vec<Result<QuotaChange, BackendError>> {
        if instances.is_empty() {
            return Vec::new();
        }
        // Two statements for the whole page: every database's size, and what each binding
        // user may do now, read from the server at this moment (a read-only binding holds
        // SELECT alone, no DELETE; a revoked one keeps SELECT and DELETE). So the pass
        // decides from the server, never from a list of bindings read earlier.
        let read = async {
            let mut conn = self.conn().await?;
            let databases: Vec<String> =
                instances.iter().map(|(id, _)| database_name(id)).collect();
            let sizes = self.sizes(&mut conn, &databases).await?;
            let patterns: Vec<String> = databases.iter().map(|db| grant_pattern(db)).collect();
            let marks = vec!["?"; patterns.len()].join(", ");
            let users: Vec<(String, String, String, String)> = conn
                .exec(
                    format!(
                        "SELECT Db, User,
                            IF(Insert_priv = 'Y' OR Update_priv = 'Y' OR Create_priv = 'Y'
                               OR Alter_priv = 'Y' OR Index_priv = 'Y' OR Create_tmp_table_priv = 'Y'
                               OR Create_view_priv = 'Y' OR Create_routine_priv = 'Y'
                               OR Trigger_priv = 'Y' OR Event_priv = 'Y', 'Y', 'N'),
                            Delete_priv
                         FROM mysql.db WHERE Host = '%' AND Db IN ({marks})"
                    ),
                    patterns,
                )
                .await
                .map_err(|e| self.error(e))?;
            Ok::<_, BackendError>((conn, sizes, users))
        };
        let (mut conn, sizes, users) = match read.await {
            Ok(read) => read,
            Err(e) => return instances.iter().map(|_| Err(e.clone())).collect(),
        };
        let mut changes = Vec::with_capacity(instances.len());
        for (instance_id, limits) in instances {
            let db = database_name(instance_id);
            let pattern = grant_pattern(&db);
            let used_bytes = sizes.get(&db).copied().unwrap_or(0);
            let over = used_bytes >= limits.max_storage_mb * 1024 * 1024;
            let mut change = QuotaChange {
                used_bytes,
                ..Default::default()
            };
            let mine = users
                .iter()
                .filter(|(d, u, _, _)| *d == pattern && is_binding_user(u));
            let mut failed = None;
            for (_, user, may_grow, may_delete) in mine {
                let (may_grow, read_only) = (may_grow == "Y", may_delete != "Y");
                let step = if over && may_grow {
                    change.revoked += 1;
                    let revoke = format!("REVOKE {GROW} ON `{pattern}`.* FROM '{user}'@'%'");
                    match conn.query_drop(revoke).await.map_err(|e| self.error(e)) {
                        Ok(()) => self.kill_sessions(&mut conn, user).await,
                        Err(e) => Err(e),
                    }
                } else if !over && !may_grow && !read_only {
                    change.restored += 1;
                    let grant = format!("GRANT {GROW} ON `{pattern}`.* TO '{user}'@'%'");
                    conn.query_drop(grant).await.map_err(|e| self.error(e))
                } else {
                    Ok(())
                };
                if let Err(e) = step {
                    failed = Some(e);
                    break;
                }
            }
            if let Some(e) = failed {
                changes.push(Err(e));
                continue;
            }
            if change.revoked + change.restored > 0 {
                tracing::info!(
                    instance_id = %instance_id,
                    used_bytes,
                    limit_mb = limits.max_storage_mb,
                    revoked = change.revoked,
                    restored = change.restored,
                    "storage quota enforced"
                );
            }
            changes.push(Ok(change));
        }
        changes
    }

    async fn describe_instance(
        &self,
        instance_id: &str,
        limits: PlanLimits,
    ) -> Result<Vec<(String, String)>, BackendError> {
        Ok(vec![
            ("Database".into(), database_name(instance_id)),
            (
                "Connections per binding".into(),
                limits.max_user_connections.to_string(),
            ),
        ])
    }

    #[instrument(skip(self), fields(backend = "mysql"))]
    async fn unbind(&self, binding: &Unbinding<'_>) -> Result<(), BackendError> {
        let Unbinding { binding_id, .. } = *binding;
        let mut conn = self.conn().await?;
        self.drop_user(&mut conn, &user_name(binding_id)).await
    }
}

fn is_binding_user(name: &str) -> bool {
    name.len() == 32 && name.starts_with("u_") && name[2..].bytes().all(|b| b.is_ascii_hexdigit())
}

/// A database name as GRANT and `mysql.db` read it: `_` and `%` are wildcards there.
fn grant_pattern(db: &str) -> String {
    db.replace('_', "\\_").replace('%', "\\%")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_names_fit_mysql8_and_are_recognised() {
        for id in ["b1", "0c8f6a5e-0000-4000-8000-000000000000", "'`\"", ""] {
            let user = user_name(id);
            assert_eq!(user.len(), 32);
            assert!(is_binding_user(&user));
        }
        assert!(!is_binding_user("root"));
        assert_ne!(user_name("a"), user_name("b"));
    }

    #[test]
    fn grants_escape_wildcards() {
        assert_eq!(grant_pattern("cf_a_b"), "cf\\_a\\_b");
    }
}
