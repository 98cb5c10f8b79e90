//! The watch caches reconciles read instead of asking the API server: StripeAccounts,
//! StripeGuardrails, the labels of the watched Namespaces (metadata only) and the metadata of
//! the Secrets the operator syncs (label-selected: only its own).
//!
//! One reflector per kind (per watched namespace for Namespaces and Secrets) fills a store; the
//! credential controllers are woken by the same reflectors ([`Feeds`]), after the store took the
//! change in, so a reconcile triggered by an account, guardrail or namespace change always reads
//! that change from the cache. The controllers start only once every cache holds its first
//! listing ([`Caches::wait_until_ready`]): a missing object then really is missing.
//!
//! Caches keep only what reconciles read: `managedFields` and `kubectl`'s last-applied annotation
//! are dropped from every object, Namespaces and Secrets are metadata only, and a Secret's
//! metadata only its identity, version and owners ([`strip_secret`]).
//!
//! Without caches (a [`super::Context`] whose controllers do not run: tests that call the
//! reconcile functions themselves, the CLI) every read goes to the API server as before.

use std::sync::Arc;

use futures::channel::mpsc;
use futures::future::BoxFuture;
use futures::{SinkExt, StreamExt};
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::Api;
use kube::core::PartialObjectMeta;
use kube::runtime::WatchStreamExt;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::watcher::{self, watcher};

use crate::api::{StripeAccount, StripeGuardrail};

/// Changes a controller's feed buffers before the cache's reflector waits for it.
const BUFFER: usize = 1024;

/// Objects per page of a watch's initial listing and of a fresh listing (kube-runtime's default
/// is 500). A page is read whole into memory and decoded at once, and the HTTP connection's
/// read buffer grows to fit it and stays that size while the connection is pooled: at a start
/// with 1,000 policies, pages of 500 made a transient of about 6 MiB. Smaller pages cost one
/// more LIST request per fifty objects, at start and after a watch expires, nothing in the
/// steady state.
pub const LIST_PAGE_SIZE: u32 = 50;

/// The watcher settings of every cache and controller watch: [`LIST_PAGE_SIZE`].
pub fn watch_config() -> watcher::Config {
    watcher::Config::default().page_size(LIST_PAGE_SIZE)
}

/// Lists `api` in pages of [`LIST_PAGE_SIZE`] and hands each object to `f`, one page at a
/// time: a fresh listing of every policy (the canary check each interval, the activity-log
/// reader, the deletion guard) holds one page, not all of them at once. A listing of 10,000
/// policies in one response was read whole and decoded next to itself (tens of MiB, with every
/// object's `managedFields`), the largest transient of the operator at that scale.
pub async fn for_each_listed<K>(
    api: &Api<K>,
    params: &kube::api::ListParams,
    mut f: impl FnMut(K),
) -> Result<(), kube::Error>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let mut params = params.clone().limit(LIST_PAGE_SIZE);
    loop {
        let page = api.list(&params).await?;
        let next = page.metadata.continue_.filter(|c| !c.is_empty());
        page.items.into_iter().for_each(&mut f);
        match next {
            Some(token) => params = params.continue_token(&token),
            None => return Ok(()),
        }
    }
}

/// `kubectl apply`'s copy of the whole object: never read, often the largest annotation.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Drops what no reconcile reads from a cached object's metadata.
pub fn strip(meta: &mut kube::api::ObjectMeta) {
    meta.managed_fields = None;
    if let Some(a) = meta.annotations.as_mut() {
        a.remove(LAST_APPLIED);
        if a.is_empty() {
            meta.annotations = None;
        }
    }
}

/// What a synced Secret's cached metadata keeps: its name, namespace, resourceVersion and owner
/// references, all that [`Caches::secret_meta`]'s readers and the owner wake-ups look at. Its
/// labels and annotations (two small maps, over 1 KiB per Secret) and its own uid (kept twice:
/// in the object and in the store's key) are dropped: the label selector already chose the
/// Secret, and a reconcile that needs more reads it.
pub fn strip_secret(meta: &mut kube::api::ObjectMeta) {
    *meta = kube::api::ObjectMeta {
        name: meta.name.take(),
        namespace: meta.namespace.take(),
        resource_version: meta.resource_version.take(),
        owner_references: meta.owner_references.take(),
        deletion_timestamp: meta.deletion_timestamp.take(),
        ..Default::default()
    };
}

