//! What the proxy reports on a `StripeWebhookEndpoint`.
//!
//! Two different things, on purpose:
//! - **Failed verifications** (forged, stale or replayed signatures) prove nothing about the
//!   secret: a signature that does not verify shows that the sender does *not* hold it. They are
//!   counted, and a burst of them records one Warning Event per window
//!   ([`FAILURES_EVENT_REASON`]), never a rotation.
//! - **A forgery with a valid signature** (a delivery that verifies but that Stripe did not send,
//!   see [`super::confirm`]) proves that someone else holds the secret: an incident. It records a
//!   Warning Event ([`INCIDENT_EVENT_REASON`]) and, when enabled, asks the operator for an
//!   incident rotation (the rotate annotations with reason `incident`), at most once per window.

use std::collections::VecDeque;
use std::fmt;
use std::str::FromStr;
use std::time::{Duration, Instant};

use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use serde_json::json;

use crate::api::{
    ROTATE_ANNOTATION, ROTATE_REASON_ANNOTATION, ROTATE_REASON_INCIDENT, StripeWebhookEndpoint,
};

/// The Event reason of a burst of failed verifications (never a rotation).
pub const FAILURES_EVENT_REASON: &str = "WebhookVerificationFailures";

/// The Event reason of an incident: a validly signed delivery that Stripe did not send.
pub const INCIDENT_EVENT_REASON: &str = "WebhookForgeryDetected";

/// The field manager of the annotation patch.
pub const PROXY_FIELD_MANAGER: &str = "stripe-key-operator-verify-proxy";

/// `NAMESPACE/NAME` of a `StripeWebhookEndpoint`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointRef {
    /// Namespace of the endpoint.
    pub namespace: String,
    /// Name of the endpoint.
    pub name: String,
}

impl FromStr for EndpointRef {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                Ok(Self {
                    namespace: ns.to_owned(),
                    name: name.to_owned(),
                })
            }
            _ => Err(format!(
                "{s:?}: expected NAMESPACE/NAME of a StripeWebhookEndpoint"
            )),
        }
    }
}

impl fmt::Display for EndpointRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Counts failures in a sliding window and fires at most once per window (the Warning Event of
/// failed verifications).
#[derive(Debug)]
pub struct IncidentTracker {
    threshold: usize,
    window: Duration,
    failures: VecDeque<Instant>,
    last_fired: Option<Instant>,
}

impl IncidentTracker {
    /// Fires when `threshold` failures fall within `window` (a threshold of 0 never fires).
    pub fn new(threshold: u32, window: Duration) -> Self {
        Self {
            threshold: threshold as usize,
            window,
            failures: VecDeque::new(),
            last_fired: None,
        }
    }

    /// Records a failure at `now`; true when this failure triggers an incident.
    pub fn record_failure(&mut self, now: Instant) -> bool {
        if self.threshold == 0 {
            return false;
        }
        while let Some(&front) = self.failures.front() {
            if now.saturating_duration_since(front) > self.window {
                self.failures.pop_front();
            } else {
                break;
            }
        }
        self.failures.push_back(now);
        // bounded: only the last `threshold` failures matter
        while self.failures.len() > self.threshold {
            self.failures.pop_front();
        }
        if self.failures.len() < self.threshold {
            return false;
        }
        if self
            .last_fired
            .is_some_and(|t| now.saturating_duration_since(t) < self.window)
        {
            return false;
        }
        self.last_fired = Some(now);
        self.failures.clear();
        true
    }
}

/// Records incidents against one endpoint.
pub struct IncidentReporter {
    client: kube::Client,
    endpoint: EndpointRef,
    rotate: bool,
    recorder: Recorder,
}

impl fmt::Debug for IncidentReporter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IncidentReporter")
            .field("endpoint", &self.endpoint)
            .field("rotate", &self.rotate)
            .finish_non_exhaustive()
    }
}

impl IncidentReporter {
    /// A reporter for `endpoint`; with `rotate`, an incident also sets the rotate annotations.
    pub fn new(client: kube::Client, endpoint: EndpointRef, rotate: bool) -> Self {
        let reporter = Reporter {
            controller: PROXY_FIELD_MANAGER.into(),
            instance: std::env::var("POD_NAME").ok(),
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            endpoint,
            rotate,
        }
    }

    /// The endpoint reported on.
    pub fn endpoint(&self) -> &EndpointRef {
        &self.endpoint
    }

    async fn reference(
        &self,
        api: &Api<StripeWebhookEndpoint>,
    ) -> Result<k8s_openapi::api::core::v1::ObjectReference, kube::Error> {
        use kube::Resource;
        api.get(&self.endpoint.name)
            .await
            .map(|ep| ep.object_ref(&()))
    }

