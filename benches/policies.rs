//! Benchmark (not a test): N StripeKeyPolicies in M namespaces created at once against the Stripe
//! simulator in test mode. Runs the operator as a separate process (`stripe-key-operator run`)
//! against the Kubernetes API for tests, so its peak RSS and CPU time are its own.
//!
//! `cargo bench --bench policies` (release), or quicker to build:
//! `cargo bench --profile dev --bench policies`. `BENCH_POLICIES` (1000) and `BENCH_NAMESPACES`
//! (50) change the size; `BENCH_STRIPE_RPS` (25, at most 100) is the account's request rate and
//! the simulator's limit: raise it (`BENCH_POLICIES=10000 BENCH_STRIPE_RPS=100`) so that the
//! operator, not Stripe, is the bottleneck. `BENCH_OPERATOR_LOG=FILE` keeps the operator's logs,
//! at the level of `BENCH_OPERATOR_RUST_LOG` (default `error`). `BENCH_READY_TIMEOUT` (seconds,
//! default 900 + one per ten policies) bounds the wait for all Ready; the progress lines on
//! stderr every 10 s give the rate curve of a run that does not finish.
//!
//! Reports: time until every policy is Ready, the floor set by Stripe's rate limit (every mint
//! is one create, whose answer proves its scopes; only the account's first key is also probed
//! live, and the account controller checks the account once), Stripe requests and 429s, reconcile
//! failures caused by a 429, the operator's peak RSS (VmHWM) and CPU seconds per reconcile
//! (`/proc/<pid>/stat` over its `reconciliations_total`); Kubernetes API requests per mint and per
//! quiet reconcile (a guardrail that changes nothing wakes every policy), counted by the
//! Kubernetes API for tests; and a restart with every policy existing: time until each was
//! reconciled once, and the writes it made (goal: none), taken once the operator has read its
//! Stripe activity log past the mints. After printing every figure it asserts that every policy
//! became Ready and that the restart and the quiet reconciles wrote nothing. Memory: the
//! operator's peak RSS idle (`BENCH_POLICIES=0` for the idle figure alone), after the mints and
//! after the restart, where it is (binary code and data, glibc's heaps and arenas, thread stacks,
//! libraries: from `/proc/<pid>/smaps`), and its RSS per policy: the growth between a restart
//! with every policy and one with half of them, divided by the difference.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

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

/// The resident set of `pid` now (`VmRSS`), in KiB.
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Where the resident memory of `pid` is, from `/proc/<pid>/smaps`, in KiB per kind of mapping:
/// the operator binary's code and its read-only data (file pages, plus the relocated
/// `.data.rel.ro`), glibc's main heap, the per-thread malloc arenas (anonymous mappings aligned
/// to their 64 MiB reservation), thread stacks (anonymous mappings right after a guard page),
/// other anonymous mappings (large allocations), and shared libraries.
fn rss_breakdown(pid: u32) -> Vec<(&'static str, u64)> {
    const ARENA: u64 = 64 << 20;
    let Ok(smaps) = std::fs::read_to_string(format!("/proc/{pid}/smaps")) else {
        return Vec::new();
    };
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
    let mut sums: Vec<(&'static str, u64)> = [
        "binary code",
        "binary data",
        "main heap",
        "thread arenas",
        "thread stacks",
        "other anonymous",
        "libraries",
    ]
    .iter()
    .map(|k| (*k, 0))
    .collect();
    // (kind of the current mapping, end of the previous mapping if it was a guard page)
    let mut current = "";
    let mut guard_end: Option<u64> = None;
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let first = fields.next().unwrap_or_default();
        if let Some((start, end)) = first.split_once('-')
            && let (Ok(start), Ok(end)) =
                (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16))
        {
            let perms = fields.next().unwrap_or_default();
            let path = fields.nth(3).unwrap_or_default();
            current = if !path.is_empty() && std::path::Path::new(path) == exe {
                if perms.contains('x') {
                    "binary code"
                } else {
                    "binary data"
                }
            } else if path == "[heap]" {
                "main heap"
            } else if path.starts_with('/') {
                "libraries"
            } else if path.is_empty() && start % ARENA == 0 {
                "thread arenas"
            } else if path.is_empty() && guard_end == Some(start) {
                "thread stacks"
            } else if path.is_empty() {
                "other anonymous"
            } else {
                ""
            };
            guard_end = perms.starts_with("---").then_some(end);
            continue;
        }
        if first == "Rss:"
            && let Some(kib) = fields.next().and_then(|v| v.parse::<u64>().ok())
            && let Some(sum) = sums.iter_mut().find(|(k, _)| *k == current)
        {
            sum.1 += kib;
        }
    }
    sums
}

