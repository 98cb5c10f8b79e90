//! Benchmark (not a test): N StripeKeyPolicies in M namespaces applied at once against the Stripe
//! simulator in test mode (25 requests/s). Runs the operator as a separate process
//! (`stripe-key-operator run`) against the Kubernetes API for tests, so its peak RSS is its own.
//!
//! `cargo bench --bench policies` (release), or quicker to build:
//! `cargo bench --profile dev --bench policies`. `BENCH_POLICIES` (1000) and `BENCH_NAMESPACES`
//! (50) change the size. `BENCH_OPERATOR_LOG=FILE` keeps the operator's logs, at the level of
//! `BENCH_OPERATOR_RUST_LOG` (default `error`).
//!
//! Reports: time until every policy is Ready, the floor set by Stripe's rate limit (every mint
//! is one create, whose answer proves its scopes; only the account's first key is also probed
//! live, and the account controller checks the account once), Stripe requests and 429s, reconcile failures
//! caused by a 429, and the operator's peak RSS (VmHWM).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::json;
use stripe_key_operator::sandbox::env::{EnvOptions, LocalEnv, OPERATOR_NAMESPACE};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn main() {
    let policies = env_usize("BENCH_POLICIES", 1000);
    let namespaces = env_usize("BENCH_NAMESPACES", 50);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let env = LocalEnv::start(EnvOptions::default()).await.expect("environment starts");
        let mut account = env.account_manifest("bench", json!({"matchLabels": {"bench": "yes"}}));
        account["spec"]["requestsPerSecond"] = json!(25);
        env.apply_json(&account).await.unwrap();
        for n in 0..namespaces {
            env.apply_json(&json!({"apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": format!("team-{n}"), "labels": {"bench": "yes"}}}))
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
            // The simulator listens on loopback: trust it as a local sandbox does.
            .args(["--allow-loopback-api", "true"])
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

        let start = Instant::now();
        // Applied "at once": 32 applies in flight, as `kubectl apply -f dir/` of many files would.
        let env_ref = &env;
        futures::stream::iter(0..policies)
            .map(|i| async move {
                env_ref
                    .apply_json(&json!({
                        "apiVersion": "stripekeys.io/v1alpha1", "kind": "StripeKeyPolicy",
                        "metadata": {"name": format!("svc-{i}"), "namespace": format!("team-{}", i % namespaces)},
                        "spec": {"accountRef": {"name": "bench"}, "permissions": ["charge_read", "refund_write"],
                                 "delivery": {"secret": {"name": format!("svc-{i}-stripe")}},
                                 "rotation": {"every": "720h"}}
                    }))
                    .await
                    .unwrap();
            })
            .buffer_unordered(32)
            .collect::<Vec<_>>()
            .await;
        let applied = start.elapsed();
        let deadline = Instant::now() + Duration::from_secs(900);
        let mut last_report = Instant::now();
        let ready = loop {
            let ready = env
                .api
                .list("stripekeys.io/v1alpha1", "StripeKeyPolicy", None)
                .iter()
                .filter(|p| {
                    p["status"]["conditions"]
                        .as_array()
                        .is_some_and(|c| c.iter().any(|c| c["type"] == "Ready" && c["status"] == "True"))
                        && p["status"]["rotation"].is_null()
                })
                .count();
            if ready == policies || Instant::now() > deadline {
                break ready;
            }
            if last_report.elapsed() > Duration::from_secs(10) {
                eprintln!("  {:>5.0}s: {ready}/{policies} Ready", start.elapsed().as_secs_f64());
                last_report = Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let elapsed = start.elapsed();
        let rss = peak_rss_kib(operator.id());
        let _ = operator.kill();
        let _ = operator.wait();
        let log = env.sim.request_log();
        let throttled = log.iter().filter(|r| r.status == Some(429)).count();
        let rate_failures = env
            .api
            .list("events.k8s.io/v1", "Event", None)
            .iter()
            .filter(|e| e["reason"] == "StripeRateLimited")
            .count();
        let requests = log.len();
        let floor = Duration::from_secs_f64(requests.max(policies) as f64 / 25.0);
        println!("policies: {policies} in {namespaces} namespaces (applied in {:.1}s)", applied.as_secs_f64());
        println!("ready: {ready}/{policies} after {:.1}s", elapsed.as_secs_f64());
        println!(
            "Stripe requests: {requests} ({} mints, {} scope probes, {} account checks, {throttled} answered 429)",
            log.iter().filter(|r| r.method == "POST" && r.path == "/v2/iam/api_keys").count(),
            log.iter().filter(|r| r.path.starts_with("/v1/")).count(),
            log.iter()
                .filter(|r| r.path == "/v2/iam/api_keys" && r.query == "limit=1")
                .count()
        );
        println!(
            "floor at 25 requests/s: {:.1}s for these requests ({:.1}s for the mints alone); ratio {:.2}",
            floor.as_secs_f64(),
            policies as f64 / 25.0,
            elapsed.as_secs_f64() / floor.as_secs_f64()
        );
        println!("reconcile failures caused by a 429: {rate_failures}");
        let mint_posts: Vec<_> = log
            .iter()
            .filter(|r| r.method == "POST" && r.path == "/v2/iam/api_keys")
            .collect();
        let state = env.sim.state();
        let keys: Vec<_> = state.accounts.iter().flat_map(|a| a.api_keys.iter()).collect();
        println!(
            "mint requests: {} answered 200, {} idempotent replays, {} failed or dropped; keys created: {} ({} active, {} expired)",
            mint_posts.iter().filter(|r| r.status == Some(200) && !r.replayed).count(),
            mint_posts.iter().filter(|r| r.replayed).count(),
            mint_posts.iter().filter(|r| r.status != Some(200)).count(),
            keys.len(),
            keys.iter().filter(|k| k.status == "active").count(),
            keys.iter().filter(|k| k.status == "expired").count(),
        );
        match rss {
            Some(kib) => println!("operator peak RSS: {:.1} MiB", kib as f64 / 1024.0),
            None => println!("operator peak RSS: unavailable"),
        }
    });
}
