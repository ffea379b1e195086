#!/usr/bin/env bash
# User-space instructions per proxied request, counted by callgrind: the one speed measure on
# this machine that other processes cannot disturb (wall-clock and CPU-time figures from
# compare.sh move by ±15% between rounds here). Kernel time is not counted; like nginx and
# HAProxy, canaryd reads twice and sends twice per request (wakeups.sh).
#
#   benches/load/instructions.sh                    # this tree
#   benches/load/instructions.sh --against main     # and a git revision, built in a worktree,
#                                                   # measured in the same run, with the ratio
# Options:
#   --requests N    requests counted (default 30000; each binary runs twice, with 2,000 and
#                   2,000 + N requests, and the difference is divided by N, so start-up and
#                   shut-down cancel out)
#   --against REV   also measure REV (git worktree + cargo build --release: a few minutes)
#   --peers         also measure nginx and HAProxy doing the same split (the configs of
#                   compare.sh, one process each: nginx with `master_process off`)
#   --pgo           also measure this tree built with profile-guided optimisation (pgo.sh)
#   --cache         also simulate caches and branch prediction (valgrind --cache-sim
#                   --branch-sim; ~2× slower): L1 instruction-cache misses, L1 data-cache
#                   misses and mispredicted branches per request, next to the instructions
#   --analysis      requests go to /predict (a JSON answer of about 200 bytes), and this tree
#                   is also measured with [analysis] on (label and score read from every
#                   answer), with the ratio to it off
#   --h2            requests over HTTP/2 (h2c, prior knowledge): h2load with 32 connections and
#                   16 streams each instead of oha's 32 HTTP/1.1 connections (the upstreams stay
#                   HTTP/1.1); without --peers only canaryd is measured
#   --h2e2e         HTTP/2 end to end: as --h2, and h2c to the upstreams too (the upstream pair
#                   listens with `http2`, canaryd has `http2 = true`); canaryd only (the peers
#                   end to end are in compare.sh --proto h2e2e)
#   --smoke         300 requests, no baseline, no peers
# Environment: CANARYD_BIN=PATH measures that binary instead of building this tree;
# CANARYD_PGO_BIN=PATH, with --pgo, that PGO binary instead of running pgo.sh;
# CANARYD_BASE_BIN=PATH, with --against, that binary instead of building REV.
#
# Setup: one nginx upstream pair (conf/upstream-nginx.conf.tmpl, as in compare.sh), canaryd
# with metrics and the rollback circuit on (`TOKIO_WORKER_THREADS=1`), oha with 32 keep-alive
# connections and one x-user-id, all on loopback ports chosen by the kernel.
set -euo pipefail

LOAD_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=lib/common.sh
source "$LOAD_DIR/lib/common.sh"

REQUESTS=30000 AGAINST="" SMOKE=0 PEERS=0 PGO=0 CACHE=0 ANALYSIS=0 H2=0 H2UP=0
while (($#)); do
  case $1 in
    --requests) REQUESTS=$2; shift 2 ;;
    --against) AGAINST=$2; shift 2 ;;
    --peers) PEERS=1; shift ;;
    --pgo) PGO=1; shift ;;
    --cache) CACHE=1; shift ;;
    --analysis) ANALYSIS=1; shift ;;
    --h2) H2=1; shift ;;
    --h2e2e) H2=1; H2UP=1; shift ;;
    --smoke) SMOKE=1; shift ;;
    -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1' "$0"; exit 0 ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
done
[[ $REQUESTS =~ ^[1-9][0-9]*$ ]] || die "--requests must be a positive integer"
if ((SMOKE)); then REQUESTS=300; AGAINST=""; PEERS=0; PGO=0; fi
if ((H2UP && PEERS)); then die "--h2e2e measures canaryd only (compare.sh --proto h2e2e has the peers)"; fi
WARM=2000
if ((SMOKE)); then WARM=100; fi

setup_workdir instructions

