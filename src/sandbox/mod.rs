//! `stripe-key-operator sandbox`: the operator's whole job on one machine, no cluster needed.
//!
//! One process starts the Kubernetes API for tests, the Stripe simulator, the in-memory secret
//! store and the real controllers, applies `examples/`, and prints a timeline: the account, each
//! key minted (id and fingerprint, never the secret), the Secret synced, the workload rolled, a
//! rotation by annotation, an incident rotation, the old key expiring, a person viewing the key
//! in the (simulated) Stripe Dashboard and the operator's `KeyViewed` from the activity log, the
//! webhook endpoint and its secret, and the audit lines. It exits 0 when every step happened and non-zero with the
//! reason otherwise. With `--serve` it stays up and prints a kubeconfig for `kubectl`.

pub mod env;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use serde_json::{Value, json};

use crate::api::{
    ROTATE_ANNOTATION, ROTATE_REASON_ANNOTATION, StripeKeyPolicy, StripeWebhookEndpoint, conditions,
};
use crate::audit::{Anchor, AuditLog, verify_chain};
use env::{EnvOptions, LocalEnv};

/// Flags of `stripe-key-operator sandbox`.
#[derive(clap::Args, Debug, Clone)]
pub struct SandboxArgs {
    /// The directory of manifests to apply.
    #[arg(long, default_value = "examples")]
    pub examples: PathBuf,
    /// Stay up after the timeline and print a kubeconfig for kubectl.
    #[arg(long)]
    pub serve: bool,
    /// Give up on a step after this long.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    pub step_timeout: Duration,
}

struct Timeline {
    start: Instant,
}

impl Timeline {
    fn say(&self, what: impl AsRef<str>) {
        println!(
            "[{:>5.1}s] {}",
            self.start.elapsed().as_secs_f64(),
            what.as_ref()
        );
    }
}

fn manifests(dir: &Path) -> anyhow::Result<Vec<(String, Value)>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| {
            format!(
                "reading {} (run from the repository root or pass --examples)",
                dir.display()
            )
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    files.sort();
    let mut out = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file)?;
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let value: Value = serde::Deserialize::deserialize(doc)?;
            if !value.is_null() {
                out.push((
                    file.file_name()
                        .unwrap_or_default()
                        .to_string_lossy()
                        .into_owned(),
                    value,
                ));
            }
        }
    }
    Ok(out)
}

/// Applies in dependency order: namespaces, cluster kinds, workloads, then what uses them.
fn order(kind: &str) -> u8 {
    match kind {
        "Namespace" => 0,
        "StripeAccount" | "StripeGuardrail" => 1,
        "Deployment" | "StatefulSet" | "DaemonSet" | "Secret" | "ConfigMap" => 2,
        _ => 3,
    }
}

