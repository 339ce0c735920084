//! The Open Service Broker API v2 wire types, defined once for the server side (what
//! Brokerage answers) and the client side (what it sends to remote brokers).
//!
//! Every type keeps the fields it does not know in `extra`, so a catalog or a request
//! passes through a proxy without losing what a newer peer added. Empty strings and
//! empty objects in requests are read as absent, as the specification asks.

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};

/// `GET /v2/catalog` answer.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Catalog {
    pub services: Vec<Service>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Service {
    pub id: String,
    pub name: String,
    pub description: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub requires: Vec<String>,
    pub bindable: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instances_retrievable: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bindings_retrievable: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_context_updates: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan_updateable: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dashboard_client: Option<DashboardClient>,
    #[serde(default)]
    pub plans: Vec<Plan>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// An upstream's catalog as read: the services that are OSB, and what was left out and why.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Checked {
    pub catalog: Catalog,
    /// Each names the service (`service "n"` or `service #i`) and what is wrong with it.
    pub problems: Vec<String>,
}

impl Catalog {
    /// Reads a catalog service by service: one that is not OSB is left out and reported,
    /// as is a plan that is not, so one bad entry does not cost an upstream its catalog.
    /// Only a body without a `services` array is refused.
    pub fn read_lenient(body: &[u8]) -> Result<Checked, String> {
        #[derive(Deserialize)]
        struct Services<'a> {
            #[serde(borrow)]
            services: Vec<&'a serde_json::value::RawValue>,
        }
        let Services { services } = serde_json::from_slice(body)
            .map_err(|e| format!("a catalog needs a services array ({e})"))?;
        let mut checked = Checked::default();
        for (i, raw) in services.into_iter().enumerate() {
            if let Some(service) = read_service(raw.get(), i, &mut checked.problems) {
                checked.catalog.services.push(service);
            }
        }
        Ok(checked)
    }
}

fn usable(id: &str, name: &str) -> bool {
    !id.is_empty() && !name.is_empty()
}

/// A service and its valid plans; what does not read is reported, not fatal.
fn read_service(raw: &str, i: usize, problems: &mut Vec<String>) -> Option<Service> {
    // Fast path: a well-formed service reads straight from its text.
    if let Ok(service) = serde_json::from_str::<Service>(raw) {
        if usable(&service.id, &service.name)
            && service.plans.iter().all(|p| usable(&p.id, &p.name))
        {
            return Some(service);
        }
    }
    // Slow path: find what is wrong, keep what is right.
    let value: Value = serde_json::from_str(raw).ok()?;
    let label = value
        .get("name")
        .and_then(Value::as_str)
        .map(|n| format!("service {n:?}"))
        .unwrap_or_else(|| format!("service #{i}"));
    let mut problem = |what: String| problems.push(format!("{label}: {what}"));
    let Value::Object(mut object) = value else {
        problem("not a JSON object; left out".into());
        return None;
    };
    let plans = object.remove("plans");
    let mut service: Service = match serde_json::from_value(Value::Object(object)) {
        Ok(s) => s,
        Err(e) => {
            problem(format!("invalid ({e}); left out"));
            return None;
        }
    };
    if !usable(&service.id, &service.name) {
        problem("an empty id or name; left out".into());
        return None;
    }
    let plans = match plans {
        Some(Value::Array(plans)) => plans,
        _ => Vec::new(),
    };
    for (j, raw_plan) in plans.into_iter().enumerate() {
        match serde_json::from_value::<Plan>(raw_plan) {
            Ok(plan) if usable(&plan.id, &plan.name) => service.plans.push(plan),
            Ok(_) => problem(format!("plan #{j} has an empty id or name; left out")),
            Err(e) => problem(format!("plan #{j} is invalid ({e}); left out")),
        }
    }
    Some(service)
}

/// The UAA client Cloud Controller creates for a service's dashboard.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct DashboardClient {
    pub id: String,
    pub secret: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redirect_uri: Option<String>,
}

