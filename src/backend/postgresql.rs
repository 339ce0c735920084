//! The PostgreSQL backend: a database per instance owned by a group role of its own, a
//! login role per binding that is a member of the group, with the plan's connection limit.
//!
//! The group role (`o_<hash>`) owns the database, so every binding may connect and create in
//! its `public` schema; objects a binding creates are shared with the group through default
//! privileges, and on unbind they pass to the group rather than vanish. `REVOKE ... FROM
//! PUBLIC` keeps every other role out of the database.
//!
//! Binding roles may connect to their own database only: before each bind the broker takes
//! `CONNECT` away from `PUBLIC` on every other database of the server (`postgres`,
//! `template1`, ...), so the server should be the broker's own. Unbind removes what a
//! binding role owns in any other database as well, so its `DROP ROLE` always succeeds.

use async_trait::async_trait;
use rand::distr::{Alphanumeric, SampleString};
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio_postgres::{Client, NoTls};
use tracing::instrument;

use super::{
    database_name, object, scrub, user_name, Backend, BackendError, Binding, Bound, Endpoint,
    Unbinding,
};
use crate::catalog::PlanLimits;
use crate::config::ServerBackendConfig;

pub struct PostgresqlBackend {
    config: tokio_postgres::Config,
    at: Endpoint,
    /// TLS to the server, checked against the configured CA.
    tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
}

/// The group role that owns an instance's database.
pub fn owner_role(instance_id: &str) -> String {
    format!("o_{}", &hex::encode(Sha256::digest(instance_id))[..30])
}

/// PostgreSQL's CONNECTION LIMIT for a plan: -1 is no limit.
fn connection_limit(limits: PlanLimits) -> i64 {
    if limits.max_user_connections == 0 {
        -1
    } else {
        i64::from(limits.max_user_connections)
    }
}

impl PostgresqlBackend {
    pub fn new(config: &ServerBackendConfig) -> anyhow::Result<Self> {
        let parsed: tokio_postgres::Config = config
            .url
            .expose()
            .parse()
            .map_err(|e| anyhow::anyhow!("backends.postgresql.url: {e}"))?;
        let at = Endpoint::from_config("backends.postgresql.url", config, "postgres", 5432)?;
        let tls = at
            .ca_certificate
            .as_deref()
            .map(super::tls_client_config)
            .transpose()
            .map_err(|e| anyhow::anyhow!("backends.postgresql.ca_certificate: {e}"))?
            .map(tokio_postgres_rustls::MakeRustlsConnect::new);
        Ok(PostgresqlBackend {
            at,
            config: parsed,
            tls,
        })
    }

    fn error(&self, e: tokio_postgres::Error) -> BackendError {
        if e.as_db_error().is_none() {
            BackendError::unavailable(
                "the PostgreSQL server is unreachable",
                format!("{}: {e}", self.at.admin_address),
            )
        } else {
            BackendError::Failed(format!(
                "PostgreSQL server at {}: {e}",
                self.at.admin_address
            ))
        }
    }

    /// An admin connection to `database` (the configured one when `None`).
    async fn connect(&self, database: Option<&str>) -> Result<Client, BackendError> {
        let mut config = self.config.clone();
        config.connect_timeout(self.at.timeout);
        if let Some(db) = database {
            config.dbname(db);
        }
        let late = || {
            BackendError::unavailable(
                format!(
                    "the PostgreSQL server did not answer within {:?}",
                    self.at.timeout
                ),
                &self.at.admin_address,
            )
        };
        let client = match &self.tls {
            None => {
                let (client, connection) =
                    tokio::time::timeout(self.at.timeout, config.connect(NoTls))
                        .await
                        .map_err(|_| late())?
                        .map_err(|e| self.error(e))?;
                tokio::spawn(connection);
                client
            }
            Some(tls) => {
                config.ssl_mode(tokio_postgres::config::SslMode::Require);
                let (client, connection) =
                    tokio::time::timeout(self.at.timeout, config.connect(tls.clone()))
                        .await
                        .map_err(|_| late())?
                        .map_err(|e| self.error(e))?;
                tokio::spawn(connection);
                client
            }
        };
        Ok(client)
    }

    async fn database_exists(&self, client: &Client, db: &str) -> Result<bool, BackendError> {
        let rows = client
            .query("SELECT 1 FROM pg_database WHERE datname = $1", &[&db])
            .await
            .map_err(|e| self.error(e))?;
        Ok(!rows.is_empty())
    }

    /// The login roles of an instance: members of its group role.
    async fn members(&self, client: &Client, group: &str) -> Result<Vec<String>, BackendError> {
        let rows = client
            .query(
                "SELECT m.rolname FROM pg_auth_members a
                 JOIN pg_roles g ON g.oid = a.roleid
                 JOIN pg_roles m ON m.oid = a.member
                 WHERE g.rolname = $1",
                &[&group],
            )
            .await
            .map_err(|e| self.error(e))?;
        Ok(rows.iter().map(|r| r.get::<_, String>(0)).collect())
    }

