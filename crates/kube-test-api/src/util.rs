//! Selectors, patches and managed-field bookkeeping.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Map, Value};

// ---------------------------------------------------------------------------------------------
// Label selectors
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
pub(crate) enum LabelReq {
    Eq(String, String),
    NotEq(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

/// Splits on commas that are not inside parentheses.
fn split_top(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut depth = 0i32;
    let mut cur = String::new();
    for c in s.chars() {
        match c {
            '(' => {
                depth += 1;
                cur.push(c)
            }
            ')' => {
                depth -= 1;
                cur.push(c)
            }
            ',' if depth == 0 => out.push(std::mem::take(&mut cur)),
            _ => cur.push(c),
        }
    }
    out.push(cur);
    out.into_iter()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

fn set_values(s: &str) -> Result<Vec<String>, String> {
    let s = s.trim();
    let inner = s
        .strip_prefix('(')
        .and_then(|x| x.strip_suffix(')'))
        .ok_or_else(|| format!("found '{s}', expected: '('"))?;
    Ok(inner.split(',').map(|v| v.trim().to_string()).collect())
}

pub(crate) fn parse_label_selector(s: &str) -> Result<Vec<LabelReq>, String> {
    let mut reqs = Vec::new();
    for part in split_top(s) {
        if let Some(k) = part.strip_prefix('!') {
            reqs.push(LabelReq::NotExists(k.trim().to_string()));
        } else if let Some((k, v)) = part.split_once("!=") {
            reqs.push(LabelReq::NotEq(k.trim().into(), v.trim().into()));
        } else if let Some((k, v)) = part.split_once("==") {
            reqs.push(LabelReq::Eq(k.trim().into(), v.trim().into()));
        } else if let Some((k, v)) = part.split_once('=') {
            reqs.push(LabelReq::Eq(k.trim().into(), v.trim().into()));
        } else if let Some(idx) = part.find(" notin ") {
            reqs.push(LabelReq::NotIn(
                part[..idx].trim().into(),
                set_values(&part[idx + 7..])?,
            ));
        } else if let Some(idx) = part.find(" in ") {
            reqs.push(LabelReq::In(
                part[..idx].trim().into(),
                set_values(&part[idx + 4..])?,
            ));
        } else if part.contains(' ') || part.contains('(') {
            return Err(format!("unable to parse requirement: {part}"));
        } else {
            reqs.push(LabelReq::Exists(part));
        }
    }
    Ok(reqs)
}

pub(crate) fn labels_match(reqs: &[LabelReq], obj: &Value) -> bool {
    let labels = obj.pointer("/metadata/labels").and_then(Value::as_object);
    let get = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
    reqs.iter().all(|r| match r {
        LabelReq::Eq(k, v) => get(k) == Some(v.as_str()),
        LabelReq::NotEq(k, v) => get(k) != Some(v.as_str()),
        LabelReq::In(k, vs) => get(k).is_some_and(|x| vs.iter().any(|v| v == x)),
        LabelReq::NotIn(k, vs) => get(k).is_none_or(|x| vs.iter().all(|v| v != x)),
        LabelReq::Exists(k) => get(k).is_some(),
        LabelReq::NotExists(k) => get(k).is_none(),
    })
}

// ---------------------------------------------------------------------------------------------
// Field selectors
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
pub(crate) struct FieldReq {
    path: String,
    value: String,
    negate: bool,
}

pub(crate) fn parse_field_selector(s: &str) -> Result<Vec<FieldReq>, String> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (path, value, negate) = if let Some((k, v)) = part.split_once("!=") {
            (k, v, true)
        } else if let Some((k, v)) = part.split_once("==") {
            (k, v, false)
        } else if let Some((k, v)) = part.split_once('=') {
            (k, v, false)
        } else {
            return Err(format!(
                "invalid selector: '{part}'; can't understand '{part}'"
            ));
        };
        let path = path.trim();
        if path.is_empty() || !path.chars().all(|c| c.is_ascii_alphanumeric() || c == '.') {
            return Err(format!("field label not supported: {path}"));
        }
        out.push(FieldReq {
            path: path.to_string(),
            value: value.trim().to_string(),
            negate,
        });
    }
    Ok(out)
}

pub(crate) fn fields_match(reqs: &[FieldReq], obj: &Value) -> bool {
    reqs.iter().all(|r| {
        let mut cur = Some(obj);
        for seg in r.path.split('.') {
            cur = cur.and_then(|c| c.get(seg));
        }
        let actual = match cur {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Null) | None => String::new(),
            Some(other) => other.to_string(),
        };
        (actual == r.value) != r.negate
    })
}

