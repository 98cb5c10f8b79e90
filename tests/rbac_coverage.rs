//! RBAC that is exactly enough, proved in both directions for each RBAC mode of the chart.
//!
//! The operator runs as it runs in a pod (`run_with_client`: CRD check, admission webhook with
//! its self-signed certificate, leader election, the controllers, the chosen store), configured
//! from the environment of the chart's rendered Deployment, against the Kubernetes API for tests
//! and the Stripe simulator. Its client sends a bearer token of its own, so the API server's
//! request log tells its requests from the test's. The scenario: admission reviews, a key
//! policy and a webhook endpoint created, incident-rotated and deleted with workloads of every
//! kind to roll (by name and by selector), several rollouts of one object (a repeated Event,
//! which kube-runtime's recorder patches), an account deleted while a policy holds its key
//! (finalizer, status, a repeated Event in `default`), a restart that takes over the released Lease and renews a damaged webhook certificate.
//!
//! Then, against the chart rendered with the same values (by the pinned helm-python-sdk of
//! `.ci/install-tools.sh`):
//! - every request (and every check the apiserver adds: create on an apply that creates,
//!   `finalizers` of an owner for `blockOwnerDeletion`) is allowed by the Roles and ClusterRoles
//!   bound to the operator's ServiceAccount, in the namespace it was made in;
//! - every grant (each verb of each resource of each rule, in each Role) is used by some request.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use http::{HeaderValue, header};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube_test_api::{RecordedRequest, ServerConfig, TestApiServer};
use serde_json::{Value, json};
use stripe_key_operator::api::{StripeAccount, StripeKeyPolicy, StripeWebhookEndpoint, conditions};
use stripe_key_operator::controller::{RunConfig, run_with_client};
use stripe_key_operator::sim::{SimConfig, SimHandle, Simulator};
use stripe_key_operator::stripe::Mode;
use tokio_util::sync::CancellationToken;

const RELEASE: &str = "sko";
const NAMESPACE: &str = "stripe-key-operator";
const TENANT: &str = "shop";
const ACCOUNT: &str = "payments-test";
const APP_KEY_SECRET: &str = "stripe-app-payments-test";
const WAIT: Duration = Duration::from_secs(120);

// ---------------------------------------------------------------------------------------------
// The chart
// ---------------------------------------------------------------------------------------------

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The Python of `.ci/install-tools.sh` (with helm-python-sdk), or `$CHART_PYTHON`.
fn chart_python() -> PathBuf {
    if let Some(p) = std::env::var_os("CHART_PYTHON") {
        return PathBuf::from(p);
    }
    let venv = repo().join(".ci/cache/venv/bin/python");
    assert!(
        venv.exists(),
        "{} is missing: install the chart tools with `make tools` (.ci/install-tools.sh), \
         or point CHART_PYTHON at a Python with helm-python-sdk and PyYAML",
        venv.display()
    );
    venv
}

const RENDER: &str = r#"
import json, sys
import helm_python as helm
import yaml
chart, values, release, namespace = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], sys.argv[4]
with helm.Chart.load(chart) as c:
    out = c.render(values, name=release, namespace=namespace, is_install=True)
docs = [d for path, text in sorted(out.items()) if not path.endswith("NOTES.txt")
        for d in yaml.safe_load_all(text) if d]
json.dump(docs, sys.stdout)
"#;

/// The chart's objects rendered with `values`, as Helm renders them for release `sko` in the
/// operator's namespace.
fn render_chart(values: &Value) -> Vec<Value> {
    let out = std::process::Command::new(chart_python())
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .arg("-c")
        .arg(RENDER)
        .arg(repo().join("charts/stripe-key-operator"))
        .arg(values.to_string())
        .arg(RELEASE)
        .arg(NAMESPACE)
        .output()
        .expect("running the chart Python");
    assert!(
        out.status.success(),
        "rendering the chart failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("the render is JSON")
}

fn objects<'a>(objs: &'a [Value], kind: &str) -> impl Iterator<Item = &'a Value> {
    objs.iter().filter(move |o| o["kind"] == kind)
}

