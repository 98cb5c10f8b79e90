//! What one audit record says: who did what to which target, and how it ended.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::Value;

/// Longest failure reason kept in a record; longer reasons are cut (on a character boundary).
pub const MAX_REASON_CHARS: usize = 256;

/// What happened. Serialised as a stable dotted name that log pipelines can filter on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum Action {
    /// One HTTP attempt against the Stripe API.
    #[serde(rename = "stripe.request")]
    StripeRequest,
    /// A secret version written to the secret store (Vault KV, or a Kubernetes Secret store).
    #[serde(rename = "store.write")]
    StoreWrite,
    /// A secret path deleted from the secret store.
    #[serde(rename = "store.delete")]
    StoreDelete,
    /// A Kubernetes Secret created or updated from the store.
    #[serde(rename = "secret.sync")]
    SecretSync,
    /// A workload patched so that its pods restart with new key material.
    #[serde(rename = "rollout.patch")]
    RolloutPatch,
    /// A rotation moved from one phase to the next.
    #[serde(rename = "rotation.transition")]
    RotationTransition,
    /// The audit log itself recovered from an interrupted write at start-up.
    #[serde(rename = "audit.recovery")]
    AuditRecovery,
    /// Stripe's activity log showed something done to a managed key outside the operator (a
    /// person viewed it, or someone changed or deleted it), and what the operator did about it.
    #[serde(rename = "stripe.activity")]
    StripeActivity,
}

impl Action {
    /// The dotted name written in the `action` field, e.g. `stripe.request`.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::StripeRequest => "stripe.request",
            Action::StoreWrite => "store.write",
            Action::StoreDelete => "store.delete",
            Action::SecretSync => "secret.sync",
            Action::RolloutPatch => "rollout.patch",
            Action::RotationTransition => "rotation.transition",
            Action::AuditRecovery => "audit.recovery",
            Action::StripeActivity => "stripe.activity",
        }
    }
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who acted: the custom resource whose reconcile (or schedule, or CLI command) caused the action.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Actor {
    /// Kind of the resource, e.g. `StripeKeyPolicy`, or `Operator` for the process itself.
    pub kind: String,
    /// Namespace of the resource; absent for cluster-scoped resources and the operator.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Name of the resource.
    pub name: String,
    /// What started the work: `reconcile`, `schedule`, `annotation`, `cleanup`, `cli`, `startup`...
    pub trigger: String,
}

impl Actor {
    /// A namespaced or cluster-scoped resource, acting on a `Reconcile` trigger.
    pub fn resource(
        kind: impl Into<String>,
        namespace: Option<&str>,
        name: impl Into<String>,
    ) -> Self {
        Self {
            kind: kind.into(),
            namespace: namespace.map(str::to_owned),
            name: name.into(),
            trigger: "Reconcile".to_owned(),
        }
    }

    /// The operator process itself (start-up work, CLI commands).
    pub fn operator(trigger: impl Into<String>) -> Self {
        Self {
            kind: "Operator".to_owned(),
            namespace: None,
            name: "stripe-key-operator".to_owned(),
            trigger: trigger.into(),
        }
    }

    /// Replaces the trigger (default `Reconcile`; a rotation's trigger while one runs:
    /// `Initial`, `Schedule`, `Annotation`, `Incident`, `SpecChange`, `Recreate`).
    pub fn triggered_by(mut self, trigger: impl Into<String>) -> Self {
        self.trigger = trigger.into();
        self
    }
}

/// A Kubernetes object acted upon (a Secret synced, a workload rolled).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ObjectRef {
    /// Kind, e.g. `Secret`, `Deployment`.
    pub kind: String,
    /// Namespace.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Name.
    pub name: String,
}

/// What was acted upon. Only identifiers and fingerprints: never secret material.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Target {
    /// Stripe id of the API key (`apikey_...`) or webhook endpoint (`we_...`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    /// Fingerprint of the secret (first 12 hex of its SHA-256, see `secret::fingerprint`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
    /// Path in the secret store, e.g. `secret/data/stripe/shop/checkout`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub store_path: Option<String>,
    /// Kubernetes object acted upon.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub object: Option<ObjectRef>,
}

impl Target {
    fn is_empty(&self) -> bool {
        *self == Target::default()
    }
}

