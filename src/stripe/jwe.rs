//! Compact JWE for live-mode secrets, and the operator's RSA key pair.
//!
//! Stripe returns a live-mode secret only once, as `secret_key.encrypted_secret` with
//! `format: "jwe_compact"`: `BASE64URL(header).BASE64URL(encrypted CEK).BASE64URL(IV).
//! BASE64URL(ciphertext).BASE64URL(tag)`, the CEK wrapped with RSA-OAEP (SHA-1) or RSA-OAEP-256
//! to the public key the operator sent, the content encrypted with A256GCM using the ASCII of the
//! protected header's base64url form as additional authenticated data (RFC 7516 §5.2).
//!
//! The operator generates one 3072-bit key pair per account ([`JweKeyPair::generate`]), sends
//! [`JweKeyPair::public_key_pem`] as `public_key.pem_key.data`, stores
//! [`JweKeyPair::to_pkcs8_pem`] in Vault and loads it back with [`JweKeyPair::from_pkcs8_pem`].
//!
//! Secret material is wiped from memory when dropped: the private key's DER and base64 forms
//! ([`zeroize::Zeroizing`] buffers, sized up front so that no reallocation leaves a copy), the
//! unwrapped content-encryption key, the decrypted plaintext buffer, and the returned
//! [`SecretString`]. The RSA key itself lives in aws-lc, which clears its allocations when they
//! are freed.

use std::fmt;

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rsa::{
    KeySize, OAEP_SHA1_MGF1SHA1, OAEP_SHA256_MGF1SHA256, OaepAlgorithm, OaepPrivateDecryptingKey,
    OaepPublicEncryptingKey, PrivateDecryptingKey, PublicEncryptingKey,
};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use zeroize::Zeroizing;

use crate::secret::SecretString;

use super::types::{PemKey, PublicKeyParam};

/// Largest compact JWE accepted (a secret key token is ~110 bytes; this is generous).
pub const MAX_COMPACT_LEN: usize = 64 * 1024;

/// Smallest RSA key Stripe accepts for `public_key`.
pub const MIN_RSA_BITS: usize = 2048;

/// Errors of JWE decryption and key handling. Messages never contain key material or plaintext.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JweError {
    /// The compact serialization is not well formed.
    #[error("malformed JWE: {0}")]
    Malformed(String),
    /// The `alg` (key management) is not RSA-OAEP or RSA-OAEP-256.
    #[error("unsupported JWE key algorithm {0:?}: expected RSA-OAEP or RSA-OAEP-256")]
    UnsupportedAlgorithm(String),
    /// The `enc` (content encryption) is not A256GCM.
    #[error("unsupported JWE content encryption {0:?}: expected A256GCM")]
    UnsupportedEncryption(String),
    /// The header asks for something this decoder does not do (`zip`, `crit`).
    #[error("unsupported JWE header parameter {0:?}")]
    UnsupportedHeader(String),
    /// Unwrapping the content key or authenticating the content failed: the JWE was encrypted
    /// to a different key pair or was altered.
    #[error(
        "JWE decryption failed: the secret was encrypted to another key pair or was altered; \
         check that the account's private key in Vault matches the public key sent to Stripe"
    )]
    Decryption,
    /// The decrypted secret is not UTF-8.
    #[error("the decrypted secret is not UTF-8 text")]
    NotUtf8,
    /// A PEM or DER key could not be parsed or is unacceptable.
    #[error("invalid RSA key: {0}")]
    InvalidKey(String),
    /// Key generation or serialization failed inside the crypto library.
    #[error("RSA key operation failed: {0}")]
    Crypto(&'static str),
}

/// The RSA key-wrapping algorithm of a JWE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyWrapAlgorithm {
    /// `RSA-OAEP`: OAEP with SHA-1 and MGF1-SHA-1.
    RsaOaep,
    /// `RSA-OAEP-256`: OAEP with SHA-256 and MGF1-SHA-256.
    RsaOaep256,
}

