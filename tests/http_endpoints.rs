//! `/metrics`, `/healthz` and `/readyz` of the operator process.

use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use stripe_key_operator::http::{self, Health, HealthThresholds};
use stripe_key_operator::metrics::{
    ControllerLabels, ErrorLabels, Metrics, ObjectLabels, StripeCallLabels,
};
use tokio_util::sync::CancellationToken;

fn populated_metrics() -> Metrics {
    let m = Metrics::new();
    let c = ControllerLabels {
        controller: "stripekeypolicy".into(),
    };
    m.reconciliations.get_or_create(&c).inc();
    m.reconcile_duration.get_or_create(&c).observe(0.2);
    m.reconcile_errors
        .get_or_create(&ErrorLabels {
            controller: "stripekeypolicy".into(),
            reason: "StripeRateLimited".into(),
        })
        .inc();
    m.stripe_requests
        .get_or_create(&StripeCallLabels {
            account: "acct_1".into(),
            method: "POST".into(),
            route: "/v2/iam/api_keys".into(),
            code: "200".into(),
        })
        .inc();
    m.key_age_seconds
        .get_or_create(&ObjectLabels {
            kind: "StripeKeyPolicy".into(),
            namespace: "shop".into(),
            name: "checkout".into(),
        })
        .set(42.0);
    m
}

