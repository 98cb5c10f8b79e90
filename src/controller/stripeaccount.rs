//! The `StripeAccount` controller: the account's own health and its deletion guard.
//!
//! - **Status.** `Ready` says the account passes [`crate::rules::validate_account`], its app key
//!   resolves, and Stripe answers one cheap authenticated call for its context (a one-item key
//!   listing). The check runs when the spec changes and otherwise at most every
//!   [`CHECK_INTERVAL`] (sooner, [`LOCAL_RECHECK`], when it failed before reaching Stripe: a
//!   missing Secret costs no Stripe call); reconciles in between (a policy changed) only recount
//!   `keysUnderManagement` from the watch caches, at most once per account per
//!   [`RECOUNT_WINDOW`] however many policies change (a recount is a pass over every cached
//!   policy). Policies never pay for the check.
//! - **Deletion.** The finalizer [`FINALIZER`] keeps the account while any StripeKeyPolicy or
//!   StripeWebhookEndpoint that names it still holds a credential (current, previous, retiring,
//!   or a rotation under way): their own finalizers need the account to retire those at Stripe.
//!   Meanwhile `Ready=False, reason=InUse` and a Warning Event `DeletionBlocked` name them. The
//!   decision reads the resources fresh from the API server, never only from a cache.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::Context;
use super::accounts::{ContextKey, HealthSnapshot};
use super::caches::for_each_listed;
use super::error::ReconcileError;
use super::holdings::{self, Holdings};
use crate::api::{
    CircuitState, CredentialStatus, FIELD_MANAGER, StripeAccount, StripeAccountStatus,
    StripeCallHealth, StripeKeyPolicy, StripeWebhookEndpoint, conditions,
};
use crate::stripe::{ListApiKeysParams, StripeError};

/// Keeps an account while resources still hold credentials minted through it.
pub const FINALIZER: &str = "stripekeys.io/account-protection";
/// The controller's name in metrics.
const CONTROLLER: &str = "stripeaccount";
/// How often a healthy (or Stripe-refused) account is checked at Stripe.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(300);
/// How soon a check that failed before reaching Stripe (no credentials, untrusted) is repeated.
pub const LOCAL_RECHECK: Duration = Duration::from_secs(30);
/// How often a blocked deletion is looked at again (besides the watches).
const BLOCKED_RECHECK: Duration = Duration::from_secs(30);
/// How long a reconcile waits for the first listing of the policy and endpoint caches.
const CACHE_WAIT: Duration = Duration::from_secs(30);
/// At most this many resources are named in a condition or Event.
const MAX_NAMED: usize = 10;

/// Reasons of the `Ready` condition that were decided without calling Stripe.
const LOCAL_REASONS: &[&str] = &["CredentialsMissing", "Untrusted", "CredentialsUnavailable"];

/// What the controller's reconciles share: the operator context and the watch caches of the
/// resources that name accounts (one per watched namespace, or one for all).
pub struct AccountContext {
    pub ctx: Arc<Context>,
    /// What each watched policy and endpoint names and holds (one per watched namespace).
    policies: Vec<Arc<Holdings>>,
    endpoints: Vec<Arc<Holdings>>,
    namespaces: Vec<Option<String>>,
    /// When each account's activity log was last read (by UID; in memory: after a restart the
    /// first reconcile reads at once, and the cursor in status says where to resume).
    activity_reads:
        std::sync::Mutex<std::collections::HashMap<String, k8s_openapi::jiff::Timestamp>>,
    /// When each account's keys were last counted (by UID; in memory: after a restart the
    /// first reconcile counts at once).
    recounts: std::sync::Mutex<std::collections::HashMap<String, std::time::Instant>>,
}

/// A resource holds credentials of its account: something is still to be retired at Stripe.
pub fn holds_credentials(status: &CredentialStatus) -> bool {
    status.current_key.is_some()
        || status.previous_key.is_some()
        || !status.retiring_keys.is_empty()
        || status.rotation.is_some()
}

/// `Kind ns/name` of `obj` when it names `account` and holds a credential.
fn holder<K: Resource<DynamicType = ()>>(
    account: &str,
    obj: &K,
    named: &str,
    status: Option<&CredentialStatus>,
) -> Option<String> {
    (named == account && status.is_some_and(holds_credentials)).then(|| {
        format!(
            "{} {}/{}",
            K::kind(&()),
            obj.namespace().unwrap_or_default(),
            obj.name_any()
        )
    })
}

/// `Kind ns/name` of every resource in `found` that names `account` and holds a credential.
#[cfg(test)]
fn holders<'a>(
    account: &str,
    policies: impl IntoIterator<Item = &'a StripeKeyPolicy>,
    endpoints: impl IntoIterator<Item = &'a StripeWebhookEndpoint>,
) -> Vec<String> {
    let mut out: Vec<String> = policies
        .into_iter()
        .filter_map(|p| holder(account, p, &p.spec.account_ref.name, p.status.as_deref()))
        .chain(
            endpoints
                .into_iter()
                .filter_map(|e| holder(account, e, &e.spec.account_ref.name, e.status.as_deref())),
        )
        .collect();
    out.sort();
    out
}

