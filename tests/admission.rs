//! The admission webhooks: a matrix of reviews through the pure handlers, the HTTPS server with
//! a generated certificate, and the self-signed certificate management against the API server
//! for tests. Every Stripe-looking secret here is generated at run time.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use base64::Engine;
use k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, PostParams};
use rand::Rng;
use rand::distr::Alphanumeric;
use serde_json::{Value, json};
use stripe_key_operator::admission::server::{self, AdmissionSettings, WebhookConfig};
use stripe_key_operator::admission::tls::{
    self, CertMode, CertStore, Injection, SelfSignedConfig, ServingCert,
};
use stripe_key_operator::admission::{
    self, LITERAL_KEYS_PATH, LiteralKeysPolicy, LookupError, Lookups, STRIPE_OBJECTS_PATH,
};
use stripe_key_operator::api::{StripeAccount, StripeGuardrail};
use stripe_key_operator::rules::{
    AccountTrust, ApiHosts, CREDENTIAL_LABEL, CREDENTIAL_LABEL_VALUE,
};
use stripe_key_operator::vault::StorePrefix;
use tokio_util::sync::CancellationToken;

// ---------------------------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------------------------

/// A random token that the scanner counts as secret (mixed classes, many distinct characters).
fn token(len: usize) -> String {
    let tail: String = rand::rng()
        .sample_iter(&Alphanumeric)
        .take(len - 3)
        .map(char::from)
        .collect();
    format!("aB3{tail}")
}

fn live_secret_key() -> String {
    format!("{}_{}_{}", "sk", "live", token(24))
}

fn live_restricted_key() -> String {
    format!("{}_{}_{}", "rk", "live", token(24))
}

fn test_secret_key() -> String {
    format!("{}_{}_{}", "sk", "test", token(24))
}

fn webhook_secret() -> String {
    format!("{}_{}", "whsec", token(32))
}

fn account(name: &str, mode: &str, selector: Value) -> StripeAccount {
    serde_json::from_value(json!({
        "apiVersion": "stripekeys.io/v1alpha1", "kind": "StripeAccount",
        "metadata": {"name": name},
        "spec": {"mode": mode, "context": "acct_1Example",
                 "credentials": {"secretRef": {"name": "app-key", "key": "secret_key"}},
                 "namespaceSelector": selector}
    }))
    .unwrap()
}

fn guardrail(name: &str, spec: Value) -> StripeGuardrail {
    serde_json::from_value(json!({
        "apiVersion": "stripekeys.io/v1alpha1", "kind": "StripeGuardrail",
        "metadata": {"name": name}, "spec": spec
    }))
    .unwrap()
}

/// The operator's service account, as the API server names it in `userInfo.username`.
const OPERATOR_USER: &str = "system:serviceaccount:stripe-key-operator:stripe-key-operator";

/// The trust settings of a production operator: Stripe's API host only, store prefix
/// `stripe-key-operator`, namespace `stripe-key-operator`.
fn trust() -> AccountTrust {
    AccountTrust {
        api_hosts: ApiHosts::stripe_only(),
        operator_namespace: "stripe-key-operator".into(),
        store_prefix: StorePrefix::new("stripe-key-operator").unwrap(),
    }
}

fn literal_keys_policy(include_test: bool) -> LiteralKeysPolicy {
    LiteralKeysPolicy {
        include_test_keys: include_test,
        exempt_username: Some(OPERATOR_USER.into()),
    }
}

fn settings() -> AdmissionSettings {
    AdmissionSettings {
        literal_keys: literal_keys_policy(false),
        account_trust: trust(),
    }
}

#[derive(Default)]
struct FakeLookups {
    accounts: BTreeMap<String, StripeAccount>,
    namespaces: BTreeMap<String, BTreeMap<String, String>>,
    guardrails: Vec<StripeGuardrail>,
    /// Labels of Secrets by (namespace, name).
    secrets: BTreeMap<(String, String), BTreeMap<String, String>>,
    broken: bool,
}

