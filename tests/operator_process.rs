//! The operator process: CRD check, endpoints, leader election and graceful shutdown, against
//! the Kubernetes API for tests.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, PostParams};
use kube_test_api::TestApiServer;
use stripe_key_operator::controller::{RunConfig, RunError, run_with_client};
use stripe_key_operator::leader::{LeaderConfig, LeaderElector};
use tokio_util::sync::CancellationToken;

async fn server(with_crds: bool) -> (TestApiServer, kube::Client) {
    stripe_key_operator::controller::install_crypto_provider();
    let server = TestApiServer::start().await.unwrap();
    let client = kube::Client::try_from(kube::Config::new(server.url().parse().unwrap())).unwrap();
    if with_crds {
        let api: Api<CustomResourceDefinition> = Api::all(client.clone());
        for crd in stripe_key_operator::api::crds() {
            api.create(&PostParams::default(), &crd).await.unwrap();
        }
    }
    let ns: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    ns.create(
        &PostParams::default(),
        &serde_json::from_value(serde_json::json!({"metadata": {"name": "stripe-key-operator"}}))
            .unwrap(),
    )
    .await
    .unwrap();
    (server, client)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The flags of `stripe-key-operator run`, parsed as the binary parses them.
#[derive(clap::Parser)]
struct Wrapper {
    #[command(flatten)]
    config: RunConfig,
}

fn config(port: u16, pod: &str) -> RunConfig {
    use clap::Parser;
    Wrapper::parse_from([
        "run",
        "--http-addr",
        &format!("127.0.0.1:{port}"),
        "--pod-name",
        pod,
        "--store",
        "memory",
        "--audit-log",
        "off",
    ])
    .config
}

#[tokio::test]
async fn a_missing_crd_stops_the_operator_with_a_clear_message() {
    let (_server, client) = server(false).await;
    let err = run_with_client(config(free_port(), "a"), client, CancellationToken::new())
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            RunError::CrdMissing {
                kind: "StripeAccount"
            }
        ),
        "{err}"
    );
    assert!(
        err.to_string().contains("apply crds/stripekeys.io.yaml"),
        "{err}"
    );
}

