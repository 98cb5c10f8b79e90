//! The StripeKeyPolicy controller end to end: the real `Controller` against the Kubernetes API for
//! tests, the Stripe simulator and the in-memory store.

#[path = "common/operator.rs"]
mod operator;

use std::time::Duration;

use operator::*;
use serde_json::json;
use stripe_key_operator::api::RotationPhase;
use stripe_key_operator::vault::{SecretStore, StorePath, StorePrefix};

fn store_path(name: &str) -> StorePath {
    StorePath::credential(
        &StorePrefix::new("stripe-key-operator").unwrap(),
        NS,
        "stripekeypolicy",
        name,
    )
    .unwrap()
}

#[tokio::test]
async fn mint_on_apply_publishes_exactly_the_declared_scopes() {
    let env = env().await;
    env.apply_json(&policy("checkout", &["refund_write", "charge_read"]))
        .await
        .unwrap();
    let p = wait_policy(&env, "checkout", "Ready", ready).await;
    let status = p.status.unwrap();
    let current = status.current_key.clone().unwrap();

    // Exactly one key at Stripe, with exactly the declared permissions, our name and note.
    let keys = sim_keys(&env);
    assert_eq!(keys.len(), 1, "{keys:#?}");
    let key = &keys[0];
    assert_eq!(key.id, current.id);
    assert_eq!(key.status, "active");
    let mut perms = key.permissions.clone();
    perms.sort();
    assert_eq!(perms, ["charge_read", "refund_write"]);
    assert_eq!(
        key.name.as_deref(),
        Some("stripe-key-operator/shop/checkout")
    );
    assert!(
        key.note
            .as_deref()
            .unwrap()
            .contains(p.metadata.uid.as_deref().unwrap())
    );

    // The Secret holds the key whose fingerprint status shows; nothing else.
    let secret = env
        .secret(NS, "checkout-stripe-key")
        .await
        .unwrap()
        .expect("Secret synced");
    let token = secret_value(&secret, "STRIPE_API_KEY").unwrap();
    assert!(token.starts_with("rk_test_") || token.starts_with("sk_test_"));
    assert_eq!(fingerprint(&token), current.fingerprint);
    assert_eq!(key.token_fingerprint, current.fingerprint);
    assert!(secret_value(&secret, "STRIPE_API_KEY_PREVIOUS").is_none());
    let owner = &secret.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(owner.kind, "StripeKeyPolicy");
    assert_eq!(owner.controller, Some(true));

    // The store holds the same key; the Deployment's pod template carries the fingerprint.
    let bundle = env
        .store
        .read_bundle(&store_path("checkout"))
        .await
        .unwrap()
        .unwrap()
        .value;
    assert_eq!(bundle.current.key_id, current.id);
    assert_eq!(bundle.current.secret.expose(), token);
    let dep = env
        .api
        .get("apps/v1", "Deployment", Some(NS), "checkout")
        .unwrap();
    assert_eq!(
        dep["spec"]["template"]["metadata"]["annotations"]["stripekeys.io/key-fingerprint.skp.checkout"],
        json!(current.fingerprint)
    );

    // The scopes were proven before publishing: one allowed read, one refused read.
    let log = env.sim.request_log();
    assert!(
        log.iter()
            .any(|r| r.path == "/v1/charges" && r.status == Some(200)),
        "allowed probe"
    );
    assert!(
        log.iter()
            .any(|r| r.path == "/v1/balance" && r.status == Some(403)),
        "refused probe"
    );

    assert_eq!(status.current_permissions, ["charge_read", "refund_write"]);
    assert!(status.next_rotation_at.is_some());
    assert_eq!(status.rotation_number, Some(1));
    let reasons = event_reasons(&env, "checkout").await;
    assert!(
        reasons.contains(&("Normal".into(), "KeyMinted".into())),
        "{reasons:?}"
    );
}

