//! Kubernetes validating admission: the rules of the four `stripekeys.io` kinds at apply time,
//! and an opt-in refusal of literal Stripe secret material in Pods, workloads, ConfigMaps and
//! Secrets; with its HTTPS server ([`server`]) and certificates ([`tls`]). (Stripe's webhooks,
//! which share only the word, are [`crate::webhook`].)
//!
//! The handlers are pure functions of the AdmissionReview and of a few lookups ([`Lookups`]:
//! the referenced StripeAccount, the namespace's labels, the StripeGuardrails), so they are
//! tested without a cluster; [`KubeLookups`] reads them from the Kubernetes API. The
//! controllers enforce the same rules again at reconcile time (defence in depth): the webhook
//! only makes the refusal visible at `kubectl apply`.
//!
//! Verdicts:
//! - `DELETE` and `CONNECT` are always allowed, and so is an `UPDATE` that leaves `spec` as it
//!   was or that belongs to an object being deleted (finalizer removal must never be blocked).
//! - A StripeKeyPolicy is judged by [`crate::controller::keypolicy::validate`]; a
//!   StripeWebhookEndpoint by [`crate::controller::webhook::validate`]. A missing StripeAccount is allowed
//!   with a warning (a `kubectl apply -f dir/` may create the policy first); everything that does
//!   not depend on the account (permissions, guardrails on permissions, rotation) is still
//!   checked.
//! - A lookup that fails refuses the request: the webhook fails closed, like `failurePolicy: Fail`.
//! - A StripeAccount is judged by [`rules::validate_account`], the check the controllers make
//!   before they read an app key: allowed API host, Vault paths under `<prefix>/_accounts/`, a
//!   labelled Secret in the operator's namespace (a Secret that does not exist yet is allowed with
//!   a warning; the controller checks its label before reading it).
//! - The literal-keys webhook exempts requests by who makes them (the operator's own service
//!   account, [`LiteralKeysPolicy::exempt_username`]), never by a label on the object: any tenant
//!   can set a label.
//! - A malformed review is refused with a message saying what is wrong, echoing the request's
//!   `uid` when one can be read. Nothing here panics on input.

pub mod server;
pub mod tls;

use std::collections::BTreeMap;

use async_trait::async_trait;
use base64::Engine;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::{Api, ListParams};
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use serde_json::Value;

use crate::api::{
    StripeAccount, StripeAccountSpec, StripeGuardrail, StripeKeyPolicy, StripeWebhookEndpoint,
};
use crate::controller::keypolicy::{self, Refusal};
use crate::controller::webhook;
use crate::rotation::schedule::parse_duration;
use crate::rules::{self, AccountTrust};
use crate::scan::{self, Finding};

/// The path of the webhook of the four `stripekeys.io` kinds.
pub const STRIPE_OBJECTS_PATH: &str = "/validate/stripekeys";
/// The path of the literal-keys webhook.
pub const LITERAL_KEYS_PATH: &str = "/validate/no-literal-keys";
/// The namespace label that opts a namespace into the literal-keys webhook.
pub const LITERAL_KEYS_LABEL: &str = "stripekeys.io/no-literal-keys";
/// The value of [`LITERAL_KEYS_LABEL`] that turns it on.
pub const LITERAL_KEYS_ENFORCE: &str = "enforce";

/// A lookup the handlers could not make.
#[derive(Debug, thiserror::Error)]
#[error(
    "could not read {what} from the Kubernetes API: {message}; retry, and check the operator's RBAC and logs"
)]
pub struct LookupError {
    /// What was being read (`StripeAccount "payments"`, `namespace "shop"`, ...).
    pub what: String,
    /// Why it failed.
    pub message: String,
}

/// What the StripeKeyPolicy and StripeWebhookEndpoint rules need from the cluster.
#[async_trait]
pub trait Lookups: Send + Sync {
    /// The StripeAccount named `name`, or `None` when it does not exist.
    async fn account(&self, name: &str) -> Result<Option<StripeAccount>, LookupError>;
    /// The labels of namespace `namespace` (empty when it does not exist yet).
    async fn namespace_labels(
        &self,
        namespace: &str,
    ) -> Result<BTreeMap<String, String>, LookupError>;
    /// Every StripeGuardrail in the cluster.
    async fn guardrails(&self) -> Result<Vec<StripeGuardrail>, LookupError>;
    /// The labels of Secret `namespace/name` (metadata only, never its data), or `None` when
    /// it does not exist.
    async fn secret_labels(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<Option<BTreeMap<String, String>>, LookupError>;
}

/// [`Lookups`] through the Kubernetes API (one GET or LIST per call, no cache).
#[derive(Clone)]
pub struct KubeLookups {
    client: kube::Client,
}

impl KubeLookups {
    /// Lookups through `client`.
    pub fn new(client: kube::Client) -> Self {
        Self { client }
    }
}

fn lookup_error(what: String) -> impl FnOnce(kube::Error) -> LookupError {
    move |e| LookupError {
        what,
        message: e.to_string(),
    }
}

#[async_trait]
impl Lookups for KubeLookups {
    async fn account(&self, name: &str) -> Result<Option<StripeAccount>, LookupError> {
        Api::<StripeAccount>::all(self.client.clone())
            .get_opt(name)
            .await
            .map_err(lookup_error(format!("StripeAccount {name:?}")))
    }

