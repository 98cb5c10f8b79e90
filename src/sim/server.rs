//! The simulator's HTTP layer: the Stripe API surface, the `/_sim/` control API, and an accept
//! loop that can drop connections on purpose.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State as AxState};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tower::ServiceExt as _;

use super::SimError;
use super::api::{
    ApiRequest, Behaviour, Ctx, Reply, error_reply, handle_app_call, handle_scoped_call, redacted,
    unrecognized,
};
use super::state::{
    FaultKind, FaultRule, FaultSpec, RequestLogEntry, SavedResponse, SimState, State, random_alnum,
};
use crate::secret::SecretString;
use crate::stripe::config::Mode;

pub(crate) struct Shared {
    pub state: Mutex<State>,
    pub app_keys: Vec<SecretString>,
    pub app_id: String,
    pub started: Instant,
    pub hang: Duration,
    pub http: reqwest::Client,
    pub behaviour: Behaviour,
}

impl Shared {
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn app_key_matches(&self, presented: &str) -> bool {
        let mut hit = subtle::Choice::from(0u8);
        for key in &self.app_keys {
            hit |= key.expose().as_bytes().ct_eq(presented.as_bytes());
        }
        bool::from(hit)
    }
}

/// Marker in a response's extensions: close the connection instead of answering.
#[derive(Clone, Copy)]
struct DropConnection;

fn dropped() -> Response {
    let mut r = StatusCode::INTERNAL_SERVER_ERROR.into_response();
    r.extensions_mut().insert(DropConnection);
    r
}

fn header<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

struct Answer {
    status: u16,
    body: Vec<u8>,
    headers: Vec<(&'static str, String)>,
    request_id: String,
    replayed: bool,
}

impl Answer {
    fn from_reply(reply: Reply, request_id: &str) -> Self {
        Self {
            status: reply.status,
            body: serde_json::to_vec(&reply.body).unwrap_or_default(),
            headers: reply.headers,
            request_id: request_id.to_owned(),
            replayed: false,
        }
    }

    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut resp = (status, self.body).into_response();
        let h = resp.headers_mut();
        h.insert("content-type", HeaderValue::from_static("application/json"));
        if let Ok(v) = HeaderValue::from_str(&self.request_id) {
            h.insert("request-id", v);
        }
        if self.replayed {
            h.insert("idempotent-replayed", HeaderValue::from_static("true"));
        }
        for (name, value) in self.headers {
            if let Ok(v) = HeaderValue::from_str(&value) {
                h.insert(name, v);
            }
        }
        resp
    }
}

