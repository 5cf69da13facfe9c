//! The nsmgr's endpoint-registry relay: what happens to a registration on
//! its way from a local endpoint (or forwarder) to the registry, and to Find
//! results on their way back.
//!
//! - `clientinfo`: every service label map gets `nodeName`/`podName`/
//!   `clusterName` of this nsmgr (never overwriting the endpoint's own).
//! - `expire`: the registration lives at most `period` without a refresh.
//! - `localbypass`: the endpoint's own URL (a unix socket on this node) is
//!   remembered and the registry stores this nsmgr's public URL instead, so
//!   other nodes reach the endpoint through this nsmgr. Find results for
//!   endpoints registered here get their real URL back; results that point
//!   at this nsmgr but are unknown here (left over from before a restart) are
//!   dropped.
//! - `recvfd`: an endpoint registering `inode://<dev>/<ino>` (upstream's
//!   sendfd: its socket passed as an fd on the unix connection) is reached
//!   through that fd: the nsmgr keeps it while the registration lives and
//!   the local URL is `unix:///proc/<nsmgr pid>/fd/<n>` (same for every
//!   refresh of the same socket), which the forwarder dials, so the
//!   endpoint's socket needs no path both can see. The endpoint gets its
//!   `inode://` URL back, as upstream's recvfd restores it.

use std::collections::{BTreeMap, HashMap};
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use futures::StreamExt;
use nsm_api::registry::{NetworkServiceEndpoint, NetworkServiceEndpointQuery};
use nsm_sdk::networkservice::Context;
use nsm_sdk::registry::expire::capped;
use nsm_sdk::registry::{NseRegistry, NseStream};
use nsm_sdk::tools::grpc::parse_url;
use nsm_sdk::tools::grpcfd;
use nsm_sdk::tools::token;
use tonic::Status;

/// The relay in front of the real endpoint registry.
pub struct NseRelay {
    inner: Arc<dyn NseRegistry>,
    public_url: String,
    labels: BTreeMap<String, String>,
    period: Duration,
    /// localbypass: endpoint name → the URL it registered with.
    local: Arc<Mutex<HashMap<String, Local>>>,
}

/// An endpoint registered through this nsmgr.
#[derive(Clone, Debug)]
struct Local {
    url: String,
    /// When the registration lapses without a refresh.
    expires: Option<SystemTime>,
    /// The endpoint's socket, when it was passed as an fd (`url` names it).
    socket: Option<PassedSocket>,
}

/// A passed endpoint socket and the `inode://` URL it was registered as.
#[derive(Clone, Debug)]
struct PassedSocket {
    inode_url: String,
    fd: Arc<OwnedFd>,
}

impl NseRelay {
    /// A relay forwarding to `inner`, rewriting URLs to `public_url`.
    pub fn new(
        inner: Arc<dyn NseRegistry>,
        public_url: &str,
        labels: BTreeMap<String, String>,
        period: Duration,
    ) -> Arc<NseRelay> {
        Arc::new(NseRelay { inner, public_url: public_url.to_string(), labels, period, local: Arc::default() })
    }

    /// Number of endpoints registered through this nsmgr (for leak checks).
    pub fn local_len(&self) -> usize {
        self.local.lock().map(|m| m.len()).unwrap_or(0)
    }

    fn local_url(&self, name: &str) -> Option<String> {
        self.local.lock().unwrap_or_else(|e| e.into_inner()).get(name).map(|l| l.url.clone())
    }

    /// The socket fd an `inode://` registration passed (the one kept from an
    /// earlier registration of the same socket, so the URL stays the same).
    fn passed_socket(&self, ctx: &Context, nse: &NetworkServiceEndpoint) -> Result<Option<PassedSocket>, Status> {
        let Some(id) = grpcfd::parse_inode_url(&nse.url) else { return Ok(None) };
        let kept = self
            .local
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&nse.name)
            .and_then(|l| l.socket.clone())
            .filter(|s| s.inode_url == nse.url);
        if let Some(s) = kept {
            return Ok(Some(s));
        }
        let fd = ctx.peer.fds.as_ref().and_then(|f| f.get(id)).ok_or_else(|| {
            Status::invalid_argument(format!(
                "endpoint {:?} registers {}, a passed socket, but no file descriptor for it came on this connection \
                 (fds pass only over the nsmgr's unix socket, with SCM_RIGHTS as grpcfd sends them)",
                nse.name, nse.url
            ))
        })?;
        Ok(Some(PassedSocket { inode_url: nse.url.clone(), fd }))
    }

    /// True if `name` registered through this nsmgr and has not lapsed.
    pub fn is_local(&self, name: &str) -> bool {
        let now = SystemTime::now();
        self.local
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .is_some_and(|l| l.expires.is_none_or(|t| t > now))
    }
}

