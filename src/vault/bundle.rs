//! What the store holds: credential bundles and account keys, and their flat encoding.

use std::collections::BTreeMap;
use std::fmt;

use chrono::{DateTime, Utc};

use super::{PathKind, StoreError, StorePath};
use crate::secret::SecretString;

/// Value of the `managed-by` custom metadata key on everything the operator writes.
pub const MANAGED_BY: &str = "stripe-key-operator";
const BUNDLE_FORMAT: &str = "credential-bundle/v1";
const ACCOUNT_KEY_FORMAT: &str = "account-encryption-key/v1";

/// The Kubernetes object a bundle belongs to. Stored beside the secret and in the store's
/// metadata so an operator (human) can tell what a path is for and who owns it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owner {
    /// Namespace of the owning resource.
    pub namespace: String,
    /// Kind of the owning resource (e.g. `StripeKey`).
    pub kind: String,
    /// Name of the owning resource.
    pub name: String,
    /// UID of the owning resource (tells apart a deleted and re-created resource).
    pub uid: String,
}

/// One secret with its public identifiers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyMaterial {
    /// The secret itself (`rk_...` restricted key or `whsec_...` signing secret).
    pub secret: SecretString,
    /// Stripe's id for it (the restricted key's or webhook endpoint's id); safe to show.
    pub key_id: String,
    /// First 12 hex of the SHA-256 of the secret; safe to show.
    pub fingerprint: String,
}

impl KeyMaterial {
    /// Wraps a secret and computes its fingerprint.
    pub fn new(secret: SecretString, key_id: impl Into<String>) -> Self {
        let fingerprint = secret.fingerprint();
        Self {
            secret,
            key_id: key_id.into(),
            fingerprint,
        }
    }
}

/// Everything a consumer needs for one resource, written in one store write so a reader
/// never sees half of a rotation: the current secret, optionally the previous one (kept until
/// every workload has rolled to the current one), the rotation number and the owner.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CredentialBundle {
    /// The secret workloads should use now.
    pub current: KeyMaterial,
    /// The secret being phased out, still valid at Stripe, if any.
    pub previous: Option<KeyMaterial>,
    /// 0 for the first secret minted, incremented by every rotation.
    pub rotation: u64,
    /// The resource the bundle belongs to.
    pub owner: Owner,
}

impl CredentialBundle {
    /// The first bundle of a resource (rotation 0, no previous secret).
    pub fn initial(owner: Owner, current: KeyMaterial) -> Self {
        Self {
            current,
            previous: None,
            rotation: 0,
            owner,
        }
    }

    /// The bundle after a rotation: `next` becomes current, the current secret becomes
    /// previous, and the rotation number goes up by one.
    pub fn rotated(&self, next: KeyMaterial) -> Self {
        Self {
            current: next,
            previous: Some(self.current.clone()),
            rotation: self.rotation + 1,
            owner: self.owner.clone(),
        }
    }

    /// The bundle once the previous secret has been expired at Stripe.
    pub fn without_previous(&self) -> Self {
        Self {
            previous: None,
            ..self.clone()
        }
    }

    /// Encodes the bundle as one flat record (data for the single KV write, plus the
    /// non-secret custom metadata).
    pub fn to_record(&self) -> Record {
        let mut data = BTreeMap::new();
        let mut put = |k: &str, v: &str| {
            data.insert(k.to_owned(), SecretString::new(v));
        };
        put("format", BUNDLE_FORMAT);
        put("secret", self.current.secret.expose());
        put("key_id", &self.current.key_id);
        put("fingerprint", &self.current.fingerprint);
        if let Some(prev) = &self.previous {
            put("previous_secret", prev.secret.expose());
            put("previous_key_id", &prev.key_id);
            put("previous_fingerprint", &prev.fingerprint);
        }
        put("rotation", &self.rotation.to_string());
        put("owner_namespace", &self.owner.namespace);
        put("owner_kind", &self.owner.kind);
        put("owner_name", &self.owner.name);
        put("owner_uid", &self.owner.uid);

        let mut metadata = BTreeMap::new();
        metadata.insert("managed-by".to_owned(), MANAGED_BY.to_owned());
        metadata.insert("record".to_owned(), "credential-bundle".to_owned());
        metadata.insert("owner-namespace".to_owned(), self.owner.namespace.clone());
        metadata.insert("owner-kind".to_owned(), self.owner.kind.clone());
        metadata.insert("owner-name".to_owned(), self.owner.name.clone());
        metadata.insert("owner-uid".to_owned(), self.owner.uid.clone());
        metadata.insert("key-id".to_owned(), self.current.key_id.clone());
        metadata.insert("fingerprint".to_owned(), self.current.fingerprint.clone());
        if let Some(prev) = &self.previous {
            metadata.insert("previous-key-id".to_owned(), prev.key_id.clone());
            metadata.insert("previous-fingerprint".to_owned(), prev.fingerprint.clone());
        }
        metadata.insert("rotation".to_owned(), self.rotation.to_string());
        Record { data, metadata }
    }

