//! Kubernetes Events about the operator's resources (`events.k8s.io/v1`), published as
//! kube-runtime's `Recorder` publishes them: the same event (type, action, reason, regarding and
//! related object) again within six minutes of its last occurrence is not a new Event but a
//! series: the first Event's `series.count` grows and `series.lastObservedTime` moves on.
//!
//! What differs is the memory of recent events. kube's `Recorder` keeps every Event it published
//! for six minutes as a whole `Event` object plus its key (about 1.5 KiB inline per entry, in one
//! hash table that never shrinks) and scans all of them on every publish: a bulk mint of 1,000
//! policies (two Events each) left a 4,096-bucket table of about 6 MiB behind for the life of the
//! process, 10,000 policies ten times that. This recorder remembers per recent event only a
//! 128-bit hash of its key, the name of the Event it created and the series' count and time
//! (about 150 bytes), drops the expired ones in one pass at most once a minute, and gives the
//! table's memory back when a burst is over.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event as K8sEvent;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::events::{Event, EventType, Reporter};

/// How long after its last occurrence a repeat still joins an event's series (kube-runtime's
/// `Recorder` uses the same six minutes).
pub const SERIES_WINDOW: Duration = Duration::from_secs(6 * 60);

/// Expired entries are dropped at most this often (one pass over the memory).
const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// Publishes Events; clones share one memory of recent events.
pub struct EventRecorder {
    client: kube::Client,
    reporter: Reporter,
    recent: Mutex<RecentEvents>,
}

/// The events published in the last [`SERIES_WINDOW`], by a 128-bit hash of their key.
///
/// A key names the type, action, reason and both objects in full (about 170 bytes with its
/// allocation); at 10,000 policies the memory holds some 20,000 of them for six minutes. Two
/// independently seeded SipHash values of it (random per process) stand for it instead: two
/// distinct events would need to collide in both 64-bit halves to share a series.
#[derive(Default)]
pub(crate) struct RecentEvents {
    events: HashMap<u128, Recent>,
    hashers: (std::hash::RandomState, std::hash::RandomState),
    swept: Option<Instant>,
}

/// What a repeat needs of an earlier event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Recent {
    /// The Event created for the first occurrence (in the regarding object's namespace).
    name: String,
    /// Occurrences so far.
    count: i32,
    last: Instant,
}

impl RecentEvents {
    fn id(&self, key: &str) -> u128 {
        use std::hash::BuildHasher;
        (u128::from(self.hashers.0.hash_one(key)) << 64) | u128::from(self.hashers.1.hash_one(key))
    }

    /// The earlier occurrence of `key` that a repeat at `now` joins, if any.
    fn series_of(&self, key: &str, now: Instant) -> Option<&Recent> {
        self.events
            .get(&self.id(key))
            .filter(|r| now.saturating_duration_since(r.last) < SERIES_WINDOW)
    }

    /// Records an occurrence of `key` at `now` (the Event `name`, `count` occurrences so far).
    fn record(&mut self, key: &str, name: String, count: i32, now: Instant) {
        self.sweep(now);
        self.events.insert(
            self.id(key),
            Recent {
                name,
                count,
                last: now,
            },
        );
    }

    /// Forgets `key` (its Event is gone).
    fn forget(&mut self, key: &str) {
        let id = self.id(key);
        self.events.remove(&id);
    }

    /// Drops the entries whose series window is over (at most once per [`SWEEP_EVERY`]) and
    /// returns the table's spare memory once it is mostly empty.
    fn sweep(&mut self, now: Instant) {
        if self
            .swept
            .is_some_and(|t| now.saturating_duration_since(t) < SWEEP_EVERY)
        {
            return;
        }
        self.swept = Some(now);
        self.events
            .retain(|_, r| now.saturating_duration_since(r.last) < SERIES_WINDOW);
        if self.events.capacity() > 64 && self.events.capacity() > 4 * self.events.len() {
            self.events.shrink_to_fit();
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.events.len()
    }

    #[cfg(test)]
    fn capacity(&self) -> usize {
        self.events.capacity()
    }
}

/// The identity of an event for its series: what kube-runtime's `Recorder` compares (type,
/// action, reason, the regarding and the related object; the reporter is this process).
pub(crate) fn event_key(ev: &Event, regarding: &ObjectReference) -> String {
    fn push_reference(key: &mut String, r: &ObjectReference) {
        for part in [
            &r.api_version,
            &r.kind,
            &r.namespace,
            &r.name,
            &r.uid,
            &r.resource_version,
            &r.field_path,
        ] {
            key.push_str(part.as_deref().unwrap_or_default());
            key.push('\u{1f}');
        }
    }
    let mut key = String::with_capacity(160);
    key.push_str(match ev.type_ {
        EventType::Normal => "Normal",
        EventType::Warning => "Warning",
    });
    key.push('\u{1f}');
    key.push_str(&ev.action);
    key.push('\u{1f}');
    key.push_str(&ev.reason);
    key.push('\u{1f}');
    push_reference(&mut key, regarding);
    if let Some(related) = &ev.secondary {
        key.push('\u{1e}');
        push_reference(&mut key, related);
    }
    key
}

impl EventRecorder {
    pub fn new(client: kube::Client, reporter: Reporter) -> Self {
        Self {
            client,
            reporter,
            recent: Mutex::new(RecentEvents::default()),
        }
    }

