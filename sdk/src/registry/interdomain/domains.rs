//! Which registry serves a domain: the [`DomainResolver`] seam and the
//! static map [`StaticDomains`] (`NSM_DOMAIN_REGISTRIES`).

use std::collections::BTreeMap;

use async_trait::async_trait;
use url::Url;

use crate::tools::grpc::{self, parse_url};

/// Longest domain name accepted (DNS limit).
pub const MAX_DOMAIN_LEN: usize = 253;

/// Finds the registry serving a domain.
///
/// The seam for DNS: upstream's registry-proxy-dns resolves `SRV` +
/// `A/AAAA` of `registry.nsm-system.<domain>`, which is asynchronous, hence
/// an async method. `domain` is passed as the caller wrote it;
/// implementations should treat it case-insensitively, as DNS does.
#[async_trait]
pub trait DomainResolver: Send + Sync {
    /// The registry URL for `domain`, or `None` if the domain is unknown.
    async fn registry_url(&self, domain: &str) -> Option<Url>;
}

/// A static domain → registry URL map, parsed from
/// `my.cluster2=tcp://10.2.0.1:5002,my.cluster3=registry.c3:5002`.
///
/// # Guarantees
/// - Parsing accepts an empty string (no domains), ignores whitespace around
///   entries and empty entries (`a=..,,b=..,`), and rejects, naming the
///   entry and what is wrong: an entry without `=`, an invalid domain name
///   (see [`check_domain`]), a URL that [`parse_url`] rejects (a bare
///   `host:port` means `tcp://host:port`), and a domain given twice.
/// - Domains are matched ASCII case-insensitively (stored lower-case).
/// - [`std::fmt::Display`] renders the map back in the input syntax, sorted
///   by domain, and parses to an equal map.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StaticDomains(BTreeMap<String, Url>);

/// Why a domain name is invalid.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DomainError {
    #[error("domain name is empty")]
    Empty,
    #[error("domain name {domain:?} is {len} bytes long (at most 253)")]
    TooLong { domain: String, len: usize },
    #[error("character {ch:?} is not allowed in domain name {domain:?} (allowed: letters, digits, '-', '.', '_')")]
    BadChar { domain: String, ch: char },
}

/// Why a [`StaticDomains`] string was rejected. Every variant names the
/// offending entry.
#[derive(Debug, thiserror::Error)]
pub enum DomainsError {
    #[error(
        "invalid NSM_DOMAIN_REGISTRIES entry {entry:?}: expected <domain>=<registry URL>, e.g. my.cluster2=tcp://10.2.0.1:5002"
    )]
    Syntax { entry: String },
    #[error("invalid NSM_DOMAIN_REGISTRIES entry {entry:?}: {source}")]
    Domain { entry: String, source: DomainError },
    #[error("invalid NSM_DOMAIN_REGISTRIES entry {entry:?}: registry URL: {source}")]
    Url { entry: String, source: grpc::Error },
    #[error("NSM_DOMAIN_REGISTRIES lists domain {domain} twice ({first} and {second}); give each domain one registry")]
    Duplicate { domain: String, first: String, second: String },
}

/// Checks that `domain` is a plausible domain name: 1..=253 bytes of ASCII
/// letters, digits, `-`, `.` and `_` (the alphabet NSURLs accept).
pub fn check_domain(domain: &str) -> Result<(), DomainError> {
    if domain.is_empty() {
        return Err(DomainError::Empty);
    }
    if domain.len() > MAX_DOMAIN_LEN {
        return Err(DomainError::TooLong { domain: domain.to_string(), len: domain.len() });
    }
    if let Some(ch) = domain.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))) {
        return Err(DomainError::BadChar { domain: domain.to_string(), ch });
    }
    Ok(())
}

impl StaticDomains {
    /// An empty map.
    pub fn new() -> StaticDomains {
        StaticDomains::default()
    }

    /// Adds `domain → url`; the domain must be valid and not yet present.
    pub fn insert(&mut self, domain: &str, url: Url) -> Result<(), DomainsError> {
        let entry = || format!("{domain}={url}");
        check_domain(domain).map_err(|source| DomainsError::Domain { entry: entry(), source })?;
        let key = domain.to_ascii_lowercase();
        if let Some(first) = self.0.get(&key) {
            return Err(DomainsError::Duplicate { domain: key, first: first.to_string(), second: url.to_string() });
        }
        self.0.insert(key, url);
        Ok(())
    }

    /// The registry of `domain` (case-insensitive).
    pub fn get(&self, domain: &str) -> Option<&Url> {
        self.0.get(&domain.to_ascii_lowercase())
    }

    /// Known domains, lower-case, sorted.
    pub fn domains(&self) -> impl Iterator<Item = &str> {
        self.0.keys().map(String::as_str)
    }

    /// Number of domains.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// No domain configured.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::str::FromStr for StaticDomains {
    type Err = DomainsError;

    fn from_str(s: &str) -> Result<StaticDomains, DomainsError> {
        let mut out = StaticDomains::new();
        for entry in s.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let Some((domain, url)) = entry.split_once('=') else {
                return Err(DomainsError::Syntax { entry: entry.to_string() });
            };
            let (domain, url) = (domain.trim(), url.trim());
            check_domain(domain).map_err(|source| DomainsError::Domain { entry: entry.to_string(), source })?;
            let url = parse_url(url).map_err(|source| DomainsError::Url { entry: entry.to_string(), source })?;
            out.insert(domain, url)?;
        }
        Ok(out)
    }
}

impl std::fmt::Display for StaticDomains {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (d, u)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{d}={u}")?;
        }
        Ok(())
    }
}

#[async_trait]
impl DomainResolver for StaticDomains {
    async fn registry_url(&self, domain: &str) -> Option<Url> {
        self.get(domain).cloned()
    }
}
