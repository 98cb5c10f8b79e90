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
        .clone()
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
    let ready_message = p
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"))
        .map(|c| (c.status.clone(), c.message.clone()))
        .unwrap();
    assert_eq!(ready_message.0, "True");
    assert!(
        ready_message.1.contains(&second.id) && !ready_message.1.contains(&first.id),
        "Ready names the key the Secret publishes during the overlap: {}",
        ready_message.1
    );
    let expires = p.status.unwrap().previous_key.clone().unwrap().expires_at;
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
        .clone()
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
        .clone()
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
    let second = p.status.unwrap().current_key.clone().unwrap();
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
    let next = status.next_rotation_at.clone().unwrap().0;
    let last = status.last_rotation_at.clone().unwrap().0;
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
        p.status.unwrap().rotation.clone().map(|r| r.trigger),
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
        resource_calls(&env).is_empty(),
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
    assert!(resource_calls(&env).is_empty());
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

/// After a full routine rotation: exactly one active key, the one in status, the store and the
/// Secret; every other key expired; no key minted twice (one key per rotation number).
async fn assert_settled(env: &operator_env::LocalEnv, rotations: usize) {
    let p = wait_policy(env, "checkout", "settled", |p| {
        ready(p) && p.status.as_ref().unwrap().previous_key.is_none()
    })
    .await;
    let current = p.status.unwrap().current_key.clone().unwrap();
    let active = active_keys(env);
    assert_eq!(
        active.len(),
        1,
        "exactly one active key: {:#?}",
        sim_keys(env)
    );
    assert_eq!(active[0].id, current.id);
    assert_eq!(
        sim_keys(env).len(),
        rotations,
        "one key per rotation, none minted twice: {:#?}",
        sim_keys(env)
    );
    let bundle = env
        .store
        .read_bundle(&store_path("checkout"))
        .await
        .unwrap()
        .unwrap()
        .value;
    assert_eq!(bundle.current.key_id, current.id);
    assert!(bundle.previous.is_none());
    let secret = env
        .secret(NS, "checkout-stripe-key")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        fingerprint(&secret_value(&secret, "STRIPE_API_KEY").unwrap()),
        current.fingerprint
    );
    assert!(secret_value(&secret, "STRIPE_API_KEY_PREVIOUS").is_none());
}

mod operator_env {
    pub use stripe_key_operator::sandbox::env::LocalEnv;
}

