//! The local catalog: the services Brokerage's own backends offer, read from
//! configuration in the seed's settings.yml shape, validated once at start-up, and
//! published as OSB wire types.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use anyhow::bail;
use serde::{Deserialize, Serialize};
use upstreams::osb;

use crate::config::{is_cli_name, BackendKind, PlanConfig, ServiceConfig};

/// What a backend may use of a plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanLimits {
    pub max_storage_mb: u64,
    /// Connections per binding, where the backend can limit them (MySQL); 0 elsewhere.
    pub max_user_connections: u32,
    /// Deprovision may delete what the instance still holds (Swift objects).
    #[serde(default)]
    pub purge_on_deprovision: bool,
    /// Logs: lines and bytes an instance keeps; 0 elsewhere.
    #[serde(default)]
    pub max_log_lines: u64,
    #[serde(default)]
    pub max_log_bytes: u64,
}

/// Where in a plan's `schemas` the parameters of a call are described.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ParametersOf {
    Provision,
    Update,
    Bind,
}

impl ParametersOf {
    const ALL: [ParametersOf; 3] = [
        ParametersOf::Provision,
        ParametersOf::Update,
        ParametersOf::Bind,
    ];

    fn path(self) -> [&'static str; 3] {
        match self {
            ParametersOf::Provision => ["service_instance", "create", "parameters"],
            ParametersOf::Update => ["service_instance", "update", "parameters"],
            ParametersOf::Bind => ["service_binding", "create", "parameters"],
        }
    }
}

/// A plan as the broker uses it.
#[derive(Clone)]
pub struct LocalPlan {
    pub wire: osb::Plan,
    pub limits: PlanLimits,
    pub asynchronous: bool,
    /// The JSON Schemas the catalog publishes for parameters, compiled once.
    schemas: Arc<HashMap<ParametersOf, Schema>>,
}

/// A compiled parameter schema and the parameters it declares.
type Schema = (jsonschema::Validator, Vec<String>);

impl std::fmt::Debug for LocalPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalPlan")
            .field("id", &self.wire.id)
            .field("limits", &self.limits)
            .field("asynchronous", &self.asynchronous)
            .finish_non_exhaustive()
    }
}

impl LocalPlan {
    /// Checks parameters against the schema the catalog publishes for them, if any;
    /// the error says where and what.
    pub fn check_parameters(
        &self,
        of: ParametersOf,
        parameters: Option<&serde_json::Map<String, serde_json::Value>>,
    ) -> Result<(), String> {
        let Some((validator, declared)) = self.schemas.get(&of) else {
            return Ok(());
        };
        let instance = serde_json::Value::Object(parameters.cloned().unwrap_or_default());
        // Name what the schema does not declare: its own message shows only the value.
        let undeclared: Vec<&str> = parameters
            .into_iter()
            .flat_map(|p| p.keys())
            .map(String::as_str)
            .filter(|k| !declared.iter().any(|d| d == k))
            .collect();
        let mut problems: Vec<String> = validator
            .iter_errors(&instance)
            .map(|e| {
                let at = e.instance_path().to_string();
                if at.is_empty() {
                    e.to_string()
                } else {
                    format!("{at}: {e}")
                }
            })
            .collect();
        if !problems.is_empty() && !undeclared.is_empty() {
            problems.push(format!("not declared: {}", undeclared.join(", ")));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "parameters do not match the plan's schema: {}",
                problems.join("; ")
            ))
        }
    }
}

/// A service as the broker uses it.
#[derive(Debug, Clone)]
pub struct LocalService {
    pub wire: osb::Service,
    pub backend: BackendKind,
    pub refuse_deprovision_with_bindings: bool,
    pub bindings_require_app: bool,
    pub plans: Vec<LocalPlan>,
    /// Its backend's `max_db_per_node`: the most instances all services on that backend
    /// may hold together. Never published.
    pub max_instances: Option<u64>,
}

impl LocalService {
    pub fn plan(&self, plan_id: &str) -> Option<&LocalPlan> {
        self.plans.iter().find(|p| p.wire.id == plan_id)
    }

    pub fn plan_updateable(&self, plan: &LocalPlan) -> bool {
        plan.wire
            .plan_updateable
            .or(self.wire.plan_updateable)
            .unwrap_or(false)
    }

