//! NSM URLs: `unix:///path/to.sock`, `tcp://host:port`, and for
//! compatibility with upstream env values a bare `host:port`
//! (`NSM_REGISTRY_URL=registry:5002`). `tcp://:5001` listens on all
//! addresses. Also the `grpc-timeout` header.

use std::path::Path;
use std::time::Duration;

use url::Url;

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

/// A URL that may be left empty (`NSM_REGISTRY_URL=` means "none", as in
/// upstream's env handling): parsed by [`parse_optional_url`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OptionalUrl(pub Option<Url>);

/// [`parse_url`], with an empty (or all-blank) value meaning no URL.
pub fn parse_optional_url(s: &str) -> Result<OptionalUrl, Error> {
    if s.trim().is_empty() { Ok(OptionalUrl(None)) } else { parse_url(s).map(|u| OptionalUrl(Some(u))) }
}

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

/// Unix socket path of a `unix://` URL.
pub fn unix_path(u: &Url) -> Option<&Path> {
    (u.scheme() == "unix").then(|| Path::new(u.path()))
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(parse_optional_url(" ").unwrap(), OptionalUrl(None));
        assert_eq!(parse_optional_url("r:5002").unwrap().0.unwrap().as_str(), "tcp://r:5002");
        assert!(parse_optional_url("http://r:5002").is_err());
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
}