impl std::fmt::Debug for DashboardClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DashboardClient")
            .field("id", &self.id)
            .field("secret", &"***")
            .field("redirect_uri", &self.redirect_uri)
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub id: String,
    pub name: String,
    pub description: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub free: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bindable: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan_updateable: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maintenance_info: Option<MaintenanceInfo>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maximum_polling_duration: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schemas: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub binding_rotatable: Option<bool>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MaintenanceInfo {
    pub version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// `PUT /v2/service_instances/{id}` body.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProvisionRequest {
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "non_empty_string"
    )]
    pub service_id: Option<String>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "non_empty_string"
    )]
    pub plan_id: Option<String>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "non_empty_string"
    )]
    pub organization_guid: Option<String>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "non_empty_string"
    )]
    pub space_guid: Option<String>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "non_empty_object"
    )]
    pub context: Option<Map<String, Value>>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "non_empty_object"
    )]
    pub parameters: Option<Map<String, Value>>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "maintenance_info"
    )]
    pub maintenance_info: Option<MaintenanceInfo>,
    /// Fields this version does not know, passed on to upstreams unchanged.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// `PATCH /v2/service_instances/{id}` body.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct UpdateRequest {
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "non_empty_string"
    )]
    pub service_id: Option<String>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "non_empty_string"
    )]
    pub plan_id: Option<String>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "non_empty_object"
    )]
    pub context: Option<Map<String, Value>>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "non_empty_object"
    )]
    pub parameters: Option<Map<String, Value>>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "non_empty_object"
    )]
    pub previous_values: Option<Map<String, Value>>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "maintenance_info"
    )]
    pub maintenance_info: Option<MaintenanceInfo>,
    /// Fields this version does not know, passed on to upstreams unchanged.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// `PUT /v2/service_instances/{id}/service_bindings/{binding_id}` body.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BindRequest {
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "non_empty_string"
    )]
    pub service_id: Option<String>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "non_empty_string"
    )]
    pub plan_id: Option<String>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "non_empty_string"
    )]
    pub app_guid: Option<String>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "non_empty_object"
    )]
    pub bind_resource: Option<Map<String, Value>>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "non_empty_object"
    )]
    pub context: Option<Map<String, Value>>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "non_empty_object"
    )]
    pub parameters: Option<Map<String, Value>>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "non_empty_string"
    )]
    pub predecessor_binding_id: Option<String>,
    /// Fields this version does not know, passed on to upstreams unchanged.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// The answer to a provision or an update: 200, 201 or 202.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct InstanceResponse {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dashboard_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Value>,
    /// Fields no specification version names (a peer's extensions), passed on unchanged.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// `GET /v2/service_instances/{id}` answer.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct InstanceDetails {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dashboard_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<Map<String, Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maintenance_info: Option<MaintenanceInfo>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Value>,
    /// Fields no specification version names (a peer's extensions), passed on unchanged.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// The answer to a bind (200, 201, 202) and to fetching a binding.
#[derive(Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BindingResponse {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<Map<String, Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub syslog_drain_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route_service_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_mounts: Option<Vec<Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoints: Option<Vec<Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<Map<String, Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Value>,
    /// Fields no specification version names (a peer's extensions), passed on unchanged.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// Credentials never reach a log through `{:?}`.
impl std::fmt::Debug for BindingResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BindingResponse")
            .field("credentials", &self.credentials.as_ref().map(|_| "***"))
            .field(
                "syslog_drain_url",
                &self.syslog_drain_url.as_ref().map(|_| "***"),
            )
            .field("operation", &self.operation)
            .finish_non_exhaustive()
    }
}

