//! The simulator's in-memory world: accounts, keys, endpoints, idempotency records, the clock,
//! faults and the request log. Pure and synchronous: the HTTP layer locks it and calls in.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::stripe::config::Mode;
use crate::stripe::ratelimit::TokenBucket;

/// Random alphanumeric string of `n` characters.
pub(crate) fn random_alnum(n: usize) -> String {
    rand::rng()
        .sample_iter(&rand::distr::Alphanumeric)
        .take(n)
        .map(char::from)
        .collect()
}

/// How the simulator tells time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum ClockMode {
    /// Wall-clock time plus whatever was added with `advance_clock`.
    Real,
    /// Frozen at `start`; moves only when advanced.
    Manual {
        /// The starting instant.
        start: DateTime<Utc>,
    },
}

#[derive(Debug, Clone)]
pub(crate) struct Clock {
    mode: ClockMode,
    offset: chrono::Duration,
}

impl Clock {
    pub(crate) fn new(mode: ClockMode) -> Self {
        Self {
            mode,
            offset: chrono::Duration::zero(),
        }
    }

    pub(crate) fn now(&self) -> DateTime<Utc> {
        let base = match self.mode {
            ClockMode::Real => Utc::now(),
            ClockMode::Manual { start } => start,
        };
        base + self.offset
    }

    pub(crate) fn advance(&mut self, by: Duration) {
        let by = chrono::Duration::from_std(by).unwrap_or(chrono::Duration::MAX);
        self.offset = self.offset.checked_add(&by).unwrap_or(self.offset);
    }
}

/// A fault the simulator injects into matching API requests (never into `/_sim/` calls).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum FaultKind {
    /// Answer 429 `rate_limit` before doing anything (nothing is committed).
    RateLimited {
        /// Send `Retry-After: <secs>`.
        #[serde(default)]
        retry_after_secs: Option<u64>,
    },
    /// Answer 500 `api_error`. With `saved: false` nothing executes (a retry with the same
    /// idempotency key runs normally); with `saved: true` the 500 is stored under the
    /// idempotency key, so replays get the same 500 (as Stripe does).
    ServerError {
        /// Store the 500 as the idempotent result.
        #[serde(default)]
        saved: bool,
        /// Send `Stripe-Should-Retry: true|false`.
        #[serde(default)]
        should_retry: Option<bool>,
    },
    /// Delay the request, then process it normally.
    Latency {
        /// Added delay in milliseconds.
        millis: u64,
    },
    /// Hold the request without answering for the simulator's hang duration, then close the
    /// connection. Nothing is committed. Use with a client timeout shorter than the hang.
    Hang,
    /// Process and commit the request (and save its idempotent result), then close the
    /// connection without answering.
    DropAfterCommit,
}

impl FaultKind {
    pub(crate) fn label(&self) -> &'static str {
        match self {
            FaultKind::RateLimited { .. } => "rate_limited",
            FaultKind::ServerError { saved: false, .. } => "server_error",
            FaultKind::ServerError { saved: true, .. } => "server_error_saved",
            FaultKind::Latency { .. } => "latency",
            FaultKind::Hang => "hang",
            FaultKind::DropAfterCommit => "drop_after_commit",
        }
    }
}

/// Which requests get a fault, and how many.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FaultSpec {
    /// The fault.
    pub fault: FaultKind,
    /// Fault only the next `count` matching requests (then the rule disappears). `None`: no
    /// limit.
    #[serde(default)]
    pub count: Option<u32>,
    /// Fault each matching request with this probability (0.0–1.0). `None`: every one.
    #[serde(default)]
    pub ratio: Option<f64>,
    /// Only requests with this HTTP method (e.g. `POST`).
    #[serde(default)]
    pub method: Option<String>,
    /// Only requests whose path starts with this (e.g. `/v2/iam/api_keys`).
    #[serde(default)]
    pub path_prefix: Option<String>,
}

impl FaultSpec {
    /// A fault for the next `count` API requests.
    pub fn next(count: u32, fault: FaultKind) -> Self {
        Self {
            fault,
            count: Some(count),
            ratio: None,
            method: None,
            path_prefix: None,
        }
    }

