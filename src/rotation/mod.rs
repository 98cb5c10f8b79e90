//! Rotation: when a credential is due (pure schedule maths) and the one engine that rotates
//! every kind of credential.

pub mod engine;
pub mod listing;
pub mod schedule;