    /// Records a Warning Event for `failures` failed verifications within `window`. Never
    /// requests a rotation: a signature that does not verify proves that its sender does not
    /// hold the secret.
    pub async fn report_failures(
        &self,
        failures: u32,
        window: Duration,
    ) -> Result<(), kube::Error> {
        let api: Api<StripeWebhookEndpoint> =
            Api::namespaced(self.client.clone(), &self.endpoint.namespace);
        let reference = self.reference(&api).await?;
        let event = Event {
            type_: EventType::Warning,
            reason: FAILURES_EVENT_REASON.into(),
            note: Some(format!(
                "{failures} webhook requests failed verification (signatures that match no \
                 secret, stale timestamps or replays) within {}; no rotation requested: a \
                 signature that does not verify shows the sender does not hold the secret",
                humantime::format_duration(window)
            )),
            action: "VerifyWebhook".into(),
            secondary: None,
        };
        self.recorder.publish(&event, &reference).await
    }

    /// Records an incident: a delivery signed with a loaded secret (`secret_fingerprint`) that
    /// Stripe did not send (`evidence`). With `rotate`, also sets the rotate annotations with
    /// reason `incident`, which makes the operator replace the secret and revoke the old one.
    pub async fn report_incident(
        &self,
        evidence: &str,
        secret_fingerprint: &str,
    ) -> Result<(), kube::Error> {
        let api: Api<StripeWebhookEndpoint> =
            Api::namespaced(self.client.clone(), &self.endpoint.namespace);
        let reference = self.reference(&api).await?;
        if self.rotate {
            let value = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
            let patch = json!({"metadata": {"annotations": {
                ROTATE_ANNOTATION: value,
                ROTATE_REASON_ANNOTATION: ROTATE_REASON_INCIDENT,
            }}});
            api.patch(
                &self.endpoint.name,
                &PatchParams {
                    field_manager: Some(PROXY_FIELD_MANAGER.into()),
                    ..Default::default()
                },
                &Patch::Merge(&patch),
            )
            .await?;
        }
        let action = if self.rotate {
            "the rotate annotation was set with reason incident"
        } else {
            "incident rotation is not enabled (--incident-rotate)"
        };
        let event = Event {
            type_: EventType::Warning,
            reason: INCIDENT_EVENT_REASON.into(),
            note: Some(format!(
                "a webhook delivery signed with secret {secret_fingerprint} was not sent by \
                 Stripe ({evidence}): the signing secret is known to someone else; {action}"
            )),
            action: if self.rotate {
                "RequestRotation".into()
            } else {
                "VerifyWebhook".into()
            },
            secondary: None,
        };
        self.recorder.publish(&event, &reference).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fires_once_threshold_failures_fall_within_the_window() {
        let t0 = Instant::now();
        let mut t = IncidentTracker::new(3, Duration::from_secs(60));
        assert!(!t.record_failure(t0));
        assert!(!t.record_failure(t0 + Duration::from_secs(1)));
        assert!(t.record_failure(t0 + Duration::from_secs(2)));
    }

    #[test]
    fn failures_spread_wider_than_the_window_do_not_fire() {
        let t0 = Instant::now();
        let mut t = IncidentTracker::new(3, Duration::from_secs(10));
        for i in 0..10 {
            assert!(!t.record_failure(t0 + Duration::from_secs(i * 6)));
        }
    }

    #[test]
    fn fires_at_most_once_per_window() {
        let t0 = Instant::now();
        let mut t = IncidentTracker::new(2, Duration::from_secs(10));
        let mut fired = 0;
        for i in 0..20 {
            if t.record_failure(t0 + Duration::from_millis(i * 100)) {
                fired += 1;
            }
        }
        assert_eq!(fired, 1);
        assert!(!t.record_failure(t0 + Duration::from_secs(10)));
        assert!(t.record_failure(t0 + Duration::from_secs(11)));
    }

    #[test]
    fn a_zero_threshold_never_fires() {
        let mut t = IncidentTracker::new(0, Duration::from_secs(10));
        assert!(!t.record_failure(Instant::now()));
    }

    #[test]
    fn endpoint_refs_parse_namespace_and_name() {
        let r: EndpointRef = "shop/hooks".parse().unwrap();
        assert_eq!((r.namespace.as_str(), r.name.as_str()), ("shop", "hooks"));
        assert!("hooks".parse::<EndpointRef>().is_err());
        assert!("a/b/c".parse::<EndpointRef>().is_err());
        assert!("/b".parse::<EndpointRef>().is_err());
    }
}