#[async_trait]
impl Lookups for FakeLookups {
    async fn account(&self, name: &str) -> Result<Option<StripeAccount>, LookupError> {
        if self.broken {
            return Err(LookupError {
                what: format!("StripeAccount {name:?}"),
                message: "connection refused".into(),
            });
        }
        Ok(self.accounts.get(name).cloned())
    }
    async fn namespace_labels(
        &self,
        namespace: &str,
    ) -> Result<BTreeMap<String, String>, LookupError> {
        Ok(self.namespaces.get(namespace).cloned().unwrap_or_default())
    }
    async fn guardrails(&self) -> Result<Vec<StripeGuardrail>, LookupError> {
        Ok(self.guardrails.clone())
    }
    async fn secret_labels(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<Option<BTreeMap<String, String>>, LookupError> {
        Ok(self
            .secrets
            .get(&(namespace.to_string(), name.to_string()))
            .cloned())
    }
}

/// `shop` (team=pay, env=prod) and `ads` (team=ads) namespaces; the `payments` test account
/// serves team=pay, the `payments-live` live account too; guardrail `baseline` denies
/// `payout_*` everywhere and allows webhooks to `*.example.com` only; guardrail `no-live-in-dev`
/// refuses live mode in env=dev.
fn cluster() -> FakeLookups {
    let pay = json!({"matchLabels": {"team": "pay"}});
    FakeLookups {
        accounts: BTreeMap::from([
            ("payments".into(), account("payments", "test", pay.clone())),
            (
                "payments-live".into(),
                account("payments-live", "live", pay),
            ),
        ]),
        namespaces: BTreeMap::from([
            (
                "shop".into(),
                BTreeMap::from([("team".into(), "pay".into()), ("env".into(), "prod".into())]),
            ),
            (
                "sandbox".into(),
                BTreeMap::from([("team".into(), "pay".into()), ("env".into(), "dev".into())]),
            ),
            (
                "ads".into(),
                BTreeMap::from([("team".into(), "ads".into())]),
            ),
        ]),
        guardrails: vec![
            guardrail(
                "baseline",
                json!({"namespaceSelector": {}, "deniedPermissions": ["payout_*"],
                       "allowedWebhookHosts": ["*.example.com"]}),
            ),
            guardrail(
                "no-live-in-dev",
                json!({"namespaceSelector": {"matchLabels": {"env": "dev"}}, "allowLiveMode": false}),
            ),
        ],
        secrets: BTreeMap::from([
            (
                ("stripe-key-operator".into(), "app-key".into()),
                BTreeMap::from([(CREDENTIAL_LABEL.into(), CREDENTIAL_LABEL_VALUE.into())]),
            ),
            (
                // A bundle of the kubernetes store: the operator's own Secret, never an app key.
                (
                    "stripe-key-operator".into(),
                    "sko-shop-stripekeypolicy-checkout".into(),
                ),
                BTreeMap::from([(
                    "app.kubernetes.io/managed-by".into(),
                    "stripe-key-operator".into(),
                )]),
            ),
        ]),
        broken: false,
    }
}

fn policy(namespace: &str, account: &str, permissions: &[&str]) -> Value {
    json!({
        "apiVersion": "stripekeys.io/v1alpha1", "kind": "StripeKeyPolicy",
        "metadata": {"name": "checkout", "namespace": namespace},
        "spec": {"accountRef": {"name": account}, "permissions": permissions,
                 "delivery": {"secret": {"name": "checkout-stripe-key"}},
                 "rotation": {"every": "720h", "overlap": "1h"}}
    })
}

fn endpoint(namespace: &str, url: &str) -> Value {
    json!({
        "apiVersion": "stripekeys.io/v1alpha1", "kind": "StripeWebhookEndpoint",
        "metadata": {"name": "checkout-events", "namespace": namespace},
        "spec": {"accountRef": {"name": "payments"}, "url": url,
                 "enabledEvents": ["payment_intent.succeeded"],
                 "delivery": {"secret": {"name": "checkout-webhook"}},
                 "rotation": {"every": "2160h", "overlap": "1h"}}
    })
}

fn plural(kind: &str) -> String {
    match kind {
        "StripeKeyPolicy" => "stripekeypolicies".into(),
        "ConfigMap" => "configmaps".into(),
        other => format!("{}s", other.to_lowercase()),
    }
}

/// An AdmissionReview of `op` on `object` (or `old` for DELETE), with a fresh uid, by alice.
fn review(op: &str, object: Option<&Value>, old: Option<&Value>) -> (String, Vec<u8>) {
    review_as("alice", op, object, old)
}

/// An AdmissionReview of `op` on `object` (or `old` for DELETE) made by `username`.
fn review_as(
    username: &str,
    op: &str,
    object: Option<&Value>,
    old: Option<&Value>,
) -> (String, Vec<u8>) {
    let obj = object.or(old).expect("an object or an old object");
    let api_version = obj["apiVersion"].as_str().unwrap();
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    let kind = obj["kind"].as_str().unwrap();
    let uid = format!("uid-{}", token(12));
    let body = json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": group, "version": version, "kind": kind},
            "resource": {"group": group, "version": version, "resource": plural(kind)},
            "name": obj["metadata"]["name"],
            "namespace": obj["metadata"].get("namespace"),
            "operation": op,
            "userInfo": {"username": username},
            "object": object,
            "oldObject": old,
            "dryRun": false
        }
    });
    (uid, serde_json::to_vec(&body).unwrap())
}

struct Verdict {
    allowed: bool,
    message: String,
    warnings: Vec<String>,
}

fn verdict(uid: &str, resp: kube::core::admission::AdmissionResponse) -> Verdict {
    assert_eq!(resp.uid, uid, "the response echoes the request's uid");
    Verdict {
        allowed: resp.allowed,
        message: resp.result.message.clone(),
        warnings: resp.warnings.clone().unwrap_or_default(),
    }
}

async fn judge(
    lookups: &FakeLookups,
    op: &str,
    object: Option<&Value>,
    old: Option<&Value>,
) -> Verdict {
    let (uid, body) = review(op, object, old);
    verdict(
        &uid,
        admission::review_stripe_object(&body, lookups, &trust()).await,
    )
}

fn judge_keys(op: &str, object: &Value, include_test: bool) -> Verdict {
    judge_keys_as("alice", op, object, include_test)
}

fn judge_keys_as(username: &str, op: &str, object: &Value, include_test: bool) -> Verdict {
    let (uid, body) = if op == "DELETE" {
        review_as(username, op, None, Some(object))
    } else {
        review_as(username, op, Some(object), None)
    };
    verdict(
        &uid,
        admission::review_literal_keys(&body, &literal_keys_policy(include_test)),
    )
}

// ---------------------------------------------------------------------------------------------
// The stripekeys.io kinds
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn policy_within_guardrails_is_allowed() {
    let v = judge(
        &cluster(),
        "CREATE",
        Some(&policy(
            "shop",
            "payments",
            &["charge_read", "refund_write"],
        )),
        None,
    )
    .await;
    assert!(v.allowed, "{}", v.message);
    assert!(v.warnings.is_empty());
}

#[tokio::test]
async fn a_new_policy_under_an_account_being_deleted_is_refused() {
    let mut lookups = cluster();
    let account = lookups.accounts.get_mut("payments").unwrap();
    account.metadata.deletion_timestamp = Some(
        k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now()),
    );
    let v = judge(
        &lookups,
        "CREATE",
        Some(&policy("shop", "payments", &["charge_read"])),
        None,
    )
    .await;
    assert!(!v.allowed);
    assert!(v.message.contains("AccountTerminating"), "{}", v.message);
    assert!(v.message.contains("is being deleted"), "{}", v.message);
}

#[tokio::test]
async fn payout_write_is_refused_naming_the_guardrail() {
    let v = judge(
        &cluster(),
        "CREATE",
        Some(&policy(
            "shop",
            "payments",
            &["charge_read", "payout_write"],
        )),
        None,
    )
    .await;
    assert!(!v.allowed);
    assert!(v.message.contains("GuardrailViolation"), "{}", v.message);
    assert!(
        v.message.contains(
            "permission payout_write is denied by StripeGuardrail \"baseline\" (pattern payout_*)"
        ),
        "{}",
        v.message
    );
}

#[tokio::test]
async fn policy_in_a_namespace_the_account_does_not_serve_is_refused() {
    let v = judge(
        &cluster(),
        "CREATE",
        Some(&policy("ads", "payments", &["charge_read"])),
        None,
    )
    .await;
    assert!(!v.allowed);
    assert!(v.message.contains("NamespaceNotAllowed"), "{}", v.message);
    assert!(
        v.message.contains("does not serve namespace \"ads\""),
        "{}",
        v.message
    );
}

