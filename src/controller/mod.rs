//! The operator process: configuration, startup checks, leader election, endpoints and the
//! controllers.

pub mod accounts;
pub mod activity;
pub mod caches;
pub mod canary;
pub mod clock;
pub mod crd_check;
pub mod error;
pub mod events;
pub mod holdings;
pub mod keypolicy;
pub mod scheduler;
pub mod shared;
pub mod stripeaccount;
pub mod webhook;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ObjectReference, Secret};
use kube::ResourceExt;
use kube::api::{Api, ListParams};
use kube::runtime::controller::Controller;
use kube::runtime::events::{Event, EventType, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher::{self, watcher};
use tokio_util::sync::CancellationToken;

use crate::stripe::CallObserver;
use crate::vault::{MemoryStore, SecretStore, StorePrefix};

use crate::api::{StripeAccount, StripeGuardrail, StripeKeyPolicy, StripeWebhookEndpoint};
use crate::http::Health;
use crate::leader::{LeaderConfig, LeaderElector};
use crate::metrics::Metrics;
use crate::telemetry::LogFormat;

/// Where credential bundles are kept.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreKind {
    /// HashiCorp Vault (or OpenBao) KV v2: the production choice.
    Vault,
    /// Kubernetes Secrets in the operator's own namespace: for clusters without Vault.
    Kubernetes,
    /// In the operator's memory: only for the local sandbox and tests (lost on restart).
    Memory,
}

/// How the operator logs in to Vault.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum VaultAuthMethod {
    /// The pod's service-account token, exchanged at Vault's Kubernetes auth method.
    Kubernetes,
    /// AppRole role id and secret id.
    Approle,
    /// A fixed token (development only).
    Token,
}

/// Flags and environment of `stripe-key-operator run`.
#[derive(clap::Args, Clone, Debug)]
pub struct RunConfig {
    /// The operator's own namespace: Lease, app-key Secrets, embedded store.
    #[arg(long, env = "POD_NAMESPACE", default_value = "stripe-key-operator")]
    pub namespace: String,
    /// Namespaces to watch, comma-separated. Empty: every namespace (cluster-wide RBAC).
    #[arg(
        long,
        env = "WATCH_NAMESPACES",
        value_delimiter = ',',
        default_value = ""
    )]
    pub watch_namespaces: Vec<String>,
    /// Address of `/metrics`, `/healthz` and `/readyz`.
    #[arg(long, env = "HTTP_ADDR", default_value = "0.0.0.0:8080")]
    pub http_addr: SocketAddr,
    /// Log format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Auto)]
    pub log_format: LogFormat,
    /// Elect a leader among replicas through a Lease (disable only for a single replica).
    #[arg(long, env = "LEADER_ELECT", default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_elect: bool,
    /// Name of the leader Lease.
    #[arg(long, env = "LEASE_NAME", default_value = "stripe-key-operator-leader")]
    pub lease_name: String,
    /// This replica's identity in the Lease (the pod name).
    #[arg(long, env = "POD_NAME")]
    pub pod_name: Option<String>,
    /// How long the leader Lease is valid without renewal (whole seconds): a replica takes a
    /// Lease over once it has seen it unchanged this long.
    #[arg(long, env = "LEASE_DURATION", default_value = "15s", value_parser = humantime::parse_duration)]
    pub lease_duration: Duration,
    /// The leader stops acting once its last successful renewal is older than this, even while a
    /// renewal hangs. Must end well inside `--lease-duration` (at least `--retry-period` and a
    /// fifth of it before) and allow two attempts (at least twice `--retry-period`).
    #[arg(long, env = "RENEW_DEADLINE", default_value = "10s", value_parser = humantime::parse_duration)]
    pub renew_deadline: Duration,
    /// Pause between attempts to take or renew the Lease.
    #[arg(long, env = "RETRY_PERIOD", default_value = "2s", value_parser = humantime::parse_duration)]
    pub retry_period: Duration,
    /// Split the namespaced work into this many shards, each held through its own Lease
    /// `<shard-lease-prefix>-shard-<i>`, so that several replicas share it (by a stable hash of
    /// the namespace; the StripeAccount controller runs on the holder of shard 0). 1: one leader
    /// does everything (the `--lease-name` Lease). Uses the lease timing flags above.
    #[arg(long, env = "SHARDS", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=crate::shard::MAX_SHARDS as i64))]
    pub shards: u32,
    /// Prefix of the shard and membership Lease names (`--shards` > 1).
    #[arg(
        long,
        env = "SHARD_LEASE_PREFIX",
        default_value = "stripe-key-operator"
    )]
    pub shard_lease_prefix: String,
    /// `/healthz` fails when the runtime watchdog (a task that ticks every 5 s) has not ticked
    /// for this long: the async runtime is wedged (at least 15s).
    #[arg(long, env = "HEALTH_RUNTIME_STALL", default_value = "1m", value_parser = humantime::parse_duration)]
    pub health_runtime_stall: Duration,
    /// `/healthz` fails when a controller's watches have kept failing for this long (at least 1m).
    #[arg(long, env = "HEALTH_WATCH_FAILURE", default_value = "5m", value_parser = humantime::parse_duration)]
    pub health_watch_failure: Duration,
    /// `/healthz` fails when a controller had reconciles running and none finished for this long
    /// (at least 1m).
    #[arg(long, env = "HEALTH_RECONCILE_STALL", default_value = "10m", value_parser = humantime::parse_duration)]
    pub health_reconcile_stall: Duration,
    /// Where credential bundles are kept.
    #[arg(long, env = "STORE", value_enum, default_value_t = StoreKind::Vault)]
    pub store: StoreKind,
    /// Vault address.
    #[arg(
        long,
        env = "VAULT_ADDR",
        default_value = "https://vault.vault.svc:8200"
    )]
    pub vault_addr: String,
    /// PEM file of the CA that signs Vault's certificate.
    #[arg(long, env = "VAULT_CACERT")]
    pub vault_ca_cert: Option<std::path::PathBuf>,
    /// How the operator logs in to Vault.
    #[arg(long, env = "VAULT_AUTH", value_enum, default_value_t = VaultAuthMethod::Kubernetes)]
    pub vault_auth: VaultAuthMethod,
    /// Mount path of the auth method (`kubernetes`, `approle`).
    #[arg(long, env = "VAULT_AUTH_MOUNT")]
    pub vault_auth_mount: Option<String>,
    /// Vault role (Kubernetes auth) or AppRole role id.
    #[arg(long, env = "VAULT_ROLE", default_value = "stripe-key-operator")]
    pub vault_role: String,
    /// File of the AppRole secret id.
    #[arg(long, env = "VAULT_SECRET_ID_FILE")]
    pub vault_secret_id_file: Option<std::path::PathBuf>,
    /// Service-account token file for Kubernetes auth.
    #[arg(
        long,
        env = "VAULT_K8S_TOKEN_FILE",
        default_value = "/var/run/secrets/kubernetes.io/serviceaccount/token"
    )]
    pub vault_k8s_token_file: std::path::PathBuf,
    /// Where the audit log goes: `stdout` (separate from the logs, which go to stderr), `off`, or
    /// an append-only file path.
    #[arg(long, env = "AUDIT_LOG", default_value = "stdout")]
    pub audit_log: crate::audit::AuditTarget,
    /// KV v2 mount.
    #[arg(long, env = "VAULT_MOUNT", default_value = "secret")]
    pub vault_mount: String,
    /// Path prefix inside the mount: bundles live at `<prefix>/<namespace>/<kind>/<name>`.
    #[arg(long, env = "VAULT_PREFIX", default_value = "stripe-key-operator")]
    pub vault_prefix: String,
    /// Address of the admission webhooks (HTTPS): `/validate/stripekeys`,
    /// `/validate/no-literal-keys`, `/healthz`. Every replica serves them, leader or not.
    #[arg(long, env = "WEBHOOK_ADDR", default_value = "0.0.0.0:9443")]
    pub webhook_addr: SocketAddr,
    /// Where the webhook's TLS certificate comes from: `self-signed` (a CA and certificate the
    /// operator keeps in the Secret `<webhook-service>-tls` and injects into the
    /// ValidatingWebhookConfiguration), `files` (`tls.crt`/`tls.key` in `--webhook-cert-dir`,
    /// e.g. from cert-manager, reloaded on change) or `disabled` (no webhook server).
    #[arg(long, env = "WEBHOOK_CERT_MODE", value_enum, default_value_t = crate::admission::tls::CertMode::Disabled)]
    pub webhook_cert_mode: crate::admission::tls::CertMode,
    /// Directory of `tls.crt` and `tls.key` (`--webhook-cert-mode=files`).
    #[arg(long, env = "WEBHOOK_CERT_DIR")]
    pub webhook_cert_dir: Option<std::path::PathBuf>,
    /// Name of the webhook's Service in the operator's namespace: the certificate is issued for
    /// `<name>.<namespace>.svc`.
    #[arg(
        long,
        env = "WEBHOOK_SERVICE",
        default_value = "stripe-key-operator-webhook"
    )]
    pub webhook_service: String,
    /// The ValidatingWebhookConfiguration whose `caBundle` the operator keeps
    /// (`--webhook-cert-mode=self-signed`); empty: none.
    #[arg(long, env = "WEBHOOK_CONFIG_NAME")]
    pub webhook_config_name: Option<String>,
    /// The literal-keys webhook also refuses test-mode keys (`sk_test_`, `rk_test_`).
    #[arg(long, env = "WEBHOOK_INCLUDE_TEST_KEYS", default_value_t = false, action = clap::ArgAction::Set)]
    pub webhook_include_test_keys: bool,
    /// Reconciles of StripeKeyPolicies and StripeWebhookEndpoints that run at once, over every
    /// account (at least 1; the StripeAccount controller has as many of its own). Stripe's
    /// per-account rate limit is the real bound on throughput, so a few workers keep it busy.
    #[arg(long, env = "MAX_CONCURRENT_RECONCILES", default_value_t = DEFAULT_CONCURRENCY, value_parser = clap::value_parser!(u16).range(1..))]
    pub max_concurrent_reconciles: u16,
    /// Reconciles of one StripeAccount's resources that run at once (at least 1): an account
    /// whose Stripe calls hang holds at most this many of the `--max-concurrent-reconciles`
    /// workers, and the other accounts share the rest, round-robin.
    #[arg(long, env = "MAX_IN_FLIGHT_PER_ACCOUNT", default_value_t = DEFAULT_IN_FLIGHT_PER_ACCOUNT, value_parser = clap::value_parser!(u16).range(1..))]
    pub max_in_flight_per_account: u16,
    /// Consecutive failed Stripe calls of one account (timeouts, connection errors, 5xx) that
    /// open its circuit breaker: its reconciles then wait without calling Stripe until a probe
    /// call succeeds.
    #[arg(long, env = "CIRCUIT_BREAKER_FAILURES", default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    pub circuit_breaker_failures: u32,
    /// How long an opened circuit breaker waits before its first probe call; it doubles after
    /// each failed probe, up to `--circuit-breaker-max-cooldown`.
    #[arg(long, env = "CIRCUIT_BREAKER_COOLDOWN", default_value = "30s", value_parser = humantime::parse_duration)]
    pub circuit_breaker_cooldown: Duration,
    /// The longest wait between probe calls of an open circuit breaker.
    #[arg(long, env = "CIRCUIT_BREAKER_MAX_COOLDOWN", default_value = "5m", value_parser = humantime::parse_duration)]
    pub circuit_breaker_max_cooldown: Duration,
    /// Hosts a StripeAccount's `apiBase` may name (`host` or `host:port`, comma-separated): the
    /// operator sends an app key nowhere else.
    #[arg(
        long,
        env = "ALLOWED_API_HOSTS",
        value_delimiter = ',',
        default_value = crate::rules::STRIPE_API_HOST
    )]
    pub allowed_api_hosts: Vec<String>,
    /// Also allow loopback API bases (`http://127.0.0.1:...`): for a local simulator only.
    #[arg(long, env = "ALLOW_LOOPBACK_API", default_value_t = false, action = clap::ArgAction::Set)]
    pub allow_loopback_api: bool,
    /// The operator's ServiceAccount name (the chart sets it from the pod spec): requests made
    /// as `system:serviceaccount:<namespace>:<name>` are exempt from the literal-keys webhook.
    /// Unset: nobody is exempt.
    #[arg(long, env = "SERVICE_ACCOUNT_NAME")]
    pub service_account_name: Option<String>,
    /// How long a listing of an account's keys (or webhook endpoints) serves the orphan sweeps
    /// of every resource of that account (e.g. `5m`). Longer: fewer Stripe calls; an orphan is
    /// found at most this long after it appeared, at the next sweep.
    #[arg(long, env = "ORPHAN_SWEEP_INTERVAL", default_value = "5m", value_parser = humantime::parse_duration)]
    pub orphan_sweep_interval: Duration,
    /// How long Stripe may take to show a use of an API key in its `last_used` field, and how
    /// coarse that timestamp may be (usage-aware expiry ignores uses stamped within this long of
    /// a rollout, and waits this much longer before calling a held key quiet). Not documented
    /// by Stripe: a conservative default.
    #[arg(long, env = "LAST_USED_LAG", default_value = "10m", value_parser = humantime::parse_duration)]
    pub last_used_lag: Duration,
    /// How often, at most, the operator asks Stripe whether a current key that showed no use yet
    /// has been used (one retrieve per key and interval, only while it shows none).
    #[arg(long, env = "KEY_USAGE_CHECK_INTERVAL", default_value = "15m", value_parser = humantime::parse_duration)]
    pub key_usage_check_interval: Duration,
    /// How often the operator reads each StripeAccount's Stripe activity log (one read per
    /// account, pages followed back to the last entry handled): a key viewed in the Dashboard,
    /// changed or deleted outside the operator, or created by hand is acted on within this long.
    /// `0s` turns the reader off.
    #[arg(long, env = "ACTIVITY_LOG_INTERVAL", default_value = "1m", value_parser = humantime::parse_duration)]
    pub activity_log_interval: Duration,
    /// How often the canary check looks at the canary keys of each Stripe account (one
    /// listing of the account's keys per interval covers all its canaries; at least 1s).
    #[arg(long, env = "CANARY_CHECK_INTERVAL", default_value = "1m", value_parser = humantime::parse_duration)]
    pub canary_check_interval: Duration,
}

