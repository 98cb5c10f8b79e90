//! Who may ask for what: the account's namespace selector and the cluster's guardrails.
//!
//! Pure functions shared by the admission webhook (refuse at apply time) and the controllers
//! (refuse again at reconcile time: defence in depth).

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::ResourceExt;
use kube::core::{Selector, SelectorExt};

use crate::api::permissions::glob_match;
use crate::api::{Mode, StripeAccount, StripeGuardrail};
use crate::rotation::schedule::parse_duration;

/// Whether `selector` selects an object with `labels`. An invalid selector selects nothing.
pub fn selects(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    Selector::try_from(selector.clone()).is_ok_and(|s| s.matches(labels))
}

/// Whether the account serves `namespace` (whose labels are `labels`).
pub fn account_allows_namespace(
    account: &StripeAccount,
    labels: &BTreeMap<String, String>,
) -> bool {
    selects(&account.spec.namespace_selector, labels)
}

/// What a guardrail judges about a policy or an endpoint.
#[derive(Debug, Clone, Default)]
pub struct Request<'a> {
    /// Labels of the object's namespace.
    pub namespace_labels: BTreeMap<String, String>,
    /// Mode of the referenced account, when known.
    pub mode: Option<Mode>,
    /// Declared permissions (and Connect permissions).
    pub permissions: Vec<&'a str>,
    /// The longest gap between rotations, or `None` when the object does not rotate.
    pub rotation_period: Option<Duration>,
    /// Whether the object declares rotation at all (a webhook or policy without `rotation`).
    pub rotates: bool,
    /// The declared overlap.
    pub overlap: Option<Duration>,
    /// The host of a webhook URL.
    pub webhook_host: Option<&'a str>,
}

/// One refusal, naming the guardrail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// Name of the StripeGuardrail.
    pub guardrail: String,
    /// The field at fault (`spec.permissions`, `spec.rotation.overlap`, ...).
    pub field: &'static str,
    /// What is refused and why.
    pub message: String,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// Every violation of every guardrail that selects the request's namespace, in a stable order.
