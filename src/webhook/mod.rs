//! Webhooks: verification of Stripe's `Stripe-Signature` header (and a signer for tests and the
//! simulator), and the verifying sidecar proxy (`verify-proxy`).

pub mod proxy;
pub mod signature;
