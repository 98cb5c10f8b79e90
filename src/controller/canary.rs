//! Canary keys (honeytokens): a `StripeKeyPolicy` with `spec.canary` is minted, stored,
//! published and rotated by the rotation engine like any policy, but nothing legitimate ever
//! uses its key (the operator skips even its scope probes). Its Secret is a decoy.
//!
//! The check here runs on the leader every `--canary-check-interval`: it groups the canaries by
//! Stripe account and takes **one** listing of each account's keys (the shared listing of
//! [`crate::rotation::listing`], so the orphan sweeps and the canaries share it where their
//! needs allow), then compares each canary key's `last_used` with the latest use already
//! handled. No key is retrieved one by one.
//!
//! A use trips the canary, once:
//! 1. status first: `status.canary.handledLastUsed`, `lastTrip` (with `actionsPending`) and
//!    `Tripped=True` (reason `CanaryUsed`) are written, conditional on the object's
//!    resourceVersion, so a use is handled once even across a restart;
//! 2. a Warning Event `CanaryTripped`, the counter `stripe_key_operator_canary_trips_total`, the
//!    gauge `stripe_key_operator_canary_tripped` and an audit record `canary.trip`;
//! 3. the incident rotations, requested the way a person requests them (the annotations
//!    `stripekeys.io/rotate=<trip request>` and `stripekeys.io/rotate-reason=incident`, with a
//!    `stripekeys.io/rotate-note`): on every guarded resource (`onTrip: IncidentRotation`) and
//!    on the canary itself, so that its used key is revoked at once and a fresh one is minted.
//!    The request value is derived from the trip, so repeating it after a crash is harmless;
//! 4. `actionsPending` is cleared. A later check finds the canary re-minted and quiet and sets
//!    `Tripped=False` (reason `Rearmed`) and the gauge back to 0.
//!
//! Detection takes at most one interval after Stripe shows the use (two when an orphan sweep's
//! listing, younger than half an interval, was reused), plus Stripe's reporting lag of
//! `last_used`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DynamicObject, ListParams, Patch, PatchParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::Context;
use super::accounts::AccountHandle;
use super::error::ReconcileError;
use super::keypolicy::KeyPolicy;
use crate::api::conditions::{self, set_condition};
use crate::api::{
    CANARY_PERMISSIONS, CANARY_TRIPPED_CONDITION, CanaryOnTrip, CanaryTrip, StripeAccount,
    StripeKeyPolicy, StripeKeyPolicySpec, StripeWebhookEndpoint,
};
use crate::metrics::NamespacedLabels;
use crate::rotation::engine::{Credential, listing_key};
use crate::rotation::listing::{Listed, ListingKey, Need};

/// Default of `--canary-check-interval`.
pub const DEFAULT_CHECK_INTERVAL: Duration = Duration::from_secs(60);
/// The Event reason (and audit action) of a trip.
pub const TRIPPED_REASON: &str = "CanaryTripped";
/// The reason of `Tripped=True`.
pub const USED_REASON: &str = "CanaryUsed";
/// The reason of `Tripped=False` once the canary is re-minted and quiet.
pub const REARMED_REASON: &str = "Rearmed";

/// Checks `spec.canary` (admission and the controller both call it through
/// [`super::keypolicy::validate`]). Pure.
pub fn validate_spec(spec: &StripeKeyPolicySpec) -> Result<(), String> {
    let Some(canary) = &spec.canary else {
        return Ok(());
    };
    let harmless = CANARY_PERMISSIONS.join(", ");
    match spec.permissions.as_slice() {
        [one] if CANARY_PERMISSIONS.contains(&one.as_str()) => {}
        other => {
            return Err(format!(
                "a canary holds exactly one harmless read permission ({harmless}), not {}: \
                 a stolen decoy must not be able to do anything",
                other.join(", ")
            ));
        }
    }
    if !spec.connect_permissions.is_empty() {
        return Err("a canary has no connectPermissions".into());
    }
    if let Some(selector) = &canary.guards
        && kube::core::Selector::try_from(selector.clone()).is_err()
    {
        return Err("canary.guards is not a valid label selector".into());
    }
    Ok(())
}

