//! `stripe-key-operator verify-proxy`: a reverse proxy that runs as a sidecar in front of an
//! application's webhook route and lets through only requests that Stripe signed.
//!
//! For every request it:
//! 1. answers `503 no_secrets_loaded` while no secret could be read;
//! 2. runs the cheap checks before reading any body byte: exactly one `Stripe-Signature` header
//!    (`400 missing_signature`, `400 duplicate_signature`), well formed
//!    (`400 malformed_signature`), with a timestamp within the tolerance
//!    (`400 timestamp_outside_tolerance`), no `v1` value already accepted
//!    (`400 replayed_event`), a declared length of at most `--max-body` (`413 body_too_large`),
//!    and a free slot among `--max-concurrent-requests` (`503 overloaded`);
//! 3. reads the body within `--body-timeout` (`408 body_timeout`), at most `--max-body` bytes
//!    (`413 body_too_large`); a client that goes away is counted as `client_aborted`, a broken
//!    chunked encoding as `malformed_body`;
//! 4. verifies the signature against every secret of the mounted Secret key
//!    (`400 no_matching_signature`) and records it in the replay guard (`400 replayed_event`,
//!    see [`replay`]: per replica);
//! 5. optionally confirms the event with Stripe (see [`confirm`]): a validly signed delivery that
//!    Stripe did not send is refused (`400 event_not_confirmed`) and declares an incident; when
//!    Stripe cannot answer, the delivery is forwarded (fail open) or refused
//!    (`503 confirmation_unavailable`, fail closed);
//! 6. forwards the request unchanged (method, path, query, headers minus hop-by-hop ones, the raw
//!    body bytes) to the application on loopback and passes its answer back. When the
//!    application does not answer it replies `502 upstream_unavailable` (`504` on a timeout).
//!
//! Connections are bounded (`--max-connections`) and must send their request headers within
//! `--header-timeout` (see [`serve`]), so slow or idle clients cannot hold the proxy.
//!
//! Rejections carry the reason as a one-line `text/plain` body. Neither secrets nor bodies are
//! ever logged. The secrets file is re-read every `--reload-interval` (Kubernetes swaps Secret
//! volumes atomically); a file that cannot be read or holds no secret keeps the previous secrets.
//!
//! Failed verifications (forged, stale or replayed signatures) are counted and a burst of them
//! records at most one Warning Event per window; they never request a rotation, because a
//! signature that does not verify proves that the sender does *not* hold the secret. Only a
//! validly signed delivery that Stripe did not send is evidence that the secret is known to
//! someone else: that is an incident (see [`incident`]).

pub mod confirm;
pub mod incident;
pub mod metrics;
pub mod replay;
pub mod secrets;
pub(crate) mod serve;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use http_body_util::BodyExt as _;
use tokio_util::sync::CancellationToken;
use url::Url;

use crate::api::DEFAULT_WEBHOOK_SECRETS_KEY;
use crate::telemetry::LogFormat;
use crate::webhook::signature::{SignatureError, SignatureHeader, VerifiedSignature, parse_header};

pub use confirm::{ConfirmConfig, Confirmer, FailureMode, Forgery, Verdict};
pub use incident::{EndpointRef, IncidentReporter, IncidentTracker};
pub use metrics::ProxyMetrics;
pub use replay::ReplayCache;
pub use secrets::{LoadedSecrets, SecretsFileError, SecretsSource};
pub use serve::{MAX_HEADER_BYTES, MAX_HEADERS};

/// Default address of the proxy (plain HTTP; TLS is terminated in front of the pod).
pub const DEFAULT_LISTEN: &str = "0.0.0.0:8443";
/// Default address of `/metrics`, `/healthz` and `/readyz`.
pub const DEFAULT_METRICS_ADDR: &str = "0.0.0.0:9464";
/// Default largest accepted body (Stripe events are far smaller).
pub const DEFAULT_MAX_BODY: usize = 1024 * 1024;
/// Default bound of the replay guard, in signatures.
pub const DEFAULT_REPLAY_CAPACITY: usize = 100_000;
/// Default bound of open client connections.
pub const DEFAULT_MAX_CONNECTIONS: usize = 256;
/// Default bound of requests past the header checks (their bodies are what costs memory:
/// at most this many times `--max-body`).
pub const DEFAULT_MAX_CONCURRENT_REQUESTS: usize = 64;
/// Default time a client has to send its request headers.
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time a client has to send its body.
pub const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a request was not forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RejectReason {
    /// No `Stripe-Signature` header.
    MissingSignature,
    /// More than one `Stripe-Signature` header (only one would be verified, all forwarded).
    DuplicateSignature,
    /// The header could not be parsed (or is not text).
    MalformedSignature,
    /// No `v1` signature matches a loaded secret.
    NoMatchingSignature,
    /// The signature's timestamp is outside the tolerance.
    TimestampOutsideTolerance,
    /// The signature was already accepted within the tolerance window.
    ReplayedEvent,
    /// The body is larger than `--max-body`.
    BodyTooLarge,
    /// The body did not arrive within `--body-timeout`.
    BodyTimeout,
    /// The client went away before its body was complete.
    ClientAborted,
    /// The body's framing is broken (e.g. a malformed chunked encoding).
    MalformedBody,
    /// `--max-concurrent-requests` requests are being handled.
    Overloaded,
    /// No secret could be read yet.
    NoSecretsLoaded,
    /// The signature verified, but Stripe did not send this event: a forgery by someone who holds
    /// the secret (an incident).
    EventNotConfirmed,
    /// Stripe could not confirm the event and `--confirm-failure-mode closed` refuses it.
    ConfirmationUnavailable,
}

impl RejectReason {
    /// Every reason, for documentation and tests.
    pub const ALL: [RejectReason; 14] = [
        RejectReason::MissingSignature,
        RejectReason::DuplicateSignature,
        RejectReason::MalformedSignature,
        RejectReason::NoMatchingSignature,
        RejectReason::TimestampOutsideTolerance,
        RejectReason::ReplayedEvent,
        RejectReason::BodyTooLarge,
        RejectReason::BodyTimeout,
        RejectReason::ClientAborted,
        RejectReason::MalformedBody,
        RejectReason::Overloaded,
        RejectReason::NoSecretsLoaded,
        RejectReason::EventNotConfirmed,
        RejectReason::ConfirmationUnavailable,
    ];

