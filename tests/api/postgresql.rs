//! The PostgreSQL service against a real PostgreSQL (Debian's packages) that `scripts/test`
//! starts on loopback, with the credentials used exactly as an app's driver does.

use brokerage::backend::database_name;
use serde_json::{json, Value};
use tokio_postgres::{Client, NoTls};

use crate::helpers::*;

const PG_SERVICE: &str = "svc-postgresql-test";
const PG_PLAN: &str = "plan-postgresql-2con";

fn postgresql_url() -> String {
    std::env::var("BKG_TEST_POSTGRESQL_URL").expect(
        "BKG_TEST_POSTGRESQL_URL is not set: run the suite with ./scripts/test, which starts PostgreSQL",
    )
}

fn with_postgresql(url: &str) -> TestConfig {
    TestConfig::new().with_backend(
        format!("postgresql: {{url: \"{url}\", connect_timeout_secs: 3}}"),
        vec![format!(
            "{{id: {PG_SERVICE}, name: postgresql-test, backend: postgresql, description: PostgreSQL for tests, \
             bindable: true, plan_updateable: true, instances_retrievable: true, bindings_retrievable: true, \
             plans: [{{id: {PG_PLAN}, name: small, description: 2 connections, max_storage_mb: 50, max_user_connections: 2}}]}}"
        )],
    )
}

