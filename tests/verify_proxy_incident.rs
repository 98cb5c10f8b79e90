//! `verify-proxy` against the in-process Kubernetes API and the Stripe simulator: failed
//! verifications (forged, stale, replayed) are counted and record at most one Warning Event per
//! window but never request a rotation; only a validly signed delivery that Stripe did not send
//! (found by event confirmation) is an incident, which records a Warning Event and, when
//! enabled, sets the rotate annotations with reason `incident`.

#[path = "common/stripe_harness.rs"]
mod harness;
#[path = "common/kube_api.rs"]
mod kube_api;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::events::v1::Event;
use kube::api::Api;
use kube_test_api::TestApiServer;
use serde_json::json;
use stripe_key_operator::api::{
    ROTATE_ANNOTATION, ROTATE_REASON_ANNOTATION, ROTATE_REASON_INCIDENT, StripeWebhookEndpoint,
};
use stripe_key_operator::secret::SecretString;
use stripe_key_operator::sim::{SendEventRequest, SimConfig, SimHandle};
use stripe_key_operator::stripe::{CreateWebhookEndpointParams, Mode, StripeClient};
use stripe_key_operator::webhook::proxy::incident::{FAILURES_EVENT_REASON, INCIDENT_EVENT_REASON};
use stripe_key_operator::webhook::proxy::metrics::OutcomeLabels;
use stripe_key_operator::webhook::proxy::{
    ConfirmConfig, EndpointRef, FailureMode, ProxyConfig, ProxyHandle, SecretsSource, VerifyProxy,
};
use stripe_key_operator::webhook::signature::sign;

const NS: &str = "shop";
const NAME: &str = "payments-hooks";

async fn cluster() -> (TestApiServer, kube::Client) {
    let (server, client) = kube_api::api_with_crds().await;
    kube_api::create_namespace(&client, NS).await;
    let endpoint: StripeWebhookEndpoint = serde_json::from_value(json!({
        "apiVersion": "stripekeys.io/v1alpha1", "kind": "StripeWebhookEndpoint",
        "metadata": {"name": NAME, "namespace": NS},
        "spec": {
            "accountRef": {"name": "payments-test"},
            "url": "https://shop.example.com/stripe/webhooks",
            "enabledEvents": ["charge.succeeded"],
            "delivery": {"secret": {"name": "payments-hooks-secret"}}
        }
    }))
    .unwrap();
    kube_api::create(&Api::namespaced(client.clone(), NS), &endpoint).await;
    (server, client)
}

/// Starts a proxy (nothing behind it: forged requests never get that far).
async fn proxy(
    client: &kube::Client,
    threshold: u32,
    window: Duration,
    rotate: bool,
) -> (
    stripe_key_operator::webhook::proxy::ProxyHandle,
    tempfile::TempDir,
) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("STRIPE_WEBHOOK_SECRETS");
    std::fs::write(&file, "whsec_incident_test_secret").unwrap();
    let mut config = ProxyConfig::new(
        "http://127.0.0.1:9".parse().unwrap(),
        SecretsSource::new(&file, "STRIPE_WEBHOOK_SECRETS"),
    );
    config.failure_event_threshold = threshold;
    config.failure_event_window = window;
    config.endpoint = Some(EndpointRef {
        namespace: NS.into(),
        name: NAME.into(),
    });
    config.incident_rotate = rotate;
    let handle = VerifyProxy::start(config, Some(client.clone()))
        .await
        .unwrap();
    (handle, dir)
}

/// Sends `n` requests signed with a secret the proxy does not hold.
async fn forge(proxy_url: &str, n: usize) {
    let http = reqwest::Client::new();
    let forged = SecretString::new("whsec_attacker_guess");
    for i in 0..n {
        let body = format!("{{\"id\":\"evt_forged_{i}\"}}").into_bytes();
        let resp = http
            .post(format!("{proxy_url}/hook"))
            .header(
                "stripe-signature",
                sign(
                    &body,
                    std::slice::from_ref(&forged),
                    chrono::Utc::now().timestamp(),
                ),
            )
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400);
    }
}

