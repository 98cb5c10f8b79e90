//! The StripeKeyPolicy controller: an adapter over the [rotation engine](crate::rotation::engine)
//! for restricted keys.
//!
//! What is particular to keys: validation against the account, namespace and guardrails; the
//! create parameters (permissions, Connect permissions, the account's public key); the proof
//! that a fresh key has exactly the declared scopes; expiry as retirement; and the Secret
//! entries `STRIPE_API_KEY` (and `STRIPE_API_KEY_PREVIOUS` during an overlap). The engine does
//! the rest.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::runtime::controller::Action;
use tracing::instrument;

use super::Context;
use super::accounts::AccountHandle;
use super::error::ReconcileError;
use super::shared;
pub use super::shared::Refusal;
use super::shared::ts_from_chrono;
use crate::api::permissions;
use crate::api::{
    DEFAULT_KEY_OVERLAP, DEFAULT_QUIET_PERIOD, DEFAULT_UNUSED_AFTER, MAX_OVERLAP, RotationState,
    StripeAccount, StripeKeyPolicy, StripeKeyPolicyStatus, UsageAwareExpiry,
};
use crate::rotation::engine::{self, Credential, Minted, Names, Owned, Run, UsageExpiry, Verdict};
use crate::rotation::schedule::{Schedule, parse_duration};
use crate::rules;
use crate::secret::SecretString;
use crate::stripe::{ApiKeyType, CreateApiKeyParams, ListApiKeysParams};

/// The finalizer that guards the policy's keys at Stripe and its store entry.
pub const FINALIZER: &str = "stripekeys.io/revoke-keys";
/// The prefix of every key name the operator mints.
pub const KEY_NAME_PREFIX: &str = "stripe-key-operator";
/// The store path kind segment of key policies.
pub const STORE_KIND: &str = "stripekeypolicy";
const KIND: &str = "StripeKeyPolicy";
const CONTROLLER: &str = "stripekeypolicy";

/// The name given to every key of a policy: fixed prefix, namespace and name.
pub fn key_name(namespace: &str, name: &str) -> String {
    format!("{KEY_NAME_PREFIX}/{namespace}/{name}")
}

/// A policy whose spec passed validation, with everything derived from it.
#[derive(Debug, Clone)]
pub struct Validated {
    pub permissions: Vec<String>,
    pub connect_permissions: Vec<String>,
    pub schedule: Option<Schedule>,
    pub overlap: Duration,
    pub revoke_on_delete: bool,
    /// Usage-aware expiry (`None`: turned off).
    pub usage: Option<UsageExpiry>,
}

