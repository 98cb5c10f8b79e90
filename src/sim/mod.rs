//! A stateful, in-memory simulator of the Stripe APIs the operator uses, for integration tests,
//! benchmarks and the local sandbox. Loopback only.
//!
//! It serves the v2 API-keys endpoints and the v1 webhook endpoints with Stripe's object shapes,
//! ids, error bodies, `Request-Id` headers, idempotency (saved answers, `idempotency_error`),
//! per-account rate limits (25/s test, 100/s live), live-mode JWE secrets, a clock that tests can
//! advance, and a scope-enforcing surface where minted keys are checked against their
//! permissions (`GET /v1/charges`, `GET /v1/customers`, `POST /v1/refunds`, `GET /v1/balance`,
//! `GET /v1/payment_intents`, and `GET /v1/events/{id}` with `event_read`, which serves the
//! events the simulator delivered for the key's account, the last 10 000 per account; an unknown
//! id is a 404 `resource_missing`, as at Stripe).
//!
//! Control it in-process through [`SimHandle`] or over HTTP under `/_sim/` (no auth):
//!
//! | call | effect |
//! |---|---|
//! | `GET /_sim/state` | [`SimState`]: accounts, keys (status, scopes, expiry; token fingerprint only), endpoints |
//! | `GET /_sim/requests`, `DELETE /_sim/requests` | the request log ([`RequestLogEntry`]) |
//! | `GET /_sim/clock`, `POST /_sim/clock/advance {"seconds":N,"minutes":M}` | the clock |
//! | `GET/POST/DELETE /_sim/faults` | list, inject ([`FaultSpec`] JSON), clear faults |
//! | `GET /_sim/last_used_lag`, `POST /_sim/last_used_lag {"seconds":N,"minutes":M}` | the reporting lag of `last_used` |
//! | `POST /_sim/webhook_endpoints/{id}/send {"type":..,"data":..}` | deliver a signed event |
//! | `POST /_sim/webhook_endpoints/{id}/roll_secret {"expire_current_in_hours":N}` | Dashboard-style secret roll |
//! | `POST /_sim/accounts/{acct}/dashboard {"email":..,"action":"view"\|"update"\|"expire","key_id":..}` | a person views, edits (`name`, `permissions`) or expires a key in the Dashboard |
//! | `POST /_sim/accounts/{acct}/dashboard {"email":..,"action":"create","name":..,"permissions":[..]}` | a person creates a restricted key by hand (answers its id, never its token) |
//! | `GET /_sim/accounts/{acct}/activity_logs` | the account's activity log, oldest first ([`ActivityEntryState`]) |
//!
//! **Activity log.** `GET /v2/iam/activity_logs` (and `/{id}`) serves each account's security
//! history as Stripe's public preview describes it: newest first, `limit` 1–100 (default 10),
//! filters `action_groups` (`api_key`, `account_security`, `authentication`, `user_roles`) and
//! `actions` (`api_key_created`, `api_key_updated`, `api_key_deleted`, `api_key_viewed`,
//! `api_key_rotated`, ...), paged with `next_page_url`. Keys created, updated, rotated or
//! expired through the API are recorded with the calling app key as actor (`type: api_key`, id
//! `apikey_app_<fingerprint>`, see [`SimHandle::app_key_id`]); Dashboard actions with the
//! person's email (`type: user`). An expiry is recorded as `api_key_deleted`. Stripe requires
//! the "Activity logs: Read" permission; the simulator does not model app permissions, so any
//! accepted app key may read it. The last 10 000 entries per account are kept.
//!
//! Fault JSON example: `{"fault":{"kind":"rate_limited","retry_after_secs":1},"count":3,
//! "method":"POST","path_prefix":"/v2/"}`; kinds: `rate_limited`, `server_error`
//! (`saved`, `should_retry`), `latency` (`millis`), `hang`, `drop_after_commit`.
//!
//! Where Stripe's answer is *unconfirmed* the simulator has a setting ([`SimConfig`]):
//! `public_key` is required for secret keys in live mode and optional in test mode unless
//! `require_public_key_in_test_mode`; expiring an already expired key answers 200 (the key as
//! it is) unless `already_expired_error` (400 `resource_already_expired`). A key's `last_used`
//! is set by calls on the scope-enforcing surface made with it; how long a use takes to show
//! there is *unconfirmed* at Stripe, so `last_used_lag` (default 0) delays it: a use at `t`
//! shows from `t + lag` on (of the simulator's clock). Every API-key object
//! carries `permissions` and `connect_permissions`. A call made with an expired app key
//! ([`SimHandle::expire_app_key`]) gets 401 `api_key_expired`. Injected `server_error` faults
//! with `saved: true` (and any 5xx the handlers produce) are saved under the idempotency key and
//! replayed with `Idempotent-Replayed: true`, as Stripe does.
//!
//! Known simplifications: signatures of delivered events use the real clock (so receivers can
//! verify them) unless a `timestamp` is given; expiry is exact (real Stripe was observed to keep
//! accepting an expired key for seconds to minutes); there is no concurrent-request 409.

