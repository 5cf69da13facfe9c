//! grpcfd: file descriptors across NSM's unix sockets, as upstream's
//! `edwarnicke/grpcfd` passes them, so an endpoint or client can hand the
//! nsmgr (and the nsmgr the forwarder) a descriptor for its network namespace
//! or its listening socket, even where the other side cannot see the file.
//!
//! The wire, as upstream (nsm-spec 1.10):
//! - fds travel on the *raw* unix stream, under TLS: a queued fd is sent with
//!   `sendmsg(SCM_RIGHTS)` attached to one byte of the next write (at most 64
//!   per message), the rest of the buffer is written normally;
//! - the receiver `recvmsg`s with room for 64 fds on every read, `fstat`s
//!   each fd it gets and keeps it by `(st_dev, st_ino)`;
//! - messages name a passed file as `inode://<st_dev>/<st_ino>` (decimal),
//!   which the receiver turns into a path of its own (`/proc/<pid>/fd/<n>`).
//!
//! [`FdStream`] is that unix stream; its [`FdTransfer`] (one per connection,
//! reachable from handlers through the connection's `Peer`) holds what came in
//! and what is to go out. Written here: no crate does SCM_RIGHTS on arbitrary
//! byte boundaries under a TLS stream; `rustix` does the syscalls (its
//! SCM_RIGHTS API hands out `OwnedFd`s, so no unsafe code is needed).

use std::collections::HashMap;
use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskCx, Poll, ready};

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer, SendAncillaryMessage,
    SendFlags, recvmsg, sendmsg,
};
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::UnixStream;

/// Files a client chain element asks the gRPC tail to pass with this call
/// (in `Context::ext`); passed only on a unix connection, ignored on TCP.
#[derive(Clone, Debug, Default)]
pub struct PassFiles(pub Vec<std::path::PathBuf>);

/// At most this many fds per message, as upstream.
pub const MAX_FDS: usize = 64;

/// A file identity: `(st_dev, st_ino)`.
pub type FileId = (u64, u64);

/// The fds of one unix connection: received ones by file identity, and the
/// ones queued to go out with the next write.
#[derive(Default)]
pub struct FdTransfer {
    received: Mutex<HashMap<FileId, Arc<OwnedFd>>>,
    outgoing: Mutex<Vec<OwnedFd>>,
}

impl std::fmt::Debug for FdTransfer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let received = self.received.lock().map(|m| m.len()).unwrap_or(0);
        let outgoing = self.outgoing.lock().map(|q| q.len()).unwrap_or(0);
        f.debug_struct("FdTransfer").field("received", &received).field("outgoing", &outgoing).finish()
    }
}

impl FdTransfer {
    /// The received fd of file `id`, if the peer sent one.
    pub fn get(&self, id: FileId) -> Option<Arc<OwnedFd>> {
        self.received.lock().unwrap_or_else(|e| e.into_inner()).get(&id).cloned()
    }

    /// The received fd an `inode://<dev>/<ino>` URL names, if the peer sent
    /// it; `None` for any other URL.
    pub fn for_url(&self, url: &str) -> Option<Arc<OwnedFd>> {
        parse_inode_url(url).and_then(|id| self.get(id))
    }

    /// Number of fds received and kept.
    pub fn received_len(&self) -> usize {
        self.received.lock().map(|m| m.len()).unwrap_or(0)
    }

    /// Queues `fd` to go out with the next write on the connection.
    pub fn send(&self, fd: OwnedFd) {
        self.outgoing.lock().unwrap_or_else(|e| e.into_inner()).push(fd);
    }

    /// Opens `path` (`O_PATH`, so sockets and namespace files work), queues
    /// it, and returns the `inode://` URL that names it.
    pub fn send_path(&self, path: &Path) -> std::io::Result<String> {
        let (fd, id) = open_path(path)?;
        self.send(fd);
        Ok(inode_url(id))
    }

    /// Keeps `fd` as if the peer had passed it (what every read does with
    /// the fds that came with its bytes).
    pub fn accept(&self, fd: OwnedFd) {
        match file_id(&fd) {
            Ok(id) => {
                self.received.lock().unwrap_or_else(|e| e.into_inner()).insert(id, Arc::new(fd));
            }
            Err(e) => tracing::debug!(error = %e, "dropping a passed fd that cannot be stat'ed"),
        }
    }

    fn take_outgoing(&self) -> Vec<OwnedFd> {
        let mut q = self.outgoing.lock().unwrap_or_else(|e| e.into_inner());
        let n = q.len().min(MAX_FDS);
        q.drain(..n).collect()
    }

