//! A seeded failure simulation of the rotation engine (FoundationDB / VOPR style).
//!
//! One seed drives the real engine — the reconcile entry points, called step by step, so the
//! interleaving is the seed's and nothing else's — against the Kubernetes API for tests, the
//! Stripe simulator and the store, with a manual clock. Each step is a random action (rotation
//! request, incident, permission or Connect-permission change, guardrail tightening, namespace
//! relabel, a crash at any crash point, Stripe faults: 429, 5xx, drop after commit; a store
//! outage; a restart with cold caches; clock jumps past the overlap, the rollout ceiling and the
//! idempotency window; a stuck rollout; a lease lost while a reconcile is in flight, whose stale
//! replica finishes after the new leader acted; for keys, a client outside the rollout targets
//! using the published previous key, which usage-aware expiry may hold), then a random number
//! of reconciles. After every
//! reconcile and at quiescence the invariants are checked:
//!
//! - (a) an incident leaves no credential handed out before it active, once it is handled;
//! - (b) at quiescence the active credentials at Stripe are exactly the Secret's current one
//!   (plus the previous one during an overlap), and the store holds what the Secret holds;
//! - (c) a rotation leaves at most one credential at Stripe that status does not know, and
//!   none at quiescence;
//! - (d) a routine rotation never retires the old credential before the targets rolled, unless
//!   the rollout ceiling passed;
//! - (e) no secret material in status or Events;
//! - a replica that lost its lease never rolls back the status its successor wrote.
//!
//! A failing run prints its seed; `SIM_SEED=<n>` replays it. CI runs `SIM_SEEDS` seeds (default
//! below); `SIM_SEEDS=10000` runs ten thousand.

#[path = "common/operator.rs"]
mod operator;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use operator::{ACCOUNT, NS, deployment, fingerprint, secret_value};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use stripe_key_operator::api::{StripeKeyPolicy, StripeWebhookEndpoint};
use stripe_key_operator::controller::Context;
use stripe_key_operator::sandbox::env::{EnvOptions, LocalEnv};
use stripe_key_operator::sim::{FaultKind, FaultSpec};
use stripe_key_operator::vault::{SecretStore, StorePath, StorePrefix};

/// Seeds CI runs for each kind (two hundred in all; about four minutes on two cores).
const CI_SEEDS: u64 = 100;
/// Steps per seed.
const STEPS: usize = 30;
const OVERLAP: Duration = Duration::from_secs(3600);
const CEILING: Duration = Duration::from_secs(600);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Key,
    Webhook,
}

impl Kind {
    fn store_kind(self) -> &'static str {
        match self {
            Kind::Key => "stripekeypolicy",
            Kind::Webhook => "stripewebhookendpoint",
        }
    }
}

/// What the seed has changed in the world, so that quiescence can put it back.
#[derive(Default, Debug)]
struct World {
    wide_scopes: bool,
    connect: bool,
    guardrail: bool,
    relabelled: bool,
    stuck: bool,
    store_down: bool,
    requests: u32,
    /// Incident value → credential ids handed out when it was declared.
    incidents: Vec<(String, BTreeSet<String>)>,
    /// The rollout ceiling was jumped past since the last rotation began.
    ceiling_passed: bool,
    /// The old key is held by usage-aware expiry.
    held: bool,
}

/// Usage holds seen across the seeds of key policies (reported, so that a change that makes
/// them unreachable shows). Webhook endpoints have no usage signal.
static KEY_HOLDS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

struct Sim {
    env: LocalEnv,
    ctx: Arc<Context>,
    kind: Kind,
    name: String,
    rng: StdRng,
    world: World,
    log: Vec<String>,
}

