//! The demo catalog, created as `PetAdded` events when missing.

use cqrs_es::AggregateError;
use petstore_domain::catalog::demo_pets;
use petstore_domain::pet::{Pet, PetCommand};
use petstore_domain::DomainError;
use petstore_event_store::store::{EventMetadata, EventStore};
use petstore_web::CorrelationId;

/// Adds every demo pet that is not in the store yet; returns how many were added. Safe to run
/// on every start and from several instances at once: adding an identical pet is a no-op,
/// and a pet the store has in another form (added by an older release) is kept as it is.
pub async fn seed_demo_catalog(store: &EventStore) -> Result<usize, AggregateError<DomainError>> {
    let metadata = EventMetadata::new(CorrelationId::generate(), "system");
    let mut added = 0;
    for details in demo_pets().map_err(AggregateError::UserError)? {
        let pet_id = details.pet_id.to_string();
        match store
            .execute::<Pet>(&pet_id, PetCommand::AddPet(details), &(), &metadata)
            .await
        {
            Ok(events) => added += events.len(),
            Err(AggregateError::UserError(DomainError::PetAlreadyExists(_))) => {}
            Err(error) => return Err(error),
        }
    }
    Ok(added)
}
