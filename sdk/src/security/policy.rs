//! The policy engine: Rego policies (evaluated with `regorus`) deciding
//! whether a path of tokens may pass a hop (`sdk:pkg/tools/opa`).
//!
//! A [`PolicySet`] is a list of policies, each a Rego module in `package
//! nsm` defining the boolean rule `valid`. Each policy is evaluated on its
//! own (query `data.nsm.valid`); the first one that is not `true` refuses the
//! input and is named in the error.
//!
//! # Default sets (nsm-spec §2.7)
//! - common: `tokens_valid` (every token decodes as a JWT), `tokens_expired`
//!   (every token's `exp` is in the future), `tokens_chained` (segment x's
//!   `aud` contains segment x+1's `sub`).
//! - [`PolicySet::server`] = common + `prev_token_signed` (the caller's token
//!   is signed by the TLS peer's key).
//! - [`PolicySet::client`] = common + `next_token_signed` (the server's token
//!   is signed by the server certificate's key).
//! - [`PolicySet::registry`] = common + `prev_token_signed` +
//!   `client_allowed` (a registry name belongs to the SPIFFE ID that
//!   registered it first): upstream's "common/registry/server" set.
//!
//! The sources are in `security/policies/*.rego`, embedded at build time.
//!
//! # Builtins
//! regorus has no `io.jwt.*`; every engine gets two extensions implemented
//! with [`super::jwt`]:
//! - `io.jwt.decode(token)` → `[header, payload, signature_hex]`, undefined
//!   (not an error) if the token is not a JWT, as OPA's would make the
//!   expression fail;
//! - `io.jwt.verify_es256(token, certificate_pem)` → `true` iff the token is
//!   ES256 and verifies against the certificate's EC P-256 key (`false` for
//!   any other token, certificate or key).
//!
//! `time.now_ns()` comes with regorus' `time` feature.
//!
//! # Operator policies
//! [`PolicySet::with_files`] adds `.rego` files. Rego v1 syntax is tried
//! first, then v0 (the syntax of upstream NSM's policies). A file must be
//! `package nsm`, define `valid`, and evaluate without error on an empty
//! input (this also compiles it once, up front); errors name the file.
//!
//! # Guarantees
//! - Fail closed: a policy that is `false`, undefined or not a boolean
//!   refuses; a policy that errors refuses with [`Refused::Error`] (the
//!   chain elements map it to `Internal`).
//! - Policies are parsed and analysed once, when the set is built. Each
//!   evaluation runs on a clone of the prepared engine (a clone shares the
//!   analysed modules by reference count: ~0.3 µs), so concurrent
//!   evaluations never share mutable state and nothing is re-parsed.
//! - Cost: about 0.3 ms for the server set on a three-hop path in a debug
//!   build (dependencies at opt-level 1), most of it the ES256 verification
//!   and JWT decoding; see the `evaluation_is_fast` test.
//! - A `PolicySet` is cheap to clone and to share between threads.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use regorus::{Engine, Value};
use thiserror::Error;
use tonic::Status;

use super::jwt;

/// The rule every policy defines.
pub const QUERY: &str = "data.nsm.valid";

const TOKENS_VALID: &str = include_str!("policies/tokens_valid.rego");
const TOKENS_EXPIRED: &str = include_str!("policies/tokens_expired.rego");
const TOKENS_CHAINED: &str = include_str!("policies/tokens_chained.rego");
const PREV_TOKEN_SIGNED: &str = include_str!("policies/prev_token_signed.rego");
const NEXT_TOKEN_SIGNED: &str = include_str!("policies/next_token_signed.rego");
const CLIENT_ALLOWED: &str = include_str!("policies/client_allowed.rego");

/// A policy said no.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
#[error("policy {policy} denied")]
pub struct Denied {
    /// Name of the refusing policy: `tokens_valid`, ... for the embedded
    /// ones, the file path for operator files.
    pub policy: String,
}

/// A policy could not be loaded or evaluated.
#[derive(Debug, Error)]
pub enum PolicyError {
    /// The file could not be read.
    #[error("reading policy file {file}: {source}")]
    Read {
        file: String,
        #[source]
        source: std::io::Error,
    },
    /// The file is not a usable policy (parse error, wrong package, no
    /// `valid` rule, fails on an empty input).
    #[error("policy file {file}: {message}")]
    Load { file: String, message: String },
    /// Evaluation failed (or an embedded policy did not compile).
    #[error("policy {policy} could not be evaluated: {message}")]
    Eval { policy: String, message: String },
}

