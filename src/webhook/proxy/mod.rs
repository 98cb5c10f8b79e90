//! `stripe-key-operator verify-proxy`: a reverse proxy that runs as a sidecar in front of an
//! application's webhook route and lets through only requests that Stripe signed.
//!
//! For every request it:
//! 1. answers `503 no_secrets_loaded` while no secret could be read;
//! 2. requires a `Stripe-Signature` header (`400 missing_signature`) and a body of at most
//!    `--max-body` bytes (`413 body_too_large`);
//! 3. verifies the signature against every secret of the mounted Secret key
//!    (`400 malformed_signature`, `400 no_matching_signature`) and the timestamp against the
//!    tolerance (`400 timestamp_outside_tolerance`);
//! 4. refuses a signature it already accepted within the tolerance window
//!    (`400 replayed_event`, see [`replay`]);
//! 5. forwards the request unchanged (method, path, query, headers minus hop-by-hop ones, the raw
//!    body bytes) to the application on loopback and passes its answer back. When the
//!    application does not answer it replies `502 upstream_unavailable` (`504` on a timeout).
//!
//! Rejections carry the reason as a one-line `text/plain` body. Neither secrets nor bodies are
//! ever logged. The secrets file is re-read every `--reload-interval` (Kubernetes swaps Secret
//! volumes atomically); a file that cannot be read or holds no secret keeps the previous secrets.
//! Too many failed verifications within a window declare an incident (see [`incident`] and
//! [`RejectReason::counts_towards_incident`]).

pub mod incident;
pub mod metrics;
pub mod replay;
pub mod secrets;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio_util::sync::CancellationToken;
use url::Url;

use crate::api::DEFAULT_WEBHOOK_SECRETS_KEY;
use crate::telemetry::LogFormat;
use crate::webhook::signature::{SignatureError, VerifiedSignature, parse_header};

pub use incident::{EndpointRef, IncidentReporter, IncidentTracker};
pub use metrics::ProxyMetrics;
pub use replay::ReplayCache;
pub use secrets::{LoadedSecrets, SecretsFileError, SecretsSource};

/// Default address of the proxy (plain HTTP; TLS is terminated in front of the pod).
pub const DEFAULT_LISTEN: &str = "0.0.0.0:8443";
/// Default address of `/metrics`, `/healthz` and `/readyz`.
pub const DEFAULT_METRICS_ADDR: &str = "0.0.0.0:9464";
/// Default largest accepted body (Stripe events are far smaller).
pub const DEFAULT_MAX_BODY: usize = 1024 * 1024;
/// Default bound of the replay guard, in signatures.
pub const DEFAULT_REPLAY_CAPACITY: usize = 100_000;

/// Why a request was not forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RejectReason {
    /// No `Stripe-Signature` header.
    MissingSignature,
    /// The header could not be parsed (or is not text).
    MalformedSignature,
    /// No `v1` signature matches a loaded secret.
    NoMatchingSignature,
    /// A signature matched but its timestamp is outside the tolerance.
    TimestampOutsideTolerance,
    /// The signature was already accepted within the tolerance window.
    ReplayedEvent,
    /// The body is larger than `--max-body`.
    BodyTooLarge,
    /// No secret could be read yet.
    NoSecretsLoaded,
}

impl RejectReason {
    /// Every reason, for documentation and tests.
    pub const ALL: [RejectReason; 7] = [
        RejectReason::MissingSignature,
        RejectReason::MalformedSignature,
        RejectReason::NoMatchingSignature,
        RejectReason::TimestampOutsideTolerance,
        RejectReason::ReplayedEvent,
        RejectReason::BodyTooLarge,
        RejectReason::NoSecretsLoaded,
    ];

