//! Storage quotas as cf-mysql operators know them, against the real MariaDB: at the plan's
//! limit writes stop (reads and DELETE go on), below it they come back; two brokers sharing
//! the store enforce it once, not twice.

use std::time::Duration;

use mysql_async::prelude::*;

use crate::helpers::*;

#[tokio::test]
async fn a_full_database_loses_writes_until_data_is_deleted_enforced_once_by_two_brokers() {
    let store = StoreKind::fresh_mysql();
    let one = spawn_with(TestConfig::new().with_store(store.clone())).await;
    let two = spawn_with(TestConfig::new().with_store(store)).await;
    let id = unique("quota");
    let b = format!("{id}-b");
    one.provision(&id, SMALL).await.expect(201);
    let creds = two.bind(&id, &b, SMALL).await.body["credentials"].clone();

    let mut writer = connect_as(&creds).await.unwrap();
    quota_tables(&mut writer).await;
    fill_blobs(&mut writer).await;
    // Over 1 MB now: within a few passes writes are refused...
    wait_for_insert(&creds, true).await;
    // ...the connection that filled it was cut...
    assert!(
        writer.query_drop("SELECT 1").await.is_err(),
        "the open connection is killed"
    );
    // ...and reading and deleting still work.
    let mut reader = connect_as(&creds).await.unwrap();
    let kept: Option<String> = reader.query_first("SELECT body FROM notes").await.unwrap();
    assert_eq!(kept.as_deref(), Some("kept"));
    reader.query_drop("DELETE FROM blobs").await.unwrap();
    drop(reader);
    // Below the quota again: writes come back.
    wait_for_insert(&creds, false).await;

    // Both brokers ran passes; one user was revoked once and restored once, in total.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let revoked = metric(&one.base, "brokerage_quota_revocations_total").await
        + metric(&two.base, "brokerage_quota_revocations_total").await;
    let restored = metric(&one.base, "brokerage_quota_restorations_total").await
        + metric(&two.base, "brokerage_quota_restorations_total").await;
    assert_eq!((revoked, restored), (1.0, 1.0));
    let cycles = metric(&one.base, "brokerage_quota_cycles_total").await
        + metric(&two.base, "brokerage_quota_cycles_total").await;
    assert!(cycles >= 2.0, "passes ran: {cycles}");

    two.unbind(&id, &b, SMALL).await.expect(200);
    one.deprovision(&id, SERVICE, SMALL).await.expect(200);
}

#[tokio::test]
async fn read_only_bindings_never_gain_writes() {
    let app = spawn_app().await;
    let id = unique("roquota");
    app.provision(&id, SMALL).await.expect(201);
    let ro = app
        .bind_with(
            &id,
            &format!("{id}-ro"),
            serde_json::json!({"service_id": SERVICE, "plan_id": SMALL, "parameters": {"read-only": true}}),
            false,
        )
        .await;
    ro.expect(201);
    // Several passes below the quota: the read-only user stays read-only.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let mut conn = connect_as(&ro.body["credentials"]).await.unwrap();
    assert!(conn.query_drop("CREATE TABLE t (i INT)").await.is_err());
    drop(conn);
    app.unbind(&id, &format!("{id}-ro"), SMALL)
        .await
        .expect(200);
    app.deprovision(&id, SERVICE, SMALL).await.expect(200);
}

/// `statement` as the binding's user fails with "command denied" (1142) or "access
/// denied" (1044).
async fn denied(creds: &serde_json::Value, statement: &str) -> bool {
    let mut conn = connect_as(creds).await.unwrap();
    let outcome = conn.query_drop(statement).await;
    // Closed before the next statement connects: the plan allows two connections, and a
    // dropped connection's session may outlive the drop for a moment on a loaded machine
    // (found as "max_user_connections exceeded" in a full run).
    conn.disconnect().await.unwrap();
    match outcome {
        Err(mysql_async::Error::Server(e)) => [1142, 1044].contains(&e.code),
        other => panic!("{statement}: {other:?}"),
    }
}

#[tokio::test]
async fn past_its_quota_no_statement_grows_the_database_and_read_only_stays_read_only() {
    let app = spawn_app().await;
    let id = unique("quota-grow");
    app.provision(&id, SMALL).await.expect(201);
    let creds = app.bind(&id, &format!("{id}-b"), SMALL).await.body["credentials"].clone();
    let mut writer = connect_as(&creds).await.unwrap();
    writer
        .query_drop("CREATE TABLE notes (body VARCHAR(20)) ENGINE=InnoDB")
        .await
        .unwrap();
    writer
        .query_drop("CREATE TABLE blobs (id INT PRIMARY KEY, data LONGBLOB) ENGINE=InnoDB")
        .await
        .unwrap();
    for i in 0..3 {
        writer
            .exec_drop("INSERT INTO blobs VALUES (?, REPEAT('x', 600000))", (i,))
            .await
            .unwrap();
    }
    writer.disconnect().await.unwrap();
    wait_for_insert(&creds, true).await;
    // A read-only binding made while the database is over its quota.
    let ro = app
        .bind_with(
            &id,
            &format!("{id}-ro"),
            serde_json::json!({"service_id": SERVICE, "plan_id": SMALL, "parameters": {"read-only": true}}),
            false,
        )
        .await;
    ro.expect(201);
    let ro = ro.body["credentials"].clone();
    // Every way to grow is closed: columns, indexes, tables, temporary tables, views,
    // routines, triggers.
    for statement in [
        "ALTER TABLE blobs ADD COLUMN more LONGBLOB",
        "CREATE INDEX by_body ON notes (body)",
        "CREATE TABLE t2 (i INT)",
        "CREATE TEMPORARY TABLE tmp (data LONGBLOB)",
        "CREATE VIEW v AS SELECT * FROM notes",
        "CREATE PROCEDURE p() SELECT 1",
        "CREATE TRIGGER tr BEFORE DELETE ON notes FOR EACH ROW SET @x = 1",
        "UPDATE blobs SET data = REPEAT('y', 10) WHERE id = 0",
    ] {
        assert!(denied(&creds, statement).await, "{statement} was allowed");
    }
    // Reading and deleting go on.
    let mut conn = connect_as(&creds).await.unwrap();
    let n: Option<u64> = conn
        .query_first("SELECT COUNT(*) FROM blobs")
        .await
        .unwrap();
    assert_eq!(n, Some(3));
    conn.query_drop("DELETE FROM blobs").await.unwrap();
    conn.disconnect().await.unwrap();
    // Back under: the writer gets its writes back, the read-only binding does not.
    wait_for_insert(&creds, false).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(denied(&ro, "INSERT INTO notes VALUES ('ro')").await);
    assert!(denied(&ro, "DELETE FROM notes").await);
    app.unbind(&id, &format!("{id}-ro"), SMALL)
        .await
        .expect(200);
    app.unbind(&id, &format!("{id}-b"), SMALL).await.expect(200);
    app.deprovision(&id, SERVICE, SMALL).await.expect(200);
}
