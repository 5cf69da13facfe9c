//! gRPC plumbing shared by every component:
//! - [`url`]: NSM URLs (`unix:///path`, `tcp://host:port`, bare
//!   `host:port`) and the `grpc-timeout` header;
//! - [`listen`]: listeners on unix and TCP sockets behind one server, with
//!   mutual TLS and the caller's credentials;
//! - [`dial`](mod@dial): dialing with a fast, precise failure;
//! - [`pool`]: the per-component channel pool.

/// `AsyncRead`/`AsyncWrite` for an enum whose variants each wrap a stream
/// (`delegate_io!(Enum, A, B)`), or for a struct around one stream field
/// (`delegate_io!(struct S, field)`).
macro_rules! delegate_io {
    (struct $t:ty, $f:ident) => {
        impl AsyncRead for $t {
            fn poll_read(self: Pin<&mut Self>, cx: &mut TaskCx<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
                Pin::new(&mut self.get_mut().$f).poll_read(cx, buf)
            }
        }
        impl AsyncWrite for $t {
            fn poll_write(self: Pin<&mut Self>, cx: &mut TaskCx<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
                Pin::new(&mut self.get_mut().$f).poll_write(cx, buf)
            }
            fn poll_flush(self: Pin<&mut Self>, cx: &mut TaskCx<'_>) -> Poll<std::io::Result<()>> {
                Pin::new(&mut self.get_mut().$f).poll_flush(cx)
            }
            fn poll_shutdown(self: Pin<&mut Self>, cx: &mut TaskCx<'_>) -> Poll<std::io::Result<()>> {
                Pin::new(&mut self.get_mut().$f).poll_shutdown(cx)
            }
        }
    };
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

pub mod dial;
pub mod listen;
pub mod pool;
pub mod url;

pub use dial::{ClientConn, ServerPeerCell, dial, dial_connector, dial_with, source_chain};
pub use listen::{Conn, ConnInfo, HANDSHAKE_TIMEOUT, Incoming, Io, Listeners, SocketGuard, TlsConn};
pub use pool::ChannelPool;
pub use url::{
    Error, OptionalUrl, UrlList, parse_grpc_timeout, parse_optional_url, parse_url, parse_url_list, tcp_authority,
    unix_path,
};
