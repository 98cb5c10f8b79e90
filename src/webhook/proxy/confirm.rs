//! Event confirmation: the evidence that tells a leaked signing secret from noise.
//!
//! A request whose signature does not verify proves that its sender does *not* hold the secret,
//! so it can never justify a rotation. A delivery whose signature verifies but that Stripe did
//! not send proves the opposite: someone else holds the secret. Confirmation tells the two
//! apart: for every verified delivery the proxy retrieves the event from Stripe
//! (`GET /v1/events/{id}`, with a read-only restricted key that holds `event_read`) and compares
//! the id, the type, `created` and the id of `data.object` with what was delivered. An event
//! Stripe does not know (404), one that differs, or a signed body that is not an event at all is
//! a forgery with a valid signature: the proxy refuses it and requests an incident.
//!
//! Confirmation is bounded: confirmed events are remembered (a bounded cache keyed by event id,
//! holding the compared fields, so the second delivery of an event during a blue/green overlap
//! or a retry costs no call, and a forged body reusing a confirmed id still differs), at most
//! `concurrency` calls run at once and each waits at most `timeout` (queueing included). When
//! Stripe cannot answer (timeout, connection error, 429, 5xx, a refused key) nothing is proven:
//! the delivery is forwarded (fail open) or refused with 503 so that Stripe retries it later
//! (fail closed), and no incident is requested either way.
//!
//! Only snapshot events (`object: "event"`, the v1 payloads that webhook endpoints receive) can
//! be confirmed; thin v2 events are not sent to webhook endpoints.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::Mutex;
use std::time::Duration;

use serde::Deserialize;
use url::Url;

use super::secrets::SecretsSource;
use crate::secret::SecretString;

/// Stripe's API.
pub const DEFAULT_API_BASE: &str = "https://api.stripe.com";
/// The key read when `--confirm-key-file` is a directory (a StripeKeyPolicy's Secret).
pub const DEFAULT_CONFIRM_KEY: &str = "STRIPE_API_KEY";
/// Default bound of the cache of confirmed events.
pub const DEFAULT_CACHE_CAPACITY: usize = 10_000;
/// Default number of confirmations in flight.
pub const DEFAULT_CONCURRENCY: usize = 8;
/// Default time for one confirmation, waiting for a free slot included.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest answer read from Stripe.
const MAX_ANSWER_BYTES: usize = 4 * 1024 * 1024;

/// What happens to a verified delivery when Stripe cannot confirm it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FailureMode {
    /// Forward it: the signature verified; only the extra check is missing.
    Open,
    /// Refuse it with `503 confirmation_unavailable`; Stripe retries the delivery later.
    Closed,
}

impl fmt::Display for FailureMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FailureMode::Open => "open",
            FailureMode::Closed => "closed",
        })
    }
}

/// Settings of event confirmation.
#[derive(Debug, Clone)]
pub struct ConfirmConfig {
    /// Where the read-only restricted key is read (a file, or a Secret volume's directory).
    pub key: SecretsSource,
    /// Stripe's API base (`https://`, or `http://` on loopback for the simulator).
    pub api_base: Url,
    /// Time for one confirmation, waiting for a slot included.
    pub timeout: Duration,
    /// Confirmations in flight at once.
    pub concurrency: usize,
    /// Confirmed events remembered.
    pub cache_capacity: usize,
    /// Forward or refuse when Stripe cannot answer.
    pub failure_mode: FailureMode,
}

impl ConfirmConfig {
    /// Defaults: Stripe's API, 5 s, 8 in flight, 10 000 events, fail open.
    pub fn new(key: SecretsSource) -> Self {
        Self {
            key,
            api_base: DEFAULT_API_BASE.parse().expect("a valid URL"),
            timeout: DEFAULT_TIMEOUT,
            concurrency: DEFAULT_CONCURRENCY,
            cache_capacity: DEFAULT_CACHE_CAPACITY,
            failure_mode: FailureMode::Open,
        }
    }
}

/// Checks that the API base is `https://`, or `http://` on a loopback host (the simulator).
pub fn check_api_base(url: &Url) -> Result<(), String> {
    let loopback = match url.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        None => return Err(format!("--confirm-api-base {url} has no host")),
    };
    match url.scheme() {
        "https" => Ok(()),
        "http" if loopback => Ok(()),
        _ => Err(format!(
            "--confirm-api-base {url} must be https:// (http:// only on a loopback address, for \
             the simulator): the restricted key is sent there"
        )),
    }
}