    /// Decodes and checks a record read from `path`: every field present, each fingerprint
    /// matching its secret.
    pub fn from_record(path: &StorePath, record: &Record) -> Result<Self, StoreError> {
        let r = Reader {
            path,
            record,
            expected: "credential bundle",
        };
        r.expect_format(BUNDLE_FORMAT)?;
        let current = r.material("secret", "key_id", "fingerprint")?;
        let previous = if record.data.contains_key("previous_secret") {
            Some(r.material("previous_secret", "previous_key_id", "previous_fingerprint")?)
        } else {
            None
        };
        let rotation = r
            .plain("rotation")?
            .parse::<u64>()
            .map_err(|_| r.corrupt("field rotation is not a number"))?;
        Ok(Self {
            current,
            previous,
            rotation,
            owner: Owner {
                namespace: r.plain("owner_namespace")?.to_owned(),
                kind: r.plain("owner_kind")?.to_owned(),
                name: r.plain("owner_name")?.to_owned(),
                uid: r.plain("owner_uid")?.to_owned(),
            },
        })
    }
}

/// An account's RSA private key (PKCS#8 PEM), used to decrypt the JWE that Stripe returns
/// restricted keys in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccountKey {
    /// The account resource's name.
    pub account: String,
    /// `-----BEGIN PRIVATE KEY-----` PKCS#8 PEM.
    pub private_key_pem: SecretString,
}

impl AccountKey {
    /// Fingerprint of the PEM (first 12 hex of its SHA-256); safe to show.
    pub fn fingerprint(&self) -> String {
        self.private_key_pem.fingerprint()
    }

    /// Encodes the key as one flat record.
    pub fn to_record(&self) -> Record {
        let mut data = BTreeMap::new();
        data.insert("format".to_owned(), SecretString::new(ACCOUNT_KEY_FORMAT));
        data.insert(
            "account".to_owned(),
            SecretString::new(self.account.clone()),
        );
        data.insert("private_key_pem".to_owned(), self.private_key_pem.clone());
        data.insert(
            "fingerprint".to_owned(),
            SecretString::new(self.fingerprint()),
        );
        let mut metadata = BTreeMap::new();
        metadata.insert("managed-by".to_owned(), MANAGED_BY.to_owned());
        metadata.insert("record".to_owned(), "account-encryption-key".to_owned());
        metadata.insert("account".to_owned(), self.account.clone());
        metadata.insert("fingerprint".to_owned(), self.fingerprint());
        Record { data, metadata }
    }

    /// Decodes and checks a record read from `path`.
    pub fn from_record(path: &StorePath, record: &Record) -> Result<Self, StoreError> {
        let r = Reader {
            path,
            record,
            expected: "account encryption key",
        };
        r.expect_format(ACCOUNT_KEY_FORMAT)?;
        let pem = r.secret("private_key_pem")?;
        if pem.fingerprint() != r.plain("fingerprint")? {
            return Err(r.corrupt("the private key does not match its recorded fingerprint"));
        }
        if !pem.expose().starts_with("-----BEGIN PRIVATE KEY-----") {
            return Err(r.corrupt("the private key is not a PKCS#8 PEM"));
        }
        Ok(Self {
            account: r.plain("account")?.to_owned(),
            private_key_pem: pem,
        })
    }
}

/// The flat form every backend stores: `data` goes into one write (Vault KV data, Secret
/// data), `metadata` is descriptive and never holds secret material (Vault `custom_metadata`,
/// Secret annotations).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Record {
    /// Field name to value; values may be secret.
    pub data: BTreeMap<String, SecretString>,
    /// Field name to value; never secret.
    pub metadata: BTreeMap<String, String>,
}