/// The caches of one watched namespace (`scope: None`: every namespace).
struct ScopeCaches {
    scope: Option<String>,
    namespaces: Store<PartialObjectMeta<Namespace>>,
    secrets: Store<PartialObjectMeta<Secret>>,
}

/// The read side of the watch caches.
pub struct Caches {
    accounts: Store<StripeAccount>,
    guardrails: Store<StripeGuardrail>,
    scopes: Vec<ScopeCaches>,
    /// One set of feeds per credential controller, taken when it starts.
    feeds: std::sync::Mutex<Vec<Feeds>>,
}

/// A change stream of one cache for one controller: every object the cache took in (changed,
/// added or deleted) once the cache was ready, delivered after the store holds the change.
pub type Feed<K> = mpsc::Receiver<K>;

/// What wakes one credential controller of one scope.
pub struct Feeds {
    pub scope: Option<String>,
    pub accounts: Feed<StripeAccount>,
    pub guardrails: Feed<StripeGuardrail>,
    pub namespaces: Feed<PartialObjectMeta<Namespace>>,
    /// The operator's synced Secrets (metadata): they wake their owners.
    pub secrets: Feed<PartialObjectMeta<Secret>>,
}

impl std::fmt::Debug for Caches {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Caches")
    }
}

/// The futures that keep the caches filled: run them for as long as the controllers run.
pub type Reflectors = Vec<BoxFuture<'static, ()>>;