/// Why [`PolicySet::evaluate`] refused an input.
#[derive(Debug, Error)]
pub enum Refused {
    /// A policy evaluated to something other than `true`.
    #[error(transparent)]
    Denied(#[from] Denied),
    /// A policy failed to evaluate.
    #[error(transparent)]
    Error(#[from] PolicyError),
}

impl Refused {
    /// Name of the policy that refused.
    pub fn policy(&self) -> &str {
        match self {
            Refused::Denied(d) => &d.policy,
            Refused::Error(PolicyError::Eval { policy, .. }) => policy,
            Refused::Error(PolicyError::Read { file, .. } | PolicyError::Load { file, .. }) => file,
        }
    }

    /// The gRPC status for this refusal: `PermissionDenied "no sufficient
    /// privileges: policy X denied <what>"`, or `Internal` for evaluation
    /// errors (nsm-spec §2.7).
    pub fn to_status(&self, what: &str) -> Status {
        match self {
            Refused::Denied(d) => {
                Status::permission_denied(format!("no sufficient privileges: policy {} denied {what}", d.policy))
            }
            Refused::Error(e) => Status::internal(format!("authorizing {what}: {e}")),
        }
    }
}

/// One compiled policy.
struct Policy {
    name: String,
    /// The prepared engine to clone, or why the embedded source did not
    /// compile (then every evaluation fails, closed).
    template: Result<Engine, String>,
}

impl Policy {
    fn check(&self, input: &Value) -> Result<(), Refused> {
        let template =
            self.template.as_ref().map_err(|m| PolicyError::Eval { policy: self.name.clone(), message: m.clone() })?;
        // A clone shares the parsed and analysed modules (reference
        // counted): it costs well under a microsecond, so every evaluation
        // gets its own engine and nothing is shared or locked.
        let mut engine = template.clone();
        engine.set_input(input.clone());
        let res = engine.eval_rule(QUERY.to_string());
        match res {
            Ok(Value::Bool(true)) => Ok(()),
            Ok(Value::Bool(false) | Value::Undefined) => Err(Denied { policy: self.name.clone() }.into()),
            Ok(other) => Err(PolicyError::Eval {
                policy: self.name.clone(),
                message: format!("`valid` is not a boolean but {other}"),
            }
            .into()),
            Err(e) => Err(PolicyError::Eval { policy: self.name.clone(), message: format!("{e:#}") }.into()),
        }
    }
}

/// An ordered set of policies, each evaluated separately.
#[derive(Clone)]
pub struct PolicySet {
    policies: Vec<Arc<Policy>>,
}

impl std::fmt::Debug for PolicySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.names()).finish()
    }
}

impl PolicySet {
    /// A set without policies (allows everything).
    pub fn empty() -> PolicySet {
        PolicySet { policies: vec![] }
    }

    /// NetworkService server side: common + `prev_token_signed`.
    pub fn server() -> PolicySet {
        Self::embedded(&["tokens_valid", "tokens_expired", "tokens_chained", "prev_token_signed"])
    }

    /// NetworkService client side: common + `next_token_signed`.
    pub fn client() -> PolicySet {
        Self::embedded(&["tokens_valid", "tokens_expired", "tokens_chained", "next_token_signed"])
    }

    /// Registry server side: common + `prev_token_signed` + `client_allowed`
    /// (registry inputs, see `registry::authorize`).
    pub fn registry() -> PolicySet {
        Self::embedded(&["tokens_valid", "tokens_expired", "tokens_chained", "prev_token_signed", "client_allowed"])
    }

    /// Adds operator policy files (`package nsm`, boolean rule `valid`),
    /// evaluated after the policies already in the set.
    pub fn with_files(mut self, paths: &[PathBuf]) -> Result<PolicySet, PolicyError> {
        for p in paths {
            let file = p.display().to_string();
            let text = std::fs::read_to_string(p).map_err(|source| PolicyError::Read { file: file.clone(), source })?;
            let engine = compile(&file, &text).map_err(|message| PolicyError::Load { file: file.clone(), message })?;
            self.policies.push(Arc::new(Policy { name: file, template: Ok(engine) }));
        }
        Ok(self)
    }

