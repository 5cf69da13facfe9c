//! gRPC plumbing shared by every component: NSM URLs, listeners on unix and
//! TCP sockets behind one server, dialing with a channel pool, deadlines.
//!
//! NSM URLs: `unix:///path/to.sock`, `tcp://host:port`, and for
//! compatibility with upstream env values a bare `host:port`
//! (`NSM_REGISTRY_URL=registry:5002`). `tcp://:5001` listens on all
//! addresses.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskCx, Poll};
use std::time::Duration;

use futures::Stream;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tonic::Status;
use tonic::transport::server::Connected;
use tonic::transport::{Channel, Endpoint};
use url::Url;

use crate::networkservice::chain::Peer;
use crate::security::SvidSource;
use crate::security::tls::{PeerIdentity, Tls, peer_identity};

/// Errors of URL parsing and socket setup; they name the URL or path.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid URL {url:?}: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("cannot listen on {url}: {source}")]
    Listen { url: String, source: std::io::Error },
    #[error("cannot reach {url}: {reason}")]
    Dial { url: String, reason: String },
}

/// Parses an NSM gRPC URL into a normalised `unix:///path` or
/// `tcp://host:port` URL.
pub fn parse_url(s: &str) -> Result<Url, Error> {
    let bad = |reason: &str| Error::BadUrl { url: s.to_string(), reason: reason.to_string() };
    let s = s.trim();
    if s.is_empty() {
        return Err(bad("empty"));
    }
    let full = if s.contains("://") { s.to_string() } else { format!("tcp://{s}") };
    if let Some(rest) = full.strip_prefix("tcp://:") {
        // `tcp://:5001`: the url crate rejects an empty host.
        return parse_url(&format!("tcp://0.0.0.0:{rest}"));
    }
    let u = Url::parse(&full).map_err(|e| bad(&e.to_string()))?;
    match u.scheme() {
        "unix" => {
            if u.path().is_empty() || u.path() == "/" {
                return Err(bad(
                    "unix URL needs an absolute socket path, e.g. unix:///var/lib/networkservicemesh/nsm.io.sock",
                ));
            }
            if u.host_str().is_some_and(|h| !h.is_empty()) {
                return Err(bad("unix URL must have an empty host: use three slashes, unix:///path"));
            }
        }
        "tcp" => {
            if u.host_str().is_none_or(|h| h.is_empty()) {
                return Err(bad("tcp URL needs a host"));
            }
            if u.port().is_none() {
                return Err(bad("tcp URL needs a port"));
            }
        }
        other => return Err(bad(&format!("unsupported scheme {other:?}; use unix:// or tcp://"))),
    }
    Ok(u)
}

/// Parses a comma-separated list of URLs (`NSM_LISTEN_ON`).
pub fn parse_url_list(s: &str) -> Result<UrlList, Error> {
    let v: Vec<Url> = s.split(',').map(str::trim).filter(|x| !x.is_empty()).map(parse_url).collect::<Result<_, _>>()?;
    if v.is_empty() {
        return Err(Error::BadUrl { url: s.to_string(), reason: "no URL given".into() });
    }
    Ok(UrlList(v))
}

/// A list of URLs given as one comma-separated value (a newtype so clap
/// treats it as a single value).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UrlList(pub Vec<Url>);

/// `host:port` of a tcp URL (IPv6 hosts bracketed).
pub fn tcp_authority(u: &Url) -> Option<String> {
    let host = u.host()?;
    let port = u.port()?;
    Some(match host {
        url::Host::Ipv6(a) => format!("[{a}]:{port}"),
        h => format!("{h}:{port}"),
    })
}

/// Parses grpc's `grpc-timeout` header (`<digits><H|M|S|m|u|n>`).
pub fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    let (num, unit) = v.split_at(v.len().checked_sub(1)?);
    let n: u64 = num.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

// === listeners ===

/// A connection accepted on a unix or TCP listener.
pub enum Io {
    Unix(UnixStream),
    Tcp(TcpStream),
}

