//! Which answer fields each OSB version defines: an answer is cut to the caller's
//! `X-Broker-API-Version` before it leaves, so an older client never reads a field its
//! version does not know (a 2.13 client gets no `dashboard_url` from an update).
//!
//! From the specification's release notes: for each kind of answer, the fields that
//! came after 2.4 and the minor version of 2.x that brought each, cut on the typed
//! answers. Fields the specification never named (a peer's extensions, kept in `extra`)
//! are left alone, as the specification allows since 2.14.

use crate::osb::{Answer, ApiVersion, BindingResponse, Catalog, ErrorBody, Plan, Service};

/// A field a client of `minor` may not read is dropped.
fn since<T>(minor: u32, brought_in: u32, field: &mut Option<T>) {
    if minor < brought_in {
        *field = None;
    }
}

/// The minor version of a 2.x caller that may miss fields; `None` when nothing is cut. The
/// typed answers hold only fields of the version Brokerage implements, so a caller at it
/// or later reads them all.
fn older(version: ApiVersion) -> Option<u32> {
    let newest = ApiVersion::CURRENT.minor;
    (version.major == 2 && version.minor < newest).then_some(version.minor)
}

/// Removes from `answer` every field defined after `version`.
pub fn fit(answer: &mut Answer, version: ApiVersion) {
    let Some(m) = older(version) else { return };
    match answer {
        Answer::Provision(a) => {
            since(m, 9, &mut a.operation);
            since(m, 16, &mut a.metadata);
        }
        Answer::Update(a) => {
            since(m, 9, &mut a.operation);
            since(m, 14, &mut a.dashboard_url);
            since(m, 16, &mut a.metadata);
        }
        Answer::Deprovision(a) => since(m, 9, &mut a.operation),
        Answer::Unbind(a) => since(m, 14, &mut a.operation),
        Answer::Instance(a) => {
            since(m, 15, &mut a.maintenance_info);
            since(m, 16, &mut a.metadata);
        }
        Answer::Bind(a) => {
            binding(m, a);
            since(m, 14, &mut a.operation);
        }
        Answer::Binding(a) => binding(m, a),
        Answer::LastOperation(a) => {
            since(m, 16, &mut a.instance_usable);
            since(m, 16, &mut a.update_repeatable);
        }
        Answer::Error(a) => error(m, a),
    }
}

fn binding(m: u32, a: &mut BindingResponse) {
    since(m, 8, &mut a.route_service_url);
    since(m, 10, &mut a.volume_mounts);
    since(m, 15, &mut a.endpoints);
    since(m, 16, &mut a.metadata);
}

fn error(m: u32, a: &mut ErrorBody) {
    since(m, 16, &mut a.instance_usable);
    since(m, 16, &mut a.update_repeatable);
}

/// Cuts a whole `GET /v2/catalog` answer: every service and every plan in it.
pub fn fit_catalog(catalog: &mut Catalog, version: ApiVersion) {
    let Some(m) = older(version) else { return };
    for service in &mut catalog.services {
        fit_service(m, service);
    }
}

fn fit_service(m: u32, s: &mut Service) {
    since(m, 14, &mut s.instances_retrievable);
    since(m, 14, &mut s.bindings_retrievable);
    since(m, 15, &mut s.allow_context_updates);
    for plan in &mut s.plans {
        fit_plan(m, plan);
    }
}

fn fit_plan(m: u32, p: &mut Plan) {
    since(m, 11, &mut p.bindable);
    since(m, 13, &mut p.schemas);
    since(m, 15, &mut p.maintenance_info);
    since(m, 15, &mut p.plan_updateable);
    since(m, 15, &mut p.maximum_polling_duration);
    since(m, 17, &mut p.binding_rotatable);
}

/// Whether some answer field is newer than `version`: if not, nothing needs cutting.
pub fn cuts_anything(version: ApiVersion) -> bool {
    older(version).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::osb::InstanceResponse;
    use serde_json::json;

    fn v(minor: u32) -> ApiVersion {
        ApiVersion { major: 2, minor }
    }

    #[test]
    fn an_update_answer_names_its_dashboard_from_2_14_on() {
        let answer = Answer::Update(InstanceResponse {
            dashboard_url: Some("https://d/1".into()),
            operation: Some("op".into()),
            ..Default::default()
        });
        let at = |minor| {
            let mut a = answer.clone();
            fit(&mut a, v(minor));
            serde_json::to_value(a).unwrap()
        };
        assert_eq!(at(13), json!({"operation": "op"}));
        assert_eq!(at(8), json!({}));
        assert_eq!(
            at(14),
            json!({"dashboard_url": "https://d/1", "operation": "op"})
        );
        // A provision's dashboard is 2.4's own.
        let mut provision = Answer::Provision(InstanceResponse {
            dashboard_url: Some("https://d/1".into()),
            ..Default::default()
        });
        fit(&mut provision, v(4));
        assert_eq!(provision.dashboard_url(), Some("https://d/1"));
    }

    #[test]
    fn a_catalog_loses_plan_and_service_fields_per_version() {
        let catalog: Catalog = serde_json::from_value(json!({"services": [{
            "id": "s", "name": "n", "description": "d", "bindable": true,
            "bindings_retrievable": true, "x-extension": 1,
            "plans": [{"id": "p", "name": "q", "description": "d", "bindable": true,
                       "schemas": {}, "maintenance_info": {"version": "1.0.0"},
                       "binding_rotatable": true}]
        }]}))
        .unwrap();
        let at = |minor| {
            let mut c = catalog.clone();
            fit_catalog(&mut c, v(minor));
            serde_json::to_value(c).unwrap()
        };
        assert_eq!(
            at(10),
            json!({"services": [{"id": "s", "name": "n", "description": "d", "bindable": true,
                "x-extension": 1, "plans": [{"id": "p", "name": "q", "description": "d"}]}]})
        );
        assert_eq!(
            at(13)["services"][0]["plans"][0],
            json!({"id": "p", "name": "q", "description": "d", "bindable": true, "schemas": {}})
        );
        assert_eq!(at(17), serde_json::to_value(&catalog).unwrap());
        assert!(at(16)["services"][0]["plans"][0]
            .get("binding_rotatable")
            .is_none());
        assert!(cuts_anything(v(16)));
        assert!(!cuts_anything(v(17)));
        assert!(!cuts_anything(v(18)));
    }

    #[test]
    fn forwarded_answers_keep_what_no_version_names() {
        let body = br#"{"credentials": {"u": 1}, "endpoints": [{"host": "h"}], "x-peer": true}"#;
        let mut answer = Answer::read(crate::osb::Kind::Bind, 201, body).unwrap();
        fit(&mut answer, v(14));
        assert_eq!(
            serde_json::to_value(&answer).unwrap(),
            json!({"credentials": {"u": 1}, "x-peer": true})
        );
        let refused = Answer::read(crate::osb::Kind::Bind, 409, b"").unwrap();
        assert_eq!(refused, Answer::Error(ErrorBody::default()));
        assert!(Answer::read(crate::osb::Kind::LastOperation, 200, b"{}").is_err());
    }
}
