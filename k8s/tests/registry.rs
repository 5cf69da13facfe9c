//! The registry on a real kube-apiserver ([`K8sRegistry`], the store behind
//! `nsm-registry-k8s`): records are custom resources, Find follows the API
//! server's watch, expiry deletes, restarts and replicas share one state,
//! a compacted watch re-lists, an unreachable API server is `Unavailable`.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, SystemTime};

use futures::StreamExt;
use kube::api::{Api, PostParams};
use nsm_api::registry::{
    NetworkService, NetworkServiceEndpoint, NetworkServiceEndpointQuery, NetworkServiceEndpointResponse,
    NetworkServiceQuery,
};
use nsm_k8s::registry::K8sRegistry;
use nsm_k8s::registry::cache::WatchOptions;
use nsm_k8s::testing::{ApiServer, ApiServerOpts, eventually_async};
use nsm_sdk::networkservice::Context;
use nsm_sdk::registry::{NsRegistry, NseRegistry, NseStream, find_ns, find_nses};
use nsm_sdk::testing::output_text;
use nsm_sdk::tools::token;

const NS: &str = "nsm-system";

fn ctx() -> Context {
    Context::with_timeout(Duration::from_secs(10))
}

fn nse(name: &str, service: &str, url: &str, lives: Duration) -> NetworkServiceEndpoint {
    NetworkServiceEndpoint {
        expiration_time: Some(token::to_timestamp(SystemTime::now() + lives)),
        ..nsm_sdk::testing::nse(name, &[service], url)
    }
}

async fn watch_all(reg: &K8sRegistry) -> NseStream {
    let q = NetworkServiceEndpointQuery { network_service_endpoint: Some(Default::default()), watch: true };
    NseRegistry::find(reg, &ctx(), q).await.unwrap()
}

/// The next event of `s` (within 10 s) as (name, url, deleted).
async fn next(s: &mut NseStream) -> (String, String, bool) {
    let r: NetworkServiceEndpointResponse =
        tokio::time::timeout(Duration::from_secs(10), s.next()).await.expect("an event in 10 s").unwrap().unwrap();
    let e = r.network_service_endpoint.unwrap();
    (e.name, e.url, r.deleted)
}

async fn all(reg: &K8sRegistry) -> Vec<NetworkServiceEndpoint> {
    find_nses(reg, &ctx(), Default::default()).await.unwrap()
}

/// The endpoint names kubectl lists in every namespace.
fn kubectl_nses(k: &ApiServer) -> String {
    output_text(&k.kubectl(&["get", "nse", "-A", "-o", "jsonpath={.items[*].metadata.name}"], "")).trim().to_string()
}

async fn start(k: &ApiServer) -> K8sRegistry {
    K8sRegistry::start(k.client(), NS, WatchOptions::default())
}

