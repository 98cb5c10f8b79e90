//! Stripe's activity log, read per StripeAccount with a cursor (issue 16 §3).
//!
//! API-key lifecycle (created, updated, deleted, **viewed**) is not on Stripe's v1 Events API;
//! Stripe records it in the account's activity log (`GET /v2/iam/activity_logs`). The
//! StripeAccount controller reads it every `--activity-log-interval`: one listing per account
//! (filter `action_groups=api_key`, 100 a page), pages followed back to the newest entry already
//! handled. The cursor (that entry's id and time) lives in `status.activityLog`, and is written
//! after each entry that caused an action, so a restart neither handles an entry twice nor skips
//! one. The first read of an account only sets the cursor to the newest entry: history is not
//! replayed.
//!
//! What is done ([`decide`], pure):
//! - a managed key (current, previous, being minted or retiring in some StripeKeyPolicy's
//!   status) **viewed** by a person: Warning Event `KeyViewed` on the policy, an audit record,
//!   `stripe_key_operator_key_viewed_total`, and with `spec.rotation.onKeyViewed:
//!   IncidentRotation` an incident rotation (the rotate annotations with reason `incident`, the
//!   engine's one incident path; the request value names the entry, so a replay never rotates
//!   twice);
//! - a managed key **updated, rotated or deleted** by anyone but the operator: Warning Event
//!   `KeyTampered`, an audit record, `stripe_key_operator_key_tampered_total`, and a repair: the
//!   current key's name, note and permissions are re-applied and the answer verified (a repair
//!   that does not verify, a changed previous key, a rotated key and a deleted current key are
//!   re-minted through an incident rotation);
//! - a key **created** by a person: listed in `status.unmanagedKeys` and counted in
//!   `stripe_key_operator_unmanaged_keys`.
//!
//! The operator's own changes are told apart without configuration: it never updates or
//! expires a current key (an incident first moves it to `retiringKeys`), the expiry of a
//! retiring key or of the previous key while the rotation is `Expiring` is the routine end of an
//! overlap, and the actor ids of its own creates (keys carrying its owner mark) and repairs are
//! learned into `status.activityLog.operatorKeyIds`.

use std::collections::HashMap;

use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};

use super::Context;
use super::error::ReconcileError;
use super::shared::ts_from_chrono;
use crate::api::{
    ActivityLogStatus, OnKeyViewed, RotationPhase, StripeAccount, StripeAccountStatus,
    StripeKeyPolicy, UnmanagedKey,
};
use crate::stripe::{ActivityLog, ListActivityLogsParams, UpdateApiKeyParams};

/// Entries per page.
const PAGE_SIZE: u32 = 100;
/// Pages one read follows at most (10 000 entries); beyond, the oldest unread entries are
/// skipped and a warning says so.
const MAX_PAGES: usize = 100;
/// Unmanaged keys listed in status at most (newest first).
pub const MAX_UNMANAGED_LISTED: usize = 50;
/// Operator actor ids and pending repairs kept at most.
const MAX_REMEMBERED: usize = 10;
/// The action group the reader asks for.
const ACTION_GROUP: &str = "api_key";

/// The role a key plays in a policy's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `status.currentKey`.
    Current,
    /// `status.previousKey` (in its overlap).
    Previous,
    /// `status.rotation.newKey` (minted, not yet current).
    Minting,
    /// `status.retiringKeys` (being expired by the operator).
    Retiring,
}

/// A key some StripeKeyPolicy holds.
#[derive(Debug, Clone, PartialEq)]
pub struct ManagedKey {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub role: Role,
    pub on_key_viewed: OnKeyViewed,
    /// The policy's rotation is in phase `Expiring` (its previous key is being expired).
    pub expiring: bool,
    /// `status.rotationNumber` (the current key's note carries it).
    pub rotation_number: i64,
    /// The current key's declared permissions (sorted).
    pub permissions: Vec<String>,
    pub connect_permissions: Vec<String>,
}

/// Every key the policies of `account` hold, by id. Pure.
pub fn managed_keys(account: &str, policies: &[StripeKeyPolicy]) -> HashMap<String, ManagedKey> {
    let mut out = HashMap::new();
    for p in policies {
        add_managed_keys(&mut out, account, p);
    }
    out
}

