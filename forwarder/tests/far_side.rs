//! The client side of a remote wire against a far side that answers badly
//! (no `dst_ip`, a bad key, a VNI out of range, a type it was not offered):
//! a clear `InvalidArgument`/`Internal` naming the problem, the far side is
//! told to Close, and nothing is built or held (no interface, no port, no
//! VNI). Runs the forwarder's own `xconnect` element in a throwaway "node"
//! namespace, so nothing could ever land in the host's network.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use nsm_api::connection::{Connection, Mechanism, Path, PathSegment};
use nsm_api::networkservice::NetworkServiceRequest;
use nsm_forwarder::alloc::PortPool;
use nsm_forwarder::remote::{MechanismKind, Remote, RemoteConfig};
use nsm_forwarder::xconnect::XConnect;
use nsm_sdk::networkservice::begin::Begin;
use nsm_sdk::networkservice::metadata::Metadata;
use nsm_sdk::networkservice::{Chain, ConnResult, Context, Element, Next};
use nsm_sdk::testing::netns::TestNetns;
use nsm_sdk::tools::netns::NetnsHandle;
use tonic::Status;

/// Builds the far side's answer from the offers.
type Answer = Box<dyn Fn(&[Mechanism]) -> Mechanism + Send + Sync>;

/// A far side that answers with `answer(offers)` and records Closes.
struct FarSide {
    answer: Answer,
    closes: Mutex<u32>,
}

#[async_trait]
impl Element for FarSide {
    async fn request(&self, _ctx: &mut Context, req: NetworkServiceRequest, _next: Next) -> ConnResult {
        let mut c = req.connection.clone().unwrap_or_default();
        c.mechanism = Some((self.answer)(&req.mechanism_preferences));
        Ok(c)
    }
    async fn close(&self, _ctx: &mut Context, _conn: Connection, _next: Next) -> Result<(), Status> {
        *self.closes.lock().unwrap() += 1;
        Ok(())
    }
}

fn answer(t: &str, params: &[(&str, &str)]) -> Answer {
    let t = t.to_string();
    let params: HashMap<String, String> = params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    Box::new(move |offers: &[Mechanism]| {
        let mut m = offers.iter().find(|o| o.r#type == t).cloned().unwrap_or_else(|| Mechanism {
            cls: "REMOTE".into(),
            r#type: t.clone(),
            parameters: HashMap::new(),
        });
        for (k, v) in &params {
            if v.is_empty() {
                m.parameters.remove(k);
            } else {
                m.parameters.insert(k.clone(), v.clone());
            }
        }
        m
    })
}

/// Runs `f` on a thread inside `ns` with its own runtime (the forwarder's
/// node netns is the netns of the thread that creates things).
fn in_netns<T: Send + 'static>(ns: &NetnsHandle, f: impl std::future::Future<Output = T> + Send + 'static) -> T {
    let ns = ns.clone();
    std::thread::spawn(move || {
        nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(f)
    })
    .join()
    .unwrap()
}

#[test]
fn bad_answers_from_the_far_side_build_nothing() {
    let node = TestNetns::new("farnode");
    let pod = TestNetns::new("farpod");
    node.exec(&["ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p"]);
    node.exec(&["ip", "addr", "add", "10.77.7.1/24", "dev", "eth0"]);
    node.exec(&["ip", "link", "set", "eth0", "up"]);
    let key = "K9JdWl8DdvNAAt1BVhsbb7lw+ytPQhJAHu2u/IGyp2E=";
    let cases: Vec<(&str, Answer, &str)> = vec![
        ("IP", answer("WIREGUARD", &[("dst_port", "51820"), ("dst_public_key", key)]), "no dst_ip"),
        (
            "IP",
            answer("WIREGUARD", &[("dst_ip", "10.77.7.2"), ("dst_port", "51820"), ("dst_public_key", "short")]),
            "dst_public_key",
        ),
        ("IP", answer("WIREGUARD", &[("dst_ip", "10.77.7.2"), ("dst_port", "0"), ("dst_public_key", key)]), "dst_port"),
        ("ETHERNET", answer("VXLAN", &[("dst_ip", "10.77.7.2"), ("dst_port", "4789"), ("vni", "16777216")]), "vni"),
        ("ETHERNET", answer("VXLAN", &[("dst_ip", "10.77.7.2"), ("dst_port", "4789")]), "no vni"),
        ("ETHERNET", answer("WIREGUARD", &[("dst_ip", "10.77.7.2"), ("dst_port", "1")]), "not offered"),
        (
            "ETHERNET",
            answer("VXLAN", &[("dst_ip", "10.77.7.2"), ("dst_port", "4789"), ("vni", "7"), ("MTU", "99")]),
            "MTU",
        ),
    ];
    let pod_inode = pod.handle().inode().to_string();
    let node_h = node.handle().clone();
    in_netns(&node_h, async move {
        let remote = Remote::new(
            RemoteConfig {
                tunnel_ip: "10.77.7.1".parse().unwrap(),
                vxlan_port: 4789,
                priority: vec![MechanismKind::Wireguard, MechanismKind::Vxlan],
                keepalive: 10,
                underlay_mtu: 1500,
            },
            NetnsHandle::current().unwrap(),
            Some(Arc::new(nsm_forwarder::wireguard::Userspace)),
            PortPool::new(51820, 51829),
        );
        for (payload, ans, what) in cases {
            let far = Arc::new(FarSide { answer: ans, closes: Mutex::new(0) });
            let chain = Chain::new(vec![
                Begin::new(),
                Metadata::new(),
                XConnect::new("fwd-test", Some(remote.clone())),
                far.clone(),
            ]);
            let req = NetworkServiceRequest {
                connection: Some(Connection {
                    id: "c1".into(),
                    network_service: "svc".into(),
                    payload: payload.into(),
                    path: Some(Path {
                        index: 0,
                        path_segments: vec![PathSegment { name: "x".into(), id: "c1".into(), ..Default::default() }],
                    }),
                    ..Default::default()
                }),
                mechanism_preferences: vec![Mechanism {
                    cls: "LOCAL".into(),
                    r#type: "KERNEL".into(),
                    parameters: HashMap::from([
                        ("name".into(), "nsm-1".into()),
                        ("netnsInode".into(), pod_inode.clone()),
                    ]),
                }],
            };
            let mut ctx = Context::default();
            ctx.client_url = Some(nsm_sdk::tools::grpc::parse_url("tcp://10.77.7.2:5001").unwrap());
            let e = chain.request(&mut ctx, req).await.unwrap_err();
            assert!(matches!(e.code(), tonic::Code::InvalidArgument | tonic::Code::Internal), "{what}: {e:?}");
            assert!(e.message().contains(what), "{what:?} not in {:?}", e.message());
            assert_eq!(*far.closes.lock().unwrap(), 1, "{what}: the far side must be told to close");
            assert_eq!(remote.leases(), (0, 0), "{what}: ports/VNIs still held");
        }
    });
    let left = pod.exec(&["ip", "-o", "link", "show"]);
    let left = String::from_utf8_lossy(&left.stdout);
    assert!(!left.contains("nsm-1"), "nothing may be built in the pod: {left}");
    let node_links = node.exec(&["ip", "-o", "link", "show"]);
    let node_links = String::from_utf8_lossy(&node_links.stdout);
    assert!(!node_links.contains("nsmvx") && !node_links.contains("nsmwg"), "{node_links}");
}
