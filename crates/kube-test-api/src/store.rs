//! The object store: resource types, objects, resource versions, the write pipeline
//! (status isolation, generation, finalizers, validation, managed fields) and watch events.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Map, Value, json};
use tokio::sync::broadcast;

use crate::schema::{self, FieldError};
use crate::util::{self, FieldPath, ManagedEntry};

/// Identifies a resource: API group (empty for core) and plural name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct ResKey {
    pub group: String,
    pub plural: String,
}

impl ResKey {
    pub(crate) fn new(group: &str, plural: &str) -> Self {
        Self {
            group: group.to_string(),
            plural: plural.to_string(),
        }
    }

    /// `secrets` or `deployments.apps`, as in apiserver messages.
    pub(crate) fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.plural.clone()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }
}

/// A served resource.
#[derive(Debug, Clone)]
pub(crate) struct ResourceType {
    pub group: String,
    pub versions: Vec<String>,
    pub plural: String,
    pub singular: String,
    pub kind: String,
    pub namespaced: bool,
    pub short_names: Vec<String>,
    pub categories: Vec<String>,
    pub status: bool,
    pub generation: bool,
    pub crd: Option<Arc<Value>>,
}

impl ResourceType {
    pub(crate) fn key(&self) -> ResKey {
        ResKey::new(&self.group, &self.plural)
    }

    /// How server-side apply merges this kind's lists.
    pub(crate) fn list_rules(&self, version: &str) -> util::ListRules {
        util::ListRules {
            schema: self
                .crd
                .as_ref()
                .and_then(|c| schema::version_schema(c, version))
                .cloned(),
            builtin: self.crd.is_none(),
        }
    }

    pub(crate) fn api_version(&self, version: &str) -> String {
        if self.group.is_empty() {
            version.to_string()
        } else {
            format!("{}/{}", self.group, version)
        }
    }
}

/// A Kubernetes `Status` error.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{code} {reason}: {message}")]
pub struct ApiError {
    /// HTTP status code.
    pub code: u16,
    /// `reason`, e.g. `NotFound`, `AlreadyExists`, `Conflict`, `Invalid`, `Expired`.
    pub reason: String,
    /// Human readable message, the same text as the apiserver's.
    pub message: String,
    /// `details` of the Status object, if any.
    pub details: Option<Value>,
}

impl ApiError {
    pub(crate) fn new(
        code: u16,
        reason: &str,
        message: impl Into<String>,
        details: Option<Value>,
    ) -> Self {
        Self {
            code,
            reason: reason.to_string(),
            message: message.into(),
            details,
        }
    }

    fn details(rt: &ResourceType, name: &str) -> Value {
        let mut d = json!({"name": name, "kind": rt.plural});
        if !rt.group.is_empty() {
            d["group"] = rt.group.clone().into();
        }
        d
    }

    pub(crate) fn not_found(rt: &ResourceType, name: &str) -> Self {
        Self::new(
            404,
            "NotFound",
            format!("{} \"{name}\" not found", rt.key().qualified()),
            Some(Self::details(rt, name)),
        )
    }

    pub(crate) fn namespace_not_found(ns: &str) -> Self {
        Self::new(
            404,
            "NotFound",
            format!("namespaces \"{ns}\" not found"),
            Some(json!({"name": ns, "kind": "namespaces"})),
        )
    }

    pub(crate) fn already_exists(rt: &ResourceType, name: &str) -> Self {
        Self::new(
            409,
            "AlreadyExists",
            format!("{} \"{name}\" already exists", rt.key().qualified()),
            Some(Self::details(rt, name)),
        )
    }

    pub(crate) fn conflict(rt: &ResourceType, name: &str) -> Self {
        Self::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
                rt.key().qualified()
            ),
            Some(Self::details(rt, name)),
        )
    }

    pub(crate) fn invalid(rt: &ResourceType, name: &str, errors: &[FieldError]) -> Self {
        let causes: Vec<Value> = errors
            .iter()
            .map(|e| json!({"reason": e.error_type.cause_reason(), "message": e.body(), "field": e.field}))
            .collect();
        let mut details = json!({"name": name, "kind": rt.kind, "causes": causes});
        if !rt.group.is_empty() {
            details["group"] = rt.group.clone().into();
        }
        Self::new(
            422,
            "Invalid",
            schema::format_invalid(&rt.kind, &rt.group, name, errors),
            Some(details),
        )
    }

    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message, None)
    }

    pub(crate) fn expired(message: impl Into<String>) -> Self {
        Self::new(410, "Expired", message, None)
    }

    pub(crate) fn method_not_allowed() -> Self {
        Self::new(
            405,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
            None,
        )
    }

    pub(crate) fn resource_not_found() -> Self {
        Self::new(
            404,
            "NotFound",
            "the server could not find the requested resource",
            None,
        )
    }

    /// The error as a `Status` object.
    pub fn to_status(&self) -> Value {
        let mut s = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let Some(d) = &self.details {
            s["details"] = d.clone();
        }
        s
    }
}

/// One change, kept for watch resumption and broadcast to watchers.
#[derive(Debug)]
pub(crate) struct Record {
    pub rv: u64,
    pub key: ResKey,
    pub namespace: String,
    pub etype: &'static str,
    pub obj: Arc<Value>,
    pub old: Option<Arc<Value>>,
}

/// How a write records managed fields.
pub(crate) enum Managed {
    /// A non-apply write by this manager (owns what it changed).
    Update(String),
    /// A server-side apply: the precomputed managedFields entries.
    Apply(Vec<ManagedEntry>),
    /// A write by the server itself (no managedFields change).
    System,
}

pub(crate) struct WriteOpts {
    pub subresource: Option<String>,
    pub version: String,
    pub dry_run: bool,
}

pub(crate) struct State {
    pub rv: u64,
    pub types: BTreeMap<ResKey, ResourceType>,
    pub objects: BTreeMap<ResKey, BTreeMap<(String, String), Value>>,
    pub history: VecDeque<Arc<Record>>,
    pub history_limit: usize,
    /// Watches from a resourceVersion below this get 410 Expired.
    pub compacted_rv: u64,
    pub tx: broadcast::Sender<Arc<Record>>,
    pub counts: util::Counts,
    pub stuck: HashSet<(String, String)>,
    /// Faults injected into matching requests (`TestApiServer::inject_fault`).
    pub faults: Vec<crate::FaultRule>,
    pub rollout_delay: Duration,
    /// Watch events of these resources reach watchers this much later (a lagging watch cache).
    pub watch_delay: HashMap<ResKey, Duration>,
    pub rollout_since: HashMap<(ResKey, String, String), (i64, Instant)>,
    pub gc_pending: bool,
    pub uid_counter: u64,
}

pub(crate) fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn meta(obj: &Value) -> Option<&Map<String, Value>> {
    obj.get("metadata").and_then(Value::as_object)
}

