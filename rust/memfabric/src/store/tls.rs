//! TLS for the config store: mutual certificate authentication with one job CA.
//!
//! `tls_info` is a small `key=value` string, entries separated by `;`, `,` or new lines:
//!
//! | key | meaning |
//! |---|---|
//! | `ca` (`ca_file`, `tlsCaPath`) | PEM file of the CA that signs every member's certificate |
//! | `cert` (`cert_file`, `tlsCert`) | PEM file of this process's certificate (chain) |
//! | `key` (`key_file`, `tlsPk`) | PEM file of its private key (PKCS#8, SEC1 or PKCS#1; may be an encrypted PKCS#8 key when a pass phrase is given) |
//! | `key_password` | pass phrase of an encrypted key, in clear (prefer `set_conf_store_tls_key`) |
//!
//! `set_conf_store_tls_key(key, encrypted_pass_phrase, decrypt)` supplies the private key (a
//! path or the PEM text) and a pass phrase that `decrypt` turns into the real one; it overrides
//! `key`. The setting applies to servers and clients created afterwards, in this process.

use std::sync::{Arc, RwLock};

use pkcs8::der::Decode;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::error::{Error, Result};

/// Certificates and keys, resolved into rustls configurations for both ends.
pub struct TlsMaterial {
    pub server: Arc<rustls::ServerConfig>,
    pub client: Arc<rustls::ClientConfig>,
}

/// The active identity as PEM text, for clients configured with PEM rather than rustls (the
/// etcd backend's gRPC channel). The key is decrypted already; it never leaves this process.
#[derive(Clone)]
pub struct TlsPem {
    /// CA certificates.
    pub ca: String,
    /// This process's certificate chain.
    pub cert: String,
    /// Its private key, unencrypted.
    pub key: String,
}

/// Paths (and optional pass phrase) named by a `tls_info` string.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct TlsInfo {
    pub ca: String,
    pub cert: String,
    pub key: String,
    pub key_password: Option<String>,
}

/// A key supplied through `set_conf_store_tls_key`, with its pass phrase already decrypted.
#[derive(Clone)]
pub struct KeyOverride {
    /// A path to a PEM file, or the PEM text itself.
    pub key: String,
    pub password: Option<String>,
}

#[derive(Default)]
struct Settings {
    enabled: Option<TlsInfo>,
    key_override: Option<KeyOverride>,
    material: Option<Arc<TlsMaterial>>,
    pem: Option<Arc<TlsPem>>,
}

static SETTINGS: RwLock<Settings> = RwLock::new(Settings {
    enabled: None,
    key_override: None,
    material: None,
    pem: None,
});

/// Parses a `tls_info` string (see the module docs).
pub fn parse_tls_info(info: &str) -> Result<TlsInfo> {
    let mut out = TlsInfo::default();
    for item in info
        .split([';', ',', '\n'])
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        let (k, v) = item.split_once('=').ok_or_else(|| {
            Error::InvalidParam(format!("tls_info entry {item:?} is not key=value"))
        })?;
        let v = v.trim().to_string();
        match k.trim() {
            "ca" | "ca_file" | "tlsCaPath" => out.ca = v,
            "cert" | "cert_file" | "tlsCert" => out.cert = v,
            "key" | "key_file" | "tlsPk" => out.key = v,
            "key_password" => out.key_password = Some(v),
            other => {
                return Err(Error::InvalidParam(format!(
                    "tls_info key {other:?} is unknown (known: ca, cert, key, key_password)"
                )))
            }
        }
    }
    for (name, v) in [("ca", &out.ca), ("cert", &out.cert)] {
        if v.is_empty() {
            return Err(Error::InvalidParam(format!("tls_info lacks {name}=PATH")));
        }
    }
    Ok(out)
}

