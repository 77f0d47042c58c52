//! Signing in at the identity provider (`console.oidc`): `…/login/oidc` sends the browser
//! to the provider with the flow's cookie; `…/login/oidc/callback` finishes the sign-in
//! ([`Security::finish_oidc_sign_in`](petstore_security::auth::Security)) and sets the
//! session.
//!
//! The callback answers a page that goes on to the console by a `<meta http-equiv=refresh>`
//! rather than a redirect: the provider's navigation is cross-site, so a redirect from it
//! would still be, and the browser would not send the `SameSite=Strict` session cookie on
//! it. The page's own navigation is same-site.

use askama::Template;
use axum::extract::{Query, State};
use axum::http::header::{self, HeaderMap, HeaderValue};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use petstore_security::auth::console::{
    ended_login_cookie, ended_oidc_flow_cookie, oidc_flow, oidc_flow_cookie, session_cookie,
};
use petstore_security::auth::sign_in::{Callback, SignInRefused};
use petstore_security::auth::Caller;

use crate::session::{back_to, login_form, secure, Next};
use crate::{html, ConsoleState};

#[derive(Template)]
#[template(path = "signed_in.html")]
struct SignedInPage {
    subject: String,
    next: String,
}

/// The login page saying why a sign-in did not happen, with the status that says it too.
fn refused(
    headers: &HeaderMap,
    state: &ConsoleState,
    next: String,
    why: &SignInRefused,
) -> Response {
    let status = match why {
        SignInRefused::NotConfigured => StatusCode::NOT_FOUND,
        SignInRefused::Unavailable(_) => StatusCode::BAD_GATEWAY,
        SignInRefused::Expired => StatusCode::BAD_REQUEST,
        SignInRefused::Denied(_) => StatusCode::UNAUTHORIZED,
        SignInRefused::NotAdmin(_) => StatusCode::FORBIDDEN,
    };
    let message = match why {
        SignInRefused::Expired => format!("{why}: sign in again."),
        _ => why.to_string(),
    };
    let mut page = login_form(headers, state, next, Some(message));
    *page.status_mut() = status;
    page.headers_mut()
        .append(header::SET_COOKIE, ended_oidc_flow_cookie(secure(headers)));
    page
}

/// This request's origin (`http://127.0.0.1:8080`), from its `Host`: `http` on a loopback
/// host, else `https`.
fn origin(headers: &HeaderMap) -> Option<String> {
    let host = headers.get(header::HOST)?.to_str().ok()?;
    let valid = !host.is_empty()
        && host
            .chars()
            .all(|character| character.is_ascii_alphanumeric() || ".-:[]".contains(character));
    let scheme = if secure(headers) { "https" } else { "http" };
    valid.then(|| format!("{scheme}://{host}"))
}

/// `GET /petstore-domain/console/login/oidc?next=`: off to the identity provider.
pub(crate) async fn start(
    State(state): State<ConsoleState>,
    headers: HeaderMap,
    Query(next): Query<Next>,
) -> Response {
    let next = back_to(next.next.as_deref());
    let Some(origin) = origin(&headers) else {
        let why = SignInRefused::Denied("the request names no valid Host".to_owned());
        return refused(&headers, &state, next, &why);
    };
    let started = match state
        .security
        .start_oidc_sign_in(&origin, next.clone())
        .await
    {
        Ok(started) => started,
        Err(why) => return refused(&headers, &state, next, &why),
    };
    let Ok(location) = HeaderValue::from_str(&started.authorization_url) else {
        let why =
            SignInRefused::Unavailable("the authorization URL is not a valid header".to_owned());
        return refused(&headers, &state, next, &why);
    };
    let mut response = StatusCode::SEE_OTHER.into_response();
    response.headers_mut().insert(header::LOCATION, location);
    response.headers_mut().append(
        header::SET_COOKIE,
        oidc_flow_cookie(&started.flow, secure(&headers)),
    );
    response
}

/// `GET /petstore-domain/console/login/oidc/callback`: the provider's answer.
pub(crate) async fn callback(
    State(state): State<ConsoleState>,
    caller: Caller,
    headers: HeaderMap,
    Query(answer): Query<Callback>,
) -> Response {
    let flow = oidc_flow(&headers);
    match state
        .security
        .finish_oidc_sign_in(&caller, flow.as_deref(), answer)
        .await
    {
        Ok(signed_in) => {
            let secure = secure(&headers);
            let mut response = html(&SignedInPage {
                subject: signed_in.subject,
                next: back_to(Some(&signed_in.next)),
            });
            let cookies = response.headers_mut();
            cookies.append(
                header::SET_COOKIE,
                session_cookie(&signed_in.token, signed_in.expires_in, secure),
            );
            cookies.append(header::SET_COOKIE, ended_oidc_flow_cookie(secure));
            cookies.append(header::SET_COOKIE, ended_login_cookie(secure));
            response
        }
        Err(why) => refused(&headers, &state, back_to(None), &why),
    }
}
