//! `verify-proxy`: every verdict, the forwarded bytes and headers, two secrets, reloading the
//! mounted Secret under traffic, the replay guard, a bounded load test, the simulator end to
//! end, and abuse (issue 14, opening 5): duplicated headers, header checks before the body,
//! header and body timeouts, the connection and in-flight bounds, and a bounded attack by
//! slow-loris, slow-body and oversized clients.

#[path = "common/stripe_harness.rs"]
mod harness;
#[path = "common/operator.rs"]
mod operator;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::Request;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use serde_json::json;
use stripe_key_operator::secret::SecretString;
use stripe_key_operator::sim::{SendEventRequest, SimConfig};
use stripe_key_operator::stripe::{CreateWebhookEndpointParams, Mode, StripeClient};
use stripe_key_operator::webhook::proxy::{
    ProxyConfig, ProxyHandle, RejectReason, SecretsSource, VerifyProxy,
};
use stripe_key_operator::webhook::signature::sign;

const KEY: &str = "STRIPE_WEBHOOK_SECRETS";

/// What the application behind the proxy received.
#[derive(Debug, Clone)]
struct Received {
    method: String,
    path_and_query: String,
    headers: HeaderMap,
    body: Bytes,
}

type Log = Arc<Mutex<Vec<Received>>>;

