//! The StripeWebhookEndpoint controller: create the endpoint at Stripe, keep Stripe's side as
//! declared, publish its signing secret, and rotate the secret blue/green.
//!
//! Stripe has no API that rolls a signing secret, so every rotation creates a second endpoint
//! with the same settings, publishes both secrets, rolls the targets, waits for the overlap and
//! deletes the old endpoint. The rotation is the same state machine as the key policy's,
//! recorded in `status.rotation` *before* each external side effect:
//!
//! ```text
//! routine:  Minting → Storing → Syncing → RollingOut → Overlapping → Expiring → (idle)
//! initial:  Minting → Storing → Syncing → RollingOut → (idle)
//! recreate: Minting → Storing → Syncing → RollingOut → (idle)   (the endpoint vanished at Stripe)
//! incident: Minting → Storing → Expiring → Syncing → RollingOut → (idle)
//! ```
//!
//! "Minting" creates the endpoint with an idempotency key derived from the resource UID and the
//! rotation number and with the exact parameters recorded in `status.pendingEndpoint`, so a
//! replay after a crash returns the same endpoint and its secret instead of creating another.
//!
//! In the idle state the controller compares Stripe's side with the spec every
//! `spec.driftCheckInterval` (and after every spec change) and puts back what was changed at
//! Stripe.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};
use tracing::{info, instrument, warn};

use super::Context;
use super::accounts::AccountHandle;
use super::error::ReconcileError;
use super::shared::{self, Refusal, time, ts_from_unix};
use crate::api::conditions::set_condition;
use crate::api::{
    DEFAULT_WEBHOOK_OVERLAP, KeyStatus, ROTATE_ANNOTATION, ROTATE_REASON_ANNOTATION,
    ROTATE_REASON_INCIDENT, RotationPhase, RotationState, RotationTrigger, StripeAccount,
    StripeWebhookEndpoint, StripeWebhookEndpointStatus, WebhookEndpointSettings, condition_types,
};
use crate::inject::{self, SecretEntry};
use crate::rotation::schedule::{Schedule, parse_duration, until};
use crate::rules;
use crate::secret::SecretString;
use crate::stripe::{
    CreateWebhookEndpointParams, UpdateWebhookEndpointParams, WebhookEndpoint,
    WebhookEndpointStatus, idempotency_key,
};
use crate::vault::{Cas, CredentialBundle, KeyMaterial, Owner, StorePath};

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
const KIND: &str = "StripeWebhookEndpoint";
const CONTROLLER: &str = "stripewebhookendpoint";

/// An endpoint whose spec passed validation, with everything derived from it.
#[derive(Debug, Clone)]
pub struct Validated {
    pub schedule: Option<Schedule>,
    pub overlap: Duration,
    pub drift_check_interval: Duration,
    /// The URL's host (what `allowedWebhookHosts` judges).
    pub host: String,
}