missing=()
for t in nginx valgrind curl; do command -v "$t" >/dev/null || missing+=("$t"); done
if ((H2)) && ! command -v h2load >/dev/null; then missing+=(nghttp2-client); fi
if ((PEERS)) && ! command -v haproxy >/dev/null; then missing+=(haproxy); fi
if ((${#missing[@]})); then
  log "installing ${missing[*]} (apt-get)"
  apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2 \
    || die "apt-get install ${missing[*]} failed"
fi
export PATH="$HOME/.cargo/bin:$PATH"
if ! command -v oha >/dev/null; then
  if ((SMOKE)); then
    log "oha not installed: the smoke run sends its requests with curl on one connection"
  else
    log "installing oha: cargo install oha --locked (several minutes)"
    timeout 1800 cargo install oha --locked >&2 || die "cargo install oha failed"
  fi
fi

BIN=$(prepare_canaryd "$WORK/canaryd")
PGO_BIN=""
if ((PGO)); then
  PGO_BIN="$WORK/canaryd-pgo"
  prepare_pgo_canaryd "$PGO_BIN"
fi
BASE_BIN=""
if [[ -n $AGAINST ]]; then
  BASE_BIN="$WORK/canaryd-base"
  prepare_rev_canaryd "$AGAINST" "$BASE_BIN"
fi

read -r UP_S UP_C P_CANARYD P_ADMIN P_NGINX P_HAPROXY <<<"$(free_ports 6)"
mkdir -p "$WORK/upstream-tmp" "$WORK/canaryd-etc" "$WORK/nginx-proxy-tmp"
render_peers 1 "$UP_S" "$UP_C" "$P_NGINX" "$P_HAPROXY"
if ((H2)); then
  # The peers take h2c with prior knowledge on the same port: nginx's `http2` listen flag,
  # HAProxy's `proto h2` bind option.
  sed -i "s|listen 127.0.0.1:$P_NGINX |listen 127.0.0.1:$P_NGINX http2 |" "$WORK/nginx-proxy.conf"
  sed -i "s|bind 127.0.0.1:$P_HAPROXY\$|bind 127.0.0.1:$P_HAPROXY proto h2|" "$WORK/haproxy.cfg"
  grep -q "http2" "$WORK/nginx-proxy.conf" && grep -q "proto h2" "$WORK/haproxy.cfg" \
    || die "could not turn the peers' listeners to h2c"
fi
canaryd_toml "$WORK/canaryd-etc/canaryd.toml" "$P_CANARYD" "$P_ADMIN" "$UP_S" "$UP_C" 10
CONFIG="$WORK/canaryd-etc/canaryd.toml"
URL_PATH=/
if ((ANALYSIS)); then URL_PATH=/predict; fi
if ((H2UP)); then
  # h2c only on the upstream pair (nginx 1.22 does not take HTTP/1.1 and h2c on one port)
  sed -i -e "s|listen 127.0.0.1:$UP_S backlog=4096;|listen 127.0.0.1:$UP_S http2 backlog=4096;|" \
    -e "s|listen 127.0.0.1:$UP_C backlog=4096;|listen 127.0.0.1:$UP_C http2 backlog=4096;|" "$WORK/upstream.conf"
  [[ $(grep -c ' http2 backlog' "$WORK/upstream.conf") == 2 ]] || die "could not make the upstream pair speak h2c"
  sed -i 's|^url = \(.*\)$|url = \1\nhttp2 = true|' "$CONFIG"
  [[ $(grep -c '^http2 = true$' "$CONFIG") == 2 ]] || die "could not give canaryd's upstreams http2 = true"
fi
spawn upstream "$WORK/upstream.log" nginx -p "$WORK" -c "$WORK/upstream.conf" -e "$WORK/upstream.error.log"
if ((H2UP)); then
  wait_tcp "$UP_S" 10 "$SPAWN_PID" || die "the upstream nginx did not start"
else
  wait_http "http://127.0.0.1:$UP_S/" 10 "$SPAWN_PID" || die "the upstream nginx did not start"
fi

# count TARGET REQUESTS: sets COUNT to "instructions I1-misses D1-misses mispredicts" of one
# run of TARGET (a canaryd binary, or `nginx` / `haproxy`) serving REQUESTS requests (the last
# three 0 without --cache). (Not run in $(...): the process must be spawned by this shell to be
# cleaned up.)
COUNT=
count() {
  local target=$1 n=$2 out="$WORK/callgrind.out" pid i port ready stop=INT
  local vg=(valgrind --tool=callgrind --callgrind-out-file="$out")
  if ((CACHE)); then vg+=(--cache-sim=yes --branch-sim=yes); fi
  rm -f "$out"
  case $target in
    nginx)
      spawn nginx "$WORK/nginx-vg.log" "${vg[@]}" nginx -p "$WORK" -c "$WORK/nginx-proxy.conf" \
        -e "$WORK/nginx-proxy.error.log" -g 'master_process off;'
      port=$P_NGINX ready="http://127.0.0.1:$P_NGINX/" stop=QUIT ;;
    haproxy)
      spawn haproxy "$WORK/haproxy-vg.log" "${vg[@]}" haproxy -db -f "$WORK/haproxy.cfg"
      port=$P_HAPROXY ready="http://127.0.0.1:$P_HAPROXY/" stop=USR1 ;;
    *)
      spawn canaryd "$WORK/canaryd.log" env TOKIO_WORKER_THREADS=1 RUST_LOG=warn \
        "${vg[@]}" "$target" run --config "$CONFIG"
      port=$P_CANARYD ready="http://127.0.0.1:$P_ADMIN/readyz" ;;
  esac
  pid=$SPAWN_PID
  if ((H2)) && [[ $target == nginx || $target == haproxy ]]; then
    # An h2c-only listener does not answer curl's HTTP/1.1.
    wait_tcp "$port" 60 "$pid" || die "$target did not start under valgrind"
  else
    wait_http "$ready" 60 "$pid" || die "$target did not start under valgrind"
  fi
  if ((H2)); then
    h2load -n "$n" -c 32 -m 16 -t 1 -H 'x-user-id: user7' "http://127.0.0.1:$port$URL_PATH" \
      > "$WORK/h2load.txt" || die "h2load failed ($WORK/h2load.txt)"
    grep -q "status codes: $n 2xx" "$WORK/h2load.txt" \
      || die "not every request got a 2xx ($WORK/h2load.txt)"
  elif command -v oha >/dev/null; then
    oha -n "$n" -c 32 --no-tui -H 'x-user-id: user7' "http://127.0.0.1:$port$URL_PATH" > "$WORK/oha.txt" \
      || die "oha failed"
    grep -q '\[200\] '"$n"' responses' "$WORK/oha.txt" || die "not every request got a 200 ($WORK/oha.txt)"
  else
    for ((i = 0; i < n; i++)); do
      printf 'url = "http://127.0.0.1:%s%s"\noutput = "/dev/null"\n' "$port" "$URL_PATH"
    done > "$WORK/curl.conf"
    curl -s -H 'x-user-id: user7' -w '%{http_code}\n' -K "$WORK/curl.conf" > "$WORK/codes.txt" \
      || die "curl failed"
    [[ $(grep -c '^200$' "$WORK/codes.txt") == "$n" ]] || die "not every request got a 200 ($WORK/codes.txt)"
  fi
  stop_pid "$pid" "$stop" 60
  [[ -s $out ]] || die "callgrind wrote nothing for $target"
  # One count over all the processes and threads callgrind saw.
  COUNT=$(python3 - "$out"* <<'PY'
import sys
tot = {}
for path in sys.argv[1:]:
    events = []
    for line in open(path, errors="replace"):
        if line.startswith("events:"):
            events = line.split()[1:]
        elif line.startswith("summary:"):
            for e, v in zip(events, line.split()[1:]):
                tot[e] = tot.get(e, 0) + int(v)
g = lambda *names: sum(tot.get(n, 0) for n in names)
print(g("Ir"), g("I1mr"), g("D1mr", "D1mw"), g("Bcm", "Bim"))
PY
)
}

