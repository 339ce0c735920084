//! The `brokerage` command as an operator runs it: check, catalog, configuration errors,
//! environment overrides, and logs that keep secrets out.

use std::process::{Command, Output, Stdio};

use reqwest::Method;
use serde_json::Value;

use crate::helpers::*;

fn brokerage(args: &[&str], env: &[(&str, &str)], dir: &std::path::Path) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_brokerage"));
    cmd.args(args).current_dir(dir).env_remove("PORT");
    for (k, _) in std::env::vars() {
        if k.starts_with("BROKERAGE_") {
            cmd.env_remove(k);
        }
    }
    cmd.envs(env.iter().copied());
    cmd.output().expect("brokerage runs")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn check_names_what_is_unreachable_and_passes_once_mysql_is_there() {
    let dir = tempfile::tempdir().unwrap();
    let closed = free_port();
    let closed_url = format!("mysql://root@127.0.0.1:{closed}");
    let out = brokerage(
        &["check"],
        &[("BROKERAGE_BACKENDS__MYSQL__URL", closed_url.as_str())],
        dir.path(),
    );
    let said = text(&out);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(said.contains("ok    store"), "{said}");
    assert!(said.contains("FAIL  backends.mysql"), "{said}");
    assert!(said.contains(&format!("127.0.0.1:{closed}")), "{said}");

    let out = brokerage(
        &["check"],
        &[("BROKERAGE_BACKENDS__MYSQL__URL", mysql_url().as_str())],
        dir.path(),
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(!text(&out).contains("FAIL"));

    // An unreachable shared store is named too, with its password masked.
    let out = brokerage(
        &["check"],
        &[
            ("BROKERAGE_BACKENDS__MYSQL__URL", mysql_url().as_str()),
            ("BROKERAGE_STORE__KIND", "mysql"),
            (
                "BROKERAGE_STORE__URL",
                format!("mysql://store:store-secret-pw@127.0.0.1:{closed}/brokerage").as_str(),
            ),
        ],
        dir.path(),
    );
    let said = text(&out);
    assert_ne!(out.status.code(), Some(0), "{said}");
    assert!(said.contains("store"), "{said}");
    assert!(!said.contains("store-secret-pw"), "{said}");
}

#[test]
fn check_shows_the_effective_configuration_with_secrets_masked() {
    let dir = tempfile::tempdir().unwrap();
    let url =
        format!("{}/?x=1", mysql_url()).replace("mysql://root@", "mysql://root:admin-pw-123@");
    let out = brokerage(
        &["check", "--show-config"],
        &[
            ("BROKERAGE_BACKENDS__MYSQL__URL", url.as_str()),
            ("BROKERAGE_BROKER__RETRY_AFTER_SECS", "9"),
        ],
        dir.path(),
    );
    let said = text(&out);
    assert!(
        said.contains("retry_after_secs: 9"),
        "environment overrides apply: {said}"
    );
    assert!(!said.contains("brokerage-dev-password"), "{said}");
    assert!(!said.contains("admin-pw-123"), "{said}");
    assert!(said.contains("***"), "{said}");
}

#[test]
fn catalog_prints_the_default_catalog() {
    let dir = tempfile::tempdir().unwrap();
    let out = brokerage(&["catalog"], &[], dir.path());
    assert!(out.status.success(), "{}", text(&out));
    let catalog: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(catalog["services"][0]["name"], "mysql-db");
    assert_eq!(catalog["services"][0]["plans"].as_array().unwrap().len(), 2);
}

#[test]
fn the_whole_marketplace_example_offers_every_backend() {
    let dir = tempfile::tempdir().unwrap();
    let file = concat!(env!("CARGO_MANIFEST_DIR"), "/config/all-backends.yml");
    let out = brokerage(&["catalog", "--config", file], &[], dir.path());
    assert!(out.status.success(), "{}", text(&out));
    let catalog: Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<&str> = catalog["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "mysql-db",
            "postgresql",
            "redis",
            "mongodb",
            "object-storage",
            "cubrid",
            "app-logs"
        ]
    );
    // Backend-only settings never reach the published catalog.
    let published = String::from_utf8_lossy(&out.stdout);
    for key in [
        "purge_on_deprovision",
        "max_log_lines",
        "max_log_bytes",
        "max_db_per_node",
    ] {
        assert!(!published.contains(key), "{key}");
    }
}

