//! Configuration: the defaults compiled in from `config/brokerage.yml`, the operator's
//! file, `BROKERAGE_*` environment variables, then `$PORT`. Everything is validated
//! before a port is bound; errors name the key.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use figment::providers::{Env, Format, Serialized, Yaml};
use figment::Figment;

use serde::{Deserialize, Serialize};
use url::Url;

use upstreams::osb;

pub const DEFAULTS: &str = include_str!("../config/brokerage.yml");

/// The local backends Brokerage has; a service names one (`backend: mysql`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    Mysql,
    Mongodb,
    Swift,
    Cubrid,
    Postgresql,
    Redis,
    Logs,
}

impl BackendKind {
    /// The name the configuration uses (`backends.<name>`, `backend: <name>`).
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Mysql => "mysql",
            BackendKind::Mongodb => "mongodb",
            BackendKind::Swift => "swift",
            BackendKind::Cubrid => "cubrid",
            BackendKind::Postgresql => "postgresql",
            BackendKind::Redis => "redis",
            BackendKind::Logs => "logs",
        }
    }
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One local service as configured: the published fields plus what only the broker reads.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct ServiceConfig {
    /// The local backend doing the work (`mysql`).
    pub backend: BackendKind,
    /// Refuse deprovision while bindings exist (the seed's rule) instead of dropping them.
    #[serde(default = "yes")]
    pub refuse_deprovision_with_bindings: bool,
    /// Bindings need an app (`app_guid` or `bind_resource.app_guid`), else 422 RequiresApp.
    #[serde(default)]
    pub bindings_require_app: bool,
    pub plans: Vec<PlanConfig>,
    #[serde(flatten)]
    pub service: osb::Service,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct PlanConfig {
    #[serde(default)]
    pub max_storage_mb: Option<u64>,
    #[serde(default)]
    pub max_user_connections: Option<u32>,
    /// Logs: the lines and bytes an instance keeps.
    #[serde(default)]
    pub max_log_lines: Option<u64>,
    #[serde(default)]
    pub max_log_bytes: Option<u64>,
    /// Swift: deprovision deletes the objects an account still holds, instead of refusing.
    #[serde(default)]
    pub purge_on_deprovision: bool,
    /// Backend work runs in the background; requires `accepts_incomplete=true`.
    #[serde(default)]
    pub asynchronous: bool,
    #[serde(flatten)]
    pub plan: osb::Plan,
}

fn yes() -> bool {
    true
}

/// Names Cloud Foundry's CLI handles everywhere: `[a-z0-9-]`, not starting with `-`.
pub fn is_cli_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && !name.starts_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// `X-Api-Info-Location` (`host[:port]`, optionally followed by `/v2/info`) as a lowercase
/// `host[:port]`, or `None` when it is anything else (a scheme, credentials, another path).
pub fn api_host(location: &str) -> Option<String> {
    let host = location
        .trim()
        .trim_end_matches('/')
        .trim_end_matches("/v2/info");
    if host.is_empty()
        || host.contains(['/', '@', '\\', '?', '#'])
        || host.contains(char::is_whitespace)
    {
        return None;
    }
    let url = Url::parse(&format!("http://{host}")).ok()?;
    let name = url.host_str()?;
    Some(match url.port() {
        Some(port) => format!("{name}:{port}"),
        None => name.to_string(),
    })
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub listen: Listen,
    pub auth: Auth,
    pub store: StoreConfig,
    pub broker: BrokerSettings,
    pub log: LogConfig,
    pub backends: Backends,
    pub catalog: CatalogConfig,
    pub federation: FederationSettings,
    #[serde(default)]
    pub upstreams: Vec<upstreams::UpstreamSettings>,
    pub sso: SsoConfig,
    pub metrics: MetricsConfig,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Who may scrape `/metrics` (HTTP basic), apart from the broker's own credentials.
    pub credentials: Vec<Credential>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SsoConfig {
    /// UAA's login server; with `token_endpoint`, used instead of discovery.
    #[serde(default)]
    pub authorization_endpoint: Option<String>,
    #[serde(default)]
    pub token_endpoint: Option<String>,
    /// The Cloud Controller asked when a provision named none (`X-Api-Info-Location`).
    #[serde(default)]
    pub cloud_controller_url: Option<String>,
    /// Scheme for the hosts `X-Api-Info-Location` names.
    pub api_info_scheme: String,
    /// Hosts (`host` or `host:port`) a provision's `X-Api-Info-Location` may name, besides
    /// `cloud_controller_url`'s. Any other is ignored: the broker connects only to platforms
    /// the operator named.
    #[serde(default)]
    pub allowed_cloud_controllers: Vec<String>,
    pub session_secret: Secret,
    pub session_lifetime_secs: u64,
    pub timeout_secs: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FederationSettings {
    /// Seconds between catalog refreshes of every upstream.
    pub refresh_secs: u64,
    /// Seconds a fetched catalog counts as fresh; after that the stored copy is served.
    pub catalog_ttl_secs: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Listen {
    pub host: String,
    pub port: u16,
    /// Serve HTTPS with this certificate and key (PEM files); plain HTTP when absent.
    #[serde(default)]
    pub tls: Option<ListenTls>,
    /// Seconds a connection has to complete its TLS handshake and each request head.
    pub header_timeout_secs: u64,
    /// Seconds a request body may take to arrive in full (then 408).
    pub body_timeout_secs: u64,
    /// Seconds a keep-alive connection may sit with no request before it is closed.
    pub idle_timeout_secs: u64,
    /// Connections open at once; past it, new ones wait until one closes.
    pub max_connections: usize,
    /// On SIGTERM: seconds requests in flight and background operations get to finish.
    pub shutdown_deadline_secs: u64,
    /// On SIGTERM, first: seconds `/ready` answers 503 while everything is still served, so
    /// that a load balancer takes this process out of rotation before it stops accepting.
    pub shutdown_delay_secs: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ListenTls {
    pub certificate: PathBuf,
    pub private_key: PathBuf,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Auth {
    pub credentials: Vec<Credential>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Credential {
    pub username: String,
    pub password: Secret,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum StoreConfig {
    Embedded {
        path: PathBuf,
        /// The most the store's page cache may hold in memory, in MiB.
        #[serde(default = "default_cache_mb")]
        cache_mb: u64,
        #[serde(default, skip_serializing)]
        url: Option<Secret>,
    },
    Mysql {
        url: Secret,
        #[serde(default, skip_serializing)]
        path: Option<PathBuf>,
        #[serde(default, skip_serializing)]
        cache_mb: Option<u64>,
    },
}

fn default_cache_mb() -> u64 {
    16
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerSettings {
    pub external_url: String,
    /// Seconds between storage quota passes.
    pub quota_interval_secs: u64,
    pub operation_timeout_secs: u64,
    pub retry_after_secs: u64,
    pub max_body_bytes: usize,
    /// `/ready` probes the store and backends at most once per this many seconds.
    pub ready_interval_secs: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    pub format: LogFormat,
    pub level: String,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Backends {
    #[serde(default)]
    pub mysql: Option<MysqlBackendConfig>,
    #[serde(default)]
    pub mongodb: Option<ServerBackendConfig>,
    #[serde(default)]
    pub swift: Option<SwiftBackendConfig>,
    #[serde(default)]
    pub cubrid: Option<CubridBackendConfig>,
    #[serde(default)]
    pub postgresql: Option<ServerBackendConfig>,
    #[serde(default)]
    pub redis: Option<ServerBackendConfig>,
    #[serde(default)]
    pub logs: Option<LogsBackendConfig>,
}

/// The log service (the seed's section 2.4): drains on the broker's own listener, lines
/// kept in the state store. It needs no server.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LogsBackendConfig {
    /// How often the lines received are written to the store, in one batch per instance.
    #[serde(default = "thousand")]
    pub flush_interval_ms: u64,
    /// The most lines one instance may have waiting for the next write; past it the
    /// flooding app's oldest go first (and are counted).
    #[serde(default = "ten_thousand")]
    pub max_pending_lines: u64,
    /// Also receive syslog over TCP (RFC 6587 octet counting) here, `host:port`; each
    /// message goes to the log instances its app (APP-NAME) is bound to.
    #[serde(default)]
    pub syslog_listen: Option<String>,
    /// The most connections the syslog listener serves at once.
    #[serde(default = "two_hundred_fifty_six")]
    pub syslog_max_connections: usize,
    #[serde(default)]
    pub max_db_per_node: Option<u64>,
}

fn thousand() -> u64 {
    1000
}

fn ten_thousand() -> u64 {
    10_000
}

fn two_hundred_fifty_six() -> usize {
    256
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CubridBackendConfig {
    /// CUBRID's `cubrid` utility on the broker's host.
    pub cubrid: PathBuf,
    /// CUBRID's `csql`.
    pub csql: PathBuf,
    /// Where each instance's database gets a directory of its own (absolute).
    pub databases_dir: PathBuf,
    /// Host and CUBRID broker port apps connect to, written into credentials.
    pub public_host: String,
    #[serde(default = "cubrid_broker_port")]
    pub public_port: u16,
    /// The dba password the broker gives every new database (letters and digits).
    pub dba_password: Secret,
    /// Seconds one CUBRID command may take before the broker answers 503.
    #[serde(default = "sixty")]
    pub timeout_secs: u64,
    /// The seed's `max_db_per_node`: at most this many instances on this backend (across
    /// all its services); past it, provisions get 507. Unlimited when absent.
    #[serde(default)]
    pub max_db_per_node: Option<u64>,
}

fn cubrid_broker_port() -> u16 {
    33000
}

fn sixty() -> u64 {
    60
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SwiftBackendConfig {
    /// The Swift proxy with swauth, as the broker reaches it: http://host:port.
    pub url: String,
    /// The proxy as apps reach it, written into credentials; default: `url`.
    #[serde(default)]
    pub public_url: Option<String>,
    /// swauth's `super_admin_key`.
    pub admin_key: Secret,
    /// Seconds each call to the proxy may take before the broker answers 503.
    #[serde(default = "ten")]
    pub timeout_secs: u64,
    /// The seed's `max_db_per_node`: at most this many instances on this backend (across
    /// all its services); past it, provisions get 507. Unlimited when absent.
    #[serde(default)]
    pub max_db_per_node: Option<u64>,
}

fn ten() -> u64 {
    10
}

/// A backend reached at one admin URL: MongoDB
/// (`mongodb://user:password@host:port/?authSource=admin`, root or userAdminAnyDatabase and
/// dbAdminAnyDatabase), PostgreSQL (`postgres://user:password@host:port/postgres`, CREATEDB
/// and CREATEROLE) and Redis (`redis://user:password@host:port`, a user that may run ACL).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServerBackendConfig {
    pub url: Secret,
    /// Host and port written into credentials; default: the url's.
    #[serde(default)]
    pub public_host: Option<String>,
    #[serde(default)]
    pub public_port: Option<u16>,
    /// Seconds to wait for the server before answering 503.
    #[serde(default = "five")]
    pub connect_timeout_secs: u64,
    /// TLS to the server (PostgreSQL, Redis): a PEM file with the CA of the server's
    /// certificate. Set, the admin connection uses TLS and checks the certificate, and
    /// binding credentials ask apps to do the same (and carry the CA as `ca_certificate`).
    /// MongoDB takes TLS from its URL's options instead.
    #[serde(default)]
    pub ca_certificate: Option<PathBuf>,
    /// The seed's `max_db_per_node`: at most this many instances on this backend (across
    /// all its services); past it, provisions get 507. Unlimited when absent.
    #[serde(default)]
    pub max_db_per_node: Option<u64>,
}

fn five() -> u64 {
    5
}

impl Backends {
    /// The `max_db_per_node` of the backend called `name`, if it is configured with one.
    pub fn max_db_per_node(&self, kind: BackendKind) -> Option<u64> {
        match kind {
            BackendKind::Mysql => self.mysql.as_ref()?.max_db_per_node,
            BackendKind::Mongodb => self.mongodb.as_ref()?.max_db_per_node,
            BackendKind::Swift => self.swift.as_ref()?.max_db_per_node,
            BackendKind::Cubrid => self.cubrid.as_ref()?.max_db_per_node,
            BackendKind::Postgresql => self.postgresql.as_ref()?.max_db_per_node,
            BackendKind::Redis => self.redis.as_ref()?.max_db_per_node,
            BackendKind::Logs => self.logs.as_ref()?.max_db_per_node,
        }
    }

    /// The backends configured.
    pub fn configured(&self) -> Vec<BackendKind> {
        let Backends {
            mysql,
            mongodb,
            swift,
            cubrid,
            postgresql,
            redis,
            logs,
        } = self;
        [
            (BackendKind::Mysql, mysql.is_some()),
            (BackendKind::Mongodb, mongodb.is_some()),
            (BackendKind::Swift, swift.is_some()),
            (BackendKind::Cubrid, cubrid.is_some()),
            (BackendKind::Postgresql, postgresql.is_some()),
            (BackendKind::Redis, redis.is_some()),
            (BackendKind::Logs, logs.is_some()),
        ]
        .into_iter()
        .filter_map(|(name, on)| on.then_some(name))
        .collect()
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MysqlBackendConfig {
    pub url: Secret,
    #[serde(default)]
    pub public_host: Option<String>,
    #[serde(default)]
    pub public_port: Option<u16>,
    pub connect_timeout_secs: u64,
    pub max_connections: usize,
    /// Total storage the plans of all instances may promise, in MB; unlimited when absent.
    #[serde(default)]
    pub max_total_storage_mb: Option<u64>,
    /// TLS to the server: the CA (a PEM file) its certificate is checked against. When set,
    /// the broker connects over TLS, binding users must use TLS too (`REQUIRE SSL`), and
    /// credentials carry the CA as `ca_certificate`.
    #[serde(default)]
    pub ca_certificate: Option<PathBuf>,
    /// The seed's `max_db_per_node`: at most this many instances on this backend (across
    /// all its services); past it, provisions get 507. Unlimited when absent.
    #[serde(default)]
    pub max_db_per_node: Option<u64>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogConfig {
    pub services: Vec<ServiceConfig>,
}

pub use upstreams::settings::Secret;

impl Config {
    /// Loads the layers in order and validates the result.
    pub fn load(file: Option<&Path>) -> anyhow::Result<Config> {
        let mut figment = Figment::new().merge(Yaml::string(DEFAULTS));
        if let Some(file) = file {
            if !file.exists() {
                bail!("configuration file {} does not exist", file.display());
            }
            figment = figment.merge(Yaml::file(file));
        }
        figment = figment.merge(Env::prefixed("BROKERAGE_").split("__"));
        if let Ok(vcap) = std::env::var("VCAP_SERVICES") {
            if let Some(url) = vcap_mysql_url(&vcap)? {
                // A MySQL service bound to the app is the shared store, so scaling out is safe.
                figment = figment
                    .merge(Serialized::default("store.kind", "mysql"))
                    .merge(Serialized::default("store.url", url));
            }
        }
        if let Ok(port) = std::env::var("PORT") {
            let port: u16 = port
                .parse()
                .with_context(|| format!("$PORT {port:?} is not a TCP port"))?;
            figment = figment.merge(Serialized::default("listen.port", port));
        }
        let config: Config = figment.extract().map_err(describe_figment_error)?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> anyhow::Result<()> {
        if self.auth.credentials.is_empty() {
            bail!("auth.credentials: at least one username/password pair is required");
        }
        for (i, c) in self.auth.credentials.iter().enumerate() {
            if c.username.is_empty() || c.username.contains(':') {
                bail!("auth.credentials[{i}].username: must be non-empty and contain no ':'");
            }
            if c.password.expose().len() < 8 {
                bail!("auth.credentials[{i}].password: must be at least 8 characters");
            }
        }
        if self.broker.operation_timeout_secs == 0 || self.broker.operation_timeout_secs > 55 {
            bail!("broker.operation_timeout_secs: must be between 1 and 55 (Cloud Controller gives up after 60)");
        }
        if self.broker.quota_interval_secs == 0 {
            bail!("broker.quota_interval_secs: must be at least 1");
        }
        if self.broker.max_body_bytes < 1024 {
            bail!("broker.max_body_bytes: must be at least 1024");
        }
        if self.broker.ready_interval_secs == 0 {
            bail!("broker.ready_interval_secs: must be at least 1");
        }
        let l = &self.listen;
        if l.header_timeout_secs == 0 || l.body_timeout_secs == 0 || l.idle_timeout_secs == 0 {
            bail!("listen.header_timeout_secs, body_timeout_secs and idle_timeout_secs: must be at least 1");
        }
        if l.max_connections == 0 {
            bail!("listen.max_connections: must be at least 1");
        }
        for (i, host) in self.sso.allowed_cloud_controllers.iter().enumerate() {
            if api_host(host).is_none() {
                bail!("sso.allowed_cloud_controllers[{i}]: {host:?} must be a host or host:port");
            }
        }
        match &self.store {
            StoreConfig::Mysql { url, .. } => check_mysql_url("store.url", url)?,
            StoreConfig::Embedded { path, .. } if path.as_os_str().is_empty() => {
                bail!("store.path: must name a file")
            }
            StoreConfig::Embedded { cache_mb: 0, .. } => {
                bail!("store.cache_mb: must be at least 1")
            }
            StoreConfig::Embedded { .. } => {}
        }
        if let Some(mysql) = &self.backends.mysql {
            check_mysql_url("backends.mysql.url", &mysql.url)?;
            if mysql.max_connections == 0 {
                bail!("backends.mysql.max_connections: must be at least 1");
            }
        }
        if self
            .log
            .level
            .parse::<tracing_subscriber::EnvFilter>()
            .is_err()
        {
            bail!("log.level: {:?} is not a tracing filter", self.log.level);
        }
        if self.sso.authorization_endpoint.is_some() != self.sso.token_endpoint.is_some() {
            bail!("sso.authorization_endpoint and sso.token_endpoint: set both or neither");
        }
        if let Some(cc) = &self.sso.cloud_controller_url {
            Url::parse(cc).map_err(|e| anyhow::anyhow!("sso.cloud_controller_url: {e}"))?;
        }
        if !matches!(self.sso.api_info_scheme.as_str(), "https" | "http") {
            bail!("sso.api_info_scheme: must be https or http");
        }
        if self.sso.session_secret.expose().len() < 32 {
            bail!("sso.session_secret: must be at least 32 characters");
        }
        if self.sso.session_lifetime_secs == 0 || self.sso.timeout_secs == 0 {
            bail!("sso.session_lifetime_secs and sso.timeout_secs: must be positive");
        }
        if self.federation.refresh_secs == 0 {
            bail!("federation.refresh_secs: must be at least 1");
        }
        let mut aliases = std::collections::HashSet::new();
        for (i, u) in self.upstreams.iter().enumerate() {
            if !is_cli_name(&u.alias) || u.alias == "local" || u.alias.len() > 40 {
                bail!("upstreams[{i}].alias: {:?} must be 1 to 40 of a-z, 0-9 and '-' (and not \"local\")", u.alias);
            }
            if !aliases.insert(u.alias.clone()) {
                bail!("upstreams[{i}].alias: {:?} is used twice", u.alias);
            }
            if u.request_timeout_secs == 0 || u.request_timeout_secs > 55 {
                bail!("upstreams[{i}].request_timeout_secs: must be between 1 and 55 (Cloud Controller gives up after 60)");
            }
        }
        Ok(())
    }

    /// The keys still holding a secret that ships with Brokerage (in the built-in defaults or
    /// `config/all-backends.yml`), which anybody can read.
    pub fn default_secrets(&self) -> Vec<String> {
        let shipped = shipped_secrets();
        let mut mine: Vec<(String, &str)> = Vec::new();
        for (key, list) in [
            ("auth.credentials", &self.auth.credentials),
            ("metrics.credentials", &self.metrics.credentials),
        ] {
            for (i, c) in list.iter().enumerate() {
                mine.push((format!("{key}[{i}].password"), c.password.expose()));
            }
        }
        mine.push((
            "sso.session_secret".into(),
            self.sso.session_secret.expose(),
        ));
        for s in &self.catalog.services {
            if let Some(dc) = &s.service.dashboard_client {
                let key = format!(
                    "catalog service {}: dashboard_client.secret",
                    s.service.name
                );
                mine.push((key, &dc.secret));
            }
        }
        if let Some(swift) = &self.backends.swift {
            mine.push(("backends.swift.admin_key".into(), swift.admin_key.expose()));
        }
        if let Some(cubrid) = &self.backends.cubrid {
            mine.push((
                "backends.cubrid.dba_password".into(),
                cubrid.dba_password.expose(),
            ));
        }
        mine.into_iter()
            .filter(|(_, value)| shipped.iter().any(|s| s == value))
            .map(|(key, _)| key)
            .collect()
    }

    /// The effective configuration as YAML, every secret masked.
    pub fn to_masked_yaml(&self) -> String {
        // Upstream secrets serialize as "***" by themselves.
        let mut masked = self.clone();
        for c in masked
            .auth
            .credentials
            .iter_mut()
            .chain(masked.metrics.credentials.iter_mut())
        {
            c.password = Secret::new("***");
        }
        masked.sso.session_secret = Secret::new("***");
        for s in &mut masked.catalog.services {
            if let Some(dc) = &mut s.service.dashboard_client {
                dc.secret = "***".into();
            }
        }
        serde_yaml::to_string(&masked).unwrap_or_default()
    }
}

/// Every secret value written in the configuration files that ship with Brokerage.
fn shipped_secrets() -> Vec<String> {
    const KEYS: &[&str] = &[
        "password",
        "secret",
        "session_secret",
        "admin_key",
        "dba_password",
    ];
    fn walk(value: &serde_yaml::Value, out: &mut Vec<String>) {
        match value {
            serde_yaml::Value::Mapping(map) => {
                for (k, v) in map {
                    if let (Some(k), Some(v)) = (k.as_str(), v.as_str()) {
                        if KEYS.contains(&k) {
                            out.push(v.to_string());
                        }
                    }
                    walk(v, out);
                }
            }
            serde_yaml::Value::Sequence(items) => items.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    for file in [DEFAULTS, include_str!("../config/all-backends.yml")] {
        if let Ok(value) = serde_yaml::from_str(file) {
            walk(&value, &mut out);
        }
    }
    out
}

/// The first MySQL service in Cloud Foundry's `VCAP_SERVICES`, as a URL.
pub fn vcap_mysql_url(vcap: &str) -> anyhow::Result<Option<String>> {
    let services: serde_json::Value =
        serde_json::from_str(vcap).context("VCAP_SERVICES is not JSON")?;
    let Some(offerings) = services.as_object() else {
        bail!("VCAP_SERVICES must be a JSON object of service lists");
    };
    for (label, instances) in offerings {
        for instance in instances.as_array().into_iter().flatten() {
            let tagged = instance["tags"].as_array().is_some_and(|t| {
                t.iter()
                    .any(|t| t.as_str().is_some_and(|t| t.eq_ignore_ascii_case("mysql")))
            });
            let creds = &instance["credentials"];
            let uri = creds["uri"].as_str().filter(|u| u.starts_with("mysql://"));
            if !(tagged || label.contains("mysql") || uri.is_some()) {
                continue;
            }
            if let Some(uri) = uri {
                let mut url = Url::parse(uri).context("VCAP_SERVICES: a MySQL uri is not a URL")?;
                // Driver options such as reconnect=true are not for this client.
                url.set_query(None);
                return Ok(Some(url.to_string()));
            }
            let field = |k: &str| {
                creds[k]
                    .as_str()
                    .map(str::to_string)
                    .or_else(|| creds[k].as_u64().map(|n| n.to_string()))
            };
            if let (Some(host), Some(name), Some(user), Some(password)) = (
                field("hostname"),
                field("name"),
                field("username"),
                field("password"),
            ) {
                let mut url = Url::parse(&format!(
                    "mysql://{host}:{}/{name}",
                    field("port").unwrap_or_else(|| "3306".into())
                ))
                .context("VCAP_SERVICES: MySQL credentials do not form a URL")?;
                let _ = url.set_username(&user);
                let _ = url.set_password(Some(&password));
                return Ok(Some(url.to_string()));
            }
        }
    }
    Ok(None)
}

/// One server, or the nodes of a Galera cluster: `mysql://user:password@h1:p1,h2:p2/db`.
fn check_mysql_url(key: &str, url: &Secret) -> anyhow::Result<()> {
    for node in crate::mysql::node_urls(url.expose()) {
        let parsed = Url::parse(&node).map_err(|e| anyhow::anyhow!("{key}: not a URL ({e})"))?;
        if parsed.scheme() != "mysql" || parsed.host_str().is_none() {
            bail!("{key}: must look like mysql://user:password@host:port/database (or host1:port1,host2:port2 for a cluster's nodes)");
        }
    }
    Ok(())
}

/// A configuration key as the documentation and the catalog's own checks write it:
/// `catalog.services[0].backend`.
fn key_of(path: &[String]) -> String {
    let mut key = String::new();
    for segment in path {
        if !segment.is_empty() && segment.bytes().all(|b| b.is_ascii_digit()) {
            key.push_str(&format!("[{segment}]"));
        } else {
            if !key.is_empty() {
                key.push('.');
            }
            key.push_str(segment);
        }
    }
    key
}

fn describe_figment_error(e: figment::Error) -> anyhow::Error {
    let messages: Vec<String> = e
        .into_iter()
        .map(|err| {
            let key = key_of(&err.path);
            if key.is_empty() {
                format!("configuration: {}", err.kind)
            } else {
                format!("{key}: {}", err.kind)
            }
        })
        .collect();
    anyhow::anyhow!(messages.join("; "))
}

#[cfg(test)]
mod tests {
    use super::vcap_mysql_url;
    use figment::providers::Format;

    /// The name a kind is written with in the configuration is the one it prints with.
    #[test]
    fn backend_kinds_read_and_print_by_the_same_name() {
        use super::BackendKind::*;
        for kind in [Mysql, Mongodb, Swift, Cubrid, Postgresql, Redis, Logs] {
            let read: super::BackendKind = serde_json::from_value(kind.name().into()).unwrap();
            assert_eq!(read, kind);
            assert_eq!(serde_json::to_value(kind).unwrap(), kind.name());
        }
    }

    /// An unknown backend kind is refused at the key the catalog's checks use.
    #[test]
    fn an_unknown_backend_is_named_by_its_key() {
        let figment = figment::Figment::new()
            .merge(figment::providers::Yaml::string(super::DEFAULTS))
            .merge(figment::providers::Yaml::string(
                "catalog: {services: [{id: s1, name: small, description: d, bindable: true, backend: oracle, plans: [{id: p1, name: tiny, description: d, max_storage_mb: 1, max_user_connections: 1}]}]}",
            ));
        let error = figment
            .extract::<super::Config>()
            .map_err(super::describe_figment_error)
            .unwrap_err()
            .to_string();
        assert!(
            error.starts_with("catalog.services[0].backend: "),
            "{error}"
        );
        assert!(
            error.contains("oracle") && error.contains("mysql"),
            "{error}"
        );
    }

    #[test]
    fn shipped_secrets_are_named() {
        let config: super::Config = figment::Figment::new()
            .merge(figment::providers::Yaml::string(super::DEFAULTS))
            .extract()
            .unwrap();
        let found = config.default_secrets();
        for key in [
            "auth.credentials[0].password",
            "metrics.credentials[0].password",
            "sso.session_secret",
            "catalog service mysql-db: dashboard_client.secret",
        ] {
            assert!(found.iter().any(|f| f == key), "{key} not in {found:?}");
        }
    }

    #[test]
    fn vcap_services_name_the_store() {
        let uri = r#"{"p.mysql": [{"name": "store", "tags": ["mysql"],
            "credentials": {"uri": "mysql://u:p%40ss@db.internal:3306/cf_1?reconnect=true"}}]}"#;
        assert_eq!(
            vcap_mysql_url(uri).unwrap().as_deref(),
            Some("mysql://u:p%40ss@db.internal:3306/cf_1")
        );
        let fields = r#"{"user-provided": [{"name": "db", "tags": ["MySQL"], "credentials":
            {"hostname": "10.0.0.5", "port": 13306, "name": "brokerage", "username": "b", "password": "s/cret"}}]}"#;
        assert_eq!(
            vcap_mysql_url(fields).unwrap().as_deref(),
            Some("mysql://b:s%2Fcret@10.0.0.5:13306/brokerage")
        );
        assert_eq!(
            vcap_mysql_url(r#"{"redis": [{"credentials": {"uri": "redis://x"}}]}"#).unwrap(),
            None
        );
        assert!(vcap_mysql_url("not json").is_err());
    }
}