/// What the transport knows about the caller; available to handlers as a
/// request extension.
#[derive(Clone, Debug)]
pub struct ConnInfo {
    pub peer: Peer,
}

impl Connected for Io {
    type ConnectInfo = ConnInfo;
    fn connect_info(&self) -> ConnInfo {
        let mut peer = Peer::default();
        match self {
            Io::Unix(s) => {
                if let Ok(c) = s.peer_cred() {
                    peer.uid = Some(c.uid());
                    peer.pid = c.pid();
                }
            }
            Io::Tcp(s) => peer.addr = s.peer_addr().ok(),
        }
        ConnInfo { peer }
    }
}

impl AsyncRead for Io {
    fn poll_read(self: Pin<&mut Self>, cx: &mut TaskCx<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Unix(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tcp(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(self: Pin<&mut Self>, cx: &mut TaskCx<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Io::Unix(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tcp(s) => Pin::new(s).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut TaskCx<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Unix(s) => Pin::new(s).poll_flush(cx),
            Io::Tcp(s) => Pin::new(s).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut TaskCx<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Unix(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tcp(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// Bound listeners for a set of URLs. Unix socket files are removed when
/// this is dropped.
pub struct Listeners {
    unix: Vec<(UnixListener, PathBuf)>,
    tcp: Vec<TcpListener>,
    urls: Vec<Url>,
}

impl Listeners {
    /// Binds every URL. A stale unix socket file (nobody accepting) is
    /// replaced; a live one is an error, so two daemons never share a path.
    pub async fn bind(urls: &[Url]) -> Result<Listeners, Error> {
        let mut l = Listeners { unix: vec![], tcp: vec![], urls: vec![] };
        for u in urls {
            let lerr = |source| Error::Listen { url: u.to_string(), source };
            match u.scheme() {
                "unix" => {
                    let path = PathBuf::from(u.path());
                    if let Some(dir) = path.parent() {
                        std::fs::create_dir_all(dir).map_err(lerr)?;
                    }
                    if path.exists() {
                        if UnixStream::connect(&path).await.is_ok() {
                            return Err(lerr(std::io::Error::new(
                                std::io::ErrorKind::AddrInUse,
                                "another process is serving this socket",
                            )));
                        }
                        let _ = std::fs::remove_file(&path);
                    }
                    let ln = UnixListener::bind(&path).map_err(lerr)?;
                    l.urls.push(u.clone());
                    l.unix.push((ln, path));
                }
                _ => {
                    let auth = tcp_authority(u)
                        .ok_or_else(|| Error::BadUrl { url: u.to_string(), reason: "needs host:port".into() })?;
                    let ln = TcpListener::bind(&auth).await.map_err(lerr)?;
                    let local = ln.local_addr().map_err(lerr)?;
                    // Report the real port when asked for port 0.
                    let mut bound = u.clone();
                    let _ = bound.set_port(Some(local.port()));
                    l.urls.push(bound);
                    l.tcp.push(ln);
                }
            }
        }
        Ok(l)
    }

    /// The URLs actually bound (with real ports).
    pub fn urls(&self) -> &[Url] {
        &self.urls
    }

    /// First bound TCP address, if any.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp.first().and_then(|l| l.local_addr().ok())
    }

    /// One stream of accepted plaintext connections from every listener.
    pub fn into_incoming(self) -> (Incoming, SocketGuard) {
        self.into_incoming_with(None)
    }

    /// One stream of accepted connections from every listener; with `tls`,
    /// each connection's TLS handshake runs in its own task (bounded by
    /// [`HANDSHAKE_TIMEOUT`]) so a slow or failing peer never blocks
    /// accepting, and a failed handshake is logged with what is known of
    /// the peer and dropped.
    pub fn into_incoming_with(self, tls: Option<Arc<Tls>>) -> (Incoming, SocketGuard) {
        let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Conn>>(128);
        let (raw_tx, mut raw_rx) = tokio::sync::mpsc::channel::<std::io::Result<Io>>(128);
        let mut tasks = vec![];
        let paths = self.unix.iter().map(|(_, p)| p.clone()).collect();
        for (ln, _) in self.unix {
            let tx = raw_tx.clone();
            tasks.push(tokio::spawn(async move {
                loop {
                    let r = ln.accept().await.map(|(s, _)| Io::Unix(s));
                    if tx.send(r).await.is_err() {
                        break;
                    }
                }
            }));
        }
        for ln in self.tcp {
            let tx = raw_tx.clone();
            tasks.push(tokio::spawn(async move {
                loop {
                    let r = ln.accept().await.map(|(s, _)| {
                        let _ = s.set_nodelay(true);
                        Io::Tcp(s)
                    });
                    if tx.send(r).await.is_err() {
                        break;
                    }
                }
            }));
        }
        drop(raw_tx);
        tasks.push(tokio::spawn(async move {
            while let Some(r) = raw_rx.recv().await {
                let io = match r {
                    Ok(io) => io,
                    Err(e) => {
                        if tx.send(Err(e)).await.is_err() {
                            break;
                        }
                        continue;
                    }
                };
                match &tls {
                    None => {
                        if tx.send(Ok(Conn::Plain(io))).await.is_err() {
                            break;
                        }
                    }
                    Some(t) => {
                        let (t, tx) = (t.clone(), tx.clone());
                        tokio::spawn(async move {
                            t.ready().await;
                            let (acceptor, local) = t.acceptor();
                            let who = io.connect_info().peer;
                            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(io)).await {
                                Ok(Ok(stream)) => {
                                    let _ = tx.send(Ok(Conn::Tls(Box::new(TlsConn { stream, local })))).await;
                                }
                                // A peer hanging up mid-handshake (it retries
                                // after its own SVID changed, or gave up on
                                // ours and says so in its own log) is no
                                // verdict of ours.
                                Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => tracing::info!(
                                    peer_pid = ?who.pid,
                                    peer_addr = ?who.addr,
                                    "the peer hung up during the TLS handshake"
                                ),
                                // A ClientHello without signature schemes is
                                // what spiffe-rustls sends while it converts
                                // a new SVID or bundle (milliseconds, right
                                // after start or a rotation); our dialers
                                // retry it.
                                Ok(Err(e)) if offered_no_signature_schemes(&e) => tracing::info!(
                                    peer_pid = ?who.pid,
                                    peer_addr = ?who.addr,
                                    "the peer's TLS was not ready yet (no signature schemes offered; it retries)"
                                ),
                                Ok(Err(e)) => tracing::warn!(
                                    peer_pid = ?who.pid,
                                    peer_addr = ?who.addr,
                                    error = %e,
                                    "TLS handshake refused: the peer has no valid SVID from a trusted domain, or does not speak TLS"
                                ),
                                Err(_) => tracing::warn!(peer_pid = ?who.pid, peer_addr = ?who.addr, "TLS handshake timed out"),
                            }
                        });
                    }
                }
            }
        }));
        (Incoming { rx }, SocketGuard { paths, tasks })
    }
}

/// A handshake that failed because the client's hello offered no signature
/// schemes.
fn offered_no_signature_schemes(e: &std::io::Error) -> bool {
    matches!(
        e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()),
        Some(rustls::Error::InvalidMessage(rustls::InvalidMessage::NoSignatureSchemes))
    )
}

/// How long a peer may take for its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// An accepted connection: plaintext, or TLS over it.
pub enum Conn {
    Plain(Io),
    Tls(Box<TlsConn>),
}

/// An accepted TLS connection and the SVID this side presented on it (as
/// read right after the handshake): tokens minted for this peer are signed
/// with that SVID, so they verify against the certificate the peer saw
/// even after our SVID rotated.
pub struct TlsConn {
    pub stream: tokio_rustls::server::TlsStream<Io>,
    pub local: Option<Arc<crate::security::Svid>>,
}

impl AsyncRead for TlsConn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut TaskCx<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut TaskCx<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut TaskCx<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut TaskCx<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

impl Connected for Conn {
    type ConnectInfo = ConnInfo;
    fn connect_info(&self) -> ConnInfo {
        match self {
            Conn::Plain(io) => io.connect_info(),
            Conn::Tls(t) => {
                let (io, session) = t.stream.get_ref();
                let mut ci = io.connect_info();
                let id = peer_identity(session.peer_certificates());
                ci.peer.spiffe_id = id.spiffe_id;
                ci.peer.cert_der = id.cert_der;
                ci.peer.local_svid = t.local.clone();
                ci
            }
        }
    }
}

macro_rules! delegate_io {
    ($t:ty, $($v:ident),+) => {
        impl AsyncRead for $t {
            fn poll_read(self: Pin<&mut Self>, cx: &mut TaskCx<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
                match self.get_mut() { $(Self::$v(s) => Pin::new(s).poll_read(cx, buf),)+ }
            }
        }
        impl AsyncWrite for $t {
            fn poll_write(self: Pin<&mut Self>, cx: &mut TaskCx<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
                match self.get_mut() { $(Self::$v(s) => Pin::new(s).poll_write(cx, buf),)+ }
            }
            fn poll_flush(self: Pin<&mut Self>, cx: &mut TaskCx<'_>) -> Poll<std::io::Result<()>> {
                match self.get_mut() { $(Self::$v(s) => Pin::new(s).poll_flush(cx),)+ }
            }
            fn poll_shutdown(self: Pin<&mut Self>, cx: &mut TaskCx<'_>) -> Poll<std::io::Result<()>> {
                match self.get_mut() { $(Self::$v(s) => Pin::new(s).poll_shutdown(cx),)+ }
            }
        }
    };
}

delegate_io!(Conn, Plain, Tls);

/// A dialed connection: plaintext, or TLS over it.
pub enum ClientConn {
    Plain(Io),
    Tls(Box<tokio_rustls::client::TlsStream<Io>>),
}

delegate_io!(ClientConn, Plain, Tls);

/// Accepted connections, ready for `serve_with_incoming`.
pub struct Incoming {
    rx: tokio::sync::mpsc::Receiver<std::io::Result<Conn>>,
}

impl Stream for Incoming {
    type Item = std::io::Result<Conn>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut TaskCx<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx)
    }
}

/// Stops accepting and removes the unix socket files on drop.
pub struct SocketGuard {
    paths: Vec<PathBuf>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for SocketGuard {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        for p in &self.paths {
            let _ = std::fs::remove_file(p);
        }
    }
}

// === dialing ===

/// Dials an NSM URL in plaintext. Fails fast (within `timeout`) with a
/// message naming the URL when nothing listens there.
pub async fn dial(u: &Url, timeout: Duration) -> Result<Channel, Error> {
    dial_with(u, timeout, None).await.map(|(c, _)| c)
}

/// Who a dialed channel reached (updated on every reconnect).
pub type ServerPeerCell = Arc<Mutex<PeerIdentity>>;

async fn connect_raw(u: &Url) -> std::io::Result<Io> {
    match u.scheme() {
        "unix" => Ok(Io::Unix(UnixStream::connect(u.path()).await?)),
        _ => {
            let auth = tcp_authority(u).ok_or_else(|| std::io::Error::other("tcp URL needs host:port"))?;
            let s = TcpStream::connect(auth).await?;
            let _ = s.set_nodelay(true);
            Ok(Io::Tcp(s))
        }
    }
}

/// Dials an NSM URL, with mutual TLS if `tls` is given. Fails fast (within
/// `timeout`) with a message naming the URL: nothing listening, a refused
/// handshake (our SVID not trusted there, or theirs not trusted here), a
/// peer that does not speak TLS.
pub async fn dial_with(u: &Url, timeout: Duration, tls: Option<&Arc<Tls>>) -> Result<(Channel, ServerPeerCell), Error> {
    dial_inner(u, timeout, tls.map(|t| Handshake::Svid(t.clone())).unwrap_or(Handshake::Plain)).await
}

/// [`dial_with`] with any rustls client configuration (tests use it to
/// present SVIDs the Workload API would never hand out).
pub async fn dial_connector(
    u: &Url,
    timeout: Duration,
    connector: Option<tokio_rustls::TlsConnector>,
) -> Result<(Channel, ServerPeerCell), Error> {
    dial_inner(u, timeout, connector.map(Handshake::Static).unwrap_or(Handshake::Plain)).await
}

/// How a dial secures its connections.
#[derive(Clone)]
enum Handshake {
    Plain,
    /// A fixed rustls configuration (tests).
    Static(tokio_rustls::TlsConnector),
    /// The current SVID of a live source, read per connection.
    Svid(Arc<Tls>),
}

async fn dial_inner(u: &Url, timeout: Duration, how: Handshake) -> Result<(Channel, ServerPeerCell), Error> {
    let derr = |reason: String| Error::Dial { url: u.to_string(), reason };
    if !matches!(u.scheme(), "unix" | "tcp") {
        return Err(derr(format!("unsupported scheme {:?}", u.scheme())));
    }
    let peer: ServerPeerCell = Arc::default();
    let handshake = {
        let (u, how, peer) = (u.clone(), how.clone(), peer.clone());
        move || {
            let (u, how, peer) = (u.clone(), how.clone(), peer.clone());
            async move {
                // SPIFFE peers are identified by URI SAN, not by server
                // name; any valid name will do.
                let name = rustls::pki_types::ServerName::try_from("nsm.invalid")
                    .map_err(|e| std::io::Error::other(e.to_string()))?;
                // Right after an SVID or bundle update either side may
                // refuse handshakes for a few milliseconds (spiffe-rustls
                // converting the new material): a refused handshake is tried
                // twice more; a real refusal fails the same way each time.
                let mut attempt = 0;
                let (s, local) = loop {
                    attempt += 1;
                    let io = connect_raw(&u).await?;
                    let (c, local) = match &how {
                        Handshake::Plain => return Ok(TokioIo::new(ClientConn::Plain(io))),
                        Handshake::Static(c) => (c.clone(), None),
                        // Presents exactly the SVID it returns.
                        Handshake::Svid(t) => {
                            t.ready().await;
                            t.connector()
                        }
                    };
                    match c.connect(name.clone(), io).await {
                        Ok(s) => break (s, local),
                        Err(e) if attempt < 3 && matches!(how, Handshake::Svid(_)) => {
                            tracing::debug!(url = %u, error = %e, attempt, "TLS handshake failed; retrying");
                            tokio::time::sleep(Duration::from_millis(25)).await;
                        }
                        Err(e) => return Err(e),
                    }
                };
                let mut id = peer_identity(s.get_ref().1.peer_certificates());
                id.local = local;
                *peer.lock().unwrap_or_else(|e| e.into_inner()) = id;
                Ok::<_, std::io::Error>(TokioIo::new(ClientConn::Tls(Box::new(s))))
            }
        }
    };
    // A pre-flight connect (and handshake) gives a precise error; the
    // channel's first connection is that one, later ones (reconnects) are
    // new.
    let first = tokio::time::timeout(timeout, handshake())
        .await
        .map_err(|_| derr(format!("timed out after {timeout:?}")))?
        .map_err(|e| derr(source_chain(&e)))?;
    let first = Arc::new(Mutex::new(Some(first)));
    let ep = Endpoint::from_static("http://nsm.invalid").connect_timeout(timeout).tcp_nodelay(true);
    let ch = ep
        .connect_with_connector(tower::service_fn(move |_| {
            let (first, handshake) = (first.lock().unwrap_or_else(|e| e.into_inner()).take(), handshake.clone());
            async move {
                match first {
                    Some(c) => Ok(c),
                    None => handshake().await,
                }
            }
        }))
        .await
        .map_err(|e| derr(source_chain(&e)))?;
    Ok((ch, peer))
}

/// Renders an error with its sources (`a: b: c`), so transport errors say
/// what actually went wrong.
pub fn source_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

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

/// Unix socket path of a `unix://` URL.
pub fn unix_path(u: &Url) -> Option<&Path> {
    (u.scheme() == "unix").then(|| Path::new(u.path()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_not_ready_peer_is_told_apart_from_a_refusal() {
        let io = |e: rustls::Error| std::io::Error::new(std::io::ErrorKind::InvalidData, e);
        assert!(offered_no_signature_schemes(&io(rustls::Error::InvalidMessage(
            rustls::InvalidMessage::NoSignatureSchemes
        ))));
        assert!(!offered_no_signature_schemes(&io(rustls::Error::NoCertificatesPresented)));
        assert!(!offered_no_signature_schemes(&std::io::Error::other("x")));
    }

    #[test]
    fn urls() {
        assert_eq!(
            parse_url("unix:///var/lib/networkservicemesh/nsm.io.sock").unwrap().path(),
            "/var/lib/networkservicemesh/nsm.io.sock"
        );
        assert_eq!(parse_url("registry:5002").unwrap().as_str(), "tcp://registry:5002");
        assert_eq!(parse_url("tcp://:5001").unwrap().as_str(), "tcp://0.0.0.0:5001");
        assert_eq!(tcp_authority(&parse_url("tcp://[::1]:5001").unwrap()).unwrap(), "[::1]:5001");
        for bad in ["", "unix://relative.sock", "http://x:1", "tcp://host", "unix:///"] {
            let e = parse_url(bad).unwrap_err().to_string();
            assert!(e.contains("invalid URL"), "{bad}: {e}");
        }
        assert_eq!(parse_url_list("unix:///a.sock, tcp://:5001").unwrap().0.len(), 2);
        assert!(parse_url_list(" , ").is_err());
    }

    #[test]
    fn grpc_timeout_header() {
        assert_eq!(parse_grpc_timeout("15S"), Some(Duration::from_secs(15)));
        assert_eq!(parse_grpc_timeout("750m"), Some(Duration::from_millis(750)));
        assert_eq!(parse_grpc_timeout("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_grpc_timeout("x"), None);
        assert_eq!(parse_grpc_timeout(""), None);
    }

    #[tokio::test]
    async fn dial_errors_name_the_url() {
        let dir = tempfile::tempdir().unwrap();
        let u = parse_url(&format!("unix://{}/nope.sock", dir.path().display())).unwrap();
        let e = dial(&u, Duration::from_millis(200)).await.unwrap_err().to_string();
        assert!(e.contains("nope.sock") && e.contains("No such file"), "{e}");
        let u = parse_url("tcp://127.0.0.1:1").unwrap();
        let e = dial(&u, Duration::from_millis(500)).await.unwrap_err().to_string();
        assert!(e.contains("127.0.0.1:1"), "{e}");
    }

    #[tokio::test]
    async fn live_socket_is_not_stolen_and_stale_one_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let u = parse_url(&format!("unix://{}/s.sock", dir.path().display())).unwrap();
        let l = Listeners::bind(std::slice::from_ref(&u)).await.unwrap();
        let e = Listeners::bind(std::slice::from_ref(&u)).await.err().unwrap().to_string();
        assert!(e.contains("another process"), "{e}");
        let (_inc, guard) = l.into_incoming();
        drop(guard);
        assert!(!dir.path().join("s.sock").exists(), "socket file removed on drop");
        std::os::unix::net::UnixListener::bind(dir.path().join("s.sock")).map(drop).unwrap(); // stale file
        assert!(Listeners::bind(&[u]).await.is_ok());
    }
}