/// Validates an endpoint against its account, its namespace and the guardrails. Pure: no client
/// calls, so refusing costs no Stripe call.
pub fn validate(
    endpoint: &StripeWebhookEndpoint,
    account: Option<&StripeAccount>,
    namespace_labels: &BTreeMap<String, String>,
    guardrails: &[crate::api::StripeGuardrail],
    now: Timestamp,
) -> Result<Validated, Refusal> {
    let spec = &endpoint.spec;
    let invalid = |message: String| Refusal {
        reason: "InvalidSpec",
        message,
    };
    let Some(account) = account else {
        return Err(Refusal {
            reason: "AccountNotFound",
            message: format!("StripeAccount {:?} does not exist", spec.account_ref.name),
        });
    };
    if !rules::account_allows_namespace(account, namespace_labels) {
        return Err(Refusal {
            reason: "NamespaceNotAllowed",
            message: format!(
                "StripeAccount {:?} does not serve namespace {:?} (its namespaceSelector does not select it)",
                spec.account_ref.name,
                endpoint.namespace().unwrap_or_default()
            ),
        });
    }
    if spec
        .delivery
        .vault
        .as_ref()
        .is_some_and(|v| v.sub_path.is_some())
    {
        return Err(invalid(super::shared::SUB_PATH_UNSUPPORTED.into()));
    }
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
    let rotation = spec.rotation.as_ref();
    let schedule = match rotation.and_then(|r| r.schedule()) {
        Some(s) => Some(Schedule::parse(&s).map_err(|e| invalid(e.to_string()))?),
        None => None,
    };
    let overlap_text = rotation
        .and_then(|r| r.overlap.as_deref())
        .unwrap_or(DEFAULT_WEBHOOK_OVERLAP);
    let overlap = parse_duration("overlap", overlap_text).map_err(|e| invalid(e.to_string()))?;
    if overlap < Duration::from_secs(60) || overlap > Duration::from_secs(24 * 3600) {
        return Err(invalid("overlap must be between 1m and 24h".into()));
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
    let rotation_period = match &schedule {
        Some(s) => Some(s.longest_period(now).map_err(|e| invalid(e.to_string()))?),
        None => None,
    };
    let violations = rules::evaluate(
        guardrails,
        &rules::Request {
            namespace_labels: namespace_labels.clone(),
            mode: Some(account.spec.mode),
            permissions: Vec::new(),
            rotation_period,
            rotates: schedule.is_some(),
            overlap: Some(overlap),
            webhook_host: Some(&host),
        },
    );
    if !violations.is_empty() {
        return Err(Refusal {
            reason: "GuardrailViolation",
            message: violations
                .iter()
                .map(|v| v.message.clone())
                .collect::<Vec<_>>()
                .join("; "),
        });
    }
    Ok(Validated {
        schedule,
        overlap,
        drift_check_interval,
        host,
    })
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

/// A rotation request carried by the annotations, if it was not handled yet.
pub fn pending_request(endpoint: &StripeWebhookEndpoint) -> Option<(String, RotationTrigger)> {
    let annotations = endpoint.annotations();
    let value = annotations.get(ROTATE_ANNOTATION)?.trim().to_string();
    if value.is_empty() {
        return None;
    }
    let handled = endpoint
        .status
        .as_ref()
        .and_then(|s| s.last_handled_rotate_request.as_deref());
    if handled == Some(value.as_str()) {
        return None;
    }
    let incident = annotations
        .get(ROTATE_REASON_ANNOTATION)
        .is_some_and(|r| r.trim().eq_ignore_ascii_case(ROTATE_REASON_INCIDENT));
    Some((
        value,
        if incident {
            RotationTrigger::Incident
        } else {
            RotationTrigger::Annotation
        },
    ))
}

/// What the endpoint needs next.
#[derive(Debug, Clone, PartialEq)]
pub enum Next {
    /// Start a rotation.
    Start(RotationTrigger),
    /// Carry on with the recorded phase.
    Continue(RotationPhase),
    /// Nothing to rotate: keep Stripe's side and the Secret as declared.
    Idle,
}

/// The next scheduled rotation of the current endpoint (stable: seeded by UID and number).
pub fn next_rotation_at(endpoint: &StripeWebhookEndpoint, v: &Validated) -> Option<Timestamp> {
    let status = endpoint.status.as_ref()?;
    let last = status.last_rotation_at.as_ref()?.0;
    let seed = format!(
        "{}/{}",
        endpoint.uid().unwrap_or_default(),
        status.rotation_number.unwrap_or(0)
    );
    v.schedule.as_ref()?.next_rotation(last, &seed).ok()
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

/// Decides the next step. Pure.
pub fn decide(endpoint: &StripeWebhookEndpoint, v: &Validated, now: Timestamp) -> Next {
    let status = endpoint.status.clone().unwrap_or_default();
    if let Some(rotation) = &status.rotation {
        return Next::Continue(rotation.phase);
    }
    if status.current_key.is_none() {
        return Next::Start(RotationTrigger::Initial);
    }
    if let Some((_, trigger)) = pending_request(endpoint) {
        return Next::Start(trigger);
    }
    if immutable_settings_changed(endpoint) {
        return Next::Start(RotationTrigger::SpecChange);
    }
    if next_rotation_at(endpoint, v).is_some_and(|at| at <= now) {
        return Next::Start(RotationTrigger::Schedule);
    }
    Next::Idle
}

/// The comma-separated list of valid secrets, newest first.
pub fn secrets_list(current: &SecretString, previous: Option<&SecretString>) -> SecretString {
    match previous {
        Some(p) => SecretString::new(format!("{},{}", current.expose(), p.expose())),
        None => current.clone(),
    }
}

/// Reconciles one endpoint (the entry point the `Controller` calls).
#[instrument(skip(endpoint, ctx), fields(namespace = %endpoint.namespace().unwrap_or_default(), name = %endpoint.name_any()))]
pub async fn reconcile(
    endpoint: Arc<StripeWebhookEndpoint>,
    ctx: Arc<Context>,
) -> Result<Action, ReconcileError> {
    shared::reconcile_with_finalizer(endpoint, ctx, CONTROLLER, FINALIZER, apply, cleanup).await
}

/// What the controller does after a failed reconcile: record it, back off, try again.
pub fn error_policy(
    endpoint: Arc<StripeWebhookEndpoint>,
    error: &ReconcileError,
    ctx: Arc<Context>,
) -> Action {
    shared::requeue_after_error(&ctx, CONTROLLER, &endpoint.metadata, error)
}

struct Run<'a> {
    ctx: &'a Context,
    endpoint: StripeWebhookEndpoint,
    api: Api<StripeWebhookEndpoint>,
    ns: String,
    name: String,
    uid: String,
    /// The endpoint created in this reconcile and its signing secret: the store step uses them
    /// instead of replaying the create. After a crash they are gone and the replay brings them
    /// back.
    created: Option<(WebhookEndpoint, SecretString)>,
}

impl Run<'_> {
    fn new<'c>(ctx: &'c Context, endpoint: &StripeWebhookEndpoint) -> Run<'c> {
        let ns = endpoint.namespace().unwrap_or_default();
        Run {
            ctx,
            endpoint: endpoint.clone(),
            api: Api::namespaced(ctx.client.clone(), &ns),
            uid: endpoint.uid().unwrap_or_default(),
            name: endpoint.name_any(),
            ns,
            created: None,
        }
    }

    fn status(&self) -> StripeWebhookEndpointStatus {
        self.endpoint.status.clone().unwrap_or_default()
    }

    fn generation(&self) -> Option<i64> {
        self.endpoint.metadata.generation
    }

    /// Writes the status when it differs from what the object has (no write otherwise).
    async fn write_status(
        &mut self,
        status: StripeWebhookEndpointStatus,
    ) -> Result<(), ReconcileError> {
        shared::write_status(self.ctx, &self.api, &mut self.endpoint, status).await
    }

    /// Who acts, for the audit log: this endpoint and what triggered the current rotation.
    fn actor(&self) -> crate::audit::Actor {
        let rotation = self
            .endpoint
            .status
            .as_ref()
            .and_then(|s| s.rotation.as_ref());
        shared::audit_actor(KIND, &self.ns, &self.name, rotation)
    }

    async fn event(&self, type_: EventType, reason: &str, note: String) {
        self.ctx
            .publish_event(
                &self.endpoint.object_ref(&()),
                type_,
                reason,
                "Reconcile",
                note,
            )
            .await;
    }

    fn store_path(&self) -> Result<StorePath, ReconcileError> {
        Ok(StorePath::credential(
            &self.ctx.config.store_prefix,
            &self.ns,
            STORE_KIND,
            &self.name,
        )?)
    }

    fn owner(&self) -> Owner {
        Owner {
            namespace: self.ns.clone(),
            kind: KIND.into(),
            name: self.name.clone(),
            uid: self.uid.clone(),
        }
    }

    fn labels(&self) -> crate::metrics::ObjectLabels {
        crate::metrics::ObjectLabels {
            kind: KIND.into(),
            namespace: self.ns.clone(),
            name: self.name.clone(),
        }
    }

    fn set(
        &self,
        status: &mut StripeWebhookEndpointStatus,
        type_: &str,
        ok: bool,
        reason: &str,
        message: String,
    ) {
        set_condition(
            &mut status.conditions,
            type_,
            ok,
            reason,
            message,
            self.generation(),
            self.ctx.clock.now(),
        );
    }
}

