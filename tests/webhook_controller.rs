//! The StripeWebhookEndpoint controller end to end: the real `Controller` against the Kubernetes
//! API for tests, the Stripe simulator and the in-memory store.

#[path = "common/operator.rs"]
mod operator;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kube::api::{Api, Patch, PatchParams};
use operator::*;
use serde_json::{Value, json};
use stripe_key_operator::api::{RotationPhase, RotationTrigger, StripeWebhookEndpoint, conditions};
use stripe_key_operator::sandbox::env::LocalEnv;
use stripe_key_operator::secret::SecretString;
use stripe_key_operator::sim::{EndpointState, SendEventRequest};
use stripe_key_operator::stripe::{StripeClient, UpdateWebhookEndpointParams};
use stripe_key_operator::vault::{SecretStore, StorePath, StorePrefix};
use stripe_key_operator::webhook::signature::Verifier;

const NAME: &str = "orders";
const SECRET: &str = "orders-webhook";
const URL: &str = "https://hooks.example.com/stripe";

fn store_path(name: &str) -> StorePath {
    StorePath::credential(
        &StorePrefix::new("stripe-key-operator").unwrap(),
        NS,
        "stripewebhookendpoint",
        name,
    )
    .unwrap()
}

fn endpoint_manifest(name: &str) -> Value {
    json!({
        "apiVersion": "stripekeys.io/v1alpha1", "kind": "StripeWebhookEndpoint",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "accountRef": {"name": ACCOUNT},
            "url": URL,
            "enabledEvents": ["charge.succeeded", "payment_intent.succeeded"],
            "description": "orders service",
            "metadata": {"team": "payments"},
            "delivery": {"secret": {"name": SECRET},
                         "rolloutTargets": [{"kind": "Deployment", "name": "checkout"}]},
            "rotation": {"every": "720h", "overlap": "1h"}
        }
    })
}

fn api(env: &LocalEnv) -> Api<StripeWebhookEndpoint> {
    Api::namespaced(env.client.clone(), NS)
}

async fn get(env: &LocalEnv) -> StripeWebhookEndpoint {
    api(env).get(NAME).await.unwrap()
}

/// Waits (bounded) until `pred` holds for the endpoint resource; panics with its status otherwise.
async fn wait(
    env: &LocalEnv,
    what: &str,
    pred: impl Fn(&StripeWebhookEndpoint) -> bool,
) -> StripeWebhookEndpoint {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(Some(e)) = api(env).get_opt(NAME).await {
            if pred(&e) {
                return e;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; status: {:#?}",
                e.status
            );
        } else {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn is_ready(e: &StripeWebhookEndpoint) -> bool {
    e.status
        .as_ref()
        .is_some_and(|s| conditions::is_true(&s.conditions, "Ready") && s.rotation.is_none())
}

fn in_phase(phase: RotationPhase) -> impl Fn(&StripeWebhookEndpoint) -> bool {
    move |e| {
        e.status
            .as_ref()
            .and_then(|s| s.rotation.as_ref())
            .is_some_and(|r| r.phase == phase)
    }
}

fn settled(e: &StripeWebhookEndpoint) -> bool {
    is_ready(e) && e.status.as_ref().unwrap().previous_key.is_none()
}

fn condition_of(e: &StripeWebhookEndpoint, type_: &str) -> Option<(String, String, String)> {
    let c = conditions::find(&e.status.as_ref()?.conditions, type_)?;
    Some((c.status.clone(), c.reason.clone(), c.message.clone()))
}

fn current_id(e: &StripeWebhookEndpoint) -> String {
    e.status
        .as_ref()
        .unwrap()
        .current_key
        .as_ref()
        .unwrap()
        .id
        .clone()
}

fn sim_endpoints(env: &LocalEnv) -> Vec<EndpointState> {
    env.sim
        .state()
        .account(&env.account_id)
        .map(|a| a.webhook_endpoints.clone())
        .unwrap_or_default()
}

fn stripe(env: &LocalEnv) -> StripeClient {
    StripeClient::new(env.sim.stripe_config(&env.account_id).unwrap()).unwrap()
}

/// Creates at Stripe that were not idempotent replays.
fn creates(env: &LocalEnv) -> usize {
    env.sim
        .request_log()
        .iter()
        .filter(|r| {
            r.method == "POST"
                && r.path == "/v1/webhook_endpoints"
                && r.status == Some(200)
                && !r.replayed
        })
        .count()
}

/// The Secret's current secret and its list of valid secrets (redacted in any failure output).
async fn secret_values(env: &LocalEnv) -> (SecretString, Vec<SecretString>) {
    let secret = env
        .secret(NS, SECRET)
        .await
        .unwrap()
        .expect("Secret synced");
    let current = SecretString::new(secret_value(&secret, "STRIPE_WEBHOOK_SECRET").unwrap());
    let all = secret_value(&secret, "STRIPE_WEBHOOK_SECRETS")
        .unwrap()
        .split(',')
        .map(SecretString::new)
        .collect();
    (current, all)
}

async fn deployment_fingerprint(env: &LocalEnv) -> Value {
    env.api
        .get("apps/v1", "Deployment", Some(NS), "checkout")
        .unwrap()["spec"]["template"]["metadata"]["annotations"]
        ["stripekeys.io/key-fingerprint.swe.orders"]
        .clone()
}

async fn annotate_endpoint(env: &LocalEnv, annotations: Value) {
    api(env)
        .patch(
            NAME,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": annotations}})),
        )
        .await
        .unwrap();
}

/// Changes an unrelated label so that the controller reconciles now (after the clock moved).
async fn nudge_endpoint(env: &LocalEnv) {
    let value = format!(
        "{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    api(env)
        .patch(
            NAME,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"test/nudge": value}}})),
        )
        .await
        .unwrap();
}

