//! A whole local installation in one process: the Kubernetes API for tests, the Stripe
//! simulator, the in-memory secret store and the real controllers. The `sandbox` command and the
//! controller integration tests both stand on it.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::GroupVersionKind;
use kube::discovery::{self, Scope};
use kube_test_api::{ServerConfig, TestApiServer};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::api::FIELD_MANAGER;
use crate::controller::clock::ManualClock;
use crate::controller::{Context, ControllerConfig, CrashHook, run_controllers};
use crate::metrics::Metrics;
use crate::rules::{ApiHosts, CREDENTIAL_LABEL, CREDENTIAL_LABEL_VALUE};
use crate::sim::{SimConfig, SimHandle, Simulator};
use crate::stripe::{CallObserver, Mode};
use crate::vault::{MemoryStore, StorePrefix};

/// The operator's namespace in the local environment.
pub const OPERATOR_NAMESPACE: &str = "stripe-key-operator";
/// The Secret (in the operator's namespace) holding the simulator's app key.
pub const APP_KEY_SECRET: &str = "stripe-app-payments-test";

/// Settings of a local environment.
#[derive(Clone)]
pub struct EnvOptions {
    /// Time from a workload change to all replicas ready.
    pub rollout_delay: Duration,
    /// Requests per second the simulator allows a test-mode account (Stripe: 25).
    pub sim_rate_limit_test: u32,
    /// Controller tunables (the store prefix and namespace are set by the environment).
    pub rollout_ceiling: Duration,
    pub rollout_poll: Duration,
    pub error_backoff: Duration,
    pub resync: Duration,
    pub stripe_timeout: Duration,
    /// Retry behaviour of the operator's Stripe calls (`None`: the client's default).
    pub stripe_retry: Option<crate::stripe::RetryPolicy>,
    /// Sees every Stripe call (besides the metrics and the audit log).
    pub stripe_observer: Option<Arc<dyn CallObserver>>,
    /// The audit log the operator writes (disabled when `None`).
    pub audit: Option<crate::audit::AuditLog>,
    /// The secret store the operator uses instead of the in-memory one (e.g. a Vault store).
    pub store: Option<Arc<dyn crate::vault::SecretStore>>,
    /// Let StripeAccounts name any loopback API base (the simulator listens on 127.0.0.1).
    /// `false`: only the simulator's own `127.0.0.1:<port>` is allowed, as a production
    /// operator allows only Stripe's host.
    pub allow_loopback_api: bool,
    /// The operator's `--last-used-lag`.
    pub last_used_lag: Duration,
    /// The operator's `--key-usage-check-interval`.
    pub key_usage_check_interval: Duration,
    /// The operator's `--activity-log-interval`. Zero (the default here): the activity-log
    /// reader is off, so tests that count Stripe calls see none of its reads.
    pub activity_log_interval: Duration,
}

impl Default for EnvOptions {
    fn default() -> Self {
        Self {
            rollout_delay: Duration::from_millis(300),
            sim_rate_limit_test: 25,
            rollout_ceiling: Duration::from_secs(30),
            rollout_poll: Duration::from_millis(200),
            error_backoff: Duration::from_millis(500),
            resync: Duration::from_secs(60),
            stripe_timeout: Duration::from_secs(5),
            stripe_retry: None,
            stripe_observer: None,
            audit: None,
            store: None,
            allow_loopback_api: true,
            last_used_lag: crate::controller::DEFAULT_LAST_USED_LAG,
            key_usage_check_interval: crate::controller::DEFAULT_KEY_USAGE_CHECK_INTERVAL,
            activity_log_interval: Duration::ZERO,
        }
    }
}

/// A running local installation.
pub struct LocalEnv {
    pub api: TestApiServer,
    pub client: kube::Client,
    pub sim: SimHandle,
    /// The in-memory store (used unless [`EnvOptions::store`] names another one).
    pub store: Arc<MemoryStore>,
    pub clock: ManualClock,
    pub metrics: Metrics,
    pub crash: Arc<CrashHook>,
    /// The simulator account id (`acct_...`).
    pub account_id: String,
    options: EnvOptions,
    operator: Option<(CancellationToken, tokio::task::JoinHandle<()>, Arc<Context>)>,
}