/// The application: records every request; `/teapot` answers 418 with its own header and body,
/// anything else 200 `ok`.
async fn upstream() -> (url::Url, Log) {
    let log: Log = Arc::default();
    let l = log.clone();
    let app = axum::Router::new().fallback(move |req: Request| {
        let l = l.clone();
        async move {
            let (parts, body) = req.into_parts();
            let body = axum::body::to_bytes(body, usize::MAX).await.unwrap();
            l.lock().unwrap().push(Received {
                method: parts.method.to_string(),
                path_and_query: parts
                    .uri
                    .path_and_query()
                    .map(|p| p.to_string())
                    .unwrap_or_default(),
                headers: parts.headers,
                body,
            });
            if parts.uri.path() == "/teapot" {
                (
                    StatusCode::IM_A_TEAPOT,
                    [("x-upstream", "kettle")],
                    "short and stout",
                )
                    .into_response()
            } else {
                "ok".into_response()
            }
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}").parse().unwrap(), log)
}

fn secret(name: &str) -> SecretString {
    SecretString::new(format!("whsec_test_{name}_0123456789abcdef"))
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

fn event(id: &str) -> Vec<u8> {
    serde_json::to_vec(
        &json!({"id": id, "object": "event", "type": "charge.succeeded",
        "data": {"object": {"id": "ch_1", "amount": 1000}}}),
    )
    .unwrap()
}

/// Writes `content` the way the kubelet updates a Secret volume: a new timestamped directory,
/// then an atomic rename of the `..data` symlink; the key itself is a symlink into `..data`.
fn kubelet_write(dir: &Path, content: &str) {
    use std::os::unix::fs::symlink;
    let stamp = format!(
        "..{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    std::fs::create_dir(dir.join(&stamp)).unwrap();
    std::fs::write(dir.join(&stamp).join(KEY), content).unwrap();
    let old = std::fs::read_link(dir.join("..data")).ok();
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    symlink(&stamp, &tmp).unwrap();
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
    if !dir.join(KEY).exists() {
        symlink(format!("..data/{KEY}"), dir.join(KEY)).unwrap();
    }
    if let Some(old) = old {
        std::fs::remove_dir_all(dir.join(old)).unwrap();
    }
}

fn secrets_content(secrets: &[&SecretString]) -> String {
    secrets
        .iter()
        .map(|s| s.expose())
        .collect::<Vec<_>>()
        .join(",")
}

struct Setup {
    proxy: ProxyHandle,
    log: Log,
    dir: tempfile::TempDir,
    http: reqwest::Client,
}

impl Setup {
    fn secrets_dir(&self) -> PathBuf {
        self.dir.path().join("secret-volume")
    }
}

/// Starts the application and a proxy reading a Secret volume holding `secrets`.
async fn setup(secrets: &[&SecretString], tune: impl FnOnce(&mut ProxyConfig)) -> Setup {
    let (upstream_url, log) = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let volume = dir.path().join("secret-volume");
    std::fs::create_dir(&volume).unwrap();
    if !secrets.is_empty() {
        kubelet_write(&volume, &secrets_content(secrets));
    }
    let mut config = ProxyConfig::new(upstream_url, SecretsSource::new(&volume, KEY));
    config.reload_interval = Duration::from_millis(50);
    config.metrics_addr = Some("127.0.0.1:0".parse().unwrap());
    tune(&mut config);
    let proxy = VerifyProxy::start(config, None).await.unwrap();
    Setup {
        proxy,
        log,
        dir,
        http: reqwest::Client::builder().no_proxy().build().unwrap(),
    }
}

async fn post(
    s: &Setup,
    path: &str,
    body: Vec<u8>,
    signature: Option<String>,
) -> (StatusCode, String) {
    let mut req = s
        .http
        .post(format!("{}{}", s.proxy.url(), path))
        .header("content-type", "application/json; charset=utf-8")
        .body(body);
    if let Some(sig) = signature {
        req = req.header("stripe-signature", sig);
    }
    let resp = req.send().await.unwrap();
    (resp.status(), resp.text().await.unwrap())
}

async fn metrics_text(s: &Setup) -> String {
    s.http
        .get(format!(
            "http://{}/metrics",
            s.proxy.metrics_addr().unwrap()
        ))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

fn rejected_count(s: &Setup, reason: RejectReason) -> u64 {
    s.proxy
        .metrics()
        .rejected
        .get_or_create(
            &stripe_key_operator::webhook::proxy::metrics::ReasonLabels {
                reason: reason.as_str().into(),
            },
        )
        .get()
}

#[tokio::test]
async fn a_valid_request_is_forwarded_with_its_exact_bytes_and_headers_and_the_answer_comes_back() {
    let a = secret("a");
    let s = setup(&[&a], |_| {}).await;
    // raw bytes that are not even UTF-8 (the signature covers bytes, not JSON)
    let mut body = event("evt_exact");
    body.extend_from_slice(b"  \r\n\xff\x00 trailing");
    let sig = sign(&body, std::slice::from_ref(&a), now());
    let resp = s
        .http
        .put(format!("{}/teapot?source=stripe&x=%20y", s.proxy.url()))
        .header("content-type", "application/json; charset=utf-8")
        .header(
            "user-agent",
            "Stripe/1.0 (+https://stripe.com/docs/webhooks)",
        )
        .header("x-custom", "one")
        .header("x-multi", "a")
        .header("x-multi", "b")
        .header("connection", "keep-alive, x-hop")
        .header("x-hop", "dropped")
        .header("stripe-signature", &sig)
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::IM_A_TEAPOT);
    assert_eq!(resp.headers()["x-upstream"], "kettle");
    assert_eq!(resp.text().await.unwrap(), "short and stout");

    let got = s.log.lock().unwrap().clone();
    assert_eq!(got.len(), 1);
    let r = &got[0];
    assert_eq!(r.method, "PUT");
    assert_eq!(r.path_and_query, "/teapot?source=stripe&x=%20y");
    assert_eq!(r.body.as_ref(), body.as_slice());
    assert_eq!(r.headers["stripe-signature"], sig.as_str());
    assert_eq!(r.headers["content-type"], "application/json; charset=utf-8");
    assert_eq!(
        r.headers["user-agent"],
        "Stripe/1.0 (+https://stripe.com/docs/webhooks)"
    );
    assert_eq!(r.headers["x-custom"], "one");
    let multi: Vec<_> = r.headers.get_all("x-multi").iter().collect();
    assert_eq!(multi, ["a", "b"]);
    assert_eq!(r.headers["content-length"], body.len().to_string().as_str());
    assert!(r.headers.get("x-hop").is_none(), "named in Connection");

    let text = metrics_text(&s).await;
    assert!(
        text.contains("stripe_key_operator_webhook_proxy_verified_total{secret_index=\"0\"} 1"),
        "{text}"
    );
    assert!(
        text.contains(
            "stripe_key_operator_webhook_proxy_forward_duration_seconds_count{outcome=\"4xx\"} 1"
        ),
        "{text}"
    );
    assert!(text.contains("stripe_key_operator_webhook_proxy_secrets_loaded 1"));
    // the metrics never show a secret
    assert!(!text.contains("whsec_"));
}

#[tokio::test]
async fn every_invalid_request_gets_its_reason_and_never_reaches_the_application() {
    let a = secret("a");
    let other = secret("other");
    let s = setup(&[&a], |c| c.max_body = 4096).await;
    let t = now();
    let cases: Vec<(RejectReason, Vec<u8>, Option<String>)> = vec![
        (RejectReason::MissingSignature, event("evt_1"), None),
        (
            RejectReason::MalformedSignature,
            event("evt_2"),
            Some("v1=abc,not-a-pair".into()),
        ),
        (
            RejectReason::MalformedSignature,
            event("evt_3"),
            Some(format!("t={t}")),
        ),
        (
            RejectReason::NoMatchingSignature,
            event("evt_4"),
            Some(sign(&event("evt_4"), std::slice::from_ref(&other), t)),
        ),
        (
            // signed for another body: a tampered payload
            RejectReason::NoMatchingSignature,
            event("evt_5_tampered"),
            Some(sign(&event("evt_5"), std::slice::from_ref(&a), t)),
        ),
        (
            RejectReason::TimestampOutsideTolerance,
            event("evt_6"),
            Some(sign(&event("evt_6"), std::slice::from_ref(&a), t - 301)),
        ),
        (
            RejectReason::TimestampOutsideTolerance,
            event("evt_7"),
            Some(sign(&event("evt_7"), std::slice::from_ref(&a), t + 400)),
        ),
        (
            RejectReason::BodyTooLarge,
            vec![b'x'; 4097],
            Some(sign(&[b'x'; 4097], std::slice::from_ref(&a), t)),
        ),
    ];
    for (reason, body, sig) in cases {
        let (status, text) = post(&s, "/hook", body, sig).await;
        assert_eq!(status, reason.status(), "{reason:?}");
        assert_eq!(text.trim(), reason.as_str());
    }
    assert!(s.log.lock().unwrap().is_empty());

    // a replay: the first passes, the same request again is refused
    let body = event("evt_replay");
    let sig = sign(&body, std::slice::from_ref(&a), t);
    assert_eq!(
        post(&s, "/hook", body.clone(), Some(sig.clone())).await.0,
        StatusCode::OK
    );
    let (status, text) = post(&s, "/hook", body, Some(sig)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(text.trim(), "replayed_event");
    assert_eq!(s.log.lock().unwrap().len(), 1);

    assert_eq!(rejected_count(&s, RejectReason::MissingSignature), 1);
    assert_eq!(rejected_count(&s, RejectReason::MalformedSignature), 2);
    assert_eq!(rejected_count(&s, RejectReason::NoMatchingSignature), 2);
    assert_eq!(
        rejected_count(&s, RejectReason::TimestampOutsideTolerance),
        2
    );
    assert_eq!(rejected_count(&s, RejectReason::BodyTooLarge), 1);
    assert_eq!(rejected_count(&s, RejectReason::ReplayedEvent), 1);
    let text = metrics_text(&s).await;
    assert!(text.contains(
        "stripe_key_operator_webhook_proxy_rejected_total{reason=\"no_matching_signature\"} 2"
    ));
}

#[tokio::test]
async fn a_streamed_body_over_the_limit_is_refused_without_a_content_length() {
    let a = secret("a");
    let s = setup(&[&a], |c| c.max_body = 1024).await;
    let big = vec![b'y'; 5000];
    let sig = sign(&big, std::slice::from_ref(&a), now());
    // chunked transfer encoding, written by hand: no Content-Length to check up front
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(s.proxy.addr())
        .await
        .unwrap();
    let mut req = format!(
        "POST /hook HTTP/1.1\r\nhost: proxy\r\nstripe-signature: {sig}\r\n\
         transfer-encoding: chunked\r\nconnection: close\r\n\r\n"
    )
    .into_bytes();
    for chunk in big.chunks(500) {
        req.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        req.extend_from_slice(chunk);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    // the proxy may answer before reading everything; a reset while writing is fine
    let _ = conn.write_all(&req).await;
    let mut answer = Vec::new();
    let _ = conn.read_to_end(&mut answer).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("body_too_large"), "{answer}");
    assert!(s.log.lock().unwrap().is_empty());
}

#[tokio::test]
async fn without_a_readable_secret_requests_get_503_and_readiness_fails_until_it_appears() {
    let a = secret("a");
    let s = setup(&[], |_| {}).await;
    let body = event("evt_early");
    let (status, text) = post(
        &s,
        "/hook",
        body.clone(),
        Some(sign(&body, std::slice::from_ref(&a), now())),
    )
    .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(text.trim(), "no_secrets_loaded");
    let readyz = format!("http://{}/readyz", s.proxy.metrics_addr().unwrap());
    assert_eq!(
        s.http.get(&readyz).send().await.unwrap().status(),
        StatusCode::SERVICE_UNAVAILABLE
    );

    kubelet_write(&s.secrets_dir(), a.expose());
    wait_for_fingerprints(&s.proxy, &[&a]).await;
    assert_eq!(
        s.http.get(&readyz).send().await.unwrap().status(),
        StatusCode::OK
    );
    let body = event("evt_later");
    let (status, _) = post(
        &s,
        "/hook",
        body.clone(),
        Some(sign(&body, std::slice::from_ref(&a), now())),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn either_of_two_secrets_verifies_during_an_overlap() {
    let (a, b) = (secret("a"), secret("b"));
    let s = setup(&[&b, &a], |_| {}).await;
    for (i, signers) in [vec![a.clone()], vec![b.clone()], vec![b.clone(), a.clone()]]
        .into_iter()
        .enumerate()
    {
        let body = event(&format!("evt_overlap_{i}"));
        let (status, _) = post(
            &s,
            "/hook",
            body.clone(),
            Some(sign(&body, &signers, now())),
        )
        .await;
        assert_eq!(
            status,
            StatusCode::OK,
            "signed by {} secret(s)",
            signers.len()
        );
    }
    let verified = |index: &str| {
        s.proxy
            .metrics()
            .verified
            .get_or_create(
                &stripe_key_operator::webhook::proxy::metrics::SecretLabels {
                    secret_index: index.into(),
                },
            )
            .get()
    };
    // B is first in the file: index 0 for B-signed requests, 1 for A-only
    assert_eq!(verified("0"), 2);
    assert_eq!(verified("1"), 1);
    assert_eq!(s.log.lock().unwrap().len(), 3);
}

fn fingerprints(secrets: &[&SecretString]) -> Vec<String> {
    secrets.iter().map(|s| s.fingerprint()).collect()
}

async fn wait_for_fingerprints(proxy: &ProxyHandle, secrets: &[&SecretString]) {
    let want = fingerprints(secrets);
    let deadline = Instant::now() + Duration::from_secs(10);
    while proxy.loaded_fingerprints() != want {
        assert!(
            Instant::now() < deadline,
            "the proxy did not load {want:?}; has {:?}",
            proxy.loaded_fingerprints()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// How long the kubelet takes to bring a changed Secret into a running pod's volume (minutes in
/// a real cluster; the operator must never rely on it being quick).
const KUBELET_DELAY: Duration = Duration::from_secs(1);

/// How long after Stripe creates an endpoint its first event is sent. A blue/green create is
/// followed by its disable one API round trip later (Stripe's create takes no `disabled`): that
/// round trip is the residual the design accepts, not what this test measures.
const FIRST_EVENT_AFTER: Duration = Duration::from_millis(500);

/// The kubelet of the pod the proxy runs in: the mounted volume gets the Secret's
/// `STRIPE_WEBHOOK_SECRETS` only once the operator *published* it (the Secret holds it), and
/// `KUBELET_DELAY` later. This is the only way a secret reaches the proxy.
async fn kubelet(client: kube::Client, secret: &str, dir: PathBuf, stop: Arc<AtomicBool>) {
    let api: kube::Api<k8s_openapi::api::core::v1::Secret> =
        kube::Api::namespaced(client, operator::NS);
    let read = async || {
        api.get_opt(secret)
            .await
            .unwrap()
            .and_then(|s| operator::secret_value(&s, KEY))
    };
    let mut mounted: Option<String> = None;
    while !stop.load(Ordering::SeqCst) {
        if read().await != mounted {
            tokio::time::sleep(KUBELET_DELAY).await;
            mounted = read().await;
            if let Some(content) = &mounted {
                kubelet_write(&dir, content);
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What Stripe delivered to the proxy during a rotation.
#[derive(Default)]
struct Deliveries {
    /// Delivered events per endpoint id.
    by_endpoint: Mutex<BTreeMap<String, usize>>,
    rejected: AtomicUsize,
}

/// Stripe under steady traffic: every few milliseconds an event for each *enabled* endpoint of
/// the account, signed with that endpoint's secret. Endpoints are pointed at the proxy behind
/// the operator's back (the CRD only takes https URLs) the first time they are seen, and get
/// events from `FIRST_EVENT_AFTER` on.
async fn stripe_traffic(
    env: Arc<stripe_key_operator::sandbox::env::LocalEnv>,
    proxy_url: String,
    seen: Arc<Deliveries>,
    stop: Arc<AtomicBool>,
) {
    let client = StripeClient::new(env.sim.stripe_config(&env.account_id).unwrap()).unwrap();
    let mut first_seen: BTreeMap<String, Instant> = BTreeMap::new();
    let mut pointed = std::collections::BTreeSet::new();
    while !stop.load(Ordering::SeqCst) {
        let endpoints = env
            .sim
            .state()
            .account(&env.account_id)
            .map(|a| a.webhook_endpoints.clone())
            .unwrap_or_default();
        for ep in &endpoints {
            first_seen.entry(ep.id.clone()).or_insert_with(Instant::now);
            if ep.url != proxy_url && pointed.insert(ep.id.clone()) {
                let params = stripe_key_operator::stripe::UpdateWebhookEndpointParams {
                    url: Some(proxy_url.clone()),
                    ..Default::default()
                };
                let key = format!("to-proxy-{}", ep.id);
                client
                    .update_webhook_endpoint(&ep.id, &params, &key)
                    .await
                    .unwrap();
            }
        }
        for ep in endpoints.iter().filter(|ep| {
            ep.status == "enabled"
                && ep.url == proxy_url
                && first_seen[&ep.id].elapsed() >= FIRST_EVENT_AFTER
        }) {
            let request = SendEventRequest {
                event_type: "charge.succeeded".into(),
                ..Default::default()
            };
            // Disabled or deleted since the snapshot: Stripe sends nothing.
            let Ok(outcome) = env.sim.send_webhook(&ep.id, request).await else {
                continue;
            };
            if !outcome.delivered {
                continue;
            }
            *seen
                .by_endpoint
                .lock()
                .unwrap()
                .entry(ep.id.clone())
                .or_default() += 1;
            if outcome.status != Some(200) {
                eprintln!(
                    "rejected: {:?} from {}, {:?} after it was first seen",
                    outcome.status,
                    ep.id,
                    first_seen[&ep.id].elapsed()
                );
                seen.rejected.fetch_add(1, Ordering::SeqCst);
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A routine blue/green rotation by the operator under steady traffic from Stripe: the new
/// endpoint sends nothing before its secret reached the proxy, which loads it only from the
/// Secret the operator published, through the volume; the old endpoint carries every event
/// meanwhile. Not one event is rejected.
#[tokio::test]
async fn rotating_the_mounted_secret_under_steady_traffic_rejects_no_valid_event() {
    use stripe_key_operator::api::{RotationPhase, StripeWebhookEndpoint, conditions};
    let env = operator::env_with(stripe_key_operator::sandbox::env::EnvOptions {
        // New pods are ready well after the kubelet refreshed the volume of running ones.
        rollout_delay: Duration::from_secs(3),
        // Throttling would only slow the operator's calls down, not change their order.
        sim_rate_limit_test: 100_000,
        ..Default::default()
    })
    .await;
    env.apply_json(&json!({
        "apiVersion": "stripekeys.io/v1alpha1", "kind": "StripeWebhookEndpoint",
        "metadata": {"name": "orders", "namespace": operator::NS},
        "spec": {
            "accountRef": {"name": operator::ACCOUNT},
            // Nothing listens there (connection refused at once) until Stripe is pointed at
            // the proxy.
            "url": "https://127.0.0.1:9/stripe",
            "enabledEvents": ["charge.succeeded"],
            "delivery": {"secret": {"name": "orders-webhook"},
                         "rolloutTargets": [{"kind": "Deployment", "name": "checkout"}]},
            "rotation": {"every": "720h", "overlap": "1h"}
        }
    }))
    .await
    .unwrap();
    let api: kube::Api<StripeWebhookEndpoint> =
        kube::Api::namespaced(env.client.clone(), operator::NS);
    let wait = async |what: &str, pred: &dyn Fn(&StripeWebhookEndpoint) -> bool| {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let e = api.get("orders").await.unwrap();
            if pred(&e) {
                return e;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let settled = |e: &StripeWebhookEndpoint| {
        e.status.as_ref().is_some_and(|s| {
            conditions::is_true(&s.conditions, "Ready")
                && s.rotation.is_none()
                && s.previous_key.is_none()
        })
    };
    let first = wait("Ready", &settled).await.status.unwrap();
    let first = first.current_key.clone().unwrap();

    let s = setup(&[], |_| {}).await;
    let stop = Arc::new(AtomicBool::new(false));
    let kubelet = tokio::spawn(kubelet(
        env.client.clone(),
        "orders-webhook",
        s.secrets_dir(),
        stop.clone(),
    ));
    let deadline = Instant::now() + Duration::from_secs(10);
    while s.proxy.loaded_fingerprints() != [first.fingerprint.clone()] {
        assert!(Instant::now() < deadline, "the first secret never mounted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let env = Arc::new(env);
    let seen = Arc::new(Deliveries::default());
    let traffic = tokio::spawn(stripe_traffic(
        env.clone(),
        format!("{}/hook", s.proxy.url()),
        seen.clone(),
        stop.clone(),
    ));
    let delivered_from = async |id: &str, n: usize| {
        let deadline = Instant::now() + Duration::from_secs(30);
        while seen
            .by_endpoint
            .lock()
            .unwrap()
            .get(id)
            .copied()
            .unwrap_or(0)
            < n
        {
            assert!(Instant::now() < deadline, "{id} never delivered {n} events");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    delivered_from(&first.id, 10).await;

    let patch = async |metadata: serde_json::Value| {
        let merge = kube::api::Patch::Merge(json!({ "metadata": metadata }));
        api.patch("orders", &Default::default(), &merge)
            .await
            .unwrap();
    };
    patch(json!({"annotations": {"stripekeys.io/rotate": "r1"}})).await;
    let overlapping = |e: &StripeWebhookEndpoint| {
        e.status
            .as_ref()
            .and_then(|s| s.rotation.as_ref())
            .is_some_and(|r| r.phase == RotationPhase::Overlapping)
    };
    let second = wait("Overlapping", &overlapping).await.status.unwrap();
    let second = second.current_key.clone().unwrap();
    // Both endpoints deliver during the overlap.
    delivered_from(&second.id, 10).await;
    env.clock.advance(Duration::from_secs(3700));
    patch(json!({"labels": {"test/nudge": "1"}})).await;
    wait("the old endpoint deleted", &settled).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while s.proxy.loaded_fingerprints() != [second.fingerprint.clone()] {
        assert!(
            Instant::now() < deadline,
            "the old secret never left the volume"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::SeqCst);
    traffic.await.unwrap();
    kubelet.await.unwrap();

    let by_endpoint = seen.by_endpoint.lock().unwrap().clone();
    let from = |id: &str| by_endpoint.get(id).copied().unwrap_or(0);
    assert!(
        from(&first.id) >= 10,
        "the old endpoint delivered: {by_endpoint:?}"
    );
    assert!(
        from(&second.id) >= 10,
        "the new endpoint delivered: {by_endpoint:?}"
    );
    let reasons = metrics_text(&s)
        .await
        .lines()
        .filter(|l| {
            l.starts_with("stripe_key_operator_webhook_proxy_rejected_total") && !l.ends_with(" 0")
        })
        .map(str::to_owned)
        .collect::<Vec<_>>();
    assert_eq!(
        seen.rejected.load(Ordering::SeqCst),
        0,
        "{by_endpoint:?} {reasons:?}"
    );
    assert_eq!(
        s.log.lock().unwrap().len(),
        by_endpoint.values().sum::<usize>(),
        "every delivery reached the application"
    );
}

#[tokio::test]
async fn an_unreadable_or_empty_secrets_file_keeps_the_previous_secrets() {
    let a = secret("a");
    let s = setup(&[&a], |_| {}).await;
    kubelet_write(&s.secrets_dir(), " , \n");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(s.proxy.loaded_fingerprints(), fingerprints(&[&a]));
    assert!(s.proxy.reload_now().is_err());
    std::fs::remove_file(s.secrets_dir().join(KEY)).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let body = event("evt_kept");
    let (status, _) = post(
        &s,
        "/hook",
        body.clone(),
        Some(sign(&body, std::slice::from_ref(&a), now())),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let text = metrics_text(&s).await;
    assert!(
        text.contains("stripe_key_operator_webhook_proxy_secret_reloads_total{outcome=\"failed\"}")
    );
}

#[tokio::test]
async fn a_replay_is_refused_however_the_header_is_rearranged_but_a_new_delivery_passes() {
    let (a, b) = (secret("a"), secret("b"));
    let s = setup(&[&b, &a], |_| {}).await;
    let body = event("evt_1");
    let t = now();
    let sig = sign(&body, &[b.clone(), a.clone()], t);
    assert_eq!(
        post(&s, "/hook", body.clone(), Some(sig.clone())).await.0,
        StatusCode::OK
    );

    let (t_part, v1s) = sig.split_once(',').unwrap();
    let only_a = sig.rsplit(',').next().unwrap();
    let variants = [
        sig.clone(),
        format!("{v1s},{t_part}"),
        format!("{t_part},v0=deadbeef,{v1s}"),
        format!("{t_part},v1={},{only_a}", "0".repeat(64)),
        format!("{t_part}, {only_a}"),
    ];
    for v in variants {
        let (status, text) = post(&s, "/hook", body.clone(), Some(v.clone())).await;
        assert_eq!(
            (status, text.trim()),
            (StatusCode::BAD_REQUEST, "replayed_event"),
            "{v}"
        );
    }
    // the same event delivered by a second endpoint (another secret) is not a replay: the
    // application deduplicates on event.id
    let second_endpoint = sign(&body, std::slice::from_ref(&a), t + 1);
    assert_eq!(
        post(&s, "/hook", body.clone(), Some(second_endpoint))
            .await
            .0,
        StatusCode::OK
    );
    // Stripe's retry of the same event is signed at a new time: not a replay either
    let retry = sign(&body, std::slice::from_ref(&b), t + 2);
    assert_eq!(post(&s, "/hook", body, Some(retry)).await.0, StatusCode::OK);
    assert_eq!(s.log.lock().unwrap().len(), 3);
}

#[tokio::test]
async fn the_replay_guard_stays_within_its_capacity() {
    let a = secret("a");
    let s = setup(&[&a], |c| c.replay_capacity = 8).await;
    let mut last = None;
    for i in 0..30 {
        let body = event(&format!("evt_cap_{i}"));
        let sig = sign(&body, std::slice::from_ref(&a), now());
        assert_eq!(
            post(&s, "/hook", body.clone(), Some(sig.clone())).await.0,
            StatusCode::OK
        );
        assert!(s.proxy.replay_entries() <= 8);
        last = Some((body, sig));
    }
    assert_eq!(s.proxy.replay_entries(), 8);
    assert_eq!(s.proxy.metrics().replay_cache_evictions.get(), 22);
    // the most recent signatures are still refused
    let (body, sig) = last.unwrap();
    assert_eq!(
        post(&s, "/hook", body, Some(sig)).await,
        (StatusCode::BAD_REQUEST, "replayed_event\n".to_owned())
    );
}

#[tokio::test]
async fn an_application_that_does_not_answer_gives_502_after_verification() {
    let a = secret("a");
    // a port with nothing listening
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = free.local_addr().unwrap().port();
    drop(free);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join(KEY);
    std::fs::write(&file, a.expose()).unwrap();
    let config = ProxyConfig::new(
        format!("http://127.0.0.1:{port}").parse().unwrap(),
        SecretsSource::new(&file, KEY),
    );
    let proxy = VerifyProxy::start(config, None).await.unwrap();
    let body = event("evt_502");
    let resp = reqwest::Client::new()
        .post(format!("{}/hook", proxy.url()))
        .header(
            "stripe-signature",
            sign(&body, std::slice::from_ref(&a), now()),
        )
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(resp.text().await.unwrap().trim(), "upstream_unavailable");
}

#[tokio::test]
async fn a_non_loopback_upstream_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let config = ProxyConfig::new(
        "http://192.0.2.10:3000".parse().unwrap(),
        SecretsSource::new(dir.path(), KEY),
    );
    let err = VerifyProxy::start(config, None).await.unwrap_err();
    assert!(err.to_string().contains("loopback"), "{err}");
}

#[tokio::test]
async fn a_bounded_load_of_5000_requests_from_32_clients_is_all_forwarded() {
    const TOTAL: usize = 5000;
    const CLIENTS: usize = 32;
    let a = secret("a");
    let s = Arc::new(setup(&[&a], |_| {}).await);
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        let (s, next, a) = (s.clone(), next.clone(), a.clone());
        tasks.push(tokio::spawn(async move {
            let mut errors = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= TOTAL {
                    break;
                }
                let mut body = event(&format!("evt_load_{i}"));
                body.resize(2048, b' ');
                let sig = sign(&body, std::slice::from_ref(&a), now());
                match s
                    .http
                    .post(format!("{}/hook", s.proxy.url()))
                    .header("stripe-signature", sig)
                    .body(body)
                    .send()
                    .await
                {
                    Ok(r) if r.status() == StatusCode::OK => {}
                    Ok(r) => errors.push(format!("status {}", r.status())),
                    Err(e) => errors.push(e.to_string()),
                }
            }
            errors
        }));
    }
    let mut errors = Vec::new();
    for t in tasks {
        errors.extend(t.await.unwrap());
    }
    assert!(
        errors.is_empty(),
        "{} errors, first: {:?}",
        errors.len(),
        errors.first()
    );
    assert_eq!(s.log.lock().unwrap().len(), TOTAL);
    let verified = s
        .proxy
        .metrics()
        .verified
        .get_or_create(
            &stripe_key_operator::webhook::proxy::metrics::SecretLabels {
                secret_index: "0".into(),
            },
        )
        .get();
    assert_eq!(verified, TOTAL as u64);
}

#[tokio::test]
async fn simulator_deliveries_pass_through_the_proxy_before_and_during_a_secret_roll() {
    let sim = harness::start_sim(SimConfig::new().with_account("acct_proxy", Mode::Test)).await;
    let client = StripeClient::new(harness::fast_config(&sim, "acct_proxy")).unwrap();
    let s = setup(&[], |_| {}).await;
    let endpoint = client
        .create_webhook_endpoint(
            &CreateWebhookEndpointParams {
                url: format!("{}/stripe/webhooks", s.proxy.url()),
                enabled_events: vec!["*".into()],
                api_version: None,
                connect: None,
                description: Some("verify-proxy test".into()),
                metadata: BTreeMap::new(),
            },
            "we-proxy-1",
        )
        .await
        .unwrap()
        .value;
    let first = endpoint.secret.clone().unwrap();
    kubelet_write(&s.secrets_dir(), first.expose());
    wait_for_fingerprints(&s.proxy, &[&first]).await;

    let send = |event_type: &str| {
        sim.send_webhook(
            &endpoint.id,
            SendEventRequest {
                event_type: event_type.into(),
                data: Some(json!({"id": "ch_sim"})),
                timestamp: None,
            },
        )
    };
    let outcome = send("charge.succeeded").await.unwrap();
    assert_eq!(outcome.status, Some(200), "{outcome:?}");
    assert_eq!(outcome.signatures, 1);

    // a Dashboard-style roll: both secrets sign while the Secret is updated
    let second = sim
        .roll_webhook_secret(&endpoint.id, Duration::from_secs(3600))
        .unwrap();
    let outcome = send("charge.refunded").await.unwrap();
    assert_eq!(outcome.signatures, 2);
    assert_eq!(
        outcome.status,
        Some(200),
        "old secret still loaded: {outcome:?}"
    );
    kubelet_write(&s.secrets_dir(), &secrets_content(&[&second, &first]));
    wait_for_fingerprints(&s.proxy, &[&second, &first]).await;
    for _ in 0..5 {
        let outcome = send("charge.succeeded").await.unwrap();
        assert_eq!(outcome.signatures, 2);
        assert_eq!(outcome.status, Some(200), "{outcome:?}");
    }
    let got = s.log.lock().unwrap().clone();
    assert_eq!(got.len(), 7);
    for r in &got {
        assert_eq!(r.path_and_query, "/stripe/webhooks");
        let event: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert!(event["id"].as_str().unwrap().starts_with("evt_"));
    }
    assert_eq!(rejected_total(&s), 0);
}

fn rejected_total(s: &Setup) -> u64 {
    RejectReason::ALL
        .iter()
        .map(|r| rejected_count(s, *r))
        .sum()
}

const BIN: &str = env!("CARGO_BIN_EXE_stripe-key-operator");

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

#[test]
fn the_cli_refuses_a_non_loopback_upstream() {
    let out = std::process::Command::new(BIN)
        .args([
            "verify-proxy",
            "--upstream",
            "http://192.0.2.1:3000",
            "--secrets-file",
            "/nonexistent",
            "--listen",
            "127.0.0.1:0",
            "--metrics-addr",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("loopback"), "{stderr}");
}

#[tokio::test]
async fn the_cli_forwards_a_signed_request_and_stops_on_sigterm() {
    let a = secret("cli");
    let (upstream_url, log) = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(KEY), a.expose()).unwrap();
    let (port, metrics_port) = (free_port(), free_port());
    let child = tokio::process::Command::new(BIN)
        .args(["verify-proxy", "--log-format", "json"])
        .env("PROXY_LISTEN", format!("127.0.0.1:{port}"))
        .env("PROXY_METRICS_ADDR", format!("127.0.0.1:{metrics_port}"))
        .env("PROXY_UPSTREAM", upstream_url.as_str())
        // the Secret volume's directory: the default key is read inside it
        .env("PROXY_SECRETS_FILE", dir.path())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ready = http
            .get(format!("http://127.0.0.1:{metrics_port}/readyz"))
            .send()
            .await;
        if ready.is_ok_and(|r| r.status() == StatusCode::OK) {
            break;
        }
        assert!(Instant::now() < deadline, "the proxy did not become ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let body = event("evt_cli");
    let resp = http
        .post(format!("http://127.0.0.1:{port}/hook"))
        .header(
            "stripe-signature",
            sign(&body, std::slice::from_ref(&a), now()),
        )
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(log.lock().unwrap()[0].body.as_ref(), body.as_slice());

    let pid = child.id().unwrap().to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(killed.success());
    let out = tokio::time::timeout(Duration::from_secs(10), child.wait_with_output())
        .await
        .expect("the proxy stops after SIGTERM")
        .unwrap();
    assert!(out.status.success(), "{:?}", out.status);
    let logs = String::from_utf8_lossy(&out.stderr);
    assert!(
        logs.contains(&a.fingerprint()),
        "the loaded secret's fingerprint is logged"
    );
    assert!(
        !logs.contains(a.expose()),
        "the secret itself is never logged"
    );
    assert!(!logs.contains("evt_cli"), "bodies are never logged");
}

// ------------------------------------------------------------------ abuse: issue 14, opening 5

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Reads what the proxy sends on `conn` until it closes the connection or `limit` passes.
async fn read_answer(conn: &mut TcpStream, limit: Duration) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let _ = tokio::time::timeout(limit, async {
        loop {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether the proxy closed `conn` within `limit` (end of stream or reset).
async fn closed_within(conn: &mut TcpStream, limit: Duration) -> bool {
    let mut buf = [0u8; 1024];
    tokio::time::timeout(limit, async {
        loop {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

/// The head of a `POST /hook` with `headers` (each `name: value`), closing after the answer.
fn request_head(headers: &[String]) -> Vec<u8> {
    let mut head = String::from("POST /hook HTTP/1.1\r\nhost: proxy\r\nconnection: close\r\n");
    for h in headers {
        head.push_str(h);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    head.into_bytes()
}

async fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn duplicated_stripe_signature_headers_are_refused_and_nothing_is_forwarded() {
    let a = secret("a");
    let s = setup(&[&a], |_| {}).await;
    let body = event("evt_duplicated");
    let good = sign(&body, std::slice::from_ref(&a), now());
    let other = sign(&body, std::slice::from_ref(&secret("other")), now());
    for (first, second) in [(&good, &other), (&other, &good), (&good, &good)] {
        let mut conn = TcpStream::connect(s.proxy.addr()).await.unwrap();
        let mut req = request_head(&[
            format!("stripe-signature: {first}"),
            format!("stripe-signature: {second}"),
            format!("content-length: {}", body.len()),
        ]);
        req.extend_from_slice(&body);
        conn.write_all(&req).await.unwrap();
        let answer = read_answer(&mut conn, Duration::from_secs(5)).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
        assert!(answer.contains("duplicate_signature"), "{answer}");
    }
    assert!(s.log.lock().unwrap().is_empty());
    assert_eq!(rejected_count(&s, RejectReason::DuplicateSignature), 3);
    // the same request with one header passes
    assert_eq!(post(&s, "/hook", body, Some(good)).await.0, StatusCode::OK);
}

#[tokio::test]
async fn header_checks_answer_before_a_single_body_byte_is_sent() {
    let a = secret("a");
    let s = setup(&[&a], |c| {
        c.max_body = 4096;
        c.body_timeout = Duration::from_secs(30);
    })
    .await;
    let body = event("evt_cheap");
    let stale = sign(&body, std::slice::from_ref(&a), now() - 301);
    let cases: Vec<(Vec<String>, &str, RejectReason)> = vec![
        (vec![], "400", RejectReason::MissingSignature),
        (
            vec!["stripe-signature: garbage".into()],
            "400",
            RejectReason::MalformedSignature,
        ),
        (
            vec![format!("stripe-signature: {stale}")],
            "400",
            RejectReason::TimestampOutsideTolerance,
        ),
        (
            vec![format!(
                "stripe-signature: {}",
                sign(&body, std::slice::from_ref(&a), now())
            )],
            "413",
            RejectReason::BodyTooLarge,
        ),
    ];
    for (headers, status, reason) in cases {
        let mut headers = headers;
        let declared = if reason == RejectReason::BodyTooLarge {
            4097
        } else {
            body.len()
        };
        headers.push(format!("content-length: {declared}"));
        let mut conn = TcpStream::connect(s.proxy.addr()).await.unwrap();
        conn.write_all(&request_head(&headers)).await.unwrap();
        // no body is ever sent: the answer must not wait for it
        let answer = read_answer(&mut conn, Duration::from_secs(3)).await;
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status}")),
            "{reason:?}: {answer}"
        );
        assert!(answer.contains(reason.as_str()), "{reason:?}: {answer}");
    }
    assert_eq!(
        s.proxy.peak_body_bytes_buffered(),
        0,
        "no body was buffered"
    );

    // a replay is also refused from its header alone
    let sig = sign(&body, std::slice::from_ref(&a), now());
    assert_eq!(
        post(&s, "/hook", body.clone(), Some(sig.clone())).await.0,
        StatusCode::OK
    );
    let mut conn = TcpStream::connect(s.proxy.addr()).await.unwrap();
    conn.write_all(&request_head(&[
        format!("stripe-signature: {sig}"),
        format!("content-length: {}", body.len()),
    ]))
    .await
    .unwrap();
    let answer = read_answer(&mut conn, Duration::from_secs(3)).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("replayed_event"), "{answer}");
    assert_eq!(s.log.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn a_slow_body_gets_408_and_an_aborted_body_is_counted_as_client_aborted() {
    let a = secret("a");
    let s = setup(&[&a], |c| c.body_timeout = Duration::from_millis(400)).await;
    let body = event("evt_slow");
    let head = request_head(&[
        format!(
            "stripe-signature: {}",
            sign(&body, std::slice::from_ref(&a), now())
        ),
        format!("content-length: {}", body.len()),
    ]);

    // the body starts but never completes
    let mut conn = TcpStream::connect(s.proxy.addr()).await.unwrap();
    conn.write_all(&head).await.unwrap();
    conn.write_all(&body[..10]).await.unwrap();
    let started = Instant::now();
    let answer = read_answer(&mut conn, Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("body_timeout"), "{answer}");
    assert!(started.elapsed() >= Duration::from_millis(300));

    // the client goes away in the middle of its body
    let mut conn = TcpStream::connect(s.proxy.addr()).await.unwrap();
    conn.write_all(&head).await.unwrap();
    conn.write_all(&body[..10]).await.unwrap();
    wait_until("the request is in flight", Duration::from_secs(5), || {
        s.proxy.metrics().requests_in_flight.get() == 1
    })
    .await;
    drop(conn);
    wait_until("the abort is counted", Duration::from_secs(5), || {
        rejected_count(&s, RejectReason::ClientAborted) == 1
    })
    .await;
    assert_eq!(rejected_count(&s, RejectReason::BodyTooLarge), 0);
    assert_eq!(rejected_count(&s, RejectReason::BodyTimeout), 1);
    assert!(s.log.lock().unwrap().is_empty());
    wait_until("nothing is in flight", Duration::from_secs(5), || {
        s.proxy.metrics().requests_in_flight.get() == 0
            && s.proxy.metrics().body_bytes_buffered.get() == 0
    })
    .await;
    let (status, _) = post(
        &s,
        "/hook",
        body.clone(),
        Some(sign(&body, std::slice::from_ref(&a), now())),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn slow_headers_and_idle_connections_are_closed_after_the_header_timeout() {
    let a = secret("a");
    let s = setup(&[&a], |c| c.header_timeout = Duration::from_millis(500)).await;
    // connects and sends nothing
    let mut idle = TcpStream::connect(s.proxy.addr()).await.unwrap();
    // sends its headers a line at a time, forever (slow-loris)
    let mut slow = TcpStream::connect(s.proxy.addr()).await.unwrap();
    slow.write_all(b"POST /hook HTTP/1.1\r\n").await.unwrap();
    let (mut slow_read, mut slow_write) = slow.into_split();
    let writer = tokio::spawn(async move {
        let mut sent = 0;
        while slow_write.write_all(b"x-slow: 1\r\n").await.is_ok() && sent < 100 {
            sent += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        sent
    });
    let started = Instant::now();
    assert!(closed_within(&mut idle, Duration::from_secs(3)).await);
    let mut buf = [0u8; 64];
    let closed = tokio::time::timeout(Duration::from_secs(3), async {
        loop {
            match slow_read.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the slow-loris connection was not closed");
    assert!(started.elapsed() >= Duration::from_millis(400));
    let sent = writer.await.unwrap();
    assert!(sent < 100, "the slow writer was cut off after {sent} lines");
    wait_until("no connection is open", Duration::from_secs(3), || {
        s.proxy.metrics().connections_open.get() == 0
    })
    .await;
    assert!(s.log.lock().unwrap().is_empty());
}

#[tokio::test]
async fn connections_beyond_the_bound_are_refused_until_idle_ones_time_out() {
    let a = secret("a");
    let s = setup(&[&a], |c| {
        c.max_connections = 4;
        c.header_timeout = Duration::from_millis(800);
    })
    .await;
    let mut idle = Vec::new();
    for _ in 0..4 {
        idle.push(TcpStream::connect(s.proxy.addr()).await.unwrap());
    }
    wait_until("4 connections are open", Duration::from_secs(3), || {
        s.proxy.metrics().connections_open.get() == 4
    })
    .await;
    let mut fifth = TcpStream::connect(s.proxy.addr()).await.unwrap();
    let answer = read_answer(&mut fifth, Duration::from_secs(3)).await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer:?}");
    assert_eq!(s.proxy.metrics().connections_refused.get(), 1);
    // the idle ones are closed by the header timeout, and deliveries are served again
    wait_until(
        "the idle connections are closed",
        Duration::from_secs(5),
        || s.proxy.metrics().connections_open.get() == 0,
    )
    .await;
    let body = event("evt_after_flood");
    let (status, _) = post(
        &s,
        "/hook",
        body.clone(),
        Some(sign(&body, std::slice::from_ref(&a), now())),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn requests_beyond_the_in_flight_bound_get_503_overloaded() {
    let a = secret("a");
    let s = setup(&[&a], |c| {
        c.max_concurrent_requests = 2;
        c.body_timeout = Duration::from_secs(20);
    })
    .await;
    let mut slow = Vec::new();
    for i in 0..2 {
        let body = event(&format!("evt_holding_{i}"));
        let mut conn = TcpStream::connect(s.proxy.addr()).await.unwrap();
        conn.write_all(&request_head(&[
            format!(
                "stripe-signature: {}",
                sign(&body, std::slice::from_ref(&a), now())
            ),
            format!("content-length: {}", body.len()),
        ]))
        .await
        .unwrap();
        conn.write_all(&body[..5]).await.unwrap();
        slow.push((conn, body));
    }
    wait_until("2 requests are in flight", Duration::from_secs(5), || {
        s.proxy.metrics().requests_in_flight.get() == 2
    })
    .await;
    let body = event("evt_third");
    let sig = sign(&body, std::slice::from_ref(&a), now());
    let (status, text) = post(&s, "/hook", body.clone(), Some(sig.clone())).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(text.trim(), "overloaded");
    // the two finish their bodies and are served
    for (mut conn, body) in slow {
        conn.write_all(&body[5..]).await.unwrap();
        let answer = read_answer(&mut conn, Duration::from_secs(5)).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }
    // Stripe retries the refused delivery (a new signature) and it passes
    let retry = sign(&body, std::slice::from_ref(&a), now() + 1);
    assert_eq!(post(&s, "/hook", body, Some(retry)).await.0, StatusCode::OK);
    assert_eq!(s.log.lock().unwrap().len(), 3);
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// A bounded attack (about 4 s, 127.0.0.1): slow-loris clients that send their headers a line
/// at a time, clients that trickle a declared body, and clients that send oversized bodies
/// (declared or streamed), while valid deliveries keep arriving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_loris_slow_body_and_oversized_clients_leave_memory_bounded_and_valid_deliveries_served()
 {
    const MAX_BODY: usize = 64 * 1024;
    const IN_FLIGHT: usize = 16;
    const MAX_CONNECTIONS: usize = 96;
    const ATTACK: Duration = Duration::from_secs(4);
    let a = secret("a");
    let s = Arc::new(
        setup(&[&a], |c| {
            c.max_body = MAX_BODY;
            c.max_concurrent_requests = IN_FLIGHT;
            c.max_connections = MAX_CONNECTIONS;
            c.header_timeout = Duration::from_millis(700);
            c.body_timeout = Duration::from_millis(700);
        })
        .await,
    );
    let addr = s.proxy.addr();
    let rss_before = rss_kib();
    let stop = Instant::now() + ATTACK;
    let mut attackers = tokio::task::JoinSet::new();
    // 40 slow-loris clients, reconnecting whenever they are cut off
    let loris_connections = Arc::new(AtomicUsize::new(0));
    for _ in 0..40 {
        let n = loris_connections.clone();
        attackers.spawn(async move {
            while Instant::now() < stop {
                let Ok(mut c) = TcpStream::connect(addr).await else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                n.fetch_add(1, Ordering::SeqCst);
                let mut line: &[u8] = b"POST /hook HTTP/1.1\r\n";
                while Instant::now() < stop && c.write_all(line).await.is_ok() {
                    line = b"x-slow: 1\r\n";
                    tokio::time::sleep(Duration::from_millis(150)).await;
                }
            }
        });
    }
    // 6 clients that declare a 60 KB body and trickle it (a fresh, well-formed forged header)
    let forged = secret("attacker");
    for i in 0..6 {
        let forged = forged.clone();
        attackers.spawn(async move {
            while Instant::now() < stop {
                let Ok(mut c) = TcpStream::connect(addr).await else {
                    continue;
                };
                let head = request_head(&[
                    format!(
                        "stripe-signature: {}",
                        sign(
                            format!("{i}").as_bytes(),
                            std::slice::from_ref(&forged),
                            now()
                        )
                    ),
                    "content-length: 60000".into(),
                ]);
                if c.write_all(&head).await.is_err() {
                    continue;
                }
                while Instant::now() < stop && c.write_all(&[b'x'; 100]).await.is_ok() {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        });
    }
    // 8 oversized clients: half declare 10 MiB, half stream 1 MiB chunked
    static CHUNK: [u8; 16 * 1024] = [b'z'; 16 * 1024];
    for i in 0..8 {
        let forged = forged.clone();
        attackers.spawn(async move {
            while Instant::now() < stop {
                let Ok(mut c) = TcpStream::connect(addr).await else {
                    continue;
                };
                let sig = format!(
                    "stripe-signature: {}",
                    sign(b"big", std::slice::from_ref(&forged), now())
                );
                if i % 2 == 0 {
                    let _ = c
                        .write_all(&request_head(&[sig, "content-length: 10485760".into()]))
                        .await;
                    let _ = read_answer(&mut c, Duration::from_secs(2)).await;
                } else {
                    let _ = c
                        .write_all(&request_head(&[sig, "transfer-encoding: chunked".into()]))
                        .await;
                    for _ in 0..64 {
                        if c.write_all(format!("{:x}\r\n", CHUNK.len()).as_bytes())
                            .await
                            .is_err()
                            || c.write_all(&CHUNK).await.is_err()
                            || c.write_all(b"\r\n").await.is_err()
                        {
                            break;
                        }
                    }
                    let _ = read_answer(&mut c, Duration::from_secs(2)).await;
                }
            }
        });
    }
    // valid deliveries from 4 clients throughout
    let mut valid = tokio::task::JoinSet::new();
    for client in 0..4 {
        let (s, a) = (s.clone(), a.clone());
        valid.spawn(async move {
            let (mut ok, mut errors) = (0usize, Vec::new());
            let mut i = 0;
            while Instant::now() < stop {
                let body = event(&format!("evt_valid_{client}_{i}"));
                i += 1;
                let sig = sign(&body, std::slice::from_ref(&a), now());
                match s
                    .http
                    .post(format!("{}/hook", s.proxy.url()))
                    .header("stripe-signature", sig)
                    .body(body)
                    .send()
                    .await
                {
                    Ok(r) if r.status() == StatusCode::OK => ok += 1,
                    Ok(r) => errors.push(format!("status {}", r.status())),
                    Err(e) => errors.push(e.to_string()),
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (ok, errors)
        });
    }
    let (mut rss_peak, mut connections_peak) = (rss_before, 0);
    while Instant::now() < stop {
        rss_peak = rss_peak.max(rss_kib());
        connections_peak = connections_peak.max(s.proxy.metrics().connections_open.get());
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let (mut ok, mut errors) = (0, Vec::new());
    while let Some(r) = valid.join_next().await {
        let (o, e) = r.unwrap();
        ok += o;
        errors.extend(e);
    }
    // every attacker stops by itself shortly after `stop`
    tokio::time::timeout(Duration::from_secs(10), async {
        while attackers.join_next().await.is_some() {}
    })
    .await
    .expect("the attackers stop");

    assert!(
        errors.is_empty(),
        "{} valid deliveries failed, first: {:?}",
        errors.len(),
        errors.first()
    );
    assert!(ok >= 20, "only {ok} valid deliveries in {ATTACK:?}");
    assert_eq!(
        s.log.lock().unwrap().len(),
        ok,
        "only valid deliveries were forwarded"
    );
    let peak = s.proxy.peak_body_bytes_buffered();
    assert!(
        peak <= (IN_FLIGHT * MAX_BODY) as u64,
        "{peak} body bytes held at once, bound {}",
        IN_FLIGHT * MAX_BODY
    );
    assert!(connections_peak <= MAX_CONNECTIONS as i64);
    assert!(
        loris_connections.load(Ordering::SeqCst) >= 80,
        "slow-loris connections were not cut off: {} in {ATTACK:?}",
        loris_connections.load(Ordering::SeqCst)
    );
    assert!(rejected_count(&s, RejectReason::BodyTooLarge) > 0);
    assert!(rejected_count(&s, RejectReason::BodyTimeout) > 0);
    let grown_mib = rss_peak.saturating_sub(rss_before) / 1024;
    assert!(
        grown_mib < 64,
        "the process grew by {grown_mib} MiB under attack"
    );
    // everything is released once the attack is over
    wait_until("the connections are closed", Duration::from_secs(5), || {
        s.proxy.metrics().connections_open.get() == 0
    })
    .await;
    assert_eq!(s.proxy.metrics().body_bytes_buffered.get(), 0);
    assert_eq!(s.proxy.metrics().requests_in_flight.get(), 0);
    eprintln!(
        "valid deliveries {ok}, slow-loris connections {}, peak body bytes {peak}, peak \
         connections {connections_peak}, RSS growth {grown_mib} MiB",
        loris_connections.load(Ordering::SeqCst)
    );
}

#[tokio::test]
async fn the_metrics_exposition_has_every_documented_metric_and_promtool_accepts_it() {
    let a = secret("a");
    let key_dir = tempfile::tempdir().unwrap();
    std::fs::write(key_dir.path().join("STRIPE_API_KEY"), "rk_test_metrics").unwrap();
    // confirmation enabled, Stripe unreachable: fail open forwards
    let unreachable = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let s = setup(&[&a], |c| {
        let mut confirm = stripe_key_operator::webhook::proxy::ConfirmConfig::new(
            SecretsSource::new(key_dir.path(), "STRIPE_API_KEY"),
        );
        confirm.api_base = unreachable.parse().unwrap();
        c.confirm = Some(confirm);
    })
    .await;
    let body = serde_json::to_vec(&json!({"id": "evt_metrics", "object": "event",
        "type": "charge.succeeded", "created": now(), "data": {"object": {"id": "ch_1"}}}))
    .unwrap();
    post(
        &s,
        "/hook",
        body.clone(),
        Some(sign(&body, std::slice::from_ref(&a), now())),
    )
    .await;
    post(
        &s,
        "/hook",
        body.clone(),
        Some(sign(&body, std::slice::from_ref(&secret("x")), now())),
    )
    .await;
    let text = metrics_text(&s).await;
    for line in [
        "stripe_key_operator_webhook_proxy_confirmations_total{outcome=\"unavailable_forwarded\"} 1",
        "stripe_key_operator_webhook_proxy_confirmations_total{outcome=\"forged\"} 0",
        "stripe_key_operator_webhook_proxy_rejected_total{reason=\"duplicate_signature\"} 0",
    ] {
        assert!(text.contains(line), "{line} missing:\n{text}");
    }
    for name in [
        "verified_total",
        "rejected_total",
        "failure_events_total",
        "incidents_total",
        "incident_report_failures_total",
        "confirmations_total",
        "connections_open",
        "connections_refused_total",
        "requests_in_flight",
        "body_bytes_buffered",
        "forward_duration_seconds",
        "secrets_loaded",
        "secret_reloads_total",
        "replay_cache_entries",
        "replay_cache_evictions_total",
    ] {
        assert!(
            text.contains(&format!("stripe_key_operator_webhook_proxy_{name}")),
            "{name} missing:\n{text}"
        );
    }
    let tools = Path::new(env!("CARGO_MANIFEST_DIR")).join(".ci/cache/bin");
    let path = format!(
        "{}:{}",
        tools.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .env("PATH", path)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool is on PATH: run `make test` (it installs it with .ci/install-tools.sh)");
    {
        use std::io::Write as _;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool rejected the exposition:\n{}{}\n---\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
