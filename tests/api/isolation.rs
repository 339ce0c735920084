//! What holds across every backend, against the real servers `scripts/test` starts: no
//! password the broker hands out (or uses) appears in its log, at any level.

use serde_json::Value;

use crate::helpers::*;

fn env(key: &str) -> String {
    std::env::var(key).unwrap_or_else(|_| panic!("{key} is not set: run ./scripts/test"))
}

/// A service of `backend` with one plan, as a YAML flow mapping.
fn service(backend: &str) -> String {
    format!(
        "{{id: svc-{backend}-logs, name: {backend}-logs, backend: {backend}, description: d, \
         bindable: true, refuse_deprovision_with_bindings: false, \
         plans: [{{id: plan-{backend}-logs, name: p, description: d, max_storage_mb: 10, max_user_connections: 2, purge_on_deprovision: true}}]}}"
    )
}

#[tokio::test]
async fn no_password_appears_in_the_log_even_at_trace() {
    let backends = ["mysql", "postgresql", "redis", "mongodb", "swift"];
    let mut config = TestConfig::new().with_port(free_port());
    for (name, entry) in [
        (
            "postgresql",
            format!(
                "postgresql: {{url: \"{}\"}}",
                env("BKG_TEST_POSTGRESQL_URL")
            ),
        ),
        (
            "redis",
            format!("redis: {{url: \"{}\"}}", env("BKG_TEST_REDIS_URL")),
        ),
        (
            "mongodb",
            format!("mongodb: {{url: \"{}\"}}", env("BKG_TEST_MONGODB_URL")),
        ),
        (
            "swift",
            format!(
                "swift: {{url: \"{}\", admin_key: \"{}\"}}",
                env("BKG_TEST_SWIFT_URL"),
                env("BKG_TEST_SWIFT_ADMIN_KEY")
            ),
        ),
    ] {
        config = config.with_backend(entry, vec![service(name)]);
    }
    config.services.push(service("mysql"));
    let file = config.write();
    // BrokerProcess runs the broker with RUST_LOG=trace: every crate logs everything.
    let broker =
        BrokerProcess::start(&file, config.port, &config.dir.path().join("broker.log")).await;
    let client = broker.client();
    let mut secrets: Vec<(String, String)> = Vec::new();
    for backend in backends {
        let (service, plan) = (
            format!("svc-{backend}-logs"),
            format!("plan-{backend}-logs"),
        );
        let id = unique(&format!("logs-{backend}"));
        let creds: Value = client.provision_and_bind(&id, &service, &plan).await;
        let password = creds["password"].as_str().unwrap().to_string();
        assert!(password.len() >= 16, "{backend}: {creds}");
        secrets.push((format!("{backend} binding password"), password));
        client
            .unbind_from(&id, &format!("{id}-b"), &service, &plan)
            .await
            .expect(200);
        client.deprovision(&id, &service, &plan).await.expect(200);
    }
    // The admin credentials the broker uses, from its configuration.
    for (what, url) in [
        ("PostgreSQL admin", env("BKG_TEST_POSTGRESQL_URL")),
        ("Redis admin", env("BKG_TEST_REDIS_URL")),
        ("MongoDB admin", env("BKG_TEST_MONGODB_URL")),
    ] {
        let password = url::Url::parse(&url)
            .unwrap()
            .password()
            .unwrap()
            .to_string();
        secrets.push((what.to_string(), password));
    }
    secrets.push(("swauth admin key".into(), env("BKG_TEST_SWIFT_ADMIN_KEY")));
    secrets.push(("broker password".into(), PASSWORD.into()));
    let log = std::fs::read_to_string(&broker.log).unwrap();
    assert!(log.lines().count() > 100, "the log is at trace level");
    assert!(log.contains("TRACE"), "the log is at trace level");
    for (what, secret) in &secrets {
        assert!(
            !log.contains(secret.as_str()),
            "the {what} is in the log: {}",
            log.lines().find(|l| l.contains(secret.as_str())).unwrap()
        );
    }
    println!(
        "{} log lines at trace, {} secrets looked for, none found",
        log.lines().count(),
        secrets.len()
    );
}