fn one<'a>(objs: &'a [Value], kind: &str) -> &'a Value {
    let found: Vec<_> = objects(objs, kind).collect();
    assert_eq!(found.len(), 1, "expected one {kind}");
    found[0]
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// One verb on one resource granted by one rule of a role, where it applies.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Grant {
    /// `ClusterRole/name` or `Role/namespace/name`.
    role: String,
    /// Where it applies: `None` everywhere (a ClusterRoleBinding), else that namespace.
    scope: Option<String>,
    group: String,
    resource: String,
    verb: String,
    names: Vec<String>,
}

impl Grant {
    fn allows(&self, r: &RecordedRequest) -> bool {
        self.scope.as_ref().is_none_or(|ns| *ns == r.namespace)
            && self.group == r.group
            && self.resource == r.resource_path()
            && self.verb == r.verb
            && (self.names.is_empty() || self.names.contains(&r.name))
    }
}

impl std::fmt::Display for Grant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} in {}: {} {}/{}",
            self.role,
            self.scope.as_deref().unwrap_or("every namespace"),
            self.verb,
            if self.group.is_empty() {
                "core"
            } else {
                &self.group
            },
            self.resource
        )?;
        if !self.names.is_empty() {
            write!(f, " named {:?}", self.names)?;
        }
        Ok(())
    }
}