    fn recent(&self) -> std::sync::MutexGuard<'_, RecentEvents> {
        self.recent.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The Event of a first occurrence, as kube-runtime's `Recorder` writes it.
    fn new_event(&self, ev: &Event, regarding: &ObjectReference, now: Timestamp) -> K8sEvent {
        K8sEvent {
            action: Some(ev.action.clone()),
            reason: Some(ev.reason.clone()),
            event_time: Some(MicroTime(now)),
            regarding: Some(regarding.clone()),
            note: ev.note.clone(),
            metadata: ObjectMeta {
                namespace: regarding.namespace.clone(),
                name: Some(format!(
                    "{}.{:x}",
                    regarding
                        .name
                        .as_deref()
                        .unwrap_or(&self.reporter.controller),
                    now.as_nanosecond()
                )),
                ..Default::default()
            },
            reporting_controller: Some(self.reporter.controller.clone()),
            reporting_instance: Some(
                self.reporter
                    .instance
                    .clone()
                    .unwrap_or_else(|| self.reporter.controller.clone()),
            ),
            type_: Some(
                match ev.type_ {
                    EventType::Normal => "Normal",
                    EventType::Warning => "Warning",
                }
                .into(),
            ),
            related: ev.secondary.clone(),
            ..Default::default()
        }
    }

    /// Publishes `ev` about `regarding` (in its namespace; cluster-scoped objects' Events go to
    /// `default`): a new Event, or the next occurrence of a recent one's series.
    pub async fn publish(
        &self,
        ev: &Event,
        regarding: &ObjectReference,
    ) -> Result<(), kube::Error> {
        let key = event_key(ev, regarding);
        let namespace = regarding.namespace.as_deref().unwrap_or("default");
        let events: Api<K8sEvent> = Api::namespaced(self.client.clone(), namespace);
        let earlier = self
            .recent()
            .series_of(&key, Instant::now())
            .map(|r| (r.name.clone(), r.count));
        if let Some((name, count)) = earlier {
            let count = count.saturating_add(1);
            let patch = serde_json::json!({"series": {
                "count": count,
                "lastObservedTime": MicroTime(Timestamp::now()),
            }});
            match events
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => {
                    self.recent().record(&key, name, count, Instant::now());
                    return Ok(());
                }
                // The Event expired or was deleted meanwhile: start a new one.
                Err(kube::Error::Api(s)) if s.code == 404 => self.recent().forget(&key),
                Err(e) => return Err(e),
            }
        }
        let event = self.new_event(ev, regarding, Timestamp::now());
        let name = event.metadata.name.clone().unwrap_or_default();
        events.create(&PostParams::default(), &event).await?;
        self.recent().record(&key, name, 1, Instant::now());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(reason: &str) -> Event {
        Event {
            type_: EventType::Normal,
            reason: reason.into(),
            note: Some("a note".into()),
            action: "Mint".into(),
            secondary: None,
        }
    }

    fn object(name: &str) -> ObjectReference {
        ObjectReference {
            api_version: Some("stripekeys.io/v1alpha1".into()),
            kind: Some("StripeKeyPolicy".into()),
            namespace: Some("shop".into()),
            name: Some(name.into()),
            uid: Some(format!("uid-{name}")),
            ..Default::default()
        }
    }

    #[test]
    fn the_key_tells_events_apart_by_reason_type_object_and_related_object_not_by_note() {
        let base = event_key(&event("KeyMinted"), &object("checkout"));
        let mut other_note = event("KeyMinted");
        other_note.note = Some("other words".into());
        assert_eq!(event_key(&other_note, &object("checkout")), base);
        assert_ne!(event_key(&event("SecretSynced"), &object("checkout")), base);
        assert_ne!(event_key(&event("KeyMinted"), &object("billing")), base);
        let mut warning = event("KeyMinted");
        warning.type_ = EventType::Warning;
        assert_ne!(event_key(&warning, &object("checkout")), base);
        let mut related = event("KeyMinted");
        related.secondary = Some(object("billing"));
        assert_ne!(event_key(&related, &object("checkout")), base);
        // Field boundaries count: moving text from one field to the next is another key.
        let mut a = object("checkout");
        a.namespace = Some("shopx".into());
        a.name = Some("y".into());
        let mut b = object("checkout");
        b.namespace = Some("shop".into());
        b.name = Some("xy".into());
        assert_ne!(
            event_key(&event("KeyMinted"), &a),
            event_key(&event("KeyMinted"), &b)
        );
    }

