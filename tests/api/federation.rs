//! Upstream federation against real brokers on loopback ports: a second Brokerage process,
//! and an independent OSB implementation (PyPI's openbrokerapi) run as its own process.

use std::time::Duration;

use brokerage::backend::mysql::database_name;
use reqwest::Method;
use serde_json::{json, Value};

use crate::helpers::*;

const UP_USER: &str = "up-user";
const UP_PASSWORD: &str = "up-password";

fn basic_upstream(alias: &str, base: &str) -> String {
    format!(
        "{{alias: {alias}, url: \"{base}\", auth: {{kind: basic, username: {UP_USER}, password: {UP_PASSWORD}}}, request_timeout_secs: 5}}"
    )
}

fn plan_named(service: &Value, name: &str) -> String {
    service["plans"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .unwrap_or_else(|| panic!("plan {name} in {service}"))["id"]
        .as_str()
        .unwrap()
        .to_string()
}

fn ns_provision(service: &Value, plan: &str) -> Value {
    provision_body(service["id"].as_str().unwrap(), &plan_named(service, plan))
}

/// The requests an upstream received for one instance.
async fn seen_for(upstream: &Listening, id: &str) -> Vec<Value> {
    requests_seen(upstream)
        .await
        .into_iter()
        .filter(|r| r["path"].as_str().unwrap_or("").contains(id))
        .collect()
}

#[tokio::test]
async fn an_independent_broker_is_driven_through_the_aggregator() {
    let east = python_upstream(UP_USER, UP_PASSWORD);
    let app = spawn_with(TestConfig::new().with_upstream(basic_upstream("east", &east.base))).await;
    let db = wait_for_service(&app, "east-db").await;
    assert_ne!(db["id"], "svc-db", "ids are rewritten");
    assert_eq!(db["dashboard_client"]["id"], "east-db-dashboard");
    let sid = db["id"].as_str().unwrap().to_string();
    let small = plan_named(&db, "small");
    let large = plan_named(&db, "large");
    let id = unique("fed");
    let b = format!("{id}-b");

    let identity = "cloudfoundry eyJ1c2VyX2lkIjoiZmVkLXVzZXIifQ==";
    let provisioned = Answer::from(
        app.request(Method::PUT, &format!("/v2/service_instances/{id}"))
            .header("X-Broker-API-Originating-Identity", identity)
            .header("X-Broker-API-Request-Identity", "req-123")
            .json(&ns_provision(&db, "small"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    provisioned.expect(201);
    assert_eq!(
        provisioned.body["dashboard_url"],
        format!("https://upstream.example/dash/{id}")
    );
    // The upstream saw its own ids and the platform's identity headers.
    let seen = seen_for(&east, &id).await;
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0]["method"], "PUT");
    assert_eq!(seen[0]["body"]["service_id"], "svc-db");
    assert_eq!(seen[0]["body"]["plan_id"], "plan-small");
    assert_eq!(seen[0]["body"]["organization_guid"], "org-guid");
    assert_eq!(seen[0]["body"]["context"]["platform"], "cloudfoundry");
    assert_eq!(seen[0]["originating_identity"], identity);
    assert_eq!(seen[0]["request_identity"], "req-123");
    assert_eq!(seen[0]["api_version"], "2.17");
    assert_eq!(seen[0]["auth_scheme"], "Basic");

    // A repeat is answered from the record, idempotently.
    app.provision_with(&id, ns_provision(&db, "small"), false)
        .await
        .expect(200);

    // Fetch carries no service_id: routed by record, namespaced ids written back.
    let fetched = app
        .call(Method::GET, &format!("/v2/service_instances/{id}"), None)
        .await;
    fetched.expect(200);
    assert_eq!(fetched.body["service_id"], sid);
    assert_eq!(fetched.body["plan_id"], small);

    let bound = app
        .bind_with(
            &id,
            &b,
            json!({"service_id": sid, "plan_id": small, "app_guid": "app-1"}),
            false,
        )
        .await;
    bound.expect(201);
    assert_eq!(bound.body["credentials"]["uri"], format!("db://{id}/{b}"));
    let fetched = app
        .call(
            Method::GET,
            &format!("/v2/service_instances/{id}/service_bindings/{b}"),
            None,
        )
        .await;
    fetched.expect(200);
    assert_eq!(fetched.body["credentials"], bound.body["credentials"]);

    app.update(&id, json!({"service_id": sid, "plan_id": large}), false)
        .await
        .expect(200);
    let fetched = app
        .call(Method::GET, &format!("/v2/service_instances/{id}"), None)
        .await;
    assert_eq!(fetched.body["plan_id"], large);
    let patch = seen_for(&east, &id)
        .await
        .into_iter()
        .find(|r| r["method"] == "PATCH")
        .unwrap();
    assert_eq!(patch["body"]["plan_id"], "plan-large");

    let unbind =
        format!("/v2/service_instances/{id}/service_bindings/{b}?service_id={sid}&plan_id={large}");
    app.call(Method::DELETE, &unbind, None).await.expect(200);
    let deleted = seen_for(&east, &b)
        .await
        .into_iter()
        .find(|r| r["method"] == "DELETE")
        .unwrap();
    assert_eq!(deleted["query"]["service_id"], "svc-db");
    app.deprovision(&id, &sid, &large).await.expect(200);
    // No record any more: the DELETE is routed by service_id and the upstream says gone.
    app.deprovision(&id, &sid, &large).await.expect(410);
    app.call(Method::GET, &format!("/v2/service_instances/{id}"), None)
        .await
        .expect_error(404, None);

    // `brokerage check` reaches the upstream and says what it offers.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_brokerage"))
        .args(["check", "--config"])
        .arg(app.config.write())
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(said.contains("ok    upstreams.east"), "{said}");
    assert!(said.contains("offers 1 service(s): db"), "{said}");
}

#[tokio::test]
async fn asynchronous_upstream_operations_are_polled_through_the_aggregator() {
    let east = python_upstream(UP_USER, UP_PASSWORD);
    let app = spawn_with(TestConfig::new().with_upstream(basic_upstream("east", &east.base))).await;
    let db = wait_for_service(&app, "east-db").await;
    let sid = db["id"].as_str().unwrap().to_string();
    let plan = plan_named(&db, "async");
    let id = unique("fedasync");

    // Without accepts_incomplete the upstream's own 422 passes through, and nothing stays.
    let refused = app
        .provision_with(&id, ns_provision(&db, "async"), false)
        .await;
    refused.expect_error(422, Some("AsyncRequired"));
    app.call(Method::GET, &format!("/v2/service_instances/{id}"), None)
        .await
        .expect_error(404, None);

    let accepted = app
        .provision_with(&id, ns_provision(&db, "async"), true)
        .await;
    accepted.expect(202);
    let op = accepted.operation();
    assert!(op.starts_with("bkg1."), "the aggregator's own token: {op}");
    let first = app.last_operation(&id, Some(&op)).await;
    first.expect(200);
    assert_eq!(first.body["state"], "in progress");
    let second = app.last_operation(&id, Some(&op)).await;
    assert_eq!(second.body["state"], "succeeded", "{}", second.raw);
    // The upstream was polled with its own operation and ids.
    let polls: Vec<Value> = seen_for(&east, &id)
        .await
        .into_iter()
        .filter(|r| r["path"].as_str().unwrap().ends_with("last_operation"))
        .collect();
    assert_eq!(polls.len(), 2);
    assert_eq!(polls[0]["query"]["operation"], format!("provision:{id}"));
    assert_eq!(polls[0]["query"]["service_id"], "svc-db");
    // Recorded: later polls and fetches need the upstream no more for the state.
    let again = app.last_operation(&id, Some(&op)).await;
    assert_eq!(again.body["state"], "succeeded");
    app.call(Method::GET, &format!("/v2/service_instances/{id}"), None)
        .await
        .expect(200);

    let gone = app
        .deprovision_query(
            &id,
            &format!("service_id={sid}&plan_id={plan}&accepts_incomplete=true"),
        )
        .await;
    gone.expect(202);
    let dop = gone.operation();
    app.poll_until_gone(&format!(
        "/v2/service_instances/{id}/last_operation?operation={dop}"
    ))
    .await
    .expect(410);
}

#[tokio::test]
async fn a_second_brokerage_is_an_upstream_with_real_mysql_behind_it() {
    let port = free_port();
    let peer_config = TestConfig::new().with_port(port);
    let peer_file = peer_config.write();
    let _peer =
        BrokerProcess::start(&peer_file, port, &peer_config.dir.path().join("peer.log")).await;
    let upstream = format!(
        "{{alias: peer, url: \"http://127.0.0.1:{port}\", auth: {{kind: basic, username: {USER}, password: {PASSWORD}}}}}"
    );
    let app = spawn_with(TestConfig::new().with_upstream(upstream)).await;
    let svc = wait_for_service(&app, "peer-mysql-test").await;
    let sid = svc["id"].as_str().unwrap().to_string();
    let small = plan_named(&svc, "small");
    let id = unique("peer");
    let b = format!("{id}-b");

    app.provision_with(&id, ns_provision(&svc, "small"), false)
        .await
        .expect(201);
    assert!(
        database_exists(&database_name(&id)).await,
        "the peer created the database"
    );
    let bound = app
        .bind_with(&id, &b, json!({"service_id": sid, "plan_id": small}), false)
        .await;
    bound.expect(201);
    connect_as(&bound.body["credentials"])
        .await
        .expect("credentials from the peer work");
    // The peer refuses deprovision while bound; its 422 passes through unchanged.
    app.deprovision(&id, &sid, &small)
        .await
        .expect_error(422, None);
    app.call(
        Method::DELETE,
        &format!(
            "/v2/service_instances/{id}/service_bindings/{b}?service_id={sid}&plan_id={small}"
        ),
        None,
    )
    .await
    .expect(200);
    app.deprovision(&id, &sid, &small).await.expect(200);
    assert!(!database_exists(&database_name(&id)).await);
}

#[tokio::test]
async fn two_upstreams_offering_the_same_service_are_both_served_and_kept_apart() {
    let east = python_upstream(UP_USER, UP_PASSWORD);
    let west = python_upstream(UP_USER, UP_PASSWORD);
    let app = spawn_with(
        TestConfig::new()
            .with_upstream(basic_upstream("east", &east.base))
            .with_upstream(basic_upstream("west", &west.base)),
    )
    .await;
    let e = wait_for_service(&app, "east-db").await;
    let w = wait_for_service(&app, "west-db").await;
    assert_ne!(e["id"], w["id"]);
    assert_ne!(plan_named(&e, "small"), plan_named(&w, "small"));

    let (ie, iw) = (unique("east"), unique("west"));
    app.provision_with(&ie, ns_provision(&e, "small"), false)
        .await
        .expect(201);
    app.provision_with(&iw, ns_provision(&w, "small"), false)
        .await
        .expect(201);
    assert_eq!(seen_for(&east, &ie).await.len(), 1);
    assert_eq!(seen_for(&east, &iw).await.len(), 0);
    assert_eq!(seen_for(&west, &iw).await.len(), 1);
    assert_eq!(seen_for(&west, &ie).await.len(), 0);
    // Fetch needs no service_id: each goes to its own upstream.
    app.call(Method::GET, &format!("/v2/service_instances/{iw}"), None)
        .await
        .expect(200);
    assert_eq!(seen_for(&west, &iw).await.len(), 2);
    assert_eq!(seen_for(&east, &iw).await.len(), 0);
}

#[tokio::test]
async fn records_route_after_restart_on_a_second_aggregator_and_while_the_upstream_is_down() {
    let mut east = python_upstream(UP_USER, UP_PASSWORD);
    let east_base = east.base.clone();
    let store = StoreKind::fresh_mysql();
    let config = || {
        TestConfig::new()
            .with_store(store.clone())
            .with_upstream(basic_upstream("east", &east_base))
    };
    let one = spawn_with(config()).await;
    // The second aggregator is a separate `brokerage` process.
    let port = free_port();
    let two_config = config().with_port(port);
    let two_log = two_config.dir.path().join("two.log");
    let _two_process = BrokerProcess::start(&two_config.write(), port, &two_log).await;
    let two = TestClient::new(format!("http://127.0.0.1:{port}"));
    let db = wait_for_service(&one, "east-db").await;
    let sid = db["id"].as_str().unwrap().to_string();
    let id = unique("shared");
    let b = format!("{id}-b");

    let accepted = one
        .provision_with(&id, ns_provision(&db, "async"), true)
        .await;
    accepted.expect(202);
    let op = accepted.operation();
    // The second aggregator knows the instance from the shared store and polls it.
    assert_eq!(
        two.last_operation(&id, Some(&op)).await.body["state"],
        "in progress"
    );
    assert_eq!(
        two.last_operation(&id, Some(&op)).await.body["state"],
        "succeeded"
    );
    two.bind_with(
        &id,
        &b,
        json!({"service_id": sid, "plan_id": plan_named(&db, "async")}),
        false,
    )
    .await
    .expect(201);
    one.call(
        Method::GET,
        &format!("/v2/service_instances/{id}/service_bindings/{b}"),
        None,
    )
    .await
    .expect(200);

    // Restarted, the first still routes by its records.
    let restarted_config = one.stop().await;
    let one = spawn_with(restarted_config).await;
    one.call(Method::GET, &format!("/v2/service_instances/{id}"), None)
        .await
        .expect(200);

    // With the upstream down, a restarted aggregator still offers its services (the last
    // good catalog copy) and answers calls to it with a clear error naming it.
    east.kill();
    let config = one.stop().await;
    let one = spawn_with(config).await;
    let catalog = one.catalog().await;
    assert!(
        catalog.body["services"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["name"] == "east-db"),
        "{}",
        catalog.raw
    );
    let down = one
        .call(Method::GET, &format!("/v2/service_instances/{id}"), None)
        .await;
    down.expect_error(502, None);
    assert!(
        down.body["description"].as_str().unwrap().contains("east"),
        "{}",
        down.raw
    );
    let health: Value = reqwest::get(format!("{}/health", one.base))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["upstreams"][0]["alias"], "east");
}

#[tokio::test]
async fn oauth2_client_credentials_toward_an_upstream() {
    let dir = tempfile::tempdir().unwrap();
    let clients = json!([
        {"client_id": "brokerage", "client_secret": "brokerage-oauth-secret",
         "grant_types": ["client_credentials"], "response_types": [], "redirect_uris": [],
         "scope": "osb.broker"},
        {"client_id": "upstream-rs", "client_secret": "rs-secret", "grant_types": [],
         "response_types": [], "redirect_uris": [], "introspector": true}
    ]);
    let mut oauth = oauth_server(&clients, dir.path());
    let secure = python_upstream_with_tokens(&oauth, "upstream-rs", "rs-secret");
    let upstream = |secret: &str| {
        format!(
            "{{alias: secure, url: \"{}\", auth: {{kind: client_credentials, token_url: \"{}/oauth/token\", client_id: brokerage, client_secret: {secret}, scopes: [osb.broker]}}}}",
            secure.base, oauth.base
        )
    };
    let good = upstream("brokerage-oauth-secret");
    let bad = upstream("not-the-secret");
    let app = spawn_with(TestConfig::new().with_upstream(good)).await;
    let db = wait_for_service(&app, "secure-db").await;
    let id = unique("oauth");
    app.provision_with(&id, ns_provision(&db, "small"), false)
        .await
        .expect(201);
    let seen = seen_for(&secure, &id).await;
    assert_eq!(seen[0]["auth_scheme"], "Bearer");
    app.call(Method::GET, &format!("/v2/service_instances/{id}"), None)
        .await
        .expect(200);

    // The OAuth2 server restarts and forgets every token it issued: the upstream answers
    // 401 to the cached token, and the aggregator fetches a new one and retries, once.
    let port: u16 = oauth.base.rsplit(':').next().unwrap().parse().unwrap();
    oauth.kill();
    let _oauth = oauth_server_on(port, &clients, dir.path());
    app.call(Method::GET, &format!("/v2/service_instances/{id}"), None)
        .await
        .expect(200);
    assert_eq!(
        seen_for(&secure, &id).await.len(),
        4,
        "provision, fetch, the refused fetch, the retried fetch"
    );

    // A wrong client secret: the upstream's services never appear, and `check` says why
    // without printing the secret.
    let wrong = spawn_with(TestConfig::new().with_upstream(bad)).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let catalog = wrong.catalog().await;
    assert!(!catalog.raw.contains("secure-db"), "{}", catalog.raw);
    let said = check_output(&wrong).await;
    assert!(said.contains("FAIL  upstreams.secure"), "{said}");
    assert!(said.contains("authenticated"), "{said}");
    assert!(!said.contains("not-the-secret"), "{said}");
}

/// What `brokerage check` prints for an app's configuration.
async fn check_output(app: &TestApp) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_brokerage"))
        .args(["check", "--config"])
        .arg(app.config.write())
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).to_string()
}

