//! The proxy's metrics (prefix `stripe_key_operator_webhook_proxy_`), served on its own
//! `/metrics`.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Label of rejections.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// One of [`super::RejectReason::as_str`].
    pub reason: String,
}

/// Label of verified requests: which secret matched (`0` = the newest in the file).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SecretLabels {
    /// Position of the matching secret in the file, newest first.
    pub secret_index: String,
}

/// Label of forwarded requests.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ForwardLabels {
    /// `2xx`, `3xx`, `4xx`, `5xx`, or `error` when the application did not answer.
    pub outcome: String,
}

/// Label of event confirmations.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// `confirmed`, `cached`, `forged`, `unavailable_forwarded` (fail open) or
    /// `unavailable_refused` (fail closed).
    pub outcome: String,
}

/// Label of secret reloads.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    /// `applied` or `failed`.
    pub outcome: String,
}

/// Every metric of the verifying proxy.
#[derive(Clone)]
pub struct ProxyMetrics {
    /// Requests whose signature verified and that were not replays.
    pub verified: Family<SecretLabels, Counter>,
    /// Requests answered without forwarding, by reason.
    pub rejected: Family<ReasonLabels, Counter>,
    /// Time from the start of forwarding to the application's complete answer.
    pub forward_duration: Family<ForwardLabels, Histogram>,
    /// Secrets currently loaded.
    pub secrets_loaded: Gauge,
    /// Reloads of the secrets file.
    pub secret_reloads: Family<ReloadLabels, Counter>,
    /// Signatures held by the replay guard.
    pub replay_cache_entries: Gauge,
    /// Unexpired signatures dropped from the full replay guard.
    pub replay_cache_evictions: Counter,
    /// Incidents declared: validly signed deliveries that Stripe did not send.
    pub incidents: Counter,
    /// Incidents and failure Events that could not be recorded in Kubernetes.
    pub incident_report_failures: Counter,
    /// Warning Events recorded for bursts of failed verifications (never a rotation).
    pub failure_events: Counter,
    /// Event confirmations with Stripe, by outcome.
    pub confirmations: Family<OutcomeLabels, Counter>,
    /// Connections open now.
    pub connections_open: Gauge,
    /// Connections refused because `--max-connections` were open.
    pub connections_refused: Counter,
    /// Requests past the header checks now (buffering, verifying, confirming or forwarding).
    pub requests_in_flight: Gauge,
    /// Request body bytes held in memory now.
    pub body_bytes_buffered: Gauge,
    registry: Arc<Registry>,
}

fn forward_histogram() -> Histogram {
    Histogram::new([
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ])
}

impl Default for ProxyMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl ProxyMetrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("stripe_key_operator_webhook_proxy");
        let verified = Family::<SecretLabels, Counter>::default();
        registry.register(
            "verified",
            "Webhook requests whose signature verified, by matching secret (0 = newest)",
            verified.clone(),
        );
        let rejected = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "rejected",
            "Webhook requests refused without forwarding, by reason",
            rejected.clone(),
        );
        let forward_duration = Family::<ForwardLabels, Histogram>::new_with_constructor(
            forward_histogram as fn() -> Histogram,
        );
        registry.register(
            "forward_duration_seconds",
            "Latency of forwarding a verified request to the application, by outcome",
            forward_duration.clone(),
        );
        let secrets_loaded = Gauge::default();
        registry.register(
            "secrets_loaded",
            "Webhook signing secrets currently loaded",
            secrets_loaded.clone(),
        );
        let secret_reloads = Family::<ReloadLabels, Counter>::default();
        registry.register(
            "secret_reloads",
            "Changes of the secrets file, applied or failed",
            secret_reloads.clone(),
        );
        let replay_cache_entries = Gauge::default();
        registry.register(
            "replay_cache_entries",
            "Signatures remembered by the replay guard",
            replay_cache_entries.clone(),
        );
        let replay_cache_evictions = Counter::default();
        registry.register(
            "replay_cache_evictions",
            "Unexpired signatures dropped because the replay guard was full (raise --replay-capacity)",
            replay_cache_evictions.clone(),
        );
        let incidents = Counter::default();
        registry.register(
            "incidents",
            "Incidents declared: validly signed deliveries that Stripe did not send",
            incidents.clone(),
        );
        let incident_report_failures = Counter::default();
        registry.register(
            "incident_report_failures",
            "Incidents and failure Events that could not be recorded on the StripeWebhookEndpoint",
            incident_report_failures.clone(),
        );
        let failure_events = Counter::default();
        registry.register(
            "failure_events",
            "Warning Events recorded for bursts of failed verifications (these never rotate)",
            failure_events.clone(),
        );
        let confirmations = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "confirmations",
            "Verified deliveries checked against Stripe's copy of the event, by outcome",
            confirmations.clone(),
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
        let requests_in_flight = Gauge::default();
        registry.register(
            "requests_in_flight",
            "Requests past the header checks now (bounded by --max-concurrent-requests)",
            requests_in_flight.clone(),
        );
        let body_bytes_buffered = Gauge::default();
        registry.register(
            "body_bytes_buffered",
            "Request body bytes held in memory now",
            body_bytes_buffered.clone(),
        );
        Self {
            failure_events,
            confirmations,
            connections_open,
            connections_refused,
            requests_in_flight,
            body_bytes_buffered,
            verified,
            rejected,
            forward_duration,
            secrets_loaded,
            secret_reloads,
            replay_cache_entries,
            replay_cache_evictions,
            incidents,
            incident_report_failures,
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
}
