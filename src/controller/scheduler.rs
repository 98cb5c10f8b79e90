//! Fair scheduling of reconciles between Stripe accounts.
//!
//! kube-runtime runs reconciles from one pool per controller: an account whose Stripe calls
//! hang would hold every worker while it retries. The credential controllers therefore hand
//! each reconcile to a [`FairScheduler`] first:
//!
//! - **`W` workers** (`--max-concurrent-reconciles`) run reconciles at once, over every account
//!   and both credential kinds;
//! - **`K` per account** (`--max-in-flight-per-account`): an account never runs more than `K`
//!   of them, so a hanging account holds at most `K` workers and the others keep `W - K`;
//! - an account whose rate limiter is paused (a 429's `Retry-After`), or waits long for its
//!   next token, or whose circuit breaker is open, gets **no** worker until that ends; while the
//!   breaker is half-open it gets one (the probe);
//! - a free worker goes to the **next account in round-robin order** that has a reconcile
//!   waiting and may run one. Waiting reconciles are small futures (the object's `Arc` and a
//!   channel): the reconcile itself is only built once it has a worker.
//!
//! Round-robin rather than deficit round-robin: a reconcile's cost is mostly its Stripe calls,
//! which the account's own token bucket already paces, and `K` caps how much of the pool one
//! account's slow reconciles can hold; deficit scheduling would need each reconcile's cost
//! before it runs, which nobody knows (a quiet reconcile makes no call, a mint one, a sweep a
//! listing).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

/// What an account may do now, as its limiter and breaker say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// Up to the per-account bound.
    Open,
    /// One reconcile at a time: the breaker is half-open (or its probe is due).
    Probe,
    /// None until this long from now (a rate-limit pause, an open breaker).
    Blocked(Duration),
}

/// Tells the scheduler what an account may do (see [`Gate`]).
pub trait AccountGate: Send + Sync {
    /// The gate of the StripeAccount named `account`.
    fn gate(&self, account: &str) -> Gate;
}

/// Every account may run (no limiter or breaker known).
#[derive(Debug, Default)]
pub struct AlwaysOpen;

impl AccountGate for AlwaysOpen {
    fn gate(&self, _: &str) -> Gate {
        Gate::Open
    }
}

/// Per-account figures of the scheduler.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AccountStats {
    /// Reconciles running now.
    pub in_flight: usize,
    /// Reconciles waiting for a worker now.
    pub waiting: usize,
    /// The most reconciles that ran at once since start.
    pub peak_in_flight: usize,
    /// Reconciles given a worker since start.
    pub dispatched: u64,
}

#[derive(Default)]
struct Queue {
    waiting: VecDeque<oneshot::Sender<Permit>>,
    in_flight: usize,
    in_ring: bool,
}

#[derive(Default)]
struct State {
    queues: HashMap<String, Queue>,
    /// Accounts with waiting reconciles, in round-robin order.
    ring: VecDeque<String>,
    busy: usize,
    stats: HashMap<String, AccountStats>,
    /// When the pending timer wakes the scheduler (for blocked accounts).
    timer_at: Option<Instant>,
}

/// The fair scheduler (see the module documentation).
pub struct FairScheduler {
    state: Mutex<State>,
    workers: usize,
    per_account: usize,
    gate: Arc<dyn AccountGate>,
    metrics: Option<crate::metrics::Metrics>,
    me: Weak<FairScheduler>,
}

impl std::fmt::Debug for FairScheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FairScheduler")
            .field("workers", &self.workers)
            .field("per_account", &self.per_account)
            .finish_non_exhaustive()
    }
}

/// A worker held by one reconcile; dropping it frees the worker.
pub struct Permit {
    scheduler: Weak<FairScheduler>,
    account: String,
    armed: bool,
}

impl std::fmt::Debug for Permit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Permit")
            .field("account", &self.account)
            .finish()
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if self.armed
            && let Some(s) = self.scheduler.upgrade()
        {
            s.release(&self.account);
        }
    }
}