mod activity;
mod api;
mod server;
mod state;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

pub use activity::{ActivityEntryState, DashboardAction, SimActor};
pub use server::{DeliveryOutcome, SendEventRequest};
pub use state::{
    AccountState, ClockMode, EndpointState, FaultKind, FaultRule, FaultSpec, KeyState,
    RequestLogEntry, SimState,
};

use crate::secret::SecretString;
use crate::stripe::config::{Mode, StripeConfig};

/// Errors of the simulator.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// The listen address is not a loopback address.
    #[error(
        "refusing to listen on {0}: the simulator accepts only loopback addresses (127.0.0.1, ::1)"
    )]
    NotLoopback(SocketAddr),
    /// The configuration is unusable.
    #[error("invalid simulator configuration: {0}")]
    InvalidConfig(String),
    /// Binding the listener failed.
    #[error("could not listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A referenced object does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// A control request is invalid.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
}

/// One simulated Stripe account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimAccount {
    /// `acct_...`.
    pub id: String,
    /// Test or live mode.
    pub mode: Mode,
}

impl std::str::FromStr for SimAccount {
    type Err = String;

    /// Parses `acct_ID:test` or `acct_ID:live`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (id, mode) = s
            .rsplit_once(':')
            .ok_or_else(|| format!("{s:?}: expected acct_ID:test or acct_ID:live"))?;
        if !id.starts_with("acct_") || id.len() <= 5 {
            return Err(format!("{id:?}: account ids start with acct_"));
        }
        Ok(SimAccount {
            id: id.to_owned(),
            mode: mode.parse()?,
        })
    }
}

/// Simulator settings.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Loopback address to bind (port 0 picks a free port).
    pub listen: SocketAddr,
    /// App secret keys accepted as Bearer tokens; one is generated when empty.
    pub app_keys: Vec<SecretString>,
    /// Accounts; one test account is generated when empty.
    pub accounts: Vec<SimAccount>,
    /// Real time (default) or a manual clock.
    pub clock: ClockMode,
    /// Requests per second per test-mode account (Stripe: 25).
    pub rate_limit_test: u32,
    /// Requests per second per live-mode account (Stripe: 100).
    pub rate_limit_live: u32,
    /// How long a `hang` fault holds a request before closing the connection.
    pub hang_duration: Duration,
    /// The app's id, shown in `managed_by` and `application`.
    pub application_id: String,
    /// Require `public_key` when creating or rotating a secret key in test mode too (live
    /// mode always requires it). Stripe's texts disagree about test mode (*unconfirmed*), so
    /// the default accepts its absence and this setting makes test mode strict.
    pub require_public_key_in_test_mode: bool,
    /// Answer an expire of an already expired key with 400 `resource_already_expired` instead
    /// of 200 with the key as it is (Stripe's answer is *unconfirmed*; clients must handle
    /// both).
    pub already_expired_error: bool,
    /// How long after a use it shows in a key's `last_used` (Stripe's lag is *unconfirmed*).
    pub last_used_lag: Duration,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            app_keys: Vec::new(),
            accounts: Vec::new(),
            clock: ClockMode::Real,
            rate_limit_test: 25,
            rate_limit_live: 100,
            hang_duration: Duration::from_secs(30),
            application_id: format!("ca_sim{}", state::random_alnum(16)),
            require_public_key_in_test_mode: false,
            already_expired_error: false,
            last_used_lag: Duration::ZERO,
        }
    }
}

