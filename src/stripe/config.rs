//! Configuration of a [`StripeClient`](super::StripeClient): one client per Stripe account.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use crate::secret::SecretString;

use super::retry::RetryPolicy;

/// Stripe's production API.
pub const DEFAULT_API_BASE: &str = "https://api.stripe.com";

/// The preview API version that serves `/v2/iam/api_keys` (see the Stripe notes).
pub const DEFAULT_API_VERSION: &str = "2026-10-14.preview";

/// Test mode (sandboxes, `rk_test_` keys) or live mode (`rk_live_` keys, encrypted secrets).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Test mode: Stripe limits to 25 requests/s; secrets come back in plaintext.
    Test,
    /// Live mode: Stripe limits to 100 requests/s; secrets come back only as JWE.
    Live,
}

impl Mode {
    /// Stripe's documented per-account request rate for this mode.
    pub fn stripe_rate_limit(self) -> u32 {
        match self {
            Mode::Test => 25,
            Mode::Live => 100,
        }
    }

    /// `"test"` or `"live"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Test => "test",
            Mode::Live => "live",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "test" => Ok(Mode::Test),
            "live" => Ok(Mode::Live),
            other => Err(format!(
                "unknown Stripe mode {other:?}: expected \"test\" or \"live\""
            )),
        }
    }
}

/// Settings of one Stripe client (one Stripe account reached through an installed app).
#[derive(Clone)]
pub struct StripeConfig {
    /// Base URL of the API, without trailing path (default [`DEFAULT_API_BASE`]); point it at
    /// the simulator in tests.
    pub api_base: String,
    /// The Stripe App's own secret key (holds `api_key_write`). Sent as the Bearer token.
    pub secret_key: SecretString,
    /// The customer account, sent as `Stripe-Context` (`acct_...`).
    pub context: String,
    /// Sent as `Stripe-Version` on every call (default [`DEFAULT_API_VERSION`]).
    pub api_version: String,
    /// Test or live mode of the account (decides the default rate and secret handling).
    pub mode: Mode,
    /// Client-side request budget per second for this account (token bucket refill rate).
    pub requests_per_second: f64,
    /// Token bucket size: how many requests may go out back to back after a quiet period.
    pub burst: u32,
    /// Timeout of one HTTP attempt (connect + request + response body).
    pub timeout: Duration,
    /// Retry behaviour; `retry.max_retries` bounds the attempts (attempts = retries + 1).
    pub retry: RetryPolicy,
}

impl StripeConfig {
    /// A configuration with the defaults: Stripe's production base URL, the preview API version,
    /// 80 % of Stripe's documented rate for `mode` (20/s test, 80/s live), burst 1, a 30 s
    /// timeout and [`RetryPolicy::default`].
    pub fn new(secret_key: SecretString, context: impl Into<String>, mode: Mode) -> Self {
        Self {
            api_base: DEFAULT_API_BASE.to_owned(),
            secret_key,
            context: context.into(),
            api_version: DEFAULT_API_VERSION.to_owned(),
            mode,
            requests_per_second: f64::from(mode.stripe_rate_limit()) * 0.8,
            burst: 1,
            timeout: Duration::from_secs(30),
            retry: RetryPolicy::default(),
        }
    }

    /// Replaces the API base URL (for the simulator or a proxy).
    pub fn with_api_base(mut self, base: impl Into<String>) -> Self {
        self.api_base = base.into();
        self
    }
}

impl fmt::Debug for StripeConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StripeConfig")
            .field("api_base", &self.api_base)
            .field("secret_key", &self.secret_key)
            .field("context", &self.context)
            .field("api_version", &self.api_version)
            .field("mode", &self.mode)
            .field("requests_per_second", &self.requests_per_second)
            .field("burst", &self.burst)
            .field("timeout", &self.timeout)
            .field("retry", &self.retry)
            .finish()
    }
}
