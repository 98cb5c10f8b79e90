//! Replicas that share the work (issue 17 §4): three operator *processes* (the built binary)
//! against the Kubernetes API for tests, served over HTTP on 127.0.0.1, and the Stripe simulator,
//! with `--shards 6` and short lease settings.
//!
//! - 300 policies in 30 namespaces all become Ready, with one mint each (the simulator's log);
//! - every reconcile ran on the replica that held the policy's shard at the time, and no policy
//!   was reconciled by two replicas at once (each replica logs, as JSON, when it takes or stops
//!   acting on a shard and when each reconcile starts and ends: the intervals are compared);
//! - one replica is killed (SIGKILL): its shards move to the two others once their leases
//!   expire, and an incident rotation of a policy in a moved shard completes;
//! - a fourth replica starts: the others give shards up after the grace period and it takes
//!   them, reconciling their objects at once; a policy created in one of them is minted by it;
//! - a replica started with another shard count makes every replica stop acting until it is
//!   gone (it maps namespaces differently);
//! - SIGTERM: every replica gives its shards up and exits 0.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, ListParams, Patch, PatchParams};
use serde_json::{Value, json};
use stripe_key_operator::api::{StripeKeyPolicy, conditions};
use stripe_key_operator::sandbox::env::{EnvOptions, LocalEnv, OPERATOR_NAMESPACE};
use stripe_key_operator::shard::shard_of;

const BIN: &str = env!("CARGO_BIN_EXE_stripe-key-operator");
const ACCOUNT: &str = "payments-test";
const SHARDS: u32 = 6;
const PREFIX: &str = "sko";
const NAMESPACES: usize = 30;
const PER_NAMESPACE: usize = 10;
/// Short, but long enough that renewals keep up on a loaded 2-core machine, where the
/// Kubernetes API for tests (serving four operator processes in a debug build) may take a
/// second to answer.
const LEASE_DURATION: Duration = Duration::from_secs(10);
const LEASE_FLAGS: [&str; 6] = [
    "--lease-duration",
    "10s",
    "--renew-deadline",
    "6s",
    "--retry-period",
    "1s",
];

struct Replica {
    name: String,
    child: Option<tokio::process::Child>,
    log: PathBuf,
    /// When the process was known to have exited (killed or stopped).
    ended: Option<DateTime<Utc>>,
}

fn spawn_replica(name: &str, kubeconfig: &Path, dir: &Path) -> Replica {
    spawn_replica_with(name, kubeconfig, dir, SHARDS)
}

fn spawn_replica_with(name: &str, kubeconfig: &Path, dir: &Path, shards: u32) -> Replica {
    let log = dir.join(format!("{name}.log"));
    let file = std::fs::File::create(&log).unwrap();
    let child = tokio::process::Command::new(BIN)
        .arg("run")
        .args(["--pod-name", name])
        .args(["--namespace", OPERATOR_NAMESPACE])
        .args(["--http-addr", "127.0.0.1:0"])
        .args(["--webhook-cert-mode", "disabled"])
        .args(["--store", "kubernetes"])
        .args(["--audit-log", "off"])
        .args(["--allow-loopback-api", "true"])
        .args(["--log-format", "json"])
        .args(["--shards", &shards.to_string()])
        .args(["--shard-lease-prefix", PREFIX])
        .args(LEASE_FLAGS)
        .env("KUBECONFIG", kubeconfig)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env(
            "RUST_LOG",
            "warn,stripe_key_operator=info,stripe_key_operator::shard=debug",
        )
        .stdout(std::process::Stdio::null())
        .stderr(file)
        .kill_on_drop(true)
        .spawn()
        .expect("the operator binary starts");
    Replica {
        name: name.into(),
        child: Some(child),
        log,
        ended: None,
    }
}

