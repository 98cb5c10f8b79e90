//! What the StripeAccount controller keeps of the resources that name accounts: for each
//! StripeKeyPolicy or StripeWebhookEndpoint, the account it names and whether it holds a
//! credential, nothing else.
//!
//! `keysUnderManagement` is a count of exactly that. A reflector cache of the typed objects
//! held a second whole copy of every policy (besides the policy controller's own): about
//! 2.5 KiB each, 25 MiB at 10,000 policies. A [`Holdings`] entry is the object's namespace and
//! name and a shared account name: about 150 bytes.
//!
//! The holdings are filled from a watch: a (re-)listing is collected aside and replaces the
//! holdings when it is complete, so a count never sees half a listing; [`Holdings::wait_until_ready`]
//! waits for the first one. The deletion guard does not read the holdings: it lists fresh.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use futures::stream::BoxStream;
use kube::Resource;
use kube::api::Api;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};

/// One resource's entry: the account it names and whether it holds a credential.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Holding {
    account: Arc<str>,
    holds: bool,
}

/// (namespace, name).
type Key = (Box<str>, Box<str>);

#[derive(Default)]
struct State {
    live: HashMap<Key, Holding>,
    /// A listing being collected: replaces `live` when complete.
    relist: Option<HashMap<Key, Holding>>,
    /// Account names, shared by the entries (a handful of accounts, thousands of entries).
    names: HashSet<Arc<str>>,
}

impl State {
    fn intern(&mut self, account: &str) -> Arc<str> {
        if let Some(a) = self.names.get(account) {
            return a.clone();
        }
        let a: Arc<str> = Arc::from(account);
        self.names.insert(a.clone());
        a
    }
}

/// The account and credential of every watched resource of one kind.
pub struct Holdings {
    state: Mutex<State>,
    ready: tokio::sync::watch::Sender<bool>,
}

impl std::fmt::Debug for Holdings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Holdings")
            .field("entries", &self.lock().live.len())
            .finish()
    }
}

/// What a watched object says: the account it names and whether it holds a credential.
pub type Project<K> = fn(&K) -> (&str, bool);

impl Default for Holdings {
    fn default() -> Self {
        Self {
            state: Mutex::default(),
            ready: tokio::sync::watch::Sender::new(false),
        }
    }
}

impl Holdings {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How many resources name `account` and hold a credential.
    pub fn count(&self, account: &str) -> usize {
        self.lock()
            .live
            .values()
            .filter(|h| h.holds && &*h.account == account)
            .count()
    }