    /// The reason as written in the response body and the `reason` metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::MissingSignature => "missing_signature",
            RejectReason::DuplicateSignature => "duplicate_signature",
            RejectReason::MalformedSignature => "malformed_signature",
            RejectReason::NoMatchingSignature => "no_matching_signature",
            RejectReason::TimestampOutsideTolerance => "timestamp_outside_tolerance",
            RejectReason::ReplayedEvent => "replayed_event",
            RejectReason::BodyTooLarge => "body_too_large",
            RejectReason::BodyTimeout => "body_timeout",
            RejectReason::ClientAborted => "client_aborted",
            RejectReason::MalformedBody => "malformed_body",
            RejectReason::Overloaded => "overloaded",
            RejectReason::NoSecretsLoaded => "no_secrets_loaded",
            RejectReason::EventNotConfirmed => "event_not_confirmed",
            RejectReason::ConfirmationUnavailable => "confirmation_unavailable",
        }
    }

    /// The HTTP status answered: 400, except 413 for a large body, 408 for a slow one, and 503
    /// when the proxy cannot decide now (Stripe retries those deliveries).
    pub fn status(self) -> StatusCode {
        match self {
            RejectReason::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            RejectReason::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            RejectReason::NoSecretsLoaded
            | RejectReason::Overloaded
            | RejectReason::ConfirmationUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::BAD_REQUEST,
        }
    }

    /// Whether the rejection is a failed verification of a well-formed header (a signature that
    /// matches no secret, a stale timestamp, a replay): counted towards the Warning Event of
    /// `--failure-event-threshold`. None of these proves that the secret is known to someone
    /// else, so none of them requests a rotation.
    pub fn is_failed_verification(self) -> bool {
        matches!(
            self,
            RejectReason::NoMatchingSignature
                | RejectReason::TimestampOutsideTolerance
                | RejectReason::ReplayedEvent
        )
    }

    /// Whether the rejection is evidence that the signing secret is known to someone else: only
    /// a validly signed delivery that Stripe did not send.
    pub fn is_evidence_of_compromise(self) -> bool {
        self == RejectReason::EventNotConfirmed
    }
}

impl From<&SignatureError> for RejectReason {
    fn from(e: &SignatureError) -> Self {
        match e {
            SignatureError::MalformedHeader(_) => RejectReason::MalformedSignature,
            SignatureError::NoMatchingSignature => RejectReason::NoMatchingSignature,
            SignatureError::TimestampOutsideTolerance { .. } => {
                RejectReason::TimestampOutsideTolerance
            }
        }
    }
}

/// The signature check of one request (without the replay guard): what the proxy runs for
/// every request, exposed for benchmarks and embedding. `header` is the raw `Stripe-Signature`
/// value, `now` the receiver's clock in unix seconds.
pub fn verify_request(
    secrets: &LoadedSecrets,
    header: Option<&[u8]>,
    body: &[u8],
    now: i64,
) -> Result<VerifiedSignature, RejectReason> {
    let header = header.ok_or(RejectReason::MissingSignature)?;
    let header = std::str::from_utf8(header).map_err(|_| RejectReason::MalformedSignature)?;
    secrets
        .verifier()
        .verify_at(body, header, now)
        .map_err(|e| RejectReason::from(&e))
}

/// The checks that need no body: exactly one `Stripe-Signature` header in `headers`, well
/// formed, with a timestamp within `tolerance` of `now` (unix seconds). Run before a single
/// body byte is read.
pub fn precheck_headers(
    headers: &HeaderMap,
    tolerance: Duration,
    now: i64,
) -> Result<SignatureHeader, RejectReason> {
    let mut values = headers.get_all("stripe-signature").iter();
    let value = values.next().ok_or(RejectReason::MissingSignature)?;
    if values.next().is_some() {
        return Err(RejectReason::DuplicateSignature);
    }
    let text = value
        .to_str()
        .map_err(|_| RejectReason::MalformedSignature)?;
    let parsed = parse_header(text).map_err(|e| RejectReason::from(&e))?;
    let tolerance = i64::try_from(tolerance.as_secs()).unwrap_or(i64::MAX);
    if parsed.timestamp.abs_diff(now) > tolerance.unsigned_abs() {
        return Err(RejectReason::TimestampOutsideTolerance);
    }
    Ok(parsed)
}

/// Errors starting the proxy.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// `--upstream` is not an `http://` URL on a loopback address.
    #[error(
        "--upstream {0} must be an http:// URL on a loopback address (127.0.0.1, [::1] or \
         localhost): the proxy forwards to the application in its own pod"
    )]
    UpstreamNotLoopback(String),
    /// An address could not be bound.
    #[error("cannot listen on {addr}: {source}; choose a free port")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The settings contradict each other.
    #[error("invalid verify-proxy settings: {0}")]
    InvalidConfig(String),
}

