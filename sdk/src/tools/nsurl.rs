//! NSURL: how a client names the network service it wants, as in
//! `NSM_NETWORK_SERVICES` (upstream `sdk:pkg/tools/nsurl`).
//!
//! Syntax: `<mechanism>://<service>[@<domain>][/<ifname>][?label=value&...]`,
//! e.g. `kernel://my-service/nsm-1`, `kernel://svc@my.cluster2/nsm-1`,
//! `kernel://vl3-lb/nsm-1?app=finance`, `kernel://x`.
//!
//! # Guarantees
//! - A successfully parsed [`NsUrl`] has a supported mechanism (only
//!   `kernel` for now), a non-empty service name made of ASCII letters,
//!   digits, `-`, `.` and `_` (optionally `@domain`, same alphabet, for
//!   interdomain services, see [`split_interdomain`]), and, if present, an
//!   interface name that Linux accepts (1..=15 bytes, no `/`, `:` or
//!   whitespace, not `.`/`..`).
//! - Query parameters become connection labels; a key given several times
//!   yields its values joined with `,` in the order given (as upstream Go
//!   `url.Values`); `+` and `%XX` are decoded as in Go's `ParseQuery`.
//! - [`NsUrl::to_request`] builds exactly the request upstream cmd-nsc
//!   builds: `connection{id, network_service, labels}` and one `LOCAL`
//!   mechanism preference of the upper-cased scheme with `name = ifname`.
//! - Every error names the offending input and what is wrong with it.
//!
//! Differences from upstream (stricter on purpose): upstream accepts any
//! URL Go's `net/url` accepts and silently uses the *last* path segment as
//! the interface name; here extra path segments, ports, fragments and
//! invalid interface names are errors, because they are always typos and
//! would otherwise surface much later as an obscure data-plane failure.

use std::collections::BTreeMap;
use std::collections::HashMap;

use nsm_api::connection::{Connection, Mechanism};
use nsm_api::mechanisms::{cls, kernel};
use nsm_api::networkservice::NetworkServiceRequest;

/// Mechanisms a client can ask for in an NSURL (lower-case scheme names).
pub const SUPPORTED_MECHANISMS: &[&str] = &["kernel"];

/// A parsed NSURL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NsUrl {
    /// Mechanism type, upper case (`KERNEL`).
    pub mechanism: String,
    /// Network service name: `svc` or, interdomain, `svc@domain`.
    pub network_service: String,
    /// Requested interface name inside the client's netns (`None`: the
    /// kernel mechanism client generates one).
    pub interface: Option<String>,
    /// Connection labels from the query string.
    pub labels: BTreeMap<String, String>,
}

/// Why an NSURL was rejected. Every variant carries the whole input.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NsUrlError {
    #[error(
        "invalid NSURL {input:?}: missing scheme (expected <mechanism>://<service>[@<domain>]/<ifname>, e.g. kernel://my-service/nsm-1)"
    )]
    MissingScheme { input: String },
    #[error("invalid NSURL {input:?}: {scheme:?} is not a valid mechanism name")]
    InvalidScheme { input: String, scheme: String },
    #[error("invalid NSURL {input:?}: unsupported mechanism {mechanism} (supported: {supported})")]
    UnsupportedMechanism { input: String, mechanism: String, supported: String },
    #[error("invalid NSURL {input:?}: empty network service name")]
    EmptyService { input: String },
    #[error("invalid NSURL {input:?}: empty domain after '@' in {service:?}")]
    EmptyDomain { input: String, service: String },
    #[error(
        "invalid NSURL {input:?}: character {ch:?} is not allowed in network service {service:?} (allowed: letters, digits, '-', '.', '_', one '@' before a domain)"
    )]
    InvalidServiceChar { input: String, service: String, ch: char },
    #[error("invalid NSURL {input:?}: interface name {name:?} is {len} bytes long (Linux allows at most 15)")]
    InterfaceTooLong { input: String, name: String, len: usize },
    #[error("invalid NSURL {input:?}: interface name {name:?} {problem}")]
    InvalidInterface { input: String, name: String, problem: &'static str },
    #[error(
        "invalid NSURL {input:?}: path {path:?} has more than one segment (expected only an interface name, e.g. /nsm-1)"
    )]
    ExtraPathSegments { input: String, path: String },
    #[error("invalid NSURL {input:?}: fragments ('#...') are not supported")]
    Fragment { input: String },
    #[error("invalid NSURL {input:?}: empty label name in the query string")]
    EmptyLabelName { input: String },
}

