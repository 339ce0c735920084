//! The rows of the OSB v2.17 status tables that apply to a local broker, and the headers.

use std::time::Duration;

use brokerage::backend::mysql::database_name;
use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::helpers::*;

/// A "MySQL server" that accepts connections and never says a word.
async fn silent_server() -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("mysql://root@{}", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    (url, task)
}

#[tokio::test]
async fn catalog_is_served_with_the_configured_services() {
    let app = spawn_app().await;
    let catalog = app.catalog().await;
    catalog.expect(200);
    let services = catalog.body["services"].as_array().unwrap();
    assert_eq!(services.len(), 2);
    assert_eq!(services[0]["name"], "mysql-test");
    assert_eq!(services[0]["plans"].as_array().unwrap().len(), 4);
    assert_eq!(
        services[0]["dashboard_client"]["id"],
        "mysql-test-dashboard"
    );
    assert!(
        services[0]["plans"][0].get("max_storage_mb").is_none(),
        "backend limits are not published"
    );
    assert!(services[0].get("backend").is_none());
}

#[tokio::test]
async fn authentication_and_version_header() {
    let app = spawn_app().await;
    let url = format!("{}/v2/catalog", app.base);
    let c = &app.client;

    let none = Answer::from(
        c.get(&url)
            .header("X-Broker-API-Version", "2.17")
            .send()
            .await
            .unwrap(),
    )
    .await;
    none.expect_error(401, Some("Unauthorized"));
    assert!(none.headers["www-authenticate"]
        .to_str()
        .unwrap()
        .starts_with("Basic"));
    let wrong = Answer::from(
        c.get(&url)
            .basic_auth(USER, Some("not-the-password"))
            .header("X-Broker-API-Version", "2.17")
            .send()
            .await
            .unwrap(),
    )
    .await;
    wrong.expect_error(401, None);
    // Any configured pair is accepted.
    let second = c
        .get(&url)
        .basic_auth("second-user", Some("second-password"))
        .header("X-Broker-API-Version", "2.17")
        .send()
        .await
        .unwrap();
    assert_eq!(second.status(), StatusCode::OK);

    for (version, status) in [
        (None, 412),
        (Some(""), 412),
        (Some("2.3"), 412),
        (Some("3.0"), 412),
        (Some("banana"), 412),
        (Some("2.4"), 200),
        (Some("2.15"), 200),
        (Some("2.17"), 200),
    ] {
        let mut req = c.get(&url).basic_auth(USER, Some(PASSWORD));
        if let Some(v) = version {
            req = req.header("X-Broker-API-Version", v);
        }
        let answer = Answer::from(req.send().await.unwrap()).await;
        assert_eq!(
            answer.status.as_u16(),
            status,
            "version {version:?}: {}",
            answer.raw
        );
        if status == 412 {
            answer.expect_error(412, Some("PreconditionFailed"));
            assert!(answer.body["description"].as_str().unwrap().contains("2.4"));
        }
    }
}

#[tokio::test]
async fn request_identity_is_echoed_and_wrong_methods_get_osb_bodies() {
    let app = spawn_app().await;
    let answer = Answer::from(
        app.request(Method::GET, "/v2/catalog")
            .header(
                "X-Broker-API-Request-Identity",
                "e26cea65-6d1d-4a0c-9df0-3b2b4b1e2c11",
            )
            .header(
                "X-Broker-API-Originating-Identity",
                "cloudfoundry eyJ1c2VyX2lkIjoiNjgzZWE3NDgtMzA5Mi00ZmY0LWI2NTYtMzljYWNjNGQ1MzYwIn0=",
            )
            .send()
            .await
            .unwrap(),
    )
    .await;
    answer.expect(200);
    assert_eq!(
        answer.headers["x-broker-api-request-identity"],
        "e26cea65-6d1d-4a0c-9df0-3b2b4b1e2c11"
    );
    app.call(Method::POST, "/v2/catalog", None)
        .await
        .expect_error(405, Some("MethodNotAllowed"));
    app.call(Method::POST, "/v2/service_instances/x", Some(json!({})))
        .await
        .expect_error(405, None);
    app.call(Method::GET, "/v2/nothing-here", None)
        .await
        .expect_error(404, None);
}

