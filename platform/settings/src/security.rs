//! The `security` section: who may call what, how tokens are checked, how fast, and the
//! limits every request is held to.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use super::{Environment, SettingsError};

/// Authentication, authorization, rate limits and request hardening.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SecuritySettings {
    /// Off: the seed's demo mode. Requests without a token act as the `demo` role (every
    /// route open). Allowed in `local` only, and logged loudly at start-up.
    pub authentication_required: bool,
    /// The service's own tokens (`POST /auth/login`).
    pub jwt: JwtSettings,
    /// Who may log in. Staging and production ship none.
    pub users: Vec<UserSettings>,
    /// Identity providers whose tokens are accepted.
    pub oidc: OidcSettings,
    /// Request rates.
    pub rate_limits: RateLimitSettings,
    /// Proxies whose `X-Forwarded-For` is believed, as addresses or CIDR blocks
    /// (`10.0.0.0/8`). Empty: the client is the socket's peer.
    pub trusted_proxies: Vec<String>,
    /// Origins allowed by CORS (`https://shop.example`). Empty: no CORS headers at all.
    pub cors_allowed_origins: Vec<String>,
    /// A request that takes longer is answered 503, in milliseconds.
    pub request_timeout_ms: u64,
    /// Timeouts of particular routes, replacing `request_timeout_ms` for them:
    /// `"METHOD /route/template"` to milliseconds (the route must exist).
    pub route_timeouts_ms: BTreeMap<String, u64>,
    /// Largest accepted total size of request headers, in bytes (431 beyond).
    pub max_header_bytes: usize,
}

impl Default for SecuritySettings {
    fn default() -> Self {
        Self {
            authentication_required: true,
            jwt: JwtSettings::default(),
            users: Vec::new(),
            oidc: OidcSettings::default(),
            rate_limits: RateLimitSettings::default(),
            trusted_proxies: Vec::new(),
            cors_allowed_origins: Vec::new(),
            request_timeout_ms: 30_000,
            route_timeouts_ms: BTreeMap::new(),
            max_header_bytes: 16 * 1024,
        }
    }
}

/// The service's own HS256 tokens.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JwtSettings {
    /// The HMAC secret (`PETSTORE__SECURITY__JWT__SECRET`), at least 32 bytes outside
    /// `local`. Unset: `POST /auth/login` is off.
    #[serde(serialize_with = "super::redacted_option")]
    pub secret: Option<SecretString>,
    /// The `iss` of issued tokens, and the only one accepted for HS256.
    pub issuer: String,
    /// The `aud` of issued tokens.
    pub audience: String,
    /// Lifetime of an issued token, in seconds.
    pub token_ttl_seconds: u64,
    /// Clock skew tolerated on `exp` and `nbf`, in seconds (for OIDC tokens too).
    pub leeway_seconds: u64,
}

impl Default for JwtSettings {
    fn default() -> Self {
        Self {
            secret: None,
            issuer: "petstore".to_owned(),
            audience: "petstore".to_owned(),
            token_ttl_seconds: 3_600,
            leeway_seconds: 30,
        }
    }
}

/// What a user may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RoleName {
    /// Places orders and acts on its own orders only.
    Customer,
    /// Acts on every order, and on `/admin/*`.
    Admin,
}

impl RoleName {
    /// The role as written in tokens and config.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Customer => "customer",
            Self::Admin => "admin",
        }
    }

    /// Reads a role name as written in a token's roles claim.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "customer" => Some(Self::Customer),
            "admin" => Some(Self::Admin),
            _ => None,
        }
    }
}

/// One user who may log in with a password.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserSettings {
    /// The login name.
    pub username: String,
    /// An Argon2 PHC string (`$argon2id$v=19$...`), never the password itself:
    /// `petstore hash-password` makes one.
    #[serde(serialize_with = "super::redacted")]
    pub password_hash: SecretString,
    /// The user's role.
    pub role: RoleName,
    /// The token's `sub`: the customer id a customer orders as. Default: the username.
    #[serde(default)]
    pub subject: Option<String>,
}

impl UserSettings {
    /// The subject of this user's tokens.
    pub fn subject(&self) -> &str {
        self.subject.as_deref().unwrap_or(&self.username)
    }
}

