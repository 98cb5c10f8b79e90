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
use kube::runtime::controller::Action;

use super::Context;
use super::accounts::AccountHandle;
use super::error::ReconcileError;
pub use super::shared::Refusal;
use super::shared::ts_from_chrono;
use crate::api::permissions;
use crate::api::{
    DEFAULT_KEY_OVERLAP, DEFAULT_QUIET_PERIOD, DEFAULT_UNUSED_AFTER, MAX_OVERLAP, RotationState,
    StripeAccount, StripeKeyPolicy, StripeKeyPolicyStatus, UsageAwareExpiry,
};
use crate::rotation::engine::{
    self, Credential, Declared, Inputs, Minted, Names, OverlapBounds, RotationSpec, Run,
    UsageExpiry, Verdict, invalid,
};
use crate::rotation::listing::Listed;
use crate::rotation::schedule::parse_duration;
use crate::rules;
use crate::secret::SecretString;
use crate::stripe::{ApiKeyType, CreateApiKeyParams, ListApiKeysParams, StripeError};

/// The finalizer that guards the policy's keys at Stripe and its store entry.
pub const FINALIZER: &str = "stripekeys.io/revoke-keys";
/// The prefix of every key name the operator mints.
pub const KEY_NAME_PREFIX: &str = "stripe-key-operator";
/// The store path kind segment of key policies.
pub const STORE_KIND: &str = "stripekeypolicy";
/// What the engine calls policies in Events, metrics, store paths and messages.
const NAMES: Names = Names::new(
    ["StripeKeyPolicy", STORE_KIND, FINALIZER, "key"],
    ["Key", "Minted", "Expired"],
);

/// The name given to every key of a policy: fixed prefix, namespace and name.
pub fn key_name(namespace: &str, name: &str) -> String {
    format!("{KEY_NAME_PREFIX}/{namespace}/{name}")
}

/// A policy whose spec passed validation, with everything derived from it.
#[derive(Debug, Clone)]
pub struct Validated {
    pub permissions: Vec<String>,
    pub connect_permissions: Vec<String>,
    pub rotation: RotationSpec,
    /// Usage-aware expiry (`None`: turned off).
    pub usage: Option<UsageExpiry>,
}

/// A key's overlap: at least 5m (an expired key keeps working for minutes at Stripe), at most
/// Stripe's 7 days.
const OVERLAP: OverlapBounds = OverlapBounds {
    default: DEFAULT_KEY_OVERLAP,
    min: Duration::from_secs(300),
    max: Duration::from_secs(7 * 24 * 3600),
    message: "overlap must be between 5m and 168h",
};

/// Validates a policy against its account, its namespace and the guardrails. Pure: no client
/// calls, so refusing costs no Stripe call. Admission judges with the same function.
pub fn validate(
    policy: &StripeKeyPolicy,
    account: Option<&StripeAccount>,
    namespace_labels: &BTreeMap<String, String>,
    guardrails: &[crate::api::StripeGuardrail],
    now: Timestamp,
) -> Result<Validated, Refusal> {
    let input = Inputs {
        account,
        namespace_labels,
        guardrails,
        now,
    };
    let (account, rotation) = engine::validate_common::<KeyPolicy>(policy, &input, &OVERLAP)?;
    let spec = &policy.spec;
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
    super::canary::validate_spec(spec).map_err(invalid)?;
    validate_broker(&spec.delivery).map_err(invalid)?;
    let declared = || spec.permissions.iter().chain(&spec.connect_permissions);
    if !spec.allow_unlisted_permissions {
        let unknown = permissions::unknown(declared());
        if !unknown.is_empty() {
            return Err(invalid(format!(
                "unknown permission(s) {} (catalogue {}); fix the names or set allowUnlistedPermissions: true",
                unknown.join(", "),
                permissions::CATALOGUE_VERSION
            )));
        }
    }
    rotation.check_guardrails(
        &input,
        account,
        declared().map(String::as_str).collect(),
        None,
    )?;
    let usage = usage_expiry(
        spec.rotation
            .as_ref()
            .and_then(|r| r.usage_aware_expiry.as_ref()),
        rotation.overlap,
        rules::max_overlap(guardrails, namespace_labels),
    )
    .map_err(invalid)?
    // A canary is never meant to be used: its use is watched by the canary check instead.
    .filter(|_| spec.canary.is_none());
    Ok(Validated {
        permissions: permissions::normalized(&spec.permissions),
        connect_permissions: permissions::normalized(&spec.connect_permissions),
        rotation,
        usage,
    })
}

