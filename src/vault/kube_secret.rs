//! A store on Kubernetes Secrets in the operator's own namespace, for clusters without Vault.
//!
//! Layout (one Secret per store path):
//!
//! - name `sko-store-<32 hex of SHA-256(path)>` (paths can be longer than a Secret name may be);
//!   the full path is in the annotation `stripe-key-operator.io/store-path`;
//! - every kept version lives in the same Secret under data keys `v<N>.<field>`, so a write of
//!   a new version and the pruning of the oldest are one atomic object update;
//! - the annotation `stripe-key-operator.io/versions` holds the kept versions and their write
//!   times as JSON (`[{"version":3,"created":"..."}]`), the current version is the largest;
//! - the latest record's descriptive metadata is in annotations `meta.stripe-key-operator.io/<key>`
//!   (older versions are read back without metadata);
//! - labels: `app.kubernetes.io/managed-by=stripe-key-operator`,
//!   `stripe-key-operator.io/component=secret-store`, and the owner's namespace, kind, name and
//!   UID where they fit a label value.
//!
//! Check-and-set: `Cas::Absent` is a create (AlreadyExists is a conflict); `Cas::Version(n)`
//! reads the Secret, checks that its current version is `n`, and replaces it with the read
//! `resourceVersion`, so the API server rejects the update (409) if anyone wrote in between.

use std::collections::BTreeMap;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{DeleteParams, ListParams, ObjectMeta, PostParams};
use kube::{Api, Client};
use serde::{Deserialize, Serialize};

use super::{Cas, Record, SecretStore, StoreError, StoreHealth, StorePath, VersionInfo, Versioned};
use crate::secret::SecretString;

const ANN_PATH: &str = "stripe-key-operator.io/store-path";
const ANN_VERSIONS: &str = "stripe-key-operator.io/versions";
const META_PREFIX: &str = "meta.stripe-key-operator.io/";
const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
const LABEL_COMPONENT: &str = "stripe-key-operator.io/component";
const COMPONENT: &str = "secret-store";

#[derive(Serialize, Deserialize, Clone, Debug)]
struct KeptVersion {
    version: u64,
    created: DateTime<Utc>,
}

/// A [`SecretStore`] keeping each path in one Kubernetes Secret in the operator's namespace.
#[derive(Clone)]
pub struct KubeSecretStore {
    api: Api<Secret>,
    namespace: String,
    max_versions: usize,
}

impl std::fmt::Debug for KubeSecretStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeSecretStore")
            .field("namespace", &self.namespace)
            .field("max_versions", &self.max_versions)
            .finish()
    }
}

impl KubeSecretStore {
    /// A store in `namespace` (the operator's own), keeping `max_versions` versions per path
    /// (at least 1). The operator needs get, create, update, delete and list on Secrets there.
    pub fn new(client: Client, namespace: impl Into<String>, max_versions: usize) -> Self {
        let namespace = namespace.into();
        Self {
            api: Api::namespaced(client, &namespace),
            namespace,
            max_versions: max_versions.max(1),
        }
    }

