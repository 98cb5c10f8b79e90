//! Replicas that share the work: shards held through `coordination.k8s.io/v1` Leases.
//!
//! With `--shards N` (N > 1) the namespaced resources are split into N shards by a stable hash of
//! their **namespace** ([`shard_of`]). A namespace's policies and endpoints write the same
//! Secrets and roll the same workloads, so one replica acting for a whole namespace never races
//! another over a Secret or a Deployment; the account-level limits (Stripe's rate limit, the
//! shared listings) are per Stripe account in each replica anyway. Shard `i` is held through the
//! Lease `<prefix>-shard-<i>` in the operator's namespace, with the discipline of
//! [`crate::leader`]: taken when free or when its record stayed unchanged for its lease duration
//! *as observed locally*, every write conditional on the `resourceVersion` read, renewed every
//! retry period, and given up locally as soon as the last successful renewal round is older than
//! the renew deadline (a timer decides, not the request in flight). A shard given up or lost
//! cancels its [`Fence`]: the reconciles of that shard in flight are dropped, and none starts.
//!
//! Each replica also renews a membership Lease `<prefix>-member-<identity>`, so that a replica
//! that holds no shard yet is counted. Live replicas are the members (and shard holders) whose
//! records changed within their lease duration. Each replica aims at its fair share,
//! `ceil(N / live)` ([`plan`]): it takes free or expired shards while it holds fewer; it gives
//! one up (fence first, then an empty `holderIdentity`) when it has held more than its share for
//! a grace period *and* another live replica holds fewer than its share (someone will take it);
//! a shard nobody took for a grace period is taken by anyone, so no shard stays orphaned.
//!
//! Cluster-scoped work (the StripeAccount controller) belongs to the holder of shard 0.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::channel::mpsc;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, PostParams, Preconditions};
use tokio_util::sync::CancellationToken;

use crate::leader::LeaderConfig;

/// The label that marks the shard and membership Leases of one operator installation.
pub const SHARD_GROUP_LABEL: &str = "stripekeys.io/shard-group";
/// The annotation of a shard group's Leases that says how many shards the writer splits into.
pub const SHARDS_ANNOTATION: &str = "stripekeys.io/shards";
/// The most shards `--shards` accepts.
pub const MAX_SHARDS: u32 = 256;

// ---------------------------------------------------------------------------------------------
// The hash
// ---------------------------------------------------------------------------------------------

/// 64-bit FNV-1a: fixed by its definition, so every replica and every release maps alike
/// (`std`'s hasher is randomly seeded and may change between Rust releases).
fn fnv1a(bytes: impl IntoIterator<Item = u8>) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Lamping and Veach's jump consistent hash: `key` to `0..buckets`, evenly, and when `buckets`
/// grows by one only about `1/buckets` of the keys move.
fn jump_hash(mut key: u64, buckets: u32) -> u32 {
    let mut b: i64 = -1;
    let mut j: i64 = 0;
    while j < i64::from(buckets) {
        b = j;
        key = key.wrapping_mul(2_862_933_555_777_941_757).wrapping_add(1);
        j = ((b + 1) as f64 * ((1u64 << 31) as f64 / ((key >> 33) + 1) as f64)) as i64;
    }
    b.max(0) as u32
}

/// The shard of a namespaced resource: a stable hash of its namespace. `shards` of 0 or 1: 0.
pub fn shard_of(namespace: &str, shards: u32) -> u32 {
    if shards <= 1 {
        return 0;
    }
    jump_hash(fnv1a(namespace.bytes()), shards)
}

/// How much `identity` prefers `shard` (rendezvous hashing): replicas that compete for free
/// shards reach for different ones first, and each gives up the one it prefers least.
fn preference(identity: &str, shard: u32) -> u64 {
    fnv1a(
        identity
            .bytes()
            .chain([0xff])
            .chain(shard.to_le_bytes().iter().copied()),
    )
}

// ---------------------------------------------------------------------------------------------
// The decisions (pure)
// ---------------------------------------------------------------------------------------------

/// A shard Lease as this replica sees it.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct ShardObservation {
    /// The holder the Lease names (`None`: no Lease, or released).
    pub holder: Option<String>,
    /// Free, released, or unchanged for its lease duration as observed here: anyone may take it.
    pub takeable: bool,
    /// How long it has been takeable, as observed here.
    pub takeable_for: Duration,
}

/// What [`plan`] decides for one round.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Plan {
    /// Shards to take (free or expired ones; or ones the Lease still names this replica for).
    pub acquire: Vec<u32>,
    /// A shard to give up (fence its reconciles, then clear its holder).
    pub release: Option<u32>,
}

/// A replica's fair share of `shards` among `live` replicas: `ceil(shards / live)`.
pub fn fair_share(shards: usize, live: usize) -> usize {
    shards.div_ceil(live.max(1))
}

/// Whether some live replica other than `identity` holds fewer than its fair share (counting
/// the shards whose Lease names it and is not takeable).
pub fn someone_below_share(
    identity: &str,
    shards: &[ShardObservation],
    live: &BTreeSet<String>,
) -> bool {
    let fair = fair_share(shards.len(), live.len().max(1));
    live.iter().filter(|m| m.as_str() != identity).any(|m| {
        shards
            .iter()
            .filter(|s| !s.takeable && s.holder.as_deref() == Some(m.as_str()))
            .count()
            < fair
    })
}

