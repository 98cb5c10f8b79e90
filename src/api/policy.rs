//! `StripeKeyPolicy`: a least-privilege restricted key, its delivery and its rotation.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, Time};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::common::{
    AccountRef, GO_DURATION_PATTERN, KeyStatus, RolloutTarget, RotationTrigger, VaultDelivery,
    cron_rule, duration_rule, rotation_schedule_accessor,
};

/// Default Secret key of the current API key.
pub const DEFAULT_API_KEY_KEY: &str = "STRIPE_API_KEY";
/// Default Secret key of the previous API key while it is still valid.
pub const DEFAULT_PREVIOUS_API_KEY_KEY: &str = "STRIPE_API_KEY_PREVIOUS";

/// A StripeKeyPolicy declares a Stripe restricted key with exactly the listed permissions. The
/// operator mints it, keeps it in the secret store, publishes it in a Secret, rolls the workloads
/// that use it, and rotates it on schedule, on a scope change and on request.
///
/// Rotate now: `kubectl annotate stripekeypolicy NAME stripekeys.io/rotate="$(date +%s)"`.
/// Compromised key: add `stripekeys.io/rotate-reason=incident` and the old key is revoked at once.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[kube(
    group = "stripekeys.io",
    version = "v1alpha1",
    kind = "StripeKeyPolicy",
    plural = "stripekeypolicies",
    shortname = "skp",
    category = "stripe",
    namespaced,
    status = "StripeKeyPolicyStatus",
    doc = "A least-privilege Stripe restricted key, delivered to workloads and rotated.",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(name = "Key", type_ = "string", json_path = ".status.currentKey.id"),
    printcolumn(
        name = "Last Rotated",
        type_ = "date",
        json_path = ".status.lastRotationAt"
    ),
    // A `date` column prints future times as `<invalid>`: the time itself reads better.
    printcolumn(
        name = "Next Rotation",
        type_ = "string",
        description = "When the schedule next rotates the key (RFC 3339, UTC).",
        json_path = ".status.nextRotationAt"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.canary) || (size(self.permissions) == 1 && self.permissions[0] in ['balance_read', 'country_spec_read'])").message("a canary holds exactly one harmless read permission: balance_read or country_spec_read"))]
#[x_kube(validation = Rule::new("!has(self.canary) || !has(self.connectPermissions) || size(self.connectPermissions) == 0").message("a canary has no connectPermissions"))]
pub struct StripeKeyPolicySpec {
    /// The StripeAccount that mints the key. Immutable: create a new policy to move accounts.
    #[x_kube(validation = Rule::new("self == oldSelf").message("accountRef is immutable"))]
    pub account_ref: AccountRef,
    /// Stripe permissions of the key, `<resource>_read` or `<resource>_write` (`write` implies
    /// `read`), such as `charge_read` or `refund_write`. Names outside the operator's catalogue
    /// are refused unless `allowUnlistedPermissions` is true.
    #[schemars(
        length(min = 1, max = 200),
        inner(regex(pattern = r"^[a-z][a-z0-9_]*_(read|write)$"), length(max = 100))
    )]
    #[schemars(extend("x-kubernetes-list-type" = "set"))]
    pub permissions: Vec<String>,
    /// Permissions on connected accounts (Stripe Connect), same format as `permissions`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 200),
        inner(regex(pattern = r"^[a-z][a-z0-9_]*_(read|write)$"), length(max = 100))
    )]
    #[schemars(extend("x-kubernetes-list-type" = "set"))]
    pub connect_permissions: Vec<String>,
    /// Accept permission names that are not in the operator's catalogue (new Stripe resources).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_unlisted_permissions: bool,
    /// IPv4 addresses or CIDR ranges the key may be used from. Not supported yet: Stripe's
    /// API-keys API documents no parameter to set it, so a non-empty list is refused
    /// (`Ready=False`, reason `InvalidSpec`) rather than silently ignored.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 100),
        inner(regex(
            pattern = r"^((25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])\.){3}(25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])(/([0-9]|[12][0-9]|3[0-2]))?$"
        ))
    )]
    #[schemars(extend("x-kubernetes-list-type" = "set"))]
    pub ip_allowlist: Vec<String>,
    /// Where the key is delivered.
    pub delivery: KeyDelivery,
    /// When the key is replaced. Absent: only on request and on permission changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation: Option<Box<KeyRotation>>,
    /// Makes this policy a canary (honeytoken): a key nothing legitimate ever uses, published
    /// in its Secret as a decoy. Any use Stripe reports trips it: a Warning Event
    /// `CanaryTripped`, `Tripped=True`, metrics, an audit record and (by default) incident
    /// rotations of the policies it guards; the canary itself is then re-minted so that it can
    /// trip again. `permissions` must be exactly one harmless read permission
    /// (`balance_read` or `country_spec_read`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<Canary>,
}

