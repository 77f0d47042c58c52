//! Handling a subscription's events in lanes: each lane's events in their order, lanes side
//! by side, and only the handled prefix acknowledged.
//!
//! A subscriber whose events belong to independent keys (the saga runner: one lane per
//! order) hands each event to its key's lane with [`run_in_lanes`]. Up to
//! [`LaneLimits::lanes`] lanes run at once and more events are read while they run (up to
//! [`LaneLimits::outstanding`] unacknowledged), so one slow key holds up no other. What is
//! handled with everything that arrived before it is acknowledged every
//! [`LaneLimits::acknowledge_every`] at most ([`Arrivals`]).

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::hash::Hash;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use tokio::sync::watch;
use uuid::Uuid;

use super::{Arrivals, Ticket};
use crate::stream::{RecordedEvent, StreamPosition};

/// Where an arrived event goes.
pub enum Route<K, W> {
    /// Nowhere: it needs no handling, and is acknowledged with the events before it.
    Done,
    /// To lane `K`, handled as `W` after the lane's earlier events.
    Lane(K, W),
}

/// What a subscriber that runs lanes does with its events.
pub trait Lanes: Sync {
    /// What names a lane.
    type Key: Hash + Eq + Clone + Send;
    /// An event as its lane handles it.
    type Work: Send;
    /// Why handling or acknowledging failed.
    type Error: Send;

    /// Where `event` goes.
    fn route(&self, event: RecordedEvent) -> Route<Self::Key, Self::Work>;

