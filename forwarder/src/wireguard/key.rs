//! Curve25519 keys in WireGuard's two text encodings.
//!
//! # Guarantees
//! - [`Key::from_base64`] accepts exactly what `wg genkey` / `wg pubkey`
//!   print (standard base64 with padding, 44 characters, 32 bytes), and
//!   [`Key::to_base64`] prints the same form; [`Key::from_hex`] /
//!   [`Key::to_hex`] are the lower-case hex form of the UAPI socket.
//! - `Debug` never prints key material (a [`Key`] may be private): it shows
//!   `Key(<redacted>)`. [`KeyPair`]'s `Debug` shows the public half only.
//! - Key bytes are zeroed when a [`Key`] is dropped.
//! - [`KeyPair::generate`] clamps the private key like `wg genkey`, so the
//!   base64 text is interchangeable with wireguard-tools.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use boringtun::x25519::{PublicKey, StaticSecret};
use zeroize::{Zeroize, ZeroizeOnDrop};

/// Length of a WireGuard key in bytes.
pub const KEY_LEN: usize = 32;

/// A key that cannot be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// Not 44 characters of standard base64 decoding to 32 bytes.
    #[error(
        "invalid WireGuard key {shown}: expected 44 characters of standard base64 (as printed by `wg genkey` / `wg pubkey`) \
         decoding to 32 bytes"
    )]
    Base64 {
        /// At most the first 8 characters of the input (it may be a secret).
        shown: String,
    },
    /// Not 64 hex digits.
    #[error("invalid WireGuard key {shown}: expected 64 hex digits (the UAPI encoding)")]
    Hex {
        /// At most the first 8 characters of the input (it may be a secret).
        shown: String,
    },
}

/// Shows at most a short prefix of a possibly secret input.
fn shown(s: &str) -> String {
    let prefix: String = s.chars().take(8).collect();
    if prefix.len() < s.len() { format!("{prefix:?}… ({} chars)", s.chars().count()) } else { format!("{prefix:?}") }
}

/// A 32-byte Curve25519 key (private or public; the type does not say which,
/// so it never prints itself).
#[derive(Clone, PartialEq, Eq, Zeroize, ZeroizeOnDrop)]
pub struct Key([u8; KEY_LEN]);

impl Key {
    /// Wraps raw bytes.
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Key {
        Key(bytes)
    }

    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    /// Parses wg's text form (standard base64, 44 characters).
    pub fn from_base64(s: &str) -> Result<Key, KeyError> {
        let t = s.trim();
        let err = || KeyError::Base64 { shown: shown(t) };
        if t.len() != 44 {
            return Err(err());
        }
        let mut out = [0u8; KEY_LEN];
        match STANDARD.decode_slice(t, &mut out) {
            Ok(KEY_LEN) => Ok(Key(out)),
            _ => {
                out.zeroize();
                Err(err())
            }
        }
    }

    /// wg's text form (standard base64 with padding).
    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0)
    }

    /// Parses the UAPI form (64 hex digits, either case).
    pub fn from_hex(s: &str) -> Result<Key, KeyError> {
        let t = s.trim();
        let mut out = [0u8; KEY_LEN];
        match hex::decode_to_slice(t, &mut out) {
            Ok(()) => Ok(Key(out)),
            Err(_) => Err(KeyError::Hex { shown: shown(t) }),
        }
    }

    /// The UAPI form (64 lower-case hex digits).
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Treating `self` as a private key: the matching public key.
    pub fn public_key(&self) -> Key {
        Key(PublicKey::from(&StaticSecret::from(self.0)).to_bytes())
    }

    /// All zeros (the UAPI's "no key").
    pub fn is_zero(&self) -> bool {
        self.0.iter().all(|b| *b == 0)
    }

    pub(crate) fn to_secret(&self) -> StaticSecret {
        StaticSecret::from(self.0)
    }

    pub(crate) fn to_public(&self) -> PublicKey {
        PublicKey::from(self.0)
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Key(<redacted>)")
    }
}

impl std::str::FromStr for Key {
    type Err = KeyError;
    /// Base64 (wg's form).
    fn from_str(s: &str) -> Result<Key, KeyError> {
        Key::from_base64(s)
    }
}

