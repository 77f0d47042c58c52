//! Leases on the saga partitions, on both engines: one holder at a time, taken over only
//! once expired (by the database's clock) or released, each taking fencing every earlier
//! holder, and a fenced write's check refused once the lease is lost.

use std::time::Duration;

use petstore_domain::partition::{Partition, Partitions};
use petstore_event_store::database::Database;
use petstore_event_store::leases::{check_lease_in, CheckError, Leases};
use petstore_event_store::stream::{self, StreamPosition};
use petstore_tests::{on_both_engines, Engine, Storage};

/// Long enough that the checks between two steps never outlast a quarter of it.
const TIMEOUT: Duration = Duration::from_secs(3);

async fn one_holder_at_a_time_and_a_takeover_only_after_expiry(engine: Engine) {
    let storage = Storage::new(engine).await;
    let database = storage.database().await;
    let partition = Partitions::default().all().nth(3).expect("partition 3");
    let first = Leases::new(&database, "runner-a", TIMEOUT);
    let second = Leases::new(&database, "runner-b", TIMEOUT);

    let held = first
        .acquire(partition)
        .await
        .expect("acquire")
        .expect("free");
    assert_eq!(held.epoch, 1);
    assert_eq!(
        second.acquire(partition).await.expect("acquire"),
        None,
        "held by a"
    );
    assert!(first.renew(&held).await.expect("renew"));
    let states = first.states().await.expect("states");
    assert_eq!(states.len(), 1);
    assert_eq!(states[0].owner.as_deref(), Some("runner-a"));
    assert!(!states[0].free && states[0].expires_in <= TIMEOUT);

    // Renewed half-way, it outlives its first timeout (checked a quarter after it, a
    // quarter before the renewed one ends); unrenewed, it expires and b takes it.
    tokio::time::sleep(TIMEOUT / 2).await;
    assert!(first.renew(&held).await.expect("renew"));
    tokio::time::sleep(TIMEOUT * 3 / 4).await;
    assert_eq!(
        second.acquire(partition).await.expect("acquire"),
        None,
        "renewed"
    );
    tokio::time::sleep(TIMEOUT).await;
    let taken = second
        .acquire(partition)
        .await
        .expect("acquire")
        .expect("expired");
    assert_eq!(taken.epoch, 2, "a takeover raises the epoch");

    // a's lease is lost: it can neither renew nor release it, nor write under it.
    assert!(!first.renew(&held).await.expect("renew"));
    assert!(!first.release(&held).await.expect("release"));
    if let Database::Postgres(pool) = &database {
        let mut transaction = petstore_event_store::database::begin(pool)
            .await
            .expect("begin");
        let lost = check_lease_in(&mut transaction, "runner-a", &held).await;
        assert!(
            matches!(&lost, Err(CheckError::Lost(lost)) if lost.epoch == 1),
            "{lost:?}"
        );
        check_lease_in(&mut transaction, "runner-b", &taken)
            .await
            .expect("b's lease is current");
        drop(transaction);
        // A checkpoint under a lost lease is not saved; under a current one it is.
        let at = StreamPosition {
            transaction_id: 7,
            global_position: 7,
        };
        let name = |partition: Partition| format!("leases-test:p{}", partition.number());
        let lost = first
            .save_checkpoints(&[(held, at)], name)
            .await
            .expect("save");
        assert_eq!(lost, vec![partition]);
        assert_eq!(
            stream::load_checkpoint(&database, &name(partition))
                .await
                .expect("load"),
            StreamPosition::START
        );
        let lost = second
            .save_checkpoints(&[(taken, at)], name)
            .await
            .expect("save");
        assert!(lost.is_empty());
        assert_eq!(
            stream::load_checkpoint(&database, &name(partition))
                .await
                .expect("load"),
            at
        );
    }

    // Released, it is free at once; whoever takes it next fences b.
    assert!(second.release(&taken).await.expect("release"));
    assert!(first.states().await.expect("states")[0].free);
    let again = first
        .acquire(partition)
        .await
        .expect("acquire")
        .expect("free");
    assert_eq!(again.epoch, 3);
    assert!(!second.renew(&taken).await.expect("renew"));
}

async fn an_owner_taking_its_partition_again_fences_its_earlier_incarnation(engine: Engine) {
    let storage = Storage::new(engine).await;
    let database = storage.database().await;
    let partitions = Partitions::new(4).expect("4");
    let before = Leases::new(&database, "runner-a", Duration::from_secs(30));
    let held: Vec<_> =
        futures::future::join_all(partitions.all().map(|partition| before.acquire(partition)))
            .await
            .into_iter()
            .map(|taken| taken.expect("acquire").expect("free"))
            .collect();
    // The same runner restarted: it need not wait out its own lease.
    let after = Leases::new(&database, "runner-a", Duration::from_secs(30));
    for lease in &held {
        let again = after
            .acquire(lease.partition)
            .await
            .expect("acquire")
            .expect("its own");
        assert_eq!(again.epoch, lease.epoch + 1);
        assert!(
            !before.renew(lease).await.expect("renew"),
            "the old epoch is fenced"
        );
    }
    // Another runner still waits for it.
    let other = Leases::new(&database, "runner-b", Duration::from_secs(30));
    for partition in partitions.all() {
        assert_eq!(other.acquire(partition).await.expect("acquire"), None);
    }
}

async fn a_second_process_under_the_same_runner_id_displaces_the_first(engine: Engine) {
    let storage = Storage::new(engine).await;
    let database = storage.database().await;
    let first = Leases::new(&database, "node-1", TIMEOUT);
    first.heartbeat().await.expect("beat").expect("first beat");
    first
        .heartbeat()
        .await
        .expect("beat")
        .expect("still its own");
    // Started again (or started twice): the first beat of the new instance claims the id.
    let second = Leases::new(&database, "node-1", TIMEOUT);
    second
        .heartbeat()
        .await
        .expect("beat")
        .expect("claims the id");
    let displaced = first.heartbeat().await.expect("beat");
    assert_eq!(
        displaced.map_err(|displaced| displaced.owner),
        Err("node-1".to_owned())
    );
    second
        .heartbeat()
        .await
        .expect("beat")
        .expect("the id is its");
    // The displaced instance leaving removes nothing of the newer one's.
    first.leave().await.expect("leave");
    assert_eq!(
        second.live_runners().await.expect("runners"),
        vec!["node-1".to_owned()]
    );
    second.leave().await.expect("leave");
    assert!(second.live_runners().await.expect("runners").is_empty());
}

on_both_engines!(
    one_holder_at_a_time_and_a_takeover_only_after_expiry,
    an_owner_taking_its_partition_again_fences_its_earlier_incarnation,
    a_second_process_under_the_same_runner_id_displaces_the_first,
);