/// Reconciles each controller runs at once unless configured otherwise.
pub const DEFAULT_CONCURRENCY: u16 = 16;
/// Reconciles of one account's resources that run at once unless configured otherwise.
pub const DEFAULT_IN_FLIGHT_PER_ACCOUNT: u16 = 4;
/// How long one listing of an account serves its orphan sweeps unless configured otherwise.
pub const DEFAULT_ORPHAN_SWEEP_INTERVAL: Duration = Duration::from_secs(300);
/// Default of `--last-used-lag`: Stripe documents neither the lag nor the granularity of
/// `last_used`, so ten minutes.
pub const DEFAULT_LAST_USED_LAG: Duration = Duration::from_secs(600);
/// Default of `--key-usage-check-interval`.
pub const DEFAULT_KEY_USAGE_CHECK_INTERVAL: Duration = Duration::from_secs(900);
/// Default of `--activity-log-interval`.
pub const DEFAULT_ACTIVITY_LOG_INTERVAL: Duration = Duration::from_secs(60);

impl RunConfig {
    /// The leader election settings of these flags, validated.
    pub fn leader_config(&self) -> Result<LeaderConfig, RunError> {
        let identity = self.pod_name.clone().unwrap_or_else(default_identity);
        let config = LeaderConfig {
            lease_duration: self.lease_duration,
            renew_deadline: self.renew_deadline,
            retry_period: self.retry_period,
            ..LeaderConfig::new(&self.namespace, &self.lease_name, identity)
        };
        config.validate().map_err(RunError::Settings)?;
        Ok(config)
    }

    /// The sharding settings of these flags, validated; `None` with one shard (a single leader).
    pub fn shard_config(&self) -> Result<Option<crate::shard::ShardConfig>, RunError> {
        if self.shards <= 1 {
            return Ok(None);
        }
        if !self.leader_elect {
            return Err(RunError::Settings(
                "--shards above 1 needs Leases: it cannot be combined with --leader-elect=false"
                    .into(),
            ));
        }
        let config = crate::shard::ShardConfig {
            namespace: self.namespace.clone(),
            prefix: self.shard_lease_prefix.clone(),
            identity: self.pod_name.clone().unwrap_or_else(default_identity),
            shards: self.shards,
            lease_duration: self.lease_duration,
            renew_deadline: self.renew_deadline,
            retry_period: self.retry_period,
        };
        config.validate().map_err(RunError::Settings)?;
        Ok(Some(config))
    }