fn fingerprint(method: &str, path: &str, query: &str, body: &[u8]) -> [u8; 32] {
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    for part in [
        method.as_bytes(),
        b"\0",
        path.as_bytes(),
        b"\0",
        query.as_bytes(),
        b"\0",
        body,
    ] {
        ctx.update(part);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

fn rate_limited(request_id: &str, mode: Option<Mode>, retry_after: Option<u64>) -> Reply {
    let mut r = error_reply(
        429,
        "invalid_request_error",
        Some("rate_limit"),
        "Request rate limit exceeded. Learn more about rate limits here https://stripe.com/docs/rate-limits.",
        None,
        request_id,
        mode,
    );
    if let Some(s) = retry_after {
        r.headers.push(("retry-after", s.to_string()));
    }
    r
}

fn server_error(request_id: &str, mode: Option<Mode>, should_retry: Option<bool>) -> Reply {
    let mut r = error_reply(
        500,
        "api_error",
        None,
        "An unknown error occurred (injected by the simulator).",
        None,
        request_id,
        mode,
    );
    if let Some(s) = should_retry {
        r.headers.push(("stripe-should-retry", s.to_string()));
    }
    r
}

/// Marks an idempotency key as being processed; unmarks it when dropped (on every exit path).
struct InFlight {
    shared: Arc<Shared>,
    key: (String, String),
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.shared.lock().in_flight.remove(&self.key);
    }
}

/// The Stripe API surface (everything outside `/_sim/`).
async fn api(
    AxState(shared): AxState<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let request_id = format!("req_{}", random_alnum(14));
    let received_ms = u64::try_from(shared.started.elapsed().as_millis()).unwrap_or(u64::MAX);
    let m = method.as_str().to_owned();
    let path = uri.path().to_owned();
    let query = uri.query().unwrap_or("").to_owned();
    let idem = header(&headers, "idempotency-key").map(str::to_owned);
    let bearer = header(&headers, "authorization")
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned);
    let context = header(&headers, "stripe-context").map(str::to_owned);

    // A second request with an idempotency key that is still being processed gets 409, as
    // Stripe answers: the client may retry it later and will then get the saved answer.
    let in_flight_key = match (&idem, m == "POST") {
        (Some(k), true) => Some((context.clone().unwrap_or_default(), k.clone())),
        _ => None,
    };
    let (fault, at, conflict) = {
        let mut st = shared.lock();
        let conflict = match &in_flight_key {
            Some(key) => !st.in_flight.insert(key.clone()),
            None => false,
        };
        let fault = if conflict {
            None
        } else {
            st.take_fault_for(&m, &path, context.as_deref())
        };
        (fault, st.clock.now(), conflict)
    };
    let _in_flight = match (&in_flight_key, conflict) {
        (Some(key), false) => Some(InFlight {
            shared: shared.clone(),
            key: key.clone(),
        }),
        _ => None,
    };
    let mut entry = RequestLogEntry {
        request_id: request_id.clone(),
        method: m.clone(),
        path: path.clone(),
        query: query.clone(),
        account: None,
        context: context.clone(),
        idempotency_key: idem.clone(),
        status: None,
        fault: fault.as_ref().map(|f| f.label().to_owned()),
        replayed: false,
        received_ms,
        at,
    };
    let finish = |entry: RequestLogEntry| shared.lock().log.push(entry);
    if conflict {
        let answer = Answer::from_reply(
            error_reply(
                409,
                "idempotency_error",
                Some("idempotency_key_in_use"),
                "There is currently another in-progress request using this idempotency key. Please try again later.",
                None,
                &request_id,
                None,
            ),
            &request_id,
        );
        entry.status = Some(answer.status);
        finish(entry);
        return answer.into_response();
    }

    let mut saved_500: Option<Option<bool>> = None;
    let mut drop_after_commit = false;
    match fault {
        Some(FaultKind::RateLimited { retry_after_secs }) => {
            let answer = Answer::from_reply(
                rate_limited(&request_id, None, retry_after_secs),
                &request_id,
            );
            entry.status = Some(answer.status);
            finish(entry);
            return answer.into_response();
        }
        Some(FaultKind::ServerError {
            saved: false,
            should_retry,
        }) => {
            let answer =
                Answer::from_reply(server_error(&request_id, None, should_retry), &request_id);
            entry.status = Some(answer.status);
            finish(entry);
            return answer.into_response();
        }
        Some(FaultKind::ServerError {
            saved: true,
            should_retry,
        }) => saved_500 = Some(should_retry),
        Some(FaultKind::Latency { millis }) => {
            tokio::time::sleep(Duration::from_millis(millis)).await
        }
        Some(FaultKind::Hang) => {
            finish(entry);
            tokio::time::sleep(shared.hang).await;
            return dropped();
        }
        Some(FaultKind::DropAfterCommit) => drop_after_commit = true,
        None => {}
    }

    let req = ApiRequest {
        method: &m,
        path: &path,
        query: &query,
        body: &body,
    };
    let answer = {
        let mut guard = shared.lock();
        let st = &mut *guard;
        let now = st.clock.now();
        let caller_key_id = bearer.as_deref().map(super::app_key_id).unwrap_or_default();
        let ctx = Ctx {
            request_id: &request_id,
            app_id: &shared.app_id,
            now,
            behaviour: shared.behaviour,
            last_used_lag: st.last_used_lag,
            caller_key_id: &caller_key_id,
        };
        // One route table for the broker and this surface. The app's own surface (`/v2/`,
        // `/v1/webhook_endpoints`) stays the app's unless a minted key calls it.
        let minted = bearer.as_deref().is_some_and(|t| st.tokens.contains_key(t));
        let app_surface = path.starts_with("/v2/") || path.starts_with("/v1/webhook_endpoints");
        let scoped = crate::egress::routes::route_for(&m, &path).filter(|_| minted || !app_surface);
        if let Some(route) = scoped {
            let ai = bearer
                .as_deref()
                .and_then(|t| st.tokens.get(t))
                .map(|(ai, _)| *ai);
            if let Some(ai) = ai
                && st.accounts[ai].bucket.try_acquire(Instant::now()).is_err()
            {
                entry.account = Some(st.accounts[ai].id.clone());
                Answer::from_reply(
                    rate_limited(&request_id, Some(st.accounts[ai].mode), Some(1)),
                    &request_id,
                )
            } else {
                let (ai, reply) = handle_scoped_call(st, bearer.as_deref(), route, &req, &ctx);
                entry.account = ai.map(|ai| st.accounts[ai].id.clone());
                Answer::from_reply(reply, &request_id)
            }
        } else if path.starts_with("/v2/") || path.starts_with("/v1/webhook_endpoints") {
            let authed = bearer.as_deref().is_some_and(|b| shared.app_key_matches(b));
            let app_key_expired = authed
                && bearer.as_deref().is_some_and(|b| {
                    st.expired_app_keys
                        .contains(&crate::secret::fingerprint(b.as_bytes()))
                });
            let ai = context.as_deref().and_then(|c| st.account_index(c));
            match (bearer.as_deref(), authed, ai) {
                // The app's own key expired: Stripe's 401 `api_key_expired`, whatever the call.
                (Some(b), true, _) if app_key_expired => Answer::from_reply(
                    error_reply(
                        401,
                        "invalid_request_error",
                        Some("api_key_expired"),
                        format!("Expired API Key provided: {}", redacted(b)),
                        None,
                        &request_id,
                        None,
                    ),
                    &request_id,
                ),
                (None, _, _) => Answer::from_reply(
                    error_reply(
                        401,
                        "invalid_request_error",
                        None,
                        "You did not provide an API key. Provide your API key in the Authorization header, using the Bearer auth scheme.",
                        None,
                        &request_id,
                        None,
                    ),
                    &request_id,
                ),
                (Some(_), false, _) => Answer::from_reply(
                    error_reply(
                        401,
                        "invalid_request_error",
                        None,
                        "Invalid API Key provided: the key is not one of this simulator's app keys.",
                        None,
                        &request_id,
                        None,
                    ),
                    &request_id,
                ),
                (Some(_), true, None) => Answer::from_reply(
                    error_reply(
                        401,
                        "invalid_request_error",
                        None,
                        format!(
                            "The app is not installed on the account named by Stripe-Context ({}).",
                            context.as_deref().unwrap_or("missing")
                        ),
                        None,
                        &request_id,
                        None,
                    ),
                    &request_id,
                ),
                (Some(_), true, Some(ai)) => {
                    entry.account = Some(st.accounts[ai].id.clone());
                    let mode = st.accounts[ai].mode;
                    if st.accounts[ai].bucket.try_acquire(Instant::now()).is_err() {
                        Answer::from_reply(
                            rate_limited(&request_id, Some(mode), Some(1)),
                            &request_id,
                        )
                    } else {
                        let idem_key = if m == "POST" { idem.clone() } else { None };
                        let fp = fingerprint(&m, &path, &query, &body);
                        let now = st.clock.now();
                        let saved = idem_key
                            .as_ref()
                            .and_then(|k| st.accounts[ai].idempotency.get(k))
                            .filter(|s| now - s.saved_at < crate::sim::state::IDEMPOTENCY_WINDOW)
                            .cloned();
                        match saved {
                            Some(saved) if saved.fingerprint == fp => Answer {
                                status: saved.status,
                                body: saved.body,
                                headers: Vec::new(),
                                request_id: saved.request_id,
                                replayed: true,
                            },
                            Some(_) => Answer::from_reply(
                                error_reply(
                                    400,
                                    "idempotency_error",
                                    None,
                                    format!(
                                        "Keys for idempotent requests can only be used with the same parameters they were first used with. Try using a key other than '{}' if you meant to execute a different request.",
                                        idem_key.as_deref().unwrap_or_default()
                                    ),
                                    None,
                                    &request_id,
                                    Some(mode),
                                ),
                                &request_id,
                            ),
                            None => {
                                let reply = match saved_500 {
                                    Some(should_retry) => {
                                        server_error(&request_id, Some(mode), should_retry)
                                    }
                                    None => handle_app_call(st, ai, &req, &ctx),
                                };
                                let answer = Answer::from_reply(reply, &request_id);
                                let executed =
                                    (200..300).contains(&answer.status) || answer.status >= 500;
                                if let (Some(k), true) = (idem_key, executed) {
                                    st.accounts[ai].idempotency.insert(
                                        k,
                                        SavedResponse {
                                            fingerprint: fp,
                                            status: answer.status,
                                            body: answer.body.clone(),
                                            request_id: request_id.clone(),
                                            saved_at: now,
                                        },
                                    );
                                }
                                answer
                            }
                        }
                    }
                }
            }
        } else {
            Answer::from_reply(unrecognized(&req, &request_id, None), &request_id)
        }
    };
    entry.replayed = answer.replayed;
    if drop_after_commit {
        finish(entry);
        return dropped();
    }
    entry.status = Some(answer.status);
    finish(entry);
    answer.into_response()
}