    /// Ends a role's sessions, then drops it.
    async fn drop_role(&self, client: &Client, role: &str) -> Result<(), BackendError> {
        client
            .execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1",
                &[&role],
            )
            .await
            .map_err(|e| self.error(e))?;
        client
            .batch_execute(&format!("DROP ROLE IF EXISTS \"{role}\""))
            .await
            .map_err(|e| self.error(e))
    }

    /// Takes `CONNECT` from `PUBLIC` on every database that is not an instance's, so binding
    /// roles reach their own database only. Without the right to (an admin that is not a
    /// superuser and does not own them) it warns and goes on.
    async fn close_other_databases(&self, client: &Client) -> Result<(), BackendError> {
        let open = client
            .query(
                "SELECT datname FROM pg_database
                 WHERE datallowconn AND datname NOT LIKE 'cf\\_%'
                   AND has_database_privilege('public', oid, 'CONNECT')",
                &[],
            )
            .await
            .map_err(|e| self.error(e))?;
        for row in open {
            let name: String = row.get(0);
            let quoted = name.replace('"', "\"\"");
            if let Err(e) = client
                .batch_execute(&format!(
                    "REVOKE CONNECT ON DATABASE \"{quoted}\" FROM PUBLIC"
                ))
                .await
            {
                tracing::warn!(database = %name, error = %e, "cannot keep binding roles out of this database");
            }
        }
        Ok(())
    }

    /// Drops what `role` owns in databases other than `own` (objects a tenant made where it
    /// could), which would otherwise keep `DROP ROLE` from succeeding.
    async fn drop_owned_elsewhere(
        &self,
        client: &Client,
        role: &str,
        own: &str,
    ) -> Result<(), BackendError> {
        let elsewhere = client
            .query(
                "SELECT DISTINCT d.datname FROM pg_shdepend s
                 JOIN pg_database d ON d.oid = s.dbid
                 JOIN pg_roles r ON r.oid = s.refobjid
                 WHERE r.rolname = $1 AND d.datname <> $2",
                &[&role, &own],
            )
            .await
            .map_err(|e| self.error(e))?;
        for row in elsewhere {
            let db: String = row.get(0);
            self.connect(Some(&db))
                .await?
                .batch_execute(&format!("DROP OWNED BY \"{role}\""))
                .await
                .map_err(|e| self.error(e))?;
        }
        Ok(())
    }

    async fn size_bytes(&self, db: &str) -> Result<u64, BackendError> {
        let client = self.connect(None).await?;
        let row = client
            .query_one("SELECT pg_database_size($1)", &[&db])
            .await
            .map_err(|e| self.error(e))?;
        Ok(row.get::<_, i64>(0).max(0) as u64)
    }
}

#[async_trait]
impl Backend for PostgresqlBackend {
    fn describe(&self) -> String {
        format!("postgresql backend at {}", self.at.admin_address)
    }

    async fn usage_bytes(&self, instance_id: &str) -> Result<Option<u64>, BackendError> {
        Ok(Some(self.size_bytes(&database_name(instance_id)).await?))
    }

    async fn check(&self) -> Result<(), BackendError> {
        let client = self.connect(None).await?;
        client
            .batch_execute("SELECT 1")
            .await
            .map_err(|e| self.error(e))
    }

    #[instrument(skip(self), fields(backend = "postgresql"))]
    async fn provision(&self, instance_id: &str, _limits: PlanLimits) -> Result<(), BackendError> {
        let (db, owner) = (database_name(instance_id), owner_role(instance_id));
        let client = self.connect(None).await?;
        if self.database_exists(&client, &db).await? {
            return Err(BackendError::Conflict(format!(
                "database {db} already exists on the PostgreSQL server; Brokerage has no record of it"
            )));
        }
        // A group role left by an interrupted provision of this same instance goes first.
        self.drop_role(&client, &owner).await?;
        client
            .batch_execute(&format!("CREATE ROLE \"{owner}\" NOLOGIN"))
            .await
            .map_err(|e| self.error(e))?;
        let created = client
            .batch_execute(&format!(
                "CREATE DATABASE \"{db}\" OWNER \"{owner}\" ENCODING 'UTF8' TEMPLATE template0"
            ))
            .await;
        let locked = match created {
            Ok(()) => client
                .batch_execute(&format!("REVOKE ALL ON DATABASE \"{db}\" FROM PUBLIC"))
                .await
                .map_err(|e| self.error(e)),
            Err(e) => Err(self.error(e)),
        };
        if let Err(e) = locked {
            // Half an instance is no instance.
            let _ = client
                .batch_execute(&format!("DROP DATABASE IF EXISTS \"{db}\""))
                .await;
            self.drop_role(&client, &owner).await?;
            return Err(e);
        }
        Ok(())
    }

    async fn update(
        &self,
        instance_id: &str,
        _from: PlanLimits,
        to: PlanLimits,
    ) -> Result<(), BackendError> {
        let client = self.connect(None).await?;
        for member in self.members(&client, &owner_role(instance_id)).await? {
            client
                .batch_execute(&format!(
                    "ALTER ROLE \"{member}\" CONNECTION LIMIT {}",
                    connection_limit(to)
                ))
                .await
                .map_err(|e| self.error(e))?;
        }
        Ok(())
    }

