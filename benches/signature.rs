//! Webhook signature verification of a 2 KiB payload, next to a raw HMAC-SHA256 of the same
//! bytes. Goal: one-secret verification within 1.5x of the raw HMAC.
//!
//! Run: `cargo bench --bench signature -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;

use aws_lc_rs::hmac;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use stripe_key_operator::secret::SecretString;
use stripe_key_operator::webhook::signature::{DEFAULT_TOLERANCE, Verifier, sign, verify};

const T: i64 = 1_700_000_000;

fn payload() -> Vec<u8> {
    // a JSON-ish 2 KiB event body
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
    let current = SecretString::new("whsec_current_0123456789abcdefghijkl");
    let previous = SecretString::new("whsec_previous_0123456789abcdefghijk");
    let header_current = sign(&payload, std::slice::from_ref(&current), T);
    let one = Verifier::new(std::slice::from_ref(&current));
    // worst case for two secrets: the header is signed by the second one, so both are computed
    let two = Verifier::new(&[previous.clone(), current.clone()]);
    let raw_key = hmac::Key::new(hmac::HMAC_SHA256, current.expose().as_bytes());
    assert!(one.verify_at(&payload, &header_current, T).is_ok());
    assert!(two.verify_at(&payload, &header_current, T).is_ok());

    let mut g = c.benchmark_group("signature_2KiB");
    g.throughput(Throughput::Bytes(payload.len() as u64));
    g.bench_function("raw_hmac_sha256", |b| {
        b.iter(|| hmac::sign(black_box(&raw_key), black_box(&payload)))
    });
    g.bench_function("hmac_of_signed_payload_t_dot_body", |b| {
        b.iter(|| {
            let mut ctx = hmac::Context::with_key(black_box(&raw_key));
            ctx.update(b"1700000000");
            ctx.update(b".");
            ctx.update(black_box(&payload));
            ctx.sign()
        })
    });
    g.bench_function("parse_header_only", |b| {
        b.iter(|| stripe_key_operator::webhook::signature::parse_header(black_box(&header_current)))
    });
    g.bench_function("verify_one_secret", |b| {
        b.iter(|| one.verify_at(black_box(&payload), black_box(&header_current), T))
    });
    g.bench_function("verify_two_secrets", |b| {
        b.iter(|| two.verify_at(black_box(&payload), black_box(&header_current), T))
    });
    g.bench_function("verify_one_secret_unprepared", |b| {
        b.iter(|| {
            verify(
                black_box(&payload),
                black_box(&header_current),
                std::slice::from_ref(&current),
                DEFAULT_TOLERANCE,
                T,
            )
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
