//! The StripeKeyPolicy controller: mint, store, publish, roll out and rotate restricted keys.
//!
//! Reconcile is a named pipeline (fetch → validate → decide → apply → status). A rotation is a
//! state machine recorded in `status.rotation` *before* each external side effect:
//!
//! ```text
//! routine:  Minting → Storing → Syncing → RollingOut → Overlapping → Expiring → (idle)
//! initial:  Minting → Storing → Syncing → RollingOut → (idle)
//! incident: Minting → Storing → Expiring → Syncing → RollingOut → (idle)
//! ```
//!
//! A restart resumes the recorded phase. The mint carries an idempotency key derived from the
//! policy UID and the rotation number, so replaying it returns the same key (and its secret)
//! instead of minting a second one; every other step is idempotent by construction.

use std::collections::BTreeMap;
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
use super::shared;
pub use super::shared::Refusal;
use super::shared::{time, ts_from_chrono};
use crate::api::conditions::set_condition;
use crate::api::permissions;
use crate::api::{
    DEFAULT_KEY_OVERLAP, KeyStatus, ROTATE_ANNOTATION, ROTATE_REASON_ANNOTATION,
    ROTATE_REASON_INCIDENT, RotationPhase, RotationState, RotationTrigger, StripeAccount,
    StripeKeyPolicy, StripeKeyPolicyStatus, condition_types,
};
use crate::inject::{self, SecretEntry};
use crate::rotation::schedule::{Schedule, parse_duration, until};
use crate::rules;
use crate::secret::SecretString;
use crate::stripe::{ApiKeyType, CreateApiKeyParams, ListApiKeysParams, idempotency_key};
use crate::vault::{Cas, CredentialBundle, KeyMaterial, Owner, StorePath};

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
                policy.namespace().unwrap_or_default()
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
        permissions: permissions::normalized(&spec.permissions),
        connect_permissions: permissions::normalized(&spec.connect_permissions),
        schedule,
        overlap,
        revoke_on_delete: rotation.and_then(|r| r.revoke_on_delete).unwrap_or(true),
    })
}

/// A rotation request carried by the annotations, if it was not handled yet.
pub fn pending_request(policy: &StripeKeyPolicy) -> Option<(String, RotationTrigger)> {
    let annotations = policy.annotations();
    let value = annotations.get(ROTATE_ANNOTATION)?.trim().to_string();
    if value.is_empty() {
        return None;
    }
    let handled = policy
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

/// What the policy needs next.
#[derive(Debug, Clone, PartialEq)]
pub enum Next {
    /// Start a rotation.
    Start(RotationTrigger),
    /// Carry on with the recorded phase.
    Continue(RotationPhase),
    /// Nothing to do until `next_rotation_at` (if any).
    Idle,
}

/// The next rotation of the current key, from the schedule (stable: seeded by UID and number).
pub fn next_rotation_at(policy: &StripeKeyPolicy, v: &Validated) -> Option<Timestamp> {
    let status = policy.status.as_ref()?;
    let last = status.last_rotation_at.as_ref()?.0;
    let seed = format!(
        "{}/{}",
        policy.uid().unwrap_or_default(),
        status.rotation_number.unwrap_or(0)
    );
    v.schedule.as_ref()?.next_rotation(last, &seed).ok()
}

/// Decides the next step. Pure.
pub fn decide(policy: &StripeKeyPolicy, v: &Validated, now: Timestamp) -> Next {
    let status = policy.status.clone().unwrap_or_default();
    if let Some(rotation) = &status.rotation {
        return Next::Continue(rotation.phase);
    }
    if status.current_key.is_none() {
        return Next::Start(RotationTrigger::Initial);
    }
    if let Some((_, trigger)) = pending_request(policy) {
        return Next::Start(trigger);
    }
    if status.current_permissions != v.permissions {
        return Next::Start(RotationTrigger::SpecChange);
    }
    if next_rotation_at(policy, v).is_some_and(|at| at <= now) {
        return Next::Start(RotationTrigger::Schedule);
    }
    Next::Idle
}

/// Reconciles one policy (the entry point the `Controller` calls).
#[instrument(skip(policy, ctx), fields(namespace = %policy.namespace().unwrap_or_default(), name = %policy.name_any()))]
pub async fn reconcile(
    policy: Arc<StripeKeyPolicy>,
    ctx: Arc<Context>,
) -> Result<Action, ReconcileError> {
    shared::reconcile_with_finalizer(policy, ctx, CONTROLLER, FINALIZER, apply, cleanup).await
}

/// What the controller does after a failed reconcile: record it, back off, try again.
pub fn error_policy(
    policy: Arc<StripeKeyPolicy>,
    error: &ReconcileError,
    ctx: Arc<Context>,
) -> Action {
    shared::requeue_after_error(&ctx, CONTROLLER, &policy.metadata, error)
}

struct Run<'a> {
    ctx: &'a Context,
    policy: StripeKeyPolicy,
    api: Api<StripeKeyPolicy>,
    ns: String,
    name: String,
    uid: String,
    /// The secret minted in this reconcile (key id, secret): the store step uses it instead of
    /// replaying the create. After a crash it is gone and the replay brings it back.
    minted: Option<(String, SecretString)>,
}

