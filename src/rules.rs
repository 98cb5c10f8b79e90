//! Who may ask for what: the account's namespace selector, the cluster's guardrails, and which
//! hosts and credential places a `StripeAccount` may name.
//!
//! Pure functions shared by the admission webhook (refuse at apply time) and the controllers
//! (refuse again at reconcile time: defence in depth).

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::ResourceExt;
use kube::core::{Selector, SelectorExt};

use crate::api::permissions::glob_match;
use crate::api::{Mode, StripeAccount, StripeAccountSpec, StripeGuardrail};
use crate::rotation::schedule::parse_duration;
use crate::vault::StorePrefix;

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
/// A denied read also denies the write that implies it ([`implied_read`]): Stripe's
/// `customer_write` grants `customer_read`, so a guardrail denying the read refuses both.
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
        let denied_by = |permission: &str| {
            g.spec
                .denied_permissions
                .iter()
                .find(|pat| glob_match(pat, permission))
        };
        for p in &req.permissions {
            if let Some(pattern) = denied_by(p) {
                out.push(v(
                    "spec.permissions",
                    format!(
                        "permission {p} is denied by StripeGuardrail {name:?} (pattern {pattern})"
                    ),
                ));
            } else if let Some(read) = implied_read(p)
                && let Some(pattern) = denied_by(&read)
            {
                out.push(v(
                    "spec.permissions",
                    format!(
                        "permission {p} is denied: it implies {read}, which StripeGuardrail {name:?} denies (pattern {pattern})"
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

/// The longest overlap the guardrails that select `namespace_labels` allow (the smallest
/// `maxOverlap` among them) and the guardrail that sets it; `None` when none sets one.
pub fn max_overlap(
    guardrails: &[StripeGuardrail],
    namespace_labels: &BTreeMap<String, String>,
) -> Option<(Duration, String)> {
    guardrails
        .iter()
        .filter(|g| selects(&g.spec.namespace_selector, namespace_labels))
        .filter_map(|g| {
            let max = g.spec.max_overlap.as_deref()?;
            Some((parse_duration("maxOverlap", max).ok()?, g.name_any()))
        })
        .min()
}

/// The read permission a write permission implies (Stripe: `<resource>_write` grants
/// `<resource>_read` too), or `None` for a read or any other name.
pub fn implied_read(permission: &str) -> Option<String> {
    permission
        .strip_suffix("_write")
        .filter(|resource| !resource.is_empty())
        .map(|resource| format!("{resource}_read"))
}

// ---------------------------------------------------------------------------------------------
// Account trust: where a StripeAccount may send the app key and where it may read it from.
// ---------------------------------------------------------------------------------------------

/// Stripe's API host: the only host a `StripeAccount`'s `apiBase` may name by default.
pub const STRIPE_API_HOST: &str = "api.stripe.com";
/// The label an administrator puts on a Secret in the operator's namespace to make it usable as
/// a StripeAccount's `credentials.secretRef`. Secrets without it are never read as app keys.
pub const CREDENTIAL_LABEL: &str = "stripekeys.io/credential";
/// The value of [`CREDENTIAL_LABEL`] that marks a Stripe App's secret key.
pub const CREDENTIAL_LABEL_VALUE: &str = "stripe-app";
/// The subtree of the store prefix where account material lives (app keys an administrator puts
/// there, and the RSA keys the operator generates). No namespace can be named `_accounts`, so no
/// resource bundle path `<prefix>/<namespace>/<kind>/<name>` lies in it.
pub const ACCOUNTS_SUBTREE: &str = "_accounts";
/// The leaf under `<prefix>/_accounts/<account>/` where the operator keeps the RSA private key it
/// generated: never readable as an app key.
const GENERATED_KEY_LEAF: &str = "encryption-key";
/// Where the allowed hosts are configured, for messages.
const HOSTS_SETTING: &str =
    "operator flag --allowed-api-hosts (env ALLOWED_API_HOSTS, chart value stripeApi.allowedHosts)";

/// The hosts a `StripeAccount`'s `apiBase` may name: the operator's setting, never the
/// account's. Entries are `host` (default https port) or `host:port`, lowercase. Loopback
/// addresses (127.0.0.0/8, ::1, `localhost`) are refused unless `allow_loopback` (the sandbox
/// and tests) or listed with their port; plain http is accepted only for loopback.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiHosts {
    hosts: Vec<String>,
    allow_loopback: bool,
}

impl Default for ApiHosts {
    fn default() -> Self {
        Self::stripe_only()
    }
}

impl ApiHosts {
    /// Stripe's API host only, no loopback: the production default.
    pub fn stripe_only() -> Self {
        Self {
            hosts: vec![STRIPE_API_HOST.to_string()],
            allow_loopback: false,
        }
    }

    /// Validates `hosts` (`host` or `host:port`; at least one unless `allow_loopback`).
    pub fn new<S: AsRef<str>>(
        hosts: impl IntoIterator<Item = S>,
        allow_loopback: bool,
    ) -> Result<Self, String> {
        let mut out = Vec::new();
        for entry in hosts {
            let entry = entry.as_ref().trim();
            if entry.is_empty() {
                continue;
            }
            let normalized = (!entry.contains(['*', '/', '@', '?', '#']))
                .then(|| url::Url::parse(&format!("https://{entry}/")).ok())
                .flatten()
                .and_then(|u| host_and_port(&u))
                .ok_or_else(|| {
                    format!(
                        "allowed API host {entry:?} is not a host or host:port (e.g. {STRIPE_API_HOST}; no scheme, path or wildcard)"
                    )
                })?;
            if !out.contains(&normalized) {
                out.push(normalized);
            }
        }
        if out.is_empty() && !allow_loopback {
            return Err(format!(
                "no allowed API host: set at least one (the default is {STRIPE_API_HOST})"
            ));
        }
        Ok(Self {
            hosts: out,
            allow_loopback,
        })
    }

    /// The same hosts, loopback allowed too (the local sandbox and tests, whose simulator
    /// listens on 127.0.0.1).
    pub fn with_loopback(mut self) -> Self {
        self.allow_loopback = true;
        self
    }

    /// Whether any loopback address is allowed.
    pub fn allows_loopback(&self) -> bool {
        self.allow_loopback
    }

    /// The allowed hosts, as configured (normalized).
    pub fn hosts(&self) -> &[String] {
        &self.hosts
    }

    /// What is allowed, for messages.
    pub fn describe(&self) -> String {
        let mut parts: Vec<String> = self.hosts.iter().map(|h| format!("https://{h}")).collect();
        if self.allow_loopback {
            parts.push("http(s) to a loopback address (127.0.0.1, [::1], localhost)".into());
        }
        parts.join(", ")
    }

    /// Checks an `apiBase`: an https URL (http only to loopback) on an allowed host, without
    /// user info, query or fragment.
    pub fn check(&self, api_base: &str) -> Result<(), String> {
        let refuse = |why: String| {
            Err(format!(
                "apiBase {api_base:?} is not allowed: {why}; this operator sends a StripeAccount's app key only to {} ({HOSTS_SETTING})",
                self.describe()
            ))
        };
        let url = match url::Url::parse(api_base) {
            Ok(u) => u,
            Err(e) => return refuse(format!("it is not a URL ({e})")),
        };
        if !url.username().is_empty() || url.password().is_some() {
            return refuse("it carries user info".into());
        }
        if url.query().is_some() || url.fragment().is_some() {
            return refuse("it carries a query or a fragment".into());
        }
        let loopback = match url.host() {
            Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
            Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
            Some(url::Host::Domain(d)) => d.trim_end_matches('.') == "localhost",
            None => false,
        };
        match url.scheme() {
            "https" => {}
            "http" if loopback => {}
            other => return refuse(format!("scheme {other} (https only)")),
        }
        let Some(host) = host_and_port(&url) else {
            return refuse("it has no host".into());
        };
        if (loopback && self.allow_loopback) || self.hosts.contains(&host) {
            return Ok(());
        }
        refuse(format!("host {host} is not allowed"))
    }
}

/// `host` (default port) or `host:port`, lowercase, without a trailing dot.
fn host_and_port(url: &url::Url) -> Option<String> {
    let host = url.host_str()?.trim_end_matches('.').to_ascii_lowercase();
    if host.is_empty() {
        return None;
    }
    Some(match url.port() {
        Some(port) => format!("{host}:{port}"),
        None => host,
    })
}

/// The operator's trust settings for `StripeAccount`s: which API hosts, which store subtree,
/// which namespace's (labelled) Secrets.
#[derive(Clone, Debug)]
pub struct AccountTrust {
    /// Hosts `apiBase` may name.
    pub api_hosts: ApiHosts,
    /// The operator's namespace: the only one whose Secrets may hold an app key.
    pub operator_namespace: String,
    /// The store prefix: account material lives under `<prefix>/_accounts/`.
    pub store_prefix: StorePrefix,
}

impl AccountTrust {
    /// The Vault subtree account keys must live in, `<prefix>/_accounts/`.
    pub fn accounts_subtree(&self) -> String {
        format!("{}/{ACCOUNTS_SUBTREE}/", self.store_prefix.as_str())
    }
}

/// Why a `StripeAccount` is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountRefusal {
    /// Short PascalCase reason (`ApiHostNotAllowed`, `CredentialPathNotAllowed`,
    /// `CredentialSecretNotLabelled`, `InvalidSpec`).
    pub reason: &'static str,
    /// What is refused and what is allowed.
    pub message: String,
}

impl std::fmt::Display for AccountRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// Judges a `StripeAccount` against the operator's trust settings: THE check that admission
/// and the controllers both make before anything is read or sent.
///
/// - `apiBase` must be allowed by [`ApiHosts::check`];
/// - `credentials.vault.path` and `encryptionKey.vault.path` must lie under
///   `<prefix>/_accounts/` (never a resource's bundle path), and the app key never at an
///   operator-generated `<prefix>/_accounts/<account>/encryption-key`;
/// - a `credentials.secretRef` Secret (in the operator's namespace) must carry
///   [`CREDENTIAL_LABEL`]`=`[`CREDENTIAL_LABEL_VALUE`]. `secret_labels` are that Secret's labels
///   once it has been read; `None` skips this one check (the Secret has not been read: admission
///   before it exists). The controllers always pass them before reading the Secret's data.
pub fn validate_account(
    name: &str,
    spec: &StripeAccountSpec,
    trust: &AccountTrust,
    secret_labels: Option<&BTreeMap<String, String>>,
) -> Result<(), AccountRefusal> {
    if Selector::try_from(spec.namespace_selector.clone()).is_err() {
        return Err(AccountRefusal {
            reason: "InvalidSpec",
            message: format!(
                "StripeAccount {name:?}: namespaceSelector is not a valid label selector"
            ),
        });
    }
    trust
        .api_hosts
        .check(&spec.api_base)
        .map_err(|message| AccountRefusal {
            reason: "ApiHostNotAllowed",
            message: format!("StripeAccount {name:?}: {message}"),
        })?;
    if let Some(v) = &spec.credentials.vault {
        check_account_path(name, "credentials.vault.path", &v.path, trust, true)?;
    }
    if let Some(k) = &spec.encryption_key {
        check_account_path(
            name,
            "encryptionKey.vault.path",
            &k.vault.path,
            trust,
            false,
        )?;
    }
    if let (Some(r), Some(labels)) = (&spec.credentials.secret_ref, secret_labels)
        && labels.get(CREDENTIAL_LABEL).map(String::as_str) != Some(CREDENTIAL_LABEL_VALUE)
    {
        return Err(AccountRefusal {
            reason: "CredentialSecretNotLabelled",
            message: format!(
                "StripeAccount {name:?}: Secret {}/{} is not labelled {CREDENTIAL_LABEL}={CREDENTIAL_LABEL_VALUE}; the operator reads an app key only from a Secret in its own namespace that an administrator labelled so (kubectl -n {} label secret {} {CREDENTIAL_LABEL}={CREDENTIAL_LABEL_VALUE}), or from Vault under {}",
                trust.operator_namespace,
                r.name,
                trust.operator_namespace,
                r.name,
                trust.accounts_subtree()
            ),
        });
    }
    Ok(())
}

fn check_account_path(
    name: &str,
    field: &str,
    path: &str,
    trust: &AccountTrust,
    app_key: bool,
) -> Result<(), AccountRefusal> {
    let subtree = trust.accounts_subtree();
    let refuse = |why: &str| {
        Err(AccountRefusal {
            reason: "CredentialPathNotAllowed",
            message: format!(
                "StripeAccount {name:?}: {field} {path:?} is not allowed ({why}); account keys live in the operator's KV mount under {subtree}<name>/... (for example {subtree}{name}/app-key), never in a resource's path <prefix>/<namespace>/<kind>/<name>"
            ),
        })
    };
    let Some(rest) = path.strip_prefix(&subtree) else {
        return refuse(&format!("it is not under {subtree}"));
    };
    let segments: Vec<&str> = rest.split('/').collect();
    if segments
        .iter()
        .any(|s| s.is_empty() || *s == "." || *s == "..")
    {
        return refuse("it has an empty, '.' or '..' segment");
    }
    if app_key && segments.len() == 2 && segments[1] == GENERATED_KEY_LEAF {
        return refuse("it is a decryption key the operator generated");
    }
    Ok(())
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

    #[test]
    fn denying_a_read_denies_the_write_that_implies_it_naming_both() {
        let g = guardrail(
            "no-customers",
            serde_json::json!({"namespaceSelector": {}, "deniedPermissions": ["customer_read"]}),
        );
        let req = Request {
            permissions: vec!["charge_read", "customer_write", "customer_read"],
            ..Default::default()
        };
        let v = evaluate(&[g], &req);
        let messages: Vec<&str> = v.iter().map(|v| v.message.as_str()).collect();
        assert_eq!(
            messages,
            [
                "permission customer_write is denied: it implies customer_read, which StripeGuardrail \"no-customers\" denies (pattern customer_read)",
                "permission customer_read is denied by StripeGuardrail \"no-customers\" (pattern customer_read)",
            ]
        );
        assert!(v.iter().all(|v| v.field == "spec.permissions"));
    }

    #[test]
    fn a_read_glob_denies_every_write_and_denying_a_write_leaves_its_read() {
        let g = guardrail(
            "read-glob",
            serde_json::json!({"namespaceSelector": {}, "deniedPermissions": ["payout_*_read", "refund_write"]}),
        );
        // Not a real resource, but the glob must still reach the write through the implication.
        let req = Request {
            permissions: vec!["payout_x_write", "refund_read", "charge_write"],
            ..Default::default()
        };
        let v = evaluate(&[g], &req);
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(
            v[0].message
                .contains("payout_x_write is denied: it implies payout_x_read"),
            "{}",
            v[0].message
        );
    }

    #[test]
    fn implied_read_maps_only_writes() {
        assert_eq!(
            implied_read("customer_write").as_deref(),
            Some("customer_read")
        );
        assert_eq!(implied_read("customer_read"), None);
        assert_eq!(implied_read("_write"), None);
        assert_eq!(implied_read("webhook"), None);
    }

    fn trust(hosts: ApiHosts) -> AccountTrust {
        AccountTrust {
            api_hosts: hosts,
            operator_namespace: "stripe-key-operator".into(),
            store_prefix: StorePrefix::new("stripe-key-operator").unwrap(),
        }
    }

    fn account_spec(extra: serde_json::Value) -> StripeAccountSpec {
        let mut spec = serde_json::json!({
            "mode": "test", "context": "acct_1",
            "credentials": {"secretRef": {"name": "app", "key": "secret_key"}},
            "namespaceSelector": {}
        });
        for (k, v) in extra.as_object().unwrap() {
            spec[k] = v.clone();
        }
        serde_json::from_value(spec).unwrap()
    }

    fn labelled() -> BTreeMap<String, String> {
        labels(&[(CREDENTIAL_LABEL, CREDENTIAL_LABEL_VALUE)])
    }

    #[test]
    fn api_hosts_default_to_stripe_only() {
        let hosts = ApiHosts::default();
        assert!(hosts.check("https://api.stripe.com").is_ok());
        assert!(hosts.check("https://API.stripe.com:443/").is_ok());
        assert!(hosts.check("https://api.stripe.com.").is_ok());
        for bad in [
            "https://api.stripe.com.evil.net",
            "https://evil.net",
            "https://api.stripe.com:8443",
            "http://api.stripe.com",
            "https://api.stripe.com@evil.net",
            "https://user:pw@api.stripe.com",
            "https://api.stripe.com/?x=1",
            "http://127.0.0.1:8080",
            "https://localhost",
            "http://[::1]:80",
            "not a url",
        ] {
            let err = hosts.check(bad).expect_err(bad);
            assert!(
                err.contains("only to https://api.stripe.com")
                    && err.contains("--allowed-api-hosts"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn loopback_only_when_allowed_and_http_only_to_loopback() {
        let hosts = ApiHosts::default().with_loopback();
        assert!(hosts.check("http://127.0.0.1:8080").is_ok());
        assert!(hosts.check("http://localhost:1").is_ok());
        assert!(hosts.check("http://[::1]:9").is_ok());
        assert!(hosts.check("http://10.0.0.1").is_err());
        assert!(hosts.check("http://localhost.evil.net").is_err());
        // One exact loopback port, without every loopback port.
        let one = ApiHosts::new(["127.0.0.1:4000"], false).unwrap();
        assert!(one.check("http://127.0.0.1:4000").is_ok());
        assert!(one.check("http://127.0.0.1:4001").is_err());
        assert!(one.check("https://api.stripe.com").is_err());
    }

    #[test]
    fn api_host_entries_are_validated() {
        let h = ApiHosts::new(["API.Stripe.com", " proxy.internal:8443 ", ""], false).unwrap();
        assert_eq!(h.hosts(), ["api.stripe.com", "proxy.internal:8443"]);
        assert!(h.check("https://proxy.internal:8443/stripe").is_ok());
        assert!(h.check("https://proxy.internal").is_err());
        for bad in ["https://api.stripe.com", "*.stripe.com", "a/b", "u@h", ""] {
            assert!(ApiHosts::new([bad], false).is_err(), "{bad}");
        }
        assert!(ApiHosts::new(Vec::<String>::new(), true).is_ok());
    }

    #[test]
    fn account_credentials_must_live_in_the_accounts_subtree() {
        let t = trust(ApiHosts::default());
        let vault = |path: &str| {
            account_spec(
                serde_json::json!({"credentials": {"vault": {"path": path, "key": "secret"}}}),
            )
        };
        assert!(
            validate_account(
                "a",
                &vault("stripe-key-operator/_accounts/a/app-key"),
                &t,
                None
            )
            .is_ok()
        );
        for bad in [
            // A tenant's bundle.
            "stripe-key-operator/shop/stripekeypolicy/checkout",
            "stripe-key-operator/shop/stripekeypolicy/checkout/live",
            // Outside the prefix, or the subtree itself.
            "secret/root",
            "other/_accounts/a/app-key",
            "stripe-key-operator/_accounts/",
            "stripe-key-operator/_accounts/a/../../shop/stripekeypolicy/checkout",
            "stripe-key-operator/_accounts//x",
            // An RSA key the operator generated.
            "stripe-key-operator/_accounts/b/encryption-key",
        ] {
            let r = validate_account("a", &vault(bad), &t, None).expect_err(bad);
            assert_eq!(r.reason, "CredentialPathNotAllowed", "{bad}");
            assert!(
                r.message
                    .contains("under stripe-key-operator/_accounts/<name>/"),
                "{}",
                r.message
            );
        }
        // The decryption key obeys the same subtree rule.
        let enc = account_spec(serde_json::json!({
            "encryptionKey": {"vault": {"path": "stripe-key-operator/shop/stripekeypolicy/checkout", "key": "secret"}}
        }));
        let r = validate_account("a", &enc, &t, Some(&labelled())).unwrap_err();
        assert!(
            r.message.contains("encryptionKey.vault.path"),
            "{}",
            r.message
        );
    }

    #[test]
    fn credential_secrets_need_the_label_and_hosts_the_setting() {
        let t = trust(ApiHosts::default());
        let spec = account_spec(serde_json::json!({}));
        assert!(validate_account("a", &spec, &t, Some(&labelled())).is_ok());
        assert!(
            validate_account("a", &spec, &t, None).is_ok(),
            "not read yet"
        );
        let bundle_secret = labels(&[("app.kubernetes.io/managed-by", "stripe-key-operator")]);
        let r = validate_account("a", &spec, &t, Some(&bundle_secret)).unwrap_err();
        assert_eq!(r.reason, "CredentialSecretNotLabelled");
        assert!(
            r.message.contains(
                "Secret stripe-key-operator/app is not labelled stripekeys.io/credential=stripe-app"
            ),
            "{}",
            r.message
        );
        let wrong_value = labels(&[(CREDENTIAL_LABEL, "yes")]);
        assert!(validate_account("a", &spec, &t, Some(&wrong_value)).is_err());
        let evil = account_spec(serde_json::json!({"apiBase": "https://collector.evil.net"}));
        let r = validate_account("a", &evil, &t, Some(&labelled())).unwrap_err();
        assert_eq!(r.reason, "ApiHostNotAllowed");
        assert!(
            r.message.contains("https://api.stripe.com"),
            "{}",
            r.message
        );
    }
}
