#!/usr/bin/env bash
# Builds the test cluster's binaries (etcd, kube-apiserver, kube-controller-manager,
# kubectl, helm) from the Go module proxy at the versions in versions.env, and prints
# the directory that holds them.
#
# k8s.io/kubernetes cannot be `go install`ed: its go.mod replaces its staging modules
# with local paths (kubernetes/kubernetes#79384). We generate a wrapper module that
# requires the pinned release and replaces every staging module named in *that tag's*
# go.mod with its published v0.Y.Z, then `go build` the commands from it.
#
# Binaries are cached under $TRIMTAB_CACHE (default ~/.cache/trimtab) keyed by the
# pins and this script, so they are rebuilt only when either changes.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.env
source "$here/versions.env"

key=$(cat "$here/versions.env" "$here/build.sh" "$here/etcd/main.go" | sha256sum | cut -c1-16)
cache=${TRIMTAB_CACHE:-$HOME/.cache/trimtab}/testcluster/$key
bin=$cache/bin
if [[ -x $bin/kube-apiserver && -x $bin/etcd && -x $bin/kubectl && -x $bin/kube-controller-manager && -x $bin/helm ]]; then
  echo "$bin"
  exit 0
fi

log() { echo "[testcluster] $*" >&2; }
command -v go >/dev/null || { log "go is required (https://go.dev/doc/install)"; exit 1; }

export GOFLAGS=-mod=mod GOTOOLCHAIN=local CGO_ENABLED=0
src=$cache/src
rm -rf "$src" && mkdir -p "$src/kube" "$src/helm" "$bin"
start=$SECONDS

# --- Kubernetes + etcd wrapper module -------------------------------------------------
kube_mod=$(cd "$src/kube" && go mod download -json "k8s.io/kubernetes@$KUBERNETES_VERSION" \
  | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",$/\1/p')
[[ -f $kube_mod ]] || { log "could not download k8s.io/kubernetes@$KUBERNETES_VERSION"; exit 1; }
staging_version=v0.${KUBERNETES_VERSION#v1.}
{
  echo "module trimtab.dev/testcluster"
  echo
  sed -n 's/^go \(.*\)$/go \1/p' "$kube_mod"
  echo
  echo "require ("
  echo "	k8s.io/kubernetes $KUBERNETES_VERSION"
  echo "	go.etcd.io/etcd/server/v3 $ETCD_VERSION"
  echo ")"
  echo
  echo "replace ("
  grep -E '^\s*k8s\.io/[a-z0-9-]+ => \./staging/src/' "$kube_mod" \
    | awk -v v="$staging_version" '{ printf "\t%s => %s %s\n", $1, $1, v }'
  echo ")"
} >"$src/kube/go.mod"
log "wrapper module replaces $(grep -c '=> k8s.io' "$src/kube/go.mod") staging modules with $staging_version"
mkdir -p "$src/kube/cmd/etcd"
cp "$here/etcd/main.go" "$src/kube/cmd/etcd/main.go"
cat >"$src/kube/tools.go" <<'GO'
//go:build tools

package testcluster

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kubectl"
)
GO
(
  cd "$src/kube"
  log "resolving modules for Kubernetes $KUBERNETES_VERSION and etcd $ETCD_VERSION"
  go mod tidy -e >&2
  ldflags="-s -w -X k8s.io/component-base/version.gitVersion=$KUBERNETES_VERSION -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$(echo "$KUBERNETES_VERSION" | cut -d. -f2)"
  for cmd in kube-apiserver kube-controller-manager kubectl; do
    log "building $cmd"
    go build -trimpath -ldflags "$ldflags" -o "$bin/$cmd.tmp" "k8s.io/kubernetes/cmd/$cmd" >&2
    mv "$bin/$cmd.tmp" "$bin/$cmd"
  done
  log "building etcd"
  go build -trimpath -ldflags "-s -w" -o "$bin/etcd.tmp" ./cmd/etcd >&2
  mv "$bin/etcd.tmp" "$bin/etcd"
)

# --- helm (its own module: it pins client-go versions of its own) ----------------------
(
  cd "$src/helm"
  cat >go.mod <<GOMOD
module trimtab.dev/testcluster-helm

go 1.24

require helm.sh/helm/v3 $HELM_VERSION
GOMOD
  cat >tools.go <<'GO'
//go:build tools

package helm

import _ "helm.sh/helm/v3/cmd/helm"
GO
  go mod tidy -e >&2
  log "building helm"
  go build -trimpath -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" -o "$bin/helm.tmp" helm.sh/helm/v3/cmd/helm >&2
  mv "$bin/helm.tmp" "$bin/helm"
)

log "built in $((SECONDS - start))s into $bin"
echo "$bin"
