//! Webhooks: verification of Stripe's `Stripe-Signature` header (and a signer for tests and the
//! simulator), the verifying sidecar proxy (`verify-proxy`), and the Kubernetes validating
//! admission webhooks with their TLS server.

pub mod admission;
pub mod proxy;
pub mod server;
pub mod signature;
pub mod tls;
