//! The replay guard: signatures accepted within the tolerance window are refused a second time.
//!
//! The key is the `v1` signature itself, not the event id: a captured request sent again carries
//! the same signature (reshuffling the header or adding entries does not help, every `v1` value
//! of the header is looked up), while the two deliveries of one event during a blue/green
//! rotation are signed by different secrets and both pass; the application deduplicates those
//! on `event.id`, as Stripe asks of every receiver. An entry lives until its timestamp leaves the
//! tolerance window (the timestamp check refuses the request from then on), and the number of
//! entries is bounded: when full, the oldest entry is evicted first.
//!
//! The guard is **per replica** and in memory: a captured request replayed to another replica of
//! the application, or after the proxy restarts, passes it within the tolerance. It narrows the
//! window; the application's deduplication on `event.id` (which Stripe's own retries require
//! anyway) is what holds across replicas.

use std::collections::{HashMap, VecDeque};

/// A bounded set of recently accepted signatures.
#[derive(Debug)]
pub struct ReplayCache {
    capacity: usize,
    expiry: HashMap<[u8; 32], i64>,
    order: VecDeque<([u8; 32], i64)>,
    evictions: u64,
}

impl ReplayCache {
    /// A cache holding at most `capacity` signatures (at least one).
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        Self {
            capacity,
            expiry: HashMap::with_capacity(capacity.min(1 << 16)),
            order: VecDeque::with_capacity(capacity.min(1 << 16)),
            evictions: 0,
        }
    }

    /// Refuses (`false`) when any of `signatures` was accepted before and has not expired at
    /// `now` (unix seconds); otherwise records each of them until `expires_at` and returns `true`.
    pub fn check_and_insert(&mut self, signatures: &[[u8; 32]], expires_at: i64, now: i64) -> bool {
        self.purge(now);
        if signatures
            .iter()
            .any(|s| self.expiry.get(s).is_some_and(|&e| e >= now))
        {
            return false;
        }
        for sig in signatures {
            while self.order.len() >= self.capacity {
                if let Some((old, exp)) = self.order.pop_front()
                    && self.expiry.get(&old) == Some(&exp)
                {
                    self.expiry.remove(&old);
                    if exp >= now {
                        self.evictions += 1;
                    }
                }
            }
            self.expiry.insert(*sig, expires_at);
            self.order.push_back((*sig, expires_at));
        }
        true
    }

    /// Whether any of `signatures` was accepted and has not expired at `now`: the replay check
    /// that needs no body (nothing is recorded).
    pub fn contains_any(&self, signatures: &[[u8; 32]], now: i64) -> bool {
        signatures
            .iter()
            .any(|s| self.expiry.get(s).is_some_and(|&e| e >= now))
    }

    /// Drops expired entries from the front (entries are mostly in expiry order).
    fn purge(&mut self, now: i64) {
        while let Some(&(sig, exp)) = self.order.front() {
            if exp >= now {
                break;
            }
            self.order.pop_front();
            if self.expiry.get(&sig) == Some(&exp) {
                self.expiry.remove(&sig);
            }
        }
    }

    /// How many signatures are held.
    pub fn len(&self) -> usize {
        self.expiry.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.expiry.is_empty()
    }

    /// The bound.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Unexpired entries dropped because the cache was full.
    pub fn evictions(&self) -> u64 {
        self.evictions
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sig(n: u8) -> [u8; 32] {
        [n; 32]
    }

    #[test]
    fn a_signature_is_refused_until_it_expires() {
        let mut c = ReplayCache::new(10);
        assert!(c.check_and_insert(&[sig(1)], 100, 50));
        assert!(!c.check_and_insert(&[sig(1)], 100, 60));
        assert!(!c.check_and_insert(&[sig(1)], 100, 100));
        assert!(c.check_and_insert(&[sig(1)], 200, 101));
    }

    #[test]
    fn any_known_signature_in_the_header_is_a_replay() {
        let mut c = ReplayCache::new(10);
        assert!(c.check_and_insert(&[sig(1), sig(2)], 100, 50));
        assert!(!c.check_and_insert(&[sig(9), sig(2)], 100, 50));
        assert!(c.check_and_insert(&[sig(3)], 100, 50));
    }

    #[test]
    fn memory_stays_within_capacity_by_evicting_the_oldest() {
        let mut c = ReplayCache::new(3);
        for n in 0..10u8 {
            assert!(c.check_and_insert(&[sig(n)], 1_000, 0));
            assert!(c.len() <= 3);
        }
        assert_eq!(c.evictions(), 7);
        // the newest are still refused, the evicted oldest are not remembered
        assert!(!c.check_and_insert(&[sig(9)], 1_000, 0));
        assert!(c.check_and_insert(&[sig(0)], 1_000, 0));
    }

    #[test]
    fn expired_entries_are_purged() {
        let mut c = ReplayCache::new(100);
        for n in 0..50u8 {
            c.check_and_insert(&[sig(n)], 10, 0);
        }
        assert_eq!(c.len(), 50);
        c.check_and_insert(&[sig(200)], 100, 11);
        assert_eq!(c.len(), 1);
        assert_eq!(c.evictions(), 0);
    }
}