#[tokio::test]
async fn a_crash_after_any_step_resumes_without_a_second_key() {
    for point in ["minted", "stored", "synced", "rolled", "expired"] {
        let mut env = env().await;
        env.apply_json(&policy("checkout", &["charge_read"]))
            .await
            .unwrap();
        wait_policy(&env, "checkout", "Ready", ready).await;
        env.crash.arm(point);
        annotate(
            &env,
            "checkout",
            json!({"stripekeys.io/rotate": format!("crash-{point}")}),
        )
        .await;
        if point == "expired" {
            wait_policy(&env, "checkout", "Overlapping", |p| {
                p.status
                    .as_ref()
                    .and_then(|s| s.rotation.as_ref())
                    .is_some_and(|r| r.phase == RotationPhase::Overlapping)
            })
            .await;
            env.clock.advance(Duration::from_secs(3700));
            nudge(&env, "checkout").await;
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while env.crash.hits() == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "crash point {point} never reached"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The process dies right after the side effect, before recording it; a new one starts.
        env.kill_operator().await;
        env.start_operator();
        if point != "expired" {
            wait_policy(&env, "checkout", "Overlapping", |p| {
                p.status
                    .as_ref()
                    .and_then(|s| s.rotation.as_ref())
                    .is_some_and(|r| r.phase == RotationPhase::Overlapping)
            })
            .await;
            env.clock.advance(Duration::from_secs(3700));
            nudge(&env, "checkout").await;
        }
        assert_settled(&env, 2).await;
        eprintln!("crash after {point}: recovered with one active key");
    }
}

#[tokio::test]
async fn an_unchanged_policy_reconciled_100_times_writes_nothing() {
    let env = env().await;
    env.apply_json(&policy("checkout", &["charge_read", "customer_read"]))
        .await
        .unwrap();
    wait_policy(&env, "checkout", "Ready", ready).await;
    // Let the controller settle (rollout done, Degraded condition recorded).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let ctx = env.context().unwrap();
    let path = store_path("checkout");
    let versions_before = env.store.list_versions(&path).await.unwrap().len();
    let stripe_before = env
        .sim
        .request_log()
        .iter()
        .filter(|r| r.method == "POST")
        .count();
    env.api.reset_counts();
    for _ in 0..100 {
        let p = get_policy(&env, "checkout").await;
        stripe_key_operator::controller::keypolicy::reconcile(std::sync::Arc::new(p), ctx.clone())
            .await
            .unwrap();
    }
    let writes: Vec<_> = env
        .api
        .request_counts()
        .into_iter()
        .filter(|((verb, _), n)| {
            *n > 0 && matches!(verb.as_str(), "create" | "update" | "patch" | "delete")
        })
        .collect();
    assert!(
        writes.is_empty(),
        "Kubernetes writes in steady state: {writes:?}"
    );
    assert_eq!(
        env.sim
            .request_log()
            .iter()
            .filter(|r| r.method == "POST")
            .count(),
        stripe_before,
        "no Stripe writes"
    );
    assert_eq!(
        env.store.list_versions(&path).await.unwrap().len(),
        versions_before,
        "no store writes"
    );
}

#[tokio::test]
async fn orphaned_keys_with_the_policy_name_are_expired() {
    let env = env().await;
    env.apply_json(&policy("checkout", &["charge_read"]))
        .await
        .unwrap();
    let p = wait_policy(&env, "checkout", "Ready", ready).await;
    let uid = p.metadata.uid.clone().unwrap();
    // A create whose answer was lost: Stripe holds a key the policy never recorded.
    let client = stripe_key_operator::stripe::StripeClient::new(
        env.sim.stripe_config(&env.account_id).unwrap(),
    )
    .unwrap();
    let pair = stripe_key_operator::stripe::JweKeyPair::generate().unwrap();
    let orphan = client
        .create_api_key(
            &stripe_key_operator::stripe::CreateApiKeyParams {
                key_type: stripe_key_operator::stripe::ApiKeyType::SecretKey,
                name: "stripe-key-operator/shop/checkout".into(),
                note: Some(format!("policy-uid={uid} rotation=7")),
                permissions: vec!["charge_read".into()],
                connect_permissions: None,
                expires_at: None,
                public_key: Some(pair.public_key_param(None).unwrap()),
            },
            "lost-create",
        )
        .await
        .unwrap()
        .value;
    // A key someone else made with a similar name is never touched.
    let foreign = client
        .create_api_key(
            &stripe_key_operator::stripe::CreateApiKeyParams {
                key_type: stripe_key_operator::stripe::ApiKeyType::SecretKey,
                name: "stripe-key-operator/shop/checkout".into(),
                note: Some("made by hand".into()),
                permissions: vec!["charge_read".into()],
                connect_permissions: None,
                expires_at: None,
                public_key: Some(pair.public_key_param(None).unwrap()),
            },
            "by-hand",
        )
        .await
        .unwrap()
        .value;
    annotate(&env, "checkout", json!({"stripekeys.io/rotate": "sweep"})).await;
    wait_policy(&env, "checkout", "Overlapping", |p| {
        p.status
            .as_ref()
            .and_then(|s| s.rotation.as_ref())
            .is_some_and(|r| r.phase == RotationPhase::Overlapping)
    })
    .await;
    env.clock.advance(Duration::from_secs(3700));
    nudge(&env, "checkout").await;
    wait_policy(&env, "checkout", "settled", |p| {
        ready(p) && p.status.as_ref().unwrap().previous_key.is_none()
    })
    .await;
    let keys = sim_keys(&env);
    assert_eq!(
        keys.iter().find(|k| k.id == orphan.id).unwrap().status,
        "expired"
    );
    assert_eq!(
        keys.iter().find(|k| k.id == foreign.id).unwrap().status,
        "active",
        "not ours: untouched"
    );
}

#[tokio::test]
async fn a_stripe_429_storm_delays_but_never_duplicates() {
    let env = env().await;
    env.sim.inject_fault(stripe_key_operator::sim::FaultSpec {
        fault: stripe_key_operator::sim::FaultKind::RateLimited {
            retry_after_secs: None,
        },
        // The next six calls to the API-keys API are throttled, whoever makes them.
        count: Some(6),
        ratio: None,
        method: None,
        path_prefix: Some("/v2/iam/api_keys".into()),
    });
    for name in ["a", "b", "c"] {
        let mut p = policy(name, &["charge_read"]);
        p["spec"]["delivery"]["rolloutTargets"] = json!([]);
        env.apply_json(&p).await.unwrap();
    }
    for name in ["a", "b", "c"] {
        wait_policy(&env, name, "Ready through 429s", ready).await;
    }
    assert!(
        env.sim.request_log().iter().any(|r| r.status == Some(429)),
        "the storm happened"
    );
    let keys = sim_keys(&env);
    assert_eq!(keys.len(), 3, "one key per policy: {keys:#?}");
}

#[tokio::test]
async fn a_store_outage_stops_the_rotation_and_it_resumes_when_the_store_is_back() {
    let env = env().await;
    env.apply_json(&policy("checkout", &["charge_read"]))
        .await
        .unwrap();
    let first = wait_policy(&env, "checkout", "Ready", ready)
        .await
        .status
        .unwrap()
        .current_key
        .clone()
        .unwrap();
    env.store.set_unreachable(true);
    annotate(
        &env,
        "checkout",
        json!({"stripekeys.io/rotate": "during-outage"}),
    )
    .await;
    let p = wait_policy(&env, "checkout", "Degraded by the outage", |p| {
        condition(p, "Degraded").is_some_and(|c| c.0 == "True" && c.1 == "VaultUnreachable")
    })
    .await;
    // The published key keeps working: Ready stays True and the Secret still holds it.
    assert_eq!(condition(&p, "Ready").unwrap().0, "True");
    assert_eq!(
        p.status.as_ref().unwrap().current_key.as_ref().unwrap().id,
        first.id
    );
    let secret = env
        .secret(NS, "checkout-stripe-key")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        fingerprint(&secret_value(&secret, "STRIPE_API_KEY").unwrap()),
        first.fingerprint
    );
    env.store.set_unreachable(false);
    wait_policy(&env, "checkout", "Overlapping", |p| {
        p.status
            .as_ref()
            .and_then(|s| s.rotation.as_ref())
            .is_some_and(|r| r.phase == RotationPhase::Overlapping)
    })
    .await;
    env.clock.advance(Duration::from_secs(3700));
    nudge(&env, "checkout").await;
    assert_settled(&env, 2).await;
}