/// Adds the keys `p` holds to `out` when it names `account`. Pure.
pub fn add_managed_keys(out: &mut HashMap<String, ManagedKey>, account: &str, p: &StripeKeyPolicy) {
    if p.spec.account_ref.name != account {
        return;
    }
    let Some(status) = &p.status else { return };
    let c = &status.credential;
    let base = ManagedKey {
        namespace: p.namespace().unwrap_or_default(),
        name: p.name_any(),
        uid: p.uid().unwrap_or_default(),
        role: Role::Current,
        on_key_viewed: p
            .spec
            .rotation
            .as_ref()
            .and_then(|r| r.on_key_viewed)
            .unwrap_or_default(),
        expiring: c
            .rotation
            .as_ref()
            .is_some_and(|r| r.phase == RotationPhase::Expiring),
        rotation_number: c.rotation_number.unwrap_or(1),
        permissions: status.current_permissions.clone(),
        connect_permissions: status.current_connect_permissions.clone(),
    };
    let roles = c
        .current_key
        .iter()
        .map(|k| (k, Role::Current))
        .chain(c.previous_key.iter().map(|k| (k, Role::Previous)))
        .chain(
            c.rotation
                .iter()
                .filter_map(|r| r.new_key.as_ref())
                .map(|k| (k, Role::Minting)),
        )
        .chain(c.retiring_keys.iter().map(|k| (k, Role::Retiring)));
    for (k, role) in roles {
        // A key in two places (retiring and current during an escalation): the stronger
        // role wins (current before retiring).
        out.entry(k.id.clone()).or_insert_with(|| ManagedKey {
            role,
            ..base.clone()
        });
    }
}

/// How a tampered key is repaired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Repair {
    /// Re-apply the declared name, note and permissions, and verify Stripe's answer.
    Reapply,
    /// Re-mint: an incident rotation retires every key handed out.
    Incident,
    /// Nothing to repair (the current key is untouched); warn only.
    None,
}

/// What one entry means for the operator. Pure.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Nothing to do.
    Ignore,
    /// The operator's own create (a key with its owner mark): the actor id is the operator's.
    LearnOwnActor(String),
    /// The update an earlier repair made: its actor is the operator's.
    OwnRepairSeen { key_id: String, actor_id: String },
    /// A person viewed a managed key.
    Viewed {
        key: ManagedKey,
        key_id: String,
        incident: bool,
    },
    /// Someone other than the operator changed a managed key.
    Tampered {
        key: ManagedKey,
        key_id: String,
        what: &'static str,
        repair: Repair,
    },
    /// A person created a key outside the operator.
    Unmanaged(UnmanagedKey),
    /// A key was deleted: if it is listed as unmanaged, it leaves the list.
    Deleted(String),
}

/// Whether a key's name and note are the operator's owner mark (see `keypolicy::create_params`).
fn has_owner_mark(k: &crate::stripe::ActivityLogApiKey) -> bool {
    let prefix = format!("{}/", super::keypolicy::KEY_NAME_PREFIX);
    k.name.as_deref().is_some_and(|n| n.starts_with(&prefix))
        && k.note
            .as_deref()
            .is_some_and(|n| n.starts_with("policy-uid="))
}

