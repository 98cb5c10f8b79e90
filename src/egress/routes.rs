//! The route policy: which Stripe permission each API route needs.
//!
//! One table serves both the egress broker (which refuses, locally, a request its key's
//! permissions cannot serve) and the simulator's scope-enforcing surface (which answers 403 the
//! same way Stripe does). Two tables would drift, and a drift is either a request the broker
//! lets through that Stripe refuses, or one it refuses that the key could serve.
//!
//! A route is a method and a path pattern whose `{id}` segments match one object id. Reads
//! (`GET`) need `<resource>_read`; writes (`POST`, `DELETE`) need `<resource>_write`.
//! **A write permission also serves reads of the same resource** ([`grants`]): that is
//! Stripe's model for restricted keys ("write implies read", as in the Dashboard's
//! None/Read/Write choice per resource).
//!
//! Paths are matched segment by segment after the query is removed; a trailing `/` is
//! ignored. Paths with empty segments, `.`/`..` segments or percent-encoded characters are
//! never matched ([`normalized_path`] refuses them): the broker must forward exactly the path it
//! checked, and such paths could be read differently upstream.
//!
//! Routes outside the table have no permission ([`permission_for`] is `None`): the broker
//! refuses them (default deny) unless told otherwise.

/// The version of [`ROUTES`]; bumped whenever a route is added, removed or remapped. Reported
/// on the broker's `/usage` so that usage reports name the table that classified them.
pub const ROUTES_VERSION: &str = "2026-11-30.1";

/// One route: method, path pattern and the permission it needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    /// `GET`, `POST` or `DELETE`.
    pub method: &'static str,
    /// `/v1/charges/{id}/capture`: literal segments and `{id}` placeholders.
    pub pattern: &'static str,
    /// The permission the route needs, e.g. `charge_write`.
    pub permission: &'static str,
}

const fn r(method: &'static str, pattern: &'static str, permission: &'static str) -> Route {
    Route {
        method,
        pattern,
        permission,
    }
}