/// The answer to a deprovision or an unbind: `{}` when done, the operation when accepted.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DeleteResponse {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation: Option<String>,
    /// Fields no specification version names (a peer's extensions), passed on unchanged.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// The `state` of a `last_operation` answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum OperationState {
    #[serde(rename = "in progress")]
    InProgress,
    #[serde(rename = "succeeded")]
    Succeeded,
    #[serde(rename = "failed")]
    Failed,
}

/// `GET .../last_operation` answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LastOperation {
    pub state: OperationState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_usable: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update_repeatable: Option<bool>,
    /// Fields no specification version names (a peer's extensions), passed on unchanged.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// The error body every failing OSB call answers with.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_usable: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update_repeatable: Option<bool>,
    /// Fields no specification version names (a peer's extensions), passed on unchanged.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// The kinds of answer an OSB call gets: what a forwarded answer is read as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Provision,
    Update,
    Deprovision,
    Unbind,
    /// `GET /v2/service_instances/{id}`.
    Instance,
    Bind,
    /// `GET .../service_bindings/{id}`.
    Binding,
    /// Either `last_operation`.
    LastOperation,
}

/// One OSB answer, typed until the HTTP layer writes it: its body is exactly the
/// inner type's JSON.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Answer {
    /// Provision: 200, 201, 202.
    Provision(InstanceResponse),
    /// Update: 200, 202.
    Update(InstanceResponse),
    Deprovision(DeleteResponse),
    Unbind(DeleteResponse),
    Instance(InstanceDetails),
    /// Bind: 200, 201, 202.
    Bind(BindingResponse),
    Binding(BindingResponse),
    LastOperation(LastOperation),
    /// Any 4xx an upstream answered (and 410 `{}`), passed on.
    Error(ErrorBody),
}

impl Answer {
    /// An answer of `kind` with `status` as an upstream sent it: a success as the kind's
    /// type, anything else as an error body; empty means `{}`. Unknown fields are kept.
    pub fn read(kind: Kind, status: u16, body: &[u8]) -> Result<Answer, serde_json::Error> {
        let body: &[u8] = if body.iter().all(u8::is_ascii_whitespace) {
            b"{}"
        } else {
            body
        };
        if !(200..300).contains(&status) {
            return Ok(Answer::Error(serde_json::from_slice(body)?));
        }
        Ok(match kind {
            Kind::Provision => Answer::Provision(serde_json::from_slice(body)?),
            Kind::Update => Answer::Update(serde_json::from_slice(body)?),
            Kind::Deprovision => Answer::Deprovision(serde_json::from_slice(body)?),
            Kind::Unbind => Answer::Unbind(serde_json::from_slice(body)?),
            Kind::Instance => Answer::Instance(serde_json::from_slice(body)?),
            Kind::Bind => Answer::Bind(serde_json::from_slice(body)?),
            Kind::Binding => Answer::Binding(serde_json::from_slice(body)?),
            Kind::LastOperation => Answer::LastOperation(serde_json::from_slice(body)?),
        })
    }

    /// The `operation` a `202` carries, where this kind of answer has one.
    pub fn operation(&self) -> Option<&str> {
        match self {
            Answer::Provision(a) | Answer::Update(a) => a.operation.as_deref(),
            Answer::Deprovision(a) | Answer::Unbind(a) => a.operation.as_deref(),
            Answer::Bind(a) | Answer::Binding(a) => a.operation.as_deref(),
            _ => None,
        }
    }

    /// Replaces the `operation` of an answer that has one (a `202`'s token).
    pub fn set_operation(&mut self, operation: String) {
        let slot = match self {
            Answer::Provision(a) | Answer::Update(a) => &mut a.operation,
            Answer::Deprovision(a) | Answer::Unbind(a) => &mut a.operation,
            Answer::Bind(a) | Answer::Binding(a) => &mut a.operation,
            _ => return,
        };
        *slot = Some(operation);
    }