    /// A fault for a random `ratio` of API requests until cleared.
    pub fn ratio(ratio: f64, fault: FaultKind) -> Self {
        Self {
            fault,
            count: None,
            ratio: Some(ratio),
            method: None,
            path_prefix: None,
        }
    }

    /// Restricts the fault to one method.
    pub fn for_method(mut self, method: &str) -> Self {
        self.method = Some(method.to_ascii_uppercase());
        self
    }

    /// Restricts the fault to paths starting with `prefix`.
    pub fn for_path_prefix(mut self, prefix: &str) -> Self {
        self.path_prefix = Some(prefix.to_owned());
        self
    }

    fn matches(&self, method: &str, path: &str) -> bool {
        self.method
            .as_deref()
            .is_none_or(|m| m.eq_ignore_ascii_case(method))
            && self
                .path_prefix
                .as_deref()
                .is_none_or(|p| path.starts_with(p))
    }
}

/// An injected fault rule with its id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FaultRule {
    /// Id for reference.
    pub id: u64,
    /// The rule.
    #[serde(flatten)]
    pub spec: FaultSpec,
}

/// One request the simulator answered (or dropped).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestLogEntry {
    /// `Request-Id` sent back.
    pub request_id: String,
    /// HTTP method.
    pub method: String,
    /// Path without query.
    pub path: String,
    /// The query string (empty when none).
    #[serde(default)]
    pub query: String,
    /// Account the request acted on, when authenticated.
    pub account: Option<String>,
    /// `Idempotency-Key` header.
    pub idempotency_key: Option<String>,
    /// Status answered; `None` when the connection was dropped.
    pub status: Option<u16>,
    /// Injected fault, if any.
    pub fault: Option<String>,
    /// The answer was an idempotent replay.
    pub replayed: bool,
    /// Milliseconds since the simulator started (monotonic), when the request arrived.
    pub received_ms: u64,
    /// Simulator clock when the request arrived.
    pub at: DateTime<Utc>,
}

/// An API key as the control API shows it (the token is never shown, only its fingerprint).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyState {
    /// Key id.
    pub id: String,
    /// `secret_key` or `publishable_key`.
    pub key_type: String,
    /// Name.
    pub name: Option<String>,
    /// Note.
    pub note: Option<String>,
    /// `active` or `expired` at the simulator's now.
    pub status: String,
    /// Permissions held.
    pub permissions: Vec<String>,
    /// Connect permissions held.
    pub connect_permissions: Vec<String>,
    /// Creation time.
    pub created: DateTime<Utc>,
    /// Expiry.
    pub expires_at: Option<DateTime<Utc>>,
    /// Last use on the scope-enforcing surface, as `last_used` shows it now (after the
    /// reporting lag).
    pub last_used: Option<DateTime<Utc>>,
    /// The key this one was rotated into.
    pub rotated_to: Option<String>,
    /// Fingerprint of the token (first 12 hex of SHA-256).
    pub token_fingerprint: String,
}

/// A webhook endpoint as the control API shows it (secrets as fingerprints only).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EndpointState {
    /// `we_...`.
    pub id: String,
    /// Receiver URL.
    pub url: String,
    /// Enabled events.
    pub enabled_events: Vec<String>,
    /// API version.
    pub api_version: Option<String>,
    /// Description.
    pub description: Option<String>,
    /// Metadata.
    pub metadata: BTreeMap<String, String>,
    /// `enabled` or `disabled`.
    pub status: String,
    /// Creation, unix seconds.
    pub created: i64,
    /// Fingerprints of the secrets valid now (one normally, two during a roll).
    pub valid_secret_fingerprints: Vec<String>,
}

/// One account's view in [`SimState`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AccountState {
    /// `acct_...`.
    pub id: String,
    /// Test or live.
    pub mode: Mode,
    /// Every key ever minted, oldest first.
    pub api_keys: Vec<KeyState>,
    /// Existing webhook endpoints, oldest first.
    pub webhook_endpoints: Vec<EndpointState>,
}

/// A snapshot of the simulator (control API `GET /_sim/state`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SimState {
    /// The simulator's clock.
    pub now: DateTime<Utc>,
    /// Accounts.
    pub accounts: Vec<AccountState>,
}

impl SimState {
    /// The account with this id.
    pub fn account(&self, id: &str) -> Option<&AccountState> {
        self.accounts.iter().find(|a| a.id == id)
    }
}

