//! The admission webhook's TLS certificate.
//!
//! Two ways to get one ([`CertMode`]):
//! - `self-signed`: the operator keeps a CA and a serving certificate for
//!   `<service>.<namespace>.svc` in a Secret of its namespace ([`ensure_self_signed`]), reuses
//!   them across restarts and replicas, renews the serving certificate 30 days before it expires
//!   (the CA one year before; the old CA stays in the bundle meanwhile), and writes the CA bundle
//!   into `caBundle` of every webhook of the named ValidatingWebhookConfiguration
//!   ([`inject_ca_bundle`]), again whenever something (a `helm upgrade`) resets it.
//! - `files`: `tls.crt` and `tls.key` of a directory (a cert-manager Certificate's Secret
//!   mounted as a volume), reloaded when they change ([`watch_files`]); cert-manager's CA
//!   injector fills `caBundle`.
//!
//! Replicas share the Secret: it is created once (a second creator gets `409` and adopts the
//! first one's) and replaced only with the resourceVersion it was read at, so two replicas never
//! end up with different CAs. The server picks the certificate per handshake from a
//! [`CertStore`], so a renewal needs no restart.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use base64::Engine;
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use crate::api::{MANAGED_BY, MANAGED_BY_LABEL};
use crate::secret::SecretString;

/// Where the webhook's certificate comes from.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum CertMode {
    /// The operator generates a CA and a serving certificate, keeps them in a Secret of its
    /// namespace and injects the CA into the ValidatingWebhookConfiguration.
    SelfSigned,
    /// `tls.crt` and `tls.key` from `--webhook-cert-dir` (cert-manager), reloaded on change.
    Files,
    /// No admission webhook server.
    Disabled,
}

/// Secret key of the serving certificate (PEM).
pub const TLS_CRT: &str = "tls.crt";
/// Secret key of the serving certificate's private key (PEM, PKCS#8).
pub const TLS_KEY: &str = "tls.key";
/// Secret key of the CA bundle (PEM, current CA first) that `caBundle` carries.
pub const CA_CRT: &str = "ca.crt";
/// Secret key of the current CA's private key (PEM, PKCS#8).
pub const CA_KEY: &str = "ca.key";
/// Common name of the generated CA.
pub const CA_COMMON_NAME: &str = "stripe-key-operator webhook CA";
/// Lifetime of a generated CA.
pub const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// A CA with less than this left is replaced (its predecessor stays trusted until it expires).
pub const CA_RENEW_BEFORE: Duration = Duration::from_secs(365 * 24 * 3600);
/// Lifetime of a serving certificate.
pub const SERVING_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
/// A serving certificate with less than this left is renewed.
pub const SERVING_RENEW_BEFORE: Duration = Duration::from_secs(30 * 24 * 3600);

/// Certificate management errors.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// Generating or signing a certificate failed.
    #[error("generating the webhook certificate failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// A PEM file or Secret value is not a usable certificate or key.
    #[error("the webhook {what} is not usable: {message}")]
    Invalid {
        /// `certificate`, `private key`, ...
        what: &'static str,
        /// Why.
        message: String,
    },
    /// Reading `tls.crt`/`tls.key` failed.
    #[error("reading {path} failed: {source}; mount the cert-manager Secret at --webhook-cert-dir")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A Kubernetes API call failed.
    #[error("{action} failed: {source}; check the operator's RBAC for it")]
    Kube {
        /// What was being done.
        action: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// Replicas kept racing on the Secret.
    #[error("the webhook TLS Secret {0} kept changing under the operator; retrying later")]
    Contended(String),
}

fn kube_err(action: impl Into<String>) -> impl FnOnce(kube::Error) -> TlsError {
    let action = action.into();
    move |source| TlsError::Kube { action, source }
}