    /// The `/healthz` thresholds of these flags, validated.
    pub fn health_thresholds(&self) -> Result<crate::http::HealthThresholds, RunError> {
        let minimum = |flag: &str, value: Duration, min: Duration| {
            if value < min {
                Err(RunError::Settings(format!(
                    "--{flag} must be at least {min:?} (got {value:?})"
                )))
            } else {
                Ok(value)
            }
        };
        Ok(crate::http::HealthThresholds {
            runtime_stall: minimum(
                "health-runtime-stall",
                self.health_runtime_stall,
                crate::http::WATCHDOG_TICK * 3,
            )?,
            watch_failure: minimum(
                "health-watch-failure",
                self.health_watch_failure,
                Duration::from_secs(60),
            )?,
            reconcile_stall: minimum(
                "health-reconcile-stall",
                self.health_reconcile_stall,
                Duration::from_secs(60),
            )?,
            ..Default::default()
        })
    }

    /// The account trust settings of these flags (allowed API hosts, namespace, store prefix).
    pub fn account_trust(&self) -> Result<crate::rules::AccountTrust, RunError> {
        Ok(crate::rules::AccountTrust {
            api_hosts: crate::rules::ApiHosts::new(
                &self.allowed_api_hosts,
                self.allow_loopback_api,
            )
            .map_err(RunError::Settings)?,
            operator_namespace: self.namespace.clone(),
            store_prefix: StorePrefix::new(&self.vault_prefix)?,
        })
    }

    /// The admission webhook settings of these flags.
    pub fn webhook_config(&self) -> Result<crate::admission::server::WebhookConfig, RunError> {
        Ok(crate::admission::server::WebhookConfig {
            addr: self.webhook_addr,
            cert_mode: self.webhook_cert_mode,
            cert_dir: self.webhook_cert_dir.clone(),
            namespace: self.namespace.clone(),
            service: self.webhook_service.clone(),
            config_name: self.webhook_config_name.clone().filter(|n| !n.is_empty()),
            include_test_keys: self.webhook_include_test_keys,
            exempt_username: self
                .service_account_name
                .as_deref()
                .filter(|n| !n.is_empty())
                .map(|sa| crate::admission::service_account_username(&self.namespace, sa)),
            account_trust: self.account_trust()?,
            check_interval: Duration::from_secs(60),
        })
    }
}

/// Tunables of the controllers.
#[derive(Clone, Debug)]
pub struct ControllerConfig {
    /// The operator's own namespace.
    pub operator_namespace: String,
    /// The store prefix: bundles live at `<prefix>/<namespace>/<kind>/<name>`.
    pub store_prefix: StorePrefix,
    /// Timeout of one Stripe HTTP attempt (`None`: the client's default).
    pub stripe_timeout: Option<Duration>,
    /// Retry behaviour of Stripe calls (`None`: the client's default).
    pub stripe_retry: Option<crate::stripe::RetryPolicy>,
    /// Requeue delay after a failed reconcile.
    pub error_backoff: Duration,
    /// How long a rollout target may hold the old key before the rotation goes on without it.
    pub rollout_ceiling: Duration,
    /// How often a rollout in progress is checked.
    pub rollout_poll: Duration,
    /// Requeue of a settled object (drift checks).
    pub resync: Duration,
    /// Test hook: makes the controller stop right after a named side effect, as a crash would.
    pub crash_hook: Option<Arc<CrashHook>>,
    /// Workers of the fair scheduler (credential reconciles at once, every account), and the
    /// StripeAccount controller's concurrency.
    pub concurrency: u16,
    /// Credential reconciles of one StripeAccount at once.
    pub max_in_flight_per_account: u16,
    /// When a Stripe account's circuit breaker opens, and for how long.
    pub breaker: crate::stripe::BreakerSettings,
    /// Hosts a StripeAccount's `apiBase` may name (default: Stripe's API host only).
    pub api_hosts: crate::rules::ApiHosts,
    /// How long one listing of an account's credentials serves every orphan sweep of the
    /// account (see [`crate::rotation::listing`]).
    pub orphan_sweep_interval: Duration,
    /// How long Stripe may take to show a use in an API key's `last_used` (and how coarse its
    /// timestamps may be). Not documented by Stripe: a conservative default.
    pub last_used_lag: Duration,
    /// How often the unused-current-key check asks Stripe about one key at most.
    pub key_usage_check_interval: Duration,
    /// How often each account's Stripe activity log is read (zero: never).
    pub activity_log_interval: Duration,
    /// How often the canary check lists each account's keys (see [`canary`]).
    pub canary_check_interval: Duration,
}

/// A test hook that simulates a crash right after a side effect and before its status write.
/// Points: `minted`, `stored`, `synced`, `rolled`, `expired`.
#[derive(Debug, Default)]
pub struct CrashHook {
    at: std::sync::Mutex<Option<String>>,
    hits: std::sync::atomic::AtomicU32,
}

impl CrashHook {
    /// Arms the hook for one `point`.
    pub fn arm(&self, point: &str) {
        *self.at.lock().unwrap_or_else(|e| e.into_inner()) = Some(point.to_string());
    }