/// A bounded, readable list of names: `a, b, c (and 7 more)`.
pub fn name_list(names: &[String]) -> String {
    let shown = names
        .iter()
        .take(MAX_NAMED)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > MAX_NAMED {
        format!("{shown} (and {} more)", names.len() - MAX_NAMED)
    } else {
        shown
    }
}

/// The `Ready` reason for a failed check. Pure.
pub fn failure_reason(error: &ReconcileError) -> &'static str {
    match error {
        ReconcileError::Account { reason, .. } => match *reason {
            "AccountCredentialsMissing" => "CredentialsMissing",
            "ApiHostNotAllowed"
            | "CredentialPathNotAllowed"
            | "CredentialSecretNotLabelled"
            | "InvalidSpec" => "Untrusted",
            _ => "EncryptionKeyInvalid",
        },
        ReconcileError::Stripe(e) => stripe_reason(e),
        ReconcileError::Store(_) => "CredentialsUnavailable",
        _ => "CheckFailed",
    }
}

fn stripe_reason(e: &StripeError) -> &'static str {
    if matches!(e, StripeError::CircuitOpen { .. }) {
        return "StripeUnavailable";
    }
    match e.status() {
        Some(401) => "Unauthorized",
        Some(403) => "PermissionDenied",
        Some(429) => "StripeRateLimited",
        Some(s) if s >= 500 => "StripeUnavailable",
        Some(_) => "StripeRequestRejected",
        None => match e {
            StripeError::Connection { .. } => "StripeUnreachable",
            _ => "StripeRequestRejected",
        },
    }
}

/// `message` with anything shaped like a Stripe key (Stripe's own messages quote the app key's
/// prefix and last characters) replaced: status shows ids and reasons, never key material.
pub fn redact(message: &str) -> String {
    static KEY: std::sync::LazyLock<regex::Regex> = std::sync::LazyLock::new(|| {
        regex::Regex::new(r"\b(?:sk|rk|pk)_(?:live|test)_[^\s,;)\]]*|\bwhsec_[^\s,;)\]]*")
            .expect("static regex is valid")
    });
    KEY.replace_all(message, "<redacted key>").into_owned()
}

