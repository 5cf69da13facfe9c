//! The configuration file: trust domains and the rules that map a caller
//! (its netns, executable and uid) to a SPIFFE ID.
//!
//! ```yaml
//! trust_domains:
//!   - nsm.cluster1                        # federated with every other federated domain
//!   - { name: nsm.cluster2 }
//!   - { name: nsm.lonely, federate: false }   # trusts only itself, trusted by nobody
//! rules:                                  # first match wins
//!   - match: { netns: nsmlab-c1n1, exe: nsmgr }
//!     spiffe_id: spiffe://nsm.cluster1/nsmgr/c1n1
//!   - match: { netns_prefix: nsmlab-c1 }
//!     spiffe_id: "spiffe://nsm.cluster1/ns/default/pod/{netns}/{exe}"
//!   - match: { uid: 0 }
//!     spiffe_id: spiffe://nsm.cluster1/root
//! ```
//!
//! Match keys (all optional; every one given must hold; no keys match every
//! caller): `netns` (name of the caller's network namespace under
//! `/run/netns`), `netns_prefix`, `exe` (basename of `/proc/<pid>/exe`),
//! `uid`. Templates in `spiffe_id` paths: `{netns}`, `{exe}`, `{uid}`,
//! `{pid}`; a substituted value has characters a SPIFFE ID path may not hold
//! replaced by `_`. A rule whose template needs `{netns}` or `{exe}` that the
//! caller lacks (e.g. a process in the host netns) does not match, and the
//! next rule is tried. The file is YAML; JSON is YAML too.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub trust_domains: Vec<TrustDomainConfig>,
    #[serde(default)]
    pub rules: Vec<Rule>,
}

/// A trust domain: its name, and whether it federates with the other
/// federating domains (each SVID of it carries their bundles as federated
/// bundles, and theirs carry its bundle).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(from = "TdEntry")]
pub struct TrustDomainConfig {
    pub name: String,
    pub federate: bool,
}

impl TrustDomainConfig {
    pub fn new(name: &str) -> TrustDomainConfig {
        TrustDomainConfig { name: name.to_string(), federate: true }
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum TdEntry {
    Name(String),
    Full {
        name: String,
        #[serde(default = "yes")]
        federate: bool,
    },
}

fn yes() -> bool {
    true
}

impl From<TdEntry> for TrustDomainConfig {
    fn from(e: TdEntry) -> Self {
        match e {
            TdEntry::Name(name) => TrustDomainConfig { name, federate: true },
            TdEntry::Full { name, federate } => TrustDomainConfig { name, federate },
        }
    }
}

/// One rule: when `matcher` holds for the caller, it gets `spiffe_id`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    #[serde(rename = "match", default)]
    pub matcher: Match,
    pub spiffe_id: String,
}

/// What a rule requires of the caller; `None` fields are not checked.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Match {
    pub netns: Option<String>,
    pub netns_prefix: Option<String>,
    pub exe: Option<String>,
    pub uid: Option<u32>,
}

/// What attestation found out about a caller.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Caller {
    pub pid: i32,
    pub uid: u32,
    /// Basename of `/proc/<pid>/exe`; `None` if it could not be read.
    pub exe: Option<String>,
    /// Name under the netns directory of the caller's network namespace;
    /// `None` if it is in none of them (e.g. the host's).
    pub netns: Option<String>,
}

impl std::fmt::Display for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "pid {} (exe {}, netns {}, uid {})",
            self.pid,
            self.exe.as_deref().unwrap_or("?"),
            self.netns.as_deref().unwrap_or("-"),
            self.uid
        )
    }
}

/// The validated configuration: trust domains and rules, plus where it came
/// from (named in "no identity" errors).
#[derive(Debug, Clone)]
pub struct Policy {
    pub trust_domains: Vec<TrustDomainConfig>,
    pub rules: Vec<Rule>,
    pub source: PathBuf,
}

