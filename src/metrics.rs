//! Prometheus metrics, prefix `stripe_key_operator_`.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Labels of per-controller metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabels {
    pub controller: String,
}

/// Labels of errors.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub controller: String,
    pub reason: String,
}

/// Labels of rotations.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RotationLabels {
    pub kind: String,
    pub trigger: String,
}

/// Labels of per-object gauges.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ObjectLabels {
    pub kind: String,
    pub namespace: String,
    pub name: String,
}

/// The per-object gauges, as columns of one table with a row per object.
///
/// Five gauges per policy or endpoint as prometheus-client families held five copies of the
/// object's labels, each with its own gauge allocation and hash-table slot (about 1.1 KiB per
/// object, 11 MiB at 10,000); one row holds the labels once and the five values inline (about
/// 0.2 KiB). The table is exposed by a [`Collector`] as five gauge families, each with the
/// series of the rows that have that value (absent values are NaN in the row and not
/// exposed), so the exposition is the same as before.
#[derive(Clone, Debug, Default)]
pub struct ObjectGauges {
    rows: Arc<std::sync::RwLock<std::collections::HashMap<ObjectLabels, [f64; COLUMNS]>>>,
}

const COLUMNS: usize = 5;

/// The columns of [`ObjectGauges`]: name, help, and whether the value is an integer.
const COLUMN_DESCRIPTORS: [(&str, &str, bool); COLUMNS] = [
    ("key_age_seconds", "Age of the current key", false),
    (
        "next_rotation_seconds",
        "Seconds until the next scheduled rotation",
        false,
    ),
    (
        "key_created_timestamp_seconds",
        "Unix time the current key was minted",
        false,
    ),
    (
        "next_rotation_timestamp_seconds",
        "Unix time the schedule next rotates the current key",
        false,
    ),
    (
        "rollout_stuck",
        "1 while a rollout target did not finish within the rollout ceiling (Degraded=True, reason=RolloutStuck)",
        true,
    ),
];

/// A column of [`ObjectGauges`].
#[derive(Clone, Copy, Debug)]
enum Column {
    KeyAge = 0,
    NextRotation = 1,
    KeyCreated = 2,
    NextRotationAt = 3,
    RolloutStuck = 4,
}

impl ObjectGauges {
    fn column(&self, column: Column) -> ObjectGauge {
        ObjectGauge {
            rows: self.clone(),
            column: column as usize,
        }
    }

    fn read(
        &self,
    ) -> std::sync::RwLockReadGuard<'_, std::collections::HashMap<ObjectLabels, [f64; COLUMNS]>>
    {
        self.rows.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(
        &self,
    ) -> std::sync::RwLockWriteGuard<'_, std::collections::HashMap<ObjectLabels, [f64; COLUMNS]>>
    {
        self.rows.write().unwrap_or_else(|e| e.into_inner())
    }
}

impl prometheus_client::collector::Collector for ObjectGauges {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::gauge::ConstGauge;
        let rows = self.read();
        for (column, (name, help, integer)) in COLUMN_DESCRIPTORS.iter().enumerate() {
            // Like an empty family: no series, no descriptor.
            if rows.values().all(|r| r[column].is_nan()) {
                continue;
            }
            let mut family = encoder.encode_descriptor(
                name,
                help,
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            for (labels, row) in rows.iter().filter(|(_, r)| !r[column].is_nan()) {
                let series = family.encode_family(labels)?;
                if *integer {
                    ConstGauge::new(row[column] as i64).encode(series)?;
                } else {
                    ConstGauge::new(row[column]).encode(series)?;
                }
            }
        }
        Ok(())
    }
}

/// One per-object gauge (a column of [`ObjectGauges`]), used like a prometheus-client family:
/// `get_or_create(&labels).set(v)`, `remove(&labels)`.
#[derive(Clone, Debug)]
pub struct ObjectGauge {
    rows: ObjectGauges,
    column: usize,
}

/// A value an [`ObjectGauge`] takes.
pub trait GaugeValue {
    fn into_f64(self) -> f64;
}

impl GaugeValue for f64 {
    fn into_f64(self) -> f64 {
        self
    }
}

impl GaugeValue for i64 {
    fn into_f64(self) -> f64 {
        self as f64
    }
}

impl GaugeValue for i32 {
    fn into_f64(self) -> f64 {
        f64::from(self)
    }
}

/// The series of one object in an [`ObjectGauge`].
pub struct ObjectSeries<'a> {
    gauge: &'a ObjectGauge,
    labels: &'a ObjectLabels,
}

