//! What every local backend promises, run against each of them in one table: MySQL,
//! PostgreSQL, Redis and Swift as real servers, MongoDB against secantusdb (wire
//! compatibility), CUBRID against the stand-in of `tests/fixtures` (CUBRID cannot run
//! here). Per-backend files keep only what is specific to their backend.

use std::time::Duration;

use futures::future::BoxFuture;
use reqwest::Method;
use serde_json::{json, Value};

use crate::cubrid::StandIn;
use crate::helpers::*;

/// One backend as the contract drives it.
struct Case {
    name: &'static str,
    /// How the backend's errors name it.
    says: &'static str,
    /// Plan sizes, in MB: the instance is filled past `small` (PostgreSQL's empty database
    /// already takes about 8 MB).
    large_mb: u64,
    small_mb: u64,
    /// Writes this many MB into the instance with a binding's credentials, as an app does;
    /// `None`: the backend cannot tell its usage, and refuses any change of size instead.
    fill: Option<fn(Value, u64) -> BoxFuture<'static, ()>>,
}

const CASES: &[Case] = &[
    Case {
        name: "mysql",
        says: "MySQL",
        large_mb: 50,
        small_mb: 1,
        fill: Some(fill_mysql),
    },
    Case {
        name: "postgresql",
        says: "PostgreSQL",
        large_mb: 100,
        small_mb: 16,
        fill: Some(fill_postgresql),
    },
    Case {
        name: "mongodb",
        says: "MongoDB",
        large_mb: 50,
        small_mb: 1,
        fill: Some(fill_mongodb),
    },
    Case {
        name: "redis",
        says: "Redis",
        large_mb: 50,
        small_mb: 1,
        fill: Some(fill_redis),
    },
    Case {
        name: "swift",
        says: "Swift",
        large_mb: 50,
        small_mb: 1,
        fill: Some(fill_swift),
    },
    Case {
        name: "cubrid",
        says: "CUBRID",
        large_mb: 100,
        small_mb: 50,
        fill: None,
    },
];

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run the suite with ./scripts/test, which starts the servers")
    })
}

impl Case {
    fn service(&self) -> String {
        format!("svc-contract-{}", self.name)
    }
    fn plan(&self, large: bool) -> String {
        format!(
            "plan-contract-{}-{}",
            self.name,
            if large { "large" } else { "small" }
        )
    }

    /// A broker with this backend, reaching its server or, with `down`, a port nobody
    /// listens on (CUBRID: tools that are not installed).
    fn config(&self, down: bool, cubrid: &StandIn) -> TestConfig {
        let port = free_port();
        let entry = match self.name {
            "mysql" => None,
            "postgresql" if down => Some(format!(
                "postgresql: {{url: \"postgres://postgres:secret-pw@127.0.0.1:{port}/postgres\", connect_timeout_secs: 2}}"
            )),
            "postgresql" => Some(format!(
                "postgresql: {{url: \"{}\", connect_timeout_secs: 3}}",
                env("BKG_TEST_POSTGRESQL_URL")
            )),
            "mongodb" => Some(format!(
                "mongodb: {{url: \"{}\", connect_timeout_secs: 2}}",
                match down {
                    true => format!("mongodb://admin:secret-pw@127.0.0.1:{port}/?authSource=admin"),
                    false => env("BKG_TEST_MONGODB_URL"),
                }
            )),
            "redis" => Some(format!(
                "redis: {{url: \"{}\", connect_timeout_secs: 2}}",
                match down {
                    true => format!("redis://:secret-pw@127.0.0.1:{port}"),
                    false => env("BKG_TEST_REDIS_URL"),
                }
            )),
            "swift" => Some(format!(
                "swift: {{url: \"{}\", admin_key: \"{}\", timeout_secs: 5}}",
                match down {
                    true => format!("http://127.0.0.1:{port}"),
                    false => env("BKG_TEST_SWIFT_URL"),
                },
                env("BKG_TEST_SWIFT_ADMIN_KEY")
            )),
            "cubrid" => Some(cubrid.entry(down)),
            other => unreachable!("{other}"),
        };
        let service = format!(
            "{{id: {}, name: contract-{}, backend: {}, description: the contract, bindable: true, \
             plan_updateable: true, instances_retrievable: true, bindings_retrievable: true, \
             refuse_deprovision_with_bindings: false, \
             plans: [{{id: {}, name: large, description: large, max_storage_mb: {}, max_user_connections: 5, purge_on_deprovision: true}}, \
                     {{id: {}, name: small, description: small, max_storage_mb: {}, max_user_connections: 5, purge_on_deprovision: true}}]}}",
            self.service(),
            self.name,
            self.name,
            self.plan(true),
            self.large_mb,
            self.plan(false),
            self.small_mb
        );
        let config = TestConfig::new();
        match entry {
            Some(entry) => config.with_backend(entry, vec![service]),
            None if down => config
                .with_backend_url(&format!("mysql://root:secret-pw@127.0.0.1:{port}/"))
                .with_services(vec![service]),
            None => config.with_services(vec![service]),
        }
    }

