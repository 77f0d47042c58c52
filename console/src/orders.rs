//! The orders list: filtered by status, customer, when placed and stuck, newest first, a
//! page at a time; the filter lives in the URL, so a filtered list can be bookmarked and
//! shared.

use askama::Template;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use chrono::{DateTime, NaiveDate, NaiveDateTime, Utc};
use petstore_domain::CustomerId;
use petstore_read_models::listing::{OrderFilter, ViewStatus};
use petstore_read_models::timeline;
use petstore_read_models::OrderStatusView;
use petstore_web::{Problem, Query};
use serde::Deserialize;

use crate::session::Session;
use crate::{html, ConsoleState, Frame};

/// Orders per page, unless the URL asks for another number (up to [`MAX_PAGE`]).
const PAGE: u32 = 50;

/// The most orders a page shows.
const MAX_PAGE: u32 = 200;

/// How many stuck orders of each kind (overdue deadline, open dead letter) the stuck filter
/// considers.
const STUCK_AT_MOST: i64 = 10_000;

/// The filter, as the form sends it (every field a string, empty when not set).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FilterForm {
    #[serde(default)]
    status: String,
    #[serde(default)]
    customer: String,
    #[serde(default)]
    from: String,
    #[serde(default)]
    to: String,
    #[serde(default)]
    stuck: String,
    #[serde(default)]
    before: String,
    #[serde(default)]
    limit: String,
}

/// One order of the list.
struct Row {
    order_id: String,
    status: String,
    customer: String,
    pet: String,
    amount: String,
    placed: String,
    updated: String,
}

impl From<&OrderStatusView> for Row {
    fn from(view: &OrderStatusView) -> Self {
        Self {
            order_id: view.order_id.to_string(),
            status: view.status.clone(),
            customer: view.customer_id.to_string(),
            pet: view.pet_id.to_string(),
            amount: crate::money(&view.amount),
            placed: view.created_at.clone(),
            updated: view.updated_at.clone(),
        }
    }
}

