//! The Redis backend: an instance is a key namespace (`cf_<id>:`) on a shared server, a
//! binding an ACL user that may touch only that namespace (keys and pub/sub channels) and
//! may run only the commands of an explicit allow-list ([`READ`], [`SHRINK`], [`GROW`],
//! [`SESSION`]): nothing that lists or counts the shared key space (`SCAN`, `KEYS`,
//! `RANDOMKEY`, `DBSIZE`), inspects pub/sub (`PUBSUB`), manages scripts or functions, flushes,
//! configures, debugs, or touches other clients' connections.
//!
//! Storage quota: the quota pass adds up `MEMORY USAGE` of the instance's keys; at or over
//! the plan's `max_storage_mb` its users lose the [`GROW`] commands (they keep reading and
//! deleting), below it they get them back.
//!
//! ACL users live in the server's memory; the broker runs `ACL SAVE` after each change so a
//! server with an `aclfile` keeps them across restarts.

use async_trait::async_trait;
use rand::distr::{Alphanumeric, SampleString};
use redis::aio::MultiplexedConnection;
use redis::{Cmd, RedisError};
use serde_json::json;
use tracing::instrument;

use super::{
    database_name, object, scrub, user_name, Backend, BackendError, Binding, Bound, Endpoint,
    QuotaChange, Unbinding,
};
use crate::catalog::PlanLimits;
use crate::config::ServerBackendConfig;

pub struct RedisBackend {
    client: redis::Client,
    at: Endpoint,
    /// The allow-list less the commands this server does not know (older Redis versions).
    known: tokio::sync::OnceCell<Vec<&'static str>>,
    /// Apps reach the server over TLS as well.
    tls: bool,
}

/// Commands that read keys of the user's own namespace.
pub const READ: &[&str] = &[
    "get",
    "mget",
    "strlen",
    "getrange",
    "substr",
    "lcs",
    "exists",
    "type",
    "ttl",
    "pttl",
    "expiretime",
    "pexpiretime",
    "touch",
    "dump",
    "sort_ro",
    "object",
    "hget",
    "hmget",
    "hgetall",
    "hexists",
    "hkeys",
    "hvals",
    "hlen",
    "hstrlen",
    "hscan",
    "hrandfield",
    "llen",
    "lrange",
    "lindex",
    "lpos",
    "smembers",
    "sismember",
    "smismember",
    "scard",
    "srandmember",
    "sinter",
    "sunion",
    "sdiff",
    "sscan",
    "sintercard",
    "zscore",
    "zcard",
    "zcount",
    "zrange",
    "zrangebyscore",
    "zrevrangebyscore",
    "zrangebylex",
    "zrevrangebylex",
    "zrevrange",
    "zrank",
    "zrevrank",
    "zlexcount",
    "zunion",
    "zinter",
    "zdiff",
    "zmscore",
    "zrandmember",
    "zscan",
    "zintercard",
    "getbit",
    "bitcount",
    "bitpos",
    "bitfield_ro",
    "pfcount",
    "geodist",
    "geohash",
    "geopos",
    "georadius_ro",
    "georadiusbymember_ro",
    "geosearch",
    "xlen",
    "xrange",
    "xrevrange",
    "xread",
    "xpending",
    "xinfo",
    "evalsha_ro",
    "eval_ro",
];

/// Commands that only remove data (or its lifetime): kept over quota, as with MySQL's
/// DELETE.
pub const SHRINK: &[&str] = &[
    "del",
    "unlink",
    "getdel",
    "expire",
    "pexpire",
    "expireat",
    "pexpireat",
    "hdel",
    "lpop",
    "rpop",
    "lrem",
    "ltrim",
    "srem",
    "spop",
    "zrem",
    "zpopmin",
    "zpopmax",
    "zremrangebyrank",
    "zremrangebyscore",
    "zremrangebylex",
    "xdel",
    "xtrim",
    "xack",
];

