//! The operator console's session: the token of a console login, kept in an `HttpOnly`,
//! `SameSite=Strict` cookie scoped to the console's path, which [`guard`](super::guard)
//! reads on console routes (an `Authorization` header still wins); and the CSRF token of
//! every console form, an HMAC of that session under a key of the service's own.

use axum::http::header::{self, HeaderMap, HeaderValue};
use cookie::{Cookie, SameSite};
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

/// Where the console lives: its routes are for admins only, but for [`CONSOLE_PUBLIC`].
pub const CONSOLE_PREFIX: &str = "/petstore-domain/console";

/// The console's routes anyone may reach: its login page, the sign-in at an identity
/// provider and back, and its static files.
pub const CONSOLE_PUBLIC: [&str; 4] = [
    "/petstore-domain/console/login",
    OIDC_START,
    petstore_settings::CONSOLE_OIDC_CALLBACK,
    "/petstore-domain/console/assets/{file}",
];

/// Where a sign-in at the identity provider starts.
pub const OIDC_START: &str = "/petstore-domain/console/login/oidc";

/// The name of the cookie that carries a sign-in at the identity provider (its state, nonce
/// and PKCE verifier, signed) to the callback.
pub const OIDC_FLOW_COOKIE: &str = "petstore_console_oidc";

/// The name of the session cookie.
pub const SESSION_COOKIE: &str = "petstore_console";

/// The name of the login page's cookie: a random value its form's CSRF token is bound to.
pub const LOGIN_COOKIE: &str = "petstore_console_login";

/// How long a login form may be filled in, in seconds.
pub const LOGIN_FORM_SECONDS: i64 = 600;

/// The `Content-Security-Policy` of every console response: scripts, styles and requests
/// from the service itself only, no inline script or style, no framing.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; img-src 'self' data:; connect-src 'self'; form-action 'self'; \
     frame-ancestors 'none'; base-uri 'none'";

/// Whether `template` is a console route.
pub fn is_console_route(template: &str) -> bool {
    template == CONSOLE_PREFIX
        || template
            .strip_prefix(CONSOLE_PREFIX)
            .is_some_and(|rest| rest.starts_with('/'))
}

/// The session token the request's cookies carry, if any.
pub fn session_token(headers: &HeaderMap) -> Option<String> {
    cookie_value(headers, SESSION_COOKIE)
}

/// The sign-in flow cookie's value, if the request carries one.
pub fn oidc_flow(headers: &HeaderMap) -> Option<String> {
    cookie_value(headers, OIDC_FLOW_COOKIE)
}

/// The login cookie's value, if the request carries one.
pub fn login_nonce(headers: &HeaderMap) -> Option<String> {
    cookie_value(headers, LOGIN_COOKIE)
}

fn cookie_value(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(Cookie::split_parse)
        .filter_map(Result::ok)
        .find(|cookie| cookie.name() == name && !cookie.value().is_empty())
        .map(|cookie| cookie.value().to_owned())
}

/// 32 random bytes, in hex.
pub fn random_token() -> String {
    hex(&random_bytes())
}

/// 32 bytes from the OS's generator (two UUIDv4s' worth).
fn random_bytes() -> [u8; 32] {
    let mut bytes = [0; 32];
    bytes[..16].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
    bytes[16..].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
    bytes
}

/// The `Set-Cookie` value of a login page's cookie holding `nonce`.
pub fn login_cookie(nonce: &str, secure: bool) -> HeaderValue {
    cookie_header(
        Cookie::build((LOGIN_COOKIE, nonce))
            .max_age(cookie::time::Duration::seconds(LOGIN_FORM_SECONDS))
            .secure(secure)
            .build(),
    )
}

/// The `Set-Cookie` value that drops the login cookie (once logged in).
pub fn ended_login_cookie(secure: bool) -> HeaderValue {
    cookie_header(
        Cookie::build((LOGIN_COOKIE, ""))
            .max_age(cookie::time::Duration::ZERO)
            .secure(secure)
            .build(),
    )
}

/// The `Set-Cookie` value of a session holding `token` for `max_age` seconds (unknown: until
/// the browser closes; the token's own expiry still ends it); `Secure` unless the console is
/// reached on a loopback address over plain HTTP.
pub fn session_cookie(token: &str, max_age: Option<u64>, secure: bool) -> HeaderValue {
    let mut cookie = Cookie::build((SESSION_COOKIE, token)).secure(secure);
    if let Some(max_age) = max_age {
        let max_age = i64::try_from(max_age).unwrap_or(i64::MAX);
        cookie = cookie.max_age(cookie::time::Duration::seconds(max_age));
    }
    cookie_header(cookie.build())
}

/// The `Set-Cookie` value of a sign-in's flow cookie. Unlike the others it is
/// `SameSite=Lax`: the provider sends the browser back by a navigation from its own site,
/// on which a `Strict` cookie would not be sent. It is scoped to the sign-in's two routes.
pub fn oidc_flow_cookie(flow: &str, secure: bool) -> HeaderValue {
    oidc_flow_header(flow, LOGIN_FORM_SECONDS, secure)
}

