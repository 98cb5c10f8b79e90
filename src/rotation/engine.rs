//! The rotation engine: one state machine for every credential the operator hands out.
//!
//! A restricted key and a webhook endpoint share a lifecycle: mint, prove, store, publish, roll
//! out, overlap, retire. The engine owns that lifecycle (phases, status bookkeeping, incident
//! rules, retirement, orphan sweeps, Secret sync, rollout, overlap, conditions, Events, audit
//! and the finalizer); a [`Credential`] adapter answers the few questions that differ: how to
//! create one, prove it works, retire one, list the ones the resource owns, what to publish, and
//! which spec change needs a new credential.
//!
//! ```text
//! routine:  Minting → Storing → Syncing → RollingOut → Overlapping → Expiring → (idle)
//! initial:  Minting → Storing → Syncing → RollingOut → (idle)
//! incident: (retire every credential handed out) → Minting → Storing → Syncing → RollingOut → (idle)
//! ```
//!
//! Guarantees (each has a test, and the seeded simulation in `tests/rotation_simulation.rs`
//! checks them after every step of random interleavings):
//! - **An incident kills everything handed out before it.** Whatever phase it meets, an
//!   incident moves the current, the previous and any half-minted credential to
//!   `status.retiringKeys`; nothing else happens until Stripe confirms each one is dead. Then
//!   one fresh credential is minted, stored, published and rolled, and only then is the request
//!   recorded as handled. A second incident during an incident rotation does the same again.
//! - **Retiring needs no valid spec.** A refused spec (a guardrail tightened, a namespace no
//!   longer selected) still lets pending retirements and an incident's revocation happen; only
//!   minting waits for a valid spec.
//! - **No key is retired while pods may use it**, except on an incident or once the rollout
//!   ceiling (counted from the start of the rollout) has passed; a missing rollout target holds
//!   the old key like a stuck rollout.
//! - **Nothing is minted twice and nothing is lost**: each side effect is preceded by a status
//!   write naming it and carries an idempotency key derived from the resource UID and rotation
//!   number; a credential whose secret was lost (a replay after Stripe's 24 h idempotency window)
//!   is retired, never left active.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};
use tracing::{info, warn};

use crate::api::conditions::set_condition;
use crate::api::{
    CredentialStatus, KeyStatus, ROTATE_ANNOTATION, ROTATE_REASON_ANNOTATION,
    ROTATE_REASON_INCIDENT, RolloutTarget, RotationPhase, RotationSchedule, RotationState,
    RotationTrigger, StripeAccount, StripeGuardrail, condition_types,
};
use crate::controller::Context;
use crate::controller::accounts::AccountHandle;
use crate::controller::error::ReconcileError;
use crate::controller::shared::{self, Refusal, RotatingResource, time};
use crate::inject::{self, SecretEntry};
use crate::rotation::listing::{Listed, ListingKey, Need};
use crate::rotation::schedule::{Schedule, parse_duration, until};
use crate::secret::SecretString;
use crate::stripe::{StripeError, idempotency_key};
use crate::vault::{Cas, CredentialBundle, KeyMaterial, Owner, StorePath};

/// A credential just created at Stripe (or returned by a replay of its create).
pub struct Minted {
    /// Stripe's id (`ak_`/`rk_` key id or `we_` endpoint id).
    pub id: String,
    /// The secret: never logged, only fingerprinted.
    pub secret: SecretString,
    /// When Stripe created it.
    pub created: Option<Time>,
    /// The key object Stripe answered with (restricted keys: its `permissions` are checked).
    pub key: Option<Box<crate::stripe::ApiKey>>,
}

/// A credential at Stripe that the resource owns (by name, note or metadata).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owned {
    pub id: String,
    pub active: bool,
}

/// What the proof of a fresh credential found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// It does exactly what was asked.
    Good,
    /// It does not (wrong scopes): it is retired and a new one is minted.
    Wrong(String),
}

/// Usage-aware expiry settings of a resource (see `spec.rotation.usageAwareExpiry`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsageExpiry {
    /// How long a held old key must show no use before it is expired.
    pub quiet_period: Duration,
    /// How long after the rollout a held old key is expired even if still in use.
    pub max_hold: Duration,
    /// How long after its rollout a current key that shows no use is reported.
    pub unused_after: Duration,
}

/// What Stripe's usage report says about the old key at the end of an overlap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OldKeyUsage {
    /// No use since the rollout (or quiet for the quiet period): expire it.
    Quiet,
    /// Used since the rollout and not quiet yet: hold it and ask again at `next_check`.
    Held {
        last_used: Timestamp,
        next_check: Timestamp,
    },
    /// Still in use, but the hold ceiling passed: expire it anyway.
    Ceiling { last_used: Timestamp },
}

/// `t + d`, saturating at the end of time.
fn later(t: Timestamp, d: Duration) -> Timestamp {
    t.checked_add(SignedDuration::try_from(d).unwrap_or(SignedDuration::MAX))
        .unwrap_or(Timestamp::MAX)
}

/// Judges the old key's reported last use. Pure.
///
/// A use counts when it is later than the rollout plus `lag` (Stripe's reporting lag and
/// granularity: a use stamped within `lag` of the rollout may be a rolled workload's last call).
/// A counted use holds the key until Stripe can show a quiet stretch of `quiet_period`: uses in
/// the last `lag` may not show yet, so that is `last_used + quiet_period + lag`. The ceiling,
/// `rolled_out + max_hold`, ends any hold. Re-checks back off from 1 minute, doubling per check
/// (`checks` so far), to 15 minutes, never past the quiet time or the ceiling.
pub fn judge_old_key(
    rolled_out: Timestamp,
    last_used: Option<Timestamp>,
    now: Timestamp,
    lag: Duration,
    settings: &UsageExpiry,
    checks: u32,
) -> OldKeyUsage {
    let add = later;
    let threshold = add(rolled_out, lag);
    let Some(used) = last_used.filter(|u| *u > threshold) else {
        return OldKeyUsage::Quiet;
    };
    let quiet_at = add(add(used, settings.quiet_period), lag);
    if now >= quiet_at {
        return OldKeyUsage::Quiet;
    }
    let ceiling = add(rolled_out, settings.max_hold);
    if now >= ceiling {
        return OldKeyUsage::Ceiling { last_used: used };
    }
    let step = Duration::from_secs(60)
        .saturating_mul(1u32 << checks.min(10))
        .min(Duration::from_secs(15 * 60));
    OldKeyUsage::Held {
        last_used: used,
        next_check: add(now, step).min(quiet_at).min(ceiling),
    }
}

/// The names a kind uses in Events, metrics, store paths and messages.
#[derive(Debug, Clone, Copy)]
pub struct Names {
    /// The Kubernetes kind (`StripeKeyPolicy`).
    pub kind: &'static str,
    /// The controller label of metrics and the store path kind segment (`stripekeypolicy`).
    pub controller: &'static str,
    /// The store path kind segment (the same).
    pub store_kind: &'static str,
    /// The finalizer guarding the credentials at Stripe.
    pub finalizer: &'static str,
    /// What the credential is called in messages (`key`, `webhook endpoint`).
    pub noun: &'static str,
    /// What it is called in reasons (`Key`, `Endpoint`).
    subject: &'static str,
    /// The reason verb of a fresh one (`Minted`, `Created`).
    made: &'static str,
    /// The reason verb of a retired one (`Expired`, `Deleted`).
    gone: &'static str,
}

impl Names {
    /// A kind's names: `[kind, store kind (also the metrics label), finalizer, noun]`, and the
    /// words its reasons are made of: `[subject, made, gone]` (`KeyMinted`, `KeyExpired`,
    /// `OrphanKeyExpired`, `KeyReady`, `KeyMissing`).
    pub const fn new(
        [kind, store_kind, finalizer, noun]: [&'static str; 4],
        [subject, made, gone]: [&'static str; 3],
    ) -> Names {
        Names {
            kind,
            controller: store_kind,
            store_kind,
            finalizer,
            noun,
            subject,
            made,
            gone,
        }
    }

    /// Event reason of a fresh credential (`KeyMinted`, `EndpointCreated`).
    pub fn minted_reason(&self) -> String {
        format!("{}{}", self.subject, self.made)
    }

    /// Event reason of a retired credential (`KeyExpired`, `EndpointDeleted`).
    pub fn retired_reason(&self) -> String {
        format!("{}{}", self.subject, self.gone)
    }

    /// Event reason of a retired orphan (`OrphanKeyExpired`).
    pub fn orphan_reason(&self) -> String {
        format!("Orphan{}{}", self.subject, self.gone)
    }

    /// Condition reason of `Ready=True` (`KeyReady`).
    pub fn ready_reason(&self) -> String {
        format!("{}Ready", self.subject)
    }

    /// Event reason of a credential found deleted at Stripe (`EndpointMissing`).
    pub fn missing_reason(&self) -> String {
        format!("{}Missing", self.subject)
    }
}

/// What every kind declares alike, read from the resource (valid spec or not: retiring and
/// deletion need it too).
#[derive(Debug, Clone)]
pub struct Declared<'a> {
    /// The StripeAccount the resource names.
    pub account: &'a str,
    /// The Secret the credential is published to.
    pub secret: &'a str,
    /// The workloads that roll when the credential changes.
    pub targets: &'a [RolloutTarget],
    /// Whether `delivery.vault.subPath` is set (refused for now).
    pub vault_sub_path: bool,
    /// `rotation.every` or `rotation.schedule`.
    pub schedule: Option<RotationSchedule>,
    /// `rotation.overlap` as written.
    pub overlap: Option<&'a str>,
    /// Whether deleting the resource retires its credentials at Stripe.
    pub revoke_on_delete: bool,
}

/// What validation judges a resource against. Pure data: refusing costs no call.
#[derive(Debug, Clone, Copy)]
pub struct Inputs<'a> {
    pub account: Option<&'a StripeAccount>,
    pub namespace_labels: &'a BTreeMap<String, String>,
    pub guardrails: &'a [StripeGuardrail],
    pub now: Timestamp,
}

/// A kind's bounds on `rotation.overlap`.
#[derive(Debug, Clone, Copy)]
pub struct OverlapBounds {
    pub default: &'static str,
    pub min: Duration,
    pub max: Duration,
    /// The refusal when out of bounds.
    pub message: &'static str,
}

/// The validated schedule and overlap (every kind's validated spec holds one).
#[derive(Debug, Clone)]
pub struct RotationSpec {
    pub schedule: Option<Schedule>,
    pub overlap: Duration,
    /// The longest gap between two rotations (what `maxRotationPeriod` judges).
    pub period: Option<Duration>,
}

/// An `InvalidSpec` refusal.
pub fn invalid(message: String) -> Refusal {
    Refusal {
        reason: "InvalidSpec",
        message,
    }
}

/// What every kind checks first: the account exists and admits the namespace, the schedule
/// parses and the overlap is within `bounds`. Returns the account and the rotation. Pure.
pub fn validate_common<'a, C: Credential>(
    obj: &C::Resource,
    input: &Inputs<'a>,
    bounds: &OverlapBounds,
) -> Result<(&'a StripeAccount, RotationSpec), Refusal> {
    let d = C::declared(obj);
    let account = shared::validate_placement(
        input.account,
        d.account,
        obj.meta().namespace.as_deref().unwrap_or_default(),
        input.namespace_labels,
        d.vault_sub_path,
    )?;
    // An account being deleted waits for its resources to retire their keys; a resource that
    // holds no key yet must not mint one under it (and so hold the deletion up). Resources that
    // already hold a key keep rotating until they are deleted or moved.
    let holds_key = status_ref::<C>(obj).is_some_and(|s| s.current_key.is_some());
    if account.metadata.deletion_timestamp.is_some() && !holds_key {
        return Err(Refusal {
            reason: "AccountTerminating",
            message: format!(
                "StripeAccount {:?} is being deleted: no new {} is minted under it; name another account",
                d.account,
                C::NAMES.noun
            ),
        });
    }
    let schedule = match &d.schedule {
        Some(s) => Some(Schedule::parse(s).map_err(|e| invalid(e.to_string()))?),
        None => None,
    };
    let overlap = parse_duration("overlap", d.overlap.unwrap_or(bounds.default))
        .map_err(|e| invalid(e.to_string()))?;
    if overlap < bounds.min || overlap > bounds.max {
        return Err(invalid(bounds.message.into()));
    }
    let period = match &schedule {
        Some(s) => Some(
            s.longest_period(input.now)
                .map_err(|e| invalid(e.to_string()))?,
        ),
        None => None,
    };
    let rotation = RotationSpec {
        schedule,
        overlap,
        period,
    };
    Ok((account, rotation))
}

