//! The local lab: network namespaces stand in for nodes and pods, the real
//! binaries run inside them with the same `NSM_*` configuration as in
//! Kubernetes. It is the demo (`nsm-lab`), the integration test bed
//! (`lab/tests/`) and, later, the benchmark rig.
//!
//! # Layout
//! - [`env`](mod@env): namespaces, processes, state directory, teardown.
//! - [`mesh`]: nodes, endpoints, clients and queries built on [`env`](mod@env).
//! - [`cluster`]: multi-node, multi-cluster topologies.
//! - [`gopeers`]: peers built on the upstream NSM Go sdk, run beside ours.
//! - [`demo`]: the scenario `nsm-lab run` shows.
//! - [`bench`](mod@bench): throughput and setup latency (`nsm-lab bench`).

/// `println!` that ignores a closed stdout (`nsm-lab | head`): the lab must
/// reach its teardown, not panic on a broken pipe.
#[macro_export]
macro_rules! say {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let mut o = std::io::stdout();
        let _ = writeln!(o, $($t)*);
    }};
}

/// `print!` + flush that ignores a closed stdout.
#[macro_export]
macro_rules! say_part {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let mut o = std::io::stdout();
        let _ = write!(o, $($t)*);
        let _ = o.flush();
    }};
}

pub mod bench;
pub mod cluster;
pub mod demo;
pub mod env;
pub mod gopeers;
pub mod identity;
pub mod mesh;

pub use env::{Lab, default_bin_dir, down};
