//! Spawning brokers (in this process on port 0, or as real `brokerage` processes), talking
//! OSB to them, and looking at the real MariaDB the test script started.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use brokerage::config::Config;
use mysql_async::prelude::*;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tempfile::TempDir;

pub const USER: &str = "test-broker";
pub const PASSWORD: &str = "test-broker-password";

pub const SERVICE: &str = "svc-mysql-test";
pub const SMALL: &str = "plan-small";
pub const LARGE: &str = "plan-large";
pub const ASYNC: &str = "plan-async";
pub const MAINT: &str = "plan-maint";
pub const FIXED_SERVICE: &str = "svc-mysql-fixed";
pub const FIXED_A: &str = "plan-fixed-a";
pub const FIXED_B: &str = "plan-fixed-b";

/// The admin URL of the throwaway MariaDB `scripts/test` started.
pub fn mysql_url() -> String {
    std::env::var("BKG_TEST_MYSQL_URL").expect(
        "BKG_TEST_MYSQL_URL is not set: run the suite with ./scripts/test, which starts a throwaway MariaDB",
    )
}

pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4())
}

/// Where a broker keeps its records.
#[derive(Clone, Debug)]
pub enum StoreKind {
    Embedded(PathBuf),
    /// A database on the test MariaDB, by name.
    Mysql(String),
    /// Any MySQL URL.
    Url(String),
}

impl StoreKind {
    pub fn fresh_mysql() -> StoreKind {
        StoreKind::Mysql(format!("bkgstore_{}", uuid::Uuid::new_v4().simple()))
    }

    fn yaml(&self) -> String {
        match self {
            StoreKind::Embedded(path) => {
                format!(
                    "store: {{kind: embedded, path: {:?}}}",
                    path.display().to_string()
                )
            }
            StoreKind::Mysql(db) => {
                format!("store: {{kind: mysql, url: \"{}/{db}\"}}", mysql_url())
            }
            StoreKind::Url(url) => format!("store: {{kind: mysql, url: \"{url}\"}}"),
        }
    }
}

/// A configuration file in a temporary directory, with the test catalog.
pub struct TestConfig {
    pub dir: TempDir,
    pub store: StoreKind,
    pub mysql_backend_url: String,
    pub port: u16,
    /// YAML flow mappings, one per upstream.
    pub upstreams: Vec<String>,
    /// `sso.session_lifetime_secs`.
    pub sso: u64,
    /// `listen.tls` as a YAML flow mapping.
    pub tls: Option<String>,
    /// `backends.mysql.max_total_storage_mb`.
    pub capacity_mb: Option<u64>,
    /// `backends.mysql.ca_certificate`.
    pub mysql_ca: Option<PathBuf>,
    /// More `backends` entries, each a `name: {flow mapping}` line.
    pub backends: Vec<String>,
    /// More catalog services, each a YAML flow mapping.
    pub services: Vec<String>,
    /// More `listen` keys, as `key: value` (flow mapping entries).
    pub listen: Vec<String>,
    /// More `broker` keys, as `key: value`.
    pub broker: Vec<String>,
    /// More `sso` keys, as `key: value` (flow mapping entries).
    pub sso_keys: Vec<String>,
}