impl RotationSpec {
    /// The guardrails' verdict on a resource with this rotation, its account's mode and the
    /// kind's own fields (permissions of a key, the host of a webhook URL). Pure.
    pub fn check_guardrails(
        &self,
        input: &Inputs<'_>,
        account: &StripeAccount,
        permissions: Vec<&str>,
        webhook_host: Option<&str>,
    ) -> Result<(), Refusal> {
        let violations = crate::rules::evaluate(
            input.guardrails,
            &crate::rules::Request {
                namespace_labels: input.namespace_labels.clone(),
                mode: Some(account.spec.mode),
                permissions,
                rotation_period: self.period,
                rotates: self.schedule.is_some(),
                overlap: Some(self.overlap),
                webhook_host,
            },
        );
        shared::refuse_violations(&violations)
    }
}

/// What differs between a restricted key and a webhook endpoint.
#[async_trait::async_trait]
pub trait Credential: Sized + Send + Sync + 'static {
    type Resource: RotatingResource<Status = Self::Status> + serde::Serialize + Send + Sync;
    type Status: Default
        + Clone
        + serde::Serialize
        + PartialEq
        + std::ops::Deref<Target = CredentialStatus>
        + std::ops::DerefMut
        + Send
        + Sync;
    /// What validation derives from the spec.
    type Spec: Send + Sync;

    const NAMES: Names;

    /// What every kind declares alike: account, Secret, targets, rotation.
    fn declared(obj: &Self::Resource) -> Declared<'_>;
    /// Validates the spec against its account, namespace labels and guardrails (start with
    /// [`validate_common`]). Pure.
    fn validate(obj: &Self::Resource, input: &Inputs<'_>) -> Result<Self::Spec, Refusal>;
    /// The schedule and overlap the validated spec declares.
    fn rotation(spec: &Self::Spec) -> &RotationSpec;
    /// Whether the spec asks for something the current credential cannot give (new scopes,
    /// settings Stripe cannot update).
    fn needs_new_credential(obj: &Self::Resource, status: &Self::Status, spec: &Self::Spec)
    -> bool;
    /// Fixes, in status, what the rotation creates (so a replay sends the same parameters).
    fn prepare(
        obj: &Self::Resource,
        spec: &Self::Spec,
        status: &mut Self::Status,
        rotation: &mut RotationState,
    );
    /// Creates the credential, or replays its create (same idempotency key, same parameters).
    async fn create(
        run: &Run<'_, Self>,
        handle: &AccountHandle,
        rotation: &RotationState,
    ) -> Result<Minted, ReconcileError>;
    /// Proves a fresh credential does what was asked. Transient failures are errors, never a
    /// [`Verdict::Wrong`].
    async fn verify(
        _run: &Run<'_, Self>,
        _handle: &AccountHandle,
        _rotation: &RotationState,
        _minted: &Minted,
    ) -> Result<Verdict, ReconcileError> {
        Ok(Verdict::Good)
    }
    /// Puts a fresh credential in its pre-publish state (a blue/green endpoint sends nothing
    /// before receivers hold its secret).
    async fn before_publish(
        _run: &Run<'_, Self>,
        _handle: &AccountHandle,
        _rotation: &RotationState,
        _id: &str,
    ) -> Result<(), ReconcileError> {
        Ok(())
    }
    /// Called once every rollout target runs the new credential.
    async fn after_rollout(
        _run: &Run<'_, Self>,
        _handle: &AccountHandle,
        _rotation: &RotationState,
        _id: &str,
    ) -> Result<(), ReconcileError> {
        Ok(())
    }
    /// Retires one credential at Stripe (expire a key, delete an endpoint), with the
    /// idempotency key the engine chose (retiring twice is harmless, so a fresh one is used when
    /// Stripe keeps replaying a saved error for the first).
    async fn retire(
        run: &Run<'_, Self>,
        handle: &AccountHandle,
        id: &str,
        idempotency_key: &str,
    ) -> Result<(), StripeError>;
    /// Every credential of this kind under the account, reduced to [`Listed`] (never a
    /// secret), with the owner mark each one carries. The engine shares one listing per
    /// account and sweep interval between all its resources (see [`crate::rotation::listing`]).
    async fn list_account(handle: &AccountHandle) -> Result<Vec<Listed>, StripeError>;
    /// The owner mark ([`Listed::owner`]) of the credentials this resource creates.
    fn owner_mark(run: &Run<'_, Self>) -> String;
    /// The Secret entries that publish `current` (and `previous` during an overlap).
    fn publish(
        obj: &Self::Resource,
        current: &SecretString,
        previous: Option<&SecretString>,
    ) -> Vec<(String, SecretString)>;
    /// Records, once the new credential is stored, what it was created with.
    fn on_stored(status: &mut Self::Status, rotation: &RotationState);
    /// A check of Stripe's side while idle (drift); `Some(trigger)` starts a rotation.
    async fn idle_check(
        _run: &mut Run<'_, Self>,
        _handle: &AccountHandle,
        _spec: &Self::Spec,
        _now: Timestamp,
    ) -> Result<Option<RotationTrigger>, ReconcileError> {
        Ok(None)
    }
    /// Usage-aware expiry settings (`None`: the kind has no usage signal, or the resource turned
    /// it off). Only kinds whose credentials report a last use answer `Some`.
    fn usage_expiry(_spec: &Self::Spec) -> Option<UsageExpiry> {
        None
    }
    /// When Stripe last saw the credential used (`None`: never, or unknown). Called only when
    /// [`Credential::usage_expiry`] answers `Some`: one retrieve at Stripe.
    async fn last_used(
        _run: &Run<'_, Self>,
        _handle: &AccountHandle,
        _id: &str,
    ) -> Result<Option<Timestamp>, ReconcileError> {
        Ok(None)
    }
    /// When [`Credential::idle_check`] is next due.
    fn idle_check_due(
        _obj: &Self::Resource,
        _spec: &Self::Spec,
        _now: Timestamp,
    ) -> Option<Timestamp> {
        None
    }
}

/// One reconcile of one resource.
pub struct Run<'a, C: Credential> {
    pub ctx: &'a Context,
    pub obj: C::Resource,
    pub api: Api<C::Resource>,
    pub ns: String,
    pub name: String,
    pub uid: String,
    /// The Stripe account context (`acct_...`) of the resolved account.
    pub context: Option<String>,
    /// The credential minted in this reconcile: the store step uses it instead of replaying
    /// the create. After a crash it is gone and the replay brings it back.
    minted: Option<Minted>,
    /// While a staged status waits for the next write: the status the API server holds.
    persisted: Option<Option<C::Status>>,
}

impl<'a, C: Credential> Run<'a, C> {
    pub fn new(ctx: &'a Context, obj: &C::Resource) -> Self {
        let ns = obj.meta().namespace.clone().unwrap_or_default();
        Run {
            ctx,
            api: Api::namespaced(ctx.client.clone(), &ns),
            name: obj.meta().name.clone().unwrap_or_default(),
            uid: obj.meta().uid.clone().unwrap_or_default(),
            obj: obj.clone(),
            context: None,
            minted: None,
            persisted: None,
            ns,
        }
    }

    /// The status as last written (default when none).
    pub fn status(&self) -> C::Status {
        status_ref::<C>(&self.obj).cloned().unwrap_or_default()
    }

    pub fn generation(&self) -> Option<i64> {
        self.obj.meta().generation
    }

    /// Writes the status (and whatever was staged before it) when it differs from what the API
    /// server holds (no write otherwise). Every step writes this way before a side effect of its
    /// own: the phase and idempotency key are recorded first.
    pub async fn write_status(&mut self, status: C::Status) -> Result<(), ReconcileError> {
        self.ctx.metrics.observe_status(&self.labels(), &status);
        if let Some(persisted) = self.persisted.take() {
            // Judged (and audited) against what the API server holds, not the staged status.
            *self.obj.status_slot() = persisted;
        }
        shared::write_status(self.ctx, &self.api, &mut self.obj, status).await
    }

    /// Keeps `status` for the next write instead of writing it now: for a step whose own effects
    /// are idempotent and redone from the recorded phase after a crash (the Secret sync, a
    /// rollout without targets, a rotation's end), so a mint costs three status writes instead
    /// of eight. A crash or conflict before the next write loses only what is redone anyway.
    fn stage(&mut self, status: C::Status) {
        self.ctx.metrics.observe_status(&self.labels(), &status);
        if self.persisted.is_none() {
            self.persisted = Some(status_ref::<C>(&self.obj).cloned());
        }
        *self.obj.status_slot() = Some(status);
    }

    /// Writes what was staged (nothing when nothing was).
    async fn flush(&mut self) -> Result<(), ReconcileError> {
        if self.persisted.is_some() {
            let status = self.status();
            self.write_status(status).await?;
        }
        Ok(())
    }

    /// Who acts, for the audit log: this resource and what triggered the current rotation.
    pub fn actor(&self) -> crate::audit::Actor {
        let status = status_ref::<C>(&self.obj);
        shared::audit_actor(
            C::NAMES.kind,
            &self.ns,
            &self.name,
            status.and_then(|s| s.rotation.as_deref()),
        )
    }

    pub async fn event(&self, type_: EventType, reason: &str, note: String) {
        self.ctx
            .publish_event(&self.obj.object_ref(&()), type_, reason, "Reconcile", note)
            .await;
    }

    pub fn store_path(&self) -> Result<StorePath, ReconcileError> {
        Ok(StorePath::credential(
            &self.ctx.config.store_prefix,
            &self.ns,
            C::NAMES.store_kind,
            &self.name,
        )?)
    }

    fn owner(&self) -> Owner {
        Owner {
            namespace: self.ns.clone(),
            kind: C::NAMES.kind.into(),
            name: self.name.clone(),
            uid: self.uid.clone(),
        }
    }

    fn labels(&self) -> crate::metrics::ObjectLabels {
        crate::metrics::ObjectLabels {
            kind: C::NAMES.kind.into(),
            namespace: self.ns.clone(),
            name: self.name.clone(),
        }
    }

