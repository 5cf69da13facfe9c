//! Tests of [`super`] (memory).

use std::collections::HashMap;

use futures::{Stream, StreamExt};
use nsm_api::registry::{Destination, Match, NetworkServiceLabels};

use super::*;
use crate::registry::{find_ns, find_nses};
use crate::testing::nse;

fn ctx() -> Context {
    Context::default()
}

fn labels(svc: &str, pairs: &[(&str, &str)]) -> HashMap<String, NetworkServiceLabels> {
    HashMap::from([(
        svc.to_string(),
        NetworkServiceLabels { labels: pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect() },
    )])
}

fn in_secs(s: u64) -> prost_types::Timestamp {
    token::to_timestamp(SystemTime::now() + Duration::from_secs(s))
}

async fn next_nse<S>(s: &mut S) -> (String, bool)
where
    S: Stream<Item = Result<NetworkServiceEndpointResponse, Status>> + Unpin,
{
    let r = tokio::time::timeout(Duration::from_secs(5), s.next()).await.unwrap().unwrap().unwrap();
    (r.network_service_endpoint.unwrap().name, r.deleted)
}

async fn nse_names(reg: &MemoryRegistry, q: NetworkServiceEndpoint) -> Vec<String> {
    let mut v: Vec<String> = find_nses(reg, &ctx(), q).await.unwrap().into_iter().map(|n| n.name).collect();
    v.sort();
    v
}

#[tokio::test]
async fn ns_register_defaults_payload_and_find_by_example() {
    let reg = MemoryRegistry::new();
    let a =
        NsRegistry::register(&reg, &ctx(), NetworkService { name: "a".into(), ..Default::default() }).await.unwrap();
    assert_eq!(a.payload, "IP");
    let m = vec![Match {
        routes: vec![Destination { destination_selector: HashMap::from([("x".into(), "1".into())]), weight: 0 }],
        ..Default::default()
    }];
    let b = NetworkService { name: "b".into(), payload: "ETHERNET".into(), matches: m.clone(), ..Default::default() };
    NsRegistry::register(&reg, &ctx(), b).await.unwrap();
    let names = |v: Vec<NetworkService>| {
        let mut n: Vec<String> = v.into_iter().map(|n| n.name).collect();
        n.sort();
        n
    };
    let q = |name: &str, payload: &str, matches: Vec<Match>| NetworkService {
        name: name.into(),
        payload: payload.into(),
        matches,
        ..Default::default()
    };
    let cases: Vec<(NetworkService, Vec<&str>)> = vec![
        (q("", "", vec![]), vec!["a", "b"]),
        (q("a", "", vec![]), vec!["a"]),
        (q("c", "", vec![]), vec![]),
        (q("", "IP", vec![]), vec!["a"]),
        (q("", "ETHERNET", vec![]), vec!["b"]),
        (q("a", "ETHERNET", vec![]), vec![]),
        (q("", "", m.clone()), vec!["b"]),
        (q("", "", vec![Match::default()]), vec![]),
    ];
    for (query, want) in cases {
        assert_eq!(names(find_ns(&reg, &ctx(), query.clone()).await.unwrap()), want, "{query:?}");
    }
    // Missing query object matches everything.
    let s = NsRegistry::find(&reg, &ctx(), NetworkServiceQuery { network_service: None, watch: false }).await.unwrap();
    assert_eq!(s.collect::<Vec<_>>().await.len(), 2);
    assert_eq!(
        NsRegistry::register(&reg, &ctx(), NetworkService::default()).await.unwrap_err().code(),
        tonic::Code::InvalidArgument
    );
    NsRegistry::unregister(&reg, &ctx(), q("a", "", vec![])).await.unwrap();
    NsRegistry::unregister(&reg, &ctx(), q("unknown", "", vec![])).await.unwrap();
    assert_eq!(reg.ns_len(), 1);
}