// ---------------------------------------------------------------------------------------------
// Patches
// ---------------------------------------------------------------------------------------------

/// RFC 7386 JSON merge patch.
pub(crate) fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(pm) => {
            if !target.is_object() {
                *target = Value::Object(Map::new());
            }
            let tm = target.as_object_mut().expect("object");
            for (k, v) in pm {
                if v.is_null() {
                    tm.remove(k);
                } else {
                    merge_patch(tm.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        other => *target = other.clone(),
    }
}

fn unescape(tok: &str) -> String {
    tok.replace("~1", "/").replace("~0", "~")
}

fn pointer_parent<'a>(doc: &'a mut Value, path: &str) -> Result<(&'a mut Value, String), String> {
    if !path.starts_with('/') {
        return Err(format!("invalid JSON pointer {path:?}"));
    }
    let toks: Vec<String> = path[1..].split('/').map(unescape).collect();
    let (last, parents) = toks.split_last().ok_or("empty path")?;
    let mut cur = doc;
    for t in parents {
        cur = match cur {
            Value::Object(m) => m
                .get_mut(t)
                .ok_or_else(|| format!("doc is missing path: {path}"))?,
            Value::Array(a) => {
                let i: usize = t
                    .parse()
                    .map_err(|_| format!("invalid array index {t:?}"))?;
                a.get_mut(i)
                    .ok_or_else(|| format!("doc is missing path: {path}"))?
            }
            _ => return Err(format!("doc is missing path: {path}")),
        };
    }
    Ok((cur, last.clone()))
}

fn json_patch_remove(doc: &mut Value, path: &str) -> Result<Value, String> {
    let (parent, last) = pointer_parent(doc, path)?;
    match parent {
        Value::Object(m) => m
            .remove(&last)
            .ok_or_else(|| format!("unable to remove nonexistent key: {last}: missing value")),
        Value::Array(a) => {
            let i: usize = last
                .parse()
                .map_err(|_| format!("invalid array index {last:?}"))?;
            if i >= a.len() {
                return Err(format!("unable to remove index {i}: out of bounds"));
            }
            Ok(a.remove(i))
        }
        _ => Err(format!("doc is missing path: {path}")),
    }
}

fn json_patch_add(doc: &mut Value, path: &str, value: Value, replace: bool) -> Result<(), String> {
    if path.is_empty() {
        *doc = value;
        return Ok(());
    }
    let (parent, last) = pointer_parent(doc, path)?;
    match parent {
        Value::Object(m) => {
            if replace && !m.contains_key(&last) {
                return Err(format!(
                    "replace operation does not apply: doc is missing key: {path}"
                ));
            }
            m.insert(last, value);
            Ok(())
        }
        Value::Array(a) => {
            if last == "-" && !replace {
                a.push(value);
                return Ok(());
            }
            let i: usize = last
                .parse()
                .map_err(|_| format!("invalid array index {last:?}"))?;
            if replace {
                *a.get_mut(i).ok_or_else(|| {
                    format!("replace operation does not apply: doc is missing path: {path}")
                })? = value;
            } else {
                if i > a.len() {
                    return Err(format!("unable to insert at index {i}: out of bounds"));
                }
                a.insert(i, value);
            }
            Ok(())
        }
        _ => Err(format!("doc is missing path: {path}")),
    }
}

/// RFC 6902 JSON patch: add, remove, replace, test, move, copy.
pub(crate) fn json_patch(doc: &mut Value, ops: &Value) -> Result<(), String> {
    let ops = ops
        .as_array()
        .ok_or("a JSON patch must be a list of operations")?;
    for op in ops {
        let kind = op
            .get("op")
            .and_then(Value::as_str)
            .ok_or("operation is missing \"op\"")?;
        let path = op
            .get("path")
            .and_then(Value::as_str)
            .ok_or("operation is missing \"path\"")?;
        match kind {
            "add" => json_patch_add(
                doc,
                path,
                op.get("value").cloned().unwrap_or(Value::Null),
                false,
            )?,
            "replace" => json_patch_add(
                doc,
                path,
                op.get("value").cloned().unwrap_or(Value::Null),
                true,
            )?,
            "remove" => {
                json_patch_remove(doc, path)?;
            }
            "test" => {
                let want = op.get("value").cloned().unwrap_or(Value::Null);
                // Like the apiserver's json-patch: testing for null matches a missing value.
                let actual = doc.pointer(path).unwrap_or(&Value::Null);
                if *actual != want {
                    return Err(format!("testing value {path} failed"));
                }
            }
            "move" | "copy" => {
                let from = op
                    .get("from")
                    .and_then(Value::as_str)
                    .ok_or("operation is missing \"from\"")?;
                let v = if kind == "move" {
                    json_patch_remove(doc, from)?
                } else {
                    doc.pointer(from)
                        .cloned()
                        .ok_or_else(|| format!("doc is missing from path: {from}"))?
                };
                json_patch_add(doc, path, v, false)?;
            }
            other => return Err(format!("Unexpected kind: {other}")),
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Managed fields: field sets as leaf paths. Lists are atomic (one leaf), except associative
// lists: `x-kubernetes-list-type: map|set` in a CRD schema, and for built-in kinds the lists the
// apiserver merges by key (containers and env by name, conditions by type, finalizers as a set,
// ownerReferences by uid, ...). Their elements get `k:{"name":"app"}` / `v:"x"` path segments,
// the same notation as `fieldsV1`.

/// A field path from the root. Plain segments are field names; `k:{..}` and `v:..` segments
/// select an element of an associative list.
pub(crate) type FieldPath = Vec<String>;

/// How a list is merged by server-side apply.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum ListKind {
    Atomic,
    Set,
    Map(Vec<String>),
}

/// Decides how each list of one kind is merged.
#[derive(Debug, Clone, Default)]
pub(crate) struct ListRules {
    /// The CRD version's openAPIV3Schema, for custom resources.
    pub schema: Option<Value>,
    /// Whether built-in merge keys apply (built-in kinds).
    pub builtin: bool,
}

pub(crate) fn is_elem(seg: &str) -> bool {
    seg.starts_with("k:{") || seg.starts_with("v:")
}

impl ListRules {
    pub(crate) fn kind(&self, path: &[String]) -> ListKind {
        let fields: Vec<&str> = path
            .iter()
            .filter(|s| !is_elem(s))
            .map(String::as_str)
            .collect();
        match fields.as_slice() {
            ["metadata", "finalizers"] => return ListKind::Set,
            ["metadata", "ownerReferences"] => return ListKind::Map(vec!["uid".into()]),
            _ => {}
        }
        if let Some(schema) = &self.schema {
            let mut cur = schema;
            for seg in path {
                let next = if is_elem(seg) {
                    cur.get("items")
                } else {
                    cur.get("properties")
                        .and_then(|p| p.get(seg))
                        .or_else(|| cur.get("additionalProperties").filter(|a| a.is_object()))
                };
                match next {
                    Some(n) => cur = n,
                    None => return ListKind::Atomic,
                }
            }
            return match cur.get("x-kubernetes-list-type").and_then(Value::as_str) {
                Some("set") => ListKind::Set,
                Some("map") => ListKind::Map(
                    cur.get("x-kubernetes-list-map-keys")
                        .and_then(Value::as_array)
                        .map(|ks| {
                            ks.iter()
                                .filter_map(Value::as_str)
                                .map(str::to_string)
                                .collect()
                        })
                        .unwrap_or_default(),
                ),
                _ => ListKind::Atomic,
            };
        }
        if !self.builtin {
            return ListKind::Atomic;
        }
        let key = |k: &str| ListKind::Map(vec![k.to_string()]);
        match fields.last().copied().unwrap_or_default() {
            "containers"
            | "initContainers"
            | "ephemeralContainers"
            | "env"
            | "volumes"
            | "imagePullSecrets" => key("name"),
            "volumeMounts" | "volumeDevices" => key("mountPath"),
            "ports" if fields.iter().any(|f| f.ends_with("ontainers")) => key("containerPort"),
            "conditions" => key("type"),
            "tolerations" | "envFrom" | "args" | "command" => ListKind::Atomic,
            _ => ListKind::Atomic,
        }
    }
}

/// Whether `p` ends at a key field of an associative-list element (`..[k:{"name":..}].name`).
pub(crate) fn is_key_field(p: &[String]) -> bool {
    match p {
        [.., elem, last] => elem
            .strip_prefix("k:")
            .and_then(|k| serde_json::from_str::<Value>(k).ok())
            .is_some_and(|keys| keys.get(last).is_some()),
        _ => false,
    }
}

fn elem_segment(kind: &ListKind, item: &Value) -> Option<String> {
    match kind {
        ListKind::Atomic => None,
        ListKind::Set => Some(format!(
            "v:{}",
            serde_json::to_string(item).unwrap_or_default()
        )),
        ListKind::Map(keys) => {
            let mut m = Map::new();
            for k in keys {
                m.insert(k.clone(), item.get(k)?.clone());
            }
            Some(format!(
                "k:{}",
                serde_json::to_string(&Value::Object(m)).unwrap_or_default()
            ))
        }
    }
}

fn elem_matches(seg: &str, item: &Value) -> bool {
    if let Some(v) = seg.strip_prefix("v:") {
        return serde_json::from_str::<Value>(v).is_ok_and(|x| &x == item);
    }
    if let Some(k) = seg.strip_prefix("k:") {
        return serde_json::from_str::<Value>(k)
            .ok()
            .and_then(|x| x.as_object().cloned())
            .is_some_and(|keys| keys.iter().all(|(kk, kv)| item.get(kk) == Some(kv)));
    }
    false
}

const IGNORED_META: &[&str] = &[
    "name",
    "namespace",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "managedFields",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "selfLink",
];

/// Leaf paths set by `obj` (excluding apiVersion, kind and system metadata).
pub(crate) fn leaf_paths(obj: &Value, rules: &ListRules) -> BTreeSet<FieldPath> {
    let mut out = BTreeSet::new();
    if let Some(m) = obj.as_object() {
        for (k, v) in m {
            if k == "apiVersion" || k == "kind" {
                continue;
            }
            if k == "metadata" {
                if let Some(mm) = v.as_object() {
                    for (mk, mv) in mm {
                        if IGNORED_META.contains(&mk.as_str()) {
                            continue;
                        }
                        walk_leaves(mv, vec!["metadata".into(), mk.clone()], rules, &mut out);
                    }
                }
                continue;
            }
            walk_leaves(v, vec![k.clone()], rules, &mut out);
        }
    }
    out
}

fn walk_leaves(v: &Value, path: FieldPath, rules: &ListRules, out: &mut BTreeSet<FieldPath>) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, c) in m {
                let mut p = path.clone();
                p.push(k.clone());
                walk_leaves(c, p, rules, out);
            }
        }
        Value::Array(items) if !items.is_empty() => {
            let kind = rules.kind(&path);
            let segs: Option<Vec<String>> =
                items.iter().map(|it| elem_segment(&kind, it)).collect();
            match segs {
                Some(segs) if kind != ListKind::Atomic => {
                    for (seg, it) in segs.into_iter().zip(items) {
                        let mut p = path.clone();
                        p.push(seg);
                        if kind == ListKind::Set {
                            out.insert(p);
                        } else {
                            walk_leaves(it, p, rules, out);
                        }
                    }
                }
                _ => {
                    out.insert(path);
                }
            }
        }
        _ => {
            out.insert(path);
        }
    }
}

