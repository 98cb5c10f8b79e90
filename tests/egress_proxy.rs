//! The egress key broker against the Stripe simulator (and, for byte-level checks, a local
//! recording upstream): requests through the broker succeed with the real key while the
//! application holds only the placeholder; requests outside the key's permissions and requests
//! that carry a literal key are refused locally; headers and streamed bodies pass unchanged;
//! `/usage` counts; a rotation under steady traffic switches keys with no failed request and
//! no rollout; the broker and the simulator enforce one route table; the sidecar's logs carry
//! no key, placeholder or body.
//!
//! The kubelet's Secret volume is emulated as the kubelet writes it: files are symlinks into
//! `..data`, which points at a versioned directory and is swapped atomically.

#[path = "common/stripe_harness.rs"]
mod harness;
#[path = "common/operator.rs"]
mod operator;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::response::Response;
use http_body_util::BodyExt as _;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use operator::*;
use serde_json::{Value, json};
use stripe_key_operator::egress::anomaly::{
    AnomalyAction, AnomalyPolicy, RecordedAction, RecordingSink,
};
use stripe_key_operator::egress::proxy::{
    AnomalySetup, DEFAULT_ANOMALY_ENTRY, DEFAULT_KEY_ENTRY, DEFAULT_PERMISSIONS_ENTRY,
    DEFAULT_PLACEHOLDER_ENTRY, EgressConfig, EgressHandle, EgressProxy, PLACEHOLDER_PREFIX,
    SinkFactory, parse_anomaly_file, placeholder_for,
};
use stripe_key_operator::egress::routes::{ROUTES, ROUTES_VERSION};
use stripe_key_operator::sandbox::env::EnvOptions;
use stripe_key_operator::sim::{SimConfig, SimHandle};
use stripe_key_operator::stripe::StripeClient;
use stripe_key_operator::stripe::config::Mode;

const ACCT: &str = "acct_broker1";

/// A made-up Stripe key, assembled at run time so that no literal key is committed.
fn fake_key(prefix: &str, rest: &str) -> String {
    format!("{prefix}{rest}")
}

/// A Secret volume written the way the kubelet writes it.
struct Volume {
    dir: tempfile::TempDir,
    version: u32,
}

impl Volume {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
            version: 0,
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes a new version of the volume and swaps `..data` to it atomically.
    fn write(&mut self, entries: &BTreeMap<String, String>) {
        self.version += 1;
        let name = format!("..v{}", self.version);
        let version_dir = self.path().join(&name);
        std::fs::create_dir(&version_dir).unwrap();
        for (k, v) in entries {
            std::fs::write(version_dir.join(k), v).unwrap();
        }
        let tmp = self.path().join("..data_tmp");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&name, &tmp).unwrap();
        std::fs::rename(&tmp, self.path().join("..data")).unwrap();
        for k in entries.keys() {
            let link = self.path().join(k);
            if std::fs::symlink_metadata(&link).is_err() {
                std::os::unix::fs::symlink(format!("..data/{k}"), &link).unwrap();
            }
        }
        if self.version > 2 {
            let _ = std::fs::remove_dir_all(self.path().join(format!("..v{}", self.version - 2)));
        }
    }
}

