//! The operator's HTTP endpoints: `/metrics`, `/healthz`, `/readyz`.
//!
//! `/readyz` means "started and able to serve" (a standby replica is ready too). `/healthz`
//! means "making progress", so that the kubelet restarts a pod that stopped working:
//!
//! - the **runtime watchdog** (a task that ticks every few seconds) has ticked recently: a wedged
//!   runtime, whose workers are blocked, stops the tick;
//! - no controller's **watches** have been failing without a pause for longer than a threshold
//!   (a watch that errors keeps retrying with a backoff capped at 30 s, so a dead one reports an
//!   error at least every [`HealthThresholds::watch_error_gap`]; one that recovered goes quiet);
//! - no controller has had **reconciles running** while none finished for longer than a
//!   threshold (due reconciles wait for a free worker, so a queue that does not move shows here).
//!
//! A quiet operator is healthy: nothing is due, no watch fails. A replica that is not the leader
//! runs no controller and is healthy too (waiting for the lease is its work).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// When `/healthz` declares the operator stuck.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthThresholds {
    /// The runtime watchdog has not ticked for this long.
    pub runtime_stall: Duration,
    /// A controller's watches have been failing, with no pause longer than
    /// [`HealthThresholds::watch_error_gap`], for this long.
    pub watch_failure: Duration,
    /// A pause between watch errors longer than this ends a failure streak (the watch recovered).
    pub watch_error_gap: Duration,
    /// A controller had reconciles running and none finished for this long.
    pub reconcile_stall: Duration,
}

impl Default for HealthThresholds {
    fn default() -> Self {
        Self {
            runtime_stall: Duration::from_secs(60),
            watch_failure: Duration::from_secs(300),
            watch_error_gap: Duration::from_secs(90),
            reconcile_stall: Duration::from_secs(600),
        }
    }
}

/// How often the runtime watchdog ticks.
pub const WATCHDOG_TICK: Duration = Duration::from_secs(5);

/// Readiness and liveness as the probes see them.
#[derive(Clone, Default)]
pub struct Health {
    ready: Arc<AtomicBool>,
    liveness: Arc<Liveness>,
}

#[derive(Default)]
struct Liveness {
    thresholds: Mutex<HealthThresholds>,
    /// The watchdog's last tick (`None`: no watchdog runs).
    watchdog: Mutex<Option<Instant>>,
    controllers: Mutex<BTreeMap<String, ControllerProgress>>,
}

/// What one controller reports about its progress (cheap to clone, shared).
#[derive(Clone, Default)]
pub struct ControllerProgress {
    state: Arc<Mutex<ProgressState>>,
}

#[derive(Default)]
struct ProgressState {
    running: u32,
    /// Since when reconciles have been running with none finishing.
    busy_since: Option<Instant>,
    /// The first error of the current watch failure streak, and the latest.
    errors: Option<(Instant, Instant)>,
}

/// Held while a reconcile runs; dropping it (finished or aborted) records the end.
pub struct ReconcileGuard {
    state: Arc<Mutex<ProgressState>>,
}

impl Drop for ReconcileGuard {
    fn drop(&mut self) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.running = st.running.saturating_sub(1);
        st.busy_since = (st.running > 0).then(Instant::now);
    }
}

impl ControllerProgress {
    /// Records that a reconcile starts; the guard records its end.
    pub fn reconcile_started(&self) -> ReconcileGuard {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.running += 1;
        if st.busy_since.is_none() {
            st.busy_since = Some(Instant::now());
        }
        ReconcileGuard {
            state: self.state.clone(),
        }
    }

    /// Records that a watch of this controller failed (it retries with a backoff).
    pub fn watch_error(&self, thresholds: &HealthThresholds) {
        let now = Instant::now();
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.errors = match st.errors {
            Some((first, last)) if now.duration_since(last) <= thresholds.watch_error_gap => {
                Some((first, now))
            }
            _ => Some((now, now)),
        };
    }

