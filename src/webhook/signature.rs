//! Stripe webhook signatures (`Stripe-Signature: t=<unix>,v1=<hex>[,v1=<hex>...]`).
//!
//! The signed payload is `"<t>.<raw body>"`; each `v1` value is the hex HMAC-SHA256 of it keyed by
//! a `whsec_...` secret (the whole string, prefix included). During a secret roll Stripe sends one
//! `v1` per valid secret, so a receiver verifies against every secret it holds. Other schemes
//! (`v0`, anything unknown) are ignored. Comparisons are constant time; the timestamp must lie
//! within a tolerance of the receiver's clock in both directions (default 300 s).
//!
//! ```
//! use stripe_key_operator::secret::SecretString;
//! use stripe_key_operator::webhook::signature::{sign, Verifier};
//!
//! let secrets = [SecretString::new("whsec_example")];
//! let header = sign(b"{}", &secrets, 1_700_000_000);
//! let verified = Verifier::new(&secrets).verify_at(b"{}", &header, 1_700_000_010).unwrap();
//! assert_eq!(verified.secret_index, 0);
//! ```

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::constant_time::verify_slices_are_equal;
use aws_lc_rs::hmac;

use crate::secret::SecretString;

/// Stripe's libraries accept signatures whose timestamp is at most this far from now.
pub const DEFAULT_TOLERANCE: Duration = Duration::from_secs(300);

/// Longest header accepted; anything larger is treated as malformed before parsing.
pub const MAX_HEADER_LEN: usize = 8 * 1024;

/// Most `v1` entries accepted in one header (Stripe sends one per valid secret, at most a few).
pub const MAX_SIGNATURES: usize = 32;

/// Why a `Stripe-Signature` header was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// The header could not be parsed (missing `t=`, no `v1=`, bad number, oversized...).
    #[error("malformed Stripe-Signature header: {0}")]
    MalformedHeader(&'static str),
    /// The header parsed, but no `v1` signature matches any configured secret. Either the
    /// payload was altered, the wrong secret is configured, or the request is forged.
    #[error(
        "no v1 signature in the Stripe-Signature header matches any configured webhook secret; \
         check that the receiver holds the endpoint's current whsec_ secret"
    )]
    NoMatchingSignature,
    /// A signature matched, but its timestamp is too old (replay) or too far in the future.
    #[error(
        "Stripe-Signature timestamp {timestamp} is outside the tolerance of {tolerance_secs}s \
         around now ({now}); check the receiver's clock or resend the event"
    )]
    TimestampOutsideTolerance {
        /// The `t=` value of the header (unix seconds).
        timestamp: i64,
        /// The receiver's clock (unix seconds).
        now: i64,
        /// The tolerance that was applied, in seconds.
        tolerance_secs: u64,
    },
}

/// A parsed `Stripe-Signature` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignatureHeader {
    /// The `t=` timestamp (unix seconds).
    pub timestamp: i64,
    /// The decoded `v1` signatures. Values that are not 64 hex characters are kept out: they can
    /// never match, and Stripe's libraries treat them the same way.
    pub v1: Vec<[u8; 32]>,
}

/// The outcome of a successful verification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VerifiedSignature {
    /// The `t=` timestamp of the header.
    pub timestamp: i64,
    /// Index (into the secrets given to the verifier) of the secret that matched. Useful to see
    /// whether senders still sign with an old secret during a roll.
    pub secret_index: usize,
}

/// Parses a `Stripe-Signature` header. Unknown schemes (`v0`, ...) are ignored; at least one
/// `v1` entry and exactly one `t` entry are required.
pub fn parse_header(header: &str) -> Result<SignatureHeader, SignatureError> {
    let mut sigs = [[0u8; 32]; MAX_SIGNATURES];
    let (timestamp, count) = parse_into(header, &mut sigs)?;
    Ok(SignatureHeader {
        timestamp,
        v1: sigs[..count].to_vec(),
    })
}