    /// Adds a policy from source text (`name` is what errors call it).
    pub fn with_source(mut self, name: &str, rego: &str) -> Result<PolicySet, PolicyError> {
        let engine = compile(name, rego).map_err(|message| PolicyError::Load { file: name.to_string(), message })?;
        self.policies.push(Arc::new(Policy { name: name.to_string(), template: Ok(engine) }));
        Ok(self)
    }

    /// The same set without the policy named `name`.
    pub fn without(&self, name: &str) -> PolicySet {
        PolicySet { policies: self.policies.iter().filter(|p| p.name != name).cloned().collect() }
    }

    /// Policy names, in evaluation order.
    pub fn names(&self) -> Vec<&str> {
        self.policies.iter().map(|p| p.name.as_str()).collect()
    }

    /// True when the set has no policy.
    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    /// Evaluates every policy on `input`, in order; the first that does not
    /// yield `true` refuses.
    pub fn evaluate(&self, input: &serde_json::Value) -> Result<(), Refused> {
        if self.policies.is_empty() {
            return Ok(());
        }
        let input = Value::from(input.clone());
        for p in &self.policies {
            p.check(&input)?;
        }
        Ok(())
    }

    fn embedded(names: &[&str]) -> PolicySet {
        let all = embedded_policies();
        PolicySet { policies: names.iter().filter_map(|n| all.iter().find(|p| p.name == *n).cloned()).collect() }
    }
}

/// The embedded policies, compiled once per process.
fn embedded_policies() -> &'static [Arc<Policy>] {
    static ALL: OnceLock<Vec<Arc<Policy>>> = OnceLock::new();
    ALL.get_or_init(|| {
        [
            ("tokens_valid", TOKENS_VALID),
            ("tokens_expired", TOKENS_EXPIRED),
            ("tokens_chained", TOKENS_CHAINED),
            ("prev_token_signed", PREV_TOKEN_SIGNED),
            ("next_token_signed", NEXT_TOKEN_SIGNED),
            ("client_allowed", CLIENT_ALLOWED),
        ]
        .into_iter()
        .map(|(name, src)| {
            let template = compile(&format!("{name}.rego"), src);
            if let Err(e) = &template {
                tracing::error!(policy = name, error = %e, "embedded policy does not compile; it will refuse everything");
            }
            Arc::new(Policy { name: name.to_string(), template })
        })
        .collect()
    })
}

/// An engine with the JWT extensions.
fn base_engine() -> Result<Engine, String> {
    let mut e = Engine::new();
    e.add_extension("io.jwt.decode".to_string(), 1, Box::new(ext_jwt_decode))
        .map_err(|err| format!("registering io.jwt.decode: {err}"))?;
    e.add_extension("io.jwt.verify_es256".to_string(), 2, Box::new(ext_jwt_verify_es256))
        .map_err(|err| format!("registering io.jwt.verify_es256: {err}"))?;
    Ok(e)
}

/// Parses `rego` (v1, then v0), checks it is `package nsm` with a `valid`
/// rule, and prepares it by evaluating once on an empty input.
fn compile(file: &str, rego: &str) -> Result<Engine, String> {
    let mut engine = base_engine()?;
    if let Err(v1) = engine.add_policy(file.to_string(), rego.to_string()) {
        engine = base_engine()?;
        engine.set_rego_v0(true);
        if let Err(v0) = engine.add_policy(file.to_string(), rego.to_string()) {
            return Err(format!("not valid Rego (v1: {v1:#}) (v0: {v0:#})"));
        }
    }
    let packages = engine.get_packages().map_err(|e| format!("{e:#}"))?;
    if !packages.iter().any(|p| p == "data.nsm") {
        return Err(format!("must be `package nsm`, found {packages:?}"));
    }
    engine.set_input(Value::new_object());
    match engine.eval_rule(QUERY.to_string()) {
        Ok(Value::Bool(_) | Value::Undefined) => Ok(engine),
        Ok(other) => Err(format!("`valid` must be a boolean, is {other}")),
        Err(e) => Err(format!("no usable rule `valid` (evaluating it on an empty input failed: {e:#})")),
    }
}

