//! The simulator itself: webhook endpoints, signed deliveries, the HTTP control API, loopback.

#[path = "common/stripe_harness.rs"]
mod harness;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::HeaderMap;
use harness::*;
use serde_json::{Value, json};
use stripe_key_operator::secret::SecretString;
use stripe_key_operator::sim::{
    FaultRule, SendEventRequest, SimConfig, SimError, SimState, Simulator,
};
use stripe_key_operator::stripe::{
    CreateWebhookEndpointParams, ListWebhookEndpointsParams, Mode, StripeClient,
    UpdateWebhookEndpointParams, WebhookEndpointStatus,
};
use stripe_key_operator::webhook::signature::{SignatureError, Verifier, parse_header};

const ACCT: &str = "acct_hooks";

type Received = Arc<Mutex<Vec<(String, Bytes)>>>;

/// A webhook receiver on 127.0.0.1 that records the signature header and raw body.
async fn receiver() -> (String, Received) {
    let received: Received = Arc::default();
    let r = received.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: HeaderMap, body: Bytes| {
            let r = r.clone();
            async move {
                let sig = headers
                    .get("stripe-signature")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_owned();
                r.lock().unwrap().push((sig, body));
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}/hook"), received)
}

fn endpoint_params(url: &str) -> CreateWebhookEndpointParams {
    let mut metadata = BTreeMap::new();
    metadata.insert(
        "stripe-key-operator/owner".to_owned(),
        "payments/api".to_owned(),
    );
    CreateWebhookEndpointParams {
        url: url.to_owned(),
        enabled_events: vec!["charge.succeeded".into(), "charge.refunded".into()],
        api_version: Some("2024-06-20".into()),
        connect: None,
        description: Some("skop test".into()),
        metadata,
    }
}

#[tokio::test]
async fn webhook_endpoint_lifecycle_shows_the_secret_only_at_creation() {
    let sim = start_sim(SimConfig::new().with_account(ACCT, Mode::Test)).await;
    let client = StripeClient::new(fast_config(&sim, ACCT)).unwrap();
    let created = client
        .create_webhook_endpoint(&endpoint_params("https://example.test/hook"), "we-1")
        .await
        .unwrap()
        .value;
    assert!(created.id.starts_with("we_"));
    assert_eq!(created.object, "webhook_endpoint");
    assert!(
        created
            .secret
            .as_ref()
            .unwrap()
            .expose()
            .starts_with("whsec_")
    );
    assert_eq!(
        created.enabled_events,
        vec!["charge.succeeded", "charge.refunded"]
    );
    assert_eq!(
        created.metadata["stripe-key-operator/owner"],
        "payments/api"
    );
    assert_eq!(created.application.as_deref(), Some(sim.application_id()));
    assert_eq!(created.status, WebhookEndpointStatus::Enabled);
    assert!(!format!("{created:?}").contains(created.secret.as_ref().unwrap().expose()));

    let fetched = client
        .retrieve_webhook_endpoint(&created.id)
        .await
        .unwrap()
        .value;
    assert!(fetched.secret.is_none(), "retrieve never shows the secret");
    let listed = client
        .list_webhook_endpoints(&ListWebhookEndpointsParams::default())
        .await
        .unwrap()
        .value;
    assert!(listed.data.iter().all(|e| e.secret.is_none()));

    let mut meta = BTreeMap::new();
    meta.insert("stripe-key-operator/owner".to_owned(), String::new());
    meta.insert("rotation".to_owned(), "2".to_owned());
    let updated = client
        .update_webhook_endpoint(
            &created.id,
            &UpdateWebhookEndpointParams {
                enabled_events: Some(vec!["*".into()]),
                metadata: Some(meta),
                disabled: Some(true),
                ..Default::default()
            },
            "we-upd-1",
        )
        .await
        .unwrap()
        .value;
    assert_eq!(updated.status, WebhookEndpointStatus::Disabled);
    assert_eq!(updated.enabled_events, vec!["*"]);
    assert_eq!(
        updated.metadata.len(),
        1,
        "an empty value removes the metadata key"
    );
    assert_eq!(updated.metadata["rotation"], "2");

    let deleted = client
        .delete_webhook_endpoint(&created.id)
        .await
        .unwrap()
        .value;
    assert!(deleted.deleted);
    let gone = client
        .retrieve_webhook_endpoint(&created.id)
        .await
        .unwrap_err();
    assert!(gone.is_not_found());
    assert!(
        client
            .delete_webhook_endpoint(&created.id)
            .await
            .unwrap_err()
            .is_not_found()
    );
}

#[tokio::test]
async fn webhook_endpoints_paginate_with_starting_after_and_stop_at_sixteen() {
    let mut config = SimConfig::new().with_account(ACCT, Mode::Test);
    config.rate_limit_test = 10_000;
    let sim = start_sim(config).await;
    let client = StripeClient::new(fast_config(&sim, ACCT)).unwrap();
    let mut ids = Vec::new();
    for i in 0..16 {
        let e = client
            .create_webhook_endpoint(
                &endpoint_params(&format!("https://example.test/{i}")),
                &format!("we-{i}"),
            )
            .await
            .unwrap();
        ids.push(e.value.id);
    }
    let err = client
        .create_webhook_endpoint(&endpoint_params("https://example.test/17"), "we-17")
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(400));
    let first = client
        .list_webhook_endpoints(&ListWebhookEndpointsParams {
            limit: Some(5),
            ..Default::default()
        })
        .await
        .unwrap()
        .value;
    assert_eq!(first.data.len(), 5);
    assert!(first.has_more);
    let all = client.list_all_webhook_endpoints(5).await.unwrap();
    assert_eq!(all.request_ids.len(), 4);
    let mut expected = ids.clone();
    expected.reverse();
    assert_eq!(
        all.items.iter().map(|e| e.id.clone()).collect::<Vec<_>>(),
        expected
    );
}

