//! The channel pool: one dialed channel per URL, shared by every
//! connection of a component, redialed when an SVID rotated.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tonic::Status;
use tonic::transport::Channel;
use url::Url;

use super::dial::{ServerPeerCell, dial_with};
use crate::security::SvidSource;
use crate::security::tls::{PeerIdentity, Tls};

/// Dialed channels by URL, shared by every connection of a component.
#[derive(Clone, Default)]
pub struct ChannelPool {
    chans: Arc<Mutex<HashMap<String, (Channel, ServerPeerCell)>>>,
    dial_timeout: Duration,
    tls: Option<Arc<Tls>>,
}

impl ChannelPool {
    /// A pool dialing plaintext with `dial_timeout`.
    pub fn new(dial_timeout: Duration) -> ChannelPool {
        ChannelPool { chans: Arc::default(), dial_timeout, tls: None }
    }

    /// A pool dialing with mutual TLS when `tls` is given.
    pub fn with_tls(dial_timeout: Duration, tls: Option<Arc<Tls>>) -> ChannelPool {
        ChannelPool { chans: Arc::default(), dial_timeout, tls }
    }

    /// The TLS identity this pool dials with, if any.
    pub fn tls(&self) -> Option<&Arc<Tls>> {
        self.tls.as_ref()
    }

    /// A channel to `u`, dialing if needed.
    pub async fn get(&self, u: &Url) -> Result<Channel, Status> {
        Ok(self.get_with_peer(u).await?.0)
    }

    /// A channel to `u` and who it reached (for client-side policy).
    ///
    /// With TLS, a channel is redialed (new handshake) once our SVID has
    /// rotated since it was dialed, or once the server's certificate is past
    /// half its lifetime (when SPIRE rotates it), so both sides' tokens keep
    /// verifying against the certificates of the connection they travel on.
    /// Calls in flight on the old channel finish on it.
    pub async fn get_with_peer(&self, u: &Url) -> Result<(Channel, PeerIdentity), Status> {
        if let Some((c, p)) = self.chans.lock().unwrap_or_else(|e| e.into_inner()).get(u.as_str()) {
            let peer = p.lock().unwrap_or_else(|e| e.into_inner()).clone();
            if !self.stale(&peer) {
                return Ok((c.clone(), peer));
            }
            tracing::debug!(url = %u, server = ?peer.spiffe_id, "SVID rotated: redialing for a fresh TLS handshake");
        }
        let (c, p) =
            dial_with(u, self.dial_timeout, self.tls.as_ref()).await.map_err(|e| Status::unavailable(e.to_string()))?;
        let peer = p.lock().unwrap_or_else(|e| e.into_inner()).clone();
        self.chans.lock().unwrap_or_else(|e| e.into_inner()).insert(u.to_string(), (c.clone(), p));
        Ok((c, peer))
    }

    fn stale(&self, peer: &PeerIdentity) -> bool {
        let Some(tls) = &self.tls else { return false };
        let ours_rotated = match (&peer.local, tls.svid()) {
            (Some(dialed), Some(now)) => !Arc::ptr_eq(dialed, &now),
            _ => false,
        };
        ours_rotated || peer.half_life.is_some_and(|h| std::time::SystemTime::now() >= h)
    }

    /// Forgets a channel after a transport failure, so the next call redials.
    pub fn evict(&self, u: &Url) {
        self.chans.lock().unwrap_or_else(|e| e.into_inner()).remove(u.as_str());
    }
}
