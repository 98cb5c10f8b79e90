//! The StripeAccount controller end to end: the real controllers against the Kubernetes API for
//! tests, the Stripe simulator and the in-memory store. Its status (`Ready` with a reason, the
//! check interval, `keysUnderManagement`), its deletion guard, its immutable context, and the
//! rate limiter that belongs to the Stripe context rather than to the object.

#[path = "common/operator.rs"]
mod operator;

use std::sync::Arc;
use std::time::{Duration, Instant};

use kube::api::{Api, DeleteParams, Patch, PatchParams};
use operator::*;
use serde_json::{Value, json};
use stripe_key_operator::api::{StripeAccount, StripeKeyPolicy, conditions};
use stripe_key_operator::controller::stripeaccount::{CHECK_INTERVAL, FINALIZER};
use stripe_key_operator::sandbox::env::{EnvOptions, LocalEnv};
use stripe_key_operator::sim::{FaultKind, FaultSpec};
use stripe_key_operator::stripe::{ListApiKeysParams, RetryPolicy};

fn accounts(env: &LocalEnv) -> Api<StripeAccount> {
    Api::all(env.client.clone())
}

/// `(status, reason, message)` of the account's `Ready` condition.
fn ready_of(a: &StripeAccount) -> Option<(String, String, String)> {
    let c = conditions::find(&a.status.as_ref()?.conditions, "Ready")?;
    Some((c.status.clone(), c.reason.clone(), c.message.clone()))
}

/// Waits (bounded) until `pred` holds for the account; panics with its status otherwise.
async fn wait_account(
    env: &LocalEnv,
    name: &str,
    what: &str,
    pred: impl Fn(&StripeAccount) -> bool,
) -> StripeAccount {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let found = accounts(env).get_opt(name).await.unwrap();
        if let Some(a) = &found
            && pred(a)
        {
            return found.unwrap();
        }
        if Instant::now() > deadline {
            panic!(
                "timed out waiting for {what}; account: {:#?}",
                found.map(|a| (a.metadata.finalizers, a.status))
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn has_reason(reason: &'static str) -> impl Fn(&StripeAccount) -> bool {
    move |a| ready_of(a).is_some_and(|(_, r, _)| r == reason)
}

/// A fast retry policy, so an unreachable API base fails in well under a second.
fn fast_retry() -> EnvOptions {
    EnvOptions {
        stripe_retry: Some(RetryPolicy {
            max_retries: 1,
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(20),
            max_retry_after: Duration::from_secs(2),
        }),
        ..EnvOptions::default()
    }
}

/// The environment's account manifest under another name, changed by `edit`.
fn account_named(env: &LocalEnv, name: &str, edit: impl FnOnce(&mut Value)) -> Value {
    let mut a = env.account_manifest(name, json!({}));
    edit(&mut a);
    a
}

/// The health checks the simulator saw: the only Stripe calls when no policy exists.
fn checks(env: &LocalEnv) -> usize {
    env.sim
        .request_log()
        .iter()
        .filter(|r| r.method == "GET" && r.path == "/v2/iam/api_keys")
        .count()
}

async fn nudge_account(env: &LocalEnv, name: &str) {
    let value = format!("{}", rand_nanos());
    accounts(env)
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"test/nudge": value}}})),
        )
        .await
        .unwrap();
}

fn rand_nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

#[tokio::test]
async fn a_good_account_is_ready_counts_its_keys_and_carries_the_finalizer() {
    let env = env().await;
    let a = wait_account(&env, ACCOUNT, "Ready", has_reason("Ready")).await;
    let (status, _, message) = ready_of(&a).unwrap();
    assert_eq!(status, "True");
    assert!(message.contains(&env.account_id), "{message}");
    let s = a.status.as_ref().unwrap();
    assert_eq!(s.observed_generation, a.metadata.generation);
    assert!(s.last_checked_time.is_some());
    assert!(s.encryption_key_fingerprint.is_some());
    assert_eq!(s.keys_under_management, Some(0));
    assert!(
        a.metadata
            .finalizers
            .as_ref()
            .is_some_and(|f| f.iter().any(|f| f == FINALIZER))
    );

    env.apply_json(&policy("checkout", &["charge_read"]))
        .await
        .unwrap();
    wait_policy(&env, "checkout", "Ready", ready).await;
    wait_account(&env, ACCOUNT, "one key under management", |a| {
        a.status
            .as_ref()
            .is_some_and(|s| s.keys_under_management == Some(1))
    })
    .await;
}