// ---------------------------------------------------------------------- control API

#[derive(Debug, Deserialize)]
struct AdvanceBody {
    #[serde(default)]
    seconds: u64,
    #[serde(default)]
    minutes: u64,
}

/// Body of `POST /_sim/webhook_endpoints/{id}/send`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SendEventRequest {
    /// Event type, e.g. `charge.succeeded`.
    #[serde(rename = "type")]
    pub event_type: String,
    /// `data.object` of the event (default: an empty object).
    #[serde(default)]
    pub data: Option<Value>,
    /// Signature timestamp (unix seconds); default: the real current time.
    #[serde(default)]
    pub timestamp: Option<i64>,
}

/// The result of delivering one event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryOutcome {
    /// The `evt_...` id.
    pub event_id: String,
    /// Whether the receiver answered (any status).
    pub delivered: bool,
    /// The receiver's HTTP status.
    pub status: Option<u16>,
    /// Why nothing was delivered, if so.
    pub error: Option<String>,
    /// Number of `v1` signatures in the header (one per valid secret).
    pub signatures: usize,
}

#[derive(Debug, Deserialize)]
struct RollBody {
    #[serde(default)]
    expire_current_in_hours: u32,
}

fn sim_error(e: SimError) -> Response {
    let status = match e {
        SimError::NotFound(_) => StatusCode::NOT_FOUND,
        _ => StatusCode::BAD_REQUEST,
    };
    (
        status,
        Json(json!({ "error": { "message": e.to_string() } })),
    )
        .into_response()
}

