//! End-to-end scenarios against a real cluster (Kubernetes 1.26+), the same ones the CI tests run
//! against the in-process Kubernetes API. Ignored by default; run them with
//!
//! ```text
//! KUBECONFIG=~/.kube/config cargo test --test e2e_cluster -- --ignored
//! ```
//!
//! Each test installs the CRDs (server-side apply, they stay), creates a uniquely named tenant
//! namespace (labelled so the test's StripeAccount serves it), a uniquely named operator
//! namespace holding the simulator's app key, a cluster-scoped StripeAccount pointing at a
//! Stripe simulator started in this process on 127.0.0.1, a `checkout` Deployment
//! (`registry.k8s.io/pause:3.10`) as rollout target, and runs the real controllers in this
//! process (scoped to the test's namespaces, so tests run in parallel without seeing one
//! another's objects). Everything a test created is deleted at the end, also when it fails.
//!
//! StripeAccounts are cluster-scoped and every test's in-process operator runs the account
//! controller, which reconciles every account of the cluster judging only its own namespaces:
//! a test whose assertions depend on an account's status or deletion (held by its policies, its
//! activity-log cursor, the `kubectl get` columns) runs alone (`Cluster::start_exclusive_with`);
//! the others run in parallel.
//!
//! Assumptions about the cluster: nodes can pull `registry.k8s.io/pause:3.10`; no other
//! stripe-key-operator (or its admission webhook) is installed; the kubeconfig user may manage
//! CRDs, namespaces, Secrets, Deployments, Events and the stripekeys.io kinds. The simulator
//! listens on the test runner's loopback: only the in-process controllers reach it, the cluster
//! never does.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};
use stripe_key_operator::api::{
    RotationPhase, RotationTrigger, StripeAccount, StripeGuardrail, StripeKeyPolicy,
    StripeWebhookEndpoint, WorkloadKind, conditions,
};
use stripe_key_operator::controller::clock::ManualClock;
use stripe_key_operator::controller::{
    Context, ControllerConfig, CrashHook, install_crypto_provider, run_controllers,
};
use stripe_key_operator::inject::{Rollout, rollout_state};
use stripe_key_operator::metrics::Metrics;
use stripe_key_operator::secret::SecretString;
use stripe_key_operator::sim::{
    EndpointState, FaultKind, FaultSpec, KeyState, SimConfig, SimHandle, Simulator,
};
use stripe_key_operator::stripe::{Mode, StripeClient, UpdateWebhookEndpointParams};
use stripe_key_operator::vault::{MemoryStore, SecretStore, StorePath, StorePrefix};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Field manager of everything the tests apply.
const MANAGER: &str = "stripe-key-operator-e2e";
/// Bound of every wait (real clusters pull images and schedule pods).
const WAIT: Duration = Duration::from_secs(180);
const POLL: Duration = Duration::from_millis(250);
const STORE_PREFIX: &str = "stripe-key-operator";
const APP_KEY_SECRET: &str = "stripe-app-e2e";
const DEPLOYMENT: &str = "checkout";
const ACCOUNT_LABEL: &str = "stripekeys.io/account";
const TEST_LABEL: &str = "stripekeys.io/e2e-test";
const WEBHOOK_URL: &str = "https://hooks.example.com/stripe-e2e";

fn rand_lower(n: usize) -> String {
    use rand::Rng;
    let mut rng = rand::rng();
    (0..n)
        .map(|_| {
            let i = rng.random_range(0..36u8);
            char::from(if i < 10 { b'0' + i } else { b'a' + i - 10 })
        })
        .collect()
}

fn rand_alnum(n: usize) -> String {
    use rand::Rng;
    let mut rng = rand::rng();
    (0..n)
        .map(|_| char::from(b'A' + rng.random_range(0..26u8)))
        .collect()
}

/// Polls `probe` until it yields a value; panics after [`WAIT`] with the last observation.
async fn wait_for<T, F, Fut>(what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + WAIT;
    loop {
        match probe().await {
            Ok(v) => return v,
            Err(last) => {
                assert!(
                    Instant::now() < deadline,
                    "timed out after {}s waiting for {what}; last seen: {last}",
                    WAIT.as_secs()
                );
            }
        }
        tokio::time::sleep(POLL).await;
    }
}

fn apply_params() -> PatchParams {
    PatchParams::apply(MANAGER).force()
}

/// Installs (server-side apply) every CRD and waits until each is `Established=True`.
async fn install_crds(client: &Client) {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in stripe_key_operator::api::crds() {
        let name = crd.name_any();
        api.patch(&name, &apply_params(), &Patch::Apply(&crd))
            .await
            .unwrap_or_else(|e| panic!("applying CRD {name}: {e}"));
    }
    for crd in stripe_key_operator::api::crds() {
        let name = crd.name_any();
        let api = api.clone();
        wait_for(&format!("CRD {name} Established"), || {
            let (api, name) = (api.clone(), name.clone());
            async move {
                let crd = api.get(&name).await.map_err(|e| e.to_string())?;
                let established = crd
                    .status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|cs| {
                        cs.iter()
                            .any(|c| c.type_ == "Established" && c.status == "True")
                    });
                if established {
                    Ok(())
                } else {
                    Err(format!("{:?}", crd.status))
                }
            }
        })
        .await;
    }
}

/// What the guard deletes when the test ends (CRDs stay).
#[derive(Clone, Default)]
struct Created {
    namespaces: Vec<String>,
    accounts: Vec<String>,
    guardrails: Vec<String>,
}

/// One test's installation on the cluster: namespaces, account, Deployment, simulator, store and
/// the running controllers. Dropping it deletes everything it created.
struct Cluster {
    client: Client,
    sim: SimHandle,
    store: Arc<MemoryStore>,
    clock: ManualClock,
    crash: Arc<CrashHook>,
    /// The simulator account id (`acct_...`).
    account_id: String,
    /// The StripeAccount's name.
    account: String,
    /// The tenant namespace (served by the account).
    ns: String,
    operator_ns: String,
    /// Namespaces the controllers watch.
    watched: Vec<String>,
    suffix: String,
    created: Created,
    operator: Option<(CancellationToken, JoinHandle<()>)>,
    /// Settings a scenario changes on top of the harness's [`ControllerConfig`] (short check
    /// intervals and the like), applied at every [`Cluster::start_operator`].
    tune: Tune,
    /// Held until the test's cleanup is done (the last field: dropped after [`Drop::drop`]).
    _turn: Turn,
}

/// Whether a test runs alongside others or alone (see the module documentation).
static TURNS: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

#[allow(dead_code)] // held for its drop only
enum Turn {
    Shared(tokio::sync::RwLockReadGuard<'static, ()>),
    Alone(tokio::sync::RwLockWriteGuard<'static, ()>),
}

/// Changes a scenario makes to the controllers' settings.
type Tune = fn(&mut ControllerConfig);

fn no_tuning(_: &mut ControllerConfig) {}

impl Cluster {
    /// Sets up everything and starts the controllers.
    async fn start() -> Self {
        Self::start_with(no_tuning).await
    }

    /// Sets up everything and starts the controllers with `tune` applied to their settings.
    async fn start_with(tune: Tune) -> Self {
        let mut c = Self::start_without_operator().await;
        c.tune = tune;
        c.start_operator();
        c
    }

    /// Sets up everything and starts the controllers with `tune` applied to their settings,
    /// once no other test's operator runs (and none starts until this test is done).
    async fn start_exclusive_with(tune: Tune) -> Self {
        let mut c = Self::setup(Turn::Alone(TURNS.write().await)).await;
        c.tune = tune;
        c.start_operator();
        c
    }

    /// Sets up everything except the controllers.
    async fn start_without_operator() -> Self {
        Self::setup(Turn::Shared(TURNS.read().await)).await
    }

    async fn setup(turn: Turn) -> Self {
        install_crypto_provider();
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "warn".into()),
            )
            .with_test_writer()
            .try_init();
        let client = Client::try_default()
            .await
            .expect("a cluster reachable through KUBECONFIG");
        install_crds(&client).await;

        let suffix = rand_lower(8);
        let ns = format!("sko-e2e-{suffix}");
        let operator_ns = format!("sko-e2e-op-{suffix}");
        let account = format!("sko-e2e-{suffix}");
        let sim = Simulator::start(
            SimConfig::new().with_account(format!("acct_1E2e{}", rand_alnum(10)), Mode::Test),
        )
        .await
        .expect("simulator starts");
        let account_id = sim.accounts()[0].id.clone();
        let mut c = Self {
            client,
            sim,
            store: Arc::new(MemoryStore::default()),
            clock: ManualClock::new(),
            crash: Arc::new(CrashHook::default()),
            account_id,
            account: account.clone(),
            ns: ns.clone(),
            operator_ns: operator_ns.clone(),
            watched: vec![ns.clone()],
            suffix: suffix.clone(),
            created: Created::default(),
            operator: None,
            tune: no_tuning,
            _turn: turn,
        };
        // Registered before creation: the guard cleans up whatever got created.
        c.created.namespaces.push(operator_ns.clone());
        c.created.namespaces.push(ns.clone());
        c.created.accounts.push(account.clone());

        c.apply_namespace(&operator_ns, json!({TEST_LABEL: suffix}))
            .await;
        c.apply_namespace(&ns, json!({TEST_LABEL: suffix, ACCOUNT_LABEL: account}))
            .await;
        let key = c.sim.app_key().expose().to_string();
        Api::<Secret>::namespaced(c.client.clone(), &operator_ns)
            .patch(
                APP_KEY_SECRET,
                &apply_params(),
                &Patch::Apply(json!({
                    "apiVersion": "v1", "kind": "Secret",
                    "metadata": {"name": APP_KEY_SECRET, "namespace": operator_ns,
                                 "labels": {"stripekeys.io/credential": "stripe-app"}},
                    "stringData": {"secret_key": key},
                })),
            )
            .await
            .expect("app-key Secret");
        Api::<StripeAccount>::all(c.client.clone())
            .patch(
                &account,
                &apply_params(),
                &Patch::Apply(json!({
                    "apiVersion": "stripekeys.io/v1alpha1", "kind": "StripeAccount",
                    "metadata": {"name": account, "labels": {TEST_LABEL: suffix}},
                    "spec": {
                        "mode": "test",
                        "context": c.account_id,
                        "apiBase": c.sim.base_url(),
                        "credentials": {"secretRef": {"name": APP_KEY_SECRET, "key": "secret_key"}},
                        "namespaceSelector": {"matchLabels": {ACCOUNT_LABEL: account}},
                    }
                })),
            )
            .await
            .expect("StripeAccount (apiBase http://127.0.0.1 must pass the CEL rule)");
        c.apply_deployment().await;
        c
    }

    async fn apply_namespace(&self, name: &str, labels: Value) {
        Api::<Namespace>::all(self.client.clone())
            .patch(
                name,
                &apply_params(),
                &Patch::Apply(json!({
                    "apiVersion": "v1", "kind": "Namespace",
                    "metadata": {"name": name, "labels": labels}
                })),
            )
            .await
            .unwrap_or_else(|e| panic!("namespace {name}: {e}"));
    }

    /// A second namespace the account does not serve (watched by the controllers too; call
    /// before [`Cluster::start_operator`]).
    async fn add_unserved_namespace(&mut self) -> String {
        let name = format!("sko-e2e-{}-other", self.suffix);
        self.created.namespaces.push(name.clone());
        self.apply_namespace(&name, json!({TEST_LABEL: self.suffix}))
            .await;
        self.watched.push(name.clone());
        name
    }

    /// The rollout target: one small pause pod, compliant with the `restricted` Pod Security
    /// level. Waits until it is available so that image pulls do not count against later steps.
    async fn apply_deployment(&self) {
        let api = self.deployments();
        api.patch(
            DEPLOYMENT,
            &apply_params(),
            &Patch::Apply(json!({
                "apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": DEPLOYMENT, "namespace": self.ns, "labels": {"app": DEPLOYMENT}},
                "spec": {
                    "replicas": 1,
                    "selector": {"matchLabels": {"app": DEPLOYMENT}},
                    "strategy": {"type": "RollingUpdate",
                                 "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
                    "template": {
                        "metadata": {"labels": {"app": DEPLOYMENT}},
                        "spec": {
                            "terminationGracePeriodSeconds": 1,
                            "automountServiceAccountToken": false,
                            "securityContext": {"runAsNonRoot": true, "runAsUser": 65535,
                                                "seccompProfile": {"type": "RuntimeDefault"}},
                            "containers": [{
                                "name": "app",
                                "image": "registry.k8s.io/pause:3.10",
                                "resources": {"requests": {"cpu": "1m", "memory": "8Mi"},
                                              "limits": {"memory": "32Mi"}},
                                "securityContext": {"allowPrivilegeEscalation": false,
                                                    "readOnlyRootFilesystem": true,
                                                    "capabilities": {"drop": ["ALL"]}}
                            }]
                        }
                    }
                }
            })),
        )
        .await
        .expect("Deployment");
        wait_for("the Deployment available", || {
            let api = api.clone();
            async move {
                let d = api.get(DEPLOYMENT).await.map_err(|e| e.to_string())?;
                let s = d.status.clone().unwrap_or_default();
                if s.available_replicas == Some(1) && s.updated_replicas == Some(1) {
                    Ok(())
                } else {
                    Err(format!("{s:?}"))
                }
            }
        })
        .await;
    }

