//! Benchmark (not a test): fairness between two Stripe accounts. Runs the operator as a separate
//! process (`stripe-key-operator run`, default scheduler and breaker settings but a 5 s breaker
//! cooldown) against the Kubernetes API for tests and one simulator serving two test-mode
//! accounts (25 requests/s each).
//!
//! `cargo bench --bench fairness` (release), or quicker to build:
//! `cargo bench --profile dev --bench fairness`. `BENCH_POLICIES` (1000) is the size of the
//! bulk rotation of phase (b); `BENCH_HEALTHY` (100) the policies of phase (a);
//! `BENCH_SLOW_POLICIES` (10) account B's. `BENCH_OPERATOR_LOG=FILE` keeps the operator's logs.
//!
//! - (a) Account B answers every call after 30 s (the simulator's `hang` fault, for B's
//!   `Stripe-Context` only); `BENCH_HEALTHY` new policies on account A: time until all are
//!   Ready, against A's own rate floor (A's Stripe requests / 25 per second). Goal ≤ 1.25×.
//! - (b) B answers again. One incident rotation on B alone (the reference: one reconcile chain
//!   with its Stripe round trips), then a bulk rotation of `BENCH_POLICIES` policies on A with
//!   one incident rotation on B requested right after: B's incident delay against the
//!   reference.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;
use kube::api::{Api, Patch, PatchParams};
use serde_json::{Value, json};
use stripe_key_operator::api::StripeKeyPolicy;
use stripe_key_operator::sandbox::env::{EnvOptions, LocalEnv, OPERATOR_NAMESPACE};
use stripe_key_operator::sim::{FaultKind, FaultSpec};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn policy(ns: &str, name: &str, account: &str) -> Value {
    json!({
        "apiVersion": "stripekeys.io/v1alpha1", "kind": "StripeKeyPolicy",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"accountRef": {"name": account}, "permissions": ["charge_read", "refund_write"],
                 "delivery": {"secret": {"name": format!("{name}-stripe")}},
                 "rotation": {"every": "720h"}}
    })
}

fn is_ready(p: &Value) -> bool {
    p["status"]["conditions"].as_array().is_some_and(|c| {
        c.iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True")
    }) && p["status"]["rotation"].is_null()
}

fn current_key(p: &Value) -> Option<String> {
    p["status"]["currentKey"]["id"].as_str().map(str::to_owned)
}

fn list(env: &LocalEnv, ns: &str) -> Vec<Value> {
    env.api
        .list("stripekeys.io/v1alpha1", "StripeKeyPolicy", Some(ns))
}

async fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    let mut last_report = Instant::now();
    while !done() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        if last_report.elapsed() > Duration::from_secs(10) {
            eprintln!(
                "  {:>5.0}s: waiting for {what}",
                start.elapsed().as_secs_f64()
            );
            last_report = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    start.elapsed()
}

async fn annotate(env: &LocalEnv, ns: &str, name: &str, value: &str, incident: bool) {
    let mut annotations = json!({"stripekeys.io/rotate": value});
    if incident {
        annotations["stripekeys.io/rotate-reason"] = json!("incident");
    }
    Api::<StripeKeyPolicy>::namespaced(env.client.clone(), ns)
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": annotations}})),
        )
        .await
        .unwrap();
}

/// Requests an incident rotation of `ns/name` and waits until its new key is in place.
async fn incident(env: &LocalEnv, ns: &str, name: &str, value: &str) -> Duration {
    let find = || {
        list(env, ns)
            .into_iter()
            .find(|p| p["metadata"]["name"] == name)
            .unwrap()
    };
    let before = current_key(&find());
    let start = Instant::now();
    annotate(env, ns, name, value, true).await;
    wait_until("the incident rotation", Duration::from_secs(900), || {
        let p = find();
        let ready = p["status"]["conditions"].as_array().is_some_and(|c| {
            c.iter()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        });
        current_key(&p).is_some() && current_key(&p) != before && ready
    })
    .await;
    start.elapsed()
}