impl TestConfig {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = StoreKind::Embedded(dir.path().join("state.redb"));
        TestConfig {
            dir,
            store,
            mysql_backend_url: mysql_url(),
            port: 0,
            upstreams: Vec::new(),
            sso: 600,
            tls: None,
            capacity_mb: None,
            mysql_ca: None,
            backends: Vec::new(),
            services: Vec::new(),
            listen: Vec::new(),
            broker: Vec::new(),
            sso_keys: Vec::new(),
        }
    }

    /// Adds `key: value` to `listen`.
    pub fn with_listen(mut self, entry: &str) -> Self {
        self.listen.push(entry.to_string());
        self
    }

    /// Adds `key: value` to `broker`.
    pub fn with_broker(mut self, entry: &str) -> Self {
        self.broker.push(entry.to_string());
        self
    }

    /// Adds `key: value` to `sso`.
    pub fn with_sso(mut self, entry: &str) -> Self {
        self.sso_keys.push(entry.to_string());
        self
    }

    /// Reaches the MySQL backend over TLS, checking its certificate against `ca`.
    pub fn with_mysql_ca(mut self, ca: PathBuf) -> Self {
        self.mysql_ca = Some(ca);
        self
    }

    /// Adds a backend (`name: {...}`) and services using it (YAML flow mappings).
    pub fn with_backend(mut self, backend: String, services: Vec<String>) -> Self {
        self.backends.push(backend);
        self.services.extend(services);
        self
    }

    /// Adds services of the MySQL backend every test configuration has.
    pub fn with_services(mut self, services: Vec<String>) -> Self {
        self.services.extend(services);
        self
    }

    pub fn with_capacity_mb(mut self, mb: u64) -> Self {
        self.capacity_mb = Some(mb);
        self
    }

    pub fn with_tls(mut self, certificate: &Path, key: &Path) -> Self {
        self.tls = Some(format!(
            "{{certificate: {:?}, private_key: {:?}}}",
            certificate.display().to_string(),
            key.display().to_string()
        ));
        self
    }

    pub fn with_session_lifetime(mut self, secs: u64) -> Self {
        self.sso = secs;
        self
    }

    pub fn with_upstream(mut self, yaml_flow_mapping: String) -> Self {
        self.upstreams.push(yaml_flow_mapping);
        self
    }

    pub fn with_store(mut self, store: StoreKind) -> Self {
        self.store = store;
        self
    }

    pub fn with_backend_url(mut self, url: &str) -> Self {
        self.mysql_backend_url = url.to_string();
        self
    }

    pub fn with_port(mut self, port: u16) -> Self {
        self.port = port;
        self
    }

    pub fn path(&self) -> PathBuf {
        self.dir.path().join("brokerage.yml")
    }

    /// Writes the file and returns its path.
    pub fn write(&self) -> PathBuf {
        let text = format!(
            r#"
listen: {{host: 127.0.0.1, port: {port}{tls}{listen}}}
auth:
  credentials:
    - {{username: {USER}, password: {PASSWORD}}}
    - {{username: second-user, password: second-password}}
{store}
broker:
  external_url: {external}
  operation_timeout_secs: 10
  quota_interval_secs: 1
  retry_after_secs: 1
  max_body_bytes: 65536
{broker}log: {{format: text, level: "info,brokerage=trace"}}
federation: {{refresh_secs: 1, catalog_ttl_secs: 60}}
sso: {{api_info_scheme: http, session_secret: test-session-secret-32-characters-long, session_lifetime_secs: {sso}{sso_keys}}}
upstreams: [{upstreams}]
backends:
  mysql: {{url: "{backend}", connect_timeout_secs: 2, max_connections: 30{capacity}{ca}}}
{backends}
catalog:
  services:
{services}
    - id: {SERVICE}
      name: mysql-test
      backend: mysql
      description: MySQL for tests
      bindable: true
      plan_updateable: true
      instances_retrievable: true
      bindings_retrievable: true
      dashboard_client: {{id: mysql-test-dashboard, secret: dashboard-secret-value}}
      plans:
        - {{id: {SMALL}, name: small, description: 1 MB, max_storage_mb: 1, max_user_connections: 2}}
        - {{id: {LARGE}, name: large, description: 50 MB, max_storage_mb: 50, max_user_connections: 5,
            schemas: {{service_binding: {{create: {{parameters: {{type: object, properties: {{read-only: {{type: boolean}}}}, additionalProperties: false}}}}}},
                      service_instance: {{create: {{parameters: {{type: object, additionalProperties: false}}}}}}}}}}
        - {{id: {ASYNC}, name: async, description: background, max_storage_mb: 10, max_user_connections: 3, asynchronous: true}}
        - {{id: {MAINT}, name: maint, description: versioned, max_storage_mb: 10, max_user_connections: 3, maintenance_info: {{version: "2.0.0"}}}}
    - id: {FIXED_SERVICE}
      name: mysql-fixed
      backend: mysql
      description: MySQL whose plan cannot change and whose bindings go with it
      bindable: true
      plan_updateable: false
      refuse_deprovision_with_bindings: false
      bindings_require_app: true
      plans:
        - {{id: {FIXED_A}, name: fixed-a, description: a, max_storage_mb: 5, max_user_connections: 2}}
        - {{id: {FIXED_B}, name: fixed-b, description: b, max_storage_mb: 5, max_user_connections: 2}}
"#,
            port = self.port,
            listen = self
                .listen
                .iter()
                .map(|e| format!(", {e}"))
                .collect::<String>(),
            broker = self
                .broker
                .iter()
                .map(|e| format!("  {e}\n"))
                .collect::<String>(),
            sso_keys = self
                .sso_keys
                .iter()
                .map(|e| format!(", {e}"))
                .collect::<String>(),
            store = self.store.yaml(),
            backend = self.mysql_backend_url,
            upstreams = self.upstreams.join(", "),
            external = if self.port == 0 {
                "https://brokerage.example.test".to_string()
            } else {
                format!("http://127.0.0.1:{}", self.port)
            },
            sso = self.sso,
            ca = self
                .mysql_ca
                .as_ref()
                .map(|ca| format!(", ca_certificate: {:?}", ca.display().to_string()))
                .unwrap_or_default(),
            backends = self
                .backends
                .iter()
                .map(|b| format!("  {b}\n"))
                .collect::<String>(),
            services = self
                .services
                .iter()
                .map(|s| format!("    - {s}\n"))
                .collect::<String>(),
            capacity = self
                .capacity_mb
                .map(|mb| format!(", max_total_storage_mb: {mb}"))
                .unwrap_or_default(),
            tls = self
                .tls
                .as_ref()
                .map(|t| format!(", tls: {t}"))
                .unwrap_or_default(),
        );
        let path = self.path();
        std::fs::write(&path, text).unwrap();
        path
    }

    pub fn load(&self) -> Config {
        Config::load(Some(&self.write())).expect("test configuration loads")
    }
}