/// A serving certificate and its key, plus the CA bundle clients must trust (empty in `files`
/// mode, where cert-manager injects it).
#[derive(Clone)]
pub struct ServingCert {
    /// The certificate chain, PEM.
    pub cert_pem: String,
    /// The private key, PEM.
    pub key_pem: SecretString,
    /// The CA bundle, PEM.
    pub ca_bundle_pem: String,
}

impl std::fmt::Debug for ServingCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServingCert")
            .field(
                "cert_sha256",
                &crate::secret::fingerprint(self.cert_pem.as_bytes()),
            )
            .field("key", &self.key_pem)
            .finish()
    }
}

/// The DNS names of the webhook Service: what the API server dials.
pub fn dns_names(service: &str, namespace: &str) -> Vec<String> {
    vec![
        service.to_string(),
        format!("{service}.{namespace}"),
        format!("{service}.{namespace}.svc"),
        format!("{service}.{namespace}.svc.cluster.local"),
    ]
}

fn to_offset(t: std::time::SystemTime) -> OffsetDateTime {
    OffsetDateTime::from(t)
}

fn ca_params(now: OffsetDateTime) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_COMMON_NAME);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = now - Duration::from_secs(300);
    params.not_after = now + CA_VALIDITY;
    params
}

/// A CA: its certificate and private key, PEM.
#[derive(Clone)]
pub struct CaMaterial {
    /// The CA certificate, PEM.
    pub cert_pem: String,
    /// The CA private key, PEM.
    pub key_pem: SecretString,
}

/// Generates a CA (ECDSA P-256) valid for [`CA_VALIDITY`] from `now`.
pub fn generate_ca(now: std::time::SystemTime) -> Result<CaMaterial, TlsError> {
    let key = KeyPair::generate()?;
    let cert = ca_params(to_offset(now)).self_signed(&key)?;
    Ok(CaMaterial {
        cert_pem: cert.pem(),
        key_pem: SecretString::new(key.serialize_pem()),
    })
}

/// Issues a serving certificate for `dns_names`, signed by `ca`, valid for `validity` from `now`.
/// Returns the certificate (PEM) and its private key (PEM).
pub fn issue_serving_cert(
    ca: &CaMaterial,
    dns_names: &[String],
    now: std::time::SystemTime,
    validity: Duration,
) -> Result<(String, SecretString), TlsError> {
    let ca_key = KeyPair::from_pem(ca.key_pem.expose()).map_err(|e| TlsError::Invalid {
        what: "CA private key",
        message: e.to_string(),
    })?;
    let issuer = Issuer::from_ca_cert_pem(&ca.cert_pem, ca_key)?;
    let now = to_offset(now);
    let mut params = CertificateParams::new(dns_names.to_vec())?;
    let mut dn = DistinguishedName::new();
    dn.push(
        DnType::CommonName,
        dns_names
            .get(2)
            .or(dns_names.first())
            .cloned()
            .unwrap_or_default(),
    );
    params.distinguished_name = dn;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    params.not_before = now - Duration::from_secs(300);
    params.not_after = now + validity;
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    Ok((cert.pem(), SecretString::new(key.serialize_pem())))
}

/// What is known of a certificate, read from its PEM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// notBefore.
    pub not_before: std::time::SystemTime,
    /// notAfter.
    pub not_after: std::time::SystemTime,
    /// DNS subject alternative names.
    pub dns_names: Vec<String>,
}

/// Reads the validity and DNS names of the first certificate of `pem`.
pub fn cert_info(pem: &str) -> Result<CertInfo, TlsError> {
    let invalid = |message: String| TlsError::Invalid {
        what: "certificate",
        message,
    };
    let (_, pem) =
        x509_parser::pem::parse_x509_pem(pem.as_bytes()).map_err(|e| invalid(e.to_string()))?;
    let cert = pem.parse_x509().map_err(|e| invalid(e.to_string()))?;
    let at = |t: x509_parser::time::ASN1Time| -> std::time::SystemTime { t.to_datetime().into() };
    let validity = cert.validity();
    let dns_names = match cert.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_string()),
                _ => None,
            })
            .collect(),
        Ok(None) => Vec::new(),
        Err(e) => return Err(invalid(e.to_string())),
    };
    Ok(CertInfo {
        not_before: at(validity.not_before),
        not_after: at(validity.not_after),
        dns_names,
    })
}

