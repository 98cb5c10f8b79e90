//! Kubernetes API requests per mint and per quiet reconcile, counted by the Kubernetes API for
//! tests itself (issue 17, §3).
//!
//! 100 new StripeKeyPolicies (no rollout targets, so the figure is the mint's own) are created
//! while the operator runs; once all are Ready and the controllers settled, the requests the API
//! server received are counted by verb and resource. The test's own requests are not counted:
//! it creates and reads objects straight through the server's store ([`TestApiServer::put`],
//! [`TestApiServer::list`]), which counts nothing. Watch and list starts (the reflectors) are
//! shown apart and not charged to the mints.
//!
//! Then 100 quiet reconciles (nothing changed) are run through the operator's own context: each
//! may cost one request, the fresh GET of the object the state machine decides on (the watch
//! cache can lag behind the controller's own status writes), and nothing else.

#[path = "common/operator.rs"]
mod operator;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use operator::{ACCOUNT, NS, env_without_operator, wait_account_checked};
use serde_json::{Value, json};
use stripe_key_operator::api::StripeKeyPolicy;
use stripe_key_operator::sandbox::env::{EnvOptions, LocalEnv};

/// Quiet long enough for the account's deferred recount (at most one per
/// [`RECOUNT_WINDOW`](stripe_key_operator::controller::stripeaccount::RECOUNT_WINDOW)) to have
/// run: a shorter wait ends before it and counts it against the next step.
const SETTLED: Duration = Duration::from_secs(
    stripe_key_operator::controller::stripeaccount::RECOUNT_WINDOW.as_secs() + 1,
);
const POLICIES: usize = 100;
/// The goal of issue 17: at most ten Kubernetes API requests per mint.
const MAX_PER_MINT: f64 = 10.0;

fn policy(i: usize) -> Value {
    json!({
        "apiVersion": "stripekeys.io/v1alpha1", "kind": "StripeKeyPolicy",
        "metadata": {"name": format!("svc-{i}"), "namespace": NS},
        "spec": {
            "accountRef": {"name": ACCOUNT},
            "permissions": ["charge_read", "refund_write"],
            "delivery": {"secret": {"name": format!("svc-{i}-stripe")}},
            "rotation": {"every": "720h"}
        }
    })
}

fn ready_count(env: &LocalEnv) -> usize {
    env.api
        .list("stripekeys.io/v1alpha1", "StripeKeyPolicy", Some(NS))
        .iter()
        .filter(|p| {
            p["status"]["conditions"].as_array().is_some_and(|c| {
                c.iter()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True")
            }) && p["status"]["rotation"].is_null()
        })
        .count()
}

type Counts = BTreeMap<(String, String), u64>;

fn is_stream_start(verb: &str) -> bool {
    matches!(verb, "watch" | "list")
}