/// Routes of one resource with the usual shape: list, search and retrieve read; create,
/// update and delete write. Written out (not generated) so the table reads as what it is.
pub const ROUTES: &[Route] = &[
    // --- charges
    r("GET", "/v1/charges", "charge_read"),
    r("GET", "/v1/charges/search", "charge_read"),
    r("GET", "/v1/charges/{id}", "charge_read"),
    r("POST", "/v1/charges", "charge_write"),
    r("POST", "/v1/charges/{id}", "charge_write"),
    r("POST", "/v1/charges/{id}/capture", "charge_write"),
    // --- customers
    r("GET", "/v1/customers", "customer_read"),
    r("GET", "/v1/customers/search", "customer_read"),
    r("GET", "/v1/customers/{id}", "customer_read"),
    r(
        "GET",
        "/v1/customers/{id}/balance_transactions",
        "customer_read",
    ),
    r("GET", "/v1/customers/{id}/payment_methods", "customer_read"),
    r("POST", "/v1/customers", "customer_write"),
    r("POST", "/v1/customers/{id}", "customer_write"),
    r(
        "POST",
        "/v1/customers/{id}/balance_transactions",
        "customer_write",
    ),
    r("DELETE", "/v1/customers/{id}", "customer_write"),
    r("DELETE", "/v1/customers/{id}/discount", "customer_write"),
    // --- customer sessions
    r("POST", "/v1/customer_sessions", "customer_session_write"),
    // --- payment intents
    r("GET", "/v1/payment_intents", "payment_intent_read"),
    r("GET", "/v1/payment_intents/search", "payment_intent_read"),
    r("GET", "/v1/payment_intents/{id}", "payment_intent_read"),
    r("POST", "/v1/payment_intents", "payment_intent_write"),
    r("POST", "/v1/payment_intents/{id}", "payment_intent_write"),
    r(
        "POST",
        "/v1/payment_intents/{id}/confirm",
        "payment_intent_write",
    ),
    r(
        "POST",
        "/v1/payment_intents/{id}/capture",
        "payment_intent_write",
    ),
    r(
        "POST",
        "/v1/payment_intents/{id}/cancel",
        "payment_intent_write",
    ),
    r(
        "POST",
        "/v1/payment_intents/{id}/increment_authorization",
        "payment_intent_write",
    ),
    // --- setup intents
    r("GET", "/v1/setup_intents", "setup_intent_read"),
    r("GET", "/v1/setup_intents/{id}", "setup_intent_read"),
    r("POST", "/v1/setup_intents", "setup_intent_write"),
    r("POST", "/v1/setup_intents/{id}", "setup_intent_write"),
    r(
        "POST",
        "/v1/setup_intents/{id}/confirm",
        "setup_intent_write",
    ),
    r(
        "POST",
        "/v1/setup_intents/{id}/cancel",
        "setup_intent_write",
    ),
    // --- payment methods
    r("GET", "/v1/payment_methods", "payment_method_read"),
    r("GET", "/v1/payment_methods/{id}", "payment_method_read"),
    r("POST", "/v1/payment_methods", "payment_method_write"),
    r("POST", "/v1/payment_methods/{id}", "payment_method_write"),
    r(
        "POST",
        "/v1/payment_methods/{id}/attach",
        "payment_method_write",
    ),
    r(
        "POST",
        "/v1/payment_methods/{id}/detach",
        "payment_method_write",
    ),
    // --- refunds
    r("GET", "/v1/refunds", "refund_read"),
    r("GET", "/v1/refunds/{id}", "refund_read"),
    r("POST", "/v1/refunds", "refund_write"),
    r("POST", "/v1/refunds/{id}", "refund_write"),
    r("POST", "/v1/refunds/{id}/cancel", "refund_write"),
    // --- disputes
    r("GET", "/v1/disputes", "dispute_read"),
    r("GET", "/v1/disputes/{id}", "dispute_read"),
    r("POST", "/v1/disputes/{id}", "dispute_write"),
    r("POST", "/v1/disputes/{id}/close", "dispute_write"),
    // --- payouts
    r("GET", "/v1/payouts", "payout_read"),
    r("GET", "/v1/payouts/{id}", "payout_read"),
    r("POST", "/v1/payouts", "payout_write"),
    r("POST", "/v1/payouts/{id}", "payout_write"),
    r("POST", "/v1/payouts/{id}/cancel", "payout_write"),
    r("POST", "/v1/payouts/{id}/reverse", "payout_write"),
    // --- transfers
    r("GET", "/v1/transfers", "transfer_read"),
    r("GET", "/v1/transfers/{id}", "transfer_read"),
    r("GET", "/v1/transfers/{id}/reversals", "transfer_read"),
    r("GET", "/v1/transfers/{id}/reversals/{id}", "transfer_read"),
    r("POST", "/v1/transfers", "transfer_write"),
    r("POST", "/v1/transfers/{id}", "transfer_write"),
    r("POST", "/v1/transfers/{id}/reversals", "transfer_write"),
    r(
        "POST",
        "/v1/transfers/{id}/reversals/{id}",
        "transfer_write",
    ),
    // --- balance
    r("GET", "/v1/balance", "balance_read"),
    r(
        "GET",
        "/v1/balance_transactions",
        "balance_transaction_read",
    ),
    r(
        "GET",
        "/v1/balance_transactions/{id}",
        "balance_transaction_read",
    ),
    // --- events
    r("GET", "/v1/events", "event_read"),
    r("GET", "/v1/events/{id}", "event_read"),
    r("GET", "/v2/core/events", "event_read"),
    r("GET", "/v2/core/events/{id}", "event_read"),
    // --- checkout sessions
    r("GET", "/v1/checkout/sessions", "checkout_session_read"),
    r("GET", "/v1/checkout/sessions/{id}", "checkout_session_read"),
    r(
        "GET",
        "/v1/checkout/sessions/{id}/line_items",
        "checkout_session_read",
    ),
    r("POST", "/v1/checkout/sessions", "checkout_session_write"),
    r(
        "POST",
        "/v1/checkout/sessions/{id}",
        "checkout_session_write",
    ),
    r(
        "POST",
        "/v1/checkout/sessions/{id}/expire",
        "checkout_session_write",
    ),
    // --- payment links
    r("GET", "/v1/payment_links", "payment_link_read"),
    r("GET", "/v1/payment_links/{id}", "payment_link_read"),
    r(
        "GET",
        "/v1/payment_links/{id}/line_items",
        "payment_link_read",
    ),
    r("POST", "/v1/payment_links", "payment_link_write"),
    r("POST", "/v1/payment_links/{id}", "payment_link_write"),
    // --- subscriptions
    r("GET", "/v1/subscriptions", "subscription_read"),
    r("GET", "/v1/subscriptions/search", "subscription_read"),
    r("GET", "/v1/subscriptions/{id}", "subscription_read"),
    r("POST", "/v1/subscriptions", "subscription_write"),
    r("POST", "/v1/subscriptions/{id}", "subscription_write"),
    r(
        "POST",
        "/v1/subscriptions/{id}/resume",
        "subscription_write",
    ),
    r("DELETE", "/v1/subscriptions/{id}", "subscription_write"),
    // --- invoices
    r("GET", "/v1/invoices", "invoice_read"),
    r("GET", "/v1/invoices/search", "invoice_read"),
    r("GET", "/v1/invoices/{id}", "invoice_read"),
    r("GET", "/v1/invoices/{id}/lines", "invoice_read"),
    r("POST", "/v1/invoices", "invoice_write"),
    r("POST", "/v1/invoices/{id}", "invoice_write"),
    r("POST", "/v1/invoices/{id}/finalize", "invoice_write"),
    r("POST", "/v1/invoices/{id}/pay", "invoice_write"),
    r("POST", "/v1/invoices/{id}/send", "invoice_write"),
    r("POST", "/v1/invoices/{id}/void", "invoice_write"),
    r("DELETE", "/v1/invoices/{id}", "invoice_write"),
    // --- products
    r("GET", "/v1/products", "product_read"),
    r("GET", "/v1/products/search", "product_read"),
    r("GET", "/v1/products/{id}", "product_read"),
    r("POST", "/v1/products", "product_write"),
    r("POST", "/v1/products/{id}", "product_write"),
    r("DELETE", "/v1/products/{id}", "product_write"),
    // --- prices
    r("GET", "/v1/prices", "price_read"),
    r("GET", "/v1/prices/search", "price_read"),
    r("GET", "/v1/prices/{id}", "price_read"),
    r("POST", "/v1/prices", "price_write"),
    r("POST", "/v1/prices/{id}", "price_write"),
    // --- coupons and promotion codes
    r("GET", "/v1/coupons", "coupon_read"),
    r("GET", "/v1/coupons/{id}", "coupon_read"),
    r("POST", "/v1/coupons", "coupon_write"),
    r("POST", "/v1/coupons/{id}", "coupon_write"),
    r("DELETE", "/v1/coupons/{id}", "coupon_write"),
    r("GET", "/v1/promotion_codes", "promotion_code_read"),
    r("GET", "/v1/promotion_codes/{id}", "promotion_code_read"),
    r("POST", "/v1/promotion_codes", "promotion_code_write"),
    r("POST", "/v1/promotion_codes/{id}", "promotion_code_write"),
    // --- webhook endpoints
    r("GET", "/v1/webhook_endpoints", "webhook_read"),
    r("GET", "/v1/webhook_endpoints/{id}", "webhook_read"),
    r("POST", "/v1/webhook_endpoints", "webhook_write"),
    r("POST", "/v1/webhook_endpoints/{id}", "webhook_write"),
    r("DELETE", "/v1/webhook_endpoints/{id}", "webhook_write"),
    // --- API keys (v2)
    r("GET", "/v2/iam/api_keys", "api_key_read"),
    r("GET", "/v2/iam/api_keys/{id}", "api_key_read"),
    r("POST", "/v2/iam/api_keys", "api_key_write"),
    r("POST", "/v2/iam/api_keys/{id}", "api_key_write"),
    r("POST", "/v2/iam/api_keys/{id}/expire", "api_key_write"),
    r("POST", "/v2/iam/api_keys/{id}/rotate", "api_key_write"),
];