#[derive(Debug, Clone)]
pub(crate) struct KeyRecord {
    pub id: String,
    pub key_type: String,
    pub name: Option<String>,
    pub note: Option<String>,
    pub permissions: Vec<String>,
    pub connect_permissions: Vec<String>,
    pub token: String,
    pub created: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    /// The latest use already visible in `last_used`.
    pub last_used: Option<DateTime<Utc>>,
    /// Uses not visible yet (the reporting lag), oldest first.
    pub unreported_uses: Vec<DateTime<Utc>>,
    pub rotated_to: Option<String>,
    /// Created by a person in the (simulated) Dashboard: not managed by the app.
    pub dashboard_created: bool,
}

/// Pending uses kept per key at most (older pending ones are dropped: a later use exists).
const MAX_UNREPORTED_USES: usize = 1024;

impl KeyRecord {
    pub(crate) fn is_expired(&self, now: DateTime<Utc>) -> bool {
        self.expires_at.is_some_and(|e| e <= now)
    }

    /// `last_used` as Stripe shows it at `now`: a use at `t` shows from `t + lag` on.
    pub(crate) fn reported_last_used(
        &self,
        now: DateTime<Utc>,
        lag: chrono::Duration,
    ) -> Option<DateTime<Utc>> {
        self.unreported_uses
            .iter()
            .copied()
            .filter(|t| *t + lag <= now)
            .chain(self.last_used)
            .max()
    }

