//! The operator console over HTTP, as a browser without JavaScript uses it: the login and
//! its session cookie, the admin-only rule, CSRF tokens, the security headers, the orders
//! list and its filters, an order's page and its JSON, on both stores.

use std::time::{Duration, Instant};

use petstore_cli::Role;
use petstore_settings::{RoleName, Settings};
use petstore_tests::{on_both_engines, Engine, Storage, TestApp};
use reqwest::header::{CONTENT_TYPE, COOKIE, LOCATION, SET_COOKIE};
use reqwest::redirect::Policy;
use serde_json::{json, Value};

const CONSOLE: &str = "/petstore-domain/console";

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

on_both_engines!(
    orders_are_listed_filtered_paged_and_explained,
    the_live_tail_shows_the_latest_events_and_follows_new_ones,
    the_projections_page_says_where_each_subscriber_stands,
);

/// Settings with two users of the console's login: an admin and a customer.
fn with_users(mut settings: Settings) -> Settings {
    let user = |username: &str, role: &str, subject: &str| {
        serde_json::from_value(json!({
            "username": username,
            "password_hash": petstore_security::auth::login::hash_password("correct horse")
                .expect("hash"),
            "role": role,
            "subject": subject,
        }))
        .expect("a user")
    };
    settings.security.users = vec![
        user("ops", "admin", "ops-1"),
        user("shopper", "customer", "customer-001"),
    ];
    settings.console.trace_url_template =
        Some("http://127.0.0.1:16686/trace/{trace_id}".to_owned());
    settings
}

/// A browser: no redirects followed, cookies kept by hand.
struct Browser<'a> {
    app: &'a TestApp,
    client: reqwest::Client,
    cookies: Vec<(String, String)>,
}

impl<'a> Browser<'a> {
    fn new(app: &'a TestApp) -> Self {
        Self {
            app,
            client: reqwest::Client::builder()
                .redirect(Policy::none())
                .build()
                .expect("a client"),
            cookies: Vec::new(),
        }
    }

    fn keep_cookies(&mut self, response: &reqwest::Response) {
        for value in response.headers().get_all(SET_COOKIE) {
            let value = value.to_str().expect("ascii");
            let pair = value.split(';').next().expect("a pair");
            let (name, content) = pair.split_once('=').expect("name=value");
            self.cookies.retain(|(kept, _)| kept != name);
            if !content.is_empty() {
                self.cookies.push((name.to_owned(), content.to_owned()));
            }
        }
    }

    fn cookie_header(&self) -> String {
        self.cookies
            .iter()
            .map(|(name, value)| format!("{name}={value}"))
            .collect::<Vec<_>>()
            .join("; ")
    }

    async fn get(&mut self, path: &str) -> reqwest::Response {
        let response = self
            .client
            .get(self.app.url(path))
            .header(COOKIE, self.cookie_header())
            .send()
            .await
            .expect("answered");
        self.keep_cookies(&response);
        response
    }

    async fn post(&mut self, path: &str, form: &[(&str, &str)]) -> reqwest::Response {
        let response = self
            .client
            .post(self.app.url(path))
            .header(COOKIE, self.cookie_header())
            .form(form)
            .send()
            .await
            .expect("answered");
        self.keep_cookies(&response);
        response
    }

    /// A browser with the admin `ops` signed in.
    async fn admin(app: &'a TestApp) -> Self {
        let mut browser = Self::new(app);
        assert_eq!(
            browser.log_in("ops", "correct horse", "").await.status(),
            303
        );
        browser
    }

    /// The login page's form token, then the login; the response to it.
    async fn log_in(&mut self, username: &str, password: &str, next: &str) -> reqwest::Response {
        let page = self.get(&format!("{CONSOLE}/login")).await;
        assert_eq!(page.status(), 200);
        let csrf = form_token(&page.text().await.expect("html"));
        self.post(
            &format!("{CONSOLE}/login"),
            &[
                ("username", username),
                ("password", password),
                ("csrf", &csrf),
                ("next", next),
            ],
        )
        .await
    }

    /// A page's HTML, which must answer 200 with the console's headers.
    async fn page(&mut self, path: &str) -> String {
        let response = self.get(path).await;
        assert_eq!(response.status(), 200, "{path}");
        assert_console_headers(&response);
        assert_eq!(
            response.headers()[CONTENT_TYPE],
            "text/html; charset=utf-8",
            "{path}"
        );
        response.text().await.expect("html")
    }
}

/// The value of the first `csrf` field of a page.
fn form_token(html: &str) -> String {
    let marker = "name=\"csrf\" value=\"";
    let start = html.find(marker).expect("a form with a CSRF token") + marker.len();
    html[start..start + 64].to_owned()
}

fn assert_console_headers(response: &reqwest::Response) {
    assert_eq!(
        response.headers()["content-security-policy"],
        CSP,
        "{}",
        response.url()
    );
    assert_eq!(response.headers()["x-content-type-options"], "nosniff");
}

/// No inline script, style or event handler: the CSP would refuse them.
fn assert_no_inline_code(html: &str) {
    assert!(!html.contains("<script>"), "an inline script: {html}");
    assert!(!html.contains("<style"), "an inline style sheet: {html}");
    assert!(!html.contains(" style="), "a style attribute: {html}");
    let handler = html.match_indices(" on").any(|(at, _)| {
        let rest = &html[at + 3..];
        let name_length = rest.chars().take_while(char::is_ascii_lowercase).count();
        name_length > 0 && rest[name_length..].starts_with('=')
    });
    assert!(!handler, "an event handler attribute: {html}");
}

