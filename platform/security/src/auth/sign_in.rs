//! The console's sign-in at an OpenID Provider (`console.oidc`): the authorization code
//! flow with PKCE (S256), `state` and `nonce` (OpenID Connect Core 3.1, RFC 9700 2.1.1),
//! through the `oauth2` crate.
//!
//! [`Security::start_oidc_sign_in`] makes the provider's authorization URL and the flow's cookie value:
//! the state, nonce, PKCE verifier, redirect URI and the console page to go back to, signed
//! with the console's key (so an instance can finish what another started), valid for
//! [`LOGIN_FORM_SECONDS`]. [`Security::finish_oidc_sign_in`] checks the provider's answer
//! against that cookie, exchanges the code with the verifier at the token endpoint, checks
//! the ID token (the issuer's keys, the client, the nonce) and the access token (as the guard
//! checks every token: the issuer's audience and roles claim), requires the admin role and
//! the same subject in both, records the outcome in the security trail, and returns the
//! access token: the session.

use std::sync::Arc;
use std::time::Duration;

use oauth2::basic::{
    BasicErrorResponse, BasicRevocationErrorResponse, BasicTokenIntrospectionResponse,
    BasicTokenType,
};
use oauth2::{
    AuthUrl, AuthorizationCode, Client, ClientId, ClientSecret, CsrfToken, EndpointNotSet,
    EndpointSet, ExtraTokenFields, PkceCodeChallenge, PkceCodeVerifier, RedirectUrl,
    RequestTokenError, Scope, StandardRevocableToken, StandardTokenResponse, TokenResponse,
    TokenUrl,
};
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};

use super::console::{hex, random_token, unhex, CsrfKey, LOGIN_FORM_SECONDS};
use super::oidc::{Endpoints, OidcIssuer};
use super::tokens::constant_time_equal;
use super::{Caller, RouteName, Security, TokenVerifier, VerifiedToken};
use crate::audit::{SecurityEventKind, SecurityOutcome};
use petstore_settings::{ConsoleOidcSettings, RoleName, CONSOLE_OIDC_CALLBACK};
use petstore_telemetry::metrics::LoginLabels;

/// The token endpoint's answer, with the ID token `scope=openid` adds.
type OidcTokenResponse = StandardTokenResponse<IdToken, BasicTokenType>;

#[derive(Debug, Serialize, Deserialize)]
struct IdToken {
    id_token: Option<String>,
}

impl ExtraTokenFields for IdToken {}

/// An OAuth 2 client with the provider's authorization and token endpoints.
type ProviderClient = Client<
    BasicErrorResponse,
    OidcTokenResponse,
    BasicTokenIntrospectionResponse,
    StandardRevocableToken,
    BasicRevocationErrorResponse,
    EndpointSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointSet,
>;

/// What a sign-in remembers between leaving for the provider and coming back.
#[derive(Serialize, Deserialize)]
struct Flow {
    state: String,
    nonce: String,
    verifier: String,
    redirect_uri: String,
    next: String,
    /// When it started (Unix seconds).
    started: i64,
}

/// A sign-in on its way to the provider.
pub struct Started {
    /// Where to send the browser.
    pub authorization_url: String,
    /// The flow cookie's value.
    pub flow: String,
}

/// The provider's answer at the callback (its query parameters).
#[derive(Debug, Default, Deserialize)]
pub struct Callback {
    /// The authorization code.
    pub code: Option<String>,
    /// The state sent with the request, echoed.
    pub state: Option<String>,
    /// Why the provider refused (RFC 6749 4.1.2.1).
    pub error: Option<String>,
    /// The provider's words about it.
    pub error_description: Option<String>,
    /// The issuer that answered (RFC 9207), when the provider says: it must be ours.
    pub iss: Option<String>,
}

/// A finished sign-in.
#[derive(Debug)]
pub struct SignedIn {
    /// The provider's access token: the session.
    pub token: String,
    /// Its lifetime in seconds, when the provider says.
    pub expires_in: Option<u64>,
    /// Who signed in.
    pub subject: String,
    /// The console page to go back to.
    pub next: String,
}

/// What the token endpoint issued, checked.
struct Issued {
    /// The access token.
    token: String,
    /// Its lifetime in seconds, when the provider says.
    expires_in: Option<u64>,
    /// Who it names.
    verified: VerifiedToken,
}

