//! The egress key broker: workloads call Stripe through a sidecar that holds the real key.
//!
//! - [`routes`]: the versioned route → permission table, shared with the simulator.
//! - [`proxy`]: `stripe-key-operator egress-proxy`, the sidecar that swaps the placeholder for
//!   the real key, refuses what the key's permissions cannot serve, and counts usage.
//! - [`anomaly`]: per-permission request-rate baselines and the actions on a burst.
//! - [`suggest`]: `permissions suggest`, the least permission set from usage reports.

pub mod anomaly;
pub mod proxy;
pub mod routes;
pub mod suggest;
