//! Rotation: when a credential is due (pure schedule maths).

pub mod schedule;
