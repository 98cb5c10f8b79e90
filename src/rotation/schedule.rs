//! When the next rotation is due.
//!
//! Pure functions of the declared schedule, the time of the last rotation and a stable seed, so
//! that every reconcile of an unchanged object computes the same `nextRotationAt` (no status
//! churn) and the controller can requeue for exactly that moment.

use std::str::FromStr;
use std::time::Duration;

use chrono::TimeZone as _;
use croner::Cron;
use croner::parser::{CronParser, Seconds};
use k8s_openapi::jiff::{SignedDuration, Timestamp};

use crate::api::RotationSchedule;

/// Why a schedule cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ScheduleError {
    #[error("{field} {value:?} is not a Go duration such as 720h or 90m")]
    BadDuration { field: &'static str, value: String },
    #[error("{field} must be at least {min}")]
    TooShort {
        field: &'static str,
        min: &'static str,
    },
    #[error("schedule {value:?} is not a five-field cron expression: {reason}")]
    BadCron { value: String, reason: String },
    #[error("timeZone {0:?} is not an IANA time zone such as Europe/Berlin")]
    BadTimeZone(String),
    #[error("schedule {0:?} never fires")]
    NeverFires(String),
}

/// The shortest period `every` may declare.
pub const MIN_EVERY: Duration = Duration::from_secs(3600);
/// The largest jitter added to a rotation.
pub const MAX_JITTER: Duration = Duration::from_secs(600);

/// Parses a Go duration (`720h`, `1h30m`, `90s`). Negative durations are refused.
pub fn parse_duration(field: &'static str, value: &str) -> Result<Duration, ScheduleError> {
    let bad = || ScheduleError::BadDuration {
        field,
        value: value.to_string(),
    };
    if value.trim().is_empty() {
        return Err(bad());
    }
    let d = kube::core::Duration::from_str(value).map_err(|_| bad())?;
    if d.is_negative() {
        return Err(bad());
    }
    Ok(d.into())
}

/// A validated schedule.
#[derive(Debug, Clone)]
pub enum Schedule {
    /// Every fixed period.
    Every(Duration),
    /// A cron expression in a time zone.
    Cron {
        cron: Box<Cron>,
        tz: chrono_tz::Tz,
        source: String,
    },
}

impl Schedule {
    /// Validates a declared schedule.
    pub fn parse(declared: &RotationSchedule) -> Result<Self, ScheduleError> {
        match declared {
            RotationSchedule::Every(every) => {
                let period = parse_duration("every", every)?;
                if period < MIN_EVERY {
                    return Err(ScheduleError::TooShort {
                        field: "every",
                        min: "1h",
                    });
                }
                Ok(Schedule::Every(period))
            }
            RotationSchedule::Cron {
                schedule,
                time_zone,
            } => {
                let tz = match time_zone.as_deref() {
                    None | Some("") => chrono_tz::UTC,
                    Some(name) => chrono_tz::Tz::from_str(name)
                        .map_err(|_| ScheduleError::BadTimeZone(name.to_string()))?,
                };
                if schedule.split_whitespace().count() != 5 {
                    return Err(ScheduleError::BadCron {
                        value: schedule.clone(),
                        reason: "expected minute hour day-of-month month day-of-week".into(),
                    });
                }
                let cron = CronParser::builder()
                    .seconds(Seconds::Disallowed)
                    .build()
                    .parse(schedule)
                    .map_err(|e| ScheduleError::BadCron {
                        value: schedule.clone(),
                        reason: e.to_string(),
                    })?;
                Ok(Schedule::Cron {
                    cron: Box::new(cron),
                    tz,
                    source: schedule.clone(),
                })
            }
        }
    }

