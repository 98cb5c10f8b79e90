//! Client-side token bucket, so the operator stays under Stripe's per-account limits by itself.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A token bucket: `rate` tokens per second, holding at most `capacity` tokens. Pure state; the
/// caller supplies the clock, which makes it testable. Starts full.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    capacity: f64,
    tokens: f64,
    last: Instant,
    /// No token is handed out before this instant (a 429's `Retry-After` pauses the account).
    paused_until: Option<Instant>,
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
            paused_until: None,
        }
    }

    /// Hands out no token before `until` (later pauses extend it, earlier ones do nothing), and
    /// empties the bucket so that the calls waiting behind the pause leave one by one.
    pub fn pause_until(&mut self, until: Instant, now: Instant) {
        self.refill(now);
        self.tokens = 0.0;
        self.paused_until = Some(self.paused_until.map_or(until, |p| p.max(until)));
    }

    /// Changes the refill rate (an edited `requestsPerSecond`) without handing out tokens: the
    /// tokens held stay, capped at the capacity.
    pub fn set_rate(&mut self, rate: f64, now: Instant) {
        self.refill(now);
        if rate.is_finite() {
            self.rate = rate.max(0.001);
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.capacity);
        self.last = now.max(self.last);
    }

    /// Takes one token if available (`Ok`), or says how long to wait for the next (`Err`).
    pub fn try_acquire(&mut self, now: Instant) -> Result<(), Duration> {
        if let Some(until) = self.paused_until {
            if now < until {
                return Err(until - now);
            }
            self.paused_until = None;
            // Nothing accumulates while paused.
            self.last = self.last.max(until);
        }
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            let missing = 1.0 - self.tokens;
            Err(Duration::from_secs_f64(missing / self.rate))
        }
    }

    /// How long from `now` until a token is available (zero: one is), pauses included. Takes
    /// nothing.
    pub fn ready_in(&mut self, now: Instant) -> Duration {
        if let Some(until) = self.paused_until
            && now < until
        {
            return until - now;
        }
        let mut probe = self.clone();
        probe.try_acquire(now).err().unwrap_or(Duration::ZERO)
    }

    /// The end of the pause under way at `now`, if any.
    pub fn paused_until(&self, now: Instant) -> Option<Instant> {
        self.paused_until.filter(|until| *until > now)
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
pub struct RateLimiter {
    bucket: Mutex<TokenBucket>,
    /// Told when a pause starts (a 429 paused an account that was not paused).
    listener: Option<Arc<dyn Fn() + Send + Sync>>,
}

impl std::fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimiter")
            .field("bucket", &self.bucket)
            .finish_non_exhaustive()
    }
}

impl RateLimiter {
    /// A limiter allowing `requests_per_second`, with bursts of at most `burst`.
    pub fn new(requests_per_second: f64, burst: u32) -> Self {
        Self {
            bucket: Mutex::new(TokenBucket::new(requests_per_second, burst, Instant::now())),
            listener: None,
        }
    }

    /// The same limiter, telling `listener` whenever a pause starts.
    pub fn with_listener(mut self, listener: Arc<dyn Fn() + Send + Sync>) -> Self {
        self.listener = Some(listener);
        self
    }

    /// How long until a request could go (zero: now), a pause included.
    pub fn ready_in(&self) -> Duration {
        let mut bucket = self.bucket.lock().unwrap_or_else(|e| e.into_inner());
        bucket.ready_in(Instant::now())
    }

