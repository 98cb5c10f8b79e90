//! Structural schema validation of custom resources, as the kube-apiserver does it.
//!
//! [`validate`] takes a CustomResourceDefinition (as JSON), the version being written, the
//! object and (for updates) the previous object, and runs the same pipeline as the apiserver:
//!
//! 1. **pruning**: fields not declared in the schema are dropped (unless
//!    `x-kubernetes-preserve-unknown-fields: true`), and `null` values of fields that are not
//!    `nullable` are dropped;
//! 2. **defaulting**: `default` values are filled in for absent properties;
//! 3. **validation**: `type`, `required`, `enum`, `pattern`, `format` (`date-time`, `date`,
//!    `int-or-string`), `minimum`/`maximum` (and exclusive variants), `minLength`/`maxLength`,
//!    `minItems`/`maxItems`, `minProperties`/`maxProperties`, `uniqueItems`,
//!    `x-kubernetes-list-type: set|map`, `x-kubernetes-int-or-string`, `nullable`;
//! 4. **CEL rules** (`x-kubernetes-validations`) evaluated with the [`cel`] crate: `self`,
//!    `oldSelf` (transition rules, skipped on create and where the old value is absent),
//!    `message`, `messageExpression`, `fieldPath`, `reason`.
//!
//! Errors are [`FieldError`]s whose `Display` is byte-for-byte the apiserver's
//! (`spec.mode: Unsupported value: "prod": supported values: "test", "live"`), and
//! [`format_invalid`] builds the full `Invalid` message
//! (`StripeKeyPolicy.stripekeys.io "bad" is invalid: spec.accountRef: Required value`).
//!
//! A rule that cannot be evaluated (for example it calls a function the `cel` crate lacks, such
//! as the Kubernetes `url()` library) is reported as an error on that field, never as valid.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::{Arc, OnceLock};

use serde_json::Value;

/// The kind of a field error; the names and texts follow `k8s.io/apimachinery/pkg/util/validation/field`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldErrorType {
    /// `Not found`
    NotFound,
    /// `Required value`
    Required,
    /// `Duplicate value`
    Duplicate,
    /// `Invalid value`
    Invalid,
    /// `Unsupported value` (enum)
    NotSupported,
    /// `Forbidden`
    Forbidden,
    /// `Too long`
    TooLong,
    /// `Too many`
    TooMany,
    /// `Internal error`
    Internal,
    /// `Invalid value` (wrong type)
    TypeInvalid,
}

impl FieldErrorType {
    /// The text the apiserver prints for this type, e.g. `Required value`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NotFound => "Not found",
            Self::Required => "Required value",
            Self::Duplicate => "Duplicate value",
            Self::Invalid | Self::TypeInvalid => "Invalid value",
            Self::NotSupported => "Unsupported value",
            Self::Forbidden => "Forbidden",
            Self::TooLong => "Too long",
            Self::TooMany => "Too many",
            Self::Internal => "Internal error",
        }
    }

    /// The `reason` of a `StatusCause`, e.g. `FieldValueRequired`.
    pub fn cause_reason(self) -> &'static str {
        match self {
            Self::NotFound => "FieldValueNotFound",
            Self::Required => "FieldValueRequired",
            Self::Duplicate => "FieldValueDuplicate",
            Self::Invalid => "FieldValueInvalid",
            Self::NotSupported => "FieldValueNotSupported",
            Self::Forbidden => "FieldValueForbidden",
            Self::TooLong => "FieldValueTooLong",
            Self::TooMany => "FieldValueTooMany",
            Self::Internal => "InternalError",
            Self::TypeInvalid => "FieldValueTypeInvalid",
        }
    }
}

/// One validation error on one field, like the apiserver's `field.Error`.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldError {
    /// What is wrong.
    pub error_type: FieldErrorType,
    /// The field path, e.g. `spec.rotation` or `spec.items[0].name`.
    pub field: String,
    /// The offending value, printed after the type (omitted for `Required`, `Forbidden`, …).
    pub bad_value: Option<Value>,
    /// Extra detail, printed after the value.
    pub detail: String,
}

impl FieldError {
    fn new(
        error_type: FieldErrorType,
        field: &str,
        bad_value: Option<Value>,
        detail: impl Into<String>,
    ) -> Self {
        Self {
            error_type,
            field: field.to_string(),
            bad_value,
            detail: detail.into(),
        }
    }

    /// `Required value` on `field`.
    pub fn required(field: &str, detail: impl Into<String>) -> Self {
        Self::new(FieldErrorType::Required, field, None, detail)
    }

    /// `Invalid value: <value>: <detail>` on `field`.
    pub fn invalid(field: &str, value: Value, detail: impl Into<String>) -> Self {
        Self::new(FieldErrorType::Invalid, field, Some(value), detail)
    }