/// Policies per namespace: 10, or fewer with `SHARDING_TEST_PER_NAMESPACE` (to debug).
fn per_namespace() -> usize {
    std::env::var("SHARDING_TEST_PER_NAMESPACE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(PER_NAMESPACE)
        .min(PER_NAMESPACE)
}

fn namespace(i: usize) -> String {
    format!("team-{i:02}")
}

fn policy(ns: &str, name: &str) -> Value {
    json!({
        "apiVersion": "stripekeys.io/v1alpha1", "kind": "StripeKeyPolicy",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "accountRef": {"name": ACCOUNT},
            "permissions": ["charge_read"],
            "delivery": {"secret": {"name": format!("{name}-stripe-key")}},
            "rotation": {"every": "720h", "overlap": "1h"}
        }
    })
}

fn ready(p: &StripeKeyPolicy) -> bool {
    p.status
        .as_ref()
        .is_some_and(|s| conditions::is_true(&s.conditions, "Ready") && s.rotation.is_none())
}

async fn all_policies(env: &LocalEnv) -> Vec<StripeKeyPolicy> {
    Api::<StripeKeyPolicy>::all(env.client.clone())
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
}

/// The holder of each shard Lease (`None`: free or released).
async fn shard_holders(env: &LocalEnv) -> Vec<Option<String>> {
    let api: Api<Lease> = Api::namespaced(env.client.clone(), OPERATOR_NAMESPACE);
    let mut out = Vec::new();
    for i in 0..SHARDS {
        out.push(
            api.get_opt(&format!("{PREFIX}-shard-{i}"))
                .await
                .unwrap()
                .and_then(|l| l.spec?.holder_identity)
                .filter(|h| !h.is_empty()),
        );
    }
    out
}

async fn wait_for<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// One line of a replica's JSON log that the shard target wrote.
#[derive(Debug, Clone)]
struct ShardLine {
    at: DateTime<Utc>,
    event: String,
    shard: u32,
    object: Option<(String, String)>,
}

fn shard_lines(replica: &Replica) -> Vec<ShardLine> {
    let text = std::fs::read_to_string(&replica.log).unwrap();
    text.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["target"] == "stripe_key_operator::shard")
        .filter_map(|v| {
            let event = v["event"].as_str()?.to_string();
            Some(ShardLine {
                at: DateTime::parse_from_rfc3339(v["timestamp"].as_str()?)
                    .ok()?
                    .with_timezone(&Utc),
                shard: v["shard"].as_u64()? as u32,
                object: v["name"].as_str().map(|n| {
                    (
                        v["namespace"].as_str().unwrap_or_default().to_string(),
                        n.to_string(),
                    )
                }),
                event,
            })
        })
        .collect()
}

/// A namespace and a name.
type Object = (String, String);

/// A span of time, closed or open-ended (a killed process logs no end).
#[derive(Debug, Clone, Copy)]
struct Span {
    from: DateTime<Utc>,
    to: DateTime<Utc>,
}

impl Span {
    fn overlaps(&self, other: &Span) -> bool {
        self.from < other.to && other.from < self.to
    }
}

/// What one replica's log says: the spans in which it acted on each shard (from `acquired` to
/// `stopped`, stretched to the end of any reconcile of that holding) and its reconciles.
struct Activity {
    holdings: BTreeMap<u32, Vec<Span>>,
    reconciles: Vec<(u32, (String, String), Span)>,
    acquired: Vec<(u32, DateTime<Utc>)>,
}