    async fn namespace_labels(
        &self,
        namespace: &str,
    ) -> Result<BTreeMap<String, String>, LookupError> {
        let ns = Api::<Namespace>::all(self.client.clone())
            .get_opt(namespace)
            .await
            .map_err(lookup_error(format!("namespace {namespace:?}")))?;
        Ok(ns.map(|n| n.labels().clone()).unwrap_or_default())
    }

    async fn guardrails(&self) -> Result<Vec<StripeGuardrail>, LookupError> {
        Ok(Api::<StripeGuardrail>::all(self.client.clone())
            .list(&ListParams::default())
            .await
            .map_err(lookup_error("the StripeGuardrails".into()))?
            .items)
    }

    async fn secret_labels(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<Option<BTreeMap<String, String>>, LookupError> {
        let meta = Api::<Secret>::namespaced(self.client.clone(), namespace)
            .get_metadata_opt(name)
            .await
            .map_err(lookup_error(format!("Secret {namespace}/{name}")))?;
        Ok(meta.map(|m| m.labels().clone()))
    }
}

/// Parses an AdmissionReview, or says why it cannot be used. The error response carries the
/// request's `uid` when one can be read from the raw JSON.
pub fn parse_review(
    body: &[u8],
) -> Result<AdmissionRequest<DynamicObject>, Box<AdmissionResponse>> {
    let raw: Value = serde_json::from_slice(body).map_err(|e| {
        Box::new(AdmissionResponse::invalid(format!(
            "the AdmissionReview is not JSON: {e}"
        )))
    })?;
    let uid = raw
        .pointer("/request/uid")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let with_uid = |mut r: AdmissionResponse| {
        r.uid = uid.clone();
        Box::new(r)
    };
    if raw.get("request").is_none_or(Value::is_null) {
        return Err(with_uid(AdmissionResponse::invalid(
            "the AdmissionReview has no request",
        )));
    }
    let review: AdmissionReview<DynamicObject> = serde_json::from_value(raw).map_err(|e| {
        with_uid(AdmissionResponse::invalid(format!(
            "the AdmissionReview is malformed: {e}"
        )))
    })?;
    review.try_into().map_err(|_| {
        with_uid(AdmissionResponse::invalid(
            "the AdmissionReview has no request",
        ))
    })
}

/// Whether the request needs judging: CREATE, and UPDATE that changes `spec` of an object that
/// is not being deleted.
fn needs_judging(req: &AdmissionRequest<DynamicObject>) -> bool {
    match req.operation {
        Operation::Create => true,
        Operation::Update => {
            let Some(new) = &req.object else { return true };
            if new.metadata.deletion_timestamp.is_some() {
                return false;
            }
            match &req.old_object {
                Some(old) => old.data.get("spec") != new.data.get("spec"),
                None => true,
            }
        }
        Operation::Delete | Operation::Connect => false,
    }
}

fn typed<K: serde::de::DeserializeOwned>(obj: &DynamicObject, kind: &str) -> Result<K, String> {
    let value = serde_json::to_value(obj).map_err(|e| format!("{kind} is not readable: {e}"))?;
    serde_json::from_value(value).map_err(|e| format!("the object is not a valid {kind}: {e}"))
}

fn deny(req: &AdmissionRequest<DynamicObject>, kind: &str, message: String) -> AdmissionResponse {
    let name = if req.name.is_empty() {
        "(generated name)"
    } else {
        req.name.as_str()
    };
    tracing::info!(
        kind,
        namespace = req.namespace.as_deref().unwrap_or(""),
        name,
        "admission refused"
    );
    AdmissionResponse::from(req).deny(message)
}

fn refusal_message(kind: &str, name: &str, r: &Refusal) -> String {
    format!("{kind} {name:?} is refused ({}): {}", r.reason, r.message)
}

/// An account that stands for a missing one: it serves every namespace in test mode, so that
/// every rule that does not depend on the account is still checked.
fn placeholder_account(name: &str) -> StripeAccount {
    let spec: Result<StripeAccountSpec, _> = serde_json::from_value(serde_json::json!({
        "mode": "test",
        "context": "placeholder",
        "credentials": {"secretRef": {"name": "placeholder", "key": "placeholder"}},
        "namespaceSelector": {}
    }));
    match spec {
        Ok(spec) => StripeAccount::new(name, spec),
        // The JSON above is a valid spec; a failure here is a programming error caught by tests.
        Err(e) => unreachable!("placeholder StripeAccount spec: {e}"),
    }
}

fn missing_account_warning(name: &str) -> String {
    format!(
        "StripeAccount {name:?} does not exist (yet): its mode and namespaceSelector are checked by the controller once it does"
    )
}

/// Judges a review of one of the four `stripekeys.io` kinds (path [`STRIPE_OBJECTS_PATH`]);
/// StripeAccounts against the operator's `trust` settings.
pub async fn review_stripe_object(
    body: &[u8],
    lookups: &dyn Lookups,
    trust: &AccountTrust,
) -> AdmissionResponse {
    let req = match parse_review(body) {
        Ok(r) => r,
        Err(resp) => return *resp,
    };
    if !needs_judging(&req) {
        return AdmissionResponse::from(&req);
    }
    let Some(obj) = &req.object else {
        return deny(
            &req,
            &req.kind.kind,
            "the AdmissionReview carries no object to judge".into(),
        );
    };
    let kind = req.kind.kind.clone();
    let namespace = req
        .namespace
        .clone()
        .or_else(|| obj.metadata.namespace.clone())
        .unwrap_or_default();
    let result = match (req.kind.group.as_str(), kind.as_str()) {
        ("stripekeys.io", "StripeKeyPolicy") => judge_policy(obj, &namespace, lookups).await,
        ("stripekeys.io", "StripeWebhookEndpoint") => {
            judge_endpoint(obj, &namespace, lookups).await
        }
        ("stripekeys.io", "StripeGuardrail") => judge_guardrail(obj).map(|()| None),
        ("stripekeys.io", "StripeAccount") => judge_account(obj, trust, lookups).await,
        (group, kind) => Err(format!(
            "this webhook judges the stripekeys.io kinds only, not {group}/{kind}; check the ValidatingWebhookConfiguration's rules"
        )),
    };
    match result {
        Ok(None) => AdmissionResponse::from(&req),
        Ok(Some(warning)) => {
            let mut resp = AdmissionResponse::from(&req);
            resp.warnings = Some(vec![warning]);
            resp
        }
        Err(message) => deny(&req, &kind, message),
    }
}

/// Ok(Some(warning)) when allowed with a warning.
type Verdict = Result<Option<String>, String>;

async fn judge_policy(obj: &DynamicObject, namespace: &str, lookups: &dyn Lookups) -> Verdict {
    let mut policy: StripeKeyPolicy = typed(obj, "StripeKeyPolicy")?;
    if policy.metadata.namespace.is_none() {
        policy.metadata.namespace = Some(namespace.to_string());
    }
    let name = policy.name_any();
    let account_name = policy.spec.account_ref.name.clone();
    let (account, labels, guardrails) = lookup_all(lookups, &account_name, namespace).await?;
    let (account, warning) = match account {
        Some(a) => (a, None),
        None => (
            placeholder_account(&account_name),
            Some(missing_account_warning(&account_name)),
        ),
    };
    keypolicy::validate(
        &policy,
        Some(&account),
        &labels,
        &guardrails,
        Timestamp::now(),
    )
    .map(|_| warning)
    .map_err(|r| refusal_message("StripeKeyPolicy", &name, &r))
}

async fn judge_endpoint(obj: &DynamicObject, namespace: &str, lookups: &dyn Lookups) -> Verdict {
    let mut endpoint: StripeWebhookEndpoint = typed(obj, "StripeWebhookEndpoint")?;
    if endpoint.metadata.namespace.is_none() {
        endpoint.metadata.namespace = Some(namespace.to_string());
    }
    let name = endpoint.name_any();
    let account_name = endpoint.spec.account_ref.name.clone();
    let (account, labels, guardrails) = lookup_all(lookups, &account_name, namespace).await?;
    let (account, warning) = match account {
        Some(a) => (a, None),
        None => (
            placeholder_account(&account_name),
            Some(missing_account_warning(&account_name)),
        ),
    };
    webhook::validate(
        &endpoint,
        Some(&account),
        &labels,
        &guardrails,
        Timestamp::now(),
    )
    .map(|_| warning)
    .map_err(|r| refusal_message("StripeWebhookEndpoint", &name, &r))
}

async fn lookup_all(
    lookups: &dyn Lookups,
    account: &str,
    namespace: &str,
) -> Result<
    (
        Option<StripeAccount>,
        BTreeMap<String, String>,
        Vec<StripeGuardrail>,
    ),
    String,
> {
    let account = lookups.account(account).await.map_err(|e| e.to_string())?;
    let labels = lookups
        .namespace_labels(namespace)
        .await
        .map_err(|e| e.to_string())?;
    let guardrails = lookups.guardrails().await.map_err(|e| e.to_string())?;
    Ok((account, labels, guardrails))
}

fn judge_guardrail(obj: &DynamicObject) -> Result<(), String> {
    let g: StripeGuardrail = typed(obj, "StripeGuardrail")?;
    if kube::core::Selector::try_from(g.spec.namespace_selector.clone()).is_err() {
        return Err("StripeGuardrail namespaceSelector is not a valid label selector".into());
    }
    for (field, value) in [
        ("maxRotationPeriod", &g.spec.max_rotation_period),
        ("maxOverlap", &g.spec.max_overlap),
    ] {
        if let Some(v) = value {
            parse_duration(field, v).map_err(|e| format!("StripeGuardrail: {e}"))?;
        }
    }
    Ok(())
}

async fn judge_account(
    obj: &DynamicObject,
    trust: &AccountTrust,
    lookups: &dyn Lookups,
) -> Verdict {
    let a: StripeAccount = typed(obj, "StripeAccount")?;
    let name = a.name_any();
    // Everything that needs no lookup first: a refused host or path never causes a Secret read.
    rules::validate_account(&name, &a.spec, trust, None).map_err(|r| r.message)?;
    let Some(r) = &a.spec.credentials.secret_ref else {
        return Ok(None);
    };
    let labels = lookups
        .secret_labels(&trust.operator_namespace, &r.name)
        .await
        .map_err(|e| e.to_string())?;
    match labels {
        Some(labels) => rules::validate_account(&name, &a.spec, trust, Some(&labels))
            .map(|()| None)
            .map_err(|r| r.message),
        None => Ok(Some(format!(
            "Secret {}/{} does not exist (yet): it must carry the label {}={} or the operator will not read it",
            trust.operator_namespace,
            r.name,
            rules::CREDENTIAL_LABEL,
            rules::CREDENTIAL_LABEL_VALUE
        ))),
    }
}

/// Where a finding was made, for the message (`container "api" env STRIPE_KEY`).
struct Located {
    place: String,
    finding: Finding,
}

fn scan_value(place: String, text: &str, include_test: bool, out: &mut Vec<Located>) {
    for finding in scan::find_secrets(text, include_test) {
        out.push(Located {
            place: place.clone(),
            finding,
        });
    }
}

fn scan_base64_value(place: String, encoded: &str, include_test: bool, out: &mut Vec<Located>) {
    let before = out.len();
    if let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(encoded.trim()) {
        scan_value(
            place.clone(),
            &String::from_utf8_lossy(&bytes),
            include_test,
            out,
        );
    }
    if out.len() == before {
        // Not base64 (or nothing decoded): the scanner also looks for base64 runs itself.
        scan_value(place, encoded, include_test, out);
    }
}

fn scan_pod_spec(prefix: &str, spec: &Value, include_test: bool, out: &mut Vec<Located>) {
    for list in ["initContainers", "containers", "ephemeralContainers"] {
        for c in spec
            .get(list)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let cname = c.get("name").and_then(Value::as_str).unwrap_or("?");
            for env in c.get("env").and_then(Value::as_array).into_iter().flatten() {
                if let Some(v) = env.get("value").and_then(Value::as_str) {
                    let ename = env.get("name").and_then(Value::as_str).unwrap_or("?");
                    scan_value(
                        format!("{prefix}container {cname:?} env {ename}"),
                        v,
                        include_test,
                        out,
                    );
                }
            }
            for (field, args) in [("command", c.get("command")), ("args", c.get("args"))] {
                for a in args.and_then(Value::as_array).into_iter().flatten() {
                    if let Some(a) = a.as_str() {
                        scan_value(
                            format!("{prefix}container {cname:?} {field}"),
                            a,
                            include_test,
                            out,
                        );
                    }
                }
            }
        }
    }
}

fn scan_object(kind: &str, obj: &DynamicObject, include_test: bool) -> Vec<Located> {
    let mut out = Vec::new();
    let data = &obj.data;
    match kind {
        "Pod" => {
            if let Some(spec) = data.get("spec") {
                scan_pod_spec("", spec, include_test, &mut out);
            }
        }
        "ConfigMap" => {
            if let Some(map) = data.get("data").and_then(Value::as_object) {
                for (k, v) in map {
                    if let Some(v) = v.as_str() {
                        scan_value(format!("data.{k}"), v, include_test, &mut out);
                    }
                }
            }
            if let Some(map) = data.get("binaryData").and_then(Value::as_object) {
                for (k, v) in map {
                    if let Some(v) = v.as_str() {
                        scan_base64_value(format!("binaryData.{k}"), v, include_test, &mut out);
                    }
                }
            }
        }
        "Secret" => {
            if let Some(map) = data.get("data").and_then(Value::as_object) {
                for (k, v) in map {
                    if let Some(v) = v.as_str() {
                        scan_base64_value(format!("data.{k}"), v, include_test, &mut out);
                    }
                }
            }
            if let Some(map) = data.get("stringData").and_then(Value::as_object) {
                for (k, v) in map {
                    if let Some(v) = v.as_str() {
                        scan_value(format!("stringData.{k}"), v, include_test, &mut out);
                    }
                }
            }
        }
        // Workloads: their pod template, so that `kubectl apply` of a Deployment fails at once
        // instead of its ReplicaSet failing to create Pods later.
        _ => {
            let template = data
                .pointer("/spec/template/spec")
                .or_else(|| data.pointer("/spec/jobTemplate/spec/template/spec"));
            if let Some(spec) = template {
                scan_pod_spec("pod template ", spec, include_test, &mut out);
            }
        }
    }
    out
}

/// The username Kubernetes gives requests made with a service account's token.
pub fn service_account_username(namespace: &str, service_account: &str) -> String {
    format!("system:serviceaccount:{namespace}:{service_account}")
}

/// What the literal-keys webhook refuses and who is exempt.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LiteralKeysPolicy {
    /// Refuse `sk_test_`/`rk_test_` keys too.
    pub include_test_keys: bool,
    /// The one requester exempt from the check: the operator's own service account
    /// (`system:serviceaccount:<namespace>:<name>`), which writes the Secrets it manages.
    /// `None`: nobody is exempt. Decided by `userInfo.username` only, never by labels.
    pub exempt_username: Option<String>,
}