impl std::fmt::Debug for UserSettings {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("UserSettings")
            .field("username", &self.username)
            .field("role", &self.role)
            .field("subject", &self.subject())
            .finish_non_exhaustive()
    }
}

/// Identity providers.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OidcSettings {
    /// Accepted issuers.
    pub issuers: Vec<OidcIssuerSettings>,
    /// After a key-set fetch, an unknown `kid` waits this long before the next one, in
    /// seconds (random kids cannot make the service hammer the provider).
    pub refetch_cooldown_seconds: u64,
    /// A key-set or discovery fetch that takes longer fails, in milliseconds.
    pub fetch_timeout_ms: u64,
}

impl Default for OidcSettings {
    fn default() -> Self {
        Self {
            issuers: Vec::new(),
            refetch_cooldown_seconds: 60,
            fetch_timeout_ms: 5_000,
        }
    }
}

/// The signing algorithms accepted from an identity provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum OidcAlgorithm {
    /// RSASSA-PKCS1-v1_5 with SHA-256.
    RS256,
    /// ECDSA P-256 with SHA-256.
    ES256,
}

/// One identity provider.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OidcIssuerSettings {
    /// The exact `iss` of its tokens (`https://idp.example/realms/shop`).
    pub issuer: String,
    /// The `aud` its tokens must name.
    pub audience: String,
    /// The key set's URL, on the issuer's host. Unset (and no `jwks_file`): discovered from
    /// `{issuer}/.well-known/openid-configuration`.
    #[serde(default)]
    pub jwks_uri: Option<String>,
    /// A key set read from a file instead (no fetching, no rotation).
    #[serde(default)]
    pub jwks_file: Option<PathBuf>,
    /// Accepted algorithms (default both).
    #[serde(default = "default_algorithms")]
    pub algorithms: Vec<OidcAlgorithm>,
    /// The claim holding the roles: a string or an array of strings; a dotted path reaches
    /// into objects (`realm_access.roles`). Unknown role names are ignored.
    #[serde(default = "default_roles_claim")]
    pub roles_claim: String,
    /// The claim naming the customer a token acts as (a dotted path, like `roles_claim`):
    /// its value must be a customer id (1 to 128 of letters, digits and `-_.@+`), else the
    /// caller is refused 403 wherever a customer id is needed. Default `sub`.
    #[serde(default = "default_customer_claim")]
    pub customer_claim: String,
}

fn default_customer_claim() -> String {
    "sub".to_owned()
}

fn default_algorithms() -> Vec<OidcAlgorithm> {
    vec![OidcAlgorithm::RS256, OidcAlgorithm::ES256]
}

fn default_roles_claim() -> String {
    "roles".to_owned()
}

/// Request rates, per subject (per client IP for anonymous callers). Live: a change applies
/// at once (the counts start afresh).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitSettings {
    /// Off: no request is refused for its rate.
    pub enabled: bool,
    /// Requests a minute per subject on every route without its own limit.
    pub default_per_minute: u32,
    /// Per-route limits, keyed `"METHOD /route/template"` (e.g.
    /// `"POST /petstore-domain/orders": 30`), requests a minute per subject.
    pub routes: BTreeMap<String, u32>,
    /// Login attempts a minute, per username and per client IP.
    pub login_per_minute: u32,
    /// Most keys remembered per limit; the least recently seen go first.
    pub max_keys: usize,
}

impl Default for RateLimitSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            default_per_minute: 100,
            routes: BTreeMap::from([("POST /petstore-domain/orders".to_owned(), 30)]),
            login_per_minute: 10,
            max_keys: 100_000,
        }
    }
}

impl RateLimitSettings {
    /// Refuses zero limits and malformed route keys, naming the key.
    pub fn validate(&self) -> Result<(), SettingsError> {
        if self.default_per_minute == 0 || self.login_per_minute == 0 {
            return Err(SettingsError::invalid(
                "security.rate_limits",
                "limits must be above 0 (set enabled: false to turn them off)",
            ));
        }
        if self.max_keys == 0 {
            return Err(SettingsError::invalid(
                "security.rate_self.max_keys",
                "must be above 0",
            ));
        }
        for (route, limit) in &self.routes {
            if !is_route_key(route) || *limit == 0 {
                return Err(SettingsError::invalid(
                    format!("security.rate_limits.routes.{route:?}"),
                    "keys are \"METHOD /route/template\", limits above 0",
                ));
            }
        }
        Ok(())
    }
}

