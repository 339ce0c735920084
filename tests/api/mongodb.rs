//! The MongoDB service, as wire-compatibility tests: `scripts/test` runs PyPI's secantusdb, a
//! reimplementation of MongoDB's wire protocol with SCRAM authentication and users, because
//! no mongod can be installed here. Passing shows the broker and its credentials work with
//! a server speaking MongoDB's protocol, not conformance with MongoDB itself.

use std::time::Duration;

use brokerage::backend::{database_name, user_name};
use mongodb::bson::{doc, Document};
use mongodb::options::ClientOptions;
use mongodb::Client;
use reqwest::Method;
use serde_json::Value;

use crate::helpers::*;

pub const MONGO_SERVICE: &str = "svc-mongodb-test";
pub const MONGO_PLAN: &str = "plan-mongodb-small";

fn mongodb_url() -> String {
    std::env::var("BKG_TEST_MONGODB_URL").expect(
        "BKG_TEST_MONGODB_URL is not set: run the suite with ./scripts/test, which starts the server",
    )
}

fn with_mongodb(url: &str) -> TestConfig {
    TestConfig::new().with_backend(
        format!("mongodb: {{url: \"{url}\", connect_timeout_secs: 2}}"),
        vec![format!(
            "{{id: {MONGO_SERVICE}, name: mongodb-test, backend: mongodb, description: MongoDB for tests, \
             bindable: true, instances_retrievable: true, bindings_retrievable: true, \
             plans: [{{id: {MONGO_PLAN}, name: small, description: 10 MB, max_storage_mb: 10}}]}}"
        )],
    )
}

/// A client exactly as an app builds it from the binding's `uri`.
async fn app_client(creds: &Value) -> Client {
    let mut options = ClientOptions::parse(creds["uri"].as_str().unwrap())
        .await
        .unwrap();
    options.server_selection_timeout = Some(Duration::from_secs(3));
    Client::with_options(options).unwrap()
}

async fn admin_client() -> Client {
    Client::with_uri_str(mongodb_url()).await.unwrap()
}

async fn database_names() -> Vec<String> {
    admin_client().await.list_database_names().await.unwrap()
}

fn is_unauthorized(e: &mongodb::error::Error) -> bool {
    let text = e.to_string().to_lowercase();
    text.contains("not authorized") || text.contains("authentication failed")
}

#[tokio::test]
async fn wire_compatible_bindings_write_their_own_database_only_until_unbound() {
    let app = spawn_with(with_mongodb(&mongodb_url())).await;
    let (a, b) = (unique("mongo-a"), unique("mongo-b"));
    let creds_a = app.provision_and_bind(&a, MONGO_SERVICE, MONGO_PLAN).await;
    let creds_b = app.provision_and_bind(&b, MONGO_SERVICE, MONGO_PLAN).await;
    for key in ["uri", "host", "port", "database", "username", "password"] {
        assert!(
            !creds_a[key].is_null(),
            "credentials carry {key}: {creds_a}"
        );
    }
    assert_eq!(creds_a["database"], database_name(&a));
    assert_eq!(creds_a["username"], user_name(&format!("{a}-b")));
    assert!(creds_a["uri"].as_str().unwrap().starts_with("mongodb://"));
    assert!(database_names().await.contains(&database_name(&a)));

    // The app writes and reads its own database with exactly these credentials.
    let client_a = app_client(&creds_a).await;
    let own = client_a
        .database(creds_a["database"].as_str().unwrap())
        .collection::<Document>("notes");
    own.insert_one(doc! {"_id": 1, "body": "hello"})
        .await
        .unwrap();
    let found = own.find_one(doc! {"_id": 1}).await.unwrap().unwrap();
    assert_eq!(found.get_str("body").unwrap(), "hello");

    // Another instance's database is refused, for writing and for reading.
    let theirs = client_a
        .database(creds_b["database"].as_str().unwrap())
        .collection::<Document>("notes");
    let err = theirs.insert_one(doc! {"x": 1}).await.unwrap_err();
    assert!(is_unauthorized(&err), "{err}");
    let err = theirs.find_one(doc! {}).await.unwrap_err();
    assert!(is_unauthorized(&err), "{err}");

    // Unbind drops the user: logging in with its credentials fails from then on.
    app.unbind_from(&a, &format!("{a}-b"), MONGO_SERVICE, MONGO_PLAN)
        .await
        .expect(200);
    let after = app_client(&creds_a).await;
    let err = after
        .database(creds_a["database"].as_str().unwrap())
        .collection::<Document>("notes")
        .find_one(doc! {})
        .await
        .unwrap_err();
    assert!(is_unauthorized(&err), "{err}");
    // The other binding is untouched.
    let client_b = app_client(&creds_b).await;
    client_b
        .database(creds_b["database"].as_str().unwrap())
        .collection::<Document>("notes")
        .insert_one(doc! {"still": "works"})
        .await
        .unwrap();

    // Deprovision drops the database and with it every user left in it.
    app.deprovision(&a, MONGO_SERVICE, MONGO_PLAN)
        .await
        .expect(200);
    assert!(!database_names().await.contains(&database_name(&a)));
    app.unbind_from(&b, &format!("{b}-b"), MONGO_SERVICE, MONGO_PLAN)
        .await
        .expect(200);
    app.deprovision(&b, MONGO_SERVICE, MONGO_PLAN)
        .await
        .expect(200);
    assert!(!database_names().await.contains(&database_name(&b)));
}