/// Every grant of the roles bound to the operator's ServiceAccount, expanded to one per
/// (group, resource, verb).
fn grants(objs: &[Value]) -> Vec<Grant> {
    let sa = one(objs, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"]
        .as_str()
        .expect("the Deployment names its ServiceAccount")
        .to_string();
    let mut out = Vec::new();
    for binding in objects(objs, "ClusterRoleBinding").chain(objects(objs, "RoleBinding")) {
        let ours = binding["subjects"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|s| {
                s["kind"] == "ServiceAccount"
                    && s["name"] == sa.as_str()
                    && s["namespace"] == NAMESPACE
            });
        if !ours {
            continue;
        }
        let binding_ns = binding["metadata"]["namespace"].as_str();
        let role_kind = binding["roleRef"]["kind"].as_str().unwrap();
        let role_name = binding["roleRef"]["name"].as_str().unwrap();
        let role = objects(objs, role_kind)
            .find(|r| {
                r["metadata"]["name"] == role_name
                    && (role_kind == "ClusterRole"
                        || r["metadata"]["namespace"].as_str() == binding_ns)
            })
            .unwrap_or_else(|| panic!("{role_kind} {role_name} is bound but not rendered"));
        let label = match binding_ns {
            Some(ns) if role_kind == "Role" => format!("Role/{ns}/{role_name}"),
            _ => format!("{role_kind}/{role_name}"),
        };
        let scope = match binding["kind"].as_str() {
            Some("ClusterRoleBinding") => None,
            _ => Some(
                binding_ns
                    .expect("a RoleBinding has a namespace")
                    .to_string(),
            ),
        };
        for rule in role["rules"].as_array().into_iter().flatten() {
            assert!(
                rule.get("nonResourceURLs").is_none(),
                "{label}: the operator requests no non-resource URL"
            );
            for group in strings(&rule["apiGroups"]) {
                for resource in strings(&rule["resources"]) {
                    for verb in strings(&rule["verbs"]) {
                        out.push(Grant {
                            role: label.clone(),
                            scope: scope.clone(),
                            group: group.clone(),
                            resource: resource.clone(),
                            verb,
                            names: strings(&rule["resourceNames"]),
                        });
                    }
                }
            }
        }
    }
    assert!(!out.is_empty(), "no role is bound to {sa}");
    out
}

/// The value of the environment variable `name` of the operator container (`None`: not set or
/// set from a field).
fn env_value(objs: &[Value], name: &str) -> Option<String> {
    one(objs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()?
        .iter()
        .find(|e| e["name"] == name)?
        .get("value")?
        .as_str()
        .map(String::from)
}

/// The flags of `stripe-key-operator run`, parsed as the binary parses them.
#[derive(clap::Parser)]
struct Wrapper {
    #[command(flatten)]
    config: RunConfig,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The operator's flags from the chart's Deployment (addresses on loopback instead).
fn run_config(objs: &[Value], pod: &str) -> (RunConfig, u16) {
    use clap::Parser;
    let webhook_port = free_port();
    let mut args: Vec<String> = vec![
        "run".into(),
        "--namespace".into(),
        NAMESPACE.into(),
        "--pod-name".into(),
        pod.into(),
        "--http-addr".into(),
        format!("127.0.0.1:{}", free_port()),
        "--webhook-addr".into(),
        format!("127.0.0.1:{webhook_port}"),
        "--audit-log".into(),
        "off".into(),
        // The Stripe simulator listens on loopback; production allows only Stripe's host.
        "--allow-loopback-api".into(),
        "true".into(),
    ];
    let store = env_value(objs, "STORE").expect("STORE");
    // Vault keeps bundles outside Kubernetes: for the Kubernetes API the operator behaves as with
    // the in-memory store, which needs no Vault server here.
    let store = if store == "vault" {
        "memory".into()
    } else {
        store
    };
    args.extend(["--store".into(), store]);
    for (var, flag) in [
        ("WATCH_NAMESPACES", "--watch-namespaces"),
        ("LEADER_ELECT", "--leader-elect"),
        ("LEASE_NAME", "--lease-name"),
        ("WEBHOOK_CERT_MODE", "--webhook-cert-mode"),
        ("WEBHOOK_SERVICE", "--webhook-service"),
        ("WEBHOOK_CONFIG_NAME", "--webhook-config-name"),
    ] {
        if let Some(v) = env_value(objs, var) {
            args.extend([flag.into(), v]);
        }
    }
    (Wrapper::parse_from(args).config, webhook_port)
}

// ---------------------------------------------------------------------------------------------
// The cluster
// ---------------------------------------------------------------------------------------------

struct Cluster {
    server: TestApiServer,
    /// The test's own client (no token).
    admin: kube::Client,
    /// The operator's client: authenticates as its ServiceAccount.
    operator: kube::Client,
    sim: SimHandle,
    user: String,
}

fn workload(kind: &str, name: &str) -> Value {
    let template = json!({"metadata": {"labels": {"app": name}},
        "spec": {"containers": [{"name": "app", "image": "example/app:1"}]}});
    let mut spec = json!({"selector": {"matchLabels": {"app": name}}, "template": template});
    if kind != "DaemonSet" {
        spec["replicas"] = json!(1);
    }
    if kind == "StatefulSet" {
        spec["serviceName"] = json!(name);
    }
    json!({"apiVersion": "apps/v1", "kind": kind,
        "metadata": {"name": name, "namespace": TENANT, "labels": {"app": name}}, "spec": spec})
}

async fn apply(client: &kube::Client, obj: &Value) {
    let gvk = GroupVersionKind::try_from(&kube::core::TypeMeta {
        api_version: obj["apiVersion"].as_str().unwrap().into(),
        kind: obj["kind"].as_str().unwrap().into(),
    })
    .unwrap();
    let (ar, caps) = kube::discovery::pinned_kind(client, &gvk).await.unwrap();
    let api: Api<DynamicObject> = match caps.scope {
        kube::discovery::Scope::Namespaced => Api::namespaced_with(
            client.clone(),
            obj["metadata"]["namespace"].as_str().unwrap(),
            &ar,
        ),
        kube::discovery::Scope::Cluster => Api::all_with(client.clone(), &ar),
    };
    api.patch(
        obj["metadata"]["name"].as_str().unwrap(),
        &PatchParams::apply("rbac-coverage-test").force(),
        &Patch::Apply(obj),
    )
    .await
    .unwrap_or_else(|e| panic!("applying {}: {e}", obj["kind"]));
}

impl Cluster {
    async fn start(objs: &[Value]) -> Self {
        stripe_key_operator::controller::install_crypto_provider();
        let server = TestApiServer::start_with(ServerConfig {
            rollout_delay: Duration::from_millis(100),
            ..Default::default()
        })
        .await
        .unwrap();
        let admin =
            kube::Client::try_from(kube::Config::new(server.url().parse().unwrap())).unwrap();
        let sa = one(objs, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"]
            .as_str()
            .unwrap()
            .to_string();
        let user = format!("system:serviceaccount:{NAMESPACE}:{sa}");
        let mut config = kube::Config::new(server.url().parse().unwrap());
        config.headers.push((
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {user}")).unwrap(),
        ));
        let operator = kube::Client::try_from(config).unwrap();

        let crds: Api<CustomResourceDefinition> = Api::all(admin.clone());
        for crd in stripe_key_operator::api::crds() {
            crds.create(&PostParams::default(), &crd).await.unwrap();
        }
        let sim =
            Simulator::start(SimConfig::new().with_account("acct_1RbacCoverage0001", Mode::Test))
                .await
                .unwrap();
        let cluster = Self {
            server,
            admin,
            operator,
            sim,
            user,
        };
        let a = &cluster.admin;
        apply(
            a,
            &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}),
        )
        .await;
        apply(
            a,
            &json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": TENANT, "labels": {"stripekeys.io/account": ACCOUNT}}}),
        )
        .await;
        apply(
            a,
            &json!({"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": APP_KEY_SECRET, "namespace": NAMESPACE,
                         "labels": {"stripekeys.io/credential": "stripe-app"}},
            "stringData": {"secret_key": cluster.sim.app_key().expose()}}),
        )
        .await;
        apply(
            a,
            &json!({
                "apiVersion": "stripekeys.io/v1alpha1", "kind": "StripeAccount",
                "metadata": {"name": ACCOUNT},
                "spec": {
                    "mode": "test",
                    "context": cluster.sim.accounts()[0].id,
                    "apiBase": cluster.sim.base_url(),
                    "credentials": {"secretRef": {"name": APP_KEY_SECRET, "key": "secret_key"}},
                    "namespaceSelector": {"matchLabels": {"stripekeys.io/account": ACCOUNT}},
                }
            }),
        )
        .await;
        for (kind, name) in [
            ("Deployment", "checkout"),
            ("StatefulSet", "ledger"),
            ("DaemonSet", "agent"),
            ("Deployment", "orders"),
            ("StatefulSet", "archive"),
            ("DaemonSet", "relay"),
        ] {
            apply(a, &workload(kind, name)).await;
        }
        // The chart's own ValidatingWebhookConfiguration (Helm installs it), without caBundle.
        for vwc in objects(objs, "ValidatingWebhookConfiguration") {
            apply(a, vwc).await;
        }
        cluster
    }

    /// The operator's distinct requests so far.
    fn requests(&self) -> BTreeSet<RecordedRequest> {
        self.server
            .recorded_requests()
            .into_keys()
            .filter(|r| r.user == self.user)
            .collect()
    }
}

async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

struct Running {
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), stripe_key_operator::controller::RunError>>,
}

