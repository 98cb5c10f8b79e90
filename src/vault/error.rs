//! Errors of the secret store, with a machine reason for conditions and Events.

/// What went wrong while talking to the secret store.
///
/// [`StoreError::reason`] is a short CamelCase word for a condition's `reason` or an Event;
/// [`StoreError::is_transient`] says whether retrying later (with backoff) can succeed without
/// anyone changing configuration. Messages name what failed and what to do; they never contain
/// secret material (only paths, mounts, addresses, key ids and fingerprints).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A path segment failed validation; the resource's spec must be fixed.
    #[error(
        "invalid secret store path: {field} {value:?} {problem}; use lowercase DNS-label names (a-z, 0-9, '-')"
    )]
    InvalidPath {
        /// Which part of the path (namespace, kind, name, sub_path segment, prefix, account).
        field: &'static str,
        /// The rejected value, truncated to 80 characters.
        value: String,
        /// What is wrong with it.
        problem: &'static str,
    },

    /// Someone else wrote the path since it was read; re-read and retry from fresh state.
    #[error(
        "write to {path} lost a check-and-set race (expected {expected}, store has {found}); re-read the current bundle and retry"
    )]
    Conflict {
        /// The path written.
        path: String,
        /// What the writer expected (`absent` or `version N`).
        expected: String,
        /// What the store holds, when known (`absent`, `version N` or `unknown`).
        found: String,
    },

    /// The Vault server is sealed and refuses every request until it is unsealed.
    #[error(
        "Vault at {address} is sealed; unseal it (bao/vault operator unseal) and the operator will retry"
    )]
    Sealed {
        /// The server address.
        address: String,
    },

    /// The server could not be reached (connection refused, DNS, TLS, timeout).
    #[error(
        "cannot reach the secret store at {address}: {detail}; check the address, network policy and TLS settings"
    )]
    Unreachable {
        /// The server address.
        address: String,
        /// The transport-level cause.
        detail: String,
    },

    /// The operator's Vault identity is not allowed to do this.
    #[error(
        "Vault denied {operation} on {mount}/{path} (permission denied); grant the operator's policy {capabilities} on \"{mount}/data/{path}\" and \"{mount}/metadata/{path}\""
    )]
    PermissionDenied {
        /// What the operator tried (write, read, list versions, delete, ...).
        operation: &'static str,
        /// The KV mount.
        mount: String,
        /// The path below the mount.
        path: String,
        /// The capabilities the operation needs.
        capabilities: &'static str,
    },

    /// The KV v2 mount does not exist or is not a KV version 2 engine.
    #[error(
        "Vault mount {mount:?} {problem}; enable it with `bao secrets enable -path={mount} kv-v2` or fix the configured mount"
    )]
    MountMissing {
        /// The configured mount.
        mount: String,
        /// What is wrong (missing, or not KV version 2).
        problem: &'static str,
    },

    /// Logging in to Vault failed (Kubernetes, AppRole) or the token is unusable.
    #[error("Vault login with {method} auth at mount {mount:?} failed: {detail}")]
    AuthFailed {
        /// `kubernetes`, `approle` or `token`.
        method: &'static str,
        /// The auth mount.
        mount: String,
        /// What failed and what to check.
        detail: String,
    },

    /// The server answered with an error that is expected to clear (5xx, 429, standby).
    #[error(
        "the secret store at {address} is temporarily unavailable (HTTP {status}): {detail}; the operator will retry"
    )]
    Unavailable {
        /// The server address.
        address: String,
        /// HTTP status.
        status: u16,
        /// The server's error text, truncated.
        detail: String,
    },

    /// The server rejected the request for another reason (a 4xx that retrying will not fix).
    #[error("the secret store rejected {operation} on {path} (HTTP {status}): {detail}")]
    Rejected {
        /// What the operator tried.
        operation: &'static str,
        /// The path.
        path: String,
        /// HTTP status.
        status: u16,
        /// The server's error text, truncated.
        detail: String,
    },

    /// A stored record could not be decoded or failed its integrity check.
    #[error(
        "the record at {path} is not a valid {expected}: {detail}; it was changed outside the operator: delete it to let the operator rewrite it"
    )]
    Corrupt {
        /// The path.
        path: String,
        /// The record type expected there.
        expected: &'static str,
        /// What is wrong (never the record's content).
        detail: String,
    },

    /// The store's configuration is unusable (bad address, unreadable credential file, ...).
    #[error("invalid secret store configuration: {0}")]
    Config(String),

    /// A Kubernetes API call of the Secret-backed store failed.
    #[error("Kubernetes API call {operation} on Secret {namespace}/{name} failed: {detail}")]
    Kube {
        /// What the operator tried.
        operation: &'static str,
        /// The operator's namespace.
        namespace: String,
        /// The Secret's name.
        name: String,
        /// HTTP status, when the API server answered.
        status: Option<u16>,
        /// The API server's message or the transport error.
        detail: String,
    },
}

