//! The fast tier: the broker's mechanism (claim, act, record, answer) in process, with a
//! fake backend and the embedded store in memory. Each test plays a call sequence a
//! platform, a second caller or a crash produces and checks what the caller is answered,
//! what the store then holds and what the backend was asked to do. The real backends,
//! processes and servers are the integration suite's (`tests/`).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use serde_json::{json, Value};
use tokio::sync::Semaphore;

use super::{Broker, CallContext, Reply, Timing};
use crate::backend::{Backend, BackendError, Backends, Binding, Bound, Unbinding};
use crate::catalog::{LocalCatalog, PlanLimits};
use crate::config::{Config, ServiceConfig};
use crate::error::OsbError;
use crate::federation::Federation;
use crate::store::records;
use crate::store::{
    BindingRecord, EmbeddedStore, Insert, InstanceRecord, Link, OpState, StateStore, StoreError,
    Table, Versioned,
};

/// An answer as the JSON the HTTP layer writes.
fn body(reply: &Reply) -> Value {
    serde_json::to_value(&reply.answer).expect("answers serialize")
}

/// What the fake backend holds and was asked to do.
#[derive(Default)]
struct Fake {
    /// Instances and bindings it holds, by id, with how often each was made.
    made: Mutex<BTreeMap<String, u32>>,
    /// Every call, in order: `provision i1`, `bind b1`, ...
    calls: Mutex<Vec<String>>,
    /// The next call's failure.
    fail_next: Mutex<Option<BackendError>>,
    /// While set, provisions wait for a permit (a backend that takes its time).
    gate: Mutex<Option<Arc<Semaphore>>>,
    /// While set, deprovisions wait for a permit.
    deprovision_gate: Mutex<Option<Arc<Semaphore>>>,
    /// Set: the next provision never finishes.
    stall: AtomicBool,
}

impl Fake {
    async fn act(&self, call: &str, id: &str) -> Result<(), BackendError> {
        self.calls.lock().unwrap().push(format!("{call} {id}"));
        if let Some(e) = self.fail_next.lock().unwrap().take() {
            return Err(e);
        }
        Ok(())
    }

    fn calls(&self, call: &str) -> usize {
        let prefix = format!("{call} ");
        self.calls
            .lock()
            .unwrap()
            .iter()
            .filter(|c| c.starts_with(&prefix))
            .count()
    }

    fn holds(&self, id: &str) -> bool {
        self.made.lock().unwrap().contains_key(id)
    }

    fn make(&self, id: &str) {
        *self.made.lock().unwrap().entry(id.to_string()).or_default() += 1;
    }

    fn remove(&self, id: &str) {
        self.made.lock().unwrap().remove(id);
    }
}

/// Waits for a permit while `gate` is set.
async fn pass(gate: &Mutex<Option<Arc<Semaphore>>>) {
    let gate = gate.lock().unwrap().clone();
    if let Some(gate) = gate {
        let _permit = gate.acquire().await.unwrap();
    }
}

#[async_trait]
impl Backend for Fake {
    fn describe(&self) -> String {
        "the fake backend".into()
    }

    async fn check(&self) -> Result<(), BackendError> {
        Ok(())
    }

    async fn provision(&self, instance_id: &str, _limits: PlanLimits) -> Result<(), BackendError> {
        pass(&self.gate).await;
        if self.stall.swap(false, Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        self.act("provision", instance_id).await?;
        self.make(instance_id);
        Ok(())
    }

    async fn update(
        &self,
        instance_id: &str,
        from: PlanLimits,
        to: PlanLimits,
    ) -> Result<(), BackendError> {
        let what = format!(
            "{instance_id} {}->{}",
            from.max_storage_mb, to.max_storage_mb
        );
        self.act("update", &what).await
    }

    async fn deprovision(
        &self,
        instance_id: &str,
        _limits: PlanLimits,
    ) -> Result<(), BackendError> {
        pass(&self.deprovision_gate).await;
        self.act("deprovision", instance_id).await?;
        self.remove(instance_id);
        Ok(())
    }

    async fn bind(&self, binding: &Binding<'_>) -> Result<Bound, BackendError> {
        let Binding { binding_id, .. } = *binding;
        self.act("bind", binding_id).await?;
        self.make(binding_id);
        let made = self.made.lock().unwrap()[binding_id];
        crate::backend::object(json!({"user": binding_id, "password": format!("secret-{made}")}))
            .map(Bound::from)
    }

    async fn unbind(&self, binding: &Unbinding<'_>) -> Result<(), BackendError> {
        let Unbinding {
            binding_id, app, ..
        } = *binding;
        let app = app.unwrap_or("(none)");
        self.act("unbind", &format!("{binding_id} of {app}"))
            .await?;
        self.remove(binding_id);
        Ok(())
    }

    async fn describe_instance(
        &self,
        _instance_id: &str,
        _limits: PlanLimits,
    ) -> Result<Vec<(String, String)>, BackendError> {
        Ok(Vec::new())
    }
}

const SERVICE: &str = "svc-fake";
const SMALL: &str = "plan-small";
const LARGE: &str = "plan-large";
const SLOW: &str = "plan-async";
/// A second service, whose deprovision takes its bindings along and whose plans are not
/// updateable.
const ALONG: &str = "svc-along";
const ALONG_PLAN: &str = "plan-along";
const ALONG_OTHER: &str = "plan-along-other";

/// The catalog: one bindable, plan-updateable service on the `mysql` backend kind (the
/// fake stands in for it) with a small, a large and an asynchronous plan, and one service
/// with two plans that lets deprovision take its bindings along and allows no plan change.
fn catalog(config: &Config, links: &sso::DashboardLinks) -> LocalCatalog {
    let services: Vec<ServiceConfig> = serde_yaml::from_str(&format!(
        "- {{id: {SERVICE}, name: fake, description: d, bindable: true, plan_updateable: true, backend: mysql,
            plans: [{{id: {SMALL}, name: small, description: d, max_storage_mb: 10, max_user_connections: 2}},
                    {{id: {LARGE}, name: large, description: d, max_storage_mb: 100, max_user_connections: 5}},
                    {{id: {SLOW}, name: slow, description: d, max_storage_mb: 10, max_user_connections: 2, asynchronous: true}}]}}
- {{id: {ALONG}, name: along, description: d, bindable: true, backend: mysql, refuse_deprovision_with_bindings: false,
    plans: [{{id: {ALONG_PLAN}, name: small, description: d, max_storage_mb: 10, max_user_connections: 2}},
            {{id: {ALONG_OTHER}, name: large, description: d, max_storage_mb: 100, max_user_connections: 5}}]}}"
    ))
    .unwrap();
    LocalCatalog::build(&services, &config.backends, links).unwrap()
}

