//! # Layout
//! Dashboard single sign-on for Brokerage. Holds no HTTP framework types.
//! - [`DashboardLinks`]: the broker's external URL and the dashboard and callback URLs
//!   derived from it, which the catalog's `dashboard_client` and a provision's
//!   `dashboard_url` publish.
//! - [`flow`]: the OAuth2 authorization-code flow against UAA (state, PKCE), the user's
//!   identity, UAA discovery from Cloud Controller, and Cloud Controller's permission check.
//! - [`session`]: sessions and pending logins sealed into cookies.

pub mod flow;
pub mod session;

/// What the dashboard needs from the operator.
#[derive(Debug, Clone)]
pub struct SsoSettings {
    /// UAA endpoints when set; otherwise discovered from each Cloud Controller.
    pub uaa: Option<Uaa>,
    pub session_secret: String,
    pub session_lifetime: std::time::Duration,
    /// The broker is reached over https: cookies are `Secure`.
    pub secure_cookies: bool,
    /// Timeout of every call to UAA and Cloud Controller.
    pub timeout: std::time::Duration,
}

/// Dashboard SSO: one HTTP client, UAA endpoints per Cloud Controller (discovered once
/// and cached), and the sealed sessions.
pub struct Sso {
    http: reqwest::Client,
    explicit: Option<Uaa>,
    discovered: moka::future::Cache<String, Uaa>,
    sessions: Sessions,
}

impl Sso {
    pub fn new(settings: SsoSettings) -> Result<Sso, SsoError> {
        let http = reqwest::Client::builder()
            .timeout(settings.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| SsoError::Config(e.to_string()))?;
        let sessions = Sessions::new(
            &settings.session_secret,
            settings.secure_cookies,
            settings.session_lifetime,
        )
        .map_err(|e| SsoError::Config(e.to_string()))?;
        Ok(Sso {
            http,
            explicit: settings.uaa,
            discovered: moka::future::Cache::builder()
                .time_to_live(std::time::Duration::from_secs(600))
                .max_capacity(1000)
                .build(),
            sessions,
        })
    }

    pub fn sessions(&self) -> &Sessions {
        &self.sessions
    }

    /// UAA for users of this Cloud Controller.
    pub async fn uaa(&self, cloud_controller: &Url) -> Result<Uaa, SsoError> {
        if let Some(uaa) = &self.explicit {
            return Ok(uaa.clone());
        }
        let key = cloud_controller.to_string();
        if let Some(uaa) = self.discovered.get(&key).await {
            return Ok(uaa);
        }
        let uaa = flow::discover(&self.http, cloud_controller).await?;
        self.discovered.insert(key, uaa.clone()).await;
        Ok(uaa)
    }

    pub async fn complete(
        &self,
        uaa: &Uaa,
        client: &DashboardClient,
        pending: PendingLogin,
        code: &str,
    ) -> Result<Session, SsoError> {
        let mut session = flow::complete(
            &self.http,
            uaa,
            client,
            pending,
            code,
            self.sessions.lifetime(),
        )
        .await?;
        session.login_server = uaa.authorization_endpoint.to_string();
        Ok(session)
    }

    pub async fn permissions(
        &self,
        cloud_controller: &Url,
        instance_id: &str,
        session: &Session,
    ) -> Result<Permissions, SsoError> {
        flow::permissions(
            &self.http,
            cloud_controller,
            instance_id,
            &session.access_token,
        )
        .await
    }
}

pub use flow::{DashboardClient, Permissions, SsoError, Uaa};
pub use session::{PendingLogin, Session, Sessions};

use url::Url;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LinkError {
    #[error("external_url {0:?} is not an absolute http(s) URL")]
    NotHttp(String),
}

/// Where people reach this broker's dashboards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DashboardLinks {
    base: Url,
}

impl DashboardLinks {
    pub fn new(external_url: &str) -> Result<Self, LinkError> {
        let bad = || LinkError::NotHttp(external_url.to_string());
        let mut base = Url::parse(external_url).map_err(|_| bad())?;
        if !matches!(base.scheme(), "http" | "https") || base.cannot_be_a_base() {
            return Err(bad());
        }
        if !base.path().ends_with('/') {
            let path = format!("{}/", base.path());
            base.set_path(&path);
        }
        base.set_query(None);
        base.set_fragment(None);
        Ok(Self { base })
    }

    /// Whether session cookies must carry `Secure`.
    pub fn is_https(&self) -> bool {
        self.base.scheme() == "https"
    }

    /// `<external>/dashboard/instances/<id>`, the id escaped as one path segment.
    pub fn dashboard_url(&self, instance_id: &str) -> Url {
        let mut url = self.base.clone();
        url.path_segments_mut()
            .expect("checked in new")
            .pop_if_empty()
            .extend(["dashboard", "instances", instance_id]);
        url
    }

    /// The OAuth2 redirect URI registered for every local dashboard client.
    pub fn callback_url(&self) -> Url {
        let mut url = self.base.clone();
        url.path_segments_mut()
            .expect("checked in new")
            .pop_if_empty()
            .extend(["dashboard", "callback"]);
        url
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dashboard_urls_escape_the_id_and_keep_a_base_path() {
        let links = DashboardLinks::new("https://broker.example.com/base").unwrap();
        assert_eq!(
            links.dashboard_url("a/b?c").as_str(),
            "https://broker.example.com/base/dashboard/instances/a%2Fb%3Fc"
        );
        assert_eq!(
            links.callback_url().as_str(),
            "https://broker.example.com/base/dashboard/callback"
        );
        assert!(links.is_https());
        let plain = DashboardLinks::new("http://127.0.0.1:8080").unwrap();
        assert_eq!(
            plain.dashboard_url("x").as_str(),
            "http://127.0.0.1:8080/dashboard/instances/x"
        );
    }

    #[test]
    fn rejects_what_is_not_an_http_base() {
        for bad in [
            "",
            "broker.example.com",
            "ftp://x/",
            "mailto:a@b",
            "data:text/plain,x",
        ] {
            assert!(DashboardLinks::new(bad).is_err(), "{bad}");
        }
    }
}
