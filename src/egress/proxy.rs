//! `stripe-key-operator egress-proxy`: the egress key broker, a sidecar between an application
//! and Stripe's API.
//!
//! The application holds only a **placeholder** key ([`PLACEHOLDER_PREFIX`]) and points its
//! Stripe SDK's API base at this proxy on loopback. For every request the proxy:
//! 1. answers `503` (`broker_overloaded`) when `--max-concurrent-requests` are in flight, and
//!    `503` (`broker_key_unavailable`) while no key could be read;
//! 2. refuses a request that carries a literal Stripe key of its own (`403`,
//!    `literal_api_key_refused`): in `Authorization` (Bearer or Basic), in any other header or in
//!    the query string. The application must not hold a key; the body is not inspected (it is
//!    streamed, never buffered);
//! 3. refuses a request whose `Authorization` is not the published placeholder (`401`);
//! 4. looks up the permission the route needs in the one route table ([`super::routes`]) and,
//!    when the key's permissions cannot serve it, answers locally with Stripe's `403` naming the
//!    missing permission (`broker_permission_missing`): no byte leaves the pod. A route outside
//!    the table is refused the same way (`broker_route_unlisted`) unless
//!    `--allow-unlisted-routes`;
//! 5. otherwise replaces `Authorization` with the real key and forwards the request to
//!    `--upstream` (Stripe's API over TLS; `http://` only on loopback with
//!    `--allow-loopback-upstream`), streaming the request and response bodies, keeping every
//!    header except the hop-by-hop ones of RFC 9110 §7.6.1 (and `Host`, which names the
//!    upstream), and passing status, headers and body back unchanged. An upstream that cannot
//!    be reached is answered `502` (`broker_upstream_unavailable`, `Stripe-Should-Retry: true`).
//!
//! The key, its permissions and the placeholder are read from the mounted Secret volume
//! (`--key-dir`) and re-read every `--reload-interval`: the kubelet updates the volume when the
//! operator rotates the key, and the proxy switches keys between requests. A request holds the
//! key it started with, so requests in flight finish on the old key, which the operator keeps
//! valid for the rotation's overlap. No rollout is needed.
//!
//! With `--anomaly-policy`, a permission the key may use is also checked by the anomaly
//! detector ([`super::anomaly`]) after step 4: a burst far above the permission's learned rate
//! is recorded (metric, Warning Event on `--policy`), and with the `Throttle` action further
//! requests of that permission are answered locally with Stripe's `429 rate_limit` (outcome
//! `throttled`; nothing is forwarded); with `IncidentRotation` an incident rotation of the policy
//! is requested. The Kubernetes side effects run off the request path.
//!
//! Usage is counted per permission (`stripe_key_operator_egress_requests_total{permission,
//! outcome}` and `GET /usage` on the admin address). Logs, metrics and `/usage` never carry the
//! key, the placeholder or a body: only the key's fingerprint.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use chrono::{DateTime, SecondsFormat, Utc};
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use url::Url;

use super::anomaly::{
    ActionSink, AnomalyMetrics, AnomalyPolicy, AnomalyPolicyFile, Detector, KubeActionSink,
    Responder,
};
use super::routes::{self, ROUTES_VERSION};
use crate::secret::SecretString;
use crate::telemetry::LogFormat;
use crate::webhook::proxy::serve::{self, ConnMetrics, ServeLimits};

/// Every placeholder starts with this. Stripe's keys start `sk_test_`, `sk_live_`, `rk_test_`
/// or `rk_live_`, so Stripe answers a placeholder that leaks past the broker with `401 Invalid
/// API Key`; the `rk_` start keeps SDKs and tools that expect a restricted key's shape quiet,
/// and secret scanners (ours included) do not report it, because it grants nothing.
pub const PLACEHOLDER_PREFIX: &str = "rk_broker_placeholder_";
/// Secret key of the real API key in brokered delivery (mounted only into the sidecar).
pub const DEFAULT_KEY_ENTRY: &str = "STRIPE_BROKER_API_KEY";
/// Secret key of the real key's permissions, comma-separated (mounted into the sidecar).
pub const DEFAULT_PERMISSIONS_ENTRY: &str = "STRIPE_BROKER_PERMISSIONS";
/// Secret key of the placeholder (the application's `STRIPE_API_KEY`).
pub const DEFAULT_PLACEHOLDER_ENTRY: &str = "STRIPE_API_KEY";
/// Secret key of the anomaly policy of `spec.delivery.broker.anomaly` (YAML, with the policy's
/// `NAMESPACE/NAME`; mounted into the sidecar; absent without the field).
pub const DEFAULT_ANOMALY_ENTRY: &str = "STRIPE_BROKER_ANOMALY_POLICY";
/// Secret key of the API base the application uses (`http://127.0.0.1:<port>`).
pub const API_BASE_ENTRY: &str = "STRIPE_API_BASE";
/// Default port of the broker on loopback.
pub const DEFAULT_PORT: u16 = 12111;
/// Default address of `/usage`, `/metrics`, `/healthz` and `/readyz`.
pub const DEFAULT_ADMIN_ADDR: &str = "0.0.0.0:9465";
/// Default upstream: Stripe's API.
pub const DEFAULT_UPSTREAM: &str = "https://api.stripe.com";
/// Default bound of open client connections.
pub const DEFAULT_MAX_CONNECTIONS: usize = 256;
/// Default bound of requests being forwarded at once.
pub const DEFAULT_MAX_CONCURRENT_REQUESTS: usize = 128;
/// Largest key, permissions or placeholder file read.
const MAX_FILE_LEN: u64 = 16 * 1024;

/// The placeholder of the policy with `uid`: derived from the UID (never from a key), so it is
/// stable across rotations and the application's environment never changes.
pub fn placeholder_for(uid: &str) -> String {
    let digest = aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA256,
        format!("stripe-key-operator egress-broker placeholder\n{uid}").as_bytes(),
    );
    format!(
        "{PLACEHOLDER_PREFIX}{}",
        hex::encode(&digest.as_ref()[..16])
    )
}

/// Outcomes of a request, the `outcome` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Forwarded upstream and answered.
    Forwarded,
    /// Refused locally: the key's permissions cannot serve the route (or it is unlisted).
    RefusedPermission,
    /// Refused locally: the request carries a literal Stripe key.
    RefusedLiteralKey,
    /// Refused locally: `Authorization` is not the placeholder.
    RefusedUnauthenticated,
    /// Refused locally: no key loaded, or too many requests in flight.
    Unavailable,
    /// Forwarded, but the upstream did not answer.
    UpstreamError,
    /// Answered locally with `429 rate_limit`: the permission is throttled after a burst.
    Throttled,
}

impl Outcome {
    /// Every outcome.
    pub const ALL: [Outcome; 7] = [
        Outcome::Forwarded,
        Outcome::RefusedPermission,
        Outcome::RefusedLiteralKey,
        Outcome::RefusedUnauthenticated,
        Outcome::Unavailable,
        Outcome::UpstreamError,
        Outcome::Throttled,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Forwarded => "forwarded",
            Outcome::RefusedPermission => "refused_permission",
            Outcome::RefusedLiteralKey => "refused_literal_key",
            Outcome::RefusedUnauthenticated => "refused_unauthenticated",
            Outcome::Unavailable => "unavailable",
            Outcome::UpstreamError => "upstream_error",
            Outcome::Throttled => "throttled",
        }
    }
}

/// The permission label of a route outside the table.
pub const UNLISTED: &str = "unlisted";

/// Labels of `stripe_key_operator_egress_requests_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The permission the route needs, or `unlisted`.
    pub permission: String,
    /// One of [`Outcome::as_str`].
    pub outcome: String,
}

/// Label of key reloads.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    /// `applied` or `failed`.
    pub outcome: String,
}

/// The broker's metrics (prefix `stripe_key_operator_egress_`).
#[derive(Clone)]
pub struct EgressMetrics {
    /// Requests by permission and outcome.
    pub requests: Family<RequestLabels, Counter>,
    /// Time from forwarding to the upstream's response headers.
    pub upstream_duration: Histogram,
    /// Changes of the mounted key applied or failed.
    pub key_reloads: Family<ReloadLabels, Counter>,
    /// Whether a key is loaded (1) or not (0).
    pub key_loaded: Gauge,
    /// Requests being forwarded now.
    pub requests_in_flight: Gauge,
    /// Connections open now.
    pub connections_open: Gauge,
    /// Connections refused because `--max-connections` were open.
    pub connections_refused: Counter,
    /// The anomaly detector's metrics, when detection is on (served on the same `/metrics`).
    pub anomaly: Option<AnomalyMetrics>,
    registry: Arc<Registry>,
}

impl Default for EgressMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl EgressMetrics {
    /// Creates and registers every metric (without the anomaly metrics).
    pub fn new() -> Self {
        Self::build(None)
    }

