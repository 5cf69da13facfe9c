#!/usr/bin/env bash
# Builds the workspace and runs the local lab demo (as root):
#   scripts/lab.sh            run the demo and tear down
#   scripts/lab.sh run --keep leave it running;  scripts/lab.sh down  removes it
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then echo "lab: run as root (it creates network namespaces)" >&2; exit 1; fi
scripts/setup.sh
cargo build --workspace --bins --quiet
exec target/debug/nsm-lab "$@"
