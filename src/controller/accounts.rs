//! From a `StripeAccount` to a ready Stripe client: the app key, the rate limiter shared by every
//! reconcile of the account, and (live mode) the RSA key pair that decrypts new secrets.
//!
//! Nothing is read or sent before the account passes [`rules::validate_account`] (the check the
//! admission webhook makes too): its `apiBase` must be an allowed host, its Vault paths must lie
//! under `<prefix>/_accounts/`, and a `secretRef` Secret must carry the credential label.

use std::collections::HashMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::api::Api;
use tokio::sync::Mutex;

use super::Context;
use super::error::ReconcileError;
use crate::api::{Mode, StripeAccount};
use crate::rules::{self, AccountTrust};
use crate::secret::SecretString;
use crate::stripe::{
    BreakerSettings, CircuitBreaker, CircuitState, JweKeyPair, RateLimiter, StripeClient,
    StripeConfig,
};
use crate::vault::{AccountKey, Cas, StorePath};

/// A resolved account.
#[derive(Clone)]
pub struct AccountHandle {
    /// The client (clones share the account's rate limiter).
    pub client: StripeClient,
    /// Test or live.
    pub mode: Mode,
    /// The key pair new secrets are encrypted to (sent as `public_key` on every create).
    pub keys: Option<Arc<JweKeyPair>>,
}

#[derive(Clone, PartialEq, Eq)]
struct CacheKey {
    uid: String,
    generation: Option<i64>,
    app_key_fingerprint: String,
}

/// How long a resolved account's app key is trusted without reading it again.
pub const APP_KEY_RECHECK: std::time::Duration = std::time::Duration::from_secs(30);

/// Resolved accounts, cached until the account or its app key changes.
#[derive(Default)]
pub struct Accounts {
    cache: Mutex<HashMap<String, (CacheKey, AccountHandle, std::time::Instant)>>,
    /// Rate limiters and circuit breakers per Stripe account (shared with the scheduler).
    pub health: Arc<StripeHealth>,
}

/// What Stripe limits, and what a circuit breaker guards: one Stripe account reached at one API
/// base (the `Stripe-Context` account).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ContextKey {
    /// The API base, without trailing `/`, lower case.
    pub api_base: String,
    /// The `Stripe-Context` account (`acct_...`).
    pub context: String,
}

impl ContextKey {
    pub fn new(api_base: &str, context: &str) -> Self {
        Self {
            api_base: api_base.trim_end_matches('/').to_ascii_lowercase(),
            context: context.to_string(),
        }
    }
}

/// Told when a Stripe account's breaker changes state or its limiter starts a pause.
pub type HealthListener = Arc<dyn Fn(&ContextKey) + Send + Sync>;

/// One rate limiter per Stripe account, keyed by what Stripe limits: the API base and the
/// `Stripe-Context` account. An edit of the `StripeAccount` object keeps its limiter (no fresh
/// bucket), and two objects naming the same context share one.
#[derive(Default)]
pub struct Limiters {
    by_context: std::sync::Mutex<HashMap<ContextKey, Arc<RateLimiter>>>,
    listener: std::sync::OnceLock<HealthListener>,
}

impl Limiters {
    /// The limiter of `context` at `api_base`, created at `requests_per_second` on first use. A
    /// later call with another rate changes the rate of the same limiter, keeping its tokens.
    pub fn get(&self, api_base: &str, context: &str, requests_per_second: f64) -> Arc<RateLimiter> {
        let key = ContextKey::new(api_base, context);
        let mut map = self.by_context.lock().unwrap_or_else(|e| e.into_inner());
        let limiter = map
            .entry(key.clone())
            .or_insert_with(|| {
                let limiter = RateLimiter::new(requests_per_second, 1);
                Arc::new(match self.listener.get() {
                    Some(listener) => {
                        let listener = listener.clone();
                        limiter.with_listener(Arc::new(move || listener(&key)))
                    }
                    None => limiter,
                })
            })
            .clone();
        if (limiter.rate() - requests_per_second).abs() > f64::EPSILON {
            limiter.set_rate(requests_per_second);
        }
        limiter
    }

    /// The limiter of `key`, if one was made.
    pub fn find(&self, key: &ContextKey) -> Option<Arc<RateLimiter>> {
        self.by_context
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .cloned()
    }
}