#[tokio::test]
async fn register_find_watch_unregister_are_objects_of_the_api_server() {
    let k = ApiServer::start().await;
    k.create_namespace(NS).await;
    let reg = start(&k).await;
    let mut w = watch_all(&reg).await;

    // An empty name is generated, returned and stored.
    let stored = NseRegistry::register(&reg, &ctx(), nse("", "icmp", "tcp://10.0.0.1:5001", Duration::from_secs(60)))
        .await
        .unwrap();
    assert!(stored.name.starts_with("nse-"), "{}", stored.name);
    assert_eq!(next(&mut w).await, (stored.name.clone(), "tcp://10.0.0.1:5001".into(), false));
    let url = output_text(&k.kubectl(&["get", "nse", "-n", NS, &stored.name, "-o", "jsonpath={.spec.url}"], ""));
    assert_eq!(url.trim(), "tcp://10.0.0.1:5001");
    let first = stored.initial_registration_time.unwrap();

    // Re-registering updates the object and keeps the first registration time.
    let again =
        NetworkServiceEndpoint { url: "tcp://10.0.0.2:5001".into(), initial_registration_time: None, ..stored.clone() };
    let updated = NseRegistry::register(&reg, &ctx(), again).await.unwrap();
    assert_eq!(updated.initial_registration_time.unwrap(), first);
    assert_eq!(next(&mut w).await, (stored.name.clone(), "tcp://10.0.0.2:5001".into(), false));

    // Find by example.
    let by_service = |s: &str| NetworkServiceEndpoint { network_service_names: vec![s.into()], ..Default::default() };
    assert_eq!(find_nses(&reg, &ctx(), by_service("icmp")).await.unwrap().len(), 1);
    assert!(find_nses(&reg, &ctx(), by_service("other")).await.unwrap().is_empty());

    // Unregister deletes the object; the watch says so.
    NseRegistry::unregister(&reg, &ctx(), updated.clone()).await.unwrap();
    assert_eq!(next(&mut w).await, (stored.name.clone(), "tcp://10.0.0.2:5001".into(), true));
    assert_eq!(kubectl_nses(&k), "");
    NseRegistry::unregister(&reg, &ctx(), updated).await.expect("unknown is Ok");

    // Services: generated name, payload defaults to IP.
    let ns = NsRegistry::register(&reg, &ctx(), NetworkService::default()).await.unwrap();
    assert!(ns.name.starts_with("netsvc-") && ns.payload == "IP", "{ns:?}");
    let got = output_text(&k.kubectl(&["get", "netsvc", "-n", NS, &ns.name, "-o", "jsonpath={.spec.payload}"], ""));
    assert_eq!(got.trim(), "IP");
    NsRegistry::unregister(&reg, &ctx(), ns).await.unwrap();
    drop(w);
    assert!(eventually_async(Duration::from_secs(5), || async { reg.watchers() == 0 }).await, "watch released");
}

#[tokio::test]
async fn a_name_kubernetes_cannot_hold_is_refused_before_anything_is_written() {
    let k = ApiServer::start().await;
    k.create_namespace(NS).await;
    let reg = start(&k).await;
    let err =
        NseRegistry::register(&reg, &ctx(), nse("My_NSE", "icmp", "tcp://10.0.0.1:5001", Duration::from_secs(60)))
            .await
            .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("\"My_NSE\"") && err.message().contains("DNS-1123"), "{}", err.message());
    assert_eq!(kubectl_nses(&k), "");
}

#[tokio::test]
async fn a_network_service_applied_with_kubectl_anywhere_is_served_and_followed() {
    let k = ApiServer::start().await;
    k.create_namespace(NS).await;
    let reg = start(&k).await;
    let q = NetworkServiceQuery { network_service: Some(Default::default()), watch: true };
    let mut w = NsRegistry::find(&reg, &ctx(), q).await.unwrap();
    // No spec.name: the object's name is the service's (upstream reads it so).
    k.apply(
        "apiVersion: networkservicemesh.io/v1\nkind: NetworkService\nmetadata: {name: vpn, namespace: default}\n\
         spec:\n  payload: ETHERNET\n  matches:\n  - source_selector: {app: client}\n    routes:\n    \
         - destination_selector: {app: gateway}\n",
    );
    let ev = tokio::time::timeout(Duration::from_secs(10), w.next()).await.unwrap().unwrap().unwrap();
    let got = ev.network_service.unwrap();
    assert_eq!((got.name.as_str(), got.payload.as_str(), ev.deleted), ("vpn", "ETHERNET", false));
    let found = find_ns(&reg, &ctx(), NetworkService { name: "vpn".into(), ..Default::default() }).await.unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].matches[0].source_selector["app"], "client");
    assert_eq!(found[0].matches[0].routes[0].destination_selector["app"], "gateway");
    nsm_sdk::testing::ok_output(&k.kubectl(&["delete", "netsvc", "-n", "default", "vpn"], ""));
    let ev = tokio::time::timeout(Duration::from_secs(10), w.next()).await.unwrap().unwrap().unwrap();
    assert!(ev.deleted && ev.network_service.unwrap().name == "vpn");
}

