//! The instance dashboard behind single sign-on: who may see what, and what they see.
//! The HTTP layer renders the outcomes; this module decides them.
//!
//! Visit: no session → a login at UAA (state + PKCE in a sealed cookie). Session →
//! Cloud Controller is asked, with the user's token, whether they may manage the
//! instance: only `manage: true` opens the dashboard. Callback: the sealed login must match
//! the `state`; the code is exchanged with the service's dashboard client.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use url::Url;

use crate::broker::Broker;
use crate::config::api_host;
use crate::store::records::{self};
use crate::store::{InstanceRecord, OpState};

/// What to answer a browser.
#[derive(Debug)]
pub enum Outcome {
    Redirect {
        location: String,
        cookies: Vec<String>,
    },
    Page {
        status: u16,
        page: Page,
        cookies: Vec<String>,
    },
}

#[derive(Debug)]
pub enum Page {
    Dashboard(Box<View>),
    Message { title: String, text: String },
}

/// Everything the dashboard page shows; never credentials.
#[derive(Debug)]
pub struct View {
    pub instance_id: String,
    pub service_name: String,
    pub plan_name: String,
    pub state: String,
    pub created_at: DateTime<Utc>,
    pub user_name: String,
    pub bindings: Vec<BindingRow>,
    pub details: Vec<(String, String)>,
    pub logout_path: String,
    /// A log instance's most recent lines, newest last; the page then reloads itself.
    pub logs: Option<Vec<crate::logs::Line>>,
}

#[derive(Debug)]
pub struct BindingRow {
    pub id: String,
    pub app_guid: Option<String>,
    pub created_at: DateTime<Utc>,
}

pub struct Dashboard {
    broker: Broker,
    sso: Arc<sso::Sso>,
    links: sso::DashboardLinks,
    platforms: Arc<Platforms>,
}

/// The Cloud Controllers the operator allows: `sso.cloud_controller_url` and
/// `sso.allowed_cloud_controllers`. The broker connects to no other platform host, whatever
/// a provision's `X-Api-Info-Location` says.
pub struct Platforms {
    configured: Option<Url>,
    allowed: Vec<String>,
    scheme: String,
}

impl Platforms {
    pub fn new(sso: &crate::config::SsoConfig) -> anyhow::Result<Self> {
        let configured = sso
            .cloud_controller_url
            .as_deref()
            .map(Url::parse)
            .transpose()?;
        let mut allowed: Vec<String> = sso
            .allowed_cloud_controllers
            .iter()
            .filter_map(|h| api_host(h))
            .collect();
        if let Some(host) = configured
            .as_ref()
            .and_then(|cc| api_host(&cc[url::Position::BeforeHost..url::Position::AfterPort]))
        {
            allowed.push(host);
        }
        Ok(Platforms {
            configured,
            allowed,
            scheme: sso.api_info_scheme.clone(),
        })
    }

    /// What a provision's `X-Api-Info-Location` is recorded as: its host, when allowed.
    pub fn admit(&self, location: &str) -> Option<String> {
        let host = api_host(location).filter(|h| self.allowed.contains(h));
        if host.is_none() {
            tracing::warn!(
                location = %location.chars().filter(|c| !c.is_control()).take(200).collect::<String>(),
                "X-Api-Info-Location names a host the operator did not allow (sso.cloud_controller_url, sso.allowed_cloud_controllers): ignored"
            );
        }
        host
    }

    /// The Cloud Controller to ask about an instance: the allowed one that provisioned it,
    /// or the configured one.
    pub fn cloud_controller(&self, recorded: Option<&str>) -> Option<Url> {
        recorded
            .and_then(api_host)
            .filter(|h| self.allowed.contains(h))
            .and_then(|host| Url::parse(&format!("{}://{host}", self.scheme)).ok())
            .or_else(|| self.configured.clone())
    }
}

/// The most log lines a dashboard page shows.
const SHOWN_LINES: usize = 200;

fn message(status: u16, title: &str, text: impl Into<String>) -> Outcome {
    Outcome::Page {
        status,
        page: Page::Message {
            title: title.into(),
            text: text.into(),
        },
        cookies: Vec::new(),
    }
}

fn no_cloud_controller() -> Outcome {
    message(
        503,
        "Unavailable",
        "The broker does not know which Cloud Controller to ask.",
    )
}

fn not_found() -> Outcome {
    message(
        404,
        "No such dashboard",
        "There is no service instance with a dashboard here.",
    )
}

impl Dashboard {
    pub fn new(
        broker: Broker,
        sso: Arc<sso::Sso>,
        links: sso::DashboardLinks,
        platforms: Arc<Platforms>,
    ) -> Self {
        Dashboard {
            broker,
            sso,
            links,
            platforms,
        }
    }

