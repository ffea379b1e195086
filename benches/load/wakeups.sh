#!/usr/bin/env bash
# Wake-ups and system calls per request at a fixed rate, counted by the kernel: how often each
# proxy calls epoll_wait, which other system calls it makes, and how often it is switched out,
# per request, next to its CPU time (user and kernel apart), the TCP segments the whole
# machine sent and p99. Counts move far less with the machine's noise than times do, so they
# show a per-wake-up cost that compare.sh's CPU column only hints at, and whether one proxy
# makes the kernel do more work per request than another.
#
#   benches/load/wakeups.sh                 # canaryd (this tree), nginx and HAProxy, 3 rounds
#   benches/load/wakeups.sh --against REV   # and REV, built in a worktree, as canaryd-base
# Options:
#   --rate R        requests per second (default 15700; RESULTS.md names the fixed rate
#                   compare.sh chose in its last run)
#   --duration S    seconds counted per run (default 6, after a 2 s warm-up)
#   --rounds N      runs of every target, alternating (default 3); medians are reported
#   --against REV   also measure REV (git worktree + cargo build --release: a few minutes)
#   --smoke         1 round of 1 s at 2,000 req/s
# Environment: CANARYD_BIN=PATH measures that binary instead of building this tree;
# CANARYD_BASE_BIN=PATH, with --against, that binary instead of building REV.
#
# Setup: the upstream pair and configs of compare.sh, one worker per proxy (canaryd
# `TOKIO_WORKER_THREADS=1`, metrics and the rollback circuit on; nginx `worker_processes 1`;
# HAProxy `nbthread 1`),
# oha at the fixed rate with 64 connections and one x-user-id. System calls are counted with
# `perf stat` on the proxy's worker (syscall tracepoints, no hardware counters needed); context
# switches and CPU time come from /proc, TCP segments from /proc/net/snmp (every process on
# the machine: client, proxy and upstream). Needs root for perf (installed with apt if missing).
set -euo pipefail

LOAD_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=lib/common.sh
source "$LOAD_DIR/lib/common.sh"

RATE=15700 DURATION=6 ROUNDS=3 AGAINST="" SMOKE=0
while (($#)); do
  case $1 in
    --rate) RATE=$2; shift 2 ;;
    --duration) DURATION=$2; shift 2 ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    --against) AGAINST=$2; shift 2 ;;
    --smoke) SMOKE=1; shift ;;
    -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1' "$0"; exit 0 ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