fn is_scheme(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_')
}

impl std::str::FromStr for NsUrl {
    type Err = NsUrlError;

    fn from_str(s: &str) -> Result<NsUrl, NsUrlError> {
        let input = || s.to_string();
        let Some((scheme, rest)) = s.split_once("://") else {
            return Err(NsUrlError::MissingScheme { input: input() });
        };
        if scheme.is_empty() {
            return Err(NsUrlError::MissingScheme { input: input() });
        }
        if !is_scheme(scheme) {
            return Err(NsUrlError::InvalidScheme { input: input(), scheme: scheme.to_string() });
        }
        let scheme = scheme.to_ascii_lowercase();
        if !SUPPORTED_MECHANISMS.contains(&scheme.as_str()) {
            return Err(NsUrlError::UnsupportedMechanism {
                input: input(),
                mechanism: scheme,
                supported: SUPPORTED_MECHANISMS.join(", "),
            });
        }
        if rest.contains('#') {
            return Err(NsUrlError::Fragment { input: input() });
        }
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };

        // Service: `svc` or `svc@domain` (Go's net/url sees user@host).
        let (svc, domain) = split_interdomain(authority);
        if svc.is_empty() {
            return Err(NsUrlError::EmptyService { input: input() });
        }
        if let Some(d) = domain
            && d.is_empty()
        {
            return Err(NsUrlError::EmptyDomain { input: input(), service: authority.to_string() });
        }
        for part in [Some(svc), domain].into_iter().flatten() {
            if let Some(ch) = part.chars().find(|c| !is_name_char(*c)) {
                return Err(NsUrlError::InvalidServiceChar { input: input(), service: authority.to_string(), ch });
            }
        }

        // Interface: at most one path segment (a single trailing '/' is tolerated).
        let p = path.strip_prefix('/').unwrap_or(path);
        let p = p.strip_suffix('/').unwrap_or(p);
        if p.contains('/') {
            return Err(NsUrlError::ExtraPathSegments { input: input(), path: path.to_string() });
        }
        let interface = if p.is_empty() {
            None
        } else {
            check_ifname(s, p)?;
            Some(p.to_string())
        };

        // Labels.
        let mut multi: BTreeMap<String, Vec<String>> = BTreeMap::new();
        if let Some(q) = query {
            for (k, v) in url::form_urlencoded::parse(q.as_bytes()) {
                if k.is_empty() {
                    return Err(NsUrlError::EmptyLabelName { input: input() });
                }
                multi.entry(k.into_owned()).or_default().push(v.into_owned());
            }
        }
        let labels = multi.into_iter().map(|(k, v)| (k, v.join(","))).collect();

        Ok(NsUrl { mechanism: scheme.to_ascii_uppercase(), network_service: authority.to_string(), interface, labels })
    }
}

/// Linux `dev_valid_name`: 1..=15 bytes, not `.`/`..`, no `/`, `:` or whitespace.
fn check_ifname(input: &str, name: &str) -> Result<(), NsUrlError> {
    let bad = |problem| NsUrlError::InvalidInterface { input: input.to_string(), name: name.to_string(), problem };
    if name.len() > kernel::LINUX_IF_MAX_LENGTH {
        return Err(NsUrlError::InterfaceTooLong { input: input.to_string(), name: name.to_string(), len: name.len() });
    }
    if name == "." || name == ".." {
        return Err(bad("is reserved"));
    }
    if name.chars().any(char::is_whitespace) {
        return Err(bad("contains whitespace"));
    }
    if name.contains(':') {
        return Err(bad("contains ':' (not allowed by Linux)"));
    }
    Ok(())
}

impl std::fmt::Display for NsUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}://{}", self.mechanism.to_ascii_lowercase(), self.network_service)?;
        if let Some(i) = &self.interface {
            write!(f, "/{i}")?;
        }
        if !self.labels.is_empty() {
            let q = url::form_urlencoded::Serializer::new(String::new()).extend_pairs(&self.labels).finish();
            write!(f, "?{q}")?;
        }
        Ok(())
    }
}