impl ObjectSeries<'_> {
    /// Sets the value (the series is exposed from now on).
    pub fn set(&self, value: impl GaugeValue) {
        let mut rows = self.gauge.rows.write();
        let row = match rows.get_mut(self.labels) {
            Some(row) => row,
            None => rows
                .entry(self.labels.clone())
                .or_insert([f64::NAN; COLUMNS]),
        };
        row[self.gauge.column] = value.into_f64();
    }

    /// The value (NaN while unset).
    pub fn get(&self) -> f64 {
        self.gauge
            .rows
            .read()
            .get(self.labels)
            .map_or(f64::NAN, |r| r[self.gauge.column])
    }
}

impl ObjectGauge {
    /// The object's series (created by its first [`ObjectSeries::set`]).
    pub fn get_or_create<'a>(&'a self, labels: &'a ObjectLabels) -> ObjectSeries<'a> {
        ObjectSeries {
            gauge: self,
            labels,
        }
    }

    /// Removes the object's series; the row goes with its last value. Whether it was set.
    pub fn remove(&self, labels: &ObjectLabels) -> bool {
        let mut rows = self.rows.write();
        let Some(row) = rows.get_mut(labels) else {
            return false;
        };
        let was = !row[self.column].is_nan();
        row[self.column] = f64::NAN;
        if row.iter().all(|v| v.is_nan()) {
            rows.remove(labels);
        }
        was
    }
}

/// Labels of Stripe API calls.
/// A resource by namespace and name (the usage gauges: only key policies have a usage signal).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NamespacedLabels {
    pub namespace: String,
    pub name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StripeCallLabels {
    /// The Stripe account (`Stripe-Context`, `acct_...`) the call was made for: rate limits
    /// are per account.
    pub account: String,
    pub method: String,
    /// The path with ids replaced by `{id}` (bounded cardinality).
    pub route: String,
    /// HTTP status, or `error` for a connection failure or timeout.
    pub code: String,
}

/// Labels of per-account metrics: the StripeAccount's name (scheduler, activity log) or its
/// Stripe context (`acct_...`, circuit breaker), both bounded by the accounts configured.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AccountLabels {
    pub account: String,
}

/// Labels of circuit-breaker transitions.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CircuitLabels {
    /// The Stripe context (`acct_...`).
    pub account: String,
    /// The state entered: `Open`, `HalfOpen` or `Closed`.
    pub to: String,
}

/// Labels of secret-store calls.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StoreCallLabels {
    pub operation: String,
    pub outcome: String,
}

/// Labels of activity-log reads.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ActivityReadLabels {
    pub account: String,
    pub outcome: String,
}

/// Labels of activity-log entries handled.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ActivityEntryLabels {
    pub account: String,
    pub action: String,
}