/// A broker on `store` whose `mysql` backend is `fake`; operations time out after
/// `timeout`.
fn broker_on(store: Arc<dyn StateStore>, fake: Arc<Fake>, timeout: Duration) -> Broker {
    let mut backends = Backends::new();
    backends.insert(crate::config::BackendKind::Mysql, fake as Arc<dyn Backend>);
    broker_with(store, backends, Vec::new(), timeout)
}

/// A broker on `store` with these backends and upstreams (their catalogs not yet fetched).
fn broker_with(
    store: Arc<dyn StateStore>,
    backends: Backends,
    upstreams: Vec<upstreams::Upstream>,
    timeout: Duration,
) -> Broker {
    let config = Config::load(None).unwrap();
    let links = sso::DashboardLinks::new(&config.broker.external_url).unwrap();
    let catalog = catalog(&config, &links);
    let metrics = crate::metrics::Metrics::new();
    let federation = Arc::new(Federation::new(
        upstreams,
        catalog.published().clone(),
        store.clone(),
        Duration::from_secs(3600),
        Duration::from_secs(3600),
        metrics.clone(),
    ));
    let timing = Timing {
        operation_timeout: timeout,
        retry_after_secs: 1,
    };
    Broker::new(store, catalog, backends, links, timing, federation, metrics)
}

fn setup() -> (Broker, Arc<Fake>, Arc<dyn StateStore>) {
    let store: Arc<dyn StateStore> = Arc::new(EmbeddedStore::in_memory().unwrap());
    let fake = Arc::new(Fake::default());
    let broker = broker_on(store.clone(), fake.clone(), Duration::from_secs(5));
    (broker, fake, store)
}

fn ctx() -> CallContext {
    CallContext {
        api_version: upstreams::osb::ApiVersion::CURRENT,
        ..Default::default()
    }
}

fn provision_body(service: &str, plan: &str) -> upstreams::osb::ProvisionRequest {
    serde_json::from_value(json!({"service_id": service, "plan_id": plan,
        "organization_guid": "org", "space_guid": "space"}))
    .unwrap()
}

fn bind_body() -> upstreams::osb::BindRequest {
    serde_json::from_value(json!({"service_id": SERVICE, "plan_id": SMALL, "app_guid": "app"}))
        .unwrap()
}

/// The status a call answered, error or not.
fn status(answer: &Result<Reply, OsbError>) -> u16 {
    match answer {
        Ok(reply) => reply.status,
        Err(e) => e.status(),
    }
}

async fn provision(broker: &Broker, id: &str, plan: &str) -> Result<Reply, OsbError> {
    broker
        .provision(id, provision_body(SERVICE, plan), false, &ctx())
        .await
}

/// Instance `i1` on the small plan with binding `b1`.
async fn provision_and_bind(broker: &Broker) {
    assert_eq!(provision(broker, "i1", SMALL).await.unwrap().status, 201);
    let bound = broker.bind("i1", "b1", bind_body(), false, &ctx()).await;
    assert_eq!(bound.unwrap().status, 201);
}

/// Instance `i1` of the service that takes its bindings along, on its first plan.
async fn provision_along(broker: &Broker) {
    let body = provision_body(ALONG, ALONG_PLAN);
    let answer = broker.provision("i1", body, false, &ctx()).await;
    assert_eq!(answer.unwrap().status, 201);
}

async fn deprovision(broker: &Broker, id: &str) -> Result<Reply, OsbError> {
    let (service, plan) = (Some(SERVICE.into()), Some(SMALL.into()));
    broker.deprovision(id, service, plan, false, &ctx()).await
}

async fn instance(store: &Arc<dyn StateStore>, id: &str) -> Option<InstanceRecord> {
    records::load::<InstanceRecord>(&**store, id)
        .await
        .unwrap()
        .map(|s| s.record)
}

async fn binding(store: &Arc<dyn StateStore>, id: &str) -> Option<BindingRecord> {
    records::load::<BindingRecord>(&**store, id)
        .await
        .unwrap()
        .map(|s| s.record)
}

