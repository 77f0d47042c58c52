//! The demo catalog: the pets a fresh store starts with, so the seed's examples work as written.

use crate::pet::PetDetails;
use crate::values::{Money, PetCategory, PetId};
use crate::DomainError;

/// (id, name, category, breed, age in months, price in cents, description)
type Row = (
    &'static str,
    &'static str,
    PetCategory,
    &'static str,
    u32,
    i64,
    &'static str,
);

const DEMO_PETS: [Row; 14] = [
    (
        "golden-retriever-001",
        "Sunny",
        PetCategory::Dog,
        "Golden Retriever",
        3,
        120_000,
        "Playful puppy, vaccinated, loves water.",
    ),
    (
        "labrador-001",
        "Biscuit",
        PetCategory::Dog,
        "Labrador Retriever",
        4,
        95_000,
        "Gentle with children, house-trained.",
    ),
    (
        "beagle-001",
        "Scout",
        PetCategory::Dog,
        "Beagle",
        6,
        70_000,
        "Curious nose, great on walks.",
    ),
    (
        "corgi-001",
        "Waffles",
        PetCategory::Dog,
        "Pembroke Welsh Corgi",
        5,
        150_000,
        "Short legs, big personality.",
    ),
    (
        "persian-cat-001",
        "Duchess",
        PetCategory::Cat,
        "Persian",
        8,
        80_000,
        "Calm lap cat, needs daily brushing.",
    ),
    (
        "siamese-cat-001",
        "Miso",
        PetCategory::Cat,
        "Siamese",
        5,
        65_000,
        "Talkative and affectionate.",
    ),
    (
        "maine-coon-001",
        "Thor",
        PetCategory::Cat,
        "Maine Coon",
        10,
        110_000,
        "Gentle giant.",
    ),
    (
        "budgie-001",
        "Kiwi",
        PetCategory::Bird,
        "Budgerigar",
        4,
        4_500,
        "Chirpy, already says hello.",
    ),
    (
        "cockatiel-001",
        "Mango",
        PetCategory::Bird,
        "Cockatiel",
        7,
        12_000,
        "Whistles the first bars of a march.",
    ),
    (
        "african-grey-001",
        "Socrates",
        PetCategory::Bird,
        "African Grey Parrot",
        24,
        180_000,
        "Large vocabulary, needs company.",
    ),
    (
        "goldfish-001",
        "Bubbles",
        PetCategory::Fish,
        "Fancy Goldfish",
        2,
        1_500,
        "Orange and white, hardy.",
    ),
    (
        "betta-001",
        "Indigo",
        PetCategory::Fish,
        "Betta",
        3,
        2_500,
        "Blue fins, lives alone.",
    ),
    (
        "clownfish-001",
        "Marlin",
        PetCategory::Fish,
        "Ocellaris Clownfish",
        6,
        4_000,
        "Reef-safe, captive bred.",
    ),
    (
        "leopard-gecko-001",
        "Spot",
        PetCategory::Reptile,
        "Leopard Gecko",
        12,
        9_000,
        "Docile, easy to handle.",
    ),
];

/// The pets a fresh store is seeded with.
pub fn demo_pets() -> Result<Vec<PetDetails>, DomainError> {
    DEMO_PETS
        .iter()
        .map(
            |(id, name, category, breed, age_months, price, description)| {
                Ok(PetDetails {
                    pet_id: PetId::parse(id)?,
                    name: (*name).to_owned(),
                    category: *category,
                    breed: (*breed).to_owned(),
                    age_months: *age_months,
                    // Dogs and cats of the demo catalog have had their shots.
                    vaccinated: matches!(category, PetCategory::Dog | PetCategory::Cat),
                    price: Money::usd(*price)?,
                    description: (*description).to_owned(),
                })
            },
        )
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_demo_catalog_is_valid_and_covers_the_seed_examples() {
        let pets = demo_pets().expect("the demo catalog is valid");
        assert!(pets.len() >= 12);
        assert!(pets
            .iter()
            .any(|pet| pet.pet_id.as_str() == "golden-retriever-001"
                && pet.category == PetCategory::Dog));
        for category in [
            PetCategory::Dog,
            PetCategory::Cat,
            PetCategory::Bird,
            PetCategory::Fish,
        ] {
            assert!(
                pets.iter().any(|pet| pet.category == category),
                "{category:?} missing"
            );
        }
    }
}