/// Command-line flags of `stripe-key-operator verify-proxy` (each also read from the
/// environment).
#[derive(clap::Args, Debug, Clone)]
pub struct VerifyProxyArgs {
    /// Address the proxy listens on (plain HTTP; terminate TLS in front of the pod).
    #[arg(long, env = "PROXY_LISTEN", default_value = DEFAULT_LISTEN)]
    pub listen: SocketAddr,
    /// The application's webhook server, on loopback, e.g. `http://127.0.0.1:3000`. The request
    /// path and query are appended.
    #[arg(long, env = "PROXY_UPSTREAM")]
    pub upstream: Url,
    /// The mounted Secret key holding the comma-separated signing secrets, or the Secret
    /// volume's directory (then `--secrets-key` is read in it).
    #[arg(long, env = "PROXY_SECRETS_FILE")]
    pub secrets_file: PathBuf,
    /// The key read when `--secrets-file` is a directory.
    #[arg(long, env = "PROXY_SECRETS_KEY", default_value = DEFAULT_WEBHOOK_SECRETS_KEY)]
    pub secrets_key: String,
    /// How often the secrets file (and the confirmation key) is checked for a change.
    #[arg(long, env = "PROXY_RELOAD_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    pub reload_interval: Duration,
    /// Accepted distance between a signature's timestamp and now (Stripe's libraries: 5m).
    #[arg(long, env = "PROXY_TOLERANCE", default_value = "5m", value_parser = humantime::parse_duration)]
    pub tolerance: Duration,
    /// Largest accepted request body, in bytes.
    #[arg(long, env = "PROXY_MAX_BODY", default_value_t = DEFAULT_MAX_BODY)]
    pub max_body: usize,
    /// Most signatures remembered by the replay guard (about 100 bytes each). The guard is per
    /// replica: the application must deduplicate on `event.id`.
    #[arg(long, env = "PROXY_REPLAY_CAPACITY", default_value_t = DEFAULT_REPLAY_CAPACITY)]
    pub replay_capacity: usize,
    /// Most client connections open at once; more are answered 503 and closed.
    #[arg(long, env = "PROXY_MAX_CONNECTIONS", default_value_t = DEFAULT_MAX_CONNECTIONS)]
    pub max_connections: usize,
    /// Most requests past the header checks at once (reading their body, verifying, confirming
    /// or forwarding); more are answered `503 overloaded`. Bodies held in memory are bounded by
    /// this times `--max-body`.
    #[arg(long, env = "PROXY_MAX_CONCURRENT_REQUESTS", default_value_t = DEFAULT_MAX_CONCURRENT_REQUESTS)]
    pub max_concurrent_requests: usize,
    /// Time a client has to send its request headers (and an idle keep-alive connection to send
    /// its next request) before the connection is closed.
    #[arg(long, env = "PROXY_HEADER_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub header_timeout: Duration,
    /// Time a client has to send its whole body once the headers passed (`408 body_timeout`).
    #[arg(long, env = "PROXY_BODY_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub body_timeout: Duration,
    /// Address of `/metrics`, `/healthz` and `/readyz` (ready once secrets are loaded).
    #[arg(long, env = "PROXY_METRICS_ADDR", default_value = DEFAULT_METRICS_ADDR)]
    pub metrics_addr: SocketAddr,
    /// How long the application may take to answer a forwarded request.
    #[arg(long, env = "PROXY_UPSTREAM_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub upstream_timeout: Duration,
    /// Failed verifications (signatures that match no secret, stale timestamps, replays) within
    /// `--failure-event-window` that record a Warning Event on the endpoint (0: never). They
    /// never request a rotation. `--incident-threshold` is the deprecated name.
    #[arg(
        long,
        alias = "incident-threshold",
        env = "PROXY_FAILURE_EVENT_THRESHOLD",
        default_value_t = 20
    )]
    pub failure_event_threshold: u32,
    /// The window of `--failure-event-threshold`; at most one such Event per window.
    #[arg(long, env = "PROXY_FAILURE_EVENT_WINDOW", default_value = "5m", value_parser = humantime::parse_duration)]
    pub failure_event_window: Duration,
    /// At most one incident (a validly signed delivery that Stripe did not send, found by event
    /// confirmation) is declared per window.
    #[arg(long, env = "PROXY_INCIDENT_WINDOW", default_value = "5m", value_parser = humantime::parse_duration)]
    pub incident_window: Duration,
    /// The `NAMESPACE/NAME` of the StripeWebhookEndpoint whose secret this proxy checks; Events
    /// are recorded on it (in-cluster config or KUBECONFIG).
    #[arg(long, env = "PROXY_ENDPOINT")]
    pub endpoint: Option<EndpointRef>,
    /// On an incident, also set `stripekeys.io/rotate` with reason `incident` on the endpoint,
    /// which makes the operator rotate the secret and revoke the old one at once.
    #[arg(long, env = "PROXY_INCIDENT_ROTATE", default_value_t = false, action = clap::ArgAction::Set)]
    pub incident_rotate: bool,
    /// Enables event confirmation: the mounted key of a StripeKeyPolicy holding `event_read`
    /// only (a file, or the Secret volume's directory: then `--confirm-key-entry` is read in
    /// it). Each verified delivery is retrieved from Stripe and compared; a validly signed
    /// delivery that Stripe did not send is refused and declares an incident.
    #[arg(long, env = "PROXY_CONFIRM_KEY_FILE")]
    pub confirm_key_file: Option<PathBuf>,
    /// The key read when `--confirm-key-file` is a directory.
    #[arg(long, env = "PROXY_CONFIRM_KEY_ENTRY", default_value = confirm::DEFAULT_CONFIRM_KEY)]
    pub confirm_key_entry: String,
    /// Stripe's API (`https://`; `http://` only on loopback, for the simulator).
    #[arg(long, env = "PROXY_CONFIRM_API_BASE", default_value = confirm::DEFAULT_API_BASE)]
    pub confirm_api_base: Url,
    /// Time one confirmation may take, waiting for a free slot included.
    #[arg(long, env = "PROXY_CONFIRM_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub confirm_timeout: Duration,
    /// Confirmations in flight at once.
    #[arg(long, env = "PROXY_CONFIRM_CONCURRENCY", default_value_t = confirm::DEFAULT_CONCURRENCY)]
    pub confirm_concurrency: usize,
    /// Confirmed events remembered (a second delivery of one of them needs no call).
    #[arg(long, env = "PROXY_CONFIRM_CACHE_SIZE", default_value_t = confirm::DEFAULT_CACHE_CAPACITY)]
    pub confirm_cache_size: usize,
    /// When Stripe cannot confirm (timeout, error, rate limit): `open` forwards the delivery,
    /// `closed` refuses it with 503 so that Stripe retries later. Neither declares an incident.
    #[arg(long, env = "PROXY_CONFIRM_FAILURE_MODE", value_enum, default_value_t = FailureMode::Open)]
    pub confirm_failure_mode: FailureMode,
    /// Log format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Auto)]
    pub log_format: LogFormat,
}

impl VerifyProxyArgs {
    /// The proxy settings of these flags.
    pub fn config(&self) -> ProxyConfig {
        ProxyConfig {
            listen: self.listen,
            upstream: self.upstream.clone(),
            secrets: SecretsSource::new(&self.secrets_file, &self.secrets_key),
            reload_interval: self.reload_interval,
            tolerance: self.tolerance,
            max_body: self.max_body,
            replay_capacity: self.replay_capacity,
            max_connections: self.max_connections,
            max_concurrent_requests: self.max_concurrent_requests,
            header_timeout: self.header_timeout,
            body_timeout: self.body_timeout,
            metrics_addr: Some(self.metrics_addr),
            upstream_timeout: self.upstream_timeout,
            failure_event_threshold: self.failure_event_threshold,
            failure_event_window: self.failure_event_window,
            incident_window: self.incident_window,
            endpoint: self.endpoint.clone(),
            incident_rotate: self.incident_rotate,
            confirm: self.confirm_key_file.as_ref().map(|file| ConfirmConfig {
                key: SecretsSource::new(file, &self.confirm_key_entry),
                api_base: self.confirm_api_base.clone(),
                timeout: self.confirm_timeout,
                concurrency: self.confirm_concurrency,
                cache_capacity: self.confirm_cache_size,
                failure_mode: self.confirm_failure_mode,
            }),
        }
    }
}

/// Settings of a proxy.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// The application (`http://` on loopback).
    pub upstream: Url,
    /// Where the secrets are read.
    pub secrets: SecretsSource,
    /// How often the secrets are re-read.
    pub reload_interval: Duration,
    /// Timestamp tolerance.
    pub tolerance: Duration,
    /// Largest body, in bytes.
    pub max_body: usize,
    /// Bound of the replay guard.
    pub replay_capacity: usize,
    /// Bound of open connections.
    pub max_connections: usize,
    /// Bound of requests past the header checks.
    pub max_concurrent_requests: usize,
    /// Deadline of request headers.
    pub header_timeout: Duration,
    /// Deadline of a request body.
    pub body_timeout: Duration,
    /// Address of the metrics and health endpoints; `None` serves none.
    pub metrics_addr: Option<SocketAddr>,
    /// Upstream answer timeout.
    pub upstream_timeout: Duration,
    /// Failed verifications that record a Warning Event (0: never); never a rotation.
    pub failure_event_threshold: u32,
    /// Window of the failure threshold.
    pub failure_event_window: Duration,
    /// At most one incident per window.
    pub incident_window: Duration,
    /// Endpoint to record Events on.
    pub endpoint: Option<EndpointRef>,
    /// Request an incident rotation on an incident.
    pub incident_rotate: bool,
    /// Event confirmation, when enabled.
    pub confirm: Option<ConfirmConfig>,
}