    #[test]
    fn a_repeat_joins_the_series_only_within_six_minutes_of_the_last_occurrence() {
        let start = Instant::now();
        let mut recent = RecentEvents::default();
        recent.record("k", "checkout.1".into(), 1, start);
        let joined = recent
            .series_of("k", start + Duration::from_secs(300))
            .cloned();
        assert_eq!(
            joined.map(|r| (r.name, r.count)),
            Some(("checkout.1".into(), 1))
        );
        // Each occurrence moves the window on.
        recent.record(
            "k",
            "checkout.1".into(),
            2,
            start + Duration::from_secs(300),
        );
        assert!(
            recent
                .series_of("k", start + Duration::from_secs(600))
                .is_some()
        );
        assert!(
            recent
                .series_of("k", start + Duration::from_secs(300) + SERIES_WINDOW)
                .is_none()
        );
        assert!(recent.series_of("other", start).is_none());
    }

    #[test]
    fn a_burst_of_events_is_forgotten_and_its_memory_given_back_after_the_window() {
        let start = Instant::now();
        let mut recent = RecentEvents::default();
        for i in 0..2_000 {
            recent.record(&format!("key-{i}"), format!("svc-{i}.1"), 1, start);
        }
        assert_eq!(recent.len(), 2_000);
        let burst_capacity = recent.capacity();
        // A quiet event after the window: the sweep drops the burst and shrinks the table.
        let later = start + SERIES_WINDOW + SWEEP_EVERY;
        recent.record("quiet", "quiet.1".into(), 1, later);
        assert_eq!(recent.len(), 1);
        assert!(
            recent.capacity() < burst_capacity / 8,
            "capacity {} after the burst's {burst_capacity}",
            recent.capacity()
        );
        // Sweeps are at most once a minute: an entry expired since the last one is not found
        // though it is still held.
        recent.record("late", "late.1".into(), 1, later);
        let expired_at = later + SERIES_WINDOW;
        assert!(recent.series_of("late", expired_at).is_none());
    }

    #[tokio::test]
    async fn repeats_become_one_event_whose_series_counts_them() {
        let server = kube_test_api::TestApiServer::start().await.unwrap();
        let client =
            kube::Client::try_from(kube::Config::new(server.url().parse().unwrap())).unwrap();
        let recorder = EventRecorder::new(
            client.clone(),
            Reporter {
                controller: "stripe-key-operator".into(),
                instance: Some("pod-1".into()),
            },
        );
        let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
        namespaces
            .create(
                &PostParams::default(),
                &serde_json::from_value(serde_json::json!({"metadata": {"name": "shop"}})).unwrap(),
            )
            .await
            .unwrap();
        let checkout = object("checkout");
        for _ in 0..3 {
            recorder
                .publish(&event("KeyMinted"), &checkout)
                .await
                .unwrap();
        }
        recorder
            .publish(&event("SecretSynced"), &checkout)
            .await
            .unwrap();
        let api: Api<K8sEvent> = Api::namespaced(client, "shop");
        let mut listed = api.list(&Default::default()).await.unwrap().items;
        listed.sort_by_key(|e| e.reason.clone());
        let summary: Vec<_> = listed
            .iter()
            .map(|e| {
                (
                    e.reason.clone().unwrap_or_default(),
                    e.series.as_ref().map(|s| s.count),
                    e.regarding.as_ref().and_then(|r| r.name.clone()),
                    e.reporting_instance.clone(),
                    e.note.clone(),
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                (
                    "KeyMinted".to_string(),
                    Some(3),
                    Some("checkout".to_string()),
                    Some("pod-1".to_string()),
                    Some("a note".to_string())
                ),
                (
                    "SecretSynced".to_string(),
                    None,
                    Some("checkout".to_string()),
                    Some("pod-1".to_string()),
                    Some("a note".to_string())
                ),
            ]
        );
        // An Event deleted meanwhile (expired on the server): the next occurrence is a new one.
        let minted = listed[0].metadata.name.clone().unwrap();
        api.delete(&minted, &Default::default()).await.unwrap();
        recorder
            .publish(&event("KeyMinted"), &checkout)
            .await
            .unwrap();
        let again = api.list(&Default::default()).await.unwrap().items;
        let minted_again: Vec<_> = again
            .iter()
            .filter(|e| e.reason.as_deref() == Some("KeyMinted"))
            .collect();
        assert_eq!(minted_again.len(), 1);
        assert_ne!(
            minted_again[0].metadata.name.as_deref(),
            Some(minted.as_str())
        );
        assert!(minted_again[0].series.is_none());
    }
}
