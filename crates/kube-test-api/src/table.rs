//! `Table` answers (`Accept: application/json;as=Table;v=v1;g=meta.k8s.io`), which `kubectl get`
//! asks for: the CRDs' `additionalPrinterColumns` (simple JSONPath) and the columns the
//! apiserver prints for the built-in kinds served here.

use axum::http::{HeaderMap, header};
use serde_json::{Value, json};

use crate::store::ResourceType;

/// What each row carries besides its cells (`includeObject`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Include {
    None,
    Metadata,
    Object,
}

/// The `includeObject` wanted when the client asks for a Table, else `None`.
pub(crate) fn requested(
    headers: &HeaderMap,
    query: &std::collections::HashMap<String, String>,
) -> Option<Include> {
    let accept = headers.get(header::ACCEPT)?.to_str().ok()?;
    let wants = accept.split(',').any(|media| {
        let params: Vec<&str> = media.split(';').map(str::trim).collect();
        params.contains(&"as=Table")
            && params.contains(&"g=meta.k8s.io")
            && (params.contains(&"v=v1") || params.contains(&"v=v1beta1"))
    });
    if !wants {
        return None;
    }
    Some(match query.get("includeObject").map(String::as_str) {
        Some("None") => Include::None,
        Some("Object") => Include::Object,
        _ => Include::Metadata,
    })
}

/// A column: name, type, format, priority (1 = only with `-o wide`), description.
struct Column {
    name: String,
    type_: String,
    format: String,
    priority: i64,
    description: String,
}

impl Column {
    fn new(name: &str, type_: &str, priority: i64) -> Self {
        Self {
            name: name.into(),
            type_: type_.into(),
            format: String::new(),
            priority,
            description: String::new(),
        }
    }

    fn name_column() -> Self {
        Self {
            format: "name".into(),
            description: "Name must be unique within a namespace. Is required when creating resources, although some resources may allow a client to request the generation of an appropriate name automatically. Name is primarily intended for creation idempotence and configuration definition. Cannot be updated. More info: https://kubernetes.io/docs/concepts/overview/working-with-objects/names#names".into(),
            ..Self::new("Name", "string", 0)
        }
    }

    fn to_json(&self) -> Value {
        json!({"name": self.name, "type": self.type_, "format": self.format,
               "description": self.description, "priority": self.priority})
    }
}

/// The Table of `objects` (stored objects of `rt`), rendered for `version`.
pub(crate) fn table(
    rt: &ResourceType,
    version: &str,
    objects: &[&Value],
    include: Include,
    list_metadata: Value,
    now: chrono::DateTime<chrono::Utc>,
) -> Value {
    let (columns, cells): (Vec<Column>, Cells) = match &rt.crd {
        Some(crd) => crd_columns(crd, version, now),
        None => builtin_columns(&rt.kind, now),
    };
    let rows: Vec<Value> = objects
        .iter()
        .map(|o| {
            let mut row = json!({"cells": cells(o)});
            match include {
                Include::None => {}
                Include::Metadata => {
                    row["object"] = json!({
                        "kind": "PartialObjectMetadata",
                        "apiVersion": "meta.k8s.io/v1",
                        "metadata": o.get("metadata").cloned().unwrap_or(json!({})),
                    });
                }
                Include::Object => {
                    let mut full = (*o).clone();
                    full["apiVersion"] = rt.api_version(version).into();
                    full["kind"] = rt.kind.clone().into();
                    row["object"] = full;
                }
            }
            row
        })
        .collect();
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": list_metadata,
        "columnDefinitions": columns.iter().map(Column::to_json).collect::<Vec<_>>(),
        "rows": rows,
    })
}

type Cells = Box<dyn Fn(&Value) -> Vec<Value>>;

fn crd_columns(
    crd: &Value,
    version: &str,
    now: chrono::DateTime<chrono::Utc>,
) -> (Vec<Column>, Cells) {
    let specified = crd
        .pointer("/spec/versions")
        .and_then(Value::as_array)
        .and_then(|vs| vs.iter().find(|v| v["name"] == version))
        .and_then(|v| v.get("additionalPrinterColumns"))
        .and_then(Value::as_array)
        .cloned();
    // Without printer columns the apiserver shows the age.
    let defs = specified.unwrap_or_else(|| {
        vec![json!({"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"})]
    });
    let mut columns = vec![Column::name_column()];
    let mut paths = Vec::new();
    for d in &defs {
        let s = |k: &str| d.get(k).and_then(Value::as_str).unwrap_or_default();
        columns.push(Column {
            name: s("name").into(),
            type_: s("type").into(),
            format: s("format").into(),
            priority: d.get("priority").and_then(Value::as_i64).unwrap_or(0),
            description: s("description").into(),
        });
        paths.push((parse_json_path(s("jsonPath")), s("type").to_string()));
    }
    let cells = move |o: &Value| {
        let mut out = vec![name(o)];
        for (path, type_) in &paths {
            let value = path
                .as_ref()
                .and_then(|p| eval_json_path(p, o).into_iter().next());
            out.push(match value {
                None => Value::Null,
                Some(v) => crd_cell(type_, v, now),
            });
        }
        out
    };
    (columns, Box::new(cells))
}

