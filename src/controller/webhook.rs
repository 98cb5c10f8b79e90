//! The StripeWebhookEndpoint controller: an adapter over the
//! [rotation engine](crate::rotation::engine) for webhook endpoints and their signing secrets.
//!
//! Stripe has no API that rolls a signing secret, so every rotation is blue/green: a second
//! endpoint with the same settings is created and **disabled at once** (Stripe's create takes no
//! `disabled`), its secret is published and the targets roll, and only then is it enabled; the
//! old endpoint carries every event meanwhile, so no receiver ever sees an event signed with a
//! secret it does not hold yet. After the overlap the old endpoint is deleted. In an incident
//! the old endpoint goes at once and the new one stays enabled: Stripe retries rejected
//! deliveries for days, so nothing is lost once receivers load the secret.
//!
//! The create sends the exact parameters recorded in `status.pendingEndpoint`, so a replay
//! after a crash returns the same endpoint and secret. While idle the controller compares
//! Stripe's side with the spec every `spec.driftCheckInterval` (and after every spec change)
//! and puts back what was changed at Stripe; an endpoint deleted at Stripe is recreated.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::ResourceExt;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use tracing::{info, warn};

use super::Context;
use super::accounts::AccountHandle;
use super::error::ReconcileError;
use super::shared::{Refusal, time, ts_from_unix};
use crate::api::{
    DEFAULT_WEBHOOK_OVERLAP, RotationState, RotationTrigger, StripeWebhookEndpoint,
    StripeWebhookEndpointStatus, WebhookEndpointSettings,
};
use crate::rotation::engine::{
    self, Credential, Declared, Inputs, Minted, Names, OverlapBounds, RotationSpec, Run, invalid,
};
use crate::rotation::listing::Listed;
use crate::rotation::schedule::parse_duration;
use crate::secret::SecretString;
use crate::stripe::{
    CreateWebhookEndpointParams, StripeError, UpdateWebhookEndpointParams, WebhookEndpoint,
    WebhookEndpointStatus, idempotency_key,
};

/// The finalizer that guards the resource's endpoints at Stripe and its store entry.
pub const FINALIZER: &str = "stripekeys.io/delete-endpoints";
/// The store path kind segment of webhook endpoints.
pub const STORE_KIND: &str = "stripewebhookendpoint";
/// Metadata key marking an endpoint as the operator's (value [`crate::api::MANAGED_BY`]).
pub const META_MANAGED_BY: &str = "stripekeys_managed_by";
/// Metadata key with the namespace of the owning resource.
pub const META_NAMESPACE: &str = "stripekeys_namespace";
/// Metadata key with the name of the owning resource.
pub const META_NAME: &str = "stripekeys_name";
/// Metadata key with the UID of the owning resource (what orphan detection matches).
pub const META_UID: &str = "stripekeys_uid";
/// Metadata key with the rotation number of the endpoint.
pub const META_ROTATION: &str = "stripekeys_rotation";
/// The default `spec.driftCheckInterval`.
pub const DEFAULT_DRIFT_CHECK_INTERVAL: &str = "10m";
/// What the engine calls webhook endpoints in Events, metrics, store paths and messages.
const NAMES: Names = Names::new(
    [
        "StripeWebhookEndpoint",
        STORE_KIND,
        FINALIZER,
        "webhook endpoint",
    ],
    ["Endpoint", "Created", "Deleted"],
);

/// An endpoint whose spec passed validation, with everything derived from it.
#[derive(Debug, Clone)]
pub struct Validated {
    pub rotation: RotationSpec,
    pub drift_check_interval: Duration,
    /// The URL's host (what `allowedWebhookHosts` judges).
    pub host: String,
}

/// A signing secret's overlap: both endpoints deliver meanwhile, for at most a day.
const OVERLAP: OverlapBounds = OverlapBounds {
    default: DEFAULT_WEBHOOK_OVERLAP,
    min: Duration::from_secs(60),
    max: Duration::from_secs(24 * 3600),
    message: "overlap must be between 1m and 24h",
};

/// The webhook-endpoint adapter of the rotation engine.
pub struct Endpoint;

/// Validates an endpoint against its account, its namespace and the guardrails. Pure: no client
/// calls. Admission judges with the same function, as it does for key policies.
pub fn validate(
    endpoint: &StripeWebhookEndpoint,
    account: Option<&crate::api::StripeAccount>,
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
    <Endpoint as Credential>::validate(endpoint, &input)
}