#[tokio::test]
async fn provision_status_rows() {
    let app = spawn_app().await;
    let id = unique("prov");
    app.provision(&id, SMALL).await.expect(201);
    app.provision(&id, SMALL).await.expect(200);
    // Same id, other attributes: 409.
    app.provision(&id, LARGE).await.expect_error(409, None);
    let mut other_space = provision_body(SERVICE, SMALL);
    other_space["space_guid"] = json!("another-space");
    app.provision_with(&id, other_space, false)
        .await
        .expect_error(409, None);
    // Unknown fields are ignored, "" is absent, an identical repeat with them is still 200.
    let mut extra = provision_body(SERVICE, SMALL);
    extra["something_new"] = json!({"a": 1});
    extra["parameters"] = json!({});
    extra["maintenance_info"] = json!({});
    app.provision_with(&id, extra, false).await.expect(200);

    // maintenance_info must match the plan's.
    let mid = unique("maint");
    let mut stale = provision_body(SERVICE, MAINT);
    stale["maintenance_info"] = json!({"version": "1.0.0"});
    app.provision_with(&mid, stale, false)
        .await
        .expect_error(422, Some("MaintenanceInfoConflict"));
    let mut unexpected = provision_body(SERVICE, SMALL);
    unexpected["maintenance_info"] = json!({"version": "2.0.0"});
    app.provision_with(&mid, unexpected, false)
        .await
        .expect_error(422, Some("MaintenanceInfoConflict"));
    assert!(!database_exists(&database_name(&mid)).await);
    let mut current = provision_body(SERVICE, MAINT);
    current["maintenance_info"] = json!({"version": "2.0.0"});
    app.provision_with(&mid, current, false).await.expect(201);
    let fetched = app
        .call(Method::GET, &format!("/v2/service_instances/{mid}"), None)
        .await;
    assert_eq!(fetched.body["maintenance_info"]["version"], "2.0.0");

    // Unknown parameters are refused by name, and nothing is created.
    let pid = unique("params");
    let mut params = provision_body(SERVICE, SMALL);
    params["parameters"] = json!({"colour": "blue"});
    let refused = app.provision_with(&pid, params, false).await;
    refused.expect_error(400, None);
    assert!(refused.body["description"]
        .as_str()
        .unwrap()
        .contains("colour"));
    app.call(Method::GET, &format!("/v2/service_instances/{pid}"), None)
        .await
        .expect_error(404, None);

    app.deprovision(&id, SERVICE, SMALL).await.expect(200);
    app.deprovision(&mid, SERVICE, MAINT).await.expect(200);
}

