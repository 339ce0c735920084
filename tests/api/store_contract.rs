//! One contract, run against every StateStore: the embedded file and the shared MySQL
//! database. The broker's concurrency guarantees are only as good as these.

use std::sync::Arc;

use mysql_async::prelude::*;

use brokerage::config::StoreConfig;
use brokerage::store::{self, Insert, Link, StateStore, Table};

use crate::helpers::*;

async fn embedded() -> (Arc<dyn StateStore>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let config = StoreConfig::Embedded {
        path: dir.path().join("nested/dir/state.redb"),
        cache_mb: 16,
        url: None,
    };
    (store::open(&config).await.unwrap(), dir)
}

async fn mysql() -> Arc<dyn StateStore> {
    let StoreKind::Mysql(db) = StoreKind::fresh_mysql() else {
        unreachable!()
    };
    let config = StoreConfig::Mysql {
        url: brokerage::config::Secret::new(format!("{}/{db}", mysql_url())),
        path: None,
        cache_mb: None,
    };
    store::open(&config).await.unwrap()
}

async fn contract(store: Arc<dyn StateStore>) {
    store.check().await.unwrap();
    let s = &*store;
    assert_eq!(s.get(Table::Instances, "i1").await.unwrap(), None);

    // insert, then insert again: the first document stays.
    assert_eq!(
        s.insert(Table::Instances, "i1", Link::None, b"one")
            .await
            .unwrap(),
        Insert::Inserted
    );
    match s
        .insert(Table::Instances, "i1", Link::None, b"two")
        .await
        .unwrap()
    {
        Insert::Exists(v) => assert_eq!((v.version, v.doc.as_slice()), (1, &b"one"[..])),
        other => panic!("{other:?}"),
    }
    // Ids are case-sensitive and tables are separate.
    assert_eq!(
        s.insert(Table::Instances, "I1", Link::None, b"upper")
            .await
            .unwrap(),
        Insert::Inserted
    );
    assert_eq!(s.get(Table::Bindings, "i1").await.unwrap(), None);

    // replace is compare-and-swap on the version.
    assert!(!s.replace(Table::Instances, "i1", 7, b"x").await.unwrap());
    assert!(s
        .replace(Table::Instances, "i1", 1, b"three")
        .await
        .unwrap());
    let v = s.get(Table::Instances, "i1").await.unwrap().unwrap();
    assert_eq!((v.version, v.doc.as_slice()), (2, &b"three"[..]));
    assert!(!s
        .replace(Table::Instances, "i1", 1, b"stale")
        .await
        .unwrap());
    assert!(!s
        .replace(Table::Instances, "missing", 1, b"x")
        .await
        .unwrap());

    // A binding goes in only under its instance at the version the caller read.
    assert_eq!(
        s.insert(Table::Bindings, "b1", Link::Parent("i1", 1), b"b")
            .await
            .unwrap(),
        Insert::ParentChanged
    );
    assert_eq!(
        s.insert(Table::Bindings, "b1", Link::Parent("nope", 1), b"b")
            .await
            .unwrap(),
        Insert::ParentChanged
    );
    assert_eq!(
        s.insert(Table::Bindings, "b1", Link::Parent("i1", 2), b"b")
            .await
            .unwrap(),
        Insert::Inserted
    );
    assert_eq!(
        s.insert(Table::Bindings, "b2", Link::Parent("i1", 2), b"c")
            .await
            .unwrap(),
        Insert::Inserted
    );
    assert_eq!(
        s.insert(Table::Bindings, "b3", Link::Parent("I1", 1), b"d")
            .await
            .unwrap(),
        Insert::Inserted
    );
    let listed: Vec<String> = s
        .bindings_of("i1")
        .await
        .unwrap()
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert_eq!(listed, vec!["b1".to_string(), "b2".to_string()]);
    assert!(s.bindings_of("nobody").await.unwrap().is_empty());

    // remove is compare-and-swap too; a binding's removal leaves the instance's list.
    assert!(!s.remove(Table::Bindings, "b1", 9).await.unwrap());
    assert!(s.remove(Table::Bindings, "b1", 1).await.unwrap());
    assert!(!s.remove(Table::Bindings, "b1", 1).await.unwrap());
    assert_eq!(s.bindings_of("i1").await.unwrap().len(), 1);

    // Removing an instance takes its bindings, and only its own.
    assert!(s.remove(Table::Instances, "i1", 2).await.unwrap());
    assert_eq!(s.get(Table::Instances, "i1").await.unwrap(), None);
    assert_eq!(s.get(Table::Bindings, "b2").await.unwrap(), None);
    assert!(s.bindings_of("i1").await.unwrap().is_empty());
    assert!(s.get(Table::Bindings, "b3").await.unwrap().is_some());
    assert!(s.get(Table::Instances, "I1").await.unwrap().is_some());

    // The instances of a group are paged in id order, without other groups' or ungrouped
    // ones; removed ones leave the group, and a binding never joins one.
    for id in ["g-c", "g-a", "g-e", "g-b", "g-d"] {
        s.insert(Table::Instances, id, Link::Group("svc-one"), id.as_bytes())
            .await
            .unwrap();
    }
    s.insert(Table::Instances, "g-other", Link::Group("svc-two"), b"x")
        .await
        .unwrap();
    s.insert(Table::Bindings, "g-bound", Link::Parent("g-a", 1), b"b")
        .await
        .unwrap();
    let page = |after: &'static str| async move {
        s.page("svc-one", after, 2)
            .await
            .unwrap()
            .into_iter()
            .map(|(id, v)| {
                assert_eq!(
                    v.doc,
                    id.as_bytes(),
                    "each page holds the records themselves"
                );
                id
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(page("").await, ["g-a", "g-b"]);
    assert_eq!(page("g-b").await, ["g-c", "g-d"]);
    assert_eq!(page("g-d").await, ["g-e"]);
    assert!(page("g-e").await.is_empty());
    assert!(s.remove(Table::Instances, "g-c", 1).await.unwrap());
    assert_eq!(page("g-b").await, ["g-d", "g-e"]);
    assert!(s.replace(Table::Instances, "g-d", 1, b"g-d").await.unwrap());
    assert_eq!(
        page("g-c").await,
        ["g-d", "g-e"],
        "a replaced record stays in its group"
    );
    assert!(s.page("nobody", "", 10).await.unwrap().is_empty());

    // Of many concurrent inserts of one id, exactly one wins; the rest see the winner.
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .insert(
                        Table::Instances,
                        "race",
                        Link::None,
                        format!("{i}").as_bytes(),
                    )
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut winners = 0;
    for t in tasks {
        match t.await.unwrap() {
            Insert::Inserted => winners += 1,
            Insert::Exists(v) => assert_eq!(v.version, 1),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(winners, 1);

    // Of many concurrent replaces at one version, exactly one wins.
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .replace(Table::Instances, "race", 1, format!("r{i}").as_bytes())
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut swapped = 0;
    for t in tasks {
        swapped += t.await.unwrap() as usize;
    }
    assert_eq!(swapped, 1);
    assert_eq!(
        s.get(Table::Instances, "race")
            .await
            .unwrap()
            .unwrap()
            .version,
        2
    );
}

#[tokio::test]
async fn embedded_store_keeps_the_contract() {
    let (store, _dir) = embedded().await;
    contract(store).await;
}

#[tokio::test]
async fn mysql_store_keeps_the_contract() {
    contract(mysql().await).await;
}

#[tokio::test]
async fn embedded_store_survives_reopening() {
    let (store, dir) = embedded().await;
    store
        .insert(Table::Instances, "kept", Link::None, b"doc")
        .await
        .unwrap();
    drop(store);
    let config = StoreConfig::Embedded {
        path: dir.path().join("nested/dir/state.redb"),
        cache_mb: 16,
        url: None,
    };
    let reopened = store::open(&config).await.unwrap();
    let v = reopened
        .get(Table::Instances, "kept")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(v.doc, b"doc");
}

#[tokio::test]
async fn mysql_store_migrates_concurrently_and_idempotently() {
    let StoreKind::Mysql(db) = StoreKind::fresh_mysql() else {
        unreachable!()
    };
    let url = format!("{}/{db}", mysql_url());
    let opens: Vec<_> = (0..4)
        .map(|_| {
            let config = StoreConfig::Mysql {
                url: brokerage::config::Secret::new(url.clone()),
                path: None,
                cache_mb: None,
            };
            tokio::spawn(async move { store::open(&config).await.map(|_| ()) })
        })
        .collect();
    for o in opens {
        o.await
            .unwrap()
            .expect("concurrent start-ups all migrate or find the schema");
    }
    assert!(
        database_exists(&db).await,
        "the broker created its database"
    );
    // A process on another Galera node may have run a migration's statements without yet
    // recording its version (GET_LOCK holds per node): running them again must succeed.
    let mut conn = mysql_async::Conn::new(mysql_async::Opts::from_url(&url).unwrap())
        .await
        .unwrap();
    conn.query_drop("DELETE FROM brokerage_migrations WHERE version >= 4")
        .await
        .unwrap();
    let config = StoreConfig::Mysql {
        url: brokerage::config::Secret::new(url.clone()),
        path: None,
        cache_mb: None,
    };
    store::open(&config)
        .await
        .expect("migrations whose work is already done run again");
    let versions: Vec<i64> = conn
        .query("SELECT version FROM brokerage_migrations ORDER BY version")
        .await
        .unwrap();
    assert_eq!(versions, vec![1, 2, 3, 4, 5]);
}

/// Instance documents as every earlier version wrote them: a local one and one an upstream
/// owns (the store reads only `service_id` and `upstream` of them when it migrates).
fn earlier_instances() -> [(&'static str, Vec<u8>); 3] {
    let doc = |id: &str, upstream: serde_json::Value| {
        serde_json::to_vec(&serde_json::json!({
            "id": id, "service_id": "svc-old", "plan_id": "p", "upstream": upstream,
        }))
        .unwrap()
    };
    [
        ("old-local-b", doc("old-local-b", serde_json::Value::Null)),
        ("old-local-a", doc("old-local-a", serde_json::Value::Null)),
        (
            "old-upstream",
            doc(
                "old-upstream",
                serde_json::json!({"alias": "u", "service_id": "s", "plan_id": "p"}),
            ),
        ),
    ]
}

async fn grouped_after_upgrade(store: &dyn StateStore) {
    let ids: Vec<String> = store
        .page("svc-old", "", 10)
        .await
        .unwrap()
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert_eq!(
        ids,
        ["old-local-a", "old-local-b"],
        "upstream-owned instances stay out"
    );
    for (id, doc) in earlier_instances() {
        let stored = store.get(Table::Instances, id).await.unwrap().unwrap();
        assert_eq!(stored.doc, doc, "{id}: nothing recorded is lost");
    }
    assert!(store
        .get(Table::Bindings, "old-binding")
        .await
        .unwrap()
        .is_some());
    // The table the log service added since works in the upgraded store.
    let inserted = store
        .insert(Table::Logs, "old-local-a", Link::None, b"{}")
        .await
        .unwrap();
    assert_eq!(inserted, Insert::Inserted);
    let book = store
        .get(Table::Logs, "old-local-a")
        .await
        .unwrap()
        .unwrap();
    assert_eq!((book.version, book.doc.as_slice()), (1, b"{}".as_slice()));
}

#[tokio::test]
async fn an_embedded_store_written_before_instances_were_grouped_is_grouped_on_open() {
    // The file exactly as the store wrote it before: five tables, no group index.
    type Docs = redb::TableDefinition<'static, &'static str, (u64, &'static str, &'static [u8])>;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.redb");
    {
        let db = redb::Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut instances = txn.open_table(Docs::new("instances")).unwrap();
            for (id, doc) in earlier_instances() {
                instances.insert(id, (3u64, "", doc.as_slice())).unwrap();
            }
            let mut bindings = txn.open_table(Docs::new("bindings")).unwrap();
            bindings
                .insert("old-binding", (1u64, "old-local-a", b"{}".as_slice()))
                .unwrap();
            let mut index = txn
                .open_table(redb::TableDefinition::<(&str, &str), ()>::new(
                    "bindings_by_instance",
                ))
                .unwrap();
            index.insert(("old-local-a", "old-binding"), ()).unwrap();
            txn.open_table(Docs::new("catalogs")).unwrap();
            txn.open_table(Docs::new("leases")).unwrap();
        }
        txn.commit().unwrap();
    }
    let config = StoreConfig::Embedded {
        path,
        cache_mb: 16,
        url: None,
    };
    let store = store::open(&config).await.unwrap();
    grouped_after_upgrade(&*store).await;
}

#[tokio::test]
async fn a_mysql_store_written_before_instances_were_grouped_is_grouped_on_open() {
    use mysql_async::prelude::*;
    let StoreKind::Mysql(db) = StoreKind::fresh_mysql() else {
        unreachable!()
    };
    let mut admin = admin().await;
    admin
        .query_drop(format!("CREATE DATABASE {db}"))
        .await
        .unwrap();
    // The schema exactly as the store made it before: migrations 1 to 3.
    let columns = "id VARCHAR(255) CHARACTER SET ascii COLLATE ascii_bin NOT NULL PRIMARY KEY, \
        parent VARCHAR(255) CHARACTER SET ascii COLLATE ascii_bin NOT NULL DEFAULT '', \
        version BIGINT UNSIGNED NOT NULL, doc LONGBLOB NOT NULL";
    for (table, extra) in [
        ("instances", ""),
        ("bindings", ", INDEX by_parent (parent)"),
        ("catalogs", ""),
        ("leases", ""),
    ] {
        admin
            .query_drop(format!(
                "CREATE TABLE {db}.brokerage_{table} ({columns}{extra}) ENGINE=InnoDB"
            ))
            .await
            .unwrap();
    }
    admin
        .query_drop(format!(
            "CREATE TABLE {db}.brokerage_migrations (version INT NOT NULL PRIMARY KEY, \
             applied_at TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP) ENGINE=InnoDB"
        ))
        .await
        .unwrap();
    admin
        .query_drop(format!(
            "INSERT INTO {db}.brokerage_migrations (version) VALUES (1), (2), (3)"
        ))
        .await
        .unwrap();
    for (id, doc) in earlier_instances() {
        admin
            .exec_drop(
                format!("INSERT INTO {db}.brokerage_instances VALUES (?, '', 3, ?)"),
                (id, doc),
            )
            .await
            .unwrap();
    }
    admin
        .exec_drop(
            format!("INSERT INTO {db}.brokerage_bindings VALUES ('old-binding', 'old-local-a', 1, '{{}}')"),
            (),
        )
        .await
        .unwrap();
    let config = StoreConfig::Mysql {
        url: brokerage::config::Secret::new(format!("{}/{db}", mysql_url())),
        path: None,
        cache_mb: None,
    };
    let store = store::open(&config).await.unwrap();
    grouped_after_upgrade(&*store).await;
}