#[tokio::test]
async fn a_repeated_provision_answers_200_with_the_same_body_and_acts_once() {
    let (broker, fake, store) = setup();
    let first = provision(&broker, "i1", SMALL).await.unwrap();
    assert_eq!(first.status, 201);
    let again = provision(&broker, "i1", SMALL).await.unwrap();
    assert_eq!(again.status, 200);
    assert_eq!(body(&again), body(&first));
    assert_eq!(fake.calls("provision"), 1);
    let record = instance(&store, "i1").await.unwrap();
    assert!(record.provisioned);
    assert_eq!(record.operation.state, OpState::Succeeded);
}

#[tokio::test]
async fn a_provision_with_other_attributes_is_409_and_changes_nothing() {
    let (broker, fake, store) = setup();
    provision(&broker, "i1", SMALL).await.unwrap();
    let before = instance(&store, "i1").await.unwrap();
    let other = provision(&broker, "i1", LARGE).await;
    assert_eq!(status(&other), 409);
    let after = instance(&store, "i1").await.unwrap();
    assert_eq!(after.plan_id, SMALL);
    assert_eq!(
        serde_json::to_value(&after).unwrap(),
        serde_json::to_value(&before).unwrap()
    );
    assert_eq!(fake.calls("provision"), 1);
}

