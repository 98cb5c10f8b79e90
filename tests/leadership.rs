//! Two replicas never both act: a leader stops before its lease can pass (even when a renewal
//! hangs), drops the reconciles in flight when the lease is lost and writes nothing more, and a
//! status write from a reconcile that read an older object is refused (409) instead of rolling a
//! newer status back.

#[path = "common/operator.rs"]
mod operator;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, PostParams};
use kube_test_api::Fault;
use operator::*;
use serde_json::json;
use stripe_key_operator::api::RotationPhase;
use stripe_key_operator::controller::error::ReconcileError;
use stripe_key_operator::controller::{RunConfig, RunError, keypolicy, run_with_client};
use stripe_key_operator::leader::{LeaderConfig, LeaderElector};
use stripe_key_operator::sandbox::env::{EnvOptions, LocalEnv, OPERATOR_NAMESPACE};
use stripe_key_operator::sim::{FaultKind, FaultSpec};
use tokio_util::sync::CancellationToken;

/// The flags of `stripe-key-operator run`, parsed as the binary parses them.
#[derive(clap::Parser)]
struct Wrapper {
    #[command(flatten)]
    config: RunConfig,
}

fn run_config(extra: &[&str]) -> Result<RunConfig, clap::Error> {
    use clap::Parser;
    let mut args = vec![
        "run",
        "--http-addr",
        "127.0.0.1:0",
        "--pod-name",
        "replica-a",
        "--store",
        "memory",
        "--audit-log",
        "off",
        "--allow-loopback-api",
        "true",
        "--lease-name",
        "leader-test",
    ];
    args.extend_from_slice(extra);
    Wrapper::try_parse_from(args).map(|w| w.config)
}

/// A lease that still renews on a loaded 2-core CI machine, for the tests that are not about
/// the renew timing itself (the replica learns of a takeover at its next retry either way).
const STEADY_LEASE: [&str; 6] = [
    "--lease-duration",
    "10s",
    "--renew-deadline",
    "6s",
    "--retry-period",
    "300ms",
];

const FAST_LEASE: [&str; 6] = [
    "--lease-duration",
    "3s",
    "--renew-deadline",
    "1500ms",
    "--retry-period",
    "300ms",
];

async fn lease_holder(client: &kube::Client, name: &str) -> Option<String> {
    Api::<Lease>::namespaced(client.clone(), OPERATOR_NAMESPACE)
        .get_opt(name)
        .await
        .ok()
        .flatten()
        .and_then(|l| l.spec?.holder_identity)
}

/// Writes between two snapshots of the API server's counters, leases aside.
fn writes_except_leases(env: &LocalEnv) -> Vec<((String, String), u64)> {
    env.api
        .request_counts()
        .into_iter()
        .filter(|((verb, resource), _)| {
            matches!(
                verb.as_str(),
                "create" | "update" | "patch" | "delete" | "deletecollection"
            ) && !resource.starts_with("leases")
        })
        .collect()
}

#[test]
fn lease_flags_are_parsed_and_a_renew_deadline_too_close_to_the_lease_is_refused() {
    let config = run_config(&FAST_LEASE).unwrap();
    let leader = config.leader_config().unwrap();
    assert_eq!(leader.lease_duration, Duration::from_secs(3));
    assert_eq!(leader.renew_deadline, Duration::from_millis(1500));
    assert_eq!(leader.retry_period, Duration::from_millis(300));
    assert_eq!(leader.identity, "replica-a");

    let defaults = run_config(&[]).unwrap().leader_config().unwrap();
    assert_eq!(
        (
            defaults.lease_duration,
            defaults.renew_deadline,
            defaults.retry_period
        ),
        (
            Duration::from_secs(15),
            Duration::from_secs(10),
            Duration::from_secs(2)
        )
    );

    for bad in [
        ["--lease-duration", "15s", "--renew-deadline", "15s"],
        ["--lease-duration", "15s", "--renew-deadline", "14s"],
        ["--lease-duration", "10s", "--renew-deadline", "20s"],
        ["--renew-deadline", "3s", "--retry-period", "2s"],
    ] {
        let err = run_config(&bad).unwrap().leader_config().unwrap_err();
        assert!(
            matches!(err, RunError::Settings(ref m) if m.contains("--renew-deadline")),
            "{bad:?}: {err}"
        );
    }
}

