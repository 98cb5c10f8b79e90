//! Anomaly detection for the egress broker: per-permission request-rate baselines that flag a
//! burst of sensitive writes (refunds, payouts, transfers, customer writes) far above normal, and
//! the actions a policy chooses for it (record, throttle, incident rotation).
//!
//! # Method
//! Requests are counted per window (one minute by default) for each *sensitive* permission. For
//! each permission the detector keeps an exponentially weighted mean and variance of the window
//! counts **per time-of-day bucket** (24 hourly buckets by default, in UTC), so a daily cycle is
//! learned: 03:00 is compared with earlier 03:00s, not with the lunchtime peak. A bucket that has
//! not learned enough windows yet falls back to a permission-wide baseline, and nothing is
//! flagged during the warm-up after the detector starts.
//!
//! A window is anomalous when its count exceeds **all three** of: `mean + sigmas·σ` (σ at least
//! the Poisson spread `√mean`, so a quiet, regular baseline is not over-sensitive), a minimum
//! absolute count, and `minRatio × mean` (tiny baselines: 3 refunds where 0.2 are usual is not an
//! attack). The check runs on every request against a limit computed when the window opens, so a
//! burst is flagged as soon as the running count crosses it, not when the minute ends.
//!
//! # Poisoning
//! An anomalous window is never learned: an attacker cannot teach the detector a burst. A slow
//! ramp that stays under the limit is learned, so the baseline of each bucket may grow by at most
//! `maxDailyGrowth` (× per day, plus a small additive floor) relative to the bucket's value when
//! the day began; a ramp that outruns that cap is flagged. A ramp slower than the cap is, by
//! construction, indistinguishable from organic growth (see the README).
//!
//! # Cost
//! [`Detector::observe`] is O(1) in the traffic and allocates nothing: the sensitive permissions
//! are fixed when the detector is built (a short linear scan, or [`Detector::slot`] once per route
//! and [`Detector::observe_slot`] per request). Closing a window costs one update per elapsed
//! window (bounded by [`MAX_GAP_WINDOWS`]), amortised over time, not requests. The detector is
//! plain data: the proxy keeps it behind a `Mutex` and holds the lock for one call.
//!
//! # Wiring (what the proxy does)
//! ```text
//! let config = policy.detector_config()?;              // AnomalyPolicy from flags or a file
//! let detector = Mutex::new(Detector::new(config)?);
//! let responder = Arc::new(Responder::new(KubeActionSink::new(client, ns, name), policy.action, metrics));
//! // per request, after the route gave `permission`:
//! let o = detector.lock().observe(permission, SystemTime::now());
//! if let Some(f) = o.finding { let r = responder.clone(); tokio::spawn(async move { r.respond(&f).await }); }
//! if o.throttled { let left = detector.lock().throttle_remaining(permission, now); return throttle_response(permission, left); }
//! // and every few seconds: detector.lock().tick(SystemTime::now());
//! ```

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use kube::KubeSchema;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::api::{GO_DURATION_PATTERN, duration_rule};

use super::suggest::valid_permission;

/// Permissions watched whatever the policy says: the writes that move money or customer data.
pub const DEFAULT_SENSITIVE_PERMISSIONS: &[&str] = &[
    "customer_write",
    "payout_write",
    "refund_write",
    "transfer_write",
];

/// The Event reason of an anomaly (a Warning on the StripeKeyPolicy).
pub const ANOMALY_EVENT_REASON: &str = "EgressAnomaly";

/// The field manager of the incident annotation patch.
pub const EGRESS_FIELD_MANAGER: &str = "stripe-key-operator-egress-proxy";

/// At most this many elapsed windows are learned when a permission was idle for longer (one week
/// of minutes): older silence says nothing more.
pub const MAX_GAP_WINDOWS: u64 = 7 * 24 * 60;

const DAY_SECS: u64 = 24 * 3600;

// ---------------------------------------------------------------------------------------------
// Policy (user-facing configuration)
// ---------------------------------------------------------------------------------------------

/// What the broker does when a sensitive permission is used far above its baseline.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum AnomalyAction {
    /// Count it (`stripe_key_operator_egress_anomalies_total`) and record a Warning Event on the
    /// policy. Requests keep flowing.
    #[default]
    Record,
    /// Record, and answer requests of that permission locally with Stripe's `429 rate_limit`
    /// error for `throttleFor` (extended while the burst goes on). Nothing reaches Stripe.
    Throttle,
    /// Record, and request an incident rotation of the policy (the `stripekeys.io/rotate`
    /// annotations with reason `incident`): every key handed out so far is expired at once.
    IncidentRotation,
}

impl AnomalyAction {
    /// The metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Record => "record",
            Self::Throttle => "throttle",
            Self::IncidentRotation => "incident_rotation",
        }
    }
}

impl fmt::Display for AnomalyAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Record => "Record",
            Self::Throttle => "Throttle",
            Self::IncidentRotation => "IncidentRotation",
        })
    }
}

impl std::str::FromStr for AnomalyAction {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().replace(['-', '_'], "").as_str() {
            "record" => Ok(Self::Record),
            "throttle" => Ok(Self::Throttle),
            "incidentrotation" => Ok(Self::IncidentRotation),
            _ => Err(format!(
                "{s:?}: expected Record, Throttle or IncidentRotation"
            )),
        }
    }
}