async fn wait<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = probe().await? {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!(
                "step did not happen within {}: {what}",
                humantime::format_duration(timeout)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn ready_condition(
    conds: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
) -> Option<(String, String)> {
    conditions::find(conds, "Ready").map(|c| (c.status.clone(), c.message.clone()))
}

/// Runs the sandbox. Returns an error naming the step that did not happen.
pub async fn run(args: SandboxArgs) -> anyhow::Result<()> {
    let t = Timeline {
        start: Instant::now(),
    };
    let (audit, audit_lines) = AuditLog::memory();
    let options = EnvOptions {
        audit: Some(audit.clone()),
        activity_log_interval: SANDBOX_ACTIVITY_LOG_INTERVAL,
        // The canary step should not wait a minute for its trip.
        canary_check_interval: Duration::from_secs(1),
        ..EnvOptions::default()
    };
    let mut env = LocalEnv::start(options).await?;
    println!(
        "stripe-key-operator sandbox: the whole job on this machine (no cluster, Vault or Stripe account)"
    );
    t.say(format!(
        "Kubernetes API for tests at {} (the four CRDs installed)",
        env.api.url()
    ));
    t.say(format!(
        "Stripe simulator at {} with test-mode account {}",
        env.sim.base_url(),
        env.account_id
    ));
    t.say("secret store: in memory (sandbox only; production uses Vault KV v2)");
    env.start_operator();
    t.say("operator started: StripeKeyPolicy and StripeWebhookEndpoint controllers");

    let mut docs = manifests(&args.examples)?;
    docs.sort_by_key(|(_, v)| order(v["kind"].as_str().unwrap_or_default()));
    let mut policy: Option<(String, String)> = None;
    let mut endpoint: Option<(String, String)> = None;
    let mut canary: Option<(String, String)> = None;
    for (file, mut doc) in docs {
        let kind = doc["kind"].as_str().unwrap_or_default().to_string();
        if kind == "StripeAccount" {
            // The example points at api.stripe.com; the sandbox points it at the simulator.
            doc["spec"]["apiBase"] = json!(env.sim.base_url());
            doc["spec"]["context"] = json!(env.account_id);
            doc["spec"]["credentials"] =
                json!({"secretRef": {"name": env::APP_KEY_SECRET, "key": "secret_key"}});
        }
        let obj = env
            .apply_json(&doc)
            .await
            .with_context(|| format!("applying {file}"))?;
        let ns = obj.namespace().unwrap_or_default();
        let is_canary = !doc["spec"]["canary"].is_null();
        match kind.as_str() {
            "StripeKeyPolicy" if is_canary && canary.is_none() => {
                canary = Some((ns.clone(), obj.name_any()))
            }
            "StripeKeyPolicy" if !is_canary && policy.is_none() => {
                policy = Some((ns.clone(), obj.name_any()))
            }
            "StripeWebhookEndpoint" if endpoint.is_none() => {
                endpoint = Some((ns.clone(), obj.name_any()))
            }
            _ => {}
        }
        let place = if ns.is_empty() {
            obj.name_any()
        } else {
            format!("{ns}/{}", obj.name_any())
        };
        t.say(format!("applied {file}: {kind} {place}"));
    }
    let (ns, name) = policy.context("examples/ holds no StripeKeyPolicy")?;
    let policies: Api<StripeKeyPolicy> = Api::namespaced(env.client.clone(), &ns);
    let timeout = args.step_timeout;

    // 1. The first key.
    let p = wait_policy_ready(
        &policies,
        &ns,
        &name,
        "the StripeKeyPolicy becomes Ready",
        timeout,
    )
    .await?;
    let status = p.status.clone().unwrap_or_default();
    let first = status.current_key.clone().context("no current key")?;
    t.say(format!(
        "key minted: {} (fingerprint {}) with exactly {}",
        first.id,
        first.fingerprint,
        status.current_permissions.join(", ")
    ));
    let secret_name = p.spec.delivery.secret.name.clone();
    let secrets: Api<Secret> = Api::namespaced(env.client.clone(), &ns);
    let secret = secrets.get(&secret_name).await?;
    let keys: Vec<String> = secret
        .data
        .as_ref()
        .map(|d| d.keys().cloned().collect())
        .unwrap_or_default();
    t.say(format!(
        "Secret {ns}/{secret_name} synced: keys {} (values never printed)",
        keys.join(", ")
    ));
    for target in &p.spec.delivery.rollout_targets {
        if let Some(target_name) = &target.name {
            wait_rolled(&env, &ns, target_name, &name, &first.fingerprint, timeout).await?;
            t.say(format!(
                "{:?} {ns}/{target_name} rolled onto fingerprint {}: every replica updated and available",
                target.kind, first.fingerprint
            ));
        }
    }
    if let Some(next) = &status.next_rotation_at {
        t.say(format!("next scheduled rotation at {}", next.0));
    }

    // 2. A routine rotation by annotation: the old key stays valid through rollout and overlap.
    let request = format!("sandbox-{}", jiff_now_secs());
    annotate(&policies, &name, json!({ROTATE_ANNOTATION: request})).await?;
    t.say(format!(
        "annotated {ROTATE_ANNOTATION}={request}: a routine rotation"
    ));
    let p = wait("the rotation reaches its overlap", timeout, || async {
        let p = policies.get(&name).await?;
        let s = p.status.clone().unwrap_or_default();
        Ok(s.rotation
            .as_ref()
            .is_some_and(|r| r.phase == crate::api::RotationPhase::Overlapping)
            .then_some(p))
    })
    .await?;
    let s = p.status.clone().unwrap_or_default();
    let second = s.current_key.clone().context("no current key")?;
    t.say(format!(
        "new key {} (fingerprint {}) published and rolled out; old key {} still valid until the overlap ends{}",
        second.id,
        second.fingerprint,
        first.id,
        s.previous_key
            .as_ref()
            .and_then(|k| k.expires_at.as_ref())
            .map(|e| format!(" ({})", e.0))
            .unwrap_or_default()
    ));
    let secret = secrets.get(&secret_name).await?;
    let has_previous = secret
        .data
        .as_ref()
        .is_some_and(|d| d.contains_key(p.spec.delivery.secret.previous_key_name()));
    if !has_previous {
        bail!("the Secret does not publish the previous key during the overlap");
    }
    t.say(format!(
        "Secret {ns}/{secret_name} publishes both keys during the overlap"
    ));
    // Something outside the rollout targets (a cron job elsewhere) still uses the old key 40
    // minutes after the rollout: usage-aware expiry holds it when the overlap ends.
    let old_token = secret
        .data
        .as_ref()
        .and_then(|d| d.get(p.spec.delivery.secret.previous_key_name()))
        .map(|b| String::from_utf8_lossy(&b.0).into_owned())
        .context("the previous key is not in the Secret")?;
    let advance = |d: Duration| {
        env.clock.advance(d);
        env.sim.advance_clock(d);
    };
    advance(Duration::from_secs(40 * 60));
    let used = reqwest::Client::new()
        .get(format!("{}/v1/charges", env.sim.base_url()))
        .bearer_auth(&old_token)
        .send()
        .await?
        .status();
    drop(old_token);
    t.say(format!(
        "a cron job outside the rollout targets calls Stripe with the old key {} 40 minutes after the rollout (HTTP {})",
        first.id,
        used.as_u16()
    ));
    advance(Duration::from_secs(21 * 60));
    nudge(&policies, &name).await?;
    let held = wait("the old key is held", timeout, || async {
        let p = policies.get(&name).await?;
        let s = p.status.unwrap_or_default();
        Ok(conditions::find(&s.conditions, "Degraded")
            .filter(|c| c.reason == "OldKeyStillInUse")
            .map(|c| c.message.clone()))
    })
    .await?;
    let state = key_status(&env, &first.id).unwrap_or_default();
    t.say(format!(
        "overlap over, but old key {} held (simulator says: {state}): Degraded=True, reason=OldKeyStillInUse: {held}",
        first.id
    ));
    advance(Duration::from_secs(2 * 3600));
    nudge(&policies, &name).await?;
    t.say("sandbox clock advanced past the overlap and the quiet period");
    wait("the old key expires", timeout, || async {
        let p = policies.get(&name).await?;
        let s = p.status.unwrap_or_default();
        Ok((s.previous_key.is_none() && s.rotation.is_none()).then_some(()))
    })
    .await?;
    let old = key_status(&env, &first.id).context("the old key vanished from the simulator")?;
    if old != "expired" {
        bail!("the old key is {old} at the simulator, not expired");
    }
    t.say(format!(
        "old key {} expired at Stripe (simulator says: {old}); Secret holds only the new key",
        first.id
    ));

    // 3. An incident: the compromised key dies at once.
    let incident = format!("incident-{}", jiff_now_secs());
    annotate(
        &policies,
        &name,
        json!({ROTATE_ANNOTATION: incident, ROTATE_REASON_ANNOTATION: "incident"}),
    )
    .await?;
    t.say(format!(
        "annotated {ROTATE_ANNOTATION}={incident} with {ROTATE_REASON_ANNOTATION}=incident"
    ));
    let p = wait("the incident rotation completes", timeout, || async {
        let p = policies.get(&name).await?;
        let s = p.status.clone().unwrap_or_default();
        Ok(
            (s.last_handled_rotate_request.as_deref() == Some(incident.as_str())
                && s.rotation.is_none())
            .then_some(p),
        )
    })
    .await?;
    let third = p
        .status
        .clone()
        .unwrap_or_default()
        .current_key
        .clone()
        .context("no current key")?;
    let second_state = key_status(&env, &second.id).unwrap_or_default();
    if second_state != "expired" {
        bail!("after the incident the compromised key is {second_state}, not expired");
    }
    t.say(format!(
        "incident rotation: new key {} (fingerprint {}); compromised key {} expired at once, without overlap",
        third.id, third.fingerprint, second.id
    ));
    let active = env
        .sim
        .state()
        .account(&env.account_id)
        .map(|a| a.api_keys.iter().filter(|k| k.status == "active").count())
        .unwrap_or_default();
    t.say(format!(
        "keys active at Stripe now: {active} (of {} minted)",
        3
    ));

    // 3b. A person reveals the current key in the (simulated) Dashboard.
    key_viewed_step(&env, &t, &ns, &name, &third.id, timeout).await?;
    // 3c. A canary trip: the decoy key is used, the guarded policy is rotated as an incident.
    if let Some((cns, cname)) = canary {
        canary_step(&env, &t, (&cns, &cname), (&ns, &name), timeout).await?;
    }

    // 4. The webhook endpoint and its signing secret.
    if let Some((wns, wname)) = endpoint {
        let endpoints: Api<StripeWebhookEndpoint> = Api::namespaced(env.client.clone(), &wns);
        let e = wait(
            "the StripeWebhookEndpoint becomes Ready",
            timeout,
            || async {
                let e = endpoints.get(&wname).await?;
                let s = e.status.clone().unwrap_or_default();
                if let Some((status, message)) = ready_condition(&s.conditions)
                    && status == "False"
                {
                    bail!("StripeWebhookEndpoint {wns}/{wname} was refused: {message}");
                }
                Ok(
                    (conditions::is_true(&s.conditions, "Ready") && s.rotation.is_none())
                        .then_some(e),
                )
            },
        )
        .await?;
        let s = e.status.clone().unwrap_or_default();
        let current = s.current_key.clone().context("no endpoint")?;
        t.say(format!(
            "webhook endpoint {} created for {} with signing secret fingerprint {}",
            current.id, e.spec.url, current.fingerprint
        ));
        t.say(format!(
            "Secret {wns}/{} synced: {} and {}",
            e.spec.delivery.secret.name,
            e.spec.delivery.secret.key_name(),
            e.spec.delivery.secret.all_key_name()
        ));
    }

    // 4b. A brokered workload: it calls Stripe through the egress broker and never holds the key.
    broker_step(&env, &t, &args.examples.join("brokered"), timeout).await?;

    // 5. The audit trail.
    audit.flush().await;
    let lines = audit_lines.lines();
    let contents = audit_lines.contents();
    let summary = verify_chain(contents.as_bytes(), &Anchor::default())
        .map_err(|problem| anyhow::anyhow!("the audit chain does not verify: {problem}"))?;
    let stripe_calls = lines
        .iter()
        .filter(|l| l.contains("\"stripe.request\""))
        .count();
    t.say(format!(
        "audit log: {} lines ({stripe_calls} Stripe calls), hash chain intact, head {}",
        summary.lines, summary.head.hash
    ));
    for line in lines
        .iter()
        .filter(|l| !l.contains("\"stripe.request\""))
        .rev()
        .take(4)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
    {
        println!("        {line}");
    }
    if let Some(line) = lines
        .iter()
        .rev()
        .find(|l| l.contains("\"stripe.request\""))
    {
        println!("        {line}");
    }
    t.say("sandbox complete: every step happened");

    if args.serve {
        let path = std::env::temp_dir().join(format!(
            "stripe-key-operator-sandbox-{}.kubeconfig",
            std::process::id()
        ));
        std::fs::write(&path, env.api.kubeconfig_yaml())?;
        println!();
        println!("The sandbox stays up. In another terminal:");
        println!("  export KUBECONFIG={}", path.display());
        println!("  kubectl get stripekeypolicies,stripewebhookendpoints -A");
        println!("  kubectl get events -n shop");
        println!("  kubectl explain stripekeypolicy.spec.rotation");
        println!("  kubectl apply --server-side -f examples/stripekeypolicy.yaml");
        println!(
            "(JSON only: `kubectl create secret|deployment|namespace` send protobuf and are refused; `kubectl apply -f` works). Ctrl-C stops it."
        );
        crate::controller::shutdown_signal().await;
        let _ = std::fs::remove_file(&path);
    }
    env.stop_operator().await;
    audit.close();
    Ok(())
}

/// The sandbox's `--activity-log-interval`: short, so the Dashboard step shows in seconds.
const SANDBOX_ACTIVITY_LOG_INTERVAL: Duration = Duration::from_secs(2);

/// A person reveals the policy's current key in the simulated Stripe Dashboard; the operator
/// reads Stripe's activity log and raises `KeyViewed` on the policy within one interval.
async fn key_viewed_step(
    env: &LocalEnv,
    t: &Timeline,
    ns: &str,
    name: &str,
    key_id: &str,
    timeout: Duration,
) -> anyhow::Result<()> {
    let policies: Api<StripeKeyPolicy> = Api::namespaced(env.client.clone(), ns);
    let account = policies.get(name).await?.spec.account_ref.name;
    let accounts: Api<crate::api::StripeAccount> = Api::all(env.client.clone());
    wait("the activity-log reader starts", timeout, || async {
        let a = accounts.get(&account).await?;
        Ok(a.status
            .and_then(|s| s.activity_log)
            .and_then(|l| l.started_at)
            .map(|_| ()))
    })
    .await?;
    let email = "alice@example.com";
    env.sim
        .dashboard(
            &env.account_id,
            email,
            crate::sim::DashboardAction::View {
                key_id: key_id.to_string(),
            },
        )
        .map_err(|e| anyhow::anyhow!("the simulated Dashboard: {e}"))?;
    t.say(format!(
        "{email} reveals key {key_id} in the (simulated) Stripe Dashboard"
    ));
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(env.client.clone(), ns);
    let note = wait("the operator reports the viewed key", timeout, || async {
        Ok(events
            .list(&Default::default())
            .await?
            .items
            .into_iter()
            .find(|e| {
                e.reason.as_deref() == Some("KeyViewed")
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name)
            })
            .and_then(|e| e.note))
    })
    .await?;
    t.say(format!(
        "activity log read: Warning KeyViewed on StripeKeyPolicy {ns}/{name}: {note}"
    ));
    Ok(())
}

/// The canary step: someone who read the decoy Secret calls Stripe with the canary key; the
/// canary check trips it, the guarded policy `guarded` is rotated as an incident (its key
/// revoked at once) and the canary is re-minted.
async fn canary_step(
    env: &LocalEnv,
    t: &Timeline,
    (cns, cname): (&str, &str),
    (gns, gname): (&str, &str),
    timeout: Duration,
) -> anyhow::Result<()> {
    let canaries: Api<StripeKeyPolicy> = Api::namespaced(env.client.clone(), cns);
    let c = wait_policy_ready(&canaries, cns, cname, "the canary is minted", timeout).await?;
    let decoy = c
        .status
        .clone()
        .unwrap_or_default()
        .current_key
        .clone()
        .context("no canary key")?;
    let secret_name = c.spec.delivery.secret.name.clone();
    t.say(format!(
        "canary {cns}/{cname}: decoy key {} published in Secret {cns}/{secret_name}; nothing legitimate uses it",
        decoy.id
    ));
    let guarded: Api<StripeKeyPolicy> = Api::namespaced(env.client.clone(), gns);
    let before = guarded
        .get(gname)
        .await?
        .status
        .unwrap_or_default()
        .current_key
        .clone()
        .context("the guarded policy has no key")?;
    let secret = Api::<Secret>::namespaced(env.client.clone(), cns)
        .get(&secret_name)
        .await?;
    let token = secret
        .data
        .as_ref()
        .and_then(|d| d.get(c.spec.delivery.secret.key_name()))
        .map(|b| String::from_utf8_lossy(&b.0).into_owned())
        .context("the decoy Secret holds no key")?;
    let used = reqwest::Client::new()
        .get(format!("{}/v1/balance", env.sim.base_url()))
        .bearer_auth(&token)
        .send()
        .await?
        .status();
    drop(token);
    t.say(format!(
        "an intruder who read Secret {cns}/{secret_name} calls GET /v1/balance with the decoy key (HTTP {})",
        used.as_u16()
    ));
    let trip = wait("the canary trips", timeout, || async {
        let p = canaries.get(cname).await?;
        let s = p.status.unwrap_or_default();
        Ok(
            conditions::is_true(&s.conditions, crate::api::CANARY_TRIPPED_CONDITION)
                .then_some(())
                .and(s.canary.and_then(|c| c.last_trip)),
        )
    })
    .await?;
    t.say(format!(
        "canary tripped: key {} used at {} (Tripped=True, reason CanaryUsed; Warning Event CanaryTripped)",
        trip.key_id, trip.last_used.0
    ));
    wait(
        "the guarded policy's incident rotation completes",
        timeout,
        || async {
            let s = guarded.get(gname).await?.status.unwrap_or_default();
            Ok(
                (s.last_handled_rotate_request.as_deref() == Some(trip.request.as_str())
                    && s.rotation.is_none())
                .then_some(()),
            )
        },
    )
    .await?;
    let state = key_status(env, &before.id).unwrap_or_default();
    if state != "expired" {
        bail!(
            "after the canary trip the guarded key {} is {state}, not expired",
            before.id
        );
    }
    t.say(format!(
        "guarded policy {gns}/{gname} rotated as an incident: key {} expired at once (simulator says: {state})",
        before.id
    ));
    let rearmed = wait("the canary is re-minted", timeout, || async {
        let s = canaries.get(cname).await?.status.unwrap_or_default();
        Ok(s.current_key
            .as_ref()
            .filter(|k| k.id != decoy.id && s.rotation.is_none())
            .map(|k| k.id.clone()))
    })
    .await?;
    t.say(format!(
        "canary re-minted as key {rearmed}; the used decoy key {} is expired, so it can trip again",
        decoy.id
    ));
    Ok(())
}

/// A Secret volume as the kubelet writes one: each update is a new `..vN` directory that the
/// `..data` link is swapped to atomically, and every entry is a link through `..data`, so the
/// sidecar never reads a half-written key. Removed when dropped.
struct SecretVolume {
    dir: PathBuf,
    version: u32,
    written: std::collections::BTreeMap<String, String>,
}

impl SecretVolume {
    fn new() -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!(
            "stripe-key-operator-sandbox-broker-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        Ok(Self {
            dir,
            version: 0,
            written: Default::default(),
        })
    }

    /// Writes `entries` as the next version (nothing when they did not change).
    fn write(
        &mut self,
        entries: &std::collections::BTreeMap<String, String>,
    ) -> anyhow::Result<()> {
        if *entries == self.written {
            return Ok(());
        }
        self.version += 1;
        let name = format!("..v{}", self.version);
        std::fs::create_dir(self.dir.join(&name))?;
        for (k, v) in entries {
            std::fs::write(self.dir.join(&name).join(k), v)?;
        }
        let tmp = self.dir.join("..data_tmp");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&name, &tmp)?;
        std::fs::rename(&tmp, self.dir.join("..data"))?;
        for k in entries.keys() {
            let link = self.dir.join(k);
            if std::fs::symlink_metadata(&link).is_err() {
                std::os::unix::fs::symlink(format!("..data/{k}"), &link)?;
            }
        }
        self.written = entries.clone();
        Ok(())
    }
}

