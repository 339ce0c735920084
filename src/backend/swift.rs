//! The Swift object storage backend (seed section 4.2, the GlusterFS/Swift setup): a swauth
//! account per instance holding the plan's byte quota, a swauth user per binding.
//!
//! swauth's admin API (`/auth/v2/...` with the super admin's headers) creates and deletes
//! accounts and users; the quota (`X-Account-Meta-Quota-Bytes`, enforced by Swift's
//! `account_quotas` middleware) is set on the storage account with a reseller-admin token,
//! which swauth gives the super admin. Account names are the MySQL backend's database
//! names (`cf_<id>` or a hash), user names a hash of the binding id.

use std::time::Duration;

use async_trait::async_trait;
use rand::distr::{Alphanumeric, SampleString};
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use tracing::instrument;

use super::{
    database_name, object, user_name, Backend, BackendError, Binding, Bound, LiveBindings,
    Unbinding,
};
use crate::catalog::PlanLimits;
use crate::config::Secret;
use crate::config::SwiftBackendConfig;

pub struct SwiftBackend {
    http: reqwest::Client,
    /// The proxy as the broker reaches it, without a trailing slash.
    base: String,
    /// The proxy as apps reach it.
    public_base: String,
    admin_key: Secret,
}

/// What swauth says about an account.
#[derive(Deserialize)]
struct AccountInfo {
    services: Services,
    #[serde(default)]
    users: Vec<UserEntry>,
}

#[derive(Deserialize)]
struct Services {
    storage: Map<String, Value>,
}

#[derive(Deserialize)]
struct UserEntry {
    name: String,
}

impl AccountInfo {
    /// The storage URL swauth hands out (its default cluster).
    fn storage_url(&self) -> Result<String, BackendError> {
        let storage = &self.services.storage;
        let default = storage
            .get("default")
            .and_then(Value::as_str)
            .unwrap_or("local");
        storage
            .get(default)
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| BackendError::Failed("swauth gave the account no storage URL".into()))
    }
}

/// Usage of a storage account.
struct Usage {
    bytes: u64,
    objects: u64,
}