async fn apply(
    endpoint: Arc<StripeWebhookEndpoint>,
    ctx: Arc<Context>,
) -> Result<Action, ReconcileError> {
    let mut run = Run::new(&ctx, &endpoint);
    // fetch
    let accounts: Api<StripeAccount> = Api::all(ctx.client.clone());
    let account = accounts.get_opt(&endpoint.spec.account_ref.name).await?;
    let labels = shared::fetch_namespace_labels(&ctx, &run.ns).await?;
    let guardrails = ctx.guardrails().await?;
    // validate
    let now = ctx.clock.now();
    let validated = match validate(&endpoint, account.as_ref(), &labels, &guardrails, now) {
        Ok(v) => v,
        Err(refusal) => return refuse(&mut run, refusal).await,
    };
    let account = account.expect("validate refuses a missing account");
    let handle = match ctx.accounts.resolve(&ctx, &account).await {
        Ok(h) => h,
        Err(e) => {
            let mut status = run.status();
            run.set(
                &mut status,
                condition_types::READY,
                false,
                &e.reason(),
                e.to_string(),
            );
            run.write_status(status).await?;
            return Err(e);
        }
    };
    let actor = run.actor();
    let handle = AccountHandle {
        client: handle.client.with_observer(ctx.call_observer(actor)),
        ..handle
    };
    let result = drive(&mut run, &validated, &handle).await;
    if let Err(e) = &result {
        record_failure(&mut run, e).await?;
    }
    result
}

/// Shows a failed step in status and as a Warning Event: `Ready=False` while no secret is
/// published, `Degraded=True` when the published one still works.
async fn record_failure(run: &mut Run<'_>, error: &ReconcileError) -> Result<(), ReconcileError> {
    if matches!(error, ReconcileError::Crash(_)) {
        return Ok(());
    }
    let mut status = run.status();
    let reason = error.reason();
    let type_ = if status.current_key.is_some() {
        condition_types::DEGRADED
    } else {
        condition_types::READY
    };
    let failing = type_ == condition_types::DEGRADED;
    let changed =
        crate::api::conditions::find(&status.conditions, type_).is_none_or(|c| c.reason != reason);
    run.set(&mut status, type_, failing, &reason, error.to_string());
    run.ctx
        .metrics
        .rotation_failures
        .get_or_create(&crate::metrics::ErrorLabels {
            controller: CONTROLLER.into(),
            reason: reason.clone(),
        })
        .inc();
    run.write_status(status).await?;
    if changed {
        run.event(EventType::Warning, &reason, error.to_string())
            .await;
    }
    Ok(())
}

async fn drive(
    run: &mut Run<'_>,
    v: &Validated,
    handle: &AccountHandle,
) -> Result<Action, ReconcileError> {
    // decide and act, a bounded number of steps per reconcile
    for _ in 0..10 {
        let now = run.ctx.clock.now();
        match decide(&run.endpoint, v, now) {
            Next::Idle => match idle(run, v, handle).await? {
                IdleOutcome::Settled(action) => return Ok(action),
                IdleOutcome::Recreate => {
                    start_rotation(run, RotationTrigger::Recreate).await?;
                }
            },
            Next::Start(trigger) => start_rotation(run, trigger).await?,
            Next::Continue(phase) => {
                // An incident reported while a routine rotation runs takes over that rotation.
                if let Some((value, RotationTrigger::Incident)) = pending_request(&run.endpoint) {
                    escalate_to_incident(run, value).await?;
                    continue;
                }
                match step(run, v, handle, phase).await? {
                    StepOutcome::Continue => {}
                    StepOutcome::Wait(after) => return Ok(Action::requeue(after)),
                }
            }
        }
    }
    Ok(Action::requeue(Duration::from_secs(1)))
}

async fn refuse(run: &mut Run<'_>, refusal: Refusal) -> Result<Action, ReconcileError> {
    let mut status = run.status();
    let changed = crate::api::conditions::find(&status.conditions, condition_types::READY)
        .is_none_or(|c| {
            c.reason != refusal.reason || c.message != refusal.message || c.status != "False"
        });
    run.set(
        &mut status,
        condition_types::READY,
        false,
        refusal.reason,
        refusal.message.clone(),
    );
    status.observed_generation = run.generation();
    run.write_status(status).await?;
    if changed {
        run.event(EventType::Warning, refusal.reason, refusal.message)
            .await;
    }
    // The account and guardrail watches bring the endpoint back when they change.
    Ok(Action::requeue(Duration::from_secs(300)))
}

async fn start_rotation(run: &mut Run<'_>, trigger: RotationTrigger) -> Result<(), ReconcileError> {
    let now = run.ctx.clock.now();
    let mut status = run.status();
    let number = status.rotation_number.unwrap_or(0) + 1;
    if let Some((value, _)) = pending_request(&run.endpoint)
        && matches!(
            trigger,
            RotationTrigger::Annotation | RotationTrigger::Incident
        )
    {
        status.last_handled_rotate_request = Some(value);
    }
    // The settings are fixed now: a replay of the create sends exactly these.
    status.pending_endpoint = Some(desired_settings(&run.endpoint, number));
    status.rotation = Some(RotationState {
        phase: RotationPhase::Minting,
        number,
        trigger,
        started_at: time(now),
        idempotency_key: idempotency_key(&run.uid, number as u64, "create-endpoint"),
        new_key: None,
        rolled_out_at: None,
        permissions: Vec::new(),
        connect_permissions: Vec::new(),
    });
    status.last_rotation_trigger = Some(trigger);
    let reason = if trigger == RotationTrigger::Incident {
        "IncidentRotation"
    } else {
        "Rotating"
    };
    run.set(
        &mut status,
        condition_types::ROTATING,
        true,
        reason,
        format!("rotation {number} ({trigger:?}) started"),
    );
    status.observed_generation = run.generation();
    run.write_status(status).await?;
    match trigger {
        RotationTrigger::Incident => {
            run.event(
                EventType::Warning,
                "IncidentRotation",
                format!(
                    "incident rotation {number} started: the current endpoint will be deleted at once"
                ),
            )
            .await
        }
        RotationTrigger::Recreate => {
            run.event(
                EventType::Warning,
                "EndpointMissing",
                format!(
                    "the endpoint was deleted at Stripe: rotation {number} creates a new one with a new signing secret"
                ),
            )
            .await
        }
        RotationTrigger::Initial => {}
        _ => {
            run.event(
                EventType::Normal,
                "RotationStarted",
                format!("rotation {number} ({trigger:?}) started"),
            )
            .await
        }
    }
    info!(number, ?trigger, "rotation started");
    Ok(())
}