/// Decides what `entry` means, given the managed keys and the cursor's memory. Pure.
pub fn decide(
    entry: &ActivityLog,
    keys: &HashMap<String, ManagedKey>,
    cursor: &ActivityLogStatus,
) -> Decision {
    let Some(details) = entry.api_key() else {
        return Decision::Ignore;
    };
    let actor_key = entry.actor.api_key_id();
    let own = actor_key.is_some_and(|id| cursor.operator_key_ids.iter().any(|o| o == id));
    let action = entry.action.as_str();
    if action == "api_key_created" {
        if let Some(actor) = actor_key {
            if !own && has_owner_mark(details) {
                return Decision::LearnOwnActor(actor.to_string());
            }
            return Decision::Ignore;
        }
        return match entry.actor.user_email() {
            Some(_) if !keys.contains_key(&details.id) => Decision::Unmanaged(UnmanagedKey {
                id: details.id.clone(),
                name: details.name.clone(),
                created_by: entry.actor.describe(),
                created: ts_from_chrono(entry.created),
            }),
            _ => Decision::Ignore,
        };
    }
    let Some(key) = keys.get(&details.id) else {
        return if matches!(action, "api_key_deleted" | "api_key_expired") {
            Decision::Deleted(details.id.clone())
        } else {
            Decision::Ignore
        };
    };
    let tampered = |what: &'static str, repair: Repair| Decision::Tampered {
        key: key.clone(),
        key_id: details.id.clone(),
        what,
        repair,
    };
    match action {
        "api_key_viewed" => match entry.actor.user_email() {
            Some(_) => Decision::Viewed {
                key: key.clone(),
                key_id: details.id.clone(),
                // A retiring key is being killed already: nothing more to rotate.
                incident: key.on_key_viewed == OnKeyViewed::IncidentRotation
                    && key.role != Role::Retiring,
            },
            None => Decision::Ignore,
        },
        "api_key_updated" => {
            if let Some(actor) = actor_key
                && cursor.pending_repairs.contains(&details.id)
            {
                return Decision::OwnRepairSeen {
                    key_id: details.id.clone(),
                    actor_id: actor.to_string(),
                };
            }
            if key.role == Role::Retiring || own {
                return Decision::Ignore;
            }
            match key.role {
                Role::Current => tampered("updated", Repair::Reapply),
                _ => tampered("updated", Repair::Incident),
            }
        }
        "api_key_deleted" | "api_key_expired" => {
            let routine =
                key.role == Role::Retiring || (key.role == Role::Previous && key.expiring);
            if routine || own {
                return Decision::Ignore;
            }
            match key.role {
                Role::Previous => tampered("deleted", Repair::None),
                _ => tampered("deleted", Repair::Incident),
            }
        }
        "api_key_rotated" => {
            if key.role == Role::Retiring || own {
                return Decision::Ignore;
            }
            tampered("rotated", Repair::Incident)
        }
        _ => Decision::Ignore,
    }
}

/// Adds `value` to a bounded list (newest last), once.
fn remember(list: &mut Vec<String>, value: &str) {
    if !list.iter().any(|v| v == value) {
        list.push(value.to_string());
    }
    while list.len() > MAX_REMEMBERED {
        list.remove(0);
    }
}

/// Puts `key` at the head of the unmanaged list (bounded); updates the count.
fn add_unmanaged(status: &mut StripeAccountStatus, key: UnmanagedKey) {
    if status.unmanaged_keys.iter().any(|k| k.id == key.id) {
        return;
    }
    status.unmanaged_keys.insert(0, key);
    status.unmanaged_keys.truncate(MAX_UNMANAGED_LISTED);
    status.unmanaged_key_count = Some(status.unmanaged_key_count.unwrap_or(0) + 1);
}

fn remove_unmanaged(status: &mut StripeAccountStatus, id: &str) {
    let before = status.unmanaged_keys.len();
    status.unmanaged_keys.retain(|k| k.id != id);
    if status.unmanaged_keys.len() < before {
        status.unmanaged_key_count = Some((status.unmanaged_key_count.unwrap_or(1) - 1).max(0));
    }
}

/// Whether the account's activity log is due for a read at `now`. Pure.
pub fn read_due(
    interval: std::time::Duration,
    last_read: Option<Timestamp>,
    now: Timestamp,
) -> Option<std::time::Duration> {
    if interval.is_zero() {
        return Some(std::time::Duration::MAX);
    }
    let last = last_read?;
    let elapsed = std::time::Duration::try_from(now.duration_since(last)).unwrap_or_default();
    interval.checked_sub(elapsed).filter(|d| !d.is_zero())
}

/// What [`read`] needs from the StripeAccount controller.
pub struct Reader<'a> {
    pub ctx: &'a Context,
    pub api: &'a Api<StripeAccount>,
    pub account: &'a StripeAccount,
    /// The namespaces whose policies are read (`[None]`: all).
    pub namespaces: &'a [Option<String>],
}