    /// A provisioned local instance whose service has a dashboard client.
    async fn instance(&self, id: &str) -> Result<(InstanceRecord, sso::DashboardClient), Outcome> {
        if crate::broker::check_id("instance_id", id).is_err() {
            return Err(not_found());
        }
        let stored = records::load::<InstanceRecord>(&**self.broker.store(), id)
            .await
            .map_err(|_| {
                message(
                    503,
                    "Unavailable",
                    "The broker cannot read its records just now.",
                )
            })?;
        let Some(record) = stored
            .map(|s| s.record)
            .filter(|r| r.provisioned && r.upstream.is_none())
        else {
            return Err(not_found());
        };
        let Some(dc) = self
            .broker
            .catalog()
            .service(&record.service_id)
            .and_then(|s| s.wire.dashboard_client.clone())
        else {
            return Err(not_found());
        };
        let redirect = dc
            .redirect_uri
            .as_deref()
            .and_then(|u| Url::parse(u).ok())
            .unwrap_or_else(|| self.links.callback_url());
        Ok((
            record,
            sso::DashboardClient {
                id: dc.id,
                secret: dc.secret,
                redirect_uri: redirect,
            },
        ))
    }

    async fn uaa(&self, cc: &Url) -> Result<sso::Uaa, Outcome> {
        self.sso.uaa(cc).await.map_err(|e| {
            tracing::warn!(error = %e, "UAA discovery failed");
            message(
                502,
                "Login unavailable",
                "The platform's login server cannot be found just now.",
            )
        })
    }

    /// The Cloud Controller that provisioned the instance (if allowed), or the configured one.
    fn cloud_controller(&self, record: &InstanceRecord) -> Option<Url> {
        self.platforms
            .cloud_controller(record.api_info_location.as_deref())
    }