#[tokio::test]
async fn the_operator_refuses_to_start_with_a_renew_deadline_at_the_lease_duration() {
    let env = env_without_operator(EnvOptions::default()).await;
    let config = run_config(&["--lease-duration", "10s", "--renew-deadline", "10s"]).unwrap();
    let result = tokio::time::timeout(
        Duration::from_secs(10),
        run_with_client(config, env.client.clone(), CancellationToken::new()),
    )
    .await
    .expect("refused at once");
    assert!(matches!(result, Err(RunError::Settings(_))), "{result:?}");
    assert_eq!(lease_holder(&env.client, "leader-test").await, None);
}

#[tokio::test]
async fn a_hanging_renewal_ends_leadership_within_the_renew_deadline() {
    let env = env_without_operator(EnvOptions::default()).await;
    let config = LeaderConfig {
        lease_duration: Duration::from_secs(3),
        renew_deadline: Duration::from_millis(1500),
        retry_period: Duration::from_millis(300),
        ..LeaderConfig::new(OPERATOR_NAMESPACE, "hang-test", "a")
    };
    config.validate().unwrap();
    let leadership = LeaderElector::new(env.client.clone(), config.clone())
        .acquire(CancellationToken::new())
        .await
        .unwrap();
    let lost = leadership.lost();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !lost.is_cancelled(),
        "renewals that succeed keep leadership past the renew deadline"
    );
    // From now on every renewal write hangs: it never answers, never fails.
    env.api.inject_fault("update", "leases", Fault::Hang, None);
    let hung_at = Instant::now();
    tokio::time::timeout(Duration::from_secs(6), lost.cancelled())
        .await
        .expect("a hanging renewal does not keep leadership");
    let after = hung_at.elapsed();
    // The last renewal that succeeded started before `hung_at`: leadership ends at most one
    // renew deadline later (plus timer slack), well before another replica may take the lease.
    assert!(
        after <= config.renew_deadline + Duration::from_millis(250),
        "leadership ended {after:?} after the renewals began to hang"
    );
    assert!(after + Duration::from_millis(500) < config.lease_duration);
    assert!(
        env.api.request_count("update", "leases") >= 1,
        "a renewal was attempted and hung"
    );
    env.api.clear_faults();
    leadership.release().await;
}