impl StoreError {
    /// A short machine reason for conditions and Events, e.g. `VaultSealed`.
    ///
    /// Every backend reports the same reasons for the same situation (a lost check-and-set race
    /// is `VaultConflict` in the in-memory store too), so the controller handles them uniformly.
    pub fn reason(&self) -> &'static str {
        match self {
            StoreError::InvalidPath { .. } => "InvalidStorePath",
            StoreError::Conflict { .. } => "VaultConflict",
            StoreError::Sealed { .. } => "VaultSealed",
            StoreError::Unreachable { .. } => "VaultUnreachable",
            StoreError::PermissionDenied { .. } => "VaultPermissionDenied",
            StoreError::MountMissing { .. } => "VaultMountMissing",
            StoreError::AuthFailed { .. } => "VaultAuthFailed",
            StoreError::Unavailable { .. } => "VaultUnavailable",
            StoreError::Rejected { .. } => "VaultRequestRejected",
            StoreError::Corrupt { .. } => "VaultRecordCorrupt",
            StoreError::Config(_) => "VaultConfigInvalid",
            StoreError::Kube { .. } => "SecretStoreKubeError",
        }
    }

    /// Whether retrying later can succeed without a configuration change.
    ///
    /// A [`StoreError::Conflict`] is transient: re-read and retry at once. Permission, mount,
    /// path, login and corruption errors need a human; the controller should still requeue them
    /// with a long backoff, since the fix happens outside the operator.
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Conflict { .. }
            | StoreError::Sealed { .. }
            | StoreError::Unreachable { .. }
            | StoreError::Unavailable { .. } => true,
            StoreError::Kube { status, .. } => {
                matches!(status, None | Some(409 | 429 | 500..=599))
            }
            StoreError::InvalidPath { .. }
            | StoreError::PermissionDenied { .. }
            | StoreError::MountMissing { .. }
            | StoreError::AuthFailed { .. }
            | StoreError::Rejected { .. }
            | StoreError::Corrupt { .. }
            | StoreError::Config(_) => false,
        }
    }

    /// Whether this is a lost check-and-set race (re-read and retry).
    pub fn is_conflict(&self) -> bool {
        matches!(self, StoreError::Conflict { .. })
    }
}

/// Keeps server-provided error text short and on one line.
pub(crate) fn short(text: &str) -> String {
    let one_line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    let mut out: String = one_line.chars().take(200).collect();
    if out.len() < one_line.len() {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_and_transience_match_what_the_controller_needs() {
        let sealed = StoreError::Sealed {
            address: "http://127.0.0.1:8200".into(),
        };
        assert_eq!(sealed.reason(), "VaultSealed");
        assert!(sealed.is_transient());
        let denied = StoreError::PermissionDenied {
            operation: "write",
            mount: "secret".into(),
            path: "p/ns/k/n".into(),
            capabilities: "create, update",
        };
        assert_eq!(denied.reason(), "VaultPermissionDenied");
        assert!(!denied.is_transient());
        assert!(denied.to_string().contains("secret/data/p/ns/k/n"));
        let conflict = StoreError::Conflict {
            path: "p".into(),
            expected: "version 1".into(),
            found: "version 2".into(),
        };
        assert!(conflict.is_conflict() && conflict.is_transient());
        assert_eq!(conflict.reason(), "VaultConflict");
        let missing = StoreError::MountMissing {
            mount: "kv".into(),
            problem: "does not exist",
        };
        assert_eq!(missing.reason(), "VaultMountMissing");
        assert!(!missing.is_transient());
    }

    #[test]
    fn short_truncates_and_flattens_server_text() {
        assert_eq!(
            short("1 error occurred:\n\t* permission denied\n\n"),
            "1 error occurred: * permission denied"
        );
        assert_eq!(short(&"x".repeat(500)).chars().count(), 201);
    }
}