/// A broker serving in this process on a port-0 listener.
pub struct TestApp {
    pub osb: TestClient,
    pub config: TestConfig,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

pub async fn spawn_app() -> TestApp {
    spawn_with(TestConfig::new()).await
}

pub async fn spawn_with(config: TestConfig) -> TestApp {
    let loaded = config.load();
    let prepared = brokerage::startup::prepare(&loaded).expect("the configuration builds");
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", config.port))
        .await
        .unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        brokerage::startup::serve(&loaded, prepared, listener, async {
            let _ = rx.await;
        })
        .await
        .expect("broker serves");
    });
    let app = TestApp {
        osb: TestClient::new(base),
        config,
        shutdown: Some(tx),
        task: Some(task),
    };
    app.wait_healthy().await;
    app
}

impl TestApp {
    /// Shuts the server down gracefully; the returned config restarts it on the same store.
    pub async fn stop(self) -> TestConfig {
        let TestApp {
            config,
            shutdown,
            task,
            ..
        } = self;
        if let Some(tx) = shutdown {
            let _ = tx.send(());
        }
        if let Some(task) = task {
            task.await.unwrap();
        }
        config
    }

    async fn wait_healthy(&self) {
        wait_healthy(&self.client, &self.base).await;
    }
}

impl std::ops::Deref for TestApp {
    type Target = TestClient;
    fn deref(&self) -> &TestClient {
        &self.osb
    }
}

/// OSB calls, with typed helpers, against any broker's base URL.
pub struct TestClient {
    pub base: String,
    pub client: reqwest::Client,
}

impl TestClient {
    pub fn new(base: String) -> Self {
        TestClient {
            base,
            client: reqwest::Client::new(),
        }
    }

