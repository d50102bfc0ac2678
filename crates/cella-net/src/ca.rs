//! The egress CA: the certificate authority `network.rules` interception signs leaf
//! certificates with.
//!
//! Why a CA of its own: to set a header on a sandbox's HTTPS request, the host must terminate
//! the sandbox's TLS, so the sandbox has to trust a certificate for the name it asked for.
//! The server makes one CA per data directory (kept across restarts, so templates and
//! sandboxes that installed it keep working), installs it in sandboxes, and mints a
//! short-lived leaf per name on demand. The CA key never leaves the host.
//!
//! Files: `ca.pem` (0644) and `ca.key` (0600, PKCS#8 PEM) in a 0700 directory, each written
//! through a temporary file and a rename. A file that exists but cannot be read or parsed is an
//! error, never silently replaced: replacing it would break every sandbox that trusts the old
//! one, and an operator must see why.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, DnValue,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// Most leaf configurations cached; a full cache starts over.
const MAX_LEAVES: usize = 1024;
/// CA lifetime.
const CA_DAYS: u64 = 3650;
/// Leaf lifetime (minted again at each server start, cached only in memory).
const LEAF_DAYS: u64 = 30;
/// Leaf `notBefore` backdating, for sandboxes whose clock is a little behind.
const LEAF_BACKDATE: Duration = Duration::from_secs(3600);
/// File names in the CA directory.
pub const CERT_FILE: &str = "ca.pem";
/// The CA's private key file.
pub const KEY_FILE: &str = "ca.key";

/// What a leaf certificate is for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum LeafName {
    /// A DNS name (SNI or HTTP `Host`), as a `dNSName` SAN.
    Dns(String),
    /// An address (a client that sent no SNI), as an `iPAddress` SAN.
    Ip(Ipv4Addr),
}

impl std::fmt::Display for LeafName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LeafName::Dns(n) => f.write_str(n),
            LeafName::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

/// Errors of the egress CA.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// A file or directory operation failed.
    #[error("egress CA {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A stored file is not what this module wrote (corrupt, truncated, or mismatched).
    #[error("egress CA {path}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Generating or signing a certificate failed.
    #[error("egress CA: {0}")]
    Cert(String),
    /// Building the TLS configuration failed.
    #[error("egress CA TLS configuration: {0}")]
    Tls(String),
}

/// The egress CA, loaded, with its leaf cache.
pub struct EgressCa {
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    /// The CA as rcgen's issuer (same subject and key as `cert_der`).
    issuer: rcgen::Certificate,
    key: KeyPair,
    /// One key pair for every leaf (in memory only).
    leaf_key: KeyPair,
    leaves: Mutex<HashMap<LeafName, Arc<rustls::ServerConfig>>>,
}

impl std::fmt::Debug for EgressCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EgressCa").finish_non_exhaustive()
    }
}

