//! The MySQL service as an app developer and an operator live it, against the real MariaDB.

use brokerage::backend::mysql::{database_name, user_name};
use mysql_async::prelude::*;
use reqwest::Method;
use serde_json::json;

use crate::helpers::*;

#[tokio::test]
async fn full_lifecycle_with_credentials_an_app_really_uses() {
    let app = spawn_app().await;
    let id = unique("life");
    let db = database_name(&id);

    let created = app.provision(&id, SMALL).await;
    created.expect(201);
    assert_eq!(
        created.body["dashboard_url"],
        format!("https://brokerage.example.test/dashboard/instances/{id}")
    );
    assert!(database_exists(&db).await, "provision creates the database");
    app.provision(&id, SMALL).await.expect(200);

    let fetched = app
        .call(Method::GET, &format!("/v2/service_instances/{id}"), None)
        .await;
    fetched.expect(200);
    assert_eq!(fetched.body["service_id"], SERVICE);
    assert_eq!(fetched.body["plan_id"], SMALL);

    let bound = app.bind(&id, &format!("{id}-b1"), SMALL).await;
    bound.expect(201);
    let creds = bound.body["credentials"].clone();
    for key in [
        "hostname", "port", "name", "username", "password", "uri", "jdbcUrl",
    ] {
        assert!(!creds[key].is_null(), "credentials carry {key}: {creds}");
    }
    assert_eq!(creds["name"], db);
    let password = creds["password"].as_str().unwrap();
    assert!(password.len() >= 24);
    assert!(creds["uri"].as_str().unwrap().starts_with("mysql://"));
    assert!(creds["jdbcUrl"]
        .as_str()
        .unwrap()
        .starts_with("jdbc:mysql://"));

    // The app connects with exactly these credentials, and writes and reads its data.
    let mut conn = connect_as(&creds)
        .await
        .expect("the binding's user connects");
    conn.query_drop("CREATE TABLE notes (id INT PRIMARY KEY, body TEXT)")
        .await
        .unwrap();
    conn.query_drop("INSERT INTO notes VALUES (1, 'hello')")
        .await
        .unwrap();
    let body: Option<String> = conn
        .query_first("SELECT body FROM notes WHERE id = 1")
        .await
        .unwrap();
    assert_eq!(body.as_deref(), Some("hello"));
    // ... and nothing else on the server.
    assert!(conn.query_drop("SELECT * FROM mysql.user").await.is_err());
    drop(conn);

    // A repeated bind answers 200 with the same credentials; fetch shows them too.
    let again = app.bind(&id, &format!("{id}-b1"), SMALL).await;
    again.expect(200);
    assert_eq!(again.body["credentials"], creds);
    let fetched = app
        .call(
            Method::GET,
            &format!("/v2/service_instances/{id}/service_bindings/{id}-b1"),
            None,
        )
        .await;
    fetched.expect(200);
    assert_eq!(fetched.body["credentials"], creds);

    app.unbind(&id, &format!("{id}-b1"), SMALL)
        .await
        .expect(200);
    assert!(!user_exists(creds["username"].as_str().unwrap()).await);
    assert!(
        connect_as(&creds).await.is_err(),
        "unbound credentials stop working"
    );
    app.unbind(&id, &format!("{id}-b1"), SMALL)
        .await
        .expect(410);

    app.deprovision(&id, SERVICE, SMALL).await.expect(200);
    assert!(
        !database_exists(&db).await,
        "deprovision drops the database"
    );
    app.deprovision(&id, SERVICE, SMALL).await.expect(410);
    app.call(Method::GET, &format!("/v2/service_instances/{id}"), None)
        .await
        .expect_error(404, None);
}

#[tokio::test]
async fn max_user_connections_is_enforced_per_binding() {
    let app = spawn_app().await;
    let id = unique("conns");
    app.provision(&id, SMALL).await.expect(201);
    let creds = app.bind(&id, &format!("{id}-b"), SMALL).await.body["credentials"].clone();

    // The small plan allows 2 connections per binding user.
    let first = connect_as(&creds).await.expect("first connection");
    let second = connect_as(&creds).await.expect("second connection");
    let third = connect_as(&creds).await;
    match third {
        Err(mysql_async::Error::Server(e)) => assert_eq!(e.code, 1226, "{e:?}"),
        other => panic!("a third connection must be refused with 1226, got {other:?}"),
    }
    drop((first, second));
    app.unbind(&id, &format!("{id}-b"), SMALL).await.expect(200);
    app.deprovision(&id, SERVICE, SMALL).await.expect(200);
}

#[tokio::test]
async fn unbind_kills_open_connections_and_drops_the_user() {
    let app = spawn_app().await;
    let id = unique("kill");
    app.provision(&id, LARGE).await.expect(201);
    let creds = app.bind(&id, &format!("{id}-b"), LARGE).await.body["credentials"].clone();
    let mut open = connect_as(&creds).await.unwrap();
    open.query_drop("SELECT 1").await.unwrap();
    let user = creds["username"].as_str().unwrap().to_string();
    assert_eq!(user, user_name(&format!("{id}-b")));

    app.unbind(&id, &format!("{id}-b"), LARGE).await.expect(200);
    assert!(!user_exists(&user).await, "the user is dropped");
    assert!(
        open.query_drop("SELECT 1").await.is_err(),
        "the connection open before unbind is killed"
    );
    app.deprovision(&id, SERVICE, LARGE).await.expect(200);
}