fn location(response: &reqwest::Response) -> &str {
    response.headers()[LOCATION].to_str().expect("ascii")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_console_is_for_admins_with_a_session_and_every_form_carries_its_token() {
    let storage = Storage::new(Engine::Embedded).await;
    let app = TestApp::start(with_users(storage.settings())).await;
    let order_page = format!("{CONSOLE}/orders/01a24f85-a4d2-72c5-b30d-55ecc29c0481");

    // No session: a page sends to the login page (coming back afterwards), and says so
    // with the console's headers; a form is refused outright.
    let mut stranger = Browser::new(&app);
    for (path, next) in [
        (format!("{CONSOLE}/"), None),
        (
            format!("{CONSOLE}/orders?status=paid"),
            Some("%2Fpetstore-domain%2Fconsole%2Forders%3Fstatus%3Dpaid"),
        ),
        (order_page.clone(), None),
        (format!("{order_page}/timeline.json"), None),
    ] {
        let response = stranger.get(&path).await;
        assert_eq!(response.status(), 303, "{path}");
        assert_console_headers(&response);
        let to = location(&response);
        assert!(to.starts_with(&format!("{CONSOLE}/login")), "{path}: {to}");
        if let Some(next) = next {
            assert_eq!(to, format!("{CONSOLE}/login?next={next}"));
        }
    }
    let refused = stranger
        .post(&format!("{CONSOLE}/logout"), &[("csrf", "0")])
        .await;
    assert_eq!(refused.status(), 401);
    assert_console_headers(&refused);
    let problem: Value = refused.json().await.expect("a problem");
    assert!(problem["correlation_id"].is_string(), "{problem}");

    // The login page and the static files are public, with the same headers; an expired or
    // forged session cookie does not keep anyone from them (nor loop the login page).
    let login_page = stranger.get(&format!("{CONSOLE}/login")).await;
    assert_eq!(login_page.status(), 200);
    assert_console_headers(&login_page);
    // Without console.oidc: no provider to sign in at, and the sign-in's routes say so.
    assert!(!login_page
        .text()
        .await
        .expect("text")
        .contains("/login/oidc"));
    for path in ["login/oidc", "login/oidc/callback?code=a&state=b"] {
        let refused = stranger.get(&format!("{CONSOLE}/{path}")).await;
        assert_eq!(refused.status(), 404, "{path}");
        assert_console_headers(&refused);
    }
    let mut stale = Browser::new(&app);
    stale.cookies.push((
        "petstore_console".to_owned(),
        "expired.or.forged".to_owned(),
    ));
    assert_eq!(stale.get(&format!("{CONSOLE}/login")).await.status(), 200);
    assert_eq!(
        stale
            .get(&format!("{CONSOLE}/assets/console.css"))
            .await
            .status(),
        200
    );
    let refused = stale.get(&format!("{CONSOLE}/orders")).await;
    assert_eq!(
        refused.status(),
        303,
        "a bad session is sent to sign in again"
    );
    assert_eq!(
        location(&refused),
        format!("{CONSOLE}/login?next=%2Fpetstore-domain%2Fconsole%2Forders")
    );
    for (file, content_type) in [
        ("htmx.min.js", "text/javascript; charset=utf-8"),
        ("htmx-ext-sse.min.js", "text/javascript; charset=utf-8"),
        ("console.css", "text/css; charset=utf-8"),
    ] {
        let asset = stranger.get(&format!("{CONSOLE}/assets/{file}")).await;
        assert_eq!(asset.status(), 200, "{file}");
        assert_eq!(asset.headers()[CONTENT_TYPE], content_type);
        assert_console_headers(&asset);
    }
    assert_eq!(
        stranger
            .get(&format!("{CONSOLE}/assets/nope.js"))
            .await
            .status(),
        404
    );

    // A login form without its token, or with another login page's, is refused.
    let forged = stranger
        .post(
            &format!("{CONSOLE}/login"),
            &[
                ("username", "ops"),
                ("password", "correct horse"),
                ("csrf", "00"),
            ],
        )
        .await;
    assert_eq!(forged.status(), 403);
    assert!(forged
        .headers()
        .get_all(SET_COOKIE)
        .iter()
        .all(|cookie| !cookie
            .to_str()
            .expect("ascii")
            .starts_with("petstore_console=")));
    // A wrong password: the page again, 401, no session.
    let wrong = stranger.log_in("ops", "wrong", "").await;
    assert_eq!(wrong.status(), 401);
    assert!(wrong
        .text()
        .await
        .expect("html")
        .contains("Wrong username or password."));
    assert!(stranger
        .cookies
        .iter()
        .all(|(name, _)| name != "petstore_console"));

    // A customer signs in, and is refused every page and form.
    let mut customer = Browser::new(&app);
    assert_eq!(
        customer
            .log_in("shopper", "correct horse", "")
            .await
            .status(),
        303
    );
    for path in [format!("{CONSOLE}/"), order_page.clone()] {
        let response = customer.get(&path).await;
        assert_eq!(response.status(), 403, "{path}");
        assert_console_headers(&response);
    }
    // And with a bearer token instead of a session.
    let with_token = app
        .client_as("customer-001", RoleName::Customer)
        .get(app.url(&format!("{CONSOLE}/orders")))
        .send()
        .await
        .expect("answered");
    assert_eq!(with_token.status(), 403);

    // An admin signs in: a locked-down cookie (not Secure on a loopback address), back to
    // the page asked for, never to another site.
    let mut admin = Browser::new(&app);
    let signed_in = admin
        .log_in(
            "ops",
            "correct horse",
            "/petstore-domain/console/orders?status=paid",
        )
        .await;
    assert_eq!(signed_in.status(), 303);
    assert_eq!(
        location(&signed_in),
        "/petstore-domain/console/orders?status=paid"
    );
    let session = signed_in
        .headers()
        .get_all(SET_COOKIE)
        .iter()
        .map(|cookie| cookie.to_str().expect("ascii"))
        .find(|cookie| cookie.starts_with("petstore_console="))
        .expect("a session cookie");
    for part in [
        "HttpOnly",
        "SameSite=Strict",
        "Path=/petstore-domain/console",
    ] {
        assert!(session.contains(part), "{session} lacks {part}");
    }
    assert!(!session.contains("Secure"), "{session}");
    let elsewhere = Browser::new(&app)
        .log_in("ops", "correct horse", "https://evil.example/")
        .await;
    assert_eq!(location(&elsewhere), "/petstore-domain/console/");

    let home = admin.page(&format!("{CONSOLE}/")).await;
    assert!(
        home.contains("Signed in as <strong>ops-1</strong>"),
        "{home}"
    );
    assert_no_inline_code(&home);
    assert_no_inline_code(
        &stranger
            .get(&format!("{CONSOLE}/login"))
            .await
            .text()
            .await
            .expect("html"),
    );

    // Signing out needs the page's token; then the session is gone.
    let csrf = form_token(&home);
    let other_session_token = form_token(
        &Browser::new(&app)
            .get(&format!("{CONSOLE}/login"))
            .await
            .text()
            .await
            .expect("html"),
    );
    for token in ["", "00", other_session_token.as_str()] {
        let refused = admin
            .post(&format!("{CONSOLE}/logout"), &[("csrf", token)])
            .await;
        assert_eq!(refused.status(), 403, "token {token:?}");
        let problem: Value = refused.json().await.expect("a problem");
        assert!(problem["correlation_id"].is_string(), "{problem}");
    }
    let out = admin
        .post(&format!("{CONSOLE}/logout"), &[("csrf", &csrf)])
        .await;
    assert_eq!(out.status(), 303);
    assert_eq!(location(&out), "/petstore-domain/console/login");
    assert!(admin
        .cookies
        .iter()
        .all(|(name, _)| name != "petstore_console"));
    assert_eq!(admin.get(&format!("{CONSOLE}/")).await.status(), 303);

    app.stop().await;
    storage.remove().await;
}

async fn orders_are_listed_filtered_paged_and_explained(engine: Engine) {
    let storage = Storage::new(engine).await;
    let app = TestApp::start(with_users(storage.settings())).await;
    app.wait_until_ready().await;
    let mut admin = Browser::admin(&app).await;

    let hostile = "<img src=x onerror=alert(1)>";
    let placed = app
        .post_json(
            "/petstore-domain/orders",
            &json!({
                "customer_id": "customer-001",
                "pet_id": "golden-retriever-001",
                "special_instructions": hostile,
            }),
        )
        .await;
    assert_eq!(placed.status(), 202);
    let completed = placed.json::<Value>().await.expect("json")["order_id"]
        .as_str()
        .expect("id")
        .to_owned();
    let cancelled = app.post_order("beagle-001", Some("payment-service")).await;
    let other = app.post_order("persian-cat-001", None).await;
    for order in [&completed, &cancelled, &other] {
        app.wait_for_terminal(order).await;
    }

    // Every order, newest first.
    let list = admin.page(&format!("{CONSOLE}/orders")).await;
    let at = |html: &str, id: &str| html.find(&format!("/orders/{id}\"")).unwrap_or(usize::MAX);
    assert!(at(&list, &other) < at(&list, &cancelled), "{list}");
    assert!(at(&list, &cancelled) < at(&list, &completed), "{list}");
    // Filtered by status, in the URL.
    let only_cancelled = admin
        .page(&format!("{CONSOLE}/orders?status=cancelled"))
        .await;
    assert!(at(&only_cancelled, &cancelled) < usize::MAX);
    assert_eq!(at(&only_cancelled, &completed), usize::MAX);
    assert!(only_cancelled.contains("<option value=\"cancelled\" selected>"));
    // By customer and time placed.
    let nobody = admin
        .page(&format!("{CONSOLE}/orders?customer=customer-999"))
        .await;
    assert!(nobody.contains("No order matches."));
    let before_any = admin.page(&format!("{CONSOLE}/orders?to=2000-01-01")).await;
    assert!(before_any.contains("No order matches."));
    let today = chrono::Utc::now().format("%Y-%m-%d").to_string();
    let since_today = admin
        .page(&format!(
            "{CONSOLE}/orders?from={today}&customer=customer-001"
        ))
        .await;
    assert!(at(&since_today, &completed) < usize::MAX, "{since_today}");
    // Two a page: the next page's link keeps the filter and goes on from the last one.
    let first = admin.page(&format!("{CONSOLE}/orders?limit=2")).await;
    assert!(at(&first, &other) < usize::MAX && at(&first, &cancelled) < usize::MAX);
    assert_eq!(at(&first, &completed), usize::MAX);
    let next = first
        .split("href=\"")
        .filter_map(|rest| rest.split('"').next())
        .find(|href| href.contains("before="))
        .expect("a next page")
        .replace("&amp;", "&");
    assert!(next.contains("limit=2"), "{next}");
    let second = admin.page(&next).await;
    assert!(at(&second, &completed) < usize::MAX, "{second}");
    assert_eq!(at(&second, &other), usize::MAX);
    // A filter that cannot be used: 400, each reason said, the form kept.
    let bad = admin
        .get(&format!("{CONSOLE}/orders?status=lost&from=yesterday"))
        .await;
    assert_eq!(bad.status(), 400);
    assert_console_headers(&bad);
    let bad = bad.text().await.expect("html");
    assert!(bad.contains("There is no status “lost”."), "{bad}");
    assert!(bad.contains("From: “yesterday” is not a date"), "{bad}");
    assert!(bad.contains("value=\"yesterday\""), "{bad}");
    let unknown = admin.get(&format!("{CONSOLE}/orders?colour=red")).await;
    assert_eq!(unknown.status(), 422);

    // An order's page: its text escaped, where it stands, every entry of the timeline the
    // admin route serves, each with its permalink and its trace link.
    // Provider attempts reach the timeline in batches (every 100 ms): the page and the
    // JSON are compared with the route's document once two reads around them agree.
    let timeline_path = format!("/petstore-domain/admin/orders/{completed}/timeline");
    let deadline = Instant::now() + Duration::from_secs(30);
    let (page, timeline, download) = loop {
        let before: Value = app.get_json(&timeline_path).await;
        let page = admin.page(&format!("{CONSOLE}/orders/{completed}")).await;
        let download = admin
            .get(&format!("{CONSOLE}/orders/{completed}/timeline.json"))
            .await;
        let after: Value = app.get_json(&timeline_path).await;
        if before["entries"] == after["entries"] {
            break (page, after, download);
        }
        assert!(
            Instant::now() < deadline,
            "the timeline never settled: {after}"
        );
        tokio::time::sleep(Duration::from_millis(150)).await;
    };
    assert!(!page.contains(hostile), "unescaped instructions");
    assert!(
        page.contains("&#60;img src=x onerror=alert(1)&#62;")
            || page.contains("&lt;img src=x onerror=alert(1)&gt;"),
        "{page}"
    );
    assert!(page.contains("<span class=\"status status-terminal\">terminal</span>"));
    let entries = timeline["entries"].as_array().expect("entries");
    assert!(entries.len() > 10, "{timeline}");
    for entry in entries {
        let index = entry["index"].as_u64().expect("index");
        assert!(
            page.contains(&format!("<tr id=\"entry-{index}\">")),
            "entry {index}"
        );
        if let Some(trace) = entry["trace_id"].as_str() {
            assert!(
                page.contains(&format!("href=\"http://127.0.0.1:16686/trace/{trace}\"")),
                "no trace link for {entry}"
            );
        }
    }
    let traced = entries
        .iter()
        .filter(|entry| entry["trace_id"].is_string())
        .count();
    assert!(traced > 0, "no entry has a trace: {timeline}");
    // Its JSON: the timeline route's document, as a download.
    assert_eq!(download.status(), 200);
    assert_eq!(
        download.headers()["content-disposition"],
        format!("attachment; filename=\"order-{completed}-timeline.json\"")
    );
    let document: Value = download.json().await.expect("json");
    assert_eq!(document["entries"], timeline["entries"]);
    assert_eq!(document["total_entries"], timeline["total_entries"]);
    // The cancelled order's page names its failed step.
    let failed = admin.page(&format!("{CONSOLE}/orders/{cancelled}")).await;
    assert!(failed.contains("payment-failed"), "{failed}");
    // Unknown and malformed ids.
    let missing = admin
        .get(&format!(
            "{CONSOLE}/orders/01a24f85-a4d2-72c5-b30d-55ecc29c0481"
        ))
        .await;
    assert_eq!(missing.status(), 404);
    assert_console_headers(&missing);
    assert_eq!(
        admin
            .get(&format!("{CONSOLE}/orders/not-a-uuid"))
            .await
            .status(),
        400
    );
    assert_eq!(
        admin
            .get(&format!("{CONSOLE}/orders/{completed}?after=x"))
            .await
            .status(),
        422
    );

    app.stop().await;
    storage.remove().await;
}

/// With no saga runner, an order's reservation deadline passes: the stuck filter lists it,
/// and its page says why, with the deadline overdue.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_stuck_filter_lists_an_order_whose_deadline_is_overdue() {
    let storage = Storage::new(Engine::Postgres).await;
    let mut settings = with_users(storage.settings());
    settings.saga.reservation_timeout_ms = 200;
    let roles = [Role::Command, Role::Query, Role::Projector]
        .into_iter()
        .collect();
    let app = TestApp::start_with_roles(settings, &roles).await;
    app.wait_until_ready().await;
    let mut admin = Browser::admin(&app).await;
    let order = app.post_order("golden-retriever-001", None).await;
    app.wait_for_order(&order, |view| view["status"] == "pending")
        .await;

    let deadline = Instant::now() + Duration::from_secs(30);
    let stuck = loop {
        let stuck = admin.page(&format!("{CONSOLE}/orders?stuck=on")).await;
        if stuck.contains(&order) {
            break stuck;
        }
        assert!(Instant::now() < deadline, "never listed as stuck: {stuck}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert!(stuck
        .contains("<input id=\"stuck\" name=\"stuck\" type=\"checkbox\" value=\"on\" checked>"));
    let page = admin.page(&format!("{CONSOLE}/orders/{order}")).await;
    assert!(
        page.contains("<span class=\"status status-stuck\">stuck</span>"),
        "{page}"
    );
    assert!(
        page.contains("the reservation deadline is overdue by"),
        "{page}"
    );
    assert!(page.contains("reservation, due "), "{page}");
    assert!(page.contains("overdue by "), "{page}");

    app.stop().await;
    storage.remove().await;
}

/// The value of the hidden `version` field of the flags page.
fn shown_version(html: &str) -> String {
    let marker = "name=\"version\" value=\"";
    let start = html.find(marker).expect("a toggle form") + marker.len();
    html[start..].split('"').next().expect("a value").to_owned()
}

/// Every console write: a flag toggled (and refused when made on a stale page, saying who
/// changed the settings since), a breaker forced, a dead letter retried; each refused
/// without its token or to a customer, each recorded as an operator action, listed on the
/// audit page and, for the dead letter's order, in its timeline.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_console_write_is_checked_and_recorded_as_an_operator_action() {
    let storage = Storage::new(Engine::Embedded).await;
    let app = TestApp::start(with_users(storage.settings())).await;
    app.wait_until_ready().await;
    let mut admin = Browser::admin(&app).await;
    let mut customer = Browser::new(&app);
    assert_eq!(
        customer
            .log_in("shopper", "correct horse", "")
            .await
            .status(),
        303
    );

    // A flag, at the version the page showed.
    let flags = admin.page(&format!("{CONSOLE}/flags")).await;
    let csrf = form_token(&flags);
    let version = shown_version(&flags);
    assert!(flags.contains("Turn premium_filters off"), "{flags}");
    let toggle = |on: &'static str, version: String, csrf: String| {
        vec![("csrf", csrf), ("on", on.to_owned()), ("version", version)]
    };
    for (who, form) in [
        (
            &mut customer,
            toggle("false", version.clone(), csrf.clone()),
        ),
        (
            &mut admin,
            toggle("false", version.clone(), "00".to_owned()),
        ),
    ] {
        let form: Vec<(&str, &str)> = form.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let refused = who
            .post(&format!("{CONSOLE}/flags/premium_filters"), &form)
            .await;
        assert_eq!(refused.status(), 403);
    }
    let form = toggle("false", version.clone(), csrf.clone());
    let form: Vec<(&str, &str)> = form.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let toggled = admin
        .post(&format!("{CONSOLE}/flags/premium_filters"), &form)
        .await;
    assert_eq!(toggled.status(), 303);
    assert_eq!(
        location(&toggled),
        "/petstore-domain/console/flags?done=flag"
    );
    let config = app.get_json("/petstore-domain/admin/config").await;
    assert_eq!(
        config["settings"]["feature_flags"]["premium_filters"],
        false
    );
    // The same form again: the settings moved on since, so nothing changes, and the page
    // says who moved them.
    let stale = admin
        .post(&format!("{CONSOLE}/flags/premium_filters"), &form)
        .await;
    assert_eq!(stale.status(), 412);
    assert_console_headers(&stale);
    let stale = stale.text().await.expect("html");
    assert!(stale.contains("changed by ops-1"), "{stale}");
    assert!(stale.contains("Turn premium_filters on"), "{stale}");

    // A breaker, in this process.
    let forced = admin
        .post(
            &format!("{CONSOLE}/breakers/payment"),
            &[("csrf", &csrf), ("mode", "forced_open")],
        )
        .await;
    assert_eq!(forced.status(), 303);
    let breakers = app
        .get_json("/petstore-domain/admin/circuit-breakers")
        .await;
    assert_eq!(breakers["payment"]["mode"], "forced_open");
    let released = admin
        .post(
            &format!("{CONSOLE}/breakers/payment"),
            &[("csrf", &csrf), ("mode", "automatic")],
        )
        .await;
    assert_eq!(released.status(), 303);
    assert_eq!(
        admin
            .post(
                &format!("{CONSOLE}/breakers/teleporter"),
                &[("csrf", &csrf), ("mode", "automatic")],
            )
            .await
            .status(),
        404
    );

    // A dead letter of a completed order: retried from the list.
    let order = app.post_order("golden-retriever-001", None).await;
    app.wait_for_terminal(&order).await;
    let database = storage.database().await;
    crate::poison::insert_event(
        &database,
        "Payment",
        &order,
        2,
        ("PaymentTeleported", "1.0"),
        &json!({"PaymentTeleported": {"to": "mars"}}),
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let letter = loop {
        let letters = app
            .get_json("/petstore-domain/admin/dead-letters?status=pending")
            .await;
        if let Some(letter) = letters["dead_letters"]
            .as_array()
            .and_then(|letters| letters.first())
        {
            break letter.clone();
        }
        assert!(Instant::now() < deadline, "no dead letter: {letters}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let id = letter["id"].as_i64().expect("id").to_string();
    let list = admin.page(&format!("{CONSOLE}/dead-letters")).await;
    assert!(list.contains(&format!("value=\"{id}\"")), "{list}");
    assert!(!list.contains("mars"), "a payload shown: {list}");
    assert_eq!(
        customer
            .post(
                &format!("{CONSOLE}/dead-letters"),
                &[("csrf", &csrf), ("action", "retry"), ("id", &id)],
            )
            .await
            .status(),
        403
    );
    let retried = admin
        .post(
            &format!("{CONSOLE}/dead-letters"),
            &[
                ("csrf", &csrf),
                ("action", "retry"),
                ("id", &id),
                ("id", "999999"),
            ],
        )
        .await;
    assert_eq!(retried.status(), 303);
    let outcome = admin.page(location(&retried)).await;
    assert!(
        outcome.contains("1 dead letter asked to be handled again; 1 refused"),
        "{outcome}"
    );
    for bad in [
        vec![
            ("csrf", csrf.as_str()),
            ("action", "teleport"),
            ("id", id.as_str()),
        ],
        vec![("csrf", csrf.as_str()), ("action", "skip")],
        vec![("csrf", csrf.as_str()), ("action", "skip"), ("id", "x")],
    ] {
        assert_eq!(
            admin
                .post(&format!("{CONSOLE}/dead-letters"), &bad)
                .await
                .status(),
            422,
            "{bad:?}"
        );
    }

    // Every action in the audit list, newest first, with who and before and after.
    let audit = admin.page(&format!("{CONSOLE}/audit")).await;
    let at = |text: &str| audit.find(text).unwrap_or(usize::MAX);
    assert!(at("dead_letter_retried") < at("breaker_forced"), "{audit}");
    assert!(at("breaker_forced") < at("flag_set"), "{audit}");
    assert!(audit.contains("flag premium_filters"), "{audit}");
    assert!(audit.contains("ops-1"), "{audit}");
    assert!(audit.contains(&format!("dead letter {id}")), "{audit}");
    // And the dead letter's in its order's timeline.
    let timeline = app
        .get_json(&format!("/petstore-domain/admin/orders/{order}/timeline"))
        .await;
    let action = timeline["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .find(|entry| entry["kind"] == "operator_action")
        .unwrap_or_else(|| panic!("no operator action in {timeline}"))
        .clone();
    assert_eq!(action["subject"], "ops-1");
    assert!(
        action["summary"].as_str().is_some_and(
            |summary| summary.contains(&format!("dead_letter_retried: dead letter {id}"))
        ),
        "{action}"
    );

    database.close().await;
    app.stop().await;
    storage.remove().await;
}

/// `console.read_only`: no write control is rendered, and every write is refused (with
/// its token, by an admin), changing nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_read_only_console_renders_no_write_control_and_refuses_every_write() {
    let storage = Storage::new(Engine::Embedded).await;
    let mut settings = with_users(storage.settings());
    settings.console.read_only = true;
    let app = TestApp::start(settings).await;
    app.wait_until_ready().await;
    let mut admin = Browser::admin(&app).await;
    let flags = admin.page(&format!("{CONSOLE}/flags")).await;
    let letters = admin.page(&format!("{CONSOLE}/dead-letters")).await;
    for page in [&flags, &letters] {
        assert!(
            !page.contains("action=\"/petstore-domain/console/flags/"),
            "{page}"
        );
        assert!(
            !page.contains("action=\"/petstore-domain/console/breakers/"),
            "{page}"
        );
        assert!(!page.contains("name=\"action\""), "{page}");
    }
    let csrf = form_token(&flags);
    let version = app.get_json("/petstore-domain/admin/config").await["version"].to_string();
    for (path, form) in [
        (
            "flags/premium_filters",
            vec![
                ("csrf", csrf.as_str()),
                ("on", "false"),
                ("version", version.as_str()),
            ],
        ),
        (
            "breakers/payment",
            vec![("csrf", csrf.as_str()), ("mode", "forced_open")],
        ),
        (
            "dead-letters",
            vec![("csrf", csrf.as_str()), ("action", "skip"), ("id", "1")],
        ),
    ] {
        let refused = admin.post(&format!("{CONSOLE}/{path}"), &form).await;
        assert_eq!(refused.status(), 403, "{path}");
        let problem: Value = refused.json().await.expect("a problem");
        assert!(
            problem["detail"]
                .as_str()
                .is_some_and(|detail| detail.contains("read-only")),
            "{problem}"
        );
    }
    let config = app.get_json("/petstore-domain/admin/config").await;
    assert_eq!(config["settings"]["feature_flags"]["premium_filters"], true);
    let breakers = app
        .get_json("/petstore-domain/admin/circuit-breakers")
        .await;
    assert_eq!(breakers["payment"]["mode"], "automatic");
    assert!(admin
        .page(&format!("{CONSOLE}/audit"))
        .await
        .contains("No action yet."));

    app.stop().await;
    storage.remove().await;
}

/// Runs `node tests/browser/{script}` with `env` (and `ARTIFACTS`) within `limit`, and
/// returns its JSON report once sure it found no problem. Chromium and the scripts'
/// packages are installed first (`scripts/services.sh browser`) when they are missing.
pub(crate) async fn run_browser_script(
    script: &str,
    env: &[(&str, String)],
    limit: Duration,
) -> Value {
    let folder = browser_scripts();
    let mut command = tokio::process::Command::new("node");
    command
        .arg(folder.join(script))
        .env("ARTIFACTS", artifacts())
        .kill_on_drop(true);
    for (name, value) in env {
        command.env(name, value);
    }
    let run = tokio::time::timeout(limit, command.output())
        .await
        .unwrap_or_else(|_| panic!("{script} ends within {limit:?}"))
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&run.stdout);
    let report: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|_| {
        panic!(
            "no report from {script}: {stdout}\n{}",
            String::from_utf8_lossy(&run.stderr)
        )
    });
    assert_eq!(report["problems"], json!([]), "{report}");
    assert!(run.status.success(), "{report}");
    report
}