/// What to do with the material found in the Secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// It is valid for the Service and not near expiry.
    Reuse,
    /// The CA is fine; the serving certificate is missing, near expiry or for other names.
    ReissueServing,
    /// The CA is missing, unreadable or near expiry: a new CA and serving certificate.
    NewCa,
}

fn remaining(info: &CertInfo, now: std::time::SystemTime) -> Duration {
    info.not_after.duration_since(now).unwrap_or_default()
}

/// Decides whether the Secret's data can be reused at `now` for `dns_names`. Pure.
pub fn assess(
    data: &BTreeMap<String, String>,
    dns_names: &[String],
    now: std::time::SystemTime,
) -> Decision {
    let ca_ok = match (data.get(CA_CRT), data.get(CA_KEY)) {
        (Some(ca), Some(key)) => {
            KeyPair::from_pem(key).is_ok()
                && cert_info(ca).is_ok_and(|i| {
                    i.not_before <= now + Duration::from_secs(600)
                        && remaining(&i, now) > CA_RENEW_BEFORE
                })
        }
        _ => false,
    };
    if !ca_ok {
        return Decision::NewCa;
    }
    let serving_ok = match (data.get(TLS_CRT), data.get(TLS_KEY)) {
        (Some(crt), Some(key)) => {
            certified_key(crt, key).is_ok()
                && cert_info(crt).is_ok_and(|i| {
                    remaining(&i, now) > SERVING_RENEW_BEFORE
                        && dns_names.iter().all(|n| i.dns_names.contains(n))
                })
        }
        _ => false,
    };
    if serving_ok {
        Decision::Reuse
    } else {
        Decision::ReissueServing
    }
}

/// Builds the Secret data for `decision` from the `current` data. `NewCa` keeps the previous
/// CA in the bundle while it is still valid, so that certificates it signed stay trusted.
pub fn renew(
    current: &BTreeMap<String, String>,
    decision: Decision,
    dns_names: &[String],
    now: std::time::SystemTime,
) -> Result<BTreeMap<String, String>, TlsError> {
    let (ca, bundle) = match decision {
        Decision::Reuse => return Ok(current.clone()),
        Decision::ReissueServing => {
            let ca = CaMaterial {
                cert_pem: current.get(CA_CRT).cloned().unwrap_or_default(),
                key_pem: SecretString::new(current.get(CA_KEY).cloned().unwrap_or_default()),
            };
            let bundle = ca.cert_pem.clone();
            // The bundle's first certificate is the current CA: sign with that one.
            let first = first_pem_cert(&ca.cert_pem).unwrap_or_default();
            (
                CaMaterial {
                    cert_pem: first,
                    key_pem: ca.key_pem,
                },
                bundle,
            )
        }
        Decision::NewCa => {
            let ca = generate_ca(now)?;
            let mut bundle = ca.cert_pem.clone();
            if let Some(old) = current.get(CA_CRT).and_then(|b| first_pem_cert(b))
                && cert_info(&old).is_ok_and(|i| i.not_after > now)
            {
                bundle.push_str(&old);
            }
            (ca, bundle)
        }
    };
    let (crt, key) = issue_serving_cert(&ca, dns_names, now, SERVING_VALIDITY)?;
    Ok(BTreeMap::from([
        (CA_CRT.to_string(), bundle),
        (CA_KEY.to_string(), ca.key_pem.expose().to_string()),
        (TLS_CRT.to_string(), crt),
        (TLS_KEY.to_string(), key.expose().to_string()),
    ]))
}

