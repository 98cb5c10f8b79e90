//! Types shared by several kinds.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, Time};
use kube::KubeSchema;
use serde::{Deserialize, Serialize};

/// A reference to a cluster-scoped `StripeAccount`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct AccountRef {
    /// Name of the `StripeAccount` whose Stripe App mints this credential.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// The kind of a workload that is rolled when its secret changes.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, schemars::JsonSchema)]
pub enum WorkloadKind {
    Deployment,
    StatefulSet,
    DaemonSet,
}

impl WorkloadKind {
    /// The lower-case plural the Kubernetes API uses.
    pub fn plural(self) -> &'static str {
        match self {
            WorkloadKind::Deployment => "deployments",
            WorkloadKind::StatefulSet => "statefulsets",
            WorkloadKind::DaemonSet => "daemonsets",
        }
    }
}

/// A workload in the same namespace that consumes the secret: it is rolled (its pod template gets
/// the annotation `stripekeys.io/key-fingerprint`) whenever the secret changes, and a routine
/// rotation keeps the old credential valid until it has finished rolling.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.name) != has(self.selector)").message("exactly one of name or selector must be set"))]
pub struct RolloutTarget {
    /// Deployment, StatefulSet or DaemonSet.
    pub kind: WorkloadKind,
    /// Name of one workload. Exactly one of `name` and `selector`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub name: Option<String>,
    /// Label selector for several workloads of `kind`. Exactly one of `name` and `selector`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,
}

/// Where, inside the operator's Vault subtree for this resource, the credential is also written.
/// Not supported yet: a `subPath` is refused (`Ready=False`, reason `InvalidSpec`); the bundle is
/// always at `<prefix>/<namespace>/<kind>/<name>`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct VaultDelivery {
    /// Extra path segments below `<prefix>/<namespace>/<kind>/<name>`. Lower-case letters, digits,
    /// `-`, `_` and `/` between segments; never `..` and never absolute. Empty means the
    /// resource's own path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        regex(pattern = r"^[a-z0-9]([a-z0-9_-]*[a-z0-9])?(/[a-z0-9]([a-z0-9_-]*[a-z0-9])?)*$"),
        length(max = 200)
    )]
    pub sub_path: Option<String>,
}

/// The `pattern` of every Go-duration field (`time.ParseDuration` without a sign): `720h`,
/// `1h30m`, `90s`, `1.5h`.
pub(crate) const GO_DURATION_PATTERN: &str = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$";

/// A CEL rule for a Go-duration string field: at least `min` and, when given, at most `max`.
///
/// The rule holds for a value that is not a Go duration at all (`30d`): the field's `pattern`
/// reports that one, and `duration()` of such a value would fail with an evaluation error instead
/// of the message. The `matches()` guard needs the field to have a `maxLength`, or the
/// apiserver's cost estimate refuses the CRD.
pub(crate) fn duration_rule(min: &str, max: Option<&str>, message: &str) -> kube::core::Rule {
    // `[.]` rather than `\.`: the same regex as GO_DURATION_PATTERN without CEL escaping.
    let guard = "!self.matches('^([0-9]+([.][0-9]+)?(ns|us|µs|ms|s|m|h))+$')";
    let range = match max {
        Some(max) => {
            format!("duration(self) >= duration('{min}') && duration(self) <= duration('{max}')")
        }
        None => format!("duration(self) >= duration('{min}')"),
    };
    kube::core::Rule::new(format!("{guard} || ({range})")).message(message)
}

/// The CEL rule of every cron `schedule` field: five fields separated by whitespace. A rule and
/// not a `pattern` so that the message tells users what a schedule looks like.
pub(crate) fn cron_rule() -> kube::core::Rule {
    kube::core::Rule::new(r"self.matches('^(\\S+\\s+){4}\\S+$')").message(
        "schedule must be a cron expression of five fields (minute hour day-of-month month \
         day-of-week), such as '0 3 * * 1'",
    )
}

/// How often a credential is replaced: the schedule part of a rotation spec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RotationSchedule {
    /// A fixed period after the last rotation (Go duration).
    Every(String),
    /// A five-field cron schedule in a time zone (IANA name; UTC when absent).
    Cron {
        schedule: String,
        time_zone: Option<String>,
    },
}