/// Reconciles one endpoint (the entry point tests call; the controller calls the engine's).
pub fn reconcile(
    e: Arc<StripeWebhookEndpoint>,
    ctx: Arc<Context>,
) -> impl Future<Output = Result<Action, ReconcileError>> {
    engine::reconcile::<Endpoint>(e, ctx)
}

/// The settings an endpoint of rotation `number` has: the spec's, plus the operator's metadata.
pub fn desired_settings(endpoint: &StripeWebhookEndpoint, number: i64) -> WebhookEndpointSettings {
    let spec = &endpoint.spec;
    let mut metadata = spec.metadata.clone();
    metadata.insert(META_MANAGED_BY.into(), crate::api::MANAGED_BY.into());
    metadata.insert(
        META_NAMESPACE.into(),
        endpoint.namespace().unwrap_or_default(),
    );
    metadata.insert(META_NAME.into(), endpoint.name_any());
    metadata.insert(META_UID.into(), endpoint.uid().unwrap_or_default());
    metadata.insert(META_ROTATION.into(), number.to_string());
    WebhookEndpointSettings {
        url: spec.url.clone(),
        enabled_events: spec.enabled_events.clone(),
        api_version: spec.api_version.clone(),
        description: spec.description.clone().filter(|d| !d.is_empty()),
        connect: spec.connect,
        metadata,
    }
}

/// The parameters of the create (deterministic: a replay sends exactly the same form).
pub fn create_params(settings: &WebhookEndpointSettings) -> CreateWebhookEndpointParams {
    CreateWebhookEndpointParams {
        url: settings.url.clone(),
        enabled_events: settings.enabled_events.clone(),
        api_version: settings.api_version.clone(),
        connect: settings.connect.then_some(true),
        description: settings.description.clone(),
        metadata: settings.metadata.clone(),
    }
}

/// What differs between the declared settings and the endpoint at Stripe, as the update that
/// puts it back and the names of the fields that drifted. `None` when nothing drifted.
pub fn drift(
    desired: &WebhookEndpointSettings,
    actual: &WebhookEndpoint,
) -> Option<(UpdateWebhookEndpointParams, Vec<&'static str>)> {
    let mut params = UpdateWebhookEndpointParams::default();
    let mut fields = Vec::new();
    if actual.url != desired.url {
        params.url = Some(desired.url.clone());
        fields.push("url");
    }
    let want: BTreeSet<&String> = desired.enabled_events.iter().collect();
    let have: BTreeSet<&String> = actual.enabled_events.iter().collect();
    if want != have {
        params.enabled_events = Some(desired.enabled_events.clone());
        fields.push("enabled_events");
    }
    let have_description = actual.description.as_deref().filter(|d| !d.is_empty());
    if have_description != desired.description.as_deref() {
        params.description = Some(desired.description.clone().unwrap_or_default());
        fields.push("description");
    }
    if actual.metadata != desired.metadata {
        // Metadata merges at Stripe: an empty value removes a key.
        let mut m: BTreeMap<String, String> = actual
            .metadata
            .keys()
            .filter(|k| !desired.metadata.contains_key(*k))
            .map(|k| (k.clone(), String::new()))
            .collect();
        for (k, v) in &desired.metadata {
            if actual.metadata.get(k) != Some(v) {
                m.insert(k.clone(), v.clone());
            }
        }
        params.metadata = Some(m);
        fields.push("metadata");
    }
    if actual.status != WebhookEndpointStatus::Enabled {
        params.disabled = Some(false);
        fields.push("disabled");
    }
    (!fields.is_empty()).then_some((params, fields))
}

/// Whether the spec asks for settings Stripe cannot update on the current endpoint.
pub fn immutable_settings_changed(endpoint: &StripeWebhookEndpoint) -> bool {
    let Some(status) = endpoint.status.as_ref() else {
        return false;
    };
    status.current_api_version != endpoint.spec.api_version
        || status.current_connect.unwrap_or(false) != endpoint.spec.connect
}

