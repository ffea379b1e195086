#!/usr/bin/env bash
# Memory and errors under many HTTP/2 streams at once: h2load opens C h2c connections with M
# streams in flight on each (1,000 x 100 = 100,000 requests in flight by default) against
# canaryd, nginx and HAProxy doing the same sticky 90/10 split to HTTP/1.1 upstreams, and the
# report gives each proxy's peak resident memory, its upstream connections at the peak, the
# responses that were not 2xx and the time it took. Memory per stream in flight is the peak
# less the resident memory before the load, over C x M.
#
#   benches/load/h2memory.sh               # 1,000 connections x 100 streams, 300,000 requests,
#                                          # writes benches/load/H2MEMORY.md
#   benches/load/h2memory.sh --smoke       # 50 x 20, 5,000 requests: proves it runs; writes nothing
# Options:
#   --connections C   h2c connections (default 1000)
#   --streams M       streams in flight per connection (default 100; every proxy is set to
#                     allow at least M)
#   --requests N      requests in all (default 300000)
#   --targets LIST    comma-separated subset of canaryd,nginx,haproxy (default: all)
#   --out FILE        where to write the markdown (default benches/load/H2MEMORY.md)
# Environment: CANARYD_BIN=PATH measures that binary instead of building this tree.
#
# Setup: the upstream pair of compare.sh (one nginx, 1 worker), one worker per proxy
# (canaryd TOKIO_WORKER_THREADS=1 with its defaults: upstream max_connections 1,024; nginx
# `listen ... http2` with http2_max_concurrent_streams M; HAProxy `bind ... proto h2` with
# tune.h2.max-concurrent-streams M). Peak memory is VmHWM of the proxy's processes; upstream
# connections are counted from /proc/net/tcp every 0.2 s (the most seen at once). The open-file
# limit of the shell (ulimit -n) applies to every proxy: it is printed with the results.
set -euo pipefail

LOAD_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=lib/common.sh
source "$LOAD_DIR/lib/common.sh"

CONNS=1000 STREAMS=100 REQUESTS=300000 SMOKE=0
OUT="$LOAD_DIR/H2MEMORY.md"
ORIG_ARGS=("$@")
TARGETS=(canaryd nginx haproxy)
while (($#)); do
  case $1 in
    --connections) CONNS=$2; shift 2 ;;
    --streams) STREAMS=$2; shift 2 ;;
    --requests) REQUESTS=$2; shift 2 ;;
    --targets) IFS=, read -r -a TARGETS <<<"$2"; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --smoke) SMOKE=1; shift ;;
    -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1' "$0"; exit 0 ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
