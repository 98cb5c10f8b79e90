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

/// Every CustomResourceDefinition of the API, in a stable order, with descriptions that read
/// as paragraphs (see [`unwrap_descriptions`]).
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![
        StripeAccount::crd(),
        StripeGuardrail::crd(),
        StripeKeyPolicy::crd(),
        StripeWebhookEndpoint::crd(),
    ]
    .into_iter()
    .map(unwrap_crd_descriptions)
    .collect()
}

/// Joins the line wraps of doc comments in every schema description of `crd`.
fn unwrap_crd_descriptions(crd: CustomResourceDefinition) -> CustomResourceDefinition {
    let mut value = match serde_json::to_value(&crd) {
        Ok(v) => v,
        Err(_) => return crd,
    };
    if let Some(versions) = value
        .pointer_mut("/spec/versions")
        .and_then(serde_json::Value::as_array_mut)
    {
        for v in versions {
            if let Some(schema) = v.pointer_mut("/schema/openAPIV3Schema") {
                unwrap_descriptions(schema);
            }
            if let Some(columns) = v
                .get_mut("additionalPrinterColumns")
                .and_then(serde_json::Value::as_array_mut)
            {
                for c in columns {
                    unwrap_descriptions(c);
                }
            }
        }
    }
    serde_json::from_value(value).unwrap_or(crd)
}

/// Rewrites every `description` string below `schema` with [`unwrap_paragraphs`]. Schemars
/// keeps a doc comment's line breaks, so `kubectl explain` would break sentences mid-line.
pub fn unwrap_descriptions(schema: &mut serde_json::Value) {
    match schema {
        serde_json::Value::Object(map) => {
            for (key, value) in map.iter_mut() {
                match value {
                    serde_json::Value::String(s) if key == "description" => {
                        *s = unwrap_paragraphs(s);
                    }
                    other => unwrap_descriptions(other),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(unwrap_descriptions),
        _ => {}
    }
}

/// Joins the lines of each paragraph with a space and keeps blank-line paragraph breaks. Lines
/// that start a list item (`- `, `* `, `1. `) or are indented (code) keep their line break.
pub fn unwrap_paragraphs(text: &str) -> String {
    fn keeps_break(line: &str) -> bool {
        let t = line.trim_start();
        let numbered = t
            .split_once(". ")
            .is_some_and(|(n, _)| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()));
        line.starts_with("    ")
            || line.starts_with('\t')
            || t.starts_with("- ")
            || t.starts_with("* ")
            || t.starts_with("```")
            || numbered
    }
    let lines: Vec<&str> = text.split('\n').collect();
    let mut out = String::with_capacity(text.len());
    let mut in_fence = false;
    for (i, line) in lines.iter().enumerate() {
        let fence = line.trim_start().starts_with("```");
        let join = i > 0 && {
            let prev = lines[i - 1];
            !in_fence
                && !fence
                && !prev.trim().is_empty()
                && !prev.trim_start().starts_with("```")
                && !line.trim().is_empty()
                && !keeps_break(line)
        };
        if join {
            out.truncate(out.trim_end().len());
            out.push(' ');
            out.push_str(line.trim_start());
        } else {
            if i > 0 {
                out.push('\n');
            }
            out.push_str(line);
        }
        if fence {
            in_fence = !in_fence;
        }
    }
    out
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

#[cfg(test)]
mod tests {
    use super::unwrap_paragraphs;

    #[test]
    fn wrapped_lines_join_and_paragraphs_stay() {
        assert_eq!(
            unwrap_paragraphs(
                "Rotate after a period (`720h`). At\nleast `1h`.\n\nSecond paragraph\n continues."
            ),
            "Rotate after a period (`720h`). At least `1h`.\n\nSecond paragraph continues."
        );
    }

    #[test]
    fn list_items_and_code_blocks_keep_their_lines() {
        let text = "Either:\n- one thing\n  that wraps\n- another\n\n```\na\nb\n```\nafter";
        assert_eq!(
            unwrap_paragraphs(text),
            "Either:\n- one thing that wraps\n- another\n\n```\na\nb\n```\nafter"
        );
    }
}