    /// The reason as written in the response body and the `reason` metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::MissingSignature => "missing_signature",
            RejectReason::MalformedSignature => "malformed_signature",
            RejectReason::NoMatchingSignature => "no_matching_signature",
            RejectReason::TimestampOutsideTolerance => "timestamp_outside_tolerance",
            RejectReason::ReplayedEvent => "replayed_event",
            RejectReason::BodyTooLarge => "body_too_large",
            RejectReason::NoSecretsLoaded => "no_secrets_loaded",
        }
    }

    /// The HTTP status answered: 400, except 413 for a large body and 503 without secrets.
    pub fn status(self) -> StatusCode {
        match self {
            RejectReason::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            RejectReason::NoSecretsLoaded => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::BAD_REQUEST,
        }
    }

    /// Whether the rejection counts towards an incident: a request with a well-formed
    /// `Stripe-Signature` that does not verify (forged or tampered), carries a stale timestamp,
    /// or replays an accepted request. Requests without a usable header (scanners and probes
    /// hitting a public URL), oversized bodies and a missing Secret do not count, so that noise
    /// cannot trigger rotations.
    pub fn counts_towards_incident(self) -> bool {
        matches!(
            self,
            RejectReason::NoMatchingSignature
                | RejectReason::TimestampOutsideTolerance
                | RejectReason::ReplayedEvent
        )
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
    /// How often the secrets file is checked for a change.
    #[arg(long, env = "PROXY_RELOAD_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    pub reload_interval: Duration,
    /// Accepted distance between a signature's timestamp and now (Stripe's libraries: 5m).
    #[arg(long, env = "PROXY_TOLERANCE", default_value = "5m", value_parser = humantime::parse_duration)]
    pub tolerance: Duration,
    /// Largest accepted request body, in bytes.
    #[arg(long, env = "PROXY_MAX_BODY", default_value_t = DEFAULT_MAX_BODY)]
    pub max_body: usize,
    /// Most signatures remembered by the replay guard (about 100 bytes each).
    #[arg(long, env = "PROXY_REPLAY_CAPACITY", default_value_t = DEFAULT_REPLAY_CAPACITY)]
    pub replay_capacity: usize,
    /// Address of `/metrics`, `/healthz` and `/readyz` (ready once secrets are loaded).
    #[arg(long, env = "PROXY_METRICS_ADDR", default_value = DEFAULT_METRICS_ADDR)]
    pub metrics_addr: SocketAddr,
    /// How long the application may take to answer a forwarded request.
    #[arg(long, env = "PROXY_UPSTREAM_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub upstream_timeout: Duration,
    /// Failed verifications within `--incident-window` that declare an incident (0: never).
    /// Counted: signatures that match no secret, stale timestamps and replays; requests
    /// without a usable Stripe-Signature header (scanners) are not.
    #[arg(long, env = "PROXY_INCIDENT_THRESHOLD", default_value_t = 20)]
    pub incident_threshold: u32,
    /// The window of `--incident-threshold`; at most one incident is declared per window.
    #[arg(long, env = "PROXY_INCIDENT_WINDOW", default_value = "5m", value_parser = humantime::parse_duration)]
    pub incident_window: Duration,
    /// The `NAMESPACE/NAME` of the StripeWebhookEndpoint whose secret this proxy checks; an
    /// incident records a Warning Event on it (in-cluster config or KUBECONFIG).
    #[arg(long, env = "PROXY_ENDPOINT")]
    pub endpoint: Option<EndpointRef>,
    /// On an incident, also set `stripekeys.io/rotate` with reason `incident` on the endpoint,
    /// which makes the operator rotate the secret and revoke the old one at once.
    #[arg(long, env = "PROXY_INCIDENT_ROTATE", default_value_t = false, action = clap::ArgAction::Set)]
    pub incident_rotate: bool,
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
            metrics_addr: Some(self.metrics_addr),
            upstream_timeout: self.upstream_timeout,
            incident_threshold: self.incident_threshold,
            incident_window: self.incident_window,
            endpoint: self.endpoint.clone(),
            incident_rotate: self.incident_rotate,
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
    /// Address of the metrics and health endpoints; `None` serves none.
    pub metrics_addr: Option<SocketAddr>,
    /// Upstream answer timeout.
    pub upstream_timeout: Duration,
    /// Failures that declare an incident (0: never).
    pub incident_threshold: u32,
    /// Window of the threshold.
    pub incident_window: Duration,
    /// Endpoint to record incidents on.
    pub endpoint: Option<EndpointRef>,
    /// Request an incident rotation on an incident.
    pub incident_rotate: bool,
}

