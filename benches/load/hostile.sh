#!/usr/bin/env bash
# canaryd vs nginx under two hostile clients, in the same run:
#
#   1. CPU per MB of a request body made of 1-byte chunks (`1\r\nX\r\n` ...): tools/chunkflood.py
#      streams such a body on --conns connections for --duration seconds, as fast as the
#      socket takes it; reported: the proxy's CPU seconds (utime+stime, /proc) per MB
#      (10^6 bytes) of body on the wire. Targets alternate, each round starting with the
#      other one; every measurement starts the proxy fresh.
#   2. Memory with slowloris heads: --slow connections each holding an unfinished request
#      head (tools/slowheads.py), in two variants: `lines` (a head growing by one ~100-byte
#      line a second, --lines lines in all) and `big` (a 60 KB head sent at once). Reported:
#      the proxy's VmRSS (summed over its processes) before and with the connections held,
#      and the difference per connection.
#
#   benches/load/hostile.sh            # full run (~4 min), writes benches/load/HOSTILE.md
#   benches/load/hostile.sh --smoke    # seconds, small numbers; writes nothing unless --out
#
# Options:
#   --rounds N      rounds of the CPU measurement (default 3; smoke 1)
#   --conns N       flood connections (default 4)
#   --duration S    seconds of flood per measurement (default 10; smoke 2)
#   --slow N        slowloris connections (default 10000; smoke 500)
#   --lines N       header lines each `lines` connection sends, one a second (default 5)
#   --workers N     canaryd TOKIO_WORKER_THREADS and nginx worker_processes (default 1)
#   --out FILE      the markdown report (default benches/load/HOSTILE.md; with --smoke, none)
#   --quiet-wait S  at most S seconds in all waiting for other processes on the machine to
#                   go quiet before and between CPU measurements (default 300; 0 = never)
#   --no-install    fail instead of installing missing tools (nginx, curl, iproute2)
#   --smoke         1 round of 2 s, 500 slowloris connections; exit 1 if anything fails
# Environment:
#   CANARYD_BIN=PATH  measure this binary instead of building target/release/canaryd
#   KEEP_TMP=1        keep the work directory (configs, logs, raw JSON and TSV)
#
# The upstream of both proxies is tools/sink.py (one process, Python asyncio): it reads any
# body framing and answers 200 only once the whole body is in, and takes runs of 1-byte
# chunks at C speed, so it stays cheaper than the proxies (its CPU is in the report).
# Only loopback addresses; ports come from the kernel (bind to port 0); `ulimit -n` is raised
# for the slowloris connections (needs root past the hard limit). Every process started here
# is stopped on exit.
set -euo pipefail

LOAD_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=lib/common.sh
source "$LOAD_DIR/lib/common.sh"

ROUNDS=3 CONNS=4 DURATION=10 SLOW=10000 LINES=5 WORKERS=1 QUIET_WAIT=300 SMOKE=0 INSTALL=1
BIG_BYTES=60000 LINE_BYTES=100
OUT="" OUT_GIVEN=0
ORIG_ARGS=("$@")
declare -A GIVEN=()
while (($#)); do
  case $1 in
    --rounds) ROUNDS=$2; GIVEN[rounds]=1; shift 2 ;;
    --conns) CONNS=$2; shift 2 ;;
    --duration) DURATION=$2; GIVEN[duration]=1; shift 2 ;;
    --slow) SLOW=$2; GIVEN[slow]=1; shift 2 ;;
    --lines) LINES=$2; shift 2 ;;
    --workers) WORKERS=$2; shift 2 ;;
    --out) OUT=$2; OUT_GIVEN=1; shift 2 ;;
    --quiet-wait) QUIET_WAIT=$2; shift 2 ;;
    --no-install) INSTALL=0; shift ;;
    --smoke) SMOKE=1; shift ;;
    -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1' "$0"; exit 0 ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
done
if ((SMOKE)); then
  # small numbers, unless given explicitly
  [[ -n ${GIVEN[rounds]:-} ]] || ROUNDS=1
  [[ -n ${GIVEN[duration]:-} ]] || DURATION=2
  [[ -n ${GIVEN[slow]:-} ]] || SLOW=500