/// [`rss_breakdown`] as one line, in MiB.
fn breakdown_line(pid: u32) -> String {
    rss_breakdown(pid)
        .into_iter()
        .map(|(k, v)| format!("{k} {:.1}", v as f64 / 1024.0))
        .collect::<Vec<_>>()
        .join(", ")
}

/// CPU seconds (user + system) the process `pid` used so far.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / clock_ticks())
}

fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// The operator's `reconciliations_total` of the StripeKeyPolicy controller.
async fn reconciles(port: u16) -> Option<u64> {
    let text = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find(|l| {
            l.starts_with("stripe_key_operator_reconciliations_total{")
                && l.contains("controller=\"stripekeypolicy\"")
        })?
        .rsplit(' ')
        .next()?
        .parse::<f64>()
        .ok()
        .map(|v| v as u64)
}

type Counts = std::collections::BTreeMap<(String, String), u64>;

/// Requests besides watch and list starts (the reflectors'), and the writes among them.
fn charged(counts: &Counts) -> (u64, u64) {
    let mut all = 0;
    let mut writes = 0;
    for ((verb, _), n) in counts {
        if matches!(verb.as_str(), "watch" | "list") {
            continue;
        }
        all += n;
        if matches!(
            verb.as_str(),
            "create" | "update" | "patch" | "delete" | "deletecollection"
        ) {
            writes += n;
        }
    }
    (all, writes)
}

fn print_counts(counts: &Counts) {
    for ((verb, resource), n) in counts {
        println!("    {verb:<8} {resource:<36} {n:>8}");
    }
}

/// Where the operator keeps its bundles during the bench: a real OpenBao dev server (a child
/// process, in memory, killed on drop) when `bao` is found (`$BAO_BIN`, or on `PATH`: `make
/// tools` links it into .ci/cache/bin), else the operator's in-process `--store memory`, whose
/// copies of every bundle then count in the operator's RSS (about 2.5 KiB per policy) and are
/// lost at each restart, unlike production's Vault.
enum Store {
    Memory,
    OpenBao {
        child: std::process::Child,
        addr: String,
        token: String,
    },
}

