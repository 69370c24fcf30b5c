//! TLS client settings shared by every outbound connection (the central model over https, the
//! MQTT broker): rustls with the ring provider, trusting only the CA file the operator names.
//! System certificates are never consulted, so a box without them cannot fail oddly (or panic).

use std::path::Path;

/// A client config trusting only the certificates in `ca` (PEM); none: an empty store (for
/// connections that end up plain).
pub fn client_config(ca: Option<&Path>) -> std::io::Result<rustls::ClientConfig> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let bad = |what: String| std::io::Error::new(std::io::ErrorKind::InvalidData, what);
    let mut roots = rustls::RootCertStore::empty();
    if let Some(path) = ca {
        let certs = CertificateDer::pem_file_iter(path)
            .map_err(|e| bad(format!("{}: {e}", path.display())))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(format!("{}: {e}", path.display())))?;
        if certs.is_empty() {
            return Err(bad(format!("{}: no certificate in it", path.display())));
        }
        for cert in certs {
            roots.add(cert).map_err(|e| bad(format!("{}: {e}", path.display())))?;
        }
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}
