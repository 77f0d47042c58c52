//! Live settings through HTTP: `GET`/`PUT /petstore-domain/admin/config` and its history,
//! versions and `If-Match`, refusals that change nothing, propagation to a second instance,
//! survival across a restart, and the effect of a change on a running server (rate limits,
//! `express_order_processing`, `payment_processing`, flag provenance in the audit trail).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use petstore_cli::Role;
use petstore_settings::{Flag, FlagSetting, RoleName};
use petstore_tests::{assert_problem, on_both_engines, Engine, Storage, TestApp};
use serde_json::{json, Value};

const CONFIG: &str = "/petstore-domain/admin/config";

async fn put(app: &TestApp, patch: &Value, if_match: Option<&str>) -> reqwest::Response {
    let mut request = app
        .client
        .put(app.url(CONFIG))
        .header("X-Change-Reason", "test")
        .json(patch);
    if let Some(tag) = if_match {
        request = request.header("If-Match", tag);
    }
    request.send().await.expect("PUT is answered")
}

async fn put_ok(app: &TestApp, patch: &Value) -> Value {
    let response = put(app, patch, None).await;
    assert_eq!(response.status(), 200, "PUT {patch}");
    response.json().await.expect("JSON")
}

fn etag(response: &reqwest::Response) -> String {
    response
        .headers()
        .get("etag")
        .and_then(|value| value.to_str().ok())
        .expect("an ETag")
        .to_owned()
}

