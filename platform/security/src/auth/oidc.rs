//! One OIDC issuer's signing keys: read from a file, or fetched from its JWKS (found by
//! discovery or configured), kept in memory and refetched when a token names an unknown
//! `kid` (key rotation); and its sign-in endpoints, for the console's sign-in.
//!
//! Refetches are single-flight (one at a time, the others wait for its result) and at most
//! one per cooldown, so tokens with random kids cannot make the service hammer the provider.
//! A failed fetch keeps the keys already known. Each discovery and key-set fetch goes
//! through the `oidc` resilience policy: retried on a network failure, a 5xx or a 429 (not on
//! another answer), and not made at all while the provider's breaker is open.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey};
use serde::Deserialize;

use petstore_domain::CustomerId;

use super::rejection::{NoCustomerId, TokenRejection};
use crate::audit::{SecurityAudit, SecurityEvent, SecurityEventKind, SecurityOutcome};
use petstore_resilience::{AttemptFailure, CallError, Policy};
use petstore_settings::{same_host, OidcAlgorithm, OidcIssuerSettings, OidcSettings, RoleName};

/// A key set could not be had.
#[derive(Debug, thiserror::Error)]
pub enum KeySetError {
    /// The provider did not answer well.
    #[error("fetching {url} failed: {reason}")]
    Fetch {
        /// What was fetched.
        url: String,
        /// Why it failed.
        reason: String,
    },
    /// The discovery document names a URL off the issuer's host or over http, or lacks one.
    #[error("the discovery document is refused: {0}")]
    Untrusted(String),
    /// The file cannot be read or parsed.
    #[error("the key set file {path} cannot be read: {reason}")]
    File {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
}

/// The keys of one issuer.
pub struct OidcIssuer {
    settings: OidcIssuerSettings,
    client: reqwest::Client,
    cooldown: Duration,
    keys: RwLock<Arc<HashMap<String, Arc<DecodingKey>>>>,
    /// Held while a refetch runs; remembers when the last one started.
    refetch: tokio::sync::Mutex<Option<Instant>>,
    audit: Option<SecurityAudit>,
    policy: Policy,
    /// The discovered sign-in endpoints, once found.
    endpoints: tokio::sync::OnceCell<Endpoints>,
}

/// One failed fetch attempt: `failure` when the provider failed (retried, counted by its
/// breaker), not when it answered something unusable.
struct FetchFailure {
    reason: String,
    failure: bool,
}

impl FetchFailure {
    fn is_failure(&self) -> bool {
        self.failure
    }
}

#[derive(Deserialize)]
struct Discovery {
    jwks_uri: String,
    authorization_endpoint: Option<String>,
    token_endpoint: Option<String>,
}

/// Where a browser signs in at the issuer, and where its code is exchanged for tokens.
#[derive(Debug, Clone)]
pub struct Endpoints {
    /// The authorization endpoint.
    pub authorization: url::Url,
    /// The token endpoint.
    pub token: url::Url,
}

impl OidcIssuer {
    /// An issuer with no keys yet: [`Self::load`] reads or fetches them, through `policy`
    /// (the `oidc` one).
    pub fn new(
        settings: OidcIssuerSettings,
        oidc: &OidcSettings,
        audit: Option<SecurityAudit>,
        policy: Policy,
    ) -> Result<Self, KeySetError> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_millis(oidc.fetch_timeout_ms))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|error| KeySetError::Fetch {
                url: settings.issuer.clone(),
                reason: error.to_string(),
            })?;
        Ok(Self {
            settings,
            client,
            cooldown: Duration::from_secs(oidc.refetch_cooldown_seconds),
            keys: RwLock::new(Arc::new(HashMap::new())),
            refetch: tokio::sync::Mutex::new(None),
            audit,
            policy,
            endpoints: tokio::sync::OnceCell::new(),
        })
    }

    /// The exact `iss` of its tokens.
    pub fn issuer(&self) -> &str {
        &self.settings.issuer
    }

    /// The `aud` its tokens must name.
    pub fn audience(&self) -> &str {
        &self.settings.audience
    }

    /// Whether the issuer is configured to sign with `algorithm`.
    pub fn accepts(&self, algorithm: OidcAlgorithm) -> bool {
        self.settings.algorithms.contains(&algorithm)
    }

    /// Reads the key file or fetches the key set. A file that cannot be read is an error
    /// (start-up fails); a provider that does not answer is logged and retried on the first
    /// token that needs it.
    pub async fn load(&self) -> Result<(), KeySetError> {
        if let Some(path) = &self.settings.jwks_file {
            let file_error = |reason: String| KeySetError::File {
                path: path.display().to_string(),
                reason,
            };
            let text = tokio::fs::read_to_string(path)
                .await
                .map_err(|error| file_error(error.to_string()))?;
            let set: JwkSet =
                serde_json::from_str(&text).map_err(|error| file_error(error.to_string()))?;
            self.replace(&set);
            return Ok(());
        }
        // The start-up fetch starts no cooldown: the first unknown kid may refetch at once.
        let _single_flight = self.refetch.lock().await;
        if let Err(error) = self.fetch_and_replace().await {
            tracing::error!(issuer = %self.settings.issuer, %error, "the identity provider's key set could not be fetched; retrying when a token needs it");
        }
        Ok(())
    }

    /// The key `kid`, refetching the key set once (single-flight, at most once per cooldown)
    /// when it is unknown. The key must suit `algorithm`.
    pub async fn key(
        &self,
        kid: &str,
        algorithm: Algorithm,
    ) -> Result<Arc<DecodingKey>, TokenRejection> {
        let suitable = |key: &Arc<DecodingKey>| key.family() == algorithm.family();
        if let Some(key) = self.current().get(kid) {
            return suitable(key)
                .then(|| key.clone())
                .ok_or(TokenRejection::AlgorithmNotAccepted);
        }
        if self.settings.jwks_file.is_some() {
            return Err(TokenRejection::UnknownKey);
        }
        let mut last = self.refetch.lock().await;
        // Another request may have refetched while this one waited.
        if let Some(key) = self.current().get(kid) {
            return suitable(key)
                .then(|| key.clone())
                .ok_or(TokenRejection::AlgorithmNotAccepted);
        }
        if last.is_some_and(|started| started.elapsed() < self.cooldown) {
            return Err(TokenRejection::UnknownKey);
        }
        *last = Some(Instant::now());
        if let Err(error) = self.fetch_and_replace().await {
            tracing::warn!(issuer = %self.settings.issuer, %error, "key set refetch failed; keeping the known keys");
        }
        drop(last);
        match self.current().get(kid) {
            Some(key) if suitable(key) => Ok(key.clone()),
            Some(_) => Err(TokenRejection::AlgorithmNotAccepted),
            None => Err(TokenRejection::UnknownKey),
        }
    }

    /// The roles in the configured claim: a string or an array of strings, reached by a
    /// dotted path.
    pub fn roles(&self, claims: &serde_json::Value) -> BTreeSet<RoleName> {
        let Some(value) = claim(claims, &self.settings.roles_claim) else {
            return BTreeSet::new();
        };
        match value {
            serde_json::Value::String(role) => RoleName::parse(role).into_iter().collect(),
            serde_json::Value::Array(roles) => roles
                .iter()
                .filter_map(serde_json::Value::as_str)
                .filter_map(RoleName::parse)
                .collect(),
            _ => BTreeSet::new(),
        }
    }

    /// The customer the token names, from the configured claim (`customer_claim`, default
    /// `sub`): a string in the customer-id alphabet, or why the token names none.
    pub fn customer(&self, claims: &serde_json::Value) -> Result<CustomerId, NoCustomerId> {
        let name = &self.settings.customer_claim;
        match claim(claims, name) {
            Some(serde_json::Value::String(text)) => {
                CustomerId::parse(text).map_err(|_| NoCustomerId::not_an_id(name, text))
            }
            _ => Err(NoCustomerId::missing(name)),
        }
    }

    /// The issuer's authorization and token endpoints, from its discovery document (fetched
    /// through the `oidc` policy on first use, then kept; a failed fetch is tried again on the
    /// next call). Like the key set, both must be on the issuer's host.
    pub async fn endpoints(&self) -> Result<&Endpoints, KeySetError> {
        self.endpoints
            .get_or_try_init(|| async {
                let url = self.discovery_url();
                let discovery: Discovery = self.get_json(&url).await?;
                let endpoint = |name: &str, value: Option<String>| {
                    let value = value.ok_or_else(|| {
                        KeySetError::Untrusted(format!("the discovery document has no {name}"))
                    })?;
                    same_host(&self.settings.issuer, &value).map_err(KeySetError::Untrusted)?;
                    url::Url::parse(&value)
                        .map_err(|error| KeySetError::Untrusted(format!("{name}: {error}")))
                };
                Ok(Endpoints {
                    authorization: endpoint(
                        "authorization_endpoint",
                        discovery.authorization_endpoint,
                    )?,
                    token: endpoint("token_endpoint", discovery.token_endpoint)?,
                })
            })
            .await
    }

    fn discovery_url(&self) -> String {
        format!(
            "{}/.well-known/openid-configuration",
            self.settings.issuer.trim_end_matches('/')
        )
    }

    fn current(&self) -> Arc<HashMap<String, Arc<DecodingKey>>> {
        match self.keys.read() {
            Ok(keys) => keys.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn replace(&self, set: &JwkSet) -> usize {
        let keys: HashMap<String, Arc<DecodingKey>> = set
            .keys
            .iter()
            .filter_map(|jwk| {
                let kid = jwk.common.key_id.clone()?;
                let key = DecodingKey::from_jwk(jwk).ok()?;
                Some((kid, Arc::new(key)))
            })
            .collect();
        let count = keys.len();
        let keys = Arc::new(keys);
        match self.keys.write() {
            Ok(mut slot) => *slot = keys,
            Err(poisoned) => *poisoned.into_inner() = keys,
        }
        count
    }

    async fn fetch_and_replace(&self) -> Result<usize, KeySetError> {
        let result = self.fetch().await.map(|set| self.replace(&set));
        let (outcome, detail) = match &result {
            Ok(count) => (
                SecurityOutcome::Success,
                format!("fetched {count} keys of {}", self.settings.issuer),
            ),
            Err(error) => (SecurityOutcome::Failure, error.to_string()),
        };
        if let Some(audit) = &self.audit {
            audit
                .record(crate::auth::of_current_request(SecurityEvent::new(
                    SecurityEventKind::KeySetRotation,
                    outcome,
                    detail,
                )))
                .await;
        }
        result
    }

    async fn fetch(&self) -> Result<JwkSet, KeySetError> {
        let jwks_uri = match &self.settings.jwks_uri {
            Some(uri) => uri.clone(),
            None => {
                let discovery: Discovery = self.get_json(&self.discovery_url()).await?;
                same_host(&self.settings.issuer, &discovery.jwks_uri)
                    .map_err(KeySetError::Untrusted)?;
                discovery.jwks_uri
            }
        };
        self.get_json(&jwks_uri).await
    }

    async fn get_json<T>(&self, url: &str) -> Result<T, KeySetError>
    where
        T: serde::de::DeserializeOwned + Send + 'static,
    {
        let outcome = self
            .policy
            .call(FetchFailure::is_failure, || {
                get_json_once(self.client.clone(), url.to_owned())
            })
            .await;
        outcome.map_err(|error| KeySetError::Fetch {
            url: url.to_owned(),
            reason: match error {
                CallError::Refused(attempt)
                | CallError::Failed {
                    failure: AttemptFailure::Error(attempt),
                    ..
                } => attempt.reason,
                CallError::Failed {
                    failure: AttemptFailure::TimedOut(after),
                    ..
                } => format!("no answer within {} ms", after.as_millis()),
                CallError::Rejected(rejection) => format!("not fetched: {rejection}"),
            },
        })
    }
}

/// One GET of a JSON document.
async fn get_json_once<T: serde::de::DeserializeOwned>(
    client: reqwest::Client,
    url: String,
) -> Result<T, FetchFailure> {
    let response = client
        .get(&url)
        .send()
        .await
        .map_err(|error| FetchFailure {
            reason: error.to_string(),
            failure: true,
        })?;
    let status = response.status();
    if !status.is_success() {
        return Err(FetchFailure {
            reason: format!("status {status}"),
            failure: status.is_server_error() || status == reqwest::StatusCode::TOO_MANY_REQUESTS,
        });
    }
    response.json::<T>().await.map_err(|error| FetchFailure {
        reason: error.to_string(),
        // A body cut short is the provider's failure; one that is not the document is not.
        failure: error.is_timeout() || error.is_body(),
    })
}

/// The value at a dotted `path` (`realm_access.roles`) of a token's claims.
fn claim<'a>(claims: &'a serde_json::Value, path: &str) -> Option<&'a serde_json::Value> {
    path.split('.')
        .try_fold(claims, |value, part| value.get(part))
}