impl Drop for SecretVolume {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The entries of Secret `ns/name`, as text.
async fn secret_entries(
    env: &LocalEnv,
    ns: &str,
    name: &str,
) -> anyhow::Result<std::collections::BTreeMap<String, String>> {
    let secret = Api::<Secret>::namespaced(env.client.clone(), ns)
        .get(name)
        .await?;
    Ok(secret
        .data
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, String::from_utf8_lossy(&v.0).into_owned()))
        .collect())
}

/// The brokered workload of `examples/brokered/`: the operator publishes a placeholder for the
/// app and the real key for the egress-proxy sidecar only; requests through the broker succeed,
/// one outside the key's permissions is refused in the pod, a rotation switches keys under
/// traffic with no failed request and no rollout, and `permissions suggest` reads the broker's
/// usage. Skipped (and said so) when `dir` does not exist.
async fn broker_step(
    env: &LocalEnv,
    t: &Timeline,
    dir: &Path,
    timeout: Duration,
) -> anyhow::Result<()> {
    use crate::egress::anomaly::KubeActionSink;
    use crate::egress::proxy::{
        AnomalySetup, DEFAULT_ANOMALY_ENTRY, DEFAULT_PLACEHOLDER_ENTRY, EgressConfig, EgressProxy,
        SinkFactory,
    };
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    if !dir.is_dir() {
        t.say(format!(
            "no {} directory: the brokered workload step is skipped",
            dir.display()
        ));
        return Ok(());
    }
    let mut policy = None;
    let mut deployment = None;
    for (file, doc) in manifests(dir)? {
        if doc["apiVersion"]
            .as_str()
            .is_some_and(|v| v.starts_with("rbac.authorization.k8s.io/"))
        {
            // The API for tests does not serve RBAC (nothing here is authorized by it).
            t.say(format!(
                "brokered/{file}: {} {} not applied (the local API serves no RBAC)",
                doc["kind"].as_str().unwrap_or_default(),
                doc["metadata"]["name"].as_str().unwrap_or_default()
            ));
            continue;
        }
        let obj = env
            .apply_json(&doc)
            .await
            .with_context(|| format!("applying brokered/{file}"))?;
        let kind = doc["kind"].as_str().unwrap_or_default().to_string();
        let ns = obj.namespace().unwrap_or_default();
        match kind.as_str() {
            "StripeKeyPolicy" => policy = Some((ns.clone(), obj.name_any())),
            "Deployment" => deployment = Some((ns.clone(), obj.name_any())),
            _ => {}
        }
        t.say(format!(
            "applied brokered/{file}: {kind} {ns}/{}",
            obj.name_any()
        ));
    }
    let (ns, name) = policy.context("examples/brokered holds no StripeKeyPolicy")?;
    let policies: Api<StripeKeyPolicy> = Api::namespaced(env.client.clone(), &ns);
    let p = wait_policy_ready(
        &policies,
        &ns,
        &name,
        "the brokered policy becomes Ready",
        timeout,
    )
    .await?;
    let first = p
        .status
        .clone()
        .unwrap_or_default()
        .current_key
        .clone()
        .context("no current key")?;
    let secret_name = p.spec.delivery.secret.name.clone();
    let mut volume = SecretVolume::new()?;
    volume.write(&secret_entries(env, &ns, &secret_name).await?)?;
    let key_dir = volume.dir.clone();
    let placeholder = volume
        .written
        .get(DEFAULT_PLACEHOLDER_ENTRY)
        .cloned()
        .context("the brokered Secret holds no placeholder")?;
    let upstream = env.sim.base_url().parse()?;
    // The anomaly detector runs on a simulated clock (whole minutes, moved by this step), so the
    // learning period and a burst take seconds; its Events go to the policy.
    let minutes = Arc::new(AtomicU64::new(0));
    let start = std::time::UNIX_EPOCH
        + Duration::from_secs(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_secs()
                / 60
                * 60,
        );
    let clock: crate::egress::proxy::Clock = {
        let minutes = minutes.clone();
        Arc::new(move || start + Duration::from_secs(60 * minutes.load(Ordering::Relaxed)))
    };
    // The anomaly policy is the example's spec.delivery.broker.anomaly, which the operator
    // published in the sidecar's volume with the policy's name (no flag).
    if !volume.written.contains_key(DEFAULT_ANOMALY_ENTRY) {
        bail!(
            "the brokered Secret holds no {DEFAULT_ANOMALY_ENTRY} (spec.delivery.broker.anomaly)"
        );
    }
    let sinks: SinkFactory = {
        let client = env.client.clone();
        Arc::new(move |ns: &str, name: &str| {
            Arc::new(KubeActionSink::new(client.clone(), ns, name))
                as Arc<dyn crate::egress::anomaly::ActionSink>
        })
    };
    let broker = EgressProxy::start(EgressConfig {
        allow_loopback_upstream: true,
        reload_interval: Duration::from_millis(100),
        anomaly: Some(AnomalySetup {
            clock,
            ..AnomalySetup::mounted(sinks)
        }),
        ..EgressConfig::new(upstream, key_dir)
    })
    .await?;
    let action = broker
        .anomaly_action()
        .context("the sidecar did not take the mounted anomaly policy")?;
    t.say(format!(
        "brokered workload {ns}/{name}: Secret {secret_name} gives the app only a placeholder and \
         STRIPE_API_BASE; the egress-proxy sidecar at {} holds key {} (from its own Secret volume)",
        broker.url(),
        first.id
    ));
    let http = reqwest::Client::new();
    let call = |method: reqwest::Method, path: &str| {
        http.request(method, format!("{}{path}", broker.url()))
            .bearer_auth(&placeholder)
    };
    let ok = call(reqwest::Method::GET, "/v1/charges")
        .send()
        .await?
        .status();
    if !ok.is_success() {
        bail!("GET /v1/charges through the broker answered {ok}");
    }
    t.say(format!(
        "app -> broker -> Stripe: GET /v1/charges with the placeholder: HTTP {} (the broker put the real key on the wire)",
        ok.as_u16()
    ));
    let refused = call(reqwest::Method::POST, "/v1/payouts")
        .form(&[("amount", "1000"), ("currency", "usd")])
        .send()
        .await?;
    let status = refused.status();
    let body = refused.text().await.unwrap_or_default();
    let reached = env
        .sim
        .request_log()
        .iter()
        .any(|r| r.path.starts_with("/v1/payouts"));
    if status != reqwest::StatusCode::FORBIDDEN || !body.contains("payout_write") || reached {
        bail!("POST /v1/payouts through the broker: HTTP {status}, reached Stripe: {reached}");
    }
    t.say(
        "app -> broker: POST /v1/payouts refused in the pod with a Stripe-shaped 403 naming \
         payout_write; no request left the pod",
    );

    // A rotation under steady traffic: the sidecar switches keys, nothing is rolled out.
    let deployments: Api<k8s_openapi::api::apps::v1::Deployment> =
        Api::namespaced(env.client.clone(), &ns);
    let generation = match &deployment {
        Some((_, d)) => deployments.get(d).await?.metadata.generation,
        None => None,
    };
    let stop = Arc::new(AtomicBool::new(false));
    let (served, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let traffic = tokio::spawn({
        let (stop, served, failed) = (stop.clone(), served.clone(), failed.clone());
        let request = call(reqwest::Method::GET, "/v1/charges");
        async move {
            while !stop.load(Ordering::Relaxed) {
                let Some(r) = request.try_clone() else { break };
                match r.send().await {
                    Ok(resp) if resp.status().is_success() => {
                        served.fetch_add(1, Ordering::Relaxed)
                    }
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
                // About 10 requests a second: under the test-mode rate limit (25/s) that the
                // operator's own calls share.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });
    let request = format!("broker-{}", jiff_now_secs());
    annotate(&policies, &name, json!({ROTATE_ANNOTATION: request})).await?;
    let volume = std::sync::Mutex::new(volume);
    let switched = wait("the broker switches to the new key", timeout, || async {
        // The kubelet's part: the sidecar's Secret volume follows the Secret.
        let entries = secret_entries(env, &ns, &secret_name).await?;
        volume
            .lock()
            .map_err(|_| anyhow::anyhow!("the volume lock"))?
            .write(&entries)?;
        let s = policies.get(&name).await?.status.unwrap_or_default();
        let current = s.current_key.clone().filter(|k| k.id != first.id);
        Ok(current.filter(|_| {
            broker
                .key_fingerprint()
                .is_some_and(|f| f != first.fingerprint)
        }))
    })
    .await;
    // Traffic keeps flowing a little after the switch, then stops.
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let _ = traffic.await;
    let second = switched?;
    let (served, failed) = (
        served.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
    );
    if failed > 0 || served == 0 {
        bail!("during the brokered rotation {failed} requests failed ({served} served)");
    }
    let rolled = match &deployment {
        Some((_, d)) => deployments.get(d).await?.metadata.generation != generation,
        None => false,
    };
    if rolled {
        bail!("the brokered rotation rolled the workload out");
    }
    t.say(format!(
        "rotation under traffic: the sidecar switched from key {} to {} between requests; {served} requests, 0 failed; no rollout (the Deployment's generation is unchanged)",
        first.id, second.id
    ));

    // Right-sizing from what the broker saw.
    let report = serde_json::to_string(&broker.usage())?;
    let report = crate::egress::suggest::parse_report("the broker's /usage", &report)?;
    let suggestion = crate::egress::suggest::suggest(
        &[report],
        Some((format!("{ns}/{name}"), p.spec.permissions.clone())),
    );
    t.say(format!(
        "permissions suggest from the broker's /usage: {} (the policy grants {})",
        suggestion.suggested.join(", "),
        p.spec.permissions.join(", ")
    ));
    if suggestion.suggested.len() >= p.spec.permissions.len() {
        bail!("permissions suggest found no smaller set");
    }
    for line in crate::egress::suggest::render_text(&suggestion).lines() {
        println!("        {line}");
    }

    // A refund burst: one refund a minute for 35 (simulated) minutes teaches the detector what
    // is normal; then 30 in one minute.
    let refund =
        || call(reqwest::Method::POST, "/v1/refunds").form(&[("payment_intent", "pi_sandbox")]);
    for _ in 0..35 {
        minutes.fetch_add(1, Ordering::Relaxed);
        refund().send().await?;
        // Under the test-mode rate limit.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    minutes.fetch_add(1, Ordering::Relaxed);
    let (mut forwarded, mut throttled) = (0, 0);
    for _ in 0..30 {
        let r = refund().send().await?;
        if r.status() == reqwest::StatusCode::TOO_MANY_REQUESTS
            && r.headers()
                .get("x-stripe-broker")
                .is_some_and(|v| v == "throttled")
        {
            throttled += 1;
        } else {
            forwarded += 1;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if throttled == 0 {
        bail!("a burst of 30 refunds in one minute (normal: 1) was not caught");
    }
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(env.client.clone(), &ns);
    let note = wait("the broker reports the burst", timeout, || async {
        Ok(events
            .list(&Default::default())
            .await?
            .items
            .into_iter()
            .find(|e| {
                e.reason.as_deref() == Some(crate::egress::anomaly::ANOMALY_EVENT_REASON)
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name.as_str())
            })
            .and_then(|e| e.note))
    })
    .await?;
    t.say(format!(
        "refund burst: 30 refund_write requests in one minute after 35 (simulated) minutes of one a minute: {forwarded} forwarded, then {throttled} answered 429 in the pod (action {action}, from spec.delivery.broker.anomaly); Warning EgressAnomaly on StripeKeyPolicy {ns}/{name}: {note}"
    ));
    broker.shutdown().await;
    Ok(())
}

/// Waits until StripeKeyPolicy `ns/name` is Ready with no rotation under way; fails at once,
/// with the refusal, when it is `Ready=False`.
async fn wait_policy_ready(
    policies: &Api<StripeKeyPolicy>,
    ns: &str,
    name: &str,
    what: &str,
    timeout: Duration,
) -> anyhow::Result<StripeKeyPolicy> {
    wait(what, timeout, || async {
        let p = policies.get(name).await?;
        let s = p.status.clone().unwrap_or_default();
        if let Some((status, message)) = ready_condition(&s.conditions)
            && status == "False"
        {
            bail!("StripeKeyPolicy {ns}/{name} was refused: {message}");
        }
        Ok((conditions::is_true(&s.conditions, "Ready") && s.rotation.is_none()).then_some(p))
    })
    .await
}

fn jiff_now_secs() -> i64 {
    k8s_openapi::jiff::Timestamp::now().as_second()
}

fn key_status(env: &LocalEnv, id: &str) -> Option<String> {
    env.sim
        .state()
        .account(&env.account_id)?
        .api_keys
        .iter()
        .find(|k| k.id == id)
        .map(|k| k.status.clone())
}

async fn annotate(
    api: &Api<StripeKeyPolicy>,
    name: &str,
    annotations: Value,
) -> anyhow::Result<()> {
    api.patch(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"annotations": annotations}})),
    )
    .await?;
    Ok(())
}

/// Touches a label so the controller looks again after the sandbox clock moved.
async fn nudge(api: &Api<StripeKeyPolicy>, name: &str) -> anyhow::Result<()> {
    let label = format!("{}", jiff_now_secs());
    api.patch(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"sandbox/nudge": label}}})),
    )
    .await?;
    Ok(())
}

async fn wait_rolled(
    env: &LocalEnv,
    ns: &str,
    deployment: &str,
    policy: &str,
    fingerprint: &str,
    timeout: Duration,
) -> anyhow::Result<()> {
    let key = crate::inject::rollout_annotation_key("StripeKeyPolicy", policy);
    wait("the rollout target rolls", timeout, || async {
        let Some(obj) = env.api.get("apps/v1", "Deployment", Some(ns), deployment) else {
            bail!("Deployment {ns}/{deployment} does not exist");
        };
        Ok((crate::inject::rollout_state(
            crate::api::WorkloadKind::Deployment,
            &obj,
            &key,
            fingerprint,
        ) == crate::inject::Rollout::Complete)
            .then_some(()))
    })
    .await
}