async fn incident_events(client: &kube::Client) -> Vec<Event> {
    events_with_reason(client, INCIDENT_EVENT_REASON).await
}

async fn failure_events(client: &kube::Client) -> Vec<Event> {
    events_with_reason(client, FAILURES_EVENT_REASON).await
}

async fn events_with_reason(client: &kube::Client, reason: &str) -> Vec<Event> {
    Api::<Event>::namespaced(client.clone(), NS)
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| {
            e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(NAME)
                && e.reason.as_deref() == Some(reason)
        })
        .collect()
}

async fn annotations(client: &kube::Client) -> (Option<String>, Option<String>) {
    let ep = Api::<StripeWebhookEndpoint>::namespaced(client.clone(), NS)
        .get(NAME)
        .await
        .unwrap();
    let a = ep.metadata.annotations.unwrap_or_default();
    (
        a.get(ROTATE_ANNOTATION).cloned(),
        a.get(ROTATE_REASON_ANNOTATION).cloned(),
    )
}

/// Occurrences recorded: repeated Events are aggregated into a series by the recorder.
fn occurrences(events: &[Event]) -> usize {
    events
        .iter()
        .map(|e| e.series.as_ref().map_or(1, |s| s.count as usize))
        .sum()
}

/// Waits (bounded) until `n` Events with `reason` are recorded.
async fn wait_events(client: &kube::Client, reason: &str, n: usize) -> Vec<Event> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let events = events_with_reason(client, reason).await;
        if occurrences(&events) >= n {
            return events;
        }
        assert!(
            Instant::now() < deadline,
            "expected {n} {reason} Events, found {}: {events:#?}",
            events.len()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// The attacker of issue 14: anyone who reaches the webhook URL sends many requests with
/// well-formed `Stripe-Signature` headers that they computed with a secret of their own, at a
/// fresh timestamp, plus stale and replayed ones. None of that proves the signing secret is
/// known to anyone else, so none of it may request an incident rotation (which would delete the
/// live endpoint, over and over).
#[tokio::test]
async fn many_well_formed_forged_signatures_never_request_an_incident_rotation() {
    let (_server, client) = cluster().await;
    let (proxy, _dir) = proxy(&client, 3, Duration::from_secs(60), true).await;
    let http = reqwest::Client::new();
    let t = chrono::Utc::now().timestamp();
    for i in 0..60 {
        let body = format!("{{\"id\":\"evt_attack_{i}\",\"object\":\"event\"}}").into_bytes();
        let guess = SecretString::new(format!("whsec_attacker_guess_{i}"));
        // a fresh, well-formed header: the attacker's own secret, one or several v1 entries
        let mut header = sign(&body, std::slice::from_ref(&guess), t);
        if i % 3 == 0 {
            header.push_str(&format!(",v1={}", "ab".repeat(32)));
        }
        let resp = http
            .post(format!("{}/hook", proxy.url()))
            .header("stripe-signature", header)
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400);
    }
    // stale signatures by the attacker
    for i in 0..10 {
        let body = format!("{{\"id\":\"evt_stale_{i}\"}}").into_bytes();
        let guess = SecretString::new("whsec_attacker_guess");
        let resp = http
            .post(format!("{}/hook", proxy.url()))
            .header(
                "stripe-signature",
                sign(&body, std::slice::from_ref(&guess), t - 3600),
            )
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400);
    }
    // give a (wrongly) spawned report every chance to land
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        annotations(&client).await,
        (None, None),
        "forged signatures requested an incident rotation"
    );
    assert_eq!(proxy.metrics().incidents.get(), 0);
    assert!(
        incident_events(&client).await.is_empty(),
        "forged signatures declared an incident"
    );
    // they are counted, and reported once per window as what they are
    let events = wait_events(&client, FAILURES_EVENT_REASON, 1).await;
    assert_eq!(occurrences(&events), 1, "{events:#?}");
    assert_eq!(proxy.metrics().failure_events.get(), 1);
}