/// Why a validly signed delivery is a forgery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Forgery {
    /// The signed body is not a Stripe event (no id, type or created, or a malformed id).
    NotAnEvent,
    /// Stripe does not know the event id (404).
    UnknownEvent {
        /// The delivered id.
        event_id: String,
    },
    /// Stripe knows the id, but a compared field differs.
    Mismatch {
        /// The delivered id.
        event_id: String,
        /// The first field that differs: `type`, `created` or `data.object.id`.
        field: &'static str,
    },
}

impl Forgery {
    /// A short label (metrics).
    pub fn label(&self) -> &'static str {
        match self {
            Forgery::NotAnEvent => "not_an_event",
            Forgery::UnknownEvent { .. } => "unknown_event",
            Forgery::Mismatch { .. } => "mismatch",
        }
    }
}

impl fmt::Display for Forgery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Forgery::NotAnEvent => f.write_str("the signed body is not a Stripe event"),
            Forgery::UnknownEvent { event_id } => {
                write!(f, "Stripe does not know event {event_id}")
            }
            Forgery::Mismatch { event_id, field } => {
                write!(f, "event {event_id} differs from Stripe's copy in {field}")
            }
        }
    }
}

/// The outcome of confirming one delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Stripe sent this event (or it was confirmed before, identically).
    Confirmed {
        /// Whether the cache answered (no call to Stripe).
        cached: bool,
    },
    /// A valid signature on something Stripe did not send.
    Forged(Forgery),
    /// Stripe could not be asked; the reason never contains the key.
    Unavailable(String),
}

/// The compared fields of an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventSummary {
    /// `evt_...`.
    pub id: String,
    /// `type`.
    pub event_type: String,
    /// `created` (unix seconds).
    pub created: i64,
    /// `data.object.id`, when the object has one.
    pub object_id: Option<String>,
    /// `account` (Connect events): the account the event belongs to.
    pub account: Option<String>,
    /// `livemode`, when present.
    pub livemode: Option<bool>,
}

#[derive(Deserialize)]
struct RawEvent {
    id: String,
    #[serde(rename = "type")]
    event_type: String,
    created: i64,
    #[serde(default)]
    object: Option<String>,
    #[serde(default)]
    account: Option<String>,
    #[serde(default)]
    livemode: Option<bool>,
    #[serde(default)]
    data: Option<RawData>,
}

#[derive(Deserialize)]
struct RawData {
    #[serde(default)]
    object: Option<RawObject>,
}

#[derive(Deserialize)]
struct RawObject {
    #[serde(default)]
    id: Option<serde_json::Value>,
}

fn valid_id(id: &str, prefix: &str) -> bool {
    id.len() <= 255
        && id.strip_prefix(prefix).is_some_and(|rest| {
            !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        })
}

/// The compared fields of an event body; `None` when the body is not a Stripe event (not JSON,
/// a missing or duplicated field, an id that is not `evt_...`, an object other than `event`).
pub fn summarize(body: &[u8]) -> Option<EventSummary> {
    let raw: RawEvent = serde_json::from_slice(body).ok()?;
    if !valid_id(&raw.id, "evt_") || raw.event_type.is_empty() || raw.event_type.len() > 255 {
        return None;
    }
    if raw.object.as_deref().is_some_and(|o| o != "event") {
        return None;
    }
    if raw
        .account
        .as_deref()
        .is_some_and(|a| !valid_id(a, "acct_"))
    {
        return None;
    }
    let object_id = match raw.data.and_then(|d| d.object).and_then(|o| o.id) {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(s)) => Some(s),
        Some(other) => Some(other.to_string()),
    };
    Some(EventSummary {
        id: raw.id,
        event_type: raw.event_type,
        created: raw.created,
        object_id,
        account: raw.account,
        livemode: raw.livemode,
    })
}

/// The first compared field in which `delivered` differs from `stripe`'s copy.
pub fn first_difference(delivered: &EventSummary, stripe: &EventSummary) -> Option<&'static str> {
    if delivered.id != stripe.id {
        Some("id")
    } else if delivered.event_type != stripe.event_type {
        Some("type")
    } else if delivered.created != stripe.created {
        Some("created")
    } else if delivered.object_id != stripe.object_id {
        Some("data.object.id")
    } else {
        None
    }
}