fn meta_mut(obj: &mut Value) -> &mut Map<String, Value> {
    if !obj.get("metadata").is_some_and(Value::is_object) {
        obj["metadata"] = json!({});
    }
    obj["metadata"].as_object_mut().expect("metadata object")
}

pub(crate) fn meta_str<'a>(obj: &'a Value, key: &str) -> Option<&'a str> {
    meta(obj).and_then(|m| m.get(key)).and_then(Value::as_str)
}

fn finalizers(obj: &Value) -> Vec<String> {
    obj.pointer("/metadata/finalizers")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

#[allow(clippy::too_many_arguments)]
fn builtin(
    group: &str,
    version: &str,
    plural: &str,
    kind: &str,
    namespaced: bool,
    short: &[&str],
    status: bool,
    generation: bool,
) -> ResourceType {
    ResourceType {
        group: group.into(),
        versions: vec![version.into()],
        plural: plural.into(),
        singular: kind.to_lowercase(),
        kind: kind.into(),
        namespaced,
        short_names: short.iter().map(|s| s.to_string()).collect(),
        categories: Vec::new(),
        status,
        generation,
        crd: None,
    }
}

pub(crate) fn builtin_types() -> Vec<ResourceType> {
    vec![
        builtin(
            "",
            "v1",
            "namespaces",
            "Namespace",
            false,
            &["ns"],
            true,
            false,
        ),
        builtin("", "v1", "secrets", "Secret", true, &[], false, false),
        builtin(
            "",
            "v1",
            "configmaps",
            "ConfigMap",
            true,
            &["cm"],
            false,
            false,
        ),
        builtin("", "v1", "events", "Event", true, &["ev"], false, false),
        builtin("", "v1", "pods", "Pod", true, &["po"], true, false),
        builtin(
            "",
            "v1",
            "serviceaccounts",
            "ServiceAccount",
            true,
            &["sa"],
            false,
            false,
        ),
        builtin(
            "apps",
            "v1",
            "deployments",
            "Deployment",
            true,
            &["deploy"],
            true,
            true,
        ),
        builtin(
            "apps",
            "v1",
            "statefulsets",
            "StatefulSet",
            true,
            &["sts"],
            true,
            true,
        ),
        builtin(
            "apps",
            "v1",
            "daemonsets",
            "DaemonSet",
            true,
            &["ds"],
            true,
            true,
        ),
        builtin(
            "coordination.k8s.io",
            "v1",
            "leases",
            "Lease",
            true,
            &[],
            false,
            false,
        ),
        builtin(
            "events.k8s.io",
            "v1",
            "events",
            "Event",
            true,
            &["ev"],
            false,
            false,
        ),
        builtin(
            "admissionregistration.k8s.io",
            "v1",
            "validatingwebhookconfigurations",
            "ValidatingWebhookConfiguration",
            false,
            &[],
            false,
            true,
        ),
        builtin(
            "apiextensions.k8s.io",
            "v1",
            "customresourcedefinitions",
            "CustomResourceDefinition",
            false,
            &["crd", "crds"],
            true,
            true,
        ),
    ]
}

/// Base64 (standard alphabet, padded), for `Secret.stringData`.
fn base64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        out.push(A[(n >> 18) as usize & 63] as char);
        out.push(A[(n >> 12) as usize & 63] as char);
        out.push(if chunk.len() > 1 {
            A[(n >> 6) as usize & 63] as char
        } else {
            '='
        });
        out.push(if chunk.len() > 2 {
            A[n as usize & 63] as char
        } else {
            '='
        });
    }
    out
}

/// The apiserver's own defaulting and conversions for built-in kinds.
fn builtin_defaults(rt: &ResourceType, obj: &mut Value) {
    match (rt.group.as_str(), rt.plural.as_str()) {
        ("", "secrets") => {
            if let Some(Value::Object(sd)) =
                obj.as_object_mut().and_then(|m| m.remove("stringData"))
            {
                if !obj.get("data").is_some_and(Value::is_object) {
                    obj["data"] = json!({});
                }
                for (k, v) in sd {
                    let text = v
                        .as_str()
                        .map(str::to_string)
                        .unwrap_or_else(|| v.to_string());
                    obj["data"][k] = Value::String(base64(text.as_bytes()));
                }
            }
            if obj.get("type").is_none_or(Value::is_null) {
                obj["type"] = "Opaque".into();
            }
        }
        ("apps", "deployments") | ("apps", "statefulsets") => {
            if let Some(spec) = obj.get_mut("spec").and_then(Value::as_object_mut)
                && !spec.contains_key("replicas")
            {
                spec.insert("replicas".into(), 1.into());
            }
        }
        _ => {}
    }
}

/// Content that counts for `metadata.generation`: everything but metadata (and status where a
/// status subresource exists).
fn generation_content(rt: &ResourceType, obj: &Value) -> Value {
    let mut v = obj.clone();
    if let Some(m) = v.as_object_mut() {
        m.remove("metadata");
        m.remove("apiVersion");
        m.remove("kind");
        if rt.status {
            m.remove("status");
        }
    }
    v
}

fn strip_volatile(obj: &Value) -> Value {
    let mut v = obj.clone();
    if let Some(m) = v.get_mut("metadata").and_then(Value::as_object_mut) {
        m.remove("resourceVersion");
        if let Some(mf) = m.get_mut("managedFields").and_then(Value::as_array_mut) {
            for e in mf {
                if let Some(e) = e.as_object_mut() {
                    e.remove("time");
                }
            }
        }
    }
    if let Some(m) = v.as_object_mut() {
        m.remove("apiVersion");
    }
    v
}

