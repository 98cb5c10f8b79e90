//! Store paths that a resource cannot use to escape its own namespace's subtree.
//!
//! Every path is assembled from validated segments; there is no constructor that takes a
//! free-form path. A resource's credentials live at `<prefix>/<namespace>/<kind>/<name>`
//! (optionally followed by user-chosen `sub_path` segments), and per-account material lives at
//! `<prefix>/_accounts/<account>/encryption-key`. Segments are lowercase DNS labels (names may
//! also be DNS subdomains), so no segment can be empty, `.`, `..`, contain `/`, or start with
//! `_`: the `_accounts` subtree is out of reach of every tenant namespace.

use std::fmt;

use super::StoreError;

/// Longest segment for namespaces, kinds, accounts and sub-path segments (a DNS label).
pub const MAX_LABEL_LEN: usize = 63;
/// Longest resource name (a DNS subdomain, as Kubernetes allows for object names).
pub const MAX_NAME_LEN: usize = 253;
/// Most segments a user-supplied `sub_path` may add below the resource's own path.
pub const MAX_SUB_PATH_SEGMENTS: usize = 4;
/// Most segments an operator-configured prefix may have.
pub const MAX_PREFIX_SEGMENTS: usize = 8;

/// The reserved segment under which per-account material is stored.
const ACCOUNTS_SEGMENT: &str = "_accounts";
/// The leaf name of an account's RSA private key.
const ACCOUNT_KEY_LEAF: &str = "encryption-key";

/// What a path holds; decides which record type may be stored there.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PathKind {
    /// A resource's [`CredentialBundle`](super::CredentialBundle).
    Credential,
    /// An account's RSA private key ([`AccountKey`](super::AccountKey)).
    AccountKey,
}

/// The operator-configured root under which everything is stored (for example
/// `stripe-key-operator` or `platform/stripe`). Validated once at start-up.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct StorePrefix(String);

impl StorePrefix {
    /// Validates a prefix made of 1 to 8 DNS-label segments separated by `/`.
    ///
    /// A leading or trailing `/` is rejected rather than trimmed, so that a typo in the
    /// configuration is reported instead of silently changing where secrets go.
    pub fn new(prefix: &str) -> Result<Self, StoreError> {
        if prefix.is_empty() {
            return Err(invalid("prefix", prefix, "must not be empty"));
        }
        let segments: Vec<&str> = prefix.split('/').collect();
        if segments.len() > MAX_PREFIX_SEGMENTS {
            return Err(invalid("prefix", prefix, "has more than 8 segments"));
        }
        for segment in segments {
            validate_label("prefix segment", segment)?;
        }
        Ok(Self(prefix.to_owned()))
    }

    /// The prefix as configured.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for StorePrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A validated location in the secret store (relative to the KV mount).
///
/// Build one with [`StorePath::credential`] or [`StorePath::account_key`]; extend a credential
/// path with [`StorePath::with_sub_path`]. The rendered form ([`StorePath::as_str`]) is what the
/// Vault backend uses below its mount.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct StorePath {
    rendered: String,
    kind: PathKind,
    namespace: Option<String>,
}

impl StorePath {
    /// The path of a resource's credential bundle: `<prefix>/<namespace>/<kind>/<name>`.
    ///
    /// `namespace`, `kind` (the lowercase resource kind, e.g. `stripekey`) must be DNS labels;
    /// `name` must be a DNS subdomain (what Kubernetes accepts for object names).
    pub fn credential(
        prefix: &StorePrefix,
        namespace: &str,
        kind: &str,
        name: &str,
    ) -> Result<Self, StoreError> {
        validate_label("namespace", namespace)?;
        validate_label("kind", kind)?;
        validate_name("name", name)?;
        Ok(Self {
            rendered: format!("{}/{namespace}/{kind}/{name}", prefix.as_str()),
            kind: PathKind::Credential,
            namespace: Some(namespace.to_owned()),
        })
    }

    /// The path of an account's RSA private key: `<prefix>/_accounts/<account>/encryption-key`.
    ///
    /// `_accounts` cannot be a namespace (namespaces are DNS labels and cannot start with `_`),
    /// so no tenant path can reach it.
    pub fn account_key(prefix: &StorePrefix, account: &str) -> Result<Self, StoreError> {
        validate_name("account", account)?;
        Ok(Self {
            rendered: format!(
                "{}/{ACCOUNTS_SEGMENT}/{account}/{ACCOUNT_KEY_LEAF}",
                prefix.as_str()
            ),
            kind: PathKind::AccountKey,
            namespace: None,
        })
    }