pub(crate) fn get_path<'a>(v: &'a Value, path: &[String]) -> Option<&'a Value> {
    let mut cur = v;
    for p in path {
        cur = if is_elem(p) {
            cur.as_array()?.iter().find(|it| elem_matches(p, it))?
        } else {
            cur.get(p)?
        };
    }
    Some(cur)
}

fn is_empty_container(v: &Value) -> bool {
    v.as_object().is_some_and(Map::is_empty)
}

/// Removes the leaf at `path`, and objects or list elements left empty above it (except the root).
pub(crate) fn remove_path(v: &mut Value, path: &[String]) {
    let Some((first, rest)) = path.split_first() else {
        return;
    };
    if is_elem(first) {
        let Some(items) = v.as_array_mut() else {
            return;
        };
        let Some(i) = items.iter().position(|it| elem_matches(first, it)) else {
            return;
        };
        if rest.is_empty() {
            items.remove(i);
        } else {
            remove_path(&mut items[i], rest);
            if is_empty_container(&items[i]) {
                items.remove(i);
            }
        }
        return;
    }
    let Some(m) = v.as_object_mut() else { return };
    if rest.is_empty() {
        m.remove(first);
        return;
    }
    if let Some(child) = m.get_mut(first) {
        remove_path(child, rest);
        if is_empty_container(child) || child.as_array().is_some_and(Vec::is_empty) {
            m.remove(first);
        }
    }
}