async fn escalate_to_incident(run: &mut Run<'_>, value: String) -> Result<(), ReconcileError> {
    let mut status = run.status();
    let Some(rotation) = status.rotation.as_mut() else {
        return Ok(());
    };
    rotation.trigger = RotationTrigger::Incident;
    // The new secret is stored (and maybe published) already: the old endpoint goes now, and
    // the Secret is written again without its secret.
    if matches!(
        rotation.phase,
        RotationPhase::Syncing | RotationPhase::RollingOut | RotationPhase::Overlapping
    ) {
        rotation.phase = RotationPhase::Expiring;
    }
    let number = rotation.number;
    status.last_handled_rotate_request = Some(value);
    status.last_rotation_trigger = Some(RotationTrigger::Incident);
    run.set(
        &mut status,
        condition_types::ROTATING,
        true,
        "IncidentRotation",
        format!("rotation {number} escalated to an incident"),
    );
    run.write_status(status).await?;
    run.event(
        EventType::Warning,
        "IncidentRotation",
        format!(
            "rotation {number} escalated to an incident: the previous endpoint is deleted at once"
        ),
    )
    .await;
    Ok(())
}

enum StepOutcome {
    Continue,
    Wait(Duration),
}

async fn step(
    run: &mut Run<'_>,
    v: &Validated,
    handle: &AccountHandle,
    phase: RotationPhase,
) -> Result<StepOutcome, ReconcileError> {
    match phase {
        RotationPhase::Minting => create(run, handle).await,
        RotationPhase::Storing => store(run, handle).await,
        RotationPhase::Syncing => sync_secret_step(run).await,
        RotationPhase::RollingOut => roll_out(run).await,
        RotationPhase::Overlapping => overlap(run, v).await,
        RotationPhase::Expiring => delete_previous(run, handle).await,
        RotationPhase::Idle => {
            let mut status = run.status();
            status.rotation = None;
            run.write_status(status).await?;
            Ok(StepOutcome::Continue)
        }
    }
}

fn rotation_of(status: &StripeWebhookEndpointStatus) -> RotationState {
    status
        .rotation
        .clone()
        .expect("called only while a rotation is recorded")
}

/// Creates the endpoint (or replays the create: same idempotency key, same parameters, same
/// endpoint and secret).
async fn create_endpoint(
    run: &Run<'_>,
    handle: &AccountHandle,
    rotation: &RotationState,
) -> Result<(WebhookEndpoint, SecretString), ReconcileError> {
    let status = run.status();
    let settings = status
        .pending_endpoint
        .clone()
        .unwrap_or_else(|| desired_settings(&run.endpoint, rotation.number));
    let response = handle
        .client
        .create_webhook_endpoint(&create_params(&settings), &rotation.idempotency_key)
        .await?;
    let mut endpoint = response.value;
    let secret = endpoint
        .secret
        .take()
        .ok_or_else(|| ReconcileError::MissingSecret {
            key_id: endpoint.id.clone(),
            message: "the create response carried no signing secret".into(),
        })?;
    Ok((endpoint, secret))
}

async fn create(run: &mut Run<'_>, handle: &AccountHandle) -> Result<StepOutcome, ReconcileError> {
    let mut status = run.status();
    let mut rotation = rotation_of(&status);
    let (endpoint, secret) = create_endpoint(run, handle, &rotation).await?;
    run.ctx
        .metrics
        .keys_minted
        .get_or_create(&crate::metrics::ControllerLabels {
            controller: CONTROLLER.into(),
        })
        .inc();
    run.ctx.crash_point("minted")?;
    rotation.new_key = Some(KeyStatus {
        id: endpoint.id.clone(),
        fingerprint: secret.fingerprint(),
        created: ts_from_unix(endpoint.created),
        expires_at: None,
    });
    rotation.phase = RotationPhase::Storing;
    status.rotation = Some(rotation);
    run.write_status(status).await?;
    run.event(
        EventType::Normal,
        "EndpointCreated",
        format!(
            "created webhook endpoint {} (secret fingerprint {})",
            endpoint.id,
            secret.fingerprint()
        ),
    )
    .await;
    run.created = Some((endpoint, secret));
    Ok(StepOutcome::Continue)
}

async fn store(run: &mut Run<'_>, handle: &AccountHandle) -> Result<StepOutcome, ReconcileError> {
    let mut status = run.status();
    let mut rotation = rotation_of(&status);
    let mut new_key = rotation
        .new_key
        .clone()
        .expect("Storing records the new endpoint");
    let path = run.store_path()?;
    // Write the bundle unless an earlier attempt already did (the store is the source of truth).
    for attempt in 0..3 {
        let existing = run.ctx.store.read_bundle(&path).await?;
        if existing
            .as_ref()
            .is_some_and(|b| b.value.current.key_id == new_key.id)
        {
            break;
        }
        let (endpoint, secret) = match run.created.take() {
            Some((endpoint, secret)) if endpoint.id == new_key.id => (endpoint, secret),
            _ => create_endpoint(run, handle, &rotation).await?,
        };
        if endpoint.id != new_key.id || secret.fingerprint() != new_key.fingerprint {
            // The replay came after Stripe forgot the idempotency key (more than 24 h) and made
            // a second endpoint: the first one's secret is lost, so keep the second and delete
            // the first.
            warn!(
                lost = %new_key.id,
                kept = %endpoint.id,
                "the replayed create returned another endpoint; deleting the one whose secret is lost"
            );
            delete_endpoint(handle, &new_key.id).await?;
            new_key = KeyStatus {
                id: endpoint.id.clone(),
                fingerprint: secret.fingerprint(),
                created: ts_from_unix(endpoint.created),
                expires_at: None,
            };
            rotation.new_key = Some(new_key.clone());
        }
        let material = KeyMaterial::new(secret, new_key.id.clone());
        let keeps_previous = matches!(
            rotation.trigger,
            RotationTrigger::Annotation | RotationTrigger::Schedule | RotationTrigger::SpecChange
        );
        let bundle = match &existing {
            Some(b) if keeps_previous => CredentialBundle {
                rotation: rotation.number as u64,
                ..b.value.rotated(material)
            },
            _ => CredentialBundle {
                rotation: rotation.number as u64,
                ..CredentialBundle::initial(run.owner(), material)
            },
        };
        let cas = Cas::after_read(existing.as_ref().map(|b| b.version));
        match run.ctx.store.write_bundle(&path, &bundle, cas).await {
            Ok(_) => {
                run.ctx.audit.record(
                    crate::audit::AuditEntry::store_write(run.actor(), path.as_str())
                        .key(&bundle.current.key_id, &bundle.current.fingerprint)
                        .success(),
                );
                run.ctx.crash_point("stored")?;
                break;
            }
            Err(e) if e.is_conflict() && attempt < 2 => continue,
            Err(e) => return Err(e.into()),
        }
    }
    let now = run.ctx.clock.now();
    match rotation.trigger {
        RotationTrigger::Initial => {}
        // The old endpoint is gone at Stripe: nothing to retire.
        RotationTrigger::Recreate => status.previous_key = None,
        _ => status.previous_key = status.current_key.take(),
    }
    let settings = status.pending_endpoint.take();
    status.current_api_version = settings.as_ref().and_then(|s| s.api_version.clone());
    status.current_connect = Some(settings.is_some_and(|s| s.connect));
    status.current_key = Some(new_key);
    status.last_rotation_at = Some(time(now));
    status.rotation_number = Some(rotation.number);
    rotation.phase = if rotation.trigger == RotationTrigger::Incident {
        RotationPhase::Expiring
    } else {
        RotationPhase::Syncing
    };
    status.rotation = Some(rotation);
    run.write_status(status).await?;
    Ok(StepOutcome::Continue)
}