    /// Adds user-chosen segments below a credential path (e.g. `payments/live`).
    ///
    /// Each segment must be a DNS label; at most 4 segments; no empty segment, so leading,
    /// trailing or doubled `/` are rejected. An empty `sub_path` leaves the path unchanged.
    /// Account-key paths cannot be extended.
    pub fn with_sub_path(mut self, sub_path: &str) -> Result<Self, StoreError> {
        if self.kind != PathKind::Credential {
            return Err(invalid(
                "sub_path",
                sub_path,
                "can only be added to a resource's credential path",
            ));
        }
        if sub_path.is_empty() {
            return Ok(self);
        }
        let segments: Vec<&str> = sub_path.split('/').collect();
        if segments.len() > MAX_SUB_PATH_SEGMENTS {
            return Err(invalid("sub_path", sub_path, "has more than 4 segments"));
        }
        for segment in &segments {
            validate_label("sub_path segment", segment)?;
        }
        self.rendered.push('/');
        self.rendered.push_str(sub_path);
        Ok(self)
    }

    /// The path below the KV mount, e.g. `stripe-key-operator/shop/stripekey/checkout`.
    pub fn as_str(&self) -> &str {
        &self.rendered
    }

    /// What this path holds.
    pub fn kind(&self) -> PathKind {
        self.kind
    }

    /// The tenant namespace whose subtree this path lies in (`None` for account keys).
    pub fn namespace(&self) -> Option<&str> {
        self.namespace.as_deref()
    }
}

impl fmt::Display for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.rendered)
    }
}

fn invalid(field: &'static str, value: &str, problem: &'static str) -> StoreError {
    // Path segments are names, never secret material, so echoing them (truncated) is safe.
    let mut shown: String = value.chars().take(80).collect();
    if shown.len() < value.len() {
        shown.push('…');
    }
    StoreError::InvalidPath {
        field,
        value: shown,
        problem,
    }
}

/// A DNS label: 1–63 characters of `[a-z0-9-]`, starting and ending with a letter or digit.
fn validate_label(field: &'static str, value: &str) -> Result<(), StoreError> {
    if value.is_empty() {
        return Err(invalid(field, value, "must not be empty"));
    }
    if value.len() > MAX_LABEL_LEN {
        return Err(invalid(field, value, "is longer than 63 characters"));
    }
    check_label_chars(field, value, value)
}

/// A DNS subdomain: dot-separated DNS labels, 1–253 characters in total.
fn validate_name(field: &'static str, value: &str) -> Result<(), StoreError> {
    if value.is_empty() {
        return Err(invalid(field, value, "must not be empty"));
    }
    if value.len() > MAX_NAME_LEN {
        return Err(invalid(field, value, "is longer than 253 characters"));
    }
    for label in value.split('.') {
        if label.is_empty() {
            return Err(invalid(
                field,
                value,
                "must not contain empty dot-separated parts ('..', leading or trailing '.')",
            ));
        }
        if label.len() > MAX_LABEL_LEN {
            return Err(invalid(
                field,
                value,
                "has a dot-separated part longer than 63 characters",
            ));
        }
        check_label_chars(field, value, label)?;
    }
    Ok(())
}

