//! Secret material that must never reach a log, an Event, a status field or a panic message.

use std::fmt;

use zeroize::{Zeroize, ZeroizeOnDrop};

/// A secret string (a Stripe key, a webhook signing secret, a Vault token, a private key).
///
/// `Debug` and `Display` print only a redaction marker; the value is reachable only through
/// [`SecretString::expose`], which makes every use greppable. The buffer is wiped (zeroed over
/// its whole capacity, with writes the compiler may not elide) when the value is dropped, and
/// equality is compared in constant time.
///
/// It never grows, so no reallocation leaves a copy behind. `Clone` makes a second buffer,
/// wiped on its own drop: clone only where the secret must really live twice, and prefer
/// moving it or borrowing [`SecretString::expose`]. [`SecretString::from`] a `String` takes
/// that buffer over without copying.
#[derive(Clone)]
pub struct SecretString(String);

impl SecretString {
    /// Copies `value` into a new secret. Pass an owned `String` (or use `From<String>`) to take
    /// its buffer over instead; a `&str` source is the caller's to wipe.
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

impl Zeroize for SecretString {
    /// Zeroes every byte of the buffer (its spare capacity too) and leaves the secret empty.
    fn zeroize(&mut self) {
        self.0.zeroize();
    }
}

impl Drop for SecretString {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl ZeroizeOnDrop for SecretString {}

impl PartialEq for SecretString {
    /// Constant-time in the contents (the length may show): secrets are compared with
    /// attacker-supplied values.
    fn eq(&self, other: &Self) -> bool {
        use subtle::ConstantTimeEq;
        self.0.as_bytes().ct_eq(other.0.as_bytes()).into()
    }
}

impl Eq for SecretString {}

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
    /// Takes the buffer over: no copy is made.
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
    fn zeroize_wipes_the_buffer_in_place_and_leaves_it_empty() {
        // Built at run time: no literal live key in the repository.
        let mut s = SecretString::from(format!("sk_{}_{}", "live", "0123456789abcdef"));
        let (ptr, cap) = (s.0.as_ptr(), s.0.capacity());
        assert!(cap >= 24);
        s.zeroize();
        // Same allocation, emptied: the bytes were overwritten where they were (the zeroize
        // crate's volatile writes over the whole capacity), not left in a buffer handed back to
        // the allocator. Safe code cannot read past the length, so the zeroes themselves are
        // the crate's to prove.
        assert_eq!(s.0.as_ptr(), ptr);
        assert_eq!(s.0.capacity(), cap);
        assert!(s.is_empty() && s.expose().is_empty());
    }

    #[test]
    fn secrets_are_wiped_on_drop_by_type() {
        fn wiped_on_drop<T: ZeroizeOnDrop>() {}
        wiped_on_drop::<SecretString>();
        // Drop runs the same wipe as `zeroize` (checked above); dropping a clone leaves the
        // original intact.
        let a = SecretString::new("whsec_abc");
        let b = a.clone();
        drop(b);
        assert_eq!(a.expose(), "whsec_abc");
    }

    #[test]
    fn from_string_takes_the_buffer_over() {
        let owned = String::from("rk_test_def");
        let ptr = owned.as_ptr();
        let taken = SecretString::from(owned);
        assert_eq!(taken.0.as_ptr(), ptr, "no copy");
    }

    #[test]
    fn equality_compares_contents() {
        assert_eq!(SecretString::new("abc"), SecretString::new("abc"));
        assert_ne!(SecretString::new("abc"), SecretString::new("abd"));
        assert_ne!(SecretString::new("abc"), SecretString::new("abcd"));
    }

    #[test]
    fn fingerprint_is_first_12_hex_of_sha256() {
        // sha256("abc") = ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad
        assert_eq!(fingerprint(b"abc"), "ba7816bf8f01");
        assert_eq!(SecretString::new("abc").fingerprint(), "ba7816bf8f01");
    }
}
