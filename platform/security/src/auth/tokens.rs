//! Bearer tokens: the service's own HS256 tokens (issued by `POST /auth/login`) and RS256 or
//! ES256 tokens of configured OIDC issuers.
//!
//! The validation is chosen by the token's issuer, never by its `alg`: the unverified `iss`
//! only picks which issuer's rules apply, and those rules fix the algorithms and keys. So
//! `alg: none` (no such algorithm to jsonwebtoken), an HS256 token claiming an OIDC issuer
//! (HS/RS confusion: the public key used as an HMAC secret) and an RS256 token claiming the
//! local issuer are all refused before any signature check.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};

use petstore_domain::CustomerId;

use super::oidc::OidcIssuer;
use super::rejection::{NoCustomerId, TokenRejection};
use petstore_settings::{JwtSettings, OidcAlgorithm, RoleName};

/// Who a valid token says the caller is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedToken {
    /// The `sub` claim.
    pub subject: String,
    /// The roles the token grants (unknown role names are ignored).
    pub roles: BTreeSet<RoleName>,
    /// The customer the token acts as (its issuer's `customer_claim`, `sub` by default), or
    /// why it names none.
    pub customer: Result<CustomerId, NoCustomerId>,
}

impl VerifiedToken {
    fn new(subject: String, roles: BTreeSet<RoleName>) -> Self {
        let customer =
            CustomerId::parse(&subject).map_err(|_| NoCustomerId::not_an_id("sub", &subject));
        Self {
            subject,
            roles,
            customer,
        }
    }
}

/// The claims of the service's own tokens.
#[derive(Debug, Serialize, Deserialize)]
struct LocalClaims {
    iss: String,
    aud: String,
    sub: String,
    /// Always issued; optional when read, as for any token.
    iat: Option<i64>,
    /// Always issued; optional when read, as for any token.
    nbf: Option<i64>,
    exp: i64,
    roles: Vec<String>,
}

/// Just enough of an unverified token to pick the issuer whose rules apply.
#[derive(Deserialize)]
struct UnverifiedIssuer {
    iss: Option<String>,
}

/// The claims every token must carry. `nbf` is checked when present, never required: RFC
/// 9068 access tokens need not carry it, and many providers leave it out.
const REQUIRED_CLAIMS: [&str; 4] = ["iss", "aud", "exp", "sub"];

/// The header `typ` values of an access token: a plain JWT (RFC 7519), or an RFC 9068 access
/// token (`at+jwt`, which may be written as the full media type). No `typ` is a plain JWT.
fn access_token_type(typ: Option<&str>) -> Result<(), TokenRejection> {
    match typ {
        None => Ok(()),
        Some(typ)
            if ["jwt", "at+jwt", "application/at+jwt"]
                .iter()
                .any(|accepted| typ.eq_ignore_ascii_case(accepted)) =>
        {
            Ok(())
        }
        Some(typ) => Err(TokenRejection::WrongType(typ.chars().take(32).collect())),
    }
}

/// Refuses a token issued after now (beyond `leeway`); jsonwebtoken does not check `iat`.
fn issued_in_the_past(issued_at: Option<i64>, now: i64, leeway: i64) -> Result<(), TokenRejection> {
    match issued_at {
        Some(issued_at) if issued_at > now.saturating_add(leeway) => {
            Err(TokenRejection::IssuedInTheFuture)
        }
        _ => Ok(()),
    }
}

/// The service's own issuer: signs logins, verifies its tokens.
struct LocalIssuer {
    issuer: String,
    audience: String,
    ttl_seconds: u64,
    encoding: EncodingKey,
    decoding: DecodingKey,
}

/// A token that verified, remembered until it expires.
struct Verified {
    token: VerifiedToken,
    not_before: i64,
    expires: i64,
}

/// Most tokens remembered; past it the cache starts afresh (a client sends the same token
/// for its whole life, so even a small cache saves almost every verification).
const CACHE_CAPACITY: usize = 10_000;

