//! The egress key broker: workloads call Stripe through a sidecar that holds the key.
//!
//! - [`anomaly`]: per-permission request-rate baselines and the actions on a burst.
//! - [`suggest`]: `permissions suggest`, the least permission set from usage reports.

pub mod anomaly;
pub mod suggest;
