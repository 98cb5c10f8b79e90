//! HTTP routing: discovery, CRUD, patch, watch.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::sync::broadcast::error::TryRecvError;

use crate::record::{self, RecordedRequest};
use crate::store::{
    self, ApiError, Managed, Record, ResKey, ResourceType, State, WriteOpts, meta_str,
};
use crate::util;

pub(crate) struct Shared {
    pub state: Mutex<State>,
    pub bookmark_interval: Duration,
    pub gc_notify: tokio::sync::Notify,
    pub addr: std::net::SocketAddr,
    pub shutdown: tokio::sync::watch::Receiver<bool>,
    /// Every authorization check made, for [`crate::TestApiServer::recorded_requests`].
    pub requests: Mutex<crate::record::RequestLog>,
}

impl Shared {
    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn json_response(code: u16, body: &Value) -> Response {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    Response::builder()
        .status(StatusCode::from_u16(code).unwrap_or(StatusCode::OK))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(bytes))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

fn error_response(e: &ApiError) -> Response {
    json_response(e.code, &e.to_status())
}

fn parse_query(uri: &Uri) -> HashMap<String, String> {
    let mut out = HashMap::new();
    if let Some(q) = uri.query() {
        for pair in q.split('&') {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            out.insert(percent_decode(k), percent_decode(v));
        }
    }
    out
}

pub(crate) fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b'%' if i + 2 < bytes.len() => {
                match u8::from_str_radix(
                    std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("zz"),
                    16,
                ) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                    }
                    Err(_) => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A parsed resource request path.
struct Target {
    group: String,
    version: String,
    plural: String,
    namespace: Option<String>,
    name: Option<String>,
    subresource: Option<String>,
}

enum Route {
    Version,
    Api,
    Apis,
    CoreResources,
    Group(String),
    GroupResources(String, String),
    Resource(Target),
}

fn route(path: &str, state: &State) -> Option<Route> {
    let segs: Vec<String> = path
        .trim_matches('/')
        .split('/')
        .map(percent_decode)
        .collect();
    let segs: Vec<&str> = segs.iter().map(String::as_str).collect();
    let (group, version, rest): (&str, &str, &[&str]) = match segs.as_slice() {
        ["version"] => return Some(Route::Version),
        ["api"] => return Some(Route::Api),
        ["apis"] => return Some(Route::Apis),
        ["api", "v1"] => return Some(Route::CoreResources),
        ["apis", g] => return Some(Route::Group(g.to_string())),
        ["apis", g, v] => return Some(Route::GroupResources(g.to_string(), v.to_string())),
        ["api", "v1", rest @ ..] => ("", "v1", rest),
        ["apis", g, v, rest @ ..] => (g, v, rest),
        _ => return None,
    };
    let namespaced_path = rest.len() >= 3
        && rest[0] == "namespaces"
        && state
            .find_type(group, version, rest[2])
            .is_some_and(|t| t.namespaced);
    let (namespace, rest) = if namespaced_path {
        (Some(rest[1].to_string()), &rest[2..])
    } else {
        (None, rest)
    };
    let t = Target {
        group: group.into(),
        version: version.into(),
        plural: rest.first()?.to_string(),
        namespace,
        name: rest.get(1).map(|s| s.to_string()),
        subresource: rest.get(2).map(|s| s.to_string()),
    };
    if rest.len() > 3 {
        return None;
    }
    Some(Route::Resource(t))
}

fn resource_list(state: &State, group: &str, version: &str) -> Option<Value> {
    let gv = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    let mut resources = Vec::new();
    let mut any = false;
    for t in state
        .types
        .values()
        .filter(|t| t.group == group && t.versions.iter().any(|v| v == version))
    {
        any = true;
        let mut r = json!({
            "name": t.plural,
            "singularName": t.singular,
            "namespaced": t.namespaced,
            "kind": t.kind,
            "verbs": ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"],
        });
        if !t.short_names.is_empty() {
            r["shortNames"] = json!(t.short_names);
        }
        if !t.categories.is_empty() {
            r["categories"] = json!(t.categories);
        }
        resources.push(r);
        if t.status {
            resources.push(json!({
                "name": format!("{}/status", t.plural),
                "singularName": "",
                "namespaced": t.namespaced,
                "kind": t.kind,
                "verbs": ["get", "patch", "update"],
            }));
        }
    }
    any.then(|| json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources}))
}

