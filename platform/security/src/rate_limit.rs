//! Request rates: a default quota per subject (per client IP for anonymous callers), per-route
//! quotas, and login quotas per username and per client IP.
//!
//! Each quota is a keyed GCRA limiter built by tower-governor's [`GovernorConfigBuilder`]
//! (a burst of the whole per-minute quota, replenished evenly over the minute), keyed by
//! tower-governor's [`KeyExtractor`] over the [`RateKey`] the authentication middleware put in
//! the request (the caller's subject, or its address when anonymous). Its `GovernorLayer`
//! is not used as the middleware: it fixes quotas when the router is built and answers in
//! plain text, where ours are swapped at run time ([`RateLimits::replace`]) and answer
//! problem+json with the IETF `RateLimit-Policy` and `RateLimit` fields.
//!
//! Keyed state is bounded: every 10 s keys whose quota is back to full are evicted, and a
//! quota that still holds more than `max_keys` keys starts afresh.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use axum::http::Request;
use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use tower_governor::governor::{GovernorConfig, GovernorConfigBuilder};
use tower_governor::key_extractor::KeyExtractor;
use tower_governor::GovernorError;

use petstore_settings::RateLimitSettings;

/// Who a quota counts requests of.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum RateKey {
    /// An authenticated subject.
    Subject(String),
    /// An anonymous caller, by client IP.
    Address(IpAddr),
    /// A username tried at a login.
    Username(String),
}

impl std::fmt::Display for RateKey {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Subject(subject) => write!(formatter, "subject {subject}"),
            Self::Address(address) => write!(formatter, "address {address}"),
            Self::Username(username) => write!(formatter, "username {username}"),
        }
    }
}

/// Keys a request by the [`RateKey`] the authentication middleware put in its extensions.
#[derive(Debug, Clone, Copy)]
pub struct RequestRateKey;

impl KeyExtractor for RequestRateKey {
    type Key = RateKey;

    fn extract<T>(&self, request: &Request<T>) -> Result<RateKey, GovernorError> {
        request
            .extensions()
            .get::<RateKey>()
            .cloned()
            .ok_or(GovernorError::UnableToExtractKey)
    }
}

/// One quota and its keyed state.
struct Quota {
    /// The name in `RateLimit-Policy` and metrics: `default`, `login`, or the route.
    name: String,
    per_minute: u32,
    config: RwLock<Arc<GovernorConfig<RequestRateKey, StateInformationMiddleware>>>,
    /// When each key last tripped the quota, so a trip is recorded once per key and minute.
    trips: Mutex<HashMap<RateKey, Instant>>,
}

const WINDOW: Duration = Duration::from_secs(60);

impl Quota {
    fn new(name: String, per_minute: u32) -> Self {
        Self {
            config: RwLock::new(Arc::new(Self::config(per_minute))),
            name,
            per_minute,
            trips: Mutex::new(HashMap::new()),
        }
    }

    fn config(per_minute: u32) -> GovernorConfig<RequestRateKey, StateInformationMiddleware> {
        let per_minute = per_minute.max(1);
        let period = WINDOW / per_minute;
        GovernorConfigBuilder::default()
            .key_extractor(RequestRateKey)
            .period(period.max(Duration::from_nanos(1)))
            .burst_size(per_minute)
            .use_headers()
            .finish()
            .expect("the quota is above zero and so is its period")
    }

