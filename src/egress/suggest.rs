//! `stripe-key-operator permissions suggest`: reads the egress proxy's usage reports (its
//! `/usage` JSON), merges them, and prints the least permission set that would have served the
//! requests, with the diff against a policy's `permissions`: evidence to shrink an over-broad key.
//!
//! A report:
//! `{"routesVersion":"...","since":"<rfc3339>","permissions":{"<perm>":{"count":N,"lastSeen":"<rfc3339>"}},"refused":{"<perm>":{"count":N,"lastSeen":"<rfc3339>"}}}`
//! where `permissions` counts the served requests by the permission their route needs and
//! `refused` the requests answered locally with 403 by the permission they lacked.
//!
//! Stripe's `<resource>_write` also grants `<resource>_read`: a resource used for both counts
//! once, as its write.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::io::Read;
use std::path::PathBuf;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Flags of `stripe-key-operator permissions`.
#[derive(clap::Args, Debug, Clone)]
pub struct PermissionsArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: PermissionsCommand,
}

/// Subcommands of `stripe-key-operator permissions`.
#[derive(clap::Subcommand, Debug, Clone)]
pub enum PermissionsCommand {
    /// Print the least permission set that would have served the requests in egress usage
    /// reports (files, or `-` for standard input), and its diff against a policy.
    Suggest(SuggestArgs),
}

/// Flags of `stripe-key-operator permissions suggest`.
#[derive(clap::Args, Debug, Clone)]
pub struct SuggestArgs {
    /// Usage reports (the egress proxy's `/usage` JSON); `-` reads standard input.
    #[arg(required = true, value_name = "REPORT")]
    pub reports: Vec<PathBuf>,
    /// A StripeKeyPolicy manifest (YAML) to compare with.
    #[arg(long, value_name = "FILE", conflicts_with = "from_cluster")]
    pub policy: Option<PathBuf>,
    /// Compare with this StripeKeyPolicy in the cluster (`NAMESPACE/NAME`, via KUBECONFIG).
    #[arg(long, value_name = "NAMESPACE/NAME")]
    pub from_cluster: Option<String>,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value = "text")]
    pub output: OutputFormat,
}

/// Output formats.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    /// For people.
    Text,
    /// For scripts.
    Json,
}

/// Use of one permission.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Usage {
    /// Requests.
    pub count: u64,
    /// The latest request.
    pub last_seen: DateTime<Utc>,
}

/// One usage report, as the egress proxy's `/usage` serves it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct UsageReport {
    /// Version of the route table that mapped requests to permissions.
    pub routes_version: String,
    /// Since when the proxy has counted.
    pub since: DateTime<Utc>,
    /// Served requests, by the permission their route needs.
    pub permissions: BTreeMap<String, Usage>,
    /// Requests refused locally (403), by the permission they lacked.
    #[serde(default)]
    pub refused: BTreeMap<String, Usage>,
}

/// A usage report that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SuggestError {
    /// The file could not be read.
    #[error("cannot read usage report {source_name}: {error}")]
    Read {
        /// The file (or `standard input`).
        source_name: String,
        /// Why.
        error: std::io::Error,
    },
    /// Not the JSON shape of a usage report.
    #[error(
        "{source_name} is not a usage report ({error}); expected the egress proxy's /usage JSON: \
         {{\"routesVersion\":\"...\",\"since\":\"<rfc3339>\",\"permissions\":{{\"<perm>\":{{\"count\":N,\"lastSeen\":\"<rfc3339>\"}}}},\"refused\":{{...}}}}"
    )]
    Parse {
        /// The file.
        source_name: String,
        /// The parser's message (line and column).
        error: serde_json::Error,
    },
    /// A key that is not a permission name.
    #[error(
        "{source_name}: {name:?} in {section} is not a permission name (<resource>_read or <resource>_write)"
    )]
    BadPermission {
        /// The file.
        source_name: String,
        /// `permissions` or `refused`.
        section: &'static str,
        /// The name.
        name: String,
    },
    /// The policy manifest.
    #[error("policy {source_name}: {message}")]
    Policy {
        /// The file or object.
        source_name: String,
        /// What is wrong.
        message: String,
    },
}