/// Writes the Secret from the store's bundle, when it differs from what the cluster holds.
async fn sync_secret(run: &Run<'_>) -> Result<bool, ReconcileError> {
    let path = run.store_path()?;
    let Some(bundle) = run.ctx.store.read_bundle(&path).await? else {
        return Ok(false);
    };
    let bundle = bundle.value;
    let delivery = &run.endpoint.spec.delivery.secret;
    let status = run.status();
    // The previous secret is published only while status says its endpoint still exists.
    let previous = bundle.previous.as_ref().filter(|p| {
        status
            .previous_key
            .as_ref()
            .is_some_and(|k| k.id == p.key_id)
    });
    let all = secrets_list(&bundle.current.secret, previous.map(|p| &p.secret));
    let entries = [
        SecretEntry {
            key: delivery.key_name(),
            value: &bundle.current.secret,
        },
        SecretEntry {
            key: delivery.all_key_name(),
            value: &all,
        },
    ];
    let owner = run
        .endpoint
        .controller_owner_ref(&())
        .expect("an endpoint from the API has a name and uid");
    let desired = inject::build_secret(
        &delivery.name,
        &run.ns,
        owner,
        &bundle.current.key_id,
        &bundle.current.fingerprint,
        &entries,
    );
    let written = shared::write_secret_if_changed(run.ctx, &run.ns, &run.uid, &desired).await?;
    if written {
        run.ctx.audit.record(
            crate::audit::AuditEntry::secret_sync(run.actor(), &run.ns, &delivery.name)
                .key(&bundle.current.key_id, &bundle.current.fingerprint)
                .success(),
        );
    }
    Ok(written)
}

async fn sync_secret_step(run: &mut Run<'_>) -> Result<StepOutcome, ReconcileError> {
    sync_secret(run).await?;
    run.ctx.crash_point("synced")?;
    let mut status = run.status();
    let mut rotation = rotation_of(&status);
    rotation.phase = RotationPhase::RollingOut;
    status.rotation = Some(rotation);
    run.write_status(status).await?;
    let fp = run
        .status()
        .current_key
        .map(|k| k.fingerprint)
        .unwrap_or_default();
    run.event(
        EventType::Normal,
        "SecretSynced",
        format!(
            "Secret {} holds the signing secret with fingerprint {fp}",
            run.endpoint.spec.delivery.secret.name
        ),
    )
    .await;
    Ok(StepOutcome::Continue)
}

async fn roll_targets(run: &Run<'_>, fingerprint: &str) -> Result<Vec<String>, ReconcileError> {
    let reference = run.endpoint.object_ref(&());
    let source = shared::RolloutSource {
        kind: KIND,
        name: &run.name,
        namespace: &run.ns,
        reference: &reference,
    };
    shared::roll_targets(
        run.ctx,
        &source,
        &run.endpoint.spec.delivery.rollout_targets,
        fingerprint,
    )
    .await
}

fn current_fingerprint(status: &StripeWebhookEndpointStatus) -> String {
    status
        .current_key
        .as_ref()
        .map(|k| k.fingerprint.clone())
        .unwrap_or_default()
}

async fn roll_out(run: &mut Run<'_>) -> Result<StepOutcome, ReconcileError> {
    let now = run.ctx.clock.now();
    let mut status = run.status();
    let mut rotation = rotation_of(&status);
    let fp = current_fingerprint(&status);
    let pending = roll_targets(run, &fp).await?;
    let elapsed =
        Duration::try_from(now.duration_since(rotation.started_at.0)).unwrap_or(Duration::ZERO);
    if !pending.is_empty() && elapsed < run.ctx.config.rollout_ceiling {
        return Ok(StepOutcome::Wait(run.ctx.config.rollout_poll));
    }
    if !pending.is_empty() {
        let message = format!(
            "rollout did not finish within {}: {}; the rotation continues",
            humantime::format_duration(run.ctx.config.rollout_ceiling),
            pending.join("; ")
        );
        run.set(
            &mut status,
            condition_types::DEGRADED,
            true,
            "RolloutStuck",
            message.clone(),
        );
        run.event(EventType::Warning, "RolloutStuck", message).await;
    } else {
        run.set(
            &mut status,
            condition_types::DEGRADED,
            false,
            "RolloutComplete",
            "every rollout target runs the current secret".into(),
        );
    }
    rotation.rolled_out_at = Some(time(now));
    // Initial and recreated endpoints have nothing to retire; an incident deletes the old
    // endpoint before publishing (or right now, if it escalated after the publish).
    rotation.phase = match (&status.previous_key, rotation.trigger) {
        (None, _) => RotationPhase::Idle,
        (Some(_), RotationTrigger::Incident) => RotationPhase::Expiring,
        (Some(_), _) => RotationPhase::Overlapping,
    };
    if rotation.phase == RotationPhase::Idle {
        finish(run, status, rotation).await?;
    } else {
        status.rotation = Some(rotation);
        run.write_status(status).await?;
    }
    Ok(StepOutcome::Continue)
}

