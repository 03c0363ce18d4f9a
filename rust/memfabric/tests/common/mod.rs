//! Helpers shared by the data-plane test files.

#![allow(dead_code)]

use std::sync::Arc;

use memfabric::store::tls::{material_from, TlsInfo, TlsMaterial};
use memfabric::transport::auth::DataAuth;

/// A CA and one member certificate for 127.0.0.1, as PEM files in a directory of their own.
pub struct Pki {
    dir: std::path::PathBuf,
}

impl Pki {
    pub fn new(tag: &str) -> Pki {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
        let dir = std::env::temp_dir().join(format!("mf-data-tls-{}-{tag}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_key = KeyPair::generate().unwrap();
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let leaf_params = CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
        let leaf_key = KeyPair::generate().unwrap();
        let leaf = leaf_params.signed_by(&leaf_key, &issuer).unwrap();
        std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
        std::fs::write(dir.join("cert.pem"), leaf.pem()).unwrap();
        std::fs::write(dir.join("key.pem"), leaf_key.serialize_pem()).unwrap();
        Pki { dir }
    }

    pub fn path(&self, file: &str) -> std::path::PathBuf {
        self.dir.join(file)
    }

    pub fn material(&self) -> TlsMaterial {
        let p = |f: &str| self.dir.join(f).to_string_lossy().into_owned();
        material_from(
            &TlsInfo {
                ca: p("ca.pem"),
                cert: p("cert.pem"),
                key: p("key.pem"),
                key_password: None,
            },
            None,
        )
        .unwrap()
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The secret every test job shares unless a test wants another.
pub const JOB_SECRET: [u8; 32] = [7u8; 32];

pub fn job_auth() -> Arc<DataAuth> {
    Arc::new(DataAuth::new(&JOB_SECRET))
}

pub fn tls_auth(pki: &Pki) -> Arc<DataAuth> {
    Arc::new(DataAuth::new(&JOB_SECRET).with_tls(&pki.material()))
}

/// Deterministic bytes, different per seed, cheap to make even in a debug build.
pub fn pattern(seed: u64, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for chunk in v.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    v
}

/// FNV-1a of `b`: compares buffers held by different processes.
pub fn checksum(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &x| {
        (h ^ x as u64).wrapping_mul(0x100_0000_01b3)
    })
}
