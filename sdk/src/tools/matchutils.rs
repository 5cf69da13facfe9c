//! Label matching for endpoint and forwarder selection (upstream
//! `sdk:pkg/tools/matchutils` and `discoverforwarder`'s filter).
//!
//! # Guarantees
//! - [`is_subset`] is upstream `IsSubset`: every selector entry must equal
//!   the label, literally or after rendering the selector value as a Go
//!   `text/template` with the request's connection labels as data; a label
//!   that is absent reads as `""` (as a Go map does); fewer labels than
//!   selector entries never match.
//! - [`match_endpoint`] and [`match_forwarders`] are pure functions that keep
//!   the order of the endpoints they are given, and never return an endpoint
//!   twice.
//!
//! Difference from upstream: Go's `MatchEndpoint` appends an endpoint once
//! per matching route, so an endpoint matched by two routes of the same
//! match appears twice and gets twice the round-robin share. Here each
//! endpoint appears at most once, in input order.

use std::collections::HashMap;

use nsm_api::registry::{Match, NetworkService, NetworkServiceEndpoint};

/// What upstream's text/template prints for a key missing from the data map.
pub const NO_VALUE: &str = "<no value>";

/// Why a selector value is not a template we can render; the caller then
/// compares it literally (as upstream does on template errors).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    #[error("template {template:?}: action opened at byte {at} is never closed with '}}}}'")]
    Unclosed { template: String, at: usize },
    #[error(
        "template {template:?}: unsupported action {action:?} (only {{{{.key}}}} with an identifier key is supported)"
    )]
    Unsupported { template: String, action: String },
}

/// `selector ⊆ labels` with templating: for every `(k, v)` in `selector`,
/// `labels[k] == v` or `labels[k] == render(v, values)`. A missing label
/// reads as `""`. `labels.len() < selector.len()` ⇒ `false`. Template errors
/// ⇒ literal comparison only.
pub fn is_subset(
    labels: &HashMap<String, String>,
    selector: &HashMap<String, String>,
    values: &HashMap<String, String>,
) -> bool {
    if labels.len() < selector.len() {
        return false;
    }
    selector.iter().all(|(k, v)| {
        let have = labels.get(k).map(String::as_str).unwrap_or("");
        have == v || (v.contains("{{") && render_template(v, values).is_ok_and(|r| r == have))
    })
}

enum Piece<'a> {
    Text(&'a str),
    Key(&'a str),
}

/// Renders the subset of Go `text/template` that NSM selectors use:
/// literal text mixed with `{{.key}}` actions (spaces inside the braces and
/// `{{- ` / ` -}}` trim markers allowed). A key missing from `values`
/// renders as `<no value>`, as Go does for maps. Anything else — pipelines,
/// functions, `{{.}}`, nested fields, comments, unbalanced braces — is an
/// error, so the caller falls back to a literal comparison.
///
/// Hand-written on purpose: a full Go template engine would be a large
/// dependency (and a large attack surface in a label matcher) for this one
/// action form, and no NSM deployment uses more than it.
pub fn render_template(t: &str, values: &HashMap<String, String>) -> Result<String, TemplateError> {
    let mut pieces: Vec<Piece<'_>> = vec![];
    let mut rest = t;
    let mut offset = 0;
    let mut trim_next = false;
    while let Some(open) = rest.find("{{") {
        let mut text = &rest[..open];
        if trim_next {
            text = text.trim_start();
        }
        let after = &rest[open + 2..];
        let Some(close) = after.find("}}") else {
            return Err(TemplateError::Unclosed { template: t.to_string(), at: offset + open });
        };
        let action = &after[..close];
        let unsupported =
            || TemplateError::Unsupported { template: t.to_string(), action: format!("{{{{{action}}}}}") };
        let mut inner = action;
        // Trim markers are "{{- " and " -}}": the dash must be separated by
        // whitespace, otherwise Go reads a negative number.
        if let Some(r) = inner.strip_prefix('-')
            && r.starts_with(|c: char| c.is_ascii_whitespace())
        {
            text = text.trim_end();
            inner = r;
        }
        trim_next = false;
        if let Some(r) = inner.strip_suffix('-')
            && r.ends_with(|c: char| c.is_ascii_whitespace())
        {
            trim_next = true;
            inner = r;
        }
        let key = inner.trim().strip_prefix('.').ok_or_else(unsupported)?;
        let mut chars = key.chars();
        let ident = matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !ident {
            return Err(unsupported());
        }
        pieces.push(Piece::Text(text));
        pieces.push(Piece::Key(key));
        let consumed = open + 2 + close + 2;
        offset += consumed;
        rest = &rest[consumed..];
    }
    pieces.push(Piece::Text(if trim_next { rest.trim_start() } else { rest }));

    let mut out = String::with_capacity(t.len());
    for p in pieces {
        match p {
            Piece::Text(s) => out.push_str(s),
            Piece::Key(k) => out.push_str(values.get(k).map(String::as_str).unwrap_or(NO_VALUE)),
        }
    }
    Ok(out)
}

fn empty() -> &'static HashMap<String, String> {
    static EMPTY: std::sync::OnceLock<HashMap<String, String>> = std::sync::OnceLock::new();
    EMPTY.get_or_init(HashMap::new)
}

