//! Admission to the data plane: only engines admitted through the job's config store may read
//! or write each other's registered memory.
//!
//! Each store holds one random 32-byte job secret under [`SECRET_KEY`]. The first engine to
//! initialize creates it atomically (compare-and-set of an absent key); everybody else reads
//! it. Whoever can use the store can therefore use the data plane, and nobody else: with TLS
//! on, the store itself admits only holders of a certificate from the job's CA.
//!
//! Every data connection proves the secret before a request is served: right after the hello,
//! both ends exchange 32-byte nonces and the client sends
//! `HMAC-SHA256(secret, "memfabric data client" | server_nonce | client_nonce)`. Only when it
//! verifies does the server answer with the same over `"memfabric data server"`, so a client
//! without the secret learns nothing it could replay, and the two labels keep one side's proof
//! from ever passing for the other's. Comparisons run in constant time.
//!
//! Without TLS this keeps out everyone who cannot read the store; it does not protect a
//! connection from an attacker on the path, who could take it over after the handshake. With
//! TLS (`set_conf_store_tls`) data connections run mutual TLS with the store's certificates, and
//! the same proof runs inside it, so a connection needs both a certificate from the job's CA and
//! admission by the same store.
//!
//! The secret is an ordinary (not ephemeral) key: it outlives the engine that created it, so
//! engines that come and go keep agreeing. Each engine also publishes the secret it holds under
//! an ephemeral key of its own ([`HOLDER_PREFIX`]), which its store client publishes again
//! after reconnecting: a store restarted without its data learns the job's secret back from
//! the first engine that reconnects, and an engine that starts after that adopts it. (One that
//! starts before any engine of the job reconnected begins a new secret.)

use std::sync::Arc;
use std::time::Duration;

use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};

use crate::error::{Error, Result};
use crate::store::tls::TlsMaterial;
use crate::store::StoreClient;

/// Store key of the job secret.
pub const SECRET_KEY: &str = "mf/auth/data_secret";
/// Prefix of the ephemeral keys under which each engine publishes the secret it holds.
pub const HOLDER_PREFIX: &str = "mf/auth/holders/";
/// Bytes in the job secret.
pub const SECRET_LEN: usize = 32;
/// Bytes in each side's handshake nonce.
pub const NONCE_LEN: usize = 32;
/// Bytes in a proof (an HMAC-SHA256 tag).
pub const PROOF_LEN: usize = 32;
/// How long a client has, by default, from connecting to completing the handshake (TLS, hello
/// and proof); a silent client is dropped when it passes.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

const CLIENT_LABEL: &[u8] = b"memfabric data client";
const SERVER_LABEL: &[u8] = b"memfabric data server";

/// Client and server TLS configurations of the data plane.
#[derive(Clone)]
pub struct DataTls {
    pub server: Arc<rustls::ServerConfig>,
    pub client: Arc<rustls::ClientConfig>,
}

/// What a data server demands of its clients and an initiator proves to servers: the job
/// secret and, when TLS is on, the certificates. Shared by an engine's server and transports.
pub struct DataAuth {
    key: hmac::Key,
    tls: Option<DataTls>,
    handshake_timeout: Duration,
}

impl std::fmt::Debug for DataAuth {
    // The key stays out of logs and panics.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataAuth")
            .field("tls", &self.tls.is_some())
            .field("handshake_timeout", &self.handshake_timeout)
            .finish_non_exhaustive()
    }
}

impl DataAuth {
    /// Proves and demands `secret`, in plaintext.
    pub fn new(secret: &[u8; SECRET_LEN]) -> Self {
        DataAuth {
            key: hmac::Key::new(hmac::HMAC_SHA256, secret),
            tls: None,
            handshake_timeout: HANDSHAKE_TIMEOUT,
        }
    }

    /// Runs every connection inside mutual TLS with `material` (the store's certificates).
    pub fn with_tls(mut self, material: &TlsMaterial) -> Self {
        let mut server = (*material.server).clone();
        // Data connections are pooled for the engine's life, so resumption buys nothing; a
        // ticket would also arrive unasked on an idle pooled connection.
        server.send_tls13_tickets = 0;
        self.tls = Some(DataTls {
            server: Arc::new(server),
            client: material.client.clone(),
        });
        self
    }

    /// Changes how long a server waits for a client to complete the handshake.
    pub fn with_handshake_timeout(mut self, limit: Duration) -> Self {
        self.handshake_timeout = limit;
        self
    }

    /// The job secret of `store` (created there if this is the first engine), with TLS when
    /// `tls` is given. Publishes the secret as held by this engine (see the module docs) for as
    /// long as `store`'s connection lives.
    pub fn for_store(store: &StoreClient, tls: Option<&TlsMaterial>) -> Result<Self> {
        let secret = job_secret(store)?;
        let me = u64::from_le_bytes(random_bytes::<8>()?);
        store.set_ephemeral(&format!("{HOLDER_PREFIX}{me:016x}"), &secret)?;
        let auth = DataAuth::new(&secret);
        Ok(match tls {
            Some(m) => auth.with_tls(m),
            None => auth,
        })
    }

    /// The TLS configurations, when TLS is on.
    pub fn tls(&self) -> Option<&DataTls> {
        self.tls.as_ref()
    }

    pub fn handshake_timeout(&self) -> Duration {
        self.handshake_timeout
    }