    /// Handles lane `key`'s events, in order.
    fn handle(
        &self,
        key: Self::Key,
        work: Vec<Self::Work>,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// Acknowledges `handled` (events handled with all that arrived before them);
    /// `finally` when the run is stopping.
    fn acknowledge(
        &self,
        handled: Vec<Arrived>,
        finally: bool,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;
}

/// How many lanes and events a run holds at most, and how often it acknowledges.
#[derive(Debug, Clone, Copy)]
pub struct LaneLimits {
    /// Lanes running at once.
    pub lanes: usize,
    /// Events arrived and not yet acknowledged: no more are read beyond them.
    pub outstanding: usize,
    /// How long handled events wait to be acknowledged together, at most: after a crash,
    /// what was handled since is handled again, and one acknowledgement covers many events.
    pub acknowledge_every: Duration,
}

/// An arrived event, as far as acknowledging it goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Arrived {
    /// Its place in the global stream.
    pub position: StreamPosition,
    /// Its Kafka topic and partition, and offset, when it came from Kafka.
    pub delivery: Option<((String, i32), i64)>,
}

impl Arrived {
    /// What acknowledging `event` takes.
    pub fn of(event: &RecordedEvent) -> Self {
        Self {
            position: event.position,
            delivery: event.delivery.as_ref().map(|delivery| {
                (
                    (delivery.topic.clone(), delivery.partition),
                    delivery.offset,
                )
            }),
        }
    }
}

/// A lane's run: its key, and the tickets and ids of the events it handled, or why one
/// failed.
type LaneRun<'a, K, E> = BoxFuture<'a, (K, Result<Vec<(Ticket, Uuid)>, E>)>;

/// An event queued for its lane: its ticket, its id, and it as the lane handles it.
type Queued<W> = (Ticket, Uuid, W);

/// Handles the events of `batches` in `subscriber`'s lanes until `stopped` (`Ok`, once what
/// arrived is handled and acknowledged) or until a lane or an acknowledgement fails (`Err`).
/// An event `seen` before, or still being handled (a redelivery: Kafka delivers at least
/// once), needs nothing more; every event handled is recorded in `seen`.
pub async fn run_in_lanes<L: Lanes>(
    subscriber: &L,
    limits: LaneLimits,
    batches: impl futures::Stream<Item = Result<Vec<RecordedEvent>, L::Error>>,
    stopped: &mut watch::Receiver<bool>,
    seen: &mut RecentEvents,
) -> Result<(), L::Error> {
    let mut batches = std::pin::pin!(batches);
    let lanes_at_most = limits.lanes.max(1);
    let outstanding_at_most = limits.outstanding.max(1);
    let mut arrivals = Arrivals::new();
    // Nothing below awaits outside these futures: a lane not polled while it holds a
    // database connection could starve whatever waits for one.
    let mut lanes: FuturesUnordered<LaneRun<'_, L::Key, L::Error>> = FuturesUnordered::new();
    let mut acknowledging: Option<BoxFuture<'_, Result<(), L::Error>>> = None;
    // Events waiting for their lane; lanes waiting to run, each once.
    let mut queued: HashMap<L::Key, Vec<Queued<L::Work>>> = HashMap::new();
    let mut waiting: VecDeque<L::Key> = VecDeque::new();
    let mut running: HashSet<L::Key> = HashSet::new();
    let mut in_flight: HashSet<Uuid> = HashSet::new();
    let mut unacknowledged: Vec<Arrived> = Vec::new();
    let mut acknowledge_at: Option<tokio::time::Instant> = None;
    let mut stopping = false;
    loop {
        while lanes.len() < lanes_at_most {
            let Some(key) = waiting.pop_front() else {
                break;
            };
            let work = queued.remove(&key).unwrap_or_default();
            running.insert(key.clone());
            lanes.push(run_lane(subscriber, key, work));
        }
        if stopping && lanes.is_empty() {
            if let Some(acknowledging) = acknowledging.take() {
                acknowledging.await?;
            }
            unacknowledged.extend(arrivals.acknowledgeable());
            return subscriber.acknowledge(unacknowledged, true).await;
        }
        let room = !stopping && arrivals.outstanding() < outstanding_at_most;
        tokio::select! {
            // (The guard `wait_for` returns must not live on across the awaits below.)
            _ = async { stopped.wait_for(|stop| *stop).await.is_ok() }, if !stopping => stopping = true,
            batch = batches.next(), if room => {
                let Some(batch) = batch else {
                    stopping = true;
                    continue;
                };
                for event in batch? {
                    let arrived = Arrived::of(&event);
                    let id = event.event_id();
                    if seen.contains(&id) || in_flight.contains(&id) {
                        arrivals.arrive(arrived, true);
                        continue;
                    }
                    let Route::Lane(key, work) = subscriber.route(event) else {
                        arrivals.arrive(arrived, true);
                        continue;
                    };
                    in_flight.insert(id);
                    let ticket = arrivals.arrive(arrived, false);
                    let queue = queued.entry(key.clone()).or_default();
                    if queue.is_empty() && !running.contains(&key) {
                        waiting.push_back(key);
                    }
                    queue.push((ticket, id, work));
                }
            }
            Some((key, handled)) = lanes.next(), if !lanes.is_empty() => {
                running.remove(&key);
                if queued.contains_key(&key) {
                    waiting.push_back(key);
                }
                for (ticket, id) in handled? {
                    arrivals.finish(ticket);
                    in_flight.remove(&id);
                    seen.record(id);
                }
            }
            () = tokio::time::sleep_until(acknowledge_at.unwrap_or_else(tokio::time::Instant::now)), if acknowledge_at.is_some() && acknowledging.is_none() => {
                acknowledge_at = None;
                let handled = std::mem::take(&mut unacknowledged);
                acknowledging = Some(subscriber.acknowledge(handled, false).boxed());
            }
            acknowledged = async { acknowledging.as_mut().expect("guarded").await }, if acknowledging.is_some() => {
                acknowledging = None;
                acknowledged?;
            }
        }
        let before = unacknowledged.len();
        unacknowledged.extend(arrivals.acknowledgeable());
        if unacknowledged.len() > before && acknowledge_at.is_none() {
            acknowledge_at = Some(tokio::time::Instant::now() + limits.acknowledge_every);
        }
    }
}

/// Runs lane `key` over `work`.
fn run_lane<L: Lanes>(
    subscriber: &L,
    key: L::Key,
    work: Vec<Queued<L::Work>>,
) -> LaneRun<'_, L::Key, L::Error> {
    let (handled, work): (Vec<_>, Vec<_>) = work
        .into_iter()
        .map(|(ticket, id, work)| ((ticket, id), work))
        .unzip();
    async move {
        let outcome = subscriber.handle(key.clone(), work).await;
        (key, outcome.map(|()| handled))
    }
    .boxed()
}

/// The ids of the events handled most recently, to drop redeliveries cheaply.
pub struct RecentEvents {
    capacity: usize,
    order: VecDeque<Uuid>,
    ids: HashSet<Uuid>,
}