/// A use of a canary key that was not handled yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Use {
    pub key_id: String,
    /// Stripe's `last_used`, cut to whole seconds (status keeps whole seconds).
    pub last_used: Timestamp,
}

fn whole_seconds(t: Timestamp) -> Timestamp {
    Timestamp::from_second(t.as_second()).unwrap_or(t)
}

/// The canary's keys that may trip it: what it hands out (current and previous key, the key a
/// rotation minted), never what it is already retiring. Pure.
fn live_keys(status: &crate::api::StripeKeyPolicyStatus) -> Vec<&str> {
    [
        status.current_key.as_ref(),
        status.previous_key.as_ref(),
        status.rotation.as_ref().and_then(|r| r.new_key.as_ref()),
    ]
    .into_iter()
    .flatten()
    .map(|k| k.id.as_str())
    .collect()
}

/// The newest use, in `listed`, of one of the canary's live keys that is later than the last
/// use it handled. Pure.
pub fn new_use(policy: &StripeKeyPolicy, listed: &[Listed]) -> Option<Use> {
    let status = policy.status.as_ref()?;
    let live = live_keys(status);
    let handled = status
        .canary
        .as_ref()
        .and_then(|c| c.handled_last_used.as_ref())
        .map(|t| t.0.as_second());
    listed
        .iter()
        .filter(|l| l.active && live.contains(&l.id.as_str()))
        .filter_map(|l| Some((l, whole_seconds(l.last_used?))))
        .filter(|(_, used)| handled.is_none_or(|h| used.as_second() > h))
        .max_by_key(|(_, used)| *used)
        .map(|(l, used)| Use {
            key_id: l.id.clone(),
            last_used: used,
        })
}

/// The `stripekeys.io/rotate` value of the incident rotations a trip requests: the same for the
/// same trip, so requesting again after a crash changes nothing.
pub fn trip_request(name: &str, used: Timestamp) -> String {
    format!("canary-{name}-{}", used.as_second())
}

/// Whether a tripped canary has been re-minted (its incident rotation completed with a key
/// other than the one used) and no new use is pending. Pure.
pub fn rearmed(policy: &StripeKeyPolicy) -> bool {
    let Some(status) = policy.status.as_ref() else {
        return false;
    };
    let Some(trip) = status.canary.as_ref().and_then(|c| c.last_trip.as_ref()) else {
        return false;
    };
    !trip.actions_pending
        && status.rotation.is_none()
        && status.last_handled_rotate_request.as_deref() == Some(trip.request.as_str())
        && status
            .current_key
            .as_ref()
            .is_some_and(|k| k.id != trip.key_id)
}

fn tripped(policy: &StripeKeyPolicy) -> bool {
    policy
        .status
        .as_ref()
        .is_some_and(|s| conditions::is_true(&s.conditions, CANARY_TRIPPED_CONDITION))
}

fn labels(policy: &StripeKeyPolicy) -> NamespacedLabels {
    NamespacedLabels {
        namespace: policy.namespace().unwrap_or_default(),
        name: policy.name_any(),
    }
}

/// Runs the canary check every `--canary-check-interval` until `shutdown` fires.
pub async fn run(ctx: Arc<Context>, scopes: Vec<Option<String>>, shutdown: CancellationToken) {
    let interval = ctx
        .config
        .canary_check_interval
        .max(Duration::from_millis(100));
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticks.tick() => {}
        }
        if let Err(e) = check_once(&ctx, &scopes).await {
            warn!(error = %e, "canary check failed; trying again at the next interval");
        }
    }
}