/// Turns TLS on (with `info`) or off for servers and clients created from now on.
pub fn set_tls(enable: bool, info: &str) -> Result<()> {
    let mut s = SETTINGS.write().unwrap_or_else(|p| p.into_inner());
    if !enable {
        *s = Settings {
            key_override: s.key_override.take(),
            ..Default::default()
        };
        return Ok(());
    }
    let parsed = parse_tls_info(info)?;
    let material = build(&parsed, s.key_override.as_ref())?;
    s.pem = Some(Arc::new(pem_from(&parsed, s.key_override.as_ref())?));
    s.enabled = Some(parsed);
    s.material = Some(Arc::new(material));
    Ok(())
}

/// Supplies the private key and its decrypted pass phrase (see the module docs).
pub fn set_tls_key(key: KeyOverride) -> Result<()> {
    if key.key.trim().is_empty() {
        return Err(Error::InvalidParam("the TLS private key is empty".into()));
    }
    let mut s = SETTINGS.write().unwrap_or_else(|p| p.into_inner());
    if let Some(info) = s.enabled.clone() {
        let material = build(&info, Some(&key))?;
        s.pem = Some(Arc::new(pem_from(&info, Some(&key))?));
        s.material = Some(Arc::new(material));
    } else {
        // Validate now so the caller hears about a wrong key or pass phrase at once.
        load_key(&key.key, key.password.as_deref())?;
    }
    s.key_override = Some(key);
    Ok(())
}

/// The active TLS material, if TLS is on.
pub fn current() -> Result<Option<Arc<TlsMaterial>>> {
    let s = SETTINGS.read().unwrap_or_else(|p| p.into_inner());
    Ok(s.material.clone())
}

/// The active identity as PEM, if TLS is on (see [`TlsPem`]).
pub fn current_pem() -> Option<Arc<TlsPem>> {
    let s = SETTINGS.read().unwrap_or_else(|p| p.into_inner());
    s.pem.clone()
}

fn read_pem_source(what: &str, source: &str) -> Result<Vec<u8>> {
    if source.contains("-----BEGIN") {
        return Ok(source.as_bytes().to_vec());
    }
    std::fs::read(source).map_err(|e| Error::Tls(format!("cannot read {what} {source:?}: {e}")))
}

fn load_certs(what: &str, path: &str) -> Result<Vec<CertificateDer<'static>>> {
    let pem = read_pem_source(what, path)?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&pem)
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| Error::Tls(format!("{what} {path:?} is not valid PEM: {e}")))?;
    if certs.is_empty() {
        return Err(Error::Tls(format!("{what} {path:?} holds no certificate")));
    }
    Ok(certs)
}

fn load_key(source: &str, password: Option<&str>) -> Result<PrivateKeyDer<'static>> {
    let pem = read_pem_source("private key", source)?;
    let text = String::from_utf8_lossy(&pem);
    if text.contains("ENCRYPTED PRIVATE KEY") {
        let password = password.ok_or_else(|| {
            Error::Tls("the private key is encrypted but no pass phrase was given".into())
        })?;
        let (_, doc) = pkcs8::SecretDocument::from_pem(&text)
            .map_err(|e| Error::Tls(format!("encrypted private key is not valid PEM: {e}")))?;
        let enc = pkcs8::EncryptedPrivateKeyInfo::from_der(doc.as_bytes())
            .map_err(|e| Error::Tls(format!("encrypted private key is malformed: {e}")))?;
        let plain = enc.decrypt(password.as_bytes()).map_err(|_| {
            Error::Tls(
                "cannot decrypt the private key: wrong pass phrase or unsupported cipher".into(),
            )
        })?;
        return Ok(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
            plain.as_bytes().to_vec(),
        )));
    }
    PrivateKeyDer::from_pem_slice(&pem)
        .map_err(|e| Error::Tls(format!("no usable private key found: {e}")))
}