fn manifest(kind: Kind, name: &str, w: &World) -> Value {
    match kind {
        Kind::Key => {
            let mut perms = vec!["charge_read"];
            if w.wide_scopes {
                perms.push("customer_read");
            }
            let mut m = json!({
                "apiVersion": "stripekeys.io/v1alpha1", "kind": "StripeKeyPolicy",
                "metadata": {"name": name, "namespace": NS},
                "spec": {
                    "accountRef": {"name": ACCOUNT},
                    "permissions": perms,
                    "delivery": {"secret": {"name": format!("{name}-secret")},
                                 "rolloutTargets": [{"kind": "Deployment", "name": "checkout"}]},
                    // A quiet period longer than the overlap jump: a use of the old key after
                    // the rollout holds it across jumps.
                    "rotation": {"every": "720h", "overlap": "1h",
                                 "usageAwareExpiry": {"quietPeriod": "2h"}}
                }
            });
            if w.connect {
                m["spec"]["connectPermissions"] = json!(["charge_read"]);
            }
            m
        }
        Kind::Webhook => {
            let mut m = json!({
                "apiVersion": "stripekeys.io/v1alpha1", "kind": "StripeWebhookEndpoint",
                "metadata": {"name": name, "namespace": NS},
                "spec": {
                    "accountRef": {"name": ACCOUNT},
                    "url": "https://hooks.example.com/stripe",
                    "enabledEvents": ["charge.succeeded"],
                    "delivery": {"secret": {"name": format!("{name}-secret")},
                                 "rolloutTargets": [{"kind": "Deployment", "name": "checkout"}]},
                    "rotation": {"every": "720h", "overlap": "1h"}
                }
            });
            if w.wide_scopes {
                // A setting Stripe cannot update: a new endpoint.
                m["spec"]["apiVersion"] = json!("2024-06-20");
            }
            if w.connect {
                m["spec"]["connect"] = json!(true);
            }
            m
        }
    }
}