done
if ((SMOKE)); then CONNS=50 STREAMS=20 REQUESTS=5000; fi
for v in CONNS STREAMS REQUESTS; do
  [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "--${v,,} must be a positive integer, got '${!v}'"
done
for t in "${TARGETS[@]}"; do
  [[ $t =~ ^(canaryd|nginx|haproxy)$ ]] || die "unknown target '$t' (canaryd, nginx, haproxy)"
done

setup_workdir h2memory

missing=()
for t in nginx haproxy curl; do command -v "$t" >/dev/null || missing+=("$t"); done
command -v h2load >/dev/null || missing+=(nghttp2-client)
if ((${#missing[@]})); then
  [[ $EUID == 0 ]] || die "missing: ${missing[*]}; run as root so apt-get can install them"
  log "installing ${missing[*]} (apt-get)"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"; } >&2 \
    || die "apt-get install ${missing[*]} failed"
fi

BIN=$(prepare_canaryd "$WORK/canaryd")
read -r UP_S UP_C P_CANARYD P_ADMIN P_NGINX P_HAPROXY <<<"$(free_ports 6)"
mkdir -p "$WORK/upstream-tmp" "$WORK/canaryd-etc" "$WORK/nginx-proxy-tmp"
render_peers 1 "$UP_S" "$UP_C" "$P_NGINX" "$P_HAPROXY"
# h2c listeners that allow M streams per connection (canaryd's default is 100)
sed -i "s|listen 127.0.0.1:$P_NGINX backlog=4096;|listen 127.0.0.1:$P_NGINX http2 backlog=4096;\n        http2_max_concurrent_streams $STREAMS;|" "$WORK/nginx-proxy.conf"
sed -i "s|^\(\s*\)bind 127.0.0.1:$P_HAPROXY\$|\1bind 127.0.0.1:$P_HAPROXY proto h2|; s|^\(\s*\)maxconn 8000\$|\1maxconn 8000\n\1tune.h2.max-concurrent-streams $STREAMS|" "$WORK/haproxy.cfg"
grep -q "$P_NGINX http2" "$WORK/nginx-proxy.conf" && grep -q "max-concurrent-streams $STREAMS" "$WORK/haproxy.cfg" \
  || die "could not give the peers h2c listeners"
canaryd_toml "$WORK/canaryd-etc/canaryd.toml" "$P_CANARYD" "$P_ADMIN" "$UP_S" "$UP_C" 10 \
  "http2_max_concurrent_streams = $((STREAMS > 100 ? STREAMS : 100))"
"$BIN" check --config "$WORK/canaryd-etc/canaryd.toml" >&2 || die "canaryd rejected the generated config"
nginx -t -q -p "$WORK" -c "$WORK/nginx-proxy.conf" -e "$WORK/nginx-check.log" || die "nginx rejected the generated config"
haproxy -c -q -f "$WORK/haproxy.cfg" || die "haproxy rejected the generated config"

spawn upstream "$WORK/upstream.log" nginx -p "$WORK" -c "$WORK/upstream.conf" -e "$WORK/upstream.error.log"
UP_PID=$SPAWN_PID
wait_http "http://127.0.0.1:$UP_S/" 10 "$UP_PID" || die "the upstream nginx did not start"

# upstream_conns: established TCP connections to either upstream port (both directions of a
# loopback connection are listed; those whose remote port is an upstream's are the proxy's)
upstream_conns() {
  awk -v s="$(printf '%04X' "$UP_S")" -v c="$(printf '%04X' "$UP_C")" \
    'NR > 1 && $4 == "01" { split($3, r, ":"); if (r[2] == s || r[2] == c) n++ } END { print n + 0 }' /proc/net/tcp
}

ROWS="$WORK/rows.tsv"
printf 'target\tok\tfailed\tnon2xx\tseconds\thwm_kib\trss0_kib\tupstream_conns\n' > "$ROWS"
FAILED=()
for name in "${TARGETS[@]}"; do
  case $name in
    canaryd)
      spawn canaryd "$WORK/canaryd.log" env TOKIO_WORKER_THREADS=1 RUST_LOG=warn \
        "$BIN" run --config "$WORK/canaryd-etc/canaryd.toml"
      pid=$SPAWN_PID port=$P_CANARYD
      wait_http "http://127.0.0.1:$P_ADMIN/readyz" 10 "$pid" || die "canaryd did not start" ;;
    nginx)
      spawn nginx "$WORK/nginx.log" nginx -p "$WORK" -c "$WORK/nginx-proxy.conf" -e "$WORK/nginx-proxy.error.log"
      pid=$SPAWN_PID port=$P_NGINX ;;
    haproxy)
      spawn haproxy "$WORK/haproxy.log" haproxy -f "$WORK/haproxy.cfg" -db
      pid=$SPAWN_PID port=$P_HAPROXY ;;
  esac
  for ((i = 0; i < 100; i++)); do
    if curl -sf -o /dev/null --http2-prior-knowledge --max-time 1 "http://127.0.0.1:$port/"; then break; fi
    sleep 0.1
  done
  curl -sf -o /dev/null --http2-prior-knowledge --max-time 5 "http://127.0.0.1:$port/" \
    || die "$name does not serve h2c on port $port (logs in $WORK; KEEP_TMP=1 keeps them)"
  # The most upstream connections seen at once, sampled while h2load runs.
  ( peak=0; while :; do n=$(upstream_conns); ((n > peak)) && peak=$n && echo "$peak" > "$WORK/peak-$name"; sleep 0.2; done ) &
  sampler=$!
  read -r _ _ rss0 _ <<<"$(proc_stat "$pid")"
  t0=$(date +%s.%N)
  h2load -n "$REQUESTS" -c "$CONNS" -m "$STREAMS" -t 1 -H 'x-user-id: user7' \
    "http://127.0.0.1:$port/" > "$WORK/h2load-$name.txt" 2>&1 || log "h2load exited non-zero against $name"
  t1=$(date +%s.%N)
  kill "$sampler" 2>/dev/null || true
  wait "$sampler" 2>/dev/null || true
  read -r _ hwm _ _ <<<"$(proc_stat "$pid")"
  stop_pid "$pid" TERM 15
  # h2load: "requests: N total, N started, N done, N succeeded, N failed, N errored, N timeout"
  # and "status codes: N 2xx, N 3xx, N 4xx, N 5xx"
  read -r ok failed < <(awk '/^requests:/ {print $8, $10}' "$WORK/h2load-$name.txt")
  non2xx=$(awk '/^status codes:/ {print $5 + $7 + $9}' "$WORK/h2load-$name.txt")
  [[ -n ${ok:-} && -n ${non2xx:-} ]] || die "no h2load summary against $name: $(tail -3 "$WORK/h2load-$name.txt")"
  printf '%s\t%s\t%s\t%s\t%.2f\t%s\t%s\t%s\n' "$name" "$ok" "$failed" "$non2xx" \
    "$(python3 -c "print($t1 - $t0)")" "$hwm" "$rss0" "$(cat "$WORK/peak-$name" 2>/dev/null || echo 0)" >> "$ROWS"
  log "  $name: $ok succeeded, $failed failed, $non2xx not 2xx, peak RSS $((hwm / 1024)) MiB"
  if [[ $name == canaryd ]] && ((failed + non2xx > 0)); then FAILED+=("canaryd: $failed failed, $non2xx not 2xx"); fi
done

python3 - "$ROWS" "$CONNS" "$STREAMS" "$REQUESTS" "$(ulimit -n)" > "$WORK/table.md" <<'EOF'
import sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1])]
head, rows = rows[0], rows[1:]
conns, streams, requests, nofile = sys.argv[2:]
print(f"`h2load -n {requests} -c {conns} -m {streams} -t 1` (h2c), one worker per proxy, "
      f"open-file limit {nofile}:\n")
