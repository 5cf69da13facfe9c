//! The chains every server and passthrough is built from (upstream
//! `sdk:pkg/networkservice/chains/endpoint` and `chains/client`). This is
//! the one place that states the order of the common elements; the daemons
//! (nsmgr, forwarder, endpoints) only add what is theirs after it.
//!
//! # The endpoint prefix ([`Endpoint::new`])
//! Every NetworkService server runs, in this order ([`PREFIX`]):
//!
//! | # | element | why here |
//! |---|---|---|
//! | 1 | `updatepath` | gives the call this hop's path segment and connection id; everything below keys on that id |
//! | 2 | `begin` | serialises Requests/Closes per id, tells a refresh from a first Request, owns the connection's origin |
//! | 3 | `updatetoken` | records the caller's token and expiry in its segment, mints ours |
//! | 4 | `authorize` | the server policies over the path up to this hop; a refused call stops here, before any per-connection state |
//! | 5 | `metadata` | per-connection storage for the elements below |
//! | 6 | `timeout` | closes the connection when the caller's token expires without a refresh |
//! | 7 | `monitor` | publishes UPDATE/DELETE (DOWN on a failed refresh) to MonitorConnections |
//! | 8 | `trimpath` | an endpoint returns the path only up to itself; a passthrough keeps the rest |
//!
//! then the daemon's *additional functionality* (upstream's term), in the
//! order it passes them. The MonitorConnection service of the same server
//! is [`Endpoint::monitor`].
//!
//! # The passthrough client ([`passthrough_client`])
//! The client chain a passthrough's `connect` runs towards the next hop:
//! `updatepath` (the same name as the server side, so the hop keeps one
//! path segment) → `trimpath` client (marks the call as passing through) →
//! `authorize` client (the client policies over the returned path) → the
//! gRPC tail, which dials `ctx.client_url`.

use std::sync::Arc;
use std::time::Duration;

use super::authorize::{AuthorizeClient, AuthorizeServer};
use super::begin::Begin;
use super::chain::{Chain, Element};
use super::connect::GrpcClient;
use super::metadata::Metadata;
use super::monitor::MonitorServer;
use super::timeout::Timeout;
use super::trimpath::TrimPath;
use super::updatepath::UpdatePath;
use super::updatetoken::UpdateToken;
use crate::tools::daemon::Security;
use crate::tools::grpc::ChannelPool;

/// Names of the endpoint prefix, in chain order.
pub const PREFIX: [&str; 8] =
    ["updatepath", "begin", "updatetoken", "authorize", "metadata", "timeout", "monitor", "trimpath"];

/// A server chain: the endpoint prefix plus the daemon's own elements, and
/// the state the daemon serves beside it.
pub struct Endpoint {
    /// The whole chain, to serve with [`super::server::ChainServer`].
    pub chain: Chain,
    /// The MonitorConnections server fed by the chain's `monitor`.
    pub monitor: MonitorServer,
    /// Per-connection storage (the forwarder's orphan sweep adopts into it).
    pub metadata: Arc<Metadata>,
    /// The connections this hop knows (leak checks).
    pub begin: Arc<Begin>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint").field("chain", &self.chain).finish_non_exhaustive()
    }
}

/// Options of [`Endpoint::with`].
#[derive(Default)]
pub struct Options {
    /// The `begin` to use (default [`Begin::new`]; the forwarder passes
    /// [`Begin::passing_unknown_closes`] so Closes from before a restart
    /// still reach its wires).
    pub begin: Option<Arc<Begin>>,
}

impl Endpoint {
    /// The endpoint prefix for a hop called `name` (its path segment name),
    /// with `sec`'s tokens, server policies and monitor scope, connections
    /// timing out `max_token_lifetime` after their caller's token when the
    /// caller sends no expiry, followed by `additional`.
    pub fn new(
        name: &str,
        sec: &Security,
        max_token_lifetime: Duration,
        additional: Vec<Arc<dyn Element>>,
    ) -> Endpoint {
        Endpoint::with(name, sec, max_token_lifetime, Options::default(), additional)
    }

