//! The stripekeys.io/v1alpha1 API.