    /// How many resources are held (whatever they name).
    pub fn len(&self) -> usize {
        self.lock().live.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Waits until the first listing is complete.
    pub async fn wait_until_ready(&self) {
        let mut rx = self.ready.subscribe();
        let _ = rx.wait_for(|ready| *ready).await;
    }

    /// Takes one watch event in; returns the accounts whose count it may have changed (an
    /// object that moved to another account changes both).
    pub fn apply<K: Resource>(&self, event: Event<K>, project: Project<K>) -> Vec<Arc<str>> {
        let key = |o: &K| -> Key {
            let meta = o.meta();
            (
                meta.namespace.as_deref().unwrap_or_default().into(),
                meta.name.as_deref().unwrap_or_default().into(),
            )
        };
        let mut state = self.lock();
        match event {
            Event::Init => {
                state.relist = Some(HashMap::new());
                Vec::new()
            }
            Event::InitApply(o) => {
                let (account, holds) = project(&o);
                let account = state.intern(account);
                state.relist.get_or_insert_with(HashMap::new).insert(
                    key(&o),
                    Holding {
                        account: account.clone(),
                        holds,
                    },
                );
                vec![account]
            }
            Event::InitDone => {
                let listed = state.relist.take().unwrap_or_default();
                let old = std::mem::replace(&mut state.live, listed);
                // Accounts whose resources went while the watch was down: recounted too.
                let mut touched: Vec<Arc<str>> = Vec::new();
                for h in old.into_values() {
                    if !touched.contains(&h.account) {
                        touched.push(h.account);
                    }
                }
                let in_use: HashSet<Arc<str>> =
                    state.live.values().map(|h| h.account.clone()).collect();
                state.names.retain(|a| in_use.contains(a));
                drop(state);
                self.ready.send_replace(true);
                touched
            }
            Event::Apply(o) => {
                let (account, holds) = project(&o);
                let account = state.intern(account);
                let before = state.live.insert(
                    key(&o),
                    Holding {
                        account: account.clone(),
                        holds,
                    },
                );
                match before {
                    Some(b) if b.account != account => vec![account, b.account],
                    _ => vec![account],
                }
            }
            Event::Delete(o) => match state.live.remove(&key(&o)) {
                Some(h) => vec![h.account],
                None => vec![Arc::from(project(&o).0)],
            },
        }
    }
}

/// Watches `api` into new [`Holdings`]; the stream yields the accounts each change touched
/// (run it for as long as the holdings are read).
pub fn track<K>(api: Api<K>, project: Project<K>) -> (Arc<Holdings>, BoxStream<'static, String>)
where
    K: Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let holdings = Arc::new(Holdings::default());
    let fill = holdings.clone();
    let stream = watcher::watcher(api, super::caches::watch_config())
        .default_backoff()
        .flat_map(move |event| {
            let touched = match event {
                Ok(event) => fill.apply(event, project),
                Err(e) => {
                    tracing::warn!(error = %e, "a watch of the account controller failed; retrying");
                    Vec::new()
                }
            };
            futures::stream::iter(touched.into_iter().map(|a| a.to_string()))
        })
        .boxed();
    (holdings, stream)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::StripeKeyPolicy;
    use crate::controller::stripeaccount::tests::policy;

    fn project(p: &StripeKeyPolicy) -> (&str, bool) {
        (
            p.spec.account_ref.name.as_str(),
            p.status
                .as_ref()
                .is_some_and(|s| super::super::stripeaccount::holds_credentials(&s.credential)),
        )
    }

    fn names(v: Vec<Arc<str>>) -> Vec<String> {
        let mut v: Vec<String> = v.into_iter().map(|a| a.to_string()).collect();
        v.sort();
        v
    }

    #[tokio::test]
    async fn counts_what_each_account_holds_through_changes_moves_and_deletions() {
        let h = Holdings::default();
        h.apply(Event::Init, project);
        h.apply(Event::InitApply(policy("a", "pay", true)), project);
        h.apply(Event::InitApply(policy("b", "pay", false)), project);
        // Half a listing is never counted.
        assert_eq!(h.count("pay"), 0);
        h.apply(Event::InitDone, project);
        h.wait_until_ready().await;
        assert_eq!(h.count("pay"), 1);
        assert_eq!(h.len(), 2);

        assert_eq!(
            names(h.apply(Event::Apply(policy("b", "pay", true)), project)),
            ["pay"]
        );
        assert_eq!(h.count("pay"), 2);
        // Moved to another account: both are touched, each counted right.
        assert_eq!(
            names(h.apply(Event::Apply(policy("a", "other", true)), project)),
            ["other", "pay"]
        );
        assert_eq!((h.count("pay"), h.count("other")), (1, 1));
        assert_eq!(
            names(h.apply(Event::Delete(policy("b", "pay", true)), project)),
            ["pay"]
        );
        assert_eq!(h.count("pay"), 0);
    }

    #[test]
    fn a_relisting_replaces_everything_and_touches_the_accounts_of_what_went() {
        let h = Holdings::default();
        h.apply(Event::Init, project);
        h.apply(Event::InitApply(policy("a", "gone", true)), project);
        h.apply(Event::InitDone, project);
        assert_eq!(h.count("gone"), 1);
        // The watch restarted; "a" was deleted meanwhile, "c" created.
        h.apply(Event::Init, project);
        assert_eq!(
            names(h.apply(Event::InitApply(policy("c", "pay", true)), project)),
            ["pay"]
        );
        // Until the listing is complete the old holdings are counted.
        assert_eq!(h.count("gone"), 1);
        assert_eq!(names(h.apply(Event::InitDone, project)), ["gone"]);
        assert_eq!((h.count("gone"), h.count("pay")), (0, 1));
        // Account names are shared and forgotten when nothing names them.
        assert_eq!(h.lock().names.len(), 1);
    }
}
