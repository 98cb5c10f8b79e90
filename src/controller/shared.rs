//! Steps every credential controller takes the same way: writing status, reading a namespace's
//! labels, keeping the synced Secret and rolling the workloads that consume it.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Namespace, ObjectReference, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DynamicObject, ListParams, Patch, PatchParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;

use super::Context;
use super::error::ReconcileError;
use crate::api::{FIELD_MANAGER, RolloutTarget, WorkloadKind};
use crate::inject::{self, Rollout};

/// A spec the controller refuses, with the condition reason and a message for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub reason: &'static str,
    pub message: String,
}

/// What every credential kind checks first: the account exists, serves the namespace, and the
/// delivery asks for nothing unsupported. Returns the account. Pure.
pub(crate) fn validate_placement<'a>(
    account: Option<&'a crate::api::StripeAccount>,
    account_name: &str,
    namespace: &str,
    namespace_labels: &BTreeMap<String, String>,
    sub_path: bool,
) -> Result<&'a crate::api::StripeAccount, Refusal> {
    let Some(account) = account else {
        return Err(Refusal {
            reason: "AccountNotFound",
            message: format!("StripeAccount {account_name:?} does not exist"),
        });
    };
    if !crate::rules::account_allows_namespace(account, namespace_labels) {
        return Err(Refusal {
            reason: "NamespaceNotAllowed",
            message: format!(
                "StripeAccount {account_name:?} does not serve namespace {namespace:?} (its namespaceSelector does not select it)"
            ),
        });
    }
    if sub_path {
        return Err(Refusal {
            reason: "InvalidSpec",
            message: SUB_PATH_UNSUPPORTED.into(),
        });
    }
    Ok(account)
}

/// Refuses a spec the guardrails do not allow, naming every violation.
pub(crate) fn refuse_violations(violations: &[crate::rules::Violation]) -> Result<(), Refusal> {
    if violations.is_empty() {
        return Ok(());
    }
    Err(Refusal {
        reason: "GuardrailViolation",
        message: violations
            .iter()
            .map(|v| v.message.clone())
            .collect::<Vec<_>>()
            .join("; "),
    })
}

pub(crate) fn time(t: Timestamp) -> Time {
    Time(t)
}

pub(crate) fn ts_from_chrono(t: chrono::DateTime<chrono::Utc>) -> Option<Time> {
    Timestamp::from_second(t.timestamp()).ok().map(Time)
}

pub(crate) fn ts_from_unix(seconds: i64) -> Option<Time> {
    Timestamp::from_second(seconds).ok().map(Time)
}

/// Server-side applies `status` (one field manager, forced) to the object `name` of `kind`,
/// on the condition that the object is still at `resource_version` (the one this reconcile read
/// or last wrote): the API server answers 409 Conflict otherwise, so a reconcile that worked on
/// an older object (a replica that lost its lease, a stale read) can never roll a newer status
/// back.
async fn apply_status<K>(
    api: &Api<K>,
    name: &str,
    kind: &str,
    resource_version: Option<&str>,
    status: &impl Serialize,
) -> Result<K, ReconcileError>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug,
{
    let mut patch = json!({
        "apiVersion": K::api_version(&()),
        "kind": kind,
        "status": status,
    });
    if let Some(rv) = resource_version {
        patch["metadata"] = json!({"resourceVersion": rv});
    }
    let pp = PatchParams::apply(FIELD_MANAGER).force();
    Ok(api.patch_status(name, &pp, &Patch::Apply(&patch)).await?)
}

/// The labels of namespace `ns` (none when it cannot be found).
pub(crate) async fn fetch_namespace_labels(
    ctx: &Context,
    ns: &str,
) -> Result<BTreeMap<String, String>, ReconcileError> {
    if let Some(labels) = ctx.caches().and_then(|c| c.namespace_labels(ns)) {
        return Ok(labels);
    }
    let api: Api<Namespace> = Api::all(ctx.client.clone());
    Ok(api
        .get_opt(ns)
        .await?
        .map(|n| n.labels().clone())
        .unwrap_or_default())
}

