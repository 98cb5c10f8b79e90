//! Helpers for controller tests on the local environment (API for tests + simulator + store).
#![allow(dead_code)]

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams};
use serde_json::{Value, json};
use stripe_key_operator::api::{StripeAccount, StripeKeyPolicy, conditions};
use stripe_key_operator::sandbox::env::{EnvOptions, LocalEnv};
use stripe_key_operator::sim::KeyState;

pub const NS: &str = "shop";
pub const ACCOUNT: &str = "payments-test";

/// Starts an environment with the `shop` namespace (allowed by the account), the account, a
/// `checkout` Deployment, and the operator running.
pub async fn env_with(options: EnvOptions) -> LocalEnv {
    let mut env = env_without_operator(options).await;
    env.start_operator();
    wait_account_checked(&env).await;
    env
}

/// Waits (bounded) until the StripeAccount controller checked the account at Stripe once: its
/// one call (`GET /v2/iam/api_keys`, as the account) is then the first entry of the simulator's
/// log, and the next one comes only after the check interval (minutes), so a test can tell its
/// resources' calls from it ([`resource_calls`]).
pub async fn wait_account_checked(env: &LocalEnv) {
    let api: Api<StripeAccount> = Api::all(env.client.clone());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let a = api.get(ACCOUNT).await.unwrap();
        if a.status
            .as_ref()
            .is_some_and(|s| s.last_checked_time.is_some())
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the account was never checked: {:#?}",
            a.status
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The Stripe calls the simulator saw besides the account controller's first health check
/// (see [`wait_account_checked`]).
pub fn resource_calls(env: &LocalEnv) -> Vec<stripe_key_operator::sim::RequestLogEntry> {
    let log = env.sim.request_log();
    let first = log.first().expect("the account's health check");
    assert_eq!(
        (first.method.as_str(), first.path.as_str()),
        ("GET", "/v2/iam/api_keys"),
        "the first call is the account's health check"
    );
    log[1..].to_vec()
}

/// The same environment with no controller running: the test calls the reconcile functions
/// itself (see [`LocalEnv::new_context`]).
pub async fn env_without_operator(options: EnvOptions) -> LocalEnv {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
    let env = LocalEnv::start(options)
        .await
        .expect("local environment starts");
    env.apply_json(&json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": NS, "labels": {"stripekeys.io/account": ACCOUNT}}}))
        .await
        .unwrap();
    env.apply_json(&env.account_manifest(
        ACCOUNT,
        json!({"matchLabels": {"stripekeys.io/account": ACCOUNT}}),
    ))
    .await
    .unwrap();
    env.apply_json(&deployment("checkout")).await.unwrap();
    env
}

pub async fn env() -> LocalEnv {
    env_with(EnvOptions::default()).await
}

pub fn deployment(name: &str) -> Value {
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "namespace": NS, "labels": {"app": name}},
        "spec": {"replicas": 2, "selector": {"matchLabels": {"app": name}},
                 "template": {"metadata": {"labels": {"app": name}},
                              "spec": {"containers": [{"name": "app", "image": "example/app:1"}]}}}
    })
}

pub fn policy(name: &str, permissions: &[&str]) -> Value {
    json!({
        "apiVersion": "stripekeys.io/v1alpha1", "kind": "StripeKeyPolicy",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "accountRef": {"name": ACCOUNT},
            "permissions": permissions,
            "delivery": {"secret": {"name": format!("{name}-stripe-key")},
                         "rolloutTargets": [{"kind": "Deployment", "name": "checkout"}]},
            "rotation": {"every": "720h", "overlap": "1h"}
        }
    })
}

pub async fn get_policy(env: &LocalEnv, name: &str) -> StripeKeyPolicy {
    Api::<StripeKeyPolicy>::namespaced(env.client.clone(), NS)
        .get(name)
        .await
        .unwrap()
}

/// Waits (bounded) until `pred` holds for the policy; panics with its status otherwise.
pub async fn wait_policy(
    env: &LocalEnv,
    name: &str,
    what: &str,
    pred: impl Fn(&StripeKeyPolicy) -> bool,
) -> StripeKeyPolicy {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(Some(p)) = Api::<StripeKeyPolicy>::namespaced(env.client.clone(), NS)
            .get_opt(name)
            .await
        {
            if pred(&p) {
                return p;
            }
            if Instant::now() > deadline {
                panic!("timed out waiting for {what}; status: {:#?}", p.status);
            }
        } else if Instant::now() > deadline {
            panic!("timed out waiting for {what}; the policy is gone");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn ready(p: &StripeKeyPolicy) -> bool {
    p.status
        .as_ref()
        .is_some_and(|s| conditions::is_true(&s.conditions, "Ready") && s.rotation.is_none())
}

pub fn condition(p: &StripeKeyPolicy, type_: &str) -> Option<(String, String, String)> {
    let c = conditions::find(&p.status.as_ref()?.conditions, type_)?;
    Some((c.status.clone(), c.reason.clone(), c.message.clone()))
}

/// Keys of the simulator account.
pub fn sim_keys(env: &LocalEnv) -> Vec<KeyState> {
    env.sim
        .state()
        .account(&env.account_id)
        .map(|a| a.api_keys.clone())
        .unwrap_or_default()
}

pub fn active_keys(env: &LocalEnv) -> Vec<KeyState> {
    sim_keys(env)
        .into_iter()
        .filter(|k| k.status == "active")
        .collect()
}

pub fn secret_value(secret: &Secret, key: &str) -> Option<String> {
    secret
        .data
        .as_ref()?
        .get(key)
        .map(|b| String::from_utf8(b.0.clone()).unwrap())
}

pub fn fingerprint(s: &str) -> String {
    stripe_key_operator::secret::fingerprint(s.as_bytes())
}

/// Annotates a policy (a person's `kubectl annotate`).
pub async fn annotate(env: &LocalEnv, name: &str, annotations: Value) {
    let api = Api::<StripeKeyPolicy>::namespaced(env.client.clone(), NS);
    api.patch(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"annotations": annotations}})),
    )
    .await
    .unwrap();
}

/// Changes an unrelated label so that the controller reconciles now (after the clock moved).
pub async fn nudge(env: &LocalEnv, name: &str) {
    let api = Api::<StripeKeyPolicy>::namespaced(env.client.clone(), NS);
    let value = format!(
        "{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    api.patch(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"test/nudge": value}}})),
    )
    .await
    .unwrap();
}

/// Event reasons recorded for an object.
pub async fn event_reasons(env: &LocalEnv, name: &str) -> Vec<(String, String)> {
    let api: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(env.client.clone(), NS);
    api.list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
        .map(|e| (e.type_.unwrap_or_default(), e.reason.unwrap_or_default()))
        .collect()
}
