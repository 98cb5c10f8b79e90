//! One listing of an account's credentials per sweep interval, shared by every resource of the
//! account.
//!
//! Finding orphans (credentials a resource created but never recorded) needs a listing of the
//! account's keys or endpoints. Listing once per rotation made a bulk rotation of N resources
//! of one account cost N listings of an account that holds N credentials: work that grows with
//! the square of the account. [`Listings`] keeps, per Stripe account (API base + context, not
//! per `StripeAccount` object) and per credential kind, the newest listing; a request is served
//! from it when the listing is recent enough ([`Need`]), and concurrent requests for the same
//! account wait for one listing in flight instead of listing again (single flight).
//!
//! # When a cached listing may be used
//!
//! A listing is a snapshot: it shows every credential created before it was taken, and nothing
//! created after. So:
//!
//! - **Absence proves nothing.** A sweep only ever acts on what a listing *shows* (an active
//!   credential the resource owns and its status does not know); a credential missing from an
//!   old listing is simply found by a later one, at most one interval later.
//! - **Presence is judged against the status at sweep time.** The caller compares the listing
//!   with the resource's *current* status (read after the listing arrived), so a credential
//!   minted since the listing was taken is never mistaken for an orphan.
//! - **Retiring is idempotent, and remembered.** A credential the operator retired after a
//!   listing was taken is shown as inactive by [`Listings::get`] (a tombstone), so a cached
//!   listing never makes the engine retire a dead credential again.
//! - **Correctness paths say what they need.** Where a listing must show a particular moment —
//!   confirming that a 404 means gone, or finding the credential a lost create may have made —
//!   the caller asks for a listing taken after that moment: [`Need::fresh`] (taken after the
//!   request) or [`Need::after`] (taken after the create was sent, `create_sent_at`). A cached
//!   listing serves such a request only if it was taken after that moment.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::jiff::{SignedDuration, Timestamp};

/// One credential of an account as a listing shows it: what ownership needs, never a secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    /// Stripe's id.
    pub id: String,
    /// Whether it still works (an active key; an endpoint that exists).
    pub active: bool,
    /// The mark of the resource that created it (see `Credential::owner_mark`), if it carries
    /// one of this operator's marks.
    pub owner: Option<String>,
    /// When Stripe last saw it used (API keys; `None`: never, or the kind has no such field).
    /// The canary check reads it from the shared listing instead of retrieving each key.
    pub last_used: Option<Timestamp>,
}

/// Which listing an account's credentials of one kind are kept under.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ListingKey {
    /// The API base URL.
    pub api_base: String,
    /// The Stripe account (`Stripe-Context`).
    pub context: String,
    /// The credential kind (restricted keys, webhook endpoints).
    pub kind: &'static str,
}

/// How recent a listing must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Need {
    /// A listing older than this is never used.
    pub max_age: Duration,
    /// A listing must have been taken at or after this moment.
    pub not_before: Option<Timestamp>,
}

impl Need {
    /// Any listing younger than `interval`: for sweeps that exist to bound cost.
    pub fn within(interval: Duration) -> Self {
        Need {
            max_age: interval,
            not_before: None,
        }
    }

    /// A listing taken after this request: for correctness (is a 404 really gone?).
    pub fn fresh(now: Timestamp) -> Self {
        Need {
            max_age: Duration::MAX,
            not_before: Some(now),
        }
    }

    /// A listing younger than `interval` and taken after `sent`, a create's `createSentAt`.
    /// Status times are kept in whole seconds (RFC 3339 without fractions), so the recorded
    /// time may be up to a second before the create was really sent: the listing must start
    /// a full second later.
    pub fn after(sent: Timestamp, interval: Duration) -> Self {
        Need {
            max_age: interval,
            not_before: Some(
                sent.checked_add(SignedDuration::from_secs(1))
                    .unwrap_or(sent),
            ),
        }
    }

