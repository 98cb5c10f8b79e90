//! Errors of the Stripe client.

use std::fmt;
use std::time::Duration;

use super::jwe::JweError;
use super::retry::status_is_retryable;

/// An error answer from Stripe (`{"error": {type, code, message, param, ...}}`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status code.
    pub status: u16,
    /// `error.type`: `api_error`, `card_error`, `idempotency_error`, `invalid_request_error`...
    pub error_type: Option<String>,
    /// `error.code`, e.g. `api_key_expired`, `rate_limit`, `resource_missing`.
    pub code: Option<String>,
    /// `error.message` as written by Stripe (Stripe redacts keys in it).
    pub message: Option<String>,
    /// `error.param`: the request parameter at fault.
    pub param: Option<String>,
    /// `error.doc_url`.
    pub doc_url: Option<String>,
    /// The `Request-Id` response header: quote it to Stripe support and in the audit log.
    pub request_id: Option<String>,
    /// The `Stripe-Should-Retry` response header, when present.
    pub should_retry: Option<bool>,
    /// The `Retry-After` response header, when present and valid.
    pub retry_after: Option<Duration>,
    /// How many HTTP attempts were made before giving up.
    pub attempts: u32,
    /// `Idempotent-Replayed: true` on the (last) answer: this error is Stripe's saved answer to
    /// an earlier request with the same idempotency key, not a fresh attempt. A saved 5xx is
    /// replayed for as long as Stripe keeps the key (at least 24 h): to try again, confirm that
    /// nothing was created and use a new idempotency key.
    pub idempotent_replayed: bool,
}

impl ApiError {
    /// Whether sending the same request again may succeed (see
    /// [`status_is_retryable`](super::retry::status_is_retryable)).
    pub fn is_retryable(&self) -> bool {
        status_is_retryable(self.status, self.should_retry)
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Stripe answered HTTP {}", self.status)?;
        if let Some(t) = &self.error_type {
            write!(f, " ({t}")?;
            if let Some(c) = &self.code {
                write!(f, "/{c}")?;
            }
            f.write_str(")")?;
        } else if let Some(c) = &self.code {
            write!(f, " ({c})")?;
        }
        if let Some(m) = &self.message {
            write!(f, ": {m}")?;
        }
        if let Some(p) = &self.param {
            write!(f, " [param {p}]")?;
        }
        if let Some(r) = &self.request_id {
            write!(f, " [request {r}]")?;
        }
        if self.attempts > 1 {
            write!(f, " after {} attempts", self.attempts)?;
        }
        if self.idempotent_replayed {
            f.write_str(" (a replay of the saved answer for this idempotency key)")?;
        }
        Ok(())
    }
}

/// What kind of transport failure happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionErrorKind {
    /// The attempt exceeded the configured timeout.
    Timeout,
    /// No connection could be established (refused, DNS, TLS).
    Connect,
    /// The connection broke while sending the request or reading the answer.
    Broken,
}

impl ConnectionErrorKind {
    /// A short label for metrics and the call record: `timeout`, `connect`, `broken`.
    pub fn as_str(self) -> &'static str {
        match self {
            ConnectionErrorKind::Timeout => "timeout",
            ConnectionErrorKind::Connect => "connect",
            ConnectionErrorKind::Broken => "broken",
        }
    }
}

/// Errors of [`StripeClient`](super::StripeClient) calls.
#[derive(Debug, thiserror::Error)]
pub enum StripeError {
    /// Stripe answered with an error status.
    #[error("{0}")]
    Api(Box<ApiError>),
    /// Stripe could not be reached or the connection broke (after all retries).
    #[error(
        "could not reach Stripe for {method} {path} ({}) after {attempts} attempt(s): {message}; \
         check network access to the API base URL",
        kind.as_str()
    )]
    Connection {
        /// Transport failure kind.
        kind: ConnectionErrorKind,
        /// HTTP method of the call.
        method: String,
        /// Path of the call (no query).
        path: String,
        /// Attempts made.
        attempts: u32,
        /// Description of the last failure (never contains bodies or keys).
        message: String,
    },
    /// Stripe answered 2xx but the body is not the expected object.
    #[error(
        "Stripe answered HTTP {status} to {path} with a body that is not the expected object \
         ({message}) [request {}]; the API version may not match",
        request_id.as_deref().unwrap_or("unknown")
    )]
    Decode {
        /// HTTP status.
        status: u16,
        /// Path of the call.
        path: String,
        /// `Request-Id` header.
        request_id: Option<String>,
        /// The decoder's message (names the field, never quotes values).
        message: String,
    },
    /// The call was refused before sending (e.g. an idempotency key over 255 characters).
    #[error("invalid Stripe request: {0}")]
    InvalidRequest(String),
    /// The client configuration is unusable (e.g. a bad base URL).
    #[error("invalid Stripe client configuration: {0}")]
    Config(String),
    /// A live-mode secret could not be decrypted.
    #[error(transparent)]
    Jwe(#[from] JweError),
    /// Stripe answered, but the answer and a confirming read disagree with the outcome the
    /// call should have (e.g. an expire answered 200 while the key still reads active, or 404
    /// for a key that a listing still shows active). Retry later.
    #[error("Stripe's answer could not be confirmed: {0}")]
    Unconfirmed(String),
    /// The account's circuit breaker is open (Stripe failed repeatedly for it): the call was
    /// not sent. Retry after `retry_in`.
    #[error(
        "Stripe is unavailable for account {context}: its circuit breaker is open after repeated \
         timeouts, connection errors or 5xx answers, so {method} {path} was not sent; the next \
         probe is in {}s",
        retry_in.as_secs()
    )]
    CircuitOpen {
        /// The `Stripe-Context` account.
        context: String,
        /// HTTP method of the call.
        method: String,
        /// Path of the call (no query).
        path: String,
        /// When a call may be let through again.
        retry_in: std::time::Duration,
    },
}