/// Whether `p` has the shape of a permission name, `<resource>_read` or `<resource>_write` in
/// lower case (the CRD's pattern; catalogue membership is not required).
pub fn valid_permission(p: &str) -> bool {
    let base = p.strip_suffix("_read").or_else(|| p.strip_suffix("_write"));
    matches!(base, Some(b) if !b.is_empty()
        && b.as_bytes()[0].is_ascii_lowercase()
        && b.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_'))
}

/// Parses one report from `text`; `source_name` names it in errors.
pub fn parse_report(source_name: &str, text: &str) -> Result<UsageReport, SuggestError> {
    let report: UsageReport = serde_json::from_str(text).map_err(|error| SuggestError::Parse {
        source_name: source_name.to_string(),
        error,
    })?;
    for (section, map) in [
        ("permissions", &report.permissions),
        ("refused", &report.refused),
    ] {
        if let Some(name) = map.keys().find(|k| !valid_permission(k)) {
            return Err(SuggestError::BadPermission {
                source_name: source_name.to_string(),
                section,
                name: name.clone(),
            });
        }
    }
    Ok(report)
}

/// Several reports merged: counts added, the latest `lastSeen` and the earliest `since` kept.
#[derive(Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MergedUsage {
    /// How many reports.
    pub reports: usize,
    /// The route table versions seen (more than one: the reports span an upgrade).
    pub routes_versions: Vec<String>,
    /// The earliest `since`.
    pub since: Option<DateTime<Utc>>,
    /// Served requests by permission.
    pub permissions: BTreeMap<String, Usage>,
    /// Refused requests by permission.
    pub refused: BTreeMap<String, Usage>,
}

fn add(into: &mut BTreeMap<String, Usage>, from: &BTreeMap<String, Usage>) {
    for (p, u) in from {
        into.entry(p.clone())
            .and_modify(|e| {
                e.count = e.count.saturating_add(u.count);
                e.last_seen = e.last_seen.max(u.last_seen);
            })
            .or_insert_with(|| u.clone());
    }
}

/// Merges `reports`.
pub fn merge(reports: &[UsageReport]) -> MergedUsage {
    let mut m = MergedUsage {
        reports: reports.len(),
        routes_versions: Vec::new(),
        since: None,
        permissions: BTreeMap::new(),
        refused: BTreeMap::new(),
    };
    let mut versions = BTreeSet::new();
    for r in reports {
        versions.insert(r.routes_version.clone());
        m.since = Some(m.since.map_or(r.since, |s| s.min(r.since)));
        add(&mut m.permissions, &r.permissions);
        add(&mut m.refused, &r.refused);
    }
    m.routes_versions = versions.into_iter().collect();
    m
}

/// The least permission set that grants every permission in `used` (names with a zero count are
/// not used): per resource its write if the write was used, else its read. Sorted.
pub fn least_set<'a>(used: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    let used: BTreeSet<&str> = used.into_iter().collect();
    used.iter()
        .filter(|p| match p.strip_suffix("_read") {
            Some(resource) => !used.contains(format!("{resource}_write").as_str()),
            None => true,
        })
        .map(|p| p.to_string())
        .collect()
}

/// Whether `held` grants `needed` (`x_write` grants `x_read`).
pub fn grants(held: &[String], needed: &str) -> bool {
    // one rule for the broker, the simulator and this report
    super::routes::grants(held, needed)
}

/// The suggested set against a policy's `permissions`.
#[derive(Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PolicyDiff {
    /// `NAMESPACE/NAME` or the file.
    pub policy: String,
    /// The policy's permissions, sorted.
    pub current: Vec<String>,
    /// In both.
    pub keep: Vec<String>,
    /// In the policy, not needed by any served request.
    pub remove: Vec<String>,
    /// Needed, not in the policy: usually the read that replaces a write used only for reads
    /// (`charge_read` for `charge_write`).
    pub add: Vec<String>,
    /// Permissions that refused requests lacked and the policy does not grant: add them only if
    /// those requests should have succeeded.
    pub refused: Vec<String>,
}

/// What `permissions suggest` prints.
#[derive(Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Suggestion {
    /// The merged reports.
    pub usage: MergedUsage,
    /// The least set serving every served request.
    pub suggested: Vec<String>,
    /// Against the policy, when one was given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub diff: Option<PolicyDiff>,
}

/// The suggestion for `reports`, compared with `policy` (`(name, permissions)`) if given.
pub fn suggest(reports: &[UsageReport], policy: Option<(String, Vec<String>)>) -> Suggestion {
    let usage = merge(reports);
    let suggested = least_set(
        usage
            .permissions
            .iter()
            .filter(|(_, u)| u.count > 0)
            .map(|(p, _)| p.as_str()),
    );
    let diff = policy.map(|(name, current)| {
        let current: Vec<String> = current
            .into_iter()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        PolicyDiff {
            keep: suggested
                .iter()
                .filter(|p| current.contains(p))
                .cloned()
                .collect(),
            remove: current
                .iter()
                .filter(|p| !suggested.contains(p))
                .cloned()
                .collect(),
            add: suggested
                .iter()
                .filter(|p| !current.contains(p))
                .cloned()
                .collect(),
            refused: usage
                .refused
                .iter()
                .filter(|(p, u)| u.count > 0 && !grants(&current, p))
                .map(|(p, _)| p.clone())
                .collect(),
            policy: name,
            current,
        }
    });
    Suggestion {
        usage,
        suggested,
        diff,
    }
}

