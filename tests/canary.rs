//! Canary keys (honeytokens): a canary used through the simulator trips within one check
//! interval, rotates the policies it guards as an incident (not the others), is re-minted and
//! can trip again; a quiet canary never trips; N canaries of one account cost one listing per
//! interval; a trip is handled once across an operator restart; a canary with a harmful
//! permission is refused. The real controllers run against the Kubernetes API for tests and
//! the Stripe simulator; the decoy key is "stolen" from its Secret and used on the simulator's
//! scope-enforcing surface.

#[path = "common/operator.rs"]
mod operator;

use std::time::{Duration, Instant};

use operator::*;
use serde_json::{Value, json};
use stripe_key_operator::api::{StripeKeyPolicy, conditions};
use stripe_key_operator::sandbox::env::{EnvOptions, LocalEnv};

/// The operator's `--canary-check-interval` in these tests.
const INTERVAL: Duration = Duration::from_millis(700);

fn options() -> EnvOptions {
    EnvOptions {
        canary_check_interval: INTERVAL,
        ..EnvOptions::default()
    }
}

/// A canary in `shop` guarding the policies labelled `tier=payments`.
fn canary(name: &str, on_trip: &str) -> Value {
    json!({
        "apiVersion": "stripekeys.io/v1alpha1", "kind": "StripeKeyPolicy",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "accountRef": {"name": ACCOUNT},
            "permissions": ["balance_read"],
            "delivery": {"secret": {"name": format!("{name}-stripe-key")}},
            "canary": {"guards": {"matchLabels": {"tier": "payments"}}, "onTrip": on_trip}
        }
    })
}

/// A policy in the `payments` tier (guarded) or not.
fn guarded_policy(name: &str, guarded: bool) -> Value {
    let mut p = policy(name, &["charge_read"]);
    if guarded {
        p["metadata"]["labels"] = json!({"tier": "payments"});
    }
    p
}

async fn wait_ready(env: &LocalEnv, names: &[&str]) {
    for name in names {
        wait_policy(env, name, "Ready", ready).await;
    }
}

fn current_id(p: &StripeKeyPolicy) -> String {
    p.status
        .as_ref()
        .and_then(|s| s.current_key.as_ref())
        .map(|k| k.id.clone())
        .expect("a current key")
}

fn key_state(env: &LocalEnv, id: &str) -> String {
    sim_keys(env)
        .into_iter()
        .find(|k| k.id == id)
        .map(|k| k.status)
        .unwrap_or_else(|| "missing".into())
}

/// The decoy token, read from the canary's Secret as an intruder would.
async fn steal(env: &LocalEnv, canary: &str) -> String {
    let secret = env
        .secret(NS, &format!("{canary}-stripe-key"))
        .await
        .unwrap()
        .expect("the decoy Secret");
    secret_value(&secret, "STRIPE_API_KEY").expect("the decoy key")
}

/// Uses a key on the simulator's scope-enforcing surface.
async fn use_key(env: &LocalEnv, token: &str) {
    let status = reqwest::Client::new()
        .get(format!("{}/v1/balance", env.sim.base_url()))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status.as_u16(), 200, "the decoy answers like a real key");
}

fn tripped(p: &StripeKeyPolicy) -> bool {
    p.status
        .as_ref()
        .is_some_and(|s| conditions::is_true(&s.conditions, "Tripped"))
}

fn trips(p: &StripeKeyPolicy) -> i64 {
    p.status
        .as_ref()
        .and_then(|s| s.canary.as_ref())
        .map(|c| c.trips)
        .unwrap_or(0)
}

fn rotation_number(p: &StripeKeyPolicy) -> i64 {
    p.status
        .as_ref()
        .and_then(|s| s.rotation_number)
        .unwrap_or(0)
}

/// A metric sample of the canary `name` (absent: `None`).
fn sample(env: &LocalEnv, metric: &str, name: &str) -> Option<f64> {
    let prefix = format!("stripe_key_operator_{metric}{{namespace=\"{NS}\",name=\"{name}\"}} ");
    env.metrics
        .encode_prometheus_text()
        .lines()
        .find_map(|l| l.strip_prefix(&prefix).map(|v| v.trim().parse().unwrap()))
}

/// Listings of the account's keys (not retrieves of one key) since the log was cleared.
fn listings(env: &LocalEnv) -> usize {
    env.sim
        .request_log()
        .iter()
        .filter(|r| r.method == "GET" && r.path == "/v2/iam/api_keys")
        .count()
}

