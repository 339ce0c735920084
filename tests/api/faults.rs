//! Upstreams that misbehave: hang, refuse, answer garbage or 500. These upstreams are
//! fault injectors written here (no real broker fails on cue); everything on the
//! aggregator's side is real.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use axum::{Json, Router};
use reqwest::Method;
use serde_json::{json, Value};

use crate::helpers::*;

/// What the fault injector does with instance calls.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Healthy,
    Hang,
    Garbage,
    Error500,
}

#[derive(Clone)]
struct Fault {
    mode: Arc<Mutex<Mode>>,
    calls: Arc<AtomicUsize>,
    deletes: Arc<Mutex<Vec<String>>>,
}

struct Injector {
    base: String,
    fault: Fault,
    server: tokio::task::JoinHandle<()>,
}

impl Injector {
    async fn start() -> Injector {
        let fault = Fault {
            mode: Arc::new(Mutex::new(Mode::Healthy)),
            calls: Arc::new(AtomicUsize::new(0)),
            deletes: Arc::new(Mutex::new(Vec::new())),
        };
        let app = Router::new()
            .route("/v2/catalog", get(catalog))
            .route("/v2/service_instances/{id}", any(instance))
            .with_state(fault.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Injector {
            base,
            fault,
            server,
        }
    }

    fn set(&self, mode: Mode) {
        *self.fault.mode.lock().unwrap() = mode;
    }

    fn calls(&self) -> usize {
        self.fault.calls.load(Ordering::SeqCst)
    }
}

async fn catalog() -> Json<Value> {
    Json(
        json!({"services": [{"id": "f-svc", "name": "flaky", "description": "d", "bindable": true,
        "plans": [{"id": "f-plan", "name": "p", "description": "d"}]}]}),
    )
}

async fn instance(
    State(f): State<Fault>,
    method: axum::http::Method,
    Path(id): Path<String>,
) -> Response {
    f.calls.fetch_add(1, Ordering::SeqCst);
    if method == axum::http::Method::DELETE {
        f.deletes.lock().unwrap().push(id);
        return (StatusCode::OK, Json(json!({}))).into_response();
    }
    let mode = *f.mode.lock().unwrap();
    match mode {
        Mode::Healthy => (StatusCode::CREATED, Json(json!({}))).into_response(),
        Mode::Hang => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            StatusCode::OK.into_response()
        }
        Mode::Garbage => (StatusCode::CREATED, "<html>surprise</html>").into_response(),
        Mode::Error500 => (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(json!({"description": "kaboom"})),
        )
            .into_response(),
    }
}

fn flaky_upstream(base: &str) -> String {
    format!(
        "{{alias: flaky, url: \"{base}\", request_timeout_secs: 2, breaker: {{failures: 3, cool_down_secs: 2}}}}"
    )
}

async fn flaky_ids(app: &TestApp) -> (String, String) {
    let svc = wait_for_service(app, "flaky-flaky").await;
    (
        svc["id"].as_str().unwrap().to_string(),
        svc["plans"][0]["id"].as_str().unwrap().to_string(),
    )
}

