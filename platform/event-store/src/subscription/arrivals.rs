//! What a subscriber may acknowledge while it handles events out of arrival order.
//!
//! A subscriber that hands events to lanes (the saga runner: one per order) sees them finish
//! in any order across lanes; its checkpoint (or its Kafka offsets) may only move past an
//! event once it and every event that arrived before it are handled. [`Arrivals`] numbers the events as they
//! arrive and yields, as they finish, the longest handled prefix.

use std::collections::VecDeque;

/// The events arrived and not yet acknowledged, in arrival order, each with what
/// acknowledging it takes (`T`: its stream position, its Kafka offset).
pub struct Arrivals<T> {
    /// The ticket of the front of `waiting`.
    front: u64,
    waiting: VecDeque<(bool, T)>,
}

/// An arrived event's number.
pub type Ticket = u64;

impl<T> Default for Arrivals<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> Arrivals<T> {
    /// Nothing arrived yet.
    pub fn new() -> Self {
        Self {
            front: 0,
            waiting: VecDeque::new(),
        }
    }

    /// Numbers an arriving event; one needing no handling arrives `done`.
    pub fn arrive(&mut self, token: T, done: bool) -> Ticket {
        self.waiting.push_back((done, token));
        self.front + self.waiting.len() as u64 - 1
    }

    /// Marks an event handled.
    pub fn finish(&mut self, ticket: Ticket) {
        let index = usize::try_from(ticket - self.front).expect("a ticket of this pipeline");
        self.waiting[index].0 = true;
    }

    /// Takes the handled prefix: every event handled, with all that arrived before it.
    pub fn acknowledgeable(&mut self) -> impl Iterator<Item = T> + '_ {
        std::iter::from_fn(|| {
            if !self.waiting.front()?.0 {
                return None;
            }
            self.front += 1;
            self.waiting.pop_front().map(|(_, token)| token)
        })
    }

    /// How many arrived events are not acknowledged yet.
    pub fn outstanding(&self) -> usize {
        self.waiting.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_handled_prefix_is_acknowledged() {
        let mut arrivals = Arrivals::new();
        let first = arrivals.arrive('a', false);
        let second = arrivals.arrive('b', false);
        arrivals.arrive('c', true);
        let fourth = arrivals.arrive('d', false);
        arrivals.finish(second);
        assert_eq!(arrivals.acknowledgeable().count(), 0, "a still runs");
        arrivals.finish(first);
        assert_eq!(arrivals.acknowledgeable().collect::<String>(), "abc");
        assert_eq!(arrivals.outstanding(), 1);
        let fifth = arrivals.arrive('e', false);
        arrivals.finish(fifth);
        arrivals.finish(fourth);
        assert_eq!(arrivals.acknowledgeable().collect::<String>(), "de");
        assert_eq!(arrivals.outstanding(), 0);
    }
}