fn rfc3339(t: std::time::SystemTime) -> String {
    // Whole seconds: the status changes only when the time it shows does.
    let secs = t
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    k8s_openapi::jiff::Timestamp::from_second(secs)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

/// What `status.stripe` shows for a Stripe account's health. Pure.
pub fn call_health(health: &HealthSnapshot, now: std::time::SystemTime) -> StripeCallHealth {
    let circuit = match health.breaker.state {
        crate::stripe::CircuitState::Closed => CircuitState::Closed,
        crate::stripe::CircuitState::Open => CircuitState::Open,
        crate::stripe::CircuitState::HalfOpen => CircuitState::HalfOpen,
    };
    StripeCallHealth {
        circuit,
        circuit_opened_at: health.breaker.opened_at.map(rfc3339),
        next_probe_at: health.breaker.next_probe.map(rfc3339),
        // Rounded up to the second, so the time shown is never before the pause ends.
        rate_limited_until: health
            .paused_for
            .map(|d| rfc3339(now + d + Duration::from_millis(999))),
    }
}

/// The `Ready` message of an account whose breaker is open. Pure.
pub fn circuit_open_message(context: &str, health: &StripeCallHealth, failures: u32) -> String {
    format!(
        "the circuit breaker of Stripe account {context} is open since {} after {failures} \
         consecutive failed calls (timeouts, connection errors or 5xx answers): its resources' \
         reconciles wait without calling Stripe; next probe at {}",
        health.circuit_opened_at.as_deref().unwrap_or("unknown"),
        health.next_probe_at.as_deref().unwrap_or("unknown"),
    )
}

/// Whether the account is due for a check at `now`. Pure.
pub fn check_due(account: &StripeAccount, now: k8s_openapi::jiff::Timestamp) -> Option<Duration> {
    let Some(status) = &account.status else {
        return None;
    };
    if status.observed_generation != account.metadata.generation {
        return None;
    }
    let last = status.last_checked_time.as_ref()?;
    let local = conditions::find(&status.conditions, "Ready")
        .is_some_and(|c| LOCAL_REASONS.contains(&c.reason.as_str()));
    let interval = if local { LOCAL_RECHECK } else { CHECK_INTERVAL };
    let elapsed = now.duration_since(last.0);
    let elapsed = Duration::try_from(elapsed).unwrap_or(Duration::ZERO);
    interval.checked_sub(elapsed).filter(|d| !d.is_zero())
}

/// Runs the check: trust, credentials, one authenticated call. `Ok(fingerprint)` of the
/// encryption key when everything answered.
async fn check(ctx: &Context, account: &StripeAccount) -> Result<Option<String>, ReconcileError> {
    let handle = ctx.accounts.resolve(ctx, account).await?;
    let observer = ctx.call_observer(
        crate::audit::Actor::resource("StripeAccount", None, account.name_any())
            .triggered_by("HealthCheck"),
    );
    let client = handle.client.with_observer(observer);
    client
        .list_api_keys(&ListApiKeysParams {
            include_expired: None,
            limit: Some(1),
        })
        .await?;
    Ok(handle
        .keys
        .as_ref()
        .and_then(|k| k.public_key_fingerprint().ok()))
}

impl AccountContext {
    /// Reads the account's Stripe activity log when due (see [`super::activity`]); returns
    /// how soon the next read is due. A failed read is logged and counted, and retried at the
    /// next interval; what it handled before failing stays in `status`.
    async fn read_activity(
        &self,
        api: &Api<StripeAccount>,
        account: &StripeAccount,
        status: &mut StripeAccountStatus,
    ) -> Duration {
        let ctx = &self.ctx;
        let name = account.name_any();
        let interval = ctx.config.activity_log_interval;
        ctx.metrics
            .unmanaged_keys
            .get_or_create(&crate::metrics::AccountLabels {
                account: name.clone(),
            })
            .set(status.unmanaged_key_count.unwrap_or(0));
        if interval.is_zero() {
            return CHECK_INTERVAL;
        }
        let uid = account.uid().unwrap_or_default();
        let now = ctx.clock.now();
        let last = self
            .activity_reads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&uid)
            .copied();
        if let Some(wait) = super::activity::read_due(interval, last, now) {
            return wait;
        }
        self.activity_reads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(uid, now);
        let reader = super::activity::Reader {
            ctx,
            api,
            account,
            namespaces: &self.namespaces,
        };
        let outcome = match super::activity::read(&reader, status).await {
            Ok(()) => "success".to_string(),
            Err(e) => {
                let reason = failure_reason(&e);
                let message = redact(&e.to_string());
                tracing::warn!(account = %name, reason, error = %message, "reading the Stripe activity log failed; retrying at the next interval");
                ctx.publish_event(
                    &account.object_ref(&()),
                    EventType::Warning,
                    "ActivityLogUnreadable",
                    "ReadActivityLog",
                    format!(
                        "reading Stripe's activity log failed ({reason}): {message}; the Stripe App needs the \"Activity logs: Read\" permission. Retried every {}; nothing is skipped meanwhile",
                        humantime::format_duration(interval)
                    ),
                )
                .await;
                reason.to_string()
            }
        };
        ctx.metrics
            .activity_log_reads
            .get_or_create(&crate::metrics::ActivityReadLabels {
                account: name.clone(),
                outcome,
            })
            .inc();
        ctx.metrics
            .unmanaged_keys
            .get_or_create(&crate::metrics::AccountLabels { account: name })
            .set(status.unmanaged_key_count.unwrap_or(0));
        interval
    }

    /// The `keysUnderManagement` to show: counted afresh at most once per [`RECOUNT_WINDOW`]
    /// per account, else the count `shown` now, with how soon the recount is due. The account's
    /// own status write wakes it again, and during a bulk mint the count differs every time:
    /// recounting on each wake-up made a write, a wake-up and a pass over every policy, back to
    /// back.
    fn keys_under_management(
        &self,
        uid: &str,
        account: &str,
        shown: Option<i64>,
    ) -> (i64, Option<Duration>) {
        let now = std::time::Instant::now();
        let mut recounts = self.recounts.lock().unwrap_or_else(|e| e.into_inner());
        if let (Some(shown), Some(at)) = (shown, recounts.get(uid)) {
            let since = now.duration_since(*at);
            if since < RECOUNT_WINDOW {
                return (shown, Some(RECOUNT_WINDOW - since));
            }
        }
        recounts.insert(uid.to_string(), now);
        (self.cached_holder_count(account) as i64, None)
    }

    /// How many cached resources name `account` and hold a credential: one pass over the
    /// caches, nothing formatted or sorted (the count runs at most once per
    /// [`RECOUNT_WINDOW`] of policy changes, see [`throttled`]).
    fn cached_holder_count(&self, account: &str) -> usize {
        self.policies
            .iter()
            .chain(&self.endpoints)
            .map(|h| h.count(account))
            .sum()
    }

    /// The holders read fresh from the API server (deletion decides on this, not on a cache).
    async fn fresh_holders(&self, account: &str) -> Result<Vec<String>, ReconcileError> {
        let client = &self.ctx.client;
        let mut out = Vec::new();
        let all = ListParams::default();
        for ns in &self.namespaces {
            let (p, e): (Api<StripeKeyPolicy>, Api<StripeWebhookEndpoint>) = match ns {
                Some(ns) => (
                    Api::namespaced(client.clone(), ns),
                    Api::namespaced(client.clone(), ns),
                ),
                None => (Api::all(client.clone()), Api::all(client.clone())),
            };
            // A page at a time: only the holders' names are kept.
            for_each_listed(&p, &all, |p| {
                out.extend(holder(
                    account,
                    &p,
                    &p.spec.account_ref.name,
                    p.status.as_deref(),
                ))
            })
            .await?;
            for_each_listed(&e, &all, |e| {
                out.extend(holder(
                    account,
                    &e,
                    &e.spec.account_ref.name,
                    e.status.as_deref(),
                ))
            })
            .await?;
        }
        out.sort();
        Ok(out)
    }
}