/// The browser scripts' folder (`tests/browser`), with Chromium and the scripts' packages
/// installed (`scripts/services.sh browser`) when they are missing.
fn browser_scripts() -> std::path::PathBuf {
    let folder = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("browser");
    if !folder.join("node_modules/playwright-core").is_dir()
        || !std::path::Path::new("/usr/bin/chromium").exists()
    {
        let script =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/services.sh");
        let installed = std::process::Command::new("bash")
            .arg(script)
            .arg("browser")
            .status()
            .expect("scripts/services.sh runs");
        assert!(
            installed.success(),
            "Chromium and playwright-core could not be installed"
        );
    }
    folder
}

/// Where the browser test keeps its screenshots: `$PETSTORE_ARTIFACTS/console`, by default
/// under `~/.cache/petstore/artifacts` (outside the clone, kept between runs).
fn artifacts() -> std::path::PathBuf {
    let root = std::env::var_os("PETSTORE_ARTIFACTS").map_or_else(
        || {
            std::path::PathBuf::from(std::env::var_os("HOME").expect("HOME is set"))
                .join(".cache/petstore/artifacts")
        },
        std::path::PathBuf::from,
    );
    root.join("console")
}

/// The console in Debian's Chromium (`tests/browser/console.mjs`, playwright-core): every
/// page at 1280x800 and 390x844 with no CSP violation, console error or dialog, no serious
/// or critical axe-core violation, no sideways scroll at 390 px, hostile text shown as
/// text, a waiting order's page following its saga live without a reload while the server
/// ends its stream every 2 s (every entry once, in order), and a keyboard-only sign-in and
/// toggle; screenshots kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_console_passes_in_a_real_browser() {
    let storage = Storage::new(Engine::Embedded).await;
    let mut settings = with_users(storage.settings());
    // The live page's stream ends every 2 s: the browser must carry on across it.
    settings.console.live_max_seconds = 2;
    let app = TestApp::start(settings).await;
    app.wait_until_ready().await;
    // An order placed while express_order_processing is off waits for its payment.
    let express = |on: bool| {
        app.client
            .put(app.url("/petstore-domain/admin/config"))
            .json(&json!({"feature_flags": {"express_order_processing": on}}))
            .send()
    };
    assert_eq!(express(false).await.expect("answered").status(), 200);
    let waiting = app.post_order("persian-cat-001", None).await;
    app.wait_for_order(&waiting, |view| view["status"] == "reserved")
        .await;
    assert_eq!(express(true).await.expect("answered").status(), 200);
    let placed = app
        .post_json(
            "/petstore-domain/orders",
            &json!({
                "customer_id": "customer-001",
                "pet_id": "golden-retriever-001",
                "special_instructions": "<img src=x onerror=alert(1)>",
            }),
        )
        .await;
    assert_eq!(placed.status(), 202);
    let order = placed.json::<Value>().await.expect("json")["order_id"]
        .as_str()
        .expect("id")
        .to_owned();
    let cancelled = app.post_order("beagle-001", Some("payment-service")).await;
    app.wait_for_terminal(&order).await;
    app.wait_for_terminal(&cancelled).await;

    let report = run_browser_script(
        "console.mjs",
        &[
            ("BASE_URL", app.address.clone()),
            ("USERNAME", "ops".to_owned()),
            ("PASSWORD", "correct horse".to_owned()),
            ("ORDER", order.clone()),
            ("CANCELLED", cancelled.clone()),
            ("WAITING", waiting.clone()),
            ("ADMIN_TOKEN", app.token("ops-1", RoleName::Admin)),
        ],
        Duration::from_secs(240),
    )
    .await;
    let screenshots = report["screenshots"].as_array().expect("screenshots");
    assert_eq!(screenshots.len(), 22, "{report}");
    assert_eq!(app.wait_for_terminal(&waiting).await["status"], "completed");
    for path in screenshots {
        let path = path.as_str().expect("a path");
        assert!(
            std::fs::metadata(path).is_ok_and(|file| file.len() > 1000),
            "{path}"
        );
    }

    app.stop().await;
    storage.remove().await;
}

