//! At start: do the installed CRDs carry the schema this binary writes?
//!
//! `helm upgrade` does not update CRDs, so after an upgrade the API server may still serve the
//! old schema and silently prune the fields the new binary writes (in status too: a pruned
//! rotation phase or idempotency key would make the operator forget where a rotation stood).
//! The check compares the structure (field paths and types) of each served CRD version with
//! what `crdgen` generates and, when the cluster lacks fields, stops with what to run.
//! Descriptions, printer columns and validation rules may differ without harm and are ignored;
//! fields the cluster has beyond ours (a newer CRD, an older binary) are only logged.

use std::collections::BTreeMap;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Api;
use serde_json::Value;

/// What to run when the installed CRDs are stale.
pub const UPGRADE_HINT: &str = "apply the CRDs of this release: `kubectl apply --server-side -f crds/` (with Helm, which installs CRDs only on the first install: `kubectl apply --server-side --force-conflicts -f <chart>/crds/` before `helm upgrade`)";

/// The installed CRDs do not match this binary.
#[derive(Debug, thiserror::Error)]
pub enum CrdSchemaError {
    /// The served schema lacks fields the operator writes or reads.
    #[error(
        "the installed CustomResourceDefinition {crd} is older than this operator: it lacks {} (the API server would drop them silently); {UPGRADE_HINT}",
        missing.join(", ")
    )]
    Outdated {
        /// `stripekeypolicies.stripekeys.io`.
        crd: String,
        /// Field paths with their type, e.g. `status.rotation (object)`.
        missing: Vec<String>,
    },
    /// The installed CRD does not serve this operator's version.
    #[error(
        "the installed CustomResourceDefinition {crd} does not serve version {version}; {UPGRADE_HINT}"
    )]
    VersionMissing { crd: String, version: String },
    /// Reading the CRD failed for another reason than permissions.
    #[error("reading CustomResourceDefinition {crd} to compare its schema: {source}")]
    Read {
        crd: String,
        #[source]
        source: kube::Error,
    },
}

/// Field paths of a structural schema, with their type: `spec.permissions[]` → `string`.
/// Paths under `x-kubernetes-preserve-unknown-fields` are recorded as open (`*`).
pub fn field_paths(schema: &Value) -> BTreeMap<String, String> {
    fn walk(path: &str, s: &Value, out: &mut BTreeMap<String, String>) {
        let type_ = if s.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true)) {
            "int-or-string"
        } else {
            s.get("type").and_then(Value::as_str).unwrap_or("")
        };
        if !path.is_empty() {
            out.insert(path.to_string(), type_.to_string());
        }
        if s.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true)) {
            out.insert(format!("{path}.*"), "*".into());
        }
        let join = |name: &str| {
            if path.is_empty() {
                name.to_string()
            } else {
                format!("{path}.{name}")
            }
        };
        if let Some(props) = s.get("properties").and_then(Value::as_object) {
            for (name, sub) in props {
                walk(&join(name), sub, out);
            }
        }
        if let Some(items) = s.get("items") {
            walk(&format!("{path}[]"), items, out);
        }
        if let Some(extra) = s.get("additionalProperties").filter(|a| a.is_object()) {
            walk(&format!("{path}{{}}"), extra, out);
        }
    }
    let mut out = BTreeMap::new();
    walk("", schema, &mut out);
    out
}

/// Fields (`path (type)`) that `ours` has and `served` lacks or types differently, ignoring
/// what `served` leaves open with `x-kubernetes-preserve-unknown-fields`.
pub fn missing_fields(ours: &Value, served: &Value) -> Vec<String> {
    let ours = field_paths(ours);
    let served = field_paths(served);
    let open: Vec<&str> = served.keys().filter_map(|k| k.strip_suffix(".*")).collect();
    ours.iter()
        .filter(|(path, _)| !path.ends_with(".*"))
        .filter(|(path, type_)| served.get(*path) != Some(type_))
        .filter(|(path, _)| {
            !open
                .iter()
                .any(|o| path.starts_with(&format!("{o}.")) || path.starts_with(&format!("{o}[")))
        })
        .map(|(path, type_)| format!("{path} ({type_})"))
        .collect()
}

fn version_schema(crd: &CustomResourceDefinition, version: &str) -> Option<Value> {
    let v = crd.spec.versions.iter().find(|v| v.name == version)?;
    let schema = v.schema.as_ref()?.open_api_v3_schema.as_ref()?;
    serde_json::to_value(schema).ok()
}

/// The schema of `version` in an installed CRD read as JSON.
fn served_schema(crd: &Value, version: &str) -> Option<Value> {
    crd.pointer("/spec/versions")?
        .as_array()?
        .iter()
        .find(|v| v.get("name").and_then(Value::as_str) == Some(version))?
        .pointer("/schema/openAPIV3Schema")
        .cloned()
}

