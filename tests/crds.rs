//! The committed CRD YAML must be exactly what the code generates.

use std::path::Path;

fn committed(path: &str) -> Option<String> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(p).ok()
}

#[test]
fn crds_directory_matches_crdgen_output() {
    let generated = stripe_key_operator::api::crds_yaml().expect("CRDs serialize");
    let on_disk = committed("crds/stripekeys.io.yaml").expect("crds/stripekeys.io.yaml exists");
    assert!(
        generated == on_disk,
        "crds/stripekeys.io.yaml is stale: run `cargo run -- crdgen > crds/stripekeys.io.yaml`"
    );
}

#[test]
fn chart_crds_match_crdgen_output_when_the_chart_exists() {
    let chart = Path::new(env!("CARGO_MANIFEST_DIR")).join("charts/stripe-key-operator/Chart.yaml");
    if !chart.exists() {
        return;
    }
    let generated = stripe_key_operator::api::crds_yaml().expect("CRDs serialize");
    let on_disk = committed("charts/stripe-key-operator/crds/stripekeys.io.yaml")
        .expect("the chart keeps its CRDs in crds/stripekeys.io.yaml");
    assert!(
        generated == on_disk,
        "the chart's crds/ is stale: copy crds/stripekeys.io.yaml into charts/stripe-key-operator/crds/"
    );
}

#[test]
fn every_kind_is_in_the_stripekeys_group_with_status_and_printer_columns() {
    for crd in stripe_key_operator::api::crds() {
        assert_eq!(crd.spec.group, "stripekeys.io");
        let v = &crd.spec.versions[0];
        assert_eq!(v.name, "v1alpha1");
        assert!(v.served && v.storage);
        assert!(
            v.subresources
                .as_ref()
                .and_then(|s| s.status.as_ref())
                .is_some(),
            "{} has a status subresource",
            crd.spec.names.kind
        );
        let columns: Vec<_> = v
            .additional_printer_columns
            .iter()
            .flatten()
            .map(|c| c.name.as_str())
            .collect();
        assert!(
            columns.contains(&"Age"),
            "{} shows Age",
            crd.spec.names.kind
        );
        if matches!(
            crd.spec.names.kind.as_str(),
            "StripeKeyPolicy" | "StripeWebhookEndpoint"
        ) {
            assert_eq!(
                columns,
                ["Ready", "Key", "Last Rotated", "Next Rotation", "Age"]
            );
        }
    }
}

#[test]
fn every_spec_field_has_a_description_for_kubectl_explain() {
    fn walk(path: &str, schema: &serde_json::Value, missing: &mut Vec<String>) {
        if let Some(props) = schema.get("properties").and_then(|p| p.as_object()) {
            for (name, sub) in props {
                let p = format!("{path}.{name}");
                if sub.get("description").is_none() && !path.is_empty() {
                    missing.push(p.clone());
                }
                walk(&p, sub, missing);
            }
        }
        if let Some(items) = schema.get("items") {
            walk(&format!("{path}[]"), items, missing);
        }
    }
    let mut missing = Vec::new();
    for crd in stripe_key_operator::api::crds() {
        let schema = serde_json::to_value(&crd.spec.versions[0].schema).unwrap();
        let root = &schema["openAPIV3Schema"];
        for part in ["spec", "status"] {
            walk(
                &format!("{}.{part}", crd.spec.names.kind),
                &root["properties"][part],
                &mut missing,
            );
        }
    }
    // Fields of Kubernetes' own types (LabelSelector, Condition) carry upstream descriptions.
    assert!(
        missing.is_empty(),
        "fields without a description: {missing:#?}"
    );
}