/// Anomaly detection of a brokered key: which permissions are watched, how far above normal is
/// a burst, and what happens then. `spec.delivery.broker.anomaly` of a StripeKeyPolicy (the
/// operator publishes it to the egress-proxy sidecar), or the file of the sidecar's
/// `--anomaly-policy` flag. [`AnomalyPolicy::detector_config`] checks it the same way for both.
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.throttleFor) || (has(self.action) && self.action == 'Throttle')").message("throttleFor applies only to action Throttle"))]
pub struct AnomalyPolicy {
    /// What happens on a burst: `Record` (metric and Warning Event, the default), `Throttle`
    /// (also answer that permission's requests locally with Stripe's 429 `rate_limit` error for
    /// `throttleFor`) or `IncidentRotation` (also request an incident rotation of the policy).
    #[serde(default)]
    pub action: AnomalyAction,
    /// Permissions watched in addition to `refund_write`, `payout_write`, `transfer_write` and
    /// `customer_write`, which are always watched.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 50),
        inner(regex(pattern = r"^[a-z][a-z0-9_]*_(read|write)$"), length(max = 100))
    )]
    pub sensitive_permissions: Vec<String>,
    /// How many standard deviations above the learned mean a minute must be. Default 6; 3 to 50.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 3, max = 50))]
    pub sigmas: Option<u32>,
    /// The fewest requests in one minute that can be a burst (tiny baselines). Default 20;
    /// 1 to 1000000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000000))]
    pub min_requests_per_minute: Option<u32>,
    /// How many times the learned mean a minute must be. Default 5; 2 to 1000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 2, max = 1000))]
    pub min_ratio: Option<u32>,
    /// How many times a time-of-day baseline may grow in one day (a slow ramp meant to teach the
    /// detector a burst is flagged once it outruns this). Default 2; 2 to 100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 2, max = 100))]
    pub max_daily_growth: Option<u32>,
    /// How long after the proxy starts nothing is flagged (the baseline is being learned), as a
    /// Go duration. Default `1h`; at least `30m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = GO_DURATION_PATTERN), length(max = 32))]
    #[x_kube(validation = duration_rule("30m", None, "warmUp must be at least 30m"))]
    pub warm_up: Option<String>,
    /// With `Throttle`: how long requests of the permission are answered with 429 after the last
    /// request of a burst, as a Go duration. Default `5m`; at least `1s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = GO_DURATION_PATTERN), length(max = 32))]
    #[x_kube(validation = duration_rule("1s", None, "throttleFor must be at least 1s"))]
    pub throttle_for: Option<String>,
}

/// The anomaly policy as the egress proxy reads it from a file: the policy's fields, and the
/// StripeKeyPolicy (`NAMESPACE/NAME`) its Warning Events and incident rotation requests go to.
/// The operator publishes one (YAML) in the brokered Secret's `STRIPE_BROKER_ANOMALY_POLICY`
/// entry; `--anomaly-policy FILE` reads the same format (`policy` may be left out there and
/// given with `--policy`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct AnomalyPolicyFile {
    /// `NAMESPACE/NAME` of the StripeKeyPolicy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// The thresholds and the action.
    #[serde(flatten)]
    pub anomaly: AnomalyPolicy,
}

impl AnomalyPolicyFile {
    /// The published text: YAML, stable for equal input (so an unchanged policy never rewrites
    /// the Secret).
    pub fn to_yaml(&self) -> String {
        let body = serde_yaml::to_string(self).unwrap_or_default();
        format!(
            "# written by stripe-key-operator from spec.delivery.broker.anomaly; read by the egress-proxy sidecar\n{body}"
        )
    }
}

/// A refused anomaly configuration.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum AnomalyConfigError {
    /// A permission name that is not `<resource>_read` or `<resource>_write`.
    #[error(
        "sensitivePermissions: {0:?} is not a permission name (<resource>_read or <resource>_write)"
    )]
    BadPermission(String),
    /// A number out of its range.
    #[error("{field} must be between {min} and {max}, got {value}")]
    OutOfRange {
        /// The field.
        field: &'static str,
        /// Its value.
        value: u32,
        /// Smallest allowed.
        min: u32,
        /// Largest allowed.
        max: u32,
    },
    /// A duration that does not parse or is too short.
    #[error("{field}: {value:?} is not a Go duration of at least {min}")]
    BadDuration {
        /// The field.
        field: &'static str,
        /// Its value.
        value: String,
        /// The shortest allowed.
        min: &'static str,
    },
    /// `throttleFor` without the `Throttle` action (it would be ignored).
    #[error("throttleFor applies only to action Throttle")]
    ThrottleForWithoutThrottle,
    /// A window that does not divide a day into equal time-of-day buckets.
    #[error(
        "the window ({0:?}) must be whole seconds that divide a day, and a day must split into the buckets evenly"
    )]
    BadWindow(Duration),
}

fn range(
    field: &'static str,
    v: Option<u32>,
    def: u32,
    min: u32,
    max: u32,
) -> Result<u32, AnomalyConfigError> {
    let value = v.unwrap_or(def);
    if (min..=max).contains(&value) {
        Ok(value)
    } else {
        Err(AnomalyConfigError::OutOfRange {
            field,
            value,
            min,
            max,
        })
    }
}

fn duration(
    field: &'static str,
    v: Option<&str>,
    def: Duration,
    min: Duration,
    min_text: &'static str,
) -> Result<Duration, AnomalyConfigError> {
    let Some(text) = v else { return Ok(def) };
    let bad = || AnomalyConfigError::BadDuration {
        field,
        value: text.to_string(),
        min: min_text,
    };
    let d = crate::rotation::schedule::parse_duration(field, text).map_err(|_| bad())?;
    if d < min { Err(bad()) } else { Ok(d) }
}

