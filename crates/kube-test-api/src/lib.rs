//! An in-process Kubernetes API server for tests.
//!
//! [`TestApiServer`] serves the parts of the kube-apiserver an operator uses (discovery, CRUD,
//! list/watch with bookmarks and `410 Gone`, selectors, paging, server-side apply, merge and JSON
//! patches, the `/status` subresource, finalizers, owner-reference garbage collection,
//! namespaces, CustomResourceDefinitions with structural-schema and CEL validation, and workloads
//! whose status rolls out) over plain HTTP on `127.0.0.1`, so a real kube-rs `Controller` runs
//! against it end to end without a cluster. It also answers what kubectl asks for (`Table`
//! answers with printer columns, OpenAPI v3 documents, Events through both `v1` and
//! `events.k8s.io/v1`, `fieldValidation=Strict`), so a person can look at it with kubectl.
//!
//! Connect a kube client with:
//!
//! ```text
//! let server = kube_test_api::TestApiServer::start().await?;
//! let config = kube::Config::new(server.url().parse()?); // default namespace "default", no auth
//! let client = kube::Client::try_from(config)?;
//! ```
//!
//! or point `kubectl --kubeconfig` at a file holding [`TestApiServer::kubeconfig_yaml`].
//! See the crate README for what is emulated and where it differs from the real apiserver.

mod events;
mod openapi;
mod record;
pub mod schema;
mod server;
mod store;
mod strict;
mod table;
mod util;
mod validation;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;

pub use record::RecordedRequest;
pub use store::ApiError;

use server::Shared;
use store::{Managed, State, WriteOpts};

/// Errors starting the server.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Binding 127.0.0.1:0 failed (no free port or no loopback interface).
    #[error("could not bind the test API server on 127.0.0.1: {0}")]
    Bind(#[source] std::io::Error),
    /// The object given to a handle method has no usable apiVersion/kind.
    #[error(
        "the object has no apiVersion/kind that this server serves ({0}); create its CRD first"
    )]
    UnknownKind(String),
    /// The server refused the write; the same error a client would get.
    #[error("the test API server refused the write: {0}")]
    Api(#[from] ApiError),
}

/// A fault [`TestApiServer::inject_fault`] injects into matching requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Hold the request without answering until the client gives up or the server stops.
    Hang,
    /// Wait this long, then serve the request normally.
    Delay(Duration),
    /// Answer with this HTTP status and a `Status` body (reason `InternalError`, or
    /// `ServiceUnavailable` for 503); nothing is changed.
    Status(u16),
}

/// One injected fault rule.
#[derive(Debug, Clone)]
pub(crate) struct FaultRule {
    pub verb: String,
    pub resource: String,
    pub fault: Fault,
    pub remaining: Option<u32>,
}

/// Tunables of a [`TestApiServer`].
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// How long after a workload's generation changes its status reports all replicas ready
    /// (default 200 ms).
    pub rollout_delay: Duration,
    /// How many changes are kept for watch resumption; a watch from an older resourceVersion
    /// gets `410 Gone` (`Expired`) (default 10 000).
    pub watch_history: usize,
    /// How often a watch with `allowWatchBookmarks=true` gets a BOOKMARK (default 1 s; the real
    /// apiserver sends one about every minute).
    pub bookmark_interval: Duration,
    /// How often the background controllers (garbage collector, workload rollout) run
    /// (default 20 ms).
    pub controller_interval: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            rollout_delay: Duration::from_millis(200),
            watch_history: 10_000,
            bookmark_interval: Duration::from_secs(1),
            controller_interval: Duration::from_millis(20),
        }
    }
}

/// A running in-process API server. Dropping it stops it; [`TestApiServer::shutdown`] also waits.
pub struct TestApiServer {
    shared: Arc<Shared>,
    shutdown: tokio::sync::watch::Sender<bool>,
    serve_task: Option<tokio::task::JoinHandle<()>>,
    controller_task: Option<tokio::task::JoinHandle<()>>,
}

impl TestApiServer {
    /// Starts a server with [`ServerConfig::default`] on `127.0.0.1:<free port>`.
    pub async fn start() -> Result<Self, Error> {
        Self::start_with(ServerConfig::default()).await
    }

