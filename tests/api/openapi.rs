//! A property-based run of the OSB v2.17 OpenAPI description (`../shared/osb/`) against a
//! broker process, by PyPI's schemathesis: positive and negative examples, coverage,
//! fuzzing and stateful phases. No 5xx, every answer of the declared content type, and
//! every request the description says is invalid rejected.

use std::path::Path;
use std::process::Command;

use crate::helpers::*;

#[tokio::test]
async fn the_openapi_description_finds_nothing_wrong() {
    let spec = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/osb/openapi-v2.17.yaml");
    assert!(
        spec.exists(),
        "the OSB description is expected at {}",
        spec.display()
    );
    let st = std::env::var("BKG_TEST_SCHEMATHESIS").expect(
        "BKG_TEST_SCHEMATHESIS is not set: run ./scripts/test, which installs schemathesis",
    );
    let port = free_port();
    let config = TestConfig::new().with_port(port);
    let file = config.write();
    let _broker = BrokerProcess::start(&file, port, &config.dir.path().join("broker.log")).await;
    use base64::Engine;
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}"));
    let out = tokio::process::Command::from({
        let mut c = Command::new(st);
        c.arg("run")
            .arg(&spec)
            .args(["--url", &format!("http://127.0.0.1:{port}")])
            .args(["-H", &format!("Authorization: Basic {auth}")])
            .args(["-H", "X-Broker-API-Version: 2.17"])
            .args([
                "--checks",
                "not_a_server_error,content_type_conformance,negative_data_rejection",
            ])
            .args([
                "--mode",
                "all",
                "--max-examples",
                "25",
                "--seed",
                "20261124",
            ])
            .env("NO_COLOR", "1")
            // schemathesis keeps a cache in its working directory: not in the checkout.
            .current_dir(config.dir.path());
        c
    })
    .output()
    .await
    .unwrap();
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "schemathesis found problems:\n{said}");
    assert!(said.contains("passed"), "{said}");
}