    /// `Forbidden: <detail>` on `field`.
    pub fn forbidden(field: &str, detail: impl Into<String>) -> Self {
        Self::new(FieldErrorType::Forbidden, field, None, detail)
    }

    /// The error without the field path, as used in `StatusCause.message`.
    pub fn body(&self) -> String {
        let mut s = match self.error_type {
            FieldErrorType::Required
            | FieldErrorType::Forbidden
            | FieldErrorType::TooLong
            | FieldErrorType::Internal => self.error_type.as_str().to_string(),
            _ => match &self.bad_value {
                None => self.error_type.as_str().to_string(),
                Some(v) => format!("{}: {}", self.error_type.as_str(), go_value(v)),
            },
        };
        if !self.detail.is_empty() {
            s.push_str(": ");
            s.push_str(&self.detail);
        }
        s
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.body())
    }
}

/// Prints a value like Go's `%#v`/`%q` in field errors: strings quoted, numbers and booleans bare.
fn go_value(v: &Value) -> String {
    match v {
        Value::String(s) => format!("{s:?}"),
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        other => other.to_string(),
    }
}

/// Builds the apiserver's `Invalid` message:
/// `{kind}.{group} "{name}" is invalid: {error}` for one error and
/// `... is invalid: [{error}, {error}]` for several. An empty `group` (core API) prints the kind alone.
pub fn format_invalid(kind: &str, group: &str, name: &str, errors: &[FieldError]) -> String {
    let qualified = if group.is_empty() {
        kind.to_string()
    } else {
        format!("{kind}.{group}")
    };
    let body = if errors.len() == 1 {
        errors[0].to_string()
    } else {
        format!(
            "[{}]",
            errors
                .iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    format!("{qualified} \"{name}\" is invalid: {body}")
}

/// Finds the `openAPIV3Schema` of `version` in a CRD (per-version schema or the legacy top-level one).
pub fn version_schema<'a>(crd: &'a Value, version: &str) -> Option<&'a Value> {
    let spec = crd.get("spec")?;
    if let Some(vs) = spec.get("versions").and_then(Value::as_array) {
        for v in vs {
            if v.get("name").and_then(Value::as_str) == Some(version)
                && let Some(s) = v.pointer("/schema/openAPIV3Schema")
            {
                return Some(s);
            }
        }
    }
    spec.pointer("/validation/openAPIV3Schema")
}

