//! The HTTP client: typed calls, headers, retries, rate limiting and per-attempt observation.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use reqwest::Method;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::breaker::CircuitBreaker;
use super::config::StripeConfig;
use super::error::{ApiError, ConnectionErrorKind, StripeError, map_error_response};
use super::ratelimit::RateLimiter;
use super::retry::{parse_retry_after, parse_should_retry};
use super::types::*;

/// Longest idempotency key Stripe accepts.
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 255;

/// Builds the idempotency key for step `step` of rotation number `rotation` of the resource
/// with Kubernetes UID `uid`, e.g. `sko:6f1c...:3:mint`.
///
/// The same inputs always give the same key, so a retry after a crash replays Stripe's saved
/// answer instead of minting twice; different inputs give different keys. Keys longer than 255
/// characters are replaced by `sko:h:<sha256 hex>` of the full key.
pub fn idempotency_key(uid: &str, rotation: u64, step: &str) -> String {
    let key = format!("sko:{uid}:{rotation}:{step}");
    if key.len() <= MAX_IDEMPOTENCY_KEY_LEN && key.chars().all(|c| c.is_ascii_graphic()) {
        key
    } else {
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, key.as_bytes());
        format!("sko:h:{}", hex::encode(digest.as_ref()))
    }
}

/// A successful answer with its metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiResponse<T> {
    /// The decoded object.
    pub value: T,
    /// The `Request-Id` header (record it in the audit log).
    pub request_id: Option<String>,
    /// HTTP status (2xx).
    pub status: u16,
    /// Attempts it took (1 = no retry).
    pub attempts: u32,
    /// `Idempotent-Replayed: true`: Stripe returned the saved answer of an earlier request with
    /// the same idempotency key.
    pub idempotent_replayed: bool,
}

/// What is true after [`StripeClient::expire_api_key_confirmed`]: in every case the key no
/// longer authenticates (subject to Stripe's observed expiry grace of seconds to minutes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExpireOutcome {
    /// Stripe answered the expire with the key in status `expired` (this call expired it, or
    /// an earlier call with the same idempotency key did and this is the saved answer).
    Expired {
        /// `Request-Id` of the expire answer.
        request_id: Option<String>,
        /// The answer was Stripe's saved answer (`Idempotent-Replayed`).
        idempotent_replayed: bool,
    },
    /// The key had expired before this call (Stripe refused the expire and a read shows the
    /// key `expired`).
    AlreadyExpired {
        /// `Request-Id` of the confirming read.
        request_id: Option<String>,
    },
    /// Stripe does not know the id, and a listing of every key (expired ones included)
    /// confirms that no key with this id exists in the account.
    Gone {
        /// `Request-Id` of the confirming listing's last page.
        request_id: Option<String>,
    },
}

impl ExpireOutcome {
    /// A short label for logs, audit and metrics: `expired`, `already_expired`, `gone`.
    pub fn as_str(&self) -> &'static str {
        match self {
            ExpireOutcome::Expired { .. } => "expired",
            ExpireOutcome::AlreadyExpired { .. } => "already_expired",
            ExpireOutcome::Gone { .. } => "gone",
        }
    }
}

/// All items of a paginated list, with the request id of every page.
#[derive(Debug, Clone, PartialEq)]
pub struct Paged<T> {
    /// Every item, in the order Stripe listed them.
    pub items: Vec<T>,
    /// `Request-Id` of each page fetched.
    pub request_ids: Vec<Option<String>>,
}

/// One HTTP attempt, as reported to a [`CallObserver`]. Holds no bodies, keys or secrets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallRecord {
    /// HTTP method.
    pub method: String,
    /// Request path without query string.
    pub path: String,
    /// `Stripe-Context` account of the call.
    pub account: String,
    /// HTTP status, `None` if no answer arrived.
    pub status: Option<u16>,
    /// Transport failure, if any (with `status` set when the body broke off).
    pub connection_error: Option<ConnectionErrorKind>,
    /// `Request-Id` header.
    pub request_id: Option<String>,
    /// `Idempotency-Key` sent (POSTs).
    pub idempotency_key: Option<String>,
    /// 1 for the first attempt.
    pub attempt: u32,
    /// Time from sending to the full answer (or failure).
    pub duration: Duration,
    /// `error.code` of an error answer.
    pub error_code: Option<String>,
    /// `error.type` of an error answer.
    pub error_type: Option<String>,
    /// Whether the client will retry after this attempt.
    pub will_retry: bool,
}

/// Receives one [`CallRecord`] per HTTP attempt: the audit log and metrics hook in here.
/// Called inline on the request path: keep it fast and non-blocking.
pub trait CallObserver: Send + Sync {
    /// Called once per HTTP attempt, after it finished or failed.
    fn on_call(&self, record: &CallRecord);
}