    /// Creates and registers every metric, and `anomaly`'s too.
    pub fn with_anomaly(anomaly: AnomalyMetrics) -> Self {
        Self::build(Some(anomaly))
    }

    fn build(anomaly: Option<AnomalyMetrics>) -> Self {
        let mut registry = Registry::with_prefix("stripe_key_operator_egress");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests to the egress broker by the permission their route needs and outcome",
            requests.clone(),
        );
        let upstream_duration = Histogram::new([
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
        ]);
        registry.register(
            "upstream_duration_seconds",
            "Time from forwarding a request to Stripe's response headers",
            upstream_duration.clone(),
        );
        let key_reloads = Family::<ReloadLabels, Counter>::default();
        registry.register(
            "key_reloads",
            "Changes of the mounted key, applied or failed",
            key_reloads.clone(),
        );
        let key_loaded = Gauge::default();
        registry.register(
            "key_loaded",
            "1 while a key is loaded, 0 while requests are answered 503",
            key_loaded.clone(),
        );
        let requests_in_flight = Gauge::default();
        registry.register(
            "requests_in_flight",
            "Requests being forwarded now (bounded by --max-concurrent-requests)",
            requests_in_flight.clone(),
        );
        let connections_open = Gauge::default();
        registry.register(
            "connections_open",
            "Client connections open now",
            connections_open.clone(),
        );
        let connections_refused = Counter::default();
        registry.register(
            "connections_refused",
            "Connections refused because --max-connections were open",
            connections_refused.clone(),
        );
        if let Some(a) = &anomaly {
            a.register(&mut registry);
        }
        Self {
            requests,
            upstream_duration,
            key_reloads,
            key_loaded,
            requests_in_flight,
            connections_open,
            connections_refused,
            anomaly,
            registry: Arc::new(registry),
        }
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    fn count(&self, permission: &str, outcome: Outcome) {
        self.requests
            .get_or_create(&RequestLabels {
                permission: permission.to_owned(),
                outcome: outcome.as_str().to_owned(),
            })
            .inc();
    }
}

/// Errors starting the broker or reading its key.
#[derive(Debug, thiserror::Error)]
pub enum EgressError {
    /// The listen address is not on loopback.
    #[error(
        "--listen {0} must be a loopback address (127.0.0.1 or [::1]): anything that reaches the \
         broker can use its key"
    )]
    ListenNotLoopback(SocketAddr),
    /// The upstream is not usable.
    #[error(
        "--upstream {0} must be an https:// URL without path, query or fragment (http:// only on \
         a loopback address with --allow-loopback-upstream)"
    )]
    BadUpstream(String),
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
    #[error("invalid egress-proxy settings: {0}")]
    InvalidConfig(String),
    /// A mounted file could not be read.
    #[error("cannot read {path}: {source}; check that the Secret is mounted and holds the key")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A mounted file is unusable (never contains its content).
    #[error("{path}: {problem}")]
    BadFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        problem: &'static str,
    },
}

/// Command-line flags of `stripe-key-operator egress-proxy` (each also read from the
/// environment).
#[derive(clap::Args, Debug, Clone)]
pub struct EgressProxyArgs {
    /// Address the broker listens on: loopback only (the application is in the same pod).
    #[arg(long, env = "EGRESS_LISTEN", default_value_t = SocketAddr::from(([127, 0, 0, 1], DEFAULT_PORT)))]
    pub listen: SocketAddr,
    /// Address of `/usage`, `/metrics`, `/healthz` and `/readyz` (none carries a secret).
    #[arg(long, env = "EGRESS_ADMIN_ADDR", default_value = DEFAULT_ADMIN_ADDR)]
    pub admin_addr: SocketAddr,
    /// Stripe's API base. `http://` only on loopback with `--allow-loopback-upstream`.
    #[arg(long, env = "EGRESS_UPSTREAM", default_value = DEFAULT_UPSTREAM)]
    pub upstream: Url,
    /// Accept an `http://` upstream on a loopback address (the simulator, tests).
    #[arg(long, env = "EGRESS_ALLOW_LOOPBACK_UPSTREAM", default_value_t = false)]
    pub allow_loopback_upstream: bool,
    /// The mounted Secret volume holding the real key, its permissions and the placeholder.
    #[arg(long, env = "EGRESS_KEY_DIR")]
    pub key_dir: PathBuf,
    /// The file of the real key in `--key-dir`.
    #[arg(long, env = "EGRESS_KEY_ENTRY", default_value = DEFAULT_KEY_ENTRY)]
    pub key_entry: String,
    /// The file of the key's comma-separated permissions in `--key-dir`.
    #[arg(long, env = "EGRESS_PERMISSIONS_ENTRY", default_value = DEFAULT_PERMISSIONS_ENTRY)]
    pub permissions_entry: String,
    /// The file of the placeholder in `--key-dir`. When it is absent, any placeholder-shaped
    /// `Authorization` is accepted.
    #[arg(long, env = "EGRESS_PLACEHOLDER_ENTRY", default_value = DEFAULT_PLACEHOLDER_ENTRY)]
    pub placeholder_entry: String,
    /// How often the mounted files are checked for a change.
    #[arg(long, env = "EGRESS_RELOAD_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    pub reload_interval: Duration,
    /// Forward routes outside the route table (counted as `permission="unlisted"`) instead of
    /// refusing them. Stripe still enforces the key's permissions.
    #[arg(long, env = "EGRESS_ALLOW_UNLISTED_ROUTES", default_value_t = false)]
    pub allow_unlisted_routes: bool,
    /// Most client connections open at once; more are answered 503 and closed.
    #[arg(long, env = "EGRESS_MAX_CONNECTIONS", default_value_t = DEFAULT_MAX_CONNECTIONS)]
    pub max_connections: usize,
    /// Most requests forwarded at once, each until its answer is complete (streamed bodies
    /// included); more are answered `503 broker_overloaded`.
    #[arg(long, env = "EGRESS_MAX_CONCURRENT_REQUESTS", default_value_t = DEFAULT_MAX_CONCURRENT_REQUESTS)]
    pub max_concurrent_requests: usize,
    /// Time a client has to send its request headers (and an idle keep-alive connection its
    /// next request).
    #[arg(long, env = "EGRESS_HEADER_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub header_timeout: Duration,
    /// Longest silence of the upstream while connecting or answering (Stripe's SDKs wait 80 s
    /// for a whole request).
    #[arg(long, env = "EGRESS_UPSTREAM_TIMEOUT", default_value = "80s", value_parser = humantime::parse_duration)]
    pub upstream_timeout: Duration,
    /// The file of the anomaly policy in `--key-dir` (what the operator publishes from
    /// `spec.delivery.broker.anomaly`). Re-read with the key: detection follows it (on while the
    /// file is there, off without it; a change keeps what was learned). An invalid file is
    /// logged and the previous policy kept. Ignored with `--anomaly-policy`.
    #[arg(long, env = "EGRESS_ANOMALY_ENTRY", default_value = DEFAULT_ANOMALY_ENTRY)]
    pub anomaly_entry: String,
    /// Anomaly detection from a YAML or JSON file of your own instead of the mounted entry
    /// (`action`: Record, Throttle or IncidentRotation; `sensitivePermissions`, `sigmas`,
    /// `minRequestsPerMinute`, `minRatio`, `maxDailyGrowth`, `warmUp`, `throttleFor`). Needs
    /// `--policy`. Read once; a file that cannot be read or is invalid stops the broker at
    /// start.
    #[arg(
        long,
        env = "EGRESS_ANOMALY_POLICY",
        requires = "policy",
        value_name = "FILE"
    )]
    pub anomaly_policy: Option<PathBuf>,
    /// The StripeKeyPolicy (`NAMESPACE/NAME`) that anomaly Warning Events and incident rotation
    /// requests go to (the sidecar's ServiceAccount needs `get`/`patch` on it and `create`/`patch`
    /// on `events.k8s.io` Events). Needed with `--anomaly-policy`; otherwise it overrides the
    /// policy named in the mounted entry.
    #[arg(long, env = "EGRESS_POLICY", value_name = "NAMESPACE/NAME")]
    pub policy: Option<String>,
    /// Log format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Auto)]
    pub log_format: LogFormat,
}

/// Reads an anomaly policy from a YAML or JSON file (JSON is YAML) and checks it.
pub fn load_anomaly_policy(path: &Path) -> Result<AnomalyPolicy, EgressError> {
    let bytes = read_bounded(path)?;
    parse_anomaly_file(&format!("--anomaly-policy {}", path.display()), &bytes).map(|f| f.anomaly)
}

/// Parses and checks the text of an anomaly policy file (`what` names it in errors). The
/// `policy`, when given, must be `NAMESPACE/NAME`.
pub fn parse_anomaly_file(what: &str, bytes: &[u8]) -> Result<AnomalyPolicyFile, EgressError> {
    let file: AnomalyPolicyFile = serde_yaml::from_slice(bytes)
        .map_err(|e| EgressError::InvalidConfig(format!("{what}: not an anomaly policy: {e}")))?;
    file.anomaly
        .detector_config()
        .map_err(|e| EgressError::InvalidConfig(format!("{what}: {e}")))?;
    if let Some(p) = &file.policy {
        parse_policy_ref(p)?;
    }
    Ok(file)
}