/// Connects with a binding's `uri`, as an app does; `database` overrides its database.
async fn connect(creds: &Value, database: Option<&str>) -> Result<Client, tokio_postgres::Error> {
    let mut config: tokio_postgres::Config = creds["uri"].as_str().unwrap().parse().unwrap();
    if let Some(db) = database {
        config.dbname(db);
    }
    let (client, connection) = config.connect(NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// What the server said.
fn message(e: &tokio_postgres::Error) -> String {
    e.as_db_error()
        .map(|d| d.message().to_string())
        .unwrap_or_else(|| e.to_string())
}

async fn admin_has_database(db: &str) -> bool {
    let (client, connection) = tokio_postgres::connect(&postgresql_url(), NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    !client
        .query("SELECT 1 FROM pg_database WHERE datname = $1", &[&db])
        .await
        .unwrap()
        .is_empty()
}

async fn bind(app: &TestApp, id: &str, binding: &str) -> Value {
    let bound = app
        .bind_with(
            id,
            binding,
            json!({"service_id": PG_SERVICE, "plan_id": PG_PLAN, "app_guid": "app-1"}),
            false,
        )
        .await;
    bound.expect(201);
    bound.body["credentials"].clone()
}

#[tokio::test]
async fn bindings_share_their_database_are_kept_out_of_others_and_lose_access_on_unbind() {
    let app = spawn_with(with_postgresql(&postgresql_url())).await;
    let (a, b) = (unique("pg-a"), unique("pg-b"));
    let creds_a = app.provision_and_bind(&a, PG_SERVICE, PG_PLAN).await;
    let creds_b = app.provision_and_bind(&b, PG_SERVICE, PG_PLAN).await;
    for key in [
        "hostname", "port", "name", "username", "password", "uri", "jdbcUrl",
    ] {
        assert!(
            !creds_a[key].is_null(),
            "credentials carry {key}: {creds_a}"
        );
    }
    assert_eq!(creds_a["name"], database_name(&a));

    // The app creates and fills a table in its database.
    let client = connect(&creds_a, None).await.expect("the binding connects");
    client
        .batch_execute("CREATE TABLE notes (id serial PRIMARY KEY, body text); INSERT INTO notes (body) VALUES ('hello')")
        .await
        .unwrap();

    // A second binding of the same instance sees and writes the same table.
    let second = bind(&app, &a, &format!("{a}-b2")).await;
    let other_app = connect(&second, None).await.unwrap();
    other_app
        .batch_execute("INSERT INTO notes (body) VALUES ('from the second app')")
        .await
        .unwrap();
    let n: i64 = other_app
        .query_one("SELECT count(*) FROM notes", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 2);

    // Another instance's database refuses it.
    let err = connect(&creds_a, Some(creds_b["name"].as_str().unwrap()))
        .await
        .map(|_| ())
        .expect_err("no access to another instance's database");
    assert!(message(&err).contains("permission denied"), "{err:?}");

    // The plan's connection limit holds per binding.
    let _extra = connect(&creds_a, None).await.expect("a second connection");
    let err = connect(&creds_a, None)
        .await
        .map(|_| ())
        .expect_err("a third connection is refused");
    assert!(message(&err).contains("too many connections"), "{err:?}");
    drop(_extra);

    // Unbind drops the role and ends its sessions; its table stays for the other binding.
    app.unbind_from(&a, &format!("{a}-b"), PG_SERVICE, PG_PLAN)
        .await
        .expect(200);
    assert!(
        client.query_one("SELECT 1", &[]).await.is_err(),
        "the open session was ended"
    );
    assert!(connect(&creds_a, None).await.is_err(), "the login is gone");
    let n: i64 = other_app
        .query_one("SELECT count(*) FROM notes", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 2, "data outlives the binding that wrote it");

    // Deprovision (bindings are taken along only when unbound first) drops the database.
    app.unbind_from(&a, &format!("{a}-b2"), PG_SERVICE, PG_PLAN)
        .await
        .expect(200);
    app.deprovision(&a, PG_SERVICE, PG_PLAN).await.expect(200);
    assert!(!admin_has_database(&database_name(&a)).await);
    assert!(connect(&second, None).await.is_err());
    app.unbind_from(&b, &format!("{b}-b"), PG_SERVICE, PG_PLAN)
        .await
        .expect(200);
    app.deprovision(&b, PG_SERVICE, PG_PLAN).await.expect(200);
}

#[tokio::test]
async fn a_binding_connects_only_to_its_own_database_and_unbind_survives_what_it_owns_elsewhere() {
    let app = spawn_with(with_postgresql(&postgresql_url())).await;
    let (mine, theirs) = (unique("pg-mine"), unique("pg-theirs"));
    let creds = app.provision_and_bind(&mine, PG_SERVICE, PG_PLAN).await;
    app.provision_with(&theirs, provision_body(PG_SERVICE, PG_PLAN), false)
        .await
        .expect(201);
    connect(&creds, None).await.expect("its own database");
    for other in ["postgres", "template1", &database_name(&theirs)] {
        let refused = connect(&creds, Some(other))
            .await
            .err()
            .unwrap_or_else(|| panic!("connected to {other}"));
        assert!(
            message(&refused).contains("permission denied"),
            "{other}: {}",
            message(&refused)
        );
    }
    // Something the binding's role owns in another database (as a tenant could make on
    // PostgreSQL 14 and older, where everyone may create in `public`): unbind still works.
    let (admin, connection) = tokio_postgres::connect(&postgresql_url(), NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let role = creds["username"].as_str().unwrap();
    let table = format!("left_by_{}", role);
    admin
        .batch_execute(&format!(
            "CREATE TABLE \"{table}\" (i INT); ALTER TABLE \"{table}\" OWNER TO \"{role}\""
        ))
        .await
        .unwrap();
    app.unbind_from(&mine, &format!("{mine}-b"), PG_SERVICE, PG_PLAN)
        .await
        .expect(200);
    let left = admin
        .query("SELECT 1 FROM pg_tables WHERE tablename = $1", &[&table])
        .await
        .unwrap();
    assert!(left.is_empty(), "what it owned elsewhere went with it");
    let role_left = admin
        .query("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&role])
        .await
        .unwrap();
    assert!(role_left.is_empty(), "the role is gone");
    for id in [&mine, &theirs] {
        app.deprovision(id, PG_SERVICE, PG_PLAN).await.expect(200);
    }
}

#[tokio::test]
async fn the_admin_connection_and_bindings_can_use_tls_checked_against_a_ca() {
    let env = |k: &str| std::env::var(k).unwrap_or_else(|_| panic!("{k}: run ./scripts/test"));
    let (url, ca) = (
        env("BKG_TEST_POSTGRESQL_TLS_URL"),
        env("BKG_TEST_POSTGRESQL_CA"),
    );
    let tls = |ca: &str| {
        TestConfig::new().with_backend(
            format!("postgresql: {{url: \"{url}\", connect_timeout_secs: 3, ca_certificate: \"{ca}\"}}"),
            vec![format!(
                "{{id: {PG_SERVICE}, name: postgresql-test, backend: postgresql, description: TLS, \
                 bindable: true, plans: [{{id: {PG_PLAN}, name: small, description: d, max_storage_mb: 50, max_user_connections: 2}}]}}"
            )],
        )
    };
    // The admin may log in over TLS only: with the CA the broker works...
    let app = spawn_with(tls(&ca)).await;
    let id = unique("pg-tls");
    let creds = app.provision_and_bind(&id, PG_SERVICE, PG_PLAN).await;
    assert!(creds["uri"]
        .as_str()
        .unwrap()
        .ends_with("?sslmode=verify-full"));
    let pem = creds["ca_certificate"].as_str().unwrap();
    assert!(pem.contains("BEGIN CERTIFICATE"));
    // ...and an app connects over TLS, checking the server with the CA it was handed.
    let mut roots = tokio_rustls::rustls::RootCertStore::empty();
    for cert in rustls_pemfile_certs(pem) {
        roots.add(cert).unwrap();
    }
    let config = tokio_rustls::rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        tokio_rustls::rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    // tokio-postgres does not read libpq's sslmode=verify-full; its TLS connector checks the
    // certificate and host name itself.
    let uri = creds["uri"].as_str().unwrap();
    let mut app_config: tokio_postgres::Config = uri
        .trim_end_matches("?sslmode=verify-full")
        .parse()
        .unwrap();
    app_config.ssl_mode(tokio_postgres::config::SslMode::Require);
    let (client, connection) = app_config
        .connect(tokio_postgres_rustls::MakeRustlsConnect::new(config))
        .await
        .expect("the app connects over TLS");
    tokio::spawn(connection);
    client
        .batch_execute("CREATE TABLE t (i INT)")
        .await
        .unwrap();
    drop(client);
    app.unbind_from(&id, &format!("{id}-b"), PG_SERVICE, PG_PLAN)
        .await
        .expect(200);
    app.deprovision(&id, PG_SERVICE, PG_PLAN).await.expect(200);
    // A certificate from another CA is refused: nothing is provisioned.
    let wrong = spawn_with(tls(&env("BKG_TEST_MYSQL_CA"))).await;
    let other = unique("pg-tls-wrong");
    wrong
        .provision_with(&other, provision_body(PG_SERVICE, PG_PLAN), false)
        .await
        .expect_error(503, None);
    assert!(!admin_has_database(&database_name(&other)).await);
}

fn rustls_pemfile_certs(
    pem: &str,
) -> Vec<tokio_rustls::rustls::pki_types::CertificateDer<'static>> {
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    tokio_rustls::rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .unwrap()
}
