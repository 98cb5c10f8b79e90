//! The rotation engine's promises, each shown on the paths that used to break them: the real
//! controllers against the Kubernetes API for tests, the Stripe simulator and the store.

#[path = "common/operator.rs"]
mod operator;

use std::time::{Duration, Instant};

use kube::api::{Api, Patch, PatchParams};
use operator::*;
use serde_json::json;
use stripe_key_operator::api::{RotationPhase, StripeKeyPolicy};
use stripe_key_operator::sandbox::env::EnvOptions;
use stripe_key_operator::sim::{FaultKind, FaultSpec};

fn in_phase(phase: RotationPhase) -> impl Fn(&StripeKeyPolicy) -> bool {
    move |p| {
        p.status
            .as_ref()
            .and_then(|s| s.rotation.as_ref())
            .is_some_and(|r| r.phase == phase)
    }
}

fn key_state(env: &stripe_key_operator::sandbox::env::LocalEnv, id: &str) -> String {
    sim_keys(env)
        .into_iter()
        .find(|k| k.id == id)
        .map(|k| k.status)
        .unwrap_or_else(|| "missing".into())
}

fn p_started_floor(
    env: &stripe_key_operator::sandbox::env::LocalEnv,
) -> k8s_openapi::jiff::Timestamp {
    use stripe_key_operator::controller::clock::Clock;
    env.clock.now() - k8s_openapi::jiff::SignedDuration::from_secs(60)
}

/// Applies the `checkout` policy with `permissions` and returns its first key once Ready.
async fn first_key(
    env: &stripe_key_operator::sandbox::env::LocalEnv,
    permissions: &[&str],
) -> stripe_key_operator::api::KeyStatus {
    env.apply_json(&policy("checkout", permissions))
        .await
        .unwrap();
    wait_policy(env, "checkout", "Ready", ready)
        .await
        .status
        .unwrap()
        .current_key
        .clone()
        .unwrap()
}

