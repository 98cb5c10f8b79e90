//! Webhooks: verification of Stripe's `Stripe-Signature` header (and a signer for tests and the
//! simulator).

pub mod signature;