pub(super) async fn write_status(
    api: &Api<StripeAccount>,
    account: &StripeAccount,
    status: StripeAccountStatus,
) -> Result<(), ReconcileError> {
    if account.status.as_ref() == Some(&status) {
        return Ok(());
    }
    let patch = json!({
        "apiVersion": StripeAccount::api_version(&()),
        "kind": StripeAccount::kind(&()),
        "status": status,
    });
    let pp = PatchParams::apply(FIELD_MANAGER).force();
    api.patch_status(&account.name_any(), &pp, &Patch::Apply(&patch))
        .await?;
    Ok(())
}

async fn patch_finalizers(
    api: &Api<StripeAccount>,
    account: &StripeAccount,
    add: bool,
) -> Result<(), ReconcileError> {
    let current = account.finalizers();
    let ops = if add {
        if current.iter().any(|f| f == FINALIZER) {
            return Ok(());
        }
        if current.is_empty() {
            json!([
                {"op": "test", "path": "/metadata/resourceVersion", "value": account.resource_version()},
                {"op": "add", "path": "/metadata/finalizers", "value": [FINALIZER]},
            ])
        } else {
            json!([
                {"op": "test", "path": "/metadata/finalizers", "value": current},
                {"op": "add", "path": "/metadata/finalizers/-", "value": FINALIZER},
            ])
        }
    } else {
        let Some(i) = current.iter().position(|f| f == FINALIZER) else {
            return Ok(());
        };
        json!([
            {"op": "test", "path": format!("/metadata/finalizers/{i}"), "value": FINALIZER},
            {"op": "remove", "path": format!("/metadata/finalizers/{i}")},
        ])
    };
    let patch: json_patch::Patch = serde_json::from_value(ops)?;
    api.patch(
        &account.name_any(),
        &PatchParams::default(),
        &Patch::Json::<()>(patch),
    )
    .await?;
    Ok(())
}

/// Reconciles one account (the entry point the `Controller` calls).
pub async fn reconcile(
    obj: Arc<StripeAccount>,
    actx: Arc<AccountContext>,
) -> Result<Action, ReconcileError> {
    let ctx = &actx.ctx;
    let started = std::time::Instant::now();
    let labels = crate::metrics::ControllerLabels {
        controller: CONTROLLER.into(),
    };
    ctx.metrics.reconciliations.get_or_create(&labels).inc();
    let api: Api<StripeAccount> = Api::all(ctx.client.clone());
    let result = async {
        // Decide on a fresh read: the cache may lag behind our own writes.
        let Some(account) = api.get_opt(&obj.name_any()).await? else {
            return Ok(Action::await_change());
        };
        if account.uid() != obj.uid() {
            return Ok(Action::await_change());
        }
        if account.metadata.deletion_timestamp.is_some() {
            return cleanup(&actx, &api, &account).await;
        }
        patch_finalizers(&api, &account, true).await?;
        apply(&actx, &api, &account).await
    }
    .await;
    ctx.metrics
        .reconcile_duration
        .get_or_create(&labels)
        .observe(started.elapsed().as_secs_f64());
    if result.is_ok() {
        ctx.record_success(obj.uid().as_deref().unwrap_or_default());
    }
    result
}