    /// How many times the hook fired.
    pub fn hits(&self) -> u32 {
        self.hits.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Fails (once) when armed for `point`.
    pub fn check(&self, point: &str) -> Result<(), error::ReconcileError> {
        let mut at = self.at.lock().unwrap_or_else(|e| e.into_inner());
        if at.as_deref() == Some(point) {
            *at = None;
            self.hits.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            return Err(error::ReconcileError::Crash(point.to_string()));
        }
        Ok(())
    }
}

impl ControllerConfig {
    /// Production defaults.
    pub fn new(operator_namespace: impl Into<String>, store_prefix: StorePrefix) -> Self {
        Self {
            operator_namespace: operator_namespace.into(),
            store_prefix,
            stripe_timeout: None,
            stripe_retry: None,
            error_backoff: Duration::from_secs(15),
            rollout_ceiling: Duration::from_secs(3600),
            rollout_poll: Duration::from_secs(5),
            resync: Duration::from_secs(600),
            last_used_lag: DEFAULT_LAST_USED_LAG,
            key_usage_check_interval: DEFAULT_KEY_USAGE_CHECK_INTERVAL,
            activity_log_interval: DEFAULT_ACTIVITY_LOG_INTERVAL,
            canary_check_interval: canary::DEFAULT_CHECK_INTERVAL,
            crash_hook: None,
            concurrency: DEFAULT_CONCURRENCY,
            max_in_flight_per_account: DEFAULT_IN_FLIGHT_PER_ACCOUNT,
            breaker: crate::stripe::BreakerSettings::default(),
            api_hosts: crate::rules::ApiHosts::stripe_only(),
            orphan_sweep_interval: DEFAULT_ORPHAN_SWEEP_INTERVAL,
        }
    }
}

/// What every reconcile shares.
pub struct Context {
    pub client: kube::Client,
    pub store: Arc<dyn SecretStore>,
    pub accounts: accounts::Accounts,
    pub metrics: Metrics,
    pub clock: Arc<dyn clock::Clock>,
    pub config: ControllerConfig,
    /// Sees every Stripe HTTP attempt (metrics and the audit log).
    pub stripe_observer: Option<Arc<dyn CallObserver>>,
    /// The tamper-evident audit log (disabled unless set with [`Context::with_audit`]).
    pub audit: crate::audit::AuditLog,
    /// Publishes Events (with a compact memory of recent ones: see [`events`]).
    recorder: events::EventRecorder,
    /// Stripe accounts (contexts) whose scope catalogue was proven by live probes since start.
    probed_accounts: std::sync::Mutex<std::collections::HashSet<String>>,
    /// Consecutive failed reconciles per object (UID): the error requeue backs off on them.
    failures: std::sync::Mutex<std::collections::HashMap<String, u32>>,
    /// Where the controllers report their progress (`/healthz`).
    pub health: Health,
    /// One listing per Stripe account and credential kind, shared by the orphan sweeps.
    pub listings: crate::rotation::listing::Listings,
    /// The shards this replica holds (`--shards` > 1); `None`: this replica does all the work.
    pub shards: Option<Arc<crate::shard::Shards>>,
    /// Hands the credential controllers' workers to the accounts fairly.
    pub scheduler: Arc<scheduler::FairScheduler>,
    /// The Stripe accounts whose breaker changed state or whose limiter started a pause (the
    /// StripeAccount controller shows it).
    pub health_events: tokio::sync::broadcast::Sender<accounts::ContextKey>,
    /// The watch caches reconciles read (set when the controllers start; unset, every read
    /// goes to the API server).
    caches: std::sync::OnceLock<Arc<caches::Caches>>,
    /// Per resource (UID): the synced Secret it last wrote or found as desired, with the
    /// Secret's resourceVersion then and a digest of what it held. While the Secret cache shows
    /// that resourceVersion and the desired content has that digest, nothing changed and no read
    /// is needed. Forgotten when the resource is deleted.
    synced_secrets: std::sync::Mutex<std::collections::HashMap<u128, SyncedSecret>>,
    /// Per resource (UID): the resourceVersion of this process's last write to it. A reconcile
    /// handed exactly that version by the watch cache needs no fresh read (see
    /// `shared::reconcile_with_finalizer`). Forgotten when the resource is deleted.
    written_versions: std::sync::Mutex<std::collections::HashMap<u128, Box<str>>>,
}

/// The key of a per-resource memo: the resource's UID as the 128-bit number it spells (a UUID),
/// or, for a UID that is not one, two fixed SipHashes of it. At 10,000 policies the two memos
/// held 20,000 UID strings (36 bytes each, in 48-byte allocations, plus the String).
fn uid_key(uid: &str) -> u128 {
    // The hex digits read straight into the number (no copy of the UID per lookup).
    let mut n: u128 = 0;
    let mut digits = 0;
    for c in uid.chars().filter(|c| *c != '-') {
        match c.to_digit(16) {
            Some(d) if digits < 32 => {
                n = (n << 4) | u128::from(d);
                digits += 1;
            }
            _ => {
                digits = 0;
                break;
            }
        }
    }
    if digits == 32 {
        return n;
    }
    use std::hash::{Hash, Hasher};
    let half = |salt: u8| {
        let mut h = std::hash::DefaultHasher::new();
        salt.hash(&mut h);
        uid.hash(&mut h);
        h.finish()
    };
    (u128::from(half(1)) << 64) | u128::from(half(2))
}

/// What a resource last knew its synced Secret to hold (see `Context::synced_secrets`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SyncedSecret {
    pub name: Box<str>,
    pub resource_version: Box<str>,
    pub digest: u64,
}

/// Reports each Stripe HTTP attempt of one reconcile to the metrics and the audit log.
struct CallTelemetry {
    metrics: Metrics,
    audit: Option<crate::audit::StripeAuditObserver>,
    extra: Option<Arc<dyn CallObserver>>,
}

/// The path of a Stripe call with object ids replaced by `{id}` (bounded metric cardinality).
pub fn stripe_route(path: &str) -> String {
    let mut out = Vec::new();
    let mut previous = "";
    for segment in path.split('/') {
        if matches!(previous, "api_keys" | "webhook_endpoints" | "activity_logs")
            && !segment.is_empty()
        {
            out.push("{id}");
        } else {
            out.push(segment);
        }
        previous = segment;
    }
    out.join("/")
}

impl CallObserver for CallTelemetry {
    fn on_call(&self, record: &crate::stripe::CallRecord) {
        let code = record
            .status
            .map(|s| s.to_string())
            .unwrap_or_else(|| "error".into());
        self.metrics
            .stripe_requests
            .get_or_create(&crate::metrics::StripeCallLabels {
                account: record.account.clone(),
                method: record.method.clone(),
                route: stripe_route(&record.path),
                code,
            })
            .inc();
        if let Some(audit) = &self.audit {
            audit.on_call(record);
        }
        if let Some(extra) = &self.extra {
            extra.on_call(record);
        }
    }
}

impl Context {
    pub fn new(
        client: kube::Client,
        store: Arc<dyn SecretStore>,
        metrics: Metrics,
        clock: Arc<dyn clock::Clock>,
        config: ControllerConfig,
        stripe_observer: Option<Arc<dyn CallObserver>>,
    ) -> Self {
        let reporter = Reporter {
            controller: crate::api::MANAGED_BY.into(),
            instance: std::env::var("POD_NAME").ok(),
        };
        let store: Arc<dyn SecretStore> =
            Arc::new(crate::vault::InstrumentedStore::new(store, metrics.clone()));
        let health = Arc::new(
            accounts::StripeHealth::new(config.breaker.clone(), Some(metrics.clone()))
                .with_clock(clock.clone()),
        );
        let scheduler = scheduler::FairScheduler::new(
            usize::from(config.concurrency),
            usize::from(config.max_in_flight_per_account),
            health.clone(),
            Some(metrics.clone()),
        );
        let (health_events, _) = tokio::sync::broadcast::channel(256);
        health.set_listener({
            let scheduler = Arc::downgrade(&scheduler);
            let events = health_events.clone();
            Arc::new(move |key| {
                if let Some(s) = scheduler.upgrade() {
                    s.wake();
                }
                let _ = events.send(key.clone());
            })
        });
        Self {
            recorder: events::EventRecorder::new(client.clone(), reporter),
            client,
            store,
            accounts: accounts::Accounts::new(health),
            scheduler,
            health_events,
            metrics,
            clock,
            config,
            stripe_observer,
            audit: crate::audit::AuditLog::disabled(),
            probed_accounts: Default::default(),
            failures: Default::default(),
            health: Health::default(),
            listings: Default::default(),
            shards: None,
            caches: Default::default(),
            synced_secrets: Default::default(),
            written_versions: Default::default(),
        }
    }

    /// Records that this process wrote resource `uid` last, at `resource_version`.
    pub(crate) fn record_written(&self, uid: &str, resource_version: Option<&str>) {
        let mut map = self
            .written_versions
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        match resource_version {
            Some(rv) => {
                map.insert(uid_key(uid), rv.into());
            }
            None => {
                map.remove(&uid_key(uid));
            }
        }
    }