/// One round: every canary of every account, one listing per account.
pub async fn check_once(ctx: &Context, scopes: &[Option<String>]) -> Result<(), ReconcileError> {
    let mut canaries = Vec::new();
    for scope in scopes {
        let api: Api<StripeKeyPolicy> = match scope {
            Some(ns) => Api::namespaced(ctx.client.clone(), ns),
            None => Api::all(ctx.client.clone()),
        };
        // A page at a time: only the canaries are kept.
        super::caches::for_each_listed(&api, &ListParams::default(), |p| {
            if p.spec.canary.is_some() && p.meta().deletion_timestamp.is_none() {
                canaries.push(p);
            }
        })
        .await?;
    }
    // Group by StripeAccount object, then by Stripe account (API base and context): two objects
    // naming one context share its listing.
    let mut by_account: BTreeMap<String, Vec<StripeKeyPolicy>> = BTreeMap::new();
    for c in canaries {
        let l = labels(&c);
        ctx.metrics
            .canary_tripped
            .get_or_create(&l)
            .set(i64::from(tripped(&c)));
        // The counter exists at 0 before the first trip, so `increase()` sees that trip.
        let _ = ctx.metrics.canary_trips.get_or_create(&l);
        by_account
            .entry(c.spec.account_ref.name.clone())
            .or_default()
            .push(c);
    }
    let accounts: Api<StripeAccount> = Api::all(ctx.client.clone());
    let mut groups: Vec<(ListingKey, AccountHandle, Vec<StripeKeyPolicy>)> = Vec::new();
    for (name, policies) in by_account {
        let Some(account) = accounts.get_opt(&name).await? else {
            continue;
        };
        let handle = match ctx.accounts.resolve(ctx, &account).await {
            Ok(h) => h,
            Err(e) => {
                warn!(account = %name, error = %e, "canary check: the account cannot be used");
                continue;
            }
        };
        let observer = ctx.call_observer(
            crate::audit::Actor::resource("StripeAccount", None, &name).triggered_by("CanaryCheck"),
        );
        let handle = AccountHandle {
            client: handle.client.with_observer(observer),
            ..handle
        };
        let key = listing_key::<KeyPolicy>(&handle);
        match groups.iter_mut().find(|(k, _, _)| *k == key) {
            Some((_, _, p)) => p.extend(policies),
            None => groups.push((key, handle, policies)),
        }
    }
    let interval = ctx.config.canary_check_interval;
    for (key, handle, policies) in groups {
        // Younger than half an interval: a listing of the previous round is never reused, a
        // sweep's listing taken moments ago is.
        let listed = ctx
            .listings
            .get(&key, Need::within(interval / 2), ctx.clock.as_ref(), || {
                KeyPolicy::list_account(&handle)
            })
            .await;
        let listed = match listed {
            Ok(l) => l,
            Err(e) => {
                warn!(context = %key.context, error = %e, "canary check: listing the account's keys failed");
                continue;
            }
        };
        for policy in policies {
            if let Err(e) = check_canary(ctx, &policy, &listed).await {
                warn!(namespace = %policy.namespace().unwrap_or_default(), name = %policy.name_any(),
                      error = %e, "canary check of one canary failed");
            }
        }
    }
    Ok(())
}

/// Checks one canary against its account's listing.
async fn check_canary(
    ctx: &Context,
    policy: &StripeKeyPolicy,
    listed: &[Listed],
) -> Result<(), ReconcileError> {
    let pending = policy
        .status
        .as_ref()
        .and_then(|s| s.canary.as_ref())
        .and_then(|c| c.last_trip.as_ref())
        .is_some_and(|t| t.actions_pending);
    if pending {
        // A crash interrupted a trip's actions: finish them (they are idempotent).
        return finish_actions(ctx, policy).await;
    }
    if new_use(policy, listed).is_some() {
        return trip(ctx, policy, listed).await;
    }
    if tripped(policy) && rearmed(policy) {
        rearm(ctx, policy).await?;
    }
    Ok(())
}

fn api_of(ctx: &Context, policy: &StripeKeyPolicy) -> Api<StripeKeyPolicy> {
    Api::namespaced(ctx.client.clone(), &policy.namespace().unwrap_or_default())
}