fn first_pem_cert(bundle: &str) -> Option<String> {
    let end = "-----END CERTIFICATE-----";
    let start = bundle.find("-----BEGIN CERTIFICATE-----")?;
    let stop = bundle[start..].find(end)? + start + end.len();
    Some(format!("{}\n", &bundle[start..stop]))
}

/// A rustls signing key and chain from PEM.
pub fn certified_key(cert_pem: &str, key_pem: &str) -> Result<CertifiedKey, TlsError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Invalid {
            what: "certificate",
            message: e.to_string(),
        })?;
    if chain.is_empty() {
        return Err(TlsError::Invalid {
            what: "certificate",
            message: "no PEM CERTIFICATE block".into(),
        });
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| TlsError::Invalid {
        what: "private key",
        message: e.to_string(),
    })?;
    let signer = rustls::crypto::aws_lc_rs::sign::any_supported_type(&key).map_err(|e| {
        TlsError::Invalid {
            what: "private key",
            message: e.to_string(),
        }
    })?;
    let ck = CertifiedKey::new(chain, signer);
    ck.keys_match().map_err(|e| TlsError::Invalid {
        what: "certificate and private key pair",
        message: e.to_string(),
    })?;
    Ok(ck)
}

/// The certificate the server presents, replaceable while it serves.
#[derive(Debug)]
pub struct CertStore {
    current: RwLock<(Arc<CertifiedKey>, String)>,
}

impl CertStore {
    /// A store presenting `cert`.
    pub fn new(cert: &ServingCert) -> Result<Self, TlsError> {
        let ck = certified_key(&cert.cert_pem, cert.key_pem.expose())?;
        Ok(Self {
            current: RwLock::new((Arc::new(ck), fingerprint(cert))),
        })
    }

    /// Presents `cert` from the next handshake on. Returns whether it differs from the current.
    pub fn replace(&self, cert: &ServingCert) -> Result<bool, TlsError> {
        let fp = fingerprint(cert);
        if self.fingerprint() == fp {
            return Ok(false);
        }
        let ck = certified_key(&cert.cert_pem, cert.key_pem.expose())?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = (Arc::new(ck), fp);
        Ok(true)
    }

    /// Fingerprint (first 12 hex of SHA-256) of the presented certificate's PEM.
    pub fn fingerprint(&self) -> String {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .1
            .clone()
    }
}

fn fingerprint(cert: &ServingCert) -> String {
    crate::secret::fingerprint(cert.cert_pem.as_bytes())
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .0
                .clone(),
        )
    }
}

/// Where the self-signed material lives and where its CA goes.
#[derive(Debug, Clone)]
pub struct SelfSignedConfig {
    /// The operator's namespace (the Secret's and the Service's).
    pub namespace: String,
    /// The Secret holding the CA and the serving certificate.
    pub secret_name: String,
    /// The webhook Service's name.
    pub service: String,
    /// The ValidatingWebhookConfiguration whose `caBundle`s are kept; `None`: none.
    pub webhook_config_name: Option<String>,
}

fn secret_strings(secret: &Secret) -> BTreeMap<String, String> {
    secret
        .data
        .iter()
        .flatten()
        .filter_map(|(k, v)| String::from_utf8(v.0.clone()).ok().map(|s| (k.clone(), s)))
        .collect()
}

fn serving_from(data: &BTreeMap<String, String>) -> ServingCert {
    ServingCert {
        cert_pem: data.get(TLS_CRT).cloned().unwrap_or_default(),
        key_pem: SecretString::new(data.get(TLS_KEY).cloned().unwrap_or_default()),
        ca_bundle_pem: data.get(CA_CRT).cloned().unwrap_or_default(),
    }
}

