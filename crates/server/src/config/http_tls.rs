//! HTTPS for the web service (`--http-tls-cert` / `--http-tls-key`, or
//! `http_tls_cert` / `http_tls_key` in widgetry.toml): both PEM files are
//! read and parsed when the configuration is validated, the private key is
//! checked against the certificate (a signature made with the key must
//! verify with the certificate's public key), and the rustls server
//! configuration is built then, so a bad file is a configuration problem
//! (exit 64) and never a failure after binding. Like the rest of `config`,
//! this module must never bind or connect.

use std::path::PathBuf;
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::Problem;

/// Validated HTTPS settings: the files and the server configuration made
/// from them.
#[derive(Clone)]
pub struct HttpTls {
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    pub config: Arc<rustls::ServerConfig>,
}

impl std::fmt::Debug for HttpTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpTls")
            .field("cert_path", &self.cert_path)
            .field("key_path", &self.key_path)
            .finish_non_exhaustive()
    }
}

/// Keys (flag spellings) of the two settings, as named in problems.
const CERT_KEY: &str = "http-tls-cert";
const KEY_KEY: &str = "http-tls-key";

/// Validates the pair: both or neither, each readable and parsed, the key
/// the certificate's. `cert`/`key` carry the value and where it came from.
/// Problems are collected; None when off or invalid.
pub fn resolve(
    cert: Option<(PathBuf, String)>,
    key: Option<(PathBuf, String)>,
    problems: &mut Vec<Problem>,
) -> Option<HttpTls> {
    let problem = |src: &str, k: &str, message: String| Problem {
        file: src.to_string(),
        key: k.to_string(),
        message,
    };
    let ((cert_path, cert_src), (key_path, key_src)) = match (cert, key) {
        (None, None) => return None,
        (Some(c), Some(k)) => (c, k),
        (Some((_, src)), None) | (None, Some((_, src))) => {
            problems.push(problem(
                &src,
                "http-tls-cert/http-tls-key",
                "give both --http-tls-cert and --http-tls-key (http_tls_cert and http_tls_key in widgetry.toml), or neither".into(),
            ));
            return None;
        }
    };
    let chain = read_chain(&cert_path)
        .map_err(|m| problems.push(problem(&cert_src, CERT_KEY, m)))
        .ok();
    let private_key = read_key(&key_path)
        .map_err(|m| problems.push(problem(&key_src, KEY_KEY, m)))
        .ok();
    let (chain, private_key) = (chain?, private_key?);
    if let Err(m) = key_matches(&chain[0], &private_key) {
        problems.push(problem(
            &key_src,
            KEY_KEY,
            format!(
                "{:?} {m}; the first certificate of {:?} must be the server's own (then any intermediates)",
                key_path.display().to_string(),
                cert_path.display().to_string()
            ),
        ));
        return None;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let built = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .and_then(|b| b.with_no_client_auth().with_single_cert(chain, private_key));
    match built {
        Ok(mut config) => {
            // Only HTTP/1.1 is served (websocket upgrades need it).
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
            Some(HttpTls {
                cert_path,
                key_path,
                config: Arc::new(config),
            })
        }
        Err(e) => {
            problems.push(problem(&cert_src, CERT_KEY, format!("{e}")));
            None
        }
    }
}

/// The PEM certificate chain in `path`, the server's certificate first.
fn read_chain(path: &std::path::Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let shown = path.display();
    let pem = std::fs::read(path).map_err(|e| format!("{shown:?}: cannot read: {e}"))?;
    let chain: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut &pem[..])
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{shown:?}: not valid PEM: {e}"))?;
    let Some(first) = chain.first() else {
        return Err(format!(
            "{shown:?} holds no PEM certificate (-----BEGIN CERTIFICATE-----)"
        ));
    };
    webpki::EndEntityCert::try_from(first)
        .map_err(|e| format!("{shown:?}: its first certificate does not parse: {e:?}"))?;
    Ok(chain)
}