    async fn provision(&self, app: &TestApp, id: &str, large: bool) -> Answer {
        app.provision_with(
            id,
            provision_body(&self.service(), &self.plan(large)),
            false,
        )
        .await
    }

    fn instance(&self, id: &str) -> String {
        format!("/v2/service_instances/{id}")
    }

    fn binding(&self, id: &str, binding: &str) -> String {
        format!("/v2/service_instances/{id}/service_bindings/{binding}")
    }

    async fn bind(&self, app: &TestApp, id: &str, binding: &str, parameters: Value) -> Answer {
        let body = json!({
            "service_id": self.service(), "plan_id": self.plan(true),
            "app_guid": "contract-app", "parameters": parameters,
        });
        app.call(Method::PUT, &self.binding(id, binding), Some(body))
            .await
    }

    async fn delete(&self, app: &TestApp, path: &str) -> Answer {
        let query = format!(
            "{path}?service_id={}&plan_id={}",
            self.service(),
            self.plan(true)
        );
        app.call(Method::DELETE, &query, None).await
    }
}

#[tokio::test]
async fn every_backend_provisions_binds_unbinds_and_deprovisions_and_repeats_change_nothing() {
    let cubrid = StandIn::new();
    for case in CASES {
        let app = spawn_with(case.config(false, &cubrid)).await;
        let id = unique(&format!("contract-{}", case.name));
        let name = case.name;
        assert_eq!(case.provision(&app, &id, true).await.status, 201, "{name}");
        let again = case.provision(&app, &id, true).await;
        assert_eq!(
            again.status, 200,
            "{name}: a repeated provision: {}",
            again.raw
        );

        let bound = case.bind(&app, &id, "b1", json!({})).await;
        assert_eq!(bound.status, 201, "{name}: {}", bound.raw);
        let credentials = bound.body["credentials"].clone();
        assert!(credentials.is_object(), "{name}: {}", bound.raw);
        let again = case.bind(&app, &id, "b1", json!({})).await;
        assert_eq!(again.status, 200, "{name}: a repeated bind: {}", again.raw);
        assert_eq!(again.body["credentials"], credentials, "{name}");
        let fetched = app.call(Method::GET, &case.binding(&id, "b1"), None).await;
        assert_eq!(fetched.body["credentials"], credentials, "{name}");

        assert_eq!(
            case.delete(&app, &case.binding(&id, "b1")).await.status,
            200,
            "{name}"
        );
        assert_eq!(
            case.delete(&app, &case.binding(&id, "b1")).await.status,
            410,
            "{name}"
        );
        assert_eq!(
            case.delete(&app, &case.instance(&id)).await.status,
            200,
            "{name}"
        );
        assert_eq!(
            case.delete(&app, &case.instance(&id)).await.status,
            410,
            "{name}"
        );
        app.call(Method::GET, &case.instance(&id), None)
            .await
            .expect_error(404, None);
    }
}

#[tokio::test]
async fn every_backend_whose_server_is_down_answers_503_and_records_nothing() {
    let cubrid = StandIn::new();
    for case in CASES {
        let app = spawn_with(case.config(true, &cubrid)).await;
        let id = unique(&format!("down-{}", case.name));
        let answer = case.provision(&app, &id, true).await;
        assert_eq!(answer.status, 503, "{}: {}", case.name, answer.raw);
        assert_eq!(answer.body["error"], "ServiceUnavailable", "{}", case.name);
        assert!(
            answer.raw.contains(case.says),
            "{}: {}",
            case.name,
            answer.raw
        );
        // Where the broker's own systems are, and how it logs in, is for its log only.
        for secret in ["127.0.0.1", "secret-pw", "root", "admin"] {
            assert!(
                !answer.raw.contains(secret),
                "{}: {}",
                case.name,
                answer.raw
            );
        }
        app.call(Method::GET, &case.instance(&id), None)
            .await
            .expect_error(404, None);
        let ready = app.call(Method::GET, "/ready", None).await;
        assert_eq!(ready.status, 503, "{}: {}", case.name, ready.raw);
    }
}

#[tokio::test]
async fn every_backend_refuses_a_downgrade_while_the_instance_holds_more_than_the_new_plan() {
    let cubrid = StandIn::new();
    for case in CASES {
        let app = spawn_with(case.config(false, &cubrid)).await;
        let name = case.name;
        let update = |id: String| {
            let body = json!({"service_id": case.service(), "plan_id": case.plan(false)});
            let app = &app;
            async move { app.update(&id, body, false).await }
        };
        // An instance that holds little moves to the small plan.
        let empty = unique(&format!("shrink-{name}"));
        case.provision(&app, &empty, true).await.expect(201);
        let moved = update(empty.clone()).await;
        match case.fill {
            Some(_) => assert_eq!(moved.status, 200, "{name}: {}", moved.raw),
            None => assert_eq!(
                moved.status, 422,
                "{name} never changes size: {}",
                moved.raw
            ),
        }
        case.delete(&app, &case.instance(&empty)).await;
        let Some(fill) = case.fill else { continue };

        let full = unique(&format!("full-{name}"));
        case.provision(&app, &full, true).await.expect(201);
        let credentials =
            case.bind(&app, &full, "writer", json!({})).await.body["credentials"].clone();
        fill(credentials, case.small_mb + 2).await;
        let refused = update(full.clone()).await;
        assert_eq!(refused.status, 422, "{name}: {}", refused.raw);
        let said = refused.body["description"].as_str().unwrap_or_default();
        assert!(
            said.contains(&format!("of {} MB", case.small_mb)),
            "{name}: {said}"
        );
        let fetched = app.call(Method::GET, &case.instance(&full), None).await;
        assert_eq!(
            fetched.body["plan_id"],
            case.plan(true),
            "{name}: nothing changed"
        );
        case.delete(&app, &case.binding(&full, "writer"))
            .await
            .expect(200);
        case.delete(&app, &case.instance(&full)).await.expect(200);
    }
}