/// Judges a review of a Pod, a workload, a ConfigMap or a Secret (path [`LITERAL_KEYS_PATH`]):
/// refuses literal Stripe secret material (`sk_live_`, `rk_live_`, `whsec_`, and with
/// `include_test_keys` also `sk_test_`, `rk_test_`) unless the request comes from the operator's
/// own service account. The message names where each finding is, masked (prefix and last four
/// characters only), and points to StripeKeyPolicy.
pub fn review_literal_keys(body: &[u8], policy: &LiteralKeysPolicy) -> AdmissionResponse {
    let req = match parse_review(body) {
        Ok(r) => r,
        Err(resp) => return *resp,
    };
    if !matches!(req.operation, Operation::Create | Operation::Update) {
        return AdmissionResponse::from(&req);
    }
    let Some(obj) = &req.object else {
        return deny(
            &req,
            &req.kind.kind,
            "the AdmissionReview carries no object to judge".into(),
        );
    };
    if let Some(exempt) = &policy.exempt_username
        && req.user_info.username.as_deref() == Some(exempt.as_str())
    {
        return AdmissionResponse::from(&req);
    }
    let kind = req.kind.kind.clone();
    let findings = scan_object(&kind, obj, policy.include_test_keys);
    if findings.is_empty() {
        return AdmissionResponse::from(&req);
    }
    let listed: Vec<String> = findings
        .iter()
        .take(5)
        .map(|l| format!("{}: {} {}", l.place, l.finding.kind, l.finding.masked))
        .collect();
    let more = findings.len().saturating_sub(listed.len());
    let name = if req.name.is_empty() {
        obj.metadata
            .generate_name
            .clone()
            .unwrap_or_else(|| "(unnamed)".into())
    } else {
        req.name.clone()
    };
    let message = format!(
        "{kind} {name:?} carries literal Stripe secret material ({}{}); this namespace refuses it ({LITERAL_KEYS_LABEL}={LITERAL_KEYS_ENFORCE}). Declare a StripeKeyPolicy (stripekeys.io/v1alpha1) and read the key from the Secret the operator manages, or a StripeWebhookEndpoint for a signing secret; then revoke the exposed key at Stripe",
        listed.join("; "),
        if more > 0 {
            format!("; and {more} more")
        } else {
            String::new()
        }
    );
    deny(&req, &kind, message)
}