impl AnomalyPolicy {
    /// The detector this policy describes, or what is wrong with it.
    pub fn detector_config(&self) -> Result<DetectorConfig, AnomalyConfigError> {
        if self.throttle_for.is_some() && self.action != AnomalyAction::Throttle {
            return Err(AnomalyConfigError::ThrottleForWithoutThrottle);
        }
        let mut sensitive: Vec<String> = DEFAULT_SENSITIVE_PERMISSIONS
            .iter()
            .map(|p| p.to_string())
            .collect();
        for p in &self.sensitive_permissions {
            if !valid_permission(p) {
                return Err(AnomalyConfigError::BadPermission(p.clone()));
            }
            if !sensitive.contains(p) {
                sensitive.push(p.clone());
            }
        }
        sensitive.sort();
        let d = DetectorConfig::default();
        Ok(DetectorConfig {
            sensitive,
            sigmas: f64::from(range("sigmas", self.sigmas, 6, 3, 50)?),
            min_count: u64::from(range(
                "minRequestsPerMinute",
                self.min_requests_per_minute,
                20,
                1,
                1_000_000,
            )?),
            min_ratio: f64::from(range("minRatio", self.min_ratio, 5, 2, 1000)?),
            max_daily_growth: f64::from(range("maxDailyGrowth", self.max_daily_growth, 2, 2, 100)?),
            warm_up: duration(
                "warmUp",
                self.warm_up.as_deref(),
                d.warm_up,
                Duration::from_secs(30 * 60),
                "30m",
            )?,
            throttle_for: match self.action {
                AnomalyAction::Throttle => Some(duration(
                    "throttleFor",
                    self.throttle_for.as_deref(),
                    Duration::from_secs(300),
                    Duration::from_secs(1),
                    "1s",
                )?),
                _ => None,
            },
            ..d
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Detector
// ---------------------------------------------------------------------------------------------

/// The detector's parameters (see [`AnomalyPolicy::detector_config`] for the user-facing form).
#[derive(Clone, Debug, PartialEq)]
pub struct DetectorConfig {
    /// The permissions watched; requests of others are ignored.
    pub sensitive: Vec<String>,
    /// Length of a counting window. Default one minute; must divide a day.
    pub window: Duration,
    /// Time-of-day buckets per day (UTC). Default 24 (hourly).
    pub buckets: u32,
    /// Weight of one window in its time-of-day bucket's mean and variance. Default 0.1 (a bucket
    /// remembers about the last ten to twenty of its windows: most of that hour yesterday).
    pub alpha: f64,
    /// Weight of one window in the permission-wide fallback baseline. Default 0.02.
    pub global_alpha: f64,
    /// Windows a baseline must have learned before it is trusted. Default 30.
    pub min_windows: u32,
    /// Nothing is flagged until this long after the first call. Default one hour.
    pub warm_up: Duration,
    /// Standard deviations above the mean. Default 6.
    pub sigmas: f64,
    /// Fewest requests per window that can be anomalous. Default 20.
    pub min_count: u64,
    /// Times the mean a window must be. Default 5.
    pub min_ratio: f64,
    /// Largest growth of a bucket's mean in one day. Default 2.
    pub max_daily_growth: f64,
    /// `Some`: an anomalous permission is throttled this long after its last request over the
    /// limit. `None`: never throttled.
    pub throttle_for: Option<Duration>,
}

impl Default for DetectorConfig {
    fn default() -> Self {
        Self {
            sensitive: DEFAULT_SENSITIVE_PERMISSIONS
                .iter()
                .map(|p| p.to_string())
                .collect(),
            window: Duration::from_secs(60),
            buckets: 24,
            alpha: 0.1,
            global_alpha: 0.02,
            min_windows: 30,
            warm_up: Duration::from_secs(3600),
            sigmas: 6.0,
            min_count: 20,
            min_ratio: 5.0,
            max_daily_growth: 2.0,
            throttle_for: None,
        }
    }
}

/// A burst: the first request of a window that pushed the count over the limit.
#[derive(Clone, Debug, PartialEq)]
pub struct Finding {
    /// The permission (shared with the detector: cloning it does not allocate).
    pub permission: Arc<str>,
    /// When the count crossed the limit.
    pub at: SystemTime,
    /// Requests in the window so far.
    pub count: u64,
    /// The largest count that was still normal for this window.
    pub limit: u64,
    /// The learned mean count per window.
    pub mean: f64,
    /// The window length.
    pub window: Duration,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} requests needing {} within {} (learned mean {:.1}, limit {})",
            self.count,
            self.permission,
            humantime::format_duration(self.window),
            self.mean,
            self.limit
        )
    }
}

/// What the proxy does with one request.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Observation {
    /// Set on the request that made its window anomalous (once per window and permission):
    /// hand it to a [`Responder`] (off the request path).
    pub finding: Option<Finding>,
    /// Answer locally with [`throttle_response`] instead of forwarding.
    pub throttled: bool,
}

/// A learned baseline, for inspection.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Baseline {
    /// Mean count per window.
    pub mean: f64,
    /// Standard deviation (before the Poisson floor).
    pub sd: f64,
    /// Windows learned.
    pub windows: u32,
}

/// Index of a watched permission (see [`Detector::slot`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotId(usize);

#[derive(Clone, Copy, Debug, Default)]
struct Stats {
    mean: f64,
    var: f64,
    n: u32,
    /// The day the anchor was taken, and the mean and variance then (growth cap).
    anchor: Option<(u64, f64, f64)>,
}

#[derive(Debug)]
struct Slot {
    permission: Arc<str>,
    /// Index of the open window (`None` before the first call).
    window: Option<u64>,
    count: u64,
    limit: u64,
    mean: f64,
    flagged: bool,
    /// Seconds since the epoch (fractional) until which requests are throttled.
    throttled_until: f64,
    global: Stats,
    buckets: Box<[Stats]>,
}

/// Per-permission rate baselines; see the module documentation.
#[derive(Debug)]
pub struct Detector {
    config: DetectorConfig,
    window_secs: u64,
    windows_per_day: u64,
    /// Index of the first window ever seen (warm-up starts here).
    origin: Option<u64>,
    slots: Vec<Slot>,
}