async fn apply(
    actx: &AccountContext,
    api: &Api<StripeAccount>,
    account: &StripeAccount,
) -> Result<Action, ReconcileError> {
    let ctx = &actx.ctx;
    // The count needs the first listing of the caches; bounded, so that a watch that cannot
    // start (RBAC) does not hold a worker for ever.
    let ready = tokio::time::timeout(CACHE_WAIT, async {
        for h in actx.policies.iter().chain(&actx.endpoints) {
            h.wait_until_ready().await;
        }
    })
    .await;
    if ready.is_err() {
        return Err(ReconcileError::Account {
            reason: "CachesNotReady",
            message:
                "the watches of StripeKeyPolicies and StripeWebhookEndpoints have not listed yet"
                    .into(),
        });
    }
    let name = account.name_any();
    let now = ctx.clock.now();
    let mut status = account.status.clone().unwrap_or_default();
    let (keys, recount_wait) = actx.keys_under_management(
        account.uid().as_deref().unwrap_or_default(),
        &name,
        status.keys_under_management,
    );
    status.keys_under_management = Some(keys);
    // A held-back recount is due then (shown as CHECK_INTERVAL when none is).
    let recount_wait = recount_wait.unwrap_or(CHECK_INTERVAL);
    let key = ContextKey::new(&account.spec.api_base, &account.spec.context);
    let health = ctx.accounts.health.snapshot(&key);
    let shown = call_health(&health, std::time::SystemTime::now());
    let before = status
        .stripe
        .as_ref()
        .map(|s| s.circuit)
        .unwrap_or_default();
    status.stripe = Some(shown.clone());
    // A rate-limit pause shown in status is cleared once it is over.
    let pause_end = health
        .paused_for
        .map(|d| d + Duration::from_secs(1))
        .unwrap_or(CHECK_INTERVAL);
    let generation = account.metadata.generation;
    if health.breaker.state == crate::stripe::CircuitState::HalfOpen
        || (health.breaker.state == crate::stripe::CircuitState::Open
            && !ctx.accounts.health.breaker(&key).probe_due())
    {
        // The breaker is open (or its probe runs): say so, call nobody, look again at the
        // probe time. Only a change is written.
        let wait = health
            .breaker
            .next_probe
            .and_then(|t| t.duration_since(std::time::SystemTime::now()).ok())
            .unwrap_or(Duration::from_secs(1))
            + Duration::from_millis(100);
        conditions::set_condition(
            &mut status.conditions,
            "Ready",
            false,
            "StripeUnavailable",
            circuit_open_message(
                &account.spec.context,
                &shown,
                health.breaker.consecutive_failures,
            ),
            generation,
            now,
        );
        write_status(api, account, status).await?;
        return Ok(Action::requeue(wait.min(pause_end).min(recount_wait)));
    }
    // A breaker that closed again since the status was written (or whose probe is due) makes
    // the check due now: it confirms Stripe answers (or is the probe).
    let circuit_changed = before != CircuitState::Closed;
    let probe = health.breaker.state == crate::stripe::CircuitState::Open;
    if !circuit_changed
        && !probe
        && let Some(wait) = check_due(account, now)
    {
        // Not due: only the count, the rate-limit state or what the activity log showed may
        // have changed.
        let activity_wait = actx.read_activity(api, account, &mut status).await;
        write_status(api, account, status).await?;
        return Ok(Action::requeue(
            wait.min(pause_end).min(activity_wait).min(recount_wait),
        ));
    }
    let (ready, reason, message, wait) = match check(ctx, account).await {
        Ok(fingerprint) => {
            status.encryption_key_fingerprint = fingerprint;
            (
                true,
                "Ready",
                format!(
                    "the app key is valid and Stripe answered for {}",
                    account.spec.context
                ),
                CHECK_INTERVAL,
            )
        }
        Err(ReconcileError::Kube(e)) => return Err(ReconcileError::Kube(e)),
        Err(e) => {
            let reason = failure_reason(&e);
            let wait = if LOCAL_REASONS.contains(&reason) {
                LOCAL_RECHECK
            } else {
                CHECK_INTERVAL
            };
            (false, reason, redact(&e.to_string()), wait)
        }
    };
    // The check may have moved the breaker (it may have been the probe).
    let health = ctx.accounts.health.snapshot(&key);
    let shown = call_health(&health, std::time::SystemTime::now());
    status.stripe = Some(shown.clone());
    let (ready, reason, message, wait) =
        if health.breaker.state == crate::stripe::CircuitState::Closed {
            (ready, reason, message, wait)
        } else {
            let wait = health
                .breaker
                .next_probe
                .and_then(|t| t.duration_since(std::time::SystemTime::now()).ok())
                .unwrap_or(Duration::from_secs(1))
                + Duration::from_millis(100);
            (
                false,
                "StripeUnavailable",
                circuit_open_message(
                    &account.spec.context,
                    &shown,
                    health.breaker.consecutive_failures,
                ),
                wait,
            )
        };
    let pause_end = health
        .paused_for
        .map(|d| d + Duration::from_secs(1))
        .unwrap_or(CHECK_INTERVAL);
    status.observed_generation = generation;
    status.last_checked_time = Some(Time(now));
    conditions::set_condition(
        &mut status.conditions,
        "Ready",
        ready,
        reason,
        message,
        generation,
        now,
    );
    // After the check: a new account's first Stripe call stays its health check.
    let activity_wait = actx.read_activity(api, account, &mut status).await;
    write_status(api, account, status).await?;
    Ok(Action::requeue(
        wait.min(pause_end).min(activity_wait).min(recount_wait),
    ))
}