#[tokio::test]
async fn update_deprovision_and_fetch_status_rows() {
    let app = spawn_app().await;
    let id = unique("upd");
    app.update(&id, json!({"service_id": SERVICE, "plan_id": LARGE}), false)
        .await
        .expect_error(404, None);
    app.provision(&id, SMALL).await.expect(201);
    app.update(&id, json!({"plan_id": LARGE}), false)
        .await
        .expect_error(400, None);
    app.update(
        &id,
        json!({"service_id": SERVICE, "plan_id": "no-such-plan"}),
        false,
    )
    .await
    .expect_error(400, None);
    app.update(&id, json!({"service_id": SERVICE, "plan_id": LARGE}), false)
        .await
        .expect(200);
    // Moving to an asynchronous plan needs accepts_incomplete.
    app.update(&id, json!({"service_id": SERVICE, "plan_id": ASYNC}), false)
        .await
        .expect_error(422, Some("AsyncRequired"));
    let accepted = app
        .update(&id, json!({"service_id": SERVICE, "plan_id": ASYNC}), true)
        .await;
    accepted.expect(202);
    let done = app.poll(&id, &accepted.operation()).await;
    assert_eq!(done.body["state"], "succeeded", "{}", done.raw);
    let fetched = app
        .call(Method::GET, &format!("/v2/service_instances/{id}"), None)
        .await;
    fetched.expect(200);
    assert_eq!(fetched.body["plan_id"], ASYNC);

    // Deprovision needs service_id and plan_id, and accepts_incomplete on an async plan.
    app.deprovision_query(&id, &format!("plan_id={ASYNC}"))
        .await
        .expect_error(400, None);
    app.deprovision_query(&id, &format!("service_id={SERVICE}"))
        .await
        .expect_error(400, None);
    app.deprovision_query(&id, &format!("service_id={SERVICE}&plan_id="))
        .await
        .expect_error(400, None);
    app.deprovision(&id, SERVICE, ASYNC)
        .await
        .expect_error(422, Some("AsyncRequired"));
    let gone = app
        .deprovision_query(
            &id,
            &format!("service_id={SERVICE}&plan_id={ASYNC}&accepts_incomplete=true"),
        )
        .await;
    gone.expect(202);
    app.poll_until_gone(&format!(
        "/v2/service_instances/{id}/last_operation?operation={}",
        gone.operation()
    ))
    .await
    .expect(410);
    app.deprovision(&id, SERVICE, ASYNC).await.expect(410);
    app.call(Method::GET, &format!("/v2/service_instances/{id}"), None)
        .await
        .expect_error(404, None);
}

#[tokio::test]
async fn bind_unbind_and_fetch_status_rows() {
    let app = spawn_app().await;
    let id = unique("bnd");
    let b = format!("{id}-b");
    app.bind(&id, &b, SMALL).await.expect_error(404, None);
    app.provision(&id, SMALL).await.expect(201);
    app.bind_with(&id, &b, json!({"service_id": SERVICE}), false)
        .await
        .expect_error(400, None);
    app.bind_with(
        &id,
        &b,
        json!({"service_id": FIXED_SERVICE, "plan_id": FIXED_A}),
        false,
    )
    .await
    .expect_error(400, None);
    app.bind(&id, &b, SMALL).await.expect(201);
    app.bind(&id, &b, SMALL).await.expect(200);
    // Same binding id, other attributes: 409.
    app.bind_with(
        &id,
        &b,
        json!({"service_id": SERVICE, "plan_id": SMALL, "app_guid": "another-app"}),
        false,
    )
    .await
    .expect_error(409, None);
    // Bind parameters: read-only is known, anything else is named and refused.
    let ro = format!("{id}-ro");
    let refused = app
        .bind_with(
            &id,
            &ro,
            json!({"service_id": SERVICE, "plan_id": SMALL, "parameters": {"admin": true}}),
            false,
        )
        .await;
    refused.expect_error(400, None);
    assert!(refused.body["description"]
        .as_str()
        .unwrap()
        .contains("admin"));
    app.call(
        Method::GET,
        &format!("/v2/service_instances/{id}/service_bindings/{ro}"),
        None,
    )
    .await
    .expect_error(404, None);
    let read_only = app
        .bind_with(
            &id,
            &ro,
            json!({"service_id": SERVICE, "plan_id": SMALL, "parameters": {"read-only": true}}),
            false,
        )
        .await;
    read_only.expect(201);
    let mut conn = connect_as(&read_only.body["credentials"]).await.unwrap();
    use mysql_async::prelude::Queryable;
    assert!(
        conn.query_drop("CREATE TABLE t (i INT)").await.is_err(),
        "read-only users cannot write"
    );
    drop(conn);

    app.call(
        Method::GET,
        &format!("/v2/service_instances/{id}/service_bindings/nope"),
        None,
    )
    .await
    .expect_error(404, None);
    // Unbind needs both ids; a binding under another instance id is not there.
    app.call(
        Method::DELETE,
        &format!("/v2/service_instances/{id}/service_bindings/{b}?service_id={SERVICE}"),
        None,
    )
    .await
    .expect_error(400, None);
    app.call(
        Method::DELETE,
        &format!(
            "/v2/service_instances/other/service_bindings/{b}?service_id={SERVICE}&plan_id={SMALL}"
        ),
        None,
    )
    .await
    .expect(410);
    app.unbind(&id, &b, SMALL).await.expect(200);
    app.unbind(&id, &ro, SMALL).await.expect(200);
    app.unbind(&id, &b, SMALL).await.expect(410);
    app.deprovision(&id, SERVICE, SMALL).await.expect(200);
}