fn secs(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

impl Detector {
    /// A detector for `config`, or an error if its window does not divide a day into buckets.
    pub fn new(config: DetectorConfig) -> Result<Self, AnomalyConfigError> {
        let window_secs = config.window.as_secs();
        let ok = config.window.subsec_nanos() == 0
            && window_secs > 0
            && DAY_SECS.is_multiple_of(window_secs)
            && config.buckets > 0
            && (DAY_SECS / window_secs).is_multiple_of(u64::from(config.buckets));
        if !ok {
            return Err(AnomalyConfigError::BadWindow(config.window));
        }
        let mut names = config.sensitive.clone();
        names.sort();
        names.dedup();
        let slots = names
            .into_iter()
            .map(|p| Slot {
                permission: Arc::from(p.as_str()),
                window: None,
                count: 0,
                limit: u64::MAX,
                mean: 0.0,
                flagged: false,
                throttled_until: f64::MIN,
                global: Stats::default(),
                buckets: vec![Stats::default(); config.buckets as usize].into_boxed_slice(),
            })
            .collect();
        Ok(Self {
            windows_per_day: DAY_SECS / window_secs,
            window_secs,
            origin: None,
            slots,
            config,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &DetectorConfig {
        &self.config
    }

    /// This detector under a new `config` (a changed policy), keeping what it learned: the
    /// warm-up origin and the baselines of the permissions still watched, whose open window
    /// gets the new limit. A newly watched permission starts learning at `now` (it is never
    /// flagged before it has a baseline). Throttling ends when the new policy does not
    /// throttle. A config with another window or bucket count starts afresh.
    pub fn reconfigure(
        self,
        config: DetectorConfig,
        now: SystemTime,
    ) -> Result<Detector, AnomalyConfigError> {
        let mut next = Detector::new(config)?;
        if next.window_secs != self.window_secs || next.config.buckets != self.config.buckets {
            return Ok(next);
        }
        next.origin = self.origin;
        let throttles = next.config.throttle_for.is_some();
        let mut kept = vec![false; next.slots.len()];
        for mut slot in self.slots {
            let Some(SlotId(i)) = next.slot(&slot.permission) else {
                continue;
            };
            if !throttles {
                slot.throttled_until = f64::MIN;
            }
            let window = slot.window;
            let (count, flagged) = (slot.count, slot.flagged);
            next.slots[i] = slot;
            kept[i] = true;
            if let Some(w) = window {
                next.open(i, w);
                next.slots[i].count = count;
                next.slots[i].flagged = flagged;
            }
        }
        if next.origin.is_some() {
            let w = next.window_of(now);
            for (i, kept) in kept.into_iter().enumerate() {
                if !kept {
                    next.open(i, w);
                }
            }
        }
        Ok(next)
    }

    /// The slot of a watched permission (resolve once per route; `None`: not watched).
    pub fn slot(&self, permission: &str) -> Option<SlotId> {
        self.slots
            .iter()
            .position(|s| &*s.permission == permission)
            .map(SlotId)
    }

    /// Counts one request needing `permission` at `at`. Unwatched permissions cost one short
    /// scan and return the default (nothing flagged, not throttled).
    pub fn observe(&mut self, permission: &str, at: SystemTime) -> Observation {
        match self.slot(permission) {
            Some(slot) => self.observe_slot(slot, at),
            None => Observation::default(),
        }
    }

    /// [`Detector::observe`] for a resolved slot.
    pub fn observe_slot(&mut self, slot: SlotId, at: SystemTime) -> Observation {
        let w = self.window_of(at);
        self.advance(slot.0, w);
        let throttle_for = self.config.throttle_for;
        let window = self.config.window;
        let now = secs(at);
        let s = &mut self.slots[slot.0];
        s.count += 1;
        let mut finding = None;
        if s.count > s.limit {
            if let Some(d) = throttle_for {
                s.throttled_until = s.throttled_until.max(now + d.as_secs_f64());
            }
            if !s.flagged {
                s.flagged = true;
                finding = Some(Finding {
                    permission: s.permission.clone(),
                    at,
                    count: s.count,
                    limit: s.limit,
                    mean: s.mean,
                    window,
                });
            }
        }
        Observation {
            finding,
            throttled: now < s.throttled_until,
        }
    }

    /// Closes the windows that ended before `now` for every permission (learning quiet windows
    /// too). Call it every few seconds; requests also close windows as they arrive.
    pub fn tick(&mut self, now: SystemTime) {
        let w = self.window_of(now);
        for i in 0..self.slots.len() {
            self.advance(i, w);
        }
    }

    /// Whether requests needing `permission` are throttled at `now`.
    pub fn is_throttled(&self, permission: &str, now: SystemTime) -> bool {
        self.throttle_remaining(permission, now).is_some()
    }

    /// How long requests needing `permission` stay throttled after `now` (`None`: not
    /// throttled), for `Retry-After`.
    pub fn throttle_remaining(&self, permission: &str, now: SystemTime) -> Option<Duration> {
        let s = &self.slots[self.slot(permission)?.0];
        let left = s.throttled_until - secs(now);
        (left > 0.0).then(|| Duration::from_secs_f64(left))
    }

    /// The baseline that applies to the window of `at` (its time-of-day bucket's if that is
    /// trusted, else the permission-wide one), or `None` for an unwatched permission.
    pub fn baseline(&self, permission: &str, at: SystemTime) -> Option<Baseline> {
        let s = &self.slots[self.slot(permission)?.0];
        let w = secs(at) as u64 / self.window_secs;
        let b = &s.buckets[self.bucket_of(w)];
        let st = if b.n >= self.config.min_windows {
            b
        } else {
            &s.global
        };
        Some(Baseline {
            mean: st.mean,
            sd: st.var.max(0.0).sqrt(),
            windows: st.n,
        })
    }

    /// The limit of the open window of `permission` (the largest count that is still normal;
    /// `u64::MAX` during the warm-up).
    pub fn current_limit(&self, permission: &str) -> Option<u64> {
        Some(self.slots[self.slot(permission)?.0].limit)
    }

    fn window_of(&self, at: SystemTime) -> u64 {
        at.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() / self.window_secs
    }

    fn bucket_of(&self, w: u64) -> usize {
        let per_bucket = self.windows_per_day / u64::from(self.config.buckets);
        ((w % self.windows_per_day) / per_bucket) as usize
    }

    /// Moves slot `i` to window `w`, learning every window that closed on the way.
    fn advance(&mut self, i: usize, w: u64) {
        let origin = *self.origin.get_or_insert(w);
        let current = match self.slots[i].window {
            Some(c) => c,
            None => {
                // Every permission is watched from the first call on: a never-used one learns
                // that it is quiet.
                let start = origin.min(w);
                self.open(i, start);
                start
            }
        };
        if w <= current {
            return;
        }
        let (count, flagged) = (self.slots[i].count, self.slots[i].flagged);
        if !flagged {
            self.learn(i, current, count as f64);
        }
        let first_quiet = (current + 1).max(w.saturating_sub(MAX_GAP_WINDOWS));
        for q in first_quiet..w {
            self.learn(i, q, 0.0);
        }
        self.open(i, w);
    }

    fn learn(&mut self, i: usize, w: u64, x: f64) {
        let day = w / self.windows_per_day;
        let bucket = self.bucket_of(w);
        let c = &self.config;
        let floor = c.min_count as f64 / c.min_ratio;
        let (alpha, galpha, min_windows, growth) =
            (c.alpha, c.global_alpha, c.min_windows, c.max_daily_growth);
        let s = &mut self.slots[i];
        update(
            &mut s.buckets[bucket],
            x,
            alpha,
            day,
            min_windows,
            Some((growth, floor)),
        );
        update(&mut s.global, x, galpha, day, min_windows, None);
    }

    fn open(&mut self, i: usize, w: u64) {
        let c = &self.config;
        let warm = self
            .origin
            .is_some_and(|o| (w.saturating_sub(o)) * self.window_secs >= c.warm_up.as_secs());
        let bucket = self.bucket_of(w);
        let s = &self.slots[i];
        let b = &s.buckets[bucket];
        let st = if b.n >= c.min_windows {
            Some(b)
        } else if s.global.n >= c.min_windows {
            Some(&s.global)
        } else {
            None
        };
        let (limit, mean) = match st {
            Some(st) if warm => {
                let m = st.mean.max(0.0);
                let sd = st.var.max(m).sqrt();
                let l = (m + c.sigmas * sd)
                    .max(c.min_ratio * m)
                    .max(c.min_count.saturating_sub(1) as f64);
                (l.floor() as u64, m)
            }
            Some(st) => (u64::MAX, st.mean),
            None => (u64::MAX, 0.0),
        };
        let s = &mut self.slots[i];
        s.window = Some(w);
        s.count = 0;
        s.flagged = false;
        s.limit = limit;
        s.mean = mean;
    }
}

/// One window's count `x` into `s` (exponentially weighted mean and variance); with `cap`
/// `(growth, floor)`, the mean may not exceed `growth ×` its value when the day began `+ floor`.
fn update(s: &mut Stats, x: f64, alpha: f64, day: u64, min_windows: u32, cap: Option<(f64, f64)>) {
    if s.n >= min_windows && s.anchor.is_none_or(|(d, _, _)| d != day) {
        s.anchor = Some((day, s.mean, s.var));
    }
    if s.n == 0 {
        s.mean = x;
        s.var = x;
    } else {
        let diff = x - s.mean;
        let incr = alpha * diff;
        s.mean += incr;
        s.var = (1.0 - alpha) * (s.var + diff * incr);
    }
    s.n = s.n.saturating_add(1);
    if let (Some((growth, floor)), Some((d, m0, v0))) = (cap, s.anchor)
        && d == day
    {
        let cap_mean = m0 * growth + floor;
        s.mean = s.mean.min(cap_mean);
        s.var = s.var.min(v0 * growth * growth + cap_mean);
    }
}

// ---------------------------------------------------------------------------------------------
// Throttle answer
// ---------------------------------------------------------------------------------------------

/// The body of the local `429` for a throttled permission: Stripe's error shape, code
/// `rate_limit`, so SDKs back off and retry as they do for Stripe's own limit.
pub fn throttle_body(permission: &str, retry_after: Duration) -> String {
    let secs = retry_after.as_secs_f64().ceil() as u64;
    serde_json::json!({"error": {
        "type": "invalid_request_error",
        "code": "rate_limit",
        "message": format!(
            "Request rate limit exceeded: the egress broker holds requests needing {permission} \
             for {secs} s after an unusual burst of them (anomaly detection). Retry later."
        ),
        "doc_url": "https://stripe.com/docs/rate-limits",
    }})
    .to_string()
}

/// The whole local `429` answer: [`throttle_body`], `Retry-After` in whole seconds (at least 1)
/// and `Stripe-Should-Retry: true`.
pub fn throttle_response(permission: &str, retry_after: Duration) -> http::Response<String> {
    let secs = (retry_after.as_secs_f64().ceil() as u64).max(1);
    http::Response::builder()
        .status(http::StatusCode::TOO_MANY_REQUESTS)
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(http::header::RETRY_AFTER, secs.to_string())
        .header("stripe-should-retry", "true")
        .body(throttle_body(permission, retry_after))
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// Metrics
// ---------------------------------------------------------------------------------------------

/// Labels of `stripe_key_operator_egress_anomalies_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AnomalyLabels {
    /// The permission (one of the watched set: bounded).
    pub permission: String,
    /// The configured action (`record`, `throttle`, `incident_rotation`).
    pub action: String,
}

/// Label of throttled requests.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PermissionLabels {
    /// The permission.
    pub permission: String,
}

/// Label of failed actions.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ActionLabels {
    /// `event` or `incident_rotation`.
    pub action: String,
}

/// The anomaly metrics, registered under the egress proxy's prefix
/// `stripe_key_operator_egress`.
#[derive(Clone, Debug, Default)]
pub struct AnomalyMetrics {
    /// `anomalies_total{permission,action}`: windows flagged.
    pub anomalies: Family<AnomalyLabels, Counter>,
    /// `throttled_requests_total{permission}`: requests answered locally with 429 (the proxy
    /// counts them).
    pub throttled: Family<PermissionLabels, Counter>,
    /// `anomaly_action_failures_total{action}`: Events or rotation requests that could not be
    /// recorded in Kubernetes.
    pub action_failures: Family<ActionLabels, Counter>,
}

impl AnomalyMetrics {
    /// Registers the metrics in `registry`, which carries the prefix `stripe_key_operator_egress`
    /// (see [`AnomalyMetrics::registry`]).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "anomalies",
            "Bursts of a sensitive permission far above its learned rate, by permission and configured action",
            self.anomalies.clone(),
        );
        registry.register(
            "throttled_requests",
            "Requests answered locally with 429 because their permission is throttled after a burst",
            self.throttled.clone(),
        );
        registry.register(
            "anomaly_action_failures",
            "Anomaly Events or incident rotation requests that could not be recorded in Kubernetes",
            self.action_failures.clone(),
        );
    }

    /// A registry with the egress prefix holding only these metrics.
    pub fn registry(&self) -> Registry {
        let mut r = Registry::with_prefix("stripe_key_operator_egress");
        self.register(&mut r);
        r
    }
}