impl FairScheduler {
    /// `workers` reconciles at once, at most `per_account` of one account (both at least 1).
    pub fn new(
        workers: usize,
        per_account: usize,
        gate: Arc<dyn AccountGate>,
        metrics: Option<crate::metrics::Metrics>,
    ) -> Arc<Self> {
        Arc::new_cyclic(|me| Self {
            state: Mutex::new(State::default()),
            workers: workers.max(1),
            per_account: per_account.max(1),
            gate,
            metrics,
            me: me.clone(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits for a worker for a reconcile of `account`. Cancel-safe: a waiter that goes away
    /// is skipped, and a permit handed to it is given back.
    pub async fn acquire(&self, account: &str) -> Permit {
        let (tx, rx) = oneshot::channel();
        {
            let mut st = self.lock();
            let q = st.queues.entry(account.to_string()).or_default();
            q.waiting.push_back(tx);
            if !q.in_ring {
                q.in_ring = true;
                st.ring.push_back(account.to_string());
            }
            st.stats.entry(account.to_string()).or_default().waiting += 1;
            self.dispatch(&mut st);
            self.publish(&st, account);
        }
        match rx.await {
            Ok(permit) => permit,
            // The scheduler dropped the sender: it is gone (shutdown). Run unscheduled.
            Err(_) => Permit {
                scheduler: Weak::new(),
                account: account.to_string(),
                armed: false,
            },
        }
    }

    /// Looks again at the accounts that wait (a breaker or a limiter changed).
    pub fn wake(&self) {
        let mut st = self.lock();
        self.dispatch(&mut st);
    }

    /// The figures of `account`.
    pub fn stats(&self, account: &str) -> AccountStats {
        self.lock().stats.get(account).copied().unwrap_or_default()
    }

    /// Workers in use now.
    pub fn busy(&self) -> usize {
        self.lock().busy
    }

    fn release(&self, account: &str) {
        let mut st = self.lock();
        st.busy = st.busy.saturating_sub(1);
        if let Some(q) = st.queues.get_mut(account) {
            q.in_flight = q.in_flight.saturating_sub(1);
            if q.in_flight == 0 && q.waiting.is_empty() && !q.in_ring {
                st.queues.remove(account);
            }
        }
        if let Some(s) = st.stats.get_mut(account) {
            s.in_flight = s.in_flight.saturating_sub(1);
        }
        self.dispatch(&mut st);
        self.publish(&st, account);
    }

    fn publish(&self, st: &State, account: &str) {
        if let (Some(m), Some(s)) = (&self.metrics, st.stats.get(account)) {
            let labels = crate::metrics::AccountLabels {
                account: account.to_string(),
            };
            m.scheduler_in_flight
                .get_or_create(&labels)
                .set(s.in_flight as i64);
            m.scheduler_waiting
                .get_or_create(&labels)
                .set(s.waiting as i64);
        }
    }

    /// Hands free workers to waiting reconciles, round-robin over the accounts that may run.
    fn dispatch(&self, st: &mut State) {
        let mut blocked: Option<Duration> = None;
        'workers: while st.busy < self.workers {
            for _ in 0..st.ring.len() {
                let Some(account) = st.ring.pop_front() else {
                    break 'workers;
                };
                let Some(q) = st.queues.get_mut(&account) else {
                    continue;
                };
                // Waiters that went away (their reconcile was dropped) leave the queue when
                // they reach its front: scanning the whole queue here cost O(waiting) per
                // dispatch, O(n²) for a bulk of n reconciles of one account.
                let mut gone = 0;
                while q.waiting.front().is_some_and(|tx| tx.is_closed()) {
                    q.waiting.pop_front();
                    gone += 1;
                }
                if q.waiting.is_empty() {
                    q.in_ring = false;
                    if q.in_flight == 0 {
                        st.queues.remove(&account);
                    }
                    if let Some(s) = st.stats.get_mut(&account) {
                        s.waiting = s.waiting.saturating_sub(gone);
                    }
                    continue;
                }
                let bound = match self.gate.gate(&account) {
                    Gate::Open => self.per_account,
                    Gate::Probe => 1,
                    Gate::Blocked(d) => {
                        blocked = Some(blocked.map_or(d, |b| b.min(d)));
                        0
                    }
                };
                if q.in_flight >= bound {
                    st.ring.push_back(account.clone());
                    if let Some(s) = st.stats.get_mut(&account) {
                        s.waiting = s.waiting.saturating_sub(gone);
                    }
                    continue;
                }
                let tx = q.waiting.pop_front().expect("not empty");
                let permit = Permit {
                    scheduler: self.me.clone(),
                    account: account.clone(),
                    armed: true,
                };
                let granted = match tx.send(permit) {
                    Ok(()) => true,
                    Err(mut permit) => {
                        // Went away just now: not counted, nothing to release.
                        permit.armed = false;
                        false
                    }
                };
                if granted {
                    q.in_flight += 1;
                }
                let in_flight = q.in_flight;
                if q.waiting.is_empty() {
                    q.in_ring = false;
                } else {
                    st.ring.push_back(account.clone());
                }
                let s = st.stats.entry(account.clone()).or_default();
                s.waiting = s.waiting.saturating_sub(gone + 1);
                if granted {
                    st.busy += 1;
                    s.in_flight = in_flight;
                    s.peak_in_flight = s.peak_in_flight.max(in_flight);
                    s.dispatched += 1;
                    if let Some(m) = &self.metrics {
                        m.scheduler_dispatched
                            .get_or_create(&crate::metrics::AccountLabels {
                                account: account.clone(),
                            })
                            .inc();
                    }
                }
                self.publish(st, &account);
                continue 'workers;
            }
            break;
        }
        if let Some(wait) = blocked {
            self.wake_after(st, wait.max(Duration::from_millis(10)));
        }
    }

    /// Makes sure the scheduler looks again within `wait` (a blocked account may run then).
    fn wake_after(&self, st: &mut State, wait: Duration) {
        let at = Instant::now() + wait;
        if st.timer_at.is_some_and(|t| t <= at && t > Instant::now()) {
            return;
        }
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        st.timer_at = Some(at);
        let me = self.me.clone();
        handle.spawn(async move {
            tokio::time::sleep(wait).await;
            if let Some(s) = me.upgrade() {
                let mut st = s.lock();
                if st.timer_at == Some(at) {
                    st.timer_at = None;
                }
                s.dispatch(&mut st);
            }
        });
    }
}

/// Wraps a reconcile function so that each reconcile first waits for a worker of
/// `scheduler` for the account `account_of` names; the reconcile's future is only built once
/// it has one, so a waiting reconcile costs a few hundred bytes.
pub fn fair<K, O, F>(
    scheduler: Arc<FairScheduler>,
    account_of: fn(&K) -> String,
    reconcile: F,
) -> impl Fn(Arc<K>, Arc<super::Context>) -> futures::future::BoxFuture<'static, O>
+ Clone
+ Send
+ Sync
+ 'static
where
    K: Send + Sync + 'static,
    O: Send + 'static,
    F: Fn(Arc<K>, Arc<super::Context>) -> futures::future::BoxFuture<'static, O>
        + Clone
        + Send
        + Sync
        + 'static,
{
    move |obj, ctx| {
        let scheduler = scheduler.clone();
        let reconcile = reconcile.clone();
        let account = account_of(&obj);
        Box::pin(async move {
            let permit = scheduler.acquire(&account).await;
            let out = reconcile(obj, ctx).await;
            drop(permit);
            out
        })
    }
}

/// How many reconciles of one account may wait for a worker; more are parked in an
/// [`Overflow`] (see [`admit`]).
pub const MAX_WAITING_PER_ACCOUNT: usize = 256;
/// A parked reconcile comes back after this long even if nothing released it (a safety net).
pub const PARKED_RECHECK: Duration = Duration::from_secs(60);

#[derive(Debug)]
struct Parked<R> {
    order: VecDeque<R>,
    set: std::collections::HashSet<R>,
    /// Released, not yet back at [`admit`].
    in_transit: usize,
}

impl<R> Default for Parked<R> {
    fn default() -> Self {
        Self {
            order: VecDeque::new(),
            set: Default::default(),
            in_transit: 0,
        }
    }
}

/// The reconciles of one controller parked because their account had
/// [`MAX_WAITING_PER_ACCOUNT`] waiting already, in arrival order per account, each once. They
/// go back to the controller (through the stream of [`Overflow::new`], as triggers) as the
/// account's queue drains.
///
/// Why: kube-runtime keeps one future per reconcile in progress and polls all of them on
/// every wake-up; a reconcile waiting here for a worker is in progress to it. With every
/// policy of a bulk mint waiting, each wake-up cost O(n) — 10,000 policies spent most of
/// the operator's CPU there. Parked reconciles have returned: they cost kube-runtime nothing.
pub struct Overflow<R> {
    limit: usize,
    parked: Mutex<HashMap<String, Parked<R>>>,
    tx: futures::channel::mpsc::UnboundedSender<R>,
}

impl<R> std::fmt::Debug for Overflow<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Overflow")
            .field("limit", &self.limit)
            .finish_non_exhaustive()
    }
}

impl<R: Clone + Eq + std::hash::Hash + Send + 'static> Overflow<R> {
    /// Parks beyond `limit` waiting reconciles per account; the stream gives the parked ones
    /// back, to be triggered again.
    pub fn new(limit: usize) -> (Arc<Self>, futures::channel::mpsc::UnboundedReceiver<R>) {
        let (tx, rx) = futures::channel::mpsc::unbounded();
        (
            Arc::new(Self {
                limit: limit.max(1),
                parked: Mutex::new(HashMap::new()),
                tx,
            }),
            rx,
        )
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Parked<R>>> {
        self.parked.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A reconcile of `account` arrived with `waiting` queued: whether it must park (it is then
    /// parked); otherwise it may queue, and parked ones are released into the room left.
    fn arrive(&self, account: &str, item: R, waiting: usize) -> bool {
        let mut parked = self.lock();
        let p = parked.entry(account.to_string()).or_default();
        p.in_transit = p.in_transit.saturating_sub(1);
        if waiting >= self.limit {
            if p.set.insert(item.clone()) {
                p.order.push_back(item);
            }
            return true;
        }
        // A parked copy of this one is served now (its place in `order` is skipped later).
        p.set.remove(&item);
        self.release(&mut parked, account, waiting + 1);
        false
    }

    /// A reconcile of `account` finished with `waiting` queued: parked ones fill the room.
    fn left(&self, account: &str, waiting: usize) {
        let mut parked = self.lock();
        self.release(&mut parked, account, waiting);
    }

    fn release(&self, parked: &mut HashMap<String, Parked<R>>, account: &str, waiting: usize) {
        let Some(p) = parked.get_mut(account) else {
            return;
        };
        let mut room = self.limit.saturating_sub(waiting + p.in_transit);
        while room > 0 {
            let Some(item) = p.order.pop_front() else {
                break;
            };
            if !p.set.remove(&item) {
                continue;
            }
            room -= 1;
            p.in_transit += 1;
            let _ = self.tx.unbounded_send(item);
        }
        if p.set.is_empty() && p.in_transit == 0 {
            parked.remove(account);
        }
    }

    /// Reconciles parked now for `account`.
    pub fn parked(&self, account: &str) -> usize {
        self.lock().get(account).map_or(0, |p| p.set.len())
    }
}

/// Wraps a [`fair`] reconcile so that no more than the overflow's limit of one account's
/// reconciles wait for a worker: a reconcile beyond it is parked in `overflow` and returns at
/// once (requeued after [`PARKED_RECHECK`] as a safety net); it is triggered again, in arrival
/// order, as the account's queue drains.
pub fn admit<K, R, E, F>(
    scheduler: Arc<FairScheduler>,
    overflow: Arc<Overflow<R>>,
    account_of: fn(&K) -> String,
    ref_of: fn(&K) -> R,
    reconcile: F,
) -> impl Fn(
    Arc<K>,
    Arc<super::Context>,
) -> futures::future::BoxFuture<'static, Result<kube::runtime::controller::Action, E>>
+ Clone
+ Send
+ Sync
+ 'static
where
    K: Send + Sync + 'static,
    R: Clone + Eq + std::hash::Hash + Send + Sync + 'static,
    E: Send + 'static,
    F: Fn(
            Arc<K>,
            Arc<super::Context>,
        )
            -> futures::future::BoxFuture<'static, Result<kube::runtime::controller::Action, E>>
        + Clone
        + Send
        + Sync
        + 'static,
{
    move |obj, ctx| {
        let account = account_of(&obj);
        let waiting = scheduler.stats(&account).waiting;
        if overflow.arrive(&account, ref_of(&obj), waiting) {
            return Box::pin(futures::future::ready(Ok(
                kube::runtime::controller::Action::requeue(PARKED_RECHECK),
            )));
        }
        let (scheduler, overflow, reconcile) =
            (scheduler.clone(), overflow.clone(), reconcile.clone());
        Box::pin(async move {
            let out = reconcile(obj, ctx).await;
            overflow.left(&account, scheduler.stats(&account).waiting);
            out
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    #[test]
    fn reconciles_beyond_the_limit_park_in_order_and_come_back_as_the_queue_drains() {
        let (o, mut rx) = Overflow::<u32>::new(2);
        // Two may queue; the third and fourth park (the fourth twice: once).
        assert!(!o.arrive("a", 1, 0));
        assert!(!o.arrive("a", 2, 1));
        assert!(o.arrive("a", 3, 2));
        assert!(o.arrive("a", 4, 2));
        assert!(o.arrive("a", 4, 2));
        assert_eq!(o.parked("a"), 2);
        // Another account is not held back.
        assert!(!o.arrive("b", 9, 0));
        assert!(
            rx.try_recv().is_err(),
            "nothing released while the queue is full"
        );
        // One finished, one still waiting: one parked comes back, the oldest first.
        o.left("a", 1);
        assert_eq!(rx.try_recv().unwrap(), 3);
        assert!(rx.try_recv().is_err());
        // It arrives (and queues); the last finishes with nothing waiting: the next comes back.
        assert!(!o.arrive("a", 3, 1));
        o.left("a", 0);
        assert_eq!(rx.try_recv().unwrap(), 4);
        assert!(!o.arrive("a", 4, 0));
        assert_eq!(o.parked("a"), 0);
        assert!(rx.try_recv().is_err());
    }

    /// A gate the test sets per account.
    #[derive(Default)]
    struct TestGate(Mutex<HashMap<String, Gate>>);

    impl TestGate {
        fn set(&self, account: &str, gate: Gate) {
            self.0.lock().unwrap().insert(account.into(), gate);
        }
    }

    impl AccountGate for TestGate {
        fn gate(&self, account: &str) -> Gate {
            self.0
                .lock()
                .unwrap()
                .get(account)
                .copied()
                .unwrap_or(Gate::Open)
        }
    }

    /// Queues one waiter per account name (in this order) behind `hold`; returns the order in
    /// which they got a worker, each releasing at once.
    async fn grant_order(s: &Arc<FairScheduler>, hold: Permit, accounts: &[&str]) -> Vec<String> {
        let order = Arc::new(Mutex::new(Vec::new()));
        let seq = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for a in accounts {
            let (s, order, a) = (s.clone(), order.clone(), a.to_string());
            let seq = seq.clone();
            // Enqueue in order: each task registers before the next is spawned.
            let (queued_tx, queued_rx) = oneshot::channel();
            tasks.push(tokio::spawn(async move {
                let fut = s.acquire(&a);
                tokio::pin!(fut);
                // First poll registers the waiter.
                let first = futures::poll!(&mut fut);
                let _ = queued_tx.send(());
                let permit = match first {
                    std::task::Poll::Ready(p) => p,
                    std::task::Poll::Pending => fut.await,
                };
                seq.fetch_add(1, Ordering::SeqCst);
                order.lock().unwrap().push(a.clone());
                drop(permit);
            }));
            queued_rx.await.unwrap();
        }
        drop(hold);
        for t in tasks {
            t.await.unwrap();
        }
        order.lock().unwrap().clone()
    }

    #[tokio::test]
    async fn a_free_worker_goes_to_the_next_account_round_robin() {
        let s = FairScheduler::new(1, 4, Arc::new(AlwaysOpen), None);
        let hold = s.acquire("x").await;
        let order = grant_order(&s, hold, &["a", "a", "a", "b", "b", "c"]).await;
        assert_eq!(order, ["a", "b", "c", "a", "b", "a"]);
    }

    #[tokio::test]
    async fn an_account_never_runs_more_than_its_bound_while_others_get_the_rest() {
        let s = FairScheduler::new(6, 2, Arc::new(AlwaysOpen), None);
        let mut held = Vec::new();
        // The hanging account asks for 5 workers: it gets 2.
        let mut slow = Vec::new();
        for _ in 0..5 {
            let s = s.clone();
            slow.push(tokio::spawn(async move { s.acquire("slow").await }));
        }
        tokio::task::yield_now().await;
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
        assert_eq!(s.stats("slow").in_flight, 2);
        assert_eq!(s.stats("slow").waiting, 3);
        // Another account gets the 4 workers left, at once.
        for i in 0..4 {
            let p =
                tokio::time::timeout(Duration::from_secs(1), s.acquire(&format!("ok{}", i % 2)))
                    .await
                    .expect("a worker is free for the healthy accounts");
            held.push(p);
        }
        assert_eq!(s.busy(), 6);
        assert_eq!(s.stats("slow").peak_in_flight, 2);
        drop(held);
        for t in slow.into_iter().take(2) {
            drop(t.await.unwrap());
        }
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
        assert!(s.stats("slow").peak_in_flight <= 2);
    }

    #[tokio::test]
    async fn a_blocked_account_is_skipped_and_runs_when_its_gate_opens() {
        let gate = Arc::new(TestGate::default());
        let s = FairScheduler::new(1, 4, gate.clone(), None);
        gate.set("paused", Gate::Blocked(Duration::from_millis(300)));
        let hold = s.acquire("x").await;
        let opener = gate.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            opener.set("paused", Gate::Open);
        });
        let order = grant_order(&s, hold, &["paused", "a", "b"]).await;
        // `paused` was first in line; `a` and `b` went before it while it was blocked, and it
        // ran once the scheduler's timer found its gate open.
        assert_eq!(order, ["a", "b", "paused"]);
    }

    #[tokio::test]
    async fn a_half_open_account_gets_one_worker() {
        let gate = Arc::new(TestGate::default());
        let s = FairScheduler::new(8, 4, gate.clone(), None);
        gate.set("probing", Gate::Probe);
        let first = s.acquire("probing").await;
        let second = tokio::time::timeout(Duration::from_millis(100), s.acquire("probing")).await;
        assert!(second.is_err(), "only the probe runs while half-open");
        gate.set("probing", Gate::Open);
        s.wake();
        let second = tokio::time::timeout(Duration::from_secs(1), s.acquire("probing"))
            .await
            .expect("closed again: the bound is back");
        drop((first, second));
    }

    #[tokio::test]
    async fn a_waiter_that_goes_away_neither_holds_nor_leaks_a_worker() {
        let s = FairScheduler::new(1, 1, Arc::new(AlwaysOpen), None);
        let hold = s.acquire("a").await;
        let gone = tokio::time::timeout(Duration::from_millis(20), s.acquire("b")).await;
        assert!(gone.is_err());
        drop(hold);
        assert_eq!(s.busy(), 0, "the dropped waiter got nothing");
        let p = tokio::time::timeout(Duration::from_secs(1), s.acquire("c"))
            .await
            .unwrap();
        assert_eq!(s.busy(), 1);
        drop(p);
        assert_eq!(s.busy(), 0);
        assert_eq!(s.stats("b").waiting, 0);
    }
}