/// Server-side apply merge of `applied` into `target`: maps merge recursively, associative
/// lists merge by key (sets by value), other lists and scalars are replaced, `null` removes.
pub(crate) fn apply_merge_value(
    target: &mut Value,
    applied: &Value,
    path: &FieldPath,
    rules: &ListRules,
) {
    match applied {
        Value::Object(am) => {
            if !target.is_object() {
                *target = Value::Object(Map::new());
            }
            let tm = target.as_object_mut().expect("object");
            for (k, v) in am {
                if v.is_null() {
                    tm.remove(k);
                    continue;
                }
                let mut p = path.clone();
                p.push(k.clone());
                apply_merge_value(tm.entry(k.clone()).or_insert(Value::Null), v, &p, rules);
            }
        }
        Value::Array(items) => {
            let kind = rules.kind(path);
            let keyed: Option<Vec<String>> =
                items.iter().map(|it| elem_segment(&kind, it)).collect();
            match (kind.clone(), keyed, target.as_array_mut()) {
                (ListKind::Atomic, _, _) | (_, None, _) | (_, _, None) => *target = applied.clone(),
                (ListKind::Set, Some(_), Some(existing)) => {
                    for it in items {
                        if !existing.contains(it) {
                            existing.push(it.clone());
                        }
                    }
                }
                (ListKind::Map(_), Some(segs), Some(existing)) => {
                    for (seg, it) in segs.into_iter().zip(items) {
                        let mut p = path.clone();
                        p.push(seg.clone());
                        match existing.iter_mut().find(|e| elem_matches(&seg, e)) {
                            Some(e) => apply_merge_value(e, it, &p, rules),
                            None => existing.push(it.clone()),
                        }
                    }
                }
            }
        }
        other => *target = other.clone(),
    }
}

