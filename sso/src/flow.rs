//! The OAuth2 authorization-code flow against UAA, the user's identity, and Cloud
//! Controller's answer on whether that user may manage an instance.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use oauth2::basic::BasicClient;
use oauth2::{
    AuthUrl, AuthorizationCode, ClientId, ClientSecret, CsrfToken, PkceCodeChallenge,
    PkceCodeVerifier, RedirectUrl, Scope, TokenResponse, TokenUrl,
};
use serde::Deserialize;
use url::Url;

use crate::session::{PendingLogin, Session};

/// Largest answer read from UAA or Cloud Controller, in bytes: their answers here are a few
/// hundred bytes; anything past this is a faulty or hostile peer.
pub const ANSWER_CAP: usize = 64 * 1024;

/// The scopes Cloud Foundry grants a dashboard client.
pub const SCOPES: &[&str] = &["openid", "cloud_controller_service_permissions.read"];

#[derive(Debug, thiserror::Error)]
pub enum SsoError {
    /// UAA's endpoints could not be learned from Cloud Controller.
    #[error("cannot discover UAA from Cloud Controller at {cc}: {detail}")]
    Discovery { cc: String, detail: String },
    /// The code was refused (expired, replayed, or not ours): the user logs in again.
    #[error("the login could not be completed: {0}")]
    CodeRejected(String),
    /// UAA did not say who the user is.
    #[error("the user's identity could not be read: {0}")]
    UserInfo(String),
    /// Cloud Controller did not answer the permission question.
    #[error("Cloud Controller could not be asked for permissions: {0}")]
    Permissions(String),
    /// Configuration that cannot work (bad URL).
    #[error("{0}")]
    Config(String),
}

/// Where UAA takes logins and issues tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uaa {
    /// Login server base (`/oauth/authorize`, `/logout.do`).
    pub authorization_endpoint: Url,
    /// UAA base (`/oauth/token`, `/userinfo`).
    pub token_endpoint: Url,
}

impl Uaa {
    pub fn new(authorization_endpoint: &str, token_endpoint: &str) -> Result<Uaa, SsoError> {
        let parse = |what: &str, s: &str| {
            Url::parse(s).map_err(|e| SsoError::Config(format!("{what} {s:?}: {e}")))
        };
        Ok(Uaa {
            authorization_endpoint: parse("authorization endpoint", authorization_endpoint)?,
            token_endpoint: parse("token endpoint", token_endpoint)?,
        })
    }

    fn at(base: &Url, path: &str) -> Url {
        let mut url = base.clone();
        let joined = format!("{}/{}", base.path().trim_end_matches('/'), path);
        url.set_path(&joined);
        url
    }

    pub fn authorize_url(&self) -> Url {
        Self::at(&self.authorization_endpoint, "oauth/authorize")
    }
    pub fn token_url(&self) -> Url {
        Self::at(&self.token_endpoint, "oauth/token")
    }
    pub fn userinfo_url(&self) -> Url {
        Self::at(&self.token_endpoint, "userinfo")
    }

    /// UAA's logout, returning the user to `redirect` afterwards.
    pub fn logout_url(&self, redirect: &Url, client_id: &str) -> Url {
        let mut url = Self::at(&self.authorization_endpoint, "logout.do");
        let mut query = url.query_pairs_mut();
        query.append_pair("redirect", redirect.as_str());
        if !client_id.is_empty() {
            query.append_pair("client_id", client_id);
        }
        drop(query);
        url
    }
}

/// Learns UAA's endpoints from Cloud Controller's `/v2/info`.
pub async fn discover(http: &reqwest::Client, cloud_controller: &Url) -> Result<Uaa, SsoError> {
    #[derive(Deserialize)]
    struct Info {
        authorization_endpoint: String,
        token_endpoint: String,
    }
    let fail = |detail: String| SsoError::Discovery {
        cc: cloud_controller.to_string(),
        detail,
    };
    let info_url = Uaa::at(cloud_controller, "v2/info");
    let response = http
        .get(info_url)
        .send()
        .await
        .map_err(|e| fail(e.without_url().to_string()))?;
    if !response.status().is_success() {
        return Err(fail(format!("status {}", response.status())));
    }
    let info: Info = upstreams::bounded::json(response, ANSWER_CAP)
        .await
        .map_err(fail)?;
    Uaa::new(&info.authorization_endpoint, &info.token_endpoint)
}