fn ext_jwt_decode(args: Vec<Value>) -> anyhow::Result<Value> {
    let Some(Value::String(token)) = args.first() else { return Ok(Value::Undefined) };
    Ok(match jwt::decode_parts(token) {
        Ok(p) => Value::from(vec![Value::from(p.header), Value::from(p.payload), Value::from(hex(&p.signature))]),
        Err(_) => Value::Undefined,
    })
}

fn ext_jwt_verify_es256(args: Vec<Value>) -> anyhow::Result<Value> {
    let (Some(Value::String(token)), Some(Value::String(pem))) = (args.first(), args.get(1)) else {
        return Ok(Value::from(false));
    };
    Ok(Value::from(jwt::verify_es256_pem(token, pem).is_ok()))
}

fn hex(b: &[u8]) -> String {
    const H: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(b.len() * 2);
    for x in b {
        s.push(H[(x >> 4) as usize] as char);
        s.push(H[(x & 15) as usize] as char);
    }
    s
}

#[cfg(test)]
pub(crate) mod tests {
    use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

    use serde_json::json;

    use super::*;
    use crate::security::Svid;
    use crate::security::jwt::testpki::TestPki;
    use crate::security::jwt::{Claims, cert_to_pem, sign_es256};

    fn now() -> i64 {
        SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
    }

    pub(crate) fn token(from: &Svid, to: &str, exp: i64) -> String {
        let aud = if to.is_empty() { vec![] } else { vec![to.to_string()] };
        sign_es256(&from.private_key_pkcs8, &Claims { sub: from.spiffe_id.clone(), aud, exp, iat: None }).unwrap()
    }

    /// nsc → nsmgr → nse, as the nse's server sees it (index 2, the last
    /// segment being its own token for its caller).
    struct Hops {
        nsc: Svid,
        nsmgr: Svid,
        nse: Svid,
    }

    impl Hops {
        fn new(pki: &TestPki) -> Hops {
            Hops {
                nsc: pki.svid("spiffe://test.local/nsc"),
                nsmgr: pki.svid("spiffe://test.local/nsmgr"),
                nse: pki.svid("spiffe://test.local/nse"),
            }
        }
        fn tokens(&self) -> Vec<String> {
            let exp = now() + 600;
            vec![
                token(&self.nsc, &self.nsmgr.spiffe_id, exp),
                token(&self.nsmgr, &self.nse.spiffe_id, exp),
                token(&self.nse, &self.nsmgr.spiffe_id, exp),
            ]
        }
        fn input(&self, tokens: &[String], index: usize, peer: &Svid) -> serde_json::Value {
            let segs: Vec<_> = tokens
                .iter()
                .enumerate()
                .map(|(i, t)| json!({"name": format!("hop{i}"), "id": format!("id{i}"), "token": t}))
                .collect();
            json!({"index": index, "path_segments": segs, "auth_info": {"certificate": cert_to_pem(&peer.cert_chain[0])}})
        }
    }

    fn denied_by(r: Result<(), Refused>) -> String {
        match r {
            Err(Refused::Denied(d)) => d.policy,
            other => panic!("expected a denial, got {other:?}"),
        }
    }

    #[test]
    fn embedded_policies_compile() {
        for p in embedded_policies() {
            assert!(p.template.is_ok(), "{}: {:?}", p.name, p.template.as_ref().err());
        }
        assert_eq!(
            PolicySet::server().names(),
            ["tokens_valid", "tokens_expired", "tokens_chained", "prev_token_signed"]
        );
        assert_eq!(PolicySet::client().names().last(), Some(&"next_token_signed"));
        assert_eq!(PolicySet::registry().names().last(), Some(&"client_allowed"));
    }