    /// Whether this process's last write to resource `uid` produced `resource_version`.
    pub(crate) fn wrote_last(&self, uid: &str, resource_version: Option<&str>) -> bool {
        resource_version.is_some_and(|rv| {
            self.written_versions
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&uid_key(uid))
                .is_some_and(|w| &**w == rv)
        })
    }

    /// Forgets what this process remembers of the deleted resource `uid`.
    pub(crate) fn forget_resource(&self, uid: &str) {
        self.record_synced_secret(uid, None);
        self.record_written(uid, None);
        self.record_success(uid);
    }

    /// The watch caches, once the controllers started them.
    pub fn caches(&self) -> Option<&Arc<caches::Caches>> {
        self.caches.get()
    }

    /// Lets reconciles read `caches` instead of the API server (once per context).
    pub fn use_caches(&self, caches: Arc<caches::Caches>) {
        let _ = self.caches.set(caches);
    }

    /// What resource `uid` last knew its synced Secret to hold.
    pub(crate) fn synced_secret(&self, uid: &str) -> Option<SyncedSecret> {
        self.synced_secrets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&uid_key(uid))
            .cloned()
    }

    /// Records what resource `uid`'s synced Secret holds now (`None`: forget it).
    pub(crate) fn record_synced_secret(&self, uid: &str, synced: Option<SyncedSecret>) {
        let mut map = self
            .synced_secrets
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        match synced {
            Some(s) => {
                map.insert(uid_key(uid), s);
            }
            None => {
                map.remove(&uid_key(uid));
            }
        }
    }

    /// The StripeAccount `name`: from the watch cache when the controllers run, else read.
    pub async fn account(&self, name: &str) -> Result<Option<StripeAccount>, kube::Error> {
        if let Some(c) = self.caches() {
            return Ok(c.account(name).map(|a| (*a).clone()));
        }
        Api::<StripeAccount>::all(self.client.clone())
            .get_opt(name)
            .await
    }

    /// Makes the controllers act only on the shards this replica holds.
    pub fn with_shards(mut self, shards: Arc<crate::shard::Shards>) -> Self {
        self.shards = Some(shards);
        self
    }

    /// Sets where the controllers report their progress.
    pub fn with_health(mut self, health: Health) -> Self {
        self.health = health;
        self
    }

    /// Records a failed reconcile of `uid`; returns how many failed in a row before this one.
    pub fn record_failure(&self, uid: &str) -> u32 {
        let mut f = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        let n = f.entry(uid.to_string()).or_insert(0);
        let before = *n;
        *n = n.saturating_add(1);
        before
    }

    /// Forgets the failures of `uid` (it reconciled).
    pub fn record_success(&self, uid: &str) {
        self.failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(uid);
    }

    /// Whether a key of Stripe account `context` passed live scope probes since start.
    pub fn scope_probes_done(&self, context: &str) -> bool {
        self.probed_accounts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(context)
    }

    /// Records that a key of `context` passed live scope probes.
    pub fn record_scope_probe(&self, context: &str) {
        self.probed_accounts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(context.to_string());
    }

    /// Sets the audit log.
    pub fn with_audit(mut self, audit: crate::audit::AuditLog) -> Self {
        self.audit = audit;
        self
    }

    /// An observer for the Stripe calls that `actor` makes: metrics and audit lines.
    pub fn call_observer(&self, actor: crate::audit::Actor) -> Arc<dyn CallObserver> {
        Arc::new(CallTelemetry {
            metrics: self.metrics.clone(),
            audit: self
                .audit
                .is_enabled()
                .then(|| crate::audit::StripeAuditObserver::new(self.audit.clone(), actor)),
            extra: self.stripe_observer.clone(),
        })
    }

    /// Runs the crash hook, if any, at `point`.
    pub fn crash_point(&self, point: &str) -> Result<(), error::ReconcileError> {
        match &self.config.crash_hook {
            Some(hook) => hook.check(point),
            None => Ok(()),
        }
    }

    /// Every StripeGuardrail in the cluster (from the watch cache when the controllers run).
    pub async fn guardrails(&self) -> Result<Vec<crate::api::StripeGuardrail>, kube::Error> {
        if let Some(c) = self.caches() {
            return Ok(c.guardrails().iter().map(|g| (**g).clone()).collect());
        }
        let api: Api<crate::api::StripeGuardrail> = Api::all(self.client.clone());
        Ok(api.list(&ListParams::default()).await?.items)
    }

    /// Records an Event for people (`kubectl describe`). A failure is logged, never fatal.
    /// `note` must hold ids and fingerprints only, never a secret.
    pub async fn publish_event(
        &self,
        reference: &ObjectReference,
        type_: EventType,
        reason: &str,
        action: &str,
        note: String,
    ) {
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: action.into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, reference).await {
            tracing::warn!(error = %e, reason, "could not record an Event");
        }
    }
}

/// Runs every controller until `shutdown` fires.
pub async fn run_controllers(
    ctx: Arc<Context>,
    namespaces: &[String],
    shutdown: CancellationToken,
) {
    let scopes: Vec<Option<String>> = if namespaces.is_empty() {
        vec![None]
    } else {
        namespaces.iter().cloned().map(Some).collect()
    };
    // A JoinSet aborts its tasks when dropped: if this future is dropped or aborted, no
    // controller keeps running behind its back.
    let mut tasks = tokio::task::JoinSet::new();
    // The watch caches the reconciles read; two credential controllers per scope take feeds.
    let (caches, reflectors) = caches::Caches::start(
        &ctx.client,
        &scopes,
        2,
        &format!(
            "{}={}",
            crate::api::MANAGED_BY_LABEL,
            crate::api::MANAGED_BY
        ),
    );
    for reflector in reflectors {
        // The caches stop with the controllers (their stores stay readable, frozen).
        let shutdown = shutdown.clone();
        tasks.spawn(async move {
            tokio::select! {
                _ = reflector => {}
                _ = shutdown.cancelled() => {}
            }
        });
    }
    // A policy is judged only once the caches hold their first listing: an account or a
    // namespace missing from a cache that is still filling must not refuse it.
    tokio::select! {
        _ = caches.wait_until_ready() => {}
        _ = shutdown.cancelled() => return,
    }
    ctx.use_caches(caches);
    match ctx.shards.clone() {
        None => {
            tasks.spawn(stripeaccount::run(
                ctx.clone(),
                scopes.clone(),
                shutdown.clone(),
            ));
            tasks.spawn(canary::run(ctx.clone(), scopes.clone(), shutdown.clone()));
        }
        Some(shards) => {
            tasks.spawn(run_cluster_scoped_on_shard_zero(
                ctx.clone(),
                shards,
                scopes.clone(),
                shutdown.clone(),
            ));
        }
    }
    for ns in scopes {
        let ctx = ctx.clone();
        let shutdown = shutdown.clone();
        tasks.spawn({
            let (ctx, ns, shutdown) = (ctx.clone(), ns.clone(), shutdown.clone());
            async move {
                run_credential_controller::<keypolicy::KeyPolicy>(ctx, ns, shutdown).await
            }
        });
        tasks.spawn(async move {
            run_credential_controller::<webhook::Endpoint>(ctx, ns, shutdown).await
        });
    }
    while tasks.join_next().await.is_some() {}
}

/// Runs the cluster-scoped work (the StripeAccount controller, the canary check) while this
/// replica holds shard 0:
/// it starts when shard 0 is taken and is dropped at once when shard 0 is lost or given up, so
/// one replica at a time checks accounts and guards their deletion.
async fn run_cluster_scoped_on_shard_zero(
    ctx: Arc<Context>,
    shards: Arc<crate::shard::Shards>,
    scopes: Vec<Option<String>>,
    shutdown: CancellationToken,
) {
    let mut acquired = shards.subscribe();
    loop {
        if let Some(fence) = shards.enter_shard(0) {
            tracing::info!("holding shard 0: running the StripeAccount controller");
            ctx.metrics.leader.set(1);
            // The cluster-scoped work: the StripeAccount controller and the canary check.
            let controller = async {
                tokio::join!(
                    stripeaccount::run(ctx.clone(), scopes.clone(), shutdown.clone()),
                    canary::run(ctx.clone(), scopes.clone(), shutdown.clone()),
                );
            };
            let finished = fence.run(controller).await.is_some();
            ctx.metrics.leader.set(0);
            drop(fence);
            if finished || shutdown.is_cancelled() {
                return;
            }
            tracing::warn!("shard 0 is no longer held: the StripeAccount controller stopped");
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            next = acquired.next() => if next.is_none() { return },
        }
    }
}

/// Skips the reconciles of objects whose shard this replica does not hold (before any API call:
/// another replica acts on them), and drops a reconcile at once when its shard is lost or given
/// up, so that nothing more of it reaches Stripe, the store or Kubernetes. Without sharding the
/// reconcile runs as it is.
fn sharded<K, F, Fut>(
    reconcile: F,
) -> impl Fn(
    Arc<K>,
    Arc<Context>,
) -> futures::future::BoxFuture<
    'static,
    Result<kube::runtime::controller::Action, error::ReconcileError>,
>
where
    K: kube::Resource + Send + Sync + 'static,
    F: Fn(Arc<K>, Arc<Context>) -> Fut,
    Fut: std::future::Future<
            Output = Result<kube::runtime::controller::Action, error::ReconcileError>,
        > + Send
        + 'static,
{
    use futures::FutureExt;
    move |obj, ctx| {
        let Some(shards) = ctx.shards.clone() else {
            return reconcile(obj, ctx).boxed();
        };
        let namespace = obj.meta().namespace.clone();
        let name = obj.meta().name.clone().unwrap_or_default();
        let Some(fence) = shards.enter_object(namespace.as_deref(), &name) else {
            tracing::debug!(target: "stripe_key_operator::shard", namespace = namespace.as_deref().unwrap_or_default(), %name, "skipped: another replica holds the shard");
            return futures::future::ready(Ok(kube::runtime::controller::Action::await_change()))
                .boxed();
        };
        let work = reconcile(obj, ctx);
        async move {
            match fence.run(work).await {
                Some(out) => out,
                None => {
                    tracing::info!(
                        shard = fence.shard(),
                        "shard lost or given up: reconcile dropped"
                    );
                    Ok(kube::runtime::controller::Action::await_change())
                }
            }
        }
        .boxed()
    }
}

