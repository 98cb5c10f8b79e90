//! The mounted webhook secrets: parsing, loading and reloading without a restart.
//!
//! Kubernetes mounts a Secret key as a symlink into a `..data` directory that it swaps
//! atomically on update, so the file is re-read by path and compared by content hash on every
//! poll; no inotify is needed and the swap is never seen half-done.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::secret::SecretString;
use crate::webhook::signature::Verifier;

/// Most secrets read from the file (Stripe signs with at most a handful at once).
pub const MAX_SECRETS: usize = 16;

/// Largest secrets file read.
pub const MAX_SECRETS_FILE_LEN: u64 = 64 * 1024;

/// Why the secrets file could not be used. Never contains a secret.
#[derive(Debug, thiserror::Error)]
pub enum SecretsFileError {
    /// The file (or the key inside the directory) could not be read.
    #[error(
        "cannot read the webhook secrets file {path}: {source}; check that the Secret is \
         mounted and the key exists"
    )]
    Read {
        /// The path that was read.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file is larger than [`MAX_SECRETS_FILE_LEN`].
    #[error("the webhook secrets file {path} is larger than {MAX_SECRETS_FILE_LEN} bytes")]
    TooLarge {
        /// The path that was read.
        path: PathBuf,
    },
    /// The file holds no secret (empty, or only commas and blanks).
    #[error(
        "the webhook secrets file {path} holds no secret; expected comma-separated whsec_ values"
    )]
    Empty {
        /// The path that was read.
        path: PathBuf,
    },
    /// The file holds more than [`MAX_SECRETS`] secrets.
    #[error("the webhook secrets file {path} holds more than {MAX_SECRETS} secrets")]
    TooMany {
        /// The path that was read.
        path: PathBuf,
    },
}

/// Parses the content of a `STRIPE_WEBHOOK_SECRETS` key: comma-separated secrets, newest first;
/// blanks around entries and empty entries (a trailing newline or comma) are ignored.
pub fn parse_secrets(content: &str) -> Vec<SecretString> {
    content
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(SecretString::new)
        .collect()
}

/// A set of secrets with its prepared verifier.
#[derive(Debug)]
pub struct LoadedSecrets {
    verifier: Verifier,
    fingerprints: Vec<String>,
    without_whsec_prefix: Vec<String>,
    content_hash: [u8; 32],
}

impl LoadedSecrets {
    /// Prepares `secrets` (newest first) with `tolerance`.
    pub fn new(secrets: &[SecretString], tolerance: Duration) -> Self {
        let joined: Vec<&str> = secrets.iter().map(SecretString::expose).collect();
        Self {
            verifier: Verifier::new(secrets).with_tolerance(tolerance),
            fingerprints: secrets.iter().map(SecretString::fingerprint).collect(),
            without_whsec_prefix: secrets
                .iter()
                .filter(|s| !s.expose().starts_with("whsec_"))
                .map(SecretString::fingerprint)
                .collect(),
            content_hash: sha256(joined.join(",").as_bytes()),
        }
    }

    /// The verifier over every secret.
    pub fn verifier(&self) -> &Verifier {
        &self.verifier
    }

    /// Fingerprints of the secrets (first 12 hex digits of their SHA-256), newest first.
    pub fn fingerprints(&self) -> &[String] {
        &self.fingerprints
    }

    /// Fingerprints of the secrets that lack Stripe's `whsec_` prefix (a wrong key mounted?).
    pub fn without_whsec_prefix(&self) -> &[String] {
        &self.without_whsec_prefix
    }

    /// How many secrets are loaded.
    pub fn len(&self) -> usize {
        self.fingerprints.len()
    }

    /// Whether no secret is loaded.
    pub fn is_empty(&self) -> bool {
        self.fingerprints.is_empty()
    }
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// Where the secrets are read from: a file, or a directory holding the key (a Secret volume).
#[derive(Debug, Clone)]
pub struct SecretsSource {
    path: PathBuf,
    key: String,
}

impl SecretsSource {
    /// `path` is the key's file, or a directory in which the file `key` is read.
    pub fn new(path: impl Into<PathBuf>, key: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            key: key.into(),
        }
    }