fn retrieves(env: &LocalEnv) -> usize {
    env.sim
        .request_log()
        .iter()
        .filter(|r| r.method == "GET" && r.path.starts_with("/v2/iam/api_keys/"))
        .count()
}

/// Waits until the policy's incident rotation for `request` completed.
async fn wait_incident_done(env: &LocalEnv, name: &str, request: &str) -> StripeKeyPolicy {
    wait_policy(env, name, "the incident rotation", |p| {
        p.status.as_ref().is_some_and(|s| {
            s.last_handled_rotate_request.as_deref() == Some(request)
                && s.rotation.is_none()
                && s.retiring_keys.is_empty()
        })
    })
    .await
}

fn trip_request(p: &StripeKeyPolicy) -> String {
    p.status
        .as_ref()
        .and_then(|s| s.canary.as_ref())
        .and_then(|c| c.last_trip.as_ref())
        .map(|t| t.request.clone())
        .expect("a recorded trip")
}

#[tokio::test]
async fn a_used_canary_trips_within_one_interval_and_rotates_only_the_guarded_policies() {
    let (audit, audit_sink) = stripe_key_operator::audit::AuditLog::memory();
    let env = env_with(EnvOptions {
        audit: Some(audit.clone()),
        ..options()
    })
    .await;
    env.apply_json(&guarded_policy("checkout", true))
        .await
        .unwrap();
    env.apply_json(&guarded_policy("reports", false))
        .await
        .unwrap();
    env.apply_json(&canary("payments-live", "IncidentRotation"))
        .await
        .unwrap();
    wait_ready(&env, &["checkout", "reports", "payments-live"]).await;
    let checkout_key = current_id(&get_policy(&env, "checkout").await);
    let reports_key = current_id(&get_policy(&env, "reports").await);
    let decoy = get_policy(&env, "payments-live").await;
    let decoy_key = current_id(&decoy);
    assert!(!tripped(&decoy) && trips(&decoy) == 0);
    // A few quiet rounds first: an unused canary does not trip (the operator never uses it,
    // not even for its scope probes).
    tokio::time::sleep(INTERVAL * 3).await;
    assert!(!tripped(&get_policy(&env, "payments-live").await));

    let token = steal(&env, "payments-live").await;
    use_key(&env, &token).await;
    let used_at = Instant::now();
    let p = wait_policy(&env, "payments-live", "the trip", tripped).await;
    // One interval, plus the round's own work (listing, status write) on a busy test machine.
    let took = used_at.elapsed();
    assert!(
        took <= INTERVAL * 2 + Duration::from_secs(1),
        "tripped {took:?} after the use (interval {INTERVAL:?})"
    );
    let (_, reason, message) = condition(&p, "Tripped").unwrap();
    assert_eq!(reason, "CanaryUsed");
    assert!(message.contains(&decoy_key), "{message}");
    assert!(!message.contains(&token), "no material in the condition");
    assert_eq!(trips(&p), 1);
    let request = trip_request(&p);

    // The guarded policy: an incident rotation, its old key revoked at once.
    let c = wait_incident_done(&env, "checkout", &request).await;
    assert_ne!(current_id(&c), checkout_key);
    assert_eq!(key_state(&env, &checkout_key), "expired", "revoked at once");
    let checkout_events = event_reasons(&env, "checkout").await;
    assert!(
        checkout_events
            .iter()
            .any(|(t, r)| t == "Warning" && r == "IncidentRotation"),
        "{checkout_events:?}"
    );
    // The canary itself: re-minted, the used key expired.
    let p = wait_incident_done(&env, "payments-live", &request).await;
    let second_decoy = current_id(&p);
    assert_ne!(second_decoy, decoy_key);
    assert_eq!(key_state(&env, &decoy_key), "expired");
    // The unguarded policy is untouched.
    let r = get_policy(&env, "reports").await;
    assert_eq!(current_id(&r), reports_key);
    assert_eq!(key_state(&env, &reports_key), "active");
    assert!(
        r.status
            .as_ref()
            .unwrap()
            .last_handled_rotate_request
            .is_none(),
        "no rotation was requested of an unguarded policy"
    );
    // The alarm: a Warning Event, the counter, the audit record; the gauge falls back to 0
    // once the canary is re-minted and quiet.
    let events = event_reasons(&env, "payments-live").await;
    assert_eq!(
        events
            .iter()
            .filter(|(t, r)| t == "Warning" && r == "CanaryTripped")
            .count(),
        1,
        "{events:?}"
    );
    assert_eq!(
        sample(&env, "canary_trips_total", "payments-live"),
        Some(1.0)
    );
    let p = wait_policy(&env, "payments-live", "rearmed", |p| !tripped(p)).await;
    assert_eq!(condition(&p, "Tripped").unwrap().1, "Rearmed");
    assert_eq!(sample(&env, "canary_tripped", "payments-live"), Some(0.0));
    audit.flush().await;
    let trip_lines: Vec<String> = audit_sink
        .lines()
        .into_iter()
        .filter(|l| l.contains("\"canary.trip\""))
        .collect();
    assert_eq!(trip_lines.len(), 1, "{trip_lines:?}");
    assert!(trip_lines[0].contains(&decoy_key) && trip_lines[0].contains("payments-live"));
    let all = audit_sink.contents();
    assert!(!all.contains(&token), "no canary material in the audit log");

    // The re-minted canary trips again, and rotates the guarded policy again.
    let checkout_key = current_id(&get_policy(&env, "checkout").await);
    let token = steal(&env, "payments-live").await;
    assert_ne!(fingerprint(&token), "");
    use_key(&env, &token).await;
    let p = wait_policy(&env, "payments-live", "the second trip", |p| {
        tripped(p) && trips(p) == 2
    })
    .await;
    let second = trip_request(&p);
    assert_ne!(second, request);
    let c = wait_incident_done(&env, "checkout", &second).await;
    assert_ne!(current_id(&c), checkout_key);
    assert_eq!(key_state(&env, &checkout_key), "expired");
    assert_eq!(key_state(&env, &second_decoy), "expired");
    assert_eq!(
        sample(&env, "canary_trips_total", "payments-live"),
        Some(2.0)
    );
}

