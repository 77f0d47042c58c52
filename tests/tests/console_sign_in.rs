//! The console's sign-in at a real OpenID Provider (`tests/oidc/provider.mjs`,
//! oidc-provider 9, its development login and consent pages), made over HTTP step by step as
//! a browser makes it: the authorization code flow with PKCE (S256), state and nonce; an
//! admin gets a session, a customer a 403; a callback the console did not start, a forged or
//! replayed one, the provider's refusal and a provider that is down are each refused with
//! the login page saying why; every outcome is in the security trail.

use std::collections::BTreeMap;
use std::time::Duration;

use petstore_settings::Settings;
use petstore_tests::{Engine, Storage, TestApp};
use serde_json::{json, Value};

use crate::console::run_browser_script;
use crate::oidc_provider::Provider;

const CALLBACK: &str = "/petstore-domain/console/login/oidc/callback";

/// Cookies by name (names are unique within each site here, so paths can be ignored).
#[derive(Default, Clone)]
struct Jar(BTreeMap<String, String>);

impl Jar {
    fn keep(&mut self, response: &reqwest::Response) {
        for value in response.headers().get_all("set-cookie") {
            let text = value.to_str().expect("ascii");
            let (name, rest) = text.split_once('=').expect("name=value");
            let value = rest.split(';').next().unwrap_or_default();
            let ended = value.is_empty() || text.to_ascii_lowercase().contains("max-age=0");
            if ended {
                self.0.remove(name);
            } else {
                self.0.insert(name.to_owned(), value.to_owned());
            }
        }
    }

    fn header(&self) -> String {
        self.0
            .iter()
            .map(|(name, value)| format!("{name}={value}"))
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// A browser's part: the service's cookies and the provider's, no redirect followed.
struct Browser<'a> {
    app: &'a TestApp,
    http: reqwest::Client,
    service: Jar,
    provider: Jar,
}

impl<'a> Browser<'a> {
    fn new(app: &'a TestApp) -> Self {
        Self {
            app,
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .expect("a client"),
            service: Jar::default(),
            provider: Jar::default(),
        }
    }

    async fn get(&mut self, url: &str) -> reqwest::Response {
        let ours = url.starts_with(&self.app.address);
        let jar = if ours {
            &mut self.service
        } else {
            &mut self.provider
        };
        let response = self
            .http
            .get(url)
            .header("cookie", jar.header())
            .send()
            .await
            .expect("answered");
        jar.keep(&response);
        response
    }

    async fn post_to_provider(&mut self, url: &str, form: &[(&str, &str)]) -> reqwest::Response {
        let response = self
            .http
            .post(url)
            .header("cookie", self.provider.header())
            .form(form)
            .send()
            .await
            .expect("answered");
        self.provider.keep(&response);
        response
    }

    /// Starts a sign-in that should go on to `next`: the provider's authorization URL.
    async fn start(&mut self, next: &str) -> url::Url {
        let start = format!(
            "{}/petstore-domain/console/login/oidc?next={}",
            self.app.address,
            url::form_urlencoded::byte_serialize(next.as_bytes()).collect::<String>()
        );
        let response = self.get(&start).await;
        assert_eq!(response.status(), 303);
        let cookie = set_cookie(&response, "petstore_console_oidc");
        for part in [
            "HttpOnly",
            "SameSite=Lax",
            "Path=/petstore-domain/console/login/oidc",
        ] {
            assert!(cookie.contains(part), "{cookie} lacks {part}");
        }
        url::Url::parse(location(&response)).expect("the authorization URL")
    }