impl Store {
    fn start() -> Self {
        let bin = std::env::var_os("BAO_BIN")
            .map(std::path::PathBuf::from)
            .or_else(|| {
                std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
                    .map(|d| d.join("bao"))
                    .find(|c| c.is_file())
            });
        let Some(bin) = bin.filter(|b| b.is_file()) else {
            println!("store: the operator's in-memory store (no `bao` found: `make tools`)");
            return Self::Memory;
        };
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let token = format!("root-bench-{}", std::process::id());
        let child = Command::new(&bin)
            .args([
                "server",
                "-dev",
                &format!("-dev-listen-address=127.0.0.1:{port}"),
                &format!("-dev-root-token-id={token}"),
                "-dev-no-store-token",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("bao starts");
        let addr = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "OpenBao did not listen within 30 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        println!("store: OpenBao dev server ({})", bin.display());
        Self::OpenBao { child, addr, token }
    }

    fn args(&self, cmd: &mut Command) {
        match self {
            Self::Memory => {
                cmd.args(["--store", "memory"]);
            }
            Self::OpenBao { addr, token, .. } => {
                cmd.args([
                    "--store",
                    "vault",
                    "--vault-auth",
                    "token",
                    "--vault-addr",
                    addr,
                ])
                .env("VAULT_TOKEN", token);
            }
        }
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        if let Self::OpenBao { child, .. } = self {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn spawn_operator(kubeconfig: &std::path::Path, port: u16, store: &Store) -> std::process::Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_stripe-key-operator"));
    cmd.arg("run");
    store.args(&mut cmd);
    match std::env::var("MALLOC_MMAP_THRESHOLD_") {
        Ok(v) if v.is_empty() => cmd.env_remove("MALLOC_MMAP_THRESHOLD_"),
        Ok(v) => cmd.env("MALLOC_MMAP_THRESHOLD_", v),
        Err(_) => cmd.env("MALLOC_MMAP_THRESHOLD_", "131072"),
    };
    cmd.args(["--audit-log", "off", "--leader-elect", "false"])
        .args([
            "--http-addr",
            &format!("127.0.0.1:{port}"),
            "--pod-name",
            "bench",
        ])
        // The simulator listens on loopback: trust it as a local sandbox does.
        .args(["--allow-loopback-api", "true"])
        .env("KUBECONFIG", kubeconfig)
        .env("POD_NAMESPACE", OPERATOR_NAMESPACE)
        // As the image and the chart run it: one glibc malloc arena, and allocations of 128 KiB
        // and more in their own mappings. Either set in the bench's environment measures
        // another value (`MALLOC_ARENA_MAX=0`: glibc's default arenas; an empty
        // `MALLOC_MMAP_THRESHOLD_=`: glibc's dynamic threshold).
        .env(
            "MALLOC_ARENA_MAX",
            std::env::var("MALLOC_ARENA_MAX").unwrap_or_else(|_| "1".into()),
        )
        .env(
            "RUST_LOG",
            std::env::var("BENCH_OPERATOR_RUST_LOG").unwrap_or_else(|_| "error".into()),
        )
        .stdout(Stdio::null())
        .stderr(match std::env::var_os("BENCH_OPERATOR_LOG") {
            Some(path) => Stdio::from(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .expect("the operator log file"),
            ),
            None => Stdio::null(),
        })
        .spawn()
        .expect("the operator starts")
}

/// Stops the operator as Kubernetes does (SIGTERM: it finishes and exits; with
/// `--features heap-profile` it writes `dhat-heap.json` then), killing it after 30 s.
fn stop(operator: &mut std::process::Child) {
    let _ = Command::new("kill").arg(operator.id().to_string()).status();
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = operator.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = operator.kill();
    let _ = operator.wait();
}

fn main() {
    let policies = env_usize("BENCH_POLICIES", 1000);
    let namespaces = env_usize("BENCH_NAMESPACES", 50);
    let rps = env_usize("BENCH_STRIPE_RPS", 25).clamp(1, 100);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let env = LocalEnv::start(EnvOptions {
            sim_rate_limit_test: rps as u32,
            ..EnvOptions::default()
        })
        .await
        .expect("environment starts");
        let mut account = env.account_manifest("bench", json!({"matchLabels": {"bench": "yes"}}));
        account["spec"]["requestsPerSecond"] = json!(rps);
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
        let store = Store::start();
        let mut operator = spawn_operator(&kubeconfig, port, &store);
        // Startup (CRD checks, the caches' first listings) is not the mints' cost.
        tokio::time::sleep(Duration::from_secs(1)).await;
        env.api.settle(Duration::from_secs(1), Duration::from_secs(30)).await;
        let idle_rss = peak_rss_kib(operator.id());
        let idle_breakdown = breakdown_line(operator.id());
        env.api.reset_counts();
        let cpu_before = cpu_seconds(operator.id()).unwrap_or(0.0);
        let reconciles_before = reconciles(port).await.unwrap_or(0);

        let start = Instant::now();
        // Created at once, straight into the API server's store (the bench's own writes are not
        // counted as the operator's requests; watch events go out as for any write).
        for i in 0..policies {
            env.api
                .put(json!({
                    "apiVersion": "stripekeys.io/v1alpha1", "kind": "StripeKeyPolicy",
                    "metadata": {"name": format!("svc-{i}"), "namespace": format!("team-{}", i % namespaces)},
                    "spec": {"accountRef": {"name": "bench"}, "permissions": ["charge_read", "refund_write"],
                             "delivery": {"secret": {"name": format!("svc-{i}-stripe")}},
                             "rotation": {"every": "720h"}}
                }))
                .unwrap();
        }
        let applied = start.elapsed();
        // Bounded: `BENCH_READY_TIMEOUT` seconds (default 900 + one per ten policies).
        let ready_timeout = env_usize("BENCH_READY_TIMEOUT", 900 + policies / 10) as u64;
        let deadline = Instant::now() + Duration::from_secs(ready_timeout);
        let mut last_report = Instant::now();
        let ready = loop {
            // Counted in place: copying 10,000 objects out of the store five times a second
            // would load the API server the operator is measured through.
            let ready = env.api.count("stripekeys.io/v1alpha1", "StripeKeyPolicy", None, |p| {
                p["status"]["conditions"]
                    .as_array()
                    .is_some_and(|c| c.iter().any(|c| c["type"] == "Ready" && c["status"] == "True"))
                    && p["status"]["rotation"].is_null()
            });
            if ready == policies || Instant::now() > deadline {
                break ready;
            }
            if last_report.elapsed() > Duration::from_secs(10) {
                eprintln!("  {:>5.0}s: {ready}/{policies} Ready", start.elapsed().as_secs_f64());
                last_report = Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        let elapsed = start.elapsed();
        // The reconciles the last status writes trigger belong to the mints too.
        env.api.settle(Duration::from_secs(3), Duration::from_secs(60)).await;
        let rss = peak_rss_kib(operator.id());
        let mint_breakdown = breakdown_line(operator.id());
        let cpu_mint = cpu_seconds(operator.id()).unwrap_or(0.0) - cpu_before;
        let reconciles_mint = reconciles(port).await.unwrap_or(0).saturating_sub(reconciles_before);
        let mint_counts = env.api.request_counts();
        let (mint_requests, _) = charged(&mint_counts);

        // Quiet reconciles: a guardrail that refuses nothing these policies ask for wakes every
        // one of them; nothing changes, so nothing should be written.
        env.api.reset_counts();
        let cpu_before = cpu_seconds(operator.id()).unwrap_or(0.0);
        let reconciles_before = reconciles(port).await.unwrap_or(0);
        env.api
            .put(json!({"apiVersion": "stripekeys.io/v1alpha1", "kind": "StripeGuardrail",
                "metadata": {"name": "bench-no-payouts"},
                "spec": {"namespaceSelector": {}, "deniedPermissions": ["payout_*"]}}))
            .unwrap();
        let quiet_deadline = Instant::now() + Duration::from_secs(120 + policies as u64 / 20);
        while reconciles(port).await.unwrap_or(0).saturating_sub(reconciles_before) < policies as u64
            && Instant::now() < quiet_deadline
        {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        env.api.settle(Duration::from_secs(3), Duration::from_secs(60)).await;
        let quiet_reconciles = reconciles(port).await.unwrap_or(0).saturating_sub(reconciles_before);
        let cpu_quiet = cpu_seconds(operator.id()).unwrap_or(0.0) - cpu_before;
        let quiet_counts = env.api.request_counts();
        let (quiet_requests, quiet_writes) = charged(&quiet_counts);
        let rss_after_quiet = peak_rss_kib(operator.id());

        // Settled means the operator has also read its Stripe activity log past the mints (every
        // `--activity-log-interval`, 1m): a restart before that reads them first and records the
        // cursor, a write that is news, not a restart's cost. Bounded.
        let newest = env
            .sim
            .activity_log(&env.account_id)
            .last()
            .map(|e| e.id.clone());
        let read_deadline = Instant::now() + Duration::from_secs(90);
        let caught_up = |env: &LocalEnv| {
            env.api
                .get("stripekeys.io/v1alpha1", "StripeAccount", None, "bench")
                .is_some_and(|a| {
                    a["status"]["activityLog"]["lastEntryId"].as_str() == newest.as_deref()
                })
        };
        while newest.is_some() && !caught_up(&env) && Instant::now() < read_deadline {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        env.api.settle(Duration::from_secs(3), Duration::from_secs(60)).await;
        let activity_caught_up = newest.is_none() || caught_up(&env);

        let account_before = env.api.get("stripekeys.io/v1alpha1", "StripeAccount", None, "bench");

        // Restart with every policy existing: each is reconciled once, and nothing is written.
        stop(&mut operator);
        env.api.reset_counts();
        let restart = Instant::now();
        let mut operator = spawn_operator(&kubeconfig, port, &store);
        let restart_deadline = Instant::now() + Duration::from_secs(300 + policies as u64 / 10);
        let mut restarted = 0;
        while Instant::now() < restart_deadline {
            restarted = reconciles(port).await.unwrap_or(0);
            if restarted >= policies as u64 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let restart_elapsed = restart.elapsed();
        env.api.settle(Duration::from_secs(3), Duration::from_secs(60)).await;
        let restart_counts = env.api.request_counts();
        let (restart_requests, restart_writes) = charged(&restart_counts);
        let restart_rss = peak_rss_kib(operator.id());
        let restart_now = rss_kib(operator.id());
        let restart_breakdown = breakdown_line(operator.id());
        // Read before the half-size restart below changes the account (its keys under management).
        let account_after = env.api.get("stripekeys.io/v1alpha1", "StripeAccount", None, "bench");
        stop(&mut operator);

        // Memory per policy: a second restart with half the policies (the others removed while
        // no operator runs, their finalizers dropped first), so the growth between the two sizes
        // is what each policy costs the operator, without the start-up and bulk-mint transients.
        let half = policies / 2;
        for i in half..policies {
            let (name, namespace) = (format!("svc-{i}"), format!("team-{}", i % namespaces));
            if let Some(mut p) = env.api.get("stripekeys.io/v1alpha1", "StripeKeyPolicy", Some(&namespace), &name) {
                p["metadata"]["finalizers"] = json!([]);
                env.api.put(p).unwrap();
                let _ = env.api.delete("stripekeys.io/v1alpha1", "StripeKeyPolicy", Some(&namespace), &name);
            }
        }
        env.api.settle(Duration::from_secs(1), Duration::from_secs(30)).await;
        let mut operator = spawn_operator(&kubeconfig, port, &store);
        let half_deadline = Instant::now() + Duration::from_secs(300 + policies as u64 / 10);
        while Instant::now() < half_deadline && reconciles(port).await.unwrap_or(0) < half as u64 {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        env.api.settle(Duration::from_secs(3), Duration::from_secs(60)).await;
        let half_rss = peak_rss_kib(operator.id());
        let half_now = rss_kib(operator.id());
        stop(&mut operator);

        let log = env.sim.request_log();
        let throttled = log.iter().filter(|r| r.status == Some(429)).count();
        let rate_failures = env
            .api
            .list("events.k8s.io/v1", "Event", None)
            .iter()
            .filter(|e| e["reason"] == "StripeRateLimited")
            .count();
        let requests = log.len();
        let floor = Duration::from_secs_f64(requests.max(policies) as f64 / rps as f64);
        println!("policies: {policies} in {namespaces} namespaces (created in {:.1}s)", applied.as_secs_f64());
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
            "floor at {rps} requests/s: {:.1}s for these requests ({:.1}s for the mints alone); ratio {:.2}",
            floor.as_secs_f64(),
            policies as f64 / rps as f64,
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
        let per = |n: f64, d: u64| if d == 0 { f64::NAN } else { n / d as f64 };
        println!(
            "reconciles while minting: {reconciles_mint}; CPU {cpu_mint:.1}s = {:.2} ms per reconcile",
            per(cpu_mint * 1000.0, reconciles_mint)
        );
        println!(
            "Kubernetes API requests while minting (watch/list starts not charged): {mint_requests} = {:.2} per mint",
            per(mint_requests as f64, policies as u64)
        );
        print_counts(&mint_counts);
        println!(
            "quiet reconciles (a guardrail that changes nothing): {quiet_reconciles}; {quiet_requests} requests = {:.2} per reconcile, {quiet_writes} writes; CPU {cpu_quiet:.1}s = {:.2} ms per reconcile",
            per(quiet_requests as f64, quiet_reconciles),
            per(cpu_quiet * 1000.0, quiet_reconciles)
        );
        print_counts(&quiet_counts);
        println!(
            "restart with {policies} policies: {restarted} reconciled after {:.1}s; {restart_requests} requests, {restart_writes} writes (goal 0)",
            restart_elapsed.as_secs_f64()
        );
        println!("activity log read past the mints before the restart: {activity_caught_up}");
        let status_of = |a: &Option<serde_json::Value>| {
            a.as_ref()
                .and_then(|a| a["status"].as_object().cloned())
                .unwrap_or_default()
        };
        let (before, after) = (status_of(&account_before), status_of(&account_after));
        let changed: std::collections::BTreeSet<&String> = before
            .keys()
            .chain(after.keys())
            .filter(|k| before.get(*k) != after.get(*k))
            .collect();
        println!("StripeAccount status fields the restart changed: {changed:?}");
        print_counts(&restart_counts);
        let mib = |k: Option<u64>| k.map(|k| format!("{:.1} MiB", k as f64 / 1024.0)).unwrap_or_else(|| "unavailable".into());
        println!("operator peak RSS: idle {}, after the mints {}, after the quiet reconciles {}", mib(idle_rss), mib(rss), mib(rss_after_quiet));
        println!("operator peak RSS after the restart: {}", mib(restart_rss));
        println!("operator RSS idle (MiB): {idle_breakdown}");
        println!("operator RSS after the mints (MiB): {mint_breakdown}");
        println!("operator RSS after the restart (MiB): {restart_breakdown}");
        let per_policy = |a: Option<u64>, b: Option<u64>| match (a, b) {
            (Some(a), Some(b)) if policies > half => {
                format!("{:.1} KiB", (a as f64 - b as f64) / (policies - half) as f64)
            }
            _ => "unavailable".into(),
        };
        println!(
            "operator RSS per policy (restarts with {policies} and {half} policies): peak {} ({} and {}), resident {} ({} and {})",
            per_policy(restart_rss, half_rss),
            mib(restart_rss),
            mib(half_rss),
            per_policy(restart_now, half_now),
            mib(restart_now),
            mib(half_now),
        );
        // The goals this bench holds the operator to (after printing every figure).
        assert_eq!(ready, policies, "not every policy became Ready");
        assert_eq!(restart_writes, 0, "a restart over settled policies wrote (goal: nothing)");
        assert_eq!(quiet_writes, 0, "a quiet reconcile wrote (goal: nothing)");
    });
}
