//! Fairness between Stripe accounts: one account whose Stripe calls hang neither holds more
//! than its share of the workers nor delays another account's policies; its circuit breaker
//! opens (shown on its StripeAccount), stops its calls, and a probe closes it once Stripe
//! answers again. Simulator + Kubernetes API for tests + the real controllers.

#[path = "common/operator.rs"]
mod operator;

use std::time::{Duration, Instant};

use kube::api::Api;
use operator::{ACCOUNT, NS, env_with, ready};
use serde_json::{Value, json};
use stripe_key_operator::api::{CircuitState, StripeAccount, StripeKeyPolicy, conditions};
use stripe_key_operator::sandbox::env::{EnvOptions, LocalEnv};
use stripe_key_operator::sim::{FaultKind, FaultSpec};
use stripe_key_operator::stripe::{BreakerSettings, RetryPolicy};

const SLOW_ACCOUNT: &str = "slow-account";
const SLOW_NS: &str = "slow";
/// `--max-in-flight-per-account` of the test.
const PER_ACCOUNT: u16 = 3;

fn bare_policy(ns: &str, name: &str, account: &str) -> Value {
    json!({
        "apiVersion": "stripekeys.io/v1alpha1", "kind": "StripeKeyPolicy",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"accountRef": {"name": account}, "permissions": ["charge_read"],
                 "delivery": {"secret": {"name": format!("{name}-stripe")}},
                 "rotation": {"every": "720h"}}
    })
}

fn policies(env: &LocalEnv, ns: &str) -> Vec<StripeKeyPolicy> {
    env.api
        .list("stripekeys.io/v1alpha1", "StripeKeyPolicy", Some(ns))
        .into_iter()
        .map(|v| serde_json::from_value(v).unwrap())
        .collect()
}

/// `stripe_key_operator_stripe_circuit_transitions_total{account=..., to=...}`.
fn transitions(env: &LocalEnv, context: &str, to: &str) -> u64 {
    let needle = format!(
        "stripe_key_operator_stripe_circuit_transitions_total{{account=\"{context}\",to=\"{to}\"}} "
    );
    env.metrics
        .encode()
        .lines()
        .find_map(|l| l.strip_prefix(&needle))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0)
}

async fn slow_account(env: &LocalEnv) -> StripeAccount {
    Api::<StripeAccount>::all(env.client.clone())
        .get(SLOW_ACCOUNT)
        .await
        .unwrap()
}