/// A digest of what the synced Secret `s` holds (its data and key id): in memory only, to
/// tell "unchanged" without reading the Secret again.
fn secret_digest(s: &Secret) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    if let Some(data) = &s.data {
        for (k, v) in data {
            k.hash(&mut h);
            v.0.hash(&mut h);
        }
    }
    s.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(inject::KEY_ID_ANNOTATION))
        .hash(&mut h);
    h.finish()
}

/// Applies the synced Secret `desired` when its data or key id differ from what the cluster
/// holds. A Secret that exists and is not controlled by `owner_uid` is never overwritten.
/// Returns whether it wrote.
///
/// Steady state reads nothing: when the operator's Secret cache shows the Secret at the
/// resourceVersion this resource last wrote (or found as desired), still controlled by it, and
/// the desired content is what it held then, nothing changed. Otherwise (first sync, a change
/// by anyone, a cold start) the Secret is read and compared.
pub(crate) async fn write_secret_if_changed(
    ctx: &Context,
    ns: &str,
    owner_uid: &str,
    desired: &Secret,
) -> Result<bool, ReconcileError> {
    let name = desired.metadata.name.clone().unwrap_or_default();
    let digest = secret_digest(desired);
    if let (Some(Some(cached)), Some(known)) = (
        ctx.caches().and_then(|c| c.secret_meta(ns, &name)),
        ctx.synced_secret(owner_uid),
    ) && *known.name == *name
        && known.digest == digest
        && cached.metadata.resource_version.as_deref() == Some(&*known.resource_version)
        && cached
            .metadata
            .owner_references
            .iter()
            .flatten()
            .any(|o| o.controller == Some(true) && o.uid == owner_uid)
    {
        return Ok(false);
    }
    tracing::debug!(
        namespace = ns,
        secret = %name,
        cached = ?ctx
            .caches()
            .and_then(|c| c.secret_meta(ns, &name))
            .map(|m| m.and_then(|m| m.metadata.resource_version.clone())),
        known = ?ctx.synced_secret(owner_uid).map(|k| (k.resource_version, k.digest == digest)),
        "reading the synced Secret"
    );
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let remember = |rv: Option<String>| {
        ctx.record_synced_secret(
            owner_uid,
            rv.map(|resource_version| super::SyncedSecret {
                name: name.as_str().into(),
                resource_version: resource_version.into(),
                digest,
            }),
        )
    };
    let known = ctx
        .synced_secret(owner_uid)
        .is_some_and(|k| *k.name == *name);
    if let (Some(None), false) = (ctx.caches().and_then(|c| c.secret_meta(ns, &name)), known) {
        // None of the operator's Secrets has this name (and this resource wrote none, which the
        // cache might not show yet): create it, which the API server refuses
        // when any Secret of that name exists (someone else's, or ours not yet in the cache):
        // then it is read and judged as below.
        let mut body = desired.clone();
        body.metadata.resource_version = None;
        match secrets
            .create(
                &kube::api::PostParams {
                    field_manager: Some(FIELD_MANAGER.into()),
                    ..Default::default()
                },
                &body,
            )
            .await
        {
            Ok(created) => {
                remember(created.metadata.resource_version.clone());
                return Ok(true);
            }
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => return Err(e.into()),
        }
    }
    let existing = secrets.get_opt(&name).await?;
    if !inject::may_write_secret(existing.as_ref(), owner_uid) {
        return Err(ReconcileError::SecretNotOwned {
            namespace: ns.to_string(),
            name,
        });
    }
    let key_id = |s: &Secret| {
        s.metadata
            .annotations
            .as_ref()
            .map(|a| a.get(inject::KEY_ID_ANNOTATION).cloned())
    };
    if let Some(existing) = &existing
        && existing.data == desired.data
        && key_id(existing) == key_id(desired)
    {
        remember(existing.metadata.resource_version.clone());
        return Ok(false);
    }
    let pp = PatchParams::apply(FIELD_MANAGER).force();
    let mut body = serde_json::to_value(desired)?;
    body["apiVersion"] = json!("v1");
    body["kind"] = json!("Secret");
    let written = secrets.patch(&name, &pp, &Patch::Apply(&body)).await?;
    remember(written.metadata.resource_version.clone());
    Ok(true)
}

