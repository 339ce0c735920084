//! Sessions that live in the browser, sealed: cookies encrypted and authenticated
//! (AES-256-GCM, key derived from the operator's session secret), so every broker process
//! behind a load balancer can read them and nobody else can read or forge them.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cookie::{Cookie, CookieJar, Key, SameSite};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

const SESSION: &str = "brokerage_dashboard";
const LOGIN: &str = "brokerage_login";
/// How long a started login may take.
const LOGIN_LIFETIME: Duration = Duration::from_secs(600);
const PATH: &str = "/dashboard";

/// A logged-in user. The access token is the user's own, used to ask Cloud Controller.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Session {
    pub user_id: String,
    pub user_name: String,
    pub access_token: String,
    /// Unix seconds; past it the user logs in again.
    pub expires_at: u64,
    pub created_at: u64,
    /// UAA's login server the user signed in at, for logout.
    #[serde(default)]
    pub login_server: String,
    /// The Cloud Controller whose instance the user signed in for: the session (and its
    /// token) is used with that one only.
    #[serde(default)]
    pub cloud_controller: String,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("user_id", &self.user_id)
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

/// A login between the redirect to UAA and the callback.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PendingLogin {
    pub state: String,
    pub pkce_verifier: String,
    pub instance_id: String,
    pub return_path: String,
    pub created_at: u64,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[derive(Debug, thiserror::Error)]
#[error("the session secret must be at least 32 characters")]
pub struct WeakSecret;

/// Seals and opens the dashboard's cookies.
pub struct Sessions {
    key: Key,
    secure: bool,
    lifetime: Duration,
}

impl Sessions {
    /// `secure`: the broker is reached over https, so cookies say `Secure`.
    pub fn new(secret: &str, secure: bool, lifetime: Duration) -> Result<Self, WeakSecret> {
        if secret.len() < 32 {
            return Err(WeakSecret);
        }
        Ok(Sessions {
            key: Key::derive_from(secret.as_bytes()),
            secure,
            lifetime,
        })
    }

    pub fn lifetime(&self) -> Duration {
        self.lifetime
    }

    fn seal<T: Serialize>(&self, name: &'static str, value: &T, max_age: Duration) -> String {
        let mut jar = CookieJar::new();
        let mut cookie = Cookie::new(name, serde_json::to_string(value).expect("serializes"));
        cookie.set_http_only(true);
        cookie.set_same_site(SameSite::Lax);
        cookie.set_secure(self.secure);
        cookie.set_path(PATH);
        cookie.set_max_age(cookie::time::Duration::seconds(max_age.as_secs() as i64));
        jar.private_mut(&self.key).add(cookie);
        jar.get(name).expect("just added").encoded().to_string()
    }

    fn open<T: DeserializeOwned>(&self, name: &str, cookie_header: Option<&str>) -> Option<T> {
        let header = cookie_header?;
        let raw = Cookie::split_parse_encoded(header.to_string())
            .filter_map(Result::ok)
            .find(|c| c.name() == name)?;
        let opened = self.key_jar().decrypt(raw.into_owned())?;
        serde_json::from_str(opened.value()).ok()
    }

    fn key_jar(&self) -> cookie::PrivateJar<&CookieJar> {
        // A private "view" used only to decrypt: the jar itself stays empty.
        static EMPTY: std::sync::OnceLock<CookieJar> = std::sync::OnceLock::new();
        EMPTY.get_or_init(CookieJar::new).private(&self.key)
    }

    fn clear(&self, name: &'static str) -> String {
        let mut cookie = Cookie::new(name, "");
        cookie.set_path(PATH);
        cookie.set_http_only(true);
        cookie.set_same_site(SameSite::Lax);
        cookie.set_secure(self.secure);
        cookie.make_removal();
        cookie.to_string()
    }

    /// `Set-Cookie` for a session; it lasts as long as the session does.
    pub fn seal_session(&self, session: &Session) -> String {
        let left = session.expires_at.saturating_sub(now());
        self.seal(SESSION, session, Duration::from_secs(left))
    }

    /// The session in a `Cookie` header, if it is ours, untampered and not expired.
    pub fn open_session(&self, cookie_header: Option<&str>) -> Option<Session> {
        self.open::<Session>(SESSION, cookie_header)
            .filter(|s| s.expires_at > now() && now() < s.created_at + self.lifetime.as_secs())
    }

    pub fn clear_session(&self) -> String {
        self.clear(SESSION)
    }

    pub fn seal_login(&self, login: &PendingLogin) -> String {
        self.seal(LOGIN, login, LOGIN_LIFETIME)
    }

    /// The pending login, if it is ours and recent.
    pub fn open_login(&self, cookie_header: Option<&str>) -> Option<PendingLogin> {
        self.open::<PendingLogin>(LOGIN, cookie_header)
            .filter(|l| now() < l.created_at + LOGIN_LIFETIME.as_secs())
    }

    pub fn clear_login(&self) -> String {
        self.clear(LOGIN)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sessions() -> Sessions {
        Sessions::new(
            "a-session-secret-of-at-least-32-chars!",
            true,
            Duration::from_secs(3600),
        )
        .unwrap()
    }

    fn session(expires_in: u64) -> Session {
        Session {
            user_id: "u-1".into(),
            user_name: "alice".into(),
            access_token: "secret-access-token".into(),
            expires_at: now() + expires_in,
            created_at: now(),
            login_server: "https://login.example".into(),
            cloud_controller: "https://api.example".into(),
        }
    }

    fn cookie_header(set_cookie: &str) -> String {
        set_cookie.split(';').next().unwrap().to_string()
    }

    #[test]
    fn sealed_sessions_round_trip_and_hide_the_token() {
        let s = sessions();
        let set = s.seal_session(&session(600));
        assert!(!set.contains("secret-access-token"));
        assert!(!set.contains("alice"));
        for flag in [
            "HttpOnly",
            "SameSite=Lax",
            "Secure",
            "Path=/dashboard",
            "Max-Age=",
        ] {
            assert!(set.contains(flag), "{set} lacks {flag}");
        }
        let opened = s.open_session(Some(&cookie_header(&set))).unwrap();
        assert_eq!(opened.user_name, "alice");
        assert!(!format!("{opened:?}").contains("secret-access-token"));
    }

    #[test]
    fn tampered_foreign_and_expired_sessions_are_refused() {
        let s = sessions();
        let header = cookie_header(&s.seal_session(&session(600)));
        let (name, value) = header.split_once('=').unwrap();
        let mut bytes = value.as_bytes().to_vec();
        let mid = bytes.len() / 2;
        bytes[mid] = if bytes[mid] == b'A' { b'B' } else { b'A' };
        let tampered = format!("{name}={}", String::from_utf8(bytes).unwrap());
        assert!(s.open_session(Some(&tampered)).is_none());
        let other = Sessions::new(
            "another-secret-also-32-characters-long",
            true,
            Duration::from_secs(3600),
        )
        .unwrap();
        assert!(other.open_session(Some(&header)).is_none());
        assert!(s
            .open_session(Some("brokerage_dashboard={\"user_id\":\"x\"}"))
            .is_none());
        let expired = cookie_header(&s.seal_session(&Session {
            expires_at: now() - 1,
            ..session(0)
        }));
        assert!(s.open_session(Some(&expired)).is_none());
        assert!(s.open_session(None).is_none());
    }

    #[test]
    fn weak_secrets_are_refused() {
        assert!(Sessions::new("short", false, Duration::from_secs(1)).is_err());
    }
}