#[tokio::test]
async fn tls_upstreams_need_their_ca_or_an_explicit_opt_out() {
    let dir = tempfile::tempdir().unwrap();
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    let (ca_file, cert_file, key_file) = (
        dir.path().join("ca.pem"),
        dir.path().join("cert.pem"),
        dir.path().join("key.pem"),
    );
    std::fs::write(&ca_file, ca.pem()).unwrap();
    std::fs::write(&cert_file, cert.pem()).unwrap();
    std::fs::write(&key_file, key.serialize_pem()).unwrap();
    let upstream = python_upstream_tls(&cert_file, &key_file);
    let https = upstream.base.replace("http://", "https://");
    let entry = |alias: &str, extra: &str| {
        format!(
            "{{alias: {alias}, url: \"{https}\", auth: {{kind: basic, username: up-user, password: up-password}}{extra}}}"
        )
    };
    let trusted = entry(
        "trusted",
        &format!(", ca_certificate: {:?}", ca_file.display().to_string()),
    );
    let app = spawn_with(
        TestConfig::new()
            .with_upstream(trusted)
            .with_upstream(entry("unverified", ", skip_tls_verification: true"))
            .with_upstream(entry("untrusted", "")),
    )
    .await;
    for alias in ["trusted", "unverified"] {
        let svc = wait_for_service(&app, &format!("{alias}-db")).await;
        app.provision_with(&unique(alias), ns_provision(&svc, "small"), false)
            .await
            .expect(201);
    }
    let catalog = app.catalog().await;
    assert!(!catalog.raw.contains("untrusted-db"), "{}", catalog.raw);
    let said = check_output(&app).await;
    assert!(said.contains("ok    upstreams.trusted"), "{said}");
    assert!(
        said.contains("FAIL  upstreams.untrusted: upstream untrusted failed TLS verification"),
        "{said}"
    );
}
