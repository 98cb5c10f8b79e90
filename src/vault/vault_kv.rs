//! The HashiCorp Vault / OpenBao backend (KV version 2), built on `vaultrs`.
//!
//! The operator's Vault policy needs, for a KV v2 mount `secret` and prefix
//! `stripe-key-operator`:
//!
//! ```hcl
//! path "secret/data/stripe-key-operator/*" {
//!   capabilities = ["create", "read", "update"]
//! }
//! path "secret/metadata/stripe-key-operator/*" {
//!   capabilities = ["create", "read", "update", "delete"]
//! }
//! ```
//!
//! `metadata` carries `custom_metadata`, `max_versions` and `cas_required`, lists versions,
//! and `delete` on it removes a resource's path with all versions at cleanup. Token renewal
//! (`auth/token/renew-self`) and lookup (`auth/token/lookup-self`) are in Vault's `default`
//! policy.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tokio::sync::Mutex;
use tokio::time::Instant;
use vaultrs::api::kv2::requests::{
    ReadSecretRequest, SetSecretMetadataRequest, SetSecretRequestOptions,
};
use vaultrs::client::{Client as _, VaultClient, VaultClientSettingsBuilder};
use vaultrs::error::ClientError;

use super::error::short;
use super::{Cas, Record, SecretStore, StoreError, StoreHealth, StorePath, VersionInfo, Versioned};
use crate::secret::SecretString;

/// Where the kubelet mounts a pod's service-account token.
pub const DEFAULT_SERVICE_ACCOUNT_TOKEN_FILE: &str =
    "/var/run/secrets/kubernetes.io/serviceaccount/token";

/// How the operator authenticates to Vault.
#[derive(Clone, Debug)]
pub enum VaultAuth {
    /// Kubernetes auth: log in with the pod's service-account token (re-read from the file at
    /// every login, since projected tokens rotate).
    Kubernetes {
        /// Auth mount path (usually `kubernetes`).
        mount: String,
        /// Vault role bound to the operator's service account.
        role: String,
        /// Service-account token file.
        token_file: PathBuf,
    },
    /// AppRole auth: role id plus a secret id read from a file (re-read at every login).
    AppRole {
        /// Auth mount path (usually `approle`).
        mount: String,
        /// The role id (not secret by itself).
        role_id: String,
        /// File holding the secret id.
        secret_id_file: PathBuf,
    },
    /// A fixed token, for development. It is renewed while renewable; it cannot be replaced
    /// when it expires or is revoked.
    Token(SecretString),
}

impl VaultAuth {
    /// Kubernetes auth at mount `kubernetes` with the pod's default token file.
    pub fn kubernetes(role: impl Into<String>) -> Self {
        VaultAuth::Kubernetes {
            mount: "kubernetes".into(),
            role: role.into(),
            token_file: PathBuf::from(DEFAULT_SERVICE_ACCOUNT_TOKEN_FILE),
        }
    }

    /// AppRole auth at mount `approle`.
    pub fn approle(role_id: impl Into<String>, secret_id_file: impl Into<PathBuf>) -> Self {
        VaultAuth::AppRole {
            mount: "approle".into(),
            role_id: role_id.into(),
            secret_id_file: secret_id_file.into(),
        }
    }

    /// Short method name: `kubernetes`, `approle` or `token`.
    pub fn method(&self) -> &'static str {
        match self {
            VaultAuth::Kubernetes { .. } => "kubernetes",
            VaultAuth::AppRole { .. } => "approle",
            VaultAuth::Token(_) => "token",
        }
    }

    fn mount(&self) -> &str {
        match self {
            VaultAuth::Kubernetes { mount, .. } | VaultAuth::AppRole { mount, .. } => mount,
            VaultAuth::Token(_) => "token",
        }
    }

    /// Whether the operator can obtain a new token by itself (not for a fixed token).
    pub fn can_login(&self) -> bool {
        !matches!(self, VaultAuth::Token(_))
    }
}

/// Settings of the Vault backend.
#[derive(Clone, Debug)]
pub struct VaultConfig {
    /// Server address, e.g. `https://vault.vault.svc:8200`.
    pub address: String,
    /// Mount path of the KV version 2 engine (default `secret`).
    pub kv_mount: String,
    /// How to authenticate.
    pub auth: VaultAuth,
    /// Versions kept per path (`max_versions` in the path's metadata); `None` leaves the
    /// mount's setting. Default 10.
    pub max_versions: Option<u64>,
    /// PEM file with the CA bundle that signed Vault's certificate (for `https`).
    pub ca_cert_file: Option<PathBuf>,
    /// Vault Enterprise / OpenBao namespace, if any.
    pub namespace: Option<String>,
    /// Timeout of each HTTP request (default 10 s).
    pub request_timeout: Duration,
}

