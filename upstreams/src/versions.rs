//! Which answer fields each OSB version defines: an answer is cut to the caller's
//! `X-Broker-API-Version` before it leaves, so an older client never reads a field its
//! version does not know (a 2.13 client gets no `dashboard_url` from an update).
//!
//! One table, from the specification's release notes: for each kind of answer, the
//! fields that came after 2.4 and the minor version that brought each. Fields the
//! specification never named (a peer's extensions) are left alone, as the specification
//! allows since 2.14.

use serde_json::Value;

use crate::osb::ApiVersion;

/// The kinds of answer an OSB call gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// A service of `GET /v2/catalog` (its plans are [`Answer::Plan`]).
    Service,
    /// A plan inside a catalog service.
    Plan,
    /// Provision: 200, 201, 202.
    Provision,
    /// Update: 200, 202.
    Update,
    /// Deprovision and unbind: 200, 202.
    Deprovision,
    Unbind,
    /// `GET /v2/service_instances/{id}`.
    Instance,
    /// Bind: 200, 201, 202.
    Bind,
    /// `GET .../service_bindings/{id}`.
    Binding,
    /// Either `last_operation`.
    LastOperation,
    /// Any error body (4xx, 5xx).
    Error,
}

/// (answer, field, the minor version of 2.x that defined it).
const SINCE: &[(Answer, &str, u32)] = &[
    (Answer::Service, "instances_retrievable", 14),
    (Answer::Service, "bindings_retrievable", 14),
    (Answer::Service, "allow_context_updates", 15),
    (Answer::Plan, "bindable", 11),
    (Answer::Plan, "schemas", 13),
    (Answer::Plan, "maintenance_info", 15),
    (Answer::Plan, "plan_updateable", 15),
    (Answer::Plan, "maximum_polling_duration", 15),
    (Answer::Plan, "binding_rotatable", 17),
    (Answer::Provision, "operation", 9),
    (Answer::Provision, "metadata", 16),
    (Answer::Update, "operation", 9),
    (Answer::Update, "dashboard_url", 14),
    (Answer::Update, "metadata", 16),
    (Answer::Deprovision, "operation", 9),
    (Answer::Unbind, "operation", 14),
    (Answer::Instance, "maintenance_info", 15),
    (Answer::Instance, "metadata", 16),
    (Answer::Bind, "route_service_url", 8),
    (Answer::Bind, "volume_mounts", 10),
    (Answer::Bind, "operation", 14),
    (Answer::Bind, "endpoints", 15),
    (Answer::Bind, "metadata", 16),
    (Answer::Binding, "route_service_url", 8),
    (Answer::Binding, "volume_mounts", 10),
    (Answer::Binding, "endpoints", 15),
    (Answer::Binding, "metadata", 16),
    (Answer::LastOperation, "instance_usable", 16),
    (Answer::LastOperation, "update_repeatable", 16),
    (Answer::Error, "instance_usable", 16),
    (Answer::Error, "update_repeatable", 16),
];

/// Removes from `body` (an answer of kind `answer`) every field defined after `version`.
/// A catalog is cut with [`fit_catalog`].
pub fn fit(answer: Answer, version: ApiVersion, body: &mut Value) {
    let Value::Object(fields) = body else { return };
    if version.major != 2 {
        return;
    }
    for (kind, field, since) in SINCE {
        if *kind == answer && version.minor < *since {
            fields.remove(*field);
        }
    }
}

/// Cuts a whole `GET /v2/catalog` answer: every service and every plan in it.
pub fn fit_catalog(version: ApiVersion, catalog: &mut Value) {
    let Some(services) = catalog.get_mut("services").and_then(Value::as_array_mut) else {
        return;
    };
    for service in services {
        fit(Answer::Service, version, service);
        if let Some(plans) = service.get_mut("plans").and_then(Value::as_array_mut) {
            for plan in plans {
                fit(Answer::Plan, version, plan);
            }
        }
    }
}

/// Whether some answer field is newer than `version`: if not, nothing needs cutting.
pub fn cuts_anything(version: ApiVersion) -> bool {
    version.major == 2 && SINCE.iter().any(|(_, _, since)| version.minor < *since)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn v(minor: u32) -> ApiVersion {
        ApiVersion { major: 2, minor }
    }

    #[test]
    fn an_update_answer_names_its_dashboard_from_2_14_on() {
        let answer = json!({"dashboard_url": "https://d/1", "operation": "op"});
        let mut old = answer.clone();
        fit(Answer::Update, v(13), &mut old);
        assert_eq!(old, json!({"operation": "op"}));
        let mut older = answer.clone();
        fit(Answer::Update, v(8), &mut older);
        assert_eq!(older, json!({}));
        let mut new = answer.clone();
        fit(Answer::Update, v(14), &mut new);
        assert_eq!(new, answer);
    }

    #[test]
    fn a_catalog_loses_plan_and_service_fields_per_version() {
        let catalog = json!({"services": [{
            "id": "s", "bindings_retrievable": true, "x-extension": 1,
            "plans": [{"id": "p", "bindable": true, "schemas": {}, "maintenance_info": {"version": "1.0.0"}}]
        }]});
        let at = |minor| {
            let mut c = catalog.clone();
            fit_catalog(v(minor), &mut c);
            c
        };
        assert_eq!(
            at(10),
            json!({"services": [{"id": "s", "x-extension": 1, "plans": [{"id": "p"}]}]})
        );
        assert_eq!(
            at(13)["services"][0]["plans"][0],
            json!({"id": "p", "bindable": true, "schemas": {}})
        );
        assert_eq!(at(17), catalog);
        assert!(cuts_anything(v(16)));
        assert!(!cuts_anything(v(17)));
        assert!(!cuts_anything(v(18)));
    }
}