/// Whether `key` reads `"METHOD /route/template"`.
pub fn is_route_key(key: &str) -> bool {
    key.split_once(' ').is_some_and(|(method, path)| {
        !method.is_empty()
            && method.bytes().all(|b| b.is_ascii_uppercase())
            && path.starts_with('/')
    })
}

/// A trusted proxy: one address, or a block of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxyBlock {
    network: IpAddr,
    prefix: u8,
}

impl ProxyBlock {
    /// Reads `10.1.2.3`, `10.0.0.0/8`, `::1` or `fd00::/8`.
    pub fn parse(text: &str) -> Option<Self> {
        let (address, prefix) = match text.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix.parse::<u8>().ok()?)),
            None => (text, None),
        };
        let network: IpAddr = address.trim().parse().ok()?;
        let width = if network.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(width);
        (prefix <= width).then_some(Self { network, prefix })
    }

    /// Whether `address` is in the block.
    pub fn contains(&self, address: IpAddr) -> bool {
        let address = canonical(address);
        match (self.network, address) {
            (IpAddr::V4(network), IpAddr::V4(address)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(network) & mask == u32::from(address) & mask
            }
            (IpAddr::V6(network), IpAddr::V6(address)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(network) & mask == u128::from(address) & mask
            }
            _ => false,
        }
    }
}

