//! Proving a new key's scopes before it is published.
//!
//! Two ways, from cheap to thorough:
//! - [`verify_response_scopes`]: the create (or rotate) answer carries `permissions` (and
//!   `connect_permissions`); they must equal what was asked for. No extra call.
//! - [`check_scopes`]: live probes with the new key: one call the key may make must succeed,
//!   one call outside its permissions must be refused with 403. Network errors, 429 and 5xx are
//!   retried and never read as wrong scopes ([`ScopeCheckError`] tells a verdict from "could
//!   not check").

use std::collections::BTreeSet;
use std::time::Duration;

use super::client::{classify, error_chain};
use super::error::ErrorEnvelope;
use super::retry::{parse_retry_after, parse_should_retry, status_is_retryable};
use super::{ApiKey, CallRecord, StripeClient, StripeConfig};
use crate::secret::SecretString;

/// Read-only probes: (the permission a call needs, the call). Reads change nothing at Stripe.
pub const PROBES: &[(&str, &str)] = &[
    ("balance_read", "/v1/balance"),
    ("charge_read", "/v1/charges?limit=1"),
    ("customer_read", "/v1/customers?limit=1"),
    ("payment_intent_read", "/v1/payment_intents?limit=1"),
];

/// Whether `permissions` grant `read` (a `_write` of the same resource implies it).
pub fn grants(permissions: &[String], read: &str) -> bool {
    crate::egress::routes::grants(permissions, read)
}

/// The probes to make: one the key may call and one it may not (either may be absent when the
/// permissions cover all or none of the probes).
pub fn plan(permissions: &[String]) -> (Option<&'static str>, Option<&'static str>) {
    let allowed = PROBES
        .iter()
        .find(|(p, _)| grants(permissions, p))
        .map(|(_, path)| *path);
    let refused = PROBES
        .iter()
        .find(|(p, _)| !grants(permissions, p))
        .map(|(_, path)| *path);
    (allowed, refused)
}

/// Why a scope check did not pass. Only [`ScopeCheckError::WrongScopes`] is a verdict about
/// the key's scopes; the caller must never expire a key (or count a failure against it) for a
/// [`ScopeCheckError::Transient`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScopeCheckError {
    /// A scope verdict: a probe the key should be allowed was refused with a clear 403
    /// permission error, or a probe it should be refused succeeded. Never publish the key;
    /// expire it.
    #[error("wrong scopes: {0}")]
    WrongScopes(String),
    /// Stripe refused the new key itself (401, e.g. `api_key_expired`): it does not
    /// authenticate, which says nothing about its scopes. Do not publish it; check again later
    /// and expire it if it never authenticates.
    #[error("the new key was refused: {0}")]
    KeyRejected(String),
    /// No verdict: Stripe could not be reached, kept answering 429/5xx (or 409) past the retry
    /// bound, said `Stripe-Should-Retry: false`, or gave an answer that says nothing about
    /// scopes. Keep the key unpublished and check again later.
    #[error("scopes could not be checked (not a verdict): {0}")]
    Transient(String),
}

impl ScopeCheckError {
    /// True only for [`ScopeCheckError::WrongScopes`].
    pub fn is_scope_verdict(&self) -> bool {
        matches!(self, ScopeCheckError::WrongScopes(_))
    }

    /// True for [`ScopeCheckError::Transient`]: try again later with the same key.
    pub fn is_transient(&self) -> bool {
        matches!(self, ScopeCheckError::Transient(_))
    }
}

/// How one probe answer counts (pure: status, `Stripe-Should-Retry`, body).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ProbeAnswer {
    /// 2xx: the key may make the call.
    Allowed,
    /// 403 with Stripe's error envelope: the key may not make the call.
    Refused,
    /// 401: the key does not authenticate (the error code, if any).
    KeyRejected(Option<String>),
    /// 409, 429, 5xx, or `Stripe-Should-Retry: true`: ask again.
    Retry,
    /// Anything else: no verdict (a 403 without Stripe's envelope, 400, 404, a redirect, a 5xx
    /// with `Stripe-Should-Retry: false`).
    NoVerdict,
}

pub(crate) fn classify_probe(status: u16, should_retry: Option<bool>, body: &[u8]) -> ProbeAnswer {
    if (200..300).contains(&status) {
        return ProbeAnswer::Allowed;
    }
    if status_is_retryable(status, should_retry) {
        return ProbeAnswer::Retry;
    }
    let envelope = serde_json::from_slice::<ErrorEnvelope>(body).ok();
    match status {
        401 => ProbeAnswer::KeyRejected(envelope.and_then(|e| e.error.code)),
        403 if envelope.is_some_and(|e| e.error.error_type.is_some()) => ProbeAnswer::Refused,
        _ => ProbeAnswer::NoVerdict,
    }
}