    #[test]
    fn valid_path_passes_server_and_client_sets() {
        let pki = TestPki::new();
        let h = Hops::new(&pki);
        let t = h.tokens();
        // The nse's server: caller nsmgr, index 2.
        PolicySet::server().evaluate(&h.input(&t, 2, &h.nsmgr)).unwrap();
        // The nsmgr's server sees the left side [0..=1] with nsc as peer.
        let left = [t[0].clone(), token(&h.nsmgr, &h.nsc.spiffe_id, now() + 600)];
        PolicySet::server().evaluate(&h.input(&left, 1, &h.nsc)).unwrap();
        // The nsmgr's client checks the returned path with the nse's cert.
        PolicySet::client().evaluate(&h.input(&t, 1, &h.nse)).unwrap();
        // Empty path: nothing to check for the common policies.
        PolicySet::embedded(&["tokens_valid", "tokens_expired", "tokens_chained"]).evaluate(&json!({})).unwrap();
    }

    #[test]
    fn each_bad_path_is_refused_by_the_right_policy() {
        let pki = TestPki::new();
        let h = Hops::new(&pki);
        let good = h.tokens();
        let set = PolicySet::server();

        let mut tampered = good.clone();
        tampered[1] = "not.a.jwt".into();
        assert_eq!(denied_by(set.evaluate(&h.input(&tampered, 2, &h.nsmgr))), "tokens_valid");
        let chained_only = PolicySet::embedded(&["tokens_chained"]);
        assert_eq!(denied_by(chained_only.evaluate(&h.input(&tampered, 2, &h.nsmgr))), "tokens_chained");

        let mut expired = good.clone();
        expired[0] = token(&h.nsc, &h.nsmgr.spiffe_id, now() - 1);
        assert_eq!(denied_by(set.evaluate(&h.input(&expired, 2, &h.nsmgr))), "tokens_expired");

        let mut unchained = good.clone();
        unchained[0] = token(&h.nsc, "spiffe://test.local/someone-else", now() + 600);
        assert_eq!(denied_by(set.evaluate(&h.input(&unchained, 2, &h.nsmgr))), "tokens_chained");

        // The caller's token is signed by someone else than the TLS peer.
        let mallory = pki.svid("spiffe://test.local/nsmgr");
        let mut forged = good.clone();
        forged[1] = token(&mallory, &h.nse.spiffe_id, now() + 600);
        assert_eq!(denied_by(set.evaluate(&h.input(&forged, 2, &h.nsmgr))), "prev_token_signed");
        // ... and with the right tokens but another peer certificate.
        assert_eq!(denied_by(set.evaluate(&h.input(&good, 2, &h.nsc))), "prev_token_signed");
        // index 0: no caller token at all.
        assert_eq!(denied_by(set.evaluate(&h.input(&good[..1], 0, &h.nsc))), "prev_token_signed");

        // Client side: the next hop's token not signed by the server cert.
        assert_eq!(denied_by(PolicySet::client().evaluate(&h.input(&good, 1, &h.nsc))), "next_token_signed");
    }

    #[test]
    fn aud_as_string_chains() {
        let pki = TestPki::new();
        let h = Hops::new(&pki);
        // A hand-made token whose aud is a plain string (RFC 7519 allows it).
        let raw = json!({"sub": h.nsc.spiffe_id, "aud": h.nsmgr.spiffe_id, "exp": now() + 60});
        let key = crate::security::jwt::SigningKey::from_pkcs8(&h.nsc.private_key_pkcs8).unwrap();
        let c: Claims = serde_json::from_value(raw).unwrap();
        let t0 = key.sign(&c).unwrap();
        let t = [t0, token(&h.nsmgr, &h.nsc.spiffe_id, now() + 60)];
        PolicySet::server().evaluate(&h.input(&t, 1, &h.nsc)).unwrap();
    }

    #[test]
    fn client_allowed_rules() {
        let set = PolicySet::embedded(&["client_allowed"]);
        let input = |id: &str, map: serde_json::Value| json!({"resource_id": id, "resource_name": "nse-1", "resource_path_ids_map": map});
        set.evaluate(&input("spiffe://a", json!({}))).unwrap();
        set.evaluate(&input("spiffe://a", json!({"nse-1": ["spiffe://a", "spiffe://mgr"]}))).unwrap();
        set.evaluate(&input("spiffe://a", json!({"other": ["spiffe://b"]}))).unwrap();
        assert_eq!(denied_by(set.evaluate(&input("spiffe://b", json!({"nse-1": ["spiffe://a"]})))), "client_allowed");
    }