/// One Server-Sent Event.
#[derive(Debug, Default)]
struct SseEvent {
    event: String,
    id: String,
    data: String,
}

/// Reads a live stream's events as they come.
struct EventReader {
    response: reqwest::Response,
    buffer: String,
}

impl EventReader {
    /// The next event (comments skipped), waiting at most 30 s.
    async fn next(&mut self) -> Option<SseEvent> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let mut event = SseEvent::default();
                let mut data = Vec::new();
                for line in block.lines() {
                    if let Some(value) = line.strip_prefix("event:") {
                        event.event = value.trim_start().to_owned();
                    } else if let Some(value) = line.strip_prefix("id:") {
                        event.id = value.trim_start().to_owned();
                    } else if let Some(value) = line.strip_prefix("data:") {
                        data.push(value.strip_prefix(' ').unwrap_or(value).to_owned());
                    }
                }
                if event.event.is_empty() && data.is_empty() {
                    continue; // a comment: the keep-alive
                }
                event.data = data.join("\n");
                return Some(event);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.response.chunk()).await {
                Ok(Ok(Some(chunk))) => self.buffer.push_str(&String::from_utf8_lossy(&chunk)),
                Ok(Ok(None)) => return None,
                Ok(Err(error)) => panic!("the stream failed: {error}"),
                Err(_) => panic!("no event within 30 s; so far: {}", self.buffer),
            }
        }
    }
}

