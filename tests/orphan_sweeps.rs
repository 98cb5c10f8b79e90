//! Orphan sweeps cost one listing of an account per interval, shared by every resource of the
//! account, and still find every orphan: the real controllers against the Kubernetes API for
//! tests, the Stripe simulator (which logs every request) and the store.

#[path = "common/operator.rs"]
mod operator;

use std::time::Duration;

use kube::api::{Api, Patch, PatchParams};
use operator::*;
use serde_json::json;
use stripe_key_operator::api::{RotationPhase, StripeAccount, StripeKeyPolicy};
use stripe_key_operator::sandbox::env::{EnvOptions, LocalEnv};

const POLICIES: usize = 30;

fn name(i: usize) -> String {
    format!("bulk-{i:02}")
}

/// Listings of the account's keys the operator asked the simulator for.
/// The orphan sweeps' listings of the account's keys (not the account controller's health
/// check, which lists one key: `limit=1`).
fn key_listings(env: &LocalEnv) -> usize {
    env.sim
        .request_log()
        .iter()
        .filter(|r| r.method == "GET" && r.path == "/v2/iam/api_keys" && r.query != "limit=1")
        .count()
}

fn overlapping(p: &StripeKeyPolicy) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.rotation.as_ref())
        .is_some_and(|r| r.phase == RotationPhase::Overlapping)
}

fn settled(p: &StripeKeyPolicy) -> bool {
    ready(p) && p.status.as_ref().unwrap().previous_key.is_none()
}

/// Starts the operator with `POLICIES` policies of one account, all Ready.
async fn bulk_env() -> LocalEnv {
    bulk_env_with(POLICIES).await
}

/// The operator, unthrottled, with `policies` policies of one account, all Ready.
async fn bulk_env_with(policies: usize) -> LocalEnv {
    let mut env = env_without_operator(EnvOptions {
        rollout_delay: Duration::ZERO,
        sim_rate_limit_test: 100_000,
        ..EnvOptions::default()
    })
    .await;
    Api::<StripeAccount>::all(env.client.clone())
        .patch(
            ACCOUNT,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"requestsPerSecond": 100}})),
        )
        .await
        .unwrap();
    env.start_operator();
    for i in 0..policies {
        let mut p = policy(&name(i), &["charge_read"]);
        p["spec"]["delivery"]["rolloutTargets"] = json!([]);
        env.apply_json(&p).await.unwrap();
    }
    for i in 0..policies {
        wait_policy(&env, &name(i), "Ready", ready).await;
    }
    env
}

/// Annotates every policy in `names`, waits for their overlaps, lets the overlap pass and waits
/// until every rotation ended (the end of a rotation is where its orphan sweep runs).
async fn rotate(env: &LocalEnv, names: &[String], value: &str) {
    for n in names {
        annotate(env, n, json!({"stripekeys.io/rotate": value})).await;
    }
    for n in names {
        wait_policy(env, n, "Overlapping", overlapping).await;
    }
    env.clock.advance(Duration::from_secs(3700));
    for n in names {
        nudge(env, n).await;
    }
    for n in names {
        wait_policy(env, n, "the rotation ended", |p| {
            settled(p)
                && p.status
                    .as_ref()
                    .unwrap()
                    .last_handled_rotate_request
                    .as_deref()
                    == Some(value)
        })
        .await;
    }
}

#[tokio::test]
async fn a_bulk_rotation_of_one_account_lists_its_keys_a_constant_number_of_times() {
    let env = bulk_env().await;
    env.sim.clear_request_log();
    let names: Vec<String> = (0..POLICIES).map(name).collect();
    rotate(&env, &names, "bulk").await;
    let listings = key_listings(&env);
    // Each of the 30 rotations ends with an orphan sweep; they share one listing (a second
    // at most, should the interval's edge fall inside the run). Before: one each, 30.
    assert!(
        (1..=2).contains(&listings),
        "{listings} listings of the account's keys for {POLICIES} rotations"
    );
    let expires = env
        .sim
        .request_log()
        .iter()
        .filter(|r| r.method == "POST" && r.path.ends_with("/expire"))
        .count();
    assert_eq!(expires, POLICIES, "every previous key expired, once");
    assert_eq!(active_keys(&env).len(), POLICIES, "one key per policy");
}