#[tokio::test]
async fn wire_compatible_a_database_the_broker_did_not_create_is_a_conflict() {
    let app = spawn_with(with_mongodb(&mongodb_url())).await;
    let id = unique("mongo-taken");
    admin_client()
        .await
        .database(&database_name(&id))
        .collection::<Document>("someone_elses")
        .insert_one(doc! {"x": 1})
        .await
        .unwrap();
    app.provision_with(&id, provision_body(MONGO_SERVICE, MONGO_PLAN), false)
        .await
        .expect_error(409, None);
    app.call(Method::GET, &format!("/v2/service_instances/{id}"), None)
        .await
        .expect_error(404, None);
    // The existing data is left alone.
    let kept = admin_client()
        .await
        .database(&database_name(&id))
        .collection::<Document>("someone_elses")
        .count_documents(doc! {})
        .await
        .unwrap();
    assert_eq!(kept, 1);
    admin_client()
        .await
        .database(&database_name(&id))
        .drop()
        .await
        .unwrap();
}

#[tokio::test]
async fn wire_compatible_a_tenant_learns_nothing_of_other_tenants() {
    let app = spawn_with(with_mongodb(&mongodb_url())).await;
    let (mine, theirs) = (unique("mongo-mine"), unique("mongo-theirs"));
    let creds = app
        .provision_and_bind(&mine, MONGO_SERVICE, MONGO_PLAN)
        .await;
    app.provision_and_bind(&theirs, MONGO_SERVICE, MONGO_PLAN)
        .await;
    let client = app_client(&creds).await;
    // listDatabases: only its own database, or refused.
    match client.list_database_names().await {
        Ok(names) => assert!(
            !names.contains(&database_name(&theirs)),
            "another tenant's database is listed: {names:?}"
        ),
        Err(e) => assert!(is_unauthorized(&e), "{e}"),
    }
    // usersInfo about another tenant's database, or about every database: refused or empty.
    let theirs_db = client.database(&database_name(&theirs));
    match theirs_db.run_command(doc! {"usersInfo": 1}).await {
        Ok(answer) => assert!(
            answer
                .get_array("users")
                .map(|u| u.is_empty())
                .unwrap_or(true),
            "another tenant's users are listed: {answer}"
        ),
        Err(e) => assert!(is_unauthorized(&e), "{e}"),
    }
    let own_db = client.database(&database_name(&mine));
    match own_db
        .run_command(doc! {"usersInfo": {"forAllDBs": true}})
        .await
    {
        Ok(answer) => {
            let users = answer.get_array("users").cloned().unwrap_or_default();
            assert!(
                users
                    .iter()
                    .all(|u| !u.to_string().contains(&database_name(&theirs))),
                "another tenant's users are listed: {answer}"
            );
        }
        Err(e) => assert!(is_unauthorized(&e), "{e}"),
    }
    for id in [&mine, &theirs] {
        app.unbind_from(id, &format!("{id}-b"), MONGO_SERVICE, MONGO_PLAN)
            .await
            .expect(200);
        app.deprovision(id, MONGO_SERVICE, MONGO_PLAN)
            .await
            .expect(200);
    }
}
