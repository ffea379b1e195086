#!/usr/bin/env bash
# canaryd under load: reloads, a dying canary, slowloris, SIGTERM. One command:
#
#   benches/load/reliability.sh            # full run (~2 min), writes benches/load/RELIABILITY.md
#   benches/load/reliability.sh --smoke    # seconds, smaller numbers; writes nothing
#
# Each test starts a fresh canaryd (metrics and rollback circuit on, default worker threads) in
# front of two small Python upstreams (tools/upstream.py: "stable" and "canary", separate
# processes so the canary can be killed) and drives it with tools/loadclient.py, which logs
# every request (user id, bucket, status, arm header, the upstream that really answered):
#
#   1. reloads   200 config rewrites by rename, canary weight 10 <-> 20, while load runs
#                -> failed, and mis-routed: served by an arm that neither the old nor the
#                   new weight gives that user (README, "How routing works")
#   2. canary    SIGKILL the canary upstream under GET+POST load, wait for the circuit to
#      killed    trip, restart it, POST /reset -> failures by the user's arm (stable users
#                must never fail), circuit tripped, proxy still up, canary serving again
#   3. slowloris 250 idle + 250 slowloris connections held open (reopened when closed)
#                -> other clients' p50/p99 before vs during, failures
#   4. SIGTERM   under load with 200 ms upstream responses -> in-flight requests at the
#                signal completed/failed, exit code, drain time
#
# Options: --smoke, --out FILE (default benches/load/RELIABILITY.md), --no-install.
# Environment: CANARYD_BIN=PATH (skip the build), KEEP_TMP=1 (keep logs and CSVs).
# Exit status: 0 when every test passes, 1 otherwise (the report is written either way).
# Only loopback addresses; every process started here is stopped on exit.
set -euo pipefail

LOAD_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=lib/common.sh
source "$LOAD_DIR/lib/common.sh"

SMOKE=0 INSTALL=1
OUT="$LOAD_DIR/RELIABILITY.md"
ORIG_ARGS=("$@")
while (($#)); do
  case $1 in
    --smoke) SMOKE=1; shift ;;
    --out) OUT=$2; shift 2 ;;
    --no-install) INSTALL=0; shift ;;
    -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
done

if ((SMOKE)); then
  RELOADS=10 RELOAD_GAP=0.15 PHASE=1 IDLE=25 SLOW=25 SLOW_DURATION=3 TERM_LOAD=1
else
  RELOADS=200 RELOAD_GAP=0.15 PHASE=4 IDLE=250 SLOW=250 SLOW_DURATION=15 TERM_LOAD=4
fi
RATE=1000          # requests/s of the background load (Python client; leaves CPU for canaryd)
CONNS=32

setup_workdir reliability   # sets WORK; cleans up spawned processes and WORK on exit

for t in python3 curl; do
  command -v "$t" >/dev/null && continue
  if ((!INSTALL)) || [[ $EUID != 0 ]]; then die "$t is missing (run as root without --no-install to apt-get it)"; fi
  log "installing with apt-get: $t"
  apt-get update >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y "$t" >&2
done

BIN=$(prepare_canaryd "$WORK/canaryd")
read -r P_STABLE P_CANARY P_PROXY P_ADMIN <<<"$(free_ports 4)"
URL="http://127.0.0.1:$P_PROXY"
ADMIN="http://127.0.0.1:$P_ADMIN"
CFG_DIR="$WORK/etc"
CFG="$CFG_DIR/canaryd.toml"
mkdir -p "$CFG_DIR"

now() { date +%s.%N; }


CANARY_PID='' PROXY_PID='' CLIENT_PID=''
start_upstream() { # start_upstream stable|canary
  local name=$1 port
  [[ $name == stable ]] && port=$P_STABLE || port=$P_CANARY
  spawn "upstream-$name" "$WORK/upstream-$name.log" python3 "$TOOLS/upstream.py" --port "$port" --name "$name"
  if [[ $name == canary ]]; then CANARY_PID=$SPAWN_PID; fi
  wait_tcp "$port" 10 "$SPAWN_PID" || die "upstream $name did not start ($WORK/upstream-$name.log)"
}

write_config() { # write_config WEIGHT [EXTRA_LISTEN_LINES]: atomically, by rename
  canaryd_toml "$CFG_DIR/.canaryd.toml.tmp" "$P_PROXY" "$P_ADMIN" "$P_STABLE" "$P_CANARY" "$1" "${2:-}"
  mv -f "$CFG_DIR/.canaryd.toml.tmp" "$CFG"
}

start_proxy() { # start_proxy TEST_NAME [EXTRA_LISTEN_LINES]
  write_config 10 "${2:-}"
  spawn canaryd "$WORK/canaryd-$1.log" env RUST_LOG=info "$BIN" run --config "$CFG"
  PROXY_PID=$SPAWN_PID
  wait_http "$ADMIN/readyz" 10 "$PROXY_PID" || die "canaryd did not start ($WORK/canaryd-$1.log)"
}

