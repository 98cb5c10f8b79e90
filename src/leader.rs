//! Leader election on a `coordination.k8s.io/v1` Lease, so two replicas never both act.
//!
//! The algorithm is client-go's: a candidate takes the Lease when it is free or when its holder
//! has not renewed it for `lease_duration` *as observed locally* (the local monotonic clock
//! measures how long the record stayed unchanged, so clock skew between nodes does not matter).
//! Every write carries the `resourceVersion` it read, so two candidates can never both win.
//! The leader renews every `retry_period`. Leadership is lost as soon as the last successful
//! renewal is older than `renew_deadline` on the local monotonic clock, measured from the
//! *start* of that renewal attempt (the write may have landed at any moment of the attempt),
//! and even while a renewal hangs: a timer, not the attempt, decides. Each attempt is also cut
//! off after half the renew deadline, so one hung request cannot use up the deadline alone.
//! [`LeaderConfig::validate`] keeps the renew deadline well inside the lease duration, so the
//! leader has stopped before any other replica may take the lease.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ObjectMeta, PostParams};
use tokio_util::sync::CancellationToken;

/// Settings of the election.
#[derive(Clone, Debug)]
pub struct LeaderConfig {
    /// Namespace of the Lease (the operator's own).
    pub namespace: String,
    /// Name of the Lease.
    pub lease_name: String,
    /// This replica's identity (the pod name).
    pub identity: String,
    /// How long a lease is valid without renewal.
    pub lease_duration: Duration,
    /// How long the leader keeps trying to renew before it gives up leadership.
    pub renew_deadline: Duration,
    /// Pause between attempts.
    pub retry_period: Duration,
}