fn workload_resource(kind: WorkloadKind) -> ApiResource {
    let gvk = GroupVersionKind::gvk(
        "apps",
        "v1",
        match kind {
            WorkloadKind::Deployment => "Deployment",
            WorkloadKind::StatefulSet => "StatefulSet",
            WorkloadKind::DaemonSet => "DaemonSet",
        },
    );
    ApiResource::from_gvk_with_plural(&gvk, kind.plural())
}

/// The workloads `targets` name, resolved (selectors listed), and the named ones that do not
/// exist (as that kind).
async fn resolve_targets(
    ctx: &Context,
    ns: &str,
    targets: &[RolloutTarget],
) -> Result<(Vec<(WorkloadKind, DynamicObject)>, Vec<String>), ReconcileError> {
    let mut out = Vec::new();
    let mut missing = Vec::new();
    for t in targets {
        let ar = workload_resource(t.kind);
        let api: Api<DynamicObject> = Api::namespaced_with(ctx.client.clone(), ns, &ar);
        if let Some(name) = &t.name {
            match api.get_opt(name).await? {
                Some(obj) => out.push((t.kind, obj)),
                None => missing.push(format!("{:?} {name}", t.kind)),
            }
        } else if let Some(selector) = &t.selector {
            let selector = kube::core::Selector::try_from(selector.clone()).map_err(|e| {
                ReconcileError::Account {
                    reason: "InvalidSpec",
                    message: format!("rolloutTargets selector: {e}"),
                }
            })?;
            let list = api
                .list(&ListParams::default().labels_from(&selector))
                .await?;
            out.extend(list.items.into_iter().map(|o| (t.kind, o)));
        }
    }
    Ok((out, missing))
}

/// Where the rollout targets stand.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct RolloutReport {
    /// Targets still rolling, with what they wait for.
    pub pending: Vec<String>,
    /// Named targets that do not exist (or not as the declared kind).
    pub missing: Vec<String>,
}

impl RolloutReport {
    /// Every target exists and runs the current credential.
    pub fn is_complete(&self) -> bool {
        self.pending.is_empty() && self.missing.is_empty()
    }
}

/// Empties the Secret `name` when this resource (`owner_uid`) controls it: its data is removed
/// and it is labelled superseded; the owner reference stays, so it goes with its owner. Emptying rather than
/// deleting keeps the operator without `delete` on Secrets, which RBAC cannot narrow to the
/// Secrets it owns. Returns whether it emptied one.
pub(crate) async fn empty_owned_secret(
    ctx: &Context,
    ns: &str,
    owner_uid: &str,
    name: &str,
) -> Result<bool, ReconcileError> {
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let Some(existing) = secrets.get_opt(name).await? else {
        return Ok(false);
    };
    if !inject::may_write_secret(Some(&existing), owner_uid)
        || existing.data.as_ref().is_none_or(|d| d.is_empty())
    {
        return Ok(false);
    }
    // A merge patch that nulls every key removes them on any API server (whatever its
    // server-side-apply field bookkeeping), and labels the Secret superseded.
    let data: serde_json::Map<String, serde_json::Value> = existing
        .data
        .iter()
        .flatten()
        .map(|(k, _)| (k.clone(), serde_json::Value::Null))
        .collect();
    let body = json!({
        "metadata": {"labels": {SUPERSEDED_LABEL: "true"}},
        "data": data,
    });
    secrets
        .patch(name, &PatchParams::default(), &Patch::Merge(&body))
        .await?;
    Ok(true)
}

/// The label on a synced Secret whose resource now publishes to another Secret.
pub const SUPERSEDED_LABEL: &str = "stripekeys.io/superseded";