#[tokio::test]
async fn unknown_permission_is_refused() {
    let v = judge(
        &cluster(),
        "CREATE",
        Some(&policy(
            "shop",
            "payments",
            &["charge_read", "charge_teleport"],
        )),
        None,
    )
    .await;
    assert!(!v.allowed);
    assert!(
        v.message.contains("InvalidSpec") && v.message.contains("charge_teleport"),
        "{}",
        v.message
    );
}

#[tokio::test]
async fn live_account_is_refused_where_a_guardrail_forbids_live_mode() {
    let lookups = cluster();
    let dev = judge(
        &lookups,
        "CREATE",
        Some(&policy("sandbox", "payments-live", &["charge_read"])),
        None,
    )
    .await;
    assert!(!dev.allowed);
    assert!(
        dev.message
            .contains("StripeGuardrail \"no-live-in-dev\" does not allow live-mode"),
        "{}",
        dev.message
    );
    // The same live account in a prod namespace: no such guardrail.
    let prod = judge(
        &lookups,
        "CREATE",
        Some(&policy("shop", "payments-live", &["charge_read"])),
        None,
    )
    .await;
    assert!(prod.allowed, "{}", prod.message);
}

#[tokio::test]
async fn webhook_endpoint_to_a_host_the_guardrail_does_not_allow_is_refused() {
    let v = judge(
        &cluster(),
        "CREATE",
        Some(&endpoint("shop", "https://evil.attacker.net/hook")),
        None,
    )
    .await;
    assert!(!v.allowed);
    assert!(
        v.message.contains(
            "webhook host evil.attacker.net is not among those StripeGuardrail \"baseline\" allows"
        ),
        "{}",
        v.message
    );
}

#[tokio::test]
async fn webhook_endpoint_to_an_allowed_host_is_allowed() {
    let v = judge(
        &cluster(),
        "CREATE",
        Some(&endpoint("shop", "https://hooks.example.com/stripe")),
        None,
    )
    .await;
    assert!(v.allowed, "{}", v.message);
}

#[tokio::test]
async fn webhook_endpoint_in_a_namespace_the_account_does_not_serve_is_refused() {
    let v = judge(
        &cluster(),
        "CREATE",
        Some(&endpoint("ads", "https://hooks.example.com/stripe")),
        None,
    )
    .await;
    assert!(!v.allowed);
    assert!(v.message.contains("NamespaceNotAllowed"), "{}", v.message);
}

/// Admission judges an endpoint with the controller's own validation, so what the controller
/// would refuse as InvalidSpec never gets in.
#[tokio::test]
async fn webhook_endpoint_the_controller_would_refuse_is_refused_at_admission() {
    let mut no_events = endpoint("shop", "https://hooks.example.com/stripe");
    no_events["spec"]["enabledEvents"] = json!([]);
    let mut reserved = endpoint("shop", "https://hooks.example.com/stripe");
    reserved["spec"]["metadata"] = json!({"stripekeys_namespace": "other"});
    let mut short_overlap = endpoint("shop", "https://hooks.example.com/stripe");
    short_overlap["spec"]["rotation"]["overlap"] = json!("1s");
    for (object, expected) in [
        (&no_events, "enabledEvents must name at least one event"),
        (
            &reserved,
            "metadata key \"stripekeys_namespace\" is reserved",
        ),
        (&short_overlap, "overlap must be"),
    ] {
        let v = judge(&cluster(), "CREATE", Some(object), None).await;
        assert!(!v.allowed, "{object}");
        assert!(v.message.contains(expected), "{}", v.message);
    }
}

#[tokio::test]
async fn guardrails_and_accounts_themselves_are_allowed() {
    let g = serde_json::to_value(guardrail(
        "strict",
        json!({"namespaceSelector": {}, "deniedPermissions": ["*"], "maxRotationPeriod": "720h"}),
    ))
    .unwrap();
    let a = serde_json::to_value(account("other", "live", json!({}))).unwrap();
    for obj in [&g, &a] {
        let v = judge(&cluster(), "CREATE", Some(obj), None).await;
        assert!(v.allowed, "{}: {}", obj["kind"], v.message);
    }
    let bad = serde_json::to_value(guardrail("bad", json!({"namespaceSelector": {"matchExpressions": [{"key": "a", "operator": "Near", "values": ["x"]}]}}))).unwrap();
    let v = judge(&cluster(), "CREATE", Some(&bad), None).await;
    assert!(
        !v.allowed,
        "a selector that selects nothing is refused: {}",
        v.message
    );
}

fn account_with(spec: Value) -> Value {
    let mut a = serde_json::to_value(account("attacker", "live", json!({}))).unwrap();
    for (k, v) in spec.as_object().unwrap() {
        a["spec"][k] = v.clone();
    }
    a
}

#[tokio::test]
async fn account_pointing_at_a_tenant_bundle_path_is_refused_saying_what_is_allowed() {
    let a = account_with(json!({"credentials": {"vault": {
        "path": "stripe-key-operator/shop/stripekeypolicy/checkout", "key": "secret"}}}));
    let v = judge(&cluster(), "CREATE", Some(&a), None).await;
    assert!(!v.allowed);
    assert!(
        v.message.contains("credentials.vault.path")
            && v.message
                .contains("under stripe-key-operator/_accounts/<name>/"),
        "{}",
        v.message
    );
    let ok = account_with(json!({"credentials": {"vault": {
        "path": "stripe-key-operator/_accounts/attacker/app-key", "key": "secret_key"}}}));
    let v = judge(&cluster(), "CREATE", Some(&ok), None).await;
    assert!(v.allowed, "{}", v.message);
}