pub(crate) async fn deliver(
    shared: &Shared,
    endpoint_id: &str,
    req: SendEventRequest,
) -> Result<DeliveryOutcome, SimError> {
    let (account_index, url, secrets, livemode, api_version, enabled, disabled) = {
        let st = shared.lock();
        let now = st.clock.now();
        let (acct, ep, account_index) = st
            .accounts
            .iter()
            .enumerate()
            .find_map(|(i, a)| {
                a.endpoints
                    .iter()
                    .find(|e| e.id == endpoint_id)
                    .map(|e| (i, a, e))
            })
            .map(|(i, a, e)| (a, e, i))
            .ok_or_else(|| SimError::NotFound(format!("webhook endpoint {endpoint_id}")))?;
        (
            account_index,
            ep.url.clone(),
            ep.valid_secrets(now)
                .into_iter()
                .map(SecretString::new)
                .collect::<Vec<_>>(),
            acct.mode == Mode::Live,
            ep.api_version.clone(),
            ep.enabled_events.clone(),
            ep.disabled,
        )
    };
    if req.event_type.is_empty() {
        return Err(SimError::InvalidRequest("the event type is empty".into()));
    }
    let event_id = format!("evt_{}", random_alnum(24));
    let not_sent = |error: &str| DeliveryOutcome {
        event_id: event_id.clone(),
        delivered: false,
        status: None,
        error: Some(error.to_owned()),
        signatures: 0,
    };
    if disabled {
        return Ok(not_sent("the endpoint is disabled"));
    }
    if !enabled.iter().any(|e| e == "*" || *e == req.event_type) {
        return Ok(not_sent(
            "the endpoint does not subscribe to this event type",
        ));
    }
    let timestamp = req
        .timestamp
        .unwrap_or_else(|| chrono::Utc::now().timestamp());
    let event = json!({
        "id": event_id,
        "object": "event",
        "api_version": api_version,
        "created": timestamp,
        "type": req.event_type,
        "livemode": livemode,
        "pending_webhooks": 1,
        "request": { "id": null, "idempotency_key": null },
        "data": { "object": req.data.unwrap_or_else(|| json!({})) },
    });
    let payload = serde_json::to_vec(&event).unwrap_or_default();
    // Stripe creates the event first: it can be retrieved with `GET /v1/events/{id}`
    if let Some(acct) = shared.lock().accounts.get_mut(account_index) {
        acct.events.insert(event_id.clone(), event);
    }
    let signature = crate::webhook::signature::sign(&payload, &secrets, timestamp);
    let result = shared
        .http
        .post(&url)
        .header("content-type", "application/json; charset=utf-8")
        .header("stripe-signature", signature)
        .header(
            "user-agent",
            "Stripe/1.0 (+https://stripe.com/docs/webhooks)",
        )
        .body(payload)
        .send()
        .await;
    Ok(match result {
        Ok(resp) => DeliveryOutcome {
            event_id,
            delivered: true,
            status: Some(resp.status().as_u16()),
            error: None,
            signatures: secrets.len(),
        },
        Err(e) => DeliveryOutcome {
            signatures: secrets.len(),
            ..not_sent(&format!("delivery failed: {}", e.without_url()))
        },
    })
}

