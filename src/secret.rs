//! Secret material that must never reach a log, an Event, a status field or a panic message.

use std::fmt;

/// A secret string (a Stripe key, a webhook signing secret, a Vault token, a private key).
///
/// `Debug` and `Display` print only a redaction marker; the value is reachable only through
/// [`SecretString::expose`], which makes every use greppable.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretString(String);

impl SecretString {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The raw secret. Call only where the value leaves the process to its rightful recipient.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// First 12 hex characters of the SHA-256 of the secret: safe to show and to compare.
    pub fn fingerprint(&self) -> String {
        fingerprint(self.0.as_bytes())
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretString([redacted])")
    }
}

impl fmt::Display for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl From<String> for SecretString {
    fn from(value: String) -> Self {
        Self(value)
    }
}

impl From<&str> for SecretString {
    fn from(value: &str) -> Self {
        Self(value.to_owned())
    }
}

/// First 12 hex characters of the SHA-256 of `bytes`.
pub fn fingerprint(bytes: &[u8]) -> String {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes);
    hex::encode(&digest.as_ref()[..6])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_never_show_the_value() {
        let s = SecretString::new("rk_test_abcdefghijklmnop");
        assert!(!format!("{s:?}").contains("rk_test"));
        assert!(!format!("{s}").contains("rk_test"));
        assert_eq!(s.expose(), "rk_test_abcdefghijklmnop");
    }

    #[test]
    fn fingerprint_is_first_12_hex_of_sha256() {
        // sha256("abc") = ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad
        assert_eq!(fingerprint(b"abc"), "ba7816bf8f01");
        assert_eq!(SecretString::new("abc").fingerprint(), "ba7816bf8f01");
    }
}