/// The path without query, without a trailing `/`, when every segment is a plain, non-empty
/// name (ASCII letters, digits, `_`, `-`; not `.`/`..`; no percent-encoding). `None` for
/// anything else: such a path is never matched, so never allowed.
pub fn normalized_path(path: &str) -> Option<&str> {
    let path = path.split_once('?').map_or(path, |(p, _)| p);
    let path = path.strip_suffix('/').unwrap_or(path);
    let rest = path.strip_prefix('/')?;
    if rest.is_empty() {
        return None;
    }
    let plain = rest.split('/').all(|s| {
        !s.is_empty()
            && s.bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-')
    });
    plain.then_some(path)
}

fn matches(pattern: &str, path: &str) -> bool {
    let mut p = pattern.trim_start_matches('/').split('/');
    let mut s = path.trim_start_matches('/').split('/');
    loop {
        match (p.next(), s.next()) {
            (None, None) => return true,
            (Some("{id}"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            _ => return false,
        }
    }
}

/// Literal segments in a pattern: a literal beats `{id}` (`/v1/charges/search` is a search,
/// not the charge with id `search`).
fn specificity(pattern: &str) -> usize {
    pattern.split('/').filter(|s| *s != "{id}").count()
}

/// The route that serves `method` `path` (a query is ignored), if any.
pub fn route_for(method: &str, path: &str) -> Option<&'static Route> {
    let path = normalized_path(path)?;
    ROUTES
        .iter()
        .filter(|r| r.method.eq_ignore_ascii_case(method) && matches(r.pattern, path))
        .max_by_key(|r| specificity(r.pattern))
}

/// The permission `method` `path` needs, if the route is in the table.
pub fn permission_for(method: &str, path: &str) -> Option<&'static str> {
    route_for(method, path).map(|r| r.permission)
}