    /// [`Endpoint::new`] with [`Options`].
    pub fn with(
        name: &str,
        sec: &Security,
        max_token_lifetime: Duration,
        opts: Options,
        additional: Vec<Arc<dyn Element>>,
    ) -> Endpoint {
        let begin = opts.begin.unwrap_or_default();
        let metadata = Metadata::new();
        let monitor = sec.monitor();
        let mut elems: Vec<Arc<dyn Element>> = vec![
            UpdatePath::new(name),
            begin.clone(),
            UpdateToken::new(sec.tokens.clone()),
            AuthorizeServer::new(sec.server.clone()),
            metadata.clone(),
            Timeout::new(max_token_lifetime),
            monitor.element(),
            TrimPath::server(),
        ];
        elems.extend(additional);
        Endpoint { chain: Chain::new(elems), monitor, metadata, begin }
    }
}

/// The client chain of a passthrough hop called `name` (see the module
/// docs), dialing through `pool` and sending `sec`'s tokens.
pub fn passthrough_client(name: &str, sec: &Security, pool: ChannelPool) -> Chain {
    Chain::new(vec![
        UpdatePath::new(name),
        TrimPath::client(),
        AuthorizeClient::new(sec.client.clone()),
        GrpcClient::new(pool, sec.tokens.clone()),
    ])
}

/// The element names that a daemon's module docs list for its chain: the
/// backticked words of the paragraph following the heading `# The Request
/// chain`, except intra-doc links (`` [`x`] ``), with the word `prefix`
/// standing for [`PREFIX`]. Lets each daemon test that its docs say what
/// its code builds.
pub fn documented_chain(src: &str) -> Vec<String> {
    let mut out = vec![];
    let mut inside = false;
    for line in src.lines() {
        let Some(doc) = line.trim_start().strip_prefix("//!") else {
            if inside {
                break;
            }
            continue;
        };
        let doc = doc.trim();
        if doc.starts_with('#') {
            if inside {
                break;
            }
            inside = doc == "# The Request chain";
            continue;
        }
        if !inside {
            continue;
        }
        if doc.is_empty() {
            if out.is_empty() {
                continue;
            }
            break;
        }
        let parts: Vec<&str> = doc.split('`').collect();
        for (i, part) in parts.iter().enumerate() {
            if i % 2 == 1 && !parts[i - 1].ends_with('[') {
                if *part == "prefix" {
                    out.extend(PREFIX.iter().map(|s| s.to_string()));
                } else {
                    out.push((*part).to_string());
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prefix_is_built_in_the_documented_order() {
        let sec = Security::insecure(Duration::from_secs(60));
        let e = Endpoint::new("x", &sec, Duration::from_secs(60), vec![]);
        assert_eq!(e.chain.names(), PREFIX);
        // The module docs' table lists the same order.
        let src = include_str!("chains.rs");
        let table: Vec<&str> = src
            .lines()
            .filter_map(|l| l.strip_prefix("//! | ")?.split(" | ").nth(1))
            .filter_map(|c| c.strip_prefix('`')?.strip_suffix('`'))
            .collect();
        assert_eq!(table, PREFIX);
        let c = passthrough_client("x", &sec, ChannelPool::new(Duration::from_secs(1)));
        assert_eq!(c.names(), ["updatepath", "trimpath-client", "authorize-client", "grpc-client"]);
    }

    #[test]
    fn documented_chains_are_read_from_module_docs() {
        let src = "//! intro\n//!\n//! # The Request chain\n//! The `prefix` ([`chains`]), then\n//! `a` → `b`.\n//!\n//! `c` is not part of it\n";
        let mut want: Vec<String> = PREFIX.iter().map(|s| s.to_string()).collect();
        want.extend(["a".to_string(), "b".to_string()]);
        assert_eq!(documented_chain(src), want);
        assert!(documented_chain("//! # Other\n//! `a`\n").is_empty());
    }
}
