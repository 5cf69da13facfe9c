#!/usr/bin/env bash
# Builds the real upstream programs ("peers") that integration tests run against, from their
# Go modules at pinned versions, into a cache directory outside the repo, and prints where
# they are:
#   scripts/peers.sh kube    kube-apiserver and kubectl (k8s.io/kubernetes) and etcd (go.etcd.io/etcd)
#   scripts/peers.sh gosdk   nsm-go-nsc and nsm-go-nse: this repo's peers/gosdk mains around the
#                            upstream NSM Go sdk (github.com/networkservicemesh/sdk, pinned in
#                            peers/gosdk/go.mod); rebuilt when their source changes
#   scripts/peers.sh spire   spire-server and spire-agent (github.com/spiffe/spire)
#   scripts/peers.sh list    the peer groups, their pinned versions and cache directories
# The last line on stdout is the directory that holds the group's binaries; progress goes to
# stderr. Cache: ${NSM_PEERS_DIR:-/var/cache/nsm-rs/peers}/<name>-<version>/. A group whose
# binaries are there already returns at once; remove its directory to rebuild it.
#
# Needs go (1.26) and the Go module proxy. Each build runs in a throwaway module in a temporary
# directory (removed afterwards) under nice -n 19; upstream source only ever lands in the Go
# module cache, never in the repo. A cold build of `kube` took about 8 minutes on 2 cores
# (shared with a cargo build); it fills the Go module cache (~0.7 GB) and build cache (~3 GB).
#
# Adding a peer group: pin its version below, write a build_<group> function that puts its
# binaries into the directory given as $1 (see go_peer_module, go_peer_get, go_peer_build),
# and add a case to main and a line to `list` at the bottom.
set -euo pipefail

# --- pinned versions --------------------------------------------------------------------------
KUBE_VERSION=v1.37.2 # k8s.io/kubernetes, cmd/kube-apiserver; staging modules at v0.37.2
ETCD_VERSION=v3.7.3  # go.etcd.io/etcd/server/v3 (kubernetes v1.37.2 uses the v3.7 client)
# The NSM Go sdk is pinned in peers/gosdk/go.mod (and go.sum). The proxy serves no module of the
# upstream commands (github.com/networkservicemesh/cmd-nsc, cmd-nse-icmp-responder, cmd-nsmgr:
# 403 for every version tried, 2026-12), nor sdk v1.15.x with its api v1.15.0; sdk and api
# v1.14.5 are served.
SPIRE_VERSION=v1.13.3 # github.com/spiffe/spire (served without a version list: exact version only)
GOSDK_DIR="$(cd "$(dirname "$0")/.." && pwd)/peers/gosdk"

PEERS_DIR=${NSM_PEERS_DIR:-/var/cache/nsm-rs/peers}

log() { echo "peers: $*" >&2; }
die() {
  log "error: $*"
  exit 1
}