/// The source whose secret the targets consume.
pub(crate) struct RolloutSource<'a> {
    /// `StripeKeyPolicy` or `StripeWebhookEndpoint`.
    pub kind: &'a str,
    /// Name of the source object.
    pub name: &'a str,
    /// Namespace of the source and of its targets.
    pub namespace: &'a str,
    /// The source, for Events.
    pub reference: &'a ObjectReference,
}

/// Patches every target with the current fingerprint (when it differs) and reports the ones
/// that have not finished rolling.
pub(crate) async fn roll_targets(
    ctx: &Context,
    source: &RolloutSource<'_>,
    targets: &[RolloutTarget],
    fingerprint: &str,
) -> Result<RolloutReport, ReconcileError> {
    let key = inject::rollout_annotation_key(source.kind, source.name);
    let (resolved, missing) = resolve_targets(ctx, source.namespace, targets).await?;
    let mut pending = Vec::new();
    for (kind, obj) in resolved {
        let name = obj.name_any();
        let value = serde_json::to_value(&obj)?;
        let state = match inject::rollout_state(kind, &value, &key, fingerprint) {
            Rollout::NotStarted => {
                let api: Api<DynamicObject> = Api::namespaced_with(
                    ctx.client.clone(),
                    source.namespace,
                    &workload_resource(kind),
                );
                let patched = api
                    .patch(
                        &name,
                        &PatchParams::default(),
                        &Patch::Merge(inject::rollout_patch(&key, fingerprint)),
                    )
                    .await?;
                ctx.audit.record(
                    crate::audit::AuditEntry::rollout_patch(
                        crate::audit::Actor::resource(
                            source.kind,
                            Some(source.namespace),
                            source.name,
                        ),
                        &format!("{kind:?}"),
                        source.namespace,
                        &name,
                    )
                    .fingerprint(fingerprint)
                    .success(),
                );
                ctx.crash_point("rolled")?;
                ctx.publish_event(
                    source.reference,
                    EventType::Normal,
                    "RolloutStarted",
                    "Reconcile",
                    format!("rolling {kind:?} {name} onto key fingerprint {fingerprint}"),
                )
                .await;
                inject::rollout_state(kind, &serde_json::to_value(&patched)?, &key, fingerprint)
            }
            other => other,
        };
        if let Rollout::InProgress(why) = state {
            pending.push(format!("{kind:?} {name}: {why}"));
        }
    }
    Ok(RolloutReport { pending, missing })
}

/// Refusal message for `delivery.vault.subPath`, which is not written yet: refused rather than
/// silently ignored.
pub(crate) const SUB_PATH_UNSUPPORTED: &str = "delivery.vault.subPath is not supported yet: the bundle is kept at \
     <prefix>/<namespace>/<kind>/<name> in the store; remove subPath and read that path";

/// Who acts, for the audit log: the resource, and what triggered the rotation running now
/// (`Reconcile` when none runs).
pub(crate) fn audit_actor(
    kind: &str,
    ns: &str,
    name: &str,
    rotation: Option<&crate::api::RotationState>,
) -> crate::audit::Actor {
    let actor = crate::audit::Actor::resource(kind, Some(ns), name);
    match rotation {
        Some(r) => actor.triggered_by(format!("{:?}", r.trigger)),
        None => actor,
    }
}

/// A resource whose status carries a rotation state machine: a StripeKeyPolicy or a
/// StripeWebhookEndpoint.
pub trait RotatingResource:
    Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
    + Clone
    + DeserializeOwned
    + std::fmt::Debug
{
    type Status: Serialize + PartialEq;
    fn status_slot(&mut self) -> &mut Option<Self::Status>;
    fn status_ref(&self) -> Option<&Self::Status>;
    fn rotation(status: &Self::Status) -> Option<&crate::api::RotationState>;
    fn current_key(status: &Self::Status) -> Option<&crate::api::KeyStatus>;
}

