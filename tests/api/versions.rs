//! Answers follow the caller's `X-Broker-API-Version`: a field is sent only to clients whose
//! version defines it (the OSB release notes say which version brought each), for every
//! version the broker answers, 2.4 to 2.17.

use reqwest::Method;
use serde_json::{json, Value};

use crate::helpers::*;
use crate::helpers::{logs_config, LOG_PLAN, LOG_SERVICE};

/// What a client of `minor` sends and reads.
fn at(client: &TestClient, minor: u32, method: Method, path: &str) -> reqwest::RequestBuilder {
    client
        .client
        .request(method, format!("{}{path}", client.base))
        .basic_auth(USER, Some(PASSWORD))
        .header("X-Broker-API-Version", format!("2.{minor}"))
}

async fn answer(req: reqwest::RequestBuilder, body: Option<Value>) -> Answer {
    let req = match body {
        Some(b) => req.json(&b),
        None => req,
    };
    Answer::from(req.send().await.unwrap()).await
}

/// Asserts `field` is in `object` exactly when the version `minor` defines it (`since`).
#[track_caller]
fn defined(object: &Value, field: &str, since: u32, minor: u32, what: &str) {
    assert_eq!(
        object.get(field).is_some(),
        minor >= since,
        "{what} at 2.{minor}: {field} (defined from 2.{since}) in {object}"
    );
}

