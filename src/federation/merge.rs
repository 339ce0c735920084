//! The merged catalog: local services as configured, then every upstream's services,
//! always namespaced. Pure: the same inputs give the same catalog, byte for byte, in any
//! broker process, so ids stay stable across restarts and processes.

use std::collections::{HashMap, HashSet};

use upstreams::osb::{self, Service};
use upstreams::UpstreamSettings;
use uuid::Uuid;

/// Namespace of the deterministic (version 5) ids given to upstream services and plans.
const ID_NAMESPACE: Uuid = Uuid::from_u128(0x6b72_6f6b_6572_6167_652e_6964_7321_0001);

/// The namespaced id of an upstream's service.
pub fn service_id(alias: &str, upstream_service_id: &str) -> String {
    uuid_v5(&["service", alias, upstream_service_id])
}

/// The namespaced id of an upstream's plan.
pub fn plan_id(alias: &str, upstream_plan_id: &str) -> String {
    uuid_v5(&["plan", alias, upstream_plan_id])
}

/// RFC 4122 version 5 (SHA-1 of namespace and name, the parts joined by newlines), with
/// the hardware-accelerated SHA-1 where the processor has one: merging 100,000 plans
/// hashes 100,000 names.
fn uuid_v5(parts: &[&str]) -> String {
    use sha1::{Digest, Sha1};
    let mut hasher = Sha1::new();
    hasher.update(ID_NAMESPACE.as_bytes());
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            hasher.update(b"\n");
        }
        hasher.update(part.as_bytes());
    }
    let digest: [u8; 20] = hasher.finalize().into();
    let bytes: [u8; 16] = digest[..16].try_into().expect("20 > 16");
    uuid::Builder::from_sha1_bytes(bytes)
        .into_uuid()
        .hyphenated()
        .to_string()
}

/// Where a namespaced service leads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub alias: String,
    pub service_id: String,
    /// namespaced plan id -> the upstream's plan id
    pub plans: HashMap<String, String>,
}

#[derive(Debug, Clone, Default)]
pub struct Merged {
    pub catalog: osb::Catalog,
    /// namespaced service id -> route
    pub routes: HashMap<String, Route>,
    /// What was left out, and why.
    pub problems: Vec<String>,
}

/// One upstream's catalog as fetched (or as last stored), read service by service.
pub struct UpstreamCatalog<'a> {
    pub settings: &'a UpstreamSettings,
    pub catalog: &'a osb::Checked,
}

/// One upstream service, parsed and namespaced, before it is checked against the others.
struct Candidate {
    service: Service,
    route: Route,
    label: String,
}

/// Phase one, for each upstream on its own (and in parallel): parse and namespace every
/// service, reporting what cannot be used.
fn prepare(upstream: &UpstreamCatalog<'_>) -> (Vec<Candidate>, Vec<String>) {
    let alias = upstream.settings.alias.as_str();
    let checked = upstream.catalog;
    let mut problems: Vec<String> = checked
        .problems
        .iter()
        .map(|p| format!("upstream {alias}: {p}"))
        .collect();
    let prefix = upstream.settings.prefix();
    let mut candidates = Vec::with_capacity(checked.catalog.services.len());
    for service in &checked.catalog.services {
        if !upstream.settings.wants_service(&service.name) {
            continue;
        }
        let label = format!("service {:?}", service.name);
        let mut problem =
            |what: String| problems.push(format!("upstream {alias}: {label}: {what}"));
        let mut out = service.clone();
        let upstream_id = std::mem::take(&mut out.id);
        out.id = service_id(alias, &upstream_id);
        out.name = format!("{prefix}{}", out.name);
        if let Some(dc) = &mut out.dashboard_client {
            dc.id = format!("{alias}-{}", dc.id);
        }
        let plans = std::mem::take(&mut out.plans);
        let mut route = Route {
            alias: alias.to_string(),
            service_id: upstream_id,
            plans: HashMap::with_capacity(plans.len()),
        };
        let mut plan_names = HashSet::with_capacity(plans.len());
        for mut plan in plans {
            if !upstream.settings.wants_plan(&plan.name) {
                continue;
            }
            if !plan_names.insert(plan.name.clone()) {
                problem(format!(
                    "plan name {:?} appears twice; the second is left out",
                    plan.name
                ));
                continue;
            }
            let namespaced = plan_id(alias, &plan.id);
            if route.plans.contains_key(&namespaced) {
                problem(format!(
                    "plan id {:?} appears twice; the second is left out",
                    plan.id
                ));
                continue;
            }
            let upstream_plan = std::mem::replace(&mut plan.id, namespaced.clone());
            route.plans.insert(namespaced, upstream_plan);
            out.plans.push(plan);
        }
        if out.plans.is_empty() {
            problem("no usable plan; left out".into());
            continue;
        }
        candidates.push(Candidate {
            service: out,
            route,
            label,
        });
    }
    (candidates, problems)
}