/// Every metric of the operator.
#[derive(Clone)]
pub struct Metrics {
    pub reconciliations: Family<ControllerLabels, Counter>,
    pub reconcile_errors: Family<ErrorLabels, Counter>,
    pub reconcile_duration: Family<ControllerLabels, Histogram>,
    pub keys_minted: Family<ControllerLabels, Counter>,
    pub rotations: Family<RotationLabels, Counter>,
    pub rotation_failures: Family<ErrorLabels, Counter>,
    pub key_age_seconds: ObjectGauge,
    pub next_rotation_seconds: ObjectGauge,
    /// Unix time the current key was minted (`status.lastRotationAt`). A timestamp, not an age:
    /// `time() - x` keeps growing in Prometheus even when the operator stops reconciling, which
    /// is exactly when an age alert matters.
    pub key_created_timestamp_seconds: ObjectGauge,
    /// Unix time the schedule next rotates the current key (`status.nextRotationAt`, jitter
    /// included); absent without a schedule.
    pub next_rotation_timestamp_seconds: ObjectGauge,
    /// 1 while `Degraded=True, reason=RolloutStuck` (a rollout target did not finish within
    /// the rollout ceiling), else 0.
    pub rollout_stuck: ObjectGauge,
    pub stripe_requests: Family<StripeCallLabels, Counter>,
    pub store_requests: Family<StoreCallLabels, Counter>,
    pub store_request_duration: Family<StoreCallLabels, Histogram>,
    pub leader: Gauge,
    /// 1 while a routine rotation holds the previous key because Stripe reports it still in use
    /// (`OldKeyStillInUse`); the series is absent otherwise.
    pub old_key_in_use: Family<NamespacedLabels, Gauge>,
    /// 1 while the current key shows no use since its rollout finished, long after it
    /// (`CurrentKeyUnused`); 0 otherwise.
    pub current_key_unused: Family<NamespacedLabels, Gauge>,
    /// Times the activity log showed a person viewing one of the policy's keys.
    pub key_viewed: Family<NamespacedLabels, Counter>,
    /// Times the activity log showed one of the policy's keys changed or deleted by someone
    /// other than the operator.
    pub key_tampered: Family<NamespacedLabels, Counter>,
    /// Keys a person created in the account, outside the operator (`status.unmanagedKeyCount`).
    pub unmanaged_keys: Family<AccountLabels, Gauge>,
    /// Activity-log reads, by outcome (`success`, or the failure reason).
    pub activity_log_reads: Family<ActivityReadLabels, Counter>,
    /// Activity-log entries handled, by action (`api_key_viewed`, ...).
    pub activity_log_entries: Family<ActivityEntryLabels, Counter>,
    /// Circuit-breaker state changes per Stripe account, by the state entered.
    pub stripe_circuit_transitions: Family<CircuitLabels, Counter>,
    /// Circuit-breaker state per Stripe account: 0 closed, 1 half-open, 2 open.
    pub stripe_circuit_state: Family<AccountLabels, Gauge>,
    /// Reconciles of a StripeAccount's resources running now (fair scheduler).
    pub scheduler_in_flight: Family<AccountLabels, Gauge>,
    /// Reconciles of a StripeAccount's resources waiting for a worker now.
    pub scheduler_waiting: Family<AccountLabels, Gauge>,
    /// Reconciles of a StripeAccount's resources given a worker.
    pub scheduler_dispatched: Family<AccountLabels, Counter>,
    /// Canary trips (a canary key was used), by canary policy.
    pub canary_trips: Family<NamespacedLabels, Counter>,
    /// 1 from a canary's trip until it has been re-minted and is quiet, else 0.
    pub canary_tripped: Family<NamespacedLabels, Gauge>,
    registry: Arc<Registry>,
    /// The length of the last exposition: the next one's buffer starts at about that size
    /// instead of doubling its way up (each doubling holds the old and the new copy at once).
    last_len: Arc<std::sync::atomic::AtomicUsize>,
}