async fn overlap(run: &mut Run<'_>, v: &Validated) -> Result<StepOutcome, ReconcileError> {
    let now = run.ctx.clock.now();
    let mut status = run.status();
    let mut rotation = rotation_of(&status);
    let rolled = rotation.rolled_out_at.as_ref().map(|t| t.0).unwrap_or(now);
    let ends = rolled
        .checked_add(SignedDuration::try_from(v.overlap).unwrap_or(SignedDuration::ZERO))
        .unwrap_or(now);
    if now < ends {
        if let Some(prev) = status.previous_key.as_mut()
            && prev.expires_at.is_none()
        {
            prev.expires_at = Some(time(ends));
            run.write_status(status).await?;
        }
        return Ok(StepOutcome::Wait(
            until(now, ends).max(Duration::from_secs(1)),
        ));
    }
    rotation.phase = RotationPhase::Expiring;
    status.rotation = Some(rotation);
    run.write_status(status).await?;
    Ok(StepOutcome::Continue)
}

/// Deletes an endpoint; one that is gone already counts as deleted.
async fn delete_endpoint(handle: &AccountHandle, id: &str) -> Result<(), ReconcileError> {
    match handle.client.delete_webhook_endpoint(id).await {
        Ok(_) => Ok(()),
        Err(e) if e.is_not_found() => Ok(()),
        Err(e) => Err(e.into()),
    }
}

async fn delete_previous(
    run: &mut Run<'_>,
    handle: &AccountHandle,
) -> Result<StepOutcome, ReconcileError> {
    let mut status = run.status();
    let mut rotation = rotation_of(&status);
    if let Some(previous) = status.previous_key.clone() {
        delete_endpoint(handle, &previous.id).await?;
        run.ctx.crash_point("expired")?;
        run.event(
            if rotation.trigger == RotationTrigger::Incident {
                EventType::Warning
            } else {
                EventType::Normal
            },
            "EndpointDeleted",
            format!(
                "deleted webhook endpoint {} (secret fingerprint {}) at Stripe",
                previous.id, previous.fingerprint
            ),
        )
        .await;
    }
    // Drop the previous secret from the store (one CAS write) and from the status.
    let path = run.store_path()?;
    for attempt in 0..3 {
        let Some(existing) = run.ctx.store.read_bundle(&path).await? else {
            break;
        };
        if existing.value.previous.is_none() {
            break;
        }
        match run
            .ctx
            .store
            .write_bundle(
                &path,
                &existing.value.without_previous(),
                Cas::Version(existing.version),
            )
            .await
        {
            Ok(_) => {
                run.ctx.audit.record(
                    crate::audit::AuditEntry::store_write(run.actor(), path.as_str())
                        .key(
                            &existing.value.current.key_id,
                            &existing.value.current.fingerprint,
                        )
                        .detail("previous_dropped", true)
                        .success(),
                );
                break;
            }
            Err(e) if e.is_conflict() && attempt < 2 => continue,
            Err(e) => return Err(e.into()),
        }
    }
    status.previous_key = None;
    sweep_orphans(run, handle, &status).await?;
    if rotation.trigger == RotationTrigger::Incident && rotation.rolled_out_at.is_none() {
        // Incident: the old endpoint is gone; now publish and roll the new secret.
        rotation.phase = RotationPhase::Syncing;
        status.rotation = Some(rotation);
        run.write_status(status).await?;
        return Ok(StepOutcome::Continue);
    }
    run.write_status(status.clone()).await?;
    sync_secret(run).await?;
    finish(run, status, rotation).await?;
    Ok(StepOutcome::Continue)
}

/// Endpoints marked with this resource's UID that status does not know (a create whose answer
/// was lost beyond the idempotency window) are deleted. Endpoints without the operator's
/// metadata are never touched.
async fn sweep_orphans(
    run: &Run<'_>,
    handle: &AccountHandle,
    status: &StripeWebhookEndpointStatus,
) -> Result<(), ReconcileError> {
    let known: Vec<&str> = [
        status.current_key.as_ref(),
        status.previous_key.as_ref(),
        status.rotation.as_ref().and_then(|r| r.new_key.as_ref()),
    ]
    .into_iter()
    .flatten()
    .map(|k| k.id.as_str())
    .collect();
    let endpoints = handle.client.list_all_webhook_endpoints(100).await?;
    for ep in endpoints.items {
        let ours = ep.metadata.get(META_MANAGED_BY).map(String::as_str)
            == Some(crate::api::MANAGED_BY)
            && ep.metadata.get(META_UID) == Some(&run.uid);
        if ours && !known.contains(&ep.id.as_str()) {
            delete_endpoint(handle, &ep.id).await?;
            run.event(
                EventType::Warning,
                "OrphanEndpointDeleted",
                format!(
                    "deleted orphaned webhook endpoint {} that this resource created but never published",
                    ep.id
                ),
            )
            .await;
        }
    }
    Ok(())
}

async fn finish(
    run: &mut Run<'_>,
    mut status: StripeWebhookEndpointStatus,
    rotation: RotationState,
) -> Result<(), ReconcileError> {
    status.rotation = None;
    let message = format!(
        "rotation {} ({:?}) complete",
        rotation.number, rotation.trigger
    );
    run.set(
        &mut status,
        condition_types::ROTATING,
        false,
        "RotationComplete",
        message.clone(),
    );
    run.write_status(status).await?;
    run.ctx
        .metrics
        .rotations
        .get_or_create(&crate::metrics::RotationLabels {
            kind: KIND.into(),
            trigger: format!("{:?}", rotation.trigger),
        })
        .inc();
    run.event(EventType::Normal, "RotationComplete", message)
        .await;
    Ok(())
}

enum IdleOutcome {
    Settled(Action),
    /// The current endpoint is gone at Stripe.
    Recreate,
}

