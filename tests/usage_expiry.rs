//! Usage-aware expiry: the old key of a routine rotation is held while Stripe reports it still
//! in use after the rollout, and expired once quiet or at the hold ceiling; an incident never
//! waits; a current key nobody uses is reported. The real controllers run against the
//! Kubernetes API for tests and the Stripe simulator; keys are "used" through the simulator's
//! scope-enforcing surface with the token from the synced Secret, and both clocks (operator and
//! simulator) are moved together.

#[path = "common/operator.rs"]
mod operator;

use std::time::{Duration, Instant};

use operator::*;
use serde_json::{Value, json};
use stripe_key_operator::api::{RotationPhase, StripeKeyPolicy};
use stripe_key_operator::sandbox::env::{EnvOptions, LocalEnv};

const MIN: u64 = 60;
/// The operator's `--last-used-lag` in these tests (the production default).
const LAG: Duration = Duration::from_secs(10 * MIN);

fn options() -> EnvOptions {
    EnvOptions {
        last_used_lag: LAG,
        key_usage_check_interval: Duration::from_secs(15 * MIN),
        ..EnvOptions::default()
    }
}

/// The `checkout` policy: overlap 1h, quiet period 30m, the given hold ceiling.
fn usage_policy(max_hold: &str) -> Value {
    let mut p = policy("checkout", &["charge_read"]);
    p["spec"]["rotation"]["usageAwareExpiry"] = json!({
        "quietPeriod": "30m", "maxHold": max_hold, "unusedAfter": "1h"
    });
    p
}

/// Moves the operator's and the simulator's clocks together.
fn advance(env: &LocalEnv, minutes: u64) {
    let d = Duration::from_secs(minutes * MIN);
    env.clock.advance(d);
    env.sim.advance_clock(d);
}

/// Uses a key the way a client would: a call on the simulator's scope-enforcing surface.
async fn use_key(env: &LocalEnv, token: &str) {
    let status = reqwest::Client::new()
        .get(format!("{}/v1/charges", env.sim.base_url()))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status.as_u16(), 200, "the key works");
}

fn key_state(env: &LocalEnv, id: &str) -> String {
    sim_keys(env)
        .into_iter()
        .find(|k| k.id == id)
        .map(|k| k.status)
        .unwrap_or_else(|| "missing".into())
}

fn phase(p: &StripeKeyPolicy) -> Option<RotationPhase> {
    p.status.as_ref()?.rotation.as_ref().map(|r| r.phase)
}

fn held(p: &StripeKeyPolicy) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.rotation.as_ref())
        .is_some_and(|r| r.usage_hold.is_some())
}

/// The value of a gauge for the `checkout` policy (absent: `None`).
fn gauge(env: &LocalEnv, metric: &str) -> Option<f64> {
    let prefix = format!("stripe_key_operator_{metric}{{namespace=\"{NS}\",name=\"checkout\"}} ");
    env.metrics
        .encode()
        .lines()
        .find_map(|l| l.strip_prefix(&prefix).map(|v| v.trim().parse().unwrap()))
}

/// Retrieves of one key at Stripe so far.
fn retrieves(env: &LocalEnv, id: &str) -> usize {
    let path = format!("/v2/iam/api_keys/{id}");
    env.sim
        .request_log()
        .iter()
        .filter(|r| r.method == "GET" && r.path == path)
        .count()
}