/// Brokered delivery: no rollout targets (the sidecar switches keys itself) and no Secret key
/// name of the application's entries that is also one of the broker's. Pure.
pub fn validate_broker(delivery: &crate::api::KeyDelivery) -> Result<(), String> {
    let Some(broker) = &delivery.broker else {
        return Ok(());
    };
    if let Some(anomaly) = &broker.anomaly {
        anomaly
            .detector_config()
            .map_err(|e| format!("delivery.broker.anomaly: {e}"))?;
    }
    if !delivery.rollout_targets.is_empty() {
        return Err(
            "a brokered key needs no rollout: remove delivery.rolloutTargets (the egress-proxy \
             sidecar re-reads its Secret volume and switches keys itself)"
                .into(),
        );
    }
    let reserved = [
        crate::egress::proxy::DEFAULT_KEY_ENTRY,
        crate::egress::proxy::DEFAULT_PERMISSIONS_ENTRY,
        crate::egress::proxy::DEFAULT_ANOMALY_ENTRY,
        crate::egress::proxy::API_BASE_ENTRY,
    ];
    let key = delivery.secret.key_name();
    if reserved.contains(&key) {
        return Err(format!(
            "delivery.secret.key {key} is an entry of brokered delivery; choose another name for \
             the placeholder"
        ));
    }
    Ok(())
}