#[tokio::test]
async fn quiet_canaries_never_trip_and_cost_one_listing_per_account_per_interval() {
    let env = env_with(options()).await;
    let names = ["decoy-a", "decoy-b", "decoy-c", "decoy-d", "decoy-e"];
    for name in names {
        env.apply_json(&canary(name, "Alert")).await.unwrap();
    }
    wait_ready(&env, &names).await;
    // Let the mints' own calls settle, then count only the canary check's.
    tokio::time::sleep(INTERVAL).await;
    env.sim.clear_request_log();
    let started = Instant::now();
    tokio::time::sleep(INTERVAL * 6).await;
    let rounds = started.elapsed().as_secs_f64() / INTERVAL.as_secs_f64();
    let lists = listings(&env);
    // One listing per round for all five canaries (not five per round), give or take the round
    // in flight at either end.
    assert!(
        (lists as f64) <= rounds.ceil() + 1.0 && lists as f64 >= rounds.floor() - 1.0,
        "{lists} listings in {rounds:.1} rounds for {} canaries",
        names.len()
    );
    assert_eq!(retrieves(&env), 0, "no key is retrieved one by one");
    for name in names {
        let p = get_policy(&env, name).await;
        assert!(!tripped(&p) && trips(&p) == 0, "{name} tripped while quiet");
        assert_eq!(sample(&env, "canary_tripped", name), Some(0.0));
        assert_eq!(sample(&env, "canary_trips_total", name), Some(0.0));
    }
    assert!(
        active_keys(&env).len() == names.len(),
        "one decoy key each, nothing rotated"
    );
}

#[tokio::test]
async fn a_trip_is_handled_once_across_an_operator_restart() {
    let mut env = env_with(options()).await;
    env.apply_json(&guarded_policy("checkout", true))
        .await
        .unwrap();
    env.apply_json(&canary("payments-live", "IncidentRotation"))
        .await
        .unwrap();
    wait_ready(&env, &["checkout", "payments-live"]).await;
    let before = rotation_number(&get_policy(&env, "checkout").await);
    let token = steal(&env, "payments-live").await;
    use_key(&env, &token).await;
    // The operator dies as soon as the trip is recorded (its actions may not have run yet).
    wait_policy(&env, "payments-live", "the trip", tripped).await;
    env.kill_operator().await;
    env.start_operator();
    let p = wait_policy(&env, "payments-live", "the trip's actions", |p| {
        p.status
            .as_ref()
            .and_then(|s| s.canary.as_ref())
            .and_then(|c| c.last_trip.as_ref())
            .is_some_and(|t| !t.actions_pending)
    })
    .await;
    let request = trip_request(&p);
    wait_incident_done(&env, "checkout", &request).await;
    wait_incident_done(&env, "payments-live", &request).await;
    // Several more rounds, then another restart: the handled use is never a trip again.
    tokio::time::sleep(INTERVAL * 3).await;
    env.kill_operator().await;
    env.start_operator();
    tokio::time::sleep(INTERVAL * 4).await;
    let p = get_policy(&env, "payments-live").await;
    assert_eq!(trips(&p), 1, "one use, one trip");
    assert_eq!(trip_request(&p), request);
    let c = get_policy(&env, "checkout").await;
    assert_eq!(
        rotation_number(&c),
        before + 1,
        "exactly one incident rotation of the guarded policy"
    );
    let events = event_reasons(&env, "payments-live").await;
    assert_eq!(
        events.iter().filter(|(_, r)| r == "CanaryTripped").count(),
        1,
        "{events:?}"
    );
}