async fn wait_until(what: &str, mut f: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Nudges the policy until `pred` holds (each nudge is one more reconcile at the moved clock).
async fn nudge_until(
    env: &LocalEnv,
    what: &str,
    pred: impl Fn(&StripeKeyPolicy) -> bool,
) -> StripeKeyPolicy {
    nudge(env, "checkout").await;
    wait_policy(env, "checkout", what, pred).await
}

/// Reconciles a few times at the current clock and lets them finish.
async fn settle(env: &LocalEnv) {
    for _ in 0..3 {
        nudge(env, "checkout").await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

struct Rotated {
    old_id: String,
    old_token: String,
    new_id: String,
    new_token: String,
}

/// Applies `policy`, waits for the first key, rotates once and waits for the overlap. Returns
/// the old and new keys with their tokens (read from the Secret, as a workload would).
async fn rotate_into_overlap(env: &LocalEnv, policy: &Value) -> Rotated {
    env.apply_json(policy).await.unwrap();
    wait_policy(env, "checkout", "Ready", ready).await;
    annotate(env, "checkout", json!({"stripekeys.io/rotate": "r1"})).await;
    let p = wait_policy(env, "checkout", "Overlapping", |p| {
        phase(p) == Some(RotationPhase::Overlapping)
    })
    .await;
    let status = p.status.unwrap();
    let secret = env
        .secret(NS, "checkout-stripe-key")
        .await
        .unwrap()
        .expect("Secret synced");
    let rotated = Rotated {
        old_id: status.previous_key.clone().unwrap().id,
        old_token: secret_value(&secret, "STRIPE_API_KEY_PREVIOUS").expect("old key published"),
        new_id: status.current_key.clone().unwrap().id,
        new_token: secret_value(&secret, "STRIPE_API_KEY").unwrap(),
    };
    assert!(status.rotation.clone().unwrap().rolled_out_at.is_some());
    rotated
}

fn no_material(text: &str, r: &Rotated) {
    assert!(
        !text.contains(&r.old_token) && !text.contains(&r.new_token),
        "secret material leaked: {text}"
    );
}

/// Something outside the rollout targets uses the old key 40 minutes after the rollout; the
/// overlap ends (1h after the rollout, the clock at +61m) and the key is held.
async fn used_after_rollout_and_held(env: &LocalEnv, r: &Rotated) -> StripeKeyPolicy {
    advance(env, 40);
    use_key(env, &r.old_token).await;
    advance(env, 21);
    nudge_until(env, "held", held).await
}

#[tokio::test]
async fn an_old_key_used_after_the_rollout_is_held_and_expired_once_quiet() {
    let env = env_with(options()).await;
    let r = rotate_into_overlap(&env, &usage_policy("6h")).await;
    // The overlap ends while something outside the targets still uses the old key: held.
    let p = used_after_rollout_and_held(&env, &r).await;
    assert_eq!(key_state(&env, &r.old_id), "active", "held, not expired");
    let (status, reason, message) = condition(&p, "Degraded").unwrap();
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("True", "OldKeyStillInUse")
    );
    assert!(message.contains(&r.old_id), "{message}");
    assert!(message.contains("last used at"), "{message}");
    no_material(&message, &r);
    assert_eq!(phase(&p), Some(RotationPhase::Expiring));
    let reasons = event_reasons(&env, "checkout").await;
    assert!(
        reasons.contains(&("Warning".into(), "OldKeyStillInUse".into())),
        "{reasons:?}"
    );
    assert_eq!(gauge(&env, "old_key_in_use"), Some(1.0));
    // The old key is still published while held (the client outside may read it there).
    let secret = env
        .secret(NS, "checkout-stripe-key")
        .await
        .unwrap()
        .unwrap();
    assert!(secret_value(&secret, "STRIPE_API_KEY_PREVIOUS").is_some());

    // Quiet for 30m, but Stripe may not show uses of the last 10m yet: still held 30m after the
    // last use.
    advance(&env, 9); // last use + 30m
    settle(&env).await;
    assert_eq!(
        key_state(&env, &r.old_id),
        "active",
        "the lag is waited out"
    );
    assert!(held(&get_policy(&env, "checkout").await));
    // Quiet period plus lag after the last use: expired.
    advance(&env, 11); // last use + 41m
    nudge(&env, "checkout").await;
    wait_until("the old key expired", async || {
        key_state(&env, &r.old_id) == "expired"
    })
    .await;
    let p = wait_policy(&env, "checkout", "rotation finished", ready).await;
    // `OldKeyQuiet`, or already `RolloutComplete` from the next idle reconcile.
    assert_eq!(condition(&p, "Degraded").unwrap().0, "False");
    let reasons = event_reasons(&env, "checkout").await;
    assert!(
        reasons.contains(&("Normal".into(), "OldKeyQuiet".into())),
        "{reasons:?}"
    );
    assert_eq!(
        gauge(&env, "old_key_in_use"),
        None,
        "the series goes with the hold"
    );
    assert_eq!(key_state(&env, &r.new_id), "active");
    let secret = env
        .secret(NS, "checkout-stripe-key")
        .await
        .unwrap()
        .unwrap();
    assert!(secret_value(&secret, "STRIPE_API_KEY_PREVIOUS").is_none());
}

#[tokio::test]
async fn a_quiet_old_key_is_expired_when_the_overlap_ends() {
    let env = env_with(options()).await;
    let r = rotate_into_overlap(&env, &usage_policy("6h")).await;
    // The workloads use the new key; nothing uses the old one after the rollout.
    advance(&env, 30);
    use_key(&env, &r.new_token).await;
    advance(&env, 29);
    settle(&env).await;
    assert_eq!(key_state(&env, &r.old_id), "active", "the overlap runs");
    advance(&env, 2);
    nudge(&env, "checkout").await;
    wait_until("the old key expired on time", async || {
        key_state(&env, &r.old_id) == "expired"
    })
    .await;
    assert!(retrieves(&env, &r.old_id) >= 1, "Stripe was asked first");
    let p = wait_policy(&env, "checkout", "rotation finished", ready).await;
    assert!(
        condition(&p, "Degraded").is_none_or(|c| c.1 != "OldKeyStillInUse"),
        "never held"
    );
    let reasons = event_reasons(&env, "checkout").await;
    assert!(
        !reasons.iter().any(|(_, r)| r == "OldKeyStillInUse"),
        "{reasons:?}"
    );
    assert_eq!(gauge(&env, "old_key_in_use"), None, "never set");
}

#[tokio::test]
async fn the_hold_ceiling_expires_a_key_that_stays_in_use() {
    let env = env_with(options()).await;
    let r = rotate_into_overlap(&env, &usage_policy("2h")).await;
    used_after_rollout_and_held(&env, &r).await; // rollout + 61m
    // It stays in use...
    for _ in 0..3 {
        advance(&env, 19);
        use_key(&env, &r.old_token).await;
        settle(&env).await;
        assert_eq!(key_state(&env, &r.old_id), "active", "held while in use");
    }
    // ...past the ceiling, 2h after the rollout.
    advance(&env, 4); // rollout + 122m
    nudge(&env, "checkout").await;
    wait_until("expired at the ceiling", async || {
        key_state(&env, &r.old_id) == "expired"
    })
    .await;
    wait_policy(&env, "checkout", "rotation finished", ready).await;
    let reasons = event_reasons(&env, "checkout").await;
    assert!(
        reasons.contains(&("Warning".into(), "OldKeyHoldCeiling".into())),
        "{reasons:?}"
    );
    assert_eq!(
        gauge(&env, "old_key_in_use"),
        None,
        "the series goes with the hold"
    );
}

#[tokio::test]
async fn an_incident_expires_a_held_key_at_once() {
    let env = env_with(options()).await;
    let r = rotate_into_overlap(&env, &usage_policy("6h")).await;
    used_after_rollout_and_held(&env, &r).await;
    // The old key keeps being used (perhaps by whoever leaked it): an incident is declared.
    use_key(&env, &r.old_token).await;
    annotate(
        &env,
        "checkout",
        json!({"stripekeys.io/rotate": "r2", "stripekeys.io/rotate-reason": "incident"}),
    )
    .await;
    wait_until("both keys expired without waiting", async || {
        key_state(&env, &r.old_id) == "expired" && key_state(&env, &r.new_id) == "expired"
    })
    .await;
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
    assert_eq!(active_keys(&env).len(), 1);
    assert!(!held(&p));
    assert_eq!(
        gauge(&env, "old_key_in_use"),
        None,
        "the hold ended with the incident"
    );
}

#[tokio::test]
async fn a_current_key_nobody_uses_raises_a_warning_until_it_is_used() {
    let env = env_with(options()).await;
    env.apply_json(&usage_policy("6h")).await.unwrap();
    let p = wait_policy(&env, "checkout", "Ready", ready).await;
    let id = p.status.unwrap().current_key.clone().unwrap().id;
    let token = {
        let s = env
            .secret(NS, "checkout-stripe-key")
            .await
            .unwrap()
            .unwrap();
        secret_value(&s, "STRIPE_API_KEY").unwrap()
    };
    wait_policy(&env, "checkout", "rollout recorded", |p| {
        p.status
            .as_ref()
            .and_then(|s| s.current_key.as_ref())
            .is_some_and(|k| k.rolled_out_at.is_some())
    })
    .await;
    // Before `unusedAfter`: no question asked.
    advance(&env, 30);
    settle(&env).await;
    assert_eq!(retrieves(&env, &id), 0, "no check before unusedAfter");
    // Long after the rollout, Stripe shows no use (the scope probe at mint came before it).
    advance(&env, 31);
    let p = nudge_until(&env, "unused", |p| {
        condition(p, "KeyInUse").is_some_and(|c| c.1 == "CurrentKeyUnused")
    })
    .await;
    let (status, _, message) = condition(&p, "KeyInUse").unwrap();
    assert_eq!(status, "False");
    assert!(message.contains(&id), "{message}");
    assert!(!message.contains(&token), "no secret material");
    assert!(ready(&p), "nothing is blocked");
    let reasons = event_reasons(&env, "checkout").await;
    assert!(
        reasons.contains(&("Warning".into(), "CurrentKeyUnused".into())),
        "{reasons:?}"
    );
    assert_eq!(gauge(&env, "current_key_unused"), Some(1.0));
    // Cheap: at most one retrieve per check interval, however often it reconciles.
    let asked = retrieves(&env, &id);
    settle(&env).await;
    settle(&env).await;
    assert_eq!(
        retrieves(&env, &id),
        asked,
        "no retrieve within the interval"
    );

    // The workload starts using it: the next check (after the interval) clears the warning.
    use_key(&env, &token).await;
    advance(&env, 16);
    let p = nudge_until(&env, "in use", |p| {
        condition(p, "KeyInUse").is_some_and(|c| c.0 == "True")
    })
    .await;
    assert_eq!(condition(&p, "KeyInUse").unwrap().1, "CurrentKeyUsed");
    assert_eq!(gauge(&env, "current_key_unused"), Some(0.0));
    // Confirmed once: no more questions for this key.
    let asked = retrieves(&env, &id);
    advance(&env, 60);
    settle(&env).await;
    assert_eq!(
        retrieves(&env, &id),
        asked,
        "a used key is not asked about again"
    );
}

#[tokio::test]
async fn a_use_reported_late_still_holds_the_key_when_it_lands_within_the_lag() {
    let env = env_with(options()).await;
    // Stripe shows a use 5 minutes after it happens.
    env.sim.set_last_used_lag(Duration::from_secs(5 * MIN));
    let r = rotate_into_overlap(&env, &usage_policy("6h")).await;
    // A use stamped within the lag of the rollout may be a rolled workload's last call: it does
    // not count on its own...
    advance(&env, 5);
    use_key(&env, &r.old_token).await;
    // ...but a use 40 minutes after the rollout does.
    advance(&env, 35);
    use_key(&env, &r.old_token).await; // t1 = rollout + 40m, visible at +45m
    advance(&env, 21); // rollout + 61m: the overlap has ended
    let p = nudge_until(&env, "held", held).await;
    let first = p
        .status
        .unwrap()
        .rotation
        .clone()
        .unwrap()
        .usage_hold
        .unwrap();
    // Another use 28 minutes after t1; Stripe shows it only 5 minutes later.
    advance(&env, 7); // rollout + 68m
    use_key(&env, &r.old_token).await; // t2, visible at +73m
    // At t1 + 31m the quiet period has passed by Stripe's current report, but the operator waits
    // out its lag (10m): the key stays.
    advance(&env, 3); // rollout + 71m
    settle(&env).await;
    assert_eq!(key_state(&env, &r.old_id), "active", "the lag is honoured");
    // Once the late use shows, the hold follows it.
    advance(&env, 3); // rollout + 74m
    let p = nudge_until(&env, "the late use seen", |p| {
        p.status
            .as_ref()
            .and_then(|s| s.rotation.as_ref())
            .and_then(|r| r.usage_hold.as_ref())
            .is_some_and(|h| h.last_used.0 > first.last_used.0)
    })
    .await;
    let hold = p
        .status
        .unwrap()
        .rotation
        .clone()
        .unwrap()
        .usage_hold
        .unwrap();
    assert_eq!(hold.since, first.since, "the same hold");
    advance(&env, 20); // t2 + 26m
    settle(&env).await;
    assert_eq!(key_state(&env, &r.old_id), "active");
    advance(&env, 15); // t2 + 41m: quiet for 30m plus the lag
    nudge(&env, "checkout").await;
    wait_until("expired once quiet", async || {
        key_state(&env, &r.old_id) == "expired"
    })
    .await;
}

#[tokio::test]
async fn a_hold_ceiling_beyond_a_guardrail_is_refused_and_a_disabled_check_never_asks() {
    let env = env_with(options()).await;
    env.apply_json(&json!({
        "apiVersion": "stripekeys.io/v1alpha1", "kind": "StripeGuardrail", "metadata": {"name": "short-overlaps"},
        "spec": {"namespaceSelector": {}, "maxOverlap": "3h"}
    }))
    .await
    .unwrap();
    env.apply_json(&usage_policy("4h")).await.unwrap();
    let p = wait_policy(&env, "checkout", "refused", |p| {
        condition(p, "Ready").is_some_and(|c| c.0 == "False")
    })
    .await;
    let (_, reason, message) = condition(&p, "Ready").unwrap();
    assert_eq!(reason, "InvalidSpec");
    assert!(
        message.contains("maxHold") && message.contains("short-overlaps"),
        "{message}"
    );

    // Turned off: the old key is expired when the overlap ends even though it is in use.
    let mut off = policy("checkout", &["charge_read"]);
    off["spec"]["rotation"]["usageAwareExpiry"] = json!({"enabled": false});
    let r = rotate_into_overlap(&env, &off).await;
    advance(&env, 40);
    use_key(&env, &r.old_token).await;
    advance(&env, 21);
    nudge(&env, "checkout").await;
    wait_until("expired", async || key_state(&env, &r.old_id) == "expired").await;
    assert_eq!(retrieves(&env, &r.old_id), 0, "Stripe is not asked");
}
