//! One contract, run against every StateStore: the embedded file and the shared MySQL
//! database. The broker's concurrency guarantees are only as good as these.

use std::sync::Arc;

use brokerage::config::StoreConfig;
use brokerage::store::{self, Insert, StateStore, Table};

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
        s.insert(Table::Instances, "i1", None, b"one")
            .await
            .unwrap(),
        Insert::Inserted
    );
    match s
        .insert(Table::Instances, "i1", None, b"two")
        .await
        .unwrap()
    {
        Insert::Exists(v) => assert_eq!((v.version, v.doc.as_slice()), (1, &b"one"[..])),
        other => panic!("{other:?}"),
    }
    // Ids are case-sensitive and tables are separate.
    assert_eq!(
        s.insert(Table::Instances, "I1", None, b"upper")
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
        s.insert(Table::Bindings, "b1", Some(("i1", 1)), b"b")
            .await
            .unwrap(),
        Insert::ParentChanged
    );
    assert_eq!(
        s.insert(Table::Bindings, "b1", Some(("nope", 1)), b"b")
            .await
            .unwrap(),
        Insert::ParentChanged
    );
    assert_eq!(
        s.insert(Table::Bindings, "b1", Some(("i1", 2)), b"b")
            .await
            .unwrap(),
        Insert::Inserted
    );
    assert_eq!(
        s.insert(Table::Bindings, "b2", Some(("i1", 2)), b"c")
            .await
            .unwrap(),
        Insert::Inserted
    );
    assert_eq!(
        s.insert(Table::Bindings, "b3", Some(("I1", 1)), b"d")
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
    let listed: Vec<String> = s
        .list(Table::Instances)
        .await
        .unwrap()
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert_eq!(listed, vec!["I1".to_string()]);
    assert!(s.list(Table::Leases).await.unwrap().is_empty());

    // Of many concurrent inserts of one id, exactly one wins; the rest see the winner.
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .insert(Table::Instances, "race", None, format!("{i}").as_bytes())
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
        .insert(Table::Instances, "kept", None, b"doc")
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
}