/// Whether the permissions `held` serve `needed`: held as such, or `needed` is
/// `<resource>_read` and `<resource>_write` is held (write implies read).
pub fn grants<S: AsRef<str>>(held: &[S], needed: &str) -> bool {
    if held.iter().any(|p| p.as_ref() == needed) {
        return true;
    }
    match needed.strip_suffix("_read") {
        Some(resource) => held
            .iter()
            .any(|p| p.as_ref().strip_suffix("_write") == Some(resource)),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_names_a_catalogued_permission_matching_its_method() {
        for route in ROUTES {
            assert!(
                crate::api::permissions::is_known(route.permission),
                "{route:?} names a permission outside the catalogue"
            );
            let expected = if route.method == "GET" {
                "_read"
            } else {
                "_write"
            };
            assert!(
                route.permission.ends_with(expected),
                "{route:?}: GET needs a read permission, POST/DELETE a write one"
            );
            assert!(
                matches!(route.method, "GET" | "POST" | "DELETE"),
                "{route:?}"
            );
            assert_eq!(
                route_for(route.method, &route.pattern.replace("{id}", "x_1")),
                Some(route),
                "{route:?} must be the route its own path resolves to"
            );
        }
    }

    #[test]
    fn routes_are_unique() {
        let mut seen = std::collections::HashSet::new();
        for route in ROUTES {
            assert!(seen.insert((route.method, route.pattern)), "{route:?}");
        }
    }

    #[test]
    fn reads_and_writes_of_the_payment_resources_map_to_their_permissions() {
        let cases = [
            ("GET", "/v1/charges", "charge_read"),
            ("GET", "/v1/charges/ch_123", "charge_read"),
            ("POST", "/v1/charges/ch_123/capture", "charge_write"),
            ("GET", "/v1/charges/search?query=x", "charge_read"),
            ("POST", "/v1/refunds", "refund_write"),
            ("GET", "/v1/refunds/re_1/", "refund_read"),
            ("POST", "/v1/payouts", "payout_write"),
            ("POST", "/v1/transfers/tr_1/reversals", "transfer_write"),
            ("GET", "/v1/balance", "balance_read"),
            ("GET", "/v1/events/evt_1", "event_read"),
            ("GET", "/v2/core/events/evt_1", "event_read"),
            ("POST", "/v1/checkout/sessions", "checkout_session_write"),
            ("DELETE", "/v1/subscriptions/sub_1", "subscription_write"),
            ("POST", "/v1/prices", "price_write"),
            ("GET", "/v1/products/prod_1", "product_read"),
            ("DELETE", "/v1/webhook_endpoints/we_1", "webhook_write"),
            ("POST", "/v2/iam/api_keys/ak_1/rotate", "api_key_write"),
            ("get", "/v1/customers", "customer_read"),
        ];
        for (method, path, permission) in cases {
            assert_eq!(
                permission_for(method, path),
                Some(permission),
                "{method} {path}"
            );
        }
    }

    #[test]
    fn unknown_and_unusual_paths_have_no_permission() {
        for (method, path) in [
            ("GET", "/v1/warp_drives"),
            ("PUT", "/v1/charges"),
            ("DELETE", "/v1/charges/ch_1"),
            ("GET", "/v1/charges/ch_1/refunds/x/y"),
            ("GET", "/v1/charges/../refunds"),
            ("GET", "/v1/charges/%2e%2e/refunds"),
            ("GET", "/v1/charges/ch_1%2Fcapture"),
            ("GET", "/v1//charges"),
            ("GET", "v1/charges"),
            ("GET", "/"),
            ("GET", ""),
        ] {
            assert_eq!(permission_for(method, path), None, "{method} {path}");
        }
    }

    #[test]
    fn write_implies_read_but_not_the_reverse() {
        let held = ["charge_write", "customer_read"];
        assert!(grants(&held, "charge_read"));
        assert!(grants(&held, "charge_write"));
        assert!(grants(&held, "customer_read"));
        assert!(!grants(&held, "customer_write"));
        assert!(!grants(&held, "refund_write"));
        assert!(!grants(&["payment_intent_write"], "intent_read"));
        assert!(!grants::<&str>(&[], "charge_read"));
    }
}