/// Splits `--policy NAMESPACE/NAME`.
pub fn parse_policy_ref(text: &str) -> Result<(String, String), EgressError> {
    let bad = || {
        EgressError::InvalidConfig(format!(
            "--policy {text:?} must be NAMESPACE/NAME of the StripeKeyPolicy"
        ))
    };
    let (ns, name) = text.split_once('/').ok_or_else(bad)?;
    let ok = |s: &str| {
        !s.is_empty()
            && s.len() <= 253
            && s.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
    };
    if !ok(ns) || !ok(name) {
        return Err(bad());
    }
    Ok((ns.to_owned(), name.to_owned()))
}

/// The clock of the anomaly detector (tests drive simulated time with it).
pub type Clock = Arc<dyn Fn() -> SystemTime + Send + Sync>;

/// Makes the sink of StripeKeyPolicy `(namespace, name)`: where the Warning Events and incident
/// rotation requests of that policy go.
pub type SinkFactory = Arc<dyn Fn(&str, &str) -> Arc<dyn ActionSink> + Send + Sync>;

/// Anomaly detection of a broker: the policy (fixed, or the one mounted next to the key), where
/// its Events and incident rotation requests go, and the clock.
#[derive(Clone)]
pub struct AnomalySetup {
    /// `Some`: this policy for the broker's life (`--anomaly-policy`). `None`: the policy the
    /// operator publishes in the key volume's anomaly entry ([`DEFAULT_ANOMALY_ENTRY`]),
    /// re-read with the key; no detection while there is none.
    pub policy: Option<AnomalyPolicy>,
    /// The StripeKeyPolicy `(namespace, name)` (`--policy`); overrides the mounted entry's.
    pub policy_ref: Option<(String, String)>,
    /// The sink of a StripeKeyPolicy.
    pub sinks: SinkFactory,
    /// The time of a request (default [`SystemTime::now`]).
    pub clock: Clock,
    /// How often quiet windows are closed (default 5 s).
    pub tick_interval: Duration,
}

impl AnomalySetup {
    /// `policy` acting through `sink`, on the system clock.
    pub fn new(policy: AnomalyPolicy, sink: Arc<dyn ActionSink>) -> Self {
        Self {
            policy: Some(policy),
            ..Self::mounted(Arc::new(move |_: &str, _: &str| sink.clone()))
        }
    }

    /// The policy of the mounted anomaly entry, acting through the sinks `sinks` makes for the
    /// StripeKeyPolicy it names, on the system clock.
    pub fn mounted(sinks: SinkFactory) -> Self {
        Self {
            policy: None,
            policy_ref: None,
            sinks,
            clock: Arc::new(SystemTime::now),
            tick_interval: Duration::from_secs(5),
        }
    }
}

impl std::fmt::Debug for AnomalySetup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AnomalySetup")
            .field("policy", &self.policy)
            .field("policy_ref", &self.policy_ref)
            .field("tick_interval", &self.tick_interval)
            .finish_non_exhaustive()
    }
}

impl EgressProxyArgs {
    /// The broker settings of these flags.
    pub fn config(&self) -> EgressConfig {
        EgressConfig {
            listen: self.listen,
            admin_addr: Some(self.admin_addr),
            upstream: self.upstream.clone(),
            allow_loopback_upstream: self.allow_loopback_upstream,
            key: KeySource {
                dir: self.key_dir.clone(),
                key_entry: self.key_entry.clone(),
                permissions_entry: self.permissions_entry.clone(),
                placeholder_entry: self.placeholder_entry.clone(),
                anomaly_entry: self.anomaly_entry.clone(),
            },
            reload_interval: self.reload_interval,
            allow_unlisted_routes: self.allow_unlisted_routes,
            max_connections: self.max_connections,
            max_concurrent_requests: self.max_concurrent_requests,
            header_timeout: self.header_timeout,
            upstream_timeout: self.upstream_timeout,
            anomaly: None,
        }
    }
}

/// Settings of a broker.
#[derive(Debug, Clone)]
pub struct EgressConfig {
    /// Loopback address to listen on.
    pub listen: SocketAddr,
    /// Address of the admin endpoints; `None` serves none.
    pub admin_addr: Option<SocketAddr>,
    /// Stripe's API base.
    pub upstream: Url,
    /// Accept `http://` on loopback.
    pub allow_loopback_upstream: bool,
    /// Where the key is read.
    pub key: KeySource,
    /// How often the key is re-read.
    pub reload_interval: Duration,
    /// Forward unlisted routes.
    pub allow_unlisted_routes: bool,
    /// Bound of open connections.
    pub max_connections: usize,
    /// Bound of requests forwarded at once.
    pub max_concurrent_requests: usize,
    /// Deadline of request headers.
    pub header_timeout: Duration,
    /// Upstream silence allowed.
    pub upstream_timeout: Duration,
    /// Anomaly detection; `None`: none.
    pub anomaly: Option<AnomalySetup>,
}

impl EgressConfig {
    /// Defaults for embedding and tests: `127.0.0.1:0`, admin endpoints on `127.0.0.1:0`, the
    /// default entries in `key_dir`, 1 s reloads, unlisted routes refused, 256 connections,
    /// 128 requests in flight, 10 s for headers, 80 s of upstream silence.
    pub fn new(upstream: Url, key_dir: impl Into<PathBuf>) -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            admin_addr: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
            upstream,
            allow_loopback_upstream: false,
            key: KeySource::new(key_dir),
            reload_interval: Duration::from_secs(1),
            allow_unlisted_routes: false,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_concurrent_requests: DEFAULT_MAX_CONCURRENT_REQUESTS,
            header_timeout: Duration::from_secs(10),
            upstream_timeout: Duration::from_secs(80),
            anomaly: None,
        }
    }
}

/// Checks the upstream: `https://` (or `http://` on loopback when allowed), no path beyond `/`,
/// no query, no fragment, no credentials.
pub fn check_upstream(url: &Url, allow_loopback: bool) -> Result<(), EgressError> {
    let loopback = match url.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        None => false,
    };
    let scheme_ok = match url.scheme() {
        "https" => true,
        "http" => allow_loopback && loopback,
        _ => false,
    };
    if !scheme_ok
        || url.host().is_none()
        || url.path() != "/"
        || url.query().is_some()
        || url.fragment().is_some()
        || !url.username().is_empty()
        || url.password().is_some()
    {
        return Err(EgressError::BadUpstream(url.to_string()));
    }
    Ok(())
}

/// Where the key is read: files of a Secret volume.
#[derive(Debug, Clone)]
pub struct KeySource {
    /// The volume's directory.
    pub dir: PathBuf,
    /// File of the real key.
    pub key_entry: String,
    /// File of the permissions.
    pub permissions_entry: String,
    /// File of the placeholder.
    pub placeholder_entry: String,
    /// File of the anomaly policy (read only when detection follows the mounted entry).
    pub anomaly_entry: String,
}