fn strip_query(path: &str) -> &str {
    path.split('?').next().unwrap_or(path)
}

/// Makes one probe, retrying 409/429/5xx and transport failures within `config.retry` (with
/// backoff, `Retry-After` as a floor, `Stripe-Should-Retry` obeyed). Returns a verdict
/// (`Allowed`/`Refused`) or the reason there is none.
async fn probe(
    http: &reqwest::Client,
    client: &StripeClient,
    config: &StripeConfig,
    key: &SecretString,
    path: &str,
) -> Result<ProbeAnswer, ScopeCheckError> {
    let url = format!("{}{}", config.api_base.trim_end_matches('/'), path);
    let shown = strip_query(path);
    let policy = &config.retry;
    let mut attempt: u32 = 0;
    loop {
        attempt += 1;
        let can_retry = attempt <= policy.max_retries;
        // Probes count against the account's rate limit like every other call.
        client.rate_limiter().acquire().await;
        let started = std::time::Instant::now();
        let mut record = CallRecord {
            method: "GET".into(),
            path: shown.to_string(),
            account: config.context.clone(),
            status: None,
            connection_error: None,
            request_id: None,
            idempotency_key: None,
            attempt,
            duration: Duration::ZERO,
            error_code: None,
            error_type: None,
            will_retry: false,
        };
        let sent = http
            .get(&url)
            .timeout(config.timeout)
            .bearer_auth(key.expose())
            .header("Stripe-Version", &config.api_version)
            .send()
            .await;
        let outcome = match sent {
            Err(e) => Err(e),
            Ok(resp) => {
                let status = resp.status().as_u16();
                let header = |name: &str| {
                    resp.headers()
                        .get(name)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned)
                };
                record.status = Some(status);
                record.request_id = header("request-id");
                let should_retry =
                    header("stripe-should-retry").and_then(|v| parse_should_retry(&v));
                let retry_after = header("retry-after")
                    .and_then(|v| parse_retry_after(&v, std::time::SystemTime::now()));
                // The body is read only to classify the answer; it is never logged.
                match resp.bytes().await {
                    Err(e) => Err(e),
                    Ok(body) => {
                        if let Ok(env) = serde_json::from_slice::<ErrorEnvelope>(&body) {
                            record.error_code = env.error.code;
                            record.error_type = env.error.error_type;
                        }
                        Ok((
                            classify_probe(status, should_retry, &body),
                            status,
                            retry_after,
                        ))
                    }
                }
            }
        };
        record.duration = started.elapsed();
        match outcome {
            Err(e) => {
                let kind = classify(&e);
                record.connection_error = Some(kind);
                record.will_retry = can_retry;
                client.report(&record);
                if !can_retry {
                    return Err(ScopeCheckError::Transient(format!(
                        "GET {shown} failed after {attempt} attempt(s) ({}): {}",
                        kind.as_str(),
                        error_chain(&e.without_url())
                    )));
                }
                let delay = policy.backoff(attempt, None, rand::random::<f64>());
                tokio::time::sleep(delay).await;
            }
            Ok((ProbeAnswer::Retry, status, retry_after)) => {
                record.will_retry = can_retry;
                client.report(&record);
                if !can_retry {
                    return Err(ScopeCheckError::Transient(format!(
                        "GET {shown} kept answering {status} after {attempt} attempt(s)"
                    )));
                }
                let delay = policy.backoff(attempt, retry_after, rand::random::<f64>());
                tokio::time::sleep(delay).await;
            }
            Ok((answer, status, _)) => {
                client.report(&record);
                return match answer {
                    ProbeAnswer::NoVerdict => Err(ScopeCheckError::Transient(format!(
                        "GET {shown} answered {status}, which says nothing about the key's scopes"
                    ))),
                    ProbeAnswer::KeyRejected(code) => Err(ScopeCheckError::KeyRejected(format!(
                        "GET {shown} answered 401{}",
                        code.map(|c| format!(" ({c})")).unwrap_or_default()
                    ))),
                    verdict => Ok(verdict),
                };
            }
        }
    }
}