/// Validates a policy against its account, its namespace and the guardrails. Pure: no client
/// calls, so refusing costs no Stripe call.
pub fn validate(
    policy: &StripeKeyPolicy,
    account: Option<&StripeAccount>,
    namespace_labels: &BTreeMap<String, String>,
    guardrails: &[crate::api::StripeGuardrail],
    now: Timestamp,
) -> Result<Validated, Refusal> {
    let spec = &policy.spec;
    let invalid = |message: String| Refusal {
        reason: "InvalidSpec",
        message,
    };
    let account = shared::validate_placement(
        account,
        &spec.account_ref.name,
        &policy.namespace().unwrap_or_default(),
        namespace_labels,
        spec.delivery
            .vault
            .as_ref()
            .is_some_and(|v| v.sub_path.is_some()),
    )?;
    if !spec.ip_allowlist.is_empty() {
        // Never accept a restriction that would silently not be applied.
        return Err(invalid(
            "ipAllowlist is not supported yet: Stripe's API-keys API documents no ip_allowlist \
             parameter for creating a key; remove it and restrict the key's IPs in the Dashboard"
                .into(),
        ));
    }
    if spec.permissions.is_empty() {
        return Err(invalid(
            "permissions must name at least one permission".into(),
        ));
    }
    if !spec.allow_unlisted_permissions {
        let unknown =
            permissions::unknown(spec.permissions.iter().chain(&spec.connect_permissions));
        if !unknown.is_empty() {
            return Err(invalid(format!(
                "unknown permission(s) {} (catalogue {}); fix the names or set allowUnlistedPermissions: true",
                unknown.join(", "),
                permissions::CATALOGUE_VERSION
            )));
        }
    }
    let rotation = spec.rotation.as_ref();
    let schedule = match rotation.and_then(|r| r.schedule()) {
        Some(s) => Some(Schedule::parse(&s).map_err(|e| invalid(e.to_string()))?),
        None => None,
    };
    let overlap_text = rotation
        .and_then(|r| r.overlap.as_deref())
        .unwrap_or(DEFAULT_KEY_OVERLAP);
    let overlap = parse_duration("overlap", overlap_text).map_err(|e| invalid(e.to_string()))?;
    if overlap < Duration::from_secs(300) || overlap > Duration::from_secs(7 * 24 * 3600) {
        return Err(invalid("overlap must be between 5m and 168h".into()));
    }
    let rotation_period = match &schedule {
        Some(s) => Some(s.longest_period(now).map_err(|e| invalid(e.to_string()))?),
        None => None,
    };
    let all_permissions: Vec<&str> = spec
        .permissions
        .iter()
        .chain(&spec.connect_permissions)
        .map(String::as_str)
        .collect();
    let violations = rules::evaluate(
        guardrails,
        &rules::Request {
            namespace_labels: namespace_labels.clone(),
            mode: Some(account.spec.mode),
            permissions: all_permissions,
            rotation_period,
            rotates: schedule.is_some(),
            overlap: Some(overlap),
            webhook_host: None,
        },
    );
    shared::refuse_violations(&violations)?;
    let usage = usage_expiry(
        rotation.and_then(|r| r.usage_aware_expiry.as_ref()),
        overlap,
        rules::max_overlap(guardrails, namespace_labels),
    )
    .map_err(invalid)?;
    Ok(Validated {
        permissions: permissions::normalized(&spec.permissions),
        connect_permissions: permissions::normalized(&spec.connect_permissions),
        schedule,
        overlap,
        revoke_on_delete: rotation.and_then(|r| r.revoke_on_delete).unwrap_or(true),
        usage,
    })
}

/// The usage-aware expiry settings of a policy, with their defaults: `maxHold` defaults to the
/// longest overlap the guardrails allow (Stripe's 168 h without one), must cover the overlap and
/// may not exceed a guardrail's `maxOverlap`. Pure.
pub fn usage_expiry(
    spec: Option<&UsageAwareExpiry>,
    overlap: Duration,
    guardrail_max: Option<(Duration, String)>,
) -> Result<Option<UsageExpiry>, String> {
    if spec.and_then(|u| u.enabled) == Some(false) {
        return Ok(None);
    }
    let field = |name: &'static str, value: Option<&String>, default: &str| {
        let text = value.map(String::as_str).unwrap_or(default);
        parse_duration(name, text).map_err(|e| format!("usageAwareExpiry.{name}: {e}"))
    };
    let quiet_period = field(
        "quietPeriod",
        spec.and_then(|u| u.quiet_period.as_ref()),
        DEFAULT_QUIET_PERIOD,
    )?;
    let unused_after = field(
        "unusedAfter",
        spec.and_then(|u| u.unused_after.as_ref()),
        DEFAULT_UNUSED_AFTER,
    )?;
    let five_minutes = Duration::from_secs(300);
    if quiet_period < five_minutes || quiet_period > MAX_OVERLAP {
        return Err("usageAwareExpiry.quietPeriod must be between 5m and 168h".into());
    }
    if unused_after < five_minutes || unused_after > Duration::from_secs(720 * 3600) {
        return Err("usageAwareExpiry.unusedAfter must be between 5m and 720h".into());
    }
    let ceiling = guardrail_max
        .as_ref()
        .map(|(d, _)| *d)
        .unwrap_or(MAX_OVERLAP)
        .min(MAX_OVERLAP);
    let max_hold = match spec.and_then(|u| u.max_hold.as_ref()) {
        Some(text) => {
            let d = parse_duration("maxHold", text)
                .map_err(|e| format!("usageAwareExpiry.maxHold: {e}"))?;
            if d > MAX_OVERLAP {
                return Err(
                    "usageAwareExpiry.maxHold must be at most 168h (Stripe's longest overlap)"
                        .into(),
                );
            }
            if let Some((limit, name)) = &guardrail_max
                && d > *limit
            {
                return Err(format!(
                    "usageAwareExpiry.maxHold {text} exceeds the maximum overlap {} of StripeGuardrail {name:?}",
                    humantime::format_duration(*limit)
                ));
            }
            d
        }
        None => ceiling,
    };
    if max_hold < overlap {
        return Err(format!(
            "usageAwareExpiry.maxHold ({}) must be at least the overlap ({})",
            humantime::format_duration(max_hold),
            humantime::format_duration(overlap)
        ));
    }
    Ok(Some(UsageExpiry {
        quiet_period,
        max_hold,
        unused_after,
    }))
}