impl KeySource {
    /// The default entries in `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            key_entry: DEFAULT_KEY_ENTRY.into(),
            permissions_entry: DEFAULT_PERMISSIONS_ENTRY.into(),
            placeholder_entry: DEFAULT_PLACEHOLDER_ENTRY.into(),
            anomaly_entry: DEFAULT_ANOMALY_ENTRY.into(),
        }
    }

    /// The anomaly entry's bytes (`None` when the volume holds none), read below `..data`
    /// like the key, and the path it was read from.
    pub fn read_anomaly(&self) -> Result<(PathBuf, Option<Vec<u8>>), EgressError> {
        let base = std::fs::canonicalize(self.dir.join("..data")).unwrap_or(self.dir.clone());
        let path = base.join(&self.anomaly_entry);
        match read_bounded(&path) {
            Ok(bytes) => Ok((path, Some(bytes))),
            Err(EgressError::Read { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                Ok((path, None))
            }
            Err(e) => Err(e),
        }
    }

    /// Reads the key, its permissions and the placeholder as one snapshot: a Secret volume's
    /// files are symlinks into `..data`, which the kubelet swaps atomically, so the files are
    /// read below the directory `..data` points to at the start (never half of two versions).
    pub fn read(&self) -> Result<LoadedKey, EgressError> {
        let base = std::fs::canonicalize(self.dir.join("..data")).unwrap_or(self.dir.clone());
        let key_path = base.join(&self.key_entry);
        let key = read_bounded(&key_path)?;
        let key = String::from_utf8(key).map_err(|_| EgressError::BadFile {
            path: key_path.clone(),
            problem: "the key is not text",
        })?;
        let key = key.trim();
        if key.is_empty() {
            return Err(EgressError::BadFile {
                path: key_path,
                problem: "the key file is empty",
            });
        }
        if key.starts_with(PLACEHOLDER_PREFIX) {
            return Err(EgressError::BadFile {
                path: key_path,
                problem: "the key file holds the placeholder, not the key: mount the broker's entry",
            });
        }
        if !(key.starts_with("rk_") || key.starts_with("sk_")) || key.contains(char::is_whitespace)
        {
            return Err(EgressError::BadFile {
                path: key_path,
                problem: "the key file does not hold a Stripe secret or restricted key (sk_/rk_)",
            });
        }
        let key = SecretString::new(key);
        let perm_path = base.join(&self.permissions_entry);
        let permissions = String::from_utf8_lossy(&read_bounded(&perm_path)?)
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(str::to_owned)
            .collect::<Vec<_>>();
        let placeholder_path = base.join(&self.placeholder_entry);
        let placeholder = match read_bounded(&placeholder_path) {
            Ok(bytes) => {
                let text = String::from_utf8_lossy(&bytes).trim().to_owned();
                if !text.starts_with(PLACEHOLDER_PREFIX) {
                    return Err(EgressError::BadFile {
                        path: placeholder_path,
                        problem: "the placeholder does not start rk_broker_placeholder_ (is the \
                                  real key published to the application?)",
                    });
                }
                Some(SecretString::new(text))
            }
            Err(EgressError::Read { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                None
            }
            Err(e) => return Err(e),
        };
        LoadedKey::new(key, permissions, placeholder)
    }
}

fn read_bounded(path: &Path) -> Result<Vec<u8>, EgressError> {
    use std::io::Read as _;
    let read_err = |source| EgressError::Read {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read_err)?;
    let mut bytes = Vec::new();
    file.take(MAX_FILE_LEN + 1)
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    if bytes.len() as u64 > MAX_FILE_LEN {
        return Err(EgressError::BadFile {
            path: path.to_owned(),
            problem: "the file is too large",
        });
    }
    Ok(bytes)
}

/// A loaded key: the `Authorization` value to send, its fingerprint, its permissions and the
/// placeholder the application must present.
pub struct LoadedKey {
    authorization: HeaderValue,
    fingerprint: String,
    permissions: Vec<String>,
    placeholder: Option<SecretString>,
    content_hash: String,
}

impl std::fmt::Debug for LoadedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedKey")
            .field("fingerprint", &self.fingerprint)
            .field("permissions", &self.permissions)
            .finish_non_exhaustive()
    }
}

impl LoadedKey {
    /// Prepares `key` with its `permissions`; `placeholder` is what the application presents
    /// (`None`: any placeholder-shaped value).
    pub fn new(
        key: SecretString,
        permissions: Vec<String>,
        placeholder: Option<SecretString>,
    ) -> Result<Self, EgressError> {
        let mut authorization = HeaderValue::from_str(&format!("Bearer {}", key.expose()))
            .map_err(|_| EgressError::BadFile {
                path: PathBuf::new(),
                problem: "the key holds characters a header cannot carry",
            })?;
        authorization.set_sensitive(true);
        let content_hash = crate::secret::fingerprint(
            format!(
                "{}\n{}\n{}",
                key.expose(),
                permissions.join(","),
                placeholder.as_ref().map(SecretString::expose).unwrap_or("")
            )
            .as_bytes(),
        );
        Ok(Self {
            authorization,
            fingerprint: key.fingerprint(),
            permissions,
            placeholder,
            content_hash,
        })
    }

    /// The key's fingerprint (first 12 hex digits of its SHA-256).
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// The key's permissions.
    pub fn permissions(&self) -> &[String] {
        &self.permissions
    }
}

/// One counter of `/usage`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct UsageCount {
    /// Requests.
    pub count: u64,
    /// The last one (RFC 3339).
    pub last_seen: String,
}

/// The `/usage` report: what `permissions suggest` reads.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UsageReport {
    /// [`ROUTES_VERSION`] of the table that classified the requests.
    pub routes_version: &'static str,
    /// When counting started (the broker's start, RFC 3339).
    pub since: String,
    /// Fingerprint of the key in use (empty while none is loaded).
    pub key_fingerprint: String,
    /// Requests the key's permissions served (forwarded), by permission.
    pub permissions: std::collections::BTreeMap<String, UsageCount>,
    /// Requests refused because the key lacks the permission, by permission.
    pub refused: std::collections::BTreeMap<String, UsageCount>,
}