impl State {
    pub(crate) fn new(history_limit: usize, rollout_delay: Duration) -> Self {
        let (tx, _) = broadcast::channel(16384);
        let mut s = Self {
            rv: 1,
            types: BTreeMap::new(),
            objects: BTreeMap::new(),
            history: VecDeque::new(),
            history_limit,
            compacted_rv: 0,
            tx,
            counts: BTreeMap::new(),
            stuck: HashSet::new(),
            faults: Vec::new(),
            rollout_delay,
            watch_delay: HashMap::new(),
            rollout_since: HashMap::new(),
            gc_pending: false,
            uid_counter: 0,
        };
        for t in builtin_types() {
            s.types.insert(t.key(), t);
        }
        for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
            let obj = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns},
                "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}});
            let key = ResKey::new("", "namespaces");
            let opts = WriteOpts {
                subresource: None,
                version: "v1".into(),
                dry_run: false,
            };
            let _ = s.create(&key, "", obj, &opts, Managed::System);
        }
        s
    }

    pub(crate) fn type_of(&self, key: &ResKey) -> Result<ResourceType, ApiError> {
        self.types
            .get(key)
            .cloned()
            .ok_or_else(ApiError::resource_not_found)
    }

    /// Finds a served resource by group, version and plural.
    pub(crate) fn find_type(
        &self,
        group: &str,
        version: &str,
        plural: &str,
    ) -> Option<&ResourceType> {
        self.types
            .get(&ResKey::new(group, plural))
            .filter(|t| t.versions.iter().any(|v| v == version))
    }

    /// Finds a resource by apiVersion and kind.
    pub(crate) fn find_kind(&self, api_version: &str, kind: &str) -> Option<&ResourceType> {
        let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
        self.types
            .values()
            .find(|t| t.group == group && t.kind == kind && t.versions.iter().any(|v| v == version))
    }

    fn new_uid(&mut self) -> String {
        self.uid_counter += 1;
        let n = self.uid_counter;
        let t = chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default() as u64;
        format!(
            "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
            (t >> 32) as u32,
            (t >> 16) as u16,
            (n >> 12) & 0xfff,
            n & 0xfff,
            t & 0xffff_ffff_ffff
        )
    }

    pub(crate) fn get(&self, key: &ResKey, ns: &str, name: &str) -> Option<&Value> {
        self.objects
            .get(key)
            .and_then(|m| m.get(&(ns.to_string(), name.to_string())))
    }

    fn emit(
        &mut self,
        key: &ResKey,
        ns: &str,
        etype: &'static str,
        obj: Value,
        old: Option<Value>,
    ) {
        let rec = Arc::new(Record {
            rv: self.rv,
            key: key.clone(),
            namespace: ns.to_string(),
            etype,
            obj: Arc::new(obj),
            old: old.map(Arc::new),
        });
        self.history.push_back(rec.clone());
        while self.history.len() > self.history_limit {
            if let Some(r) = self.history.pop_front() {
                self.compacted_rv = self.compacted_rv.max(r.rv);
            }
        }
        let _ = self.tx.send(rec);
    }

    /// Forgets all retained watch history: watches from any older resourceVersion get 410 Gone.
    pub(crate) fn compact(&mut self) {
        self.history.clear();
        self.compacted_rv = self.rv;
    }

    pub(crate) fn namespace_check(&self, rt: &ResourceType, ns: &str) -> Result<(), ApiError> {
        if !rt.namespaced {
            return Ok(());
        }
        match self.get(&ResKey::new("", "namespaces"), "", ns) {
            None => Err(ApiError::namespace_not_found(ns)),
            Some(n) if meta(n).and_then(|m| m.get("deletionTimestamp")).is_some() => {
                Err(ApiError::new(
                    403,
                    "Forbidden",
                    format!(
                        "{} \"{}\" is forbidden: unable to create new content in namespace {ns} because it is being terminated",
                        rt.key().qualified(),
                        ""
                    ),
                    Some(
                        json!({"name": "", "kind": rt.plural, "causes": [{"reason": "NamespaceTerminating", "message": format!("namespace {ns} is being terminated"), "field": "metadata.namespace"}]}),
                    ),
                ))
            }
            Some(_) => Ok(()),
        }
    }

    /// Validates (and for custom resources prunes/defaults) an object about to be stored.
    fn validate(
        &self,
        rt: &ResourceType,
        obj: Value,
        old: Option<&Value>,
        version: &str,
    ) -> Result<Value, Vec<FieldError>> {
        let mut errors = Vec::new();
        let name = meta_str(&obj, "name").unwrap_or_default().to_string();
        if name.is_empty() {
            errors.push(FieldError::required(
                "metadata.name",
                "name or generateName is required",
            ));
        } else if rt.plural != "events" && !crate::validation::is_dns1123_subdomain(&name) {
            errors.push(FieldError::invalid(
                "metadata.name",
                Value::String(name.clone()),
                crate::validation::dns1123_subdomain_message(),
            ));
        }
        crate::validation::validate_metadata(&obj, &mut errors);
        if rt.crd.is_none() {
            crate::validation::validate_builtin(&rt.group, &rt.plural, &obj, old, &mut errors);
        }
        if let Some(old) = old {
            let old_f: BTreeSet<String> = finalizers(old).into_iter().collect();
            if meta(old).and_then(|m| m.get("deletionTimestamp")).is_some() {
                let new_f: Vec<String> = finalizers(&obj)
                    .into_iter()
                    .filter(|f| !old_f.contains(f))
                    .collect();
                if !new_f.is_empty() {
                    errors.push(FieldError::forbidden(
                        "metadata.finalizers",
                        format!(
                            "no new finalizers can be added if the object is being deleted, found new finalizers []string{{{}}}",
                            new_f.iter().map(|f| format!("{f:?}")).collect::<Vec<_>>().join(", ")
                        ),
                    ));
                }
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        if let Some(crd) = &rt.crd {
            return schema::validate(crd, version, &obj, old);
        }
        if rt.plural == "customresourcedefinitions" {
            let errs = validate_crd(&obj);
            if !errs.is_empty() {
                return Err(errs);
            }
        }
        Ok(obj)
    }

    /// Creates an object. `obj` must carry a name (or generateName).
    pub(crate) fn create(
        &mut self,
        key: &ResKey,
        ns: &str,
        mut obj: Value,
        opts: &WriteOpts,
        managed: Managed,
    ) -> Result<Value, ApiError> {
        let rt = self.type_of(key)?;
        let ns = if rt.namespaced { ns } else { "" };
        if !obj.is_object() {
            return Err(ApiError::bad_request(
                "the body of the request was not a JSON object",
            ));
        }
        let m = meta_mut(&mut obj);
        if m.get("name")
            .and_then(Value::as_str)
            .is_none_or(str::is_empty)
            && let Some(g) = m
                .get("generateName")
                .and_then(Value::as_str)
                .map(str::to_string)
        {
            let suffix: String = self
                .new_uid()
                .chars()
                .filter(|c| c.is_ascii_alphanumeric())
                .rev()
                .take(5)
                .collect();
            meta_mut(&mut obj).insert("name".into(), Value::String(format!("{g}{suffix}")));
        }
        if rt.namespaced {
            if let Some(body_ns) = meta_str(&obj, "namespace")
                && !body_ns.is_empty()
                && body_ns != ns
            {
                return Err(ApiError::bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request",
                ));
            }
            meta_mut(&mut obj).insert("namespace".into(), ns.into());
        } else {
            meta_mut(&mut obj).remove("namespace");
        }
        self.namespace_check(&rt, ns)?;
        let name = meta_str(&obj, "name").unwrap_or_default().to_string();
        if self.get(key, ns, &name).is_some() {
            return Err(ApiError::already_exists(&rt, &name));
        }
        if rt.status
            && opts.subresource.is_none()
            && !matches!(managed, Managed::System)
            && let Some(m) = obj.as_object_mut()
        {
            m.remove("status");
        }
        obj["apiVersion"] = rt.api_version(&opts.version).into();
        obj["kind"] = rt.kind.clone().into();
        builtin_defaults(&rt, &mut obj);
        let mut obj = self
            .validate(&rt, obj, None, &opts.version)
            .map_err(|e| ApiError::invalid(&rt, &name, &e))?;
        let uid = self.new_uid();
        let m = meta_mut(&mut obj);
        m.insert("uid".into(), uid.into());
        m.insert("creationTimestamp".into(), now_rfc3339().into());
        m.remove("deletionTimestamp");
        m.remove("deletionGracePeriodSeconds");
        m.remove("resourceVersion");
        m.remove("managedFields");
        if rt.generation {
            m.insert("generation".into(), 1.into());
        } else {
            m.remove("generation");
        }
        if rt.plural == "customresourcedefinitions" {
            set_crd_status(&mut obj);
        }
        let subresource = opts.subresource.clone().unwrap_or_default();
        match managed {
            Managed::Update(mgr) => {
                let fields = util::leaf_paths(&obj, &rt.list_rules(&opts.version));
                let entry = ManagedEntry {
                    manager: mgr,
                    operation: "Update".into(),
                    api_version: rt.api_version(&opts.version),
                    time: now_rfc3339(),
                    subresource,
                    fields,
                };
                util::write_managed(&mut obj, &[entry]);
            }
            Managed::Apply(entries) => util::write_managed(&mut obj, &entries),
            Managed::System => {}
        }
        if opts.dry_run {
            return Ok(obj);
        }
        self.rv += 1;
        meta_mut(&mut obj).insert("resourceVersion".into(), self.rv.to_string().into());
        if rt.plural == "customresourcedefinitions" {
            self.register_crd(&obj);
        }
        self.objects
            .entry(key.clone())
            .or_default()
            .insert((ns.to_string(), name.clone()), obj.clone());
        self.emit(key, ns, "ADDED", obj.clone(), None);
        if !self.owners_live(&obj, ns) {
            self.gc_pending = true;
        }
        Ok(obj)
    }

    /// Updates an existing object with the full new content `new` (after any patch was applied).
    pub(crate) fn update(
        &mut self,
        key: &ResKey,
        ns: &str,
        name: &str,
        mut new: Value,
        opts: &WriteOpts,
        managed: Managed,
    ) -> Result<Value, ApiError> {
        let rt = self.type_of(key)?;
        let ns = if rt.namespaced { ns } else { "" };
        let old = self
            .get(key, ns, name)
            .cloned()
            .ok_or_else(|| ApiError::not_found(&rt, name))?;
        if !new.is_object() {
            return Err(ApiError::bad_request(
                "the body of the request was not a JSON object",
            ));
        }
        if let Some(n) = meta_str(&new, "name")
            && !n.is_empty()
            && n != name
        {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({n}) does not match the name on the URL ({name})"
            )));
        }
        if let Some(rv) = meta_str(&new, "resourceVersion")
            && !rv.is_empty()
            && Some(rv) != meta_str(&old, "resourceVersion")
        {
            return Err(ApiError::conflict(&rt, name));
        }
        let mut fin = match opts.subresource.as_deref() {
            Some("status") => {
                let mut f = old.clone();
                match new.get("status") {
                    Some(s) => f["status"] = s.clone(),
                    None => {
                        if let Some(m) = f.as_object_mut() {
                            m.remove("status");
                        }
                    }
                }
                f
            }
            Some(other) => {
                return Err(ApiError::bad_request(format!(
                    "subresource {other} is not supported"
                )));
            }
            None => {
                if rt.status {
                    match old.get("status") {
                        Some(s) => new["status"] = s.clone(),
                        None => {
                            if let Some(m) = new.as_object_mut() {
                                m.remove("status");
                            }
                        }
                    }
                }
                new
            }
        };
        // System metadata is the server's.
        {
            let old_meta = meta(&old).cloned().unwrap_or_default();
            let m = meta_mut(&mut fin);
            for k in [
                "uid",
                "creationTimestamp",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
                "generation",
                "namespace",
                "name",
            ] {
                match old_meta.get(k) {
                    Some(v) => {
                        m.insert(k.into(), v.clone());
                    }
                    None => {
                        m.remove(k);
                    }
                }
            }
            m.insert(
                "resourceVersion".into(),
                old_meta
                    .get("resourceVersion")
                    .cloned()
                    .unwrap_or(Value::Null),
            );
            if let Some(mf) = old_meta.get("managedFields") {
                m.insert("managedFields".into(), mf.clone());
            }
        }
        fin["apiVersion"] = rt.api_version(&opts.version).into();
        fin["kind"] = rt.kind.clone().into();
        builtin_defaults(&rt, &mut fin);
        let mut fin = self
            .validate(&rt, fin, Some(&old), &opts.version)
            .map_err(|e| ApiError::invalid(&rt, name, &e))?;
        if rt.generation && generation_content(&rt, &fin) != generation_content(&rt, &old) {
            let g = old
                .pointer("/metadata/generation")
                .and_then(Value::as_i64)
                .unwrap_or(0)
                + 1;
            meta_mut(&mut fin).insert("generation".into(), g.into());
        }
        if rt.plural == "customresourcedefinitions" {
            set_crd_status(&mut fin);
        }
        let subresource = opts.subresource.clone().unwrap_or_default();
        match managed {
            Managed::Update(mgr) => {
                let changed = util::changed_paths(&old, &fin, &rt.list_rules(&opts.version));
                if !changed.is_empty() {
                    let mut entries = util::read_managed(&old);
                    for e in entries.iter_mut() {
                        e.fields.retain(|p| !changed.contains(p));
                    }
                    let pos = entries.iter().position(|e| {
                        e.manager == mgr && e.operation == "Update" && e.subresource == subresource
                    });
                    let api_version = rt.api_version(&opts.version);
                    match pos {
                        Some(i) => {
                            entries[i].fields.extend(changed);
                            entries[i].time = now_rfc3339();
                        }
                        None => entries.push(ManagedEntry {
                            manager: mgr,
                            operation: "Update".into(),
                            api_version,
                            time: now_rfc3339(),
                            subresource,
                            fields: changed,
                        }),
                    }
                    util::write_managed(&mut fin, &entries);
                }
            }
            Managed::Apply(entries) => util::write_managed(&mut fin, &entries),
            Managed::System => {}
        }
        if strip_volatile(&fin) == strip_volatile(&old) {
            // A no-op write: the apiserver neither bumps resourceVersion nor emits an event.
            return Ok(old);
        }
        if opts.dry_run {
            return Ok(fin);
        }
        self.rv += 1;
        meta_mut(&mut fin).insert("resourceVersion".into(), self.rv.to_string().into());
        let deleting = meta(&fin)
            .and_then(|m| m.get("deletionTimestamp"))
            .is_some();
        if deleting && finalizers(&fin).is_empty() {
            self.remove_now(key, ns, name, Some(fin.clone()));
            return Ok(fin);
        }
        if rt.plural == "customresourcedefinitions" {
            self.register_crd(&fin);
        }
        self.objects
            .entry(key.clone())
            .or_default()
            .insert((ns.to_string(), name.to_string()), fin.clone());
        if fin.pointer("/metadata/ownerReferences") != old.pointer("/metadata/ownerReferences")
            && !self.owners_live(&fin, ns)
        {
            self.gc_pending = true;
        }
        self.emit(key, ns, "MODIFIED", fin.clone(), Some(old));
        Ok(fin)
    }

    /// Removes an object from storage right away and emits DELETED (rv must already be bumped
    /// when `updated` is given).
    fn remove_now(
        &mut self,
        key: &ResKey,
        ns: &str,
        name: &str,
        updated: Option<Value>,
    ) -> Option<Value> {
        let old = self
            .objects
            .get_mut(key)?
            .remove(&(ns.to_string(), name.to_string()))?;
        let mut obj = match updated {
            Some(u) => u,
            None => {
                self.rv += 1;
                let mut o = old.clone();
                meta_mut(&mut o).insert("resourceVersion".into(), self.rv.to_string().into());
                o
            }
        };
        meta_mut(&mut obj).insert("resourceVersion".into(), self.rv.to_string().into());
        self.emit(key, ns, "DELETED", obj.clone(), Some(old));
        self.gc_pending = true;
        if key.plural == "customresourcedefinitions" && key.group == "apiextensions.k8s.io" {
            self.unregister_crd(&obj);
        }
        Some(obj)
    }

    /// Deletes an object: with finalizers it is marked (`deletionTimestamp`) and kept.
    pub(crate) fn delete(
        &mut self,
        key: &ResKey,
        ns: &str,
        name: &str,
        options: &Value,
        propagation: Option<&str>,
    ) -> Result<Value, ApiError> {
        let rt = self.type_of(key)?;
        let ns = if rt.namespaced { ns } else { "" };
        let obj = self
            .get(key, ns, name)
            .cloned()
            .ok_or_else(|| ApiError::not_found(&rt, name))?;
        if let Some(pre) = options.get("preconditions") {
            if let Some(uid) = pre.get("uid").and_then(Value::as_str)
                && Some(uid) != meta_str(&obj, "uid")
            {
                return Err(ApiError::new(
                    409,
                    "Conflict",
                    format!(
                        "Operation cannot be fulfilled on {} \"{name}\": Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                        rt.key().qualified(),
                        meta_str(&obj, "uid").unwrap_or_default()
                    ),
                    None,
                ));
            }
            if let Some(rv) = pre.get("resourceVersion").and_then(Value::as_str)
                && Some(rv) != meta_str(&obj, "resourceVersion")
            {
                return Err(ApiError::new(
                    409,
                    "Conflict",
                    format!(
                        "Operation cannot be fulfilled on {} \"{name}\": Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {}",
                        rt.key().qualified(),
                        meta_str(&obj, "resourceVersion").unwrap_or_default()
                    ),
                    None,
                ));
            }
        }
        let dry_run = options
            .get("dryRun")
            .and_then(Value::as_array)
            .is_some_and(|a| !a.is_empty());
        if dry_run {
            return Ok(obj);
        }
        let propagation = propagation
            .map(str::to_string)
            .or_else(|| {
                options
                    .get("propagationPolicy")
                    .and_then(Value::as_str)
                    .map(str::to_string)
            })
            .or_else(|| {
                (options.get("orphanDependents").and_then(Value::as_bool) == Some(true))
                    .then(|| "Orphan".to_string())
            })
            .unwrap_or_else(|| "Background".to_string());
        let uid = meta_str(&obj, "uid").unwrap_or_default().to_string();
        match propagation.as_str() {
            "Orphan" => self.orphan_dependents(&uid),
            "Foreground" => self.delete_dependents(&uid),
            "Background" => {}
            other => {
                return Err(ApiError::invalid(
                    &rt,
                    name,
                    &[FieldError {
                        error_type: schema::FieldErrorType::NotSupported,
                        field: "propagationPolicy".into(),
                        bad_value: Some(Value::String(other.into())),
                        detail:
                            "supported values: \"Foreground\", \"Background\", \"Orphan\", \"nil\""
                                .into(),
                    }],
                ));
            }
        }
        if key.plural == "namespaces" && key.group.is_empty() {
            return Ok(self.delete_namespace(name));
        }
        if !finalizers(&obj).is_empty() {
            if meta(&obj)
                .and_then(|m| m.get("deletionTimestamp"))
                .is_some()
            {
                return Ok(obj);
            }
            let mut upd = obj.clone();
            let m = meta_mut(&mut upd);
            m.insert("deletionTimestamp".into(), now_rfc3339().into());
            m.insert("deletionGracePeriodSeconds".into(), 0.into());
            if let Some(g) = m.get("generation").and_then(Value::as_i64) {
                m.insert("generation".into(), (g + 1).into());
            }
            self.rv += 1;
            meta_mut(&mut upd).insert("resourceVersion".into(), self.rv.to_string().into());
            self.objects
                .entry(key.clone())
                .or_default()
                .insert((ns.to_string(), name.to_string()), upd.clone());
            self.emit(key, ns, "MODIFIED", upd.clone(), Some(obj));
            return Ok(upd);
        }
        Ok(self.remove_now(key, ns, name, None).unwrap_or(obj))
    }

    fn delete_namespace(&mut self, name: &str) -> Value {
        let key = ResKey::new("", "namespaces");
        let Some(obj) = self.get(&key, "", name).cloned() else {
            return Value::Null;
        };
        let mut upd = obj.clone();
        if meta(&obj)
            .and_then(|m| m.get("deletionTimestamp"))
            .is_none()
        {
            meta_mut(&mut upd).insert("deletionTimestamp".into(), now_rfc3339().into());
            meta_mut(&mut upd).insert("deletionGracePeriodSeconds".into(), 0.into());
            upd["status"] = json!({"phase": "Terminating"});
            self.rv += 1;
            meta_mut(&mut upd).insert("resourceVersion".into(), self.rv.to_string().into());
            self.objects
                .entry(key.clone())
                .or_default()
                .insert((String::new(), name.to_string()), upd.clone());
            self.emit(&key, "", "MODIFIED", upd.clone(), Some(obj));
        }
        let contents: Vec<(ResKey, String)> = self
            .objects
            .iter()
            .flat_map(|(k, m)| {
                m.keys()
                    .filter(|(ns, _)| ns == name)
                    .map(move |(_, n)| (k.clone(), n.clone()))
            })
            .collect();
        for (k, n) in contents {
            let _ = self.delete(&k, name, &n, &Value::Null, None);
        }
        self.gc_pending = true;
        upd
    }

    /// Whether every owner `obj` names exists, found by its kind and name (in `ns`, or
    /// cluster-scoped) with the same uid: O(owners × log n), where a garbage-collection pass
    /// reads every stored object. `false` when any owner is not found this way (gone, of an
    /// unknown kind, or a uid that differs): the full pass then decides, by uid, as before.
    /// Without this, each write of an owned object (every synced Secret) cost a pass over the
    /// whole store: O(n) per write, O(n²) over n policies.
    fn owners_live(&self, obj: &Value, ns: &str) -> bool {
        let Some(refs) = obj
            .pointer("/metadata/ownerReferences")
            .and_then(Value::as_array)
        else {
            return true;
        };
        refs.iter().all(|r| {
            let field = |k: &str| r.get(k).and_then(Value::as_str).unwrap_or_default();
            let Some(rt) = self.find_kind(field("apiVersion"), field("kind")) else {
                return false;
            };
            let owner_ns = if rt.namespaced { ns } else { "" };
            self.get(&rt.key(), owner_ns, field("name"))
                .and_then(|o| meta_str(o, "uid"))
                .is_some_and(|uid| uid == field("uid"))
        })
    }

    fn dependents_of(&self, uid: &str) -> Vec<(ResKey, String, String)> {
        let mut out = Vec::new();
        for (k, m) in &self.objects {
            for ((ns, n), o) in m {
                if o.pointer("/metadata/ownerReferences")
                    .and_then(Value::as_array)
                    .is_some_and(|refs| {
                        refs.iter()
                            .any(|r| r.get("uid").and_then(Value::as_str) == Some(uid))
                    })
                {
                    out.push((k.clone(), ns.clone(), n.clone()));
                }
            }
        }
        out
    }

    fn orphan_dependents(&mut self, uid: &str) {
        for (k, ns, n) in self.dependents_of(uid) {
            self.remove_owner_refs(&k, &ns, &n, &[uid.to_string()]);
        }
    }

    fn delete_dependents(&mut self, uid: &str) {
        for (k, ns, n) in self.dependents_of(uid) {
            if let Some(o) = self.get(&k, &ns, &n) {
                let dep_uid = meta_str(o, "uid").unwrap_or_default().to_string();
                self.delete_dependents(&dep_uid);
                let _ = self.delete(&k, &ns, &n, &Value::Null, Some("Background"));
            }
        }
    }

    fn remove_owner_refs(&mut self, key: &ResKey, ns: &str, name: &str, uids: &[String]) {
        let Some(old) = self.get(key, ns, name).cloned() else {
            return;
        };
        let mut upd = old.clone();
        if let Some(refs) = upd
            .pointer_mut("/metadata/ownerReferences")
            .and_then(Value::as_array_mut)
        {
            refs.retain(|r| {
                !r.get("uid")
                    .and_then(Value::as_str)
                    .is_some_and(|u| uids.iter().any(|x| x == u))
            });
            if refs.is_empty() {
                meta_mut(&mut upd).remove("ownerReferences");
            }
        }
        if upd == old {
            return;
        }
        self.rv += 1;
        meta_mut(&mut upd).insert("resourceVersion".into(), self.rv.to_string().into());
        self.objects
            .entry(key.clone())
            .or_default()
            .insert((ns.to_string(), name.to_string()), upd.clone());
        self.emit(key, ns, "MODIFIED", upd, Some(old));
    }

    /// One garbage-collection pass: dependents whose owners are all gone are deleted (dangling
    /// owner references among live ones are dropped), and empty terminating namespaces removed.
    /// Returns whether anything changed.
    pub(crate) fn gc_pass(&mut self) -> bool {
        let uids: HashSet<String> = self
            .objects
            .values()
            .flat_map(|m| m.values())
            .filter_map(|o| meta_str(o, "uid").map(str::to_string))
            .collect();
        let mut deletes = Vec::new();
        let mut strips = Vec::new();
        for (k, m) in &self.objects {
            for ((ns, n), o) in m {
                let Some(refs) = o
                    .pointer("/metadata/ownerReferences")
                    .and_then(Value::as_array)
                else {
                    continue;
                };
                if refs.is_empty() {
                    continue;
                }
                let dangling: Vec<String> = refs
                    .iter()
                    .filter_map(|r| r.get("uid").and_then(Value::as_str))
                    .filter(|u| !uids.contains(*u))
                    .map(str::to_string)
                    .collect();
                if dangling.is_empty() {
                    continue;
                }
                if dangling.len() == refs.len() {
                    if meta(o).and_then(|m| m.get("deletionTimestamp")).is_none() {
                        deletes.push((k.clone(), ns.clone(), n.clone()));
                    }
                } else {
                    strips.push((k.clone(), ns.clone(), n.clone(), dangling));
                }
            }
        }
        let mut changed = !deletes.is_empty() || !strips.is_empty();
        for (k, ns, n) in deletes {
            let _ = self.delete(&k, &ns, &n, &Value::Null, Some("Background"));
        }
        for (k, ns, n, d) in strips {
            self.remove_owner_refs(&k, &ns, &n, &d);
        }
        let ns_key = ResKey::new("", "namespaces");
        let terminating: Vec<String> = self
            .objects
            .get(&ns_key)
            .map(|m| {
                m.iter()
                    .filter(|(_, o)| meta(o).and_then(|m| m.get("deletionTimestamp")).is_some())
                    .map(|((_, n), _)| n.clone())
                    .collect()
            })
            .unwrap_or_default();
        for ns in terminating {
            let empty = self
                .objects
                .values()
                .all(|m| m.keys().all(|(o_ns, _)| o_ns != &ns));
            if empty {
                self.remove_now(&ns_key, "", &ns, None);
                changed = true;
            }
        }
        changed
    }

    fn register_crd(&mut self, crd: &Value) {
        let Some(rt) = crd_resource_type(crd) else {
            return;
        };
        self.types.insert(rt.key(), rt);
    }

    fn unregister_crd(&mut self, crd: &Value) {
        let Some(rt) = crd_resource_type(crd) else {
            return;
        };
        let key = rt.key();
        let names: Vec<(String, String)> = self
            .objects
            .get(&key)
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default();
        for (ns, n) in names {
            self.remove_now(&key, &ns, &n, None);
        }
        self.objects.remove(&key);
        self.types.remove(&key);
    }

    /// The status a workload emulation wants now, or None if the object is not a workload.
    pub(crate) fn rollout_tick(&mut self) {
        let now = Instant::now();
        let mut writes = Vec::new();
        for plural in ["deployments", "statefulsets", "daemonsets"] {
            let key = ResKey::new("apps", plural);
            let Some(objs) = self.objects.get(&key) else {
                continue;
            };
            for ((ns, name), o) in objs {
                if meta(o).and_then(|m| m.get("deletionTimestamp")).is_some() {
                    continue;
                }
                let generation = o
                    .pointer("/metadata/generation")
                    .and_then(Value::as_i64)
                    .unwrap_or(1);
                let since_key = (key.clone(), ns.clone(), name.clone());
                let since = match self.rollout_since.get(&since_key) {
                    Some((g, t)) if *g == generation => *t,
                    _ => {
                        self.rollout_since.insert(since_key, (generation, now));
                        now
                    }
                };
                let stuck = self.stuck.contains(&(ns.clone(), name.clone()));
                let ready = !stuck && now.duration_since(since) >= self.rollout_delay;
                let desired = workload_status(plural, o, generation, ready);
                let current = o.get("status").cloned().unwrap_or(Value::Null);
                if strip_condition_times(&desired) != strip_condition_times(&current) {
                    writes.push((key.clone(), ns.clone(), name.clone(), desired));
                }
            }
        }
        for (key, ns, name, status) in writes {
            let Some(old) = self.get(&key, &ns, &name).cloned() else {
                continue;
            };
            let mut new = old.clone();
            new["status"] = status;
            let opts = WriteOpts {
                subresource: Some("status".into()),
                version: "v1".into(),
                dry_run: false,
            };
            let _ = self.update(&key, &ns, &name, new, &opts, Managed::System);
        }
        let live: HashSet<(ResKey, String, String)> = self
            .objects
            .iter()
            .filter(|(k, _)| k.group == "apps")
            .flat_map(|(k, m)| {
                m.keys()
                    .map(move |(ns, n)| (k.clone(), ns.clone(), n.clone()))
            })
            .collect();
        self.rollout_since.retain(|k, _| live.contains(k));
    }

    /// The fault for a request of `verb` on `resource`, if a rule matches (a rule with a count
    /// is used up).
    pub(crate) fn take_fault(&mut self, verb: &str, resource: &str) -> Option<crate::Fault> {
        let i = self
            .faults
            .iter()
            .position(|r| (r.verb == "*" || r.verb == verb) && r.resource == resource)?;
        let rule = &mut self.faults[i];
        let fault = rule.fault.clone();
        if let Some(n) = rule.remaining.as_mut() {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.faults.remove(i);
            }
        }
        Some(fault)
    }

    pub(crate) fn count(&mut self, verb: &str, resource: &str) {
        *self
            .counts
            .entry((verb.to_string(), resource.to_string()))
            .or_default() += 1;
    }
}