impl LocalEnv {
    /// Starts the API server (with the CRDs and the operator's namespace), the simulator and the
    /// store. The operator itself starts with [`LocalEnv::start_operator`].
    pub async fn start(options: EnvOptions) -> anyhow::Result<Self> {
        crate::controller::install_crypto_provider();
        let api = TestApiServer::start_with(ServerConfig {
            rollout_delay: options.rollout_delay,
            ..Default::default()
        })
        .await
        .context("starting the Kubernetes API for tests")?;
        let client = kube::Client::try_from(kube::Config::new(api.url().parse()?))?;
        let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
        for crd in crate::api::crds() {
            crds.create(&PostParams::default(), &crd)
                .await
                .context("creating a CRD")?;
        }
        let sim = Simulator::start(SimConfig {
            rate_limit_test: options.sim_rate_limit_test,
            ..SimConfig::new().with_account(format!("acct_1Sandbox{}", rand_suffix()), Mode::Test)
        })
        .await?;
        let account_id = sim.accounts()[0].id.clone();
        let env = Self {
            api,
            client,
            store: Arc::new(MemoryStore::default()),
            clock: ManualClock::new(),
            metrics: Metrics::new(),
            crash: Arc::new(CrashHook::default()),
            account_id,
            sim,
            options,
            operator: None,
        };
        env.apply_json(&json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": OPERATOR_NAMESPACE}}))
            .await?;
        let key = env.sim.app_key().expose().to_string();
        env.apply_json(&json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": APP_KEY_SECRET, "namespace": OPERATOR_NAMESPACE,
                         "labels": {CREDENTIAL_LABEL: CREDENTIAL_LABEL_VALUE}},
            "stringData": {"secret_key": key},
        }))
        .await?;
        Ok(env)
    }

    /// The StripeAccount manifest that points at the simulator.
    pub fn account_manifest(&self, name: &str, namespace_selector: Value) -> Value {
        json!({
            "apiVersion": "stripekeys.io/v1alpha1", "kind": "StripeAccount",
            "metadata": {"name": name},
            "spec": {
                "mode": "test",
                "context": self.account_id,
                "apiBase": self.sim.base_url(),
                "credentials": {"secretRef": {"name": APP_KEY_SECRET, "key": "secret_key"}},
                "namespaceSelector": namespace_selector,
            }
        })
    }

    /// Starts the controllers with a fresh context (a restart after a crash starts cold too).
    pub fn start_operator(&mut self) {
        let ctx = self.new_context();
        let stop = CancellationToken::new();
        let task = tokio::spawn({
            let ctx = ctx.clone();
            let stop = stop.clone();
            async move { run_controllers(ctx, &[], stop).await }
        });
        self.operator = Some((stop, task, ctx));
    }

    /// A fresh operator context (cold caches, as after a restart) with no controller running:
    /// for tests that call the reconcile functions themselves, step by step.
    pub fn new_context(&self) -> Arc<Context> {
        let mut config = ControllerConfig::new(
            OPERATOR_NAMESPACE,
            StorePrefix::new("stripe-key-operator").expect("valid prefix"),
        );
        config.rollout_ceiling = self.options.rollout_ceiling;
        config.rollout_poll = self.options.rollout_poll;
        config.error_backoff = self.options.error_backoff;
        config.resync = self.options.resync;
        config.last_used_lag = self.options.last_used_lag;
        config.key_usage_check_interval = self.options.key_usage_check_interval;
        config.activity_log_interval = self.options.activity_log_interval;
        config.stripe_timeout = Some(self.options.stripe_timeout);
        config.stripe_retry = self.options.stripe_retry.clone();
        config.crash_hook = Some(self.crash.clone());
        config.api_hosts = self.api_hosts();
        let store: Arc<dyn crate::vault::SecretStore> = match &self.options.store {
            Some(store) => store.clone(),
            None => self.store.clone(),
        };
        let mut ctx = Context::new(
            self.client.clone(),
            store,
            self.metrics.clone(),
            Arc::new(self.clock.clone()),
            config,
            self.options.stripe_observer.clone(),
        );
        if let Some(audit) = &self.options.audit {
            ctx = ctx.with_audit(audit.clone());
        }
        Arc::new(ctx)
    }

    /// The API hosts the operator allows: Stripe's, plus any loopback address (the default) or
    /// only the simulator's `host:port`.
    pub fn api_hosts(&self) -> ApiHosts {
        if self.options.allow_loopback_api {
            return ApiHosts::stripe_only().with_loopback();
        }
        let sim = url::Url::parse(&self.sim.base_url())
            .ok()
            .and_then(|u| Some(format!("{}:{}", u.host_str()?, u.port_or_known_default()?)));
        ApiHosts::new(
            [crate::rules::STRIPE_API_HOST.to_string()]
                .into_iter()
                .chain(sim),
            false,
        )
        .unwrap_or_else(|_| ApiHosts::stripe_only())
    }

    /// The context of the running operator.
    pub fn context(&self) -> Option<Arc<Context>> {
        self.operator.as_ref().map(|(_, _, ctx)| ctx.clone())
    }

    /// Kills the operator at once, as a crash would (no graceful shutdown).
    pub async fn kill_operator(&mut self) {
        if let Some((_, task, _)) = self.operator.take() {
            task.abort();
            let _ = task.await;
        }
    }

    /// Stops the operator gracefully.
    pub async fn stop_operator(&mut self) {
        if let Some((stop, task, _)) = self.operator.take() {
            stop.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
        }
    }

    /// Server-side applies one object (any kind the server serves).
    pub async fn apply_json(&self, obj: &Value) -> anyhow::Result<DynamicObject> {
        let api_version = obj["apiVersion"].as_str().context("apiVersion")?;
        let kind = obj["kind"].as_str().context("kind")?;
        let name = obj["metadata"]["name"].as_str().context("metadata.name")?;
        let (group, version) = match api_version.split_once('/') {
            Some((g, v)) => (g, v),
            None => ("", api_version),
        };
        let gvk = GroupVersionKind::gvk(group, version, kind);
        let (ar, caps) = discovery::pinned_kind(&self.client, &gvk).await?;
        let api: Api<DynamicObject> = match caps.scope {
            Scope::Namespaced => {
                let ns = obj["metadata"]["namespace"].as_str().unwrap_or("default");
                Api::namespaced_with(self.client.clone(), ns, &ar)
            }
            Scope::Cluster => Api::all_with(self.client.clone(), &ar),
        };
        let pp = PatchParams::apply(FIELD_MANAGER).force();
        api.patch(name, &pp, &Patch::Apply(obj))
            .await
            .with_context(|| format!("applying {kind} {name}"))
    }

    /// Server-side applies every document of a YAML stream.
    pub async fn apply_yaml(&self, yaml: &str) -> anyhow::Result<Vec<DynamicObject>> {
        let mut out = Vec::new();
        for doc in serde_yaml::Deserializer::from_str(yaml) {
            let value = Value::deserialize_yaml(doc)?;
            if value.is_null() {
                continue;
            }
            out.push(self.apply_json(&value).await?);
        }
        Ok(out)
    }

    /// A Secret, if present.
    pub async fn secret(&self, namespace: &str, name: &str) -> anyhow::Result<Option<Secret>> {
        let api: Api<Secret> = Api::namespaced(self.client.clone(), namespace);
        Ok(api.get_opt(name).await?)
    }
}

trait DeserializeYaml: Sized {
    fn deserialize_yaml(doc: serde_yaml::Deserializer<'_>) -> anyhow::Result<Self>;
}

impl DeserializeYaml for Value {
    fn deserialize_yaml(doc: serde_yaml::Deserializer<'_>) -> anyhow::Result<Self> {
        use serde::Deserialize;
        Ok(Value::deserialize(doc)?)
    }
}

fn rand_suffix() -> String {
    use rand::Rng;
    let mut rng = rand::rng();
    (0..10)
        .map(|_| char::from(b'A' + rng.random_range(0..26u8)))
        .collect()
}