/// Handles a new use: status first (conditional on the object as read now), then the alarm,
/// then the incident rotations.
async fn trip(
    ctx: &Context,
    policy: &StripeKeyPolicy,
    listed: &[Listed],
) -> Result<(), ReconcileError> {
    let api = api_of(ctx, policy);
    let Some(mut fresh) = api.get_opt(&policy.name_any()).await? else {
        return Ok(());
    };
    if fresh.meta().uid != policy.meta().uid {
        return Ok(());
    }
    // Judged again on the fresh object: the cached one may predate a trip already handled.
    let Some(used) = new_use(&fresh, listed) else {
        return Ok(());
    };
    let (ns, name) = (fresh.namespace().unwrap_or_default(), fresh.name_any());
    let now = ctx.clock.now();
    let request = trip_request(&name, used.last_used);
    let mut status = fresh.status.clone().unwrap_or_default();
    let mut canary = status.canary.clone().unwrap_or_default();
    canary.handled_last_used = Some(Time(used.last_used));
    canary.trips += 1;
    canary.last_trip = Some(CanaryTrip {
        key_id: used.key_id.clone(),
        last_used: Time(used.last_used),
        detected_at: Time(whole_seconds(now)),
        request: request.clone(),
        rotated: Vec::new(),
        actions_pending: true,
    });
    status.canary = Some(canary);
    let on_trip = fresh
        .spec
        .canary
        .as_ref()
        .map(|c| c.on_trip())
        .unwrap_or_default();
    let consequence = match on_trip {
        CanaryOnTrip::IncidentRotation => {
            "the resources it guards are rotated as an incident and the canary is re-minted"
        }
        CanaryOnTrip::Alert => "the canary is re-minted (onTrip: Alert rotates nothing else)",
    };
    let message = format!(
        "canary key {} was used at {}: its Secret {} was read by someone who should not have it; {consequence}",
        used.key_id, used.last_used, fresh.spec.delivery.secret.name
    );
    set_condition(
        &mut status.conditions,
        CANARY_TRIPPED_CONDITION,
        true,
        USED_REASON,
        message.clone(),
        fresh.meta().generation,
        now,
    );
    super::shared::write_status(ctx, &api, &mut fresh, status).await?;
    // The trip is recorded: from here on it is never handled again.
    let labels = labels(&fresh);
    ctx.metrics.canary_trips.get_or_create(&labels).inc();
    ctx.metrics.canary_tripped.get_or_create(&labels).set(1);
    warn!(namespace = %ns, name = %name, key = %used.key_id, last_used = %used.last_used, "canary tripped");
    ctx.publish_event(
        &fresh.object_ref(&()),
        EventType::Warning,
        TRIPPED_REASON,
        "CanaryCheck",
        message,
    )
    .await;
    ctx.audit.record(
        crate::audit::AuditEntry::canary_trip(
            crate::audit::Actor::resource("StripeKeyPolicy", Some(&ns), &name)
                .triggered_by("CanaryCheck"),
            &ns,
            &name,
        )
        .key_id(&used.key_id)
        .detail("last_used", used.last_used.to_string())
        .detail("request", request)
        .detail("on_trip", format!("{on_trip:?}"))
        .success(),
    );
    finish_actions(ctx, &fresh).await
}