#[derive(Debug)]
struct Usage {
    since: DateTime<Utc>,
    permissions: std::collections::BTreeMap<&'static str, (u64, DateTime<Utc>)>,
    refused: std::collections::BTreeMap<&'static str, (u64, DateTime<Utc>)>,
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

fn bump(
    map: &mut std::collections::BTreeMap<&'static str, (u64, DateTime<Utc>)>,
    permission: &'static str,
) {
    let entry = map.entry(permission).or_insert((0, Utc::now()));
    entry.0 += 1;
    entry.1 = Utc::now();
}

struct Shared {
    upstream_base: String,
    source: KeySource,
    key: RwLock<Option<Arc<LoadedKey>>>,
    allow_unlisted_routes: bool,
    in_flight: Arc<tokio::sync::Semaphore>,
    usage: Mutex<Usage>,
    metrics: EgressMetrics,
    http: reqwest::Client,
    /// The detector in use (`None`: no detection now).
    anomaly: RwLock<Option<Arc<AnomalyState>>>,
    /// Set when detection follows the mounted anomaly entry.
    mount: Option<AnomalyMount>,
}

/// The running detector of a broker.
struct AnomalyState {
    detector: Mutex<Detector>,
    responder: Arc<Responder<Arc<dyn ActionSink>>>,
    clock: Clock,
    throttle_for: Duration,
}

/// Detection that follows the mounted anomaly entry: how to build it, and the entry's bytes
/// that are in use (`None`: there was none).
struct AnomalyMount {
    setup: AnomalySetup,
    applied: Mutex<Option<Vec<u8>>>,
}

impl AnomalyState {
    /// The detector of `policy` acting through `sink`; it keeps what `previous` learned.
    fn build(
        policy: &AnomalyPolicy,
        sink: Arc<dyn ActionSink>,
        setup: &AnomalySetup,
        metrics: &EgressMetrics,
        previous: Option<&AnomalyState>,
    ) -> Result<Self, EgressError> {
        let bad = |e: super::anomaly::AnomalyConfigError| {
            EgressError::InvalidConfig(format!("anomaly policy: {e}"))
        };
        let config = policy.detector_config().map_err(bad)?;
        let throttle_for = config.throttle_for.unwrap_or(Duration::from_secs(300));
        let detector = match previous {
            Some(p) => {
                let mut learned = lock(&p.detector);
                let fresh = Detector::new(config.clone()).map_err(bad)?;
                std::mem::replace(&mut *learned, fresh)
                    .reconfigure(config, (setup.clock)())
                    .map_err(bad)?
            }
            None => Detector::new(config).map_err(bad)?,
        };
        Ok(Self {
            detector: Mutex::new(detector),
            responder: Arc::new(Responder::new(
                sink,
                policy.action,
                metrics.anomaly.clone().unwrap_or_default(),
            )),
            clock: setup.clock.clone(),
            throttle_for,
        })
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    fn current_key(&self) -> Option<Arc<LoadedKey>> {
        self.key
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Re-reads the mounted key; true when a new one was applied.
    fn reload(&self) -> Result<bool, EgressError> {
        let loaded = match self.source.read() {
            Ok(l) => l,
            Err(e) => {
                self.metrics
                    .key_reloads
                    .get_or_create(&ReloadLabels {
                        outcome: "failed".into(),
                    })
                    .inc();
                return Err(e);
            }
        };
        let current = self.current_key();
        if current
            .as_ref()
            .is_some_and(|c| c.content_hash == loaded.content_hash)
        {
            return Ok(false);
        }
        tracing::info!(
            fingerprint = loaded.fingerprint(),
            previous = current.as_ref().map(|c| c.fingerprint()).unwrap_or(""),
            permissions = ?loaded.permissions(),
            "egress broker switched to the mounted key"
        );
        self.metrics
            .key_reloads
            .get_or_create(&ReloadLabels {
                outcome: "applied".into(),
            })
            .inc();
        self.metrics.key_loaded.set(1);
        *self.key.write().unwrap_or_else(PoisonError::into_inner) = Some(Arc::new(loaded));
        Ok(true)
    }

    fn current_anomaly(&self) -> Option<Arc<AnomalyState>> {
        self.anomaly
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Re-reads the mounted anomaly entry when detection follows it; true when detection was
    /// switched on, changed or switched off. An invalid entry keeps the previous policy.
    fn reload_anomaly(&self) -> Result<bool, EgressError> {
        let Some(mount) = &self.mount else {
            return Ok(false);
        };
        let (path, bytes) = self.source.read_anomaly()?;
        let mut applied = lock(&mount.applied);
        if *applied == bytes {
            return Ok(false);
        }
        let Some(text) = &bytes else {
            *self.anomaly.write().unwrap_or_else(PoisonError::into_inner) = None;
            *applied = None;
            tracing::info!(
                entry = %mount_entry(&path),
                "egress anomaly detection off: the mounted anomaly policy is gone"
            );
            return Ok(true);
        };
        let file = parse_anomaly_file(&path.display().to_string(), text)?;
        let (namespace, name) = match (&mount.setup.policy_ref, &file.policy) {
            (Some(r), _) => r.clone(),
            (None, Some(p)) => parse_policy_ref(p)?,
            (None, None) => {
                return Err(EgressError::InvalidConfig(format!(
                    "{}: names no policy (NAMESPACE/NAME) for its Events; give --policy",
                    path.display()
                )));
            }
        };
        let sink = (mount.setup.sinks)(&namespace, &name);
        let previous = self.current_anomaly();
        let state = AnomalyState::build(
            &file.anomaly,
            sink,
            &mount.setup,
            &self.metrics,
            previous.as_deref(),
        )?;
        *self.anomaly.write().unwrap_or_else(PoisonError::into_inner) = Some(Arc::new(state));
        *applied = bytes;
        tracing::info!(
            action = file.anomaly.action.as_str(),
            policy = %format!("{namespace}/{name}"),
            kept_baselines = previous.is_some(),
            "egress anomaly detection follows the mounted anomaly policy"
        );
        Ok(true)
    }

    fn usage_report(&self) -> UsageReport {
        let fingerprint = self
            .current_key()
            .map(|k| k.fingerprint.clone())
            .unwrap_or_default();
        lock(&self.usage).report(fingerprint)
    }
}

impl Usage {
    /// The `/usage` report of these counters.
    fn report(&self, key_fingerprint: String) -> UsageReport {
        let convert = |m: &std::collections::BTreeMap<&'static str, (u64, DateTime<Utc>)>| {
            m.iter()
                .map(|(k, (count, at))| {
                    (
                        (*k).to_owned(),
                        UsageCount {
                            count: *count,
                            last_seen: rfc3339(*at),
                        },
                    )
                })
                .collect()
        };
        UsageReport {
            routes_version: ROUTES_VERSION,
            since: rfc3339(self.since),
            key_fingerprint,
            permissions: convert(&self.permissions),
            refused: convert(&self.refused),
        }
    }
}

/// The file name of a mounted entry, for logs.
fn mount_entry(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// A Stripe-shaped error answered by the broker itself (`Stripe-Should-Retry` tells SDKs whether
/// a retry can help). Never carries a key or the placeholder.
fn stripe_error(
    status: StatusCode,
    error_type: &str,
    code: &str,
    message: String,
    retry: bool,
) -> Response {
    let body = serde_json::json!({
        "error": {
            "type": error_type,
            "code": code,
            "message": message,
        }
    });
    let mut response = (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response();
    let headers = response.headers_mut();
    headers.insert(
        HeaderName::from_static("stripe-should-retry"),
        HeaderValue::from_static(if retry { "true" } else { "false" }),
    );
    headers.insert(
        HeaderName::from_static("x-stripe-broker"),
        HeaderValue::from_static("refused"),
    );
    if retry {
        headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    response
}

/// Whether `text` contains a Stripe secret or restricted key (test or live).
fn contains_literal_key(text: &[u8]) -> bool {
    const PREFIXES: [&[u8]; 4] = [b"sk_live_", b"sk_test_", b"rk_live_", b"rk_test_"];
    text.windows(8).any(|w| PREFIXES.contains(&w))
}

/// The token of an `Authorization` header: a Bearer token, or the user of Basic credentials
/// (Stripe accepts the key as the Basic user name).
fn authorization_token(value: &HeaderValue) -> Option<String> {
    let text = value.to_str().ok()?.trim();
    let (scheme, rest) = text.split_once(' ')?;
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("bearer") {
        Some(rest.to_owned())
    } else if scheme.eq_ignore_ascii_case("basic") {
        use base64::Engine as _;
        let raw = base64::engine::general_purpose::STANDARD
            .decode(rest)
            .ok()?;
        let raw = String::from_utf8(raw).ok()?;
        Some(
            raw.split_once(':')
                .map_or(raw.as_str(), |(u, _)| u)
                .to_owned(),
        )
    } else {
        None
    }
}

/// What the request's credentials are.
#[derive(Debug, PartialEq, Eq)]
enum Credentials {
    /// The placeholder (or, without a mounted placeholder, a placeholder-shaped token).
    Placeholder,
    /// A literal Stripe key somewhere in the headers or the query.
    LiteralKey,
    /// None, or something else.
    Invalid,
}

fn classify(
    headers: &HeaderMap,
    query: Option<&str>,
    placeholder: Option<&SecretString>,
) -> Credentials {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(authorization_token);
    if let Some(t) = &token
        && (t.starts_with("sk_") || t.starts_with("rk_"))
        && !t.starts_with(PLACEHOLDER_PREFIX)
    {
        return Credentials::LiteralKey;
    }
    let elsewhere = headers
        .iter()
        .filter(|(name, _)| *name != header::AUTHORIZATION)
        .any(|(_, v)| contains_literal_key(v.as_bytes()))
        || query.is_some_and(|q| contains_literal_key(q.as_bytes()));
    if elsewhere {
        return Credentials::LiteralKey;
    }
    if headers.get_all(header::AUTHORIZATION).iter().count() != 1 {
        return Credentials::Invalid;
    }
    match (token, placeholder) {
        (Some(t), Some(p)) => {
            use subtle::ConstantTimeEq as _;
            if bool::from(t.as_bytes().ct_eq(p.expose().as_bytes())) {
                Credentials::Placeholder
            } else {
                Credentials::Invalid
            }
        }
        (Some(t), None) if t.starts_with(PLACEHOLDER_PREFIX) => Credentials::Placeholder,
        _ => Credentials::Invalid,
    }
}

/// Copies `headers` for the other side: without the hop-by-hop headers of RFC 9110 §7.6.1 (and
/// those named in `Connection`), without `Host` (it names this hop) and without
/// `Authorization` (the caller sets the real one). `Content-Length` is kept: the body is
/// streamed with exactly that length.
fn end_to_end_headers(headers: &HeaderMap, drop_request_only: bool) -> HeaderMap {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    let mut out = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        if crate::webhook::proxy::HOP_BY_HOP.contains(&name.as_str())
            || named.contains(name)
            || (drop_request_only && (name == header::HOST || name == header::AUTHORIZATION))
        {
            continue;
        }
        out.append(name.clone(), value.clone());
    }
    out
}

/// The request body, streamed upstream. reqwest wants a `Sync` body and axum's is not; a
/// mutex that is never contended (only the owner polls, through `&mut`) makes it one.
struct SyncBody(Mutex<Body>);

impl HttpBody for SyncBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let body = self
            .get_mut()
            .0
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner);
        Pin::new(body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        lock(&self.0).is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        lock(&self.0).size_hint()
    }
}

/// A slot of `--max-concurrent-requests` and the in-flight gauge, held until the response
/// body is complete (or the client goes away): a streamed answer still occupies its slot.
struct Slot {
    _permit: tokio::sync::OwnedSemaphorePermit,
    gauge: Gauge,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// The upstream's response body, holding the request's [`Slot`].
struct SlotBody {
    inner: reqwest::Body,
    _slot: Slot,
}

impl HttpBody for SlotBody {
    type Data = Bytes;
    type Error = reqwest::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, reqwest::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

async fn handle(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let route = routes::route_for(parts.method.as_str(), parts.uri.path());
    let label = route.map_or(UNLISTED, |r| r.permission);
    let Some(key) = shared.current_key() else {
        shared.metrics.count(label, Outcome::Unavailable);
        return stripe_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "api_error",
            "broker_key_unavailable",
            "The egress broker has no key loaded yet; check the sidecar's mounted Secret.".into(),
            true,
        );
    };
    match classify(&parts.headers, parts.uri.query(), key.placeholder.as_ref()) {
        Credentials::Placeholder => {}
        Credentials::LiteralKey => {
            shared.metrics.count(label, Outcome::RefusedLiteralKey);
            tracing::warn!(
                method = %parts.method,
                permission = label,
                "refused a request that carries a literal Stripe key: the application must use \
                 the placeholder (the key was not logged)"
            );
            return stripe_error(
                StatusCode::FORBIDDEN,
                "invalid_request_error",
                "literal_api_key_refused",
                "This request carries a Stripe API key of its own. Behind the egress broker the \
                 application must use the placeholder key it was given; the broker adds the \
                 real key."
                    .into(),
                false,
            );
        }
        Credentials::Invalid => {
            shared.metrics.count(label, Outcome::RefusedUnauthenticated);
            return stripe_error(
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                "broker_placeholder_invalid",
                "Invalid API Key provided: the egress broker accepts only the placeholder key \
                 published for this workload (Authorization: Bearer <STRIPE_API_KEY>)."
                    .into(),
                false,
            );
        }
    }
    let permission = match route {
        Some(r) => {
            if !routes::grants(key.permissions(), r.permission) {
                shared
                    .metrics
                    .count(r.permission, Outcome::RefusedPermission);
                bump(&mut lock(&shared.usage).refused, r.permission);
                tracing::info!(
                    method = %parts.method,
                    permission = r.permission,
                    key = key.fingerprint(),
                    "refused locally: the key lacks the permission this route needs"
                );
                return stripe_error(
                    StatusCode::FORBIDDEN,
                    "invalid_request_error",
                    "broker_permission_missing",
                    format!(
                        "The provided key does not have the required permissions for this \
                         endpoint. Having the '{}' permission would allow this request to \
                         continue. (Refused by the egress broker; no request was sent to Stripe.)",
                        r.permission
                    ),
                    false,
                );
            }
            if let Some(a) = shared.current_anomaly()
                && let Some(response) = a.check(&shared.metrics, r.permission)
            {
                return response;
            }
            Some(r.permission)
        }
        None if shared.allow_unlisted_routes => None,
        None => {
            shared.metrics.count(UNLISTED, Outcome::RefusedPermission);
            return stripe_error(
                StatusCode::FORBIDDEN,
                "invalid_request_error",
                "broker_route_unlisted",
                format!(
                    "The egress broker's route table (version {ROUTES_VERSION}) has no \
                     permission for {} {}, so it cannot tell whether the key may call it; the \
                     request was not sent to Stripe. Start the broker with \
                     --allow-unlisted-routes to forward such requests.",
                    parts.method,
                    routes::normalized_path(parts.uri.path()).unwrap_or("(unusual path)")
                ),
                false,
            );
        }
    };
    let Ok(permit) = shared.in_flight.clone().try_acquire_owned() else {
        shared.metrics.count(label, Outcome::Unavailable);
        return stripe_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "api_error",
            "broker_overloaded",
            "The egress broker is forwarding as many requests as it may; retry shortly.".into(),
            true,
        );
    };
    shared.metrics.requests_in_flight.inc();
    let slot = Slot {
        _permit: permit,
        gauge: shared.metrics.requests_in_flight.clone(),
    };
    if let Some(p) = permission {
        bump(&mut lock(&shared.usage).permissions, p);
    }
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let mut headers = end_to_end_headers(&parts.headers, true);
    headers.insert(header::AUTHORIZATION, key.authorization.clone());
    let started = Instant::now();
    let result = shared
        .http
        .request(
            parts.method.clone(),
            format!("{}{path}", shared.upstream_base),
        )
        .headers(headers)
        .body(reqwest::Body::wrap(SyncBody(Mutex::new(body))))
        .send()
        .await;
    drop(key);
    match result {
        Ok(upstream) => {
            shared
                .metrics
                .upstream_duration
                .observe(started.elapsed().as_secs_f64());
            shared.metrics.count(label, Outcome::Forwarded);
            let upstream: http::Response<reqwest::Body> = upstream.into();
            let (up_parts, up_body) = upstream.into_parts();
            let mut response = Response::new(Body::new(SlotBody {
                inner: up_body,
                _slot: slot,
            }));
            *response.status_mut() = up_parts.status;
            *response.headers_mut() = end_to_end_headers(&up_parts.headers, false);
            response
        }
        Err(e) => {
            shared.metrics.count(label, Outcome::UpstreamError);
            tracing::warn!(
                error = %e.without_url(),
                permission = label,
                "Stripe's API did not answer a brokered request"
            );
            stripe_error(
                StatusCode::BAD_GATEWAY,
                "api_error",
                "broker_upstream_unavailable",
                "The egress broker could not reach Stripe's API; the request may not have been \
                 sent. Retry with the same Idempotency-Key."
                    .into(),
                true,
            )
        }
    }
}

impl AnomalyState {
    /// Counts a request of `permission` (one the key may use); a finding is answered off the
    /// request path; `Some` is the local 429 of a throttled permission.
    fn check(&self, metrics: &EgressMetrics, permission: &'static str) -> Option<Response> {
        let now = (self.clock)();
        let (observation, left) = {
            let mut detector = lock(&self.detector);
            let o = detector.observe(permission, now);
            let left = if o.throttled {
                detector.throttle_remaining(permission, now)
            } else {
                None
            };
            (o, left)
        };
        if let Some(finding) = observation.finding {
            let responder = self.responder.clone();
            // Events and rotation requests go to the Kubernetes API: never on the request path.
            tokio::spawn(async move {
                let _ = responder.respond(&finding).await;
            });
        }
        if !observation.throttled {
            return None;
        }
        metrics.count(permission, Outcome::Throttled);
        if let Some(a) = &metrics.anomaly {
            a.throttled
                .get_or_create(&super::anomaly::PermissionLabels {
                    permission: permission.to_owned(),
                })
                .inc();
        }
        let (parts, body) =
            super::anomaly::throttle_response(permission, left.unwrap_or(self.throttle_for))
                .into_parts();
        let mut response = Response::from_parts(parts, Body::from(body));
        response.headers_mut().insert(
            HeaderName::from_static("x-stripe-broker"),
            HeaderValue::from_static("throttled"),
        );
        Some(response)
    }
}

async fn usage_handler(State(shared): State<Arc<Shared>>) -> Response {
    axum::Json(shared.usage_report()).into_response()
}

async fn metrics_handler(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    crate::webhook::proxy::metrics_response(&headers, shared.metrics.encode())
}

async fn readyz(State(shared): State<Arc<Shared>>) -> Response {
    if shared.current_key().is_some() {
        (StatusCode::OK, "ready").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "no key loaded").into_response()
    }
}

/// Entry point of the library API.
#[derive(Debug)]
pub struct EgressProxy;

impl EgressProxy {
    /// Checks the settings, binds, loads the key (a failure is logged and retried; requests get
    /// `503 broker_key_unavailable` meanwhile) and serves in the background.
    pub async fn start(config: EgressConfig) -> Result<EgressHandle, EgressError> {
        if !config.listen.ip().is_loopback() {
            return Err(EgressError::ListenNotLoopback(config.listen));
        }
        check_upstream(&config.upstream, config.allow_loopback_upstream)?;
        if config.reload_interval.is_zero() || config.header_timeout.is_zero() {
            return Err(EgressError::InvalidConfig(
                "--reload-interval and --header-timeout must be positive".into(),
            ));
        }
        if config.max_connections == 0 || config.max_concurrent_requests == 0 {
            return Err(EgressError::InvalidConfig(
                "--max-connections and --max-concurrent-requests must be at least 1".into(),
            ));
        }
        let http = reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(config.upstream_timeout.min(Duration::from_secs(10)))
            .read_timeout(config.upstream_timeout)
            .pool_max_idle_per_host(config.max_concurrent_requests)
            .build()
            .map_err(|e| EgressError::InvalidConfig(format!("upstream HTTP client: {e}")))?;
        if config
            .anomaly
            .as_ref()
            .is_some_and(|a| a.tick_interval.is_zero())
        {
            return Err(EgressError::InvalidConfig(
                "the anomaly tick interval must be positive".into(),
            ));
        }
        let metrics = match &config.anomaly {
            Some(_) => EgressMetrics::with_anomaly(AnomalyMetrics::default()),
            None => EgressMetrics::new(),
        };
        // A fixed policy (`--anomaly-policy`) is built now, and refused now when invalid; a
        // mounted one follows the key volume.
        let (anomaly, mount) = match &config.anomaly {
            Some(setup) => match &setup.policy {
                Some(policy) => {
                    let (namespace, name) = setup.policy_ref.clone().unwrap_or_default();
                    let sink = (setup.sinks)(&namespace, &name);
                    let state = AnomalyState::build(policy, sink, setup, &metrics, None)?;
                    (Some(Arc::new(state)), None)
                }
                None => (
                    None,
                    Some(AnomalyMount {
                        setup: setup.clone(),
                        applied: Mutex::new(None),
                    }),
                ),
            },
            None => (None, None),
        };
        // every series of the local outcomes exists from the start (zeros, not gaps)
        for outcome in Outcome::ALL {
            let _ = metrics.requests.get_or_create(&RequestLabels {
                permission: UNLISTED.into(),
                outcome: outcome.as_str().into(),
            });
        }
        let shared = Arc::new(Shared {
            upstream_base: config.upstream.as_str().trim_end_matches('/').to_owned(),
            source: config.key.clone(),
            key: RwLock::new(None),
            allow_unlisted_routes: config.allow_unlisted_routes,
            in_flight: Arc::new(tokio::sync::Semaphore::new(config.max_concurrent_requests)),
            usage: Mutex::new(Usage {
                since: Utc::now(),
                permissions: Default::default(),
                refused: Default::default(),
            }),
            metrics,
            http,
            anomaly: RwLock::new(anomaly),
            mount,
        });
        if let Err(e) = shared.reload() {
            tracing::error!(error = %e, "no key loaded; answering 503 until the mounted Secret is readable");
        }
        if let Err(e) = shared.reload_anomaly() {
            tracing::error!(error = %e, "no anomaly detection until the mounted anomaly policy is valid");
        }
        let bind_error = |(addr, source)| EgressError::Bind { addr, source };
        let (listener, addr) = serve::bind(config.listen).await.map_err(bind_error)?;
        let admin = serve::bind_optional(config.admin_addr)
            .await
            .map_err(bind_error)?;
        let admin_addr = admin.as_ref().map(|(_, a)| *a);
        let admin_listener = admin.map(|(l, _)| l);
        let shutdown = CancellationToken::new();
        let mut tasks = Vec::new();
        let app = Router::new().fallback(handle).with_state(shared.clone());
        tasks.push(tokio::spawn(serve::serve(
            listener,
            app,
            ServeLimits {
                max_connections: config.max_connections,
                header_timeout: config.header_timeout,
                drain: config.upstream_timeout,
            },
            ConnMetrics {
                open: shared.metrics.connections_open.clone(),
                refused: shared.metrics.connections_refused.clone(),
            },
            shutdown.clone(),
        )));
        if let Some(listener) = admin_listener {
            let app = Router::new()
                .route("/usage", get(usage_handler))
                .route("/metrics", get(metrics_handler))
                .route("/healthz", get(|| async { "ok" }))
                .route("/readyz", get(readyz))
                .with_state(shared.clone());
            tasks.push(serve::spawn_admin(
                listener,
                app,
                shutdown.clone(),
                "egress-proxy",
            ));
        }
        let reloader = shared.clone();
        let token = shutdown.clone();
        let interval = config.reload_interval;
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut last_error: Option<String> = None;
            let mut last_anomaly_error: Option<String> = None;
            loop {
                tokio::select! {
                    _ = token.cancelled() => break,
                    _ = tick.tick() => {}
                }
                let r = reloader.clone();
                // file I/O off the async workers
                match tokio::task::spawn_blocking(move || (r.reload(), r.reload_anomaly())).await {
                    Ok((key, anomaly)) => {
                        note_reload(key, &mut last_error, "keeping the previous key");
                        note_reload(
                            anomaly,
                            &mut last_anomaly_error,
                            "keeping the previous anomaly policy",
                        );
                    }
                    Err(e) => tracing::error!(error = %e, "key reload task failed"),
                }
            }
        }));
        if let Some(setup) = &config.anomaly {
            let ticker = shared.clone();
            let token = shutdown.clone();
            let interval = setup.tick_interval;
            tasks.push(tokio::spawn(async move {
                let mut tick = tokio::time::interval(interval);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = token.cancelled() => break,
                        _ = tick.tick() => {}
                    }
                    if let Some(a) = ticker.current_anomaly() {
                        let now = (a.clock)();
                        lock(&a.detector).tick(now);
                    }
                }
            }));
            if let Some(policy) = &setup.policy {
                tracing::info!(
                    action = policy.action.as_str(),
                    "egress anomaly detection on (--anomaly-policy)"
                );
            }
        }
        tracing::info!(%addr, upstream = %shared.upstream_base, routes_version = ROUTES_VERSION, "egress-proxy listening");
        Ok(EgressHandle {
            addr,
            admin_addr,
            shared,
            shutdown,
            tasks,
        })
    }
}

