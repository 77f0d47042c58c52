//! Why a token is refused, and why a caller has no customer id: what token verification
//! (the service's own tokens and OIDC issuers' alike) reports.

use jsonwebtoken::errors::ErrorKind;

/// Why a token was refused. The text goes into the audit trail and the `WWW-Authenticate`
/// error description; it never contains the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenRejection {
    /// Not three base64url parts of JSON, or an algorithm nobody accepts (`none`).
    #[error("the token is malformed or names an unsupported algorithm")]
    Malformed,
    /// `iss` names no configured issuer.
    #[error("the token's issuer is not trusted")]
    UnknownIssuer,
    /// The issuer does not sign with the token's `alg`.
    #[error("the token's algorithm is not accepted for its issuer")]
    AlgorithmNotAccepted,
    /// The issuer's key set has no key with the token's `kid` (after a refetch).
    #[error("the token's signing key is unknown")]
    UnknownKey,
    /// The signature does not verify.
    #[error("the token's signature is invalid")]
    BadSignature,
    /// `exp` has passed.
    #[error("the token has expired")]
    Expired,
    /// `nbf` is in the future.
    #[error("the token is not valid yet")]
    NotYetValid,
    /// `iat` is in the future (beyond the leeway): a token cannot be issued later than now.
    #[error("the token claims to be issued in the future (iat)")]
    IssuedInTheFuture,
    /// The header's `typ` is neither `JWT` nor `at+jwt` (RFC 9068): another kind of token
    /// (an ID token's, a logout token's) is not an access token.
    #[error("the token's type (typ {0:?}) is not an access token's (JWT or at+jwt)")]
    WrongType(String),
    /// `aud` does not name this service.
    #[error("the token is not meant for this service (audience)")]
    WrongAudience,
    /// A required claim (`iss`, `aud`, `exp`, `sub`) is missing, or a claim is malformed.
    #[error("the token lacks a required claim: {0}")]
    MissingClaim(String),
    /// An ID token's `nonce` is not the one its sign-in sent (a replayed or injected token).
    #[error("the ID token's nonce is not this sign-in's")]
    WrongNonce,
}

impl TokenRejection {
    /// A short, bounded label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::UnknownIssuer => "unknown_issuer",
            Self::AlgorithmNotAccepted => "algorithm",
            Self::UnknownKey => "unknown_key",
            Self::BadSignature => "bad_signature",
            Self::Expired => "expired",
            Self::NotYetValid | Self::IssuedInTheFuture => "not_yet_valid",
            Self::WrongType(_) => "wrong_type",
            Self::WrongAudience => "wrong_audience",
            Self::MissingClaim(_) => "missing_claim",
            Self::WrongNonce => "wrong_nonce",
        }
    }

    pub(crate) fn from_validation(error: &jsonwebtoken::errors::Error) -> Self {
        match error.kind() {
            ErrorKind::ExpiredSignature => Self::Expired,
            ErrorKind::ImmatureSignature => Self::NotYetValid,
            ErrorKind::InvalidAudience => Self::WrongAudience,
            ErrorKind::InvalidIssuer => Self::UnknownIssuer,
            ErrorKind::InvalidSignature => Self::BadSignature,
            ErrorKind::InvalidAlgorithm => Self::AlgorithmNotAccepted,
            ErrorKind::MissingRequiredClaim(claim) | ErrorKind::InvalidClaimFormat(claim) => {
                Self::MissingClaim(claim.clone())
            }
            _ => Self::Malformed,
        }
    }
}

/// Why a caller has no customer id: the token's claim is missing or not in the customer-id
/// alphabet (`auth0|123`). Such a caller is refused 403 wherever a customer id is needed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct NoCustomerId(String);

impl NoCustomerId {
    /// The token has no string claim `claim`.
    pub fn missing(claim: &str) -> Self {
        Self(format!(
            "your token has no {claim} claim naming a customer: only an admin may act here"
        ))
    }

    /// The token's `claim` is `value`, which is no customer id.
    pub fn not_an_id(claim: &str, value: &str) -> Self {
        let shown: String = value.chars().take(64).collect();
        Self(format!(
            "your token's {claim} claim ({shown:?}) is not a customer id (1 to 128 of letters, \
             digits and -_.@+): ask the service's operator to map customers from another claim \
             (security.oidc.issuers[].customer_claim)"
        ))
    }
}
