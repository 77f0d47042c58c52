//! Signing in and out of the console, and the session a page is rendered for.
//!
//! The login page sets a short-lived login cookie of its own; its form carries that
//! cookie's CSRF token, so a login cannot be forged from another site either. A login that
//! succeeds puts the service's own token in the session cookie (the guard reads it on
//! console routes) and goes back to the page that asked for it.

use askama::Template;
use axum::extract::{FromRequestParts, Query, State};
use axum::http::header::{self, HeaderMap, HeaderValue};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Form;
use petstore_security::auth::console::{
    ended_login_cookie, ended_session_cookie, login_cookie, login_nonce, random_token,
    session_cookie, session_token, CONSOLE_PREFIX, OIDC_START,
};
use petstore_security::auth::login::LoginRefused;
use petstore_security::auth::Caller;
use petstore_web::Problem;
use serde::Deserialize;

use crate::{html, ConsoleState, Frame};

/// The session a page is rendered for: who, and the CSRF token of its forms.
pub(crate) struct Session {
    subject: String,
    csrf: String,
}

impl Session {
    /// Who is signed in.
    pub(crate) fn subject(&self) -> &str {
        &self.subject
    }

    /// The frame of a page titled `title`.
    pub(crate) fn frame(&self, title: impl Into<String>) -> Frame {
        Frame {
            subject: self.subject.clone(),
            csrf: self.csrf.clone(),
            title: title.into(),
        }
    }
}

impl FromRequestParts<ConsoleState> for Session {
    type Rejection = Problem;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &ConsoleState,
    ) -> Result<Self, Self::Rejection> {
        let caller = Caller::from_request_parts(parts, state).await?;
        let token = session_token(&parts.headers).unwrap_or_default();
        Ok(Self {
            subject: caller.subject().to_owned(),
            csrf: state.security.csrf_token(&token),
        })
    }
}

/// Refuses a console form whose CSRF token is not its session's (403).
pub(crate) fn check_csrf(
    state: &ConsoleState,
    headers: &HeaderMap,
    token: &str,
) -> Result<(), Problem> {
    let session = session_token(headers).unwrap_or_default();
    if state.security.csrf_matches(&session, token) {
        Ok(())
    } else {
        Err(Problem::forbidden(
            "the form's CSRF token is missing or not this session's: reload the page",
        ))
    }
}

/// Where a login goes back to.
#[derive(Deserialize)]
pub(crate) struct Next {
    pub(crate) next: Option<String>,
}

/// `next` when it is a console page (never another site), else the console's home.
pub(crate) fn back_to(next: Option<&str>) -> String {
    match next {
        Some(path)
            if path.starts_with(&format!("{CONSOLE_PREFIX}/"))
                && !path.contains("//")
                && !path.contains('\\')
                && path.chars().all(|character| !character.is_control()) =>
        {
            path.to_owned()
        }
        _ => format!("{CONSOLE_PREFIX}/"),
    }
}

#[derive(Template)]
#[template(path = "login.html")]
struct LoginPage {
    csrf: String,
    next: String,
    error: Option<String>,
    provider: Option<ProviderLink>,
}

/// The login page's link to sign in at the identity provider.
struct ProviderLink {
    href: String,
    label: String,
}

/// Whether cookies set for this request must be `Secure`: unless the console is reached on
/// a loopback name (where browsers allow plain HTTP).
pub(crate) fn secure(headers: &HeaderMap) -> bool {
    let host = headers
        .get(header::HOST)
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default();
    let name = match host.rsplit_once(':') {
        Some((name, port)) if port.chars().all(|c| c.is_ascii_digit()) => name,
        _ => host,
    };
    !matches!(name, "localhost" | "127.0.0.1" | "[::1]")
}

/// The login page, with a fresh login cookie its form's token belongs to, and a link to the
/// identity provider when one is configured.
pub(crate) fn login_form(
    headers: &HeaderMap,
    state: &ConsoleState,
    next: String,
    error: Option<String>,
) -> Response {
    let nonce = random_token();
    let provider = state.security.oidc_sign_in().map(|sign_in| ProviderLink {
        href: format!(
            "{OIDC_START}?{}",
            serde_urlencoded::to_string([("next", next.as_str())]).unwrap_or_default()
        ),
        label: sign_in.label().to_owned(),
    });
    let mut response = html(&LoginPage {
        csrf: state.security.csrf_token(&login_session(&nonce)),
        next,
        error,
        provider,
    });
    response
        .headers_mut()
        .append(header::SET_COOKIE, login_cookie(&nonce, secure(headers)));
    response
}