/// A service's dashboard client, as registered in UAA through the catalog.
#[derive(Clone)]
pub struct DashboardClient {
    pub id: String,
    pub secret: String,
    pub redirect_uri: Url,
}

impl std::fmt::Debug for DashboardClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DashboardClient")
            .field("id", &self.id)
            .field("redirect_uri", &self.redirect_uri.as_str())
            .finish_non_exhaustive()
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Starts a login: where to send the user, and what to remember until the callback
/// (a CSRF `state` and the PKCE verifier).
pub fn begin(
    uaa: &Uaa,
    client: &DashboardClient,
    instance_id: &str,
    return_path: &str,
) -> Result<(Url, PendingLogin), SsoError> {
    let oauth = BasicClient::new(ClientId::new(client.id.clone()))
        .set_auth_uri(AuthUrl::from_url(uaa.authorize_url()))
        .set_redirect_uri(RedirectUrl::from_url(client.redirect_uri.clone()));
    let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
    let (url, state) = oauth
        .authorize_url(CsrfToken::new_random)
        .add_scopes(SCOPES.iter().map(|s| Scope::new(s.to_string())))
        .set_pkce_challenge(challenge)
        .url();
    let pending = PendingLogin {
        state: state.secret().clone(),
        pkce_verifier: verifier.secret().clone(),
        instance_id: instance_id.to_string(),
        return_path: return_path.to_string(),
        created_at: now(),
    };
    Ok((url, pending))
}

/// Finishes a login: exchanges the code (with the PKCE verifier and the dashboard
/// client's credentials) and reads who the user is.
pub async fn complete(
    http: &reqwest::Client,
    uaa: &Uaa,
    client: &DashboardClient,
    pending: PendingLogin,
    code: &str,
    lifetime: Duration,
) -> Result<Session, SsoError> {
    let oauth = BasicClient::new(ClientId::new(client.id.clone()))
        .set_client_secret(ClientSecret::new(client.secret.clone()))
        .set_token_uri(TokenUrl::from_url(uaa.token_url()))
        .set_redirect_uri(RedirectUrl::from_url(client.redirect_uri.clone()));
    let token = oauth
        .exchange_code(AuthorizationCode::new(code.to_string()))
        .set_pkce_verifier(PkceCodeVerifier::new(pending.pkce_verifier))
        .request_async(&upstreams::bounded::OAuthClient {
            http,
            cap: ANSWER_CAP,
        })
        .await
        .map_err(|e| SsoError::CodeRejected(describe_token_error(&e)))?;
    let access_token = token.access_token().secret().clone();
    let token_lifetime = token.expires_in().unwrap_or(Duration::from_secs(600));
    let user = userinfo(http, uaa, &access_token).await?;
    let issued = now();
    Ok(Session {
        user_id: user.user_id,
        user_name: user.user_name,
        access_token,
        expires_at: issued.saturating_add(token_lifetime.min(lifetime).as_secs()),
        created_at: issued,
        login_server: String::new(),
        cloud_controller: String::new(),
    })
}

/// The token error without anything secret in it.
fn describe_token_error<E: std::error::Error>(e: &E) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text = format!("{text}: {s}");
        source = s.source();
    }
    text.chars().take(300).collect()
}

struct User {
    user_id: String,
    user_name: String,
}

/// UAA's `/userinfo` (`user_id`, `user_name`; plain OpenID `sub` as a fallback).
async fn userinfo(http: &reqwest::Client, uaa: &Uaa, token: &str) -> Result<User, SsoError> {
    let response = http
        .get(uaa.userinfo_url())
        .bearer_auth(token)
        .send()
        .await
        .map_err(|e| SsoError::UserInfo(e.without_url().to_string()))?;
    if !response.status().is_success() {
        return Err(SsoError::UserInfo(format!("status {}", response.status())));
    }
    let info: serde_json::Value = upstreams::bounded::json(response, ANSWER_CAP)
        .await
        .map_err(SsoError::UserInfo)?;
    let field = |names: &[&str]| {
        names
            .iter()
            .find_map(|n| info.get(*n).and_then(|v| v.as_str()))
            .map(str::to_string)
    };
    let user_id =
        field(&["user_id", "sub"]).ok_or_else(|| SsoError::UserInfo("no user_id".into()))?;
    let user_name = field(&["user_name", "email", "name"]).unwrap_or_else(|| user_id.clone());
    Ok(User { user_id, user_name })
}

