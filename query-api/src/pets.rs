//! The pet catalog.

use axum::extract::State;
use axum::routing::get;
use axum::Router;
use petstore_domain::{PetCategory, PetId};
use petstore_platform::http::{Json, Path, Problem, ProblemDocument, Query};
use petstore_projector::{BrowseFilter, PetView};
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
}

/// One page of pets.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct BrowseResponse {
    /// The pets, ordered by id.
    pub pets: Vec<PetView>,
    /// How many pets this page holds.
    pub count: usize,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

impl BrowseParams {
    fn into_filter(self) -> Result<BrowseFilter, Problem> {
        let category = self
            .category
            .as_deref()
            .map(PetCategory::parse)
            .transpose()?;
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
    Query(params): Query<BrowseParams>,
    token: ConsistencyToken,
) -> Result<Json<BrowseResponse>, Problem> {
    let filter = params.into_filter()?;
    let page = state.browse(&filter, token).await?;
    Ok(Json(BrowseResponse {
        count: page.pets.len(),
        pets: page.pets,
        next_cursor: page.next_cursor,
    }))
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
    params: Query<BrowseParams>,
    token: ConsistencyToken,
) -> Result<Json<BrowseResponse>, Problem> {
    browse(state, params, token).await
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