/// Logs a failed reload once per distinct error (every reload interval would flood the log).
fn note_reload(result: Result<bool, EgressError>, last: &mut Option<String>, what: &str) {
    match result {
        Ok(_) => *last = None,
        Err(e) => {
            let text = e.to_string();
            if last.as_deref() != Some(text.as_str()) {
                tracing::warn!(error = %text, "{what}");
                *last = Some(text);
            }
        }
    }
}

/// A running broker. Dropping it stops the servers.
pub struct EgressHandle {
    addr: SocketAddr,
    admin_addr: Option<SocketAddr>,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for EgressHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EgressHandle")
            .field("addr", &self.addr)
            .field("admin_addr", &self.admin_addr)
            .finish_non_exhaustive()
    }
}

impl EgressHandle {
    /// The broker's bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://<addr>`: the application's API base.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The bound admin address, if served.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// The broker's metrics.
    pub fn metrics(&self) -> &EgressMetrics {
        &self.shared.metrics
    }

    /// Fingerprint of the key in use.
    pub fn key_fingerprint(&self) -> Option<String> {
        self.shared.current_key().map(|k| k.fingerprint.clone())
    }

    /// The `/usage` report.
    pub fn usage(&self) -> UsageReport {
        self.shared.usage_report()
    }

    /// Re-reads the mounted key now; true when a new one was applied.
    pub fn reload_now(&self) -> Result<bool, EgressError> {
        self.shared.reload()
    }

