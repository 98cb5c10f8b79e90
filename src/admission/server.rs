//! The HTTPS server of the admission webhooks: `POST /validate/stripekeys`,
//! `POST /validate/no-literal-keys` and `GET /healthz`, over TLS 1.2/1.3 (aws-lc-rs) with the
//! certificate of a [`CertStore`], swapped without restart when it is renewed.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use kube::core::admission::AdmissionResponse;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::tls::{self, CertMode, CertStore, SelfSignedConfig, TlsError};
use super::{KubeLookups, LITERAL_KEYS_PATH, LiteralKeysPolicy, Lookups, STRIPE_OBJECTS_PATH};

/// Largest AdmissionReview accepted: an object and its old version, each up to etcd's 1.5 MiB.
pub const MAX_REVIEW_BYTES: usize = 4 * 1024 * 1024;
/// How long a TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What the handlers judge with, besides the cluster lookups.
#[derive(Clone, Debug)]
pub struct AdmissionSettings {
    /// The literal-keys webhook: test keys too, and the one exempt requester.
    pub literal_keys: LiteralKeysPolicy,
    /// Which API hosts and credential places a StripeAccount may name.
    pub account_trust: crate::rules::AccountTrust,
}

#[derive(Clone)]
struct AppState {
    lookups: Arc<dyn Lookups>,
    settings: Arc<AdmissionSettings>,
}

fn review_response(resp: AdmissionResponse) -> Response {
    match serde_json::to_vec(&resp.into_review()) {
        Ok(body) => ([(header::CONTENT_TYPE, "application/json")], body).into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("could not encode the AdmissionReview response: {e}"),
        )
            .into_response(),
    }
}

async fn stripe_objects(State(state): State<AppState>, body: Bytes) -> Response {
    review_response(
        super::review_stripe_object(&body, state.lookups.as_ref(), &state.settings.account_trust)
            .await,
    )
}

async fn literal_keys(State(state): State<AppState>, body: Bytes) -> Response {
    review_response(super::review_literal_keys(
        &body,
        &state.settings.literal_keys,
    ))
}

/// The webhook routes, for a server or a test.
pub fn router(lookups: Arc<dyn Lookups>, settings: AdmissionSettings) -> Router {
    Router::new()
        .route(STRIPE_OBJECTS_PATH, post(stripe_objects))
        .route(LITERAL_KEYS_PATH, post(literal_keys))
        .route("/healthz", get(|| async { "ok" }))
        .layer(DefaultBodyLimit::max(MAX_REVIEW_BYTES))
        .with_state(AppState {
            lookups,
            settings: Arc::new(settings),
        })
}

/// The rustls server configuration: the process's aws-lc-rs provider, HTTP/1.1, the
/// certificate of `certs`.
pub fn server_config(certs: Arc<CertStore>) -> Result<rustls::ServerConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Invalid {
            what: "TLS configuration",
            message: e.to_string(),
        })?
        .with_no_client_auth()
        .with_cert_resolver(certs);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// Serves `router` over TLS on `addr` until `shutdown`. Returns the bound address (useful with
/// port 0) and the task.
pub async fn serve(
    addr: SocketAddr,
    certs: Arc<CertStore>,
    router: Router,
    shutdown: CancellationToken,
) -> Result<(SocketAddr, JoinHandle<()>), WebhookError> {
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config(certs)?));
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| WebhookError::Bind { addr, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| WebhookError::Bind { addr, source })?;
    let task = tokio::spawn(async move {
        loop {
            let (tcp, peer) = tokio::select! {
                _ = shutdown.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "accepting an admission connection failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let acceptor = acceptor.clone();
            let service = TowerToHyperService::new(router.clone());
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
                {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "TLS handshake timed out");
                        return;
                    }
                };
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(HANDSHAKE_TIMEOUT)
                    .serve_connection(TokioIo::new(tls), service);
                tokio::pin!(conn);
                tokio::select! {
                    r = conn.as_mut() => if let Err(e) = r {
                        tracing::debug!(%peer, error = %e, "admission connection ended with an error");
                    },
                    _ = shutdown.cancelled() => {
                        conn.as_mut().graceful_shutdown();
                        let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
                    }
                }
            });
        }
    });
    Ok((local, task))
}

