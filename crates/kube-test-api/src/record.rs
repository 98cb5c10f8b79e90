//! The request log: every resource request as the apiserver's authorizer sees it (RBAC verb,
//! API group, resource, subresource, namespace, name), plus the extra authorization checks the
//! real apiserver makes on some writes. Tests compare it with RBAC rules.

use axum::http::{HeaderMap, Method, header};
use serde_json::Value;

use crate::store::{ResourceType, State};

/// One authorization check: a request, or an extra check a request caused.
///
/// Fields are empty strings where Kubernetes' authorizer attributes are empty: `group` for the
/// core group, `subresource` when none, `namespace` for cluster-scoped kinds and requests across
/// all namespaces, `name` for `list`, `watch`, `create` and `deletecollection` (unless a
/// `metadata.name=` field selector names one object, as the apiserver does).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RecordedRequest {
    /// Who asked: the bearer token the client sent (`""` without one). The server authenticates
    /// nobody; give each client its own token to tell their requests apart.
    pub user: String,
    /// The RBAC verb: `get`, `list`, `watch`, `create`, `update`, `patch`, `delete`,
    /// `deletecollection`.
    pub verb: String,
    /// API group (`""`: core).
    pub group: String,
    /// Plural resource name (`secrets`, `stripekeypolicies`).
    pub resource: String,
    /// Subresource (`status`, `finalizers`), `""` when none.
    pub subresource: String,
    /// Namespace of the request, `""` when cluster-wide.
    pub namespace: String,
    /// Object name, `""` when the request names none.
    pub name: String,
    /// `None` for an HTTP request. `Some(why)` for a check the apiserver makes on top of one:
    /// `"apply-create"` (a server-side apply that creates the object also needs `create`) or
    /// `"OwnerReferencesPermissionEnforcement"` (setting `blockOwnerDeletion` on an owner
    /// reference needs `update` on the owner's `finalizers`; changing the owner references of
    /// an existing object needs `delete` on it).
    pub implied_by: Option<String>,
}

impl RecordedRequest {
    /// `resource` or `resource/subresource`, as RBAC rules spell it.
    pub fn resource_path(&self) -> String {
        if self.subresource.is_empty() {
            self.resource.clone()
        } else {
            format!("{}/{}", self.resource, self.subresource)
        }
    }
}

/// The user a request authenticates as: its bearer token, if any.
pub(crate) fn user_of(headers: &HeaderMap) -> String {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| t.trim().to_string())
        .unwrap_or_default()
}

/// The RBAC verb of a resource request (`None`: a method the server does not serve).
pub(crate) fn verb_of(method: &Method, has_name: bool, watch: bool) -> Option<&'static str> {
    Some(match (method, has_name) {
        (&Method::GET, false) if watch => "watch",
        (&Method::GET, false) => "list",
        (&Method::GET, true) => "get",
        (&Method::POST, false) => "create",
        (&Method::PUT, true) => "update",
        (&Method::PATCH, true) => "patch",
        (&Method::DELETE, true) => "delete",
        (&Method::DELETE, false) => "deletecollection",
        _ => return None,
    })
}

/// The object a `metadata.name=` field selector names (the apiserver authorizes such a list or
/// watch as a request on that name).
pub(crate) fn field_selector_name(field_selector: Option<&String>) -> Option<String> {
    let fs = field_selector?;
    let mut parts = fs.split(',');
    let one = parts.next()?;
    if parts.next().is_some() {
        return None;
    }
    let (k, v) = one.split_once('=')?;
    let v = v.strip_prefix('=').unwrap_or(v);
    (k.trim() == "metadata.name").then(|| v.trim().to_string())
}

fn owner_refs(obj: Option<&Value>) -> Vec<Value> {
    obj.and_then(|o| o.pointer("/metadata/ownerReferences"))
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
}

fn blocks(r: &Value) -> bool {
    r.get("blockOwnerDeletion").and_then(Value::as_bool) == Some(true)
}

fn uid(r: &Value) -> &str {
    r.get("uid").and_then(Value::as_str).unwrap_or_default()
}

/// The checks Kubernetes' `OwnerReferencesPermissionEnforcement` admission plugin adds to a
/// write of `new` (over `old`, `None` for a create) of type `rt` in `ns`.
pub(crate) fn owner_reference_checks(
    st: &State,
    base: &RecordedRequest,
    rt: &ResourceType,
    old: Option<&Value>,
    new: &Value,
) -> Vec<RecordedRequest> {
    let (before, after) = (owner_refs(old), owner_refs(Some(new)));
    if before == after {
        return Vec::new();
    }
    let why = Some("OwnerReferencesPermissionEnforcement".to_string());
    let mut out = Vec::new();
    if old.is_some() {
        out.push(RecordedRequest {
            verb: "delete".into(),
            group: rt.group.clone(),
            resource: rt.plural.clone(),
            subresource: String::new(),
            name: base.name.clone(),
            implied_by: why.clone(),
            ..base.clone()
        });
    }
    for r in after.iter().filter(|r| blocks(r)) {
        let already = before.iter().any(|b| uid(b) == uid(r) && blocks(b));
        if already {
            continue;
        }
        let av = r.get("apiVersion").and_then(Value::as_str).unwrap_or("");
        let kind = r.get("kind").and_then(Value::as_str).unwrap_or("");
        let Some(owner) = st.find_kind(av, kind) else {
            continue;
        };
        out.push(RecordedRequest {
            verb: "update".into(),
            group: owner.group.clone(),
            resource: owner.plural.clone(),
            subresource: "finalizers".into(),
            namespace: if owner.namespaced {
                base.namespace.clone()
            } else {
                String::new()
            },
            name: r
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
            implied_by: why.clone(),
            ..base.clone()
        });
    }
    out
}

impl crate::server::Shared {
    fn requests(&self) -> std::sync::MutexGuard<'_, RequestLog> {
        self.requests.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts one check.
    pub(crate) fn record(&self, r: RecordedRequest) {
        *self.requests().entry(r).or_insert(0) += 1;
    }

    /// Counts several checks.
    pub(crate) fn record_all(&self, rs: Vec<RecordedRequest>) {
        let mut log = self.requests();
        for r in rs {
            *log.entry(r).or_insert(0) += 1;
        }
    }

    pub(crate) fn recorded(&self) -> RequestLog {
        self.requests().clone()
    }

    pub(crate) fn clear_recorded(&self) {
        self.requests().clear();
    }
}

/// Distinct checks and how often each was made (bounded by the distinct objects touched, not by
/// the number of requests, so a long-running server does not grow without end).
pub(crate) type RequestLog = std::collections::BTreeMap<RecordedRequest, u64>;