#[tokio::test]
async fn every_backend_refuses_parameters_it_does_not_read_before_anything_is_made() {
    let cubrid = StandIn::new();
    for case in CASES {
        let app = spawn_with(case.config(false, &cubrid)).await;
        let name = case.name;
        let id = unique(&format!("params-{name}"));
        let mut body = provision_body(&case.service(), &case.plan(true));
        body["parameters"] = json!({"bogus": 1});
        let refused = app.provision_with(&id, body, false).await;
        assert_eq!(refused.status, 400, "{name}: {}", refused.raw);
        assert!(refused.raw.contains("bogus"), "{name}: {}", refused.raw);
        app.call(Method::GET, &case.instance(&id), None)
            .await
            .expect_error(404, None);

        case.provision(&app, &id, true).await.expect(201);
        let refused = case.bind(&app, &id, "b", json!({"bogus": true})).await;
        assert_eq!(refused.status, 400, "{name}: {}", refused.raw);
        app.call(Method::GET, &case.binding(&id, "b"), None)
            .await
            .expect_error(404, None);
        case.delete(&app, &case.instance(&id)).await.expect(200);
    }
}

const MB: usize = 1024 * 1024;

fn fill_mysql(creds: Value, mb: u64) -> BoxFuture<'static, ()> {
    Box::pin(async move {
        use mysql_async::prelude::*;
        let mut conn = connect_as(&creds).await.unwrap();
        conn.query_drop("CREATE TABLE fill (id INT PRIMARY KEY, data LONGBLOB)")
            .await
            .unwrap();
        for i in 0..mb {
            conn.exec_drop("INSERT INTO fill VALUES (?, REPEAT('x', ?))", (i, MB))
                .await
                .unwrap();
        }
    })
}

fn fill_postgresql(creds: Value, mb: u64) -> BoxFuture<'static, ()> {
    Box::pin(async move {
        let config: tokio_postgres::Config = creds["uri"].as_str().unwrap().parse().unwrap();
        let (client, connection) = config.connect(tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(connection);
        // md5 text does not compress: about 100 bytes a row.
        let rows = mb * 10_000;
        client
            .batch_execute(&format!(
                "CREATE TABLE fill AS SELECT g, md5(g::text) || md5((g + 1)::text) AS t \
                 FROM generate_series(1, {rows}) g"
            ))
            .await
            .unwrap();
    })
}

fn fill_mongodb(creds: Value, mb: u64) -> BoxFuture<'static, ()> {
    Box::pin(async move {
        let mut options = mongodb::options::ClientOptions::parse(creds["uri"].as_str().unwrap())
            .await
            .unwrap();
        options.server_selection_timeout = Some(Duration::from_secs(3));
        let client = mongodb::Client::with_options(options).unwrap();
        let fill = client
            .database(creds["database"].as_str().unwrap())
            .collection::<mongodb::bson::Document>("fill");
        for i in 0..mb {
            let doc = mongodb::bson::doc! {"i": i as i64, "data": "x".repeat(MB)};
            fill.insert_one(doc).await.unwrap();
        }
    })
}

fn fill_redis(creds: Value, mb: u64) -> BoxFuture<'static, ()> {
    Box::pin(async move {
        let mut con = redis::Client::open(creds["uri"].as_str().unwrap())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let prefix = creds["key_prefix"].as_str().unwrap();
        for i in 0..mb {
            let _: () = redis::cmd("SET")
                .arg(format!("{prefix}fill-{i}"))
                .arg("x".repeat(MB))
                .query_async(&mut con)
                .await
                .unwrap();
        }
    })
}

fn fill_swift(creds: Value, mb: u64) -> BoxFuture<'static, ()> {
    Box::pin(async move {
        let session = crate::swift::login(&creds).await.unwrap();
        assert!(session.put("fill", 0).await.is_success());
        // Within the large plan's quota: Swift itself refuses past it.
        let bytes = mb as usize * MB;
        assert!(session.put("fill/data", bytes).await.is_success());
        // Swift counts an account's bytes a moment after the write: what the broker then
        // reads is what a client sees.
        session.wait_for_usage(bytes as u64).await;
    })
}
