#!/usr/bin/env bash
# Builds (once) the control-plane binaries of the local test stack from their Go
# modules at the versions pinned beside this script, into a cache outside the repo.
#
#   KUBEBUILDER_ASSETS=DIR   use prebuilt etcd, kube-apiserver, kube-controller-manager,
#                            kube-scheduler, kubectl and kwok from DIR instead (envtest's convention)
#   PODBROKER_CACHE=DIR      cache root (default: ~/.cache/podbroker)
#
# Prints the folder holding the binaries on its last line.
#
#   build-binaries.sh helm   builds (once) only helm from helm.sh/helm/v3 at HELM_VERSION
#                            (its go.mod has no replace directives, so `go install` works)
#                            and prints the folder holding it; $KUBEBUILDER_ASSETS/helm wins
#                            when present.
#   build-binaries.sh crds   copies (once) the upstream CRDs the chart's optional kinds need
#                            (ServiceMonitor, PrometheusRule, Certificate) out of their Go
#                            modules at the versions pinned here, and prints their folder.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
KUBE_VERSION="v1.36.3"
ETCD_VERSION="v3.6.16"
KWOK_VERSION="v0.8.0"
HELM_VERSION="v3.22.0"  # newest on the module proxy that builds with Go 1.26 (2026-11-25)
HELM_KUBE_MINOR="37"     # helm v3.22.0 requires k8s.io/client-go v0.37: default capabilities 1.37
PROMETHEUS_OPERATOR_VERSION="v0.85.0"  # newest whole module the module proxy serves (2026-12-02)
CERT_MANAGER_VERSION="v1.21.2"
binaries=(etcd kube-apiserver kube-controller-manager kube-scheduler kubectl kwok)

if [[ "${1:-}" == "helm" ]]; then
    if [[ -n "${KUBEBUILDER_ASSETS:-}" && -x "$KUBEBUILDER_ASSETS/helm" ]]; then
        echo "$KUBEBUILDER_ASSETS"
        exit 0
    fi
    helm_out="${PODBROKER_CACHE:-$HOME/.cache/podbroker}/bin/helm-$HELM_VERSION"
    if [[ ! -x "$helm_out/helm" ]]; then
        mkdir -p "$helm_out"
        started=$(date +%s)
        # What helm's Makefile sets: without it `helm template` assumes Kubernetes v1.20.
        helm_kube=""
        for pkg in pkg/lint/rules pkg/chartutil; do
            helm_kube+=" -X helm.sh/helm/v3/$pkg.k8sVersionMajor=1 -X helm.sh/helm/v3/$pkg.k8sVersionMinor=$HELM_KUBE_MINOR"
        done
        echo "  helm: building helm.sh/helm/v3/cmd/helm@$HELM_VERSION (first time only) ..." >&2
        CGO_ENABLED=0 GOFLAGS="-trimpath -buildvcs=false" GOBIN="$helm_out/.tmp" go install \
            -ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION $helm_kube" \
            "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
        mv "$helm_out/.tmp/helm" "$helm_out/helm"
        rmdir "$helm_out/.tmp"
        echo "  helm: built in $(( $(date +%s) - started ))s" >&2
    else
        echo "  helm: cached" >&2
    fi
    echo "$helm_out"
    exit 0
fi

if [[ "${1:-}" == "crds" ]]; then
    crds_out="${PODBROKER_CACHE:-$HOME/.cache/podbroker}/crds/prometheus-operator-$PROMETHEUS_OPERATOR_VERSION-cert-manager-$CERT_MANAGER_VERSION"
    if [[ ! -f "$crds_out/.complete" ]]; then
        mkdir -p "$crds_out"
        module_dir() {  # module_dir MODULE@VERSION: where `go mod download` unpacked it
            (cd "$crds_out" && go mod download -json "$1") | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p'
        }
        echo "  crds: downloading prometheus-operator@$PROMETHEUS_OPERATOR_VERSION and cert-manager@$CERT_MANAGER_VERSION ..." >&2
        prom="$(module_dir "github.com/prometheus-operator/prometheus-operator@$PROMETHEUS_OPERATOR_VERSION")"
        cm="$(module_dir "github.com/cert-manager/cert-manager@$CERT_MANAGER_VERSION")"
        [[ -n "$prom" && -n "$cm" ]] || { echo "crds: go mod download failed" >&2; exit 2; }
        for kind in servicemonitors prometheusrules; do
            install -m 0644 "$prom/example/prometheus-operator-crd/monitoring.coreos.com_$kind.yaml" "$crds_out/"
        done
        install -m 0644 "$cm/deploy/crds/cert-manager.io_certificates.yaml" "$crds_out/"
        touch "$crds_out/.complete"
    else
        echo "  crds: cached" >&2
    fi
    echo "$crds_out"
    exit 0
fi

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
