//! A circuit breaker per Stripe account (API base + `Stripe-Context`), shared by every client
//! of that account like its [`RateLimiter`](super::RateLimiter).
//!
//! After `failure_threshold` consecutive failed attempts (timeouts, connection errors, 5xx) the
//! breaker **opens**: every attempt is refused at once with [`StripeError::CircuitOpen`]
//! (nothing is sent) until the cooldown has passed. Then the first attempt is let through as
//! the **half-open** probe while every other one is still refused; the probe's success closes
//! the breaker, its failure opens it again for twice the cooldown (capped). Any answer from
//! Stripe that is not a 5xx (a 2xx, a 4xx, a 429), and any saved answer Stripe replays under its
//! idempotency key (even a 500), proves Stripe answers and counts as success.
//!
//! The state is a health estimate kept in memory: a restart starts closed, and the first
//! attempts find out again.
//!
//! [`StripeError::CircuitOpen`]: super::StripeError::CircuitOpen

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::jiff::Timestamp;

use crate::controller::clock::{Clock, SystemClock};

/// The breaker's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BreakerSettings {
    /// Consecutive failed attempts that open the breaker (at least 1).
    pub failure_threshold: u32,
    /// How long the breaker stays open the first time.
    pub cooldown: Duration,
    /// The longest cooldown (it doubles after each failed probe, up to this).
    pub max_cooldown: Duration,
}

impl Default for BreakerSettings {
    /// 5 consecutive failures; open for 30 s, doubling to 5 min.
    fn default() -> Self {
        Self {
            failure_threshold: 5,
            cooldown: Duration::from_secs(30),
            max_cooldown: Duration::from_secs(300),
        }
    }
}

/// The three states of a breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CircuitState {
    /// Calls go through.
    Closed,
    /// Calls are refused without being sent, until the next probe.
    Open,
    /// One probe call is under way; every other call is refused.
    HalfOpen,
}

impl CircuitState {
    /// `Closed`, `Open` or `HalfOpen` (as status and metrics show it).
    pub fn as_str(self) -> &'static str {
        match self {
            CircuitState::Closed => "Closed",
            CircuitState::Open => "Open",
            CircuitState::HalfOpen => "HalfOpen",
        }
    }

    /// 0 closed, 1 half-open, 2 open (the state gauge).
    pub fn gauge_value(self) -> i64 {
        match self {
            CircuitState::Closed => 0,
            CircuitState::HalfOpen => 1,
            CircuitState::Open => 2,
        }
    }
}

/// Why an attempt was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// When a call may be let through again (the next probe; soon while a probe is under way).
    pub retry_in: Duration,
}

/// The pure state machine; the caller supplies the clock.
#[derive(Debug, Clone)]
pub struct BreakerCore {
    settings: BreakerSettings,
    state: CircuitState,
    consecutive_failures: u32,
    /// The cooldown of the current (or next) opening.
    cooldown: Duration,
    /// When the breaker last opened (kept through half-open).
    opened_at: Option<Instant>,
    /// When the next probe may go (while open).
    next_probe: Option<Instant>,
}

/// How long an attempt refused during a probe waits before asking again.
pub const PROBE_WAIT: Duration = Duration::from_secs(1);

impl BreakerCore {
    /// A closed breaker.
    pub fn new(settings: BreakerSettings) -> Self {
        let settings = BreakerSettings {
            failure_threshold: settings.failure_threshold.max(1),
            max_cooldown: settings.max_cooldown.max(settings.cooldown),
            ..settings
        };
        Self {
            cooldown: settings.cooldown,
            settings,
            state: CircuitState::Closed,
            consecutive_failures: 0,
            opened_at: None,
            next_probe: None,
        }
    }

    /// The state at `now`.
    pub fn state(&self) -> CircuitState {
        self.state
    }

    /// Whether an attempt at `now` would be let through (without changing anything).
    pub fn check(&self, now: Instant) -> Result<(), Refused> {
        match self.state {
            CircuitState::Closed => Ok(()),
            CircuitState::Open => match self.next_probe {
                Some(at) if at > now => Err(Refused { retry_in: at - now }),
                _ => Ok(()),
            },
            CircuitState::HalfOpen => Err(Refused {
                retry_in: PROBE_WAIT,
            }),
        }
    }

    /// Lets an attempt through (`Ok(true)`: it is the half-open probe) or refuses it. The
    /// second value is the transition this caused (open → half-open).
    pub fn admit(&mut self, now: Instant) -> (Result<bool, Refused>, Option<CircuitState>) {
        match self.check(now) {
            Err(r) => (Err(r), None),
            Ok(()) if self.state == CircuitState::Open => {
                self.state = CircuitState::HalfOpen;
                (Ok(true), Some(CircuitState::HalfOpen))
            }
            Ok(()) => (Ok(false), None),
        }
    }

