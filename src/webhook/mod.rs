//! Stripe webhooks: verification of Stripe's `Stripe-Signature` header (and a signer for tests and
//! the simulator) and the verifying sidecar proxy (`verify-proxy`). Kubernetes admission webhooks
//! are a different thing that shares the word: they live in [`crate::admission`].

pub mod proxy;
pub mod signature;