impl EgressCa {
    /// Load the CA in `dir`, creating the directory (0700) and the CA on first use.
    ///
    /// Both files missing: a new CA. One missing, or either unreadable or unparsable: an error.
    pub fn load_or_create(dir: &Path) -> Result<EgressCa, CaError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| CaError::Io { path, source }
        };
        if !dir.exists() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(io(dir))?;
        }
        let cert_path = dir.join(CERT_FILE);
        let key_path = dir.join(KEY_FILE);
        let (cert_pem, key_pem) = match (cert_path.exists(), key_path.exists()) {
            (false, false) => {
                let (cert_pem, key_pem) = create(&hostname())?;
                let io = |(path, source)| CaError::Io { path, source };
                write_atomic(&key_path, key_pem.as_bytes(), 0o600).map_err(io)?;
                write_atomic(&cert_path, cert_pem.as_bytes(), 0o644).map_err(io)?;
                (cert_pem, key_pem)
            }
            (true, true) => (
                fs::read_to_string(&cert_path).map_err(io(&cert_path))?,
                fs::read_to_string(&key_path).map_err(io(&key_path))?,
            ),
            (true, false) => return Err(half(&key_path, dir)),
            (false, true) => return Err(half(&cert_path, dir)),
        };
        Self::from_pem(&cert_pem, &key_pem, &cert_path, &key_path)
    }

    fn from_pem(
        cert_pem: &str,
        key_pem: &str,
        cert_path: &Path,
        key_path: &Path,
    ) -> Result<EgressCa, CaError> {
        use rustls::pki_types::pem::PemObject;
        let key = KeyPair::from_pem(key_pem)
            .map_err(|e| invalid(key_path, &format!("not a PKCS#8 PEM private key: {e}")))?;
        let cert_der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| invalid(cert_path, &format!("not a PEM certificate: {e}")))?;
        let fields = der::cert_fields(&cert_der)
            .ok_or_else(|| invalid(cert_path, "not an X.509 certificate"))?;
        if fields.spki != key.public_key_der().as_slice() {
            return Err(invalid(
                cert_path,
                &format!("does not match {}", key_path.display()),
            ));
        }
        let cn =
            der::common_name(fields.subject).ok_or_else(|| invalid(cert_path, "no common name"))?;
        // rcgen signs with an issuer Certificate: rebuild one with the stored subject and key
        // and check it reproduces the stored subject exactly (chains match by those bytes).
        let issuer = ca_params(&cn, SystemTime::now())?
            .self_signed(&key)
            .map_err(|e| CaError::Cert(e.to_string()))?;
        let same = der::cert_fields(issuer.der()).is_some_and(|f| f.subject == fields.subject);
        if !same {
            return Err(invalid(cert_path, "subject was not written by cella"));
        }
        let leaf_key = KeyPair::generate().map_err(|e| CaError::Cert(e.to_string()))?;
        Ok(EgressCa {
            cert_pem: cert_pem.to_string(),
            cert_der,
            issuer,
            key,
            leaf_key,
            leaves: Mutex::new(HashMap::new()),
        })
    }

    /// The CA certificate (PEM), to install in sandboxes.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// A TLS server configuration presenting a leaf for `name` (chain: leaf, CA; ALPN
    /// `http/1.1` only). Cached per name.
    pub fn server_config(&self, name: &LeafName) -> Result<Arc<rustls::ServerConfig>, CaError> {
        if let Some(cfg) = self.leaves.lock().ok().and_then(|m| m.get(name).cloned()) {
            return Ok(cfg);
        }
        let cfg = self.mint(name)?;
        if let Ok(mut m) = self.leaves.lock() {
            if m.len() >= MAX_LEAVES {
                m.clear();
            }
            m.insert(name.clone(), cfg.clone());
        }
        Ok(cfg)
    }

    fn mint(&self, name: &LeafName) -> Result<Arc<rustls::ServerConfig>, CaError> {
        let cert_err = |e: rcgen::Error| CaError::Cert(format!("leaf for {name}: {e}"));
        let now = SystemTime::now();
        let mut params = CertificateParams::default();
        let san = match name {
            LeafName::Dns(n) => {
                // rcgen takes any ASCII; a leaf is only for a real host name.
                if n.contains('*') || rustls::pki_types::DnsName::try_from(n.as_str()).is_err() {
                    return Err(CaError::Cert(format!("leaf for {n:?}: not a host name")));
                }
                SanType::DnsName(
                    n.clone()
                        .try_into()
                        .map_err(|e: rcgen::Error| cert_err(e))?,
                )
            }
            LeafName::Ip(ip) => SanType::IpAddress(IpAddr::V4(*ip)),
        };
        params.subject_alt_names = vec![san];
        let mut dn = DistinguishedName::new();
        let cn = name.to_string();
        if cn.len() <= 64 {
            dn.push(DnType::CommonName, DnValue::Utf8String(cn));
        }
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.not_before = datetime(now.checked_sub(LEAF_BACKDATE).unwrap_or(now))?;
        params.not_after = datetime(now + Duration::from_secs(LEAF_DAYS * 86_400))?;
        params.serial_number = Some(random_serial()?);
        let leaf = params
            .signed_by(&self.leaf_key, &self.issuer, &self.key)
            .map_err(cert_err)?;
        let chain = vec![leaf.der().clone(), self.cert_der.clone()];
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.leaf_key.serialize_der()));
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| CaError::Tls(e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(|e| CaError::Tls(e.to_string()))?;
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(cfg))
    }
}