impl Running {
    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(40), self.task)
            .await
            .expect("the operator stops")
            .expect("the operator task did not panic")
            .expect("the operator ran without error");
    }
}

fn start_operator(cluster: &Cluster, config: RunConfig) -> Running {
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(run_with_client(
        config,
        cluster.operator.clone(),
        shutdown.clone(),
    ));
    Running { shutdown, task }
}

async fn lease_holder(cluster: &Cluster, lease: &str) -> Option<String> {
    Api::<Lease>::namespaced(cluster.admin.clone(), NAMESPACE)
        .get_opt(lease)
        .await
        .ok()
        .flatten()
        .and_then(|l| l.spec?.holder_identity)
}

/// Sends a CREATE review of a StripeKeyPolicy to the operator's webhook; returns `allowed`.
async fn admission_review(port: u16, service: &str) -> bool {
    let http = reqwest::Client::builder()
        .resolve(
            &format!("{service}.{NAMESPACE}.svc"),
            std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        )
        .tls_danger_accept_invalid_certs(true)
        .build()
        .unwrap();
    let object = policy("reviewed", &[]);
    let review = json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": "rbac-coverage-1",
            "kind": {"group": "stripekeys.io", "version": "v1alpha1", "kind": "StripeKeyPolicy"},
            "resource": {"group": "stripekeys.io", "version": "v1alpha1", "resource": "stripekeypolicies"},
            "name": "reviewed", "namespace": TENANT, "operation": "CREATE",
            "userInfo": {"username": "alice"}, "object": object, "dryRun": false
        }
    });
    let out: Value = http
        .post(format!(
            "https://{service}.{NAMESPACE}.svc:{port}/validate/stripekeys"
        ))
        .json(&review)
        .send()
        .await
        .expect("the webhook answers")
        .json()
        .await
        .unwrap();
    out["response"]["allowed"].as_bool().unwrap_or(false)
}