/// An IPv4 address mapped into IPv6 (`::ffff:10.0.0.1`) as the IPv4 address it is.
pub fn canonical(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

/// The smallest token secret accepted outside `local`, in bytes.
pub const MIN_SECRET_BYTES: usize = 32;

impl SecuritySettings {
    /// The trusted proxies, parsed (validation has refused malformed ones).
    pub fn proxy_blocks(&self) -> Vec<ProxyBlock> {
        self.trusted_proxies
            .iter()
            .filter_map(|text| ProxyBlock::parse(text))
            .collect()
    }

    pub(super) fn validate(&self, environment: &Environment) -> Result<(), SettingsError> {
        if !self.authentication_required && !environment.is_local() {
            return Err(SettingsError::invalid(
                "security.authentication_required",
                format!("demo mode (false) is allowed in the local environment only, not in {environment}"),
            ));
        }
        match &self.jwt.secret {
            Some(secret)
                if secret.expose_secret().len() < MIN_SECRET_BYTES && !environment.is_local() =>
            {
                return Err(SettingsError::invalid(
                    "security.jwt.secret",
                    format!("at least {MIN_SECRET_BYTES} bytes outside local"),
                ));
            }
            Some(secret)
                if secret.expose_secret() == LOCAL_DEVELOPMENT_SECRET
                    && !environment.is_local() =>
            {
                return Err(SettingsError::invalid(
                    "security.jwt.secret",
                    "the local development secret is public: set PETSTORE__SECURITY__JWT__SECRET",
                ));
            }
            // In local, the secret kept in the data folder (`ensure_development_secret`).
            None if environment.is_local() => {}
            None if !self.users.is_empty() => {
                return Err(SettingsError::invalid(
                    "security.jwt.secret",
                    "users are configured, so logins need a secret (PETSTORE__SECURITY__JWT__SECRET)",
                ));
            }
            None if self.authentication_required && self.oidc.issuers.is_empty() => {
                return Err(SettingsError::invalid(
                    "security.jwt.secret",
                    "no token could ever be accepted: set a secret or an OIDC issuer",
                ));
            }
            _ => {}
        }
        if self.jwt.token_ttl_seconds == 0 {
            return Err(SettingsError::invalid(
                "security.jwt.token_ttl_seconds",
                "must be above 0",
            ));
        }
        if self.jwt.leeway_seconds > 300 {
            return Err(SettingsError::invalid(
                "security.jwt.leeway_seconds",
                "at most 300",
            ));
        }
        let mut usernames = std::collections::BTreeSet::new();
        for (index, user) in self.users.iter().enumerate() {
            let key = format!("security.users[{index}]");
            if user.username.is_empty() || !usernames.insert(user.username.as_str()) {
                return Err(SettingsError::invalid(
                    key,
                    "usernames must be non-empty and unique",
                ));
            }
            let hash = user.password_hash.expose_secret();
            if !hash.starts_with("$argon2")
                || argon2::password_hash::phc::PasswordHash::new(hash).is_err()
            {
                return Err(SettingsError::invalid(
                    format!("{key}.password_hash"),
                    "must be an Argon2 PHC string ($argon2id$...), never a password",
                ));
            }
            if petstore_domain::CustomerId::parse(user.subject()).is_err() {
                return Err(SettingsError::invalid(
                    format!("{key}.subject"),
                    "1 to 128 characters of letters, digits and -_.@+",
                ));
            }
        }
        for (index, issuer) in self.oidc.issuers.iter().enumerate() {
            let key = format!("security.oidc.issuers[{index}]");
            issuer_url(&issuer.issuer)
                .map_err(|reason| SettingsError::invalid(format!("{key}.issuer"), reason))?;
            if issuer.audience.is_empty() {
                return Err(SettingsError::invalid(
                    format!("{key}.audience"),
                    "must not be empty",
                ));
            }
            for (name, claim) in [
                ("roles_claim", &issuer.roles_claim),
                ("customer_claim", &issuer.customer_claim),
            ] {
                if claim.is_empty() || claim.split('.').any(str::is_empty) {
                    return Err(SettingsError::invalid(
                        format!("{key}.{name}"),
                        "a claim name, or a dotted path of names (realm_access.roles)",
                    ));
                }
            }
            if issuer.algorithms.is_empty() {
                return Err(SettingsError::invalid(
                    format!("{key}.algorithms"),
                    "name at least one",
                ));
            }
            if issuer.jwks_uri.is_some() && issuer.jwks_file.is_some() {
                return Err(SettingsError::invalid(
                    key,
                    "give jwks_uri or jwks_file, not both",
                ));
            }
            if let Some(uri) = &issuer.jwks_uri {
                same_host(&issuer.issuer, uri)
                    .map_err(|reason| SettingsError::invalid(format!("{key}.jwks_uri"), reason))?;
            }
        }
        for (index, proxy) in self.trusted_proxies.iter().enumerate() {
            if ProxyBlock::parse(proxy).is_none() {
                return Err(SettingsError::invalid(
                    format!("security.trusted_proxies[{index}]"),
                    format!("{proxy:?} is not an address or CIDR block"),
                ));
            }
        }
        for (index, origin) in self.cors_allowed_origins.iter().enumerate() {
            if !(origin.starts_with("https://") || origin.starts_with("http://"))
                || origin.ends_with('/')
                || origin == "*"
            {
                return Err(SettingsError::invalid(
                    format!("security.cors_allowed_origins[{index}]"),
                    "an origin such as https://shop.example (no path, no wildcard)",
                ));
            }
        }
        self.rate_limits.validate()?;
        if self.request_timeout_ms == 0 {
            return Err(SettingsError::invalid(
                "security.request_timeout_ms",
                "must be above 0",
            ));
        }
        for (route, timeout) in &self.route_timeouts_ms {
            if !is_route_key(route) || *timeout == 0 {
                return Err(SettingsError::invalid(
                    format!("security.route_timeouts_ms.{route:?}"),
                    "keys are \"METHOD /route/template\", timeouts above 0",
                ));
            }
        }
        if self.max_header_bytes < 1024 {
            return Err(SettingsError::invalid(
                "security.max_header_bytes",
                "at least 1024",
            ));
        }
        Ok(())
    }
}

/// The public secret `config/local.yaml` shipped before `local` generated its own per data
/// folder: known to anyone, so refused everywhere but `local`.
pub const LOCAL_DEVELOPMENT_SECRET: &str = "local-development-secret-not-for-any-real-deployment";

/// Checks an issuer's URL: https, or http on a loopback host (a provider on the same
/// machine, as in tests). Returns the host.
pub fn issuer_url(url: &str) -> Result<String, String> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| format!("{url:?} is not a URL"))?;
    let authority = rest.split('/').next().unwrap_or_default();
    let host = match authority.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) && !host.ends_with(':') => {
            host
        }
        _ => authority,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || authority.contains('@') {
        return Err(format!("{url:?} has no host"));
    }
    let loopback = host == "localhost"
        || host
            .parse::<IpAddr>()
            .is_ok_and(|address| address.is_loopback());
    match scheme {
        "https" => Ok(host.to_owned()),
        "http" if loopback => Ok(host.to_owned()),
        _ => Err(format!(
            "{url:?} must be https (http only on a loopback host)"
        )),
    }
}