/// The read permissions a canary may hold: harmless if the decoy is stolen (`balance_read`
/// shows balance figures and answers the call an attacker tries first; `country_spec_read`
/// shows only Stripe's public country data).
pub const CANARY_PERMISSIONS: &[&str] = &["balance_read", "country_spec_read"];

/// The condition type a canary sets when it is used (`True`, reason `CanaryUsed`).
pub const CANARY_TRIPPED_CONDITION: &str = "Tripped";

/// A canary key: what it guards and what a trip does.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Canary {
    /// The StripeKeyPolicies and StripeWebhookEndpoints in this namespace whose credentials a
    /// trip rotates as an incident (old credential revoked at once). `{}` selects every one;
    /// absent: none. Other canaries are never guarded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guards: Option<LabelSelector>,
    /// What a trip does besides the Event, condition, metrics and audit record:
    /// `IncidentRotation` (default) also rotates every guarded resource as an incident;
    /// `Alert` only reports. Either way the canary itself is re-minted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_trip: Option<CanaryOnTrip>,
}

/// What a canary trip does to the resources it guards.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, schemars::JsonSchema,
)]
pub enum CanaryOnTrip {
    /// Incident rotation of every guarded resource (the old credentials are revoked at once).
    #[default]
    IncidentRotation,
    /// Report only.
    Alert,
}

impl Canary {
    /// The effective `onTrip`.
    pub fn on_trip(&self) -> CanaryOnTrip {
        self.on_trip.unwrap_or_default()
    }
}

/// What a canary has seen and done (see `spec.canary`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct CanaryStatus {
    /// The latest use Stripe reported that was already handled as a trip (whole seconds): a
    /// use is a new trip only when it is later, so a trip is handled once, across restarts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handled_last_used: Option<Time>,
    /// The latest trip.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_trip: Option<CanaryTrip>,
    /// How many times the canary tripped.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub trips: i64,
}

fn is_zero(n: &i64) -> bool {
    *n == 0
}

/// One trip of a canary.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct CanaryTrip {
    /// The canary key that was used (id only).
    pub key_id: String,
    /// When Stripe says it was used.
    pub last_used: Time,
    /// When the operator saw it.
    pub detected_at: Time,
    /// The `stripekeys.io/rotate` value of the incident rotations this trip requested.
    pub request: String,
    /// The guarded resources (`Kind/name`) asked to rotate as an incident.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rotated: Vec<String>,
    /// Set until every incident rotation of this trip has been requested (a restart finishes
    /// what a crash interrupted).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub actions_pending: bool,
}

/// Where a key is delivered.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.broker) || !has(self.rolloutTargets) || size(self.rolloutTargets) == 0").message("a brokered key needs no rollout: remove rolloutTargets (the egress-proxy sidecar switches keys itself)"))]
pub struct KeyDelivery {
    /// Also write the key below this resource's path in Vault (workloads that read Vault
    /// directly). The bundle is always kept in the store; this only adds a sub-path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vault: Option<VaultDelivery>,
    /// The Secret in the policy's namespace that the operator keeps in sync (owned by the
    /// policy, so it goes when the policy goes).
    pub secret: KeySecretDelivery,
    /// Workloads rolled when the key changes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 50))]
    pub rollout_targets: Vec<RolloutTarget>,
    /// Brokered delivery: the workload never holds the key. The Secret's `key` holds a
    /// placeholder (`rk_broker_placeholder_...`, stable for the policy's life) and
    /// `STRIPE_API_BASE` the broker's loopback address; the real key and its permissions are in
    /// `STRIPE_BROKER_API_KEY` and `STRIPE_BROKER_PERMISSIONS`, to be mounted only into the
    /// `stripe-key-operator egress-proxy` sidecar, which swaps the placeholder for the key and
    /// refuses routes the permissions cannot serve. A rotation needs no rollout (the sidecar
    /// re-reads its Secret volume), so `rolloutTargets` must be empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broker: Option<Box<BrokerDelivery>>,
}

