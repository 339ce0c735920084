//! Storage quota enforcement: a periodic pass over every local instance, run by every
//! broker process but acted on by one per cycle: the process holding the lease in the
//! shared store (a compare-and-swap on one record) does the pass, the others skip it.

use std::time::Duration;

use chrono::Utc;
use serde::{Deserialize, Serialize};

use crate::broker::Broker;
use crate::store::records;
use crate::store::{Insert, Link, Table};

const LEASE: &str = "quota-enforcer";

#[derive(Serialize, Deserialize)]
struct Lease {
    holder: String,
    until_ms: i64,
}

/// What one pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pass {
    pub instances: u32,
    pub revoked: u32,
    pub restored: u32,
    pub failed: u32,
}

pub struct QuotaEnforcer {
    broker: Broker,
    interval: Duration,
    holder: String,
}

impl QuotaEnforcer {
    pub fn new(broker: Broker, interval: Duration) -> Self {
        QuotaEnforcer {
            broker,
            interval,
            holder: uuid::Uuid::new_v4().to_string(),
        }
    }

    /// Every interval: take or keep the lease, and if held, make a pass.
    pub async fn run_forever(self) {
        loop {
            match self.take_lease().await {
                Ok(true) => {
                    let pass = self.pass().await;
                    let m = self.broker.metrics();
                    m.quota_cycles.inc();
                    m.quota_revocations.inc_by(pass.revoked as u64);
                    m.quota_restorations.inc_by(pass.restored as u64);
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "quota lease unavailable"),
            }
            tokio::time::sleep(self.interval).await;
        }
    }

    /// Holds the lease for two intervals: a holder that dies is replaced after that.
    async fn take_lease(&self) -> Result<bool, crate::store::StoreError> {
        let store = &**self.broker.store();
        let now = Utc::now().timestamp_millis();
        let mine = serde_json::to_vec(&Lease {
            holder: self.holder.clone(),
            until_ms: now + 2 * self.interval.as_millis() as i64,
        })
        .expect("serializes");
        match store.get(Table::Leases, LEASE).await? {
            None => Ok(matches!(
                store
                    .insert(Table::Leases, LEASE, Link::None, &mine)
                    .await?,
                Insert::Inserted
            )),
            Some(current) => {
                let lease: Option<Lease> = serde_json::from_slice(&current.doc).ok();
                let free = lease.is_none_or(|l| l.holder == self.holder || l.until_ms < now);
                if !free {
                    return Ok(false);
                }
                store
                    .replace(Table::Leases, LEASE, current.version, &mine)
                    .await
            }
        }
    }

    /// One pass over the instances of every service whose backend enforces quotas, a
    /// page at a time: its cost grows with those instances only, never with other
    /// services' or with upstream-owned ones.
    pub async fn pass(&self) -> Pass {
        const PAGE: usize = 500;
        let mut pass = Pass::default();
        let store = &**self.broker.store();
        for service in self.broker.catalog().services() {
            let Some(backend) = self.broker.backends().get(&service.backend) else {
                continue;
            };
            if !backend.enforces_quota() {
                continue;
            }
            let mut after = String::new();
            loop {
                let page = match records::page(store, &service.wire.id, &after, PAGE).await {
                    Ok(page) => page,
                    Err(e) => {
                        tracing::warn!(error = %e, "quota pass: cannot read the instances");
                        pass.failed += 1;
                        return pass;
                    }
                };
                let full = page.len() == PAGE;
                if let Some(last) = page.last() {
                    after.clone_from(&last.record.id);
                }
                let batch: Vec<(String, crate::catalog::PlanLimits)> = page
                    .into_iter()
                    .map(|stored| stored.record)
                    .filter(|instance| instance.provisioned)
                    .filter_map(|instance| {
                        let plan = service.plan(&instance.plan_id)?;
                        Some((instance.id, plan.limits))
                    })
                    .collect();
                pass.instances += batch.len() as u32;
                let changes = backend.enforce_quota(&batch).await;
                for ((instance_id, _), change) in batch.iter().zip(changes) {
                    match change {
                        Ok(change) => {
                            pass.revoked += change.revoked;
                            pass.restored += change.restored;
                        }
                        Err(e) => {
                            pass.failed += 1;
                            tracing::warn!(%instance_id, error = %e, "quota pass failed for an instance");
                        }
                    }
                }
                if !full {
                    break;
                }
            }
        }
        pass
    }
}