pub(crate) fn roll_secret(
    shared: &Shared,
    endpoint_id: &str,
    overlap: Duration,
) -> Result<SecretString, SimError> {
    let mut st = shared.lock();
    let now = st.clock.now();
    let ep = st
        .accounts
        .iter_mut()
        .find_map(|a| a.endpoints.iter_mut().find(|e| e.id == endpoint_id))
        .ok_or_else(|| SimError::NotFound(format!("webhook endpoint {endpoint_id}")))?;
    let expiry = now + chrono::Duration::from_std(overlap).unwrap_or(chrono::Duration::zero());
    for s in &mut ep.secrets {
        if s.expires_at.is_none_or(|e| e > expiry) {
            s.expires_at = Some(expiry);
        }
    }
    let secret = format!("whsec_{}", random_alnum(32));
    ep.secrets.push(super::state::EndpointSecret {
        secret: secret.clone(),
        expires_at: None,
    });
    Ok(SecretString::new(secret))
}

#[derive(Debug, Deserialize)]
struct DashboardBody {
    email: String,
    #[serde(flatten)]
    action: super::activity::DashboardAction,
}

fn control_router() -> Router<Arc<Shared>> {
    Router::new()
        .route(
            "/_sim/accounts/{account}/dashboard",
            post(|AxState(s): AxState<Arc<Shared>>, Path(account): Path<String>, Json(b): Json<DashboardBody>| async move {
                let mut st = s.lock();
                match super::activity::dashboard(&mut st, &s.app_id, &account, &b.email, b.action) {
                    Ok(id) => Json(json!({ "key_id": id })).into_response(),
                    Err(e) => sim_error(e),
                }
            }),
        )
        .route(
            "/_sim/accounts/{account}/activity_logs",
            get(|AxState(s): AxState<Arc<Shared>>, Path(account): Path<String>| async move {
                let st = s.lock();
                match st.account_index(&account) {
                    Some(ai) => Json(
                        st.accounts[ai]
                            .activity
                            .entries()
                            .map(super::activity::ActivityEntryState::from)
                            .collect::<Vec<_>>(),
                    )
                    .into_response(),
                    None => sim_error(SimError::NotFound(format!("account {account}"))),
                }
            }),
        )
        .route(
            "/_sim/state",
            get(|AxState(s): AxState<Arc<Shared>>| async move { Json::<SimState>(s.lock().snapshot()) }),
        )
        .route(
            "/_sim/requests",
            get(|AxState(s): AxState<Arc<Shared>>| async move { Json::<Vec<RequestLogEntry>>(s.lock().log.clone()) })
                .delete(|AxState(s): AxState<Arc<Shared>>| async move {
                    s.lock().log.clear();
                    StatusCode::NO_CONTENT
                }),
        )
        .route(
            "/_sim/clock",
            get(|AxState(s): AxState<Arc<Shared>>| async move { Json(json!({ "now": s.lock().clock.now() })) }),
        )
        .route(
            "/_sim/clock/advance",
            post(|AxState(s): AxState<Arc<Shared>>, Json(b): Json<AdvanceBody>| async move {
                let mut st = s.lock();
                st.clock.advance(Duration::from_secs(b.seconds.saturating_add(b.minutes.saturating_mul(60))));
                Json(json!({ "now": st.clock.now() }))
            }),
        )
        .route(
            "/_sim/last_used_lag",
            get(|AxState(s): AxState<Arc<Shared>>| async move {
                Json(json!({ "seconds": s.lock().last_used_lag.num_seconds() }))
            })
            .post(|AxState(s): AxState<Arc<Shared>>, Json(b): Json<AdvanceBody>| async move {
                let secs = b.seconds.saturating_add(b.minutes.saturating_mul(60));
                let mut st = s.lock();
                st.last_used_lag = chrono::Duration::seconds(secs.min(i64::MAX as u64) as i64);
                Json(json!({ "seconds": st.last_used_lag.num_seconds() }))
            }),
        )
        .route(
            "/_sim/faults",
            get(|AxState(s): AxState<Arc<Shared>>| async move { Json::<Vec<FaultRule>>(s.lock().faults.clone()) })
                .post(|AxState(s): AxState<Arc<Shared>>, Json(request): Json<FaultRequest>| async move {
                    let FaultRequest { spec, context } = request;
                    if spec.ratio.is_some_and(|r| !(0.0..=1.0).contains(&r)) {
                        return (StatusCode::BAD_REQUEST, Json(json!({ "error": { "message": "ratio must be between 0 and 1" } })));
                    }
                    let id = s.lock().add_fault(spec, context);
                    (StatusCode::OK, Json(json!({ "id": id })))
                })
                .delete(|AxState(s): AxState<Arc<Shared>>| async move {
                    s.lock().faults.clear();
                    StatusCode::NO_CONTENT
                }),
        )
        .route(
            "/_sim/webhook_endpoints/{id}/send",
            post(|AxState(s): AxState<Arc<Shared>>, Path(id): Path<String>, Json(req): Json<SendEventRequest>| async move {
                match deliver(&s, &id, req).await {
                    Ok(outcome) => Json(outcome).into_response(),
                    Err(e) => sim_error(e),
                }
            }),
        )
        .route(
            "/_sim/webhook_endpoints/{id}/roll_secret",
            post(|AxState(s): AxState<Arc<Shared>>, Path(id): Path<String>, Json(b): Json<RollBody>| async move {
                if b.expire_current_in_hours > 24 {
                    return sim_error(SimError::InvalidRequest("expire_current_in_hours must be at most 24".into()));
                }
                let overlap = Duration::from_secs(u64::from(b.expire_current_in_hours) * 3600);
                match roll_secret(&s, &id, overlap) {
                    // a simulated Dashboard roll shows the new secret once, like the Dashboard
                    Ok(secret) => Json(json!({ "secret": secret.expose() })).into_response(),
                    Err(e) => sim_error(e),
                }
            }),
        )
}