fn api_groups(state: &State) -> Vec<Value> {
    let mut groups: Vec<(String, Vec<String>)> = Vec::new();
    for t in state.types.values().filter(|t| !t.group.is_empty()) {
        match groups.iter_mut().find(|(g, _)| *g == t.group) {
            Some((_, vs)) => {
                for v in &t.versions {
                    if !vs.contains(v) {
                        vs.push(v.clone());
                    }
                }
            }
            None => groups.push((t.group.clone(), t.versions.clone())),
        }
    }
    groups
        .into_iter()
        .map(|(g, vs)| {
            let versions: Vec<Value> = vs
                .iter()
                .map(|v| json!({"groupVersion": format!("{g}/{v}"), "version": v}))
                .collect();
            json!({"name": g, "versions": versions, "preferredVersion": versions[0]})
        })
        .collect()
}

const AGGREGATED_MIME: &str =
    "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList";

fn accept_aggregated(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("as=APIGroupDiscoveryList") && a.contains("v=v2"))
}

fn aggregated_response(body: &Value) -> Response {
    let mut r = json_response(200, body);
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(AGGREGATED_MIME),
    );
    r
}

/// Aggregated discovery (`apidiscovery.k8s.io/v2`) for the core group (`/api`) or the named
/// groups (`/apis`).
fn aggregated_discovery(state: &State, core: bool) -> Value {
    let mut groups: Vec<(String, Vec<String>)> = Vec::new();
    for t in state.types.values().filter(|t| t.group.is_empty() == core) {
        match groups.iter_mut().find(|(g, _)| *g == t.group) {
            Some((_, vs)) => {
                for v in &t.versions {
                    if !vs.contains(v) {
                        vs.push(v.clone());
                    }
                }
            }
            None => groups.push((t.group.clone(), t.versions.clone())),
        }
    }
    let items: Vec<Value> = groups
        .into_iter()
        .map(|(g, versions)| {
            let versions: Vec<Value> = versions
                .iter()
                .map(|v| {
                    let resources: Vec<Value> = state
                        .types
                        .values()
                        .filter(|t| t.group == g && t.versions.contains(v))
                        .map(|t| {
                            let kind = json!({"group": t.group, "version": v, "kind": t.kind});
                            let mut r = json!({
                                "resource": t.plural,
                                "responseKind": kind,
                                "scope": if t.namespaced { "Namespaced" } else { "Cluster" },
                                "singularResource": t.singular,
                                "verbs": ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"],
                            });
                            if !t.short_names.is_empty() {
                                r["shortNames"] = json!(t.short_names);
                            }
                            if !t.categories.is_empty() {
                                r["categories"] = json!(t.categories);
                            }
                            if t.status {
                                r["subresources"] = json!([{"subresource": "status", "responseKind": kind,
                                    "verbs": ["get", "patch", "update"]}]);
                            }
                            r
                        })
                        .collect();
                    json!({"version": v, "resources": resources, "freshness": "Current"})
                })
                .collect();
            json!({"metadata": {"name": g}, "versions": versions})
        })
        .collect();
    json!({"kind": "APIGroupDiscoveryList", "apiVersion": "apidiscovery.k8s.io/v2", "metadata": {}, "items": items})
}

fn accept_meta(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("as=PartialObjectMetadata"))
}

/// Renders a stored object for a request: requested apiVersion, or metadata only.
fn render(obj: &Value, rt: &ResourceType, version: &str, meta_only: bool) -> Value {
    if meta_only {
        return json!({
            "apiVersion": "meta.k8s.io/v1",
            "kind": "PartialObjectMetadata",
            "metadata": obj.get("metadata").cloned().unwrap_or(json!({})),
        });
    }
    let mut o = obj.clone();
    o["apiVersion"] = rt.api_version(version).into();
    o["kind"] = rt.kind.clone().into();
    o
}

