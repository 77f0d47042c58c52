//! The browse query's side: its filters (the premium ones among them) and a page of its
//! results.

use petstore_domain::{PetCategory, PetId};

use crate::views::PetView;

/// Browse filters; every field is optional.
#[derive(Debug, Clone, Default)]
pub struct BrowseFilter {
    /// Only this category.
    pub category: Option<PetCategory>,
    /// Price at least this many minor units.
    pub min_price: Option<i64>,
    /// Price at most this many minor units.
    pub max_price: Option<i64>,
    /// Only pets with this availability (`available`, `reserved`, `sold`).
    pub availability: Option<String>,
    /// The premium filters (`premium_filters` flag).
    pub premium: PremiumFilter,
    /// Start after this pet id (the previous page's cursor).
    pub after: Option<PetId>,
    /// Page size.
    pub limit: u32,
}

/// The premium browse filters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PremiumFilter {
    /// Breed contains this, ignoring case.
    pub breed: Option<String>,
    /// At least this many months old.
    pub min_age_months: Option<u32>,
    /// At most this many months old.
    pub max_age_months: Option<u32>,
    /// Vaccinated (true) or not (false).
    pub vaccinated: Option<bool>,
}

impl PremiumFilter {
    /// Whether any premium filter is set.
    pub fn is_set(&self) -> bool {
        *self != Self::default()
    }

    /// Whether `pet` passes.
    pub fn admits(&self, pet: &PetView) -> bool {
        self.breed
            .as_deref()
            .is_none_or(|breed| pet.breed.to_lowercase().contains(&breed.to_lowercase()))
            && self.min_age_months.is_none_or(|min| pet.age_months >= min)
            && self.max_age_months.is_none_or(|max| pet.age_months <= max)
            && self
                .vaccinated
                .is_none_or(|wanted| pet.vaccinated == wanted)
    }

    /// Its part of a cache key.
    pub fn key(&self) -> String {
        format!(
            "{}:{}:{}:{}",
            self.breed.as_deref().unwrap_or_default().to_lowercase(),
            self.min_age_months
                .map(|n| n.to_string())
                .unwrap_or_default(),
            self.max_age_months
                .map(|n| n.to_string())
                .unwrap_or_default(),
            self.vaccinated.map(|v| v.to_string()).unwrap_or_default(),
        )
    }
}

/// One page of browse results, ordered by pet id.
#[derive(Debug, Clone)]
pub struct BrowsePage {
    /// The pets.
    pub pets: Vec<PetView>,
    /// Pass it as `cursor` to get the next page; `None` on the last page.
    pub next_cursor: Option<PetId>,
}
