//! The secret store: where minted Stripe secrets and per-account RSA keys live.
//!
//! [`SecretStore`] is the one interface the controllers use; it is object safe and meant to be
//! held as `Arc<dyn SecretStore>`. Backends:
//!
//! - [`VaultStore`]: HashiCorp Vault or OpenBao, KV version 2 (production);
//! - [`MemoryStore`]: in-process, same check-and-set and version semantics (tests, sandbox);
//! - [`KubeSecretStore`]: one Kubernetes Secret per path in the operator's own namespace
//!   (clusters without Vault).
//!
//! Every write is a check-and-set ([`Cas`]): a concurrent writer makes the write fail with
//! [`StoreError::Conflict`] (reason `VaultConflict`) and the caller retries from a fresh read;
//! nothing is ever silently overwritten. A [`CredentialBundle`] (current secret, previous
//! secret, rotation number, owner) is written in a single write, so a reader sees either the
//! old or the new bundle, never half of a rotation.
//!
//! Paths come only from [`StorePath`] constructors, which validate every segment, so a
//! resource cannot name a path outside `<prefix>/<its namespace>/...`.

mod bundle;
mod error;
mod instrumented;
mod kube_secret;
mod memory;
mod path;
mod vault_kv;

pub use bundle::{
    AccountKey, Cas, CredentialBundle, KeyMaterial, MANAGED_BY, Owner, Record, StoreHealth,
    VersionInfo, Versioned,
};
pub use error::StoreError;
pub use instrumented::InstrumentedStore;
pub use kube_secret::KubeSecretStore;
pub use memory::MemoryStore;
pub use path::{
    MAX_LABEL_LEN, MAX_NAME_LEN, MAX_PREFIX_SEGMENTS, MAX_SUB_PATH_SEGMENTS, PathKind, StorePath,
    StorePrefix,
};
pub use vault_kv::{DEFAULT_SERVICE_ACCOUNT_TOKEN_FILE, VaultAuth, VaultConfig, VaultStore};

use async_trait::async_trait;

/// A versioned secret store with check-and-set writes.
///
/// Implementors provide the five record-level operations; the typed bundle and account-key
/// methods are provided on top of them and are what controllers call.
#[async_trait]
pub trait SecretStore: Send + Sync + std::fmt::Debug {
    /// Short backend name for logs and health output (`vault`, `memory`, `kubernetes-secret`).
    fn backend(&self) -> &'static str;

    /// Writes `record` at `path` if the path's current state matches `cas`; returns the new
    /// version. A mismatch is [`StoreError::Conflict`], never an overwrite.
    async fn write_record(
        &self,
        path: &StorePath,
        record: &Record,
        cas: Cas,
    ) -> Result<u64, StoreError>;

    /// Reads the latest version (`version: None`) or a given version. `Ok(None)` when the path
    /// (or that version) does not exist, was pruned, or was deleted.
    async fn read_record(
        &self,
        path: &StorePath,
        version: Option<u64>,
    ) -> Result<Option<Versioned<Record>>, StoreError>;

    /// The versions the store still keeps for `path`, oldest first (empty when absent).
    async fn list_versions(&self, path: &StorePath) -> Result<Vec<VersionInfo>, StoreError>;

    /// Removes `path` with all its versions and metadata (cleanup when a resource is deleted).
    /// Deleting a path that does not exist succeeds.
    async fn delete(&self, path: &StorePath) -> Result<(), StoreError>;

    /// Checks that the store is reachable, unsealed and that the operator can authenticate.
    async fn health(&self) -> Result<StoreHealth, StoreError>;

    /// Reads one field of a KV secret that an administrator put at `path` (relative to the
    /// mount) — a Stripe App key or an encryption key named by a cluster-scoped StripeAccount.
    /// Only the Vault backend supports it; `Ok(None)` when the path or the field is absent.
    async fn read_external_field(
        &self,
        path: &str,
        _field: &str,
    ) -> Result<Option<crate::secret::SecretString>, StoreError> {
        Err(StoreError::Config(format!(
            "the {} secret store cannot read the Vault path {path:?}; run with --store=vault or \
             name the Stripe App key with credentials.secretRef",
            self.backend()
        )))
    }

    /// Writes a credential bundle in one write, with check-and-set; returns the new version.
    async fn write_bundle(
        &self,
        path: &StorePath,
        bundle: &CredentialBundle,
        cas: Cas,
    ) -> Result<u64, StoreError> {
        expect_kind(path, PathKind::Credential)?;
        self.write_record(path, &bundle.to_record(), cas).await
    }

    /// Reads the latest credential bundle and its version (`Ok(None)` when absent).
    async fn read_bundle(
        &self,
        path: &StorePath,
    ) -> Result<Option<Versioned<CredentialBundle>>, StoreError> {
        self.read_bundle_version(path, None).await
    }

    /// Reads a given version of a credential bundle (`None` = latest).
    async fn read_bundle_version(
        &self,
        path: &StorePath,
        version: Option<u64>,
    ) -> Result<Option<Versioned<CredentialBundle>>, StoreError> {
        expect_kind(path, PathKind::Credential)?;
        let Some(found) = self.read_record(path, version).await? else {
            return Ok(None);
        };
        Ok(Some(Versioned {
            value: CredentialBundle::from_record(path, &found.value)?,
            version: found.version,
            created_time: found.created_time,
        }))
    }

    /// Writes an account's RSA private key with check-and-set; returns the new version.
    async fn write_account_key(
        &self,
        path: &StorePath,
        key: &AccountKey,
        cas: Cas,
    ) -> Result<u64, StoreError> {
        expect_kind(path, PathKind::AccountKey)?;
        self.write_record(path, &key.to_record(), cas).await
    }

    /// Reads an account's RSA private key (`Ok(None)` when none was stored yet).
    async fn read_account_key(
        &self,
        path: &StorePath,
    ) -> Result<Option<Versioned<AccountKey>>, StoreError> {
        expect_kind(path, PathKind::AccountKey)?;
        let Some(found) = self.read_record(path, None).await? else {
            return Ok(None);
        };
        Ok(Some(Versioned {
            value: AccountKey::from_record(path, &found.value)?,
            version: found.version,
            created_time: found.created_time,
        }))
    }
}

fn expect_kind(path: &StorePath, kind: PathKind) -> Result<(), StoreError> {
    if path.kind() == kind {
        Ok(())
    } else {
        Err(StoreError::InvalidPath {
            field: "path",
            value: path.to_string(),
            problem: match kind {
                PathKind::Credential => "is not a credential path (use StorePath::credential)",
                PathKind::AccountKey => "is not an account-key path (use StorePath::account_key)",
            },
        })
    }
}

/// Installs aws-lc-rs as rustls' process-wide crypto provider, once.
///
/// The operator's HTTP clients (kube, reqwest for Vault and Stripe) all use rustls with
/// aws-lc-rs; rustls picks it automatically while it is the only provider compiled in. Call
/// this at start-up anyway so that a dependency enabling a second provider cannot turn into a
/// "could not determine the process-level CryptoProvider" panic. Calling it again is harmless.
pub fn install_crypto_provider() {
    // An Err means a provider is already installed, which is what we want.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}
