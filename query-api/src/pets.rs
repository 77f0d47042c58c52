//! The pet catalog.

use crate::error::failed;
use axum::extract::State;
use axum::routing::get;
use axum::Router;
use petstore_domain::{PetCategory, PetId};
use petstore_read_models::{BrowseFilter, PetView, PremiumFilter};
use petstore_security::auth::Caller;
use petstore_settings::Flag;
use petstore_web::{Json, Path, Problem, ProblemDocument, Query, RequestContext};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::reads::ConsistencyToken;
use crate::QueryState;

/// Largest page.
pub const MAX_PAGE_SIZE: u32 = 100;
/// Page size when none is asked for.
pub const DEFAULT_PAGE_SIZE: u32 = 20;

/// The catalog routes.
pub fn router() -> Router<QueryState> {
    Router::new()
        .route("/petstore-domain/pets/browse", get(browse))
        .route("/petstore-domain/browse-pets", get(browse_legacy))
        .route("/petstore-domain/pets/{pet_id}", get(pet_details))
}

/// Browse filters and paging.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct BrowseParams {
    /// `dog`, `cat`, `bird`, `fish` or `reptile`.
    #[param(pattern = "^(dog|cat|bird|fish|reptile)$")]
    pub category: Option<String>,
    /// Lowest price, in minor units (cents).
    #[param(minimum = 0)]
    pub min_price: Option<i64>,
    /// Highest price, in minor units (cents); below `min_price`, no pet matches.
    #[param(minimum = 0)]
    pub max_price: Option<i64>,
    /// `available`, `reserved` or `sold`.
    #[param(pattern = "^(available|reserved|sold)$")]
    pub availability: Option<String>,
    /// Page size, 1 to 100 (default 20).
    #[param(minimum = 1, maximum = 100)]
    pub limit: Option<u32>,
    /// The `next_cursor` of the previous page (a pet id).
    #[param(pattern = "^[a-z0-9]+(-[a-z0-9]+)*$", max_length = 64)]
    pub cursor: Option<String>,
    /// Premium (`premium_filters`): the breed contains this, ignoring case.
    #[param(min_length = 1, max_length = 64)]
    pub breed: Option<String>,
    /// Premium (`premium_filters`): at least this many months old (0 to 1200).
    #[param(minimum = 0, maximum = 1200)]
    pub min_age_months: Option<u32>,
    /// Premium (`premium_filters`): at most this many months old (0 to 1200).
    #[param(minimum = 0, maximum = 1200)]
    pub max_age_months: Option<u32>,
    /// Premium (`premium_filters`): vaccinated or not.
    pub vaccinated: Option<bool>,
}

/// How a page was ranked for the caller (`pet_personalization`).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Personalization {
    /// Whether the page is ranked for the caller.
    pub applied: bool,
    /// Why (or why not), in words.
    pub reason: String,
    /// The categories that rank first, most ordered first.
    pub preferred_categories: Vec<String>,
}

/// One page of pets.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct BrowseResponse {
    /// The pets, ordered by id; with `personalization` applied, the caller's most ordered
    /// categories first (by id within each).
    pub pets: Vec<PetView>,
    /// Present when `pet_personalization` is on for the caller.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub personalization: Option<Personalization>,
    /// How many pets this page holds.
    pub count: usize,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

impl BrowseParams {
    fn into_filter(self) -> Result<BrowseFilter, Problem> {
        if self
            .breed
            .as_ref()
            .is_some_and(|breed| !(1..=64).contains(&breed.chars().count()))
        {
            return Err(Problem::validation("breed: 1 to 64 characters"));
        }
        for (name, months) in [
            ("min_age_months", self.min_age_months),
            ("max_age_months", self.max_age_months),
        ] {
            if months.is_some_and(|months| months > 1200) {
                return Err(Problem::validation(format!("{name}: 0 to 1200")));
            }
        }
        let premium = PremiumFilter {
            breed: self.breed,
            min_age_months: self.min_age_months,
            max_age_months: self.max_age_months,
            vaccinated: self.vaccinated,
        };
        let category = self
            .category
            .as_deref()
            .map(PetCategory::parse)
            .transpose()
            .map_err(|error| Problem::validation(error.to_string()))?;
        let availability = match self.availability.as_deref() {
            None => None,
            Some(value @ ("available" | "reserved" | "sold")) => Some(value.to_owned()),
            Some(_) => {
                return Err(Problem::validation(
                    "availability: must be one of available, reserved, sold",
                ))
            }
        };
        for (name, price) in [("min_price", self.min_price), ("max_price", self.max_price)] {
            if price.is_some_and(|price| price < 0) {
                return Err(Problem::validation(format!("{name}: must not be negative")));
            }
        }
        let limit = self.limit.unwrap_or(DEFAULT_PAGE_SIZE);
        if !(1..=MAX_PAGE_SIZE).contains(&limit) {
            return Err(Problem::validation("limit: must be between 1 and 100"));
        }
        let after = self
            .cursor
            .as_deref()
            .map(|cursor| {
                PetId::parse(cursor)
                    .map_err(|_| Problem::validation("cursor: not a cursor this API returned"))
            })
            .transpose()?;
        Ok(BrowseFilter {
            category,
            min_price: self.min_price,
            max_price: self.max_price,
            availability,
            premium,
            after,
            limit,
        })
    }
}

