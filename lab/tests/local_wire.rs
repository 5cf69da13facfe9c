//! Namespace integration tests on one node: the real binaries (registry,
//! nsmgr, forwarder, icmp-responder, nsc) run in real network namespaces and
//! connect over real veth pairs. Needs root (CI runs as root); each test has
//! its own lab prefix, so tests run in parallel, and the lab removes every
//! namespace and process when the test ends, also on failure.
#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::time::Duration;

use nix::sys::signal::Signal;
use nsm_lab::Lab;
use nsm_lab::mesh::{self, ICMP, NodeOpts, connections, eventually, ip_of, links, nsc_init, ping};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_ping_refresh_close() {
    let (mut lab, node, nse) = mesh::single_node("basic", &NodeOpts::default(), "172.16.1.100/31").await;
    let client = lab.add_netns("nsc1").unwrap();

    // Request: nsm-1 with the endpoint's addresses, both ways.
    let run = nsc_init(&lab, &node, &client, ICMP, &[]).unwrap();
    assert!(run.ok, "nsc init failed: {}\n{}", run.stderr, lab.log_tail(&node.forwarder_name, 20));
    let s = &run.summaries[0];
    assert_eq!(s.interface, "nsm-1");
    assert_eq!(s.src_ips, ["172.16.1.101/32"]);
    assert_eq!(s.dst_ips, ["172.16.1.100/32"]);
    assert_eq!(s.path, ["nsc", "nsmgr-node1", "forwarder-node1", "nse1"]);
    assert_eq!(s.nse, "nse1");
    assert_eq!(links(&lab, &client).unwrap(), ["nsm-1"]);
    let nse_links = links(&lab, &nse.netns).unwrap();
    assert_eq!(nse_links.len(), 1, "one veth end in the endpoint pod: {nse_links:?}");
    let (ok, out) = ping(&lab, &client, "nsm-1", "172.16.1.100", 2).unwrap();
    assert!(ok, "client -> endpoint: {out}");
    let (ok, out) = ping(&lab, &nse.netns, &nse_links[0], "172.16.1.101", 2).unwrap();
    assert!(ok, "endpoint -> client: {out}");
    // Routes: a link route to the peer on each side.
    let r = lab.exec(&client, &["ip", "route", "show", "dev", "nsm-1"], Duration::from_secs(5)).unwrap();
    assert!(String::from_utf8_lossy(&r.stdout).contains("172.16.1.100"), "client route to the endpoint");
    let ifindex = |lab: &Lab| {
        let o = lab.exec(&client, &["cat", "/sys/class/net/nsm-1/ifindex"], Duration::from_secs(5)).unwrap();
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    };
    let before = ifindex(&lab);

    // Refresh: a sidecar with the same name adopts and re-requests the same
    // connection; the interface stays the same (same ifindex).
    mesh::spawn_nsc_sidecar(
        &mut lab,
        "sidecar",
        &node,
        &client,
        ICMP,
        &[
            // Tokens of 2 s: the sidecar refreshes every ~400 ms.
            ("NSM_MAX_TOKEN_LIFETIME", "2s".into()),
        ],
    )
    .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(lab.running("sidecar"), "sidecar died: {}", lab.log_tail("sidecar", 20));
    assert!(lab.log_tail("sidecar", 50).contains("adopting"), "sidecar did not adopt: {}", lab.log_tail("sidecar", 20));
    assert_eq!(ifindex(&lab), before, "refresh must keep the interface");
    assert_eq!(links(&lab, &client).unwrap(), ["nsm-1"]);
    let (ok, out) = ping(&lab, &client, "nsm-1", "172.16.1.100", 2).unwrap();
    assert!(ok, "after refresh: {out}");
    assert_eq!(connections(&lab, &node.nsmgr_url).await.unwrap().len(), 1, "one connection at the nsmgr");

    // Close: SIGTERM to the sidecar closes; both ends and all state go.
    lab.stop("sidecar", Duration::from_secs(5)).unwrap();
    assert!(links(&lab, &client).unwrap().is_empty(), "client end removed");
    assert!(links(&lab, &nse.netns).unwrap().is_empty(), "endpoint end removed");
    for u in [&node.nsmgr_url, &node.forwarder_url, &nse.url] {
        assert!(connections(&lab, u).await.unwrap().is_empty(), "{u} still reports connections");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_clients() {
    let (mut lab, node, nse) =
        mesh::single_node("fifty", &NodeOpts { log_level: "WARN".into(), ..Default::default() }, "10.100.0.0/16").await;
    let n = 50;
    let pods: Vec<String> = (0..n).map(|i| lab.add_netns(&format!("c{i}")).unwrap()).collect();
    let mut handles = vec![];
    for (i, pod) in pods.iter().enumerate() {
        let mut cmd = std::process::Command::new("setpriv");
        cmd.args(["--pdeathsig", "KILL", "ip", "netns", "exec", pod])
            .arg(lab.bin("nsc"))
            .arg("init")
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .envs(mesh::nsc_env(&lab, &node, ICMP))
            .env("NSM_NAME", format!("client{i}"))
            .env("NSM_OUTPUT", "json")
            .env("NSM_LOG_LEVEL", "WARN")
            .env("NSM_REQUEST_TIMEOUT", "60s");
        handles.push(std::thread::spawn(move || nsm_lab::env::output_with_timeout(cmd, Duration::from_secs(90))));
    }
    let mut addrs = HashSet::new();
    for (i, h) in handles.into_iter().enumerate() {
        let out = h.join().unwrap().unwrap();
        assert!(out.status.success(), "client {i}: {}", String::from_utf8_lossy(&out.stderr));
        let s: mesh::NscSummary = serde_json::from_slice(out.stdout.split(|b| *b == b'\n').next().unwrap()).unwrap();
        assert_eq!(s.interface, "nsm-1");
        assert!(addrs.insert(s.src_ips[0].clone()), "address {} handed out twice", s.src_ips[0]);
        assert!(addrs.insert(s.dst_ips[0].clone()), "address {} handed out twice", s.dst_ips[0]);
    }
    // Every wire works: ping from every pod (in parallel).
    let lab_ref = &lab;
    std::thread::scope(|sc| {
        let hs: Vec<_> = pods
            .iter()
            .map(|pod| {
                sc.spawn(move || {
                    let r = lab_ref
                        .exec(pod, &["ip", "-o", "-4", "route", "show", "dev", "nsm-1"], Duration::from_secs(5))
                        .unwrap();
                    let route = String::from_utf8_lossy(&r.stdout).to_string();
                    let dst = route.split_whitespace().next().unwrap_or_default().to_string();
                    let (ok, out) = ping(lab_ref, pod, "nsm-1", &ip_of(&dst), 1).unwrap();
                    assert!(ok, "{pod}: ping {dst} failed: {out}");
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
    });
    assert_eq!(links(&lab, &nse.netns).unwrap().len(), n, "one veth end per client in the endpoint pod");
    assert_eq!(connections(&lab, &node.nsmgr_url).await.unwrap().len(), n);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unhappy_paths_have_clear_errors_and_leave_nothing() {
    let mut lab = mesh::test_lab("unhap");
    let node = mesh::start_node(&mut lab, "node1", &NodeOpts { expire_period: "3s".into(), ..Default::default() })
        .await
        .unwrap();
    let nse = mesh::start_nse(
        &mut lab,
        &node,
        "nse1",
        "icmp-responder",
        "172.16.1.100/31",
        &[("NSM_LABELS", "color:blue".into())],
    )
    .await
    .unwrap();
    let client = lab.add_netns("nsc1").unwrap();
    let fail = |lab: &Lab, nsurl: &str, extra: &[(&str, String)]| {
        let r = nsc_init(lab, &node, &client, nsurl, extra).unwrap();
        assert!(!r.ok, "{nsurl} must fail");
        r
    };

    // Unknown network service.
    let r = fail(&lab, "kernel://no-such-service/nsm-1", &[]);
    assert_eq!(r.code, Some(1));
    assert!(r.stderr.contains("no-such-service") && r.stderr.contains("not registered"), "{}", r.stderr);

    // No endpoint matching the selectors (the service asks for color=red).
    let reg = lab.registry(&node.nsmgr_url, Duration::from_secs(1));
    let ns = nsm_api::registry::NetworkService {
        name: "picky".into(),
        payload: "ETHERNET".into(),
        matches: vec![nsm_api::registry::Match {
            routes: vec![nsm_api::registry::Destination {
                destination_selector: [("color".to_string(), "red".to_string())].into(),
                weight: 0,
            }],
            ..Default::default()
        }],
        ..Default::default()
    };
    nsm_sdk::registry::NsRegistry::register(
        &reg,
        &nsm_sdk::networkservice::Context::with_timeout(Duration::from_secs(2)),
        ns,
    )
    .await
    .unwrap();
    let r = fail(&lab, "kernel://picky/nsm-1", &[]);
    assert!(r.stderr.contains("has no registered endpoints") || r.stderr.contains("matches"), "{}", r.stderr);

    // Malformed NSURL: a configuration error, exit 64, nothing requested.
    let r = fail(&lab, "kernel:/icmp-responder", &[]);
    assert_eq!(r.code, Some(64), "configuration errors exit 64: {r:?}");
    assert!(r.stderr.contains("kernel:/icmp-responder"), "{}", r.stderr);

    // Interface name over 15 characters.
    let r = fail(&lab, "kernel://icmp-responder/abcdefghijklmnop", &[]);
    assert!(r.stderr.contains("abcdefghijklmnop") && r.stderr.contains("15"), "{}", r.stderr);

    // Nothing was built by any of these.
    assert!(links(&lab, &client).unwrap().is_empty());
    assert!(links(&lab, &nse.netns).unwrap().is_empty());
    assert!(connections(&lab, &node.nsmgr_url).await.unwrap().is_empty());
    assert!(connections(&lab, &node.forwarder_url).await.unwrap().is_empty());

    // A connection id another client owns: client A connects; client B (its
    // own pod) re-requests A's connection with A's full path.
    let ok = nsc_init(&lab, &node, &client, ICMP, &[("NSM_NAME", "owner".into())]).unwrap();
    assert!(ok.ok, "{}", ok.stderr);
    let conns = connections(&lab, &node.nsmgr_url).await.unwrap();
    assert_eq!(conns.len(), 1);
    let intruder = lab.add_netns("intruder").unwrap();
    let stolen = serde_json::to_string(
        &conns[0].path.as_ref().unwrap().path_segments.iter().map(|s| (&s.name, &s.id)).collect::<Vec<_>>(),
    )
    .unwrap();
    let r = lab
        .run_once(
            &intruder,
            "nsc",
            // `run` mode adopts a connection with the same name: it finds the
            // owner's connection and re-requests it with the full path.
            &["run"],
            &[
                ("NSM_NAME", "owner".into()),
                ("NSM_CONNECT_TO", node.nsmgr_url.to_string()),
                ("NSM_NETWORK_SERVICES", ICMP.into()),
                ("NSM_REQUEST_TIMEOUT", "5s".into()),
                nsm_lab::identity::env(&lab, &node).remove(0),
            ],
            Duration::from_secs(30),
        )
        .unwrap();
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(!r.status.success(), "the intruder must not get the connection ({stolen})");
    assert!(err.contains("belongs to a client in netns"), "{err}");
    assert!(links(&lab, &intruder).unwrap().is_empty(), "nothing built in the intruder's pod");
    assert_eq!(links(&lab, &client).unwrap(), ["nsm-1"], "the owner's wire is untouched");

    // Endpoint killed before the Request: its registration is still there,
    // the request fails clearly, and nothing is left half built.
    let c2 = lab.add_netns("nsc2").unwrap();
    lab.signal("nse1", Signal::SIGKILL).unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let r =
        nsc_init(&lab, &node, &c2, ICMP, &[("NSM_NAME", "nsc2".into()), ("NSM_REQUEST_TIMEOUT", "2s".into())]).unwrap();
    assert!(!r.ok);
    assert!(r.stderr.contains("nse1") && r.stderr.contains("Unavailable"), "{}", r.stderr);
    assert!(links(&lab, &c2).unwrap().is_empty());
    assert_eq!(connections(&lab, &node.nsmgr_url).await.unwrap().len(), 1, "only the owner's connection");
    // The dead endpoint's registration expires (NSM_EXPIRE_PERIOD=3s).
    let reg2 = reg.clone();
    eventually("dead endpoint unregistered by expiry", Duration::from_secs(8), move || {
        let reg = reg2.clone();
        async move {
            let ctx = nsm_sdk::networkservice::Context::with_timeout(Duration::from_secs(2));
            let q = nsm_api::registry::NetworkServiceEndpoint { name: "nse1".into(), ..Default::default() };
            Ok(nsm_sdk::registry::find_nses(&reg, &ctx, q).await?.is_empty())
        }
    })
    .await;
}