    pub fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.client
            .request(method, format!("{}{path}", self.base))
            .basic_auth(USER, Some(PASSWORD))
            .header("X-Broker-API-Version", "2.17")
    }

    /// A provision that names the Cloud Controller it comes from
    /// (`X-Api-Info-Location`).
    pub async fn provision_from(
        &self,
        id: &str,
        service: &str,
        plan: &str,
        api_info_location: &str,
    ) -> Answer {
        Answer::from(
            self.request(Method::PUT, &format!("/v2/service_instances/{id}"))
                .header("X-Api-Info-Location", api_info_location)
                .json(&provision_body(service, plan))
                .send()
                .await
                .unwrap(),
        )
        .await
    }

    pub async fn call(&self, method: Method, path: &str, body: Option<Value>) -> Answer {
        let mut req = self.request(method, path);
        if let Some(body) = body {
            req = req.json(&body);
        }
        Answer::from(req.send().await.expect("the broker answers")).await
    }

    pub async fn catalog(&self) -> Answer {
        self.call(Method::GET, "/v2/catalog", None).await
    }

    pub async fn provision(&self, id: &str, plan: &str) -> Answer {
        self.provision_with(id, provision_body(SERVICE, plan), false)
            .await
    }

    pub async fn provision_with(&self, id: &str, body: Value, accepts_incomplete: bool) -> Answer {
        let q = if accepts_incomplete {
            "?accepts_incomplete=true"
        } else {
            ""
        };
        self.call(
            Method::PUT,
            &format!("/v2/service_instances/{id}{q}"),
            Some(body),
        )
        .await
    }

    pub async fn update(&self, id: &str, body: Value, accepts_incomplete: bool) -> Answer {
        let q = if accepts_incomplete {
            "?accepts_incomplete=true"
        } else {
            ""
        };
        self.call(
            Method::PATCH,
            &format!("/v2/service_instances/{id}{q}"),
            Some(body),
        )
        .await
    }

    pub async fn deprovision(&self, id: &str, service: &str, plan: &str) -> Answer {
        self.deprovision_query(id, &format!("service_id={service}&plan_id={plan}"))
            .await
    }

    pub async fn deprovision_query(&self, id: &str, query: &str) -> Answer {
        self.call(
            Method::DELETE,
            &format!("/v2/service_instances/{id}?{query}"),
            None,
        )
        .await
    }

    pub async fn bind(&self, id: &str, binding: &str, plan: &str) -> Answer {
        self.bind_with(
            id,
            binding,
            json!({"service_id": SERVICE, "plan_id": plan, "app_guid": "app-1"}),
            false,
        )
        .await
    }

    pub async fn bind_with(
        &self,
        id: &str,
        binding: &str,
        body: Value,
        accepts_incomplete: bool,
    ) -> Answer {
        let q = if accepts_incomplete {
            "?accepts_incomplete=true"
        } else {
            ""
        };
        self.call(
            Method::PUT,
            &format!("/v2/service_instances/{id}/service_bindings/{binding}{q}"),
            Some(body),
        )
        .await
    }

    pub async fn unbind(&self, id: &str, binding: &str, plan: &str) -> Answer {
        self.unbind_from(id, binding, SERVICE, plan).await
    }

    pub async fn unbind_from(&self, id: &str, binding: &str, service: &str, plan: &str) -> Answer {
        self.call(
            Method::DELETE,
            &format!("/v2/service_instances/{id}/service_bindings/{binding}?service_id={service}&plan_id={plan}"),
            None,
        )
        .await
    }

    /// Provisions an instance of any service and binds it once, returning the credentials.
    pub async fn provision_and_bind(&self, id: &str, service: &str, plan: &str) -> Value {
        self.provision_with(id, provision_body(service, plan), false)
            .await
            .expect(201);
        let bound = self
            .bind_with(
                id,
                &format!("{id}-b"),
                json!({"service_id": service, "plan_id": plan, "app_guid": "app-1"}),
                false,
            )
            .await;
        bound.expect(201);
        bound.body["credentials"].clone()
    }

    pub async fn last_operation(&self, id: &str, operation: Option<&str>) -> Answer {
        let q = operation
            .map(|o| format!("?operation={o}&service_id={SERVICE}"))
            .unwrap_or_default();
        self.call(
            Method::GET,
            &format!("/v2/service_instances/{id}/last_operation{q}"),
            None,
        )
        .await
    }

    /// Polls a `last_operation` path until it answers 410 Gone (a finished delete).
    pub async fn poll_until_gone(&self, path: &str) -> Answer {
        let mut last = self.call(Method::GET, path, None).await;
        for _ in 0..200 {
            if last.status == StatusCode::GONE {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            last = self.call(Method::GET, path, None).await;
        }
        last
    }

    /// Polls until the operation leaves "in progress".
    pub async fn poll(&self, id: &str, operation: &str) -> Answer {
        for _ in 0..200 {
            let answer = self.last_operation(id, Some(operation)).await;
            if answer.status != StatusCode::OK || answer.body["state"] != "in progress" {
                return answer;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("operation {operation} on {id} never finished");
    }
}

pub async fn wait_healthy(client: &reqwest::Client, base: &str) {
    for _ in 0..300 {
        if let Ok(r) = client.get(format!("{base}/health")).send().await {
            if r.status().is_success() {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("broker at {base} never became healthy");
}

pub fn provision_body(service: &str, plan: &str) -> Value {
    json!({
        "service_id": service,
        "plan_id": plan,
        "organization_guid": "org-guid",
        "space_guid": "space-guid",
        "context": {"platform": "cloudfoundry", "organization_guid": "org-guid", "space_guid": "space-guid"}
    })
}

/// An answer as a client sees it.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
    pub raw: String,
}

impl Answer {
    pub async fn from(response: reqwest::Response) -> Answer {
        let status = response.status();
        let headers = response.headers().clone();
        let raw = response.text().await.unwrap_or_default();
        let body = serde_json::from_str(&raw).unwrap_or(Value::Null);
        Answer {
            status,
            headers,
            body,
            raw,
        }
    }

    #[track_caller]
    pub fn expect(&self, status: u16) -> &Self {
        assert_eq!(
            self.status.as_u16(),
            status,
            "unexpected answer: {}",
            self.raw
        );
        assert!(
            self.body.is_object(),
            "every body is a JSON object: {}",
            self.raw
        );
        self
    }

    /// Asserts an OSB error body with this status and, when given, this error code.
    #[track_caller]
    pub fn expect_error(&self, status: u16, code: Option<&str>) -> &Self {
        self.expect(status);
        assert!(
            self.body["description"]
                .as_str()
                .is_some_and(|d| !d.is_empty()),
            "an error body says what went wrong: {}",
            self.raw
        );
        if let Some(code) = code {
            assert_eq!(self.body["error"], code, "{}", self.raw);
        }
        self
    }

    pub fn operation(&self) -> String {
        self.body["operation"]
            .as_str()
            .expect("an operation token")
            .to_string()
    }
}

// ---- the MariaDB the tests run against ---------------------------------------------

pub async fn admin() -> mysql_async::Conn {
    mysql_async::Conn::from_url(mysql_url())
        .await
        .expect("the test MariaDB answers")
}

pub async fn database_exists(name: &str) -> bool {
    has_database(&mut admin().await, name).await
}

pub async fn user_exists(name: &str) -> bool {
    has_user(&mut admin().await, name).await
}

/// Whether the server behind `conn` holds the database `name`.
pub async fn has_database(conn: &mut mysql_async::Conn, name: &str) -> bool {
    let found: Option<String> = conn
        .exec_first(
            "SELECT SCHEMA_NAME FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = ?",
            (name,),
        )
        .await
        .unwrap();
    found.is_some()
}

/// Whether the server behind `conn` holds the user `name`.
pub async fn has_user(conn: &mut mysql_async::Conn, name: &str) -> bool {
    let n: Option<i64> = conn
        .exec_first("SELECT COUNT(*) FROM mysql.user WHERE User = ?", (name,))
        .await
        .unwrap();
    n.unwrap_or(0) > 0
}

/// As the app bound with `conn`: a `notes` table holding 'kept', and a `blobs` table.
pub async fn quota_tables(conn: &mut mysql_async::Conn) {
    for statement in [
        "CREATE TABLE notes (body VARCHAR(20)) ENGINE=InnoDB",
        "CREATE TABLE blobs (id INT PRIMARY KEY, data LONGBLOB) ENGINE=InnoDB",
        "INSERT INTO notes VALUES ('kept')",
    ] {
        conn.query_drop(statement).await.unwrap();
    }
}

/// Puts 1.8 MB into `blobs`: over a 1 MB plan's quota.
pub async fn fill_blobs(conn: &mut mysql_async::Conn) {
    for i in 0..3 {
        conn.exec_drop("INSERT INTO blobs VALUES (?, REPEAT('x', 600000))", (i,))
            .await
            .unwrap();
    }
}

/// Waits until an INSERT into `notes` as the binding's user is refused (or allowed, per
/// `refused`); how long that took.
pub async fn wait_for_insert(credentials: &Value, refused: bool) -> Duration {
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_secs(30) {
        let mut conn = connect_as(credentials).await.unwrap();
        let result = conn.query_drop("INSERT INTO notes VALUES ('probe')").await;
        let done = match (&result, refused) {
            (Err(mysql_async::Error::Server(e)), true) => e.code == 1142,
            (Ok(()), false) => {
                conn.query_drop("DELETE FROM notes WHERE body = 'probe'")
                    .await
                    .unwrap();
                true
            }
            _ => false,
        };
        // Closed, not dropped: a plan may allow only two connections, and a dropped one's
        // session can outlive the drop for a moment.
        let _ = conn.disconnect().await;
        if done {
            return started.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!(
        "INSERT as {} on port {} never became {}",
        credentials["username"],
        credentials["port"],
        if refused { "refused" } else { "allowed" }
    );
}

/// What a broker at `base` serves on `/metrics`, read with the built-in metrics credentials.
pub async fn metrics_text(base: &str) -> String {
    reqwest::Client::new()
        .get(format!("{base}/metrics"))
        .basic_auth("metrics", Some("brokerage-dev-metrics-password"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The sum of every sample of the metric `name` (all label sets) a broker at `base` reports.
pub async fn metric(base: &str, name: &str) -> f64 {
    metrics_text(base)
        .await
        .lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Connects exactly as an app would, from a binding's credentials.
pub async fn connect_as(credentials: &Value) -> Result<mysql_async::Conn, mysql_async::Error> {
    let opts = mysql_async::OptsBuilder::default()
        .ip_or_hostname(credentials["hostname"].as_str().unwrap())
        .tcp_port(credentials["port"].as_u64().unwrap() as u16)
        .user(credentials["username"].as_str())
        .pass(credentials["password"].as_str())
        .db_name(credentials["name"].as_str())
        .prefer_socket(false);
    mysql_async::Conn::new(opts).await
}

// ---- real broker processes -----------------------------------------------------------

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `brokerage serve` process, its logs written to a file.
pub struct BrokerProcess {
    pub child: Child,
    pub base: String,
    pub log: PathBuf,
}

impl BrokerProcess {
    pub async fn start(config_file: &Path, port: u16, log: &Path) -> BrokerProcess {
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_brokerage"))
            .args(["serve", "--config"])
            .arg(config_file)
            .env_remove("PORT")
            .env("RUST_LOG", "trace")
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("brokerage starts");
        let base = format!("http://127.0.0.1:{port}");
        wait_healthy(&reqwest::Client::new(), &base).await;
        BrokerProcess {
            child,
            base,
            log: log.to_path_buf(),
        }
    }

    pub fn kill9(&mut self) {
        self.child.kill().unwrap(); // SIGKILL on Unix
        self.child.wait().unwrap();
    }

    pub fn client(&self) -> TestClient {
        TestClient::new(self.base.clone())
    }
}

/// Sends SIGTERM and waits (at most 20 s) for the process to exit.
pub async fn sigterm_and_wait(child: &mut std::process::Child) -> std::process::ExitStatus {
    let sent = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let started = std::time::Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "still running 20 s after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---- upstream brokers and an OAuth2 server, as real processes --------------------------

fn tool(var: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| {
        panic!("{var} is not set: run the suite with ./scripts/test, which installs the test tools")
    })
}

/// A child process that prints `LISTENING <port>` when it serves.
pub struct Listening {
    pub child: Child,
    pub base: String,
}

impl Listening {
    pub fn spawn(mut cmd: Command) -> Listening {
        use std::io::{BufRead, BufReader};
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the fixture starts");
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let port = loop {
            let line = lines
                .next()
                .expect("the fixture says where it listens")
                .unwrap();
            if let Some(port) = line.strip_prefix("LISTENING ") {
                break port.trim().parse::<u16>().unwrap();
            }
        };
        // Keep draining stdout so the child never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Listening {
            child,
            base: format!("http://127.0.0.1:{port}"),
        }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Listening {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The upstream broker built on PyPI's `openbrokerapi`, with basic auth.
pub fn python_upstream(user: &str, password: &str) -> Listening {
    let mut cmd = Command::new(tool("BKG_TEST_PYTHON"));
    cmd.arg(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/osb_upstream.py"
    ))
    .args(["--user", user, "--password", password]);
    Listening::spawn(cmd)
}

/// The same broker over HTTPS with the given certificate and key files.
pub fn python_upstream_tls(cert: &Path, key: &Path) -> Listening {
    let mut cmd = Command::new(tool("BKG_TEST_PYTHON"));
    cmd.arg(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/osb_upstream.py"
    ))
    .args(["--user", "up-user", "--password", "up-password"])
    .arg("--tls-cert")
    .arg(cert)
    .arg("--tls-key")
    .arg(key);
    Listening::spawn(cmd)
}

/// The same broker, accepting only bearer tokens the OAuth2 server says are active.
pub fn python_upstream_with_tokens(oauth: &Listening, client_id: &str, secret: &str) -> Listening {
    let mut cmd = Command::new(tool("BKG_TEST_PYTHON"));
    cmd.arg(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/osb_upstream.py"
    ))
    .args(["--introspect", &format!("{}/introspect", oauth.base)])
    .args(["--client-id", client_id, "--client-secret", secret]);
    Listening::spawn(cmd)
}

/// npm's `oidc-provider` with UAA's paths and the given clients.
pub fn oauth_server(clients: &Value, dir: &Path) -> Listening {
    oauth_server_on(free_port(), clients, dir)
}

/// The same, on a given port (to restart it where clients expect it).
pub fn oauth_server_on(port: u16, clients: &Value, dir: &Path) -> Listening {
    let file = dir.join(format!("clients-{}.json", uuid::Uuid::new_v4().simple()));
    std::fs::write(&file, clients.to_string()).unwrap();
    let mut cmd = Command::new("node");
    cmd.arg(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/oauth_server.mjs"
    ))
    .arg(port.to_string())
    .arg(&file)
    .env("BKG_TEST_NODE_MODULES", tool("BKG_TEST_NODE_MODULES"));
    Listening::spawn(cmd)
}

/// What an upstream fixture received, oldest first.
pub async fn requests_seen(upstream: &Listening) -> Vec<Value> {
    reqwest::get(format!("{}/_requests", upstream.base))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Waits until the aggregated catalog offers a service by this name; returns it.
pub async fn wait_for_service(client: &TestClient, name: &str) -> Value {
    for _ in 0..200 {
        let catalog = client.call(Method::GET, "/v2/catalog", None).await;
        if let Some(s) = catalog.body["services"]
            .as_array()
            .and_then(|ss| ss.iter().find(|s| s["name"] == name))
        {
            return s.clone();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the catalog never offered {name}");
}

// ---- the log service ------------------------------------------------------------------

pub const LOG_SERVICE: &str = "svc-logs-test";
pub const LOG_PLAN: &str = "plan-logs-recent";

/// A configuration with the log service (50 lines kept per instance) and, on `syslog`, the
/// TCP listener.
pub fn logs_config(syslog: Option<u16>) -> TestConfig {
    let listener = syslog
        .map(|p| format!(", syslog_listen: \"127.0.0.1:{p}\""))
        .unwrap_or_default();
    TestConfig::new().with_port(free_port()).with_backend(
        format!("logs: {{flush_interval_ms: 100{listener}}}"),
        vec![format!(
            "{{id: {LOG_SERVICE}, name: logs-test, backend: logs, description: app logs, \
             bindable: true, bindings_retrievable: true, \
             dashboard_client: {{id: logs-test-dashboard, secret: logs-dashboard-secret}}, \
             plans: [{{id: {LOG_PLAN}, name: recent, description: r, max_log_lines: 50, \
             max_log_bytes: 65536}}]}}"
        )],
    )
}

/// A bind (or provision) body of the log service, with an app when given.
pub fn bind_body(service: &str, plan: &str, app: Option<&str>) -> Value {
    let mut b = json!({"service_id": service, "plan_id": plan});
    if let Some(app) = app {
        b["app_guid"] = app.into();
    }
    b
}

/// Provisions a log instance and binds `apps` to it; the drain URL of each.
pub async fn log_instance(client: &TestClient, id: &str, apps: &[&str]) -> Vec<String> {
    client
        .provision_with(id, provision_body(LOG_SERVICE, LOG_PLAN), false)
        .await
        .expect(201);
    let mut drains = Vec::new();
    for (i, app) in apps.iter().enumerate() {
        let bound = client
            .bind_with(
                id,
                &format!("{id}-b{i}"),
                bind_body(LOG_SERVICE, LOG_PLAN, Some(app)),
                false,
            )
            .await;
        bound.expect(201);
        drains.push(bound.body["syslog_drain_url"].as_str().unwrap().to_string());
    }
    drains
}

/// What the syslog agent posts for one line of an app's web process.
pub fn cf_message(app: &str, text: &str) -> String {
    format!("<14>1 2026-12-02T01:02:03.456789Z org.space.myapp {app} [APP/PROC/WEB/0] - - {text}")
}

/// The instance's lines as the broker's operator endpoint shows them (`brokerage logs`
/// reads the same).
pub async fn read_lines(client: &TestClient, id: &str) -> Value {
    let answer = client
        .client
        .get(format!("{}/logs/instances/{id}", client.base))
        .basic_auth(USER, Some(PASSWORD))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    answer.json().await.unwrap()
}

/// Waits until the instance holds `n` lines (the flusher writes every 100 ms).
pub async fn wait_for_lines(client: &TestClient, id: &str, n: usize) -> Value {
    for _ in 0..100 {
        let got = read_lines(client, id).await;
        if got["lines"].as_array().unwrap().len() >= n {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "fewer than {n} lines arrived: {}",
        read_lines(client, id).await
    );
}

/// A flood from `app`: `posters` posters at once, poster `i` posting to `drains[i % len]`,
/// each `batches` octet-counted batches of 20 lines, as https-batch sends. Each post must
/// be accepted.
pub fn flood(
    drains: &[String],
    app: &str,
    posters: usize,
    batches: usize,
) -> Vec<tokio::task::JoinHandle<()>> {
    let http = reqwest::Client::new();
    (0..posters)
        .map(|poster| {
            let (http, url, app) = (
                http.clone(),
                drains[poster % drains.len()].clone(),
                app.to_string(),
            );
            tokio::spawn(async move {
                for batch in 0..batches {
                    let mut body = String::new();
                    for n in 0..20 {
                        let m = cf_message(&app, &format!("loud {poster}-{batch}-{n}"));
                        body.push_str(&format!("{} {m}", m.len()));
                    }
                    let answer = http.post(&url).body(body).send().await.unwrap();
                    assert_eq!(answer.status(), 200);
                }
            })
        })
        .collect()
}