#[tokio::test]
async fn account_naming_a_secret_without_the_credential_label_is_refused() {
    let a = account_with(json!({"credentials": {"secretRef": {
        "name": "sko-shop-stripekeypolicy-checkout", "key": "secret"}}}));
    let v = judge(&cluster(), "CREATE", Some(&a), None).await;
    assert!(!v.allowed);
    assert!(
        v.message.contains(
            "Secret stripe-key-operator/sko-shop-stripekeypolicy-checkout is not labelled stripekeys.io/credential=stripe-app"
        ),
        "{}",
        v.message
    );
    // A Secret that does not exist yet is allowed with a warning naming the label.
    let later = account_with(json!({"credentials": {"secretRef": {"name": "later", "key": "k"}}}));
    let v = judge(&cluster(), "CREATE", Some(&later), None).await;
    assert!(v.allowed, "{}", v.message);
    assert!(
        v.warnings
            .iter()
            .any(|w| w.contains("stripekeys.io/credential=stripe-app")),
        "{:?}",
        v.warnings
    );
}

#[tokio::test]
async fn account_with_an_api_base_on_a_host_not_allowed_is_refused() {
    for base in [
        "https://collector.evil.example",
        "http://127.0.0.1:8080",
        "https://api.stripe.com.evil.example",
    ] {
        let a = account_with(json!({"apiBase": base}));
        let v = judge(&cluster(), "CREATE", Some(&a), None).await;
        assert!(!v.allowed, "{base}");
        assert!(
            v.message.contains("only to https://api.stripe.com")
                && v.message.contains("--allowed-api-hosts"),
            "{}",
            v.message
        );
    }
    // An update that moves an existing account to another host is judged too.
    let old = account_with(json!({}));
    let new = account_with(json!({"apiBase": "https://collector.evil.example"}));
    assert!(
        !judge(&cluster(), "UPDATE", Some(&new), Some(&old))
            .await
            .allowed
    );
}

#[tokio::test]
async fn a_write_whose_read_a_guardrail_denies_is_refused_naming_both() {
    let mut lookups = cluster();
    lookups.guardrails.push(guardrail(
        "no-customer-data",
        json!({"namespaceSelector": {}, "deniedPermissions": ["customer_read"]}),
    ));
    let v = judge(
        &lookups,
        "CREATE",
        Some(&policy(
            "shop",
            "payments",
            &["charge_read", "customer_write"],
        )),
        None,
    )
    .await;
    assert!(!v.allowed);
    assert!(
        v.message.contains(
            "permission customer_write is denied: it implies customer_read, which StripeGuardrail \"no-customer-data\" denies (pattern customer_read)"
        ),
        "{}",
        v.message
    );
}

#[tokio::test]
async fn update_that_adds_a_denied_permission_is_refused() {
    let old = policy("shop", "payments", &["charge_read"]);
    let new = policy("shop", "payments", &["charge_read", "payout_write"]);
    let v = judge(&cluster(), "UPDATE", Some(&new), Some(&old)).await;
    assert!(!v.allowed);
    assert!(v.message.contains("baseline"), "{}", v.message);
}

#[tokio::test]
async fn update_that_leaves_spec_alone_or_removes_a_finalizer_is_allowed() {
    // A policy admitted before the guardrail existed: metadata changes (rotation annotation,
    // finalizer removal during deletion) must not be blocked.
    let old = policy("shop", "payments", &["payout_write"]);
    let mut annotated = old.clone();
    annotated["metadata"]["annotations"] = json!({"stripekeys.io/rotate": "now"});
    assert!(
        judge(&cluster(), "UPDATE", Some(&annotated), Some(&old))
            .await
            .allowed
    );
    let mut deleting = old.clone();
    deleting["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
    deleting["spec"]["permissions"] = json!(["payout_write", "payout_read"]);
    assert!(
        judge(&cluster(), "UPDATE", Some(&deleting), Some(&old))
            .await
            .allowed
    );
}

#[tokio::test]
async fn delete_is_always_allowed() {
    let violating = policy("ads", "payments", &["payout_write"]);
    let v = judge(&cluster(), "DELETE", None, Some(&violating)).await;
    assert!(v.allowed, "{}", v.message);
}

#[tokio::test]
async fn missing_account_is_allowed_with_a_warning_but_guardrails_still_apply() {
    let ok = judge(
        &cluster(),
        "CREATE",
        Some(&policy("shop", "not-yet", &["charge_read"])),
        None,
    )
    .await;
    assert!(ok.allowed, "{}", ok.message);
    assert!(
        ok.warnings[0].contains("StripeAccount \"not-yet\" does not exist"),
        "{:?}",
        ok.warnings
    );
    let refused = judge(
        &cluster(),
        "CREATE",
        Some(&policy("shop", "not-yet", &["payout_write"])),
        None,
    )
    .await;
    assert!(!refused.allowed);
    assert!(refused.message.contains("baseline"), "{}", refused.message);
}

#[tokio::test]
async fn a_failed_lookup_refuses_with_a_message_that_says_so() {
    let lookups = FakeLookups {
        broken: true,
        ..cluster()
    };
    let v = judge(
        &lookups,
        "CREATE",
        Some(&policy("shop", "payments", &["charge_read"])),
        None,
    )
    .await;
    assert!(!v.allowed);
    assert!(
        v.message
            .contains("could not read StripeAccount \"payments\""),
        "{}",
        v.message
    );
}

// ---------------------------------------------------------------------------------------------
// Literal keys
// ---------------------------------------------------------------------------------------------

fn pod(env_value: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "api", "namespace": "shop"},
        "spec": {"containers": [{"name": "api", "image": "example/api:1",
                                 "env": [{"name": "LOG_LEVEL", "value": "info"},
                                         {"name": "STRIPE_KEY", "value": env_value}]}]}
    })
}

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

#[test]
fn pod_with_a_literal_live_secret_key_is_refused_pointing_to_stripekeypolicy() {
    let key = live_secret_key();
    let v = judge_keys("CREATE", &pod(&key), false);
    assert!(!v.allowed);
    assert!(v.message.contains("StripeKeyPolicy"), "{}", v.message);
    assert!(
        v.message.contains("container \"api\" env STRIPE_KEY"),
        "{}",
        v.message
    );
    assert!(
        v.message
            .contains(&format!("sk_live_…{}", &key[key.len() - 4..])),
        "{}",
        v.message
    );
    assert!(
        !v.message.contains(&key),
        "the message never carries the key"
    );
}