#[tokio::test]
async fn a_missing_app_key_is_credentials_missing_and_an_unlabelled_one_untrusted() {
    let env = env().await;
    env.apply_json(&account_named(&env, "no-secret", |a| {
        a["spec"]["credentials"] = json!({"secretRef": {"name": "absent", "key": "secret_key"}});
    }))
    .await
    .unwrap();
    let a = wait_account(
        &env,
        "no-secret",
        "CredentialsMissing",
        has_reason("CredentialsMissing"),
    )
    .await;
    let (status, _, message) = ready_of(&a).unwrap();
    assert_eq!(status, "False");
    assert!(message.contains("absent"), "{message}");

    env.apply_json(&json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "unlabelled", "namespace": "stripe-key-operator"},
        "stringData": {"secret_key": "not-read"},
    }))
    .await
    .unwrap();
    env.apply_json(&account_named(&env, "unlabelled", |a| {
        a["spec"]["credentials"] =
            json!({"secretRef": {"name": "unlabelled", "key": "secret_key"}});
    }))
    .await
    .unwrap();
    wait_account(&env, "unlabelled", "Untrusted", has_reason("Untrusted")).await;
}

#[tokio::test]
async fn an_unreachable_api_base_is_stripe_unreachable_and_an_expired_app_key_unauthorized() {
    let mut env = env_without_operator(fast_retry()).await;
    // A port nobody listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    env.apply_json(&account_named(&env, "unreachable", |a| {
        a["spec"]["apiBase"] = json!(format!("http://127.0.0.1:{closed}"));
    }))
    .await
    .unwrap();
    env.start_operator();
    let a = wait_account(
        &env,
        "unreachable",
        "StripeUnreachable",
        has_reason("StripeUnreachable"),
    )
    .await;
    assert_eq!(ready_of(&a).unwrap().0, "False");

    env.sim.expire_app_key(env.sim.app_key()).unwrap();
    env.apply_json(&account_named(&env, "expired-key", |_| {}))
        .await
        .unwrap();
    let a = wait_account(
        &env,
        "expired-key",
        "Unauthorized",
        has_reason("Unauthorized"),
    )
    .await;
    let message = ready_of(&a).unwrap().2;
    assert!(
        !message.contains("sk_") && !message.contains("rk_"),
        "no key material in status: {message}"
    );
}

#[tokio::test]
async fn the_stripe_check_runs_at_most_once_per_interval_and_at_once_after_a_spec_change() {
    let mut env = env_without_operator(EnvOptions::default()).await;
    env.start_operator();
    wait_account(&env, ACCOUNT, "Ready", has_reason("Ready")).await;
    assert_eq!(checks(&env), 1, "one check when the account appears");

    // Reconciles for other reasons (a label, a policy's change) do not call Stripe.
    for _ in 0..5 {
        nudge_account(&env, ACCOUNT).await;
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    assert_eq!(checks(&env), 1, "no check before the interval ends");

    // Once the interval has passed, the next reconcile checks again (once).
    let before = accounts(&env)
        .get(ACCOUNT)
        .await
        .unwrap()
        .status
        .unwrap()
        .last_checked_time;
    env.clock.advance(CHECK_INTERVAL + Duration::from_secs(1));
    nudge_account(&env, ACCOUNT).await;
    wait_account(&env, ACCOUNT, "a second check", |a| {
        a.status.as_ref().unwrap().last_checked_time != before
    })
    .await;
    for _ in 0..3 {
        nudge_account(&env, ACCOUNT).await;
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    assert_eq!(checks(&env), 2, "one check per interval");

    // A spec change is checked at once.
    accounts(&env)
        .patch(
            ACCOUNT,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"requestsPerSecond": 10}})),
        )
        .await
        .unwrap();
    let a = wait_account(&env, ACCOUNT, "the new generation observed", |a| {
        a.status.as_ref().unwrap().observed_generation == a.metadata.generation
    })
    .await;
    assert_eq!(ready_of(&a).unwrap().1, "Ready");
    assert_eq!(checks(&env), 3, "a spec change is checked at once");
}