impl VaultConfig {
    /// A configuration with defaults: mount `secret`, 10 versions, 10 s timeout.
    pub fn new(address: impl Into<String>, auth: VaultAuth) -> Self {
        Self {
            address: address.into(),
            kv_mount: "secret".into(),
            auth,
            max_versions: Some(10),
            ca_cert_file: None,
            namespace: None,
            request_timeout: Duration::from_secs(10),
        }
    }
}

/// What an operation needs from Vault, for error messages.
#[derive(Clone, Copy)]
struct Op {
    name: &'static str,
    capabilities: &'static str,
}

const OP_WRITE: Op = Op {
    name: "write",
    capabilities: "create, update",
};
const OP_READ: Op = Op {
    name: "read",
    capabilities: "read",
};
const OP_VERSIONS: Op = Op {
    name: "list versions",
    capabilities: "read",
};
const OP_DELETE: Op = Op {
    name: "delete",
    capabilities: "delete",
};

#[derive(Default)]
struct Session {
    client: Option<Arc<VaultClient>>,
    /// When the current token expires; `None` for tokens without TTL.
    expires_at: Option<Instant>,
    /// The lease the token was issued (or last renewed) with.
    lease: Duration,
    /// The lease obtained at login; renewals shorter than a third of it mean the token is
    /// near its max TTL.
    login_lease: Duration,
    renewable: bool,
    /// Bumped at every login, so that concurrent 403s trigger one re-login, not many.
    generation: u64,
}

/// A [`SecretStore`] on Vault or OpenBao KV version 2.
///
/// Creating it does no I/O; the first call logs in. Tokens are renewed on use when less than
/// a third of their lease is left (and by [`VaultStore::spawn_token_renewer`] in the
/// background, so an idle operator keeps its token); when a call is denied (HTTP 403) the store
/// logs in again once and retries, which recovers from revoked or expired tokens with
/// Kubernetes and AppRole auth.
///
/// Each bundle is one KV write with `cas`; the path's `custom_metadata` is then set to the
/// owner, key ids, fingerprints and rotation number (never a secret), together with
/// `max_versions` and `cas_required=true`. The metadata is descriptive: if that second call
/// fails the data write still stands (a warning is logged) and the data stays authoritative.
pub struct VaultStore {
    config: VaultConfig,
    session: Mutex<Session>,
}

impl std::fmt::Debug for VaultStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VaultStore")
            .field("address", &self.config.address)
            .field("kv_mount", &self.config.kv_mount)
            .field("auth", &self.config.auth.method())
            .finish()
    }
}