/// Makes the probes with the new key: one call its permissions allow must succeed, one they do
/// not allow must be refused with a clear 403. Network errors, 409, 429 and 5xx are retried
/// within the client's [`RetryPolicy`](super::RetryPolicy) and never read as wrong scopes.
/// Errors name the call and status, never the key.
pub async fn check_scopes(
    client: &StripeClient,
    key: &SecretString,
    permissions: &[String],
) -> Result<(), ScopeCheckError> {
    let config = client.config();
    let http = reqwest::Client::builder()
        .connect_timeout(config.timeout)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| ScopeCheckError::Transient(format!("building an HTTP client: {e}")))?;
    let (allowed, refused) = plan(permissions);
    if let Some(path) = allowed
        && probe(&http, client, config, key, path).await? != ProbeAnswer::Allowed
    {
        return Err(ScopeCheckError::WrongScopes(format!(
            "GET {} was refused with 403, but the key should be allowed to make it",
            strip_query(path)
        )));
    }
    if let Some(path) = refused
        && probe(&http, client, config, key, path).await? != ProbeAnswer::Refused
    {
        return Err(ScopeCheckError::WrongScopes(format!(
            "GET {} succeeded, but the key should be refused (403)",
            strip_query(path)
        )));
    }
    Ok(())
}

/// Makes the probes with the new key. `Err` says which call misbehaved (never the key).
///
/// Kept for existing callers; it cannot tell a scope verdict from "Stripe did not answer":
/// call [`check_scopes`] instead.
pub async fn verify_scopes(
    client: &StripeClient,
    key: &SecretString,
    permissions: &[String],
) -> Result<(), String> {
    check_scopes(client, key, permissions)
        .await
        .map_err(|e| e.to_string())
}

/// Checks the key Stripe returned (from create, rotate or retrieve) against the permissions
/// that were asked for: exact set equality of `permissions`, and of `connect_permissions`
/// (an absent `connect_permissions` equals an empty request). An answer without `permissions`
/// is refused, since nothing proves the key's scopes. The error names the key id and the
/// missing and unrequested permission names, never a secret.
pub fn verify_response_scopes(
    key: &ApiKey,
    permissions: &[String],
    connect: &[String],
) -> Result<(), String> {
    let mut problems = Vec::new();
    match &key.permissions {
        None => problems.push(
            "the answer carries no `permissions`, so the key's scopes cannot be verified from it"
                .to_owned(),
        ),
        Some(got) => {
            if let Some(d) = set_difference("permissions", permissions, got) {
                problems.push(d);
            }
        }
    }
    match &key.connect_permissions {
        None if connect.is_empty() => {}
        None => problems.push(
            "the answer carries no `connect_permissions`, but Connect permissions were requested"
                .to_owned(),
        ),
        Some(got) => {
            if let Some(d) = set_difference("connect_permissions", connect, got) {
                problems.push(d);
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "API key {} does not hold exactly the requested scopes: {}",
            key.id,
            problems.join("; ")
        ))
    }
}

