//! `stripe-key-operator rotate KIND/NAME -n NS [--incident] [--reason TEXT]`: asks the operator
//! for a rotation by setting the annotations a person would set with `kubectl annotate`.

use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::{Value, json};

use crate::api::{ROTATE_ANNOTATION, ROTATE_REASON_ANNOTATION, ROTATE_REASON_INCIDENT};

/// The annotation carrying a person's free-text reason (shown in the rotation's Event).
pub const ROTATE_NOTE_ANNOTATION: &str = "stripekeys.io/rotate-note";

/// Flags of `stripe-key-operator rotate`.
#[derive(clap::Args, Debug, Clone)]
pub struct RotateArgs {
    /// `stripekeypolicy/NAME` or `stripewebhookendpoint/NAME` (short names `skp/`, `swe/`).
    pub target: String,
    /// Namespace of the resource.
    #[arg(short = 'n', long, default_value = "default")]
    pub namespace: String,
    /// The key is compromised: revoke the old one at once, no overlap.
    #[arg(long)]
    pub incident: bool,
    /// Why (recorded on the resource and in its Event).
    #[arg(long)]
    pub reason: Option<String>,
}

/// The kind's plural for `target`, or an error naming what is accepted.
pub fn parse_target(target: &str) -> anyhow::Result<(&'static str, &'static str, String)> {
    let (kind, name) = target.split_once('/').ok_or_else(|| {
        anyhow::anyhow!("expected KIND/NAME such as stripekeypolicy/checkout, got {target:?}")
    })?;
    let (kind, plural) = match kind.to_ascii_lowercase().as_str() {
        "stripekeypolicy" | "stripekeypolicies" | "skp" => ("StripeKeyPolicy", "stripekeypolicies"),
        "stripewebhookendpoint" | "stripewebhookendpoints" | "swe" => {
            ("StripeWebhookEndpoint", "stripewebhookendpoints")
        }
        other => anyhow::bail!(
            "{other} cannot be rotated: use stripekeypolicy/NAME or stripewebhookendpoint/NAME"
        ),
    };
    if name.is_empty() {
        anyhow::bail!("the name after {kind}/ is empty");
    }
    Ok((kind, plural, name.to_string()))
}

/// The merge patch that requests the rotation. `request` must be new for every request.
pub fn rotation_patch(request: &str, incident: bool, reason: Option<&str>) -> Value {
    let reason_value = if incident {
        json!(ROTATE_REASON_INCIDENT)
    } else {
        Value::Null
    };
    let note = reason.map(|r| json!(r)).unwrap_or(Value::Null);
    json!({"metadata": {"annotations": {
        ROTATE_ANNOTATION: request,
        ROTATE_REASON_ANNOTATION: reason_value,
        ROTATE_NOTE_ANNOTATION: note,
    }}})
}

/// Runs the command against `KUBECONFIG` or the in-cluster config.
pub async fn run(args: RotateArgs) -> anyhow::Result<()> {
    crate::controller::install_crypto_provider();
    let (kind, plural, name) = parse_target(&args.target)?;
    let client = kube::Client::try_default().await.map_err(|e| {
        anyhow::anyhow!(
            "cannot reach the Kubernetes API ({}); set KUBECONFIG or run inside a cluster",
            one_line(&e.to_string())
        )
    })?;
    let ar = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(crate::api::GROUP, crate::api::VERSION, kind),
        plural,
    );
    let api: Api<DynamicObject> = Api::namespaced_with(client, &args.namespace, &ar);
    let request = k8s_openapi::jiff::Timestamp::now().to_string();
    api.patch(
        &name,
        &PatchParams::default(),
        &Patch::Merge(rotation_patch(
            &request,
            args.incident,
            args.reason.as_deref(),
        )),
    )
    .await
    .map_err(|e| {
        anyhow::anyhow!(kube_error_line(
            &e,
            &ObjectName {
                kind,
                plural,
                name: &name,
                namespace: &args.namespace,
            }
        ))
    })?;
    println!(
        "{kind} {}/{name}: {} rotation requested ({ROTATE_ANNOTATION}={request})",
        args.namespace,
        if args.incident { "incident" } else { "routine" }
    );
    Ok(())
}

/// The object a CLI call was about, for its error message.
#[derive(Debug, Clone, Copy)]
pub struct ObjectName<'a> {
    /// `StripeKeyPolicy`.
    pub kind: &'a str,
    /// `stripekeypolicies`.
    pub plural: &'a str,
    /// The object's name.
    pub name: &'a str,
    /// The object's namespace.
    pub namespace: &'a str,
}