#[test]
fn configmap_with_a_webhook_signing_secret_is_refused() {
    let cm = json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "settings", "namespace": "shop"},
        "data": {"app.yaml": format!("stripe:\n  webhook_secret: {}\n", webhook_secret())}});
    let v = judge_keys("CREATE", &cm, false);
    assert!(!v.allowed);
    assert!(
        v.message.contains("data.app.yaml") && v.message.contains("stripe-webhook-signing-secret"),
        "{}",
        v.message
    );
}

#[test]
fn secret_with_a_base64_restricted_key_is_refused() {
    let key = live_restricted_key();
    let secret = json!({"apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "stripe", "namespace": "shop"},
        "data": {"key": b64(&key)}});
    let v = judge_keys("CREATE", &secret, false);
    assert!(!v.allowed);
    assert!(
        v.message
            .contains("data.key: stripe-live-restricted-key rk_live_…"),
        "{}",
        v.message
    );
    assert!(!v.message.contains(&key) && !v.message.contains(&b64(&key)));
}

#[test]
fn test_mode_keys_are_allowed_by_default_and_refused_with_include_test() {
    let p = pod(&test_secret_key());
    assert!(judge_keys("CREATE", &p, false).allowed);
    let v = judge_keys("CREATE", &p, true);
    assert!(!v.allowed);
    assert!(
        v.message.contains("stripe-test-secret-key"),
        "{}",
        v.message
    );
}

#[test]
fn the_operators_own_service_account_may_write_the_secrets_it_manages() {
    let secret = json!({"apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "checkout-stripe-key", "namespace": "shop",
                     "labels": {"app.kubernetes.io/managed-by": "stripe-key-operator"}},
        "data": {"STRIPE_API_KEY": b64(&live_restricted_key())}});
    assert!(judge_keys_as(OPERATOR_USER, "CREATE", &secret, false).allowed);
    assert!(judge_keys_as(OPERATOR_USER, "UPDATE", &secret, false).allowed);
    // The same Secret from anyone else is refused: the label exempts nothing.
    for user in [
        "alice",
        "system:serviceaccount:shop:stripe-key-operator",
        "system:serviceaccount:stripe-key-operator:default",
    ] {
        let v = judge_keys_as(user, "CREATE", &secret, false);
        assert!(!v.allowed, "{user}");
        assert!(v.message.contains("StripeKeyPolicy"), "{}", v.message);
    }
}

#[test]
fn a_tenant_cannot_bypass_the_literal_keys_webhook_with_the_managed_by_label() {
    let key = live_secret_key();
    let configmap = json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "settings", "namespace": "shop",
                     "labels": {"app.kubernetes.io/managed-by": "stripe-key-operator"}},
        "data": {"STRIPE_KEY": key}});
    let v = judge_keys("CREATE", &configmap, false);
    assert!(
        !v.allowed,
        "a labelled ConfigMap with a live key from a tenant is refused"
    );
    assert!(v.message.contains("data.STRIPE_KEY"), "{}", v.message);
    assert!(
        !v.message.contains(&key),
        "the key is masked: {}",
        v.message
    );
    let deployment = json!({"apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "api", "namespace": "shop",
                     "labels": {"app.kubernetes.io/managed-by": "stripe-key-operator"}},
        "spec": {"template": {"spec": {"containers": [{"name": "api", "image": "x",
            "env": [{"name": "STRIPE_KEY", "value": live_secret_key()}]}]}}}});
    assert!(!judge_keys("UPDATE", &deployment, false).allowed);
    // Without an exempt identity configured, nobody is exempt, the operator neither.
    let (uid, body) = review_as(OPERATOR_USER, "CREATE", Some(&configmap), None);
    let nobody = LiteralKeysPolicy::default();
    assert!(!verdict(&uid, admission::review_literal_keys(&body, &nobody)).allowed);
}

#[test]
fn clean_pod_and_pod_referencing_a_secret_are_allowed() {
    assert!(judge_keys("CREATE", &pod("not-a-key"), false).allowed);
    let mut p = pod("x");
    p["spec"]["containers"][0]["env"][1] = json!({"name": "STRIPE_KEY",
        "valueFrom": {"secretKeyRef": {"name": "checkout-stripe-key", "key": "STRIPE_API_KEY"}}});
    assert!(judge_keys("CREATE", &p, false).allowed);
    // Prose and placeholders are not keys.
    assert!(judge_keys("CREATE", &pod("set sk_live_YOUR_KEY_HERE"), false).allowed);
}

#[test]
fn deployment_pod_template_with_a_literal_key_is_refused() {
    let d = json!({"apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "api", "namespace": "shop"},
        "spec": {"selector": {"matchLabels": {"app": "api"}},
                 "template": {"metadata": {"labels": {"app": "api"}}, "spec": pod(&live_secret_key())["spec"]}}});
    let v = judge_keys("CREATE", &d, false);
    assert!(!v.allowed);
    assert!(
        v.message.contains("pod template container \"api\""),
        "{}",
        v.message
    );
}

#[test]
fn deleting_an_object_with_a_key_is_allowed() {
    assert!(judge_keys("DELETE", &pod(&live_secret_key()), false).allowed);
}

