//! Tokens of a real OpenID Provider: npm `oidc-provider` 9 (`tests/oidc/provider.mjs`) on
//! 127.0.0.1, issuing RFC 9068 access tokens by the client credentials grant (`typ: at+jwt`,
//! RS256, no `nbf`), configured as the README's OIDC section says. Its admin and customer
//! tokens work with their roles and ownership; a subject outside the customer-id alphabet is
//! a clear 403, or mapped through `customer_claim`; key rotation at the provider is followed
//! with one refetch; and tokens it did not issue for us are each refused `invalid_token`.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use petstore_settings::{OidcIssuerSettings, Settings};
use petstore_tests::{assert_problem, base64url, Engine, Storage, TestApp};
use serde_json::{json, Value};
use tokio::io::AsyncBufReadExt;

/// A key the provider never had, to forge signatures with.
const FORGED_KEY: &[u8] = include_bytes!("../fixtures/oidc-rsa-2.pem");
const AUDIENCE: &str = "petstore-api";

/// `node tests/oidc/provider.mjs`, running.
pub(crate) struct Provider {
    child: tokio::process::Child,
    pub(crate) issuer: String,
    port: u16,
    http: reqwest::Client,
}

impl Provider {
    /// Starts the provider on `port` (0: a free one) signing with a new key named `kid`,
    /// installing its packages first if they are missing.
    pub(crate) async fn start(port: u16, kid: &str) -> Self {
        let folder = Path::new(env!("CARGO_MANIFEST_DIR")).join("oidc");
        if !folder.join("node_modules/oidc-provider").is_dir() {
            let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/services.sh");
            let installed = std::process::Command::new("bash")
                .arg(script)
                .arg("oidc-provider")
                .status()
                .expect("scripts/services.sh runs");
            assert!(installed.success(), "oidc-provider could not be installed");
        }
        let mut child = tokio::process::Command::new("node")
            .arg(folder.join("provider.mjs"))
            .args(["--port", &port.to_string(), "--kid", kid])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("node runs (scripts/services.sh oidc-provider installs it)");
        let stdout = child.stdout.take().expect("piped stdout");
        let line = tokio::time::timeout(
            Duration::from_secs(30),
            tokio::io::BufReader::new(stdout).lines().next_line(),
        )
        .await
        .expect("the provider starts within 30 s")
        .expect("its stdout")
        .expect("the line it prints when it listens");
        let started: Value = serde_json::from_str(&line).expect("a JSON line");
        Self {
            child,
            issuer: started["issuer"].as_str().expect("issuer").to_owned(),
            port: u16::try_from(started["port"].as_u64().expect("port")).expect("a port"),
            http: reqwest::Client::new(),
        }
    }

    pub(crate) async fn stop(mut self) {
        let _ = self.child.kill().await;
    }

    /// The issuer's settings, as the README's OIDC section shows them for this provider.
    pub(crate) fn settings(&self, customer_claim: Option<&str>) -> OidcIssuerSettings {
        let mut settings = json!({
            "issuer": self.issuer,
            "audience": AUDIENCE,
            "algorithms": ["RS256"],
            "roles_claim": "roles",
        });
        if let Some(claim) = customer_claim {
            settings["customer_claim"] = json!(claim);
        }
        serde_json::from_value(settings).expect("issuer settings")
    }

    /// An access token for `client` (client credentials) for `resource`.
    async fn token(&self, client: &str, secret: &str, resource: &str) -> String {
        let answer: Value = self
            .http
            .post(format!("{}/token", self.issuer))
            .basic_auth(client, Some(secret))
            .form(&[
                ("grant_type", "client_credentials"),
                ("resource", resource),
                ("scope", "orders"),
            ])
            .send()
            .await
            .expect("the provider answers")
            .json()
            .await
            .expect("json");
        answer["access_token"]
            .as_str()
            .unwrap_or_else(|| panic!("a token for {client}: {answer}"))
            .to_owned()
    }

    async fn admin(&self) -> String {
        self.token("petstore-admin", "admin-secret", "urn:petstore:api")
            .await
    }

    async fn customer(&self, id: &str) -> String {
        self.token(id, "customer-secret", "urn:petstore:api").await
    }

    /// The provider's published key set, as served.
    async fn key_set(&self) -> String {
        self.http
            .get(format!("{}/jwks", self.issuer))
            .send()
            .await
            .expect("the provider answers")
            .text()
            .await
            .expect("text")
    }
}