#[tokio::test]
async fn failed_verifications_above_the_threshold_record_one_warning_per_window_and_never_a_rotation()
 {
    let (_server, client) = cluster().await;
    let window = Duration::from_secs(4);
    let (proxy, _dir) = proxy(&client, 3, window, true).await;

    forge(&proxy.url(), 2).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        failure_events(&client).await.is_empty(),
        "below the threshold"
    );

    let started = Instant::now();
    forge(&proxy.url(), 1).await;
    let events = wait_events(&client, FAILURES_EVENT_REASON, 1).await;
    let e = &events[0];
    assert_eq!(e.type_.as_deref(), Some("Warning"));
    let regarding = e.regarding.as_ref().unwrap();
    assert_eq!(regarding.kind.as_deref(), Some("StripeWebhookEndpoint"));
    assert_eq!(regarding.namespace.as_deref(), Some(NS));
    assert!(regarding.uid.is_some());
    let note = e.note.as_deref().unwrap();
    assert!(
        note.contains("3 webhook requests failed verification"),
        "{note}"
    );
    assert!(note.contains("no rotation requested"), "{note}");

    // more failures within the same window record nothing new
    forge(&proxy.url(), 6).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        started.elapsed() < window,
        "the machine is too slow for this window; the assertions below would be meaningless"
    );
    assert_eq!(occurrences(&failure_events(&client).await), 1);
    assert_eq!(proxy.metrics().failure_events.get(), 1);

    // after the window, a new burst is a new Warning Event
    tokio::time::sleep(window.saturating_sub(started.elapsed()) + Duration::from_millis(200)).await;
    forge(&proxy.url(), 3).await;
    let events = wait_events(&client, FAILURES_EVENT_REASON, 2).await;
    assert_eq!(occurrences(&events), 2, "{events:#?}");
    assert_eq!(proxy.metrics().failure_events.get(), 2);

    // and never a rotation, nor an incident
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(annotations(&client).await, (None, None));
    assert!(incident_events(&client).await.is_empty());
    assert_eq!(proxy.metrics().incidents.get(), 0);
    assert_eq!(proxy.metrics().incident_report_failures.get(), 0);
}

#[tokio::test]
async fn scanners_without_a_usable_header_do_not_count_towards_the_failure_event() {
    let (_server, client) = cluster().await;
    let (proxy, _dir) = proxy(&client, 2, Duration::from_secs(60), false).await;
    // scanners without a usable Stripe-Signature do not count
    let http = reqwest::Client::new();
    for header in [None, Some("garbage"), Some("t=1")] {
        for _ in 0..3 {
            let mut req = http.post(format!("{}/hook", proxy.url())).body("{}");
            if let Some(h) = header {
                req = req.header("stripe-signature", h);
            }
            assert_eq!(req.send().await.unwrap().status(), 400);
        }
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(failure_events(&client).await.is_empty());
    assert_eq!(proxy.metrics().failure_events.get(), 0);
    forge(&proxy.url(), 2).await;
    wait_events(&client, FAILURES_EVENT_REASON, 1).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(annotations(&client).await, (None, None));
}

#[tokio::test]
async fn incident_rotate_without_an_endpoint_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = ProxyConfig::new(
        "http://127.0.0.1:9".parse().unwrap(),
        SecretsSource::new(dir.path(), "STRIPE_WEBHOOK_SECRETS"),
    );
    config.incident_rotate = true;
    let err = VerifyProxy::start(config, None).await.unwrap_err();
    assert!(err.to_string().contains("--endpoint"), "{err}");
}

// ------------------------------------------------------------------ event confirmation

type Bodies = Arc<std::sync::Mutex<Vec<Vec<u8>>>>;

