//! `fieldValidation=Strict` (what `kubectl apply` and `kubectl create` send): a custom resource
//! with fields its schema does not declare is refused instead of silently pruned, with the
//! apiserver's texts.

use std::collections::HashMap;

use serde_json::Value;

use crate::store::{ApiError, ResourceType};

/// Paths (`spec.foo`, `spec.items[0].bar`) of fields in `obj` that `schema` does not declare
/// (and does not leave open with `x-kubernetes-preserve-unknown-fields`).
pub(crate) fn unknown_fields(schema: &Value, obj: &Value) -> Vec<String> {
    fn walk(schema: &Value, v: &Value, path: &str, out: &mut Vec<String>) {
        if schema.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true))
            && schema.get("properties").is_none()
        {
            return;
        }
        match v {
            Value::Object(map) => {
                let props = schema.get("properties").and_then(Value::as_object);
                let extra = schema.get("additionalProperties").filter(|a| a.is_object());
                let open =
                    schema.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
                for (k, child) in map {
                    let p = if path.is_empty() {
                        k.clone()
                    } else {
                        format!("{path}.{k}")
                    };
                    if let Some(s) = props.and_then(|m| m.get(k)) {
                        walk(s, child, &p, out);
                    } else if let Some(s) = extra {
                        walk(s, child, &p, out);
                    } else if !open {
                        out.push(p);
                    }
                }
            }
            Value::Array(items) => {
                if let Some(s) = schema.get("items") {
                    for (i, it) in items.iter().enumerate() {
                        walk(s, it, &format!("{path}[{i}]"), out);
                    }
                }
            }
            _ => {}
        }
    }
    let mut out = Vec::new();
    if let Some(map) = obj.as_object() {
        for (k, child) in map {
            // apiVersion, kind and metadata are the apiserver's, not the schema's.
            if matches!(k.as_str(), "apiVersion" | "kind" | "metadata") {
                continue;
            }
            match schema.pointer(&format!("/properties/{k}")) {
                Some(s) => walk(s, child, k, &mut out),
                None if schema.get("x-kubernetes-preserve-unknown-fields")
                    == Some(&Value::Bool(true)) => {}
                None => out.push(k.clone()),
            }
        }
    }
    out
}

/// Refuses a create, update or apply of a custom resource with undeclared fields when the
/// request asks for `fieldValidation=Strict`. Built-in kinds are not checked.
pub(crate) fn check(
    rt: &ResourceType,
    version: &str,
    obj: &Value,
    query: &HashMap<String, String>,
    apply: bool,
) -> Result<(), ApiError> {
    if query.get("fieldValidation").map(String::as_str) != Some("Strict") {
        return Ok(());
    }
    let Some(schema) = rt
        .crd
        .as_ref()
        .and_then(|c| crate::schema::version_schema(c, version))
    else {
        return Ok(());
    };
    let unknown = unknown_fields(schema, obj);
    if unknown.is_empty() {
        return Ok(());
    }
    let message = if apply {
        let ns = obj
            .pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let name = obj
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let fields: Vec<String> = unknown
            .iter()
            .map(|p| format!(".{p}: field not declared in schema"))
            .collect();
        format!(
            "failed to create typed patch object ({ns}/{name}; {}, Kind={}): {}",
            rt.api_version(version),
            rt.kind,
            fields.join(", ")
        )
    } else {
        let fields: Vec<String> = unknown
            .iter()
            .map(|p| format!("unknown field \"{p}\""))
            .collect();
        format!(
            "{kind} in version \"{version}\" cannot be handled as a {kind}: strict decoding error: {}",
            fields.join(", "),
            kind = rt.kind
        )
    };
    Err(ApiError::bad_request(message))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn undeclared_fields_are_found_and_open_maps_are_not() {
        let schema = json!({"type": "object", "properties": {
            "spec": {"type": "object", "properties": {
                "permissions": {"type": "array", "items": {"type": "string"}},
                "targets": {"type": "array", "items": {"type": "object", "properties": {"name": {"type": "string"}}}},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}}},
            "status": {"type": "object"}}});
        let obj = json!({"apiVersion": "x/v1", "kind": "X", "metadata": {"name": "a", "anything": 1},
            "spec": {"permissions": ["a"], "permisions": ["typo"], "targets": [{"name": "w", "kind": "Job"}],
                     "labels": {"any": "thing"}, "free": {"deep": {"x": 1}}},
            "extra": 1});
        let mut found = unknown_fields(&schema, &obj);
        found.sort();
        assert_eq!(found, ["extra", "spec.permisions", "spec.targets[0].kind"]);
    }
}
