//! Dashboard single sign-on against a real OAuth2/OpenID server (npm's oidc-provider,
//! configured with UAA's paths) and a Cloud Controller stand-in written here (Cloud
//! Controller cannot run on these machines): it answers `/v2/info` and the permission
//! endpoints by asking the OAuth2 server who the token belongs to.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use reqwest::cookie::CookieStore;
use serde_json::{json, Value};

use crate::helpers::*;

const DASH_CLIENT: &str = "mysql-test-dashboard";
const DASH_SECRET: &str = "dashboard-secret-value";
const CC_CLIENT: &str = "cloud-controller";
const CC_SECRET: &str = "cc-introspection-secret";

#[derive(Clone, Copy, PartialEq, Eq)]
enum CcMode {
    V3,
    V2Only,
    Down,
}

#[derive(Clone)]
struct Cc {
    oauth: String,
    mode: Arc<Mutex<CcMode>>,
}

async fn cc_info(State(cc): State<Cc>) -> Json<Value> {
    Json(
        json!({"authorization_endpoint": cc.oauth, "token_endpoint": cc.oauth, "api_version": "2.200.0"}),
    )
}

/// `manager` may manage, `reader` may only read, anyone else neither.
async fn cc_permissions(
    State(cc): State<Cc>,
    Path((version, _id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let mode = *cc.mode.lock().unwrap();
    if mode == CcMode::Down {
        return (StatusCode::SERVICE_UNAVAILABLE, "down").into_response();
    }
    if mode == CcMode::V2Only && version == "v3" {
        return (StatusCode::NOT_FOUND, Json(json!({"errors": []}))).into_response();
    }
    let Some(token) = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return StatusCode::UNAUTHORIZED.into_response();
    };
    let answer: Value = reqwest::Client::new()
        .post(format!("{}/introspect", cc.oauth))
        .basic_auth(CC_CLIENT, Some(CC_SECRET))
        .form(&[("token", token)])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    if answer["active"] != true {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let (manage, read) = match answer["sub"].as_str() {
        Some("manager") => (true, true),
        Some("reader") => (false, true),
        _ => (false, false),
    };
    Json(json!({"manage": manage, "read": read})).into_response()
}

/// The OAuth2 server, the Cloud Controller stand-in, a broker process and a provisioned
/// instance of a service with a dashboard.
pub struct World {
    pub oauth: Listening,
    cc_mode: Arc<Mutex<CcMode>>,
    pub broker: BrokerProcess,
    pub config: TestConfig,
    pub instance: String,
    pub dashboard_url: String,
}

impl World {
    pub async fn start(session_lifetime: u64) -> World {
        World::start_allowing(session_lifetime, &[]).await
    }

    /// The world, with more Cloud Controller hosts the broker may be pointed at.
    pub async fn start_allowing(session_lifetime: u64, more: &[String]) -> World {
        World::start_for(
            TestConfig::new().with_port(free_port()),
            session_lifetime,
            more,
            None,
        )
        .await
    }

    /// The world around a broker with `config` (its port set); the instance is of
    /// `service` (service id, plan id, dashboard client id and secret), or of the MySQL
    /// test service.
    pub async fn start_for(
        config: TestConfig,
        session_lifetime: u64,
        more: &[String],
        service: Option<(&str, &str, &str, &str)>,
    ) -> World {
        let port = config.port;
        let dir = tempfile::tempdir().unwrap();
        let (client_id, client_secret) = service.map_or((DASH_CLIENT, DASH_SECRET), |s| (s.2, s.3));
        let oauth = oauth_server(
            &json!([
                {"client_id": client_id, "client_secret": client_secret,
                 "grant_types": ["authorization_code"], "response_types": ["code"],
                 "redirect_uris": [format!("http://127.0.0.1:{port}/dashboard/callback")],
                 "scope": "openid cloud_controller_service_permissions.read"},
                {"client_id": CC_CLIENT, "client_secret": CC_SECRET, "grant_types": [],
                 "response_types": [], "redirect_uris": [], "introspector": true}
            ]),
            dir.path(),
        );
        std::mem::forget(dir);
        let cc_mode = Arc::new(Mutex::new(CcMode::V3));
        let cc = Cc {
            oauth: oauth.base.clone(),
            mode: cc_mode.clone(),
        };
        let app = Router::new()
            .route("/v2/info", get(cc_info))
            .route(
                "/{version}/service_instances/{id}/permissions",
                get(cc_permissions),
            )
            .with_state(cc);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let cc_address = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

        let config = config
            .with_session_lifetime(session_lifetime)
            .with_sso(&format!(
                "allowed_cloud_controllers: [\"{cc_address}\"{}]",
                more.iter()
                    .map(|m| format!(", \"{m}\""))
                    .collect::<String>()
            ));
        let file = config.write();
        let broker = BrokerProcess::start(&file, port, &config.dir.path().join("broker.log")).await;
        let instance = unique("dash");
        let client = broker.client();
        let (service_id, plan_id) = service.map_or((SERVICE, SMALL), |s| (s.0, s.1));
        let created = client
            .provision_from(
                &instance,
                service_id,
                plan_id,
                &format!("{cc_address}/v2/info"),
            )
            .await;
        created.expect(201);
        let dashboard_url = created.body["dashboard_url"].as_str().unwrap().to_string();
        assert_eq!(
            dashboard_url,
            format!("http://127.0.0.1:{port}/dashboard/instances/{instance}")
        );
        World {
            oauth,
            cc_mode,
            broker,
            config,
            instance,
            dashboard_url,
        }
    }

    fn set_cc(&self, mode: CcMode) {
        *self.cc_mode.lock().unwrap() = mode;
    }
}

/// A browser without JavaScript: a cookie jar, redirects followed by hand.
pub struct Browser {
    pub http: reqwest::Client,
    pub jar: Arc<reqwest::cookie::Jar>,
}

#[derive(Debug)]
pub struct Visit {
    pub status: u16,
    pub location: Option<String>,
    pub body: String,
    pub set_cookies: Vec<String>,
}

impl Browser {
    pub fn new() -> Browser {
        let jar = Arc::new(reqwest::cookie::Jar::default());
        let http = reqwest::Client::builder()
            .cookie_provider(jar.clone())
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap();
        Browser { http, jar }
    }

    pub async fn get(&self, url: &str) -> Visit {
        Self::visit(self.http.get(url).send().await.unwrap()).await
    }

    async fn visit(r: reqwest::Response) -> Visit {
        let status = r.status().as_u16();
        let location = r
            .headers()
            .get("location")
            .map(|v| v.to_str().unwrap().to_string());
        let set_cookies = r
            .headers()
            .get_all("set-cookie")
            .iter()
            .map(|v| v.to_str().unwrap().to_string())
            .collect();
        let body = r.text().await.unwrap();
        Visit {
            status,
            location,
            body,
            set_cookies,
        }
    }

    /// Follows redirects from `url`, filling the OAuth2 server's login form as `user`,
    /// and stops at the broker's callback (returned unvisited) or at a final page.
    pub async fn login_until_callback(&self, url: &str, user: &str) -> String {
        let mut next = url.to_string();
        for _ in 0..20 {
            if next.contains("/dashboard/callback") {
                return next;
            }
            let v = self.get(&next).await;
            if let Some(location) = v.location {
                next = absolute(&next, &location);
                continue;
            }
            assert!(
                v.body.contains("name=\"login\""),
                "expected the login form at {next}: {}",
                v.body
            );
            let action = v
                .body
                .split("action=\"")
                .nth(1)
                .unwrap()
                .split('"')
                .next()
                .unwrap();
            let submitted = Self::visit(
                self.http
                    .post(absolute(&next, action))
                    .form(&[
                        ("prompt", "login"),
                        ("login", user),
                        ("password", "any-password"),
                    ])
                    .send()
                    .await
                    .unwrap(),
            )
            .await;
            next = absolute(
                &next,
                submitted.location.as_deref().expect("the login redirects"),
            );
        }
        panic!("never reached the callback");
    }

    /// The whole login: ends on the page the broker returns to.
    pub async fn login(&self, dashboard_url: &str, user: &str) -> Visit {
        let callback = self.login_until_callback(dashboard_url, user).await;
        let landed = self.get(&callback).await;
        assert_eq!(landed.status, 302, "{landed:?}");
        self.get(&absolute(&callback, landed.location.as_deref().unwrap()))
            .await
    }
}

fn absolute(base: &str, location: &str) -> String {
    url::Url::parse(base)
        .unwrap()
        .join(location)
        .unwrap()
        .to_string()
}

#[tokio::test]
async fn a_manager_logs_in_and_sees_the_dashboard_a_reader_does_not() {
    let world = World::start(600).await;
    let client = world.broker.client();
    let b = format!("{}-b", world.instance);
    let bound = client.bind(&world.instance, &b, SMALL).await;
    bound.expect(201);

    let browser = Browser::new();
    let first = browser.get(&world.dashboard_url).await;
    assert_eq!(first.status, 302);
    let authorize = first.location.clone().unwrap();
    assert!(
        authorize.starts_with(&format!("{}/oauth/authorize?", world.oauth.base)),
        "{authorize}"
    );
    for part in [
        "response_type=code",
        &format!("client_id={DASH_CLIENT}"),
        "scope=openid+cloud_controller_service_permissions.read",
        "code_challenge_method=S256",
        "state=",
    ] {
        assert!(authorize.contains(part), "{authorize} lacks {part}");
    }
    assert!(!authorize.contains(DASH_SECRET));

    let page = browser.login(&world.dashboard_url, "manager").await;
    assert_eq!(page.status, 200, "{}", page.body);
    assert!(page.body.contains("mysql-test"), "{}", page.body);
    assert!(
        page.body.contains(">small<"),
        "the plan is shown: {}",
        page.body
    );
    assert!(page.body.contains(&b), "bindings are listed");
    assert!(page.body.contains("Storage used"), "{}", page.body);
    assert!(page.body.contains("of 1 MB"), "{}", page.body);
    assert!(
        page.body.contains("Signed in as <strong>manager</strong>"),
        "{}",
        page.body
    );
    let password = bound.body["credentials"]["password"].as_str().unwrap();
    assert!(
        !page.body.contains(password),
        "credentials never reach the page"
    );

    // A reader, and a user with no relation at all, are refused.
    for user in ["reader", "stranger"] {
        let browser = Browser::new();
        let page = browser.login(&world.dashboard_url, user).await;
        assert_eq!(page.status, 403, "{user}: {}", page.body);
        assert!(page.body.contains("may not manage"), "{}", page.body);
    }

    // Nothing secret in the broker's own log, at trace level.
    let log = std::fs::read_to_string(&world.broker.log).unwrap();
    assert!(log.contains("dashboard login"), "the log is the broker's");
    for secret in [
        DASH_SECRET,
        "test-session-secret-32-characters-long",
        "Bearer ",
    ] {
        assert!(!log.contains(secret), "{secret} reached the log");
    }
}

#[tokio::test]
async fn a_session_is_never_shown_to_another_cloud_controller() {
    // A second platform the operator allows, which would say yes to any token: it counts
    // the permission questions (and so the user tokens) it is sent.
    let asked = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let other = listener.local_addr().unwrap();
    let (counter, oauth_base) = (asked.clone(), Arc::new(Mutex::new(String::new())));
    let info_base = oauth_base.clone();
    let app = Router::new()
        .route(
            "/v2/info",
            get(move || {
                let base = info_base.lock().unwrap().clone();
                async move { Json(json!({"authorization_endpoint": base, "token_endpoint": base})) }
            }),
        )
        .route(
            "/{version}/service_instances/{id}/permissions",
            get(move || {
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                async { Json(json!({"manage": true, "read": true})) }
            }),
        );
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let world = World::start_allowing(600, &[other.to_string()]).await;
    *oauth_base.lock().unwrap() = world.oauth.base.clone();
    let elsewhere = unique("dash-other");
    let created = world
        .broker
        .client()
        .provision_from(&elsewhere, SERVICE, SMALL, &format!("{other}/v2/info"))
        .await;
    created.expect(201);

    let browser = Browser::new();
    let page = browser.login(&world.dashboard_url, "manager").await;
    assert_eq!(page.status, 200, "{}", page.body);
    // The same browser, the same session cookie, an instance of the other platform: the
    // broker starts a new login instead of using the session there.
    let visit = browser
        .get(created.body["dashboard_url"].as_str().unwrap())
        .await;
    assert_eq!(visit.status, 302, "{visit:?}");
    assert!(
        visit
            .location
            .as_deref()
            .unwrap()
            .contains("/oauth/authorize?"),
        "{visit:?}"
    );
    assert_eq!(
        asked.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "the other Cloud Controller was sent the session's token"
    );
    // Its own platform's dashboard still opens with the session.
    let again = browser.get(&world.dashboard_url).await;
    assert_eq!(again.status, 200, "{again:?}");
}

#[tokio::test]
async fn forged_missing_and_replayed_logins_are_refused() {
    let world = World::start(600).await;
    let callback = format!("{}/dashboard/callback", world.broker.base);

    // No login started in this browser.
    let stranger = Browser::new();
    let v = stranger
        .get(&format!("{callback}?code=abc&state=xyz"))
        .await;
    assert_eq!(v.status, 400, "{v:?}");

    // A login started, but the state is forged or missing.
    let browser = Browser::new();
    let real = browser
        .login_until_callback(&world.dashboard_url, "manager")
        .await;
    let code = url::Url::parse(&real)
        .unwrap()
        .query_pairs()
        .find(|(k, _)| k == "code")
        .unwrap()
        .1
        .to_string();
    for query in [format!("code={code}&state=forged"), format!("code={code}")] {
        let v = browser.get(&format!("{callback}?{query}")).await;
        assert_eq!(v.status, 400, "{query}: {v:?}");
    }
    // The forged attempt ended that login: even the real callback is refused now.
    assert_eq!(browser.get(&real).await.status, 400);

    // A fresh login; its callback works once. Replayed with the login cookie it came
    // with, the code is refused by the OAuth2 server.
    let browser = Browser::new();
    let real = browser
        .login_until_callback(&world.dashboard_url, "manager")
        .await;
    let login_cookie = browser
        .jar
        .cookies(&url::Url::parse(&format!("{}/dashboard/", world.broker.base)).unwrap())
        .unwrap()
        .to_str()
        .unwrap()
        .split("; ")
        .find(|c| c.starts_with("brokerage_login="))
        .unwrap()
        .to_string();
    let first = browser.get(&real).await;
    assert_eq!(first.status, 302);
    assert!(first
        .location
        .as_deref()
        .unwrap()
        .starts_with("/dashboard/instances/"));
    assert!(
        !first.location.as_deref().unwrap().contains("code="),
        "no code in the broker's redirect"
    );
    let replay = Browser::new();
    replay.jar.add_cookie_str(
        &login_cookie,
        &url::Url::parse(&format!("{}/dashboard/", world.broker.base)).unwrap(),
    );
    let replayed = replay.get(&real).await;
    assert_eq!(replayed.status, 400, "{replayed:?}");
    assert!(replayed.body.contains("refused"), "{}", replayed.body);

    // The code never reached the broker's log, at trace level.
    let log = std::fs::read_to_string(&world.broker.log).unwrap();
    assert!(
        log.contains("authorization code refused"),
        "the log is the broker's"
    );
    assert!(
        !log.contains(&code),
        "an authorization code reached the log"
    );
}

#[tokio::test]
async fn tampered_cookies_expired_sessions_and_logout_send_the_user_to_login_again() {
    let world = World::start(3).await;
    let base = url::Url::parse(&format!("{}/dashboard/", world.broker.base)).unwrap();
    let browser = Browser::new();
    assert_eq!(
        browser.login(&world.dashboard_url, "manager").await.status,
        200
    );

    // Tampered session cookie: not accepted, the user is sent to log in.
    let cookies = browser
        .jar
        .cookies(&base)
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    let session = cookies
        .split("; ")
        .find(|c| c.starts_with("brokerage_dashboard="))
        .unwrap();
    let (name, value) = session.split_once('=').unwrap();
    let mut bytes = value.as_bytes().to_vec();
    let mid = bytes.len() / 2;
    bytes[mid] = if bytes[mid] == b'A' { b'B' } else { b'A' };
    let tampered = Browser::new();
    tampered.jar.add_cookie_str(
        &format!(
            "{name}={}; Path=/dashboard",
            String::from_utf8(bytes).unwrap()
        ),
        &base,
    );
    let v = tampered.get(&world.dashboard_url).await;
    assert_eq!(v.status, 302);
    assert!(v.location.unwrap().contains("/oauth/authorize"));

    // Logout clears the session and goes through UAA's logout.do, back to this broker
    // only, whatever return_to says.
    let out = browser
        .get(&format!(
            "{}/dashboard/logout?return_to=https://evil.example/x",
            world.broker.base
        ))
        .await;
    assert_eq!(out.status, 302);
    let location = out.location.unwrap();
    assert!(
        location.starts_with(&format!("{}/logout.do?redirect=", world.oauth.base)),
        "{location}"
    );
    let redirect = url::Url::parse(&location)
        .unwrap()
        .query_pairs()
        .find(|(k, _)| k == "redirect")
        .unwrap()
        .1
        .to_string();
    assert!(redirect.starts_with(&world.broker.base), "{redirect}");
    assert!(!redirect.contains("evil"), "{redirect}");
    assert!(
        out.set_cookies
            .iter()
            .any(|c| c.starts_with("brokerage_dashboard=;")),
        "{:?}",
        out.set_cookies
    );
    let v = browser.get(&world.dashboard_url).await;
    assert_eq!(v.status, 302, "logged out: {v:?}");

    // Sessions end with their lifetime (3 s here).
    let browser = Browser::new();
    assert_eq!(
        browser.login(&world.dashboard_url, "manager").await.status,
        200
    );
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let v = browser.get(&world.dashboard_url).await;
    assert_eq!(v.status, 302, "expired: {v:?}");
    assert!(v.location.unwrap().contains("/oauth/authorize"));
}

#[tokio::test]
async fn permission_check_failures_grant_nothing() {
    let world = World::start(600).await;
    let browser = Browser::new();
    // v3 missing: the v2 endpoint answers.
    world.set_cc(CcMode::V2Only);
    assert_eq!(
        browser.login(&world.dashboard_url, "manager").await.status,
        200
    );
    // Cloud Controller down: a clear 502 page, no dashboard.
    world.set_cc(CcMode::Down);
    let v = browser.get(&world.dashboard_url).await;
    assert_eq!(v.status, 502, "{v:?}");
    assert!(v.body.contains("No access was granted"), "{}", v.body);
    assert!(!v.body.contains("Storage used"));
    // Unknown instance: 404 page.
    let v = browser
        .get(&format!(
            "{}/dashboard/instances/no-such-instance",
            world.broker.base
        ))
        .await;
    assert_eq!(v.status, 404);
}

/// A person in Chromium: open the dashboard URL, sign in on the login page, land on the
/// dashboard and read the plan.
#[tokio::test]
async fn a_person_uses_the_dashboard_in_chromium() {
    let world = World::start(600).await;
    // BKG_TEST_SCREENSHOT_DIR keeps the screenshot for a person to look at.
    let screenshot = std::env::var("BKG_TEST_SCREENSHOT_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| world.config.dir.path().to_path_buf())
        .join("dashboard.png");
    // Async: the Cloud Controller stand-in runs on this test's runtime.
    let out = tokio::process::Command::new("node")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/dashboard_browser.mjs"
        ))
        .arg(&world.dashboard_url)
        .arg("manager")
        .arg(&screenshot)
        .env(
            "BKG_TEST_NODE_MODULES",
            std::env::var("BKG_TEST_NODE_MODULES").unwrap(),
        )
        .output()
        .await
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{said}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let result: Value = serde_json::from_str(said.lines().last().unwrap()).unwrap();
    assert_eq!(result["plan"], "small", "{result}");
    assert_eq!(result["service"], "mysql-test");
    assert!(result["url"]
        .as_str()
        .unwrap()
        .starts_with(&world.dashboard_url));
    assert!(
        std::fs::metadata(&screenshot).unwrap().len() > 1000,
        "a screenshot was taken"
    );
}

/// A person watches an app's logs in Chromium: the log instance's dashboard shows the
/// lines a drain received, with app and process, and a line that arrives while the page
/// is open appears without a click.
#[tokio::test]
async fn a_person_watches_an_apps_logs_on_the_dashboard_in_chromium() {
    use crate::helpers::{cf_message, logs_config, wait_for_lines, LOG_PLAN, LOG_SERVICE};
    let world = World::start_for(
        logs_config(None),
        600,
        &[],
        Some((
            LOG_SERVICE,
            LOG_PLAN,
            "logs-test-dashboard",
            "logs-dashboard-secret",
        )),
    )
    .await;
    let client = world.broker.client();
    let app = "5a1f0c2e-9b7d-4e3a-8c61-0d2f4b6a8e10";
    let bound = client
        .bind_with(
            &world.instance,
            "watched",
            json!({"service_id": LOG_SERVICE, "plan_id": LOG_PLAN, "app_guid": app}),
            false,
        )
        .await;
    bound.expect(201);
    let drain = bound.body["syslog_drain_url"].as_str().unwrap().to_string();
    let http = reqwest::Client::new();
    let post = |text: &str| http.post(&drain).body(cf_message(app, text)).send();
    assert_eq!(post("first line on the page").await.unwrap().status(), 200);
    wait_for_lines(&client, &world.instance, 1).await;

    let screenshot = std::env::var("BKG_TEST_SCREENSHOT_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| world.config.dir.path().to_path_buf())
        .join("logs-dashboard.png");
    let mut node = tokio::process::Command::new("node")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/dashboard_browser.mjs"
        ))
        .arg(&world.dashboard_url)
        .arg("manager")
        .arg(&screenshot)
        .arg("arrived while watching")
        .env(
            "BKG_TEST_NODE_MODULES",
            std::env::var("BKG_TEST_NODE_MODULES").unwrap(),
        )
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    use tokio::io::AsyncBufReadExt;
    let mut out = tokio::io::BufReader::new(node.stdout.take().unwrap()).lines();
    let landed = tokio::time::timeout(std::time::Duration::from_secs(60), out.next_line())
        .await
        .expect("the browser lands on the dashboard")
        .unwrap();
    let Some(landed) = landed else {
        let finished = node.wait_with_output().await.unwrap();
        panic!("{}", String::from_utf8_lossy(&finished.stderr));
    };
    let landed: Value = serde_json::from_str(&landed).unwrap();
    assert_eq!(landed["service"], "logs-test", "{landed}");
    let rows = landed["logs"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "{landed}");
    assert_eq!(rows[0]["text"], "first line on the page");
    assert_eq!(rows[0]["app"], "org.space.myapp");
    assert_eq!(rows[0]["process"], "APP/PROC/WEB/0");

    assert_eq!(post("arrived while watching").await.unwrap().status(), 200);
    let updated = tokio::time::timeout(std::time::Duration::from_secs(60), out.next_line())
        .await
        .expect("the browser reports")
        .unwrap()
        .expect("a second report");
    let updated: Value = serde_json::from_str(&updated).unwrap();
    assert_eq!(updated["updated"], true, "{updated}");
    assert_eq!(updated["logs"].as_array().unwrap().len(), 2, "{updated}");
    assert!(node.wait().await.unwrap().success());
}
