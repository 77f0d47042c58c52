//! Saga partitions: every order, with its payment and delivery, belongs to one of P
//! partitions, and one runner at a time owns a partition's sagas.
//!
//! `partition = (murmur2(key) & 0x7fffffff) mod P`, where `key` is the aggregate id as
//! stored (an order's, its payment's and its delivery's: the order id, in its 36-character
//! lower-case hyphenated form; a pet's: its slug) and murmur2 is the 32-bit MurmurHash2 with
//! seed `0x9747b28c` that Kafka's Java client partitions keys with. So a message keyed by an
//! order id lands, under Kafka's default partitioner, on the same partition the service puts
//! it on, and Kafka partitions and saga partitions are one thing.
//!
//! P is fixed when the event store is initialised (changing it would move orders between
//! owners), stored with it, and a start asking for another P is refused.

use std::fmt;
use std::num::NonZeroU32;

use crate::error::DomainError;
use crate::values::OrderId;

/// How many partitions there are, unless configured otherwise.
pub const DEFAULT_PARTITIONS: u32 = 16;

/// The most partitions a store may have.
pub const MAX_PARTITIONS: u32 = 1_024;

/// How many saga partitions the event store has: P.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Partitions(NonZeroU32);

/// One saga partition: `0..P`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Partition(u32);

impl Partitions {
    /// P partitions: 1 to [`MAX_PARTITIONS`].
    pub fn new(count: u32) -> Result<Self, DomainError> {
        NonZeroU32::new(count)
            .filter(|count| count.get() <= MAX_PARTITIONS)
            .map(Self)
            .ok_or_else(|| {
                DomainError::validation("partitions", format!("must be 1 to {MAX_PARTITIONS}"))
            })
    }

    /// P.
    pub fn count(&self) -> u32 {
        self.0.get()
    }

    /// Every partition, in order.
    pub fn all(&self) -> impl Iterator<Item = Partition> {
        (0..self.count()).map(Partition)
    }

    /// The partition of the aggregate `key` (see the module's documentation).
    pub fn of_key(&self, key: &str) -> Partition {
        let positive = (kafka_murmur2(key.as_bytes()) as u32) & 0x7fff_ffff;
        Partition(positive % self.count())
    }

    /// The partition of an order, its payment and its delivery.
    pub fn of_order(&self, order_id: &OrderId) -> Partition {
        self.of_key(&order_id.to_string())
    }
}

impl Default for Partitions {
    fn default() -> Self {
        Self(NonZeroU32::new(DEFAULT_PARTITIONS).expect("above zero"))
    }
}

impl fmt::Display for Partitions {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(formatter)
    }
}

impl Partition {
    /// Its number, `0..P`.
    pub fn number(&self) -> u32 {
        self.0
    }

    /// Its number as Kafka numbers partitions.
    pub fn kafka(&self) -> i32 {
        i32::try_from(self.0).expect("at most MAX_PARTITIONS")
    }
}

impl fmt::Display for Partition {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(formatter)
    }
}

/// MurmurHash2 as Kafka's Java client computes it (`Utils.murmur2`), as a signed number.
pub fn kafka_murmur2(bytes: &[u8]) -> i32 {
    murmur2::murmur2(bytes, murmur2::KAFKA_SEED) as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Apache Kafka's own vectors (`UtilsTest.testMurmur2`).
    #[test]
    fn the_hash_is_kafkas() {
        for (key, hash) in [
            ("21", -973_932_308),
            ("foobar", -790_332_482),
            ("a-little-bit-long-string", -985_981_536),
            ("a-little-bit-longer-string", -1_486_304_829),
            (
                "lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58_897_971,
            ),
            ("abc", 479_470_107),
        ] {
            assert_eq!(kafka_murmur2(key.as_bytes()), hash, "{key}");
        }
    }

    /// Where orders and pets fall, never to change: a change would move every stored order
    /// to another owner (and another Kafka partition).
    #[test]
    fn partitions_of_known_ids_are_stable() {
        let sixteen = Partitions::default();
        let five = Partitions::new(5).expect("5");
        // Checked against another implementation of Kafka's partitioner (kafka-python's).
        for (key, of_sixteen, of_five) in [
            ("00000000-0000-0000-0000-000000000000", 13, 2),
            ("0192f0c4-3b1e-7c6a-9d2e-5f8a1b3c4d5e", 12, 3),
            ("ffffffff-ffff-ffff-ffff-ffffffffffff", 2, 1),
            ("golden-retriever-001", 3, 1),
        ] {
            assert_eq!(sixteen.of_key(key).number(), of_sixteen, "{key} of 16");
            assert_eq!(five.of_key(key).number(), of_five, "{key} of 5");
        }
        let order = OrderId::parse("0192f0c4-3b1e-7c6a-9d2e-5f8a1b3c4d5e").expect("an id");
        assert_eq!(sixteen.of_order(&order), sixteen.of_key(&order.to_string()));
    }

    #[test]
    fn p_is_one_to_the_most() {
        assert!(Partitions::new(0).is_err());
        assert!(Partitions::new(MAX_PARTITIONS + 1).is_err());
        assert_eq!(Partitions::new(1).expect("1").all().count(), 1);
        assert_eq!(Partitions::default().count(), DEFAULT_PARTITIONS);
        // With one partition every key is in it.
        assert_eq!(Partitions::new(1).expect("1").of_key("abc").number(), 0);
    }
}