impl StripeError {
    /// Whether retrying the same call (with the same idempotency key) later may succeed:
    /// connection failures, 409, 429 and 5xx unless Stripe said `Stripe-Should-Retry: false`.
    pub fn is_retryable(&self) -> bool {
        match self {
            StripeError::Api(e) => e.is_retryable(),
            StripeError::Connection { .. }
            | StripeError::Unconfirmed(_)
            | StripeError::CircuitOpen { .. } => true,
            StripeError::Decode { .. }
            | StripeError::InvalidRequest(_)
            | StripeError::Config(_)
            | StripeError::Jwe(_) => false,
        }
    }

    /// The Stripe API error, if this is one.
    pub fn api(&self) -> Option<&ApiError> {
        match self {
            StripeError::Api(e) => Some(e),
            _ => None,
        }
    }

    /// HTTP status, if Stripe answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            StripeError::Api(e) => Some(e.status),
            StripeError::Decode { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// `error.code`, if Stripe sent one.
    pub fn code(&self) -> Option<&str> {
        self.api().and_then(|e| e.code.as_deref())
    }

    /// The `Request-Id` of the (last) answer, if any.
    pub fn request_id(&self) -> Option<&str> {
        match self {
            StripeError::Api(e) => e.request_id.as_deref(),
            StripeError::Decode { request_id, .. } => request_id.as_deref(),
            _ => None,
        }
    }

    /// True for 404 (`resource_missing`). Not proof that a key is gone: see
    /// [`StripeClient::expire_api_key_confirmed`](super::StripeClient::expire_api_key_confirmed).
    pub fn is_not_found(&self) -> bool {
        self.status() == Some(404)
    }

    /// True when Stripe refused the *caller's own* key (401: invalid, expired — code
    /// `api_key_expired` — or revoked). This never says anything about the key a call acted
    /// on: the app's credentials need fixing and nothing at Stripe changed.
    pub fn is_caller_key_rejected(&self) -> bool {
        self.status() == Some(401)
    }

    /// Whether this error is Stripe's saved answer to an earlier request with the same
    /// idempotency key (`Idempotent-Replayed: true`).
    pub fn is_idempotent_replay(&self) -> bool {
        self.api().is_some_and(|e| e.idempotent_replayed)
    }

    /// A low-cardinality label for metrics: the error code, `http_<status>`, a connection kind,
    /// `decode`, `invalid_request`, `config` or `jwe`.
    pub fn metric_label(&self) -> String {
        match self {
            StripeError::Api(e) => e
                .code
                .clone()
                .unwrap_or_else(|| format!("http_{}", e.status)),
            StripeError::Connection { kind, .. } => kind.as_str().to_owned(),
            StripeError::Decode { .. } => "decode".to_owned(),
            StripeError::InvalidRequest(_) => "invalid_request".to_owned(),
            StripeError::Config(_) => "config".to_owned(),
            StripeError::Jwe(_) => "jwe".to_owned(),
            StripeError::Unconfirmed(_) => "unconfirmed".to_owned(),
            StripeError::CircuitOpen { .. } => "circuit_open".to_owned(),
        }
    }
}

/// The JSON error envelope Stripe sends.
#[derive(Debug, serde::Deserialize)]
pub(crate) struct ErrorEnvelope {
    pub error: ErrorBody,
}

#[derive(Debug, Default, serde::Deserialize)]
pub(crate) struct ErrorBody {
    #[serde(rename = "type")]
    pub error_type: Option<String>,
    pub code: Option<String>,
    pub message: Option<String>,
    pub param: Option<String>,
    pub doc_url: Option<String>,
}

/// Builds an [`ApiError`] from a status, headers already parsed, and the raw body.
/// A body that is not Stripe's envelope still yields an error with the status.
pub(crate) fn map_error_response(
    status: u16,
    body: &[u8],
    request_id: Option<String>,
    should_retry: Option<bool>,
    retry_after: Option<Duration>,
) -> ApiError {
    let parsed = serde_json::from_slice::<ErrorEnvelope>(body)
        .map(|e| e.error)
        .unwrap_or_default();
    ApiError {
        status,
        error_type: parsed.error_type,
        code: parsed.code,
        message: parsed.message,
        param: parsed.param,
        doc_url: parsed.doc_url,
        request_id,
        should_retry,
        retry_after,
        attempts: 1,
        idempotent_replayed: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_body_maps_to_typed_fields() {
        let body = br#"{"error":{"type":"invalid_request_error","code":"api_key_expired",
            "message":"Expired API Key provided","param":null,"doc_url":"https://stripe.com/docs/error-codes/api-key-expired"}}"#;
        let e = map_error_response(401, body, Some("req_123".into()), None, None);
        assert_eq!(e.status, 401);
        assert_eq!(e.error_type.as_deref(), Some("invalid_request_error"));
        assert_eq!(e.code.as_deref(), Some("api_key_expired"));
        assert_eq!(e.message.as_deref(), Some("Expired API Key provided"));
        assert_eq!(e.param, None);
        assert_eq!(e.request_id.as_deref(), Some("req_123"));
        assert!(!e.is_retryable());
        let text = StripeError::Api(Box::new(e)).to_string();
        assert!(
            text.contains("401") && text.contains("api_key_expired") && text.contains("req_123")
        );
    }

