//! `verify-proxy` incident response against the in-process Kubernetes API: too many failed
//! verifications record a Warning Event on the StripeWebhookEndpoint and, when enabled, set the
//! rotate annotations with reason `incident`, at most once per window.

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::wait::{await_condition, conditions};
use kube_test_api::TestApiServer;
use serde_json::json;
use stripe_key_operator::api::{
    ROTATE_ANNOTATION, ROTATE_REASON_ANNOTATION, ROTATE_REASON_INCIDENT, StripeWebhookEndpoint,
};
use stripe_key_operator::secret::SecretString;
use stripe_key_operator::webhook::proxy::incident::INCIDENT_EVENT_REASON;
use stripe_key_operator::webhook::proxy::{EndpointRef, ProxyConfig, SecretsSource, VerifyProxy};
use stripe_key_operator::webhook::signature::sign;

const NS: &str = "shop";
const NAME: &str = "payments-hooks";

async fn cluster() -> (TestApiServer, kube::Client) {
    let server = TestApiServer::start().await.unwrap();
    let client = kube::Client::try_from(kube::Config::new(server.url().parse().unwrap())).unwrap();
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let params = PatchParams::apply("verify-proxy-tests").force();
    for crd in stripe_key_operator::api::crds() {
        let name = crd.metadata.name.clone().unwrap();
        crds.patch(&name, &params, &Patch::Apply(&crd))
            .await
            .unwrap();
        tokio::time::timeout(
            Duration::from_secs(30),
            await_condition(crds.clone(), &name, conditions::is_crd_established()),
        )
        .await
        .expect("CRD established in time")
        .unwrap();
    }
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": NS}})).unwrap(),
        )
        .await
        .unwrap();
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
    let api: Api<StripeWebhookEndpoint> = Api::namespaced(client.clone(), NS);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match api.create(&PostParams::default(), &endpoint).await {
            Ok(_) => break,
            // the new kind may not be served for a moment after it is established
            Err(kube::Error::Api(s)) if s.code == 404 && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("create endpoint: {e}"),
        }
    }
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
    config.incident_threshold = threshold;
    config.incident_window = window;
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
    Api::<Event>::namespaced(client.clone(), NS)
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| {
            e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(NAME)
                && e.reason.as_deref() == Some(INCIDENT_EVENT_REASON)
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

/// Waits (bounded) until `n` incidents are recorded.
async fn wait_events(client: &kube::Client, n: usize) -> Vec<Event> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let events = incident_events(client).await;
        if occurrences(&events) >= n {
            return events;
        }
        assert!(
            Instant::now() < deadline,
            "expected {n} incident Events, found {}: {events:#?}",
            events.len()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test]
async fn failed_verifications_above_the_threshold_record_an_event_and_request_an_incident_rotation()
{
    let (_server, client) = cluster().await;
    let window = Duration::from_secs(4);
    let (proxy, _dir) = proxy(&client, 3, window, true).await;

    forge(&proxy.url(), 2).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        incident_events(&client).await.is_empty(),
        "below the threshold"
    );
    assert_eq!(annotations(&client).await, (None, None));

    let started = Instant::now();
    forge(&proxy.url(), 1).await;
    let events = wait_events(&client, 1).await;
    let e = &events[0];
    assert_eq!(e.type_.as_deref(), Some("Warning"));
    let regarding = e.regarding.as_ref().unwrap();
    assert_eq!(regarding.kind.as_deref(), Some("StripeWebhookEndpoint"));
    assert_eq!(regarding.namespace.as_deref(), Some(NS));
    assert!(regarding.uid.is_some());
    assert!(
        e.note
            .as_deref()
            .unwrap()
            .contains("3 webhook requests failed")
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let (first_value, reason) = loop {
        let a = annotations(&client).await;
        if a.0.is_some() {
            break a;
        }
        assert!(Instant::now() < deadline, "annotation not set");
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    assert_eq!(reason.as_deref(), Some(ROTATE_REASON_INCIDENT));
    let first_value = first_value.unwrap();
    assert!(chrono::DateTime::parse_from_rfc3339(&first_value).is_ok());

    // more failures within the same window declare nothing new
    forge(&proxy.url(), 6).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        started.elapsed() < window,
        "the machine is too slow for this window; the assertions below would be meaningless"
    );
    assert_eq!(occurrences(&incident_events(&client).await), 1);
    assert_eq!(
        annotations(&client).await.0.as_deref(),
        Some(first_value.as_str())
    );
    assert_eq!(proxy.metrics().incidents.get(), 1);

    // after the window, a new burst is a new incident with a new rotate value
    tokio::time::sleep(window.saturating_sub(started.elapsed()) + Duration::from_millis(200)).await;
    forge(&proxy.url(), 3).await;
    let events = wait_events(&client, 2).await;
    assert_eq!(occurrences(&events), 2, "{events:#?}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (value, reason) = annotations(&client).await;
        if value.as_deref() != Some(first_value.as_str()) {
            assert_eq!(reason.as_deref(), Some(ROTATE_REASON_INCIDENT));
            break;
        }
        assert!(Instant::now() < deadline, "second rotate value not set");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(proxy.metrics().incidents.get(), 2);
    assert_eq!(proxy.metrics().incident_report_failures.get(), 0);
}

#[tokio::test]
async fn without_incident_rotate_an_incident_records_the_event_but_leaves_the_annotations_and_scanners_do_not_count()
 {
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
    assert!(incident_events(&client).await.is_empty());
    assert_eq!(proxy.metrics().incidents.get(), 0);
    forge(&proxy.url(), 2).await;
    let events = wait_events(&client, 1).await;
    assert!(
        events[0]
            .note
            .as_deref()
            .unwrap()
            .contains("incident rotation is not enabled")
    );
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