/// Why a sign-in did not happen.
#[derive(Debug, thiserror::Error)]
pub enum SignInRefused {
    /// No `console.oidc` is configured.
    #[error("signing in at an identity provider is not configured here (console.oidc)")]
    NotConfigured,
    /// The provider could not be reached, or answered what cannot be used.
    #[error("the identity provider could not be used: {0}")]
    Unavailable(String),
    /// The flow's cookie is missing, forged, expired, or not the one the answer belongs to.
    #[error("the sign-in expired or was not started in this browser")]
    Expired,
    /// The provider refused, or what it issued does not check out.
    #[error("{0}")]
    Denied(String),
    /// The subject signed in but is not an admin.
    #[error("{0} signed in, but is not an admin of this console")]
    NotAdmin(String),
}

/// The console as a client of its OpenID Provider.
pub struct OidcSignIn {
    settings: ConsoleOidcSettings,
    issuer: Arc<OidcIssuer>,
    http: reqwest::Client,
}

impl OidcSignIn {
    /// The client `settings` describe, at `issuer`; token requests time out after `timeout`.
    pub(crate) fn new(
        settings: ConsoleOidcSettings,
        issuer: Arc<OidcIssuer>,
        timeout: Duration,
    ) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            // Following a redirect would send the code elsewhere (oauth2's advice too).
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(Self {
            settings,
            issuer,
            http,
        })
    }

    /// The sign-in button's text.
    pub fn label(&self) -> &str {
        &self.settings.label
    }

    fn client(
        &self,
        endpoints: &Endpoints,
        redirect_uri: &str,
    ) -> Result<ProviderClient, SignInRefused> {
        let redirect = RedirectUrl::new(redirect_uri.to_owned())
            .map_err(|error| SignInRefused::Unavailable(format!("the redirect URI: {error}")))?;
        let client = Client::new(ClientId::new(self.settings.client_id.clone()))
            .set_auth_uri(AuthUrl::from_url(endpoints.authorization.clone()))
            .set_token_uri(TokenUrl::from_url(endpoints.token.clone()))
            .set_redirect_uri(redirect);
        Ok(match &self.settings.client_secret {
            Some(secret) => {
                client.set_client_secret(ClientSecret::new(secret.expose_secret().to_owned()))
            }
            None => client,
        })
    }

    /// Starts a sign-in that comes back to `redirect_uri` and then goes on to `next`.
    async fn start(
        &self,
        key: &CsrfKey,
        redirect_uri: String,
        next: String,
    ) -> Result<Started, SignInRefused> {
        let endpoints = self.endpoints().await?;
        let client = self.client(endpoints, &redirect_uri)?;
        let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
        let nonce = random_token();
        let mut request = client
            .authorize_url(CsrfToken::new_random)
            .add_scopes(self.settings.scopes.iter().cloned().map(Scope::new))
            .set_pkce_challenge(challenge)
            .add_extra_param("nonce", nonce.clone());
        if let Some(resource) = &self.settings.resource {
            request = request.add_extra_param("resource", resource.clone());
        }
        let (url, state) = request.url();
        let flow = Flow {
            state: state.into_secret(),
            nonce,
            verifier: verifier.into_secret(),
            redirect_uri,
            next,
            started: chrono::Utc::now().timestamp(),
        };
        Ok(Started {
            authorization_url: url.to_string(),
            flow: seal(key, &flow),
        })
    }

    async fn endpoints(&self) -> Result<&Endpoints, SignInRefused> {
        self.issuer
            .endpoints()
            .await
            .map_err(|error| SignInRefused::Unavailable(error.to_string()))
    }

    /// Exchanges the code of `flow` for the provider's tokens, and checks them with
    /// `verifier`.
    async fn exchange(
        &self,
        verifier: &TokenVerifier,
        flow: &Flow,
        code: String,
    ) -> Result<Issued, SignInRefused> {
        let endpoints = self.endpoints().await?;
        let client = self.client(endpoints, &flow.redirect_uri)?;
        let mut request = client
            .exchange_code(AuthorizationCode::new(code))
            .set_pkce_verifier(PkceCodeVerifier::new(flow.verifier.clone()));
        if let Some(resource) = &self.settings.resource {
            request = request.add_extra_param("resource", resource.clone());
        }
        let answer = request
            .request_async(&self.http)
            .await
            .map_err(|error| match error {
                RequestTokenError::ServerResponse(refusal) => SignInRefused::Denied(format!(
                    "the identity provider refused the code: {}",
                    refusal.error()
                )),
                RequestTokenError::Request(error) => {
                    SignInRefused::Unavailable(format!("the token endpoint: {error}"))
                }
                RequestTokenError::Parse(error, _) => {
                    SignInRefused::Unavailable(format!("the token endpoint's answer: {error}"))
                }
                RequestTokenError::Other(reason) => {
                    SignInRefused::Unavailable(format!("the token endpoint: {reason}"))
                }
            })?;
        let id_token = answer.extra_fields().id_token.as_deref().ok_or_else(|| {
            SignInRefused::Denied("the identity provider sent no ID token".to_owned())
        })?;
        let subject = verifier
            .verify_id_token(
                &self.issuer,
                id_token,
                &self.settings.client_id,
                &flow.nonce,
            )
            .await
            .map_err(|reason| {
                SignInRefused::Denied(format!("the ID token is refused: {reason}"))
            })?;
        let token = answer.access_token().secret().clone();
        let verified = verifier.verify(&token).await.map_err(|reason| {
            SignInRefused::Denied(format!(
                "the access token is refused: {reason} (is console.oidc.resource the resource \
                 whose tokens name security.oidc.issuers[].audience?)"
            ))
        })?;
        if verified.subject != subject {
            return Err(SignInRefused::Denied(
                "the access token names another subject than the ID token".to_owned(),
            ));
        }
        Ok(Issued {
            token,
            expires_in: answer.expires_in().map(|lifetime| lifetime.as_secs()),
            verified,
        })
    }
}