/// How the action ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The action took effect.
    Success,
    /// The action failed; the reason is short and free of secrets.
    Failure(String),
}

/// One audit event, before the log gives it a time, a sequence number and its place in the chain.
///
/// Build it with the constructor for its action and the builder methods, then hand it to
/// [`AuditLog::record`](super::AuditLog::record):
///
/// ```
/// use stripe_key_operator::audit::{Actor, AuditEntry};
/// let actor = Actor::resource("StripeKeyPolicy", Some("shop"), "checkout");
/// let entry = AuditEntry::store_write(actor, "secret/data/stripe/shop/checkout")
///     .key("apikey_123", "3f2a9c0d1e4b")
///     .detail("version", 7);
/// assert_eq!(entry.action().as_str(), "store.write");
/// ```
///
/// **Secret material is redacted, not rejected.** Every string of an entry (actor, target,
/// reason, details) passes through a filter when it is recorded: any word (a run of letters,
/// digits and `_`) that starts with `sk_` or `rk_`, or in which `sk_live_`, `sk_test_`,
/// `rk_live_`, `rk_test_` or `whsec_` starts the word or follows an `_`, is replaced by `[redacted fp=<12 hex>]` (the fingerprint of the redacted word, so two records
/// of the same leaked value can still be matched), and a `fingerprint` that is not hexadecimal
/// is replaced by `[invalid]`. Redaction is chosen over rejection because an audit event must not
/// get lost because a caller passed the wrong string; each redaction is counted in
/// [`AuditStats::redacted`](super::AuditStats) and logged as a warning (without the value). The
/// filter is a safety net for mistakes, not a licence: pass ids and fingerprints only.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditEntry {
    pub(crate) action: Action,
    pub(crate) actor: Actor,
    pub(crate) target: Target,
    pub(crate) outcome: Outcome,
    pub(crate) details: BTreeMap<String, Value>,
}

impl AuditEntry {
    /// An entry for `action` by `actor`, with an empty target and a `success` outcome.
    pub fn new(action: Action, actor: Actor) -> Self {
        Self {
            action,
            actor,
            target: Target::default(),
            outcome: Outcome::Success,
            details: BTreeMap::new(),
        }
    }

    /// A Stripe HTTP attempt. Use [`StripeAuditObserver`](super::StripeAuditObserver) rather
    /// than this to audit every call of a client.
    pub fn stripe_request(
        actor: Actor,
        method: &str,
        path: &str,
        status: Option<u16>,
        request_id: Option<&str>,
        idempotency_key: Option<&str>,
    ) -> Self {
        let mut e = Self::new(Action::StripeRequest, actor)
            .detail("method", method)
            .detail("path", path);
        if let Some(status) = status {
            e = e.detail("status", status);
        }
        if let Some(id) = request_id {
            e = e.detail("request_id", id);
        }
        if let Some(k) = idempotency_key {
            e = e.detail("idempotency_key", k);
        }
        if let Some(id) = stripe_id_from_path(path) {
            e.target.key_id = Some(id.to_owned());
        }
        match status {
            Some(s) if (200..300).contains(&s) => e,
            Some(s) => e.failure(format!("HTTP {s}")),
            None => e.failure("no answer"),
        }
    }

    /// A secret version written to the store at `store_path`.
    pub fn store_write(actor: Actor, store_path: &str) -> Self {
        Self::new(Action::StoreWrite, actor).store_path(store_path)
    }

    /// A secret path deleted from the store.
    pub fn store_delete(actor: Actor, store_path: &str) -> Self {
        Self::new(Action::StoreDelete, actor).store_path(store_path)
    }

    /// A Kubernetes Secret `namespace/name` created or updated.
    pub fn secret_sync(actor: Actor, namespace: &str, name: &str) -> Self {
        Self::new(Action::SecretSync, actor).object("Secret", Some(namespace), name)
    }

    /// A workload (`Deployment`, `StatefulSet`, `DaemonSet`...) patched to roll its pods.
    pub fn rollout_patch(actor: Actor, kind: &str, namespace: &str, name: &str) -> Self {
        Self::new(Action::RolloutPatch, actor).object(kind, Some(namespace), name)
    }

    /// A rotation moved from phase `from` to phase `to`.
    pub fn rotation_transition(actor: Actor, from: &str, to: &str) -> Self {
        Self::new(Action::RotationTransition, actor)
            .detail("from", from)
            .detail("to", to)
    }