/// The kube-runtime settings of a controller: bounded concurrency, and a short debounce so a
/// burst of watch events for one object (its status write, its owned Secret) is one reconcile.
fn controller_config(config: &ControllerConfig) -> kube::runtime::controller::Config {
    kube::runtime::controller::Config::default()
        .concurrency(config.concurrency.max(1))
        .debounce(Duration::from_millis(100))
}

/// Label changes of the watched namespaces (a metadata-only watch): an account's
/// `namespaceSelector` is judged on them, so a relabelled namespace is re-judged at once.
fn namespace_watch(
    client: &kube::Client,
    namespace: &Option<String>,
) -> impl futures::Stream<
    Item = Result<
        kube::core::PartialObjectMeta<k8s_openapi::api::core::v1::Namespace>,
        watcher::Error,
    >,
> + Send
+ 'static {
    use kube::runtime::WatchStreamExt;
    let config = match namespace {
        Some(ns) => watcher::Config::default().fields(&format!("metadata.name={ns}")),
        None => watcher::Config::default(),
    };
    watcher(
        Api::<kube::core::PartialObjectMeta<k8s_openapi::api::core::v1::Namespace>>::all(
            client.clone(),
        ),
        config,
    )
    .default_backoff()
    .touched_objects()
}

/// Wraps a reconcile function so that `progress` sees each reconcile start and end (an aborted
/// one ends too).
fn tracked<K, F, Fut>(
    progress: crate::http::ControllerProgress,
    reconcile: F,
) -> impl Fn(Arc<K>, Arc<Context>) -> futures::future::BoxFuture<'static, Fut::Output>
+ Clone
+ Send
+ Sync
+ 'static
where
    F: Fn(Arc<K>, Arc<Context>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future + Send + 'static,
{
    move |obj, ctx| {
        let guard = progress.reconcile_started();
        let fut = reconcile(obj, ctx);
        Box::pin(async move {
            let out = fut.await;
            drop(guard);
            out
        })
    }
}

/// What a controller's stream yields: a finished reconcile, or an error (a watch's, a
/// reconcile's).
type ControllerResult<K, E> = Result<
    (ObjectRef<K>, kube::runtime::controller::Action),
    kube::runtime::controller::Error<E, watcher::Error>,
>;

/// Reports the watch errors a controller's stream yields to `progress` (`/healthz`).
fn report_watch_errors<K, E>(
    progress: crate::http::ControllerProgress,
    thresholds: crate::http::HealthThresholds,
) -> impl FnMut(ControllerResult<K, E>) -> futures::future::Ready<()>
where
    K: kube::Resource,
{
    move |result| {
        if let Err(kube::runtime::controller::Error::QueueError(e)) = &result {
            tracing::warn!(error = %e, "watch failed; retrying");
            progress.watch_error(&thresholds);
        }
        futures::future::ready(())
    }
}

/// Spec changes of the StripeAccounts (generation), without their status: the account
/// controller writes status every few minutes, which must not reconcile every policy of it.
fn account_spec_watch(
    client: &kube::Client,
) -> impl futures::Stream<Item = Result<StripeAccount, watcher::Error>> + Send + 'static {
    use kube::runtime::{PredicateConfig, WatchStreamExt, predicates};
    watcher(
        Api::<StripeAccount>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .touched_objects()
    .predicate_filter(predicates::generation, PredicateConfig::default())
}

/// The controller of one credential kind for one namespace (or all): the engine reconciles
/// each resource; it owns the Secrets labelled with its owner kind, and watches namespace
/// labels, accounts and guardrails (each can change whether a resource is admitted).
pub async fn run_credential_controller<C: crate::rotation::engine::Credential>(
    ctx: Arc<Context>,
    namespace: Option<String>,
    shutdown: CancellationToken,
) {
    use crate::rotation::engine;
    let client = ctx.client.clone();
    let (resources, secrets): (Api<C::Resource>, Api<Secret>) = match &namespace {
        Some(ns) => (
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client.clone(), ns),
        ),
        None => (Api::all(client.clone()), Api::all(client.clone())),
    };
    let owned = watcher::Config::default().labels(&format!(
        "{}={},{}={}",
        crate::api::MANAGED_BY_LABEL,
        crate::api::MANAGED_BY,
        crate::inject::OWNER_KIND_LABEL,
        C::NAMES.kind
    ));
    let progress = ctx.health.controller(C::NAMES.controller);
    let thresholds = ctx.health.thresholds();
    // The controller's own cache of its resources, without what no reconcile reads
    // (`managedFields`, `kubectl`'s last-applied copy).
    let writer = kube::runtime::reflector::store::Writer::<C::Resource>::default();
    let reader = writer.as_reader();
    let main_stream = {
        use kube::runtime::WatchStreamExt;
        kube::runtime::reflector::reflector(
            writer,
            watcher(resources, caches::watch_config())
                .default_backoff()
                .modify(|o| caches::strip(kube::Resource::meta_mut(o))),
        )
        .applied_objects()
    };
    // The fair scheduler bounds the reconciles that run (`--max-concurrent-reconciles`, and
    // per account); kube-runtime's own bound would only let one account's waiting reconciles
    // crowd out the others', so it has none.
    let controller = Controller::for_stream(main_stream, reader)
        .with_config(controller_config(&ctx.config).concurrency(0));
    // Beyond a bound of waiting reconciles per account, the rest are parked and triggered
    // again as the account's queue drains (kube-runtime polls every reconcile in progress on
    // each wake-up: 10,000 waiting made that O(n) per event).
    let (overflow, released) = scheduler::Overflow::new(scheduler::MAX_WAITING_PER_ACCOUNT);
    let controller = controller.reconcile_on(released);
    let store = controller.store();
    // A shard taken over: reconcile each of its objects at once.
    let controller = match ctx.shards.clone() {
        Some(shards) => {
            let in_shard = store.clone();
            controller.reconcile_on(shards.subscribe().flat_map(move |shard| {
                let refs: Vec<_> = in_shard
                    .state()
                    .into_iter()
                    .filter(|o| shards.shard_for(o.namespace().as_deref()) == shard)
                    .map(|o| light_ref(&*o))
                    .collect();
                futures::stream::iter(refs)
            }))
        }
        None => controller,
    };
    let by_account = store.clone();
    let all = store.clone();
    let by_namespace = store.clone();
    let namespace_mapper =
        move |ns: kube::core::PartialObjectMeta<k8s_openapi::api::core::v1::Namespace>| {
            let ns = ns.name_any();
            by_namespace
                .state()
                .into_iter()
                .filter(|o| o.namespace().as_deref() == Some(ns.as_str()))
                .map(|o| light_ref(&*o))
                .collect::<Vec<_>>()
        };
    let account_mapper = move |account: StripeAccount| {
        by_account
            .state()
            .into_iter()
            .filter(|o| C::declared(o).account == account.name_any())
            .map(|o| light_ref(&*o))
            .collect::<Vec<_>>()
    };
    let guardrail_mapper = move |_: StripeGuardrail| {
        all.state()
            .into_iter()
            .map(|o| light_ref(&*o))
            .collect::<Vec<_>>()
    };
    let controller = match ctx.caches().and_then(|c| c.take_feeds(&namespace)) {
        // Woken by the watch caches the reconciles read: a change is in the cache before the
        // reconcile it triggers runs.
        Some(feeds) => {
            use kube::runtime::{PredicateConfig, WatchStreamExt, predicates};
            controller
                .owns_stream(feeds.secrets.map(Ok::<_, watcher::Error>))
                .watches_stream(
                    feeds.namespaces.map(Ok::<_, watcher::Error>),
                    namespace_mapper,
                )
                .watches_stream(
                    feeds
                        .accounts
                        .map(Ok::<_, watcher::Error>)
                        .predicate_filter(predicates::generation, PredicateConfig::default()),
                    account_mapper,
                )
                .watches_stream(
                    feeds.guardrails.map(Ok::<_, watcher::Error>),
                    guardrail_mapper,
                )
        }
        None => controller
            .owns(secrets, owned)
            .watches_stream(namespace_watch(&client, &namespace), namespace_mapper)
            .watches_stream(account_spec_watch(&client), account_mapper)
            .watches(
                Api::<StripeGuardrail>::all(client),
                watcher::Config::default(),
                guardrail_mapper,
            ),
    };
    controller
        .graceful_shutdown_on(async move { shutdown.cancelled().await })
        .run(
            // A reconcile of a shard another replica holds is skipped before it queues for a
            // worker; one that waits for a worker is dropped if its shard goes meanwhile.
            sharded(scheduler::admit(
                ctx.scheduler.clone(),
                overflow,
                account_of::<C>,
                |o: &C::Resource| light_ref(o),
                scheduler::fair(
                    ctx.scheduler.clone(),
                    account_of::<C>,
                    tracked(progress.clone(), engine::reconcile::<C>),
                ),
            )),
            engine::error_policy::<C>,
            ctx,
        )
        .for_each(report_watch_errors(progress, thresholds))
        .await;
}

