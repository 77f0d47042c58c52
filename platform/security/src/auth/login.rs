//! `POST /auth/login`: a configured user's name and password for a token of the service's
//! own. Passwords are checked against Argon2 hashes off the async runtime; an unknown user
//! costs the same hash as a known one, and every failure answers the same 401.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::header::{self, HeaderMap};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{Caller, RouteName, Security};
use crate::audit::{SecurityEventKind, SecurityOutcome};
use crate::rate_limit::Decision;
use petstore_telemetry::metrics::LoginLabels;
use petstore_web::{Json, Problem, ProblemDocument};

/// The OpenAPI description of the login route.
#[derive(utoipa::OpenApi)]
#[openapi(
    paths(login),
    components(schemas(LoginBody, LoginToken, ProblemDocument))
)]
pub struct LoginApiDoc;

/// The login route.
pub fn router() -> Router<Security> {
    Router::new().route("/auth/login", post(login))
}

/// A login attempt.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoginBody {
    /// The user's name.
    #[schema(example = "demo", min_length = 1, max_length = 128)]
    pub username: String,
    /// The user's password.
    #[schema(example = "demo", min_length = 1, max_length = 1024)]
    pub password: String,
}

/// An issued token.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct LoginToken {
    /// Send it as `Authorization: Bearer <token>`.
    pub token: String,
    /// Always `Bearer`.
    pub token_type: String,
    /// Seconds until it expires.
    pub expires_in: u64,
}

/// Hashes `password` into an Argon2id PHC string (for the `users` list of the config).
pub fn hash_password(password: &str) -> Result<String, String> {
    use argon2::password_hash::PasswordHasher;
    argon2::Argon2::default()
        .hash_password(password.as_bytes())
        .map(|hash| hash.to_string())
        .map_err(|error| error.to_string())
}

/// The hash of a random password, checked for unknown usernames so that they cost as much
/// as known ones (made once, on the first such login).
fn decoy_hash() -> &'static str {
    static DECOY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DECOY.get_or_init(|| hash_password(&uuid::Uuid::new_v4().to_string()).unwrap_or_default())
}

fn verify_password(password: &str, hash: &str) -> bool {
    use argon2::password_hash::PasswordVerifier;
    argon2::Argon2::default()
        .verify_password(password.as_bytes(), hash)
        .is_ok()
}

/// Log in with a username and password.
///
/// The body is JSON; it is read as JSON also when sent as `application/x-www-form-urlencoded`
/// (what `curl -d` sends), so the seed's example works as written. Every failed attempt
/// answers the same 401; attempts are limited per username and per client address (429).
#[utoipa::path(
    post,
    path = "/auth/login",
    tag = "auth",
    request_body = LoginBody,
    security(()),
    responses(
        (status = 200, description = "A token", body = LoginToken),
        (status = 400, description = "Malformed JSON", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 401, description = "Wrong username or password", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 404, description = "Logins are not configured here (no security.jwt.secret)", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 415, description = "Not JSON", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 422, description = "A field is missing or unknown", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 429, description = "Too many attempts", body = ProblemDocument, content_type = "application/problem+json"),
    )
)]
pub async fn login(
    State(security): State<Security>,
    caller: Caller,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, Problem> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .unwrap_or("application/json");
    let essence = content_type.split(';').next().unwrap_or_default().trim();
    if !essence.eq_ignore_ascii_case("application/json")
        && !essence.eq_ignore_ascii_case("application/x-www-form-urlencoded")
    {
        return Err(Problem::from_status(
            axum::http::StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ));
    }
    let attempt: LoginBody = serde_json::from_slice(&body).map_err(|error| {
        if error.is_data() || error.is_eof() && !body.is_empty() {
            Problem::validation(format!(
                "the body must be {{\"username\", \"password\"}}: {error}"
            ))
        } else {
            Problem::bad_request(format!("the body is not JSON: {error}"))
        }
    })?;
    let (token, expires_in) = match security
        .log_in(&caller, "/auth/login", &attempt.username, attempt.password)
        .await
    {
        Ok(issued) => issued,
        Err(refused) => return Ok(refused.into_response()),
    };
    Ok(Json(LoginToken {
        token,
        token_type: "Bearer".to_owned(),
        expires_in,
    })
    .into_response())
}

/// Why a login did not issue a token.
pub enum LoginRefused {
    /// The service issues no tokens (no `security.jwt.secret`).
    NotConfigured,
    /// Too many attempts: the answer to send (429).
    Limited(Response),
    /// A wrong username or password (recorded in the security trail).
    Invalid,
}

impl LoginRefused {
    /// The answer of the JSON login route.
    pub fn into_response(self) -> Response {
        match self {
            Self::NotConfigured => {
                Problem::not_found("logins are not configured here (security.jwt.secret)")
                    .into_response()
            }
            Self::Limited(response) => response,
            Self::Invalid => {
                Problem::unauthorized("invalid username or password", false).into_response()
            }
        }
    }
}

impl Security {
    /// Checks a configured user's password (off the async runtime; an unknown user costs
    /// the same hash) under the login quotas, records the outcome in the security trail as
    /// made by a POST to `template`, and issues a token with its lifetime in seconds.
    pub async fn log_in(
        &self,
        caller: &Caller,
        template: &str,
        username: &str,
        password: String,
    ) -> Result<(String, u64), LoginRefused> {
        let route = &RouteName {
            method: "POST".to_owned(),
            template: template.to_owned(),
        };
        if !self.verifier().issues_tokens() {
            return Err(LoginRefused::NotConfigured);
        }
        let mut who = caller.clone();
        who.subject = username.to_owned();
        if let Decision::Limited { usage, first_trip } =
            self.0.limits.check_login(username, caller.client_ip)
        {
            return Err(LoginRefused::Limited(
                self.limited(&usage, first_trip, &who, route).await,
            ));
        }
        let user = self.0.users.get(username).cloned();
        let hash = user
            .as_ref()
            .map(|user| secrecy::ExposeSecret::expose_secret(&user.password_hash).to_owned());
        let matches = tokio::task::spawn_blocking(move || match hash {
            Some(hash) => verify_password(&password, &hash),
            None => {
                // The same work as for a known user, and never a match.
                let _ = verify_password(&password, decoy_hash());
                false
            }
        })
        .await
        .unwrap_or(false);
        let issued = match &user {
            Some(user) if matches => self.verifier().issue(user.subject(), user.role),
            _ => None,
        };
        let outcome = if issued.is_some() {
            "success"
        } else {
            "failure"
        };
        self.0
            .metrics
            .logins
            .get_or_create(&LoginLabels { outcome })
            .inc();
        let Some(issued) = issued else {
            self.record(
                SecurityEventKind::Login,
                SecurityOutcome::Failure,
                &who,
                route,
                "invalid username or password",
            )
            .await;
            return Err(LoginRefused::Invalid);
        };
        if let Some(user) = &user {
            who.subject = user.subject().to_owned();
        }
        self.record(
            SecurityEventKind::Login,
            SecurityOutcome::Success,
            &who,
            route,
            format!("logged in as {username}"),
        )
        .await;
        Ok(issued)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hashed_password_verifies_and_others_do_not() {
        let hash = hash_password("demo").expect("hash");
        assert!(hash.starts_with("$argon2id$"));
        assert!(verify_password("demo", &hash));
        assert!(!verify_password("demo ", &hash));
        assert!(!verify_password("demo", decoy_hash()));
    }
}