impl RecentEvents {
    /// Remembers `capacity` events at most (none: a subscriber that reads each event once).
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            order: VecDeque::new(),
            ids: HashSet::new(),
        }
    }

    /// Whether the event was handled.
    pub fn contains(&self, id: &Uuid) -> bool {
        self.ids.contains(id)
    }

    /// Remembers an event as handled, forgetting the oldest beyond the capacity.
    pub fn record(&mut self, id: Uuid) {
        if self.ids.insert(id) {
            self.order.push_back(id);
        }
        while self.order.len() > self.capacity {
            if let Some(oldest) = self.order.pop_front() {
                self.ids.remove(&oldest);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use tokio::sync::Notify;

    use super::*;
    use crate::stream::Payload;

    fn event(key: &str, sequence: i64, global_position: i64) -> RecordedEvent {
        RecordedEvent {
            position: StreamPosition {
                transaction_id: 0,
                global_position,
            },
            aggregate_type: "Test".to_owned(),
            aggregate_id: key.to_owned(),
            sequence,
            event_type: "Happened".to_owned(),
            event_version: "1.0".to_owned(),
            payload: Payload::of(&serde_json::Value::Null).expect("a payload"),
            metadata: Default::default(),
            delivery: None,
        }
    }

    /// Lanes by aggregate id; lane `a` waits until lane `b` has handled its events; `skip`
    /// needs no handling.
    #[derive(Default)]
    struct Recording {
        handled: Mutex<Vec<(String, i64)>>,
        acknowledged: Mutex<Vec<Vec<i64>>>,
        b_done: Notify,
    }

    impl Lanes for Recording {
        type Key = String;
        type Work = i64;
        type Error = String;

        fn route(&self, event: RecordedEvent) -> Route<String, i64> {
            if event.aggregate_id == "skip" {
                return Route::Done;
            }
            Route::Lane(event.aggregate_id, event.sequence)
        }

        async fn handle(&self, key: String, work: Vec<i64>) -> Result<(), String> {
            if key == "a" {
                self.b_done.notified().await;
            }
            for sequence in work {
                self.handled
                    .lock()
                    .expect("not poisoned")
                    .push((key.clone(), sequence));
            }
            if key == "b" {
                self.b_done.notify_one();
            }
            Ok(())
        }

        async fn acknowledge(&self, handled: Vec<Arrived>, _finally: bool) -> Result<(), String> {
            let positions = handled
                .iter()
                .map(|arrived| arrived.position.global_position);
            self.acknowledged
                .lock()
                .expect("not poisoned")
                .push(positions.collect());
            Ok(())
        }
    }

    #[tokio::test]
    async fn lanes_run_side_by_side_in_order_and_only_the_handled_prefix_is_acknowledged() {
        let recording = Recording::default();
        let batches = futures::stream::iter([
            Ok(vec![
                event("a", 1, 1),
                event("b", 1, 2),
                event("skip", 1, 3),
            ]),
            // A redelivery of an event being handled, then the lanes' next events.
            Ok(vec![event("a", 1, 1), event("b", 2, 4), event("a", 2, 5)]),
        ]);
        let (_stop, mut stopped) = watch::channel(false);
        let limits = LaneLimits {
            lanes: 4,
            outstanding: 16,
            acknowledge_every: Duration::from_millis(1),
        };
        let mut seen = RecentEvents::new(16);
        let run = run_in_lanes(&recording, limits, batches, &mut stopped, &mut seen);
        // The batches end: the run handles what arrived, acknowledges it and returns.
        run.await.expect("handled");

        let handled = recording.handled.lock().expect("not poisoned").clone();
        let of = |key: &str| -> Vec<i64> {
            let key = key.to_owned();
            handled
                .iter()
                .filter(|(k, _)| *k == key)
                .map(|(_, s)| *s)
                .collect()
        };
        assert_eq!(
            of("a"),
            vec![1, 2],
            "each event once, in order: {handled:?}"
        );
        assert_eq!(of("b"), vec![1, 2]);
        // `b` finished before `a` began: a slow lane held up no other.
        assert_eq!(handled[0].0, "b");
        // Acknowledged in arrival order, each once; nothing before `a`'s first was handled.
        let acknowledged: Vec<i64> = recording
            .acknowledged
            .lock()
            .expect("not poisoned")
            .concat();
        assert_eq!(acknowledged, vec![1, 2, 3, 1, 4, 5]);
        assert!(seen.contains(&event("a", 2, 5).event_id()));
    }

    #[test]
    fn handled_events_are_remembered_up_to_the_capacity() {
        let mut seen = RecentEvents::new(2);
        let (one, two, three) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        assert!(!seen.contains(&one));
        seen.record(one);
        seen.record(one);
        seen.record(two);
        assert!(seen.contains(&one) && seen.contains(&two));
        // The oldest are forgotten beyond the capacity.
        seen.record(three);
        assert!(!seen.contains(&one));
        assert!(seen.contains(&three));
    }
}
