//! Delivery into the cluster: the synced Secret and the rollout of workloads.
//!
//! Builders and judgements here are pure (no client calls) and carry the unit tests; the
//! controllers apply what they build.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::ObjectMeta;
use serde_json::{Value, json};

use crate::api::{MANAGED_BY, MANAGED_BY_LABEL, WorkloadKind};
use crate::secret::SecretString;

/// Label naming the kind of the resource that owns a synced Secret.
pub const OWNER_KIND_LABEL: &str = "stripekeys.io/owner-kind";
/// Label naming the resource that owns a synced Secret.
pub const OWNER_NAME_LABEL: &str = "stripekeys.io/owner-name";
/// Annotation with the id of the current key or endpoint on a synced Secret.
pub const KEY_ID_ANNOTATION: &str = "stripekeys.io/key-id";

/// One entry of a synced Secret.
pub struct SecretEntry<'a> {
    pub key: &'a str,
    pub value: &'a SecretString,
}

/// Builds the Secret the operator keeps in sync: owned by `owner` (a controller reference, so it
/// goes with its owner), labelled as the operator's, annotated with the current key id and
/// fingerprint (never the secret), holding exactly `entries`.
pub fn build_secret(
    name: &str,
    namespace: &str,
    owner: OwnerReference,
    key_id: &str,
    fingerprint: &str,
    entries: &[SecretEntry<'_>],
) -> Secret {
    let labels = BTreeMap::from([
        (MANAGED_BY_LABEL.to_string(), MANAGED_BY.to_string()),
        (OWNER_KIND_LABEL.to_string(), owner.kind.clone()),
        (OWNER_NAME_LABEL.to_string(), owner.name.clone()),
    ]);
    let annotations = BTreeMap::from([
        (KEY_ID_ANNOTATION.to_string(), key_id.to_string()),
        (
            crate::api::FINGERPRINT_ANNOTATION.to_string(),
            fingerprint.to_string(),
        ),
    ]);
    let data = entries
        .iter()
        .map(|e| {
            (
                e.key.to_string(),
                ByteString(e.value.expose().as_bytes().to_vec()),
            )
        })
        .collect();
    Secret {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(namespace.to_string()),
            labels: Some(labels),
            annotations: Some(annotations),
            owner_references: Some(vec![owner]),
            ..Default::default()
        },
        type_: Some("Opaque".to_string()),
        data: Some(data),
        ..Default::default()
    }
}

/// Whether an existing Secret may be taken over: absent, or already owned by `owner_uid`.
/// A Secret someone else created is never overwritten.
pub fn may_write_secret(existing: Option<&Secret>, owner_uid: &str) -> bool {
    match existing {
        None => true,
        Some(s) => s
            .metadata
            .owner_references
            .iter()
            .flatten()
            .any(|r| r.uid == owner_uid && r.controller == Some(true)),
    }
}

/// The pod-template annotation a source sets on its rollout targets.
///
/// Each source gets its own key, `stripekeys.io/key-fingerprint.<skp|swe>.<name>`, so that a
/// workload that consumes several keys (a StripeKeyPolicy and a StripeWebhookEndpoint, or two
/// policies) is rolled by each without the sources overwriting one another. The name part is
/// kept within Kubernetes' 63 characters (long names are shortened and suffixed with a hash).
pub fn rollout_annotation_key(source_kind: &str, source_name: &str) -> String {
    let short = match source_kind {
        "StripeKeyPolicy" => "skp",
        "StripeWebhookEndpoint" => "swe",
        other => other,
    };
    let mut name_part = format!("key-fingerprint.{short}.{source_name}");
    if name_part.len() > 63 {
        let hash = crate::secret::fingerprint(source_name.as_bytes());
        let keep = 63 - hash.len() - 1;
        name_part.truncate(keep);
        let trimmed = name_part.trim_end_matches(['.', '-', '_']).to_string();
        name_part = format!("{trimmed}-{}", &hash[..hash.len().min(12)]);
    }
    format!("stripekeys.io/{name_part}")
}

/// A JSON merge patch that sets the rollout annotation on a workload's pod template, which makes
/// the workload controller roll its pods. A merge patch touches only this one key, so other
/// sources' annotations and other owners' fields stay as they are.
pub fn rollout_patch(annotation_key: &str, fingerprint: &str) -> Value {
    json!({"spec": {"template": {"metadata": {"annotations": {annotation_key: fingerprint}}}}})
}