impl Policy {
    /// Reads and validates a YAML (or JSON) file.
    pub fn load(path: &Path) -> anyhow::Result<Policy> {
        let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        Policy::parse(&text, path)
    }

    /// Parses and validates the text of a config file; `source` is only used
    /// in messages.
    pub fn parse(text: &str, source: &Path) -> anyhow::Result<Policy> {
        let fc: FileConfig = serde_yaml::from_str(text).map_err(|e| anyhow::anyhow!("{}: {e}", source.display()))?;
        Policy::new(fc, source).map_err(|e| anyhow::anyhow!("{}: {e}", source.display()))
    }

    /// Validates a parsed config: valid, distinct trust domains (at least
    /// one); every rule's SPIFFE ID in a configured trust domain with a valid
    /// path once templates are filled in; only known templates.
    pub fn new(fc: FileConfig, source: &Path) -> Result<Policy, String> {
        if fc.trust_domains.is_empty() {
            return Err("trust_domains: at least one trust domain is needed".into());
        }
        for (i, td) in fc.trust_domains.iter().enumerate() {
            check_trust_domain(&td.name).map_err(|e| format!("trust_domains[{i}] {:?}: {e}", td.name))?;
            if fc.trust_domains[..i].iter().any(|o| o.name == td.name) {
                return Err(format!("trust_domains: {} is listed twice", td.name));
            }
        }
        for (i, r) in fc.rules.iter().enumerate() {
            let e = |m: String| format!("rules[{i}] ({}): {m}", r.spiffe_id);
            let td = r
                .spiffe_id
                .strip_prefix("spiffe://")
                .and_then(|rest| rest.split('/').next())
                .ok_or_else(|| e("spiffe_id must look like spiffe://<trust domain>/<path>".into()))?;
            if !fc.trust_domains.iter().any(|t| t.name == td) {
                let known: Vec<&str> = fc.trust_domains.iter().map(|t| t.name.as_str()).collect();
                return Err(e(format!("trust domain {td:?} is not in trust_domains {known:?}")));
            }
            let sample = Caller { pid: 1, uid: 0, exe: Some("exe".into()), netns: Some("netns".into()) };
            let id = render(&r.spiffe_id, &sample).map_err(e)?;
            check_spiffe_id(&id).map_err(e)?;
            if let Some(n) = &r.matcher.netns
                && n.is_empty()
            {
                return Err(e("match.netns is empty".into()));
            }
        }
        Ok(Policy { trust_domains: fc.trust_domains, rules: fc.rules, source: source.to_path_buf() })
    }

    /// The SPIFFE ID of the first rule that matches `caller`.
    pub fn identify(&self, caller: &Caller) -> Option<String> {
        self.rules.iter().filter(|r| r.matcher.matches(caller)).find_map(|r| render(&r.spiffe_id, caller).ok())
    }

    /// The message for a caller no rule matches.
    pub fn no_identity_message(&self, caller: &Caller) -> String {
        format!(
            "no identity for pid {} (exe {}, netns {}, uid {}): add a rule to {}",
            caller.pid,
            caller.exe.as_deref().unwrap_or("?"),
            caller.netns.as_deref().unwrap_or("-"),
            caller.uid,
            self.source.display()
        )
    }
}

impl Match {
    pub fn matches(&self, c: &Caller) -> bool {
        if let Some(n) = &self.netns
            && c.netns.as_deref() != Some(n.as_str())
        {
            return false;
        }
        if let Some(p) = &self.netns_prefix
            && !c.netns.as_deref().is_some_and(|n| n.starts_with(p.as_str()))
        {
            return false;
        }
        if let Some(x) = &self.exe
            && c.exe.as_deref() != Some(x.as_str())
        {
            return false;
        }
        if let Some(u) = self.uid
            && c.uid != u
        {
            return false;
        }
        true
    }
}