#[tokio::test]
async fn expired_endpoints_are_deleted_in_every_namespace() {
    let k = ApiServer::start().await;
    k.create_namespace(NS).await;
    let reg = start(&k).await;
    let mut w = watch_all(&reg).await;
    NseRegistry::register(&reg, &ctx(), nse("short", "icmp", "tcp://10.0.0.1:5001", Duration::from_secs(1)))
        .await
        .unwrap();
    NseRegistry::register(&reg, &ctx(), nse("long", "icmp", "tcp://10.0.0.2:5001", Duration::from_secs(600)))
        .await
        .unwrap();
    // Written by someone else, elsewhere, already expired.
    k.apply(
        "apiVersion: networkservicemesh.io/v1\nkind: NetworkServiceEndpoint\nmetadata: {name: stale, namespace: default}\n\
         spec: {name: stale, network_service_names: [icmp], url: 'tcp://10.0.0.3:5001', expiration_time: {seconds: 1000}}\n",
    );
    // Both expired ones are deleted, each announced on the watch.
    let mut deleted = vec![];
    while deleted.len() < 2 {
        let (name, _, gone) = next(&mut w).await;
        if gone {
            deleted.push(name);
        }
    }
    deleted.sort();
    assert_eq!(deleted, ["short", "stale"]);
    assert!(
        eventually_async(Duration::from_secs(10), || async { kubectl_nses(&k) == "long" }).await,
        "left: {}",
        kubectl_nses(&k)
    );
    let live: Vec<String> = all(&reg).await.into_iter().map(|e| e.name).collect();
    assert_eq!(live, ["long"]);
}

#[tokio::test]
async fn a_restarted_registry_and_a_second_replica_see_the_same_records() {
    let k = ApiServer::start().await;
    k.create_namespace(NS).await;
    let first = start(&k).await;
    let a =
        NseRegistry::register(&first, &ctx(), nse("nse-a", "icmp", "tcp://10.0.0.1:5001", Duration::from_secs(600)))
            .await
            .unwrap();
    NsRegistry::register(&first, &ctx(), NetworkService { name: "icmp".into(), ..Default::default() }).await.unwrap();
    drop(first);

    // A restart: a new process state, nothing lost.
    let restarted = start(&k).await;
    let got = all(&restarted).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].initial_registration_time, a.initial_registration_time);
    assert_eq!(find_ns(&restarted, &ctx(), Default::default()).await.unwrap()[0].name, "icmp");

    // A second replica beside it: each sees the other's writes.
    let replica = start(&k).await;
    let mut w = watch_all(&replica).await;
    assert_eq!(next(&mut w).await, ("nse-a".into(), "tcp://10.0.0.1:5001".into(), false), "the snapshot");
    NseRegistry::register(&restarted, &ctx(), nse("nse-b", "icmp", "tcp://10.0.0.2:5001", Duration::from_secs(600)))
        .await
        .unwrap();
    assert_eq!(next(&mut w).await, ("nse-b".into(), "tcp://10.0.0.2:5001".into(), false));
    NseRegistry::unregister(&replica, &ctx(), a).await.unwrap();
    assert!(
        eventually_async(Duration::from_secs(10), || async { all(&restarted).await.len() == 1 }).await,
        "the first replica saw the other's unregister"
    );

    // Both replicas updating one endpoint at once: both succeed (conflicts
    // are retried), one version wins, in both caches.
    let (c1, c2) = (ctx(), ctx());
    let (r1, r2) = tokio::join!(
        NseRegistry::register(&restarted, &c1, nse("nse-c", "icmp", "tcp://10.0.0.3:5001", Duration::from_secs(600))),
        NseRegistry::register(&replica, &c2, nse("nse-c", "icmp", "tcp://10.0.0.4:5001", Duration::from_secs(600))),
    );
    r1.unwrap();
    r2.unwrap();
    let url_of = |reg: K8sRegistry| async move {
        all(&reg).await.into_iter().find(|e| e.name == "nse-c").map(|e| e.url).unwrap_or_default()
    };
    assert!(
        eventually_async(Duration::from_secs(10), || async {
            let (u1, u2) = (url_of(restarted.clone()).await, url_of(replica.clone()).await);
            !u1.is_empty() && u1 == u2
        })
        .await
    );
}