// ---------------------------------------------------------------------------------------------
// Malformed reviews
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn malformed_reviews_are_refused_with_a_clear_message_and_never_panic() {
    let lookups = cluster();
    let cases: Vec<(&[u8], &str, &str)> = vec![
        (b"not json", "", "not JSON"),
        (b"{}", "", "has no request"),
        (br#"{"request": null}"#, "", "has no request"),
        (
            br#"{"request": {"uid": "u-1", "operation": "FROB"}}"#,
            "u-1",
            "malformed",
        ),
        (br#"{"request": {"uid": "u-2"}}"#, "u-2", "malformed"),
        (b"[1, 2, 3]", "", "has no request"),
    ];
    for (body, uid, needle) in cases {
        for resp in [
            admission::review_stripe_object(body, &lookups, &trust()).await,
            admission::review_literal_keys(body, &literal_keys_policy(false)),
        ] {
            assert!(!resp.allowed, "{}", String::from_utf8_lossy(body));
            assert_eq!(resp.uid, uid);
            assert!(
                resp.result.message.contains(needle),
                "{}: {}",
                String::from_utf8_lossy(body),
                resp.result.message
            );
        }
    }
    // A valid review without an object on CREATE.
    let (uid, body) = review(
        "CREATE",
        None,
        Some(&policy("shop", "payments", &["charge_read"])),
    );
    let resp = admission::review_stripe_object(&body, &lookups, &trust()).await;
    assert_eq!(resp.uid, uid);
    assert!(!resp.allowed && resp.result.message.contains("no object"));
}

#[tokio::test]
async fn a_review_of_an_unexpected_kind_is_refused_by_the_stripe_webhook() {
    let v = judge(&cluster(), "CREATE", Some(&pod("x")), None).await;
    assert!(!v.allowed);
    assert!(
        v.message.contains("stripekeys.io kinds only"),
        "{}",
        v.message
    );
}

// ---------------------------------------------------------------------------------------------
// HTTPS
// ---------------------------------------------------------------------------------------------

fn self_signed_for(names: &[String]) -> (ServingCert, String) {
    let ca = tls::generate_ca(SystemTime::now()).unwrap();
    let (cert, key) =
        tls::issue_serving_cert(&ca, names, SystemTime::now(), Duration::from_secs(3600)).unwrap();
    (
        ServingCert {
            cert_pem: cert,
            key_pem: key,
            ca_bundle_pem: ca.cert_pem.clone(),
        },
        ca.cert_pem,
    )
}

fn https_client(ca_pem: &str, host: &str, addr: std::net::SocketAddr) -> reqwest::Client {
    reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(ca_pem.as_bytes()).unwrap()])
        .resolve(host, addr)
        .build()
        .unwrap()
}

async fn post_review(client: &reqwest::Client, url: String, body: Vec<u8>) -> Value {
    let resp = client
        .post(url)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    resp.json().await.unwrap()
}