    /// The `dashboard_url` of a provision's, an update's or a fetch's answer.
    pub fn dashboard_url(&self) -> Option<&str> {
        match self {
            Answer::Provision(a) | Answer::Update(a) => a.dashboard_url.as_deref(),
            Answer::Instance(a) => a.dashboard_url.as_deref(),
            _ => None,
        }
    }
}

/// An `X-Broker-API-Version` value, `major.minor`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ApiVersion {
    pub major: u32,
    pub minor: u32,
}

impl ApiVersion {
    /// The oldest version Brokerage still answers.
    pub const OLDEST: ApiVersion = ApiVersion { major: 2, minor: 4 };
    /// The version Brokerage implements and announces.
    pub const CURRENT: ApiVersion = ApiVersion {
        major: 2,
        minor: 17,
    };

    pub fn parse(text: &str) -> Option<ApiVersion> {
        let (major, minor) = text.trim().split_once('.')?;
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        if !digits(major) || !digits(minor) {
            return None;
        }
        Some(ApiVersion {
            major: major.parse().ok()?,
            minor: minor.parse().ok()?,
        })
    }

    /// Every 2.x from 2.4 on: newer minor versions only add optional fields.
    pub fn is_supported(self) -> bool {
        self.major == Self::OLDEST.major && self >= Self::OLDEST
    }
}

impl Default for ApiVersion {
    fn default() -> Self {
        Self::CURRENT
    }
}

impl std::fmt::Display for ApiVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

fn non_empty_string<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(Option::<String>::deserialize(d)?.filter(|s| !s.is_empty()))
}

fn non_empty_object<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<Map<String, Value>>, D::Error> {
    Ok(Option::<Map<String, Value>>::deserialize(d)?.filter(|m| !m.is_empty()))
}

fn maintenance_info<'de, D: Deserializer<'de>>(d: D) -> Result<Option<MaintenanceInfo>, D::Error> {
    let Some(map) = non_empty_object(d)? else {
        return Ok(None);
    };
    match map.get("version") {
        None => Ok(None),
        Some(Value::String(v)) if v.is_empty() => Ok(None),
        Some(_) => serde_json::from_value(Value::Object(map))
            .map(Some)
            .map_err(serde::de::Error::custom),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn empty_strings_and_objects_are_absent() {
        let req: ProvisionRequest = serde_json::from_value(json!({
            "service_id": "", "plan_id": "p", "parameters": {}, "maintenance_info": {},
            "context": {"platform": "cloudfoundry"}, "unknown": 1
        }))
        .unwrap();
        assert_eq!(req.service_id, None);
        assert_eq!(req.plan_id.as_deref(), Some("p"));
        assert_eq!(req.parameters, None);
        assert_eq!(req.maintenance_info, None);
        assert!(req.context.is_some());
    }

    #[test]
    fn api_versions() {
        for (text, supported) in [
            ("2.4", true),
            ("2.15", true),
            ("2.17", true),
            ("2.99", true),
            ("2.3", false),
            ("1.9", false),
            ("3.0", false),
        ] {
            assert_eq!(
                ApiVersion::parse(text).unwrap().is_supported(),
                supported,
                "{text}"
            );
        }
        for bad in ["", "2", "2.", ".4", "two.four", "2.4.1", "-2.4", "2.+4"] {
            assert_eq!(ApiVersion::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn unknown_catalog_fields_pass_through() {
        let text = r#"{"id":"s","name":"n","description":"d","bindable":true,
            "x-vendor":{"a":1},"plans":[{"id":"p","name":"q","description":"d","x-plan":2}]}"#;
        let service: Service = serde_json::from_str(text).unwrap();
        let back = serde_json::to_value(&service).unwrap();
        assert_eq!(back["x-vendor"], json!({"a": 1}));
        assert_eq!(back["plans"][0]["x-plan"], json!(2));
    }

    #[test]
    fn dashboard_secret_is_not_debug_printed() {
        let c = DashboardClient {
            id: "i".into(),
            secret: "hunter2".into(),
            redirect_uri: None,
        };
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}