impl KeyWrapAlgorithm {
    /// The JOSE `alg` name.
    pub fn name(self) -> &'static str {
        match self {
            KeyWrapAlgorithm::RsaOaep => "RSA-OAEP",
            KeyWrapAlgorithm::RsaOaep256 => "RSA-OAEP-256",
        }
    }

    fn oaep(self) -> &'static OaepAlgorithm {
        match self {
            KeyWrapAlgorithm::RsaOaep => &OAEP_SHA1_MGF1SHA1,
            KeyWrapAlgorithm::RsaOaep256 => &OAEP_SHA256_MGF1SHA256,
        }
    }

    fn from_name(name: &str) -> Result<Self, JweError> {
        match name {
            "RSA-OAEP" => Ok(KeyWrapAlgorithm::RsaOaep),
            "RSA-OAEP-256" => Ok(KeyWrapAlgorithm::RsaOaep256),
            other => Err(JweError::UnsupportedAlgorithm(truncate(other))),
        }
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(32).collect()
}

/// The operator's RSA key pair for one account. `Debug` shows only the size.
#[derive(Clone)]
pub struct JweKeyPair {
    private: PrivateDecryptingKey,
}

impl fmt::Debug for JweKeyPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JweKeyPair")
            .field("bits", &self.private.key_size_bits())
            .finish_non_exhaustive()
    }
}

impl JweKeyPair {
    /// Generates a fresh 3072-bit key pair (takes a few hundred milliseconds).
    pub fn generate() -> Result<Self, JweError> {
        Self::generate_with_size(KeySize::Rsa3072)
    }

    /// Generates a key pair of the given size (tests use 2048 bits to save time).
    pub fn generate_with_size(size: KeySize) -> Result<Self, JweError> {
        let private = PrivateDecryptingKey::generate(size)
            .map_err(|_| JweError::Crypto("RSA key generation failed"))?;
        Ok(Self { private })
    }

    /// Loads a PKCS#8 private key (`-----BEGIN PRIVATE KEY-----`) as stored in Vault.
    pub fn from_pkcs8_pem(pem: &SecretString) -> Result<Self, JweError> {
        let der = Zeroizing::new(pem_decode(pem.expose(), "PRIVATE KEY")?);
        let private = PrivateDecryptingKey::from_pkcs8(&der).map_err(|e| {
            JweError::InvalidKey(format!("not an acceptable RSA PKCS#8 private key ({e})"))
        })?;
        if private.key_size_bits() < MIN_RSA_BITS {
            return Err(JweError::InvalidKey(format!(
                "the RSA key has {} bits; at least {MIN_RSA_BITS} are required",
                private.key_size_bits()
            )));
        }
        Ok(Self { private })
    }

    /// The private key as PKCS#8 PEM, for storing in Vault. Treat it as a secret.
    pub fn to_pkcs8_pem(&self) -> Result<SecretString, JweError> {
        let der = AsDer::<aws_lc_rs::encoding::Pkcs8V1Der>::as_der(&self.private)
            .map_err(|_| JweError::Crypto("PKCS#8 serialization failed"))?;
        Ok(SecretString::from(pem_encode("PRIVATE KEY", der.as_ref())))
    }

    /// The public key as SubjectPublicKeyInfo PEM (`-----BEGIN PUBLIC KEY-----`), the value of
    /// `public_key.pem_key.data`.
    pub fn public_key_pem(&self) -> Result<String, JweError> {
        let der =
            AsDer::<aws_lc_rs::encoding::PublicKeyX509Der>::as_der(&self.private.public_key())
                .map_err(|_| JweError::Crypto("public key serialization failed"))?;
        Ok(pem_encode("PUBLIC KEY", der.as_ref()))
    }

    /// The `public_key` request parameter for create and rotate.
    pub fn public_key_param(&self, id: Option<String>) -> Result<PublicKeyParam, JweError> {
        Ok(PublicKeyParam {
            id,
            pem_key: PemKey {
                algorithm: "RSA".to_owned(),
                data: self.public_key_pem()?,
            },
        })
    }

    /// Key size in bits.
    pub fn key_size_bits(&self) -> usize {
        self.private.key_size_bits()
    }

    /// SHA-256 fingerprint (first 12 hex) of the public key DER: safe to log and to use as the
    /// `public_key.id` / `recipient_key_id`.
    pub fn public_key_fingerprint(&self) -> Result<String, JweError> {
        let der =
            AsDer::<aws_lc_rs::encoding::PublicKeyX509Der>::as_der(&self.private.public_key())
                .map_err(|_| JweError::Crypto("public key serialization failed"))?;
        Ok(crate::secret::fingerprint(der.as_ref()))
    }

    /// Decrypts a compact JWE (`RSA-OAEP`/`RSA-OAEP-256` + `A256GCM`) into the secret it holds.
    pub fn decrypt(&self, compact: &str) -> Result<SecretString, JweError> {
        decrypt_compact(&self.private, compact)
    }
}