impl VaultStore {
    /// Validates the configuration; does not contact Vault.
    pub fn new(config: VaultConfig) -> Result<Self, StoreError> {
        let url = url::Url::parse(&config.address).map_err(|e| {
            StoreError::Config(format!(
                "Vault address {:?} is not a URL ({e}); use e.g. https://vault.vault.svc:8200",
                config.address
            ))
        })?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(StoreError::Config(format!(
                "Vault address {:?} must start with http:// or https://",
                config.address
            )));
        }
        let mount = config.kv_mount.trim_matches('/').to_owned();
        if mount.is_empty() || mount.split('/').any(|s| s.is_empty() || s == "..") {
            return Err(StoreError::Config(format!(
                "KV mount {:?} is not a valid mount path",
                config.kv_mount
            )));
        }
        let mut config = config;
        config.kv_mount = mount;
        if let VaultAuth::Token(t) = &config.auth
            && t.is_empty()
        {
            return Err(StoreError::Config(
                "token auth needs a non-empty token".into(),
            ));
        }
        Ok(Self {
            config,
            session: Mutex::new(Session::default()),
        })
    }

    /// The configuration in use.
    pub fn config(&self) -> &VaultConfig {
        &self.config
    }

    /// Logs in now (instead of at the first call), to fail fast at start-up.
    pub async fn login(&self) -> Result<(), StoreError> {
        let mut session = self.session.lock().await;
        self.login_locked(&mut session).await
    }

    /// Renews (or replaces) the token in the background whenever two thirds of its lease
    /// have passed, so an idle operator does not lose it. The task ends when the store is
    /// dropped. Errors are logged and retried after 5 s.
    pub fn spawn_token_renewer(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let weak: Weak<Self> = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let wait = {
                    let Some(store) = weak.upgrade() else { return };
                    match store.session_client().await {
                        Ok(_) => store.time_until_renewal().await,
                        Err(err) => {
                            tracing::warn!(
                                reason = err.reason(),
                                error = %err,
                                "Vault token renewal failed; retrying in 5s"
                            );
                            Duration::from_secs(5)
                        }
                    }
                };
                tokio::time::sleep(wait).await;
            }
        })
    }

    async fn time_until_renewal(&self) -> Duration {
        let session = self.session.lock().await;
        if !session.renewable && !self.config.auth.can_login() {
            // Nothing to do for a fixed, non-renewable token: it lives until its TTL ends.
            return Duration::from_secs(300);
        }
        match session.expires_at {
            // An expired fixed token cannot come back; calls will report it.
            Some(at) if at <= Instant::now() && !self.config.auth.can_login() => {
                Duration::from_secs(300)
            }
            // Wake up when a third of the lease is left (at most twice a second).
            Some(at) => {
                let wake = at
                    .checked_sub(session.lease / 3)
                    .unwrap_or(at)
                    .saturating_duration_since(Instant::now());
                wake.max(Duration::from_millis(500))
            }
            // Tokens without TTL need no renewal; look again later in case of a re-login.
            None => Duration::from_secs(300),
        }
    }

    fn build_client(&self, token: &str) -> Result<VaultClient, StoreError> {
        let mut settings = VaultClientSettingsBuilder::default();
        settings
            .address(&self.config.address)
            .token(token)
            .timeout(Some(self.config.request_timeout))
            .verify(true)
            .identity(None)
            .ca_certs(
                self.config
                    .ca_cert_file
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect(),
            )
            .namespace(self.config.namespace.clone());
        let settings = settings
            .build()
            .map_err(|e| StoreError::Config(format!("Vault client settings: {e}")))?;
        VaultClient::new(settings).map_err(|e| {
            StoreError::Config(format!(
                "cannot build the Vault HTTP client ({e}); check the CA certificate file"
            ))
        })
    }

    /// Reads a login credential (service-account JWT, AppRole secret id). The file's content is
    /// wiped from memory once the trimmed credential is taken from it.
    fn read_credential_file(&self, what: &str, path: &PathBuf) -> Result<SecretString, StoreError> {
        let content = std::fs::read_to_string(path).map_err(|e| StoreError::AuthFailed {
            method: self.config.auth.method(),
            mount: self.config.auth.mount().to_owned(),
            detail: format!(
                "cannot read the {what} file {} ({e}); mount it into the operator's pod",
                path.display()
            ),
        })?;
        let content = zeroize::Zeroizing::new(content);
        let trimmed = SecretString::new(content.trim());
        if trimmed.is_empty() {
            return Err(StoreError::AuthFailed {
                method: self.config.auth.method(),
                mount: self.config.auth.mount().to_owned(),
                detail: format!("the {what} file {} is empty", path.display()),
            });
        }
        Ok(trimmed)
    }

    /// Turns a login failure into a typed error: transport and seal problems keep their own
    /// reason (they are transient), everything else is an authentication failure.
    fn login_error(&self, err: ClientError, hint: &str) -> StoreError {
        let classified = self.classify(err, OP_READ, "(login)");
        match classified {
            StoreError::Sealed { .. }
            | StoreError::Unreachable { .. }
            | StoreError::Unavailable { .. } => classified,
            other => StoreError::AuthFailed {
                method: self.config.auth.method(),
                mount: self.config.auth.mount().to_owned(),
                detail: format!("{}; {hint}", server_detail(&other)),
            },
        }
    }

    async fn login_locked(&self, session: &mut Session) -> Result<(), StoreError> {
        let (client, lease, renewable) = match &self.config.auth {
            VaultAuth::Token(token) => {
                let client = self.build_client(token.expose())?;
                let info = client.lookup().await.map_err(|e| {
                    self.login_error(
                        e,
                        "the token is invalid, expired or revoked: issue a new one",
                    )
                })?;
                (
                    client,
                    Duration::from_secs(info.ttl),
                    info.renewable.unwrap_or(false),
                )
            }
            VaultAuth::Kubernetes {
                mount,
                role,
                token_file,
            } => {
                let jwt = self.read_credential_file("service-account token", token_file)?;
                let anonymous = self.build_client("")?;
                let mut auth = vaultrs::auth::kubernetes::login(&anonymous, mount, role, jwt.expose())
                    .await
                    .map_err(|e| {
                        self.login_error(
                            e,
                            &format!(
                                "check that role {role:?} exists on auth mount {mount:?}, is bound to the operator's service account and namespace, and that the mount's kubernetes_host is reachable from Vault"
                            ),
                        )
                    })?;
                // The token lives on only inside the Vault client; this copy is wiped.
                let token = zeroize::Zeroizing::new(std::mem::take(&mut auth.client_token));
                let client = self.build_client(&token)?;
                (
                    client,
                    Duration::from_secs(auth.lease_duration),
                    auth.renewable,
                )
            }
            VaultAuth::AppRole {
                mount,
                role_id,
                secret_id_file,
            } => {
                let secret_id = self.read_credential_file("AppRole secret id", secret_id_file)?;
                let anonymous = self.build_client("")?;
                let mut auth =
                    vaultrs::auth::approle::login(&anonymous, mount, role_id, secret_id.expose())
                    .await
                    .map_err(|e| {
                        self.login_error(
                            e,
                            &format!(
                                "check the role id and that the secret id in the file is valid and not expired (auth mount {mount:?})"
                            ),
                        )
                    })?;
                // The token lives on only inside the Vault client; this copy is wiped.
                let token = zeroize::Zeroizing::new(std::mem::take(&mut auth.client_token));
                let client = self.build_client(&token)?;
                (
                    client,
                    Duration::from_secs(auth.lease_duration),
                    auth.renewable,
                )
            }
        };
        session.client = Some(Arc::new(client));
        session.expires_at = (!lease.is_zero()).then(|| Instant::now() + lease);
        session.lease = lease;
        session.login_lease = lease;
        session.renewable = renewable;
        session.generation += 1;
        tracing::info!(
            method = self.config.auth.method(),
            ttl_seconds = lease.as_secs(),
            renewable,
            "logged in to Vault"
        );
        Ok(())
    }

    /// Renews the token when less than a third of its lease is left; logs in again when it
    /// cannot be renewed (not renewable, near its max TTL, or renewal refused).
    async fn renew_if_due_locked(&self, session: &mut Session) -> Result<(), StoreError> {
        let Some(expires_at) = session.expires_at else {
            return Ok(());
        };
        let now = Instant::now();
        let remaining = expires_at.saturating_duration_since(now);
        if remaining > session.lease / 3 {
            return Ok(());
        }
        let can_login = self.config.auth.can_login();
        if session.renewable
            && !remaining.is_zero()
            && let Some(client) = session.client.clone()
        {
            match client.renew(None).await {
                Ok(mut auth) => {
                    // The same token comes back: wipe this copy.
                    zeroize::Zeroize::zeroize(&mut auth.client_token);
                    let lease = Duration::from_secs(auth.lease_duration);
                    session.expires_at = (!lease.is_zero()).then(|| now + lease);
                    session.lease = lease;
                    tracing::debug!(ttl_seconds = lease.as_secs(), "renewed the Vault token");
                    if can_login && lease < session.login_lease / 3 {
                        // Near the token's max TTL: a fresh login gives a full lease.
                        return self.login_locked(session).await;
                    }
                    return Ok(());
                }
                Err(err) => {
                    let err = self.classify(err, OP_READ, "(token renewal)");
                    if !can_login || err.is_transient() {
                        return Err(err);
                    }
                    tracing::info!(
                        reason = err.reason(),
                        "token renewal refused; logging in again"
                    );
                }
            }
        }
        if can_login {
            self.login_locked(session).await
        } else {
            // A fixed token that cannot be renewed: keep using it until Vault refuses it.
            Ok(())
        }
    }

    async fn session_client(&self) -> Result<(Arc<VaultClient>, u64), StoreError> {
        let mut session = self.session.lock().await;
        if session.client.is_none() {
            self.login_locked(&mut session).await?;
        } else {
            self.renew_if_due_locked(&mut session).await?;
        }
        let client = session
            .client
            .clone()
            .ok_or_else(|| StoreError::Config("no Vault session after login".into()))?;
        Ok((client, session.generation))
    }

    /// Runs `call`; on a 403 logs in again once (if the auth method can) and retries.
    async fn run<T, F, Fut>(&self, call: F) -> Result<T, StoreError>
    where
        F: Fn(Arc<VaultClient>) -> Fut + Send + Sync,
        Fut: Future<Output = Result<T, StoreError>> + Send,
        T: Send,
    {
        let (client, generation) = self.session_client().await?;
        match call(client.clone()).await {
            Err(denied @ StoreError::PermissionDenied { .. }) if !self.config.auth.can_login() => {
                // A fixed token cannot be replaced; tell "token dead" apart from "policy".
                match client.lookup().await {
                    Err(ClientError::APIError { code: 403, .. }) => Err(StoreError::AuthFailed {
                        method: "token",
                        mount: "token".into(),
                        detail: "the token is expired or revoked; issue a new token and restart the operator (or use kubernetes or approle auth, which log in again by themselves)".into(),
                    }),
                    _ => Err(denied),
                }
            }
            Err(StoreError::PermissionDenied { .. }) => {
                {
                    let mut session = self.session.lock().await;
                    if session.generation == generation {
                        tracing::info!("Vault denied a call; logging in again and retrying once");
                        self.login_locked(&mut session).await?;
                    }
                }
                let (client, _) = self.session_client().await?;
                call(client).await
            }
            other => other,
        }
    }

    /// Maps a `vaultrs` error to a typed store error. Server texts are short and never echo
    /// request bodies, so they are kept (truncated) for the message.
    fn classify(&self, err: ClientError, op: Op, path: &str) -> StoreError {
        let address = self.config.address.clone();
        let mount = self.config.kv_mount.clone();
        let (status, text) = match err {
            ClientError::APIError { code, errors } => (code, errors.join("; ")),
            ClientError::RestClientError { source } => match source {
                rustify::errors::ClientError::ServerResponseError { code, content } => {
                    (code, content.map(|c| short(&c)).unwrap_or_default())
                }
                rustify::errors::ClientError::RequestError { source, .. } => {
                    return StoreError::Unreachable {
                        address,
                        detail: short(&format!("{source:#}")),
                    };
                }
                other => {
                    return StoreError::Unreachable {
                        address,
                        detail: short(&error_chain(&other)),
                    };
                }
            },
            ClientError::ResponseEmptyError | ClientError::JsonParseError { .. } => {
                return StoreError::MountMissing {
                    mount,
                    problem: "did not answer like a KV version 2 engine",
                };
            }
            other => {
                return StoreError::Rejected {
                    operation: op.name,
                    path: path.to_owned(),
                    status: 0,
                    detail: short(&error_chain(&other)),
                };
            }
        };
        let lower = text.to_lowercase();
        match status {
            503 if lower.contains("sealed") => StoreError::Sealed { address },
            403 => StoreError::PermissionDenied {
                operation: op.name,
                mount,
                path: path.to_owned(),
                capabilities: op.capabilities,
            },
            404 if lower.contains("no handler for route") => StoreError::MountMissing {
                mount,
                problem: "does not exist",
            },
            400 if lower.contains("check-and-set") => StoreError::Conflict {
                path: path.to_owned(),
                expected: "?".into(),
                found: "unknown".into(),
            },
            429 | 500..=599 | 412 => StoreError::Unavailable {
                address,
                status,
                detail: short(&text),
            },
            _ => StoreError::Rejected {
                operation: op.name,
                path: path.to_owned(),
                status,
                detail: short(&text),
            },
        }
    }

    fn is_not_found(err: &ClientError) -> bool {
        match err {
            ClientError::APIError { code: 404, errors } => !errors
                .iter()
                .any(|e| e.to_lowercase().contains("no handler for route")),
            ClientError::RestClientError {
                source: rustify::errors::ClientError::ServerResponseError { code: 404, content },
            } => !content
                .as_deref()
                .unwrap_or_default()
                .to_lowercase()
                .contains("no handler for route"),
            _ => false,
        }
    }

    async fn current_version(&self, client: &VaultClient, path: &str) -> Option<u64> {
        match vaultrs::kv2::read_metadata(client, &self.config.kv_mount, path).await {
            Ok(meta) => Some(meta.current_version),
            Err(_) => None,
        }
    }
}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

