//! Shared helpers for the Stripe client and simulator tests.
#![allow(dead_code)]

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use aws_lc_rs::rsa::KeySize;
use stripe_key_operator::sim::{SimConfig, SimHandle, Simulator};
use stripe_key_operator::stripe::{
    ApiKeyType, CallObserver, CallRecord, CreateApiKeyParams, JweKeyPair, RateLimiter, RetryPolicy,
    StripeClient, StripeConfig,
};

/// Records every call the client reports.
#[derive(Default)]
pub struct RecordingObserver {
    pub records: Mutex<Vec<CallRecord>>,
}

impl CallObserver for RecordingObserver {
    fn on_call(&self, record: &CallRecord) {
        self.records.lock().unwrap().push(record.clone());
    }
}

impl RecordingObserver {
    pub fn take(&self) -> Vec<CallRecord> {
        std::mem::take(&mut *self.records.lock().unwrap())
    }
}

/// A 2048-bit key pair shared by tests (generation is slow-ish; 3072 bits is tested separately).
pub fn test_key_pair() -> &'static JweKeyPair {
    static PAIR: OnceLock<JweKeyPair> = OnceLock::new();
    PAIR.get_or_init(|| JweKeyPair::generate_with_size(KeySize::Rsa2048).unwrap())
}

/// Starts a simulator with generous rate limits unless the test sets them.
pub async fn start_sim(config: SimConfig) -> SimHandle {
    Simulator::start(config).await.expect("simulator starts")
}

/// A client config for `account` with fast retries and a high client-side rate.
pub fn fast_config(sim: &SimHandle, account: &str) -> StripeConfig {
    let mut c = sim.stripe_config(account).unwrap();
    c.requests_per_second = 10_000.0;
    c.burst = 100;
    c.timeout = Duration::from_secs(5);
    c.retry = RetryPolicy {
        max_retries: 4,
        initial_backoff: Duration::from_millis(5),
        max_backoff: Duration::from_millis(50),
        max_retry_after: Duration::from_secs(2),
    };
    c
}

pub fn client_with_observer(config: StripeConfig) -> (StripeClient, Arc<RecordingObserver>) {
    let observer = Arc::new(RecordingObserver::default());
    let limiter = Arc::new(RateLimiter::new(config.requests_per_second, config.burst));
    let client = StripeClient::with_parts(config, limiter, Some(observer.clone())).unwrap();
    (client, observer)
}

pub fn secret_key_params(name: &str, permissions: &[&str]) -> CreateApiKeyParams {
    CreateApiKeyParams {
        key_type: ApiKeyType::SecretKey,
        name: name.to_owned(),
        note: Some("managed by stripe-key-operator tests".to_owned()),
        permissions: permissions.iter().map(|p| (*p).to_owned()).collect(),
        connect_permissions: None,
        expires_at: None,
        public_key: Some(
            test_key_pair()
                .public_key_param(Some("test-kid".into()))
                .unwrap(),
        ),
    }
}

/// Calls the simulator's scope-enforcing surface with a minted key; returns status and body.
pub async fn call_with_key(
    sim: &SimHandle,
    method: reqwest::Method,
    path: &str,
    token: &str,
) -> (u16, serde_json::Value) {
    let resp = reqwest::Client::new()
        .request(method, format!("{}{}", sim.base_url(), path))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let body = resp.json().await.unwrap_or(serde_json::Value::Null);
    (status, body)
}