// ---------------------------------------------------------------------------------------------
// Actions
// ---------------------------------------------------------------------------------------------

/// A side effect that failed (the message names the object, never a key).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ActionError(pub String);

/// The Kubernetes side effects of an anomaly, behind a trait so tests can record them.
#[async_trait]
pub trait ActionSink: Send + Sync {
    /// Records a Warning Event ([`ANOMALY_EVENT_REASON`]) on the policy for `finding`, naming
    /// `action`.
    async fn warn(&self, finding: &Finding, action: AnomalyAction) -> Result<(), ActionError>;
    /// Requests an incident rotation of the policy: a new `stripekeys.io/rotate` value with
    /// `stripekeys.io/rotate-reason: incident`, the same request a person makes.
    async fn request_incident_rotation(&self, finding: &Finding) -> Result<(), ActionError>;
}

/// A shared sink is a sink (the proxy holds `Arc<dyn ActionSink>`, tests keep a handle on it).
#[async_trait]
impl<T: ActionSink + ?Sized> ActionSink for Arc<T> {
    async fn warn(&self, finding: &Finding, action: AnomalyAction) -> Result<(), ActionError> {
        (**self).warn(finding, action).await
    }

    async fn request_incident_rotation(&self, finding: &Finding) -> Result<(), ActionError> {
        (**self).request_incident_rotation(finding).await
    }
}