fn when(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// The text form.
pub fn render_text(s: &Suggestion) -> String {
    let mut out = String::new();
    let u = &s.usage;
    let served: u64 = u.permissions.values().map(|x| x.count).sum();
    let refused: u64 = u.refused.values().map(|x| x.count).sum();
    let _ = writeln!(
        out,
        "{} usage report{} since {} (routes {}): {served} requests served, {refused} refused",
        u.reports,
        if u.reports == 1 { "" } else { "s" },
        u.since.as_ref().map_or_else(|| "-".into(), when),
        u.routes_versions.join(", ")
    );
    if u.routes_versions.len() > 1 {
        let _ = writeln!(
            out,
            "note: the reports come from different route tables; a route may map to another permission in each"
        );
    }
    let _ = writeln!(out, "\nleast permission set ({}):", s.suggested.len());
    if s.suggested.is_empty() {
        let _ = writeln!(out, "  (none: no request was served)");
    }
    for p in &s.suggested {
        let also_read = p
            .strip_suffix("_write")
            .map(|r| format!("{r}_read"))
            .and_then(|r| u.permissions.get(&r).map(|x| (r, x.count)));
        let use_ = &u.permissions[p];
        let _ = write!(
            out,
            "  {p:<32} {:>9} requests, last {}",
            use_.count,
            when(&use_.last_seen)
        );
        if let Some((r, n)) = also_read {
            let _ = write!(out, " (also serves {n} {r})");
        }
        let _ = writeln!(out);
    }
    if !u.refused.is_empty() {
        let _ = writeln!(
            out,
            "\nrefused locally (the key lacked these; not in the set above):"
        );
        for (p, x) in &u.refused {
            let _ = writeln!(
                out,
                "  {p:<32} {:>9} requests, last {}",
                x.count,
                when(&x.last_seen)
            );
        }
    }
    if let Some(d) = &s.diff {
        let _ = writeln!(out, "\nagainst policy {}:", d.policy);
        let list = |v: &[String]| {
            if v.is_empty() {
                "-".to_string()
            } else {
                v.join(" ")
            }
        };
        let _ = writeln!(out, "  keep:    {}", list(&d.keep));
        let _ = writeln!(out, "  remove:  {}", list(&d.remove));
        let _ = writeln!(out, "  add:     {}", list(&d.add));
        for p in &d.add {
            let write = p.strip_suffix("_read").map(|r| format!("{r}_write"));
            if let Some(w) = write.filter(|w| d.remove.contains(w)) {
                let _ = writeln!(out, "           ({p} replaces {w}: only reads were served)");
            }
        }
        if !d.refused.is_empty() {
            let _ = writeln!(
                out,
                "  refused: {} (requests were refused for these; add them only if those requests should succeed)",
                d.refused.join(" ")
            );
        }
        if d.remove.is_empty() && d.add.is_empty() {
            let _ = writeln!(out, "  the policy is already the least set");
        }
    }
    out
}

/// Reads one report from `path` (`-`: standard input).
pub fn read_report(path: &std::path::Path) -> Result<UsageReport, SuggestError> {
    let (name, text) = if path.as_os_str() == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(|error| SuggestError::Read {
                source_name: "standard input".into(),
                error,
            })?;
        ("standard input".to_string(), text)
    } else {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|error| SuggestError::Read {
            source_name: name.clone(),
            error,
        })?;
        (name, text)
    };
    parse_report(&name, &text)
}

