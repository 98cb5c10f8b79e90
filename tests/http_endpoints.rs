//! `/metrics`, `/healthz` and `/readyz` of the operator process.

use std::io::Write;
use std::process::{Command, Stdio};

use stripe_key_operator::http::{self, Health};
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
