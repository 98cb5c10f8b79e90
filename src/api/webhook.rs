//! `StripeWebhookEndpoint`: a Stripe webhook endpoint and its signing secret.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::common::{
    AccountRef, GO_DURATION_PATTERN, RolloutTarget, RotationTrigger, VaultDelivery, cron_rule,
    duration_rule, rotation_schedule_accessor,
};

/// Default Secret key of the current signing secret.
pub const DEFAULT_WEBHOOK_SECRET_KEY: &str = "STRIPE_WEBHOOK_SECRET";
/// Default Secret key of every valid signing secret, comma-separated (two during an overlap).
pub const DEFAULT_WEBHOOK_SECRETS_KEY: &str = "STRIPE_WEBHOOK_SECRETS";

/// A StripeWebhookEndpoint declares a webhook endpoint at Stripe. The operator creates it, keeps
/// Stripe's side as declared, publishes its signing secret in a Secret, and rotates the secret
/// blue/green (Stripe has no API to roll a signing secret): a second endpoint is created, both
/// secrets are published, the targets roll, and the old endpoint is deleted after the overlap.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[kube(
    group = "stripekeys.io",
    version = "v1alpha1",
    kind = "StripeWebhookEndpoint",
    plural = "stripewebhookendpoints",
    shortname = "swe",
    category = "stripe",
    namespaced,
    status = "StripeWebhookEndpointStatus",
    doc = "A Stripe webhook endpoint whose signing secret is delivered to workloads and rotated.",
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
pub struct StripeWebhookEndpointSpec {
    /// The StripeAccount the endpoint belongs to. Immutable.
    #[x_kube(validation = Rule::new("self == oldSelf").message("accountRef is immutable"))]
    pub account_ref: AccountRef,
    /// The https URL Stripe delivers events to.
    #[schemars(length(min = 9, max = 2048))]
    #[x_kube(validation = Rule::new("self.matches('^https://[^/?#@\\\\s]+(/[^\\\\s]*)?$')").message("url must be an https URL"))]
    pub url: String,
    /// Event types to deliver, such as `payment_intent.succeeded`, or `["*"]` for all.
    #[schemars(
        length(min = 1, max = 256),
        inner(
            regex(pattern = r"^(\*|[a-z0-9_]+(\.[a-z0-9_]+)+)$"),
            length(max = 100)
        )
    )]
    #[schemars(extend("x-kubernetes-list-type" = "set"))]
    #[x_kube(validation = Rule::new("!self.exists(e, e == '*') || size(self) == 1").message("'*' must be the only event type"))]
    pub enabled_events: Vec<String>,
    /// The Stripe API version of event payloads (`2024-06-20`). Default: the account's default.
    /// Stripe cannot change it on an existing endpoint: a change rotates to a new endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}(\.[a-z]+)?$"))]
    pub api_version: Option<String>,
    /// Shown in Stripe's Dashboard.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 5000))]
    pub description: Option<String>,
    /// Receive events from connected accounts (Stripe Connect). Cannot change on an existing
    /// endpoint: a change rotates to a new endpoint.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub connect: bool,
    /// Metadata set on the endpoint (at most 40 keys; the operator adds its own
    /// `stripekeys_*` keys, which are reserved).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 40, "additionalProperties" = {"type": "string", "maxLength": 500}))]
    #[x_kube(validation = Rule::new("self.all(k, size(k) <= 40 && !k.startsWith('stripekeys_'))").message("metadata keys are at most 40 characters and stripekeys_* keys are reserved"))]
    pub metadata: BTreeMap<String, String>,
    /// Where the signing secret is delivered.
    pub delivery: WebhookDelivery,
    /// When the signing secret is replaced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation: Option<WebhookRotation>,
    /// How often Stripe's side is compared with this spec, as a Go duration. Default `10m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = GO_DURATION_PATTERN), length(max = 32))]
    #[x_kube(validation = duration_rule("30s", None, "driftCheckInterval must be at least 30s"))]
    pub drift_check_interval: Option<String>,
}

/// Where a signing secret is delivered.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct WebhookDelivery {
    /// Also write the secret below this resource's path in Vault.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vault: Option<VaultDelivery>,
    /// The Secret in the endpoint's namespace that the operator keeps in sync.
    pub secret: WebhookSecretDelivery,
    /// Workloads rolled when the secret changes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 50))]
    pub rollout_targets: Vec<RolloutTarget>,
}

