//! Security: who may call what. Tokens of the service's own and of an OIDC provider (a JWKS
//! served on 127.0.0.1 by the test, with key rotation), every route against every kind of
//! token, ownership, rate limits, logins and the security audit trail.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use petstore_settings::{OidcIssuerSettings, RoleName, Settings};
use petstore_tests::{assert_problem, Engine, Storage, TestApp};
use serde_json::{json, Value};

const RSA_1: &[u8] = include_bytes!("../fixtures/oidc-rsa-1.pem");
const RSA_1_PUBLIC: &[u8] = include_bytes!("../fixtures/oidc-rsa-1.pub.pem");
const RSA_2: &[u8] = include_bytes!("../fixtures/oidc-rsa-2.pem");
const EC: &[u8] = include_bytes!("../fixtures/oidc-ec.pem");
const AUDIENCE: &str = "petstore-api";

/// A fake identity provider: discovery and a JWKS on 127.0.0.1, counting key-set fetches.
struct Provider {
    issuer: String,
    keys: Arc<Mutex<Vec<Jwk>>>,
    fetches: Arc<AtomicUsize>,
    /// Key-set fetches still to answer 503.
    failing: Arc<AtomicUsize>,
}

fn jwk(pem: &[u8], algorithm: Algorithm, kid: &str) -> Jwk {
    let key = match algorithm {
        Algorithm::ES256 => EncodingKey::from_ec_pem(pem),
        _ => EncodingKey::from_rsa_pem(pem),
    }
    .expect("a test key");
    let mut jwk = Jwk::from_encoding_key(&key, algorithm).expect("a public JWK");
    jwk.common.key_id = Some(kid.to_owned());
    jwk
}

impl Provider {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let issuer = format!(
            "http://127.0.0.1:{}",
            listener.local_addr().expect("addr").port()
        );
        let keys = Arc::new(Mutex::new(vec![
            jwk(RSA_1, Algorithm::RS256, "rsa-1"),
            jwk(EC, Algorithm::ES256, "ec-1"),
        ]));
        let fetches = Arc::new(AtomicUsize::new(0));
        let failing = Arc::new(AtomicUsize::new(0));
        let discovery = json!({"issuer": issuer, "jwks_uri": format!("{issuer}/keys")});
        let router = axum::Router::new()
            .route(
                "/.well-known/openid-configuration",
                axum::routing::get(move || async move { axum::Json(discovery) }),
            )
            .route(
                "/keys",
                axum::routing::get({
                    let keys = keys.clone();
                    let fetches = fetches.clone();
                    let failing = failing.clone();
                    move || async move {
                        use axum::response::IntoResponse;
                        fetches.fetch_add(1, Ordering::SeqCst);
                        let fail = failing
                            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |left| {
                                left.checked_sub(1)
                            })
                            .is_ok();
                        if fail {
                            return axum::http::StatusCode::SERVICE_UNAVAILABLE.into_response();
                        }
                        let keys = keys.lock().expect("lock").clone();
                        axum::Json(JwkSet { keys }).into_response()
                    }
                }),
            );
        tokio::spawn(async move { axum::serve(listener, router).await });
        Self {
            issuer,
            keys,
            fetches,
            failing,
        }
    }

    fn issuer_settings(&self) -> OidcIssuerSettings {
        serde_json::from_value(json!({
            "issuer": self.issuer,
            "audience": AUDIENCE,
            "roles_claim": "realm_access.roles",
        }))
        .expect("issuer settings")
    }

    /// A token signed with `pem` under `kid`, with `claims` over sensible defaults.
    fn token(&self, pem: &[u8], algorithm: Algorithm, kid: &str, claims: Value) -> String {
        let now = chrono::Utc::now().timestamp();
        let mut body = json!({
            "iss": self.issuer, "aud": AUDIENCE, "sub": "customer-001",
            "iat": now, "nbf": now - 5, "exp": now + 600,
            "realm_access": {"roles": ["customer"]},
        });
        for (key, value) in claims.as_object().expect("an object") {
            body[key] = value.clone();
        }
        let key = match algorithm {
            Algorithm::ES256 => EncodingKey::from_ec_pem(pem),
            Algorithm::HS256 => EncodingKey::from_secret(pem),
            _ => EncodingKey::from_rsa_pem(pem),
        }
        .expect("a signing key");
        let mut header = Header::new(algorithm);
        header.kid = Some(kid.to_owned());
        jsonwebtoken::encode(&header, &body, &key).expect("signed")
    }
}