fn main() {
    let bulk = env_usize("BENCH_POLICIES", 1000);
    let healthy = env_usize("BENCH_HEALTHY", 100).min(bulk);
    let slow = env_usize("BENCH_SLOW_POLICIES", 10).max(2);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let env = LocalEnv::start(EnvOptions {
            extra_sim_accounts: 1,
            sim_hang: Duration::from_secs(30),
            ..EnvOptions::default()
        })
        .await
        .expect("environment starts");
        let ids = env.sim_account_ids();
        let (a_ctx, b_ctx) = (ids[0].clone(), ids[1].clone());
        for (name, ns, ctx) in [("fast", "team-a", &a_ctx), ("slow", "team-b", &b_ctx)] {
            let mut account =
                env.account_manifest(name, json!({"matchLabels": {"bench-account": name}}));
            account["spec"]["context"] = json!(ctx);
            account["spec"]["requestsPerSecond"] = json!(25);
            env.apply_json(&account).await.unwrap();
            env.apply_json(&json!({"apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": ns, "labels": {"bench-account": name}}}))
                .await
                .unwrap();
        }
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = dir.path().join("kubeconfig");
        std::fs::write(&kubeconfig, env.api.kubeconfig_yaml()).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut operator = Command::new(env!("CARGO_BIN_EXE_stripe-key-operator"))
            .args(["run", "--store", "memory", "--audit-log", "off", "--leader-elect", "false"])
            .args(["--http-addr", &format!("127.0.0.1:{port}"), "--pod-name", "bench"])
            .args(["--allow-loopback-api", "true", "--circuit-breaker-cooldown", "5s"])
            .env("KUBECONFIG", &kubeconfig)
            .env("POD_NAMESPACE", OPERATOR_NAMESPACE)
            .env("RUST_LOG", std::env::var("BENCH_OPERATOR_RUST_LOG").unwrap_or_else(|_| "error".into()))
            .stdout(Stdio::null())
            .stderr(match std::env::var_os("BENCH_OPERATOR_LOG") {
                Some(path) => Stdio::from(std::fs::File::create(path).expect("the operator log file")),
                None => Stdio::null(),
            })
            .spawn()
            .expect("the operator starts");
        tokio::time::sleep(Duration::from_secs(1)).await;
        let env_ref = &env;

        // (a) B hangs; A gets `healthy` new policies.
        let hang = env.sim.inject_fault_for(&b_ctx, FaultSpec::ratio(1.0, FaultKind::Hang));
        for i in 0..slow {
            env.apply_json(&policy("team-b", &format!("slow-{i}"), "slow")).await.unwrap();
        }
        // B's reconciles hang at Stripe before A's policies arrive.
        wait_until("B's first call", Duration::from_secs(60), || {
            env.sim.request_log().iter().any(|r| r.context.as_deref() == Some(b_ctx.as_str()))
        })
        .await;
        let start = Instant::now();
        futures::stream::iter(0..healthy)
            .map(|i| async move {
                env_ref.apply_json(&policy("team-a", &format!("svc-{i}"), "fast")).await.unwrap();
            })
            .buffer_unordered(32)
            .collect::<Vec<_>>()
            .await;
        wait_until("A's policies to be Ready", Duration::from_secs(900), || {
            let ps = list(&env, "team-a");
            ps.len() == healthy && ps.iter().all(is_ready)
        })
        .await;
        let elapsed_a = start.elapsed();
        let log = env.sim.request_log();
        let a_requests = log.iter().filter(|r| r.context.as_deref() == Some(a_ctx.as_str())).count();
        let b_calls = log.iter().filter(|r| r.context.as_deref() == Some(b_ctx.as_str())).count();
        let b_ready = list(&env, "team-b").iter().filter(|p| is_ready(p)).count();
        let floor_a = Duration::from_secs_f64(a_requests.max(healthy) as f64 / 25.0);
        println!("(a) account B hangs 30 s per call ({slow} policies, {b_calls} calls reached the simulator, {b_ready} Ready)");
        println!(
            "(a) {healthy} new policies on A Ready after {:.1}s; A's floor at 25 requests/s: {:.1}s ({a_requests} requests); ratio {:.2} (goal <= 1.25)",
            elapsed_a.as_secs_f64(),
            floor_a.as_secs_f64(),
            elapsed_a.as_secs_f64() / floor_a.as_secs_f64()
        );

        // (b) B answers again: its breaker's next probe closes it, its policies are minted.
        env.sim.remove_fault(hang);
        let recovered = wait_until("B's policies to be Ready", Duration::from_secs(900), || {
            let ps = list(&env, "team-b");
            ps.len() == slow && ps.iter().all(is_ready)
        })
        .await;
        println!("(b) B recovered: its {slow} policies Ready {:.1}s after its fault was cleared", recovered.as_secs_f64());
        // The rest of the bulk on A.
        futures::stream::iter(healthy..bulk)
            .map(|i| async move {
                env_ref.apply_json(&policy("team-a", &format!("svc-{i}"), "fast")).await.unwrap();
            })
            .buffer_unordered(32)
            .collect::<Vec<_>>()
            .await;
        wait_until("A's bulk to be Ready", Duration::from_secs(1800), || {
            let ps = list(&env, "team-a");
            ps.len() == bulk && ps.iter().all(is_ready)
        })
        .await;
        let reference = incident(&env, "team-b", "slow-0", "incident-alone").await;
        println!("(b) reference: an incident rotation on B with A idle took {:.2}s", reference.as_secs_f64());

        let keys_before: Vec<Option<String>> = list(&env, "team-a").iter().map(current_key).collect();
        let bulk_start = Instant::now();
        futures::stream::iter(0..bulk)
            .map(|i| async move {
                annotate(env_ref, "team-a", &format!("svc-{i}"), "bulk-1", false).await;
            })
            .buffer_unordered(32)
            .collect::<Vec<_>>()
            .await;
        let delay = incident(&env, "team-b", "slow-1", "incident-during-bulk").await;
        let a_rotated_then = list(&env, "team-a")
            .iter()
            .filter(|p| !keys_before.contains(&current_key(p)))
            .count();
        wait_until("A's bulk rotation", Duration::from_secs(1800), || {
            list(&env, "team-a").iter().filter(|p| !keys_before.contains(&current_key(p))).count() == bulk
        })
        .await;
        let bulk_elapsed = bulk_start.elapsed();
        println!(
            "(b) bulk rotation of {bulk} policies on A: new keys in place after {:.1}s (floor {:.1}s at 25 requests/s for the mints)",
            bulk_elapsed.as_secs_f64(),
            bulk as f64 / 25.0
        );
        println!(
            "(b) incident rotation on B during A's bulk: {:.2}s (reference {:.2}s, +{:.2}s; {a_rotated_then} of A's {bulk} had rotated by then)",
            delay.as_secs_f64(),
            reference.as_secs_f64(),
            delay.as_secs_f64() - reference.as_secs_f64()
        );
        let _ = operator.kill();
        let _ = operator.wait();
    });
}
