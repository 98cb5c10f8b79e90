//! `find_secrets`: finds real-looking Stripe secret material in many settings and stays quiet
//! on placeholders, prose, publishable keys, short strings and (by default) test keys.
//!
//! Every secret is built at run time: the repository must not contain realistic secrets.

use base64::Engine;
use rand::Rng;
use stripe_key_operator::scan::{Finding, SecretKind, find_secrets};

fn random_alnum(n: usize) -> String {
    let body: String = rand::rng()
        .sample_iter(rand::distr::Alphanumeric)
        .take(n.saturating_sub(3))
        .map(char::from)
        .collect();
    // Real tokens mix cases and digits; make sure this one does too.
    format!("{body}aZ7")
}

fn secret(prefix: &str, len: usize) -> String {
    format!("{prefix}{}", random_alnum(len))
}

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

fn kinds(findings: &[Finding]) -> Vec<SecretKind> {
    findings.iter().map(|f| f.kind).collect()
}

fn assert_masked(f: &Finding, prefix: &str, secret: &str) {
    assert_eq!(
        f.masked,
        format!("{prefix}…{}", &secret[secret.len() - 4..])
    );
    assert!(!f.to_string().contains(secret));
}

#[test]
fn each_live_kind_is_found_in_yaml_with_line_column_and_mask() {
    let sk = secret("sk_live_", 24);
    let rk = secret("rk_live_", 99);
    let wh = secret("whsec_", 32);
    let yaml = format!(
        "apiVersion: v1\nkind: ConfigMap\ndata:\n  secret: {sk}\n  restricted: \"{rk}\"\n  webhook: '{wh}'\n"
    );
    let found = find_secrets(&yaml, false);
    assert_eq!(
        kinds(&found),
        [
            SecretKind::LiveSecretKey,
            SecretKind::LiveRestrictedKey,
            SecretKind::WebhookSigningSecret
        ]
    );
    assert_eq!((found[0].line, found[0].column), (4, 11));
    assert_eq!((found[1].line, found[1].column), (5, 16));
    assert_eq!((found[2].line, found[2].column), (6, 13));
    assert_masked(&found[0], "sk_live_", &sk);
    assert_masked(&found[1], "rk_live_", &rk);
    assert_masked(&found[2], "whsec_", &wh);
    assert!(found.iter().all(|f| !f.base64));
}

#[test]
fn secrets_in_env_values_and_source_code_are_found() {
    let sk = secret("sk_live_", 24);
    let wh = secret("whsec_", 32);
    let env = format!("export STRIPE_SECRET_KEY={sk}\nSTRIPE_WEBHOOK_SECRET=\"{wh}\"\n");
    assert_eq!(
        kinds(&find_secrets(&env, false)),
        [SecretKind::LiveSecretKey, SecretKind::WebhookSigningSecret]
    );
    let code = format!(
        "fn main() {{\n    let client = Client::new(\"{sk}\");\n    verify(body, \"{wh}\");\n}}\n"
    );
    let found = find_secrets(&code, false);
    assert_eq!(found.len(), 2);
    assert_eq!((found[0].line, found[0].column), (2, 31));
    assert_eq!(found[1].line, 3);
    // A prefix after `_` or `=` or quotes still counts.
    let glued = format!("KEY_{sk}");
    assert_eq!(find_secrets(&glued, false).len(), 1);
}

#[test]
fn base64_values_of_a_kubernetes_secret_are_decoded_and_scanned() {
    let rk = secret("rk_live_", 99);
    let wh = secret("whsec_", 32);
    let manifest = format!(
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: stripe\ntype: Opaque\ndata:\n  key: {}\n  webhook: {}\n  env: {}\n",
        b64(&rk),
        b64(&wh),
        b64(&format!("A=1\nSTRIPE_KEY={rk}\n")),
    );
    let found = find_secrets(&manifest, false);
    assert_eq!(
        kinds(&found),
        [
            SecretKind::LiveRestrictedKey,
            SecretKind::WebhookSigningSecret,
            SecretKind::LiveRestrictedKey
        ]
    );
    assert!(found.iter().all(|f| f.base64));
    assert_eq!((found[0].line, found[0].column), (7, 8));
    assert_eq!(found[2].line, 9);
    assert_masked(&found[0], "rk_live_", &rk);
    assert!(found[0].to_string().ends_with("(base64)"));
    // JSON manifests too, and unpadded values.
    let json = format!(
        "{{\"kind\":\"Secret\",\"data\":{{\"k\":\"{}\"}}}}",
        b64(&rk).trim_end_matches('=')
    );
    assert_eq!(
        kinds(&find_secrets(&json, false)),
        [SecretKind::LiveRestrictedKey]
    );
}