fn tls_secret(
    cfg: &SelfSignedConfig,
    data: BTreeMap<String, String>,
    rv: Option<String>,
) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(cfg.secret_name.clone()),
            namespace: Some(cfg.namespace.clone()),
            labels: Some(BTreeMap::from([(
                MANAGED_BY_LABEL.to_string(),
                MANAGED_BY.to_string(),
            )])),
            resource_version: rv,
            ..Default::default()
        },
        type_: Some("kubernetes.io/tls".into()),
        data: Some(
            data.into_iter()
                .map(|(k, v)| (k, ByteString(v.into_bytes())))
                .collect(),
        ),
        ..Default::default()
    }
}

/// Makes sure the Secret holds a CA and a serving certificate valid at `now` for the Service,
/// creating or renewing them as needed, and returns them. Safe to run from every replica at
/// once: creation and replacement are conditional, and a loser adopts the winner's material.
pub async fn ensure_self_signed(
    client: &kube::Client,
    cfg: &SelfSignedConfig,
    now: std::time::SystemTime,
) -> Result<ServingCert, TlsError> {
    let api: Api<Secret> = Api::namespaced(client.clone(), &cfg.namespace);
    let names = dns_names(&cfg.service, &cfg.namespace);
    let what = format!("{}/{}", cfg.namespace, cfg.secret_name);
    for _ in 0..5 {
        let existing = api
            .get_opt(&cfg.secret_name)
            .await
            .map_err(kube_err(format!("reading the webhook TLS Secret {what}")))?;
        let current = existing.as_ref().map(secret_strings).unwrap_or_default();
        let decision = assess(&current, &names, now);
        if decision == Decision::Reuse {
            return Ok(serving_from(&current));
        }
        let data = renew(&current, decision, &names, now)?;
        let result = match &existing {
            None => api
                .create(&PostParams::default(), &tls_secret(cfg, data.clone(), None))
                .await
                .map(|_| ()),
            Some(s) => api
                .replace(
                    &cfg.secret_name,
                    &PostParams::default(),
                    &tls_secret(cfg, data.clone(), s.metadata.resource_version.clone()),
                )
                .await
                .map(|_| ()),
        };
        match result {
            Ok(()) => {
                tracing::info!(
                    secret = %what,
                    ?decision,
                    certificate = %crate::secret::fingerprint(data[TLS_CRT].as_bytes()),
                    "wrote the webhook TLS Secret"
                );
                return Ok(serving_from(&data));
            }
            // Another replica created or changed it first: read it again.
            Err(kube::Error::Api(s)) if s.code == 409 => continue,
            Err(e) => {
                return Err(kube_err(format!("writing the webhook TLS Secret {what}"))(
                    e,
                ));
            }
        }
    }
    Err(TlsError::Contended(what))
}

/// What [`inject_ca_bundle`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Injection {
    /// At least one `caBundle` was written.
    Patched,
    /// Every `caBundle` already held the bundle: nothing written.
    Current,
    /// The configuration does not exist (yet: Helm may create it after the Deployment).
    Missing,
}