/// Compares every installed CRD of the API with what this binary generates. A CRD that cannot
/// be read for lack of permission (or is absent: the served-kind check reports that) is
/// skipped with a warning; a stale one is an error that says what to run.
///
/// The installed CRDs are read as plain JSON, not decoded into `CustomResourceDefinition`: the
/// typed schema (`JSONSchemaProps`, a large struct per node) set the operator's peak heap at
/// start for a comparison of field paths.
pub async fn check_crd_schemas(client: &kube::Client) -> Result<(), CrdSchemaError> {
    let api: Api<kube::api::DynamicObject> = Api::all_with(
        client.clone(),
        &kube::api::ApiResource::erase::<CustomResourceDefinition>(&()),
    );
    for ours in crate::api::crds() {
        let crd = ours.metadata.name.clone().unwrap_or_default();
        let installed = match api.get_opt(&crd).await {
            Ok(Some(c)) => c,
            Ok(None) => continue,
            Err(kube::Error::Api(s)) if s.code == 401 || s.code == 403 => {
                tracing::warn!(
                    %crd,
                    "cannot read the installed CRD to compare its schema with this release (grant get on customresourcedefinitions); skipping the check"
                );
                continue;
            }
            Err(source) => return Err(CrdSchemaError::Read { crd, source }),
        };
        for v in &ours.spec.versions {
            let Some(generated) = version_schema(&ours, &v.name) else {
                continue;
            };
            let Some(served) = served_schema(&installed.data, &v.name) else {
                return Err(CrdSchemaError::VersionMissing {
                    crd,
                    version: v.name.clone(),
                });
            };
            let missing = missing_fields(&generated, &served);
            if !missing.is_empty() {
                return Err(CrdSchemaError::Outdated { crd, missing });
            }
            let extra = missing_fields(&served, &generated);
            if !extra.is_empty() {
                tracing::info!(%crd, fields = %extra.join(", "), "the installed CRD has fields this release does not know (a newer CRD?)");
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema() -> Value {
        json!({"type": "object", "properties": {
            "spec": {"type": "object", "properties": {
                "permissions": {"type": "array", "items": {"type": "string"}},
                "every": {"type": "string", "description": "one wording"},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}}}},
            "status": {"type": "object", "properties": {
                "rotation": {"type": "object", "properties": {"phase": {"type": "string"}}}}}}})
    }

    #[test]
    fn the_same_structure_matches_whatever_the_descriptions_say() {
        let mut served = schema();
        served["properties"]["spec"]["properties"]["every"]["description"] = json!("other words");
        assert!(missing_fields(&schema(), &served).is_empty());
        assert!(field_paths(&schema()).contains_key("spec.permissions[]"));
        assert!(field_paths(&schema()).contains_key("spec.labels{}"));
    }

    #[test]
    fn an_older_schema_lacks_new_fields_and_changed_types() {
        let mut served = schema();
        served["properties"]["status"]["properties"]
            .as_object_mut()
            .unwrap()
            .remove("rotation");
        served["properties"]["spec"]["properties"]["every"]["type"] = json!("integer");
        assert_eq!(
            missing_fields(&schema(), &served),
            [
                "spec.every (string)",
                "status.rotation (object)",
                "status.rotation.phase (string)"
            ]
        );
        // Seen from the other side only the changed type differs: fields the served schema has
        // beyond ours are not counted as missing.
        assert_eq!(missing_fields(&served, &schema()), ["spec.every (integer)"]);
    }

    #[test]
    fn the_served_schema_is_read_from_the_installed_crd_json_by_version() {
        let installed = json!({"spec": {"versions": [
            {"name": "v1alpha0", "schema": {"openAPIV3Schema": {"type": "string"}}},
            {"name": "v1alpha1", "schema": {"openAPIV3Schema": schema()}}]}});
        assert_eq!(served_schema(&installed, "v1alpha1"), Some(schema()));
        assert_eq!(served_schema(&installed, "v1"), None);
        // The generated CRDs read back as JSON give the same schema as the typed ones.
        for ours in crate::api::crds() {
            let as_json = serde_json::to_value(&ours).unwrap();
            for v in &ours.spec.versions {
                assert_eq!(
                    served_schema(&as_json, &v.name),
                    version_schema(&ours, &v.name)
                );
            }
        }
    }

    #[test]
    fn fields_under_preserve_unknown_fields_are_kept_by_the_server() {
        let served = json!({"type": "object", "properties": {
            "spec": {"type": "object", "x-kubernetes-preserve-unknown-fields": true,
                "properties": {"permissions": {"type": "array", "items": {"type": "string"}},
                    "every": {"type": "string"}, "labels": {"type": "object", "additionalProperties": {"type": "string"}}}},
            "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}}});
        assert!(missing_fields(&schema(), &served).is_empty());
    }
}