fn duration_histogram() -> Histogram {
    Histogram::new([0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0])
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("stripe_key_operator");
        let reconciliations = Family::<ControllerLabels, Counter>::default();
        registry.register(
            "reconciliations",
            "Reconciliations started",
            reconciliations.clone(),
        );
        let reconcile_errors = Family::<ErrorLabels, Counter>::default();
        registry.register(
            "reconcile_errors",
            "Reconciliations that failed, by reason",
            reconcile_errors.clone(),
        );
        let reconcile_duration = Family::<ControllerLabels, Histogram>::new_with_constructor(
            duration_histogram as fn() -> Histogram,
        );
        registry.register(
            "reconcile_duration_seconds",
            "Duration of reconciliations",
            reconcile_duration.clone(),
        );
        let keys_minted = Family::<ControllerLabels, Counter>::default();
        registry.register(
            "keys_minted",
            "Keys and webhook secrets minted at Stripe",
            keys_minted.clone(),
        );
        let rotations = Family::<RotationLabels, Counter>::default();
        registry.register(
            "rotations",
            "Rotations completed, by trigger",
            rotations.clone(),
        );
        let rotation_failures = Family::<ErrorLabels, Counter>::default();
        registry.register(
            "rotation_failures",
            "Rotation steps that failed, by reason",
            rotation_failures.clone(),
        );
        // The per-object gauges share one row per object (see [`ObjectGauges`]).
        let objects = ObjectGauges::default();
        registry.register_collector(Box::new(objects.clone()));
        let key_age_seconds = objects.column(Column::KeyAge);
        let next_rotation_seconds = objects.column(Column::NextRotation);
        let key_created_timestamp_seconds = objects.column(Column::KeyCreated);
        let next_rotation_timestamp_seconds = objects.column(Column::NextRotationAt);
        let rollout_stuck = objects.column(Column::RolloutStuck);
        let stripe_requests = Family::<StripeCallLabels, Counter>::default();
        registry.register(
            "stripe_requests",
            "HTTP requests to Stripe, by status code",
            stripe_requests.clone(),
        );
        let store_requests = Family::<StoreCallLabels, Counter>::default();
        registry.register(
            "store_requests",
            "Secret-store calls, by outcome",
            store_requests.clone(),
        );
        let store_request_duration = Family::<StoreCallLabels, Histogram>::new_with_constructor(
            duration_histogram as fn() -> Histogram,
        );
        registry.register(
            "store_request_duration_seconds",
            "Duration of secret-store calls, by outcome",
            store_request_duration.clone(),
        );
        let leader = Gauge::default();
        registry.register(
            "leader",
            "1 when this replica holds the leader lease",
            leader.clone(),
        );
        let old_key_in_use = Family::<NamespacedLabels, Gauge>::default();
        registry.register(
            "old_key_in_use",
            "1 while the previous key is held past its overlap because Stripe reports it still in use",
            old_key_in_use.clone(),
        );
        let current_key_unused = Family::<NamespacedLabels, Gauge>::default();
        registry.register(
            "current_key_unused",
            "1 while the current key shows no use at Stripe long after its rollout finished",
            current_key_unused.clone(),
        );
        let key_viewed = Family::<NamespacedLabels, Counter>::default();
        registry.register(
            "key_viewed",
            "Times Stripe's activity log showed a person viewing one of the policy's keys in the Dashboard (KeyViewed)",
            key_viewed.clone(),
        );
        let key_tampered = Family::<NamespacedLabels, Counter>::default();
        registry.register(
            "key_tampered",
            "Times Stripe's activity log showed one of the policy's keys changed or deleted by someone other than the operator (KeyTampered)",
            key_tampered.clone(),
        );
        let unmanaged_keys = Family::<AccountLabels, Gauge>::default();
        registry.register(
            "unmanaged_keys",
            "Keys a person created in the Stripe account outside the operator (shadow keys), from the activity log",
            unmanaged_keys.clone(),
        );
        let activity_log_reads = Family::<ActivityReadLabels, Counter>::default();
        registry.register(
            "activity_log_reads",
            "Reads of a Stripe account's activity log, by outcome",
            activity_log_reads.clone(),
        );
        let activity_log_entries = Family::<ActivityEntryLabels, Counter>::default();
        registry.register(
            "activity_log_entries",
            "Activity-log entries handled, by action",
            activity_log_entries.clone(),
        );
        let stripe_circuit_transitions = Family::<CircuitLabels, Counter>::default();
        registry.register(
            "stripe_circuit_transitions",
            "Circuit-breaker state changes per Stripe account, by the state entered",
            stripe_circuit_transitions.clone(),
        );
        let stripe_circuit_state = Family::<AccountLabels, Gauge>::default();
        registry.register(
            "stripe_circuit_state",
            "Circuit-breaker state per Stripe account: 0 closed, 1 half-open, 2 open",
            stripe_circuit_state.clone(),
        );
        let scheduler_in_flight = Family::<AccountLabels, Gauge>::default();
        registry.register(
            "account_reconciles_in_flight",
            "Reconciles of a StripeAccount's resources running now (at most --max-in-flight-per-account)",
            scheduler_in_flight.clone(),
        );
        let scheduler_waiting = Family::<AccountLabels, Gauge>::default();
        registry.register(
            "account_reconciles_waiting",
            "Reconciles of a StripeAccount's resources waiting for a worker",
            scheduler_waiting.clone(),
        );
        let scheduler_dispatched = Family::<AccountLabels, Counter>::default();
        registry.register(
            "account_reconciles_dispatched",
            "Reconciles of a StripeAccount's resources given a worker by the fair scheduler",
            scheduler_dispatched.clone(),
        );
        let canary_trips = Family::<NamespacedLabels, Counter>::default();
        registry.register(
            "canary_trips",
            "Canary trips: a canary key (honeytoken) was used",
            canary_trips.clone(),
        );
        let canary_tripped = Family::<NamespacedLabels, Gauge>::default();
        registry.register(
            "canary_tripped",
            "1 from a canary's trip until it has been re-minted and is quiet, else 0",
            canary_tripped.clone(),
        );
        Self {
            key_viewed,
            key_tampered,
            unmanaged_keys,
            activity_log_reads,
            activity_log_entries,
            stripe_circuit_transitions,
            stripe_circuit_state,
            scheduler_in_flight,
            scheduler_waiting,
            scheduler_dispatched,
            reconciliations,
            reconcile_errors,
            reconcile_duration,
            keys_minted,
            rotations,
            rotation_failures,
            key_age_seconds,
            next_rotation_seconds,
            key_created_timestamp_seconds,
            next_rotation_timestamp_seconds,
            rollout_stuck,
            stripe_requests,
            store_requests,
            store_request_duration,
            leader,
            old_key_in_use,
            current_key_unused,
            canary_trips,
            canary_tripped,
            registry: Arc::new(registry),
            last_len: Default::default(),
        }
    }

    /// A buffer for the next exposition: the last one's length and an eighth more.
    fn exposition_buffer(&self) -> String {
        let last = self.last_len.load(std::sync::atomic::Ordering::Relaxed);
        String::with_capacity(last + last / 8)
    }

    fn remember_len(&self, text: &str) {
        self.last_len
            .store(text.len(), std::sync::atomic::Ordering::Relaxed);
    }

    /// The OpenMetrics text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = self.exposition_buffer();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        self.remember_len(&out);
        out
    }

    /// The Prometheus text format (0.0.4) of every metric, for scrapers and tools that do not
    /// ask for OpenMetrics (`promtool check metrics` among them). Counters' HELP and TYPE lines
    /// carry the `_total` sample name, `# UNIT` and `# EOF` are dropped. The same text as
    /// [`openmetrics_to_prometheus_text`] of [`Metrics::encode`], rewritten line by line while
    /// it is encoded: one buffer (with per-object series, about 1.3 KiB per policy) instead of
    /// two.
    pub fn encode_prometheus_text(&self) -> String {
        let mut text = PrometheusText {
            out: self.exposition_buffer(),
            line: String::new(),
            help: None,
        };
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        let out = text.finish();
        self.remember_len(&out);
        out
    }

    /// Forgets the per-object gauges of a deleted object.
    pub fn forget_object(&self, labels: &ObjectLabels) {
        self.key_age_seconds.remove(labels);
        self.next_rotation_seconds.remove(labels);
        self.key_created_timestamp_seconds.remove(labels);
        self.next_rotation_timestamp_seconds.remove(labels);
        self.rollout_stuck.remove(labels);
        // The usage gauges are labelled by namespace and name only, and only key policies
        // have a usage signal: an endpoint of the same name must not drop its policy's gauges.
        if labels.kind == "StripeKeyPolicy" {
            let ns = NamespacedLabels {
                namespace: labels.namespace.clone(),
                name: labels.name.clone(),
            };
            self.old_key_in_use.remove(&ns);
            self.current_key_unused.remove(&ns);
            self.canary_tripped.remove(&ns);
        }
    }

    /// Mirrors what a status about to be written says into the per-object gauges the alerts
    /// read: when the current key was minted, when it is next due, and whether its rollout is
    /// stuck. Called on every status write, so it follows mints, rotations and rollouts
    /// without the engine recording each one.
    pub fn observe_status(&self, labels: &ObjectLabels, status: &crate::api::CredentialStatus) {
        fn unix(t: &k8s_openapi::apimachinery::pkg::apis::meta::v1::Time) -> f64 {
            t.0.as_millisecond() as f64 / 1000.0
        }
        match &status.last_rotation_at {
            Some(t) => {
                self.key_created_timestamp_seconds
                    .get_or_create(labels)
                    .set(unix(t));
            }
            None => {
                self.key_created_timestamp_seconds.remove(labels);
            }
        }
        match &status.next_rotation_at {
            Some(t) => {
                self.next_rotation_timestamp_seconds
                    .get_or_create(labels)
                    .set(unix(t));
            }
            None => {
                self.next_rotation_timestamp_seconds.remove(labels);
            }
        }
        let stuck =
            crate::api::conditions::find(&status.conditions, crate::api::condition_types::DEGRADED)
                .is_some_and(|c| c.status == "True" && c.reason == ROLLOUT_STUCK_REASON);
        self.rollout_stuck
            .get_or_create(labels)
            .set(i64::from(stuck));
    }
}