/// Encodes a set of leaf paths as `fieldsV1` (`{"f:spec":{"f:replicas":{}}}`).
pub(crate) fn to_fields_v1(paths: &BTreeSet<FieldPath>) -> Value {
    let mut root = Map::new();
    for p in paths {
        let mut cur = &mut root;
        for seg in p {
            let key = if is_elem(seg) {
                seg.clone()
            } else {
                format!("f:{seg}")
            };
            cur = cur
                .entry(key)
                .or_insert_with(|| Value::Object(Map::new()))
                .as_object_mut()
                .expect("object");
        }
    }
    Value::Object(root)
}

/// Decodes `fieldsV1` into leaf paths.
pub(crate) fn from_fields_v1(v: &Value) -> BTreeSet<FieldPath> {
    let mut out = BTreeSet::new();
    fn walk(v: &Value, path: FieldPath, out: &mut BTreeSet<FieldPath>) {
        let children: Vec<(&String, &Value)> = v
            .as_object()
            .map(|m| {
                m.iter()
                    .filter(|(k, _)| k.starts_with("f:") || is_elem(k))
                    .collect()
            })
            .unwrap_or_default();
        if children.is_empty() {
            if !path.is_empty() {
                out.insert(path);
            }
            return;
        }
        for (k, c) in children {
            let mut p = path.clone();
            p.push(k.strip_prefix("f:").unwrap_or(k).to_string());
            walk(c, p, out);
        }
    }
    walk(v, Vec::new(), &mut out);
    out
}

