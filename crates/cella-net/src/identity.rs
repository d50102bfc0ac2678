//! Workload identity: the key that signs the JWT-SVIDs of E2B's `iam.tokens`.
//!
//! Why: a `network.rules` header may carry `${e2b.identity.tokens.NAME}`, and the egress
//! proxy puts a freshly minted token there on every request, so a sandbox proves who it is
//! to a service without ever holding a long-lived credential. The token is a JWT-SVID (the
//! SPIFFE profile of a JWT): an ES256-signed JWT whose `sub` is the sandbox's SPIFFE ID
//! (`spiffe://<trust domain>/sandbox/<id>`), with the `aud` the token was registered for and
//! a short lifetime. Services verify it with the server's JWKS ([`IdentityKey::jwks`]).
//!
//! Why one ECDSA P-256 key per data directory, kept across restarts: verifiers cache the
//! JWKS, so a key that changed at every start would reject tokens until they refetch. Why
//! `ring` and hand-built JWS: ES256 compact serialization is three base64url strings and a
//! fixed 64-byte `r || s` signature, which `ring` produces directly; a JOSE library would add
//! far more than it saves.
//!
//! File: `identity.key` (PKCS#8 PEM, 0600) in a 0700 directory, written through a temporary
//! file and a rename. A file that exists but cannot be read or parsed is an error, never
//! replaced: tokens already handed out would stop verifying, and an operator must see why.

use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use serde::{Deserialize, Serialize};

/// The signing key's file in the identity directory.
pub const KEY_FILE: &str = "identity.key";
/// The PEM label of a PKCS#8 private key.
const PEM_LABEL: &str = "PRIVATE KEY";

/// Errors of the identity key.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// A file or directory operation failed.
    #[error("identity key {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The stored key is not what this module writes (corrupt, truncated, another curve).
    #[error("identity key {path}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Generating a key, encoding claims or signing failed.
    #[error("identity key: {0}")]
    Crypto(String),
}

/// The claims of a JWT-SVID.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// Issuer (the server's URL or name).
    pub iss: String,
    /// The sandbox's SPIFFE ID.
    pub sub: String,
    /// The one audience the token is for.
    pub aud: String,
    /// Issued at (Unix seconds).
    pub iat: u64,
    /// Expires at (Unix seconds).
    pub exp: u64,
    /// Token ID: 16 random bytes, hex.
    pub jti: String,
}

/// Claims of a token for `sandbox_id` and `audience`, issued at `now` (Unix seconds) and
/// valid for `ttl_secs`, with a fresh random `jti`.
pub fn claims_for(
    issuer: &str,
    trust_domain: &str,
    sandbox_id: &str,
    audience: &str,
    now: u64,
    ttl_secs: u64,
) -> Claims {
    Claims {
        iss: issuer.to_string(),
        sub: format!("spiffe://{trust_domain}/sandbox/{sandbox_id}"),
        aud: audience.to_string(),
        iat: now,
        exp: now.saturating_add(ttl_secs),
        jti: new_jti(),
    }
}

/// The server's identity signing key (ECDSA P-256, ES256).
pub struct IdentityKey {
    pair: EcdsaKeyPair,
    rng: SystemRandom,
    kid: String,
}

