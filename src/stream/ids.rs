//! Transaction ids across cards: the same id on two cards is one of them lying (a replayed id,
//! a producer bug), and would put two score records for one id on the scores topic. The
//! detector remembers which card each of the last [`DEDUPE_HORIZON`] ids belonged to (as 64-bit
//! fingerprints: no id text is kept) and dead-letters an id seen again on another card. The
//! same id on the same card is a redelivery, handled by the card's window.

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::Mutex;

/// How many recent transactions' ids are remembered: about four minutes at 1,000 tx/s, where
/// replays and retries land, for about 10 MB.
pub const DEDUPE_HORIZON: usize = 1 << 18;

fn fingerprint(s: &str) -> u64 {
    let mut h = DefaultHasher::new();
    s.hash(&mut h);
    h.finish()
}

#[derive(Debug, Default)]
struct Inner {
    card_of: HashMap<u64, u64>,
    order: VecDeque<u64>,
}

/// Which card each recent transaction id belonged to.
#[derive(Debug)]
pub struct RecentIds {
    inner: Mutex<Inner>,
    capacity: usize,
}

impl Default for RecentIds {
    fn default() -> Self {
        RecentIds::with_capacity(DEDUPE_HORIZON)
    }
}

impl RecentIds {
    /// Remembers at most `capacity` ids, oldest forgotten first.
    pub fn with_capacity(capacity: usize) -> Self {
        RecentIds {
            inner: Mutex::default(),
            capacity: capacity.max(1),
        }
    }

    /// Claims `id` for `card`: false when a recent transaction of another card had this id.
    pub fn claim(&self, id: &str, card: &str) -> bool {
        let (id, card) = (fingerprint(id), fingerprint(card));
        let mut inner = self.inner.lock().expect("recent ids lock");
        match inner.card_of.get(&id) {
            Some(owner) => *owner == card,
            None => {
                inner.card_of.insert(id, card);
                inner.order.push_back(id);
                if inner.order.len() > self.capacity
                    && let Some(old) = inner.order.pop_front()
                {
                    inner.card_of.remove(&old);
                }
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_belongs_to_the_first_card_within_the_horizon() {
        let ids = RecentIds::with_capacity(3);
        assert!(ids.claim("t1", "a"));
        assert!(
            ids.claim("t1", "a"),
            "a redelivery on the same card is not a conflict"
        );
        assert!(!ids.claim("t1", "b"), "the same id on another card is");
        for t in ["t2", "t3", "t4"] {
            assert!(ids.claim(t, "c"));
        }
        // t1 has left the horizon: another card may use it now.
        assert!(ids.claim("t1", "b"));
    }
}