fn user_agent_manager(headers: &HeaderMap) -> String {
    headers
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .map(|ua| ua.split('/').next().unwrap_or(ua).to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

/// Accepts JSON (and YAML) bodies; anything else, notably protobuf, is `415`, so clients such as
/// kubectl fall back to JSON.
fn body_as_json(content_type: &str, body: Bytes) -> Result<Bytes, ApiError> {
    let mime = content_type.split(';').next().unwrap_or_default().trim();
    match mime {
        "" | "application/json" | "*/*" => Ok(body),
        "application/yaml" => {
            let v: Value = serde_yaml::from_slice(&body).map_err(|e| {
                ApiError::bad_request(format!("the request body is not valid YAML: {e}"))
            })?;
            Ok(Bytes::from(serde_json::to_vec(&v).unwrap_or_default()))
        }
        other => Err(ApiError::new(
            415,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format - accepted media types include: application/json, application/yaml (got {other})"
            ),
            None,
        )),
    }
}

fn parse_body(body: &Bytes) -> Result<Value, ApiError> {
    if body.is_empty() {
        return Ok(Value::Null);
    }
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the request body is not valid JSON: {e}")))
}

/// Set on a request that another API view (events.k8s.io over core Events) forwards: the group
/// the client asked for, which authorization and the request log see.
pub(crate) const VIEW_GROUP_HEADER: &str = "x-kube-test-api-view-group";

pub(crate) async fn handle(
    shared: Arc<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(r) = crate::openapi::serve(&shared, &uri) {
        return r;
    }
    if let Some(r) = crate::events::serve_view(
        shared.clone(),
        method.clone(),
        &uri,
        headers.clone(),
        body.clone(),
    )
    .await
    {
        return r;
    }
    let mut headers = headers;
    headers.remove(VIEW_GROUP_HEADER);
    handle_inner(shared, method, uri, headers, body).await
}

pub(crate) async fn handle_inner(
    shared: Arc<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let query = parse_query(&uri);
    let route = {
        let st = shared.lock();
        route(uri.path(), &st)
    };
    let Some(route) = route else {
        return error_response(&ApiError::resource_not_found());
    };
    match route {
        Route::Version => json_response(
            200,
            &json!({"major": "1", "minor": "33", "gitVersion": "v1.33.0-kube-test-api", "gitCommit": "", "gitTreeState": "clean",
                    "buildDate": "2025-01-01T00:00:00Z", "goVersion": "go1.24", "compiler": "gc", "platform": "linux/amd64"}),
        ),
        Route::Api if accept_aggregated(&headers) => {
            let st = shared.lock();
            aggregated_response(&aggregated_discovery(&st, true))
        }
        Route::Apis if accept_aggregated(&headers) => {
            let st = shared.lock();
            aggregated_response(&aggregated_discovery(&st, false))
        }
        Route::Api => json_response(
            200,
            &json!({"kind": "APIVersions", "versions": ["v1"],
                    "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": shared.addr.to_string()}]}),
        ),
        Route::Apis => {
            let st = shared.lock();
            json_response(
                200,
                &json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": api_groups(&st)}),
            )
        }
        Route::CoreResources => {
            let st = shared.lock();
            json_response(200, &resource_list(&st, "", "v1").unwrap_or(json!({})))
        }
        Route::Group(g) => {
            let st = shared.lock();
            match api_groups(&st).into_iter().find(|x| x["name"] == g) {
                Some(mut v) => {
                    v["kind"] = "APIGroup".into();
                    v["apiVersion"] = "v1".into();
                    json_response(200, &v)
                }
                None => error_response(&ApiError::resource_not_found()),
            }
        }
        Route::GroupResources(g, v) => {
            let st = shared.lock();
            match resource_list(&st, &g, &v) {
                Some(l) => json_response(200, &l),
                None => error_response(&ApiError::resource_not_found()),
            }
        }
        Route::Resource(t) => match resource(shared, method, t, query, headers, body).await {
            Ok(r) => r,
            Err(e) => error_response(&e),
        },
    }
}