fn entries(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// The broker's entries of a Secret (what the sidecar's volume mounts with `items:`).
fn sidecar_items(secret: &Secret) -> BTreeMap<String, String> {
    [
        DEFAULT_KEY_ENTRY,
        DEFAULT_PERMISSIONS_ENTRY,
        DEFAULT_PLACEHOLDER_ENTRY,
        DEFAULT_ANOMALY_ENTRY,
    ]
    .iter()
    .filter_map(|k| secret_value(secret, k).map(|v| ((*k).to_owned(), v)))
    .collect()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn broker_config(upstream: &str, dir: &Path) -> EgressConfig {
    let mut c = EgressConfig::new(upstream.parse().unwrap(), dir);
    c.allow_loopback_upstream = true;
    c.reload_interval = Duration::from_millis(50);
    c
}

async fn usage(handle: &EgressHandle) -> Value {
    reqwest::get(format!("http://{}/usage", handle.admin_addr().unwrap()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

fn sim_config() -> SimConfig {
    let mut c = SimConfig::new().with_account(ACCT, Mode::Test);
    c.rate_limit_test = 100_000;
    c
}

/// Mints a key with `permissions` on the simulator; its token.
async fn mint(sim: &SimHandle, name: &str, permissions: &[&str]) -> String {
    let client = StripeClient::new(harness::fast_config(sim, ACCT)).unwrap();
    let key = client
        .create_api_key(&harness::secret_key_params(name, permissions), name)
        .await
        .unwrap()
        .value;
    key.plaintext_secret().unwrap().expose().to_owned()
}

fn concrete(pattern: &str) -> String {
    pattern.replace("{id}", "obj_1")
}

async fn call(
    base: &str,
    method: &str,
    path: &str,
    token: &str,
) -> (u16, Value, reqwest::header::HeaderMap) {
    let resp = reqwest::Client::new()
        .request(method.parse().unwrap(), format!("{base}{path}"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.json().await.unwrap_or(Value::Null);
    (status, body, headers)
}

#[tokio::test]
async fn brokered_policy_serves_the_app_with_a_placeholder_and_rotates_under_traffic_without_rollout()
 {
    let env = env_with(EnvOptions {
        sim_rate_limit_test: 100_000,
        ..EnvOptions::default()
    })
    .await;
    let port = free_port();
    env.apply_json(&json!({
        "apiVersion": "stripekeys.io/v1alpha1", "kind": "StripeKeyPolicy",
        "metadata": {"name": "checkout", "namespace": NS},
        "spec": {
            "accountRef": {"name": ACCOUNT},
            "permissions": ["charge_read", "customer_write"],
            "delivery": {"secret": {"name": "checkout-stripe-key"}, "broker": {"port": port}},
            "rotation": {"every": "720h", "overlap": "1h"}
        }
    }))
    .await
    .unwrap();
    let p = wait_policy(&env, "checkout", "the first key", ready).await;
    let first = p.status.as_ref().unwrap().current_key.clone().unwrap();

    // what the application sees: the placeholder and the broker's address, never the key
    let secrets: Api<Secret> = Api::namespaced(env.client.clone(), NS);
    let secret = secrets.get("checkout-stripe-key").await.unwrap();
    let app_key = secret_value(&secret, "STRIPE_API_KEY").unwrap();
    let api_base = secret_value(&secret, "STRIPE_API_BASE").unwrap();
    let real = secret_value(&secret, "STRIPE_BROKER_API_KEY").unwrap();
    assert!(app_key.starts_with(PLACEHOLDER_PREFIX), "a placeholder");
    assert_eq!(api_base, format!("http://127.0.0.1:{port}"));
    assert!(real.starts_with("rk_test_"));
    assert_eq!(
        fingerprint(&real),
        first.fingerprint,
        "the real key is the current one"
    );
    assert_eq!(
        secret_value(&secret, "STRIPE_BROKER_PERMISSIONS").as_deref(),
        Some("charge_read,customer_write")
    );
    assert_eq!(secret_value(&secret, "STRIPE_API_KEY_PREVIOUS"), None);

    let deployments: Api<Deployment> = Api::namespaced(env.client.clone(), NS);
    let before = deployments.get("checkout").await.unwrap();

    let volume = Arc::new(Mutex::new(Volume::new()));
    volume.lock().unwrap().write(&sidecar_items(&secret));
    let dir = volume.lock().unwrap().path().to_owned();
    let mut config = broker_config(&env.sim.base_url(), &dir);
    config.listen = format!("127.0.0.1:{port}").parse().unwrap();
    let broker = EgressProxy::start(config).await.unwrap();
    assert_eq!(
        broker.key_fingerprint().as_deref(),
        Some(first.fingerprint.as_str())
    );

    // an allowed request reaches the simulator with the real key (the simulator resolves it to
    // the account; the placeholder would be a 401 without an account)
    let log_len = env.sim.request_log().len();
    let (status, body, _) = call(&api_base, "GET", "/v1/charges?limit=3", &app_key).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "list");
    let log = env.sim.request_log();
    assert_eq!(log.len(), log_len + 1);
    let seen = log.last().unwrap();
    assert_eq!(
        (seen.path.as_str(), seen.query.as_str()),
        ("/v1/charges", "limit=3")
    );
    assert_eq!(seen.account.as_deref(), Some(env.account_id.as_str()));
    assert_eq!(seen.status, Some(200));
    let resp = reqwest::Client::new()
        .post(format!("{api_base}/v1/customers"))
        .bearer_auth(&app_key)
        .header("Idempotency-Key", "cust-1")
        .form(&[("email", "a@example.com")])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(
        env.sim
            .request_log()
            .last()
            .unwrap()
            .idempotency_key
            .as_deref(),
        Some("cust-1")
    );

    // outside the permissions: refused locally, naming the permission; Stripe sees nothing
    let log_len = env.sim.request_log().len();
    let (status, body, headers) = call(&api_base, "POST", "/v1/refunds", &app_key).await;
    assert_eq!(status, 403);
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert_eq!(body["error"]["code"], "broker_permission_missing");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("'refund_write'"),
        "{body}"
    );
    assert_eq!(headers["stripe-should-retry"], "false");
    // a literal key is refused, even the right one
    let (status, body, _) = call(&api_base, "GET", "/v1/charges", &real).await;
    assert_eq!(status, 403);
    assert_eq!(body["error"]["code"], "literal_api_key_refused");
    assert!(!body.to_string().contains(&real));
    // neither is forwarded
    assert_eq!(
        env.sim.request_log().len(),
        log_len,
        "no request left the pod"
    );

    let report = usage(&broker).await;
    assert_eq!(report["routesVersion"], ROUTES_VERSION);
    assert_eq!(report["keyFingerprint"], first.fingerprint.as_str());
    assert_eq!(report["permissions"]["charge_read"]["count"], 1);
    assert_eq!(report["permissions"]["customer_write"]["count"], 1);
    assert_eq!(report["refused"]["refund_write"]["count"], 1);
    assert!(report["permissions"].get("refund_write").is_none());
    for t in [
        report["since"].as_str().unwrap(),
        report["permissions"]["charge_read"]["lastSeen"]
            .as_str()
            .unwrap(),
    ] {
        chrono::DateTime::parse_from_rfc3339(t).unwrap();
    }

    // a rotation under steady traffic
    let stop = Arc::new(AtomicBool::new(false));
    let kubelet = {
        let (stop, volume, secrets) = (stop.clone(), volume.clone(), secrets.clone());
        tokio::spawn(async move {
            let mut last = BTreeMap::new();
            while !stop.load(Ordering::Relaxed) {
                if let Ok(s) = secrets.get("checkout-stripe-key").await {
                    let items = sidecar_items(&s);
                    if items != last {
                        volume.lock().unwrap().write(&items);
                        last = items;
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let ok = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut traffic = Vec::new();
    for _ in 0..4 {
        let (stop, ok, failures) = (stop.clone(), ok.clone(), failures.clone());
        let (base, token) = (api_base.clone(), app_key.clone());
        traffic.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            while !stop.load(Ordering::Relaxed) {
                match client
                    .get(format!("{base}/v1/charges"))
                    .bearer_auth(&token)
                    .send()
                    .await
                {
                    Ok(r) if r.status().is_success() => {
                        let _ = r.bytes().await;
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(r) => failures
                        .lock()
                        .unwrap()
                        .push(format!("status {}", r.status())),
                    Err(e) => failures.lock().unwrap().push(format!("{e}")),
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    annotate(
        &env,
        "checkout",
        json!({"stripekeys.io/rotate": "broker-1"}),
    )
    .await;
    let p = wait_policy(&env, "checkout", "the rotated key", |p| {
        p.status
            .as_ref()
            .and_then(|s| s.current_key.as_ref())
            .is_some_and(|k| k.id != first.id)
    })
    .await;
    let second = p.status.as_ref().unwrap().current_key.clone().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while broker.key_fingerprint().as_deref() != Some(second.fingerprint.as_str()) {
        assert!(Instant::now() < deadline, "the broker never switched keys");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ok_at_switch = ok.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    for t in traffic {
        t.await.unwrap();
    }
    kubelet.await.unwrap();
    let failures = failures.lock().unwrap().clone();
    assert!(
        failures.is_empty(),
        "failed requests across the rotation: {failures:?}"
    );
    let total = ok.load(Ordering::Relaxed);
    assert!(
        total > ok_at_switch && ok_at_switch > 10,
        "traffic flowed before and after the switch ({ok_at_switch} then {total})"
    );
    let report = usage(&broker).await;
    assert_eq!(report["keyFingerprint"], second.fingerprint.as_str());
    assert_eq!(report["permissions"]["charge_read"]["count"], total + 1);
    // the old key stays valid for the overlap (requests in flight on it finish)
    let old = sim_keys(&env)
        .into_iter()
        .find(|k| k.id == first.id)
        .unwrap();
    assert_eq!(old.status, "active");
    // the application's environment did not change and nothing was rolled
    let secret = secrets.get("checkout-stripe-key").await.unwrap();
    assert_eq!(secret_value(&secret, "STRIPE_API_KEY").unwrap(), app_key);
    assert_eq!(secret_value(&secret, "STRIPE_API_BASE").unwrap(), api_base);
    let after = deployments.get("checkout").await.unwrap();
    assert_eq!(after.metadata.generation, before.metadata.generation);
    assert_eq!(
        after.spec.unwrap().template.metadata.unwrap().annotations,
        before.spec.unwrap().template.metadata.unwrap().annotations,
        "no rollout"
    );
    let metrics = broker.metrics().encode();
    assert!(
        metrics.contains(&format!(
            "stripe_key_operator_egress_requests_total{{permission=\"charge_read\",outcome=\"forwarded\"}} {}",
            total + 1
        )),
        "{metrics}"
    );
    assert!(metrics.contains(
        "stripe_key_operator_egress_requests_total{permission=\"refund_write\",outcome=\"refused_permission\"} 1"
    ));
    assert!(metrics.contains(
        "stripe_key_operator_egress_requests_total{permission=\"charge_read\",outcome=\"refused_literal_key\"} 1"
    ));
    for text in [metrics, usage(&broker).await.to_string()] {
        assert!(!text.contains(&real) && !text.contains(&app_key));
    }
    broker.shutdown().await;
}

/// What the recording upstream saw of one request.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path_and_query: String,
    headers: axum::http::HeaderMap,
    body_len: usize,
    body_sha256: String,
}

#[derive(Default)]
struct Upstream {
    seen: Mutex<Vec<Seen>>,
    release: tokio::sync::Notify,
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes).as_ref())
}

/// A deterministic body of `len` bytes.
fn pattern_body(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ ((i >> 8) as u8))
        .collect()
}

const LARGE: usize = 3 * 1024 * 1024 + 17;

async fn upstream_handler(State(up): State<Arc<Upstream>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    up.seen.lock().unwrap().push(Seen {
        method: parts.method.to_string(),
        path_and_query: parts.uri.path_and_query().unwrap().to_string(),
        headers: parts.headers.clone(),
        body_len: bytes.len(),
        body_sha256: sha256_hex(&bytes),
    });
    if parts.uri.path() == "/v1/events" {
        // a first chunk, then the rest only when the test says so: the client can read the
        // first chunk only if the broker streams
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(2);
        tokio::spawn(async move {
            let _ = tx.send(Ok(Bytes::from_static(b"{\"first\":true,"))).await;
            up.release.notified().await;
            let _ = tx.send(Ok(Bytes::from_static(b"\"rest\":true}"))).await;
        });
        let stream = tokio_stream_from(rx);
        return Response::builder()
            .status(200)
            .header("content-type", "application/json")
            .body(Body::from_stream(stream))
            .unwrap();
    }
    let large = pattern_body(LARGE, 7);
    let chunks: Vec<Result<Bytes, std::io::Error>> = large
        .chunks(64 * 1024)
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect();
    Response::builder()
        .status(201)
        .header("content-type", "application/json")
        .header("request-id", "req_upstream1")
        .header("stripe-version", "2026-10-14.preview")
        .header("x-multi", "a")
        .header("x-multi", "b")
        .header("x-request-body-sha256", sha256_hex(&bytes))
        .body(Body::from_stream(futures::stream::iter(chunks)))
        .unwrap()
}

fn tokio_stream_from(
    mut rx: tokio::sync::mpsc::Receiver<Result<Bytes, std::io::Error>>,
) -> impl futures::Stream<Item = Result<Bytes, std::io::Error>> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

async fn start_upstream() -> (String, Arc<Upstream>) {
    let up = Arc::new(Upstream::default());
    let app = axum::Router::new()
        .fallback(upstream_handler)
        .with_state(up.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    (format!("http://{addr}"), up)
}

#[tokio::test]
async fn headers_and_streamed_bodies_pass_unchanged_in_both_directions() {
    let (upstream, up) = start_upstream().await;
    let real = &fake_key("rk_test_", "51RecordingUpstreamKey000000000000");
    let placeholder = placeholder_for("uid-headers");
    let mut volume = Volume::new();
    volume.write(&entries(&[
        (DEFAULT_KEY_ENTRY, real),
        (DEFAULT_PERMISSIONS_ENTRY, "customer_write,event_read"),
        (DEFAULT_PLACEHOLDER_ENTRY, &placeholder),
    ]));
    let broker = EgressProxy::start(broker_config(&upstream, volume.path()))
        .await
        .unwrap();
    let request_body = pattern_body(2 * 1024 * 1024 + 5, 3);
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/customers?expand[]=sources", broker.url()))
        .bearer_auth(&placeholder)
        .header("Idempotency-Key", "idem-123")
        .header("Stripe-Version", "2026-10-14.preview")
        .header("Stripe-Context", "acct_1Context")
        .header("X-Custom", "kept")
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body(request_body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 201);
    let h = resp.headers().clone();
    assert_eq!(h["request-id"], "req_upstream1");
    assert_eq!(h["stripe-version"], "2026-10-14.preview");
    let multi: Vec<_> = h.get_all("x-multi").iter().collect();
    assert_eq!(multi, ["a", "b"]);
    assert_eq!(
        h["x-request-body-sha256"],
        sha256_hex(&request_body).as_str()
    );
    let body = resp.bytes().await.unwrap();
    assert_eq!(body.len(), LARGE);
    assert!(
        body[..] == pattern_body(LARGE, 7)[..],
        "the response body byte for byte"
    );

    let seen = up.seen.lock().unwrap().last().unwrap().clone();
    assert_eq!(seen.method, "POST");
    assert_eq!(seen.path_and_query, "/v1/customers?expand[]=sources");
    assert_eq!(seen.body_len, request_body.len());
    assert_eq!(seen.body_sha256, sha256_hex(&request_body));
    for (name, value) in [
        ("idempotency-key", "idem-123"),
        ("stripe-version", "2026-10-14.preview"),
        ("stripe-context", "acct_1Context"),
        ("x-custom", "kept"),
        ("content-type", "application/x-www-form-urlencoded"),
    ] {
        assert_eq!(seen.headers[name], value, "{name}");
    }
    assert_eq!(
        seen.headers["authorization"],
        format!("Bearer {real}").as_str()
    );
    assert_eq!(seen.headers.get_all("authorization").iter().count(), 1);
    assert_ne!(
        seen.headers["host"],
        broker.addr().to_string().as_str(),
        "Host names the upstream"
    );
    for (_, v) in &seen.headers {
        assert!(
            !String::from_utf8_lossy(v.as_bytes()).contains(&placeholder),
            "the placeholder never leaves the pod"
        );
    }

    // the response streams: the first chunk arrives while the upstream still holds the rest
    let mut resp = reqwest::Client::new()
        .get(format!("{}/v1/events", broker.url()))
        .bearer_auth(&placeholder)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let first = tokio::time::timeout(Duration::from_secs(5), resp.chunk())
        .await
        .expect("the first chunk arrives before the upstream finished")
        .unwrap()
        .unwrap();
    assert_eq!(&first[..], b"{\"first\":true,");
    up.release.notify_one();
    let rest = resp.bytes().await.unwrap();
    assert_eq!(&rest[..], b"\"rest\":true}");

    // an unlisted route and a bad placeholder are refused before anything is sent
    let count = up.seen.lock().unwrap().len();
    let (status, body, _) = call(&broker.url(), "GET", "/v1/warp_drives", &placeholder).await;
    assert_eq!(status, 403);
    assert_eq!(body["error"]["code"], "broker_route_unlisted");
    let (status, body, _) = call(
        &broker.url(),
        "GET",
        "/v1/customers",
        &placeholder_for("someone-else"),
    )
    .await;
    assert_eq!(status, 401);
    assert_eq!(body["error"]["type"], "invalid_request_error");
    let (status, _, _) = call(
        &broker.url(),
        "GET",
        "/v1/customers/../charges",
        &placeholder,
    )
    .await;
    assert_eq!(
        status, 403,
        "dot segments are never matched, so never allowed"
    );
    let resp = reqwest::Client::new()
        .get(format!("{}/v1/customers", broker.url()))
        .bearer_auth(&placeholder)
        .header(
            "X-Other-Key",
            fake_key("sk_live_", "51SomethingTheAppShouldNotHave"),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 403, "a literal key in any header");
    assert_eq!(
        up.seen.lock().unwrap().len(),
        count,
        "nothing was forwarded"
    );
    broker.shutdown().await;
}

#[tokio::test]
async fn the_broker_and_the_simulator_enforce_one_route_table() {
    let sim = harness::start_sim(sim_config()).await;
    // a key whose permission no route needs: every route is refused, by both, naming the same
    // permission
    let none = mint(&sim, "none", &["account_read"]).await;
    let mut volume = Volume::new();
    volume.write(&entries(&[
        (DEFAULT_KEY_ENTRY, &none),
        (DEFAULT_PERMISSIONS_ENTRY, "account_read"),
    ]));
    let broker = EgressProxy::start(broker_config(&sim.base_url(), volume.path()))
        .await
        .unwrap();
    let placeholder = placeholder_for("any");
    for route in ROUTES {
        let path = concrete(route.pattern);
        let (status, body, _) = call(&sim.base_url(), route.method, &path, &none).await;
        assert_eq!(status, 403, "the simulator refuses {route:?}: {body}");
        let named = format!("'{}'", route.permission);
        assert!(
            body["error"]["message"].as_str().unwrap().contains(&named),
            "{route:?}: {body}"
        );
        let before = sim.request_log().len();
        let (status, body, _) = call(&broker.url(), route.method, &path, &placeholder).await;
        assert_eq!(status, 403, "{route:?}");
        assert_eq!(body["error"]["code"], "broker_permission_missing");
        assert!(
            body["error"]["message"].as_str().unwrap().contains(&named),
            "{route:?}: {body}"
        );
        assert_eq!(
            sim.request_log().len(),
            before,
            "{route:?} was not forwarded"
        );
    }
    // a key with every permission of the table: every route is served, by both
    let mut all: Vec<&str> = ROUTES.iter().map(|r| r.permission).collect();
    all.sort_unstable();
    all.dedup();
    let every = mint(&sim, "every", &all).await;
    volume.write(&entries(&[
        (DEFAULT_KEY_ENTRY, &every),
        (DEFAULT_PERMISSIONS_ENTRY, &all.join(",")),
    ]));
    assert!(broker.reload_now().unwrap());
    for route in ROUTES {
        let path = concrete(route.pattern);
        let before = sim.request_log().len();
        let (status, body, _) = call(&broker.url(), route.method, &path, &placeholder).await;
        assert_ne!(status, 403, "{route:?}: {body}");
        assert_ne!(status, 401, "{route:?}: {body}");
        let log = sim.request_log();
        assert_eq!(log.len(), before + 1, "{route:?} was forwarded once");
        assert_eq!(log.last().unwrap().account.as_deref(), Some(ACCT));
    }
    // write implies read, on both sides
    let writer = mint(&sim, "writer", &["charge_write"]).await;
    volume.write(&entries(&[
        (DEFAULT_KEY_ENTRY, &writer),
        (DEFAULT_PERMISSIONS_ENTRY, "charge_write"),
    ]));
    broker.reload_now().unwrap();
    let (status, _, _) = call(&broker.url(), "GET", "/v1/charges/ch_1", &placeholder).await;
    assert_eq!(status, 200);
    let (status, _, _) = call(&broker.url(), "GET", "/v1/customers", &placeholder).await;
    assert_eq!(status, 403);
    broker.shutdown().await;
}

/// Text of a child's output files.
fn read_all(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| std::fs::read_to_string(p).unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test]
async fn the_sidecar_process_never_logs_a_key_the_placeholder_or_a_body() {
    let sim = harness::start_sim(sim_config()).await;
    let first = mint(&sim, "first", &["charge_read", "customer_write"]).await;
    let second = mint(&sim, "second", &["charge_read", "customer_write"]).await;
    let placeholder = placeholder_for("uid-logs");
    let mut volume = Volume::new();
    volume.write(&entries(&[
        (DEFAULT_KEY_ENTRY, &first),
        (DEFAULT_PERMISSIONS_ENTRY, "charge_read,customer_write"),
        (DEFAULT_PLACEHOLDER_ENTRY, &placeholder),
    ]));
    let (port, admin) = (free_port(), free_port());
    let out_dir = tempfile::tempdir().unwrap();
    let (out, err) = (out_dir.path().join("out"), out_dir.path().join("err"));
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_stripe-key-operator"))
        .args(["egress-proxy", "--key-dir"])
        .arg(volume.path())
        .args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--admin-addr",
            &format!("127.0.0.1:{admin}"),
            "--upstream",
            &sim.base_url(),
            "--allow-loopback-upstream",
            "--reload-interval",
            "100ms",
            "--log-format",
            "json",
        ])
        .env("RUST_LOG", "debug")
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ready = reqwest::get(format!("http://127.0.0.1:{admin}/readyz")).await;
        if ready.is_ok_and(|r| r.status().is_success()) {
            break;
        }
        assert!(Instant::now() < deadline, "the sidecar never became ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let body_marker = "email=secret-body-marker%40example.com";
    let client = reqwest::Client::new();
    let send = |method: &str, path: &str, token: &str| {
        client
            .request(method.parse().unwrap(), format!("{base}{path}"))
            .bearer_auth(token)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body_marker)
            .send()
    };
    assert_eq!(
        send("GET", "/v1/charges", &placeholder)
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        send("POST", "/v1/customers", &placeholder)
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        send("POST", "/v1/refunds", &placeholder)
            .await
            .unwrap()
            .status(),
        403
    );
    assert_eq!(
        send("GET", "/v1/charges", &first).await.unwrap().status(),
        403
    );
    assert_eq!(
        send("GET", "/v1/charges", "garbage")
            .await
            .unwrap()
            .status(),
        401
    );
    volume.write(&entries(&[
        (DEFAULT_KEY_ENTRY, &second),
        (DEFAULT_PERMISSIONS_ENTRY, "charge_read,customer_write"),
        (DEFAULT_PLACEHOLDER_ENTRY, &placeholder),
    ]));
    let usage_url = format!("http://127.0.0.1:{admin}/usage");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let u: Value = reqwest::get(&usage_url)
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if u["keyFingerprint"] == fingerprint(&second).as_str() {
            break;
        }
        assert!(Instant::now() < deadline, "the sidecar never switched keys");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        send("GET", "/v1/charges", &placeholder)
            .await
            .unwrap()
            .status(),
        200
    );
    let metrics = reqwest::get(format!("http://127.0.0.1:{admin}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let usage_text = reqwest::get(&usage_url)
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    let logs = read_all(&[out, err]);
    assert!(
        logs.contains(&fingerprint(&second)) && logs.contains("switched"),
        "the logs were captured and name the key by fingerprint: {logs}"
    );
    for (what, text) in [
        ("logs", &logs),
        ("metrics", &metrics),
        ("usage", &usage_text),
    ] {
        for secret in [&first, &second, &placeholder] {
            assert!(
                !text.contains(secret.as_str()),
                "{what} carry a key or the placeholder"
            );
        }
        assert!(!text.contains("secret-body-marker"), "{what} carry a body");
        assert!(!text.contains("rk_test_"), "{what} carry key material");
    }
}

/// Waits (bounded) until the recording upstream saw `n` requests.
async fn wait_seen(up: &Upstream, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while up.seen.lock().unwrap().len() < n {
        assert!(
            Instant::now() < deadline,
            "the upstream never saw request {n}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_key_switch_lets_requests_in_flight_finish_on_the_old_key() {
    let (upstream, up) = start_upstream().await;
    let (old, new) = (
        &fake_key("rk_test_", "51OldKeyOfTheSwitch000000000000"),
        &fake_key("rk_test_", "51NewKeyOfTheSwitch000000000000"),
    );
    let placeholder = placeholder_for("uid-switch");
    let mut volume = Volume::new();
    let write = |volume: &mut Volume, key: &str| {
        volume.write(&entries(&[
            (DEFAULT_KEY_ENTRY, key),
            (DEFAULT_PERMISSIONS_ENTRY, "event_read,customer_write"),
            (DEFAULT_PLACEHOLDER_ENTRY, &placeholder),
        ]))
    };
    write(&mut volume, old);
    let broker = EgressProxy::start(broker_config(&upstream, volume.path()))
        .await
        .unwrap();
    // a request in flight on the old key: the upstream holds its answer
    let held = {
        let (url, token) = (format!("{}/v1/events", broker.url()), placeholder.clone());
        tokio::spawn(async move {
            let resp = reqwest::Client::new()
                .get(url)
                .bearer_auth(token)
                .send()
                .await
                .unwrap();
            (resp.status().as_u16(), resp.text().await.unwrap())
        })
    };
    wait_seen(&up, 1).await;
    write(&mut volume, new);
    assert!(broker.reload_now().unwrap(), "the new key is applied");
    assert_eq!(broker.key_fingerprint(), Some(fingerprint(new)));
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/customers", broker.url()))
        .bearer_auth(&placeholder)
        .body("email=x")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 201);
    let _ = resp.bytes().await.unwrap();
    up.release.notify_one();
    let (status, body) = held.await.unwrap();
    assert_eq!(
        (status, body.as_str()),
        (200, "{\"first\":true,\"rest\":true}")
    );
    let seen = up.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2);
    assert_eq!(
        seen[0].headers["authorization"],
        format!("Bearer {old}").as_str()
    );
    assert_eq!(
        seen[1].headers["authorization"],
        format!("Bearer {new}").as_str()
    );
    assert_eq!(
        usage(&broker).await["keyFingerprint"],
        fingerprint(new).as_str()
    );
    broker.shutdown().await;
}

#[tokio::test]
async fn requests_beyond_the_concurrency_bound_get_a_retryable_503() {
    let (upstream, up) = start_upstream().await;
    let placeholder = placeholder_for("uid-bound");
    let mut volume = Volume::new();
    volume.write(&entries(&[
        (
            DEFAULT_KEY_ENTRY,
            &fake_key("rk_test_", "51BoundKey0000000000000000000"),
        ),
        (DEFAULT_PERMISSIONS_ENTRY, "event_read"),
        (DEFAULT_PLACEHOLDER_ENTRY, &placeholder),
    ]));
    let mut config = broker_config(&upstream, volume.path());
    config.max_concurrent_requests = 1;
    let broker = EgressProxy::start(config).await.unwrap();
    let held = {
        let (url, token) = (format!("{}/v1/events", broker.url()), placeholder.clone());
        tokio::spawn(async move {
            let resp = reqwest::Client::new()
                .get(url)
                .bearer_auth(token)
                .send()
                .await
                .unwrap();
            (resp.status().as_u16(), resp.bytes().await.unwrap().len())
        })
    };
    wait_seen(&up, 1).await;
    let (status, body, headers) = call(&broker.url(), "GET", "/v1/events", &placeholder).await;
    assert_eq!(status, 503);
    assert_eq!(body["error"]["code"], "broker_overloaded");
    assert_eq!(headers["stripe-should-retry"], "true");
    assert_eq!(
        up.seen.lock().unwrap().len(),
        1,
        "the second request was not forwarded"
    );
    up.release.notify_one();
    assert_eq!(held.await.unwrap().0, 200);
    // the slot is free again once the first answer is complete
    let mut resp = reqwest::Client::new()
        .get(format!("{}/v1/events", broker.url()))
        .bearer_auth(&placeholder)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let _ = resp.chunk().await.unwrap();
    up.release.notify_one();
    let _ = resp.bytes().await;
    assert!(broker.metrics().encode().contains(
        "stripe_key_operator_egress_requests_total{permission=\"event_read\",outcome=\"unavailable\"} 1"
    ));
    broker.shutdown().await;
}

/// A broker with anomaly detection on a manual clock, a key for refunds and charges, and the
/// recording sink its actions go to.
struct AnomalyRun {
    sim: SimHandle,
    broker: EgressHandle,
    sink: Arc<RecordingSink>,
    clock: Arc<AtomicU64>,
    placeholder: String,
    http: reqwest::Client,
    _volume: Volume,
}

/// Simulated start: midnight UTC.
const T0: u64 = 1_795_564_800;

impl AnomalyRun {
    async fn start(action: AnomalyAction) -> Self {
        let sim = harness::start_sim(sim_config()).await;
        let token = mint(&sim, "anomaly", &["refund_write", "charge_read"]).await;
        let placeholder = placeholder_for("anomaly-policy");
        let mut volume = Volume::new();
        volume.write(&entries(&[
            (DEFAULT_KEY_ENTRY, &token),
            (DEFAULT_PERMISSIONS_ENTRY, "refund_write,charge_read"),
            (DEFAULT_PLACEHOLDER_ENTRY, &placeholder),
        ]));
        let clock = Arc::new(AtomicU64::new(T0));
        let sink = Arc::new(RecordingSink::default());
        let mut config = broker_config(&sim.base_url(), volume.path());
        let c = clock.clone();
        let mut setup = AnomalySetup::new(
            AnomalyPolicy {
                action,
                ..Default::default()
            },
            sink.clone(),
        );
        setup.clock = Arc::new(move || UNIX_EPOCH + Duration::from_secs(c.load(Ordering::SeqCst)));
        setup.tick_interval = Duration::from_millis(20);
        config.anomaly = Some(setup);
        let broker = EgressProxy::start(config).await.unwrap();
        Self {
            sim,
            broker,
            sink,
            clock,
            placeholder,
            http: reqwest::Client::new(),
            _volume: volume,
        }
    }

    fn set_time(&self, secs_since_t0: u64) {
        self.clock.store(T0 + secs_since_t0, Ordering::SeqCst);
    }

    async fn send(&self, method: &str, path: &str) -> (u16, Value, reqwest::header::HeaderMap) {
        let resp = self
            .http
            .request(
                method.parse().unwrap(),
                format!("{}{path}", self.broker.url()),
            )
            .bearer_auth(&self.placeholder)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.json().await.unwrap_or(Value::Null);
        (status, body, headers)
    }

    fn refunds_seen(&self) -> usize {
        self.sim
            .request_log()
            .iter()
            .filter(|e| e.method == "POST" && e.path == "/v1/refunds")
            .count()
    }

    /// 2 refunds per simulated minute for 90 minutes: all forwarded, nothing flagged.
    async fn warm_up(&self) {
        for minute in 0..90 {
            for second in [10, 40] {
                self.set_time(minute * 60 + second);
                let (status, body, _) = self.send("POST", "/v1/refunds").await;
                assert_ne!(
                    status, 429,
                    "minute {minute}: steady traffic is not throttled: {body}"
                );
            }
        }
        assert_eq!(
            self.refunds_seen(),
            180,
            "every steady refund reached the simulator"
        );
        assert!(
            self.sink.actions().is_empty(),
            "steady traffic raised no alarm"
        );
    }

    /// Waits (bounded) until the sink recorded `n` actions.
    async fn wait_actions(&self, n: usize) -> Vec<RecordedAction> {
        for _ in 0..200 {
            let actions = self.sink.actions();
            if actions.len() >= n {
                return actions;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.sink.actions()
    }

    async fn metrics(&self) -> String {
        reqwest::get(format!(
            "http://{}/metrics",
            self.broker.admin_addr().unwrap()
        ))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
    }
}

/// The value of the first sample of `name` whose labels contain every one of `labels`.
fn sample(metrics: &str, name: &str, labels: &[&str]) -> Option<f64> {
    metrics
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .find(|l| labels.iter().all(|want| l.contains(want)))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test]
async fn a_refund_burst_is_throttled_locally_while_other_permissions_pass() {
    let run = AnomalyRun::start(AnomalyAction::Throttle).await;
    run.warm_up().await;
    // a 20x burst in one simulated minute: 40 refunds instead of 2
    let mut forwarded = 0;
    let mut first_throttled = None;
    for i in 0..40u64 {
        run.set_time(90 * 60 + 1 + i);
        let before = run.refunds_seen();
        let (status, body, headers) = run.send("POST", "/v1/refunds").await;
        if status == 429 {
            assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
            assert_eq!(body["error"]["code"], "rate_limit", "{body}");
            assert!(
                body["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains("refund_write"),
                "{body}"
            );
            assert_eq!(headers["stripe-should-retry"], "true");
            let retry_after: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
            assert!((1..=300).contains(&retry_after), "{retry_after}");
            assert_eq!(
                run.refunds_seen(),
                before,
                "a throttled refund never left the pod"
            );
            first_throttled.get_or_insert(i);
        } else {
            assert!(
                first_throttled.is_none(),
                "request {i} passed after the burst was throttled ({status})"
            );
            assert_eq!(run.refunds_seen(), before + 1);
            forwarded += 1;
        }
    }
    let first = first_throttled.expect("the burst was flagged and throttled within its minute");
    assert!(
        (10..=30).contains(&first),
        "flagged once the count crossed the limit (request {first})"
    );
    assert_eq!(forwarded, first);
    // later in the cool-down: refunds still answered locally, charges still served
    run.set_time(92 * 60);
    let before = run.refunds_seen();
    let (status, body, _) = run.send("POST", "/v1/refunds").await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(run.refunds_seen(), before);
    let log_len = run.sim.request_log().len();
    let (status, body, _) = run.send("GET", "/v1/charges/ch_1").await;
    assert_ne!(status, 429, "charge_read is not throttled: {body}");
    assert_eq!(
        run.sim.request_log().len(),
        log_len + 1,
        "charges are forwarded"
    );
    // after the cool-down (5 minutes by default) refunds flow again
    run.set_time(100 * 60);
    let before = run.refunds_seen();
    let (status, body, _) = run.send("POST", "/v1/refunds").await;
    assert_ne!(status, 429, "{body}");
    assert_eq!(run.refunds_seen(), before + 1);
    // the Warning Event was recorded, once, naming the permission and the action
    let actions = run.wait_actions(1).await;
    assert_eq!(actions.len(), 1, "{actions:?}");
    match &actions[0] {
        RecordedAction::Event {
            permission,
            action,
            note,
        } => {
            assert_eq!(permission, "refund_write");
            assert_eq!(*action, AnomalyAction::Throttle);
            assert!(note.contains("429"), "{note}");
        }
        other => panic!("expected a Warning Event, got {other:?}"),
    }
    // metrics: throttled requests, the anomaly, all on the proxy's /metrics
    let throttled = 40 - first + 1;
    assert_eq!(
        sample(
            &run.metrics().await,
            "stripe_key_operator_egress_requests_total",
            &["permission=\"refund_write\"", "outcome=\"throttled\""]
        ),
        Some(throttled as f64)
    );
    let text = run.metrics().await;
    assert_eq!(
        sample(
            &text,
            "stripe_key_operator_egress_throttled_requests_total",
            &["permission=\"refund_write\""]
        ),
        Some(throttled as f64)
    );
    assert_eq!(
        sample(
            &text,
            "stripe_key_operator_egress_anomalies_total",
            &["permission=\"refund_write\"", "action=\"throttle\""]
        ),
        Some(1.0)
    );
    assert_eq!(
        run.broker.usage().permissions["refund_write"].count as usize,
        run.refunds_seen(),
        "/usage counts forwarded refunds only"
    );
    run.broker.shutdown().await;
}

#[tokio::test]
async fn a_refund_burst_requests_one_incident_rotation() {
    let run = AnomalyRun::start(AnomalyAction::IncidentRotation).await;
    run.warm_up().await;
    for i in 0..40u64 {
        run.set_time(90 * 60 + 1 + i);
        let before = run.refunds_seen();
        let (status, body, _) = run.send("POST", "/v1/refunds").await;
        assert_ne!(status, 429, "IncidentRotation does not throttle: {body}");
        assert_eq!(run.refunds_seen(), before + 1);
    }
    // the burst goes on in the next minute: still one incident
    for i in 0..40u64 {
        run.set_time(91 * 60 + 1 + i);
        run.send("POST", "/v1/refunds").await;
    }
    let actions = run.wait_actions(3).await;
    let incidents: Vec<_> = actions
        .iter()
        .filter(|a| matches!(a, RecordedAction::IncidentRotation { .. }))
        .collect();
    assert_eq!(
        incidents,
        [&RecordedAction::IncidentRotation {
            permission: "refund_write".into()
        }],
        "{actions:?}"
    );
    assert!(
        actions.iter().any(|a| matches!(
            a,
            RecordedAction::Event {
                action: AnomalyAction::IncidentRotation,
                ..
            }
        )),
        "{actions:?}"
    );
    run.broker.shutdown().await;
}

/// Merges `spec` into the policy's spec (a person's `kubectl patch --type merge`).
async fn patch_spec(env: &stripe_key_operator::sandbox::env::LocalEnv, name: &str, spec: Value) {
    Api::<stripe_key_operator::api::StripeKeyPolicy>::namespaced(env.client.clone(), NS)
        .patch(
            name,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({ "spec": spec })),
        )
        .await
        .unwrap();
}

/// Waits (bounded) until the policy's Secret satisfies `pred`.
async fn wait_secret(
    secrets: &Api<Secret>,
    name: &str,
    what: &str,
    pred: impl Fn(&Secret) -> bool,
) -> Secret {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(s) = secrets.get(name).await
            && pred(&s)
        {
            return s;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `spec.delivery.broker.anomaly` end to end: the operator publishes it (with the policy's
/// name) in the Secret entry mounted into the sidecar, only while the field is set and anew
/// when it changes, without touching the key; the sidecar follows that entry with no flag: a
/// 20x refund burst is throttled locally and reported to this policy, and detection stops when
/// the field goes.
#[tokio::test]
async fn the_anomaly_field_reaches_the_sidecar_through_its_secret_volume() {
    let env = env_with(EnvOptions {
        sim_rate_limit_test: 100_000,
        ..EnvOptions::default()
    })
    .await;
    let port = free_port();
    env.apply_json(&json!({
        "apiVersion": "stripekeys.io/v1alpha1", "kind": "StripeKeyPolicy",
        "metadata": {"name": "refunds", "namespace": NS},
        "spec": {
            "accountRef": {"name": ACCOUNT},
            "permissions": ["charge_read", "refund_write"],
            "delivery": {"secret": {"name": "refunds-stripe-key"}, "broker": {"port": port}},
            "rotation": {"every": "720h", "overlap": "1h"}
        }
    }))
    .await
    .unwrap();
    let p = wait_policy(&env, "refunds", "the first key", ready).await;
    let key = p.status.as_ref().unwrap().current_key.clone().unwrap();
    let secrets: Api<Secret> = Api::namespaced(env.client.clone(), NS);
    let secret = secrets.get("refunds-stripe-key").await.unwrap();
    assert_eq!(
        secret_value(&secret, DEFAULT_ANOMALY_ENTRY),
        None,
        "no entry without the field"
    );

    // the field appears: the entry follows, with the policy's name for the sidecar's Events
    patch_spec(
        &env,
        "refunds",
        json!({"delivery": {"broker": {"port": port, "anomaly": {
            "action": "Throttle", "sigmas": 8, "warmUp": "30m", "throttleFor": "10m"}}}}),
    )
    .await;
    let secret = wait_secret(&secrets, "refunds-stripe-key", "the anomaly entry", |s| {
        secret_value(s, DEFAULT_ANOMALY_ENTRY).is_some()
    })
    .await;
    let text = secret_value(&secret, DEFAULT_ANOMALY_ENTRY).unwrap();
    let published = parse_anomaly_file("the entry", text.as_bytes()).unwrap();
    assert_eq!(published.policy.as_deref(), Some("shop/refunds"));
    assert_eq!(published.anomaly.action, AnomalyAction::Throttle);
    assert_eq!(published.anomaly.sigmas, Some(8));
    assert_eq!(published.anomaly.warm_up.as_deref(), Some("30m"));
    assert_eq!(published.anomaly.throttle_for.as_deref(), Some("10m"));
    let real = secret_value(&secret, DEFAULT_KEY_ENTRY).unwrap();
    assert!(!text.contains(&real), "the entry holds no key");

    // a change of the field changes the entry, and nothing else: same key, no rotation
    patch_spec(
        &env,
        "refunds",
        json!({"delivery": {"broker": {"anomaly": {"sigmas": 9}}}}),
    )
    .await;
    let secret = wait_secret(&secrets, "refunds-stripe-key", "the changed entry", |s| {
        secret_value(s, DEFAULT_ANOMALY_ENTRY).is_some_and(|t| t != text)
    })
    .await;
    let changed = parse_anomaly_file(
        "the entry",
        secret_value(&secret, DEFAULT_ANOMALY_ENTRY)
            .unwrap()
            .as_bytes(),
    )
    .unwrap();
    assert_eq!(changed.anomaly.sigmas, Some(9));
    assert_eq!(changed.anomaly.action, AnomalyAction::Throttle);
    assert_eq!(secret_value(&secret, DEFAULT_KEY_ENTRY).unwrap(), real);
    let p = get_policy(&env, "refunds").await;
    assert_eq!(
        p.status.as_ref().unwrap().current_key.as_ref().unwrap().id,
        key.id,
        "the anomaly policy is not part of the key: no rotation"
    );

    // the sidecar, with no anomaly flag: its policy comes from the mounted entry
    let mut volume = Volume::new();
    volume.write(&sidecar_items(&secret));
    let sink = Arc::new(RecordingSink::default());
    let targets = Arc::new(Mutex::new(Vec::<String>::new()));
    let sinks: SinkFactory = {
        let (sink, targets) = (sink.clone(), targets.clone());
        Arc::new(move |ns: &str, name: &str| {
            targets.lock().unwrap().push(format!("{ns}/{name}"));
            sink.clone() as Arc<dyn stripe_key_operator::egress::anomaly::ActionSink>
        })
    };
    let clock = Arc::new(AtomicU64::new(T0));
    let mut setup = AnomalySetup::mounted(sinks);
    let c = clock.clone();
    setup.clock = Arc::new(move || UNIX_EPOCH + Duration::from_secs(c.load(Ordering::SeqCst)));
    setup.tick_interval = Duration::from_millis(20);
    let mut config = broker_config(&env.sim.base_url(), volume.path());
    config.anomaly = Some(setup);
    let broker = EgressProxy::start(config).await.unwrap();
    assert_eq!(broker.anomaly_action(), Some(AnomalyAction::Throttle));
    assert_eq!(*targets.lock().unwrap(), ["shop/refunds"]);

    let app_key = secret_value(&secret, DEFAULT_PLACEHOLDER_ENTRY).unwrap();
    let refunds_seen = || {
        env.sim
            .request_log()
            .iter()
            .filter(|e| e.method == "POST" && e.path == "/v1/refunds")
            .count()
    };
    let url = broker.url();
    let refund = |at: u64| {
        clock.store(T0 + at, Ordering::SeqCst);
        call(&url, "POST", "/v1/refunds", &app_key)
    };
    // 2 refunds a minute for 40 minutes: learned, never flagged
    for minute in 0..40 {
        for second in [10, 40] {
            let (status, body, _) = refund(minute * 60 + second).await;
            assert_ne!(
                status, 429,
                "minute {minute}: steady traffic passes: {body}"
            );
        }
    }
    assert_eq!(refunds_seen(), 80);
    assert!(sink.actions().is_empty(), "steady traffic raised no alarm");
    // a 20x burst: 40 refunds in one minute
    let mut throttled = 0;
    for i in 0..40 {
        let before = refunds_seen();
        let (status, body, headers) = refund(40 * 60 + 1 + i).await;
        if status == 429 {
            assert_eq!(body["error"]["code"], "rate_limit", "{body}");
            assert_eq!(headers["x-stripe-broker"], "throttled");
            assert_eq!(
                refunds_seen(),
                before,
                "a throttled refund never left the pod"
            );
            throttled += 1;
        }
    }
    assert!(
        (10..40).contains(&throttled),
        "the burst was caught within the minute and the rest throttled: {throttled} of 40"
    );
    let mut actions = sink.actions();
    for _ in 0..200 {
        if !actions.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        actions = sink.actions();
    }
    assert!(
        matches!(
            actions.first(),
            Some(RecordedAction::Event { permission, action: AnomalyAction::Throttle, .. })
                if permission == "refund_write"
        ),
        "{actions:?}"
    );

    // the field goes: so does the entry, and the sidecar stops detecting (and throttling)
    Api::<stripe_key_operator::api::StripeKeyPolicy>::namespaced(env.client.clone(), NS)
        .patch(
            "refunds",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Json::<()>(
                serde_json::from_value(json!([
                    {"op": "remove", "path": "/spec/delivery/broker/anomaly"}
                ]))
                .unwrap(),
            ),
        )
        .await
        .unwrap();
    let secret = wait_secret(&secrets, "refunds-stripe-key", "the entry to go", |s| {
        secret_value(s, DEFAULT_ANOMALY_ENTRY).is_none()
    })
    .await;
    volume.write(&sidecar_items(&secret));
    let deadline = Instant::now() + Duration::from_secs(10);
    while broker.anomaly_action().is_some() {
        assert!(Instant::now() < deadline, "the sidecar kept detecting");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before = refunds_seen();
    let (status, body, _) = refund(40 * 60 + 50).await;
    assert_eq!(status, 200, "no throttle without detection: {body}");
    assert_eq!(refunds_seen(), before + 1);
    broker.shutdown().await;
}

/// The sidecar alone, driven by the mounted anomaly entry (what the operator publishes), with
/// no flag: the entry's action is carried out on a refund burst and reported to the policy the
/// entry names; an invalid entry keeps the policy in use; a changed entry is taken without a
/// restart and keeps the learned baseline (the next burst is throttled at once, no new warm-up).
#[tokio::test]
async fn the_sidecar_follows_its_mounted_anomaly_entry_and_keeps_what_it_learned() {
    let sim = harness::start_sim(sim_config()).await;
    let token = mint(&sim, "mounted", &["refund_write", "charge_read"]).await;
    let placeholder = placeholder_for("mounted-policy");
    let items = |anomaly: &str| {
        entries(&[
            (DEFAULT_KEY_ENTRY, &token),
            (DEFAULT_PERMISSIONS_ENTRY, "refund_write,charge_read"),
            (DEFAULT_PLACEHOLDER_ENTRY, &placeholder),
            (DEFAULT_ANOMALY_ENTRY, anomaly),
        ])
    };
    let mut volume = Volume::new();
    volume.write(&items(
        "policy: shop/refunds\naction: IncidentRotation\nwarmUp: 30m\n",
    ));
    let sink = Arc::new(RecordingSink::default());
    let targets = Arc::new(Mutex::new(Vec::<String>::new()));
    let sinks: SinkFactory = {
        let (sink, targets) = (sink.clone(), targets.clone());
        Arc::new(move |ns: &str, name: &str| {
            targets.lock().unwrap().push(format!("{ns}/{name}"));
            sink.clone() as Arc<dyn stripe_key_operator::egress::anomaly::ActionSink>
        })
    };
    let clock = Arc::new(AtomicU64::new(T0));
    let mut setup = AnomalySetup::mounted(sinks);
    let c = clock.clone();
    setup.clock = Arc::new(move || UNIX_EPOCH + Duration::from_secs(c.load(Ordering::SeqCst)));
    setup.tick_interval = Duration::from_millis(20);
    let mut config = broker_config(&sim.base_url(), volume.path());
    config.reload_interval = Duration::from_secs(3600); // reloads below are explicit
    config.anomaly = Some(setup);
    let broker = EgressProxy::start(config).await.unwrap();
    assert_eq!(
        broker.anomaly_action(),
        Some(AnomalyAction::IncidentRotation)
    );
    assert_eq!(*targets.lock().unwrap(), ["shop/refunds"]);

    // an invalid entry is refused and the policy in use stays
    volume.write(&items("policy: shop/refunds\naction: Explode\n"));
    let err = broker.reload_anomaly_now().unwrap_err().to_string();
    assert!(err.contains("STRIPE_BROKER_ANOMALY_POLICY"), "{err}");
    assert!(!err.contains(&token), "{err}");
    assert_eq!(
        broker.anomaly_action(),
        Some(AnomalyAction::IncidentRotation)
    );
    volume.write(&items(
        "policy: shop/refunds\naction: IncidentRotation\nwarmUp: 30m\n",
    ));
    assert!(
        !broker.reload_anomaly_now().unwrap(),
        "the entry in use is back: nothing to change"
    );
    assert_eq!(
        broker.anomaly_action(),
        Some(AnomalyAction::IncidentRotation)
    );

    let url = broker.url();
    let refund = |at: u64| {
        clock.store(T0 + at, Ordering::SeqCst);
        call(&url, "POST", "/v1/refunds", &placeholder)
    };
    for minute in 0..40 {
        for second in [10, 40] {
            let (status, body, _) = refund(minute * 60 + second).await;
            assert_eq!(status, 200, "minute {minute}: {body}");
        }
    }
    assert!(sink.actions().is_empty(), "steady traffic raised no alarm");
    // a 20x burst under IncidentRotation: forwarded, and one incident rotation requested
    for i in 0..40 {
        let (status, body, _) = refund(40 * 60 + 1 + i).await;
        assert_eq!(status, 200, "IncidentRotation does not throttle: {body}");
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while !sink
        .actions()
        .iter()
        .any(|a| matches!(a, RecordedAction::IncidentRotation { .. }))
    {
        assert!(
            Instant::now() < deadline,
            "no incident rotation: {:?}",
            sink.actions()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // the operator publishes a changed policy: Throttle, taken without a restart; the baseline
    // learned so far is kept, so the next minute's burst is throttled right away
    volume.write(&items(
        "policy: shop/refunds\naction: Throttle\nwarmUp: 30m\nthrottleFor: 2m\n",
    ));
    assert!(broker.reload_anomaly_now().unwrap());
    assert_eq!(broker.anomaly_action(), Some(AnomalyAction::Throttle));
    let mut throttled = 0;
    for i in 0..40 {
        let (status, _, _) = refund(41 * 60 + 1 + i).await;
        if status == 429 {
            throttled += 1;
        }
    }
    assert!(
        throttled >= 10,
        "the changed policy throttled the burst with the kept baseline: {throttled} of 40"
    );
    // the entry goes: detection stops
    let mut gone = items("");
    gone.remove(DEFAULT_ANOMALY_ENTRY);
    volume.write(&gone);
    assert!(broker.reload_anomaly_now().unwrap());
    assert_eq!(broker.anomaly_action(), None);
    broker.shutdown().await;
}

/// `stripe-egress-proxy`, the slim sidecar binary, is the same broker with the same flags: it
/// serves through the placeholder, refuses outside the permissions and, without the Kubernetes
/// API at hand, still starts with a mounted anomaly entry (its client is made on the first
/// anomaly only).
#[tokio::test]
async fn the_slim_sidecar_binary_is_the_same_broker() {
    let sim = harness::start_sim(sim_config()).await;
    let key = mint(&sim, "slim", &["charge_read"]).await;
    let placeholder = placeholder_for("uid-slim");
    let mut volume = Volume::new();
    volume.write(&entries(&[
        (DEFAULT_KEY_ENTRY, &key),
        (DEFAULT_PERMISSIONS_ENTRY, "charge_read"),
        (DEFAULT_PLACEHOLDER_ENTRY, &placeholder),
        (DEFAULT_ANOMALY_ENTRY, "policy: shop/slim\naction: Record\n"),
    ]));
    let (port, admin) = (free_port(), free_port());
    let log_dir = tempfile::tempdir().unwrap();
    let log = log_dir.path().join("stderr");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_stripe-egress-proxy"))
        .arg("--key-dir")
        .arg(volume.path())
        .args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--admin-addr",
            &format!("127.0.0.1:{admin}"),
            "--upstream",
            &sim.base_url(),
            "--allow-loopback-upstream",
        ])
        .args(["--log-format", "json"])
        .env("RUST_LOG", "info")
        .env_remove("KUBECONFIG")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ready = reqwest::get(format!("http://127.0.0.1:{admin}/readyz")).await;
        if ready.is_ok_and(|r| r.status().is_success()) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the slim sidecar never became ready"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let base = format!("http://127.0.0.1:{port}");
    let (status, body, _) = call(&base, "GET", "/v1/charges", &placeholder).await;
    assert_eq!(status, 200, "{body}");
    let (status, body, _) = call(&base, "POST", "/v1/refunds", &placeholder).await;
    assert_eq!(status, 403);
    assert_eq!(body["error"]["code"], "broker_permission_missing");
    let _ = child.kill();
    let _ = child.wait();
    let lines = std::fs::read_to_string(&log).unwrap();
    let on = lines
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|l| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.contains("follows the mounted anomaly policy"))
        });
    let on = on.unwrap_or_else(|| panic!("anomaly detection on from the mounted entry: {lines}"));
    assert_eq!(on["action"], "record", "{on}");
    assert_eq!(on["policy"], "shop/slim", "{on}");
    assert!(!lines.contains(&key) && !lines.contains(&placeholder));
}