/// Commands that can make the namespace grow: lost at or over quota.
pub const GROW: &[&str] = &[
    "set",
    "setnx",
    "setex",
    "psetex",
    "mset",
    "msetnx",
    "append",
    "incr",
    "incrby",
    "incrbyfloat",
    "decr",
    "decrby",
    "setrange",
    "getset",
    "getex",
    "persist",
    "rename",
    "renamenx",
    "restore",
    "copy",
    "sort",
    "hset",
    "hsetnx",
    "hmset",
    "hincrby",
    "hincrbyfloat",
    "lpush",
    "rpush",
    "lpushx",
    "rpushx",
    "lset",
    "linsert",
    "rpoplpush",
    "lmove",
    "blpop",
    "brpop",
    "brpoplpush",
    "blmove",
    "lmpop",
    "blmpop",
    "sadd",
    "smove",
    "sinterstore",
    "sunionstore",
    "sdiffstore",
    "zadd",
    "zincrby",
    "zrangestore",
    "zunionstore",
    "zinterstore",
    "zdiffstore",
    "bzpopmin",
    "bzpopmax",
    "zmpop",
    "bzmpop",
    "setbit",
    "bitop",
    "bitfield",
    "pfadd",
    "pfmerge",
    "geoadd",
    "georadius",
    "georadiusbymember",
    "geosearchstore",
    "xadd",
    "xgroup",
    "xreadgroup",
    "xclaim",
    "xautoclaim",
    "xsetid",
    "eval",
    "evalsha",
];

/// The connection's own business: transactions, pub/sub on the namespace's channels, and
/// `CLIENT` for this connection only.
pub const SESSION: &[&str] = &[
    "ping",
    "echo",
    "auth",
    "hello",
    "quit",
    "reset",
    "multi",
    "exec",
    "discard",
    "watch",
    "unwatch",
    "publish",
    "spublish",
    "subscribe",
    "unsubscribe",
    "psubscribe",
    "punsubscribe",
    "ssubscribe",
    "sunsubscribe",
    "client|setname",
    "client|getname",
    "client|id",
    "client|info",
    "client|reply",
    "client|no-evict",
];

