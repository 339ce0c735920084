//! What was acknowledged stays acknowledged: across kill -9, across broker processes
//! sharing the MySQL store, and under a crowd of identical requests.

use brokerage::backend::mysql::database_name;
use reqwest::Method;

use crate::helpers::*;

#[tokio::test]
async fn a_record_acknowledged_with_201_survives_kill_9() {
    let port = free_port();
    let config = TestConfig::new().with_port(port);
    let file = config.write();
    let log = config.dir.path().join("broker.log");
    let mut broker = BrokerProcess::start(&file, port, &log).await;
    let client = broker.client();
    let id = unique("crash");
    let b = format!("{id}-b");

    client.provision(&id, SMALL).await.expect(201);
    let bound = client.bind(&id, &b, SMALL).await;
    bound.expect(201);
    broker.kill9(); // right after the 201, no chance to flush anything
    drop(broker);

    let broker = BrokerProcess::start(&file, port, &log).await;
    let client = broker.client();
    let fetched = client
        .call(Method::GET, &format!("/v2/service_instances/{id}"), None)
        .await;
    fetched.expect(200);
    assert_eq!(fetched.body["plan_id"], SMALL);
    let binding = client
        .call(
            Method::GET,
            &format!("/v2/service_instances/{id}/service_bindings/{b}"),
            None,
        )
        .await;
    binding.expect(200);
    assert_eq!(binding.body["credentials"], bound.body["credentials"]);
    connect_as(&binding.body["credentials"])
        .await
        .expect("the credentials still work");

    client.unbind(&id, &b, SMALL).await.expect(200);
    client.deprovision(&id, SERVICE, SMALL).await.expect(200);
}

#[tokio::test]
async fn two_broker_processes_share_the_mysql_store() {
    let store = StoreKind::fresh_mysql();
    let (p1, p2) = (free_port(), free_port());
    let c1 = TestConfig::new().with_store(store.clone()).with_port(p1);
    let c2 = TestConfig::new().with_store(store).with_port(p2);
    let (f1, f2) = (c1.write(), c2.write());
    let one = BrokerProcess::start(&f1, p1, &c1.dir.path().join("one.log")).await;
    let two = BrokerProcess::start(&f2, p2, &c2.dir.path().join("two.log")).await;
    let (a, b) = (one.client(), two.client());
    let id = unique("shared");
    let bid = format!("{id}-b");

    a.provision(&id, LARGE).await.expect(201);
    // The second process knows the instance: a repeat there is an idempotent 200.
    b.provision(&id, LARGE).await.expect(200);
    let bound = b.bind(&id, &bid, LARGE).await;
    bound.expect(201);
    let fetched = a
        .call(
            Method::GET,
            &format!("/v2/service_instances/{id}/service_bindings/{bid}"),
            None,
        )
        .await;
    fetched.expect(200);
    assert_eq!(fetched.body["credentials"], bound.body["credentials"]);
    // The first refuses deprovision while the binding made through the second exists.
    a.deprovision(&id, SERVICE, LARGE)
        .await
        .expect_error(422, None);
    b.unbind(&id, &bid, LARGE).await.expect(200);
    a.deprovision(&id, SERVICE, LARGE).await.expect(200);
    assert!(!database_exists(&database_name(&id)).await);
    b.call(Method::GET, &format!("/v2/service_instances/{id}"), None)
        .await
        .expect_error(404, None);
}

/// 50 identical provisions at once, split over two brokers sharing the MySQL store.
#[tokio::test]
async fn fifty_concurrent_identical_provisions_create_one_database() {
    let store = StoreKind::fresh_mysql();
    let one = spawn_with(TestConfig::new().with_store(store.clone())).await;
    let two = spawn_with(TestConfig::new().with_store(store)).await;
    let id = unique("crowd");
    let requests: Vec<_> = (0..50)
        .map(|i| {
            let app = if i % 2 == 0 { &one } else { &two };
            let req = app
                .request(Method::PUT, &format!("/v2/service_instances/{id}"))
                .json(&provision_body(SERVICE, SMALL));
            tokio::spawn(async move { Answer::from(req.send().await.unwrap()).await })
        })
        .collect();
    let mut created = 0;
    for r in requests {
        let answer = r.await.unwrap();
        match answer.status.as_u16() {
            201 => created += 1,
            200 => {}
            422 => assert_eq!(answer.body["error"], "ConcurrencyError", "{}", answer.raw),
            _ => panic!("unexpected answer to a concurrent twin: {}", answer.raw),
        }
    }
    assert_eq!(created, 1, "exactly one request created the instance");
    assert!(database_exists(&database_name(&id)).await);
    one.provision(&id, SMALL).await.expect(200);
    two.deprovision(&id, SERVICE, SMALL).await.expect(200);
    assert!(!database_exists(&database_name(&id)).await);
}

/// SIGTERM-style shutdown waits for background operations to record their end.
#[tokio::test]
async fn graceful_shutdown_lets_background_operations_finish() {
    let app = spawn_app().await;
    let id = unique("drain");
    let accepted = app
        .provision_with(&id, provision_body(SERVICE, ASYNC), true)
        .await;
    accepted.expect(202);
    let config = app.stop().await;
    let app = spawn_with(config).await;
    let last = app.last_operation(&id, Some(&accepted.operation())).await;
    last.expect(200);
    assert_eq!(last.body["state"], "succeeded", "{}", last.raw);
    assert!(database_exists(&database_name(&id)).await);
    app.deprovision_query(
        &id,
        &format!("service_id={SERVICE}&plan_id={ASYNC}&accepts_incomplete=true"),
    )
    .await
    .expect(202);
}