#[tokio::test]
async fn every_stripe_call_of_a_full_run_has_an_audit_line() {
    let (audit, lines) = stripe_key_operator::audit::AuditLog::memory();
    let env = env_with(stripe_key_operator::sandbox::env::EnvOptions {
        audit: Some(audit.clone()),
        ..Default::default()
    })
    .await;
    env.apply_json(&policy("checkout", &["charge_read", "refund_write"]))
        .await
        .unwrap();
    wait_policy(&env, "checkout", "Ready", ready).await;
    annotate(&env, "checkout", json!({"stripekeys.io/rotate": "audit"})).await;
    wait_policy(&env, "checkout", "Overlapping", |p| {
        p.status
            .as_ref()
            .and_then(|s| s.rotation.as_ref())
            .is_some_and(|r| r.phase == RotationPhase::Overlapping)
    })
    .await;
    env.clock.advance(Duration::from_secs(3700));
    nudge(&env, "checkout").await;
    wait_policy(&env, "checkout", "settled", |p| {
        ready(p) && p.status.as_ref().unwrap().previous_key.is_none()
    })
    .await;
    let api =
        kube::Api::<stripe_key_operator::api::StripeKeyPolicy>::namespaced(env.client.clone(), NS);
    api.delete("checkout", &Default::default()).await.unwrap();
    while api.get_opt("checkout").await.unwrap().is_some() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    audit.flush().await;
    let stripe_lines: Vec<serde_json::Value> = lines
        .lines()
        .iter()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|l| l["action"] == "stripe.request")
        .collect();
    let requests = env.sim.request_log();
    assert!(
        requests.len() >= 8,
        "a full run: mints, probes, expiries, listing: {}",
        requests.len()
    );
    assert_eq!(
        stripe_lines.len(),
        requests.len(),
        "one audit line per Stripe call"
    );
    // Every request id the simulator gave out is in the audit log.
    let text = lines.contents();
    for r in &requests {
        assert!(
            text.contains(&r.request_id),
            "no audit line for {} {} ({})",
            r.method,
            r.path,
            r.request_id
        );
    }
    for kind in [
        "store.write",
        "secret.sync",
        "rollout.patch",
        "rotation.transition",
        "store.delete",
    ] {
        assert!(text.contains(&format!("\"{kind}\"")), "no {kind} line");
    }
    let summary =
        stripe_key_operator::audit::verify_chain(text.as_bytes(), &Default::default()).unwrap();
    assert_eq!(summary.lines, lines.lines().len());
}