#[tokio::test]
async fn https_server_answers_admission_reviews_with_a_generated_certificate() {
    stripe_key_operator::controller::install_crypto_provider();
    let host = "webhook.test";
    let (cert, ca) = self_signed_for(&[host.to_string()]);
    let certs = Arc::new(CertStore::new(&cert).unwrap());
    let shutdown = CancellationToken::new();
    let (addr, task) = server::serve(
        "127.0.0.1:0".parse().unwrap(),
        certs.clone(),
        server::router(Arc::new(cluster()), settings()),
        shutdown.clone(),
    )
    .await
    .unwrap();
    let client = https_client(&ca, host, addr);
    let base = format!("https://{host}:{}", addr.port());

    let (uid, body) = review(
        "CREATE",
        Some(&policy("shop", "payments", &["payout_write"])),
        None,
    );
    let out = post_review(&client, format!("{base}{STRIPE_OBJECTS_PATH}"), body).await;
    assert_eq!(out["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(out["kind"], "AdmissionReview");
    assert_eq!(out["response"]["uid"], uid.as_str());
    assert_eq!(out["response"]["allowed"], false);
    assert!(
        out["response"]["status"]["message"]
            .as_str()
            .unwrap()
            .contains("baseline")
    );

    let (uid, body) = review("CREATE", Some(&pod(&live_secret_key())), None);
    let out = post_review(&client, format!("{base}{LITERAL_KEYS_PATH}"), body).await;
    assert_eq!(out["response"]["uid"], uid.as_str());
    assert_eq!(out["response"]["allowed"], false);

    let (_, body) = review("CREATE", Some(&pod("clean")), None);
    let out = post_review(&client, format!("{base}{LITERAL_KEYS_PATH}"), body).await;
    assert_eq!(out["response"]["allowed"], true);

    let health = client.get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);

    // A client that does not trust the CA cannot talk to it.
    let (_, other_ca) = self_signed_for(&[host.to_string()]);
    let stranger = https_client(&other_ca, host, addr);
    assert!(
        stranger
            .get(format!("{base}/healthz"))
            .send()
            .await
            .is_err()
    );

    // A renewed certificate from another CA is presented without restarting the server.
    let (renewed, renewed_ca) = self_signed_for(&[host.to_string()]);
    assert!(certs.replace(&renewed).unwrap());
    let fresh = https_client(&renewed_ca, host, addr);
    assert_eq!(
        fresh
            .get(format!("{base}/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap();
}

// ---------------------------------------------------------------------------------------------
// Self-signed certificate management against the API server for tests
// ---------------------------------------------------------------------------------------------

const OPERATOR_NS: &str = "stripe-key-operator";
const SERVICE: &str = "sko-webhook";
const VWC: &str = "sko-stripe-key-operator";

async fn api_server() -> (kube_test_api::TestApiServer, kube::Client) {
    let (server, client) = api_server_without_configuration().await;
    create_configuration(&client).await;
    (server, client)
}

async fn api_server_without_configuration() -> (kube_test_api::TestApiServer, kube::Client) {
    let server = kube_test_api::TestApiServer::start().await.unwrap();
    let config = kube::Config::new(server.url().parse().unwrap());
    let client = kube::Client::try_from(config).unwrap();
    let ns: k8s_openapi::api::core::v1::Namespace =
        serde_json::from_value(json!({"metadata": {"name": OPERATOR_NS}})).unwrap();
    Api::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .unwrap();
    (server, client)
}

async fn create_configuration(client: &kube::Client) {
    let vwc: ValidatingWebhookConfiguration = serde_json::from_value(json!({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingWebhookConfiguration",
        "metadata": {"name": VWC},
        "webhooks": [
            {"name": "stripekeys.validate.stripekeys.io", "admissionReviewVersions": ["v1"], "sideEffects": "None",
             "clientConfig": {"service": {"name": SERVICE, "namespace": OPERATOR_NS, "path": STRIPE_OBJECTS_PATH, "port": 443}}},
            {"name": "no-literal-keys.validate.stripekeys.io", "admissionReviewVersions": ["v1"], "sideEffects": "None",
             "clientConfig": {"service": {"name": SERVICE, "namespace": OPERATOR_NS, "path": LITERAL_KEYS_PATH, "port": 443}}}
        ]
    }))
    .unwrap();
    Api::all(client.clone())
        .create(&PostParams::default(), &vwc)
        .await
        .unwrap();
}

fn cfg() -> SelfSignedConfig {
    SelfSignedConfig {
        namespace: OPERATOR_NS.into(),
        secret_name: format!("{SERVICE}-tls"),
        service: SERVICE.into(),
        webhook_config_name: Some(VWC.into()),
    }
}

async fn tls_secret(client: &kube::Client) -> Secret {
    Api::<Secret>::namespaced(client.clone(), OPERATOR_NS)
        .get(&format!("{SERVICE}-tls"))
        .await
        .unwrap()
}

fn secret_text(s: &Secret, key: &str) -> String {
    String::from_utf8(s.data.as_ref().unwrap()[key].0.clone()).unwrap()
}

async fn ca_bundles(client: &kube::Client) -> Vec<Option<Vec<u8>>> {
    let vwc = Api::<ValidatingWebhookConfiguration>::all(client.clone())
        .get(VWC)
        .await
        .unwrap();
    vwc.webhooks
        .unwrap()
        .into_iter()
        .map(|w| w.client_config.ca_bundle.map(|b| b.0))
        .collect()
}

#[tokio::test]
async fn self_signed_secret_is_created_once_reused_on_restart_and_its_ca_injected() {
    let (_server, client) = api_server().await;
    let now = SystemTime::now();
    let first = tls::ensure_self_signed(&client, &cfg(), now).await.unwrap();
    let secret = tls_secret(&client).await;
    assert_eq!(secret.type_.as_deref(), Some("kubernetes.io/tls"));
    assert_eq!(
        secret.metadata.labels.as_ref().unwrap()["app.kubernetes.io/managed-by"],
        "stripe-key-operator"
    );
    let info = tls::cert_info(&first.cert_pem).unwrap();
    assert!(
        info.dns_names
            .contains(&format!("{SERVICE}.{OPERATOR_NS}.svc"))
    );
    assert!(info.not_after > now + Duration::from_secs(300 * 24 * 3600));

    assert_eq!(
        tls::inject_ca_bundle(&client, VWC, &first.ca_bundle_pem)
            .await
            .unwrap(),
        Injection::Patched
    );
    assert_eq!(
        ca_bundles(&client).await,
        vec![Some(first.ca_bundle_pem.clone().into_bytes()); 2]
    );

    // A restart (or a second replica) reuses the Secret and writes nothing.
    let rv = secret.metadata.resource_version.clone();
    let again = tls::ensure_self_signed(&client, &cfg(), SystemTime::now())
        .await
        .unwrap();
    assert_eq!(again.cert_pem, first.cert_pem);
    assert_eq!(tls_secret(&client).await.metadata.resource_version, rv);
    assert_eq!(
        tls::inject_ca_bundle(&client, VWC, &again.ca_bundle_pem)
            .await
            .unwrap(),
        Injection::Current,
        "no patch when caBundle is current"
    );

    // Something (a helm upgrade) resets caBundle: the next check puts it back.
    let mut vwc = Api::<ValidatingWebhookConfiguration>::all(client.clone())
        .get(VWC)
        .await
        .unwrap();
    vwc.webhooks.as_mut().unwrap()[1].client_config.ca_bundle = None;
    Api::<ValidatingWebhookConfiguration>::all(client.clone())
        .replace(VWC, &PostParams::default(), &vwc)
        .await
        .unwrap();
    assert_eq!(
        tls::inject_ca_bundle(&client, VWC, &again.ca_bundle_pem)
            .await
            .unwrap(),
        Injection::Patched
    );
    assert_eq!(
        ca_bundles(&client).await[1],
        Some(first.ca_bundle_pem.clone().into_bytes())
    );
}

#[tokio::test]
async fn serving_certificate_is_renewed_before_expiry_with_the_same_ca_and_the_ca_later_rolls_over()
{
    let (_server, client) = api_server().await;
    let now = SystemTime::now();
    let first = tls::ensure_self_signed(&client, &cfg(), now).await.unwrap();
    let ca_before = secret_text(&tls_secret(&client).await, tls::CA_CRT);

    // 340 days later: within 30 days of the serving certificate's expiry.
    let later = now + Duration::from_secs(340 * 24 * 3600);
    let renewed = tls::ensure_self_signed(&client, &cfg(), later)
        .await
        .unwrap();
    assert_ne!(renewed.cert_pem, first.cert_pem);
    assert_eq!(
        renewed.ca_bundle_pem, ca_before,
        "the CA stays: caBundle needs no change"
    );
    assert!(
        tls::cert_info(&renewed.cert_pem).unwrap().not_after
            > later + Duration::from_secs(300 * 24 * 3600)
    );

    // 9.5 years later: the CA is replaced and the old one stays in the bundle.
    let much_later = now + Duration::from_secs(9 * 365 * 24 * 3600 + 180 * 24 * 3600);
    let rolled = tls::ensure_self_signed(&client, &cfg(), much_later)
        .await
        .unwrap();
    assert!(
        rolled
            .ca_bundle_pem
            .starts_with("-----BEGIN CERTIFICATE-----")
    );
    assert_eq!(rolled.ca_bundle_pem.matches("BEGIN CERTIFICATE").count(), 2);
    assert!(rolled.ca_bundle_pem.ends_with(&ca_before));
    assert!(!rolled.ca_bundle_pem.starts_with(&ca_before));
}

#[tokio::test]
async fn replicas_racing_on_a_fresh_secret_end_up_with_the_same_certificate() {
    let (_server, client) = api_server().await;
    let now = SystemTime::now();
    let cfg = cfg();
    let (a, b, c) = tokio::join!(
        tls::ensure_self_signed(&client, &cfg, now),
        tls::ensure_self_signed(&client, &cfg, now),
        tls::ensure_self_signed(&client, &cfg, now),
    );
    let stored = secret_text(&tls_secret(&client).await, tls::TLS_CRT);
    for got in [a.unwrap(), b.unwrap(), c.unwrap()] {
        assert_eq!(got.cert_pem, stored);
    }
}

#[tokio::test]
async fn webhook_server_in_self_signed_mode_serves_with_the_injected_ca() {
    stripe_key_operator::controller::install_crypto_provider();
    let (_server, client) = api_server().await;
    let shutdown = CancellationToken::new();
    let config = WebhookConfig {
        addr: "127.0.0.1:0".parse().unwrap(),
        cert_mode: CertMode::SelfSigned,
        cert_dir: None,
        namespace: OPERATOR_NS.into(),
        service: SERVICE.into(),
        config_name: Some(VWC.into()),
        include_test_keys: false,
        exempt_username: Some(OPERATOR_USER.into()),
        account_trust: trust(),
        check_interval: Duration::from_secs(60),
    };
    let (addr, task) = server::start(&config, client.clone(), shutdown.clone())
        .await
        .unwrap()
        .unwrap();
    // Trust exactly what was injected into the ValidatingWebhookConfiguration, as the API
    // server does, and dial the Service name.
    let bundle = ca_bundles(&client).await[0]
        .clone()
        .expect("caBundle injected at start");
    let host = format!("{SERVICE}.{OPERATOR_NS}.svc");
    let http = https_client(std::str::from_utf8(&bundle).unwrap(), &host, addr);
    let (uid, body) = review("CREATE", Some(&pod(&live_secret_key())), None);
    let out = post_review(
        &http,
        format!("https://{host}:{}{LITERAL_KEYS_PATH}", addr.port()),
        body,
    )
    .await;
    assert_eq!(out["response"]["uid"], uid.as_str());
    assert_eq!(out["response"]["allowed"], false);
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn files_mode_reloads_a_renewed_certificate() {
    stripe_key_operator::controller::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let host = "webhook.test";
    let write = |c: &ServingCert| {
        std::fs::write(dir.path().join("tls.crt"), &c.cert_pem).unwrap();
        std::fs::write(dir.path().join("tls.key"), c.key_pem.expose()).unwrap();
    };
    let (first, first_ca) = self_signed_for(&[host.to_string()]);
    write(&first);
    let certs = Arc::new(CertStore::new(&tls::load_files(dir.path()).unwrap()).unwrap());
    let shutdown = CancellationToken::new();
    tokio::spawn(tls::watch_files(
        dir.path().to_path_buf(),
        certs.clone(),
        Duration::from_millis(50),
        shutdown.clone(),
    ));
    let (addr, _task) = server::serve(
        "127.0.0.1:0".parse().unwrap(),
        certs.clone(),
        server::router(Arc::new(cluster()), settings()),
        shutdown.clone(),
    )
    .await
    .unwrap();
    let url = format!("https://{host}:{}/healthz", addr.port());
    assert_eq!(
        https_client(&first_ca, host, addr)
            .get(&url)
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    let (second, second_ca) = self_signed_for(&[host.to_string()]);
    write(&second);
    let before = certs.fingerprint();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while certs.fingerprint() == before {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the new files were not loaded"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        https_client(&second_ca, host, addr)
            .get(&url)
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    // A broken pair keeps the current certificate.
    std::fs::write(dir.path().join("tls.key"), "garbage").unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        https_client(&second_ca, host, addr)
            .get(&url)
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    shutdown.cancel();
}

#[test]
fn stored_material_is_reused_only_when_valid_for_the_service_and_not_near_expiry() {
    let now = SystemTime::now();
    let names = tls::dns_names(SERVICE, OPERATOR_NS);
    let fresh = tls::renew(&BTreeMap::new(), tls::Decision::NewCa, &names, now).unwrap();
    assert_eq!(tls::assess(&fresh, &names, now), tls::Decision::Reuse);
    // Another Service name: same CA, new serving certificate.
    let other = tls::dns_names("renamed-webhook", OPERATOR_NS);
    assert_eq!(
        tls::assess(&fresh, &other, now),
        tls::Decision::ReissueServing
    );
    // A serving key that does not match its certificate.
    let mut mismatched = fresh.clone();
    let spare = tls::renew(&BTreeMap::new(), tls::Decision::NewCa, &names, now).unwrap();
    mismatched.insert(tls::TLS_KEY.into(), spare[tls::TLS_KEY].clone());
    assert_eq!(
        tls::assess(&mismatched, &names, now),
        tls::Decision::ReissueServing
    );
    // Garbage or a missing CA key: a new CA.
    let mut garbage = fresh.clone();
    garbage.insert(tls::CA_CRT.into(), "not a certificate".into());
    assert_eq!(tls::assess(&garbage, &names, now), tls::Decision::NewCa);
    let mut keyless = fresh.clone();
    keyless.remove(tls::CA_KEY);
    assert_eq!(tls::assess(&keyless, &names, now), tls::Decision::NewCa);
    assert_eq!(
        tls::assess(&BTreeMap::new(), &names, now),
        tls::Decision::NewCa
    );
    // A reissued certificate chains to the stored CA and covers the Service's names.
    let reissued = tls::renew(&fresh, tls::Decision::ReissueServing, &other, now).unwrap();
    assert_eq!(reissued[tls::CA_CRT], fresh[tls::CA_CRT]);
    assert_eq!(tls::assess(&reissued, &other, now), tls::Decision::Reuse);
    // The key never shows in Debug output.
    let cert = ServingCert {
        cert_pem: reissued[tls::TLS_CRT].clone(),
        key_pem: stripe_key_operator::secret::SecretString::new(reissued[tls::TLS_KEY].clone()),
        ca_bundle_pem: String::new(),
    };
    let debug = format!("{cert:?}");
    assert!(!debug.contains("PRIVATE KEY") && !debug.contains(&reissued[tls::TLS_KEY]));
}

#[tokio::test]
async fn ca_bundle_is_injected_soon_after_the_configuration_appears() {
    stripe_key_operator::controller::install_crypto_provider();
    // Helm may create the ValidatingWebhookConfiguration after the operator has started.
    let (_server, client) = api_server_without_configuration().await;
    let shutdown = CancellationToken::new();
    let config = WebhookConfig {
        addr: "127.0.0.1:0".parse().unwrap(),
        cert_mode: CertMode::SelfSigned,
        cert_dir: None,
        namespace: OPERATOR_NS.into(),
        service: SERVICE.into(),
        config_name: Some(VWC.into()),
        include_test_keys: false,
        exempt_username: Some(OPERATOR_USER.into()),
        account_trust: trust(),
        check_interval: Duration::from_secs(3600),
    };
    let (_addr, task) = server::start(&config, client.clone(), shutdown.clone())
        .await
        .unwrap()
        .unwrap();
    create_configuration(&client).await;
    let want = secret_text(&tls_secret(&client).await, tls::CA_CRT).into_bytes();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if ca_bundles(&client)
            .await
            .iter()
            .all(|b| b.as_deref() == Some(&want[..]))
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "caBundle was not injected within 20 s although the check interval is an hour"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap();
}