stop_proxy() {
  if [[ -n $PROXY_PID ]]; then stop_pid "$PROXY_PID" TERM 30; fi
  PROXY_PID=
}

start_client() { # start_client NAME ARGS...: background load until stop_client
  local name=$1; shift
  rm -f "$WORK/stop-$name"
  spawn "client-$name" "$WORK/client-$name.log" python3 "$TOOLS/loadclient.py" --url "$URL" \
    --out "$WORK/$name.csv" --stop-file "$WORK/stop-$name" --duration 600 "$@"
  CLIENT_PID=$SPAWN_PID
}

stop_client() { # stop_client NAME: ask it to stop, wait for its CSV
  touch "$WORK/stop-$1"
  if ! wait_exit "$CLIENT_PID" 60; then
    log "load client did not stop in 60 s: $(tail -3 "$WORK/client-$1.log")"
    stop_pid "$CLIENT_PID" KILL 5
  fi
  [[ -s "$WORK/$1.csv" ]] || die "the load client wrote no CSV for $1 ($WORK/client-$1.log)"
  CLIENT_PID=
}

metric() { # metric NAME_WITH_LABELS: its value from /metrics, 0 if absent
  curl -s --max-time 5 "$ADMIN/metrics" | awk -v m="$1" '$1 == m {print $2; found=1} END {if (!found) print 0}'
}

start_upstream stable
start_upstream canary

# ------------------------------------------------------------------ 1. reloads
log "test 1: $RELOADS config reloads (canary 10 <-> 20 %, rename) under load"
start_proxy reload
start_client reload --rate "$RATE" --connections "$CONNS" --post-share 0.2
sleep 1
r0=$(metric 'canaryd_config_reloads_total{result="success"}')
for ((i = 1; i <= RELOADS; i++)); do
  if ((i % 2)); then write_config 20; else write_config 10; fi
  sleep "$RELOAD_GAP"
done
sleep 1
stop_client reload
r1=$(metric 'canaryd_config_reloads_total{result="success"}')
rf=$(metric 'canaryd_config_reloads_total{result="failure"}')
final_w=$(curl -s --max-time 5 "$ADMIN/weights")
alive1=$(kill -0 "$PROXY_PID" 2>/dev/null && echo yes || echo no)
stop_proxy
python3 "$TOOLS/analyze.py" reload "$WORK/reload.csv" --weights 10,20 > "$WORK/t1.json"
python3 - "$WORK/t1.json" "$RELOADS" "$r0" "$r1" "$rf" "$final_w" "$alive1" <<'EOF'
import json, sys
p, n, r0, r1, rf, w, alive = sys.argv[1:]
d = json.load(open(p))
d.update(rewrites=int(n), reloads_applied=int(float(r1) - float(r0)), reload_failures=int(float(rf)),
         final_weights=json.loads(w).get("effective"), proxy_alive=alive == "yes")
json.dump(d, open(p, "w"))
EOF
log "  $(head -c 400 "$WORK/t1.json")"

# ------------------------------------------------------------------ 2. canary killed
log "test 2: canary upstream killed and restarted under GET+POST load"
start_proxy kill
start_client kill --rate "$RATE" --connections "$CONNS" --post-share 0.5
sleep "$PHASE"
t_kill=$(now)
log "  SIGKILL to the canary upstream (pid $CANARY_PID)"
stop_pid "$CANARY_PID" KILL 5
CANARY_PID=
tripped=no t_trip=
for ((i = 0; i < 200; i++)); do
  w=$(curl -s --max-time 2 "$ADMIN/weights" || true)
  if python3 -c 'import json,sys; sys.exit(0 if "canary" in json.loads(sys.argv[1]).get("tripped", {}) else 1)' "$w" 2>/dev/null; then
    tripped=yes t_trip=$(now); echo "$w" > "$WORK/t2-weights-tripped.json"; break
  fi
  sleep 0.05
done
[[ $tripped == yes ]] || log "  the circuit did not trip within 10 s"
sleep "$PHASE"
start_upstream canary
t_restart=$(now)
sleep "$PHASE"
t_reset=$(now)
reset_status=$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 -X POST "$ADMIN/reset" || true)
sleep "$PHASE"
stop_client kill
healthz=$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 "$ADMIN/healthz" || true)
alive2=$(kill -0 "$PROXY_PID" 2>/dev/null && echo yes || echo no)
after_reset_w=$(curl -s --max-time 5 "$ADMIN/weights")
stop_proxy
python3 "$TOOLS/analyze.py" kill "$WORK/kill.csv" --weight 10 --t-kill "$t_kill" \
  --t-restart "$t_restart" --t-reset "$t_reset" > "$WORK/t2.json"