    fn current(&self) -> Arc<GovernorConfig<RequestRateKey, StateInformationMiddleware>> {
        match self.config.read() {
            Ok(config) => config.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn check(&self, key: &RateKey) -> Decision {
        let config = self.current();
        match config.limiter().check_key(key) {
            Ok(snapshot) => Decision::Allowed(Usage {
                policy: self.name.clone(),
                limit: self.per_minute,
                remaining: snapshot.remaining_burst_capacity(),
                reset_seconds: 60,
            }),
            Err(not_until) => {
                let wait = not_until.wait_time_from(DefaultClock::default().now());
                let retry_after = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
                let now = Instant::now();
                let first_trip = {
                    let mut trips = match self.trips.lock() {
                        Ok(trips) => trips,
                        Err(poisoned) => poisoned.into_inner(),
                    };
                    let recent = trips
                        .get(key)
                        .is_some_and(|at| now.duration_since(*at) < WINDOW);
                    if !recent {
                        trips.insert(key.clone(), now);
                    }
                    !recent
                };
                Decision::Limited {
                    usage: Usage {
                        policy: self.name.clone(),
                        limit: self.per_minute,
                        remaining: 0,
                        reset_seconds: retry_after.max(1),
                    },
                    first_trip,
                }
            }
        }
    }

    fn evict(&self, max_keys: usize) {
        let config = self.current();
        let limiter = config.limiter();
        limiter.retain_recent();
        limiter.shrink_to_fit();
        if limiter.len() > max_keys {
            tracing::warn!(policy = %self.name, keys = limiter.len(), max_keys, "rate-limit state over its bound: starting it afresh");
            let fresh = Arc::new(Self::config(self.per_minute));
            match self.config.write() {
                Ok(mut slot) => *slot = fresh,
                Err(poisoned) => *poisoned.into_inner() = fresh,
            }
        }
        if let Ok(mut trips) = self.trips.lock() {
            let now = Instant::now();
            trips.retain(|_, at| now.duration_since(*at) < WINDOW);
        }
    }
}

/// How much of a quota a request used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Usage {
    /// The quota's name.
    pub policy: String,
    /// Requests a minute.
    pub limit: u32,
    /// Requests left now.
    pub remaining: u32,
    /// Seconds until the quota allows the next request (when limited) or is surely full.
    pub reset_seconds: u64,
}

impl Usage {
    /// The `RateLimit-Policy` field value (IETF httpapi-ratelimit-headers).
    pub fn policy_header(&self) -> String {
        format!("\"{}\";q={};w=60", self.policy, self.limit)
    }

    /// The `RateLimit` field value.
    pub fn limit_header(&self) -> String {
        format!(
            "\"{}\";r={};t={}",
            self.policy, self.remaining, self.reset_seconds
        )
    }
}

/// A quota's verdict on one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Go ahead.
    Allowed(Usage),
    /// Refuse with 429.
    Limited {
        /// The quota.
        usage: Usage,
        /// The key's first trip in this window (worth an audit record).
        first_trip: bool,
    },
    /// Rate limiting is off.
    Unlimited,
}

struct Quotas {
    enabled: bool,
    max_keys: usize,
    default: Quota,
    routes: HashMap<String, Quota>,
    login_username: Quota,
    login_address: Quota,
}

impl Quotas {
    fn new(settings: &RateLimitSettings) -> Self {
        Self {
            enabled: settings.enabled,
            max_keys: settings.max_keys,
            default: Quota::new("default".to_owned(), settings.default_per_minute),
            routes: settings
                .routes
                .iter()
                .map(|(route, limit)| (route.clone(), Quota::new(route.clone(), *limit)))
                .collect(),
            login_username: Quota::new("login".to_owned(), settings.login_per_minute),
            login_address: Quota::new("login".to_owned(), settings.login_per_minute),
        }
    }
}

/// Every quota, swappable at run time.
#[derive(Clone)]
pub struct RateLimits(Arc<RwLock<Arc<Quotas>>>);

impl RateLimits {
    /// The quotas `settings` describe.
    pub fn new(settings: &RateLimitSettings) -> Self {
        Self(Arc::new(RwLock::new(Arc::new(Quotas::new(settings)))))
    }

    /// Replaces every quota (the counts start afresh).
    pub fn replace(&self, settings: &RateLimitSettings) {
        let quotas = Arc::new(Quotas::new(settings));
        match self.0.write() {
            Ok(mut slot) => *slot = quotas,
            Err(poisoned) => *poisoned.into_inner() = quotas,
        }
    }