/// The health of every Stripe account the operator talks to: its rate limiter, its circuit
/// breaker, and which StripeAccount objects name it. Kept in memory only (a restart starts with
/// full buckets' worth of caution: one token each, and closed breakers).
pub struct StripeHealth {
    pub limiters: Limiters,
    breakers: std::sync::Mutex<HashMap<ContextKey, Arc<CircuitBreaker>>>,
    names: std::sync::Mutex<HashMap<String, ContextKey>>,
    settings: BreakerSettings,
    metrics: Option<crate::metrics::Metrics>,
    listener: std::sync::OnceLock<HealthListener>,
    /// The time breakers read: the controllers' clock.
    clock: Arc<dyn crate::controller::clock::Clock>,
}

impl Default for StripeHealth {
    fn default() -> Self {
        Self::new(BreakerSettings::default(), None)
    }
}

impl StripeHealth {
    /// Breakers with `settings`, counting their transitions in `metrics`.
    pub fn new(settings: BreakerSettings, metrics: Option<crate::metrics::Metrics>) -> Self {
        Self {
            limiters: Limiters::default(),
            breakers: Default::default(),
            names: Default::default(),
            settings,
            metrics,
            listener: Default::default(),
            clock: Arc::new(crate::controller::clock::SystemClock),
        }
    }

    /// Breakers read `clock` (the controllers' clock: a manual one in tests).
    pub fn with_clock(mut self, clock: Arc<dyn crate::controller::clock::Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Sets who hears about breaker transitions and rate-limit pauses (once).
    pub fn set_listener(&self, listener: HealthListener) {
        let _ = self.limiters.listener.set(listener.clone());
        let _ = self.listener.set(listener);
    }

    /// The breaker of `key`, created closed on first use.
    pub fn breaker(&self, key: &ContextKey) -> Arc<CircuitBreaker> {
        let mut map = self.breakers.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(key.clone())
            .or_insert_with(|| {
                let metrics = self.metrics.clone();
                let listener = self.listener.get().cloned();
                let key = key.clone();
                if let Some(m) = &metrics {
                    m.stripe_circuit_state
                        .get_or_create(&crate::metrics::AccountLabels {
                            account: key.context.clone(),
                        })
                        .set(0);
                }
                Arc::new(CircuitBreaker::with_clock(
                    self.settings.clone(),
                    Some(Arc::new(move |to: CircuitState| {
                        tracing::warn!(account = %key.context, to = to.as_str(), "Stripe circuit breaker changed state");
                        if let Some(m) = &metrics {
                            m.stripe_circuit_transitions
                                .get_or_create(&crate::metrics::CircuitLabels {
                                    account: key.context.clone(),
                                    to: to.as_str().into(),
                                })
                                .inc();
                            m.stripe_circuit_state
                                .get_or_create(&crate::metrics::AccountLabels {
                                    account: key.context.clone(),
                                })
                                .set(to.gauge_value());
                        }
                        if let Some(l) = &listener {
                            l(&key);
                        }
                    })),
                    self.clock.clone(),
                ))
            })
            .clone()
    }

    /// Records that the StripeAccount `name` reaches `key`.
    pub fn name(&self, name: &str, key: &ContextKey) {
        let mut names = self.names.lock().unwrap_or_else(|e| e.into_inner());
        if names.get(name) != Some(key) {
            names.insert(name.to_string(), key.clone());
        }
    }

    /// The Stripe account the StripeAccount `name` reaches, once resolved.
    pub fn key_of(&self, name: &str) -> Option<ContextKey> {
        self.names
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }

    /// The breaker state and the rate-limit pause of `key` now.
    pub fn snapshot(&self, key: &ContextKey) -> HealthSnapshot {
        HealthSnapshot {
            breaker: self.breaker(key).snapshot(),
            paused_for: self.limiters.find(key).and_then(|l| l.paused_for()),
        }
    }
}

/// A Stripe account's health now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthSnapshot {
    pub breaker: crate::stripe::breaker::BreakerSnapshot,
    /// How long the rate-limit pause under way (a 429's `Retry-After`) still lasts.
    pub paused_for: Option<std::time::Duration>,
}

/// A token is this far away or more: the account is skipped rather than handed a worker that
/// would only wait for it.
const TOKEN_WAIT_SKIP: std::time::Duration = std::time::Duration::from_millis(250);

impl super::scheduler::AccountGate for StripeHealth {
    fn gate(&self, account: &str) -> super::scheduler::Gate {
        use super::scheduler::Gate;
        let Some(key) = self.key_of(account) else {
            return Gate::Open;
        };
        let breaker = self.breaker(&key);
        match breaker.state() {
            CircuitState::HalfOpen => return Gate::Probe,
            CircuitState::Open => {
                return match breaker.blocked_for() {
                    Some(wait) if !wait.is_zero() => Gate::Blocked(wait),
                    _ => Gate::Probe,
                };
            }
            CircuitState::Closed => {}
        }
        match self.limiters.find(&key).map(|l| l.ready_in()) {
            Some(wait) if wait >= TOKEN_WAIT_SKIP => Gate::Blocked(wait),
            _ => Gate::Open,
        }
    }
}