fn print_table(title: &str, counts: &Counts, per: usize) {
    eprintln!("{title}");
    eprintln!(
        "  {:<8} {:<40} {:>7} {:>9}",
        "verb", "resource", "total", "per item"
    );
    for ((verb, resource), n) in counts {
        let note = if is_stream_start(verb) {
            "  (watch/list start: not charged)"
        } else {
            ""
        };
        eprintln!(
            "  {verb:<8} {resource:<40} {n:>7} {:>9.2}{note}",
            *n as f64 / per as f64
        );
    }
    let charged: u64 = counts
        .iter()
        .filter(|((v, _), _)| !is_stream_start(v))
        .map(|(_, n)| *n)
        .sum();
    eprintln!(
        "  total (without watch/list starts): {charged} = {:.2} per item",
        charged as f64 / per as f64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mint_costs_at_most_ten_api_requests_and_a_quiet_reconcile_only_its_fresh_read() {
    let mut env = env_without_operator(EnvOptions {
        // Stripe is not the subject here: let the operator mint as fast as it can.
        sim_rate_limit_test: 1000,
        ..EnvOptions::default()
    })
    .await;
    let mut account = env.account_manifest(
        ACCOUNT,
        json!({"matchLabels": {"stripekeys.io/account": ACCOUNT}}),
    );
    account["spec"]["requestsPerSecond"] = json!(100);
    env.apply_json(&account).await.unwrap();
    env.start_operator();
    wait_account_checked(&env).await;
    // Startup (CRD checks, reflectors' first lists and watches) is not the mints' cost.
    env.api
        .settle(Duration::from_millis(500), Duration::from_secs(10))
        .await;
    env.api.reset_counts();

    for i in 0..POLICIES {
        env.api.put(policy(i)).expect("the policy is created");
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while ready_count(&env) < POLICIES {
        assert!(
            Instant::now() < deadline,
            "only {}/{POLICIES} policies became Ready",
            ready_count(&env)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The reconciles our own writes trigger belong to the mint too.
    env.api.settle(SETTLED, Duration::from_secs(20)).await;
    let mint_counts = env.api.request_counts();
    print_table(
        &format!("Kubernetes API requests for {POLICIES} new policies"),
        &mint_counts,
        POLICIES,
    );
    let charged: u64 = mint_counts
        .iter()
        .filter(|((v, _), _)| !is_stream_start(v))
        .map(|(_, n)| *n)
        .sum();
    let per_mint = charged as f64 / POLICIES as f64;
    assert!(
        per_mint <= MAX_PER_MINT,
        "{per_mint:.2} Kubernetes API requests per mint (goal ≤ {MAX_PER_MINT}): {mint_counts:?}"
    );
    // Every policy got its Secret, through one write each (a create: no Secret of that name
    // existed).
    let secret_writes: u64 = mint_counts
        .iter()
        .filter(|((verb, resource), _)| {
            resource == "secrets" && matches!(verb.as_str(), "create" | "patch" | "update")
        })
        .map(|(_, n)| *n)
        .sum();
    assert!(
        (POLICIES as u64..=POLICIES as u64 * 21 / 20).contains(&secret_writes),
        "one Secret write per mint (a create that meets a Secret the cache did not show yet is \
         refused and counts too): {secret_writes}"
    );

    // Quiet reconciles: nothing changed, so nothing is written and nothing but the fresh read
    // of the object itself is asked for.
    let ctx = env.context().expect("the operator runs");
    env.api.reset_counts();
    let objects: Vec<StripeKeyPolicy> = env
        .api
        .list("stripekeys.io/v1alpha1", "StripeKeyPolicy", Some(NS))
        .into_iter()
        .map(|v| serde_json::from_value(v).unwrap())
        .collect();
    assert_eq!(objects.len(), POLICIES);
    for p in objects {
        stripe_key_operator::controller::keypolicy::reconcile(Arc::new(p), ctx.clone())
            .await
            .expect("a quiet reconcile succeeds");
    }
    let quiet_counts = env.api.request_counts();
    print_table(
        &format!("Kubernetes API requests for {POLICIES} quiet reconciles"),
        &quiet_counts,
        POLICIES,
    );
    let beyond: Counts = quiet_counts
        .iter()
        .filter(|((verb, resource), n)| {
            **n > 0 && !(verb == "get" && resource == "stripekeypolicies" && **n <= POLICIES as u64)
        })
        .map(|(k, n)| (k.clone(), *n))
        .collect();
    assert!(
        beyond.is_empty(),
        "a quiet reconcile asks for more than the fresh read of its object: {beyond:?}"
    );
}

fn reconciles(env: &LocalEnv, controller: &str) -> u64 {
    env.metrics
        .reconciliations
        .get_or_create(&stripe_key_operator::metrics::ControllerLabels {
            controller: controller.into(),
        })
        .get()
}

const RESTART_POLICIES: usize = 20;

/// The writes among the counted requests.
fn writes(counts: &Counts) -> Counts {
    counts
        .iter()
        .filter(|((verb, _), n)| {
            **n > 0
                && matches!(
                    verb.as_str(),
                    "create" | "update" | "patch" | "delete" | "deletecollection"
                )
        })
        .map(|(k, n)| (k.clone(), *n))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_over_settled_policies_writes_nothing() {
    let mut env = env_without_operator(EnvOptions {
        sim_rate_limit_test: 1000,
        ..EnvOptions::default()
    })
    .await;
    env.start_operator();
    wait_account_checked(&env).await;
    for i in 0..RESTART_POLICIES {
        env.api.put(policy(i)).expect("the policy is created");
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while ready_count(&env) < RESTART_POLICIES {
        assert!(
            Instant::now() < deadline,
            "only {}/{RESTART_POLICIES} policies became Ready",
            ready_count(&env)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    env.api.settle(SETTLED, Duration::from_secs(20)).await;
    // Settled: the account shows every key it manages.
    let account = env
        .api
        .get("stripekeys.io/v1alpha1", "StripeAccount", None, ACCOUNT)
        .expect("the account");
    assert_eq!(
        account["status"]["keysUnderManagement"],
        json!(RESTART_POLICIES),
        "{:#}",
        account["status"]
    );

    // A restart (cold caches, a new process's memory) over this settled state.
    env.stop_operator().await;
    let stripe_calls = env.sim.request_log().len();
    env.api.reset_counts();
    let before = reconciles(&env, "stripekeypolicy");
    let accounts_before = reconciles(&env, "stripeaccount");
    env.start_operator();
    let deadline = Instant::now() + Duration::from_secs(60);
    while reconciles(&env, "stripekeypolicy") < before + RESTART_POLICIES as u64
        || reconciles(&env, "stripeaccount") == accounts_before
    {
        assert!(
            Instant::now() < deadline,
            "the restarted operator reconciled {} of {RESTART_POLICIES} policies and the account {} times",
            reconciles(&env, "stripekeypolicy") - before,
            reconciles(&env, "stripeaccount") - accounts_before
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    env.api
        .settle(Duration::from_secs(2), Duration::from_secs(20))
        .await;
    let counts = env.api.request_counts();
    print_table(
        &format!("Kubernetes API requests of a restart over {RESTART_POLICIES} settled policies"),
        &counts,
        RESTART_POLICIES,
    );
    assert!(
        writes(&counts).is_empty(),
        "a restart over a settled state writes: {:?}",
        writes(&counts)
    );
    // The account was looked at again (its fresh read), only not written.
    assert!(
        counts
            .get(&("get".to_string(), "stripeaccounts".to_string()))
            .is_some_and(|n| *n >= 1),
        "{counts:?}"
    );
    // Nor is Stripe called: the account's health check is not due within its interval.
    let after: Vec<String> = env.sim.request_log()[stripe_calls..]
        .iter()
        .map(|r| format!("{} {}?{}", r.method, r.path, r.query))
        .collect();
    assert!(
        after.is_empty(),
        "Stripe calls after the restart: {after:?}"
    );
}

/// A fresh listing of every policy (the canary check each interval, the activity-log reader,
/// the account's deletion guard) is read a page at a time: at 10,000 policies one response
/// holding them all was the operator's largest transient.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fresh_listings_of_every_policy_are_read_a_page_at_a_time() {
    use stripe_key_operator::controller::caches::{LIST_PAGE_SIZE, for_each_listed};
    let env = env_without_operator(EnvOptions::default()).await;
    let n = LIST_PAGE_SIZE as usize * 5 / 2;
    for i in 0..n {
        env.api.put(policy(i)).expect("the policy is created");
    }
    env.api.reset_counts();
    let api: kube::Api<StripeKeyPolicy> = kube::Api::all(env.client.clone());
    let mut seen = std::collections::BTreeSet::new();
    for_each_listed(&api, &kube::api::ListParams::default(), |p| {
        assert!(
            seen.insert(p.metadata.name.clone().unwrap()),
            "listed twice"
        );
    })
    .await
    .expect("the listing");
    assert_eq!(seen.len(), n, "every policy listed once");
    let lists = env
        .api
        .request_counts()
        .get(&("list".to_string(), "stripekeypolicies".to_string()))
        .copied()
        .unwrap_or(0);
    assert_eq!(
        lists,
        n.div_ceil(LIST_PAGE_SIZE as usize) as u64,
        "one request per page of {LIST_PAGE_SIZE}"
    );
}