/// The `spec.permissions` of the StripeKeyPolicy in a YAML manifest (one document, or several of
/// which exactly one is a StripeKeyPolicy).
pub fn policy_permissions(
    source_name: &str,
    yaml: &str,
) -> Result<(String, Vec<String>), SuggestError> {
    let err = |message: String| SuggestError::Policy {
        source_name: source_name.to_string(),
        message,
    };
    let mut found = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(yaml) {
        let value = serde_yaml::Value::deserialize(doc).map_err(|e| err(e.to_string()))?;
        if value.get("kind").and_then(|k| k.as_str()) == Some("StripeKeyPolicy") {
            found.push(value);
        }
    }
    let policy = match found.len() {
        1 => found.remove(0),
        0 => return Err(err("no StripeKeyPolicy in the file".into())),
        n => {
            return Err(err(format!(
                "{n} StripeKeyPolicy documents: pass a file with one"
            )));
        }
    };
    let meta = |k: &str| {
        policy
            .get("metadata")
            .and_then(|m| m.get(k))
            .and_then(|v| v.as_str())
            .map(str::to_string)
    };
    let name = match (meta("namespace"), meta("name")) {
        (Some(ns), Some(n)) => format!("{ns}/{n}"),
        (None, Some(n)) => n,
        _ => source_name.to_string(),
    };
    let perms = policy
        .get("spec")
        .and_then(|s| s.get("permissions"))
        .and_then(|p| p.as_sequence())
        .ok_or_else(|| err("spec.permissions is missing or not a list".into()))?;
    let perms = perms
        .iter()
        .map(|p| {
            p.as_str()
                .filter(|p| valid_permission(p))
                .map(str::to_string)
                .ok_or_else(|| err(format!("spec.permissions: {p:?} is not a permission name")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((name, perms))
}

async fn cluster_permissions(target: &str) -> anyhow::Result<(String, Vec<String>)> {
    let (ns, name) = target
        .split_once('/')
        .filter(|(ns, n)| !ns.is_empty() && !n.is_empty() && !n.contains('/'))
        .ok_or_else(|| anyhow::anyhow!("--from-cluster {target:?}: expected NAMESPACE/NAME"))?;
    crate::controller::install_crypto_provider();
    let client = kube::Client::try_default().await.map_err(|e| {
        anyhow::anyhow!(
            "cannot reach the Kubernetes API ({}); set KUBECONFIG or run inside a cluster",
            e.to_string()
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        )
    })?;
    let api: kube::Api<crate::api::StripeKeyPolicy> = kube::Api::namespaced(client, ns);
    let policy = api.get(name).await.map_err(|e| {
        anyhow::anyhow!(crate::rotate_cli::kube_error_line(
            &e,
            &crate::rotate_cli::ObjectName {
                kind: "StripeKeyPolicy",
                plural: "stripekeypolicies",
                name,
                namespace: ns,
            }
        ))
    })?;
    Ok((format!("{ns}/{name}"), policy.spec.permissions))
}

/// Runs `permissions ...`.
pub async fn run_cli(args: PermissionsArgs) -> anyhow::Result<()> {
    match args.command {
        PermissionsCommand::Suggest(args) => run_suggest(args).await,
    }
}

async fn run_suggest(args: SuggestArgs) -> anyhow::Result<()> {
    if args.reports.iter().filter(|p| p.as_os_str() == "-").count() > 1 {
        anyhow::bail!("standard input (-) can be read only once");
    }
    let reports = args
        .reports
        .iter()
        .map(|p| read_report(p))
        .collect::<Result<Vec<_>, _>>()?;
    let policy = match (&args.policy, &args.from_cluster) {
        (Some(file), _) => {
            let name = file.display().to_string();
            let yaml = std::fs::read_to_string(file).map_err(|e| SuggestError::Policy {
                source_name: name.clone(),
                message: format!("cannot read it: {e}"),
            })?;
            Some(policy_permissions(&name, &yaml)?)
        }
        (None, Some(target)) => Some(cluster_permissions(target).await?),
        (None, None) => None,
    };
    let s = suggest(&reports, policy);
    match args.output {
        OutputFormat::Text => print!("{}", render_text(&s)),
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&s)?),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_covers_its_read_and_counts_once() {
        assert_eq!(
            least_set([
                "charge_read",
                "charge_write",
                "customer_read",
                "refund_write"
            ]),
            vec!["charge_write", "customer_read", "refund_write"]
        );
    }

    #[test]
    fn grants_follows_write_implies_read() {
        let held = vec!["charge_write".to_string()];
        assert!(grants(&held, "charge_read"));
        assert!(grants(&held, "charge_write"));
        assert!(!grants(&held, "refund_read"));
        assert!(!grants(&["charge_read".to_string()], "charge_write"));
    }

    #[test]
    fn policy_manifests_give_their_permissions() {
        let yaml = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n---\napiVersion: stripekeys.io/v1alpha1\nkind: StripeKeyPolicy\nmetadata: {name: checkout, namespace: shop}\nspec:\n  permissions: [charge_write, refund_write]\n";
        let (name, perms) = policy_permissions("p.yaml", yaml).unwrap();
        assert_eq!(name, "shop/checkout");
        assert_eq!(perms, vec!["charge_write", "refund_write"]);
        assert!(policy_permissions("p.yaml", "kind: ConfigMap\n").is_err());
        assert!(
            policy_permissions("p.yaml", "kind: StripeKeyPolicy\nspec: {}\n")
                .unwrap_err()
                .to_string()
                .contains("spec.permissions")
        );
    }
}
