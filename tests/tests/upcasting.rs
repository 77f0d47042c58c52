//! The upcasting path, on both engines: an `OrderCancelled` stored in its first shape (1.0,
//! written by a release before `OrderCompensated` existed), inserted into the log directly, is
//! read in today's shape by the aggregate (settled at once: nothing to confirm) and by the
//! read model (`cancelled`, not `compensating`).

use std::collections::BTreeSet;

use petstore_cli::Role;
use petstore_domain::order::{Order, OrderCommand, OrderStatus};
use petstore_event_store::database::Database;
use petstore_event_store::store::{EventMetadata, EventStore};
use petstore_tests::{on_both_engines, Engine, Storage, TestApp};
use petstore_web::CorrelationId;
use serde_json::json;

on_both_engines!(a_stored_first_version_event_is_read_in_todays_shape);

async fn a_stored_first_version_event_is_read_in_todays_shape(engine: Engine) {
    let storage = Storage::new(engine).await;
    // No saga runner: the order stays as the log says.
    let roles: BTreeSet<Role> = [Role::Command, Role::Query, Role::Projector].into();
    let app = TestApp::start_with_roles(storage.settings(), &roles).await;
    app.wait_until_ready().await;
    let accepted = app.place_order("corgi-001").await;
    let order_id = accepted["order_id"].as_str().expect("id").to_owned();
    app.wait_for_order(&order_id, |view| view["status"] == "pending")
        .await;

    let payload = json!({"OrderCancelled": {"reason": "requested"}}).to_string();
    let metadata = json!({
        "correlation_id": accepted["correlation_id"],
        "causation_id": "an-older-release",
        "subject": "admin",
        "command_id": uuid::Uuid::new_v4().to_string(),
        "timestamp": chrono::Utc::now().to_rfc3339(),
    })
    .to_string();
    let insert = "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
                  VALUES ('Order', $1, 2, 'OrderCancelled', '1.0', $2, $3)";
    let database = storage.database().await;
    match &database {
        Database::Postgres(pool) => {
            let insert = insert.replace("$2, $3", "$2::jsonb, $3::jsonb");
            sqlx::query(&insert)
                .bind(&order_id)
                .bind(&payload)
                .bind(&metadata)
                .execute(pool)
                .await
                .expect("inserted");
        }
        Database::Sqlite(pool) => {
            sqlx::query(insert)
                .bind(&order_id)
                .bind(&payload)
                .bind(&metadata)
                .execute(pool)
                .await
                .expect("inserted");
        }
    }

    // The read model: settled at once, as that release meant.
    let view = app
        .wait_for_order(&order_id, |view| view["status"] != "pending")
        .await;
    assert_eq!(view["status"], "cancelled", "{view}");
    assert_eq!(view["cancellation_reason"], "requested");

    // The aggregate: cancelled, and nothing left to confirm.
    let store = EventStore::new(database, 2);
    let order: Order = store.load(&order_id).await.expect("loads");
    assert_eq!(order.status(), Some(OrderStatus::Cancelled));
    let metadata = EventMetadata::new(CorrelationId::generate(), "saga");
    let appended = store
        .execute::<Order>(&order_id, OrderCommand::ConfirmCompensated, &(), &metadata)
        .await
        .expect("decided");
    assert!(appended.is_empty(), "{:?}", appended.len());
    app.stop().await;
    storage.remove().await;
}