async fn start(settings: Settings) -> TestApp {
    let app = TestApp::start(settings).await;
    app.wait_until_ready().await;
    app
}

async fn with_provider(engine: Engine) -> (Storage, Provider, TestApp) {
    let storage = Storage::new(engine).await;
    let provider = Provider::start().await;
    let mut settings = storage.settings();
    settings.security.oidc.issuers = vec![provider.issuer_settings()];
    settings.security.oidc.refetch_cooldown_seconds = 60;
    let app = start(settings).await;
    (storage, provider, app)
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// A token that `alg: none` would be: header and claims, no signature.
fn unsigned(issuer: &str) -> String {
    let encode = |text: &str| petstore_tests::base64url(text.as_bytes());
    let now = chrono::Utc::now().timestamp();
    let header = encode(r#"{"alg":"none","typ":"JWT"}"#);
    let claims = encode(
        &json!({"iss": issuer, "aud": AUDIENCE, "sub": "customer-001", "nbf": now, "exp": now + 600, "roles": ["admin"]})
            .to_string(),
    );
    format!("{header}.{claims}.")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_route_answers_every_kind_of_token_as_it_should() {
    let (storage, provider, app) = with_provider(Engine::Embedded).await;
    let order = app.place_order("golden-retriever-001").await;
    let order_id = order["order_id"].as_str().expect("id").to_owned();
    let customer = app.token("customer-001", RoleName::Customer);
    let stranger = app.token("customer-002", RoleName::Customer);
    let admin = app.token("admin", RoleName::Admin);
    let now = chrono::Utc::now().timestamp();
    let oidc = |claims: Value| provider.token(RSA_1, Algorithm::RS256, "rsa-1", claims);
    let invalid: Vec<(&str, String)> = vec![
        (
            "expired",
            oidc(json!({"exp": now - 600, "nbf": now - 1200})),
        ),
        ("not yet valid", oidc(json!({"nbf": now + 600}))),
        ("bad signature", {
            let token = oidc(json!({}));
            let (rest, _) = token.rsplit_once('.').expect("three parts");
            let other = provider.token(RSA_2, Algorithm::RS256, "rsa-1", json!({}));
            format!("{rest}.{}", other.rsplit_once('.').expect("three parts").1)
        }),
        ("wrong issuer", oidc(json!({"iss": "https://idp.example"}))),
        ("wrong audience", oidc(json!({"aud": "someone-else"}))),
        ("no subject", oidc(json!({"sub": ""}))),
        ("alg none", unsigned(&provider.issuer)),
        (
            "HS256 with the RSA public key",
            provider.token(RSA_1_PUBLIC, Algorithm::HS256, "rsa-1", json!({})),
        ),
        (
            "unknown kid",
            provider.token(RSA_1, Algorithm::RS256, "no-such-key", json!({})),
        ),
        (
            "RS256 claiming the local issuer",
            provider.token(
                RSA_1,
                Algorithm::RS256,
                "rsa-1",
                json!({"iss": "petstore", "aud": "petstore"}),
            ),
        ),
        ("not a JWT", "not-a-token".to_owned()),
    ];
    let status = format!("/petstore-domain/orders/{order_id}/status");
    let audit = format!("/petstore-domain/orders/{order_id}/audit");
    let pay = json!({"order_id": order_id});
    let place = json!({"customer_id": "customer-001", "pet_id": "beagle-001"});
    // (method, path, body, [anonymous, owner, stranger, admin])
    type Expected = [u16; 4];
    let routes: Vec<(&str, &str, Option<&Value>, Expected)> = vec![
        ("GET", "/petstore-domain/health", None, [200, 200, 200, 200]),
        ("GET", "/health/ready", None, [200, 200, 200, 200]),
        ("GET", "/metrics", None, [200, 200, 200, 200]),
        (
            "GET",
            "/petstore-domain/openapi.json",
            None,
            [200, 200, 200, 200],
        ),
        (
            "GET",
            "/petstore-domain/pets/browse",
            None,
            [200, 200, 200, 200],
        ),
        (
            "GET",
            "/petstore-domain/browse-pets",
            None,
            [200, 200, 200, 200],
        ),
        (
            "GET",
            "/petstore-domain/pets/golden-retriever-001",
            None,
            [200, 200, 200, 200],
        ),
        ("GET", &status, None, [401, 200, 403, 200]),
        ("GET", &audit, None, [401, 200, 403, 200]),
        (
            "POST",
            "/petstore-domain/orders",
            Some(&place),
            [401, 202, 403, 202],
        ),
        (
            "POST",
            "/petstore-domain/create-order",
            Some(&place),
            [401, 202, 403, 202],
        ),
        (
            "POST",
            "/petstore-domain/payments",
            Some(&pay),
            [401, 409, 403, 409],
        ),
        (
            "POST",
            "/petstore-domain/process-payment",
            Some(&pay),
            [401, 409, 403, 409],
        ),
        (
            "GET",
            "/petstore-domain/admin/audit/security",
            None,
            [401, 403, 403, 200],
        ),
    ];
    let send = |method: &str, path: &str, body: Option<&Value>, token: Option<&str>| {
        let mut request = match method {
            "POST" => app
                .anonymous
                .post(app.url(path))
                .json(body.expect("a body")),
            _ => app.anonymous.get(app.url(path)),
        };
        if let Some(token) = token {
            request = request.header("Authorization", bearer(token));
        }
        request.send()
    };
    for (method, path, body, [anonymous, owner, other, admin_status]) in &routes {
        let cases = [
            ("no token", None, *anonymous),
            ("owner", Some(customer.as_str()), *owner),
            ("another customer", Some(stranger.as_str()), *other),
            ("admin", Some(admin.as_str()), *admin_status),
            (
                "OIDC customer",
                Some(oidc(json!({})).leak() as &str),
                *owner,
            ),
        ];
        for (who, token, expected) in cases {
            let response = send(method, path, *body, token).await.expect("answered");
            let got = response.status().as_u16();
            assert_eq!(got, expected, "{method} {path} as {who}");
            if got >= 400 {
                let challenge = response.headers().get("www-authenticate").cloned();
                let problem = assert_problem(response, expected).await;
                assert!(problem["correlation_id"].is_string());
                if expected == 401 {
                    assert_eq!(
                        challenge.expect("401 names the scheme"),
                        "Bearer realm=\"petstore\""
                    );
                }
            }
        }
        for (what, token) in &invalid {
            let response = send(method, path, *body, Some(token))
                .await
                .expect("answered");
            let challenge = response
                .headers()
                .get("www-authenticate")
                .and_then(|value| value.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            assert_problem(response, 401).await;
            assert!(
                challenge.contains("error=\"invalid_token\""),
                "{method} {path} with {what}: {challenge}"
            );
        }
    }
    app.stop().await;
    storage.remove().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rotated_key_works_after_one_refetch_and_random_kids_cannot_hammer_the_provider() {
    let (storage, provider, app) = with_provider(Engine::Embedded).await;
    let path = "/petstore-domain/admin/audit/security";
    let get = |token: String| {
        app.anonymous
            .get(app.url(path))
            .header("Authorization", bearer(&token))
            .send()
    };
    let admin = json!({"sub": "ops-admin", "realm_access": {"roles": ["admin"]}});
    let at_start = provider.fetches.load(Ordering::SeqCst);
    assert_eq!(at_start, 1, "the key set is fetched once at start-up");
    for (pem, algorithm, kid) in [
        (RSA_1, Algorithm::RS256, "rsa-1"),
        (EC, Algorithm::ES256, "ec-1"),
    ] {
        let response = get(provider.token(pem, algorithm, kid, admin.clone()))
            .await
            .expect("answered");
        assert_eq!(response.status(), 200, "{kid}");
    }
    // The provider rotates: a new key, the old one kept for tokens in flight.
    provider
        .keys
        .lock()
        .expect("lock")
        .push(jwk(RSA_2, Algorithm::RS256, "rsa-2"));
    let response = get(provider.token(RSA_2, Algorithm::RS256, "rsa-2", admin.clone()))
        .await
        .expect("answered");
    assert_eq!(response.status(), 200, "the new key after a refetch");
    assert_eq!(
        provider.fetches.load(Ordering::SeqCst),
        at_start + 1,
        "exactly one refetch"
    );
    // 100 tokens with random kids, 20 at a time: the cooldown allows no further fetch.
    let tokens: Vec<String> = (0..100)
        .map(|index| {
            provider.token(
                RSA_1,
                Algorithm::RS256,
                &format!("random-{index}-{}", uuid::Uuid::new_v4()),
                admin.clone(),
            )
        })
        .collect();
    for chunk in tokens.chunks(20) {
        let answers = futures::future::join_all(chunk.iter().map(|token| get(token.clone()))).await;
        for answer in answers {
            assert_eq!(answer.expect("answered").status(), 401);
        }
    }
    assert_eq!(
        provider.fetches.load(Ordering::SeqCst),
        at_start + 1,
        "no fetch within the cooldown"
    );
    // The old key still works, and the rotation is in the audit trail.
    let response = get(provider.token(RSA_1, Algorithm::RS256, "rsa-1", admin.clone()))
        .await
        .expect("answered");
    assert_eq!(response.status(), 200);
    let page: Value = app
        .client
        .get(app.url(&format!("{path}?kind=key_set_rotation")))
        .send()
        .await
        .expect("answered")
        .json()
        .await
        .expect("json");
    let rotations = page["entries"].as_array().expect("entries");
    assert_eq!(rotations.len(), 2, "{page}");
    assert!(rotations.iter().all(|entry| entry["outcome"] == "success"));
    app.stop().await;
    storage.remove().await;
}

async fn rate_limited_app(engine: Engine) -> (Storage, TestApp) {
    let storage = Storage::new(engine).await;
    let mut settings = storage.settings();
    let limits = &mut settings.security.rate_limits;
    limits.enabled = true;
    limits.default_per_minute = 20;
    limits.routes = [("POST /petstore-domain/orders".to_owned(), 5)].into();
    limits.login_per_minute = 3;
    let app = start(settings).await;
    (storage, app)
}

async fn rate_limits_hold_per_subject_per_route_and_per_address(engine: Engine) {
    let (storage, app) = rate_limited_app(engine).await;
    let customer = app.client_as("customer-001", RoleName::Customer);
    let other = app.client_as("customer-002", RoleName::Customer);
    let order = |client: &reqwest::Client, customer_id: &str| {
        client
            .post(app.url("/petstore-domain/orders"))
            .json(&json!({"customer_id": customer_id, "pet_id": "budgie-001"}))
            .send()
    };
    for attempt in 1..=5 {
        let response = order(&customer, "customer-001").await.expect("answered");
        assert_eq!(response.status(), 202, "order {attempt}");
        assert_eq!(
            response.headers()["ratelimit-policy"],
            "\"POST /petstore-domain/orders\";q=5;w=60"
        );
    }
    let refused = order(&customer, "customer-001").await.expect("answered");
    let retry_after: u64 = refused.headers()["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds");
    assert!((1..=60).contains(&retry_after), "{retry_after}");
    assert!(refused.headers()["ratelimit"]
        .to_str()
        .expect("ascii")
        .contains("r=0"));
    assert_problem(refused, 429).await;
    // Another subject has a quota of its own.
    assert_eq!(
        order(&other, "customer-002")
            .await
            .expect("answered")
            .status(),
        202
    );
    // Anonymous callers are counted by address; a spoofed X-Forwarded-For from a peer that
    // is not a trusted proxy changes nothing.
    for attempt in 1..=20 {
        let response = app
            .anonymous
            .get(app.url("/petstore-domain/pets/browse"))
            .send()
            .await
            .expect("answered");
        assert_eq!(response.status(), 200, "browse {attempt}");
    }
    let spoofed = app
        .anonymous
        .get(app.url("/petstore-domain/pets/browse"))
        .header("X-Forwarded-For", "203.0.113.77")
        .send()
        .await
        .expect("answered");
    assert_problem(spoofed, 429).await;
    // Logins: limited per username and address, every failure the same 401.
    let login = |username: &str, password: &str| {
        app.anonymous
            .post(app.url("/auth/login"))
            .json(&json!({"username": username, "password": password}))
            .send()
    };
    let first: Value = assert_problem(login("nobody", "x").await.expect("answered"), 401).await;
    assert_eq!(first["detail"], "invalid username or password");
    assert_problem(login("nobody", "y").await.expect("answered"), 401).await;
    assert_problem(login("nobody", "z").await.expect("answered"), 401).await;
    assert_problem(login("nobody", "w").await.expect("answered"), 429).await;
    // The trips, once per key and window, are in the audit trail with their route.
    let page: Value = app
        .client
        .get(app.url("/petstore-domain/admin/audit/security?kind=rate_limited"))
        .send()
        .await
        .expect("answered")
        .json()
        .await
        .expect("json");
    let routes: BTreeSet<String> = page["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .map(|entry| {
            format!(
                "{} {} {}",
                entry["subject"].as_str().unwrap_or_default(),
                entry["method"].as_str().unwrap_or_default(),
                entry["route"].as_str().unwrap_or_default()
            )
        })
        .collect();
    assert_eq!(
        routes,
        BTreeSet::from([
            "customer-001 POST /petstore-domain/orders".to_owned(),
            "anonymous GET /petstore-domain/pets/browse".to_owned(),
            "nobody POST /auth/login".to_owned(),
        ]),
        "{page}"
    );
    app.stop().await;
    storage.remove().await;
}

async fn two_customers_with_one_idempotency_key_get_two_orders(engine: Engine) {
    let storage = Storage::new(engine).await;
    let app = start(storage.settings()).await;
    let mut orders = Vec::new();
    for customer in ["customer-001", "customer-002"] {
        let response = app
            .client_as(customer, RoleName::Customer)
            .post(app.url("/petstore-domain/orders"))
            .header("Idempotency-Key", "same-key")
            .json(&json!({"pet_id": "beagle-001"}))
            .send()
            .await
            .expect("answered");
        assert_eq!(response.status(), 202);
        let body: Value = response.json().await.expect("json");
        orders.push(body["order_id"].as_str().expect("id").to_owned());
    }
    assert_ne!(orders[0], orders[1]);
    // Each order is its customer's (the body's customer_id defaulted to the token's subject).
    let view = app.wait_for_order(&orders[1], |_| true).await;
    assert_eq!(view["customer_id"], "customer-002");
    app.stop().await;
    storage.remove().await;
}

async fn security_events_are_recorded_without_secrets(engine: Engine) {
    let storage = Storage::new(engine).await;
    let mut settings = storage.settings();
    settings.security.users = vec![serde_json::from_value(json!({
        "username": "demo",
        "password_hash": petstore_security::auth::login::hash_password("correct horse").expect("hash"),
        "role": "customer",
        "subject": "customer-001",
    }))
    .expect("a user")];
    let app = start(settings).await;
    let login = |password: &str| {
        app.anonymous
            .post(app.url("/auth/login"))
            .header("Content-Type", "application/x-www-form-urlencoded")
            .body(json!({"username": "demo", "password": password}).to_string())
            .send()
    };
    assert_problem(login("wrong battery").await.expect("answered"), 401).await;
    let issued: Value = login("correct horse")
        .await
        .expect("answered")
        .json()
        .await
        .expect("json");
    assert_eq!(issued["token_type"], "Bearer");
    let token = issued["token"].as_str().expect("token").to_owned();
    let customer = app
        .anonymous
        .get(app.url("/petstore-domain/admin/audit/security"))
        .header("Authorization", bearer(&token));
    assert_problem(customer.send().await.expect("answered"), 403).await;
    let forged = format!("{token}x");
    let rejected = app
        .anonymous
        .get(app.url("/petstore-domain/admin/audit/security"))
        .header("Authorization", bearer(&forged));
    assert_problem(rejected.send().await.expect("answered"), 401).await;
    // Bad bodies and filters are problems too.
    let text = app
        .anonymous
        .post(app.url("/auth/login"))
        .header("Content-Type", "text/plain")
        .body("demo")
        .send();
    assert_problem(text.await.expect("answered"), 415).await;
    let missing = app
        .anonymous
        .post(app.url("/auth/login"))
        .json(&json!({"username": "demo"}))
        .send();
    assert_problem(missing.await.expect("answered"), 422).await;
    for query in [
        "kind=burglary",
        "limit=0",
        "limit=501",
        "since=yesterday",
        "colour=red",
    ] {
        let response = app
            .client
            .get(app.url(&format!("/petstore-domain/admin/audit/security?{query}")))
            .send();
        assert_problem(response.await.expect("answered"), 422).await;
    }

    // An admin action that succeeds (it is recorded once answered).
    let done = app
        .client
        .get(app.url("/petstore-domain/admin/audit/security?limit=1"))
        .send();
    assert_eq!(done.await.expect("answered").status(), 200);
    let page: Value = app
        .client
        .get(app.url("/petstore-domain/admin/audit/security?limit=500"))
        .send()
        .await
        .expect("answered")
        .json()
        .await
        .expect("json");
    let entries = page["entries"].as_array().expect("entries");
    let kinds: BTreeSet<(&str, &str)> = entries
        .iter()
        .map(|entry| {
            (
                entry["kind"].as_str().unwrap_or_default(),
                entry["outcome"].as_str().unwrap_or_default(),
            )
        })
        .collect();
    for expected in [
        ("login", "failure"),
        ("login", "success"),
        ("forbidden", "failure"),
        ("token_rejected", "failure"),
        ("admin_action", "success"),
    ] {
        assert!(kinds.contains(&expected), "{expected:?} in {kinds:?}");
    }
    let text = page.to_string();
    for secret in ["correct horse", "wrong battery", token.as_str()] {
        assert!(!text.contains(secret), "the trail holds a secret");
    }
    for entry in entries {
        assert!(entry["correlation_id"].is_string(), "{entry}");
        assert!(entry["client_ip"] == "127.0.0.1", "{entry}");
    }
    // Paging: the next page starts below the last id.
    let first: Value = app
        .client
        .get(app.url("/petstore-domain/admin/audit/security?limit=2"))
        .send()
        .await
        .expect("answered")
        .json()
        .await
        .expect("json");
    let next = first["next"].as_i64().expect("a next page");
    let second: Value = app
        .client
        .get(app.url(&format!(
            "/petstore-domain/admin/audit/security?limit=2&before={next}"
        )))
        .send()
        .await
        .expect("answered")
        .json()
        .await
        .expect("json");
    assert!(second["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .all(|entry| entry["id"].as_i64() < Some(next)));
    app.stop().await;
    storage.remove().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn oversized_headers_cors_and_security_headers() {
    let storage = Storage::new(Engine::Embedded).await;
    let mut settings = storage.settings();
    settings.security.max_header_bytes = 4096;
    // A query that waits for a consistency token the log never reaches outlasts the
    // request timeout: 503 with Retry-After, as problem+json.
    settings.security.request_timeout_ms = 200;
    settings.http.consistency_wait_ms = 5_000;
    let app = start(settings).await;
    let browse = app.url("/petstore-domain/pets/browse");
    let slow = app
        .anonymous
        .get(&browse)
        .header("X-Consistency-Token", "t999999999p999999999")
        .send()
        .await
        .expect("answered");
    assert_eq!(slow.headers()["retry-after"], "1");
    assert_problem(slow, 503).await;
    let huge = app
        .anonymous
        .get(&browse)
        .header("X-Padding", "x".repeat(5000))
        .send();
    assert_problem(huge.await.expect("answered"), 431).await;
    // CORS is off unless configured: no CORS headers at all, preflight or not.
    let preflight = app
        .anonymous
        .request(reqwest::Method::OPTIONS, &browse)
        .header("Origin", "https://shop.example")
        .header("Access-Control-Request-Method", "GET")
        .send()
        .await
        .expect("answered");
    assert!(preflight
        .headers()
        .get("access-control-allow-origin")
        .is_none());
    let plain = app.anonymous.get(&browse).send().await.expect("answered");
    assert_eq!(plain.headers()["x-content-type-options"], "nosniff");
    assert!(
        plain.headers().get("cache-control").is_none(),
        "anonymous answers may be cached"
    );
    assert!(plain.headers().get("vary").is_none());
    app.stop().await;

    let mut settings = storage.settings();
    settings.security.cors_allowed_origins = vec!["https://shop.example".to_owned()];
    let app = start(settings).await;
    let preflight = app
        .anonymous
        .request(reqwest::Method::OPTIONS, app.url("/petstore-domain/orders"))
        .header("Origin", "https://shop.example")
        .header("Access-Control-Request-Method", "POST")
        .header(
            "Access-Control-Request-Headers",
            "authorization,content-type",
        )
        .send()
        .await
        .expect("answered");
    assert_eq!(
        preflight.headers()["access-control-allow-origin"],
        "https://shop.example"
    );
    let other = app
        .anonymous
        .get(app.url("/petstore-domain/pets/browse"))
        .header("Origin", "https://evil.example")
        .send()
        .await
        .expect("answered");
    assert!(other.headers().get("access-control-allow-origin").is_none());
    app.stop().await;
    storage.remove().await;
}

petstore_tests::on_both_engines!(
    rate_limits_hold_per_subject_per_route_and_per_address,
    two_customers_with_one_idempotency_key_get_two_orders,
    security_events_are_recorded_without_secrets,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn key_set_fetches_are_retried_and_a_failing_provider_opens_its_breaker() {
    let storage = Storage::new(Engine::Embedded).await;
    let provider = Provider::start().await;
    let mut settings = storage.settings();
    settings.security.oidc.issuers = vec![provider.issuer_settings()];
    settings.security.oidc.refetch_cooldown_seconds = 0;
    settings.resilience.oidc.breaker.window_ms = 1_000;
    let app = start(settings).await;
    let get = |token: String| {
        app.anonymous
            .get(app.url("/petstore-domain/admin/audit/security"))
            .header("Authorization", bearer(&token))
            .send()
    };
    let admin = json!({"sub": "ops-admin", "realm_access": {"roles": ["admin"]}});
    // A rotation while the provider fails twice: the third attempt of one refetch gets it.
    provider.failing.store(2, Ordering::SeqCst);
    provider
        .keys
        .lock()
        .expect("lock")
        .push(jwk(RSA_2, Algorithm::RS256, "rsa-2"));
    let before = provider.fetches.load(Ordering::SeqCst);
    let response = get(provider.token(RSA_2, Algorithm::RS256, "rsa-2", admin.clone()))
        .await
        .expect("answered");
    assert_eq!(response.status(), 200, "retried past two 503s");
    assert_eq!(provider.fetches.load(Ordering::SeqCst), before + 3);

    // Down for good, once those calls left the breaker's window: a refetch's discovery
    // succeeds and two failed key-set attempts open the breaker (2 of 3 calls, 3 at least),
    // so no third attempt is made and the next unknown kids are refused without calling.
    tokio::time::sleep(std::time::Duration::from_millis(1_100)).await;
    provider.failing.store(usize::MAX, Ordering::SeqCst);
    let random = |index: usize| {
        provider.token(
            RSA_1,
            Algorithm::RS256,
            &format!("unknown-{index}"),
            admin.clone(),
        )
    };
    assert_eq!(get(random(0)).await.expect("answered").status(), 401);
    let after_open = provider.fetches.load(Ordering::SeqCst);
    assert_eq!(after_open, before + 5, "two more attempts");
    for index in 1..10 {
        assert_eq!(get(random(index)).await.expect("answered").status(), 401);
    }
    assert_eq!(
        provider.fetches.load(Ordering::SeqCst),
        after_open,
        "no call while the breaker is open"
    );
    let breakers = app
        .get_json("/petstore-domain/admin/circuit-breakers")
        .await;
    assert_eq!(breakers["oidc"]["state"], "open", "{breakers}");
    // Known keys keep working meanwhile.
    let known = get(provider.token(RSA_1, Algorithm::RS256, "rsa-1", admin.clone()))
        .await
        .expect("answered");
    assert_eq!(known.status(), 200);
    app.stop().await;
    storage.remove().await;
}
