//! Upstream federation: the remote brokers behind Brokerage, their catalogs merged with
//! the local one, and the routes from namespaced ids back to each upstream.
//!
//! Catalogs flow one way: a background refresher fetches every upstream concurrently,
//! keeps fresh copies in memory (moka, with a TTL) and the last good copy of each in the
//! state store, then swaps in a new merged snapshot. `GET /v2/catalog` only ever reads
//! that snapshot, so it never waits on an upstream; after a restart the snapshot is
//! built from the stored copies before the first request is served.

pub mod merge;

use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use upstreams::osb::ApiVersion;
use upstreams::Upstream;

pub use merge::Route;

use crate::store::{Link, StateStore, StoreError, Table};

/// An upstream's catalog as fetched, kept in memory and as the last good copy.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(try_from = "StoredCatalog")]
pub struct FetchedCatalog {
    pub catalog: upstreams::osb::Checked,
    pub fetched_at: DateTime<Utc>,
}

/// A last good copy as stored: the catalog's services and what was left out of it. A
/// copy stored before catalogs were read on fetch holds every service as the upstream
/// sent it, with no `problems`; it is read as a fetch is.
#[derive(Deserialize)]
struct StoredCatalog {
    catalog: Box<serde_json::value::RawValue>,
    #[serde(default)]
    problems: Vec<String>,
    fetched_at: DateTime<Utc>,
}

/// Written in the stored form, straight from the typed catalog.
impl Serialize for FetchedCatalog {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Stored<'a> {
            catalog: &'a upstreams::osb::Catalog,
            problems: &'a [String],
            fetched_at: DateTime<Utc>,
        }
        Stored {
            catalog: &self.catalog.catalog,
            problems: &self.catalog.problems,
            fetched_at: self.fetched_at,
        }
        .serialize(s)
    }
}

impl TryFrom<StoredCatalog> for FetchedCatalog {
    type Error = String;

    fn try_from(s: StoredCatalog) -> Result<Self, String> {
        let mut catalog = upstreams::osb::Catalog::read_lenient(s.catalog.get().as_bytes())?;
        let found = std::mem::replace(&mut catalog.problems, s.problems);
        catalog.problems.extend(found);
        Ok(FetchedCatalog {
            catalog,
            fetched_at: s.fetched_at,
        })
    }
}

/// What `GET /v2/catalog` serves, with the routes that go with it.
pub struct Snapshot {
    pub json: Bytes,
    pub merged: merge::Merged,
    /// `json` cut to each older API version (2.4 ..= 2.16), made on first use.
    older: [std::sync::OnceLock<Bytes>; 13],
}

impl Snapshot {
    /// The catalog as a client of `version` may read it: no field defined after it.
    pub fn json_for(&self, version: ApiVersion) -> Bytes {
        if !upstreams::versions::cuts_anything(version) || version < ApiVersion::OLDEST {
            return self.json.clone();
        }
        let slot = (version.minor - ApiVersion::OLDEST.minor) as usize;
        self.older[slot]
            .get_or_init(|| {
                let mut catalog = self.merged.catalog.clone();
                upstreams::versions::fit_catalog(&mut catalog, version);
                Bytes::from(serde_json::to_vec(&catalog).expect("catalog serializes"))
            })
            .clone()
    }
}

pub struct Federation {
    upstreams: Vec<Arc<Upstream>>,
    local: upstreams::osb::Catalog,
    store: Arc<dyn StateStore>,
    fresh: moka::future::Cache<String, Arc<FetchedCatalog>>,
    snapshot: RwLock<Arc<Snapshot>>,
    refresh_every: Duration,
    /// Each upstream's last refresh: when it succeeded, or what kind of failure it was.
    last_refresh: RwLock<std::collections::HashMap<String, Result<DateTime<Utc>, &'static str>>>,
}

impl Federation {
    pub fn new(
        clients: Vec<Upstream>,
        local: upstreams::osb::Catalog,
        store: Arc<dyn StateStore>,
        refresh_every: Duration,
        ttl: Duration,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Self {
        let observer: upstreams::Observer =
            Arc::new(move |alias: &str, outcome: &str, took: Duration| {
                metrics.observe_upstream(alias, outcome, took)
            });
        let upstreams = clients
            .into_iter()
            .map(|u| Arc::new(u.with_observer(observer.clone())))
            .collect();
        let empty = merge::merge(&local, &[]);
        Federation {
            upstreams,
            local,
            store,
            fresh: moka::future::Cache::builder().time_to_live(ttl).build(),
            snapshot: RwLock::new(Arc::new(snapshot(empty))),
            refresh_every,
            last_refresh: RwLock::default(),
        }
    }

    pub fn upstreams(&self) -> &[Arc<Upstream>] {
        &self.upstreams
    }

    pub fn upstream(&self, alias: &str) -> Option<&Arc<Upstream>> {
        self.upstreams.iter().find(|u| u.alias() == alias)
    }

    /// The catalog being served. Cheap: a reference count.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.read().expect("snapshot lock").clone()
    }

    /// Where a namespaced service id leads, if an upstream offers it.
    pub fn route(&self, service_id: &str) -> Option<Route> {
        self.snapshot().merged.routes.get(service_id).cloned()
    }