    /// Starts the controllers with a fresh context, as `LocalEnv::start_operator` does.
    fn start_operator(&mut self) {
        let mut config = ControllerConfig::new(
            self.operator_ns.clone(),
            StorePrefix::new(STORE_PREFIX).expect("valid prefix"),
        );
        config.rollout_ceiling = Duration::from_secs(120);
        config.rollout_poll = Duration::from_millis(500);
        config.error_backoff = Duration::from_secs(1);
        config.resync = Duration::from_secs(60);
        config.stripe_timeout = Some(Duration::from_secs(5));
        config.crash_hook = Some(self.crash.clone());
        // The simulator listens on 127.0.0.1: allow loopback, as the sandbox does.
        config.api_hosts = stripe_key_operator::rules::ApiHosts::stripe_only().with_loopback();
        (self.tune)(&mut config);
        let ctx = Arc::new(Context::new(
            self.client.clone(),
            self.store.clone(),
            Metrics::new(),
            Arc::new(self.clock.clone()),
            config,
            None,
        ));
        let stop = CancellationToken::new();
        let namespaces = self.watched.clone();
        let task = tokio::spawn({
            let stop = stop.clone();
            async move { run_controllers(ctx, &namespaces, stop).await }
        });
        self.operator = Some((stop, task));
    }

    /// Kills the controllers. `run_controllers` spawns one task per controller, which an abort
    /// of the outer task alone would leave running; the token stops them too.
    async fn kill_operator(&mut self) {
        if let Some((stop, task)) = self.operator.take() {
            task.abort();
            stop.cancel();
            let _ = task.await;
            // Give the detached controller tasks a moment to wind down.
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    fn deployments(&self) -> Api<Deployment> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    fn policies(&self) -> Api<StripeKeyPolicy> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    fn endpoints(&self) -> Api<StripeWebhookEndpoint> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    async fn apply_policy(&self, manifest: &Value) {
        let ns = manifest["metadata"]["namespace"]
            .as_str()
            .unwrap_or(&self.ns);
        let name = manifest["metadata"]["name"].as_str().unwrap();
        Api::<StripeKeyPolicy>::namespaced(self.client.clone(), ns)
            .patch(name, &apply_params(), &Patch::Apply(manifest))
            .await
            .unwrap_or_else(|e| panic!("applying StripeKeyPolicy {name}: {e}"));
    }

    async fn apply_endpoint(&self, manifest: &Value) {
        let name = manifest["metadata"]["name"].as_str().unwrap();
        self.endpoints()
            .patch(name, &apply_params(), &Patch::Apply(manifest))
            .await
            .unwrap_or_else(|e| panic!("applying StripeWebhookEndpoint {name}: {e}"));
    }

    fn policy(&self, name: &str, permissions: &[&str]) -> Value {
        json!({
            "apiVersion": "stripekeys.io/v1alpha1", "kind": "StripeKeyPolicy",
            "metadata": {"name": name, "namespace": self.ns},
            "spec": {
                "accountRef": {"name": self.account},
                "permissions": permissions,
                "delivery": {"secret": {"name": format!("{name}-stripe-key")},
                             "rolloutTargets": [{"kind": "Deployment", "name": DEPLOYMENT}]},
                "rotation": {"every": "720h", "overlap": "1h"}
            }
        })
    }

    fn endpoint(&self, name: &str) -> Value {
        json!({
            "apiVersion": "stripekeys.io/v1alpha1", "kind": "StripeWebhookEndpoint",
            "metadata": {"name": name, "namespace": self.ns},
            "spec": {
                "accountRef": {"name": self.account},
                "url": WEBHOOK_URL,
                "enabledEvents": ["charge.succeeded", "payment_intent.succeeded"],
                "description": "e2e orders service",
                "delivery": {"secret": {"name": format!("{name}-webhook")},
                             "rolloutTargets": [{"kind": "Deployment", "name": DEPLOYMENT}]},
                "rotation": {"every": "720h", "overlap": "1h"}
            }
        })
    }

    /// Waits until `pred` holds for the policy `name` in `ns`.
    async fn wait_policy_in(
        &self,
        ns: &str,
        name: &str,
        what: &str,
        pred: impl Fn(&StripeKeyPolicy) -> bool,
    ) -> StripeKeyPolicy {
        let api: Api<StripeKeyPolicy> = Api::namespaced(self.client.clone(), ns);
        let pred = &pred;
        wait_for(what, || {
            let api = api.clone();
            async move {
                match api.get_opt(name).await {
                    Ok(Some(p)) if pred(&p) => Ok(p),
                    Ok(Some(p)) => Err(format!("status: {:#?}", p.status)),
                    Ok(None) => Err("the policy is gone".into()),
                    Err(e) => Err(e.to_string()),
                }
            }
        })
        .await
    }

    async fn wait_policy(
        &self,
        name: &str,
        what: &str,
        pred: impl Fn(&StripeKeyPolicy) -> bool,
    ) -> StripeKeyPolicy {
        self.wait_policy_in(&self.ns, name, what, pred).await
    }

    async fn wait_endpoint(
        &self,
        name: &str,
        what: &str,
        pred: impl Fn(&StripeWebhookEndpoint) -> bool,
    ) -> StripeWebhookEndpoint {
        let api = self.endpoints();
        let pred = &pred;
        wait_for(what, || {
            let api = api.clone();
            async move {
                match api.get_opt(name).await {
                    Ok(Some(e)) if pred(&e) => Ok(e),
                    Ok(Some(e)) => Err(format!("status: {:#?}", e.status)),
                    Ok(None) => Err("the endpoint is gone".into()),
                    Err(e) => Err(e.to_string()),
                }
            }
        })
        .await
    }

    /// A merge patch of `metadata` on a policy or an endpoint.
    async fn patch_metadata<K>(&self, api: &Api<K>, name: &str, metadata: Value)
    where
        K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    {
        api.patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({ "metadata": metadata })),
        )
        .await
        .unwrap_or_else(|e| panic!("patching {name}: {e}"));
    }

    /// Annotates a policy (a person's `kubectl annotate`).
    async fn annotate_policy(&self, name: &str, annotations: Value) {
        self.patch_metadata(
            &self.policies(),
            name,
            json!({ "annotations": annotations }),
        )
        .await;
    }

    async fn annotate_endpoint(&self, name: &str, annotations: Value) {
        self.patch_metadata(
            &self.endpoints(),
            name,
            json!({ "annotations": annotations }),
        )
        .await;
    }

    /// Changes an unrelated label so that the controller reconciles now (after the clock moved).
    async fn nudge_policy(&self, name: &str) {
        self.patch_metadata(&self.policies(), name, nudge_labels())
            .await;
    }

    async fn nudge_endpoint(&self, name: &str) {
        self.patch_metadata(&self.endpoints(), name, nudge_labels())
            .await;
    }

    /// Pauses or resumes the Deployment: a paused Deployment does not roll, so the rollout of a
    /// new key stays in progress (the real-cluster stand-in for a stuck workload).
    async fn pause_deployment(&self, paused: bool) {
        self.deployments()
            .patch(
                DEPLOYMENT,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"paused": paused}})),
            )
            .await
            .expect("pausing the Deployment");
    }

    /// Waits until the Deployment's pod template carries `fingerprint` under `annotation` and
    /// every replica runs it (as `kubectl rollout status` judges).
    async fn wait_rolled(&self, annotation: &str, fingerprint: &str) {
        let api = self.deployments();
        wait_for("the Deployment rolled onto the key", || {
            let api = api.clone();
            async move {
                let d = api.get(DEPLOYMENT).await.map_err(|e| e.to_string())?;
                let v = serde_json::to_value(&d).map_err(|e| e.to_string())?;
                match rollout_state(WorkloadKind::Deployment, &v, annotation, fingerprint) {
                    Rollout::Complete => Ok(()),
                    other => Err(format!("{other:?}")),
                }
            }
        })
        .await;
    }

    async fn secret(&self, name: &str) -> Option<Secret> {
        Api::<Secret>::namespaced(self.client.clone(), &self.ns)
            .get_opt(name)
            .await
            .expect("reading a Secret")
    }

    /// The simulator's log without the StripeAccount controllers' health checks (a one-key
    /// listing; every test's controllers check every account of the cluster) and activity-log
    /// reads: what the resources called.
    fn resource_calls(&self) -> Vec<stripe_key_operator::sim::RequestLogEntry> {
        self.sim
            .request_log()
            .into_iter()
            .filter(|r| !(r.method == "GET" && r.path == "/v2/iam/api_keys"))
            .filter(|r| !(r.method == "GET" && r.path.starts_with("/v2/iam/activity_logs")))
            .collect()
    }

    /// Keys of the simulator account.
    fn sim_keys(&self) -> Vec<KeyState> {
        self.sim
            .state()
            .account(&self.account_id)
            .map(|a| a.api_keys.clone())
            .unwrap_or_default()
    }

    fn active_keys(&self) -> Vec<KeyState> {
        self.sim_keys()
            .into_iter()
            .filter(|k| k.status == "active")
            .collect()
    }

    fn key_status(&self, id: &str) -> String {
        self.sim_keys()
            .into_iter()
            .find(|k| k.id == id)
            .map(|k| k.status)
            .unwrap_or_else(|| panic!("key {id} not at the simulator"))
    }

    fn sim_endpoints(&self) -> Vec<EndpointState> {
        self.sim
            .state()
            .account(&self.account_id)
            .map(|a| a.webhook_endpoints.clone())
            .unwrap_or_default()
    }

    fn store_path(&self, kind: &str, name: &str) -> StorePath {
        StorePath::credential(
            &StorePrefix::new(STORE_PREFIX).unwrap(),
            &self.ns,
            kind,
            name,
        )
        .unwrap()
    }

    /// `(type, reason)` of the events.k8s.io/v1 Events about one object of the tenant namespace.
    async fn event_reasons(&self, kind: &str, name: &str) -> Vec<(String, String)> {
        let api: Api<k8s_openapi::api::events::v1::Event> =
            Api::namespaced(self.client.clone(), &self.ns);
        api.list(&ListParams::default())
            .await
            .expect("listing Events")
            .items
            .into_iter()
            .filter(|e| {
                e.regarding.as_ref().is_some_and(|r| {
                    r.name.as_deref() == Some(name) && r.kind.as_deref() == Some(kind)
                })
            })
            .map(|e| (e.type_.unwrap_or_default(), e.reason.unwrap_or_default()))
            .collect()
    }

    /// Waits for an Event `(type, reason)` about an object (Events are written asynchronously).
    async fn wait_event(&self, kind: &str, name: &str, type_: &str, reason: &str) {
        wait_for(
            &format!("{type_} Event {reason} on {kind} {name}"),
            || async {
                let reasons = self.event_reasons(kind, name).await;
                if reasons.iter().any(|(t, r)| t == type_ && r == reason) {
                    Ok(())
                } else {
                    Err(format!("{reasons:?}"))
                }
            },
        )
        .await;
    }

    /// Creates a StripeGuardrail that selects only the tenant namespace (through a label added
    /// to it here).
    async fn apply_guardrail(&mut self, spec: Value) -> String {
        let name = format!("sko-e2e-{}", self.suffix);
        self.created.guardrails.push(name.clone());
        let selector_label = "stripekeys.io/e2e-guardrail";
        self.apply_namespace(
            &self.ns,
            json!({TEST_LABEL: self.suffix, ACCOUNT_LABEL: self.account, selector_label: self.suffix}),
        )
        .await;
        let mut spec = spec;
        spec["namespaceSelector"] = json!({"matchLabels": {selector_label: self.suffix}});
        Api::<StripeGuardrail>::all(self.client.clone())
            .patch(
                &name,
                &apply_params(),
                &Patch::Apply(json!({
                    "apiVersion": "stripekeys.io/v1alpha1", "kind": "StripeGuardrail",
                    "metadata": {"name": name, "labels": {TEST_LABEL: self.suffix}},
                    "spec": spec,
                })),
            )
            .await
            .expect("StripeGuardrail");
        name
    }

    fn accounts(&self) -> Api<StripeAccount> {
        Api::all(self.client.clone())
    }

    /// Waits until `pred` holds for the test's StripeAccount's status.
    ///
    /// Scenarios that assert an account's status run alone (see the module documentation).
    async fn wait_account(
        &self,
        what: &str,
        pred: impl Fn(&stripe_key_operator::api::StripeAccountStatus) -> bool,
    ) -> StripeAccount {
        let api = self.accounts();
        let pred = &pred;
        wait_for(what, || {
            let api = api.clone();
            let name = self.account.clone();
            async move {
                match api.get_opt(&name).await {
                    Ok(Some(a)) if a.status.as_ref().is_some_and(pred) => Ok(a),
                    Ok(Some(a)) => Err(format!("status: {:#?}", a.status)),
                    Ok(None) => Err("the account is gone".into()),
                    Err(e) => Err(e.to_string()),
                }
            }
        })
        .await
    }

    /// Moves the operator's and the simulator's clocks together (Stripe's `last_used` follows
    /// the simulator's clock).
    fn advance_both(&self, by: Duration) {
        self.clock.advance(by);
        self.sim.advance_clock(by);
    }

    /// A person acting in the (simulated) Stripe Dashboard, through the simulator's control API
    /// (`POST /_sim/accounts/{acct}/dashboard`). Returns the simulator's answer.
    async fn dashboard(&self, action: Value) -> Value {
        let mut body = action;
        body["email"] = json!(DASHBOARD_EMAIL);
        let resp = reqwest::Client::new()
            .post(format!(
                "{}/_sim/accounts/{}/dashboard",
                self.sim.base_url(),
                self.account_id
            ))
            .json(&body)
            .send()
            .await
            .expect("the simulator's control API answers");
        assert!(
            resp.status().is_success(),
            "the Dashboard action {body} failed: {}",
            resp.status()
        );
        resp.json().await.expect("a JSON answer")
    }

    /// Uses a key as a client would: one call on the simulator's scope-enforcing surface.
    async fn use_key(&self, path: &str, token: &SecretString) {
        let status = reqwest::Client::new()
            .get(format!("{}{path}", self.sim.base_url()))
            .bearer_auth(token.expose())
            .send()
            .await
            .expect("the simulator answers")
            .status();
        assert_eq!(status.as_u16(), 200, "GET {path} with the key");
    }

    /// What `kubectl get` asks the API server for: the `Table` rendering of `path`.
    async fn table(&self, path: &str) -> Value {
        let request = http::Request::get(path)
            .header(
                http::header::ACCEPT,
                "application/json;as=Table;v=v1;g=meta.k8s.io",
            )
            .body(Vec::new())
            .expect("a request");
        let text = self
            .client
            .request_text(request)
            .await
            .unwrap_or_else(|e| panic!("GET {path} as a Table: {e}"));
        let table: Value = serde_json::from_str(&text).expect("a JSON Table");
        assert_eq!(table["kind"], "Table", "{table:#}");
        table
    }
}