/// When Stripe's side is next compared with the spec: now after a spec change, else one
/// interval after the last check.
pub fn drift_check_due(
    endpoint: &StripeWebhookEndpoint,
    v: &Validated,
    now: Timestamp,
) -> Option<Timestamp> {
    let status = endpoint.status.as_ref()?;
    status.current_key.as_ref()?;
    if status.applied_generation != endpoint.metadata.generation {
        return Some(now);
    }
    let Some(last) = status.last_drift_check_at.as_ref() else {
        return Some(now);
    };
    Some(
        last.0
            .checked_add(
                SignedDuration::try_from(v.drift_check_interval).unwrap_or(SignedDuration::ZERO),
            )
            .unwrap_or(now),
    )
}

/// The comma-separated list of valid secrets, newest first.
pub fn secrets_list(current: &SecretString, previous: Option<&SecretString>) -> SecretString {
    match previous {
        Some(p) => SecretString::new(format!("{},{}", current.expose(), p.expose())),
        None => current.clone(),
    }
}

/// Whether a rotation's new endpoint waits, disabled, until receivers hold its secret: a routine
/// rotation has an old endpoint that carries every event meanwhile; an incident (whose old
/// endpoint is gone), a first endpoint and a recreated one have none.
pub fn starts_disabled(trigger: RotationTrigger, has_current: bool) -> bool {
    has_current
        && matches!(
            trigger,
            RotationTrigger::Annotation | RotationTrigger::Schedule | RotationTrigger::SpecChange
        )
}