/// The parser without allocation: decodes the valid `v1` values into `sigs` and returns the
/// timestamp and how many were decoded.
fn parse_into(
    header: &str,
    sigs: &mut [[u8; 32]; MAX_SIGNATURES],
) -> Result<(i64, usize), SignatureError> {
    if header.len() > MAX_HEADER_LEN {
        return Err(SignatureError::MalformedHeader("header is too long"));
    }
    let mut timestamp: Option<i64> = None;
    let mut decoded = 0usize;
    let mut v1_entries = 0usize;
    for item in header.split(',') {
        let item = item.trim();
        if item.is_empty() {
            continue;
        }
        let Some((scheme, value)) = item.split_once('=') else {
            return Err(SignatureError::MalformedHeader(
                "an entry is not of the form key=value",
            ));
        };
        match scheme.trim() {
            "t" => {
                if timestamp.is_some() {
                    return Err(SignatureError::MalformedHeader("more than one t= entry"));
                }
                let value = value.trim();
                if value.is_empty()
                    || value.len() > 18
                    || !value.bytes().all(|b| b.is_ascii_digit())
                {
                    return Err(SignatureError::MalformedHeader(
                        "t= is not a unix timestamp in seconds",
                    ));
                }
                let parsed = value.parse::<i64>().map_err(|_| {
                    SignatureError::MalformedHeader("t= is not a unix timestamp in seconds")
                })?;
                timestamp = Some(parsed);
            }
            "v1" => {
                v1_entries += 1;
                if v1_entries > MAX_SIGNATURES {
                    return Err(SignatureError::MalformedHeader("too many v1 signatures"));
                }
                if decode_hex32(value.trim().as_bytes(), &mut sigs[decoded]) {
                    decoded += 1;
                }
            }
            _ => {}
        }
    }
    let Some(timestamp) = timestamp else {
        return Err(SignatureError::MalformedHeader("no t= timestamp"));
    };
    if v1_entries == 0 {
        return Err(SignatureError::MalformedHeader("no v1 signature"));
    }
    Ok((timestamp, decoded))
}

/// Decodes exactly 64 hex digits (either case) into `out`; false for anything else.
fn decode_hex32(hex: &[u8], out: &mut [u8; 32]) -> bool {
    fn nibble(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        }
    }
    if hex.len() != 64 {
        return false;
    }
    for (i, pair) in hex.chunks_exact(2).enumerate() {
        match (nibble(pair[0]), nibble(pair[1])) {
            (Some(h), Some(l)) => out[i] = (h << 4) | l,
            _ => return false,
        }
    }
    true
}

/// Writes the decimal form of a non-negative timestamp into `buf` without allocating.
fn decimal(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    &buf[i..]
}

/// Computes the `Stripe-Signature` header for `payload` at `timestamp`, one `v1` per secret.
/// Used by tests and the simulator; receivers use [`Verifier`].
pub fn sign(payload: &[u8], secrets: &[SecretString], timestamp: i64) -> String {
    let mut header = format!("t={timestamp}");
    let ts = timestamp.to_string();
    for secret in secrets {
        let key = hmac::Key::new(hmac::HMAC_SHA256, secret.expose().as_bytes());
        let tag = signed_payload_tag(&key, ts.as_bytes(), payload);
        header.push_str(",v1=");
        header.push_str(&hex::encode(tag.as_ref()));
    }
    header
}

fn signed_payload_tag(key: &hmac::Key, timestamp: &[u8], payload: &[u8]) -> hmac::Tag {
    let mut ctx = hmac::Context::with_key(key);
    ctx.update(timestamp);
    ctx.update(b".");
    ctx.update(payload);
    ctx.sign()
}

/// Verifies `header` for `payload` against `secrets` at time `now` (unix seconds).
///
/// Convenience for one-off checks; a receiver that verifies many requests keeps a [`Verifier`],
/// which prepares the HMAC keys once.
pub fn verify(
    payload: &[u8],
    header: &str,
    secrets: &[SecretString],
    tolerance: Duration,
    now: i64,
) -> Result<VerifiedSignature, SignatureError> {
    Verifier::new(secrets)
        .with_tolerance(tolerance)
        .verify_at(payload, header, now)
}