async fn wait_for<T>(what: &str, limit: Duration, mut probe: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_account_holds_at_most_its_share_and_its_breaker_stops_its_calls_until_a_probe_succeeds()
 {
    let env = env_with(EnvOptions {
        extra_sim_accounts: 1,
        // B's calls hang for 30 s; the client gives up on each after 1 s.
        stripe_timeout: Duration::from_secs(1),
        stripe_retry: Some(RetryPolicy {
            max_retries: 2,
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_millis(200),
            max_retry_after: Duration::from_secs(2),
        }),
        concurrency: 8,
        max_in_flight_per_account: PER_ACCOUNT,
        breaker: BreakerSettings {
            failure_threshold: 5,
            cooldown: Duration::from_secs(3),
            max_cooldown: Duration::from_secs(6),
        },
        ..EnvOptions::default()
    })
    .await;
    let ctx = env.context().expect("the operator runs");
    let slow_context = env.sim_account_ids()[1].clone();
    let hang = env
        .sim
        .inject_fault_for(&slow_context, FaultSpec::ratio(1.0, FaultKind::Hang));

    // Account B (hanging) with 12 policies, applied first so its reconciles queue first.
    env.apply_json(&json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": SLOW_NS, "labels": {"stripekeys.io/account": SLOW_ACCOUNT}}}))
        .await
        .unwrap();
    let mut b = env.account_manifest(
        SLOW_ACCOUNT,
        json!({"matchLabels": {"stripekeys.io/account": SLOW_ACCOUNT}}),
    );
    b["spec"]["context"] = json!(slow_context);
    env.apply_json(&b).await.unwrap();
    for i in 0..12 {
        env.apply_json(&bare_policy(SLOW_NS, &format!("stuck-{i}"), SLOW_ACCOUNT))
            .await
            .unwrap();
    }
    // B's reconciles are running (and hanging) before A's policies arrive.
    wait_for(
        "B's reconciles to start",
        Duration::from_secs(30),
        async || (ctx.scheduler.stats(SLOW_ACCOUNT).in_flight > 0).then_some(()),
    )
    .await;

    // Account A: 100 new policies.
    for i in 0..100 {
        env.apply_json(&bare_policy(NS, &format!("svc-{i}"), ACCOUNT))
            .await
            .unwrap();
    }
    wait_for(
        "every policy of A to be Ready",
        Duration::from_secs(240),
        async || {
            let ps = policies(&env, NS);
            (ps.len() == 100 && ps.iter().all(ready)).then_some(())
        },
    )
    .await;
    // ... while every policy of B is still stuck.
    let stuck = policies(&env, SLOW_NS);
    assert_eq!(stuck.len(), 12);
    assert!(
        stuck.iter().all(|p| !ready(p)),
        "B's Stripe calls hang: none of its policies can be Ready"
    );
    // Structurally: neither account ever ran more than K reconciles at once, and B did hold
    // workers (it was not simply starved).
    let slow = ctx.scheduler.stats(SLOW_ACCOUNT);
    let fast = ctx.scheduler.stats(ACCOUNT);
    assert!(
        slow.peak_in_flight >= 1 && slow.peak_in_flight <= usize::from(PER_ACCOUNT),
        "B held {} workers at most (bound {PER_ACCOUNT})",
        slow.peak_in_flight
    );
    assert!(fast.peak_in_flight <= usize::from(PER_ACCOUNT), "{fast:?}");
    assert!(fast.dispatched >= 100, "{fast:?}");
    // A's calls were never delayed by B's fault.
    assert!(
        env.sim
            .request_log()
            .iter()
            .filter(|r| r.context.as_deref() == Some(env.account_id.as_str()))
            .all(|r| r.fault.is_none())
    );

    // B's breaker is open, and its StripeAccount says so.
    let account = wait_for(
        "B's status to show the open breaker",
        Duration::from_secs(60),
        async || {
            let a = slow_account(&env).await;
            let s = a.status.as_ref()?;
            (s.stripe.as_ref()?.circuit == CircuitState::Open).then_some(a)
        },
    )
    .await;
    let status = account.status.unwrap();
    let ready_condition = conditions::find(&status.conditions, "Ready").unwrap();
    assert_eq!(ready_condition.status, "False");
    assert_eq!(ready_condition.reason, "StripeUnavailable");
    assert!(
        ready_condition.message.contains("circuit breaker")
            && ready_condition.message.contains("next probe at"),
        "{}",
        ready_condition.message
    );
    let stripe = status.stripe.unwrap();
    assert!(stripe.circuit_opened_at.is_some() && stripe.next_probe_at.is_some());
    assert!(transitions(&env, &slow_context, "Open") >= 1);

    // While open, B's reconciles call nobody: every call B makes after the breaker opened is
    // a probe (one per half-open transition; one may be on its way).
    let opened_at: chrono::DateTime<chrono::Utc> = stripe
        .circuit_opened_at
        .as_deref()
        .unwrap()
        .parse()
        .unwrap();
    // Long enough for a few cooldowns (3 s, then 6 s).
    tokio::time::sleep(Duration::from_secs(10)).await;
    let probes = transitions(&env, &slow_context, "HalfOpen");
    // The status shows whole seconds: count from the second after.
    let after_open = env
        .sim
        .request_log()
        .into_iter()
        .filter(|r| r.context.as_deref() == Some(slow_context.as_str()))
        .filter(|r| r.at > opened_at + chrono::Duration::seconds(1))
        .count() as u64;
    assert!(probes >= 1, "the breaker probed at least once in 10 s");
    assert!(
        after_open <= probes && probes - after_open <= 1,
        "{after_open} calls reached Stripe for B after its breaker opened, {probes} probes"
    );
    // Failed probes kept it open; B's policies are still waiting.
    assert!(policies(&env, SLOW_NS).iter().all(|p| !ready(p)));
    assert!(ctx.scheduler.stats(SLOW_ACCOUNT).peak_in_flight <= usize::from(PER_ACCOUNT));

    // B recovers: a probe closes the breaker, the account is Ready again, B's policies follow.
    assert!(env.sim.remove_fault(hang));
    wait_for(
        "B's breaker to close",
        Duration::from_secs(30),
        async || {
            let a = slow_account(&env).await;
            let s = a.status.as_ref()?;
            (s.stripe.as_ref()?.circuit == CircuitState::Closed
                && conditions::is_true(&s.conditions, "Ready"))
            .then_some(())
        },
    )
    .await;
    assert!(transitions(&env, &slow_context, "Closed") >= 1);
    wait_for(
        "every policy of B to be Ready",
        Duration::from_secs(120),
        async || {
            let ps = policies(&env, SLOW_NS);
            ps.iter().all(ready).then_some(())
        },
    )
    .await;
    assert!(ctx.scheduler.stats(SLOW_ACCOUNT).peak_in_flight <= usize::from(PER_ACCOUNT));
    // Nothing secret reached B's status.
    let text = serde_json::to_string(&slow_account(&env).await.status).unwrap();
    assert!(!text.contains("sk_") && !text.contains("rk_") && !text.contains("whsec_"));
}
