//! The Redis service against a real Redis (Debian's package) that `scripts/test` starts on
//! loopback: each binding is an ACL user confined to its instance's key prefix.

use std::time::Duration;

use brokerage::backend::redis::key_prefix;
use redis::aio::MultiplexedConnection;
use serde_json::Value;

use crate::helpers::*;

const REDIS_SERVICE: &str = "svc-redis-test";
const REDIS_PLAN: &str = "plan-redis";

fn redis_url() -> String {
    std::env::var("BKG_TEST_REDIS_URL").expect(
        "BKG_TEST_REDIS_URL is not set: run the suite with ./scripts/test, which starts Redis",
    )
}

fn with_redis(url: &str) -> TestConfig {
    TestConfig::new().with_backend(
        format!("redis: {{url: \"{url}\", connect_timeout_secs: 3}}"),
        vec![format!(
            "{{id: {REDIS_SERVICE}, name: redis-test, backend: redis, description: Redis for tests, \
             bindable: true, instances_retrievable: true, bindings_retrievable: true, \
             plans: [{{id: {REDIS_PLAN}, name: shared, description: a key prefix, max_storage_mb: 10}}]}}"
        )],
    )
}

/// A connection from a binding's `uri`, as an app opens it.
async fn connect(creds: &Value) -> redis::RedisResult<MultiplexedConnection> {
    redis::Client::open(creds["uri"].as_str().unwrap())?
        .get_multiplexed_async_connection()
        .await
}

async fn run(con: &mut MultiplexedConnection, args: &[&str]) -> redis::RedisResult<redis::Value> {
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query_async(con).await
}

fn refused(result: redis::RedisResult<redis::Value>) -> bool {
    match result {
        Err(e) => {
            let said = format!("{e:?} {e}");
            assert!(said.contains("NOPERM") || said.contains("NoPerm"), "{said}");
            true
        }
        Ok(v) => panic!("allowed: {v:?}"),
    }
}