python3 - "$WORK/t2.json" "$tripped" "$t_kill" "${t_trip:-0}" "$healthz" "$alive2" "$reset_status" \
  "$WORK/t2-weights-tripped.json" "$after_reset_w" <<'EOF'
import json, os, sys
p, tripped, t_kill, t_trip, healthz, alive, reset, wfile, after = sys.argv[1:]
d = json.load(open(p))
trip = {}
if os.path.exists(wfile):
    trip = json.load(open(wfile)).get("tripped", {}).get("canary", {})
d.update(tripped=tripped == "yes", trip_reason=trip.get("reason"), trip_detail=trip.get("detail"),
         seconds_kill_to_trip=round(float(t_trip) - float(t_kill), 3) if tripped == "yes" else None,
         healthz=healthz, proxy_alive=alive == "yes", reset_status=reset,
         weights_after_reset=json.loads(after).get("effective") if after else None,
         tripped_after_reset=list(json.loads(after).get("tripped", {})) if after else None)
json.dump(d, open(p, "w"))
EOF
log "  $(head -c 400 "$WORK/t2.json")"

# ------------------------------------------------------------------ 3. slowloris
log "test 3: $IDLE idle + $SLOW slowloris connections held for ${SLOW_DURATION}s under load"
start_proxy slowloris
start_client slowloris --rate "$RATE" --connections 16
sleep "$PHASE"
t_s0=$(now)
spawn slowloris "$WORK/slowloris.log" python3 "$TOOLS/slowloris.py" --port "$P_PROXY" --idle "$IDLE" \
  --slow "$SLOW" --duration "$SLOW_DURATION" --interval 1 --out "$WORK/slowloris.json"
SL_PID=$SPAWN_PID
sleep $((SLOW_DURATION / 2))
open_conns=$(ss -Htn state established "( sport = :$P_PROXY )" | wc -l)
wait_exit "$SL_PID" $((SLOW_DURATION + 30)) || log "  slowloris.py ended with status $?"
t_s1=$(now)
sleep "$PHASE"
stop_client slowloris
alive3=$(kill -0 "$PROXY_PID" 2>/dev/null && echo yes || echo no)
stop_proxy
python3 "$TOOLS/analyze.py" latency "$WORK/slowloris.csv" --t-start "$t_s0" --t-end "$t_s1" > "$WORK/t3.json"
python3 - "$WORK/t3.json" "$WORK/slowloris.json" "$open_conns" "$alive3" <<'EOF'
import json, sys
p, sl, open_conns, alive = sys.argv[1:]
d = json.load(open(p))
try:
    d["slowloris"] = json.load(open(sl))
except (OSError, ValueError):
    d["slowloris"] = None
d.update(proxy_side_established_midway=int(open_conns), proxy_alive=alive == "yes")
json.dump(d, open(p, "w"))
EOF
log "  $(head -c 400 "$WORK/t3.json")"

# ------------------------------------------------------------------ 4. SIGTERM
log "test 4: SIGTERM under load (upstream answers take 200 ms)"
start_proxy sigterm 'drain_timeout = "10s"'
start_client sigterm --rate 250 --connections 64 --path "/?sleep_ms=200" --post-share 0.2
sleep "$TERM_LOAD"
t_term=$(now)
kill -TERM "$PROXY_PID"
rc=0; wait_exit "$PROXY_PID" 30 || rc=$?
t_exit=$(now)
PROXY_PID=
sleep 1
stop_client sigterm
python3 "$TOOLS/analyze.py" sigterm "$WORK/sigterm.csv" --t-term "$t_term" > "$WORK/t4.json"
python3 - "$WORK/t4.json" "$rc" "$t_term" "$t_exit" <<'EOF'
import json, sys
p, rc, t0, t1 = sys.argv[1:]
d = json.load(open(p))
d.update(exit_code=int(rc), seconds_to_exit=round(float(t1) - float(t0), 3))
json.dump(d, open(p, "w"))
EOF
log "  $(head -c 400 "$WORK/t4.json")"

# ------------------------------------------------------------------ report
STARTED_MD="$(date -u '+%Y-%m-%d %H:%M UTC')"
status=0
if ((SMOKE)); then
  python3 "$TOOLS/relreport.py" --dir "$WORK" --smoke >&2 || status=$?
else
  python3 "$TOOLS/relreport.py" --dir "$WORK" --out "$OUT" --date "$STARTED_MD" \
    --machine "$(machine_info)" --canaryd "$(canaryd_version "$BIN")" \
    --command "benches/load/reliability.sh ${ORIG_ARGS[*]:-}" \
    --params "reloads=$RELOADS gap=${RELOAD_GAP}s rate=$RATE conns=$CONNS idle=$IDLE slow=$SLOW slow_duration=${SLOW_DURATION}s phase=${PHASE}s" \
    || status=$?
  log "wrote $OUT"
fi
if ((status)); then log "some reliability checks FAILED (see above)"; exit 1; fi
log "reliability: all checks passed"