#[tokio::test]
async fn a_lost_lease_drops_the_reconcile_in_flight_and_no_write_follows() {
    let env = env_without_operator(EnvOptions::default()).await;
    let config = run_config(&STEADY_LEASE).unwrap();
    let shutdown = CancellationToken::new();
    let operator = tokio::spawn(run_with_client(
        config,
        env.client.clone(),
        shutdown.clone(),
    ));
    let deadline = Instant::now() + Duration::from_secs(20);
    while lease_holder(&env.client, "leader-test").await.as_deref() != Some("replica-a") {
        assert!(Instant::now() < deadline, "replica-a never led");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The mint of the first key takes 5 s at Stripe: the reconcile is blocked inside it.
    env.sim.inject_fault(
        FaultSpec::next(1, FaultKind::Latency { millis: 5000 })
            .for_method("POST")
            .for_path_prefix("/v2/iam/api_keys"),
    );
    env.apply_json(&policy("checkout", &["charge_read"]))
        .await
        .unwrap();
    wait_policy(&env, "checkout", "the rotation to mint", |p| {
        p.status
            .as_ref()
            .and_then(|s| s.rotation.as_ref())
            .is_some_and(|r| r.phase == RotationPhase::Minting)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stripe_before: BTreeSet<String> = env
        .sim
        .request_log()
        .into_iter()
        .map(|r| r.request_id)
        .collect();
    let writes_before = writes_except_leases(&env);

    // Another replica takes the lease (as after a partition): replica-a must stop acting.
    let leases: Api<Lease> = Api::namespaced(env.client.clone(), OPERATOR_NAMESPACE);
    let mut lease = leases.get("leader-test").await.unwrap();
    let spec = lease.spec.as_mut().unwrap();
    spec.holder_identity = Some("replica-b".into());
    spec.renew_time = Some(MicroTime(k8s_openapi::jiff::Timestamp::now()));
    spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
    leases
        .replace("leader-test", &PostParams::default(), &lease)
        .await
        .unwrap();
    let taken_at = Instant::now();

    let result = tokio::time::timeout(Duration::from_secs(3), operator)
        .await
        .expect("the operator stops at once, without waiting for the reconcile in flight")
        .unwrap();
    assert!(
        matches!(result, Err(RunError::LeadershipLost)),
        "losing the lease ends the process with an error (the pod restarts): {result:?}"
    );
    assert!(taken_at.elapsed() < Duration::from_secs(3));

    // Past the end of the slow mint, and then some: nothing more reaches Stripe or Kubernetes.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let after: Vec<_> = env
        .sim
        .request_log()
        .into_iter()
        .filter(|r| !stripe_before.contains(&r.request_id))
        .collect();
    assert!(
        after.iter().all(|r| r.fault.as_deref() == Some("latency")),
        "only the mint already on the wire may finish; nothing new was sent: {after:#?}"
    );
    assert_eq!(
        writes_except_leases(&env),
        writes_before,
        "no Kubernetes write after the lease was lost"
    );
    let p = get_policy(&env, "checkout").await;
    assert_eq!(
        p.status
            .as_ref()
            .and_then(|s| s.rotation.as_ref())
            .map(|r| r.phase),
        Some(RotationPhase::Minting),
        "the status still shows the step the lost leader was in"
    );
}

async fn reconcile_until_ready(
    env: &LocalEnv,
    ctx: &Arc<stripe_key_operator::controller::Context>,
) {
    for _ in 0..40 {
        let p = get_policy(env, "checkout").await;
        if ready(&p) {
            return;
        }
        let _ = keypolicy::reconcile(Arc::new(p), ctx.clone()).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "never Ready: {:#?}",
        get_policy(env, "checkout").await.status
    );
}

fn guardrail_lists(env: &LocalEnv) -> u64 {
    env.api
        .recorded_requests()
        .into_iter()
        .filter(|(r, _)| r.verb == "list" && r.resource == "stripeguardrails")
        .map(|(_, n)| n)
        .sum()
}

/// A split brain: two reconcilers (two operator contexts) on the same policy. The one that read
/// the policy first and was slowed down writes last: its write is refused, and the newer status
/// stays.
#[tokio::test]
async fn a_stale_reconciler_gets_a_conflict_and_never_rolls_a_newer_status_back() {
    let env = env_without_operator(EnvOptions::default()).await;
    let newer = env.new_context();
    let stale = env.new_context();
    env.apply_json(&policy("checkout", &["charge_read"]))
        .await
        .unwrap();
    reconcile_until_ready(&env, &newer).await;
    annotate(&env, "checkout", json!({"stripekeys.io/rotate": "r1"})).await;

    // The stale reconciler reads the policy, then is held up (a slow API answer) before its
    // first write.
    let lists = guardrail_lists(&env);
    env.api.inject_fault(
        "list",
        "stripeguardrails",
        Fault::Delay(Duration::from_secs(3)),
        Some(1),
    );
    let read = get_policy(&env, "checkout").await;
    let stale_run = tokio::spawn({
        let ctx = stale.clone();
        async move { keypolicy::reconcile(Arc::new(read), ctx).await }
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while guardrail_lists(&env) == lists {
        assert!(Instant::now() < deadline, "the stale reconcile never ran");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Meanwhile the other one handles the request: the rotation starts and moves on.
    let p = get_policy(&env, "checkout").await;
    keypolicy::reconcile(Arc::new(p), newer.clone())
        .await
        .unwrap();
    let newest = get_policy(&env, "checkout").await;
    let newest_rotation = newest.status.as_ref().unwrap().rotation.clone();
    assert!(
        newest_rotation.is_some(),
        "the rotation started: {:#?}",
        newest.status
    );

    let result = stale_run.await.unwrap();
    match &result {
        Err(ReconcileError::Kube(kube::Error::Api(s))) => {
            assert_eq!((s.code, s.reason.as_str()), (409, "Conflict"), "{s:?}")
        }
        other => panic!("the stale reconcile must meet a conflict, got {other:?}"),
    }
    let after = get_policy(&env, "checkout").await;
    assert_eq!(
        serde_json::to_value(&after.status).unwrap(),
        serde_json::to_value(&newest.status).unwrap(),
        "the stale reconciler's status never overwrote the newer one"
    );
    assert_eq!(
        after.metadata.resource_version, newest.metadata.resource_version,
        "the stale reconciler wrote nothing to the policy"
    );
    // The conflict is no failure: it requeues at once, without backing off, however often.
    for _ in 0..5 {
        assert_eq!(
            stripe_key_operator::rotation::engine::error_policy::<keypolicy::KeyPolicy>(
                Arc::new(after.clone()),
                result.as_ref().unwrap_err(),
                stale.clone()
            ),
            kube::runtime::controller::Action::requeue(
                stripe_key_operator::controller::shared::CONFLICT_REQUEUE
            )
        );
    }
    let other: ReconcileError = kube::Error::Api(Box::new(
        serde_json::from_value(
            json!({"code": 500, "reason": "InternalError", "message": "x", "status": "Failure"}),
        )
        .unwrap(),
    ))
    .into();
    assert_ne!(
        stripe_key_operator::rotation::engine::error_policy::<keypolicy::KeyPolicy>(
            Arc::new(after.clone()),
            &other,
            stale.clone()
        ),
        kube::runtime::controller::Action::requeue(
            stripe_key_operator::controller::shared::CONFLICT_REQUEUE
        ),
        "other errors back off"
    );
    // A fresh reconcile (as the requeue runs) goes on from the newer status.
    let p = get_policy(&env, "checkout").await;
    keypolicy::reconcile(Arc::new(p), stale.clone())
        .await
        .unwrap();
}

/// A standby (the Lease is held by another replica) runs no controller, is ready and healthy:
/// waiting for the lease is its work.
#[tokio::test]
async fn a_standby_replica_is_ready_and_healthy_while_it_waits_for_the_lease() {
    let env = env_without_operator(EnvOptions::default()).await;
    let leases: Api<Lease> = Api::namespaced(env.client.clone(), OPERATOR_NAMESPACE);
    let held: Lease = serde_json::from_value(json!({
        "metadata": {"name": "leader-test"},
        "spec": {"holderIdentity": "replica-b", "leaseDurationSeconds": 60,
                 "renewTime": MicroTime(k8s_openapi::jiff::Timestamp::now())}
    }))
    .unwrap();
    leases.create(&PostParams::default(), &held).await.unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let mut config = run_config(&[]).unwrap();
    config.http_addr = addr.parse().unwrap();
    let shutdown = CancellationToken::new();
    let operator = tokio::spawn(run_with_client(
        config,
        env.client.clone(),
        shutdown.clone(),
    ));
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(r) = http.get(format!("http://{addr}/readyz")).send().await
            && r.status() == 200
        {
            break;
        }
        assert!(Instant::now() < deadline, "the standby never became ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for _ in 0..3 {
        let r = http
            .get(format!("http://{addr}/healthz"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(
        lease_holder(&env.client, "leader-test").await.as_deref(),
        Some("replica-b"),
        "the standby did not take a held lease"
    );
    shutdown.cancel();
    let result = tokio::time::timeout(Duration::from_secs(10), operator)
        .await
        .unwrap()
        .unwrap();
    assert!(result.is_ok(), "{result:?}");
}