#[derive(serde::Deserialize)]
struct ProtectedHeader {
    alg: Option<String>,
    enc: Option<String>,
    zip: Option<serde_json::Value>,
    crit: Option<serde_json::Value>,
}

fn b64(part: &str, what: &str) -> Result<Vec<u8>, JweError> {
    URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| JweError::Malformed(format!("the {what} is not unpadded base64url")))
}

fn decrypt_compact(
    private: &PrivateDecryptingKey,
    compact: &str,
) -> Result<SecretString, JweError> {
    let compact = compact.trim();
    if compact.len() > MAX_COMPACT_LEN {
        return Err(JweError::Malformed(format!(
            "longer than {MAX_COMPACT_LEN} bytes"
        )));
    }
    let parts: Vec<&str> = compact.split('.').collect();
    if parts.len() != 5 {
        return Err(JweError::Malformed(format!(
            "expected 5 dot-separated parts, found {}",
            parts.len()
        )));
    }
    let header_bytes = b64(parts[0], "protected header")?;
    let header: ProtectedHeader = serde_json::from_slice(&header_bytes)
        .map_err(|_| JweError::Malformed("the protected header is not a JSON object".into()))?;
    if header.zip.is_some() {
        return Err(JweError::UnsupportedHeader("zip".into()));
    }
    if header.crit.is_some() {
        return Err(JweError::UnsupportedHeader("crit".into()));
    }
    let alg = KeyWrapAlgorithm::from_name(
        header
            .alg
            .as_deref()
            .ok_or_else(|| JweError::Malformed("the protected header has no alg".into()))?,
    )?;
    match header.enc.as_deref() {
        Some("A256GCM") => {}
        Some(other) => return Err(JweError::UnsupportedEncryption(truncate(other))),
        None => {
            return Err(JweError::Malformed(
                "the protected header has no enc".into(),
            ));
        }
    }
    let encrypted_key = b64(parts[1], "encrypted key")?;
    let iv = b64(parts[2], "initialization vector")?;
    // Decrypted in place: after `open` this buffer holds the plaintext secret.
    let mut ciphertext = Zeroizing::new(b64(parts[3], "ciphertext")?);
    let tag = b64(parts[4], "authentication tag")?;

    let oaep = OaepPrivateDecryptingKey::new(private.clone())
        .map_err(|_| JweError::Crypto("RSA-OAEP key setup failed"))?;
    if encrypted_key.len() != oaep.key_size_bytes() {
        return Err(JweError::Malformed(format!(
            "the encrypted key has {} bytes; this {}-bit key expects {}",
            encrypted_key.len(),
            oaep.key_size_bits(),
            oaep.key_size_bytes()
        )));
    }
    if iv.len() != 12 {
        return Err(JweError::Malformed(format!(
            "the A256GCM initialization vector must be 12 bytes, found {}",
            iv.len()
        )));
    }
    if tag.len() != 16 {
        return Err(JweError::Malformed(format!(
            "the A256GCM authentication tag must be 16 bytes, found {}",
            tag.len()
        )));
    }
    let mut cek_buf = Zeroizing::new(vec![0u8; oaep.min_output_size()]);
    let cek = oaep
        .decrypt(alg.oaep(), &encrypted_key, cek_buf.as_mut_slice(), None)
        .map_err(|_| JweError::Decryption)?;
    if cek.len() != 32 {
        return Err(JweError::Decryption);
    }
    let key = UnboundKey::new(&AES_256_GCM, cek).map_err(|_| JweError::Decryption)?;
    let key = LessSafeKey::new(key);
    let nonce = Nonce::try_assume_unique_for_key(&iv)
        .map_err(|_| JweError::Malformed("bad initialization vector".into()))?;
    let plaintext = key
        .open_in_place_separate_tag(nonce, Aad::from(parts[0].as_bytes()), &tag, &mut ciphertext)
        .map_err(|_| JweError::Decryption)?;
    let text = std::str::from_utf8(plaintext).map_err(|_| JweError::NotUtf8)?;
    Ok(SecretString::new(text))
}