async fn resource(
    shared: Arc<Shared>,
    method: Method,
    t: Target,
    query: HashMap<String, String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let rt = {
        let st = shared.lock();
        st.find_type(&t.group, &t.version, &t.plural)
            .cloned()
            .ok_or_else(ApiError::resource_not_found)?
    };
    // The apiserver authorizes a request before it looks at it further: record it first.
    let recorded = record::verb_of(
        &method,
        t.name.is_some(),
        query.get("watch").is_some_and(|w| w == "true" || w == "1"),
    )
    .map(|verb| RecordedRequest {
        user: record::user_of(&headers),
        verb: verb.into(),
        group: headers
            .get(VIEW_GROUP_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .unwrap_or_else(|| rt.group.clone()),
        resource: rt.plural.clone(),
        subresource: t.subresource.clone().unwrap_or_default(),
        namespace: t.namespace.clone().unwrap_or_default(),
        name: t
            .name
            .clone()
            .or_else(|| record::field_selector_name(query.get("fieldSelector")))
            .unwrap_or_default(),
        implied_by: None,
    });
    if let Some(r) = &recorded {
        shared.record(r.clone());
    }
    if rt.namespaced && t.name.is_some() && t.namespace.is_none() {
        return Err(ApiError::resource_not_found());
    }
    if let Some(sub) = &t.subresource
        && !(sub == "status" && rt.status)
    {
        return Err(ApiError::resource_not_found());
    }
    let key = rt.key();
    let ns = t.namespace.clone().unwrap_or_default();
    let meta_only = accept_meta(&headers);
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let body = if matches!(method, Method::POST | Method::PUT | Method::DELETE) && !body.is_empty()
    {
        body_as_json(content_type, body)?
    } else {
        body
    };
    let counted = match &t.subresource {
        Some(s) => format!("{}/{s}", rt.plural),
        None => rt.plural.clone(),
    };
    if let Some(verb) = recorded.as_ref().map(|r| r.verb.clone()) {
        let fault = shared.lock().take_fault(&verb, &counted);
        match fault {
            None => {}
            Some(crate::Fault::Delay(d)) => tokio::time::sleep(d).await,
            Some(crate::Fault::Hang) => {
                shared.lock().count(&verb, &counted);
                let mut stop = shared.shutdown.clone();
                stopped(&mut stop).await;
                return Err(ApiError::new(
                    503,
                    "ServiceUnavailable",
                    "the server is shutting down",
                    None,
                ));
            }
            Some(crate::Fault::Status(code)) => {
                shared.lock().count(&verb, &counted);
                let reason = if code == 503 {
                    "ServiceUnavailable"
                } else {
                    "InternalError"
                };
                return Err(ApiError::new(code, reason, "injected fault", None));
            }
        }
    }
    let dry_run = query.get("dryRun").is_some_and(|v| v == "All");
    let opts = WriteOpts {
        subresource: t.subresource.clone(),
        version: t.version.clone(),
        dry_run,
    };
    let manager = || {
        query
            .get("fieldManager")
            .cloned()
            .unwrap_or_else(|| user_agent_manager(&headers))
    };

    match (&method, &t.name) {
        (&Method::GET, None) => {
            let watch = query.get("watch").is_some_and(|w| w == "true" || w == "1");
            shared
                .lock()
                .count(if watch { "watch" } else { "list" }, &counted);
            let table = crate::table::requested(&headers, &query);
            if watch {
                return watch_response(shared, rt, t, query, meta_only, table);
            }
            list(&shared, &rt, &t, &query, meta_only, table)
        }
        (&Method::GET, Some(name)) => {
            let mut st = shared.lock();
            st.count("get", &counted);
            let obj = st
                .get(&key, &ns, name)
                .ok_or_else(|| ApiError::not_found(&rt, name))?;
            if let Some(include) = crate::table::requested(&headers, &query) {
                let meta = json!({"resourceVersion": st.rv.to_string()});
                let table =
                    crate::table::table(&rt, &t.version, &[obj], include, meta, chrono::Utc::now());
                return Ok(json_response(200, &table));
            }
            Ok(json_response(200, &render(obj, &rt, &t.version, meta_only)))
        }
        (&Method::POST, None) => {
            let obj = parse_body(&body)?;
            let mut st = shared.lock();
            st.count("create", &counted);
            crate::strict::check(&rt, &t.version, &obj, &query, false)?;
            let created = st.create(&key, &ns, obj, &opts, Managed::Update(manager()))?;
            if let Some(r) = &recorded {
                shared.record_all(record::owner_reference_checks(&st, r, &rt, None, &created));
            }
            drop(st);
            shared.gc_notify.notify_one();
            Ok(json_response(
                201,
                &render(&created, &rt, &t.version, false),
            ))
        }
        (&Method::PUT, Some(name)) => {
            let obj = parse_body(&body)?;
            let mut st = shared.lock();
            st.count("update", &counted);
            let old = st.get(&key, &ns, name).cloned();
            crate::strict::check(&rt, &t.version, &obj, &query, false)?;
            let updated = st.update(&key, &ns, name, obj, &opts, Managed::Update(manager()))?;
            if let Some(r) = &recorded {
                let checks = record::owner_reference_checks(&st, r, &rt, old.as_ref(), &updated);
                shared.record_all(checks);
            }
            drop(st);
            shared.gc_notify.notify_one();
            Ok(json_response(
                200,
                &render(&updated, &rt, &t.version, false),
            ))
        }
        (&Method::PATCH, Some(name)) => {
            let ctype = headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .split(';')
                .next()
                .unwrap_or_default()
                .trim()
                .to_string();
            let mut st = shared.lock();
            st.count("patch", &counted);
            let old = st.get(&key, &ns, name).cloned();
            let apply = ctype == "application/apply-patch+yaml";
            if (apply || ctype.ends_with("merge-patch+json"))
                && let Ok(patch) = serde_json::from_slice::<Value>(&body)
                    .or_else(|_| serde_yaml::from_slice::<Value>(&body))
            {
                crate::strict::check(&rt, &t.version, &patch, &query, apply)?;
            }
            let (code, out) = patch(
                &mut st,
                &rt,
                &ns,
                name,
                &ctype,
                &body,
                &opts,
                &query,
                manager(),
            )?;
            if let Some(r) = &recorded {
                let mut checks = record::owner_reference_checks(&st, r, &rt, old.as_ref(), &out);
                if old.is_none() && code == 201 {
                    // An apply patch that creates the object is authorized as a create too.
                    checks.push(RecordedRequest {
                        verb: "create".into(),
                        name: String::new(),
                        implied_by: Some("apply-create".into()),
                        ..r.clone()
                    });
                }
                shared.record_all(checks);
            }
            drop(st);
            shared.gc_notify.notify_one();
            Ok(json_response(code, &render(&out, &rt, &t.version, false)))
        }
        (&Method::DELETE, Some(name)) => {
            let options = parse_body(&body)?;
            let mut st = shared.lock();
            st.count("delete", &counted);
            let propagation = query.get("propagationPolicy").map(String::as_str);
            let out = st.delete(&key, &ns, name, &options, propagation)?;
            drop(st);
            shared.gc_notify.notify_one();
            Ok(json_response(200, &render(&out, &rt, &t.version, false)))
        }
        (&Method::DELETE, None) => {
            let options = parse_body(&body)?;
            let selector = selectors(&query)?;
            let mut st = shared.lock();
            st.count("deletecollection", &counted);
            let names: Vec<(String, String)> = st
                .objects
                .get(&key)
                .map(|m| {
                    m.iter()
                        .filter(|((o_ns, _), o)| {
                            (t.namespace.is_none() || *o_ns == ns) && selector.matches(o)
                        })
                        .map(|(k, _)| k.clone())
                        .collect()
                })
                .unwrap_or_default();
            let propagation = query.get("propagationPolicy").map(String::as_str);
            let mut items = Vec::new();
            for (o_ns, n) in names {
                if let Ok(o) = st.delete(&key, &o_ns, &n, &options, propagation) {
                    items.push(render(&o, &rt, &t.version, false));
                }
            }
            let rv = st.rv;
            drop(st);
            shared.gc_notify.notify_one();
            Ok(json_response(
                200,
                &json!({"apiVersion": rt.api_version(&t.version), "kind": format!("{}List", rt.kind),
                        "metadata": {"resourceVersion": rv.to_string()}, "items": items}),
            ))
        }
        _ => Err(ApiError::method_not_allowed()),
    }
}

#[allow(clippy::too_many_arguments)]
fn patch(
    st: &mut State,
    rt: &ResourceType,
    ns: &str,
    name: &str,
    ctype: &str,
    body: &Bytes,
    opts: &WriteOpts,
    query: &HashMap<String, String>,
    manager: String,
) -> Result<(u16, Value), ApiError> {
    let key = rt.key();
    let current = st.get(&key, ns, name).cloned();
    match ctype {
        "application/apply-patch+yaml" => {
            let field_manager = query.get("fieldManager").cloned().unwrap_or_default();
            if field_manager.is_empty() {
                return Err(ApiError::new(
                    422,
                    "Invalid",
                    "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch",
                    None,
                ));
            }
            let applied: Value = serde_json::from_slice(body)
                .or_else(|_| serde_yaml::from_slice::<Value>(body))
                .map_err(|e| ApiError::bad_request(format!("error decoding YAML: {e}")))?;
            if !applied.is_object() {
                return Err(ApiError::bad_request("the apply body must be an object"));
            }
            let av = applied
                .get("apiVersion")
                .and_then(Value::as_str)
                .unwrap_or_default();
            let kind = applied
                .get("kind")
                .and_then(Value::as_str)
                .unwrap_or_default();
            if av.is_empty() || kind.is_empty() {
                return Err(ApiError::bad_request(
                    "invalid object type: apply patches must set apiVersion and kind",
                ));
            }
            if kind != rt.kind {
                return Err(ApiError::bad_request(format!(
                    "the kind of the applied object ({kind}) does not match the resource ({})",
                    rt.kind
                )));
            }
            if let Some(n) = meta_str(&applied, "name")
                && n != name
            {
                return Err(ApiError::bad_request(format!(
                    "the name of the object ({n}) does not match the name on the URL ({name})"
                )));
            }
            let force = query.get("force").is_some_and(|f| f == "true");
            let sub = opts.subresource.clone().unwrap_or_default();
            if current.is_none() && !sub.is_empty() {
                return Err(ApiError::not_found(rt, name));
            }
            let (merged, entries) = store::apply_merge(
                current.as_ref(),
                &applied,
                &field_manager,
                &sub,
                &rt.api_version(&opts.version),
                force,
                rt.status,
                &rt.list_rules(&opts.version),
            )
            .map_err(|conflicts| {
                let n = conflicts.len();
                let lines: Vec<String> = conflicts
                    .iter()
                    .map(|(m, p)| format!("conflict with \"{m}\": {}", util::format_path(p)))
                    .collect();
                let message = if n == 1 {
                    format!("Apply failed with 1 conflict: {}", lines[0])
                } else {
                    format!("Apply failed with {n} conflicts: {}", lines.join("\n"))
                };
                let causes: Vec<Value> = conflicts
                    .iter()
                    .map(|(m, p)| json!({"reason": "FieldManagerConflict", "message": format!("conflict with \"{m}\""), "field": util::format_path(p)}))
                    .collect();
                ApiError::new(409, "Conflict", message, Some(json!({"causes": causes})))
            })?;
            match current {
                None => {
                    let mut obj = merged;
                    obj["metadata"]["name"] = name.into();
                    let created = st.create(&key, ns, obj, opts, Managed::Apply(entries))?;
                    Ok((201, created))
                }
                Some(_) => Ok((
                    200,
                    st.update(&key, ns, name, merged, opts, Managed::Apply(entries))?,
                )),
            }
        }
        "application/merge-patch+json"
        | "application/strategic-merge-patch+json"
        | "application/json-patch+json" => {
            let current = current.ok_or_else(|| ApiError::not_found(rt, name))?;
            let p = parse_body(body)?;
            let mut new = current.clone();
            if ctype == "application/json-patch+json" {
                util::json_patch(&mut new, &p)
                    .map_err(|e| ApiError::new(422, "Invalid", e, None))?;
            } else {
                if !p.is_object() {
                    return Err(ApiError::bad_request("a merge patch must be a JSON object"));
                }
                util::merge_patch(&mut new, &p);
            }
            if p.pointer("/metadata/resourceVersion").is_none()
                && ctype != "application/json-patch+json"
            {
                // A patch without a resourceVersion is unconditional.
                new["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"].clone();
            }
            Ok((
                200,
                st.update(&key, ns, name, new, opts, Managed::Update(manager))?,
            ))
        }
        other => Err(ApiError::new(
            415,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml, application/strategic-merge-patch+json (got {other:?})"
            ),
            None,
        )),
    }
}