done
for v in RATE DURATION ROUNDS; do
  [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "--${v,,} must be a positive integer, got '${!v}'"
done
WARMUP=2
if ((SMOKE)); then RATE=2000 DURATION=1 ROUNDS=1 WARMUP=1 AGAINST=""; fi

setup_workdir wakeups

missing=()
for t in nginx haproxy curl perf; do command -v "$t" >/dev/null || missing+=("$t"); done
if ((${#missing[@]})); then
  pkgs=("${missing[@]/perf/linux-perf}")
  log "installing ${pkgs[*]} (apt-get)"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${pkgs[@]}"; } >&2 \
    || die "apt-get install ${pkgs[*]} failed"
fi
command -v oha >/dev/null || export PATH="$HOME/.cargo/bin:$PATH"
command -v oha >/dev/null || die "oha is missing: cargo install oha --locked (compare.sh installs it)"
perf stat -e syscalls:sys_enter_epoll_wait -- true 2>/dev/null \
  || die "perf cannot count syscall tracepoints here (needs root and tracefs)"

TARGETS=(canaryd nginx haproxy)
prepare_canaryd "$WORK/canaryd" >/dev/null
if [[ -n $AGAINST ]]; then
  prepare_rev_canaryd "$AGAINST" "$WORK/canaryd-base"
  TARGETS=(canaryd canaryd-base nginx haproxy)
fi

read -r UP_S UP_C P_CANARYD P_ADMIN P_NGINX P_HAPROXY <<<"$(free_ports 6)"
mkdir -p "$WORK/upstream-tmp" "$WORK/canaryd-etc" "$WORK/nginx-proxy-tmp"
render_peers 1 "$UP_S" "$UP_C" "$P_NGINX" "$P_HAPROXY"
# alone in its directory: canaryd watches the whole directory of its config file
canaryd_toml "$WORK/canaryd-etc/canaryd.toml" "$P_CANARYD" "$P_ADMIN" "$UP_S" "$UP_C" 10
spawn upstream "$WORK/upstream.log" nginx -p "$WORK" -c "$WORK/upstream.conf" -e "$WORK/upstream.error.log"
wait_http "http://127.0.0.1:$UP_S/" 10 "$SPAWN_PID" || die "the upstream nginx did not start"

SYSCALLS=(epoll_wait epoll_pwait recvfrom writev read write sendto sendmsg recvmsg getsockopt
  setsockopt epoll_ctl futex accept4 close clock_nanosleep)
EVENTS=$(printf 'syscalls:sys_enter_%s,' "${SYSCALLS[@]}")
EVENTS="${EVENTS}raw_syscalls:sys_enter"
ROWS="$WORK/rows.tsv"
printf 'round\ttarget\tresponses\tp99_ms\tuser_ticks\tsys_ticks\tsegs\tvcsw\tivcsw\tcounts\n' > "$ROWS"

# ctx PID: "voluntary involuntary" context switches of every thread of PID
ctx() { awk '/^voluntary_ctxt/ {v += $2} /^nonvoluntary_ctxt/ {n += $2} END {print v + 0, n + 0}' /proc/"$1"/task/*/status; }
# ticks PID: "user system" clock ticks of PID, all its threads (fields 14 and 15 of its stat,
# counted after the command name, which may hold spaces)
ticks() { sed 's/.*) //' /proc/"$1"/stat | awk '{print $12, $13}'; }
# segs: TCP segments sent by the whole machine so far
segs() { awk '$1 == "Tcp:" && !h {for (i = 1; i <= NF; i++) if ($i == "OutSegs") c = i; h = 1; next} $1 == "Tcp:" {print $c}' /proc/net/snmp; }

# run ROUND TARGET: one measured run of TARGET, appended to $ROWS
run() {
  local round=$1 name=$2 pid worker port v0 n0 v1 n1 u0 s0 u1 s1 g0 g1 perf_pid
  case $name in
    canaryd|canaryd-base)
      spawn "$name" "$WORK/$name.log" env TOKIO_WORKER_THREADS=1 RUST_LOG=warn \
        "$WORK/$name" run --config "$WORK/canaryd-etc/canaryd.toml"
      pid=$SPAWN_PID worker=$SPAWN_PID port=$P_CANARYD
      wait_http "http://127.0.0.1:$P_ADMIN/readyz" 10 "$pid" || die "$name did not start" ;;
    nginx)
      spawn nginx "$WORK/nginx.log" nginx -p "$WORK" -c "$WORK/nginx-proxy.conf" -e "$WORK/nginx-proxy.error.log"
      pid=$SPAWN_PID port=$P_NGINX
      wait_http "http://127.0.0.1:$P_NGINX/" 10 "$pid" || die "nginx did not start"
      worker=$(pgrep -P "$pid" | head -1)
      [[ -n $worker ]] || die "no nginx worker process" ;;
    haproxy)
      spawn haproxy "$WORK/haproxy.log" haproxy -f "$WORK/haproxy.cfg" -db
      pid=$SPAWN_PID worker=$SPAWN_PID port=$P_HAPROXY
      wait_http "http://127.0.0.1:$P_HAPROXY/" 10 "$pid" || die "haproxy did not start" ;;
  esac
  oha -z "${WARMUP}s" -q "$RATE" -c 64 --no-tui -H 'x-user-id: user7' "http://127.0.0.1:$port/" >/dev/null
  read -r v0 n0 <<<"$(ctx "$worker")"
  read -r u0 s0 <<<"$(ticks "$worker")"
  g0=$(segs)
  perf stat -x, -e "$EVENTS" -p "$worker" -o "$WORK/perf.csv" &
  perf_pid=$!
  oha -z "${DURATION}s" -q "$RATE" --latency-correction -c 64 --no-tui -H 'x-user-id: user7' \
    "http://127.0.0.1:$port/" > "$WORK/oha.txt"
  kill -INT "$perf_pid"
  wait "$perf_pid" || true
  read -r v1 n1 <<<"$(ctx "$worker")"
  read -r u1 s1 <<<"$(ticks "$worker")"
  g1=$(segs)
  stop_pid "$pid" TERM 15
  local responses p99 counts
  responses=$(grep -o '\[200\] [0-9]*' "$WORK/oha.txt" | awk '{print $2}')
  [[ -n $responses ]] || die "$name answered no 200 ($WORK/oha.txt)"
  p99=$(awk '$1 == "99.00%" {f = ($4 == "secs" ? 1000 : ($4 == "ms" ? 1 : 0.001)); print $3 * f; exit}' "$WORK/oha.txt")
  # "name=count;..." from perf's CSV: count,unit,event,...
  counts=$(awk -F, '$3 ~ /sys_enter/ && $1 ~ /^[0-9]+$/ {sub(/.*sys_enter_?/, "", $3); printf "%s=%s;", ($3 == "" ? "all" : $3), $1}' "$WORK/perf.csv")
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$name" "$responses" "$p99" \
    "$((u1 - u0))" "$((s1 - s0))" "$((g1 - g0))" "$((v1 - v0))" "$((n1 - n0))" "$counts" >> "$ROWS"
  log "  $name: $responses responses, p99 $p99 ms"
}

log "fixed rate $RATE req/s, ${DURATION}s per run, $ROUNDS round(s): ${TARGETS[*]}"
for ((r = 1; r <= ROUNDS; r++)); do
  log "round $r/$ROUNDS"
  n=${#TARGETS[@]}
  for ((i = 0; i < n; i++)); do run "$r" "${TARGETS[$(((i + r - 1) % n))]}"; done
done

python3 - "$ROWS" "$RATE" "$DURATION" "$(getconf CLK_TCK)" <<'EOF'
import statistics, sys
tick = 1 / int(sys.argv[4])
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1])]
head, rows = rows[0], [dict(zip(rows[0], r)) for r in rows[1:]]
targets = list(dict.fromkeys(r["target"] for r in rows))
per = {}
for r in rows:
    n = int(r["responses"])
    counts = dict(kv.split("=") for kv in r["counts"].split(";") if kv)
    d = {k: int(v) / n for k, v in counts.items()}
    d["user_us"] = int(r["user_ticks"]) * tick / n * 1e6
    d["sys_us"] = int(r["sys_ticks"]) * tick / n * 1e6
    d["cpu_us"] = d["user_us"] + d["sys_us"]
    d["segs"] = int(r["segs"]) / n
    d["vcsw"] = int(r["vcsw"]) / n
    d["ivcsw"] = int(r["ivcsw"]) / n
    d["p99"] = float(r["p99_ms"])
    per.setdefault(r["target"], []).append(d)
shown = [("epoll_wait", "epoll_wait", 3), ("recvfrom", "recvfrom", 3), ("writev", "writev", 3),
         ("sendto", "sendto", 3), ("write", "write", 4), ("read", "read", 4),
         ("getsockopt", "getsockopt", 3), ("futex", "futex", 4)]
for runs in per.values():
    for d in runs:
        # Every system call not in a column of its own, counted or not. The counters start
        # and stop a moment apart, so "all" can come out a hair below the sum.
        d["other"] = max(0.0, d.get("all", 0) - sum(d.get(k, 0.0) for _, k, _ in shown))
cols = [("CPU µs", "cpu_us", 2), ("user µs", "user_us", 2), ("kernel µs", "sys_us", 2),
        ("p99 ms", "p99", 3), ("TCP segments (machine)", "segs", 2), ("all syscalls", "all", 3), *shown,
        ("other syscalls", "other", 4),
        ("voluntary switches", "vcsw", 3), ("involuntary switches", "ivcsw", 3)]
print(f"Per request, medians of {len(per[targets[0]])} run(s) of {sys.argv[3]} s at {sys.argv[2]} req/s:\n")
print("| target | " + " | ".join(c[0] for c in cols) + " |")
print("|---|" + "---:|" * len(cols))
for t in targets:
    cells = []
    for _, k, digits in cols:
        v = statistics.median(d.get(k, 0.0) for d in per[t])
        cells.append(f"{v:.{digits}f}")
    print(f"| {t} | " + " | ".join(cells) + " |")
EOF