impl Security {
    /// The console's OIDC client, when `console.oidc` is configured.
    pub fn oidc_sign_in(&self) -> Option<&OidcSignIn> {
        self.0.sign_in.as_ref()
    }

    /// Starts a sign-in at the identity provider that comes back to the console at
    /// `console.oidc.redirect_uri`, or else at its callback on `origin`
    /// (`http://127.0.0.1:8080`), and then goes on to the console page `next`.
    pub async fn start_oidc_sign_in(
        &self,
        origin: &str,
        next: String,
    ) -> Result<Started, SignInRefused> {
        let sign_in = self.oidc_sign_in().ok_or(SignInRefused::NotConfigured)?;
        let redirect_uri = sign_in
            .settings
            .redirect_uri
            .clone()
            .unwrap_or_else(|| format!("{origin}{CONSOLE_OIDC_CALLBACK}"));
        sign_in.start(&self.0.csrf, redirect_uri, next).await
    }

    /// Finishes a sign-in: the provider sent the browser back with `callback`, carrying the
    /// flow cookie `sealed`. Records the outcome as a login in the security trail.
    pub async fn finish_oidc_sign_in(
        &self,
        caller: &Caller,
        sealed: Option<&str>,
        callback: Callback,
    ) -> Result<SignedIn, SignInRefused> {
        let sign_in = self.oidc_sign_in().ok_or(SignInRefused::NotConfigured)?;
        let mut who = caller.clone();
        let outcome = self.check_callback(sign_in, sealed, callback).await;
        let (result, detail) = match outcome {
            Ok((
                next,
                Issued {
                    token,
                    expires_in,
                    verified,
                },
            )) => {
                who.subject.clone_from(&verified.subject);
                who.roles = verified.roles.clone();
                if verified.roles.contains(&RoleName::Admin) {
                    let detail = format!(
                        "signed in to the console at {} as {}",
                        sign_in.issuer.issuer(),
                        verified.subject
                    );
                    let signed_in = SignedIn {
                        token,
                        expires_in,
                        subject: verified.subject,
                        next,
                    };
                    (Ok(signed_in), detail)
                } else {
                    let refused = SignInRefused::NotAdmin(verified.subject);
                    let detail = refused.to_string();
                    (Err(refused), detail)
                }
            }
            Err(refused) => {
                let detail = format!("console sign-in at {}: {refused}", sign_in.issuer.issuer());
                (Err(refused), detail)
            }
        };
        let (outcome, label) = match &result {
            Ok(_) => (SecurityOutcome::Success, "success"),
            Err(_) => (SecurityOutcome::Failure, "failure"),
        };
        self.0
            .metrics
            .logins
            .get_or_create(&LoginLabels { outcome: label })
            .inc();
        let route = RouteName {
            method: "GET".to_owned(),
            template: CONSOLE_OIDC_CALLBACK.to_owned(),
        };
        self.record(SecurityEventKind::Login, outcome, &who, &route, detail)
            .await;
        result
    }

