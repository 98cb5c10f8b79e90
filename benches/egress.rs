//! Benchmark (not a test) of the egress key broker: added latency on loopback with a local
//! upstream (p50 and p99 per request, through the broker minus direct), throughput, and the
//! sidecar's RSS idle and under load. The broker runs as a separate process
//! (`stripe-key-operator egress-proxy`), so its RSS and CPU time are its own; the upstream (a
//! minimal HTTP server answering a small Stripe-like JSON list) and the clients run here.
//!
//! `cargo bench --bench egress` (release). The broker is the slim sidecar binary
//! `stripe-egress-proxy`; `BENCH_EGRESS_BINARY=operator` runs `stripe-key-operator egress-proxy`
//! instead (same code, in the operator's binary). Sizes: `BENCH_EGRESS_REQUESTS` (20000 sequential
//! requests per latency run), `BENCH_EGRESS_SECONDS` (5, the throughput run),
//! `BENCH_EGRESS_CONCURRENCY` (32 client connections). A quick functional check in debug:
//! `BENCH_EGRESS_REQUESTS=200 BENCH_EGRESS_SECONDS=1 cargo bench --profile dev --bench egress`.
//!
//! Throughput per core is requests divided by the broker's CPU seconds (user + system, from
//! `/proc/<pid>/stat`) over the throughput run: the clients and the upstream share the machine,
//! so wall-clock requests per second understates what one broker core does.

use std::io::Write as _;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// User + system CPU seconds of `pid`.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // fields after the command name (which is in parentheses and may hold spaces)
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    // USER_HZ is 100 on Linux
    Some((utime + stime) / 100.0)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

const BODY: &str = r#"{"object":"list","data":[],"has_more":false,"url":"/v1/charges"}"#;

async fn start_upstream() -> SocketAddr {
    let app = axum::Router::new().fallback(|| async {
        (
            [
                ("content-type", "application/json"),
                ("request-id", "req_bench"),
            ],
            BODY,
        )
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    addr
}

/// Sequential requests over one keep-alive connection; each latency.
async fn latencies(client: &reqwest::Client, url: &str, token: &str, n: usize) -> Vec<Duration> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let started = Instant::now();
        let resp = client.get(url).bearer_auth(token).send().await.unwrap();
        assert!(resp.status().is_success(), "{}", resp.status());
        let _ = resp.bytes().await.unwrap();
        out.push(started.elapsed());
    }
    out.sort_unstable();
    out
}

fn main() {
    let requests = env_usize("BENCH_EGRESS_REQUESTS", 20_000);
    let seconds = env_usize("BENCH_EGRESS_SECONDS", 5);
    let concurrency = env_usize("BENCH_EGRESS_CONCURRENCY", 32);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run(requests, seconds, concurrency));
}