    /// Records the outcome of an admitted attempt; returns the new state if it changed.
    pub fn record(&mut self, now: Instant, success: bool, probe: bool) -> Option<CircuitState> {
        if success {
            self.consecutive_failures = 0;
            // Stripe answered: whoever's attempt it was (the probe, or one admitted before the
            // breaker opened), it is reachable again.
            if self.state != CircuitState::Closed {
                self.state = CircuitState::Closed;
                self.cooldown = self.settings.cooldown;
                self.opened_at = None;
                self.next_probe = None;
                return Some(CircuitState::Closed);
            }
            return None;
        }
        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        match self.state {
            CircuitState::HalfOpen if probe => {
                self.cooldown = (self.cooldown * 2).min(self.settings.max_cooldown);
                self.open(now);
                Some(CircuitState::Open)
            }
            CircuitState::Closed
                if self.consecutive_failures >= self.settings.failure_threshold =>
            {
                self.cooldown = self.settings.cooldown;
                self.opened_at = Some(now);
                self.open(now);
                Some(CircuitState::Open)
            }
            _ => None,
        }
    }

    /// The probe was abandoned (its caller went away) without an outcome: open again, with the
    /// next probe allowed at once.
    pub fn abandon_probe(&mut self, now: Instant) -> Option<CircuitState> {
        if self.state != CircuitState::HalfOpen {
            return None;
        }
        self.state = CircuitState::Open;
        self.next_probe = Some(now);
        Some(CircuitState::Open)
    }

    fn open(&mut self, now: Instant) {
        self.state = CircuitState::Open;
        self.opened_at.get_or_insert(now);
        self.next_probe = Some(now + self.cooldown);
    }

    /// When the breaker opened (while not closed).
    pub fn opened_at(&self) -> Option<Instant> {
        self.opened_at
    }

    /// When the next probe may go (while open).
    pub fn next_probe(&self) -> Option<Instant> {
        self.next_probe
    }

    /// Failed attempts in a row.
    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures
    }
}

/// Told about every state change of a breaker (metrics, the scheduler, account status).
pub type TransitionListener = Arc<dyn Fn(CircuitState) + Send + Sync>;

/// A breaker shared by the clients of one Stripe account.
pub struct CircuitBreaker {
    core: Mutex<BreakerCore>,
    listener: Option<TransitionListener>,
    /// The operator's clock (a manual one in tests and the seeded simulation), read through
    /// `origin`: the core's instants are `origin.0` plus the clock's time since `origin.1`.
    clock: Arc<dyn Clock>,
    origin: (Instant, Timestamp),
}

impl std::fmt::Debug for CircuitBreaker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CircuitBreaker")
            .field("core", &self.lock())
            .finish_non_exhaustive()
    }
}

/// What a breaker shows: its state and, while not closed, since when and the next probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BreakerSnapshot {
    pub state: CircuitState,
    /// When it opened (wall clock), while not closed.
    pub opened_at: Option<SystemTime>,
    /// When the next probe may go (wall clock), while open.
    pub next_probe: Option<SystemTime>,
    /// Failed attempts in a row.
    pub consecutive_failures: u32,
}

fn wall(at: Instant, now: Instant, wall_now: SystemTime) -> SystemTime {
    if at >= now {
        wall_now + (at - now)
    } else {
        wall_now - (now - at)
    }
}

impl CircuitBreaker {
    /// A closed breaker that tells `listener` about each state change.
    pub fn new(settings: BreakerSettings, listener: Option<TransitionListener>) -> Self {
        Self::with_clock(settings, listener, Arc::new(SystemClock))
    }

    /// The same, reading the time from `clock`: cooldowns pass when `clock` says so.
    pub fn with_clock(
        settings: BreakerSettings,
        listener: Option<TransitionListener>,
        clock: Arc<dyn Clock>,
    ) -> Self {
        let origin = (Instant::now(), clock.now());
        Self {
            core: Mutex::new(BreakerCore::new(settings)),
            listener,
            clock,
            origin,
        }
    }

