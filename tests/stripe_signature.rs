//! Webhook signature vectors and a parser fuzz.

use std::time::Duration;

use proptest::prelude::*;
use stripe_key_operator::secret::SecretString;
use stripe_key_operator::webhook::signature::{
    DEFAULT_TOLERANCE, SignatureError, Verifier, parse_header, sign, verify,
};

const PAYLOAD: &[u8] = br#"{"id":"evt_1"}"#;
const T: i64 = 1_700_000_000;
// Computed independently: HMAC-SHA256("whsec_test_secret", "1700000000.{\"id\":\"evt_1\"}")
const SIG_TEST_SECRET: &str = "248a374f50f943a28b0f6ab50faf9a7e7e29b710fa26df9fb1618b9bf8ea9c9a";
const SIG_OTHER_SECRET: &str = "d8d091c76b586cff4dbd317fc47ebddff4b86de3ce18d3c03753c3c1901d475a";

fn s(v: &str) -> SecretString {
    SecretString::new(v)
}

#[test]
fn signer_matches_an_independently_computed_vector() {
    assert_eq!(
        sign(PAYLOAD, &[s("whsec_test_secret")], T),
        format!("t={T},v1={SIG_TEST_SECRET}")
    );
    assert_eq!(
        sign(PAYLOAD, &[s("whsec_test_secret"), s("whsec_other")], T),
        format!("t={T},v1={SIG_TEST_SECRET},v1={SIG_OTHER_SECRET}")
    );
}

#[test]
fn valid_signature_verifies() {
    let header = format!("t={T},v1={SIG_TEST_SECRET}");
    let v = Verifier::new(&[s("whsec_test_secret")]);
    let ok = v.verify_at(PAYLOAD, &header, T + 5).unwrap();
    assert_eq!(ok.timestamp, T);
    assert_eq!(ok.secret_index, 0);
    assert!(
        verify(
            PAYLOAD,
            &header,
            &[s("whsec_test_secret")],
            DEFAULT_TOLERANCE,
            T
        )
        .is_ok()
    );
}

#[test]
fn either_of_two_secrets_verifies_and_the_index_says_which() {
    let both = Verifier::new(&[s("whsec_old"), s("whsec_test_secret")]);
    let header = format!("t={T},v1={SIG_TEST_SECRET}");
    assert_eq!(both.verify_at(PAYLOAD, &header, T).unwrap().secret_index, 1);
    // a header carrying two signatures (during a roll) verifies with either secret alone
    let header = format!("t={T},v1={SIG_OTHER_SECRET},v1={SIG_TEST_SECRET}");
    assert!(
        Verifier::new(&[s("whsec_test_secret")])
            .verify_at(PAYLOAD, &header, T)
            .is_ok()
    );
    assert!(
        Verifier::new(&[s("whsec_other")])
            .verify_at(PAYLOAD, &header, T)
            .is_ok()
    );
}