fn nudge_labels() -> Value {
    let value = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
        .to_string();
    json!({"labels": {"test/nudge": value}})
}

/// Deletes the test's custom objects (while the controllers still run, so finalizers finish),
/// strips finalizers left behind, then deletes the namespaces, accounts and guardrails.
async fn cleanup(client: Client, created: Created, wait_for_finalizers: Duration) {
    let dp = DeleteParams::background();
    for ns in &created.namespaces {
        let policies: Api<StripeKeyPolicy> = Api::namespaced(client.clone(), ns);
        let endpoints: Api<StripeWebhookEndpoint> = Api::namespaced(client.clone(), ns);
        let _ = policies
            .delete_collection(&dp, &ListParams::default())
            .await;
        let _ = endpoints
            .delete_collection(&dp, &ListParams::default())
            .await;
    }
    let deadline = Instant::now() + wait_for_finalizers;
    for ns in &created.namespaces {
        let policies: Api<StripeKeyPolicy> = Api::namespaced(client.clone(), ns);
        let endpoints: Api<StripeWebhookEndpoint> = Api::namespaced(client.clone(), ns);
        loop {
            let left_p = policies
                .list_metadata(&ListParams::default())
                .await
                .map(|l| l.items)
                .unwrap_or_default();
            let left_e = endpoints
                .list_metadata(&ListParams::default())
                .await
                .map(|l| l.items)
                .unwrap_or_default();
            if left_p.is_empty() && left_e.is_empty() {
                break;
            }
            if Instant::now() > deadline {
                let strip = Patch::Merge(json!({"metadata": {"finalizers": null}}));
                for p in left_p {
                    let _ = policies
                        .patch(&p.name_any(), &PatchParams::default(), &strip)
                        .await;
                }
                for e in left_e {
                    let _ = endpoints
                        .patch(&e.name_any(), &PatchParams::default(), &strip)
                        .await;
                }
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    let namespaces: Api<Namespace> = Api::all(client.clone());
    for ns in &created.namespaces {
        let _ = namespaces.delete(ns, &dp).await;
    }
    let guardrails: Api<StripeGuardrail> = Api::all(client.clone());
    for g in &created.guardrails {
        let _ = guardrails.delete(g, &dp).await;
    }
    // Accounts carry the account controller's finalizer: it goes once no resource holds their
    // keys (the policies above are gone), else it is stripped like theirs.
    let accounts: Api<StripeAccount> = Api::all(client);
    for a in &created.accounts {
        let _ = accounts.delete(a, &dp).await;
    }
    let deadline = Instant::now() + wait_for_finalizers;
    for a in &created.accounts {
        while let Ok(Some(_)) = accounts.get_opt(a).await {
            if Instant::now() > deadline {
                let strip = Patch::Merge(json!({"metadata": {"finalizers": null}}));
                let _ = accounts.patch(a, &PatchParams::default(), &strip).await;
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let created = std::mem::take(&mut self.created);
        let leftovers = created.clone();
        let operator = self.operator.take();
        let client = self.client.clone();
        let run = async move {
            let wait = if operator.is_some() {
                Duration::from_secs(30)
            } else {
                Duration::ZERO
            };
            cleanup(client, created, wait).await;
            if let Some((stop, task)) = operator {
                stop.cancel();
                task.abort();
            }
        };
        match tokio::runtime::Handle::try_current() {
            // The tests run on the multi-thread runtime: block here while the workers keep the
            // controllers (and the client's connection) running.
            Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(|| handle.block_on(run));
            }
            _ => {
                // No multi-thread runtime: a fresh one on another thread with a fresh client (the
                // controllers cannot run, so finalizers are stripped at once).
                drop(run);
                let _ = std::thread::spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build();
                    if let Ok(rt) = rt {
                        rt.block_on(async move {
                            if let Ok(client) = Client::try_default().await {
                                cleanup(client, leftovers, Duration::ZERO).await;
                            }
                        });
                    }
                })
                .join();
            }
        }
    }
}

fn policy_ready(p: &StripeKeyPolicy) -> bool {
    p.status
        .as_ref()
        .is_some_and(|s| conditions::is_true(&s.conditions, "Ready") && s.rotation.is_none())
}

fn policy_settled(p: &StripeKeyPolicy) -> bool {
    policy_ready(p) && {
        let s = p.status.as_ref().unwrap();
        s.previous_key.is_none() && s.retiring_keys.is_empty()
    }
}

fn policy_in_phase(phase: RotationPhase) -> impl Fn(&StripeKeyPolicy) -> bool {
    move |p| {
        p.status
            .as_ref()
            .and_then(|s| s.rotation.as_ref())
            .is_some_and(|r| r.phase == phase)
    }
}

fn policy_condition(p: &StripeKeyPolicy, type_: &str) -> Option<(String, String, String)> {
    let c = conditions::find(&p.status.as_ref()?.conditions, type_)?;
    Some((c.status.clone(), c.reason.clone(), c.message.clone()))
}

fn endpoint_settled(e: &StripeWebhookEndpoint) -> bool {
    e.status.as_ref().is_some_and(|s| {
        conditions::is_true(&s.conditions, "Ready")
            && s.rotation.is_none()
            && s.previous_key.is_none()
            && s.retiring_keys.is_empty()
    })
}

fn endpoint_in_phase(phase: RotationPhase) -> impl Fn(&StripeWebhookEndpoint) -> bool {
    move |e| {
        e.status
            .as_ref()
            .and_then(|s| s.rotation.as_ref())
            .is_some_and(|r| r.phase == phase)
    }
}

/// A Secret's value (kept in a [`SecretString`] so it never shows in test output).
fn secret_value(secret: &Secret, key: &str) -> Option<SecretString> {
    secret
        .data
        .as_ref()?
        .get(key)
        .map(|b| SecretString::new(String::from_utf8(b.0.clone()).expect("utf-8 Secret value")))
}

fn fingerprint(s: &SecretString) -> String {
    stripe_key_operator::secret::fingerprint(s.expose().as_bytes())
}

const POLICY: &str = "checkout";
const POLICY_SECRET: &str = "checkout-stripe-key";
const POLICY_ANNOTATION: &str = "stripekeys.io/key-fingerprint.skp.checkout";
const ENDPOINT: &str = "orders";
const ENDPOINT_SECRET: &str = "orders-webhook";
const ENDPOINT_ANNOTATION: &str = "stripekeys.io/key-fingerprint.swe.orders";

/// Fingerprints of the policy Secret's current and previous key.
async fn policy_secret_fingerprints(c: &Cluster) -> (String, Option<String>) {
    let secret = c.secret(POLICY_SECRET).await.expect("Secret synced");
    let current = secret_value(&secret, "STRIPE_API_KEY").expect("STRIPE_API_KEY");
    let previous = secret_value(&secret, "STRIPE_API_KEY_PREVIOUS");
    (fingerprint(&current), previous.as_ref().map(fingerprint))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs a real cluster"]
async fn mint_on_apply_publishes_the_key_and_rolls_the_deployment() {
    let c = Cluster::start().await;
    c.apply_policy(&c.policy(POLICY, &["refund_write", "charge_read"]))
        .await;
    let p = c.wait_policy(POLICY, "Ready", policy_ready).await;
    let status = p.status.clone().unwrap();
    let current = status.current_key.clone().unwrap();

    let keys = c.sim_keys();
    assert_eq!(keys.len(), 1, "{keys:#?}");
    assert_eq!(keys[0].id, current.id);
    assert_eq!(keys[0].status, "active");
    let mut perms = keys[0].permissions.clone();
    perms.sort();
    assert_eq!(perms, ["charge_read", "refund_write"]);
    assert_eq!(keys[0].token_fingerprint, current.fingerprint);

    let secret = c.secret(POLICY_SECRET).await.expect("Secret synced");
    let token = secret_value(&secret, "STRIPE_API_KEY").expect("STRIPE_API_KEY");
    assert!(
        token.expose().starts_with("rk_test_") || token.expose().starts_with("sk_test_"),
        "a test-mode key"
    );
    assert_eq!(fingerprint(&token), current.fingerprint);
    assert!(secret_value(&secret, "STRIPE_API_KEY_PREVIOUS").is_none());
    let owner = &secret.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(owner.kind, "StripeKeyPolicy");
    assert_eq!(owner.controller, Some(true));

    let bundle = c
        .store
        .read_bundle(&c.store_path("stripekeypolicy", POLICY))
        .await
        .unwrap()
        .expect("store entry")
        .value;
    assert_eq!(bundle.current.key_id, current.id);
    assert_eq!(bundle.current.secret, token);

    let dep = c.deployments().get(DEPLOYMENT).await.unwrap();
    let annotations = dep
        .spec
        .as_ref()
        .and_then(|s| s.template.metadata.as_ref())
        .and_then(|m| m.annotations.clone())
        .unwrap_or_default();
    assert_eq!(
        annotations.get(POLICY_ANNOTATION),
        Some(&current.fingerprint)
    );
    c.wait_rolled(POLICY_ANNOTATION, &current.fingerprint).await;
    assert_eq!(status.rotation_number, Some(1));
    c.wait_event("StripeKeyPolicy", POLICY, "Normal", "KeyMinted")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs a real cluster"]
async fn annotation_rotation_keeps_the_old_key_until_rollout_and_overlap() {
    let c = Cluster::start().await;
    c.apply_policy(&c.policy(POLICY, &["charge_read"])).await;
    let first = c
        .wait_policy(POLICY, "Ready", policy_ready)
        .await
        .status
        .unwrap()
        .current_key
        .clone()
        .unwrap();
    c.wait_rolled(POLICY_ANNOTATION, &first.fingerprint).await;

    // A paused Deployment cannot roll: the old key must stay valid.
    c.pause_deployment(true).await;
    c.annotate_policy(POLICY, json!({"stripekeys.io/rotate": "e2e-1"}))
        .await;
    let p = c
        .wait_policy(
            POLICY,
            "RollingOut",
            policy_in_phase(RotationPhase::RollingOut),
        )
        .await;
    let second = p.status.unwrap().current_key.clone().unwrap();
    assert_ne!(first.id, second.id);
    assert_eq!(c.active_keys().len(), 2, "both keys valid while rolling");
    let (cur, prev) = policy_secret_fingerprints(&c).await;
    assert_eq!(cur, second.fingerprint);
    assert_eq!(prev.as_deref(), Some(first.fingerprint.as_str()));
    tokio::time::sleep(Duration::from_secs(5)).await;
    let p = c.policies().get(POLICY).await.unwrap();
    assert!(
        policy_in_phase(RotationPhase::RollingOut)(&p),
        "a paused Deployment keeps the rotation rolling out: {:#?}",
        p.status
    );
    assert_eq!(
        c.key_status(&first.id),
        "active",
        "a stalled rollout holds the old key"
    );

    // Rolled: now only the overlap holds it.
    c.pause_deployment(false).await;
    let p = c
        .wait_policy(
            POLICY,
            "Overlapping",
            policy_in_phase(RotationPhase::Overlapping),
        )
        .await;
    assert!(
        p.status
            .unwrap()
            .previous_key
            .clone()
            .unwrap()
            .expires_at
            .is_some(),
        "status shows when the old key expires"
    );
    c.wait_rolled(POLICY_ANNOTATION, &second.fingerprint).await;
    assert_eq!(
        c.key_status(&first.id),
        "active",
        "the overlap holds the old key"
    );

    c.clock.advance(Duration::from_secs(3700));
    c.nudge_policy(POLICY).await;
    let p = c
        .wait_policy(POLICY, "settled after the overlap", policy_settled)
        .await;
    assert_eq!(c.key_status(&first.id), "expired");
    let active = c.active_keys();
    assert_eq!(active.len(), 1);
    assert_eq!(active[0].id, second.id);
    let status = p.status.unwrap();
    assert_eq!(status.last_handled_rotate_request.as_deref(), Some("e2e-1"));
    assert_eq!(status.rotation_number, Some(2));
    let (cur, prev) = policy_secret_fingerprints(&c).await;
    assert_eq!(cur, second.fingerprint);
    assert!(prev.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs a real cluster"]
async fn incident_rotation_expires_the_old_key_at_once() {
    let c = Cluster::start().await;
    c.apply_policy(&c.policy(POLICY, &["charge_read"])).await;
    let first = c
        .wait_policy(POLICY, "Ready", policy_ready)
        .await
        .status
        .unwrap()
        .current_key
        .clone()
        .unwrap();
    c.wait_rolled(POLICY_ANNOTATION, &first.fingerprint).await;
    c.pause_deployment(true).await;
    c.annotate_policy(
        POLICY,
        json!({"stripekeys.io/rotate": "incident-1", "stripekeys.io/rotate-reason": "incident"}),
    )
    .await;
    let p = c
        .wait_policy(
            POLICY,
            "incident rollout",
            policy_in_phase(RotationPhase::RollingOut),
        )
        .await;
    // Expired before the rollout finished: an incident means no overlap.
    assert_eq!(c.key_status(&first.id), "expired");
    assert_eq!(c.active_keys().len(), 1);
    let (_, reason, _) = policy_condition(&p, "Rotating").unwrap();
    assert_eq!(reason, "IncidentRotation");
    let (_, prev) = policy_secret_fingerprints(&c).await;
    assert!(prev.is_none(), "a compromised key is not published");
    c.wait_event("StripeKeyPolicy", POLICY, "Warning", "IncidentRotation")
        .await;
    c.pause_deployment(false).await;
    let p = c.wait_policy(POLICY, "Ready", policy_ready).await;
    let current = p.status.unwrap().current_key.clone().unwrap();
    c.wait_rolled(POLICY_ANNOTATION, &current.fingerprint).await;
}

/// The reported incident story, as a user meets it on a real cluster: a routine rotation is
/// overlapping (K2 published, K1 previous), K2 leaks, an incident is declared. K1 and K2 are both
/// expired and one fresh key takes their place.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs a real cluster"]
async fn an_incident_during_an_overlap_expires_both_keys_and_leaves_one_fresh_key() {
    let c = Cluster::start().await;
    c.apply_policy(&c.policy(POLICY, &["charge_read"])).await;
    let k1 = c
        .wait_policy(POLICY, "Ready", policy_ready)
        .await
        .status
        .unwrap()
        .current_key
        .clone()
        .unwrap();
    c.wait_rolled(POLICY_ANNOTATION, &k1.fingerprint).await;
    c.annotate_policy(POLICY, json!({"stripekeys.io/rotate": "r1"}))
        .await;
    let p = c
        .wait_policy(
            POLICY,
            "Overlapping",
            policy_in_phase(RotationPhase::Overlapping),
        )
        .await;
    let k2 = p.status.unwrap().current_key.clone().unwrap();
    assert_ne!(k1.id, k2.id);
    assert_eq!(c.active_keys().len(), 2, "both valid during the overlap");

    c.annotate_policy(
        POLICY,
        json!({"stripekeys.io/rotate": "r2", "stripekeys.io/rotate-reason": "incident"}),
    )
    .await;
    let p = c
        .wait_policy(POLICY, "the incident handled", |p| {
            policy_settled(p)
                && p.status
                    .as_ref()
                    .unwrap()
                    .last_handled_rotate_request
                    .as_deref()
                    == Some("r2")
        })
        .await;
    let k3 = p.status.unwrap().current_key.clone().unwrap();
    assert_eq!(c.key_status(&k1.id), "expired", "K1 expired");
    assert_eq!(
        c.key_status(&k2.id),
        "expired",
        "K2, the leaked key, expired"
    );
    let active = c.active_keys();
    assert_eq!(active.len(), 1, "one fresh key: {active:#?}");
    assert_eq!(active[0].id, k3.id);
    let (cur, prev) = policy_secret_fingerprints(&c).await;
    assert_eq!(cur, k3.fingerprint);
    assert!(prev.is_none(), "no leaked key is published");
    c.wait_rolled(POLICY_ANNOTATION, &k3.fingerprint).await;
    c.wait_event("StripeKeyPolicy", POLICY, "Warning", "IncidentRotation")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs a real cluster"]
async fn scope_change_rotates_to_a_key_with_the_new_scopes() {
    let c = Cluster::start().await;
    c.apply_policy(&c.policy(POLICY, &["charge_read"])).await;
    let first = c
        .wait_policy(POLICY, "Ready", policy_ready)
        .await
        .status
        .unwrap()
        .current_key
        .clone()
        .unwrap();
    c.apply_policy(&c.policy(POLICY, &["charge_read", "customer_read"]))
        .await;
    let p = c
        .wait_policy(POLICY, "new scopes", |p| {
            p.status
                .as_ref()
                .is_some_and(|s| s.current_permissions == ["charge_read", "customer_read"])
        })
        .await;
    let second = p.status.unwrap().current_key.clone().unwrap();
    assert_ne!(first.id, second.id);
    let key = c
        .sim_keys()
        .into_iter()
        .find(|k| k.id == second.id)
        .unwrap();
    let mut perms = key.permissions;
    perms.sort();
    assert_eq!(perms, ["charge_read", "customer_read"]);
    c.wait_rolled(POLICY_ANNOTATION, &second.fingerprint).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs a real cluster"]
async fn scheduled_rotation_fires_when_next_rotation_at_passes() {
    let c = Cluster::start().await;
    let mut m = c.policy(POLICY, &["charge_read"]);
    m["spec"]["rotation"] = json!({"every": "2h", "overlap": "5m"});
    c.apply_policy(&m).await;
    let status = c
        .wait_policy(POLICY, "Ready", policy_ready)
        .await
        .status
        .unwrap();
    let gap = status
        .next_rotation_at
        .clone()
        .unwrap()
        .0
        .duration_since(status.last_rotation_at.clone().unwrap().0)
        .as_secs();
    assert!(
        (7200..7200 + 72).contains(&gap),
        "2h plus at most 1% jitter: {gap}s"
    );
    c.clock.advance(Duration::from_secs(7300));
    c.nudge_policy(POLICY).await;
    let p = c
        .wait_policy(POLICY, "scheduled rotation", |p| {
            p.status
                .as_ref()
                .is_some_and(|s| s.rotation_number == Some(2))
        })
        .await;
    let status = p.status.unwrap();
    assert_eq!(
        status.rotation.clone().map(|r| r.trigger),
        Some(RotationTrigger::Schedule)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs a real cluster"]
async fn guardrail_refusal_makes_no_stripe_call() {
    let mut c = Cluster::start().await;
    let guardrail = c
        .apply_guardrail(json!({"deniedPermissions": ["payout_*"]}))
        .await;
    c.apply_policy(&c.policy(POLICY, &["charge_read", "payout_write"]))
        .await;
    let p = c
        .wait_policy(POLICY, "refused", |p| {
            policy_condition(p, "Ready").is_some_and(|c| c.0 == "False")
        })
        .await;
    let (_, reason, message) = policy_condition(&p, "Ready").unwrap();
    assert_eq!(reason, "GuardrailViolation");
    assert!(
        message.contains("payout_write") && message.contains(&guardrail),
        "{message}"
    );
    c.wait_event("StripeKeyPolicy", POLICY, "Warning", "GuardrailViolation")
        .await;
    assert!(
        c.resource_calls().is_empty(),
        "no Stripe call for a refused policy"
    );
    assert!(c.secret(POLICY_SECRET).await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs a real cluster"]
async fn a_namespace_the_account_does_not_serve_is_refused() {
    let mut c = Cluster::start_without_operator().await;
    let other = c.add_unserved_namespace().await;
    c.start_operator();
    let mut m = c.policy("banner", &["charge_read"]);
    m["metadata"]["namespace"] = json!(other);
    m["spec"]["delivery"]["rolloutTargets"] = json!([]);
    c.apply_policy(&m).await;
    let p = c
        .wait_policy_in(&other, "banner", "a Ready condition", |p| {
            policy_condition(p, "Ready").is_some()
        })
        .await;
    let (status, reason, _) = policy_condition(&p, "Ready").unwrap();
    assert_eq!(status, "False");
    assert_eq!(reason, "NamespaceNotAllowed");
    assert!(c.resource_calls().is_empty(), "no Stripe call");
    let secrets: Api<Secret> = Api::namespaced(c.client.clone(), &other);
    assert!(
        secrets
            .get_opt("banner-stripe-key")
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs a real cluster"]
async fn deletion_expires_the_keys_and_the_secret_is_collected() {
    let c = Cluster::start().await;
    c.apply_policy(&c.policy(POLICY, &["charge_read"])).await;
    c.wait_policy(POLICY, "Ready", policy_ready).await;
    assert!(c.secret(POLICY_SECRET).await.is_some());
    c.policies()
        .delete(POLICY, &DeleteParams::default())
        .await
        .unwrap();
    let api = c.policies();
    wait_for("the finalizer to finish", || {
        let api = api.clone();
        async move {
            match api.get_opt(POLICY).await {
                Ok(None) => Ok(()),
                Ok(Some(p)) => Err(format!(
                    "finalizers {:?}, status {:#?}",
                    p.metadata.finalizers, p.status
                )),
                Err(e) => Err(e.to_string()),
            }
        }
    })
    .await;
    assert!(
        c.active_keys().is_empty(),
        "every key expired: {:#?}",
        c.sim_keys()
    );
    assert!(
        c.store
            .read_bundle(&c.store_path("stripekeypolicy", POLICY))
            .await
            .unwrap()
            .is_none()
    );
    // The owned Secret goes with its owner (the cluster's garbage collector).
    wait_for("the Secret garbage-collected", || async {
        match c.secret(POLICY_SECRET).await {
            None => Ok(()),
            Some(_) => Err("still present".to_string()),
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs a real cluster"]
async fn an_account_in_use_is_deleted_only_after_its_policy_retired_its_key() {
    // Alone: another test's operator, which sees none of this test's policies, would let the
    // account go.
    let c = Cluster::start_exclusive_with(no_tuning).await;
    c.apply_policy(&c.policy(POLICY, &["charge_read"])).await;
    let key = c
        .wait_policy(POLICY, "Ready", policy_ready)
        .await
        .status
        .unwrap()
        .current_key
        .clone()
        .unwrap();
    let accounts: Api<StripeAccount> = Api::all(c.client.clone());
    accounts
        .delete(&c.account, &DeleteParams::default())
        .await
        .unwrap();
    let holder = format!("StripeKeyPolicy {}/{POLICY}", c.ns);
    wait_for(
        "the account held, Ready=False InUse naming the policy",
        || {
            let (accounts, holder) = (accounts.clone(), holder.clone());
            let name = c.account.clone();
            async move {
                let a = accounts
                    .get_opt(&name)
                    .await
                    .map_err(|e| e.to_string())?
                    .ok_or("the account is gone")?;
                let ready = a
                    .status
                    .as_ref()
                    .and_then(|s| conditions::find(&s.conditions, "Ready"));
                match ready {
                    Some(r)
                        if a.metadata.deletion_timestamp.is_some()
                            && r.status == "False"
                            && r.reason == "InUse"
                            && r.message.contains(&holder) =>
                    {
                        Ok(())
                    }
                    _ => Err(format!("{:?} {:#?}", a.metadata.finalizers, a.status)),
                }
            }
        },
    )
    .await;
    // Events about a cluster-scoped object are written to `default`.
    let events: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(c.client.clone(), "default");
    wait_for("a Warning Event DeletionBlocked on the account", || {
        let events = events.clone();
        let name = c.account.clone();
        async move {
            let found = events
                .list(&ListParams::default())
                .await
                .map_err(|e| e.to_string())?
                .items
                .into_iter()
                .any(|e| {
                    e.reason.as_deref() == Some("DeletionBlocked")
                        && e.type_.as_deref() == Some("Warning")
                        && e.regarding.as_ref().and_then(|r| r.name.as_deref())
                            == Some(name.as_str())
                });
            if found {
                Ok(())
            } else {
                Err("no such Event yet".to_string())
            }
        }
    })
    .await;
    assert_eq!(c.key_status(&key.id), "active", "nothing retired it yet");

    // A policy created now mints nothing under the terminating account.
    c.apply_policy(&c.policy("late", &["charge_read"])).await;
    let late = c
        .wait_policy("late", "Ready=False AccountTerminating", |p| {
            p.status
                .as_ref()
                .and_then(|s| conditions::find(&s.conditions, "Ready"))
                .is_some_and(|r| r.status == "False" && r.reason == "AccountTerminating")
        })
        .await;
    assert!(late.status.unwrap().current_key.is_none());
    c.policies()
        .delete("late", &DeleteParams::default())
        .await
        .unwrap();

    // The policy goes: its finalizer retires the key through the terminating account, then the
    // account goes.
    c.policies()
        .delete(POLICY, &DeleteParams::default())
        .await
        .unwrap();
    wait_for("the account released", || {
        let accounts = accounts.clone();
        let name = c.account.clone();
        async move {
            match accounts.get_opt(&name).await {
                Ok(None) => Ok(()),
                Ok(Some(a)) => Err(format!("{:?} {:#?}", a.metadata.finalizers, a.status)),
                Err(e) => Err(e.to_string()),
            }
        }
    })
    .await;
    assert_eq!(
        c.key_status(&key.id),
        "expired",
        "retired before the account went"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs a real cluster"]
async fn a_crash_after_storing_resumes_without_a_second_key() {
    let mut c = Cluster::start().await;
    c.apply_policy(&c.policy(POLICY, &["charge_read"])).await;
    c.wait_policy(POLICY, "Ready", policy_ready).await;
    c.crash.arm("stored");
    c.annotate_policy(POLICY, json!({"stripekeys.io/rotate": "crash-stored"}))
        .await;
    wait_for("the crash point", || async {
        if c.crash.hits() > 0 {
            Ok(())
        } else {
            Err("not reached".to_string())
        }
    })
    .await;
    // The process dies right after the side effect, before recording it; a new one starts cold.
    c.kill_operator().await;
    c.start_operator();
    c.wait_policy(
        POLICY,
        "Overlapping",
        policy_in_phase(RotationPhase::Overlapping),
    )
    .await;
    c.clock.advance(Duration::from_secs(3700));
    c.nudge_policy(POLICY).await;
    let p = c.wait_policy(POLICY, "settled", policy_settled).await;
    let current = p.status.unwrap().current_key.clone().unwrap();
    let active = c.active_keys();
    assert_eq!(
        active.len(),
        1,
        "exactly one active key: {:#?}",
        c.sim_keys()
    );
    assert_eq!(active[0].id, current.id);
    assert_eq!(
        c.sim_keys().len(),
        2,
        "one key per rotation, none minted twice: {:#?}",
        c.sim_keys()
    );
    let bundle = c
        .store
        .read_bundle(&c.store_path("stripekeypolicy", POLICY))
        .await
        .unwrap()
        .unwrap()
        .value;
    assert_eq!(bundle.current.key_id, current.id);
    assert!(bundle.previous.is_none());
    let (cur, prev) = policy_secret_fingerprints(&c).await;
    assert_eq!(cur, current.fingerprint);
    assert!(prev.is_none());
}

/// The webhook Secret's current secret and list of valid secrets.
async fn webhook_secrets(c: &Cluster) -> (SecretString, Vec<SecretString>) {
    let secret = c.secret(ENDPOINT_SECRET).await.expect("Secret synced");
    let current = secret_value(&secret, "STRIPE_WEBHOOK_SECRET").expect("STRIPE_WEBHOOK_SECRET");
    let all = secret_value(&secret, "STRIPE_WEBHOOK_SECRETS")
        .expect("STRIPE_WEBHOOK_SECRETS")
        .expose()
        .split(',')
        .map(|s| SecretString::new(s.to_string()))
        .collect();
    (current, all)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs a real cluster"]
async fn webhook_endpoint_is_created_and_rotated_blue_green() {
    let c = Cluster::start().await;
    c.apply_endpoint(&c.endpoint(ENDPOINT)).await;
    let e = c.wait_endpoint(ENDPOINT, "Ready", endpoint_settled).await;
    let first = e.status.unwrap().current_key.clone().unwrap();
    let eps = c.sim_endpoints();
    assert_eq!(eps.len(), 1, "{eps:#?}");
    assert_eq!(eps[0].id, first.id);
    assert_eq!(eps[0].url, WEBHOOK_URL);
    assert_eq!(eps[0].status, "enabled");
    let (cur, all) = webhook_secrets(&c).await;
    assert!(cur.expose().starts_with("whsec_"));
    assert_eq!(cur.fingerprint(), first.fingerprint);
    assert_eq!(all.len(), 1);
    assert_eq!(all[0], cur);
    c.wait_rolled(ENDPOINT_ANNOTATION, &first.fingerprint).await;
    c.wait_event(
        "StripeWebhookEndpoint",
        ENDPOINT,
        "Normal",
        "EndpointCreated",
    )
    .await;

    c.annotate_endpoint(ENDPOINT, json!({"stripekeys.io/rotate": "e2e-1"}))
        .await;
    let e = c
        .wait_endpoint(
            ENDPOINT,
            "Overlapping",
            endpoint_in_phase(RotationPhase::Overlapping),
        )
        .await;
    let status = e.status.unwrap();
    let second = status.current_key.clone().unwrap();
    assert_ne!(first.id, second.id);
    assert_eq!(status.previous_key.as_ref().unwrap().id, first.id);
    let eps = c.sim_endpoints();
    assert_eq!(eps.len(), 2, "both endpoints during the overlap: {eps:#?}");
    let (cur, all) = webhook_secrets(&c).await;
    assert_eq!(cur.fingerprint(), second.fingerprint);
    assert_eq!(all.len(), 2);
    assert_eq!(all[0].fingerprint(), second.fingerprint);
    assert_eq!(all[1].fingerprint(), first.fingerprint);
    c.wait_rolled(ENDPOINT_ANNOTATION, &second.fingerprint)
        .await;

    c.clock.advance(Duration::from_secs(3700));
    c.nudge_endpoint(ENDPOINT).await;
    let e = c
        .wait_endpoint(ENDPOINT, "settled after the overlap", endpoint_settled)
        .await;
    assert_eq!(e.status.unwrap().current_key.clone().unwrap().id, second.id);
    let eps = c.sim_endpoints();
    assert_eq!(eps.len(), 1, "only the new endpoint: {eps:#?}");
    assert_eq!(eps[0].id, second.id);
    let (cur, all) = webhook_secrets(&c).await;
    assert_eq!(cur.fingerprint(), second.fingerprint);
    assert_eq!(all, [cur]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs a real cluster"]
async fn webhook_drift_is_repaired_at_the_next_drift_check() {
    let c = Cluster::start().await;
    c.apply_endpoint(&c.endpoint(ENDPOINT)).await;
    let e = c.wait_endpoint(ENDPOINT, "Ready", endpoint_settled).await;
    let id = e.status.unwrap().current_key.clone().unwrap().id;
    let stripe = StripeClient::new(c.sim.stripe_config(&c.account_id).unwrap()).unwrap();
    stripe
        .update_webhook_endpoint(
            &id,
            &UpdateWebhookEndpointParams {
                url: Some("https://evil.example.net/steal".into()),
                ..Default::default()
            },
            &format!("e2e-drift-{}", c.suffix),
        )
        .await
        .expect("changing the endpoint at the simulator");
    assert_eq!(c.sim_endpoints()[0].url, "https://evil.example.net/steal");

    // Past the default driftCheckInterval (10m).
    c.clock.advance(Duration::from_secs(11 * 60));
    c.nudge_endpoint(ENDPOINT).await;
    wait_for("the url put back", || async {
        let eps = c.sim_endpoints();
        match eps.first() {
            Some(ep) if ep.url == WEBHOOK_URL => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let eps = c.sim_endpoints();
    assert_eq!(eps.len(), 1);
    assert_eq!(eps[0].id, id, "repaired in place, not rotated");
    c.wait_event(
        "StripeWebhookEndpoint",
        ENDPOINT,
        "Warning",
        "DriftRepaired",
    )
    .await;
    let e = c
        .wait_endpoint(ENDPOINT, "drift check recorded", |e| {
            e.status
                .as_ref()
                .is_some_and(|s| s.last_drift_check_at.is_some())
        })
        .await;
    assert_eq!(e.status.unwrap().rotation_number, Some(1));
}

/// Who plays the person in the simulated Stripe Dashboard.
const DASHBOARD_EMAIL: &str = "mallory@example.com";
const CANARY: &str = "payments-live";
const CANARY_SECRET: &str = "payments-live-stripe-key";
/// The canary check's interval in these scenarios (`--canary-check-interval`).
const CANARY_INTERVAL: Duration = Duration::from_secs(2);
/// The activity-log reader's interval in these scenarios (`--activity-log-interval`).
const ACTIVITY_INTERVAL: Duration = Duration::from_secs(2);
/// Time a reaction may take beyond one interval on a real cluster (a reconcile, Stripe calls,
/// status writes and an Event through the API server).
const SLACK: Duration = Duration::from_secs(10);
const MIN: u64 = 60;

fn current_key(p: &StripeKeyPolicy) -> stripe_key_operator::api::KeyStatus {
    p.status
        .as_ref()
        .and_then(|s| s.current_key.clone())
        .expect("a current key")
}

/// The policy handled the rotation request `request` and has nothing left to retire.
fn incident_done(request: &str) -> impl Fn(&StripeKeyPolicy) -> bool + '_ {
    move |p| {
        policy_ready(p)
            && p.status.as_ref().is_some_and(|s| {
                s.last_handled_rotate_request.as_deref() == Some(request)
                    && s.previous_key.is_none()
                    && s.retiring_keys.is_empty()
            })
    }
}

fn tripped(p: &StripeKeyPolicy) -> bool {
    p.status
        .as_ref()
        .is_some_and(|s| conditions::is_true(&s.conditions, "Tripped"))
}

impl Cluster {
    /// A canary (honeytoken) policy guarding the policies labelled `tier=payments`.
    fn canary(&self, name: &str) -> Value {
        json!({
            "apiVersion": "stripekeys.io/v1alpha1", "kind": "StripeKeyPolicy",
            "metadata": {"name": name, "namespace": self.ns},
            "spec": {
                "accountRef": {"name": self.account},
                "permissions": ["balance_read"],
                "delivery": {"secret": {"name": format!("{name}-stripe-key")}},
                "canary": {"guards": {"matchLabels": {"tier": "payments"}},
                           "onTrip": "IncidentRotation"}
            }
        })
    }
}

/// Canary keys: a decoy used at Stripe trips within one check interval; the canary shows
/// `Tripped=True, reason=CanaryUsed` and a Warning Event (read through events.k8s.io/v1), the
/// policy it guards is rotated as an incident (its old key expired at once, not after the
/// overlap) and rolled, and the canary itself is re-minted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs a real cluster"]
async fn a_used_canary_trips_and_rotates_the_guarded_policy_as_an_incident() {
    let c = Cluster::start_with(|config| config.canary_check_interval = CANARY_INTERVAL).await;
    let mut guarded = c.policy(POLICY, &["charge_read"]);
    guarded["metadata"]["labels"] = json!({"tier": "payments"});
    c.apply_policy(&guarded).await;
    c.apply_policy(&c.canary(CANARY)).await;
    let first = current_key(&c.wait_policy(POLICY, "Ready", policy_ready).await);
    c.wait_rolled(POLICY_ANNOTATION, &first.fingerprint).await;
    let decoy = current_key(
        &c.wait_policy(CANARY, "the canary Ready", policy_ready)
            .await,
    );
    // Quiet rounds: an unused canary does not trip (the operator never uses it itself).
    tokio::time::sleep(CANARY_INTERVAL * 3).await;
    let p = c.policies().get(CANARY).await.unwrap();
    assert!(!tripped(&p), "tripped while unused: {:#?}", p.status);

    // An intruder reads the decoy from its Secret and tries it.
    let secret = c.secret(CANARY_SECRET).await.expect("the decoy Secret");
    let token = secret_value(&secret, "STRIPE_API_KEY").expect("the decoy key");
    assert_eq!(fingerprint(&token), decoy.fingerprint);
    c.use_key("/v1/balance", &token).await;
    let used_at = Instant::now();
    let p = c.wait_policy(CANARY, "Tripped=True", tripped).await;
    let took = used_at.elapsed();
    assert!(
        took <= CANARY_INTERVAL + SLACK,
        "tripped {took:?} after the use (interval {CANARY_INTERVAL:?})"
    );
    let (_, reason, message) = policy_condition(&p, "Tripped").unwrap();
    assert_eq!(reason, "CanaryUsed");
    assert!(message.contains(&decoy.id), "{message}");
    assert!(!message.contains(token.expose()), "no material in status");
    let request = p
        .status
        .as_ref()
        .and_then(|s| s.canary.as_ref())
        .and_then(|c| c.last_trip.as_ref())
        .map(|t| t.request.clone())
        .expect("the trip recorded in status");
    c.wait_event("StripeKeyPolicy", CANARY, "Warning", "CanaryTripped")
        .await;

    // The guarded policy: an incident rotation, its old key revoked without an overlap (the
    // operator's clock never moved, so only the incident path expires it), the new key rolled.
    let p = c
        .wait_policy(POLICY, "the incident rotation", incident_done(&request))
        .await;
    let second = current_key(&p);
    assert_ne!(second.id, first.id);
    assert_eq!(c.key_status(&first.id), "expired", "revoked at once");
    c.wait_event("StripeKeyPolicy", POLICY, "Warning", "IncidentRotation")
        .await;
    let (cur, prev) = policy_secret_fingerprints(&c).await;
    assert_eq!(cur, second.fingerprint);
    assert!(prev.is_none(), "a compromised key is not published");
    c.wait_rolled(POLICY_ANNOTATION, &second.fingerprint).await;

    // The canary is re-minted and its used key expired.
    let p = c
        .wait_policy(CANARY, "the canary re-minted", incident_done(&request))
        .await;
    assert_ne!(current_key(&p).id, decoy.id);
    assert_eq!(c.key_status(&decoy.id), "expired");
    let active: Vec<String> = c.active_keys().into_iter().map(|k| k.id).collect();
    assert_eq!(active.len(), 2, "one key per policy: {active:?}");
}

/// Stripe's activity log: a person reveals a managed key in the Dashboard; with
/// `spec.rotation.onKeyViewed: IncidentRotation` the policy raises `KeyViewed` and is rotated as
/// an incident (the viewed key expired at once). A key a person creates by hand is listed in the
/// StripeAccount's `status.unmanagedKeys`, and the operator leaves it alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs a real cluster"]
async fn a_key_viewed_in_the_dashboard_is_replaced_and_a_hand_made_key_is_listed_unmanaged() {
    // Alone: the activity-log cursor and the unmanaged keys live in the account's status.
    let c =
        Cluster::start_exclusive_with(|config| config.activity_log_interval = ACTIVITY_INTERVAL)
            .await;
    // The first read only places the cursor (history is not replayed).
    c.wait_account("the first activity-log read", |s| {
        s.activity_log
            .as_ref()
            .is_some_and(|a| a.started_at.is_some())
    })
    .await;
    let mut m = c.policy(POLICY, &["charge_read"]);
    m["spec"]["rotation"]["onKeyViewed"] = json!("IncidentRotation");
    c.apply_policy(&m).await;
    let first = current_key(&c.wait_policy(POLICY, "Ready", policy_ready).await);
    c.wait_rolled(POLICY_ANNOTATION, &first.fingerprint).await;

    c.dashboard(json!({"action": "view", "key_id": first.id}))
        .await;
    c.wait_event("StripeKeyPolicy", POLICY, "Warning", "KeyViewed")
        .await;
    let p = c
        .wait_policy(POLICY, "the viewed key replaced", |p| {
            policy_settled(p)
                && p.status
                    .as_ref()
                    .and_then(|s| s.current_key.as_ref())
                    .is_some_and(|k| k.id != first.id)
        })
        .await;
    assert_eq!(c.key_status(&first.id), "expired", "the viewed key revoked");
    let status = p.status.clone().unwrap();
    assert!(
        status
            .last_handled_rotate_request
            .as_deref()
            .is_some_and(|r| r.starts_with("activity-actlog_")),
        "{:?}",
        status.last_handled_rotate_request
    );
    let second = current_key(&p);
    let (cur, prev) = policy_secret_fingerprints(&c).await;
    assert_eq!(cur, second.fingerprint);
    assert!(prev.is_none(), "a viewed key is not published");
    c.wait_rolled(POLICY_ANNOTATION, &second.fingerprint).await;

    // A person creates a key by hand: listed, never touched.
    let created = c
        .dashboard(json!({"action": "create", "name": "laptop script",
                          "permissions": ["charge_write"]}))
        .await;
    let id = created["key_id"]
        .as_str()
        .expect("the new key's id")
        .to_string();
    let a = c
        .wait_account("the hand-made key listed", |s| {
            s.unmanaged_keys.iter().any(|k| k.id == id)
        })
        .await;
    let status = a.status.unwrap();
    let listed = status.unmanaged_keys.iter().find(|k| k.id == id).unwrap();
    assert_eq!(listed.name.as_deref(), Some("laptop script"));
    assert_eq!(listed.created_by, format!("user {DASHBOARD_EMAIL}"));
    assert_eq!(status.unmanaged_key_count, Some(1));
    assert_eq!(c.key_status(&id), "active", "not the operator's to touch");
    assert_eq!(
        c.event_reasons("StripeKeyPolicy", POLICY)
            .await
            .iter()
            .filter(|(_, r)| r == "KeyTampered")
            .count(),
        0
    );
}

/// Usage-aware expiry: after an annotation rotation, a client outside the rollout targets keeps
/// using the old key. When the overlap ends the key is held (`Degraded=True,
/// reason=OldKeyStillInUse`, phase `Expiring`, a Warning Event), still published, and expired
/// only once Stripe has shown it quiet for `quietPeriod` plus the `last_used` lag (Normal Event
/// `OldKeyQuiet`). Both clocks (operator and simulator) are manual.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs a real cluster"]
async fn an_old_key_still_in_use_after_a_rotation_is_held_until_it_is_quiet() {
    let c = Cluster::start_with(|config| {
        config.last_used_lag = Duration::from_secs(10 * MIN);
        config.key_usage_check_interval = Duration::from_secs(15 * MIN);
    })
    .await;
    let mut m = c.policy(POLICY, &["charge_read"]);
    m["spec"]["rotation"]["usageAwareExpiry"] =
        json!({"quietPeriod": "30m", "maxHold": "6h", "unusedAfter": "1h"});
    c.apply_policy(&m).await;
    let first = current_key(&c.wait_policy(POLICY, "Ready", policy_ready).await);
    c.wait_rolled(POLICY_ANNOTATION, &first.fingerprint).await;
    c.annotate_policy(POLICY, json!({"stripekeys.io/rotate": "usage-1"}))
        .await;
    let p = c
        .wait_policy(
            POLICY,
            "Overlapping",
            policy_in_phase(RotationPhase::Overlapping),
        )
        .await;
    let second = current_key(&p);
    assert_eq!(
        p.status
            .as_ref()
            .and_then(|s| s.previous_key.as_ref())
            .unwrap()
            .id,
        first.id
    );
    let secret = c.secret(POLICY_SECRET).await.expect("Secret synced");
    let old_token = secret_value(&secret, "STRIPE_API_KEY_PREVIOUS").expect("old key published");
    assert_eq!(fingerprint(&old_token), first.fingerprint);

    // 40 minutes after the rollout something still calls with the old key; the overlap (1h)
    // ends at +61m.
    c.advance_both(Duration::from_secs(40 * MIN));
    c.use_key("/v1/charges", &old_token).await;
    c.advance_both(Duration::from_secs(21 * MIN));
    c.nudge_policy(POLICY).await;
    let held = |p: &StripeKeyPolicy| {
        p.status
            .as_ref()
            .and_then(|s| s.rotation.as_ref())
            .is_some_and(|r| r.usage_hold.is_some())
    };
    let p = c.wait_policy(POLICY, "the old key held", held).await;
    assert_eq!(c.key_status(&first.id), "active", "held, not expired");
    assert!(
        policy_in_phase(RotationPhase::Expiring)(&p),
        "{:#?}",
        p.status
    );
    let (status, reason, message) = policy_condition(&p, "Degraded").unwrap();
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("True", "OldKeyStillInUse")
    );
    assert!(
        message.contains(&first.id) && message.contains("last used at"),
        "{message}"
    );
    assert!(
        !message.contains(old_token.expose()),
        "no material in status"
    );
    c.wait_event("StripeKeyPolicy", POLICY, "Warning", "OldKeyStillInUse")
        .await;
    let (cur, prev) = policy_secret_fingerprints(&c).await;
    assert_eq!(cur, second.fingerprint);
    assert_eq!(
        prev.as_deref(),
        Some(first.fingerprint.as_str()),
        "still published while held"
    );

    // Last use + 30m: quiet by Stripe's report, but uses of the last 10m may not show yet.
    c.advance_both(Duration::from_secs(9 * MIN));
    for _ in 0..3 {
        c.nudge_policy(POLICY).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert_eq!(c.key_status(&first.id), "active", "the lag is waited out");
    assert!(held(&c.policies().get(POLICY).await.unwrap()));
    // Last use + 41m: quiet period plus lag passed.
    c.advance_both(Duration::from_secs(11 * MIN));
    c.nudge_policy(POLICY).await;
    let p = c
        .wait_policy(POLICY, "the rotation finished", policy_settled)
        .await;
    assert_eq!(c.key_status(&first.id), "expired");
    assert_eq!(c.key_status(&second.id), "active");
    assert_eq!(policy_condition(&p, "Degraded").unwrap().0, "False");
    c.wait_event("StripeKeyPolicy", POLICY, "Normal", "OldKeyQuiet")
        .await;
    let (cur, prev) = policy_secret_fingerprints(&c).await;
    assert_eq!(cur, second.fingerprint);
    assert!(prev.is_none());
}

const BROKERED: &str = "brokered";
const BROKERED_SECRET: &str = "brokered-stripe-key";
const BROKER_PORT: u16 = 12111;

/// Brokered delivery (`spec.delivery.broker`): the published Secret gives the application the
/// placeholder and `STRIPE_API_BASE`, and only the sidecar's entries hold the real key; the
/// sidecar (run here in-process on a copy of those entries, as the kubelet mounts them) calls
/// Stripe with it. A rotation changes the sidecar's entry only and rolls nothing: the
/// Deployment's generation and pod template annotations stay as they were. A brokered policy
/// with `rolloutTargets` is refused by the API server (the CRD's CEL rule).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs a real cluster"]
async fn brokered_delivery_hides_the_key_from_the_app_and_rotates_without_a_rollout() {
    use stripe_key_operator::egress::proxy::{
        API_BASE_ENTRY, DEFAULT_KEY_ENTRY, DEFAULT_PERMISSIONS_ENTRY, DEFAULT_PLACEHOLDER_ENTRY,
        EgressConfig, EgressProxy, PLACEHOLDER_PREFIX,
    };
    let c = Cluster::start().await;
    let before = c.deployments().get(DEPLOYMENT).await.unwrap();
    let brokered = |name: &str| {
        json!({
            "apiVersion": "stripekeys.io/v1alpha1", "kind": "StripeKeyPolicy",
            "metadata": {"name": name, "namespace": c.ns},
            "spec": {
                "accountRef": {"name": c.account},
                "permissions": ["charge_read"],
                "delivery": {"secret": {"name": BROKERED_SECRET},
                             "broker": {"port": BROKER_PORT}},
                "rotation": {"every": "720h", "overlap": "1h"}
            }
        })
    };
    c.apply_policy(&brokered(BROKERED)).await;
    let first = current_key(&c.wait_policy(BROKERED, "Ready", policy_ready).await);

    let secret = c.secret(BROKERED_SECRET).await.expect("Secret synced");
    let placeholder = secret_value(&secret, DEFAULT_PLACEHOLDER_ENTRY).expect("STRIPE_API_KEY");
    let app_base = secret_value(&secret, API_BASE_ENTRY).expect("STRIPE_API_BASE");
    let real = secret_value(&secret, DEFAULT_KEY_ENTRY).expect("STRIPE_BROKER_API_KEY");
    assert!(
        placeholder.expose().starts_with(PLACEHOLDER_PREFIX),
        "the app's entry holds a placeholder"
    );
    assert!(
        !placeholder.expose().starts_with("rk_test_")
            && !placeholder.expose().starts_with("rk_live_"),
        "the placeholder is no key"
    );
    assert_eq!(
        app_base.expose(),
        format!("http://127.0.0.1:{BROKER_PORT}"),
        "the app calls the sidecar"
    );
    assert!(real.expose().starts_with("rk_test_"));
    assert_eq!(fingerprint(&real), first.fingerprint, "the sidecar's entry");
    assert_eq!(
        secret_value(&secret, DEFAULT_PERMISSIONS_ENTRY).map(|v| v.expose().to_string()),
        Some("charge_read".to_string())
    );
    assert!(secret_value(&secret, "STRIPE_API_KEY_PREVIOUS").is_none());

    // The sidecar on the entries it mounts: the app's placeholder works through it.
    let volume = tempfile::tempdir().unwrap();
    let mount = |secret: &Secret| {
        for entry in [
            DEFAULT_KEY_ENTRY,
            DEFAULT_PERMISSIONS_ENTRY,
            DEFAULT_PLACEHOLDER_ENTRY,
        ] {
            let v = secret_value(secret, entry).expect("a sidecar entry");
            std::fs::write(volume.path().join(entry), v.expose()).unwrap();
        }
    };
    mount(&secret);
    let mut config = EgressConfig::new(c.sim.base_url().parse().unwrap(), volume.path());
    config.allow_loopback_upstream = true;
    config.reload_interval = Duration::from_millis(100);
    let broker = EgressProxy::start(config)
        .await
        .expect("the sidecar starts");
    assert_eq!(
        broker.key_fingerprint().as_deref(),
        Some(first.fingerprint.as_str())
    );
    let through_broker = || async {
        reqwest::Client::new()
            .get(format!("{}/v1/charges", broker.url()))
            .bearer_auth(placeholder.expose())
            .send()
            .await
            .expect("the sidecar answers")
            .status()
            .as_u16()
    };
    assert_eq!(through_broker().await, 200, "the real key went on the wire");

    c.annotate_policy(BROKERED, json!({"stripekeys.io/rotate": "broker-1"}))
        .await;
    let p = c
        .wait_policy(
            BROKERED,
            "the new key published, the old one overlapping",
            policy_in_phase(RotationPhase::Overlapping),
        )
        .await;
    let second = current_key(&p);
    assert_ne!(second.id, first.id);
    let secret = c.secret(BROKERED_SECRET).await.unwrap();
    assert_eq!(
        fingerprint(&secret_value(&secret, DEFAULT_KEY_ENTRY).unwrap()),
        second.fingerprint,
        "the sidecar's entry holds the new key"
    );
    assert_eq!(
        secret_value(&secret, DEFAULT_PLACEHOLDER_ENTRY).unwrap(),
        placeholder,
        "the app's entries do not change"
    );
    assert_eq!(secret_value(&secret, API_BASE_ENTRY).unwrap(), app_base);
    mount(&secret);
    wait_for("the sidecar switched keys", || async {
        match broker.key_fingerprint() {
            Some(f) if f == second.fingerprint => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert_eq!(through_broker().await, 200);
    assert_eq!(
        c.key_status(&first.id),
        "active",
        "the overlap holds the old key"
    );
    broker.shutdown().await;

    // Nothing was rolled: give a (wrong) rollout time to show, then compare.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = c.deployments().get(DEPLOYMENT).await.unwrap();
    assert_eq!(after.metadata.generation, before.metadata.generation);
    let annotations = |d: &Deployment| {
        d.spec
            .as_ref()
            .and_then(|s| s.template.metadata.as_ref())
            .and_then(|m| m.annotations.clone())
    };
    assert_eq!(annotations(&after), annotations(&before), "no rollout");

    // With rollout targets: refused by the API server before the operator sees it.
    let mut rolled = brokered("brokered-rolled");
    rolled["spec"]["delivery"]["rolloutTargets"] =
        json!([{"kind": "Deployment", "name": DEPLOYMENT}]);
    let err = c
        .policies()
        .patch("brokered-rolled", &apply_params(), &Patch::Apply(&rolled))
        .await
        .expect_err("a brokered policy with rolloutTargets is refused");
    match err {
        kube::Error::Api(status) => {
            assert_eq!(status.code, 422, "{status:?}");
            assert!(
                status.message.contains("a brokered key needs no rollout"),
                "{}",
                status.message
            );
        }
        other => panic!("not an API refusal: {other}"),
    }
    assert!(
        c.policies()
            .get_opt("brokered-rolled")
            .await
            .unwrap()
            .is_none()
    );
}

/// Column names of a Table.
fn column_names(table: &Value) -> Vec<String> {
    table["columnDefinitions"]
        .as_array()
        .expect("columnDefinitions")
        .iter()
        .map(|c| c["name"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// The cell of column `name` in the Table's row of the object `object`.
fn cell(table: &Value, object: &str, name: &str) -> Option<Value> {
    let i = column_names(table).iter().position(|c| c == name)?;
    table["rows"]
        .as_array()?
        .iter()
        .find(|r| r["cells"][0] == object)
        .map(|r| r["cells"][i].clone())
}

fn column<'a>(table: &'a Value, name: &str) -> &'a Value {
    table["columnDefinitions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no column {name}: {table:#}"))
}

/// What a person sees with `kubectl get`: the API server's Table rendering (the printer columns
/// of the CRDs) of a StripeKeyPolicy and of the StripeAccount. The next rotation is a `string`
/// column holding the RFC 3339 time (a `date` column renders a future time as `<invalid>`); the
/// StripeAccount shows its health, the keys under management and the rate-limit column.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs a real cluster"]
async fn kubectl_get_shows_the_columns_a_person_reads() {
    // Alone: the account's columns are its status.
    let c = Cluster::start_exclusive_with(no_tuning).await;
    c.apply_policy(&c.policy(POLICY, &["charge_read"])).await;
    let p = c.wait_policy(POLICY, "Ready", policy_ready).await;
    let status = p.status.clone().unwrap();
    let key = current_key(&p);

    let path = format!(
        "/apis/stripekeys.io/v1alpha1/namespaces/{}/stripekeypolicies",
        c.ns
    );
    // `Last Rotated` is the operator's time (this process), rendered as an age by the server: a
    // runner clock slightly ahead of the cluster's reads `<invalid>` until the server catches up,
    // so the row is polled until past times read as ages ("12s"), never `<invalid>`.
    let table = wait_for("past times shown as ages", || {
        let path = path.clone();
        let c = &c;
        async move {
            let t = c.table(&path).await;
            let ages: Vec<Option<Value>> = ["Last Rotated", "Age"]
                .iter()
                .map(|col| cell(&t, POLICY, col))
                .collect();
            let readable = ages.iter().all(|v| {
                v.as_ref()
                    .and_then(Value::as_str)
                    .is_some_and(|v| !v.is_empty() && !v.starts_with('<'))
            });
            if readable {
                Ok(t)
            } else {
                Err(format!("{ages:?}"))
            }
        }
    })
    .await;
    assert_eq!(
        column_names(&table),
        [
            "Name",
            "Ready",
            "Key",
            "Last Rotated",
            "Next Rotation",
            "Age"
        ]
    );
    assert_eq!(column(&table, "Next Rotation")["type"], "string");
    assert_eq!(column(&table, "Last Rotated")["type"], "date");
    assert_eq!(cell(&table, POLICY, "Ready"), Some(json!("True")));
    assert_eq!(cell(&table, POLICY, "Key"), Some(json!(key.id)));
    let next = cell(&table, POLICY, "Next Rotation").expect("the policy's row");
    let next = next
        .as_str()
        .unwrap_or_else(|| panic!("a text cell: {next}"));
    let at: k8s_openapi::jiff::Timestamp = next
        .parse()
        .unwrap_or_else(|e| panic!("Next Rotation {next:?} is no RFC 3339 time: {e}"));
    assert_eq!(at, status.next_rotation_at.clone().unwrap().0);
    assert!(
        at > k8s_openapi::jiff::Timestamp::now(),
        "the next rotation lies ahead: {next}"
    );
    // The account: health, keys under management (this test's policy), the rate-limit column.
    let path = format!("/apis/stripekeys.io/v1alpha1/stripeaccounts/{}", c.account);
    let table = wait_for("the account's row: Ready, Closed, one key", || {
        let path = path.clone();
        let c = &c;
        async move {
            let t = c.table(&path).await;
            let want = [
                ("Ready", json!("True")),
                ("Reason", json!("Ready")),
                ("Circuit", json!("Closed")),
                ("Keys", json!(1)),
            ];
            if want
                .iter()
                .all(|(col, v)| cell(&t, &c.account, col).as_ref() == Some(v))
            {
                Ok(t)
            } else {
                Err(format!("{:#}", t["rows"]))
            }
        }
    })
    .await;
    assert_eq!(
        column_names(&table),
        [
            "Name",
            "Mode",
            "Context",
            "Ready",
            "Reason",
            "Circuit",
            "Rate Limited Until",
            "Keys",
            "Unmanaged",
            "Last Checked",
            "Encryption Key",
            "Age"
        ]
    );
    assert_eq!(cell(&table, &c.account, "Mode"), Some(json!("test")));
    assert_eq!(
        cell(&table, &c.account, "Context"),
        Some(json!(c.account_id))
    );
    let rate = column(&table, "Rate Limited Until");
    assert_eq!(rate["type"], "string", "a future time stays readable");
    assert_eq!(rate["priority"], 0, "shown without -o wide");
    assert_eq!(
        cell(&table, &c.account, "Rate Limited Until"),
        Some(Value::Null),
        "not rate limited"
    );
    assert_eq!(column(&table, "Keys")["type"], "integer");
    for wide in ["Last Checked", "Encryption Key"] {
        assert_eq!(
            column(&table, wide)["priority"],
            1,
            "{wide} only with -o wide"
        );
    }

    // Stripe answers 429 with Retry-After: while the pause lasts, the column holds the time it
    // ends, ahead of now, as text a person reads (a `date` column would print `<invalid>`).
    c.sim.inject_fault(FaultSpec::next(
        1,
        FaultKind::RateLimited {
            retry_after_secs: Some(30),
        },
    ));
    c.annotate_policy(POLICY, json!({"stripekeys.io/rotate": "rate-limited"}))
        .await;
    let until = wait_for("the Rate Limited Until column filled", || async {
        let t = c.table(&path).await;
        match cell(&t, &c.account, "Rate Limited Until") {
            Some(Value::String(until)) => Ok(until),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let until_at: k8s_openapi::jiff::Timestamp = until
        .parse()
        .unwrap_or_else(|e| panic!("Rate Limited Until {until:?} is no RFC 3339 time: {e}"));
    assert!(
        until_at > k8s_openapi::jiff::Timestamp::now(),
        "the pause lies ahead: {until}"
    );
    // Once the pause is over the column is cleared and the rotation goes through.
    wait_for("the Rate Limited Until column cleared", || async {
        let t = c.table(&path).await;
        match cell(&t, &c.account, "Rate Limited Until") {
            Some(Value::Null) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    c.wait_policy(
        POLICY,
        "the key minted after the pause (overlapping)",
        policy_in_phase(RotationPhase::Overlapping),
    )
    .await;
}

/// Usage-aware expiry's ceiling: an old key that stays in use is held, but no longer than
/// `maxHold` after the rollout; then it is expired anyway (Warning Event `OldKeyHoldCeiling`).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs a real cluster"]
async fn an_old_key_that_stays_in_use_is_expired_at_the_hold_ceiling() {
    let c = Cluster::start_with(|config| {
        config.last_used_lag = Duration::from_secs(10 * MIN);
        config.key_usage_check_interval = Duration::from_secs(15 * MIN);
    })
    .await;
    let mut m = c.policy(POLICY, &["charge_read"]);
    m["spec"]["rotation"]["usageAwareExpiry"] =
        json!({"quietPeriod": "30m", "maxHold": "2h", "unusedAfter": "1h"});
    c.apply_policy(&m).await;
    let first = current_key(&c.wait_policy(POLICY, "Ready", policy_ready).await);
    c.wait_rolled(POLICY_ANNOTATION, &first.fingerprint).await;
    c.annotate_policy(POLICY, json!({"stripekeys.io/rotate": "usage-ceiling"}))
        .await;
    c.wait_policy(
        POLICY,
        "Overlapping",
        policy_in_phase(RotationPhase::Overlapping),
    )
    .await;
    let secret = c.secret(POLICY_SECRET).await.expect("Secret synced");
    let old_token = secret_value(&secret, "STRIPE_API_KEY_PREVIOUS").expect("old key published");
    c.advance_both(Duration::from_secs(40 * MIN));
    c.use_key("/v1/charges", &old_token).await;
    c.advance_both(Duration::from_secs(21 * MIN)); // rollout + 61m: the overlap has ended
    c.nudge_policy(POLICY).await;
    c.wait_policy(POLICY, "the old key held", |p| {
        policy_condition(p, "Degraded").is_some_and(|d| d.1 == "OldKeyStillInUse")
    })
    .await;
    // It stays in use...
    for _ in 0..3 {
        c.advance_both(Duration::from_secs(19 * MIN));
        c.use_key("/v1/charges", &old_token).await;
        for _ in 0..2 {
            c.nudge_policy(POLICY).await;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        assert_eq!(c.key_status(&first.id), "active", "held while in use");
    }
    // ...past the ceiling, 2h after the rollout (+122m).
    c.advance_both(Duration::from_secs(4 * MIN));
    c.nudge_policy(POLICY).await;
    let p = c
        .wait_policy(POLICY, "the rotation finished", policy_settled)
        .await;
    assert_eq!(c.key_status(&first.id), "expired", "expired at the ceiling");
    assert_eq!(c.active_keys().len(), 1);
    assert_eq!(c.active_keys()[0].id, current_key(&p).id);
    c.wait_event("StripeKeyPolicy", POLICY, "Warning", "OldKeyHoldCeiling")
        .await;
}

/// Shards of the sharded scenario, and the lease timing of its replicas.
const SHARDS: u32 = 4;
const SHARD_LEASE: Duration = Duration::from_secs(10);
const SHARD_PREFIX: &str = "sko-e2e";

/// Records the idempotency keys of the key creations one replica sent to Stripe
/// (`sko:<policy uid>:<rotation>:mint`): which replica minted which policy's key.
#[derive(Default)]
struct MintRecorder(std::sync::Mutex<Vec<String>>);

impl stripe_key_operator::stripe::client::CallObserver for MintRecorder {
    fn on_call(&self, record: &stripe_key_operator::stripe::client::CallRecord) {
        if record.method == "POST"
            && record.path == "/v2/iam/api_keys"
            && let Some(key) = &record.idempotency_key
        {
            self.0.lock().unwrap().push(key.clone());
        }
    }
}

impl MintRecorder {
    /// Whether this replica sent a key creation for the policy `uid`.
    fn minted(&self, uid: &str) -> bool {
        self.0
            .lock()
            .unwrap()
            .iter()
            .any(|k| k.split(':').nth(1) == Some(uid))
    }
}

/// One in-process replica of a sharded operator.
struct Replica {
    identity: String,
    shards: Arc<stripe_key_operator::shard::Shards>,
    mints: Arc<MintRecorder>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Cluster {
    /// A further tenant namespace served by the account and watched (call before starting the
    /// controllers).
    async fn add_served_namespace(&mut self, name: &str) {
        self.created.namespaces.push(name.to_string());
        self.apply_namespace(
            name,
            json!({TEST_LABEL: self.suffix, ACCOUNT_LABEL: self.account}),
        )
        .await;
        self.watched.push(name.to_string());
    }

    /// Starts a replica of a sharded operator: its own context (cold caches, its own identity)
    /// and its shard lease manager in one task. Cancelling `stop` shuts it down gracefully (its
    /// shards are given up); aborting the task is a crash (its leases are left to expire).
    fn start_replica(&self, identity: &str) -> Replica {
        let mut config = ControllerConfig::new(
            self.operator_ns.clone(),
            StorePrefix::new(STORE_PREFIX).expect("valid prefix"),
        );
        config.rollout_ceiling = Duration::from_secs(120);
        config.rollout_poll = Duration::from_millis(500);
        config.error_backoff = Duration::from_secs(1);
        config.resync = Duration::from_secs(60);
        config.stripe_timeout = Some(Duration::from_secs(5));
        config.api_hosts = stripe_key_operator::rules::ApiHosts::stripe_only().with_loopback();
        let shards = Arc::new(stripe_key_operator::shard::Shards::new(SHARDS, identity));
        let mints = Arc::new(MintRecorder::default());
        let ctx = Arc::new(
            Context::new(
                self.client.clone(),
                self.store.clone(),
                Metrics::new(),
                Arc::new(self.clock.clone()),
                config,
                Some(mints.clone()),
            )
            .with_shards(shards.clone()),
        );
        let manager = stripe_key_operator::shard::ShardManager::new(
            self.client.clone(),
            stripe_key_operator::shard::ShardConfig {
                namespace: self.operator_ns.clone(),
                prefix: SHARD_PREFIX.to_string(),
                identity: identity.to_string(),
                shards: SHARDS,
                lease_duration: SHARD_LEASE,
                renew_deadline: Duration::from_secs(6),
                retry_period: Duration::from_secs(1),
            },
            shards.clone(),
        );
        let stop = CancellationToken::new();
        let namespaces = self.watched.clone();
        let task = tokio::spawn({
            let stop = stop.clone();
            async move {
                // One task: aborting it drops the controllers and the lease manager together,
                // as a killed process would (nothing is given up).
                let controllers = async {
                    run_controllers(ctx, &namespaces, stop.clone()).await;
                };
                tokio::join!(controllers, manager.run(stop.clone()));
            }
        });
        Replica {
            identity: identity.to_string(),
            shards,
            mints,
            stop,
            task,
        }
    }

    /// The holder each shard Lease names (`None`: free or given up).
    async fn shard_holders(&self) -> Vec<Option<String>> {
        let api: Api<k8s_openapi::api::coordination::v1::Lease> =
            Api::namespaced(self.client.clone(), &self.operator_ns);
        let mut out = Vec::new();
        for i in 0..SHARDS {
            out.push(
                api.get_opt(&format!("{SHARD_PREFIX}-shard-{i}"))
                    .await
                    .expect("reading a shard Lease")
                    .and_then(|l| l.spec?.holder_identity)
                    .filter(|h| !h.is_empty()),
            );
        }
        out
    }
}

/// Sharding through real Leases: two replicas (in-process, each with its own context and shard
/// lease manager) split four shards two and two; 20 policies in four namespaces (one per shard)
/// all become Ready, each minted once, by the replica holding its namespace's shard. One replica
/// is killed: its Leases expire and the other takes its shards within the lease duration plus
/// a few retry periods, and an incident rotation of a policy in a moved shard completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs a real cluster"]
async fn sharded_replicas_split_the_policies_and_take_over_a_killed_replicas_shards() {
    use stripe_key_operator::shard::shard_of;
    let mut c = Cluster::start_without_operator().await;
    // One namespace per shard, so that both replicas have work and a kill moves some.
    let mut tenants: Vec<Option<String>> = vec![None; SHARDS as usize];
    for i in 0.. {
        let name = format!("sko-e2e-{}-t{i}", c.suffix);
        let slot = &mut tenants[shard_of(&name, SHARDS) as usize];
        if slot.is_none() {
            *slot = Some(name);
        }
        if tenants.iter().all(Option::is_some) {
            break;
        }
    }
    let tenants: Vec<String> = tenants.into_iter().map(Option::unwrap).collect();
    for ns in &tenants {
        c.add_served_namespace(ns).await;
    }
    let a = c.start_replica("replica-a");
    let b = c.start_replica("replica-b");
    let identities = [a.identity.clone(), b.identity.clone()];
    wait_for("the shards split two and two", || async {
        let h = c.shard_holders().await;
        let count = |who: &str| h.iter().filter(|x| x.as_deref() == Some(who)).count();
        if count(&identities[0]) == 2 && count(&identities[1]) == 2 {
            Ok(())
        } else {
            Err(format!("{h:?}"))
        }
    })
    .await;

    let per_namespace = 20 / tenants.len();
    for ns in &tenants {
        for i in 0..per_namespace {
            let mut m = c.policy(&format!("p{i}"), &["charge_read"]);
            m["metadata"]["namespace"] = json!(ns);
            m["spec"]["delivery"]["rolloutTargets"] = json!([]);
            c.apply_policy(&m).await;
        }
    }
    let mut policies = Vec::new();
    for ns in &tenants {
        for i in 0..per_namespace {
            policies.push(
                c.wait_policy_in(ns, &format!("p{i}"), "Ready", policy_ready)
                    .await,
            );
        }
    }
    assert_eq!(policies.len(), 20);
    let holders = c.shard_holders().await;
    for p in &policies {
        let ns = p.metadata.namespace.clone().unwrap();
        let uid = p.metadata.uid.clone().unwrap();
        let shard = shard_of(&ns, SHARDS) as usize;
        let holder = holders[shard].clone().expect("the shard is held");
        let minted_by: Vec<&str> = [&a, &b]
            .iter()
            .filter(|r| r.mints.minted(&uid))
            .map(|r| r.identity.as_str())
            .collect();
        assert_eq!(
            minted_by,
            [holder.as_str()],
            "{ns}/{}: minted by the holder of shard {shard} only",
            p.name_any()
        );
        let r = if holder == a.identity { &a } else { &b };
        assert!(
            r.shards.holds(shard as u32),
            "{holder} acts on shard {shard}"
        );
    }
    let keys: std::collections::BTreeSet<String> =
        policies.iter().map(|p| current_key(p).id).collect();
    assert_eq!(keys.len(), 20, "one key per policy");
    assert_eq!(
        c.active_keys().len(),
        20,
        "none minted twice: {:#?}",
        c.sim_keys()
    );

    // Replica a dies without giving anything up: its Leases expire, b takes its shards.
    let moved: Vec<usize> = holders
        .iter()
        .enumerate()
        .filter(|(_, h)| h.as_deref() == Some(a.identity.as_str()))
        .map(|(i, _)| i)
        .collect();
    assert_eq!(moved.len(), 2);
    a.task.abort();
    let _ = a.task.await;
    let killed = Instant::now();
    wait_for("a's shards taken over by b", || async {
        let h = c.shard_holders().await;
        if h.iter().all(|x| x.as_deref() == Some(b.identity.as_str())) && b.shards.held().len() == 4
        {
            Ok(())
        } else {
            Err(format!("{h:?}, b acts on {:?}", b.shards.held()))
        }
    })
    .await;
    let took = killed.elapsed();
    assert!(
        took < SHARD_LEASE * 2,
        "the shards moved within the lease duration plus a few retry periods ({took:?})"
    );

    // An incident rotation of a policy in a moved shard is carried out by b.
    let ns = &tenants[moved[0]];
    let before = current_key(&c.wait_policy_in(ns, "p0", "Ready", policy_ready).await);
    Api::<StripeKeyPolicy>::namespaced(c.client.clone(), ns)
        .patch(
            "p0",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {
                "stripekeys.io/rotate": "after-kill",
                "stripekeys.io/rotate-reason": "incident"}}})),
        )
        .await
        .unwrap();
    let p = c
        .wait_policy_in(
            ns,
            "p0",
            "the incident handled",
            incident_done("after-kill"),
        )
        .await;
    assert_ne!(current_key(&p).id, before.id);
    assert_eq!(c.key_status(&before.id), "expired");
    assert!(
        b.mints.minted(&p.metadata.uid.clone().unwrap()),
        "b minted the new key"
    );
    // b stays as the operator: the cleanup deletes the policies while it runs.
    c.operator = Some((b.stop, b.task));
}