fn strip_condition_times(status: &Value) -> Value {
    let mut s = status.clone();
    if let Some(conds) = s.get_mut("conditions").and_then(Value::as_array_mut) {
        for c in conds {
            if let Some(m) = c.as_object_mut() {
                m.remove("lastTransitionTime");
                m.remove("lastUpdateTime");
            }
        }
    }
    s
}

fn workload_status(plural: &str, obj: &Value, generation: i64, ready: bool) -> Value {
    let replicas = if plural == "daemonsets" {
        1
    } else {
        obj.pointer("/spec/replicas")
            .and_then(Value::as_i64)
            .unwrap_or(1)
    };
    let ready_n = if ready { replicas } else { 0 };
    let now = now_rfc3339();
    match plural {
        "deployments" => {
            let mut s = json!({
                "observedGeneration": generation,
                "replicas": replicas,
                "updatedReplicas": replicas,
                "readyReplicas": ready_n,
                "availableReplicas": ready_n,
                "conditions": [
                    {"type": "Available", "status": if ready { "True" } else { "False" },
                     "reason": if ready { "MinimumReplicasAvailable" } else { "MinimumReplicasUnavailable" },
                     "message": if ready { "Deployment has minimum availability." } else { "Deployment does not have minimum availability." },
                     "lastUpdateTime": now, "lastTransitionTime": now},
                    {"type": "Progressing", "status": "True",
                     "reason": if ready { "NewReplicaSetAvailable" } else { "ReplicaSetUpdated" },
                     "message": if ready { "ReplicaSet has successfully progressed." } else { "ReplicaSet is progressing." },
                     "lastUpdateTime": now, "lastTransitionTime": now}
                ]
            });
            if !ready && replicas > 0 {
                s["unavailableReplicas"] = replicas.into();
            }
            if replicas == 0 {
                let m = s.as_object_mut().expect("object");
                m.remove("readyReplicas");
                m.remove("availableReplicas");
                m.remove("updatedReplicas");
            }
            s
        }
        "statefulsets" => {
            let rev = format!(
                "{}-rev{generation}",
                meta_str(obj, "name").unwrap_or_default()
            );
            json!({
                "observedGeneration": generation,
                "replicas": replicas,
                "currentReplicas": if ready { replicas } else { 0 },
                "updatedReplicas": replicas,
                "readyReplicas": ready_n,
                "availableReplicas": ready_n,
                "currentRevision": if ready { rev.clone() } else { format!("{rev}-previous") },
                "updateRevision": rev,
                "collisionCount": 0
            })
        }
        _ => json!({
            "observedGeneration": generation,
            "desiredNumberScheduled": replicas,
            "currentNumberScheduled": replicas,
            "updatedNumberScheduled": replicas,
            "numberMisscheduled": 0,
            "numberReady": ready_n,
            "numberAvailable": ready_n,
            "numberUnavailable": replicas - ready_n
        }),
    }
}

