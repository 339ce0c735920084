//! The Swift object storage service against a real single-node OpenStack Swift (Debian's
//! packages) with swauth and the account_quotas middleware, which `scripts/test` starts on
//! loopback. Apps use the credentials exactly as a Swift client does: v1 auth, then the
//! storage URL with the token.

use std::time::Duration;

use brokerage::backend::database_name;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::helpers::*;

const SWIFT_SERVICE: &str = "svc-swift-test";
/// 1 MB quota; deprovision refuses an account that still holds objects.
const KEEP: &str = "plan-swift-keep";
/// 1 MB quota; deprovision deletes what the account holds.
const PURGE: &str = "plan-swift-purge";

fn swift_url() -> String {
    std::env::var("BKG_TEST_SWIFT_URL").expect(
        "BKG_TEST_SWIFT_URL is not set: run the suite with ./scripts/test, which starts Swift",
    )
}

fn admin_key() -> String {
    std::env::var("BKG_TEST_SWIFT_ADMIN_KEY").expect("BKG_TEST_SWIFT_ADMIN_KEY is not set")
}

fn with_swift(url: &str) -> TestConfig {
    TestConfig::new().with_backend(
        format!(
            "swift: {{url: \"{url}\", admin_key: \"{}\", timeout_secs: 5}}",
            admin_key()
        ),
        vec![format!(
            "{{id: {SWIFT_SERVICE}, name: swift-test, backend: swift, description: Swift for tests, \
             bindable: true, instances_retrievable: true, bindings_retrievable: true, \
             refuse_deprovision_with_bindings: false, \
             plans: [{{id: {KEEP}, name: keep, description: 1 MB, max_storage_mb: 1}}, \
                     {{id: {PURGE}, name: purge, description: 1 MB purged, max_storage_mb: 1, purge_on_deprovision: true}}]}}"
        )],
    )
}

/// A Swift session as a client builds it from the binding's credentials.
pub(crate) struct SwiftSession {
    http: reqwest::Client,
    token: String,
    storage_url: String,
}