/// A private key and its public key.
#[derive(Clone)]
pub struct KeyPair {
    pub private: Key,
    pub public: Key,
}

impl KeyPair {
    /// A fresh random key pair (private key clamped like `wg genkey`), from
    /// the thread-local CSPRNG (ChaCha seeded by the OS).
    pub fn generate() -> KeyPair {
        let mut b: [u8; KEY_LEN] = rand::random();
        b[0] &= 248;
        b[31] &= 127;
        b[31] |= 64;
        let private = Key(b);
        b.zeroize();
        let public = private.public_key();
        KeyPair { private, public }
    }

    /// The pair for an existing private key.
    pub fn from_private(private: Key) -> KeyPair {
        let public = private.public_key();
        KeyPair { private, public }
    }
}

impl fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyPair").field("private", &"<redacted>").field("public", &self.public.to_base64()).finish()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    // Generated once with `wg genkey | tee priv | wg pubkey`.
    const PRIV_B64: &str = "AH0FuMUWKO9sbpDwI1mWcfBu6kq8Fw/T2nL7JDnBUUI=";
    const PUB_B64: &str = "hTKvT6SeEkmRtQ5swX+fm8tpgzCAa/LOFWs65gwcnyA=";
    const PRIV_HEX: &str = "007d05b8c51628ef6c6e90f023599671f06eea4abc170fd3da72fb2439c15142";
    const PUB_HEX: &str = "8532af4fa49e124991b50e6cc17f9f9bcb698330806bf2ce156b3ae60c1c9f20";

    #[test]
    fn wg_test_vector_round_trips() {
        let private = Key::from_base64(PRIV_B64).unwrap();
        assert_eq!(private.to_hex(), PRIV_HEX);
        assert_eq!(private.to_base64(), PRIV_B64);
        let public = private.public_key();
        assert_eq!(public.to_base64(), PUB_B64);
        assert_eq!(public.to_hex(), PUB_HEX);
        assert_eq!(Key::from_hex(PUB_HEX).unwrap(), public);
        assert_eq!(Key::from_hex(&PUB_HEX.to_uppercase()).unwrap(), public);
        assert_eq!(PUB_B64.parse::<Key>().unwrap(), public);
        let pair = KeyPair::from_private(private);
        assert_eq!(pair.public.to_base64(), PUB_B64);
    }

    #[test]
    fn debug_never_prints_key_material() {
        let pair = KeyPair::from_private(Key::from_base64(PRIV_B64).unwrap());
        let d = format!("{:?} {:?} {:?}", pair.private, pair.public, pair);
        assert!(!d.contains(PRIV_B64) && !d.contains(PRIV_HEX) && !d.contains(&PRIV_B64[..8]), "{d}");
        assert!(d.contains("redacted"), "{d}");
        // The pair shows its public half.
        assert!(d.contains(PUB_B64), "{d}");
    }

    #[test]
    fn generated_keys_are_clamped_and_distinct() {
        let a = KeyPair::generate();
        let b = KeyPair::generate();
        assert_ne!(a.private, b.private);
        let p = a.private.as_bytes();
        assert_eq!(p[0] & 7, 0);
        assert_eq!(p[31] & 0xc0, 0x40);
        assert_eq!(a.private.public_key(), a.public);
        assert_eq!(Key::from_base64(&a.public.to_base64()).unwrap(), a.public);
    }

    #[test]
    fn bad_keys_are_rejected_without_echoing_them() {
        for bad in ["", "abc", &PRIV_B64[..43], &format!("{PRIV_B64}A"), "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!="]
        {
            let e = Key::from_base64(bad).unwrap_err();
            assert!(e.to_string().contains("base64"), "{e}");
            if bad.len() > 8 {
                assert!(!e.to_string().contains(bad), "{e}");
            }
        }
        // 33 bytes of base64 (45 chars) or 31 bytes.
        assert!(Key::from_base64("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA==").is_err());
        for bad in ["", "00", &PRIV_HEX[..63], &format!("{PRIV_HEX}00"), &PRIV_HEX.replace('0', "g")] {
            let e = Key::from_hex(bad).unwrap_err();
            assert!(e.to_string().contains("hex"), "{e}");
        }
        assert!(Key::from_bytes([0; 32]).is_zero());
    }
}