impl Record {
    /// The record type a path of this kind must hold (for error messages).
    pub fn expected_for(kind: PathKind) -> &'static str {
        match kind {
            PathKind::Credential => "credential bundle",
            PathKind::AccountKey => "account encryption key",
        }
    }
}

struct Reader<'a> {
    path: &'a StorePath,
    record: &'a Record,
    expected: &'static str,
}

impl Reader<'_> {
    fn corrupt(&self, detail: impl Into<String>) -> StoreError {
        StoreError::Corrupt {
            path: self.path.to_string(),
            expected: self.expected,
            detail: detail.into(),
        }
    }

    fn secret(&self, key: &str) -> Result<SecretString, StoreError> {
        self.record
            .data
            .get(key)
            .cloned()
            .ok_or_else(|| self.corrupt(format!("field {key} is missing")))
    }

    /// A field that is not secret (ids, fingerprints, numbers, names).
    fn plain(&self, key: &str) -> Result<&str, StoreError> {
        self.record
            .data
            .get(key)
            .map(|v| v.expose())
            .ok_or_else(|| self.corrupt(format!("field {key} is missing")))
    }

    fn expect_format(&self, format: &str) -> Result<(), StoreError> {
        match self.record.data.get("format").map(|f| f.expose()) {
            Some(f) if f == format => Ok(()),
            Some(other) => Err(self.corrupt(format!(
                "format is {:?}, expected {format:?}",
                other.chars().take(40).collect::<String>()
            ))),
            None => Err(self.corrupt("field format is missing")),
        }
    }

    fn material(&self, secret: &str, key_id: &str, fp: &str) -> Result<KeyMaterial, StoreError> {
        let value = self.secret(secret)?;
        let fingerprint = self.plain(fp)?.to_owned();
        if value.fingerprint() != fingerprint {
            return Err(self.corrupt(format!(
                "field {secret} does not match its recorded fingerprint {fingerprint}"
            )));
        }
        Ok(KeyMaterial {
            secret: value,
            key_id: self.plain(key_id)?.to_owned(),
            fingerprint,
        })
    }
}

/// A value read from the store together with the store's version number for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Versioned<T> {
    /// The decoded value.
    pub value: T,
    /// The store's version number (Vault KV v2 version; starts at 1). Pass it back as
    /// [`Cas::Version`] to update exactly this state.
    pub version: u64,
    /// When this version was written, if the backend records it.
    pub created_time: Option<DateTime<Utc>>,
}

/// One version kept by the store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VersionInfo {
    /// Version number (ascending, starts at 1).
    pub version: u64,
    /// When it was written, if known.
    pub created_time: Option<DateTime<Utc>>,
    /// Soft-deleted (its data is hidden but recoverable in Vault).
    pub deleted: bool,
    /// Destroyed (its data is gone).
    pub destroyed: bool,
}

/// The check-and-set condition of a write. Every write has one: there is no blind overwrite.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cas {
    /// The path must not hold anything yet (first write).
    Absent,
    /// The path's current version must be exactly this one.
    Version(u64),
}

impl Cas {
    /// The condition that matches a read: `Absent` if nothing was there, else its version.
    pub fn after_read(current: Option<u64>) -> Self {
        match current {
            None | Some(0) => Cas::Absent,
            Some(v) => Cas::Version(v),
        }
    }

    /// The version number Vault's `cas` parameter expects (0 means "must not exist").
    pub fn as_vault_cas(self) -> u64 {
        match self {
            Cas::Absent => 0,
            Cas::Version(v) => v,
        }
    }
}

impl fmt::Display for Cas {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Cas::Absent => f.write_str("absent"),
            Cas::Version(v) => write!(f, "version {v}"),
        }
    }
}