    /// Sets the Stripe id and the secret's fingerprint.
    pub fn key(mut self, key_id: &str, fingerprint: &str) -> Self {
        self.target.key_id = Some(key_id.to_owned());
        self.target.fingerprint = Some(fingerprint.to_owned());
        self
    }

    /// Sets the Stripe id (API key or webhook endpoint) only.
    pub fn key_id(mut self, key_id: &str) -> Self {
        self.target.key_id = Some(key_id.to_owned());
        self
    }

    /// Sets the fingerprint of the secret only.
    pub fn fingerprint(mut self, fingerprint: &str) -> Self {
        self.target.fingerprint = Some(fingerprint.to_owned());
        self
    }

    /// Sets the secret-store path.
    pub fn store_path(mut self, path: &str) -> Self {
        self.target.store_path = Some(path.to_owned());
        self
    }

    /// Sets the Kubernetes object acted upon.
    pub fn object(mut self, kind: &str, namespace: Option<&str>, name: &str) -> Self {
        self.target.object = Some(ObjectRef {
            kind: kind.to_owned(),
            namespace: namespace.map(str::to_owned),
            name: name.to_owned(),
        });
        self
    }

    /// Marks the entry a success (the default).
    pub fn success(mut self) -> Self {
        self.outcome = Outcome::Success;
        self
    }

    /// Marks the entry a failure with a short reason (cut to [`MAX_REASON_CHARS`]).
    pub fn failure(mut self, reason: impl Into<String>) -> Self {
        self.outcome = Outcome::Failure(reason.into());
        self
    }

    /// Adds one detail (a string, number or boolean; replaces an earlier value of `key`).
    pub fn detail(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.details.insert(key.to_owned(), value.into());
        self
    }

    /// The action.
    pub fn action(&self) -> Action {
        self.action
    }

    /// The actor.
    pub fn actor(&self) -> &Actor {
        &self.actor
    }

    /// The target.
    pub fn target(&self) -> &Target {
        &self.target
    }

    /// The outcome.
    pub fn outcome(&self) -> &Outcome {
        &self.outcome
    }

    /// The details.
    pub fn details(&self) -> &BTreeMap<String, Value> {
        &self.details
    }

    /// Applies the secret filter described on [`AuditEntry`]; returns how many values it changed.
    pub(crate) fn sanitize(&mut self) -> usize {
        let mut n = 0;
        let a = &mut self.actor;
        for s in [&mut a.kind, &mut a.name, &mut a.trigger] {
            n += redact_in_place(s);
        }
        n += redact_opt(&mut a.namespace);
        let t = &mut self.target;
        n += redact_opt(&mut t.key_id);
        n += redact_opt(&mut t.store_path);
        if let Some(fp) = &mut t.fingerprint
            && !(fp.len() <= 64 && !fp.is_empty() && fp.bytes().all(|b| b.is_ascii_hexdigit()))
        {
            *fp = "[invalid]".to_owned();
            n += 1;
        }
        if let Some(o) = &mut t.object {
            n += redact_in_place(&mut o.kind) + redact_in_place(&mut o.name);
            n += redact_opt(&mut o.namespace);
        }
        if let Outcome::Failure(reason) = &mut self.outcome {
            n += redact_in_place(reason);
            if let Some((cut, _)) = reason.char_indices().nth(MAX_REASON_CHARS) {
                reason.truncate(cut);
                reason.push('…');
            }
        }
        let details = std::mem::take(&mut self.details);
        for (mut k, mut v) in details {
            n += redact_in_place(&mut k);
            n += redact_value(&mut v);
            self.details.insert(k, v);
        }
        n
    }

    /// The serialisable body of a record (without time, seq and prev).
    pub(crate) fn body(&self) -> EntryBody<'_> {
        let (outcome, reason) = match &self.outcome {
            Outcome::Success => ("success", None),
            Outcome::Failure(r) => ("failure", Some(r.as_str())),
        };
        EntryBody {
            actor: &self.actor,
            action: self.action,
            target: (!self.target.is_empty()).then_some(&self.target),
            outcome,
            reason,
            details: (!self.details.is_empty()).then_some(&self.details),
        }
    }
}