/// A CRD column cell as the apiextensions apiserver renders it.
fn crd_cell(type_: &str, v: &Value, now: chrono::DateTime<chrono::Utc>) -> Value {
    match type_ {
        "string" => match v {
            Value::String(s) => s.clone().into(),
            other => other.to_string().into(),
        },
        "integer" => v.as_i64().map(Value::from).unwrap_or(Value::Null),
        "number" => v.as_f64().map(Value::from).unwrap_or(Value::Null),
        "boolean" => v.as_bool().map(Value::from).unwrap_or(Value::Null),
        "date" => match v.as_str() {
            Some(s) => age(Some(s), now).into(),
            None => Value::Null,
        },
        _ => v.clone(),
    }
}

fn name(o: &Value) -> Value {
    o.pointer("/metadata/name").cloned().unwrap_or(Value::Null)
}

fn str_at<'a>(o: &'a Value, pointer: &str) -> &'a str {
    o.pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_default()
}

fn int_at(o: &Value, pointer: &str) -> i64 {
    o.pointer(pointer).and_then(Value::as_i64).unwrap_or(0)
}

fn count_at(o: &Value, pointer: &str) -> usize {
    match o.pointer(pointer) {
        Some(Value::Object(m)) => m.len(),
        Some(Value::Array(a)) => a.len(),
        _ => 0,
    }
}

/// The time since `rfc3339` as the apiserver prints ages (`5m`, `3d4h`, `<invalid>` for the
/// future), `<unknown>` when absent.
pub(crate) fn age(rfc3339: Option<&str>, now: chrono::DateTime<chrono::Utc>) -> String {
    match rfc3339.filter(|s| !s.is_empty()) {
        None => "<unknown>".into(),
        Some(s) => match chrono::DateTime::parse_from_rfc3339(s) {
            Ok(t) => human_duration(now.signed_duration_since(t)),
            Err(_) => "<invalid>".into(),
        },
    }
}

/// Kubernetes' `duration.HumanDuration`.
pub(crate) fn human_duration(d: chrono::TimeDelta) -> String {
    let seconds = d.num_seconds();
    if seconds < -1 {
        return "<invalid>".into();
    }
    if seconds < 0 {
        return "0s".into();
    }
    if seconds < 60 * 2 {
        return format!("{seconds}s");
    }
    let minutes = seconds / 60;
    if minutes < 10 {
        let s = seconds % 60;
        return if s == 0 {
            format!("{minutes}m")
        } else {
            format!("{minutes}m{s}s")
        };
    }
    if minutes < 60 * 3 {
        return format!("{minutes}m");
    }
    let hours = minutes / 60;
    if hours < 8 {
        let m = minutes % 60;
        return if m == 0 {
            format!("{hours}h")
        } else {
            format!("{hours}h{m}m")
        };
    }
    if hours < 48 {
        return format!("{hours}h");
    }
    if hours < 24 * 8 {
        let h = hours % 24;
        return if h == 0 {
            format!("{}d", hours / 24)
        } else {
            format!("{}d{h}h", hours / 24)
        };
    }
    if hours < 24 * 365 * 2 {
        return format!("{}d", hours / 24);
    }
    if hours < 24 * 365 * 8 {
        let dy = (hours / 24) % 365;
        return if dy == 0 {
            format!("{}y", hours / 24 / 365)
        } else {
            format!("{}y{dy}d", hours / 24 / 365)
        };
    }
    format!("{}y", hours / 24 / 365)
}

fn joined(o: &Value, list: &str, field: &str) -> Value {
    let items: Vec<&str> = o
        .pointer(list)
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(|c| c[field].as_str()).collect())
        .unwrap_or_default();
    items.join(",").into()
}

fn labels(o: &Value, pointer: &str) -> Value {
    match o.pointer(pointer).and_then(Value::as_object) {
        Some(m) if !m.is_empty() => m
            .iter()
            .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
            .collect::<Vec<_>>()
            .join(",")
            .into(),
        _ => "<none>".into(),
    }
}