/// What [`SecretStore::health`](super::SecretStore::health) reports when the store is usable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreHealth {
    /// `vault`, `memory` or `kubernetes-secret`.
    pub backend: &'static str,
    /// Server version or other short detail.
    pub detail: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vault::StorePrefix;

    fn path() -> StorePath {
        StorePath::credential(
            &StorePrefix::new("sko").unwrap(),
            "shop",
            "stripekey",
            "checkout",
        )
        .unwrap()
    }

    fn owner() -> Owner {
        Owner {
            namespace: "shop".into(),
            kind: "StripeKey".into(),
            name: "checkout".into(),
            uid: "0b4c6a5e-2f7e-4d8e-9c8f-1d2e3f4a5b6c".into(),
        }
    }

    fn rotated_bundle() -> CredentialBundle {
        CredentialBundle::initial(
            owner(),
            KeyMaterial::new("rk_test_first_secret_value".into(), "rk_1"),
        )
        .rotated(KeyMaterial::new(
            "rk_test_second_secret_value".into(),
            "rk_2",
        ))
    }

    #[test]
    fn bundle_round_trips_through_its_record() {
        let bundle = rotated_bundle();
        assert_eq!(bundle.rotation, 1);
        assert_eq!(bundle.previous.as_ref().unwrap().key_id, "rk_1");
        let back = CredentialBundle::from_record(&path(), &bundle.to_record()).unwrap();
        assert_eq!(back, bundle);
        let trimmed = bundle.without_previous();
        let back = CredentialBundle::from_record(&path(), &trimmed.to_record()).unwrap();
        assert_eq!(back.previous, None);
        assert_eq!(back.rotation, 1);
    }

    #[test]
    fn bundle_metadata_carries_owner_and_ids_but_no_secret() {
        let bundle = rotated_bundle();
        let record = bundle.to_record();
        assert_eq!(record.metadata["owner-uid"], owner().uid);
        assert_eq!(record.metadata["owner-kind"], "StripeKey");
        assert_eq!(record.metadata["key-id"], "rk_2");
        assert_eq!(record.metadata["previous-key-id"], "rk_1");
        assert_eq!(record.metadata["rotation"], "1");
        assert_eq!(record.metadata["fingerprint"], bundle.current.fingerprint);
        for value in record.metadata.values() {
            assert!(!value.contains("secret_value"), "metadata leaks a secret");
        }
    }

    #[test]
    fn tampered_secret_is_reported_as_corrupt_without_showing_it() {
        let mut record = rotated_bundle().to_record();
        record
            .data
            .insert("secret".into(), SecretString::new("rk_test_tampered_value"));
        let err = CredentialBundle::from_record(&path(), &record).unwrap_err();
        assert_eq!(err.reason(), "VaultRecordCorrupt");
        assert!(!err.to_string().contains("tampered"), "{err}");
        assert!(!format!("{err:?}").contains("tampered"));
    }

    #[test]
    fn missing_fields_and_wrong_format_are_corrupt() {
        let mut record = rotated_bundle().to_record();
        record.data.remove("owner_uid");
        assert!(CredentialBundle::from_record(&path(), &record).is_err());
        let key = AccountKey {
            account: "acme".into(),
            private_key_pem: "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"
                .into(),
        };
        let err = CredentialBundle::from_record(&path(), &key.to_record()).unwrap_err();
        assert!(err.to_string().contains("format"), "{err}");
    }

    #[test]
    fn account_key_round_trips_and_keeps_pem_out_of_metadata() {
        let key = AccountKey {
            account: "acme".into(),
            private_key_pem: "-----BEGIN PRIVATE KEY-----\nMIIEvQ\n-----END PRIVATE KEY-----\n"
                .into(),
        };
        let record = key.to_record();
        assert!(record.metadata.values().all(|v| !v.contains("MIIEvQ")));
        let p = StorePath::account_key(&StorePrefix::new("sko").unwrap(), "acme").unwrap();
        assert_eq!(AccountKey::from_record(&p, &record).unwrap(), key);
    }

    #[test]
    fn debug_output_of_bundles_and_records_is_redacted() {
        let bundle = rotated_bundle();
        assert!(!format!("{bundle:?}").contains("secret_value"));
        assert!(!format!("{:?}", bundle.to_record()).contains("secret_value"));
    }

    #[test]
    fn cas_after_read_maps_absent_and_versions() {
        assert_eq!(Cas::after_read(None), Cas::Absent);
        assert_eq!(Cas::after_read(Some(3)), Cas::Version(3));
        assert_eq!(Cas::Absent.as_vault_cas(), 0);
        assert_eq!(Cas::Version(7).to_string(), "version 7");
    }
}
