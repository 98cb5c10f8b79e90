//! OpenAPI v3 documents, as kubectl reads them: `/openapi/v3` lists one document per served
//! group-version, `/openapi/v3/api/v1` and `/openapi/v3/apis/{group}/{version}` hold the kinds'
//! schemas (`kubectl explain`) and their paths, whose PATCH operations declare the
//! `fieldValidation` parameter (so `kubectl apply` leaves validation to the server instead of
//! failing for want of a schema).
//!
//! Built-in kinds carry the upstream schemas (from `k8s-openapi`); custom kinds the schema of
//! their CRD version, with `metadata` referring to `ObjectMeta` as on the apiserver.

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, OnceLock};

use axum::http::Uri;
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

use crate::server::Shared;
use crate::store::{ResourceType, State};

const OBJECT_META: &str = "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta";

/// Serves `/openapi/v3` and its documents; `None` for other paths.
pub(crate) fn serve(shared: &Arc<Shared>, uri: &Uri) -> Option<Response> {
    let rest = uri.path().strip_prefix("/openapi/v3")?;
    let rest = rest.trim_matches('/');
    let st = shared.lock();
    let body = if rest.is_empty() {
        Some(root(&st))
    } else {
        group_versions(&st)
            .into_iter()
            .find(|(path, _, _)| path == rest)
            .map(|(_, group, version)| document(&st, &group, &version))
    };
    drop(st);
    Some(match body {
        Some(b) => axum::Json(b).into_response(),
        None => {
            let status = json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
                "status": "Failure", "message": "the server could not find the requested resource",
                "reason": "NotFound", "details": {}, "code": 404});
            (axum::http::StatusCode::NOT_FOUND, axum::Json(status)).into_response()
        }
    })
}

/// `(path, group, version)` of every served group-version: `api/v1`, `apis/apps/v1`, ...
fn group_versions(st: &State) -> Vec<(String, String, String)> {
    let mut out: Vec<(String, String, String)> = Vec::new();
    for t in st.types.values() {
        for v in &t.versions {
            let path = if t.group.is_empty() {
                format!("api/{v}")
            } else {
                format!("apis/{}/{v}", t.group)
            };
            if !out.iter().any(|(p, _, _)| *p == path) {
                out.push((path, t.group.clone(), v.clone()));
            }
        }
    }
    out.sort();
    out
}

/// The discovery document: one entry per group-version, with a hash of its content.
fn root(st: &State) -> Value {
    let mut paths = Map::new();
    for (path, group, version) in group_versions(st) {
        let doc = document(st, &group, &version);
        let mut h = std::collections::hash_map::DefaultHasher::new();
        doc.to_string().hash(&mut h);
        paths.insert(
            path.clone(),
            json!({"serverRelativeURL": format!("/openapi/v3/{path}?hash={:016X}", h.finish())}),
        );
    }
    json!({"paths": paths})
}

/// Upstream schemas of the built-in kinds (and everything they refer to), by schema name.
struct Builtins {
    definitions: Map<String, Value>,
    /// (group, version, kind) → schema name.
    kinds: BTreeMap<(String, String, String), String>,
}

fn builtins() -> &'static Builtins {
    static CELL: OnceLock<Builtins> = OnceLock::new();
    CELL.get_or_init(|| {
        use k8s_openapi::api;
        use schemars::JsonSchema;
        let mut generator = schemars::generate::SchemaSettings::openapi3().into_generator();
        let mut kinds = BTreeMap::new();
        let mut add = |group: &str, version: &str, kind: &str, name: std::borrow::Cow<'static, str>| {
            kinds.insert(
                (group.to_string(), version.to_string(), kind.to_string()),
                name.into_owned(),
            );
        };
        macro_rules! kind {
            ($g:expr, $v:expr, $k:expr, $t:ty) => {{
                let _ = generator.subschema_for::<$t>();
                add($g, $v, $k, <$t>::schema_name());
            }};
        }
        kind!("", "v1", "Namespace", api::core::v1::Namespace);
        kind!("", "v1", "Secret", api::core::v1::Secret);
        kind!("", "v1", "ConfigMap", api::core::v1::ConfigMap);
        kind!("", "v1", "Event", api::core::v1::Event);
        kind!("", "v1", "Pod", api::core::v1::Pod);
        kind!("", "v1", "ServiceAccount", api::core::v1::ServiceAccount);
        kind!("apps", "v1", "Deployment", api::apps::v1::Deployment);
        kind!("apps", "v1", "StatefulSet", api::apps::v1::StatefulSet);
        kind!("apps", "v1", "DaemonSet", api::apps::v1::DaemonSet);
        kind!("coordination.k8s.io", "v1", "Lease", api::coordination::v1::Lease);
        kind!("events.k8s.io", "v1", "Event", api::events::v1::Event);
        kind!(
            "admissionregistration.k8s.io",
            "v1",
            "ValidatingWebhookConfiguration",
            api::admissionregistration::v1::ValidatingWebhookConfiguration
        );
        kind!(
            "apiextensions.k8s.io",
            "v1",
            "CustomResourceDefinition",
            k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition
        );
        let _ = generator
            .subschema_for::<k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta>();
        let mut definitions = generator.take_definitions(true);
        for ((g, v, k), name) in &kinds {
            if let Some(s) = definitions.get_mut(name).and_then(Value::as_object_mut) {
                s.insert(
                    "x-kubernetes-group-version-kind".into(),
                    json!([{"group": g, "version": v, "kind": k}]),
                );
            }
        }
        Builtins { definitions, kinds }
    })
}