/// Checks that `url` is on the issuer's host, with the same rules.
pub fn same_host(issuer: &str, url: &str) -> Result<(), String> {
    let expected = issuer_url(issuer)?;
    let host = issuer_url(url)?;
    if host.eq_ignore_ascii_case(&expected) {
        Ok(())
    } else {
        Err(format!("{url:?} is not on the issuer's host {expected}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_blocks_match_addresses_in_them_only() {
        let block = ProxyBlock::parse("10.0.0.0/8").expect("valid");
        assert!(block.contains("10.200.1.2".parse().expect("ip")));
        assert!(block.contains("::ffff:10.1.1.1".parse().expect("ip")));
        assert!(!block.contains("11.0.0.1".parse().expect("ip")));
        let single = ProxyBlock::parse("::1").expect("valid");
        assert!(single.contains("::1".parse().expect("ip")));
        assert!(!single.contains("::2".parse().expect("ip")));
        assert!(ProxyBlock::parse("10.0.0.0/33").is_none());
        assert!(ProxyBlock::parse("proxy").is_none());
        assert!(ProxyBlock::parse("0.0.0.0/0")
            .expect("valid")
            .contains("8.8.8.8".parse().expect("ip")));
    }

    #[test]
    fn issuers_are_https_or_loopback_http_and_key_sets_on_their_host() {
        assert!(issuer_url("https://idp.example/realms/a").is_ok());
        assert!(issuer_url("http://127.0.0.1:9000").is_ok());
        assert!(issuer_url("http://[::1]:9000/x").is_ok());
        assert!(issuer_url("http://idp.example").is_err());
        assert!(issuer_url("https://user@idp.example").is_err());
        assert!(same_host("https://idp.example/a", "https://idp.example/keys").is_ok());
        assert!(same_host("https://idp.example/a", "https://evil.example/keys").is_err());
        assert!(same_host("https://idp.example/a", "http://idp.example/keys").is_err());
    }

    fn local() -> Environment {
        Environment::default()
    }

    fn production() -> Environment {
        Environment("production".to_owned())
    }

    #[test]
    fn demo_mode_and_weak_secrets_are_local_only() {
        let mut settings = SecuritySettings {
            authentication_required: false,
            ..SecuritySettings::default()
        };
        settings.jwt.secret = Some(SecretString::from("short"));
        assert!(settings.validate(&local()).is_ok());
        let error = settings.validate(&production()).expect_err("demo mode");
        assert!(
            error.to_string().contains("authentication_required"),
            "{error}"
        );
        settings.authentication_required = true;
        let error = settings.validate(&production()).expect_err("weak");
        assert!(error.to_string().contains("security.jwt.secret"), "{error}");
        settings.jwt.secret = Some(SecretString::from(LOCAL_DEVELOPMENT_SECRET));
        assert!(settings.validate(&production()).is_err());
        settings.jwt.secret = Some(SecretString::from("x".repeat(32)));
        assert!(settings.validate(&production()).is_ok());
        settings.jwt.secret = None;
        let error = settings
            .validate(&production())
            .expect_err("no way to authenticate");
        assert!(error.to_string().contains("security.jwt.secret"), "{error}");
    }

    #[test]
    fn a_plain_password_in_the_users_list_is_refused() {
        let mut settings = SecuritySettings::default();
        settings.jwt.secret = Some(SecretString::from("x".repeat(32)));
        settings.users.push(UserSettings {
            username: "demo".to_owned(),
            password_hash: SecretString::from("demo"),
            role: RoleName::Customer,
            subject: None,
        });
        let error = settings.validate(&local()).expect_err("plain text");
        assert!(error.to_string().contains("password_hash"), "{error}");
    }
}