impl SwiftBackend {
    pub fn new(config: &SwiftBackendConfig) -> anyhow::Result<Self> {
        let base = config.url.trim_end_matches('/').to_string();
        let parsed =
            url::Url::parse(&base).map_err(|e| anyhow::anyhow!("backends.swift.url: {e}"))?;
        if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
            anyhow::bail!("backends.swift.url: must be the Swift proxy's http(s) URL");
        }
        if config.admin_key.expose().is_empty() {
            anyhow::bail!("backends.swift.admin_key: must not be empty");
        }
        let timeout = Duration::from_secs(config.timeout_secs.max(1));
        Ok(SwiftBackend {
            http: reqwest::Client::builder()
                .connect_timeout(timeout)
                .timeout(timeout)
                .build()?,
            public_base: config
                .public_url
                .as_deref()
                .unwrap_or(&base)
                .trim_end_matches('/')
                .to_string(),
            base,
            admin_key: config.admin_key.clone(),
        })
    }

    /// A request to swauth's admin API, as its super admin.
    fn admin(&self, method: Method, path: &str) -> RequestBuilder {
        self.http
            .request(method, format!("{}/auth/v2/{path}", self.base))
            .header("X-Auth-Admin-User", ".super_admin")
            .header("X-Auth-Admin-Key", self.admin_key.expose())
    }

    async fn send(&self, request: RequestBuilder, what: &str) -> Result<Response, BackendError> {
        request.send().await.map_err(|e| {
            if e.is_connect() || e.is_timeout() {
                BackendError::unavailable(
                    format!("the Swift proxy is unreachable ({what})"),
                    format!("{}: {}", self.base, without_url(&e)),
                )
            } else {
                BackendError::Failed(format!(
                    "Swift proxy at {} ({what}): {}",
                    self.base,
                    without_url(&e)
                ))
            }
        })
    }

    /// Fails unless the answer is a success (or, with `gone_ok`, a 404).
    fn expect(&self, response: &Response, what: &str, gone_ok: bool) -> Result<(), BackendError> {
        let status = response.status();
        if status.is_success() || (gone_ok && status == StatusCode::NOT_FOUND) {
            return Ok(());
        }
        Err(match status {
            // A misconfigured broker: the service is unavailable until the operator acts.
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => BackendError::unavailable(
                format!("swauth refused the broker's admin key ({what})"),
                &self.base,
            ),
            s if s.is_server_error() => BackendError::unavailable(
                format!("the Swift proxy failed ({what}): {s}"),
                &self.base,
            ),
            s => BackendError::Failed(format!("Swift proxy at {} ({what}): {s}", self.base)),
        })
    }

    async fn account(&self, account: &str) -> Result<Option<AccountInfo>, BackendError> {
        let response = self
            .send(self.admin(Method::GET, account), "reading the account")
            .await?;
        if response.status() == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        self.expect(&response, "reading the account", false)?;
        upstreams::bounded::json(response, ANSWER_CAP)
            .await
            .map(Some)
            .map_err(|e| BackendError::Failed(format!("swauth's account answer: {e}")))
    }

    async fn existing_account(&self, account: &str) -> Result<AccountInfo, BackendError> {
        self.account(account)
            .await?
            .ok_or_else(|| BackendError::Failed(format!("swauth account {account} is missing")))
    }

    /// A reseller-admin token: swauth gives one to its super admin.
    async fn reseller_token(&self) -> Result<String, BackendError> {
        let request = self
            .http
            .get(format!("{}/auth/v1.0", self.base))
            .header("X-Auth-User", ".super_admin:.super_admin")
            .header("X-Auth-Key", self.admin_key.expose());
        let response = self.send(request, "getting an admin token").await?;
        self.expect(&response, "getting an admin token", false)?;
        response
            .headers()
            .get("x-auth-token")
            .and_then(|t| t.to_str().ok())
            .map(str::to_string)
            .ok_or_else(|| BackendError::Failed("swauth gave no admin token".into()))
    }

    async fn storage(
        &self,
        method: Method,
        url: &str,
        token: &str,
        what: &str,
    ) -> Result<Response, BackendError> {
        let response = self
            .send(
                self.http.request(method, url).header("X-Auth-Token", token),
                what,
            )
            .await?;
        self.expect(&response, what, false)?;
        Ok(response)
    }

    async fn set_quota(&self, storage_url: &str, limits: PlanLimits) -> Result<(), BackendError> {
        let token = self.reseller_token().await?;
        let bytes = limits.max_storage_mb.saturating_mul(1024 * 1024);
        self.send(
            self.http
                .post(storage_url)
                .header("X-Auth-Token", &token)
                .header("X-Account-Meta-Quota-Bytes", bytes.to_string()),
            "setting the quota",
        )
        .await
        .and_then(|r| self.expect(&r, "setting the quota", false))
    }

    async fn usage(&self, storage_url: &str, token: &str) -> Result<Usage, BackendError> {
        let response = self
            .storage(Method::HEAD, storage_url, token, "reading usage")
            .await?;
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        Ok(Usage {
            bytes: header("x-account-bytes-used"),
            objects: header("x-account-object-count"),
        })
    }

    /// Deletes every object and container of a storage account.
    async fn purge(&self, storage_url: &str, token: &str) -> Result<(), BackendError> {
        loop {
            let containers: Vec<Value> = upstreams::bounded::json(
                self.storage(
                    Method::GET,
                    &format!("{storage_url}?format=json&limit={LISTING_PAGE}"),
                    token,
                    "listing containers",
                )
                .await?,
                ANSWER_CAP,
            )
            .await
            .map_err(|e| BackendError::Failed(format!("Swift's container listing: {e}")))?;
            if containers.is_empty() {
                return Ok(());
            }
            for container in containers.iter().filter_map(|c| c["name"].as_str()) {
                let container_url = format!("{storage_url}/{}", encode(container));
                loop {
                    let objects: Vec<Value> = upstreams::bounded::json(
                        self.storage(
                            Method::GET,
                            &format!("{container_url}?format=json&limit={LISTING_PAGE}"),
                            token,
                            "listing objects",
                        )
                        .await?,
                        ANSWER_CAP,
                    )
                    .await
                    .map_err(|e| BackendError::Failed(format!("Swift's object listing: {e}")))?;
                    if objects.is_empty() {
                        break;
                    }
                    for object in objects.iter().filter_map(|o| o["name"].as_str()) {
                        let response = self
                            .send(
                                self.http
                                    .delete(format!("{container_url}/{}", encode(object)))
                                    .header("X-Auth-Token", token),
                                "deleting an object",
                            )
                            .await?;
                        self.expect(&response, "deleting an object", true)?;
                    }
                }
                let response = self
                    .send(
                        self.http
                            .delete(&container_url)
                            .header("X-Auth-Token", token),
                        "deleting a container",
                    )
                    .await?;
                self.expect(&response, "deleting a container", true)?;
            }
        }
    }

    async fn delete_user(&self, account: &str, user: &str) -> Result<(), BackendError> {
        let response = self
            .send(
                self.admin(Method::DELETE, &format!("{account}/{user}")),
                "deleting a user",
            )
            .await?;
        self.expect(&response, "deleting a user", true)
    }

    async fn delete_account(&self, account: &str) -> Result<(), BackendError> {
        let response = self
            .send(self.admin(Method::DELETE, account), "deleting the account")
            .await?;
        self.expect(&response, "deleting the account", true)
    }
}