impl ProxyConfig {
    /// Defaults for embedding and tests: listen on `127.0.0.1:0`, no metrics endpoint, 1 s
    /// reloads, 5 min tolerance, 1 MiB bodies, 100 000 signatures, incidents after 20 failures
    /// in 5 min without Kubernetes.
    pub fn new(upstream: Url, secrets: SecretsSource) -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            upstream,
            secrets,
            reload_interval: Duration::from_secs(1),
            tolerance: crate::webhook::signature::DEFAULT_TOLERANCE,
            max_body: DEFAULT_MAX_BODY,
            replay_capacity: DEFAULT_REPLAY_CAPACITY,
            metrics_addr: None,
            upstream_timeout: Duration::from_secs(30),
            incident_threshold: 20,
            incident_window: Duration::from_secs(300),
            endpoint: None,
            incident_rotate: false,
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

struct Shared {
    upstream_base: String,
    source: SecretsSource,
    tolerance: Duration,
    max_body: usize,
    secrets: secrets::SecretsSlot,
    replay: Mutex<ReplayCache>,
    incidents: Mutex<IncidentTracker>,
    incident_window: Duration,
    incident_threshold: u32,
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
        if config.reload_interval.is_zero() {
            return Err(ProxyError::InvalidConfig(
                "--reload-interval must be positive".into(),
            ));
        }
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
            secrets: secrets::SecretsSlot::default(),
            replay: Mutex::new(ReplayCache::new(config.replay_capacity)),
            incidents: Mutex::new(IncidentTracker::new(
                config.incident_threshold,
                config.incident_window,
            )),
            incident_window: config.incident_window,
            incident_threshold: config.incident_threshold,
            reporter,
            metrics: ProxyMetrics::new(),
            http,
        });
        if let Err(e) = shared.reload() {
            tracing::error!(error = %e, "no webhook signing secrets loaded; answering 503 until the file is readable");
        }

        let shutdown = CancellationToken::new();
        let mut tasks = Vec::new();
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|source| ProxyError::Bind {
                addr: config.listen,
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| ProxyError::Bind {
            addr: config.listen,
            source,
        })?;
        let metrics_listener = match config.metrics_addr {
            Some(a) => Some(
                tokio::net::TcpListener::bind(a)
                    .await
                    .map_err(|source| ProxyError::Bind { addr: a, source })?,
            ),
            None => None,
        };
        let metrics_addr = match &metrics_listener {
            Some(l) => Some(l.local_addr().map_err(|source| ProxyError::Bind {
                addr: config.metrics_addr.unwrap_or(addr),
                source,
            })?),
            None => None,
        };

        let app = Router::new().fallback(handle).with_state(shared.clone());
        let token = shutdown.clone();
        tasks.push(tokio::spawn(async move {
            let result = axum::serve(listener, app)
                .with_graceful_shutdown(async move { token.cancelled().await })
                .await;
            if let Err(e) = result {
                tracing::error!(error = %e, "verify-proxy server failed");
            }
        }));
        if let Some(listener) = metrics_listener {
            let app = Router::new()
                .route("/metrics", get(metrics_handler))
                .route("/healthz", get(|| async { "ok" }))
                .route("/readyz", get(readyz))
                .with_state(shared.clone());
            let token = shutdown.clone();
            tasks.push(tokio::spawn(async move {
                let result = axum::serve(listener, app)
                    .with_graceful_shutdown(async move { token.cancelled().await })
                    .await;
                if let Err(e) = result {
                    tracing::error!(error = %e, "verify-proxy metrics server failed");
                }
            }));
        }
        let reloader = shared.clone();
        let token = shutdown.clone();
        let interval = config.reload_interval;
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut last_error: Option<String> = None;
            loop {
                tokio::select! {
                    _ = token.cancelled() => break,
                    _ = tick.tick() => {}
                }
                let r = reloader.clone();
                // file I/O off the async workers
                let result = tokio::task::spawn_blocking(move || r.reload()).await;
                match result {
                    Ok(Ok(_)) => last_error = None,
                    Ok(Err(e)) => {
                        let text = e.to_string();
                        if last_error.as_deref() != Some(text.as_str()) {
                            tracing::warn!(error = %text, "keeping the previous webhook secrets");
                            last_error = Some(text);
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
    if reason.counts_towards_incident() {
        let fire = lock(&shared.incidents).record_failure(Instant::now());
        if fire {
            declare_incident(shared);
        }
    }
    (
        reason.status(),
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        format!("{}\n", reason.as_str()),
    )
        .into_response()
}

fn declare_incident(shared: &Shared) {
    shared.metrics.incidents.inc();
    let window = humantime::format_duration(shared.incident_window).to_string();
    match &shared.reporter {
        Some(reporter) => {
            tracing::warn!(
                failures = shared.incident_threshold,
                %window,
                endpoint = %reporter.endpoint(),
                "too many failed webhook verifications: declaring an incident"
            );
            let reporter = reporter.clone();
            let metrics = shared.metrics.clone();
            let (failures, window) = (shared.incident_threshold, shared.incident_window);
            tokio::spawn(async move {
                if let Err(e) = reporter.report(failures, window).await {
                    metrics.incident_report_failures.inc();
                    tracing::error!(error = %e, endpoint = %reporter.endpoint(), "could not record the incident on the StripeWebhookEndpoint");
                }
            });
        }
        None => tracing::warn!(
            failures = shared.incident_threshold,
            %window,
            "too many failed webhook verifications (no --endpoint: nothing recorded in Kubernetes)"
        ),
    }
}

/// Headers that apply to one connection only and are never forwarded (RFC 9110 §7.6.1).
const HOP_BY_HOP: [&str; 9] = [
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
    let Some(signature) = parts.headers.get("stripe-signature").cloned() else {
        return reject(&shared, RejectReason::MissingSignature);
    };
    let declared_len = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared_len.is_some_and(|n| n > shared.max_body as u64) {
        return reject(&shared, RejectReason::BodyTooLarge);
    }
    let body = match axum::body::to_bytes(body, shared.max_body).await {
        Ok(b) => b,
        Err(_) => return reject(&shared, RejectReason::BodyTooLarge),
    };
    let now = now_unix();
    let verified = match verify_request(&secrets, Some(signature.as_bytes()), &body, now) {
        Ok(v) => v,
        Err(reason) => return reject(&shared, reason),
    };
    if !remember(&shared, &signature, verified.timestamp, now) {
        return reject(&shared, RejectReason::ReplayedEvent);
    }
    shared
        .metrics
        .verified
        .get_or_create(&metrics::SecretLabels {
            secret_index: verified.secret_index.to_string(),
        })
        .inc();
    forward(&shared, parts, body).await
}

/// Records the header's signatures in the replay guard; false for a replay.
fn remember(shared: &Shared, signature: &HeaderValue, timestamp: i64, now: i64) -> bool {
    // The header verified, so it parses.
    let Ok(parsed) = signature
        .to_str()
        .map_err(|_| ())
        .and_then(|s| parse_header(s).map_err(|_| ()))
    else {
        return false;
    };
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
    let wants_openmetrics = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/openmetrics-text"));
    let text = shared.metrics.encode();
    if wants_openmetrics {
        (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response()
    } else {
        (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            crate::metrics::openmetrics_to_prometheus_text(&text),
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

async fn shutdown_signal() {
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
        assert!(!RejectReason::NoSecretsLoaded.counts_towards_incident());
        assert!(!RejectReason::MissingSignature.counts_towards_incident());
        assert!(!RejectReason::MalformedSignature.counts_towards_incident());
        assert!(RejectReason::NoMatchingSignature.counts_towards_incident());
        assert!(RejectReason::ReplayedEvent.counts_towards_incident());
    }
}