/// A reflector into a new store that forwards every touched object to `subscribers` once the
/// store holds its first listing (the controllers list their own resources when they start, so
/// the first listing wakes nobody; a later re-listing does).
fn reflect<K>(
    stream: impl futures::Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
    subscribers: usize,
) -> (Store<K>, Vec<Feed<K>>, BoxFuture<'static, ()>)
where
    K: kube::Resource + Clone + Send + Sync + std::fmt::Debug + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone + Default + Send + Sync,
{
    let writer = reflector::store::Writer::<K>::default();
    let store = writer.as_reader();
    let (mut senders, feeds): (Vec<_>, Vec<_>) =
        (0..subscribers).map(|_| mpsc::channel::<K>(BUFFER)).unzip();
    let task = Box::pin(async move {
        let mut stream = std::pin::pin!(reflector::reflector(writer, stream));
        let mut ready = false;
        while let Some(item) = stream.next().await {
            let event = match item {
                Ok(e) => e,
                Err(e) => {
                    tracing::warn!(error = %e, "a watch cache's watch failed; retrying");
                    continue;
                }
            };
            let touched = match event {
                watcher::Event::Apply(o) | watcher::Event::Delete(o) => Some(o),
                watcher::Event::InitApply(o) if ready => Some(o),
                watcher::Event::InitDone => {
                    ready = true;
                    None
                }
                _ => None,
            };
            if let Some(obj) = touched {
                let mut open = Vec::with_capacity(senders.len());
                for mut tx in senders.drain(..) {
                    // A controller that stopped dropped its feed: forget it.
                    if tx.send(obj.clone()).await.is_ok() {
                        open.push(tx);
                    }
                }
                senders = open;
            }
        }
    });
    (store, feeds, task)
}

impl Caches {
    /// Builds the caches of `scopes` (one entry per watched namespace, `None`: all) and feeds
    /// for `controllers_per_scope` controllers of every scope. Returns the reflectors to run.
    /// `secret_selector` selects the Secrets the operator syncs.
    pub fn start(
        client: &kube::Client,
        scopes: &[Option<String>],
        controllers_per_scope: usize,
        secret_selector: &str,
    ) -> (Arc<Self>, Reflectors) {
        let mut reflectors: Reflectors = Vec::new();
        let subscribers = scopes.len() * controllers_per_scope;
        let (accounts, account_feeds, task) = reflect(
            watcher(Api::<StripeAccount>::all(client.clone()), watch_config())
                .default_backoff()
                .modify(|a| strip(&mut a.metadata)),
            subscribers,
        );
        reflectors.push(task);
        let (guardrails, guardrail_feeds, task) = reflect(
            watcher(Api::<StripeGuardrail>::all(client.clone()), watch_config())
                .default_backoff()
                .modify(|g| strip(&mut g.metadata)),
            subscribers,
        );
        reflectors.push(task);
        let mut account_feeds = account_feeds.into_iter();
        let mut guardrail_feeds = guardrail_feeds.into_iter();
        let mut feeds = Vec::new();
        let mut scope_caches = Vec::new();
        for scope in scopes {
            let ns_config = match scope {
                Some(ns) => watch_config().fields(&format!("metadata.name={ns}")),
                None => watch_config(),
            };
            let (namespaces, namespace_feeds, task) = reflect(
                watcher(
                    Api::<PartialObjectMeta<Namespace>>::all(client.clone()),
                    ns_config,
                )
                .default_backoff()
                .modify(|n| strip(&mut n.metadata)),
                controllers_per_scope,
            );
            reflectors.push(task);
            let secrets_api: Api<PartialObjectMeta<Secret>> = match scope {
                Some(ns) => Api::namespaced(client.clone(), ns),
                None => Api::all(client.clone()),
            };
            let (secrets, secret_feeds, task) = reflect(
                watcher(secrets_api, watch_config().labels(secret_selector))
                    .default_backoff()
                    .modify(|s| strip_secret(&mut s.metadata)),
                controllers_per_scope,
            );
            reflectors.push(task);
            for (namespaces, secrets) in namespace_feeds.into_iter().zip(secret_feeds) {
                if let (Some(accounts), Some(guardrails)) =
                    (account_feeds.next(), guardrail_feeds.next())
                {
                    feeds.push(Feeds {
                        scope: scope.clone(),
                        accounts,
                        guardrails,
                        namespaces,
                        secrets,
                    });
                }
            }
            scope_caches.push(ScopeCaches {
                scope: scope.clone(),
                namespaces,
                secrets,
            });
        }
        let caches = Arc::new(Self {
            accounts,
            guardrails,
            scopes: scope_caches,
            feeds: std::sync::Mutex::new(feeds),
        });
        (caches, reflectors)
    }

    /// Waits until every cache holds its first listing.
    pub async fn wait_until_ready(&self) {
        let _ = self.accounts.wait_until_ready().await;
        let _ = self.guardrails.wait_until_ready().await;
        for s in &self.scopes {
            let _ = s.namespaces.wait_until_ready().await;
            let _ = s.secrets.wait_until_ready().await;
        }
    }

    /// The feeds of one controller of `scope` (each set is handed out once).
    pub fn take_feeds(&self, scope: &Option<String>) -> Option<Feeds> {
        let mut feeds = self.feeds.lock().unwrap_or_else(|e| e.into_inner());
        let i = feeds.iter().position(|f| &f.scope == scope)?;
        Some(feeds.swap_remove(i))
    }

    /// Drops the feeds nobody took: an unread feed would stall its cache once full.
    pub fn drop_unused_feeds(&self) {
        self.feeds.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    /// The StripeAccount `name` as the cache has it.
    pub fn account(&self, name: &str) -> Option<Arc<StripeAccount>> {
        self.accounts.get(&ObjectRef::new(name))
    }

    /// Every StripeGuardrail.
    pub fn guardrails(&self) -> Vec<Arc<StripeGuardrail>> {
        self.guardrails.state()
    }

    fn scope_of(&self, ns: &str) -> Option<&ScopeCaches> {
        self.scopes
            .iter()
            .find(|s| s.scope.as_deref() == Some(ns))
            .or_else(|| self.scopes.iter().find(|s| s.scope.is_none()))
    }

    /// The labels of namespace `ns` (`None`: not a namespace these caches watch).
    pub fn namespace_labels(&self, ns: &str) -> Option<std::collections::BTreeMap<String, String>> {
        let scope = self.scope_of(ns)?;
        Some(
            scope
                .namespaces
                .get(&ObjectRef::new(ns))
                .and_then(|n| n.metadata.labels.clone())
                .unwrap_or_default(),
        )
    }

    /// The metadata of the operator-labelled Secret `ns/name` (outer `None`: not a namespace
    /// these caches watch; inner `None`: no such labelled Secret).
    pub fn secret_meta(
        &self,
        ns: &str,
        name: &str,
    ) -> Option<Option<Arc<PartialObjectMeta<Secret>>>> {
        let scope = self.scope_of(ns)?;
        Some(scope.secrets.get(&ObjectRef::new(name).within(ns)))
    }
}