/// Prunes, defaults and validates `obj` (a custom resource of `version` of `crd`) the way the
/// apiserver does on create (`old == None`) and update (`old == Some(previous)`).
///
/// Returns the pruned and defaulted object, or every field error found (schema errors first,
/// then CEL rule failures, in field order). A CRD version without a schema accepts anything.
pub fn validate(
    crd: &Value,
    version: &str,
    obj: &Value,
    old: Option<&Value>,
) -> Result<Value, Vec<FieldError>> {
    let Some(schema) = version_schema(crd, version) else {
        return Ok(obj.clone());
    };
    let mut out = obj.clone();
    prune(&mut out, schema, true);
    apply_defaults(&mut out, schema);
    let mut errors = Vec::new();
    validate_node(&out, schema, "", true, &mut errors);
    if has_rules(schema) {
        // Like the apiserver: errors that make the object's shape unreliable block CEL, and a
        // fieldless notice says so; other schema errors are reported together with CEL's.
        let blocking = errors.iter().any(|e| {
            matches!(
                e.error_type,
                FieldErrorType::NotSupported
                    | FieldErrorType::Required
                    | FieldErrorType::TooLong
                    | FieldErrorType::TooMany
                    | FieldErrorType::TypeInvalid
            )
        });
        if blocking {
            errors.push(FieldError::invalid(
                "<nil>",
                Value::String("null".into()),
                RULES_NOT_CHECKED,
            ));
        } else {
            cel_node(&out, old, schema, "", &mut errors);
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

/// The detail of the fieldless error the apiserver adds when schema errors kept CEL rules from
/// running (`<nil>: Invalid value: "null": some validation rules were not checked …`).
pub const RULES_NOT_CHECKED: &str = "some validation rules were not checked because the object was invalid; correct the existing errors to complete validation";

fn has_rules(schema: &Value) -> bool {
    match schema {
        Value::Object(m) => {
            m.get("x-kubernetes-validations")
                .and_then(Value::as_array)
                .is_some_and(|a| !a.is_empty())
                || m.values().any(has_rules)
        }
        Value::Array(a) => a.iter().any(has_rules),
        _ => false,
    }
}

/// Checks the CEL rules of a CRD version compile, as the apiserver does when a CRD is written.
pub fn check_rules_compile(crd: &Value) -> Vec<FieldError> {
    let mut errors = Vec::new();
    if let Some(vs) = crd.pointer("/spec/versions").and_then(Value::as_array) {
        for (i, v) in vs.iter().enumerate() {
            if let Some(s) = v.pointer("/schema/openAPIV3Schema") {
                let path = format!("spec.versions[{i}].schema.openAPIV3Schema");
                compile_walk(s, &path, &mut errors);
            }
        }
    }
    errors
}

fn compile_walk(schema: &Value, path: &str, errors: &mut Vec<FieldError>) {
    if let Some(rules) = schema
        .get("x-kubernetes-validations")
        .and_then(Value::as_array)
    {
        for (i, r) in rules.iter().enumerate() {
            if let Some(rule) = r.get("rule").and_then(Value::as_str)
                && let Err(e) = cel_env().compile(rule)
            {
                errors.push(FieldError::invalid(
                    &format!("{path}.x-kubernetes-validations[{i}].rule"),
                    Value::String(rule.to_string()),
                    format!("compilation failed: {e}"),
                ));
            }
        }
    }
    if let Some(props) = schema.get("properties").and_then(Value::as_object) {
        for (k, s) in props {
            compile_walk(s, &format!("{path}.properties[{k}]"), errors);
        }
    }
    if let Some(items) = schema.get("items") {
        compile_walk(items, &format!("{path}.items"), errors);
    }
    if let Some(ap) = schema.get("additionalProperties").filter(|v| v.is_object()) {
        compile_walk(ap, &format!("{path}.additionalProperties"), errors);
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

fn preserves_unknown(schema: &Value) -> bool {
    schema
        .get("x-kubernetes-preserve-unknown-fields")
        .and_then(Value::as_bool)
        == Some(true)
}

fn is_nullable(schema: &Value) -> bool {
    schema.get("nullable").and_then(Value::as_bool) == Some(true)
}

fn is_int_or_string(schema: &Value) -> bool {
    schema
        .get("x-kubernetes-int-or-string")
        .and_then(Value::as_bool)
        == Some(true)
}

/// Drops unknown fields and non-nullable nulls. At the root, `apiVersion`, `kind` and `metadata`
/// are always kept.
fn prune(value: &mut Value, schema: &Value, root: bool) {
    match value {
        Value::Object(map) => {
            let props = schema.get("properties").and_then(Value::as_object);
            let additional = schema.get("additionalProperties");
            let keep_unknown = preserves_unknown(schema);
            let keys: Vec<String> = map.keys().cloned().collect();
            for k in keys {
                if root && (k == "apiVersion" || k == "kind" || k == "metadata") {
                    continue;
                }
                let child_schema = props.and_then(|p| p.get(&k)).or(match additional {
                    Some(a) if a.is_object() => Some(a),
                    _ => None,
                });
                match child_schema {
                    Some(cs) => {
                        let child = map.get_mut(&k).expect("key exists");
                        if child.is_null() && !is_nullable(cs) {
                            map.remove(&k);
                        } else {
                            prune(child, cs, false);
                        }
                    }
                    None => {
                        let allowed_any = matches!(additional, Some(Value::Bool(true)));
                        if !keep_unknown && !allowed_any {
                            map.remove(&k);
                        }
                    }
                }
            }
        }
        Value::Array(items) => {
            if let Some(is) = schema.get("items") {
                for it in items.iter_mut() {
                    prune(it, is, false);
                }
            }
        }
        _ => {}
    }
}

fn apply_defaults(value: &mut Value, schema: &Value) {
    match value {
        Value::Object(map) => {
            if let Some(props) = schema.get("properties").and_then(Value::as_object) {
                for (k, cs) in props {
                    if !map.contains_key(k)
                        && let Some(d) = cs.get("default")
                    {
                        map.insert(k.clone(), d.clone());
                    }
                    if let Some(child) = map.get_mut(k) {
                        apply_defaults(child, cs);
                    }
                }
            }
            if let Some(ap) = schema.get("additionalProperties").filter(|v| v.is_object()) {
                let props = schema.get("properties").and_then(Value::as_object);
                for (k, child) in map.iter_mut() {
                    if props.is_none_or(|p| !p.contains_key(k)) {
                        apply_defaults(child, ap);
                    }
                }
            }
        }
        Value::Array(items) => {
            if let Some(is) = schema.get("items") {
                for it in items.iter_mut() {
                    apply_defaults(it, is);
                }
            }
        }
        _ => {}
    }
}

fn json_type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) => {
            if n.is_f64() {
                "number"
            } else {
                "integer"
            }
        }
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn type_matches(v: &Value, ty: &str) -> bool {
    match ty {
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "boolean" => v.is_boolean(),
        "number" => v.is_number(),
        "integer" => match v {
            Value::Number(n) => {
                n.is_i64() || n.is_u64() || n.as_f64().is_some_and(|f| f.fract() == 0.0)
            }
            _ => false,
        },
        _ => true,
    }
}

fn as_f64(v: &Value) -> Option<f64> {
    v.as_f64()
}

fn fmt_num(f: f64) -> String {
    if f.fract() == 0.0 && f.abs() < 1e15 {
        format!("{}", f as i64)
    } else {
        f.to_string()
    }
}

fn validate_node(v: &Value, schema: &Value, path: &str, root: bool, errors: &mut Vec<FieldError>) {
    if v.is_null() {
        if is_nullable(schema) {
            return;
        }
        if let Some(ty) = schema.get("type").and_then(Value::as_str) {
            errors.push(FieldError::new(
                FieldErrorType::TypeInvalid,
                path,
                Some(Value::String("null".into())),
                format!("{path} in body must be of type {ty}: \"null\""),
            ));
        }
        return;
    }
    if is_int_or_string(schema) {
        if !(v.is_string() || type_matches(v, "integer")) {
            errors.push(FieldError::new(
                FieldErrorType::TypeInvalid,
                path,
                Some(Value::String(json_type_name(v).into())),
                format!(
                    "{path} in body must be of type integer,string: \"{}\"",
                    json_type_name(v)
                ),
            ));
            return;
        }
    } else if let Some(ty) = schema.get("type").and_then(Value::as_str)
        && !type_matches(v, ty)
    {
        errors.push(FieldError::new(
            FieldErrorType::TypeInvalid,
            path,
            Some(Value::String(json_type_name(v).into())),
            format!(
                "{path} in body must be of type {ty}: \"{}\"",
                json_type_name(v)
            ),
        ));
        return;
    }
    if let Some(en) = schema.get("enum").and_then(Value::as_array)
        && !en.contains(v)
    {
        let supported = en.iter().map(go_value).collect::<Vec<_>>().join(", ");
        errors.push(FieldError::new(
            FieldErrorType::NotSupported,
            path,
            Some(v.clone()),
            format!("supported values: {supported}"),
        ));
    }
    match v {
        Value::String(s) => validate_string(s, v, schema, path, errors),
        Value::Number(_) => validate_number(v, schema, path, errors),
        Value::Array(items) => {
            if let Some(min) = schema.get("minItems").and_then(Value::as_u64)
                && (items.len() as u64) < min
            {
                // The apiserver reports the item count, not the list (`Invalid value: 0`).
                errors.push(FieldError::invalid(
                    path,
                    Value::from(items.len()),
                    format!("{path} in body should have at least {min} items"),
                ));
            }
            if let Some(max) = schema.get("maxItems").and_then(Value::as_u64)
                && (items.len() as u64) > max
            {
                errors.push(FieldError::new(
                    FieldErrorType::TooMany,
                    path,
                    Some(Value::from(items.len())),
                    format!("must have at most {max} items"),
                ));
            }
            let list_type = schema.get("x-kubernetes-list-type").and_then(Value::as_str);
            if schema.get("uniqueItems").and_then(Value::as_bool) == Some(true)
                || list_type == Some("set")
            {
                for (i, it) in items.iter().enumerate() {
                    if items[..i].contains(it) {
                        errors.push(FieldError::new(
                            FieldErrorType::Duplicate,
                            &format!("{path}[{i}]"),
                            Some(it.clone()),
                            "",
                        ));
                    }
                }
            }
            if list_type == Some("map")
                && let Some(keys) = schema
                    .get("x-kubernetes-list-map-keys")
                    .and_then(Value::as_array)
            {
                let mut seen = BTreeSet::new();
                for (i, it) in items.iter().enumerate() {
                    let k: Vec<String> = keys
                        .iter()
                        .filter_map(Value::as_str)
                        .map(|k| it.get(k).map(|x| x.to_string()).unwrap_or_default())
                        .collect();
                    if !seen.insert(k) {
                        errors.push(FieldError::new(
                            FieldErrorType::Duplicate,
                            &format!("{path}[{i}]"),
                            Some(it.clone()),
                            "",
                        ));
                    }
                }
            }
            if let Some(is) = schema.get("items") {
                for (i, it) in items.iter().enumerate() {
                    validate_node(it, is, &format!("{path}[{i}]"), false, errors);
                }
            }
        }
        Value::Object(map) => {
            if let Some(req) = schema.get("required").and_then(Value::as_array) {
                for r in req.iter().filter_map(Value::as_str) {
                    if !map.contains_key(r) {
                        errors.push(FieldError::required(&join(path, r), ""));
                    }
                }
            }
            if let Some(min) = schema.get("minProperties").and_then(Value::as_u64)
                && (map.len() as u64) < min
            {
                errors.push(FieldError::invalid(
                    path,
                    Value::from(map.len()),
                    format!("{path} in body should have at least {min} properties"),
                ));
            }
            if let Some(max) = schema.get("maxProperties").and_then(Value::as_u64)
                && (map.len() as u64) > max
            {
                errors.push(FieldError::new(
                    FieldErrorType::TooMany,
                    path,
                    Some(Value::from(map.len())),
                    format!("must have at most {max} items"),
                ));
            }
            let props = schema.get("properties").and_then(Value::as_object);
            let additional = schema.get("additionalProperties").filter(|a| a.is_object());
            for (k, child) in map {
                if root && (k == "apiVersion" || k == "kind" || k == "metadata") {
                    if k == "metadata"
                        && let Some(ms) = props.and_then(|p| p.get("metadata"))
                    {
                        validate_node(child, ms, "metadata", false, errors);
                    }
                    continue;
                }
                if let Some(cs) = props.and_then(|p| p.get(k)) {
                    validate_node(child, cs, &join(path, k), false, errors);
                } else if let Some(a) = additional {
                    validate_node(child, a, &format!("{path}[{k}]"), false, errors);
                }
            }
        }
        _ => {}
    }
}

fn validate_string(s: &str, v: &Value, schema: &Value, path: &str, errors: &mut Vec<FieldError>) {
    let len = s.chars().count() as u64;
    if let Some(max) = schema.get("maxLength").and_then(Value::as_u64)
        && len > max
    {
        errors.push(FieldError::new(
            FieldErrorType::TooLong,
            path,
            Some(v.clone()),
            format!("may not be more than {max} bytes"),
        ));
    }
    if let Some(min) = schema.get("minLength").and_then(Value::as_u64)
        && len < min
    {
        errors.push(FieldError::invalid(
            path,
            v.clone(),
            format!("{path} in body should be at least {min} chars long"),
        ));
    }
    if let Some(p) = schema.get("pattern").and_then(Value::as_str) {
        match regex::Regex::new(p) {
            Ok(re) if !re.is_match(s) => errors.push(FieldError::invalid(
                path,
                v.clone(),
                format!("{path} in body should match '{p}'"),
            )),
            Ok(_) => {}
            Err(e) => errors.push(FieldError::new(
                FieldErrorType::Internal,
                path,
                None,
                format!("the schema pattern {p:?} does not compile: {e}"),
            )),
        }
    }
    if let Some(f) = schema.get("format").and_then(Value::as_str) {
        let ok = match f {
            "date-time" | "datetime" => chrono::DateTime::parse_from_rfc3339(s).is_ok(),
            "date" => chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d").is_ok(),
            _ => true,
        };
        if !ok {
            errors.push(FieldError::invalid(
                path,
                v.clone(),
                format!("{path} in body must be of type {f}: {s:?}"),
            ));
        }
    }
}

fn validate_number(v: &Value, schema: &Value, path: &str, errors: &mut Vec<FieldError>) {
    let Some(n) = as_f64(v) else { return };
    if let Some(min) = schema.get("minimum").and_then(as_f64) {
        let excl = schema.get("exclusiveMinimum").and_then(Value::as_bool) == Some(true);
        if (excl && n <= min) || (!excl && n < min) {
            let rel = if excl {
                "greater than"
            } else {
                "greater than or equal to"
            };
            errors.push(FieldError::invalid(
                path,
                v.clone(),
                format!("{path} in body should be {rel} {}", fmt_num(min)),
            ));
        }
    }
    if let Some(max) = schema.get("maximum").and_then(as_f64) {
        let excl = schema.get("exclusiveMaximum").and_then(Value::as_bool) == Some(true);
        if (excl && n >= max) || (!excl && n > max) {
            let rel = if excl {
                "less than"
            } else {
                "less than or equal to"
            };
            errors.push(FieldError::invalid(
                path,
                v.clone(),
                format!("{path} in body should be {rel} {}", fmt_num(max)),
            ));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// CEL
// ---------------------------------------------------------------------------------------------

fn cel_env() -> Arc<cel::Env> {
    static ENV: OnceLock<Arc<cel::Env>> = OnceLock::new();
    ENV.get_or_init(|| {
        let mut env = cel::Env::stdlib();
        // The Kubernetes CEL environment includes the strings extension (lowerAscii, split, …).
        let _ = env.add_extension(cel::extensions::strings);
        let _ = env.add_extension(cel::extensions::lists);
        Arc::new(env)
    })
    .clone()
}

/// A CEL context with the subset of the Kubernetes URL library the `cel` crate lacks:
/// `isURL(string)`, `url(string)` and `getScheme()`, `getHost()`, `getHostname()`, `getPort()`,
/// `getEscapedPath()`, `getQuery()` on its result.
fn k8s_context(env: Arc<cel::Env>) -> cel::Context<'static, 'static> {
    use cel::extractors::This;
    let mut ctx = cel::Context::with_env(env);
    let _ = ctx.add_function("isURL", |s: Arc<String>| parse_url(&s).is_some());
    let _ = ctx.add_function(
        "url",
        |s: Arc<String>| -> Result<cel::Value, cel::ExecutionError> {
            let parts = parse_url(&s).ok_or_else(|| {
                cel::ExecutionError::function_error(
                    "url",
                    format!("URL parse error during conversion from string: {s}"),
                )
            })?;
            Ok(json_to_cel(&parts))
        },
    );
    for (name, field) in [
        ("getScheme", "scheme"),
        ("getHost", "host"),
        ("getHostname", "hostname"),
        ("getPort", "port"),
        ("getEscapedPath", "path"),
        ("getQuery", "query"),
    ] {
        let _ = ctx.add_function(
            name,
            move |This(v): This<cel::Value>| -> Result<cel::Value, cel::ExecutionError> {
                match &v {
                    cel::Value::Map(m) => m
                        .get(&cel::objects::Key::String(Arc::new(format!(
                            "__url_{field}"
                        ))))
                        .cloned()
                        .ok_or_else(|| cel::ExecutionError::function_error(name, "not a URL")),
                    _ => Err(cel::ExecutionError::function_error(name, "not a URL")),
                }
            },
        );
    }
    ctx
}

/// Parses an absolute URL or absolute path like Go's `url.ParseRequestURI`.
fn parse_url(s: &str) -> Option<Value> {
    static RE: OnceLock<regex::Regex> = OnceLock::new();
    let re = RE.get_or_init(|| {
        regex::Regex::new(
            r"^(?:([A-Za-z][A-Za-z0-9+.\-]*):)?(?://([^/?#\s]*))?([^?#\s]*)(?:\?([^#\s]*))?$",
        )
        .expect("valid regex")
    });
    let c = re.captures(s)?;
    let scheme = c.get(1).map(|m| m.as_str()).unwrap_or_default();
    let host = c.get(2).map(|m| m.as_str()).unwrap_or_default();
    let path = c.get(3).map(|m| m.as_str()).unwrap_or_default();
    if scheme.is_empty() && !path.starts_with('/') {
        return None;
    }
    if !scheme.is_empty() && host.is_empty() && !path.starts_with('/') && path.is_empty() {
        return None;
    }
    let (hostname, port) = match host.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || host.starts_with('[') && h.ends_with(']') => {
            if p.chars().all(|c| c.is_ascii_digit()) {
                (h, p)
            } else {
                (host, "")
            }
        }
        _ => (host, ""),
    };
    let hostname = hostname.trim_start_matches('[').trim_end_matches(']');
    let mut query = serde_json::Map::new();
    if let Some(q) = c.get(4) {
        for pair in q.as_str().split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let entry = query
                .entry(k.to_string())
                .or_insert_with(|| Value::Array(Vec::new()));
            if let Value::Array(a) = entry {
                a.push(Value::String(v.to_string()));
            }
        }
    }
    Some(serde_json::json!({
        "__url_scheme": scheme, "__url_host": host, "__url_hostname": hostname,
        "__url_port": port, "__url_path": path, "__url_query": query,
    }))
}

/// Converts JSON to a CEL value: integers stay integers, other numbers become doubles.
pub fn json_to_cel(v: &Value) -> cel::Value {
    match v {
        Value::Null => cel::Value::Null,
        Value::Bool(b) => cel::Value::Bool(*b),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                cel::Value::Int(i)
            } else if let Some(u) = n.as_u64() {
                cel::Value::UInt(u)
            } else {
                cel::Value::Float(n.as_f64().unwrap_or_default())
            }
        }
        Value::String(s) => cel::Value::String(Arc::new(s.clone())),
        Value::Array(a) => cel::Value::List(Arc::new(a.iter().map(json_to_cel).collect())),
        Value::Object(m) => {
            let map: std::collections::HashMap<cel::objects::Key, cel::Value> = m
                .iter()
                .map(|(k, v)| {
                    (
                        cel::objects::Key::String(Arc::new(k.clone())),
                        json_to_cel(v),
                    )
                })
                .collect();
            cel::Value::Map(cel::objects::Map { map: Arc::new(map) })
        }
    }
}

fn schema_type_name(schema: &Value, v: &Value) -> String {
    schema
        .get("type")
        .and_then(Value::as_str)
        .map(str::to_string)
        .unwrap_or_else(|| json_type_name(v).to_string())
}

enum RuleOutcome {
    Pass,
    Fail,
    Error(String),
}

fn run_rule(rule: &str, selfv: &Value, old: Option<&Value>) -> RuleOutcome {
    let env = cel_env();
    let program = match env.compile(rule) {
        Ok(p) => p,
        Err(e) => return RuleOutcome::Error(format!("compilation failed: {e}")),
    };
    let mut ctx = k8s_context(env);
    ctx.add_variable_from_value("self", json_to_cel(selfv));
    if let Some(o) = old {
        ctx.add_variable_from_value("oldSelf", json_to_cel(o));
    }
    match program.execute(&ctx) {
        Ok(cel::Value::Bool(true)) => RuleOutcome::Pass,
        Ok(cel::Value::Bool(false)) => RuleOutcome::Fail,
        Ok(other) => {
            RuleOutcome::Error(format!("rule did not evaluate to a bool but to {other:?}"))
        }
        Err(e) => RuleOutcome::Error(e.to_string()),
    }
}

fn eval_string(expr: &str, selfv: &Value, old: Option<&Value>) -> Option<String> {
    let env = cel_env();
    let program = env.compile(expr).ok()?;
    let mut ctx = k8s_context(env);
    ctx.add_variable_from_value("self", json_to_cel(selfv));
    if let Some(o) = old {
        ctx.add_variable_from_value("oldSelf", json_to_cel(o));
    }
    match program.execute(&ctx).ok()? {
        cel::Value::String(s) if !s.trim().is_empty() && !s.contains('\n') => Some(s.to_string()),
        _ => None,
    }
}

fn references_old_self(rule: &str) -> bool {
    match cel_env().compile(rule) {
        Ok(p) => p.references().has_variable("oldSelf"),
        Err(_) => rule.contains("oldSelf"),
    }
}

fn cel_node(
    v: &Value,
    old: Option<&Value>,
    schema: &Value,
    path: &str,
    errors: &mut Vec<FieldError>,
) {
    if let Some(rules) = schema
        .get("x-kubernetes-validations")
        .and_then(Value::as_array)
    {
        for r in rules {
            let Some(rule) = r.get("rule").and_then(Value::as_str) else {
                continue;
            };
            let transition = references_old_self(rule);
            let optional_old = r.get("optionalOldSelf").and_then(Value::as_bool) == Some(true);
            if transition && old.is_none() && !optional_old {
                continue;
            }
            let fpath = match r.get("fieldPath").and_then(Value::as_str) {
                Some(fp) if !fp.is_empty() => {
                    let fp = fp.trim_start_matches('.');
                    if fp.starts_with('[') {
                        format!("{path}{fp}")
                    } else {
                        join(path, fp)
                    }
                }
                _ => path.to_string(),
            };
            match run_rule(rule, v, if transition { old } else { None }) {
                RuleOutcome::Pass => {}
                RuleOutcome::Fail => {
                    let msg = r
                        .get("messageExpression")
                        .and_then(Value::as_str)
                        .and_then(|e| eval_string(e, v, old))
                        .or_else(|| r.get("message").and_then(Value::as_str).map(str::to_string))
                        .unwrap_or_else(|| format!("failed rule: {}", rule.trim()));
                    let reason = r
                        .get("reason")
                        .and_then(Value::as_str)
                        .unwrap_or("FieldValueInvalid");
                    let err = match reason {
                        "FieldValueRequired" => FieldError::required(&fpath, msg),
                        "FieldValueForbidden" => FieldError::forbidden(&fpath, msg),
                        "FieldValueDuplicate" => FieldError::new(
                            FieldErrorType::Duplicate,
                            &fpath,
                            Some(Value::String(schema_type_name(schema, v))),
                            msg,
                        ),
                        _ => FieldError::invalid(
                            &fpath,
                            Value::String(schema_type_name(schema, v)),
                            msg,
                        ),
                    };
                    errors.push(err);
                }
                RuleOutcome::Error(e) => errors.push(FieldError::invalid(
                    &fpath,
                    Value::String(schema_type_name(schema, v)),
                    // The apiserver's text: "<error> evaluating rule: <message or rule>".
                    format!(
                        "{e} evaluating rule: {}",
                        r.get("message")
                            .and_then(Value::as_str)
                            .map(str::trim)
                            .filter(|m| !m.is_empty())
                            .unwrap_or(rule.trim())
                    ),
                )),
            }
        }
    }
    match v {
        Value::Object(map) => {
            let props = schema.get("properties").and_then(Value::as_object);
            let additional = schema.get("additionalProperties").filter(|a| a.is_object());
            for (k, child) in map {
                let cs = props.and_then(|p| p.get(k));
                let old_child = old.and_then(|o| o.get(k));
                if let Some(cs) = cs {
                    if path.is_empty() && (k == "apiVersion" || k == "kind") {
                        continue;
                    }
                    cel_node(child, old_child, cs, &join(path, k), errors);
                } else if let Some(a) = additional {
                    cel_node(child, old_child, a, &format!("{path}[{k}]"), errors);
                }
            }
        }
        Value::Array(items) => {
            if let Some(is) = schema.get("items") {
                // Items are correlated with the old list only for `x-kubernetes-list-type: map`.
                let keys: Option<Vec<&str>> =
                    (schema.get("x-kubernetes-list-type").and_then(Value::as_str) == Some("map"))
                        .then(|| {
                            schema
                                .get("x-kubernetes-list-map-keys")
                                .and_then(Value::as_array)
                                .map(|ks| ks.iter().filter_map(Value::as_str).collect())
                        })
                        .flatten();
                for (i, it) in items.iter().enumerate() {
                    let old_it = keys.as_ref().and_then(|ks| {
                        old.and_then(Value::as_array).and_then(|olds| {
                            olds.iter()
                                .find(|o| ks.iter().all(|k| o.get(k) == it.get(k)))
                        })
                    });
                    cel_node(it, old_it, is, &format!("{path}[{i}]"), errors);
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

    fn crd(schema: Value) -> Value {
        json!({"spec": {"versions": [{"name": "v1", "served": true, "storage": true,
            "schema": {"openAPIV3Schema": schema}}]}})
    }

    #[test]
    fn enum_error_matches_apiserver_text() {
        let c = crd(
            json!({"type": "object", "properties": {"spec": {"type": "object",
            "properties": {"mode": {"type": "string", "enum": ["test", "live"]}}}}}),
        );
        let errs = validate(&c, "v1", &json!({"spec": {"mode": "prod"}}), None).unwrap_err();
        assert_eq!(
            errs[0].to_string(),
            r#"spec.mode: Unsupported value: "prod": supported values: "test", "live""#
        );
    }

    #[test]
    fn prunes_unknown_fields_and_applies_defaults() {
        let c = crd(
            json!({"type": "object", "properties": {"spec": {"type": "object",
            "properties": {"a": {"type": "string", "default": "x"},
                           "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}}}}}),
        );
        let out = validate(
            &c,
            "v1",
            &json!({"apiVersion": "g/v1", "kind": "K", "metadata": {"name": "n"},
                     "spec": {"junk": 1, "free": {"any": {"thing": 1}}}, "other": 2}),
            None,
        )
        .unwrap();
        assert_eq!(
            out["spec"],
            json!({"a": "x", "free": {"any": {"thing": 1}}})
        );
        assert!(out.get("other").is_none());
        assert_eq!(out["metadata"]["name"], "n");
    }

    #[test]
    fn cel_rule_that_cannot_be_evaluated_is_an_error_not_valid() {
        let c = crd(
            json!({"type": "object", "properties": {"spec": {"type": "object",
            "x-kubernetes-validations": [{"rule": "noSuchFunction(self)"}]}}}),
        );
        let errs = validate(&c, "v1", &json!({"spec": {}}), None).unwrap_err();
        assert!(
            errs[0]
                .to_string()
                .contains("evaluating rule: noSuchFunction(self)"),
            "{}",
            errs[0]
        );
    }

    #[test]
    fn kubernetes_url_library_subset_is_available() {
        let c = crd(
            json!({"type": "object", "properties": {"spec": {"type": "object", "properties": {
            "u": {"type": "string", "x-kubernetes-validations": [
                {"rule": "isURL(self) && url(self).getScheme() == 'https'", "message": "must be an https URL"},
                {"rule": "!isURL(self) || url(self).getHostname() != 'localhost'", "message": "no localhost"}]}}}}}),
        );
        let ok = validate(
            &c,
            "v1",
            &json!({"spec": {"u": "https://hooks.example.com:8443/x?a=1"}}),
            None,
        );
        assert!(ok.is_ok(), "{ok:?}");
        let errs = validate(
            &c,
            "v1",
            &json!({"spec": {"u": "http://hooks.example.com/x"}}),
            None,
        )
        .unwrap_err();
        assert_eq!(
            errs[0].to_string(),
            r#"spec.u: Invalid value: "string": must be an https URL"#
        );
        let errs = validate(&c, "v1", &json!({"spec": {"u": "not a url"}}), None).unwrap_err();
        assert_eq!(errs.len(), 1, "{errs:?}");
        let errs = validate(
            &c,
            "v1",
            &json!({"spec": {"u": "https://localhost/"}}),
            None,
        )
        .unwrap_err();
        assert_eq!(errs[0].detail, "no localhost");
    }

    #[test]
    fn format_invalid_brackets_several_errors() {
        let e1 = FieldError::required("spec.a", "");
        let e2 = FieldError::required("spec.b", "");
        assert_eq!(
            format_invalid("K", "g.io", "x", std::slice::from_ref(&e1)),
            r#"K.g.io "x" is invalid: spec.a: Required value"#
        );
        assert_eq!(
            format_invalid("Secret", "", "x", &[e1, e2]),
            r#"Secret "x" is invalid: [spec.a: Required value, spec.b: Required value]"#
        );
    }
}