/// Settings of brokered delivery.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct BrokerDelivery {
    /// Loopback port of the egress-proxy sidecar, published as
    /// `STRIPE_API_BASE=http://127.0.0.1:<port>`. Default 12111.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1024, max = 65535))]
    pub port: Option<u16>,
    /// Anomaly detection in the sidecar: a burst of sensitive writes (refunds, payouts,
    /// transfers, customer writes) far above what the sidecar learned is normal for that time
    /// of day is recorded (metric and Warning Event `EgressAnomaly` on this policy), and with
    /// `action: Throttle` answered locally with Stripe's 429, or with `IncidentRotation` ends in
    /// an incident rotation. Published to the sidecar in the Secret's
    /// `STRIPE_BROKER_ANOMALY_POLICY` entry (mount it next to the key); the sidecar follows
    /// changes without a restart and keeps what it learned. Absent: no detection. The sidecar's
    /// ServiceAccount needs `get`/`patch` on this policy and `create`/`patch` on Events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anomaly: Option<crate::egress::anomaly::AnomalyPolicy>,
}

impl BrokerDelivery {
    /// The effective port.
    pub fn port(&self) -> u16 {
        self.port.unwrap_or(crate::egress::proxy::DEFAULT_PORT)
    }

    /// The API base the application uses.
    pub fn api_base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port())
    }
}

/// The synced Secret and its key names.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.key) || !has(self.previousKey) || self.key != self.previousKey").message("key and previousKey must differ"))]
pub struct KeySecretDelivery {
    /// Name of the Secret. It must not exist already unless the operator created it.
    #[schemars(
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"),
        length(max = 253)
    )]
    pub name: String,
    /// Key of the current API key. Default `STRIPE_API_KEY`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[-._a-zA-Z0-9]+$"), length(max = 253))]
    pub key: Option<String>,
    /// Key of the previous API key, present only while it is still valid during a rotation.
    /// Default `STRIPE_API_KEY_PREVIOUS`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[-._a-zA-Z0-9]+$"), length(max = 253))]
    pub previous_key: Option<String>,
}

impl KeySecretDelivery {
    /// The effective key name of the current API key.
    pub fn key_name(&self) -> &str {
        self.key.as_deref().unwrap_or(DEFAULT_API_KEY_KEY)
    }

    /// The effective key name of the previous API key.
    pub fn previous_key_name(&self) -> &str {
        self.previous_key
            .as_deref()
            .unwrap_or(DEFAULT_PREVIOUS_API_KEY_KEY)
    }
}

