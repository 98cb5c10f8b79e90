//! Client for the Stripe APIs the operator uses: the v2 API-keys API (`/v2/iam/api_keys`, JSON
//! bodies) and v1 webhook endpoints (`/v1/webhook_endpoints`, form-encoded bodies).
//!
//! Every call carries `Authorization: Bearer <app key>`, `Stripe-Version` and `Stripe-Context`;
//! every POST carries a caller-supplied `Idempotency-Key` (see [`idempotency_key`]). Calls go
//! through a per-account token bucket ([`RateLimiter`]), time out per attempt, and are retried on
//! 409, 429, 5xx and connection errors with exponential backoff and jitter, honouring
//! `Retry-After` and `Stripe-Should-Retry`. Each HTTP attempt is reported to a [`CallObserver`]
//! (method, path, status, request id, idempotency key, attempt, duration, error code); bodies,
//! keys and secrets are never logged.
//!
//! Live-mode secrets arrive as compact JWE encrypted to the operator's RSA key: see [`jwe`].

pub mod breaker;
pub mod client;
pub mod config;
pub mod error;
pub mod jwe;
pub mod ratelimit;
pub mod retry;
pub mod types;
pub mod verify;

pub use breaker::{BreakerSettings, CircuitBreaker, CircuitState};
pub use client::{
    ApiResponse, CallObserver, CallRecord, ExpireOutcome, Paged, StripeClient, idempotency_key,
};
pub use config::{Mode, StripeConfig};
pub use error::{ApiError, ConnectionErrorKind, StripeError};
pub use jwe::{JweError, JweKeyPair};
pub use ratelimit::{RateLimiter, TokenBucket};
pub use retry::{RetryPolicy, parse_retry_after};
pub use types::*;
