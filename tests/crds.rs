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

/// Every `description` string in a JSON value, with its path.
fn descriptions(path: &str, v: &serde_json::Value, out: &mut Vec<(String, String)>) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, sub) in map {
                match sub {
                    serde_json::Value::String(s) if k == "description" => {
                        out.push((path.to_string(), s.clone()))
                    }
                    _ => descriptions(&format!("{path}.{k}"), sub, out),
                }
            }
        }
        serde_json::Value::Array(items) => {
            for (i, sub) in items.iter().enumerate() {
                descriptions(&format!("{path}[{i}]"), sub, out);
            }
        }
        _ => {}
    }
}

/// A line break that splits a sentence: one newline (not a paragraph break) between two words.
fn mid_sentence_break(text: &str) -> Option<String> {
    let re = regex::Regex::new(r"[^\s]\n *[A-Za-z0-9`(]").unwrap();
    re.find(text).map(|m| m.as_str().to_string())
}

#[test]
fn the_break_detector_finds_a_wrapped_sentence_and_spares_paragraphs() {
    assert!(mid_sentence_break("At\n least").is_some());
    assert_eq!(
        mid_sentence_break("(`720h` = 30 days). At\nleast `1h`.").as_deref(),
        Some("t\nl")
    );
    assert!(mid_sentence_break("One paragraph.\n\nAnother one.").is_none());
    assert!(mid_sentence_break("A list:\n- one\n- two").is_none());
}

#[test]
fn descriptions_read_as_paragraphs_in_kubectl_explain() {
    let mut wrapped = Vec::new();
    for crd in stripe_key_operator::api::crds() {
        let v = serde_json::to_value(&crd).unwrap();
        let mut all = Vec::new();
        descriptions(&crd.spec.names.kind, &v["spec"]["versions"], &mut all);
        assert!(
            all.len() > 10,
            "{} has descriptions to check",
            crd.spec.names.kind
        );
        for (path, text) in all {
            if let Some(at) = mid_sentence_break(&text) {
                wrapped.push(format!("{path}: {at:?} in {text:?}"));
            }
        }
    }
    assert!(
        wrapped.is_empty(),
        "descriptions broken mid-sentence:\n{}",
        wrapped.join("\n")
    );
    // The example from the issue reads as one sentence now.
    let policy = stripe_key_operator::api::crds()
        .into_iter()
        .find(|c| c.spec.names.kind == "StripeKeyPolicy")
        .unwrap();
    let v = serde_json::to_value(&policy.spec.versions[0].schema).unwrap();
    let every = v["openAPIV3Schema"]["properties"]["spec"]["properties"]["rotation"]["properties"]
        ["every"]["description"]
        .as_str()
        .unwrap();
    assert!(every.contains("= 30 days). At least `1h`."), "{every}");
}

#[test]
fn future_times_are_printed_as_times_not_as_a_date_column() {
    // kubectl renders a `date` column as an age and a future time as `<invalid>`.
    for crd in stripe_key_operator::api::crds() {
        for c in crd.spec.versions[0]
            .additional_printer_columns
            .iter()
            .flatten()
        {
            if c.json_path == ".status.nextRotationAt" {
                assert_eq!(c.type_, "string", "{}: {}", crd.spec.names.kind, c.name);
            }
        }
    }
}

#[test]
fn stripeaccounts_show_readiness_and_why() {
    let account = stripe_key_operator::api::crds()
        .into_iter()
        .find(|c| c.spec.names.kind == "StripeAccount")
        .unwrap();
    let columns: Vec<(String, String)> = account.spec.versions[0]
        .additional_printer_columns
        .iter()
        .flatten()
        .map(|c| (c.name.clone(), c.json_path.clone()))
        .collect();
    let names: Vec<&str> = columns.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "Mode",
            "Context",
            "Ready",
            "Reason",
            "Keys",
            "Unmanaged",
            "Last Checked",
            "Encryption Key",
            "Age"
        ]
    );
    // Every column reads a field the status (or spec) schema has.
    let schema = serde_json::to_value(&account.spec.versions[0].schema).unwrap();
    for (name, path) in &columns {
        let first = path
            .trim_start_matches('.')
            .split(['.', '['])
            .take(2)
            .collect::<Vec<_>>();
        if first[0] == "metadata" {
            continue;
        }
        assert!(
            !schema["openAPIV3Schema"]["properties"][first[0]]["properties"][first[1]].is_null(),
            "column {name} reads {path}, which the schema does not have"
        );
    }
}