async fn set_disabled(
    run: &Run<'_, Endpoint>,
    handle: &AccountHandle,
    rotation: &RotationState,
    id: &str,
    disabled: bool,
) -> Result<(), ReconcileError> {
    let params = UpdateWebhookEndpointParams {
        disabled: Some(disabled),
        ..UpdateWebhookEndpointParams::default()
    };
    let step = if disabled { "disable" } else { "enable" };
    let key = |suffix: String| {
        idempotency_key(
            &run.uid,
            rotation.number as u64,
            &format!("{step}-{id}{suffix}"),
        )
    };
    match handle
        .client
        .update_webhook_endpoint(id, &params, &key(String::new()))
        .await
    {
        Ok(_) => Ok(()),
        // A saved server error is replayed for a day; setting `disabled` twice is harmless, so
        // ask again under a fresh key.
        Err(e) if e.status().is_some_and(|s| s >= 500) && e.is_idempotent_replay() => {
            let fresh = format!("-{}", run.ctx.clock.now().as_millisecond());
            handle
                .client
                .update_webhook_endpoint(id, &params, &key(fresh))
                .await?;
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

#[async_trait::async_trait]
impl Credential for Endpoint {
    type Resource = StripeWebhookEndpoint;
    type Status = StripeWebhookEndpointStatus;
    type Spec = Validated;

    const NAMES: Names = NAMES;

    fn declared(obj: &StripeWebhookEndpoint) -> Declared<'_> {
        let delivery = &obj.spec.delivery;
        let rotation = obj.spec.rotation.as_ref();
        Declared {
            account: &obj.spec.account_ref.name,
            secret: &delivery.secret.name,
            targets: &delivery.rollout_targets,
            vault_sub_path: delivery
                .vault
                .as_ref()
                .is_some_and(|v| v.sub_path.is_some()),
            schedule: rotation.and_then(|r| r.schedule()),
            overlap: rotation.and_then(|r| r.overlap.as_deref()),
            // An endpoint left behind would keep delivering events to the URL.
            revoke_on_delete: true,
        }
    }

    /// Validates an endpoint against its account, its namespace and the guardrails. Pure: no
    /// client calls, so refusing costs no Stripe call.
    fn validate(
        endpoint: &StripeWebhookEndpoint,
        input: &Inputs<'_>,
    ) -> Result<Validated, Refusal> {
        let (account, rotation) = engine::validate_common::<Self>(endpoint, input, &OVERLAP)?;
        let spec = &endpoint.spec;
        let url = url::Url::parse(&spec.url)
            .map_err(|e| invalid(format!("url {:?} is not a URL: {e}", spec.url)))?;
        if url.scheme() != "https" {
            return Err(invalid("url must be an https URL".into()));
        }
        let host = url
            .host_str()
            .ok_or_else(|| invalid("url has no host".into()))?
            .to_ascii_lowercase();
        if spec.enabled_events.is_empty() {
            return Err(invalid("enabledEvents must name at least one event".into()));
        }
        if let Some(k) = spec.metadata.keys().find(|k| k.starts_with("stripekeys_")) {
            return Err(invalid(format!(
                "metadata key {k:?} is reserved: stripekeys_* keys are the operator's"
            )));
        }
        let drift_text = spec
            .drift_check_interval
            .as_deref()
            .unwrap_or(DEFAULT_DRIFT_CHECK_INTERVAL);
        let drift_check_interval =
            parse_duration("driftCheckInterval", drift_text).map_err(|e| invalid(e.to_string()))?;
        if drift_check_interval < Duration::from_secs(30) {
            return Err(invalid("driftCheckInterval must be at least 30s".into()));
        }
        rotation.check_guardrails(input, account, Vec::new(), Some(&host))?;
        Ok(Validated {
            rotation,
            drift_check_interval,
            host,
        })
    }

    fn rotation(spec: &Validated) -> &RotationSpec {
        &spec.rotation
    }

    fn needs_new_credential(
        obj: &StripeWebhookEndpoint,
        _status: &StripeWebhookEndpointStatus,
        _spec: &Validated,
    ) -> bool {
        immutable_settings_changed(obj)
    }

    fn prepare(
        obj: &StripeWebhookEndpoint,
        _spec: &Validated,
        status: &mut StripeWebhookEndpointStatus,
        rotation: &mut RotationState,
    ) {
        // The settings are fixed now: a replay of the create sends exactly these.
        status.pending_endpoint = Some(desired_settings(obj, rotation.number));
        status.last_rotation_trigger = Some(rotation.trigger);
    }

    async fn create(
        run: &Run<'_, Self>,
        handle: &AccountHandle,
        rotation: &RotationState,
    ) -> Result<Minted, ReconcileError> {
        let settings = run
            .status()
            .pending_endpoint
            .clone()
            .unwrap_or_else(|| desired_settings(&run.obj, rotation.number));
        let response = handle
            .client
            .create_webhook_endpoint(
                &create_params(&settings),
                &engine::create_key(&run.uid, rotation),
            )
            .await?;
        let mut endpoint = response.value;
        let secret = endpoint
            .secret
            .take()
            .ok_or_else(|| ReconcileError::MissingSecret {
                key_id: endpoint.id.clone(),
                message: "the create response carried no signing secret".into(),
            })?;
        Ok(Minted {
            id: endpoint.id,
            secret,
            created: ts_from_unix(endpoint.created),
            key: None,
        })
    }

    async fn before_publish(
        run: &Run<'_, Self>,
        handle: &AccountHandle,
        rotation: &RotationState,
        id: &str,
    ) -> Result<(), ReconcileError> {
        if starts_disabled(rotation.trigger, run.status().current_key.is_some()) {
            set_disabled(run, handle, rotation, id, true).await?;
        }
        Ok(())
    }

    async fn after_rollout(
        run: &Run<'_, Self>,
        handle: &AccountHandle,
        rotation: &RotationState,
        id: &str,
    ) -> Result<(), ReconcileError> {
        if starts_disabled(rotation.trigger, run.status().previous_key.is_some()) {
            set_disabled(run, handle, rotation, id, false).await?;
            run.event(
                EventType::Normal,
                "EndpointEnabled",
                format!("webhook endpoint {id} enabled: every receiver holds its secret"),
            )
            .await;
        }
        Ok(())
    }

    async fn retire(
        _run: &Run<'_, Self>,
        handle: &AccountHandle,
        id: &str,
        _idempotency_key: &str,
    ) -> Result<(), StripeError> {
        handle.client.delete_webhook_endpoint(id).await.map(|_| ())
    }

    /// Every endpoint of the account; the operator's carry its metadata, and the UID of the
    /// resource that created them is the owner mark.
    async fn list_account(handle: &AccountHandle) -> Result<Vec<Listed>, StripeError> {
        let endpoints = handle.client.list_all_webhook_endpoints(100).await?.items;
        Ok(endpoints
            .into_iter()
            .map(|mut ep| Listed {
                owner: match ep.metadata.get(META_MANAGED_BY).map(String::as_str) {
                    Some(crate::api::MANAGED_BY) => ep.metadata.remove(META_UID),
                    _ => None,
                },
                id: ep.id,
                active: true,
            })
            .collect())
    }

    fn owner_mark(run: &Run<'_, Self>) -> String {
        run.uid.clone()
    }

    fn publish(
        obj: &StripeWebhookEndpoint,
        current: &SecretString,
        previous: Option<&SecretString>,
    ) -> Vec<(String, SecretString)> {
        let delivery = &obj.spec.delivery.secret;
        vec![
            (delivery.key_name().to_string(), current.clone()),
            (
                delivery.all_key_name().to_string(),
                secrets_list(current, previous),
            ),
        ]
    }

    fn on_stored(status: &mut StripeWebhookEndpointStatus, _rotation: &RotationState) {
        let settings = status.pending_endpoint.take();
        status.current_api_version = settings.as_ref().and_then(|s| s.api_version.clone());
        status.current_connect = Some(settings.is_some_and(|s| s.connect));
    }

    async fn idle_check(
        run: &mut Run<'_, Self>,
        handle: &AccountHandle,
        _spec: &Validated,
        now: Timestamp,
    ) -> Result<Option<RotationTrigger>, ReconcileError> {
        check_drift(run, handle, now).await
    }

    fn idle_check_due(
        obj: &StripeWebhookEndpoint,
        spec: &Validated,
        now: Timestamp,
    ) -> Option<Timestamp> {
        drift_check_due(obj, spec, now)
    }
}

/// Compares the endpoint at Stripe with the spec and puts back what drifted.
async fn check_drift(
    run: &mut Run<'_, Endpoint>,
    handle: &AccountHandle,
    now: Timestamp,
) -> Result<Option<RotationTrigger>, ReconcileError> {
    let mut status = run.status();
    let Some(current) = status.current_key.clone() else {
        return Ok(None);
    };
    let actual = match handle.client.retrieve_webhook_endpoint(&current.id).await {
        Ok(r) => r.value,
        Err(e) if e.is_not_found() => {
            warn!(endpoint = %current.id, "the endpoint was deleted at Stripe");
            return Ok(Some(RotationTrigger::Recreate));
        }
        Err(e) => return Err(e.into()),
    };
    let desired = desired_settings(&run.obj, status.rotation_number.unwrap_or(1));
    if let Some((params, fields)) = drift(&desired, &actual) {
        // A fresh key per check: a repeat of the same drift must be applied again, not replayed.
        let key = idempotency_key(
            &run.uid,
            status.rotation_number.unwrap_or(0) as u64,
            &format!("drift-{}-{}", current.id, now.as_millisecond()),
        );
        handle
            .client
            .update_webhook_endpoint(&current.id, &params, &key)
            .await?;
        let spec_changed =
            status.applied_generation.is_some() && status.applied_generation != run.generation();
        let (type_, reason, note) = if spec_changed {
            (
                EventType::Normal,
                "EndpointUpdated",
                format!(
                    "updated {} of webhook endpoint {} to the new spec",
                    fields.join(", "),
                    current.id
                ),
            )
        } else {
            (
                EventType::Warning,
                "DriftRepaired",
                format!(
                    "{} of webhook endpoint {} changed at Stripe and was put back",
                    fields.join(", "),
                    current.id
                ),
            )
        };
        info!(endpoint = %current.id, fields = ?fields, "endpoint settings applied");
        run.event(type_, reason, note).await;
    }
    status.last_drift_check_at = Some(time(now));
    status.applied_generation = run.generation();
    run.write_status(status).await?;
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::RotationTrigger;
    use crate::rotation::engine::Next;
    use crate::rotation::engine::fixtures::{self, account, now};
    use serde_json::json;

    fn endpoint(
        spec: serde_json::Value,
        status: Option<serde_json::Value>,
    ) -> StripeWebhookEndpoint {
        fixtures::resource::<Endpoint>("orders", spec, status, json!(null))
    }

    fn validate(
        e: &StripeWebhookEndpoint,
        account: Option<&crate::api::StripeAccount>,
        guardrails: &[crate::api::StripeGuardrail],
    ) -> Result<Validated, Refusal> {
        fixtures::validate::<Endpoint>(e, account, guardrails)
    }

    fn spec() -> serde_json::Value {
        json!({"accountRef": {"name": "acct"}, "url": "https://hooks.example.com/stripe",
               "enabledEvents": ["charge.succeeded"], "metadata": {"team": "pay"},
               "delivery": {"secret": {"name": "s"}}, "rotation": {"every": "720h"}})
    }

    fn guardrail(spec: serde_json::Value) -> crate::api::StripeGuardrail {
        serde_json::from_value(json!({
            "apiVersion": "stripekeys.io/v1alpha1", "kind": "StripeGuardrail", "metadata": {"name": "g"},
            "spec": spec
        }))
        .unwrap()
    }

    fn stripe_endpoint(v: serde_json::Value) -> WebhookEndpoint {
        let mut base = json!({"id": "we_1", "object": "webhook_endpoint", "url": "https://hooks.example.com/stripe",
            "enabled_events": ["charge.succeeded"], "created": 1, "livemode": false,
            "metadata": {"team": "pay", "stripekeys_managed_by": "stripe-key-operator", "stripekeys_namespace": "shop",
                         "stripekeys_name": "orders", "stripekeys_uid": "uid-1", "stripekeys_rotation": "1"},
            "status": "enabled"});
        for (k, val) in v.as_object().unwrap() {
            base[k] = val.clone();
        }
        serde_json::from_value(base).unwrap()
    }

    #[test]
    fn validate_refuses_account_namespace_host_guardrails_and_bad_durations() {
        let e = endpoint(spec(), None);
        fixtures::assert_placement_refusals::<Endpoint>(&e);
        let open = account(json!({}), "test");
        let hosts = guardrail(
            json!({"namespaceSelector": {}, "allowedWebhookHosts": ["*.internal.example.com"]}),
        );
        let refusal = validate(&e, Some(&open), &[hosts]).unwrap_err();
        assert_eq!(refusal.reason, "GuardrailViolation");
        assert!(
            refusal.message.contains("hooks.example.com"),
            "{}",
            refusal.message
        );
        let no_live = guardrail(json!({"namespaceSelector": {}, "allowLiveMode": false}));
        let live = account(json!({}), "live");
        assert_eq!(
            validate(&e, Some(&live), &[no_live]).unwrap_err().reason,
            "GuardrailViolation"
        );
        let max_overlap = guardrail(json!({"namespaceSelector": {}, "maxOverlap": "30m"}));
        assert!(
            validate(&e, Some(&open), &[max_overlap])
                .unwrap_err()
                .message
                .contains("overlap")
        );
        let mut long = spec();
        long["rotation"]["overlap"] = json!("25h");
        assert_eq!(
            validate(&endpoint(long, None), Some(&open), &[])
                .unwrap_err()
                .reason,
            "InvalidSpec"
        );
        let mut reserved = spec();
        reserved["metadata"] = json!({"stripekeys_uid": "x"});
        assert_eq!(
            validate(&endpoint(reserved, None), Some(&open), &[])
                .unwrap_err()
                .reason,
            "InvalidSpec"
        );
        let ok = validate(&e, Some(&open), &[]).unwrap();
        assert_eq!(ok.rotation.overlap, Duration::from_secs(3600));
        assert_eq!(ok.drift_check_interval, Duration::from_secs(600));
        assert_eq!(ok.host, "hooks.example.com");
    }

    #[test]
    fn desired_settings_carry_the_spec_and_the_operator_metadata() {
        let e = endpoint(spec(), None);
        let s = desired_settings(&e, 3);
        assert_eq!(s.url, "https://hooks.example.com/stripe");
        assert_eq!(s.metadata["team"], "pay");
        assert_eq!(s.metadata[META_MANAGED_BY], "stripe-key-operator");
        assert_eq!(s.metadata[META_NAMESPACE], "shop");
        assert_eq!(s.metadata[META_NAME], "orders");
        assert_eq!(s.metadata[META_UID], "uid-1");
        assert_eq!(s.metadata[META_ROTATION], "3");
        let form = create_params(&s).to_form();
        assert!(
            !form.iter().any(|(k, _)| k == "connect"),
            "false is not sent"
        );
    }

    #[test]
    fn drift_names_exactly_what_changed_and_removes_foreign_metadata() {
        let e = endpoint(spec(), None);
        let desired = desired_settings(&e, 1);
        assert_eq!(drift(&desired, &stripe_endpoint(json!({}))), None);
        let (params, fields) = drift(
            &desired,
            &stripe_endpoint(
                json!({"url": "https://evil.example.net/", "status": "disabled",
                "enabled_events": ["*"], "description": "changed"}),
            ),
        )
        .unwrap();
        assert_eq!(fields, ["url", "enabled_events", "description", "disabled"]);
        assert_eq!(
            params.url.as_deref(),
            Some("https://hooks.example.com/stripe")
        );
        assert_eq!(params.disabled, Some(false));
        assert_eq!(params.description.as_deref(), Some(""), "cleared");
        assert_eq!(params.metadata, None);
        let mut meta = stripe_endpoint(json!({})).metadata;
        meta.insert("added".into(), "by hand".into());
        meta.insert("team".into(), "ads".into());
        let (params, fields) =
            drift(&desired, &stripe_endpoint(json!({"metadata": meta}))).unwrap();
        assert_eq!(fields, ["metadata"]);
        let m = params.metadata.unwrap();
        assert_eq!(m.len(), 2, "{m:?}");
        assert_eq!(m["added"], "");
        assert_eq!(m["team"], "pay");
        // Event order does not matter.
        let mut two = spec();
        two["enabledEvents"] = json!(["a.b", "c.d"]);
        let d2 = desired_settings(&endpoint(two, None), 1);
        assert_eq!(
            drift(
                &d2,
                &stripe_endpoint(json!({"enabled_events": ["c.d", "a.b"]}))
            ),
            None
        );
    }

    #[test]
    fn decide_follows_status_annotations_immutable_settings_and_schedule() {
        let open = account(json!({}), "test");
        let fresh = endpoint(spec(), None);
        let v = validate(&fresh, Some(&open), &[]).unwrap();
        let decide =
            |e: &StripeWebhookEndpoint, v: &Validated, at| engine::next_step::<Endpoint>(e, v, at);
        assert_eq!(
            decide(&fresh, &v, now()),
            Next::Start(RotationTrigger::Initial, None)
        );
        let steady = json!({"currentKey": {"id": "we_1", "fingerprint": "f"}, "currentConnect": false,
                            "lastRotationAt": "2026-05-31T00:00:00Z", "rotationNumber": 1,
                            "appliedGeneration": 1, "lastDriftCheckAt": "2026-05-31T23:55:00Z"});
        let e = endpoint(spec(), Some(steady.clone()));
        fixtures::assert_annotations_and_schedule_decide::<Endpoint>(&e, &v);
        let mut versioned = spec();
        versioned["apiVersion"] = json!("2024-06-20");
        let e = endpoint(versioned, Some(steady.clone()));
        assert_eq!(
            decide(&e, &v, now()),
            Next::Start(RotationTrigger::SpecChange, None)
        );
        let mut connect = spec();
        connect["connect"] = json!(true);
        let e = endpoint(connect, Some(steady.clone()));
        assert_eq!(
            decide(&e, &v, now()),
            Next::Start(RotationTrigger::SpecChange, None)
        );
        // A url change is not a rotation: the drift check applies it.
        let mut moved = spec();
        moved["url"] = json!("https://hooks.example.com/v2");
        let e = endpoint(moved, Some(steady.clone()));
        assert_eq!(decide(&e, &v, now()), Next::Idle);
    }

    #[test]
    fn drift_checks_are_due_after_the_interval_or_a_spec_change() {
        let open = account(json!({}), "test");
        let fresh = endpoint(spec(), None);
        let v = validate(&fresh, Some(&open), &[]).unwrap();
        let checked = json!({"currentKey": {"id": "we_1", "fingerprint": "f"}, "appliedGeneration": 1,
                             "lastDriftCheckAt": "2026-05-31T23:55:00Z"});
        let e = endpoint(spec(), Some(checked.clone()));
        let due = drift_check_due(&e, &v, now()).unwrap();
        assert_eq!(due, "2026-06-01T00:05:00Z".parse::<Timestamp>().unwrap());
        let mut changed = e.clone();
        changed.metadata.generation = Some(2);
        assert_eq!(drift_check_due(&changed, &v, now()), Some(now()));
        assert_eq!(
            drift_check_due(&fresh, &v, now()),
            None,
            "nothing to check yet"
        );
    }

    #[test]
    fn the_secrets_list_is_newest_first() {
        let cur = SecretString::new("whsec_new");
        let prev = SecretString::new("whsec_old");
        assert_eq!(
            secrets_list(&cur, Some(&prev)).expose(),
            "whsec_new,whsec_old"
        );
        assert_eq!(secrets_list(&cur, None).expose(), "whsec_new");
    }
}
