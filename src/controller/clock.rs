//! Time as the controllers see it: the system clock in production, a manual clock in tests
//! (scheduled rotations and overlaps are tested without waiting days).

use std::sync::Arc;
use std::sync::Mutex;

use k8s_openapi::jiff::{SignedDuration, Timestamp};

/// A source of the current time.
pub trait Clock: Send + Sync + std::fmt::Debug {
    fn now(&self) -> Timestamp;
}

/// The system clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        Timestamp::now()
    }
}

/// A clock that follows real time plus an offset that tests advance.
#[derive(Debug, Default, Clone)]
pub struct ManualClock {
    offset: Arc<Mutex<SignedDuration>>,
}

impl ManualClock {
    pub fn new() -> Self {
        Self::default()
    }

    /// Moves the clock forward by `by`.
    pub fn advance(&self, by: std::time::Duration) {
        let mut offset = self.offset.lock().unwrap_or_else(|e| e.into_inner());
        *offset += SignedDuration::try_from(by).unwrap_or(SignedDuration::ZERO);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        let offset = *self.offset.lock().unwrap_or_else(|e| e.into_inner());
        Timestamp::now()
            .checked_add(offset)
            .unwrap_or(Timestamp::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_advances() {
        let c = ManualClock::new();
        let before = c.now();
        c.advance(std::time::Duration::from_secs(3600));
        let after = c.now();
        assert!(after.duration_since(before) >= SignedDuration::from_secs(3600));
    }
}