enum Body {
    None,
    Json(Vec<u8>),
    Form(String),
}

struct Inner {
    http: reqwest::Client,
    /// `Bearer <key>`, marked sensitive so no HTTP-layer logging ever prints it.
    authorization: reqwest::header::HeaderValue,
    config: StripeConfig,
    base: String,
    limiter: Arc<RateLimiter>,
    /// The account's circuit breaker (shared like the limiter), if any.
    breaker: Option<Arc<CircuitBreaker>>,
    observer: Option<Arc<dyn CallObserver>>,
}

/// A Stripe client for one account. Cheap to clone; clones share the connection pool, the rate
/// limiter and the observer.
#[derive(Clone)]
pub struct StripeClient {
    inner: Arc<Inner>,
}

impl fmt::Debug for StripeClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StripeClient")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

fn encode_segment(id: &str) -> String {
    let mut out = String::with_capacity(id.len());
    for b in id.bytes() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

pub(crate) fn error_chain(e: &reqwest::Error) -> String {
    let mut message = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    message
}

pub(crate) fn classify(e: &reqwest::Error) -> ConnectionErrorKind {
    if e.is_timeout() {
        ConnectionErrorKind::Timeout
    } else if e.is_connect() {
        ConnectionErrorKind::Connect
    } else {
        ConnectionErrorKind::Broken
    }
}

impl StripeClient {
    /// Builds a client with its own rate limiter (`requests_per_second`, `burst`).
    pub fn new(config: StripeConfig) -> Result<Self, StripeError> {
        let limiter = Arc::new(RateLimiter::new(config.requests_per_second, config.burst));
        Self::with_parts(config, limiter, None)
    }

    /// Builds a client that draws from `limiter` (share one limiter per Stripe account across
    /// clients) and reports to `observer`.
    pub fn with_parts(
        config: StripeConfig,
        limiter: Arc<RateLimiter>,
        observer: Option<Arc<dyn CallObserver>>,
    ) -> Result<Self, StripeError> {
        let base = config.api_base.trim_end_matches('/').to_owned();
        let parsed = url::Url::parse(&base)
            .map_err(|e| StripeError::Config(format!("api base URL {base:?} is not a URL: {e}")))?;
        if !matches!(parsed.scheme(), "http" | "https") || parsed.host().is_none() {
            return Err(StripeError::Config(format!(
                "api base URL {base:?} must be an http(s) URL with a host"
            )));
        }
        if parsed.query().is_some() || parsed.fragment().is_some() {
            return Err(StripeError::Config(format!(
                "api base URL {base:?} must not have a query or fragment"
            )));
        }
        if config.context.is_empty() {
            return Err(StripeError::Config(
                "the Stripe-Context account is empty; set it to the acct_... id".into(),
            ));
        }
        if config.secret_key.is_empty() {
            return Err(StripeError::Config("the app secret key is empty".into()));
        }
        if !(config.requests_per_second.is_finite() && config.requests_per_second > 0.0) {
            return Err(StripeError::Config(
                "requests_per_second must be a positive number".into(),
            ));
        }
        let mut authorization = reqwest::header::HeaderValue::from_str(&format!(
            "Bearer {}",
            config.secret_key.expose()
        ))
        .map_err(|_| {
            StripeError::Config(
                "the app secret key contains characters not allowed in a header".into(),
            )
        })?;
        authorization.set_sensitive(true);
        let http = reqwest::Client::builder()
            .user_agent(concat!("stripe-key-operator/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(config.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| StripeError::Config(format!("HTTP client: {}", error_chain(&e))))?;
        Ok(Self {
            inner: Arc::new(Inner {
                http,
                authorization,
                config,
                base,
                limiter,
                breaker: None,
                observer,
            }),
        })
    }

    /// The same client (sharing pool and limiter) guarded by `breaker`: share one breaker per
    /// Stripe account. While it is open, calls fail at once with
    /// [`StripeError::CircuitOpen`] without being sent.
    pub fn with_breaker(&self, breaker: Arc<CircuitBreaker>) -> Self {
        Self {
            inner: Arc::new(Inner {
                http: self.inner.http.clone(),
                authorization: self.inner.authorization.clone(),
                config: self.inner.config.clone(),
                base: self.inner.base.clone(),
                limiter: self.inner.limiter.clone(),
                breaker: Some(breaker),
                observer: self.inner.observer.clone(),
            }),
        }
    }

    /// The account's circuit breaker, if the client has one.
    pub fn breaker(&self) -> Option<Arc<CircuitBreaker>> {
        self.inner.breaker.clone()
    }

    /// The same client (sharing pool and limiter) reporting to `observer`.
    pub fn with_observer(&self, observer: Arc<dyn CallObserver>) -> Self {
        Self {
            inner: Arc::new(Inner {
                http: self.inner.http.clone(),
                authorization: self.inner.authorization.clone(),
                config: self.inner.config.clone(),
                base: self.inner.base.clone(),
                limiter: self.inner.limiter.clone(),
                breaker: self.inner.breaker.clone(),
                observer: Some(observer),
            }),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &StripeConfig {
        &self.inner.config
    }

    /// The shared rate limiter.
    pub fn rate_limiter(&self) -> Arc<RateLimiter> {
        self.inner.limiter.clone()
    }

    /// Reports a call made outside this client (the scope probes made with a new key) to the
    /// client's observer, so that the audit log and metrics see every call to Stripe.
    pub fn report(&self, record: &CallRecord) {
        if let Some(observer) = &self.inner.observer {
            observer.on_call(record);
        }
    }

    // ---------------------------------------------------------------- v2 API keys

    /// `POST /v2/iam/api_keys`: mints a key. In test mode the answer holds
    /// `secret_key.token`; in live mode only `secret_key.encrypted_secret` (see
    /// [`ApiKey::reveal_secret`]).
    pub async fn create_api_key(
        &self,
        params: &CreateApiKeyParams,
        idempotency_key: &str,
    ) -> Result<ApiResponse<ApiKey>, StripeError> {
        let body = json_body(params)?;
        self.execute(
            Method::POST,
            "/v2/iam/api_keys",
            body,
            Some(idempotency_key),
        )
        .await
    }

    /// `GET /v2/iam/api_keys/{id}`.
    pub async fn retrieve_api_key(&self, id: &str) -> Result<ApiResponse<ApiKey>, StripeError> {
        let path = format!("/v2/iam/api_keys/{}", encode_segment(id));
        self.execute(Method::GET, &path, Body::None, None).await
    }

    /// `GET /v2/iam/api_keys`: one page; follow `next_page_url` with
    /// [`StripeClient::list_api_keys_page`] or use [`StripeClient::list_all_api_keys`].
    pub async fn list_api_keys(
        &self,
        params: &ListApiKeysParams,
    ) -> Result<ApiResponse<ApiKeyList>, StripeError> {
        if params.limit.is_some_and(|l| l == 0 || l > 100) {
            return Err(StripeError::InvalidRequest(
                "limit must be between 1 and 100".into(),
            ));
        }
        let mut path = "/v2/iam/api_keys".to_owned();
        // Built in a block: the serializer is not Send and must not live across the await.
        let q = {
            let mut q = url::form_urlencoded::Serializer::new(String::new());
            if let Some(i) = params.include_expired {
                q.append_pair("include_expired", if i { "true" } else { "false" });
            }
            if let Some(l) = params.limit {
                q.append_pair("limit", &l.to_string());
            }
            q.finish()
        };
        if !q.is_empty() {
            path.push('?');
            path.push_str(&q);
        }
        self.execute(Method::GET, &path, Body::None, None).await
    }

    /// Fetches the page named by a `next_page_url` (or `previous_page_url`). The URL must be a
    /// path on the configured API base (or an absolute URL with the same origin), so the app key
    /// is never sent elsewhere.
    pub async fn list_api_keys_page(
        &self,
        page_url: &str,
    ) -> Result<ApiResponse<ApiKeyList>, StripeError> {
        let path = self.relative_page_url(page_url)?;
        self.execute(Method::GET, &path, Body::None, None).await
    }

    /// Lists every key, following `next_page_url` to the end.
    pub async fn list_all_api_keys(
        &self,
        params: &ListApiKeysParams,
    ) -> Result<Paged<ApiKey>, StripeError> {
        let mut page = self.list_api_keys(params).await?;
        let mut out = Paged {
            items: Vec::new(),
            request_ids: Vec::new(),
        };
        let mut seen = std::collections::HashSet::new();
        loop {
            out.request_ids.push(page.request_id.clone());
            out.items.append(&mut page.value.data);
            match page.value.next_page_url.take() {
                Some(next) if !next.is_empty() => {
                    if !seen.insert(next.clone()) {
                        return Err(StripeError::InvalidRequest(
                            "Stripe returned the same next_page_url twice; stopping".into(),
                        ));
                    }
                    page = self.list_api_keys_page(&next).await?;
                }
                _ => return Ok(out),
            }
        }
    }

    /// `GET /v2/iam/activity_logs`: one page of the account's activity log, newest first
    /// (Stripe's public preview; the app needs the "Activity logs: Read" permission). Follow
    /// `next_page_url` with [`StripeClient::list_activity_logs_page`].
    pub async fn list_activity_logs(
        &self,
        params: &ListActivityLogsParams,
    ) -> Result<ApiResponse<ActivityLogList>, StripeError> {
        if params.limit.is_some_and(|l| l == 0 || l > 100) {
            return Err(StripeError::InvalidRequest(
                "limit must be between 1 and 100".into(),
            ));
        }
        let q = {
            let mut q = url::form_urlencoded::Serializer::new(String::new());
            for g in &params.action_groups {
                q.append_pair("action_groups", g);
            }
            for a in &params.actions {
                q.append_pair("actions", a);
            }
            if let Some(l) = params.limit {
                q.append_pair("limit", &l.to_string());
            }
            q.finish()
        };
        let mut path = "/v2/iam/activity_logs".to_owned();
        if !q.is_empty() {
            path.push('?');
            path.push_str(&q);
        }
        self.execute(Method::GET, &path, Body::None, None).await
    }

    /// Fetches the activity-log page a `next_page_url` names (same origin only).
    pub async fn list_activity_logs_page(
        &self,
        page_url: &str,
    ) -> Result<ApiResponse<ActivityLogList>, StripeError> {
        let path = self.relative_page_url(page_url)?;
        self.execute(Method::GET, &path, Body::None, None).await
    }

    /// `GET /v2/iam/activity_logs/{id}`.
    pub async fn retrieve_activity_log(
        &self,
        id: &str,
    ) -> Result<ApiResponse<ActivityLog>, StripeError> {
        let path = format!("/v2/iam/activity_logs/{}", encode_segment(id));
        self.execute(Method::GET, &path, Body::None, None).await
    }

    /// `POST /v2/iam/api_keys/{id}`: changes name, note or permissions. Stripe answers 200 to
    /// `permissions: []` without changing anything: compare the result when it matters.
    pub async fn update_api_key(
        &self,
        id: &str,
        params: &UpdateApiKeyParams,
        idempotency_key: &str,
    ) -> Result<ApiResponse<ApiKey>, StripeError> {
        let path = format!("/v2/iam/api_keys/{}", encode_segment(id));
        self.execute(
            Method::POST,
            &path,
            json_body(params)?,
            Some(idempotency_key),
        )
        .await
    }

    /// `POST /v2/iam/api_keys/{id}/expire`: the key stops working now.
    ///
    /// Errors are Stripe's answer as is; prefer [`StripeClient::expire_api_key_confirmed`],
    /// which tells "the key is expired" from "Stripe refused the app's own key" (401
    /// `api_key_expired`) and never takes a bare 404 for success.
    pub async fn expire_api_key(
        &self,
        id: &str,
        idempotency_key: &str,
    ) -> Result<ApiResponse<ApiKey>, StripeError> {
        let path = format!("/v2/iam/api_keys/{}/expire", encode_segment(id));
        self.execute(
            Method::POST,
            &path,
            Body::Json(b"{}".to_vec()),
            Some(idempotency_key),
        )
        .await
    }

    /// Expires key `id` and says what is now true, confirming anything ambiguous with a read:
    ///
    /// - 200 whose key reads `expired` → [`ExpireOutcome::Expired`] (200 with a key still
    ///   `active` is re-read once; still active → [`StripeError::Unconfirmed`]);
    /// - a 400 (e.g. `resource_already_expired`) → retrieve: `expired` →
    ///   [`ExpireOutcome::AlreadyExpired`], otherwise the 400 is returned;
    /// - 404 → list every key, expired ones included: absent → [`ExpireOutcome::Gone`], listed
    ///   as expired → [`ExpireOutcome::AlreadyExpired`], listed as active →
    ///   [`StripeError::Unconfirmed`];
    /// - 401 (the app's own key is invalid or expired, code `api_key_expired`) and every other
    ///   error → `Err`: the key may still work, so the caller must retry later, never record it
    ///   as expired ([`StripeError::is_caller_key_rejected`] tells this case apart).
    pub async fn expire_api_key_confirmed(
        &self,
        id: &str,
        idempotency_key: &str,
    ) -> Result<ExpireOutcome, StripeError> {
        match self.expire_api_key(id, idempotency_key).await {
            Ok(resp) if resp.value.status == ApiKeyStatus::Expired => Ok(ExpireOutcome::Expired {
                request_id: resp.request_id,
                idempotent_replayed: resp.idempotent_replayed,
            }),
            Ok(resp) => {
                let again = self.retrieve_api_key(id).await?;
                if again.value.status == ApiKeyStatus::Expired {
                    Ok(ExpireOutcome::Expired {
                        request_id: resp.request_id,
                        idempotent_replayed: resp.idempotent_replayed,
                    })
                } else {
                    Err(StripeError::Unconfirmed(format!(
                        "expire of API key {id} answered {} [request {}] but the key still reads \
                         active",
                        resp.status,
                        resp.request_id.as_deref().unwrap_or("unknown")
                    )))
                }
            }
            Err(e) if e.status() == Some(400) => match self.retrieve_api_key(id).await {
                Ok(k) if k.value.status == ApiKeyStatus::Expired => {
                    Ok(ExpireOutcome::AlreadyExpired {
                        request_id: k.request_id,
                    })
                }
                _ => Err(e),
            },
            Err(e) if e.is_not_found() => {
                let all = self
                    .list_all_api_keys(&ListApiKeysParams {
                        include_expired: Some(true),
                        limit: Some(100),
                    })
                    .await?;
                let request_id = all.request_ids.last().cloned().flatten();
                let listed = all.items.iter().find(|k| k.id == id).map(|k| k.status);
                outcome_after_not_found(id, listed, request_id, e.request_id())
            }
            Err(e) => Err(e),
        }
    }

    /// `POST /v2/iam/api_keys/{id}/rotate`: returns a new key (new id, same properties); the old
    /// one expires after `expire_current_key_in_minutes` (at once when `None`).
    pub async fn rotate_api_key(
        &self,
        id: &str,
        params: &RotateApiKeyParams,
        idempotency_key: &str,
    ) -> Result<ApiResponse<ApiKey>, StripeError> {
        if params
            .expire_current_key_in_minutes
            .is_some_and(|m| m > 10_080)
        {
            return Err(StripeError::InvalidRequest(
                "expire_current_key_in_minutes must be at most 10080 (7 days)".into(),
            ));
        }
        let path = format!("/v2/iam/api_keys/{}/rotate", encode_segment(id));
        self.execute(
            Method::POST,
            &path,
            json_body(params)?,
            Some(idempotency_key),
        )
        .await
    }

    // ---------------------------------------------------------------- v1 webhook endpoints

    /// `POST /v1/webhook_endpoints`: the answer's `secret` is the only time the signing secret
    /// is ever shown.
    pub async fn create_webhook_endpoint(
        &self,
        params: &CreateWebhookEndpointParams,
        idempotency_key: &str,
    ) -> Result<ApiResponse<WebhookEndpoint>, StripeError> {
        self.execute(
            Method::POST,
            "/v1/webhook_endpoints",
            form_body(&params.to_form()),
            Some(idempotency_key),
        )
        .await
    }

    /// `GET /v1/webhook_endpoints/{id}` (never shows the secret).
    pub async fn retrieve_webhook_endpoint(
        &self,
        id: &str,
    ) -> Result<ApiResponse<WebhookEndpoint>, StripeError> {
        let path = format!("/v1/webhook_endpoints/{}", encode_segment(id));
        self.execute(Method::GET, &path, Body::None, None).await
    }

    /// `GET /v1/webhook_endpoints`: one page (cursor pagination).
    pub async fn list_webhook_endpoints(
        &self,
        params: &ListWebhookEndpointsParams,
    ) -> Result<ApiResponse<WebhookEndpointList>, StripeError> {
        if params.limit.is_some_and(|l| l == 0 || l > 100) {
            return Err(StripeError::InvalidRequest(
                "limit must be between 1 and 100".into(),
            ));
        }
        // Built in a block: the serializer is not Send and must not live across the await.
        let q = {
            let mut q = url::form_urlencoded::Serializer::new(String::new());
            if let Some(l) = params.limit {
                q.append_pair("limit", &l.to_string());
            }
            if let Some(s) = &params.starting_after {
                q.append_pair("starting_after", s);
            }
            if let Some(e) = &params.ending_before {
                q.append_pair("ending_before", e);
            }
            q.finish()
        };
        let path = if q.is_empty() {
            "/v1/webhook_endpoints".to_owned()
        } else {
            format!("/v1/webhook_endpoints?{q}")
        };
        self.execute(Method::GET, &path, Body::None, None).await
    }

    /// Lists every webhook endpoint, following `has_more` / `starting_after`.
    pub async fn list_all_webhook_endpoints(
        &self,
        page_size: u32,
    ) -> Result<Paged<WebhookEndpoint>, StripeError> {
        let mut params = ListWebhookEndpointsParams {
            limit: Some(page_size.clamp(1, 100)),
            ..Default::default()
        };
        let mut out = Paged {
            items: Vec::new(),
            request_ids: Vec::new(),
        };
        loop {
            let mut page = self.list_webhook_endpoints(&params).await?;
            out.request_ids.push(page.request_id.clone());
            let last = page.value.data.last().map(|e| e.id.clone());
            out.items.append(&mut page.value.data);
            match (page.value.has_more, last) {
                (true, Some(last)) => {
                    if params.starting_after.as_deref() == Some(last.as_str()) {
                        return Err(StripeError::InvalidRequest(
                            "Stripe returned the same page twice; stopping".into(),
                        ));
                    }
                    params.starting_after = Some(last);
                }
                _ => return Ok(out),
            }
        }
    }

    /// `POST /v1/webhook_endpoints/{id}`: url, enabled_events, description, metadata,
    /// disabled.
    pub async fn update_webhook_endpoint(
        &self,
        id: &str,
        params: &UpdateWebhookEndpointParams,
        idempotency_key: &str,
    ) -> Result<ApiResponse<WebhookEndpoint>, StripeError> {
        let path = format!("/v1/webhook_endpoints/{}", encode_segment(id));
        self.execute(
            Method::POST,
            &path,
            form_body(&params.to_form()),
            Some(idempotency_key),
        )
        .await
    }

    /// `DELETE /v1/webhook_endpoints/{id}`. A 404 means it is already gone
    /// ([`StripeError::is_not_found`]).
    pub async fn delete_webhook_endpoint(
        &self,
        id: &str,
    ) -> Result<ApiResponse<DeletedWebhookEndpoint>, StripeError> {
        let path = format!("/v1/webhook_endpoints/{}", encode_segment(id));
        self.execute(Method::DELETE, &path, Body::None, None).await
    }

    // ---------------------------------------------------------------- machinery

    fn relative_page_url(&self, page_url: &str) -> Result<String, StripeError> {
        if page_url.starts_with('/') && !page_url.starts_with("//") {
            return Ok(page_url.to_owned());
        }
        let base = url::Url::parse(&self.inner.base)
            .map_err(|e| StripeError::Config(format!("api base URL: {e}")))?;
        let next = url::Url::parse(page_url).map_err(|_| {
            StripeError::InvalidRequest("next_page_url is neither a path nor a URL".into())
        })?;
        if next.origin() != base.origin() {
            return Err(StripeError::InvalidRequest(
                "next_page_url points to another origin than the API base URL; refusing to send \
                 the app key there"
                    .into(),
            ));
        }
        Ok(match next.query() {
            Some(q) => format!("{}?{q}", next.path()),
            None => next.path().to_owned(),
        })
    }

    fn observe(&self, record: CallRecord) {
        tracing::debug!(
            method = %record.method,
            path = %record.path,
            status = record.status,
            connection_error = record.connection_error.map(|k| k.as_str()),
            request_id = record.request_id.as_deref(),
            idempotency_key = record.idempotency_key.as_deref(),
            attempt = record.attempt,
            duration_ms = record.duration.as_millis() as u64,
            error_code = record.error_code.as_deref(),
            will_retry = record.will_retry,
            "stripe call"
        );
        if let Some(observer) = &self.inner.observer {
            observer.on_call(&record);
        }
    }

    async fn execute<T: DeserializeOwned>(
        &self,
        method: Method,
        path_and_query: &str,
        body: Body,
        idempotency_key: Option<&str>,
    ) -> Result<ApiResponse<T>, StripeError> {
        let inner = &*self.inner;
        if method == Method::POST {
            match idempotency_key {
                None => {
                    return Err(StripeError::InvalidRequest(
                        "every POST needs an idempotency key".into(),
                    ));
                }
                Some(k) if k.is_empty() || k.len() > MAX_IDEMPOTENCY_KEY_LEN => {
                    return Err(StripeError::InvalidRequest(format!(
                        "idempotency key must be 1 to {MAX_IDEMPOTENCY_KEY_LEN} characters, got {}",
                        k.len()
                    )));
                }
                Some(k) if !k.chars().all(|c| c.is_ascii_graphic()) => {
                    return Err(StripeError::InvalidRequest(
                        "idempotency key must be printable ASCII without spaces".into(),
                    ));
                }
                Some(_) => {}
            }
        }
        let url = format!("{}{}", inner.base, path_and_query);
        let path = path_and_query
            .split('?')
            .next()
            .unwrap_or(path_and_query)
            .to_owned();
        let policy = &inner.config.retry;
        let mut attempt: u32 = 0;
        loop {
            attempt += 1;
            let can_retry = attempt <= policy.max_retries;
            let refused = |retry_in| StripeError::CircuitOpen {
                context: inner.config.context.clone(),
                method: method.as_str().to_owned(),
                path: path.clone(),
                retry_in,
            };
            // An open breaker refuses before the call waits for a token, and again after (it
            // may have opened meanwhile); the admitted attempt reports its outcome to it.
            if let Some(b) = &inner.breaker
                && let Err(r) = b.check()
            {
                return Err(refused(r.retry_in));
            }
            inner.limiter.acquire().await;
            let admitted = match &inner.breaker {
                Some(b) => Some(b.admit().map_err(|r| refused(r.retry_in))?),
                None => None,
            };
            let mut req = inner
                .http
                .request(method.clone(), &url)
                .timeout(inner.config.timeout)
                .header(reqwest::header::AUTHORIZATION, inner.authorization.clone())
                .header("Stripe-Version", &inner.config.api_version)
                .header("Stripe-Context", &inner.config.context);
            if let Some(k) = idempotency_key {
                req = req.header("Idempotency-Key", k);
            }
            req = match &body {
                Body::None => req,
                Body::Json(bytes) => req
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(bytes.clone()),
                Body::Form(form) => req
                    .header(
                        reqwest::header::CONTENT_TYPE,
                        "application/x-www-form-urlencoded",
                    )
                    .body(form.clone()),
            };
            let started = Instant::now();
            let mut record = CallRecord {
                method: method.as_str().to_owned(),
                path: path.clone(),
                account: inner.config.context.clone(),
                status: None,
                connection_error: None,
                request_id: None,
                idempotency_key: idempotency_key.map(str::to_owned),
                attempt,
                duration: Duration::ZERO,
                error_code: None,
                error_type: None,
                will_retry: false,
            };
            let outcome = match req.send().await {
                Err(e) => Err((classify(&e), error_chain(&e.without_url()))),
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    let headers = resp.headers().clone();
                    let header = |name: &str| {
                        headers
                            .get(name)
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_owned)
                    };
                    record.status = Some(status);
                    record.request_id = header("request-id");
                    match resp.bytes().await {
                        Err(e) => Err((classify(&e), error_chain(&e.without_url()))),
                        Ok(bytes) => Ok((
                            status,
                            bytes,
                            header("stripe-should-retry").and_then(|v| parse_should_retry(&v)),
                            header("retry-after")
                                .and_then(|v| parse_retry_after(&v, SystemTime::now())),
                            header("idempotent-replayed").is_some_and(|v| v == "true"),
                        )),
                    }
                }
            };
            record.duration = started.elapsed();
            if let Some(attempt) = admitted {
                // Stripe answered (anything but a 5xx) or it did not. A saved answer replayed
                // under its idempotency key is Stripe answering, whatever its status: counting a
                // replayed 500 as a failure would open the breaker on the very call that moves
                // on to a fresh key, and its probe would replay the same 500 forever.
                let answered =
                    matches!(&outcome, Ok((status, .., replayed)) if *status < 500 || *replayed);
                attempt.record(answered);
            }
            match outcome {
                Err((kind, message)) => {
                    record.connection_error = Some(kind);
                    record.will_retry = can_retry;
                    self.observe(record);
                    if can_retry {
                        let delay = policy.backoff(attempt, None, rand::random::<f64>());
                        tokio::time::sleep(delay).await;
                        continue;
                    }
                    return Err(StripeError::Connection {
                        kind,
                        method: method.as_str().to_owned(),
                        path,
                        attempts: attempt,
                        message,
                    });
                }
                Ok((status, bytes, should_retry, retry_after, replayed)) => {
                    if (200..300).contains(&status) {
                        let decoded = serde_json::from_slice::<T>(&bytes);
                        if decoded.is_err() {
                            record.error_code = Some("decode".into());
                        }
                        let request_id = record.request_id.clone();
                        self.observe(record);
                        return match decoded {
                            Ok(value) => Ok(ApiResponse {
                                value,
                                request_id,
                                status,
                                attempts: attempt,
                                idempotent_replayed: replayed,
                            }),
                            Err(e) => Err(StripeError::Decode {
                                status,
                                path,
                                request_id,
                                // serde_json messages name the position and expected type,
                                // not the offending value for these shapes
                                message: format!(
                                    "{} at line {} column {}",
                                    match e.classify() {
                                        serde_json::error::Category::Data =>
                                            "unexpected shape or missing field",
                                        serde_json::error::Category::Syntax => "invalid JSON",
                                        serde_json::error::Category::Eof => "truncated JSON",
                                        serde_json::error::Category::Io => "read error",
                                    },
                                    e.line(),
                                    e.column()
                                ),
                            }),
                        };
                    }
                    let mut api: ApiError = map_error_response(
                        status,
                        &bytes,
                        record.request_id.clone(),
                        should_retry,
                        retry_after,
                    );
                    api.attempts = attempt;
                    api.idempotent_replayed = replayed;
                    let retry = api.is_retryable() && can_retry;
                    record.error_code = api.code.clone();
                    record.error_type = api.error_type.clone();
                    record.will_retry = retry;
                    self.observe(record);
                    if status == 429 {
                        // Stripe limits the account, not this call: every call through the
                        // account's limiter (other resources' too) waits out the pause.
                        let pause = retry_after.map_or_else(
                            || policy.backoff(attempt, None, 1.0),
                            |ra| ra.min(policy.max_retry_after),
                        );
                        inner.limiter.pause_for(pause);
                    }
                    if retry {
                        let delay = policy.backoff(attempt, retry_after, rand::random::<f64>());
                        tokio::time::sleep(delay).await;
                        continue;
                    }
                    return Err(StripeError::Api(Box::new(api)));
                }
            }
        }
    }
}

/// Decides what a 404 to an expire means, given how a full listing (expired keys included)
/// shows the key: absent → gone, expired → already expired, anything else → not confirmed.
fn outcome_after_not_found(
    id: &str,
    listed: Option<ApiKeyStatus>,
    list_request_id: Option<String>,
    not_found_request_id: Option<&str>,
) -> Result<ExpireOutcome, StripeError> {
    match listed {
        None => Ok(ExpireOutcome::Gone {
            request_id: list_request_id,
        }),
        Some(ApiKeyStatus::Expired) => Ok(ExpireOutcome::AlreadyExpired {
            request_id: list_request_id,
        }),
        Some(status) => Err(StripeError::Unconfirmed(format!(
            "expire of API key {id} answered 404 [request {}] but a listing still shows the key \
             ({status:?})",
            not_found_request_id.unwrap_or("unknown")
        ))),
    }
}

fn json_body<T: Serialize>(value: &T) -> Result<Body, StripeError> {
    serde_json::to_vec(value)
        .map(Body::Json)
        .map_err(|e| StripeError::InvalidRequest(format!("could not encode parameters: {e}")))
}

fn form_body(pairs: &[(String, String)]) -> Body {
    let mut s = url::form_urlencoded::Serializer::new(String::new());
    for (k, v) in pairs {
        s.append_pair(k, v);
    }
    Body::Form(s.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idempotency_keys_are_stable_distinct_and_bounded() {
        let uid = "6f1c2b3a-0000-4000-8000-000000000001";
        assert_eq!(
            idempotency_key(uid, 3, "mint"),
            idempotency_key(uid, 3, "mint")
        );
        assert_eq!(idempotency_key(uid, 3, "mint"), format!("sko:{uid}:3:mint"));
        assert_ne!(
            idempotency_key(uid, 3, "mint"),
            idempotency_key(uid, 4, "mint")
        );
        assert_ne!(
            idempotency_key(uid, 3, "mint"),
            idempotency_key(uid, 3, "expire")
        );
        let long = "x".repeat(400);
        let k = idempotency_key(&long, 1, "mint");
        assert!(k.len() <= MAX_IDEMPOTENCY_KEY_LEN);
        assert_ne!(k, idempotency_key(&long, 2, "mint"));
        assert!(idempotency_key("with space", 1, "s").starts_with("sko:h:"));
    }

    #[test]
    fn a_404_on_expire_is_gone_only_when_the_listing_agrees() {
        let gone = outcome_after_not_found("apikey_1", None, Some("req_l".into()), Some("req_e"));
        assert_eq!(
            gone.unwrap(),
            ExpireOutcome::Gone {
                request_id: Some("req_l".into())
            }
        );
        let expired = outcome_after_not_found("apikey_1", Some(ApiKeyStatus::Expired), None, None);
        assert_eq!(expired.unwrap().as_str(), "already_expired");
        for status in [ApiKeyStatus::Active, ApiKeyStatus::Unknown] {
            let err =
                outcome_after_not_found("apikey_1", Some(status), None, Some("req_e")).unwrap_err();
            assert!(matches!(err, StripeError::Unconfirmed(_)), "{err}");
            assert!(err.is_retryable());
            let text = err.to_string();
            assert!(
                text.contains("apikey_1") && text.contains("req_e"),
                "{text}"
            );
        }
    }

    #[test]
    fn path_segments_are_percent_encoded() {
        assert_eq!(encode_segment("we_123-abc"), "we_123-abc");
        assert_eq!(encode_segment("../x?y"), "%2E%2E%2Fx%3Fy");
    }
}
