//! Retry decisions and backoff maths (pure functions, unit tested).

use std::time::{Duration, SystemTime};

/// How failed calls are retried.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Retries after the first attempt (so at most `max_retries + 1` attempts). 0 disables.
    pub max_retries: u32,
    /// Backoff before the first retry, doubled for each further retry (before jitter).
    pub initial_backoff: Duration,
    /// Upper bound of the exponential backoff (before jitter).
    pub max_backoff: Duration,
    /// Upper bound applied to a server-sent `Retry-After`, so a hostile or broken value cannot
    /// park a reconcile for hours.
    pub max_retry_after: Duration,
}

impl Default for RetryPolicy {
    /// 4 retries, 500 ms doubling to at most 8 s, `Retry-After` honoured up to 60 s.
    fn default() -> Self {
        Self {
            max_retries: 4,
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(8),
            max_retry_after: Duration::from_secs(60),
        }
    }
}

impl RetryPolicy {
    /// The delay before retry number `retry` (1 for the first retry).
    ///
    /// `jitter` is a number in `[0, 1)`: the exponential delay `min(initial * 2^(retry-1), max)`
    /// is scaled into `[delay/2, delay)` ("equal jitter"), so many clients hit by one 429 storm
    /// spread out. A `Retry-After` from the server (capped at `max_retry_after`) is a floor.
    pub fn backoff(&self, retry: u32, retry_after: Option<Duration>, jitter: f64) -> Duration {
        let exp = retry.saturating_sub(1).min(30);
        let base = self
            .initial_backoff
            .saturating_mul(1u32 << exp)
            .min(self.max_backoff);
        let jitter = if jitter.is_finite() {
            jitter.clamp(0.0, 1.0)
        } else {
            0.0
        };
        let jittered = base.mul_f64(0.5 + 0.5 * jitter);
        match retry_after {
            Some(ra) => jittered.max(ra.min(self.max_retry_after)),
            None => jittered,
        }
    }
}

/// Whether an HTTP answer may be retried.
///
/// `Stripe-Should-Retry` decides when present (`true` forces a retry, `false` forbids one).
/// Otherwise 409 (idempotency key in use by a concurrent request), 429 and every 5xx are
/// retried; other 4xx are not (the request itself is wrong and would fail again).
pub fn status_is_retryable(status: u16, should_retry: Option<bool>) -> bool {
    if let Some(decision) = should_retry {
        return decision;
    }
    status == 409 || status == 429 || status >= 500
}

/// Parses a `Retry-After` header: delta seconds (`"2"`, leniently `"1.5"`) or an HTTP date
/// (`"Wed, 21 Oct 2015 07:28:00 GMT"`, relative to `now`; a past date means "now").
/// Returns `None` for anything else, including negative numbers.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if value.is_empty() {
        return None;
    }
    if value.bytes().all(|b| b.is_ascii_digit()) {
        return value.parse::<u64>().ok().map(Duration::from_secs);
    }
    if value.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        let secs: f64 = value.parse().ok()?;
        return Duration::try_from_secs_f64(secs).ok();
    }
    let date = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    let at: SystemTime = date.with_timezone(&chrono::Utc).into();
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// Parses `Stripe-Should-Retry` (`true`/`false`, case-insensitive); anything else is `None`.
pub fn parse_should_retry(value: &str) -> Option<bool> {
    match value.trim().to_ascii_lowercase().as_str() {
        "true" => Some(true),
        "false" => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_retries: 5,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(1000),
            max_retry_after: Duration::from_secs(5),
        }
    }

    #[test]
    fn backoff_doubles_per_retry_until_the_cap() {
        let p = policy();
        // jitter 1.0 gives the full exponential delay
        assert_eq!(p.backoff(1, None, 1.0), Duration::from_millis(100));
        assert_eq!(p.backoff(2, None, 1.0), Duration::from_millis(200));
        assert_eq!(p.backoff(3, None, 1.0), Duration::from_millis(400));
        assert_eq!(p.backoff(4, None, 1.0), Duration::from_millis(800));
        assert_eq!(p.backoff(5, None, 1.0), Duration::from_millis(1000));
        assert_eq!(p.backoff(60, None, 1.0), Duration::from_millis(1000));
    }

    #[test]
    fn backoff_jitter_stays_between_half_and_full_delay() {
        let p = policy();
        assert_eq!(p.backoff(3, None, 0.0), Duration::from_millis(200));
        let mid = p.backoff(3, None, 0.5);
        assert_eq!(mid, Duration::from_millis(300));
        for j in [0.0, 0.1, 0.37, 0.99, 1.0, -3.0, 7.0, f64::NAN] {
            let d = p.backoff(3, None, j);
            assert!(
                d >= Duration::from_millis(200) && d <= Duration::from_millis(400),
                "{d:?}"
            );
        }
    }

    #[test]
    fn retry_after_is_a_floor_capped_by_max_retry_after() {
        let p = policy();
        assert_eq!(
            p.backoff(1, Some(Duration::from_secs(2)), 0.0),
            Duration::from_secs(2)
        );
        assert_eq!(
            p.backoff(1, Some(Duration::from_secs(3600)), 0.0),
            Duration::from_secs(5)
        );
        // a tiny Retry-After does not shorten the backoff
        assert_eq!(
            p.backoff(2, Some(Duration::from_millis(1)), 1.0),
            Duration::from_millis(200)
        );
    }

    #[test]
    fn retry_after_parses_seconds_and_http_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_445_412_470); // 07:27:50 GMT
        assert_eq!(parse_retry_after("2", now), Some(Duration::from_secs(2)));
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
        assert_eq!(
            parse_retry_after("1.5", now),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now),
            Some(Duration::from_secs(10))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        for bad in ["", "-1", "soon", "1e3", "1.2.3", "99999999999999999999999"] {
            assert_eq!(parse_retry_after(bad, now), None, "{bad:?}");
        }
    }

    #[test]
    fn should_retry_header_overrides_status() {
        assert!(status_is_retryable(429, None));
        assert!(status_is_retryable(409, None));
        assert!(status_is_retryable(500, None));
        assert!(status_is_retryable(503, None));
        assert!(!status_is_retryable(400, None));
        assert!(!status_is_retryable(401, None));
        assert!(!status_is_retryable(403, None));
        assert!(!status_is_retryable(404, None));
        assert!(!status_is_retryable(500, Some(false)));
        assert!(status_is_retryable(400, Some(true)));
        assert_eq!(parse_should_retry("TRUE"), Some(true));
        assert_eq!(parse_should_retry("false"), Some(false));
        assert_eq!(parse_should_retry("maybe"), None);
    }
}
