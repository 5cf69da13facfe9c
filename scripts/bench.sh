#!/usr/bin/env bash
# Builds the workspace in release mode and runs the benchmark (as root):
# throughput over veth, VXLAN, our userspace WireGuard and wireguard-go, and
# connection setup latency; writes BENCHMARKS-latest.md. Extra arguments go
# to `nsm-lab bench` (e.g. --seconds 5 --connections 100).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then echo "bench: run as root (it creates network namespaces)" >&2; exit 1; fi
scripts/setup.sh
need=()
command -v iperf3 >/dev/null 2>&1 || need+=(iperf3)
command -v wg >/dev/null 2>&1 || need+=(wireguard-tools)
command -v wireguard-go >/dev/null 2>&1 || need+=(wireguard-go)
if [ ${#need[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq "${need[@]}" >/dev/null
fi
cargo build --release --workspace --bins --quiet
exec target/release/nsm-lab --prefix nsmbench bench --output BENCHMARKS-latest.md "$@"
