//! `expire`: caps how long an endpoint registration lives without a refresh.
//!
//! On Register, `expiration_time` becomes the earlier of what the caller
//! asked for and `now + period` (and is set if the caller asked for none).
//! The registry behind it removes the entry at that time, so an endpoint
//! that dies without unregistering disappears within `period`.
//!
//! # Placement
//! In front of the store (registry service) and in the nsmgr's relay.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use nsm_api::registry::{NetworkServiceEndpoint, NetworkServiceEndpointQuery};
use tonic::Status;

use super::{NseRegistry, NseStream};
use crate::networkservice::chain::Context;
use crate::tools::token;

/// The `expire` decorator.
pub struct Expire {
    inner: Arc<dyn NseRegistry>,
    period: Duration,
}

impl Expire {
    /// Caps registrations of `inner` at `period`.
    pub fn new(inner: Arc<dyn NseRegistry>, period: Duration) -> Arc<Expire> {
        Arc::new(Expire { inner, period })
    }
}

/// The capped expiration for a registration asking for `asked`.
pub fn capped(asked: Option<&prost_types::Timestamp>, period: Duration) -> prost_types::Timestamp {
    let cap = SystemTime::now() + period;
    let t = match asked.and_then(token::from_timestamp) {
        Some(a) if a < cap => a,
        _ => cap,
    };
    token::to_timestamp(t)
}

#[async_trait]
impl NseRegistry for Expire {
    async fn register(&self, ctx: &Context, mut nse: NetworkServiceEndpoint) -> Result<NetworkServiceEndpoint, Status> {
        nse.expiration_time = Some(capped(nse.expiration_time.as_ref(), self.period));
        self.inner.register(ctx, nse).await
    }
    async fn find(&self, ctx: &Context, q: NetworkServiceEndpointQuery) -> Result<NseStream, Status> {
        self.inner.find(ctx, q).await
    }
    async fn unregister(&self, ctx: &Context, nse: NetworkServiceEndpoint) -> Result<(), Status> {
        self.inner.unregister(ctx, nse).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_and_keeps_earlier() {
        let p = Duration::from_secs(60);
        let none = token::from_timestamp(&capped(None, p)).unwrap();
        assert!(none > SystemTime::now() + Duration::from_secs(59));
        let far = token::to_timestamp(SystemTime::now() + Duration::from_secs(3600));
        assert!(token::from_timestamp(&capped(Some(&far), p)).unwrap() < SystemTime::now() + Duration::from_secs(61));
        let soon = SystemTime::now() + Duration::from_secs(5);
        let got = token::from_timestamp(&capped(Some(&token::to_timestamp(soon)), p)).unwrap();
        assert_eq!(got, soon);
    }
}