    /// The Secret name that holds `path`.
    pub fn secret_name(path: &StorePath) -> String {
        // Paths are user-influenced, so use 128 bits of the digest: collisions are infeasible.
        let long = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, path.as_str().as_bytes());
        format!("sko-store-{}", hex::encode(&long.as_ref()[..16]))
    }

    fn kube_error(&self, operation: &'static str, name: &str, err: kube::Error) -> StoreError {
        let (status, detail) = match &err {
            kube::Error::Api(s) => (Some(s.code), s.message.clone()),
            other => (None, other.to_string()),
        };
        StoreError::Kube {
            operation,
            namespace: self.namespace.clone(),
            name: name.to_owned(),
            status,
            detail: super::error::short(&detail),
        }
    }

    fn kept_versions(
        &self,
        path: &StorePath,
        secret: &Secret,
    ) -> Result<Vec<KeptVersion>, StoreError> {
        let raw = secret
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(ANN_VERSIONS))
            .ok_or_else(|| self.corrupt(path, "annotation versions is missing"))?;
        let mut kept: Vec<KeptVersion> = serde_json::from_str(raw)
            .map_err(|_| self.corrupt(path, "annotation versions is not valid JSON"))?;
        kept.sort_by_key(|k| k.version);
        Ok(kept)
    }

    fn corrupt(&self, path: &StorePath, detail: &str) -> StoreError {
        StoreError::Corrupt {
            path: path.to_string(),
            expected: Record::expected_for(path.kind()),
            detail: format!("Secret {}: {detail}", Self::secret_name(path)),
        }
    }

    fn check_path(&self, path: &StorePath, secret: &Secret) -> Result<(), StoreError> {
        let stored = secret
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(ANN_PATH));
        if stored.map(String::as_str) == Some(path.as_str()) {
            Ok(())
        } else {
            Err(self.corrupt(path, "it belongs to another store path"))
        }
    }

    fn build(
        &self,
        path: &StorePath,
        previous: Option<&Secret>,
        kept: &[KeptVersion],
        record: &Record,
        version: u64,
    ) -> Secret {
        let name = Self::secret_name(path);
        let mut data: BTreeMap<String, ByteString> = BTreeMap::new();
        if let Some(prev) = previous
            && let Some(prev_data) = &prev.data
        {
            for k in kept {
                let prefix = format!("v{}.", k.version);
                for (key, value) in prev_data.iter().filter(|(key, _)| key.starts_with(&prefix)) {
                    data.insert(key.clone(), value.clone());
                }
            }
        }
        for (field, value) in &record.data {
            data.insert(
                format!("v{version}.{field}"),
                ByteString(value.expose().as_bytes().to_vec()),
            );
        }
        let mut annotations = BTreeMap::new();
        annotations.insert(ANN_PATH.to_owned(), path.as_str().to_owned());
        annotations.insert(
            ANN_VERSIONS.to_owned(),
            serde_json::to_string(kept).unwrap_or_else(|_| "[]".into()),
        );
        for (k, v) in &record.metadata {
            annotations.insert(format!("{META_PREFIX}{k}"), v.clone());
        }
        let mut labels = BTreeMap::new();
        labels.insert(LABEL_MANAGED_BY.to_owned(), super::MANAGED_BY.to_owned());
        labels.insert(LABEL_COMPONENT.to_owned(), COMPONENT.to_owned());
        for key in ["owner-namespace", "owner-kind", "owner-name", "owner-uid"] {
            if let Some(v) = record.metadata.get(key)
                && is_label_value(v)
            {
                labels.insert(format!("stripe-key-operator.io/{key}"), v.clone());
            }
        }
        Secret {
            metadata: ObjectMeta {
                name: Some(name),
                namespace: Some(self.namespace.clone()),
                labels: Some(labels),
                annotations: Some(annotations),
                resource_version: previous.and_then(|p| p.metadata.resource_version.clone()),
                ..ObjectMeta::default()
            },
            type_: Some("Opaque".into()),
            data: Some(data),
            ..Secret::default()
        }
    }
}

fn is_label_value(v: &str) -> bool {
    v.len() <= 63
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && v.starts_with(|c: char| c.is_ascii_alphanumeric())
        && v.ends_with(|c: char| c.is_ascii_alphanumeric())
}

