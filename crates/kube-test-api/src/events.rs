//! Two views of one set of Events: `v1` (core, `kubectl get events`) and `events.k8s.io/v1`
//! (what kube's `Recorder` writes), as the apiserver serves them. Objects are stored in the core
//! shape; requests to `/apis/events.k8s.io/v1/...` are rewritten to the core path, their bodies
//! converted on the way in and the answers (objects, lists, watch events) on the way out.

use serde_json::{Map, Value};

/// Field renames between `events.k8s.io/v1` (left) and core `v1` (right); every other field has
/// the same name in both (`eventTime`, `series`, `action`, `reason`, `related`, `type`,
/// `reportingInstance`, `metadata`).
const RENAMES: &[(&str, &str)] = &[
    ("regarding", "involvedObject"),
    ("note", "message"),
    ("reportingController", "reportingComponent"),
    ("deprecatedSource", "source"),
    ("deprecatedFirstTimestamp", "firstTimestamp"),
    ("deprecatedLastTimestamp", "lastTimestamp"),
    ("deprecatedCount", "count"),
];

/// The `events.k8s.io/v1` API version.
pub(crate) const EVENTS_V1: &str = "events.k8s.io/v1";

/// Whether `apiVersion` + `kind` name the `events.k8s.io/v1` view.
pub(crate) fn is_events_v1(api_version: &str, kind: &str) -> bool {
    api_version == EVENTS_V1 && kind == "Event"
}

fn rename(obj: &mut Map<String, Value>, to_core: bool) {
    for (ev, core) in RENAMES {
        let (from, to) = if to_core { (ev, core) } else { (core, ev) };
        if let Some(v) = obj.remove(*from) {
            obj.insert((*to).to_string(), v);
        }
    }
}

/// An `events.k8s.io/v1` Event (or merge/apply patch of one) in the core `v1` shape.
pub(crate) fn to_core(mut v: Value) -> Value {
    if let Some(obj) = v.as_object_mut() {
        rename(obj, true);
        if obj.contains_key("apiVersion") {
            obj.insert("apiVersion".into(), "v1".into());
        }
    }
    v
}

/// A core `v1` Event in the `events.k8s.io/v1` shape.
pub(crate) fn to_events_v1(mut v: Value) -> Value {
    if let Some(obj) = v.as_object_mut() {
        rename(obj, false);
        obj.insert("apiVersion".into(), EVENTS_V1.into());
    }
    v
}

/// Rewrites a JSON patch's paths (`/note` becomes `/message`).
pub(crate) fn json_patch_to_core(mut patch: Value) -> Value {
    fn fix(path: &mut Value) {
        let Some(p) = path.as_str() else { return };
        let mut segs = p.splitn(3, '/');
        let (_, first, rest) = (segs.next(), segs.next(), segs.next());
        if let Some(first) = first
            && let Some((_, core)) = RENAMES.iter().find(|(ev, _)| *ev == first)
        {
            *path = match rest {
                Some(r) => format!("/{core}/{r}"),
                None => format!("/{core}"),
            }
            .into();
        }
    }
    for op in patch.as_array_mut().into_iter().flatten() {
        if let Some(o) = op.as_object_mut() {
            for key in ["path", "from"] {
                if let Some(p) = o.get_mut(key) {
                    fix(p);
                }
            }
        }
    }
    patch
}

