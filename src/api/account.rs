//! `StripeAccount`: how the operator reaches one Stripe account.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, Time};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// Test or live mode of a Stripe account.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Test mode (sandbox): keys start `rk_test_`.
    Test,
    /// Live mode: keys start `rk_live_` and move real money.
    Live,
}

impl Mode {
    /// Default client-side request rate: under Stripe's limits of 25/s (test) and 100/s (live).
    pub fn default_requests_per_second(self) -> u32 {
        match self {
            Mode::Test => 20,
            Mode::Live => 80,
        }
    }
}

/// The default preview API version of the API-keys API.
pub const DEFAULT_STRIPE_API_VERSION: &str = "2026-10-14.preview";
/// The default base URL of the Stripe API.
pub const DEFAULT_API_BASE: &str = "https://api.stripe.com";

/// A StripeAccount tells the operator how to reach one Stripe account through an installed
/// Stripe App that holds the `api_key_write` permission, and which namespaces may use it.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[kube(
    group = "stripekeys.io",
    version = "v1alpha1",
    kind = "StripeAccount",
    plural = "stripeaccounts",
    shortname = "sacct",
    category = "stripe",
    status = "StripeAccountStatus",
    doc = "A Stripe account the operator mints keys in, through a Stripe App's secret key.",
    printcolumn(name = "Mode", type_ = "string", json_path = ".spec.mode"),
    printcolumn(name = "Context", type_ = "string", json_path = ".spec.context"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        description = "Why the account is (not) Ready: Ready, CredentialsMissing, Untrusted, Unauthorized, StripeUnreachable, StripeUnavailable, InUse.",
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason"
    ),
    printcolumn(
        name = "Keys",
        type_ = "integer",
        description = "Policies and webhook endpoints holding a credential of this account.",
        json_path = ".status.keysUnderManagement"
    ),
    printcolumn(
        name = "Unmanaged",
        type_ = "integer",
        description = "Keys created in this Stripe account by a person (not by the operator), from the activity log.",
        json_path = ".status.unmanagedKeyCount"
    ),
    printcolumn(
        name = "Last Checked",
        type_ = "date",
        description = "When the credentials and the Stripe context were last checked.",
        json_path = ".status.lastCheckedTime",
        priority = "1"
    ),
    printcolumn(
        name = "Encryption Key",
        type_ = "string",
        description = "Fingerprint of the public key live-mode secrets are encrypted to.",
        json_path = ".status.encryptionKeyFingerprint",
        priority = "1"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct StripeAccountSpec {
    /// `test` or `live`. Live mode returns secrets only encrypted (JWE) and only once.
    pub mode: Mode,
    /// The connected account, sent as the `Stripe-Context` header (`acct_...`). Immutable:
    /// keys minted under one account are retired through that account, so an account object
    /// never starts pointing at another one. To move, create a new StripeAccount.
    #[schemars(regex(pattern = r"^acct_[A-Za-z0-9]{1,64}$"), length(max = 69))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("context is immutable: keys minted under one Stripe account are retired through it; create a new StripeAccount for another context"))]
    pub context: String,
    /// Base URL of the Stripe API. https, or http to a loopback address (the local simulator).
    /// The host must be one the operator allows (its `--allowed-api-hosts` setting, by default
    /// `api.stripe.com` only; loopback only where the operator allows it): the app key is sent
    /// nowhere else, and an account naming another host is refused.
    #[serde(default = "default_api_base")]
    #[schemars(length(max = 2048))]
    #[x_kube(validation = Rule::new("self.startsWith('https://') || self.matches('^http://(127\\\\.0\\\\.0\\\\.1|localhost|\\\\[::1\\\\])(:[0-9]+)?(/.*)?$')").message("apiBase must be an https URL (http only to a loopback address)"))]
    pub api_base: String,
    /// The `Stripe-Version` sent to the API-keys API (a preview version).
    #[serde(default = "default_api_version")]
    #[schemars(regex(pattern = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}(\.[a-z]+)?$"))]
    pub api_version: String,
    /// Where the Stripe App's secret key is kept: a Vault path under `<prefix>/_accounts/`, or a
    /// Secret in the operator's namespace labelled `stripekeys.io/credential: stripe-app`. Never
    /// in a tenant namespace or a resource's own bundle.
    pub credentials: AccountCredentials,
    /// Where the RSA private key that decrypts live-mode secrets is kept. When absent the operator
    /// generates a 3072-bit key pair and keeps the private key in its secret store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption_key: Option<EncryptionKeySource>,
    /// Namespaces whose StripeKeyPolicies and StripeWebhookEndpoints may use this account.
    /// Required: `{}` selects every namespace.
    pub namespace_selector: LabelSelector,
    /// Client-side request rate limit. Default 20 in test mode and 80 in live mode (Stripe allows
    /// 25/s and 100/s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100))]
    pub requests_per_second: Option<u32>,
}

fn default_api_base() -> String {
    DEFAULT_API_BASE.to_string()
}

fn default_api_version() -> String {
    DEFAULT_STRIPE_API_VERSION.to_string()
}

impl StripeAccountSpec {
    /// The effective request rate.
    pub fn effective_requests_per_second(&self) -> u32 {
        self.requests_per_second
            .unwrap_or_else(|| self.mode.default_requests_per_second())
    }
}

/// Where the Stripe App's secret key is kept. Exactly one of `vault` and `secretRef`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.vault) != has(self.secretRef)").message("exactly one of vault or secretRef must be set"))]
pub struct AccountCredentials {
    /// A key in the operator's Vault KV v2 mount.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vault: Option<VaultKeyRef>,
    /// A key of a Secret in the operator's own namespace (no namespace field: tenant namespaces
    /// can never hold the app key). The Secret must carry the label
    /// `stripekeys.io/credential: stripe-app`; the operator reads no other Secret as an app key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<SecretKeyRef>,
}

/// A key of a KV v2 secret, relative to the operator's mount.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct VaultKeyRef {
    /// Path of the KV v2 secret relative to the mount, under the operator's account subtree
    /// `<prefix>/_accounts/`, such as `stripe-key-operator/_accounts/payments/app-key`. A
    /// resource's bundle path (`<prefix>/<namespace>/<kind>/<name>`) is refused.
    #[schemars(
        regex(pattern = r"^[A-Za-z0-9_-]+(/[A-Za-z0-9_.-]+)*$"),
        length(max = 512)
    )]
    #[x_kube(validation = Rule::new("!self.contains('..')").message("path must not contain '..'"))]
    #[x_kube(validation = Rule::new("self.contains('/_accounts/')").message("path must lie under <prefix>/_accounts/, where account keys live (never a resource's bundle path)"))]
    pub path: String,
    /// Key inside the KV secret. Default `secret_key`.
    #[serde(default = "default_vault_key")]
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