fn set_difference(field: &str, wanted: &[String], got: &[String]) -> Option<String> {
    let wanted: BTreeSet<&str> = wanted.iter().map(String::as_str).collect();
    let got: BTreeSet<&str> = got.iter().map(String::as_str).collect();
    let missing: Vec<&str> = wanted.difference(&got).copied().collect();
    let extra: Vec<&str> = got.difference(&wanted).copied().collect();
    if missing.is_empty() && extra.is_empty() {
        return None;
    }
    let mut parts = Vec::new();
    if !missing.is_empty() {
        parts.push(format!("missing [{}]", missing.join(", ")));
    }
    if !extra.is_empty() {
        parts.push(format!("not requested [{}]", extra.join(", ")));
    }
    Some(format!("{field} {}", parts.join(", ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_implies_read_and_plan_picks_one_of_each() {
        let p = vec!["charge_write".to_string(), "refund_write".to_string()];
        assert!(grants(&p, "charge_read"));
        assert!(!grants(&p, "balance_read"));
        assert_eq!(plan(&p), (Some("/v1/charges?limit=1"), Some("/v1/balance")));
        let none = vec!["invoice_read".to_string()];
        assert_eq!(plan(&none), (None, Some("/v1/balance")));
    }

    fn key(permissions: Option<&[&str]>, connect: Option<&[&str]>) -> ApiKey {
        let mut v = serde_json::json!({
            "id": "apikey_1", "object": "v2.iam.api_key", "type": "secret_key",
            "status": "active", "created": "2026-11-28T10:00:00Z", "livemode": false,
            "secret_key": { "token": "rk_test_secretvalue123" },
        });
        if let Some(p) = permissions {
            v["permissions"] = serde_json::json!(p);
        }
        if let Some(c) = connect {
            v["connect_permissions"] = serde_json::json!(c);
        }
        serde_json::from_value(v).unwrap()
    }

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn response_scopes_equal_as_sets_pass() {
        let k = key(Some(&["refund_write", "charge_read"]), Some(&[]));
        assert_eq!(
            verify_response_scopes(&k, &strings(&["charge_read", "refund_write"]), &[]),
            Ok(())
        );
        // duplicates in the request do not matter
        assert_eq!(
            verify_response_scopes(
                &k,
                &strings(&["charge_read", "refund_write", "charge_read"]),
                &[]
            ),
            Ok(())
        );
        // an absent connect_permissions equals an empty request
        let k = key(Some(&["charge_read"]), None);
        assert_eq!(
            verify_response_scopes(&k, &strings(&["charge_read"]), &[]),
            Ok(())
        );
        let k = key(Some(&["charge_read"]), Some(&["customer_read"]));
        assert_eq!(
            verify_response_scopes(&k, &strings(&["charge_read"]), &strings(&["customer_read"])),
            Ok(())
        );
    }

    #[test]
    fn response_scopes_name_missing_and_unrequested_permissions() {
        let k = key(Some(&["charge_read", "payout_write"]), None);
        let err = verify_response_scopes(&k, &strings(&["charge_read", "refund_write"]), &[])
            .unwrap_err();
        assert!(err.contains("apikey_1"), "{err}");
        assert!(err.contains("missing [refund_write]"), "{err}");
        assert!(err.contains("not requested [payout_write]"), "{err}");
        assert!(!err.contains("rk_test_"), "never the secret: {err}");
        // write does not stand in for read: exact equality
        let k = key(Some(&["charge_write"]), None);
        let err = verify_response_scopes(&k, &strings(&["charge_read"]), &[]).unwrap_err();
        assert!(
            err.contains("missing [charge_read]") && err.contains("not requested [charge_write]")
        );
        // a subset is refused too
        let k = key(Some(&[]), None);
        assert!(verify_response_scopes(&k, &strings(&["charge_read"]), &[]).is_err());
    }

    #[test]
    fn response_without_permissions_is_refused() {
        let k = key(None, None);
        let err = verify_response_scopes(&k, &strings(&["charge_read"]), &[]).unwrap_err();
        assert!(err.contains("no `permissions`"), "{err}");
        // even when nothing was requested: nothing proves the key holds nothing
        assert!(verify_response_scopes(&k, &[], &[]).is_err());
    }

    #[test]
    fn response_connect_permissions_are_compared_too() {
        let k = key(
            Some(&["charge_read"]),
            Some(&["charge_read", "transfer_write"]),
        );
        let err =
            verify_response_scopes(&k, &strings(&["charge_read"]), &strings(&["charge_read"]))
                .unwrap_err();
        assert!(
            err.contains("connect_permissions not requested [transfer_write]"),
            "{err}"
        );
        let k = key(Some(&["charge_read"]), None);
        let err =
            verify_response_scopes(&k, &strings(&["charge_read"]), &strings(&["charge_read"]))
                .unwrap_err();
        assert!(err.contains("no `connect_permissions`"), "{err}");
    }

    #[test]
    fn only_a_clear_403_or_a_success_is_a_probe_verdict() {
        let stripe_403 = br#"{"error":{"type":"invalid_request_error","message":"The provided key does not have the required permissions"}}"#;
        assert_eq!(classify_probe(200, None, b"{}"), ProbeAnswer::Allowed);
        assert_eq!(classify_probe(403, None, stripe_403), ProbeAnswer::Refused);
        // a 403 from something that is not Stripe (a proxy's HTML page) says nothing
        assert_eq!(
            classify_probe(403, None, b"<html>forbidden</html>"),
            ProbeAnswer::NoVerdict
        );
        for status in [409, 429, 500, 502, 503, 504] {
            assert_eq!(
                classify_probe(status, None, b""),
                ProbeAnswer::Retry,
                "{status}"
            );
        }
        assert_eq!(
            classify_probe(503, Some(false), b""),
            ProbeAnswer::NoVerdict
        );
        assert_eq!(
            classify_probe(403, Some(true), stripe_403),
            ProbeAnswer::Retry
        );
        for status in [301, 400, 404] {
            assert_eq!(
                classify_probe(status, None, b"{}"),
                ProbeAnswer::NoVerdict,
                "{status}"
            );
        }
        let expired = br#"{"error":{"type":"invalid_request_error","code":"api_key_expired"}}"#;
        assert_eq!(
            classify_probe(401, None, expired),
            ProbeAnswer::KeyRejected(Some("api_key_expired".into()))
        );
    }

    #[test]
    fn only_wrong_scopes_is_a_scope_verdict() {
        assert!(ScopeCheckError::WrongScopes("x".into()).is_scope_verdict());
        assert!(!ScopeCheckError::Transient("x".into()).is_scope_verdict());
        assert!(!ScopeCheckError::KeyRejected("x".into()).is_scope_verdict());
        assert!(ScopeCheckError::Transient("x".into()).is_transient());
        assert!(!ScopeCheckError::WrongScopes("x".into()).is_transient());
    }
}