fn invalid(path: &Path, reason: &str) -> CaError {
    CaError::Invalid {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

fn half(missing: &Path, dir: &Path) -> CaError {
    invalid(
        missing,
        &format!(
            "missing while the other CA file exists (remove {} to make a new CA, which \
             sandboxes that trust the old one will not trust)",
            dir.display()
        ),
    )
}

/// A new CA for host `host`: (certificate PEM, PKCS#8 key PEM).
fn create(host: &str) -> Result<(String, String), CaError> {
    let key = KeyPair::generate().map_err(|e| CaError::Cert(e.to_string()))?;
    let mut params = ca_params(&format!("cella egress CA ({host})"), SystemTime::now())?;
    params.serial_number = Some(random_serial()?);
    let cert = params
        .self_signed(&key)
        .map_err(|e| CaError::Cert(e.to_string()))?;
    Ok((cert.pem(), key.serialize_pem()))
}

fn ca_params(cn: &str, now: SystemTime) -> Result<CertificateParams, CaError> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, DnValue::Utf8String(cn.to_string()));
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_before = datetime(now)?;
    params.not_after = datetime(now + Duration::from_secs(CA_DAYS * 86_400))?;
    Ok(params)
}

fn datetime(t: SystemTime) -> Result<time::OffsetDateTime, CaError> {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map_err(|_| CaError::Cert("clock before 1970".into()))?
        .as_secs();
    let secs = i64::try_from(secs).map_err(|_| CaError::Cert("clock out of range".into()))?;
    time::OffsetDateTime::from_unix_timestamp(secs).map_err(|e| CaError::Cert(e.to_string()))
}

/// A random positive 16-byte serial (each leaf its own, though they share a key).
fn random_serial() -> Result<SerialNumber, CaError> {
    let mut b = [0u8; 16];
    rustls::crypto::ring::default_provider()
        .secure_random
        .fill(&mut b)
        .map_err(|_| CaError::Cert("no randomness".into()))?;
    b[0] = (b[0] & 0x7f) | 0x01;
    Ok(SerialNumber::from_slice(&b))
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: buf is valid for writes of buf.len() bytes; gethostname writes at most that many.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "localhost".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    match std::str::from_utf8(&buf[..end]) {
        Ok(s) if !s.is_empty() => s.to_string(),
        _ => "localhost".into(),
    }
}