/// The `Degraded` reason of a rollout that did not finish within the rollout ceiling.
pub const ROLLOUT_STUCK_REASON: &str = "RolloutStuck";

/// Rewrites OpenMetrics text into the Prometheus text format as it is written, line by line
/// (see [`openmetrics_to_prometheus_text`]). A family's `# HELP` line is held until its `# TYPE`
/// line says whether it is a counter (the encoder writes HELP, then TYPE, then UNIT).
struct PrometheusText {
    out: String,
    /// The unfinished line.
    line: String,
    /// A `# HELP` line waiting for its `# TYPE`.
    help: Option<String>,
}

impl PrometheusText {
    fn flush_help(&mut self) {
        if let Some(help) = self.help.take() {
            self.out.push_str(&help);
            self.out.push('\n');
        }
    }

    fn end_line(&mut self) {
        let line = std::mem::take(&mut self.line);
        if line.starts_with("# HELP ") {
            self.flush_help();
            self.help = Some(line);
            return;
        }
        if line == "# EOF" || line.starts_with("# UNIT ") {
        } else if let Some(name) = line
            .strip_prefix("# TYPE ")
            .and_then(|rest| rest.strip_suffix(" counter"))
        {
            if let Some(help) = self.help.take() {
                match help
                    .strip_prefix("# HELP ")
                    .and_then(|rest| rest.strip_prefix(name))
                    .filter(|tail| tail.starts_with(' '))
                {
                    Some(tail) => {
                        self.out.push_str("# HELP ");
                        self.out.push_str(name);
                        self.out.push_str("_total");
                        self.out.push_str(tail);
                    }
                    None => self.out.push_str(&help),
                }
                self.out.push('\n');
            }
            self.out.push_str("# TYPE ");
            self.out.push_str(name);
            self.out.push_str("_total counter\n");
        } else {
            self.flush_help();
            self.out.push_str(&line);
            self.out.push('\n');
        }
        // The line buffer is reused: its capacity stays that of the longest line.
        self.line = line;
        self.line.clear();
    }

