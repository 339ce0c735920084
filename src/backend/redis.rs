//! The Redis backend: an instance is a key namespace (`cf_<id>:`) on a shared server, a
//! binding an ACL user that may touch only that namespace (keys and pub/sub channels) and
//! none of Redis's dangerous commands (`FLUSHALL`, `KEYS`, `CONFIG`, ...).
//!
//! ACL users live in the server's memory; the broker runs `ACL SAVE` after each change so a
//! server with an `aclfile` keeps them across restarts.

use async_trait::async_trait;
use rand::distr::{Alphanumeric, SampleString};
use redis::aio::MultiplexedConnection;
use redis::{Cmd, RedisError};
use serde_json::{json, Map, Value};
use tracing::instrument;

use super::{
    database_name, object, only_known_parameters, scrub, user_name, Backend, BackendError,
    Endpoint, Parameters,
};
use crate::catalog::PlanLimits;
use crate::config::ServerBackendConfig;

pub struct RedisBackend {
    client: redis::Client,
    at: Endpoint,
}

/// The keys (and channels) an instance owns start with this.
pub fn key_prefix(instance_id: &str) -> String {
    format!("{}:", database_name(instance_id))
}

/// The ACL user of a binding: named after its instance, so deprovision finds them all.
pub fn acl_user(instance_id: &str, binding_id: &str) -> String {
    format!("{}.{}", database_name(instance_id), user_name(binding_id))
}

impl RedisBackend {
    pub fn new(config: &ServerBackendConfig) -> anyhow::Result<Self> {
        Ok(RedisBackend {
            at: Endpoint::from_config("backends.redis.url", config, "redis", 6379)?,
            client: redis::Client::open(config.url.expose())
                .map_err(|e| anyhow::anyhow!("backends.redis.url: {e}"))?,
        })
    }

    fn error(&self, e: RedisError) -> BackendError {
        if e.is_io_error() || e.is_connection_refusal() || e.is_timeout() {
            BackendError::Unavailable(format!(
                "the Redis server at {} is unreachable: {e}",
                self.at.admin_address
            ))
        } else {
            BackendError::Failed(format!("Redis server at {}: {e}", self.at.admin_address))
        }
    }

    fn late(&self) -> BackendError {
        BackendError::Unavailable(format!(
            "the Redis server at {} did not answer within {:?}",
            self.at.admin_address, self.at.timeout
        ))
    }

    async fn connection(&self) -> Result<MultiplexedConnection, BackendError> {
        tokio::time::timeout(
            self.at.timeout,
            self.client.get_multiplexed_async_connection(),
        )
        .await
        .map_err(|_| self.late())?
        .map_err(|e| self.error(e))
    }

    async fn run<T: redis::FromRedisValue>(
        &self,
        con: &mut MultiplexedConnection,
        cmd: &Cmd,
    ) -> Result<T, BackendError> {
        tokio::time::timeout(self.at.timeout, cmd.query_async(con))
            .await
            .map_err(|_| self.late())?
            .map_err(|e| self.error(e))
    }

    /// Keeps ACL changes across restarts where the server has an ACL file.
    async fn save_acl(&self, con: &mut MultiplexedConnection) {
        let saved: Result<(), BackendError> = self.run(con, redis::cmd("ACL").arg("SAVE")).await;
        if let Err(e) = saved {
            tracing::debug!(error = %e, "ACL SAVE did not run (no aclfile configured?)");
        }
    }

    async fn delete_user(
        &self,
        con: &mut MultiplexedConnection,
        user: &str,
    ) -> Result<(), BackendError> {
        // Deleting a user also closes its connections.
        let _: i64 = self
            .run(con, redis::cmd("ACL").arg("DELUSER").arg(user))
            .await?;
        Ok(())
    }
}

#[async_trait]
impl Backend for RedisBackend {
    fn describe(&self) -> String {
        format!("redis backend at {}", self.at.admin_address)
    }