    /// The page to go on to and what the provider issued, when the callback is the answer to
    /// the flow `sealed` holds and everything issued checks out.
    async fn check_callback(
        &self,
        sign_in: &OidcSignIn,
        sealed: Option<&str>,
        callback: Callback,
    ) -> Result<(String, Issued), SignInRefused> {
        let flow = sealed
            .and_then(|sealed| unseal(&self.0.csrf, sealed, chrono::Utc::now().timestamp()))
            .ok_or(SignInRefused::Expired)?;
        let state_matches = callback
            .state
            .as_deref()
            .is_some_and(|state| constant_time_equal(state.as_bytes(), flow.state.as_bytes()));
        if !state_matches {
            return Err(SignInRefused::Expired);
        }
        // A provider that names itself must be the one the sign-in went to (a mix-up attack
        // sends a code from another).
        if callback
            .iss
            .as_deref()
            .is_some_and(|iss| iss != sign_in.issuer.issuer())
        {
            return Err(SignInRefused::Denied(
                "the answer comes from another identity provider (iss)".to_owned(),
            ));
        }
        if let Some(error) = callback.error {
            let description = callback
                .error_description
                .map(|text| format!(" ({})", text.chars().take(200).collect::<String>()))
                .unwrap_or_default();
            let error: String = error.chars().take(64).collect();
            return Err(SignInRefused::Denied(format!(
                "the identity provider refused the sign-in: {error}{description}"
            )));
        }
        let code = callback
            .code
            .filter(|code| !code.is_empty())
            .ok_or_else(|| {
                SignInRefused::Denied("the identity provider sent no code".to_owned())
            })?;
        let issued = sign_in.exchange(self.verifier(), &flow, code).await?;
        Ok((flow.next, issued))
    }
}

/// `flow`, signed with the console's key: `hex(json).mac`.
fn seal(key: &CsrfKey, flow: &Flow) -> String {
    let body = hex(&serde_json::to_vec(flow).unwrap_or_default());
    let mac = key.token(&format!("oidc-flow:{body}"));
    format!("{body}.{mac}")
}

/// The flow `sealed` holds, when `key` signed it and it is not older than
/// [`LOGIN_FORM_SECONDS`] at `now` (Unix seconds).
fn unseal(key: &CsrfKey, sealed: &str, now: i64) -> Option<Flow> {
    let (body, mac) = sealed.split_once('.')?;
    if !key.matches(&format!("oidc-flow:{body}"), mac) {
        return None;
    }
    let flow: Flow = serde_json::from_slice(&unhex(body)?).ok()?;
    (0..=LOGIN_FORM_SECONDS)
        .contains(&now.saturating_sub(flow.started))
        .then_some(flow)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_token_field_is_read_from_the_token_answer() {
        let answer: OidcTokenResponse = serde_json::from_value(serde_json::json!({
            "access_token": "a", "token_type": "Bearer", "expires_in": 60, "id_token": "i",
        }))
        .expect("a token answer");
        assert_eq!(answer.extra_fields().id_token.as_deref(), Some("i"));
        assert_eq!(answer.expires_in(), Some(Duration::from_secs(60)));
    }

    #[test]
    fn a_flow_cookie_opens_with_its_key_only_unchanged_and_for_ten_minutes() {
        let key = CsrfKey::new(Some(b"a secret of at least thirty-two bytes"));
        let flow = Flow {
            state: "s".to_owned(),
            nonce: "n".to_owned(),
            verifier: "v".to_owned(),
            redirect_uri: "http://127.0.0.1:1/cb".to_owned(),
            next: "/petstore-domain/console/".to_owned(),
            started: 1_000,
        };
        let sealed = seal(&key, &flow);
        let opened = unseal(&key, &sealed, 1_000 + LOGIN_FORM_SECONDS).expect("opens");
        assert_eq!(
            (opened.state, opened.verifier),
            ("s".to_owned(), "v".to_owned())
        );
        assert!(
            unseal(&key, &sealed, 1_001 + LOGIN_FORM_SECONDS).is_none(),
            "expired"
        );
        assert!(unseal(&key, &sealed, 999).is_none(), "from the future");
        let other = CsrfKey::new(Some(b"another secret of thirty-two bytes!"));
        assert!(unseal(&other, &sealed, 1_000).is_none(), "another key");
        let (body, mac) = sealed.split_once('.').expect("two parts");
        let mut forged = flow;
        forged.next = "/petstore-domain/console/flags".to_owned();
        let forged_body = seal(&other, &forged);
        let forged_body = forged_body.split_once('.').expect("two parts").0;
        assert!(
            unseal(&key, &format!("{forged_body}.{mac}"), 1_000).is_none(),
            "changed"
        );
        assert!(unseal(&key, body, 1_000).is_none(), "no mac");
    }
}
