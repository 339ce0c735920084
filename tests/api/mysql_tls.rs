//! TLS between the broker and the MySQL server, and for the apps that bind: the throwaway
//! MariaDB that `scripts/test` starts has a certificate signed by a CA of the run's own.

use std::path::PathBuf;

use mysql_async::prelude::*;
use mysql_async::{OptsBuilder, SslOpts};
use serde_json::Value;

use crate::helpers::*;

fn test_ca() -> PathBuf {
    std::env::var("BKG_TEST_MYSQL_CA")
        .expect("BKG_TEST_MYSQL_CA is not set: run the suite with ./scripts/test")
        .into()
}

fn app_opts(creds: &Value) -> OptsBuilder {
    OptsBuilder::default()
        .ip_or_hostname(creds["hostname"].as_str().unwrap())
        .tcp_port(creds["port"].as_u64().unwrap() as u16)
        .user(creds["username"].as_str())
        .pass(creds["password"].as_str())
        .db_name(creds["name"].as_str())
        .prefer_socket(false)
}

#[tokio::test]
async fn with_a_ca_configured_bindings_get_it_and_must_use_tls() {
    let ca = test_ca();
    let app = spawn_with(TestConfig::new().with_mysql_ca(ca.clone())).await;
    let id = unique("tls");
    app.provision(&id, SMALL).await.expect(201);
    let bound = app.bind(&id, &format!("{id}-b"), SMALL).await;
    bound.expect(201);
    let creds = bound.body["credentials"].clone();

    let pem = std::fs::read_to_string(&ca).unwrap();
    assert_eq!(creds["ca_certificate"], pem, "credentials carry the CA");
    assert!(creds["jdbcUrl"]
        .as_str()
        .unwrap()
        .contains("useSSL=true&requireSSL=true"));

    // Without TLS the binding's user is refused ...
    assert!(
        mysql_async::Conn::new(app_opts(&creds)).await.is_err(),
        "a plain connection is refused"
    );
    // ... and with the CA from its credentials it connects over TLS and works.
    let tls = SslOpts::default().with_root_certs(vec![creds["ca_certificate"]
        .as_str()
        .unwrap()
        .as_bytes()
        .to_vec()
        .into()]);
    let mut conn = mysql_async::Conn::new(app_opts(&creds).ssl_opts(tls))
        .await
        .expect("the binding connects over TLS");
    let cipher: Option<(String, String)> = conn
        .query_first("SHOW SESSION STATUS LIKE 'Ssl_cipher'")
        .await
        .unwrap();
    assert!(!cipher.unwrap().1.is_empty(), "the session is encrypted");
    conn.query_drop("CREATE TABLE t (x INT)").await.unwrap();
    drop(conn);

    app.unbind(&id, &format!("{id}-b"), SMALL).await.expect(200);
    app.deprovision(&id, SERVICE, SMALL).await.expect(200);
}

#[tokio::test]
async fn without_a_ca_credentials_name_none() {
    let app = spawn_app().await;
    let id = unique("notls");
    app.provision(&id, SMALL).await.expect(201);
    let creds = app.bind(&id, &format!("{id}-b"), SMALL).await.body["credentials"].clone();
    assert!(creds.get("ca_certificate").is_none());
    connect_as(&creds).await.expect("plain connections work");
    app.unbind(&id, &format!("{id}-b"), SMALL).await.expect(200);
    app.deprovision(&id, SERVICE, SMALL).await.expect(200);
}

#[tokio::test]
async fn a_ca_that_is_not_a_certificate_stops_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let bogus = dir.path().join("ca.pem");
    std::fs::write(&bogus, "not a certificate").unwrap();
    let config = TestConfig::new().with_mysql_ca(bogus).load();
    let err = brokerage::backend::from_config(&config)
        .err()
        .expect("a bogus CA is refused");
    assert!(err.to_string().contains("ca_certificate"), "{err}");
}