    /// Re-reads the mounted anomaly policy now (when detection follows it); true when
    /// detection was switched on, changed or switched off.
    pub fn reload_anomaly_now(&self) -> Result<bool, EgressError> {
        self.shared.reload_anomaly()
    }

    /// The action of the anomaly detection in use (`None`: no detection now).
    pub fn anomaly_action(&self) -> Option<super::anomaly::AnomalyAction> {
        self.shared.current_anomaly().map(|a| a.responder.action())
    }

    /// Stops serving and waits for the servers to finish.
    pub async fn shutdown(mut self) {
        self.shutdown.cancel();
        for task in self.tasks.drain(..) {
            let _ = task.await;
        }
    }
}

impl Drop for EgressHandle {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// The whole `egress-proxy` process: its own single-threaded runtime (a sidecar on loopback for
/// one pod needs no worker threads, each of which would cost a stack and a malloc arena; see the
/// README's "Sidecar memory"; `TOKIO_WORKER_THREADS` set: that many workers instead),
/// [`run_cli`] on it, and the exit status. Both
/// `stripe-key-operator egress-proxy` and the slim `stripe-egress-proxy` binary run this.
pub fn main(args: EgressProxyArgs) -> std::process::ExitCode {
    // `TOKIO_WORKER_THREADS=N` asks for N worker threads instead (tokio reads the variable).
    let mut builder = match std::env::var_os("TOKIO_WORKER_THREADS") {
        Some(_) => tokio::runtime::Builder::new_multi_thread(),
        None => tokio::runtime::Builder::new_current_thread(),
    };
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run_cli(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Runs the broker until SIGTERM or Ctrl-C (the `egress-proxy` subcommand).
pub async fn run_cli(args: EgressProxyArgs) -> anyhow::Result<()> {
    crate::telemetry::init(args.log_format, "info");
    let mut config = args.config();
    let policy_ref = args.policy.as_deref().map(parse_policy_ref).transpose()?;
    let setup = match &args.anomaly_policy {
        Some(path) => {
            let policy = load_anomaly_policy(path)?;
            let Some((namespace, name)) = &policy_ref else {
                anyhow::bail!("--anomaly-policy needs --policy NAMESPACE/NAME");
            };
            let client = kube::Client::try_default().await.map_err(|e| {
                anyhow::anyhow!(
                    "--anomaly-policy needs the Kubernetes API (the sidecar's ServiceAccount): {e}"
                )
            })?;
            let sink: Arc<dyn ActionSink> = Arc::new(KubeActionSink::new(client, namespace, name));
            AnomalySetup::new(policy, sink)
        }
        // The mounted entry: the Kubernetes client is made when the first anomaly needs it, so
        // a sidecar without anomaly detection never builds one.
        None => AnomalySetup::mounted(Arc::new(|namespace: &str, name: &str| {
            Arc::new(KubeActionSink::connect_lazily(namespace, name)) as Arc<dyn ActionSink>
        })),
    };
    config.anomaly = Some(AnomalySetup {
        policy_ref,
        ..setup
    });
    let handle = EgressProxy::start(config).await?;
    crate::webhook::proxy::shutdown_signal().await;
    tracing::info!("shutting down");
    handle.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn placeholders_are_stable_per_policy_and_never_a_stripe_key_shape() {
        let a = placeholder_for("uid-1");
        assert_eq!(a, placeholder_for("uid-1"));
        assert_ne!(a, placeholder_for("uid-2"));
        assert!(a.starts_with(PLACEHOLDER_PREFIX));
        assert_eq!(a.len(), PLACEHOLDER_PREFIX.len() + 32);
        for live in ["sk_live_", "sk_test_", "rk_live_", "rk_test_"] {
            assert!(!a.starts_with(live));
        }
        assert!(!contains_literal_key(a.as_bytes()));
        // our own scanner does not report it either
        assert!(
            crate::scan::find_secrets(&a, true).is_empty(),
            "the placeholder must not look like a leaked key"
        );
    }

    #[test]
    fn credentials_are_the_placeholder_or_refused() {
        let p = SecretString::new(placeholder_for("u"));
        let bearer = format!("Bearer {}", p.expose());
        assert_eq!(
            classify(&headers(&[("authorization", &bearer)]), None, Some(&p)),
            Credentials::Placeholder
        );
        use base64::Engine as _;
        let basic = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{}:", p.expose()))
        );
        assert_eq!(
            classify(&headers(&[("authorization", &basic)]), None, Some(&p)),
            Credentials::Placeholder
        );
        let other = format!("Bearer {}", placeholder_for("other"));
        assert_eq!(
            classify(&headers(&[("authorization", &other)]), None, Some(&p)),
            Credentials::Invalid
        );
        assert_eq!(
            classify(&headers(&[("authorization", &other)]), None, None),
            Credentials::Placeholder,
            "without a mounted placeholder any placeholder-shaped token is accepted"
        );
        assert_eq!(
            classify(&headers(&[]), None, Some(&p)),
            Credentials::Invalid
        );
        assert_eq!(
            classify(
                &headers(&[("authorization", &bearer), ("authorization", &bearer)]),
                None,
                Some(&p)
            ),
            Credentials::Invalid
        );
        for literal in [
            "Bearer sk_live_abc",
            "Bearer rk_test_abc",
            "Bearer sk_whatever",
            "bearer rk_live_x",
        ] {
            assert_eq!(
                classify(&headers(&[("authorization", literal)]), None, Some(&p)),
                Credentials::LiteralKey,
                "{literal}"
            );
        }
        let basic_key = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode("sk_test_abc:")
        );
        assert_eq!(
            classify(&headers(&[("authorization", &basic_key)]), None, Some(&p)),
            Credentials::LiteralKey
        );
        assert_eq!(
            classify(
                &headers(&[("authorization", &bearer), ("x-api-key", "rk_live_123")]),
                None,
                Some(&p)
            ),
            Credentials::LiteralKey
        );
        assert_eq!(
            classify(
                &headers(&[("authorization", &bearer)]),
                Some("key=sk_test_123"),
                Some(&p)
            ),
            Credentials::LiteralKey
        );
    }

    #[test]
    fn hop_by_hop_host_and_authorization_are_not_forwarded() {
        let h = headers(&[
            ("connection", "keep-alive, x-hop"),
            ("x-hop", "1"),
            ("transfer-encoding", "chunked"),
            ("keep-alive", "timeout=5"),
            ("upgrade", "h2c"),
            ("te", "trailers"),
            ("host", "127.0.0.1:12111"),
            ("authorization", "Bearer rk_broker_placeholder_x"),
            ("content-length", "10"),
            ("idempotency-key", "k1"),
            ("stripe-version", "2026-10-14.preview"),
            ("stripe-context", "acct_1"),
            ("x-multi", "a"),
            ("x-multi", "b"),
        ]);
        let out = end_to_end_headers(&h, true);
        let names: std::collections::BTreeSet<&str> = out.keys().map(|k| k.as_str()).collect();
        assert_eq!(
            names,
            [
                "content-length",
                "idempotency-key",
                "stripe-context",
                "stripe-version",
                "x-multi"
            ]
            .into_iter()
            .collect()
        );
        assert_eq!(out.get_all("x-multi").iter().count(), 2);
        // responses keep host-like and authorization-like headers (none are special there)
        let resp = end_to_end_headers(&headers(&[("request-id", "req_1")]), false);
        assert_eq!(resp.len(), 1);
    }

    #[test]
    fn upstreams_are_https_or_allowed_loopback_http() {
        let ok = |u: &str, lb: bool| check_upstream(&u.parse().unwrap(), lb).is_ok();
        assert!(ok("https://api.stripe.com", false));
        assert!(ok("https://api.stripe.com/", false));
        assert!(!ok("http://api.stripe.com", true));
        assert!(!ok("http://127.0.0.1:12111", false));
        assert!(ok("http://127.0.0.1:12111", true));
        assert!(!ok("https://api.stripe.com/v1", false));
        assert!(!ok("https://api.stripe.com/?a=b", false));
        assert!(!ok("https://user:pw@api.stripe.com", false));
    }

    #[test]
    fn the_key_file_must_hold_a_key_not_the_placeholder() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, v: &str| std::fs::write(dir.path().join(name), v).unwrap();
        write(DEFAULT_PERMISSIONS_ENTRY, "charge_read, refund_write\n");
        write(DEFAULT_KEY_ENTRY, &placeholder_for("u"));
        let source = KeySource::new(dir.path());
        let err = source.read().unwrap_err().to_string();
        assert!(err.contains("placeholder"), "{err}");
        write(DEFAULT_KEY_ENTRY, "not-a-key");
        assert!(source.read().is_err());
        write(DEFAULT_KEY_ENTRY, "rk_test_abcdef\n");
        let loaded = source.read().unwrap();
        assert_eq!(loaded.permissions(), ["charge_read", "refund_write"]);
        assert!(loaded.placeholder.is_none());
        assert!(!format!("{loaded:?}").contains("rk_test_abcdef"));
        write(DEFAULT_PLACEHOLDER_ENTRY, "rk_test_abcdef");
        let err = source.read().unwrap_err().to_string();
        assert!(!err.contains("abcdef"), "{err}");
    }