    /// The file actually read (`path`, or `path/key` when `path` is a directory).
    pub fn file(&self) -> PathBuf {
        if self.path.is_dir() {
            self.path.join(&self.key)
        } else {
            self.path.clone()
        }
    }

    /// Reads and parses the secrets.
    pub fn read(&self) -> Result<Vec<SecretString>, SecretsFileError> {
        let path = self.file();
        let bytes = read_bounded(&path)?;
        let content = String::from_utf8_lossy(&bytes);
        let secrets = parse_secrets(&content);
        if secrets.is_empty() {
            return Err(SecretsFileError::Empty { path });
        }
        if secrets.len() > MAX_SECRETS {
            return Err(SecretsFileError::TooMany { path });
        }
        Ok(secrets)
    }

    /// Reads the secrets and returns them prepared, unless their content equals `current`'s.
    pub(crate) fn load_if_changed(
        &self,
        current: Option<&LoadedSecrets>,
        tolerance: Duration,
    ) -> Result<Option<LoadedSecrets>, SecretsFileError> {
        let secrets = self.read()?;
        let joined: Vec<&str> = secrets.iter().map(SecretString::expose).collect();
        let hash = sha256(joined.join(",").as_bytes());
        if current.is_some_and(|c| c.content_hash == hash) {
            return Ok(None);
        }
        Ok(Some(LoadedSecrets::new(&secrets, tolerance)))
    }
}

fn read_bounded(path: &Path) -> Result<Vec<u8>, SecretsFileError> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(|source| SecretsFileError::Read {
        path: path.to_owned(),
        source,
    })?;
    let mut bytes = Vec::new();
    file.take(MAX_SECRETS_FILE_LEN + 1)
        .read_to_end(&mut bytes)
        .map_err(|source| SecretsFileError::Read {
            path: path.to_owned(),
            source,
        })?;
    if bytes.len() as u64 > MAX_SECRETS_FILE_LEN {
        return Err(SecretsFileError::TooLarge {
            path: path.to_owned(),
        });
    }
    Ok(bytes)
}

/// The secrets in use, swapped as a whole on reload (readers take a cheap `Arc` clone).
#[derive(Debug, Default)]
pub(crate) struct SecretsSlot {
    current: std::sync::RwLock<Option<Arc<LoadedSecrets>>>,
}

impl SecretsSlot {
    pub(crate) fn get(&self) -> Option<Arc<LoadedSecrets>> {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    pub(crate) fn set(&self, loaded: LoadedSecrets) {
        *self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Arc::new(loaded));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parsing_splits_on_commas_and_drops_blanks() {
        let s = parse_secrets(" whsec_b , whsec_a,\n");
        let exposed: Vec<&str> = s.iter().map(SecretString::expose).collect();
        assert_eq!(exposed, ["whsec_b", "whsec_a"]);
        assert!(parse_secrets(" ,\n").is_empty());
    }

    #[test]
    fn a_directory_source_reads_the_key_inside_it() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("STRIPE_WEBHOOK_SECRETS"), "whsec_x").unwrap();
        let source = SecretsSource::new(dir.path(), "STRIPE_WEBHOOK_SECRETS");
        assert_eq!(source.read().unwrap()[0].expose(), "whsec_x");
        assert_eq!(source.file(), dir.path().join("STRIPE_WEBHOOK_SECRETS"));
    }

    #[test]
    fn an_empty_file_is_an_error_not_an_empty_set() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("s");
        std::fs::write(&file, "\n").unwrap();
        let err = SecretsSource::new(&file, "k").read().unwrap_err();
        assert!(matches!(err, SecretsFileError::Empty { .. }), "{err}");
    }

    #[test]
    fn unchanged_content_is_not_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("s");
        std::fs::write(&file, "whsec_a").unwrap();
        let source = SecretsSource::new(&file, "k");
        let tol = Duration::from_secs(300);
        let first = source.load_if_changed(None, tol).unwrap().unwrap();
        assert!(source.load_if_changed(Some(&first), tol).unwrap().is_none());
        std::fs::write(&file, "whsec_b,whsec_a").unwrap();
        let second = source.load_if_changed(Some(&first), tol).unwrap().unwrap();
        assert_eq!(second.len(), 2);
    }
}