impl Run<'_> {
    fn status(&self) -> StripeKeyPolicyStatus {
        self.policy.status.clone().unwrap_or_default()
    }

    /// Writes the status (server-side apply, one field manager) when it differs from what the
    /// object has, so an unchanged policy causes no write.
    async fn write_status(&mut self, status: StripeKeyPolicyStatus) -> Result<(), ReconcileError> {
        shared::write_status(self.ctx, &self.api, &mut self.policy, status).await
    }

    /// Who acts, for the audit log: this policy and what triggered the current rotation.
    fn actor(&self, status: &StripeKeyPolicyStatus) -> crate::audit::Actor {
        shared::audit_actor(KIND, &self.ns, &self.name, status.rotation.as_ref())
    }

    async fn event(&self, type_: EventType, reason: &str, note: String) {
        self.ctx
            .publish_event(
                &self.policy.object_ref(&()),
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
}

async fn apply(policy: Arc<StripeKeyPolicy>, ctx: Arc<Context>) -> Result<Action, ReconcileError> {
    let ns = policy.namespace().unwrap_or_default();
    let name = policy.name_any();
    let mut run = Run {
        ctx: &ctx,
        policy: (*policy).clone(),
        api: Api::namespaced(ctx.client.clone(), &ns),
        uid: policy.uid().unwrap_or_default(),
        minted: None,
        ns,
        name,
    };
    // fetch
    let accounts: Api<StripeAccount> = Api::all(ctx.client.clone());
    let account = accounts.get_opt(&policy.spec.account_ref.name).await?;
    let labels = shared::fetch_namespace_labels(&ctx, &run.ns).await?;
    let guardrails = ctx.guardrails().await?;
    // validate
    let now = ctx.clock.now();
    let validated = match validate(&policy, account.as_ref(), &labels, &guardrails, now) {
        Ok(v) => v,
        Err(refusal) => return refuse(&mut run, refusal).await,
    };
    let account = account.expect("validate refuses a missing account");
    let handle = match ctx.accounts.resolve(&ctx, &account).await {
        Ok(h) => h,
        Err(e) => {
            let mut status = run.status();
            set_condition(
                &mut status.conditions,
                condition_types::READY,
                false,
                &e.reason(),
                e.to_string(),
                policy.metadata.generation,
                now,
            );
            run.write_status(status).await?;
            return Err(e);
        }
    };
    let observer = ctx.call_observer(run.actor(&run.status()));
    let handle = AccountHandle {
        client: handle.client.with_observer(observer),
        ..handle
    };
    let result = drive(&mut run, &validated, &handle).await;
    if let Err(e) = &result {
        record_failure(&mut run, e).await?;
    }
    result
}

/// Shows a failed step in status and as a Warning Event: `Ready=False` while no key is published,
/// `Degraded=True` when the published key still works.
async fn record_failure(run: &mut Run<'_>, error: &ReconcileError) -> Result<(), ReconcileError> {
    if matches!(error, ReconcileError::Crash(_)) {
        return Ok(());
    }
    let now = run.ctx.clock.now();
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
    set_condition(
        &mut status.conditions,
        type_,
        failing,
        &reason,
        error.to_string(),
        run.policy.metadata.generation,
        now,
    );
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
    validated: &Validated,
    handle: &AccountHandle,
) -> Result<Action, ReconcileError> {
    let ctx = run.ctx;
    let validated = validated.clone();
    // decide and act, a bounded number of steps per reconcile
    for _ in 0..8 {
        let now = ctx.clock.now();
        match decide(&run.policy, &validated, now) {
            Next::Idle => return idle(run, &validated).await,
            Next::Start(trigger) => start_rotation(run, &validated, trigger).await?,
            Next::Continue(phase) => {
                // An incident reported while a routine rotation runs takes over that rotation.
                if let Some((value, RotationTrigger::Incident)) = pending_request(&run.policy) {
                    escalate_to_incident(run, value).await?;
                    continue;
                }
                match step(run, &validated, handle, phase).await? {
                    StepOutcome::Continue => {}
                    StepOutcome::Wait(after) => return Ok(Action::requeue(after)),
                }
            }
        }
    }
    Ok(Action::requeue(Duration::from_secs(1)))
}

async fn refuse(run: &mut Run<'_>, refusal: Refusal) -> Result<Action, ReconcileError> {
    let now = run.ctx.clock.now();
    let mut status = run.status();
    let changed = crate::api::conditions::find(&status.conditions, condition_types::READY)
        .is_none_or(|c| {
            c.reason != refusal.reason || c.message != refusal.message || c.status != "False"
        });
    set_condition(
        &mut status.conditions,
        condition_types::READY,
        false,
        refusal.reason,
        refusal.message.clone(),
        run.policy.metadata.generation,
        now,
    );
    status.observed_generation = run.policy.metadata.generation;
    run.write_status(status).await?;
    if changed {
        run.event(EventType::Warning, refusal.reason, refusal.message)
            .await;
    }
    // The account, namespace and guardrail watches bring the policy back when they change.
    Ok(Action::requeue(Duration::from_secs(300)))
}

async fn start_rotation(
    run: &mut Run<'_>,
    v: &Validated,
    trigger: RotationTrigger,
) -> Result<(), ReconcileError> {
    let now = run.ctx.clock.now();
    let mut status = run.status();
    let number = status.rotation_number.unwrap_or(0) + 1;
    if let Some((value, _)) = pending_request(&run.policy)
        && matches!(
            trigger,
            RotationTrigger::Annotation | RotationTrigger::Incident
        )
    {
        status.last_handled_rotate_request = Some(value);
    }
    status.rotation = Some(RotationState {
        phase: RotationPhase::Minting,
        number,
        trigger,
        started_at: time(now),
        idempotency_key: idempotency_key(&run.uid, number as u64, "mint"),
        new_key: None,
        rolled_out_at: None,
        permissions: v.permissions.clone(),
        connect_permissions: v.connect_permissions.clone(),
    });
    let reason = if trigger == RotationTrigger::Incident {
        "IncidentRotation"
    } else {
        "Rotating"
    };
    set_condition(
        &mut status.conditions,
        condition_types::ROTATING,
        true,
        reason,
        format!("rotation {number} ({trigger:?}) started"),
        run.policy.metadata.generation,
        now,
    );
    status.observed_generation = run.policy.metadata.generation;
    run.write_status(status).await?;
    if trigger == RotationTrigger::Incident {
        run.event(
            EventType::Warning,
            "IncidentRotation",
            format!("incident rotation {number} started: the current key will be expired at once"),
        )
        .await;
    } else if trigger != RotationTrigger::Initial {
        run.event(
            EventType::Normal,
            "RotationStarted",
            format!("rotation {number} ({trigger:?}) started"),
        )
        .await;
    }
    info!(number, ?trigger, "rotation started");
    Ok(())
}

async fn escalate_to_incident(run: &mut Run<'_>, value: String) -> Result<(), ReconcileError> {
    let now = run.ctx.clock.now();
    let mut status = run.status();
    let Some(rotation) = status.rotation.as_mut() else {
        return Ok(());
    };
    rotation.trigger = RotationTrigger::Incident;
    // The new key is in the store already (and maybe published): the old one goes now; an
    // incident that found the rotation syncing publishes and rolls the new key after expiry.
    if matches!(
        rotation.phase,
        RotationPhase::Syncing | RotationPhase::RollingOut | RotationPhase::Overlapping
    ) {
        rotation.phase = RotationPhase::Expiring;
    }
    let number = rotation.number;
    status.last_handled_rotate_request = Some(value);
    set_condition(
        &mut status.conditions,
        condition_types::ROTATING,
        true,
        "IncidentRotation",
        format!("rotation {number} escalated to an incident"),
        run.policy.metadata.generation,
        now,
    );
    run.write_status(status).await?;
    run.event(
        EventType::Warning,
        "IncidentRotation",
        format!("rotation {number} escalated to an incident: the previous key is expired at once"),
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
        RotationPhase::Minting => mint(run, handle).await,
        RotationPhase::Storing => store(run, handle).await,
        RotationPhase::Syncing => sync_secret_step(run).await,
        RotationPhase::RollingOut => roll_out(run, v).await,
        RotationPhase::Overlapping => overlap(run, v).await,
        RotationPhase::Expiring => expire_previous(run, handle).await,
        RotationPhase::Idle => {
            let mut status = run.status();
            status.rotation = None;
            run.write_status(status).await?;
            Ok(StepOutcome::Continue)
        }
    }
}

fn rotation_of(status: &StripeKeyPolicyStatus) -> RotationState {
    status
        .rotation
        .clone()
        .expect("called only while a rotation is recorded")
}

/// Creates the key (or replays the create: same idempotency key, same parameters, same key) and
/// reveals its secret.
async fn create_key(
    run: &Run<'_>,
    handle: &AccountHandle,
    rotation: &RotationState,
) -> Result<(crate::stripe::ApiKey, SecretString), ReconcileError> {
    let public_key = match &handle.keys {
        Some(keys) => Some(
            keys.public_key_param(None)
                .map_err(crate::stripe::StripeError::from)?,
        ),
        None => None,
    };
    let params = CreateApiKeyParams {
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
    };
    let response = handle
        .client
        .create_api_key(&params, &rotation.idempotency_key)
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
    Ok((key, secret))
}

async fn mint(run: &mut Run<'_>, handle: &AccountHandle) -> Result<StepOutcome, ReconcileError> {
    let mut status = run.status();
    let mut rotation = rotation_of(&status);
    let (key, secret) = create_key(run, handle, &rotation).await?;
    if let Err(message) =
        crate::stripe::verify::verify_scopes(&handle.client, &secret, &rotation.permissions).await
    {
        // Never publish a key whose scopes are wrong: expire it and start over with a new number.
        let _ = handle
            .client
            .expire_api_key(
                &key.id,
                &idempotency_key(&run.uid, rotation.number as u64, "expire-unverified"),
            )
            .await;
        rotation.number += 1;
        rotation.idempotency_key = idempotency_key(&run.uid, rotation.number as u64, "mint");
        status.rotation_number = Some(rotation.number - 1);
        status.rotation = Some(rotation);
        run.write_status(status).await?;
        return Err(ReconcileError::ScopeVerification {
            key_id: key.id,
            message,
        });
    }
    run.ctx
        .metrics
        .keys_minted
        .get_or_create(&crate::metrics::ControllerLabels {
            controller: CONTROLLER.into(),
        })
        .inc();
    run.ctx.crash_point("minted")?;
    rotation.new_key = Some(KeyStatus {
        id: key.id.clone(),
        fingerprint: secret.fingerprint(),
        created: ts_from_chrono(key.created),
        expires_at: None,
    });
    rotation.phase = RotationPhase::Storing;
    status.rotation = Some(rotation);
    run.write_status(status).await?;
    run.event(
        EventType::Normal,
        "KeyMinted",
        format!(
            "minted key {} (fingerprint {})",
            key.id,
            secret.fingerprint()
        ),
    )
    .await;
    run.minted = Some((key.id, secret));
    Ok(StepOutcome::Continue)
}

async fn store(run: &mut Run<'_>, handle: &AccountHandle) -> Result<StepOutcome, ReconcileError> {
    let mut status = run.status();
    let mut rotation = rotation_of(&status);
    let new_key = rotation
        .new_key
        .clone()
        .expect("Storing records the new key");
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
        let secret = match run.minted.take() {
            Some((id, secret)) if id == new_key.id => secret,
            _ => create_key(run, handle, &rotation).await?.1,
        };
        if secret.fingerprint() != new_key.fingerprint {
            return Err(ReconcileError::MissingSecret {
                key_id: new_key.id.clone(),
                message: "the replayed create returned a different secret".into(),
            });
        }
        let material = KeyMaterial::new(secret, new_key.id.clone());
        let incident = rotation.trigger == RotationTrigger::Incident;
        let bundle = match &existing {
            Some(b) if !incident => CredentialBundle {
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
                    crate::audit::AuditEntry::store_write(run.actor(&status), path.as_str())
                        .key(&new_key.id, &new_key.fingerprint)
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
    if rotation.trigger != RotationTrigger::Initial {
        status.previous_key = status.current_key.take();
    }
    status.current_key = Some(new_key);
    status.current_permissions = rotation.permissions.clone();
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
    let delivery = &run.policy.spec.delivery.secret;
    let status = run.status();
    // The previous key is published only while status says it is still valid.
    let previous = bundle.previous.as_ref().filter(|p| {
        status
            .previous_key
            .as_ref()
            .is_some_and(|k| k.id == p.key_id)
    });
    let mut entries = vec![SecretEntry {
        key: delivery.key_name(),
        value: &bundle.current.secret,
    }];
    if let Some(p) = previous {
        entries.push(SecretEntry {
            key: delivery.previous_key_name(),
            value: &p.secret,
        });
    }
    let owner = run
        .policy
        .controller_owner_ref(&())
        .expect("a policy from the API has a name and uid");
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
            crate::audit::AuditEntry::secret_sync(run.actor(&status), &run.ns, &delivery.name)
                .key(&bundle.current.key_id, &bundle.current.fingerprint)
                .detail("previous_published", previous.is_some())
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
            "Secret {} holds the key with fingerprint {fp}",
            run.policy.spec.delivery.secret.name
        ),
    )
    .await;
    Ok(StepOutcome::Continue)
}

/// Patches every target with the current fingerprint (when it differs) and reports the ones
/// that have not finished rolling.
async fn roll_targets(run: &Run<'_>, fingerprint: &str) -> Result<Vec<String>, ReconcileError> {
    let reference = run.policy.object_ref(&());
    let source = shared::RolloutSource {
        kind: KIND,
        name: &run.name,
        namespace: &run.ns,
        reference: &reference,
    };
    shared::roll_targets(
        run.ctx,
        &source,
        &run.policy.spec.delivery.rollout_targets,
        fingerprint,
    )
    .await
}

async fn roll_out(run: &mut Run<'_>, v: &Validated) -> Result<StepOutcome, ReconcileError> {
    let now = run.ctx.clock.now();
    let mut status = run.status();
    let mut rotation = rotation_of(&status);
    let fp = status
        .current_key
        .as_ref()
        .map(|k| k.fingerprint.clone())
        .unwrap_or_default();
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
        set_condition(
            &mut status.conditions,
            condition_types::DEGRADED,
            true,
            "RolloutStuck",
            message.clone(),
            run.policy.metadata.generation,
            now,
        );
        run.event(EventType::Warning, "RolloutStuck", message).await;
    } else {
        set_condition(
            &mut status.conditions,
            condition_types::DEGRADED,
            false,
            "RolloutComplete",
            "every rollout target runs the current key",
            run.policy.metadata.generation,
            now,
        );
    }
    rotation.rolled_out_at = Some(time(now));
    rotation.phase = match rotation.trigger {
        RotationTrigger::Initial | RotationTrigger::Incident => RotationPhase::Idle,
        _ if status.previous_key.is_none() => RotationPhase::Idle,
        _ => RotationPhase::Overlapping,
    };
    if rotation.phase == RotationPhase::Overlapping
        && let Some(prev) = status.previous_key.as_mut()
    {
        // The old key's end is known now: the overlap runs from the end of the rollout.
        let overlap = SignedDuration::try_from(v.overlap).unwrap_or(SignedDuration::ZERO);
        prev.expires_at = Some(time(now.checked_add(overlap).unwrap_or(now)));
    }
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

async fn expire_key(
    run: &Run<'_>,
    handle: &AccountHandle,
    key_id: &str,
    number: i64,
) -> Result<(), ReconcileError> {
    match handle
        .client
        .expire_api_key(
            key_id,
            &idempotency_key(&run.uid, number as u64, &format!("expire-{key_id}")),
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(e) if e.is_not_found() => Ok(()),
        Err(e)
            if e.code() == Some("api_key_expired")
                || e.status() == Some(400) && e.code() == Some("resource_already_expired") =>
        {
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

async fn expire_previous(
    run: &mut Run<'_>,
    handle: &AccountHandle,
) -> Result<StepOutcome, ReconcileError> {
    let mut status = run.status();
    let mut rotation = rotation_of(&status);
    if let Some(previous) = status.previous_key.clone() {
        expire_key(run, handle, &previous.id, rotation.number).await?;
        run.ctx.crash_point("expired")?;
        run.event(
            if rotation.trigger == RotationTrigger::Incident {
                EventType::Warning
            } else {
                EventType::Normal
            },
            "KeyExpired",
            format!(
                "expired key {} (fingerprint {}) at Stripe",
                previous.id, previous.fingerprint
            ),
        )
        .await;
    }
    // Drop the previous key from the store (one CAS write) and from the status.
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
                    crate::audit::AuditEntry::store_write(run.actor(&status), path.as_str())
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
        // Incident: the old key is dead; now publish and roll the new one.
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

/// Keys named like this policy's that status does not know (a create whose answer was lost
/// beyond the idempotency window) are expired.
async fn sweep_orphans(
    run: &Run<'_>,
    handle: &AccountHandle,
    status: &StripeKeyPolicyStatus,
) -> Result<(), ReconcileError> {
    let name = key_name(&run.ns, &run.name);
    let known: Vec<&str> = [
        status.current_key.as_ref(),
        status.previous_key.as_ref(),
        status.rotation.as_ref().and_then(|r| r.new_key.as_ref()),
    ]
    .into_iter()
    .flatten()
    .map(|k| k.id.as_str())
    .collect();
    let keys = handle
        .client
        .list_all_api_keys(&ListApiKeysParams {
            include_expired: Some(false),
            limit: Some(100),
        })
        .await?;
    let note_marker = format!("policy-uid={} ", run.uid);
    for key in keys.items {
        let ours = key.name.as_deref() == Some(name.as_str())
            && key
                .note
                .as_deref()
                .is_some_and(|n| n.starts_with(&note_marker));
        if ours
            && key.status == crate::stripe::ApiKeyStatus::Active
            && !known.contains(&key.id.as_str())
        {
            expire_key(run, handle, &key.id, status.rotation_number.unwrap_or(0)).await?;
            run.event(
                EventType::Warning,
                "OrphanKeyExpired",
                format!(
                    "expired orphaned key {} that this policy minted but never published",
                    key.id
                ),
            )
            .await;
        }
    }
    Ok(())
}

async fn finish(
    run: &mut Run<'_>,
    mut status: StripeKeyPolicyStatus,
    rotation: RotationState,
) -> Result<(), ReconcileError> {
    let now = run.ctx.clock.now();
    status.rotation = None;
    set_condition(
        &mut status.conditions,
        condition_types::ROTATING,
        false,
        "RotationComplete",
        format!(
            "rotation {} ({:?}) complete",
            rotation.number, rotation.trigger
        ),
        run.policy.metadata.generation,
        now,
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
    run.event(
        EventType::Normal,
        "RotationComplete",
        format!(
            "rotation {} ({:?}) complete",
            rotation.number, rotation.trigger
        ),
    )
    .await;
    Ok(())
}

/// Steady state: make sure the Secret and the targets match, keep status current, requeue for
/// the next rotation. Writes nothing when nothing changed.
async fn idle(run: &mut Run<'_>, v: &Validated) -> Result<Action, ReconcileError> {
    let now = run.ctx.clock.now();
    if sync_secret(run).await? {
        run.event(
            EventType::Normal,
            "SecretRepaired",
            format!(
                "Secret {} was missing or changed and was written again",
                run.policy.spec.delivery.secret.name
            ),
        )
        .await;
    }
    let mut status = run.status();
    let fp = status
        .current_key
        .as_ref()
        .map(|k| k.fingerprint.clone())
        .unwrap_or_default();
    let pending = roll_targets(run, &fp).await?;
    let next = next_rotation_at(&run.policy, v);
    status.next_rotation_at = next.map(time);
    status.observed_generation = run.policy.metadata.generation;
    let key_id = status
        .current_key
        .as_ref()
        .map(|k| k.id.clone())
        .unwrap_or_default();
    set_condition(
        &mut status.conditions,
        condition_types::READY,
        true,
        "KeyReady",
        format!("key {key_id} (fingerprint {fp}) is published"),
        run.policy.metadata.generation,
        now,
    );
    if status.rotation.is_none()
        && crate::api::conditions::find(&status.conditions, condition_types::ROTATING).is_none()
    {
        set_condition(
            &mut status.conditions,
            condition_types::ROTATING,
            false,
            "Idle",
            "no rotation in progress",
            run.policy.metadata.generation,
            now,
        );
    }
    if pending.is_empty() {
        set_condition(
            &mut status.conditions,
            condition_types::DEGRADED,
            false,
            "RolloutComplete",
            "every rollout target runs the current key",
            run.policy.metadata.generation,
            now,
        );
    }
    run.write_status(status.clone()).await?;
    let labels = crate::metrics::ObjectLabels {
        kind: KIND.into(),
        namespace: run.ns.clone(),
        name: run.name.clone(),
    };
    if let Some(created) = status.last_rotation_at.as_ref() {
        let age = now.duration_since(created.0).as_secs_f64().max(0.0);
        run.ctx
            .metrics
            .key_age_seconds
            .get_or_create(&labels)
            .set(age);
    }
    let wait = match next {
        Some(at) => {
            let d = until(now, at);
            run.ctx
                .metrics
                .next_rotation_seconds
                .get_or_create(&labels)
                .set(d.as_secs_f64());
            d.min(run.ctx.config.resync)
        }
        None => run.ctx.config.resync,
    };
    if !pending.is_empty() {
        return Ok(Action::requeue(run.ctx.config.rollout_poll));
    }
    Ok(Action::requeue(wait.max(Duration::from_millis(200))))
}

async fn cleanup(
    policy: Arc<StripeKeyPolicy>,
    ctx: Arc<Context>,
) -> Result<Action, ReconcileError> {
    let ns = policy.namespace().unwrap_or_default();
    let run = Run {
        ctx: &ctx,
        policy: (*policy).clone(),
        api: Api::namespaced(ctx.client.clone(), &ns),
        uid: policy.uid().unwrap_or_default(),
        minted: None,
        name: policy.name_any(),
        ns,
    };
    let status = run.status();
    let revoke = policy
        .spec
        .rotation
        .as_ref()
        .and_then(|r| r.revoke_on_delete)
        .unwrap_or(true);
    let accounts: Api<StripeAccount> = Api::all(ctx.client.clone());
    if revoke {
        match accounts.get_opt(&policy.spec.account_ref.name).await? {
            Some(account) => {
                let handle = ctx.accounts.resolve(&ctx, &account).await?;
                let observer = ctx.call_observer(
                    crate::audit::Actor::resource(KIND, Some(&run.ns), &run.name)
                        .triggered_by("Delete"),
                );
                let handle = AccountHandle {
                    client: handle.client.with_observer(observer),
                    ..handle
                };
                let ids: Vec<KeyStatus> = [
                    status.current_key.clone(),
                    status.previous_key.clone(),
                    status.rotation.as_ref().and_then(|r| r.new_key.clone()),
                ]
                .into_iter()
                .flatten()
                .collect();
                for k in &ids {
                    expire_key(&run, &handle, &k.id, status.rotation_number.unwrap_or(0)).await?;
                    run.event(
                        EventType::Normal,
                        "KeyExpired",
                        format!(
                            "expired key {} (fingerprint {}) because the policy is deleted",
                            k.id, k.fingerprint
                        ),
                    )
                    .await;
                }
                let empty = StripeKeyPolicyStatus::default();
                sweep_orphans(&run, &handle, &empty).await?;
            }
            None => {
                warn!("the StripeAccount is gone: the policy's keys cannot be expired at Stripe")
            }
        }
    }
    let path = run.store_path()?;
    ctx.store.delete(&path).await?;
    ctx.audit.record(
        crate::audit::AuditEntry::store_delete(
            crate::audit::Actor::resource(KIND, Some(&run.ns), &run.name).triggered_by("Delete"),
            path.as_str(),
        )
        .success(),
    );
    ctx.metrics.forget_object(&crate::metrics::ObjectLabels {
        kind: KIND.into(),
        namespace: run.ns.clone(),
        name: run.name.clone(),
    });
    info!("policy deleted: keys expired and store entry removed");
    Ok(Action::await_change())
}

#[cfg(test)]
mod tests {
    use super::*;
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
            Next::Start(RotationTrigger::Initial)
        );

        let steady = json!({"currentKey": {"id": "ak_1", "fingerprint": "f"}, "currentPermissions": ["charge_read", "refund_write"],
                            "lastRotationAt": "2026-05-31T00:00:00Z", "rotationNumber": 1});
        let p = policy(spec(), Some(steady.clone()), json!(null));
        assert_eq!(decide(&p, &v, now()), Next::Idle);
        let later: Timestamp = "2026-07-01T00:00:00Z".parse().unwrap();
        assert_eq!(
            decide(&p, &v, later),
            Next::Start(RotationTrigger::Schedule)
        );

        let p = policy(
            spec(),
            Some(steady.clone()),
            json!({"stripekeys.io/rotate": "1"}),
        );
        assert_eq!(
            decide(&p, &v, now()),
            Next::Start(RotationTrigger::Annotation)
        );
        let p = policy(
            spec(),
            Some(steady.clone()),
            json!({"stripekeys.io/rotate": "2", "stripekeys.io/rotate-reason": "incident"}),
        );
        assert_eq!(
            decide(&p, &v, now()),
            Next::Start(RotationTrigger::Incident)
        );
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
            Next::Start(RotationTrigger::SpecChange)
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
    fn key_names_carry_prefix_namespace_and_name() {
        assert_eq!(
            key_name("shop", "checkout"),
            "stripe-key-operator/shop/checkout"
        );
    }
}