fn check_label_chars(field: &'static str, whole: &str, label: &str) -> Result<(), StoreError> {
    let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-';
    if !label.chars().all(ok_char) {
        return Err(invalid(
            field,
            whole,
            "may contain only lowercase letters, digits and '-' (no '/', '_', '.' runs or uppercase)",
        ));
    }
    let starts_ok = label.starts_with(|c: char| c.is_ascii_alphanumeric());
    let ends_ok = label.ends_with(|c: char| c.is_ascii_alphanumeric());
    if !starts_ok || !ends_ok {
        return Err(invalid(
            field,
            whole,
            "must start and end with a lowercase letter or digit",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prefix() -> StorePrefix {
        StorePrefix::new("stripe-key-operator").unwrap()
    }

    fn reason(r: Result<StorePath, StoreError>) -> &'static str {
        r.expect_err("path must be rejected").reason()
    }

    #[test]
    fn credential_path_is_prefix_namespace_kind_name() {
        let p = StorePath::credential(&prefix(), "shop", "stripekey", "checkout.v2").unwrap();
        assert_eq!(p.as_str(), "stripe-key-operator/shop/stripekey/checkout.v2");
        assert_eq!(p.namespace(), Some("shop"));
        assert_eq!(p.kind(), PathKind::Credential);
    }

    #[test]
    fn sub_path_only_adds_segments_below_the_resource() {
        let p = StorePath::credential(&prefix(), "shop", "stripekey", "checkout")
            .unwrap()
            .with_sub_path("payments/live")
            .unwrap();
        assert_eq!(
            p.as_str(),
            "stripe-key-operator/shop/stripekey/checkout/payments/live"
        );
        let unchanged = StorePath::credential(&prefix(), "shop", "stripekey", "checkout")
            .unwrap()
            .with_sub_path("")
            .unwrap();
        assert_eq!(
            unchanged.as_str(),
            "stripe-key-operator/shop/stripekey/checkout"
        );
    }

    #[test]
    fn rejects_dot_dot_in_every_segment() {
        let p = prefix();
        assert_eq!(
            reason(StorePath::credential(&p, "..", "stripekey", "a")),
            "InvalidStorePath"
        );
        assert!(StorePath::credential(&p, "shop", "..", "a").is_err());
        assert!(StorePath::credential(&p, "shop", "stripekey", "..").is_err());
        assert!(StorePath::credential(&p, "shop", "stripekey", "a..b").is_err());
        assert!(StorePath::credential(&p, "shop", "stripekey", ".").is_err());
        let base = StorePath::credential(&p, "shop", "stripekey", "a").unwrap();
        assert!(base.clone().with_sub_path("..").is_err());
        assert!(base.clone().with_sub_path("x/../../other").is_err());
        assert!(base.with_sub_path("x/..").is_err());
    }

    #[test]
    fn rejects_slashes_inside_segments_and_absolute_sub_paths() {
        let p = prefix();
        assert!(StorePath::credential(&p, "shop/other", "stripekey", "a").is_err());
        assert!(StorePath::credential(&p, "shop", "stripe/key", "a").is_err());
        assert!(StorePath::credential(&p, "shop", "stripekey", "a/b").is_err());
        assert!(StorePath::credential(&p, "shop", "stripekey", "/a").is_err());
        let base = StorePath::credential(&p, "shop", "stripekey", "a").unwrap();
        assert!(base.clone().with_sub_path("/etc").is_err());
        assert!(base.clone().with_sub_path("a//b").is_err());
        assert!(base.with_sub_path("a/").is_err());
    }

    #[test]
    fn rejects_empty_segments() {
        let p = prefix();
        assert!(StorePath::credential(&p, "", "stripekey", "a").is_err());
        assert!(StorePath::credential(&p, "shop", "", "a").is_err());
        assert!(StorePath::credential(&p, "shop", "stripekey", "").is_err());
        assert!(StorePath::account_key(&p, "").is_err());
        assert!(StorePrefix::new("").is_err());
        assert!(StorePrefix::new("a//b").is_err());
        assert!(StorePrefix::new("/abs").is_err());
    }

    #[test]
    fn rejects_uppercase_and_other_characters() {
        let p = prefix();
        assert!(StorePath::credential(&p, "Shop", "stripekey", "a").is_err());
        assert!(StorePath::credential(&p, "shop", "StripeKey", "a").is_err());
        assert!(StorePath::credential(&p, "shop", "stripekey", "A").is_err());
        assert!(StorePath::credential(&p, "shop", "stripekey", "a_b").is_err());
        assert!(StorePath::credential(&p, "shop", "stripekey", "a b").is_err());
        assert!(StorePath::credential(&p, "shop", "stripekey", "é").is_err());
        assert!(StorePath::credential(&p, "-shop", "stripekey", "a").is_err());
        assert!(StorePath::credential(&p, "shop-", "stripekey", "a").is_err());
        let base = StorePath::credential(&p, "shop", "stripekey", "a").unwrap();
        assert!(base.with_sub_path("Live").is_err());
        assert!(StorePrefix::new("Stripe").is_err());
    }

    #[test]
    fn rejects_overlong_segments() {
        let p = prefix();
        let label64 = "a".repeat(64);
        let label63 = "a".repeat(63);
        assert!(StorePath::credential(&p, &label63, "stripekey", "a").is_ok());
        assert!(StorePath::credential(&p, &label64, "stripekey", "a").is_err());
        assert!(StorePath::credential(&p, "shop", &label64, "a").is_err());
        // Names may be DNS subdomains up to 253 characters, each part at most 63.
        let name253 = format!("{label63}.{label63}.{label63}.{}", "b".repeat(61));
        assert_eq!(name253.len(), 253);
        assert!(StorePath::credential(&p, "shop", "stripekey", &name253).is_ok());
        assert!(StorePath::credential(&p, "shop", "stripekey", &format!("{name253}c")).is_err());
        assert!(StorePath::credential(&p, "shop", "stripekey", &label64).is_err());
        let base = StorePath::credential(&p, "shop", "stripekey", "a").unwrap();
        assert!(base.clone().with_sub_path(&label64).is_err());
        assert!(base.with_sub_path("a/b/c/d/e").is_err());
    }

    #[test]
    fn account_keys_live_outside_every_tenant_subtree() {
        let p = prefix();
        let key = StorePath::account_key(&p, "acme-live").unwrap();
        assert_eq!(
            key.as_str(),
            "stripe-key-operator/_accounts/acme-live/encryption-key"
        );
        assert_eq!(key.kind(), PathKind::AccountKey);
        assert_eq!(key.namespace(), None);
        // No namespace can be `_accounts`, so no tenant path can reach the account subtree.
        assert!(StorePath::credential(&p, "_accounts", "stripekey", "a").is_err());
        assert!(key.with_sub_path("x").is_err());
    }

    #[test]
    fn error_message_names_the_field_and_what_to_do() {
        let err = StorePath::credential(&prefix(), "shop", "stripekey", "a/b").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("name"), "{msg}");
        assert!(msg.contains("a/b"), "{msg}");
        assert!(!err.is_transient());
    }
}