/// Verifies bearer tokens, and issues the service's own.
///
/// Tokens that verified are remembered (by their full text, at most [`CACHE_CAPACITY`]) and
/// accepted again without decoding while `nbf` and `exp` (with the leeway) still allow them:
/// a token's claims and signature cannot change, so only time can make it invalid. A key
/// removed from an issuer's key set therefore stops new tokens at once and tokens already
/// seen at their `exp`.
#[derive(Clone)]
pub struct TokenVerifier {
    local: Option<Arc<LocalIssuer>>,
    issuers: Vec<Arc<OidcIssuer>>,
    leeway_seconds: u64,
    cache: Arc<Mutex<HashMap<String, Verified>>>,
}

impl TokenVerifier {
    /// A verifier for the local issuer (when `jwt.secret` is set) and `issuers`.
    pub fn new(
        jwt: &JwtSettings,
        issuers: Vec<Arc<OidcIssuer>>,
    ) -> Result<Self, jsonwebtoken::errors::Error> {
        let local = match &jwt.secret {
            Some(secret) => {
                let bytes = secret.expose_secret().as_bytes();
                Some(Arc::new(LocalIssuer {
                    issuer: jwt.issuer.clone(),
                    audience: jwt.audience.clone(),
                    ttl_seconds: jwt.token_ttl_seconds,
                    encoding: EncodingKey::from_secret(bytes)?,
                    decoding: DecodingKey::from_secret(bytes)?,
                }))
            }
            None => None,
        };
        Ok(Self {
            local,
            issuers,
            leeway_seconds: jwt.leeway_seconds,
            cache: Arc::new(Mutex::new(HashMap::new())),
        })
    }

    /// Whether the service issues tokens of its own (a secret is configured).
    pub fn issues_tokens(&self) -> bool {
        self.local.is_some()
    }