pub fn evaluate(guardrails: &[StripeGuardrail], req: &Request<'_>) -> Vec<Violation> {
    let mut sorted: Vec<&StripeGuardrail> = guardrails.iter().collect();
    sorted.sort_by_key(|g| g.name_any());
    let mut out = Vec::new();
    for g in sorted {
        if !selects(&g.spec.namespace_selector, &req.namespace_labels) {
            continue;
        }
        let name = g.name_any();
        let v = |field, message: String| Violation {
            guardrail: name.clone(),
            field,
            message,
        };
        for p in &req.permissions {
            if let Some(pattern) = g
                .spec
                .denied_permissions
                .iter()
                .find(|pat| glob_match(pat, p))
            {
                out.push(v(
                    "spec.permissions",
                    format!(
                        "permission {p} is denied by StripeGuardrail {name:?} (pattern {pattern})"
                    ),
                ));
            } else if let Some(allowed) = &g.spec.allowed_permissions
                && !allowed.iter().any(|pat| glob_match(pat, p))
            {
                out.push(v(
                    "spec.permissions",
                    format!("permission {p} is not among those StripeGuardrail {name:?} allows"),
                ));
            }
        }
        if g.spec.allow_live_mode == Some(false) && req.mode == Some(Mode::Live) {
            out.push(v(
                "spec.accountRef",
                format!(
                    "StripeGuardrail {name:?} does not allow live-mode accounts in this namespace"
                ),
            ));
        }
        if let Some(max) = &g.spec.max_rotation_period {
            match (
                parse_duration("maxRotationPeriod", max),
                req.rotates,
                req.rotation_period,
            ) {
                (Ok(_), false, _) => out.push(v(
                    "spec.rotation",
                    format!("StripeGuardrail {name:?} requires rotation at least every {max}"),
                )),
                (Ok(limit), true, Some(period)) if period > limit => out.push(v(
                    "spec.rotation",
                    format!(
                        "rotation period {} exceeds the maximum {max} of StripeGuardrail {name:?}",
                        humantime::format_duration(period)
                    ),
                )),
                _ => {}
            }
        }
        if let (Some(max), Some(overlap)) = (&g.spec.max_overlap, req.overlap)
            && let Ok(limit) = parse_duration("maxOverlap", max)
            && overlap > limit
        {
            out.push(v(
                "spec.rotation.overlap",
                format!(
                    "overlap {} exceeds the maximum {max} of StripeGuardrail {name:?}",
                    humantime::format_duration(overlap)
                ),
            ));
        }
        if let (Some(hosts), Some(host)) = (&g.spec.allowed_webhook_hosts, req.webhook_host)
            && !hosts
                .iter()
                .any(|pat| glob_match(pat, &host.to_ascii_lowercase()))
        {
            out.push(v(
                "spec.url",
                format!("webhook host {host} is not among those StripeGuardrail {name:?} allows"),
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::StripeGuardrailSpec;

    fn guardrail(name: &str, spec: serde_json::Value) -> StripeGuardrail {
        let spec: StripeGuardrailSpec = serde_json::from_value(spec).unwrap();
        StripeGuardrail::new(name, spec)
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn denied_permission_names_the_guardrail_and_pattern() {
        let g = guardrail(
            "baseline",
            serde_json::json!({"namespaceSelector": {}, "deniedPermissions": ["payout_*"]}),
        );
        let req = Request {
            permissions: vec!["charge_read", "payout_write"],
            rotates: true,
            ..Default::default()
        };
        let v = evaluate(&[g], &req);
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].guardrail, "baseline");
        assert_eq!(
            v[0].message,
            "permission payout_write is denied by StripeGuardrail \"baseline\" (pattern payout_*)"
        );
    }

    #[test]
    fn allow_list_refuses_everything_else() {
        let g = guardrail(
            "readonly",
            serde_json::json!({"namespaceSelector": {}, "allowedPermissions": ["*_read"]}),
        );
        let req = Request {
            permissions: vec!["charge_read", "refund_write"],
            ..Default::default()
        };
        let v = evaluate(&[g], &req);
        assert_eq!(v.len(), 1);
        assert!(v[0].message.contains("refund_write"));
    }

    #[test]
    fn guardrail_applies_only_to_selected_namespaces() {
        let g = guardrail(
            "prod-only",
            serde_json::json!({"namespaceSelector": {"matchLabels": {"env": "prod"}}, "deniedPermissions": ["*"]}),
        );
        let dev = Request {
            namespace_labels: labels(&[("env", "dev")]),
            permissions: vec!["charge_read"],
            ..Default::default()
        };
        assert!(evaluate(std::slice::from_ref(&g), &dev).is_empty());
        let prod = Request {
            namespace_labels: labels(&[("env", "prod")]),
            permissions: vec!["charge_read"],
            ..Default::default()
        };
        assert_eq!(evaluate(&[g], &prod).len(), 1);
    }

    #[test]
    fn live_mode_rotation_period_overlap_and_hosts() {
        let g = guardrail(
            "strict",
            serde_json::json!({
                "namespaceSelector": {},
                "allowLiveMode": false,
                "maxRotationPeriod": "720h",
                "maxOverlap": "2h",
                "allowedWebhookHosts": ["*.example.com"]
            }),
        );
        let req = Request {
            mode: Some(Mode::Live),
            rotates: true,
            rotation_period: Some(Duration::from_secs(1000 * 3600)),
            overlap: Some(Duration::from_secs(3 * 3600)),
            webhook_host: Some("evil.attacker.net"),
            ..Default::default()
        };
        let fields: Vec<_> = evaluate(std::slice::from_ref(&g), &req)
            .iter()
            .map(|v| v.field)
            .collect();
        assert_eq!(
            fields,
            [
                "spec.accountRef",
                "spec.rotation",
                "spec.rotation.overlap",
                "spec.url"
            ]
        );
        let ok = Request {
            mode: Some(Mode::Test),
            rotates: true,
            rotation_period: Some(Duration::from_secs(24 * 3600)),
            overlap: Some(Duration::from_secs(3600)),
            webhook_host: Some("hooks.example.com"),
            ..Default::default()
        };
        assert!(evaluate(std::slice::from_ref(&g), &ok).is_empty());
        let no_rotation = Request {
            rotates: false,
            ..Default::default()
        };
        assert_eq!(
            evaluate(&[g], &no_rotation)[0].message,
            "StripeGuardrail \"strict\" requires rotation at least every 720h"
        );
    }

    #[test]
    fn account_namespace_selector() {
        let account: StripeAccount = serde_json::from_value(serde_json::json!({
            "apiVersion": "stripekeys.io/v1alpha1", "kind": "StripeAccount",
            "metadata": {"name": "a"},
            "spec": {"mode": "test", "context": "acct_1", "credentials": {"secretRef": {"name": "s", "key": "k"}},
                     "namespaceSelector": {"matchExpressions": [{"key": "team", "operator": "In", "values": ["pay"]}]}}
        }))
        .unwrap();
        assert!(account_allows_namespace(
            &account,
            &labels(&[("team", "pay")])
        ));
        assert!(!account_allows_namespace(
            &account,
            &labels(&[("team", "ads")])
        ));
        assert!(!account_allows_namespace(&account, &labels(&[])));
    }
}