/// The labels `nse` registered for network service `service` (empty if none).
pub fn service_labels<'a>(nse: &'a NetworkServiceEndpoint, service: &str) -> &'a HashMap<String, String> {
    nse.network_service_labels.get(service).map(|l| &l.labels).unwrap_or_else(|| empty())
}

fn source_applies(m: &Match, labels: &HashMap<String, String>) -> bool {
    is_subset(labels, &m.source_selector, labels)
}

/// Upstream `MatchEndpoint(labels, ns, nses)` (spec §2.4):
/// - `ns.matches` empty ⇒ all `nses`;
/// - matches are tried in order; one applies when its `source_selector ⊆
///   labels` (templated with `labels`);
/// - candidates = `nses` for which some route's `destination_selector ⊆`
///   the NSE's labels for `ns.name` (templated with `labels`);
/// - `fallthrough` with no candidates ⇒ try the next match;
/// - a match with `metadata`, no routes and no candidates (it only selects
///   forwarders) ⇒ all `nses`;
/// - otherwise the candidates, possibly none. No applicable match ⇒ none.
pub fn match_endpoint(
    labels: &HashMap<String, String>,
    ns: &NetworkService,
    nses: &[NetworkServiceEndpoint],
) -> Vec<NetworkServiceEndpoint> {
    if ns.matches.is_empty() {
        return nses.to_vec();
    }
    for m in &ns.matches {
        if !source_applies(m, labels) {
            continue;
        }
        let candidates: Vec<NetworkServiceEndpoint> = nses
            .iter()
            .filter(|nse| {
                let nse_labels = service_labels(nse, &ns.name);
                m.routes.iter().any(|r| is_subset(nse_labels, &r.destination_selector, labels))
            })
            .cloned()
            .collect();
        if m.fallthrough && candidates.is_empty() {
            continue;
        }
        if m.metadata.is_some() && m.routes.is_empty() && candidates.is_empty() {
            return nses.to_vec();
        }
        return candidates;
    }
    vec![]
}

/// Forwarder filter of upstream `discoverforwarder` (spec §2.5 step 3):
/// `ns.matches` empty ⇒ all `fwds`; else the first match whose
/// `source_selector ⊆ labels` decides: required = `match.metadata.labels`,
/// or `{p2p: "true"}` when the match has no metadata; keep forwarders whose
/// labels for `forwarder_service` contain the required ones (templated with
/// `labels`); `fallthrough` with none kept ⇒ next match. No applicable
/// match ⇒ none.
pub fn match_forwarders(
    labels: &HashMap<String, String>,
    ns: &NetworkService,
    forwarder_service: &str,
    fwds: &[NetworkServiceEndpoint],
) -> Vec<NetworkServiceEndpoint> {
    if ns.matches.is_empty() {
        return fwds.to_vec();
    }
    let p2p: HashMap<String, String> = HashMap::from([("p2p".to_string(), "true".to_string())]);
    for m in &ns.matches {
        if !source_applies(m, labels) {
            continue;
        }
        let required = m.metadata.as_ref().map(|md| &md.labels).unwrap_or(&p2p);
        let kept: Vec<NetworkServiceEndpoint> = fwds
            .iter()
            .filter(|f| is_subset(service_labels(f, forwarder_service), required, labels))
            .cloned()
            .collect();
        if m.fallthrough && kept.is_empty() {
            continue;
        }
        return kept;
    }
    vec![]
}