/// Fills in `{netns}`, `{exe}`, `{uid}`, `{pid}`. Fails on an unknown
/// placeholder, an unclosed brace, or a value the caller lacks.
pub fn render(template: &str, c: &Caller) -> Result<String, String> {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(i) = rest.find(['{', '}']) {
        out.push_str(&rest[..i]);
        if rest.as_bytes()[i] == b'}' {
            return Err(format!("unmatched '}}' in {template:?}"));
        }
        let after = &rest[i + 1..];
        let j = after.find('}').ok_or_else(|| format!("unclosed '{{' in {template:?}"))?;
        let name = &after[..j];
        let value = match name {
            "netns" => c.netns.clone().ok_or("caller has no named netns")?,
            "exe" => c.exe.clone().ok_or("caller's executable is unknown")?,
            "uid" => c.uid.to_string(),
            "pid" => c.pid.to_string(),
            other => return Err(format!("unknown template {{{other}}} (use {{netns}} {{exe}} {{uid}} {{pid}})")),
        };
        out.push_str(&sanitize_segment(&value));
        rest = &after[j + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Makes `v` usable inside a SPIFFE ID path segment.
fn sanitize_segment(v: &str) -> String {
    let s: String = v
        .chars()
        .map(|ch| if ch.is_ascii_alphanumeric() || matches!(ch, '-' | '.' | '_') { ch } else { '_' })
        .collect();
    match s.as_str() {
        "" => "_".into(),
        "." | ".." => s.replace('.', "_"),
        _ => s,
    }
}

/// A trust domain name per the SPIFFE ID spec: lower-case letters, digits,
/// `.`, `-`, `_`.
pub fn check_trust_domain(td: &str) -> Result<(), String> {
    if td.is_empty() {
        return Err("empty trust domain".into());
    }
    if let Some(c) = td.chars().find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '.' | '-' | '_')) {
        return Err(format!("character {c:?} is not allowed in a trust domain (a-z 0-9 . - _)"));
    }
    Ok(())
}

/// A SPIFFE ID of a workload: `spiffe://<td>/<path>` with a non-empty path
/// of segments of `[A-Za-z0-9._-]`, none empty, `.` or `..`.
pub fn check_spiffe_id(id: &str) -> Result<(), String> {
    let rest = id.strip_prefix("spiffe://").ok_or("must start with spiffe://")?;
    let (td, path) = rest.split_once('/').ok_or("needs a path after the trust domain")?;
    check_trust_domain(td)?;
    if path.is_empty() {
        return Err("needs a path after the trust domain".into());
    }
    for seg in path.split('/') {
        match seg {
            "" => return Err("empty path segment (// or trailing /)".into()),
            "." | ".." => return Err(format!("path segment {seg:?} is not allowed")),
            _ => {}
        }
        if let Some(c) = seg.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))) {
            return Err(format!("character {c:?} is not allowed in a path (A-Z a-z 0-9 . - _)"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
trust_domains: [nsm.cluster1, {name: nsm.cluster2}, {name: nsm.lonely, federate: false}]
rules:
  - match: { netns: nsmlab-c1n1, exe: nsmgr }
    spiffe_id: spiffe://nsm.cluster1/nsmgr/c1n1
  - match: { netns_prefix: nsmlab-c1 }
    spiffe_id: "spiffe://nsm.cluster1/ns/default/pod/{netns}/{exe}"
  - match: { uid: 1000 }
    spiffe_id: "spiffe://nsm.cluster2/user/{uid}/{pid}"
  - spiffe_id: spiffe://nsm.lonely/anyone
"#;

    fn caller(netns: Option<&str>, exe: Option<&str>, uid: u32) -> Caller {
        Caller { pid: 42, uid, exe: exe.map(Into::into), netns: netns.map(Into::into) }
    }

    #[test]
    fn example_parses_and_first_match_wins() {
        let p = Policy::parse(EXAMPLE, Path::new("/etc/x.yaml")).unwrap();
        assert_eq!(
            p.trust_domains,
            vec![
                TrustDomainConfig::new("nsm.cluster1"),
                TrustDomainConfig::new("nsm.cluster2"),
                TrustDomainConfig { name: "nsm.lonely".into(), federate: false }
            ]
        );
        let id = |c: Caller| p.identify(&c).unwrap();
        assert_eq!(id(caller(Some("nsmlab-c1n1"), Some("nsmgr"), 0)), "spiffe://nsm.cluster1/nsmgr/c1n1");
        assert_eq!(
            id(caller(Some("nsmlab-c1n2"), Some("nsmgr"), 0)),
            "spiffe://nsm.cluster1/ns/default/pod/nsmlab-c1n2/nsmgr"
        );
        // Odd characters in substituted values are replaced.
        assert_eq!(
            id(caller(Some("nsmlab-c1 x"), Some("a+b"), 0)),
            "spiffe://nsm.cluster1/ns/default/pod/nsmlab-c1_x/a_b"
        );
        // The template needs {exe}; unknown exe skips the rule.
        assert_eq!(id(caller(Some("nsmlab-c1n2"), None, 1000)), "spiffe://nsm.cluster2/user/1000/42");
        assert_eq!(id(caller(None, Some("x"), 5)), "spiffe://nsm.lonely/anyone");
    }

    #[test]
    fn lab_config_parses() {
        let p = Policy::parse(include_str!("../lab.yaml"), Path::new("lab.yaml")).unwrap();
        let id = |ns: Option<&str>, exe: &str| p.identify(&caller(ns, Some(exe), 0)).unwrap();
        assert_eq!(id(Some("nsmlab-c1n2"), "nsmgr"), "spiffe://nsm.cluster1/ns/nsm-system/sa/nsmgr");
        assert_eq!(
            id(Some("nsmlab-nse1"), "nse-icmp-responder"),
            "spiffe://nsm.cluster1/ns/default/sa/nse-icmp-responder"
        );
        assert_eq!(id(None, "nsmgr"), "spiffe://nsm.cluster1/ns/nsm-lab/sa/nsmgr");
    }

    #[test]
    fn no_rule_message_names_the_caller_and_file() {
        let p = Policy::parse(
            "trust_domains: [a.b]\nrules: [{match: {uid: 7}, spiffe_id: spiffe://a.b/x}]",
            Path::new("/c.yaml"),
        )
        .unwrap();
        let c = caller(Some("ns1"), Some("nsc"), 0);
        assert!(p.identify(&c).is_none());
        assert_eq!(
            p.no_identity_message(&c),
            "no identity for pid 42 (exe nsc, netns ns1, uid 0): add a rule to /c.yaml"
        );
    }

    #[test]
    fn invalid_configs_are_explained() {
        let bad = |t: &str| Policy::parse(t, Path::new("c.yaml")).unwrap_err().to_string();
        assert!(bad("trust_domains: []").contains("at least one"));
        assert!(bad("trust_domains: [Nsm]").contains("'N'"));
        assert!(bad("trust_domains: [a, a]").contains("listed twice"));
        assert!(
            bad("trust_domains: [a]\nrules: [{spiffe_id: spiffe://b/x}]").contains("\"b\" is not in trust_domains")
        );
        assert!(
            bad("trust_domains: [a]\nrules: [{spiffe_id: \"spiffe://a/{who}\"}]").contains("unknown template {who}")
        );
        assert!(bad("trust_domains: [a]\nrules: [{spiffe_id: spiffe://a}]").contains("needs a path"));
        assert!(bad("trust_domains: [a]\nrules: [{spiffe_id: spiffe://a/x y}]").contains("' '"));
        assert!(bad("trust_domains: [a]\nrules: [{match: {exec: x}, spiffe_id: spiffe://a/x}]").contains("exec"));
        assert!(bad("trust_domains: [a]\nrules: [{spiffe_id: \"spiffe://a/{exe\"}]").contains("unclosed"));
        // JSON is accepted as well.
        Policy::parse(
            r#"{"trust_domains": ["a"], "rules": [{"match": {"uid": 0}, "spiffe_id": "spiffe://a/r"}]}"#,
            Path::new("c.json"),
        )
        .unwrap();
    }
}