    #[test]
    fn operator_files() {
        let dir = tempfile::tempdir().unwrap();
        let deny = dir.path().join("deny_label.rego");
        std::fs::write(&deny, "package nsm\n\ndefault valid := false\n\nvalid if not input.labels.color == \"red\"\n")
            .unwrap();
        // Upstream-style v0 syntax is accepted too.
        let v0 = dir.path().join("v0.rego");
        std::fs::write(&v0, "package nsm\n\ndefault valid = false\n\nvalid { input.index >= 0 }\n").unwrap();
        let set = PolicySet::empty().with_files(&[deny.clone(), v0]).unwrap();
        set.evaluate(&json!({"index": 0, "labels": {"color": "blue"}})).unwrap();
        let r = set.evaluate(&json!({"index": 0, "labels": {"color": "red"}}));
        assert_eq!(denied_by(r), deny.display().to_string());

        let bad = dir.path().join("bad.rego");
        std::fs::write(&bad, "package nsm\n\nvalid if {{{").unwrap();
        let e = PolicySet::empty().with_files(std::slice::from_ref(&bad)).unwrap_err();
        assert!(matches!(&e, PolicyError::Load { file, .. } if file.ends_with("bad.rego")), "{e}");
        let wrong = dir.path().join("wrong.rego");
        std::fs::write(&wrong, "package other\n\nvalid := true\n").unwrap();
        let e = PolicySet::empty().with_files(&[wrong]).unwrap_err();
        assert!(e.to_string().contains("package nsm"), "{e}");
        let norule = dir.path().join("norule.rego");
        std::fs::write(&norule, "package nsm\n\nallow := true\n").unwrap();
        assert!(PolicySet::empty().with_files(&[norule]).is_err());
        let missing = dir.path().join("missing.rego");
        let e = PolicySet::empty().with_files(&[missing]).unwrap_err();
        assert!(matches!(e, PolicyError::Read { .. }), "{e}");
        let nb = PolicySet::empty().with_source("nb.rego", "package nsm\n\nvalid := 3\n");
        assert!(nb.is_err(), "non-boolean valid is refused at load");
    }

    #[test]
    fn evaluation_errors_are_errors_not_denials() {
        // A non-boolean `valid` is an evaluation error, not a denial.
        let set =
            PolicySet::empty().with_source("num.rego", "package nsm\n\nvalid := x if { x := input.v }\n").unwrap();
        set.evaluate(&json!({"v": true})).unwrap();
        let e = set.evaluate(&json!({"v": 7})).unwrap_err();
        assert!(matches!(e, Refused::Error(PolicyError::Eval { ref policy, .. }) if policy == "num.rego"), "{e:?}");
        assert_eq!(e.to_status("x").code(), tonic::Code::Internal);
        let d = Refused::Denied(Denied { policy: "p".into() }).to_status("the request");
        assert_eq!(d.code(), tonic::Code::PermissionDenied);
        assert_eq!(d.message(), "no sufficient privileges: policy p denied the request");
    }

    /// Evaluation cost of the server set on a 3-hop path (printed; run with
    /// `--nocapture`). The bound is loose so a slow CI machine passes.
    #[test]
    fn evaluation_is_fast() {
        let pki = TestPki::new();
        let h = Hops::new(&pki);
        let input = h.input(&h.tokens(), 2, &h.nsmgr);
        let set = PolicySet::server();
        set.evaluate(&input).unwrap();
        let n = 200;
        let t0 = Instant::now();
        for _ in 0..n {
            set.evaluate(&input).unwrap();
        }
        let per = t0.elapsed() / n;
        // What a per-call engine clone costs.
        let p = &set.policies[0];
        let tpl = p.template.as_ref().unwrap();
        let t1 = Instant::now();
        for _ in 0..n {
            let _e = tpl.clone();
        }
        let clone = t1.elapsed() / n;
        let v = Value::from(input.clone());
        let each: Vec<String> = set
            .policies
            .iter()
            .map(|p| {
                let t = Instant::now();
                for _ in 0..n {
                    p.check(&v).unwrap();
                }
                format!("{} {:?}", p.name, t.elapsed() / n)
            })
            .collect();
        println!("policy evaluation (server set, 3 segments): {per:?} per request; engine clone: {clone:?}; {each:?}");
        assert!(per < Duration::from_millis(50), "{per:?}");
    }
}