/// One round's decision for replica `identity`, which holds (and acts on) `held`, among the
/// `live` replicas (itself included).
///
/// - Below its fair share it takes free or expired shards (the ones it prefers first), up to
///   the share; a Lease that still names it counts as free for it.
/// - A shard that stayed takeable for `grace` is taken whatever the share: no shard stays
///   orphaned because a replica that is counted live does not take it.
/// - Above its share, once that has lasted `grace` (`over_share_for`) while another live
///   replica holds fewer than its share, it gives up one shard (the one it prefers least), and
///   nothing is taken in that round.
pub fn plan(
    identity: &str,
    shards: &[ShardObservation],
    held: &BTreeSet<u32>,
    live: &BTreeSet<String>,
    over_share_for: Duration,
    grace: Duration,
) -> Plan {
    let fair = fair_share(shards.len(), live.len().max(1));
    let mut candidates: Vec<u32> = (0..shards.len() as u32)
        .filter(|i| !held.contains(i))
        .filter(|&i| {
            let s = &shards[i as usize];
            s.takeable || s.holder.as_deref() == Some(identity)
        })
        .collect();
    candidates.sort_by_key(|&i| std::cmp::Reverse(preference(identity, i)));
    let want = fair.saturating_sub(held.len());
    let mut acquire: Vec<u32> = candidates.iter().copied().take(want).collect();
    for &i in candidates.iter().skip(want) {
        let s = &shards[i as usize];
        if s.takeable && s.takeable_for >= grace {
            acquire.push(i);
        }
    }
    let mut release = None;
    if acquire.is_empty()
        && held.len() > fair
        && over_share_for >= grace
        && someone_below_share(identity, shards, live)
    {
        release = held
            .iter()
            .copied()
            .min_by_key(|&i| preference(identity, i));
    }
    Plan { acquire, release }
}

/// The shard count a Lease's writer announced (`None`: not announced).
fn announced_shards(lease: &Lease) -> Option<u32> {
    lease
        .metadata
        .annotations
        .as_ref()?
        .get(SHARDS_ANNOTATION)?
        .parse()
        .ok()
}

/// The live replicas (with the shard count each announced) that split the work into another
/// number of shards than `shards`: their shard `i` is not this replica's shard `i`.
pub fn conflicting_members(shards: u32, members: &[(String, Option<u32>)]) -> Vec<String> {
    members
        .iter()
        .filter(|(_, n)| n.is_some_and(|n| n != shards))
        .map(|(m, _)| m.clone())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The shards this replica holds (what the reconciles consult)
// ---------------------------------------------------------------------------------------------

/// A shard held here.
struct Active {
    epoch: u64,
    token: CancellationToken,
    inflight: Arc<AtomicUsize>,
}

/// The shards this replica holds now, shared by the lease manager and the reconciles.
pub struct Shards {
    count: u32,
    identity: String,
    active: Mutex<BTreeMap<u32, Active>>,
    subscribers: Mutex<Vec<mpsc::UnboundedSender<u32>>>,
    epochs: AtomicU64,
}

impl std::fmt::Debug for Shards {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shards")
            .field("count", &self.count)
            .field("identity", &self.identity)
            .field("held", &self.held())
            .finish()
    }
}

/// Entry into one shard's work: cancelled when the shard is lost or given up. While it exists
/// it counts as a reconcile in flight, which a release waits for.
pub struct Fence {
    shard: u32,
    token: CancellationToken,
    inflight: Arc<AtomicUsize>,
    /// The object whose reconcile this fence guards (logged at entry and at the end).
    object: Option<(String, String)>,
}

