//! MQTT over TLS (`--ca-file`): the CA file is read and parsed when the
//! settings are validated ([`ClientTls::load`]), the rustls client
//! configuration built from it is handed to rumqttc, and a failed handshake
//! is explained in words ([`explain`]): which host, which CA file, what is
//! wrong with the certificate. The server's certificate is verified against
//! the certificates of that file only (never the system's roots).
//!
//! Behind the cargo feature `tls` (on by default): without it the agent
//! links no TLS code, and a CA file is refused as a configuration problem.
//! This module must never connect anything itself.

use std::path::PathBuf;

#[cfg(feature = "tls")]
use std::sync::Arc;

/// TLS settings of the connection to the broker, validated.
#[derive(Clone)]
pub struct ClientTls {
    /// The PEM file of the CA certificate(s) the broker's certificate must
    /// chain to.
    pub ca_file: PathBuf,
    /// How many certificates that file holds.
    pub certificates: usize,
    #[cfg(feature = "tls")]
    config: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("ca_file", &self.ca_file)
            .field("certificates", &self.certificates)
            .finish_non_exhaustive()
    }
}

impl ClientTls {
    /// Reads the CA file `path`: it must be readable and hold at least one
    /// PEM certificate that parses. The error says what to fix.
    #[cfg(feature = "tls")]
    pub fn load(path: &str) -> Result<ClientTls, String> {
        let pem = std::fs::read(path).map_err(|e| format!("cannot read the CA file: {e}"))?;
        let certs: Vec<_> = rustls_pemfile::certs(&mut &pem[..])
            .collect::<Result<_, _>>()
            .map_err(|e| format!("the CA file is not valid PEM: {e}"))?;
        if certs.is_empty() {
            return Err(
                "the CA file holds no PEM certificate (-----BEGIN CERTIFICATE-----); \
                 give the CA's certificate, e.g. ca.pem"
                    .into(),
            );
        }
        let mut roots = rustls::RootCertStore::empty();
        let (added, ignored) = roots.add_parsable_certificates(certs);
        if added == 0 {
            return Err(format!(
                "none of the CA file's {ignored} certificate(s) parses as an X.509 certificate"
            ));
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("cannot set up TLS: {e}"))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(ClientTls {
            ca_file: PathBuf::from(path),
            certificates: added,
            config: Arc::new(config),
        })
    }

    /// Without the `tls` feature there is no TLS: a CA file is a problem.
    #[cfg(not(feature = "tls"))]
    pub fn load(_path: &str) -> Result<ClientTls, String> {
        Err(
            "this widgetry-agent was built without TLS (cargo feature `tls`); \
             use a build with default features, or connect without --ca-file"
                .into(),
        )
    }

    /// The rumqttc transport for this configuration.
    #[cfg(feature = "tls")]
    pub fn transport(&self) -> rumqttc::Transport {
        rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(self.config.clone()))
    }
}

/// What a failed connection attempt over TLS means, in words naming the
/// broker `host:port` and the CA file; None when `e` is not about TLS.
#[cfg(feature = "tls")]
pub fn explain(
    e: &rumqttc::ConnectionError,
    host: &str,
    port: u16,
    tls: &ClientTls,
) -> Option<String> {
    use rumqttc::ConnectionError as C;
    use rumqttc::TlsError as T;
    let ca = tls.ca_file.display();
    let e = match e {
        C::Tls(e) => e,
        _ => return None,
    };
    let rustls_error = match e {
        T::TLS(r) => Some(r),
        T::Io(io) => io.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()),
        _ => None,
    };
    Some(match (rustls_error, e) {
        (Some(rustls::Error::InvalidCertificate(c)), _) => {
            use rustls::CertificateError as CE;
            let why = match c {
                CE::UnknownIssuer => "it is not signed by a CA in that file".to_string(),
                CE::NotValidForName => format!(
                    "it is not valid for the name {host:?} (connect with a name the certificate lists, or reissue it with that name)"
                ),
                CE::Expired => "it has expired".to_string(),
                CE::NotValidYet => "it is not valid yet (check the clocks)".to_string(),
                CE::BadSignature => "its signature is bad".to_string(),
                CE::Revoked => "it is revoked".to_string(),
                other => format!("{other:?}"),
            };
            format!(
                "TLS handshake with {host}:{port} failed: the server's certificate does not verify against the CA file {ca}: {why} ({c:?})"
            )
        }
        (Some(rustls::Error::AlertReceived(alert)), _) => format!(
            "TLS handshake with {host}:{port} failed: the server refused it (alert {alert:?})"
        ),
        (Some(r), _) => format!("TLS handshake with {host}:{port} failed: {r}"),
        (None, T::DNSName(_)) => format!(
            "TLS to {host}:{port}: {host:?} is not a valid DNS name or IP address for certificate verification"
        ),
        (None, T::Io(io)) => format!(
            "TLS handshake with {host}:{port} failed: {io} (is that port a TLS listener? the CA file is {ca})"
        ),
        (None, other) => format!("TLS to {host}:{port} failed: {other} (CA file {ca})"),
    })
}

#[cfg(all(test, feature = "tls"))]
mod tests {
    use super::*;

    #[test]
    fn a_missing_file_or_one_without_certificates_is_refused_with_the_reason() {
        let dir = tempfile::tempdir().expect("dir");
        let missing = dir.path().join("nope.pem");
        let err = ClientTls::load(missing.to_str().expect("utf-8")).expect_err("missing");
        assert!(err.contains("cannot read the CA file"), "{err}");
        let key_only = dir.path().join("key.pem");
        std::fs::write(
            &key_only,
            "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\n-----END PRIVATE KEY-----\n",
        )
        .expect("write");
        let err = ClientTls::load(key_only.to_str().expect("utf-8")).expect_err("no certificate");
        assert!(err.contains("holds no PEM certificate"), "{err}");
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(
            &garbage,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .expect("write");
        let err = ClientTls::load(garbage.to_str().expect("utf-8")).expect_err("not X.509");
        assert!(err.contains("parses as an X.509 certificate"), "{err}");
    }

    #[test]
    fn a_certificate_that_does_not_verify_is_explained_with_host_and_ca_file() {
        let tls = ClientTls {
            ca_file: "/etc/widgetry/ca.pem".into(),
            certificates: 1,
            config: Arc::new(
                rustls::ClientConfig::builder_with_provider(Arc::new(
                    rustls::crypto::ring::default_provider(),
                ))
                .with_safe_default_protocol_versions()
                .expect("versions")
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth(),
            ),
        };
        let io = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
        );
        let e = rumqttc::ConnectionError::Tls(rumqttc::TlsError::Io(io));
        let text = explain(&e, "broker.example", 8883, &tls).expect("a TLS error");
        for needle in [
            "broker.example:8883",
            "/etc/widgetry/ca.pem",
            "does not verify",
            "not signed by a CA in that file",
        ] {
            assert!(text.contains(needle), "{needle:?} missing from {text}");
        }
        let plain = rumqttc::ConnectionError::NetworkTimeout;
        assert_eq!(explain(&plain, "h", 1, &tls), None);
    }
}