impl NsUrl {
    /// The request cmd-nsc sends for this NSURL: connection `{id: conn_id,
    /// network_service, labels}` and one mechanism preference `{cls: LOCAL,
    /// type: mechanism, parameters: {name: interface}}` (no `name` when no
    /// interface was given).
    pub fn to_request(&self, conn_id: &str) -> NetworkServiceRequest {
        let mut parameters = HashMap::new();
        if let Some(i) = &self.interface {
            parameters.insert(kernel::NAME.to_string(), i.clone());
        }
        NetworkServiceRequest {
            connection: Some(Connection {
                id: conn_id.to_string(),
                network_service: self.network_service.clone(),
                labels: self.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
                ..Default::default()
            }),
            mechanism_preferences: vec![Mechanism {
                cls: cls::LOCAL.to_string(),
                r#type: self.mechanism.clone(),
                parameters,
            }],
        }
    }
}

/// Parses a comma-separated list of NSURLs (`NSM_NETWORK_SERVICES`); empty
/// items (and surrounding whitespace) are ignored. Fails on the first bad
/// item. As upstream (envconfig), a literal `,` cannot appear inside an
/// item; write it as `%2C` in a label value.
pub fn parse_list(s: &str) -> Result<Vec<NsUrl>, NsUrlError> {
    s.split(',').map(str::trim).filter(|i| !i.is_empty()).map(str::parse).collect()
}