impl ProxyConfig {
    /// Defaults for embedding and tests: listen on `127.0.0.1:0`, no metrics endpoint, 1 s
    /// reloads, 5 min tolerance, 1 MiB bodies, 100 000 signatures, 256 connections, 64 requests
    /// in flight, 10 s for headers and for the body, a failure Event after 20 failures in
    /// 5 min, at most one incident per 5 min, no confirmation, without Kubernetes.
    pub fn new(upstream: Url, secrets: SecretsSource) -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            upstream,
            secrets,
            reload_interval: Duration::from_secs(1),
            tolerance: crate::webhook::signature::DEFAULT_TOLERANCE,
            max_body: DEFAULT_MAX_BODY,
            replay_capacity: DEFAULT_REPLAY_CAPACITY,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_concurrent_requests: DEFAULT_MAX_CONCURRENT_REQUESTS,
            header_timeout: DEFAULT_HEADER_TIMEOUT,
            body_timeout: DEFAULT_BODY_TIMEOUT,
            metrics_addr: None,
            upstream_timeout: Duration::from_secs(30),
            failure_event_threshold: 20,
            failure_event_window: Duration::from_secs(300),
            incident_window: Duration::from_secs(300),
            endpoint: None,
            incident_rotate: false,
            confirm: None,
        }
    }
}

/// Checks that `url` is `http://` on a loopback host.
pub fn check_upstream(url: &Url) -> Result<(), ProxyError> {
    let loopback = match url.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        None => false,
    };
    if url.scheme() != "http" || !loopback || url.query().is_some() || url.fragment().is_some() {
        return Err(ProxyError::UpstreamNotLoopback(url.to_string()));
    }
    Ok(())
}

/// At most one action per interval (log lines and Events about abuse).
#[derive(Debug)]
struct Throttle {
    interval: Duration,
    last: Mutex<Option<Instant>>,
}

impl Throttle {
    fn new(interval: Duration) -> Self {
        Self {
            interval,
            last: Mutex::new(None),
        }
    }

    /// True when the previous `true` is at least `interval` ago (or there was none).
    fn ready(&self, now: Instant) -> bool {
        let mut last = lock(&self.last);
        if last.is_some_and(|t| now.saturating_duration_since(t) < self.interval) {
            return false;
        }
        *last = Some(now);
        true
    }
}

/// Body bytes held in memory: the gauge and its high-water mark.
#[derive(Debug, Default)]
struct BufferedBytes {
    now: AtomicI64,
    peak: AtomicI64,
}

/// Releases what one request added to [`BufferedBytes`] and to the in-flight gauge.
struct RequestGuard<'a> {
    shared: &'a Shared,
    buffered: i64,
}

impl<'a> RequestGuard<'a> {
    fn new(shared: &'a Shared) -> Self {
        shared.metrics.requests_in_flight.inc();
        Self {
            shared,
            buffered: 0,
        }
    }

    fn add(&mut self, n: usize) {
        let n = i64::try_from(n).unwrap_or(i64::MAX);
        self.buffered += n;
        let total = self.shared.buffered.now.fetch_add(n, Ordering::Relaxed) + n;
        self.shared
            .buffered
            .peak
            .fetch_max(total, Ordering::Relaxed);
        self.shared.metrics.body_bytes_buffered.set(total);
    }
}

impl Drop for RequestGuard<'_> {
    fn drop(&mut self) {
        let total = self
            .shared
            .buffered
            .now
            .fetch_sub(self.buffered, Ordering::Relaxed)
            - self.buffered;
        self.shared.metrics.body_bytes_buffered.set(total);
        self.shared.metrics.requests_in_flight.dec();
    }
}

struct Shared {
    upstream_base: String,
    source: SecretsSource,
    tolerance: Duration,
    max_body: usize,
    body_timeout: Duration,
    in_flight: tokio::sync::Semaphore,
    buffered: BufferedBytes,
    secrets: secrets::SecretsSlot,
    replay: Mutex<ReplayCache>,
    failures: Mutex<IncidentTracker>,
    failure_event_window: Duration,
    failure_event_threshold: u32,
    failure_log: Throttle,
    incident_throttle: Throttle,
    unavailable_log: Throttle,
    confirmer: Option<Confirmer>,
    reporter: Option<Arc<IncidentReporter>>,
    metrics: ProxyMetrics,
    http: reqwest::Client,
}

impl Shared {
    /// Re-reads the secrets; true when a new set was applied.
    fn reload(&self) -> Result<bool, SecretsFileError> {
        let current = self.secrets.get();
        match self
            .source
            .load_if_changed(current.as_deref(), self.tolerance)
        {
            Ok(Some(loaded)) => {
                for fingerprint in loaded.without_whsec_prefix() {
                    tracing::warn!(
                        %fingerprint,
                        "a webhook secret does not start with whsec_; check the mounted key"
                    );
                }
                tracing::info!(
                    file = %self.source.file().display(),
                    fingerprints = ?loaded.fingerprints(),
                    "loaded webhook signing secrets"
                );
                self.metrics.secrets_loaded.set(loaded.len() as i64);
                self.metrics
                    .secret_reloads
                    .get_or_create(&metrics::ReloadLabels {
                        outcome: "applied".into(),
                    })
                    .inc();
                self.secrets.set(loaded);
                Ok(true)
            }
            Ok(None) => Ok(false),
            Err(e) => {
                self.metrics
                    .secret_reloads
                    .get_or_create(&metrics::ReloadLabels {
                        outcome: "failed".into(),
                    })
                    .inc();
                Err(e)
            }
        }
    }

    /// Re-reads the confirmation key, if confirmation is enabled; the error is printable.
    fn reload_confirm_key(&self) -> Result<(), String> {
        let Some(confirmer) = &self.confirmer else {
            return Ok(());
        };
        match confirmer.reload_key() {
            Ok(Some(fingerprint)) => {
                tracing::info!(%fingerprint, "loaded the event confirmation key");
                Ok(())
            }
            Ok(None) => Ok(()),
            Err(e) => Err(e.to_string()),
        }
    }
}

/// Entry point of the library API.
#[derive(Debug)]
pub struct VerifyProxy;