/// Rotation of a restricted key: exactly one of `every` and `schedule`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.every) != has(self.schedule)").message("exactly one of every or schedule must be set"))]
#[x_kube(validation = Rule::new("!has(self.timeZone) || has(self.schedule)").message("timeZone applies only to schedule"))]
pub struct KeyRotation {
    /// Rotate a fixed period after the last rotation, as a Go duration (`720h` = 30 days). At
    /// least `1h`. A small jitter (1% of the period, at most 10 minutes) spreads rotations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = GO_DURATION_PATTERN), length(max = 32))]
    #[x_kube(validation = duration_rule("1h", None, "every must be at least 1h"))]
    pub every: Option<String>,
    /// Rotate on a five-field cron schedule (`0 3 * * 1` = Mondays at 03:00) in `timeZone`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 100))]
    #[x_kube(validation = cron_rule())]
    pub schedule: Option<String>,
    /// IANA time zone of `schedule`, such as `Europe/Berlin`. Default UTC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[A-Za-z_]+(/[A-Za-z0-9_+-]+)*$"), length(max = 64))]
    pub time_zone: Option<String>,
    /// How long the old key stays valid after every rollout target has rolled onto the new one,
    /// as a Go duration. Default `1h`; at least `5m` (an expired key keeps working for minutes at
    /// Stripe, so less buys nothing); at most `168h` (Stripe's limit of 7 days).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = GO_DURATION_PATTERN), length(max = 32))]
    #[x_kube(validation = duration_rule("5m", Some("168h"), "overlap must be between 5m and 168h"))]
    pub overlap: Option<String>,
    /// Expire the policy's keys at Stripe when the policy is deleted. Default true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoke_on_delete: Option<bool>,
    /// Usage-aware expiry: before the old key is expired at the end of a routine overlap, Stripe
    /// is asked when it was last used; a key still used after the rollout is held (not expired)
    /// until it has been quiet for `quietPeriod` or `maxHold` has passed. Incidents never wait.
    /// Also warns when the current key shows no use long after its rollout. On by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage_aware_expiry: Option<UsageAwareExpiry>,
    /// What happens when Stripe's activity log shows a person viewing (revealing) one of this
    /// policy's keys in the Dashboard: its secret may have been copied. `Alert` (default): a
    /// Warning Event `KeyViewed`, an audit record and the metric
    /// `stripe_key_operator_key_viewed_total`. `IncidentRotation`: the same, and an incident
    /// rotation (as with `stripekeys.io/rotate-reason=incident`) revokes every key handed out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_key_viewed: Option<OnKeyViewed>,
}

/// What happens when Stripe's activity log shows a person viewing (revealing) one of this
/// policy's keys in the Dashboard: its secret may have been copied. `Alert` (default): a Warning
/// Event `KeyViewed`, an audit record and the metric `stripe_key_operator_key_viewed_total`.
/// `IncidentRotation`: the same, and an incident rotation (as with
/// `stripekeys.io/rotate-reason=incident`) replaces the key and revokes every key handed out.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema,
)]
pub enum OnKeyViewed {
    /// Warn (Event, audit record, metric) and leave the key in place.
    #[default]
    Alert,
    /// Warn, and replace the key at once through an incident rotation.
    IncidentRotation,
}

/// Usage-aware expiry of the old key, and the unused-key warning.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct UsageAwareExpiry {
    /// Ask Stripe about the keys' use at all. Default true. `false`: the old key is expired when
    /// the overlap ends whatever Stripe reports, and no unused-key warning is given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// How long Stripe must report no use of a held old key before it is expired, as a Go
    /// duration. Default `30m`; between `5m` and `168h`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = GO_DURATION_PATTERN), length(max = 32))]
    #[x_kube(validation = duration_rule("5m", Some("168h"), "quietPeriod must be between 5m and 168h"))]
    pub quiet_period: Option<String>,
    /// The hard ceiling: the old key is expired this long after the rollout finished even if it
    /// is still in use, as a Go duration. At least the `overlap`; at most `168h` and the
    /// `maxOverlap` of every StripeGuardrail that selects the namespace. Default: the longest
    /// overlap the guardrails allow (`168h` without one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = GO_DURATION_PATTERN), length(max = 32))]
    #[x_kube(validation = duration_rule("5m", Some("168h"), "maxHold must be between 5m and 168h"))]
    pub max_hold: Option<String>,
    /// Warn (`KeyInUse=False`, reason `CurrentKeyUnused`, a Warning Event and the metric
    /// `stripe_key_operator_current_key_unused`) when Stripe reports no use of the current key
    /// this long after its rollout finished, as a Go duration. Default `1h`; between `5m` and
    /// `720h`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = GO_DURATION_PATTERN), length(max = 32))]
    #[x_kube(validation = duration_rule("5m", Some("720h"), "unusedAfter must be between 5m and 720h"))]
    pub unused_after: Option<String>,
}