/// Compares the endpoint at Stripe with the spec and puts back what drifted.
async fn check_drift(
    run: &mut Run<'_>,
    handle: &AccountHandle,
    now: Timestamp,
) -> Result<Option<IdleOutcome>, ReconcileError> {
    let mut status = run.status();
    let Some(current) = status.current_key.clone() else {
        return Ok(None);
    };
    let actual = match handle.client.retrieve_webhook_endpoint(&current.id).await {
        Ok(r) => r.value,
        Err(e) if e.is_not_found() => {
            warn!(endpoint = %current.id, "the endpoint was deleted at Stripe");
            return Ok(Some(IdleOutcome::Recreate));
        }
        Err(e) => return Err(e.into()),
    };
    let desired = desired_settings(&run.endpoint, status.rotation_number.unwrap_or(1));
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

/// Steady state: keep Stripe's side (on the drift schedule), the Secret and the targets as
/// declared, keep status current, requeue for the next check or rotation. Writes nothing when
/// nothing changed.
async fn idle(
    run: &mut Run<'_>,
    v: &Validated,
    handle: &AccountHandle,
) -> Result<IdleOutcome, ReconcileError> {
    let now = run.ctx.clock.now();
    if drift_check_due(&run.endpoint, v, now).is_some_and(|at| at <= now)
        && let Some(outcome) = check_drift(run, handle, now).await?
    {
        return Ok(outcome);
    }
    if sync_secret(run).await? {
        run.event(
            EventType::Normal,
            "SecretRepaired",
            format!(
                "Secret {} was missing or changed and was written again",
                run.endpoint.spec.delivery.secret.name
            ),
        )
        .await;
    }
    let mut status = run.status();
    let fp = current_fingerprint(&status);
    let pending = roll_targets(run, &fp).await?;
    let next = next_rotation_at(&run.endpoint, v);
    status.next_rotation_at = next.map(time);
    status.observed_generation = run.generation();
    let id = status
        .current_key
        .as_ref()
        .map(|k| k.id.clone())
        .unwrap_or_default();
    run.set(
        &mut status,
        condition_types::READY,
        true,
        "EndpointReady",
        format!("webhook endpoint {id} (secret fingerprint {fp}) is published"),
    );
    if status.rotation.is_none()
        && crate::api::conditions::find(&status.conditions, condition_types::ROTATING).is_none()
    {
        run.set(
            &mut status,
            condition_types::ROTATING,
            false,
            "Idle",
            "no rotation in progress".into(),
        );
    }
    if pending.is_empty() {
        run.set(
            &mut status,
            condition_types::DEGRADED,
            false,
            "RolloutComplete",
            "every rollout target runs the current secret".into(),
        );
    }
    run.write_status(status.clone()).await?;
    let labels = run.labels();
    if let Some(created) = status.last_rotation_at.as_ref() {
        let age = now.duration_since(created.0).as_secs_f64().max(0.0);
        run.ctx
            .metrics
            .key_age_seconds
            .get_or_create(&labels)
            .set(age);
    }
    let mut wait = run.ctx.config.resync;
    if let Some(at) = next {
        let d = until(now, at);
        run.ctx
            .metrics
            .next_rotation_seconds
            .get_or_create(&labels)
            .set(d.as_secs_f64());
        wait = wait.min(d);
    }
    if let Some(at) = drift_check_due(&run.endpoint, v, now) {
        wait = wait.min(until(now, at));
    }
    if !pending.is_empty() {
        return Ok(IdleOutcome::Settled(Action::requeue(
            run.ctx.config.rollout_poll,
        )));
    }
    Ok(IdleOutcome::Settled(Action::requeue(
        wait.max(Duration::from_millis(200)),
    )))
}

async fn cleanup(
    endpoint: Arc<StripeWebhookEndpoint>,
    ctx: Arc<Context>,
) -> Result<Action, ReconcileError> {
    let run = Run::new(&ctx, &endpoint);
    let status = run.status();
    let accounts: Api<StripeAccount> = Api::all(ctx.client.clone());
    match accounts.get_opt(&endpoint.spec.account_ref.name).await? {
        Some(account) => {
            let handle = ctx.accounts.resolve(&ctx, &account).await?;
            let observer = ctx.call_observer(
                crate::audit::Actor::resource(KIND, Some(&ns_of(&endpoint)), endpoint.name_any())
                    .triggered_by("Delete"),
            );
            let handle = AccountHandle {
                client: handle.client.with_observer(observer),
                ..handle
            };
            let ours: Vec<KeyStatus> = [
                status.current_key.clone(),
                status.previous_key.clone(),
                status.rotation.as_ref().and_then(|r| r.new_key.clone()),
            ]
            .into_iter()
            .flatten()
            .collect();
            for k in &ours {
                delete_endpoint(&handle, &k.id).await?;
                run.event(
                    EventType::Normal,
                    "EndpointDeleted",
                    format!(
                        "deleted webhook endpoint {} (secret fingerprint {}) because the resource is deleted",
                        k.id, k.fingerprint
                    ),
                )
                .await;
            }
            // A create in flight whose answer was never recorded is found by its metadata.
            let empty = StripeWebhookEndpointStatus::default();
            sweep_orphans(&run, &handle, &empty).await?;
        }
        None => {
            warn!("the StripeAccount is gone: the endpoints cannot be deleted at Stripe")
        }
    }
    let path = run.store_path()?;
    ctx.store.delete(&path).await?;
    ctx.audit.record(
        crate::audit::AuditEntry::store_delete(
            crate::audit::Actor::resource(KIND, Some(&ns_of(&endpoint)), endpoint.name_any())
                .triggered_by("Delete"),
            path.as_str(),
        )
        .success(),
    );
    ctx.metrics.forget_object(&run.labels());
    info!("webhook endpoint resource deleted: endpoints and store entry removed");
    Ok(Action::await_change())
}

fn ns_of(endpoint: &StripeWebhookEndpoint) -> String {
    endpoint.namespace().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::StripeWebhookEndpointSpec;
    use serde_json::json;

    fn endpoint(
        spec: serde_json::Value,
        status: Option<serde_json::Value>,
        annotations: serde_json::Value,
    ) -> StripeWebhookEndpoint {
        let mut e = StripeWebhookEndpoint::new(
            "orders",
            serde_json::from_value::<StripeWebhookEndpointSpec>(spec).unwrap(),
        );
        e.metadata.namespace = Some("shop".into());
        e.metadata.uid = Some("uid-1".into());
        e.metadata.generation = Some(1);
        e.metadata.annotations = serde_json::from_value(annotations).unwrap();
        e.status = status.map(|s| serde_json::from_value(s).unwrap());
        e
    }

    fn spec() -> serde_json::Value {
        json!({"accountRef": {"name": "acct"}, "url": "https://hooks.example.com/stripe",
               "enabledEvents": ["charge.succeeded"], "metadata": {"team": "pay"},
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

    fn guardrail(spec: serde_json::Value) -> crate::api::StripeGuardrail {
        serde_json::from_value(json!({
            "apiVersion": "stripekeys.io/v1alpha1", "kind": "StripeGuardrail", "metadata": {"name": "g"},
            "spec": spec
        }))
        .unwrap()
    }

    fn now() -> Timestamp {
        "2026-06-01T00:00:00Z".parse().unwrap()
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
        let e = endpoint(spec(), None, json!(null));
        let labels = BTreeMap::new();
        assert_eq!(
            validate(&e, None, &labels, &[], now()).unwrap_err().reason,
            "AccountNotFound"
        );
        let narrow = account(json!({"matchLabels": {"team": "pay"}}), "test");
        assert_eq!(
            validate(&e, Some(&narrow), &labels, &[], now())
                .unwrap_err()
                .reason,
            "NamespaceNotAllowed"
        );
        let open = account(json!({}), "test");
        let hosts = guardrail(
            json!({"namespaceSelector": {}, "allowedWebhookHosts": ["*.internal.example.com"]}),
        );
        let refusal = validate(&e, Some(&open), &labels, &[hosts], now()).unwrap_err();
        assert_eq!(refusal.reason, "GuardrailViolation");
        assert!(
            refusal.message.contains("hooks.example.com"),
            "{}",
            refusal.message
        );
        let no_live = guardrail(json!({"namespaceSelector": {}, "allowLiveMode": false}));
        let live = account(json!({}), "live");
        assert_eq!(
            validate(&e, Some(&live), &labels, &[no_live], now())
                .unwrap_err()
                .reason,
            "GuardrailViolation"
        );
        let max_overlap = guardrail(json!({"namespaceSelector": {}, "maxOverlap": "30m"}));
        assert!(
            validate(&e, Some(&open), &labels, &[max_overlap], now())
                .unwrap_err()
                .message
                .contains("overlap")
        );
        let mut long = spec();
        long["rotation"]["overlap"] = json!("25h");
        assert_eq!(
            validate(
                &endpoint(long, None, json!(null)),
                Some(&open),
                &labels,
                &[],
                now()
            )
            .unwrap_err()
            .reason,
            "InvalidSpec"
        );
        let mut reserved = spec();
        reserved["metadata"] = json!({"stripekeys_uid": "x"});
        assert_eq!(
            validate(
                &endpoint(reserved, None, json!(null)),
                Some(&open),
                &labels,
                &[],
                now()
            )
            .unwrap_err()
            .reason,
            "InvalidSpec"
        );
        let ok = validate(&e, Some(&open), &labels, &[], now()).unwrap();
        assert_eq!(ok.overlap, Duration::from_secs(3600));
        assert_eq!(ok.drift_check_interval, Duration::from_secs(600));
        assert_eq!(ok.host, "hooks.example.com");
    }

    #[test]
    fn desired_settings_carry_the_spec_and_the_operator_metadata() {
        let e = endpoint(spec(), None, json!(null));
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
        let e = endpoint(spec(), None, json!(null));
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
        let d2 = desired_settings(&endpoint(two, None, json!(null)), 1);
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
        let labels = BTreeMap::new();
        let fresh = endpoint(spec(), None, json!(null));
        let v = validate(&fresh, Some(&open), &labels, &[], now()).unwrap();
        assert_eq!(
            decide(&fresh, &v, now()),
            Next::Start(RotationTrigger::Initial)
        );
        let steady = json!({"currentKey": {"id": "we_1", "fingerprint": "f"}, "currentConnect": false,
                            "lastRotationAt": "2026-05-31T00:00:00Z", "rotationNumber": 1,
                            "appliedGeneration": 1, "lastDriftCheckAt": "2026-05-31T23:55:00Z"});
        let e = endpoint(spec(), Some(steady.clone()), json!(null));
        assert_eq!(decide(&e, &v, now()), Next::Idle);
        let later: Timestamp = "2026-07-01T00:00:00Z".parse().unwrap();
        assert_eq!(
            decide(&e, &v, later),
            Next::Start(RotationTrigger::Schedule)
        );
        let e = endpoint(
            spec(),
            Some(steady.clone()),
            json!({"stripekeys.io/rotate": "1"}),
        );
        assert_eq!(
            decide(&e, &v, now()),
            Next::Start(RotationTrigger::Annotation)
        );
        let e = endpoint(
            spec(),
            Some(steady.clone()),
            json!({"stripekeys.io/rotate": "2", "stripekeys.io/rotate-reason": "incident"}),
        );
        assert_eq!(
            decide(&e, &v, now()),
            Next::Start(RotationTrigger::Incident)
        );
        let mut versioned = spec();
        versioned["apiVersion"] = json!("2024-06-20");
        let e = endpoint(versioned, Some(steady.clone()), json!(null));
        assert_eq!(
            decide(&e, &v, now()),
            Next::Start(RotationTrigger::SpecChange)
        );
        let mut connect = spec();
        connect["connect"] = json!(true);
        let e = endpoint(connect, Some(steady.clone()), json!(null));
        assert_eq!(
            decide(&e, &v, now()),
            Next::Start(RotationTrigger::SpecChange)
        );
        // A url change is not a rotation: the drift check applies it.
        let mut moved = spec();
        moved["url"] = json!("https://hooks.example.com/v2");
        let e = endpoint(moved, Some(steady.clone()), json!(null));
        assert_eq!(decide(&e, &v, now()), Next::Idle);
    }

    #[test]
    fn drift_checks_are_due_after_the_interval_or_a_spec_change() {
        let open = account(json!({}), "test");
        let fresh = endpoint(spec(), None, json!(null));
        let v = validate(&fresh, Some(&open), &BTreeMap::new(), &[], now()).unwrap();
        let checked = json!({"currentKey": {"id": "we_1", "fingerprint": "f"}, "appliedGeneration": 1,
                             "lastDriftCheckAt": "2026-05-31T23:55:00Z"});
        let e = endpoint(spec(), Some(checked.clone()), json!(null));
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