# per_request BIN: sets PER to the instructions per request, PER_ROW to the table cells
# (instructions, and with --cache the misses and mispredicts) per request
PER= PER_ROW=
per_request() {
  local a
  count "$1" "$WARM"
  a=$COUNT
  count "$1" $((WARM + REQUESTS))
  read -r PER PER_ROW < <(python3 - "$a" "$COUNT" "$REQUESTS" "$CACHE" <<'PY'
import sys
a, b, n, cache = sys.argv[1].split(), sys.argv[2].split(), int(sys.argv[3]), sys.argv[4] == "1"
per = [(int(y) - int(x)) / n for x, y in zip(a, b)]
cells = [f"{per[0]:,.0f}"] + ([f"{v:,.0f}" for v in per[1:]] if cache else [])
print(round(per[0]), " | ".join(cells))
PY
)
}

per_request "$BIN"
CUR=$PER CUR_ROW=$PER_ROW
log "this tree ($(canaryd_version "$BIN")): $CUR instructions per request"
ratio() { python3 -c "print(f'{$CUR / $1:.2f}×')"; }
if ((CACHE)); then
  echo "| build | instructions / request | I1 misses / request | D1 misses / request | mispredicted branches / request | this tree ÷ it (instructions) |"
  echo "|---|---:|---:|---:|---:|---:|"
else
  echo "| build | instructions / request | this tree ÷ it |"
  echo "|---|---:|---:|"
fi
if [[ -n $BASE_BIN ]]; then
  per_request "$BASE_BIN"
  log "$AGAINST: $PER instructions per request"
  echo "| $AGAINST | $PER_ROW | $(ratio "$PER") |"
fi
echo "| this tree | $CUR_ROW | — |"
if ((ANALYSIS)); then
  CONFIG="$WORK/canaryd-etc/canaryd-analysis.toml"
  cp "$WORK/canaryd-etc/canaryd.toml" "$CONFIG"
  printf '\n[analysis]\nlabel_pointer = "/prediction"\nscore_pointer = "/confidence"\n' >> "$CONFIG"
  per_request "$BIN"
  log "this tree, [analysis] on: $PER instructions per request"
  echo "| this tree, [analysis] on | $PER_ROW | $(ratio "$PER") |"
  CONFIG="$WORK/canaryd-etc/canaryd.toml"
fi
if [[ -n $PGO_BIN ]]; then
  per_request "$PGO_BIN"
  log "this tree, PGO: $PER instructions per request"
  echo "| this tree, PGO build | $PER_ROW | $(ratio "$PER") |"
fi
if ((PEERS)); then
  for peer in nginx haproxy; do
    per_request "$peer"
    log "$peer: $PER instructions per request"
    echo "| $peer | $PER_ROW | $(ratio "$PER") |"
  done
fi