impl Reader<'_> {
    /// The keys of the account's policies, read fresh (a page at a time).
    async fn managed_keys(
        &self,
        account: &str,
    ) -> Result<HashMap<String, ManagedKey>, ReconcileError> {
        let client = &self.ctx.client;
        let mut out = HashMap::new();
        for ns in self.namespaces {
            let api: Api<StripeKeyPolicy> = match ns {
                Some(ns) => Api::namespaced(client.clone(), ns),
                None => Api::all(client.clone()),
            };
            super::caches::for_each_listed(&api, &ListParams::default(), |p| {
                add_managed_keys(&mut out, account, &p)
            })
            .await?;
        }
        Ok(out)
    }

    /// Fetches the entries newer than the cursor, oldest first. `None`: the log holds nothing.
    async fn fetch(
        &self,
        client: &crate::stripe::StripeClient,
        cursor: &ActivityLogStatus,
    ) -> Result<Vec<ActivityLog>, ReconcileError> {
        let params = ListActivityLogsParams {
            action_groups: vec![ACTION_GROUP.into()],
            actions: Vec::new(),
            limit: Some(PAGE_SIZE),
        };
        let last_time = cursor
            .last_entry_time
            .as_ref()
            .map(|t| t.0.as_second())
            .unwrap_or(i64::MIN);
        let mut page = client.list_activity_logs(&params).await?.value;
        let mut newer = Vec::new();
        let mut pages = 1;
        loop {
            let mut reached = false;
            for e in page.data.drain(..) {
                if cursor.last_entry_id.as_deref() == Some(e.id.as_str())
                    || e.created.timestamp() < last_time
                {
                    reached = true;
                    break;
                }
                newer.push(e);
            }
            if reached {
                break;
            }
            match page.next_page_url.take().filter(|u| !u.is_empty()) {
                Some(next) if pages < MAX_PAGES => {
                    page = client.list_activity_logs_page(&next).await?.value;
                    pages += 1;
                }
                Some(_) => {
                    tracing::warn!(
                        account = %self.account.name_any(),
                        pages,
                        "the activity log holds more new entries than one read follows; the oldest unread ones are skipped"
                    );
                    break;
                }
                None => break,
            }
        }
        newer.reverse();
        Ok(newer)
    }
}

/// Reads the account's activity log once and acts on what concerns keys, updating `status`
/// (the cursor, the unmanaged keys). Status is written after each entry that caused an action.
pub async fn read(r: &Reader<'_>, status: &mut StripeAccountStatus) -> Result<(), ReconcileError> {
    let ctx = r.ctx;
    let account_name = r.account.name_any();
    let handle = ctx.accounts.resolve(ctx, r.account).await?;
    let observer = ctx.call_observer(
        crate::audit::Actor::resource("StripeAccount", None, account_name.clone())
            .triggered_by("ActivityLog"),
    );
    let client = handle.client.with_observer(observer);
    let mut cursor = status.activity_log.clone().unwrap_or_default();
    if cursor.started_at.is_none() {
        // The first read starts from now: only the newest entry's position is kept.
        let params = ListActivityLogsParams {
            action_groups: vec![ACTION_GROUP.into()],
            actions: Vec::new(),
            limit: Some(1),
        };
        let page = client.list_activity_logs(&params).await?.value;
        if let Some(newest) = page.data.first() {
            cursor.last_entry_id = Some(newest.id.clone());
            cursor.last_entry_time = ts_from_chrono(newest.created);
        }
        cursor.started_at = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            ctx.clock.now(),
        ));
        status.activity_log = Some(cursor);
        return Ok(());
    }
    let entries = r.fetch(&client, &cursor).await?;
    if entries.is_empty() {
        return Ok(());
    }
    let keys = r.managed_keys(&account_name).await?;
    for entry in &entries {
        let decision = decide(entry, &keys, &cursor);
        ctx.metrics
            .activity_log_entries
            .get_or_create(&crate::metrics::ActivityEntryLabels {
                account: account_name.clone(),
                action: entry.action.clone(),
            })
            .inc();
        let acted = match decision {
            Decision::Ignore => false,
            Decision::LearnOwnActor(id) => {
                remember(&mut cursor.operator_key_ids, &id);
                false
            }
            Decision::OwnRepairSeen { key_id, actor_id } => {
                cursor.pending_repairs.retain(|k| *k != key_id);
                remember(&mut cursor.operator_key_ids, &actor_id);
                false
            }
            Decision::Unmanaged(key) => {
                tracing::warn!(account = %account_name, key_id = %key.id, created_by = %key.created_by, "a key was created in the Stripe account outside the operator");
                add_unmanaged(status, key);
                false
            }
            Decision::Deleted(id) => {
                remove_unmanaged(status, &id);
                false
            }
            Decision::Viewed {
                key,
                key_id,
                incident,
            } => {
                viewed(ctx, entry, &key, &key_id, incident).await?;
                true
            }
            Decision::Tampered {
                key,
                key_id,
                what,
                repair,
            } => {
                let repaired = tampered(ctx, &client, entry, &key, &key_id, what, repair).await?;
                if repaired {
                    remember(&mut cursor.pending_repairs, &key_id);
                }
                true
            }
        };
        cursor.last_entry_id = Some(entry.id.clone());
        cursor.last_entry_time = ts_from_chrono(entry.created);
        status.activity_log = Some(cursor.clone());
        if acted {
            // The action happened: record that before the next entry, so a restart does not
            // act on this one again.
            super::stripeaccount::write_status(r.api, r.account, status.clone()).await?;
        }
    }
    status.activity_log = Some(cursor);
    Ok(())
}