#[tokio::test]
async fn a_watch_survives_etcd_compaction_by_re_listing() {
    // Watch cache off: the API server asks etcd, which answers a watch
    // from a compacted revision with 410 Gone.
    let k = ApiServer::start_with(ApiServerOpts { watch_cache: false, ..Default::default() }).await;
    k.create_namespace(NS).await;
    let opts = WatchOptions { timeout: Duration::from_secs(1), retry: Duration::from_millis(100) };
    let reg = K8sRegistry::start(k.client(), NS, opts);
    let mut w = watch_all(&reg).await;
    NseRegistry::register(&reg, &ctx(), nse("before", "icmp", "tcp://10.0.0.1:5001", Duration::from_secs(600)))
        .await
        .unwrap();
    assert_eq!(next(&mut w).await.0, "before");
    // Watches of 1 s end and resume from the last resourceVersion: no
    // re-list while the history is there.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(reg.lists(), (1, 1), "resumed, not re-listed");
    // Other objects move etcd's revision on; compaction drops the history
    // the registry's next watch would resume from.
    let cms: Api<k8s_openapi::api::core::v1::ConfigMap> = Api::namespaced(k.client(), "default");
    for i in 0..3 {
        let cm = serde_json::from_value(serde_json::json!({"metadata": {"name": format!("cm-{i}")}})).unwrap();
        cms.create(&PostParams::default(), &cm).await.unwrap();
    }
    k.compact_etcd().await;
    assert!(
        eventually_async(Duration::from_secs(15), || async { reg.lists().1 >= 2 }).await,
        "the endpoint watch re-listed after 410 (lists: {:?})",
        reg.lists()
    );
    // The open Find watch goes on: a registration by another writer arrives.
    k.apply(
        "apiVersion: networkservicemesh.io/v1\nkind: NetworkServiceEndpoint\nmetadata: {name: after, namespace: nsm-system}\n\
         spec: {name: after, network_service_names: [icmp], url: 'tcp://10.0.0.2:5001'}\n",
    );
    assert_eq!(next(&mut w).await, ("after".into(), "tcp://10.0.0.2:5001".into(), false));
    assert_eq!(all(&reg).await.len(), 2);
}

#[tokio::test]
async fn an_unreachable_api_server_is_unavailable_and_nothing_is_half_written() {
    let mut k = ApiServer::start().await;
    k.create_namespace(NS).await;
    let reg = start(&k).await;
    assert!(all(&reg).await.is_empty());
    k.stop_apiserver();
    let err =
        NseRegistry::register(&reg, &ctx(), nse("nse-a", "icmp", "tcp://10.0.0.1:5001", Duration::from_secs(600)))
            .await
            .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(err.message().contains("Kubernetes API server"), "{}", err.message());
    let err = NsRegistry::register(&reg, &ctx(), NetworkService { name: "icmp".into(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    k.start_apiserver().await;
    assert_eq!(kubectl_nses(&k), "");
    let left = output_text(&k.kubectl(&["get", "netsvc", "-A", "-o", "name"], ""));
    assert_eq!(left.trim(), "");
    // And it works again once the API server is back.
    NseRegistry::register(&reg, &ctx(), nse("nse-a", "icmp", "tcp://10.0.0.1:5001", Duration::from_secs(600)))
        .await
        .unwrap();
    assert_eq!(kubectl_nses(&k), "nse-a");
}
