//! Signed `/files` URLs.
//!
//! The SDK can hand out download/upload URLs that work without the `X-Access-Token` header.
//! The signature is `v1_` + unpadded standard base64 of
//! `sha256("<path>:<operation>:<username>:<token>[:<expiration>]")`, where `username` is empty
//! for the default user and `expiration` is a Unix timestamp. Both sides compute it the same
//! way, so the host (which knows the token) can mint URLs and the agent can check them.

use base64::Engine as _;
use sha2::{Digest, Sha256};

/// What a signed URL allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// `GET /files`.
    Read,
    /// `POST /files`.
    Write,
}

impl Operation {
    /// Wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Read => "read",
            Operation::Write => "write",
        }
    }
}

/// Why a signature was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// No signature and no token header.
    #[error("missing signature query parameter")]
    Missing,
    /// The signature does not match.
    #[error("invalid signature")]
    Invalid,
    /// The signature matched but its expiration is in the past.
    #[error("signature is already expired")]
    Expired,
}

/// Compute the signature for a path/operation/user with an optional expiration.
pub fn sign(
    path: &str,
    operation: Operation,
    username: &str,
    token: &str,
    expiration: Option<i64>,
) -> String {
    let raw = match expiration {
        None => format!("{path}:{}:{username}:{token}", operation.as_str()),
        Some(exp) => format!("{path}:{}:{username}:{token}:{exp}", operation.as_str()),
    };
    let digest = Sha256::digest(raw.as_bytes());
    format!(
        "v1_{}",
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(digest)
    )
}

/// Compare two byte strings in time independent of where they differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let mut diff = 0u8;
    for (x, y) in a.iter().zip(b) {
        diff |= x ^ y;
    }
    diff == 0
}

/// Check a presented signature. `now` is the current Unix time.
pub fn verify(
    presented: Option<&str>,
    path: &str,
    operation: Operation,
    username: &str,
    token: &str,
    expiration: Option<i64>,
    now: i64,
) -> Result<(), SignatureError> {
    let presented = presented.ok_or(SignatureError::Missing)?;
    let expected = sign(path, operation, username, token, expiration);
    if !constant_time_eq(expected.as_bytes(), presented.as_bytes()) {
        return Err(SignatureError::Invalid);
    }
    match expiration {
        Some(exp) if exp < now => Err(SignatureError::Expired),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_sdk_algorithm() {
        // python: base64.b64encode(sha256(b"/home/user/a.txt:read::tok").digest()).rstrip(b"=")
        let s = sign("/home/user/a.txt", Operation::Read, "", "tok", None);
        assert_eq!(s, "v1_Zkbb3914oLJLvMBzCAHQhm2ydBLxbSx2eQUR/kLdvIY");
        let with_exp = sign("a", Operation::Write, "root", "tok", Some(1_700_000_000));
        assert!(with_exp.starts_with("v1_"));
        assert!(!with_exp.ends_with('='));
        assert_ne!(with_exp, sign("a", Operation::Write, "root", "tok", None));
    }

    #[test]
    fn verify_checks_match_and_expiry() {
        let s = sign("p", Operation::Read, "", "tok", Some(100));
        assert_eq!(
            verify(Some(&s), "p", Operation::Read, "", "tok", Some(100), 50),
            Ok(())
        );
        assert_eq!(
            verify(Some(&s), "p", Operation::Read, "", "tok", Some(100), 101),
            Err(SignatureError::Expired)
        );
        assert_eq!(
            verify(Some(&s), "p", Operation::Write, "", "tok", Some(100), 50),
            Err(SignatureError::Invalid)
        );
        assert_eq!(
            verify(Some(&s), "p", Operation::Read, "", "tok", Some(101), 50),
            Err(SignatureError::Invalid),
            "expiration is part of the signed text"
        );
        assert_eq!(
            verify(None, "p", Operation::Read, "", "tok", None, 0),
            Err(SignatureError::Missing)
        );
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