#[tokio::test]
async fn bindings_that_need_an_app_say_so() {
    let app = spawn_app().await;
    let id = unique("app");
    app.provision_with(&id, provision_body(FIXED_SERVICE, FIXED_A), false)
        .await
        .expect(201);
    let body = |extra: serde_json::Value| {
        let mut b = json!({"service_id": FIXED_SERVICE, "plan_id": FIXED_A});
        b.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        b
    };
    let b = format!("{id}-b");
    for missing in [
        json!({}),
        json!({"app_guid": ""}),
        json!({"bind_resource": {"route": "r"}}),
    ] {
        app.bind_with(&id, &b, body(missing), false)
            .await
            .expect_error(422, Some("RequiresApp"));
    }
    app.bind_with(
        &id,
        &b,
        body(json!({"bind_resource": {"app_guid": "app-9"}})),
        false,
    )
    .await
    .expect(201);
    app.deprovision(&id, FIXED_SERVICE, FIXED_A)
        .await
        .expect(200);
}

#[tokio::test]
async fn last_operation_rows() {
    let app = spawn_app().await;
    let id = unique("lastop");
    app.last_operation(&id, None).await.expect(410);
    app.last_operation(&id, Some("not-a-token"))
        .await
        .expect_error(400, None);
    let accepted = app
        .provision_with(&id, provision_body(SERVICE, ASYNC), true)
        .await;
    accepted.expect(202);
    let done = app.poll(&id, &accepted.operation()).await;
    done.expect(200);
    assert_eq!(done.body["state"], "succeeded");
    // A token for a finished provision polled after the record is gone is 404, not 410.
    let gone = app
        .deprovision_query(
            &id,
            &format!("service_id={SERVICE}&plan_id={ASYNC}&accepts_incomplete=true"),
        )
        .await;
    gone.expect(202);
    let op = gone.operation();
    app.poll_until_gone(&format!(
        "/v2/service_instances/{id}/last_operation?operation={op}"
    ))
    .await
    .expect(410);
    app.last_operation(&id, Some(&accepted.operation()))
        .await
        .expect_error(404, None);
}