#[tokio::test]
async fn on_trip_alert_reports_and_re_mints_but_rotates_nothing_else() {
    let env = env_with(options()).await;
    env.apply_json(&guarded_policy("checkout", true))
        .await
        .unwrap();
    env.apply_json(&canary("payments-live", "Alert"))
        .await
        .unwrap();
    wait_ready(&env, &["checkout", "payments-live"]).await;
    let checkout_key = current_id(&get_policy(&env, "checkout").await);
    let decoy_key = current_id(&get_policy(&env, "payments-live").await);
    let token = steal(&env, "payments-live").await;
    use_key(&env, &token).await;
    let p = wait_policy(&env, "payments-live", "the trip", tripped).await;
    let request = trip_request(&p);
    wait_incident_done(&env, "payments-live", &request).await;
    assert_eq!(key_state(&env, &decoy_key), "expired");
    let c = get_policy(&env, "checkout").await;
    assert_eq!(current_id(&c), checkout_key);
    assert_eq!(key_state(&env, &checkout_key), "active");
    assert!(c.status.unwrap().last_handled_rotate_request.is_none());
}

#[tokio::test]
async fn a_canary_with_a_harmful_permission_is_refused() {
    let env = env_with(options()).await;
    let mut bad = canary("greedy", "Alert");
    bad["spec"]["permissions"] = json!(["refund_write"]);
    // The API server's CEL rule refuses it; the controller refuses it too (the same judgement
    // as admission) if it ever got in.
    let err = env.apply_json(&bad).await.unwrap_err();
    assert!(
        format!("{err:#}").contains("exactly one harmless read permission"),
        "{err:#}"
    );
    assert!(active_keys(&env).is_empty(), "nothing was minted");
}

#[tokio::test]
async fn a_use_stripe_reports_late_trips_once_it_shows_and_records_when_it_happened() {
    let env = env_with(options()).await;
    env.apply_json(&canary("payments-live", "Alert"))
        .await
        .unwrap();
    wait_ready(&env, &["payments-live"]).await;
    // Stripe's `last_used` lags behind the use (unconfirmed at Stripe, a setting here).
    env.sim.set_last_used_lag(Duration::from_secs(600));
    let token = steal(&env, "payments-live").await;
    let before = k8s_openapi::jiff::Timestamp::now();
    use_key(&env, &token).await;
    tokio::time::sleep(INTERVAL * 4).await;
    assert!(
        !tripped(&get_policy(&env, "payments-live").await),
        "Stripe does not show the use yet"
    );
    env.sim.advance_clock(Duration::from_secs(600));
    let p = wait_policy(&env, "payments-live", "the late trip", tripped).await;
    let trip = p.status.unwrap().canary.unwrap().last_trip.unwrap();
    let at = trip.last_used.0;
    assert!(
        at.as_second() >= before.as_second() && at.as_second() <= before.as_second() + 5,
        "the trip records the use ({at}), not when it showed"
    );
}

