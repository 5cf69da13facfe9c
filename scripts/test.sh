#!/usr/bin/env bash
# The whole test suite, as CI runs it (as root): unit tests, wire-contract
# tests, and the namespace integration tests that start the real binaries in
# network namespaces. Fails if any test leaves a namespace behind.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then echo "test: run as root (namespace tests create netns and interfaces)" >&2; exit 1; fi
scripts/setup.sh
# The real Kubernetes API server (kube-apiserver, etcd, kubectl) the
# Kubernetes tests start; built from pinned Go modules on first use, cached.
NSM_KUBE_BIN_DIR=$(scripts/peers.sh kube | tail -n 1)
export NSM_KUBE_BIN_DIR
# The peers built on the upstream NSM Go sdk (nsm-go-nsc, nsm-go-nse) the
# interop tests run beside ours; built from peers/gosdk on first use, cached.
NSM_GOSDK_BIN_DIR=$(scripts/peers.sh gosdk | tail -n 1)
export NSM_GOSDK_BIN_DIR
# SPIRE (spire-server, spire-agent) for the tests that take their SVIDs from
# real SPIRE; built from the pinned module on first use (~12 min), cached.
NSM_SPIRE_BIN_DIR=$(scripts/peers.sh spire | tail -n 1)
export NSM_SPIRE_BIN_DIR
before=$(ip netns list 2>/dev/null | awk '{print $1}' | sort)
# The integration tests run the workspace binaries, so build them first.
cargo build --workspace --bins
cargo nextest run --workspace --no-fail-fast
cargo test --workspace --doc --quiet
after=$(ip netns list 2>/dev/null | awk '{print $1}' | sort)
leaked=$(comm -13 <(echo "$before") <(echo "$after") | grep -v '^$' || true)
if [ -n "$leaked" ]; then
  echo "test: namespaces left behind by the tests: $leaked" >&2
  exit 1
fi
echo "test: all passed, no namespaces left behind"