#[test]
fn wrong_secret_or_altered_payload_has_no_matching_signature() {
    let header = format!("t={T},v1={SIG_TEST_SECRET}");
    let wrong = Verifier::new(&[s("whsec_wrong")]);
    assert_eq!(
        wrong.verify_at(PAYLOAD, &header, T),
        Err(SignatureError::NoMatchingSignature)
    );
    let right = Verifier::new(&[s("whsec_test_secret")]);
    assert_eq!(
        right.verify_at(br#"{"id":"evt_2"}"#, &header, T),
        Err(SignatureError::NoMatchingSignature)
    );
    // the timestamp is part of the signed payload
    let moved = format!("t={},v1={SIG_TEST_SECRET}", T + 1);
    assert_eq!(
        right.verify_at(PAYLOAD, &moved, T),
        Err(SignatureError::NoMatchingSignature)
    );
    // no secrets at all
    assert_eq!(
        Verifier::new(&[]).verify_at(PAYLOAD, &header, T),
        Err(SignatureError::NoMatchingSignature)
    );
}

#[test]
fn stale_and_future_timestamps_are_rejected_at_the_tolerance_edge() {
    let v = Verifier::new(&[s("whsec_test_secret")]);
    let header = format!("t={T},v1={SIG_TEST_SECRET}");
    assert!(v.verify_at(PAYLOAD, &header, T + 300).is_ok());
    assert!(v.verify_at(PAYLOAD, &header, T - 300).is_ok());
    assert_eq!(
        v.verify_at(PAYLOAD, &header, T + 301),
        Err(SignatureError::TimestampOutsideTolerance {
            timestamp: T,
            now: T + 301,
            tolerance_secs: 300
        })
    );
    assert!(matches!(
        v.verify_at(PAYLOAD, &header, T - 301),
        Err(SignatureError::TimestampOutsideTolerance { .. })
    ));
    let strict = Verifier::new(&[s("whsec_test_secret")]).with_tolerance(Duration::from_secs(10));
    assert!(strict.verify_at(PAYLOAD, &header, T + 10).is_ok());
    assert!(strict.verify_at(PAYLOAD, &header, T + 11).is_err());
}

#[test]
fn forged_signature_reports_no_match_even_with_a_stale_timestamp() {
    let header = format!("t=1,v1={}", "0".repeat(64));
    let v = Verifier::new(&[s("whsec_test_secret")]);
    assert_eq!(
        v.verify_at(PAYLOAD, &header, T),
        Err(SignatureError::NoMatchingSignature)
    );
}

#[test]
fn unknown_schemes_are_ignored() {
    let header = format!("t={T},v0=deadbeef,v1={SIG_TEST_SECRET},v9=zzz");
    assert!(
        Verifier::new(&[s("whsec_test_secret")])
            .verify_at(PAYLOAD, &header, T)
            .is_ok()
    );
    let parsed = parse_header(&header).unwrap();
    assert_eq!(parsed.v1.len(), 1);
}

#[test]
fn malformed_headers_are_reported_as_malformed() {
    let sig = SIG_TEST_SECRET;
    let cases = [
        String::new(),
        "garbage".to_owned(),
        format!("v1={sig}"),
        format!("t={T}"),
        format!("t={T},v0={sig}"),
        format!("t=abc,v1={sig}"),
        format!("t=-5,v1={sig}"),
        format!("t=,v1={sig}"),
        format!("t={T},t={T},v1={sig}"),
        format!("t={T},v1={sig},junk"),
        format!("t=99999999999999999999999,v1={sig}"),
        format!("t={T},{}", vec![format!("v1={sig}"); 40].join(",")),
        format!("t={T},v1={}", "a".repeat(9000)),
    ];
    let v = Verifier::new(&[s("whsec_test_secret")]);
    for header in cases {
        let err = v.verify_at(PAYLOAD, &header, T).unwrap_err();
        assert!(
            matches!(err, SignatureError::MalformedHeader(_)),
            "{header:.60}: {err:?}"
        );
    }
}

#[test]
fn v1_values_that_are_not_hex_never_match() {
    let header = format!("t={T},v1=not-hex,v1={}", &SIG_TEST_SECRET[..60]);
    let v = Verifier::new(&[s("whsec_test_secret")]);
    assert_eq!(
        v.verify_at(PAYLOAD, &header, T),
        Err(SignatureError::NoMatchingSignature)
    );
}

#[test]
fn whitespace_around_entries_is_tolerated() {
    let header = format!("t={T}, v1={SIG_TEST_SECRET} ");
    assert!(
        Verifier::new(&[s("whsec_test_secret")])
            .verify_at(PAYLOAD, &header, T)
            .is_ok()
    );
}

#[test]
fn debug_output_hides_the_secrets() {
    let v = Verifier::new(&[s("whsec_very_secret_value")]);
    assert!(!format!("{v:?}").contains("whsec_"));
    let err = v.verify_at(PAYLOAD, "t=1,v1=00", T).unwrap_err();
    assert!(!err.to_string().contains("whsec_very"));
}

/// Builds a header from cheap fragment choices (regex strategies are too slow for a million
/// cases in a debug build). Fragment 12 is a genuinely valid header, so the success path is
/// exercised too.
fn build_header(parts: &[(u8, u32)], valid: &str) -> String {
    let mut out = String::new();
    for &(kind, r) in parts {
        match kind {
            0 => out.push_str("t="),
            1 => out.push_str("v1="),
            2 => out.push_str("v0="),
            3 => out.push(','),
            4 => out.push('='),
            5 => out.push(' '),
            6 => out.push_str(&r.to_string()),
            7 => {
                for _ in 0..8 {
                    out.push_str(&format!("{r:08x}"));
                }
            }
            8 => out.push(char::from(32 + (r % 95) as u8)),
            9 => out.push(char::from_u32(r % 0x11_0000).unwrap_or('\u{fffd}')),
            10 => out.push_str("99999999999999999999"),
            11 => out.push('-'),
            12 => out.push_str(valid),
            _ => out.push(if r % 2 == 0 { '\t' } else { '\n' }),
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("SIG_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000_000),
        failure_persistence: None,
        max_shrink_iters: 1000,
        .. ProptestConfig::default()
    })]

    /// One million arbitrary headers: the parser and the verifier never panic, every rejection
    /// has the right kind, and any header the parser accepts has a timestamp and at most the
    /// allowed number of signatures.
    #[test]
    fn header_parser_never_panics_on_arbitrary_input(
        parts in prop::collection::vec((0u8..14, any::<u32>()), 0..12),
        now in 1_699_999_000i64..1_700_001_000,
    ) {
        thread_local! {
            static FIXTURE: (Verifier, String) = {
                let secrets = [SecretString::new("whsec_fuzz")];
                (Verifier::new(&secrets), sign(b"{}", &secrets, T))
            };
        }
        FIXTURE.with(|(verifier, valid)| {
            let header = build_header(&parts, valid);
            match parse_header(&header) {
                Ok(parsed) => prop_assert!(parsed.v1.len() <= 32 && parsed.timestamp >= 0),
                Err(e) => prop_assert!(matches!(e, SignatureError::MalformedHeader(_))),
            }
            let result = verifier.verify_at(b"{}", &header, now);
            if header == *valid && (now - T).abs() <= 300 {
                prop_assert!(result.is_ok());
            }
            Ok(())
        })?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, failure_persistence: None, .. ProptestConfig::default() })]

    /// Whatever the payload, timestamp and secrets, what the signer produces verifies.
    #[test]
    fn signed_payloads_always_verify(
        payload in prop::collection::vec(any::<u8>(), 0..512),
        t in 0i64..4_000_000_000,
        secrets in prop::collection::vec("whsec_[a-zA-Z0-9]{1,40}", 1..4),
        pick in any::<prop::sample::Index>(),
    ) {
        let secrets: Vec<SecretString> = secrets.into_iter().map(SecretString::new).collect();
        let header = sign(&payload, &secrets, t);
        let one = pick.get(&secrets).clone();
        let verified = Verifier::new(&[one]).verify_at(&payload, &header, t).unwrap();
        prop_assert_eq!(verified.timestamp, t);
    }
}