    /// Issues an HS256 token for `subject` with `role`, valid for the configured lifetime.
    /// Returns the token and its lifetime in seconds; `None` without a secret.
    pub fn issue(&self, subject: &str, role: RoleName) -> Option<(String, u64)> {
        let local = self.local.as_ref()?;
        let now = chrono::Utc::now().timestamp();
        let claims = LocalClaims {
            iss: local.issuer.clone(),
            aud: local.audience.clone(),
            sub: subject.to_owned(),
            iat: Some(now),
            nbf: Some(now),
            exp: now.saturating_add(i64::try_from(local.ttl_seconds).unwrap_or(i64::MAX)),
            roles: vec![role.as_str().to_owned()],
        };
        let token =
            jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &local.encoding).ok()?;
        Some((token, local.ttl_seconds))
    }

    /// Checks `token` by the rules of the issuer it names (or finds it verified before and
    /// still within its lifetime).
    pub async fn verify(&self, token: &str) -> Result<VerifiedToken, TokenRejection> {
        let now = chrono::Utc::now().timestamp();
        let leeway = i64::try_from(self.leeway_seconds).unwrap_or(i64::MAX);
        // The same bounds as jsonwebtoken's: `nbf` may be `leeway` ahead, `exp` `leeway` behind.
        let current =
            |entry: &Verified| entry.not_before <= now + leeway && entry.expires >= now - leeway;
        if let Ok(cache) = self.cache.lock() {
            match cache.get(token) {
                Some(entry) if current(entry) => return Ok(entry.token.clone()),
                Some(_) => return Err(TokenRejection::Expired),
                None => {}
            }
        }
        let (verified, not_before, expires) = self.verify_uncached(token).await?;
        if let Ok(mut cache) = self.cache.lock() {
            if cache.len() >= CACHE_CAPACITY {
                cache.clear();
            }
            cache.insert(
                token.to_owned(),
                Verified {
                    token: verified.clone(),
                    not_before,
                    expires,
                },
            );
        }
        Ok(verified)
    }

    /// Decodes and checks `token`: who it names, and its `nbf` (the earliest time it may be
    /// used: `i64::MIN` without one) and `exp`.
    async fn verify_uncached(
        &self,
        token: &str,
    ) -> Result<(VerifiedToken, i64, i64), TokenRejection> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenRejection::Malformed)?;
        access_token_type(header.typ.as_deref())?;
        let now = chrono::Utc::now().timestamp();
        let leeway = i64::try_from(self.leeway_seconds).unwrap_or(i64::MAX);
        let issuer = jsonwebtoken::dangerous::insecure_decode_claims::<UnverifiedIssuer>(token)
            .map_err(|_| TokenRejection::Malformed)?
            .iss
            .ok_or_else(|| TokenRejection::MissingClaim("iss".to_owned()))?;
        if let Some(local) = self.local.as_ref().filter(|local| local.issuer == issuer) {
            if header.alg != Algorithm::HS256 {
                return Err(TokenRejection::AlgorithmNotAccepted);
            }
            let validation = self.validation(Algorithm::HS256, &local.issuer, &local.audience);
            let claims = jsonwebtoken::decode::<LocalClaims>(token, &local.decoding, &validation)
                .map_err(|error| TokenRejection::from_validation(&error))?
                .claims;
            issued_in_the_past(claims.iat, now, leeway)?;
            let roles = claims
                .roles
                .iter()
                .filter_map(|role| RoleName::parse(role))
                .collect();
            let verified = VerifiedToken::new(claims.sub, roles);
            return Ok((verified, claims.nbf.unwrap_or(i64::MIN), claims.exp));
        }
        let oidc = self
            .oidc_issuer(&issuer)
            .ok_or(TokenRejection::UnknownIssuer)?;
        let key = signing_key(oidc, &header).await?;
        let validation = self.validation(header.alg, oidc.issuer(), oidc.audience());
        let claims = jsonwebtoken::decode::<serde_json::Value>(token, &key, &validation)
            .map_err(|error| TokenRejection::from_validation(&error))?
            .claims;
        let subject = claims
            .get("sub")
            .and_then(serde_json::Value::as_str)
            .filter(|subject| !subject.is_empty())
            .ok_or_else(|| TokenRejection::MissingClaim("sub".to_owned()))?
            .to_owned();
        // Validation checked their types: numbers where present, `exp` required.
        let time = |name: &str| {
            claims
                .get(name)
                .and_then(serde_json::Value::as_f64)
                .map(|seconds| seconds as i64)
        };
        issued_in_the_past(time("iat"), now, leeway)?;
        let expires = time("exp").ok_or_else(|| TokenRejection::MissingClaim("exp".to_owned()))?;
        let verified = VerifiedToken {
            customer: oidc.customer(&claims),
            subject,
            roles: oidc.roles(&claims),
        };
        Ok((verified, time("nbf").unwrap_or(i64::MIN), expires))
    }

    /// The configured OIDC issuer whose `iss` is `issuer`.
    pub fn oidc_issuer(&self, issuer: &str) -> Option<&Arc<OidcIssuer>> {
        self.issuers
            .iter()
            .find(|candidate| candidate.issuer() == issuer)
    }

    /// Checks an ID token of `oidc` for the client `client_id` (OpenID Connect Core
    /// 3.1.3.7): signed by one of the issuer's keys with one of its algorithms, `iss` the
    /// issuer, `aud` naming the client (and `azp` the client when it names several), not
    /// expired nor issued in the future, and carrying the sign-in's `nonce`. Returns its
    /// subject.
    pub async fn verify_id_token(
        &self,
        oidc: &OidcIssuer,
        token: &str,
        client_id: &str,
        nonce: &str,
    ) -> Result<String, TokenRejection> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenRejection::Malformed)?;
        let key = signing_key(oidc, &header).await?;
        let validation = self.validation(header.alg, oidc.issuer(), client_id);
        let claims = jsonwebtoken::decode::<serde_json::Value>(token, &key, &validation)
            .map_err(|error| TokenRejection::from_validation(&error))?
            .claims;
        let now = chrono::Utc::now().timestamp();
        let leeway = i64::try_from(self.leeway_seconds).unwrap_or(i64::MAX);
        // Required of an ID token (jsonwebtoken requires only `exp`, `nbf`, `aud`, `iss`, `sub`).
        let issued_at = claims
            .get("iat")
            .and_then(serde_json::Value::as_f64)
            .map(|seconds| seconds as i64)
            .ok_or_else(|| TokenRejection::MissingClaim("iat".to_owned()))?;
        issued_in_the_past(Some(issued_at), now, leeway)?;
        let audiences = claims
            .get("aud")
            .and_then(serde_json::Value::as_array)
            .map_or(1, Vec::len);
        if audiences > 1 && claims.get("azp").and_then(serde_json::Value::as_str) != Some(client_id)
        {
            return Err(TokenRejection::WrongAudience);
        }
        let sent = claims.get("nonce").and_then(serde_json::Value::as_str);
        if !sent.is_some_and(|sent| constant_time_equal(sent.as_bytes(), nonce.as_bytes())) {
            return Err(TokenRejection::WrongNonce);
        }
        claims
            .get("sub")
            .and_then(serde_json::Value::as_str)
            .filter(|subject| !subject.is_empty())
            .map(str::to_owned)
            .ok_or_else(|| TokenRejection::MissingClaim("sub".to_owned()))
    }

    fn validation(&self, algorithm: Algorithm, issuer: &str, audience: &str) -> Validation {
        let mut validation = Validation::new(algorithm);
        validation.set_required_spec_claims(&REQUIRED_CLAIMS);
        validation.set_issuer(&[issuer]);
        validation.set_audience(&[audience]);
        validation.validate_nbf = true;
        validation.leeway = self.leeway_seconds;
        validation
    }
}

