//! Client-side token bucket, so the operator stays under Stripe's per-account limits by itself.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A token bucket: `rate` tokens per second, holding at most `capacity` tokens. Pure state; the
/// caller supplies the clock, which makes it testable. Starts full.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    capacity: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket. `rate` is clamped to at least 0.001/s and `capacity` to at least 1.
    pub fn new(rate: f64, capacity: u32, now: Instant) -> Self {
        let rate = if rate.is_finite() {
            rate.max(0.001)
        } else {
            0.001
        };
        let capacity = f64::from(capacity.max(1));
        Self {
            rate,
            capacity,
            tokens: capacity,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.capacity);
        self.last = now.max(self.last);
    }

    /// Takes one token if available (`Ok`), or says how long to wait for the next (`Err`).
    pub fn try_acquire(&mut self, now: Instant) -> Result<(), Duration> {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            let missing = 1.0 - self.tokens;
            Err(Duration::from_secs_f64(missing / self.rate))
        }
    }

    /// Tokens available at `now` (fractional).
    pub fn available(&mut self, now: Instant) -> f64 {
        self.refill(now);
        self.tokens
    }

    /// The refill rate in tokens per second.
    pub fn rate(&self) -> f64 {
        self.rate
    }
}

/// An async rate limiter around a [`TokenBucket`]; share it (it sits behind an `Arc` in the
/// client) so that every clone of a client, and every client of the same account given the same
/// limiter, draws from one budget.
#[derive(Debug)]
pub struct RateLimiter {
    bucket: Mutex<TokenBucket>,
}

impl RateLimiter {
    /// A limiter allowing `requests_per_second`, with bursts of at most `burst`.
    pub fn new(requests_per_second: f64, burst: u32) -> Self {
        Self {
            bucket: Mutex::new(TokenBucket::new(requests_per_second, burst, Instant::now())),
        }
    }

    /// Waits until a request may be sent, then takes its token.
    pub async fn acquire(&self) {
        loop {
            let wait = {
                let mut bucket = self.bucket.lock().unwrap_or_else(|e| e.into_inner());
                match bucket.try_acquire(Instant::now()) {
                    Ok(()) => return,
                    Err(wait) => wait,
                }
            };
            tokio::time::sleep(wait.max(Duration::from_micros(100))).await;
        }
    }

    /// Takes a token only if one is available now.
    pub fn try_acquire(&self) -> bool {
        let mut bucket = self.bucket.lock().unwrap_or_else(|e| e.into_inner());
        bucket.try_acquire(Instant::now()).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_starts_full_then_refills_at_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10.0, 3, t0);
        assert!(b.try_acquire(t0).is_ok());
        assert!(b.try_acquire(t0).is_ok());
        assert!(b.try_acquire(t0).is_ok());
        let wait = b.try_acquire(t0).unwrap_err();
        assert_eq!(wait, Duration::from_millis(100));
        // half a token after 50 ms: still not enough, 50 ms left
        let wait = b.try_acquire(t0 + Duration::from_millis(50)).unwrap_err();
        assert!((wait.as_secs_f64() - 0.05).abs() < 1e-9, "{wait:?}");
        assert!(b.try_acquire(t0 + Duration::from_millis(100)).is_ok());
    }

    #[test]
    fn bucket_never_holds_more_than_capacity() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(100.0, 2, t0);
        let later = t0 + Duration::from_secs(60);
        assert!((b.available(later) - 2.0).abs() < 1e-9);
        assert!(b.try_acquire(later).is_ok());
        assert!(b.try_acquire(later).is_ok());
        assert!(b.try_acquire(later).is_err());
    }

    #[test]
    fn bucket_grants_at_most_rate_times_window_plus_capacity() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(20.0, 1, t0);
        let mut granted = 0;
        // poll every millisecond for one second
        for ms in 0..1000 {
            if b.try_acquire(t0 + Duration::from_millis(ms)).is_ok() {
                granted += 1;
            }
        }
        assert_eq!(granted, 20);
    }

    #[test]
    fn a_clock_going_backwards_does_not_mint_tokens() {
        let t0 = Instant::now() + Duration::from_secs(10);
        let mut b = TokenBucket::new(1.0, 1, t0);
        assert!(b.try_acquire(t0).is_ok());
        assert!(b.try_acquire(t0 - Duration::from_secs(5)).is_err());
        assert!(b.try_acquire(t0).is_err());
    }

    #[tokio::test]
    async fn limiter_spaces_requests() {
        let limiter = RateLimiter::new(200.0, 1);
        let start = Instant::now();
        for _ in 0..5 {
            limiter.acquire().await;
        }
        // first is free, four more need 4 × 5 ms
        assert!(start.elapsed() >= Duration::from_millis(19));
    }
}