/// Names asked for per listing page; Swift names are at most 1 KiB each.
const LISTING_PAGE: usize = 1000;
/// Largest answer read from swauth or Swift: a listing page with room to spare.
const ANSWER_CAP: usize = 4 << 20;

/// A path segment, percent-encoded.
fn encode(segment: &str) -> String {
    url::form_urlencoded::byte_serialize(segment.as_bytes())
        .collect::<String>()
        .replace('+', "%20")
}

/// reqwest's message without the URL it quotes.
fn without_url(e: &reqwest::Error) -> String {
    let mut e = e.to_string();
    if let Some(i) = e.find(" for url (") {
        e.truncate(i);
    }
    e
}

#[async_trait]
impl Backend for SwiftBackend {
    fn describe(&self) -> String {
        format!("swift backend at {}", self.base)
    }

    async fn usage_bytes(&self, instance_id: &str) -> Result<Option<u64>, BackendError> {
        let info = self.existing_account(&database_name(instance_id)).await?;
        let token = self.reseller_token().await?;
        Ok(Some(self.usage(&info.storage_url()?, &token).await?.bytes))
    }

    async fn check(&self) -> Result<(), BackendError> {
        // Lists swauth's accounts: reaches the proxy and proves the admin key.
        let response = self
            .send(self.admin(Method::GET, ""), "listing accounts")
            .await?;
        self.expect(&response, "listing accounts", false)
    }