    #[instrument(skip(self), fields(backend = "postgresql"))]
    async fn deprovision(
        &self,
        instance_id: &str,
        _limits: PlanLimits,
    ) -> Result<(), BackendError> {
        let (db, owner) = (database_name(instance_id), owner_role(instance_id));
        let client = self.connect(None).await?;
        client
            .batch_execute(&format!("DROP DATABASE IF EXISTS \"{db}\" WITH (FORCE)"))
            .await
            .map_err(|e| self.error(e))?;
        for member in self.members(&client, &owner).await? {
            self.drop_owned_elsewhere(&client, &member, &db).await?;
            self.drop_role(&client, &member).await?;
        }
        self.drop_owned_elsewhere(&client, &owner, &db).await?;
        self.drop_role(&client, &owner).await
    }

    #[instrument(skip(self, binding), fields(backend = "postgresql"))]
    async fn bind(&self, binding: &Binding<'_>) -> Result<Bound, BackendError> {
        let Binding {
            instance_id,
            binding_id,
            limits,
            ..
        } = *binding;
        let (db, owner) = (database_name(instance_id), owner_role(instance_id));
        let user = user_name(binding_id);
        let password = Alphanumeric.sample_string(&mut rand::rng(), 32);
        let client = self.connect(None).await?;
        if !self.database_exists(&client, &db).await? {
            return Err(BackendError::Failed(format!(
                "database {db} is missing on the PostgreSQL server"
            )));
        }
        self.close_other_databases(&client).await?;
        // A role left by an interrupted bind of this same binding is replaced.
        let unbinding = Unbinding {
            instance_id,
            binding_id,
            app: binding.app,
        };
        self.unbind(&unbinding).await?;
        // The server is sent the password's SCRAM verifier, never the password: statements
        // reach logs (the driver's own, the server's).
        let verifier = postgres_protocol::password::scram_sha_256(password.as_bytes());
        client
            .batch_execute(&format!(
                "CREATE ROLE \"{user}\" LOGIN PASSWORD '{verifier}' CONNECTION LIMIT {} IN ROLE \"{owner}\"",
                connection_limit(limits)
            ))
            .await
            .map_err(|e| scrub(self.error(e), &verifier))?;
        // What this binding creates, every binding of the instance may use.
        let shared = async {
            let instance = self.connect(Some(&db)).await?;
            instance
                .batch_execute(&format!(
                    "ALTER DEFAULT PRIVILEGES FOR ROLE \"{user}\" GRANT ALL ON TABLES TO \"{owner}\";
                     ALTER DEFAULT PRIVILEGES FOR ROLE \"{user}\" GRANT ALL ON SEQUENCES TO \"{owner}\";
                     ALTER DEFAULT PRIVILEGES FOR ROLE \"{user}\" GRANT ALL ON FUNCTIONS TO \"{owner}\""
                ))
                .await
                .map_err(|e| self.error(e))
        }
        .await;
        if let Err(e) = shared {
            self.unbind(&unbinding).await?;
            return Err(e);
        }
        let (host, port) = (&self.at.public_host, self.at.public_port);
        // Over TLS, apps are asked to use TLS and check the server against the same CA.
        let (uri_tls, jdbc_tls) = match self.at.ca_certificate {
            Some(_) => ("?sslmode=verify-full", "&ssl=true&sslmode=verify-full"),
            None => ("", ""),
        };
        let mut credentials = object(json!({
            "hostname": host,
            "port": port,
            "name": db,
            "username": user,
            "password": password,
            "uri": format!("postgres://{user}:{password}@{host}:{port}/{db}{uri_tls}"),
            "jdbcUrl": format!(
                "jdbc:postgresql://{host}:{port}/{db}?user={user}&password={password}{jdbc_tls}"
            ),
        }))?;
        if let Some(ca) = &self.at.ca_certificate {
            credentials.insert("ca_certificate".into(), json!(ca));
        }
        Ok(credentials.into())
    }

    #[instrument(skip(self), fields(backend = "postgresql"))]
    async fn unbind(&self, binding: &Unbinding<'_>) -> Result<(), BackendError> {
        let Unbinding {
            instance_id,
            binding_id,
            ..
        } = *binding;
        let (db, owner) = (database_name(instance_id), owner_role(instance_id));
        let user = user_name(binding_id);
        let client = self.connect(None).await?;
        let exists = !client
            .query("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&user])
            .await
            .map_err(|e| self.error(e))?
            .is_empty();
        if !exists {
            return Ok(());
        }
        if self.database_exists(&client, &db).await? {
            // The binding's objects stay with the instance; its privileges go.
            let instance = self.connect(Some(&db)).await?;
            instance
                .batch_execute(&format!(
                    "REASSIGN OWNED BY \"{user}\" TO \"{owner}\"; DROP OWNED BY \"{user}\""
                ))
                .await
                .map_err(|e| self.error(e))?;
        }
        self.drop_owned_elsewhere(&client, &user, &db).await?;
        self.drop_role(&client, &user).await
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
}