fn activity(replica: &Replica) -> Activity {
    let end = replica.ended.unwrap_or_else(Utc::now);
    let lines = shard_lines(replica);
    let mut holdings: BTreeMap<u32, Vec<Span>> = BTreeMap::new();
    let mut open: BTreeMap<u32, DateTime<Utc>> = BTreeMap::new();
    let mut running: BTreeMap<Object, Vec<(u32, DateTime<Utc>)>> = BTreeMap::new();
    let mut reconciles = Vec::new();
    let mut acquired = Vec::new();
    for l in &lines {
        match (l.event.as_str(), &l.object) {
            ("acquired", _) => {
                assert!(
                    open.insert(l.shard, l.at).is_none(),
                    "{}: shard {} acquired twice without stopping",
                    replica.name,
                    l.shard
                );
                acquired.push((l.shard, l.at));
            }
            ("stopped", _) => {
                let from = open.remove(&l.shard).unwrap_or_else(|| {
                    panic!(
                        "{}: stopped shard {} it did not hold",
                        replica.name, l.shard
                    )
                });
                holdings
                    .entry(l.shard)
                    .or_default()
                    .push(Span { from, to: l.at });
            }
            ("reconcile-start", Some(o)) => {
                running.entry(o.clone()).or_default().push((l.shard, l.at));
            }
            ("reconcile-end", Some(o)) => {
                let starts = running.get_mut(o).expect("an end follows its start");
                let (shard, from) = starts.remove(0);
                reconciles.push((shard, o.clone(), Span { from, to: l.at }));
            }
            _ => {}
        }
    }
    for (shard, from) in open {
        holdings
            .entry(shard)
            .or_default()
            .push(Span { from, to: end });
    }
    for (o, starts) in running {
        for (shard, from) in starts {
            reconciles.push((shard, o.clone(), Span { from, to: end }));
        }
    }
    // A holding lasts until the last reconcile begun in it has ended (a dropped reconcile ends
    // just after the shard is stopped).
    for (shard, _, r) in &reconciles {
        if let Some(h) = holdings
            .get_mut(shard)
            .and_then(|hs| hs.iter_mut().find(|h| h.from <= r.from && r.from <= h.to))
        {
            h.to = h.to.max(r.to);
        }
    }
    Activity {
        holdings,
        reconciles,
        acquired,
    }
}

/// The checks over every replica's log: reconciles only inside a holding of their shard, no
/// two replicas holding a shard at once, no object reconciled by two replicas at once.
fn check_no_overlap(replicas: &[Replica]) -> BTreeMap<String, Activity> {
    let acts: BTreeMap<String, Activity> = replicas
        .iter()
        .map(|r| (r.name.clone(), activity(r)))
        .collect();
    let mut total = 0;
    for (name, a) in &acts {
        for (shard, (ns, obj), span) in &a.reconciles {
            total += 1;
            assert_eq!(
                *shard,
                shard_of(ns, SHARDS),
                "{name}: {ns}/{obj} in the wrong shard"
            );
            assert!(
                a.holdings
                    .get(shard)
                    .is_some_and(|hs| hs.iter().any(|h| h.from <= span.from && span.from <= h.to)),
                "{name} reconciled {ns}/{obj} (shard {shard}) at {} without holding the shard",
                span.from
            );
        }
    }
    assert!(
        total >= NAMESPACES * per_namespace(),
        "the reconciles were logged ({total})"
    );
    let names: Vec<&String> = acts.keys().collect();
    for (i, a) in names.iter().enumerate() {
        for b in &names[i + 1..] {
            for (shard, hs) in &acts[*a].holdings {
                for h in hs {
                    for other in acts[*b].holdings.get(shard).into_iter().flatten() {
                        assert!(
                            !h.overlaps(other),
                            "shard {shard} held by {a} {h:?} and by {b} {other:?} at once"
                        );
                    }
                }
            }
            let by_object = |n: &str| {
                let mut m: BTreeMap<(String, String), Vec<Span>> = BTreeMap::new();
                for (_, o, s) in &acts[n].reconciles {
                    m.entry(o.clone()).or_default().push(*s);
                }
                m
            };
            let (ma, mb) = (by_object(a), by_object(b));
            for (o, spans) in &ma {
                for s in spans {
                    for t in mb.get(o).into_iter().flatten() {
                        assert!(
                            !s.overlaps(t),
                            "{o:?} reconciled by {a} {s:?} and by {b} {t:?} at once"
                        );
                    }
                }
            }
        }
    }
    acts
}