/// Parses a SubjectPublicKeyInfo PEM RSA public key and checks it has at least
/// [`MIN_RSA_BITS`] bits. Used by the simulator to validate `public_key.pem_key.data`.
pub fn parse_public_key_pem(pem: &str) -> Result<PublicEncryptingKey, JweError> {
    let der = pem_decode(pem, "PUBLIC KEY")?;
    let key = PublicEncryptingKey::from_der(&der)
        .map_err(|e| JweError::InvalidKey(format!("not an acceptable RSA public key ({e})")))?;
    if key.key_size_bits() < MIN_RSA_BITS {
        return Err(JweError::InvalidKey(format!(
            "the RSA key has {} bits; at least {MIN_RSA_BITS} are required",
            key.key_size_bits()
        )));
    }
    Ok(key)
}

/// Encrypts `plaintext` to `public_key` as a compact JWE with `alg` + A256GCM. This is what
/// Stripe (and the simulator) do; the operator itself only decrypts.
pub fn encrypt_compact(
    public_key: &PublicEncryptingKey,
    alg: KeyWrapAlgorithm,
    plaintext: &[u8],
    kid: Option<&str>,
) -> Result<String, JweError> {
    let mut header = serde_json::json!({ "alg": alg.name(), "enc": "A256GCM" });
    if let Some(kid) = kid {
        header["kid"] = serde_json::Value::String(kid.to_owned());
    }
    let header_b64 = URL_SAFE_NO_PAD.encode(header.to_string());
    let mut cek = Zeroizing::new([0u8; 32]);
    let mut iv = [0u8; 12];
    aws_lc_rs::rand::fill(cek.as_mut_slice())
        .map_err(|_| JweError::Crypto("random generation failed"))?;
    aws_lc_rs::rand::fill(&mut iv).map_err(|_| JweError::Crypto("random generation failed"))?;
    let oaep = OaepPublicEncryptingKey::new(public_key.clone())
        .map_err(|_| JweError::Crypto("RSA-OAEP key setup failed"))?;
    let mut wrapped = vec![0u8; oaep.ciphertext_size()];
    let wrapped = oaep
        .encrypt(alg.oaep(), cek.as_slice(), &mut wrapped, None)
        .map_err(|_| JweError::Crypto("RSA-OAEP encryption failed"))?;
    let key = LessSafeKey::new(
        UnboundKey::new(&AES_256_GCM, cek.as_slice())
            .map_err(|_| JweError::Crypto("AES key setup failed"))?,
    );
    let mut in_out = Zeroizing::new(plaintext.to_vec());
    let tag = key
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(iv),
            Aad::from(header_b64.as_bytes()),
            &mut in_out,
        )
        .map_err(|_| JweError::Crypto("AES-GCM encryption failed"))?;
    Ok(format!(
        "{header_b64}.{}.{}.{}.{}",
        URL_SAFE_NO_PAD.encode(wrapped),
        URL_SAFE_NO_PAD.encode(iv),
        URL_SAFE_NO_PAD.encode(&*in_out),
        URL_SAFE_NO_PAD.encode(tag.as_ref())
    ))
}

/// PEM of `der`. The result is allocated once at its final size and the base64 intermediate is
/// wiped, so a private key leaves no partial copy behind.
fn pem_encode(label: &str, der: &[u8]) -> String {
    let b64 = Zeroizing::new(STANDARD.encode(der));
    let begin = format!("-----BEGIN {label}-----\n");
    let end = format!("-----END {label}-----\n");
    let mut out =
        String::with_capacity(begin.len() + b64.len() + b64.len().div_ceil(64) + end.len());
    out.push_str(&begin);
    for chunk in b64.as_bytes().chunks(64) {
        // base64 output is ASCII, so every chunk is valid UTF-8
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&end);
    out
}