async fn app_with(provider: &Provider, customer_claim: Option<&str>) -> (Storage, TestApp) {
    let storage = Storage::new(Engine::Embedded).await;
    let mut settings: Settings = storage.settings();
    settings.security.oidc.issuers = vec![provider.settings(customer_claim)];
    // Expiry is checked to the second: the provider's 1-second token must be refused.
    settings.security.jwt.leeway_seconds = 0;
    let app = TestApp::start(settings).await;
    app.wait_until_ready().await;
    (storage, app)
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// The header and claims of `token`, as it carries them.
fn parts(token: &str) -> (Value, Value) {
    let header = jsonwebtoken::decode_header(token).expect("a JWT header");
    let claims: Value = jsonwebtoken::dangerous::insecure_decode_claims(token).expect("JWT claims");
    (serde_json::to_value(header).expect("json"), claims)
}

/// `GET path` with `token`.
async fn get_as(app: &TestApp, path: &str, token: &str) -> reqwest::Response {
    app.anonymous
        .get(app.url(path))
        .header("Authorization", bearer(token))
        .send()
        .await
        .expect("answered")
}

/// `POST /petstore-domain/orders` with `body` and `token`.
async fn order_as(app: &TestApp, token: &str, body: Value) -> reqwest::Response {
    app.anonymous
        .post(app.url("/petstore-domain/orders"))
        .header("Authorization", bearer(token))
        .json(&body)
        .send()
        .await
        .expect("answered")
}

async fn expect_invalid_token(app: &TestApp, name: &str, token: &str) {
    let response = get_as(app, "/petstore-domain/admin/audit/security", token).await;
    let challenge = response
        .headers()
        .get("www-authenticate")
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert_eq!(response.status(), 401, "{name}");
    assert!(
        challenge.contains(r#"error="invalid_token""#),
        "{name}: {challenge}"
    );
    assert_problem(response, 401).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_real_providers_tokens_work_with_their_roles_and_ownership() {
    let provider = Provider::start(0, "key-1").await;
    let (storage, app) = app_with(&provider, None).await;
    let admin = provider.admin().await;
    let (header, claims) = parts(&admin);
    // What a real provider sends: RFC 9068's type, and no nbf.
    assert_eq!(header["typ"], "at+jwt", "{header}");
    assert!(claims.get("nbf").is_none(), "{claims}");
    assert_eq!(claims["aud"], AUDIENCE);

    let trail = get_as(&app, "/petstore-domain/admin/audit/security", &admin).await;
    assert_eq!(trail.status(), 200, "the admin's token is accepted");

    let customer = provider.customer("customer-001").await;
    let stranger = provider.customer("customer-002").await;
    let refused = get_as(&app, "/petstore-domain/admin/audit/security", &customer).await;
    assert_problem(refused, 403).await;
    // The customer orders as its subject, omitting customer_id, and follows its order.
    let placed = order_as(&app, &customer, json!({"pet_id": "golden-retriever-001"})).await;
    assert_eq!(placed.status(), 202);
    let order: Value = placed.json().await.expect("json");
    let order_id = order["order_id"].as_str().expect("id").to_owned();
    let status = format!("/petstore-domain/orders/{order_id}/status");
    let view = app.wait_for_terminal(&order_id).await;
    assert_eq!(view["customer_id"], "customer-001");
    assert_eq!(view["status"], "completed");
    for (who, token, expected) in [
        ("its customer", &customer, 200),
        ("another customer", &stranger, 403),
        ("the admin", &admin, 200),
    ] {
        let answer = get_as(&app, &status, token).await;
        assert_eq!(answer.status(), expected, "{who}");
    }
    let for_another = order_as(
        &app,
        &stranger,
        json!({"customer_id": "customer-001", "pet_id": "beagle-001"}),
    )
    .await;
    assert_problem(for_another, 403).await;

    // A client whose subject is no customer id (`shop|app.1`): a 403 that says why, never a
    // 422 on its order.
    let shop = provider
        .token("shop|app.1", "shop-secret", "urn:petstore:api")
        .await;
    let refused = order_as(&app, &shop, json!({"pet_id": "beagle-001"})).await;
    let problem = assert_problem(refused, 403).await;
    let detail = problem["detail"].as_str().expect("detail");
    assert!(
        detail.contains("sub") && detail.contains("customer_claim"),
        "{detail}"
    );

    // Tokens it did not issue for us, each refused invalid_token.
    let other_audience = provider
        .token("petstore-admin", "admin-secret", "urn:other:api")
        .await;
    let short_lived = provider
        .token("petstore-admin", "admin-secret", "urn:petstore:short-lived")
        .await;
    let (header, claims) = parts(&admin);
    let kid = header["kid"].as_str().expect("kid").to_owned();
    let forged = {
        let mut header = Header::new(Algorithm::RS256);
        header.typ = Some("at+jwt".to_owned());
        header.kid = Some(kid.clone());
        let key = EncodingKey::from_rsa_pem(FORGED_KEY).expect("a test key");
        jsonwebtoken::encode(&header, &claims, &key).expect("signed")
    };
    let unsigned = {
        let header = json!({"alg": "none", "typ": "at+jwt", "kid": kid}).to_string();
        let payload = admin.split('.').nth(1).expect("a payload");
        format!("{}.{payload}.", base64url(header.as_bytes()))
    };
    let hs256_with_the_key_set = {
        let mut header = Header::new(Algorithm::HS256);
        header.typ = Some("at+jwt".to_owned());
        header.kid = Some(kid.clone());
        let key = EncodingKey::from_secret(provider.key_set().await.as_bytes())
            .expect("any bytes are an HMAC key");
        jsonwebtoken::encode(&header, &claims, &key).expect("signed")
    };
    let (_, short_claims) = parts(&short_lived);
    let expires = short_claims["exp"].as_i64().expect("exp");
    while chrono::Utc::now().timestamp() <= expires {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for (name, token) in [
        ("another audience", &other_audience),
        ("expired", &short_lived),
        ("re-signed with a forged key", &forged),
        ("alg none", &unsigned),
        (
            "HS256 signed with the provider's key set",
            &hs256_with_the_key_set,
        ),
    ] {
        expect_invalid_token(&app, name, token).await;
    }
    app.stop().await;
    storage.remove().await;
    provider.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_customer_claim_maps_a_subject_outside_the_alphabet() {
    let provider = Provider::start(0, "key-1").await;
    let (storage, app) = app_with(&provider, Some("customer_id")).await;
    let shop = provider
        .token("shop|app.1", "shop-secret", "urn:petstore:api")
        .await;
    let placed = order_as(&app, &shop, json!({"pet_id": "beagle-001"})).await;
    assert_eq!(placed.status(), 202);
    let order: Value = placed.json().await.expect("json");
    let order_id = order["order_id"].as_str().expect("id");
    let view = app.wait_for_terminal(order_id).await;
    assert_eq!(view["customer_id"], "customer-003", "{view}");
    let own = get_as(
        &app,
        &format!("/petstore-domain/orders/{order_id}/status"),
        &shop,
    )
    .await;
    assert_eq!(own.status(), 200, "it reads its own order");
    // A token without that claim names no customer: refused 403, saying so.
    let without = provider.customer("customer-001").await;
    let refused = order_as(&app, &without, json!({"pet_id": "persian-cat-001"})).await;
    let problem = assert_problem(refused, 403).await;
    assert!(
        problem["detail"]
            .as_str()
            .is_some_and(|detail| detail.contains("customer_id")),
        "{problem}"
    );
    app.stop().await;
    storage.remove().await;
    provider.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_key_rotated_at_the_provider_is_followed_with_one_refetch() {
    let provider = Provider::start(0, "key-1").await;
    let (storage, app) = app_with(&provider, None).await;
    let path = "/petstore-domain/admin/audit/security";
    let rotations = || async {
        let page: Value = app
            .client
            .get(app.url(&format!("{path}?kind=key_set_rotation")))
            .send()
            .await
            .expect("answered")
            .json()
            .await
            .expect("json");
        page["entries"].as_array().expect("entries").len()
    };
    assert_eq!(
        rotations().await,
        1,
        "the key set is fetched once at start-up"
    );
    let before = provider.admin().await;
    assert_eq!(get_as(&app, path, &before).await.status(), 200);

    // The provider rotates: a new signing key published, the old one removed.
    let port = provider.port;
    provider.stop().await;
    let provider = Provider::start(port, "key-2").await;
    let key_set = provider.key_set().await;
    assert!(
        key_set.contains("key-2") && !key_set.contains("key-1"),
        "{key_set}"
    );
    let after = provider.admin().await;
    assert_eq!(
        get_as(&app, path, &after).await.status(),
        200,
        "the new key works"
    );
    assert_eq!(rotations().await, 2, "after exactly one refetch");
    assert_eq!(get_as(&app, path, &after).await.status(), 200);
    assert_eq!(rotations().await, 2, "and no more");
    app.stop().await;
    storage.remove().await;
    provider.stop().await;
}