impl SimConfig {
    /// Defaults: `127.0.0.1:0`, real clock, Stripe's rate limits.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds an account.
    pub fn with_account(mut self, id: impl Into<String>, mode: Mode) -> Self {
        self.accounts.push(SimAccount {
            id: id.into(),
            mode,
        });
        self
    }

    /// Adds an accepted app key.
    pub fn with_app_key(mut self, key: SecretString) -> Self {
        self.app_keys.push(key);
        self
    }

    /// Uses a manual clock starting at `start`.
    pub fn with_manual_clock(mut self, start: DateTime<Utc>) -> Self {
        self.clock = ClockMode::Manual { start };
        self
    }
}

/// The activity log's id for an app key: `apikey_app_` and the token's fingerprint.
pub(crate) fn app_key_id(token: &str) -> String {
    format!(
        "apikey_app_{}",
        crate::secret::fingerprint(token.as_bytes())
    )
}

/// Generates a simulator app key (`sk_test_sim_...`): a simulator credential, not a Stripe key.
pub fn generate_app_key() -> SecretString {
    SecretString::new(format!("sk_test_sim_{}", state::random_alnum(32)))
}

/// Entry point of the library API.
pub struct Simulator;

impl Simulator {
    /// Binds, starts serving in the background and returns the handle. Dropping the handle
    /// stops the server.
    pub async fn start(mut config: SimConfig) -> Result<SimHandle, SimError> {
        if !config.listen.ip().is_loopback() {
            return Err(SimError::NotLoopback(config.listen));
        }
        if config.app_keys.is_empty() {
            config.app_keys.push(generate_app_key());
        }
        if config.app_keys.iter().any(SecretString::is_empty) {
            return Err(SimError::InvalidConfig("an app key is empty".into()));
        }
        if config.accounts.is_empty() {
            config.accounts.push(SimAccount {
                id: format!("acct_sim{}", state::random_alnum(12)),
                mode: Mode::Test,
            });
        }
        for (i, a) in config.accounts.iter().enumerate() {
            if !a.id.starts_with("acct_") {
                return Err(SimError::InvalidConfig(format!(
                    "account id {:?} must start with acct_",
                    a.id
                )));
            }
            if config.accounts[..i].iter().any(|b| b.id == a.id) {
                return Err(SimError::InvalidConfig(format!(
                    "account {} is listed twice",
                    a.id
                )));
            }
        }
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|source| SimError::Bind {
                addr: config.listen,
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| SimError::Bind {
            addr: config.listen,
            source,
        })?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| SimError::InvalidConfig(format!("webhook HTTP client: {e}")))?;
        let accounts: Vec<(String, Mode)> = config
            .accounts
            .iter()
            .map(|a| (a.id.clone(), a.mode))
            .collect();
        let lag = chrono::Duration::from_std(config.last_used_lag)
            .map_err(|_| SimError::InvalidConfig("last_used_lag is too large".into()))?;
        let shared = Arc::new(server::Shared {
            state: Mutex::new(state::State::new(
                &accounts,
                config.clock,
                config.rate_limit_test,
                config.rate_limit_live,
            )),
            app_keys: config.app_keys.clone(),
            app_id: config.application_id.clone(),
            started: Instant::now(),
            hang: config.hang_duration,
            http,
            behaviour: api::Behaviour {
                strict_public_key: config.require_public_key_in_test_mode,
                reexpire_error: config.already_expired_error,
            },
        });
        shared.lock().last_used_lag = lag;
        let (tx, rx) = tokio::sync::watch::channel(false);
        let router = server::router(shared.clone());
        let task = tokio::spawn(server::serve(listener, router, rx));
        Ok(SimHandle {
            addr,
            config,
            shared,
            shutdown: tx,
            task: Some(task),
        })
    }
}

/// A running simulator. Dropping it stops the server (connections are closed).
pub struct SimHandle {
    addr: SocketAddr,
    config: SimConfig,
    shared: Arc<server::Shared>,
    shutdown: tokio::sync::watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for SimHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimHandle")
            .field("addr", &self.addr)
            .field("accounts", &self.config.accounts)
            .finish_non_exhaustive()
    }
}