/// A backend that never answers: clear 503s within the timeout, the catalog keeps being
/// served, nothing is recorded as created, and concurrent requests see the one in flight.
#[tokio::test]
async fn a_silent_mysql_server_fails_cleanly_and_concurrent_calls_see_the_claim() {
    let (url, _server) = silent_server().await;
    let app = spawn_with(TestConfig::new().with_backend_url(&url)).await;
    let id = unique("silent");

    let started = std::time::Instant::now();
    let slow = {
        let req = app
            .request(Method::PUT, &format!("/v2/service_instances/{id}"))
            .json(&provision_body(SERVICE, SMALL));
        tokio::spawn(async move { Answer::from(req.send().await.unwrap()).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    // While the first is in flight: the catalog answers, and a twin is refused.
    app.catalog().await.expect(200);
    app.provision(&id, SMALL)
        .await
        .expect_error(422, Some("ConcurrencyError"));
    let first = slow.await.unwrap();
    first.expect_error(503, Some("ServiceUnavailable"));
    assert!(
        first.body["description"]
            .as_str()
            .unwrap()
            .contains("unreachable"),
        "{}",
        first.raw
    );
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "no hang: {:?}",
        started.elapsed()
    );
    app.call(Method::GET, &format!("/v2/service_instances/{id}"), None)
        .await
        .expect_error(404, None);
    // Nothing recorded: the DELETE would remove whatever the names point at, but the server
    // cannot be asked, so it is not confirmed gone (Cloud Controller retries).
    app.deprovision(&id, SERVICE, SMALL)
        .await
        .expect_error(503, Some("ServiceUnavailable"));

    // An asynchronous provision reports "in progress" with Retry-After, then failed.
    let accepted = app
        .provision_with(&id, provision_body(SERVICE, ASYNC), true)
        .await;
    accepted.expect(202);
    let op = accepted.operation();
    let polled = app.last_operation(&id, Some(&op)).await;
    polled.expect(200);
    assert_eq!(polled.body["state"], "in progress");
    assert_eq!(polled.headers["retry-after"], "1");
    // A repeat while it runs answers 202 with the same operation.
    let again = app
        .provision_with(&id, provision_body(SERVICE, ASYNC), true)
        .await;
    again.expect(202);
    assert_eq!(again.operation(), op);
    let failed = app.poll(&id, &op).await;
    assert_eq!(failed.body["state"], "failed", "{}", failed.raw);
    assert!(failed.body["description"]
        .as_str()
        .unwrap()
        .contains("unreachable"));
    // Cloud Controller's orphan mitigation then deletes it: accepted, and it fails the
    // same way while the server stays silent, leaving the record for the next attempt.
    let delete = app
        .deprovision_query(
            &id,
            &format!("service_id={SERVICE}&plan_id={ASYNC}&accepts_incomplete=true"),
        )
        .await;
    delete.expect(202);
    let failed = app.poll(&id, &delete.operation()).await;
    assert_eq!(failed.body["state"], "failed", "{}", failed.raw);
}

#[tokio::test]
async fn parameters_are_checked_against_the_schemas_the_catalog_publishes() {
    let app = spawn_app().await;
    let catalog = app.catalog().await;
    let large = catalog.body["services"][0]["plans"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["id"] == LARGE)
        .unwrap()
        .clone();
    assert_eq!(
        large["schemas"]["service_binding"]["create"]["parameters"]["properties"]["read-only"]
            ["type"],
        "boolean",
        "the schema is published"
    );
    let id = unique("schema");
    let mut body = provision_body(SERVICE, LARGE);
    body["parameters"] = json!({"colour": "red"});
    let refused = app.provision_with(&id, body, false).await;
    refused.expect_error(400, None);
    let said = refused.body["description"].as_str().unwrap();
    assert!(
        said.contains("schema") && said.contains("colour"),
        "{}",
        refused.raw
    );
    app.call(Method::GET, &format!("/v2/service_instances/{id}"), None)
        .await
        .expect_error(404, None);
    app.provision(&id, LARGE).await.expect(201);
    let b = format!("{id}-b");
    let refused = app
        .bind_with(
            &id,
            &b,
            json!({"service_id": SERVICE, "plan_id": LARGE, "parameters": {"read-only": "yes"}}),
            false,
        )
        .await;
    refused.expect_error(400, None);
    assert!(
        refused.body["description"]
            .as_str()
            .unwrap()
            .contains("/read-only"),
        "{}",
        refused.raw
    );
    app.bind_with(
        &id,
        &b,
        json!({"service_id": SERVICE, "plan_id": LARGE, "parameters": {"read-only": true}}),
        false,
    )
    .await
    .expect(201);
    app.unbind(&id, &b, LARGE).await.expect(200);
    app.deprovision(&id, SERVICE, LARGE).await.expect(200);
}