#[tokio::test]
async fn deletion_waits_until_the_policy_retired_its_key_then_completes() {
    let env = env().await;
    env.apply_json(&policy("checkout", &["charge_read"]))
        .await
        .unwrap();
    let key = wait_policy(&env, "checkout", "Ready", ready)
        .await
        .status
        .unwrap()
        .current_key
        .clone()
        .unwrap();
    wait_account(&env, ACCOUNT, "one key under management", |a| {
        a.status
            .as_ref()
            .is_some_and(|s| s.keys_under_management == Some(1))
    })
    .await;

    accounts(&env)
        .delete(ACCOUNT, &DeleteParams::default())
        .await
        .unwrap();
    let a = wait_account(&env, ACCOUNT, "InUse", has_reason("InUse")).await;
    assert!(a.metadata.deletion_timestamp.is_some());
    let (status, _, message) = ready_of(&a).unwrap();
    assert_eq!(status, "False");
    assert!(
        message.contains("StripeKeyPolicy shop/checkout"),
        "{message}"
    );
    // The Event (cluster-scoped objects' Events live in `default`).
    let events: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(env.client.clone(), "default");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let found = events
            .list(&Default::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .find(|e| {
                e.reason.as_deref() == Some("DeletionBlocked")
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(ACCOUNT)
            });
        if let Some(e) = found {
            assert_eq!(e.type_.as_deref(), Some("Warning"));
            assert!(
                e.note
                    .as_deref()
                    .is_some_and(|n| n.contains("StripeKeyPolicy shop/checkout")),
                "{:?}",
                e.note
            );
            break;
        }
        assert!(Instant::now() < deadline, "no DeletionBlocked Event");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Still held a while later, and the policy keeps working under a terminating account.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(accounts(&env).get_opt(ACCOUNT).await.unwrap().is_some());
    assert_eq!(
        active_keys(&env).len(),
        1,
        "the key is still active: nothing retired it yet"
    );
    // A policy created now mints nothing under the terminating account: it would only hold the
    // deletion up.
    env.apply_json(&policy("late", &["charge_read"]))
        .await
        .unwrap();
    let late = wait_policy(&env, "late", "AccountTerminating", |p| {
        condition(p, "Ready").is_some_and(|(s, r, _)| s == "False" && r == "AccountTerminating")
    })
    .await;
    let (_, _, message) = condition(&late, "Ready").unwrap();
    assert!(message.contains("is being deleted"), "{message}");
    assert!(late.status.unwrap().current_key.is_none());
    assert_eq!(
        active_keys(&env).len(),
        1,
        "no key was minted for the late policy"
    );
    Api::<StripeKeyPolicy>::namespaced(env.client.clone(), NS)
        .delete("late", &DeleteParams::default())
        .await
        .unwrap();

    // The policy goes: its finalizer retires the key through the terminating account, and only
    // then does the account go.
    Api::<StripeKeyPolicy>::namespaced(env.client.clone(), NS)
        .delete("checkout", &DeleteParams::default())
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while accounts(&env).get_opt(ACCOUNT).await.unwrap().is_some() {
        assert!(Instant::now() < deadline, "the account was never released");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let keys = sim_keys(&env);
    let k = keys.iter().find(|k| k.id == key.id).expect("the key");
    assert_eq!(k.status, "expired", "retired before the account went");
    assert!(
        Api::<StripeKeyPolicy>::namespaced(env.client.clone(), NS)
            .get_opt("checkout")
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test]
async fn an_unused_account_is_deleted_at_once() {
    let env = env().await;
    wait_account(&env, ACCOUNT, "the finalizer", |a| {
        a.metadata
            .finalizers
            .as_ref()
            .is_some_and(|f| f.iter().any(|f| f == FINALIZER))
    })
    .await;
    accounts(&env)
        .delete(ACCOUNT, &DeleteParams::default())
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while accounts(&env).get_opt(ACCOUNT).await.unwrap().is_some() {
        assert!(Instant::now() < deadline, "the account was never released");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn the_context_of_an_account_cannot_change() {
    let env = env().await;
    let err = env
        .apply_json(&account_named(&env, ACCOUNT, |a| {
            a["spec"]["context"] = json!("acct_1SomeoneElse");
            a["spec"]["namespaceSelector"] =
                json!({"matchLabels": {"stripekeys.io/account": ACCOUNT}});
        }))
        .await
        .expect_err("a changed context is refused");
    let message = format!("{err:#}");
    assert!(
        message.contains("spec.context") && message.contains("context is immutable"),
        "{message}"
    );
    let a = accounts(&env).get(ACCOUNT).await.unwrap();
    assert_eq!(a.spec.context, env.account_id);
}

#[tokio::test]
async fn the_rate_limiter_belongs_to_the_stripe_context_and_a_429_pauses_all_of_it() {
    let env = env_without_operator(EnvOptions::default()).await;
    env.apply_json(&account_named(&env, "same-context", |_| {}))
        .await
        .unwrap();
    let ctx = env.new_context();
    let get = |name: &'static str| {
        let api = accounts(&env);
        async move { api.get(name).await.unwrap() }
    };
    let a = ctx
        .accounts
        .resolve(&ctx, &get(ACCOUNT).await)
        .await
        .unwrap();
    let b = ctx
        .accounts
        .resolve(&ctx, &get("same-context").await)
        .await
        .unwrap();
    assert!(
        Arc::ptr_eq(&a.client.rate_limiter(), &b.client.rate_limiter()),
        "two objects naming one context share one limiter"
    );

    // An edit builds a new client, on the same limiter, with no fresh tokens.
    accounts(&env)
        .patch(
            ACCOUNT,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"requestsPerSecond": 1}})),
        )
        .await
        .unwrap();
    let edited = ctx
        .accounts
        .resolve(&ctx, &get(ACCOUNT).await)
        .await
        .unwrap();
    assert!(Arc::ptr_eq(
        &a.client.rate_limiter(),
        &edited.client.rate_limiter()
    ));
    // Drain the one token; another edit (a new generation, a new client) must not refill it.
    while edited.client.rate_limiter().try_acquire() {}
    accounts(&env)
        .patch(
            ACCOUNT,
            &PatchParams::default(),
            &Patch::Merge(
                json!({"spec": {"namespaceSelector": {"matchLabels": {"edited": "yes"}}}}),
            ),
        )
        .await
        .unwrap();
    let again = ctx
        .accounts
        .resolve(&ctx, &get(ACCOUNT).await)
        .await
        .unwrap();
    assert!(Arc::ptr_eq(
        &a.client.rate_limiter(),
        &again.client.rate_limiter()
    ));
    assert!(
        !again.client.rate_limiter().try_acquire(),
        "an edit hands out no fresh token"
    );
    accounts(&env)
        .patch(
            ACCOUNT,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"requestsPerSecond": 20}})),
        )
        .await
        .unwrap();
    let again = ctx
        .accounts
        .resolve(&ctx, &get(ACCOUNT).await)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;

    // A 429 with Retry-After: 1 on a call of A delays the next call of B (another resource on
    // the same Stripe account).
    env.sim.inject_fault(FaultSpec::next(
        1,
        FaultKind::RateLimited {
            retry_after_secs: Some(1),
        },
    ));
    let params = ListApiKeysParams {
        include_expired: None,
        limit: Some(1),
    };
    let first = {
        let client = again.client.clone();
        let params = params.clone();
        tokio::spawn(async move { client.list_api_keys(&params).await })
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while !env.sim.request_log().iter().any(|r| r.status == Some(429)) {
        assert!(Instant::now() < deadline, "no 429");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    b.client.list_api_keys(&params).await.unwrap();
    first.await.unwrap().unwrap();
    let log = env.sim.request_log();
    let limited = log.iter().find(|r| r.status == Some(429)).unwrap();
    let after: Vec<u64> = log
        .iter()
        .filter(|r| r.received_ms > limited.received_ms)
        .map(|r| r.received_ms)
        .collect();
    assert_eq!(after.len(), 2, "A's retry and B's call: {log:#?}");
    for t in after {
        assert!(
            t >= limited.received_ms + 950,
            "a call left {} ms after the 429 instead of waiting out Retry-After: 1",
            t - limited.received_ms
        );
    }
}

#[tokio::test]
async fn the_account_status_written_every_few_minutes_does_not_reconcile_its_policies() {
    let env = env().await;
    env.apply_json(&policy("checkout", &["charge_read"]))
        .await
        .unwrap();
    wait_policy(&env, "checkout", "Ready", ready).await;
    wait_account(&env, ACCOUNT, "one key under management", |a| {
        a.status
            .as_ref()
            .is_some_and(|s| s.keys_under_management == Some(1))
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let policy_reconciles = || {
        env.metrics
            .reconciliations
            .get_or_create(&stripe_key_operator::metrics::ControllerLabels {
                controller: "stripekeypolicy".into(),
            })
            .get()
    };
    let before = policy_reconciles();
    // Three checks, three status writes (lastCheckedTime moves each time).
    for _ in 0..3 {
        let last = accounts(&env)
            .get(ACCOUNT)
            .await
            .unwrap()
            .status
            .unwrap()
            .last_checked_time;
        env.clock.advance(CHECK_INTERVAL + Duration::from_secs(1));
        nudge_account(&env, ACCOUNT).await;
        wait_account(&env, ACCOUNT, "another check", |a| {
            a.status.as_ref().unwrap().last_checked_time != last
        })
        .await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        policy_reconciles(),
        before,
        "an account's status (or label) change reconciles none of its policies"
    );

    // A spec change still does.
    accounts(&env)
        .patch(
            ACCOUNT,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"requestsPerSecond": 10}})),
        )
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while policy_reconciles() == before {
        assert!(
            Instant::now() < deadline,
            "a spec change requeues the policies"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