    /// Signs in at the provider as `account` (its development login page takes any password),
    /// consents, and returns the URL the provider sends the browser back to.
    async fn at_provider(&mut self, authorization: &url::Url, account: &str) -> String {
        let mut url = authorization.to_string();
        for _ in 0..12 {
            if url.starts_with(&self.app.address) {
                return url;
            }
            let response = self.get(&url).await;
            let here = response.url().clone();
            if response.status().is_redirection() {
                url = here.join(location(&response)).expect("a URL").to_string();
                continue;
            }
            assert_eq!(response.status(), 200, "{url}");
            let page = response.text().await.expect("text");
            let action = attribute_after(&page, "<form", "action");
            let action = here.join(&action).expect("a URL").to_string();
            let answered = if page.contains(r#"name="prompt" value="login""#) {
                let form = [("prompt", "login"), ("login", account), ("password", "any")];
                self.post_to_provider(&action, &form).await
            } else {
                assert!(page.contains(r#"name="prompt" value="consent""#), "{page}");
                self.post_to_provider(&action, &[("prompt", "consent")])
                    .await
            };
            assert!(answered.status().is_redirection(), "{}", answered.status());
            url = here.join(location(&answered)).expect("a URL").to_string();
        }
        panic!("the provider never sent the browser back: at {url}");
    }
}

fn location(response: &reqwest::Response) -> &str {
    response
        .headers()
        .get("location")
        .and_then(|value| value.to_str().ok())
        .expect("a Location")
}

fn set_cookie(response: &reqwest::Response, name: &str) -> String {
    response
        .headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|value| value.to_str().ok())
        .find(|value| value.starts_with(&format!("{name}=")))
        .unwrap_or_else(|| panic!("no {name} cookie"))
        .to_owned()
}

/// The value of the first `name="..."` after `marker` in `html`.
fn attribute_after(html: &str, marker: &str, name: &str) -> String {
    let from = html.find(marker).expect("the marker");
    let needle = format!(r#"{name}=""#);
    let start = html[from..].find(&needle).expect("the attribute") + from + needle.len();
    let end = html[start..].find('"').expect("its end") + start;
    html[start..end].replace("&amp;", "&")
}

fn query(url: &url::Url) -> BTreeMap<String, String> {
    url.query_pairs()
        .map(|(name, value)| (name.into_owned(), value.into_owned()))
        .collect()
}

fn with_sign_in(storage: &Storage, provider: &Provider) -> Settings {
    let mut settings = storage.settings();
    settings.security.oidc.issuers = vec![provider.settings(None)];
    settings.console.oidc = Some(
        serde_json::from_value(json!({
            "issuer": provider.issuer,
            "client_id": "petstore-console",
            "resource": "urn:petstore:api",
            "label": "Sign in with the test provider",
        }))
        .expect("console.oidc"),
    );
    settings
}

/// The login page's error, as shown.
async fn shown_error(response: reqwest::Response) -> String {
    let page = response.text().await.expect("text");
    let start = page
        .find(r#"<p class="error" role="alert">"#)
        .expect("an error")
        + 30;
    let end = page[start..].find("</p>").expect("its end") + start;
    page[start..end].to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_console_signs_an_admin_in_at_the_provider_with_pkce_and_refuses_the_rest() {
    let provider = Provider::start(0, "key-1").await;
    let storage = Storage::new(Engine::Embedded).await;
    let app = TestApp::start(with_sign_in(&storage, &provider)).await;
    app.wait_until_ready().await;

    // The login page offers the provider, carrying where to go next.
    let login = app
        .anonymous
        .get(app.url("/petstore-domain/console/login?next=/petstore-domain/console/flags"))
        .send()
        .await
        .expect("answered");
    let page = login.text().await.expect("text");
    assert!(
        page.contains(r#"href="/petstore-domain/console/login/oidc?next=%2Fpetstore-domain%2Fconsole%2Fflags">Sign in with the test provider</a>"#),
        "{page}"
    );

    // The authorization request: code flow, S256 challenge, state, nonce, the resource, and
    // the callback on the address the service was reached at.
    let mut browser = Browser::new(&app);
    let authorization = browser.start("/petstore-domain/console/flags").await;
    assert!(authorization.as_str().starts_with(&provider.issuer));
    let sent = query(&authorization);
    for (name, expected) in [
        ("response_type", "code"),
        ("client_id", "petstore-console"),
        ("scope", "openid"),
        ("code_challenge_method", "S256"),
        ("resource", "urn:petstore:api"),
    ] {
        assert_eq!(sent.get(name).map(String::as_str), Some(expected), "{name}");
    }
    assert_eq!(sent["redirect_uri"], app.url(CALLBACK));
    assert_eq!(sent["code_challenge"].len(), 43, "32 bytes, base64url");
    assert!(
        sent["state"].len() >= 16 && sent["nonce"].len() >= 32,
        "{sent:?}"
    );
    let flow_before = browser.service.clone();

    // The admin signs in at the provider and comes back with a session.
    let back = browser.at_provider(&authorization, "console-admin").await;
    assert!(back.starts_with(&app.url(CALLBACK)), "{back}");
    let finished = browser.get(&back).await;
    assert_eq!(finished.status(), 200);
    let session = set_cookie(&finished, "petstore_console");
    for part in [
        "HttpOnly",
        "SameSite=Strict",
        "Path=/petstore-domain/console",
    ] {
        assert!(session.contains(part), "{session} lacks {part}");
    }
    assert!(
        !browser.service.0.contains_key("petstore_console_oidc"),
        "the flow ends"
    );
    let page = finished.text().await.expect("text");
    assert!(
        page.contains(
            r#"<meta http-equiv="refresh" content="0; url=/petstore-domain/console/flags">"#
        ),
        "{page}"
    );
    let token = browser.service.0["petstore_console"].clone();
    let claims: Value = jsonwebtoken::dangerous::insecure_decode_claims(&token).expect("claims");
    assert_eq!(claims["sub"], "console-admin");
    assert_eq!(claims["iss"], provider.issuer.as_str());
    assert_eq!(claims["aud"], "petstore-api");
    assert_eq!(claims["roles"], json!(["admin"]));
    let flags = browser
        .get(&app.url("/petstore-domain/console/flags"))
        .await;
    assert_eq!(flags.status(), 200);
    assert!(flags
        .text()
        .await
        .expect("text")
        .contains("Signed in as <strong>console-admin</strong>"));

    // The same answer again: the flow ended with its first use.
    let again = browser.get(&back).await;
    assert_eq!(again.status(), 400);
    assert!(shown_error(again).await.contains("expired"));
    // With the flow's cookie kept from before: the provider refuses a code used twice.
    let mut replay = Browser::new(&app);
    replay.service = flow_before;
    let replayed = replay.get(&back).await;
    assert_eq!(replayed.status(), 401);
    assert!(
        shown_error(replayed)
            .await
            .contains("refused the code: invalid_grant"),
        "a code is good once"
    );
    assert!(!replay.service.0.contains_key("petstore_console"));

    // A customer signs in at the provider: 403, no session.
    let mut customer = Browser::new(&app);
    let authorization = customer.start("/petstore-domain/console/").await;
    let back = customer
        .at_provider(&authorization, "console-customer")
        .await;
    let refused = customer.get(&back).await;
    assert_eq!(refused.status(), 403);
    assert!(!customer.service.0.contains_key("petstore_console"));
    assert!(shown_error(refused)
        .await
        .contains("console-customer signed in, but is not an admin"));

    // Answers the console did not start, or that were tampered with.
    let mut stranger = Browser::new(&app);
    let authorization = stranger.start("/petstore-domain/console/").await;
    let state = query(&authorization)["state"].clone();
    let flow = stranger.service.0["petstore_console_oidc"].clone();
    let callback = |query: &str| format!("{}?{query}", app.url(CALLBACK));
    let hostile = "<img src=x onerror=alert(1)>";
    let cases: [(&str, Option<String>, String, u16, &str); 6] = [
        (
            "no flow cookie",
            None,
            callback(&format!("code=abc&state={state}")),
            400,
            "expired",
        ),
        (
            "another state",
            Some(flow.clone()),
            callback("code=abc&state=not-the-state"),
            400,
            "expired",
        ),
        (
            "a forged flow cookie",
            Some(format!("{}0", flow)),
            callback(&format!("code=abc&state={state}")),
            400,
            "expired",
        ),
        (
            "the provider's refusal",
            Some(flow.clone()),
            callback(&format!(
                "error=access_denied&error_description={}&state={state}",
                url::form_urlencoded::byte_serialize(hostile.as_bytes()).collect::<String>()
            )),
            401,
            "refused the sign-in: access_denied (&#60;img src=x onerror=alert(1)&#62;)",
        ),
        (
            "another provider's answer (RFC 9207 iss)",
            Some(flow.clone()),
            callback(&format!(
                "code=abc&state={state}&iss=http%3A%2F%2F127.0.0.1%3A1"
            )),
            401,
            "another identity provider",
        ),
        (
            "a code the provider never issued",
            Some(flow.clone()),
            callback(&format!("code=made-up&state={state}")),
            401,
            "refused the code: invalid_grant",
        ),
    ];
    for (name, flow, url, status, says) in cases {
        let mut browser = Browser::new(&app);
        if let Some(flow) = flow {
            browser
                .service
                .0
                .insert("petstore_console_oidc".to_owned(), flow);
        }
        let response = browser.get(&url).await;
        assert_eq!(response.status(), status, "{name}");
        assert!(
            !browser.service.0.contains_key("petstore_console"),
            "{name}"
        );
        let error = shown_error(response).await;
        assert!(error.contains(says), "{name}: {error}");
    }

    // Every outcome is a login in the security trail.
    let trail = app
        .get_json("/petstore-domain/admin/audit/security?kind=login")
        .await;
    let entries = trail["entries"].as_array().expect("entries");
    let seen = |subject: &str, outcome: &str, says: &str| {
        entries.iter().any(|entry| {
            entry["subject"] == subject
                && entry["outcome"] == outcome
                && entry["route"] == CALLBACK
                && entry["detail"]
                    .as_str()
                    .is_some_and(|detail| detail.contains(says))
        })
    };
    assert!(
        seen("console-admin", "success", "signed in to the console"),
        "{trail}"
    );
    assert!(
        seen("console-customer", "failure", "not an admin"),
        "{trail}"
    );
    assert!(seen("anonymous", "failure", "invalid_grant"), "{trail}");

    // A provider that is down: the login page says so (502), nothing is started.
    let settings = with_sign_in(&storage, &provider);
    app.stop().await;
    provider.stop().await;
    let app = TestApp::start(settings).await;
    app.wait_until_ready().await;
    let mut browser = Browser::new(&app);
    let response = browser
        .get(&app.url("/petstore-domain/console/login/oidc"))
        .await;
    assert_eq!(response.status(), 502);
    assert!(!browser.service.0.contains_key("petstore_console_oidc"));
    assert!(shown_error(response)
        .await
        .contains("the identity provider could not be used"));
    app.stop().await;
    storage.remove().await;
}

/// The sign-in in Debian's Chromium (`tests/browser/sign_in.mjs`): a console page, the login
/// page's provider link, the provider's login and consent pages, and back on the page first
/// asked for, signed in; a customer refused on the login page; no CSP violation, console
/// error or serious axe-core violation on the console's pages; screenshots kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_sign_in_at_the_provider_works_in_a_real_browser() {
    let provider = Provider::start(0, "key-1").await;
    let storage = Storage::new(Engine::Embedded).await;
    let app = TestApp::start(with_sign_in(&storage, &provider)).await;
    app.wait_until_ready().await;
    let report = run_browser_script(
        "sign_in.mjs",
        &[
            ("BASE_URL", app.address.clone()),
            ("PROVIDER", provider.issuer.clone()),
        ],
        Duration::from_secs(120),
    )
    .await;
    assert_eq!(
        report["screenshots"].as_array().map(Vec::len),
        Some(3),
        "{report}"
    );
    app.stop().await;
    provider.stop().await;
    storage.remove().await;
}