fn mints(env: &LocalEnv) -> Vec<stripe_key_operator::sim::RequestLogEntry> {
    env.sim
        .request_log()
        .into_iter()
        .filter(|r| r.method == "POST" && r.path == "/v2/iam/api_keys")
        .collect()
}

async fn sigterm(replica: &mut Replica) {
    let child = replica.child.as_mut().unwrap();
    let pid = child.id().unwrap().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
}

/// The flags of `stripe-key-operator run`, parsed as the binary parses them.
#[derive(clap::Parser)]
struct Wrapper {
    #[command(flatten)]
    config: stripe_key_operator::controller::RunConfig,
}

fn run_config(extra: &[&str]) -> Result<stripe_key_operator::controller::RunConfig, clap::Error> {
    use clap::Parser;
    let mut args = vec!["run", "--pod-name", "replica-a"];
    args.extend_from_slice(extra);
    Wrapper::try_parse_from(args).map(|w| w.config)
}

#[test]
fn one_shard_is_a_single_leader_and_more_need_leases_with_the_leader_timing_rules() {
    use stripe_key_operator::controller::RunError;
    assert!(
        run_config(&[]).unwrap().shard_config().unwrap().is_none(),
        "default: one leader"
    );
    let c = run_config(&[
        "--shards",
        "6",
        "--shard-lease-prefix",
        "sko",
        "--lease-duration",
        "10s",
        "--renew-deadline",
        "6s",
        "--retry-period",
        "1s",
    ])
    .unwrap()
    .shard_config()
    .unwrap()
    .expect("sharding");
    assert_eq!(
        (c.shards, c.prefix.as_str(), c.identity.as_str()),
        (6, "sko", "replica-a")
    );
    assert_eq!(c.shard_lease(5), "sko-shard-5");
    assert_eq!(c.lease_duration, Duration::from_secs(10));
    assert!(run_config(&["--shards", "0"]).is_err());
    assert!(run_config(&["--shards", "257"]).is_err());
    let err = run_config(&["--shards", "3", "--leader-elect", "false"])
        .unwrap()
        .shard_config()
        .unwrap_err();
    assert!(
        matches!(err, RunError::Settings(ref m) if m.contains("--leader-elect")),
        "{err}"
    );
    let err = run_config(&[
        "--shards",
        "3",
        "--lease-duration",
        "10s",
        "--renew-deadline",
        "10s",
    ])
    .unwrap()
    .shard_config()
    .unwrap_err();
    assert!(
        matches!(err, RunError::Settings(ref m) if m.contains("--renew-deadline")),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_share_the_policies_by_shard_and_hand_shards_over_when_one_dies_or_joins() {
    let env = LocalEnv::start(EnvOptions {
        // Each replica has its own per-account limiter: Stripe's test-mode floor is not the
        // subject here.
        sim_rate_limit_test: 2000,
        ..EnvOptions::default()
    })
    .await
    .unwrap();
    let mut dir = tempfile::tempdir().unwrap();
    // `SHARDING_TEST_KEEP_LOGS=1` keeps the replicas' logs for a look afterwards.
    dir.disable_cleanup(std::env::var_os("SHARDING_TEST_KEEP_LOGS").is_some());
    eprintln!("replica logs in {}", dir.path().display());
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, env.api.kubeconfig_yaml()).unwrap();
    let selector = json!({"matchLabels": {"stripekeys.io/account": ACCOUNT}});
    env.apply_json(&env.account_manifest(ACCOUNT, selector))
        .await
        .unwrap();
    for i in 0..NAMESPACES {
        env.apply_json(&json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": namespace(i), "labels": {"stripekeys.io/account": ACCOUNT}}}))
            .await
            .unwrap();
    }
    let mut shards_used = BTreeSet::new();
    for i in 0..NAMESPACES {
        shards_used.insert(shard_of(&namespace(i), SHARDS));
    }
    assert_eq!(
        shards_used.len(),
        SHARDS as usize,
        "every shard has namespaces"
    );

    // Three replicas take two shards each.
    let mut replicas: Vec<Replica> = ["replica-a", "replica-b", "replica-c"]
        .iter()
        .map(|n| spawn_replica(n, &kubeconfig, dir.path()))
        .collect();
    let holders = wait_for(
        "three replicas hold two shards each",
        Duration::from_secs(60),
        || async {
            let h = shard_holders(&env).await;
            let mut count: BTreeMap<String, usize> = BTreeMap::new();
            for x in h.iter().flatten() {
                *count.entry(x.clone()).or_default() += 1;
            }
            (count.len() == 3 && count.values().all(|c| *c == 2)).then_some(h)
        },
    )
    .await;
    eprintln!("shards: {holders:?}");

    // 300 policies.
    let started = Instant::now();
    for i in 0..NAMESPACES {
        for k in 0..PER_NAMESPACE {
            if k >= per_namespace() {
                break;
            }
            env.apply_json(&policy(&namespace(i), &format!("p{k}")))
                .await
                .unwrap();
        }
    }
    let total = NAMESPACES * per_namespace();
    // Generous: on the shared 2-core machine the API for tests (debug build, serving three
    // processes) is the bottleneck; a run took 260 s here.
    let deadline = Instant::now() + Duration::from_secs(480);
    let policies = loop {
        let ps = all_policies(&env).await;
        if ps.len() == total && ps.iter().all(ready) {
            break ps;
        }
        if Instant::now() > deadline {
            let waiting: Vec<_> = ps.iter().filter(|p| !ready(p)).collect();
            for r in &replicas {
                let text = std::fs::read_to_string(&r.log).unwrap();
                let noisy: Vec<&str> = text
                    .lines()
                    .filter(|l| l.contains("WARN") || l.contains("ERROR"))
                    .collect();
                eprintln!("{}: {} warnings/errors; last:", r.name, noisy.len());
                for l in noisy.iter().rev().take(5) {
                    eprintln!("  {l}");
                }
            }
            panic!(
                "{} of {total} policies not Ready after 480 s; e.g. {:#?}",
                waiting.len(),
                waiting
                    .first()
                    .map(|p| (&p.metadata.namespace, &p.metadata.name, &p.status))
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    eprintln!("{total} policies Ready in {:?}", started.elapsed());
    let minted = mints(&env);
    let keys: BTreeSet<String> = policies
        .iter()
        .map(|p| {
            p.status
                .as_ref()
                .unwrap()
                .current_key
                .as_ref()
                .unwrap()
                .id
                .clone()
        })
        .collect();
    assert_eq!(keys.len(), total, "one key per policy");
    // A reconcile dropped with its shard after its create was sent replays the same
    // idempotency key later: Stripe answers with the same key, no new one.
    let replays = minted.iter().filter(|m| m.replayed).count();
    eprintln!("{} mint requests, {replays} of them replays", minted.len());
    assert_eq!(minted.len() - replays, total, "one mint per policy");
    let idempotency: BTreeSet<_> = minted.iter().map(|m| m.idempotency_key.clone()).collect();
    assert_eq!(idempotency.len(), total, "no policy was minted twice");
    check_no_overlap(&replicas);

    // Kill replica-c: its shards move to a and b once their leases expire.
    let victim_shards: Vec<u32> = shard_holders(&env)
        .await
        .iter()
        .enumerate()
        .filter(|(_, h)| h.as_deref() == Some("replica-c"))
        .map(|(i, _)| i as u32)
        .collect();
    assert_eq!(victim_shards.len(), 2);
    {
        let c = &mut replicas[2];
        c.child.as_mut().unwrap().kill().await.unwrap();
        c.ended = Some(Utc::now());
    }
    let killed = Instant::now();
    wait_for(
        "c's shards are taken over",
        Duration::from_secs(30),
        || async {
            let h = shard_holders(&env).await;
            victim_shards
                .iter()
                .all(|&i| matches!(h[i as usize].as_deref(), Some("replica-a" | "replica-b")))
                .then_some(())
        },
    )
    .await;
    let moved_after = killed.elapsed();
    eprintln!("c's shards moved {moved_after:?} after it was killed");
    assert!(
        moved_after < LEASE_DURATION * 2,
        "the shards moved within the lease duration plus a few retry periods ({moved_after:?})"
    );
    let holders = shard_holders(&env).await;
    let counts =
        |h: &[Option<String>], who: &str| h.iter().filter(|x| x.as_deref() == Some(who)).count();
    assert_eq!(
        (counts(&holders, "replica-a"), counts(&holders, "replica-b")),
        (3, 3),
        "{holders:?}"
    );

    // An incident rotation of a policy in one of the moved shards completes.
    let ns = (0..NAMESPACES)
        .map(namespace)
        .find(|ns| shard_of(ns, SHARDS) == victim_shards[0])
        .unwrap();
    let api: Api<StripeKeyPolicy> = Api::namespaced(env.client.clone(), &ns);
    let before = api.get("p0").await.unwrap();
    let old_key = before
        .status
        .as_ref()
        .unwrap()
        .current_key
        .clone()
        .unwrap()
        .id;
    api.patch(
        "p0",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"annotations": {
            "stripekeys.io/rotate": "incident-after-kill",
            "stripekeys.io/rotate-reason": "incident"}}})),
    )
    .await
    .unwrap();
    wait_for(
        "the incident rotation completes",
        Duration::from_secs(60),
        || async {
            let p = api.get("p0").await.unwrap();
            let current = p.status.as_ref()?.current_key.as_ref()?.id.clone();
            (ready(&p) && current != old_key).then_some(())
        },
    )
    .await;
    let old = env
        .sim
        .state()
        .account(&env.account_id)
        .unwrap()
        .api_keys
        .iter()
        .find(|k| k.id == old_key)
        .cloned()
        .unwrap();
    assert_eq!(old.status, "expired", "the incident revoked the old key");

    // A fourth replica joins: a and b each give one shard up after the grace period; d takes
    // them and reconciles their objects at once.
    replicas.push(spawn_replica("replica-d", &kubeconfig, dir.path()));
    let joined = Instant::now();
    let holders = wait_for(
        "the shards rebalance onto replica-d",
        Duration::from_secs(60),
        || async {
            let h = shard_holders(&env).await;
            let ok = ["replica-a", "replica-b", "replica-d"]
                .iter()
                .all(|who| h.iter().filter(|x| x.as_deref() == Some(*who)).count() == 2);
            ok.then_some(h)
        },
    )
    .await;
    eprintln!(
        "rebalanced {:?} after replica-d started: {holders:?}",
        joined.elapsed()
    );
    let d_shards: Vec<u32> = holders
        .iter()
        .enumerate()
        .filter(|(_, h)| h.as_deref() == Some("replica-d"))
        .map(|(i, _)| i as u32)
        .collect();
    // Each object of d's shards is reconciled by d soon after it took the shard.
    let in_d: BTreeSet<(String, String)> = policies
        .iter()
        .filter(|p| d_shards.contains(&shard_of(p.metadata.namespace.as_deref().unwrap(), SHARDS)))
        .map(|p| {
            (
                p.metadata.namespace.clone().unwrap(),
                p.metadata.name.clone().unwrap(),
            )
        })
        .collect();
    assert!(!in_d.is_empty());
    wait_for(
        "d reconciles every object of its shards",
        Duration::from_secs(30),
        || async {
            let a = activity(&replicas[3]);
            let seen: BTreeSet<_> = a.reconciles.iter().map(|(_, o, _)| o.clone()).collect();
            in_d.is_subset(&seen).then_some(())
        },
    )
    .await;
    // A new policy in one of d's shards is minted (d is the only one acting there).
    let ns = (0..NAMESPACES)
        .map(namespace)
        .find(|ns| d_shards.contains(&shard_of(ns, SHARDS)))
        .unwrap();
    env.apply_json(&policy(&ns, "late")).await.unwrap();
    let api: Api<StripeKeyPolicy> = Api::namespaced(env.client.clone(), &ns);
    wait_for(
        "the late policy is Ready",
        Duration::from_secs(60),
        || async { api.get_opt("late").await.unwrap().filter(ready).map(|_| ()) },
    )
    .await;
    assert!(
        activity(&replicas[3])
            .reconciles
            .iter()
            .any(|(_, o, _)| o == &(ns.clone(), "late".to_string())),
        "replica-d reconciled the late policy"
    );
    let minted = mints(&env);
    assert_eq!(
        minted.iter().filter(|m| !m.replayed).count(),
        total + 2,
        "one more mint each for the incident and the late policy"
    );

    // A replica started with another shard count (as in a rollout that changes `--shards`)
    // maps namespaces differently: while it is live nobody acts on any shard; once it is gone
    // the others take the shards back.
    let mut odd = spawn_replica_with("replica-x", &kubeconfig, dir.path(), 3);
    wait_for(
        "every shard is given up while replica-x runs",
        Duration::from_secs(30),
        || async {
            shard_holders(&env)
                .await
                .iter()
                .all(Option::is_none)
                .then_some(())
        },
    )
    .await;
    odd.child.as_mut().unwrap().kill().await.unwrap();
    odd.ended = Some(Utc::now());
    assert!(
        shard_lines(&odd).iter().all(|l| l.event != "acquired"),
        "replica-x took no shard either"
    );
    replicas.push(odd);
    wait_for(
        "the shards are held again once replica-x is gone",
        Duration::from_secs(60),
        || async {
            shard_holders(&env)
                .await
                .iter()
                .all(Option::is_some)
                .then_some(())
        },
    )
    .await;

    // SIGTERM: every replica gives its shards up and exits 0.
    for r in replicas.iter_mut().filter(|r| r.ended.is_none()) {
        sigterm(r).await;
    }
    for r in replicas.iter_mut().filter(|r| r.ended.is_none()) {
        let status =
            tokio::time::timeout(Duration::from_secs(40), r.child.as_mut().unwrap().wait())
                .await
                .expect("a replica stops after SIGTERM")
                .unwrap();
        r.ended = Some(Utc::now());
        assert!(status.success(), "{} exited with {status:?}", r.name);
    }
    assert_eq!(
        shard_holders(&env).await,
        vec![None; SHARDS as usize],
        "every shard was released on shutdown"
    );

    let acts = check_no_overlap(&replicas);
    for (name, a) in &acts {
        eprintln!(
            "{name}: {} reconciles, {} shard acquisitions",
            a.reconciles.len(),
            a.acquired.len()
        );
    }
    // No key material in any log: only ids and fingerprints.
    let logs: String = replicas
        .iter()
        .map(|r| std::fs::read_to_string(&r.log).unwrap())
        .collect();
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::all(env.client.clone());
    let mut checked = 0;
    for s in secrets.list(&ListParams::default()).await.unwrap().items {
        for v in s.data.iter().flat_map(|d| d.values()) {
            let v = String::from_utf8_lossy(&v.0);
            if v.starts_with("rk_") || v.starts_with("sk_") {
                checked += 1;
                assert!(!logs.contains(v.as_ref()), "a secret reached a log");
            }
        }
    }
    assert!(
        checked >= total,
        "the synced secrets were checked ({checked})"
    );
}