async fn the_config_is_versioned_conditional_and_refuses_bad_changes_whole(engine: Engine) {
    let storage = Storage::new(engine).await;
    let app = TestApp::start(storage.settings()).await;

    let response = app.get(CONFIG).await;
    assert_eq!(response.status(), 200);
    assert_eq!(etag(&response), "\"0\"");
    let initial: Value = response.json().await.expect("JSON");
    assert_eq!(initial["version"], 0);
    assert_eq!(
        initial["settings"]["feature_flags"]["pet_personalization"],
        false
    );
    for key in ["security", "providers", "saga", "log"] {
        assert!(initial["settings"][key].is_object(), "{key}: {initial}");
    }

    // The seed's change, then the document says so, with who and when.
    let response = put(
        &app,
        &json!({"feature_flags": {"pet_personalization": true}}),
        Some("\"0\""),
    )
    .await;
    assert_eq!(response.status(), 200);
    assert_eq!(etag(&response), "\"1\"");
    let changed: Value = response.json().await.expect("JSON");
    assert_eq!(changed["version"], 1);
    assert_eq!(changed["updated_by"], "admin");
    assert_eq!(
        changed["settings"]["feature_flags"]["pet_personalization"],
        true
    );
    let unchanged = app
        .client
        .get(app.url(CONFIG))
        .header("If-None-Match", "\"1\"")
        .send()
        .await
        .expect("answered");
    assert_eq!(unchanged.status(), 304);

    // A stale If-Match changes nothing.
    let body = assert_problem(
        put(
            &app,
            &json!({"feature_flags": {"premium_filters": false}}),
            Some("\"0\""),
        )
        .await,
        412,
    )
    .await;
    assert!(
        body["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("version 1"),
        "{body}"
    );
    assert_problem(put(&app, &json!({}), Some("three")).await, 400).await;

    // Unknown keys, wrong types, refused values, removals: 422, and nothing changes.
    for (patch, key) in [
        (
            json!({"feature_flags": {"pet_personalisation": true}}),
            "pet_personalisation",
        ),
        (
            json!({"feature_flags": {"premium_filters": "yes"}}),
            "feature_flags.premium_filters",
        ),
        (
            json!({"providers": {"payment": {"failure_rate": 1.5}}}),
            "providers.payment.failure_rate",
        ),
        (
            json!({"saga": {"payment_timeout_ms": 0}}),
            "saga.payment_timeout_ms",
        ),
        (json!({"log": {"filter": "info,["}}), "log.filter"),
        (json!({"http": {"listen": "0.0.0.0:1"}}), "http"),
        (json!({"feature_flags": null}), "feature_flags"),
        (
            json!({"feature_flags": {"premium_filters": false}, "saga": {"nope": 1}}),
            "nope",
        ),
        (json!(["feature_flags"]), "JSON object"),
    ] {
        let body = assert_problem(put(&app, &patch, None).await, 422).await;
        assert!(
            body["detail"].as_str().unwrap_or_default().contains(key),
            "{patch}: {body}"
        );
    }
    let not_json = app
        .client
        .put(app.url(CONFIG))
        .header("content-type", "application/json")
        .body("{feature_flags")
        .send()
        .await
        .expect("answered");
    assert_problem(not_json, 400).await;
    let after = app.get_json(CONFIG).await;
    assert_eq!(after["version"], 1, "refused changes leave the version");
    assert_eq!(after["settings"], changed["settings"]);

    // A PUT that changes nothing makes no version.
    let same = put_ok(
        &app,
        &json!({"feature_flags": {"pet_personalization": true}}),
    )
    .await;
    assert_eq!(same["version"], 1);

    // The history says who changed what, from what, to what, and why.
    let history = app.get_json(&format!("{CONFIG}/history")).await;
    let changes = history["changes"].as_array().expect("changes");
    assert_eq!(changes.len(), 1, "{history}");
    assert_eq!(changes[0]["version"], 1);
    assert_eq!(changes[0]["changed_by"], "admin");
    assert_eq!(changes[0]["source"], "api");
    assert_eq!(changes[0]["reason"], "test");
    assert_eq!(
        changes[0]["changes"],
        json!([{"key": "feature_flags.pet_personalization", "old": false, "new": true}])
    );
    assert_problem(app.get(&format!("{CONFIG}/history?limit=0")).await, 422).await;

    // Admins only.
    let customer = app.client_as("customer-001", RoleName::Customer);
    let refused = customer
        .get(app.url(CONFIG))
        .send()
        .await
        .expect("answered");
    assert_problem(refused, 403).await;
    let anonymous = app
        .anonymous
        .put(app.url(CONFIG))
        .json(&json!({}))
        .send()
        .await
        .expect("answered");
    assert_problem(anonymous, 401).await;

    // A restarted service comes back with the change.
    app.stop().await;
    let app = TestApp::start(storage.settings()).await;
    let restarted = app.get_json(CONFIG).await;
    assert_eq!(restarted["version"], 1);
    assert_eq!(
        restarted["settings"]["feature_flags"]["pet_personalization"],
        true
    );
    app.stop().await;
    storage.remove().await;
}

async fn a_put_changes_the_rate_limits_of_the_running_server(engine: Engine) {
    let storage = Storage::new(engine).await;
    let app = TestApp::start(storage.settings()).await;
    let customer = app.client_as("customer-042", RoleName::Customer);
    let browse = || async {
        customer
            .get(app.url("/petstore-domain/pets/browse"))
            .send()
            .await
            .expect("answered")
            .status()
    };
    for _ in 0..5 {
        assert_eq!(browse().await, 200, "limits are off in tests");
    }
    put_ok(
        &app,
        &json!({"security": {"rate_limits": {"enabled": true, "default_per_minute": 2}}}),
    )
    .await;
    assert_eq!(browse().await, 200);
    assert_eq!(browse().await, 200);
    assert_eq!(
        browse().await,
        429,
        "the new limit applies without a restart"
    );
    put_ok(
        &app,
        &json!({"security": {"rate_limits": {"enabled": false}}}),
    )
    .await;
    assert_eq!(browse().await, 200);
    app.stop().await;
    storage.remove().await;
}

async fn orders_keep_the_payment_mode_they_started_with_and_the_audit_shows_the_flags(
    engine: Engine,
) {
    let storage = Storage::new(engine).await;
    let app = TestApp::start(storage.settings()).await;
    put_ok(
        &app,
        &json!({"feature_flags": {"express_order_processing": false}}),
    )
    .await;
    let waiting = app.place_order("golden-retriever-001").await;
    let waiting_id = waiting["order_id"].as_str().expect("id").to_owned();
    app.wait_for_order(&waiting_id, |view| view["status"] == "reserved")
        .await;
    let switched = put_ok(
        &app,
        &json!({"feature_flags": {"express_order_processing": true}}),
    )
    .await;
    assert_eq!(switched["version"], 2);

    // Placed after the switch: paid by the saga, and its events say under which settings.
    let express = app.place_order("labrador-001").await;
    let express_id = express["order_id"].as_str().expect("id").to_owned();
    let done = app.wait_for_terminal(&express_id).await;
    assert_eq!(done["status"], "completed", "{done}");
    let audit = app
        .get_json(&format!("/petstore-domain/orders/{express_id}/audit"))
        .await;
    let events = audit["events"].as_array().expect("events");
    let created = events
        .iter()
        .find(|event| event["event_type"] == "OrderCreated")
        .expect("OrderCreated");
    assert_eq!(created["settings_version"], 2, "{created}");
    assert_eq!(
        created["feature_flags"],
        json!({"express_order_processing": true})
    );
    let processed = events
        .iter()
        .find(|event| event["event_type"] == "PaymentProcessed")
        .expect("PaymentProcessed");
    assert_eq!(processed["feature_flags"]["payment_processing"], true);
    assert!(
        events.iter().all(|event| event["settings_version"] == 2),
        "every event of the order carries the version: {audit}"
    );

    // Placed before the switch: still waits for the customer, who pays.
    let still = app
        .get_json(&format!("/petstore-domain/orders/{waiting_id}/status"))
        .await;
    assert_eq!(still["status"], "reserved", "{still}");
    let paid = app
        .post_json(
            "/petstore-domain/payments",
            &json!({"order_id": waiting_id}),
        )
        .await;
    assert_eq!(paid.status(), 200);
    let done = app.wait_for_terminal(&waiting_id).await;
    assert_eq!(done["status"], "completed", "{done}");
    let audit = app
        .get_json(&format!("/petstore-domain/orders/{waiting_id}/audit"))
        .await;
    let created = audit["events"]
        .as_array()
        .expect("events")
        .iter()
        .find(|event| event["event_type"] == "OrderCreated")
        .cloned()
        .expect("OrderCreated");
    assert_eq!(created["settings_version"], 1);
    assert_eq!(
        created["feature_flags"],
        json!({"express_order_processing": false})
    );
    app.stop().await;
    storage.remove().await;
}

async fn payments_are_held_while_payment_processing_is_off(engine: Engine) {
    let storage = Storage::new(engine).await;
    let mut settings = storage.settings();
    settings.saga.deadline_poll_interval_ms = 20;
    let app = TestApp::start(settings).await;
    put_ok(
        &app,
        &json!({"feature_flags": {"payment_processing": false}}),
    )
    .await;
    let order = app.place_order("beagle-001").await;
    let order_id = order["order_id"].as_str().expect("id").to_owned();
    app.wait_for_order(&order_id, |view| view["status"] == "reserved")
        .await;
    // Held: well past the time it takes to pay, nothing moved and the gateway was not called.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let held = app
        .get_json(&format!("/petstore-domain/orders/{order_id}/status"))
        .await;
    assert_eq!(held["status"], "reserved", "{held}");
    let metrics = app
        .get("/metrics")
        .await
        .text()
        .await
        .expect("metrics text");
    assert!(
        !metrics.contains("petstore_provider_calls_total{provider=\"payment\""),
        "no payment call while held"
    );
    assert!(
        metrics.contains(
            "petstore_feature_flag_evaluations_total{flag=\"payment_processing\",variant=\"off\"}"
        ),
        "{metrics}"
    );
    put_ok(
        &app,
        &json!({"feature_flags": {"payment_processing": true}}),
    )
    .await;
    let done = app.wait_for_terminal(&order_id).await;
    assert_eq!(done["status"], "completed", "held orders proceed: {done}");
    app.stop().await;
    storage.remove().await;
}

fn flags_header(response: &reqwest::Response) -> String {
    response
        .headers()
        .get("x-feature-flags")
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

async fn pet_ids(response: reqwest::Response) -> Vec<String> {
    assert_eq!(response.status(), 200);
    let page: Value = response.json().await.expect("JSON");
    page["pets"]
        .as_array()
        .expect("pets")
        .iter()
        .map(|pet| pet["id"].as_str().expect("id").to_owned())
        .collect()
}

async fn the_browse_flags_filter_and_rank_for_the_caller(engine: Engine) {
    let storage = Storage::new(engine).await;
    let app = TestApp::start(storage.settings()).await;
    app.wait_until_ready().await;
    let browse = |query: &str| {
        app.anonymous
            .get(app.url(&format!("/petstore-domain/pets/browse{query}")))
            .send()
    };

    // premium_filters is on by default.
    let retrievers = pet_ids(browse("?breed=RETRIEVER").await.expect("answered")).await;
    assert_eq!(retrievers, ["golden-retriever-001", "labrador-001"]);
    let response = browse("?vaccinated=false&max_age_months=12")
        .await
        .expect("answered");
    assert!(flags_header(&response).contains("premium_filters=on"));
    let unvaccinated = pet_ids(response).await;
    assert!(!unvaccinated.is_empty());
    assert!(
        unvaccinated
            .iter()
            .all(|id| !id.contains("cat") && !id.contains("retriever")),
        "{unvaccinated:?}"
    );
    let old = pet_ids(browse("?min_age_months=10").await.expect("answered")).await;
    assert!(old.contains(&"maine-coon-001".to_owned()), "{old:?}");
    assert!(!old.contains(&"golden-retriever-001".to_owned()));
    assert_problem(browse("?vaccinated=maybe").await.expect("answered"), 422).await;
    assert_problem(browse("?min_age_months=1201").await.expect("answered"), 422).await;

    put_ok(&app, &json!({"feature_flags": {"premium_filters": false}})).await;
    let refused = assert_problem(browse("?breed=beagle").await.expect("answered"), 422).await;
    assert!(
        refused["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("premium_filters"),
        "{refused}"
    );
    let plain = browse("?category=dog").await.expect("answered");
    assert!(flags_header(&plain).is_empty() || !flags_header(&plain).contains("premium"));
    assert_eq!(plain.status(), 200);

    // pet_personalization: a customer who bought a cat sees cats first, and why.
    put_ok(
        &app,
        &json!({"feature_flags": {"pet_personalization": true}}),
    )
    .await;
    let order = app.place_order("persian-cat-001").await;
    app.wait_for_terminal(order["order_id"].as_str().expect("id"))
        .await;
    let customer = app.client_as("customer-001", RoleName::Customer);
    let response = customer
        .get(app.url("/petstore-domain/pets/browse?availability=available"))
        .send()
        .await
        .expect("answered");
    assert!(flags_header(&response).contains("pet_personalization=on"));
    let page: Value = response.json().await.expect("JSON");
    assert_eq!(page["personalization"]["applied"], true, "{page}");
    assert!(page["personalization"]["reason"]
        .as_str()
        .unwrap_or_default()
        .contains("cat (1)"));
    assert_eq!(page["pets"][0]["category"], "cat", "{page}");
    let anonymous: Value = browse("")
        .await
        .expect("answered")
        .json()
        .await
        .expect("JSON");
    assert_eq!(anonymous["personalization"]["applied"], false);
    let ids: Vec<&str> = anonymous["pets"]
        .as_array()
        .expect("pets")
        .iter()
        .filter_map(|pet| pet["id"].as_str())
        .collect();
    let mut sorted = ids.clone();
    sorted.sort_unstable();
    assert_eq!(ids, sorted, "unranked: by id");

    // A rollout: each customer gets the variant their bucket says, every time.
    put_ok(
        &app,
        &json!({"feature_flags": {"pet_personalization": {"rollout_percentage": 50}}}),
    )
    .await;
    let setting = FlagSetting::Rollout { percentage: 50.0 };
    let mut served = (0, 0);
    for n in 0..30 {
        let subject = format!("customer-{n:03}");
        let expected = setting.is_on_for(Flag::PetPersonalization, &subject);
        let client = app.client_as(&subject, RoleName::Customer);
        for _ in 0..2 {
            let response = client
                .get(app.url("/petstore-domain/pets/browse"))
                .send()
                .await
                .expect("answered");
            let header = flags_header(&response);
            let variant = if expected {
                "pet_personalization=on"
            } else {
                "pet_personalization=off"
            };
            assert!(header.contains(variant), "{subject}: {header}");
            let page: Value = response.json().await.expect("JSON");
            assert_eq!(page["personalization"].is_object(), expected, "{subject}");
        }
        if expected {
            served.0 += 1
        } else {
            served.1 += 1
        }
    }
    assert!(
        served.0 > 0 && served.1 > 0,
        "both variants served: {served:?}"
    );
    let metrics = app.get("/metrics").await.text().await.expect("text");
    assert!(metrics.contains(
        "petstore_feature_flag_evaluations_total{flag=\"pet_personalization\",variant=\"on\"}"
    ));
    app.stop().await;
    storage.remove().await;
}

on_both_engines!(
    the_browse_flags_filter_and_rank_for_the_caller,
    the_config_is_versioned_conditional_and_refuses_bad_changes_whole,
    a_put_changes_the_rate_limits_of_the_running_server,
    orders_keep_the_payment_mode_they_started_with_and_the_audit_shows_the_flags,
    payments_are_held_while_payment_processing_is_off,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_sharing_a_store_apply_a_put_within_a_second() {
    let storage = Storage::new(Engine::Postgres).await;
    let roles: BTreeSet<Role> = [Role::Command, Role::Query, Role::Projector].into();
    let first = TestApp::start_with_roles(storage.settings(), &roles).await;
    let second = TestApp::start_with_roles(storage.settings(), &[Role::Query].into()).await;
    assert_eq!(second.get_json(CONFIG).await["version"], 0);
    for (round, value) in [(1, true), (2, false), (3, true)] {
        let changed = put_ok(
            &first,
            &json!({"feature_flags": {"real_time_order_updates": value}}),
        )
        .await;
        assert_eq!(changed["version"], round);
        let put_at = Instant::now();
        loop {
            let seen = second.get_json(CONFIG).await;
            if seen["version"] == round {
                assert_eq!(
                    seen["settings"]["feature_flags"]["real_time_order_updates"],
                    value
                );
                break;
            }
            assert!(
                put_at.elapsed() < Duration::from_secs(1),
                "the second instance still shows {seen} a second after version {round}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // A PUT on the second instance reaches the first the same way.
    put_ok(&second, &json!({"saga": {"payment_timeout_ms": 123000}})).await;
    let put_at = Instant::now();
    while first.get_json(CONFIG).await["version"] != 4 {
        assert!(put_at.elapsed() < Duration::from_secs(1), "first lags");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    first.stop().await;
    second.stop().await;
    storage.remove().await;
}