/// A reference to `o` by namespace and name only. kube-runtime compares and hashes references
/// without their `extra` (resourceVersion, uid), so this is the same key to its scheduler and
/// stores; a change that wakes every policy (a guardrail, a shard taken over) then holds
/// 10,000 references in the mapper's list, the scheduler and the parked queue, each without
/// two strings it never reads.
fn light_ref<K: kube::Resource<DynamicType = ()>>(o: &K) -> ObjectRef<K> {
    let meta = o.meta();
    let r = ObjectRef::new(meta.name.as_deref().unwrap_or_default());
    match meta.namespace.as_deref() {
        Some(ns) => r.within(ns),
        None => r,
    }
}

/// The StripeAccount a credential resource names: the fair scheduler's key.
fn account_of<C: crate::rotation::engine::Credential>(obj: &C::Resource) -> String {
    C::declared(obj).account.to_string()
}

/// Startup and runtime errors of the process.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(
        "could not reach the Kubernetes API ({0}); set KUBECONFIG or run inside a cluster with a service account"
    )]
    Config(String),
    #[error(
        "the CustomResourceDefinition of {kind} is not installed: apply crds/stripekeys.io.yaml (or install the Helm chart) first"
    )]
    CrdMissing { kind: &'static str },
    #[error("checking that {kind} is served failed: {source}")]
    CrdCheck {
        kind: &'static str,
        #[source]
        source: kube::Error,
    },
    #[error(transparent)]
    CrdSchema(#[from] crd_check::CrdSchemaError),
    #[error("binding the HTTP endpoints on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Leader(#[from] crate::leader::LeaderError),
    #[error("admission webhook: {0}")]
    Webhook(#[from] crate::admission::server::WebhookError),
    #[error("secret store: {0}")]
    Store(#[from] crate::vault::StoreError),
    #[error("opening the audit log: {0}")]
    Audit(String),
    #[error("invalid setting: {0}")]
    Settings(String),
    #[error(
        "lost the leader lease (another replica may lead now); every reconcile in flight was dropped, exiting so that a restart rejoins the election"
    )]
    LeadershipLost,
}

/// Lists one object through each `Api` to prove the CRD of `kind` is served. 404: not installed.
async fn check_served<K>(apis: Vec<Api<K>>, kind: &'static str) -> Result<(), RunError>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    for api in apis {
        match api.list_metadata(&ListParams::default().limit(1)).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => return Err(RunError::CrdMissing { kind }),
            Err(source) => return Err(RunError::CrdCheck { kind, source }),
        }
    }
    Ok(())
}

/// The `Api`s of a namespaced kind: one per watched namespace, or one for all.
pub fn namespaced_apis<K>(client: &kube::Client, namespaces: &[String]) -> Vec<Api<K>>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    if namespaces.is_empty() {
        vec![Api::all(client.clone())]
    } else {
        namespaces
            .iter()
            .map(|ns| Api::namespaced(client.clone(), ns))
            .collect()
    }
}

/// Fails fast, with a clear message, when a CRD is missing.
pub async fn check_crds(client: &kube::Client, namespaces: &[String]) -> Result<(), RunError> {
    check_served(
        vec![Api::<StripeAccount>::all(client.clone())],
        "StripeAccount",
    )
    .await?;
    check_served(
        vec![Api::<StripeGuardrail>::all(client.clone())],
        "StripeGuardrail",
    )
    .await?;
    check_served(
        namespaced_apis::<StripeKeyPolicy>(client, namespaces),
        "StripeKeyPolicy",
    )
    .await?;
    check_served(
        namespaced_apis::<StripeWebhookEndpoint>(client, namespaces),
        "StripeWebhookEndpoint",
    )
    .await?;
    Ok(())
}

/// Installs the process-wide rustls crypto provider (aws-lc-rs) once; kube and Vault share it.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// Resolves when the process receives SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

/// Runs the operator with a client until `shutdown` fires: checks the CRDs, serves the
/// endpoints, waits for leadership, then runs the controllers until shutdown or lost leadership.
pub async fn run_with_client(
    config: RunConfig,
    client: kube::Client,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let namespaces: Vec<String> = config
        .watch_namespaces
        .iter()
        .filter(|n| !n.is_empty())
        .cloned()
        .collect();
    let webhook_config = config.webhook_config()?;
    let leader_config = config.leader_config()?;
    let shard_config = config.shard_config()?;
    let health = Health::with_thresholds(config.health_thresholds()?);
    check_crds(&client, &namespaces).await?;
    crd_check::check_crd_schemas(&client).await?;
    let metrics = Metrics::new();
    // The watchdog runs for the life of the process, on the runtime it watches.
    let watchdog = AbortOnDrop(tokio::spawn(
        health.clone().run_watchdog(crate::http::WATCHDOG_TICK),
    ));
    let (addr, http_task) = crate::http::serve(
        config.http_addr,
        metrics.clone(),
        health.clone(),
        shutdown.clone(),
    )
    .await
    .map_err(|source| RunError::Bind {
        addr: config.http_addr,
        source,
    })?;
    tracing::info!(%addr, "serving /metrics, /healthz and /readyz");
    // Every replica serves admission (the API server picks any ready endpoint), so the
    // webhook starts before leader election.
    let webhook_task =
        match crate::admission::server::start(&webhook_config, client.clone(), shutdown.clone())
            .await
        {
            Ok(t) => t.map(|(_, task)| task),
            Err(e) => {
                shutdown.cancel();
                let _ = http_task.await;
                return Err(e.into());
            }
        };
    // Ready means "started and able to serve": a standby replica is ready too, so rolling
    // updates and node drains never wait on the leader. Leadership is the `leader` metric.
    health.set_ready(true);

    let leadership = if shard_config.is_some() {
        // Sharding: the shard Leases take the place of the leader Lease.
        None
    } else if config.leader_elect {
        let elector = LeaderElector::new(client.clone(), leader_config);
        tracing::info!(lease = %config.lease_name, namespace = %config.namespace, "waiting for the leader lease");
        match elector.acquire(shutdown.clone()).await {
            Ok(l) => Some(l),
            Err(crate::leader::LeaderError::Shutdown) => {
                let _ = http_task.await;
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        }
    } else {
        None
    };
    if shard_config.is_none() {
        metrics.leader.set(1);
    }
    let store = match build_store(&config, &client).await {
        Ok(s) => s,
        Err(e) => {
            if let Some(l) = leadership {
                l.release().await;
            }
            shutdown.cancel();
            return Err(e);
        }
    };
    let prefix = StorePrefix::new(&config.vault_prefix)?;
    let audit = match crate::audit::AuditLog::open(&config.audit_log) {
        Ok(a) => a,
        Err(e) => {
            if let Some(l) = leadership {
                l.release().await;
            }
            shutdown.cancel();
            return Err(RunError::Audit(e.to_string()));
        }
    };
    let shards = shard_config
        .as_ref()
        .map(|c| Arc::new(crate::shard::Shards::new(c.shards, c.identity.clone())));
    let ctx = Context::new(
        client.clone(),
        store,
        metrics.clone(),
        Arc::new(clock::SystemClock),
        ControllerConfig {
            concurrency: config.max_concurrent_reconciles,
            max_in_flight_per_account: config.max_in_flight_per_account,
            breaker: crate::stripe::BreakerSettings {
                failure_threshold: config.circuit_breaker_failures,
                cooldown: config.circuit_breaker_cooldown,
                max_cooldown: config.circuit_breaker_max_cooldown,
            },
            api_hosts: webhook_config.account_trust.api_hosts.clone(),
            orphan_sweep_interval: config.orphan_sweep_interval,
            last_used_lag: config.last_used_lag,
            key_usage_check_interval: config.key_usage_check_interval,
            activity_log_interval: config.activity_log_interval,
            canary_check_interval: config.canary_check_interval.max(Duration::from_secs(1)),
            ..ControllerConfig::new(&config.namespace, prefix)
        },
        None,
    )
    .with_audit(audit.clone())
    .with_health(health.clone());
    let ctx = Arc::new(match &shards {
        Some(s) => ctx.with_shards(s.clone()),
        None => ctx,
    });
    // The shard Leases are kept from here on: a shard is acted on once taken, and given up when
    // the manager stops (after the controllers did).
    let manager_stop = CancellationToken::new();
    let manager = match (shard_config, &shards) {
        (Some(c), Some(s)) => {
            tracing::info!(shards = c.shards, prefix = %c.prefix, namespace = %c.namespace, "sharding through leases");
            Some(tokio::spawn(
                crate::shard::ShardManager::new(client.clone(), c, s.clone())
                    .run(manager_stop.clone()),
            ))
        }
        _ => None,
    };
    let lost = leadership.as_ref().map(|l| l.lost()).unwrap_or_default();
    let controllers_stop = CancellationToken::new();
    let stop = controllers_stop.clone();
    let mut controllers =
        tokio::spawn(async move { run_controllers(ctx, &namespaces, stop).await });
    let mut leadership_lost = tokio::select! {
        _ = shutdown.cancelled() => {
            tracing::info!("shutting down");
            false
        }
        _ = lost.cancelled() => true,
    };
    let mut finished = false;
    if !leadership_lost {
        // Still the leader: let the reconciles in flight finish (bounded), unless the lease is
        // lost meanwhile.
        controllers_stop.cancel();
        tokio::select! {
            done = tokio::time::timeout(Duration::from_secs(20), &mut controllers) => {
                finished = done.is_ok();
            }
            _ = lost.cancelled() => leadership_lost = true,
        }
    }
    if !finished {
        // Whatever still runs is dropped, now: after the lease is lost (or the graceful wait
        // is over), this replica makes no further Kubernetes or Stripe call.
        controllers.abort();
        let _ = controllers.await;
    }
    if leadership_lost {
        tracing::error!(
            "lost the leader lease: every reconcile in flight was dropped; exiting so that a restart rejoins the election"
        );
    }
    if let Some(manager) = manager {
        // Gives every shard up (the controllers have stopped) and withdraws the membership.
        manager_stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(10), manager).await;
    }
    audit.close();
    health.set_ready(false);
    metrics.leader.set(0);
    if let Some(l) = leadership {
        l.release().await;
    }
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), http_task).await;
    if let Some(task) = webhook_task {
        let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    }
    drop(watchdog);
    if leadership_lost {
        return Err(RunError::LeadershipLost);
    }
    Ok(())
}