/// Browse the catalog.
///
/// Filters combine; results are ordered by pet id and paged with `limit` and `cursor`.
/// Prices are integer minor units (cents).
#[utoipa::path(
    get,
    path = "/petstore-domain/pets/browse",
    tag = "pets",
    params(
        BrowseParams,
        ("X-Consistency-Token" = Option<String>, Header, pattern = "^t[0-9]{1,18}p[0-9]{1,18}$", description = "From a command's response: wait until the read model shows that write"),
    ),
    responses(
        (status = 200, description = "A page of pets", body = BrowseResponse),
        (status = 400, description = "Not a consistency token this API issued", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 409, description = "The read model did not reach the consistency token in time", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 422, description = "A filter is invalid", body = ProblemDocument, content_type = "application/problem+json"),
    )
)]
pub async fn browse(
    State(state): State<QueryState>,
    caller: Caller,
    Query(params): Query<BrowseParams>,
    token: ConsistencyToken,
) -> Result<Json<BrowseResponse>, Problem> {
    let filter = params.into_filter()?;
    let subject = caller.flag_subject();
    if filter.premium.is_set()
        && !RequestContext::served_flag(
            Flag::PremiumFilters,
            state.live.flag(Flag::PremiumFilters, &subject),
        )
    {
        return Err(Problem::validation(
            "breed, min_age_months, max_age_months and vaccinated are premium filters, and \
             premium_filters is off",
        ));
    }
    let mut page = state.browse(&filter, token).await?;
    let personalization = if RequestContext::served_flag(
        Flag::PetPersonalization,
        state.live.flag(Flag::PetPersonalization, &subject),
    ) {
        Some(personalize(&state, &caller, &mut page.pets).await?)
    } else {
        None
    };
    Ok(Json(BrowseResponse {
        count: page.pets.len(),
        pets: page.pets,
        personalization,
        next_cursor: page.next_cursor.as_ref().map(PetId::to_string),
    }))
}

/// Ranks `pets` for the caller: the categories of their past orders first, most ordered
/// first (a stable sort, so pet-id order holds within each).
async fn personalize(
    state: &QueryState,
    caller: &Caller,
    pets: &mut [PetView],
) -> Result<Personalization, Problem> {
    if !caller.is_authenticated() {
        return Ok(Personalization {
            applied: false,
            reason: "sign in: results are ranked by the categories of your past orders".to_owned(),
            preferred_categories: Vec::new(),
        });
    }
    let Ok(customer_id) = caller.customer_id() else {
        return Ok(Personalization {
            applied: false,
            reason: "your token names no customer: results are ranked by a customer's past orders"
                .to_owned(),
            preferred_categories: Vec::new(),
        });
    };
    let ranked = state
        .read_models
        .ordered_categories(customer_id)
        .await
        .map_err(failed)?;
    if ranked.is_empty() {
        return Ok(Personalization {
            applied: false,
            reason: "no past orders to rank by yet".to_owned(),
            preferred_categories: Vec::new(),
        });
    }
    let rank_of = |category: &str| {
        ranked
            .iter()
            .position(|(preferred, _)| preferred == category)
            .unwrap_or(ranked.len())
    };
    pets.sort_by_key(|pet| rank_of(&pet.category));
    let described: Vec<String> = ranked
        .iter()
        .map(|(category, orders)| format!("{category} ({orders})"))
        .collect();
    Ok(Personalization {
        applied: true,
        reason: format!(
            "ranked by the categories of your past orders: {}",
            described.join(", ")
        ),
        preferred_categories: ranked.into_iter().map(|(category, _)| category).collect(),
    })
}

/// Legacy alias of `GET /petstore-domain/pets/browse`.
#[utoipa::path(
    get,
    path = "/petstore-domain/browse-pets",
    tag = "pets",
    params(
        BrowseParams,
        ("X-Consistency-Token" = Option<String>, Header, pattern = "^t[0-9]{1,18}p[0-9]{1,18}$", description = "From a command's response: wait until the read model shows that write"),
    ),
    responses(
        (status = 200, description = "A page of pets", body = BrowseResponse),
        (status = 400, description = "Not a consistency token this API issued", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 409, description = "The read model did not reach the consistency token in time", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 422, description = "A filter is invalid", body = ProblemDocument, content_type = "application/problem+json"),
    )
)]
pub async fn browse_legacy(
    state: State<QueryState>,
    caller: Caller,
    params: Query<BrowseParams>,
    token: ConsistencyToken,
) -> Result<Json<BrowseResponse>, Problem> {
    browse(state, caller, params, token).await
}

/// One pet's details and availability.
#[utoipa::path(
    get,
    path = "/petstore-domain/pets/{pet_id}",
    tag = "pets",
    params(
        ("pet_id" = String, Path, pattern = "^[a-z0-9]+(-[a-z0-9]+)*$", max_length = 64, description = "The pet's id, e.g. golden-retriever-001"),
        ("X-Consistency-Token" = Option<String>, Header, pattern = "^t[0-9]{1,18}p[0-9]{1,18}$", description = "From a command's response: wait until the read model shows that write"),
    ),
    responses(
        (status = 200, description = "The pet", body = PetView),
        (status = 400, description = "Not a pet id, or not a consistency token this API issued", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 404, description = "No such pet", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 409, description = "The read model did not reach the consistency token in time", body = ProblemDocument, content_type = "application/problem+json"),
    )
)]
pub async fn pet_details(
    State(state): State<QueryState>,
    Path(pet_id): Path<String>,
    token: ConsistencyToken,
) -> Result<Json<PetView>, Problem> {
    let pet_id = PetId::parse(&pet_id).map_err(|error| Problem::bad_request(error.to_string()))?;
    match state.pet(&pet_id, token).await? {
        Some(pet) => Ok(Json(pet)),
        None => Err(Problem::not_found(format!("pet {pet_id} does not exist"))),
    }
}