    /// The first occurrence strictly after `after`, without jitter.
    pub fn next_after(&self, after: Timestamp) -> Result<Timestamp, ScheduleError> {
        match self {
            Schedule::Every(period) => Ok(add(after, *period)),
            Schedule::Cron { cron, tz, source } => {
                let start = tz
                    .timestamp_opt(after.as_second(), 0)
                    .single()
                    .ok_or_else(|| ScheduleError::NeverFires(source.clone()))?;
                let next = cron
                    .find_next_occurrence(&start, false)
                    .map_err(|_| ScheduleError::NeverFires(source.clone()))?;
                Timestamp::from_second(next.timestamp())
                    .map_err(|_| ScheduleError::NeverFires(source.clone()))
            }
        }
    }

    /// The longest gap between two rotations over the next year (for `maxRotationPeriod`).
    pub fn longest_period(&self, from: Timestamp) -> Result<Duration, ScheduleError> {
        match self {
            Schedule::Every(period) => Ok(*period),
            Schedule::Cron { .. } => {
                let horizon = add(from, Duration::from_secs(366 * 24 * 3600));
                let mut longest = Duration::ZERO;
                let mut t = self.next_after(from)?;
                // Bounded: at most 2,000 occurrences are inspected (a schedule that fires more
                // often than that in a year has short gaps anyway).
                for _ in 0..2000 {
                    if t > horizon {
                        break;
                    }
                    let next = self.next_after(t)?;
                    longest = longest
                        .max(Duration::try_from(next.duration_since(t)).unwrap_or(Duration::ZERO));
                    t = next;
                }
                Ok(longest)
            }
        }
    }

    /// The next rotation after the last one, plus a stable jitter derived from `seed` (the
    /// object's UID and rotation number): up to 1% of the period and at most 10 minutes for
    /// `every`, up to one minute for cron schedules.
    pub fn next_rotation(&self, last: Timestamp, seed: &str) -> Result<Timestamp, ScheduleError> {
        let base = self.next_after(last)?;
        let cap = match self {
            Schedule::Every(period) => (*period / 100).min(MAX_JITTER),
            Schedule::Cron { .. } => Duration::from_secs(60),
        };
        Ok(add(base, jitter(seed, cap)))
    }
}

fn add(t: Timestamp, d: Duration) -> Timestamp {
    let sd = SignedDuration::try_from(d).unwrap_or(SignedDuration::MAX);
    t.checked_add(sd).unwrap_or(Timestamp::MAX)
}

/// A deterministic jitter in `[0, cap)` from the SHA-256 of `seed`, whole seconds.
pub fn jitter(seed: &str, cap: Duration) -> Duration {
    let secs = cap.as_secs();
    if secs == 0 {
        return Duration::ZERO;
    }
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, seed.as_bytes());
    let mut n = [0u8; 8];
    n.copy_from_slice(&digest.as_ref()[..8]);
    Duration::from_secs(u64::from_be_bytes(n) % secs)
}