/// A failed API call on `obj` as one line in kubectl's words, such as
/// `stripekeypolicy "nope" not found in namespace "shop"`, instead of kube's debug form of
/// the whole `Status`.
pub fn kube_error_line(err: &kube::Error, obj: &ObjectName<'_>) -> String {
    let kind = obj.kind.to_ascii_lowercase();
    let (name, ns) = (obj.name, obj.namespace);
    match err {
        kube::Error::Api(s) if s.code == 404 => {
            let names_object = s.details.as_ref().is_some_and(|d| !d.name.is_empty());
            if names_object {
                format!("{kind} {name:?} not found in namespace {ns:?}")
            } else {
                format!(
                    "the server does not serve {}.{}: install the CRDs first (kubectl apply --server-side -f crds/, or the Helm chart)",
                    obj.plural,
                    crate::api::GROUP
                )
            }
        }
        kube::Error::Api(s) if s.code == 401 || s.code == 403 => format!(
            "not allowed to patch {kind} {name:?} in namespace {ns:?}: {}",
            one_line(&s.message)
        ),
        kube::Error::Api(s) => {
            let reason = if s.reason.is_empty() {
                s.code.to_string()
            } else {
                s.reason.clone()
            };
            format!(
                "{kind} {name:?} in namespace {ns:?}: {} ({reason})",
                one_line(&s.message)
            )
        }
        other => format!(
            "{kind} {name:?} in namespace {ns:?}: {}",
            one_line(&other.to_string())
        ),
    }
}

/// Folds a multi-line message onto one line.
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api_error(code: u16, reason: &str, message: &str, name: Option<&str>) -> kube::Error {
        kube::Error::Api(Box::new(kube::core::Status {
            code,
            reason: reason.into(),
            message: message.into(),
            details: name.map(|n| kube::core::response::StatusDetails {
                name: n.into(),
                group: "stripekeys.io".into(),
                kind: "stripekeypolicies".into(),
                uid: String::new(),
                causes: Vec::new(),
                retry_after_seconds: 0,
            }),
            ..kube::core::Status::failure(message, reason)
        }))
    }

    const NOPE: ObjectName<'static> = ObjectName {
        kind: "StripeKeyPolicy",
        plural: "stripekeypolicies",
        name: "nope",
        namespace: "shop",
    };

    #[test]
    fn api_errors_read_as_one_kubectl_line() {
        let e = api_error(
            404,
            "NotFound",
            "stripekeypolicies.stripekeys.io \"nope\" not found",
            Some("nope"),
        );
        assert_eq!(
            kube_error_line(&e, &NOPE),
            "stripekeypolicy \"nope\" not found in namespace \"shop\""
        );
        let e = api_error(
            404,
            "NotFound",
            "the server could not find the requested resource",
            None,
        );
        assert!(
            kube_error_line(&e, &NOPE).contains("install the CRDs first"),
            "{}",
            kube_error_line(&e, &NOPE)
        );
        let e = api_error(
            403,
            "Forbidden",
            "stripekeypolicies.stripekeys.io \"nope\" is forbidden: User \"bob\" cannot patch\nresource",
            Some("nope"),
        );
        let line = kube_error_line(&e, &NOPE);
        assert!(
            line.starts_with("not allowed to patch stripekeypolicy \"nope\""),
            "{line}"
        );
        for line in [
            line,
            kube_error_line(&api_error(500, "", "boom", None), &NOPE),
        ] {
            assert!(!line.contains('\n') && !line.contains("Status {"), "{line}");
        }
    }

    #[test]
    fn targets_parse_with_long_and_short_kinds() {
        assert_eq!(
            parse_target("stripekeypolicy/checkout").unwrap(),
            ("StripeKeyPolicy", "stripekeypolicies", "checkout".into())
        );
        assert_eq!(
            parse_target("swe/hooks").unwrap().0,
            "StripeWebhookEndpoint"
        );
        assert!(parse_target("deployment/x").is_err());
        assert!(parse_target("checkout").is_err());
        assert!(parse_target("skp/").is_err());
    }

    #[test]
    fn incident_patch_sets_the_reason_and_routine_clears_it() {
        let p = rotation_patch("t1", true, Some("leaked in a log"));
        assert_eq!(
            p["metadata"]["annotations"][ROTATE_REASON_ANNOTATION],
            json!("incident")
        );
        assert_eq!(
            p["metadata"]["annotations"][ROTATE_NOTE_ANNOTATION],
            json!("leaked in a log")
        );
        let p = rotation_patch("t2", false, None);
        assert_eq!(p["metadata"]["annotations"][ROTATE_ANNOTATION], json!("t2"));
        assert!(
            p["metadata"]["annotations"][ROTATE_REASON_ANNOTATION].is_null(),
            "a routine request removes an old incident reason"
        );
    }
}