impl VerifyProxy {
    /// Binds, loads the secrets (a failure is logged and retried; requests get
    /// `503 no_secrets_loaded` meanwhile) and serves in the background. `kube` is required when
    /// `config.endpoint` is set.
    pub async fn start(
        config: ProxyConfig,
        kube: Option<kube::Client>,
    ) -> Result<ProxyHandle, ProxyError> {
        check_upstream(&config.upstream)?;
        if config.incident_rotate && config.endpoint.is_none() {
            return Err(ProxyError::InvalidConfig(
                "--incident-rotate needs --endpoint NAMESPACE/NAME".into(),
            ));
        }
        if config.incident_rotate && config.confirm.is_none() {
            tracing::warn!(
                "--incident-rotate without --confirm-key-file: incidents are found only by event \
                 confirmation, so no rotation will ever be requested"
            );
        }
        for (value, flag) in [
            (config.reload_interval, "--reload-interval"),
            (config.header_timeout, "--header-timeout"),
            (config.body_timeout, "--body-timeout"),
        ] {
            if value.is_zero() {
                return Err(ProxyError::InvalidConfig(format!(
                    "{flag} must be positive"
                )));
            }
        }
        if config.max_connections == 0 || config.max_concurrent_requests == 0 {
            return Err(ProxyError::InvalidConfig(
                "--max-connections and --max-concurrent-requests must be at least 1".into(),
            ));
        }
        let confirmer = match &config.confirm {
            Some(c) => Some(Confirmer::new(c.clone()).map_err(ProxyError::InvalidConfig)?),
            None => None,
        };
        let reporter = match (&config.endpoint, kube) {
            (Some(ep), Some(client)) => Some(Arc::new(IncidentReporter::new(
                client,
                ep.clone(),
                config.incident_rotate,
            ))),
            (Some(_), None) => {
                return Err(ProxyError::InvalidConfig(
                    "--endpoint needs a Kubernetes client".into(),
                ));
            }
            (None, _) => None,
        };
        let http = reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(config.upstream_timeout)
            .pool_max_idle_per_host(64)
            .build()
            .map_err(|e| ProxyError::InvalidConfig(format!("upstream HTTP client: {e}")))?;
        let shared = Arc::new(Shared {
            upstream_base: config.upstream.as_str().trim_end_matches('/').to_owned(),
            source: config.secrets.clone(),
            tolerance: config.tolerance,
            max_body: config.max_body,
            body_timeout: config.body_timeout,
            in_flight: tokio::sync::Semaphore::new(config.max_concurrent_requests),
            buffered: BufferedBytes::default(),
            secrets: secrets::SecretsSlot::default(),
            replay: Mutex::new(ReplayCache::new(config.replay_capacity)),
            failures: Mutex::new(IncidentTracker::new(
                config.failure_event_threshold,
                config.failure_event_window,
            )),
            failure_event_window: config.failure_event_window,
            failure_event_threshold: config.failure_event_threshold,
            failure_log: Throttle::new(config.failure_event_window),
            incident_throttle: Throttle::new(config.incident_window),
            unavailable_log: Throttle::new(Duration::from_secs(60)),
            confirmer,
            reporter,
            metrics: ProxyMetrics::new(),
            http,
        });
        // every series exists from the start, so that rates and alerts see zeros, not gaps
        for reason in RejectReason::ALL {
            let _ = shared
                .metrics
                .rejected
                .get_or_create(&metrics::ReasonLabels {
                    reason: reason.as_str().into(),
                });
        }
        if shared.confirmer.is_some() {
            for outcome in [
                "confirmed",
                "cached",
                "forged",
                "unavailable_forwarded",
                "unavailable_refused",
            ] {
                let _ = shared
                    .metrics
                    .confirmations
                    .get_or_create(&metrics::OutcomeLabels {
                        outcome: outcome.into(),
                    });
            }
        }
        if let Err(e) = shared.reload() {
            tracing::error!(error = %e, "no webhook signing secrets loaded; answering 503 until the file is readable");
        }
        if let Err(e) = shared.reload_confirm_key() {
            tracing::error!(error = %e, "no event confirmation key loaded; confirmations are unavailable until it is readable");
        }

        let shutdown = CancellationToken::new();
        let mut tasks = Vec::new();
        let bind_error = |(addr, source)| ProxyError::Bind { addr, source };
        let (listener, addr) = serve::bind(config.listen).await.map_err(bind_error)?;
        let metrics = serve::bind_optional(config.metrics_addr)
            .await
            .map_err(bind_error)?;
        let metrics_addr = metrics.as_ref().map(|(_, a)| *a);
        let metrics_listener = metrics.map(|(l, _)| l);

        let app = Router::new().fallback(handle).with_state(shared.clone());
        let limits = serve::ServeLimits {
            max_connections: config.max_connections,
            header_timeout: config.header_timeout,
            drain: config.upstream_timeout + config.body_timeout,
        };
        tasks.push(tokio::spawn(serve::serve(
            listener,
            app,
            limits,
            serve::ConnMetrics {
                open: shared.metrics.connections_open.clone(),
                refused: shared.metrics.connections_refused.clone(),
            },
            shutdown.clone(),
        )));
        if let Some(listener) = metrics_listener {
            let app = Router::new()
                .route("/metrics", get(metrics_handler))
                .route("/healthz", get(|| async { "ok" }))
                .route("/readyz", get(readyz))
                .with_state(shared.clone());
            tasks.push(serve::spawn_admin(
                listener,
                app,
                shutdown.clone(),
                "verify-proxy",
            ));
        }
        let reloader = shared.clone();
        let token = shutdown.clone();
        let interval = config.reload_interval;
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut last_error: Option<String> = None;
            let mut last_key_error: Option<String> = None;
            loop {
                tokio::select! {
                    _ = token.cancelled() => break,
                    _ = tick.tick() => {}
                }
                let r = reloader.clone();
                // file I/O off the async workers
                let result =
                    tokio::task::spawn_blocking(move || (r.reload(), r.reload_confirm_key())).await;
                match result {
                    Ok((secrets, key)) => {
                        match secrets {
                            Ok(_) => last_error = None,
                            Err(e) => {
                                let text = e.to_string();
                                if last_error.as_deref() != Some(text.as_str()) {
                                    tracing::warn!(error = %text, "keeping the previous webhook secrets");
                                    last_error = Some(text);
                                }
                            }
                        }
                        match key {
                            Ok(()) => last_key_error = None,
                            Err(text) => {
                                if last_key_error.as_deref() != Some(text.as_str()) {
                                    tracing::warn!(error = %text, "keeping the previous event confirmation key");
                                    last_key_error = Some(text);
                                }
                            }
                        }
                    }
                    Err(e) => tracing::error!(error = %e, "secrets reload task failed"),
                }
            }
        }));
        tracing::info!(%addr, upstream = %shared.upstream_base, "verify-proxy listening");
        Ok(ProxyHandle {
            addr,
            metrics_addr,
            shared,
            shutdown,
            tasks,
        })
    }
}

/// A running proxy. Dropping it stops the servers.
pub struct ProxyHandle {
    addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for ProxyHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyHandle")
            .field("addr", &self.addr)
            .field("metrics_addr", &self.metrics_addr)
            .finish_non_exhaustive()
    }
}