impl std::fmt::Debug for Accounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Accounts")
    }
}

fn missing(message: String) -> ReconcileError {
    ReconcileError::Account {
        reason: "AccountCredentialsMissing",
        message,
    }
}

/// The trust settings of this operator (its allowed API hosts, namespace and store prefix).
pub fn trust(ctx: &Context) -> AccountTrust {
    AccountTrust {
        api_hosts: ctx.config.api_hosts.clone(),
        operator_namespace: ctx.config.operator_namespace.clone(),
        store_prefix: ctx.config.store_prefix.clone(),
    }
}

fn untrusted(refusal: rules::AccountRefusal) -> ReconcileError {
    ReconcileError::Account {
        reason: refusal.reason,
        message: refusal.message,
    }
}

impl Accounts {
    /// Accounts whose Stripe health is kept in `health`.
    pub fn new(health: Arc<StripeHealth>) -> Self {
        Self {
            cache: Mutex::default(),
            health,
        }
    }

    /// The client for `account`, building it when the account or its app key changed. Refuses
    /// an account that [`rules::validate_account`] refuses, before reading any credential.
    pub async fn resolve(
        &self,
        ctx: &Context,
        account: &StripeAccount,
    ) -> Result<AccountHandle, ReconcileError> {
        let name = account.name_any();
        let trust = trust(ctx);
        rules::validate_account(&name, &account.spec, &trust, None).map_err(untrusted)?;
        // The app key was read moments ago for this very account (same object, same spec):
        // reuse the client instead of reading its Secret (or Vault) on every reconcile. A
        // changed or withdrawn app key is seen within APP_KEY_RECHECK.
        if let Some((cached_key, handle, read_at)) = self.cache.lock().await.get(&name)
            && cached_key.uid == account.uid().unwrap_or_default()
            && cached_key.generation == account.metadata.generation
            && read_at.elapsed() < APP_KEY_RECHECK
        {
            return Ok(handle.clone());
        }
        let app_key = load_app_key(ctx, account, &trust).await?;
        let key = CacheKey {
            uid: account.uid().unwrap_or_default(),
            generation: account.metadata.generation,
            app_key_fingerprint: app_key.fingerprint(),
        };
        let mut cache = self.cache.lock().await;
        if let Some((cached_key, handle, read_at)) = cache.get_mut(&name)
            && *cached_key == key
        {
            *read_at = std::time::Instant::now();
            return Ok(handle.clone());
        }
        let spec = &account.spec;
        let mode = match spec.mode {
            Mode::Test => crate::stripe::Mode::Test,
            Mode::Live => crate::stripe::Mode::Live,
        };
        let mut config = StripeConfig::new(app_key, spec.context.clone(), mode)
            .with_api_base(spec.api_base.clone());
        config.api_version = spec.api_version.clone();
        config.requests_per_second = f64::from(spec.effective_requests_per_second());
        if let Some(timeout) = ctx.config.stripe_timeout {
            config.timeout = timeout;
        }
        if let Some(retry) = &ctx.config.stripe_retry {
            config.retry = retry.clone();
        }
        let limiter =
            self.health
                .limiters
                .get(&spec.api_base, &spec.context, config.requests_per_second);
        let context_key = ContextKey::new(&spec.api_base, &spec.context);
        self.health.name(&name, &context_key);
        let client = StripeClient::with_parts(config, limiter, None)?
            .with_breaker(self.health.breaker(&context_key));
        // Stripe requires a public key on every secret-key create (test mode too); live mode
        // returns the secret only encrypted to it.
        let keys = Some(Arc::new(load_or_create_key_pair(ctx, account).await?));
        let handle = AccountHandle {
            client,
            mode: spec.mode,
            keys,
        };
        cache.insert(name, (key, handle.clone(), std::time::Instant::now()));
        Ok(handle)
    }
}

