//! Workload identity and what is built on it: SPIFFE X.509-SVIDs (from the
//! Workload API), mutual TLS on every hop, per-hop ES256 tokens, and policy.
//!
//! # Layout
//! - this module: [`Svid`], [`SvidSource`] (where the current SVID and trust
//!   bundles come from), [`StaticSvid`] for tests.
//! - [`tls`]: rustls server/client configs and transports (mTLS on unix and
//!   TCP), peer identity for the chain.
//! - `jwt`: ES256 JWTs signed with the SVID key.
//! - `policy`: the Rego policy engine and the default policy set.

pub mod jwt;
pub mod policy;
pub mod tls;

use std::sync::Arc;
use std::time::SystemTime;

/// An X.509-SVID: the workload's certificate chain and private key.
#[derive(Clone)]
pub struct Svid {
    /// `spiffe://<trust domain>/<path>`.
    pub spiffe_id: String,
    /// Leaf first, DER.
    pub cert_chain: Vec<Vec<u8>>,
    /// PKCS#8 DER of the leaf's EC P-256 private key.
    pub private_key_pkcs8: Vec<u8>,
    /// Leaf expiry.
    pub not_after: SystemTime,
}

impl std::fmt::Debug for Svid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Svid")
            .field("spiffe_id", &self.spiffe_id)
            .field("chain_len", &self.cert_chain.len())
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// Where a component's current SVID comes from (the Workload API in
/// production; rotation replaces what it returns).
pub trait SvidSource: Send + Sync + 'static {
    /// The current SVID, if one is available.
    fn svid(&self) -> Option<Arc<Svid>>;
}

/// A fixed SVID (tests).
#[derive(Clone, Debug)]
pub struct StaticSvid(pub Arc<Svid>);

impl SvidSource for StaticSvid {
    fn svid(&self) -> Option<Arc<Svid>> {
        Some(self.0.clone())
    }
}
