//! The middleware every request passes: the client address, the caller, its quota, the
//! admin prefix, and the audit trail of each refusal.

use std::borrow::Cow;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::audit::{SecurityEventKind, SecurityOutcome};
use crate::rate_limit::{Decision, Usage};
use petstore_settings::{canonical, ProxyBlock};
use petstore_web::Problem;

use super::console::{
    is_console_route, session_token, CONSOLE_PREFIX, CONSOLE_PUBLIC, CONTENT_SECURITY_POLICY,
};
use super::{Caller, Security, TokenRejection, ADMIN_PREFIX, PUBLIC_ROUTES, QUERY_TOKEN_ROUTES};

/// A request's method and route template, as the audit trail names them.
pub(crate) struct RouteName {
    pub(crate) method: String,
    pub(crate) template: String,
}

enum Credentials<'a> {
    Missing,
    Malformed,
    /// A token: from the `Authorization` header, the query, or the console's session cookie.
    Bearer(Cow<'a, str>),
}

fn credentials(headers: &HeaderMap) -> Credentials<'_> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Credentials::Missing;
    };
    let Ok(value) = value.to_str() else {
        return Credentials::Malformed;
    };
    match value.split_once(' ') {
        Some((scheme, token))
            if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() =>
        {
            Credentials::Bearer(Cow::Borrowed(token.trim()))
        }
        _ => Credentials::Malformed,
    }
}

/// The credentials of a request: its `Authorization` header or, on [`QUERY_TOKEN_ROUTES`],
/// its `access_token` query parameter (as it is: JWTs are URL-safe), or on console routes
/// its session cookie.
fn request_credentials<'a>(request: &'a Request, template: &str) -> Credentials<'a> {
    let from_query = QUERY_TOKEN_ROUTES
        .contains(&template)
        .then(|| request.uri().query())
        .flatten()
        .and_then(|query| {
            query
                .split('&')
                .find_map(|pair| pair.strip_prefix("access_token="))
        });
    // Not on the login page or the static files: an expired session must not send the
    // login page to itself.
    let from_cookie = || {
        (is_console_route(template) && !CONSOLE_PUBLIC.contains(&template))
            .then(|| session_token(request.headers()))
            .flatten()
    };
    match (credentials(request.headers()), from_query) {
        (Credentials::Missing, None) => match from_cookie() {
            Some(token) => Credentials::Bearer(Cow::Owned(token)),
            None => Credentials::Missing,
        },
        (credentials, None) => credentials,
        (Credentials::Missing, Some(token)) if !token.is_empty() => {
            Credentials::Bearer(Cow::Borrowed(token))
        }
        _ => Credentials::Malformed,
    }
}

/// The client's address: the socket's peer, unless that is a trusted proxy; then the
/// rightmost `X-Forwarded-For` entry that is not a trusted proxy (entries left of it are
/// whatever the client claimed).
pub fn client_address(peer: IpAddr, headers: &HeaderMap, proxies: &[ProxyBlock]) -> IpAddr {
    let peer = canonical(peer);
    let trusted = |address: IpAddr| proxies.iter().any(|block| block.contains(address));
    if !trusted(peer) {
        return peer;
    }
    let forwarded: Vec<IpAddr> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|entry| entry.trim().parse::<IpAddr>().ok())
        .map(canonical)
        .collect();
    forwarded
        .iter()
        .rev()
        .copied()
        .find(|address| !trusted(*address))
        .or_else(|| forwarded.first().copied())
        .unwrap_or(peer)
}

fn header_bytes(headers: &HeaderMap) -> usize {
    headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum()
}

const RATE_LIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
const RATE_LIMIT: HeaderName = HeaderName::from_static("ratelimit");

pub(crate) fn with_usage(mut response: Response, usage: &Usage) -> Response {
    let headers = response.headers_mut();
    for (name, value) in [
        (RATE_LIMIT_POLICY, usage.policy_header()),
        (RATE_LIMIT, usage.limit_header()),
    ] {
        if let Ok(value) = HeaderValue::from_str(&value) {
            headers.insert(name, value);
        }
    }
    response
}