/// Whether a key is a live-mode key (`rk_live_`/`sk_live_`), a test-mode one, or unknown.
fn key_mode_is_live(key: &str) -> Option<bool> {
    if key.starts_with("rk_live_") || key.starts_with("sk_live_") {
        Some(true)
    } else if key.starts_with("rk_test_") || key.starts_with("sk_test_") {
        Some(false)
    } else {
        None
    }
}

/// A bounded map of confirmed events (oldest forgotten first).
#[derive(Debug)]
struct ConfirmedCache {
    capacity: usize,
    by_id: HashMap<String, EventSummary>,
    order: VecDeque<String>,
}

impl ConfirmedCache {
    fn new(capacity: usize) -> Self {
        Self {
            capacity,
            by_id: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    fn get(&self, id: &str) -> Option<&EventSummary> {
        self.by_id.get(id)
    }

    fn insert(&mut self, summary: EventSummary) {
        if self.capacity == 0 {
            return;
        }
        let id = summary.id.clone();
        if self.by_id.insert(id.clone(), summary).is_none() {
            self.order.push_back(id);
        }
        while self.order.len() > self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.by_id.remove(&old);
            }
        }
    }

    fn len(&self) -> usize {
        self.by_id.len()
    }
}

/// Confirms deliveries with Stripe.
pub struct Confirmer {
    config: ConfirmConfig,
    http: reqwest::Client,
    key: std::sync::RwLock<Option<SecretString>>,
    slots: tokio::sync::Semaphore,
    cache: Mutex<ConfirmedCache>,
}

impl fmt::Debug for Confirmer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Confirmer")
            .field("api_base", &self.config.api_base.as_str())
            .field("failure_mode", &self.config.failure_mode)
            .finish_non_exhaustive()
    }
}

/// Why the confirmation key could not be read. Never contains the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfirmKeyError {
    /// The file could not be read or holds no key.
    #[error(
        "cannot use the event confirmation key file {path}: {reason}; mount the Secret of a \
         StripeKeyPolicy whose key holds event_read"
    )]
    Unusable {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
}

impl Confirmer {
    /// A confirmer; the key is read by [`Confirmer::reload_key`].
    pub fn new(config: ConfirmConfig) -> Result<Self, String> {
        check_api_base(&config.api_base)?;
        if config.concurrency == 0 {
            return Err("--confirm-concurrency must be at least 1".into());
        }
        if config.timeout.is_zero() {
            return Err("--confirm-timeout must be positive".into());
        }
        let http = reqwest::Client::builder()
            .user_agent(concat!(
                "stripe-key-operator-verify-proxy/",
                env!("CARGO_PKG_VERSION")
            ))
            .redirect(reqwest::redirect::Policy::none())
            .timeout(config.timeout)
            .build()
            .map_err(|e| format!("event confirmation HTTP client: {e}"))?;
        Ok(Self {
            slots: tokio::sync::Semaphore::new(config.concurrency),
            cache: Mutex::new(ConfirmedCache::new(config.cache_capacity)),
            key: std::sync::RwLock::new(None),
            http,
            config,
        })
    }

    /// The failure mode.
    pub fn failure_mode(&self) -> FailureMode {
        self.config.failure_mode
    }