fn builtin_columns(kind: &str, now: chrono::DateTime<chrono::Utc>) -> (Vec<Column>, Cells) {
    let age_of = move |o: &Value| -> Value {
        age(
            o.pointer("/metadata/creationTimestamp")
                .and_then(Value::as_str),
            now,
        )
        .into()
    };
    let c = Column::new;
    let n = Column::name_column;
    let containers = "/spec/template/spec/containers";
    match kind {
        "Deployment" => (
            vec![
                n(),
                c("Ready", "string", 0),
                c("Up-to-date", "integer", 0),
                c("Available", "integer", 0),
                c("Age", "string", 0),
                c("Containers", "string", 1),
                c("Images", "string", 1),
                c("Selector", "string", 1),
            ],
            Box::new(move |o: &Value| {
                vec![
                    name(o),
                    format!(
                        "{}/{}",
                        int_at(o, "/status/readyReplicas"),
                        o.pointer("/spec/replicas").and_then(Value::as_i64).unwrap_or(1)
                    )
                    .into(),
                    int_at(o, "/status/updatedReplicas").into(),
                    int_at(o, "/status/availableReplicas").into(),
                    age_of(o),
                    joined(o, containers, "name"),
                    joined(o, containers, "image"),
                    labels(o, "/spec/selector/matchLabels"),
                ]
            }),
        ),
        "StatefulSet" => (
            vec![
                n(),
                c("Ready", "string", 0),
                c("Age", "string", 0),
                c("Containers", "string", 1),
                c("Images", "string", 1),
            ],
            Box::new(move |o: &Value| {
                vec![
                    name(o),
                    format!(
                        "{}/{}",
                        int_at(o, "/status/readyReplicas"),
                        o.pointer("/spec/replicas").and_then(Value::as_i64).unwrap_or(1)
                    )
                    .into(),
                    age_of(o),
                    joined(o, containers, "name"),
                    joined(o, containers, "image"),
                ]
            }),
        ),
        "DaemonSet" => (
            vec![
                n(),
                c("Desired", "integer", 0),
                c("Current", "integer", 0),
                c("Ready", "integer", 0),
                c("Up-to-date", "integer", 0),
                c("Available", "integer", 0),
                c("Node Selector", "string", 0),
                c("Age", "string", 0),
                c("Containers", "string", 1),
                c("Images", "string", 1),
                c("Selector", "string", 1),
            ],
            Box::new(move |o: &Value| {
                vec![
                    name(o),
                    int_at(o, "/status/desiredNumberScheduled").into(),
                    int_at(o, "/status/currentNumberScheduled").into(),
                    int_at(o, "/status/numberReady").into(),
                    int_at(o, "/status/updatedNumberScheduled").into(),
                    int_at(o, "/status/numberAvailable").into(),
                    labels(o, "/spec/template/spec/nodeSelector"),
                    age_of(o),
                    joined(o, containers, "name"),
                    joined(o, containers, "image"),
                    labels(o, "/spec/selector/matchLabels"),
                ]
            }),
        ),
        "Secret" => (
            vec![
                n(),
                c("Type", "string", 0),
                c("Data", "string", 0),
                c("Age", "string", 0),
            ],
            Box::new(move |o: &Value| {
                vec![
                    name(o),
                    str_at(o, "/type").into(),
                    (count_at(o, "/data") as i64).into(),
                    age_of(o),
                ]
            }),
        ),
        "ConfigMap" => (
            vec![n(), c("Data", "string", 0), c("Age", "string", 0)],
            Box::new(move |o: &Value| {
                vec![
                    name(o),
                    ((count_at(o, "/data") + count_at(o, "/binaryData")) as i64).into(),
                    age_of(o),
                ]
            }),
        ),
        "Namespace" => (
            vec![n(), c("Status", "string", 0), c("Age", "string", 0)],
            Box::new(move |o: &Value| vec![name(o), str_at(o, "/status/phase").into(), age_of(o)]),
        ),
        "ServiceAccount" => (
            vec![n(), c("Secrets", "string", 0), c("Age", "string", 0)],
            Box::new(move |o: &Value| {
                vec![name(o), (count_at(o, "/secrets") as i64).into(), age_of(o)]
            }),
        ),
        "Pod" => (
            vec![
                n(),
                c("Ready", "string", 0),
                c("Status", "string", 0),
                c("Restarts", "string", 0),
                c("Age", "string", 0),
                c("IP", "string", 1),
                c("Node", "string", 1),
            ],
            Box::new(move |o: &Value| {
                let ready = o
                    .pointer("/status/containerStatuses")
                    .and_then(Value::as_array)
                    .map(|a| a.iter().filter(|s| s["ready"] == true).count())
                    .unwrap_or(0);
                let phase = match str_at(o, "/status/phase") {
                    "" => "Pending",
                    p => p,
                };
                let or_none = |p: &str| match str_at(o, p) {
                    "" => "<none>".to_string(),
                    v => v.to_string(),
                };
                vec![
                    name(o),
                    format!("{ready}/{}", count_at(o, "/spec/containers")).into(),
                    phase.into(),
                    0.into(),
                    age_of(o),
                    or_none("/status/podIP").into(),
                    or_none("/spec/nodeName").into(),
                ]
            }),
        ),
        "Lease" => (
            vec![n(), c("Holder", "string", 0), c("Age", "string", 0)],
            Box::new(move |o: &Value| {
                vec![name(o), str_at(o, "/spec/holderIdentity").into(), age_of(o)]
            }),
        ),
        "ValidatingWebhookConfiguration" => (
            vec![n(), c("Webhooks", "integer", 0), c("Age", "string", 0)],
            Box::new(move |o: &Value| {
                vec![name(o), (count_at(o, "/webhooks") as i64).into(), age_of(o)]
            }),
        ),
        "Event" => (
            vec![
                c("Last Seen", "string", 0),
                c("Type", "string", 0),
                c("Reason", "string", 0),
                c("Object", "string", 0),
                c("Subobject", "string", 1),
                c("Source", "string", 1),
                c("Message", "string", 0),
                c("First Seen", "string", 1),
                c("Count", "string", 1),
                Column {
                    priority: 1,
                    ..n()
                },
            ],
            Box::new(move |o: &Value| event_cells(o, now)),
        ),
        // The apiserver's default: name and creation time.
        _ => (
            vec![
                n(),
                Column {
                    description: "CreationTimestamp is a timestamp representing the server time when this object was created.".into(),
                    ..c("Created At", "date", 0)
                },
            ],
            Box::new(move |o: &Value| {
                vec![
                    name(o),
                    o.pointer("/metadata/creationTimestamp")
                        .cloned()
                        .unwrap_or(Value::Null),
                ]
            }),
        ),
    }
}

