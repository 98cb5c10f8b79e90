//! The catalogue of Stripe permission names.
//!
//! Stripe has no endpoint that lists valid permission names and no wildcard, so the operator keeps
//! a versioned list. Names outside it are refused unless a policy sets
//! `allowUnlistedPermissions: true`.

use std::collections::BTreeSet;

/// The version of [`RESOURCES`]: the Stripe API version it was checked against.
pub const CATALOGUE_VERSION: &str = "2026-10-14";

/// Stripe resources that have `<resource>_read` and `<resource>_write` permissions.
pub const RESOURCES: &[&str] = &[
    "account",
    "account_link",
    "api_key",
    "apple_pay_domain",
    "application_fee",
    "balance",
    "balance_transaction",
    "billing_portal",
    "charge",
    "checkout_session",
    "climate",
    "connected_account",
    "country_spec",
    "coupon",
    "credit_note",
    "customer",
    "customer_session",
    "dispute",
    "event",
    "file",
    "file_link",
    "financial_connections",
    "identity",
    "invoice",
    "invoice_item",
    "issuing_authorization",
    "issuing_card",
    "issuing_cardholder",
    "issuing_dispute",
    "issuing_transaction",
    "mandate",
    "payment_intent",
    "payment_link",
    "payment_method",
    "payment_method_domain",
    "payout",
    "plan",
    "price",
    "product",
    "promotion_code",
    "quote",
    "radar",
    "refund",
    "report_run",
    "review",
    "setup_intent",
    "shipping_rate",
    "sigma",
    "source",
    "subscription",
    "subscription_schedule",
    "tax",
    "tax_rate",
    "terminal",
    "test_clock",
    "token",
    "topup",
    "transfer",
    "webhook",
];

/// Whether `name` is `<resource>_read` or `<resource>_write` for a catalogued resource.
pub fn is_known(name: &str) -> bool {
    let resource = name
        .strip_suffix("_read")
        .or_else(|| name.strip_suffix("_write"));
    resource.is_some_and(|r| RESOURCES.binary_search(&r).is_ok())
}

/// Names in `permissions` that are not in the catalogue, in input order.
pub fn unknown<'a>(permissions: impl IntoIterator<Item = &'a String>) -> Vec<&'a str> {
    permissions
        .into_iter()
        .map(String::as_str)
        .filter(|p| !is_known(p))
        .collect()
}

/// The permissions sorted and without duplicates: the form status records, so that a reordered
/// list is not a scope change.
pub fn normalized<'a>(permissions: impl IntoIterator<Item = &'a String>) -> Vec<String> {
    permissions
        .into_iter()
        .cloned()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

/// Whether `name` matches the glob `pattern` (`*` any run of characters, `?` one character).
pub fn glob_match(pattern: &str, name: &str) -> bool {
    glob::Pattern::new(pattern).is_ok_and(|p| p.matches(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catalogue_is_sorted_so_binary_search_works() {
        assert!(RESOURCES.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn known_names_need_a_catalogued_resource_and_a_read_or_write_suffix() {
        assert!(is_known("charge_read"));
        assert!(is_known("payment_intent_write"));
        assert!(is_known("api_key_write"));
        assert!(!is_known("charge_delete"));
        assert!(!is_known("charges_read"));
        assert!(!is_known("_read"));
        assert!(!is_known("charge"));
    }

    #[test]
    fn unknown_lists_only_uncatalogued_names() {
        let p = vec!["charge_read".to_string(), "warp_drive_write".to_string()];
        assert_eq!(unknown(&p), vec!["warp_drive_write"]);
    }

    #[test]
    fn normalized_sorts_and_dedups() {
        let p = vec![
            "refund_write".into(),
            "charge_read".into(),
            "refund_write".into(),
        ];
        assert_eq!(normalized(&p), vec!["charge_read", "refund_write"]);
    }

    #[test]
    fn glob_matches_like_a_shell() {
        assert!(glob_match("payout_*", "payout_write"));
        assert!(glob_match("*_read", "charge_read"));
        assert!(!glob_match("payout_*", "charge_read"));
        assert!(glob_match("charge_rea?", "charge_read"));
        assert!(glob_match("*.example.com", "hooks.example.com"));
    }
}