fn server_detail(err: &StoreError) -> String {
    match err {
        StoreError::PermissionDenied { .. } => "Vault answered permission denied".into(),
        StoreError::Rejected { status, detail, .. } => {
            format!("Vault answered HTTP {status}: {detail}")
        }
        other => other.to_string(),
    }
}

fn parse_time(s: &str) -> Option<DateTime<Utc>> {
    if s.is_empty() {
        return None;
    }
    DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

#[async_trait]
impl SecretStore for VaultStore {
    fn backend(&self) -> &'static str {
        "vault"
    }

    async fn write_record(
        &self,
        path: &StorePath,
        record: &Record,
        cas: Cas,
    ) -> Result<u64, StoreError> {
        let mount = self.config.kv_mount.as_str();
        let p = path.as_str();
        let cas_value = u32::try_from(cas.as_vault_cas()).map_err(|_| StoreError::Rejected {
            operation: OP_WRITE.name,
            path: p.to_owned(),
            status: 0,
            detail: "version number too large for Vault's cas parameter".into(),
        })?;
        self.run(|client| async move {
            // The whole record goes into one KV write: a reader sees all of it or none of it.
            let data: BTreeMap<&str, &str> = record
                .data
                .iter()
                .map(|(k, v)| (k.as_str(), v.expose()))
                .collect();
            let written = vaultrs::kv2::set_with_options(
                client.as_ref(),
                mount,
                p,
                &data,
                SetSecretRequestOptions { cas: cas_value },
            )
            .await;
            let version = match written {
                Ok(meta) => meta.version,
                Err(err) => {
                    return Err(match self.classify(err, OP_WRITE, p) {
                        StoreError::Conflict { path, .. } => {
                            let found = match self.current_version(&client, p).await {
                                Some(v) => format!("version {v}"),
                                None => "unknown".into(),
                            };
                            StoreError::Conflict {
                                path,
                                expected: cas.to_string(),
                                found,
                            }
                        }
                        other => other,
                    });
                }
            };

            // Descriptive metadata, never secret. A failure here does not undo the write.
            let custom: HashMap<String, String> = record
                .metadata
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .chain([("data-version".to_owned(), version.to_string())])
                .collect();
            let mut builder = SetSecretMetadataRequest::builder();
            builder.cas_required(true).custom_metadata(custom);
            if let Some(max) = self.config.max_versions {
                builder.max_versions(max);
            }
            if let Err(err) =
                vaultrs::kv2::set_metadata(client.as_ref(), mount, p, Some(&mut builder)).await
            {
                let err = self.classify(err, OP_WRITE, p);
                tracing::warn!(
                    path = p,
                    version,
                    reason = err.reason(),
                    error = %err,
                    "wrote the secret but could not update its metadata (owner, max_versions); \
                     grant create/update on the metadata path"
                );
            }
            Ok(version)
        })
        .await
    }

    async fn read_external_field(
        &self,
        path: &str,
        field: &str,
    ) -> Result<Option<crate::secret::SecretString>, StoreError> {
        if path.is_empty()
            || path.starts_with('/')
            || path.split('/').any(|s| s.is_empty() || s == "..")
        {
            return Err(StoreError::Config(format!(
                "{path:?} is not a relative KV path"
            )));
        }
        let mount = self.config.kv_mount.as_str();
        self.run(|client| async move {
            let endpoint = ReadSecretRequest::builder()
                .mount(mount)
                .path(path)
                .build()
                .map_err(|e| StoreError::Config(format!("building a read request: {e}")))?;
            let response = match vaultrs::api::exec_with_result(client.as_ref(), endpoint).await {
                Ok(r) => r,
                Err(err) if Self::is_not_found(&err) => return Ok(None),
                Err(ClientError::ResponseDataEmptyError) => return Ok(None),
                Err(err) => return Err(self.classify(err, OP_READ, path)),
            };
            Ok(response
                .data
                .get(field)
                .and_then(|v| v.as_str())
                .map(|v| crate::secret::SecretString::new(v.trim())))
        })
        .await
    }

    async fn read_record(
        &self,
        path: &StorePath,
        version: Option<u64>,
    ) -> Result<Option<Versioned<Record>>, StoreError> {
        let mount = self.config.kv_mount.as_str();
        let p = path.as_str();
        self.run(|client| async move {
            let endpoint = ReadSecretRequest::builder()
                .mount(mount)
                .path(p)
                .version(version)
                .build()
                .map_err(|e| StoreError::Config(format!("building a read request: {e}")))?;
            let response = match vaultrs::api::exec_with_result(client.as_ref(), endpoint).await {
                Ok(r) => r,
                Err(err) if Self::is_not_found(&err) => return Ok(None),
                Err(ClientError::ResponseDataEmptyError) => return Ok(None),
                Err(err) => return Err(self.classify(err, OP_READ, p)),
            };
            if response.data.is_null() {
                // Soft-deleted or destroyed version.
                return Ok(None);
            }
            let fields: BTreeMap<String, String> =
                serde_json::from_value(response.data).map_err(|_| StoreError::Corrupt {
                    path: p.to_owned(),
                    expected: Record::expected_for(path.kind()),
                    detail: "the data is not a map of strings".into(),
                })?;
            let metadata = response
                .metadata
                .custom_metadata
                .unwrap_or_default()
                .into_iter()
                .filter(|(k, _)| k != "data-version")
                .collect();
            Ok(Some(Versioned {
                value: Record {
                    data: fields
                        .into_iter()
                        .map(|(k, v)| (k, SecretString::new(v)))
                        .collect(),
                    metadata,
                },
                version: response.metadata.version,
                created_time: parse_time(&response.metadata.created_time),
            }))
        })
        .await
    }

    async fn list_versions(&self, path: &StorePath) -> Result<Vec<VersionInfo>, StoreError> {
        let mount = self.config.kv_mount.as_str();
        let p = path.as_str();
        self.run(|client| async move {
            let meta = match vaultrs::kv2::read_metadata(client.as_ref(), mount, p).await {
                Ok(m) => m,
                Err(err) if Self::is_not_found(&err) => return Ok(Vec::new()),
                Err(err) => return Err(self.classify(err, OP_VERSIONS, p)),
            };
            let mut versions: Vec<VersionInfo> = meta
                .versions
                .iter()
                .filter_map(|(v, m)| {
                    Some(VersionInfo {
                        version: v.parse().ok()?,
                        created_time: parse_time(&m.created_time),
                        deleted: !m.deletion_time.is_empty(),
                        destroyed: m.destroyed,
                    })
                })
                .collect();
            versions.sort_by_key(|v| v.version);
            Ok(versions)
        })
        .await
    }

    async fn delete(&self, path: &StorePath) -> Result<(), StoreError> {
        let mount = self.config.kv_mount.as_str();
        let p = path.as_str();
        self.run(|client| async move {
            match vaultrs::kv2::delete_metadata(client.as_ref(), mount, p).await {
                Ok(()) => Ok(()),
                Err(err) if Self::is_not_found(&err) => Ok(()),
                Err(err) => Err(self.classify(err, OP_DELETE, p)),
            }
        })
        .await
    }

    async fn health(&self) -> Result<StoreHealth, StoreError> {
        // sys/health is read raw: its body differs between Vault and OpenBao versions, and the
        // status code alone says sealed (503), uninitialised (501) or usable.
        let anonymous = self.build_client("")?;
        let url = format!(
            "{}/v1/sys/health?standbyok=true&perfstandbyok=true",
            anonymous.http.base.trim_end_matches('/')
        );
        let address = self.config.address.clone();
        let response =
            anonymous
                .http
                .http
                .get(&url)
                .send()
                .await
                .map_err(|e| StoreError::Unreachable {
                    address: address.clone(),
                    detail: short(&error_chain(&e)),
                })?;
        let status = response.status().as_u16();
        let body: serde_json::Value = response.json().await.unwrap_or_default();
        let version = body["version"].as_str().unwrap_or("unknown").to_owned();
        match status {
            200 | 429 | 472 | 473 if body["sealed"] != serde_json::Value::Bool(true) => {}
            503 => return Err(StoreError::Sealed { address }),
            _ if body["sealed"] == serde_json::Value::Bool(true) => {
                return Err(StoreError::Sealed { address });
            }
            501 => {
                return Err(StoreError::Unavailable {
                    address,
                    status,
                    detail: "Vault is not initialized; run `bao operator init`".into(),
                });
            }
            _ => {
                return Err(StoreError::Unavailable {
                    address,
                    status,
                    detail: "sys/health reports the server unusable".into(),
                });
            }
        }
        // Health also means the operator can authenticate (and renew its token).
        self.session_client().await?;
        Ok(StoreHealth {
            backend: "vault",
            detail: format!(
                "Vault {version}, {} auth, KV mount {}",
                self.config.auth.method(),
                self.config.kv_mount
            ),
        })
    }
}