/// A core `v1` Event's cells, as `kubectl get events` shows them.
fn event_cells(o: &Value, now: chrono::DateTime<chrono::Utc>) -> Vec<Value> {
    let first_non_empty = |ps: &[&str]| {
        ps.iter()
            .map(|p| str_at(o, p))
            .find(|s| !s.is_empty())
            .map(str::to_string)
    };
    let last = first_non_empty(&["/series/lastObservedTime", "/lastTimestamp", "/eventTime"]);
    let first = first_non_empty(&["/firstTimestamp", "/eventTime"]);
    let component = first_non_empty(&["/source/component", "/reportingComponent"]);
    let instance = first_non_empty(&["/source/host", "/reportingInstance"]);
    let source = match (component, instance) {
        (None, _) => "<unknown>".to_string(),
        (Some(c), None) => c,
        (Some(c), Some(i)) => format!("{c}, {i}"),
    };
    let count = o
        .pointer("/series/count")
        .and_then(Value::as_i64)
        .or_else(|| o.get("count").and_then(Value::as_i64))
        .unwrap_or(1);
    vec![
        age(last.as_deref(), now).into(),
        str_at(o, "/type").into(),
        str_at(o, "/reason").into(),
        format!(
            "{}/{}",
            str_at(o, "/involvedObject/kind").to_lowercase(),
            str_at(o, "/involvedObject/name")
        )
        .into(),
        str_at(o, "/involvedObject/fieldPath").into(),
        source.into(),
        str_at(o, "/message").trim().into(),
        age(first.as_deref(), now).into(),
        count.into(),
        name(o),
    ]
}

/// A step of the simple JSONPath that printer columns use.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Step {
    Field(String),
    Index(usize),
    All,
    /// `[?(@.a.b=="v")]` (or `!=`).
    Filter(Vec<String>, bool, Value),
}