    fn requeue_front(&self, fds: Vec<OwnedFd>) {
        let mut q = self.outgoing.lock().unwrap_or_else(|e| e.into_inner());
        let rest = std::mem::take(&mut *q);
        q.extend(fds);
        q.extend(rest);
    }

    fn has_outgoing(&self) -> bool {
        self.outgoing.lock().map(|q| !q.is_empty()).unwrap_or(false)
    }
}

/// `(st_dev, st_ino)` of an open file.
pub fn file_id(fd: &impl AsFd) -> std::io::Result<FileId> {
    let st = nix::sys::stat::fstat(fd).map_err(std::io::Error::from)?;
    Ok((st.st_dev as u64, st.st_ino))
}

/// Opens `path` as a file to pass (`O_PATH`, so sockets and namespace
/// files work) and returns it with its identity.
pub fn open_path(path: &Path) -> std::io::Result<(OwnedFd, FileId)> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_PATH.bits())
        .open(path)
        .map_err(|e| std::io::Error::new(e.kind(), format!("opening {} to pass it: {e}", path.display())))?;
    let id = file_id(&f)?;
    Ok((f.into(), id))
}

/// `inode://<dev>/<ino>`.
pub fn inode_url((dev, ino): FileId) -> String {
    format!("inode://{dev}/{ino}")
}

/// The file identity an `inode://<dev>/<ino>` URL names.
pub fn parse_inode_url(url: &str) -> Option<FileId> {
    let (dev, ino) = url.trim().strip_prefix("inode://")?.split_once('/')?;
    Some((dev.parse().ok()?, ino.parse().ok()?))
}

/// The path through which this process reaches a kept fd.
pub fn proc_path(fd: &impl AsRawFd) -> String {
    format!("/proc/{}/fd/{}", std::process::id(), fd.as_raw_fd())
}

/// A unix stream that receives passed fds on every read and sends queued
/// ones with the next write.
pub struct FdStream {
    inner: UnixStream,
    fds: Arc<FdTransfer>,
}

impl FdStream {
    pub fn new(inner: UnixStream) -> FdStream {
        FdStream { inner, fds: Arc::default() }
    }

    /// The connection's fds.
    pub fn fds(&self) -> &Arc<FdTransfer> {
        &self.fds
    }

    /// The plain stream (credentials, addresses).
    pub fn get_ref(&self) -> &UnixStream {
        &self.inner
    }
}

fn recv_with_fds(sock: BorrowedFd<'_>, buf: &mut [u8], fds: &FdTransfer) -> std::io::Result<usize> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut cmsg = RecvAncillaryBuffer::new(&mut space);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = recvmsg(sock, &mut iov, &mut cmsg, RecvFlags::CMSG_CLOEXEC)?;
    if msg.flags.contains(ReturnFlags::CTRUNC) {
        tracing::warn!("passed fds were truncated (more than {MAX_FDS} in one message)");
    }
    for m in cmsg.drain() {
        if let RecvAncillaryMessage::ScmRights(got) = m {
            for f in got {
                fds.accept(f);
            }
        }
    }
    Ok(msg.bytes)
}

impl AsyncRead for FdStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut TaskCx<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        loop {
            ready!(this.inner.poll_read_ready(cx))?;
            let fds = this.fds.clone();
            let dst = buf.initialize_unfilled();
            let sock = &this.inner;
            match sock.try_io(Interest::READABLE, || recv_with_fds(sock.as_fd(), dst, &fds)) {
                Ok(n) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for FdStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut TaskCx<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        if buf.is_empty() || !this.fds.has_outgoing() {
            return Pin::new(&mut this.inner).poll_write(cx, buf);
        }
        loop {
            ready!(this.inner.poll_write_ready(cx))?;
            let batch = this.fds.take_outgoing();
            let borrowed: Vec<BorrowedFd<'_>> = batch.iter().map(|f| f.as_fd()).collect();
            let sock = &this.inner;
            let res = sock.try_io(Interest::WRITABLE, || {
                let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
                let mut cmsg = SendAncillaryBuffer::new(&mut space);
                if !cmsg.push(SendAncillaryMessage::ScmRights(&borrowed)) {
                    return Err(std::io::Error::other("no room for the fds in the control message"));
                }
                Ok(sendmsg(sock.as_fd(), &[IoSlice::new(&buf[..1])], &mut cmsg, SendFlags::NOSIGNAL)?)
            });
            drop(borrowed);
            match res {
                // The kernel holds its own references now; ours close.
                Ok(n) => return Poll::Ready(Ok(n)),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    this.fds.requeue_front(batch);
                    continue;
                }
                Err(e) => {
                    this.fds.requeue_front(batch);
                    return Poll::Ready(Err(e));
                }
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut TaskCx<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut TaskCx<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests;