fn default_vault_key() -> String {
    "secret_key".to_string()
}

/// A key of a Secret in the operator's own namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Name of the Secret.
    #[schemars(
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"),
        length(max = 253)
    )]
    pub name: String,
    /// Key inside the Secret's data.
    #[schemars(regex(pattern = r"^[-._a-zA-Z0-9]+$"), length(max = 253))]
    pub key: String,
}

/// Where the live-mode decryption key is kept.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct EncryptionKeySource {
    /// A KV v2 key holding a PKCS#8 PEM RSA private key (3072 bits or more).
    pub vault: VaultKeyRef,
}

/// Observed state of a StripeAccount.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct StripeAccountStatus {
    /// The generation the operator last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`: the account passes the operator's trust check, its app key can be read, and
    /// Stripe answered an authenticated call for its context (checked every few minutes, and at
    /// once after a spec change). While the account is being deleted, `Ready=False` with reason
    /// `InUse` names the resources whose credentials still have to be retired.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// When the credentials and the Stripe context were last checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_checked_time: Option<Time>,
    /// StripeKeyPolicies and StripeWebhookEndpoints (in the namespaces the operator watches)
    /// that name this account and hold a credential minted through it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys_under_management: Option<i64>,
    /// Fingerprint of the public key that live-mode secrets are encrypted to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption_key_fingerprint: Option<String>,
    /// Where the operator stands in the account's Stripe activity log (read every
    /// `--activity-log-interval`): the newest entry it handled. Kept here so that a restart
    /// neither handles an entry twice nor skips one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activity_log: Option<ActivityLogStatus>,
    /// Keys a person created in this Stripe account (the activity log's `api_key_created` by a
    /// user): "shadow" keys the operator does not manage, newest first, at most 50. A key
    /// leaves the list when the activity log shows it deleted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unmanaged_keys: Vec<UnmanagedKey>,
    /// How many unmanaged keys are known (the list above shows the newest 50).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unmanaged_key_count: Option<i64>,
}

/// The activity-log cursor of an account.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ActivityLogStatus {
    /// When the operator started reading this account's activity log. Entries older than the
    /// first read are not replayed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Time>,
    /// The id of the newest entry handled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 255))]
    pub last_entry_id: Option<String>,
    /// When the newest entry handled was recorded at Stripe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_entry_time: Option<Time>,
    /// Ids of the API keys the log names as actor of the operator's own key changes (learned
    /// from the creates of keys the operator marked as its own, and from its own repairs).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub operator_key_ids: Vec<String>,
    /// Keys whose permissions the operator re-applied after tampering: the update entry that
    /// repair makes is the operator's own.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pending_repairs: Vec<String>,
}

/// A key that a person created in the Stripe account, outside the operator.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct UnmanagedKey {
    /// Stripe's key id.
    pub id: String,
    /// Its name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Who created it (`user <email>`, or `api_key <id>`).
    pub created_by: String,
    /// When it was created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<Time>,
}