struct Selector {
    labels: Vec<util::LabelReq>,
    fields: Vec<util::FieldReq>,
}

impl Selector {
    fn matches(&self, o: &Value) -> bool {
        util::labels_match(&self.labels, o) && util::fields_match(&self.fields, o)
    }
}

fn selectors(query: &HashMap<String, String>) -> Result<Selector, ApiError> {
    let labels = match query.get("labelSelector") {
        Some(s) => util::parse_label_selector(s).map_err(ApiError::bad_request)?,
        None => Vec::new(),
    };
    let fields = match query.get("fieldSelector") {
        Some(s) => util::parse_field_selector(s).map_err(ApiError::bad_request)?,
        None => Vec::new(),
    };
    Ok(Selector { labels, fields })
}

fn list(
    shared: &Arc<Shared>,
    rt: &ResourceType,
    t: &Target,
    query: &HashMap<String, String>,
    meta_only: bool,
    table: Option<crate::table::Include>,
) -> Result<Response, ApiError> {
    let sel = selectors(query)?;
    let limit: usize = query
        .get("limit")
        .and_then(|l| l.parse().ok())
        .filter(|l| *l > 0)
        .unwrap_or(usize::MAX);
    let (start_after, list_rv) = match query.get("continue").filter(|c| !c.is_empty()) {
        Some(c) => {
            let decoded =
                util::unhex(c).ok_or_else(|| ApiError::bad_request("invalid continue token"))?;
            let mut parts = decoded.splitn(3, '\u{0}');
            let rv: u64 = parts
                .next()
                .and_then(|r| r.parse().ok())
                .ok_or_else(|| ApiError::bad_request("invalid continue token"))?;
            let ns = parts.next().unwrap_or_default().to_string();
            let name = parts.next().unwrap_or_default().to_string();
            (Some((ns, name)), Some(rv))
        }
        None => (None, None),
    };
    let st = shared.lock();
    if let Some(rv) = list_rv
        && rv < st.compacted_rv
    {
        return Err(ApiError::expired(
            "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter, or use the continue token in this response to retrieve the remainder of the results. Continuing with the provided token results in an inconsistent list - objects that were created, modified, or deleted between the time the first chunk was returned and now may show up in the list.",
        ));
    }
    let rv = list_rv.unwrap_or(st.rv);
    let ns_filter = t.namespace.clone();
    let mut matching: Vec<(&(String, String), &Value)> = st
        .objects
        .get(&rt.key())
        .map(|m| {
            m.iter()
                .filter(|((o_ns, _), o)| {
                    ns_filter.as_ref().is_none_or(|n| n == o_ns) && sel.matches(o)
                })
                .collect()
        })
        .unwrap_or_default();
    if let Some(after) = &start_after {
        matching.retain(|(k, _)| *k > after);
    }
    let total = matching.len();
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if total > limit
        && let Some((k, _)) = matching.get(limit - 1)
    {
        metadata["continue"] = util::hex(&format!("{rv}\u{0}{}\u{0}{}", k.0, k.1)).into();
        metadata["remainingItemCount"] = ((total - limit) as u64).into();
    }
    if let Some(include) = table {
        let objects: Vec<&Value> = matching.iter().take(limit).map(|(_, o)| *o).collect();
        let table = crate::table::table(
            rt,
            &t.version,
            &objects,
            include,
            metadata,
            chrono::Utc::now(),
        );
        return Ok(json_response(200, &table));
    }
    let page: Vec<Value> = matching
        .iter()
        .take(limit)
        .map(|(_, o)| {
            let mut r = render(o, rt, &t.version, meta_only);
            if meta_only {
                r.as_object_mut().map(|m| m.remove("apiVersion"));
                r.as_object_mut().map(|m| m.remove("kind"));
            }
            r
        })
        .collect();
    let (api_version, kind) = if meta_only {
        (
            "meta.k8s.io/v1".to_string(),
            "PartialObjectMetadataList".to_string(),
        )
    } else {
        (rt.api_version(&t.version), format!("{}List", rt.kind))
    };
    Ok(json_response(
        200,
        &json!({"apiVersion": api_version, "kind": kind, "metadata": metadata, "items": page}),
    ))
}

