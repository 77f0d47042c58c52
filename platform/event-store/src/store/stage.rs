//! Appends staged in memory by the work running in a task, written together.
//!
//! An owner deciding several commands in a row (the saga runner, between two provider calls)
//! need not commit each one: it stages them, decides the next command on the copies its
//! staged events leave, and writes everything staged in one statement, all or nothing
//! ([`EventStore::flush`](super::EventStore::flush)). Nothing staged is seen by anyone else
//! before that: the staged copies live here, in the task's stage, not among the process's
//! known aggregates, and the stream holds only what is written. The deadlines the work
//! schedules or moves meanwhile are staged as well, and written in the same statement.

use std::any::Any;
use std::cell::RefCell;
use std::collections::HashMap;
use std::future::Future;

use cqrs_es::persist::SerializedEvent;
use cqrs_es::Aggregate;

use super::known::{Known, KnownAggregates};
use crate::deadlines;

tokio::task_local! {
    /// What the work running in this task staged, if it stages its appends.
    static STAGE: RefCell<Staged>;
}

/// An aggregate as the staged events leave it, and how to keep it once they are written.
struct Copy {
    known: Box<dyn Any + Send + Sync>,
    keep: fn(&KnownAggregates, &str, Box<dyn Any + Send + Sync>),
}

/// The staged events and the aggregates as they leave them.
#[derive(Default)]
pub(super) struct Staged {
    /// The events, in the order they were decided, each with its aggregate's type.
    pub(super) events: Vec<(&'static str, SerializedEvent)>,
    /// Where each command's events end in `events`.
    ends: Vec<usize>,
    copies: HashMap<(&'static str, String), Copy>,
    /// The deadline writes.
    pub(super) deadlines: deadlines::Writes,
}

impl Staged {
    /// The staged events, each command's apart, in the order they were decided.
    pub(super) fn commands(&self) -> impl Iterator<Item = &[(&'static str, SerializedEvent)]> + '_ {
        let starts = std::iter::once(0).chain(self.ends.iter().copied());
        starts
            .zip(self.ends.iter().copied())
            .map(|(start, end)| &self.events[start..end])
    }

    /// Keeps the staged copies among `known` (the events are written: the copies are
    /// current).
    pub(super) fn keep_copies(self, known: &KnownAggregates) {
        for ((_, id), copy) in self.copies {
            (copy.keep)(known, &id, copy.known);
        }
    }

    /// The staged aggregates, by type and id.
    pub(super) fn aggregates(&self) -> impl Iterator<Item = (&'static str, &str)> {
        self.copies.keys().map(|(kind, id)| (*kind, id.as_str()))
    }
}

/// Runs `work` with its appends staged.
pub(super) async fn scope<F: Future>(work: F) -> F::Output {
    STAGE.scope(RefCell::default(), work).await
}

/// Whether the work running now stages its appends.
pub(super) fn active() -> bool {
    STAGE.try_with(|_| ()).is_ok()
}

/// Stages `events` of an `aggregate_type` aggregate: false when the work running now does
/// not stage (the events are to be written now).
pub(super) fn stage(aggregate_type: &'static str, events: &[SerializedEvent]) -> bool {
    STAGE
        .try_with(|stage| {
            let mut stage = stage.borrow_mut();
            stage
                .events
                .extend(events.iter().map(|event| (aggregate_type, event.clone())));
            let end = stage.events.len();
            stage.ends.push(end);
        })
        .is_ok()
}

/// Stages deadline writes (`stage` adds them): false when the work running now does not
/// stage (they are to be written now).
pub(super) fn deadlines(stage: impl FnOnce(&mut deadlines::Writes)) -> bool {
    STAGE
        .try_with(|staged| stage(&mut staged.borrow_mut().deadlines))
        .is_ok()
}

/// The aggregate as the staged events leave it, if any of its events are staged.
pub(super) fn copy<A: Aggregate + Clone + 'static>(id: &str) -> Option<Known<A>> {
    STAGE
        .try_with(|stage| {
            stage
                .borrow()
                .copies
                .get(&(A::TYPE, id.to_owned()))
                .and_then(|copy| copy.known.downcast_ref::<Known<A>>())
                .cloned()
        })
        .ok()
        .flatten()
}

/// Keeps `known` (with the events just staged applied) as the staged copy.
pub(super) fn keep<A: Aggregate + Clone + 'static>(id: &str, known: Known<A>) {
    let _ = STAGE.try_with(|stage| {
        stage.borrow_mut().copies.insert(
            (A::TYPE, id.to_owned()),
            Copy {
                known: Box::new(known),
                keep: keep_written::<A>,
            },
        );
    });
}

/// Everything staged so far, leaving the stage empty.
pub(super) fn take() -> Staged {
    STAGE
        .try_with(|stage| std::mem::take(&mut *stage.borrow_mut()))
        .unwrap_or_default()
}

fn keep_written<A: Aggregate + Clone + 'static>(
    known: &KnownAggregates,
    id: &str,
    copy: Box<dyn Any + Send + Sync>,
) {
    if let Ok(copy) = copy.downcast::<Known<A>>() {
        known.put(id, *copy);
    }
}