/// One managedFields entry, decoded.
#[derive(Debug, Clone)]
pub(crate) struct ManagedEntry {
    pub manager: String,
    pub operation: String,
    pub api_version: String,
    pub time: String,
    pub subresource: String,
    pub fields: BTreeSet<FieldPath>,
}

pub(crate) fn read_managed(obj: &Value) -> Vec<ManagedEntry> {
    obj.pointer("/metadata/managedFields")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .map(|e| ManagedEntry {
                    manager: e
                        .get("manager")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .into(),
                    operation: e
                        .get("operation")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .into(),
                    api_version: e
                        .get("apiVersion")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .into(),
                    time: e
                        .get("time")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .into(),
                    subresource: e
                        .get("subresource")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .into(),
                    fields: e.get("fieldsV1").map(from_fields_v1).unwrap_or_default(),
                })
                .collect()
        })
        .unwrap_or_default()
}

pub(crate) fn write_managed(obj: &mut Value, entries: &[ManagedEntry]) {
    let arr: Vec<Value> = entries
        .iter()
        .filter(|e| !e.fields.is_empty())
        .map(|e| {
            let mut m = Map::new();
            m.insert("manager".into(), e.manager.clone().into());
            m.insert("operation".into(), e.operation.clone().into());
            m.insert("apiVersion".into(), e.api_version.clone().into());
            m.insert("time".into(), e.time.clone().into());
            m.insert("fieldsType".into(), "FieldsV1".into());
            m.insert("fieldsV1".into(), to_fields_v1(&e.fields));
            if !e.subresource.is_empty() {
                m.insert("subresource".into(), e.subresource.clone().into());
            }
            Value::Object(m)
        })
        .collect();
    if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        if arr.is_empty() {
            meta.remove("managedFields");
        } else {
            meta.insert("managedFields".into(), Value::Array(arr));
        }
    }
}

/// Leaf paths whose value differs between `old` and `new` (either side missing counts).
pub(crate) fn changed_paths(old: &Value, new: &Value, rules: &ListRules) -> BTreeSet<FieldPath> {
    let a = leaf_paths(old, rules);
    let b = leaf_paths(new, rules);
    a.union(&b)
        .filter(|p| get_path(old, p) != get_path(new, p))
        .cloned()
        .collect()
}

/// Groups paths by manager for conflict messages.
pub(crate) fn format_path(p: &FieldPath) -> String {
    p.iter()
        .map(|s| {
            if let Some(k) = s.strip_prefix("k:") {
                let keys = serde_json::from_str::<Value>(k)
                    .ok()
                    .and_then(|v| v.as_object().cloned())
                    .unwrap_or_default();
                let inner: Vec<String> = keys.iter().map(|(k, v)| format!("{k}={v}")).collect();
                format!("[{}]", inner.join(","))
            } else if let Some(v) = s.strip_prefix("v:") {
                format!("[={v}]")
            } else {
                format!(".{s}")
            }
        })
        .collect()
}

pub(crate) fn hex(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

pub(crate) fn unhex(s: &str) -> Option<String> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect();
    String::from_utf8(bytes?).ok()
}

