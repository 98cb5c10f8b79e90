//! The apiserver's validation of object metadata and of the built-in kinds' fields that
//! operators commonly get wrong: label and annotation syntax, ConfigMap/Secret keys and sizes,
//! immutable fields, owner references.

use std::sync::OnceLock;

use regex::Regex;
use serde_json::Value;

use crate::schema::FieldError;

const DNS1123_SUBDOMAIN_MSG: &str = "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')";
const QUALIFIED_NAME_MSG: &str = "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')";
const LABEL_VALUE_MSG: &str = "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyValue',  or 'my_value',  or '12345', regex used for validation is '(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')";
const CONFIG_KEY_MSG: &str = "a valid config key must consist of alphanumeric characters, '-', '_' or '.' (e.g. 'key.name',  or 'KEY_NAME',  or 'key-name', regex used for validation is '[-._a-zA-Z0-9]+')";
const TOTAL_ANNOTATION_SIZE: usize = 256 * 1024;
const MAX_SECRET_SIZE: usize = 1024 * 1024;

fn re(cell: &'static OnceLock<Regex>, pattern: &str) -> &'static Regex {
    cell.get_or_init(|| Regex::new(pattern).expect("valid regex"))
}

fn qualified_name_re() -> &'static Regex {
    static R: OnceLock<Regex> = OnceLock::new();
    re(&R, r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
}

fn dns1123_subdomain_re() -> &'static Regex {
    static R: OnceLock<Regex> = OnceLock::new();
    re(
        &R,
        r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$",
    )
}

/// Whether `name` is a DNS-1123 subdomain (what most object names must be).
pub(crate) fn is_dns1123_subdomain(name: &str) -> bool {
    name.len() <= 253 && dns1123_subdomain_re().is_match(name)
}

pub(crate) fn dns1123_subdomain_message() -> &'static str {
    DNS1123_SUBDOMAIN_MSG
}

/// `IsQualifiedName`: `[prefix/]name` as label and annotation keys.
fn qualified_name_errors(key: &str) -> Vec<String> {
    let mut out = Vec::new();
    let (prefix, name) = match key.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if key.matches('/').count() > 1 {
        out.push(
            "a qualified name must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]') with an optional DNS subdomain prefix and '/' (e.g. 'example.com/MyName')".to_string(),
        );
        return out;
    }
    if let Some(p) = prefix {
        if p.is_empty() {
            out.push("prefix part must be non-empty".into());
        } else if !is_dns1123_subdomain(p) {
            out.push(format!("prefix part {DNS1123_SUBDOMAIN_MSG}"));
        }
    }
    if name.is_empty() {
        out.push("name part must be non-empty".into());
    } else if name.len() > 63 {
        out.push("name part must be no more than 63 characters".into());
    }
    if !name.is_empty() && !qualified_name_re().is_match(name) {
        out.push(QUALIFIED_NAME_MSG.into());
    }
    out
}

fn label_value_errors(v: &str) -> Vec<String> {
    let mut out = Vec::new();
    if v.len() > 63 {
        out.push("must be no more than 63 characters".into());
    }
    if !v.is_empty() && !qualified_name_re().is_match(v) {
        out.push(LABEL_VALUE_MSG.into());
    }
    out
}