/// The restricted-key adapter of the rotation engine.
pub struct KeyPolicy;

/// Reconciles one policy (the entry point the `Controller` calls).
#[instrument(skip(policy, ctx), fields(namespace = %policy.namespace().unwrap_or_default(), name = %policy.name_any()))]
pub async fn reconcile(
    policy: Arc<StripeKeyPolicy>,
    ctx: Arc<Context>,
) -> Result<Action, ReconcileError> {
    engine::reconcile::<KeyPolicy>(policy, ctx).await
}

/// What the controller does after a failed reconcile: record it, back off, try again.
pub fn error_policy(
    policy: Arc<StripeKeyPolicy>,
    error: &ReconcileError,
    ctx: Arc<Context>,
) -> Action {
    shared::requeue_after_error(&ctx, CONTROLLER, &policy.metadata, error)
}

/// The create parameters of the rotation's key (a replay sends exactly these).
fn create_params(
    run: &Run<'_, KeyPolicy>,
    handle: &AccountHandle,
    rotation: &RotationState,
) -> Result<CreateApiKeyParams, ReconcileError> {
    let public_key = match &handle.keys {
        Some(keys) => Some(
            keys.public_key_param(None)
                .map_err(crate::stripe::StripeError::from)?,
        ),
        None => None,
    };
    Ok(CreateApiKeyParams {
        key_type: ApiKeyType::SecretKey,
        name: key_name(&run.ns, &run.name),
        note: Some(format!(
            "policy-uid={} rotation={}",
            run.uid, rotation.number
        )),
        permissions: rotation.permissions.clone(),
        connect_permissions: (!rotation.connect_permissions.is_empty())
            .then(|| rotation.connect_permissions.clone()),
        expires_at: None,
        public_key,
    })
}

#[async_trait::async_trait]
impl Credential for KeyPolicy {
    type Resource = StripeKeyPolicy;
    type Status = StripeKeyPolicyStatus;
    type Spec = Validated;

    const NAMES: Names = Names {
        kind: KIND,
        controller: CONTROLLER,
        finalizer: FINALIZER,
        store_kind: STORE_KIND,
        noun: "key",
        minted_reason: "KeyMinted",
        retired_reason: "KeyExpired",
        orphan_reason: "OrphanKeyExpired",
        ready_reason: "KeyReady",
        missing_reason: "KeyMissing",
    };

    fn account_name(obj: &StripeKeyPolicy) -> &str {
        &obj.spec.account_ref.name
    }

    fn validate(
        obj: &StripeKeyPolicy,
        account: Option<&StripeAccount>,
        namespace_labels: &BTreeMap<String, String>,
        guardrails: &[crate::api::StripeGuardrail],
        now: Timestamp,
    ) -> Result<Validated, Refusal> {
        validate(obj, account, namespace_labels, guardrails, now)
    }

