//! Proving a new key's scopes before it is published: one call the key may make must succeed,
//! one call outside its permissions must be refused with 403.

use std::time::Duration;

use super::{StripeClient, StripeConfig};
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
    let write = read.strip_suffix("_read").map(|r| format!("{r}_write"));
    permissions
        .iter()
        .any(|p| p == read || Some(p) == write.as_ref())
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

async fn status_of(
    http: &reqwest::Client,
    client: &StripeClient,
    config: &StripeConfig,
    key: &SecretString,
    path: &str,
) -> Result<u16, String> {
    let url = format!("{}{}", config.api_base.trim_end_matches('/'), path);
    let mut delay = Duration::from_millis(200);
    for attempt in 1..=5 {
        // Probes count against the account's rate limit like every other call.
        client.rate_limiter().acquire().await;
        let started = std::time::Instant::now();
        let sent = http
            .get(&url)
            .bearer_auth(key.expose())
            .header("Stripe-Version", &config.api_version)
            .send()
            .await;
        let status = sent.as_ref().ok().map(|r| r.status().as_u16());
        let retry = status.is_none_or(|s| s == 429 || s >= 500) && attempt < 5;
        client.report(&super::CallRecord {
            method: "GET".into(),
            path: path.split('?').next().unwrap_or(path).to_string(),
            account: config.context.clone(),
            status,
            connection_error: sent
                .as_ref()
                .err()
                .map(|_| super::ConnectionErrorKind::Connect),
            request_id: sent
                .as_ref()
                .ok()
                .and_then(|r| r.headers().get("request-id"))
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
            idempotency_key: None,
            attempt,
            duration: started.elapsed(),
            error_code: None,
            error_type: None,
            will_retry: retry,
        });
        match sent {
            Ok(r) if r.status().as_u16() == 429 || r.status().is_server_error() => {}
            Ok(r) => return Ok(r.status().as_u16()),
            Err(_) if attempt < 5 => {}
            Err(e) => {
                return Err(format!(
                    "GET {} failed: {}",
                    path.split('?').next().unwrap_or(path),
                    e.without_url()
                ));
            }
        }
        tokio::time::sleep(delay).await;
        delay *= 2;
    }
    Err(format!(
        "GET {} kept failing with 429/5xx",
        path.split('?').next().unwrap_or(path)
    ))
}

/// Makes the probes with the new key. `Err` says which call misbehaved (never the key).
pub async fn verify_scopes(
    client: &StripeClient,
    key: &SecretString,
    permissions: &[String],
) -> Result<(), String> {
    let config = client.config();
    let http = reqwest::Client::builder()
        .timeout(config.timeout)
        .build()
        .map_err(|e| format!("building an HTTP client: {e}"))?;
    let (allowed, refused) = plan(permissions);
    if let Some(path) = allowed {
        let status = status_of(&http, client, config, key, path).await?;
        if status != 200 {
            return Err(format!(
                "GET {} answered {status}, but the key should be allowed to make it",
                path.split('?').next().unwrap_or(path)
            ));
        }
    }
    if let Some(path) = refused {
        let status = status_of(&http, client, config, key, path).await?;
        if status != 403 {
            return Err(format!(
                "GET {} answered {status}, but the key should be refused (403)",
                path.split('?').next().unwrap_or(path)
            ));
        }
    }
    Ok(())
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
}
