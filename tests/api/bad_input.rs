//! Hostile and broken requests: each gets its status and an OSB error body, and leaves
//! nothing behind: no record, no database.

use brokerage::backend::mysql::database_name;
use reqwest::Method;
use serde_json::json;

use crate::helpers::*;

async fn nothing_created(app: &TestApp, id: &str) {
    let fetched = app
        .call(Method::GET, &format!("/v2/service_instances/{id}"), None)
        .await;
    assert!(
        fetched.status == 404 || fetched.status == 400,
        "no record for {id:?}: {}",
        fetched.raw
    );
    assert!(
        !database_exists(&database_name(id)).await,
        "no database for {id:?}"
    );
}

#[tokio::test]
async fn broken_bodies_are_refused_and_create_nothing() {
    let app = spawn_app().await;
    let valid = provision_body(SERVICE, SMALL).to_string();
    let mut missing_org = provision_body(SERVICE, SMALL);
    missing_org
        .as_object_mut()
        .unwrap()
        .remove("organization_guid");
    let mut empty_space = provision_body(SERVICE, SMALL);
    empty_space["space_guid"] = json!("");
    let mut wrong_type = provision_body(SERVICE, SMALL);
    wrong_type["plan_id"] = json!(42);
    let mut params_not_object = provision_body(SERVICE, SMALL);
    params_not_object["parameters"] = json!("drop table");
    let cases: Vec<(&str, String, &str, u16)> = vec![
        (
            "malformed JSON",
            valid[..valid.len() - 3].to_string(),
            "application/json",
            400,
        ),
        ("not an object", "[1, 2, 3]".into(), "application/json", 400),
        ("a JSON string", "\"hello\"".into(), "application/json", 400),
        ("empty body", "".into(), "application/json", 400),
        ("wrong content type", valid.clone(), "text/plain", 415),
        (
            "form content type",
            valid.clone(),
            "application/x-www-form-urlencoded",
            415,
        ),
        (
            "missing organization_guid",
            missing_org.to_string(),
            "application/json",
            400,
        ),
        (
            "empty space_guid",
            empty_space.to_string(),
            "application/json",
            400,
        ),
        (
            "plan_id of the wrong type",
            wrong_type.to_string(),
            "application/json",
            400,
        ),
        (
            "parameters not an object",
            params_not_object.to_string(),
            "application/json",
            400,
        ),
        (
            "unknown service",
            provision_body("no-such-service", SMALL).to_string(),
            "application/json",
            400,
        ),
        (
            "unknown plan",
            provision_body(SERVICE, "no-such-plan").to_string(),
            "application/json",
            400,
        ),
        (
            "plan of another service",
            provision_body(SERVICE, FIXED_A).to_string(),
            "application/json",
            400,
        ),
        (
            "10 MB body",
            format!("{{\"x\":\"{}\"}}", "a".repeat(10 * 1024 * 1024)),
            "application/json",
            413,
        ),
    ];
    for (what, body, content_type, status) in cases {
        let id = unique("bad");
        let answer = Answer::from(
            app.request(Method::PUT, &format!("/v2/service_instances/{id}"))
                .header("Content-Type", content_type)
                .body(body)
                .send()
                .await
                .unwrap_or_else(|e| panic!("{what}: {e}")),
        )
        .await;
        assert_eq!(answer.status.as_u16(), status, "{what}: {}", answer.raw);
        answer.expect_error(status, None);
        nothing_created(&app, &id).await;
    }
}

#[tokio::test]
async fn hostile_ids_are_refused_before_anything_happens() {
    let app = spawn_app().await;
    let long = "a".repeat(300);
    let ids: Vec<(&str, &str)> = vec![
        ("single quote", "x'%3B%20DROP%20DATABASE%20mysql%3B%20--"),
        ("double quote", "x%22y"),
        ("backtick", "x%60y"),
        ("dot dot slash", "..%2F..%2Fetc%2Fpasswd"),
        ("encoded slash", "a%2Fb"),
        ("space", "a%20b"),
        ("300 characters", long.as_str()),
        ("non-ASCII", "caf%C3%A9"),
        ("NUL", "a%00b"),
        ("invalid UTF-8", "%FF%FE"),
    ];
    for (what, id) in &ids {
        let answer = app
            .call(
                Method::PUT,
                &format!("/v2/service_instances/{id}"),
                Some(provision_body(SERVICE, SMALL)),
            )
            .await;
        answer.expect_error(400, None);
        let bind = app
            .call(
                Method::PUT,
                &format!("/v2/service_instances/valid-id/service_bindings/{id}"),
                Some(json!({"service_id": SERVICE, "plan_id": SMALL})),
            )
            .await;
        assert_eq!(bind.status, 400, "{what}: {}", bind.raw);
        bind.expect_error(400, None);
    }
    // The decoded forms never reached MySQL.
    for raw in [
        "x'; DROP DATABASE mysql; --",
        "x\"y",
        "x`y",
        "../../etc/passwd",
        &long,
        "café",
    ] {
        assert!(!database_exists(&database_name(raw)).await, "{raw}");
    }
    assert!(
        database_exists("mysql").await,
        "the server's own database is intact"
    );
}

#[tokio::test]
async fn wrong_credentials_and_missing_version_create_nothing() {
    let app = spawn_app().await;
    let id = unique("auth");
    let answer = Answer::from(
        app.client
            .put(format!("{}/v2/service_instances/{id}", app.base))
            .basic_auth(USER, Some("wrong"))
            .header("X-Broker-API-Version", "2.17")
            .json(&provision_body(SERVICE, SMALL))
            .send()
            .await
            .unwrap(),
    )
    .await;
    answer.expect_error(401, None);
    let answer = Answer::from(
        app.client
            .put(format!("{}/v2/service_instances/{id}", app.base))
            .basic_auth(USER, Some(PASSWORD))
            .json(&provision_body(SERVICE, SMALL))
            .send()
            .await
            .unwrap(),
    )
    .await;
    answer.expect_error(412, None);
    nothing_created(&app, &id).await;
}