/// Schema names the definition `name` refers to, transitively (itself included).
fn closure(definitions: &Map<String, Value>, name: &str, out: &mut Map<String, Value>) {
    if out.contains_key(name) {
        return;
    }
    let Some(def) = definitions.get(name) else {
        return;
    };
    out.insert(name.to_string(), def.clone());
    let mut refs = Vec::new();
    collect_refs(def, &mut refs);
    for r in refs {
        closure(definitions, &r, out);
    }
}

fn collect_refs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, sub) in m {
                match (k.as_str(), sub) {
                    ("$ref", Value::String(r)) => {
                        if let Some(name) = r.strip_prefix("#/components/schemas/") {
                            out.push(name.to_string());
                        }
                    }
                    _ => collect_refs(sub, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|x| collect_refs(x, out)),
        _ => {}
    }
}

/// `io.stripekeys.v1alpha1.StripeKeyPolicy`: the apiserver's name for a custom kind's schema.
fn crd_schema_name(group: &str, version: &str, kind: &str) -> String {
    let reversed: Vec<&str> = group.split('.').rev().collect();
    format!("{}.{version}.{kind}", reversed.join("."))
}

/// The schema of a custom kind as the apiserver publishes it.
fn crd_schema(t: &ResourceType, crd: &Value, version: &str) -> Value {
    let mut s = crate::schema::version_schema(crd, version)
        .cloned()
        .unwrap_or_else(|| json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true}));
    if !s.get("properties").is_some_and(Value::is_object) {
        s["properties"] = json!({});
    }
    let props = &mut s["properties"];
    props["metadata"] = json!({
        "description": "Standard object's metadata. More info: https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md#metadata",
        "allOf": [{"$ref": format!("#/components/schemas/{OBJECT_META}")}],
    });
    if props.get("apiVersion").is_none() {
        props["apiVersion"] = json!({"type": "string", "description": "APIVersion defines the versioned schema of this representation of an object. Servers should convert recognized schemas to the latest internal value, and may reject unrecognized values. More info: https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md#resources"});
    }
    if props.get("kind").is_none() {
        props["kind"] = json!({"type": "string", "description": "Kind is a string value representing the REST resource this object represents. Servers may infer this from the endpoint the client submits requests to. Cannot be updated. In CamelCase. More info: https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md#types-kinds"});
    }
    s["x-kubernetes-group-version-kind"] =
        json!([{"group": t.group, "version": version, "kind": t.kind}]);
    s
}

/// The OpenAPI v3 document of one group-version.
fn document(st: &State, group: &str, version: &str) -> Value {
    let b = builtins();
    let mut schemas = Map::new();
    let mut paths = Map::new();
    let prefix = if group.is_empty() {
        format!("/api/{version}")
    } else {
        format!("/apis/{group}/{version}")
    };
    for t in st
        .types
        .values()
        .filter(|t| t.group == group && t.versions.iter().any(|v| v == version))
    {
        let name = match &t.crd {
            Some(crd) => {
                let name = crd_schema_name(group, version, &t.kind);
                schemas.insert(name.clone(), crd_schema(t, crd, version));
                closure(&b.definitions, OBJECT_META, &mut schemas);
                name
            }
            None => {
                let key = (group.to_string(), version.to_string(), t.kind.clone());
                let Some(name) = b.kinds.get(&key) else {
                    continue;
                };
                closure(&b.definitions, name, &mut schemas);
                name.clone()
            }
        };
        let gvk = json!({"group": group, "version": version, "kind": t.kind});
        let collection = if t.namespaced {
            format!("{prefix}/namespaces/{{namespace}}/{}", t.plural)
        } else {
            format!("{prefix}/{}", t.plural)
        };
        let mut path_params = vec![];
        if t.namespaced {
            path_params.push(json!({"name": "namespace", "in": "path", "required": true,
                "description": "object name and auth scope, such as for teams and projects",
                "schema": {"type": "string", "uniqueItems": true}}));
        }
        let mut item_params = path_params.clone();
        item_params.push(json!({"name": "name", "in": "path", "required": true,
            "description": format!("name of the {}", t.kind), "schema": {"type": "string", "uniqueItems": true}}));
        let op = |action: &str, verb: &str, query: &[&str]| {
            let parameters: Vec<Value> = query
                .iter()
                .map(|q| json!({"name": q, "in": "query", "schema": {"type": "string", "uniqueItems": true}}))
                .collect();
            json!({
                "operationId": format!("{verb}{}", t.kind),
                "x-kubernetes-action": action,
                "x-kubernetes-group-version-kind": gvk,
                "parameters": parameters,
                "responses": {"200": {"description": "OK", "content": {"application/json": {
                    "schema": {"$ref": format!("#/components/schemas/{name}")}}}}},
            })
        };
        let writes = ["dryRun", "fieldManager", "fieldValidation"];
        paths.insert(
            collection.clone(),
            json!({
                "parameters": path_params,
                "get": op("list", "list", &["labelSelector", "fieldSelector", "limit", "continue", "watch"]),
                "post": op("post", "create", &writes),
            }),
        );
        paths.insert(
            format!("{collection}/{{name}}"),
            json!({
                "parameters": item_params,
                "get": op("get", "read", &[]),
                "put": op("put", "replace", &writes),
                "patch": op("patch", "patch", &["dryRun", "fieldManager", "fieldValidation", "force"]),
                "delete": op("delete", "delete", &["dryRun", "propagationPolicy"]),
            }),
        );
    }
    json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": "v1.33.0-kube-test-api"},
        "paths": paths,
        "components": {"schemas": schemas},
    })
}