impl Drop for Fence {
    fn drop(&mut self) {
        // Logged before the fence is let go, so before any release of the shard: the logs of
        // every replica order the work on a shard (the sharding test reads them).
        if let Some((namespace, name)) = &self.object {
            tracing::debug!(target: "stripe_key_operator::shard", shard = self.shard, %namespace, %name, event = "reconcile-end", "reconcile");
        }
        self.inflight.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Fence {
    /// The shard this fence guards.
    pub fn shard(&self) -> u32 {
        self.shard
    }

    /// Fires when the shard is lost or given up.
    pub fn token(&self) -> CancellationToken {
        self.token.clone()
    }

    /// Runs `work` unless the shard goes first: then `work` is dropped at once (nothing more of
    /// it runs) and `None` is returned.
    pub async fn run<F: std::future::Future>(&self, work: F) -> Option<F::Output> {
        tokio::select! {
            biased;
            _ = self.token.cancelled() => None,
            out = work => Some(out),
        }
    }
}

impl Shards {
    /// `count` shards, none held yet, for replica `identity`.
    pub fn new(count: u32, identity: impl Into<String>) -> Self {
        Self {
            count: count.max(1),
            identity: identity.into(),
            active: Mutex::new(BTreeMap::new()),
            subscribers: Mutex::new(Vec::new()),
            epochs: AtomicU64::new(0),
        }
    }

    /// How many shards there are.
    pub fn count(&self) -> u32 {
        self.count
    }

    /// This replica's identity.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// The shard of a resource in `namespace`; cluster-scoped work (`None`) is shard 0's.
    pub fn shard_for(&self, namespace: Option<&str>) -> u32 {
        namespace.map(|ns| shard_of(ns, self.count)).unwrap_or(0)
    }

    /// The shards held here now.
    pub fn held(&self) -> Vec<u32> {
        self.lock().keys().copied().collect()
    }

    /// Whether shard `shard` is held here now.
    pub fn holds(&self, shard: u32) -> bool {
        self.lock().contains_key(&shard)
    }

    /// Enters the shard of `namespace`: `None` when this replica does not hold it (the work
    /// belongs to another replica and must be skipped).
    pub fn enter(&self, namespace: Option<&str>) -> Option<Fence> {
        self.enter_shard(self.shard_for(namespace))
    }

    /// Enters shard `shard` (see [`Shards::enter`]).
    pub fn enter_shard(&self, shard: u32) -> Option<Fence> {
        self.enter_with(shard, None)
    }

    /// Enters the shard of the reconcile of `namespace`/`name` (see [`Shards::enter`]); the
    /// start and the end of the reconcile are logged (debug, target
    /// `stripe_key_operator::shard`).
    pub fn enter_object(&self, namespace: Option<&str>, name: &str) -> Option<Fence> {
        let object = (namespace.unwrap_or_default().to_string(), name.to_string());
        self.enter_with(self.shard_for(namespace), Some(object))
    }

    fn enter_with(&self, shard: u32, object: Option<(String, String)>) -> Option<Fence> {
        let active = self.lock();
        let a = active.get(&shard)?;
        a.inflight.fetch_add(1, Ordering::SeqCst);
        if let Some((namespace, name)) = &object {
            // Under the lock: before any `stopped` of this shard.
            tracing::debug!(target: "stripe_key_operator::shard", shard, %namespace, %name, event = "reconcile-start", "reconcile");
        }
        Some(Fence {
            shard,
            token: a.token.clone(),
            inflight: a.inflight.clone(),
            object,
        })
    }

    /// A stream of the shards acquired from now on (each acquisition once).
    pub fn subscribe(&self) -> mpsc::UnboundedReceiver<u32> {
        let (tx, rx) = mpsc::unbounded();
        self.subscribers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(tx);
        rx
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u32, Active>> {
        self.active.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts acting on `shard`; returns its epoch and token. Subscribers hear of it.
    fn activate(&self, shard: u32) -> (u64, CancellationToken) {
        let epoch = self.epochs.fetch_add(1, Ordering::SeqCst);
        let token = CancellationToken::new();
        // Logged before any reconcile can enter the shard.
        tracing::info!(target: "stripe_key_operator::shard", shard, event = "acquired", "shard acquired");
        self.lock().insert(
            shard,
            Active {
                epoch,
                token: token.clone(),
                inflight: Arc::new(AtomicUsize::new(0)),
            },
        );
        self.subscribers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|tx| tx.unbounded_send(shard).is_ok());
        (epoch, token)
    }

    /// Stops acting on `shard` (if it is still the activation `epoch`, when given): new
    /// reconciles are refused and the ones in flight are cancelled. Returns the in-flight
    /// counter to wait on.
    fn deactivate(&self, shard: u32, epoch: Option<u64>, why: &str) -> Option<Arc<AtomicUsize>> {
        let mut active = self.lock();
        if epoch.is_some_and(|e| active.get(&shard).is_none_or(|a| a.epoch != e)) {
            return None;
        }
        let a = active.remove(&shard)?;
        drop(active);
        a.token.cancel();
        tracing::warn!(target: "stripe_key_operator::shard", shard, event = "stopped", reason = why, "stopped acting on shard");
        Some(a.inflight)
    }
}

// ---------------------------------------------------------------------------------------------
// The lease manager
// ---------------------------------------------------------------------------------------------

/// Settings of sharding.
#[derive(Clone, Debug)]
pub struct ShardConfig {
    /// Namespace of the Leases (the operator's own).
    pub namespace: String,
    /// Prefix of the Lease names: `<prefix>-shard-<i>`, `<prefix>-member-<identity>`.
    pub prefix: String,
    /// This replica's identity (the pod name).
    pub identity: String,
    /// How many shards.
    pub shards: u32,
    /// Lease timing, as for the leader Lease.
    pub lease_duration: Duration,
    pub renew_deadline: Duration,
    pub retry_period: Duration,
}

impl ShardConfig {
    /// The timing rules of [`LeaderConfig::validate`], and a shard count in `2..=MAX_SHARDS`.
    pub fn validate(&self) -> Result<(), String> {
        if !(2..=MAX_SHARDS).contains(&self.shards) {
            return Err(format!(
                "--shards must be between 2 and {MAX_SHARDS} for sharding (got {})",
                self.shards
            ));
        }
        let name = self.shard_lease(self.shards - 1);
        if name.len() > 253 || self.member_lease().len() > 253 {
            return Err(format!(
                "--shard-lease-prefix {:?} makes Lease names longer than 253 characters",
                self.prefix
            ));
        }
        LeaderConfig {
            lease_duration: self.lease_duration,
            renew_deadline: self.renew_deadline,
            retry_period: self.retry_period,
            ..LeaderConfig::new(&self.namespace, &name, &self.identity)
        }
        .validate()
    }

    /// The Lease of shard `i`.
    pub fn shard_lease(&self, i: u32) -> String {
        format!("{}-shard-{i}", self.prefix)
    }

    /// This replica's membership Lease.
    pub fn member_lease(&self) -> String {
        format!("{}-member-{}", self.prefix, self.identity)
    }

    /// How long one request may take: half the renew deadline, as for the leader Lease.
    pub fn attempt_timeout(&self) -> Duration {
        (self.renew_deadline / 2).max(Duration::from_millis(1))
    }

    /// How long an imbalance (or an orphaned shard) lasts before it is acted on.
    pub fn grace(&self) -> Duration {
        self.lease_duration
    }

    /// How long a membership Lease stays expired before it is deleted.
    fn prune_after(&self) -> Duration {
        (self.lease_duration * 20).max(Duration::from_secs(300))
    }
}

/// Keeps this replica's shards: one round every retry period.
pub struct ShardManager {
    api: Api<Lease>,
    config: ShardConfig,
    shards: Arc<Shards>,
    /// Each Lease's last record (holder, renew time, transitions; `""`: no Lease) and when it
    /// was first seen here.
    observed: HashMap<String, (String, Instant)>,
    /// Since when this replica has held more than its share while another held fewer.
    over_share_since: Option<Instant>,
    /// The renewal clock of each held shard: the start of its last successful round.
    renewed: HashMap<u32, tokio::sync::watch::Sender<tokio::time::Instant>>,
}

/// The outcome of one write to a shard Lease.
enum Write {
    Held,
    NotHeld,
    Failed(String),
}

impl ShardManager {
    pub fn new(client: kube::Client, config: ShardConfig, shards: Arc<Shards>) -> Self {
        Self {
            api: Api::namespaced(client, &config.namespace),
            config,
            shards,
            observed: HashMap::new(),
            over_share_since: None,
            renewed: HashMap::new(),
        }
    }

    fn labels(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            (SHARD_GROUP_LABEL.to_string(), self.config.prefix.clone()),
            (
                crate::api::MANAGED_BY_LABEL.to_string(),
                crate::api::MANAGED_BY.to_string(),
            ),
        ])
    }

    /// Rounds every retry period until `stop`; then gives every shard up (its reconciles have
    /// stopped by then) and withdraws the membership.
    pub async fn run(mut self, stop: CancellationToken) {
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = self.round() => {}
            }
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(self.config.retry_period) => {}
            }
        }
        self.shutdown().await;
    }

    /// Observes a Lease record; returns how long it has stayed unchanged here.
    fn observe(&mut self, name: &str, lease: Option<&Lease>) -> Duration {
        let record = match lease.and_then(|l| l.spec.as_ref()) {
            Some(spec) => format!(
                "{}|{:?}|{:?}",
                spec.holder_identity.as_deref().unwrap_or_default(),
                spec.renew_time.as_ref().map(|t| t.0),
                spec.lease_transitions
            ),
            None => String::new(),
        };
        match self.observed.get(name) {
            Some((seen, at)) if *seen == record => at.elapsed(),
            _ => {
                self.observed
                    .insert(name.to_string(), (record, Instant::now()));
                Duration::ZERO
            }
        }
    }

    /// A Lease as an observation: who it names, whether anyone may take it and since when.
    fn observation(&mut self, name: &str, lease: Option<&Lease>) -> ShardObservation {
        let unchanged = self.observe(name, lease);
        let spec = lease.and_then(|l| l.spec.clone()).unwrap_or_default();
        let holder = spec.holder_identity.filter(|h| !h.is_empty());
        let duration = spec
            .lease_duration_seconds
            .map(|s| Duration::from_secs(s.max(0) as u64))
            .unwrap_or(self.config.lease_duration);
        match holder {
            None => ShardObservation {
                holder: None,
                takeable: true,
                takeable_for: unchanged,
            },
            Some(h) => ShardObservation {
                takeable: unchanged > duration,
                takeable_for: unchanged.saturating_sub(duration),
                holder: Some(h),
            },
        }
    }

    async fn round(&mut self) {
        let started = tokio::time::Instant::now();
        let timeout = self.config.attempt_timeout();
        let lp =
            ListParams::default().labels(&format!("{SHARD_GROUP_LABEL}={}", self.config.prefix));
        let leases = match tokio::time::timeout(timeout, self.api.list(&lp)).await {
            Ok(Ok(list)) => list.items,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "could not list the shard leases");
                return;
            }
            Err(_) => {
                tracing::warn!("could not list the shard leases: no answer in time");
                return;
            }
        };
        let listed = started.elapsed();
        let by_name: HashMap<String, Lease> = leases
            .into_iter()
            .filter_map(|l| Some((l.metadata.name.clone()?, l)))
            .collect();
        self.observed
            .retain(|name, _| by_name.contains_key(name) || name.contains("-shard-"));

        // Membership: this replica's own Lease, and who else is live.
        let member = self.config.member_lease();
        let member_prefix = format!("{}-member-", self.config.prefix);
        let mut live = BTreeSet::from([self.config.identity.clone()]);
        let mut prune = Vec::new();
        let mut other_counts = Vec::new();
        for (name, lease) in by_name
            .iter()
            .filter(|(n, _)| n.starts_with(&member_prefix))
        {
            if *name == member {
                continue;
            }
            let o = self.observation(name, Some(lease));
            match (&o.holder, o.takeable) {
                (Some(h), false) => {
                    live.insert(h.clone());
                    other_counts.push((h.clone(), announced_shards(lease)));
                }
                _ if o.takeable_for >= self.config.prune_after() => prune.push(lease.clone()),
                _ => {}
            }
        }

        // A live replica that splits the work into another number of shards maps namespaces
        // differently: while one runs, this replica acts on nothing (a rollout that changes
        // `--shards` pauses the work until the old replicas are gone, rather than letting two
        // replicas act on one namespace).
        let conflicting = conflicting_members(self.shards.count(), &other_counts);
        if !conflicting.is_empty() {
            tracing::warn!(
                replicas = ?conflicting,
                shards = self.shards.count(),
                "live replicas run with another --shards: acting on no shard until they are gone"
            );
            for i in self.shards.held() {
                self.give_up(i).await;
            }
            self.renew_member(by_name.get(&member)).await;
            return;
        }

        // The shards.
        let count = self.shards.count();
        let mut observations = Vec::with_capacity(count as usize);
        for i in 0..count {
            let name = self.config.shard_lease(i);
            let o = self.observation(&name, by_name.get(&name));
            if let (Some(h), false) = (&o.holder, o.takeable) {
                live.insert(h.clone());
            }
            observations.push(o);
        }
        // A held shard whose Lease names someone else (or is gone) is lost now.
        for i in self.shards.held() {
            let o = &observations[i as usize];
            if o.holder.as_deref() != Some(self.config.identity.as_str()) {
                self.lose(i, "the lease names another holder or is gone");
            }
        }
        let held: BTreeSet<u32> = self.shards.held().into_iter().collect();
        let fair = fair_share(count as usize, live.len());
        if held.len() > fair && someone_below_share(&self.config.identity, &observations, &live) {
            self.over_share_since.get_or_insert_with(Instant::now);
        } else {
            self.over_share_since = None;
        }
        let over_for = self
            .over_share_since
            .map(|t| t.elapsed())
            .unwrap_or_default();
        let plan = plan(
            &self.config.identity,
            &observations,
            &held,
            &live,
            over_for,
            self.config.grace(),
        );

        // Renew what is held and take what the plan says, all at once.
        let writes: Vec<(u32, bool)> = held
            .iter()
            .map(|&i| (i, true))
            .chain(plan.acquire.iter().map(|&i| (i, false)))
            .collect();
        // The membership is renewed at the same time.
        let shard_writes = futures::future::join_all(writes.iter().map(|&(i, _)| {
            let lease = by_name.get(&self.config.shard_lease(i)).cloned();
            self.write_shard(i, lease)
        }));
        let (results, ()) =
            futures::future::join(shard_writes, self.renew_member(by_name.get(&member))).await;
        for ((i, renewing), (started, result)) in writes.into_iter().zip(results) {
            match result {
                Write::Held if renewing => {
                    if let Some(tx) = self.renewed.get(&i) {
                        let _ = tx.send(started);
                    }
                }
                Write::Held => self.start_holding(i, started),
                Write::NotHeld if renewing => {
                    self.lose(i, "another replica wrote the lease");
                }
                Write::NotHeld => {}
                Write::Failed(e) => {
                    tracing::warn!(shard = i, error = %e, "could not write a shard lease")
                }
            }
        }

        tracing::debug!(
            listed_ms = listed.as_millis() as u64,
            round_ms = started.elapsed().as_millis() as u64,
            held = held.len(),
            live = live.len(),
            "shard round"
        );
        if let Some(i) = plan.release {
            self.over_share_since = None;
            tracing::info!(
                shard = i,
                fair,
                live = live.len(),
                "giving up a shard to rebalance"
            );
            self.give_up(i).await;
        }
        for lease in prune {
            self.prune(lease).await;
        }
    }

    /// Creates or renews this replica's membership Lease.
    async fn renew_member(&self, existing: Option<&Lease>) {
        let timeout = self.config.attempt_timeout();
        let name = self.config.member_lease();
        let lease = self.lease_for(&name, existing, true);
        let result = match existing {
            Some(_) => {
                tokio::time::timeout(
                    timeout,
                    self.api.replace(&name, &PostParams::default(), &lease),
                )
                .await
            }
            None => {
                tokio::time::timeout(timeout, self.api.create(&PostParams::default(), &lease)).await
            }
        };
        match result {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "could not renew the membership lease"),
            Err(_) => tracing::warn!("could not renew the membership lease: no answer in time"),
        }
    }

    /// The Lease `name` naming this replica (`hold`) or nobody, based on `existing` (whose
    /// resourceVersion the write is conditional on).
    fn lease_for(&self, name: &str, existing: Option<&Lease>, hold: bool) -> Lease {
        let now = MicroTime(Timestamp::now());
        let duration = i32::try_from(self.config.lease_duration.as_secs()).unwrap_or(15);
        let mut lease = existing.cloned().unwrap_or_else(|| Lease {
            metadata: ObjectMeta {
                name: Some(name.to_string()),
                namespace: Some(self.config.namespace.clone()),
                ..Default::default()
            },
            spec: Some(LeaseSpec::default()),
        });
        lease
            .metadata
            .labels
            .get_or_insert_with(Default::default)
            .extend(self.labels());
        lease
            .metadata
            .annotations
            .get_or_insert_with(Default::default)
            .insert(SHARDS_ANNOTATION.into(), self.config.shards.to_string());
        let spec = lease.spec.get_or_insert_with(Default::default);
        let was_mine = spec.holder_identity.as_deref() == Some(self.config.identity.as_str());
        if hold {
            if !was_mine {
                spec.acquire_time = Some(now.clone());
                spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
            }
            spec.holder_identity = Some(self.config.identity.clone());
            spec.lease_duration_seconds = Some(duration);
        } else {
            spec.holder_identity = None;
            spec.lease_duration_seconds = Some(1);
        }
        spec.renew_time = Some(now);
        lease
    }

    /// Takes or renews shard `i` through its Lease (`existing`: as listed this round).
    fn write_shard(
        &self,
        i: u32,
        existing: Option<Lease>,
    ) -> impl std::future::Future<Output = (tokio::time::Instant, Write)> + use<> {
        let name = self.config.shard_lease(i);
        let lease = self.lease_for(&name, existing.as_ref(), true);
        let api = self.api.clone();
        let timeout = self.config.attempt_timeout();
        async move {
            // The write lands after this instant: the renew deadline counts from here.
            let started = tokio::time::Instant::now();
            let pp = PostParams::default();
            let result = match existing {
                Some(_) => tokio::time::timeout(timeout, api.replace(&name, &pp, &lease)).await,
                None => tokio::time::timeout(timeout, api.create(&pp, &lease)).await,
            };
            let outcome = match result {
                Ok(Ok(_)) => Write::Held,
                Ok(Err(kube::Error::Api(s))) if s.code == 409 || s.code == 404 => Write::NotHeld,
                Ok(Err(e)) => Write::Failed(e.to_string()),
                Err(_) => Write::Failed(format!("no answer within {timeout:?}")),
            };
            (started, outcome)
        }
    }

    /// Starts acting on shard `i`, renewed at `renewed`; a timer gives it up when no round
    /// renews it within the renew deadline, whatever the round in flight is doing.
    fn start_holding(&mut self, i: u32, renewed: tokio::time::Instant) {
        let (epoch, token) = self.shards.activate(i);
        let (tx, mut rx) = tokio::sync::watch::channel(renewed);
        self.renewed.insert(i, tx);
        let shards = self.shards.clone();
        let deadline_after = self.config.renew_deadline;
        tokio::spawn(async move {
            loop {
                let deadline = *rx.borrow_and_update() + deadline_after;
                tokio::select! {
                    _ = token.cancelled() => return,
                    _ = tokio::time::sleep_until(deadline) => {
                        if *rx.borrow() + deadline_after <= tokio::time::Instant::now() {
                            tracing::error!(shard = i, "shard lease not renewed within the renew deadline");
                            shards.deactivate(i, Some(epoch), "not renewed within the renew deadline");
                            return;
                        }
                    }
                    changed = rx.changed() => if changed.is_err() { return },
                }
            }
        });
    }

    /// Stops acting on shard `i` at once (it was lost: no write of ours follows).
    fn lose(&mut self, i: u32, why: &str) {
        self.renewed.remove(&i);
        if self.shards.deactivate(i, None, why).is_some() {
            tracing::error!(shard = i, reason = why, "lost a shard");
        }
    }

    /// Gives shard `i` up: stops acting on it, waits (bounded) until its reconciles in flight
    /// are gone, then clears its holder so that another replica takes it at once. When they do
    /// not end in time the Lease is left to expire instead.
    async fn give_up(&mut self, i: u32) {
        self.renewed.remove(&i);
        let Some(inflight) = self.shards.deactivate(i, None, "given up") else {
            return;
        };
        let deadline = Instant::now() + self.config.attempt_timeout();
        while inflight.load(Ordering::SeqCst) > 0 {
            if Instant::now() > deadline {
                tracing::warn!(
                    shard = i,
                    "reconciles of a given-up shard did not end in time; leaving its lease to expire"
                );
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        self.release_lease(&self.config.shard_lease(i)).await;
    }

    /// Clears the holder of Lease `name` if it still names this replica.
    async fn release_lease(&self, name: &str) {
        let timeout = self.config.attempt_timeout();
        let Ok(Ok(Some(lease))) = tokio::time::timeout(timeout, self.api.get_opt(name)).await
        else {
            return;
        };
        let holder = lease
            .spec
            .as_ref()
            .and_then(|s| s.holder_identity.as_deref());
        if holder != Some(self.config.identity.as_str()) {
            return;
        }
        let released = self.lease_for(name, Some(&lease), false);
        let pp = PostParams::default();
        let put = self.api.replace(name, &pp, &released);
        match tokio::time::timeout(timeout, put).await {
            Ok(Ok(_)) => {
                tracing::info!(target: "stripe_key_operator::shard", lease = name, event = "released", "released a lease")
            }
            Ok(Err(e)) => tracing::warn!(lease = name, error = %e, "could not release a lease"),
            Err(_) => tracing::warn!(lease = name, "could not release a lease: no answer in time"),
        }
    }

    /// Deletes a membership Lease that has stayed expired for long (a replica gone for good),
    /// on the condition that it is still the version seen.
    async fn prune(&self, lease: Lease) {
        let Some(name) = lease.metadata.name.clone() else {
            return;
        };
        let dp = DeleteParams {
            preconditions: Some(Preconditions {
                resource_version: lease.metadata.resource_version.clone(),
                uid: lease.metadata.uid.clone(),
            }),
            ..Default::default()
        };
        let timeout = self.config.attempt_timeout();
        match tokio::time::timeout(timeout, self.api.delete(&name, &dp)).await {
            Ok(Ok(_)) => {
                tracing::info!(lease = %name, "deleted the membership lease of a replica gone for good")
            }
            Ok(Err(e)) => {
                tracing::debug!(lease = %name, error = %e, "could not delete a stale membership lease")
            }
            Err(_) => {}
        }
    }

    /// Gives every shard up and withdraws the membership (graceful shutdown).
    async fn shutdown(&mut self) {
        for i in self.shards.held() {
            self.give_up(i).await;
        }
        self.release_lease(&self.config.member_lease()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn free() -> ShardObservation {
        ShardObservation {
            holder: None,
            takeable: true,
            takeable_for: Duration::ZERO,
        }
    }

    fn held_by(h: &str) -> ShardObservation {
        ShardObservation {
            holder: Some(h.into()),
            takeable: false,
            takeable_for: Duration::ZERO,
        }
    }

    fn live(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    const GRACE: Duration = Duration::from_secs(5);
    /// Where four namespaces fall among six shards, pinned.
    const PINNED: [u32; 4] = [0, 2, 4, 4];

    #[test]
    fn the_hash_is_stable_across_releases_and_replicas() {
        // Fixed values: a change here moves every namespace to another shard on upgrade.
        assert_eq!(fnv1a(*b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(*b"a"), 0xaf63_dc4c_8601_ec8c);
        let pinned: Vec<u32> = ["shop", "billing", "default", "team-7"]
            .iter()
            .map(|ns| shard_of(ns, 6))
            .collect();
        assert_eq!(pinned, PINNED);
        for ns in ["shop", "billing", "x"] {
            assert_eq!(shard_of(ns, 6), shard_of(ns, 6));
            assert!(shard_of(ns, 6) < 6);
            assert_eq!(shard_of(ns, 1), 0);
            assert_eq!(shard_of(ns, 0), 0);
        }
    }

    #[test]
    fn namespaces_spread_evenly_over_the_shards() {
        for shards in [2u32, 3, 6, 16] {
            let mut counts = vec![0usize; shards as usize];
            let n = 6000;
            for k in 0..n {
                counts[shard_of(&format!("team-{k}"), shards) as usize] += 1;
            }
            let expected = n / shards as usize;
            for (i, c) in counts.iter().enumerate() {
                assert!(
                    (*c as f64 - expected as f64).abs() < expected as f64 * 0.15,
                    "{shards} shards: shard {i} got {c} of {n} (expected about {expected})"
                );
            }
        }
    }

    #[test]
    fn adding_a_shard_moves_few_namespaces() {
        let n = 4000;
        let moved = (0..n)
            .filter(|k| {
                let ns = format!("ns-{k}");
                shard_of(&ns, 6) != shard_of(&ns, 7)
            })
            .count();
        // A consistent hash moves about 1/7 of them; a modulo would move about 6/7.
        assert!(moved < n / 5, "{moved} of {n} moved");
    }

    #[test]
    fn the_fair_share_rounds_up() {
        assert_eq!(fair_share(6, 3), 2);
        assert_eq!(fair_share(6, 4), 2);
        assert_eq!(fair_share(3, 2), 2);
        assert_eq!(fair_share(3, 1), 3);
        assert_eq!(fair_share(3, 0), 3);
    }

    #[test]
    fn a_replica_below_its_share_takes_free_shards_up_to_its_share() {
        let shards = vec![free(); 6];
        let p = plan(
            "a",
            &shards,
            &BTreeSet::new(),
            &live(&["a", "b", "c"]),
            Duration::ZERO,
            GRACE,
        );
        assert_eq!(p.acquire.len(), 2, "{p:?}");
        assert_eq!(p.release, None);
        // Alone: everything.
        let p = plan(
            "a",
            &shards,
            &BTreeSet::new(),
            &live(&["a"]),
            Duration::ZERO,
            GRACE,
        );
        assert_eq!(p.acquire.len(), 6);
        // Two replicas start together: they reach for different shards first.
        let a = plan(
            "a",
            &shards,
            &BTreeSet::new(),
            &live(&["a", "b", "c"]),
            Duration::ZERO,
            GRACE,
        );
        let b = plan(
            "b",
            &shards,
            &BTreeSet::new(),
            &live(&["a", "b", "c"]),
            Duration::ZERO,
            GRACE,
        );
        assert_ne!(a.acquire, b.acquire);
    }

    #[test]
    fn held_and_unexpired_shards_of_others_are_never_taken() {
        let shards = vec![held_by("b"), held_by("b"), held_by("c"), held_by("c")];
        let p = plan(
            "a",
            &shards,
            &BTreeSet::new(),
            &live(&["a", "b", "c"]),
            Duration::from_secs(60),
            GRACE,
        );
        assert!(p.acquire.is_empty(), "{p:?}");
    }

    #[test]
    fn expired_shards_of_a_dead_replica_are_taken_by_the_survivors() {
        let mut dead = held_by("c");
        dead.takeable = true;
        let shards = vec![
            held_by("a"),
            held_by("a"),
            held_by("b"),
            held_by("b"),
            dead.clone(),
            dead,
        ];
        let held = BTreeSet::from([0, 1]);
        // c's membership expired too: two live replicas, a share of three.
        let p = plan(
            "a",
            &shards,
            &held,
            &live(&["a", "b"]),
            Duration::ZERO,
            GRACE,
        );
        assert_eq!(p.acquire.len(), 1, "{p:?}");
        assert!(p.acquire.iter().all(|i| *i >= 4));
    }

    #[test]
    fn an_orphan_shard_is_taken_by_anyone_after_the_grace_period() {
        let mut orphan = free();
        let shards = |o: ShardObservation| vec![held_by("a"), held_by("b"), o];
        let held = BTreeSet::from([0]);
        // Three live replicas, each at its share (c holds nothing but is counted live).
        let p = plan(
            "a",
            &shards(orphan.clone()),
            &held,
            &live(&["a", "b", "c"]),
            Duration::ZERO,
            GRACE,
        );
        assert!(
            p.acquire.is_empty(),
            "within the grace period c may take it: {p:?}"
        );
        orphan.takeable_for = GRACE;
        let p = plan(
            "a",
            &shards(orphan),
            &held,
            &live(&["a", "b", "c"]),
            Duration::ZERO,
            GRACE,
        );
        assert_eq!(p.acquire, vec![2]);
    }

    #[test]
    fn a_lease_that_still_names_this_replica_is_taken_back_first() {
        let shards = vec![held_by("a"), held_by("b")];
        let p = plan(
            "a",
            &shards,
            &BTreeSet::new(),
            &live(&["a", "b"]),
            Duration::ZERO,
            GRACE,
        );
        assert_eq!(p.acquire, vec![0]);
    }

    #[test]
    fn a_replica_above_its_share_gives_one_up_after_the_grace_period_when_another_is_below() {
        // a and b hold three each; c just joined.
        let shards: Vec<_> = (0..6)
            .map(|i| held_by(if i < 3 { "a" } else { "b" }))
            .collect();
        let held = BTreeSet::from([0, 1, 2]);
        let members = live(&["a", "b", "c"]);
        assert!(someone_below_share("a", &shards, &members));
        let p = plan("a", &shards, &held, &members, GRACE / 2, GRACE);
        assert_eq!(p.release, None, "not before the grace period");
        let p = plan("a", &shards, &held, &members, GRACE, GRACE);
        let released = p.release.expect("one shard given up");
        assert!(held.contains(&released));
        assert!(p.acquire.is_empty());
        // Always the same one (the least preferred), so repeated rounds agree.
        assert_eq!(
            plan("a", &shards, &held, &members, GRACE * 3, GRACE).release,
            Some(released)
        );
    }

    #[test]
    fn a_shard_is_given_up_only_above_the_share() {
        // Two live replicas: a holds 4 of 6, b holds 2, share 3: b is below, a gives one up.
        let shards: Vec<_> = (0..6)
            .map(|i| held_by(if i < 4 { "a" } else { "b" }))
            .collect();
        let held = BTreeSet::from([0, 1, 2, 3]);
        assert!(
            plan("a", &shards, &held, &live(&["a", "b"]), GRACE, GRACE)
                .release
                .is_some()
        );
        // Three each of six between two replicas: at the share, nothing moves.
        let shards: Vec<_> = (0..6)
            .map(|i| held_by(if i < 3 { "a" } else { "b" }))
            .collect();
        let held = BTreeSet::from([0, 1, 2]);
        assert_eq!(
            plan("a", &shards, &held, &live(&["a", "b"]), GRACE * 10, GRACE).release,
            None
        );
        // At its share: never.
        let shards: Vec<_> = (0..6).map(|i| held_by(["a", "b", "c"][i % 3])).collect();
        let held = BTreeSet::from([0, 3]);
        assert_eq!(
            plan(
                "a",
                &shards,
                &held,
                &live(&["a", "b", "c"]),
                GRACE * 10,
                GRACE
            )
            .release,
            None
        );
    }

    #[test]
    fn replicas_with_another_shard_count_are_conflicting() {
        let members = vec![
            ("a".to_string(), Some(6)),
            ("b".to_string(), Some(3)),
            ("c".to_string(), None),
        ];
        assert_eq!(conflicting_members(6, &members), vec!["b".to_string()]);
        assert_eq!(conflicting_members(3, &members), vec!["a".to_string()]);
        assert!(conflicting_members(6, &members[..1]).is_empty());
    }

    #[test]
    fn the_shard_of_cluster_scoped_work_is_zero_and_entry_needs_the_shard() {
        let s = Shards::new(4, "a");
        assert_eq!(s.shard_for(None), 0);
        assert!(s.enter(None).is_none(), "nothing is held yet");
        let mut acquired = s.subscribe();
        let (epoch, token) = s.activate(0);
        assert_eq!(acquired.try_recv().unwrap(), 0);
        let fence = s.enter(None).expect("shard 0 is held");
        assert!(!fence.token().is_cancelled());
        // A stale deadline timer of an older activation does not end a newer one.
        assert!(s.deactivate(0, Some(epoch + 1), "stale").is_none());
        assert!(s.holds(0));
        let inflight = s.deactivate(0, Some(epoch), "lost").unwrap();
        assert!(token.is_cancelled() && fence.token().is_cancelled());
        assert_eq!(inflight.load(Ordering::SeqCst), 1, "the fence still counts");
        drop(fence);
        assert_eq!(inflight.load(Ordering::SeqCst), 0);
        assert!(s.enter(None).is_none());
    }

    #[tokio::test]
    async fn work_fenced_by_a_lost_shard_is_dropped_at_once() {
        let s = Shards::new(2, "a");
        s.activate(1);
        let ns = (0..100)
            .map(|k| format!("ns-{k}"))
            .find(|n| shard_of(n, 2) == 1)
            .unwrap();
        let fence = s.enter(Some(&ns)).unwrap();
        let wrote = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let work = {
            let wrote = wrote.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(200)).await;
                wrote.store(true, Ordering::SeqCst);
            }
        };
        let run = fence.run(work);
        let lose = async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            s.deactivate(1, None, "lost");
        };
        let (out, ()) = tokio::join!(run, lose);
        assert!(out.is_none());
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !wrote.load(Ordering::SeqCst),
            "the dropped work never wrote"
        );
    }

    #[test]
    fn shard_settings_follow_the_leader_rules() {
        let c = ShardConfig {
            namespace: "ns".into(),
            prefix: "sko".into(),
            identity: "pod-a".into(),
            shards: 3,
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        };
        c.validate().unwrap();
        assert_eq!(c.shard_lease(2), "sko-shard-2");
        assert_eq!(c.member_lease(), "sko-member-pod-a");
        assert!(
            ShardConfig {
                shards: 1,
                ..c.clone()
            }
            .validate()
            .is_err()
        );
        assert!(
            ShardConfig {
                shards: MAX_SHARDS + 1,
                ..c.clone()
            }
            .validate()
            .is_err()
        );
        let e = ShardConfig {
            renew_deadline: Duration::from_secs(15),
            ..c
        }
        .validate()
        .unwrap_err();
        assert!(e.contains("--renew-deadline"), "{e}");
    }
}