async fn cleanup(
    actx: &AccountContext,
    api: &Api<StripeAccount>,
    account: &StripeAccount,
) -> Result<Action, ReconcileError> {
    if !account.finalizers().iter().any(|f| f == FINALIZER) {
        return Ok(Action::await_change());
    }
    let ctx = &actx.ctx;
    let name = account.name_any();
    let holders = actx.fresh_holders(&name).await?;
    if holders.is_empty() {
        patch_finalizers(api, account, false).await?;
        tracing::info!(account = %name, "no resource holds a credential of the account: deleted");
        return Ok(Action::await_change());
    }
    let message = format!(
        "deletion waits until {} retired their credentials (delete them, or let their rotation finish): {}",
        holders.len(),
        name_list(&holders)
    );
    let now = ctx.clock.now();
    let mut status = account.status.clone().unwrap_or_default();
    status.keys_under_management = Some(holders.len() as i64);
    conditions::set_condition(
        &mut status.conditions,
        "Ready",
        false,
        "InUse",
        message.clone(),
        account.metadata.generation,
        now,
    );
    write_status(api, account, status).await?;
    ctx.publish_event(
        &account.object_ref(&()),
        EventType::Warning,
        "DeletionBlocked",
        "Delete",
        format!("StripeAccount {name}: {message}"),
    )
    .await;
    Ok(Action::requeue(BLOCKED_RECHECK))
}

/// Requeues a failed reconcile with the shared backoff.
pub fn error_policy(
    account: Arc<StripeAccount>,
    error: &ReconcileError,
    actx: Arc<AccountContext>,
) -> Action {
    super::shared::requeue_after_error(&actx.ctx, CONTROLLER, &account.metadata, error)
}

/// The Stripe accounts whose health changed (`None`: some changes were missed, look at all).
fn health_changes(
    ctx: &Context,
) -> impl futures::Stream<Item = Option<ContextKey>> + Send + 'static {
    let rx = ctx.health_events.subscribe();
    futures::stream::unfold(rx, |mut rx| async move {
        match rx.recv().await {
            Ok(key) => Some((Some(key), rx)),
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => Some((None, rx)),
            Err(tokio::sync::broadcast::error::RecvError::Closed) => None,
        }
    })
}

/// At most one recount of an account per this long, however many of its resources change.
pub const RECOUNT_WINDOW: Duration = Duration::from_secs(2);

/// Turns the accounts named by changed resources into reconciles of those accounts, at most
/// one per account per `window`: the first change of a quiet account reconciles it at once;
/// changes within the window after that reconcile it once more at the window's end, so the
/// last change is always counted, at most `window` late.
pub fn throttled(
    changes: impl futures::Stream<Item = String> + Send + 'static,
    window: Duration,
) -> impl futures::Stream<Item = ObjectRef<StripeAccount>> + Send + 'static {
    use std::collections::{HashMap, VecDeque};
    use tokio::time::Instant;
    struct Throttle {
        changes: futures::stream::BoxStream<'static, String>,
        done: bool,
        /// When each account was last let through.
        last: HashMap<String, Instant>,
        /// Accounts changed since, and when they are let through again.
        pending: HashMap<String, Instant>,
        ready: VecDeque<String>,
    }
    let state = Throttle {
        changes: changes.boxed(),
        done: false,
        last: HashMap::new(),
        pending: HashMap::new(),
        ready: VecDeque::new(),
    };
    futures::stream::unfold(state, move |mut st| async move {
        loop {
            if let Some(account) = st.ready.pop_front() {
                return Some((ObjectRef::new(&account), st));
            }
            if st.done && st.pending.is_empty() {
                return None;
            }
            let next_due = st.pending.values().min().copied();
            let Throttle {
                changes,
                done,
                last,
                pending,
                ready,
            } = &mut st;
            tokio::select! {
                change = changes.next(), if !*done => match change {
                    Some(account) => {
                        let now = Instant::now();
                        match last.get(&account) {
                            Some(t) if now < *t + window => {
                                pending.entry(account).or_insert(*t + window);
                            }
                            _ => {
                                if last.len() > 1024 {
                                    last.retain(|_, t| now < *t + window);
                                }
                                last.insert(account.clone(), now);
                                ready.push_back(account);
                            }
                        }
                    }
                    None => *done = true,
                },
                _ = tokio::time::sleep_until(next_due.unwrap_or_else(Instant::now)), if next_due.is_some() => {
                    let now = Instant::now();
                    let due: Vec<String> = pending
                        .iter()
                        .filter(|(_, t)| **t <= now)
                        .map(|(a, _)| a.clone())
                        .collect();
                    for account in due {
                        pending.remove(&account);
                        last.insert(account.clone(), now);
                        ready.push_back(account);
                    }
                }
            }
        }
    })
}