impl RotatingResource for crate::api::StripeKeyPolicy {
    type Status = crate::api::StripeKeyPolicyStatus;
    fn status_slot(&mut self) -> &mut Option<Self::Status> {
        &mut self.status
    }
    fn status_ref(&self) -> Option<&Self::Status> {
        self.status.as_ref()
    }
    fn rotation(status: &Self::Status) -> Option<&crate::api::RotationState> {
        status.rotation.as_deref()
    }
    fn current_key(status: &Self::Status) -> Option<&crate::api::KeyStatus> {
        status.current_key.as_ref()
    }
}

impl RotatingResource for crate::api::StripeWebhookEndpoint {
    type Status = crate::api::StripeWebhookEndpointStatus;
    fn status_slot(&mut self) -> &mut Option<Self::Status> {
        &mut self.status
    }
    fn status_ref(&self) -> Option<&Self::Status> {
        self.status.as_ref()
    }
    fn rotation(status: &Self::Status) -> Option<&crate::api::RotationState> {
        status.rotation.as_deref()
    }
    fn current_key(status: &Self::Status) -> Option<&crate::api::KeyStatus> {
        status.current_key.as_ref()
    }
}

/// Writes `status` to `obj` (server-side apply, one field manager) when it differs from what
/// `obj` has, so an unchanged resource causes no write; records a rotation phase change in the
/// audit log; keeps `obj` in step with what was written. The write is conditional on `obj`'s
/// resourceVersion: if anyone changed the object since it was read, it fails with 409 Conflict
/// (see [`is_conflict`]) and the reconcile starts again from a fresh read.
pub(crate) async fn write_status<K: RotatingResource>(
    ctx: &Context,
    api: &Api<K>,
    obj: &mut K,
    status: K::Status,
) -> Result<(), ReconcileError> {
    if obj.status_slot().as_ref() == Some(&status) {
        return Ok(());
    }
    let ns = obj.meta().namespace.clone().unwrap_or_default();
    let name = obj.meta().name.clone().unwrap_or_default();
    let kind = K::kind(&());
    let rv = obj.meta().resource_version.clone();
    let updated = apply_status(api, &name, &kind, rv.as_deref(), &status).await?;
    obj.meta_mut().resource_version = updated.meta().resource_version.clone();
    ctx.record_written(
        obj.meta().uid.as_deref().unwrap_or_default(),
        obj.meta().resource_version.as_deref(),
    );
    audit_transition(
        ctx,
        (&kind, &ns, &name),
        obj.status_slot().as_ref().and_then(K::rotation),
        K::rotation(&status),
        K::current_key(&status),
    );
    *obj.status_slot() = Some(status);
    Ok(())
}

/// Records a rotation's phase change (`Idle` when none runs) of the resource `kind` `ns/name` in
/// the audit log, with the key it concerns (the new one while a rotation runs, else the current
/// one) and the rotation's trigger (the ending rotation's, for its last transition).
fn audit_transition(
    ctx: &Context,
    (kind, ns, name): (&str, &str, &str),
    before: Option<&crate::api::RotationState>,
    after: Option<&crate::api::RotationState>,
    current_key: Option<&crate::api::KeyStatus>,
) {
    let phase = |r: Option<&crate::api::RotationState>| {
        r.map(|r| format!("{:?}", r.phase))
            .unwrap_or_else(|| "Idle".into())
    };
    let (from, to) = (phase(before), phase(after));
    if from == to {
        return;
    }
    let actor = audit_actor(kind, ns, name, after.or(before));
    let mut entry = crate::audit::AuditEntry::rotation_transition(actor, &from, &to).success();
    if let Some(k) = after.and_then(|r| r.new_key.as_ref()).or(current_key) {
        entry = entry.key(&k.id, &k.fingerprint);
    }
    ctx.audit.record(entry);
}