fn event_line(etype: &str, obj: &Value) -> Bytes {
    let mut v = serde_json::to_vec(&json!({"type": etype, "object": obj})).unwrap_or_default();
    v.push(b'\n');
    Bytes::from(v)
}

struct WatchFilter {
    key: ResKey,
    namespace: Option<String>,
    sel: Selector,
    rt: ResourceType,
    version: String,
    meta_only: bool,
    /// `kubectl get -w`: each event carries a one-row Table.
    table: Option<crate::table::Include>,
}

impl WatchFilter {
    fn view(&self, obj: &Value) -> Value {
        match self.table {
            Some(include) => crate::table::table(
                &self.rt,
                &self.version,
                &[obj],
                include,
                json!({}),
                chrono::Utc::now(),
            ),
            None => render(obj, &self.rt, &self.version, self.meta_only),
        }
    }

    /// Turns a change into the event this watch sees (or none).
    fn translate(&self, rec: &Record) -> Option<Bytes> {
        if rec.key != self.key {
            return None;
        }
        if let Some(ns) = &self.namespace
            && *ns != rec.namespace
        {
            return None;
        }
        let now = self.sel.matches(&rec.obj);
        let before = rec.old.as_ref().is_some_and(|o| self.sel.matches(o));
        let etype = match (rec.etype, before, now) {
            ("DELETED", true, _) => "DELETED",
            ("DELETED", false, _) => return None,
            ("ADDED", _, true) => "ADDED",
            ("MODIFIED", true, true) => "MODIFIED",
            ("MODIFIED", false, true) => "ADDED",
            ("MODIFIED", true, false) => "DELETED",
            _ => return None,
        };
        Some(event_line(etype, &self.view(&rec.obj)))
    }

