//! How the forwarder finds a client's network namespace, and address
//! families — with the real binaries in real namespaces (root).
#![allow(clippy::unwrap_used)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nsm_lab::env::output_with_timeout;
use nsm_lab::mesh::{self, ICMP, NodeOpts, NscSummary, connections, eventually, wait_until};

/// A Kubernetes-style pod sandbox: a "pause" process that holds a fresh
/// network namespace (in its own PID namespace). The namespace is not
/// bind-mounted anywhere: it exists only as /proc/<pid>/ns/net. Killed on
/// drop.
struct Pause {
    child: Child,
}

impl Pause {
    fn start() -> Pause {
        let child = Command::new("unshare")
            .args(["--net", "--pid", "--fork", "--kill-child", "sleep", "300"])
            .stdin(Stdio::null())
            .spawn()
            .expect("unshare");
        // Wait until the namespace differs from ours.
        let me = std::fs::read_link("/proc/self/ns/net").unwrap();
        let t0 = Instant::now();
        while std::fs::read_link(format!("/proc/{}/ns/net", child.id())).ok().as_ref() == Some(&me) {
            assert!(t0.elapsed() < Duration::from_secs(5), "pause never entered its namespace");
            std::thread::sleep(Duration::from_millis(10));
        }
        Pause { child }
    }

    fn netns_path(&self) -> String {
        format!("/proc/{}/ns/net", self.child.id())
    }

    /// Runs `args` inside the pod's network namespace.
    fn exec(&self, args: &[&str]) -> std::process::Output {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.netns_path())).arg("--").args(args);
        output_with_timeout(c, Duration::from_secs(30)).unwrap()
    }

    fn links(&self) -> Vec<String> {
        let out = self.exec(&["ip", "-o", "link", "show"]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap_or(n).to_string())
            .filter(|n| n != "lo")
            .collect()
    }
}

impl Drop for Pause {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_container_in_own_pid_namespace_that_exits() {
    let (lab, node, _nse) = mesh::single_node("initc", &NodeOpts::default(), "172.16.3.0/31").await;
    let pod = Pause::start();

    // The client runs in the pod's netns but in its *own* PID namespace, so
    // the /proc/<pid>/ns/net URL it sends means nothing to the forwarder
    // (its pid there is 1): the forwarder must find the netns by inode, here
    // only reachable through the pause process. The client exits right after.
    let mut c = Command::new("nsenter");
    c.arg(format!("--net={}", pod.netns_path()))
        .args(["--", "unshare", "--pid", "--fork", "--mount-proc"])
        .arg(lab.bin("nsc"))
        .arg("init")
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs(mesh::nsc_env(&lab, &node, ICMP))
        .env("NSM_NAME", "initc")
        .env("NSM_OUTPUT", "json")
        .env("NSM_LOG_LEVEL", "WARN")
        // Nobody refreshes after the init container exits: the mesh must
        // close the connection when this token expires.
        .env("NSM_MAX_TOKEN_LIFETIME", "3s");
    let out = output_with_timeout(c, Duration::from_secs(30)).unwrap();
    assert!(
        out.status.success(),
        "nsc init: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        lab.log_tail(&node.forwarder_name, 20)
    );
    let s: NscSummary = serde_json::from_slice(out.stdout.split(|b| *b == b'\n').next().unwrap()).unwrap();
    assert_eq!(pod.links(), ["nsm-1"], "interface in the pod's netns");
    let ping = pod.exec(&["ping", "-c", "1", "-W", "2", "-I", "nsm-1", s.dst_ips[0].split('/').next().unwrap()]);
    assert!(ping.status.success(), "{}", String::from_utf8_lossy(&ping.stdout));

    // The client is gone; its token expires; the nsmgr closes the connection
    // down the path and the forwarder removes the interface from a netns
    // whose client process no longer exists.
    wait_until(
        Duration::from_secs(10),
        || pod.links().is_empty(),
        || "interface not removed after the token expired".into(),
    )
    .await;
    // The nsmgr forgets the connection once the Close it sent has returned.
    let forgotten = || async { Ok(connections(&lab, &node.nsmgr_url).await?.is_empty()) };
    eventually("the nsmgr forgets the connection", Duration::from_secs(5), forgotten).await;
    assert!(connections(&lab, &node.forwarder_url).await.unwrap().is_empty());
    assert!(lab.log_tail(&node.nsmgr_name, 50).contains("token expired"), "nsmgr log should say why it closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dual_stack_addresses_and_ipv6_without_dad() {
    let (mut lab, node, nse) = mesh::single_node("dual", &NodeOpts::default(), "10.60.0.0/24,fd00:60::/64").await;
    let client = lab.add_netns("nsc1").unwrap();
    let run = mesh::nsc_init(&lab, &node, &client, ICMP, &[]).unwrap();
    assert!(run.ok, "{}", run.stderr);
    let s = &run.summaries[0];
    let v6: Vec<_> = s.dst_ips.iter().filter(|a| a.contains(':')).collect();
    assert_eq!(s.dst_ips.len(), 2, "one address per family: {:?}", s.dst_ips);
    assert_eq!(s.src_ips.len(), 2, "{:?}", s.src_ips);
    assert!(v6[0].ends_with("/128"));
    // No DAD: usable at once, no `tentative` flag.
    // (The kernel's own fe80:: link-local address still does DAD; ours not.)
    let a = lab
        .exec(&client, &["ip", "-6", "-o", "addr", "show", "dev", "nsm-1", "scope", "global"], Duration::from_secs(5))
        .unwrap();
    let a = String::from_utf8_lossy(&a.stdout);
    assert!(a.contains(s.src_ips.iter().find(|x| x.contains(':')).unwrap().as_str()), "{a}");
    assert!(!a.contains("tentative"), "{a}");
    assert!(a.contains("nodad"), "{a}");
    let dst6 = v6[0].split('/').next().unwrap();
    let (ok, out) = mesh::ping(&lab, &client, "nsm-1", dst6, 1).unwrap();
    assert!(ok, "ping6: {out}");
    let dst4 = s.dst_ips.iter().find(|a| !a.contains(':')).unwrap().split('/').next().unwrap().to_string();
    let (ok, out) = mesh::ping(&lab, &client, "nsm-1", &dst4, 1).unwrap();
    assert!(ok, "ping: {out}");
    drop(nse);
}