pub(crate) type Counts = BTreeMap<(String, String), u64>;

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn label_selector_supports_all_operators() {
        let o = json!({"metadata": {"labels": {"app": "web", "tier": "front"}}});
        let m = |s: &str| labels_match(&parse_label_selector(s).unwrap(), &o);
        assert!(m("app=web"));
        assert!(m("app==web,tier!=back"));
        assert!(m("app in (web, api),tier notin (back)"));
        assert!(m("app,!missing"));
        assert!(!m("app notin (web)"));
        assert!(!m("missing"));
        assert!(!m("!app"));
    }

    #[test]
    fn json_patch_add_replace_remove() {
        let mut d = json!({"a": {"b": 1}, "l": [1, 2]});
        json_patch(
            &mut d,
            &json!([{"op": "add", "path": "/a/c", "value": 2},
                    {"op": "replace", "path": "/a/b", "value": 3},
                    {"op": "remove", "path": "/l/0"},
                    {"op": "add", "path": "/l/-", "value": 9}]),
        )
        .unwrap();
        assert_eq!(d, json!({"a": {"b": 3, "c": 2}, "l": [2, 9]}));
        assert!(
            json_patch(
                &mut d,
                &json!([{"op": "replace", "path": "/nope", "value": 1}])
            )
            .is_err()
        );
    }

    #[test]
    fn apply_merges_associative_lists_by_key() {
        let rules = ListRules {
            schema: None,
            builtin: true,
        };
        let mut target = json!({"spec": {"containers": [{"name": "a", "image": "i"}, {"name": "b"}]},
                                "metadata": {"finalizers": ["x"]}});
        let applied = json!({"spec": {"containers": [{"name": "a", "env": [{"name": "E", "value": "1"}]}]},
                             "metadata": {"finalizers": ["y"]}});
        apply_merge_value(&mut target, &applied, &Vec::new(), &rules);
        assert_eq!(
            target["spec"]["containers"][0],
            json!({"name": "a", "image": "i", "env": [{"name": "E", "value": "1"}]})
        );
        assert_eq!(target["spec"]["containers"][1], json!({"name": "b"}));
        assert_eq!(target["metadata"]["finalizers"], json!(["x", "y"]));
        let paths = leaf_paths(&applied, &rules);
        let env_value: FieldPath = [
            "spec",
            "containers",
            "k:{\"name\":\"a\"}",
            "env",
            "k:{\"name\":\"E\"}",
            "value",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert!(paths.contains(&env_value), "{paths:?}");
        assert_eq!(get_path(&target, &env_value), Some(&json!("1")));
        remove_path(&mut target, &env_value[..5]);
        assert_eq!(
            target["spec"]["containers"][0],
            json!({"name": "a", "image": "i"})
        );
    }

    #[test]
    fn crd_list_types_come_from_the_schema() {
        let rules = ListRules {
            schema: Some(
                json!({"type": "object", "properties": {"spec": {"type": "object", "properties": {
                "m": {"type": "array", "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["id"], "items": {"type": "object"}},
                "s": {"type": "array", "x-kubernetes-list-type": "set", "items": {"type": "string"}},
                "a": {"type": "array", "items": {"type": "object"}}}}}}),
            ),
            builtin: false,
        };
        let p = |s: &str| vec!["spec".to_string(), s.to_string()];
        assert_eq!(rules.kind(&p("m")), ListKind::Map(vec!["id".into()]));
        assert_eq!(rules.kind(&p("s")), ListKind::Set);
        assert_eq!(rules.kind(&p("a")), ListKind::Atomic);
        assert_eq!(
            rules.kind(&["spec".into(), "conditions".into()]),
            ListKind::Atomic
        );
    }

    #[test]
    fn fields_v1_round_trips() {
        let o = json!({"metadata": {"name": "x", "labels": {"a": "1"}, "finalizers": ["f"]},
                       "spec": {"r": 1, "l": [1]}});
        let p = leaf_paths(&o, &ListRules::default());
        assert_eq!(from_fields_v1(&to_fields_v1(&p)), p);
        assert_eq!(
            to_fields_v1(&p),
            json!({"f:metadata": {"f:labels": {"f:a": {}}, "f:finalizers": {"v:\"f\"": {}}},
                   "f:spec": {"f:l": {}, "f:r": {}}})
        );
    }
}