fn build(info: &TlsInfo, key_override: Option<&KeyOverride>) -> Result<TlsMaterial> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let ca = load_certs("CA certificate", &info.ca)?;
    let certs = load_certs("certificate", &info.cert)?;
    let key = match key_override {
        Some(k) => load_key(&k.key, k.password.as_deref())?,
        None if info.key.is_empty() => {
            return Err(Error::InvalidParam(
                "tls_info lacks key=PATH and no key was set with set_conf_store_tls_key".into(),
            ))
        }
        None => load_key(&info.key, info.key_password.as_deref())?,
    };
    let mut roots = rustls::RootCertStore::empty();
    for c in ca {
        roots
            .add(c)
            .map_err(|e| Error::Tls(format!("CA certificate rejected: {e}")))?;
    }
    let roots = Arc::new(roots);
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        roots.clone(),
        provider.clone(),
    )
    .build()
    .map_err(|e| Error::Tls(format!("client verifier: {e}")))?;
    let server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs.clone(), key.clone_key())
        .map_err(|e| {
            Error::Tls(format!(
                "certificate and key do not form a server identity: {e}"
            ))
        })?;
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key)
        .map_err(|e| {
            Error::Tls(format!(
                "certificate and key do not form a client identity: {e}"
            ))
        })?;
    Ok(TlsMaterial {
        server: Arc::new(server),
        client: Arc::new(client),
    })
}

fn pem_of(label: &str, der: &[u8]) -> Result<String> {
    pkcs8::der::pem::encode_string(label, pkcs8::der::pem::LineEnding::LF, der)
        .map_err(|e| Error::Tls(format!("cannot encode a {label} as PEM: {e}")))
}

/// The identity of `info` as PEM, re-encoded from what was parsed (so a file's comments or
/// stray blocks do not travel) and with the key decrypted.
fn pem_from(info: &TlsInfo, key_override: Option<&KeyOverride>) -> Result<TlsPem> {
    let certs_pem = |what: &str, path: &str| -> Result<String> {
        load_certs(what, path)?
            .iter()
            .map(|c| pem_of("CERTIFICATE", c))
            .collect()
    };
    let key = match key_override {
        Some(k) => load_key(&k.key, k.password.as_deref())?,
        None => load_key(&info.key, info.key_password.as_deref())?,
    };
    let label = match &key {
        PrivateKeyDer::Pkcs1(_) => "RSA PRIVATE KEY",
        PrivateKeyDer::Sec1(_) => "EC PRIVATE KEY",
        PrivateKeyDer::Pkcs8(_) => "PRIVATE KEY",
        _ => return Err(Error::Tls("unsupported private key format".into())),
    };
    Ok(TlsPem {
        ca: certs_pem("CA certificate", &info.ca)?,
        cert: certs_pem("certificate", &info.cert)?,
        key: pem_of(label, key.secret_der())?,
    })
}

/// Builds material for explicit paths without touching the process-wide setting (tests, tools).
pub fn material_from(info: &TlsInfo, key_override: Option<&KeyOverride>) -> Result<TlsMaterial> {
    build(info, key_override)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tls_info() {
        let i = parse_tls_info("ca=/a; cert=/b ,key=/c\nkey_password=x").unwrap();
        assert_eq!(
            i,
            TlsInfo {
                ca: "/a".into(),
                cert: "/b".into(),
                key: "/c".into(),
                key_password: Some("x".into())
            }
        );
        assert!(parse_tls_info("ca=/a").is_err());
        assert!(parse_tls_info("ca=/a;cert=/b;bogus=1").is_err());
        assert!(parse_tls_info("ca").is_err());
        assert_eq!(parse_tls_info("").unwrap_err().code(), -2000);
    }

    #[test]
    fn missing_files_are_tls_errors() {
        let i =
            parse_tls_info("ca=/nonexistent/ca.pem;cert=/nonexistent/c.pem;key=/nonexistent/k.pem")
                .unwrap();
        let e = material_from(&i, None).err().unwrap();
        assert_eq!(e.code(), -3004, "{e}");
        assert!(e.to_string().contains("/nonexistent/ca.pem"));
    }
}
