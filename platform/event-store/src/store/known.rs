//! Aggregates as this process last saw them (loaded or appended to), so that loading one
//! reads only the events appended since, and a command can be decided without reading
//! anything first: the append's optimistic-concurrency check proves the copy current, and a
//! stale one (another process appended) conflicts and is brought up to date.

use std::any::Any;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};

use cqrs_es::{Aggregate, EventEnvelope};

/// Aggregates kept at most; the longest-kept go first.
const CAPACITY: usize = 10_000;

/// An aggregate, the sequence of its last event and the ids of the commands its events
/// carry (a command whose id is among them was handled before).
#[derive(Clone)]
pub(super) struct Known<A> {
    pub(super) aggregate: A,
    pub(super) sequence: usize,
    pub(super) command_ids: HashSet<String>,
}

impl<A: Aggregate> Default for Known<A> {
    fn default() -> Self {
        Self {
            aggregate: A::default(),
            sequence: 0,
            command_ids: HashSet::new(),
        }
    }
}

impl<A: Aggregate> Known<A> {
    /// Applies a stored event.
    pub(super) fn apply(&mut self, envelope: EventEnvelope<A>) {
        self.sequence = envelope.sequence;
        if let Some(command_id) = envelope.metadata.get(crate::metadata::COMMAND_ID_KEY) {
            self.command_ids.insert(command_id.clone());
        }
        self.aggregate.apply(envelope.payload);
    }
}

type Key = (&'static str, String);

/// The aggregates this process knows, shared by every clone of the event store.
#[derive(Clone, Default)]
pub(super) struct KnownAggregates(Arc<Mutex<Entries>>);

#[derive(Default)]
struct Entries {
    known: HashMap<Key, Box<dyn Any + Send>>,
    /// The keys in the order they were first kept.
    order: VecDeque<Key>,
}

impl KnownAggregates {
    fn entries(&self) -> std::sync::MutexGuard<'_, Entries> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A copy of what is known of the aggregate.
    pub(super) fn get<A: Aggregate + Clone + 'static>(&self, id: &str) -> Option<Known<A>> {
        self.entries()
            .known
            .get(&(A::TYPE, id.to_owned()))
            .and_then(|known| known.downcast_ref::<Known<A>>())
            .cloned()
    }

    /// Keeps `known` (an aggregate that exists), forgetting the longest-kept beyond the
    /// capacity.
    pub(super) fn put<A: Aggregate + Clone + 'static>(&self, id: &str, known: Known<A>) {
        if known.sequence == 0 {
            return;
        }
        let mut entries = self.entries();
        let key = (A::TYPE, id.to_owned());
        if entries.known.insert(key.clone(), Box::new(known)).is_none() {
            entries.order.push_back(key);
        }
        while entries.order.len() > CAPACITY {
            if let Some(oldest) = entries.order.pop_front() {
                entries.known.remove(&oldest);
            }
        }
    }

    /// Forgets the aggregate (whether an append went through is unknown).
    pub(super) fn forget<A: Aggregate>(&self, id: &str) {
        let mut entries = self.entries();
        let key = (A::TYPE, id.to_owned());
        if entries.known.remove(&key).is_some() {
            entries.order.retain(|kept| *kept != key);
        }
    }
}