/// The entries' indexes a live fragment shows, in order (`<tr id="entry-N">`).
fn shown_entries(html: &str) -> Vec<usize> {
    html.match_indices("<tr id=\"entry-")
        .filter_map(|(at, marker)| {
            html[at + marker.len()..]
                .split('"')
                .next()
                .and_then(|index| index.parse().ok())
        })
        .collect()
}

/// An order's page, live: its stream sends the changing part whole as the saga moves on
/// (an order waiting for its payment, then paid and completed) and says `done` at the end;
/// a reconnect from the last id shows every entry once; unhappy paths answer problems.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_order_page_follows_its_saga_live_and_a_reconnect_misses_nothing() {
    let storage = Storage::new(Engine::Embedded).await;
    let mut settings = with_users(storage.settings());
    settings.feature_flags.express_order_processing = petstore_settings::FlagSetting::Off;
    let app = TestApp::start(settings).await;
    app.wait_until_ready().await;
    let mut admin = Browser::admin(&app).await;
    let order = app.post_order("golden-retriever-001", None).await;
    app.wait_for_order(&order, |view| view["status"] == "reserved")
        .await;

    // The page says where its stream is while the order can still change.
    let page = admin.page(&format!("{CONSOLE}/orders/{order}")).await;
    assert!(page.contains("hx-ext=\"sse\""), "{page}");
    let live_path = page
        .split("sse-connect=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("the live stream's URL")
        .replace("&amp;", "&");
    assert!(live_path.starts_with(&format!("{CONSOLE}/orders/{order}/live?after=")));

    let (client, cookies) = (admin.client.clone(), admin.cookie_header());
    let open = |path: String| {
        let client = client.clone();
        let cookies = cookies.clone();
        let url = app.url(&path);
        async move {
            client
                .get(url)
                .header(COOKIE, cookies)
                .send()
                .await
                .expect("answered")
        }
    };
    let response = open(live_path.clone()).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()[CONTENT_TYPE], "text/event-stream");
    assert_console_headers(&response);
    let mut stream = EventReader {
        response,
        buffer: String::new(),
    };
    let first = stream.next().await.expect("the current state");
    assert_eq!(first.event, "timeline");
    assert!(first.data.contains("status-reserved"), "{}", first.data);
    assert!(first.data.contains("payment"), "{}", first.data);
    let first_id: i64 = first.id.parse().expect("a position");
    let first_entries = shown_entries(&first.data);
    assert_eq!(first_entries, (0..first_entries.len()).collect::<Vec<_>>());

    // The customer pays: the stream sends the order moving on, then done.
    let paid = app
        .post_json("/petstore-domain/payments", &json!({"order_id": order}))
        .await;
    assert!(paid.status().is_success(), "{}", paid.status());
    let mut last = first;
    loop {
        let event = stream.next().await.expect("an event");
        if event.event == "done" {
            break;
        }
        assert_eq!(event.event, "timeline");
        assert!(event.id.parse::<i64>().expect("a position") >= first_id);
        let entries = shown_entries(&event.data);
        assert_eq!(
            entries,
            (0..entries.len()).collect::<Vec<_>>(),
            "in order, once each"
        );
        assert!(entries.len() >= shown_entries(&last.data).len());
        last = event;
    }
    assert!(last.data.contains("status-completed"), "{}", last.data);
    assert!(stream.next().await.is_none(), "the stream ends after done");

    // A reconnect from the last id it had, the way the htmx extension does (?after=) and the
    // way a browser does (Last-Event-ID): the whole state once, then done.
    for resumed in [
        open(format!("{CONSOLE}/orders/{order}/live?after={first_id}")).await,
        admin
            .client
            .get(app.url(&format!("{CONSOLE}/orders/{order}/live")))
            .header(COOKIE, admin.cookie_header())
            .header("Last-Event-ID", first_id.to_string())
            .send()
            .await
            .expect("answered"),
    ] {
        let mut stream = EventReader {
            response: resumed,
            buffer: String::new(),
        };
        let state = stream.next().await.expect("the state");
        assert_eq!(shown_entries(&state.data), shown_entries(&last.data));
        assert_eq!(state.id, last.id);
        assert_eq!(stream.next().await.expect("done").event, "done");
    }
    // A terminal order's page is not live.
    let page = admin.page(&format!("{CONSOLE}/orders/{order}")).await;
    assert!(!page.contains("sse-connect"), "{page}");

    // Unhappy paths: a bad resume id, an unknown order, no session, too many streams.
    let bad = admin
        .client
        .get(app.url(&format!("{CONSOLE}/orders/{order}/live")))
        .header(COOKIE, admin.cookie_header())
        .header("Last-Event-ID", "t1p2")
        .send()
        .await
        .expect("answered");
    assert_eq!(bad.status(), 400);
    assert_eq!(
        open(format!("{CONSOLE}/orders/{order}/live?after=-1"))
            .await
            .status(),
        400
    );
    assert_eq!(
        open(format!(
            "{CONSOLE}/orders/01a24f85-a4d2-72c5-b30d-55ecc29c0481/live"
        ))
        .await
        .status(),
        404
    );
    assert_eq!(
        Browser::new(&app)
            .get(&format!("{CONSOLE}/orders/{order}/live"))
            .await
            .status(),
        303
    );
    let waiting = app.post_order("beagle-001", None).await;
    app.wait_for_order(&waiting, |view| view["status"] == "reserved")
        .await;
    let mut held = Vec::new();
    for _ in 0..4 {
        let response = open(format!("{CONSOLE}/orders/{waiting}/live")).await;
        assert_eq!(response.status(), 200);
        held.push(response);
    }
    let refused = open(format!("{CONSOLE}/orders/{waiting}/live")).await;
    assert_eq!(refused.status(), 429);
    assert_eq!(refused.headers()["retry-after"], "1");
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let again = open(format!("{CONSOLE}/orders/{waiting}/live")).await;
        if again.status() == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the streams' places never came back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    app.stop().await;
    storage.remove().await;
}