/// Declares the schedule fields (`every`, `schedule`, `timeZone`) of a rotation spec. The CEL
/// rules "exactly one of every or schedule" and "timeZone only with schedule" sit on the struct.
macro_rules! rotation_schedule_accessor {
    ($ty:ty) => {
        impl $ty {
            /// The declared schedule, if any.
            pub fn schedule(&self) -> Option<$crate::api::RotationSchedule> {
                match (&self.every, &self.schedule) {
                    (Some(every), None) => {
                        Some($crate::api::RotationSchedule::Every(every.clone()))
                    }
                    (None, Some(cron)) => Some($crate::api::RotationSchedule::Cron {
                        schedule: cron.clone(),
                        time_zone: self.time_zone.clone(),
                    }),
                    _ => None,
                }
            }
        }
    };
}
pub(crate) use rotation_schedule_accessor;

/// The condition types every kind reports.
pub mod condition_types {
    /// The credential is minted, stored, published and rolled out as declared.
    pub const READY: &str = "Ready";
    /// A rotation is in progress.
    pub const ROTATING: &str = "Rotating";
    /// Something needs attention although the current credential still works.
    pub const DEGRADED: &str = "Degraded";
    /// Stripe reports the current key used since its rollout finished (`False`, reason
    /// `CurrentKeyUnused`: long after the rollout nothing has used it). Restricted keys only:
    /// webhook endpoints have no usage signal.
    pub const KEY_IN_USE: &str = "KeyInUse";
}

/// A credential as status shows it: never the secret, only its id and fingerprint.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct KeyStatus {
    /// Stripe's id of the key (or of the webhook endpoint).
    pub id: String,
    /// First 12 hex characters of the SHA-256 of the secret.
    pub fingerprint: String,
    /// When it was created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<Time>,
    /// When it stops working (set once an expiry is scheduled).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Time>,
    /// The Stripe account (`acct_...` context) it was minted under: it is retired through that
    /// account only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<String>,
    /// When every rollout target had rolled onto this credential (the usage checks count from
    /// here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rolled_out_at: Option<Time>,
    /// The latest use Stripe reported (`last_used`) when the operator last looked, once it is
    /// later than the rollout (restricted keys only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_used: Option<Time>,
    /// When the operator last asked Stripe whether this credential is used (at most once per
    /// `--key-usage-check-interval`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage_checked_at: Option<Time>,
}

/// The rotation bookkeeping every credential kind's status carries (flattened into it).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct CredentialStatus {
    /// The generation the operator last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `Rotating`, `Degraded`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The credential workloads use now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_key: Option<KeyStatus>,
    /// The credential being retired after a routine rotation, valid until `expiresAt`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_key: Option<KeyStatus>,
    /// Credentials that must be retired at Stripe before anything else happens (an incident's
    /// leaked keys, a key minted with the wrong scopes, a create whose secret was lost). Recorded
    /// before the first attempt; an entry leaves only once Stripe confirms it is dead.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retiring_keys: Vec<KeyStatus>,
    /// When the current credential was minted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_rotation_at: Option<Time>,
    /// When the schedule next rotates the credential (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_rotation_at: Option<Time>,
    /// Number of the current credential (1 for the first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation_number: Option<i64>,
    /// The rotation in progress, if any.
    // Boxed: a rotation is in progress for few objects at a time, and inline it made every
    // cached object ~470 bytes larger.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation: Option<Box<super::RotationState>>,
    /// The last `stripekeys.io/rotate` value fully handled: the same value never rotates twice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_handled_rotate_request: Option<String>,
    /// The Secret the credential was last published to (a rename of `delivery.secret.name`
    /// deletes it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub published_secret: Option<String>,
}

/// Lets a kind's status be used as its [`CredentialStatus`] (`status.current_key`, ...).
macro_rules! credential_status_deref {
    ($ty:ty) => {
        impl std::ops::Deref for $ty {
            type Target = $crate::api::CredentialStatus;
            fn deref(&self) -> &Self::Target {
                &self.credential
            }
        }
        impl std::ops::DerefMut for $ty {
            fn deref_mut(&mut self) -> &mut Self::Target {
                &mut self.credential
            }
        }
    };
}
pub(crate) use credential_status_deref;

/// What started a rotation.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, schemars::JsonSchema)]
pub enum RotationTrigger {
    /// The first credential of a new resource.
    Initial,
    /// The schedule (`every` or `schedule`) came due.
    Schedule,
    /// A new value of the `stripekeys.io/rotate` annotation.
    Annotation,
    /// The annotation with `stripekeys.io/rotate-reason: incident`: the old credential is revoked
    /// at once.
    Incident,
    /// The declared permissions (or endpoint settings Stripe cannot update) changed.
    SpecChange,
    /// The credential was found missing at Stripe (deleted outside the operator).
    Recreate,
}

/// Conditions and generation, common to every kind's status.
pub trait HasConditions {
    fn conditions(&self) -> &[Condition];
}