    #[test]
    fn the_usage_report_is_what_permissions_suggest_reads() {
        let mut usage = Usage {
            since: Utc::now(),
            permissions: Default::default(),
            refused: Default::default(),
        };
        bump(&mut usage.permissions, "charge_read");
        bump(&mut usage.permissions, "charge_read");
        bump(&mut usage.refused, "refund_write");
        let report = usage.report("3f2a9c1b7d4e".into());
        let text = serde_json::to_string(&report).unwrap();
        let parsed = crate::egress::suggest::parse_report("usage", &text).unwrap();
        assert_eq!(parsed.routes_version, ROUTES_VERSION);
        assert_eq!(parsed.permissions["charge_read"].count, 2);
        assert_eq!(parsed.refused["refund_write"].count, 1);
    }

    #[test]
    fn anomaly_policy_files_are_yaml_or_json_and_bad_ones_are_refused_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let yaml = dir.path().join("anomaly.yaml");
        std::fs::write(&yaml, "action: Throttle\nthrottleFor: 10m\nsigmas: 8\n").unwrap();
        let p = load_anomaly_policy(&yaml).unwrap();
        assert_eq!(p.action, crate::egress::anomaly::AnomalyAction::Throttle);
        assert_eq!(p.sigmas, Some(8));
        let json = dir.path().join("anomaly.json");
        std::fs::write(&json, r#"{"action": "IncidentRotation", "warmUp": "2h"}"#).unwrap();
        assert_eq!(
            load_anomaly_policy(&json).unwrap().action,
            crate::egress::anomaly::AnomalyAction::IncidentRotation
        );
        let bad = dir.path().join("bad.yaml");
        std::fs::write(&bad, "action: Explode\n").unwrap();
        let err = load_anomaly_policy(&bad).unwrap_err().to_string();
        assert!(
            err.contains("--anomaly-policy") && err.contains("bad.yaml"),
            "{err}"
        );
        std::fs::write(&bad, "sigmas: 1\n").unwrap();
        let err = load_anomaly_policy(&bad).unwrap_err().to_string();
        assert!(err.contains("sigmas"), "{err}");
        let err = load_anomaly_policy(&dir.path().join("missing.yaml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing.yaml"), "{err}");
    }

    #[test]
    fn the_policy_flag_is_namespace_slash_name() {
        assert_eq!(
            parse_policy_ref("payments/checkout").unwrap(),
            ("payments".to_owned(), "checkout".to_owned())
        );
        for bad in ["checkout", "/checkout", "payments/", "Payments/x", "a/b/c"] {
            assert!(parse_policy_ref(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_anomaly_flags_need_each_other_only_one_way() {
        use clap::Parser as _;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: EgressProxyArgs,
        }
        assert!(Cli::try_parse_from(["x", "--key-dir", "/k"]).is_ok());
        assert!(
            Cli::try_parse_from(["x", "--key-dir", "/k", "--anomaly-policy", "/a.yaml"]).is_err(),
            "--anomaly-policy without --policy is refused"
        );
        let cli = Cli::try_parse_from([
            "x",
            "--key-dir",
            "/k",
            "--anomaly-policy",
            "/a.yaml",
            "--policy",
            "ns/p",
        ])
        .unwrap();
        assert_eq!(cli.args.policy.as_deref(), Some("ns/p"));
        assert!(
            cli.args.config().anomaly.is_none(),
            "the file is read by run_cli"
        );
    }

    #[test]
    fn outcomes_have_distinct_labels() {
        let names: std::collections::HashSet<_> = Outcome::ALL.iter().map(|o| o.as_str()).collect();
        assert_eq!(names.len(), Outcome::ALL.len());
    }
}