    /// Fetches every upstream concurrently, keeps what answered, and rebuilds the merged
    /// snapshot from fresh copies, falling back to the stored last good ones.
    pub async fn refresh(&self) {
        let fetches = self.upstreams.iter().map(|u| async move {
            (
                u.alias().to_string(),
                u.catalog(&upstreams::client::default_api_version()).await,
            )
        });
        for (alias, result) in futures::future::join_all(fetches).await {
            self.last_refresh.write().expect("refresh lock").insert(
                alias.clone(),
                result.as_ref().map(|_| Utc::now()).map_err(|e| e.kind()),
            );
            match result {
                Ok(catalog) => {
                    let fetched = Arc::new(FetchedCatalog {
                        catalog,
                        fetched_at: Utc::now(),
                    });
                    if let Err(e) = self.keep_last_good(&alias, &fetched).await {
                        tracing::warn!(upstream = %alias, error = %e, "could not store the last good catalog");
                    }
                    self.fresh.insert(alias, fetched).await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "catalog refresh failed; serving the last good copy")
                }
            }
        }
        self.rebuild().await;
    }

    /// Rebuilds the served snapshot from what is in memory or in the store.
    pub async fn rebuild(&self) {
        let mut copies: Vec<(Arc<Upstream>, Arc<FetchedCatalog>)> = Vec::new();
        for u in &self.upstreams {
            let copy = match self.fresh.get(u.alias()).await {
                Some(c) => Some(c),
                None => self.last_good(u.alias()).await.ok().flatten().map(Arc::new),
            };
            if let Some(c) = copy {
                copies.push((u.clone(), c));
            }
        }
        let inputs: Vec<merge::UpstreamCatalog<'_>> = copies
            .iter()
            .map(|(u, c)| merge::UpstreamCatalog {
                settings: u.settings(),
                catalog: &c.catalog,
            })
            .collect();
        let merged = merge::merge(&self.local, &inputs);
        let changed = {
            let current = self.snapshot();
            current.merged.catalog != merged.catalog || current.merged.problems != merged.problems
        };
        if changed {
            for p in &merged.problems {
                tracing::warn!(problem = %p, "catalog entry left out");
            }
            *self.snapshot.write().expect("snapshot lock") = Arc::new(snapshot(merged));
        }
    }

    /// Refreshes now, then every interval, forever; spawn it.
    pub async fn refresh_forever(self: Arc<Self>) {
        if self.upstreams.is_empty() {
            return;
        }
        loop {
            self.refresh().await;
            tokio::time::sleep(self.refresh_every).await;
        }
    }

    async fn keep_last_good(
        &self,
        alias: &str,
        fetched: &FetchedCatalog,
    ) -> Result<(), StoreError> {
        let doc = serde_json::to_vec(fetched).expect("catalogs serialize");
        loop {
            match self.store.get(Table::Catalogs, alias).await? {
                None => match self
                    .store
                    .insert(Table::Catalogs, alias, Link::None, &doc)
                    .await?
                {
                    crate::store::Insert::Inserted => return Ok(()),
                    _ => continue,
                },
                Some(v) => {
                    if self
                        .store
                        .replace(Table::Catalogs, alias, v.version, &doc)
                        .await?
                    {
                        return Ok(());
                    }
                }
            }
        }
    }

    async fn last_good(&self, alias: &str) -> Result<Option<FetchedCatalog>, StoreError> {
        Ok(self
            .store
            .get(Table::Catalogs, alias)
            .await?
            .and_then(|v| serde_json::from_slice(&v.doc).ok()))
    }

    /// For `/health`: each upstream's circuit and catalog.
    pub async fn health(&self) -> Value {
        let snapshot = self.snapshot();
        let mut out = Vec::new();
        for u in &self.upstreams {
            let services = snapshot
                .merged
                .routes
                .values()
                .filter(|r| r.alias == u.alias())
                .count();
            let mut catalog = match self.fresh.get(u.alias()).await {
                Some(c) => json!({"state": "fresh", "fetched_at": c.fetched_at}),
                None => json!({"state": "last-good-copy"}),
            };
            let last = self
                .last_refresh
                .read()
                .expect("refresh lock")
                .get(u.alias())
                .copied();
            catalog["last_refresh"] = match last {
                None => json!({"ok": null}),
                Some(Ok(at)) => json!({"ok": true, "at": at}),
                Some(Err(kind)) => json!({"ok": false, "failure": kind}),
            };
            out.push(json!({
                "alias": u.alias(),
                "breaker": u.breaker_state().as_str(),
                "services": services,
                "catalog": catalog,
            }));
        }
        Value::Array(out)
    }
}

fn snapshot(merged: merge::Merged) -> Snapshot {
    let json = Bytes::from(serde_json::to_vec(&merged.catalog).expect("catalog serializes"));
    Snapshot {
        json,
        merged,
        older: Default::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::FetchedCatalog;

    #[test]
    fn a_last_good_copy_stored_by_earlier_code_reads_as_a_fetch() {
        // As the code before typed catalogs stored it: every service as the upstream sent
        // it, a plan without id and a service without one among them, and no problems.
        let old = br#"{"catalog":{"services":[
            {"id":"s","name":"n","description":"d","bindable":true,"x-vendor":1,
             "plans":[{"id":"p","name":"q","description":"d"},{"name":"no id"}]},
            {"name":"broken"}]},"fetched_at":"2026-11-01T00:00:00Z"}"#;
        let copy: FetchedCatalog = serde_json::from_slice(old).unwrap();
        let services = &copy.catalog.catalog.services;
        assert_eq!(services.len(), 1);
        assert_eq!(services[0].plans.len(), 1);
        assert_eq!(services[0].extra["x-vendor"], 1);
        assert_eq!(
            copy.catalog.problems.len(),
            2,
            "{:?}",
            copy.catalog.problems
        );
        // Stored again, it reads back the same, problems included.
        let again: FetchedCatalog =
            serde_json::from_slice(&serde_json::to_vec(&copy).unwrap()).unwrap();
        assert_eq!(again, copy);
    }
}