    #[instrument(skip(self), fields(backend = "swift"))]
    async fn provision(&self, instance_id: &str, limits: PlanLimits) -> Result<(), BackendError> {
        let account = database_name(instance_id);
        if self.account(&account).await?.is_some() {
            return Err(BackendError::Conflict(format!(
                "swauth account {account} already exists; Brokerage has no record of it"
            )));
        }
        let response = self
            .send(self.admin(Method::PUT, &account), "creating the account")
            .await?;
        self.expect(&response, "creating the account", false)?;
        // An account without its quota is not what the plan promised: take it back.
        let quota = async {
            let info = self
                .account(&account)
                .await?
                .ok_or_else(|| BackendError::Failed("the new account vanished".into()))?;
            self.set_quota(&info.storage_url()?, limits).await
        }
        .await;
        if let Err(e) = quota {
            self.delete_account(&account).await?;
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
        let account = database_name(instance_id);
        let info = self.existing_account(&account).await?;
        let storage_url = info.storage_url()?;
        self.set_quota(&storage_url, to).await
    }

    #[instrument(skip(self), fields(backend = "swift"))]
    async fn deprovision(&self, instance_id: &str, limits: PlanLimits) -> Result<(), BackendError> {
        let account = database_name(instance_id);
        let Some(info) = self.account(&account).await? else {
            return Ok(());
        };
        let storage_url = info.storage_url()?;
        let token = self.reseller_token().await?;
        let usage = self.usage(&storage_url, &token).await?;
        if usage.objects > 0 {
            if !limits.purge_on_deprovision {
                return Err(BackendError::Rejected(format!(
                    "the account still holds {} object{} ({} bytes): delete them first; \
                     this plan does not delete data on deprovision",
                    usage.objects,
                    if usage.objects == 1 { "" } else { "s" },
                    usage.bytes
                )));
            }
            self.purge(&storage_url, &token).await?;
        }
        for user in &info.users {
            self.delete_user(&account, &user.name).await?;
        }
        self.delete_account(&account).await
    }

    /// Every user of the account that is not a live binding's goes: an account admin (each
    /// binding user is one) may have made more, and none may outlive the binding that made
    /// it.
    async fn prune(&self, instance_id: &str, live: LiveBindings<'_>) -> Result<(), BackendError> {
        let account = database_name(instance_id);
        let Some(info) = self.account(&account).await? else {
            return Ok(());
        };
        // Listed before the live bindings are read: a user made by a bind running now
        // belongs to a binding already recorded, so it is kept.
        let keep: Vec<String> = live().await?.iter().map(|b| user_name(b)).collect();
        for user in info.users.iter().filter(|u| !keep.contains(&u.name)) {
            tracing::info!(account = %account, user = %user.name, "removing a user no live binding accounts for");
            self.delete_user(&account, &user.name).await?;
        }
        Ok(())
    }

    #[instrument(skip(self, binding), fields(backend = "swift"))]
    async fn bind(&self, binding: &Binding<'_>) -> Result<Bound, BackendError> {
        let Binding {
            instance_id,
            binding_id,
            ..
        } = *binding;
        let account = database_name(instance_id);
        let user = user_name(binding_id);
        let key = Alphanumeric.sample_string(&mut rand::rng(), 32);
        let info = self.existing_account(&account).await?;
        let storage_url = info.storage_url()?;
        // The account's own admin: full access to this account's containers, none elsewhere.
        let response = self
            .send(
                self.admin(Method::PUT, &format!("{account}/{user}"))
                    .header("X-Auth-User-Key", &key)
                    .header("X-Auth-User-Admin", "true"),
                "creating the user",
            )
            .await?;
        self.expect(&response, "creating the user", false)?;
        let public_storage_url = storage_url.replacen(&self.base, &self.public_base, 1);
        let auth_url = format!("{}/auth/v1.0", self.public_base);
        let uri = match url::Url::parse(&auth_url) {
            Ok(mut u) => {
                let _ = u.set_username(&format!("{account}:{user}"));
                let _ = u.set_password(Some(&key));
                u.to_string()
            }
            Err(_) => auth_url.clone(),
        };
        let credentials = json!({
            "auth_url": auth_url,
            "username": format!("{account}:{user}"),
            "password": key,
            "storage_url": public_storage_url,
            "account": account,
            "uri": uri,
        });
        object(credentials).map(Bound::from)
    }

    #[instrument(skip(self), fields(backend = "swift"))]
    async fn unbind(&self, binding: &Unbinding<'_>) -> Result<(), BackendError> {
        let Unbinding {
            instance_id,
            binding_id,
            ..
        } = *binding;
        self.delete_user(&database_name(instance_id), &user_name(binding_id))
            .await
    }

    async fn describe_instance(
        &self,
        instance_id: &str,
        _limits: PlanLimits,
    ) -> Result<Vec<(String, String)>, BackendError> {
        let account = database_name(instance_id);
        let info = self.existing_account(&account).await?;
        let token = self.reseller_token().await?;
        let usage = self.usage(&info.storage_url()?, &token).await?;
        Ok(vec![
            ("Account".into(), account),
            ("Objects".into(), usage.objects.to_string()),
        ])
    }
}