impl ProxyHandle {
    /// The proxy's bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://<addr>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The bound metrics address, if served.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The proxy's metrics.
    pub fn metrics(&self) -> &ProxyMetrics {
        &self.shared.metrics
    }

    /// Fingerprints of the loaded secrets, newest first (empty when none is loaded).
    pub fn loaded_fingerprints(&self) -> Vec<String> {
        self.shared
            .secrets
            .get()
            .map(|s| s.fingerprints().to_vec())
            .unwrap_or_default()
    }

    /// Re-reads the secrets file now; true when a new set was applied.
    pub fn reload_now(&self) -> Result<bool, SecretsFileError> {
        self.shared.reload()
    }

    /// Signatures held by the replay guard.
    pub fn replay_entries(&self) -> usize {
        lock(&self.shared.replay).len()
    }

    /// The most request body bytes held in memory at once since the start.
    pub fn peak_body_bytes_buffered(&self) -> u64 {
        u64::try_from(self.shared.buffered.peak.load(Ordering::Relaxed)).unwrap_or(0)
    }

    /// Events held by the confirmation cache (0 without confirmation).
    pub fn confirmed_events_cached(&self) -> usize {
        self.shared.confirmer.as_ref().map_or(0, Confirmer::cached)
    }

    /// Stops serving and waits for the servers to finish.
    pub async fn shutdown(mut self) {
        self.shutdown.cancel();
        for task in self.tasks.drain(..) {
            let _ = task.await;
        }
    }
}

impl Drop for ProxyHandle {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn reject(shared: &Shared, reason: RejectReason) -> Response {
    shared
        .metrics
        .rejected
        .get_or_create(&metrics::ReasonLabels {
            reason: reason.as_str().into(),
        })
        .inc();
    tracing::debug!(reason = reason.as_str(), "webhook request refused");
    if reason.is_failed_verification() {
        note_failed_verification(shared);
    }
    let mut response = (
        reason.status(),
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        format!("{}\n", reason.as_str()),
    )
        .into_response();
    if reason.status() == StatusCode::SERVICE_UNAVAILABLE {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    if matches!(
        reason,
        RejectReason::BodyTooLarge
            | RejectReason::BodyTimeout
            | RejectReason::ClientAborted
            | RejectReason::MalformedBody
    ) {
        // the unread rest of the body would be read (or waited for) before the next request
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// Counts a failed verification; a burst records one Warning Event per window. Never a
/// rotation: a signature that does not verify proves the sender lacks the secret.
fn note_failed_verification(shared: &Shared) {
    let now = Instant::now();
    if shared.failure_log.ready(now) {
        tracing::warn!(
            "webhook requests fail verification (forged, stale or replayed signatures); \
             counted in stripe_key_operator_webhook_proxy_rejected_total, no rotation requested \
             (logged at most once per window)"
        );
    }
    if !lock(&shared.failures).record_failure(now) {
        return;
    }
    shared.metrics.failure_events.inc();
    let (failures, window) = (shared.failure_event_threshold, shared.failure_event_window);
    match &shared.reporter {
        Some(reporter) => {
            let reporter = reporter.clone();
            let metrics = shared.metrics.clone();
            tokio::spawn(async move {
                if let Err(e) = reporter.report_failures(failures, window).await {
                    metrics.incident_report_failures.inc();
                    tracing::error!(error = %e, endpoint = %reporter.endpoint(), "could not record the verification failures on the StripeWebhookEndpoint");
                }
            });
        }
        None => tracing::warn!(
            failures,
            window = %humantime::format_duration(window),
            "many failed webhook verifications (no --endpoint: nothing recorded in Kubernetes)"
        ),
    }
}

/// Declares an incident: a delivery signed with the loaded secret `secret_fingerprint` that
/// Stripe did not send. At most one per `--incident-window`.
fn declare_incident(shared: &Shared, forgery: &Forgery, secret_fingerprint: &str) {
    if !shared.incident_throttle.ready(Instant::now()) {
        tracing::debug!("another forged delivery within the incident window");
        return;
    }
    shared.metrics.incidents.inc();
    let evidence = forgery.to_string();
    match &shared.reporter {
        Some(reporter) => {
            tracing::error!(
                %evidence,
                secret = %secret_fingerprint,
                endpoint = %reporter.endpoint(),
                "a validly signed webhook delivery was not sent by Stripe: the signing secret is known to someone else; declaring an incident"
            );
            let reporter = reporter.clone();
            let metrics = shared.metrics.clone();
            let fingerprint = secret_fingerprint.to_owned();
            tokio::spawn(async move {
                if let Err(e) = reporter.report_incident(&evidence, &fingerprint).await {
                    metrics.incident_report_failures.inc();
                    tracing::error!(error = %e, endpoint = %reporter.endpoint(), "could not record the incident on the StripeWebhookEndpoint");
                }
            });
        }
        None => tracing::error!(
            %evidence,
            secret = %secret_fingerprint,
            "a validly signed webhook delivery was not sent by Stripe: the signing secret is known to someone else (no --endpoint: nothing recorded in Kubernetes)"
        ),
    }
}

/// Headers that apply to one connection only and are never forwarded (RFC 9110 §7.6.1).
pub(crate) const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Copies `headers` without hop-by-hop headers (and those named in `Connection`) and without
/// `Content-Length`, which is set again for the exact body.
fn end_to_end_headers(headers: &HeaderMap) -> HeaderMap {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    let mut out = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        if HOP_BY_HOP.contains(&name.as_str())
            || name == header::CONTENT_LENGTH
            || named.contains(name)
        {
            continue;
        }
        out.append(name.clone(), value.clone());
    }
    out
}

async fn handle(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let Some(secrets) = shared.secrets.get() else {
        return reject(&shared, RejectReason::NoSecretsLoaded);
    };
    let (parts, body) = request.into_parts();
    // cheap checks first: nothing of the body is read before these pass
    let now = now_unix();
    let parsed = match precheck_headers(&parts.headers, shared.tolerance, now) {
        Ok(p) => p,
        Err(reason) => return reject(&shared, reason),
    };
    if lock(&shared.replay).contains_any(&parsed.v1, now) {
        return reject(&shared, RejectReason::ReplayedEvent);
    }
    let declared_len = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared_len.is_some_and(|n| n > shared.max_body as u64) {
        return reject(&shared, RejectReason::BodyTooLarge);
    }
    let Ok(_slot) = shared.in_flight.try_acquire() else {
        return reject(&shared, RejectReason::Overloaded);
    };
    let mut guard = RequestGuard::new(&shared);
    let capacity = declared_len.map_or(0, |n| usize::try_from(n).unwrap_or(0));
    let body = match tokio::time::timeout(
        shared.body_timeout,
        read_body(body, shared.max_body, capacity, &mut guard),
    )
    .await
    {
        Ok(Ok(b)) => b,
        Ok(Err(reason)) => return reject(&shared, reason),
        Err(_) => return reject(&shared, RejectReason::BodyTimeout),
    };
    let signature = parts.headers.get("stripe-signature").cloned();
    let now = now_unix();
    let verified = match verify_request(
        &secrets,
        signature.as_ref().map(HeaderValue::as_bytes),
        &body,
        now,
    ) {
        Ok(v) => v,
        Err(reason) => return reject(&shared, reason),
    };
    if !remember(&shared, &parsed, verified.timestamp, now) {
        return reject(&shared, RejectReason::ReplayedEvent);
    }
    shared
        .metrics
        .verified
        .get_or_create(&metrics::SecretLabels {
            secret_index: verified.secret_index.to_string(),
        })
        .inc();
    if let Some(confirmer) = &shared.confirmer {
        let outcome = |label: &str| {
            shared
                .metrics
                .confirmations
                .get_or_create(&metrics::OutcomeLabels {
                    outcome: label.into(),
                })
                .inc();
        };
        match confirmer.confirm(&body).await {
            Verdict::Confirmed { cached } => outcome(if cached { "cached" } else { "confirmed" }),
            Verdict::Forged(forgery) => {
                outcome("forged");
                let fingerprint = secrets
                    .fingerprints()
                    .get(verified.secret_index)
                    .cloned()
                    .unwrap_or_default();
                declare_incident(&shared, &forgery, &fingerprint);
                return reject(&shared, RejectReason::EventNotConfirmed);
            }
            Verdict::Unavailable(why) => {
                let closed = confirmer.failure_mode() == FailureMode::Closed;
                if shared.unavailable_log.ready(Instant::now()) {
                    tracing::warn!(
                        reason = %why,
                        failure_mode = %confirmer.failure_mode(),
                        "Stripe could not confirm a verified webhook delivery (logged at most once a minute)"
                    );
                }
                if closed {
                    outcome("unavailable_refused");
                    return reject(&shared, RejectReason::ConfirmationUnavailable);
                }
                outcome("unavailable_forwarded");
            }
        }
    }
    forward(&shared, parts, body).await
}

/// Reads the body, at most `limit` bytes; `capacity` is the declared length (already checked
/// against `limit`). Every byte held is counted in `guard`.
async fn read_body(
    mut body: Body,
    limit: usize,
    capacity: usize,
    guard: &mut RequestGuard<'_>,
) -> Result<Bytes, RejectReason> {
    let mut buf = bytes::BytesMut::with_capacity(capacity.min(limit));
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| body_error_reason(&e))?;
        if let Ok(data) = frame.into_data() {
            if buf.len() + data.len() > limit {
                return Err(RejectReason::BodyTooLarge);
            }
            guard.add(data.len());
            buf.extend_from_slice(&data);
        }
    }
    Ok(buf.freeze())
}

/// A broken encoding (`malformed_body`: hyper reports invalid chunk framing as `InvalidData` or
/// `InvalidInput`) or, for anything else, a client that went away (`client_aborted`).
fn body_error_reason(e: &axum::Error) -> RejectReason {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && matches!(
                io.kind(),
                std::io::ErrorKind::InvalidData | std::io::ErrorKind::InvalidInput
            )
        {
            return RejectReason::MalformedBody;
        }
        source = err.source();
    }
    RejectReason::ClientAborted
}