impl SimHandle {
    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://<addr>`: the API base URL to give the client.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The first accepted app key.
    pub fn app_key(&self) -> &SecretString {
        &self.config.app_keys[0]
    }

    /// Every accepted app key.
    pub fn app_keys(&self) -> &[SecretString] {
        &self.config.app_keys
    }

    /// The simulated accounts.
    pub fn accounts(&self) -> &[SimAccount] {
        &self.config.accounts
    }

    /// The application id (`managed_by.application.id`).
    pub fn application_id(&self) -> &str {
        &self.config.application_id
    }

    /// A client configuration for `account` pointing at this simulator (first app key, the
    /// account's mode, its default rate).
    pub fn stripe_config(&self, account: &str) -> Result<StripeConfig, SimError> {
        let acct = self
            .config
            .accounts
            .iter()
            .find(|a| a.id == account)
            .ok_or_else(|| SimError::NotFound(format!("account {account}")))?;
        Ok(
            StripeConfig::new(self.app_key().clone(), acct.id.clone(), acct.mode)
                .with_api_base(self.base_url()),
        )
    }

    /// Expires one of the app keys: from now on every API call made with it is answered 401
    /// `api_key_expired` (as Stripe answers a call made with an expired key).
    pub fn expire_app_key(&self, key: &SecretString) -> Result<(), SimError> {
        if !self
            .config
            .app_keys
            .iter()
            .any(|k| k.expose() == key.expose())
        {
            return Err(SimError::NotFound(
                "that app key is not one of this simulator's".into(),
            ));
        }
        self.shared
            .lock()
            .expired_app_keys
            .insert(crate::secret::fingerprint(key.expose().as_bytes()));
        Ok(())
    }

    /// The id the activity log gives an app key (actor `api_key` of the app's own calls).
    pub fn app_key_id(&self, key: &SecretString) -> String {
        app_key_id(key.expose())
    }

    /// Plays a person (`email`) acting in the Dashboard of `account` (view, edit, expire or
    /// create a key); the change and its activity-log entry are made at once. Returns the id
    /// of the key acted on (or created).
    pub fn dashboard(
        &self,
        account: &str,
        email: &str,
        action: DashboardAction,
    ) -> Result<String, SimError> {
        let mut st = self.shared.lock();
        activity::dashboard(&mut st, &self.shared.app_id, account, email, action)
    }