/// The application behind the proxy: keeps the bodies it receives, answers 200.
async fn app() -> (url::Url, Bodies) {
    let bodies: Bodies = Arc::default();
    let b = bodies.clone();
    let router = axum::Router::new().fallback(move |req: axum::extract::Request| {
        let b = b.clone();
        async move {
            let body = axum::body::to_bytes(req.into_body(), usize::MAX)
                .await
                .unwrap();
            b.lock().unwrap().push(body.to_vec());
            "ok"
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await });
    (format!("http://{addr}").parse().unwrap(), bodies)
}

/// A proxy that confirms events with `api_base`, reporting on the test endpoint with
/// `--incident-rotate`; its secret file and key file are under `dir`.
async fn confirming(
    client: &kube::Client,
    dir: &Path,
    api_base: &str,
    failure_mode: FailureMode,
) -> (ProxyHandle, Bodies) {
    let (upstream, bodies) = app().await;
    std::fs::create_dir_all(dir.join("secret")).unwrap();
    std::fs::create_dir_all(dir.join("key")).unwrap();
    let mut config = ProxyConfig::new(
        upstream,
        SecretsSource::new(dir.join("secret"), "STRIPE_WEBHOOK_SECRETS"),
    );
    config.reload_interval = Duration::from_millis(50);
    config.endpoint = Some(EndpointRef {
        namespace: NS.into(),
        name: NAME.into(),
    });
    config.incident_rotate = true;
    let mut confirm = ConfirmConfig::new(SecretsSource::new(dir.join("key"), "STRIPE_API_KEY"));
    confirm.api_base = api_base.parse().unwrap();
    confirm.timeout = Duration::from_millis(500);
    confirm.failure_mode = failure_mode;
    config.confirm = Some(confirm);
    let proxy = VerifyProxy::start(config, Some(client.clone()))
        .await
        .unwrap();
    (proxy, bodies)
}

/// The simulator, an endpoint at Stripe pointing at a confirming proxy, and the proxy holding
/// the endpoint's secret and a restricted key with `event_read` minted by the simulator.
struct Confirming {
    sim: SimHandle,
    endpoint_id: String,
    secret: SecretString,
    proxy: ProxyHandle,
    bodies: Bodies,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl Confirming {
    async fn start(client: &kube::Client) -> Self {
        let sim =
            harness::start_sim(SimConfig::new().with_account("acct_confirm", Mode::Test)).await;
        let stripe = StripeClient::new(harness::fast_config(&sim, "acct_confirm")).unwrap();
        let key = stripe
            .create_api_key(
                &harness::secret_key_params("verify-proxy-confirm", &["event_read"]),
                "verify-proxy-confirm-1",
            )
            .await
            .unwrap()
            .value;
        let dir = tempfile::tempdir().unwrap();
        let (proxy, bodies) =
            confirming(client, dir.path(), &sim.base_url(), FailureMode::Closed).await;
        std::fs::write(
            dir.path().join("key/STRIPE_API_KEY"),
            key.plaintext_secret().unwrap().expose(),
        )
        .unwrap();
        let endpoint = stripe
            .create_webhook_endpoint(
                &CreateWebhookEndpointParams {
                    url: format!("{}/stripe/webhooks", proxy.url()),
                    enabled_events: vec!["*".into()],
                    api_version: None,
                    connect: None,
                    description: Some("verify-proxy confirmation test".into()),
                    metadata: BTreeMap::new(),
                },
                "we-confirm-1",
            )
            .await
            .unwrap()
            .value;
        let secret = endpoint.secret.clone().unwrap();
        std::fs::write(
            dir.path().join("secret/STRIPE_WEBHOOK_SECRETS"),
            secret.expose(),
        )
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while proxy.loaded_fingerprints() != [secret.fingerprint()] {
            assert!(Instant::now() < deadline, "the secret was not loaded");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // the key is read by the same reload loop
        tokio::time::sleep(Duration::from_millis(200)).await;
        Self {
            sim,
            endpoint_id: endpoint.id,
            secret,
            proxy,
            bodies,
            http: reqwest::Client::builder().no_proxy().build().unwrap(),
            _dir: dir,
        }
    }

    async fn deliver(&self, event_type: &str, object_id: &str) -> Option<u16> {
        self.sim
            .send_webhook(
                &self.endpoint_id,
                SendEventRequest {
                    event_type: event_type.into(),
                    data: Some(json!({"id": object_id, "object": "charge", "amount": 1200})),
                    timestamp: None,
                },
            )
            .await
            .unwrap()
            .status
    }

    /// Posts `body` signed with the endpoint's real secret at `t`.
    async fn post_signed(&self, body: &[u8], t: i64) -> (u16, String) {
        post_signed(&self.http, &self.proxy, &self.secret, body, t).await
    }

    fn event_retrievals(&self) -> usize {
        self.sim
            .request_log()
            .iter()
            .filter(|r| r.method == "GET" && r.path.starts_with("/v1/events/"))
            .count()
    }
}

async fn post_signed(
    http: &reqwest::Client,
    proxy: &ProxyHandle,
    secret: &SecretString,
    body: &[u8],
    t: i64,
) -> (u16, String) {
    let resp = http
        .post(format!("{}/stripe/webhooks", proxy.url()))
        .header("content-type", "application/json; charset=utf-8")
        .header(
            "stripe-signature",
            sign(body, std::slice::from_ref(secret), t),
        )
        .body(body.to_vec())
        .send()
        .await
        .unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

fn confirmations(proxy: &ProxyHandle, outcome: &str) -> u64 {
    proxy
        .metrics()
        .confirmations
        .get_or_create(&OutcomeLabels {
            outcome: outcome.into(),
        })
        .get()
}

fn invented_event(id: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "id": id, "object": "event", "type": "charge.succeeded",
        "created": chrono::Utc::now().timestamp(),
        "data": {"object": {"id": "ch_invented", "object": "charge", "amount": 99900}},
    }))
    .unwrap()
}

#[tokio::test]
async fn a_validly_signed_event_that_stripe_did_not_send_requests_an_incident() {
    let (_server, client) = cluster().await;
    let c = Confirming::start(&client).await;

    // a real delivery: confirmed and forwarded
    assert_eq!(c.deliver("charge.succeeded", "ch_real").await, Some(200));
    assert_eq!(c.bodies.lock().unwrap().len(), 1);
    assert_eq!(confirmations(&c.proxy, "confirmed"), 1);

    // an event Stripe never created, signed with the real secret: whoever sent it holds it
    let now = chrono::Utc::now().timestamp();
    let (status, text) = c
        .post_signed(&invented_event("evt_invented000000000000001"), now)
        .await;
    assert_eq!((status, text.trim()), (400, "event_not_confirmed"));
    let events = wait_events(&client, INCIDENT_EVENT_REASON, 1).await;
    let note = events[0].note.as_deref().unwrap();
    assert_eq!(events[0].type_.as_deref(), Some("Warning"));
    assert!(note.contains("not sent by Stripe"), "{note}");
    assert!(note.contains("evt_invented000000000000001"), "{note}");
    assert!(note.contains(&c.secret.fingerprint()), "{note}");
    assert!(
        !note.contains(c.secret.expose()),
        "the secret itself is never in an Event"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (value, reason) = annotations(&client).await;
        if value.is_some() {
            assert_eq!(reason.as_deref(), Some(ROTATE_REASON_INCIDENT));
            break;
        }
        assert!(Instant::now() < deadline, "no incident rotation requested");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }

    // a real event id with another object: a forgery too (told from the cache, no call), and
    // within the incident window it declares no second incident
    let mut real: serde_json::Value = serde_json::from_slice(&c.bodies.lock().unwrap()[0]).unwrap();
    real["data"]["object"]["id"] = json!("ch_attacker");
    let (status, text) = c
        .post_signed(&serde_json::to_vec(&real).unwrap(), now)
        .await;
    assert_eq!((status, text.trim()), (400, "event_not_confirmed"));

    assert_eq!(
        c.bodies.lock().unwrap().len(),
        1,
        "no forgery was forwarded"
    );
    assert_eq!(confirmations(&c.proxy, "forged"), 2);
    assert_eq!(c.proxy.metrics().incidents.get(), 1);
    // the invented event was looked up at Stripe (404), the altered one was not
    assert_eq!(c.event_retrievals(), 2);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(occurrences(&incident_events(&client).await), 1);
    assert_eq!(c.proxy.metrics().incident_report_failures.get(), 0);
}

#[tokio::test]
async fn real_deliveries_are_confirmed_and_forwarded_and_never_request_an_incident() {
    let (_server, client) = cluster().await;
    let c = Confirming::start(&client).await;
    for (i, t) in [
        "charge.succeeded",
        "charge.refunded",
        "payment_intent.succeeded",
        "customer.created",
    ]
    .into_iter()
    .enumerate()
    {
        assert_eq!(c.deliver(t, &format!("obj_{i}")).await, Some(200), "{t}");
    }
    assert_eq!(c.bodies.lock().unwrap().len(), 4);
    assert_eq!(confirmations(&c.proxy, "confirmed"), 4);
    assert_eq!(
        c.event_retrievals(),
        4,
        "one GET /v1/events/{{id}} per delivery"
    );

    // Stripe retrying a delivered event signs the same body again: confirmed from the cache
    let first = c.bodies.lock().unwrap()[0].clone();
    let created = serde_json::from_slice::<serde_json::Value>(&first).unwrap()["created"]
        .as_i64()
        .unwrap();
    let (status, _) = c.post_signed(&first, created + 1).await;
    assert_eq!(status, 200);
    assert_eq!(confirmations(&c.proxy, "cached"), 1);
    assert_eq!(c.event_retrievals(), 4);
    assert_eq!(c.proxy.confirmed_events_cached(), 4);

    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(c.proxy.metrics().incidents.get(), 0);
    assert_eq!(confirmations(&c.proxy, "forged"), 0);
    assert!(incident_events(&client).await.is_empty());
    assert_eq!(annotations(&client).await, (None, None));
}

#[tokio::test]
async fn when_stripe_cannot_confirm_fail_open_forwards_fail_closed_refuses_and_neither_requests_an_incident()
 {
    let (_server, client) = cluster().await;
    // a "Stripe" that accepts connections and never answers
    let hanging = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hanging_base = format!("http://{}", hanging.local_addr().unwrap());
    let held = Arc::new(AtomicUsize::new(0));
    let h = held.clone();
    tokio::spawn(async move {
        let mut conns = Vec::new();
        while let Ok((c, _)) = hanging.accept().await {
            h.fetch_add(1, Ordering::SeqCst);
            conns.push(c);
        }
    });
    // and one that is not listening at all
    let closed_base = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let secret = SecretString::new("whsec_confirm_unreachable_test");
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    for (i, (base, mode)) in [
        (&hanging_base, FailureMode::Open),
        (&hanging_base, FailureMode::Closed),
        (&closed_base, FailureMode::Open),
        (&closed_base, FailureMode::Closed),
    ]
    .into_iter()
    .enumerate()
    {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("secret")).unwrap();
        std::fs::create_dir_all(dir.path().join("key")).unwrap();
        std::fs::write(
            dir.path().join("secret/STRIPE_WEBHOOK_SECRETS"),
            secret.expose(),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("key/STRIPE_API_KEY"),
            "rk_test_unreachable_confirmation_key",
        )
        .unwrap();
        let (proxy, bodies) = confirming(&client, dir.path(), base, mode).await;
        // even an invented event: nothing can be proven while Stripe does not answer
        let body = invented_event(&format!("evt_unconfirmed{i}"));
        let started = Instant::now();
        let (status, text) = post_signed(
            &http,
            &proxy,
            &secret,
            &body,
            chrono::Utc::now().timestamp(),
        )
        .await;
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "the confirmation timeout bounds the wait ({mode}, {base})"
        );
        match mode {
            FailureMode::Open => {
                assert_eq!(status, 200, "fail open forwards ({base}): {text}");
                assert_eq!(bodies.lock().unwrap().as_slice(), [body]);
                assert_eq!(confirmations(&proxy, "unavailable_forwarded"), 1);
            }
            FailureMode::Closed => {
                assert_eq!(
                    (status, text.trim()),
                    (503, "confirmation_unavailable"),
                    "fail closed refuses ({base})"
                );
                assert!(bodies.lock().unwrap().is_empty());
                assert_eq!(confirmations(&proxy, "unavailable_refused"), 1);
            }
        }
        assert_eq!(proxy.metrics().incidents.get(), 0);
    }
    assert_eq!(
        held.load(Ordering::SeqCst),
        2,
        "the hanging Stripe was asked twice"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(incident_events(&client).await.is_empty());
    assert_eq!(annotations(&client).await, (None, None));
}