/// The rollout state of a workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rollout {
    /// The pod template carries `fingerprint` and every replica runs it and is available.
    Complete,
    /// Still rolling; the reason says what is missing.
    InProgress(String),
    /// The pod template does not carry `fingerprint` yet (the patch is not applied).
    NotStarted,
}

fn int(v: &Value, path: &[&str]) -> Option<i64> {
    let mut cur = v;
    for p in path {
        cur = cur.get(p)?;
    }
    cur.as_i64()
}

/// Judges a workload (as JSON: Deployment, StatefulSet or DaemonSet) against the fingerprint it
/// should run, as `kubectl rollout status` does: the controller has observed the latest
/// generation, and every desired replica is updated and available.
pub fn rollout_state(
    kind: WorkloadKind,
    workload: &Value,
    annotation_key: &str,
    fingerprint: &str,
) -> Rollout {
    let current = workload
        .pointer("/spec/template/metadata/annotations")
        .and_then(|a| a.get(annotation_key))
        .and_then(Value::as_str);
    if current != Some(fingerprint) {
        return Rollout::NotStarted;
    }
    let generation = int(workload, &["metadata", "generation"]).unwrap_or(0);
    let observed = int(workload, &["status", "observedGeneration"]).unwrap_or(0);
    if observed < generation {
        return Rollout::InProgress(format!("observed generation {observed} < {generation}"));
    }
    let check = |desired: i64, updated: i64, available: i64| {
        if updated < desired {
            Rollout::InProgress(format!("{updated} of {desired} replicas updated"))
        } else if available < desired {
            Rollout::InProgress(format!("{available} of {desired} replicas available"))
        } else {
            Rollout::Complete
        }
    };
    match kind {
        WorkloadKind::Deployment => {
            let desired = int(workload, &["spec", "replicas"]).unwrap_or(1);
            let updated = int(workload, &["status", "updatedReplicas"]).unwrap_or(0);
            let available = int(workload, &["status", "availableReplicas"]).unwrap_or(0);
            let total = int(workload, &["status", "replicas"]).unwrap_or(0);
            match check(desired, updated, available) {
                Rollout::Complete if total > updated => Rollout::InProgress(format!(
                    "{} old replicas pending termination",
                    total - updated
                )),
                other => other,
            }
        }
        WorkloadKind::StatefulSet => {
            let desired = int(workload, &["spec", "replicas"]).unwrap_or(1);
            let updated = int(workload, &["status", "updatedReplicas"]).unwrap_or(0);
            let available = int(workload, &["status", "availableReplicas"])
                .or_else(|| int(workload, &["status", "readyReplicas"]))
                .unwrap_or(0);
            let current_rev = workload
                .pointer("/status/currentRevision")
                .and_then(Value::as_str);
            let update_rev = workload
                .pointer("/status/updateRevision")
                .and_then(Value::as_str);
            match check(desired, updated, available) {
                Rollout::Complete if current_rev.is_some() && current_rev != update_rev => {
                    Rollout::InProgress("revision not yet current".into())
                }
                other => other,
            }
        }
        WorkloadKind::DaemonSet => {
            let desired = int(workload, &["status", "desiredNumberScheduled"]).unwrap_or(0);
            let updated = int(workload, &["status", "updatedNumberScheduled"]).unwrap_or(0);
            let available = int(workload, &["status", "numberAvailable"]).unwrap_or(0);
            check(desired, updated, available)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner() -> OwnerReference {
        OwnerReference {
            api_version: "stripekeys.io/v1alpha1".into(),
            kind: "StripeKeyPolicy".into(),
            name: "checkout".into(),
            uid: "uid-1".into(),
            controller: Some(true),
            block_owner_deletion: Some(true),
        }
    }

    #[test]
    fn secret_holds_the_entries_and_only_ids_in_metadata() {
        let cur = SecretString::new("rk_test_current");
        let prev = SecretString::new("rk_test_previous");
        let s = build_secret(
            "checkout-stripe-key",
            "shop",
            owner(),
            "ak_123",
            &cur.fingerprint(),
            &[
                SecretEntry {
                    key: "STRIPE_API_KEY",
                    value: &cur,
                },
                SecretEntry {
                    key: "STRIPE_API_KEY_PREVIOUS",
                    value: &prev,
                },
            ],
        );
        let data = s.data.as_ref().unwrap();
        assert_eq!(data["STRIPE_API_KEY"].0, b"rk_test_current");
        assert_eq!(data["STRIPE_API_KEY_PREVIOUS"].0, b"rk_test_previous");
        let meta = serde_json::to_string(&s.metadata).unwrap();
        assert!(
            !meta.contains("rk_test"),
            "metadata carries no secret: {meta}"
        );
        assert!(meta.contains("ak_123"));
        assert_eq!(
            s.metadata.owner_references.as_ref().unwrap()[0].controller,
            Some(true)
        );
    }

    #[test]
    fn foreign_secrets_are_never_taken_over() {
        let mine = build_secret("s", "ns", owner(), "id", "fp", &[]);
        assert!(may_write_secret(None, "uid-1"));
        assert!(may_write_secret(Some(&mine), "uid-1"));
        assert!(!may_write_secret(Some(&mine), "uid-2"));
        assert!(!may_write_secret(Some(&Secret::default()), "uid-1"));
    }

    #[test]
    fn annotation_keys_are_per_source_and_valid() {
        let a = rollout_annotation_key("StripeKeyPolicy", "checkout");
        let b = rollout_annotation_key("StripeWebhookEndpoint", "checkout");
        assert_eq!(a, "stripekeys.io/key-fingerprint.skp.checkout");
        assert_ne!(a, b);
        let long = rollout_annotation_key("StripeKeyPolicy", &"x".repeat(200));
        let name_part = long.strip_prefix("stripekeys.io/").unwrap();
        assert!(name_part.len() <= 63, "{name_part}");
        assert_ne!(
            long,
            rollout_annotation_key("StripeKeyPolicy", &"x".repeat(199))
        );
    }

    fn deployment(
        fp: &str,
        generation: i64,
        observed: i64,
        updated: i64,
        available: i64,
        total: i64,
    ) -> Value {
        json!({
            "metadata": {"generation": generation},
            "spec": {"replicas": 2, "template": {"metadata": {"annotations": {"k": fp}}}},
            "status": {"observedGeneration": observed, "updatedReplicas": updated,
                       "availableReplicas": available, "replicas": total}
        })
    }

    #[test]
    fn deployment_rollout_is_complete_only_when_every_replica_is_new_and_available() {
        let k = WorkloadKind::Deployment;
        assert_eq!(
            rollout_state(k, &deployment("old", 2, 2, 2, 2, 2), "k", "new"),
            Rollout::NotStarted
        );
        assert!(matches!(
            rollout_state(k, &deployment("new", 3, 2, 2, 2, 2), "k", "new"),
            Rollout::InProgress(_)
        ));
        assert!(matches!(
            rollout_state(k, &deployment("new", 3, 3, 1, 2, 3), "k", "new"),
            Rollout::InProgress(_)
        ));
        assert!(matches!(
            rollout_state(k, &deployment("new", 3, 3, 2, 1, 2), "k", "new"),
            Rollout::InProgress(_)
        ));
        assert!(matches!(
            rollout_state(k, &deployment("new", 3, 3, 2, 2, 3), "k", "new"),
            Rollout::InProgress(_)
        ));
        assert_eq!(
            rollout_state(k, &deployment("new", 3, 3, 2, 2, 2), "k", "new"),
            Rollout::Complete
        );
    }

    #[test]
    fn statefulset_and_daemonset_rollouts() {
        let sts = json!({
            "metadata": {"generation": 1},
            "spec": {"replicas": 1, "template": {"metadata": {"annotations": {"k": "f"}}}},
            "status": {"observedGeneration": 1, "updatedReplicas": 1, "readyReplicas": 1,
                       "currentRevision": "a", "updateRevision": "b"}
        });
        assert!(matches!(
            rollout_state(WorkloadKind::StatefulSet, &sts, "k", "f"),
            Rollout::InProgress(_)
        ));
        let mut done = sts.clone();
        done["status"]["currentRevision"] = json!("b");
        assert_eq!(
            rollout_state(WorkloadKind::StatefulSet, &done, "k", "f"),
            Rollout::Complete
        );
        let ds = json!({
            "metadata": {"generation": 4},
            "spec": {"template": {"metadata": {"annotations": {"k": "f"}}}},
            "status": {"observedGeneration": 4, "desiredNumberScheduled": 3,
                       "updatedNumberScheduled": 3, "numberAvailable": 2}
        });
        assert!(matches!(
            rollout_state(WorkloadKind::DaemonSet, &ds, "k", "f"),
            Rollout::InProgress(_)
        ));
    }

    #[test]
    fn rollout_patch_sets_only_the_annotation() {
        assert_eq!(
            rollout_patch("stripekeys.io/key-fingerprint.skp.a", "abc"),
            json!({"spec": {"template": {"metadata": {"annotations": {"stripekeys.io/key-fingerprint.skp.a": "abc"}}}}})
        );
    }
}