/// The guarded resources of a canary: `Kind/name` and the API to annotate them through.
async fn guarded(
    ctx: &Context,
    policy: &StripeKeyPolicy,
) -> Result<Vec<(String, Api<DynamicObject>, String)>, ReconcileError> {
    let Some(selector) = policy.spec.canary.as_ref().and_then(|c| c.guards.as_ref()) else {
        return Ok(Vec::new());
    };
    let ns = policy.namespace().unwrap_or_default();
    let mut out = Vec::new();
    let policies: Api<StripeKeyPolicy> = Api::namespaced(ctx.client.clone(), &ns);
    let dynamic = |kind: &str, plural: &str| -> Api<DynamicObject> {
        let ar = ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk(crate::api::GROUP, crate::api::VERSION, kind),
            plural,
        );
        Api::namespaced_with(ctx.client.clone(), &ns, &ar)
    };
    super::caches::for_each_listed(&policies, &ListParams::default(), |p| {
        if p.spec.canary.is_none() && crate::rules::selects(selector, p.labels()) {
            out.push((
                format!("StripeKeyPolicy/{}", p.name_any()),
                dynamic("StripeKeyPolicy", "stripekeypolicies"),
                p.name_any(),
            ));
        }
    })
    .await?;
    let endpoints: Api<StripeWebhookEndpoint> = Api::namespaced(ctx.client.clone(), &ns);
    super::caches::for_each_listed(&endpoints, &ListParams::default(), |e| {
        if crate::rules::selects(selector, e.labels()) {
            out.push((
                format!("StripeWebhookEndpoint/{}", e.name_any()),
                dynamic("StripeWebhookEndpoint", "stripewebhookendpoints"),
                e.name_any(),
            ));
        }
    })
    .await?;
    Ok(out)
}

/// Requests an incident rotation of `name` with `request` (a no-op when it carries it already).
async fn request_incident(
    api: &Api<DynamicObject>,
    name: &str,
    request: &str,
    note: &str,
) -> Result<(), ReconcileError> {
    let Some(obj) = api.get_opt(name).await? else {
        return Ok(());
    };
    let annotations = obj.annotations();
    if annotations
        .get(crate::api::ROTATE_ANNOTATION)
        .map(String::as_str)
        == Some(request)
        && annotations
            .get(crate::api::ROTATE_REASON_ANNOTATION)
            .map(String::as_str)
            == Some(crate::api::ROTATE_REASON_INCIDENT)
    {
        return Ok(());
    }
    api.patch(
        name,
        &PatchParams::default(),
        &Patch::Merge(crate::rotate_cli::rotation_patch(request, true, Some(note))),
    )
    .await?;
    Ok(())
}

/// Requests the incident rotations of a recorded trip (guarded resources, then the canary
/// itself) and clears `actionsPending`.
async fn finish_actions(ctx: &Context, policy: &StripeKeyPolicy) -> Result<(), ReconcileError> {
    let Some(trip) = policy
        .status
        .as_ref()
        .and_then(|s| s.canary.as_ref())
        .and_then(|c| c.last_trip.clone())
    else {
        return Ok(());
    };
    let (ns, name) = (policy.namespace().unwrap_or_default(), policy.name_any());
    let note = format!(
        "canary {ns}/{name} tripped: key {} used at {}",
        trip.key_id, trip.last_used.0
    );
    let on_trip = policy
        .spec
        .canary
        .as_ref()
        .map(|c| c.on_trip())
        .unwrap_or_default();
    let mut rotated = Vec::new();
    if on_trip == CanaryOnTrip::IncidentRotation {
        for (label, api, target) in guarded(ctx, policy).await? {
            request_incident(&api, &target, &trip.request, &note).await?;
            info!(canary = %name, target = %label, "canary trip: incident rotation requested");
            rotated.push(label);
        }
    }
    // The canary itself: its used key is revoked at once and a fresh one minted.
    let own = Api::<DynamicObject>::namespaced_with(
        ctx.client.clone(),
        &ns,
        &ApiResource::erase::<StripeKeyPolicy>(&()),
    );
    request_incident(&own, &name, &trip.request, &note).await?;
    // Clear the pending mark on the object as it is now (the annotation changed it).
    let api = api_of(ctx, policy);
    for attempt in 0..3 {
        let Some(mut fresh) = api.get_opt(&name).await? else {
            return Ok(());
        };
        let mut status = fresh.status.clone().unwrap_or_default();
        let Some(t) = status
            .canary
            .as_mut()
            .and_then(|c| c.last_trip.as_mut())
            .filter(|t| t.request == trip.request)
        else {
            return Ok(());
        };
        t.actions_pending = false;
        t.rotated = rotated.clone();
        match super::shared::write_status(ctx, &api, &mut fresh, status).await {
            Ok(()) => break,
            Err(e) if super::shared::is_conflict(&e) && attempt < 2 => continue,
            Err(e) => return Err(e),
        }
    }
    if !rotated.is_empty() {
        ctx.publish_event(
            &policy.object_ref(&()),
            EventType::Warning,
            "CanaryIncidentRotations",
            "CanaryCheck",
            format!(
                "canary trip: incident rotation requested ({}={}) of {}",
                crate::api::ROTATE_ANNOTATION,
                trip.request,
                rotated.join(", ")
            ),
        )
        .await;
    }
    Ok(())
}

