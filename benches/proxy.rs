//! Verifications per second (one core) of `verify-proxy`'s verify path for a 2 KiB event, with
//! one and two secrets, next to a raw HMAC-SHA256 of the same bytes, plus the replay guard, the
//! header checks that run before any body byte is read, and reading the compared fields of an
//! event for confirmation.
//!
//! Run: `cargo bench --bench proxy -- --warm-up-time 1 --measurement-time 3`
//! (criterion runs each function on one thread: `elem/s` is verifications per second per core).

use std::hint::black_box;
use std::time::Duration;

use aws_lc_rs::hmac;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use stripe_key_operator::secret::SecretString;
use stripe_key_operator::webhook::proxy::confirm::summarize;
use stripe_key_operator::webhook::proxy::{
    LoadedSecrets, ReplayCache, precheck_headers, verify_request,
};
use stripe_key_operator::webhook::signature::sign;

const T: i64 = 1_700_000_000;
const TOLERANCE: Duration = Duration::from_secs(300);

fn payload() -> Vec<u8> {
    let mut p = br#"{"id":"evt_bench","object":"event","data":{"object":{"description":""#.to_vec();
    while p.len() < 2048 - 4 {
        p.push(b'a' + (p.len() % 26) as u8);
    }
    p.extend_from_slice(br#""}}}"#);
    p.truncate(2048);
    p
}

fn bench(c: &mut Criterion) {
    let payload = payload();
    let newest = SecretString::new("whsec_newest_0123456789abcdefghijklmn");
    let older = SecretString::new("whsec_older_0123456789abcdefghijklmno");
    let one = LoadedSecrets::new(std::slice::from_ref(&newest), TOLERANCE);
    let two = LoadedSecrets::new(&[newest.clone(), older.clone()], TOLERANCE);
    let by_newest = sign(&payload, std::slice::from_ref(&newest), T);
    let by_older = sign(&payload, std::slice::from_ref(&older), T);
    let raw_key = hmac::Key::new(hmac::HMAC_SHA256, newest.expose().as_bytes());
    assert!(verify_request(&one, Some(by_newest.as_bytes()), &payload, T).is_ok());
    assert_eq!(
        verify_request(&two, Some(by_older.as_bytes()), &payload, T)
            .unwrap()
            .secret_index,
        1
    );

    let mut g = c.benchmark_group("proxy_verify_2KiB");
    g.throughput(Throughput::Elements(1));
    g.bench_function("raw_hmac_sha256", |b| {
        b.iter(|| hmac::sign(black_box(&raw_key), black_box(&payload)))
    });
    g.bench_function("one_secret", |b| {
        b.iter(|| {
            verify_request(
                black_box(&one),
                Some(black_box(by_newest.as_bytes())),
                black_box(&payload),
                T,
            )
        })
    });
    g.bench_function("two_secrets_newest_signs", |b| {
        b.iter(|| {
            verify_request(
                black_box(&two),
                Some(black_box(by_newest.as_bytes())),
                black_box(&payload),
                T,
            )
        })
    });
    // worst case: the older secret signs (blue/green, old endpoint), so both HMACs are computed
    g.bench_function("two_secrets_older_signs", |b| {
        b.iter(|| {
            verify_request(
                black_box(&two),
                Some(black_box(by_older.as_bytes())),
                black_box(&payload),
                T,
            )
        })
    });
    g.finish();

    // the replay guard at its default bound: a fresh signature inserted (and the oldest
    // evicted) per request
    let mut g = c.benchmark_group("proxy_replay_guard");
    g.throughput(Throughput::Elements(1));
    let mut cache = ReplayCache::new(100_000);
    let mut n: u64 = 0;
    g.bench_function("check_and_insert_full_100k", |b| {
        b.iter(|| {
            n += 1;
            let mut sig = [0u8; 32];
            sig[..8].copy_from_slice(&n.to_le_bytes());
            cache.check_and_insert(black_box(&[sig]), T + 300, T)
        })
    });
    g.finish();

    // what every request costs before its body is read (one header, parsed, timestamp checked),
    // and what confirmation costs locally before the call to Stripe
    let mut g = c.benchmark_group("proxy_cheap_checks");
    g.throughput(Throughput::Elements(1));
    let mut headers = axum::http::HeaderMap::new();
    headers.insert(
        "stripe-signature",
        axum::http::HeaderValue::from_str(&by_newest).unwrap(),
    );
    assert!(precheck_headers(&headers, TOLERANCE, T).is_ok());
    g.bench_function("header_precheck", |b| {
        b.iter(|| precheck_headers(black_box(&headers), TOLERANCE, T))
    });
    let event = serde_json::to_vec(&serde_json::json!({
        "id": "evt_bench", "object": "event", "type": "charge.succeeded", "created": T,
        "livemode": false, "data": {"object": {"id": "ch_bench", "description": "a".repeat(1900)}},
    }))
    .unwrap();
    assert!(summarize(&event).is_some());
    g.bench_function("event_summary_2KiB", |b| {
        b.iter(|| summarize(black_box(&event)))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