    pub fn bindable(&self, plan: &LocalPlan) -> bool {
        plan.wire.bindable.unwrap_or(self.wire.bindable)
    }
}

/// The validated local catalog, cheap to share.
#[derive(Debug, Clone)]
pub struct LocalCatalog {
    services: Arc<Vec<LocalService>>,
    by_id: Arc<HashMap<String, usize>>,
    published: Arc<osb::Catalog>,
}

/// One service's own checks: ids and names fit for the CLI, a description, a known and
/// configured backend, and a dashboard client no other service uses.
fn check_service(
    key: &str,
    s: &ServiceConfig,
    configured_backends: &[BackendKind],
    dashboard_ids: &mut HashSet<String>,
) -> anyhow::Result<()> {
    let w = &s.service;
    check_id(&format!("{key}.id"), &w.id)?;
    check_name(&format!("{key}.name"), &w.name)?;
    if w.description.trim().is_empty() {
        bail!("{key}.description: must not be empty");
    }
    if !configured_backends.contains(&s.backend) {
        bail!(
            "{key}.backend: {0} is used but backends.{0} is not configured",
            s.backend
        );
    }
    if let Some(dc) = &w.dashboard_client {
        if dc.id.is_empty() || dc.secret.is_empty() {
            bail!("{key}.dashboard_client: id and secret must not be empty");
        }
        if !dashboard_ids.insert(dc.id.clone()) {
            bail!("{key}.dashboard_client.id: {:?} is used twice", dc.id);
        }
    }
    Ok(())
}

/// A plan's limits, each required where its backend enforces it.
fn plan_limits(pkey: &str, p: &PlanConfig, backend: BackendKind) -> anyhow::Result<PlanLimits> {
    let logs = backend == BackendKind::Logs;
    let max_storage_mb = match p.max_storage_mb.filter(|v| *v > 0) {
        Some(mb) => mb,
        None if logs => 0,
        None => bail!("{pkey}.max_storage_mb: required, a positive number of megabytes"),
    };
    let positive = |value: Option<u64>, key: &str| match value {
        Some(v) if v > 0 => Ok(v),
        _ if !logs => Ok(0),
        _ => Err(anyhow::anyhow!(
            "{pkey}.{key}: required by logs, a positive number"
        )),
    };
    let max_log_lines = positive(p.max_log_lines, "max_log_lines")?;
    let max_log_bytes = positive(p.max_log_bytes, "max_log_bytes")?;
    let max_user_connections = match p.max_user_connections {
        Some(n) if n > 0 => n,
        Some(_) => bail!("{pkey}.max_user_connections: must be positive"),
        None if backend == BackendKind::Mysql => {
            bail!("{pkey}.max_user_connections: required by mysql, a positive number")
        }
        None => 0,
    };
    Ok(PlanLimits {
        max_storage_mb,
        max_user_connections,
        purge_on_deprovision: p.purge_on_deprovision,
        max_log_lines,
        max_log_bytes,
    })
}

/// A plan's parameter schemas, compiled, each with the parameters it declares.
fn plan_schemas(pkey: &str, p: &PlanConfig) -> anyhow::Result<HashMap<ParametersOf, Schema>> {
    let mut schemas = HashMap::new();
    for of in ParametersOf::ALL {
        let [a, b, c] = of.path();
        let Some(schema) = p
            .plan
            .schemas
            .as_ref()
            .and_then(|s| s.get(a)?.get(b)?.get(c))
        else {
            continue;
        };
        let validator = jsonschema::validator_for(schema).map_err(|e| {
            anyhow::anyhow!("{pkey}.schemas.{a}.{b}.{c}: not a valid JSON Schema: {e}")
        })?;
        let declared = schema
            .get("properties")
            .and_then(|p| p.as_object())
            .map(|p| p.keys().cloned().collect())
            .unwrap_or_default();
        schemas.insert(of, (validator, declared));
    }
    Ok(schemas)
}