/// The default quiet period of usage-aware expiry.
pub const DEFAULT_QUIET_PERIOD: &str = "30m";
/// The default delay after a rollout before an unused current key is reported.
pub const DEFAULT_UNUSED_AFTER: &str = "1h";
/// Stripe's longest overlap (`expire_current_key_in_minutes` at most 10080): the hard ceiling
/// of a hold when no guardrail sets a lower `maxOverlap`.
pub const MAX_OVERLAP: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);

rotation_schedule_accessor!(KeyRotation);

/// The default overlap of a key rotation.
pub const DEFAULT_KEY_OVERLAP: &str = "1h";

/// Where a rotation stands. Recorded before each external side effect so that a restart
/// resumes the step it was in and never mints twice.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, schemars::JsonSchema)]
pub enum RotationPhase {
    /// Nothing in progress.
    Idle,
    /// Creating the new key at Stripe (idempotency key recorded).
    Minting,
    /// Writing the bundle (new and old key) to the secret store.
    Storing,
    /// Writing the Kubernetes Secret.
    Syncing,
    /// Waiting for the rollout targets to roll onto the new key.
    RollingOut,
    /// Waiting for the overlap to pass before the old key is expired.
    Overlapping,
    /// Expiring the old key at Stripe and dropping it from the store and the Secret.
    Expiring,
}

/// An in-progress rotation.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct RotationState {
    /// The step in progress.
    pub phase: RotationPhase,
    /// Rotation number: 1 for the first key, +1 for each rotation.
    pub number: i64,
    /// What started it.
    pub trigger: RotationTrigger,
    /// When it started.
    pub started_at: Time,
    /// The `Idempotency-Key` of the mint, derived from the policy UID and `number`.
    pub idempotency_key: String,
    /// The new key once minted (id and fingerprint only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new_key: Option<KeyStatus>,
    /// When the rollout targets had all rolled onto the new key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rolled_out_at: Option<Time>,
    /// The permissions being minted, sorted (a replay of the mint sends exactly these).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub permissions: Vec<String>,
    /// The Connect permissions being minted, sorted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub connect_permissions: Vec<String>,
    /// The `stripekeys.io/rotate` value this rotation handles; it is recorded as handled only
    /// when the rotation completes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<String>,
    /// When the rollout began: the rollout ceiling counts from here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout_started_at: Option<Time>,
    /// How many times the create was retried under a fresh idempotency key because Stripe kept
    /// replaying a saved server error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<i64>,
    /// Set while the rotation's create parameters are not fixed yet (an incident that started
    /// while the spec was refused): they are fixed from the spec before the first create.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unprepared: bool,
    /// When the create was first sent under the current idempotency key. A create retried more
    /// than Stripe's idempotency window (24 h) later cannot be a replay: whatever this resource
    /// owns at Stripe and status does not know is an orphan, retired before creating again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub create_sent_at: Option<Time>,
    /// Set when this rotation replaced one whose create may have made a credential that was
    /// never recorded: what this resource owns at Stripe and status does not know is retired
    /// before the next create.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub sweep_first: bool,
    /// Set while the old key is held past its overlap because Stripe reports it still in use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage_hold: Option<UsageHold>,
}

/// An old key held because it is still in use (see `spec.rotation.usageAwareExpiry`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct UsageHold {
    /// When the hold began.
    pub since: Time,
    /// The latest use Stripe reported.
    pub last_used: Time,
    /// When Stripe is asked again.
    pub next_check_at: Time,
    /// How many checks found it in use (the re-check interval doubles with each).
    pub checks: i64,
}

/// Observed state of a StripeKeyPolicy.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct StripeKeyPolicyStatus {
    /// The rotation bookkeeping shared by every credential kind.
    #[serde(flatten)]
    pub credential: super::CredentialStatus,
    /// Permissions of the current key, sorted (to detect scope changes).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub current_permissions: Vec<String>,
    /// Connect permissions of the current key, sorted (to detect scope changes).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub current_connect_permissions: Vec<String>,
    /// Canary bookkeeping (canaries only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<Box<CanaryStatus>>,
}

super::common::credential_status_deref!(StripeKeyPolicyStatus);