async fn create_and_wait(env: &LocalEnv) -> StripeWebhookEndpoint {
    env.apply_json(&endpoint_manifest(NAME)).await.unwrap();
    wait(env, "Ready", settled).await
}

/// A local receiver that records each delivery's body and `Stripe-Signature` header.
type Deliveries = Arc<Mutex<Vec<(Vec<u8>, String)>>>;

async fn receiver() -> (String, Deliveries) {
    let got: Deliveries = Arc::default();
    let sink = got.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(
            move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                let sink = sink.clone();
                async move {
                    let sig = headers
                        .get("stripe-signature")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_string();
                    sink.lock().unwrap().push((body.to_vec(), sig));
                    "ok"
                }
            },
        ),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (format!("http://{addr}/hook"), got)
}

#[tokio::test]
async fn create_publishes_the_declared_endpoint_and_its_secret() {
    let env = env().await;
    let e = create_and_wait(&env).await;
    let status = e.status.clone().unwrap();
    let current = status.current_key.clone().unwrap();
    let uid = e.metadata.uid.clone().unwrap();

    // Exactly one endpoint at Stripe, with the declared settings and the operator's metadata.
    let eps = sim_endpoints(&env);
    assert_eq!(eps.len(), 1, "{eps:#?}");
    let ep = &eps[0];
    assert_eq!(ep.id, current.id);
    assert!(current.id.starts_with("we_"));
    assert_eq!(ep.url, URL);
    assert_eq!(
        ep.enabled_events,
        ["charge.succeeded", "payment_intent.succeeded"]
    );
    assert_eq!(ep.description.as_deref(), Some("orders service"));
    assert_eq!(ep.status, "enabled");
    let meta = &ep.metadata;
    assert_eq!(meta["team"], "payments");
    assert_eq!(meta["stripekeys_managed_by"], "stripe-key-operator");
    assert_eq!(meta["stripekeys_namespace"], NS);
    assert_eq!(meta["stripekeys_name"], NAME);
    assert_eq!(meta["stripekeys_uid"], uid);
    assert_eq!(meta["stripekeys_rotation"], "1");
    assert_eq!(meta.len(), 6, "nothing else: {meta:?}");

    // The Secret holds the current secret under both keys; the store holds the same.
    let (cur, all) = secret_values(&env).await;
    assert!(cur.expose().starts_with("whsec_"));
    assert_eq!(cur.fingerprint(), current.fingerprint);
    assert_eq!(ep.valid_secret_fingerprints.len(), 1);
    assert_eq!(ep.valid_secret_fingerprints[0], current.fingerprint);
    assert_eq!(all.len(), 1, "outside an overlap: just the current one");
    assert_eq!(all[0], cur);
    let bundle = env
        .store
        .read_bundle(&store_path(NAME))
        .await
        .unwrap()
        .unwrap()
        .value;
    assert_eq!(bundle.current.key_id, current.id);
    assert_eq!(bundle.current.secret, cur);
    assert!(bundle.previous.is_none());
    let secret = env.secret(NS, SECRET).await.unwrap().unwrap();
    let owner = &secret.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(owner.kind, "StripeWebhookEndpoint");
    assert_eq!(owner.controller, Some(true));

    // The target rolled onto the secret.
    assert_eq!(
        deployment_fingerprint(&env).await,
        json!(current.fingerprint)
    );
    assert_eq!(status.rotation_number, Some(1));
    assert_eq!(status.current_connect, Some(false));
    assert!(status.next_rotation_at.is_some());
    assert_eq!(
        condition_of(&e, "Degraded").map(|c| c.0),
        Some("False".into())
    );
    let reasons = event_reasons(&env, NAME).await;
    assert!(
        reasons.contains(&("Normal".into(), "EndpointCreated".into())),
        "{reasons:?}"
    );
    assert_eq!(creates(&env), 1);
}