#[async_trait]
impl NseRegistry for NseRelay {
    async fn register(&self, ctx: &Context, mut nse: NetworkServiceEndpoint) -> Result<NetworkServiceEndpoint, Status> {
        let socket = self.passed_socket(ctx, &nse)?;
        if let Some(s) = &socket {
            nse.url = format!("unix://{}", grpcfd::proc_path(&s.fd));
        }
        parse_url(&nse.url).map_err(|e| {
            Status::invalid_argument(format!("endpoint {:?} registers with an unusable URL: {e}", nse.name))
        })?;
        if nse.network_service_names.is_empty() {
            return Err(Status::invalid_argument(format!("endpoint {:?} registers no network service", nse.name)));
        }
        if nse.name.is_empty() {
            nse.name = format!("nse-{}", uuid::Uuid::new_v4());
        }
        for svc in nse.network_service_names.clone() {
            let l = nse.network_service_labels.entry(svc).or_default();
            for (k, v) in &self.labels {
                l.labels.entry(k.clone()).or_insert_with(|| v.clone());
            }
        }
        let exp = capped(nse.expiration_time.as_ref(), self.period);
        let expires = token::from_timestamp(&exp);
        nse.expiration_time = Some(exp);
        let real = std::mem::replace(&mut nse.url, self.public_url.clone());
        let name = nse.name.clone();
        {
            let mut local = self.local.lock().unwrap_or_else(|e| e.into_inner());
            // Forget endpoints that stopped refreshing (they crashed).
            let now = SystemTime::now();
            local.retain(|_, l| l.expires.is_none_or(|t| t > now));
            local.insert(name.clone(), Local { url: real.clone(), expires, socket: socket.clone() });
        }
        match self.inner.register(ctx, nse).await {
            Ok(mut stored) => {
                stored.url = socket.map(|s| s.inode_url).unwrap_or(real);
                Ok(stored)
            }
            Err(e) => {
                self.local.lock().unwrap_or_else(|e| e.into_inner()).remove(&name);
                Err(e)
            }
        }
    }

    async fn find(&self, ctx: &Context, q: NetworkServiceEndpointQuery) -> Result<NseStream, Status> {
        let s = self.inner.find(ctx, q).await?;
        // The map is shared (not copied) so a watch sees later registrations.
        let local = self.local.clone();
        let public = self.public_url.clone();
        Ok(Box::pin(s.filter_map(move |r| {
            let local = local.clone();
            let public = public.clone();
            async move {
                let mut r = match r {
                    Ok(r) => r,
                    Err(e) => return Some(Err(e)),
                };
                let Some(nse) = r.network_service_endpoint.as_mut() else { return Some(Ok(r)) };
                let real = local.lock().unwrap_or_else(|e| e.into_inner()).get(&nse.name).map(|l| l.url.clone());
                if let Some(real) = real {
                    nse.url = real;
                } else if !r.deleted && nse.url == public {
                    tracing::debug!(nse = %nse.name, "dropping a registry entry that points here but is unknown (stale)");
                    return None;
                }
                Some(Ok(r))
            }
        })))
    }

    async fn unregister(&self, ctx: &Context, mut nse: NetworkServiceEndpoint) -> Result<(), Status> {
        if self.local_url(&nse.name).is_some() {
            nse.url = self.public_url.clone();
        }
        let res = self.inner.unregister(ctx, nse.clone()).await;
        self.local.lock().unwrap_or_else(|e| e.into_inner()).remove(&nse.name);
        res
    }
}

#[cfg(test)]
mod tests {
    use nsm_sdk::registry::find_nses;
    use nsm_sdk::registry::memory::MemoryRegistry;

    use super::*;

    const PUBLIC: &str = "tcp://10.0.0.1:5001";

    fn relay(store: &MemoryRegistry) -> Arc<NseRelay> {
        let labels = BTreeMap::from([("nodeName".to_string(), "node-1".to_string())]);
        NseRelay::new(Arc::new(store.clone()), PUBLIC, labels, Duration::from_secs(60))
    }