#[derive(Serialize)]
pub(crate) struct EntryBody<'a> {
    actor: &'a Actor,
    action: Action,
    #[serde(skip_serializing_if = "Option::is_none")]
    target: Option<&'a Target>,
    outcome: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    details: Option<&'a BTreeMap<String, Value>>,
}

/// The Stripe object id in an API path: `/v2/iam/api_keys/{id}[/...]` or
/// `/v1/webhook_endpoints/{id}`.
pub(crate) fn stripe_id_from_path(path: &str) -> Option<&str> {
    let rest = path
        .strip_prefix("/v2/iam/api_keys/")
        .or_else(|| path.strip_prefix("/v1/webhook_endpoints/"))?;
    let id = rest.split('/').next()?;
    (!id.is_empty()).then_some(id)
}

fn is_word_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

fn looks_secret(word: &str) -> bool {
    const INNER: [&str; 5] = ["sk_live_", "sk_test_", "rk_live_", "rk_test_", "whsec_"];
    let at_boundary = |i: usize| i == 0 || !word.as_bytes()[i - 1].is_ascii_alphanumeric();
    word.starts_with("sk_")
        || word.starts_with("rk_")
        || INNER
            .iter()
            .any(|p| word.match_indices(p).any(|(i, _)| at_boundary(i)))
}

/// Replaces every secret-looking word of `s`; returns 1 if anything changed.
fn redact_in_place(s: &mut String) -> usize {
    if !(s.contains("sk_") || s.contains("rk_") || s.contains("whsec_")) {
        return 0;
    }
    let bytes = s.as_bytes();
    let mut out = String::with_capacity(s.len());
    let mut changed = false;
    let mut i = 0;
    while i < bytes.len() {
        if is_word_byte(bytes[i]) {
            let start = i;
            while i < bytes.len() && is_word_byte(bytes[i]) {
                i += 1;
            }
            let word = &s[start..i];
            if looks_secret(word) {
                out.push_str("[redacted fp=");
                out.push_str(&crate::secret::fingerprint(word.as_bytes()));
                out.push(']');
                changed = true;
            } else {
                out.push_str(word);
            }
        } else {
            let start = i;
            i += 1;
            while i < bytes.len() && !is_word_byte(bytes[i]) {
                i += 1;
            }
            out.push_str(&s[start..i]);
        }
    }
    if changed {
        *s = out;
        1
    } else {
        0
    }
}

fn redact_opt(s: &mut Option<String>) -> usize {
    s.as_mut().map_or(0, redact_in_place)
}

fn redact_value(v: &mut Value) -> usize {
    match v {
        Value::String(s) => redact_in_place(s),
        Value::Array(items) => items.iter_mut().map(redact_value).sum(),
        Value::Object(map) => {
            let old = std::mem::take(map);
            let mut n = 0;
            for (mut k, mut v) in old {
                n += redact_in_place(&mut k) + redact_value(&mut v);
                map.insert(k, v);
            }
            n
        }
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redaction_replaces_only_secret_words() {
        let secret = format!("{}{}", "rk_live_", "A1b2C3d4E5f6G7h8J9k0");
        let mut s = format!("key {secret}, task_test ok; risk_read");
        assert_eq!(redact_in_place(&mut s), 1);
        assert!(!s.contains(&secret));
        assert!(s.starts_with("key [redacted fp="));
        assert!(s.ends_with(", task_test ok; risk_read"));
    }

    #[test]
    fn ids_are_taken_from_stripe_paths() {
        assert_eq!(
            stripe_id_from_path("/v2/iam/api_keys/apikey_1/rotate"),
            Some("apikey_1")
        );
        assert_eq!(
            stripe_id_from_path("/v1/webhook_endpoints/we_9"),
            Some("we_9")
        );
        assert_eq!(stripe_id_from_path("/v2/iam/api_keys"), None);
    }

    #[test]
    fn long_reasons_are_cut_on_a_char_boundary() {
        let mut e = AuditEntry::new(Action::StoreWrite, Actor::operator("test"))
            .failure("é".repeat(MAX_REASON_CHARS + 10));
        e.sanitize();
        let Outcome::Failure(r) = e.outcome() else {
            panic!("not a failure")
        };
        assert_eq!(r.chars().count(), MAX_REASON_CHARS + 1);
    }
}
