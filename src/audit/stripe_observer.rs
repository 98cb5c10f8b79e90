//! Audits every HTTP attempt of a Stripe client.
//!
//! [`StripeCall`] has the fields of the Stripe client's `CallRecord` (same names), and
//! [`ObserveStripeCall`] has the shape of its `CallObserver` trait. Once both live in one branch,
//! the glue is two small impls (see `StripeAuditObserver`'s docs).

use std::time::Duration;

use super::entry::stripe_id_from_path;
use super::{Actor, AuditEntry, AuditLog};

/// One HTTP attempt against Stripe. Holds no bodies, keys or secrets.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StripeCall {
    /// HTTP method.
    pub method: String,
    /// Request path without query string.
    pub path: String,
    /// `Stripe-Context` account of the call.
    pub account: String,
    /// HTTP status, `None` if no answer arrived.
    pub status: Option<u16>,
    /// Transport failure (`timeout`, `connect`, `broken`), if any.
    pub connection_error: Option<String>,
    /// `Request-Id` header.
    pub request_id: Option<String>,
    /// `Idempotency-Key` sent (POSTs).
    pub idempotency_key: Option<String>,
    /// 1 for the first attempt.
    pub attempt: u32,
    /// Time from sending to the full answer (or failure).
    pub duration: Duration,
    /// `error.code` of an error answer (`decode` when a 2xx body could not be read).
    pub error_code: Option<String>,
    /// `error.type` of an error answer.
    pub error_type: Option<String>,
    /// Whether the client retries after this attempt.
    pub will_retry: bool,
}

/// Receives one [`StripeCall`] per HTTP attempt (the shape of the Stripe client's
/// `CallObserver`). Called inline on the request path: implementations must be fast.
pub trait ObserveStripeCall: Send + Sync {
    /// Called once per HTTP attempt, after it finished or failed.
    fn on_stripe_call(&self, call: &StripeCall);
}

/// Turns each Stripe HTTP attempt into a `stripe.request` audit entry on behalf of one actor
/// (the reconcile that owns the client handle).
///
/// Give each reconcile a client handle that reports to an observer with its own actor; the
/// Stripe client's `with_observer` shares the connection pool and rate limiter:
///
/// ```ignore
/// let actor = Actor::resource("StripeKeyPolicy", Some(&ns), &name);
/// let client = ctx.stripe.with_observer(Arc::new(StripeAuditObserver::new(ctx.audit.clone(), actor)));
/// ```
///
/// Glue to the Stripe client (`src/stripe`), to add in this module once both are merged:
///
/// ```ignore
/// impl From<&crate::stripe::CallRecord> for StripeCall {
///     fn from(r: &crate::stripe::CallRecord) -> Self {
///         Self {
///             method: r.method.clone(), path: r.path.clone(), account: r.account.clone(),
///             status: r.status, connection_error: r.connection_error.map(|k| k.as_str().to_owned()),
///             request_id: r.request_id.clone(), idempotency_key: r.idempotency_key.clone(),
///             attempt: r.attempt, duration: r.duration, error_code: r.error_code.clone(),
///             error_type: r.error_type.clone(), will_retry: r.will_retry,
///         }
///     }
/// }
/// impl crate::stripe::CallObserver for StripeAuditObserver {
///     fn on_call(&self, record: &crate::stripe::CallRecord) {
///         self.on_stripe_call(&StripeCall::from(record));
///     }
/// }
/// ```
#[derive(Debug, Clone)]
pub struct StripeAuditObserver {
    log: AuditLog,
    actor: Actor,
}

impl StripeAuditObserver {
    /// An observer recording into `log` on behalf of `actor`.
    pub fn new(log: AuditLog, actor: Actor) -> Self {
        Self { log, actor }
    }

    /// The actor recorded for each call.
    pub fn actor(&self) -> &Actor {
        &self.actor
    }

    /// The audit entry for one call.
    pub fn entry(&self, call: &StripeCall) -> AuditEntry {
        let mut e = AuditEntry::new(super::Action::StripeRequest, self.actor.clone())
            .detail("method", call.method.as_str())
            .detail("path", call.path.as_str())
            .detail("account", call.account.as_str())
            .detail("attempt", call.attempt)
            .detail("duration_ms", call.duration.as_millis() as u64)
            .detail("will_retry", call.will_retry);
        if let Some(id) = stripe_id_from_path(&call.path) {
            e = e.key_id(id);
        }
        if let Some(s) = call.status {
            e = e.detail("status", s);
        }
        for (k, v) in [
            ("request_id", &call.request_id),
            ("idempotency_key", &call.idempotency_key),
            ("error_type", &call.error_type),
            ("error_code", &call.error_code),
            ("connection_error", &call.connection_error),
        ] {
            if let Some(v) = v {
                e = e.detail(k, v.as_str());
            }
        }
        let retry = if call.will_retry { " (will retry)" } else { "" };
        let code = call
            .error_code
            .as_deref()
            .or(call.error_type.as_deref())
            .map(|c| format!(" {c}"))
            .unwrap_or_default();
        match (call.status, &call.connection_error) {
            (_, Some(kind)) => e.failure(format!("connection {kind}{retry}")),
            (Some(s), None) if (200..300).contains(&s) && call.error_code.is_none() => e,
            (Some(s), None) if (200..300).contains(&s) => {
                e.failure(format!("HTTP {s} with an unreadable body{retry}"))
            }
            (Some(s), None) => e.failure(format!("HTTP {s}{code}{retry}")),
            (None, None) => e.failure(format!("no answer{retry}")),
        }
    }
}

impl ObserveStripeCall for StripeAuditObserver {
    fn on_stripe_call(&self, call: &StripeCall) {
        self.log.record(self.entry(call));
    }
}

impl From<&crate::stripe::CallRecord> for StripeCall {
    fn from(r: &crate::stripe::CallRecord) -> Self {
        Self {
            method: r.method.clone(),
            path: r.path.clone(),
            account: r.account.clone(),
            status: r.status,
            connection_error: r.connection_error.map(|k| k.as_str().to_owned()),
            request_id: r.request_id.clone(),
            idempotency_key: r.idempotency_key.clone(),
            attempt: r.attempt,
            duration: r.duration,
            error_code: r.error_code.clone(),
            error_type: r.error_type.clone(),
            will_retry: r.will_retry,
        }
    }
}

impl crate::stripe::CallObserver for StripeAuditObserver {
    fn on_call(&self, record: &crate::stripe::CallRecord) {
        self.on_stripe_call(&StripeCall::from(record));
    }
}
