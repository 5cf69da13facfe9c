//! Dialing an NSM URL: plaintext or mutual TLS with the current SVID,
//! failing fast with a message naming the URL.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskCx, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tonic::transport::{Channel, Endpoint};
use url::Url;

use super::listen::Io;
use super::url::{Error, tcp_authority};
use crate::security::tls::{PeerIdentity, Tls, peer_identity};

/// A dialed connection: plaintext, or TLS over it.
pub enum ClientConn {
    Plain(Io),
    Tls(Box<tokio_rustls::client::TlsStream<Io>>),
}

delegate_io!(ClientConn, Plain, Tls);

/// Dials an NSM URL in plaintext. Fails fast (within `timeout`) with a
/// message naming the URL when nothing listens there.
pub async fn dial(u: &Url, timeout: Duration) -> Result<Channel, Error> {
    dial_with(u, timeout, None).await.map(|(c, _)| c)
}

/// Who a dialed channel reached (updated on every reconnect).
pub type ServerPeerCell = Arc<Mutex<PeerIdentity>>;

async fn connect_raw(u: &Url) -> std::io::Result<Io> {
    match u.scheme() {
        "unix" => Ok(Io::Unix(crate::tools::grpcfd::FdStream::new(UnixStream::connect(u.path()).await?))),
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
                let (s, local, fds) = loop {
                    attempt += 1;
                    let io = connect_raw(&u).await?;
                    let fds = match &io {
                        Io::Unix(s) => Some(s.fds().clone()),
                        Io::Tcp(_) => None,
                    };
                    let (c, local) = match &how {
                        Handshake::Plain => {
                            *peer.lock().unwrap_or_else(|e| e.into_inner()) =
                                PeerIdentity { fds, ..Default::default() };
                            return Ok(TokioIo::new(ClientConn::Plain(io)));
                        }
                        Handshake::Static(c) => (c.clone(), None),
                        // Presents exactly the SVID it returns.
                        Handshake::Svid(t) => {
                            t.ready().await;
                            t.connector()
                        }
                    };
                    match c.connect(name.clone(), io).await {
                        Ok(s) => break (s, local, fds),
                        Err(e) if attempt < 3 && matches!(how, Handshake::Svid(_)) => {
                            tracing::debug!(url = %u, error = %e, attempt, "TLS handshake failed; retrying");
                            tokio::time::sleep(Duration::from_millis(25)).await;
                        }
                        Err(e) => return Err(e),
                    }
                };
                let mut id = peer_identity(s.get_ref().1.peer_certificates());
                id.local = local;
                id.fds = fds;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tools::grpc::parse_url;

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
}