/// The key `oidc` signed a token with `header` by: the algorithm must be one the issuer
/// signs with, and the `kid` one of its keys (refetched once when unknown).
async fn signing_key(
    oidc: &OidcIssuer,
    header: &Header,
) -> Result<Arc<DecodingKey>, TokenRejection> {
    let algorithm = match header.alg {
        Algorithm::RS256 => OidcAlgorithm::RS256,
        Algorithm::ES256 => OidcAlgorithm::ES256,
        _ => return Err(TokenRejection::AlgorithmNotAccepted),
    };
    if !oidc.accepts(algorithm) {
        return Err(TokenRejection::AlgorithmNotAccepted);
    }
    let kid = header.kid.as_deref().ok_or(TokenRejection::UnknownKey)?;
    oidc.key(kid, header.alg).await
}

/// Whether `a` equals `b`, in time that depends on their lengths only.
pub(crate) fn constant_time_equal(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0, |diff, (x, y)| diff | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::SecretString;

    fn verifier(leeway_seconds: u64) -> TokenVerifier {
        let jwt = JwtSettings {
            secret: Some(SecretString::from("unit-test-secret-of-at-least-32-bytes")),
            leeway_seconds,
            ..JwtSettings::default()
        };
        TokenVerifier::new(&jwt, Vec::new()).expect("a valid secret")
    }

    fn signed(verifier: &TokenVerifier, expires_in: i64) -> String {
        let local = verifier.local.as_ref().expect("local issuer");
        let now = chrono::Utc::now().timestamp();
        let claims = LocalClaims {
            iss: local.issuer.clone(),
            aud: local.audience.clone(),
            sub: "customer-001".to_owned(),
            iat: Some(now),
            nbf: Some(now),
            exp: now + expires_in,
            roles: vec!["customer".to_owned()],
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &local.encoding)
            .expect("signed")
    }

    /// A token of the local issuer with `claims` over the usual ones and `typ` in its header.
    fn shaped(verifier: &TokenVerifier, typ: Option<&str>, claims: serde_json::Value) -> String {
        let local = verifier.local.as_ref().expect("local issuer");
        let now = chrono::Utc::now().timestamp();
        let mut body = serde_json::json!({
            "iss": local.issuer, "aud": local.audience, "sub": "customer-001",
            "iat": now, "exp": now + 600, "roles": ["customer"],
        });
        for (key, value) in claims.as_object().expect("an object") {
            body[key] = value.clone();
        }
        let mut header = Header::new(Algorithm::HS256);
        header.typ = typ.map(str::to_owned);
        jsonwebtoken::encode(&header, &body, &local.encoding).expect("signed")
    }

    #[tokio::test]
    async fn nbf_is_checked_when_present_iat_may_not_be_ahead_and_typ_must_be_an_access_tokens() {
        let verifier = verifier(30);
        let now = chrono::Utc::now().timestamp();
        let accepted = [
            ("no nbf", Some("JWT"), serde_json::json!({})),
            ("no typ", None, serde_json::json!({})),
            ("RFC 9068 typ", Some("at+jwt"), serde_json::json!({})),
            (
                "its media type",
                Some("application/at+jwt"),
                serde_json::json!({}),
            ),
            (
                "nbf within the leeway",
                Some("JWT"),
                serde_json::json!({"nbf": now + 20}),
            ),
            (
                "iat within the leeway",
                Some("JWT"),
                serde_json::json!({"iat": now + 20}),
            ),
            ("no iat", Some("JWT"), serde_json::json!({"iat": null})),
        ];
        for (name, typ, claims) in accepted {
            let token = shaped(&verifier, typ, claims);
            assert!(verifier.verify(&token).await.is_ok(), "{name}");
        }
        let refused = [
            (
                "nbf ahead",
                Some("JWT"),
                serde_json::json!({"nbf": now + 600}),
                TokenRejection::NotYetValid,
            ),
            (
                "iat ahead",
                Some("JWT"),
                serde_json::json!({"iat": now + 600}),
                TokenRejection::IssuedInTheFuture,
            ),
            (
                "an ID token's typ",
                Some("id_token+jwt"),
                serde_json::json!({}),
                TokenRejection::WrongType("id_token+jwt".to_owned()),
            ),
        ];
        for (name, typ, claims, expected) in refused {
            let token = shaped(&verifier, typ, claims);
            assert_eq!(verifier.verify(&token).await, Err(expected), "{name}");
        }
    }

    /// An issuer of `https://idp.example` whose key set (a file) is the EC fixture's public
    /// key, `ec-1`; and that key, to sign with.
    async fn issuer_with_ec_key() -> (OidcIssuer, EncodingKey) {
        use jsonwebtoken::jwk::{Jwk, JwkSet};
        const EC: &[u8] = include_bytes!("../../../../tests/fixtures/oidc-ec.pem");
        let key = EncodingKey::from_ec_pem(EC).expect("a test key");
        let mut jwk = Jwk::from_encoding_key(&key, Algorithm::ES256).expect("a public JWK");
        jwk.common.key_id = Some("ec-1".to_owned());
        let file =
            std::env::temp_dir().join(format!("petstore-keys-{}.json", uuid::Uuid::new_v4()));
        let set = serde_json::to_vec(&JwkSet { keys: vec![jwk] }).expect("json");
        std::fs::write(&file, set).expect("written");
        let settings = serde_json::from_value(serde_json::json!({
            "issuer": "https://idp.example", "audience": "petstore-api", "jwks_file": file,
        }))
        .expect("issuer settings");
        let policies = petstore_resilience::Policies::fixed(
            &petstore_settings::ResilienceSettings::default(),
            &petstore_telemetry::metrics::Metrics::new(),
        );
        let issuer = OidcIssuer::new(
            settings,
            &petstore_settings::OidcSettings::default(),
            None,
            policies.oidc.clone(),
        )
        .expect("an issuer");
        issuer.load().await.expect("the key file");
        std::fs::remove_file(&file).expect("removed");
        (issuer, key)
    }

    #[tokio::test]
    async fn an_id_token_must_be_the_issuers_for_this_client_fresh_and_this_sign_ins() {
        let (issuer, key) = issuer_with_ec_key().await;
        let verifier = verifier(30);
        let now = chrono::Utc::now().timestamp();
        let sign = |kid: &str, changes: serde_json::Value| {
            let mut claims = serde_json::json!({
                "iss": "https://idp.example", "aud": "petstore-console", "sub": "ops",
                "iat": now, "exp": now + 300, "nonce": "nonce-1",
            });
            for (name, value) in changes.as_object().expect("an object") {
                if value.is_null() {
                    claims.as_object_mut().expect("an object").remove(name);
                } else {
                    claims[name] = value.clone();
                }
            }
            let mut header = Header::new(Algorithm::ES256);
            header.kid = Some(kid.to_owned());
            jsonwebtoken::encode(&header, &claims, &key).expect("signed")
        };
        let check = |token: String| {
            let verifier = verifier.clone();
            let issuer = &issuer;
            async move {
                verifier
                    .verify_id_token(issuer, &token, "petstore-console", "nonce-1")
                    .await
            }
        };
        assert_eq!(
            check(sign("ec-1", serde_json::json!({}))).await,
            Ok("ops".to_owned())
        );
        let several = serde_json::json!(["petstore-console", "other"]);
        assert_eq!(
            check(sign(
                "ec-1",
                serde_json::json!({"aud": several, "azp": "petstore-console"})
            ))
            .await,
            Ok("ops".to_owned()),
            "several audiences, this client the authorized party"
        );
        let refused = [
            (
                "another nonce",
                serde_json::json!({"nonce": "nonce-2"}),
                TokenRejection::WrongNonce,
            ),
            (
                "no nonce",
                serde_json::json!({"nonce": null}),
                TokenRejection::WrongNonce,
            ),
            (
                "another client",
                serde_json::json!({"aud": "other"}),
                TokenRejection::WrongAudience,
            ),
            (
                "several audiences, no azp",
                serde_json::json!({"aud": several}),
                TokenRejection::WrongAudience,
            ),
            (
                "another issuer",
                serde_json::json!({"iss": "https://evil.example"}),
                TokenRejection::UnknownIssuer,
            ),
            (
                "expired",
                serde_json::json!({"exp": now - 300}),
                TokenRejection::Expired,
            ),
            (
                "no iat",
                serde_json::json!({"iat": null}),
                TokenRejection::MissingClaim("iat".to_owned()),
            ),
            (
                "iat ahead",
                serde_json::json!({"iat": now + 600}),
                TokenRejection::IssuedInTheFuture,
            ),
            (
                "no subject",
                serde_json::json!({"sub": ""}),
                TokenRejection::MissingClaim("sub".to_owned()),
            ),
        ];
        for (name, changes, expected) in refused {
            assert_eq!(check(sign("ec-1", changes)).await, Err(expected), "{name}");
        }
        assert_eq!(
            check(sign("ec-2", serde_json::json!({}))).await,
            Err(TokenRejection::UnknownKey),
            "a key the issuer does not have"
        );
        // Another token's claims under this one's signature.
        let genuine = sign("ec-1", serde_json::json!({}));
        let other = sign("ec-1", serde_json::json!({"sub": "admin"}));
        let parts: Vec<&str> = genuine.split('.').collect();
        let claims = other.split('.').nth(1).expect("claims");
        let forged = format!("{}.{claims}.{}", parts[0], parts[2]);
        assert_eq!(check(forged).await, Err(TokenRejection::BadSignature));
    }

    #[tokio::test]
    async fn a_remembered_token_is_refused_once_it_expires() {
        let verifier = verifier(0);
        let token = signed(&verifier, 1);
        let first = verifier.verify(&token).await.expect("valid");
        assert_eq!(first.subject, "customer-001");
        assert_eq!(verifier.verify(&token).await, Ok(first));
        tokio::time::sleep(std::time::Duration::from_millis(2_100)).await;
        assert_eq!(verifier.verify(&token).await, Err(TokenRejection::Expired));
        // A token that never verified is never remembered.
        let forged = format!("{}x", signed(&verifier, 600));
        assert_eq!(
            verifier.verify(&forged).await,
            Err(TokenRejection::BadSignature)
        );
        assert!(verifier
            .cache
            .lock()
            .expect("lock")
            .keys()
            .all(|key| key == &token));
    }
}