    fn bookmark(&self, rv: u64, initial_end: bool) -> Bytes {
        let mut meta = json!({"resourceVersion": rv.to_string()});
        if initial_end {
            meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        let (av, kind) = if self.meta_only {
            (
                "meta.k8s.io/v1".to_string(),
                "PartialObjectMetadata".to_string(),
            )
        } else {
            (self.rt.api_version(&self.version), self.rt.kind.clone())
        };
        event_line(
            "BOOKMARK",
            &json!({"apiVersion": av, "kind": kind, "metadata": meta}),
        )
    }
}

fn watch_response(
    shared: Arc<Shared>,
    rt: ResourceType,
    t: Target,
    query: HashMap<String, String>,
    meta_only: bool,
    table: Option<crate::table::Include>,
) -> Result<Response, ApiError> {
    let sel = selectors(&query)?;
    let bookmarks = query
        .get("allowWatchBookmarks")
        .is_some_and(|v| v == "true");
    let send_initial = query.get("sendInitialEvents").is_some_and(|v| v == "true");
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|s| s.parse::<u64>().ok())
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(1800));
    let rv_param = query.get("resourceVersion").cloned().unwrap_or_default();
    let filter = WatchFilter {
        key: rt.key(),
        namespace: t.namespace.clone(),
        sel,
        rt,
        version: t.version.clone(),
        meta_only,
        table,
    };
    let mut initial: Vec<Bytes> = Vec::new();
    let (mut rx, start_rv) = {
        let st = shared.lock();
        let rx = st.tx.subscribe();
        if rv_param.is_empty() || rv_param == "0" || send_initial {
            if let Some(m) = st.objects.get(&filter.key) {
                for ((o_ns, _), o) in m {
                    if filter.namespace.as_ref().is_none_or(|n| n == o_ns) && filter.sel.matches(o)
                    {
                        initial.push(event_line("ADDED", &filter.view(o)));
                    }
                }
            }
            if send_initial {
                initial.push(filter.bookmark(st.rv, true));
            }
        } else {
            let rv: u64 = rv_param.parse().map_err(|_| {
                ApiError::bad_request(format!("invalid resource version: {rv_param}"))
            })?;
            if rv < st.compacted_rv {
                let err = ApiError::expired(format!(
                    "too old resource version: {rv} ({})",
                    st.compacted_rv + 1
                ));
                let line = event_line("ERROR", &err.to_status());
                let body =
                    Body::from_stream(futures::stream::once(
                        async move { Ok::<_, Infallible>(line) },
                    ));
                return Ok(watch_http(body));
            }
            for rec in st.history.iter().filter(|r| r.rv > rv) {
                if let Some(b) = filter.translate(rec) {
                    initial.push(b);
                }
            }
        }
        (rx, st.rv)
    };
    // Events already in history were replayed; skip them if they are also in the channel.
    let stream = async_stream::stream! {
        for b in initial {
            yield Ok::<Bytes, Infallible>(b);
        }
        let deadline = tokio::time::Instant::now() + timeout;
        let mut ticker = tokio::time::interval(shared.bookmark_interval);
        ticker.tick().await;
        let mut last_rv = start_rv;
        let mut shutdown = shared.shutdown.clone();
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => break,
                _ = stopped(&mut shutdown) => break,
                _ = ticker.tick(), if bookmarks => {
                    let current = current_rv(&shared);
                    // Drain what was committed up to `current` before promising it.
                    let mut lagged = false;
                    loop {
                        match rx.try_recv() {
                            Ok(rec) => {
                                if rec.rv <= last_rv { continue; }
                                last_rv = rec.rv;
                                if let Some(b) = filter.translate(&rec) {
                                    lag(&shared, &filter.key).await;
                                    yield Ok(b);
                                }
                            }
                            Err(TryRecvError::Empty) | Err(TryRecvError::Closed) => break,
                            Err(TryRecvError::Lagged(_)) => { lagged = true; break; }
                        }
                    }
                    if lagged {
                        let err = ApiError::expired("the watch fell behind: too old resource version");
                        yield Ok(event_line("ERROR", &err.to_status()));
                        break;
                    }
                    last_rv = last_rv.max(current);
                    yield Ok(filter.bookmark(last_rv, false));
                }
                r = rx.recv() => match r {
                    Ok(rec) => {
                        if rec.rv <= last_rv { continue; }
                        last_rv = rec.rv;
                        if let Some(b) = filter.translate(&rec) {
                            lag(&shared, &filter.key).await;
                            yield Ok(b);
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        let err = ApiError::expired("the watch fell behind: too old resource version");
                        yield Ok(event_line("ERROR", &err.to_status()));
                        break;
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                }
            }
        }
    };
    Ok(watch_http(Body::from_stream(stream)))
}

fn watch_http(body: Body) -> Response {
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(body)
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

pub(crate) async fn stopped(rx: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// Waits out the watch delay set for `key` (`TestApiServer::set_watch_delay`), if any.
async fn lag(shared: &Shared, key: &ResKey) {
    let delay = shared.lock().watch_delay.get(key).copied();
    if let Some(delay) = delay {
        tokio::time::sleep(delay).await;
    }
}

fn current_rv(shared: &Shared) -> u64 {
    shared.lock().rv
}