/// The stream's live tail over HTTP: the page of the latest events of one type, paused at a
/// position; its stream sending the window at once and again when an event is committed;
/// the unhappy paths.
async fn the_live_tail_shows_the_latest_events_and_follows_new_ones(engine: Engine) {
    let storage = Storage::new(engine).await;
    let app = TestApp::start(with_users(storage.settings())).await;
    app.wait_until_ready().await;
    let mut admin = Browser::admin(&app).await;
    let order = app.post_order("golden-retriever-001", None).await;
    app.wait_for_terminal(&order).await;

    let all = admin.page(&format!("{CONSOLE}/tail")).await;
    assert!(all.contains("OrderCompleted 1.0"), "{all}");
    assert!(
        all.contains(&format!("/petstore-domain/console/orders/{order}")),
        "{all}"
    );
    assert!(all.contains("sse-connect=\"/petstore-domain/console/tail/live?after="));
    let created = admin
        .page(&format!("{CONSOLE}/tail?type=OrderCreated"))
        .await;
    assert!(created.contains("OrderCreated 1.0"), "{created}");
    assert!(!created.contains("OrderCompleted"), "{created}");
    // Paused at the OrderCreated: the same rows, no stream, a way back.
    let position = created
        .split("<tr id=\"tail-")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("a row")
        .to_owned();
    let paused = admin
        .page(&format!("{CONSOLE}/tail?until={position}&paused=1"))
        .await;
    assert!(
        paused.contains(&format!("<tr id=\"tail-{position}\">")),
        "{paused}"
    );
    assert!(!paused.contains("sse-connect"), "{paused}");
    assert!(paused.contains("Resume from here"), "{paused}");

    // The stream: the window at once, then again with a new event.
    let response = admin
        .client
        .get(app.url(&format!(
            "{CONSOLE}/tail/live?after={position}&type=LiveSettingsChanged"
        )))
        .header(COOKIE, admin.cookie_header())
        .send()
        .await
        .expect("answered");
    assert_eq!(response.status(), 200);
    let mut stream = EventReader {
        response,
        buffer: String::new(),
    };
    let first = stream.next().await.expect("the window");
    assert_eq!(first.event, "events");
    assert!(first.data.contains("No event yet"), "{}", first.data);
    let changed = app
        .client
        .put(app.url("/petstore-domain/admin/config"))
        .json(&json!({"feature_flags": {"pet_personalization": true}}))
        .send()
        .await
        .expect("answered");
    assert_eq!(changed.status(), 200);
    let next = stream.next().await.expect("the window again");
    assert!(
        next.data.contains("LiveSettingsChanged 1.0"),
        "{}",
        next.data
    );
    assert!(
        next.id.parse::<i64>().expect("a position") > first.id.parse::<i64>().expect("a position")
    );
    assert!(
        next.data.contains(&format!(
            "<a id=\"pause\" hx-swap-oob=\"true\" href=\"/petstore-domain/console/tail?type=LiveSettingsChanged&#38;until={}&#38;paused=1\">",
            next.id
        )),
        "{}",
        next.data
    );

    // Unhappy paths.
    for (path, status) in [
        (format!("{CONSOLE}/tail?type=Order%20Created"), 422),
        (format!("{CONSOLE}/tail?until=999999"), 400),
        (format!("{CONSOLE}/tail?until=x"), 422),
        (format!("{CONSOLE}/tail?colour=red"), 422),
        (format!("{CONSOLE}/tail/live"), 422),
        (format!("{CONSOLE}/tail/live?after=-1"), 400),
        (format!("{CONSOLE}/tail/live?after=999999"), 400),
    ] {
        let response = admin.get(&path).await;
        assert_eq!(response.status(), status, "{path}");
        assert_console_headers(&response);
    }
    assert_eq!(
        Browser::new(&app)
            .get(&format!("{CONSOLE}/tail"))
            .await
            .status(),
        303
    );

    app.stop().await;
    storage.remove().await;
}