    fn set(&self, status: &mut C::Status, type_: &str, ok: bool, reason: &str, message: String) {
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

    fn key_status(&self, minted: &Minted) -> KeyStatus {
        KeyStatus {
            id: minted.id.clone(),
            fingerprint: minted.secret.fingerprint(),
            created: minted.created.clone(),
            expires_at: None,
            context: self.context.clone(),
            ..KeyStatus::default()
        }
    }

    fn usage_labels(&self) -> crate::metrics::NamespacedLabels {
        crate::metrics::NamespacedLabels {
            namespace: self.ns.clone(),
            name: self.name.clone(),
        }
    }
}

fn status_ref<C: Credential>(obj: &C::Resource) -> Option<&C::Status> {
    C::Resource::status_ref(obj)
}

// ---------------------------------------------------------------------------------------------
// Pure decisions
// ---------------------------------------------------------------------------------------------

/// A rotation request carried by the annotations that neither was handled nor is being handled.
pub fn pending_request(
    annotations: &BTreeMap<String, String>,
    status: &CredentialStatus,
) -> Option<(String, RotationTrigger)> {
    let value = annotations.get(ROTATE_ANNOTATION)?.trim().to_string();
    if value.is_empty() {
        return None;
    }
    if status.last_handled_rotate_request.as_deref() == Some(value.as_str())
        || status.rotation.as_ref().and_then(|r| r.request.as_deref()) == Some(value.as_str())
    {
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

/// What a resource needs next.
#[derive(Debug, Clone, PartialEq)]
pub enum Next {
    /// An incident was reported: retire everything handed out, then mint afresh.
    Escalate(String),
    /// Credentials wait to be retired: that comes before anything else.
    Retire,
    /// Carry on with the recorded phase.
    Continue(RotationPhase),
    /// Start a rotation (with the annotation value it handles, if any).
    Start(RotationTrigger, Option<String>),
    /// Nothing to rotate.
    Idle,
}

/// Decides the next step. Pure: `needs_new_credential` and `schedule_due` are the adapter's and
/// the schedule's answers.
pub fn decide(
    annotations: &BTreeMap<String, String>,
    status: &CredentialStatus,
    needs_new_credential: bool,
    schedule_due: bool,
) -> Next {
    let pending = pending_request(annotations, status);
    if let Some((value, RotationTrigger::Incident)) = &pending {
        return Next::Escalate(value.clone());
    }
    if !status.retiring_keys.is_empty() {
        return Next::Retire;
    }
    if let Some(rotation) = &status.rotation {
        return Next::Continue(rotation.phase);
    }
    if status.current_key.is_none() {
        return Next::Start(RotationTrigger::Initial, None);
    }
    if let Some((value, trigger)) = pending {
        return Next::Start(trigger, Some(value));
    }
    if needs_new_credential {
        return Next::Start(RotationTrigger::SpecChange, None);
    }
    if schedule_due {
        return Next::Start(RotationTrigger::Schedule, None);
    }
    Next::Idle
}

/// Moves every credential handed out (current, previous, the one being minted) to the
/// retirement list and starts an incident rotation in its place. Pure.
pub fn escalate(
    status: &mut CredentialStatus,
    value: String,
    uid: &str,
    now: Timestamp,
) -> RotationState {
    let number = next_number(status);
    // A create sent but never recorded may have made a credential: find it before minting.
    let sweep_first = retire_everything(status)
        .is_some_and(|r| r.sweep_first || (r.new_key.is_none() && r.create_sent_at.is_some()));
    RotationState {
        phase: RotationPhase::Minting,
        number,
        trigger: RotationTrigger::Incident,
        started_at: time(now),
        idempotency_key: idempotency_key(uid, number as u64, "mint"),
        new_key: None,
        rolled_out_at: None,
        permissions: Vec::new(),
        connect_permissions: Vec::new(),
        request: Some(value),
        rollout_started_at: None,
        attempt: None,
        unprepared: true,
        create_sent_at: None,
        sweep_first,
        usage_hold: None,
    }
}

/// Moves every credential handed out (current, previous, the one a rotation minted) to the
/// retirement list, once each, and takes the rotation out of status. Returns that rotation.
fn retire_everything(status: &mut CredentialStatus) -> Option<RotationState> {
    let rotation = status.rotation.take().map(|r| *r);
    let handed_out = [
        status.current_key.take(),
        status.previous_key.take(),
        rotation.as_ref().and_then(|r| r.new_key.clone()),
    ];
    for k in handed_out.into_iter().flatten() {
        if !status.retiring_keys.iter().any(|r| r.id == k.id) {
            status.retiring_keys.push(k);
        }
    }
    rotation
}

/// The number of the next rotation: one past every number used so far, so an abandoned
/// rotation's idempotency key is never reused for different parameters.
fn next_number(status: &CredentialStatus) -> i64 {
    let used = status
        .rotation
        .as_ref()
        .map(|r| r.number)
        .unwrap_or(0)
        .max(status.rotation_number.unwrap_or(0));
    used + 1
}

/// The idempotency key of a create: the rotation's, or one derived from the attempt once a
/// saved server error had to be abandoned.
pub fn create_key(uid: &str, rotation: &RotationState) -> String {
    match rotation.attempt {
        Some(a) if a > 0 => idempotency_key(uid, rotation.number as u64, &format!("mint-{a}")),
        _ => rotation.idempotency_key.clone(),
    }
}

/// Whether the previous credential's overlap has ended (it ends at its recorded `expiresAt`).
pub fn overlap_over(status: &CredentialStatus, now: Timestamp) -> bool {
    status
        .previous_key
        .as_ref()
        .and_then(|k| k.expires_at.as_ref())
        .is_some_and(|t| t.0 <= now)
}

/// How long a reconcile waits after `failures` consecutive failures: exponential from `base`,
/// capped at `cap`, with up to 20 % jitter taken from `seed` (stable per object and attempt).
pub fn backoff(base: Duration, cap: Duration, failures: u32, seed: u64) -> Duration {
    let exp = base.saturating_mul(1u32 << failures.min(16));
    let capped = exp.min(cap);
    let jitter_ms = (capped.as_millis() as u64 / 5).max(1);
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(failures as u64);
    x ^= x >> 33;
    capped + Duration::from_millis(x % jitter_ms)
}

// ---------------------------------------------------------------------------------------------
// Reconcile
// ---------------------------------------------------------------------------------------------

/// Reconciles one resource (the entry point the `Controller` calls).
#[tracing::instrument(skip(obj, ctx), fields(kind = C::NAMES.kind, namespace = %obj.namespace().unwrap_or_default(), name = %obj.name_any()))]
pub async fn reconcile<C: Credential>(
    obj: std::sync::Arc<C::Resource>,
    ctx: std::sync::Arc<crate::controller::Context>,
) -> Result<Action, ReconcileError> {
    shared::reconcile_with_finalizer(
        obj,
        ctx,
        C::NAMES.controller,
        C::NAMES.finalizer,
        |o, c| async move { apply::<C>(&o, &c).await },
        |o, c| async move { cleanup::<C>(&o, &c).await },
    )
    .await
}

/// What the controller does after a failed reconcile: record it, back off, try again.
pub fn error_policy<C: Credential>(
    obj: std::sync::Arc<C::Resource>,
    error: &ReconcileError,
    ctx: std::sync::Arc<Context>,
) -> Action {
    shared::requeue_after_error(&ctx, C::NAMES.controller, obj.meta(), error)
}

/// What a resource with a validated spec needs next at `now`: the adapter's and the
/// schedule's answers fed to [`decide`].
pub fn next_step<C: Credential>(obj: &C::Resource, spec: &C::Spec, now: Timestamp) -> Next {
    let status = status_ref::<C>(obj).cloned().unwrap_or_default();
    let needs_new = status.current_key.is_some() && C::needs_new_credential(obj, &status, spec);
    let due = next_rotation_at::<C>(obj, spec).is_some_and(|at| at <= now);
    decide(obj.annotations(), &status, needs_new, due)
}

async fn apply<C: Credential>(obj: &C::Resource, ctx: &Context) -> Result<Action, ReconcileError> {
    let mut run = Run::<C>::new(ctx, obj);
    // fetch: account, namespace labels and guardrails come from the watch caches when the
    // controllers run (their changes wake this resource through the same caches)
    let account = ctx.account(C::declared(obj).account).await?;
    let labels = shared::fetch_namespace_labels(ctx, &run.ns).await?;
    let guardrails = ctx.guardrails().await?;
    let now = ctx.clock.now();
    let handle = match &account {
        Some(a) => {
            run.context = Some(a.spec.context.clone());
            Some(ctx.accounts.resolve(ctx, a).await)
        }
        None => None,
    };
    // validate
    let input = Inputs {
        account: account.as_ref(),
        namespace_labels: &labels,
        guardrails: &guardrails,
        now,
    };
    let spec = match C::validate(obj, &input) {
        Ok(v) => v,
        Err(refusal) => {
            // Retiring needs no valid spec: an incident, a pending retirement or an overlap that
            // ended still happen before the resource is refused.
            if let Some(Ok(handle)) = &handle {
                let handle = observed(&run, handle);
                if let Err(e) = retire_only(&mut run, &handle).await {
                    record_failure(&mut run, &e).await?;
                    return Err(e);
                }
            }
            return refuse(&mut run, refusal).await;
        }
    };
    let handle = match handle {
        Some(Ok(h)) => h,
        Some(Err(e)) => {
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
        None => unreachable!("validate refuses a missing account"),
    };
    let handle = observed(&run, &handle);
    let result = match drive(&mut run, &spec, &handle).await {
        Ok(action) => run.flush().await.map(|()| action),
        Err(e) => Err(e),
    };
    if let Err(e) = &result {
        record_failure(&mut run, e).await?;
    }
    result
}

/// The account's client, reporting its calls to the metrics and the audit log as this run's.
fn observed<C: Credential>(run: &Run<'_, C>, handle: &AccountHandle) -> AccountHandle {
    AccountHandle {
        client: handle
            .client
            .with_observer(run.ctx.call_observer(run.actor())),
        ..handle.clone()
    }
}

async fn drive<C: Credential>(
    run: &mut Run<'_, C>,
    spec: &C::Spec,
    handle: &AccountHandle,
) -> Result<Action, ReconcileError> {
    // decide and act, a bounded number of steps per reconcile
    for _ in 0..12 {
        let status = run.status();
        match next_step::<C>(&run.obj, spec, run.ctx.clock.now()) {
            Next::Escalate(value) => escalate_now(run, value).await?,
            Next::Retire => retire_pending(run, handle).await?,
            Next::Continue(_) if status.rotation.as_ref().is_some_and(|r| r.unprepared) => {
                prepare_rotation(run, spec).await?
            }
            Next::Continue(phase) => match step(run, spec, handle, phase).await? {
                StepOutcome::Continue => {}
                StepOutcome::Wait(after) => return Ok(Action::requeue(after)),
            },
            Next::Start(trigger, request) => start(run, spec, trigger, request).await?,
            Next::Idle => match idle(run, spec, handle).await? {
                IdleOutcome::Settled(action) => return Ok(action),
                IdleOutcome::Rotate(trigger) => start(run, spec, trigger, None).await?,
            },
        }
    }
    Ok(Action::requeue(Duration::from_secs(1)))
}

/// What a refused resource still does: an incident's revocation, pending retirements, and the
/// retirement of a previous credential whose overlap has ended. Never mints.
async fn retire_only<C: Credential>(
    run: &mut Run<'_, C>,
    handle: &AccountHandle,
) -> Result<(), ReconcileError> {
    let status = run.status();
    if let Some((value, RotationTrigger::Incident)) =
        pending_request(run.obj.annotations(), &status)
    {
        escalate_now(run, value).await?;
    }
    if !run.status().retiring_keys.is_empty() {
        retire_pending(run, handle).await?;
    }
    let status = run.status();
    let phase = status.rotation.as_ref().map(|r| r.phase);
    let now = run.ctx.clock.now();
    if phase == Some(RotationPhase::Expiring)
        || (phase == Some(RotationPhase::Overlapping) && overlap_over(&status, now))
    {
        expire_previous(run, handle).await?;
    }
    Ok(())
}

/// Shows a failed step in status and as a Warning Event: `Ready=False` while nothing is
/// published, `Degraded=True` when the published credential still works.
async fn record_failure<C: Credential>(
    run: &mut Run<'_, C>,
    error: &ReconcileError,
) -> Result<(), ReconcileError> {
    // A crash point is a test's, and a conflict means someone else wrote first: the next
    // reconcile reads afresh. Neither is a failed rotation step.
    if matches!(error, ReconcileError::Crash(_))
        || matches!(error, ReconcileError::Kube(kube::Error::Api(s)) if s.code == 409)
    {
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
            controller: C::NAMES.controller.into(),
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

async fn refuse<C: Credential>(
    run: &mut Run<'_, C>,
    refusal: Refusal,
) -> Result<Action, ReconcileError> {
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
    // The account, namespace and guardrail watches bring the resource back when they change;
    // an overlap that ends while refused is picked up by this requeue.
    Ok(Action::requeue(Duration::from_secs(300)))
}

/// The next scheduled rotation of the current credential (stable: seeded by UID and number).
pub fn next_rotation_at<C: Credential>(obj: &C::Resource, spec: &C::Spec) -> Option<Timestamp> {
    let status = status_ref::<C>(obj)?;
    let last = status.last_rotation_at.as_ref()?.0;
    let seed = format!(
        "{}/{}",
        obj.meta().uid.clone().unwrap_or_default(),
        status.rotation_number.unwrap_or(0)
    );
    C::rotation(spec)
        .schedule
        .as_ref()?
        .next_rotation(last, &seed)
        .ok()
}

async fn start<C: Credential>(
    run: &mut Run<'_, C>,
    spec: &C::Spec,
    trigger: RotationTrigger,
    request: Option<String>,
) -> Result<(), ReconcileError> {
    let now = run.ctx.clock.now();
    let mut status = run.status();
    if trigger == RotationTrigger::Recreate {
        // The current credential vanished at Stripe: make sure of it before replacing it.
        let doomed = status.current_key.take();
        status.retiring_keys.extend(doomed);
    }
    let number = next_number(&status);
    let mut rotation = RotationState {
        phase: RotationPhase::Minting,
        number,
        trigger,
        started_at: time(now),
        idempotency_key: idempotency_key(&run.uid, number as u64, "mint"),
        new_key: None,
        rolled_out_at: None,
        permissions: Vec::new(),
        connect_permissions: Vec::new(),
        request,
        rollout_started_at: None,
        attempt: None,
        unprepared: false,
        create_sent_at: None,
        sweep_first: false,
        usage_hold: None,
    };
    C::prepare(&run.obj, spec, &mut status, &mut rotation);
    status.rotation = Some(Box::new(rotation));
    run.set(
        &mut status,
        condition_types::ROTATING,
        true,
        "Rotating",
        format!("rotation {number} ({trigger:?}) started"),
    );
    status.observed_generation = run.generation();
    // Recorded with the first step's write (the mint's, before its create).
    run.stage(status);
    match trigger {
        RotationTrigger::Initial => {}
        RotationTrigger::Recreate => {
            run.event(
                EventType::Warning,
                &C::NAMES.missing_reason(),
                format!(
                    "the {} was deleted at Stripe: rotation {number} creates a new one",
                    C::NAMES.noun
                ),
            )
            .await
        }
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

/// Fixes the create parameters of a rotation that started without a valid spec.
async fn prepare_rotation<C: Credential>(
    run: &mut Run<'_, C>,
    spec: &C::Spec,
) -> Result<(), ReconcileError> {
    let mut status = run.status();
    let mut rotation = rotation_of::<C>(&status);
    C::prepare(&run.obj, spec, &mut status, &mut rotation);
    rotation.unprepared = false;
    status.rotation = Some(Box::new(rotation));
    run.stage(status);
    Ok(())
}

async fn escalate_now<C: Credential>(
    run: &mut Run<'_, C>,
    value: String,
) -> Result<(), ReconcileError> {
    let now = run.ctx.clock.now();
    let mut status = run.status();
    let interrupted = status.rotation.as_ref().map(|r| (r.number, r.phase));
    let rotation = escalate(&mut status, value, &run.uid, now);
    let number = rotation.number;
    status.rotation = Some(Box::new(rotation));
    run.set(
        &mut status,
        condition_types::ROTATING,
        true,
        "IncidentRotation",
        format!("incident rotation {number}: every credential handed out is being retired"),
    );
    let doomed: Vec<String> = status
        .retiring_keys
        .iter()
        .map(|k| format!("{} (fingerprint {})", k.id, k.fingerprint))
        .collect();
    run.write_status(status).await?;
    let note = match interrupted {
        Some((n, phase)) => format!(
            "incident: rotation {n} ({phase:?}) abandoned; retiring {} at once; rotation {number} mints a fresh {}",
            doomed.join(", "),
            C::NAMES.noun
        ),
        None => format!(
            "incident: retiring {} at once; rotation {number} mints a fresh {}",
            doomed.join(", "),
            C::NAMES.noun
        ),
    };
    // An incident never waits for usage: a hold ends with the rotation it belonged to.
    run.ctx.metrics.old_key_in_use.remove(&run.usage_labels());
    run.event(EventType::Warning, "IncidentRotation", note)
        .await;
    warn!(number, "incident rotation started");
    Ok(())
}

/// Retires every credential on the retirement list, each confirmed dead at Stripe.
async fn retire_pending<C: Credential>(
    run: &mut Run<'_, C>,
    handle: &AccountHandle,
) -> Result<(), ReconcileError> {
    let mut status = run.status();
    let number = status
        .rotation
        .as_ref()
        .map(|r| r.number)
        .or(status.rotation_number)
        .unwrap_or(0);
    let mut failure = None;
    let mut remaining = Vec::new();
    for key in std::mem::take(&mut status.retiring_keys) {
        if failure.is_some() {
            remaining.push(key);
            continue;
        }
        match retire_one(run, handle, &key, number).await {
            Ok(()) => {
                run.ctx.crash_point("expired")?;
                run.event(
                    EventType::Warning,
                    &C::NAMES.retired_reason(),
                    format!(
                        "retired {} {} (fingerprint {}) at Stripe",
                        C::NAMES.noun,
                        key.id,
                        key.fingerprint
                    ),
                )
                .await;
            }
            Err(e) => {
                failure = Some(e);
                remaining.push(key);
            }
        }
    }
    status.retiring_keys = remaining;
    run.write_status(status).await?;
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Retires one credential. Already dead counts as done; a 404 counts only once a listing shows
/// the id is not active under this account (a 404 may come from asking the wrong account).
async fn retire_one<C: Credential>(
    run: &Run<'_, C>,
    handle: &AccountHandle,
    key: &KeyStatus,
    number: i64,
) -> Result<(), ReconcileError> {
    if let (Some(minted_under), Some(now)) = (key.context.as_deref(), run.context.as_deref())
        && minted_under != now
    {
        return Err(ReconcileError::Account {
            reason: "AccountMismatch",
            message: format!(
                "{} {} was minted under Stripe account {minted_under}, but the StripeAccount now names {now}: \
                 restore spec.context or retire it in the Dashboard",
                C::NAMES.noun,
                key.id
            ),
        });
    }
    let key_for = |step: String| idempotency_key(&run.uid, number as u64, &step);
    let first = C::retire(run, handle, &key.id, &key_for(format!("expire-{}", key.id))).await;
    let result = match first {
        // A saved server error would be replayed for a day: retiring is idempotent by nature,
        // so ask again under a fresh key.
        Err(e) if e.status().is_some_and(|s| s >= 500) && saved_replay(&e) => {
            let fresh = format!("expire-{}-{}", key.id, run.ctx.clock.now().as_millisecond());
            C::retire(run, handle, &key.id, &key_for(fresh)).await
        }
        other => other,
    };
    match result {
        Ok(()) => {}
        Err(e) if already_dead(&e) => {}
        Err(e) if e.is_not_found() => {
            // Only a listing taken after the 404 can say the credential is gone.
            let owned = list_owned(run, handle, Need::fresh(run.ctx.clock.now())).await?;
            if owned.iter().any(|o| o.id == key.id && o.active) {
                return Err(e.into());
            }
        }
        Err(e) => return Err(e.into()),
    }
    // Listings taken before now show it inactive: a cached listing never retires it again.
    run.ctx
        .listings
        .retired(&listing_key::<C>(handle), &key.id, run.ctx.clock.now());
    Ok(())
}

/// Where the listings of this kind under `handle`'s Stripe account are kept: per API base
/// and context, whichever StripeAccount object names them.
pub fn listing_key<C: Credential>(handle: &AccountHandle) -> ListingKey {
    let config = handle.client.config();
    ListingKey {
        api_base: config.api_base.clone(),
        context: config.context.clone(),
        kind: C::NAMES.store_kind,
    }
}

/// The credentials at Stripe this resource owns, from a listing of its account that serves
/// `need`: shared with every resource of the account (one listing per sweep interval, one in
/// flight at a time), or taken afresh where correctness needs a later one.
///
/// The rule for callers: a sweep that only bounds cost takes [`Need::within`] the sweep
/// interval (or [`Need::after`] the rotation's `createSentAt`, so that the sweep that ends a
/// rotation can see what the rotation's own creates made); finding the credential a lost create
/// may have made, or confirming that a 404 means gone, takes [`Need::fresh`] or
/// [`Need::after`] the create. Only what a listing shows is acted on, and it is compared with
/// the status as it is *after* the listing arrived.
async fn list_owned<C: Credential>(
    run: &Run<'_, C>,
    handle: &AccountHandle,
    need: Need,
) -> Result<Vec<Owned>, ReconcileError> {
    let mark = C::owner_mark(run);
    let listed = run
        .ctx
        .listings
        .get(
            &listing_key::<C>(handle),
            need,
            run.ctx.clock.as_ref(),
            || C::list_account(handle),
        )
        .await?;
    Ok(listed
        .into_iter()
        .filter(|l| l.owner.as_deref() == Some(mark.as_str()))
        .map(|l| Owned {
            id: l.id,
            active: l.active,
        })
        .collect())
}

/// Stripe's answer for a credential that is dead already (never a 401: that is about the
/// caller's own key).
fn already_dead(e: &StripeError) -> bool {
    e.status() == Some(400)
        && matches!(
            e.code(),
            Some("resource_already_expired") | Some("api_key_expired")
        )
}

enum StepOutcome {
    Continue,
    Wait(Duration),
}

async fn step<C: Credential>(
    run: &mut Run<'_, C>,
    spec: &C::Spec,
    handle: &AccountHandle,
    phase: RotationPhase,
) -> Result<StepOutcome, ReconcileError> {
    match phase {
        RotationPhase::Minting => mint(run, handle).await,
        RotationPhase::Storing => store(run, handle).await,
        RotationPhase::Syncing => sync_step(run).await,
        RotationPhase::RollingOut => roll_out(run, spec, handle).await,
        RotationPhase::Overlapping => overlap(run).await,
        RotationPhase::Expiring => {
            // Boxed: the reconcile future is deep already (debug builds overflow test stacks).
            if let Some(wait) = Box::pin(hold_if_in_use(run, spec, handle)).await? {
                return Ok(StepOutcome::Wait(wait));
            }
            expire_previous(run, handle)
                .await
                .map(|()| StepOutcome::Continue)
        }
        RotationPhase::Idle => {
            let mut status = run.status();
            status.rotation = None;
            run.stage(status);
            Ok(StepOutcome::Continue)
        }
    }
}

fn rotation_of<C: Credential>(status: &C::Status) -> RotationState {
    *status
        .rotation
        .clone()
        .expect("called only while a rotation is recorded")
}

/// Creates (or replays) the credential. A saved server error that Stripe keeps replaying for
/// the idempotency key is abandoned: once a listing shows nothing unknown was created, the
/// next attempt uses a fresh key derived from the attempt number.
async fn create<C: Credential>(
    run: &mut Run<'_, C>,
    handle: &AccountHandle,
    rotation: &RotationState,
) -> Result<Minted, ReconcileError> {
    match C::create(run, handle, rotation).await {
        Ok(m) => Ok(m),
        Err(ReconcileError::Stripe(e))
            if e.status().is_some_and(|s| s >= 500) && saved_replay(&e) =>
        {
            // What the failed create may have made shows only in a listing taken after it.
            let owned = list_owned(run, handle, Need::fresh(run.ctx.clock.now())).await?;
            let known = known_ids(&run.status());
            if owned.iter().all(|o| !o.active || known.contains(&o.id)) {
                let mut status = run.status();
                if let Some(r) = status.rotation.as_mut() {
                    r.attempt = Some(r.attempt.unwrap_or(0) + 1);
                }
                run.write_status(status).await?;
            }
            Err(e.into())
        }
        Err(e) => Err(e),
    }
}

/// Whether Stripe answered with a saved error of an earlier request (`Idempotent-Replayed`).
fn saved_replay(e: &StripeError) -> bool {
    e.is_idempotent_replay()
}

fn known_ids(status: &CredentialStatus) -> Vec<String> {
    [
        status.current_key.as_ref(),
        status.previous_key.as_ref(),
        status.rotation.as_ref().and_then(|r| r.new_key.as_ref()),
    ]
    .into_iter()
    .flatten()
    .chain(status.retiring_keys.iter())
    .map(|k| k.id.clone())
    .collect()
}

/// Proves a fresh credential. A wrong one goes on the retirement list (recorded before anything
/// else) and the rotation moves to a new number; the error requeues.
async fn prove<C: Credential>(
    run: &mut Run<'_, C>,
    handle: &AccountHandle,
    rotation: &RotationState,
    minted: &Minted,
) -> Result<(), ReconcileError> {
    match C::verify(run, handle, rotation, minted).await? {
        Verdict::Good => Ok(()),
        Verdict::Wrong(message) => {
            let mut status = run.status();
            status.retiring_keys.push(run.key_status(minted));
            if let Some(r) = status.rotation.as_mut() {
                // A new number: a new idempotency key, never the condemned key's replay.
                r.number += 1;
                r.idempotency_key = idempotency_key(&run.uid, r.number as u64, "mint");
                r.attempt = None;
                r.new_key = None;
                r.create_sent_at = None;
                r.phase = RotationPhase::Minting;
            }
            run.write_status(status).await?;
            Err(ReconcileError::ScopeVerification {
                key_id: minted.id.clone(),
                message,
            })
        }
    }
}

async fn mint<C: Credential>(
    run: &mut Run<'_, C>,
    handle: &AccountHandle,
) -> Result<StepOutcome, ReconcileError> {
    let now = run.ctx.clock.now();
    let rotation = rotation_of::<C>(&run.status());
    let window = SignedDuration::from_hours(24);
    let stale = rotation
        .create_sent_at
        .as_ref()
        .is_some_and(|t| now.duration_since(t.0) >= window);
    if stale || rotation.sweep_first {
        // The first create can no longer be replayed (or belonged to an abandoned rotation):
        // what it made is an orphan now. The listing must be taken after that create: after
        // `createSentAt`, or (an abandoned rotation's time is gone) after now.
        let need = match &rotation.create_sent_at {
            Some(sent) if !rotation.sweep_first => {
                Need::after(sent.0, run.ctx.config.orphan_sweep_interval)
            }
            _ => Need::fresh(now),
        };
        sweep_orphans(run, handle, need).await?;
    }
    if rotation.create_sent_at.is_none() || stale || rotation.sweep_first {
        let mut status = run.status();
        if let Some(r) = status.rotation.as_mut() {
            r.create_sent_at = Some(time(now));
            r.sweep_first = false;
        }
        run.write_status(status).await?;
    }
    let rotation = rotation_of::<C>(&run.status());
    let minted = create(run, handle, &rotation).await?;
    prove(run, handle, &rotation, &minted).await?;
    run.ctx
        .metrics
        .keys_minted
        .get_or_create(&crate::metrics::ControllerLabels {
            controller: C::NAMES.controller.into(),
        })
        .inc();
    run.ctx.crash_point("minted")?;
    C::before_publish(run, handle, &rotation, &minted.id).await?;
    let mut status = run.status();
    let mut rotation = rotation_of::<C>(&status);
    rotation.new_key = Some(run.key_status(&minted));
    rotation.phase = RotationPhase::Storing;
    status.rotation = Some(Box::new(rotation));
    run.write_status(status).await?;
    run.event(
        EventType::Normal,
        &C::NAMES.minted_reason(),
        format!(
            "created {} {} (fingerprint {})",
            C::NAMES.noun,
            minted.id,
            minted.secret.fingerprint()
        ),
    )
    .await;
    run.minted = Some(minted);
    Ok(StepOutcome::Continue)
}

async fn store<C: Credential>(
    run: &mut Run<'_, C>,
    handle: &AccountHandle,
) -> Result<StepOutcome, ReconcileError> {
    let path = run.store_path()?;
    // Write the bundle unless an earlier attempt already did (the store is the source of truth).
    for attempt in 0..3 {
        let status = run.status();
        let rotation = rotation_of::<C>(&status);
        let new_key = rotation
            .new_key
            .clone()
            .expect("Storing records the new credential");
        let existing = run.ctx.store.read_bundle(&path).await?;
        if existing
            .as_ref()
            .is_some_and(|b| b.value.current.key_id == new_key.id)
        {
            break;
        }
        let minted = match run.minted.take() {
            Some(m) if m.id == new_key.id => m,
            _ => create(run, handle, &rotation).await?,
        };
        if minted.id != new_key.id || minted.secret.fingerprint() != new_key.fingerprint {
            // The replay came after Stripe forgot the idempotency key (24 h) and made a new
            // credential: the first one's secret is lost, so it is retired and the new one
            // adopted (once proven).
            warn!(lost = %new_key.id, kept = %minted.id, "the replayed create returned another credential; adopting it");
            // The lost one is recorded for retirement first, whatever the proof says.
            let mut status = run.status();
            status.retiring_keys.push(new_key);
            run.write_status(status).await?;
            prove(run, handle, &rotation, &minted).await?;
            let mut status = run.status();
            if let Some(r) = status.rotation.as_mut() {
                r.new_key = Some(run.key_status(&minted));
            }
            run.write_status(status).await?;
            retire_pending(run, handle).await?;
            run.minted = Some(minted);
            continue;
        }
        let material = KeyMaterial::new(minted.secret, new_key.id.clone());
        let keeps_previous = status.current_key.is_some();
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
    let mut status = run.status();
    let mut rotation = rotation_of::<C>(&status);
    let new_key = rotation.new_key.clone().expect("recorded");
    if status.current_key.is_some() {
        status.previous_key = status.current_key.take();
    }
    status.current_key = Some(new_key);
    status.last_rotation_at = Some(time(now));
    status.rotation_number = Some(rotation.number);
    C::on_stored(&mut status, &rotation);
    rotation.phase = RotationPhase::Syncing;
    status.rotation = Some(Box::new(rotation));
    // The sync that follows is redone from `Storing` after a crash (the bundle is found
    // stored): staged, written with the next step's record.
    run.stage(status);
    Ok(StepOutcome::Continue)
}

/// Writes the Secret from the store's bundle when it differs from what the cluster holds, and
/// deletes the Secret of a renamed `delivery.secret.name`.
pub async fn sync_secret<C: Credential>(run: &mut Run<'_, C>) -> Result<bool, ReconcileError> {
    let path = run.store_path()?;
    let Some(bundle) = run.ctx.store.read_bundle(&path).await? else {
        return Ok(false);
    };
    let bundle = bundle.value;
    let status = run.status();
    // The bundle may still hold credentials an incident retired: publish only what status
    // says is live.
    if status
        .current_key
        .as_ref()
        .is_none_or(|k| k.id != bundle.current.key_id)
    {
        return Ok(false);
    }
    // The previous credential is published only while status says it is still valid.
    let previous = bundle.previous.as_ref().filter(|p| {
        status
            .previous_key
            .as_ref()
            .is_some_and(|k| k.id == p.key_id)
    });
    let published = C::publish(
        &run.obj,
        &bundle.current.secret,
        previous.map(|p| &p.secret),
    );
    let entries: Vec<SecretEntry<'_>> = published
        .iter()
        .map(|(k, v)| SecretEntry { key: k, value: v })
        .collect();
    let owner = run
        .obj
        .controller_owner_ref(&())
        .expect("an object from the API has a name and uid");
    let name = C::declared(&run.obj).secret.to_string();
    let desired = inject::build_secret(
        &name,
        &run.ns,
        owner,
        &bundle.current.key_id,
        &bundle.current.fingerprint,
        &entries,
    );
    let written = shared::write_secret_if_changed(run.ctx, &run.ns, &run.uid, &desired).await?;
    if written {
        run.ctx.audit.record(
            crate::audit::AuditEntry::secret_sync(run.actor(), &run.ns, &name)
                .key(&bundle.current.key_id, &bundle.current.fingerprint)
                .detail("previous_published", previous.is_some())
                .success(),
        );
    }
    if status.published_secret.as_deref() != Some(name.as_str()) {
        if let Some(old) = status.published_secret.clone()
            && shared::empty_owned_secret(run.ctx, &run.ns, &run.uid, &old).await?
        {
            run.event(
                EventType::Normal,
                "SecretRenamed",
                format!(
                    "delivery.secret.name changed: {name} written; the old Secret {old} holds no secret any more and goes with this resource"
                ),
            )
            .await;
        }
        let mut status = run.status();
        status.published_secret = Some(name);
        run.stage(status);
    }
    Ok(written)
}

async fn sync_step<C: Credential>(run: &mut Run<'_, C>) -> Result<StepOutcome, ReconcileError> {
    sync_secret(run).await?;
    run.ctx.crash_point("synced")?;
    let now = run.ctx.clock.now();
    let mut status = run.status();
    let mut rotation = rotation_of::<C>(&status);
    rotation.phase = RotationPhase::RollingOut;
    rotation.rollout_started_at = Some(time(now));
    status.rotation = Some(Box::new(rotation));
    let fp = current_fingerprint(&status);
    // The Secret holds the new credential now: a Ready condition that named the previous one
    // says which is published (the rollout and overlap can take hours).
    if let Some(ready) = crate::api::conditions::find(&status.conditions, condition_types::READY)
        .filter(|c| c.status == "True")
    {
        let reason = ready.reason.clone();
        let message = published_message::<C>(&status, &fp);
        run.set(&mut status, condition_types::READY, true, &reason, message);
    }
    if C::declared(&run.obj).targets.is_empty() {
        // Nothing to roll: the rollout step has no side effect to record the phase before.
        run.stage(status);
    } else {
        run.write_status(status).await?;
    }
    run.event(
        EventType::Normal,
        "SecretSynced",
        format!(
            "Secret {} holds the {} with fingerprint {fp}",
            C::declared(&run.obj).secret,
            C::NAMES.noun
        ),
    )
    .await;
    Ok(StepOutcome::Continue)
}

fn current_fingerprint(status: &CredentialStatus) -> String {
    status
        .current_key
        .as_ref()
        .map(|k| k.fingerprint.clone())
        .unwrap_or_default()
}

async fn roll_targets<C: Credential>(
    run: &Run<'_, C>,
    fingerprint: &str,
) -> Result<shared::RolloutReport, ReconcileError> {
    let reference = run.obj.object_ref(&());
    let source = shared::RolloutSource {
        kind: C::NAMES.kind,
        name: &run.name,
        namespace: &run.ns,
        reference: &reference,
    };
    shared::roll_targets(run.ctx, &source, C::declared(&run.obj).targets, fingerprint).await
}

/// The Degraded condition a rollout report calls for (`None`: every target rolled).
fn rollout_condition(report: &shared::RolloutReport) -> Option<(&'static str, String)> {
    if !report.missing.is_empty() {
        return Some((
            "RolloutTargetMissing",
            format!(
                "rollout target(s) not found: {}; the old credential is kept until they exist or the rollout ceiling passes",
                report.missing.join("; ")
            ),
        ));
    }
    None
}

async fn roll_out<C: Credential>(
    run: &mut Run<'_, C>,
    spec: &C::Spec,
    handle: &AccountHandle,
) -> Result<StepOutcome, ReconcileError> {
    let now = run.ctx.clock.now();
    let mut status = run.status();
    let mut rotation = rotation_of::<C>(&status);
    let fp = current_fingerprint(&status);
    let report = roll_targets(run, &fp).await?;
    let began = rotation
        .rollout_started_at
        .as_ref()
        .unwrap_or(&rotation.started_at)
        .0;
    let elapsed = Duration::try_from(now.duration_since(began)).unwrap_or(Duration::ZERO);
    let ceiling = run.ctx.config.rollout_ceiling;
    // A missing target holds an old credential; with none to hold (a first credential, an
    // incident) only targets still rolling are waited for.
    let waiting =
        !report.pending.is_empty() || (!report.missing.is_empty() && status.previous_key.is_some());
    if waiting && elapsed < ceiling {
        if let Some((reason, message)) = rollout_condition(&report) {
            run.set(
                &mut status,
                condition_types::DEGRADED,
                true,
                reason,
                message,
            );
            run.write_status(status).await?;
        }
        return Ok(StepOutcome::Wait(
            run.ctx.config.rollout_poll.min(
                until(
                    now,
                    began
                        .checked_add(
                            SignedDuration::try_from(ceiling).unwrap_or(SignedDuration::ZERO),
                        )
                        .unwrap_or(now),
                )
                .max(Duration::from_millis(100)),
            ),
        ));
    }
    if !report.is_complete() {
        let (reason, detail) = match rollout_condition(&report) {
            Some((reason, _)) => (reason, report.missing.join("; ")),
            None => ("RolloutStuck", report.pending.join("; ")),
        };
        let message = format!(
            "rollout did not finish within {}: {detail}; the rotation continues",
            humantime::format_duration(ceiling),
        );
        run.set(
            &mut status,
            condition_types::DEGRADED,
            true,
            reason,
            message.clone(),
        );
        run.event(EventType::Warning, "RolloutStuck", message).await;
    } else {
        run.set(
            &mut status,
            condition_types::DEGRADED,
            false,
            "RolloutComplete",
            format!("every rollout target runs the current {}", C::NAMES.noun),
        );
    }
    let new_id = status
        .current_key
        .as_ref()
        .map(|k| k.id.clone())
        .unwrap_or_default();
    C::after_rollout(run, handle, &rotation, &new_id).await?;
    rotation.rolled_out_at = Some(time(now));
    if let Some(current) = status.current_key.as_mut() {
        current.rolled_out_at = Some(time(now));
    }
    if C::usage_expiry(spec).is_some() {
        // A new key gets its own chance to be used: the old key's verdict does not carry over.
        status
            .conditions
            .retain(|c| c.type_ != condition_types::KEY_IN_USE);
        run.ctx
            .metrics
            .current_key_unused
            .get_or_create(&run.usage_labels())
            .set(0);
    }
    if status.previous_key.is_some() {
        rotation.phase = RotationPhase::Overlapping;
        // The old credential's end is known now: the overlap runs from the end of the rollout.
        let overlap =
            SignedDuration::try_from(C::rotation(spec).overlap).unwrap_or(SignedDuration::ZERO);
        if let Some(prev) = status.previous_key.as_mut() {
            prev.expires_at = Some(time(now.checked_add(overlap).unwrap_or(now)));
        }
        status.rotation = Some(Box::new(rotation));
        run.write_status(status).await?;
    } else {
        finish(run, handle, status, rotation).await?;
    }
    Ok(StepOutcome::Continue)
}

async fn overlap<C: Credential>(run: &mut Run<'_, C>) -> Result<StepOutcome, ReconcileError> {
    let now = run.ctx.clock.now();
    let mut status = run.status();
    if !overlap_over(&status, now)
        && status
            .previous_key
            .as_ref()
            .is_some_and(|k| k.expires_at.is_some())
    {
        let ends = status
            .previous_key
            .as_ref()
            .and_then(|k| k.expires_at.as_ref())
            .map(|t| t.0)
            .unwrap_or(now);
        return Ok(StepOutcome::Wait(
            until(now, ends).max(Duration::from_secs(1)),
        ));
    }
    let mut rotation = rotation_of::<C>(&status);
    rotation.phase = RotationPhase::Expiring;
    status.rotation = Some(Box::new(rotation));
    run.write_status(status).await?;
    Ok(StepOutcome::Continue)
}

/// Usage-aware expiry: before a routine rotation retires the previous credential, asks Stripe
/// when it was last used. Returns how long to wait while it is held; `None` lets it be retired.
/// Kinds without a usage signal, and incidents (which never reach this phase with a previous
/// credential), are never held.
async fn hold_if_in_use<C: Credential>(
    run: &mut Run<'_, C>,
    spec: &C::Spec,
    handle: &AccountHandle,
) -> Result<Option<Duration>, ReconcileError> {
    let Some(settings) = C::usage_expiry(spec) else {
        return Ok(None);
    };
    let mut status = run.status();
    let mut rotation = rotation_of::<C>(&status);
    let Some(previous) = status.previous_key.clone() else {
        return Ok(None);
    };
    if rotation.trigger == RotationTrigger::Incident {
        return Ok(None);
    }
    let now = run.ctx.clock.now();
    let rolled_out = rotation
        .rolled_out_at
        .as_ref()
        .unwrap_or(&rotation.started_at)
        .0;
    let ceiling = later(rolled_out, settings.max_hold);
    if let Some(hold) = &rotation.usage_hold
        && now < hold.next_check_at.0
        && now < ceiling
    {
        // Not due yet: no call to Stripe.
        return Ok(Some(
            until(now, hold.next_check_at.0).max(Duration::from_secs(1)),
        ));
    }
    let last_used = C::last_used(run, handle, &previous.id).await?;
    let lag = run.ctx.config.last_used_lag;
    let checks = rotation
        .usage_hold
        .as_ref()
        .map(|h| h.checks.clamp(0, 32) as u32)
        .unwrap_or(0);
    let verdict = judge_old_key(rolled_out, last_used, now, lag, &settings, checks);
    let labels = run.usage_labels();
    let was_held = rotation.usage_hold.is_some();
    match verdict {
        OldKeyUsage::Held {
            last_used,
            next_check,
        } => {
            let message = format!(
                "previous {} {} was last used at {last_used}, after every rollout target had rolled \
                 onto the new one ({rolled_out}): something outside the rollout targets still uses \
                 it. It is kept until Stripe reports no use for {} (at the latest until {ceiling}); \
                 move that client to the current {} (Secret {}) or declare an incident to revoke it now",
                C::NAMES.noun,
                previous.id,
                humantime::format_duration(settings.quiet_period),
                C::NAMES.noun,
                C::declared(&run.obj).secret,
            );
            rotation.usage_hold = Some(crate::api::UsageHold {
                since: rotation
                    .usage_hold
                    .as_ref()
                    .map(|h| h.since.clone())
                    .unwrap_or_else(|| time(now)),
                last_used: time(last_used),
                next_check_at: time(next_check),
                checks: checks as i64 + 1,
            });
            status.rotation = Some(Box::new(rotation));
            run.set(
                &mut status,
                condition_types::DEGRADED,
                true,
                "OldKeyStillInUse",
                message.clone(),
            );
            run.write_status(status).await?;
            run.ctx.metrics.old_key_in_use.get_or_create(&labels).set(1);
            if !was_held {
                warn!(key = %previous.id, %last_used, "old key still in use: held");
                run.event(EventType::Warning, "OldKeyStillInUse", message)
                    .await;
            }
            Ok(Some(until(now, next_check).max(Duration::from_secs(1))))
        }
        OldKeyUsage::Quiet | OldKeyUsage::Ceiling { .. } => {
            if was_held || matches!(verdict, OldKeyUsage::Ceiling { .. }) {
                let (type_, reason, message) = match verdict {
                    OldKeyUsage::Ceiling { last_used } => (
                        EventType::Warning,
                        "OldKeyHoldCeiling",
                        format!(
                            "previous {} {} is still in use (last used at {last_used}) but its hold \
                             ceiling ({ceiling}) has passed: it is expired now",
                            C::NAMES.noun,
                            previous.id
                        ),
                    ),
                    _ => (
                        EventType::Normal,
                        "OldKeyQuiet",
                        format!(
                            "previous {} {} shows no use for {}: it is expired now",
                            C::NAMES.noun,
                            previous.id,
                            humantime::format_duration(settings.quiet_period)
                        ),
                    ),
                };
                rotation.usage_hold = None;
                status.rotation = Some(Box::new(rotation));
                run.set(
                    &mut status,
                    condition_types::DEGRADED,
                    false,
                    reason,
                    message.clone(),
                );
                run.write_status(status).await?;
                // The series goes with the hold (expire_previous removes it on every path).
                run.ctx.metrics.old_key_in_use.remove(&labels);
                run.event(type_, reason, message).await;
            }
            Ok(None)
        }
    }
}

/// The unused-key check of an idle resource: once `unusedAfter` has passed since the current
/// credential's rollout, asks Stripe (at most once per `--key-usage-check-interval`) whether it
/// has been used since (later than the rollout plus `--last-used-lag`); stops asking once it
/// has. Records the answer in `status` (written by the
/// caller) and returns when the next check is due. Never blocks anything.
async fn check_current_usage<C: Credential>(
    run: &mut Run<'_, C>,
    spec: &C::Spec,
    handle: &AccountHandle,
    status: &mut C::Status,
    rolled_out_now: bool,
) -> Result<Option<Timestamp>, ReconcileError> {
    let Some(settings) = C::usage_expiry(spec) else {
        return Ok(None);
    };
    let now = run.ctx.clock.now();
    let Some(current) = status.current_key.clone() else {
        return Ok(None);
    };
    let Some(rolled_out) = current.rolled_out_at.as_ref().map(|t| t.0) else {
        // A key rolled out before the operator recorded the moment: record it now.
        if rolled_out_now && let Some(k) = status.current_key.as_mut() {
            k.rolled_out_at = Some(time(now));
        }
        return Ok(None);
    };
    if current.last_used.is_some() {
        return Ok(None);
    }
    let after = later;
    let interval = run.ctx.config.key_usage_check_interval;
    let mut due = after(rolled_out, settings.unused_after);
    if let Some(checked) = &current.usage_checked_at {
        due = due.max(after(checked.0, interval));
    }
    if now < due {
        return Ok(Some(due));
    }
    let last_used = C::last_used(run, handle, &current.id).await?;
    let labels = run.usage_labels();
    let key = status.current_key.as_mut().expect("checked above");
    key.usage_checked_at = Some(time(now));
    // As for the old key: a use stamped within the lag of the rollout (the scope probe at mint,
    // coarse timestamps) does not prove the workloads use it.
    let threshold = later(rolled_out, run.ctx.config.last_used_lag);
    match last_used.filter(|u| *u > threshold) {
        Some(used) => {
            key.last_used = Some(time(used));
            run.set(
                status,
                condition_types::KEY_IN_USE,
                true,
                "CurrentKeyUsed",
                format!(
                    "Stripe reports {} {} used at {used}, after its rollout",
                    C::NAMES.noun,
                    current.id
                ),
            );
            run.ctx
                .metrics
                .current_key_unused
                .get_or_create(&labels)
                .set(0);
            Ok(None)
        }
        None => {
            let message = format!(
                "Stripe reports no use of the current {} {} since its rollout finished at {rolled_out} \
                 (last use: {}): the workloads may not be using the {} they were given \
                 (check their environment and that they read Secret {})",
                C::NAMES.noun,
                current.id,
                last_used
                    .map(|t| t.to_string())
                    .unwrap_or_else(|| "never".into()),
                C::NAMES.noun,
                C::declared(&run.obj).secret,
            );
            let changed =
                crate::api::conditions::find(&status.conditions, condition_types::KEY_IN_USE)
                    .is_none_or(|c| c.status != "False");
            run.set(
                status,
                condition_types::KEY_IN_USE,
                false,
                "CurrentKeyUnused",
                message.clone(),
            );
            run.ctx
                .metrics
                .current_key_unused
                .get_or_create(&labels)
                .set(1);
            if changed {
                run.event(EventType::Warning, "CurrentKeyUnused", message)
                    .await;
            }
            Ok(Some(after(now, interval)))
        }
    }
}

/// Retires the previous credential, drops it from the store and the Secret, and finishes.
async fn expire_previous<C: Credential>(
    run: &mut Run<'_, C>,
    handle: &AccountHandle,
) -> Result<(), ReconcileError> {
    run.ctx.metrics.old_key_in_use.remove(&run.usage_labels());
    let mut status = run.status();
    if let Some(previous) = status.previous_key.take() {
        // A hold that ends without its verdict (a refused spec retires on time) says so.
        if crate::api::conditions::find(&status.conditions, condition_types::DEGRADED)
            .is_some_and(|c| c.reason == "OldKeyStillInUse")
        {
            run.set(
                &mut status,
                condition_types::DEGRADED,
                false,
                "OldKeyExpired",
                format!("previous {} {} was expired", C::NAMES.noun, previous.id),
            );
        }
        status.retiring_keys.push(previous);
        run.write_status(status).await?;
        retire_pending(run, handle).await?;
    }
    // Drop the previous secret from the store (one CAS write).
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
    sync_secret(run).await?;
    let status = run.status();
    let rotation = rotation_of::<C>(&status);
    finish(run, handle, status, rotation).await
}

/// Ends a rotation: sweeps orphans, records the request as handled, clears the rotation.
async fn finish<C: Credential>(
    run: &mut Run<'_, C>,
    handle: &AccountHandle,
    mut status: C::Status,
    rotation: RotationState,
) -> Result<(), ReconcileError> {
    // The sweep records what it retires before retiring it (its own write).
    run.stage(status.clone());
    sweep_orphans(run, handle, finish_need(run.ctx, &rotation)).await?;
    status = run.status();
    status.rotation = None;
    if let Some(request) = rotation.request.clone() {
        status.last_handled_rotate_request = Some(request);
    }
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
    // Written by the idle step that follows in this reconcile (or the flush at its end).
    run.stage(status);
    run.ctx
        .metrics
        .rotations
        .get_or_create(&crate::metrics::RotationLabels {
            kind: C::NAMES.kind.into(),
            trigger: format!("{:?}", rotation.trigger),
        })
        .inc();
    // A first credential has no RotationStarted either: its KeyMinted and SecretSynced say it.
    if rotation.trigger != RotationTrigger::Initial {
        run.event(EventType::Normal, "RotationComplete", message)
            .await;
    }
    Ok(())
}

/// How recent the listing of the sweep that ends a completed `rotation` must be: any listing
/// within the sweep interval. A completed rotation made nothing Stripe holds that status does
/// not know: its creates shared one idempotency key (a replay answers with the same
/// credential); a create past the idempotency window, or an abandoned rotation's, was swept
/// in `mint` with a listing taken after it; a saved server error moves to a new attempt only
/// once a fresh listing showed that nothing was made; a wrongly scoped credential is on
/// `retiringKeys`. So this sweep only bounds what earlier faults left behind, and a bulk
/// rotation of one account lists its credentials once per interval, not once per create.
fn finish_need(ctx: &Context, rotation: &RotationState) -> Need {
    if rotation.sweep_first {
        Need::fresh(ctx.clock.now())
    } else {
        Need::within(ctx.config.orphan_sweep_interval)
    }
}

/// How recent the listing of a sweep on deletion during `rotation` must be: taken after the rotation's creates were sent (so it can show what they made) and within
/// the sweep interval; taken afresh when an abandoned rotation's create time is lost.
fn sweep_need(ctx: &Context, rotation: &RotationState) -> Need {
    let interval = ctx.config.orphan_sweep_interval;
    match &rotation.create_sent_at {
        _ if rotation.sweep_first => Need::fresh(ctx.clock.now()),
        Some(sent) => Need::after(sent.0, interval),
        None => Need::within(interval),
    }
}

/// Credentials this resource owns at Stripe that status does not know (a create whose answer
/// was lost beyond the idempotency window) are retired. The listing may be shared and up to
/// one interval old (`need`): it is compared with the status read after it arrived, so what
/// the resource minted since is never taken for an orphan, and what the listing does not show
/// yet is left for a later sweep.
async fn sweep_orphans<C: Credential>(
    run: &mut Run<'_, C>,
    handle: &AccountHandle,
    need: Need,
) -> Result<(), ReconcileError> {
    let owned = list_owned(run, handle, need).await?;
    let known = known_ids(&run.status());
    let orphans: Vec<Owned> = owned
        .into_iter()
        .filter(|o| o.active && !known.contains(&o.id))
        .collect();
    if orphans.is_empty() {
        return Ok(());
    }
    let mut status = run.status();
    for o in &orphans {
        status.retiring_keys.push(KeyStatus {
            id: o.id.clone(),
            fingerprint: "unknown".into(),
            context: run.context.clone(),
            ..KeyStatus::default()
        });
    }
    run.write_status(status).await?;
    retire_pending(run, handle).await?;
    for o in orphans {
        run.event(
            EventType::Warning,
            &C::NAMES.orphan_reason(),
            format!(
                "retired orphaned {} {} that this resource created but never published",
                C::NAMES.noun,
                o.id
            ),
        )
        .await;
    }
    Ok(())
}

/// Ready's message: which credential the Secret publishes.
fn published_message<C: Credential>(status: &C::Status, fp: &str) -> String {
    let id = status
        .current_key
        .as_ref()
        .map(|k| k.id.as_str())
        .unwrap_or_default();
    format!("{} {id} (fingerprint {fp}) is published", C::NAMES.noun)
}

enum IdleOutcome {
    Settled(Action),
    Rotate(RotationTrigger),
}

/// Steady state: keep Stripe's side (adapter's check), the Secret and the targets as declared,
/// keep status current, requeue for the next rotation. Writes nothing when nothing changed.
async fn idle<C: Credential>(
    run: &mut Run<'_, C>,
    spec: &C::Spec,
    handle: &AccountHandle,
) -> Result<IdleOutcome, ReconcileError> {
    let now = run.ctx.clock.now();
    if C::idle_check_due(&run.obj, spec, now).is_some_and(|at| at <= now)
        && let Some(trigger) = C::idle_check(run, handle, spec, now).await?
    {
        return Ok(IdleOutcome::Rotate(trigger));
    }
    if sync_secret(run).await? {
        run.event(
            EventType::Normal,
            "SecretRepaired",
            format!(
                "Secret {} did not hold what the spec publishes (missing, edited, or a delivery setting changed) and was written again",
                C::declared(&run.obj).secret
            ),
        )
        .await;
    }
    let mut status = run.status();
    let fp = current_fingerprint(&status);
    let report = roll_targets(run, &fp).await?;
    let next = next_rotation_at::<C>(&run.obj, spec);
    status.next_rotation_at = next.map(time);
    status.observed_generation = run.generation();
    let message = published_message::<C>(&status, &fp);
    run.set(
        &mut status,
        condition_types::READY,
        true,
        &C::NAMES.ready_reason(),
        message,
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
    match rollout_condition(&report) {
        Some((reason, message)) => run.set(
            &mut status,
            condition_types::DEGRADED,
            true,
            reason,
            message,
        ),
        None if report.is_complete() => run.set(
            &mut status,
            condition_types::DEGRADED,
            false,
            "RolloutComplete",
            format!("every rollout target runs the current {}", C::NAMES.noun),
        ),
        None => {}
    }
    // Boxed: the reconcile future is deep already (debug builds overflow test stacks).
    let usage_due = Box::pin(check_current_usage(
        run,
        spec,
        handle,
        &mut status,
        report.is_complete(),
    ))
    .await?;
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
    if let Some(at) = C::idle_check_due(&run.obj, spec, now) {
        wait = wait.min(until(now, at));
    }
    if let Some(at) = usage_due {
        wait = wait.min(until(now, at));
    }
    if !report.is_complete() {
        return Ok(IdleOutcome::Settled(Action::requeue(
            run.ctx.config.rollout_poll,
        )));
    }
    Ok(IdleOutcome::Settled(Action::requeue(
        wait.max(Duration::from_millis(200)),
    )))
}

/// Deletion: retire every credential the resource holds (when it says so), sweep orphans,
/// remove the store entry.
async fn cleanup<C: Credential>(
    obj: &C::Resource,
    ctx: &Context,
) -> Result<Action, ReconcileError> {
    let mut run = Run::<C>::new(ctx, obj);
    let declared = C::declared(obj);
    if declared.revoke_on_delete {
        match ctx.account(declared.account).await? {
            Some(account) => {
                run.context = Some(account.spec.context.clone());
                let handle = ctx.accounts.resolve(ctx, &account).await?;
                let observer = ctx.call_observer(
                    crate::audit::Actor::resource(C::NAMES.kind, Some(&run.ns), &run.name)
                        .triggered_by("Delete"),
                );
                let handle = AccountHandle {
                    client: handle.client.with_observer(observer),
                    ..handle
                };
                let mut status = run.status();
                let need = match &status.rotation {
                    Some(r) => sweep_need(ctx, r),
                    None => Need::within(ctx.config.orphan_sweep_interval),
                };
                retire_everything(&mut status);
                // Retire in memory only: the object is going away, so nothing is written back.
                let number = status.rotation_number.unwrap_or(0);
                for k in status.retiring_keys.clone() {
                    retire_one(&run, &handle, &k, number).await?;
                    run.event(
                        EventType::Normal,
                        &C::NAMES.retired_reason(),
                        format!(
                            "retired {} {} (fingerprint {}) because the resource is deleted",
                            C::NAMES.noun,
                            k.id,
                            k.fingerprint
                        ),
                    )
                    .await;
                }
                // A create in flight whose answer was never recorded is found by listing.
                for o in list_owned(&run, &handle, need).await? {
                    if o.active {
                        retire_one(
                            &run,
                            &handle,
                            &KeyStatus {
                                id: o.id.clone(),
                                ..KeyStatus::default()
                            },
                            number,
                        )
                        .await?;
                        run.event(
                            EventType::Warning,
                            &C::NAMES.orphan_reason(),
                            format!("retired orphaned {} {}", C::NAMES.noun, o.id),
                        )
                        .await;
                    }
                }
            }
            None => {
                warn!(
                    "the StripeAccount is gone: the {}s cannot be retired at Stripe",
                    C::NAMES.noun
                )
            }
        }
    }
    let path = run.store_path()?;
    ctx.store.delete(&path).await?;
    ctx.audit.record(
        crate::audit::AuditEntry::store_delete(
            crate::audit::Actor::resource(C::NAMES.kind, Some(&run.ns), &run.name)
                .triggered_by("Delete"),
            path.as_str(),
        )
        .success(),
    );
    ctx.metrics.forget_object(&run.labels());
    ctx.forget_resource(&run.uid);
    info!("resource deleted: credentials retired and store entry removed");
    Ok(Action::await_change())
}

/// Test fixtures every adapter's unit tests share.
#[cfg(test)]
pub(crate) mod fixtures {
    use super::*;
    use serde_json::{Value, json};

    /// The StripeAccount `acct` (context `acct_1`) in `mode`, admitting `selector`.
    pub fn account(selector: Value, mode: &str) -> StripeAccount {
        serde_json::from_value(json!({
            "apiVersion": "stripekeys.io/v1alpha1", "kind": "StripeAccount", "metadata": {"name": "acct"},
            "spec": {"mode": mode, "context": "acct_1", "credentials": {"secretRef": {"name": "s", "key": "k"}},
                     "namespaceSelector": selector}
        }))
        .unwrap()
    }

    pub fn now() -> Timestamp {
        "2026-06-01T00:00:00Z".parse().unwrap()
    }

    /// A resource of kind `C` named `name` in namespace `shop` (UID `uid-1`, generation 1).
    pub fn resource<C: Credential>(
        name: &str,
        spec: Value,
        status: Option<Value>,
        annotations: Value,
    ) -> C::Resource {
        serde_json::from_value(json!({
            "apiVersion": C::Resource::api_version(&()), "kind": C::Resource::kind(&()),
            "metadata": {"name": name, "namespace": "shop", "uid": "uid-1", "generation": 1,
                         "annotations": annotations},
            "spec": spec, "status": status,
        }))
        .unwrap()
    }

    /// Validation in a namespace without labels, at [`now`].
    pub fn validate<C: Credential>(
        obj: &C::Resource,
        account: Option<&StripeAccount>,
        guardrails: &[StripeGuardrail],
    ) -> Result<C::Spec, Refusal> {
        let labels = BTreeMap::new();
        let input = Inputs {
            account,
            namespace_labels: &labels,
            guardrails,
            now: now(),
        };
        C::validate(obj, &input)
    }

    /// Every kind refuses a missing account and a namespace its account does not select.
    pub fn assert_placement_refusals<C: Credential>(obj: &C::Resource) {
        let refusal = |a: Option<&StripeAccount>| validate::<C>(obj, a, &[]).err().unwrap();
        assert_eq!(refusal(None).reason, "AccountNotFound");
        let narrow = account(json!({"matchLabels": {"team": "pay"}}), "test");
        assert_eq!(refusal(Some(&narrow)).reason, "NamespaceNotAllowed");
    }

    /// A settled resource (`steady`, rotated a day before [`now`] every 720h) decides alike in
    /// every kind: idle now, a scheduled rotation a month later, a routine rotation for a new
    /// annotation, an escalation for an incident, and nothing for a request handled already.
    pub fn assert_annotations_and_schedule_decide<C: Credential>(
        steady: &C::Resource,
        v: &C::Spec,
    ) {
        let with = |annotations: Value, handled: Option<&str>| {
            let mut obj = steady.clone();
            obj.meta_mut().annotations = serde_json::from_value(annotations).unwrap();
            let mut value = serde_json::to_value(&obj).unwrap();
            if let Some(h) = handled {
                value["status"]["lastHandledRotateRequest"] = json!(h);
            }
            serde_json::from_value::<C::Resource>(value).unwrap()
        };
        assert_eq!(next_step::<C>(steady, v, now()), Next::Idle);
        let later: Timestamp = "2026-07-01T00:00:00Z".parse().unwrap();
        assert_eq!(
            next_step::<C>(steady, v, later),
            Next::Start(RotationTrigger::Schedule, None)
        );
        let asked = with(json!({"stripekeys.io/rotate": "1"}), None);
        assert_eq!(
            next_step::<C>(&asked, v, now()),
            Next::Start(RotationTrigger::Annotation, Some("1".into()))
        );
        let incident =
            json!({"stripekeys.io/rotate": "2", "stripekeys.io/rotate-reason": "incident"});
        let reported = with(incident.clone(), None);
        assert_eq!(
            next_step::<C>(&reported, v, now()),
            Next::Escalate("2".into())
        );
        let handled = with(incident, Some("2"));
        assert_eq!(
            next_step::<C>(&handled, v, now()),
            Next::Idle,
            "the same annotation never rotates twice"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(id: &str) -> KeyStatus {
        KeyStatus {
            id: id.into(),
            fingerprint: format!("fp-{id}"),
            ..KeyStatus::default()
        }
    }

    fn now() -> Timestamp {
        "2026-06-01T00:00:00Z".parse().unwrap()
    }

    fn rotation(phase: RotationPhase, number: i64, new_key: Option<&str>) -> RotationState {
        RotationState {
            phase,
            number,
            trigger: RotationTrigger::Annotation,
            started_at: time(now()),
            idempotency_key: format!("k{number}"),
            new_key: new_key.map(key),
            rolled_out_at: None,
            permissions: vec![],
            connect_permissions: vec![],
            request: Some("r1".into()),
            rollout_started_at: None,
            attempt: None,
            unprepared: false,
            create_sent_at: None,
            sweep_first: false,
            usage_hold: None,
        }
    }

    fn incident(value: &str) -> BTreeMap<String, String> {
        BTreeMap::from([
            (ROTATE_ANNOTATION.to_string(), value.to_string()),
            (
                ROTATE_REASON_ANNOTATION.to_string(),
                ROTATE_REASON_INCIDENT.to_string(),
            ),
        ])
    }

    #[test]
    fn an_incident_in_any_phase_retires_every_credential_handed_out() {
        for phase in [
            RotationPhase::Minting,
            RotationPhase::Storing,
            RotationPhase::Syncing,
            RotationPhase::RollingOut,
            RotationPhase::Overlapping,
            RotationPhase::Expiring,
        ] {
            let minted = phase != RotationPhase::Minting;
            let mut status = CredentialStatus {
                current_key: Some(key("k2")),
                previous_key: Some(key("k1")),
                rotation_number: Some(2),
                rotation: Some(Box::new(rotation(phase, 3, minted.then_some("k3")))),
                ..CredentialStatus::default()
            };
            assert_eq!(
                decide(&incident("r2"), &status, false, false),
                Next::Escalate("r2".into()),
                "{phase:?}"
            );
            let r = escalate(&mut status, "r2".into(), "uid", now());
            let mut doomed: Vec<&str> =
                status.retiring_keys.iter().map(|k| k.id.as_str()).collect();
            doomed.sort();
            let mut expected = vec!["k1", "k2"];
            if minted {
                expected.push("k3");
            }
            assert_eq!(doomed, expected, "{phase:?}");
            assert!(status.current_key.is_none() && status.previous_key.is_none());
            assert_eq!(r.trigger, RotationTrigger::Incident);
            assert_eq!(r.phase, RotationPhase::Minting);
            assert_eq!(r.number, 4, "never reuses an abandoned rotation's number");
            assert_eq!(r.request.as_deref(), Some("r2"));
            // Once the incident rotation runs, the request is not pending; retiring comes first.
            status.rotation = Some(Box::new(r));
            assert_eq!(decide(&incident("r2"), &status, false, false), Next::Retire);
        }
    }

    #[test]
    fn a_second_incident_during_an_incident_rotation_escalates_again() {
        let mut status = CredentialStatus {
            rotation_number: Some(1),
            ..CredentialStatus::default()
        };
        let mut r = escalate(&mut status, "r2".into(), "uid", now());
        r.new_key = Some(key("k5"));
        r.phase = RotationPhase::RollingOut;
        status.rotation = Some(Box::new(r));
        status.current_key = Some(key("k5"));
        assert_eq!(
            decide(&incident("r3"), &status, false, false),
            Next::Escalate("r3".into())
        );
        let r = escalate(&mut status, "r3".into(), "uid", now());
        assert_eq!(status.retiring_keys, vec![key("k5")]);
        assert_eq!(r.request.as_deref(), Some("r3"));
    }

    #[test]
    fn the_request_is_handled_only_when_its_rotation_ends() {
        let annotations = BTreeMap::from([(ROTATE_ANNOTATION.to_string(), "r1".to_string())]);
        let mut status = CredentialStatus {
            current_key: Some(key("k1")),
            rotation_number: Some(1),
            ..CredentialStatus::default()
        };
        assert_eq!(
            decide(&annotations, &status, false, false),
            Next::Start(RotationTrigger::Annotation, Some("r1".into()))
        );
        status.rotation = Some(Box::new(rotation(RotationPhase::Storing, 2, Some("k2"))));
        assert_eq!(
            decide(&annotations, &status, false, false),
            Next::Continue(RotationPhase::Storing)
        );
        status.rotation = None;
        status.last_handled_rotate_request = Some("r1".into());
        assert_eq!(decide(&annotations, &status, false, false), Next::Idle);
    }

    #[test]
    fn pending_retirements_come_before_the_rotation() {
        let status = CredentialStatus {
            current_key: Some(key("k1")),
            retiring_keys: vec![key("k0")],
            rotation: Some(Box::new(rotation(RotationPhase::Minting, 2, None))),
            ..CredentialStatus::default()
        };
        assert_eq!(decide(&BTreeMap::new(), &status, true, true), Next::Retire);
    }

    #[test]
    fn spec_changes_and_schedules_start_rotations_in_that_order() {
        let status = CredentialStatus {
            current_key: Some(key("k1")),
            ..CredentialStatus::default()
        };
        let none = BTreeMap::new();
        assert_eq!(
            decide(&none, &status, true, true),
            Next::Start(RotationTrigger::SpecChange, None)
        );
        assert_eq!(
            decide(&none, &status, false, true),
            Next::Start(RotationTrigger::Schedule, None)
        );
        assert_eq!(decide(&none, &status, false, false), Next::Idle);
        assert_eq!(
            decide(&none, &CredentialStatus::default(), false, false),
            Next::Start(RotationTrigger::Initial, None)
        );
    }

    #[test]
    fn a_create_abandoned_after_a_saved_error_uses_a_fresh_idempotency_key() {
        let mut r = rotation(RotationPhase::Minting, 2, None);
        assert_eq!(create_key("uid", &r), "k2");
        r.attempt = Some(1);
        let k1 = create_key("uid", &r);
        r.attempt = Some(2);
        let k2 = create_key("uid", &r);
        assert_ne!(k1, "k2");
        assert_ne!(k1, k2);
        assert_eq!(k1, idempotency_key("uid", 2, "mint-1"));
    }

    #[test]
    fn the_overlap_ends_at_the_recorded_expiry() {
        let mut prev = key("k1");
        let mut status = CredentialStatus {
            previous_key: Some(prev.clone()),
            ..CredentialStatus::default()
        };
        assert!(!overlap_over(&status, now()), "no expiry recorded yet");
        prev.expires_at = Some(time(now()));
        status.previous_key = Some(prev);
        assert!(overlap_over(&status, now()));
        let before: Timestamp = "2026-05-31T23:59:59Z".parse().unwrap();
        assert!(!overlap_over(&status, before));
    }

    #[test]
    fn an_old_key_is_held_only_for_uses_after_the_rollout_and_the_lag_until_quiet_or_the_ceiling() {
        let at = |m: i64| now() + SignedDuration::from_mins(m);
        let lag = Duration::from_secs(600);
        let settings = UsageExpiry {
            quiet_period: Duration::from_secs(1800),
            max_hold: Duration::from_secs(3 * 3600),
            unused_after: Duration::from_secs(3600),
        };
        let judge = |used: Option<i64>, t: i64, checks| {
            judge_old_key(now(), used.map(at), at(t), lag, &settings, checks)
        };
        assert_eq!(judge(None, 60, 0), OldKeyUsage::Quiet, "never used");
        assert_eq!(
            judge(Some(-5), 60, 0),
            OldKeyUsage::Quiet,
            "before the rollout"
        );
        assert_eq!(
            judge(Some(10), 60, 0),
            OldKeyUsage::Quiet,
            "within the lag of the rollout"
        );
        assert_eq!(
            judge(Some(55), 60, 0),
            OldKeyUsage::Held {
                last_used: at(55),
                next_check: at(61)
            }
        );
        // Backoff doubles, capped at 15 minutes and at the quiet time (55 + 30 + 10).
        assert_eq!(
            judge(Some(55), 62, 2),
            OldKeyUsage::Held {
                last_used: at(55),
                next_check: at(66)
            }
        );
        assert_eq!(
            judge(Some(55), 80, 8),
            OldKeyUsage::Held {
                last_used: at(55),
                next_check: at(95)
            }
        );
        assert_eq!(
            judge(Some(55), 94, 8),
            OldKeyUsage::Held {
                last_used: at(55),
                next_check: at(95)
            }
        );
        assert_eq!(
            judge(Some(55), 95, 3),
            OldKeyUsage::Quiet,
            "quiet period plus lag"
        );
        // The ceiling (rollout + 3h) ends any hold and caps the next check.
        assert_eq!(
            judge(Some(170), 175, 9),
            OldKeyUsage::Held {
                last_used: at(170),
                next_check: at(180)
            }
        );
        assert_eq!(
            judge(Some(179), 180, 1),
            OldKeyUsage::Ceiling { last_used: at(179) }
        );
    }

    #[test]
    fn error_backoff_grows_exponentially_with_jitter_and_a_cap() {
        let base = Duration::from_secs(1);
        let cap = Duration::from_secs(300);
        let d0 = backoff(base, cap, 0, 7);
        let d3 = backoff(base, cap, 3, 7);
        let d20 = backoff(base, cap, 20, 7);
        assert!(d0 >= base && d0 < base + Duration::from_millis(201));
        assert!(d3 >= Duration::from_secs(8) && d3 <= Duration::from_millis(9600));
        assert!(d20 >= cap && d20 <= cap + Duration::from_secs(60));
        assert_ne!(
            backoff(base, cap, 3, 1),
            backoff(base, cap, 3, 2),
            "jitter spreads objects that failed together"
        );
    }
}