fn validate_crd(crd: &Value) -> Vec<FieldError> {
    let mut errors = Vec::new();
    let group = crd
        .pointer("/spec/group")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let plural = crd
        .pointer("/spec/names/plural")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if group.is_empty() {
        errors.push(FieldError::required("spec.group", ""));
    }
    if plural.is_empty() {
        errors.push(FieldError::required("spec.names.plural", ""));
    }
    if crd
        .pointer("/spec/names/kind")
        .and_then(Value::as_str)
        .is_none_or(str::is_empty)
    {
        errors.push(FieldError::required("spec.names.kind", ""));
    }
    match crd.pointer("/spec/scope").and_then(Value::as_str) {
        Some("Namespaced") | Some("Cluster") => {}
        other => errors.push(FieldError {
            error_type: schema::FieldErrorType::NotSupported,
            field: "spec.scope".into(),
            bad_value: Some(
                other
                    .map(|s| Value::String(s.into()))
                    .unwrap_or(Value::String(String::new())),
            ),
            detail: "supported values: \"Cluster\", \"Namespaced\"".into(),
        }),
    }
    let versions = crd
        .pointer("/spec/versions")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if versions.is_empty() {
        errors.push(FieldError::invalid(
            "spec.versions",
            Value::Array(vec![]),
            "must have exactly one version marked as storage version",
        ));
    } else if versions
        .iter()
        .filter(|v| v.get("storage").and_then(Value::as_bool) == Some(true))
        .count()
        != 1
    {
        errors.push(FieldError::invalid(
            "spec.versions",
            Value::Array(versions.clone()),
            "must have exactly one version marked as storage version",
        ));
    }
    let name = meta_str(crd, "name").unwrap_or_default();
    if !plural.is_empty() && !group.is_empty() && name != format!("{plural}.{group}") {
        errors.push(FieldError::invalid(
            "metadata.name",
            Value::String(name.into()),
            "must be spec.names.plural+\".\"+spec.group",
        ));
    }
    errors.extend(schema::check_rules_compile(crd));
    errors
}