pub fn merge(local: &osb::Catalog, upstreams: &[UpstreamCatalog<'_>]) -> Merged {
    use rayon::prelude::*;
    let mut merged = Merged {
        catalog: local.clone(),
        ..Default::default()
    };
    let mut names: HashSet<String> = local.services.iter().map(|s| s.name.clone()).collect();
    // Namespaced ids are UUIDv5 of distinct names: they can only collide with a local id,
    // so only local ids are kept to check against.
    let ids: HashSet<String> = local
        .services
        .iter()
        .flat_map(|s| std::iter::once(s.id.clone()).chain(s.plans.iter().map(|p| p.id.clone())))
        .collect();
    let mut dashboard_ids: HashSet<String> = local
        .services
        .iter()
        .filter_map(|s| s.dashboard_client.as_ref().map(|d| d.id.clone()))
        .collect();
    let prepared: Vec<_> = upstreams.par_iter().map(prepare).collect();
    // Phase two, in configuration order: what still collides is reported and left out.
    for (candidates, problems) in prepared {
        merged.problems.extend(problems);
        for Candidate {
            service,
            route,
            label,
        } in candidates
        {
            let problem = |what: String| format!("upstream {}: {label}: {what}", route.alias);
            if names.contains(&service.name) {
                merged.problems.push(problem(format!(
                    "the namespaced name {:?} is taken; left out",
                    service.name
                )));
                continue;
            }
            if ids.contains(&service.id) || service.plans.iter().any(|p| ids.contains(&p.id)) {
                merged.problems.push(problem(
                    "its namespaced id collides with another service's; left out".into(),
                ));
                continue;
            }
            if let Some(dc) = &service.dashboard_client {
                if !dashboard_ids.insert(dc.id.clone()) {
                    merged.problems.push(problem(format!(
                        "dashboard_client.id {:?} is taken; left out",
                        dc.id
                    )));
                    continue;
                }
            }
            names.insert(service.name.clone());
            merged.routes.insert(service.id.clone(), route);
            merged.catalog.services.push(service);
        }
    }
    merged
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn settings(alias: &str) -> UpstreamSettings {
        serde_json::from_value(json!({"alias": alias, "url": "http://127.0.0.1:1"})).unwrap()
    }

    fn local() -> osb::Catalog {
        serde_json::from_value(json!({"services": [
            {"id": "local-1", "name": "mysql-db", "description": "d", "bindable": true,
             "plans": [{"id": "local-plan", "name": "small", "description": "d"}]}
        ]}))
        .unwrap()
    }

    fn checked(catalog: serde_json::Value) -> osb::Checked {
        osb::Catalog::read_lenient(&serde_json::to_vec(&catalog).unwrap()).unwrap()
    }

    fn upstream_catalog() -> osb::Checked {
        checked(json!({"services": [
            {"id": "svc-1", "name": "db", "description": "d", "bindable": true,
             "dashboard_client": {"id": "db-client", "secret": "s", "redirect_uri": "https://x"},
             "x-vendor": {"keep": true},
             "plans": [
                 {"id": "p-1", "name": "small", "description": "d", "maintenance_info": {"version": "1.0.0"}},
                 {"description": "no id or name"},
                 {"id": "p-2", "name": "small", "description": "same name"}
             ]},
            {"name": "no-id", "description": "d", "bindable": true, "plans": []},
            {"id": "svc-2", "name": "cache", "description": "d", "bindable": false,
             "plans": [{"id": "p-3", "name": "tiny", "description": "d"}]}
        ]}))
    }

    #[test]
    fn upstream_services_are_namespaced_and_keep_their_fields() {
        let east = settings("east");
        let cat = upstream_catalog();
        let merged = merge(
            &local(),
            &[UpstreamCatalog {
                settings: &east,
                catalog: &cat,
            }],
        );
        let names: Vec<&str> = merged
            .catalog
            .services
            .iter()
            .map(|s| s.name.as_str())
            .collect();
        assert_eq!(names, ["mysql-db", "east-db", "east-cache"]);
        let db = &merged.catalog.services[1];
        assert_eq!(db.id, service_id("east", "svc-1"));
        assert_eq!(db.dashboard_client.as_ref().unwrap().id, "east-db-client");
        assert_eq!(db.extra["x-vendor"], json!({"keep": true}));
        assert_eq!(db.plans.len(), 1);
        assert_eq!(db.plans[0].id, plan_id("east", "p-1"));
        assert_eq!(
            db.plans[0].maintenance_info.as_ref().unwrap().version,
            "1.0.0"
        );
        let route = &merged.routes[&db.id];
        assert_eq!(route.service_id, "svc-1");
        assert_eq!(route.plans[&db.plans[0].id], "p-1");
        // Reported: the plan without id, the duplicate plan name, the service without id.
        assert_eq!(merged.problems.len(), 3, "{:?}", merged.problems);
        assert!(
            merged.problems.iter().any(|p| p.contains("no-id")),
            "{:?}",
            merged.problems
        );
    }

    #[test]
    fn two_upstreams_with_the_same_catalog_both_appear() {
        let (east, west) = (settings("east"), settings("west"));
        let cat = upstream_catalog();
        let merged = merge(
            &local(),
            &[
                UpstreamCatalog {
                    settings: &east,
                    catalog: &cat,
                },
                UpstreamCatalog {
                    settings: &west,
                    catalog: &cat,
                },
            ],
        );
        let names: Vec<&str> = merged
            .catalog
            .services
            .iter()
            .map(|s| s.name.as_str())
            .collect();
        assert_eq!(
            names,
            ["mysql-db", "east-db", "east-cache", "west-db", "west-cache"]
        );
        assert_ne!(service_id("east", "svc-1"), service_id("west", "svc-1"));
        assert_eq!(merged.routes[&service_id("west", "svc-1")].alias, "west");
    }

    #[test]
    fn collisions_after_namespacing_are_reported_and_left_out() {
        // "a-b" + "x" and "a" + "b-x" both make "a-b-x".
        let (a, ab) = (settings("a"), settings("a-b"));
        let one = checked(
            json!({"services": [{"id": "1", "name": "b-x", "description": "d", "bindable": true,
            "plans": [{"id": "p", "name": "n", "description": "d"}]}]}),
        );
        let two = checked(
            json!({"services": [{"id": "2", "name": "x", "description": "d", "bindable": true,
            "plans": [{"id": "p", "name": "n", "description": "d"}]}]}),
        );
        let mut prefixed = settings("mysql");
        prefixed.name_prefix = Some(String::new());
        let three = checked(
            json!({"services": [{"id": "3", "name": "mysql-db", "description": "d", "bindable": true,
            "plans": [{"id": "p", "name": "n", "description": "d"}]}]}),
        );
        let merged = merge(
            &local(),
            &[
                UpstreamCatalog {
                    settings: &a,
                    catalog: &one,
                },
                UpstreamCatalog {
                    settings: &ab,
                    catalog: &two,
                },
                UpstreamCatalog {
                    settings: &prefixed,
                    catalog: &three,
                },
            ],
        );
        let names: Vec<&str> = merged
            .catalog
            .services
            .iter()
            .map(|s| s.name.as_str())
            .collect();
        assert_eq!(names, ["mysql-db", "a-b-x"]);
        assert_eq!(merged.problems.len(), 2, "{:?}", merged.problems);
    }

    #[test]
    fn filters_and_garbage() {
        let mut only_db = settings("east");
        only_db.include_services = vec!["db".into()];
        only_db.exclude_plans = vec!["small".into()];
        let cat = upstream_catalog();
        let merged = merge(
            &local(),
            &[UpstreamCatalog {
                settings: &only_db,
                catalog: &cat,
            }],
        );
        // db's only valid plan is excluded, so db is left out too; cache is not included.
        assert_eq!(merged.catalog.services.len(), 1);
        assert!(
            merged.problems.iter().any(|p| p.contains("no usable plan")),
            "{:?}",
            merged.problems
        );
        // A body that is no catalog at all is refused whole, not merged.
        for garbage in [&b"{\"services\": \"nope\"}"[..], b"[]", b"<html>"] {
            assert!(osb::Catalog::read_lenient(garbage).is_err());
        }
    }

    #[test]
    fn ids_are_stable() {
        assert_eq!(service_id("east", "svc-1"), service_id("east", "svc-1"));
        // Pinned: every broker process, before and after an upgrade, must derive this id
        // (computed independently as UUIDv5 of the same namespace and name).
        assert_eq!(
            service_id("east", "svc-1"),
            "5ea22f20-f8cf-55c0-9e85-801ed3bf16fc"
        );
        assert_ne!(service_id("east", "x"), plan_id("east", "x"));
    }
}