#[tokio::test]
async fn a_target_that_never_becomes_ready_cannot_hold_the_old_key_past_the_ceiling() {
    let env = env_with(stripe_key_operator::sandbox::env::EnvOptions {
        rollout_ceiling: Duration::from_secs(2),
        ..Default::default()
    })
    .await;
    env.apply_json(&policy("checkout", &["charge_read"]))
        .await
        .unwrap();
    let first = wait_policy(&env, "checkout", "Ready", ready)
        .await
        .status
        .unwrap()
        .current_key
        .clone()
        .unwrap();
    env.api.set_workload_stuck(NS, "checkout", true);
    annotate(&env, "checkout", json!({"stripekeys.io/rotate": "stuck"})).await;
    let p = wait_policy(&env, "checkout", "RolloutStuck", |p| {
        condition(p, "Degraded").is_some_and(|c| c.0 == "True" && c.1 == "RolloutStuck")
    })
    .await;
    let (_, _, message) = condition(&p, "Degraded").unwrap();
    assert!(
        message.contains("Deployment checkout"),
        "Degraded names the target: {message}"
    );
    let reasons = event_reasons(&env, "checkout").await;
    assert!(
        reasons.contains(&("Warning".into(), "RolloutStuck".into())),
        "{reasons:?}"
    );
    // The overlap still runs; after it the old key goes although the target never rolled.
    wait_policy(&env, "checkout", "Overlapping", |p| {
        p.status
            .as_ref()
            .and_then(|s| s.rotation.as_ref())
            .is_some_and(|r| r.phase == RotationPhase::Overlapping)
    })
    .await;
    env.clock.advance(Duration::from_secs(3700));
    nudge(&env, "checkout").await;
    // The previous key moves to `retiringKeys` (recorded before the expire is sent), and
    // leaves it once Stripe confirmed the expiry.
    wait_policy(&env, "checkout", "old key expired", |p| {
        let s = p.status.as_ref().unwrap();
        s.previous_key.is_none() && s.retiring_keys.is_empty()
    })
    .await;
    assert_eq!(
        sim_keys(&env)
            .into_iter()
            .find(|k| k.id == first.id)
            .unwrap()
            .status,
        "expired"
    );
}

#[tokio::test]
async fn a_lagging_watch_cache_never_makes_the_controller_redo_a_step() {
    let env = env().await;
    // The policy's own watch events (our status writes among them) arrive a second late, while
    // the owned Secret's and the Deployment's arrive at once and trigger reconciles: a
    // controller that trusted its cache would decide on a rotation state older than its own.
    env.api
        .set_watch_delay("stripekeypolicies", Duration::from_secs(1));
    env.apply_json(&policy("checkout", &["charge_read"]))
        .await
        .unwrap();
    wait_policy(&env, "checkout", "Ready", ready).await;
    annotate(
        &env,
        "checkout",
        json!({"stripekeys.io/rotate": "2026-11-29T01:00"}),
    )
    .await;
    wait_policy(&env, "checkout", "Overlapping", |p| {
        p.status
            .as_ref()
            .and_then(|s| s.rotation.as_ref())
            .is_some_and(|r| r.phase == RotationPhase::Overlapping)
    })
    .await;
    env.clock.advance(Duration::from_secs(3700));
    nudge(&env, "checkout").await;
    assert_settled(&env, 2).await;

    let log = env.sim.request_log();
    let mints: Vec<_> = log
        .iter()
        .filter(|r| r.method == "POST" && r.path == "/v2/iam/api_keys")
        .collect();
    assert_eq!(mints.len(), 2, "one create per rotation: {mints:#?}");
    assert!(
        mints.iter().all(|r| !r.replayed),
        "no replayed create: {mints:#?}"
    );
    let probes = log.iter().filter(|r| r.path.starts_with("/v1/")).count();
    assert_eq!(
        probes, 2,
        "the account's first key is probed live (two calls, once); later keys are verified from the create's answer"
    );
    let expiries = log
        .iter()
        .filter(|r| r.method == "POST" && r.path.ends_with("/expire"))
        .count();
    assert_eq!(expiries, 1, "the old key is expired once");
}