#[async_trait]
impl SecretStore for KubeSecretStore {
    fn backend(&self) -> &'static str {
        "kubernetes-secret"
    }

    async fn write_record(
        &self,
        path: &StorePath,
        record: &Record,
        cas: Cas,
    ) -> Result<u64, StoreError> {
        let name = Self::secret_name(path);
        let conflict = |found: String| StoreError::Conflict {
            path: path.to_string(),
            expected: cas.to_string(),
            found,
        };
        match cas {
            Cas::Absent => {
                let kept = vec![KeptVersion {
                    version: 1,
                    created: Utc::now(),
                }];
                let secret = self.build(path, None, &kept, record, 1);
                match self.api.create(&PostParams::default(), &secret).await {
                    Ok(_) => Ok(1),
                    Err(kube::Error::Api(s)) if s.is_already_exists() || s.is_conflict() => {
                        Err(conflict("present".into()))
                    }
                    Err(e) => Err(self.kube_error("create", &name, e)),
                }
            }
            Cas::Version(expected) => {
                let current = self
                    .api
                    .get_opt(&name)
                    .await
                    .map_err(|e| self.kube_error("get", &name, e))?;
                let Some(current) = current else {
                    return Err(conflict("absent".into()));
                };
                self.check_path(path, &current)?;
                let mut kept = self.kept_versions(path, &current)?;
                let have = kept.last().map(|k| k.version).unwrap_or(0);
                if have != expected {
                    return Err(conflict(format!("version {have}")));
                }
                let version = have + 1;
                kept.push(KeptVersion {
                    version,
                    created: Utc::now(),
                });
                while kept.len() > self.max_versions {
                    kept.remove(0);
                }
                let secret = self.build(path, Some(&current), &kept, record, version);
                match self
                    .api
                    .replace(&name, &PostParams::default(), &secret)
                    .await
                {
                    Ok(_) => Ok(version),
                    Err(kube::Error::Api(s)) if s.is_conflict() => {
                        Err(conflict("a newer resourceVersion".into()))
                    }
                    Err(kube::Error::Api(s)) if s.is_not_found() => Err(conflict("absent".into())),
                    Err(e) => Err(self.kube_error("replace", &name, e)),
                }
            }
        }
    }

    async fn read_record(
        &self,
        path: &StorePath,
        version: Option<u64>,
    ) -> Result<Option<Versioned<Record>>, StoreError> {
        let name = Self::secret_name(path);
        let Some(secret) = self
            .api
            .get_opt(&name)
            .await
            .map_err(|e| self.kube_error("get", &name, e))?
        else {
            return Ok(None);
        };
        self.check_path(path, &secret)?;
        let kept = self.kept_versions(path, &secret)?;
        let Some(latest) = kept.last() else {
            return Ok(None);
        };
        let want = version.unwrap_or(latest.version);
        let Some(entry) = kept.iter().find(|k| k.version == want) else {
            return Ok(None);
        };
        let prefix = format!("v{want}.");
        let mut data = BTreeMap::new();
        for (key, value) in secret.data.iter().flatten() {
            if let Some(field) = key.strip_prefix(&prefix) {
                let text = String::from_utf8(value.0.clone())
                    .map_err(|_| self.corrupt(path, "a field is not UTF-8"))?;
                data.insert(field.to_owned(), SecretString::new(text));
            }
        }
        let metadata = if want == latest.version {
            secret
                .metadata
                .annotations
                .iter()
                .flatten()
                .filter_map(|(k, v)| {
                    k.strip_prefix(META_PREFIX)
                        .map(|key| (key.to_owned(), v.clone()))
                })
                .collect()
        } else {
            BTreeMap::new()
        };
        Ok(Some(Versioned {
            value: Record { data, metadata },
            version: want,
            created_time: Some(entry.created),
        }))
    }

    async fn list_versions(&self, path: &StorePath) -> Result<Vec<VersionInfo>, StoreError> {
        let name = Self::secret_name(path);
        let Some(secret) = self
            .api
            .get_opt(&name)
            .await
            .map_err(|e| self.kube_error("get", &name, e))?
        else {
            return Ok(Vec::new());
        };
        self.check_path(path, &secret)?;
        Ok(self
            .kept_versions(path, &secret)?
            .into_iter()
            .map(|k| VersionInfo {
                version: k.version,
                created_time: Some(k.created),
                deleted: false,
                destroyed: false,
            })
            .collect())
    }

    async fn delete(&self, path: &StorePath) -> Result<(), StoreError> {
        let name = Self::secret_name(path);
        match self.api.delete(&name, &DeleteParams::default()).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.is_not_found() => Ok(()),
            Err(e) => Err(self.kube_error("delete", &name, e)),
        }
    }

    async fn health(&self) -> Result<StoreHealth, StoreError> {
        let lp = ListParams::default()
            .labels(&format!("{LABEL_COMPONENT}={COMPONENT}"))
            .limit(1);
        self.api
            .list_metadata(&lp)
            .await
            .map_err(|e| self.kube_error("list", "*", e))?;
        Ok(StoreHealth {
            backend: "kubernetes-secret",
            detail: format!("Secrets in namespace {}", self.namespace),
        })
    }
}