/// Aborts a task when dropped (on every return path).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Builds the secret store the flags choose.
pub async fn build_store(
    config: &RunConfig,
    client: &kube::Client,
) -> Result<Arc<dyn SecretStore>, RunError> {
    use crate::vault::{KubeSecretStore, VaultAuth, VaultConfig, VaultStore};
    Ok(match config.store {
        StoreKind::Memory => {
            tracing::warn!(
                "the in-memory store loses every key on restart: use it only for the sandbox and tests"
            );
            Arc::new(MemoryStore::default())
        }
        StoreKind::Kubernetes => {
            Arc::new(KubeSecretStore::new(client.clone(), &config.namespace, 10))
        }
        StoreKind::Vault => {
            let auth = match config.vault_auth {
                VaultAuthMethod::Kubernetes => VaultAuth::Kubernetes {
                    mount: config
                        .vault_auth_mount
                        .clone()
                        .unwrap_or_else(|| "kubernetes".into()),
                    role: config.vault_role.clone(),
                    token_file: config.vault_k8s_token_file.clone(),
                },
                VaultAuthMethod::Approle => VaultAuth::AppRole {
                    mount: config
                        .vault_auth_mount
                        .clone()
                        .unwrap_or_else(|| "approle".into()),
                    role_id: config.vault_role.clone(),
                    secret_id_file: config.vault_secret_id_file.clone().unwrap_or_default(),
                },
                VaultAuthMethod::Token => {
                    let token = std::env::var("VAULT_TOKEN").map_err(|_| {
                        RunError::Store(crate::vault::StoreError::Config(
                            "--vault-auth=token needs the VAULT_TOKEN environment variable".into(),
                        ))
                    })?;
                    VaultAuth::Token(crate::secret::SecretString::new(token))
                }
            };
            let mut vc = VaultConfig::new(config.vault_addr.clone(), auth);
            vc.kv_mount = config.vault_mount.clone();
            vc.ca_cert_file = config.vault_ca_cert.clone();
            let store = Arc::new(VaultStore::new(vc)?);
            store.login().await?;
            let _renewer = store.spawn_token_renewer();
            store
        }
    })
}

fn default_identity() -> String {
    std::env::var("HOSTNAME")
        .unwrap_or_else(|_| format!("stripe-key-operator-{}", std::process::id()))
}

/// How long the operator's Kubernetes client waits on a silent connection. kube-runtime's
/// watcher already reconnects a watch stream that goes quiet, but nothing bounds the LIST that
/// starts it: a LIST whose connection hangs (a dead API server behind a live TCP peer) would
/// wait forever, raise no error, and leave `/healthz` green. With this bound it fails and is
/// retried, and `--health-watch-failure` sees the failures. It is longer than a watch's
/// server-side timeout (290 s) plus the watcher's own idle margin, so a quiet watch is never cut.
pub const KUBE_READ_TIMEOUT: Duration = Duration::from_secs(330);

/// The operator's Kubernetes client settings: `config` with a read timeout that counts from each
/// request written (not from when a pooled connection went idle).
pub fn kube_client_config(mut config: kube::Config, read_timeout: Duration) -> kube::Config {
    config.read_timeout = Some(read_timeout);
    config.reset_reader_on_write = true;
    config
}

/// `stripe-key-operator run`.
pub async fn run(config: RunConfig) -> Result<(), RunError> {
    install_crypto_provider();
    crate::telemetry::init(
        config.log_format,
        "info,kube=warn,hyper=warn,tower=warn,vaultrs=off,rustify=off",
    );
    let kube_config = kube::Config::infer()
        .await
        .map_err(|e| RunError::Config(e.to_string()))?;
    let client = kube::Client::try_from(kube_client_config(kube_config, KUBE_READ_TIMEOUT))
        .map_err(|e| RunError::Config(e.to_string()))?;
    let shutdown = CancellationToken::new();
    let signal_token = shutdown.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        signal_token.cancel();
    });
    run_with_client(config, client, shutdown).await
}

#[cfg(test)]
mod tests {
    use super::uid_key;

    #[test]
    fn memo_keys_are_the_uuid_itself_or_a_stable_hash_and_tell_uids_apart() {
        assert_eq!(
            uid_key("0b6d1a52-3c1e-4f0e-9a5e-8f2d9c4b7a10"),
            0x0b6d1a52_3c1e_4f0e_9a5e_8f2d9c4b7a10
        );
        assert_ne!(
            uid_key("0b6d1a52-3c1e-4f0e-9a5e-8f2d9c4b7a10"),
            uid_key("0b6d1a52-3c1e-4f0e-9a5e-8f2d9c4b7a11")
        );
        // Not a UUID (a test API's uid, say): hashed, the same each time, still distinct.
        assert_eq!(uid_key("uid-1"), uid_key("uid-1"));
        assert_ne!(uid_key("uid-1"), uid_key("uid-2"));
        assert_ne!(
            uid_key("zzzzzzzz-zzzz-zzzz-zzzz-zzzzzzzzzzzz"),
            uid_key("uid-1")
        );
    }
}