fn set_crd_status(crd: &mut Value) {
    let names = crd.pointer("/spec/names").cloned().unwrap_or(json!({}));
    let mut accepted = names.clone();
    if accepted.get("singular").is_none()
        && let Some(k) = names.get("kind").and_then(Value::as_str)
    {
        accepted["singular"] = k.to_lowercase().into();
    }
    if accepted.get("listKind").is_none()
        && let Some(k) = names.get("kind").and_then(Value::as_str)
    {
        accepted["listKind"] = format!("{k}List").into();
    }
    let storage: Vec<Value> = crd
        .pointer("/spec/versions")
        .and_then(Value::as_array)
        .map(|vs| {
            vs.iter()
                .filter(|v| v.get("storage").and_then(Value::as_bool) == Some(true))
                .filter_map(|v| v.get("name").cloned())
                .collect()
        })
        .unwrap_or_default();
    let now = now_rfc3339();
    let prev_time = |t: &str| {
        crd.pointer("/status/conditions")
            .and_then(Value::as_array)
            .and_then(|cs| {
                cs.iter()
                    .find(|c| c.get("type").and_then(Value::as_str) == Some(t))
            })
            .and_then(|c| c.get("lastTransitionTime").cloned())
            .unwrap_or_else(|| Value::String(now.clone()))
    };
    crd["status"] = json!({
        "acceptedNames": accepted,
        "conditions": [
            {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts", "message": "no conflicts found", "lastTransitionTime": prev_time("NamesAccepted")},
            {"type": "Established", "status": "True", "reason": "InitialNamesAccepted", "message": "the initial names have been accepted", "lastTransitionTime": prev_time("Established")}
        ],
        "storedVersions": storage,
    });
}

/// The resource a CRD defines.
pub(crate) fn crd_resource_type(crd: &Value) -> Option<ResourceType> {
    let spec = crd.get("spec")?;
    let group = spec.get("group")?.as_str()?.to_string();
    let names = spec.get("names")?;
    let plural = names.get("plural")?.as_str()?.to_string();
    let kind = names.get("kind")?.as_str()?.to_string();
    let str_list = |v: Option<&Value>| -> Vec<String> {
        v.and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default()
    };
    let versions_v = spec
        .get("versions")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    // Storage version first, then the other served versions.
    let mut versions: Vec<String> = Vec::new();
    let mut status = false;
    for v in &versions_v {
        if v.get("served").and_then(Value::as_bool) == Some(false) {
            continue;
        }
        let name = v
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        if v.get("storage").and_then(Value::as_bool) == Some(true) {
            versions.insert(0, name);
        } else {
            versions.push(name);
        }
        if v.pointer("/subresources/status").is_some() {
            status = true;
        }
    }
    if spec.pointer("/subresources/status").is_some() {
        status = true;
    }
    Some(ResourceType {
        group,
        versions,
        singular: names
            .get("singular")
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| kind.to_lowercase()),
        plural,
        kind,
        namespaced: spec.get("scope").and_then(Value::as_str) != Some("Cluster"),
        short_names: str_list(names.get("shortNames")),
        categories: str_list(names.get("categories")),
        status,
        generation: true,
        crd: Some(Arc::new(crd.clone())),
    })
}