#[tokio::test]
async fn a_plan_change_applies_the_new_connection_limit_to_existing_bindings() {
    // Refusing a downgrade the instance outgrew is every backend's: tests/api/contract.rs.
    let app = spawn_app().await;
    let id = unique("quota");
    app.provision(&id, LARGE).await.expect(201);
    let creds = app.bind(&id, &format!("{id}-b"), LARGE).await.body["credentials"].clone();
    app.update(&id, json!({"service_id": SERVICE, "plan_id": SMALL}), false)
        .await
        .expect(200);
    // The new plan's connection limit now applies to the existing binding's user.
    let mut admin = admin().await;
    let limit: Option<u64> = admin
        .exec_first(
            "SELECT max_user_connections FROM mysql.user WHERE User = ?",
            (creds["username"].as_str().unwrap(),),
        )
        .await
        .unwrap();
    assert_eq!(limit, Some(2));

    app.unbind(&id, &format!("{id}-b"), SMALL).await.expect(200);
    app.deprovision(&id, SERVICE, SMALL).await.expect(200);
}

#[tokio::test]
async fn an_asynchronous_plan_is_polled_to_succeeded() {
    let app = spawn_app().await;
    let id = unique("async");
    let db = database_name(&id);

    app.provision(&id, ASYNC)
        .await
        .expect_error(422, Some("AsyncRequired"));
    assert!(
        !database_exists(&db).await,
        "a refused request creates nothing"
    );

    let accepted = app
        .provision_with(&id, provision_body(SERVICE, ASYNC), true)
        .await;
    accepted.expect(202);
    assert!(
        accepted.body["dashboard_url"].is_string(),
        "the first answer carries the dashboard"
    );
    let op = accepted.operation();
    let done = app.poll(&id, &op).await;
    done.expect(200);
    assert_eq!(done.body["state"], "succeeded");
    assert!(database_exists(&db).await);

    let bind = app
        .bind_with(
            &id,
            &format!("{id}-ab"),
            json!({"service_id": SERVICE, "plan_id": ASYNC}),
            true,
        )
        .await;
    bind.expect(202);
    let bop = bind.operation();
    let path = format!("/v2/service_instances/{id}/service_bindings/{id}-ab");
    let mut state = String::new();
    for _ in 0..100 {
        let polled = app
            .call(
                Method::GET,
                &format!("{path}/last_operation?operation={bop}"),
                None,
            )
            .await;
        polled.expect(200);
        state = polled.body["state"].as_str().unwrap().to_string();
        if state != "in progress" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(state, "succeeded");
    let creds = app.call(Method::GET, &path, None).await.body["credentials"].clone();
    connect_as(&creds)
        .await
        .expect("async binding credentials work");

    let unbind = app
        .call(
            Method::DELETE,
            &format!("{path}?service_id={SERVICE}&plan_id={ASYNC}&accepts_incomplete=true"),
            None,
        )
        .await;
    unbind.expect(202);
    let uop = unbind.operation();
    let mut gone = false;
    for _ in 0..100 {
        let polled = app
            .call(
                Method::GET,
                &format!("{path}/last_operation?operation={uop}"),
                None,
            )
            .await;
        if polled.status == 410 {
            gone = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(gone, "a finished async unbind reads as 410 Gone");

    let deprovision = app
        .deprovision_query(
            &id,
            &format!("service_id={SERVICE}&plan_id={ASYNC}&accepts_incomplete=true"),
        )
        .await;
    deprovision.expect(202);
    let dop = deprovision.operation();
    app.poll_until_gone(&format!(
        "/v2/service_instances/{id}/last_operation?operation={dop}"
    ))
    .await
    .expect(410);
    assert!(!database_exists(&db).await);
}

#[tokio::test]
async fn deprovision_with_bindings_is_refused_or_takes_them_along_as_configured() {
    let app = spawn_app().await;
    let id = unique("refuse");
    app.provision(&id, SMALL).await.expect(201);
    app.bind(&id, &format!("{id}-b"), SMALL).await.expect(201);
    let refused = app.deprovision(&id, SERVICE, SMALL).await;
    refused.expect_error(422, None);
    assert!(refused.body["description"]
        .as_str()
        .unwrap()
        .contains("binding"));
    assert!(
        database_exists(&database_name(&id)).await,
        "nothing was dropped"
    );
    // The refusal left the instance usable.
    app.bind(&id, &format!("{id}-b2"), SMALL).await.expect(201);
    app.unbind(&id, &format!("{id}-b"), SMALL).await.expect(200);
    app.unbind(&id, &format!("{id}-b2"), SMALL)
        .await
        .expect(200);
    app.deprovision(&id, SERVICE, SMALL).await.expect(200);

    let id = unique("purge");
    app.provision_with(&id, provision_body(FIXED_SERVICE, FIXED_A), false)
        .await
        .expect(201);
    let bound = app
        .bind_with(
            &id,
            &format!("{id}-pb"),
            json!({"service_id": FIXED_SERVICE, "plan_id": FIXED_A, "app_guid": "app"}),
            false,
        )
        .await;
    bound.expect(201);
    let user = bound.body["credentials"]["username"]
        .as_str()
        .unwrap()
        .to_string();
    app.deprovision(&id, FIXED_SERVICE, FIXED_A)
        .await
        .expect(200);
    assert!(
        !user_exists(&user).await,
        "the remaining binding's user went with the instance"
    );
    assert!(!database_exists(&database_name(&id)).await);
    app.call(
        Method::GET,
        &format!("/v2/service_instances/{id}/service_bindings/{id}-pb"),
        None,
    )
    .await
    .expect_error(404, None);
}

#[tokio::test]
async fn capacity_past_the_backend_limit_is_refused_with_507() {
    // 60 MB in all: one large plan (50 MB) fits, a second does not; a small one (1 MB) does.
    let app = spawn_with(TestConfig::new().with_capacity_mb(60)).await;
    let (first, second, small) = (unique("cap"), unique("cap"), unique("cap"));
    app.provision(&first, LARGE).await.expect(201);
    let refused = app.provision(&second, LARGE).await;
    refused.expect_error(507, Some("InsufficientStorage"));
    assert!(
        refused.body["description"]
            .as_str()
            .unwrap()
            .contains("10 MB"),
        "{}",
        refused.raw
    );
    assert!(
        !database_exists(&database_name(&second)).await,
        "nothing was created"
    );
    app.provision(&small, SMALL).await.expect(201);
    // An upgrade past the limit is refused the same way; a repeat of a provision is not counted twice.
    app.update(
        &small,
        json!({"service_id": SERVICE, "plan_id": LARGE}),
        false,
    )
    .await
    .expect_error(507, None);
    app.provision(&first, LARGE).await.expect(200);
    for (id, plan) in [(&first, LARGE), (&small, SMALL)] {
        app.deprovision(id, SERVICE, plan).await.expect(200);
    }
    // Room again.
    app.provision(&second, LARGE).await.expect(201);
    app.deprovision(&second, SERVICE, LARGE).await.expect(200);
}

#[tokio::test]
async fn a_delete_for_an_unrecorded_instance_or_binding_removes_what_its_names_point_at() {
    // As if a provision and a bind had run but Cloud Controller gave up before their
    // answers were recorded: the database and the user exist, the broker has no record.
    let app = spawn_app().await;
    let (id, binding) = (unique("orphan"), unique("orphan-b"));
    let (db, user) = (database_name(&id), user_name(&binding));
    let mut admin = admin().await;
    admin
        .query_drop(format!("CREATE DATABASE `{db}`"))
        .await
        .unwrap();
    admin
        .query_drop(format!(
            "CREATE USER '{user}'@'%' IDENTIFIED BY 'orphaned-password'"
        ))
        .await
        .unwrap();
    app.unbind(&id, &binding, SMALL).await.expect(410);
    assert!(!user_exists(&user).await, "the orphaned user is dropped");
    app.deprovision(&id, SERVICE, SMALL).await.expect(410);
    assert!(
        !database_exists(&db).await,
        "the orphaned database is dropped"
    );
    // Nothing there at all: still 410.
    app.deprovision(&id, SERVICE, SMALL).await.expect(410);
}

#[tokio::test]
async fn a_failed_provision_never_drops_a_database_it_did_not_create() {
    let app = spawn_app().await;
    let id = unique("not-mine");
    let db = database_name(&id);
    // Someone else's database under the name the broker would derive.
    let mut admin = admin().await;
    admin
        .query_drop(format!("CREATE DATABASE `{db}`"))
        .await
        .unwrap();
    admin
        .query_drop(format!("CREATE TABLE `{db}`.precious (i INT)"))
        .await
        .unwrap();
    for _ in 0..2 {
        let started = app
            .provision_with(&id, provision_body(SERVICE, ASYNC), true)
            .await;
        started.expect(202);
        let polled = app.poll(&id, &started.operation()).await;
        assert_eq!(polled.body["state"], "failed", "{}", polled.body);
        assert!(database_exists(&db).await, "the retry left it alone");
    }
    app.call(
        Method::DELETE,
        &format!("/v2/service_instances/{id}?service_id={SERVICE}&plan_id={ASYNC}&accepts_incomplete=true"),
        None,
    )
    .await;
    let left: Option<String> = admin
        .query_first(format!("SHOW TABLES FROM `{db}`"))
        .await
        .unwrap();
    assert_eq!(
        left.as_deref(),
        Some("precious"),
        "deprovision left it alone"
    );
    admin
        .query_drop(format!("DROP DATABASE `{db}`"))
        .await
        .unwrap();
}