    /// The account's activity log, oldest first.
    pub fn activity_log(&self, account: &str) -> Vec<ActivityEntryState> {
        let st = self.shared.lock();
        st.account_index(account)
            .map(|ai| {
                st.accounts[ai]
                    .activity
                    .entries()
                    .map(ActivityEntryState::from)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The simulator's clock.
    pub fn now(&self) -> DateTime<Utc> {
        self.shared.lock().clock.now()
    }

    /// Moves the clock forward (expiries are evaluated against it).
    pub fn advance_clock(&self, by: Duration) -> DateTime<Utc> {
        let mut st = self.shared.lock();
        st.clock.advance(by);
        st.clock.now()
    }

    /// Sets how long after a use it shows in a key's `last_used` (of the simulator's clock).
    pub fn set_last_used_lag(&self, lag: Duration) {
        self.shared.lock().last_used_lag =
            chrono::Duration::from_std(lag).unwrap_or(chrono::Duration::MAX);
    }

    /// Injects a fault; returns its id.
    pub fn inject_fault(&self, spec: FaultSpec) -> u64 {
        self.shared.lock().add_fault(spec)
    }

    /// The active fault rules.
    pub fn faults(&self) -> Vec<FaultRule> {
        self.shared.lock().faults.clone()
    }

    /// Removes every fault.
    pub fn clear_faults(&self) {
        self.shared.lock().faults.clear();
    }

    /// A snapshot of accounts, keys and endpoints (no secrets).
    pub fn state(&self) -> SimState {
        self.shared.lock().snapshot()
    }

    /// Every API request answered so far.
    pub fn request_log(&self) -> Vec<RequestLogEntry> {
        self.shared.lock().log.clone()
    }

    /// Empties the request log.
    pub fn clear_request_log(&self) {
        self.shared.lock().log.clear();
    }

    /// Delivers a signed event of `event_type` to the endpoint's URL, one `v1` signature per
    /// currently valid secret, and reports the receiver's status.
    pub async fn send_webhook(
        &self,
        endpoint_id: &str,
        request: SendEventRequest,
    ) -> Result<DeliveryOutcome, SimError> {
        server::deliver(&self.shared, endpoint_id, request).await
    }

    /// Rolls an endpoint's signing secret like the Dashboard does: the current secrets stay
    /// valid for `overlap` (at most 24 h), and the new secret is returned.
    pub fn roll_webhook_secret(
        &self,
        endpoint_id: &str,
        overlap: Duration,
    ) -> Result<SecretString, SimError> {
        if overlap > Duration::from_secs(24 * 3600) {
            return Err(SimError::InvalidRequest(
                "the overlap may be at most 24 hours".into(),
            ));
        }
        server::roll_secret(&self.shared, endpoint_id, overlap)
    }

    /// Stops the server and waits for it.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for SimHandle {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
    }
}

/// Command-line arguments of `stripe-key-operator stripe-sim`.
#[derive(clap::Args, Debug)]
pub struct SimArgs {
    /// Loopback address to listen on.
    #[arg(long, default_value = "127.0.0.1:12111")]
    pub listen: SocketAddr,
    /// App secret key the simulator accepts as Bearer token (repeatable). Generated and printed
    /// when absent.
    #[arg(long = "app-key")]
    pub app_keys: Vec<String>,
    /// Account as acct_ID:test or acct_ID:live (repeatable). A test account is generated when
    /// absent.
    #[arg(long = "account")]
    pub accounts: Vec<SimAccount>,
    /// Start with a manual clock (moves only through POST /_sim/clock/advance).
    #[arg(long)]
    pub manual_clock: bool,
    /// Requests per second per test-mode account.
    #[arg(long, default_value_t = 25)]
    pub rate_limit_test: u32,
    /// Requests per second per live-mode account.
    #[arg(long, default_value_t = 100)]
    pub rate_limit_live: u32,
    /// Require `public_key` for secret keys in test mode too (live mode always does).
    #[arg(long)]
    pub require_public_key_in_test_mode: bool,
    /// Answer an expire of an already expired key with 400 `resource_already_expired`
    /// (default: 200 with the key as it is).
    #[arg(long)]
    pub already_expired_error: bool,
    /// How long after a use it shows in a key's `last_used` (`90s`, `10m`; Stripe's lag is
    /// unconfirmed). Default 0.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    pub last_used_lag: Duration,
}

/// Runs the simulator until interrupted (Ctrl-C / SIGTERM).
pub async fn run_cli(args: SimArgs) -> anyhow::Result<()> {
    let generated_key = args.app_keys.is_empty();
    let mut config = SimConfig {
        listen: args.listen,
        app_keys: args.app_keys.into_iter().map(SecretString::new).collect(),
        accounts: args.accounts,
        rate_limit_test: args.rate_limit_test,
        rate_limit_live: args.rate_limit_live,
        require_public_key_in_test_mode: args.require_public_key_in_test_mode,
        already_expired_error: args.already_expired_error,
        last_used_lag: args.last_used_lag,
        ..SimConfig::default()
    };
    if args.manual_clock {
        config.clock = ClockMode::Manual { start: Utc::now() };
    }
    let handle = Simulator::start(config).await?;
    println!("Stripe API simulator listening on {}", handle.base_url());
    println!(
        "  control API: {}/_sim/ (no auth, loopback only)",
        handle.base_url()
    );
    for key in handle.app_keys() {
        if generated_key {
            println!(
                "  app key (generated SIMULATOR credential, not a Stripe key): {}",
                key.expose()
            );
        } else {
            println!("  app key fingerprint: {}", key.fingerprint());
        }
    }
    for a in handle.accounts() {
        println!("  account: {} ({} mode)", a.id, a.mode);
    }
    println!("  application id: {}", handle.application_id());
    wait_for_signal().await;
    handle.shutdown().await;
    Ok(())
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                    return;
                }
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