/// Errors starting the webhook server.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    /// Binding failed.
    #[error("binding the admission webhook on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// No certificate.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// `files` mode without a directory.
    #[error(
        "--webhook-cert-mode=files needs --webhook-cert-dir (where tls.crt and tls.key are mounted)"
    )]
    NoCertDir,
}

/// What [`start`] needs.
#[derive(Debug, Clone)]
pub struct WebhookConfig {
    /// Listen address.
    pub addr: SocketAddr,
    /// Where the certificate comes from.
    pub cert_mode: CertMode,
    /// `files` mode: the directory of `tls.crt` and `tls.key`.
    pub cert_dir: Option<PathBuf>,
    /// The operator's namespace.
    pub namespace: String,
    /// The webhook Service's name (the certificate's DNS names; the Secret is `<service>-tls`).
    pub service: String,
    /// The ValidatingWebhookConfiguration whose `caBundle` is kept (`self-signed` mode).
    pub config_name: Option<String>,
    /// Refuse `sk_test_`/`rk_test_` keys too.
    pub include_test_keys: bool,
    /// The requester exempt from the literal-keys webhook (the operator's service account
    /// username); `None`: nobody.
    pub exempt_username: Option<String>,
    /// Which API hosts and credential places a StripeAccount may name.
    pub account_trust: crate::rules::AccountTrust,
    /// How often the certificate is checked (renewal, file reload, `caBundle` drift).
    pub check_interval: Duration,
}

/// Starts the webhook server with the certificate `config` asks for (`None` when disabled):
/// in `self-signed` mode creates or adopts the TLS Secret and injects the CA first, so that the
/// server presents a trusted certificate from its first request.
pub async fn start(
    config: &WebhookConfig,
    client: kube::Client,
    shutdown: CancellationToken,
) -> Result<Option<(SocketAddr, JoinHandle<()>)>, WebhookError> {
    let router = router(
        Arc::new(KubeLookups::new(client.clone())),
        AdmissionSettings {
            literal_keys: LiteralKeysPolicy {
                include_test_keys: config.include_test_keys,
                exempt_username: config.exempt_username.clone(),
            },
            account_trust: config.account_trust.clone(),
        },
    );
    let certs = match config.cert_mode {
        CertMode::Disabled => return Ok(None),
        CertMode::Files => {
            let dir = config.cert_dir.clone().ok_or(WebhookError::NoCertDir)?;
            let certs = Arc::new(CertStore::new(&tls::load_files(&dir)?)?);
            tokio::spawn(tls::watch_files(
                dir,
                certs.clone(),
                config.check_interval,
                shutdown.clone(),
            ));
            certs
        }
        CertMode::SelfSigned => {
            let cfg = SelfSignedConfig {
                namespace: config.namespace.clone(),
                secret_name: format!("{}-tls", config.service),
                service: config.service.clone(),
                webhook_config_name: config.config_name.clone(),
            };
            let cert = tls::ensure_self_signed(&client, &cfg, std::time::SystemTime::now()).await?;
            let injected = match &cfg.webhook_config_name {
                Some(name) => tls::inject_ca_bundle(&client, name, &cert.ca_bundle_pem).await?,
                None => tls::Injection::Current,
            };
            let certs = Arc::new(CertStore::new(&cert)?);
            tokio::spawn(tls::run_self_signed(
                client,
                cfg,
                certs.clone(),
                config.check_interval,
                injected,
                shutdown.clone(),
            ));
            certs
        }
    };
    let (addr, task) = serve(config.addr, certs, router, shutdown).await?;
    tracing::info!(%addr, mode = ?config.cert_mode, "serving the admission webhooks");
    Ok(Some((addr, task)))
}