async fn add_request_id(mut resp: Response) -> Response {
    if !resp.headers().contains_key("request-id")
        && let Ok(v) = HeaderValue::from_str(&format!("req_{}", random_alnum(14)))
    {
        resp.headers_mut().insert("request-id", v);
    }
    resp
}

/// `POST /_sim/faults`: a [`FaultSpec`], optionally only for one account (`"context":
/// "acct_..."`, matched against the request's `Stripe-Context`).
#[derive(Debug, Clone, Deserialize)]
struct FaultRequest {
    #[serde(flatten)]
    spec: FaultSpec,
    #[serde(default)]
    context: Option<String>,
}

pub(crate) fn router(shared: Arc<Shared>) -> Router {
    control_router()
        .fallback(api)
        .layer(axum::middleware::map_response(add_request_id))
        .with_state(shared)
}

/// Accepts connections until `shutdown` flips; closes connections whose response carries
/// [`DropConnection`].
pub(crate) async fn serve(
    listener: TcpListener,
    router: Router,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            changed = shutdown.changed() => {
                if changed.is_err() || *shutdown.borrow() {
                    break;
                }
            }
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let router = router.clone();
                conns.spawn(async move {
                    let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let router = router.clone();
                        async move {
                            let resp = match router.oneshot(req.map(axum::body::Body::new)).await {
                                Ok(r) => r,
                                Err(e) => match e {},
                            };
                            if resp.extensions().get::<DropConnection>().is_some() {
                                Err(std::io::Error::other("connection dropped by an injected fault"))
                            } else {
                                Ok::<_, std::io::Error>(resp)
                            }
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    conns.shutdown().await;
}
