//! Session tokens: HMAC-SHA256 of the session id, base64url without padding.

use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine as _};
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

fn mac(secret: &[u8], id: &str) -> HmacSha256 {
    // HMAC takes keys of any length: `new_from_slice` cannot fail for it.
    let mut mac = HmacSha256::new_from_slice(secret).unwrap_or_else(|_| unreachable!());
    mac.update(id.as_bytes());
    mac
}

/// The token of session `id` under `secret`.
pub(super) fn sign(secret: &[u8], id: &str) -> String {
    URL_SAFE_NO_PAD.encode(mac(secret, id).finalize().into_bytes())
}

/// Whether `token` is the token of session `id` (compared in constant time).
pub(super) fn verify(secret: &[u8], id: &str, token: &str) -> bool {
    let Ok(tag) = URL_SAFE_NO_PAD.decode(token) else {
        return false;
    };
    mac(secret, id).verify_slice(&tag).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signs_and_verifies() {
        let t = sign(b"k", "session.1");
        assert_eq!(t.len(), 43);
        assert!(verify(b"k", "session.1", &t));
        assert!(!verify(b"k", "session.2", &t));
        assert!(!verify(b"other", "session.1", &t));
        assert!(!verify(b"k", "session.1", "not base64 !"));
        assert!(!verify(b"k", "session.1", ""));
    }
}