fn quota_bytes(limits: PlanLimits) -> u64 {
    limits.max_storage_mb.saturating_mul(1024 * 1024)
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
    /// One instance's quota: see [`Backend::enforce_quota`].
    async fn enforce_one(
        &self,
        instance_id: &str,
        limits: PlanLimits,
    ) -> Result<QuotaChange, BackendError> {
        let mut con = self.connection().await?;
        let used = self.usage(&mut con, instance_id).await?;
        let over = used >= quota_bytes(limits);
        let known = self.known_commands(&mut con).await?;
        let mut change = QuotaChange {
            used_bytes: used,
            ..Default::default()
        };
        for user in self.users_of(&mut con, instance_id).await? {
            // Whether the user may write now: `ACL DRYRUN` of a growing command.
            let probe = format!("{}quota-probe", key_prefix(instance_id));
            let may_write: Result<redis::Value, BackendError> = self
                .run(
                    &mut con,
                    redis::cmd("ACL")
                        .arg("DRYRUN")
                        .arg(&user)
                        .arg("SET")
                        .arg(&probe)
                        .arg("x"),
                )
                .await;
            let may_write = match may_write {
                Ok(redis::Value::Okay) => true,
                Ok(redis::Value::SimpleString(s)) => s == "OK",
                _ => false,
            };
            if over != may_write {
                continue;
            }
            let sign = if over { '-' } else { '+' };
            let mut setuser = redis::cmd("ACL");
            setuser.arg("SETUSER").arg(&user);
            for command in GROW.iter().filter(|c| known.contains(c)) {
                setuser.arg(format!("{sign}{command}"));
            }
            let _: () = self.run(&mut con, &setuser).await?;
            if over {
                change.revoked += 1;
            } else {
                change.restored += 1;
            }
        }
        if change.revoked + change.restored > 0 {
            self.save_acl(&mut con).await;
        }
        Ok(change)
    }

    /// With `ca_certificate`, the server is reached over TLS (`rediss://`, whichever scheme
    /// the url names) and its certificate checked against that CA.
    pub fn new(config: &ServerBackendConfig) -> anyhow::Result<Self> {
        let key = "backends.redis.url";
        let at = Endpoint::from_config(key, config, "redis|rediss", 6379)?;
        let url = config.url.expose();
        let tls = at.ca_certificate.is_some() || url.starts_with("rediss://");
        let url = if tls {
            url.replacen("redis://", "rediss://", 1)
        } else {
            url.to_string()
        };
        let client = match &at.ca_certificate {
            Some(ca) => redis::Client::build_with_tls(
                url.as_str(),
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(ca.as_bytes().to_vec()),
                },
            ),
            None => redis::Client::open(url.as_str()),
        }
        .map_err(|e| anyhow::anyhow!("{key}: {e}"))?;
        Ok(RedisBackend {
            at,
            client,
            known: tokio::sync::OnceCell::new(),
            tls,
        })
    }

    /// The allow-list, less what this server does not know (asked once: `COMMAND INFO`
    /// answers nil for an unknown command).
    async fn known_commands(
        &self,
        con: &mut MultiplexedConnection,
    ) -> Result<&[&'static str], BackendError> {
        let known = self
            .known
            .get_or_try_init(|| async {
                let all: Vec<&'static str> = [READ, SHRINK, GROW, SESSION].concat();
                let bases: Vec<&str> = all
                    .iter()
                    .map(|c| c.split('|').next().unwrap_or(c))
                    .collect();
                let info: Vec<redis::Value> = self
                    .run(con, redis::cmd("COMMAND").arg("INFO").arg(&bases))
                    .await?;
                Ok::<_, BackendError>(
                    all.into_iter()
                        .zip(info)
                        .filter(|(_, i)| !matches!(i, redis::Value::Nil))
                        .map(|(c, _)| c)
                        .collect(),
                )
            })
            .await?;
        Ok(known)
    }

    /// The binding users of an instance.
    async fn users_of(
        &self,
        con: &mut MultiplexedConnection,
        instance_id: &str,
    ) -> Result<Vec<String>, BackendError> {
        let users: Vec<String> = self.run(con, redis::cmd("ACL").arg("USERS")).await?;
        let own = format!("{}.", database_name(instance_id));
        Ok(users.into_iter().filter(|u| u.starts_with(&own)).collect())
    }

    /// One page of the instance's keys from `cursor`, and the cursor of the next (0: done).
    async fn keys_page(
        &self,
        con: &mut MultiplexedConnection,
        instance_id: &str,
        cursor: u64,
    ) -> Result<(u64, Vec<String>), BackendError> {
        self.run(
            con,
            redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("{}*", key_prefix(instance_id)))
                .arg("COUNT")
                .arg(1000),
        )
        .await
    }

    /// Bytes the instance's keys use (`MEMORY USAGE`, which samples large collections).
    async fn usage(
        &self,
        con: &mut MultiplexedConnection,
        instance_id: &str,
    ) -> Result<u64, BackendError> {
        let (mut cursor, mut used) = (0u64, 0u64);
        loop {
            let (next, keys) = self.keys_page(con, instance_id, cursor).await?;
            if !keys.is_empty() {
                let mut pipe = redis::pipe();
                for key in &keys {
                    pipe.cmd("MEMORY")
                        .arg("USAGE")
                        .arg(key)
                        .arg("SAMPLES")
                        .arg(5);
                }
                let sizes: Vec<Option<u64>> =
                    tokio::time::timeout(self.at.timeout, pipe.query_async(con))
                        .await
                        .map_err(|_| self.late())?
                        .map_err(|e| self.error(e))?;
                used = sizes.into_iter().flatten().fold(used, u64::saturating_add);
            }
            if next == 0 {
                return Ok(used);
            }
            cursor = next;
        }
    }

    fn error(&self, e: RedisError) -> BackendError {
        if e.is_io_error() || e.is_connection_refusal() || e.is_timeout() {
            BackendError::unavailable(
                "the Redis server is unreachable",
                format!("{}: {e}", self.at.admin_address),
            )
        } else {
            BackendError::Failed(format!("Redis server at {}: {e}", self.at.admin_address))
        }
    }

    fn late(&self) -> BackendError {
        BackendError::unavailable(
            format!(
                "the Redis server did not answer within {:?}",
                self.at.timeout
            ),
            &self.at.admin_address,
        )
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

    #[instrument(skip(self), fields(backend = "redis"))]
    async fn provision(&self, _instance_id: &str, _limits: PlanLimits) -> Result<(), BackendError> {
        // The namespace needs nothing made; the server must be there to serve it.
        self.check().await
    }

    async fn usage_bytes(&self, instance_id: &str) -> Result<Option<u64>, BackendError> {
        let mut con = self.connection().await?;
        Ok(Some(self.usage(&mut con, instance_id).await?))
    }

    #[instrument(skip(self), fields(backend = "redis"))]
    async fn deprovision(
        &self,
        instance_id: &str,
        _limits: PlanLimits,
    ) -> Result<(), BackendError> {
        let mut con = self.connection().await?;
        for user in self.users_of(&mut con, instance_id).await? {
            self.delete_user(&mut con, &user).await?;
        }
        self.save_acl(&mut con).await;
        // Then the data: every key in the namespace.
        let mut cursor: u64 = 0;
        loop {
            let (next, keys) = self.keys_page(&mut con, instance_id, cursor).await?;
            if !keys.is_empty() {
                let _: i64 = self.run(&mut con, redis::cmd("UNLINK").arg(&keys)).await?;
            }
            if next == 0 {
                return Ok(());
            }
            cursor = next;
        }
    }

    #[instrument(skip(self, binding), fields(backend = "redis"))]
    async fn bind(&self, binding: &Binding<'_>) -> Result<Bound, BackendError> {
        let Binding {
            instance_id,
            binding_id,
            ..
        } = *binding;
        let user = acl_user(instance_id, binding_id);
        let prefix = key_prefix(instance_id);
        let password = Alphanumeric.sample_string(&mut rand::rng(), 32);
        let mut con = self.connection().await?;
        let known = self.known_commands(&mut con).await?;
        // `reset` first: a user left by an interrupted bind is replaced whole.
        let mut setuser = redis::cmd("ACL");
        setuser
            .arg("SETUSER")
            .arg(&user)
            .arg("reset")
            .arg("on")
            .arg(format!(">{password}"))
            .arg(format!("~{prefix}*"))
            .arg(format!("&{prefix}*"))
            .arg("-@all");
        // Over quota, the next pass takes the growing commands away, as from every user.
        for command in known {
            setuser.arg(format!("+{command}"));
        }
        let _: () = self
            .run(&mut con, &setuser)
            .await
            .map_err(|e| scrub(e, &password))?;
        self.save_acl(&mut con).await;
        let (host, port) = (&self.at.public_host, self.at.public_port);
        let scheme = if self.tls { "rediss" } else { "redis" };
        let mut credentials = object(json!({
            "host": host,
            "port": port,
            "username": user,
            "password": password,
            "key_prefix": prefix,
            "tls": self.tls,
            "uri": format!("{scheme}://{user}:{password}@{host}:{port}"),
        }))?;
        if let Some(ca) = &self.at.ca_certificate {
            credentials.insert("ca_certificate".into(), json!(ca));
        }
        Ok(credentials.into())
    }

    #[instrument(skip(self), fields(backend = "redis"))]
    async fn unbind(&self, binding: &Unbinding<'_>) -> Result<(), BackendError> {
        let Unbinding {
            instance_id,
            binding_id,
            ..
        } = *binding;
        let mut con = self.connection().await?;
        self.delete_user(&mut con, &acl_user(instance_id, binding_id))
            .await?;
        self.save_acl(&mut con).await;
        Ok(())
    }

    /// At or over the plan's memory, every user of the instance loses the [`GROW`]
    /// commands (immediately, also on open connections); below it they get them back.
    fn enforces_quota(&self) -> bool {
        true
    }

    async fn enforce_quota(
        &self,
        instances: &[(String, PlanLimits)],
    ) -> Vec<Result<QuotaChange, BackendError>> {
        let mut changes = Vec::with_capacity(instances.len());
        for (id, limits) in instances {
            changes.push(self.enforce_one(id, *limits).await);
        }
        changes
    }

    async fn describe_instance(
        &self,
        instance_id: &str,
        _limits: PlanLimits,
    ) -> Result<Vec<(String, String)>, BackendError> {
        Ok(vec![("Key prefix".into(), key_prefix(instance_id))])
    }
}