/// Records the header's signatures in the replay guard; false for a replay.
fn remember(shared: &Shared, parsed: &SignatureHeader, timestamp: i64, now: i64) -> bool {
    let tolerance = i64::try_from(shared.tolerance.as_secs()).unwrap_or(i64::MAX);
    let expires_at = timestamp.saturating_add(tolerance);
    let mut cache = lock(&shared.replay);
    let before = cache.evictions();
    let fresh = cache.check_and_insert(&parsed.v1, expires_at, now);
    let evicted = cache.evictions() - before;
    let len = cache.len();
    drop(cache);
    if evicted > 0 {
        shared.metrics.replay_cache_evictions.inc_by(evicted);
    }
    shared.metrics.replay_cache_entries.set(len as i64);
    fresh
}

async fn forward(
    shared: &Shared,
    parts: axum::http::request::Parts,
    body: axum::body::Bytes,
) -> Response {
    let started = Instant::now();
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let url = format!("{}{}", shared.upstream_base, path);
    let result = shared
        .http
        .request(parts.method.clone(), url)
        .headers(end_to_end_headers(&parts.headers))
        .body(body)
        .send()
        .await;
    let outcome = match result {
        Ok(resp) => {
            let status = resp.status();
            let headers = end_to_end_headers(resp.headers());
            match resp.bytes().await {
                Ok(bytes) => Ok((status, headers, bytes)),
                Err(e) => Err(e),
            }
        }
        Err(e) => Err(e),
    };
    let (label, response) = match outcome {
        Ok((status, headers, bytes)) => {
            let mut response = Response::new(Body::from(bytes));
            *response.status_mut() = status;
            *response.headers_mut() = headers;
            (format!("{}xx", status.as_u16() / 100), response)
        }
        Err(e) => {
            let (status, text) = if e.is_timeout() {
                (StatusCode::GATEWAY_TIMEOUT, "upstream_timeout\n")
            } else {
                (StatusCode::BAD_GATEWAY, "upstream_unavailable\n")
            };
            tracing::warn!(error = %e.without_url(), "the application did not answer a verified webhook request");
            (
                "error".to_owned(),
                (
                    status,
                    [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
                    text,
                )
                    .into_response(),
            )
        }
    };
    shared
        .metrics
        .forward_duration
        .get_or_create(&metrics::ForwardLabels { outcome: label })
        .observe(started.elapsed().as_secs_f64());
    response
}

async fn metrics_handler(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    metrics_response(&headers, shared.metrics.encode())
}

/// A sidecar's `/metrics` answer: the OpenMetrics text when the scraper asks for it (`Accept`),
/// the Prometheus text format otherwise. Shared by verify-proxy and the egress broker.
pub(crate) fn metrics_response(headers: &HeaderMap, openmetrics: String) -> Response {
    let wants_openmetrics = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/openmetrics-text"));
    if wants_openmetrics {
        (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            openmetrics,
        )
            .into_response()
    } else {
        (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            crate::metrics::openmetrics_to_prometheus_text(&openmetrics),
        )
            .into_response()
    }
}

async fn readyz(State(shared): State<Arc<Shared>>) -> Response {
    if shared.secrets.get().is_some() {
        (StatusCode::OK, "ready").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "no webhook secrets loaded").into_response()
    }
}

/// Runs the proxy until SIGTERM or Ctrl-C (the `verify-proxy` subcommand).
pub async fn run_cli(args: VerifyProxyArgs) -> anyhow::Result<()> {
    crate::telemetry::init(args.log_format, "info");
    let config = args.config();
    let client = if config.endpoint.is_some() {
        Some(kube::Client::try_default().await.map_err(|e| {
            anyhow::anyhow!(
                "--endpoint needs the Kubernetes API (in-cluster config or KUBECONFIG): {e}"
            )
        })?)
    } else {
        None
    };
    let handle = VerifyProxy::start(config, client).await?;
    shutdown_signal().await;
    tracing::info!("shutting down");
    handle.shutdown().await;
    Ok(())
}