/// The Secret entries of brokered delivery: the placeholder under the application's key name
/// and the broker's address for the application; the real key and its permissions under the
/// broker's entries (mounted only into the sidecar), and with `broker.anomaly` the anomaly
/// policy and the policy's `NAMESPACE/NAME` (the sidecar's Events and incident rotation requests
/// go there). The previous key is not published: the sidecar always uses the current key, and
/// requests in flight finish on the key they started with, which Stripe keeps valid for the
/// overlap. Pure.
pub fn brokered_entries(
    obj: &StripeKeyPolicy,
    broker: &crate::api::BrokerDelivery,
    current: &SecretString,
) -> Vec<(String, SecretString)> {
    use crate::egress::proxy::{
        API_BASE_ENTRY, DEFAULT_ANOMALY_ENTRY, DEFAULT_KEY_ENTRY, DEFAULT_PERMISSIONS_ENTRY,
        placeholder_for,
    };
    let uid = obj.metadata.uid.as_deref().unwrap_or_default();
    let anomaly = broker.anomaly.as_ref().map(|anomaly| {
        let file = crate::egress::anomaly::AnomalyPolicyFile {
            policy: Some(format!(
                "{}/{}",
                obj.metadata.namespace.as_deref().unwrap_or_default(),
                obj.metadata.name.as_deref().unwrap_or_default()
            )),
            anomaly: anomaly.clone(),
        };
        (
            DEFAULT_ANOMALY_ENTRY.to_string(),
            SecretString::new(file.to_yaml()),
        )
    });
    let mut entries = vec![
        (
            obj.spec.delivery.secret.key_name().to_string(),
            SecretString::new(placeholder_for(uid)),
        ),
        (
            API_BASE_ENTRY.to_string(),
            SecretString::new(broker.api_base()),
        ),
        (DEFAULT_KEY_ENTRY.to_string(), current.clone()),
        (
            DEFAULT_PERMISSIONS_ENTRY.to_string(),
            SecretString::new(permissions::normalized(&obj.spec.permissions).join(",")),
        ),
    ];
    entries.extend(anomaly);
    entries
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

/// Reconciles one policy (the entry point tests call; the controller calls the engine's).
pub async fn reconcile(
    p: Arc<StripeKeyPolicy>,
    ctx: Arc<Context>,
) -> Result<Action, ReconcileError> {
    engine::reconcile::<KeyPolicy>(p, ctx).await
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

    const NAMES: Names = NAMES;

    fn declared(obj: &StripeKeyPolicy) -> Declared<'_> {
        let (spec, rotation) = (&obj.spec, obj.spec.rotation.as_ref());
        Declared {
            revoke_on_delete: rotation.and_then(|r| r.revoke_on_delete).unwrap_or(true),
            schedule: rotation.and_then(|r| r.schedule()),
            overlap: rotation.and_then(|r| r.overlap.as_deref()),
            account: &spec.account_ref.name,
            vault_sub_path: spec
                .delivery
                .vault
                .as_ref()
                .is_some_and(|v| v.sub_path.is_some()),
            secret: &spec.delivery.secret.name,
            targets: &spec.delivery.rollout_targets,
        }
    }

    fn validate(obj: &StripeKeyPolicy, i: &Inputs<'_>) -> Result<Validated, Refusal> {
        validate(obj, i.account, i.namespace_labels, i.guardrails, i.now)
    }

    fn rotation(spec: &Validated) -> &RotationSpec {
        &spec.rotation
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
        // A canary is used by nobody, the operator included: a probe would set its `last_used`.
        if run.obj.spec.canary.is_some() || run.ctx.scope_probes_done(&account) {
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
    ) -> Result<(), StripeError> {
        // Confirmed: a 404 counts only when a listing agrees the key is gone; a 401 (the app's
        // own key) is an error, never "already expired".
        handle
            .client
            .expire_api_key_confirmed(id, idempotency_key)
            .await
            .map(|_| ())
    }

    /// Every active key of the account; a key is a policy's when its name is the policy's
    /// [`key_name`] and its note starts `policy-uid=<uid> ` (the mark is both).
    async fn list_account(handle: &AccountHandle) -> Result<Vec<Listed>, StripeError> {
        let params = ListApiKeysParams {
            include_expired: Some(false),
            limit: Some(100),
        };
        let keys = handle.client.list_all_api_keys(&params).await?.items;
        Ok(keys.into_iter().map(listed).collect())
    }

    fn owner_mark(run: &Run<'_, Self>) -> String {
        owner_mark(&key_name(&run.ns, &run.name), &run.uid)
    }

    fn publish(
        obj: &StripeKeyPolicy,
        current: &SecretString,
        previous: Option<&SecretString>,
    ) -> Vec<(String, SecretString)> {
        if let Some(broker) = &obj.spec.delivery.broker {
            return brokered_entries(obj, broker, current);
        }
        let delivery = &obj.spec.delivery.secret;
        let mut entries = vec![(delivery.key_name().to_string(), current.clone())];
        if let Some(p) = previous {
            entries.push((delivery.previous_key_name().to_string(), p.clone()));
        }
        entries
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

/// The owner mark of a policy's keys: its key name and UID.
fn owner_mark(name: &str, uid: &str) -> String {
    format!("{name}\n{uid}")
}

/// A listed key, with its owner mark when its note is one the operator writes. Pure.
fn listed(key: crate::stripe::ApiKey) -> Listed {
    let uid = key.note.as_deref().and_then(|n| {
        let (uid, _) = n.strip_prefix("policy-uid=")?.split_once(' ')?;
        Some(uid.to_string())
    });
    Listed {
        owner: key.name.as_deref().zip(uid).map(|(n, u)| owner_mark(n, &u)),
        active: key.status == crate::stripe::ApiKeyStatus::Active,
        // Full precision: the canary check compares it with what it handled.
        last_used: key
            .last_used
            .and_then(|t| Timestamp::new(t.timestamp(), t.timestamp_subsec_nanos() as i32).ok()),
        id: key.id,
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
    use crate::rotation::engine::fixtures::{self, account, now};
    use serde_json::json;

    fn policy(spec: serde_json::Value, status: Option<serde_json::Value>) -> StripeKeyPolicy {
        fixtures::resource::<KeyPolicy>("checkout", spec, status, json!(null))
    }

    fn spec() -> serde_json::Value {
        json!({"accountRef": {"name": "acct"}, "permissions": ["refund_write", "charge_read"],
               "delivery": {"secret": {"name": "s"}}, "rotation": {"every": "720h"}})
    }

    #[test]
    fn validate_refuses_unknown_permissions_guardrails_and_ip_allowlists() {
        let p = policy(spec(), None);
        fixtures::assert_placement_refusals::<KeyPolicy>(&p);
        let open = account(json!({}), "test");
        let mut bad = spec();
        bad["permissions"] = json!(["charge_read", "warp_drive_write"]);
        let refusal =
            fixtures::validate::<KeyPolicy>(&policy(bad, None), Some(&open), &[]).unwrap_err();
        assert_eq!(refusal.reason, "InvalidSpec");
        assert!(refusal.message.contains("warp_drive_write"));
        let guard: crate::api::StripeGuardrail = serde_json::from_value(json!({
            "apiVersion": "stripekeys.io/v1alpha1", "kind": "StripeGuardrail", "metadata": {"name": "no-refunds"},
            "spec": {"namespaceSelector": {}, "deniedPermissions": ["refund_*"]}
        }))
        .unwrap();
        let refusal = fixtures::validate::<KeyPolicy>(&p, Some(&open), &[guard]).unwrap_err();
        assert_eq!(refusal.reason, "GuardrailViolation");
        assert!(refusal.message.contains("no-refunds"));
        let mut with_ips = spec();
        with_ips["ipAllowlist"] = json!(["10.0.0.0/8"]);
        let refusal =
            fixtures::validate::<KeyPolicy>(&policy(with_ips, None), Some(&open), &[]).unwrap_err();
        assert!(
            refusal.message.contains("ipAllowlist is not supported yet"),
            "{}",
            refusal.message
        );
        let ok = validate(&p, Some(&open), &BTreeMap::new(), &[], now()).unwrap();
        assert_eq!(ok.permissions, ["charge_read", "refund_write"], "sorted");
        assert_eq!(ok.rotation.overlap, Duration::from_secs(3600));
    }

    #[test]
    fn brokered_delivery_publishes_a_placeholder_and_the_key_only_under_the_broker_entries() {
        let mut brokered = spec();
        brokered["delivery"]["broker"] = json!({"port": 12999});
        let p = policy(brokered.clone(), None);
        let open = account(json!({}), "test");
        fixtures::validate::<KeyPolicy>(&p, Some(&open), &[]).unwrap();
        let key = SecretString::new("rk_test_realkey0001");
        let old = SecretString::new("rk_test_oldkey0001");
        let entries = KeyPolicy::publish(&p, &key, Some(&old));
        let get = |name: &str| {
            entries
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.expose().to_owned())
        };
        let placeholder = get("STRIPE_API_KEY").unwrap();
        assert!(placeholder.starts_with(crate::egress::proxy::PLACEHOLDER_PREFIX));
        assert_eq!(get("STRIPE_API_BASE").unwrap(), "http://127.0.0.1:12999");
        assert_eq!(get("STRIPE_BROKER_API_KEY").unwrap(), key.expose());
        assert_eq!(
            get("STRIPE_BROKER_PERMISSIONS").unwrap(),
            "charge_read,refund_write"
        );
        // the previous key is not published: the sidecar never needs it
        assert!(entries.iter().all(|(_, v)| v.expose() != old.expose()));
        assert_eq!(get("STRIPE_API_KEY_PREVIOUS"), None);
        // the placeholder does not change when the key does: no rollout
        let rotated = KeyPolicy::publish(&p, &SecretString::new("rk_test_next"), None);
        assert_eq!(rotated[0].1.expose(), placeholder);

        let mut with_targets = brokered.clone();
        with_targets["delivery"]["rolloutTargets"] =
            json!([{"kind": "Deployment", "name": "checkout"}]);
        let refusal =
            fixtures::validate::<KeyPolicy>(&policy(with_targets, None), Some(&open), &[])
                .unwrap_err();
        assert!(
            refusal.message.contains("needs no rollout"),
            "{}",
            refusal.message
        );
        let mut clash = brokered;
        clash["delivery"]["secret"]["key"] = json!("STRIPE_BROKER_API_KEY");
        let refusal =
            fixtures::validate::<KeyPolicy>(&policy(clash, None), Some(&open), &[]).unwrap_err();
        assert!(refusal.message.contains("brokered"), "{}", refusal.message);
        // without a broker nothing changes
        let plain = KeyPolicy::publish(&policy(spec(), None), &key, Some(&old));
        assert_eq!(plain.len(), 2);
        assert_eq!(plain[0].1.expose(), key.expose());
    }

    #[test]
    fn the_broker_anomaly_field_is_published_for_the_sidecar_only_while_set() {
        use crate::egress::proxy::{DEFAULT_ANOMALY_ENTRY, parse_anomaly_file};
        let open = account(json!({}), "test");
        let key = SecretString::new("rk_test_realkey0001");
        let entry = |spec: serde_json::Value| {
            let p = policy(spec, None);
            KeyPolicy::publish(&p, &key, None)
                .into_iter()
                .find(|(k, _)| k == DEFAULT_ANOMALY_ENTRY)
                .map(|(_, v)| v.expose().to_owned())
        };
        let mut brokered = spec();
        brokered["delivery"]["broker"] = json!({});
        assert_eq!(entry(brokered.clone()), None, "absent without the field");
        brokered["delivery"]["broker"]["anomaly"] = json!({"action": "Throttle", "sigmas": 8});
        fixtures::validate::<KeyPolicy>(&policy(brokered.clone(), None), Some(&open), &[]).unwrap();
        let text = entry(brokered.clone()).unwrap();
        let file = parse_anomaly_file("entry", text.as_bytes()).unwrap();
        let p = policy(brokered.clone(), None);
        assert_eq!(
            file.policy.unwrap(),
            format!(
                "{}/{}",
                p.metadata.namespace.as_deref().unwrap(),
                p.metadata.name.as_deref().unwrap()
            )
        );
        assert_eq!(
            file.anomaly.action,
            crate::egress::anomaly::AnomalyAction::Throttle
        );
        assert_eq!(file.anomaly.sigmas, Some(8));
        assert!(!text.contains(key.expose()));
        // a spec change is a new entry
        brokered["delivery"]["broker"]["anomaly"]["sigmas"] = json!(9);
        assert_ne!(entry(brokered.clone()).unwrap(), text);
        // values the schema would refuse are refused here too (one check for both)
        let mut bad = brokered.clone();
        bad["delivery"]["broker"]["anomaly"] = json!({"action": "Record", "throttleFor": "5m"});
        let refusal =
            fixtures::validate::<KeyPolicy>(&policy(bad, None), Some(&open), &[]).unwrap_err();
        assert_eq!(refusal.reason, "InvalidSpec");
        assert!(
            refusal.message.contains("throttleFor"),
            "{}",
            refusal.message
        );
        let mut clash = brokered;
        clash["delivery"]["secret"]["key"] = json!(DEFAULT_ANOMALY_ENTRY);
        assert!(
            fixtures::validate::<KeyPolicy>(&policy(clash, None), Some(&open), &[]).is_err(),
            "the entry name is reserved"
        );
    }

    #[test]
    fn decide_follows_status_annotations_scopes_and_schedule() {
        let open = account(json!({}), "test");
        let fresh = policy(spec(), None);
        let v = fixtures::validate::<KeyPolicy>(&fresh, Some(&open), &[]).unwrap();
        let decide =
            |p: &StripeKeyPolicy, v: &Validated, at| engine::next_step::<KeyPolicy>(p, v, at);
        assert_eq!(
            decide(&fresh, &v, now()),
            Next::Start(RotationTrigger::Initial, None)
        );
        let steady = json!({"currentKey": {"id": "ak_1", "fingerprint": "f"}, "currentPermissions": ["charge_read", "refund_write"],
                            "lastRotationAt": "2026-05-31T00:00:00Z", "rotationNumber": 1});
        let p = policy(spec(), Some(steady.clone()));
        fixtures::assert_annotations_and_schedule_decide::<KeyPolicy>(&p, &v);
        let mut narrower = spec();
        narrower["permissions"] = json!(["charge_read"]);
        let p = policy(narrower, Some(steady.clone()));
        let v2 = fixtures::validate::<KeyPolicy>(&p, Some(&open), &[]).unwrap();
        assert_eq!(
            decide(&p, &v2, now()),
            Next::Start(RotationTrigger::SpecChange, None)
        );
        let mut connect = spec();
        connect["connectPermissions"] = json!(["charge_read"]);
        let p = policy(connect, Some(steady.clone()));
        let v3 = fixtures::validate::<KeyPolicy>(&p, Some(&open), &[]).unwrap();
        assert_eq!(
            decide(&p, &v3, now()),
            Next::Start(RotationTrigger::SpecChange, None),
            "a Connect-permission change rotates too"
        );
        let mut rotating = steady;
        rotating["rotation"] = json!({"phase": "Storing", "number": 2, "trigger": "Schedule", "startedAt": "2026-06-01T00:00:00Z", "idempotencyKey": "k"});
        let p = policy(spec(), Some(rotating));
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

    #[test]
    fn a_listed_key_is_the_policys_only_with_its_name_and_uid_in_the_note() {
        let key = |name: &str, note: &str| -> crate::stripe::ApiKey {
            serde_json::from_value(
                json!({"id": "ak_1", "object": "v2.iam.api_key", "type": "secret_key",
                "name": name, "note": note, "status": "active", "created": "2026-06-01T00:00:00Z",
                "livemode": false}),
            )
            .unwrap()
        };
        let mine = owner_mark("stripe-key-operator/shop/checkout", "uid-1");
        let ours = listed(key(
            "stripe-key-operator/shop/checkout",
            "policy-uid=uid-1 rotation=3",
        ));
        assert_eq!(ours.owner.as_deref(), Some(mine.as_str()));
        assert!(ours.active);
        for (name, note) in [
            ("stripe-key-operator/shop/checkout", "made by hand"),
            (
                "stripe-key-operator/shop/checkout",
                "policy-uid=uid-2 rotation=1",
            ),
            ("stripe-key-operator/shop/checkout", "policy-uid=uid-1"),
            (
                "stripe-key-operator/shop/other",
                "policy-uid=uid-1 rotation=1",
            ),
        ] {
            assert_ne!(
                listed(key(name, note)).owner.as_deref(),
                Some(mine.as_str()),
                "{name} {note}"
            );
        }
    }
}