#[tokio::test]
async fn annotation_rotation_keeps_the_old_key_until_rollout_and_overlap() {
    let env = env().await;
    env.apply_json(&policy("checkout", &["charge_read"]))
        .await
        .unwrap();
    let first = wait_policy(&env, "checkout", "Ready", ready)
        .await
        .status
        .unwrap()
        .current_key
        .unwrap();

    // The workload cannot finish rolling: the old key must stay valid.
    env.api.set_workload_stuck(NS, "checkout", true);
    annotate(
        &env,
        "checkout",
        json!({"stripekeys.io/rotate": "2026-11-28T10:00"}),
    )
    .await;
    let p = wait_policy(&env, "checkout", "RollingOut", |p| {
        p.status
            .as_ref()
            .and_then(|s| s.rotation.as_ref())
            .is_some_and(|r| r.phase == RotationPhase::RollingOut)
    })
    .await;
    let second = p.status.as_ref().unwrap().current_key.clone().unwrap();
    assert_ne!(first.id, second.id);
    assert_eq!(active_keys(&env).len(), 2, "both keys valid while rolling");
    let secret = env
        .secret(NS, "checkout-stripe-key")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        fingerprint(&secret_value(&secret, "STRIPE_API_KEY").unwrap()),
        second.fingerprint
    );
    assert_eq!(
        fingerprint(&secret_value(&secret, "STRIPE_API_KEY_PREVIOUS").unwrap()),
        first.fingerprint
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        active_keys(&env).len(),
        2,
        "a stuck rollout holds the old key"
    );

    // Rolled: now only the overlap holds it.
    env.api.set_workload_stuck(NS, "checkout", false);
    let p = wait_policy(&env, "checkout", "Overlapping", |p| {
        p.status
            .as_ref()
            .and_then(|s| s.rotation.as_ref())
            .is_some_and(|r| r.phase == RotationPhase::Overlapping)
    })
    .await;
    let expires = p.status.unwrap().previous_key.unwrap().expires_at;
    assert!(expires.is_some(), "status shows when the old key expires");
    assert_eq!(active_keys(&env).len(), 2, "the overlap holds the old key");

    env.clock.advance(Duration::from_secs(3700));
    nudge(&env, "checkout").await;
    let p = wait_policy(&env, "checkout", "Ready after expiry", |p| {
        ready(p) && p.status.as_ref().unwrap().previous_key.is_none()
    })
    .await;
    let status = p.status.unwrap();
    let active = active_keys(&env);
    assert_eq!(active.len(), 1);
    assert_eq!(active[0].id, second.id);
    assert_eq!(
        status.last_handled_rotate_request.as_deref(),
        Some("2026-11-28T10:00")
    );
    let secret = env
        .secret(NS, "checkout-stripe-key")
        .await
        .unwrap()
        .unwrap();
    assert!(secret_value(&secret, "STRIPE_API_KEY_PREVIOUS").is_none());
    let bundle = env
        .store
        .read_bundle(&store_path("checkout"))
        .await
        .unwrap()
        .unwrap()
        .value;
    assert!(bundle.previous.is_none());

    // The same annotation never rotates twice.
    nudge(&env, "checkout").await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(sim_keys(&env).len(), 2);
    assert_eq!(
        get_policy(&env, "checkout")
            .await
            .status
            .unwrap()
            .rotation_number,
        Some(2)
    );
}

#[tokio::test]
async fn incident_rotation_expires_the_old_key_at_once() {
    let env = env().await;
    env.apply_json(&policy("checkout", &["charge_read"]))
        .await
        .unwrap();
    let first = wait_policy(&env, "checkout", "Ready", ready)
        .await
        .status
        .unwrap()
        .current_key
        .unwrap();
    env.api.set_workload_stuck(NS, "checkout", true);
    annotate(
        &env,
        "checkout",
        json!({"stripekeys.io/rotate": "incident-1", "stripekeys.io/rotate-reason": "incident"}),
    )
    .await;
    let p = wait_policy(&env, "checkout", "incident rollout", |p| {
        p.status
            .as_ref()
            .and_then(|s| s.rotation.as_ref())
            .is_some_and(|r| r.phase == RotationPhase::RollingOut)
    })
    .await;
    // Expired before the rollout finished: incident means no overlap at all.
    let old = sim_keys(&env)
        .into_iter()
        .find(|k| k.id == first.id)
        .unwrap();
    assert_eq!(old.status, "expired");
    assert_eq!(active_keys(&env).len(), 1);
    let (_, reason, _) = condition(&p, "Rotating").unwrap();
    assert_eq!(reason, "IncidentRotation");
    let secret = env
        .secret(NS, "checkout-stripe-key")
        .await
        .unwrap()
        .unwrap();
    assert!(
        secret_value(&secret, "STRIPE_API_KEY_PREVIOUS").is_none(),
        "a compromised key is not published"
    );
    let reasons = event_reasons(&env, "checkout").await;
    assert!(
        reasons.contains(&("Warning".into(), "IncidentRotation".into())),
        "{reasons:?}"
    );
    env.api.set_workload_stuck(NS, "checkout", false);
    wait_policy(&env, "checkout", "Ready", ready).await;
}

#[tokio::test]
async fn scope_change_rotates_to_a_key_with_the_new_scopes() {
    let env = env().await;
    env.apply_json(&policy("checkout", &["charge_read"]))
        .await
        .unwrap();
    let first = wait_policy(&env, "checkout", "Ready", ready)
        .await
        .status
        .unwrap()
        .current_key
        .unwrap();
    env.apply_json(&policy("checkout", &["charge_read", "customer_read"]))
        .await
        .unwrap();
    let p = wait_policy(&env, "checkout", "new scopes", |p| {
        p.status
            .as_ref()
            .is_some_and(|s| s.current_permissions == ["charge_read", "customer_read"])
    })
    .await;
    let second = p.status.unwrap().current_key.unwrap();
    assert_ne!(first.id, second.id);
    let key = sim_keys(&env)
        .into_iter()
        .find(|k| k.id == second.id)
        .unwrap();
    let mut perms = key.permissions.clone();
    perms.sort();
    assert_eq!(perms, ["charge_read", "customer_read"]);
}

