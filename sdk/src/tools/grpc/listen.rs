//! Listening: unix and TCP listeners behind one tonic server, with mutual
//! TLS per connection and the caller's credentials (`SO_PEERCRED`, address,
//! SPIFFE ID) for the chain.

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskCx, Poll};
use std::time::Duration;

use futures::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tonic::transport::server::Connected;
use url::Url;

use super::url::{Error, tcp_authority};
use crate::networkservice::chain::Peer;
use crate::security::tls::{Tls, peer_identity};
use crate::tools::grpcfd::FdStream;

/// A connection accepted on a unix or TCP listener.
pub enum Io {
    /// A unix socket, passing fds as upstream's grpcfd does.
    Unix(FdStream),
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
                if let Ok(c) = s.get_ref().peer_cred() {
                    peer.uid = Some(c.uid());
                    peer.pid = c.pid();
                }
                peer.fds = Some(s.fds().clone());
            }
            Io::Tcp(s) => peer.addr = s.peer_addr().ok(),
        }
        ConnInfo { peer }
    }
}

delegate_io!(Io, Unix, Tcp);

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

    /// One stream of accepted plaintext connections from every listener.
    pub fn into_incoming(self) -> (Incoming, SocketGuard) {
        self.into_incoming_with(None)
    }

    /// One stream of accepted connections from every listener; with `tls`,
    /// each connection's TLS handshake runs in its own task (bounded by
    /// [`HANDSHAKE_TIMEOUT`]) so a slow or failing peer never blocks
    /// accepting, and a failed handshake is logged with what is known of
    /// the peer and dropped.
    pub fn into_incoming_with(mut self, tls: Option<Arc<Tls>>) -> (Incoming, SocketGuard) {
        let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Conn>>(128);
        let (raw_tx, mut raw_rx) = tokio::sync::mpsc::channel::<std::io::Result<Io>>(128);
        let mut tasks = vec![];
        // From here the guard owns the socket files (see Drop below).
        let unix = std::mem::take(&mut self.unix);
        let paths = unix.iter().map(|(_, p)| p.clone()).collect();
        for (ln, _) in unix {
            let tx = raw_tx.clone();
            tasks.push(tokio::spawn(async move {
                loop {
                    let r = ln.accept().await.map(|(s, _)| Io::Unix(FdStream::new(s)));
                    if tx.send(r).await.is_err() {
                        break;
                    }
                }
            }));
        }
        for ln in std::mem::take(&mut self.tcp) {
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

delegate_io!(struct TlsConn, stream);

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

delegate_io!(Conn, Plain, Tls);

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

/// Listeners never served (a daemon that failed after binding) remove
/// their unix socket files too.
impl Drop for Listeners {
    fn drop(&mut self) {
        for (_, p) in &self.unix {
            let _ = std::fs::remove_file(p);
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tools::grpc::parse_url;

    #[tokio::test]
    async fn listeners_dropped_unserved_remove_their_socket_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.sock");
        let l = Listeners::bind(&[parse_url(&format!("unix://{}", path.display())).unwrap()]).await.unwrap();
        assert!(path.exists());
        drop(l);
        assert!(!path.exists(), "a daemon that failed after binding leaves no socket");
    }

    #[test]
    fn a_not_ready_peer_is_told_apart_from_a_refusal() {
        let io = |e: rustls::Error| std::io::Error::new(std::io::ErrorKind::InvalidData, e);
        assert!(offered_no_signature_schemes(&io(rustls::Error::InvalidMessage(
            rustls::InvalidMessage::NoSignatureSchemes
        ))));
        assert!(!offered_no_signature_schemes(&io(rustls::Error::NoCertificatesPresented)));
        assert!(!offered_no_signature_schemes(&std::io::Error::other("x")));
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