    pub async fn visit(&self, id: &str, path_and_query: &str, cookies: Option<&str>) -> Outcome {
        let (record, client) = match self.instance(id).await {
            Ok(found) => found,
            Err(outcome) => return outcome,
        };
        let Some(cc) = self.cloud_controller(&record) else {
            return no_cloud_controller();
        };
        // A session works only with the Cloud Controller it was issued for: its token is
        // never shown to another.
        let session = self
            .sso
            .sessions()
            .open_session(cookies)
            .filter(|s| s.cloud_controller == cc.as_str());
        let Some(session) = session else {
            let uaa = match self.uaa(&cc).await {
                Ok(uaa) => uaa,
                Err(outcome) => return outcome,
            };
            let return_path = sso::flow::safe_return_path(path_and_query)
                .unwrap_or_else(|| self.links.dashboard_url(id).path().to_string());
            return match sso::flow::begin(&uaa, &client, id, &return_path) {
                Ok((url, pending)) => Outcome::Redirect {
                    location: url.to_string(),
                    cookies: vec![self.sso.sessions().seal_login(&pending)],
                },
                Err(e) => {
                    tracing::error!(error = %e, "cannot start a login");
                    message(500, "Login unavailable", "The login could not be started.")
                }
            };
        };
        let permissions = match self.sso.permissions(&cc, id, &session).await {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(instance_id = id, error = %e, "permission check failed");
                return message(
                    502,
                    "Cannot check your permissions",
                    "Cloud Controller did not answer whether you may manage this instance. No access was granted; try again later.",
                );
            }
        };
        if !permissions.manage {
            tracing::info!(instance_id = id, user = %session.user_id, "dashboard refused");
            return message(
                403,
                "Not allowed",
                format!(
                    "{} may not manage this service instance{}.",
                    session.user_name,
                    if permissions.read {
                        " (read access is not enough)"
                    } else {
                        ""
                    }
                ),
            );
        }
        match self.view(&record, &session.user_name).await {
            Ok(view) => Outcome::Page {
                status: 200,
                page: Page::Dashboard(Box::new(view)),
                cookies: Vec::new(),
            },
            Err(outcome) => outcome,
        }
    }

    async fn view(&self, record: &InstanceRecord, user_name: &str) -> Result<View, Outcome> {
        let service = self
            .broker
            .catalog()
            .service(&record.service_id)
            .ok_or_else(not_found)?;
        let plan = service.plan(&record.plan_id).ok_or_else(not_found)?;
        let bindings = records::bindings_of(&**self.broker.store(), &record.id)
            .await
            .map_err(|_| {
                message(
                    503,
                    "Unavailable",
                    "The broker cannot read its records just now.",
                )
            })?
            .into_iter()
            .filter(|b| b.record.credentials.is_some())
            .map(|b| BindingRow {
                id: b.record.id,
                app_guid: b.record.app_guid,
                created_at: b.record.created_at,
            })
            .collect();
        let op = &record.operation;
        let state = match op.effective_state() {
            OpState::InProgress => format!("{:?} in progress", op.kind).to_lowercase(),
            OpState::Failed => format!(
                "ready; the last {:?} failed: {}",
                op.kind,
                op.effective_description().unwrap_or_default()
            )
            .to_lowercase(),
            OpState::Succeeded => "ready".into(),
        };
        let mut details = match self.broker.backends().get(&service.backend) {
            Some(backend) => {
                let described = async {
                    let mut rows = backend.describe_instance(&record.id, plan.limits).await?;
                    if let Some(used) = backend.usage_bytes(&record.id).await? {
                        let max = plan.limits.max_storage_mb;
                        rows.push(("Storage used".into(), crate::backend::storage(used, max)));
                    }
                    Ok::<_, crate::backend::BackendError>(rows)
                };
                described.await.unwrap_or_else(|e| {
                    vec![("Backend".into(), format!("unavailable: {}", e.public()))]
                })
            }
            None => Vec::new(),
        };
        let logs = match (self.broker.logs(), service.backend) {
            (Some(logs), crate::config::BackendKind::Logs) => {
                let book = logs.book(&record.id).await.ok().flatten();
                let (mut lines, dropped): (Vec<_>, u64) = book.map_or((Vec::new(), 0), |b| {
                    (b.lines.into(), b.dropped.values().sum())
                });
                details.push(("Lines kept".into(), lines.len().to_string()));
                details.push(("Lines dropped".into(), dropped.to_string()));
                let shown = lines.len().saturating_sub(SHOWN_LINES);
                Some(lines.split_off(shown))
            }
            _ => None,
        };
        Ok(View {
            logs,
            instance_id: record.id.clone(),
            service_name: service.wire.name.clone(),
            plan_name: plan.wire.name.clone(),
            state,
            created_at: record.created_at,
            user_name: user_name.to_string(),
            bindings,
            details,
            logout_path: "/dashboard/logout".into(),
        })
    }

    pub async fn callback(
        &self,
        code: Option<&str>,
        state: Option<&str>,
        error: Option<&str>,
        cookies: Option<&str>,
    ) -> Outcome {
        let sessions = self.sso.sessions();
        let Some(pending) = sessions.open_login(cookies) else {
            return message(
                400,
                "Login expired",
                "This login was not started here, or took too long. Open the dashboard again.",
            );
        };
        let bad = |text: &str| {
            let mut outcome = message(400, "Login failed", text);
            if let Outcome::Page { cookies, .. } = &mut outcome {
                cookies.push(sessions.clear_login());
            }
            outcome
        };
        if let Some(error) = error {
            tracing::info!(error, "UAA refused the login");
            return bad("The login server refused the login.");
        }
        let (Some(code), Some(state)) = (code, state) else {
            return bad("The login server's answer is incomplete.");
        };
        let state_matches: bool =
            subtle::ConstantTimeEq::ct_eq(state.as_bytes(), pending.state.as_bytes()).into();
        if !state_matches {
            return bad("The login's state does not match: it was not started here.");
        }
        let instance_id = pending.instance_id.clone();
        let return_path = sso::flow::safe_return_path(&pending.return_path)
            .unwrap_or_else(|| self.links.dashboard_url(&instance_id).path().to_string());
        let (record, client) = match self.instance(&instance_id).await {
            Ok(found) => found,
            Err(outcome) => return outcome,
        };
        let Some(cc) = self.cloud_controller(&record) else {
            return no_cloud_controller();
        };
        let uaa = match self.uaa(&cc).await {
            Ok(uaa) => uaa,
            Err(outcome) => return outcome,
        };
        match self.sso.complete(&uaa, &client, pending, code).await {
            Ok(mut session) => {
                session.cloud_controller = cc.to_string();
                tracing::info!(user = %session.user_id, instance_id = %instance_id, "dashboard login");
                Outcome::Redirect {
                    location: return_path,
                    cookies: vec![sessions.seal_session(&session), sessions.clear_login()],
                }
            }
            Err(sso::SsoError::CodeRejected(detail)) => {
                tracing::info!(%detail, "authorization code refused");
                bad("The login could not be completed (the code was refused). Open the dashboard again.")
            }
            Err(e) => {
                tracing::warn!(error = %e, "login failed");
                message(
                    502,
                    "Login failed",
                    "The login server did not complete the login.",
                )
            }
        }
    }

    /// Ends the session and sends the user through UAA's logout, then back to a page of
    /// this broker (never elsewhere).
    pub fn logout(&self, return_to: Option<&str>, cookies: Option<&str>) -> Outcome {
        let sessions = self.sso.sessions();
        let mut back = self.links.callback_url();
        back.set_path(
            return_to
                .and_then(sso::flow::safe_return_path)
                .as_deref()
                .unwrap_or("/dashboard/logged-out")
                .split('?')
                .next()
                .unwrap_or("/dashboard/logged-out"),
        );
        let session = sessions.open_session(cookies);
        let location = match session
            .as_ref()
            .and_then(|s| sso::Uaa::new(&s.login_server, &s.login_server).ok())
        {
            Some(uaa) => uaa.logout_url(&back, "").to_string(),
            None => back.to_string(),
        };
        Outcome::Redirect {
            location,
            cookies: vec![sessions.clear_session(), sessions.clear_login()],
        }
    }
}