pub(crate) async fn login(creds: &Value) -> Result<SwiftSession, StatusCode> {
    let http = reqwest::Client::new();
    let answer = http
        .get(creds["auth_url"].as_str().unwrap())
        .header("X-Auth-User", creds["username"].as_str().unwrap())
        .header("X-Auth-Key", creds["password"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    if !answer.status().is_success() {
        return Err(answer.status());
    }
    let header = |name: &str| answer.headers()[name].to_str().unwrap().to_string();
    Ok(SwiftSession {
        token: header("x-auth-token"),
        storage_url: header("x-storage-url"),
        http,
    })
}

impl SwiftSession {
    async fn send(&self, method: Method, url: &str, body: Vec<u8>) -> StatusCode {
        self.http
            .request(method, url)
            .header("X-Auth-Token", &self.token)
            .body(body)
            .send()
            .await
            .unwrap()
            .status()
    }

    pub(crate) async fn put(&self, path: &str, bytes: usize) -> StatusCode {
        let url = format!("{}/{path}", self.storage_url);
        self.send(Method::PUT, &url, vec![b'x'; bytes]).await
    }

    /// Waits until the account's usage shows `bytes`. Swift carries object and container
    /// changes up to the account in the background; no updater daemon runs while the
    /// suite does, so each round runs one sweep of each updater first, as their
    /// daemons would.
    pub(crate) async fn wait_for_usage(&self, bytes: u64) {
        for _ in 0..20 {
            sweep_updaters().await;
            let head = self
                .http
                .head(&self.storage_url)
                .header("X-Auth-Token", &self.token)
                .send()
                .await
                .unwrap();
            let used: u64 = head.headers()["x-account-bytes-used"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            if used >= bytes {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!("the account's usage never reached {bytes} bytes");
    }
}

/// One sweep of Swift's object updater (what the object server queued) and then of its
/// container updater (container totals into the account), each run `--once`.
async fn sweep_updaters() {
    let conf = std::env::var("BKG_TEST_SWIFT_UPDATERS_CONF")
        .expect("BKG_TEST_SWIFT_UPDATERS_CONF is not set: run the suite with ./scripts/test");
    for updater in ["swift-object-updater", "swift-container-updater"] {
        let out = tokio::process::Command::new(updater)
            .arg(&conf)
            .arg("--once")
            .output()
            .await
            .unwrap_or_else(|e| panic!("{updater} did not run: {e}"));
        assert!(
            out.status.success(),
            "{updater} --once failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

async fn swauth_account_exists(account: &str) -> bool {
    let status = reqwest::Client::new()
        .get(format!("{}/auth/v2/{account}", swift_url()))
        .header("X-Auth-Admin-User", ".super_admin")
        .header("X-Auth-Admin-Key", admin_key())
        .send()
        .await
        .unwrap()
        .status();
    assert!(status == 200 || status == 404, "{status}");
    status == 200
}

async fn bind(app: &TestApp, id: &str, binding: &str, plan: &str) -> Value {
    let bound = app
        .bind_with(
            id,
            binding,
            json!({"service_id": SWIFT_SERVICE, "plan_id": plan, "app_guid": "app-1"}),
            false,
        )
        .await;
    bound.expect(201);
    bound.body["credentials"].clone()
}

#[tokio::test]
async fn a_bound_user_stores_within_its_quota_gets_413_past_it_and_only_in_its_account() {
    let app = spawn_with(with_swift(&swift_url())).await;
    let (a, b) = (unique("swift-a"), unique("swift-b"));
    let creds_a = app.provision_and_bind(&a, SWIFT_SERVICE, KEEP).await;
    let creds_b = app.provision_and_bind(&b, SWIFT_SERVICE, KEEP).await;
    for key in ["auth_url", "username", "password", "storage_url", "uri"] {
        assert!(
            creds_a[key].is_string(),
            "credentials carry {key}: {creds_a}"
        );
    }
    assert!(creds_a["username"]
        .as_str()
        .unwrap()
        .starts_with(&format!("{}:", database_name(&a))));

    // The app logs in with its credentials and lands in its own account.
    let session = login(&creds_a).await.expect("the binding's user logs in");
    assert_eq!(session.storage_url, creds_a["storage_url"]);
    assert_eq!(session.put("photos", 0).await, StatusCode::CREATED);
    assert_eq!(
        session.put("photos/one", 700 * 1024).await,
        StatusCode::CREATED,
        "within the 1 MB quota"
    );
    session.wait_for_usage(700 * 1024).await;
    assert_eq!(
        session.put("photos/two", 700 * 1024).await,
        StatusCode::PAYLOAD_TOO_LARGE,
        "past the quota"
    );
    // The user cannot raise its own quota.
    let raise = session
        .http
        .post(&session.storage_url)
        .header("X-Auth-Token", &session.token)
        .header("X-Account-Meta-Quota-Bytes", "1000000000")
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(raise, StatusCode::FORBIDDEN);

    // Another instance's account is out of reach, for writing and for reading.
    let theirs = creds_b["storage_url"].as_str().unwrap();
    assert_eq!(
        session
            .send(Method::PUT, &format!("{theirs}/stolen"), Vec::new())
            .await,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        session.send(Method::GET, theirs, Vec::new()).await,
        StatusCode::FORBIDDEN
    );

    // Unbind deletes the user: its credentials no longer log in.
    app.unbind_from(&a, &format!("{a}-b"), SWIFT_SERVICE, KEEP)
        .await
        .expect(200);
    assert_eq!(
        login(&creds_a).await.err(),
        Some(StatusCode::UNAUTHORIZED),
        "unbound credentials are refused"
    );
    login(&creds_b)
        .await
        .expect("the other instance's binding still works");

    // The account still holds an object and the plan keeps data: deprovision is refused
    // and the instance stays.
    let refused = app.deprovision(&a, SWIFT_SERVICE, KEEP).await;
    refused.expect_error(422, None);
    let description = refused.body["description"].as_str().unwrap();
    assert!(description.contains("1 object"), "{description}");
    app.call(Method::GET, &format!("/v2/service_instances/{a}"), None)
        .await
        .expect(200);
    assert!(swauth_account_exists(&database_name(&a)).await);

    // Emptied by a new binding, it goes.
    let again = bind(&app, &a, &format!("{a}-b2"), KEEP).await;
    let session = login(&again).await.unwrap();
    let url = format!("{}/photos/one", session.storage_url);
    assert_eq!(
        session.send(Method::DELETE, &url, Vec::new()).await,
        StatusCode::NO_CONTENT
    );
    let url = format!("{}/photos", session.storage_url);
    assert_eq!(
        session.send(Method::DELETE, &url, Vec::new()).await,
        StatusCode::NO_CONTENT
    );
    app.deprovision(&a, SWIFT_SERVICE, KEEP).await.expect(200);
    assert!(!swauth_account_exists(&database_name(&a)).await);
    assert_eq!(login(&again).await.err(), Some(StatusCode::UNAUTHORIZED));

    app.deprovision(&b, SWIFT_SERVICE, KEEP).await.expect(200);
    assert!(!swauth_account_exists(&database_name(&b)).await);
}

#[tokio::test]
async fn a_plan_that_purges_deletes_the_objects_with_the_account() {
    let app = spawn_with(with_swift(&swift_url())).await;
    let id = unique("swift-purge");
    let creds = app.provision_and_bind(&id, SWIFT_SERVICE, PURGE).await;
    let session = login(&creds).await.unwrap();
    assert_eq!(session.put("docs", 0).await, StatusCode::CREATED);
    assert_eq!(session.put("docs/a%20b", 10).await, StatusCode::CREATED);
    assert_eq!(session.put("logs", 0).await, StatusCode::CREATED);
    assert_eq!(session.put("logs/x", 10).await, StatusCode::CREATED);
    session.wait_for_usage(20).await;
    app.deprovision(&id, SWIFT_SERVICE, PURGE).await.expect(200);
    assert!(!swauth_account_exists(&database_name(&id)).await);
    assert_eq!(login(&creds).await.err(), Some(StatusCode::UNAUTHORIZED));
}

#[tokio::test]
async fn a_wrong_admin_key_fails_clearly_and_leaves_nothing() {
    let config = TestConfig::new().with_backend(
        format!(
            "swift: {{url: \"{}\", admin_key: not-the-key, timeout_secs: 5}}",
            swift_url()
        ),
        vec![format!(
            "{{id: {SWIFT_SERVICE}, name: swift-test, backend: swift, description: d, bindable: true, \
             plans: [{{id: {KEEP}, name: keep, description: d, max_storage_mb: 1}}]}}"
        )],
    );
    let app = spawn_with(config).await;
    let id = unique("swift-key");
    let answer = app
        .provision_with(&id, provision_body(SWIFT_SERVICE, KEEP), false)
        .await;
    answer.expect_error(503, None);
    assert!(answer.body["description"]
        .as_str()
        .unwrap()
        .contains("refused the broker's admin key"));
    assert!(!answer.raw.contains("not-the-key"));
    app.call(Method::GET, &format!("/v2/service_instances/{id}"), None)
        .await
        .expect_error(404, None);
    assert!(!swauth_account_exists(&database_name(&id)).await);
}

#[tokio::test]
async fn users_a_binding_makes_do_not_outlive_its_unbind() {
    let app = spawn_with(with_swift(&swift_url())).await;
    let id = unique("swift-sneaky");
    let a = app.provision_and_bind(&id, SWIFT_SERVICE, PURGE).await;
    let b = app
        .bind_with(
            &id,
            &format!("{id}-second"),
            json!({"service_id": SWIFT_SERVICE, "plan_id": PURGE, "app_guid": "app-2"}),
            false,
        )
        .await;
    b.expect(201);
    let b = b.body["credentials"].clone();
    // The first binding's user is an account admin: it makes a user of its own.
    let (account, _) = a["username"].as_str().unwrap().split_once(':').unwrap();
    let made = reqwest::Client::new()
        .put(format!("{}/auth/v2/{account}/sneaky", swift_url()))
        .header("X-Auth-Admin-User", a["username"].as_str().unwrap())
        .header("X-Auth-Admin-Key", a["password"].as_str().unwrap())
        .header("X-Auth-User-Key", "sneaky-key")
        .header("X-Auth-User-Admin", "true")
        .send()
        .await
        .unwrap();
    assert_eq!(
        made.status().as_u16(),
        201,
        "swauth let the admin make a user"
    );
    let sneaky = json!({
        "auth_url": a["auth_url"],
        "username": format!("{account}:sneaky"),
        "password": "sneaky-key",
    });
    assert!(login(&sneaky).await.is_ok(), "the made user logs in");
    app.unbind_from(&id, &format!("{id}-b"), SWIFT_SERVICE, PURGE)
        .await
        .expect(200);
    assert!(
        login(&sneaky).await.is_err(),
        "the made user went with its maker"
    );
    assert!(login(&a).await.is_err(), "the binding's own user is gone");
    assert!(login(&b).await.is_ok(), "the other binding keeps working");
    app.unbind_from(&id, &format!("{id}-second"), SWIFT_SERVICE, PURGE)
        .await
        .expect(200);
    app.deprovision(&id, SWIFT_SERVICE, PURGE).await.expect(200);
}