#[tokio::test]
async fn the_operator_serves_probes_takes_the_lease_and_hands_it_over_on_shutdown() {
    let (_server, client) = server(true).await;
    let port = free_port();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(run_with_client(
        config(port, "replica-a"),
        client.clone(),
        shutdown.clone(),
    ));
    let http = reqwest::Client::new();
    let leases: Api<Lease> = Api::namespaced(client.clone(), "stripe-key-operator");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let holder = leases
            .get_opt("stripe-key-operator-leader")
            .await
            .unwrap()
            .and_then(|l| l.spec.and_then(|s| s.holder_identity));
        if holder.as_deref() == Some("replica-a") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the lease was never taken"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ready = http
        .get(format!("http://127.0.0.1:{port}/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    let metrics = http
        .get(format!("http://127.0.0.1:{port}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("stripe_key_operator_leader 1"),
        "{metrics}"
    );
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(30), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let lease = leases
        .get("stripe-key-operator-leader")
        .await
        .unwrap()
        .spec
        .unwrap();
    assert_eq!(
        lease.holder_identity, None,
        "the lease is handed over at shutdown"
    );
}

fn fast(identity: &str) -> LeaderConfig {
    LeaderConfig {
        lease_duration: Duration::from_secs(2),
        renew_deadline: Duration::from_secs(1),
        retry_period: Duration::from_millis(200),
        ..LeaderConfig::new("stripe-key-operator", "election-test", identity)
    }
}

#[tokio::test]
async fn only_one_of_two_replicas_leads_and_the_other_takes_over_when_it_stops() {
    let (_server, client) = server(false).await;
    let mut a = LeaderElector::new(client.clone(), fast("a"));
    let mut b = LeaderElector::new(client.clone(), fast("b"));
    assert!(
        a.try_acquire_or_renew().await.unwrap(),
        "a takes the free lease"
    );
    assert!(
        !b.try_acquire_or_renew().await.unwrap(),
        "b may not take a held lease"
    );
    assert!(a.try_acquire_or_renew().await.unwrap(), "a renews");
    // a dies without releasing: b takes over only after the lease duration, as b observes it.
    assert!(!b.try_acquire_or_renew().await.unwrap());
    tokio::time::sleep(Duration::from_millis(2300)).await;
    assert!(
        b.try_acquire_or_renew().await.unwrap(),
        "b takes over an expired lease"
    );
    assert!(!a.try_acquire_or_renew().await.unwrap(), "a lost it");
    let lease: Api<Lease> = Api::namespaced(client, "stripe-key-operator");
    let spec = lease.get("election-test").await.unwrap().spec.unwrap();
    assert_eq!(spec.holder_identity.as_deref(), Some("b"));
    assert_eq!(spec.lease_transitions, Some(1));
}

#[tokio::test]
async fn a_released_lease_is_taken_at_once() {
    let (_server, client) = server(false).await;
    let a = LeaderElector::new(client.clone(), fast("a"));
    let leadership = a.acquire(CancellationToken::new()).await.unwrap();
    leadership.release().await;
    let mut b = LeaderElector::new(client.clone(), fast("b"));
    assert!(
        b.try_acquire_or_renew().await.unwrap(),
        "no waiting for a released lease"
    );
}

#[test]
fn reconcile_concurrency_is_bounded_by_default_and_never_zero() {
    use clap::Parser;
    assert_eq!(
        config(8080, "a").max_concurrent_reconciles,
        stripe_key_operator::controller::DEFAULT_CONCURRENCY
    );
    let four = Wrapper::try_parse_from(["run", "--max-concurrent-reconciles", "4"]).unwrap();
    assert_eq!(four.config.max_concurrent_reconciles, 4);
    let zero = Wrapper::try_parse_from(["run", "--max-concurrent-reconciles", "0"])
        .err()
        .expect("0 workers would never reconcile anything");
    assert!(
        zero.to_string().contains("--max-concurrent-reconciles"),
        "{zero}"
    );
}

#[tokio::test]
async fn crds_older_than_the_binary_stop_the_operator_with_what_to_run() {
    let (_server, client) = server(false).await;
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in stripe_key_operator::api::crds() {
        let mut crd = serde_json::to_value(&crd).unwrap();
        if crd["spec"]["names"]["kind"] == "StripeKeyPolicy" {
            // As if installed by an earlier release: no status.rotation yet.
            crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
                ["properties"]
                .as_object_mut()
                .unwrap()
                .remove("rotation")
                .expect("the current schema has status.rotation");
        }
        api.create(
            &PostParams::default(),
            &serde_json::from_value(crd).unwrap(),
        )
        .await
        .unwrap();
    }
    let err = run_with_client(config(free_port(), "a"), client, CancellationToken::new())
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, RunError::CrdSchema(_)), "{text}");
    assert!(
        text.contains("stripekeypolicies.stripekeys.io")
            && text.contains("status.rotation (object)"),
        "{text}"
    );
    assert!(
        text.contains("kubectl apply --server-side -f crds/"),
        "{text}"
    );
}

#[tokio::test]
async fn crds_with_other_descriptions_but_the_same_fields_pass_the_schema_check() {
    let (_server, client) = server(false).await;
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in stripe_key_operator::api::crds() {
        let mut crd = serde_json::to_value(&crd).unwrap();
        crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["description"] =
            "worded differently by another release".into();
        api.create(
            &PostParams::default(),
            &serde_json::from_value(crd).unwrap(),
        )
        .await
        .unwrap();
    }
    stripe_key_operator::controller::crd_check::check_crd_schemas(&client)
        .await
        .expect("only the structure counts");
}

/// `stripe-key-operator rotate` against the Kubernetes API for tests, through a kubeconfig.
async fn rotate_cli(server: &TestApiServer, args: &[&str]) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, server.kubeconfig_yaml()).unwrap();
    tokio::process::Command::new(env!("CARGO_BIN_EXE_stripe-key-operator"))
        .arg("rotate")
        .args(args)
        .env("KUBECONFIG", &kubeconfig)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .output()
        .await
        .expect("the binary runs")
}

#[tokio::test]
async fn rotate_of_a_missing_policy_says_so_in_one_kubectl_like_line() {
    let (server, client) = server(true).await;
    let ns: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    ns.create(
        &PostParams::default(),
        &serde_json::from_value(serde_json::json!({"metadata": {"name": "shop"}})).unwrap(),
    )
    .await
    .unwrap();
    let out = rotate_cli(&server, &["stripekeypolicy/nope", "-n", "shop"]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(
        stderr.trim_end(),
        "error: stripekeypolicy \"nope\" not found in namespace \"shop\"",
        "one line, no debug form of the Status"
    );

    // Without the CRDs: what to install, still one line.
    let (bare, _) = server_without_namespace().await;
    let out = rotate_cli(&bare, &["skp/nope", "-n", "shop"]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("install the CRDs first"), "{stderr}");
    assert!(!stderr.contains("Status {"), "{stderr}");
}

async fn server_without_namespace() -> (TestApiServer, kube::Client) {
    let server = TestApiServer::start().await.unwrap();
    let client = kube::Client::try_from(kube::Config::new(server.url().parse().unwrap())).unwrap();
    (server, client)
}