/// The `Set-Cookie` value that drops a sign-in's flow cookie (once used).
pub fn ended_oidc_flow_cookie(secure: bool) -> HeaderValue {
    oidc_flow_header("", 0, secure)
}

fn oidc_flow_header(flow: &str, max_age: i64, secure: bool) -> HeaderValue {
    let cookie = Cookie::build((OIDC_FLOW_COOKIE, flow))
        .path(OIDC_START)
        .http_only(true)
        .same_site(SameSite::Lax)
        .max_age(cookie::time::Duration::seconds(max_age))
        .secure(secure)
        .build();
    HeaderValue::from_str(&cookie.to_string()).unwrap_or(HeaderValue::from_static(""))
}

/// The `Set-Cookie` value that ends the session.
pub fn ended_session_cookie(secure: bool) -> HeaderValue {
    cookie_header(
        Cookie::build((SESSION_COOKIE, ""))
            .max_age(cookie::time::Duration::ZERO)
            .secure(secure)
            .build(),
    )
}

fn cookie_header(mut cookie: Cookie<'_>) -> HeaderValue {
    cookie.set_path(CONSOLE_PREFIX);
    cookie.set_http_only(true);
    cookie.set_same_site(SameSite::Strict);
    // A token is base64url and dots, the rest fixed words: always a valid header value.
    HeaderValue::from_str(&cookie.to_string()).unwrap_or(HeaderValue::from_static(""))
}

/// The key of the console's CSRF tokens: derived from the token secret, so that every
/// instance of the service accepts the tokens of the others; random per process without
/// one (demo mode, where the console needs no login).
#[derive(Clone)]
pub(crate) struct CsrfKey([u8; 32]);

impl CsrfKey {
    pub(crate) fn new(secret: Option<&[u8]>) -> Self {
        match secret {
            Some(secret) => {
                let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key");
                mac.update(b"petstore console csrf key");
                Self(mac.finalize().into_bytes().into())
            }
            None => Self(random_bytes()),
        }
    }

    fn mac(&self, session: &str) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes any key");
        mac.update(session.as_bytes());
        mac
    }

    /// The CSRF token of `session` (hex).
    pub(crate) fn token(&self, session: &str) -> String {
        hex(&self.mac(session).finalize().into_bytes())
    }

    /// Whether `token` is `session`'s (compared in constant time).
    pub(crate) fn matches(&self, session: &str, token: &str) -> bool {
        unhex(token).is_some_and(|bytes| self.mac(session).verify_slice(&bytes).is_ok())
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

pub(crate) fn unhex(text: &str) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 || !text.is_ascii() {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|at| u8::from_str_radix(&text[at..at + 2], 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_csrf_token_is_its_sessions_only_and_the_same_on_every_instance() {
        let key = CsrfKey::new(Some(b"a secret of at least thirty-two bytes"));
        let token = key.token("session-a");
        assert!(key.matches("session-a", &token));
        assert!(!key.matches("session-b", &token));
        assert!(!key.matches("session-a", &token[..62]));
        assert!(!key.matches("session-a", "zz"));
        assert!(!key.matches("session-a", ""));
        let other_instance = CsrfKey::new(Some(b"a secret of at least thirty-two bytes"));
        assert!(other_instance.matches("session-a", &token));
        let other_secret = CsrfKey::new(Some(b"another secret of thirty-two bytes!"));
        assert!(!other_secret.matches("session-a", &token));
    }

    #[test]
    fn the_session_is_read_from_its_cookie_only_and_the_cookie_is_locked_down() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::COOKIE,
            HeaderValue::from_static("other=1; petstore_console=abc.def; x=2"),
        );
        assert_eq!(session_token(&headers).as_deref(), Some("abc.def"));
        headers.insert(
            header::COOKIE,
            HeaderValue::from_static("petstore_console="),
        );
        assert_eq!(session_token(&headers), None);
        let cookie = session_cookie("abc.def", Some(3600), true);
        let cookie = cookie.to_str().expect("ascii");
        for part in [
            "petstore_console=abc.def",
            "HttpOnly",
            "SameSite=Strict",
            "Secure",
            "Path=/petstore-domain/console",
            "Max-Age=3600",
        ] {
            assert!(cookie.contains(part), "{cookie} lacks {part}");
        }
        assert!(!session_cookie("t", Some(1), false)
            .to_str()
            .expect("ascii")
            .contains("Secure"));
        assert!(ended_session_cookie(false)
            .to_str()
            .expect("ascii")
            .contains("Max-Age=0"));
        let flow = oidc_flow_cookie("f", true);
        let flow = flow.to_str().expect("ascii");
        for part in [
            "petstore_console_oidc=f",
            "HttpOnly",
            "SameSite=Lax",
            "Secure",
            "Path=/petstore-domain/console/login/oidc",
            "Max-Age=600",
        ] {
            assert!(flow.contains(part), "{flow} lacks {part}");
        }
        assert!(is_console_route(
            "/petstore-domain/console/orders/{order_id}"
        ));
        assert!(is_console_route("/petstore-domain/console"));
        assert!(!is_console_route("/petstore-domain/consoles"));
    }
}