/// Seconds from `now` until `at`, zero when already due.
pub fn until(now: Timestamp, at: Timestamp) -> Duration {
    if at <= now {
        Duration::ZERO
    } else {
        Duration::try_from(at.duration_since(now)).unwrap_or(Duration::ZERO)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn go_durations_parse_and_garbage_does_not() {
        assert_eq!(
            parse_duration("every", "720h").unwrap(),
            Duration::from_secs(720 * 3600)
        );
        assert_eq!(
            parse_duration("every", "1h30m").unwrap(),
            Duration::from_secs(5400)
        );
        assert!(parse_duration("every", "30d").is_err());
        assert!(parse_duration("every", "-1h").is_err());
        assert!(parse_duration("every", "").is_err());
    }

    #[test]
    fn every_adds_the_period_and_a_bounded_stable_jitter() {
        let s = Schedule::parse(&RotationSchedule::Every("720h".into())).unwrap();
        let last = ts("2026-01-01T00:00:00Z");
        let a = s.next_rotation(last, "uid-1/1").unwrap();
        let b = s.next_rotation(last, "uid-1/1").unwrap();
        assert_eq!(a, b, "same seed, same moment: no status churn");
        let base = ts("2026-01-31T00:00:00Z");
        assert!(a >= base && a < base.checked_add(SignedDuration::from_secs(600)).unwrap());
        let others: std::collections::HashSet<_> = (0..20)
            .map(|i| s.next_rotation(last, &format!("uid-{i}/1")).unwrap())
            .collect();
        assert!(others.len() > 10, "different objects spread out");
    }

    #[test]
    fn every_shorter_than_an_hour_is_refused() {
        let err = Schedule::parse(&RotationSchedule::Every("30m".into())).unwrap_err();
        assert_eq!(
            err,
            ScheduleError::TooShort {
                field: "every",
                min: "1h"
            }
        );
    }

    #[test]
    fn cron_fires_in_its_time_zone() {
        // Mondays 03:00 in Berlin = 02:00 UTC in winter.
        let s = Schedule::parse(&RotationSchedule::Cron {
            schedule: "0 3 * * 1".into(),
            time_zone: Some("Europe/Berlin".into()),
        })
        .unwrap();
        let next = s.next_after(ts("2026-01-01T00:00:00Z")).unwrap(); // a Thursday
        assert_eq!(next, ts("2026-01-05T02:00:00Z"));
        let after_jitter = s.next_rotation(ts("2026-01-01T00:00:00Z"), "x").unwrap();
        assert!(after_jitter >= next && after_jitter < ts("2026-01-05T02:01:00Z"));
    }

    #[test]
    fn cron_across_a_dst_change_keeps_local_time() {
        // Berlin switches to summer time on 2026-03-29: 03:00 local is then 01:00 UTC.
        let s = Schedule::parse(&RotationSchedule::Cron {
            schedule: "0 3 * * *".into(),
            time_zone: Some("Europe/Berlin".into()),
        })
        .unwrap();
        assert_eq!(
            s.next_after(ts("2026-03-30T00:00:00Z")).unwrap(),
            ts("2026-03-30T01:00:00Z")
        );
    }

    #[test]
    fn bad_cron_and_bad_zone_are_refused_with_reasons() {
        let e = Schedule::parse(&RotationSchedule::Cron {
            schedule: "0 3 * *".into(),
            time_zone: None,
        });
        assert!(matches!(e, Err(ScheduleError::BadCron { .. })));
        let e = Schedule::parse(&RotationSchedule::Cron {
            schedule: "99 3 * * *".into(),
            time_zone: None,
        });
        assert!(matches!(e, Err(ScheduleError::BadCron { .. })));
        let e = Schedule::parse(&RotationSchedule::Cron {
            schedule: "0 3 * * *".into(),
            time_zone: Some("Mars/Olympus".into()),
        });
        assert_eq!(
            e.unwrap_err(),
            ScheduleError::BadTimeZone("Mars/Olympus".into())
        );
    }

    #[test]
    fn longest_period_of_a_cron_schedule() {
        let monthly = Schedule::parse(&RotationSchedule::Cron {
            schedule: "0 0 1 * *".into(),
            time_zone: None,
        })
        .unwrap();
        let longest = monthly.longest_period(ts("2026-01-15T00:00:00Z")).unwrap();
        assert_eq!(longest, Duration::from_secs(31 * 24 * 3600));
        let every = Schedule::parse(&RotationSchedule::Every("48h".into())).unwrap();
        assert_eq!(
            every.longest_period(ts("2026-01-01T00:00:00Z")).unwrap(),
            Duration::from_secs(48 * 3600)
        );
    }

    #[test]
    fn until_is_zero_when_due() {
        assert_eq!(
            until(ts("2026-01-02T00:00:00Z"), ts("2026-01-01T00:00:00Z")),
            Duration::ZERO
        );
        assert_eq!(
            until(ts("2026-01-01T00:00:00Z"), ts("2026-01-01T00:01:00Z")),
            Duration::from_secs(60)
        );
    }
}