    fn nse(name: &str, url: &str) -> NetworkServiceEndpoint {
        NetworkServiceEndpoint {
            name: name.into(),
            url: url.into(),
            network_service_names: vec!["svc".into()],
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn localbypass_stores_public_url_and_restores_local_one() {
        let store = MemoryRegistry::new();
        let r = relay(&store);
        let ctx = Context::default();
        let back = r.register(&ctx, nse("e1", "unix:///run/e1.sock")).await.unwrap();
        assert_eq!(back.url, "unix:///run/e1.sock", "the caller sees its own URL");
        assert_eq!(back.network_service_labels["svc"].labels["nodeName"], "node-1", "clientinfo label");
        assert!(back.expiration_time.is_some(), "expire sets an expiration");
        // The registry holds the nsmgr's public URL ...
        let stored = find_nses(&store, &ctx, NetworkServiceEndpoint::default()).await.unwrap();
        assert_eq!(stored[0].url, PUBLIC);
        // ... and Find through this nsmgr gives the local URL back.
        let found = find_nses(r.as_ref(), &ctx, NetworkServiceEndpoint::default()).await.unwrap();
        assert_eq!(found[0].url, "unix:///run/e1.sock");
        assert!(r.is_local("e1"));
        r.unregister(&ctx, nse("e1", "unix:///run/e1.sock")).await.unwrap();
        assert_eq!(r.local_len(), 0);
        assert!(!r.is_local("e1"));
        assert!(find_nses(&store, &ctx, NetworkServiceEndpoint::default()).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn stale_entries_pointing_here_are_dropped_others_kept() {
        let store = MemoryRegistry::new();
        let ctx = Context::default();
        // Left over from before a restart: points here, unknown locally.
        NseRegistry::register(&store, &ctx, nse("stale", PUBLIC)).await.unwrap();
        // Registered through another node's nsmgr.
        NseRegistry::register(&store, &ctx, nse("remote", "tcp://10.0.0.2:5001")).await.unwrap();
        let r = relay(&store);
        let found = find_nses(r.as_ref(), &ctx, NetworkServiceEndpoint::default()).await.unwrap();
        let names: Vec<_> = found.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["remote"]);
        assert_eq!(found[0].url, "tcp://10.0.0.2:5001");
    }

    #[tokio::test]
    async fn lapsed_local_endpoints_are_forgotten() {
        let store = MemoryRegistry::new();
        let r = NseRelay::new(Arc::new(store.clone()), PUBLIC, BTreeMap::new(), Duration::from_millis(50));
        r.register(&Context::default(), nse("crashed", "unix:///c.sock")).await.unwrap();
        assert!(r.is_local("crashed"));
        tokio::time::sleep(Duration::from_millis(80)).await;
        assert!(!r.is_local("crashed"));
        r.register(&Context::default(), nse("other", "unix:///o.sock")).await.unwrap();
        assert_eq!(r.local_len(), 1, "the lapsed entry is pruned");
    }

    #[tokio::test]
    async fn bad_registrations_are_refused_clearly() {
        let store = MemoryRegistry::new();
        let r = relay(&store);
        let e = r.register(&Context::default(), nse("e", "ftp://x")).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains("ftp://x"), "{}", e.message());
        let mut no_svc = nse("e", "unix:///e.sock");
        no_svc.network_service_names.clear();
        assert!(r.register(&Context::default(), no_svc).await.is_err());
        assert_eq!(r.local_len(), 0);
    }

    /// A context whose caller passed the fd of the unix socket file at
    /// `path`, as upstream's registry sendfd does; returns it with the
    /// `inode://` URL that names the socket.
    fn passing(path: &std::path::Path) -> (Context, String) {
        let fds = Arc::new(grpcfd::FdTransfer::default());
        let (fd, id) = grpcfd::open_path(path).unwrap();
        fds.accept(fd);
        let url = grpcfd::inode_url(id);
        let mut ctx = Context::default();
        ctx.peer.fds = Some(fds);
        (ctx, url)
    }

    #[tokio::test]
    async fn a_passed_socket_is_reached_through_the_kept_fd() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("listen.on");
        let _ln = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let store = MemoryRegistry::new();
        let r = relay(&store);
        let (ctx, url) = passing(&sock);
        let back = r.register(&ctx, nse("e1", &url)).await.unwrap();
        assert_eq!(back.url, url, "the endpoint gets its inode:// URL back, as upstream's recvfd restores it");
        let found = find_nses(r.as_ref(), &ctx, NetworkServiceEndpoint::default()).await.unwrap();
        let local = found[0].url.clone();
        assert!(local.starts_with(&format!("unix:///proc/{}/fd/", std::process::id())), "{local}");
        // The kept fd reaches the socket, whatever the caller's filesystem.
        std::os::unix::net::UnixStream::connect(local.trim_start_matches("unix://")).unwrap();
        // A refresh passes the fd again: the URL stays the same.
        let (ctx2, url2) = passing(&sock);
        assert_eq!(url2, url);
        r.register(&ctx2, nse("e1", &url2)).await.unwrap();
        let again = find_nses(r.as_ref(), &ctx, NetworkServiceEndpoint::default()).await.unwrap();
        assert_eq!(again[0].url, local);
        assert_eq!(find_nses(&store, &ctx, NetworkServiceEndpoint::default()).await.unwrap()[0].url, PUBLIC);
        r.unregister(&ctx, nse("e1", &url)).await.unwrap();
        assert_eq!(r.local_len(), 0, "the kept fd goes with the registration");
    }

    #[tokio::test]
    async fn an_inode_url_without_its_fd_is_refused_naming_it() {
        let store = MemoryRegistry::new();
        let r = relay(&store);
        let e = r.register(&Context::default(), nse("e1", "inode://12/34")).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains("inode://12/34") && e.message().contains("no file descriptor"), "{}", e.message());
        assert_eq!(r.local_len(), 0);
        assert!(find_nses(&store, &Context::default(), NetworkServiceEndpoint::default()).await.unwrap().is_empty());
    }
}