#[tokio::test]
async fn every_answer_carries_only_the_fields_of_the_callers_version() {
    let app = spawn_app().await;
    let c = &app.osb;
    for minor in 4..=17 {
        // The catalog: service and plan fields.
        let catalog = answer(at(c, minor, Method::GET, "/v2/catalog"), None).await;
        catalog.expect(200);
        let service = catalog.body["services"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["id"] == SERVICE)
            .unwrap();
        defined(
            service,
            "instances_retrievable",
            14,
            minor,
            "catalog service",
        );
        defined(
            service,
            "bindings_retrievable",
            14,
            minor,
            "catalog service",
        );
        assert!(
            service.get("plan_updateable").is_some(),
            "plan_updateable is 2.4's"
        );
        let plan = |id: &str| {
            service["plans"]
                .as_array()
                .unwrap()
                .iter()
                .find(|p| p["id"] == id)
                .unwrap()
                .clone()
        };
        defined(&plan(LARGE), "schemas", 13, minor, "catalog plan");
        defined(&plan(MAINT), "maintenance_info", 15, minor, "catalog plan");

        // Provision and update: the update names its dashboard from 2.14 on.
        let id = unique(&format!("v{minor}"));
        let path = format!("/v2/service_instances/{id}");
        let provisioned = answer(
            at(c, minor, Method::PUT, &path),
            Some(provision_body(SERVICE, MAINT)),
        )
        .await;
        provisioned.expect(201);
        assert!(provisioned.body.get("dashboard_url").is_some());
        let updated = answer(
            at(c, minor, Method::PATCH, &path),
            Some(json!({"service_id": SERVICE, "plan_id": MAINT, "parameters": {}})),
        )
        .await;
        updated.expect(200);
        defined(&updated.body, "dashboard_url", 14, minor, "update");
        // Fetching the instance: maintenance_info from 2.15 on.
        let fetched = answer(at(c, minor, Method::GET, &path), None).await;
        fetched.expect(200);
        defined(
            &fetched.body,
            "maintenance_info",
            15,
            minor,
            "fetched instance",
        );
        assert!(fetched.body.get("plan_id").is_some());

        // Asynchronous answers (2.7 on) carry their operation from 2.9 on.
        if minor >= 7 {
            let async_id = unique(&format!("va{minor}"));
            let apath = format!("/v2/service_instances/{async_id}?accepts_incomplete=true");
            let accepted = answer(
                at(c, minor, Method::PUT, &apath),
                Some(provision_body(SERVICE, ASYNC)),
            )
            .await;
            accepted.expect(202);
            defined(
                &accepted.body,
                "operation",
                9,
                minor,
                "asynchronous provision",
            );
            let token = accepted
                .body
                .get("operation")
                .and_then(Value::as_str)
                .map(str::to_string);
            let poll = match &token {
                Some(t) => format!("/v2/service_instances/{async_id}/last_operation?operation={t}"),
                None => format!("/v2/service_instances/{async_id}/last_operation"),
            };
            loop {
                let polled = answer(at(c, minor, Method::GET, &poll), None).await;
                polled.expect(200);
                if polled.body["state"] != "in progress" {
                    assert_eq!(polled.body["state"], "succeeded", "{}", polled.raw);
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            let dpath = format!(
                "/v2/service_instances/{async_id}?accepts_incomplete=true&service_id={SERVICE}&plan_id={ASYNC}"
            );
            let deleting = answer(at(c, minor, Method::DELETE, &dpath), None).await;
            deleting.expect(202);
            defined(
                &deleting.body,
                "operation",
                9,
                minor,
                "asynchronous deprovision",
            );
        }
    }
}

/// Bind answers: a log binding's `syslog_drain_url` is 2.4's; fetching a binding is 2.14's
/// and its `parameters` with it.
#[tokio::test]
async fn bind_answers_follow_the_version_too() {
    let app = spawn_with(logs_config(None)).await;
    let c = &app.osb;
    for minor in [4, 13, 14, 17] {
        let id = unique(&format!("vb{minor}"));
        c.provision_with(&id, provision_body(LOG_SERVICE, LOG_PLAN), false)
            .await
            .expect(201);
        let path = format!("/v2/service_instances/{id}/service_bindings/{id}-b");
        let bound = answer(
            at(c, minor, Method::PUT, &path),
            Some(json!({"service_id": LOG_SERVICE, "plan_id": LOG_PLAN, "app_guid": "app", "parameters": {}})),
        )
        .await;
        bound.expect(201);
        assert!(bound.body["syslog_drain_url"].is_string());
        let fetched = answer(at(c, minor, Method::GET, &path), None).await;
        fetched.expect(200);
        assert!(fetched.body["syslog_drain_url"].is_string());
    }
}

/// settings.yml's `max_db_per_node`: past it a provision gets 507; it is never published,
/// changing a plan is not a new instance, and a freed place can be taken again.
#[tokio::test]
async fn max_db_per_node_limits_a_backends_instances() {
    let mut config = logs_config(None);
    config.backends[0] = "logs: {flush_interval_ms: 100, max_db_per_node: 2}".into();
    let app = spawn_with(config).await;
    let c = &app.osb;
    let catalog = c.catalog().await;
    assert!(!catalog.raw.contains("max_db_per_node"), "{}", catalog.raw);
    let ids: Vec<String> = (0..3).map(|i| unique(&format!("node{i}"))).collect();
    for id in &ids[..2] {
        c.provision_with(id, provision_body(LOG_SERVICE, LOG_PLAN), false)
            .await
            .expect(201);
    }
    let refused = c
        .provision_with(&ids[2], provision_body(LOG_SERVICE, LOG_PLAN), false)
        .await;
    refused.expect_error(507, Some("InsufficientStorage"));
    assert!(refused.body["description"]
        .as_str()
        .unwrap()
        .contains("max_db_per_node"));
    c.call(
        Method::GET,
        &format!("/v2/service_instances/{}", ids[2]),
        None,
    )
    .await
    .expect_error(404, None);
    // Repeating a provision that exists is no new instance.
    c.provision_with(&ids[0], provision_body(LOG_SERVICE, LOG_PLAN), false)
        .await
        .expect(200);
    c.update(
        &ids[0],
        json!({"service_id": LOG_SERVICE, "plan_id": LOG_PLAN, "parameters": {}}),
        false,
    )
    .await
    .expect(200);
    c.deprovision(&ids[1], LOG_SERVICE, LOG_PLAN)
        .await
        .expect(200);
    c.provision_with(&ids[2], provision_body(LOG_SERVICE, LOG_PLAN), false)
        .await
        .expect(201);
}
