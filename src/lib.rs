//! stripe-key-operator: mints least-privilege Stripe restricted keys and webhook signing secrets,
//! stores them in Vault, injects them into workloads and rotates them.
#![forbid(unsafe_code)]

pub mod admission;
pub mod api;
pub mod audit;
pub mod controller;
pub mod egress;
pub mod error;
pub mod http;
pub mod inject;
pub mod leader;
pub mod metrics;
pub mod rotate_cli;
pub mod rotation;
pub mod rules;
pub mod sandbox;
pub mod scan;
pub mod secret;
pub mod shard;
pub mod sim;
pub mod stripe;
pub mod telemetry;
pub mod vault;
pub mod webhook;

pub use error::{Error, Result};