impl LocalCatalog {
    /// Validates the configured services: unique ids and names, CLI-friendly names, every
    /// plan's limits present, a known backend that is configured.
    pub fn build(
        services: &[ServiceConfig],
        backends: &crate::config::Backends,
        links: &sso::DashboardLinks,
    ) -> anyhow::Result<LocalCatalog> {
        let mut ids = HashSet::new();
        let mut names = HashSet::new();
        let mut dashboard_ids = HashSet::new();
        let mut built = Vec::new();
        let configured_backends = backends.configured();
        for (i, s) in services.iter().enumerate() {
            let key = format!("catalog.services[{i}]");
            let w = &s.service;
            check_service(&key, s, &configured_backends, &mut dashboard_ids)?;
            if !ids.insert(w.id.clone()) {
                bail!("{key}.id: {:?} is used twice", w.id);
            }
            if !names.insert(w.name.clone()) {
                bail!("{key}.name: {:?} is used twice", w.name);
            }
            if s.plans.is_empty() {
                bail!("{key}.plans: a service needs at least one plan");
            }
            let mut plan_names = HashSet::new();
            let mut plans = Vec::new();
            for (j, p) in s.plans.iter().enumerate() {
                let pkey = format!("{key}.plans[{j}]");
                check_id(&format!("{pkey}.id"), &p.plan.id)?;
                check_name(&format!("{pkey}.name"), &p.plan.name)?;
                if !ids.insert(p.plan.id.clone()) {
                    bail!("{pkey}.id: {:?} is used twice in the catalog", p.plan.id);
                }
                if !plan_names.insert(p.plan.name.clone()) {
                    bail!("{pkey}.name: {:?} is used twice in {}", p.plan.name, w.name);
                }
                plans.push(LocalPlan {
                    wire: p.plan.clone(),
                    limits: plan_limits(&pkey, p, s.backend)?,
                    asynchronous: p.asynchronous,
                    schemas: Arc::new(plan_schemas(&pkey, p)?),
                });
            }
            let mut wire = w.clone();
            wire.plans = plans.iter().map(|p| p.wire.clone()).collect();
            // Cloud Controller honours a drain URL only from a service that requires it.
            let logs = s.backend == BackendKind::Logs;
            if logs && !wire.requires.iter().any(|r| r == "syslog_drain") {
                wire.requires.push("syslog_drain".into());
            }
            if let Some(dc) = wire
                .dashboard_client
                .as_mut()
                .filter(|dc| dc.redirect_uri.is_none())
            {
                dc.redirect_uri = Some(links.callback_url().to_string());
            }
            built.push(LocalService {
                wire,
                backend: s.backend,
                refuse_deprovision_with_bindings: s.refuse_deprovision_with_bindings,
                // A drain is for an app's logs: a log binding names its app.
                bindings_require_app: s.bindings_require_app || logs,
                plans,
                max_instances: backends.max_db_per_node(s.backend),
            });
        }
        let by_id = built
            .iter()
            .enumerate()
            .map(|(i, s)| (s.wire.id.clone(), i))
            .collect();
        let published = osb::Catalog {
            services: built.iter().map(|s| s.wire.clone()).collect(),
        };
        Ok(LocalCatalog {
            services: Arc::new(built),
            by_id: Arc::new(by_id),
            published: Arc::new(published),
        })
    }

    pub fn service(&self, service_id: &str) -> Option<&LocalService> {
        self.by_id.get(service_id).map(|&i| &self.services[i])
    }

    pub fn services(&self) -> &[LocalService] {
        &self.services
    }

    /// The catalog as `GET /v2/catalog` publishes it.
    pub fn published(&self) -> &osb::Catalog {
        &self.published
    }
}

fn check_id(key: &str, id: &str) -> anyhow::Result<()> {
    if id.is_empty() || id.len() > 255 || id.chars().any(|c| c.is_control()) {
        bail!("{key}: must be 1 to 255 printable characters");
    }
    Ok(())
}

fn check_name(key: &str, name: &str) -> anyhow::Result<()> {
    if !is_cli_name(name) {
        bail!("{key}: {name:?} must use only a-z, 0-9 and '-'");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_names() {
        for (name, ok) in [
            ("mysql-db", true),
            ("a1", true),
            ("MySQL", false),
            ("my_sql", false),
            ("my sql", false),
            ("-x", false),
            ("", false),
            ("é", false),
        ] {
            assert_eq!(is_cli_name(name), ok, "{name}");
        }
    }
}