    /// Events held by the cache.
    pub fn cached(&self) -> usize {
        self.cache.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Re-reads the key file; `Ok(Some(fingerprint))` when a different key was loaded.
    pub fn reload_key(&self) -> Result<Option<String>, ConfirmKeyError> {
        let unusable = |reason: String| ConfirmKeyError::Unusable {
            path: self.config.key.file().display().to_string(),
            reason,
        };
        let keys = self.config.key.read().map_err(|e| match e {
            super::SecretsFileError::Read { source, .. } => unusable(source.to_string()),
            super::SecretsFileError::TooLarge { .. } => unusable("the file is too large".into()),
            super::SecretsFileError::Empty { .. } => unusable("the file is empty".into()),
            super::SecretsFileError::TooMany { .. } => unusable("more than one value".into()),
        })?;
        let [key] = keys.as_slice() else {
            return Err(unusable(
                "expected one key, found a comma-separated list".into(),
            ));
        };
        let mut slot = self.key.write().unwrap_or_else(|e| e.into_inner());
        if slot.as_ref().is_some_and(|k| k.expose() == key.expose()) {
            return Ok(None);
        }
        if !key.expose().starts_with("rk_") {
            tracing::warn!(
                fingerprint = %key.fingerprint(),
                "the event confirmation key is not a restricted key (rk_...): use a StripeKeyPolicy key with event_read only"
            );
        }
        let fingerprint = key.fingerprint();
        *slot = Some(key.clone());
        Ok(Some(fingerprint))
    }

    /// Confirms a verified delivery whose body is `body`.
    pub async fn confirm(&self, body: &[u8]) -> Verdict {
        let Some(delivered) = summarize(body) else {
            return Verdict::Forged(Forgery::NotAnEvent);
        };
        if let Some(known) = self
            .cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&delivered.id)
        {
            return match first_difference(&delivered, known) {
                None => Verdict::Confirmed { cached: true },
                Some(field) => Verdict::Forged(Forgery::Mismatch {
                    event_id: delivered.id.clone(),
                    field,
                }),
            };
        }
        let Some(key) = self.key.read().unwrap_or_else(|e| e.into_inner()).clone() else {
            return Verdict::Unavailable("no confirmation key loaded".into());
        };
        // a key of the other mode cannot see the event: a 404 would prove nothing
        if let Some(live) = delivered.livemode {
            let key_live = key_mode_is_live(key.expose());
            if key_live.is_some_and(|k| k != live) {
                return Verdict::Unavailable(format!(
                    "the confirmation key is a {} key but the event is a {} event; mount a key \
                     of the endpoint's mode",
                    if live { "test-mode" } else { "live-mode" },
                    if live { "live-mode" } else { "test-mode" },
                ));
            }
        }
        let answer = tokio::time::timeout(self.config.timeout, async {
            let _slot = self
                .slots
                .acquire()
                .await
                .map_err(|_| "closed".to_owned())?;
            self.retrieve(&key, &delivered).await
        })
        .await;
        let stripe = match answer {
            Err(_) => {
                return Verdict::Unavailable(format!(
                    "no answer within {}",
                    humantime::format_duration(self.config.timeout)
                ));
            }
            Ok(Err(reason)) => return Verdict::Unavailable(reason),
            Ok(Ok(None)) => {
                return Verdict::Forged(Forgery::UnknownEvent {
                    event_id: delivered.id,
                });
            }
            Ok(Ok(Some(stripe))) => stripe,
        };
        match first_difference(&delivered, &stripe) {
            None => {
                self.cache
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(stripe);
                Verdict::Confirmed { cached: false }
            }
            Some(field) => Verdict::Forged(Forgery::Mismatch {
                event_id: delivered.id,
                field,
            }),
        }
    }