#[tokio::test]
async fn bad_requests_are_4xx_and_leave_no_record_and_no_backend_call() {
    let (broker, fake, store) = setup();
    let cases: Vec<(&str, Value)> = vec![
        (
            "i1",
            json!({"service_id": "nope", "plan_id": SMALL, "organization_guid": "o", "space_guid": "s"}),
        ),
        (
            "i1",
            json!({"service_id": SERVICE, "plan_id": "nope", "organization_guid": "o", "space_guid": "s"}),
        ),
        (
            "i1",
            json!({"service_id": SERVICE, "organization_guid": "o", "space_guid": "s"}),
        ),
        (
            "i1",
            json!({"plan_id": SMALL, "organization_guid": "o", "space_guid": "s"}),
        ),
        (
            "../etc",
            json!({"service_id": SERVICE, "plan_id": SMALL, "organization_guid": "o", "space_guid": "s"}),
        ),
        (
            "i1",
            json!({"service_id": SERVICE, "plan_id": SMALL, "organization_guid": "o", "space_guid": "s",
                      "parameters": {"undeclared": 1}}),
        ),
    ];
    for (id, body) in cases {
        let req = serde_json::from_value(body.clone()).unwrap();
        let answer = broker.provision(id, req, false, &ctx()).await;
        let code = status(&answer);
        assert!((400..500).contains(&code), "{body}: {code}");
        assert!(instance(&store, id).await.is_none(), "{body}: a record");
    }
    assert!(fake.calls.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_backend_failure_is_answered_undone_and_a_retry_succeeds() {
    let (broker, fake, store) = setup();
    *fake.fail_next.lock().unwrap() = Some(BackendError::Rejected("not now".into()));
    let failed = provision(&broker, "i1", SMALL).await;
    assert_eq!(status(&failed), 422);
    assert!(!fake.holds("i1"));
    assert!(
        instance(&store, "i1").await.is_none(),
        "a failed synchronous provision is undone"
    );
    let retried = provision(&broker, "i1", SMALL).await.unwrap();
    assert_eq!(retried.status, 201);
    assert!(fake.holds("i1"));
    assert!(instance(&store, "i1").await.unwrap().provisioned);
}

#[tokio::test]
async fn a_second_call_on_an_id_in_progress_is_422_or_409_and_the_backend_acts_once() {
    let (broker, fake, store) = setup();
    let gate = Arc::new(Semaphore::new(0));
    *fake.gate.lock().unwrap() = Some(gate.clone());
    let first = tokio::spawn({
        let broker = broker.clone();
        async move { provision(&broker, "i1", SMALL).await }
    });
    // The first call has claimed the id once its record is stored.
    while instance(&store, "i1").await.is_none() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let same = provision(&broker, "i1", SMALL).await;
    assert_eq!(status(&same), 422, "the same request while it runs");
    let other = provision(&broker, "i1", LARGE).await;
    assert_eq!(status(&other), 409, "another request for the id");
    gate.add_permits(1);
    assert_eq!(first.await.unwrap().unwrap().status, 201);
    assert_eq!(fake.calls("provision"), 1);
    assert_eq!(provision(&broker, "i1", SMALL).await.unwrap().status, 200);
}

#[tokio::test]
async fn many_concurrent_identical_provisions_make_one_instance() {
    let (broker, fake, _store) = setup();
    let calls: Vec<_> = (0..16)
        .map(|_| {
            let broker = broker.clone();
            tokio::spawn(async move { status(&provision(&broker, "i1", SMALL).await) })
        })
        .collect();
    let mut statuses = Vec::new();
    for call in calls {
        statuses.push(call.await.unwrap());
    }
    assert_eq!(
        statuses.iter().filter(|s| **s == 201).count(),
        1,
        "{statuses:?}"
    );
    assert!(
        statuses.iter().all(|s| matches!(s, 200 | 201 | 422)),
        "{statuses:?}"
    );
    assert_eq!(fake.calls("provision"), 1);
}

#[tokio::test]
async fn an_asynchronous_plan_answers_202_and_last_operation_follows_it_to_success() {
    let (broker, fake, _store) = setup();
    let refused = provision(&broker, "i1", SLOW).await;
    assert_eq!(status(&refused), 422, "async plans need accepts_incomplete");
    assert_eq!(fake.calls("provision"), 0);
    let gate = Arc::new(Semaphore::new(0));
    *fake.gate.lock().unwrap() = Some(gate.clone());
    let accepted = broker
        .provision("i1", provision_body(SERVICE, SLOW), true, &ctx())
        .await
        .unwrap();
    assert_eq!(accepted.status, 202);
    let operation = body(&accepted)["operation"].as_str().map(str::to_string);
    assert!(operation.is_some(), "{}", body(&accepted));
    let polled = broker
        .instance_last_operation("i1", operation.clone(), &ctx())
        .await
        .unwrap();
    assert_eq!(body(&polled)["state"], "in progress");
    assert!(polled.retry_after.is_some());
    gate.add_permits(1);
    let mut state = Value::Null;
    for _ in 0..200 {
        let polled = broker
            .instance_last_operation("i1", operation.clone(), &ctx())
            .await
            .unwrap();
        state = body(&polled)["state"].clone();
        if state != "in progress" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(state, "succeeded");
    assert!(fake.holds("i1"));
}

#[tokio::test]
async fn a_repeated_bind_answers_the_same_credentials_and_binds_once() {
    let (broker, fake, store) = setup();
    provision(&broker, "i1", SMALL).await.unwrap();
    let first = broker
        .bind("i1", "b1", bind_body(), false, &ctx())
        .await
        .unwrap();
    assert_eq!(first.status, 201);
    assert_eq!(body(&first)["credentials"]["password"], "secret-1");
    let again = broker
        .bind("i1", "b1", bind_body(), false, &ctx())
        .await
        .unwrap();
    assert_eq!(again.status, 200);
    assert_eq!(body(&again)["credentials"], body(&first)["credentials"]);
    assert_eq!(fake.calls("bind"), 1);
    assert!(binding(&store, "b1").await.unwrap().credentials.is_some());
}

#[tokio::test]
async fn a_bind_to_a_missing_instance_or_with_a_wrong_service_leaves_nothing() {
    let (broker, fake, store) = setup();
    let missing = broker.bind("nope", "b1", bind_body(), false, &ctx()).await;
    assert!((400..500).contains(&status(&missing)));
    provision(&broker, "i1", SMALL).await.unwrap();
    let wrong: upstreams::osb::BindRequest =
        serde_json::from_value(json!({"service_id": "other", "plan_id": SMALL})).unwrap();
    let answer = broker.bind("i1", "b1", wrong, false, &ctx()).await;
    assert!((400..500).contains(&status(&answer)));
    assert!(binding(&store, "b1").await.is_none());
    assert_eq!(fake.calls("bind"), 0);
}

#[tokio::test]
async fn unbind_removes_the_access_once_and_a_repeat_is_410() {
    let (broker, fake, store) = setup();
    provision_and_bind(&broker).await;
    let ids = || (Some(SERVICE.to_string()), Some(SMALL.to_string()));
    let (s, p) = ids();
    let gone = broker
        .unbind("i1", "b1", s, p, false, &ctx())
        .await
        .unwrap();
    assert_eq!(gone.status, 200);
    assert!(!fake.holds("b1"));
    assert!(binding(&store, "b1").await.is_none());
    let (s, p) = ids();
    let again = broker.unbind("i1", "b1", s, p, false, &ctx()).await;
    assert_eq!(status(&again), 410);
    // A delete the broker holds no record of still asks the backend to remove what may be
    // left (Cloud Controller's orphan mitigation); the backend finds nothing.
    assert_eq!(fake.calls("unbind"), 2);
    assert!(!fake.holds("b1"));
}

#[tokio::test]
async fn deprovision_with_bindings_is_refused_and_keeps_everything() {
    let (broker, fake, store) = setup();
    provision_and_bind(&broker).await;
    let refused = deprovision(&broker, "i1").await;
    assert!(
        (400..500).contains(&status(&refused)),
        "{}",
        status(&refused)
    );
    assert!(fake.holds("i1") && fake.holds("b1"));
    assert!(instance(&store, "i1").await.unwrap().provisioned);
    assert!(binding(&store, "b1").await.is_some());
    assert_eq!(fake.calls("deprovision"), 0);
}

#[tokio::test]
async fn a_deprovision_that_takes_bindings_along_unbinds_each_before_the_instance_goes() {
    let (broker, fake, store) = setup();
    provision_along(&broker).await;
    for b in ["b1", "b2"] {
        let bind: upstreams::osb::BindRequest = serde_json::from_value(
            json!({"service_id": ALONG, "plan_id": ALONG_PLAN, "app_guid": "app"}),
        )
        .unwrap();
        assert_eq!(
            broker
                .bind("i1", b, bind, false, &ctx())
                .await
                .unwrap()
                .status,
            201
        );
    }
    let (service, plan) = (Some(ALONG.into()), Some(ALONG_PLAN.into()));
    let gone = broker.deprovision("i1", service, plan, false, &ctx()).await;
    assert_eq!(gone.unwrap().status, 200);
    assert!(!fake.holds("b1") && !fake.holds("b2") && !fake.holds("i1"));
    let calls = fake.calls.lock().unwrap().clone();
    let last: Vec<_> = calls.iter().rev().take(3).rev().cloned().collect();
    assert_eq!(last[2], "deprovision i1", "{calls:?}");
    let mut unbound = last[..2].to_vec();
    unbound.sort();
    // Each with the app its record holds, as a log service needs to stop routing it.
    assert_eq!(
        unbound,
        ["unbind b1 of app", "unbind b2 of app"],
        "{calls:?}"
    );
    assert!(instance(&store, "i1").await.is_none());
}

#[tokio::test]
async fn deprovision_removes_the_instance_and_a_repeat_is_410() {
    let (broker, fake, store) = setup();
    provision(&broker, "i1", SMALL).await.unwrap();
    assert_eq!(deprovision(&broker, "i1").await.unwrap().status, 200);
    assert!(!fake.holds("i1"));
    assert!(instance(&store, "i1").await.is_none());
    assert_eq!(status(&deprovision(&broker, "i1").await), 410);
    assert_eq!(
        fake.calls("deprovision"),
        2,
        "the repeat is an orphan cleanup too"
    );
    // The id is free again.
    assert_eq!(provision(&broker, "i1", SMALL).await.unwrap().status, 201);
}

#[tokio::test]
async fn a_plan_change_hands_the_backend_both_plans_limits_and_records_the_new_plan() {
    let (broker, fake, store) = setup();
    provision(&broker, "i1", SMALL).await.unwrap();
    let update: upstreams::osb::UpdateRequest =
        serde_json::from_value(json!({"service_id": SERVICE, "plan_id": LARGE})).unwrap();
    let answer = broker.update("i1", update, false, &ctx()).await.unwrap();
    assert_eq!(answer.status, 200);
    assert_eq!(
        fake.calls.lock().unwrap().last().unwrap(),
        "update i1 10->100"
    );
    assert_eq!(instance(&store, "i1").await.unwrap().plan_id, LARGE);
    let fetched = broker.fetch_instance("i1", &ctx()).await.unwrap();
    assert_eq!(body(&fetched)["plan_id"], LARGE);
}

#[tokio::test]
async fn plan_changes_follow_the_catalog_and_a_refused_one_changes_nothing() {
    let (broker, fake, store) = setup();
    provision_along(&broker).await;
    let update = |plan: &str| -> upstreams::osb::UpdateRequest {
        serde_json::from_value(json!({"service_id": ALONG, "plan_id": plan, "app_guid": "a"}))
            .unwrap()
    };
    let not_updateable = broker
        .update("i1", update(ALONG_OTHER), false, &ctx())
        .await;
    assert_eq!(
        status(&not_updateable),
        422,
        "the service's plans are fixed"
    );
    let elsewhere = broker.update("i1", update(LARGE), false, &ctx()).await;
    assert_eq!(status(&elsewhere), 400, "a plan of another service");
    assert_eq!(
        fake.calls("update"),
        0,
        "a refused change reaches no backend"
    );
    assert_eq!(instance(&store, "i1").await.unwrap().plan_id, ALONG_PLAN);
    let same = broker.update("i1", update(ALONG_PLAN), false, &ctx()).await;
    assert_eq!(status(&same), 200, "other fields on the same plan are fine");
}

#[tokio::test]
async fn a_failed_plan_change_keeps_the_old_plan() {
    let (broker, fake, store) = setup();
    provision(&broker, "i1", SMALL).await.unwrap();
    *fake.fail_next.lock().unwrap() = Some(BackendError::Rejected("cannot".into()));
    let update: upstreams::osb::UpdateRequest =
        serde_json::from_value(json!({"service_id": SERVICE, "plan_id": LARGE})).unwrap();
    let answer = broker.update("i1", update, false, &ctx()).await;
    assert_eq!(status(&answer), 422);
    let record = instance(&store, "i1").await.unwrap();
    assert_eq!(record.plan_id, SMALL);
    assert!(record.provisioned);
}

#[tokio::test]
async fn an_operation_past_its_timeout_is_503_leaves_no_record_and_the_orphan_delete_cleans_up() {
    let store: Arc<dyn StateStore> = Arc::new(EmbeddedStore::in_memory().unwrap());
    let fake = Arc::new(Fake::default());
    let broker = broker_on(store.clone(), fake.clone(), Duration::from_millis(200));
    fake.stall.store(true, Ordering::SeqCst);
    let timed_out = provision(&broker, "i1", SMALL).await;
    assert_eq!(status(&timed_out), 503);
    assert!(
        instance(&store, "i1").await.is_none(),
        "a synchronous failure is undone"
    );
    // Cloud Controller's orphan mitigation: a DELETE of the id the broker does not hold
    // still asks the backend to remove whatever the attempt may have made.
    let orphan = deprovision(&broker, "i1").await;
    assert_eq!(status(&orphan), 410);
    assert_eq!(fake.calls("deprovision"), 1);
    let retried = provision(&broker, "i1", SMALL).await.unwrap();
    assert_eq!(retried.status, 201);
    assert!(fake.holds("i1"));
}

#[tokio::test]
async fn a_provision_while_an_orphan_delete_cleans_up_waits_and_the_cleanup_spares_it() {
    let (broker, fake, store) = setup();
    let gate = Arc::new(Semaphore::new(0));
    *fake.deprovision_gate.lock().unwrap() = Some(gate.clone());
    // Cloud Controller's orphan DELETE for an id never recorded, held in the backend.
    let orphan = tokio::spawn({
        let broker = broker.clone();
        async move { status(&deprovision(&broker, "i1").await) }
    });
    for _ in 0..100 {
        if instance(&store, "i1").await.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let meanwhile = provision(&broker, "i1", SMALL).await;
    assert_eq!(status(&meanwhile), 422, "the cleanup holds the id");
    gate.add_permits(1);
    assert_eq!(orphan.await.unwrap(), 410);
    assert!(instance(&store, "i1").await.is_none(), "the claim is gone");
    assert_eq!(provision(&broker, "i1", SMALL).await.unwrap().status, 201);
    assert!(
        fake.holds("i1"),
        "no cleanup removed what the provision made"
    );
}

#[tokio::test]
async fn a_crash_between_claim_and_outcome_is_taken_over_by_another_process() {
    let store: Arc<dyn StateStore> = Arc::new(EmbeddedStore::in_memory().unwrap());
    let timeout = Duration::from_millis(200);
    let first_fake = Arc::new(Fake::default());
    let first = broker_on(store.clone(), first_fake.clone(), timeout);
    first_fake.stall.store(true, Ordering::SeqCst);
    // The first process claims the id, then dies before its outcome is recorded.
    let call = tokio::spawn(async move { provision(&first, "i1", SMALL).await });
    while instance(&store, "i1").await.is_none() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    call.abort();
    let _ = call.await;
    let claimed = instance(&store, "i1").await.unwrap();
    assert_eq!(claimed.operation.state, OpState::InProgress);

    // Another process on the same store: the claim holds until its lease runs out.
    let fake = Arc::new(Fake::default());
    let second = broker_on(store.clone(), fake.clone(), timeout);
    assert_eq!(status(&provision(&second, "i1", SMALL).await), 422);
    assert_eq!(fake.calls("provision"), 0);
    let lease = timeout + Duration::from_secs(crate::backend::LINGER_SECS);
    tokio::time::sleep(lease + Duration::from_millis(100)).await;
    let taken = provision(&second, "i1", SMALL).await.unwrap();
    assert_eq!(taken.status, 201);
    // The takeover cleaned up whatever the first attempt may have made, then made it.
    let calls = fake.calls.lock().unwrap().clone();
    assert_eq!(calls, vec!["deprovision i1", "provision i1"], "{calls:?}");
    assert!(instance(&store, "i1").await.unwrap().provisioned);
}

/// A store that counts the writes made through it, per table.
struct Counting {
    inner: EmbeddedStore,
    writes: Mutex<Vec<(Table, &'static str)>>,
}

impl Counting {
    fn new() -> Arc<Counting> {
        Arc::new(Counting {
            inner: EmbeddedStore::in_memory().unwrap(),
            writes: Mutex::default(),
        })
    }

    /// The writes to `table` since the last call, by kind.
    fn take(&self, table: Table) -> Vec<&'static str> {
        let mut writes = self.writes.lock().unwrap();
        let (taken, kept) = writes.drain(..).partition(|(t, _)| *t == table);
        *writes = kept;
        taken.into_iter().map(|(_, kind)| kind).collect()
    }

    fn wrote(&self, table: Table, kind: &'static str) {
        self.writes.lock().unwrap().push((table, kind));
    }
}

#[async_trait]
impl StateStore for Counting {
    fn describe(&self) -> String {
        self.inner.describe()
    }

    async fn check(&self) -> Result<(), StoreError> {
        self.inner.check().await
    }

    async fn get(&self, table: Table, id: &str) -> Result<Option<Versioned>, StoreError> {
        self.inner.get(table, id).await
    }

    async fn insert(
        &self,
        table: Table,
        id: &str,
        link: Link<'_>,
        doc: &[u8],
    ) -> Result<Insert, StoreError> {
        self.wrote(table, "insert");
        self.inner.insert(table, id, link, doc).await
    }

    async fn replace(
        &self,
        table: Table,
        id: &str,
        version: u64,
        doc: &[u8],
    ) -> Result<bool, StoreError> {
        self.wrote(table, "replace");
        self.inner.replace(table, id, version, doc).await
    }

    async fn remove(&self, table: Table, id: &str, version: u64) -> Result<bool, StoreError> {
        self.wrote(table, "remove");
        self.inner.remove(table, id, version).await
    }

    async fn bindings_of(&self, instance_id: &str) -> Result<Vec<(String, Versioned)>, StoreError> {
        self.inner.bindings_of(instance_id).await
    }

    async fn page(
        &self,
        group: &str,
        after: &str,
        limit: usize,
    ) -> Result<Vec<(String, Versioned)>, StoreError> {
        self.inner.page(group, after, limit).await
    }
}

/// An upstream broker in this process, on a port of its own: one service with one plan.
/// Provisions answer `status` (201 unless set) and are counted.
struct Upstream {
    base: String,
    status: Arc<std::sync::atomic::AtomicU16>,
    /// What the upstream answers a provision with.
    body: Arc<Mutex<Value>>,
    provisions: Arc<std::sync::atomic::AtomicUsize>,
}

async fn upstream() -> Upstream {
    use axum::routing::{get, put};
    use std::sync::atomic::{AtomicU16, AtomicUsize};
    let status = Arc::new(AtomicU16::new(201));
    let provisions = Arc::new(AtomicUsize::new(0));
    let body = Arc::new(Mutex::new(json!({})));
    let (answer, counted, said) = (status.clone(), provisions.clone(), body.clone());
    let app = axum::Router::new()
        .route(
            "/v2/catalog",
            get(|| async {
                axum::Json(json!({"services": [{"id": "u-svc", "name": "remote", "description": "d",
                    "bindable": true, "plans": [{"id": "u-plan", "name": "p", "description": "d"}]}]}))
            }),
        )
        .route(
            "/v2/service_instances/{id}",
            put(move || {
                let (answer, counted) = (answer.clone(), counted.clone());
                let said = said.lock().unwrap().clone();
                async move {
                    counted.fetch_add(1, Ordering::SeqCst);
                    let code = axum::http::StatusCode::from_u16(answer.load(Ordering::SeqCst));
                    (code.unwrap(), axum::Json(said))
                }
            })
            .delete(|| async { axum::Json(json!({})) }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    Upstream {
        base,
        status,
        body,
        provisions,
    }
}

/// A broker federating `upstream`, over a write-counting store; the forwarded service's id
/// and plan id as the merged catalog names them.
async fn forwarding(upstream: &Upstream) -> (Broker, Arc<Counting>, String, String) {
    let store = Counting::new();
    let settings: upstreams::UpstreamSettings =
        serde_json::from_value(json!({"alias": "up", "url": upstream.base})).unwrap();
    let client = upstreams::Upstream::new(settings).unwrap();
    let broker = broker_with(
        store.clone(),
        Backends::new(),
        vec![client],
        Duration::from_secs(5),
    );
    broker.federation().refresh().await;
    let snapshot = broker.federation().snapshot();
    let (service_id, route) = snapshot
        .merged
        .routes
        .iter()
        .find(|(_, r)| r.alias == "up")
        .expect("the upstream's service is routed");
    let plan_id = route.plans.keys().next().unwrap().clone();
    let service_id = service_id.clone();
    store.take(Table::Catalogs);
    (broker, store, service_id, plan_id)
}

#[tokio::test]
async fn a_forwarded_provision_writes_once_its_outcome_and_a_local_one_claims_first() {
    let up = upstream().await;
    let (broker, store, service, plan) = forwarding(&up).await;
    let answer = broker
        .provision("f1", provision_body(&service, &plan), false, &ctx())
        .await
        .unwrap();
    assert_eq!(answer.status, 201);
    assert_eq!(store.take(Table::Instances), vec!["insert"]);
    let record = records::load::<InstanceRecord>(&*store, "f1")
        .await
        .unwrap()
        .unwrap()
        .record;
    assert!(record.provisioned && record.upstream.is_some());
    // A repeat is answered from the record, and the upstream is not called again.
    let again = broker
        .provision("f1", provision_body(&service, &plan), false, &ctx())
        .await
        .unwrap();
    assert_eq!(again.status, 200);
    assert_eq!(up.provisions.load(Ordering::SeqCst), 1);
    assert!(store.take(Table::Instances).is_empty());
    // A forwarded delete's one write is the removal.
    let gone = broker
        .deprovision(
            "f1",
            Some(service.clone()),
            Some(plan.clone()),
            false,
            &ctx(),
        )
        .await
        .unwrap();
    assert_eq!(gone.status, 200);
    assert_eq!(store.take(Table::Instances), vec!["remove"]);
}

#[tokio::test]
async fn a_provision_the_upstream_refuses_records_nothing() {
    let up = upstream().await;
    let (broker, store, service, plan) = forwarding(&up).await;
    for code in [409u16, 422, 500] {
        up.status.store(code, Ordering::SeqCst);
        let id = format!("f{code}");
        let answer = broker
            .provision(&id, provision_body(&service, &plan), false, &ctx())
            .await;
        assert!(status(&answer) >= 400, "{code}: {}", status(&answer));
        let record = records::load::<InstanceRecord>(&*store, &id).await.unwrap();
        assert!(record.is_none(), "{code}: a record");
    }
    assert!(store.take(Table::Instances).is_empty());
}

#[tokio::test]
async fn a_forwarded_answer_is_read_into_its_type_and_one_that_does_not_read_is_a_502() {
    let up = upstream().await;
    let (broker, store, service, plan) = forwarding(&up).await;
    // Known fields typed, a peer's own kept, and the dashboard recorded.
    *up.body.lock().unwrap() = json!({"dashboard_url": "https://up/d/1", "x-peer": {"a": 1}});
    let answer = broker
        .provision("t1", provision_body(&service, &plan), false, &ctx())
        .await
        .unwrap();
    assert_eq!(answer.status, 201);
    assert_eq!(
        body(&answer),
        json!({"dashboard_url": "https://up/d/1", "x-peer": {"a": 1}})
    );
    let record = records::load::<InstanceRecord>(&*store, "t1")
        .await
        .unwrap()
        .unwrap()
        .record;
    assert_eq!(record.dashboard_url.as_deref(), Some("https://up/d/1"));
    // A field of the wrong type is not OSB: 502, and nothing is recorded.
    *up.body.lock().unwrap() = json!({"dashboard_url": 5});
    let answer = broker
        .provision("t2", provision_body(&service, &plan), false, &ctx())
        .await;
    assert_eq!(status(&answer), 502);
    assert!(records::load::<InstanceRecord>(&*store, "t2")
        .await
        .unwrap()
        .is_none());
}

/// Property tests: random sequences and concurrent batches of calls on a few ids, with
/// backend failures injected between them. Whatever the interleaving, once the calls have
/// answered the store and the backend agree: an instance is recorded as provisioned exactly
/// when the backend holds it, a binding holds credentials exactly when the backend holds
/// it, no binding outlives its instance's record, and no answer is a 500.
mod interleavings {
    use proptest::prelude::*;

    use super::*;

    const INSTANCES: [&str; 2] = ["i0", "i1"];
    const BINDINGS: [&str; 3] = ["b0", "b1", "b2"];

    #[derive(Debug, Clone)]
    enum Call {
        /// Instance, on the large plan or the small one.
        Provision(usize, bool),
        Update(usize, bool),
        Deprovision(usize),
        /// Instance, binding.
        Bind(usize, usize),
        Unbind(usize, usize),
        /// The backend's next call fails: unreachable (503) or refused (422).
        FailNext(bool),
    }

    fn call() -> impl Strategy<Value = Call> {
        let instance = 0..INSTANCES.len();
        let binding = 0..BINDINGS.len();
        prop_oneof![
            (instance.clone(), any::<bool>()).prop_map(|(i, l)| Call::Provision(i, l)),
            (instance.clone(), any::<bool>()).prop_map(|(i, l)| Call::Update(i, l)),
            instance.clone().prop_map(Call::Deprovision),
            (instance.clone(), binding.clone()).prop_map(|(i, b)| Call::Bind(i, b)),
            (instance, binding).prop_map(|(i, b)| Call::Unbind(i, b)),
            any::<bool>().prop_map(Call::FailNext),
        ]
    }

    fn plan(large: bool) -> &'static str {
        if large {
            LARGE
        } else {
            SMALL
        }
    }

    /// Plays one call; the status it answered (none for an injected failure).
    async fn play(broker: &Broker, fake: &Fake, call: &Call) -> Option<u16> {
        let ctx = ctx();
        let (service, small) = (|| Some(SERVICE.to_string()), || Some(SMALL.to_string()));
        let answer = match *call {
            Call::Provision(i, large) => {
                let body = provision_body(SERVICE, plan(large));
                broker.provision(INSTANCES[i], body, false, &ctx).await
            }
            Call::Update(i, large) => {
                let req = json!({"service_id": SERVICE, "plan_id": plan(large)});
                let req = serde_json::from_value(req).unwrap();
                broker.update(INSTANCES[i], req, false, &ctx).await
            }
            Call::Deprovision(i) => {
                let id = INSTANCES[i];
                broker
                    .deprovision(id, service(), small(), false, &ctx)
                    .await
            }
            Call::Bind(i, b) => {
                let (iid, bid) = (INSTANCES[i], BINDINGS[b]);
                broker.bind(iid, bid, bind_body(), false, &ctx).await
            }
            Call::Unbind(i, b) => {
                let (iid, bid) = (INSTANCES[i], BINDINGS[b]);
                broker
                    .unbind(iid, bid, service(), small(), false, &ctx)
                    .await
            }
            Call::FailNext(unreachable) => {
                *fake.fail_next.lock().unwrap() = Some(if unreachable {
                    BackendError::unavailable("the fake is down", "injected")
                } else {
                    BackendError::Rejected("the fake refuses".into())
                });
                return None;
            }
        };
        Some(status(&answer))
    }

    /// Whether the store and the backend agree, and if not, where.
    async fn agree(store: &Arc<dyn StateStore>, fake: &Fake) -> Result<(), String> {
        for id in INSTANCES {
            let recorded = instance(store, id).await.is_some_and(|r| r.provisioned);
            if recorded != fake.holds(id) {
                return Err(format!(
                    "{id}: recorded {recorded}, held {}",
                    fake.holds(id)
                ));
            }
        }
        for id in BINDINGS {
            let record = binding(store, id).await;
            let recorded = record.as_ref().is_some_and(|r| r.credentials.is_some());
            if recorded != fake.holds(id) {
                return Err(format!(
                    "{id}: recorded {recorded}, held {}",
                    fake.holds(id)
                ));
            }
            if let Some(record) = record {
                if instance(store, &record.instance_id).await.is_none() {
                    return Err(format!("{id} outlived {}", record.instance_id));
                }
            }
        }
        Ok(())
    }

    /// Plays each batch's calls at once, checking after each batch has answered.
    async fn run(batches: Vec<Vec<Call>>) -> Result<(), String> {
        let (broker, fake, store) = setup();
        for batch in batches {
            let calls: Vec<_> = batch
                .into_iter()
                .map(|call| {
                    let (broker, fake) = (broker.clone(), fake.clone());
                    tokio::spawn(async move { (play(&broker, &fake, &call).await, call) })
                })
                .collect();
            for call in calls {
                let (answered, call) = call.await.unwrap();
                if let Some(s) = answered.filter(|s| !matches!(s, 200 | 201 | 400..=422 | 503)) {
                    return Err(format!("{call:?} answered {s}"));
                }
            }
            agree(&store, &fake).await?;
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn the_store_and_the_backend_agree_after_any_interleaving(
            batches in prop::collection::vec(prop::collection::vec(call(), 1..4), 1..12)
        ) {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            let outcome = runtime.block_on(run(batches));
            prop_assert!(outcome.is_ok(), "{}", outcome.unwrap_err());
        }
    }
}