/// 303 to the console's login page, which comes back to `uri` after the login.
fn to_console_login(uri: &axum::http::Uri) -> Response {
    let back = uri
        .path_and_query()
        .map_or(CONSOLE_PREFIX, |path| path.as_str());
    let mut location = format!("{CONSOLE_PREFIX}/login");
    if back != CONSOLE_PREFIX && back != format!("{CONSOLE_PREFIX}/") {
        location.push_str("?next=");
        location.extend(url::form_urlencoded::byte_serialize(back.as_bytes()));
    }
    let mut response = StatusCode::SEE_OTHER.into_response();
    if let Ok(location) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    response
}

/// The security middleware of every route: header size, authentication, rate limit, the
/// admin-only prefix, the audit trail of refusals and admin actions, and security headers.
pub async fn guard(State(security): State<Security>, mut request: Request, next: Next) -> Response {
    let inner = &security.0;
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |info| info.0.ip());
    let client_ip = client_address(peer, request.headers(), &inner.proxies);
    if header_bytes(request.headers()) > inner.max_header_bytes {
        return Problem::from_status(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE).into_response();
    }
    let route = RouteName {
        method: request.method().as_str().to_owned(),
        template: request
            .extensions()
            .get::<MatchedPath>()
            .map_or("unmatched", MatchedPath::as_str)
            .to_owned(),
    };
    let public = PUBLIC_ROUTES.contains(&route.template.as_str())
        || CONSOLE_PUBLIC.contains(&route.template.as_str());
    let console = is_console_route(&route.template);
    let (caller, rejection) = match request_credentials(&request, &route.template) {
        Credentials::Missing if public => (Caller::anonymous(client_ip), None),
        Credentials::Missing if inner.demo_mode => (Caller::demo(client_ip), None),
        Credentials::Missing => (Caller::anonymous(client_ip), Some(None)),
        Credentials::Malformed => (
            Caller::anonymous(client_ip),
            Some(Some(TokenRejection::Malformed)),
        ),
        Credentials::Bearer(token) => match inner.verifier.verify(&token).await {
            Ok(verified) => (
                Caller {
                    subject: verified.subject,
                    roles: verified.roles,
                    customer: verified.customer,
                    client_ip,
                    authenticated: true,
                },
                None,
            ),
            Err(reason) => (Caller::anonymous(client_ip), Some(Some(reason))),
        },
    };
    request.extensions_mut().insert(caller.clone());
    request.extensions_mut().insert(caller.rate_key());

    // Logins have quotas of their own, per username and per address (see `login`).
    let route_key = format!("{} {}", route.method, route.template);
    let counted = route.template != "/auth/login";
    let decision = if counted {
        inner.limits.check_request(&route_key, &request)
    } else {
        Decision::Unlimited
    };
    let usage = match decision {
        Decision::Limited { usage, first_trip } => {
            return security.limited(&usage, first_trip, &caller, &route).await;
        }
        Decision::Allowed(usage) => Some(usage),
        Decision::Unlimited => None,
    };
    let finish = |response: Response| {
        let mut response = match &usage {
            Some(usage) => with_usage(response, usage),
            None => response,
        };
        let headers = response.headers_mut();
        headers.insert(
            HeaderName::from_static("x-content-type-options"),
            HeaderValue::from_static("nosniff"),
        );
        if caller.authenticated {
            headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        }
        if console {
            headers.insert(
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(CONTENT_SECURITY_POLICY),
            );
            headers.insert(
                header::REFERRER_POLICY,
                HeaderValue::from_static("same-origin"),
            );
        }
        response
    };

    if let Some(reason) = rejection {
        let (label, detail, invalid_token) = match &reason {
            None => ("missing", "no bearer token".to_owned(), false),
            Some(reason) => (reason.label(), reason.to_string(), true),
        };
        security.rejected(label);
        security
            .record(
                SecurityEventKind::TokenRejected,
                SecurityOutcome::Failure,
                &caller,
                &route,
                detail.clone(),
            )
            .await;
        if console && route.method == "GET" {
            // A browser: to the login page, and back here after it.
            return finish(to_console_login(request.uri()));
        }
        let message = if invalid_token {
            detail
        } else {
            "authentication is required: send Authorization: Bearer <token> (POST /auth/login issues one)".to_owned()
        };
        return finish(Problem::unauthorized(message, invalid_token).into_response());
    }
    let admin_route = route.template.starts_with(ADMIN_PREFIX) || console && !public;
    if admin_route && !caller.is_admin() {
        security
            .record(
                SecurityEventKind::Forbidden,
                SecurityOutcome::Failure,
                &caller,
                &route,
                "admin role required",
            )
            .await;
        return finish(Problem::forbidden("this route needs the admin role").into_response());
    }

    let response = next.run(request).await;
    let status = response.status();
    if status == StatusCode::FORBIDDEN {
        security
            .record(
                SecurityEventKind::Forbidden,
                SecurityOutcome::Failure,
                &caller,
                &route,
                "refused by the route",
            )
            .await;
    } else if admin_route {
        let outcome = if status.is_success() {
            SecurityOutcome::Success
        } else {
            SecurityOutcome::Failure
        };
        security
            .record(
                SecurityEventKind::AdminAction,
                outcome,
                &caller,
                &route,
                format!("answered {}", status.as_u16()),
            )
            .await;
    }
    finish(response)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::ANONYMOUS;

    fn headers(forwarded: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            "x-forwarded-for",
            HeaderValue::from_str(forwarded).expect("ascii"),
        );
        headers
    }

    #[test]
    fn forwarded_addresses_count_only_behind_a_trusted_proxy() {
        let proxies = vec![ProxyBlock::parse("10.0.0.0/8").expect("valid")];
        let proxy: IpAddr = "10.1.1.1".parse().expect("ip");
        let stranger: IpAddr = "203.0.113.9".parse().expect("ip");
        // A spoofed header from an untrusted peer changes nothing.
        assert_eq!(
            client_address(stranger, &headers("198.51.100.1"), &proxies),
            stranger
        );
        // Behind the proxy: the rightmost untrusted entry, not what the client claimed left of it.
        assert_eq!(
            client_address(proxy, &headers("1.1.1.1, 198.51.100.7, 10.2.2.2"), &proxies),
            "198.51.100.7".parse::<IpAddr>().expect("ip")
        );
        assert_eq!(client_address(proxy, &HeaderMap::new(), &proxies), proxy);
        assert_eq!(client_address(proxy, &headers("garbage"), &proxies), proxy);
    }

    #[test]
    fn only_bearer_credentials_are_read() {
        let mut map = HeaderMap::new();
        assert!(matches!(credentials(&map), Credentials::Missing));
        map.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Basic ZGVtbzpkZW1v"),
        );
        assert!(matches!(credentials(&map), Credentials::Malformed));
        map.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("bearer abc.def.ghi"),
        );
        assert!(matches!(
            credentials(&map),
            Credentials::Bearer(token) if token == "abc.def.ghi"
        ));
        map.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer "));
        assert!(matches!(credentials(&map), Credentials::Malformed));
    }

    #[test]
    fn customers_act_on_their_own_orders_and_admins_on_all() {
        let customer = Caller::for_tests("customer-001");
        assert!(customer.authorize_customer("customer-001").is_ok());
        assert!(customer.authorize_customer("customer-002").is_err());
        let anonymous = Caller::anonymous(IpAddr::V4(Ipv4Addr::LOCALHOST));
        assert!(anonymous.authorize_customer(ANONYMOUS).is_err());
        let demo = Caller::demo(IpAddr::V4(Ipv4Addr::LOCALHOST));
        assert!(demo.authorize_customer("customer-002").is_ok());
    }
}