    /// What a client sends to prove the secret.
    pub fn client_proof(
        &self,
        server_nonce: &[u8; NONCE_LEN],
        client_nonce: &[u8; NONCE_LEN],
    ) -> [u8; PROOF_LEN] {
        tag(self.sign(CLIENT_LABEL, server_nonce, client_nonce))
    }

    /// What a server sends to prove the secret, once the client proved it.
    pub fn server_proof(
        &self,
        server_nonce: &[u8; NONCE_LEN],
        client_nonce: &[u8; NONCE_LEN],
    ) -> [u8; PROOF_LEN] {
        tag(self.sign(SERVER_LABEL, server_nonce, client_nonce))
    }

    /// Whether `proof` is the client's proof for these nonces (constant time).
    pub fn verify_client(
        &self,
        server_nonce: &[u8; NONCE_LEN],
        client_nonce: &[u8; NONCE_LEN],
        proof: &[u8],
    ) -> bool {
        self.verify(CLIENT_LABEL, server_nonce, client_nonce, proof)
    }

    /// Whether `proof` is the server's proof for these nonces (constant time).
    pub fn verify_server(
        &self,
        server_nonce: &[u8; NONCE_LEN],
        client_nonce: &[u8; NONCE_LEN],
        proof: &[u8],
    ) -> bool {
        self.verify(SERVER_LABEL, server_nonce, client_nonce, proof)
    }

    fn sign(&self, label: &[u8], server_nonce: &[u8], client_nonce: &[u8]) -> hmac::Tag {
        let mut ctx = hmac::Context::with_key(&self.key);
        ctx.update(label);
        ctx.update(server_nonce);
        ctx.update(client_nonce);
        ctx.sign()
    }

    fn verify(&self, label: &[u8], server_nonce: &[u8], client_nonce: &[u8], proof: &[u8]) -> bool {
        let mut msg = Vec::with_capacity(label.len() + 2 * NONCE_LEN);
        msg.extend_from_slice(label);
        msg.extend_from_slice(server_nonce);
        msg.extend_from_slice(client_nonce);
        hmac::verify(&self.key, &msg, proof).is_ok()
    }
}

fn tag(t: hmac::Tag) -> [u8; PROOF_LEN] {
    let mut out = [0u8; PROOF_LEN];
    out.copy_from_slice(t.as_ref());
    out
}

/// Random bytes from the operating system.
pub fn random_bytes<const N: usize>() -> Result<[u8; N]> {
    let mut b = [0u8; N];
    SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| Error::Failed("the operating system gave no random bytes".into()))?;
    Ok(b)
}

/// The job secret of `store`: read, or created atomically by the first caller (from a secret
/// engines of the job still hold, if any published one).
pub fn job_secret(store: &StoreClient) -> Result<[u8; SECRET_LEN]> {
    if let Some(v) = store.get(SECRET_KEY)? {
        return parse_secret(store, &v);
    }
    let mine = match held_secret(store)? {
        Some(s) => s,
        None => random_bytes::<SECRET_LEN>()?,
    };
    // An absent key compares equal to empty: exactly one creator wins; the value returned is
    // the winner's, whoever that is.
    match store.compare_set(SECRET_KEY, b"", &mine) {
        Ok(v) => parse_secret(store, &v),
        // The connection broke mid-call: whether ours landed is unknown, the key is not.
        Err(Error::Reconnected(_)) => match store.get(SECRET_KEY)? {
            Some(v) => parse_secret(store, &v),
            None => Err(Error::NotExist(format!(
                "the data-plane secret {SECRET_KEY} vanished from store {}",
                store.url()
            ))),
        },
        Err(e) => Err(e),
    }
}

/// A secret that a live engine of the job published as held (a store restarted without its data
/// gets these back as engines reconnect).
fn held_secret(store: &StoreClient) -> Result<Option<[u8; SECRET_LEN]>> {
    for key in store.list(HOLDER_PREFIX)? {
        if let Some(v) = store.get(&key)? {
            if let Ok(s) = <[u8; SECRET_LEN]>::try_from(v.as_slice()) {
                return Ok(Some(s));
            }
        }
    }
    Ok(None)
}

fn parse_secret(store: &StoreClient, v: &[u8]) -> Result<[u8; SECRET_LEN]> {
    v.try_into().map_err(|_| {
        Error::Protocol(format!(
            "store {} holds a {}-byte value under {SECRET_KEY} (a data-plane secret is {SECRET_LEN} bytes)",
            store.url(),
            v.len()
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proofs_are_bound_to_secret_nonces_and_side() {
        let a = DataAuth::new(&[1u8; SECRET_LEN]);
        let b = DataAuth::new(&[2u8; SECRET_LEN]);
        let (sn, cn) = ([3u8; NONCE_LEN], [4u8; NONCE_LEN]);
        let p = a.client_proof(&sn, &cn);
        assert!(a.verify_client(&sn, &cn, &p));
        assert!(!b.verify_client(&sn, &cn, &p));
        assert!(!a.verify_client(&cn, &sn, &p));
        assert!(!a.verify_server(&sn, &cn, &p));
        assert!(!a.verify_client(&sn, &cn, &p[..31]));
        let s = a.server_proof(&sn, &cn);
        assert!(a.verify_server(&sn, &cn, &s));
        assert_ne!(s, p);
        assert!(!format!("{a:?}").contains("01"));
    }

    #[test]
    fn random_bytes_differ() {
        let x = random_bytes::<32>().unwrap();
        let y = random_bytes::<32>().unwrap();
        assert_ne!(x, y);
    }
}