/// What a login form's CSRF token is bound to: its login cookie.
fn login_session(nonce: &str) -> String {
    format!("login:{nonce}")
}

/// `GET /petstore-domain/console/login`.
pub(crate) async fn login_page(
    State(state): State<ConsoleState>,
    headers: HeaderMap,
    Query(next): Query<Next>,
) -> Response {
    login_form(&headers, &state, back_to(next.next.as_deref()), None)
}

/// The login form.
#[derive(Deserialize)]
pub(crate) struct LoginForm {
    username: String,
    password: String,
    csrf: String,
    next: Option<String>,
}

/// `POST /petstore-domain/console/login`.
pub(crate) async fn log_in(
    State(state): State<ConsoleState>,
    caller: Caller,
    headers: HeaderMap,
    Form(form): Form<LoginForm>,
) -> Response {
    let next = back_to(form.next.as_deref());
    let nonce = login_nonce(&headers);
    let genuine = nonce.is_some_and(|nonce| {
        state
            .security
            .csrf_matches(&login_session(&nonce), &form.csrf)
    });
    if !genuine {
        let mut page = login_form(
            &headers,
            &state,
            next,
            Some("The form expired or did not come from this console: sign in again.".to_owned()),
        );
        *page.status_mut() = StatusCode::FORBIDDEN;
        return page;
    }
    let template = format!("{CONSOLE_PREFIX}/login");
    let refused = match state
        .security
        .log_in(&caller, &template, form.username.trim(), form.password)
        .await
    {
        Ok((token, expires_in)) => {
            let mut response = StatusCode::SEE_OTHER.into_response();
            let headers_out = response.headers_mut();
            if let Ok(location) = HeaderValue::from_str(&next) {
                headers_out.insert(header::LOCATION, location);
            }
            headers_out.append(
                header::SET_COOKIE,
                session_cookie(&token, Some(expires_in), secure(&headers)),
            );
            headers_out.append(header::SET_COOKIE, ended_login_cookie(secure(&headers)));
            return response;
        }
        Err(refused) => refused,
    };
    let (status, message) = match refused {
        LoginRefused::Invalid => (
            StatusCode::UNAUTHORIZED,
            "Wrong username or password.".to_owned(),
        ),
        LoginRefused::NotConfigured => (
            StatusCode::NOT_FOUND,
            "Logins are not configured here (security.jwt.secret is not set).".to_owned(),
        ),
        LoginRefused::Limited(limited) => {
            let retry = limited
                .headers()
                .get(header::RETRY_AFTER)
                .and_then(|value| value.to_str().ok())
                .unwrap_or("a few")
                .to_owned();
            (
                StatusCode::TOO_MANY_REQUESTS,
                format!("Too many attempts: try again in {retry} seconds."),
            )
        }
    };
    let mut page = login_form(&headers, &state, next, Some(message));
    *page.status_mut() = status;
    page
}

/// The logout form.
#[derive(Deserialize)]
pub(crate) struct LogoutForm {
    csrf: String,
}

/// `POST /petstore-domain/console/logout`: ends the session (its cookie; the token itself
/// lives until it expires).
pub(crate) async fn log_out(
    State(state): State<ConsoleState>,
    headers: HeaderMap,
    Form(form): Form<LogoutForm>,
) -> Result<Response, Problem> {
    check_csrf(&state, &headers, &form.csrf)?;
    let mut response = StatusCode::SEE_OTHER.into_response();
    response.headers_mut().insert(
        header::LOCATION,
        HeaderValue::from_static("/petstore-domain/console/login"),
    );
    response
        .headers_mut()
        .append(header::SET_COOKIE, ended_session_cookie(secure(&headers)));
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_login_goes_back_to_console_pages_only() {
        let home = "/petstore-domain/console/";
        for (next, to) in [
            (None, home),
            (
                Some("/petstore-domain/console/orders?status=paid"),
                "/petstore-domain/console/orders?status=paid",
            ),
            (Some("https://evil.example/"), home),
            (Some("//evil.example/petstore-domain/console/"), home),
            (Some("/petstore-domain/console//evil.example"), home),
            (Some("/petstore-domain/console/\\evil"), home),
            (Some("/petstore-domain/consoles"), home),
        ] {
            assert_eq!(back_to(next), to, "{next:?}");
        }
    }
}