    fn schedule(spec: &Validated) -> Option<&Schedule> {
        spec.schedule.as_ref()
    }

    fn overlap(spec: &Validated) -> Duration {
        spec.overlap
    }

    fn revoke_on_delete(obj: &StripeKeyPolicy) -> bool {
        obj.spec
            .rotation
            .as_ref()
            .and_then(|r| r.revoke_on_delete)
            .unwrap_or(true)
    }

    fn needs_new_credential(
        _obj: &StripeKeyPolicy,
        status: &StripeKeyPolicyStatus,
        spec: &Validated,
    ) -> bool {
        scopes_changed(status, spec)
    }

    fn prepare(
        _obj: &StripeKeyPolicy,
        spec: &Validated,
        _status: &mut StripeKeyPolicyStatus,
        rotation: &mut RotationState,
    ) {
        rotation.permissions = spec.permissions.clone();
        rotation.connect_permissions = spec.connect_permissions.clone();
    }

    async fn create(
        run: &Run<'_, Self>,
        handle: &AccountHandle,
        rotation: &RotationState,
    ) -> Result<Minted, ReconcileError> {
        let params = create_params(run, handle, rotation)?;
        let response = handle
            .client
            .create_api_key(&params, &engine::create_key(&run.uid, rotation))
            .await?;
        let key = response.value;
        let secret = match &handle.keys {
            Some(keys) => key
                .reveal_secret(keys)
                .map_err(crate::stripe::StripeError::from)?,
            None => key.plaintext_secret().cloned(),
        };
        let secret = secret.ok_or_else(|| ReconcileError::MissingSecret {
            key_id: key.id.clone(),
            message: "the create response carried neither a token nor an encrypted secret".into(),
        })?;
        Ok(Minted {
            id: key.id.clone(),
            secret,
            created: ts_from_chrono(key.created),
            key: Some(Box::new(key)),
        })
    }

    /// The create's answer says what the key may do: its `permissions` (and Connect
    /// permissions) must equal the declared sets exactly. Live probes (one allowed and one
    /// refused call with the new key) run in addition for the first key of each account since
    /// the operator started (the permission catalogue changes only with the binary), so the
    /// bulk path costs one Stripe call per key. Only a clear verdict condemns a key; bad
    /// weather is an error that retries.
    async fn verify(
        run: &Run<'_, Self>,
        handle: &AccountHandle,
        rotation: &RotationState,
        minted: &Minted,
    ) -> Result<Verdict, ReconcileError> {
        use crate::stripe::verify::{ScopeCheckError, check_scopes, verify_response_scopes};
        let Some(key) = minted.key.as_deref() else {
            return Ok(Verdict::Wrong("no key object to verify".into()));
        };
        if let Err(message) =
            verify_response_scopes(key, &rotation.permissions, &rotation.connect_permissions)
        {
            return Ok(Verdict::Wrong(message));
        }
        let account = run.context.clone().unwrap_or_default();
        if run.ctx.scope_probes_done(&account) {
            return Ok(Verdict::Good);
        }
        match check_scopes(&handle.client, &minted.secret, &rotation.permissions).await {
            Ok(()) => {
                run.ctx.record_scope_probe(&account);
                Ok(Verdict::Good)
            }
            Err(ScopeCheckError::WrongScopes(message)) => Ok(Verdict::Wrong(message)),
            Err(e) => Err(ReconcileError::ScopeProbe(e.to_string())),
        }
    }

    async fn retire(
        _run: &Run<'_, Self>,
        handle: &AccountHandle,
        id: &str,
        idempotency_key: &str,
    ) -> Result<(), crate::stripe::StripeError> {
        // Confirmed: a 404 counts only when a listing agrees the key is gone; a 401 (the app's
        // own key) is an error, never "already expired".
        handle
            .client
            .expire_api_key_confirmed(id, idempotency_key)
            .await
            .map(|_| ())
    }