#[derive(Template)]
#[template(path = "orders.html")]
struct OrdersPage {
    frame: Frame,
    statuses: Vec<(&'static str, bool)>,
    form: FilterForm,
    stuck: bool,
    errors: Vec<String>,
    rows: Vec<Row>,
    first: Option<String>,
    next: Option<String>,
    filtered: bool,
}

/// `GET /petstore-domain/console/orders` (and the console's home).
pub(crate) async fn page(
    State(state): State<ConsoleState>,
    session: Session,
    Query(form): Query<FilterForm>,
) -> Result<Response, Problem> {
    let (filter, errors) = parse(&form);
    let stuck = form.stuck == "on";
    let (rows, next) = match &filter {
        Some(filter) => {
            let mut filter = filter.clone();
            if stuck {
                filter.among = Some(
                    timeline::stuck_orders(&state.database, Utc::now(), STUCK_AT_MOST)
                        .await
                        .map_err(|error| Problem::from_failure(&error))?,
                );
            }
            let page = state
                .read_models
                .list_orders(&filter)
                .await
                .map_err(|error| Problem::from_failure(&error))?;
            let next = page.next_before.map(|before| link(&form, Some(before)));
            (page.orders.iter().map(Row::from).collect(), next)
        }
        None => (Vec::new(), None),
    };
    let statuses = ViewStatus::ALL
        .into_iter()
        .map(|status| (status.as_str(), form.status == status.as_str()))
        .collect();
    let title = if stuck { "Stuck orders" } else { "Orders" };
    let filtered = [
        &form.status,
        &form.customer,
        &form.from,
        &form.to,
        &form.stuck,
    ]
    .iter()
    .any(|field| !field.is_empty());
    let first = (!form.before.is_empty()).then(|| link(&form, None));
    let mut response = html(&OrdersPage {
        first,
        frame: session.frame(title),
        statuses,
        stuck,
        errors,
        rows,
        next,
        filtered,
        form,
    });
    if filter.is_none() {
        *response.status_mut() = StatusCode::BAD_REQUEST;
    }
    Ok(response)
}

/// The link to a page of the same filter: from `before`, or the first.
fn link(form: &FilterForm, before: Option<i64>) -> String {
    let mut query: Vec<(&str, String)> = before
        .map(|before| ("before", before.to_string()))
        .into_iter()
        .collect();
    for (name, value) in [
        ("status", &form.status),
        ("customer", &form.customer),
        ("from", &form.from),
        ("to", &form.to),
        ("stuck", &form.stuck),
        ("limit", &form.limit),
    ] {
        if !value.is_empty() {
            query.push((name, value.clone()));
        }
    }
    let query: Vec<String> = query
        .iter()
        .map(|(name, value)| format!("{name}={}", crate::encode(value)))
        .collect();
    match query.is_empty() {
        true => "/petstore-domain/console/orders".to_owned(),
        false => format!("/petstore-domain/console/orders?{}", query.join("&")),
    }
}

/// The filter the form asks for, or what is wrong with it.
fn parse(form: &FilterForm) -> (Option<OrderFilter>, Vec<String>) {
    let mut errors = Vec::new();
    let mut filter = OrderFilter {
        limit: PAGE,
        ..OrderFilter::default()
    };
    if !form.status.is_empty() {
        match ViewStatus::parse(&form.status) {
            Some(status) => filter.status = Some(status),
            None => errors.push(format!("There is no status “{}”.", form.status)),
        }
    }
    if !form.customer.trim().is_empty() {
        match CustomerId::parse(form.customer.trim()) {
            Ok(customer) => filter.customer = Some(customer),
            Err(error) => errors.push(format!("Customer: {error}.")),
        }
    }
    for (field, value, slot) in [
        ("From", &form.from, &mut filter.created_from),
        ("To", &form.to, &mut filter.created_to),
    ] {
        if !value.trim().is_empty() {
            match moment(value.trim()) {
                Some(at) => *slot = Some(at),
                None => errors.push(format!(
                    "{field}: “{value}” is not a date (2026-12-07), a time (2026-12-07T09:30) \
                     or an RFC 3339 timestamp."
                )),
            }
        }
    }
    if let (Some(from), Some(to)) = (filter.created_from, filter.created_to) {
        if from >= to {
            errors.push("From must be before To.".to_owned());
        }
    }
    if !form.stuck.is_empty() && form.stuck != "on" {
        errors.push("Stuck is a checkbox: on, or absent.".to_owned());
    }
    if !form.before.is_empty() {
        match form.before.parse::<i64>() {
            Ok(before) if before > 0 => filter.before = Some(before),
            _ => errors.push(
                "The page cursor is not a position: start again from the first page.".to_owned(),
            ),
        }
    }
    if !form.limit.is_empty() {
        match form.limit.parse::<u32>() {
            Ok(limit) if (1..=MAX_PAGE).contains(&limit) => filter.limit = limit,
            _ => errors.push(format!("Orders per page: 1 to {MAX_PAGE}.")),
        }
    }
    if errors.is_empty() {
        (Some(filter), errors)
    } else {
        (None, errors)
    }
}

/// A moment in UTC: an RFC 3339 timestamp, a `datetime-local` field's value, or a date
/// (its midnight).
fn moment(text: &str) -> Option<DateTime<Utc>> {
    if let Ok(at) = DateTime::parse_from_rfc3339(text) {
        return Some(at.with_timezone(&Utc));
    }
    for format in ["%Y-%m-%dT%H:%M", "%Y-%m-%dT%H:%M:%S"] {
        if let Ok(at) = NaiveDateTime::parse_from_str(text, format) {
            return Some(at.and_utc());
        }
    }
    NaiveDate::parse_from_str(text, "%Y-%m-%d")
        .ok()
        .and_then(|date| date.and_hms_opt(0, 0, 0))
        .map(|at| at.and_utc())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn form(fill: impl FnOnce(&mut FilterForm)) -> FilterForm {
        let mut form = FilterForm::default();
        fill(&mut form);
        form
    }

    #[test]
    fn a_filter_is_read_from_the_form_or_refused_with_every_reason() {
        let (filter, errors) = parse(&form(|form| {
            form.status = "compensating".to_owned();
            form.from = "2026-12-01".to_owned();
            form.to = "2026-12-07T09:30".to_owned();
            form.stuck = "on".to_owned();
            form.before = "42".to_owned();
        }));
        assert!(errors.is_empty(), "{errors:?}");
        let filter = filter.expect("valid");
        assert_eq!(filter.status, Some(ViewStatus::Compensating));
        assert_eq!(
            filter.created_from.map(|at| at.to_rfc3339()),
            Some("2026-12-01T00:00:00+00:00".to_owned())
        );
        assert_eq!(
            filter.created_to.map(|at| at.to_rfc3339()),
            Some("2026-12-07T09:30:00+00:00".to_owned())
        );
        assert_eq!(filter.before, Some(42));

        let (filter, errors) = parse(&form(|form| {
            form.status = "lost".to_owned();
            form.from = "yesterday".to_owned();
            form.before = "-1".to_owned();
            form.stuck = "yes".to_owned();
            form.limit = "201".to_owned();
        }));
        assert!(filter.is_none());
        assert_eq!(errors.len(), 5, "{errors:?}");

        let (_, errors) = parse(&form(|form| {
            form.from = "2026-12-07".to_owned();
            form.to = "2026-12-01".to_owned();
        }));
        assert_eq!(errors, ["From must be before To."]);
    }

    #[test]
    fn the_next_page_keeps_the_filter() {
        let filter = form(|form| {
            form.status = "paid".to_owned();
            form.customer = "a b&c".to_owned();
            form.before = "99".to_owned();
        });
        assert_eq!(
            link(&filter, Some(17)),
            "/petstore-domain/console/orders?before=17&status=paid&customer=a+b%26c"
        );
        assert_eq!(
            link(&filter, None),
            "/petstore-domain/console/orders?status=paid&customer=a+b%26c"
        );
        assert_eq!(
            link(&FilterForm::default(), None),
            "/petstore-domain/console/orders"
        );
    }
}