#[tokio::test]
async fn nse_find_semantics() {
    let reg = MemoryRegistry::new();
    let mut a = nse("a", &["s1", "s2"], "tcp://10.0.0.1:5001");
    a.network_service_labels = labels("s1", &[("app", "x"), ("nodeName", "n1")]);
    let exp = in_secs(3600);
    a.expiration_time = Some(exp);
    let b = nse("b", &["s1"], "unix:///var/lib/nse.sock");
    NseRegistry::register(&reg, &ctx(), a).await.unwrap();
    NseRegistry::register(&reg, &ctx(), b).await.unwrap();

    let q = NetworkServiceEndpoint::default;
    let cases: Vec<(NetworkServiceEndpoint, Vec<&str>)> = vec![
        (q(), vec!["a", "b"]),
        (NetworkServiceEndpoint { name: "a".into(), ..q() }, vec!["a"]),
        (NetworkServiceEndpoint { name: "zz".into(), ..q() }, vec![]),
        (NetworkServiceEndpoint { network_service_names: vec!["s1".into()], ..q() }, vec!["a", "b"]),
        (NetworkServiceEndpoint { network_service_names: vec!["s1".into(), "s2".into()], ..q() }, vec!["a"]),
        (NetworkServiceEndpoint { network_service_names: vec!["s3".into()], ..q() }, vec![]),
        (NetworkServiceEndpoint { network_service_labels: labels("s1", &[("app", "x")]), ..q() }, vec!["a"]),
        (NetworkServiceEndpoint { network_service_labels: labels("s1", &[]), ..q() }, vec!["a"]),
        (NetworkServiceEndpoint { network_service_labels: labels("s2", &[]), ..q() }, vec![]),
        (NetworkServiceEndpoint { network_service_labels: labels("s1", &[("app", "y")]), ..q() }, vec![]),
        (NetworkServiceEndpoint { url: "10.0.0.1".into(), ..q() }, vec!["a"]),
        (NetworkServiceEndpoint { url: "unix://".into(), ..q() }, vec!["b"]),
        (NetworkServiceEndpoint { url: "://".into(), ..q() }, vec!["a", "b"]),
        (
            NetworkServiceEndpoint {
                expiration_time: Some(prost_types::Timestamp { seconds: exp.seconds, nanos: 0 }),
                ..q()
            },
            vec!["a"],
        ),
        (NetworkServiceEndpoint { expiration_time: Some(in_secs(7200)), ..q() }, vec![]),
        // An NSE without expiration has "0 seconds", as in Go.
        (NetworkServiceEndpoint { expiration_time: Some(Default::default()), ..q() }, vec!["b"]),
    ];
    for (query, want) in cases {
        assert_eq!(nse_names(&reg, query.clone()).await, want, "{query:?}");
    }
    let s =
        NseRegistry::find(&reg, &ctx(), NetworkServiceEndpointQuery { network_service_endpoint: None, watch: false })
            .await
            .unwrap();
    assert_eq!(s.collect::<Vec<_>>().await.len(), 2);
}

#[tokio::test]
async fn nse_names_are_generated_and_unregister_unknown_is_ok() {
    let reg = MemoryRegistry::new();
    let a = NseRegistry::register(&reg, &ctx(), nse("", &["s"], "tcp://x:1")).await.unwrap();
    let b = NseRegistry::register(&reg, &ctx(), nse("", &["s"], "tcp://x:2")).await.unwrap();
    assert!(a.name.starts_with("nse-") && a.name.len() > 10, "{}", a.name);
    assert_ne!(a.name, b.name);
    assert!(a.initial_registration_time.is_some());
    assert_eq!(reg.nse_len(), 2);
    NseRegistry::unregister(&reg, &ctx(), nse("nope", &[], "")).await.unwrap();
    NseRegistry::unregister(&reg, &ctx(), a).await.unwrap();
    assert_eq!(reg.nse_len(), 1);
    // Extreme timestamps neither panic nor misbehave: either stored as
    // asked (far future: found; far past: expired at once) or refused
    // naming the endpoint.
    for (name, seconds, nanos, found) in [("far", i64::MAX, 999_999_999, true), ("past", i64::MIN, 0, false)] {
        let ts = prost_types::Timestamp { seconds, nanos };
        let e = NetworkServiceEndpoint { name: name.into(), expiration_time: Some(ts), ..Default::default() };
        match NseRegistry::register(&reg, &ctx(), e).await {
            Ok(_) => {
                let q = NetworkServiceEndpoint { name: name.into(), ..Default::default() };
                assert_eq!(nse_names(&reg, q).await.len(), usize::from(found), "{name}");
            }
            Err(e) => assert!(e.code() == tonic::Code::InvalidArgument && e.message().contains(name), "{e}"),
        }
    }
}