/// Writes `ca_bundle_pem` into `clientConfig.caBundle` of every webhook of the
/// ValidatingWebhookConfiguration `name`, only where it differs. A missing configuration is not
/// an error (the chart may create it after the operator starts): it returns
/// [`Injection::Missing`].
pub async fn inject_ca_bundle(
    client: &kube::Client,
    name: &str,
    ca_bundle_pem: &str,
) -> Result<Injection, TlsError> {
    let api: Api<ValidatingWebhookConfiguration> = Api::all(client.clone());
    let Some(vwc) = api.get_opt(name).await.map_err(kube_err(format!(
        "reading ValidatingWebhookConfiguration {name}"
    )))?
    else {
        tracing::warn!(%name, "the ValidatingWebhookConfiguration does not exist (yet); caBundle not injected");
        return Ok(Injection::Missing);
    };
    let want = ca_bundle_pem.as_bytes();
    let mut ops = Vec::new();
    for (i, w) in vwc.webhooks.iter().flatten().enumerate() {
        if w.client_config.ca_bundle.as_ref().map(|b| b.0.as_slice()) == Some(want) {
            continue;
        }
        // `test` makes the patch fail instead of writing into the wrong webhook if the list
        // changed since it was read.
        ops.push(serde_json::json!({"op": "test", "path": format!("/webhooks/{i}/name"), "value": w.name}));
        ops.push(serde_json::json!({
            "op": "add",
            "path": format!("/webhooks/{i}/clientConfig/caBundle"),
            "value": base64::engine::general_purpose::STANDARD.encode(want),
        }));
    }
    if ops.is_empty() {
        return Ok(Injection::Current);
    }
    let patch: json_patch::Patch =
        serde_json::from_value(serde_json::Value::Array(ops)).map_err(|e| TlsError::Invalid {
            what: "caBundle patch",
            message: e.to_string(),
        })?;
    api.patch(name, &PatchParams::default(), &Patch::<()>::Json(patch))
        .await
        .map_err(kube_err(format!(
            "patching caBundle of ValidatingWebhookConfiguration {name}"
        )))?;
    tracing::info!(%name, ca = %crate::secret::fingerprint(want), "injected the webhook CA bundle");
    Ok(Injection::Patched)
}

/// How soon the configuration is looked for again while it does not exist.
const MISSING_CONFIG_RETRY: Duration = Duration::from_secs(5);

/// Keeps the self-signed material valid and the `caBundle` injected until `shutdown`: every
/// `interval` (every 5 s while the configuration does not exist yet), re-reads the Secret
/// (renewing when due), presents its certificate and re-injects the bundle where it differs.
/// `injected` is what the first injection at start found. Errors are logged and retried.
pub async fn run_self_signed(
    client: kube::Client,
    cfg: SelfSignedConfig,
    store: Arc<CertStore>,
    interval: Duration,
    injected: Injection,
    shutdown: CancellationToken,
) {
    let mut last = injected;
    loop {
        let wait = if last == Injection::Missing {
            interval.min(MISSING_CONFIG_RETRY)
        } else {
            interval
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        match ensure_self_signed(&client, &cfg, std::time::SystemTime::now()).await {
            Ok(cert) => {
                match store.replace(&cert) {
                    Ok(true) => {
                        tracing::info!(certificate = %store.fingerprint(), "now presenting the renewed webhook certificate")
                    }
                    Ok(false) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "the webhook TLS Secret holds an unusable certificate")
                    }
                }
                if let Some(name) = &cfg.webhook_config_name {
                    match inject_ca_bundle(&client, name, &cert.ca_bundle_pem).await {
                        Ok(i) => last = i,
                        Err(e) => {
                            tracing::warn!(error = %e, "could not inject the webhook CA bundle")
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not check the webhook TLS Secret"),
        }
    }
}

/// Reads `tls.crt` and `tls.key` from `dir`.
pub fn load_files(dir: &Path) -> Result<ServingCert, TlsError> {
    let read = |name: &str| {
        let path = dir.join(name);
        std::fs::read_to_string(&path).map_err(|source| TlsError::Read { path, source })
    };
    let cert = ServingCert {
        cert_pem: read(TLS_CRT)?,
        key_pem: SecretString::new(read(TLS_KEY)?),
        ca_bundle_pem: String::new(),
    };
    certified_key(&cert.cert_pem, cert.key_pem.expose())?;
    Ok(cert)
}

/// Reloads `tls.crt`/`tls.key` of `dir` every `interval` until `shutdown`, presenting them when
/// they changed (a Secret volume is updated in place by the kubelet). A half-written or broken
/// pair is logged and the previous certificate stays in use.
pub async fn watch_files(
    dir: PathBuf,
    store: Arc<CertStore>,
    interval: Duration,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        match load_files(&dir).and_then(|c| store.replace(&c)) {
            Ok(true) => {
                tracing::info!(certificate = %store.fingerprint(), "reloaded the webhook certificate")
            }
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "keeping the current webhook certificate"),
        }
    }
}