fn target(kind: &str, name: Option<&str>) -> Value {
    match name {
        Some(n) => json!({"kind": kind, "name": n}),
        None => json!({"kind": kind, "selector": {"matchLabels": {"app": selector_app(kind)}}}),
    }
}

fn selector_app(kind: &str) -> &'static str {
    match kind {
        "Deployment" => "orders",
        "StatefulSet" => "archive",
        _ => "relay",
    }
}

fn policy(name: &str, targets: &[Value]) -> Value {
    json!({
        "apiVersion": "stripekeys.io/v1alpha1", "kind": "StripeKeyPolicy",
        "metadata": {"name": name, "namespace": TENANT},
        "spec": {
            "accountRef": {"name": ACCOUNT},
            "permissions": ["charge_read"],
            "delivery": {"secret": {"name": format!("{name}-stripe-key")},
                         "rolloutTargets": targets},
            "rotation": {"every": "720h", "overlap": "1h"}
        }
    })
}

fn endpoint(name: &str, targets: &[Value]) -> Value {
    json!({
        "apiVersion": "stripekeys.io/v1alpha1", "kind": "StripeWebhookEndpoint",
        "metadata": {"name": name, "namespace": TENANT},
        "spec": {
            "accountRef": {"name": ACCOUNT},
            "url": "https://hooks.example.com/stripe",
            "enabledEvents": ["charge.succeeded"],
            "delivery": {"secret": {"name": format!("{name}-webhook")},
                         "rolloutTargets": targets},
            "rotation": {"every": "720h", "overlap": "1h"}
        }
    })
}

/// Ready, with no rotation running: the current key id.
fn settled_key(
    status: Option<(
        &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
        bool,
        Option<String>,
    )>,
) -> Option<String> {
    let (conds, rotating, key) = status?;
    (conditions::is_true(conds, "Ready") && !rotating)
        .then_some(key)
        .flatten()
}

async fn policy_key(cluster: &Cluster, name: &str) -> Option<String> {
    let p = Api::<StripeKeyPolicy>::namespaced(cluster.admin.clone(), TENANT)
        .get_opt(name)
        .await
        .ok()??;
    let s = p.status?;
    settled_key(Some((
        &s.conditions,
        s.rotation.is_some(),
        s.current_key.clone().map(|k| k.id),
    )))
}

async fn endpoint_key(cluster: &Cluster, name: &str) -> Option<String> {
    let e = Api::<StripeWebhookEndpoint>::namespaced(cluster.admin.clone(), TENANT)
        .get_opt(name)
        .await
        .ok()??;
    let s = e.status?;
    settled_key(Some((
        &s.conditions,
        s.rotation.is_some(),
        s.current_key.clone().map(|k| k.id),
    )))
}

async fn incident_rotate(cluster: &Cluster, ar: &ApiResource, name: &str) {
    Api::<DynamicObject>::namespaced_with(cluster.admin.clone(), TENANT, ar)
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {
                "stripekeys.io/rotate": "rbac-coverage-1",
                "stripekeys.io/rotate-reason": "incident"}}})),
        )
        .await
        .unwrap();
}

async fn delete_and_wait(cluster: &Cluster, ar: &ApiResource, name: &str) {
    let api = Api::<DynamicObject>::namespaced_with(cluster.admin.clone(), TENANT, ar);
    api.delete(name, &DeleteParams::default()).await.unwrap();
    eventually(&format!("{} {name} to be deleted", ar.kind), || async {
        api.get_opt(name).await.unwrap().is_none().then_some(())
    })
    .await;
}

fn resource_of(kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("stripekeys.io", "v1alpha1", kind),
        plural,
    )
}