/// Splits an interdomain name `target@domain` at the first `@`
/// (upstream `interdomain.Target`/`Domain`). `svc` ⇒ `("svc", None)`;
/// `svc@` ⇒ `("svc", Some(""))`.
pub fn split_interdomain(name: &str) -> (&str, Option<&str>) {
    match name.split_once('@') {
        Some((t, d)) => (t, Some(d)),
        None => (name, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> NsUrl {
        s.parse().unwrap()
    }
    fn e(s: &str) -> NsUrlError {
        s.parse::<NsUrl>().unwrap_err()
    }

    #[test]
    fn parses_the_documented_forms() {
        let u = p("kernel://my-service/nsm-1");
        assert_eq!(u.mechanism, "KERNEL");
        assert_eq!(u.network_service, "my-service");
        assert_eq!(u.interface.as_deref(), Some("nsm-1"));
        assert!(u.labels.is_empty());

        let u = p("kernel://svc@my.cluster2/nsm-1");
        assert_eq!(u.network_service, "svc@my.cluster2");
        assert_eq!(u.interface.as_deref(), Some("nsm-1"));

        let u = p("kernel://vl3-lb/nsm-1?app=finance");
        assert_eq!(u.network_service, "vl3-lb");
        assert_eq!(u.labels, BTreeMap::from([("app".to_string(), "finance".to_string())]));

        let u = p("kernel://x");
        assert_eq!(u.network_service, "x");
        assert_eq!(u.interface, None);

        let u = p("kernel://x/");
        assert_eq!(u.interface, None);
        let u = p("kernel://x/nsm-1/");
        assert_eq!(u.interface.as_deref(), Some("nsm-1"));
        let u = p("KERNEL://my_svc.v2-1?x=1");
        assert_eq!(u.mechanism, "KERNEL");
        assert_eq!(u.network_service, "my_svc.v2-1");
        assert_eq!(u.interface, None);
    }

    #[test]
    fn labels_repeat_and_decode() {
        let u = p("kernel://s/i?a=1&b=x+y&a=2&c=%2Fz&d");
        assert_eq!(u.labels["a"], "1,2");
        assert_eq!(u.labels["b"], "x y");
        assert_eq!(u.labels["c"], "/z");
        assert_eq!(u.labels["d"], "");
        assert!(matches!(e("kernel://s/i?=v"), NsUrlError::EmptyLabelName { .. }));
    }

    #[test]
    fn errors_name_input_and_problem() {
        let err = e("my-service/nsm-1");
        assert!(matches!(err, NsUrlError::MissingScheme { .. }));
        assert!(err.to_string().contains("\"my-service/nsm-1\""), "{err}");
        assert!(matches!(e("://svc"), NsUrlError::MissingScheme { .. }));
        assert!(matches!(e("1x://svc"), NsUrlError::InvalidScheme { .. }));

        let err = e("memif://svc/if");
        assert_eq!(
            err.to_string(),
            "invalid NSURL \"memif://svc/if\": unsupported mechanism memif (supported: kernel)"
        );

        assert!(matches!(e("kernel://"), NsUrlError::EmptyService { .. }));
        assert!(matches!(e("kernel:///nsm-1"), NsUrlError::EmptyService { .. }));
        assert!(matches!(e("kernel://@dom/nsm-1"), NsUrlError::EmptyService { .. }));
        assert!(matches!(e("kernel://?a=b"), NsUrlError::EmptyService { .. }));
        assert!(matches!(e("kernel://svc@/nsm-1"), NsUrlError::EmptyDomain { .. }));
        assert!(matches!(e("kernel://svc:5000/nsm-1"), NsUrlError::InvalidServiceChar { ch: ':', .. }));
        assert!(matches!(e("kernel://a@b@c/nsm-1"), NsUrlError::InvalidServiceChar { ch: '@', .. }));

        let err = e("kernel://svc/0123456789abcdef");
        assert!(matches!(err, NsUrlError::InterfaceTooLong { len: 16, .. }));
        assert!(err.to_string().contains("0123456789abcdef"), "{err}");
        assert!(p("kernel://svc/0123456789abcde").interface.is_some(), "15 bytes is fine");
        assert!(matches!(e("kernel://svc/a b"), NsUrlError::InvalidInterface { .. }));
        assert!(matches!(e("kernel://svc/a\tb"), NsUrlError::InvalidInterface { .. }));
        assert!(matches!(e("kernel://svc/a:b"), NsUrlError::InvalidInterface { .. }));
        assert!(matches!(e("kernel://svc/.."), NsUrlError::InvalidInterface { .. }));
        let err = e("kernel://svc/a/b");
        assert!(matches!(err, NsUrlError::ExtraPathSegments { .. }));
        assert!(err.to_string().contains("\"/a/b\""), "{err}");
        assert!(matches!(e("kernel://svc/a#x"), NsUrlError::Fragment { .. }));
    }

    #[test]
    fn list_ignores_empty_items() {
        let l = parse_list("kernel://a/nsm-1,, kernel://b@d/nsm-2 ,").unwrap();
        assert_eq!(l.len(), 2);
        assert_eq!(l[1].network_service, "b@d");
        assert!(parse_list("").unwrap().is_empty());
        assert!(matches!(parse_list("kernel://a,memif://b"), Err(NsUrlError::UnsupportedMechanism { .. })));
    }

    #[test]
    fn request_matches_cmd_nsc() {
        let r = p("kernel://svc@dom/nsm-1?app=x").to_request("nsc-0");
        let c = r.connection.as_ref().unwrap();
        assert_eq!(c.id, "nsc-0");
        assert_eq!(c.network_service, "svc@dom");
        assert_eq!(c.labels, HashMap::from([("app".to_string(), "x".to_string())]));
        assert_eq!(r.mechanism_preferences.len(), 1);
        let m = &r.mechanism_preferences[0];
        assert_eq!(m.cls, "LOCAL");
        assert_eq!(m.r#type, "KERNEL");
        assert_eq!(m.parameters, HashMap::from([("name".to_string(), "nsm-1".to_string())]));

        let r = p("kernel://svc").to_request("nsc-1");
        assert!(r.mechanism_preferences[0].parameters.is_empty());
    }

    #[test]
    fn display_round_trips() {
        for s in ["kernel://svc@dom/nsm-1?a=1%2C2&b=x+y", "kernel://x"] {
            let u = p(s);
            assert_eq!(p(&u.to_string()), u);
        }
    }

    #[test]
    fn interdomain_split() {
        assert_eq!(split_interdomain("svc"), ("svc", None));
        assert_eq!(split_interdomain("svc@my.cluster2"), ("svc", Some("my.cluster2")));
        assert_eq!(split_interdomain("a@b@c"), ("a", Some("b@c")));
        assert_eq!(split_interdomain("svc@"), ("svc", Some("")));
    }
}