# --- temporary directories, removed on exit ---------------------------------------------------
TMP_DIRS=()
cleanup() {
  local d
  for d in "${TMP_DIRS[@]+"${TMP_DIRS[@]}"}"; do
    [ -n "$d" ] && [ -d "$d" ] && { chmod -R u+w "$d" 2>/dev/null || true; rm -rf "$d"; }
  done
  return 0
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- go helpers -------------------------------------------------------------------------------
# Runs go at the lowest CPU (and, where allowed, I/O) priority: builds share the machine.
NICE=(nice -n 19)
if command -v ionice >/dev/null 2>&1 && ionice -c 3 true 2>/dev/null; then
  NICE+=(ionice -c 3)
fi
gocmd() { GOWORK=off CGO_ENABLED=0 "${NICE[@]}" go "$@"; }

# go_peer_module DIR NAME : creates an empty throwaway Go module in DIR.
go_peer_module() {
  mkdir -p "$1"
  (cd "$1" && gocmd mod init "nsm-peers.invalid/$2" >/dev/null 2>&1) || die "go mod init in $1 failed"
}

# go_peer_build MODDIR OUT PKG [LDFLAGS...] : builds PKG within the module in MODDIR to OUT.
go_peer_build() {
  local dir=$1 out=$2 pkg=$3
  shift 3
  log "building $pkg -> $(basename "$out") (go build under nice -n 19)"
  (cd "$dir" && gocmd build -trimpath -ldflags "-s -w $*" -o "$out" "$pkg") || die "go build $pkg failed"
}

# go_peer_get MODDIR ARG... : go get in the module in MODDIR; its output is shown if it fails.
go_peer_get() {
  local dir=$1
  shift
  log "go get $* (downloads modules)"
  (cd "$dir" && gocmd get "$@" >"$dir/get.log" 2>&1) || {
    grep -v '^go: downloading' "$dir/get.log" >&2 || true
    die "go get $* failed"
  }
}

# module_gomod MODDIR MODULE@VERSION : downloads a module, prints the path of its go.mod.
module_gomod() {
  local json gomod
  json=$(cd "$1" && gocmd mod download -json "$2") || die "go mod download $2 failed"
  gomod=$(printf '%s\n' "$json" | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",\{0,1\}$/\1/p')
  [ -f "$gomod" ] || die "no go.mod for $2 in: $json"
  echo "$gomod"
}

# --- the cache --------------------------------------------------------------------------------
have_bins() {
  local d=$1 b
  shift
  for b in "$@"; do [ -x "$d/$b" ] || return 1; done
}

# ensure_group NAME VERSION BUILD_FN BIN... : makes sure $PEERS_DIR/NAME-VERSION holds every
# BIN, running BUILD_FN STAGING_DIR to build them if not, and prints that directory.
ensure_group() {
  local name=$1 version=$2 build_fn=$3
  shift 3
  local dest="$PEERS_DIR/$name-$version"
  if have_bins "$dest" "$@"; then
    log "$name $version: cached"
    echo "$dest"
    return 0
  fi
  mkdir -p "$PEERS_DIR" || die "cannot create $PEERS_DIR (set NSM_PEERS_DIR)"
  # One build per group at a time, also across concurrent callers (parallel test runs).
  local lock="$PEERS_DIR/.$name-$version.lock"
  exec 9>"$lock"
  if command -v flock >/dev/null 2>&1; then
    flock -n 9 || {
      log "$name $version: another build is running, waiting for it"
      flock 9
    }
  fi
  if have_bins "$dest" "$@"; then
    log "$name $version: cached"
    echo "$dest"
    return 0
  fi
  command -v go >/dev/null 2>&1 || die "go is not installed"
  local work
  work=$(mktemp -d "${TMPDIR:-/tmp}/nsm-peers-$name.XXXXXX")
  TMP_DIRS+=("$work")
  mkdir -p "$work/out"
  local start=$SECONDS
  log "$name $version: building in $work ($(go version))"
  "$build_fn" "$work/out" "$work"
  have_bins "$work/out" "$@" || die "$name: build did not produce all of: $*"
  # Install: copy next to the destination, then rename, so no half-filled directory is ever seen.
  local stage="$dest.partial.$$"
  rm -rf "$stage" "$dest"
  mkdir -p "$stage"
  cp -p "$work/out/"* "$stage/"
  mv -T "$stage" "$dest"
  log "$name $version: built in $((SECONDS - start)) s into $dest"
  for b in "$@"; do log "  $b $(du -h "$dest/$b" | cut -f1)"; done
  echo "$dest"
}

# --- group: kube (kube-apiserver + etcd) -------------------------------------------------------
# build_kube OUT WORK
build_kube() {
  local out=$1 work=$2
  # Resolve both modules first (quick), so a version that is not served fails before the
  # long kube-apiserver build.
  prepare_kube_apiserver "$work/kube-apiserver"
  prepare_etcd "$work/etcd"
  build_kube_apiserver "$out" "$work/kube-apiserver"
  go_peer_build "$work/kube-apiserver" "$out/kubectl" k8s.io/kubernetes/cmd/kubectl "${KUBE_LDFLAGS[@]}"
  go_peer_build "$work/etcd" "$out/etcd" go.etcd.io/etcd/server/v3
  {
    echo "k8s.io/kubernetes $KUBE_VERSION (cmd/kube-apiserver, cmd/kubectl)"
    echo "go.etcd.io/etcd/server/v3 $ETCD_VERSION"
    echo "built with $(go version) on $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  } >"$out/VERSIONS"
}

prepare_kube_apiserver() {
  local dir=$1
  local staging="v0.${KUBE_VERSION#v1.}" # v1.37.2 -> v0.37.2
  go_peer_module "$dir" kube-apiserver
  log "downloading k8s.io/kubernetes@$KUBE_VERSION"
  local gomod
  gomod=$(module_gomod "$dir" "k8s.io/kubernetes@$KUBE_VERSION")
  # kubernetes' go.mod requires its staging modules (k8s.io/api, apimachinery, apiserver, ...)
  # at v0.0.0 and replaces them with ./staging/...; those replaces do not apply to a module
  # that depends on kubernetes, so the wrapper points each one at its published release.
  local staged
  staged=$(gocmd mod edit -json "$gomod" | awk '
    /"Require":/ { inreq = 1 }
    /"(Exclude|Replace|Retract|Tool|Ignore)":/ { inreq = 0 }
    inreq && /"Path":/ { p = $2; gsub(/[",]/, "", p) }
    inreq && /"Version": "v0\.0\.0"/ { print p }')
  [ -n "$staged" ] || die "found no v0.0.0 requirements in $gomod"
  local args=("-require=k8s.io/kubernetes@$KUBE_VERSION") m n=0
  for m in $staged; do
    args+=("-replace=$m=$m@$staging")
    n=$((n + 1))
  done
  log "replacing $n staging modules with $staging"
  (cd "$dir" && gocmd mod edit "${args[@]}") || die "go mod edit failed"
  go_peer_get "$dir" "k8s.io/kubernetes/cmd/kube-apiserver@$KUBE_VERSION" "k8s.io/kubernetes/cmd/kubectl@$KUBE_VERSION"
}

build_kube_apiserver() {
  local out=$1 dir=$2
  local minor=${KUBE_VERSION#v1.}
  minor=${minor%%.*}
  # What kubernetes' own build stamps in (hack/lib/version.sh), so /version tells the truth.
  local p
  KUBE_LDFLAGS=()
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    KUBE_LDFLAGS+=("-X $p.gitVersion=$KUBE_VERSION" "-X $p.gitMajor=1" "-X $p.gitMinor=$minor"
      "-X $p.gitTreeState=clean")
  done
  go_peer_build "$dir" "$out/kube-apiserver" k8s.io/kubernetes/cmd/kube-apiserver "${KUBE_LDFLAGS[@]}"
}

prepare_etcd() {
  local dir=$1
  go_peer_module "$dir" etcd
  # go.etcd.io/etcd/server/v3 has replace directives (so no `go install mod@version`), and its
  # main package is the module root: build it from a wrapper module that requires it.
  go_peer_get "$dir" "go.etcd.io/etcd/server/v3@$ETCD_VERSION"
}

# --- group: gosdk (our mains around the upstream NSM Go sdk) -----------------------------------
gosdk_version() {
  local sdk hash
  sdk=$(sed -n 's/^[[:space:]]*github.com\/networkservicemesh\/sdk \(v[^ ]*\).*/\1/p' "$GOSDK_DIR/go.mod" | head -n 1)
  [ -n "$sdk" ] || die "no github.com/networkservicemesh/sdk requirement in $GOSDK_DIR/go.mod"
  # The cache entry follows the source: any change to the mains or the pins rebuilds.
  hash=$(cd "$GOSDK_DIR" && find . -type f \( -name '*.go' -o -name go.mod -o -name go.sum \) | LC_ALL=C sort |
    xargs sha256sum | sha256sum | cut -c1-12)
  echo "sdk-$sdk-$hash"
}

# build_gosdk OUT WORK
build_gosdk() {
  local out=$1 work=$2
  # Build from a copy, so the repo gets no build artefacts and go.sum is used as committed.
  cp -r "$GOSDK_DIR" "$work/src"
  log "building nsm-go-nsc and nsm-go-nse (go build under nice -n 19)"
  (cd "$work/src" && gocmd build -trimpath -ldflags "-s -w" -o "$out/nsm-go-nsc" ./nsc &&
    gocmd build -trimpath -ldflags "-s -w" -o "$out/nsm-go-nse" ./nse) || die "go build in $GOSDK_DIR failed"
  {
    sed -n 's/^[[:space:]]*\(github.com\/networkservicemesh\/[^ ]* v[^ ]*\).*/\1/p' "$GOSDK_DIR/go.mod"
    echo "built with $(go version) on $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  } >"$out/VERSIONS"
}

# --- group: spire (spire-server, spire-agent) -------------------------------------------------
# build_spire OUT WORK
build_spire() {
  local out=$1 work=$2 dir=$2/spire
  go_peer_module "$dir" spire
  # No version list is served for this module, so `go install mod@version` is refused: require
  # the exact version as tools of a throwaway module, then build them there.
  go_peer_get "$dir" -tool "github.com/spiffe/spire/cmd/spire-server@$SPIRE_VERSION" \
    "github.com/spiffe/spire/cmd/spire-agent@$SPIRE_VERSION"
  # The server's SQLite datastore (mattn/go-sqlite3) needs cgo.
  local b
  for b in spire-server spire-agent; do
    log "building github.com/spiffe/spire/cmd/$b (go build, cgo, under nice -n 19)"
    # Stamp the release, as SPIRE's own build does, so --version tells the truth.
    (cd "$dir" && GOWORK=off CGO_ENABLED=1 "${NICE[@]}" go build -trimpath \
      -ldflags "-s -w -X github.com/spiffe/spire/pkg/common/version.gittag=${SPIRE_VERSION#v}" -o "$out/$b" \
      "github.com/spiffe/spire/cmd/$b") || die "go build github.com/spiffe/spire/cmd/$b failed"
  done
  {
    echo "github.com/spiffe/spire $SPIRE_VERSION (cmd/spire-server, cmd/spire-agent)"
    echo "built with $(go version) on $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  } >"$out/VERSIONS"
}

# --- main -------------------------------------------------------------------------------------
usage() {
  sed -n '2,13s/^# \{0,1\}//p' "$0" >&2
}

main() {
  case "${1:-}" in
  kube)
    ensure_group kube "$KUBE_VERSION-etcd-$ETCD_VERSION" build_kube kube-apiserver kubectl etcd
    ;;
  gosdk)
    ensure_group gosdk "$(gosdk_version)" build_gosdk nsm-go-nsc nsm-go-nse
    ;;
  spire)
    # The lab's SPIRE provider (nsm-lab run --spire, the tests on real SPIRE); cold build ~12 min.
    ensure_group spire "$SPIRE_VERSION" build_spire spire-server spire-agent
    ;;
  list)
    echo "spire github.com/spiffe/spire $SPIRE_VERSION  $PEERS_DIR/spire-$SPIRE_VERSION"
    echo "gosdk $(gosdk_version)  $PEERS_DIR/gosdk-$(gosdk_version)"
    echo "kube  k8s.io/kubernetes $KUBE_VERSION + go.etcd.io/etcd/server/v3 $ETCD_VERSION  $PEERS_DIR/kube-$KUBE_VERSION-etcd-$ETCD_VERSION"
    ;;
  -h | --help | help)
    usage
    ;;
  *)
    usage
    exit 2
    ;;
  esac
}

main "$@"