    /// Whether a listing taken at `taken_at` serves this need at `now`. A listing that starts
    /// after the request was made (`requested`) serves every need: it is as fresh as any.
    pub fn served_by(&self, taken_at: Timestamp, requested: Timestamp, now: Timestamp) -> bool {
        if taken_at >= requested {
            return true;
        }
        let young = now
            .duration_since(taken_at)
            .try_into()
            .is_ok_and(|age: Duration| age < self.max_age);
        young && self.not_before.is_none_or(|t| taken_at >= t)
    }
}

#[derive(Clone)]
struct Listing {
    taken_at: Timestamp,
    items: Arc<Vec<Listed>>,
}

#[derive(Default)]
struct Slot {
    /// The newest listing; the lock is held while a listing is in flight (single flight).
    latest: tokio::sync::Mutex<Option<Listing>>,
    /// Credentials the operator retired, and when: shown inactive in older listings.
    retired: Mutex<HashMap<String, Timestamp>>,
}

/// The shared listings of every account the operator talks to.
#[derive(Default)]
pub struct Listings {
    slots: Mutex<HashMap<ListingKey, Arc<Slot>>>,
}

impl std::fmt::Debug for Listings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Listings")
    }
}

impl Listings {
    fn slot(&self, key: &ListingKey) -> Arc<Slot> {
        self.slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key.clone())
            .or_default()
            .clone()
    }

    /// The account's credentials of one kind, from a listing that serves `need`: the cached
    /// one, the one another request has in flight, or a new one made with `list`. `clock`
    /// says the time (the controllers' clock). Credentials retired since the listing was taken
    /// are shown inactive.
    pub async fn get<E, F, Fut>(
        &self,
        key: &ListingKey,
        need: Need,
        clock: &dyn crate::controller::clock::Clock,
        list: F,
    ) -> Result<Vec<Listed>, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Vec<Listed>, E>>,
    {
        let requested = clock.now();
        let slot = self.slot(key);
        let mut latest = slot.latest.lock().await;
        let listing = match latest.as_ref() {
            Some(l) if need.served_by(l.taken_at, requested, clock.now()) => l.clone(),
            _ => {
                let taken_at = clock.now();
                let items = Arc::new(list().await?);
                let listing = Listing { taken_at, items };
                *latest = Some(listing.clone());
                // A tombstone older than this listing is in it already.
                slot.retired
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .retain(|_, at| *at >= taken_at);
                listing
            }
        };
        drop(latest);
        let retired = slot.retired.lock().unwrap_or_else(|e| e.into_inner());
        Ok(listing
            .items
            .iter()
            .map(|l| Listed {
                active: l.active && !retired.contains_key(&l.id),
                ..l.clone()
            })
            .collect())
    }

    /// Records that `id` was retired (or found dead) at `at`: listings taken earlier show it
    /// inactive from now on.
    pub fn retired(&self, key: &ListingKey, id: &str, at: Timestamp) {
        self.slot(key)
            .retired
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.to_string(), at);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::clock::{Clock, ManualClock};
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn key(context: &str) -> ListingKey {
        ListingKey {
            api_base: "https://api.stripe.com".into(),
            context: context.into(),
            kind: "keys",
        }
    }

    fn item(id: &str) -> Listed {
        Listed {
            id: id.into(),
            active: true,
            owner: Some("uid-1".into()),
            last_used: None,
        }
    }

    const INTERVAL: Duration = Duration::from_secs(300);

    async fn get(
        l: &Listings,
        k: &ListingKey,
        need: Need,
        clock: &ManualClock,
        calls: &AtomicUsize,
        ids: &[&str],
    ) -> Vec<Listed> {
        let items: Vec<Listed> = ids.iter().map(|i| item(i)).collect();
        l.get::<(), _, _>(k, need, clock, || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Ok(items)
        })
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn a_listing_is_shared_within_the_interval_and_taken_again_after_it() {
        let (l, clock, calls) = (Listings::default(), ManualClock::new(), AtomicUsize::new(0));
        let k = key("acct_1");
        let first = get(&l, &k, Need::within(INTERVAL), &clock, &calls, &["a"]).await;
        assert_eq!(first, [item("a")]);
        clock.advance(Duration::from_secs(60));
        let again = get(&l, &k, Need::within(INTERVAL), &clock, &calls, &["a", "b"]).await;
        assert_eq!(again, [item("a")], "served from the cache");
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        // Another account, and the same account's other kind, have listings of their own.
        get(
            &l,
            &key("acct_2"),
            Need::within(INTERVAL),
            &clock,
            &calls,
            &[],
        )
        .await;
        let other_kind = ListingKey {
            kind: "endpoints",
            ..k.clone()
        };
        get(&l, &other_kind, Need::within(INTERVAL), &clock, &calls, &[]).await;
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        clock.advance(INTERVAL);
        let later = get(&l, &k, Need::within(INTERVAL), &clock, &calls, &["a", "b"]).await;
        assert_eq!(later.len(), 2, "an orphan is seen within one interval");
        assert_eq!(calls.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn correctness_needs_a_listing_taken_after_their_moment() {
        let (l, clock, calls) = (Listings::default(), ManualClock::new(), AtomicUsize::new(0));
        let k = key("acct_1");
        get(&l, &k, Need::within(INTERVAL), &clock, &calls, &["a"]).await;
        clock.advance(Duration::from_secs(5));
        // A create sent after the listing: the listing cannot show what it made.
        let sent = clock.now();
        clock.advance(Duration::from_secs(5));
        let seen = get(
            &l,
            &k,
            Need::after(sent, INTERVAL),
            &clock,
            &calls,
            &["a", "b"],
        )
        .await;
        assert_eq!(seen.len(), 2);
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        // That listing now serves the same moment, and cost-only sweeps.
        clock.advance(Duration::from_secs(5));
        get(&l, &k, Need::after(sent, INTERVAL), &clock, &calls, &[]).await;
        get(&l, &k, Need::within(INTERVAL), &clock, &calls, &[]).await;
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        // Within the second after `sent`, it does not (status times are whole seconds).
        let just_before: Timestamp = clock.now();
        assert!(!Need::after(just_before, INTERVAL).served_by(
            just_before + SignedDuration::from_millis(500),
            just_before + SignedDuration::from_secs(10),
            just_before + SignedDuration::from_secs(10),
        ));
        // A fresh need always lists.
        get(&l, &k, Need::fresh(clock.now()), &clock, &calls, &[]).await;
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_credential_retired_after_the_listing_shows_inactive() {
        let (l, clock, calls) = (Listings::default(), ManualClock::new(), AtomicUsize::new(0));
        let k = key("acct_1");
        get(&l, &k, Need::within(INTERVAL), &clock, &calls, &["a", "b"]).await;
        l.retired(&k, "a", clock.now());
        let seen = get(&l, &k, Need::within(INTERVAL), &clock, &calls, &[]).await;
        assert!(!seen.iter().find(|i| i.id == "a").unwrap().active);
        assert!(seen.iter().find(|i| i.id == "b").unwrap().active);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn concurrent_requests_for_one_account_wait_for_one_listing() {
        let l = Arc::new(Listings::default());
        let clock = ManualClock::new();
        let calls = Arc::new(AtomicUsize::new(0));
        let k = key("acct_1");
        let mut tasks = Vec::new();
        for _ in 0..20 {
            let (l, clock, calls, k) = (l.clone(), clock.clone(), calls.clone(), k.clone());
            tasks.push(tokio::spawn(async move {
                l.get::<(), _, _>(&k, Need::within(INTERVAL), &clock, || async {
                    calls.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    Ok(vec![item("a")])
                })
                .await
                .unwrap()
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap(), [item("a")]);
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1, "single flight");
    }

    #[tokio::test]
    async fn a_failed_listing_is_not_kept() {
        let (l, clock) = (Listings::default(), ManualClock::new());
        let k = key("acct_1");
        let err = l
            .get(&k, Need::within(INTERVAL), &clock, || async { Err("boom") })
            .await;
        assert_eq!(err, Err("boom"));
        let calls = AtomicUsize::new(0);
        get(&l, &k, Need::within(INTERVAL), &clock, &calls, &["a"]).await;
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }
}