    #[test]
    fn non_json_error_body_still_yields_status() {
        let e = map_error_response(502, b"<html>bad gateway</html>", None, None, None);
        assert_eq!(e.status, 502);
        assert_eq!(e.code, None);
        assert!(e.is_retryable());
    }

    #[test]
    fn retryability_follows_status_and_should_retry_header() {
        let mk = |status, should_retry| {
            StripeError::Api(Box::new(map_error_response(
                status,
                b"{}",
                None,
                should_retry,
                None,
            )))
        };
        assert!(mk(429, None).is_retryable());
        assert!(mk(409, None).is_retryable());
        assert!(mk(500, None).is_retryable());
        assert!(!mk(500, Some(false)).is_retryable());
        assert!(mk(400, Some(true)).is_retryable());
        assert!(!mk(400, None).is_retryable());
        assert!(!mk(401, None).is_retryable());
        assert!(!mk(403, None).is_retryable());
        assert!(!mk(404, None).is_retryable());
        assert!(mk(404, None).is_not_found());
        let conn = StripeError::Connection {
            kind: ConnectionErrorKind::Timeout,
            method: "GET".into(),
            path: "/v1/x".into(),
            attempts: 3,
            message: "timed out".into(),
        };
        assert!(conn.is_retryable());
        assert_eq!(conn.metric_label(), "timeout");
        assert!(!StripeError::InvalidRequest("x".into()).is_retryable());
        assert_eq!(mk(500, None).metric_label(), "http_500");
    }

    #[test]
    fn a_401_is_about_the_callers_key_and_a_replay_says_so() {
        let body = br#"{"error":{"type":"invalid_request_error","code":"api_key_expired"}}"#;
        let e = StripeError::Api(Box::new(map_error_response(401, body, None, None, None)));
        assert!(e.is_caller_key_rejected());
        assert!(!e.is_not_found());
        let e404 = StripeError::Api(Box::new(map_error_response(404, b"{}", None, None, None)));
        assert!(!e404.is_caller_key_rejected());

        let mut saved = map_error_response(500, b"{}", Some("req_1".into()), None, None);
        assert!(!StripeError::Api(Box::new(saved.clone())).is_idempotent_replay());
        saved.idempotent_replayed = true;
        let e = StripeError::Api(Box::new(saved));
        assert!(e.is_idempotent_replay());
        assert!(e.to_string().contains("replay of the saved answer"), "{e}");
        assert!(!StripeError::InvalidRequest("x".into()).is_idempotent_replay());
    }

    #[test]
    fn idempotency_error_is_not_retryable() {
        let body = br#"{"error":{"type":"idempotency_error","message":"Keys for idempotent requests can only be used with the same parameters they were first used with."}}"#;
        let e = map_error_response(400, body, None, None, None);
        assert_eq!(e.error_type.as_deref(), Some("idempotency_error"));
        assert!(!e.is_retryable());
    }
}