#[tokio::test]
async fn settings_changed_at_stripe_are_put_back_at_the_next_drift_check() {
    let env = env().await;
    let e = create_and_wait(&env).await;
    let id = current_id(&e);
    stripe(&env)
        .update_webhook_endpoint(
            &id,
            &UpdateWebhookEndpointParams {
                url: Some("https://evil.example.net/steal".into()),
                disabled: Some(true),
                ..Default::default()
            },
            "changed-by-hand",
        )
        .await
        .unwrap();
    // Before the interval passes nothing is checked.
    nudge_endpoint(&env).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(sim_endpoints(&env)[0].url, "https://evil.example.net/steal");

    env.clock.advance(Duration::from_secs(11 * 60));
    nudge_endpoint(&env).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while sim_endpoints(&env)[0].url != URL || sim_endpoints(&env)[0].status != "enabled" {
        assert!(Instant::now() < deadline, "drift never repaired");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let eps = sim_endpoints(&env);
    assert_eq!(eps.len(), 1);
    assert_eq!(eps[0].id, id, "repaired in place, not rotated");
    let reasons = event_reasons(&env, NAME).await;
    assert!(
        reasons.contains(&("Warning".into(), "DriftRepaired".into())),
        "{reasons:?}"
    );
    let e = wait(&env, "drift check recorded", |e| {
        e.status
            .as_ref()
            .is_some_and(|s| s.last_drift_check_at.is_some())
    })
    .await;
    assert_eq!(e.status.unwrap().rotation_number, Some(1));
}

#[tokio::test]
async fn an_endpoint_deleted_at_stripe_is_recreated_with_a_new_secret() {
    let env = env().await;
    let e = create_and_wait(&env).await;
    let old = e.status.unwrap().current_key.clone().unwrap();
    stripe(&env).delete_webhook_endpoint(&old.id).await.unwrap();
    env.clock.advance(Duration::from_secs(11 * 60));
    nudge_endpoint(&env).await;
    let e = wait(&env, "recreated", |e| settled(e) && current_id(e) != old.id).await;
    let status = e.status.unwrap();
    let new = status.current_key.clone().unwrap();
    assert_ne!(new.fingerprint, old.fingerprint, "a new signing secret");
    assert_eq!(
        status.last_rotation_trigger,
        Some(RotationTrigger::Recreate)
    );
    let eps = sim_endpoints(&env);
    assert_eq!(eps.len(), 1, "{eps:#?}");
    assert_eq!(eps[0].id, new.id);
    assert_eq!(eps[0].url, URL);
    let (cur, all) = secret_values(&env).await;
    assert_eq!(cur.fingerprint(), new.fingerprint);
    assert_eq!(all, [cur], "the dead endpoint's secret is not published");
    let deadline = Instant::now() + Duration::from_secs(10);
    while deployment_fingerprint(&env).await != json!(new.fingerprint) {
        assert!(Instant::now() < deadline, "target not rolled");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let reasons = event_reasons(&env, NAME).await;
    assert!(
        reasons.contains(&("Warning".into(), "EndpointMissing".into())),
        "{reasons:?}"
    );
}

#[tokio::test]
async fn annotation_rotation_is_blue_green_and_both_secrets_verify_during_the_overlap() {
    let env = env().await;
    let e = create_and_wait(&env).await;
    let first = e.status.unwrap().current_key.clone().unwrap();
    annotate_endpoint(&env, json!({"stripekeys.io/rotate": "2026-11-28T10:00"})).await;
    let e = wait(&env, "Overlapping", in_phase(RotationPhase::Overlapping)).await;
    let status = e.status.unwrap();
    let second = status.current_key.clone().unwrap();
    assert_ne!(first.id, second.id);
    assert_eq!(status.previous_key.as_ref().unwrap().id, first.id);
    assert!(status.previous_key.as_ref().unwrap().expires_at.is_some());

    // Both endpoints exist, with the same settings, and the Secret lists both, newest first.
    let eps = sim_endpoints(&env);
    assert_eq!(eps.len(), 2, "{eps:#?}");
    for ep in &eps {
        assert_eq!(ep.url, URL);
        assert_eq!(
            ep.enabled_events,
            ["charge.succeeded", "payment_intent.succeeded"]
        );
    }
    assert_eq!(
        eps.iter().find(|ep| ep.id == second.id).unwrap().metadata["stripekeys_rotation"],
        "2"
    );
    let (cur, all) = secret_values(&env).await;
    assert_eq!(cur.fingerprint(), second.fingerprint);
    assert_eq!(all.len(), 2);
    assert_eq!(all[0].fingerprint(), second.fingerprint);
    assert_eq!(all[1].fingerprint(), first.fingerprint);
    assert_eq!(
        deployment_fingerprint(&env).await,
        json!(second.fingerprint)
    );

    // A delivery from each endpoint verifies against the published list. (The CRD only takes
    // https URLs; the test points both endpoints at a local receiver behind the operator's back,
    // before the next drift check.)
    let (url, got) = receiver().await;
    let client = stripe(&env);
    for id in [&first.id, &second.id] {
        client
            .update_webhook_endpoint(
                id,
                &UpdateWebhookEndpointParams {
                    url: Some(url.clone()),
                    ..Default::default()
                },
                &format!("to-receiver-{id}"),
            )
            .await
            .unwrap();
        let outcome = env
            .sim
            .send_webhook(
                id,
                SendEventRequest {
                    event_type: "charge.succeeded".into(),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        assert!(outcome.delivered, "{outcome:?}");
        assert_eq!(outcome.signatures, 1);
    }
    let published = all;
    let verifier = Verifier::new(&published);
    let only_old = Verifier::new(&published[1..]);
    let deliveries = got.lock().unwrap().clone();
    assert_eq!(deliveries.len(), 2);
    for (body, sig) in &deliveries {
        verifier
            .verify(body, sig)
            .expect("each endpoint's delivery verifies against STRIPE_WEBHOOK_SECRETS");
    }
    assert!(
        only_old.verify(&deliveries[1].0, &deliveries[1].1).is_err(),
        "the new endpoint signs with the new secret"
    );

    // After the overlap only the new endpoint exists and the Secret holds just its secret.
    env.clock.advance(Duration::from_secs(3700));
    nudge_endpoint(&env).await;
    let e = wait(&env, "settled", settled).await;
    assert_eq!(current_id(&e), second.id);
    let eps = sim_endpoints(&env);
    assert_eq!(eps.len(), 1, "{eps:#?}");
    assert_eq!(eps[0].id, second.id);
    let (cur, all) = secret_values(&env).await;
    assert_eq!(all, [cur]);
    let bundle = env
        .store
        .read_bundle(&store_path(NAME))
        .await
        .unwrap()
        .unwrap()
        .value;
    assert!(bundle.previous.is_none());
    assert_eq!(
        e.status
            .as_ref()
            .unwrap()
            .last_handled_rotate_request
            .as_deref(),
        Some("2026-11-28T10:00")
    );
    // The local URL was drift from the spec: the first check after the overlap put it back.
    let deadline = Instant::now() + Duration::from_secs(10);
    while sim_endpoints(&env)[0].url != URL {
        assert!(Instant::now() < deadline, "url not repaired");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The same annotation never rotates twice.
    nudge_endpoint(&env).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(creates(&env), 2);
    assert_eq!(get(&env).await.status.unwrap().rotation_number, Some(2));
}

#[tokio::test]
async fn incident_rotation_deletes_the_old_endpoint_at_once() {
    let env = env().await;
    let first = create_and_wait(&env)
        .await
        .status
        .unwrap()
        .current_key
        .clone()
        .unwrap();
    env.api.set_workload_stuck(NS, "checkout", true);
    annotate_endpoint(
        &env,
        json!({"stripekeys.io/rotate": "incident-1", "stripekeys.io/rotate-reason": "incident"}),
    )
    .await;
    let e = wait(
        &env,
        "incident rollout",
        in_phase(RotationPhase::RollingOut),
    )
    .await;
    // Deleted before the rollout finished: no overlap at all.
    let eps = sim_endpoints(&env);
    assert_eq!(eps.len(), 1, "{eps:#?}");
    assert_ne!(eps[0].id, first.id);
    assert_eq!(eps[0].id, current_id(&e));
    let (cur, all) = secret_values(&env).await;
    assert_eq!(all, [cur], "a compromised secret is not published");
    let (_, reason, _) = condition_of(&e, "Rotating").unwrap();
    assert_eq!(reason, "IncidentRotation");
    let reasons = event_reasons(&env, NAME).await;
    assert!(
        reasons.contains(&("Warning".into(), "IncidentRotation".into())),
        "{reasons:?}"
    );
    env.api.set_workload_stuck(NS, "checkout", false);
    let e = wait(&env, "Ready", settled).await;
    assert_eq!(
        e.status.unwrap().last_rotation_trigger,
        Some(RotationTrigger::Incident)
    );
}

#[tokio::test]
async fn an_api_version_change_rotates_and_a_url_change_updates_in_place() {
    let env = env().await;
    let first = create_and_wait(&env)
        .await
        .status
        .unwrap()
        .current_key
        .clone()
        .unwrap();

    let mut m = endpoint_manifest(NAME);
    m["spec"]["url"] = json!("https://hooks.example.com/v2");
    env.apply_json(&m).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while sim_endpoints(&env)[0].url != "https://hooks.example.com/v2" {
        assert!(Instant::now() < deadline, "url change not applied");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(sim_endpoints(&env)[0].id, first.id, "updated, not rotated");

    m["spec"]["apiVersion"] = json!("2024-06-20");
    env.apply_json(&m).await.unwrap();
    let e = wait(&env, "Overlapping", in_phase(RotationPhase::Overlapping)).await;
    let status = e.status.unwrap();
    assert_eq!(
        status.rotation.as_ref().unwrap().trigger,
        RotationTrigger::SpecChange
    );
    let second = status.current_key.clone().unwrap();
    let new_ep = sim_endpoints(&env)
        .into_iter()
        .find(|ep| ep.id == second.id)
        .unwrap();
    assert_eq!(new_ep.api_version.as_deref(), Some("2024-06-20"));
    assert_eq!(new_ep.url, "https://hooks.example.com/v2");
    env.clock.advance(Duration::from_secs(3700));
    nudge_endpoint(&env).await;
    let e = wait(&env, "settled", settled).await;
    assert_eq!(
        e.status.unwrap().current_api_version.as_deref(),
        Some("2024-06-20")
    );
    let eps = sim_endpoints(&env);
    assert_eq!(eps.len(), 1);
    assert_eq!(eps[0].id, second.id);
}

#[tokio::test]
async fn a_host_the_guardrails_do_not_allow_is_refused_without_a_stripe_call() {
    let env = env().await;
    env.apply_json(&json!({
        "apiVersion": "stripekeys.io/v1alpha1", "kind": "StripeGuardrail", "metadata": {"name": "own-hosts"},
        "spec": {"namespaceSelector": {}, "allowedWebhookHosts": ["*.internal.example.com"]}
    }))
    .await
    .unwrap();
    env.apply_json(&endpoint_manifest(NAME)).await.unwrap();
    let e = wait(&env, "refused", |e| {
        condition_of(e, "Ready").is_some_and(|c| c.0 == "False")
    })
    .await;
    let (_, reason, message) = condition_of(&e, "Ready").unwrap();
    assert_eq!(reason, "GuardrailViolation");
    assert!(
        message.contains("hooks.example.com") && message.contains("own-hosts"),
        "{message}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        resource_calls(&env).is_empty(),
        "no Stripe call for a refused endpoint"
    );
    assert!(env.secret(NS, SECRET).await.unwrap().is_none());
    let reasons = event_reasons(&env, NAME).await;
    assert!(
        reasons.contains(&("Warning".into(), "GuardrailViolation".into())),
        "{reasons:?}"
    );
}

#[tokio::test]
async fn a_namespace_the_account_does_not_serve_is_refused() {
    let env = env().await;
    env.apply_json(&json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "ads"}}))
        .await
        .unwrap();
    let mut m = endpoint_manifest("banner");
    m["metadata"]["namespace"] = json!("ads");
    env.apply_json(&m).await.unwrap();
    let api: Api<StripeWebhookEndpoint> = Api::namespaced(env.client.clone(), "ads");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let e = api.get("banner").await.unwrap();
        if let Some((status, reason, _)) = condition_of(&e, "Ready") {
            assert_eq!(status, "False");
            assert_eq!(reason, "NamespaceNotAllowed");
            break;
        }
        assert!(Instant::now() < deadline, "no condition");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(resource_calls(&env).is_empty());
}

#[tokio::test]
async fn deletion_removes_every_endpoint_and_the_store_entry() {
    let env = env().await;
    create_and_wait(&env).await;
    // Mid-rotation: a current and a previous endpoint both exist.
    annotate_endpoint(&env, json!({"stripekeys.io/rotate": "before-delete"})).await;
    wait(&env, "Overlapping", in_phase(RotationPhase::Overlapping)).await;
    assert_eq!(sim_endpoints(&env).len(), 2);
    api(&env).delete(NAME, &Default::default()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while api(&env).get_opt(NAME).await.unwrap().is_some() {
        assert!(Instant::now() < deadline, "finalizer never finished");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(sim_endpoints(&env).is_empty(), "{:#?}", sim_endpoints(&env));
    assert!(
        env.store
            .read_bundle(&store_path(NAME))
            .await
            .unwrap()
            .is_none()
    );
    let reasons = event_reasons(&env, NAME).await;
    assert!(
        reasons.contains(&("Normal".into(), "EndpointDeleted".into())),
        "{reasons:?}"
    );
}

/// After a full routine rotation: exactly one endpoint, the one in status, the store and the
/// Secret; nothing created twice.
async fn assert_settled(env: &LocalEnv) {
    let e = wait(env, "settled", settled).await;
    let current = e.status.unwrap().current_key.clone().unwrap();
    let eps = sim_endpoints(env);
    assert_eq!(eps.len(), 1, "exactly one endpoint: {eps:#?}");
    assert_eq!(eps[0].id, current.id);
    assert_eq!(creates(env), 2, "one create per rotation, none twice");
    let bundle = env
        .store
        .read_bundle(&store_path(NAME))
        .await
        .unwrap()
        .unwrap()
        .value;
    assert_eq!(bundle.current.key_id, current.id);
    assert!(bundle.previous.is_none());
    let (cur, all) = secret_values(env).await;
    assert_eq!(cur.fingerprint(), current.fingerprint);
    assert_eq!(all, [cur]);
}

#[tokio::test]
async fn a_crash_after_any_step_resumes_without_a_second_endpoint() {
    for point in ["minted", "stored", "synced", "rolled", "expired"] {
        let mut env = env().await;
        create_and_wait(&env).await;
        env.crash.arm(point);
        annotate_endpoint(
            &env,
            json!({"stripekeys.io/rotate": format!("crash-{point}")}),
        )
        .await;
        if point == "expired" {
            wait(&env, "Overlapping", in_phase(RotationPhase::Overlapping)).await;
            env.clock.advance(Duration::from_secs(3700));
            nudge_endpoint(&env).await;
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while env.crash.hits() == 0 {
            assert!(
                Instant::now() < deadline,
                "crash point {point} never reached"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The process dies right after the side effect, before recording it; a new one starts.
        env.kill_operator().await;
        env.start_operator();
        if point != "expired" {
            wait(&env, "Overlapping", in_phase(RotationPhase::Overlapping)).await;
            env.clock.advance(Duration::from_secs(3700));
            nudge_endpoint(&env).await;
        }
        assert_settled(&env).await;
        eprintln!("crash after {point}: recovered with one endpoint");
    }
}

#[tokio::test]
async fn an_unchanged_endpoint_reconciled_100_times_writes_nothing() {
    let env = env().await;
    create_and_wait(&env).await;
    // Let the controller settle (rollout done, first drift check recorded).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let ctx = env.context().unwrap();
    let path = store_path(NAME);
    let versions_before = env.store.list_versions(&path).await.unwrap().len();
    let stripe_before = env.sim.request_log().len();
    env.api.reset_counts();
    for _ in 0..100 {
        let e = get(&env).await;
        stripe_key_operator::controller::webhook::reconcile(Arc::new(e), ctx.clone())
            .await
            .unwrap();
    }
    let writes: Vec<_> = env
        .api
        .request_counts()
        .into_iter()
        .filter(|((verb, _), n)| {
            *n > 0 && matches!(verb.as_str(), "create" | "update" | "patch" | "delete")
        })
        .collect();
    assert!(
        writes.is_empty(),
        "Kubernetes writes in steady state: {writes:?}"
    );
    let log = env.sim.request_log();
    assert_eq!(
        log[stripe_before..]
            .iter()
            .filter(|r| r.method == "POST" || r.method == "DELETE")
            .count(),
        0,
        "no Stripe writes"
    );
    assert_eq!(
        log.len(),
        stripe_before,
        "no Stripe call at all between drift checks"
    );
    assert_eq!(
        env.store.list_versions(&path).await.unwrap().len(),
        versions_before,
        "no store writes"
    );
}

#[tokio::test]
async fn an_incident_during_a_routine_rotation_deletes_the_old_endpoint_at_once() {
    let env = env().await;
    let first = create_and_wait(&env)
        .await
        .status
        .unwrap()
        .current_key
        .clone()
        .unwrap();
    env.api.set_workload_stuck(NS, "checkout", true);
    annotate_endpoint(&env, json!({"stripekeys.io/rotate": "routine-1"})).await;
    let rolling = wait(&env, "RollingOut", in_phase(RotationPhase::RollingOut)).await;
    let second = current_id(&rolling);
    assert_eq!(sim_endpoints(&env).len(), 2, "blue/green while rolling");
    annotate_endpoint(
        &env,
        json!({"stripekeys.io/rotate": "incident-1", "stripekeys.io/rotate-reason": "incident"}),
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while sim_endpoints(&env)
        .iter()
        .any(|ep| ep.id == first.id || ep.id == second)
    {
        assert!(
            Instant::now() < deadline,
            "an endpoint whose secret was handed out before the incident still exists"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (cur, all) = secret_values(&env).await;
        if all == [cur] {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the compromised secret is still published"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    env.api.set_workload_stuck(NS, "checkout", false);
    let e = wait(&env, "settled", settled).await;
    assert_eq!(sim_endpoints(&env).len(), 1);
    assert_eq!(sim_endpoints(&env)[0].id, current_id(&e));
    assert_ne!(
        current_id(&e),
        second,
        "the incident mints a fresh endpoint"
    );
    assert_eq!(
        creates(&env),
        3,
        "initial, the routine rotation's, and one fresh endpoint for the incident"
    );
    assert_eq!(
        e.status.unwrap().last_handled_rotate_request.as_deref(),
        Some("incident-1")
    );
}

#[tokio::test]
async fn scheduled_rotation_fires_when_next_rotation_at_passes() {
    let env = env().await;
    let mut m = endpoint_manifest(NAME);
    m["spec"]["rotation"] = json!({"every": "2h", "overlap": "5m"});
    env.apply_json(&m).await.unwrap();
    let e = wait(&env, "Ready", settled).await;
    let status = e.status.unwrap();
    let gap = status
        .next_rotation_at
        .clone()
        .unwrap()
        .0
        .duration_since(status.last_rotation_at.clone().unwrap().0)
        .as_secs();
    assert!((7200..7200 + 72).contains(&gap), "2h plus jitter: {gap}s");
    env.clock.advance(Duration::from_secs(7300));
    nudge_endpoint(&env).await;
    let e = wait(&env, "scheduled rotation", |e| {
        e.status
            .as_ref()
            .is_some_and(|s| s.rotation_number == Some(2))
    })
    .await;
    assert_eq!(
        e.status.unwrap().last_rotation_trigger,
        Some(RotationTrigger::Schedule)
    );
}

#[tokio::test]
async fn a_lagging_watch_cache_never_makes_the_controller_redo_a_step() {
    let env = env().await;
    // The endpoint's own watch events arrive a second late; the owned Secret's and the
    // Deployment's at once. Each step must be decided on the state the controller recorded.
    env.api
        .set_watch_delay("stripewebhookendpoints", Duration::from_secs(1));
    create_and_wait(&env).await;
    annotate_endpoint(&env, json!({"stripekeys.io/rotate": "2026-11-29T01:00"})).await;
    wait(&env, "Overlapping", in_phase(RotationPhase::Overlapping)).await;
    env.clock.advance(Duration::from_secs(3700));
    nudge_endpoint(&env).await;
    assert_settled(&env).await;
    let log = env.sim.request_log();
    let posts: Vec<_> = log
        .iter()
        .filter(|r| r.method == "POST" && r.path == "/v1/webhook_endpoints")
        .collect();
    assert_eq!(
        posts.len(),
        2,
        "one create request per rotation: {posts:#?}"
    );
    assert!(posts.iter().all(|r| !r.replayed), "no replayed create");
    let deletes = log.iter().filter(|r| r.method == "DELETE").count();
    assert_eq!(deletes, 1, "the old endpoint is deleted once");
}

#[tokio::test]
async fn a_rotation_leaves_audit_lines_for_every_call_and_phase_with_its_trigger() {
    let (audit, lines) = stripe_key_operator::audit::AuditLog::memory();
    let env = env_with(stripe_key_operator::sandbox::env::EnvOptions {
        audit: Some(audit.clone()),
        ..Default::default()
    })
    .await;
    create_and_wait(&env).await;
    annotate_endpoint(&env, json!({"stripekeys.io/rotate": "audit"})).await;
    wait(&env, "Overlapping", in_phase(RotationPhase::Overlapping)).await;
    env.clock.advance(Duration::from_secs(3700));
    nudge_endpoint(&env).await;
    assert_settled(&env).await;
    audit.flush().await;
    let entries: Vec<Value> = lines
        .lines()
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let stripe_calls = entries
        .iter()
        .filter(|e| e["action"] == "stripe.request")
        .count();
    assert_eq!(
        stripe_calls,
        env.sim.request_log().len(),
        "one audit line per Stripe call"
    );
    // The routine rotation's phases, in order, each attributed to the annotation.
    let phases: Vec<(String, String)> = entries
        .iter()
        .filter(|e| e["action"] == "rotation.transition" && e["actor"]["trigger"] == "Annotation")
        .map(|e| {
            (
                e["details"]["from"].as_str().unwrap().to_owned(),
                e["details"]["to"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let first = phases.first().expect("transitions of the rotation");
    assert_eq!(first.0, "Idle", "{phases:?}");
    assert!(
        phases.windows(2).all(|w| w[0].1 == w[1].0),
        "each transition starts where the last ended: {phases:?}"
    );
    assert!(
        phases.iter().any(|(_, to)| to == "Overlapping"),
        "{phases:?}"
    );
    assert_eq!(phases.last().unwrap().1, "Idle", "{phases:?}");
    // Secret syncs and store writes of the rotation name who triggered them too.
    for action in ["store.write", "secret.sync"] {
        assert!(
            entries
                .iter()
                .any(|e| e["action"] == action && e["actor"]["trigger"] == "Annotation"),
            "no {action} line attributed to the annotation"
        );
    }
    let summary =
        stripe_key_operator::audit::verify_chain(lines.contents().as_bytes(), &Default::default())
            .unwrap();
    assert_eq!(summary.lines, entries.len());
}

/// Blue/green: the new endpoint sends nothing before receivers hold its secret. It is created,
/// disabled at once, published and rolled, and only then enabled; the old endpoint carries every
/// event meanwhile.
#[tokio::test]
async fn a_routine_rotation_keeps_the_new_endpoint_disabled_until_the_targets_rolled() {
    let env = env().await;
    let first = current_id(&create_and_wait(&env).await);
    let status_of = |id: &str| {
        sim_endpoints(&env)
            .into_iter()
            .find(|ep| ep.id == id)
            .map(|ep| ep.status)
    };
    assert_eq!(status_of(&first).as_deref(), Some("enabled"));
    env.api.set_workload_stuck(NS, "checkout", true);
    annotate_endpoint(&env, json!({"stripekeys.io/rotate": "routine-1"})).await;
    let rolling = wait(&env, "RollingOut", in_phase(RotationPhase::RollingOut)).await;
    let second = current_id(&rolling);
    assert_ne!(second, first);
    let (cur, _) = secret_values(&env).await;
    assert_eq!(
        cur.fingerprint(),
        rolling
            .status
            .as_ref()
            .unwrap()
            .current_key
            .as_ref()
            .unwrap()
            .fingerprint,
        "the new secret is published"
    );
    assert_eq!(
        status_of(&second).as_deref(),
        Some("disabled"),
        "no event is signed with a secret the receivers may not hold yet"
    );
    assert_eq!(
        status_of(&first).as_deref(),
        Some("enabled"),
        "the old endpoint carries the events"
    );
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        status_of(&second).as_deref(),
        Some("disabled"),
        "still rolling"
    );

    env.api.set_workload_stuck(NS, "checkout", false);
    wait(&env, "Overlapping", in_phase(RotationPhase::Overlapping)).await;
    assert_eq!(
        status_of(&second).as_deref(),
        Some("enabled"),
        "enabled once every target rolled"
    );
    assert_eq!(
        status_of(&first).as_deref(),
        Some("enabled"),
        "both during the overlap"
    );
    let reasons = event_reasons(&env, NAME).await;
    assert!(
        reasons.contains(&("Normal".into(), "EndpointEnabled".into())),
        "{reasons:?}"
    );
}

/// In an incident the new endpoint stays enabled: the old one is gone at once, and Stripe
/// retries what receivers reject until they load the new secret.
#[tokio::test]
async fn an_incident_keeps_the_new_endpoint_enabled() {
    let env = env().await;
    let first = current_id(&create_and_wait(&env).await);
    env.api.set_workload_stuck(NS, "checkout", true);
    annotate_endpoint(
        &env,
        json!({"stripekeys.io/rotate": "incident-1", "stripekeys.io/rotate-reason": "incident"}),
    )
    .await;
    let rolling = wait(&env, "RollingOut", in_phase(RotationPhase::RollingOut)).await;
    let second = current_id(&rolling);
    let eps = sim_endpoints(&env);
    assert!(
        eps.iter().all(|ep| ep.id != first),
        "the old endpoint is deleted at once"
    );
    assert_eq!(
        eps.iter()
            .find(|ep| ep.id == second)
            .map(|ep| ep.status.as_str()),
        Some("enabled")
    );
}