/// The first PEM private key in `path` (PKCS#8, PKCS#1 or SEC1).
fn read_key(path: &std::path::Path) -> Result<PrivateKeyDer<'static>, String> {
    let shown = path.display();
    let pem = std::fs::read(path).map_err(|e| format!("{shown:?}: cannot read: {e}"))?;
    let key = rustls_pemfile::private_key(&mut &pem[..])
        .map_err(|e| format!("{shown:?}: not valid PEM: {e}"))?
        .ok_or_else(|| {
            format!("{shown:?} holds no PEM private key (-----BEGIN PRIVATE KEY-----, RSA or EC)")
        })?;
    rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| format!("{shown:?}: unsupported private key: {e}"))?;
    Ok(key)
}

/// Whether `key` is the private key of `cert`: a signature made with it
/// verifies with the certificate's public key.
fn key_matches(cert: &CertificateDer<'_>, key: &PrivateKeyDer<'_>) -> Result<(), String> {
    let signing =
        rustls::crypto::ring::sign::any_supported_type(key).map_err(|e| format!("{e}"))?;
    let algorithms = rustls::crypto::ring::default_provider().signature_verification_algorithms;
    let offered: Vec<rustls::SignatureScheme> = algorithms
        .mapping
        .iter()
        .map(|(scheme, _)| *scheme)
        .collect();
    let signer = signing
        .choose_scheme(&offered)
        .ok_or("is a key type that cannot sign for TLS")?;
    let message = b"widgetry: does this key belong to this certificate?";
    let signature = signer
        .sign(message)
        .map_err(|e| format!("cannot sign: {e}"))?;
    let end_entity =
        webpki::EndEntityCert::try_from(cert).map_err(|e| format!("certificate: {e:?}"))?;
    let verifies = algorithms
        .mapping
        .iter()
        .filter(|(scheme, _)| *scheme == signer.scheme())
        .flat_map(|(_, algs)| algs.iter())
        .any(|alg| {
            end_entity
                .verify_signature(*alg, message, &signature)
                .is_ok()
        });
    if verifies {
        Ok(())
    } else {
        Err("is not the private key of the certificate".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed certificate and its key (`{name}-cert.pem`,
    /// `{name}-key.pem`) made by openssl in `dir`.
    fn self_signed(dir: &std::path::Path, name: &str) -> (PathBuf, PathBuf) {
        let (cert, key) = (
            dir.join(format!("{name}-cert.pem")),
            dir.join(format!("{name}-key.pem")),
        );
        let out = std::process::Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            ])
            .args(["-subj", "/CN=localhost", "-keyout"])
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .output()
            .expect("openssl is installed (scripts/test.sh installs it)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        (cert, key)
    }

    fn flag(p: &std::path::Path) -> Option<(PathBuf, String)> {
        Some((p.to_path_buf(), "command line/environment".into()))
    }

    #[test]
    fn both_files_are_needed_readable_and_the_key_must_be_the_certificates() {
        let dir = tempfile::tempdir().expect("dir");
        let (cert_a, key_a) = self_signed(dir.path(), "a");
        let (_, key_b) = self_signed(dir.path(), "b");
        let mut problems = Vec::new();
        assert!(resolve(None, None, &mut problems).is_none() && problems.is_empty());
        let tls = resolve(flag(&cert_a), flag(&key_a), &mut problems).expect("a matching pair");
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(tls.config.alpn_protocols, vec![b"http/1.1".to_vec()]);

        assert!(resolve(flag(&cert_a), None, &mut problems).is_none());
        assert!(problems[0].message.contains("give both"), "{problems:?}");

        let mut problems = Vec::new();
        assert!(resolve(flag(&cert_a), flag(&key_b), &mut problems).is_none());
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].key, "http-tls-key");
        assert!(
            problems[0]
                .message
                .contains("is not the private key of the certificate"),
            "{problems:?}"
        );

        // A key where the certificate should be, and a missing key file:
        // both reported at once.
        let mut problems = Vec::new();
        let missing = dir.path().join("missing-key.pem");
        assert!(resolve(flag(&key_a), flag(&missing), &mut problems).is_none());
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(
            problems[0].message.contains("holds no PEM certificate"),
            "{problems:?}"
        );
        assert!(
            problems[1].message.contains("missing-key.pem")
                && problems[1].message.contains("cannot read"),
            "{problems:?}"
        );
    }
}