impl std::fmt::Debug for IdentityKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentityKey")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl IdentityKey {
    /// Load the key in `dir`, creating the directory (0700) and the key on first use.
    ///
    /// A key file that exists but cannot be read or parsed is an error and is left in place.
    pub fn load_or_create(dir: &Path) -> Result<IdentityKey, IdentityError> {
        if !dir.exists() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(io(dir))?;
        }
        let path = dir.join(KEY_FILE);
        let rng = SystemRandom::new();
        let pkcs8 = match fs::read(&path) {
            Ok(bytes) => decode_key_file(&bytes, &path)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let doc = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
                    .map_err(|_| IdentityError::Crypto("generating a P-256 key failed".into()))?;
                crate::ca::write_atomic(&path, pem(doc.as_ref()).as_bytes(), 0o600)
                    .map_err(|(path, source)| IdentityError::Io { path, source })?;
                doc.as_ref().to_vec()
            }
            Err(e) => return Err(io(&path)(e)),
        };
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &pkcs8, &rng)
            .map_err(|e| invalid(&path, &format!("not a PKCS#8 ECDSA P-256 key: {e}")))?;
        let kid = kid_of(pair.public_key().as_ref());
        Ok(IdentityKey { pair, rng, kid })
    }

    /// The key ID: base64url of the first 16 bytes of SHA-256 of the uncompressed public point.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The public key as a JWK Set (`{"keys":[{...}]}`), for verifiers.
    pub fn jwks(&self) -> serde_json::Value {
        let (x, y) = self.xy();
        serde_json::json!({
            "keys": [{
                "kty": "EC",
                "crv": "P-256",
                "x": URL_SAFE_NO_PAD.encode(x),
                "y": URL_SAFE_NO_PAD.encode(y),
                "kid": self.kid,
                "use": "sig",
                "alg": "ES256",
            }]
        })
    }

    /// A compact JWS (ES256) of `claims`: `header.payload.signature`, each base64url.
    pub fn mint(&self, claims: &Claims) -> Result<String, IdentityError> {
        let header = serde_json::json!({"alg": "ES256", "typ": "JWT", "kid": self.kid});
        let header = serde_json::to_vec(&header)
            .map_err(|e| IdentityError::Crypto(format!("encoding the header: {e}")))?;
        let payload = serde_json::to_vec(claims)
            .map_err(|e| IdentityError::Crypto(format!("encoding the claims: {e}")))?;
        let mut token = URL_SAFE_NO_PAD.encode(header);
        token.push('.');
        token.push_str(&URL_SAFE_NO_PAD.encode(payload));
        let sig = self
            .pair
            .sign(&self.rng, token.as_bytes())
            .map_err(|_| IdentityError::Crypto("signing failed".into()))?;
        token.push('.');
        token.push_str(&URL_SAFE_NO_PAD.encode(sig.as_ref()));
        Ok(token)
    }

    /// The public point's coordinates (32 bytes each).
    fn xy(&self) -> (&[u8], &[u8]) {
        // ring's P-256 public key is the uncompressed point: 0x04 || x || y.
        let point = self.pair.public_key().as_ref();
        let coords = point.get(1..).unwrap_or_default();
        coords.split_at(coords.len() / 2)
    }
}

fn kid_of(point: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, point);
    URL_SAFE_NO_PAD.encode(&digest.as_ref()[..16])
}