#[tokio::test]
async fn form_bodies_with_unknown_parameters_are_rejected() {
    let sim = start_sim(SimConfig::new().with_account(ACCT, Mode::Test)).await;
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/webhook_endpoints", sim.base_url()))
        .bearer_auth(sim.app_key().expose())
        .header("Stripe-Context", ACCT)
        .form(&[
            ("url", "https://x.test/h"),
            ("enabled_events[]", "charge.succeeded"),
            ("colour", "blue"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    assert!(resp.headers().get("request-id").is_some());
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "parameter_unknown");
    assert_eq!(body["error"]["param"], "colour");
    assert!(
        body["error"]["request_log_url"]
            .as_str()
            .unwrap()
            .contains("req_")
    );
}

#[tokio::test]
async fn delivery_carries_one_signature_per_valid_secret() {
    let sim = start_sim(SimConfig::new().with_account(ACCT, Mode::Test)).await;
    let client = StripeClient::new(fast_config(&sim, ACCT)).unwrap();
    let (url, received) = receiver().await;
    let endpoint = client
        .create_webhook_endpoint(&endpoint_params(&url), "we-1")
        .await
        .unwrap()
        .value;
    let old_secret = endpoint.secret.clone().unwrap();

    let outcome = sim
        .send_webhook(
            &endpoint.id,
            SendEventRequest {
                event_type: "charge.succeeded".into(),
                data: Some(json!({"id": "ch_1"})),
                timestamp: None,
            },
        )
        .await
        .unwrap();
    assert!(outcome.delivered);
    assert_eq!(outcome.status, Some(200));
    assert_eq!(outcome.signatures, 1);
    assert!(outcome.event_id.starts_with("evt_"));
    let (header, body) = received.lock().unwrap()[0].clone();
    Verifier::new(std::slice::from_ref(&old_secret))
        .verify(&body, &header)
        .unwrap();
    let event: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(event["id"], outcome.event_id);
    assert_eq!(event["type"], "charge.succeeded");
    assert_eq!(event["data"]["object"]["id"], "ch_1");

    // a Dashboard-style roll with a one-hour overlap: both secrets sign
    let new_secret = sim
        .roll_webhook_secret(&endpoint.id, Duration::from_secs(3600))
        .unwrap();
    let outcome = sim
        .send_webhook(
            &endpoint.id,
            SendEventRequest {
                event_type: "charge.refunded".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(outcome.signatures, 2);
    let (header, body) = received.lock().unwrap()[1].clone();
    assert_eq!(parse_header(&header).unwrap().v1.len(), 2);
    Verifier::new(std::slice::from_ref(&old_secret))
        .verify(&body, &header)
        .unwrap();
    Verifier::new(std::slice::from_ref(&new_secret))
        .verify(&body, &header)
        .unwrap();

    // after the overlap only the new secret signs
    sim.advance_clock(Duration::from_secs(2 * 3600));
    let outcome = sim
        .send_webhook(
            &endpoint.id,
            SendEventRequest {
                event_type: "charge.succeeded".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(outcome.signatures, 1);
    let (header, body) = received.lock().unwrap()[2].clone();
    assert_eq!(
        Verifier::new(std::slice::from_ref(&old_secret)).verify(&body, &header),
        Err(SignatureError::NoMatchingSignature)
    );
    Verifier::new(&[new_secret]).verify(&body, &header).unwrap();

    // events the endpoint does not subscribe to are not delivered
    let outcome = sim
        .send_webhook(
            &endpoint.id,
            SendEventRequest {
                event_type: "payout.paid".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert!(!outcome.delivered);
    assert_eq!(received.lock().unwrap().len(), 3);
    assert!(matches!(
        sim.send_webhook(
            "we_missing",
            SendEventRequest {
                event_type: "x".into(),
                ..Default::default()
            }
        )
        .await,
        Err(SimError::NotFound(_))
    ));
}

#[tokio::test]
async fn control_api_over_http_mirrors_the_library() {
    let sim = start_sim(SimConfig::new().with_account(ACCT, Mode::Test)).await;
    let http = reqwest::Client::new();
    let base = sim.base_url();

    // inject a fault over HTTP, see it in the library view and take effect
    let resp: Value = http
        .post(format!("{base}/_sim/faults"))
        .json(&json!({ "fault": { "kind": "server_error" }, "count": 1, "method": "GET", "path_prefix": "/v2/" }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(resp["id"].as_u64().is_some());
    let faults: Vec<FaultRule> = http
        .get(format!("{base}/_sim/faults"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(faults, sim.faults());
    let r = http
        .get(format!("{base}/v2/iam/api_keys"))
        .bearer_auth(sim.app_key().expose())
        .header("Stripe-Context", ACCT)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 500);
    assert!(sim.faults().is_empty());

    // the clock
    let before = sim.now();
    let advanced: Value = http
        .post(format!("{base}/_sim/clock/advance"))
        .json(&json!({ "minutes": 90 }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let after: chrono::DateTime<chrono::Utc> =
        serde_json::from_value(advanced["now"].clone()).unwrap();
    assert!(after - before >= chrono::Duration::minutes(90));

    // state and the request log
    let client = StripeClient::new(fast_config(&sim, ACCT)).unwrap();
    client
        .create_api_key(&secret_key_params("ctl", &["charge_read"]), "ctl-1")
        .await
        .unwrap();
    let state: SimState = http
        .get(format!("{base}/_sim/state"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let keys = &state.account(ACCT).unwrap().api_keys;
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0].permissions, vec!["charge_read"]);
    assert_eq!(keys[0].status, "active");
    let raw_state = http
        .get(format!("{base}/_sim/state"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        !raw_state.contains("rk_test_"),
        "tokens never appear in the state"
    );
    let log: Vec<Value> = http
        .get(format!("{base}/_sim/requests"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(log.len(), 2);
    assert_eq!(log[1]["idempotency_key"], "ctl-1");
    assert_eq!(log[1]["status"], 200);
    assert_eq!(log[0]["fault"], "server_error");
    let r = http.get(format!("{base}/_sim/state")).send().await.unwrap();
    assert!(
        r.headers().get("request-id").is_some(),
        "every response has a Request-Id"
    );

    // deliver via HTTP
    let (url, received) = receiver().await;
    let ep = client
        .create_webhook_endpoint(&endpoint_params(&url), "ctl-we")
        .await
        .unwrap()
        .value;
    let outcome: Value = http
        .post(format!("{base}/_sim/webhook_endpoints/{}/send", ep.id))
        .json(&json!({ "type": "charge.succeeded" }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(outcome["status"], 200);
    assert_eq!(received.lock().unwrap().len(), 1);
    let r = http
        .delete(format!("{base}/_sim/requests"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 204);
    assert!(sim.request_log().is_empty());
}

#[tokio::test]
async fn unknown_urls_answer_a_stripe_style_404() {
    let sim = start_sim(SimConfig::new().with_account(ACCT, Mode::Test)).await;
    let r = reqwest::get(format!("{}/v1/nothing_here", sim.base_url()))
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);
    assert!(r.headers().get("request-id").is_some());
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["type"], "invalid_request_error");
}

#[tokio::test]
async fn non_loopback_listen_addresses_are_refused() {
    let mut config = SimConfig::new();
    config.listen = "0.0.0.0:0".parse().unwrap();
    assert!(matches!(
        Simulator::start(config).await,
        Err(SimError::NotLoopback(_))
    ));
    let mut config = SimConfig::new();
    config.listen = "[::1]:0".parse().unwrap();
    // ::1 is loopback; it may be unavailable in some sandboxes, which is a bind error, not a refusal
    assert!(!matches!(
        Simulator::start(config).await,
        Err(SimError::NotLoopback(_))
    ));
}

#[tokio::test]
async fn generated_defaults_give_one_test_account_and_an_app_key() {
    let sim = Simulator::start(SimConfig::new()).await.unwrap();
    assert_eq!(sim.accounts().len(), 1);
    assert_eq!(sim.accounts()[0].mode, Mode::Test);
    assert!(sim.app_key().expose().starts_with("sk_test_sim_"));
    let client = StripeClient::new(fast_config(&sim, &sim.accounts()[0].id.clone())).unwrap();
    assert!(client.list_api_keys(&Default::default()).await.is_ok());
    let other = Simulator::start(
        SimConfig::new()
            .with_app_key(SecretString::new("sk_test_a"))
            .with_app_key(SecretString::new("sk_test_b")),
    )
    .await
    .unwrap();
    assert_eq!(other.app_keys().len(), 2);
    let mut cfg = fast_config(&other, &other.accounts()[0].id.clone());
    cfg.secret_key = SecretString::new("sk_test_b");
    assert!(
        StripeClient::new(cfg)
            .unwrap()
            .list_api_keys(&Default::default())
            .await
            .is_ok()
    );
    other.shutdown().await;
}

#[test]
fn account_flags_parse_id_and_mode() {
    use stripe_key_operator::sim::SimAccount;
    let a: SimAccount = "acct_123:live".parse().unwrap();
    assert_eq!((a.id.as_str(), a.mode), ("acct_123", Mode::Live));
    assert!("acct_123".parse::<SimAccount>().is_err());
    assert!("acct_1:prod".parse::<SimAccount>().is_err());
    assert!("user_1:test".parse::<SimAccount>().is_err());
}

/// What any Stripe SDK sees on the wire: every API-key object carries `permissions` and
/// `connect_permissions`, whatever the call.
#[tokio::test]
async fn raw_api_key_objects_carry_permissions_on_every_call() {
    let sim = start_sim(SimConfig::new().with_account(ACCT, Mode::Test)).await;
    let http = reqwest::Client::new();
    let base = sim.base_url();
    let call = |method: reqwest::Method, path: String, idem: &str, body: Option<Value>| {
        let mut req = http
            .request(method, format!("{base}{path}"))
            .bearer_auth(sim.app_key().expose())
            .header("Stripe-Context", ACCT)
            .header("Idempotency-Key", idem);
        if let Some(b) = body {
            req = req.json(&b);
        }
        async move {
            let r = req.send().await.unwrap();
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap())
        }
    };
    let check = |what: &str, v: &Value, perms: Value| {
        assert_eq!(v["object"], "v2.iam.api_key", "{what}");
        assert_eq!(v["permissions"], perms, "{what}: permissions");
        assert_eq!(
            v["connect_permissions"],
            json!(["customer_read"]),
            "{what}: connect_permissions"
        );
    };
    // a test-mode secret key without public_key, as Stripe's SDKs send it
    let (status, created) = call(
        reqwest::Method::POST,
        "/v2/iam/api_keys".into(),
        "raw-1",
        Some(json!({
            "type": "secret_key", "name": "raw",
            "permissions": ["charge_read"], "connect_permissions": ["customer_read"],
        })),
    )
    .await;
    assert_eq!(status, 200, "{created}");
    check("create", &created, json!(["charge_read"]));
    let id = created["id"].as_str().unwrap().to_owned();
    let (_, got) = call(
        reqwest::Method::GET,
        format!("/v2/iam/api_keys/{id}"),
        "-",
        None,
    )
    .await;
    check("retrieve", &got, json!(["charge_read"]));
    let (_, list) = call(reqwest::Method::GET, "/v2/iam/api_keys".into(), "-", None).await;
    check("list", &list["data"][0], json!(["charge_read"]));
    let (_, upd) = call(
        reqwest::Method::POST,
        format!("/v2/iam/api_keys/{id}"),
        "raw-2",
        Some(json!({ "permissions": ["balance_read"] })),
    )
    .await;
    check("update", &upd, json!(["balance_read"]));
    let (status, rot) = call(
        reqwest::Method::POST,
        format!("/v2/iam/api_keys/{id}/rotate"),
        "raw-3",
        Some(json!({ "expire_current_key_in_minutes": 10 })),
    )
    .await;
    assert_eq!(status, 200, "{rot}");
    check("rotate", &rot, json!(["balance_read"]));
    let (_, exp) = call(
        reqwest::Method::POST,
        format!("/v2/iam/api_keys/{}/expire", rot["id"].as_str().unwrap()),
        "raw-4",
        Some(json!({})),
    )
    .await;
    assert_eq!(exp["status"], "expired");
    check("expire", &exp, json!(["balance_read"]));
}

#[tokio::test]
async fn an_expired_app_key_gets_401_api_key_expired_on_every_app_call() {
    let sim = start_sim(SimConfig::new().with_account(ACCT, Mode::Test)).await;
    let client = StripeClient::new(fast_config(&sim, ACCT)).unwrap();
    client
        .list_api_keys(&Default::default())
        .await
        .expect("works before");
    sim.expire_app_key(sim.app_key()).unwrap();
    let err = client
        .list_webhook_endpoints(&ListWebhookEndpointsParams::default())
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(401));
    assert_eq!(err.code(), Some("api_key_expired"));
    let log = sim.request_log();
    assert_eq!(log.last().unwrap().status, Some(401));
    assert_eq!(log.len(), 2, "a 401 is not retried");
}