    async fn check(&self) -> Result<(), BackendError> {
        let mut con = self.connection().await?;
        let _: String = self.run(&mut con, &redis::cmd("PING")).await?;
        Ok(())
    }

    #[instrument(skip(self, parameters), fields(backend = "redis"))]
    async fn provision(
        &self,
        _instance_id: &str,
        _limits: PlanLimits,
        parameters: Parameters<'_>,
    ) -> Result<(), BackendError> {
        only_known_parameters(parameters, &[])?;
        // The namespace needs nothing made; the server must be there to serve it.
        self.check().await
    }

    async fn update(
        &self,
        _instance_id: &str,
        _from: PlanLimits,
        _to: PlanLimits,
        parameters: Parameters<'_>,
    ) -> Result<(), BackendError> {
        only_known_parameters(parameters, &[])
    }

    #[instrument(skip(self), fields(backend = "redis"))]
    async fn deprovision(
        &self,
        instance_id: &str,
        _limits: PlanLimits,
    ) -> Result<(), BackendError> {
        let mut con = self.connection().await?;
        let users: Vec<String> = self.run(&mut con, redis::cmd("ACL").arg("USERS")).await?;
        let own = format!("{}.", database_name(instance_id));
        for user in users.iter().filter(|u| u.starts_with(&own)) {
            self.delete_user(&mut con, user).await?;
        }
        self.save_acl(&mut con).await;
        // Then the data: every key in the namespace.
        let pattern = format!("{}*", key_prefix(instance_id));
        let mut cursor: u64 = 0;
        loop {
            let (next, keys): (u64, Vec<String>) = self
                .run(
                    &mut con,
                    redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(&pattern)
                        .arg("COUNT")
                        .arg(1000),
                )
                .await?;
            if !keys.is_empty() {
                let _: i64 = self.run(&mut con, redis::cmd("UNLINK").arg(&keys)).await?;
            }
            if next == 0 {
                return Ok(());
            }
            cursor = next;
        }
    }

    #[instrument(skip(self, parameters), fields(backend = "redis"))]
    async fn bind(
        &self,
        instance_id: &str,
        binding_id: &str,
        _limits: PlanLimits,
        parameters: Parameters<'_>,
    ) -> Result<Map<String, Value>, BackendError> {
        only_known_parameters(parameters, &[])?;
        let user = acl_user(instance_id, binding_id);
        let prefix = key_prefix(instance_id);
        let password = Alphanumeric.sample_string(&mut rand::rng(), 32);
        let mut con = self.connection().await?;
        // `reset` first: a user left by an interrupted bind is replaced whole.
        let _: () = self
            .run(
                &mut con,
                redis::cmd("ACL")
                    .arg("SETUSER")
                    .arg(&user)
                    .arg("reset")
                    .arg("on")
                    .arg(format!(">{password}"))
                    .arg(format!("~{prefix}*"))
                    .arg(format!("&{prefix}*"))
                    .arg("+@all")
                    .arg("-@dangerous"),
            )
            .await
            .map_err(|e| scrub(e, &password))?;
        self.save_acl(&mut con).await;
        let (host, port) = (&self.at.public_host, self.at.public_port);
        Ok(object(json!({
            "host": host,
            "port": port,
            "username": user,
            "password": password,
            "key_prefix": prefix,
            "uri": format!("redis://{user}:{password}@{host}:{port}"),
        })))
    }

    #[instrument(skip(self), fields(backend = "redis"))]
    async fn unbind(&self, instance_id: &str, binding_id: &str) -> Result<(), BackendError> {
        let mut con = self.connection().await?;
        self.delete_user(&mut con, &acl_user(instance_id, binding_id))
            .await?;
        self.save_acl(&mut con).await;
        Ok(())
    }

    async fn describe_instance(
        &self,
        instance_id: &str,
        _limits: PlanLimits,
    ) -> Result<Vec<(String, String)>, BackendError> {
        Ok(vec![("Key prefix".into(), key_prefix(instance_id))])
    }
}