/// 16 random bytes as hex. If the OS has no randomness (never, on Linux after boot), a
/// per-process unique value instead: a `jti` must be unique, not secret.
fn new_jti() -> String {
    let mut b = [0u8; 16];
    if SystemRandom::new().fill(&mut b).is_err() {
        use std::sync::atomic::{AtomicU64, Ordering};
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let seed = format!(
            "{}:{}:{nanos}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let digest = ring::digest::digest(&ring::digest::SHA256, seed.as_bytes());
        b.copy_from_slice(&digest.as_ref()[..16]);
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// PKCS#8 DER from a key file: PEM (what this module writes) or raw DER.
fn decode_key_file(bytes: &[u8], path: &Path) -> Result<Vec<u8>, IdentityError> {
    if bytes.first() == Some(&0x30) {
        return Ok(bytes.to_vec());
    }
    let text = std::str::from_utf8(bytes).map_err(|_| invalid(path, "neither PEM nor DER"))?;
    let begin = format!("-----BEGIN {PEM_LABEL}-----");
    let end = format!("-----END {PEM_LABEL}-----");
    let body = text
        .trim()
        .strip_prefix(&begin)
        .and_then(|rest| rest.strip_suffix(&end))
        .ok_or_else(|| invalid(path, &format!("not a PEM \"{PEM_LABEL}\" block")))?;
    let b64: String = body.split_whitespace().collect();
    STANDARD
        .decode(b64)
        .map_err(|e| invalid(path, &format!("bad PEM base64: {e}")))
}

fn pem(der: &[u8]) -> String {
    let b64 = STANDARD.encode(der);
    let mut out = format!("-----BEGIN {PEM_LABEL}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str(&format!("-----END {PEM_LABEL}-----\n"));
    out
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> IdentityError {
    let path = path.to_path_buf();
    move |source| IdentityError::Io { path, source }
}

fn invalid(path: &Path, reason: &str) -> IdentityError {
    IdentityError::Invalid {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::signature::{ECDSA_P256_SHA256_FIXED, UnparsedPublicKey};
    use std::os::unix::fs::PermissionsExt;

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).expect("stat").permissions().mode() & 0o777
    }

    fn b64(s: &str) -> Vec<u8> {
        URL_SAFE_NO_PAD.decode(s).expect("base64url")
    }

    /// Verify `token` against the first key of `jwks`, as a relying party would.
    fn verifies(jwks: &serde_json::Value, token: &str) -> bool {
        let jwk = &jwks["keys"][0];
        let x = b64(jwk["x"].as_str().expect("x"));
        let y = b64(jwk["y"].as_str().expect("y"));
        let mut point = vec![0x04];
        point.extend_from_slice(&x);
        point.extend_from_slice(&y);
        let Some((signed, sig)) = token.rsplit_once('.') else {
            return false;
        };
        let Ok(sig) = URL_SAFE_NO_PAD.decode(sig) else {
            return false;
        };
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, point)
            .verify(signed.as_bytes(), &sig)
            .is_ok()
    }

    #[test]
    fn create_then_reload_gives_the_same_key() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("identity");
        let a = IdentityKey::load_or_create(&dir).expect("create");
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join(KEY_FILE)), 0o600);
        let text = fs::read_to_string(dir.join(KEY_FILE)).expect("key");
        assert!(text.starts_with("-----BEGIN PRIVATE KEY-----\n"), "{text}");
        let leftovers: Vec<_> = fs::read_dir(&dir)
            .expect("ls")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(leftovers, vec![std::ffi::OsString::from(KEY_FILE)]);

        let b = IdentityKey::load_or_create(&dir).expect("reload");
        assert_eq!(a.kid(), b.kid());
        assert_eq!(a.jwks(), b.jwks());
        assert_eq!(a.kid().len(), 22, "16 bytes base64url: {}", a.kid());

        let other = tempfile::tempdir().expect("tempdir");
        let c = IdentityKey::load_or_create(other.path()).expect("other");
        assert_ne!(a.kid(), c.kid());
    }

    #[test]
    fn raw_der_key_file_loads() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let a = IdentityKey::load_or_create(tmp.path()).expect("create");
        let path = tmp.path().join(KEY_FILE);
        let der = decode_key_file(&fs::read(&path).expect("read"), &path).expect("pem");
        fs::write(&path, &der).expect("write der");
        let b = IdentityKey::load_or_create(tmp.path()).expect("der reload");
        assert_eq!(a.kid(), b.kid());
    }

    #[test]
    fn corrupt_key_file_is_an_error_and_kept() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path();
        IdentityKey::load_or_create(dir).expect("create");
        let path = dir.join(KEY_FILE);
        let good = fs::read(&path).expect("key");

        fs::write(&path, b"garbage").expect("write");
        let e = IdentityKey::load_or_create(dir).expect_err("garbage");
        assert!(matches!(e, IdentityError::Invalid { .. }), "{e}");
        assert!(e.to_string().contains(KEY_FILE), "{e}");
        assert_eq!(fs::read(&path).expect("kept"), b"garbage");

        let half = &good[..good.len() / 2];
        fs::write(&path, half).expect("truncate");
        let e = IdentityKey::load_or_create(dir).expect_err("truncated");
        assert!(matches!(e, IdentityError::Invalid { .. }), "{e}");
        assert_eq!(fs::read(&path).expect("kept"), half);

        // Well-formed PEM of something that is not a P-256 PKCS#8 key.
        let wrong = pem(&[0x30, 0x03, 0x02, 0x01, 0x00]);
        fs::write(&path, &wrong).expect("write");
        let e = IdentityKey::load_or_create(dir).expect_err("not a key");
        assert!(e.to_string().contains("PKCS#8"), "{e}");
        assert_eq!(fs::read_to_string(&path).expect("kept"), wrong);

        // Unreadable: a directory where the file should be.
        fs::remove_file(&path).expect("rm");
        fs::create_dir(&path).expect("mkdir");
        let e = IdentityKey::load_or_create(dir).expect_err("unreadable");
        assert!(matches!(e, IdentityError::Io { .. }), "{e}");
        assert!(path.is_dir());
    }

    #[test]
    fn minted_token_has_the_expected_parts_and_verifies() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let key = IdentityKey::load_or_create(tmp.path()).expect("create");
        let claims = claims_for(
            "https://cella.example",
            "cella.local",
            "sbx123",
            "https://api.example.com",
            1_700_000_000,
            300,
        );
        let token = key.mint(&claims).expect("mint");
        let parts: Vec<&str> = token.split('.').collect();
        assert_eq!(parts.len(), 3, "{token}");
        for p in &parts {
            assert!(
                !p.is_empty()
                    && p.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
                "not base64url without padding: {p}"
            );
        }
        let header: serde_json::Value = serde_json::from_slice(&b64(parts[0])).expect("header");
        assert_eq!(
            header,
            serde_json::json!({"alg": "ES256", "typ": "JWT", "kid": key.kid()})
        );
        let payload: serde_json::Value = serde_json::from_slice(&b64(parts[1])).expect("payload");
        assert_eq!(
            payload,
            serde_json::json!({
                "iss": "https://cella.example",
                "sub": "spiffe://cella.local/sandbox/sbx123",
                "aud": "https://api.example.com",
                "iat": 1_700_000_000u64,
                "exp": 1_700_000_300u64,
                "jti": claims.jti,
            })
        );
        assert_eq!(b64(parts[2]).len(), 64, "ES256 is r || s");

        let jwks = key.jwks();
        assert!(verifies(&jwks, &token));

        // One changed payload byte: the signature no longer verifies.
        let mut forged = token.clone().into_bytes();
        let at = parts[0].len() + 1 + parts[1].len() / 2;
        forged[at] = if forged[at] == b'A' { b'B' } else { b'A' };
        let forged = String::from_utf8(forged).expect("ascii");
        assert_ne!(forged, token);
        assert!(!verifies(&jwks, &forged));

        // Another key's JWKS does not verify it either.
        let other = tempfile::tempdir().expect("tempdir");
        let other = IdentityKey::load_or_create(other.path()).expect("other");
        assert!(!verifies(&other.jwks(), &token));

        // ECDSA signs with a random nonce: two mints differ, both verify.
        let again = key.mint(&claims).expect("mint again");
        assert_ne!(again, token);
        assert!(verifies(&jwks, &again));
    }

    #[test]
    fn jwks_shape() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let key = IdentityKey::load_or_create(tmp.path()).expect("create");
        let jwks = key.jwks();
        let keys = jwks["keys"].as_array().expect("keys");
        assert_eq!(keys.len(), 1);
        let jwk = keys[0].as_object().expect("jwk");
        let mut names: Vec<&str> = jwk.keys().map(String::as_str).collect();
        names.sort_unstable();
        assert_eq!(names, ["alg", "crv", "kid", "kty", "use", "x", "y"]);
        assert_eq!(jwk["kty"], "EC");
        assert_eq!(jwk["crv"], "P-256");
        assert_eq!(jwk["use"], "sig");
        assert_eq!(jwk["alg"], "ES256");
        assert_eq!(jwk["kid"], key.kid());
        let x = b64(jwk["x"].as_str().expect("x"));
        let y = b64(jwk["y"].as_str().expect("y"));
        assert_eq!((x.len(), y.len()), (32, 32));
        let mut point = vec![0x04];
        point.extend_from_slice(&x);
        point.extend_from_slice(&y);
        assert_eq!(kid_of(&point), key.kid());
    }

    #[test]
    fn claims_for_fields() {
        let c = claims_for("iss-x", "td.example", "abc", "aud-y", 1000, 60);
        assert_eq!(c.iss, "iss-x");
        assert_eq!(c.sub, "spiffe://td.example/sandbox/abc");
        assert_eq!(c.aud, "aud-y");
        assert_eq!((c.iat, c.exp), (1000, 1060));
        assert_eq!(c.jti.len(), 32);
        assert!(
            c.jti
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        );
        let d = claims_for("iss-x", "td.example", "abc", "aud-y", 1000, 60);
        assert_ne!(c.jti, d.jti);
        assert_eq!(
            claims_for("i", "t", "s", "a", u64::MAX - 1, 60).exp,
            u64::MAX
        );
    }
}