/// The entry point shared by the controllers: counts and times the reconcile, and runs `apply`
/// or `cleanup` behind the finalizer that guards the object's external state.
pub(crate) async fn reconcile_with_finalizer<K, A, AF, C, CF>(
    obj: std::sync::Arc<K>,
    ctx: std::sync::Arc<Context>,
    controller: &str,
    finalizer_name: &str,
    apply: A,
    cleanup: C,
) -> Result<kube::runtime::controller::Action, ReconcileError>
where
    K: kube::Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + serde::Serialize
        + std::fmt::Debug,
    A: FnOnce(std::sync::Arc<K>, std::sync::Arc<Context>) -> AF,
    AF: std::future::Future<Output = Result<kube::runtime::controller::Action, ReconcileError>>,
    C: FnOnce(std::sync::Arc<K>, std::sync::Arc<Context>) -> CF,
    CF: std::future::Future<Output = Result<kube::runtime::controller::Action, ReconcileError>>,
{
    use kube::runtime::finalizer::{Error as FinalizerError, Event as FinalizerEvent, finalizer};
    let started = std::time::Instant::now();
    let labels = crate::metrics::ControllerLabels {
        controller: controller.into(),
    };
    ctx.metrics.reconciliations.get_or_create(&labels).inc();
    let ns = obj.meta().namespace.clone().unwrap_or_default();
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &ns);
    let result = async {
        // The watch cache can lag behind our own status writes: a reconcile triggered by
        // another watch (the owned Secret, an Event) may run on an object older than the
        // rotation state we recorded, and would redo steps from there. The state machine is
        // decided on a fresh read.
        let uid = obj.meta().uid.clone().unwrap_or_default();
        let obj = if ctx.caches().is_some()
            && ctx.wrote_last(&uid, obj.meta().resource_version.as_deref())
        {
            // The cache hands us exactly the version our own last write produced: nothing is
            // newer that a fresh read could show (anyone's later write has another version, and
            // our writes are conditional on this one).
            obj.clone()
        } else {
            let Some(obj) = fresh(&api, &obj).await? else {
                return Ok(kube::runtime::controller::Action::await_change());
            };
            obj
        };
        if obj.meta().deletion_timestamp.is_none()
            && !obj.finalizers().iter().any(|f| f == finalizer_name)
        {
            // Add the finalizer and go on with the object it returns, in this reconcile (the
            // finalizer helper would end the reconcile and wait for the watch to bring it back).
            let obj = add_finalizer(&api, &obj, finalizer_name).await?;
            ctx.record_written(&uid, obj.meta().resource_version.as_deref());
            return apply(std::sync::Arc::new(obj), ctx.clone()).await;
        }
        finalizer(&api, finalizer_name, obj, |event| async {
            match event {
                FinalizerEvent::Apply(o) => apply(o, ctx.clone()).await,
                FinalizerEvent::Cleanup(o) => cleanup(o, ctx.clone()).await,
            }
        })
        .await
        .map_err(|e| match e {
            FinalizerError::ApplyFailed(e) | FinalizerError::CleanupFailed(e) => e,
            other => ReconcileError::Finalizer(other.to_string()),
        })
    }
    .await;
    ctx.metrics
        .reconcile_duration
        .get_or_create(&labels)
        .observe(started.elapsed().as_secs_f64());
    if result.is_ok() {
        ctx.record_success(obj.meta().uid.as_deref().unwrap_or_default());
    }
    result
}

/// Adds `finalizer` to `obj` on the condition that it is still at the version read (a JSON
/// patch with a test, as kube's finalizer helper does); returns the object as written.
async fn add_finalizer<K>(api: &Api<K>, obj: &K, finalizer: &str) -> Result<K, ReconcileError>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let current = obj.meta().finalizers.clone().unwrap_or_default();
    let ops = if current.is_empty() {
        json!([
            {"op": "test", "path": "/metadata/resourceVersion", "value": obj.meta().resource_version},
            {"op": "add", "path": "/metadata/finalizers", "value": [finalizer]},
        ])
    } else {
        json!([
            {"op": "test", "path": "/metadata/finalizers", "value": current},
            {"op": "add", "path": "/metadata/finalizers/-", "value": finalizer},
        ])
    };
    let patch: json_patch::Patch = serde_json::from_value(ops)?;
    let name = obj.meta().name.clone().unwrap_or_default();
    Ok(api
        .patch(&name, &PatchParams::default(), &Patch::Json::<()>(patch))
        .await?)
}