#[tokio::test]
async fn a_hanging_upstream_times_out_clearly_while_everything_else_answers() {
    let injector = Injector::start().await;
    let healthy = python_upstream("up-user", "up-password");
    let app = spawn_with(
        TestConfig::new()
            .with_upstream(flaky_upstream(&injector.base))
            .with_upstream(format!(
                "{{alias: east, url: \"{}\", auth: {{kind: basic, username: up-user, password: up-password}}}}",
                healthy.base
            )),
    )
    .await;
    let (sid, pid) = flaky_ids(&app).await;
    let east = wait_for_service(&app, "east-db").await;
    injector.set(Mode::Hang);
    let id = unique("hang");

    let started = Instant::now();
    let hanging = {
        let req = app
            .request(Method::PUT, &format!("/v2/service_instances/{id}"))
            .json(&provision_body(&sid, &pid));
        tokio::spawn(async move { Answer::from(req.send().await.unwrap()).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The id is claimed in this process only: a second provision of it waits its turn,
    // and nothing is recorded before the upstream answers.
    let calls = injector.calls();
    app.provision_with(&id, provision_body(&sid, &pid), false)
        .await
        .expect_error(422, Some("ConcurrencyError"));
    assert_eq!(injector.calls(), calls, "the repeat was not forwarded");
    app.call(Method::GET, &format!("/v2/service_instances/{id}"), None)
        .await
        .expect_error(404, None);
    // Meanwhile the catalog and the other upstream answer promptly.
    let t = Instant::now();
    app.catalog().await.expect(200);
    let other = unique("other");
    app.provision_with(
        &other,
        provision_body(
            east["id"].as_str().unwrap(),
            east["plans"][0]["id"].as_str().unwrap(),
        ),
        false,
    )
    .await
    .expect(201);
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "no waiting on the hung upstream: {:?}",
        t.elapsed()
    );

    let answer = hanging.await.unwrap();
    answer.expect_error(504, Some("GatewayTimeout"));
    assert!(answer.body["description"]
        .as_str()
        .unwrap()
        .contains("flaky"));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    // Nothing recorded; Cloud Controller's orphan mitigation DELETE reaches the upstream.
    app.call(Method::GET, &format!("/v2/service_instances/{id}"), None)
        .await
        .expect_error(404, None);
    app.deprovision(&id, &sid, &pid).await.expect(200);
    assert_eq!(*injector.fault.deletes.lock().unwrap(), vec![id.clone()]);
    // A DELETE for an id whose service nobody offers is simply gone.
    app.deprovision(&id, "no-such-service", "no-such-plan")
        .await
        .expect(410);
}

#[tokio::test]
async fn garbage_500_and_refused_connections_are_clear_bad_gateways() {
    let injector = Injector::start().await;
    let app = spawn_with(TestConfig::new().with_upstream(flaky_upstream(&injector.base))).await;
    let (sid, pid) = flaky_ids(&app).await;

    injector.set(Mode::Garbage);
    let id = unique("junk");
    let answer = app
        .provision_with(&id, provision_body(&sid, &pid), false)
        .await;
    answer.expect_error(502, Some("BadGateway"));
    assert!(
        answer.body["description"]
            .as_str()
            .unwrap()
            .contains("not OSB"),
        "{}",
        answer.raw
    );

    injector.set(Mode::Error500);
    let answer = app
        .provision_with(&id, provision_body(&sid, &pid), false)
        .await;
    answer.expect_error(502, None);
    assert!(
        answer.body["description"]
            .as_str()
            .unwrap()
            .contains("kaboom"),
        "{}",
        answer.raw
    );
    app.call(Method::GET, &format!("/v2/service_instances/{id}"), None)
        .await
        .expect_error(404, None);

    injector.server.abort();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let answer = app
        .provision_with(&id, provision_body(&sid, &pid), false)
        .await;
    answer.expect_error(502, None);
    assert!(
        answer.body["description"]
            .as_str()
            .unwrap()
            .contains("cannot be reached"),
        "{}",
        answer.raw
    );
    // The catalog still offers the last good copy.
    assert!(app.catalog().await.raw.contains("flaky-flaky"));
}

#[tokio::test]
async fn the_circuit_breaker_opens_and_recovers() {
    let injector = Injector::start().await;
    let app = spawn_with(TestConfig::new().with_upstream(flaky_upstream(&injector.base))).await;
    let (sid, pid) = flaky_ids(&app).await;
    injector.set(Mode::Error500);
    let health = || async {
        let h: Value = reqwest::get(format!("{}/health", app.base))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        h["upstreams"][0]["breaker"].as_str().unwrap().to_string()
    };
    assert_eq!(health().await, "closed");
    for _ in 0..3 {
        app.provision_with(&unique("cb"), provision_body(&sid, &pid), false)
            .await
            .expect_error(502, None);
    }
    assert_eq!(health().await, "open");
    let before = injector.calls();
    let refused = app
        .provision_with(&unique("cb"), provision_body(&sid, &pid), false)
        .await;
    refused.expect_error(503, None);
    assert!(
        refused.body["description"]
            .as_str()
            .unwrap()
            .contains("circuit"),
        "{}",
        refused.raw
    );
    assert_eq!(
        injector.calls(),
        before,
        "an open circuit does not call the upstream"
    );

    // After the cool-down one probe goes through; success closes the circuit.
    injector.set(Mode::Healthy);
    tokio::time::sleep(Duration::from_millis(2200)).await;
    app.provision_with(&unique("cb"), provision_body(&sid, &pid), false)
        .await
        .expect(201);
    assert_eq!(health().await, "closed");
}