async fn run(requests: usize, seconds: usize, concurrency: usize) {
    let upstream = start_upstream().await;
    let key_dir = tempfile::tempdir().unwrap();
    let placeholder = stripe_key_operator::egress::proxy::placeholder_for("bench");
    for (name, value) in [
        (
            "STRIPE_BROKER_API_KEY",
            "rk_test_51BenchmarkKey000000000000000000",
        ),
        ("STRIPE_BROKER_PERMISSIONS", "charge_read"),
        ("STRIPE_API_KEY", placeholder.as_str()),
    ] {
        std::fs::write(key_dir.path().join(name), value).unwrap();
    }
    let (port, admin) = (free_port(), free_port());
    let operator = std::env::var("BENCH_EGRESS_BINARY").is_ok_and(|b| b == "operator");
    let mut command = if operator {
        let mut c = Command::new(env!("CARGO_BIN_EXE_stripe-key-operator"));
        c.arg("egress-proxy");
        c
    } else {
        Command::new(env!("CARGO_BIN_EXE_stripe-egress-proxy"))
    };
    let mut child = command
        .arg("--key-dir")
        .arg(key_dir.path())
        .args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--admin-addr",
            &format!("127.0.0.1:{admin}"),
            "--upstream",
            &format!("http://{upstream}"),
            "--allow-loopback-upstream",
            "--max-concurrent-requests",
            &concurrency.max(1).to_string(),
        ])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("the stripe-key-operator binary runs");
    let pid = child.id();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ready = reqwest::get(format!("http://127.0.0.1:{admin}/readyz")).await;
        if ready.is_ok_and(|r| r.status().is_success()) {
            break;
        }
        assert!(Instant::now() < deadline, "the broker never became ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let idle_rss = proc_status_kib(pid, "VmRSS:").unwrap_or(0);
    let idle_split = rss_split(pid);

    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let direct_url = format!("http://{upstream}/v1/charges");
    let broker_url = format!("http://127.0.0.1:{port}/v1/charges");
    // warm up both paths (connections, allocator)
    let _ = latencies(&client, &direct_url, &placeholder, 200.min(requests)).await;
    let _ = latencies(&client, &broker_url, &placeholder, 200.min(requests)).await;
    let direct = latencies(&client, &direct_url, &placeholder, requests).await;
    let brokered = latencies(&client, &broker_url, &placeholder, requests).await;

    // throughput: `concurrency` clients for `seconds`
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let cpu_before = cpu_seconds(pid).unwrap_or(0.0);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (stop, done, failed) = (stop.clone(), done.clone(), failed.clone());
        let (url, token) = (broker_url.clone(), placeholder.clone());
        let client = reqwest::Client::builder().no_proxy().build().unwrap();
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match client.get(&url).bearer_auth(&token).send().await {
                    Ok(r) if r.status().is_success() => {
                        let _ = r.bytes().await;
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(seconds as u64)).await;
    let load_rss = proc_status_kib(pid, "VmRSS:").unwrap_or(0);
    let load_split = rss_split(pid);
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    let wall = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds(pid).unwrap_or(0.0) - cpu_before;
    let peak_rss = proc_status_kib(pid, "VmHWM:").unwrap_or(0);
    let _ = child.kill();
    let _ = child.wait();

    let done = done.load(Ordering::Relaxed);
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let added = |p: f64| ms(percentile(&brokered, p)) - ms(percentile(&direct, p));
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "egress broker ({}), loopback, local upstream",
        if operator {
            "stripe-key-operator egress-proxy"
        } else {
            "stripe-egress-proxy"
        }
    );
    let _ = writeln!(
        out,
        "latency ({requests} sequential requests): direct p50 {:.3} ms p99 {:.3} ms; brokered p50 {:.3} ms p99 {:.3} ms",
        ms(percentile(&direct, 0.5)),
        ms(percentile(&direct, 0.99)),
        ms(percentile(&brokered, 0.5)),
        ms(percentile(&brokered, 0.99)),
    );
    let _ = writeln!(
        out,
        "added latency: p50 {:.3} ms, p99 {:.3} ms (goal p99 < 1 ms)",
        added(0.5),
        added(0.99)
    );
    let _ = writeln!(
        out,
        "throughput ({concurrency} connections, {wall:.1} s): {:.0} requests/s wall clock, {} failed; broker CPU {cpu:.2} s = {:.0} requests per CPU-second (goal >= 20000)",
        done as f64 / wall,
        failed.load(Ordering::Relaxed),
        if cpu > 0.0 { done as f64 / cpu } else { 0.0 },
    );
    let _ = writeln!(
        out,
        "broker RSS: idle {:.1} MiB, under load {:.1} MiB, peak {:.1} MiB (goal <= 16 MiB)",
        idle_rss as f64 / 1024.0,
        load_rss as f64 / 1024.0,
        peak_rss as f64 / 1024.0,
    );
    let _ = writeln!(out, "broker RSS idle: {idle_split}");
    let _ = writeln!(out, "broker RSS under load: {load_split}");
}

/// Where the RSS is: anonymous memory (heap, stacks) and mapped files (the binary's code and
/// read-only data, shared libraries), and the thread count.
fn rss_split(pid: u32) -> String {
    let mib = |field| proc_status_kib(pid, field).unwrap_or(0) as f64 / 1024.0;
    format!(
        "anonymous {:.1} MiB, file-backed {:.1} MiB (the binary's pages), {} threads",
        mib("RssAnon:"),
        mib("RssFile:"),
        proc_status_kib(pid, "Threads:").unwrap_or(0)
    )
}