    /// The clock's time now, as an instant for the core and as wall-clock time.
    fn now(&self) -> (Instant, SystemTime) {
        let ts = self.clock.now();
        let since = ts.duration_since(self.origin.1);
        let at = match Duration::try_from(since) {
            Ok(ahead) => self.origin.0.checked_add(ahead),
            // A clock set back before the breaker was made: the origin is as early as it gets.
            Err(_) => None,
        }
        .unwrap_or(self.origin.0);
        (at, SystemTime::from(ts))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BreakerCore> {
        self.core.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn notify(&self, change: Option<CircuitState>) {
        if let (Some(to), Some(listener)) = (change, &self.listener) {
            listener(to);
        }
    }

    /// Whether an attempt now would be let through (nothing changes).
    pub fn check(&self) -> Result<(), Refused> {
        let (now, _) = self.now();
        self.lock().check(now)
    }

    /// Lets one attempt through, or refuses it. Report its outcome on the returned
    /// [`Attempt`]; dropping it without an outcome abandons a probe.
    pub fn admit(self: &Arc<Self>) -> Result<Attempt, Refused> {
        let (now, _) = self.now();
        let (result, change) = self.lock().admit(now);
        self.notify(change);
        result.map(|probe| Attempt {
            breaker: self.clone(),
            probe,
            done: false,
        })
    }

    /// The state now, with wall-clock times.
    pub fn snapshot(&self) -> BreakerSnapshot {
        let (now, wall_now) = self.now();
        let core = self.lock();
        BreakerSnapshot {
            state: core.state(),
            opened_at: core.opened_at().map(|t| wall(t, now, wall_now)),
            next_probe: core
                .next_probe()
                .filter(|_| core.state() == CircuitState::Open)
                .map(|t| wall(t, now, wall_now)),
            consecutive_failures: core.consecutive_failures(),
        }
    }

    /// How long until an attempt would be let through (zero: now).
    pub fn blocked_for(&self) -> Option<Duration> {
        self.check().err().map(|r| r.retry_in)
    }

    /// Whether an attempt would be the half-open probe now (open, and the cooldown is over).
    pub fn probe_due(&self) -> bool {
        let (now, _) = self.now();
        let core = self.lock();
        core.state() == CircuitState::Open && core.check(now).is_ok()
    }

    /// The state now.
    pub fn state(&self) -> CircuitState {
        self.lock().state()
    }
}

/// One admitted attempt.
pub struct Attempt {
    breaker: Arc<CircuitBreaker>,
    probe: bool,
    done: bool,
}

impl Attempt {
    /// Records the outcome: `true` when Stripe answered (anything but a 5xx).
    pub fn record(mut self, success: bool) {
        self.done = true;
        let (now, _) = self.breaker.now();
        let change = self.breaker.lock().record(now, success, self.probe);
        self.breaker.notify(change);
    }

    /// Whether this attempt is the half-open probe.
    pub fn is_probe(&self) -> bool {
        self.probe
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        if !self.done && self.probe {
            let (now, _) = self.breaker.now();
            let change = self.breaker.lock().abandon_probe(now);
            self.breaker.notify(change);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> BreakerSettings {
        BreakerSettings {
            failure_threshold: 3,
            cooldown: Duration::from_secs(30),
            max_cooldown: Duration::from_secs(100),
        }
    }

    #[test]
    fn opens_after_the_threshold_of_consecutive_failures_only() {
        let t0 = Instant::now();
        let mut b = BreakerCore::new(settings());
        assert_eq!(b.record(t0, false, false), None);
        assert_eq!(b.record(t0, false, false), None);
        // A success in between resets the count.
        assert_eq!(b.record(t0, true, false), None);
        assert_eq!(b.record(t0, false, false), None);
        assert_eq!(b.record(t0, false, false), None);
        assert_eq!(b.check(t0), Ok(()));
        assert_eq!(b.record(t0, false, false), Some(CircuitState::Open));
        assert_eq!(b.state(), CircuitState::Open);
        assert_eq!(
            b.check(t0 + Duration::from_secs(10)),
            Err(Refused {
                retry_in: Duration::from_secs(20)
            })
        );
    }

    #[test]
    fn while_open_nothing_passes_then_exactly_one_probe() {
        let t0 = Instant::now();
        let mut b = BreakerCore::new(settings());
        for _ in 0..3 {
            b.record(t0, false, false);
        }
        let (r, change) = b.admit(t0 + Duration::from_secs(29));
        assert!(r.is_err() && change.is_none());
        let after = t0 + Duration::from_secs(30);
        let (r, change) = b.admit(after);
        assert_eq!(
            r,
            Ok(true),
            "the first attempt after the cooldown is the probe"
        );
        assert_eq!(change, Some(CircuitState::HalfOpen));
        let (r, _) = b.admit(after);
        assert_eq!(
            r,
            Err(Refused {
                retry_in: PROBE_WAIT
            }),
            "a second attempt waits for the probe"
        );
        // Late results of attempts admitted before the breaker opened change nothing.
        assert_eq!(b.record(after, false, false), None);
        assert_eq!(b.state(), CircuitState::HalfOpen);
    }

    #[test]
    fn a_successful_probe_closes_and_a_failed_one_doubles_the_cooldown_up_to_the_cap() {
        let t0 = Instant::now();
        let mut b = BreakerCore::new(settings());
        for _ in 0..3 {
            b.record(t0, false, false);
        }
        // failed probe: 60 s
        let t1 = t0 + Duration::from_secs(30);
        assert_eq!(b.admit(t1).0, Ok(true));
        assert_eq!(b.record(t1, false, true), Some(CircuitState::Open));
        assert_eq!(b.next_probe(), Some(t1 + Duration::from_secs(60)));
        assert_eq!(b.opened_at(), Some(t0), "open since the first opening");
        // failed probe: 100 s (capped, not 120)
        let t2 = t1 + Duration::from_secs(60);
        assert_eq!(b.admit(t2).0, Ok(true));
        assert_eq!(b.record(t2, false, true), Some(CircuitState::Open));
        assert_eq!(b.next_probe(), Some(t2 + Duration::from_secs(100)));
        // successful probe: closed, cooldown back to 30 s for the next opening
        let t3 = t2 + Duration::from_secs(100);
        assert_eq!(b.admit(t3).0, Ok(true));
        assert_eq!(b.record(t3, true, true), Some(CircuitState::Closed));
        assert_eq!(b.check(t3), Ok(()));
        assert_eq!(b.opened_at(), None);
        for _ in 0..3 {
            b.record(t3, false, false);
        }
        assert_eq!(b.next_probe(), Some(t3 + Duration::from_secs(30)));
    }

    #[test]
    fn an_abandoned_probe_lets_the_next_attempt_probe_at_once() {
        let t0 = Instant::now();
        let breaker = Arc::new(CircuitBreaker::new(
            BreakerSettings {
                failure_threshold: 1,
                cooldown: Duration::ZERO,
                max_cooldown: Duration::ZERO,
            },
            None,
        ));
        breaker.admit().unwrap().record(false);
        assert_eq!(breaker.state(), CircuitState::Open);
        let probe = breaker.admit().unwrap();
        assert!(probe.is_probe());
        assert!(breaker.admit().is_err(), "one probe at a time");
        drop(probe);
        assert_eq!(breaker.state(), CircuitState::Open);
        let again = breaker.admit().unwrap();
        assert!(again.is_probe());
        again.record(true);
        assert_eq!(breaker.state(), CircuitState::Closed);
        let _ = t0;
    }

    #[test]
    fn cooldowns_pass_on_the_injected_clock_not_on_real_time() {
        let clock = crate::controller::clock::ManualClock::new();
        let breaker = Arc::new(CircuitBreaker::with_clock(
            BreakerSettings {
                failure_threshold: 1,
                cooldown: Duration::from_secs(30),
                max_cooldown: Duration::from_secs(60),
            },
            None,
            Arc::new(clock.clone()),
        ));
        breaker.admit().unwrap().record(false);
        assert_eq!(breaker.state(), CircuitState::Open);
        let refused = breaker.admit().err().expect("open: refused");
        assert!(refused.retry_in > Duration::from_secs(29));
        let snap = breaker.snapshot();
        let wall_now = SystemTime::from(crate::controller::clock::Clock::now(&clock));
        let next = snap.next_probe.expect("open: a next probe");
        let ahead = next.duration_since(wall_now).expect("the probe is ahead");
        assert!(ahead > Duration::from_secs(29) && ahead <= Duration::from_secs(30));
        clock.advance(Duration::from_secs(29));
        assert!(breaker.admit().is_err(), "29 s of the clock: still open");
        assert!(!breaker.probe_due());
        clock.advance(Duration::from_secs(2));
        assert!(breaker.probe_due());
        let probe = breaker.admit().expect("cooldown passed on the clock");
        assert!(probe.is_probe());
        probe.record(false);
        // A failed probe doubles the cooldown, again on the clock.
        clock.advance(Duration::from_secs(31));
        assert!(breaker.admit().is_err(), "the second opening lasts 60 s");
        clock.advance(Duration::from_secs(30));
        let probe = breaker.admit().expect("60 s passed");
        probe.record(true);
        assert_eq!(breaker.state(), CircuitState::Closed);
    }

    #[test]
    fn the_listener_hears_every_transition_in_order() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let breaker = Arc::new(CircuitBreaker::new(
            BreakerSettings {
                failure_threshold: 2,
                cooldown: Duration::ZERO,
                max_cooldown: Duration::ZERO,
            },
            Some(Arc::new(move |s| log.lock().unwrap().push(s))),
        ));
        breaker.admit().unwrap().record(false);
        breaker.admit().unwrap().record(false);
        let probe = breaker.admit().unwrap();
        probe.record(true);
        assert_eq!(
            *seen.lock().unwrap(),
            vec![
                CircuitState::Open,
                CircuitState::HalfOpen,
                CircuitState::Closed
            ]
        );
        let snap = breaker.snapshot();
        assert_eq!(snap.state, CircuitState::Closed);
        assert_eq!(snap.opened_at, None);
    }
}