fn pem_decode(pem: &str, label: &str) -> Result<Vec<u8>, JweError> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let pem = pem.trim();
    let Some(rest) = pem.strip_prefix(&begin) else {
        return Err(JweError::InvalidKey(format!(
            "expected a PEM block starting with {begin}"
        )));
    };
    let Some(body) = rest.strip_suffix(&end) else {
        return Err(JweError::InvalidKey(format!(
            "expected the PEM block to end with {end}"
        )));
    };
    // The base64 of a private key: collected into one buffer of its final size, then wiped.
    let mut joined = Zeroizing::new(String::with_capacity(body.len()));
    for part in body.split_whitespace() {
        joined.push_str(part);
    }
    STANDARD
        .decode(joined.as_bytes())
        .map_err(|_| JweError::InvalidKey("the PEM body is not base64".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::OnceLock;

    fn pair() -> &'static JweKeyPair {
        static PAIR: OnceLock<JweKeyPair> = OnceLock::new();
        PAIR.get_or_init(|| JweKeyPair::generate_with_size(KeySize::Rsa2048).unwrap())
    }

    fn public(p: &JweKeyPair) -> PublicEncryptingKey {
        parse_public_key_pem(&p.public_key_pem().unwrap()).unwrap()
    }

    #[test]
    fn a_private_key_pem_is_built_in_one_allocation_of_its_final_size() {
        // A String that grows reallocates and leaves the old bytes (here: key material) in
        // freed memory; the PEM is sized up front instead.
        for len in [0usize, 1, 47, 48, 49, 1217, 1794] {
            let pem = pem_encode("PRIVATE KEY", &vec![7u8; len]);
            assert_eq!(pem.capacity(), pem.len(), "DER of {len} bytes");
        }
        let key = JweKeyPair::generate_with_size(KeySize::Rsa2048).unwrap();
        let pem = key.to_pkcs8_pem().unwrap();
        let back = JweKeyPair::from_pkcs8_pem(&pem).unwrap();
        assert_eq!(
            back.public_key_fingerprint().unwrap(),
            key.public_key_fingerprint().unwrap()
        );
    }

    #[test]
    fn round_trip_with_both_key_wrap_algorithms() {
        let p = pair();
        for alg in [KeyWrapAlgorithm::RsaOaep, KeyWrapAlgorithm::RsaOaep256] {
            let jwe = encrypt_compact(&public(p), alg, b"rk_live_secret", Some("kid1")).unwrap();
            assert_eq!(p.decrypt(&jwe).unwrap().expose(), "rk_live_secret");
        }
    }

    #[test]
    fn pkcs8_pem_round_trip_keeps_the_key() {
        let p = pair();
        let pem = p.to_pkcs8_pem().unwrap();
        assert!(pem.expose().starts_with("-----BEGIN PRIVATE KEY-----\n"));
        let loaded = JweKeyPair::from_pkcs8_pem(&pem).unwrap();
        assert_eq!(
            loaded.public_key_pem().unwrap(),
            p.public_key_pem().unwrap()
        );
        let jwe = encrypt_compact(&public(p), KeyWrapAlgorithm::RsaOaep256, b"x", None).unwrap();
        assert_eq!(loaded.decrypt(&jwe).unwrap().expose(), "x");
        assert!(!format!("{loaded:?}").contains("BEGIN"));
    }

    #[test]
    fn generated_key_is_3072_bits() {
        let p = JweKeyPair::generate().unwrap();
        assert_eq!(p.key_size_bits(), 3072);
        assert!(
            p.public_key_pem()
                .unwrap()
                .starts_with("-----BEGIN PUBLIC KEY-----\n")
        );
    }

    fn valid_jwe() -> String {
        encrypt_compact(
            &public(pair()),
            KeyWrapAlgorithm::RsaOaep256,
            b"secret",
            None,
        )
        .unwrap()
    }

    fn replace_part(jwe: &str, index: usize, value: &str) -> String {
        let mut parts: Vec<String> = jwe.split('.').map(str::to_owned).collect();
        parts[index] = value.to_owned();
        parts.join(".")
    }

    fn header(json: &str) -> String {
        URL_SAFE_NO_PAD.encode(json)
    }

    #[test]
    fn malformed_inputs_are_rejected_with_clear_errors() {
        let p = pair();
        let good = valid_jwe();
        type Check = fn(&JweError) -> bool;
        let cases: Vec<(String, Check)> = vec![
            (String::new(), |e| matches!(e, JweError::Malformed(_))),
            ("a.b.c.d".into(), |e| matches!(e, JweError::Malformed(_))),
            ("a.b.c.d.e.f".into(), |e| {
                matches!(e, JweError::Malformed(_))
            }),
            (replace_part(&good, 0, "!!!"), |e| {
                matches!(e, JweError::Malformed(_))
            }),
            (replace_part(&good, 0, &header("[1,2]")), |e| {
                matches!(e, JweError::Malformed(_))
            }),
            (
                replace_part(&good, 0, &header(r#"{"alg":"RSA1_5","enc":"A256GCM"}"#)),
                |e| matches!(e, JweError::UnsupportedAlgorithm(_)),
            ),
            (
                replace_part(&good, 0, &header(r#"{"alg":"dir","enc":"A256GCM"}"#)),
                |e| matches!(e, JweError::UnsupportedAlgorithm(_)),
            ),
            (
                replace_part(
                    &good,
                    0,
                    &header(r#"{"alg":"RSA-OAEP-256","enc":"A128CBC-HS256"}"#),
                ),
                |e| matches!(e, JweError::UnsupportedEncryption(_)),
            ),
            (
                replace_part(&good, 0, &header(r#"{"alg":"RSA-OAEP-256"}"#)),
                |e| matches!(e, JweError::Malformed(_)),
            ),
            (
                replace_part(
                    &good,
                    0,
                    &header(r#"{"alg":"RSA-OAEP-256","enc":"A256GCM","zip":"DEF"}"#),
                ),
                |e| matches!(e, JweError::UnsupportedHeader(_)),
            ),
            // a valid header that is not the one the content was sealed with: AAD mismatch
            (
                replace_part(
                    &good,
                    0,
                    &header(r#"{"enc":"A256GCM","alg":"RSA-OAEP-256"}"#),
                ),
                |e| matches!(e, JweError::Decryption),
            ),
            (replace_part(&good, 1, "AAAA"), |e| {
                matches!(e, JweError::Malformed(_))
            }),
            (
                replace_part(&good, 1, &URL_SAFE_NO_PAD.encode([7u8; 256])),
                |e| matches!(e, JweError::Decryption),
            ),
            (
                replace_part(&good, 2, &URL_SAFE_NO_PAD.encode([0u8; 16])),
                |e| matches!(e, JweError::Malformed(_)),
            ),
            (
                replace_part(&good, 2, &URL_SAFE_NO_PAD.encode([0u8; 12])),
                |e| matches!(e, JweError::Decryption),
            ),
            (replace_part(&good, 3, "AAAAAAAA"), |e| {
                matches!(e, JweError::Decryption)
            }),
            (
                replace_part(&good, 4, &URL_SAFE_NO_PAD.encode([0u8; 8])),
                |e| matches!(e, JweError::Malformed(_)),
            ),
            (
                replace_part(&good, 4, &URL_SAFE_NO_PAD.encode([0u8; 16])),
                |e| matches!(e, JweError::Decryption),
            ),
            ("x".repeat(MAX_COMPACT_LEN + 1), |e| {
                matches!(e, JweError::Malformed(_))
            }),
        ];
        for (input, check) in cases {
            let err = p.decrypt(&input).unwrap_err();
            assert!(
                check(&err),
                "unexpected error {err:?} for input starting {:.40}",
                input
            );
        }
    }

    #[test]
    fn a_jwe_for_another_key_pair_fails_to_decrypt() {
        let other = JweKeyPair::generate_with_size(KeySize::Rsa2048).unwrap();
        let jwe = encrypt_compact(&public(&other), KeyWrapAlgorithm::RsaOaep, b"s", None).unwrap();
        assert_eq!(pair().decrypt(&jwe).unwrap_err(), JweError::Decryption);
    }

    #[test]
    fn bad_pem_keys_are_rejected() {
        assert!(matches!(
            JweKeyPair::from_pkcs8_pem(&SecretString::new("not a pem")),
            Err(JweError::InvalidKey(_))
        ));
        assert!(matches!(
            JweKeyPair::from_pkcs8_pem(&SecretString::new(
                "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----"
            )),
            Err(JweError::InvalidKey(_))
        ));
        assert!(matches!(
            parse_public_key_pem("-----BEGIN PUBLIC KEY-----\n%%%\n-----END PUBLIC KEY-----"),
            Err(JweError::InvalidKey(_))
        ));
        let pem = pair().public_key_pem().unwrap();
        assert!(matches!(
            JweKeyPair::from_pkcs8_pem(&SecretString::new(pem)),
            Err(JweError::InvalidKey(_))
        ));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig {
            cases: 3000,
            failure_persistence: None,
            ..proptest::prelude::ProptestConfig::default()
        })]

        /// Arbitrary compact strings, and valid JWEs with one part replaced by arbitrary
        /// base64url, are rejected with an error and never panic.
        #[test]
        fn decrypt_never_panics(
            raw in "[A-Za-z0-9_.-]{0,200}",
            part in 0usize..5,
            replacement in "[A-Za-z0-9_-]{0,400}",
        ) {
            let _ = pair().decrypt(&raw);
            let tampered = replace_part(&valid_jwe(), part, &replacement);
            proptest::prop_assert!(pair().decrypt(&tampered).is_err());
        }
    }
}