async fn load_app_key(
    ctx: &Context,
    account: &StripeAccount,
    trust: &AccountTrust,
) -> Result<SecretString, ReconcileError> {
    let creds = &account.spec.credentials;
    if let Some(r) = &creds.secret_ref {
        let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &ctx.config.operator_namespace);
        let secret = api.get_opt(&r.name).await?.ok_or_else(|| {
            missing(format!(
                "StripeAccount {}: Secret {}/{} with the Stripe App's secret key does not exist",
                account.name_any(),
                ctx.config.operator_namespace,
                r.name
            ))
        })?;
        // The Secret's data is read only once its labels say an administrator meant it as an
        // app key (never a bundle of the kubernetes store or any other Secret).
        rules::validate_account(
            &account.name_any(),
            &account.spec,
            trust,
            Some(secret.labels()),
        )
        .map_err(untrusted)?;
        let value = secret
            .data
            .as_ref()
            .and_then(|d| d.get(&r.key))
            .and_then(|b| String::from_utf8(b.0.clone()).ok())
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .ok_or_else(|| {
                missing(format!(
                    "StripeAccount {}: Secret {}/{} has no key {:?}",
                    account.name_any(),
                    ctx.config.operator_namespace,
                    r.name,
                    r.key
                ))
            })?;
        return Ok(SecretString::new(value));
    }
    if let Some(v) = &creds.vault {
        return ctx
            .store
            .read_external_field(&v.path, &v.key)
            .await?
            .ok_or_else(|| {
                missing(format!(
                    "StripeAccount {}: no key {:?} at Vault path {:?}",
                    account.name_any(),
                    v.key,
                    v.path
                ))
            });
    }
    Err(missing(format!(
        "StripeAccount {} names no credentials",
        account.name_any()
    )))
}

/// Reads the account's RSA key pair, generating and storing one (create-only) when absent.
async fn load_or_create_key_pair(
    ctx: &Context,
    account: &StripeAccount,
) -> Result<JweKeyPair, ReconcileError> {
    let bad = |e: crate::stripe::JweError| ReconcileError::Account {
        reason: "EncryptionKeyInvalid",
        message: format!(
            "StripeAccount {}: the live-mode decryption key is unusable: {e}",
            account.name_any()
        ),
    };
    if let Some(src) = &account.spec.encryption_key {
        let pem = ctx
            .store
            .read_external_field(&src.vault.path, &src.vault.key)
            .await?
            .ok_or_else(|| {
                missing(format!(
                    "StripeAccount {}: no encryption key at Vault path {:?}",
                    account.name_any(),
                    src.vault.path
                ))
            })?;
        return JweKeyPair::from_pkcs8_pem(&pem).map_err(bad);
    }
    let path = StorePath::account_key(&ctx.config.store_prefix, &account.name_any())?;
    for _ in 0..3 {
        if let Some(found) = ctx.store.read_account_key(&path).await? {
            return JweKeyPair::from_pkcs8_pem(&found.value.private_key_pem).map_err(bad);
        }
        let pair = JweKeyPair::generate().map_err(bad)?;
        let key = AccountKey {
            account: account.name_any(),
            private_key_pem: pair.to_pkcs8_pem().map_err(bad)?,
        };
        match ctx.store.write_account_key(&path, &key, Cas::Absent).await {
            Ok(_) => return Ok(pair),
            // Another writer stored one first: use theirs.
            Err(e) if e.is_conflict() => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(ReconcileError::Account {
        reason: "EncryptionKeyConflict",
        message: format!(
            "StripeAccount {}: could not settle the decryption key",
            account.name_any()
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_edited_account_keeps_its_limiter_and_gets_no_fresh_tokens() {
        let limiters = Limiters::default();
        let first = limiters.get("http://127.0.0.1:1", "acct_1", 1.0);
        assert!(first.try_acquire(), "a new limiter starts with one token");
        // The spec is edited (another rate): the same limiter, still empty.
        let edited = limiters.get("http://127.0.0.1:1", "acct_1", 50.0);
        assert!(Arc::ptr_eq(&first, &edited));
        assert!(!edited.try_acquire(), "an edit is not a fresh bucket");
        assert!((edited.rate() - 50.0).abs() < 1e-9);
    }

    #[test]
    fn two_objects_naming_one_context_share_one_limiter_and_other_contexts_do_not() {
        let limiters = Limiters::default();
        let a = limiters.get("https://api.stripe.com", "acct_1", 20.0);
        let b = limiters.get("https://api.stripe.com/", "acct_1", 20.0);
        assert!(Arc::ptr_eq(&a, &b));
        let other_account = limiters.get("https://api.stripe.com", "acct_2", 20.0);
        assert!(!Arc::ptr_eq(&a, &other_account));
        let other_base = limiters.get("http://127.0.0.1:9", "acct_1", 20.0);
        assert!(!Arc::ptr_eq(&a, &other_base));
    }
}