/// The synced Secret and its key names.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.key) || !has(self.allKey) || self.key != self.allKey").message("key and allKey must differ"))]
pub struct WebhookSecretDelivery {
    /// Name of the Secret.
    #[schemars(
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"),
        length(max = 253)
    )]
    pub name: String,
    /// Key of the current signing secret. Default `STRIPE_WEBHOOK_SECRET`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[-._a-zA-Z0-9]+$"), length(max = 253))]
    pub key: Option<String>,
    /// Key of every valid signing secret, comma-separated, newest first. Default
    /// `STRIPE_WEBHOOK_SECRETS`. Receivers verify against each during a rotation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[-._a-zA-Z0-9]+$"), length(max = 253))]
    pub all_key: Option<String>,
}

impl WebhookSecretDelivery {
    /// The effective key name of the current secret.
    pub fn key_name(&self) -> &str {
        self.key.as_deref().unwrap_or(DEFAULT_WEBHOOK_SECRET_KEY)
    }

    /// The effective key name of the list of valid secrets.
    pub fn all_key_name(&self) -> &str {
        self.all_key
            .as_deref()
            .unwrap_or(DEFAULT_WEBHOOK_SECRETS_KEY)
    }
}

/// Rotation of a signing secret: exactly one of `every` and `schedule`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.every) != has(self.schedule)").message("exactly one of every or schedule must be set"))]
#[x_kube(validation = Rule::new("!has(self.timeZone) || has(self.schedule)").message("timeZone applies only to schedule"))]
pub struct WebhookRotation {
    /// Rotate a fixed period after the last rotation, as a Go duration. At least `1h`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = GO_DURATION_PATTERN), length(max = 32))]
    #[x_kube(validation = duration_rule("1h", None, "every must be at least 1h"))]
    pub every: Option<String>,
    /// Rotate on a five-field cron schedule in `timeZone`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 100))]
    #[x_kube(validation = cron_rule())]
    pub schedule: Option<String>,
    /// IANA time zone of `schedule`. Default UTC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[A-Za-z_]+(/[A-Za-z0-9_+-]+)*$"), length(max = 64))]
    pub time_zone: Option<String>,
    /// How long both endpoints deliver after the targets have rolled, as a Go duration.
    /// Default `1h`, at most `24h`. Receivers deduplicate on `event.id` meanwhile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = GO_DURATION_PATTERN), length(max = 32))]
    #[x_kube(validation = duration_rule("1m", Some("24h"), "overlap must be between 1m and 24h"))]
    pub overlap: Option<String>,
}

rotation_schedule_accessor!(WebhookRotation);

/// The default overlap of a webhook secret rotation.
pub const DEFAULT_WEBHOOK_OVERLAP: &str = "1h";

/// Observed state of a StripeWebhookEndpoint.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct StripeWebhookEndpointStatus {
    /// The rotation bookkeeping shared by every credential kind (`currentKey.id` is the
    /// `we_...` endpoint id).
    #[serde(flatten)]
    pub credential: super::CredentialStatus,
    /// When Stripe's side was last compared with the spec.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_drift_check_at: Option<Time>,
    /// What kind of rotation the last trigger was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_rotation_trigger: Option<RotationTrigger>,
    /// The API version the current endpoint was created with (Stripe cannot change it: a new
    /// `spec.apiVersion` rotates to a new endpoint).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_api_version: Option<String>,
    /// Whether the current endpoint receives Connect events (Stripe cannot change it either).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_connect: Option<bool>,
    /// The generation whose url, events, description and metadata were last applied at Stripe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied_generation: Option<i64>,
    /// The exact settings the endpoint of the rotation in progress is created with, so that a
    /// replay of the create after a restart sends the same parameters (and gets the same
    /// endpoint and secret back). Cleared once the new secret is stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_endpoint: Option<WebhookEndpointSettings>,
}

super::common::credential_status_deref!(StripeWebhookEndpointStatus);

/// The settings an endpoint is created with (no secret: Stripe generates it).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct WebhookEndpointSettings {
    /// Receiver URL.
    pub url: String,
    /// Event types delivered.
    pub enabled_events: Vec<String>,
    /// API version of event payloads (absent: the account default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_version: Option<String>,
    /// Description.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Connect events.
    #[serde(default)]
    pub connect: bool,
    /// Metadata, the operator's `stripekeys_*` keys included.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
}