/// Validates `metadata` as every apiserver storage strategy does.
pub(crate) fn validate_metadata(obj: &Value, errors: &mut Vec<FieldError>) {
    if let Some(labels) = obj.pointer("/metadata/labels").and_then(Value::as_object) {
        for (k, v) in labels {
            for msg in qualified_name_errors(k) {
                errors.push(FieldError::invalid(
                    "metadata.labels",
                    Value::String(k.clone()),
                    msg,
                ));
            }
            match v.as_str() {
                Some(s) => {
                    for msg in label_value_errors(s) {
                        errors.push(FieldError::invalid("metadata.labels", v.clone(), msg));
                    }
                }
                None => errors.push(FieldError::invalid(
                    "metadata.labels",
                    v.clone(),
                    "label values must be strings",
                )),
            }
        }
    }
    if let Some(ann) = obj
        .pointer("/metadata/annotations")
        .and_then(Value::as_object)
    {
        let mut total = 0;
        for (k, v) in ann {
            for msg in qualified_name_errors(&k.to_lowercase()) {
                errors.push(FieldError::invalid(
                    "metadata.annotations",
                    Value::String(k.clone()),
                    msg,
                ));
            }
            total += k.len() + v.as_str().map(str::len).unwrap_or(0);
        }
        if total > TOTAL_ANNOTATION_SIZE {
            errors.push(FieldError {
                error_type: crate::schema::FieldErrorType::TooLong,
                field: "metadata.annotations".into(),
                bad_value: None,
                detail: format!("may not be more than {TOTAL_ANNOTATION_SIZE} bytes"),
            });
        }
    }
    if let Some(refs) = obj
        .pointer("/metadata/ownerReferences")
        .and_then(Value::as_array)
    {
        let mut controllers = Vec::new();
        for r in refs {
            for field in ["apiVersion", "kind", "name"] {
                if r.get(field)
                    .and_then(Value::as_str)
                    .is_none_or(str::is_empty)
                {
                    errors.push(FieldError::invalid(
                        &format!("metadata.ownerReferences.{field}"),
                        Value::String(String::new()),
                        format!("{field} must not be empty"),
                    ));
                }
            }
            if r.get("uid")
                .and_then(Value::as_str)
                .is_none_or(str::is_empty)
            {
                errors.push(FieldError::invalid(
                    "metadata.ownerReferences.uid",
                    Value::String(String::new()),
                    "uid must not be empty",
                ));
            }
            if r.get("controller").and_then(Value::as_bool) == Some(true) {
                controllers.push(format!(
                    "{}/{}",
                    r.get("kind").and_then(Value::as_str).unwrap_or_default(),
                    r.get("name").and_then(Value::as_str).unwrap_or_default()
                ));
            }
        }
        if controllers.len() > 1 {
            errors.push(FieldError::invalid(
                "metadata.ownerReferences",
                Value::Array(refs.clone()),
                format!(
                    "Only one reference can have Controller set to true. Found \"true\" in references for {}",
                    controllers.join(" and ")
                ),
            ));
        }
    }
}

fn validate_keys(
    field: &str,
    map: Option<&serde_json::Map<String, Value>>,
    errors: &mut Vec<FieldError>,
) {
    for k in map.into_iter().flat_map(|m| m.keys()) {
        let path = format!("{field}[{k}]");
        if k.len() > 253 {
            errors.push(FieldError::invalid(
                &path,
                Value::String(k.clone()),
                "must be no more than 253 characters",
            ));
        }
        if k == "." || k == ".." {
            errors.push(FieldError::invalid(
                &path,
                Value::String(k.clone()),
                format!("must not be '{k}'"),
            ));
        } else if k.starts_with("..") {
            errors.push(FieldError::invalid(
                &path,
                Value::String(k.clone()),
                "must not start with '..'",
            ));
        }
        if !k
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            || k.is_empty()
        {
            errors.push(FieldError::invalid(
                &path,
                Value::String(k.clone()),
                CONFIG_KEY_MSG,
            ));
        }
    }
}