/// Runs the scenario with the chart's configuration; returns the operator's requests.
async fn scenario(objs: &[Value]) -> BTreeSet<RecordedRequest> {
    let cluster = Cluster::start(objs).await;
    let (config, webhook_port) = run_config(objs, "replica-a");
    let lease = config.lease_name.clone();
    let self_signed = env_value(objs, "WEBHOOK_CERT_MODE").as_deref() == Some("self-signed");
    let service = config.webhook_service.clone();
    let operator = start_operator(&cluster, config);
    eventually("replica-a to lead", || async {
        (lease_holder(&cluster, &lease).await.as_deref() == Some("replica-a")).then_some(())
    })
    .await;

    if self_signed {
        let vwc_name = env_value(objs, "WEBHOOK_CONFIG_NAME").unwrap();
        let vwcs: Api<DynamicObject> = Api::all_with(
            cluster.admin.clone(),
            &ApiResource::from_gvk_with_plural(
                &GroupVersionKind::gvk(
                    "admissionregistration.k8s.io",
                    "v1",
                    "ValidatingWebhookConfiguration",
                ),
                "validatingwebhookconfigurations",
            ),
        );
        eventually("the CA bundle to be injected", || async {
            let vwc = vwcs.get(&vwc_name).await.unwrap();
            vwc.data["webhooks"][0]["clientConfig"]["caBundle"]
                .as_str()
                .map(|_| ())
        })
        .await;
        assert!(
            admission_review(webhook_port, &service).await,
            "the policy is admitted"
        );
    }

    // A key policy: created (rolling workloads named and selected), incident-rotated, deleted.
    let policies = resource_of("StripeKeyPolicy", "stripekeypolicies");
    let targets = [
        target("Deployment", Some("checkout")),
        target("StatefulSet", Some("ledger")),
        target("DaemonSet", None),
    ];
    apply(&cluster.admin, &policy("checkout", &targets)).await;
    let first = eventually("the policy to be ready", || {
        policy_key(&cluster, "checkout")
    })
    .await;
    incident_rotate(&cluster, &policies, "checkout").await;
    eventually("the policy to rotate", || async {
        policy_key(&cluster, "checkout")
            .await
            .filter(|k| *k != first)
    })
    .await;
    delete_and_wait(&cluster, &policies, "checkout").await;

    // A webhook endpoint: the same, with the other targeting of each workload kind.
    let endpoints = resource_of("StripeWebhookEndpoint", "stripewebhookendpoints");
    let targets = [
        target("Deployment", None),
        target("StatefulSet", None),
        target("DaemonSet", Some("agent")),
    ];
    apply(&cluster.admin, &endpoint("orders", &targets)).await;
    let first = eventually("the endpoint to be ready", || {
        endpoint_key(&cluster, "orders")
    })
    .await;
    incident_rotate(&cluster, &endpoints, "orders").await;
    eventually("the endpoint to rotate", || async {
        endpoint_key(&cluster, "orders")
            .await
            .filter(|k| *k != first)
    })
    .await;
    delete_and_wait(&cluster, &endpoints, "orders").await;

    // The account is deleted while a policy holds a key: the account controller keeps it
    // (finalizer), says why in its status and in a repeated Warning Event (cluster-scoped objects'
    // Events live in `default`), and lets it go once the policy retired its key.
    apply(
        &cluster.admin,
        &policy("last", &[target("Deployment", Some("checkout"))]),
    )
    .await;
    eventually("the last policy to be ready", || {
        policy_key(&cluster, "last")
    })
    .await;
    let accounts: Api<StripeAccount> = Api::all(cluster.admin.clone());
    accounts
        .delete(ACCOUNT, &DeleteParams::default())
        .await
        .unwrap();
    let events: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(cluster.admin.clone(), "default");
    eventually("a repeated DeletionBlocked Event", || async {
        events
            .list(&Default::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .any(|e| e.reason.as_deref() == Some("DeletionBlocked") && e.series.is_some())
            .then_some(())
    })
    .await;
    delete_and_wait(&cluster, &policies, "last").await;
    eventually("the account to be deleted", || async {
        accounts
            .get_opt(ACCOUNT)
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;

    operator.stop().await;

    if self_signed {
        // A restart: the new replica takes the released Lease and renews a damaged
        // certificate (the test damages it through the server's handle, which records nothing).
        let tls_name = format!("{service}-tls");
        let mut tls = cluster
            .server
            .get("v1", "Secret", Some(NAMESPACE), &tls_name)
            .expect("the operator created its TLS Secret");
        tls["data"] = json!({"tls.crt": "", "tls.key": ""});
        cluster.server.put(tls).unwrap();
        let (config, _) = run_config(objs, "replica-b");
        let operator = start_operator(&cluster, config);
        eventually("replica-b to lead", || async {
            (lease_holder(&cluster, &lease).await.as_deref() == Some("replica-b")).then_some(())
        })
        .await;
        eventually("the TLS Secret to be renewed", || async {
            let s = Api::<Secret>::namespaced(cluster.admin.clone(), NAMESPACE)
                .get(&tls_name)
                .await
                .unwrap();
            s.data
                .and_then(|d| d.get("tls.crt").cloned())
                .filter(|c| !c.0.is_empty())
                .map(|_| ())
        })
        .await;
        operator.stop().await;
    }
    let requests = cluster.requests();
    cluster.sim.shutdown().await;
    requests
}

fn describe(r: &RecordedRequest) -> String {
    format!(
        "{} {}/{}{}{}{}",
        r.verb,
        if r.group.is_empty() { "core" } else { &r.group },
        r.resource_path(),
        if r.namespace.is_empty() {
            " (cluster-wide)".to_string()
        } else {
            format!(" in {}", r.namespace)
        },
        if r.name.is_empty() {
            String::new()
        } else {
            format!(" named {}", r.name)
        },
        r.implied_by
            .as_ref()
            .map(|w| format!(" [{w}]"))
            .unwrap_or_default()
    )
}

/// Runs the scenario for `values` and checks the chart's RBAC against it, both ways.
async fn rbac_is_exactly_what_the_operator_uses(mut values: Value) {
    // The site facts the chart needs for its NetworkPolicy (not part of RBAC).
    values["networkPolicy"] = json!({"egress": {
        "kubernetesApi": {"cidrs": ["10.96.0.1/32"]},
        "stripe": {"anyPublicAddress": true},
    }});
    let objs = render_chart(&values);
    let grants = grants(&objs);
    let requests = scenario(&objs).await;
    assert!(
        requests.len() > 20,
        "the operator's requests were not recorded: {requests:?}"
    );
    let denied: Vec<String> = requests
        .iter()
        .filter(|r| !grants.iter().any(|g| g.allows(r)))
        .map(describe)
        .collect();
    let unused: Vec<String> = grants
        .iter()
        .filter(|g| !requests.iter().any(|r| g.allows(r)))
        .map(ToString::to_string)
        .collect();
    let all: Vec<String> = requests.iter().map(describe).collect();
    assert!(
        denied.is_empty() && unused.is_empty(),
        "values {values}\n\nrequests no rule allows:\n  {}\n\ngrants no request uses:\n  {}\n\nevery request:\n  {}",
        denied.join("\n  "),
        unused.join("\n  "),
        all.join("\n  ")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_mode_with_kubernetes_store_and_self_signed_webhook_grants_exactly_what_is_used() {
    rbac_is_exactly_what_the_operator_uses(json!({
        "store": "kubernetes",
        "webhook": {"enabled": true},
    }))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespaced_mode_with_kubernetes_store_and_self_signed_webhook_grants_exactly_what_is_used()
{
    rbac_is_exactly_what_the_operator_uses(json!({
        "rbac": {"namespaced": true},
        "watchNamespaces": [TENANT],
        "store": "kubernetes",
        "webhook": {"enabled": true},
    }))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_mode_with_vault_and_no_webhook_grants_exactly_what_is_used() {
    rbac_is_exactly_what_the_operator_uses(json!({})).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespaced_mode_with_vault_and_no_webhook_grants_exactly_what_is_used() {
    rbac_is_exactly_what_the_operator_uses(json!({
        "rbac": {"namespaced": true},
        "watchNamespaces": [TENANT],
    }))
    .await;
}
