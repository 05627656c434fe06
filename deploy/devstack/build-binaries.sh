#!/usr/bin/env bash
# Builds (once) the control-plane binaries of the local test stack from their Go
# modules at the versions pinned beside this script, into a cache outside the repo.
#
#   KUBEBUILDER_ASSETS=DIR   use prebuilt etcd, kube-apiserver, kube-controller-manager,
#                            kube-scheduler, kubectl and kwok from DIR instead (envtest's convention)
#   PODBROKER_CACHE=DIR      cache root (default: ~/.cache/podbroker)
#
# Prints the folder holding the binaries on its last line.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
KUBE_VERSION="v1.36.3"
ETCD_VERSION="v3.6.16"
KWOK_VERSION="v0.8.0"
binaries=(etcd kube-apiserver kube-controller-manager kube-scheduler kubectl kwok)

if [[ -n "${KUBEBUILDER_ASSETS:-}" ]]; then
    for b in "${binaries[@]}"; do
        [[ -x "$KUBEBUILDER_ASSETS/$b" ]] || { echo "KUBEBUILDER_ASSETS=$KUBEBUILDER_ASSETS has no executable '$b'" >&2; exit 2; }
    done
    echo "$KUBEBUILDER_ASSETS"
    exit 0
fi

cache="${PODBROKER_CACHE:-$HOME/.cache/podbroker}"
out="$cache/bin/k8s-$KUBE_VERSION-etcd-$ETCD_VERSION-kwok-$KWOK_VERSION"
mkdir -p "$out"
export CGO_ENABLED=0 GOFLAGS="-trimpath -buildvcs=false"

build() {  # build NAME DIR PACKAGE [LDFLAGS]
    local name="$1" dir="$2" pkg="$3" ldflags="${4:-}" started
    if [[ -x "$out/$name" ]]; then
        echo "  $name: cached" >&2
        return
    fi
    started=$(date +%s)
    echo "  $name: building $pkg (first time only; minutes on 2 cores) ..." >&2
    (cd "$dir" && go build -ldflags="-s -w $ldflags" -o "$out/$name.tmp" "$pkg")
    mv "$out/$name.tmp" "$out/$name"
    echo "  $name: built in $(( $(date +%s) - started ))s" >&2
}

echo "control-plane binaries in $out" >&2
build etcd "$here/etcd" .
for cmd in kube-apiserver kube-controller-manager kube-scheduler kubectl; do
    build "$cmd" "$here/kube" "k8s.io/kubernetes/cmd/$cmd" \
        "-X k8s.io/component-base/version.gitVersion=$KUBE_VERSION -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$(echo "$KUBE_VERSION" | cut -d. -f2) -X k8s.io/client-go/pkg/version.gitVersion=$KUBE_VERSION"
done
if [[ ! -x "$out/kwok" ]]; then
    started=$(date +%s)
    echo "  kwok: building sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION ..." >&2
    GOBIN="$out" go install -ldflags="-s -w" "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION"
    echo "  kwok: built in $(( $(date +%s) - started ))s" >&2
else
    echo "  kwok: cached" >&2
fi
echo "$out"