/// Write `data` to `path` with `mode` through a temporary file in the same directory (renamed
/// over `path`, removed on failure). `Err` names the file that failed. Shared with the
/// identity key.
pub(crate) fn write_atomic(
    path: &Path,
    data: &[u8],
    mode: u32,
) -> Result<(), (std::path::PathBuf, std::io::Error)> {
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(format!(".tmp{}", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    let at = |p: &Path| {
        let p = p.to_path_buf();
        move |e| (p, e)
    };
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(at(&tmp))?;
    // The umask may have narrowed the mode (0644 must stay readable for installing it).
    let written = f
        .set_permissions(fs::Permissions::from_mode(mode))
        .and_then(|()| f.write_all(data))
        .and_then(|()| f.sync_all())
        .map_err(at(&tmp));
    drop(f);
    if let Err(e) = written.and_then(|()| fs::rename(&tmp, path).map_err(at(path))) {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(())
}

/// The few DER fields of a certificate the loader checks, read by hand (no X.509 parser).
mod der {
    /// Parts of a certificate, as their full DER encodings (tag and length included).
    pub struct Fields<'a> {
        pub subject: &'a [u8],
        pub spki: &'a [u8],
    }

    /// (tag, content, the whole TLV, the rest).
    type Tlv<'a> = (u8, &'a [u8], &'a [u8], &'a [u8]);

    /// One TLV at the start of `b`.
    fn tlv(b: &[u8]) -> Option<Tlv<'_>> {
        let tag = *b.first()?;
        let first = *b.get(1)?;
        let (len, hdr) = if first < 0x80 {
            (usize::from(first), 2)
        } else {
            let n = usize::from(first & 0x7f);
            if n == 0 || n > 4 {
                return None;
            }
            let mut len = 0usize;
            for i in 0..n {
                len = (len << 8) | usize::from(*b.get(2 + i)?);
            }
            (len, 2 + n)
        };
        let end = hdr.checked_add(len)?;
        let content = b.get(hdr..end)?;
        Some((tag, content, b.get(..end)?, b.get(end..)?))
    }

    pub fn cert_fields(cert: &[u8]) -> Option<Fields<'_>> {
        let (0x30, cert, _, _) = tlv(cert)? else {
            return None;
        };
        let (0x30, tbs, _, _) = tlv(cert)? else {
            return None;
        };
        let mut rest = tbs;
        // version [0] is optional; serial, signature, issuer, validity, subject, spki follow.
        if rest.first() == Some(&0xa0) {
            rest = tlv(rest)?.3;
        }
        for _ in 0..4 {
            rest = tlv(rest)?.3;
        }
        let (0x30, _, subject, rest) = tlv(rest)? else {
            return None;
        };
        let (0x30, _, spki, _) = tlv(rest)? else {
            return None;
        };
        Some(Fields { subject, spki })
    }

    /// The first commonName (2.5.4.3) in a DER Name, if UTF8String or PrintableString.
    pub fn common_name(name: &[u8]) -> Option<String> {
        let (0x30, mut rdns, _, _) = tlv(name)? else {
            return None;
        };
        while !rdns.is_empty() {
            let (_, set, _, rest) = tlv(rdns)?;
            rdns = rest;
            let mut atvs = set;
            while !atvs.is_empty() {
                let (_, atv, _, rest) = tlv(atvs)?;
                atvs = rest;
                let (0x06, oid, _, value) = tlv(atv)? else {
                    return None;
                };
                if oid == [0x55, 0x04, 0x03] {
                    let (tag, s, _, _) = tlv(value)?;
                    if tag == 0x0c || tag == 0x13 {
                        return String::from_utf8(s.to_vec()).ok();
                    }
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_then_reload_gives_the_same_ca() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("egress-ca");
        let a = EgressCa::load_or_create(&dir).expect("create");
        assert!(a.cert_pem().contains("BEGIN CERTIFICATE"));
        let mode = |p: &Path| fs::metadata(p).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join(KEY_FILE)), 0o600);
        assert_eq!(mode(&dir.join(CERT_FILE)), 0o644);
        let key = fs::read_to_string(dir.join(KEY_FILE)).expect("key");
        assert!(key.starts_with("-----BEGIN PRIVATE KEY-----"), "{key}");
        let b = EgressCa::load_or_create(&dir).expect("reload");
        assert_eq!(a.cert_pem(), b.cert_pem());
        let fields = der::cert_fields(&a.cert_der).expect("fields");
        let cn = der::common_name(fields.subject).expect("cn");
        assert!(cn.starts_with("cella egress CA ("), "{cn}");
    }

    #[test]
    fn corrupt_or_half_missing_files_are_errors_and_kept() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path();
        EgressCa::load_or_create(dir).expect("create");
        let cert = fs::read(dir.join(CERT_FILE)).expect("cert");

        fs::write(dir.join(CERT_FILE), b"garbage").expect("write");
        let e = EgressCa::load_or_create(dir).expect_err("corrupt cert");
        assert!(matches!(e, CaError::Invalid { .. }), "{e}");
        assert_eq!(fs::read(dir.join(CERT_FILE)).expect("kept"), b"garbage");

        fs::write(dir.join(CERT_FILE), &cert).expect("restore");
        let key = fs::read(dir.join(KEY_FILE)).expect("key");
        fs::write(dir.join(KEY_FILE), &key[..key.len() / 2]).expect("truncate");
        let e = EgressCa::load_or_create(dir).expect_err("truncated key");
        assert!(e.to_string().contains(KEY_FILE), "{e}");

        // Another CA's key: mismatch.
        let other = tempfile::tempdir().expect("tempdir");
        EgressCa::load_or_create(other.path()).expect("other");
        fs::copy(other.path().join(KEY_FILE), dir.join(KEY_FILE)).expect("copy");
        let e = EgressCa::load_or_create(dir).expect_err("mismatch");
        assert!(e.to_string().contains("does not match"), "{e}");

        fs::remove_file(dir.join(KEY_FILE)).expect("rm");
        let e = EgressCa::load_or_create(dir).expect_err("missing key");
        assert!(e.to_string().contains("missing"), "{e}");
        assert!(!dir.join(KEY_FILE).exists());
    }

    #[test]
    fn leaves_chain_to_the_ca_and_are_cached() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let ca = EgressCa::load_or_create(tmp.path()).expect("create");
        let name = LeafName::Dns("api.example.com".into());
        let a = ca.server_config(&name).expect("leaf");
        let b = ca.server_config(&name).expect("leaf again");
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(a.alpn_protocols, vec![b"http/1.1".to_vec()]);
        let ip = ca
            .server_config(&LeafName::Ip(Ipv4Addr::new(192, 0, 2, 7)))
            .expect("ip leaf");
        assert!(!Arc::ptr_eq(&a, &ip));
        assert!(
            ca.server_config(&LeafName::Dns("bad name\n".into()))
                .is_err()
        );
    }
}