#[tokio::test]
async fn confirmations_in_flight_are_bounded() {
    let (_server, client) = cluster().await;
    // a slow "Stripe": each call is held 300 ms, then answered 503; counts calls at once
    let (open, peak) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (o, p) = (open.clone(), peak.clone());
    let slow = axum::Router::new().fallback(move || {
        let (o, p) = (o.clone(), p.clone());
        async move {
            let now_open = o.fetch_add(1, Ordering::SeqCst) + 1;
            p.fetch_max(now_open, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(300)).await;
            o.fetch_sub(1, Ordering::SeqCst);
            axum::http::StatusCode::SERVICE_UNAVAILABLE
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, slow).await });

    let dir = tempfile::tempdir().unwrap();
    let secret = SecretString::new("whsec_confirm_bounded_test");
    let (upstream, bodies) = app().await;
    std::fs::create_dir_all(dir.path().join("key")).unwrap();
    std::fs::write(dir.path().join("secret"), secret.expose()).unwrap();
    std::fs::write(dir.path().join("key/STRIPE_API_KEY"), "rk_test_bounded").unwrap();
    let mut config = ProxyConfig::new(
        upstream,
        SecretsSource::new(dir.path().join("secret"), "STRIPE_WEBHOOK_SECRETS"),
    );
    config.endpoint = Some(EndpointRef {
        namespace: NS.into(),
        name: NAME.into(),
    });
    config.incident_rotate = true;
    let mut confirm =
        ConfirmConfig::new(SecretsSource::new(dir.path().join("key"), "STRIPE_API_KEY"));
    confirm.api_base = base.parse().unwrap();
    confirm.timeout = Duration::from_secs(5);
    confirm.concurrency = 1;
    confirm.failure_mode = FailureMode::Closed;
    config.confirm = Some(confirm);
    let proxy = Arc::new(
        VerifyProxy::start(config, Some(client.clone()))
            .await
            .unwrap(),
    );
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..4 {
        let (proxy, http, secret) = (proxy.clone(), http.clone(), secret.clone());
        tasks.push(tokio::spawn(async move {
            let body = invented_event(&format!("evt_bounded{i}"));
            post_signed(
                &http,
                &proxy,
                &secret,
                &body,
                chrono::Utc::now().timestamp(),
            )
            .await
        }));
    }
    for t in tasks {
        let (status, text) = t.await.unwrap();
        assert_eq!((status, text.trim()), (503, "confirmation_unavailable"));
    }
    assert_eq!(peak.load(Ordering::SeqCst), 1, "one confirmation at a time");
    assert!(
        started.elapsed() >= Duration::from_millis(1100),
        "the four calls ran one after the other: {:?}",
        started.elapsed()
    );
    assert_eq!(confirmations(&proxy, "unavailable_refused"), 4);
    assert!(bodies.lock().unwrap().is_empty());
    assert_eq!(proxy.metrics().incidents.get(), 0);
}
