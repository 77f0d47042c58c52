//! Aggregates as this process last saw them (loaded or appended to), so that loading one
//! reads only the events appended since, and a command can be decided without reading
//! anything first: the append's optimistic-concurrency check proves the copy current, and a
//! stale one (another process appended) conflicts and is brought up to date.
//!
//! A copy can also be *trusted*: used without reading at all, by an owner that is told of
//! every event appended to the aggregate (the saga runner, for its partitions' orders,
//! payments and deliveries). A copy is trusted from the moment a read or an append of this
//! process proved it current, until the owner is told of a later event ([`KnownAggregates::observe`])
//! or distrusts everything ([`KnownAggregates::distrust_all`]: its partitions changed).

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
    /// Each kept aggregate's sequence, and the trust generation in which a read or an
    /// append proved it current, by (type, id).
    proven: HashMap<(String, String), (usize, u64)>,
    /// The keys in the order they were first kept.
    order: VecDeque<Key>,
    /// Bumped to distrust every copy at once.
    generation: u64,
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

    /// A copy of the aggregate if it is trusted: proven current (by a read or an append of
    /// this process) since the last distrust, and no later event observed since.
    pub(super) fn trusted<A: Aggregate + Clone + 'static>(&self, id: &str) -> Option<Known<A>> {
        let entries = self.entries();
        let (sequence, generation) = *entries.proven.get(&(A::TYPE.to_owned(), id.to_owned()))?;
        let known = entries
            .known
            .get(&(A::TYPE, id.to_owned()))?
            .downcast_ref::<Known<A>>()?;
        (generation == entries.generation && sequence == known.sequence).then(|| known.clone())
    }

    /// Keeps `known` (just proven current by a read or an append; an aggregate with no
    /// events yet too: a command decided on it appends at sequence 1, which conflicts if
    /// another writer created it meanwhile), forgetting the longest-kept beyond the capacity.
    ///
    /// A copy older than the one kept is ignored: two tasks of this process may load and
    /// append to one aggregate at once (a command handler's load beside the saga's append),
    /// and the load that read before the append must not put the older copy back, let alone
    /// as proven current.
    pub(super) fn put<A: Aggregate + Clone + 'static>(&self, id: &str, known: Known<A>) {
        let mut entries = self.entries();
        let key = (A::TYPE, id.to_owned());
        let newer_kept = entries
            .known
            .get(&key)
            .and_then(|kept| kept.downcast_ref::<Known<A>>())
            .is_some_and(|kept| kept.sequence > known.sequence);
        if newer_kept {
            return;
        }
        let generation = entries.generation;
        entries.proven.insert(
            (A::TYPE.to_owned(), id.to_owned()),
            (known.sequence, generation),
        );
        if entries.known.insert(key.clone(), Box::new(known)).is_none() {
            entries.order.push_back(key);
        }
        while entries.order.len() > CAPACITY {
            if let Some((kind, id)) = entries.order.pop_front() {
                entries.known.remove(&(kind, id.clone()));
                entries.proven.remove(&(kind.to_owned(), id));
            }
        }
    }

    /// Forgets the aggregate (whether an append went through is unknown).
    pub(super) fn forget<A: Aggregate>(&self, id: &str) {
        self.forget_key(A::TYPE, id);
    }

    /// Forgets the aggregate of `aggregate_type` (whether an append went through is unknown).
    pub(super) fn forget_key(&self, aggregate_type: &str, id: &str) {
        let mut entries = self.entries();
        if entries
            .proven
            .remove(&(aggregate_type.to_owned(), id.to_owned()))
            .is_some()
        {
            entries
                .known
                .retain(|(kind, kept), _| !(*kind == aggregate_type && kept == id));
            entries
                .order
                .retain(|(kind, kept)| !(*kind == aggregate_type && kept == id));
        }
    }

    /// Told that the aggregate has an event at `sequence`: a copy that does not hold it is
    /// stale (another process appended), and is forgotten.
    pub(super) fn observe(&self, aggregate_type: &str, id: &str, sequence: usize) {
        let stale = self
            .entries()
            .proven
            .get(&(aggregate_type.to_owned(), id.to_owned()))
            .is_some_and(|(known, _)| *known < sequence);
        if stale {
            self.forget_key(aggregate_type, id);
        }
    }

    /// Trusts no copy kept so far: each is read again before it is trusted.
    pub(super) fn distrust_all(&self) {
        self.entries().generation += 1;
    }
}

#[cfg(test)]
mod tests {
    use cqrs_es::event_sink::EventSink;
    use cqrs_es::DomainEvent;
    use serde::{Deserialize, Serialize};

    use super::*;

    #[derive(Debug, Clone, Default, Serialize, Deserialize)]
    struct Tally;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct Counted;

    impl DomainEvent for Counted {
        fn event_type(&self) -> String {
            "Counted".to_owned()
        }
        fn event_version(&self) -> String {
            "1.0".to_owned()
        }
    }

    #[derive(Debug, thiserror::Error)]
    #[error("never")]
    struct Never;

    impl Aggregate for Tally {
        const TYPE: &'static str = "Tally";
        type Command = ();
        type Event = Counted;
        type Error = Never;
        type Services = ();

        async fn handle(&mut self, (): (), _: &(), _: &EventSink<Self>) -> Result<(), Never> {
            Ok(())
        }

        fn apply(&mut self, _: Counted) {}
    }

    fn at(sequence: usize) -> Known<Tally> {
        Known {
            sequence,
            ..Known::default()
        }
    }

    /// A load that read before another task's append must not put its older copy back:
    /// the newer stays, still trusted.
    #[test]
    fn an_older_copy_never_replaces_a_newer_one() {
        let known = KnownAggregates::default();
        known.put("t", at(8));
        known.put("t", at(7));
        assert_eq!(known.get::<Tally>("t").map(|kept| kept.sequence), Some(8));
        assert_eq!(
            known.trusted::<Tally>("t").map(|kept| kept.sequence),
            Some(8)
        );
        known.observe("Tally", "t", 9);
        assert!(
            known.trusted::<Tally>("t").is_none(),
            "told of a later event"
        );
        known.put("t", at(9));
        assert_eq!(
            known.trusted::<Tally>("t").map(|kept| kept.sequence),
            Some(9)
        );
        known.distrust_all();
        assert!(known.trusted::<Tally>("t").is_none(), "distrusted");
        assert_eq!(known.get::<Tally>("t").map(|kept| kept.sequence), Some(9));
    }
}