/// Resolves on SIGTERM or Ctrl-C (the sidecars' shutdown).
pub(crate) async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_http_upstreams_are_accepted() {
        for ok in [
            "http://127.0.0.1:3000",
            "http://localhost:3000/base",
            "http://[::1]:8080",
        ] {
            assert!(check_upstream(&ok.parse().unwrap()).is_ok(), "{ok}");
        }
        for bad in [
            "https://127.0.0.1:3000",
            "http://10.0.0.1:3000",
            "http://example.com",
            "http://127.0.0.1:3000/?a=b",
        ] {
            assert!(check_upstream(&bad.parse().unwrap()).is_err(), "{bad}");
        }
    }

    #[test]
    fn hop_by_hop_headers_and_those_named_in_connection_are_dropped() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("keep-alive, x-hop"));
        h.insert("x-hop", HeaderValue::from_static("1"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("content-length", HeaderValue::from_static("10"));
        h.insert("stripe-signature", HeaderValue::from_static("t=1,v1=x"));
        h.append("x-multi", HeaderValue::from_static("a"));
        h.append("x-multi", HeaderValue::from_static("b"));
        let out = end_to_end_headers(&h);
        assert_eq!(out.len(), 3);
        assert_eq!(out.get_all("x-multi").iter().count(), 2);
        assert!(out.get("stripe-signature").is_some());
    }

    #[test]
    fn reasons_have_distinct_names_and_expected_statuses() {
        let names: std::collections::HashSet<_> =
            RejectReason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(names.len(), RejectReason::ALL.len());
        assert_eq!(
            RejectReason::NoMatchingSignature.status(),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            RejectReason::BodyTooLarge.status(),
            StatusCode::PAYLOAD_TOO_LARGE
        );
        assert_eq!(
            RejectReason::BodyTimeout.status(),
            StatusCode::REQUEST_TIMEOUT
        );
        assert_eq!(
            RejectReason::Overloaded.status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            RejectReason::ConfirmationUnavailable.status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        // forged, stale and replayed signatures are failed verifications, never evidence
        for r in [
            RejectReason::NoMatchingSignature,
            RejectReason::TimestampOutsideTolerance,
            RejectReason::ReplayedEvent,
        ] {
            assert!(r.is_failed_verification(), "{r:?}");
        }
        // only a validly signed delivery that Stripe did not send is evidence of compromise
        let evidence: Vec<_> = RejectReason::ALL
            .into_iter()
            .filter(|r| r.is_evidence_of_compromise())
            .collect();
        assert_eq!(evidence, [RejectReason::EventNotConfirmed]);
        for r in [
            RejectReason::NoSecretsLoaded,
            RejectReason::MissingSignature,
            RejectReason::DuplicateSignature,
            RejectReason::MalformedSignature,
            RejectReason::BodyTooLarge,
            RejectReason::ClientAborted,
            RejectReason::ConfirmationUnavailable,
        ] {
            assert!(!r.is_failed_verification(), "{r:?}");
        }
    }

    fn headers(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append("stripe-signature", HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn the_header_precheck_needs_exactly_one_well_formed_fresh_header() {
        let tol = Duration::from_secs(300);
        let sig = format!("t=1000,v1={}", "ab".repeat(32));
        assert_eq!(
            precheck_headers(&headers(&[&sig]), tol, 1000)
                .unwrap()
                .timestamp,
            1000
        );
        assert_eq!(
            precheck_headers(&headers(&[]), tol, 1000).unwrap_err(),
            RejectReason::MissingSignature
        );
        assert_eq!(
            precheck_headers(&headers(&[&sig, &sig]), tol, 1000).unwrap_err(),
            RejectReason::DuplicateSignature
        );
        assert_eq!(
            precheck_headers(&headers(&["t=1000"]), tol, 1000).unwrap_err(),
            RejectReason::MalformedSignature
        );
        assert_eq!(
            precheck_headers(&headers(&[&sig]), tol, 1301).unwrap_err(),
            RejectReason::TimestampOutsideTolerance
        );
        assert_eq!(
            precheck_headers(&headers(&[&sig]), tol, 699).unwrap_err(),
            RejectReason::TimestampOutsideTolerance
        );
    }

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: VerifyProxyArgs,
    }

    fn parse(extra: &[&str]) -> ProxyConfig {
        use clap::Parser as _;
        let mut argv = vec![
            "verify-proxy",
            "--upstream",
            "http://127.0.0.1:3000",
            "--secrets-file",
            "/etc/stripe-webhook",
        ];
        argv.extend_from_slice(extra);
        Cli::try_parse_from(argv).unwrap().args.config()
    }

    #[test]
    fn flags_have_the_documented_defaults() {
        let c = parse(&[]);
        assert_eq!(c.max_connections, 256);
        assert_eq!(c.max_concurrent_requests, 64);
        assert_eq!(c.header_timeout, Duration::from_secs(10));
        assert_eq!(c.body_timeout, Duration::from_secs(10));
        assert_eq!(c.max_body, 1024 * 1024);
        assert_eq!(c.failure_event_threshold, 20);
        assert_eq!(c.failure_event_window, Duration::from_secs(300));
        assert_eq!(c.incident_window, Duration::from_secs(300));
        assert!(c.confirm.is_none(), "confirmation is opt-in");
        // the old name of the threshold still parses (it never rotates now)
        assert_eq!(
            parse(&["--incident-threshold", "7"]).failure_event_threshold,
            7
        );

        let c = parse(&[
            "--confirm-key-file",
            "/etc/stripe-events-key/STRIPE_API_KEY",
            "--confirm-failure-mode",
            "closed",
        ]);
        let confirm = c.confirm.unwrap();
        assert_eq!(confirm.failure_mode, FailureMode::Closed);
        assert_eq!(confirm.api_base.as_str(), "https://api.stripe.com/");
        assert_eq!(confirm.timeout, Duration::from_secs(5));
        assert_eq!(confirm.concurrency, 8);
        assert_eq!(confirm.cache_capacity, 10_000);
        assert_eq!(
            confirm.key.file(),
            PathBuf::from("/etc/stripe-events-key/STRIPE_API_KEY")
        );
        assert_eq!(
            parse(&["--confirm-key-file", "/k"])
                .confirm
                .unwrap()
                .failure_mode,
            FailureMode::Open
        );
    }

    #[test]
    fn a_throttle_allows_one_action_per_interval() {
        let t = Throttle::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert!(t.ready(t0));
        assert!(!t.ready(t0 + Duration::from_secs(9)));
        assert!(t.ready(t0 + Duration::from_secs(10)));
    }
}
