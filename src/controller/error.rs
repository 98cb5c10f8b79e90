//! Errors of the controllers, with the short reason that conditions, Events and metrics show.

use crate::stripe::StripeError;
use crate::vault::StoreError;

/// Why a reconcile failed.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("Stripe: {0}")]
    Stripe(#[from] StripeError),
    #[error("secret store: {0}")]
    Store(#[from] StoreError),
    #[error("{message}")]
    Account {
        reason: &'static str,
        message: String,
    },
    #[error(
        "the new key {key_id} failed scope verification: {message}; it is expired and a new one will be minted"
    )]
    ScopeVerification { key_id: String, message: String },
    #[error("the scope probes of a new key reached no verdict ({0}); they are retried")]
    ScopeProbe(String),
    #[error("Stripe returned key {key_id} without a usable secret: {message}")]
    MissingSecret { key_id: String, message: String },
    #[error(
        "the Secret {namespace}/{name} exists and is not owned by this resource; rename delivery.secret.name or delete that Secret"
    )]
    SecretNotOwned { namespace: String, name: String },
    #[error("finalizer: {0}")]
    Finalizer(String),
    #[error("serialization: {0}")]
    Serde(#[from] serde_json::Error),
    #[error("simulated crash after {0} (test hook)")]
    Crash(String),
}

impl ReconcileError {
    /// A short PascalCase reason for conditions, Events and the `reason` metric label.
    pub fn reason(&self) -> String {
        match self {
            ReconcileError::Kube(kube::Error::Api(s)) if s.code == 409 => {
                "KubernetesConflict".into()
            }
            ReconcileError::Kube(_) => "KubernetesApiError".into(),
            ReconcileError::Stripe(StripeError::CircuitOpen { .. }) => "StripeUnavailable".into(),
            ReconcileError::Stripe(e) => match e.status() {
                Some(429) => "StripeRateLimited".into(),
                Some(401) => "StripeUnauthorized".into(),
                Some(403) => "StripePermissionDenied".into(),
                Some(s) if s >= 500 => "StripeUnavailable".into(),
                Some(_) => "StripeRequestRejected".into(),
                None => "StripeUnreachable".into(),
            },
            ReconcileError::Store(e) => e.reason().to_string(),
            ReconcileError::Account { reason, .. } => (*reason).to_string(),
            ReconcileError::ScopeVerification { .. } => "ScopeVerificationFailed".into(),
            ReconcileError::ScopeProbe(_) => "ScopeProbeInconclusive".into(),
            ReconcileError::MissingSecret { .. } => "StripeSecretMissing".into(),
            ReconcileError::SecretNotOwned { .. } => "SecretNotOwned".into(),
            ReconcileError::Finalizer(_) => "FinalizerFailed".into(),
            ReconcileError::Serde(_) => "SerializationFailed".into(),
            ReconcileError::Crash(_) => "SimulatedCrash".into(),
        }
    }
}
