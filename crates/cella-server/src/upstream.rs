//! The proxy's connection to a sandbox port: plain TCP, or TLS for `network.httpsPorts`.
//!
//! Why TLS without verification: a port listed in `httpsPorts` runs a server that speaks HTTPS
//! itself, usually with a self-signed certificate made inside the sandbox. E2B's proxy
//! terminates the client's connection and re-encrypts to the sandbox without checking the
//! backend certificate; cella does the same, so such servers work unchanged. Nothing is
//! lost by not verifying: the TCP connection is created inside the sandbox's own network
//! namespace by its driver (`SandboxHandle::dial`), so no one but that sandbox can answer it.
//! The handshake signature is still checked against the presented key (rustls' own check),
//! only the certificate chain and name are not.

use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::net::TcpStream;

/// A connection into a sandbox, as hyper uses it.
pub enum Upstream {
    /// Plain HTTP (every port not in `httpsPorts`).
    Plain(TokioIo<TcpStream>),
    /// TLS to a port in `httpsPorts`.
    Tls(Box<TokioIo<tokio_rustls::client::TlsStream<TcpStream>>>),
}

/// Accepts any certificate; checks only that the handshake was signed by its key.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The client configuration (built once): TLS 1.2/1.3, HTTP/1.1 by ALPN, any certificate.
fn config() -> Result<Arc<rustls::ClientConfig>, String> {
    static CONFIG: OnceLock<Result<Arc<rustls::ClientConfig>, String>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let mut cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .map_err(|e| format!("TLS client configuration: {e}"))?
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
                .with_no_client_auth();
            cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
            Ok(Arc::new(cfg))
        })
        .clone()
}

/// The server name: the masked host when the sandbox has one (`maskRequestHost`, without a
/// port), sent as SNI; else 127.0.0.1, for which no SNI is sent (as a client dialing an IP).
pub fn server_name(mask: Option<&str>) -> ServerName<'static> {
    mask.and_then(|m| {
        let host = m.rsplit_once(':').map_or(m, |(h, _)| h);
        ServerName::try_from(host.to_string()).ok()
    })
    .unwrap_or_else(|| {
        ServerName::IpAddress(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST).into())
    })
}

/// Wrap `stream` in TLS (handshake done) when `tls` names the server; otherwise plain.
pub async fn connect(
    stream: TcpStream,
    tls: Option<ServerName<'static>>,
) -> std::io::Result<Upstream> {
    let Some(name) = tls else {
        return Ok(Upstream::Plain(TokioIo::new(stream)));
    };
    let cfg = config().map_err(std::io::Error::other)?;
    let s = tokio_rustls::TlsConnector::from(cfg)
        .connect(name, stream)
        .await?;
    Ok(Upstream::Tls(Box::new(TokioIo::new(s))))
}

impl Connection for Upstream {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl hyper::rt::Read for Upstream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Upstream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Upstream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl hyper::rt::Write for Upstream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Upstream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Upstream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Upstream::Plain(s) => Pin::new(s).poll_flush(cx),
            Upstream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Upstream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Upstream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sni_is_the_masked_host_or_localhost() {
        let name = |m| match server_name(m) {
            ServerName::DnsName(n) => n.as_ref().to_string(),
            other => format!("{other:?}"),
        };
        assert!(matches!(server_name(None), ServerName::IpAddress(_)));
        assert_eq!(name(Some("app.example.com")), "app.example.com");
        assert_eq!(name(Some("app.example.com:8443")), "app.example.com");
        assert!(matches!(
            server_name(Some("bad host")),
            ServerName::IpAddress(_)
        ));
    }

    #[test]
    fn config_builds_with_http1_alpn() {
        let cfg = config().expect("config");
        assert_eq!(cfg.alpn_protocols, vec![b"http/1.1".to_vec()]);
    }
}