    fn finish(mut self) -> String {
        if !self.line.is_empty() {
            self.end_line();
        }
        self.flush_help();
        self.out
    }
}

impl std::fmt::Write for PrometheusText {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let mut rest = s;
        while let Some(i) = rest.find('\n') {
            self.line.push_str(&rest[..i]);
            self.end_line();
            rest = &rest[i + 1..];
        }
        self.line.push_str(rest);
        Ok(())
    }
}

/// Converts an OpenMetrics exposition (as prometheus-client writes it) to the Prometheus text
/// format 0.0.4.
pub fn openmetrics_to_prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let rewritten = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        out.push_str(rewritten.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_object_gauges_share_one_row_and_expose_only_what_is_set() {
        let m = Metrics::new();
        let a = ObjectLabels {
            kind: "StripeKeyPolicy".into(),
            namespace: "shop".into(),
            name: "a".into(),
        };
        m.key_age_seconds.get_or_create(&a).set(1.5);
        m.rollout_stuck.get_or_create(&a).set(1i64);
        let text = m.encode();
        assert!(
            text.contains(
                "stripe_key_operator_key_age_seconds{kind=\"StripeKeyPolicy\",namespace=\"shop\",name=\"a\"} 1.5"
            ),
            "{text}"
        );
        assert!(text.contains("stripe_key_operator_rollout_stuck{kind=\"StripeKeyPolicy\",namespace=\"shop\",name=\"a\"} 1\n"), "{text}");
        assert!(text.contains("# TYPE stripe_key_operator_key_age_seconds gauge"));
        // Unset columns expose nothing, not even a descriptor.
        assert!(!text.contains("next_rotation_seconds"), "{text}");
        assert_eq!(m.key_age_seconds.get_or_create(&a).get(), 1.5);
        assert!(m.key_age_seconds.remove(&a));
        assert!(!m.key_age_seconds.remove(&a));
        assert!(!m.encode().contains("key_age_seconds"));
        assert_eq!(
            m.key_age_seconds.rows.read().len(),
            1,
            "rollout_stuck keeps the row"
        );
        m.forget_object(&a);
        assert!(
            m.key_age_seconds.rows.read().is_empty(),
            "the last value takes the row"
        );
        assert!(!m.encode().contains("rollout_stuck{"));
    }

    #[test]
    fn the_streamed_prometheus_text_is_the_converted_openmetrics_text() {
        let m = Metrics::new();
        m.reconciliations
            .get_or_create(&ControllerLabels {
                controller: "stripekeypolicy".into(),
            })
            .inc();
        for i in 0..50 {
            let labels = ObjectLabels {
                kind: "StripeKeyPolicy".into(),
                namespace: "shop".into(),
                name: format!("svc-{i}"),
            };
            m.key_age_seconds.get_or_create(&labels).set(f64::from(i));
            m.rollout_stuck.get_or_create(&labels).set(0);
        }
        m.reconcile_duration
            .get_or_create(&ControllerLabels {
                controller: "stripekeypolicy".into(),
            })
            .observe(0.2);
        let converted = openmetrics_to_prometheus_text(&m.encode());
        let streamed = m.encode_prometheus_text();
        assert!(streamed.contains("# HELP stripe_key_operator_reconciliations_total "));
        assert!(streamed.contains("svc-49"));
        assert_eq!(streamed, converted);
        // Written in pieces of any size (the encoder's writes split lines anywhere).
        let mut text = PrometheusText {
            out: String::new(),
            line: String::new(),
            help: None,
        };
        let openmetrics = m.encode();
        let bytes = openmetrics.as_bytes();
        let mut at = 0;
        for (n, size) in [1usize, 7, 3, 64, 2].iter().cycle().enumerate() {
            if at >= bytes.len() {
                break;
            }
            let mut end = (at + size + n % 5).min(bytes.len());
            while !openmetrics.is_char_boundary(end) {
                end += 1;
            }
            std::fmt::Write::write_str(&mut text, &openmetrics[at..end]).unwrap();
            at = end;
        }
        assert_eq!(text.finish(), converted);
        // The next exposition's buffer starts at about the size of the last one.
        assert!(m.exposition_buffer().capacity() >= streamed.len());
    }

    #[test]
    fn prometheus_text_names_counters_with_total_and_has_no_eof() {
        let m = Metrics::new();
        m.reconciliations
            .get_or_create(&ControllerLabels {
                controller: "x".into(),
            })
            .inc();
        let text = m.encode_prometheus_text();
        assert!(text.contains("# TYPE stripe_key_operator_reconciliations_total counter"));
        assert!(
            text.contains(
                "# HELP stripe_key_operator_reconciliations_total Reconciliations started"
            )
        );
        assert!(text.contains("stripe_key_operator_reconciliations_total{controller=\"x\"} 1"));
        assert!(!text.contains("# EOF"));
    }

    fn time(s: &str) -> k8s_openapi::apimachinery::pkg::apis::meta::v1::Time {
        k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(s.parse().unwrap())
    }

    fn degraded(
        reason: &str,
        status: &str,
    ) -> k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
        k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
            type_: "Degraded".into(),
            status: status.into(),
            reason: reason.into(),
            message: String::new(),
            observed_generation: None,
            last_transition_time: time("2026-01-01T00:00:00Z"),
        }
    }

    #[test]
    fn status_writes_drive_the_key_time_and_rollout_stuck_gauges() {
        let m = Metrics::new();
        let labels = ObjectLabels {
            kind: "StripeKeyPolicy".into(),
            namespace: "payments".into(),
            name: "api".into(),
        };
        let mut status = crate::api::CredentialStatus {
            last_rotation_at: Some(time("2026-01-01T00:00:00Z")),
            next_rotation_at: Some(time("2026-01-31T00:00:00Z")),
            conditions: vec![degraded("RolloutStuck", "True")],
            ..Default::default()
        };
        m.observe_status(&labels, &status);
        let sel = r#"{kind="StripeKeyPolicy",namespace="payments",name="api"}"#;
        let text = m.encode();
        assert!(
            text.contains(&format!(
                "stripe_key_operator_key_created_timestamp_seconds{sel} 1767225600.0"
            )),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "stripe_key_operator_next_rotation_timestamp_seconds{sel} 1769817600.0"
            )),
            "{text}"
        );
        assert!(
            text.contains(&format!("stripe_key_operator_rollout_stuck{sel} 1")),
            "{text}"
        );

        // The rollout finishes and the schedule is removed: stuck drops to 0, the due time goes.
        status.conditions = vec![degraded("RolloutComplete", "False")];
        status.next_rotation_at = None;
        m.observe_status(&labels, &status);
        let text = m.encode();
        assert!(
            text.contains(&format!("stripe_key_operator_rollout_stuck{sel} 0")),
            "{text}"
        );
        assert!(
            !text.contains(&format!(
                "stripe_key_operator_next_rotation_timestamp_seconds{sel}"
            )),
            "{text}"
        );
        // A RolloutStuck reason on a condition that is not True is not stuck.
        status.conditions = vec![degraded("RolloutStuck", "False")];
        m.observe_status(&labels, &status);
        assert!(
            m.encode()
                .contains(&format!("stripe_key_operator_rollout_stuck{sel} 0"))
        );

        // Deletion forgets every per-object series.
        m.forget_object(&labels);
        let text = m.encode();
        assert!(!text.contains(r#"name="api""#), "{text}");
    }

    #[test]
    fn deleting_an_endpoint_keeps_the_usage_gauges_of_a_policy_of_the_same_name() {
        let m = Metrics::new();
        let usage = NamespacedLabels {
            namespace: "payments".into(),
            name: "api".into(),
        };
        m.old_key_in_use.get_or_create(&usage).set(1);
        m.current_key_unused.get_or_create(&usage).set(1);
        let labels = |kind: &str| ObjectLabels {
            kind: kind.into(),
            namespace: "payments".into(),
            name: "api".into(),
        };
        m.forget_object(&labels("StripeWebhookEndpoint"));
        let text = m.encode();
        for gauge in ["old_key_in_use", "current_key_unused"] {
            assert!(
                text.contains(&format!(
                    "stripe_key_operator_{gauge}{{namespace=\"payments\",name=\"api\"}} 1"
                )),
                "{text}"
            );
        }
        m.forget_object(&labels("StripeKeyPolicy"));
        let text = m.encode();
        assert!(!text.contains(r#"name="api""#), "{text}");
    }

    #[test]
    fn encoding_has_the_prefix_and_every_family() {
        let m = Metrics::new();
        m.reconciliations
            .get_or_create(&ControllerLabels {
                controller: "stripekeypolicy".into(),
            })
            .inc();
        let text = m.encode();
        for name in [
            "stripe_key_operator_reconciliations_total",
            "stripe_key_operator_leader",
            "# EOF",
        ] {
            assert!(text.contains(name), "{name} missing in:\n{text}");
        }
    }
}