#[tokio::test(start_paused = true)]
async fn watch_sees_register_unregister_and_expiry() {
    let reg = MemoryRegistry::new();
    NseRegistry::register(&reg, &ctx(), nse("old", &["s"], "u")).await.unwrap();
    NseRegistry::register(&reg, &ctx(), nse("other-service", &["t"], "u")).await.unwrap();
    let q = NetworkServiceEndpointQuery {
        network_service_endpoint: Some(NetworkServiceEndpoint {
            network_service_names: vec!["s".into()],
            ..Default::default()
        }),
        watch: true,
    };
    let mut w = NseRegistry::find(&reg, &ctx(), q).await.unwrap();
    assert_eq!(next_nse(&mut w).await, ("old".into(), false), "snapshot first");
    assert_eq!(reg.watcher_count(), 1);

    NseRegistry::register(&reg, &ctx(), nse("t-only", &["t"], "u")).await.unwrap(); // filtered out
    NseRegistry::register(&reg, &ctx(), nse("new", &["s"], "u")).await.unwrap();
    assert_eq!(next_nse(&mut w).await, ("new".into(), false));
    NseRegistry::unregister(&reg, &ctx(), nse("new", &[], "")).await.unwrap();
    assert_eq!(next_nse(&mut w).await, ("new".into(), true));

    let mut e = nse("exp", &["s"], "u");
    e.expiration_time = Some(in_secs(10));
    NseRegistry::register(&reg, &ctx(), e).await.unwrap();
    assert_eq!(next_nse(&mut w).await, ("exp".into(), false));
    assert_eq!(reg.timer_count(), 1);
    tokio::time::sleep(Duration::from_secs(11)).await;
    assert_eq!(next_nse(&mut w).await, ("exp".into(), true));
    assert_eq!(reg.nse_len(), 3, "old, other-service, t-only");
    assert_eq!(reg.timer_count(), 0);

    // Non-watch find ends after the snapshot.
    let s = NseRegistry::find(&reg, &ctx(), NetworkServiceEndpointQuery::default()).await.unwrap();
    assert_eq!(s.collect::<Vec<_>>().await.len(), 3);

    drop(w);
    assert_eq!(reg.watcher_count(), 0, "dropping the stream frees the subscription");
}

#[tokio::test]
async fn ns_watch() {
    let reg = MemoryRegistry::new();
    let mut w =
        NsRegistry::find(&reg, &ctx(), NetworkServiceQuery { network_service: None, watch: true }).await.unwrap();
    NsRegistry::register(&reg, &ctx(), NetworkService { name: "a".into(), ..Default::default() }).await.unwrap();
    NsRegistry::unregister(&reg, &ctx(), NetworkService { name: "a".into(), ..Default::default() }).await.unwrap();
    let r = w.next().await.unwrap().unwrap();
    assert_eq!((r.network_service.unwrap().payload, r.deleted), ("IP".to_string(), false));
    let r = w.next().await.unwrap().unwrap();
    assert!(r.deleted);
}

#[tokio::test(start_paused = true)]
async fn reregister_keeps_initial_time_and_rearms_expiry() {
    let reg = MemoryRegistry::new();
    let mut e = nse("e", &["s"], "u");
    e.expiration_time = Some(in_secs(10));
    let first = NseRegistry::register(&reg, &ctx(), e.clone()).await.unwrap();
    let t0 = first.initial_registration_time.unwrap();

    tokio::time::sleep(Duration::from_secs(5)).await;
    // SystemTime does not move with the paused tokio clock: ask for 20 s
    // from "now" so the new deadline is 15 s after the old one.
    e.expiration_time = Some(in_secs(20));
    e.initial_registration_time = Some(in_secs(999));
    let second = NseRegistry::register(&reg, &ctx(), e.clone()).await.unwrap();
    assert_eq!(second.initial_registration_time.unwrap(), t0);
    assert_eq!(reg.timer_count(), 1, "old timer replaced, not added");

    tokio::time::sleep(Duration::from_secs(10)).await; // past the first deadline
    assert_eq!(nse_names(&reg, Default::default()).await, ["e"]);
    tokio::time::sleep(Duration::from_secs(11)).await; // past the second
    assert!(nse_names(&reg, Default::default()).await.is_empty());
    assert_eq!(reg.nse_len(), 0);

    // Re-registering without expiration disarms; unregister disarms.
    e.expiration_time = Some(in_secs(10));
    NseRegistry::register(&reg, &ctx(), e.clone()).await.unwrap();
    e.expiration_time = None;
    let third = NseRegistry::register(&reg, &ctx(), e.clone()).await.unwrap();
    assert_ne!(third.initial_registration_time.unwrap(), in_secs(999));
    assert_eq!(reg.timer_count(), 0);
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(reg.nse_len(), 1);

    // A registration that is already expired is not stored.
    e.expiration_time = Some(token::to_timestamp(SystemTime::now() - Duration::from_secs(1)));
    NseRegistry::register(&reg, &ctx(), e).await.unwrap();
    assert_eq!(reg.nse_len(), 0);
}

