//! `stripe-key-operator sandbox`: the operator's whole job on one machine, no cluster needed.

pub mod env;
