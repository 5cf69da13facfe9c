use std::io::{Read, Write};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;

fn pair() -> (FdStream, FdStream) {
    let (a, b) = UnixStream::pair().unwrap();
    (FdStream::new(a), FdStream::new(b))
}

fn tempfile_with(text: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("f");
    std::fs::File::create(&p).unwrap().write_all(text.as_bytes()).unwrap();
    (dir, p)
}

fn read_through(fd: &OwnedFd) -> String {
    // O_PATH fds are reopened through /proc, as the receiver's users do.
    let mut s = String::new();
    std::fs::File::open(proc_path(fd)).unwrap().read_to_string(&mut s).unwrap();
    s
}

#[tokio::test]
async fn a_queued_fd_rides_the_next_write_and_is_found_by_its_inode_url() {
    let (mut a, mut b) = pair();
    let (_d, path) = tempfile_with("passed");
    let url = a.fds().send_path(&path).unwrap();
    let m = std::fs::metadata(&path).unwrap();
    use std::os::unix::fs::MetadataExt as _;
    assert_eq!(parse_inode_url(&url), Some((m.dev(), m.ino())));
    a.write_all(b"hello").await.unwrap();
    let mut got = [0u8; 5];
    b.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"hello", "the byte the fd rode on is part of the stream");
    let fd = b.fds().for_url(&url).expect("the receiver keeps the fd by dev/ino");
    assert_eq!(read_through(&fd), "passed");
    assert!(b.fds().for_url("inode://1/2").is_none());
    assert!(b.fds().for_url("unix:///x").is_none());
    assert_eq!(a.fds().received_len(), 0, "nothing came back");
}

#[tokio::test]
async fn more_fds_than_one_message_carries_go_in_batches() {
    let (mut a, mut b) = pair();
    let dir = tempfile::tempdir().unwrap();
    let mut urls = vec![];
    for i in 0..(MAX_FDS + 6) {
        let p = dir.path().join(format!("f{i}"));
        std::fs::write(&p, i.to_string()).unwrap();
        urls.push((a.fds().send_path(&p).unwrap(), i.to_string()));
    }
    // Every write carries at most MAX_FDS; keep writing until all went.
    let writer = tokio::spawn(async move {
        for _ in 0..4 {
            a.write_all(b"xy").await.unwrap();
        }
        a
    });
    let mut buf = [0u8; 8];
    b.read_exact(&mut buf).await.unwrap();
    writer.await.unwrap();
    assert_eq!(b.fds().received_len(), MAX_FDS + 6);
    for (u, text) in urls {
        assert_eq!(read_through(&b.fds().for_url(&u).unwrap()), text);
    }
}

#[tokio::test]
async fn fds_pass_under_tls_whatever_record_they_ride_on() {
    // A self-signed server certificate is enough here: what is tested is that
    // the fd survives being attached to a byte of a TLS record.
    let cert = rcgen::generate_simple_self_signed(vec!["nsm.invalid".to_string()]).unwrap();
    let der = cert.cert.der().clone();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![der.clone()], key)
        .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(der).unwrap();
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let (a, b) = pair();
    let (a_fds, b_fds) = (a.fds().clone(), b.fds().clone());
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    let name = rustls::pki_types::ServerName::try_from("nsm.invalid").unwrap();
    let srv = tokio::spawn(async move {
        let mut s = acceptor.accept(b).await.unwrap();
        let mut line = vec![0u8; 12];
        s.read_exact(&mut line).await.unwrap();
        // Answer with an fd of our own, as an endpoint's sendfd does.
        let (_d, p) = tempfile_with("answer");
        let url = s.get_ref().0.fds().send_path(&p).unwrap();
        s.write_all(url.as_bytes()).await.unwrap();
        s.write_all(b"\n").await.unwrap();
        s.flush().await.unwrap();
        let mut rest = vec![];
        let _ = s.read_to_end(&mut rest).await;
        line
    });
    let mut c = connector.connect(name, a).await.unwrap();
    let (_d, p) = tempfile_with("request");
    let url = a_fds.send_path(&p).unwrap();
    c.write_all(b"request-body").await.unwrap();
    c.flush().await.unwrap();
    let mut answer = vec![];
    loop {
        let mut byte = [0u8; 1];
        c.read_exact(&mut byte).await.unwrap();
        if byte[0] == b'\n' {
            break;
        }
        answer.push(byte[0]);
    }
    c.shutdown().await.unwrap();
    assert_eq!(srv.await.unwrap(), b"request-body");
    assert_eq!(read_through(&b_fds.get(parse_inode_url(&url).unwrap()).unwrap()), "request");
    let back = String::from_utf8(answer).unwrap();
    assert_eq!(read_through(&a_fds.for_url(&back).expect("the answer's fd came back")), "answer");
}

#[test]
fn inode_urls_parse_strictly() {
    assert_eq!(parse_inode_url("inode://12/34"), Some((12, 34)));
    assert_eq!(parse_inode_url(&inode_url((7, 9))), Some((7, 9)));
    for bad in ["inode://12", "inode://a/1", "inode://1/b", "file:///x", "", "inode:///1"] {
        assert_eq!(parse_inode_url(bad), None, "{bad}");
    }
}

#[test]
fn a_path_that_cannot_be_opened_is_named_in_the_error() {
    let t = FdTransfer::default();
    let e = t.send_path(std::path::Path::new("/nonexistent/x.sock")).unwrap_err().to_string();
    assert!(e.contains("/nonexistent/x.sock"), "{e}");
    assert!(!t.has_outgoing());
}