    async fn list_owned(
        run: &Run<'_, Self>,
        handle: &AccountHandle,
    ) -> Result<Vec<Owned>, ReconcileError> {
        let name = key_name(&run.ns, &run.name);
        let note_marker = format!("policy-uid={} ", run.uid);
        let keys = handle
            .client
            .list_all_api_keys(&ListApiKeysParams {
                include_expired: Some(false),
                limit: Some(100),
            })
            .await?;
        Ok(keys
            .items
            .into_iter()
            .filter(|k| {
                k.name.as_deref() == Some(name.as_str())
                    && k.note
                        .as_deref()
                        .is_some_and(|n| n.starts_with(&note_marker))
            })
            .map(|k| Owned {
                active: k.status == crate::stripe::ApiKeyStatus::Active,
                id: k.id,
            })
            .collect())
    }

    fn publish(
        obj: &StripeKeyPolicy,
        current: &SecretString,
        previous: Option<&SecretString>,
    ) -> Vec<(String, SecretString)> {
        let delivery = &obj.spec.delivery.secret;
        let mut entries = vec![(delivery.key_name().to_string(), current.clone())];
        if let Some(p) = previous {
            entries.push((delivery.previous_key_name().to_string(), p.clone()));
        }
        entries
    }

    fn secret_name(obj: &StripeKeyPolicy) -> String {
        obj.spec.delivery.secret.name.clone()
    }

    fn rollout_targets(obj: &StripeKeyPolicy) -> &[crate::api::RolloutTarget] {
        &obj.spec.delivery.rollout_targets
    }

    fn usage_expiry(spec: &Validated) -> Option<UsageExpiry> {
        spec.usage
    }

