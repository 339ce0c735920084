//! The operator's view: `/metrics` behind its own credentials, `/ready` that tells the
//! truth about the store, HTTPS served by the broker itself.

use std::sync::Arc;
use std::time::Duration;

use reqwest::Method;
use serde_json::Value;

use crate::helpers::*;

#[tokio::test]
async fn metrics_count_what_happened_behind_their_own_credentials() {
    let app = spawn_app().await;
    let id = unique("metrics");
    app.provision(&id, SMALL).await.expect(201);
    app.catalog().await.expect(200);

    let url = format!("{}/metrics", app.base);
    let refused = app
        .client
        .get(&url)
        .basic_auth(USER, Some(PASSWORD))
        .send()
        .await
        .unwrap();
    assert_eq!(
        refused.status(),
        401,
        "the broker's own credentials do not open /metrics"
    );
    let text = metrics_text(&app.base).await;
    let line = |needle: &str| {
        text.lines()
            .find(|l| l.starts_with(needle))
            .unwrap_or_else(|| panic!("no {needle} in\n{text}"))
            .rsplit(' ')
            .next()
            .unwrap()
            .parse::<f64>()
            .unwrap()
    };
    assert_eq!(
        line(
            r#"brokerage_http_requests_total{route="/v2/service_instances/{instance_id}",method="PUT",status="201"}"#
        ),
        1.0
    );
    assert!(
        line(r#"brokerage_http_requests_total{route="/v2/catalog",method="GET",status="200"}"#)
            >= 1.0
    );
    assert!(text.contains("brokerage_http_request_duration_seconds_bucket"));
    assert_eq!(line("brokerage_operations_in_flight"), 0.0);
    app.deprovision(&id, SERVICE, SMALL).await.expect(200);
}

/// A TCP forwarder in front of the test MariaDB that can be cut, to take the store away.
struct Cuttable {
    port: u16,
    cut: Arc<tokio::sync::Notify>,
}

async fn cuttable_mysql() -> Cuttable {
    let target = url::Url::parse(&mysql_url()).unwrap();
    let target = format!("{}:{}", target.host_str().unwrap(), target.port().unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let cut = Arc::new(tokio::sync::Notify::new());
    let stop = cut.clone();
    tokio::spawn(async move {
        let mut links = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let (mut inbound, _) = accepted.unwrap();
                    let target = target.clone();
                    links.spawn(async move {
                        if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                            let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                    });
                }
                () = stop.notified() => {
                    // Close the listener and every forwarded connection.
                    links.abort_all();
                    return;
                }
            }
        }
    });
    Cuttable { port, cut }
}

#[tokio::test]
async fn ready_turns_false_when_the_store_is_unreachable() {
    let proxy = cuttable_mysql().await;
    let db = format!("bkgready_{}", uuid::Uuid::new_v4().simple());
    let store_url = format!("mysql://root@127.0.0.1:{}/{db}", proxy.port);
    let app = spawn_with(
        TestConfig::new()
            .with_store(StoreKind::Url(store_url))
            .with_broker("ready_interval_secs: 1"),
    )
    .await;
    let ready = |app: &TestApp| {
        let url = format!("{}/ready", app.base);
        async move {
            let r = reqwest::get(url).await.unwrap();
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap())
        }
    };
    let (status, body) = ready(&app).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["ready"], true);
    assert_eq!(body["backends"]["mysql"]["ok"], true);

    proxy.cut.notify_one();
    // The probe is cached for ready_interval_secs: the next one sees the store gone.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (status, body) = ready(&app).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["ready"], false);
    assert_eq!(body["store"]["ok"], false);
    // Liveness is not readiness: the process is fine.
    let health = reqwest::get(format!("{}/health", app.base)).await.unwrap();
    assert_eq!(health.status(), 200);
    // And OSB calls needing the store fail cleanly.
    app.call(Method::GET, "/v2/service_instances/x", None)
        .await
        .expect_error(503, None);
}

#[tokio::test]
async fn the_broker_serves_https_when_configured() {
    let dir = tempfile::tempdir().unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let (crt, key_file) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::write(&crt, cert.pem()).unwrap();
    std::fs::write(&key_file, key.serialize_pem()).unwrap();
    let port = free_port();
    let config = TestConfig::new().with_port(port).with_tls(&crt, &key_file);
    let file = config.write();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_brokerage"))
        .args(["serve", "--config"])
        .arg(&file)
        .env_remove("PORT")
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let trusting = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(cert.pem().as_bytes()).unwrap())
        .build()
        .unwrap();
    let base = format!("https://127.0.0.1:{port}");
    wait_healthy(&trusting, &base).await;
    let catalog = trusting
        .get(format!("{base}/v2/catalog"))
        .basic_auth(USER, Some(PASSWORD))
        .header("X-Broker-API-Version", "2.17")
        .send()
        .await
        .unwrap();
    assert_eq!(catalog.status(), 200);
    // Plain HTTP and clients that do not trust the certificate get nothing.
    assert!(reqwest::get(format!("http://127.0.0.1:{port}/health"))
        .await
        .is_err());
    assert!(reqwest::get(format!("{base}/health")).await.is_err());
    let _ = child.kill();
    let _ = child.wait();
}
