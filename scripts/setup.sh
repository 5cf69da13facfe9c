#!/usr/bin/env bash
# Installs the system tools the lab and the tests use, if any is missing
# (Debian/Ubuntu; needs root). Safe to run repeatedly.
set -euo pipefail
need=()
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v ping >/dev/null 2>&1 || need+=(iputils-ping)
command -v setpriv >/dev/null 2>&1 || need+=(util-linux)
command -v pkill >/dev/null 2>&1 || need+=(procps)
command -v nsenter >/dev/null 2>&1 || need+=(util-linux)
command -v python3 >/dev/null 2>&1 || need+=(python3 python3-pip)
command -v wg >/dev/null 2>&1 || need+=(wireguard-tools)
command -v wireguard-go >/dev/null 2>&1 || need+=(wireguard-go)
command -v iperf3 >/dev/null 2>&1 || need+=(iperf3)
if [ ${#need[@]} -gt 0 ]; then
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "setup: missing tools (${need[*]}) and no apt-get to install them" >&2
    exit 1
  fi
  echo "setup: installing ${need[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need[@]}" >/dev/null
fi
if ! python3 -c "import grpc, grpc_tools" >/dev/null 2>&1; then
  # The third-party-client test generates a Python gRPC client from api/proto.
  echo "setup: installing grpcio and grpcio-tools (pip)" >&2
  python3 -m pip install --quiet --disable-pip-version-check grpcio grpcio-tools ||
    python3 -m pip install --quiet --disable-pip-version-check --break-system-packages grpcio grpcio-tools
fi
if ! cargo nextest --version >/dev/null 2>&1; then
  echo "setup: installing cargo-nextest" >&2
  cargo install cargo-nextest --locked
fi