    fn current(&self) -> Arc<Quotas> {
        match self.0.read() {
            Ok(quotas) => quotas.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Counts a request of `caller` to `route` (`"METHOD /template"`) against the route's
    /// quota, or the default one.
    pub fn check_request<T>(&self, route: &str, request: &Request<T>) -> Decision {
        let quotas = self.current();
        if !quotas.enabled {
            return Decision::Unlimited;
        }
        let Ok(key) = RequestRateKey.extract(request) else {
            return Decision::Unlimited;
        };
        quotas
            .routes
            .get(route)
            .unwrap_or(&quotas.default)
            .check(&key)
    }

    /// Counts a login attempt for `username` from `address`: both must be within quota.
    pub fn check_login(&self, username: &str, address: IpAddr) -> Decision {
        let quotas = self.current();
        if !quotas.enabled {
            return Decision::Unlimited;
        }
        let by_address = quotas.login_address.check(&RateKey::Address(address));
        if matches!(by_address, Decision::Limited { .. }) {
            return by_address;
        }
        quotas
            .login_username
            .check(&RateKey::Username(username.to_owned()))
    }

    /// Evicts keys back at full quota every 10 s, until `stop` resolves.
    pub async fn evict_until(self, stop: impl std::future::Future<Output = ()>) {
        let mut stop = std::pin::pin!(stop);
        let mut tick = tokio::time::interval(Duration::from_secs(10));
        loop {
            tokio::select! {
                _ = &mut stop => return,
                _ = tick.tick() => {
                    let quotas = self.current();
                    for quota in [&quotas.default, &quotas.login_username, &quotas.login_address]
                        .into_iter()
                        .chain(quotas.routes.values())
                    {
                        quota.evict(quotas.max_keys);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(per_minute: u32) -> RateLimitSettings {
        RateLimitSettings {
            default_per_minute: per_minute,
            login_per_minute: 2,
            ..RateLimitSettings::default()
        }
    }

    #[test]
    fn a_quota_allows_its_burst_then_refuses_and_records_one_trip_per_window() {
        let quota = Quota::new("default".to_owned(), 3);
        let key = RateKey::Subject("customer-001".to_owned());
        for remaining in [2, 1, 0] {
            match quota.check(&key) {
                Decision::Allowed(usage) => assert_eq!(usage.remaining, remaining),
                other => panic!("allowed expected, got {other:?}"),
            }
        }
        let Decision::Limited { usage, first_trip } = quota.check(&key) else {
            panic!("limited expected");
        };
        assert!(first_trip);
        assert!((1..=20).contains(&usage.reset_seconds), "{usage:?}");
        assert_eq!(usage.policy_header(), "\"default\";q=3;w=60");
        assert!(matches!(
            quota.check(&key),
            Decision::Limited {
                first_trip: false,
                ..
            }
        ));
        // Another key has its own quota.
        assert!(matches!(
            quota.check(&RateKey::Subject("customer-002".to_owned())),
            Decision::Allowed(_)
        ));
    }

    #[test]
    fn logins_are_limited_by_address_and_by_username() {
        let limits = RateLimits::new(&settings(100));
        let address: IpAddr = "127.0.0.1".parse().expect("ip");
        let other: IpAddr = "127.0.0.2".parse().expect("ip");
        assert!(matches!(
            limits.check_login("demo", address),
            Decision::Allowed(_)
        ));
        assert!(matches!(
            limits.check_login("demo", other),
            Decision::Allowed(_)
        ));
        // The username's quota (2) is spent, whatever the address.
        assert!(matches!(
            limits.check_login("demo", "127.0.0.3".parse().expect("ip")),
            Decision::Limited { .. }
        ));
        assert!(matches!(
            limits.check_login("admin", other),
            Decision::Allowed(_)
        ));
        // The address's quota (2) is spent, whatever the username.
        assert!(matches!(
            limits.check_login("someone", other),
            Decision::Limited { .. }
        ));
    }

    #[test]
    fn replacing_the_quotas_applies_at_once_and_eviction_bounds_the_state() {
        let limits = RateLimits::new(&settings(1));
        let request = |subject: &str| {
            let mut request = Request::new(());
            request
                .extensions_mut()
                .insert(RateKey::Subject(subject.to_owned()));
            request
        };
        assert!(matches!(
            limits.check_request("GET /x", &request("a")),
            Decision::Allowed(_)
        ));
        assert!(matches!(
            limits.check_request("GET /x", &request("a")),
            Decision::Limited { .. }
        ));
        limits.replace(&settings(5));
        assert!(matches!(
            limits.check_request("GET /x", &request("a")),
            Decision::Allowed(_)
        ));
        let quotas = limits.current();
        for index in 0..50 {
            quotas.default.check(&RateKey::Subject(format!("s{index}")));
        }
        quotas.default.evict(10);
        assert!(quotas.default.current().limiter().len() <= 10);
    }
}