/// The object as the API server has it now (`None`: gone, or replaced by another object of the
/// same name), read instead of trusting the watch cache.
async fn fresh<K>(
    api: &Api<K>,
    cached: &std::sync::Arc<K>,
) -> Result<Option<std::sync::Arc<K>>, ReconcileError>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let name = cached.meta().name.clone().unwrap_or_default();
    Ok(api
        .get_opt(&name)
        .await?
        .filter(|o| o.meta().uid == cached.meta().uid)
        .map(std::sync::Arc::new))
}

/// Whether `error` is the API server's 409 Conflict: the object changed since it was read.
pub(crate) fn is_conflict(error: &ReconcileError) -> bool {
    matches!(error, ReconcileError::Kube(kube::Error::Api(s)) if s.code == 409 && s.reason == "Conflict")
}

/// How soon a reconcile whose write met a newer object runs again (on a fresh read).
pub const CONFLICT_REQUEUE: std::time::Duration = std::time::Duration::from_millis(200);

/// The error policy shared by the controllers: log and count the failure, back off, retry. A
/// conflict (the object changed since it was read) is no failure: the reconcile runs again
/// promptly on a fresh read, without backing off.
pub(crate) fn requeue_after_error(
    ctx: &Context,
    controller: &str,
    meta: &kube::api::ObjectMeta,
    error: &ReconcileError,
) -> kube::runtime::controller::Action {
    if is_conflict(error) {
        tracing::debug!(
            namespace = %meta.namespace.as_deref().unwrap_or_default(),
            name = %meta.name.as_deref().unwrap_or_default(),
            "the object changed since it was read; reconciling again on a fresh read"
        );
        return kube::runtime::controller::Action::requeue(CONFLICT_REQUEUE);
    }
    if let ReconcileError::Stripe(crate::stripe::StripeError::CircuitOpen { retry_in, .. }) = error
    {
        // The account's breaker is open: nothing was sent. Come back for the probe, spread
        // over a second so the account's resources do not all arrive at once (the scheduler
        // lets one through while the probe runs).
        tracing::debug!(
            namespace = %meta.namespace.as_deref().unwrap_or_default(),
            name = %meta.name.as_deref().unwrap_or_default(),
            "the Stripe account's circuit breaker is open; waiting for its probe"
        );
        ctx.metrics
            .reconcile_errors
            .get_or_create(&crate::metrics::ErrorLabels {
                controller: controller.into(),
                reason: error.reason(),
            })
            .inc();
        let uid = meta.uid.as_deref().unwrap_or_default();
        let spread = uid
            .bytes()
            .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)))
            % 1000;
        return kube::runtime::controller::Action::requeue(
            *retry_in + std::time::Duration::from_millis(spread),
        );
    }
    let reason = error.reason();
    tracing::warn!(
        namespace = %meta.namespace.as_deref().unwrap_or_default(),
        name = %meta.name.as_deref().unwrap_or_default(),
        %reason, error = %error, "reconcile failed"
    );
    ctx.metrics
        .reconcile_errors
        .get_or_create(&crate::metrics::ErrorLabels {
            controller: controller.into(),
            reason,
        })
        .inc();
    // Exponential with jitter, capped: a resource that keeps failing (Stripe down, a Secret it
    // does not own) costs less and less, and resources that failed together do not retry in step.
    let uid = meta.uid.as_deref().unwrap_or_default();
    let failures = ctx.record_failure(uid);
    let seed = uid.bytes().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100000001b3)
    });
    let base = ctx.config.error_backoff;
    let cap = base.max(ERROR_BACKOFF_CAP);
    kube::runtime::controller::Action::requeue(crate::rotation::engine::backoff(
        base, cap, failures, seed,
    ))
}

/// The longest wait between retries of a failing reconcile.
pub const ERROR_BACKOFF_CAP: std::time::Duration = std::time::Duration::from_secs(300);