impl LeaderConfig {
    /// client-go's defaults: 15 s lease, 10 s renew deadline, 2 s retry period.
    pub fn new(
        namespace: impl Into<String>,
        lease_name: impl Into<String>,
        identity: impl Into<String>,
    ) -> Self {
        Self {
            namespace: namespace.into(),
            lease_name: lease_name.into(),
            identity: identity.into(),
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

impl LeaderConfig {
    /// Checks that the leader stops acting before another replica may take the lease.
    ///
    /// A candidate takes the lease once it has seen the same record for `lease_duration`
    /// (rounded down to whole seconds, as the Lease stores it). It saw the leader's last record
    /// no earlier than the start of the attempt that wrote it, which is where the leader's own
    /// `renew_deadline` starts: so the leader gives up at least `lease_duration -
    /// renew_deadline` before anyone can take over. That margin must absorb what cannot be
    /// recalled when leadership is lost (requests already on the wire, timer slack on both
    /// nodes), so it must be at least `retry_period` and at least a fifth of the lease duration
    /// (client-go's 15 s / 10 s defaults leave a third). The renew deadline must also allow two
    /// attempts (`renew_deadline >= 2 * retry_period`) so one failed request does not end
    /// leadership.
    pub fn validate(&self) -> Result<(), String> {
        let lease = Duration::from_secs(self.lease_duration.as_secs());
        if lease.is_zero() {
            return Err(format!(
                "--lease-duration must be at least 1s (got {:?})",
                self.lease_duration
            ));
        }
        if self.retry_period.is_zero() {
            return Err("--retry-period must be more than 0".into());
        }
        if self.renew_deadline < self.retry_period * 2 {
            return Err(format!(
                "--renew-deadline ({:?}) must be at least twice --retry-period ({:?}), so a failed renewal is retried before leadership is given up",
                self.renew_deadline, self.retry_period
            ));
        }
        let margin = self.retry_period.max(lease / 5);
        if self.renew_deadline + margin > lease {
            return Err(format!(
                "--renew-deadline ({:?}) must end at least {margin:?} before --lease-duration ({lease:?}, whole seconds): the leader must stop before another replica may take the lease",
                self.renew_deadline
            ));
        }
        Ok(())
    }

    /// How long one acquire-or-renew attempt may take.
    pub fn attempt_timeout(&self) -> Duration {
        (self.renew_deadline / 2).max(Duration::from_millis(1))
    }
}

/// Errors of the election.
#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error("leader election: Kubernetes API error on Lease {namespace}/{name}: {source}")]
    Kube {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("leader election stopped by shutdown before the lease was acquired")]
    Shutdown,
}

/// The outcome of one acquire-or-renew attempt.
enum Attempt {
    Held,
    NotHeld,
    Failed(String),
}

/// A candidate for leadership.
pub struct LeaderElector {
    api: Api<Lease>,
    config: LeaderConfig,
    observed: Option<(String, Instant)>,
}

/// Held leadership. `lost()` fires when the lease could not be renewed; `release()` hands the
/// lease over at shutdown so that another replica takes over at once.
pub struct Leadership {
    lost: CancellationToken,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Leadership {
    /// Fires when this replica is no longer the leader.
    pub fn lost(&self) -> CancellationToken {
        self.lost.clone()
    }

    /// Stops renewing and releases the lease.
    pub async fn release(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

impl LeaderElector {
    pub fn new(client: kube::Client, config: LeaderConfig) -> Self {
        let api = Api::namespaced(client, &config.namespace);
        Self {
            api,
            config,
            observed: None,
        }
    }

    fn err(&self, source: kube::Error) -> LeaderError {
        LeaderError::Kube {
            namespace: self.config.namespace.clone(),
            name: self.config.lease_name.clone(),
            source,
        }
    }

    /// One attempt to acquire or renew. `Ok(true)` when this replica holds the lease afterwards.
    pub async fn try_acquire_or_renew(&mut self) -> Result<bool, LeaderError> {
        let now = MicroTime(Timestamp::now());
        let duration_secs = i32::try_from(self.config.lease_duration.as_secs()).unwrap_or(15);
        let existing = match self.api.get_opt(&self.config.lease_name).await {
            Ok(lease) => lease,
            Err(e) => return Err(self.err(e)),
        };
        let Some(mut lease) = existing else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.config.lease_name.clone()),
                    namespace: Some(self.config.namespace.clone()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.config.identity.clone()),
                    lease_duration_seconds: Some(duration_secs),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(self.err(e)),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let record = format!(
            "{holder}|{:?}|{:?}",
            spec.renew_time.as_ref().map(|t| t.0),
            spec.lease_transitions
        );
        let observed_at = match &self.observed {
            Some((seen, at)) if *seen == record => *at,
            _ => {
                let at = Instant::now();
                self.observed = Some((record, at));
                at
            }
        };
        let held_by_me = holder == self.config.identity;
        let lease_secs = spec
            .lease_duration_seconds
            .map(|s| Duration::from_secs(s.max(0) as u64))
            .unwrap_or(self.config.lease_duration);
        let expired = holder.is_empty() || observed_at.elapsed() > lease_secs;
        if !held_by_me && !expired {
            return Ok(false);
        }
        let mut new_spec = spec.clone();
        new_spec.holder_identity = Some(self.config.identity.clone());
        new_spec.lease_duration_seconds = Some(duration_secs);
        new_spec.renew_time = Some(now.clone());
        if !held_by_me {
            new_spec.acquire_time = Some(now);
            new_spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        lease.spec = Some(new_spec);
        // `lease.metadata.resourceVersion` is the one read: a concurrent writer makes this a 409.
        match self
            .api
            .replace(&self.config.lease_name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(self.err(e)),
        }
    }

    /// One attempt, cut off after [`LeaderConfig::attempt_timeout`]; returns its outcome and
    /// the instant it started.
    async fn timed_attempt(&mut self) -> (tokio::time::Instant, Attempt) {
        let started = tokio::time::Instant::now();
        let timeout = self.config.attempt_timeout();
        let outcome = match tokio::time::timeout(timeout, self.try_acquire_or_renew()).await {
            Ok(Ok(true)) => Attempt::Held,
            Ok(Ok(false)) => Attempt::NotHeld,
            Ok(Err(e)) => Attempt::Failed(e.to_string()),
            Err(_) => Attempt::Failed(format!("no answer within {timeout:?}")),
        };
        (started, outcome)
    }

    /// Waits until this replica leads (or `shutdown` fires), then renews in the background.
    pub async fn acquire(mut self, shutdown: CancellationToken) -> Result<Leadership, LeaderError> {
        let since = loop {
            let attempt = tokio::select! {
                _ = shutdown.cancelled() => return Err(LeaderError::Shutdown),
                a = self.timed_attempt() => a,
            };
            match attempt {
                (started, Attempt::Held) => break started,
                (_, Attempt::NotHeld) => {}
                (_, Attempt::Failed(e)) => {
                    tracing::warn!(error = %e, "leader election attempt failed")
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Err(LeaderError::Shutdown),
                _ = tokio::time::sleep(self.config.retry_period) => {}
            }
        };
        tracing::info!(identity = %self.config.identity, lease = %self.config.lease_name, "became leader");
        let lost = CancellationToken::new();
        let stop = CancellationToken::new();
        let task = tokio::spawn(self.renew_loop(since, lost.clone(), stop.clone()));
        Ok(Leadership { lost, stop, task })
    }

    /// Renews every `retry_period`. `renewed` is when the last successful attempt started:
    /// leadership ends at `renewed + renew_deadline` whatever the attempt in flight is doing.
    async fn renew_loop(
        mut self,
        mut renewed: tokio::time::Instant,
        lost: CancellationToken,
        stop: CancellationToken,
    ) {
        loop {
            let deadline = renewed + self.config.renew_deadline;
            tokio::select! {
                _ = stop.cancelled() => {
                    self.release().await;
                    return;
                }
                _ = tokio::time::sleep_until(deadline) => {
                    tracing::error!("leader lease not renewed within the renew deadline");
                    lost.cancel();
                    return;
                }
                _ = tokio::time::sleep(self.config.retry_period) => {}
            }
            let attempt = tokio::select! {
                _ = stop.cancelled() => None,
                _ = tokio::time::sleep_until(deadline) => Some(None),
                a = self.timed_attempt() => Some(Some(a)),
            };
            match attempt {
                None => {
                    self.release().await;
                    return;
                }
                Some(None) => {
                    tracing::error!(
                        "leader lease not renewed within the renew deadline (the renewal hangs)"
                    );
                    lost.cancel();
                    return;
                }
                Some(Some((started, Attempt::Held))) => renewed = started,
                Some(Some((_, Attempt::NotHeld))) => {
                    tracing::error!("leader lease taken by another replica");
                    lost.cancel();
                    return;
                }
                Some(Some((_, Attempt::Failed(e)))) => {
                    tracing::warn!(error = %e, "could not renew the leader lease");
                }
            }
        }
    }

    /// Hands the lease over: empty holder and a 1 s duration, as client-go does on release.
    async fn release(&self) {
        let timeout = self.config.attempt_timeout();
        let Ok(Ok(Some(mut lease))) =
            tokio::time::timeout(timeout, self.api.get_opt(&self.config.lease_name)).await
        else {
            return;
        };
        let Some(spec) = lease.spec.as_mut() else {
            return;
        };
        if spec.holder_identity.as_deref() != Some(self.config.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        let pp = PostParams::default();
        let put = self.api.replace(&self.config.lease_name, &pp, &lease);
        match tokio::time::timeout(timeout, put).await {
            Ok(Ok(_)) => tracing::info!("released the leader lease"),
            Ok(Err(e)) => tracing::warn!(error = %e, "could not release the leader lease"),
            Err(_) => tracing::warn!("could not release the leader lease: no answer in time"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(lease: u64, renew_ms: u64, retry_ms: u64) -> LeaderConfig {
        LeaderConfig {
            lease_duration: Duration::from_secs(lease),
            renew_deadline: Duration::from_millis(renew_ms),
            retry_period: Duration::from_millis(retry_ms),
            ..LeaderConfig::new("ns", "lease", "me")
        }
    }

    #[test]
    fn the_defaults_and_client_go_like_settings_are_accepted() {
        LeaderConfig::new("ns", "lease", "me").validate().unwrap();
        config(60, 40_000, 5_000).validate().unwrap();
        config(2, 1_000, 200).validate().unwrap();
    }

    #[test]
    fn a_renew_deadline_at_or_near_the_lease_duration_is_refused() {
        let equal = config(15, 15_000, 2_000).validate().unwrap_err();
        assert!(equal.contains("--renew-deadline"), "{equal}");
        // 14 s of 15: a 1 s margin is less than the retry period and a fifth of the lease.
        assert!(config(15, 14_000, 2_000).validate().is_err());
        // Longer than the lease: never.
        assert!(config(15, 20_000, 2_000).validate().is_err());
        // The margin counts whole seconds: a 2.9 s lease is a 2 s lease in the Lease object.
        let c = LeaderConfig {
            lease_duration: Duration::from_millis(2_900),
            ..config(2, 2_000, 200)
        };
        assert!(c.validate().is_err());
    }

    #[test]
    fn a_renew_deadline_that_allows_a_single_attempt_is_refused() {
        assert!(config(15, 3_000, 2_000).validate().is_err());
        assert!(config(15, 4_000, 2_000).validate().is_ok());
        assert!(config(15, 10_000, 0).validate().is_err());
        assert!(config(0, 0, 0).validate().is_err());
    }

    #[test]
    fn an_attempt_fits_twice_in_the_renew_deadline() {
        let c = LeaderConfig::new("ns", "lease", "me");
        assert_eq!(c.attempt_timeout() * 2, c.renew_deadline);
    }
}