    /// One retrieve: Stripe's `last_used` of the key. A key Stripe no longer knows reports
    /// no use (retiring it copes with the 404).
    async fn last_used(
        _run: &Run<'_, Self>,
        handle: &AccountHandle,
        id: &str,
    ) -> Result<Option<Timestamp>, ReconcileError> {
        match handle.client.retrieve_api_key(id).await {
            // Full precision: a use a moment after the rollout is after it.
            Ok(response) => Ok(response.value.last_used.and_then(|t| {
                Timestamp::new(t.timestamp(), t.timestamp_subsec_nanos() as i32).ok()
            })),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    fn on_stored(status: &mut StripeKeyPolicyStatus, rotation: &RotationState) {
        status.current_permissions = rotation.permissions.clone();
        status.current_connect_permissions = rotation.connect_permissions.clone();
    }
}

/// Whether the declared scopes (permissions or Connect permissions) differ from the current
/// key's. Pure.
pub fn scopes_changed(status: &StripeKeyPolicyStatus, v: &Validated) -> bool {
    status.current_permissions != v.permissions
        || status.current_connect_permissions != v.connect_permissions
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{RotationPhase, RotationTrigger};
    use crate::rotation::engine::Next;

    /// The engine's decision for this resource, as the controller computes it.
    fn decide(p: &StripeKeyPolicy, v: &Validated, now: Timestamp) -> Next {
        let status = p.status.clone().unwrap_or_default();
        engine::decide(
            p.annotations(),
            &status,
            status.current_key.is_some() && scopes_changed(&status, v),
            engine::next_rotation_at::<KeyPolicy>(p, v).is_some_and(|at| at <= now),
        )
    }
    use crate::api::StripeKeyPolicySpec;
    use serde_json::json;

    fn policy(
        spec: serde_json::Value,
        status: Option<serde_json::Value>,
        annotations: serde_json::Value,
    ) -> StripeKeyPolicy {
        let mut p = StripeKeyPolicy::new(
            "checkout",
            serde_json::from_value::<StripeKeyPolicySpec>(spec).unwrap(),
        );
        p.metadata.namespace = Some("shop".into());
        p.metadata.uid = Some("uid-1".into());
        p.metadata.annotations = serde_json::from_value(annotations).unwrap();
        p.status = status.map(|s| serde_json::from_value(s).unwrap());
        p
    }

    fn spec() -> serde_json::Value {
        json!({"accountRef": {"name": "acct"}, "permissions": ["refund_write", "charge_read"],
               "delivery": {"secret": {"name": "s"}}, "rotation": {"every": "720h"}})
    }

    fn account(selector: serde_json::Value, mode: &str) -> StripeAccount {
        serde_json::from_value(json!({
            "apiVersion": "stripekeys.io/v1alpha1", "kind": "StripeAccount", "metadata": {"name": "acct"},
            "spec": {"mode": mode, "context": "acct_1", "credentials": {"secretRef": {"name": "s", "key": "k"}},
                     "namespaceSelector": selector}
        }))
        .unwrap()
    }

    fn now() -> Timestamp {
        "2026-06-01T00:00:00Z".parse().unwrap()
    }

    #[test]
    fn validate_refuses_missing_account_namespace_unknown_permissions_and_guardrails() {
        let p = policy(spec(), None, json!(null));
        let labels = BTreeMap::new();
        assert_eq!(
            validate(&p, None, &labels, &[], now()).unwrap_err().reason,
            "AccountNotFound"
        );
        let narrow = account(json!({"matchLabels": {"team": "pay"}}), "test");
        assert_eq!(
            validate(&p, Some(&narrow), &labels, &[], now())
                .unwrap_err()
                .reason,
            "NamespaceNotAllowed"
        );
        let open = account(json!({}), "test");
        let mut bad = spec();
        bad["permissions"] = json!(["charge_read", "warp_drive_write"]);
        let refusal = validate(
            &policy(bad, None, json!(null)),
            Some(&open),
            &labels,
            &[],
            now(),
        )
        .unwrap_err();
        assert_eq!(refusal.reason, "InvalidSpec");
        assert!(refusal.message.contains("warp_drive_write"));
        let guard: crate::api::StripeGuardrail = serde_json::from_value(json!({
            "apiVersion": "stripekeys.io/v1alpha1", "kind": "StripeGuardrail", "metadata": {"name": "no-refunds"},
            "spec": {"namespaceSelector": {}, "deniedPermissions": ["refund_*"]}
        }))
        .unwrap();
        let refusal = validate(&p, Some(&open), &labels, &[guard], now()).unwrap_err();
        assert_eq!(refusal.reason, "GuardrailViolation");
        assert!(refusal.message.contains("no-refunds"));
        let mut with_ips = spec();
        with_ips["ipAllowlist"] = json!(["10.0.0.0/8"]);
        let refusal = validate(
            &policy(with_ips, None, json!(null)),
            Some(&open),
            &labels,
            &[],
            now(),
        )
        .unwrap_err();
        assert!(
            refusal.message.contains("ipAllowlist is not supported yet"),
            "{}",
            refusal.message
        );
        let ok = validate(&p, Some(&open), &labels, &[], now()).unwrap();
        assert_eq!(ok.permissions, ["charge_read", "refund_write"], "sorted");
        assert_eq!(ok.overlap, Duration::from_secs(3600));
    }

    #[test]
    fn decide_follows_status_annotations_scopes_and_schedule() {
        let open = account(json!({}), "test");
        let labels = BTreeMap::new();
        let fresh = policy(spec(), None, json!(null));
        let v = validate(&fresh, Some(&open), &labels, &[], now()).unwrap();
        assert_eq!(
            decide(&fresh, &v, now()),
            Next::Start(RotationTrigger::Initial, None)
        );

        let steady = json!({"currentKey": {"id": "ak_1", "fingerprint": "f"}, "currentPermissions": ["charge_read", "refund_write"],
                            "lastRotationAt": "2026-05-31T00:00:00Z", "rotationNumber": 1});
        let p = policy(spec(), Some(steady.clone()), json!(null));
        assert_eq!(decide(&p, &v, now()), Next::Idle);
        let later: Timestamp = "2026-07-01T00:00:00Z".parse().unwrap();
        assert_eq!(
            decide(&p, &v, later),
            Next::Start(RotationTrigger::Schedule, None)
        );

        let p = policy(
            spec(),
            Some(steady.clone()),
            json!({"stripekeys.io/rotate": "1"}),
        );
        assert_eq!(
            decide(&p, &v, now()),
            Next::Start(RotationTrigger::Annotation, Some("1".into()))
        );
        let p = policy(
            spec(),
            Some(steady.clone()),
            json!({"stripekeys.io/rotate": "2", "stripekeys.io/rotate-reason": "incident"}),
        );
        assert_eq!(decide(&p, &v, now()), Next::Escalate("2".into()));
        let mut handled = steady.clone();
        handled["lastHandledRotateRequest"] = json!("2");
        let p = policy(
            spec(),
            Some(handled),
            json!({"stripekeys.io/rotate": "2", "stripekeys.io/rotate-reason": "incident"}),
        );
        assert_eq!(
            decide(&p, &v, now()),
            Next::Idle,
            "the same annotation never rotates twice"
        );

        let mut narrower = spec();
        narrower["permissions"] = json!(["charge_read"]);
        let p = policy(narrower, Some(steady.clone()), json!(null));
        let v2 = validate(&p, Some(&open), &labels, &[], now()).unwrap();
        assert_eq!(
            decide(&p, &v2, now()),
            Next::Start(RotationTrigger::SpecChange, None)
        );

        let mut rotating = steady;
        rotating["rotation"] = json!({"phase": "Storing", "number": 2, "trigger": "Schedule", "startedAt": "2026-06-01T00:00:00Z", "idempotencyKey": "k"});
        let p = policy(spec(), Some(rotating), json!(null));
        assert_eq!(
            decide(&p, &v, now()),
            Next::Continue(RotationPhase::Storing)
        );
    }

    #[test]
    fn usage_expiry_defaults_follow_the_guardrails_and_bad_settings_are_refused() {
        let hour = Duration::from_secs(3600);
        let guard = Some((3 * hour, "short".to_string()));
        let d = usage_expiry(None, hour, None).unwrap().unwrap();
        assert_eq!(d.quiet_period, Duration::from_secs(1800));
        assert_eq!(d.unused_after, hour);
        assert_eq!(d.max_hold, MAX_OVERLAP, "Stripe's longest overlap");
        let d = usage_expiry(None, hour, guard.clone()).unwrap().unwrap();
        assert_eq!(d.max_hold, 3 * hour, "the guardrail's maxOverlap");
        let spec = |v: serde_json::Value| serde_json::from_value::<UsageAwareExpiry>(v).unwrap();
        let err =
            usage_expiry(Some(&spec(json!({"maxHold": "4h"}))), hour, guard.clone()).unwrap_err();
        assert!(err.contains("maxHold") && err.contains("short"), "{err}");
        let err = usage_expiry(Some(&spec(json!({"maxHold": "30m"}))), hour, None).unwrap_err();
        assert!(err.contains("at least the overlap"), "{err}");
        let err = usage_expiry(Some(&spec(json!({"quietPeriod": "1m"}))), hour, None).unwrap_err();
        assert!(err.contains("quietPeriod"), "{err}");
        let err = usage_expiry(Some(&spec(json!({"unusedAfter": "2d"}))), hour, None).unwrap_err();
        assert!(err.contains("unusedAfter"), "{err}");
        assert_eq!(
            usage_expiry(Some(&spec(json!({"enabled": false}))), hour, None).unwrap(),
            None
        );
    }

    #[test]
    fn key_names_carry_prefix_namespace_and_name() {
        assert_eq!(
            key_name("shop", "checkout"),
            "stripe-key-operator/shop/checkout"
        );
    }
}