    /// Why this controller is stuck, if it is.
    fn stuck(&self, now: Instant, t: &HealthThresholds) -> Option<String> {
        let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((first, last)) = st.errors
            && now.duration_since(last) <= t.watch_error_gap
            && now.duration_since(first) >= t.watch_failure
        {
            return Some(format!(
                "its watches have been failing for {}s",
                now.duration_since(first).as_secs()
            ));
        }
        if let Some(since) = st.busy_since
            && now.duration_since(since) >= t.reconcile_stall
        {
            return Some(format!(
                "{} reconciles running and none finished for {}s",
                st.running,
                now.duration_since(since).as_secs()
            ));
        }
        None
    }
}

impl Health {
    /// Health with these liveness thresholds.
    pub fn with_thresholds(thresholds: HealthThresholds) -> Self {
        let health = Self::default();
        *health
            .liveness
            .thresholds
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = thresholds;
        health
    }

    /// The liveness thresholds.
    pub fn thresholds(&self) -> HealthThresholds {
        self.liveness
            .thresholds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The progress record of controller `name` (registered on first use).
    pub fn controller(&self, name: &str) -> ControllerProgress {
        self.liveness
            .controllers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(name.to_string())
            .or_default()
            .clone()
    }

    /// Records a watchdog tick.
    pub fn watchdog_tick(&self) {
        *self
            .liveness
            .watchdog
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
    }

    /// The runtime watchdog: ticks every `period` for as long as the runtime that polls it runs
    /// tasks. Spawn it on the runtime it watches.
    pub async fn run_watchdog(self, period: Duration) {
        loop {
            self.watchdog_tick();
            tokio::time::sleep(period).await;
        }
    }

    /// `Err(reason)` when the operator stopped making progress. The reason names the part that is
    /// stuck and how long, nothing else.
    pub fn check_liveness(&self) -> Result<(), String> {
        let now = Instant::now();
        let t = self.thresholds();
        let tick = *self
            .liveness
            .watchdog
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(tick) = tick
            && now.duration_since(tick) >= t.runtime_stall
        {
            return Err(format!(
                "runtime watchdog has not ticked for {}s",
                now.duration_since(tick).as_secs()
            ));
        }
        let controllers = self
            .liveness
            .controllers
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        for (name, progress) in controllers.iter() {
            if let Some(why) = progress.stuck(now, &t) {
                return Err(format!("controller {name}: {why}"));
            }
        }
        Ok(())
    }

    /// Marks the process ready (caches synced, store reachable) or not.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    /// Whether `/readyz` answers 200.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }
}

#[derive(Clone)]
struct AppState {
    metrics: Metrics,
    health: Health,
}

/// The router of the endpoints.
pub fn router(metrics: Metrics, health: Health) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(AppState { metrics, health })
}

/// OpenMetrics when the scraper asks for it (Prometheus does), the 0.0.4 text format otherwise.
async fn metrics_handler(
    State(state): State<AppState>,
    headers: axum::http::HeaderMap,
) -> impl IntoResponse {
    let wants_openmetrics = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/openmetrics-text"));
    if wants_openmetrics {
        (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            state.metrics.encode(),
        )
    } else {
        (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            state.metrics.encode_prometheus_text(),
        )
    }
}

async fn healthz(State(state): State<AppState>) -> impl IntoResponse {
    match state.health.check_liveness() {
        Ok(()) => (StatusCode::OK, "ok".to_string()),
        Err(reason) => (StatusCode::INTERNAL_SERVER_ERROR, reason),
    }
}

async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    if state.health.is_ready() {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
    }
}

/// Serves the endpoints on `addr` until `shutdown` is cancelled. Returns the bound address.
pub async fn serve(
    addr: SocketAddr,
    metrics: Metrics,
    health: Health,
    shutdown: CancellationToken,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = router(metrics, health);
    let handle = tokio::spawn(async move {
        let result = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(e) = result {
            tracing::error!(error = %e, "HTTP endpoint server failed");
        }
    });
    Ok((bound, handle))
}