async fn wait_until(what: &str, mut f: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn incident(env: &stripe_key_operator::sandbox::env::LocalEnv, name: &str, value: &str) {
    annotate(
        env,
        name,
        json!({"stripekeys.io/rotate": value, "stripekeys.io/rotate-reason": "incident"}),
    )
    .await;
}

async fn current_secret(
    env: &stripe_key_operator::sandbox::env::LocalEnv,
) -> (String, Option<String>) {
    let s = env
        .secret(NS, "checkout-stripe-key")
        .await
        .unwrap()
        .expect("Secret synced");
    (
        fingerprint(&secret_value(&s, "STRIPE_API_KEY").unwrap()),
        secret_value(&s, "STRIPE_API_KEY_PREVIOUS").map(|v| fingerprint(&v)),
    )
}

/// The reported story: a routine rotation is overlapping (K2 published, K1 previous), K2 leaks,
/// an incident is declared. Both K1 and K2 must die and one fresh key must take their place.
#[tokio::test]
async fn an_incident_during_an_overlap_expires_both_keys_and_leaves_one_fresh_key() {
    let env = env().await;
    let k1 = first_key(&env, &["charge_read"]).await;
    annotate(&env, "checkout", json!({"stripekeys.io/rotate": "r1"})).await;
    let p = wait_policy(
        &env,
        "checkout",
        "Overlapping",
        in_phase(RotationPhase::Overlapping),
    )
    .await;
    let k2 = p.status.unwrap().current_key.clone().unwrap();
    assert_ne!(k1.id, k2.id);
    assert_eq!(active_keys(&env).len(), 2);

    incident(&env, "checkout", "r2").await;
    let p = wait_policy(&env, "checkout", "incident handled", |p| {
        ready(p)
            && p.status
                .as_ref()
                .unwrap()
                .last_handled_rotate_request
                .as_deref()
                == Some("r2")
    })
    .await;
    let status = p.status.unwrap();
    let k3 = status.current_key.clone().unwrap();
    assert_eq!(key_state(&env, &k1.id), "expired", "K1 expired");
    assert_eq!(
        key_state(&env, &k2.id),
        "expired",
        "K2, the leaked key, expired"
    );
    let active = active_keys(&env);
    assert_eq!(active.len(), 1, "{active:#?}");
    assert_eq!(active[0].id, k3.id, "one fresh key");
    assert!(status.previous_key.is_none());
    assert!(status.retiring_keys.is_empty());
    let (cur, prev) = current_secret(&env).await;
    assert_eq!(cur, k3.fingerprint);
    assert_eq!(prev, None, "no leaked key is published");
}

/// Incident in every phase a rollout can stall in: whatever was stored or published before the
/// incident is expired, the request is marked handled only at the end.
#[tokio::test]
async fn an_incident_while_a_rollout_is_stuck_expires_every_key_handed_out_and_a_second_incident_does_it_again()
 {
    let env = env().await;
    let k1 = first_key(&env, &["charge_read"]).await;
    env.api.set_workload_stuck(NS, "checkout", true);
    annotate(&env, "checkout", json!({"stripekeys.io/rotate": "r1"})).await;
    let p = wait_policy(
        &env,
        "checkout",
        "RollingOut",
        in_phase(RotationPhase::RollingOut),
    )
    .await;
    let k2 = p.status.unwrap().current_key.clone().unwrap();

    incident(&env, "checkout", "r2").await;
    let p = wait_policy(&env, "checkout", "incident rollout", |p| {
        in_phase(RotationPhase::RollingOut)(p)
            && p.status
                .as_ref()
                .and_then(|s| s.rotation.as_ref())
                .is_some_and(|r| r.request.as_deref() == Some("r2"))
    })
    .await;
    let status = p.status.clone().unwrap();
    let k3 = status.current_key.clone().unwrap();
    assert_eq!(key_state(&env, &k1.id), "expired");
    assert_eq!(key_state(&env, &k2.id), "expired");
    assert_eq!(key_state(&env, &k3.id), "active");
    assert_ne!(
        status.last_handled_rotate_request.as_deref(),
        Some("r2"),
        "not handled until the fresh key has rolled"
    );

    // A second incident while the first incident's rollout is stuck: K3 was published, so it dies too.
    incident(&env, "checkout", "r3").await;
    wait_until("K3 expired", async || key_state(&env, &k3.id) == "expired").await;
    env.api.set_workload_stuck(NS, "checkout", false);
    let p = wait_policy(&env, "checkout", "r3 handled", |p| {
        ready(p)
            && p.status
                .as_ref()
                .unwrap()
                .last_handled_rotate_request
                .as_deref()
                == Some("r3")
    })
    .await;
    let k4 = p.status.unwrap().current_key.clone().unwrap();
    let active = active_keys(&env);
    assert_eq!(active.len(), 1, "{active:#?}");
    assert_eq!(active[0].id, k4.id);
}

/// A guardrail tightened while a rotation is under way refuses the policy, but an incident
/// still expires every key, and an ended overlap still expires the old one.
#[tokio::test]
async fn a_refused_spec_never_freezes_a_revocation() {
    let env = env().await;
    let k1 = first_key(&env, &["charge_read", "customer_read"]).await;
    env.api.set_workload_stuck(NS, "checkout", true);
    annotate(&env, "checkout", json!({"stripekeys.io/rotate": "r1"})).await;
    let p = wait_policy(
        &env,
        "checkout",
        "RollingOut",
        in_phase(RotationPhase::RollingOut),
    )
    .await;
    let k2 = p.status.unwrap().current_key.clone().unwrap();
    env.apply_json(&json!({
        "apiVersion": "stripekeys.io/v1alpha1", "kind": "StripeGuardrail", "metadata": {"name": "no-customers"},
        "spec": {"namespaceSelector": {}, "deniedPermissions": ["customer_*"]}
    }))
    .await
    .unwrap();
    wait_policy(&env, "checkout", "refused", |p| {
        condition(p, "Ready").is_some_and(|c| c.1 == "GuardrailViolation")
    })
    .await;
    assert_eq!(
        key_state(&env, &k1.id),
        "active",
        "a refusal alone retires nothing"
    );

    incident(&env, "checkout", "r2").await;
    wait_until(
        "both keys expired although the spec is refused",
        async || key_state(&env, &k1.id) == "expired" && key_state(&env, &k2.id) == "expired",
    )
    .await;
    let p = get_policy(&env, "checkout").await;
    assert_eq!(condition(&p, "Ready").unwrap().1, "GuardrailViolation");
    assert!(
        active_keys(&env).is_empty(),
        "nothing is minted for a refused spec"
    );

    // Fixing the spec lets the incident rotation finish with one fresh key.
    env.apply_json(&policy("checkout", &["charge_read"]))
        .await
        .unwrap();
    env.api.set_workload_stuck(NS, "checkout", false);
    let p = wait_policy(&env, "checkout", "r2 handled", |p| {
        ready(p)
            && p.status
                .as_ref()
                .unwrap()
                .last_handled_rotate_request
                .as_deref()
                == Some("r2")
    })
    .await;
    let k3 = p.status.unwrap().current_key.clone().unwrap();
    let active = active_keys(&env);
    assert_eq!(active.len(), 1);
    assert_eq!(active[0].id, k3.id);
    assert_eq!(active[0].permissions, ["charge_read"]);
}

#[tokio::test]
async fn an_overlap_that_ends_while_the_namespace_is_refused_still_expires_the_old_key() {
    let env = env().await;
    let k1 = first_key(&env, &["charge_read"]).await;
    annotate(&env, "checkout", json!({"stripekeys.io/rotate": "r1"})).await;
    wait_policy(
        &env,
        "checkout",
        "Overlapping",
        in_phase(RotationPhase::Overlapping),
    )
    .await;
    // The namespace loses the account's label: the policy is refused from now on.
    env.apply_json(&json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": NS, "labels": {"stripekeys.io/account": "someone-else"}}}))
        .await
        .unwrap();
    wait_policy(&env, "checkout", "refused at once (namespace watch)", |p| {
        condition(p, "Ready").is_some_and(|c| c.1 == "NamespaceNotAllowed")
    })
    .await;
    env.clock.advance(Duration::from_secs(3700));
    nudge(&env, "checkout").await;
    wait_until("the old key expired after its overlap", async || {
        key_state(&env, &k1.id) == "expired"
    })
    .await;
    assert_eq!(active_keys(&env).len(), 1, "the current key stays");
}

#[tokio::test]
async fn changing_only_connect_permissions_rotates_the_key() {
    let env = env().await;
    let k1 = first_key(&env, &["charge_read"]).await;
    let mut p = policy("checkout", &["charge_read"]);
    p["spec"]["connectPermissions"] = json!(["charge_read"]);
    env.apply_json(&p).await.unwrap();
    let p = wait_policy(&env, "checkout", "rotated for Connect scopes", |p| {
        p.status
            .as_ref()
            .is_some_and(|s| s.current_connect_permissions == ["charge_read"])
    })
    .await;
    let k2 = p.status.unwrap().current_key.clone().unwrap();
    assert_ne!(k1.id, k2.id);
    let key = sim_keys(&env).into_iter().find(|k| k.id == k2.id).unwrap();
    assert_eq!(key.connect_permissions, ["charge_read"]);
}

#[tokio::test]
async fn a_missing_rollout_target_holds_the_old_key_until_the_ceiling() {
    let env = env_with(EnvOptions {
        rollout_ceiling: Duration::from_secs(600),
        ..EnvOptions::default()
    })
    .await;
    let mut p = policy("checkout", &["charge_read"]);
    p["spec"]["delivery"]["rolloutTargets"] = json!([
        {"kind": "Deployment", "name": "checkout"},
        {"kind": "StatefulSet", "name": "checkout"}
    ]);
    env.apply_json(&p).await.unwrap();
    let p = wait_policy(&env, "checkout", "Ready and RolloutTargetMissing", |p| {
        ready(p)
            && condition(p, "Degraded")
                .is_some_and(|c| c.0 == "True" && c.1 == "RolloutTargetMissing")
    })
    .await;
    let (_, _, message) = condition(&p, "Degraded").unwrap();
    assert!(message.contains("StatefulSet checkout"), "{message}");
    let k1 = p.status.unwrap().current_key.clone().unwrap();

    annotate(&env, "checkout", json!({"stripekeys.io/rotate": "r1"})).await;
    let p = wait_policy(
        &env,
        "checkout",
        "RollingOut",
        in_phase(RotationPhase::RollingOut),
    )
    .await;
    let started = p
        .status
        .unwrap()
        .rotation
        .clone()
        .unwrap()
        .rollout_started_at
        .expect("the ceiling counts from the start of the rollout");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        key_state(&env, &k1.id),
        "active",
        "held while a target is missing"
    );
    assert!(
        in_phase(RotationPhase::RollingOut)(&get_policy(&env, "checkout").await),
        "the rotation waits"
    );
    assert!(
        started.0 > p_started_floor(&env),
        "recorded when the rollout began"
    );
    // Past the ceiling the rotation goes on, and says why.
    env.clock.advance(Duration::from_secs(601));
    nudge(&env, "checkout").await;
    let p = wait_policy(
        &env,
        "checkout",
        "Overlapping after the ceiling",
        in_phase(RotationPhase::Overlapping),
    )
    .await;
    assert_eq!(condition(&p, "Degraded").unwrap().1, "RolloutTargetMissing");
}

/// A key whose create answer was lost for more than Stripe's idempotency window: the replay
/// makes another key. The engine adopts it and expires the lost one, and never loops.
#[tokio::test]
async fn a_replay_after_the_idempotency_window_adopts_the_new_key_and_expires_the_lost_one() {
    let env = env().await;
    env.apply_json(&policy("checkout", &["charge_read"]))
        .await
        .unwrap();
    wait_policy(&env, "checkout", "Ready", ready).await;
    env.store.set_unreachable(true);
    annotate(&env, "checkout", json!({"stripekeys.io/rotate": "r1"})).await;
    let p = wait_policy(
        &env,
        "checkout",
        "Storing",
        in_phase(RotationPhase::Storing),
    )
    .await;
    let lost = p.status.unwrap().rotation.clone().unwrap().new_key.unwrap();
    // A day passes; the operator restarts (its minted secret is gone from memory).
    env.sim.advance_clock(Duration::from_secs(25 * 3600));
    let mut env = env;
    env.kill_operator().await;
    env.store.set_unreachable(false);
    env.start_operator();
    let p = wait_policy(
        &env,
        "checkout",
        "the adopted key published (Overlapping)",
        in_phase(RotationPhase::Overlapping),
    )
    .await;
    let status = p.status.unwrap();
    let adopted = status.current_key.clone().unwrap();
    assert_ne!(adopted.id, lost.id);
    assert_eq!(
        key_state(&env, &lost.id),
        "expired",
        "the key whose secret was lost is expired"
    );
    assert!(status.retiring_keys.is_empty());
    let (cur, _) = current_secret(&env).await;
    assert_eq!(cur, adopted.fingerprint);
    let creates = env
        .sim
        .request_log()
        .iter()
        .filter(|r| r.method == "POST" && r.path == "/v2/iam/api_keys" && !r.replayed)
        .count();
    assert_eq!(
        creates, 3,
        "initial, the lost one, the adopted one: no loop"
    );
}

/// A saved 500 is replayed for its idempotency key for a day: the engine confirms nothing was
/// created and retries under a fresh key derived from the attempt.
#[tokio::test]
async fn a_replayed_saved_server_error_does_not_pin_the_rotation() {
    let env = env().await;
    env.sim.inject_fault(FaultSpec {
        fault: FaultKind::ServerError {
            saved: true,
            should_retry: Some(false),
        },
        count: Some(1),
        ratio: None,
        method: Some("POST".into()),
        path_prefix: Some("/v2/iam/api_keys".into()),
    });
    env.apply_json(&policy("checkout", &["charge_read"]))
        .await
        .unwrap();
    let p = wait_policy(&env, "checkout", "Ready", ready).await;
    let rotation_attempts = env
        .sim
        .request_log()
        .iter()
        .filter(|r| r.method == "POST" && r.path == "/v2/iam/api_keys")
        .count();
    assert!(rotation_attempts >= 2, "the create was retried");
    assert_eq!(active_keys(&env).len(), 1);
    assert_eq!(
        active_keys(&env)[0].id,
        p.status.unwrap().current_key.clone().unwrap().id
    );
}

/// Scope probes that meet 429s and 500s retry; they never condemn a good key.
#[tokio::test]
async fn scope_probes_in_bad_weather_never_expire_a_good_key() {
    let env = env().await;
    env.sim.inject_fault(FaultSpec {
        fault: FaultKind::ServerError {
            saved: false,
            should_retry: Some(true),
        },
        count: Some(6),
        ratio: None,
        method: None,
        path_prefix: Some("/v1/".into()),
    });
    env.sim.inject_fault(FaultSpec {
        fault: FaultKind::RateLimited {
            retry_after_secs: Some(1),
        },
        count: Some(2),
        ratio: None,
        method: None,
        path_prefix: Some("/v1/".into()),
    });
    env.apply_json(&policy("checkout", &["charge_read"]))
        .await
        .unwrap();
    wait_policy(&env, "checkout", "Ready", ready).await;
    let keys = sim_keys(&env);
    assert_eq!(
        keys.len(),
        1,
        "no key was condemned for the weather: {keys:#?}"
    );
    assert_eq!(keys[0].status, "active");
}

#[tokio::test]
async fn renaming_the_secret_leaves_no_key_in_the_old_one() {
    let env = env().await;
    env.apply_json(&policy("checkout", &["charge_read"]))
        .await
        .unwrap();
    wait_policy(&env, "checkout", "Ready", ready).await;
    assert!(
        env.secret(NS, "checkout-stripe-key")
            .await
            .unwrap()
            .is_some()
    );
    let api = Api::<StripeKeyPolicy>::namespaced(env.client.clone(), NS);
    api.patch(
        "checkout",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"delivery": {"secret": {"name": "checkout-key-v2"}}}})),
    )
    .await
    .unwrap();
    wait_until(
        "the new Secret written and the old one emptied",
        async || {
            env.secret(NS, "checkout-key-v2").await.unwrap().is_some()
                && env
                    .secret(NS, "checkout-stripe-key")
                    .await
                    .unwrap()
                    .is_none_or(|s| s.data.as_ref().is_none_or(|d| d.is_empty()))
        },
    )
    .await;
    let old = env
        .secret(NS, "checkout-stripe-key")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        old.metadata
            .labels
            .unwrap()
            .get("stripekeys.io/superseded")
            .map(String::as_str),
        Some("true")
    );
    assert!(
        old.metadata.owner_references.is_some_and(|o| !o.is_empty()),
        "it goes with the policy"
    );
}