/// Parses `.a.b[0][*][?(@.type=="Ready")].c`; `None` for anything else.
pub(crate) fn parse_json_path(path: &str) -> Option<Vec<Step>> {
    let p = path.trim();
    let p = p
        .strip_prefix('{')
        .and_then(|s| s.strip_suffix('}'))
        .unwrap_or(p);
    let mut steps = Vec::new();
    let mut rest = p.strip_prefix('$').unwrap_or(p);
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix('.') {
            let end = r.find(['.', '[']).unwrap_or(r.len());
            if end == 0 {
                return None;
            }
            steps.push(Step::Field(r[..end].to_string()));
            rest = &r[end..];
        } else if let Some(r) = rest.strip_prefix('[') {
            let end = r.find(']')?;
            // A filter may contain `]` only inside quotes; printer columns do not.
            let inner = &r[..end];
            rest = &r[end + 1..];
            if inner == "*" {
                steps.push(Step::All);
            } else if let Ok(i) = inner.parse::<usize>() {
                steps.push(Step::Index(i));
            } else if let Some(f) = inner.strip_prefix("?(@.").and_then(|f| f.strip_suffix(')')) {
                let (lhs, rhs, eq) = if let Some((l, r)) = f.split_once("==") {
                    (l, r, true)
                } else {
                    let (l, r) = f.split_once("!=")?;
                    (l, r, false)
                };
                let rhs = rhs.trim();
                let literal = if (rhs.starts_with('"') && rhs.ends_with('"') && rhs.len() >= 2)
                    || (rhs.starts_with('\'') && rhs.ends_with('\'') && rhs.len() >= 2)
                {
                    Value::String(rhs[1..rhs.len() - 1].to_string())
                } else {
                    serde_json::from_str(rhs).ok()?
                };
                steps.push(Step::Filter(
                    lhs.trim().split('.').map(str::to_string).collect(),
                    eq,
                    literal,
                ));
            } else {
                let key = inner.trim_matches(|c| c == '\'' || c == '"');
                steps.push(Step::Field(key.to_string()));
            }
        } else {
            return None;
        }
    }
    Some(steps)
}

/// Every value `steps` selects in `v`, in document order.
pub(crate) fn eval_json_path<'a>(steps: &[Step], v: &'a Value) -> Vec<&'a Value> {
    let mut current = vec![v];
    for step in steps {
        let mut next = Vec::new();
        for c in current {
            match step {
                Step::Field(f) => next.extend(c.get(f)),
                Step::Index(i) => next.extend(c.get(*i)),
                Step::All => match c {
                    Value::Array(a) => next.extend(a.iter()),
                    Value::Object(m) => next.extend(m.values()),
                    _ => {}
                },
                Step::Filter(path, eq, lit) => {
                    for item in c.as_array().into_iter().flatten() {
                        let got = path.iter().try_fold(item, |acc, k| acc.get(k));
                        if got.is_some_and(|g| (g == lit) == *eq) {
                            next.push(item);
                        }
                    }
                }
            }
        }
        current = next;
    }
    current
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_read_like_kubectl_and_the_future_is_invalid() {
        let d = chrono::TimeDelta::seconds;
        assert_eq!(human_duration(d(5)), "5s");
        assert_eq!(human_duration(d(119)), "119s");
        assert_eq!(human_duration(d(150)), "2m30s");
        assert_eq!(human_duration(d(600)), "10m");
        assert_eq!(human_duration(d(3 * 3600 + 60)), "3h1m");
        assert_eq!(human_duration(d(30 * 3600)), "30h");
        assert_eq!(human_duration(d(3 * 86400 + 3600)), "3d1h");
        assert_eq!(human_duration(d(40 * 86400)), "40d");
        assert_eq!(human_duration(d(-1)), "0s");
        assert_eq!(human_duration(d(-3600)), "<invalid>");
    }

    #[test]
    fn printer_column_paths_select_like_the_apiserver() {
        let obj = json!({"status": {"conditions": [
            {"type": "Rotating", "status": "False"},
            {"type": "Ready", "status": "True", "reason": "KeyMinted"}],
            "currentKey": {"id": "apikey_1"}}});
        let p = parse_json_path(".status.conditions[?(@.type==\"Ready\")].status").unwrap();
        assert_eq!(eval_json_path(&p, &obj), [&json!("True")]);
        let p = parse_json_path(".status.currentKey.id").unwrap();
        assert_eq!(eval_json_path(&p, &obj), [&json!("apikey_1")]);
        let p = parse_json_path(".status.conditions[*].type").unwrap();
        assert_eq!(eval_json_path(&p, &obj).len(), 2);
        let p = parse_json_path(".status.conditions[1].reason").unwrap();
        assert_eq!(eval_json_path(&p, &obj), [&json!("KeyMinted")]);
        let p = parse_json_path(".status.nextRotationAt").unwrap();
        assert!(eval_json_path(&p, &obj).is_empty());
        assert!(parse_json_path("status").is_none());
    }
}