fn policy_ref(key: &ManagedKey) -> k8s_openapi::api::core::v1::ObjectReference {
    k8s_openapi::api::core::v1::ObjectReference {
        api_version: Some(StripeKeyPolicy::api_version(&()).into_owned()),
        kind: Some(StripeKeyPolicy::kind(&()).into_owned()),
        namespace: Some(key.namespace.clone()),
        name: Some(key.name.clone()),
        uid: Some(key.uid.clone()),
        ..Default::default()
    }
}

fn rfc3339(t: chrono::DateTime<chrono::Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn role_name(role: Role) -> &'static str {
    match role {
        Role::Current => "current",
        Role::Previous => "previous",
        Role::Minting => "newly minted",
        Role::Retiring => "retiring",
    }
}

/// The rotate annotations with reason `incident`; the request value names the entry, so the
/// engine handles it once however often this runs.
async fn request_incident(
    ctx: &Context,
    key: &ManagedKey,
    entry: &ActivityLog,
    why: &str,
) -> Result<(), ReconcileError> {
    let api: Api<StripeKeyPolicy> = Api::namespaced(ctx.client.clone(), &key.namespace);
    let request = format!("activity-{}", entry.id);
    let patch = crate::rotate_cli::rotation_patch(&request, true, Some(why));
    match api
        .patch(&key.name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => Ok(()),
        // The policy is gone: its finalizer retires its keys anyway.
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

fn audit(
    ctx: &Context,
    key: &ManagedKey,
    key_id: &str,
    entry: &ActivityLog,
    response: &str,
    success: Result<(), String>,
) {
    let actor = crate::audit::Actor::resource(
        "StripeKeyPolicy",
        Some(key.namespace.as_str()),
        key.name.clone(),
    )
    .triggered_by("ActivityLog");
    let record = crate::audit::AuditEntry::new(crate::audit::Action::StripeActivity, actor)
        .key_id(key_id)
        .detail("activity_log_id", entry.id.clone())
        .detail("stripe_action", entry.action.clone())
        .detail("stripe_actor", entry.actor.describe())
        .detail("stripe_time", rfc3339(entry.created))
        .detail("key_role", role_name(key.role))
        .detail("response", response);
    ctx.audit.record(match success {
        Ok(()) => record.success(),
        Err(reason) => record.failure(reason),
    });
}

async fn viewed(
    ctx: &Context,
    entry: &ActivityLog,
    key: &ManagedKey,
    key_id: &str,
    incident: bool,
) -> Result<(), ReconcileError> {
    let who = entry.actor.describe();
    if incident {
        request_incident(
            ctx,
            key,
            entry,
            &format!("KeyViewed: {who} viewed key {key_id} in the Stripe Dashboard"),
        )
        .await?;
    }
    let response = if incident {
        "incident rotation requested (onKeyViewed: IncidentRotation)"
    } else {
        "alert only (onKeyViewed: Alert); if it may have left the Dashboard, run `stripe-key-operator rotate stripekeypolicy/NAME --incident`"
    };
    ctx.metrics
        .key_viewed
        .get_or_create(&crate::metrics::NamespacedLabels {
            namespace: key.namespace.clone(),
            name: key.name.clone(),
        })
        .inc();
    audit(ctx, key, key_id, entry, response, Ok(()));
    tracing::warn!(namespace = %key.namespace, name = %key.name, key_id, actor = %who, incident, "a managed key was viewed in the Stripe Dashboard");
    ctx.publish_event(
        &policy_ref(key),
        EventType::Warning,
        "KeyViewed",
        "ActivityLog",
        format!(
            "{who} viewed the {} key {key_id} in the Stripe Dashboard at {} (activity log {}): its secret may have been copied; {response}",
            role_name(key.role),
            rfc3339(entry.created),
            entry.id
        ),
    )
    .await;
    Ok(())
}

/// Re-applies the current key's declared name, note and permissions; `Ok(true)` when Stripe's
/// answer shows exactly them.
async fn reapply(
    client: &crate::stripe::StripeClient,
    key: &ManagedKey,
    key_id: &str,
    entry: &ActivityLog,
) -> Result<bool, ReconcileError> {
    let sorted = |v: &[String]| {
        let mut v = v.to_vec();
        v.sort();
        v
    };
    let params = UpdateApiKeyParams {
        name: Some(super::keypolicy::key_name(&key.namespace, &key.name)),
        note: Some(format!(
            "policy-uid={} rotation={}",
            key.uid, key.rotation_number
        )),
        permissions: Some(key.permissions.clone()),
        connect_permissions: (!key.connect_permissions.is_empty())
            .then(|| key.connect_permissions.clone()),
    };
    let idem = crate::stripe::idempotency_key(
        &key.uid,
        key.rotation_number.max(0) as u64,
        &format!("repair-{}", entry.id),
    );
    match client.update_api_key(key_id, &params, &idem).await {
        Ok(answer) => {
            let k = answer.value;
            Ok(
                k.permissions.as_deref().map(sorted) == Some(sorted(&key.permissions))
                    && sorted(k.connect_permissions.as_deref().unwrap_or_default())
                        == sorted(&key.connect_permissions)
                    && k.name == params.name,
            )
        }
        // Stripe refused (the key is gone, expired, or the parameters): re-mint instead.
        Err(e)
            if e.status()
                .is_some_and(|s| (400..500).contains(&s) && s != 429) =>
        {
            Ok(false)
        }
        Err(e) => Err(e.into()),
    }
}

/// Acts on a tampered key; `Ok(true)` when its permissions were re-applied (the update this
/// made will show in the log as the operator's own).
async fn tampered(
    ctx: &Context,
    client: &crate::stripe::StripeClient,
    entry: &ActivityLog,
    key: &ManagedKey,
    key_id: &str,
    what: &str,
    repair: Repair,
) -> Result<bool, ReconcileError> {
    let who = entry.actor.describe();
    let (response, repaired) = match repair {
        Repair::Reapply => {
            if reapply(client, key, key_id, entry).await? {
                (
                    "its name, note and permissions were re-applied and verified".to_string(),
                    true,
                )
            } else {
                request_incident(
                    ctx,
                    key,
                    entry,
                    &format!("KeyTampered: {who} {what} key {key_id}; re-applying its permissions did not verify"),
                )
                .await?;
                (
                    "re-applying its permissions did not verify: an incident rotation re-mints it"
                        .to_string(),
                    false,
                )
            }
        }
        Repair::Incident => {
            request_incident(
                ctx,
                key,
                entry,
                &format!("KeyTampered: {who} {what} key {key_id} outside the operator"),
            )
            .await?;
            (
                "an incident rotation re-mints it and retires every key handed out".to_string(),
                false,
            )
        }
        Repair::None => (
            "the current key is untouched; workloads still on the previous key lost it".to_string(),
            false,
        ),
    };
    ctx.metrics
        .key_tampered
        .get_or_create(&crate::metrics::NamespacedLabels {
            namespace: key.namespace.clone(),
            name: key.name.clone(),
        })
        .inc();
    audit(ctx, key, key_id, entry, &response, Ok(()));
    tracing::warn!(namespace = %key.namespace, name = %key.name, key_id, actor = %who, what, "a managed key was changed outside the operator");
    ctx.publish_event(
        &policy_ref(key),
        EventType::Warning,
        "KeyTampered",
        "ActivityLog",
        format!(
            "{who} {what} the {} key {key_id} outside the operator at {} (activity log {}): {response}",
            role_name(key.role),
            rfc3339(entry.created),
            entry.id
        ),
    )
    .await;
    Ok(repaired)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn entry(action: &str, actor: serde_json::Value, key: serde_json::Value) -> ActivityLog {
        serde_json::from_value(json!({
            "id": "actlog_1", "object": "v2.iam.activity_log", "type": action, "actor": actor,
            "context": "acct_1", "created": "2026-11-30T06:00:00Z", "livemode": false,
            "details": {"type": "api_key", "api_key": key}
        }))
        .unwrap()
    }

    fn user() -> serde_json::Value {
        json!({"type": "user", "user": {"email": "ann@example.com"}})
    }

    fn app(id: &str) -> serde_json::Value {
        json!({"type": "api_key", "api_key": {"id": id}})
    }

    fn keys(role: Role, on_key_viewed: OnKeyViewed, expiring: bool) -> HashMap<String, ManagedKey> {
        HashMap::from([(
            "apikey_m".to_string(),
            ManagedKey {
                namespace: "shop".into(),
                name: "checkout".into(),
                uid: "uid-1".into(),
                role,
                on_key_viewed,
                expiring,
                rotation_number: 3,
                permissions: vec!["charge_read".into()],
                connect_permissions: vec![],
            },
        )])
    }

    fn managed() -> serde_json::Value {
        json!({"id": "apikey_m", "name": "stripe-key-operator/shop/checkout", "note": "policy-uid=uid-1 rotation=3"})
    }

    #[test]
    fn a_person_viewing_a_managed_key_is_reported_with_the_policys_choice() {
        let cursor = ActivityLogStatus::default();
        let e = entry("api_key_viewed", user(), managed());
        for (choice, role, incident) in [
            (OnKeyViewed::Alert, Role::Current, false),
            (OnKeyViewed::IncidentRotation, Role::Current, true),
            (OnKeyViewed::IncidentRotation, Role::Previous, true),
            (OnKeyViewed::IncidentRotation, Role::Retiring, false),
        ] {
            match decide(&e, &keys(role, choice, false), &cursor) {
                Decision::Viewed { incident: i, .. } => {
                    assert_eq!(i, incident, "{choice:?} {role:?}")
                }
                other => panic!("{other:?}"),
            }
        }
        // An API key "viewing" (retrieving) is not a person in the Dashboard.
        let e = entry("api_key_viewed", app("apikey_x"), managed());
        assert_eq!(
            decide(&e, &keys(Role::Current, OnKeyViewed::Alert, false), &cursor),
            Decision::Ignore
        );
        // An unmanaged key viewed: nothing to do.
        let e = entry("api_key_viewed", user(), json!({"id": "apikey_other"}));
        assert_eq!(
            decide(&e, &keys(Role::Current, OnKeyViewed::Alert, false), &cursor),
            Decision::Ignore
        );
    }

    #[test]
    fn changes_by_others_are_tampering_and_the_operators_own_are_not() {
        let mut cursor = ActivityLogStatus::default();
        let k = keys(Role::Current, OnKeyViewed::Alert, false);
        let updated = entry("api_key_updated", user(), managed());
        assert!(matches!(
            decide(&updated, &k, &cursor),
            Decision::Tampered {
                repair: Repair::Reapply,
                what: "updated",
                ..
            }
        ));
        let deleted = entry("api_key_deleted", app("apikey_other_app"), managed());
        assert!(matches!(
            decide(&deleted, &k, &cursor),
            Decision::Tampered {
                repair: Repair::Incident,
                what: "deleted",
                ..
            }
        ));
        // A changed previous key is not trusted: re-mint.
        let prev = keys(Role::Previous, OnKeyViewed::Alert, false);
        assert!(matches!(
            decide(&updated, &prev, &cursor),
            Decision::Tampered {
                repair: Repair::Incident,
                ..
            }
        ));
        // The routine end of an overlap and an incident's retirement are the operator's.
        let own_expiry = entry("api_key_deleted", app("apikey_app"), managed());
        assert_eq!(
            decide(
                &own_expiry,
                &keys(Role::Previous, OnKeyViewed::Alert, true),
                &cursor
            ),
            Decision::Ignore
        );
        assert_eq!(
            decide(
                &own_expiry,
                &keys(Role::Retiring, OnKeyViewed::Alert, false),
                &cursor
            ),
            Decision::Ignore
        );
        // The operator's own create teaches its actor id; after that its updates are its own.
        let created = entry("api_key_created", app("apikey_app"), managed());
        assert_eq!(
            decide(&created, &HashMap::new(), &cursor),
            Decision::LearnOwnActor("apikey_app".into())
        );
        cursor.operator_key_ids.push("apikey_app".into());
        let own_update = entry("api_key_updated", app("apikey_app"), managed());
        assert_eq!(decide(&own_update, &k, &cursor), Decision::Ignore);
        // A create by another app without the owner mark teaches nothing.
        let other = entry(
            "api_key_created",
            app("apikey_other_app"),
            json!({"id": "apikey_n", "name": "stripe-key-operator/shop/x", "note": "hello"}),
        );
        assert_eq!(
            decide(&other, &HashMap::new(), &ActivityLogStatus::default()),
            Decision::Ignore
        );
        // The update a repair made is recognised, and teaches the actor id.
        // (even when that actor is known already: the pending repair is consumed)
        let cursor = ActivityLogStatus {
            pending_repairs: vec!["apikey_m".into()],
            operator_key_ids: vec!["apikey_app2".into()],
            ..Default::default()
        };
        assert_eq!(
            decide(
                &entry("api_key_updated", app("apikey_app2"), managed()),
                &k,
                &cursor
            ),
            Decision::OwnRepairSeen {
                key_id: "apikey_m".into(),
                actor_id: "apikey_app2".into()
            }
        );
    }

    #[test]
    fn keys_created_by_a_person_are_unmanaged_until_deleted() {
        let cursor = ActivityLogStatus::default();
        let e = entry(
            "api_key_created",
            user(),
            json!({"id": "apikey_shadow", "name": "laptop"}),
        );
        let Decision::Unmanaged(k) = decide(&e, &HashMap::new(), &cursor) else {
            panic!()
        };
        assert_eq!(k.created_by, "user ann@example.com");
        let mut status = StripeAccountStatus::default();
        add_unmanaged(&mut status, k.clone());
        add_unmanaged(&mut status, k);
        assert_eq!(status.unmanaged_key_count, Some(1));
        for i in 0..60 {
            add_unmanaged(
                &mut status,
                UnmanagedKey {
                    id: format!("apikey_{i}"),
                    ..Default::default()
                },
            );
        }
        assert_eq!(status.unmanaged_keys.len(), MAX_UNMANAGED_LISTED);
        assert_eq!(status.unmanaged_keys[0].id, "apikey_59", "newest first");
        assert_eq!(status.unmanaged_key_count, Some(61));
        let gone = entry("api_key_deleted", user(), json!({"id": "apikey_59"}));
        assert_eq!(
            decide(&gone, &HashMap::new(), &cursor),
            Decision::Deleted("apikey_59".into())
        );
        remove_unmanaged(&mut status, "apikey_59");
        assert_eq!(status.unmanaged_key_count, Some(60));
    }

    #[test]
    fn a_read_is_due_once_per_interval() {
        let i = std::time::Duration::from_secs(60);
        let t0 = Timestamp::from_second(1_000_000).unwrap();
        assert_eq!(read_due(i, None, t0), None);
        assert_eq!(
            read_due(
                i,
                Some(t0),
                t0 + k8s_openapi::jiff::SignedDuration::from_secs(20)
            ),
            Some(std::time::Duration::from_secs(40))
        );
        assert_eq!(
            read_due(
                i,
                Some(t0),
                t0 + k8s_openapi::jiff::SignedDuration::from_secs(60)
            ),
            None
        );
        assert!(
            read_due(std::time::Duration::ZERO, None, t0).is_some(),
            "off"
        );
    }
}