/// Validates the built-in kinds' fields (`group`, `plural` of the resource).
pub(crate) fn validate_builtin(
    group: &str,
    plural: &str,
    obj: &Value,
    old: Option<&Value>,
    errors: &mut Vec<FieldError>,
) {
    match (group, plural) {
        ("", "secrets") => {
            let data = obj.get("data").and_then(Value::as_object);
            validate_keys("data", data, errors);
            let size: usize = data
                .into_iter()
                .flat_map(|m| m.values())
                .filter_map(Value::as_str)
                .map(|b64| b64.len() / 4 * 3)
                .sum();
            if size > MAX_SECRET_SIZE {
                errors.push(FieldError {
                    error_type: crate::schema::FieldErrorType::TooLong,
                    field: "data".into(),
                    bad_value: None,
                    detail: format!("may not be more than {MAX_SECRET_SIZE} bytes"),
                });
            }
            if let Some(old) = old {
                if old.get("type") != obj.get("type") {
                    errors.push(FieldError::invalid(
                        "type",
                        obj.get("type").cloned().unwrap_or(Value::Null),
                        "field is immutable",
                    ));
                }
                if old.get("immutable").and_then(Value::as_bool) == Some(true) {
                    if old.get("data") != obj.get("data") {
                        errors.push(FieldError::forbidden(
                            "data",
                            "field is immutable when `immutable` is set",
                        ));
                    }
                    if obj.get("immutable").and_then(Value::as_bool) != Some(true) {
                        errors.push(FieldError::forbidden(
                            "immutable",
                            "field is immutable when `immutable` is set",
                        ));
                    }
                }
            }
        }
        ("", "configmaps") => {
            validate_keys("data", obj.get("data").and_then(Value::as_object), errors);
            validate_keys(
                "binaryData",
                obj.get("binaryData").and_then(Value::as_object),
                errors,
            );
            if let Some(old) = old
                && old.get("immutable").and_then(Value::as_bool) == Some(true)
            {
                if old.get("data") != obj.get("data")
                    || old.get("binaryData") != obj.get("binaryData")
                {
                    errors.push(FieldError::forbidden(
                        "data",
                        "field is immutable when `immutable` is set",
                    ));
                }
                if obj.get("immutable").and_then(Value::as_bool) != Some(true) {
                    errors.push(FieldError::forbidden(
                        "immutable",
                        "field is immutable when `immutable` is set",
                    ));
                }
            }
        }
        ("apps", "deployments") | ("apps", "statefulsets") | ("apps", "daemonsets") => {
            if obj.pointer("/spec/selector").is_none() {
                errors.push(FieldError::required("spec.selector", ""));
            }
            if let Some(old) = old
                && old.pointer("/spec/selector") != obj.pointer("/spec/selector")
            {
                errors.push(FieldError::invalid(
                    "spec.selector",
                    obj.pointer("/spec/selector")
                        .cloned()
                        .unwrap_or(Value::Null),
                    "field is immutable",
                ));
            }
            if let Some(selector) = obj
                .pointer("/spec/selector/matchLabels")
                .and_then(Value::as_object)
            {
                let template_labels = obj
                    .pointer("/spec/template/metadata/labels")
                    .and_then(Value::as_object);
                let selects = selector
                    .iter()
                    .all(|(k, v)| template_labels.and_then(|l| l.get(k)) == Some(v));
                if !selects {
                    errors.push(FieldError::invalid(
                        "spec.template.metadata.labels",
                        template_labels
                            .cloned()
                            .map(Value::Object)
                            .unwrap_or(Value::Null),
                        "`selector` does not match template `labels`",
                    ));
                }
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn label_syntax_errors_use_the_apiserver_text() {
        let mut errs = Vec::new();
        validate_metadata(
            &json!({"metadata": {"labels": {"ok/key": "fine", "bad key": "v", "k": "not valid!"}}}),
            &mut errs,
        );
        let texts: Vec<String> = errs.iter().map(ToString::to_string).collect();
        assert_eq!(texts.len(), 2, "{texts:?}");
        assert!(
            texts[0].starts_with(
                r#"metadata.labels: Invalid value: "bad key": name part must consist of"#
            ),
            "{texts:?}"
        );
        assert!(texts[1].starts_with(r#"metadata.labels: Invalid value: "not valid!": a valid label must be an empty string"#), "{texts:?}");
    }

    #[test]
    fn secret_keys_and_immutability_are_checked() {
        let mut errs = Vec::new();
        let old = json!({"type": "Opaque", "immutable": true, "data": {"a": "Yg=="}});
        let new =
            json!({"type": "Opaque", "immutable": true, "data": {"a": "Yw==", "b/c": "Yg=="}});
        validate_builtin("", "secrets", &new, Some(&old), &mut errs);
        let texts: Vec<String> = errs.iter().map(ToString::to_string).collect();
        assert!(
            texts
                .iter()
                .any(|t| t.starts_with(r#"data[b/c]: Invalid value: "b/c": a valid config key"#)),
            "{texts:?}"
        );
        assert!(
            texts.contains(
                &"data: Forbidden: field is immutable when `immutable` is set".to_string()
            ),
            "{texts:?}"
        );
    }
}