impl Sim {
    async fn start(kind: Kind, seed: u64) -> Sim {
        let env = operator::env_without_operator(EnvOptions {
            rollout_delay: Duration::ZERO,
            sim_rate_limit_test: 100_000,
            rollout_ceiling: CEILING,
            rollout_poll: Duration::from_millis(1),
            error_backoff: Duration::from_millis(1),
            stripe_timeout: Duration::from_millis(500),
            // Real backoffs would only make the run slow: the interleavings are the point.
            stripe_retry: Some(stripe_key_operator::stripe::RetryPolicy {
                max_retries: 2,
                initial_backoff: Duration::from_millis(1),
                max_backoff: Duration::from_millis(4),
                max_retry_after: Duration::from_millis(4),
            }),
            // The simulator shows uses at once: any use of the old key after the rollout counts
            // (a 10m lag would hide the uses the seeds make right after a rollout).
            last_used_lag: Duration::ZERO,
            ..EnvOptions::default()
        })
        .await;
        Api::<stripe_key_operator::api::StripeAccount>::all(env.client.clone())
            .patch(
                ACCOUNT,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"requestsPerSecond": 100}})),
            )
            .await
            .unwrap();
        let ctx = env.new_context();
        Sim {
            env,
            ctx,
            kind,
            name: format!("sim-{seed}"),
            rng: StdRng::seed_from_u64(seed),
            world: World::default(),
            log: Vec::new(),
        }
    }

    fn say(&mut self, s: String) {
        self.log.push(s);
    }

    async fn status(&self) -> Option<Value> {
        Some(self.object().await?["status"].clone())
    }

    /// The resource as the API server has it now.
    async fn object(&self) -> Option<Value> {
        match self.kind {
            Kind::Key => Api::<StripeKeyPolicy>::namespaced(self.env.client.clone(), NS)
                .get_opt(&self.name)
                .await
                .unwrap()
                .map(|o| serde_json::to_value(o).unwrap()),
            Kind::Webhook => Api::<StripeWebhookEndpoint>::namespaced(self.env.client.clone(), NS)
                .get_opt(&self.name)
                .await
                .unwrap()
                .map(|o| serde_json::to_value(o).unwrap()),
        }
    }

    /// One reconcile, as the controller would run it. Errors (crashes, faults) are expected.
    async fn reconcile(&mut self) {
        if let Some(obj) = self.object().await {
            let ctx = self.ctx.clone();
            self.reconcile_as(obj, ctx).await;
        }
    }

    /// One reconcile of `obj` (as its replica read it) by the replica `ctx`.
    async fn reconcile_as(&mut self, obj: Value, ctx: Arc<Context>) {
        // Boxed: a reconcile future is large, and the test thread's stack is not.
        let result = match self.kind {
            Kind::Key => Box::pin(stripe_key_operator::controller::keypolicy::reconcile(
                Arc::new(serde_json::from_value(obj).unwrap()),
                ctx,
            ))
            .await
            .map(|_| ()),
            Kind::Webhook => Box::pin(stripe_key_operator::controller::webhook::reconcile(
                Arc::new(serde_json::from_value(obj).unwrap()),
                ctx,
            ))
            .await
            .map(|_| ()),
        };
        if let Err(e) = result {
            self.log.push(format!("  reconcile: {}", e.reason()));
        }
    }

    /// Credential ids the resource owns at Stripe that are active now.
    fn active(&self) -> BTreeSet<String> {
        let state = self.env.sim.state();
        let acct = state.account(&self.env.account_id).unwrap();
        match self.kind {
            Kind::Key => acct
                .api_keys
                .iter()
                .filter(|k| {
                    k.status == "active"
                        && k.name.as_deref()
                            == Some(&format!("stripe-key-operator/{NS}/{}", self.name))
                })
                .map(|k| k.id.clone())
                .collect(),
            Kind::Webhook => acct
                .webhook_endpoints
                .iter()
                .filter(|e| {
                    e.metadata.get("stripekeys_name").map(String::as_str)
                        == Some(self.name.as_str())
                })
                .map(|e| e.id.clone())
                .collect(),
        }
    }

    /// Stripe ids by the fingerprint of their secret (every credential this resource ever had).
    fn ids_by_fingerprint(&self) -> BTreeMap<String, String> {
        let state = self.env.sim.state();
        let acct = state.account(&self.env.account_id).unwrap();
        match self.kind {
            Kind::Key => acct
                .api_keys
                .iter()
                .map(|k| (k.token_fingerprint.clone(), k.id.clone()))
                .collect(),
            Kind::Webhook => acct
                .webhook_endpoints
                .iter()
                .flat_map(|e| {
                    e.valid_secret_fingerprints
                        .iter()
                        .map(|f| (f.clone(), e.id.clone()))
                })
                .collect(),
        }
    }

    /// Fingerprints of the secrets the Secret publishes: (current, others).
    async fn published(&self) -> Option<(String, BTreeSet<String>)> {
        let s: Option<Secret> = Api::<Secret>::namespaced(self.env.client.clone(), NS)
            .get_opt(&format!("{}-secret", self.name))
            .await
            .unwrap();
        let s = s?;
        match self.kind {
            Kind::Key => {
                let cur = fingerprint(&secret_value(&s, "STRIPE_API_KEY")?);
                let prev = secret_value(&s, "STRIPE_API_KEY_PREVIOUS")
                    .map(|p| fingerprint(&p))
                    .into_iter()
                    .collect();
                Some((cur, prev))
            }
            Kind::Webhook => {
                let cur = fingerprint(&secret_value(&s, "STRIPE_WEBHOOK_SECRET")?);
                let all = secret_value(&s, "STRIPE_WEBHOOK_SECRETS")
                    .unwrap_or_default()
                    .split(',')
                    .filter(|x| !x.is_empty())
                    .map(fingerprint)
                    .filter(|f| *f != cur)
                    .collect();
                Some((cur, all))
            }
        }
    }

    /// Every credential id handed out now: status, store and Secret.
    async fn handed_out(&self) -> BTreeSet<String> {
        let mut ids = BTreeSet::new();
        if let Some(st) = self.status().await {
            for k in [
                &st["currentKey"],
                &st["previousKey"],
                &st["rotation"]["newKey"],
            ] {
                if let Some(id) = k["id"].as_str() {
                    ids.insert(id.to_string());
                }
            }
        }
        let by_fp = self.ids_by_fingerprint();
        if let Some((cur, others)) = self.published().await {
            for f in std::iter::once(cur).chain(others) {
                if let Some(id) = by_fp.get(&f) {
                    ids.insert(id.clone());
                }
            }
        }
        let path = StorePath::credential(
            &StorePrefix::new("stripe-key-operator").unwrap(),
            NS,
            self.kind.store_kind(),
            &self.name,
        )
        .unwrap();
        self.env.store.set_unreachable(false);
        if let Ok(Some(b)) = self.env.store.read_bundle(&path).await {
            ids.insert(b.value.current.key_id.clone());
            if let Some(p) = &b.value.previous {
                ids.insert(p.key_id.clone());
            }
        }
        self.env.store.set_unreachable(self.world.store_down);
        ids
    }

    /// Whether the latest incident was seen by the operator (a person does not overwrite an
    /// incident annotation before the operator took it up).
    async fn incident_seen(&self) -> bool {
        let Some((value, _)) = self.world.incidents.last() else {
            return true;
        };
        let st = self.status().await.unwrap_or(Value::Null);
        st["rotation"]["request"].as_str() == Some(value.as_str())
            || st["lastHandledRotateRequest"].as_str() == Some(value.as_str())
    }

    async fn act(&mut self) -> Result<(), String> {
        let mut roll: u32 = self.rng.random_range(0..100);
        if roll < 18 && !self.incident_seen().await {
            roll = 99;
        }
        match roll {
            0..=9 => {
                self.world.requests += 1;
                let v = format!("r{}", self.world.requests);
                self.say(format!("annotate rotate={v}"));
                self.annotate(
                    json!({"stripekeys.io/rotate": v, "stripekeys.io/rotate-reason": null}),
                )
                .await;
            }
            10..=17 => {
                self.world.requests += 1;
                let v = format!("incident-{}", self.world.requests);
                let doomed = self.handed_out().await;
                self.say(format!("incident {v}: handed out {doomed:?}"));
                self.world.incidents.push((v.clone(), doomed));
                self.annotate(
                    json!({"stripekeys.io/rotate": v, "stripekeys.io/rotate-reason": "incident"}),
                )
                .await;
            }
            18..=23 => {
                self.world.wide_scopes = !self.world.wide_scopes;
                self.say(format!(
                    "scopes/settings change (wide={})",
                    self.world.wide_scopes
                ));
                self.apply_spec().await;
            }
            24..=27 => {
                self.world.connect = !self.world.connect;
                self.say(format!("connect change ({})", self.world.connect));
                self.apply_spec().await;
            }
            28..=32 => {
                self.world.guardrail = !self.world.guardrail;
                self.say(format!("guardrail tightened={}", self.world.guardrail));
                self.set_guardrail().await;
            }
            33..=37 => {
                self.world.relabelled = !self.world.relabelled;
                self.say(format!("namespace relabelled={}", self.world.relabelled));
                self.set_namespace_label().await;
            }
            38..=47 => {
                let point = ["minted", "stored", "synced", "rolled", "expired"]
                    [self.rng.random_range(0..5)];
                self.say(format!("crash armed at {point}"));
                self.env.crash.arm(point);
            }
            48..=55 => {
                let fault = match self.rng.random_range(0..3) {
                    0 => FaultKind::RateLimited {
                        retry_after_secs: None,
                    },
                    1 => FaultKind::ServerError {
                        saved: self.rng.random_bool(0.5),
                        should_retry: Some(false),
                    },
                    _ => FaultKind::DropAfterCommit,
                };
                self.say(format!("stripe fault {fault:?}"));
                self.env.sim.inject_fault(FaultSpec {
                    fault,
                    count: Some(self.rng.random_range(1..3)),
                    ratio: None,
                    method: Some("POST".into()),
                    path_prefix: None,
                });
            }
            56..=60 => {
                self.world.store_down = !self.world.store_down;
                self.say(format!("store down={}", self.world.store_down));
                self.env.store.set_unreachable(self.world.store_down);
            }
            61..=64 => {
                self.say("restart (cold caches)".into());
                self.ctx = self.env.new_context();
            }
            65..=72 => {
                let (what, d) = match self.rng.random_range(0..3) {
                    0 => ("overlap", OVERLAP + Duration::from_secs(60)),
                    1 => ("rollout ceiling", CEILING + Duration::from_secs(10)),
                    _ => ("idempotency window", Duration::from_secs(25 * 3600)),
                };
                self.say(format!("clock jump past the {what}"));
                self.jump(d);
            }
            73..=79 => {
                self.world.stuck = !self.world.stuck;
                self.say(format!("rollout stuck={}", self.world.stuck));
                self.env
                    .api
                    .set_workload_stuck(NS, "checkout", self.world.stuck);
            }
            80..=89 if self.kind == Kind::Key => {
                // A client outside the rollout targets uses the published previous key (if
                // any): usage-aware expiry may hold it past the overlap.
                let used = self.use_previous_key().await;
                self.say(format!("an outside client uses the previous key: {used}"));
            }
            _ => {}
        }
        Ok(())
    }

    /// Lease loss: replica A read the resource and lost its lease while its reconcile was in
    /// flight; replica B (cold caches) takes over and reconciles a few times; then A's reconcile, still
    /// working from its stale read, runs to its end. A's status writes must be fenced (the
    /// resourceVersion precondition): it never rolls back what B wrote. Whatever A sent to
    /// Stripe before it was fenced is checked by the invariants like everything else.
    async fn lose_lease(&mut self) -> Result<(), String> {
        let Some(stale) = self.object().await else {
            return Ok(());
        };
        self.say("lease lost: replica B takes over; A finishes from its stale read".into());
        let a = std::mem::replace(&mut self.ctx, self.env.new_context());
        for _ in 0..self.rng.random_range(1..=3) {
            self.reconcile().await;
            self.check_always().await?;
        }
        let Some(after_b) = self.object().await else {
            return Ok(());
        };
        self.reconcile_as(stale.clone(), a).await;
        self.check_always().await?;
        let Some(after_a) = self.object().await else {
            return Ok(());
        };
        // A write by A that the precondition let through was made on a read at least as fresh
        // as B's write, so it can only move the status forward: never an earlier rotation,
        // an earlier phase of the same rotation, or an earlier handled request.
        let (b, a) = (&after_b["status"], &after_a["status"]);
        let number = |s: &Value| s["rotationNumber"].as_u64().unwrap_or(0);
        let request = |s: &Value| {
            s["lastHandledRotateRequest"]
                .as_str()
                .map(|r| r.trim_start_matches("incident-").trim_start_matches('r'))
                .and_then(|r| r.parse::<u32>().ok())
                .unwrap_or(0)
        };
        let phase = |s: &Value| {
            const ORDER: [&str; 6] = [
                "Minting",
                "Storing",
                "Syncing",
                "RollingOut",
                "Overlapping",
                "Expiring",
            ];
            s["rotation"]["phase"]
                .as_str()
                .and_then(|p| ORDER.iter().position(|o| *o == p))
        };
        self.say(format!(
            "  stale replica: rv {} -> B {} -> A {}; B at {}/{:?}, A at {}/{:?}",
            stale["metadata"]["resourceVersion"],
            after_b["metadata"]["resourceVersion"],
            after_a["metadata"]["resourceVersion"],
            number(b),
            phase(b),
            number(a),
            phase(a)
        ));
        let same_rotation = number(a) == number(b)
            && a["rotation"]["number"] == b["rotation"]["number"]
            && !b["rotation"].is_null();
        if std::env::var("SIM_TRACE").is_ok() {
            eprintln!("{}", self.log.last().unwrap());
        }
        if number(a) < number(b)
            || request(a) < request(b)
            || (same_rotation && phase(a) < phase(b))
        {
            return Err(format!(
                "the stale replica rolled the status back: {b} -> {a}"
            ));
        }
        Ok(())
    }

    /// Calls Stripe with the previous key the Secret publishes; returns what happened.
    async fn use_previous_key(&self) -> String {
        let Ok(Some(secret)) = self.env.secret(NS, &format!("{}-secret", self.name)).await else {
            return "no Secret".into();
        };
        let Some(token) = secret_value(&secret, "STRIPE_API_KEY_PREVIOUS") else {
            return "none published".into();
        };
        // Two seconds later: `last_used` has whole seconds, so a use in the rollout's own second
        // would read as before it.
        let d = Duration::from_secs(2);
        self.env.clock.advance(d);
        self.env.sim.advance_clock(d);
        match reqwest::Client::new()
            .get(format!("{}/v1/charges", self.env.sim.base_url()))
            .bearer_auth(&token)
            .send()
            .await
        {
            Ok(r) => format!("HTTP {}", r.status().as_u16()),
            Err(_) => "no answer".into(),
        }
    }

    fn jump(&mut self, d: Duration) {
        self.env.clock.advance(d);
        self.env.sim.advance_clock(d);
        if d >= CEILING {
            self.world.ceiling_passed = true;
        }
    }

    async fn annotate(&self, annotations: Value) {
        self.patch(json!({"metadata": {"annotations": annotations}}))
            .await;
    }

    async fn patch(&self, body: Value) {
        let pp = PatchParams::default();
        match self.kind {
            Kind::Key => {
                Api::<StripeKeyPolicy>::namespaced(self.env.client.clone(), NS)
                    .patch(&self.name, &pp, &Patch::Merge(body))
                    .await
                    .unwrap();
            }
            Kind::Webhook => {
                Api::<StripeWebhookEndpoint>::namespaced(self.env.client.clone(), NS)
                    .patch(&self.name, &pp, &Patch::Merge(body))
                    .await
                    .unwrap();
            }
        }
    }

    async fn apply_spec(&self) {
        let m = manifest(self.kind, &self.name, &self.world);
        let mut spec = m["spec"].clone();
        if !self.world.connect {
            spec["connectPermissions"] = Value::Null;
            spec["connect"] = Value::Null;
        }
        if !self.world.wide_scopes {
            spec["apiVersion"] = Value::Null;
        }
        self.patch(json!({"spec": spec})).await;
    }

    async fn set_guardrail(&self) {
        let api: Api<stripe_key_operator::api::StripeGuardrail> = Api::all(self.env.client.clone());
        if self.world.guardrail {
            let deny = match self.kind {
                Kind::Key => json!({"deniedPermissions": ["customer_*"]}),
                Kind::Webhook => json!({"allowedWebhookHosts": ["hooks.elsewhere.example"]}),
            };
            let mut spec = json!({"namespaceSelector": {}});
            for (k, v) in deny.as_object().unwrap() {
                spec[k] = v.clone();
            }
            self.env
                .apply_json(&json!({
                    "apiVersion": "stripekeys.io/v1alpha1", "kind": "StripeGuardrail",
                    "metadata": {"name": "sim-guard"}, "spec": spec
                }))
                .await
                .unwrap();
        } else {
            let _ = api.delete("sim-guard", &DeleteParams::default()).await;
        }
    }

    async fn set_namespace_label(&self) {
        let value = if self.world.relabelled {
            "someone-else"
        } else {
            ACCOUNT
        };
        self.env
            .apply_json(&json!({"apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": NS, "labels": {"stripekeys.io/account": value}}}))
            .await
            .unwrap();
    }

    /// Invariants that hold after every reconcile.
    async fn check_always(&mut self) -> Result<(), String> {
        let active = self.active();
        let status = self.status().await.unwrap_or(Value::Null);
        // (a) an incident that is handled left nothing handed out before it active.
        let handled = status["lastHandledRotateRequest"]
            .as_str()
            .unwrap_or_default();
        for (value, doomed) in &self.world.incidents {
            let idx: u32 = value.trim_start_matches("incident-").parse().unwrap_or(0);
            let handled_idx: u32 = handled
                .trim_start_matches("incident-")
                .trim_start_matches('r')
                .parse()
                .unwrap_or(0);
            if handled_idx >= idx {
                let alive: Vec<&String> = doomed.iter().filter(|id| active.contains(*id)).collect();
                if !alive.is_empty() {
                    return Err(format!(
                        "(a) incident {value} is handled but {alive:?} handed out before it is active"
                    ));
                }
            }
        }
        // (c) at most one credential at Stripe that status does not know.
        let mut known: BTreeSet<String> = BTreeSet::new();
        for k in [
            &status["currentKey"],
            &status["previousKey"],
            &status["rotation"]["newKey"],
        ] {
            if let Some(id) = k["id"].as_str() {
                known.insert(id.to_string());
            }
        }
        for k in status["retiringKeys"].as_array().into_iter().flatten() {
            if let Some(id) = k["id"].as_str() {
                known.insert(id.to_string());
            }
        }
        let unknown: Vec<&String> = active.iter().filter(|id| !known.contains(*id)).collect();
        if unknown.len() > 1 {
            return Err(format!(
                "(c) {} unknown active credentials: {unknown:?}",
                unknown.len()
            ));
        }
        // (e) no secret material in status or Events.
        let text = status.to_string();
        for needle in ["sk_test_", "rk_test_", "whsec_", "sk_live_", "rk_live_"] {
            if text.contains(needle) {
                return Err(format!("(e) status contains {needle} material"));
            }
        }
        Ok(())
    }

    /// (d): which credential the Secret publishes as current, and whether the targets run it.
    async fn rolled_onto(&self, fp: &str) -> bool {
        let dep = self
            .env
            .api
            .get("apps/v1", "Deployment", Some(NS), "checkout")
            .unwrap();
        let annotations = &dep["spec"]["template"]["metadata"]["annotations"];
        annotations
            .as_object()
            .is_some_and(|a| a.values().any(|v| v.as_str() == Some(fp)))
            && !self.world.stuck
    }

    /// Runs `n` reconciles, checking after each; also checks (d) across each reconcile.
    async fn run(&mut self, n: usize) -> Result<(), String> {
        for _ in 0..n {
            let before_active = self.active();
            let before_pub = self.published().await;
            self.reconcile().await;
            let after_active = self.active();
            if self.kind == Kind::Key {
                let st = self.status().await.unwrap_or(Value::Null);
                let held = !st["rotation"]["usageHold"].is_null();
                if held != self.world.held {
                    self.world.held = held;
                    self.say(format!("usage hold of the old key: {held}"));
                    if held {
                        KEY_HOLDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            }
            // (d) an old credential that was published as previous and died in this reconcile
            // died after the targets rolled onto the current one (or past the ceiling).
            if let Some((cur, prev)) = &before_pub {
                let by_fp = self.ids_by_fingerprint();
                for fp in prev {
                    if let Some(id) = by_fp.get(fp)
                        && before_active.contains(id)
                        && !after_active.contains(id)
                        && self.world.incidents.is_empty()
                        && !self.world.ceiling_passed
                        && !self.rolled_onto(cur).await
                    {
                        return Err(format!(
                            "(d) the previous credential {id} was retired before the targets rolled"
                        ));
                    }
                }
            }
            self.check_always().await?;
        }
        Ok(())
    }

    /// Puts the world back, runs to quiescence and checks (b) and (c).
    async fn quiesce(&mut self) -> Result<(), String> {
        self.env.sim.clear_faults();
        self.env.crash.arm("none");
        self.world.store_down = false;
        self.env.store.set_unreachable(false);
        self.world.stuck = false;
        self.env.api.set_workload_stuck(NS, "checkout", false);
        if self.world.guardrail {
            self.world.guardrail = false;
            self.set_guardrail().await;
        }
        if self.world.relabelled {
            self.world.relabelled = false;
            self.set_namespace_label().await;
        }
        if self.kind == Kind::Key {
            // A client outside the targets still uses the old key as things calm down: a hold
            // must end (quiet period or ceiling) for the rotation to finish.
            let used = self.use_previous_key().await;
            self.say(format!(
                "quiescence: an outside client uses the previous key: {used}"
            ));
        }
        for _round in 0..12 {
            self.run(6).await?;
            let st = self.status().await.unwrap_or(Value::Null);
            if st["rotation"].is_null()
                && st["retiringKeys"].as_array().is_none_or(|a| a.is_empty())
            {
                self.run(2).await?;
                break;
            }
            self.jump(OVERLAP + Duration::from_secs(60));
        }
        let st = self.status().await.unwrap_or(Value::Null);
        if !st["rotation"].is_null() {
            return Err(format!("no quiescence: rotation {}", st["rotation"]));
        }
        let active = self.active();
        let by_fp = self.ids_by_fingerprint();
        let Some((cur, others)) = self.published().await else {
            return Err("(b) nothing published at quiescence".into());
        };
        let mut published: BTreeSet<String> = BTreeSet::new();
        published.insert(by_fp.get(&cur).cloned().unwrap_or(cur.clone()));
        for f in &others {
            published.insert(by_fp.get(f).cloned().unwrap_or(f.clone()));
        }
        if active != published {
            return Err(format!(
                "(b) active at Stripe {active:?} != published {published:?}"
            ));
        }
        let current_id = st["currentKey"]["id"].as_str().unwrap_or_default();
        if by_fp.get(&cur).map(String::as_str) != Some(current_id) {
            return Err(format!(
                "(b) the Secret's current credential is not status's {current_id}"
            ));
        }
        let path = StorePath::credential(
            &StorePrefix::new("stripe-key-operator").unwrap(),
            NS,
            self.kind.store_kind(),
            &self.name,
        )
        .unwrap();
        let bundle = self
            .env
            .store
            .read_bundle(&path)
            .await
            .map_err(|e| e.to_string())?;
        let bundle = bundle.ok_or("(b) no bundle in the store")?.value;
        if bundle.current.fingerprint != cur {
            return Err("(b) the store's current credential is not the Secret's".into());
        }
        for (value, doomed) in &self.world.incidents {
            let alive: Vec<&String> = doomed.iter().filter(|id| active.contains(*id)).collect();
            if !alive.is_empty() {
                return Err(format!(
                    "(a) after incident {value}, {alive:?} still active"
                ));
            }
        }
        // (e) Events.
        let events: Api<k8s_openapi::api::events::v1::Event> =
            Api::namespaced(self.env.client.clone(), NS);
        let text =
            serde_json::to_string(&events.list(&Default::default()).await.unwrap().items).unwrap();
        for needle in ["sk_test_", "rk_test_", "whsec_"] {
            if text.contains(needle) {
                return Err(format!("(e) an Event contains {needle} material"));
            }
        }
        Ok(())
    }
}

async fn run_seed(kind: Kind, seed: u64) -> Result<(), (String, Vec<String>)> {
    let mut sim = Sim::start(kind, seed).await;
    sim.env
        .apply_json(&manifest(kind, &sim.name, &sim.world))
        .await
        .unwrap();
    let result = async {
        sim.run(4).await?;
        for _ in 0..STEPS {
            sim.act().await?;
            let n = sim.rng.random_range(0..4);
            if n > 0 && sim.rng.random_bool(0.2) {
                // The lease is lost while the first of these reconciles is in flight.
                sim.lose_lease().await?;
                sim.run(n - 1).await?;
            } else {
                sim.run(n).await?;
            }
        }
        sim.quiesce().await
    }
    .await;
    result.map_err(|e| (e, sim.log.clone()))
}

fn seeds() -> Vec<u64> {
    if let Ok(s) = std::env::var("SIM_SEED") {
        return vec![s.parse().expect("SIM_SEED is a number")];
    }
    let n = std::env::var("SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(CI_SEEDS);
    let base = std::env::var("SIM_BASE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0xC0FFEE);
    (0..n).map(|i| base + i).collect()
}

async fn simulate(kind: Kind) {
    let mut failures = Vec::new();
    for seed in seeds() {
        // On a worker thread (a spawned task lives on the heap), not on the test thread.
        let run = tokio::spawn(run_seed(kind, seed))
            .await
            .expect("the seed's task");
        if let Err((e, log)) = run {
            eprintln!(
                "seed {seed} ({kind:?}) failed: {e}\nreplay: SIM_SEED={seed} cargo test --test rotation_simulation\n{}",
                log.join("\n")
            );
            failures.push((seed, e));
        }
    }
    if kind == Kind::Key {
        eprintln!(
            "{} usage hold(s) of an old key across the seeds",
            KEY_HOLDS.load(std::sync::atomic::Ordering::Relaxed)
        );
    }
    assert!(
        failures.is_empty(),
        "{} seed(s) failed: {failures:?}",
        failures.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeded_simulation_of_key_policies_keeps_every_invariant() {
    simulate(Kind::Key).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeded_simulation_of_webhook_endpoints_keeps_every_invariant() {
    simulate(Kind::Webhook).await;
}

#[test]
fn the_same_seed_makes_the_same_choices() {
    let a: Vec<u32> = StdRng::seed_from_u64(7)
        .random_iter::<u32>()
        .take(8)
        .collect();
    let b: Vec<u32> = StdRng::seed_from_u64(7)
        .random_iter::<u32>()
        .take(8)
        .collect();
    assert_eq!(a, b);
    let _ = deployment("x");
}