#[tokio::test]
async fn a_binding_reaches_only_its_own_keys_and_loses_its_login_on_unbind() {
    let app = spawn_with(with_redis(&redis_url())).await;
    let (a, b) = (unique("redis-a"), unique("redis-b"));
    let creds_a = app.provision_and_bind(&a, REDIS_SERVICE, REDIS_PLAN).await;
    let creds_b = app.provision_and_bind(&b, REDIS_SERVICE, REDIS_PLAN).await;
    for key in ["host", "port", "username", "password", "uri", "key_prefix"] {
        assert!(
            !creds_a[key].is_null(),
            "credentials carry {key}: {creds_a}"
        );
    }
    let (pa, pb) = (key_prefix(&a), key_prefix(&b));
    assert_eq!(creds_a["key_prefix"], pa);

    let mut con = connect(&creds_a).await.expect("the binding connects");
    run(&mut con, &["SET", &format!("{pa}greeting"), "hello"])
        .await
        .unwrap();
    let got = run(&mut con, &["GET", &format!("{pa}greeting")])
        .await
        .unwrap();
    assert_eq!(got, redis::Value::BulkString(b"hello".to_vec()));
    // Another instance's keys, unprefixed keys and dangerous commands are refused.
    assert!(refused(
        run(&mut con, &["SET", &format!("{pb}x"), "1"]).await
    ));
    assert!(refused(run(&mut con, &["GET", "unprefixed"]).await));
    assert!(refused(run(&mut con, &["FLUSHALL"]).await));
    assert!(refused(run(&mut con, &["CONFIG", "GET", "*"]).await));

    let mut con_b = connect(&creds_b).await.unwrap();
    assert!(refused(
        run(&mut con_b, &["GET", &format!("{pa}greeting")]).await
    ));

    // Unbind deletes the user: its connection is closed and it cannot log in again.
    app.unbind_from(&a, &format!("{a}-b"), REDIS_SERVICE, REDIS_PLAN)
        .await
        .expect(200);
    assert!(run(&mut con, &["GET", &format!("{pa}greeting")])
        .await
        .is_err());
    assert!(connect(&creds_a).await.is_err(), "the login is gone");
    run(&mut con_b, &["SET", &format!("{pb}still"), "works"])
        .await
        .unwrap();

    // Deprovision deletes the instance's keys and nothing else.
    app.deprovision(&a, REDIS_SERVICE, REDIS_PLAN)
        .await
        .expect(200);
    let mut admin = redis::Client::open(redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let left = run(&mut admin, &["EXISTS", &format!("{pa}greeting")])
        .await
        .unwrap();
    assert_eq!(left, redis::Value::Int(0));
    let kept = run(&mut admin, &["EXISTS", &format!("{pb}still")])
        .await
        .unwrap();
    assert_eq!(kept, redis::Value::Int(1));
    app.unbind_from(&b, &format!("{b}-b"), REDIS_SERVICE, REDIS_PLAN)
        .await
        .expect(200);
    app.deprovision(&b, REDIS_SERVICE, REDIS_PLAN)
        .await
        .expect(200);
}

#[tokio::test]
async fn a_tenant_cannot_see_or_change_what_other_tenants_share() {
    let app = spawn_with(with_redis(&redis_url())).await;
    let (mine, theirs) = (unique("redis-mine"), unique("redis-theirs"));
    let creds = app
        .provision_and_bind(&mine, REDIS_SERVICE, REDIS_PLAN)
        .await;
    let other = app
        .provision_and_bind(&theirs, REDIS_SERVICE, REDIS_PLAN)
        .await;
    let mut them = connect(&other).await.unwrap();
    let their_key = format!("{}secret", key_prefix(&theirs));
    run(&mut them, &["SET", &their_key, "v"]).await.unwrap();
    let their_channel = format!("{}news", key_prefix(&theirs));
    let mut con = connect(&creds).await.unwrap();
    let own = format!("{}k", key_prefix(&mine));
    // What an app needs works: its keys, a transaction, a script on its keys, its channels.
    run(&mut con, &["SET", &own, "1"]).await.unwrap();
    run(&mut con, &["INCR", &own]).await.unwrap();
    run(&mut con, &["HSET", &format!("{own}h"), "f", "v"])
        .await
        .unwrap();
    run(
        &mut con,
        &["EVAL", "return redis.call('GET', KEYS[1])", "1", &own],
    )
    .await
    .unwrap();
    run(
        &mut con,
        &["PUBLISH", &format!("{}c", key_prefix(&mine)), "hi"],
    )
    .await
    .unwrap();
    run(&mut con, &["CLIENT", "SETNAME", "app"]).await.unwrap();
    // What would reveal or change what others have is refused.
    for command in [
        &["SCAN", "0"][..],
        &["KEYS", "*"],
        &["RANDOMKEY"],
        &["DBSIZE"],
        &["PUBSUB", "CHANNELS"],
        &["PUBSUB", "NUMSUB", &their_channel],
        &["FUNCTION", "FLUSH"],
        &["FUNCTION", "LIST"],
        &["SCRIPT", "FLUSH"],
        &["FLUSHDB"],
        &["FLUSHALL"],
        &["CONFIG", "GET", "maxmemory"],
        &["CLIENT", "LIST"],
        &["CLIENT", "KILL", "ID", "1"],
        &["INFO", "keyspace"],
        &["MONITOR"],
        &["SELECT", "1"],
        &["GET", &their_key],
        &["SUBSCRIBE", &their_channel],
        &["ACL", "LIST"],
    ] {
        assert!(refused(run(&mut con, command).await), "{command:?}");
    }
    assert!(run(&mut con, &["DEBUG", "SLEEP", "0"]).await.is_err());
    let still: redis::Value = run(&mut them, &["GET", &their_key]).await.unwrap();
    assert_eq!(still, redis::Value::BulkString(b"v".to_vec()));
    for id in [&mine, &theirs] {
        app.unbind_from(id, &format!("{id}-b"), REDIS_SERVICE, REDIS_PLAN)
            .await
            .expect(200);
        app.deprovision(id, REDIS_SERVICE, REDIS_PLAN)
            .await
            .expect(200);
    }
}

#[tokio::test]
async fn past_its_memory_quota_a_tenant_may_read_and_delete_but_not_grow() {
    let app = spawn_with(with_redis(&redis_url())).await;
    let id = unique("redis-quota");
    let creds = app.provision_and_bind(&id, REDIS_SERVICE, REDIS_PLAN).await;
    let mut con = connect(&creds).await.unwrap();
    let prefix = key_prefix(&id);
    // The plan allows 10 MB: write 11 MB.
    let blob = "x".repeat(1024 * 1024);
    for i in 0..11 {
        run(&mut con, &["SET", &format!("{prefix}blob{i}"), &blob])
            .await
            .unwrap();
    }
    let over = tokio::time::Instant::now();
    loop {
        match run(&mut con, &["SET", &format!("{prefix}more"), "1"]).await {
            Err(e) if format!("{e:?} {e}").to_uppercase().contains("NOPERM") => break,
            _ => {
                assert!(over.elapsed() < Duration::from_secs(20), "never revoked");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    // Still readable, and deletable: delete back under the quota (each 1 MB value takes
    // about 1.3 MB of the server's memory).
    run(&mut con, &["GET", &format!("{prefix}blob0")])
        .await
        .unwrap();
    for i in 0..6 {
        run(&mut con, &["DEL", &format!("{prefix}blob{i}")])
            .await
            .unwrap();
    }
    let under = tokio::time::Instant::now();
    while run(&mut con, &["SET", &format!("{prefix}more"), "1"])
        .await
        .is_err()
    {
        assert!(under.elapsed() < Duration::from_secs(20), "never restored");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    app.unbind_from(&id, &format!("{id}-b"), REDIS_SERVICE, REDIS_PLAN)
        .await
        .expect(200);
    app.deprovision(&id, REDIS_SERVICE, REDIS_PLAN)
        .await
        .expect(200);
}

#[tokio::test]
async fn the_admin_connection_and_bindings_can_use_tls_checked_against_a_ca() {
    let env = |k: &str| std::env::var(k).unwrap_or_else(|_| panic!("{k}: run ./scripts/test"));
    let url = env("BKG_TEST_REDIS_TLS_URL");
    let tls = |ca: &str| {
        TestConfig::new().with_backend(
            format!("redis: {{url: \"{url}\", connect_timeout_secs: 3, ca_certificate: \"{ca}\"}}"),
            vec![format!(
                "{{id: {REDIS_SERVICE}, name: redis-test, backend: redis, description: TLS, \
                 bindable: true, plans: [{{id: {REDIS_PLAN}, name: shared, description: d, max_storage_mb: 10}}]}}"
            )],
        )
    };
    let app = spawn_with(tls(&env("BKG_TEST_REDIS_CA"))).await;
    let id = unique("redis-tls");
    let creds = app.provision_and_bind(&id, REDIS_SERVICE, REDIS_PLAN).await;
    assert!(
        creds["uri"].as_str().unwrap().starts_with("rediss://"),
        "{creds}"
    );
    assert_eq!(creds["tls"], true);
    let client = redis::Client::build_with_tls(
        creds["uri"].as_str().unwrap(),
        redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(
                creds["ca_certificate"]
                    .as_str()
                    .unwrap()
                    .as_bytes()
                    .to_vec(),
            ),
        },
    )
    .unwrap();
    let mut con = client.get_multiplexed_async_connection().await.unwrap();
    let key = format!("{}k", key_prefix(&id));
    run(&mut con, &["SET", &key, "over tls"]).await.unwrap();
    app.unbind_from(&id, &format!("{id}-b"), REDIS_SERVICE, REDIS_PLAN)
        .await
        .expect(200);
    app.deprovision(&id, REDIS_SERVICE, REDIS_PLAN)
        .await
        .expect(200);
    // A certificate from another CA is refused.
    let wrong = spawn_with(tls(&env("BKG_TEST_MYSQL_CA"))).await;
    wrong
        .provision_with(
            &unique("redis-tls-wrong"),
            provision_body(REDIS_SERVICE, REDIS_PLAN),
            false,
        )
        .await
        .expect_error(503, None);
}