/// Field selectors name fields of the view (`regarding.name`); the store has core fields.
pub(crate) fn field_selector_to_core(selector: &str) -> String {
    selector
        .split(',')
        .map(|req| {
            RENAMES
                .iter()
                .find_map(|(ev, core)| {
                    req.strip_prefix(ev)
                        .filter(|rest| rest.starts_with(['.', '=', '!']))
                        .map(|rest| format!("{core}{rest}"))
                })
                .unwrap_or_else(|| req.to_string())
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Converts an answer of the core endpoint for a client of the `events.k8s.io/v1` view: an
/// Event, an EventList, or a watch event carrying an Event. Anything else (Status, Table,
/// metadata-only objects) is the same in both views.
pub(crate) fn answer_to_events_v1(mut v: Value) -> Value {
    match v.get("kind").and_then(Value::as_str) {
        Some("Event") => return to_events_v1(v),
        Some("Table") => {
            // `includeObject=Object` rows carry whole Events.
            for row in v
                .get_mut("rows")
                .and_then(Value::as_array_mut)
                .into_iter()
                .flatten()
            {
                if let Some(obj) = row.get_mut("object")
                    && obj.get("kind").and_then(Value::as_str) == Some("Event")
                {
                    *obj = to_events_v1(std::mem::take(obj));
                }
            }
            return v;
        }
        Some("EventList") => {
            v["apiVersion"] = EVENTS_V1.into();
            if let Some(items) = v.get_mut("items").and_then(Value::as_array_mut) {
                for it in items.iter_mut() {
                    *it = to_events_v1(std::mem::take(it));
                }
            }
            return v;
        }
        _ => {}
    }
    if v.get("type").is_some()
        && let Some(obj) = v.get_mut("object")
        && obj.get("kind").and_then(Value::as_str) == Some("Event")
    {
        *obj = to_events_v1(std::mem::take(obj));
    }
    v
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Serves a request to `/apis/events.k8s.io/v1/...` from the core Events: `None` when `uri` is
/// not such a request.
pub(crate) async fn serve_view(
    shared: std::sync::Arc<crate::server::Shared>,
    method: axum::http::Method,
    uri: &axum::http::Uri,
    headers: axum::http::HeaderMap,
    body: bytes::Bytes,
) -> Option<axum::response::Response> {
    use axum::http::header;
    use futures::StreamExt;

    let path = uri.path();
    let rest = path.strip_prefix("/apis/events.k8s.io/v1/")?;
    let is_events = rest == "events"
        || rest.starts_with("events/")
        || rest
            .strip_prefix("namespaces/")
            .and_then(|r| r.split_once('/'))
            .is_some_and(|(_, r)| r == "events" || r.starts_with("events/"));
    if !is_events {
        return None;
    }
    let query = uri.query().map(|q| {
        q.split('&')
            .map(|pair| match pair.split_once('=') {
                Some(("fieldSelector", v)) => {
                    let decoded = crate::server::percent_decode(v);
                    format!(
                        "fieldSelector={}",
                        percent_encode(&field_selector_to_core(&decoded))
                    )
                }
                _ => pair.to_string(),
            })
            .collect::<Vec<_>>()
            .join("&")
    });
    let core_uri: axum::http::Uri = match query {
        Some(q) => format!("/api/v1/{rest}?{q}"),
        None => format!("/api/v1/{rest}"),
    }
    .parse()
    .ok()?;
    let ctype = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_string();
    let mut headers = headers;
    let body = if body.is_empty() {
        body
    } else {
        let parsed: Option<Value> = serde_json::from_slice(&body)
            .ok()
            .or_else(|| serde_yaml::from_slice(&body).ok());
        match parsed {
            Some(v) => {
                let v = if ctype == "application/json-patch+json" {
                    json_patch_to_core(v)
                } else {
                    to_core(v)
                };
                if ctype == "application/yaml" {
                    headers.insert(
                        header::CONTENT_TYPE,
                        header::HeaderValue::from_static("application/json"),
                    );
                }
                bytes::Bytes::from(serde_json::to_vec(&v).unwrap_or_default())
            }
            None => body,
        }
    };
    let watch = uri
        .query()
        .is_some_and(|q| q.split('&').any(|p| p == "watch=true" || p == "watch=1"));
    // Authorization (and so the request log) sees the group the client asked for.
    let mut headers = headers;
    headers.insert(
        crate::server::VIEW_GROUP_HEADER,
        header::HeaderValue::from_static("events.k8s.io"),
    );
    let resp = crate::server::handle_inner(shared, method, core_uri, headers, body).await;
    let (mut parts, body) = resp.into_parts();
    parts.headers.remove(header::CONTENT_LENGTH);
    let convert = move |chunk: &[u8]| -> bytes::Bytes {
        let mut out = Vec::new();
        for line in chunk.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            match serde_json::from_slice::<Value>(line) {
                Ok(v) => {
                    out.extend(serde_json::to_vec(&answer_to_events_v1(v)).unwrap_or_default())
                }
                Err(_) => out.extend_from_slice(line),
            }
            if watch {
                out.push(b'\n');
            }
        }
        bytes::Bytes::from(out)
    };
    let body = if watch {
        axum::body::Body::from_stream(
            body.into_data_stream()
                .map(move |chunk| chunk.map(|c| convert(&c))),
        )
    } else {
        let bytes = axum::body::to_bytes(body, usize::MAX)
            .await
            .unwrap_or_default();
        axum::body::Body::from(convert(&bytes))
    };
    Some(axum::response::Response::from_parts(parts, body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn fields_rename_both_ways_and_round_trip() {
        let ev = json!({"apiVersion": "events.k8s.io/v1", "kind": "Event",
            "metadata": {"name": "e1", "namespace": "shop"},
            "regarding": {"kind": "StripeKeyPolicy", "name": "checkout"},
            "note": "key minted", "reason": "KeyMinted", "type": "Normal",
            "reportingController": "stripe-key-operator", "reportingInstance": "pod-a",
            "eventTime": "2026-01-01T00:00:00.000000Z", "action": "Mint",
            "series": {"count": 2, "lastObservedTime": "2026-01-01T00:01:00.000000Z"}});
        let core = to_core(ev.clone());
        assert_eq!(core["apiVersion"], "v1");
        assert_eq!(core["involvedObject"]["name"], "checkout");
        assert_eq!(core["message"], "key minted");
        assert_eq!(core["reportingComponent"], "stripe-key-operator");
        assert!(core.get("note").is_none() && core.get("regarding").is_none());
        assert_eq!(to_events_v1(core), ev);
    }

    #[test]
    fn table_rows_with_whole_objects_are_converted_too() {
        let table = json!({"kind": "Table", "apiVersion": "meta.k8s.io/v1", "rows": [
            {"cells": ["1m"], "object": {"apiVersion": "v1", "kind": "Event", "message": "m"}},
            {"cells": ["2m"], "object": {"kind": "PartialObjectMetadata", "metadata": {}}}]});
        let out = answer_to_events_v1(table);
        assert_eq!(out["rows"][0]["object"]["note"], "m");
        assert_eq!(out["rows"][0]["object"]["apiVersion"], "events.k8s.io/v1");
        assert_eq!(out["rows"][1]["object"]["kind"], "PartialObjectMetadata");
    }

    #[test]
    fn patches_and_selectors_name_core_fields() {
        let p = json_patch_to_core(json!([{"op": "replace", "path": "/note", "value": "x"},
            {"op": "replace", "path": "/series/count", "value": 3},
            {"op": "copy", "from": "/regarding/name", "path": "/reason"}]));
        assert_eq!(p[0]["path"], "/message");
        assert_eq!(p[1]["path"], "/series/count");
        assert_eq!(p[2]["from"], "/involvedObject/name");
        assert_eq!(
            field_selector_to_core("regarding.name=checkout,type!=Normal,noteworthy=1"),
            "involvedObject.name=checkout,type!=Normal,noteworthy=1"
        );
    }
}