#[tokio::test]
async fn expired_entries_are_never_found_even_before_removal() {
    let reg = MemoryRegistry::new();
    {
        let mut st = reg.inner.lock();
        st.nses.insert(
            "stale".into(),
            NseEntry { nse: nse("stale", &["s"], "u"), deadline: Some(Instant::now()), generation: 1, timer: None },
        );
    }
    assert!(nse_names(&reg, Default::default()).await.is_empty());
    assert_eq!(reg.nse_len(), 1);
}

#[tokio::test]
async fn lagging_watcher_gets_resource_exhausted_then_ends() {
    let reg = MemoryRegistry::with_watch_buffer(4);
    let mut w =
        NseRegistry::find(&reg, &ctx(), NetworkServiceEndpointQuery { network_service_endpoint: None, watch: true })
            .await
            .unwrap();
    for i in 0..10 {
        NseRegistry::register(&reg, &ctx(), nse(&format!("n{i}"), &["s"], "u")).await.unwrap();
    }
    let e = w.next().await.unwrap().unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted);
    assert!(w.next().await.is_none());
    drop(w);
    assert_eq!(reg.watcher_count(), 0);
}

#[tokio::test]
async fn snapshot_and_stream_neither_miss_nor_duplicate() {
    let reg = MemoryRegistry::new();
    let writer = {
        let reg = reg.clone();
        tokio::spawn(async move {
            for i in 0..500 {
                NseRegistry::register(&reg, &ctx(), nse(&format!("n{i}"), &["s"], "u")).await.unwrap();
                if i % 50 == 0 {
                    tokio::task::yield_now().await;
                }
            }
        })
    };
    tokio::task::yield_now().await;
    let mut w =
        NseRegistry::find(&reg, &ctx(), NetworkServiceEndpointQuery { network_service_endpoint: None, watch: true })
            .await
            .unwrap();
    writer.await.unwrap();
    let mut seen = std::collections::HashSet::new();
    while seen.len() < 500 {
        let (name, deleted) = next_nse(&mut w).await;
        assert!(!deleted);
        assert!(seen.insert(name.clone()), "duplicate {name}");
    }
    assert!(tokio::time::timeout(Duration::from_millis(50), w.next()).await.is_err(), "nothing extra");
}

#[tokio::test(start_paused = true)]
async fn no_leaks_after_1000_cycles() {
    let reg = MemoryRegistry::new();
    let metrics = tokio::runtime::Handle::current().metrics();
    let baseline = metrics.num_alive_tasks();
    for i in 0..1000 {
        let mut e = nse(&format!("n{}", i % 7), &["s"], "u");
        e.expiration_time = Some(in_secs(60));
        let e = NseRegistry::register(&reg, &ctx(), e).await.unwrap();
        if i % 3 == 0 {
            // re-register: replaces the timer
            NseRegistry::register(&reg, &ctx(), e.clone()).await.unwrap();
        }
        NseRegistry::unregister(&reg, &ctx(), e).await.unwrap();
    }
    assert_eq!(reg.nse_len(), 0);
    assert_eq!(reg.timer_count(), 0);
    settle(&metrics, baseline).await;
    assert_eq!(metrics.num_alive_tasks(), baseline, "aborted timer tasks are gone");

    // Dropping the registry ends its timers too.
    let mut e = nse("x", &["s"], "u");
    e.expiration_time = Some(in_secs(60));
    NseRegistry::register(&reg, &ctx(), e).await.unwrap();
    assert_eq!(metrics.num_alive_tasks(), baseline + 1);
    drop(reg);
    settle(&metrics, baseline).await;
    assert_eq!(metrics.num_alive_tasks(), baseline);
}

/// Lets the scheduler reap aborted tasks (it handles a bounded number
/// per tick).
async fn settle(metrics: &tokio::runtime::RuntimeMetrics, baseline: usize) {
    for _ in 0..1000 {
        if metrics.num_alive_tasks() == baseline {
            return;
        }
        tokio::task::yield_now().await;
    }
}