#[tokio::test]
async fn scheduled_rotation_fires_when_next_rotation_at_passes() {
    let env = env().await;
    let mut p = policy("checkout", &["charge_read"]);
    p["spec"]["rotation"] = json!({"every": "2h", "overlap": "5m"});
    env.apply_json(&p).await.unwrap();
    let p = wait_policy(&env, "checkout", "Ready", ready).await;
    let status = p.status.unwrap();
    let next = status.next_rotation_at.unwrap().0;
    let last = status.last_rotation_at.unwrap().0;
    let gap = next.duration_since(last).as_secs();
    assert!(
        (7200..7200 + 72).contains(&gap),
        "2h plus at most 1% jitter: {gap}s"
    );

    env.clock.advance(Duration::from_secs(7300));
    nudge(&env, "checkout").await;
    let p = wait_policy(&env, "checkout", "scheduled rotation", |p| {
        p.status
            .as_ref()
            .is_some_and(|s| s.rotation_number == Some(2))
    })
    .await;
    assert_eq!(
        p.status.unwrap().rotation.map(|r| r.trigger),
        Some(stripe_key_operator::api::RotationTrigger::Schedule)
    );
}

#[tokio::test]
async fn guardrail_refusal_makes_no_stripe_call() {
    let env = env().await;
    env.apply_json(&json!({
        "apiVersion": "stripekeys.io/v1alpha1", "kind": "StripeGuardrail", "metadata": {"name": "no-payouts"},
        "spec": {"namespaceSelector": {}, "deniedPermissions": ["payout_*"]}
    }))
    .await
    .unwrap();
    env.apply_json(&policy("checkout", &["charge_read", "payout_write"]))
        .await
        .unwrap();
    let p = wait_policy(&env, "checkout", "refused", |p| {
        condition(p, "Ready").is_some_and(|c| c.0 == "False")
    })
    .await;
    let (_, reason, message) = condition(&p, "Ready").unwrap();
    assert_eq!(reason, "GuardrailViolation");
    assert!(
        message.contains("payout_write") && message.contains("no-payouts"),
        "{message}"
    );
    assert!(
        env.sim.request_log().is_empty(),
        "no Stripe call for a refused policy"
    );
    assert!(
        env.secret(NS, "checkout-stripe-key")
            .await
            .unwrap()
            .is_none()
    );
    let reasons = event_reasons(&env, "checkout").await;
    assert!(
        reasons.contains(&("Warning".into(), "GuardrailViolation".into())),
        "{reasons:?}"
    );
}

#[tokio::test]
async fn a_namespace_the_account_does_not_serve_is_refused() {
    let env = env().await;
    env.apply_json(&json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "ads"}}))
        .await
        .unwrap();
    let mut p = policy("banner", &["charge_read"]);
    p["metadata"]["namespace"] = json!("ads");
    env.apply_json(&p).await.unwrap();
    let api = kube::Api::<stripe_key_operator::api::StripeKeyPolicy>::namespaced(
        env.client.clone(),
        "ads",
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let p = api.get("banner").await.unwrap();
        if let Some((status, reason, _)) = condition(&p, "Ready") {
            assert_eq!(status, "False");
            assert_eq!(reason, "NamespaceNotAllowed");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no condition");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(env.sim.request_log().is_empty());
}

#[tokio::test]
async fn deletion_expires_the_keys_and_removes_the_store_entry() {
    let env = env().await;
    env.apply_json(&policy("checkout", &["charge_read"]))
        .await
        .unwrap();
    wait_policy(&env, "checkout", "Ready", ready).await;
    let api =
        kube::Api::<stripe_key_operator::api::StripeKeyPolicy>::namespaced(env.client.clone(), NS);
    api.delete("checkout", &Default::default()).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while api.get_opt("checkout").await.unwrap().is_some() {
        assert!(
            std::time::Instant::now() < deadline,
            "finalizer never finished"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        active_keys(&env).is_empty(),
        "every key expired: {:#?}",
        sim_keys(&env)
    );
    assert!(
        env.store
            .read_bundle(&store_path("checkout"))
            .await
            .unwrap()
            .is_none()
    );
    // The owned Secret goes with its owner (garbage collection).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while env
        .secret(NS, "checkout-stripe-key")
        .await
        .unwrap()
        .is_some()
    {
        assert!(std::time::Instant::now() < deadline, "Secret not collected");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