/// Fields another manager owns that an apply would change: (manager, path).
pub(crate) type Conflicts = Vec<(String, FieldPath)>;

/// Computes the managedFields entries and the merged object of a server-side apply.
///
/// `current` is the stored object (None for create). Returns the object to write and the new
/// managedFields entries, or the conflicting (manager, path) pairs.
#[allow(clippy::too_many_arguments)]
pub(crate) fn apply_merge(
    current: Option<&Value>,
    applied: &Value,
    manager: &str,
    subresource: &str,
    api_version: &str,
    force: bool,
    status_subresource: bool,
    rules: &util::ListRules,
) -> Result<(Value, Vec<ManagedEntry>), Conflicts> {
    let mut applied_paths = util::leaf_paths(applied, rules);
    if status_subresource {
        let is_status = |p: &FieldPath| p.first().map(String::as_str) == Some("status");
        if subresource == "status" {
            applied_paths.retain(is_status);
        } else {
            applied_paths.retain(|p| !is_status(p));
        }
    }
    let mut entries = current.map(util::read_managed).unwrap_or_default();
    let base = current.cloned().unwrap_or_else(|| json!({}));
    let mine = |e: &ManagedEntry| {
        e.manager == manager && e.operation == "Apply" && e.subresource == subresource
    };
    // Conflicts: fields another manager owns whose value this apply changes.
    let mut conflicts = Vec::new();
    for e in entries.iter().filter(|e| !mine(e)) {
        for p in e.fields.intersection(&applied_paths) {
            if util::get_path(&base, p) != util::get_path(applied, p) {
                conflicts.push((e.manager.clone(), p.clone()));
            }
        }
    }
    if !conflicts.is_empty() && !force {
        return Err(conflicts);
    }
    let conflicted: BTreeSet<FieldPath> = conflicts.into_iter().map(|(_, p)| p).collect();
    for e in entries.iter_mut().filter(|e| !mine(e)) {
        e.fields.retain(|p| !conflicted.contains(p));
    }
    let mut merged = base.clone();
    util::apply_merge_value(&mut merged, applied, &Vec::new(), rules);
    // Fields (and list elements) this manager applied before but not now, and nobody else
    // owns, are removed.
    match entries.iter().position(mine) {
        Some(i) => {
            let previously = entries[i].fields.clone();
            let others: Vec<FieldPath> = entries
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .flat_map(|(_, e)| e.fields.iter().cloned())
                .collect();
            let touched = |c: &[String]| {
                applied_paths
                    .iter()
                    .chain(others.iter())
                    .any(|q| q.starts_with(c) || c.starts_with(q))
            };
            for p in previously.difference(&applied_paths) {
                let mut candidates: Vec<&[String]> = (0..p.len())
                    .filter(|&k| util::is_elem(&p[k]))
                    .map(|k| &p[..=k])
                    .collect();
                if !util::is_key_field(p) {
                    candidates.push(&p[..]);
                }
                if let Some(c) = candidates.into_iter().find(|c| !touched(c)) {
                    util::remove_path(&mut merged, c);
                }
            }
            entries[i].fields = applied_paths;
            entries[i].time = now_rfc3339();
            entries[i].api_version = api_version.to_string();
        }
        None => entries.push(ManagedEntry {
            manager: manager.to_string(),
            operation: "Apply".into(),
            api_version: api_version.to_string(),
            time: now_rfc3339(),
            subresource: subresource.to_string(),
            fields: applied_paths,
        }),
    }
    Ok((merged, entries))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_the_standard_alphabet_with_padding() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"value"), "dmFsdWU=");
    }
}