#[tokio::test]
async fn a_recorded_trip_is_never_tripped_again_even_before_the_canary_is_re_minted() {
    use stripe_key_operator::controller::canary::check_once;
    let mut env = env_with(options()).await;
    env.apply_json(&guarded_policy("checkout", true))
        .await
        .unwrap();
    env.apply_json(&canary("payments-live", "IncidentRotation"))
        .await
        .unwrap();
    wait_ready(&env, &["checkout", "payments-live"]).await;
    let before = rotation_number(&get_policy(&env, "checkout").await);
    // No controllers from here on: nothing re-mints the canary, so its used key stays current
    // and only the recorded trip keeps a later check from handling the same use again.
    env.kill_operator().await;
    let token = steal(&env, "payments-live").await;
    use_key(&env, &token).await;
    check_once(&env.new_context(), &[None]).await.unwrap();
    let p = get_policy(&env, "payments-live").await;
    assert!(tripped(&p));
    assert_eq!(trips(&p), 1);
    let request = trip_request(&p);
    let trip = p.status.clone().unwrap().canary.unwrap().last_trip.unwrap();
    assert!(!trip.actions_pending);
    assert_eq!(trip.rotated, ["StripeKeyPolicy/checkout"]);
    for name in ["checkout", "payments-live"] {
        let annotations = get_policy(&env, name).await.metadata.annotations.unwrap();
        assert_eq!(annotations["stripekeys.io/rotate"], request, "{name}");
        assert_eq!(
            annotations["stripekeys.io/rotate-reason"], "incident",
            "{name}"
        );
    }
    // Restarted operators (fresh contexts, cold caches) look again: the same use is no trip.
    for _ in 0..2 {
        check_once(&env.new_context(), &[None]).await.unwrap();
    }
    let p = get_policy(&env, "payments-live").await;
    assert_eq!(trips(&p), 1, "one use, one trip");
    let events = event_reasons(&env, "payments-live").await;
    assert_eq!(
        events.iter().filter(|(_, r)| r == "CanaryTripped").count(),
        1,
        "{events:?}"
    );
    // The controllers carry the requested incident rotations out, once.
    env.start_operator();
    wait_incident_done(&env, "checkout", &request).await;
    wait_incident_done(&env, "payments-live", &request).await;
    tokio::time::sleep(INTERVAL * 3).await;
    assert_eq!(
        rotation_number(&get_policy(&env, "checkout").await),
        before + 1
    );
    assert_eq!(trips(&get_policy(&env, "payments-live").await), 1);
}

#[tokio::test]
async fn a_trip_also_rotates_a_guarded_webhook_endpoint_as_an_incident() {
    use kube::api::Api;
    use stripe_key_operator::api::StripeWebhookEndpoint;
    let env = env_with(options()).await;
    env.apply_json(&json!({
        "apiVersion": "stripekeys.io/v1alpha1", "kind": "StripeWebhookEndpoint",
        "metadata": {"name": "orders", "namespace": NS, "labels": {"tier": "payments"}},
        "spec": {
            "accountRef": {"name": ACCOUNT},
            "url": "https://hooks.example.com/stripe",
            "enabledEvents": ["charge.succeeded"],
            "delivery": {"secret": {"name": "orders-webhook"}},
            "rotation": {"every": "720h", "overlap": "1h"}
        }
    }))
    .await
    .unwrap();
    env.apply_json(&canary("payments-live", "IncidentRotation"))
        .await
        .unwrap();
    wait_ready(&env, &["payments-live"]).await;
    let endpoints: Api<StripeWebhookEndpoint> = Api::namespaced(env.client.clone(), NS);
    let current = |e: &StripeWebhookEndpoint| {
        e.status
            .as_ref()
            .filter(|s| conditions::is_true(&s.conditions, "Ready") && s.rotation.is_none())
            .and_then(|s| s.current_key.as_ref())
            .map(|k| k.id.clone())
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let first = loop {
        if let Some(id) = current(&endpoints.get("orders").await.unwrap()) {
            break id;
        }
        assert!(Instant::now() < deadline, "the endpoint never became Ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let token = steal(&env, "payments-live").await;
    use_key(&env, &token).await;
    let p = wait_policy(&env, "payments-live", "the trip", tripped).await;
    let request = trip_request(&p);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let e = endpoints.get("orders").await.unwrap();
        let s = e.status.clone().unwrap();
        if s.last_handled_rotate_request.as_deref() == Some(request.as_str())
            && s.rotation.is_none()
            && s.retiring_keys.is_empty()
        {
            assert_ne!(current(&e), Some(first.clone()));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no incident rotation of the endpoint: {s:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let now = current(&endpoints.get("orders").await.unwrap()).expect("a new endpoint");
    let at_stripe: Vec<String> = env
        .sim
        .state()
        .account(&env.account_id)
        .unwrap()
        .webhook_endpoints
        .iter()
        .map(|ep| ep.id.clone())
        .collect();
    assert!(at_stripe.contains(&now), "{at_stripe:?}");
    assert!(
        !at_stripe.contains(&first),
        "the old endpoint was deleted at once: {at_stripe:?}"
    );
}