    /// How long the pause under way (a 429's `Retry-After`) still lasts, if one is.
    pub fn paused_for(&self) -> Option<Duration> {
        let now = Instant::now();
        let bucket = self.bucket.lock().unwrap_or_else(|e| e.into_inner());
        bucket.paused_until(now).map(|until| until - now)
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

    /// Pauses every caller of this limiter for `duration` (a 429's `Retry-After`: Stripe limits
    /// the account, so every call to it waits, not only the one that was refused).
    pub fn pause_for(&self, duration: Duration) {
        let now = Instant::now();
        let started = {
            let mut bucket = self.bucket.lock().unwrap_or_else(|e| e.into_inner());
            let was_paused = bucket.paused_until(now).is_some();
            bucket.pause_until(now + duration, now);
            !was_paused
        };
        if started && let Some(listener) = &self.listener {
            listener();
        }
    }

    /// Changes the rate (an edited account) keeping the tokens held: no fresh burst.
    pub fn set_rate(&self, requests_per_second: f64) {
        let mut bucket = self.bucket.lock().unwrap_or_else(|e| e.into_inner());
        bucket.set_rate(requests_per_second, Instant::now());
    }

    /// The refill rate in requests per second.
    pub fn rate(&self) -> f64 {
        self.bucket.lock().unwrap_or_else(|e| e.into_inner()).rate()
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

    #[test]
    fn a_pause_holds_every_token_until_it_ends_and_mints_none_meanwhile() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10.0, 2, t0);
        b.pause_until(t0 + Duration::from_secs(2), t0);
        assert_eq!(
            b.try_acquire(t0 + Duration::from_millis(500)).unwrap_err(),
            Duration::from_millis(1500)
        );
        // An earlier pause does not shorten it.
        b.pause_until(t0 + Duration::from_secs(1), t0);
        assert!(b.try_acquire(t0 + Duration::from_millis(1999)).is_err());
        // At the end: no burst saved up during the pause, one token per 100 ms again.
        let end = t0 + Duration::from_secs(2);
        assert!(b.try_acquire(end).is_err());
        assert!(b.try_acquire(end + Duration::from_millis(100)).is_ok());
        assert!(b.try_acquire(end + Duration::from_millis(100)).is_err());
    }

    #[test]
    fn a_new_rate_hands_out_no_fresh_tokens() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1.0, 1, t0);
        assert!(b.try_acquire(t0).is_ok());
        b.set_rate(100.0, t0);
        assert!(b.try_acquire(t0).is_err(), "an edit is not a refill");
        assert!(b.try_acquire(t0 + Duration::from_millis(10)).is_ok());
    }

    #[test]
    fn ready_in_tells_the_wait_for_a_token_and_for_a_pause_without_taking_one() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10.0, 1, t0);
        assert_eq!(b.ready_in(t0), Duration::ZERO);
        assert_eq!(b.ready_in(t0), Duration::ZERO, "asking takes no token");
        assert!(b.try_acquire(t0).is_ok());
        assert_eq!(b.ready_in(t0), Duration::from_millis(100));
        b.pause_until(t0 + Duration::from_secs(3), t0);
        assert_eq!(
            b.ready_in(t0 + Duration::from_secs(1)),
            Duration::from_secs(2)
        );
        assert_eq!(
            b.paused_until(t0 + Duration::from_secs(1)),
            Some(t0 + Duration::from_secs(3))
        );
        assert_eq!(b.paused_until(t0 + Duration::from_secs(3)), None);
    }

    #[test]
    fn the_listener_hears_when_a_pause_starts_not_when_it_is_extended() {
        let heard = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let h = heard.clone();
        let limiter = RateLimiter::new(10.0, 1).with_listener(Arc::new(move || {
            h.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }));
        limiter.pause_for(Duration::from_secs(5));
        limiter.pause_for(Duration::from_secs(6));
        assert_eq!(heard.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert!(
            limiter
                .paused_for()
                .is_some_and(|d| d > Duration::from_secs(5))
        );
    }

    #[tokio::test]
    async fn a_paused_limiter_delays_every_caller() {
        let limiter = std::sync::Arc::new(RateLimiter::new(1000.0, 1));
        limiter.pause_for(Duration::from_millis(150));
        let start = Instant::now();
        let other = limiter.clone();
        let task = tokio::spawn(async move {
            other.acquire().await;
            Instant::now()
        });
        limiter.acquire().await;
        let done = task.await.unwrap();
        assert!(start.elapsed() >= Duration::from_millis(149));
        assert!(done.duration_since(start) >= Duration::from_millis(149));
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