#[test]
fn test_keys_are_reported_only_when_asked_for() {
    let sk = secret("sk_test_", 24);
    let rk = secret("rk_test_", 99);
    let text = format!("a: {sk}\nb: {rk}\nc: {}\n", b64(&sk));
    assert!(find_secrets(&text, false).is_empty());
    assert_eq!(
        kinds(&find_secrets(&text, true)),
        [
            SecretKind::TestSecretKey,
            SecretKind::TestRestrictedKey,
            SecretKind::TestSecretKey
        ]
    );
}

#[test]
fn placeholders_and_prose_are_not_findings() {
    let texts = [
        "Live keys start with sk_live_ or rk_live_; signing secrets with whsec_.".to_owned(),
        "STRIPE_WEBHOOK_SECRET=whsec_...".to_owned(),
        "secret: whsec_xxx".to_owned(),
        format!("secret: whsec_{}", "x".repeat(32)),
        format!("key: sk_live_{}", "X".repeat(24)),
        format!("key: rk_live_{}", "0".repeat(24)),
        "key: sk_live_YOUR_KEY_HERE".to_owned(),
        "key: sk_live_<your key>".to_owned(),
        format!("key: sk_live_{}", "yourkeyhere".repeat(3)),
        "key: sk_live_${STRIPE_KEY}".to_owned(),
        format!(
            "data:\n  key: {}",
            b64(&format!("sk_live_{}", "X".repeat(24)))
        ),
    ];
    for t in &texts {
        assert_eq!(find_secrets(t, true), [], "false positive in {t:?}");
    }
}

#[test]
fn publishable_keys_are_not_secrets() {
    let text = format!(
        "pk: {}\npk2: {}\n",
        secret("pk_live_", 99),
        secret("pk_test_", 24)
    );
    assert!(find_secrets(&text, true).is_empty());
}

#[test]
fn short_tokens_are_not_findings() {
    let text = format!(
        "a: {}\nb: {}\n",
        secret("sk_live_", 12),
        secret("whsec_", 20)
    );
    assert!(find_secrets(&text, true).is_empty());
    // At the thresholds they are.
    let text = format!(
        "a: {}\nb: {}\n",
        secret("sk_live_", 16),
        secret("whsec_", 24)
    );
    assert_eq!(find_secrets(&text, true).len(), 2);
}

#[test]
fn a_prefix_inside_a_word_is_not_a_finding() {
    let text = format!(
        "task_live_{} mask_test_{}",
        random_alnum(24),
        random_alnum(24)
    );
    assert!(find_secrets(&text, true).is_empty());
}

#[test]
fn columns_count_characters_not_bytes() {
    let sk = secret("sk_live_", 24);
    let text = format!("clé: «{sk}»");
    let found = find_secrets(&text, false);
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].column, 7);
}

mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Whatever surrounds it, a planted live key is found once, and no finding ever
        /// shows more of it than the prefix and the last four characters.
        #[test]
        fn a_planted_key_is_found_and_only_masked(
            before in "[ -~\n]{0,80}",
            after in "[ -~\n]{0,80}",
            token in "[A-Za-z0-9]{21}",
        ) {
            let key = format!("{}{token}aZ7", "rk_live_");
            let text = format!("{before} {key} {after}");
            let found = find_secrets(&text, true);
            let expected = format!("rk_live_…{}", &key[key.len() - 4..]);
            prop_assert!(found.iter().any(|f| f.masked == expected));
            for f in &found {
                prop_assert!(!f.to_string().contains(&key));
                let tail = f.masked.split('…').nth(1).unwrap();
                prop_assert!(tail.len() <= 4);
            }
        }

        /// Arbitrary text never makes the scanner panic.
        #[test]
        fn arbitrary_text_never_panics(text in any::<String>(), include_test in any::<bool>()) {
            let _ = find_secrets(&text, include_test);
        }
    }
}