#[tokio::test]
async fn an_orphan_is_still_found_by_the_next_sweep_of_its_policy() {
    let env = bulk_env().await;
    let names: Vec<String> = (0..POLICIES).map(name).collect();
    rotate(&env, &names, "bulk").await;
    // A create of policy bulk-00 whose answer was lost: Stripe holds a key its status never
    // recorded, made after the shared listing was taken.
    let p = get_policy(&env, &name(0)).await;
    let uid = p.metadata.uid.clone().unwrap();
    let client = stripe_key_operator::stripe::StripeClient::new(
        env.sim.stripe_config(&env.account_id).unwrap(),
    )
    .unwrap();
    let pair = stripe_key_operator::stripe::JweKeyPair::generate().unwrap();
    let orphan = client
        .create_api_key(
            &stripe_key_operator::stripe::CreateApiKeyParams {
                key_type: stripe_key_operator::stripe::ApiKeyType::SecretKey,
                name: format!("stripe-key-operator/{NS}/{}", name(0)),
                note: Some(format!("policy-uid={uid} rotation=9")),
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
    env.sim.clear_request_log();
    // The next rotation of bulk-00 and of bulk-01, within the same sweep interval: the shared
    // listing predates their creates, so one new listing serves both, and it shows the orphan.
    rotate(&env, &names[..2], "again").await;
    let state = |id: &str| {
        sim_keys(&env)
            .into_iter()
            .find(|k| k.id == id)
            .map(|k| k.status)
    };
    assert_eq!(state(&orphan.id).as_deref(), Some("expired"));
    assert_eq!(key_listings(&env), 1);
    let reasons = event_reasons(&env, &name(0)).await;
    assert!(
        reasons.contains(&("Warning".into(), "OrphanKeyExpired".into())),
        "{reasons:?}"
    );
    assert!(
        !event_reasons(&env, &name(1))
            .await
            .contains(&("Warning".into(), "OrphanKeyExpired".into())),
        "bulk-01 owns no orphan"
    );
    assert_eq!(active_keys(&env).len(), POLICIES);
}

/// Stripe calls of the operator whose answer never arrived (a connection failure or a timeout:
/// `code="error"` in `stripe_requests_total`).
fn lost_answers(env: &LocalEnv) -> usize {
    env.metrics
        .encode()
        .lines()
        .filter(|l| l.starts_with("stripe_key_operator_stripe_requests_total{"))
        .filter(|l| l.contains("code=\"error\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as usize
}

/// Webhook endpoints share their account's listing the same way.
#[tokio::test]
async fn a_bulk_rotation_of_webhook_endpoints_lists_the_account_a_constant_number_of_times() {
    use stripe_key_operator::api::{StripeWebhookEndpoint, conditions};
    // Stripe allows 16 endpoints per account: 8, and 8 more during the overlap.
    const ENDPOINTS: usize = 8;
    let env = bulk_env_with(0).await;
    let api: Api<StripeWebhookEndpoint> = Api::namespaced(env.client.clone(), NS);
    let names: Vec<String> = (0..ENDPOINTS).map(|i| format!("hooks-{i:02}")).collect();
    for n in &names {
        env.apply_json(&json!({
            "apiVersion": "stripekeys.io/v1alpha1", "kind": "StripeWebhookEndpoint",
            "metadata": {"name": n, "namespace": NS},
            "spec": {"accountRef": {"name": ACCOUNT}, "url": "https://127.0.0.1:9/stripe",
                     "enabledEvents": ["charge.succeeded"],
                     "delivery": {"secret": {"name": format!("{n}-secret")}},
                     "rotation": {"every": "720h", "overlap": "1h"}}
        }))
        .await
        .unwrap();
    }
    let wait_all = async |what: &str, pred: &dyn Fn(&StripeWebhookEndpoint) -> bool| {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        for n in &names {
            loop {
                let e = api.get(n).await.unwrap();
                if pred(&e) {
                    break;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "{n}: {what}: {:#?}",
                    e.status
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    let settled_with = |value: Option<&'static str>| {
        move |e: &StripeWebhookEndpoint| {
            e.status.as_ref().is_some_and(|s| {
                conditions::is_true(&s.conditions, "Ready")
                    && s.rotation.is_none()
                    && s.previous_key.is_none()
                    && s.last_handled_rotate_request.as_deref() == value
            })
        }
    };
    wait_all("Ready", &settled_with(None)).await;
    env.sim.clear_request_log();
    let lost_before = lost_answers(&env);
    let merge = |m: serde_json::Value| Patch::Merge(json!({ "metadata": m }));
    for n in &names {
        let m = merge(json!({"annotations": {"stripekeys.io/rotate": "bulk"}}));
        api.patch(n, &PatchParams::default(), &m).await.unwrap();
    }
    wait_all("Overlapping", &|e: &StripeWebhookEndpoint| {
        e.status
            .as_ref()
            .and_then(|s| s.rotation.as_ref())
            .is_some_and(|r| r.phase == RotationPhase::Overlapping)
    })
    .await;
    env.clock.advance(Duration::from_secs(3700));
    for n in &names {
        let m = merge(json!({"labels": {"test/nudge": "1"}}));
        api.patch(n, &PatchParams::default(), &m).await.unwrap();
    }
    wait_all("the rotation ended", &settled_with(Some("bulk"))).await;
    let log = env.sim.request_log();
    let listings = log
        .iter()
        .filter(|r| r.method == "GET" && r.path == "/v1/webhook_endpoints")
        .count();
    let trace: Vec<String> = log
        .iter()
        .map(|r| format!("{} {} {:?} {}ms", r.method, r.path, r.status, r.received_ms))
        .collect();
    // Each retire that Stripe answers 404 needs a listing taken after that 404 before the
    // endpoint counts as gone (`retire_one`): a retire repeated because its status write lost
    // a race with the test's own nudges (seen in CI: two endpoints deleted twice, the second
    // time 404, three listings), or a delete retried after its answer was lost (`code="error"`
    // in the operator's `stripe_requests_total`). What the bound checks is that the rotations
    // share the account's listing: a constant, plus one per such 404 or lost answer, not one
    // per rotation.
    let answered_404 = log
        .iter()
        .filter(|r| {
            r.method == "DELETE"
                && r.path.starts_with("/v1/webhook_endpoints/")
                && r.status == Some(404)
        })
        .count();
    let lost = lost_answers(&env) - lost_before;
    assert!(
        (1..=2 + answered_404 + lost).contains(&listings),
        "{listings} listings of the account's endpoints for {ENDPOINTS} rotations \
         ({answered_404} deletes answered 404, {lost} answers lost): {trace:#?}"
    );
    let endpoints = env
        .sim
        .state()
        .account(&env.account_id)
        .unwrap()
        .webhook_endpoints
        .len();
    assert_eq!(
        endpoints, ENDPOINTS,
        "one endpoint each, the old ones deleted"
    );
}

#[derive(clap::Parser)]
struct Wrapper {
    #[command(flatten)]
    config: stripe_key_operator::controller::RunConfig,
}

#[test]
fn the_sweep_interval_is_a_flag_with_a_default_of_a_few_minutes() {
    use clap::Parser;
    let parse = |args: &[&str]| Wrapper::try_parse_from(["run"].iter().chain(args));
    assert_eq!(
        parse(&[]).unwrap().config.orphan_sweep_interval,
        stripe_key_operator::controller::DEFAULT_ORPHAN_SWEEP_INTERVAL
    );
    assert_eq!(
        stripe_key_operator::controller::DEFAULT_ORPHAN_SWEEP_INTERVAL,
        Duration::from_secs(300)
    );
    assert_eq!(
        parse(&["--orphan-sweep-interval", "90s"])
            .unwrap()
            .config
            .orphan_sweep_interval,
        Duration::from_secs(90)
    );
    assert!(parse(&["--orphan-sweep-interval", "soon"]).is_err());
}