#[test]
fn promtool_accepts_the_metrics_exposition() {
    let text = populated_metrics().encode_prometheus_text();
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is on PATH: run `make test` (it installs it with .ci/install-tools.sh)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool rejected the exposition:\n{}{}\n---\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn endpoints_answer_and_readiness_follows_health() {
    let shutdown = CancellationToken::new();
    let health = Health::default();
    let (addr, task) = http::serve(
        "127.0.0.1:0".parse().unwrap(),
        populated_metrics(),
        health.clone(),
        shutdown.clone(),
    )
    .await
    .unwrap();
    let base = format!("http://{addr}");
    let client = reqwest::Client::new();

    let healthz = client.get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(healthz.status(), 200);
    let readyz = client.get(format!("{base}/readyz")).send().await.unwrap();
    assert_eq!(readyz.status(), 503, "not ready before the controllers run");
    health.set_ready(true);
    let readyz = client.get(format!("{base}/readyz")).send().await.unwrap();
    assert_eq!(readyz.status(), 200);

    let metrics = client
        .get(format!("{base}/metrics"))
        .header("accept", "application/openmetrics-text; version=1.0.0")
        .send()
        .await
        .unwrap();
    assert_eq!(metrics.status(), 200);
    let content_type = metrics.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    assert!(metrics.text().await.unwrap().ends_with("# EOF\n"));

    let metrics = client.get(format!("{base}/metrics")).send().await.unwrap();
    let content_type = metrics.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    let body = metrics.text().await.unwrap();
    assert!(body.contains("stripe_key_operator_stripe_requests_total"));

    shutdown.cancel();
    tokio::time::timeout(std::time::Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap();
}

async fn healthz(client: &reqwest::Client, base: &str) -> (u16, String) {
    let r = client.get(format!("{base}/healthz")).send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

/// Polls `/healthz` until it answers `code` (bounded); returns the body.
async fn wait_healthz(client: &reqwest::Client, base: &str, code: u16, within: Duration) -> String {
    let deadline = std::time::Instant::now() + within;
    loop {
        let (c, body) = healthz(client, base).await;
        if c == code {
            return body;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "/healthz still answers {c} ({body}) instead of {code}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn serve_health(health: Health) -> (String, CancellationToken) {
    let shutdown = CancellationToken::new();
    let (addr, _task) = http::serve(
        "127.0.0.1:0".parse().unwrap(),
        Metrics::new(),
        health,
        shutdown.clone(),
    )
    .await
    .unwrap();
    (format!("http://{addr}"), shutdown)
}

fn short() -> HealthThresholds {
    HealthThresholds {
        runtime_stall: Duration::from_millis(500),
        watch_failure: Duration::from_secs(2),
        watch_error_gap: Duration::from_secs(30),
        reconcile_stall: Duration::from_millis(800),
    }
}

#[tokio::test]
async fn a_quiet_operator_stays_healthy() {
    let health = Health::with_thresholds(short());
    let watchdog = tokio::spawn(health.clone().run_watchdog(Duration::from_millis(50)));
    let progress = health.controller("stripekeypolicy");
    drop(progress.reconcile_started());
    let (base, shutdown) = serve_health(health).await;
    let client = reqwest::Client::new();
    // Well past every threshold, with nothing to do: healthy.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(healthz(&client, &base).await, (200, "ok".to_string()));
    // A single watch error (a relist, a dropped connection) is no failure.
    progress.watch_error(&short());
    assert_eq!(healthz(&client, &base).await.0, 200);
    watchdog.abort();
    shutdown.cancel();
}

#[test]
fn healthz_fails_when_the_runtime_watchdog_stops_ticking() {
    let main = tokio::runtime::Runtime::new().unwrap();
    let health = Health::with_thresholds(short());
    // The watched runtime: one thread, which a blocking task will wedge.
    let watched = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let ticking = health.clone();
    let thread = std::thread::spawn(move || {
        watched.block_on(async move {
            let watchdog = tokio::spawn(ticking.run_watchdog(Duration::from_millis(50)));
            tokio::time::sleep(Duration::from_millis(700)).await;
            // A task that blocks its worker: the runtime is wedged for 3 s.
            std::thread::sleep(Duration::from_secs(3));
            tokio::time::sleep(Duration::from_millis(300)).await;
            watchdog.abort();
        })
    });
    main.block_on(async {
        let (base, shutdown) = serve_health(health).await;
        let client = reqwest::Client::new();
        assert_eq!(healthz(&client, &base).await.0, 200, "ticking: healthy");
        let body = wait_healthz(&client, &base, 500, Duration::from_secs(3)).await;
        assert!(body.contains("runtime watchdog"), "{body}");
        assert!(!body.contains("sk_") && !body.contains("rk_"));
        // The runtime recovers: healthy again.
        wait_healthz(&client, &base, 200, Duration::from_secs(4)).await;
        shutdown.cancel();
    });
    thread.join().unwrap();
}

#[tokio::test]
async fn healthz_fails_when_reconciles_run_and_none_finishes() {
    let health = Health::with_thresholds(short());
    let progress = health.controller("stripewebhookendpoint");
    let (base, shutdown) = serve_health(health).await;
    let client = reqwest::Client::new();
    let stuck = progress.reconcile_started();
    assert_eq!(healthz(&client, &base).await.0, 200);
    let body = wait_healthz(&client, &base, 500, Duration::from_secs(3)).await;
    assert!(
        body.contains("stripewebhookendpoint") && body.contains("none finished"),
        "{body}"
    );
    drop(stuck);
    assert_eq!(
        healthz(&client, &base).await.0,
        200,
        "it finished: progress"
    );
    shutdown.cancel();
}

/// How the policy watch fails.
#[derive(Clone, Copy, PartialEq)]
enum WatchFailure {
    /// Every request on policies answers 500.
    ServerErrors,
    /// The API server goes away after the watches started.
    ServerGone,
    /// Every LIST of policies hangs without an answer (no error ever comes back by itself).
    ListHangs,
}

/// The real controllers against a Kubernetes API for tests whose policy watch keeps failing.
/// The client is the operator's own (`kube_client_config`), with a short read timeout.
async fn controllers_with_failing_watch(failure: WatchFailure) {
    use stripe_key_operator::controller::{
        Context, ControllerConfig, clock, kube_client_config, run_controllers,
    };
    stripe_key_operator::controller::install_crypto_provider();
    let server = kube_test_api::TestApiServer::start().await.unwrap();
    let client = kube::Client::try_from(kube_client_config(
        kube::Config::new(server.url().parse().unwrap()),
        Duration::from_secs(1),
    ))
    .unwrap();
    let crds: kube::Api<
        k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    > = kube::Api::all(client.clone());
    for crd in stripe_key_operator::api::crds() {
        crds.create(&Default::default(), &crd).await.unwrap();
    }
    let health = Health::with_thresholds(short());
    let ctx = Context::new(
        client,
        Arc::new(stripe_key_operator::vault::MemoryStore::default()),
        Metrics::new(),
        Arc::new(clock::SystemClock),
        ControllerConfig::new(
            "stripe-key-operator",
            stripe_key_operator::vault::StorePrefix::new("stripe-key-operator").unwrap(),
        ),
        None,
    )
    .with_health(health.clone());
    let (base, shutdown) = serve_health(health).await;
    let http = reqwest::Client::new();
    let stop_server = failure == WatchFailure::ServerGone;
    match failure {
        WatchFailure::ServerErrors => server.inject_fault(
            "*",
            "stripekeypolicies",
            kube_test_api::Fault::Status(500),
            None,
        ),
        WatchFailure::ListHangs => server.inject_fault(
            "list",
            "stripekeypolicies",
            kube_test_api::Fault::Hang,
            None,
        ),
        WatchFailure::ServerGone => {}
    }
    let stop = CancellationToken::new();
    let controllers = tokio::spawn({
        let stop = stop.clone();
        async move { run_controllers(Arc::new(ctx), &[], stop).await }
    });
    if stop_server {
        // The controllers run, watch, and are healthy; then the API server goes away.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert_eq!(healthz(&http, &base).await.0, 200, "watching: healthy");
        server.shutdown().await;
    } else {
        assert_eq!(
            healthz(&http, &base).await.0,
            200,
            "not failing for long yet"
        );
    }
    let body = wait_healthz(&http, &base, 500, Duration::from_secs(15)).await;
    assert!(body.contains("watches have been failing"), "{body}");
    controllers.abort();
    shutdown.cancel();
}

#[tokio::test]
async fn healthz_fails_when_a_watch_keeps_getting_server_errors() {
    controllers_with_failing_watch(WatchFailure::ServerErrors).await;
}

#[tokio::test]
async fn healthz_fails_when_the_api_server_is_gone() {
    controllers_with_failing_watch(WatchFailure::ServerGone).await;
}

/// A LIST that never answers raises no error by itself: the client's read timeout turns it into
/// one, so a watch that cannot start shows on `/healthz`.
#[tokio::test]
async fn healthz_fails_when_the_watch_list_hangs() {
    controllers_with_failing_watch(WatchFailure::ListHangs).await;
}