    /// `GET /v1/events/{id}`: `Ok(None)` for 404, an error for anything that proves nothing.
    async fn retrieve(
        &self,
        key: &SecretString,
        delivered: &EventSummary,
    ) -> Result<Option<EventSummary>, String> {
        let base = self.config.api_base.as_str().trim_end_matches('/');
        // the id was checked to be evt_ followed by [A-Za-z0-9_]: safe in a path
        let url = format!("{base}/v1/events/{}", delivered.id);
        let mut request = self.http.get(url).bearer_auth(key.expose());
        if let Some(account) = &delivered.account {
            request = request.header("Stripe-Context", account);
        }
        let mut response = request
            .send()
            .await
            .map_err(|e| format!("request failed: {}", e.without_url()))?;
        let status = response.status();
        if status == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !status.is_success() {
            let hint = match status.as_u16() {
                401 | 403 => {
                    "; check that --confirm-key-file holds a live key with event_read of the \
                     endpoint's account"
                }
                _ => "",
            };
            return Err(format!("Stripe answered {status}{hint}"));
        }
        let mut bytes = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| format!("reading the answer: {}", e.without_url()))?
        {
            if bytes.len() + chunk.len() > MAX_ANSWER_BYTES {
                return Err("the answer is too large".into());
            }
            bytes.extend_from_slice(&chunk);
        }
        summarize(&bytes)
            .map(Some)
            .ok_or_else(|| "the answer is not an event".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(id: &str, t: &str, created: i64, object_id: Option<&str>) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "id": id, "object": "event", "type": t, "created": created,
            "data": {"object": {"id": object_id, "amount": 1}},
        }))
        .unwrap()
    }

    #[test]
    fn summaries_read_the_compared_fields() {
        let s = summarize(&event("evt_1", "charge.succeeded", 7, Some("ch_1"))).unwrap();
        assert_eq!(s.id, "evt_1");
        assert_eq!(s.event_type, "charge.succeeded");
        assert_eq!(s.created, 7);
        assert_eq!(s.object_id.as_deref(), Some("ch_1"));
        assert_eq!(s.account, None);
        let s = summarize(&event("evt_2", "balance.available", 7, None)).unwrap();
        assert_eq!(s.object_id, None);
    }

    #[test]
    fn bodies_that_are_not_events_have_no_summary() {
        for body in [
            b"not json".to_vec(),
            br#"{"id":"evt_1","type":"a"}"#.to_vec(),
            br#"{"id":"ch_1","type":"a","created":1}"#.to_vec(),
            br#"{"id":"evt_../../v1/charges","type":"a","created":1}"#.to_vec(),
            br#"{"id":"evt_1","type":"a","created":1,"object":"charge"}"#.to_vec(),
            br#"{"id":"evt_1","id":"evt_2","type":"a","created":1}"#.to_vec(),
            br#"{"id":"evt_1","type":"a","created":1,"account":"acct_1/x"}"#.to_vec(),
        ] {
            assert!(
                summarize(&body).is_none(),
                "{}",
                String::from_utf8_lossy(&body)
            );
        }
    }

    #[test]
    fn each_compared_field_is_named_when_it_differs() {
        let base = summarize(&event("evt_1", "charge.succeeded", 7, Some("ch_1"))).unwrap();
        assert_eq!(first_difference(&base, &base), None);
        let cases = [
            (event("evt_1", "charge.refunded", 7, Some("ch_1")), "type"),
            (
                event("evt_1", "charge.succeeded", 8, Some("ch_1")),
                "created",
            ),
            (
                event("evt_1", "charge.succeeded", 7, Some("ch_2")),
                "data.object.id",
            ),
            (
                event("evt_1", "charge.succeeded", 7, None),
                "data.object.id",
            ),
            (event("evt_9", "charge.succeeded", 7, Some("ch_1")), "id"),
        ];
        for (body, field) in cases {
            let other = summarize(&body).unwrap();
            assert_eq!(first_difference(&other, &base), Some(field));
        }
    }

    #[test]
    fn the_cache_is_bounded_and_forgets_the_oldest() {
        let mut c = ConfirmedCache::new(2);
        for i in 0..5 {
            c.insert(summarize(&event(&format!("evt_{i}"), "a", 1, None)).unwrap());
            assert!(c.len() <= 2);
        }
        assert!(c.get("evt_4").is_some());
        assert!(c.get("evt_0").is_none());
    }

    #[tokio::test]
    async fn a_key_of_the_other_mode_proves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("k"), "rk_test_confirmation").unwrap();
        let mut config = ConfirmConfig::new(SecretsSource::new(dir.path().join("k"), "k"));
        // nothing listens there: the verdict must come before any call
        config.api_base = "http://127.0.0.1:9".parse().unwrap();
        let confirmer = Confirmer::new(config).unwrap();
        assert!(confirmer.reload_key().unwrap().is_some());
        let live = serde_json::to_vec(&serde_json::json!({
            "id": "evt_1", "object": "event", "type": "a", "created": 1, "livemode": true,
        }))
        .unwrap();
        match confirmer.confirm(&live).await {
            Verdict::Unavailable(why) => assert!(why.contains("test-mode key"), "{why}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            confirmer.confirm(b"{}").await,
            Verdict::Forged(Forgery::NotAnEvent)
        );
    }

    #[test]
    fn the_api_base_is_https_or_loopback_http() {
        assert!(check_api_base(&"https://api.stripe.com".parse().unwrap()).is_ok());
        assert!(check_api_base(&"http://127.0.0.1:12111".parse().unwrap()).is_ok());
        assert!(check_api_base(&"http://api.stripe.com".parse().unwrap()).is_err());
    }
}