/// What Cloud Controller lets the user do with an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct Permissions {
    pub manage: bool,
    #[serde(default)]
    pub read: bool,
}

/// Asks Cloud Controller, with the user's own token: v3 first, v2 where v3 is missing.
pub async fn permissions(
    http: &reqwest::Client,
    cloud_controller: &Url,
    instance_id: &str,
    access_token: &str,
) -> Result<Permissions, SsoError> {
    let mut last = String::new();
    for version in ["v3", "v2"] {
        let mut url = cloud_controller.clone();
        url.path_segments_mut()
            .map_err(|_| SsoError::Permissions("Cloud Controller URL cannot be a base".into()))?
            .pop_if_empty()
            .extend([version, "service_instances", instance_id, "permissions"]);
        let response = http
            .get(url)
            .bearer_auth(access_token)
            .send()
            .await
            .map_err(|e| SsoError::Permissions(e.without_url().to_string()))?;
        match response.status().as_u16() {
            200 => {
                return upstreams::bounded::json(response, ANSWER_CAP)
                    .await
                    .map_err(SsoError::Permissions)
            }
            // Not visible to this user at all.
            403 => {
                return Ok(Permissions {
                    manage: false,
                    read: false,
                })
            }
            404 => last = format!("{version} answered 404"),
            status => {
                return Err(SsoError::Permissions(format!(
                    "{version} answered {status}"
                )))
            }
        }
    }
    Err(SsoError::Permissions(last))
}

/// Only relative paths on this broker's dashboards may be returned to after login.
pub fn safe_return_path(path: &str) -> Option<String> {
    let ok = path.starts_with("/dashboard/")
        && !path.starts_with("//")
        && !path.contains('\\')
        && !path.contains("://")
        && !path.chars().any(|c| c.is_control() || c.is_whitespace());
    ok.then(|| path.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn return_paths_stay_on_this_broker() {
        for (path, ok) in [
            ("/dashboard/instances/abc", true),
            ("/dashboard/instances/abc?tab=1", true),
            ("//evil.example/dashboard/", false),
            ("https://evil.example/dashboard/", false),
            ("/dashboard/../../x\\y", false),
            ("/v2/catalog", false),
            ("/dashboard/\nSet-Cookie: x", false),
            ("", false),
        ] {
            assert_eq!(safe_return_path(path).is_some(), ok, "{path:?}");
        }
    }

    #[test]
    fn uaa_paths() {
        let uaa = Uaa::new("https://login.sys.example/", "https://uaa.sys.example/base").unwrap();
        assert_eq!(
            uaa.authorize_url().as_str(),
            "https://login.sys.example/oauth/authorize"
        );
        assert_eq!(
            uaa.token_url().as_str(),
            "https://uaa.sys.example/base/oauth/token"
        );
        assert_eq!(
            uaa.userinfo_url().as_str(),
            "https://uaa.sys.example/base/userinfo"
        );
        let out = uaa.logout_url(&Url::parse("https://b.example/x").unwrap(), "c1");
        assert_eq!(
            out.as_str(),
            "https://login.sys.example/logout.do?redirect=https%3A%2F%2Fb.example%2Fx&client_id=c1"
        );
    }

    #[test]
    fn begin_uses_state_and_pkce() {
        let uaa = Uaa::new("https://login.example", "https://uaa.example").unwrap();
        let client = DashboardClient {
            id: "dash".into(),
            secret: "never-in-urls".into(),
            redirect_uri: Url::parse("https://broker.example/dashboard/callback").unwrap(),
        };
        let (url, pending) = begin(&uaa, &client, "i-1", "/dashboard/instances/i-1").unwrap();
        let query: std::collections::HashMap<_, _> = url.query_pairs().into_owned().collect();
        assert_eq!(query["client_id"], "dash");
        assert_eq!(query["response_type"], "code");
        assert_eq!(query["state"], pending.state);
        assert_eq!(query["code_challenge_method"], "S256");
        assert_eq!(
            query["scope"],
            "openid cloud_controller_service_permissions.read"
        );
        assert!(!url.as_str().contains("never-in-urls"));
        assert!(!url.as_str().contains(&pending.pkce_verifier));
    }
}