/// What [`Responder::respond`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ActionTaken {
    /// The Warning Event was recorded.
    pub event: bool,
    /// An incident rotation was requested (false when not configured, or one was requested
    /// within the incident interval).
    pub incident_rotation: bool,
}

/// Carries out the configured action for each finding: the metric always, a Warning Event
/// always, and for `IncidentRotation` a rotation request at most once per `incident_interval`
/// (a burst that lasts an hour is one incident, not sixty). Throttling itself happens in the
/// [`Detector`] (configured with `throttle_for`).
pub struct Responder<S> {
    sink: S,
    action: AnomalyAction,
    metrics: AnomalyMetrics,
    incident_interval: Duration,
    last_incident: Mutex<Option<SystemTime>>,
}

impl<S> fmt::Debug for Responder<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Responder")
            .field("action", &self.action)
            .field("incident_interval", &self.incident_interval)
            .finish_non_exhaustive()
    }
}

/// The default shortest time between two incident rotations requested by one proxy.
pub const DEFAULT_INCIDENT_INTERVAL: Duration = Duration::from_secs(3600);

impl<S: ActionSink> Responder<S> {
    /// A responder taking `action` through `sink`.
    pub fn new(sink: S, action: AnomalyAction, metrics: AnomalyMetrics) -> Self {
        Self {
            sink,
            action,
            metrics,
            incident_interval: DEFAULT_INCIDENT_INTERVAL,
            last_incident: Mutex::new(None),
        }
    }

    /// Sets the shortest time between two incident rotation requests.
    pub fn with_incident_interval(mut self, interval: Duration) -> Self {
        self.incident_interval = interval;
        self
    }

    /// The sink.
    pub fn sink(&self) -> &S {
        &self.sink
    }

    /// The configured action.
    pub fn action(&self) -> AnomalyAction {
        self.action
    }

