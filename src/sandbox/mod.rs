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
        match kind.as_str() {
            "StripeKeyPolicy" if policy.is_none() => policy = Some((ns.clone(), obj.name_any())),
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
    let p = wait("the StripeKeyPolicy becomes Ready", timeout, || async {
        let p = policies.get(&name).await?;
        let s = p.status.clone().unwrap_or_default();
        if let Some((status, message)) = ready_condition(&s.conditions)
            && status == "False"
        {
            bail!("StripeKeyPolicy {ns}/{name} was refused: {message}");
        }
        Ok((conditions::is_true(&s.conditions, "Ready") && s.rotation.is_none()).then_some(p))
    })
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
