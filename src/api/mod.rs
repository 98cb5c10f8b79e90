//! The `stripekeys.io/v1alpha1` API: four kinds and the types they share.
//!
//! - [`StripeAccount`] (cluster-scoped): how the operator reaches one Stripe account.
//! - [`StripeKeyPolicy`] (namespaced): a least-privilege restricted key, its delivery and rotation.
//! - [`StripeWebhookEndpoint`] (namespaced): a webhook endpoint and its signing secret.
//! - [`StripeGuardrail`] (cluster-scoped): what the namespaces it selects may ask for.
//!
//! Doc comments on these types become the descriptions `kubectl explain` shows.

// Several `printcolumn(..., type_ = "date", ...)` entries look like duplicated attributes.
#![allow(clippy::duplicated_attributes)]

mod account;
mod common;
pub mod conditions;
mod guardrail;
pub mod permissions;
mod policy;
mod webhook;

pub use account::*;
pub use common::*;
pub use guardrail::*;
pub use policy::*;
pub use webhook::*;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

/// The API group of every kind.
pub const GROUP: &str = "stripekeys.io";
/// The served and stored version.
pub const VERSION: &str = "v1alpha1";

/// A new value of this annotation asks for a rotation.
pub const ROTATE_ANNOTATION: &str = "stripekeys.io/rotate";
/// `incident` here, together with a new [`ROTATE_ANNOTATION`] value, revokes the old key at once.
pub const ROTATE_REASON_ANNOTATION: &str = "stripekeys.io/rotate-reason";
/// The value of [`ROTATE_REASON_ANNOTATION`] that marks a compromise.
pub const ROTATE_REASON_INCIDENT: &str = "incident";
/// The pod-template annotation whose change rolls a workload onto a new secret.
pub const FINGERPRINT_ANNOTATION: &str = "stripekeys.io/key-fingerprint";
/// The label on every object the operator creates.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// The value of [`MANAGED_BY_LABEL`].
pub const MANAGED_BY: &str = "stripe-key-operator";
/// The server-side-apply field manager of every write.
pub const FIELD_MANAGER: &str = "stripe-key-operator";

/// Every CustomResourceDefinition of the API, in a stable order.
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![
        StripeAccount::crd(),
        StripeGuardrail::crd(),
        StripeKeyPolicy::crd(),
        StripeWebhookEndpoint::crd(),
    ]
}

/// Every CRD as multi-document YAML: what `stripe-key-operator crdgen` prints and `crds/` holds.
pub fn crds_yaml() -> Result<String, serde_yaml::Error> {
    let mut out = String::new();
    for crd in crds() {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&crd)?);
    }
    Ok(out)
}