    /// Counts `finding` and carries out the action. A failed side effect is counted in
    /// `anomaly_action_failures_total`, logged (names only) and returned; the rest still runs.
    pub async fn respond(&self, finding: &Finding) -> Result<ActionTaken, ActionError> {
        self.metrics
            .anomalies
            .get_or_create(&AnomalyLabels {
                permission: finding.permission.to_string(),
                action: self.action.as_str().to_string(),
            })
            .inc();
        tracing::warn!(
            permission = %finding.permission,
            count = finding.count,
            limit = finding.limit,
            mean = finding.mean,
            action = self.action.as_str(),
            "egress anomaly"
        );
        let mut taken = ActionTaken {
            event: false,
            incident_rotation: false,
        };
        let mut first_error = None;
        let due = self.action == AnomalyAction::IncidentRotation && {
            let mut last = self.last_incident.lock().unwrap_or_else(|e| e.into_inner());
            let due = last.is_none_or(|t| {
                finding.at.duration_since(t).unwrap_or_default() >= self.incident_interval
            });
            if due {
                *last = Some(finding.at);
            }
            due
        };
        if due {
            match self.sink.request_incident_rotation(finding).await {
                Ok(()) => taken.incident_rotation = true,
                Err(e) => {
                    // Let the next finding try again.
                    *self.last_incident.lock().unwrap_or_else(|e| e.into_inner()) = None;
                    self.fail("incident_rotation", &e);
                    first_error = Some(e);
                }
            }
        }
        match self.sink.warn(finding, self.action).await {
            Ok(()) => taken.event = true,
            Err(e) => {
                self.fail("event", &e);
                first_error.get_or_insert(e);
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(taken),
        }
    }

    fn fail(&self, action: &str, e: &ActionError) {
        self.metrics
            .action_failures
            .get_or_create(&ActionLabels {
                action: action.to_string(),
            })
            .inc();
        tracing::error!(action, error = %e, "egress anomaly action failed");
    }
}

/// The Event note of a finding.
pub fn event_note(finding: &Finding, action: AnomalyAction) -> String {
    let then = match action {
        AnomalyAction::Record => "recorded only (action Record)".to_string(),
        AnomalyAction::Throttle => format!(
            "requests needing {} are answered locally with 429 rate_limit for a cool-down (action Throttle)",
            finding.permission
        ),
        AnomalyAction::IncidentRotation => {
            "an incident rotation was requested: every key handed out so far is expired at once (action IncidentRotation)".to_string()
        }
    };
    format!("egress anomaly: {finding}; {then}")
}

/// One recorded side effect of [`RecordingSink`].
#[derive(Clone, Debug, PartialEq)]
pub enum RecordedAction {
    /// A Warning Event with this note.
    Event {
        /// The permission.
        permission: String,
        /// The action named.
        action: AnomalyAction,
        /// The note.
        note: String,
    },
    /// An incident rotation request.
    IncidentRotation {
        /// The permission whose burst caused it.
        permission: String,
    },
}

/// An [`ActionSink`] that records what it was asked to do (tests, dry runs).
#[derive(Clone, Debug, Default)]
pub struct RecordingSink {
    actions: Arc<Mutex<Vec<RecordedAction>>>,
}

impl RecordingSink {
    /// Everything recorded so far.
    pub fn actions(&self) -> Vec<RecordedAction> {
        self.actions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

#[async_trait]
impl ActionSink for RecordingSink {
    async fn warn(&self, finding: &Finding, action: AnomalyAction) -> Result<(), ActionError> {
        self.actions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(RecordedAction::Event {
                permission: finding.permission.to_string(),
                action,
                note: event_note(finding, action),
            });
        Ok(())
    }

    async fn request_incident_rotation(&self, finding: &Finding) -> Result<(), ActionError> {
        self.actions.lock().unwrap_or_else(|e| e.into_inner()).push(
            RecordedAction::IncidentRotation {
                permission: finding.permission.to_string(),
            },
        );
        Ok(())
    }
}

/// The [`ActionSink`] of a running proxy: Warning Events on the StripeKeyPolicy and the rotate
/// annotations on it.
///
/// RBAC of the sidecar's ServiceAccount, in the policy's namespace: `get` and `patch` on
/// `stripekeypolicies.stripekeys.io` restricted by `resourceNames: [<policy>]`, and `create`,
/// `patch` on `events.k8s.io` `events` (patch: repeated Events are counted in a series).
pub struct KubeActionSink {
    namespace: String,
    name: String,
    reporter: kube::runtime::events::Reporter,
    /// The client and the Event recorder, made on first use by [`KubeActionSink::connect_lazily`].
    conn: tokio::sync::OnceCell<(kube::Client, kube::runtime::events::Recorder)>,
}

impl fmt::Debug for KubeActionSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KubeActionSink")
            .field("namespace", &self.namespace)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl KubeActionSink {
    /// A sink for the StripeKeyPolicy `namespace/name`.
    pub fn new(client: kube::Client, namespace: &str, name: &str) -> Self {
        let sink = Self::connect_lazily(namespace, name);
        let recorder = kube::runtime::events::Recorder::new(client.clone(), sink.reporter.clone());
        Self {
            conn: tokio::sync::OnceCell::new_with(Some((client, recorder))),
            ..sink
        }
    }

    /// A sink for the StripeKeyPolicy `namespace/name` that connects to the Kubernetes API
    /// (in the cluster, or `KUBECONFIG`) when it first has something to record, and again on
    /// the next anomaly when that failed: a broker that never sees an anomaly never builds a
    /// client.
    pub fn connect_lazily(namespace: &str, name: &str) -> Self {
        Self {
            namespace: namespace.to_string(),
            name: name.to_string(),
            reporter: kube::runtime::events::Reporter {
                controller: EGRESS_FIELD_MANAGER.into(),
                instance: std::env::var("POD_NAME").ok(),
            },
            conn: tokio::sync::OnceCell::new(),
        }
    }

    async fn conn(&self) -> Result<&(kube::Client, kube::runtime::events::Recorder), ActionError> {
        self.conn
            .get_or_try_init(|| async {
                let client = kube::Client::try_default().await.map_err(|e| {
                    ActionError(format!(
                        "connecting to the Kubernetes API for stripekeypolicy {:?} in namespace \
                         {:?} (the sidecar's ServiceAccount token): {e}",
                        self.name, self.namespace
                    ))
                })?;
                let recorder =
                    kube::runtime::events::Recorder::new(client.clone(), self.reporter.clone());
                Ok((client, recorder))
            })
            .await
    }

    async fn api(&self) -> Result<kube::Api<crate::api::StripeKeyPolicy>, ActionError> {
        let (client, _) = self.conn().await?;
        Ok(kube::Api::namespaced(client.clone(), &self.namespace))
    }

    fn error(&self, what: &str, e: &kube::Error) -> ActionError {
        ActionError(format!(
            "{what} on stripekeypolicy {:?} in namespace {:?}: {}",
            self.name,
            self.namespace,
            e.to_string()
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        ))
    }
}

#[async_trait]
impl ActionSink for KubeActionSink {
    async fn warn(&self, finding: &Finding, action: AnomalyAction) -> Result<(), ActionError> {
        use kube::Resource;
        use kube::runtime::events::{Event, EventType};
        let policy = self
            .api()
            .await?
            .get(&self.name)
            .await
            .map_err(|e| self.error("reading the policy for its Event", &e))?;
        let event = Event {
            type_: EventType::Warning,
            reason: ANOMALY_EVENT_REASON.into(),
            note: Some(event_note(finding, action)),
            action: match action {
                AnomalyAction::IncidentRotation => "RequestRotation".into(),
                AnomalyAction::Throttle => "Throttle".into(),
                AnomalyAction::Record => "Record".into(),
            },
            secondary: None,
        };
        let (_, recorder) = self.conn().await?;
        recorder
            .publish(&event, &policy.object_ref(&()))
            .await
            .map_err(|e| self.error("recording the anomaly Event", &e))
    }

    async fn request_incident_rotation(&self, finding: &Finding) -> Result<(), ActionError> {
        use crate::api::{ROTATE_ANNOTATION, ROTATE_REASON_ANNOTATION, ROTATE_REASON_INCIDENT};
        use crate::rotate_cli::ROTATE_NOTE_ANNOTATION;
        let value = chrono::DateTime::<chrono::Utc>::from(finding.at)
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let patch = serde_json::json!({"metadata": {"annotations": {
            ROTATE_ANNOTATION: value,
            ROTATE_REASON_ANNOTATION: ROTATE_REASON_INCIDENT,
            ROTATE_NOTE_ANNOTATION: format!("egress anomaly: {finding}"),
        }}});
        self.api()
            .await?
            .patch(
                &self.name,
                &kube::api::PatchParams {
                    field_manager: Some(EGRESS_FIELD_MANAGER.into()),
                    ..Default::default()
                },
                &kube::api::Patch::Merge(&patch),
            )
            .await
            .map(|_| ())
            .map_err(|e| self.error("requesting an incident rotation", &e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    /// A detector fed `per_minute` requests a minute from day 10 00:00 for `minutes`.
    fn steady(det: &mut Detector, start: u64, minutes: u64, per_minute: u64) {
        for m in 0..minutes {
            for r in 0..per_minute {
                det.observe(
                    "refund_write",
                    t(start + m * 60 + r * 60 / per_minute.max(1)),
                );
            }
        }
    }

    const DAY10: u64 = 10 * DAY_SECS;

    #[test]
    fn nothing_is_flagged_during_the_warm_up() {
        let mut det = Detector::new(DetectorConfig::default()).unwrap();
        let mut flagged = false;
        for r in 0..500 {
            flagged |= det
                .observe("refund_write", t(DAY10 + 120 + r / 10))
                .finding
                .is_some();
        }
        assert!(!flagged);
        assert_eq!(det.current_limit("refund_write"), Some(u64::MAX));
    }

    #[test]
    fn a_burst_crosses_the_limit_mid_window_once() {
        let mut det = Detector::new(DetectorConfig::default()).unwrap();
        steady(&mut det, DAY10, 120, 10);
        let start = DAY10 + 120 * 60;
        let limit = det.current_limit("refund_write").unwrap();
        assert!((20..=60).contains(&limit), "limit {limit}");
        let mut findings = Vec::new();
        for r in 0..200 {
            if let Some(f) = det
                .observe("refund_write", t(start) + Duration::from_millis(r * 250))
                .finding
            {
                findings.push(f);
            }
        }
        assert_eq!(findings.len(), 1, "one finding per window");
        assert_eq!(findings[0].count, limit + 1);
        assert!(findings[0].at < t(start + 30));
    }

    #[test]
    fn unwatched_permissions_are_ignored() {
        let mut det = Detector::new(DetectorConfig::default()).unwrap();
        assert_eq!(det.observe("charge_read", t(DAY10)), Observation::default());
        assert!(det.slot("charge_read").is_none());
        assert!(det.slot("payout_write").is_some());
    }

    #[test]
    fn a_quiet_permission_learns_zero_and_flags_its_first_burst_at_the_minimum() {
        let mut det = Detector::new(DetectorConfig::default()).unwrap();
        det.tick(t(DAY10));
        det.tick(t(DAY10 + 3 * 3600));
        let limit = det.current_limit("payout_write").unwrap();
        assert_eq!(limit, 19, "min_count - 1 on a zero baseline");
    }

    #[test]
    fn the_growth_cap_bounds_a_buckets_mean_per_day() {
        let mut s = Stats::default();
        for _ in 0..40 {
            update(&mut s, 10.0, 0.1, 0, 30, Some((2.0, 4.0)));
        }
        // next day: a flood of large but unflagged windows
        for _ in 0..200 {
            update(&mut s, 1000.0, 0.1, 1, 30, Some((2.0, 4.0)));
        }
        assert!(s.mean <= 24.0 + 1e-9, "mean {}", s.mean);
    }

    #[test]
    fn policies_validate_and_default() {
        let c = AnomalyPolicy::default().detector_config().unwrap();
        assert_eq!(c.sensitive.len(), 4);
        assert_eq!(c.throttle_for, None);
        let p = AnomalyPolicy {
            action: AnomalyAction::Throttle,
            sensitive_permissions: vec!["invoice_write".into(), "refund_write".into()],
            ..Default::default()
        };
        let c = p.detector_config().unwrap();
        assert_eq!(c.sensitive.len(), 5);
        assert_eq!(c.throttle_for, Some(Duration::from_secs(300)));
        let bad = AnomalyPolicy {
            sensitive_permissions: vec!["Refunds".into()],
            ..Default::default()
        };
        assert!(matches!(
            bad.detector_config(),
            Err(AnomalyConfigError::BadPermission(_))
        ));
        let bad = AnomalyPolicy {
            sigmas: Some(1),
            ..Default::default()
        };
        assert!(
            bad.detector_config()
                .unwrap_err()
                .to_string()
                .contains("sigmas")
        );
        let bad = AnomalyPolicy {
            warm_up: Some("5m".into()),
            ..Default::default()
        };
        assert!(bad.detector_config().is_err());
        let p: AnomalyPolicy = serde_yaml::from_str(
            "action: IncidentRotation\nsensitivePermissions: [invoice_write]\nsigmas: 8\n",
        )
        .unwrap();
        assert_eq!(p.action, AnomalyAction::IncidentRotation);
        assert_eq!(p.sigmas, Some(8));
        assert!(
            Detector::new(DetectorConfig {
                window: Duration::from_secs(7),
                ..Default::default()
            })
            .is_err()
        );
    }

    #[test]
    fn a_changed_policy_keeps_the_learned_baselines_and_never_flags_a_newly_watched_permission() {
        let mut det = Detector::new(DetectorConfig {
            throttle_for: Some(Duration::from_secs(60)),
            ..Default::default()
        })
        .unwrap();
        steady(&mut det, DAY10, 120, 10);
        let start = DAY10 + 120 * 60;
        for r in 0..100 {
            det.observe("refund_write", t(start) + Duration::from_millis(r * 250));
        }
        assert!(det.is_throttled("refund_write", t(start + 30)));
        let learned = det.baseline("refund_write", t(start)).unwrap();
        // stricter sigmas, a new watched permission, and no throttling any more
        let config = AnomalyPolicy {
            sigmas: Some(3),
            sensitive_permissions: vec!["invoice_write".into()],
            ..Default::default()
        }
        .detector_config()
        .unwrap();
        let mut det = det.reconfigure(config, t(start + 31)).unwrap();
        assert_eq!(det.baseline("refund_write", t(start)).unwrap(), learned);
        assert!(
            !det.is_throttled("refund_write", t(start + 31)),
            "Record does not throttle"
        );
        let limit = det.current_limit("refund_write").unwrap();
        assert!(limit < u64::MAX, "no new warm-up: {limit}");
        // the open window keeps its count: one more request is still over the (new) limit, but
        // that window was already reported
        assert!(det.observe("refund_write", t(start + 32)).finding.is_none());
        // the newly watched permission learns from now on and is not flagged on its first burst
        for r in 0..200 {
            assert!(
                det.observe(
                    "invoice_write",
                    t(start + 40) + Duration::from_millis(r * 100)
                )
                .finding
                .is_none()
            );
        }
        assert_eq!(det.current_limit("invoice_write"), Some(u64::MAX));
    }

    #[test]
    fn throttle_for_needs_the_throttle_action_and_files_name_their_policy() {
        let p = AnomalyPolicy {
            throttle_for: Some("10m".into()),
            ..Default::default()
        };
        assert_eq!(
            p.detector_config().unwrap_err(),
            AnomalyConfigError::ThrottleForWithoutThrottle
        );
        let file = AnomalyPolicyFile {
            policy: Some("shop/checkout".into()),
            anomaly: AnomalyPolicy {
                action: AnomalyAction::Throttle,
                sigmas: Some(8),
                throttle_for: Some("10m".into()),
                ..Default::default()
            },
        };
        let text = file.to_yaml();
        assert_eq!(text, file.to_yaml(), "stable");
        assert!(text.contains("policy: shop/checkout"), "{text}");
        let back: AnomalyPolicyFile = serde_yaml::from_str(&text).unwrap();
        assert_eq!(back, file);
        // the flag's file format is the same, policy optional
        let bare: AnomalyPolicyFile = serde_yaml::from_str("action: Record\n").unwrap();
        assert_eq!(bare.policy, None);
    }

    #[test]
    fn the_throttle_answer_is_a_stripe_rate_limit_error() {
        let r = throttle_response("refund_write", Duration::from_millis(1500));
        assert_eq!(r.status(), 429);
        assert_eq!(r.headers()["retry-after"], "2");
        let body: serde_json::Value = serde_json::from_str(r.body()).unwrap();
        assert_eq!(body["error"]["code"], "rate_limit");
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("refund_write")
        );
    }

    #[test]
    fn the_anomaly_counter_has_its_documented_name() {
        let m = AnomalyMetrics::default();
        m.anomalies
            .get_or_create(&AnomalyLabels {
                permission: "refund_write".into(),
                action: "throttle".into(),
            })
            .inc();
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &m.registry()).unwrap();
        assert!(
            out.contains(
                "stripe_key_operator_egress_anomalies_total{permission=\"refund_write\",action=\"throttle\"} 1"
            ),
            "{out}"
        );
    }
}