    /// Records a use at `now`, visible from `now + lag` on.
    pub(crate) fn record_use(&mut self, now: DateTime<Utc>, lag: chrono::Duration) {
        self.last_used = self.reported_last_used(now, lag);
        self.unreported_uses.retain(|t| *t + lag > now);
        if self.unreported_uses.last() != Some(&now) {
            self.unreported_uses.push(now);
        }
        if self.unreported_uses.len() > MAX_UNREPORTED_USES {
            self.unreported_uses.remove(0);
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct EndpointSecret {
    pub secret: String,
    pub expires_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone)]
pub(crate) struct EndpointRecord {
    pub id: String,
    pub url: String,
    pub enabled_events: Vec<String>,
    pub api_version: Option<String>,
    pub description: Option<String>,
    pub metadata: BTreeMap<String, String>,
    pub disabled: bool,
    pub created: i64,
    pub secrets: Vec<EndpointSecret>,
}

impl EndpointRecord {
    pub(crate) fn valid_secrets(&self, now: DateTime<Utc>) -> Vec<&str> {
        self.secrets
            .iter()
            .filter(|s| s.expires_at.is_none_or(|e| e > now))
            .map(|s| s.secret.as_str())
            .collect()
    }
}

/// How long an idempotency key is kept (Stripe: "at least 24 hours"); after that the same key
/// executes the request again.
pub const IDEMPOTENCY_WINDOW: chrono::TimeDelta = chrono::TimeDelta::hours(24);

#[derive(Debug, Clone)]
pub(crate) struct SavedResponse {
    pub fingerprint: [u8; 32],
    pub status: u16,
    pub body: Vec<u8>,
    pub request_id: String,
    /// When it was saved (simulator clock): it is forgotten after [`IDEMPOTENCY_WINDOW`].
    pub saved_at: chrono::DateTime<chrono::Utc>,
}

#[derive(Debug)]
pub(crate) struct Account {
    pub id: String,
    pub mode: Mode,
    pub keys: Vec<KeyRecord>,
    pub endpoints: Vec<EndpointRecord>,
    pub idempotency: HashMap<String, SavedResponse>,
    pub bucket: TokenBucket,
    /// Events created for this account (what `GET /v1/events/{id}` serves).
    pub events: EventStore,
    /// The account's activity log (`GET /v2/iam/activity_logs`).
    pub activity: super::activity::ActivityLog,
}

/// Most events kept per account; the oldest is forgotten first (Stripe keeps 30 days).
pub(crate) const MAX_EVENTS_PER_ACCOUNT: usize = 10_000;

/// The events an account created, bounded by [`MAX_EVENTS_PER_ACCOUNT`].
#[derive(Debug, Default)]
pub(crate) struct EventStore {
    by_id: HashMap<String, serde_json::Value>,
    order: std::collections::VecDeque<String>,
}

impl EventStore {
    pub(crate) fn insert(&mut self, id: String, event: serde_json::Value) {
        if self.by_id.insert(id.clone(), event).is_none() {
            self.order.push_back(id);
        }
        while self.order.len() > MAX_EVENTS_PER_ACCOUNT {
            if let Some(old) = self.order.pop_front() {
                self.by_id.remove(&old);
            }
        }
    }

    pub(crate) fn get(&self, id: &str) -> Option<&serde_json::Value> {
        self.by_id.get(id)
    }
}

#[derive(Debug)]
pub(crate) struct State {
    pub accounts: Vec<Account>,
    /// token -> (account index, key id)
    pub tokens: HashMap<String, (usize, String)>,
    pub clock: Clock,
    pub faults: Vec<FaultRule>,
    pub next_fault_id: u64,
    pub log: Vec<RequestLogEntry>,
    /// (Stripe-Context, Idempotency-Key) of POSTs being processed right now.
    pub in_flight: std::collections::HashSet<(String, String)>,
    /// Fingerprints of app keys that have expired: calls with them get 401 `api_key_expired`.
    pub expired_app_keys: std::collections::HashSet<String>,
    /// How long after a use it shows in `last_used` (of the simulator's clock).
    pub last_used_lag: chrono::Duration,
}

impl State {
    pub(crate) fn new(
        accounts: &[(String, Mode)],
        clock: ClockMode,
        rate_test: u32,
        rate_live: u32,
    ) -> Self {
        let now = Instant::now();
        Self {
            accounts: accounts
                .iter()
                .map(|(id, mode)| {
                    let rate = match mode {
                        Mode::Test => rate_test,
                        Mode::Live => rate_live,
                    };
                    Account {
                        id: id.clone(),
                        mode: *mode,
                        keys: Vec::new(),
                        endpoints: Vec::new(),
                        idempotency: HashMap::new(),
                        bucket: TokenBucket::new(f64::from(rate.max(1)), rate.max(1), now),
                        events: EventStore::default(),
                        activity: Default::default(),
                    }
                })
                .collect(),
            tokens: HashMap::new(),
            clock: Clock::new(clock),
            faults: Vec::new(),
            next_fault_id: 1,
            log: Vec::new(),
            in_flight: std::collections::HashSet::new(),
            expired_app_keys: std::collections::HashSet::new(),
            last_used_lag: chrono::Duration::zero(),
        }
    }

    pub(crate) fn account_index(&self, id: &str) -> Option<usize> {
        self.accounts.iter().position(|a| a.id == id)
    }

    pub(crate) fn add_fault(&mut self, spec: FaultSpec) -> u64 {
        let id = self.next_fault_id;
        self.next_fault_id += 1;
        self.faults.push(FaultRule { id, spec });
        id
    }

    /// Picks the fault for a request, consuming one use of a counted rule.
    pub(crate) fn take_fault(&mut self, method: &str, path: &str) -> Option<FaultKind> {
        let mut rng = rand::rng();
        let mut chosen = None;
        for (i, rule) in self.faults.iter_mut().enumerate() {
            if !rule.spec.matches(method, path) {
                continue;
            }
            if let Some(ratio) = rule.spec.ratio
                && !rng.random_bool(ratio.clamp(0.0, 1.0))
            {
                continue;
            }
            if let Some(count) = rule.spec.count.as_mut() {
                *count = count.saturating_sub(1);
            }
            chosen = Some((i, rule.spec.fault.clone()));
            break;
        }
        let (i, fault) = chosen?;
        if self.faults[i].spec.count == Some(0) {
            self.faults.remove(i);
        }
        Some(fault)
    }

    pub(crate) fn snapshot(&self) -> SimState {
        let now = self.clock.now();
        SimState {
            now,
            accounts: self
                .accounts
                .iter()
                .map(|a| AccountState {
                    id: a.id.clone(),
                    mode: a.mode,
                    api_keys: a
                        .keys
                        .iter()
                        .map(|k| KeyState {
                            id: k.id.clone(),
                            key_type: k.key_type.clone(),
                            name: k.name.clone(),
                            note: k.note.clone(),
                            status: if k.is_expired(now) {
                                "expired"
                            } else {
                                "active"
                            }
                            .into(),
                            permissions: k.permissions.clone(),
                            connect_permissions: k.connect_permissions.clone(),
                            created: k.created,
                            expires_at: k.expires_at,
                            last_used: k.reported_last_used(now, self.last_used_lag),
                            rotated_to: k.rotated_to.clone(),
                            token_fingerprint: crate::secret::fingerprint(k.token.as_bytes()),
                        })
                        .collect(),
                    webhook_endpoints: a
                        .endpoints
                        .iter()
                        .map(|e| EndpointState {
                            id: e.id.clone(),
                            url: e.url.clone(),
                            enabled_events: e.enabled_events.clone(),
                            api_version: e.api_version.clone(),
                            description: e.description.clone(),
                            metadata: e.metadata.clone(),
                            status: if e.disabled { "disabled" } else { "enabled" }.into(),
                            created: e.created,
                            valid_secret_fingerprints: e
                                .valid_secrets(now)
                                .into_iter()
                                .map(|s| crate::secret::fingerprint(s.as_bytes()))
                                .collect(),
                        })
                        .collect(),
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counted_faults_fire_exactly_count_times_on_matching_requests() {
        let mut s = State::new(&[], ClockMode::Real, 25, 100);
        s.add_fault(FaultSpec::next(2, FaultKind::Hang).for_method("POST"));
        assert_eq!(s.take_fault("GET", "/v1/x"), None);
        assert_eq!(s.take_fault("POST", "/v1/x"), Some(FaultKind::Hang));
        assert_eq!(s.take_fault("POST", "/v1/x"), Some(FaultKind::Hang));
        assert_eq!(s.take_fault("POST", "/v1/x"), None);
        assert!(s.faults.is_empty());
    }

    #[test]
    fn a_use_shows_in_last_used_only_after_the_lag() {
        let t0: DateTime<Utc> = "2026-06-01T00:00:00Z".parse().unwrap();
        let m = chrono::Duration::minutes;
        let mut k = KeyRecord {
            id: "apikey_1".into(),
            key_type: "secret_key".into(),
            name: None,
            note: None,
            permissions: vec![],
            connect_permissions: vec![],
            token: "t".into(),
            created: t0,
            expires_at: None,
            last_used: None,
            unreported_uses: vec![],
            rotated_to: None,
            dashboard_created: false,
        };
        let lag = m(5);
        k.record_use(t0 + m(1), lag);
        assert_eq!(k.reported_last_used(t0 + m(5), lag), None);
        assert_eq!(k.reported_last_used(t0 + m(6), lag), Some(t0 + m(1)));
        k.record_use(t0 + m(8), lag);
        assert_eq!(k.reported_last_used(t0 + m(12), lag), Some(t0 + m(1)));
        assert_eq!(k.reported_last_used(t0 + m(13), lag), Some(t0 + m(8)));
        let mut now = k.clone();
        now.record_use(t0 + m(20), chrono::Duration::zero());
        assert_eq!(
            now.reported_last_used(t0 + m(20), chrono::Duration::zero()),
            Some(t0 + m(20)),
            "no lag: at once"
        );
    }

    #[test]
    fn path_prefix_filters_faults() {
        let mut s = State::new(&[], ClockMode::Real, 25, 100);
        s.add_fault(FaultSpec::ratio(1.0, FaultKind::DropAfterCommit).for_path_prefix("/v2/"));
        assert_eq!(s.take_fault("GET", "/v1/webhook_endpoints"), None);
        assert_eq!(
            s.take_fault("GET", "/v2/iam/api_keys"),
            Some(FaultKind::DropAfterCommit)
        );
        // ratio 0 never fires
        let mut s = State::new(&[], ClockMode::Real, 25, 100);
        s.add_fault(FaultSpec::ratio(0.0, FaultKind::Hang));
        assert!((0..100).all(|_| s.take_fault("GET", "/").is_none()));
    }

    #[test]
    fn manual_clock_moves_only_when_advanced() {
        let start = DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let mut c = Clock::new(ClockMode::Manual { start });
        assert_eq!(c.now(), start);
        c.advance(Duration::from_secs(90));
        assert_eq!(c.now(), start + chrono::Duration::seconds(90));
    }
}