    /// Starts a server with the given configuration on `127.0.0.1:<free port>`.
    pub async fn start_with(config: ServerConfig) -> Result<Self, Error> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(Error::Bind)?;
        let addr = listener.local_addr().map_err(Error::Bind)?;
        let (shutdown, shutdown_rx) = tokio::sync::watch::channel(false);
        let shared = Arc::new(Shared {
            state: Mutex::new(State::new(
                config.watch_history.max(1),
                config.rollout_delay,
            )),
            bookmark_interval: config.bookmark_interval,
            gc_notify: tokio::sync::Notify::new(),
            addr,
            shutdown: shutdown_rx.clone(),
            requests: Mutex::new(Default::default()),
        });
        let app = axum::Router::new()
            .fallback({
                let shared = shared.clone();
                move |method, uri, headers, body| {
                    server::handle(shared.clone(), method, uri, headers, body)
                }
            })
            // The apiserver accepts request bodies up to 3 MiB.
            .layer(axum::extract::DefaultBodyLimit::max(3 * 1024 * 1024));
        let mut rx = shutdown_rx.clone();
        let serve_task = tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = rx.wait_for(|s| *s).await;
                })
                .await;
        });
        let controller_task = tokio::spawn(controllers(
            shared.clone(),
            config.controller_interval,
            shutdown_rx,
        ));
        Ok(Self {
            shared,
            shutdown,
            serve_task: Some(serve_task),
            controller_task: Some(controller_task),
        })
    }

    /// The base URL, `http://127.0.0.1:<port>`. Use `kube::Config::new(server.url().parse()?)`.
    pub fn url(&self) -> String {
        format!("http://{}", self.shared.addr)
    }

    /// The bound socket address.
    pub fn addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// A kubeconfig for this server (plain HTTP, no credentials, namespace `default`), for
    /// `kubectl --kubeconfig <file>` or `kube::Config::from_custom_kubeconfig`.
    pub fn kubeconfig_yaml(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: kube-test-api\n  cluster:\n    server: {}\ncontexts:\n- name: kube-test-api\n  context:\n    cluster: kube-test-api\n    user: kube-test-api\n    namespace: default\ncurrent-context: kube-test-api\nusers:\n- name: kube-test-api\n  user: {{}}\npreferences: {{}}\n",
            self.url()
        )
    }

    fn resolve(&self, api_version: &str, kind: &str) -> Result<store::ResourceType, Error> {
        self.shared
            .lock()
            .find_kind(api_version, kind)
            .cloned()
            .ok_or_else(|| Error::UnknownKind(format!("{api_version}/{kind}")))
    }

    /// Reads an object straight from the store (`namespace` is ignored for cluster-scoped kinds).
    pub fn get(
        &self,
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> Option<Value> {
        if events::is_events_v1(api_version, kind) {
            return self
                .get("v1", kind, namespace, name)
                .map(events::to_events_v1);
        }
        let rt = self.resolve(api_version, kind).ok()?;
        let st = self.shared.lock();
        st.get(
            &rt.key(),
            if rt.namespaced {
                namespace.unwrap_or("default")
            } else {
                ""
            },
            name,
        )
        .cloned()
    }

    /// Lists objects of a kind, in one namespace or (with `None`) all of them.
    pub fn list(&self, api_version: &str, kind: &str, namespace: Option<&str>) -> Vec<Value> {
        if events::is_events_v1(api_version, kind) {
            return self
                .list("v1", kind, namespace)
                .into_iter()
                .map(events::to_events_v1)
                .collect();
        }
        let Ok(rt) = self.resolve(api_version, kind) else {
            return Vec::new();
        };
        let st = self.shared.lock();
        st.objects
            .get(&rt.key())
            .map(|m| {
                m.iter()
                    .filter(|((ns, _), _)| namespace.is_none_or(|n| n == ns))
                    .map(|(_, o)| o.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Counts the objects of a kind (in one namespace or, with `None`, all) for which `pred`
    /// holds, without copying them out as [`TestApiServer::list`] does: for polling a large
    /// store (the server is locked meanwhile, so keep `pred` cheap).
    pub fn count(
        &self,
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
        pred: impl Fn(&Value) -> bool,
    ) -> usize {
        if events::is_events_v1(api_version, kind) {
            return self
                .list(api_version, kind, namespace)
                .iter()
                .filter(|o| pred(o))
                .count();
        }
        let Ok(rt) = self.resolve(api_version, kind) else {
            return 0;
        };
        let st = self.shared.lock();
        st.objects.get(&rt.key()).map_or(0, |m| {
            m.iter()
                .filter(|((ns, _), o)| namespace.is_none_or(|n| n == ns) && pred(o))
                .count()
        })
    }

    /// Creates or replaces an object (identified by its apiVersion, kind, namespace and name),
    /// status included, as the server itself would: no request is counted, no conflict check,
    /// validation and watch events as for any write. Returns the stored object.
    pub fn put(&self, obj: Value) -> Result<Value, Error> {
        if events::is_events_v1(
            obj.get("apiVersion")
                .and_then(Value::as_str)
                .unwrap_or_default(),
            obj.get("kind").and_then(Value::as_str).unwrap_or_default(),
        ) {
            return self.put(events::to_core(obj)).map(events::to_events_v1);
        }
        let av = obj
            .get("apiVersion")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let kind = obj
            .get("kind")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let rt = self.resolve(&av, &kind)?;
        let version = av.rsplit('/').next().unwrap_or("v1").to_string();
        let ns = if rt.namespaced {
            obj.pointer("/metadata/namespace")
                .and_then(Value::as_str)
                .unwrap_or("default")
                .to_string()
        } else {
            String::new()
        };
        let name = obj
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let mut st = self.shared.lock();
        let key = rt.key();
        let main = WriteOpts {
            subresource: None,
            version: version.clone(),
            dry_run: false,
        };
        let out = if st.get(&key, &ns, &name).is_some() {
            let mut body = obj.clone();
            if let Some(m) = body.get_mut("metadata").and_then(Value::as_object_mut) {
                m.remove("resourceVersion");
            }
            let updated = st.update(&key, &ns, &name, body.clone(), &main, Managed::System)?;
            if rt.status && obj.get("status") != updated.get("status") {
                let status = WriteOpts {
                    subresource: Some("status".into()),
                    version,
                    dry_run: false,
                };
                st.update(&key, &ns, &name, body, &status, Managed::System)?
            } else {
                updated
            }
        } else {
            st.create(&key, &ns, obj, &main, Managed::System)?
        };
        drop(st);
        self.shared.gc_notify.notify_one();
        Ok(out)
    }

    /// Deletes an object as a client would (finalizers and owner references are honoured).
    pub fn delete(
        &self,
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<Value, Error> {
        if events::is_events_v1(api_version, kind) {
            return self
                .delete("v1", kind, namespace, name)
                .map(events::to_events_v1);
        }
        let rt = self.resolve(api_version, kind)?;
        let out = self.shared.lock().delete(
            &rt.key(),
            namespace.unwrap_or("default"),
            name,
            &Value::Null,
            None,
        )?;
        self.shared.gc_notify.notify_one();
        Ok(out)
    }

    /// Changes how long workloads take to become ready after a change.
    pub fn set_rollout_delay(&self, delay: Duration) {
        self.shared.lock().rollout_delay = delay;
    }

    /// Delivers watch events of `resource` (plural, e.g. `stripekeypolicies`, in any group) late
    /// by `delay`, as a busy apiserver's watch cache does: clients that trust their informer
    /// cache then see objects older than their own writes. `Duration::ZERO` switches it off.
    pub fn set_watch_delay(&self, resource: &str, delay: Duration) {
        let mut st = self.shared.lock();
        let keys: Vec<_> = st
            .types
            .iter()
            .filter(|(_, t)| t.plural == resource)
            .map(|(k, _)| k.clone())
            .collect();
        for key in keys {
            if delay.is_zero() {
                st.watch_delay.remove(&key);
            } else {
                st.watch_delay.insert(key, delay);
            }
        }
    }

    /// Keeps the Deployment/StatefulSet/DaemonSet `namespace/name` unready (`stuck = true`) or
    /// lets it finish rolling out (`stuck = false`).
    pub fn set_workload_stuck(&self, namespace: &str, name: &str, stuck: bool) {
        let mut st = self.shared.lock();
        let k = (namespace.to_string(), name.to_string());
        if stuck {
            st.stuck.insert(k);
        } else {
            st.stuck.remove(&k);
        }
    }

    /// Injects `fault` into the requests of `verb` (`*`: any) on `resource`, named as
    /// [`TestApiServer::request_count`] names them (`leases`, `stripekeypolicies/status`): the
    /// next `count` of them, or every one (`None`) until [`TestApiServer::clear_faults`]. The
    /// requests still count as received.
    pub fn inject_fault(&self, verb: &str, resource: &str, fault: Fault, count: Option<u32>) {
        self.shared.lock().faults.push(FaultRule {
            verb: verb.to_string(),
            resource: resource.to_string(),
            fault,
            remaining: count.filter(|n| *n > 0),
        });
    }

    /// Removes every injected fault.
    pub fn clear_faults(&self) {
        self.shared.lock().faults.clear();
    }

    /// How many HTTP requests of `verb` on `resource` were received.
    ///
    /// Verbs are the apiserver's: `get`, `list`, `watch`, `create`, `update`, `patch`, `delete`,
    /// `deletecollection`. Resources are plural names with an optional subresource:
    /// `secrets`, `deployments`, `stripekeys/status`. Failed requests count too.
    pub fn request_count(&self, verb: &str, resource: &str) -> u64 {
        self.shared
            .lock()
            .counts
            .get(&(verb.to_string(), resource.to_string()))
            .copied()
            .unwrap_or(0)
    }

    /// Write requests (`create`, `update`, `patch`, `delete`, `deletecollection`) on `resource`
    /// and its subresources (`deployments` counts `deployments/status` too).
    pub fn write_count(&self, resource: &str) -> u64 {
        let prefix = format!("{resource}/");
        self.shared
            .lock()
            .counts
            .iter()
            .filter(|((verb, res), _)| {
                matches!(
                    verb.as_str(),
                    "create" | "update" | "patch" | "delete" | "deletecollection"
                ) && (res == resource || res.starts_with(&prefix))
            })
            .map(|(_, n)| *n)
            .sum()
    }

    /// Every request count, keyed by (verb, resource).
    pub fn request_counts(&self) -> BTreeMap<(String, String), u64> {
        self.shared.lock().counts.clone()
    }

    /// Waits until no request has been counted for `quiet` (polling every 100 ms), or `limit`
    /// has passed: the clients have settled.
    pub async fn settle(&self, quiet: Duration, limit: Duration) {
        let deadline = std::time::Instant::now() + limit;
        let mut last = self.request_counts();
        let mut since = std::time::Instant::now();
        while std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let now = self.request_counts();
            if now != last {
                last = now;
                since = std::time::Instant::now();
            } else if since.elapsed() >= quiet {
                return;
            }
        }
    }

    /// Sets every request count back to zero.
    pub fn reset_counts(&self) {
        self.shared.lock().counts.clear();
    }

    /// Every distinct authorization check made since the start (or the last
    /// [`TestApiServer::clear_recorded_requests`]), with how often it was made: one per
    /// resource request (verb as RBAC names it, group, resource, subresource, namespace, name,
    /// the caller's bearer token as user), plus the checks the real apiserver adds to some
    /// writes ([`RecordedRequest::implied_by`]). Discovery requests are not resource requests
    /// and are not recorded. Failed requests are, as the apiserver authorizes first.
    pub fn recorded_requests(&self) -> BTreeMap<RecordedRequest, u64> {
        self.shared.recorded()
    }

    /// Forgets every recorded request.
    pub fn clear_recorded_requests(&self) {
        self.shared.clear_recorded();
    }

    /// The current (latest) resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.lock().rv
    }

    /// Drops the retained watch history, as etcd compaction does: a watch (or a list `continue`)
    /// from any resourceVersion older than now gets `410 Gone` and must re-list.
    pub fn compact_watch_history(&self) {
        self.shared.lock().compact();
    }

    /// Stops the server: open watches end, the listener closes, background tasks stop.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        if let Some(t) = self.controller_task.take() {
            let _ = t.await;
        }
        if let Some(t) = self.serve_task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
    }
}

impl Drop for TestApiServer {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
        if let Some(t) = self.controller_task.take() {
            t.abort();
        }
        if let Some(t) = self.serve_task.take() {
            t.abort();
        }
    }
}

/// The background controllers: garbage collection and workload rollouts.
async fn controllers(
    shared: Arc<Shared>,
    interval: Duration,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let mut ticker = tokio::time::interval(interval);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shared.gc_notify.notified() => {}
            _ = server::stopped(&mut shutdown) => return,
        }
        let mut st = shared.lock();
        if st.gc_pending {
            st.gc_pending = false;
            let mut rounds = 0;
            while st.gc_pass() && rounds < 100 {
                rounds += 1;
            }
        }
        st.rollout_tick();
    }
}