fi
for v in ROUNDS CONNS DURATION SLOW LINES WORKERS; do
  [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "--${v,,} must be a positive integer, got '${!v}'"
done
[[ $QUIET_WAIT =~ ^[0-9]+$ ]] || die "--quiet-wait must be a number of seconds"
if ((!OUT_GIVEN && !SMOKE)); then OUT="$LOAD_DIR/HOSTILE.md"; fi
[[ -z $OUT ]] || OUT=$(realpath -m "$OUT")
# Past its request_timeout canaryd answers 504; past proxy_read_timeout nginx gives up.
BODY_TIMEOUT=$((DURATION + 60))

# ---------------------------------------------------------------- open files
# The proxy holds --slow client connections, and so does the client (each its own process):
# raise the soft limit in this shell, inherited by everything started from it (nginx's
# workers get worker_rlimit_nofile), and the hard limit too if it is lower (needs root).
NOFILE=$((SLOW + 2048))
if [[ $(ulimit -Sn) != unlimited ]] && (($(ulimit -Sn) < NOFILE)); then
  if [[ $(ulimit -Hn) == unlimited ]] || (($(ulimit -Hn) >= NOFILE)); then
    ulimit -Sn "$NOFILE"
  else
    ulimit -n "$NOFILE" 2>/dev/null \
      || die "--slow $SLOW needs ulimit -n $NOFILE, above the hard limit $(ulimit -Hn), which this shell cannot raise"
  fi
fi
WORKER_CONNECTIONS=$((SLOW + 1024))

setup_workdir hostile   # sets WORK; cleans up spawned processes and WORK on exit

# ---------------------------------------------------------------- tools
missing=()
for t in nginx curl ss; do command -v "$t" >/dev/null || missing+=("$t"); done
command -v python3 >/dev/null || die "python3 is required (stdlib only)"
if ((${#missing[@]})); then
  pkgs=("${missing[@]/ss/iproute2}")
  ((INSTALL)) || die "missing: ${missing[*]} (run without --no-install, as root, to apt-get ${pkgs[*]})"
  [[ $EUID == 0 ]] || die "missing: ${missing[*]}; run as root so apt-get can install ${pkgs[*]}"
  log "installing with apt-get: ${pkgs[*]}"
  apt-get update >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y "${pkgs[@]}" >&2 || die "apt-get install ${pkgs[*]} failed"
fi

BIN=$(prepare_canaryd "$WORK/canaryd")

# ---------------------------------------------------------------- ports and configs
read -r P_SINK_S P_SINK_C P_CANARYD P_ADMIN P_NGINX <<<"$(free_ports 5)"
mkdir -p "$WORK/nginx-hostile-tmp" "$WORK/canaryd-etc"
render "$CONF/nginx-hostile.conf.tmpl" "$WORK/nginx-hostile.conf" \
  WORKERS="$WORKERS" DIR="$WORK" PORT="$P_NGINX" UPSTREAM_PORT="$P_SINK_S" NOFILE="$NOFILE" \
  WORKER_CONNECTIONS="$WORKER_CONNECTIONS" BODY_TIMEOUT="$BODY_TIMEOUT"
# canaryd's config alone in its directory (canaryd watches the whole directory); both arms on
# the sink, so every request goes to the same upstream whichever arm it lands on
canaryd_toml "$WORK/canaryd-etc/canaryd.toml" "$P_CANARYD" "$P_ADMIN" "$P_SINK_S" "$P_SINK_C" 10 \
  "max_connections = 20000
header_read_timeout = \"60s\"
request_timeout = \"${BODY_TIMEOUT}s\""
"$BIN" check --config "$WORK/canaryd-etc/canaryd.toml" >&2 || die "canaryd rejected the generated config"
nginx -t -q -p "$WORK" -c "$WORK/nginx-hostile.conf" -e "$WORK/nginx-check.log" \
  || die "nginx rejected the generated config"

SINK_STATS="$WORK/sink-stats.jsonl"
: > "$SINK_STATS"
spawn sink "$WORK/sink.log" python3 "$TOOLS/sink.py" --port "$P_SINK_S" --port "$P_SINK_C" --stats "$SINK_STATS"
SINK_PID=$SPAWN_PID
wait_tcp "$P_SINK_S" 10 "$SINK_PID" || die "the sink upstream did not start"
wait_tcp "$P_SINK_C" 10 "$SINK_PID" || die "the sink upstream did not start"

# ---------------------------------------------------------------- targets
TARGETS=(canaryd nginx)
T_PID='' T_PORT=''
start_target() {
  local name=$1
  case $name in
    canaryd)
      spawn canaryd "$WORK/canaryd.log" env TOKIO_WORKER_THREADS="$WORKERS" RUST_LOG=warn \
        "$BIN" run --config "$WORK/canaryd-etc/canaryd.toml"
      T_PID=$SPAWN_PID T_PORT=$P_CANARYD
      wait_http "http://127.0.0.1:$P_ADMIN/readyz" 10 "$T_PID" || die "canaryd did not start ($WORK/canaryd.log)" ;;
    nginx)
      spawn nginx "$WORK/nginx.log" nginx -p "$WORK" -c "$WORK/nginx-hostile.conf" -e "$WORK/nginx-hostile.error.log"
      T_PID=$SPAWN_PID T_PORT=$P_NGINX ;;
  esac
  wait_http "http://127.0.0.1:$T_PORT/" 10 "$T_PID" || die "$name does not serve 127.0.0.1:$T_PORT"
}
stop_target() {
  if [[ -n $T_PID ]]; then stop_pid "$T_PID" TERM 15; fi
  T_PID=
}

FAILED=()
fail() { FAILED+=("$1"); log "  FAILED: $1"; }

# CPU seconds of processes that are not ours (other work on a shared machine) since the mark
foreign_mark() { python3 "$TOOLS/procstat.py" --foreign $$ "$WORK/foreign.json"; }
foreign_cpu() { python3 "$TOOLS/procstat.py" --foreign $$ "$WORK/foreign.json" --diff; }
QUIET_LIMIT=0.2 QUIET_SPENT=0 RETRIES=0
wait_quiet() {
  local fc cores m0 m1 t0=$SECONDS
  while ((QUIET_SPENT + SECONDS - t0 < QUIET_WAIT)); do
    foreign_mark; m0=$(date +%s.%N); sleep 2; fc=$(foreign_cpu); m1=$(date +%s.%N)
    cores=$(python3 -c "print(round($fc / ($m1 - $m0), 2))")
    if python3 -c "import sys; sys.exit(0 if $cores < $QUIET_LIMIT else 1)"; then
      QUIET_SPENT=$((QUIET_SPENT + SECONDS - t0)); return 0
    fi
    log "other processes are using $cores cores; waiting for a quiet machine"
    sleep 3
  done
  QUIET_SPENT=$((QUIET_SPENT + SECONDS - t0))
  log "WARNING: the machine stayed busy (waited ${QUIET_SPENT}s in all, --quiet-wait $QUIET_WAIT); measuring anyway"
  return 1
}

# ---------------------------------------------------------------- 1. 1-byte chunks
FLOOD="$WORK/flood.tsv"
printf 'round\ttarget\twire_bytes\tdata_bytes\tseconds\tproxy_cpu_s\tproxy_hwm_kib\tupstream_cpu_s\tclient_cpu_s\tforeign_cpu_s\tup_chunks\tup_wire_bytes\tup_body_bytes\tforeign_seconds\n' > "$FLOOD"

# body_check: a small chunked POST through the target reaches the sink whole and gets 200
body_check() {
  local name=$1 code
  code=$(printf 'hello world' | curl -s -o /dev/null -w '%{http_code}' --max-time 10 \
    -H 'Transfer-Encoding: chunked' -H 'Content-Type: application/octet-stream' \
    --data-binary @- "http://127.0.0.1:$T_PORT/upload" || true)
  [[ $code == 200 ]] || fail "$name: a chunked POST got '$code', not 200"
}

flood_phase() {
  local r=$1 name=$2 json="$WORK/flood-$1-$2.json" before s0 s1 u0 u1 fc m0 m1
  rm -f "$WORK/row"
  start_target "$name"
  if ((r == 1)); then body_check "$name"; fi
  before=$(wc -l < "$SINK_STATS")
  foreign_mark; m0=$(date +%s.%N)
  s0=$(proc_stat "$T_PID"); u0=$(proc_stat "$SINK_PID")
  if ! timeout $((DURATION + 120)) python3 "$TOOLS/chunkflood.py" --port "$T_PORT" --conns "$CONNS" \
    --duration "$DURATION" --out "$json" > "$WORK/flood-$r-$name.log" 2>&1; then
    fail "$name: chunkflood.py: $(tail -c 600 "$WORK/flood-$r-$name.log")"
  fi
  s1=$(proc_stat "$T_PID" || echo "- - - -"); u1=$(proc_stat "$SINK_PID")
  m1=$(date +%s.%N); fc=$(foreign_cpu)
  kill -0 "$T_PID" 2>/dev/null || fail "$name exited during the flood ($WORK/$name.log)"
  if [[ -s $json && $s1 != -* ]]; then
    tail -n +"$((before + 1))" "$SINK_STATS" > "$WORK/sink-$r-$name.jsonl"
    python3 - "$r" "$name" "$json" "$WORK/sink-$r-$name.jsonl" "$s0" "$s1" "$u0" "$u1" "$fc" "$m0" "$m1" > "$WORK/row" <<'EOF'
import json, sys
r, name, jf, sf, s0, s1, u0, u1, fc, m0, m1 = sys.argv[1:]
c = json.load(open(jf))
up = [json.loads(l) for l in open(sf) if l.strip()]
s0, s1, u0, u1 = (x.split() for x in (s0, s1, u0, u1))
print("\t".join(str(x) for x in [
    r, name, c["wire_bytes"], c["data_bytes"], c["seconds"],
    f"{float(s1[0]) - float(s0[0]):.3f}", s1[1], f"{float(u1[0]) - float(u0[0]):.3f}",
    c["client_cpu_s"], fc, sum(u["chunks"] for u in up), sum(u["wire_bytes"] for u in up),
    sum(u["body_bytes"] for u in up), f"{float(m1) - float(m0):.3f}"]))
EOF
    log "  $name: $(awk -F'\t' '{printf "%.1f MB of wire body in %.1f s, proxy CPU %.2f s = %.4f s/MB", $3 / 1e6, $5, $6, $6 / ($3 / 1e6)}' "$WORK/row")"
  fi
  stop_target
}

# measure_flood ROUND TARGET: keeps the row, retaken (at most twice) when other processes
# used QUIET_LIMIT cores or more during it
measure_flood() {
  local attempt cores
  for attempt in 1 2 3; do
    flood_phase "$@"
    [[ -s "$WORK/row" ]] || return 0
    cores=$(awk -F'\t' '{printf "%.2f", $10 / $14}' "$WORK/row")
    if ((SMOKE)) || ((attempt == 3)) || ((QUIET_SPENT >= QUIET_WAIT)) \
      || python3 -c "import sys; sys.exit(0 if $cores < $QUIET_LIMIT else 1)"; then
      cat "$WORK/row" >> "$FLOOD"
      return 0
    fi
    RETRIES=$((RETRIES + 1))
    log "  other processes used $cores cores during that measurement; measuring again"
    wait_quiet || true
  done
}

# ---------------------------------------------------------------- 2. slowloris heads
MEM="$WORK/mem.tsv"
printf 'variant\ttarget\tconns\thead_bytes\topened\topen_at_ready\testablished\trecvq_bytes\tidle_rss_kib\trss_kib\thwm_kib\tnprocs\tseconds_to_ready\tclosed_by_server\tconnect_failures\n' > "$MEM"

mem_phase() {
  local variant=$1 name=$2 p="$WORK/slow-$1-$2" idle s est recvq rc=0 cpid
  start_target "$name"
  sleep 0.5
  idle=$(proc_stat "$T_PID")
  rm -f "$p.ready" "$p.stop" "$p.json"
  spawn "slowheads ($variant)" "$p.log" python3 "$TOOLS/slowheads.py" --port "$T_PORT" --conns "$SLOW" \
    --mode "$variant" --lines "$LINES" --line-bytes "$LINE_BYTES" --big-bytes "$BIG_BYTES" \
    --ready-file "$p.ready" --stop-file "$p.stop" --out "$p.json"
  cpid=$SPAWN_PID
  local i limit=$((60 + SLOW / 100 + LINES))
  for ((i = 0; i < limit * 10; i++)); do
    [[ -f $p.ready ]] && break
    kill -0 "$cpid" 2>/dev/null || break
    sleep 0.1
  done
  if [[ ! -f $p.ready ]]; then
    fail "$name ($variant): the connections were not all open after ${limit}s: $(tail -c 400 "$p.log")"
    stop_pid "$cpid" TERM 5; stop_target; return
  fi
  sleep 1   # let the proxy read what was sent last
  s=$(proc_stat "$T_PID" || echo "- - - -")
  # server-side sockets of the proxy's port: how many, and bytes the proxy has not read yet
  est=$(ss -Htn state established "( sport = :$T_PORT )" | wc -l)
  recvq=$(ss -Htn state established "( sport = :$T_PORT )" | awk '{s += $1} END {print s + 0}')
  touch "$p.stop"
  wait_exit "$cpid" 60 || rc=$?
  ((rc == 0)) || fail "$name ($variant): slowheads.py exited with $rc: $(tail -c 400 "$p.log")"
  kill -0 "$T_PID" 2>/dev/null || fail "$name exited while holding the slowloris connections ($WORK/$name.log)"
  if [[ -s $p.json && $s != -* ]]; then
    python3 - "$variant" "$name" "$p.json" "$p.ready" "$est" "$recvq" "$idle" "$s" >> "$MEM" <<'EOF'
import json, sys
variant, name, jf, rf, est, recvq, idle, s = sys.argv[1:]
c, ready = json.load(open(jf)), json.load(open(rf))
idle, s = idle.split(), s.split()
print("\t".join(str(x) for x in [
    variant, name, c["conns"], c["head_bytes"], c["opened"], ready["open_now"], est, recvq,
    idle[2], s[2], s[1], s[3], c["seconds_to_ready"], c["closed_by_server"], c["connect_failures"]]))
EOF
    tail -1 "$MEM" | awk -F'\t' -v n="$SLOW" '{
      if ($7 < n || $14 > 0 || $15 > 0) bad = 1
      printf "  %s (%s): %d held (%d established at the proxy), RSS %.1f -> %.1f MiB, %.1f KiB per connection%s\n",
        $2, $1, $6, $7, $9 / 1024, $10 / 1024, ($10 - $9) / n, bad ? " (NOT ALL HELD)" : ""}' >&2
    awk -F'\t' -v n="$SLOW" 'END {exit !($6 == n && $7 >= n && $14 == 0 && $15 == 0)}' "$MEM" \
      || fail "$name ($variant): not all $SLOW connections were held at the sample (see the table)"
  else
    fail "$name ($variant): no result"
  fi
  stop_target
}

# ---------------------------------------------------------------- run
if ((!SMOKE)); then wait_quiet || true; fi
STARTED=$(date -u '+%Y-%m-%d %H:%M UTC')
LOAD_AT_START=$(cut -d' ' -f1-3 /proc/loadavg)
log "work directory $WORK; rounds=$ROUNDS conns=$CONNS duration=${DURATION}s slow=$SLOW lines=$LINES workers=$WORKERS; ulimit -n $(ulimit -n)"
log "1. CPU per MB of 1-byte-chunk request body ($CONNS connections, ${DURATION}s each)"
for ((r = 1; r <= ROUNDS; r++)); do
  log "round $r/$ROUNDS"
  while read -r t; do measure_flood "$r" "$t"; done < <(order_for_round "$r")
done
log "2. memory with $SLOW slowloris heads"
for variant in lines big; do
  while read -r t; do mem_phase "$variant" "$t"; done < <(order_for_round 1)
done

# ---------------------------------------------------------------- report
VERSIONS=$(
  echo "- canaryd: $(canaryd_version "$BIN"), TOKIO_WORKER_THREADS=$WORKERS"
  echo "- nginx: $(nginx -v 2>&1 | sed 's/^nginx version: //'), worker_processes $WORKERS (\`conf/nginx-hostile.conf.tmpl\`)"
  echo "- Python: $(python3 -c 'import platform; print(platform.python_version())') (client and upstream)"
)
REPORT_ARGS=(--flood "$FLOOD" --mem "$MEM" --date "$STARTED"
  --machine "$(machine_info | sed "s/^- Load average at start: .*/- Load average at start: $LOAD_AT_START/")"
  --versions "$VERSIONS" --command "benches/load/hostile.sh ${ORIG_ARGS[*]:-}"
  --conns "$CONNS" --duration "$DURATION" --rounds "$ROUNDS" --slow "$SLOW" --lines "$LINES"
  --line-bytes "$LINE_BYTES" --big-bytes "$BIG_BYTES" --retries "$RETRIES")
for f in "${FAILED[@]:-}"; do [[ -z $f ]] || REPORT_ARGS+=(--failed "$f"); done
if [[ -n $OUT ]]; then
  python3 "$TOOLS/hostilereport.py" "${REPORT_ARGS[@]}" --out "$OUT"
  log "wrote $OUT"
else
  python3 "$TOOLS/hostilereport.py" "${REPORT_ARGS[@]}" --summary-only >&2
fi
if ((${#FAILED[@]})); then
  log "FAILED: ${FAILED[*]}"
  exit 1
fi
if ((SMOKE)); then log "smoke OK: canaryd and nginx measured, nothing failed"; fi
