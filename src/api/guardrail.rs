//! `StripeGuardrail`: what the namespaces it selects may ask for.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// A StripeGuardrail limits what StripeKeyPolicies and StripeWebhookEndpoints in the namespaces
/// it selects may declare. Every guardrail that selects a namespace applies (the strictest wins).
/// The admission webhook refuses violating objects at apply time and the controllers refuse them
/// again at reconcile time (`Ready=False`, reason `GuardrailViolation`).
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[kube(
    group = "stripekeys.io",
    version = "v1alpha1",
    kind = "StripeGuardrail",
    plural = "stripeguardrails",
    shortname = "sgr",
    category = "stripe",
    status = "StripeGuardrailStatus",
    doc = "Limits on the Stripe credentials that namespaces may declare.",
    printcolumn(name = "Live", type_ = "boolean", json_path = ".spec.allowLiveMode"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct StripeGuardrailSpec {
    /// Namespaces this guardrail applies to. `{}` selects every namespace.
    pub namespace_selector: LabelSelector,
    /// If set, every permission must match one of these glob patterns (`charge_*`, `*_read`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(max = 200),
        inner(regex(pattern = r"^[a-z0-9_*?]+$"), length(max = 100))
    )]
    pub allowed_permissions: Option<Vec<String>>,
    /// No permission may match any of these glob patterns (`payout_*`, `api_key_*`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 200),
        inner(regex(pattern = r"^[a-z0-9_*?]+$"), length(max = 100))
    )]
    pub denied_permissions: Vec<String>,
    /// Whether selected namespaces may use live-mode accounts. Absent: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_live_mode: Option<bool>,
    /// The longest rotation period allowed (Go duration). A `schedule` must fire at least this
    /// often; a policy without rotation is refused when this is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$"))]
    pub max_rotation_period: Option<String>,
    /// The longest overlap allowed (Go duration).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$"))]
    pub max_overlap: Option<String>,
    /// If set, webhook URLs must have a host matching one of these glob patterns
    /// (`hooks.example.com`, `*.payments.example.com`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(max = 100),
        inner(regex(pattern = r"^[a-z0-9*?.-]+$"), length(max = 253))
    )]
    pub allowed_webhook_hosts: Option<Vec<String>>,
}

/// Observed state of a StripeGuardrail.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct StripeGuardrailStatus {
    /// The generation the operator last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}