/// A tripped canary that was re-minted and is quiet: `Tripped=False`, gauge 0.
async fn rearm(ctx: &Context, policy: &StripeKeyPolicy) -> Result<(), ReconcileError> {
    let api = api_of(ctx, policy);
    let Some(mut fresh) = api.get_opt(&policy.name_any()).await? else {
        return Ok(());
    };
    if !rearmed(&fresh) || !tripped(&fresh) {
        return Ok(());
    }
    let mut status = fresh.status.clone().unwrap_or_default();
    let id = status
        .current_key
        .as_ref()
        .map(|k| k.id.clone())
        .unwrap_or_default();
    let message = format!("re-minted as key {id} after its last trip, and quiet since");
    set_condition(
        &mut status.conditions,
        CANARY_TRIPPED_CONDITION,
        false,
        REARMED_REASON,
        message.clone(),
        fresh.meta().generation,
        ctx.clock.now(),
    );
    super::shared::write_status(ctx, &api, &mut fresh, status).await?;
    ctx.metrics
        .canary_tripped
        .get_or_create(&labels(&fresh))
        .set(0);
    ctx.publish_event(
        &fresh.object_ref(&()),
        EventType::Normal,
        REARMED_REASON,
        "CanaryCheck",
        message,
    )
    .await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(v: serde_json::Value) -> StripeKeyPolicySpec {
        serde_json::from_value(v).unwrap()
    }

    fn canary_spec(perms: serde_json::Value) -> serde_json::Value {
        json!({"accountRef": {"name": "acct"}, "permissions": perms,
               "delivery": {"secret": {"name": "payments-live-key"}},
               "canary": {"guards": {"matchLabels": {"tier": "payments"}}}})
    }

    #[test]
    fn a_canary_holds_exactly_one_harmless_read_permission() {
        assert_eq!(
            validate_spec(&spec(canary_spec(json!(["balance_read"])))),
            Ok(())
        );
        assert_eq!(
            validate_spec(&spec(canary_spec(json!(["country_spec_read"])))),
            Ok(())
        );
        for bad in [
            json!(["refund_write"]),
            json!(["balance_write"]),
            json!(["charge_read"]),
            json!(["balance_read", "country_spec_read"]),
        ] {
            let err = validate_spec(&spec(canary_spec(bad.clone()))).unwrap_err();
            assert!(
                err.contains("exactly one harmless read permission"),
                "{bad}: {err}"
            );
        }
        let mut connect = canary_spec(json!(["balance_read"]));
        connect["connectPermissions"] = json!(["balance_read"]);
        assert!(validate_spec(&spec(connect)).is_err());
        // Not a canary: nothing to judge here.
        let mut plain = canary_spec(json!(["refund_write"]));
        plain.as_object_mut().unwrap().remove("canary");
        assert_eq!(validate_spec(&spec(plain)), Ok(()));
    }

    #[test]
    fn the_controller_refuses_a_harmful_canary_and_never_watches_a_canary_for_expiry() {
        use crate::rotation::engine::fixtures;
        let open = fixtures::account(json!({}), "test");
        let resource =
            |perms| fixtures::resource::<KeyPolicy>("decoy", canary_spec(perms), None, json!(null));
        let refusal =
            fixtures::validate::<KeyPolicy>(&resource(json!(["refund_write"])), Some(&open), &[])
                .unwrap_err();
        assert_eq!(refusal.reason, "InvalidSpec");
        assert!(refusal.message.contains("harmless"), "{}", refusal.message);
        let ok =
            fixtures::validate::<KeyPolicy>(&resource(json!(["balance_read"])), Some(&open), &[])
                .unwrap();
        assert!(
            ok.usage.is_none(),
            "a canary is never used: no usage-aware expiry"
        );
    }

    fn policy(status: serde_json::Value) -> StripeKeyPolicy {
        serde_json::from_value(json!({
            "apiVersion": "stripekeys.io/v1alpha1", "kind": "StripeKeyPolicy",
            "metadata": {"name": "decoy", "namespace": "shop", "uid": "u"},
            "spec": canary_spec(json!(["balance_read"])), "status": status,
        }))
        .unwrap()
    }

    fn listed(id: &str, used: Option<&str>) -> Listed {
        Listed {
            id: id.into(),
            active: true,
            owner: None,
            last_used: used.map(|u| u.parse().unwrap()),
        }
    }

    #[test]
    fn only_an_unhandled_use_of_a_live_canary_key_is_a_trip() {
        let p = policy(json!({"currentKey": {"id": "ak_new", "fingerprint": "f"},
                               "retiringKeys": [{"id": "ak_old", "fingerprint": "g"}]}));
        assert_eq!(new_use(&p, &[listed("ak_new", None)]), None, "never used");
        assert_eq!(
            new_use(&p, &[listed("ak_old", Some("2026-06-01T00:00:00Z"))]),
            None,
            "a key being retired already tripped"
        );
        assert_eq!(
            new_use(&p, &[listed("ak_other", Some("2026-06-01T00:00:00Z"))]),
            None,
            "someone else's key"
        );
        let used = new_use(&p, &[listed("ak_new", Some("2026-06-01T00:00:05.700Z"))]).unwrap();
        assert_eq!(used.key_id, "ak_new");
        assert_eq!(used.last_used, "2026-06-01T00:00:05Z".parse().unwrap());
        let handled = policy(json!({"currentKey": {"id": "ak_new", "fingerprint": "f"},
                                     "canary": {"handledLastUsed": "2026-06-01T00:00:05Z"}}));
        assert_eq!(
            new_use(
                &handled,
                &[listed("ak_new", Some("2026-06-01T00:00:05.700Z"))]
            ),
            None,
            "handled once"
        );
        assert!(new_use(&handled, &[listed("ak_new", Some("2026-06-01T00:00:06Z"))]).is_some());
    }

    #[test]
    fn a_canary_is_rearmed_once_its_incident_rotation_replaced_the_used_key() {
        let trip = json!({"keyId": "ak_1", "lastUsed": "2026-06-01T00:00:05Z",
                          "detectedAt": "2026-06-01T00:01:00Z", "request": "canary-decoy-1"});
        let mut pending = trip.clone();
        pending["actionsPending"] = json!(true);
        let status = |key: &str, handled: Option<&str>, trip: &serde_json::Value| {
            json!({"currentKey": {"id": key, "fingerprint": "f"},
                   "lastHandledRotateRequest": handled, "canary": {"lastTrip": trip}})
        };
        assert!(!rearmed(&policy(status("ak_1", None, &trip))));
        assert!(!rearmed(&policy(status(
            "ak_2",
            Some("canary-decoy-1"),
            &pending
        ))));
        assert!(!rearmed(&policy(status(
            "ak_1",
            Some("canary-decoy-1"),
            &trip
        ))));
        assert!(rearmed(&policy(status(
            "ak_2",
            Some("canary-decoy-1"),
            &trip
        ))));
        assert_eq!(
            trip_request("decoy", "2026-06-01T00:00:05Z".parse().unwrap()),
            "canary-decoy-1780272005"
        );
    }
}