/// A webhook signature verifier holding prepared HMAC keys for one or more secrets.
///
/// `Debug` never shows the secrets.
#[derive(Clone)]
pub struct Verifier {
    keys: Vec<hmac::Key>,
    tolerance: Duration,
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verifier")
            .field("secrets", &self.keys.len())
            .field("tolerance", &self.tolerance)
            .finish()
    }
}

impl Verifier {
    /// A verifier accepting a signature by any of `secrets`, with [`DEFAULT_TOLERANCE`].
    pub fn new(secrets: &[SecretString]) -> Self {
        Self {
            keys: secrets
                .iter()
                .map(|s| hmac::Key::new(hmac::HMAC_SHA256, s.expose().as_bytes()))
                .collect(),
            tolerance: DEFAULT_TOLERANCE,
        }
    }

    /// Sets the accepted distance between the header's timestamp and now (both directions).
    pub fn with_tolerance(mut self, tolerance: Duration) -> Self {
        self.tolerance = tolerance;
        self
    }

    /// The tolerance in use.
    pub fn tolerance(&self) -> Duration {
        self.tolerance
    }

    /// Verifies against the system clock.
    pub fn verify(
        &self,
        payload: &[u8],
        header: &str,
    ) -> Result<VerifiedSignature, SignatureError> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        self.verify_at(payload, header, now)
    }

    /// Verifies with `now` (unix seconds) as the receiver's clock.
    ///
    /// The signature is checked before the timestamp, so a forged header is reported as
    /// [`SignatureError::NoMatchingSignature`] whatever its timestamp.
    pub fn verify_at(
        &self,
        payload: &[u8],
        header: &str,
        now: i64,
    ) -> Result<VerifiedSignature, SignatureError> {
        let mut sigs = [[0u8; 32]; MAX_SIGNATURES];
        let (timestamp, count) = parse_into(header, &mut sigs)?;
        let mut buf = [0u8; 20];
        // the parser only accepts digits, so the timestamp is never negative
        let ts = decimal(timestamp.unsigned_abs(), &mut buf);
        let mut matched: Option<usize> = None;
        for (index, key) in self.keys.iter().enumerate() {
            let expected = signed_payload_tag(key, ts, payload);
            let expected = expected.as_ref();
            // constant-time comparison (CRYPTO_memcmp); every candidate is compared
            let mut hit = false;
            for candidate in &sigs[..count] {
                hit |= verify_slices_are_equal(candidate, expected).is_ok();
            }
            if hit {
                matched = Some(index);
                break;
            }
        }
        let Some(secret_index) = matched else {
            return Err(SignatureError::NoMatchingSignature);
        };
        let tolerance_secs = self.tolerance.as_secs();
        let tol = i64::try_from(tolerance_secs).unwrap_or(i64::MAX);
        if timestamp.abs_diff(now) > tol.unsigned_abs() {
            return Err(SignatureError::TimestampOutsideTolerance {
                timestamp,
                now,
                tolerance_secs,
            });
        }
        Ok(VerifiedSignature {
            timestamp,
            secret_index,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_decoding_accepts_exactly_64_hex_digits() {
        let mut out = [0u8; 32];
        assert!(decode_hex32(&[b'a'; 64], &mut out));
        assert_eq!(out, [0xaa; 32]);
        assert!(decode_hex32("0F".repeat(32).as_bytes(), &mut out));
        assert_eq!(out, [0x0f; 32]);
        assert!(!decode_hex32(&[b'a'; 63], &mut out));
        assert!(!decode_hex32(&[b'a'; 66], &mut out));
        assert!(!decode_hex32(&[b'g'; 64], &mut out));
    }

    #[test]
    fn decimal_formats_like_to_string() {
        let mut buf = [0u8; 20];
        for n in [
            0u64,
            7,
            10,
            1_700_000_000,
            999_999_999_999_999_999,
            u64::MAX,
        ] {
            assert_eq!(decimal(n, &mut buf), n.to_string().as_bytes());
        }
    }
}