/// Projections and runners: each checkpoint caught up once an order completed, and each saga
/// partition's runner with its lease.
async fn the_projections_page_says_where_each_subscriber_stands(engine: Engine) {
    let storage = Storage::new(engine).await;
    let app = TestApp::start(with_users(storage.settings())).await;
    app.wait_until_ready().await;
    let mut admin = Browser::admin(&app).await;
    let order = app.post_order("golden-retriever-001", None).await;
    app.wait_for_terminal(&order).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let page = loop {
        let page = admin.page(&format!("{CONSOLE}/projections")).await;
        let name = match engine {
            Engine::Postgres => "read_models",
            Engine::Embedded => "read_models (in this process)",
        };
        let read_models = page
            .split(&format!("<th scope=\"row\">{name}</th>"))
            .nth(1)
            .unwrap_or_default();
        if read_models
            .split("</tr>")
            .next()
            .unwrap_or_default()
            .contains("caught up")
        {
            break page;
        }
        assert!(
            Instant::now() < deadline,
            "read_models never caught up: {page}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let head = page
        .split("The stream's head is at position ")
        .nth(1)
        .and_then(|rest| rest.split('.').next())
        .and_then(|head| head.parse::<i64>().ok())
        .expect("the head");
    assert!(head > 0, "{page}");
    if engine == Engine::Postgres {
        assert!(page.contains("fencing token 1"), "{page}");
    }
    // Sixteen partitions, each held by this process's runner.
    for partition in 0..16 {
        assert!(
            page.contains(&format!(
                "<tr><th scope=\"row\">{partition}</th><td class=\"code\">saga-"
            )),
            "partition {partition}: {page}"
        );
    }
    assert!(page.contains(" s left</td>"), "{page}");

    app.stop().await;
    storage.remove().await;
}

/// Polls the replay page until the replay finished; returns the page.
async fn replay_finished(admin: &mut Browser<'_>) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let page = admin.page(&format!("{CONSOLE}/replay")).await;
        if page.contains("status-succeeded\">finished") || page.contains("status-failed\">failed") {
            return page;
        }
        assert!(
            Instant::now() < deadline,
            "the replay never finished: {page}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A replay from the console on Postgres: refused while a projector holds the projection;
/// with none, a dry run (its counts), then the replay confirmed by the projection's name,
/// the order views the same afterwards; each start an operator action.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replay_runs_a_dry_run_first_then_rebuilds_leaving_the_views_equal() {
    let storage = Storage::new(Engine::Postgres).await;
    let settings = with_users(storage.settings());
    let app = TestApp::start(settings.clone()).await;
    app.wait_until_ready().await;
    let mut orders = Vec::new();
    for (pet, failure) in [
        ("golden-retriever-001", None),
        ("beagle-001", Some("payment-service")),
        ("persian-cat-001", None),
    ] {
        orders.push(app.post_order(pet, failure).await);
    }
    for order in &orders {
        app.wait_for_terminal(order).await;
    }
    let mut admin = Browser::admin(&app).await;
    let page = admin.page(&format!("{CONSOLE}/replay")).await;
    let csrf = form_token(&page);
    assert!(page.contains("Dry run of read_models"), "{page}");
    assert!(!page.contains("Replay read_models</button>"), "{page}");
    // A projector runs here: the dry run is refused, and says why.
    let started = admin
        .post(
            &format!("{CONSOLE}/replay"),
            &[
                ("csrf", &csrf),
                ("projection", "read_models"),
                ("mode", "dry_run"),
            ],
        )
        .await;
    assert_eq!(started.status(), 303);
    let refused = replay_finished(&mut admin).await;
    assert!(
        refused.contains("stop its projector role first"),
        "{refused}"
    );
    let views = |app: &TestApp| {
        let orders = orders.clone();
        let client = app.client.clone();
        let base = app.address.clone();
        async move {
            let mut views = Vec::new();
            for order in orders {
                let view: Value = client
                    .get(format!("{base}/petstore-domain/orders/{order}/status"))
                    .send()
                    .await
                    .expect("answered")
                    .json()
                    .await
                    .expect("json");
                views.push(view);
            }
            views
        }
    };
    let before = views(&app).await;
    app.stop().await;

    // A process with the query role only: no projector holds the read models.
    let app = TestApp::start_with_roles(settings, &[Role::Query].into_iter().collect()).await;
    app.wait_until_ready().await;
    let mut admin = Browser::admin(&app).await;
    let csrf = form_token(&admin.page(&format!("{CONSOLE}/replay")).await);
    let (client, cookies) = (admin.client.clone(), admin.cookie_header());
    let post = |form: Vec<(&'static str, String)>| {
        let client = client.clone();
        let cookies = cookies.clone();
        let url = app.url(&format!("{CONSOLE}/replay"));
        async move {
            client
                .post(url)
                .header(COOKIE, cookies)
                .form(&form)
                .send()
                .await
                .expect("answered")
        }
    };
    let form = |mode: &str, confirm: Option<&str>| {
        let mut form = vec![
            ("csrf", csrf.clone()),
            ("projection", "read_models".to_owned()),
            ("mode", mode.to_owned()),
        ];
        if let Some(confirm) = confirm {
            form.push(("confirm", confirm.to_owned()));
        }
        form
    };
    // No replay before a dry run of it here.
    assert_eq!(
        post(form("replay", Some("read_models"))).await.status(),
        409
    );
    for (bad, status) in [
        (
            vec![
                ("csrf", csrf.clone()),
                ("projection", "teleporter".to_owned()),
                ("mode", "dry_run".to_owned()),
            ],
            422,
        ),
        (
            vec![
                ("csrf", csrf.clone()),
                ("projection", "read_models".to_owned()),
                ("mode", "now".to_owned()),
            ],
            422,
        ),
        (
            vec![
                ("csrf", "00".to_owned()),
                ("projection", "read_models".to_owned()),
                ("mode", "dry_run".to_owned()),
            ],
            403,
        ),
    ] {
        assert_eq!(post(bad).await.status(), status);
    }
    assert_eq!(post(form("dry_run", None)).await.status(), 303);
    let dry = replay_finished(&mut admin).await;
    assert!(dry.contains("(dry run: nothing written)"), "{dry}");
    assert!(dry.contains("Replay read_models</button>"), "{dry}");
    // The replay wants the projection's name typed.
    assert_eq!(post(form("replay", None)).await.status(), 422);
    assert_eq!(
        post(form("replay", Some("read models"))).await.status(),
        422
    );
    assert_eq!(
        post(form("replay", Some("read_models"))).await.status(),
        303
    );
    let done = replay_finished(&mut admin).await;
    assert!(done.contains("the rebuilt views are in place"), "{done}");
    assert_eq!(
        views(&app).await,
        before,
        "the rebuilt views equal the ones before"
    );
    let audit = admin.page(&format!("{CONSOLE}/audit")).await;
    assert_eq!(audit.matches("replay_started").count(), 3, "{audit}");

    app.stop().await;
    storage.remove().await;
}