#[cfg(test)]
mod tests {
    use nsm_api::registry::{Destination, Metadata, NetworkServiceLabels};

    use super::*;

    fn m(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn nse(name: &str, service: &str, labels: &[(&str, &str)]) -> NetworkServiceEndpoint {
        NetworkServiceEndpoint {
            name: name.into(),
            network_service_names: vec![service.into()],
            network_service_labels: HashMap::from([(service.to_string(), NetworkServiceLabels { labels: m(labels) })]),
            ..Default::default()
        }
    }

    fn route(sel: &[(&str, &str)]) -> Destination {
        Destination { destination_selector: m(sel), weight: 0 }
    }

    fn mat(src: &[(&str, &str)], routes: Vec<Destination>, fallthrough: bool) -> Match {
        Match { source_selector: m(src), routes, fallthrough, metadata: None }
    }

    fn names(v: &[NetworkServiceEndpoint]) -> Vec<&str> {
        v.iter().map(|n| n.name.as_str()).collect()
    }

    #[test]
    fn subset_basics() {
        let none = HashMap::new();
        assert!(is_subset(&m(&[("a", "1"), ("b", "2")]), &m(&[("a", "1")]), &none));
        assert!(is_subset(&m(&[("a", "1")]), &m(&[]), &none));
        assert!(is_subset(&m(&[]), &m(&[]), &none));
        assert!(!is_subset(&m(&[("a", "1")]), &m(&[("a", "2")]), &none));
        assert!(!is_subset(&m(&[("a", "1")]), &m(&[("a", "1"), ("b", "2")]), &none), "fewer labels than selector");
        assert!(!is_subset(&m(&[("a", "1"), ("c", "3")]), &m(&[("a", "1"), ("b", "2")]), &none));
        // Go map semantics: an absent label reads as "".
        assert!(is_subset(&m(&[("a", "1")]), &m(&[("b", "")]), &none));
    }

    #[test]
    fn subset_with_templates() {
        let values = m(&[("nodeName", "node-1"), ("app", "fw")]);
        let sel = m(&[("nodeName", "{{.nodeName}}")]);
        assert!(is_subset(&m(&[("nodeName", "node-1")]), &sel, &values));
        assert!(!is_subset(&m(&[("nodeName", "node-2")]), &sel, &values));
        assert!(is_subset(&m(&[("nodeName", "{{.nodeName}}")]), &sel, &values), "literal match still counts");
        assert!(is_subset(&m(&[("x", "pre-fw-post")]), &m(&[("x", "pre-{{ .app }}-post")]), &values));
        // Unknown key renders "<no value>", as Go.
        assert!(is_subset(&m(&[("x", "<no value>")]), &m(&[("x", "{{.missing}}")]), &values));
    }

    #[test]
    fn template_errors_fall_back_to_literal() {
        let values = m(&[("a", "1")]);
        for t in ["{{.a | printf}}", "{{.a", "{{ .a.b }}", "{{.}}", "{{printf \"x\"}}", "{{}}", "{{/* c */}}"] {
            assert!(render_template(t, &values).is_err(), "{t}");
            assert!(is_subset(&m(&[("k", t)]), &m(&[("k", t)]), &values), "{t}");
            assert!(!is_subset(&m(&[("k", "1")]), &m(&[("k", t)]), &values), "{t}");
        }
        let err = render_template("x{{.a", &values).unwrap_err();
        assert_eq!(err, TemplateError::Unclosed { template: "x{{.a".into(), at: 1 });
        assert!(render_template("{{.a | printf}}", &values).unwrap_err().to_string().contains("{{.a | printf}}"));
    }

    #[test]
    fn render_forms() {
        let v = m(&[("x", "X"), ("y", "Y")]);
        assert_eq!(render_template("plain }} text", &v).unwrap(), "plain }} text");
        assert_eq!(render_template("a-{{.x}}-b{{ .y }}", &v).unwrap(), "a-X-bY");
        assert_eq!(render_template("a  {{- .x -}}  b", &v).unwrap(), "aXb");
        assert_eq!(render_template("{{.z}}", &v).unwrap(), "<no value>");
        assert!(render_template("{{-1}}", &v).is_err(), "a number, not a trim marker");
        assert_eq!(render_template("", &v).unwrap(), "");
    }

    /// deployments-k8s examples/features/nse-composition.
    #[test]
    fn nse_composition_example() {
        let ns = NetworkService {
            name: "nse-composition".into(),
            matches: vec![
                mat(&[("app", "firewall")], vec![route(&[("app", "passthrough-1")])], false),
                mat(&[("app", "passthrough-1")], vec![route(&[("app", "passthrough-2")])], false),
                mat(&[("app", "passthrough-2")], vec![route(&[("app", "nginx")])], false),
                mat(&[], vec![route(&[("app", "firewall")])], false),
            ],
            ..Default::default()
        };
        let nses: Vec<_> = ["firewall", "passthrough-1", "passthrough-2", "nginx"]
            .iter()
            .map(|a| nse(&format!("nse-{a}"), "nse-composition", &[("app", a), ("nodeName", "n1")]))
            .collect();
        let client = m(&[("podName", "alpine"), ("nodeName", "n1")]);
        assert_eq!(names(&match_endpoint(&client, &ns, &nses)), ["nse-firewall"]);
        assert_eq!(names(&match_endpoint(&m(&[("app", "firewall")]), &ns, &nses)), ["nse-passthrough-1"]);
        assert_eq!(names(&match_endpoint(&m(&[("app", "passthrough-1")]), &ns, &nses)), ["nse-passthrough-2"]);
        assert_eq!(names(&match_endpoint(&m(&[("app", "passthrough-2")]), &ns, &nses)), ["nse-nginx"]);
        // Labels registered for another service do not count.
        let other = vec![nse("x", "other", &[("app", "firewall")])];
        assert!(match_endpoint(&client, &ns, &other).is_empty());
    }

    /// deployments-k8s examples/features/scale-from-zero.
    #[test]
    fn scale_from_zero_example() {
        let ns = NetworkService {
            name: "autoscale-icmp-responder".into(),
            matches: vec![
                mat(&[], vec![route(&[("app", "icmp-responder"), ("nodeName", "{{.nodeName}}")])], true),
                mat(&[], vec![route(&[("app", "nse-supplier-k8s")])], false),
            ],
            ..Default::default()
        };
        let svc = "autoscale-icmp-responder";
        let supplier = nse("supplier", svc, &[("app", "nse-supplier-k8s"), ("nodeName", "node-1")]);
        let icmp2 = nse("icmp-node-2", svc, &[("app", "icmp-responder"), ("nodeName", "node-2")]);
        let icmp1 = nse("icmp-node-1", svc, &[("app", "icmp-responder"), ("nodeName", "node-1")]);
        let labels = m(&[("nodeName", "node-1"), ("podName", "alpine")]);
        let got = match_endpoint(&labels, &ns, &[supplier.clone(), icmp2.clone()]);
        assert_eq!(names(&got), ["supplier"], "no icmp-responder on node-1: fall through to the supplier");
        let got = match_endpoint(&labels, &ns, &[supplier, icmp2, icmp1]);
        assert_eq!(names(&got), ["icmp-node-1"]);
    }

    #[test]
    fn no_matches_means_all_and_no_applicable_match_means_none() {
        let nses = vec![nse("a", "s", &[]), nse("b", "s", &[])];
        let ns = NetworkService { name: "s".into(), ..Default::default() };
        assert_eq!(names(&match_endpoint(&HashMap::new(), &ns, &nses)), ["a", "b"]);
        let ns = NetworkService {
            name: "s".into(),
            matches: vec![mat(&[("app", "x")], vec![route(&[])], false)],
            ..Default::default()
        };
        assert!(match_endpoint(&m(&[("app", "y")]), &ns, &nses).is_empty());
        assert_eq!(names(&match_endpoint(&m(&[("app", "x")]), &ns, &nses)), ["a", "b"], "empty selector ⊆ anything");
        // Non-fallthrough match with no candidates: none, even if a later match would fit.
        let ns = NetworkService {
            name: "s".into(),
            matches: vec![mat(&[], vec![route(&[("z", "1")])], false), mat(&[], vec![route(&[])], false)],
            ..Default::default()
        };
        assert!(match_endpoint(&HashMap::new(), &ns, &nses).is_empty());
    }

    #[test]
    fn endpoints_matched_by_two_routes_appear_once_in_input_order() {
        let ns = NetworkService {
            name: "s".into(),
            matches: vec![mat(&[], vec![route(&[("b", "1")]), route(&[("a", "1")])], false)],
            ..Default::default()
        };
        let nses = vec![nse("x", "s", &[("a", "1"), ("b", "1")]), nse("y", "s", &[("a", "1")])];
        assert_eq!(names(&match_endpoint(&HashMap::new(), &ns, &nses)), ["x", "y"]);
    }

    #[test]
    fn metadata_only_match() {
        let ns = NetworkService {
            name: "s".into(),
            matches: vec![Match {
                source_selector: HashMap::new(),
                routes: vec![],
                fallthrough: false,
                metadata: Some(Metadata { labels: m(&[("vpp", "true")]) }),
            }],
            ..Default::default()
        };
        let nses = vec![nse("a", "s", &[]), nse("b", "s", &[])];
        assert_eq!(names(&match_endpoint(&HashMap::new(), &ns, &nses)), ["a", "b"]);

        let fwds = vec![
            nse("fwd-kernel", "forwarder", &[("p2p", "true")]),
            nse("fwd-vpp", "forwarder", &[("p2p", "true"), ("vpp", "true")]),
        ];
        assert_eq!(names(&match_forwarders(&HashMap::new(), &ns, "forwarder", &fwds)), ["fwd-vpp"]);
    }

    #[test]
    fn forwarder_filter() {
        let fwds = vec![
            nse("f1", "forwarder", &[("p2p", "true"), ("nodeName", "n1")]),
            nse("f2", "forwarder", &[("nodeName", "n1")]),
            nse("f3", "forwarder", &[("p2p", "true"), ("nodeName", "n2")]),
        ];
        let plain = NetworkService { name: "s".into(), ..Default::default() };
        assert_eq!(names(&match_forwarders(&HashMap::new(), &plain, "forwarder", &fwds)), ["f1", "f2", "f3"]);

        // A match without metadata requires p2p=true.
        let ns = NetworkService { name: "s".into(), matches: vec![mat(&[], vec![], false)], ..Default::default() };
        assert_eq!(names(&match_forwarders(&HashMap::new(), &ns, "forwarder", &fwds)), ["f1", "f3"]);

        // Templated metadata labels, fallthrough to the next match when none fit.
        let md = |l: &[(&str, &str)], src: &[(&str, &str)], ft: bool| Match {
            source_selector: m(src),
            routes: vec![],
            fallthrough: ft,
            metadata: Some(Metadata { labels: m(l) }),
        };
        let ns = NetworkService {
            name: "s".into(),
            matches: vec![
                md(&[("special", "yes")], &[], true),
                md(&[("nodeName", "{{.nodeName}}")], &[("app", "a")], false),
                md(&[("nodeName", "n2")], &[], false),
            ],
            ..Default::default()
        };
        let labels = m(&[("app", "a"), ("nodeName", "n1")]);
        assert_eq!(names(&match_forwarders(&labels, &ns, "forwarder", &fwds)), ["f1", "f2"]);
        let labels = m(&[("app", "b"), ("nodeName", "n1")]);
        assert_eq!(names(&match_forwarders(&labels, &ns, "forwarder", &fwds)), ["f3"]);

        // No applicable match ⇒ none.
        let ns =
            NetworkService { name: "s".into(), matches: vec![md(&[], &[("app", "zzz")], false)], ..Default::default() };
        assert!(match_forwarders(&labels, &ns, "forwarder", &fwds).is_empty());
        // Labels of the wrong service name are ignored.
        assert!(
            match_forwarders(
                &HashMap::new(),
                &NetworkService { name: "s".into(), matches: vec![mat(&[], vec![], false)], ..Default::default() },
                "other-forwarder",
                &fwds
            )
            .is_empty()
        );
    }
}