/// The StripeAccount controller: watches every account, and the policies and endpoints of the
/// watched namespaces (`[None]`: all) to count and guard their credentials.
pub async fn run(ctx: Arc<Context>, namespaces: Vec<Option<String>>, shutdown: CancellationToken) {
    let client = ctx.client.clone();
    let mut policies = Vec::new();
    let mut policy_streams = Vec::new();
    let mut endpoints = Vec::new();
    let mut endpoint_streams = Vec::new();
    for ns in &namespaces {
        let (p, e): (Api<StripeKeyPolicy>, Api<StripeWebhookEndpoint>) = match ns {
            Some(ns) => (
                Api::namespaced(client.clone(), ns),
                Api::namespaced(client.clone(), ns),
            ),
            None => (Api::all(client.clone()), Api::all(client.clone())),
        };
        // Only the account named and whether a credential is held are kept.
        let (held, stream) = holdings::track(p, |p| {
            (
                p.spec.account_ref.name.as_str(),
                p.status.as_ref().is_some_and(|s| holds_credentials(s)),
            )
        });
        policies.push(held);
        policy_streams.push(stream);
        let (held, stream) = holdings::track(e, |e| {
            (
                e.spec.account_ref.name.as_str(),
                e.status.as_ref().is_some_and(|s| holds_credentials(s)),
            )
        });
        endpoints.push(held);
        endpoint_streams.push(stream);
    }
    let actx = Arc::new(AccountContext {
        ctx: ctx.clone(),
        policies,
        endpoints,
        namespaces,
        activity_reads: Default::default(),
        recounts: Default::default(),
    });
    let controller = Controller::new(
        Api::<StripeAccount>::all(client),
        watcher::Config::default(),
    );
    let accounts = controller.store();
    controller
        .with_config(super::controller_config(&ctx.config))
        // A breaker that changes state, or a 429 pause that starts, shows on every account naming
        // that Stripe account at once.
        .reconcile_on(health_changes(&ctx).flat_map(move |key| {
            futures::stream::iter(
                accounts
                    .state()
                    .into_iter()
                    .filter(|a| {
                        key.as_ref().is_none_or(|k| {
                            *k == ContextKey::new(&a.spec.api_base, &a.spec.context)
                        })
                    })
                    .map(|a| ObjectRef::from_obj(&*a))
                    .collect::<Vec<_>>(),
            )
        }))
        // A changed policy or endpoint recounts its account, at most once per window (the
        // count is a pass over every cached resource: once per change made a bulk mint of n
        // policies cost O(n²), and a fresh read of the account per change).
        .reconcile_on(throttled(
            futures::stream::select(
                futures::stream::select_all(policy_streams),
                futures::stream::select_all(endpoint_streams),
            ),
            RECOUNT_WINDOW,
        ))
        .graceful_shutdown_on(async move { shutdown.cancelled().await })
        .run(reconcile, error_policy, actx)
        .for_each(|_| futures::future::ready(()))
        .await;
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::api::KeyStatus;

    /// A policy in `shop` naming `account`, holding a current key when `current`.
    pub(crate) fn policy(name: &str, account: &str, current: bool) -> StripeKeyPolicy {
        let mut p: StripeKeyPolicy = serde_json::from_value(json!({
            "apiVersion": "stripekeys.io/v1alpha1", "kind": "StripeKeyPolicy",
            "metadata": {"name": name, "namespace": "shop"},
            "spec": {"accountRef": {"name": account}, "permissions": ["charge_read"],
                     "delivery": {"secret": {"name": "s"}}}
        }))
        .unwrap();
        let mut status = crate::api::StripeKeyPolicyStatus::default();
        if current {
            status.credential.current_key = Some(KeyStatus {
                id: "rk_id".into(),
                ..KeyStatus::default()
            });
        }
        p.status = Some(status);
        p
    }

    #[test]
    fn only_resources_naming_the_account_and_holding_a_credential_block_it() {
        let ps = [
            policy("a", "pay", true),
            policy("b", "pay", false),
            policy("c", "other", true),
        ];
        let none: [StripeWebhookEndpoint; 0] = [];
        assert_eq!(
            holders("pay", &ps, &none),
            vec!["StripeKeyPolicy shop/a".to_string()]
        );
        let mut retiring = policy("d", "pay", false);
        if let Some(s) = retiring.status.as_mut() {
            s.credential.retiring_keys.push(KeyStatus::default());
        }
        assert_eq!(holders("pay", [&retiring], &none).len(), 1);
    }

    #[test]
    fn key_material_never_reaches_a_message() {
        let text = redact(
            "Stripe answered HTTP 401 (api_key_expired): Expired API Key provided: sk_test_...Kyz6 [request req_1]; also rk_live_abc, whsec_x",
        );
        assert!(!text.contains("sk_") && !text.contains("rk_") && !text.contains("whsec_"));
        assert!(text.contains("[request req_1]"), "{text}");
    }

    #[test]
    fn a_long_list_of_names_is_bounded() {
        let names: Vec<String> = (0..25).map(|i| format!("p{i:02}")).collect();
        let text = name_list(&names);
        assert!(text.ends_with("p09 (and 15 more)"), "{text}");
        assert!(!text.contains("p10"));
    }

    #[test]
    fn failures_map_to_the_documented_reasons() {
        let account = |reason| ReconcileError::Account {
            reason,
            message: String::new(),
        };
        assert_eq!(
            failure_reason(&account("AccountCredentialsMissing")),
            "CredentialsMissing"
        );
        assert_eq!(failure_reason(&account("ApiHostNotAllowed")), "Untrusted");
        assert_eq!(
            failure_reason(&account("CredentialSecretNotLabelled")),
            "Untrusted"
        );
        let connection = ReconcileError::Stripe(StripeError::Connection {
            kind: crate::stripe::ConnectionErrorKind::Connect,
            method: "GET".into(),
            path: "/v2/iam/api_keys".into(),
            attempts: 1,
            message: "refused".into(),
        });
        assert_eq!(failure_reason(&connection), "StripeUnreachable");
    }

    #[test]
    fn the_status_shows_the_breaker_and_the_pause_in_whole_utc_seconds() {
        use crate::stripe::breaker::BreakerSnapshot;
        let now = std::time::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let open = HealthSnapshot {
            breaker: BreakerSnapshot {
                state: crate::stripe::CircuitState::Open,
                opened_at: Some(now - Duration::from_millis(2500)),
                next_probe: Some(now + Duration::from_secs(30)),
                consecutive_failures: 5,
            },
            paused_for: Some(Duration::from_millis(1200)),
        };
        let shown = call_health(&open, now);
        assert_eq!(shown.circuit, CircuitState::Open);
        assert_eq!(
            shown.circuit_opened_at.as_deref(),
            Some("2027-01-15T07:59:57Z")
        );
        assert_eq!(shown.next_probe_at.as_deref(), Some("2027-01-15T08:00:30Z"));
        // rounded up: never before the pause ends
        assert_eq!(
            shown.rate_limited_until.as_deref(),
            Some("2027-01-15T08:00:02Z")
        );
        let message = circuit_open_message("acct_B", &shown, 5);
        assert!(
            message.contains("open since 2027-01-15T07:59:57Z after 5"),
            "{message}"
        );
        assert!(
            message.contains("next probe at 2027-01-15T08:00:30Z"),
            "{message}"
        );
        let closed = HealthSnapshot {
            breaker: BreakerSnapshot {
                state: crate::stripe::CircuitState::Closed,
                opened_at: None,
                next_probe: None,
                consecutive_failures: 0,
            },
            paused_for: None,
        };
        // A healthy account shows only `circuit: Closed`: the same value every time (no write).
        assert_eq!(
            call_health(&closed, now),
            StripeCallHealth {
                circuit: CircuitState::Closed,
                ..Default::default()
            }
        );
        assert_eq!(
            call_health(&closed, now),
            call_health(&closed, now + Duration::from_secs(9))
        );
    }

    #[test]
    fn an_open_breaker_reads_as_stripe_unavailable() {
        let e = ReconcileError::Stripe(StripeError::CircuitOpen {
            context: "acct_B".into(),
            method: "GET".into(),
            path: "/v2/iam/api_keys".into(),
            retry_in: Duration::from_secs(3),
        });
        assert_eq!(failure_reason(&e), "StripeUnavailable");
        assert_eq!(e.reason(), "StripeUnavailable");
    }

    #[tokio::test]
    async fn a_burst_of_changes_recounts_an_account_once_at_once_and_once_at_the_window_end() {
        let window = Duration::from_millis(300);
        let (tx, rx) = futures::channel::mpsc::unbounded::<String>();
        let mut out = Box::pin(throttled(rx, window));
        let start = tokio::time::Instant::now();
        // The first change of a quiet account: at once.
        tx.unbounded_send("a".into()).unwrap();
        let first = out.next().await.unwrap();
        assert_eq!(first.name, "a");
        assert!(start.elapsed() < window, "{:?}", start.elapsed());
        // 100 more changes of `a` and one of `b` within the window: `b` at once (another
        // account is not held back), `a` once more, at the window's end, not 100 times.
        for _ in 0..100 {
            tx.unbounded_send("a".into()).unwrap();
        }
        tx.unbounded_send("b".into()).unwrap();
        let second = out.next().await.unwrap();
        assert_eq!(second.name, "b");
        assert!(start.elapsed() < window, "{:?}", start.elapsed());
        let third = out.next().await.unwrap();
        assert_eq!(third.name, "a");
        assert!(start.elapsed() >= window, "{:?}", start.elapsed());
        // Nothing more is owed: the stream ends with its input, without a fourth recount.
        drop(tx);
        assert!(out.next().await.is_none());
    }
}