#[test]
fn configuration_errors_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let service = |id: &str, name: &str, plan: &str| {
        format!(
            "    - {{id: {id}, name: {name}, backend: mysql, description: d, bindable: true, plans: [{plan}]}}\n"
        )
    };
    let good_plan = "{id: p1, name: p, description: d, max_storage_mb: 1, max_user_connections: 1}";
    let cases = [
        (
            format!(
                "catalog:\n  services:\n{}{}",
                service("s1", "a", good_plan),
                service(
                    "s1",
                    "b",
                    "{id: p2, name: p, description: d, max_storage_mb: 1, max_user_connections: 1}"
                )
            ),
            "catalog.services[1].id",
        ),
        (
            format!(
                "catalog:\n  services:\n{}",
                service("s1", "My_SQL", good_plan)
            ),
            "catalog.services[0].name",
        ),
        (
            format!(
                "catalog:\n  services:\n{}",
                service(
                    "s1",
                    "a",
                    "{id: p1, name: p, description: d, max_user_connections: 1}"
                )
            ),
            "catalog.services[0].plans[0].max_storage_mb",
        ),
        (
            format!(
                "catalog:\n  services:\n{}",
                service("s1", "a", good_plan).replace("mysql", "oracle")
            ),
            "catalog.services[0].backend",
        ),
        ("listen: {port: 70000}\n".to_string(), "listen.port"),
        ("store: {kind: floppy}\n".to_string(), "store"),
        ("auth: {credentials: []}\n".to_string(), "auth.credentials"),
        (
            "broker: {external_url: not-a-url}\n".to_string(),
            "broker.external_url",
        ),
        ("surprise: true\n".to_string(), "surprise"),
    ];
    for (yaml, key) in cases {
        let file = dir.path().join("bad.yml");
        std::fs::write(&file, &yaml).unwrap();
        let out = brokerage(
            &["check", "--config", file.to_str().unwrap()],
            &[],
            dir.path(),
        );
        let said = text(&out);
        assert_eq!(out.status.code(), Some(2), "{yaml}: {said}");
        assert!(
            said.contains(key),
            "the error for\n{yaml}names {key}: {said}"
        );
    }
    let out = brokerage(&["serve"], &[("PORT", "eighty")], dir.path());
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).contains("PORT"), "{}", text(&out));
    let out = brokerage(&["check", "--config", "/no/such/file.yml"], &[], dir.path());
    assert!(text(&out).contains("/no/such/file.yml"));
}

#[tokio::test]
async fn serve_listens_on_port_and_keeps_secrets_out_of_logs() {
    let config = TestConfig::new();
    let file = config.write();
    let port = free_port();
    let log = config.dir.path().join("trace.log");
    let child = Command::new(env!("CARGO_BIN_EXE_brokerage"))
        .args(["serve", "--config"])
        .arg(&file)
        .env("PORT", port.to_string())
        .env("RUST_LOG", "trace")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut broker = BrokerProcess {
        child,
        base: format!("http://127.0.0.1:{port}"),
        log: log.clone(),
    };
    wait_healthy(&reqwest::Client::new(), &broker.base).await;
    let client = broker.client();
    let id = unique("logs");
    let b = format!("{id}-b");
    client.provision(&id, SMALL).await.expect(201);
    let bound = client.bind(&id, &b, SMALL).await;
    bound.expect(201);
    client
        .call(
            Method::GET,
            &format!("/v2/service_instances/{id}/service_bindings/{b}"),
            None,
        )
        .await
        .expect(200);
    client.unbind(&id, &b, SMALL).await.expect(200);
    client.deprovision(&id, SERVICE, SMALL).await.expect(200);
    broker.kill9();
    let logged = std::fs::read_to_string(&broker.log).unwrap();
    assert!(logged.contains(&id), "the log is the one this broker wrote");
    assert!(
        logged.contains("provisioning"),
        "the log has the trace lines"
    );
    let password = bound.body["credentials"]["password"].as_str().unwrap();
    use base64::Engine;
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}"));
    for secret in [
        password,
        PASSWORD,
        basic.as_str(),
        "dashboard-secret-value",
        "second-password",
    ] {
        assert!(
            !logged.contains(secret),
            "a secret reached the log at trace level"
        );
    }
}