print("| target | succeeded | failed | not 2xx | seconds | req/s | RSS before MiB | peak RSS MiB | KiB per stream in flight | upstream connections at most |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for t, ok, failed, non2xx, secs, hwm, rss0, up in rows:
    inflight = int(conns) * int(streams)
    print(f"| {t} | {ok} | {failed} | {non2xx} | {float(secs):.1f} | {int(ok) / float(secs):,.0f} | "
          f"{int(rss0) / 1024:.1f} | {int(hwm) / 1024:.1f} | {(int(hwm) - int(rss0)) / inflight:.2f} | {up} |")
EOF
cat "$WORK/table.md"
if ((${#FAILED[@]})); then die "${FAILED[*]}"; fi
if ((!SMOKE)); then
  {
    echo "# Many HTTP/2 streams at once: memory and errors"
    echo
    echo "Produced by \`benches/load/h2memory.sh\` (see \`benches/load/README.md\`)."
    echo
    machine_info
    echo "- canaryd: $(canaryd_version "$BIN"), TOKIO_WORKER_THREADS=1, upstream max_connections 1024 (default)"
    echo "- nginx: $(nginx -v 2>&1 | sed 's/^nginx version: //'), worker_processes 1, worker_connections 16384"
    echo "- HAProxy: $(haproxy -v | head -1 | awk '{print $3}'), nbthread 1, maxconn 8000"
    echo "- h2load: $(h2load --version | awk '{print $2}')"
    echo "- Command: \`benches/load/h2memory.sh ${ORIG_ARGS[*]:-}\`"
    echo
    cat "$WORK/table.md"
  } > "$OUT"
  log "wrote $OUT"
fi
