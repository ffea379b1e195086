#!/usr/bin/env bash
# canaryd vs nginx vs HAProxy vs direct: the same sticky 90/10 split by x-user-id, side by side.
#
#   benches/load/compare.sh            # full run (3 rounds, ~6 min), writes benches/load/RESULTS.md
#   benches/load/compare.sh --smoke    # seconds: proves every target serves; writes nothing
#   benches/load/compare.sh --proto h2tls --rounds 3   # HTTP/2 over TLS -> RESULTS-h2tls.md
#
# Options:
#   --rounds N          rounds; targets alternate inside each round (default 3)
#   --duration S        seconds per measured phase (default 10)
#   --connections N     wrk keep-alive connections at saturation (default 64)
#   --rate R            fixed request rate for the latency phase (default: --rate-pct of the
#                       slowest proxy's median saturation throughput)
#   --rate-pct P        that percentage (default 40; see README "Why 40%")
#   --workers N         worker processes/threads of every proxy and of the upstream (default 1)
#   --targets LIST      comma-separated subset of direct,canaryd,nginx,haproxy (default: all)
#   --out FILE          where to write the markdown (default: the --proto mode's report,
#                       benches/load/RESULTS.md for h1)
#   --quiet-wait S      at most S seconds in all spent waiting for other processes on the
#                       machine to go quiet (default 300; 0 = never wait or retake)
#   --latency-only      skip the saturation phase: only the fixed-rate latency phase, which
#                       needs --rate; for many short rounds that narrow the p99 interval
#   --pgo               also measure canaryd built with profile-guided optimisation
#                       (benches/load/pgo.sh, ~6 min more) as the target canaryd-pgo
#   --against REV       also measure canaryd as of git revision REV (built in a worktree, a
#                       few minutes more) as the target canaryd-base: a change judged against
#                       the code before it, in the same rounds, with per-round wins counted
#   --shadow            also measure canaryd copying every request ([shadow] percent = 100) to
#                       a shadow that answers after 1 s (canaryd-shadow-slow) and to one that
#                       refuses connections (canaryd-shadow-dead): the clients' latency and
#                       canaryd's memory must not depend on the shadow
#   --proto P           the protocols spoken (default h1); each writes its own report:
#                         h1     HTTP/1.1 both ways (wrk; oha) -> RESULTS.md
#                         h1tls  TLS 1.3 + HTTP/1.1 from the clients (wrk and oha --insecure over
#                                https), HTTP/1.1 upstreams. canaryd tls_cert/tls_key, nginx
#                                `listen ... ssl`, HAProxy `bind ... ssl crt ... alpn http/1.1`,
#                                one self-signed ECDSA P-256 certificate made with openssl.
#                                No direct target (the upstreams are plain HTTP) -> RESULTS-h1tls.md
#                         h2c    HTTP/2 from the clients, cleartext with prior knowledge: canaryd,
#                                nginx (`listen ... http2`), HAProxy (`bind ... proto h2`);
#                                HTTP/1.1 upstreams. No direct target (the upstreams do not speak
#                                h2c) -> RESULTS-h2.md
#                         h2tls  HTTP/2 over TLS 1.3 (ALPN h2) from the clients: nginx
#                                `listen ... ssl http2`, HAProxy `bind ... ssl crt ... alpn
#                                h2,http/1.1`; HTTP/1.1 upstreams; no direct -> RESULTS-h2tls.md
#                         h2e2e  HTTP/2 end to end ("gRPC-like"): h2c from the clients AND h2c
#                                (prior knowledge) to the upstreams, which listen with `http2`:
#                                canaryd `http2 = true`, nginx `grpc_pass grpc://` (its only
#                                HTTP/2 upstream proxy), HAProxy `server ... proto h2`; direct is
#                                h2load straight to the stable upstream over h2c -> RESULTS-h2e2e.md
#                       With HTTP/2 from the clients: saturation h2load -c 32 -m 16 -t 1 (one
#                       stable user), latency oha --http2 -p 16. The split check always speaks
#                       HTTP/1.1: over TLS to the measured port in the TLS modes (certificate not
#                       verified), else to canaryd's one port and to a second, plain HTTP/1.1
#                       listener of each peer. Before measuring, every target must answer 200
#                       over the mode's protocol (and TLS 1.3) or the run stops.
#   --h2                the same as --proto h2c
#   --h2-upstream U     with --proto h2e2e: the h2c upstream pair, nginx (default: the same
#                       nginx as the other modes, its two servers `listen ... http2`) or
#                       haproxy (conf/upstream-haproxy-h2.cfg.tmpl: two h2c frontends answering
#                       the same bodies with `http-request return`): a faster upstream, so
#                       that the proxies set the ceiling
#   --no-install        fail instead of installing missing tools
#   --smoke             1 round, 1 s phases, oha skipped if absent; no RESULTS.md
# Environment:
#   CANARYD_BIN=PATH    benchmark this binary instead of building target/release/canaryd
#   CANARYD_PGO_BIN=PATH  with --pgo: this PGO binary instead of running pgo.sh
#   CANARYD_BASE_BIN=PATH with --against: this binary instead of building REV
#   KEEP_TMP=1          keep the work directory (configs, logs, raw outputs) for inspection
#
# Only loopback addresses are used; ports come from the kernel (bind to port 0). Every
# process started here is killed on exit. Needs root to apt-get install missing tools.
set -euo pipefail

LOAD_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=lib/common.sh
source "$LOAD_DIR/lib/common.sh"

ROUNDS=3 DURATION=10 CONNS=64 RATE=auto RATE_PCT=40 WORKERS=1 SMOKE=0 INSTALL=1 QUIET_WAIT=300 PGO=0 AGAINST="" LAT_ONLY=0 SHADOW=0 PROTO=h1 H2_UPSTREAM=nginx
OUT_SET=0
TARGETS=(direct canaryd nginx haproxy)
OUT="$LOAD_DIR/RESULTS.md"
ORIG_ARGS=("$@")
while (($#)); do
  case $1 in
    --rounds) ROUNDS=$2; shift 2 ;;
    --duration) DURATION=$2; shift 2 ;;
    --connections) CONNS=$2; shift 2 ;;
    --rate) RATE=$2; shift 2 ;;
    --rate-pct) RATE_PCT=$2; shift 2 ;;
    --workers) WORKERS=$2; shift 2 ;;
    --out) OUT=$2; OUT_SET=1; shift 2 ;;
    --proto) PROTO=$2; shift 2 ;;
    --h2) PROTO=h2c; shift ;;
    --h2-upstream) H2_UPSTREAM=$2; shift 2 ;;
    --targets) IFS=, read -r -a TARGETS <<<"$2"; shift 2 ;;
    --no-install) INSTALL=0; shift ;;
    --pgo) PGO=1; shift ;;
    --shadow) SHADOW=1; shift ;;
    --latency-only) LAT_ONLY=1; shift ;;
    --against) AGAINST=$2; shift 2 ;;
    --quiet-wait) QUIET_WAIT=$2; shift 2 ;;
    --smoke) SMOKE=1; shift ;;
    -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1' "$0"; exit 0 ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
done
[[ $QUIET_WAIT =~ ^[0-9]+$ ]] || die "--quiet-wait must be a number of seconds"
for v in ROUNDS DURATION CONNS WORKERS RATE_PCT; do
  [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "--${v,,} must be a positive integer, got '${!v}'"
done
[[ $RATE == auto || $RATE =~ ^[1-9][0-9]*$ ]] || die "--rate must be a positive integer or 'auto'"
if ((LAT_ONLY)) && [[ $RATE == auto ]]; then
  die "--latency-only needs --rate R: without the saturation phase there is no throughput to take 40% of"
fi
# TLS: clients speak TLS 1.3 to the proxies; H2: clients speak HTTP/2 (h2load, oha --http2);
# H2UP: the proxies speak HTTP/2 (h2c, prior knowledge) to the upstreams, which listen so.
TLS=0 H2=0 H2UP=0 REPORT_NAME=RESULTS.md
case $PROTO in
  h1) ;;
  h1tls) TLS=1 REPORT_NAME=RESULTS-h1tls.md ;;
  h2c) H2=1 REPORT_NAME=RESULTS-h2.md ;;
  h2tls) TLS=1 H2=1 REPORT_NAME=RESULTS-h2tls.md ;;
  h2e2e) H2=1 H2UP=1 REPORT_NAME=RESULTS-h2e2e.md ;;
  *) die "unknown --proto '$PROTO' (h1, h1tls, h2c, h2tls, h2e2e)" ;;
esac
SCHEME=http
if ((TLS)); then SCHEME=https; fi
((OUT_SET)) || OUT="$LOAD_DIR/$REPORT_NAME"
[[ $H2_UPSTREAM =~ ^(nginx|haproxy)$ ]] || die "--h2-upstream must be nginx or haproxy"
[[ $H2_UPSTREAM == nginx || $PROTO == h2e2e ]] || die "--h2-upstream is for --proto h2e2e only"
if [[ $PROTO != h1 ]]; then
  ((SHADOW == 0)) || die "--proto $PROTO and --shadow are not measured together (only h1)"
fi
if ((TLS)) || [[ $PROTO == h2c ]]; then
  # The upstream pair speaks plain HTTP/1.1: there is no TLS or h2c "direct" to compare with.
  TARGETS=("${TARGETS[@]/direct}")
  read -r -a TARGETS <<<"${TARGETS[*]}"
fi
for t in "${TARGETS[@]}"; do
  [[ $t =~ ^(direct|canaryd|nginx|haproxy)$ ]] || die "unknown target '$t' (direct, canaryd, nginx, haproxy)"
done
# add_after_canaryd NAME: NAME goes right after canaryd, so the builds alternate with the
# peers like any other target
add_after_canaryd() {
  local i
  for i in "${!TARGETS[@]}"; do
    if [[ ${TARGETS[$i]} == canaryd ]]; then TARGETS=("${TARGETS[@]:0:i+1}" "$1" "${TARGETS[@]:i+1}"); return; fi
  done
  TARGETS+=("$1")
}
if [[ -n $AGAINST ]]; then add_after_canaryd canaryd-base; fi
if ((PGO)); then add_after_canaryd canaryd-pgo; fi
if ((SHADOW)); then add_after_canaryd canaryd-shadow-dead; add_after_canaryd canaryd-shadow-slow; fi
if ((SMOKE)); then ROUNDS=1 DURATION=1; fi
WARMUP=2
if ((SMOKE)); then WARMUP=0; fi
# oha connections: as many as wrk's for the 90% generator, a quarter of that (at least 8) for
# the 10% one, so that neither generator runs out of connections at the fixed rate
OHA_CONNS_STABLE=$CONNS
OHA_CONNS_CANARY=$((CONNS / 4 > 8 ? CONNS / 4 : 8))
# HTTP/2: h2load's 32 connections x 16 streams at saturation; oha's connections carry 16
# streams each at the fixed rate. TLS: oha does not verify the self-signed certificate.
H2_CONNS=32 H2_STREAMS=16
OHA_FLAGS=()
if ((H2)); then
  OHA_CONNS_STABLE=8 OHA_CONNS_CANARY=2 OHA_FLAGS=(--http2 -p "$H2_STREAMS")
fi
if ((TLS)); then OHA_FLAGS+=(--insecure); fi

setup_workdir compare   # sets WORK; cleans up spawned processes and WORK on exit

# ---------------------------------------------------------------- tools
ensure_tools() {
  local missing=() t
  for t in nginx haproxy wrk curl; do
    command -v "$t" >/dev/null || missing+=("$t")
  done
  if ((H2)) && ! command -v h2load >/dev/null; then missing+=(nghttp2-client); fi
  if ((TLS)) && ! command -v openssl >/dev/null; then missing+=(openssl); fi
  [[ -x /usr/bin/time ]] || missing+=(time)
  command -v python3 >/dev/null || die "python3 is required (stdlib only)"
  if ((${#missing[@]})); then
    ((INSTALL)) || die "missing: ${missing[*]} (run without --no-install, as root, to apt-get them)"
    [[ $EUID == 0 ]] || die "missing: ${missing[*]}; run as root so apt-get can install them"
    log "installing with apt-get: ${missing[*]}"
    apt-get update >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}" >&2
  fi
  HAVE_OHA=1
  if ! command -v oha >/dev/null; then
    if ((SMOKE)); then
      HAVE_OHA=0
      log "NOTE: oha is not installed; smoke mode skips the fixed-rate latency phase"
    else
      ((INSTALL)) || die "oha is missing (cargo install oha --locked)"
      command -v cargo >/dev/null || die "oha is missing and cargo is not available to install it"
      log "installing oha: cargo install oha --locked (several minutes)"
      timeout 1800 cargo install oha --locked >&2 || die "cargo install oha failed"
      export PATH="$HOME/.cargo/bin:$PATH"
    fi
  fi
}
ensure_tools

BIN=$(prepare_canaryd "$WORK/canaryd")
if ((PGO)); then
  PGO_BIN="$WORK/canaryd-pgo"
  prepare_pgo_canaryd "$PGO_BIN" "$INSTALL"
fi
if [[ -n $AGAINST ]]; then
  BASE_BIN="$WORK/canaryd-base"
  prepare_rev_canaryd "$AGAINST" "$BASE_BIN"
fi

# ---------------------------------------------------------------- ports and configs
read -r UP_S UP_C P_CANARYD P_ADMIN P_NGINX P_HAPROXY P_SLOW P_DEAD P_NGINX_H1 P_HAPROXY_H1 <<<"$(free_ports 10)"
mkdir -p "$WORK/upstream-tmp" "$WORK/nginx-proxy-tmp"
render_peers "$WORKERS" "$UP_S" "$UP_C" "$P_NGINX" "$P_HAPROXY"
if [[ $PROTO == h2c ]]; then
  # The measured listeners take h2c with prior knowledge; a second, HTTP/1.1 listener of the
  # same server block (frontend) serves the split check. canaryd takes both on one port.
  sed -i "s|listen 127.0.0.1:$P_NGINX backlog=4096;|listen 127.0.0.1:$P_NGINX http2 backlog=4096;\n        listen 127.0.0.1:$P_NGINX_H1 backlog=4096;|" "$WORK/nginx-proxy.conf"
  grep -q "$P_NGINX http2" "$WORK/nginx-proxy.conf" || die "could not give nginx an h2c listener"
fi
if [[ $PROTO == h2e2e ]]; then
  # HTTP/2 to the upstreams: the upstream pair listens for h2c only (nginx 1.22 does not take
  # HTTP/1.1 and h2c on one port); nginx proxies with grpc_pass (its own template, with the
  # same split and the same two client listeners as h2c above); HAProxy's servers get proto h2.
  if [[ $H2_UPSTREAM == haproxy ]]; then
    render "$CONF/upstream-haproxy-h2.cfg.tmpl" "$WORK/upstream-haproxy.cfg" \
      WORKERS="$WORKERS" DIR="$WORK" STABLE_PORT="$UP_S" CANARY_PORT="$UP_C"
    haproxy -c -q -f "$WORK/upstream-haproxy.cfg" || die "haproxy rejected the generated upstream config"
  else
    sed -i -e "s|listen 127.0.0.1:$UP_S backlog=4096;|listen 127.0.0.1:$UP_S http2 backlog=4096;|" \
      -e "s|listen 127.0.0.1:$UP_C backlog=4096;|listen 127.0.0.1:$UP_C http2 backlog=4096;|" "$WORK/upstream.conf"
    [[ $(grep -c ' http2 backlog' "$WORK/upstream.conf") == 2 ]] || die "could not make the upstream pair speak h2c"
  fi
  render "$CONF/nginx-proxy-grpc.conf.tmpl" "$WORK/nginx-proxy.conf" \
    WORKERS="$WORKERS" DIR="$WORK" STABLE_PORT="$UP_S" CANARY_PORT="$UP_C" PORT="$P_NGINX" H1_PORT="$P_NGINX_H1"
  sed -i "s|^\(\s*server [a-z]* 127.0.0.1:[0-9]* weight [0-9]*\)\$|\1 proto h2|" "$WORK/haproxy.cfg"
  [[ $(grep -c ' proto h2$' "$WORK/haproxy.cfg") == 2 ]] || die "could not make HAProxy's servers speak h2c"
fi
if [[ $PROTO == h2c || $PROTO == h2e2e ]]; then
  sed -i "s|^\(\s*\)bind 127.0.0.1:$P_HAPROXY\$|\1bind 127.0.0.1:$P_HAPROXY proto h2\n\1bind 127.0.0.1:$P_HAPROXY_H1|" "$WORK/haproxy.cfg"
  grep -q "$P_HAPROXY proto h2" "$WORK/haproxy.cfg" || die "could not give HAProxy an h2c listener"
fi
CANARYD_LISTEN_EXTRA=''
if ((TLS)); then
  # One self-signed certificate for the three proxies, in a directory of its own (canaryd
  # watches the certificate's directory). The clients do not verify it. The split check speaks
  # HTTP/1.1 over TLS (ALPN http/1.1) to the measured port, so no second listener is needed.
  mkdir -p "$WORK/tls"
  self_signed_cert "$WORK/tls"
  nginx_listen="ssl" haproxy_alpn="http/1.1"
  if ((H2)); then nginx_listen="ssl http2" haproxy_alpn="h2,http/1.1"; fi
  # nginx 1.22 leaves TLS 1.3 off unless ssl_protocols names it (on by default from 1.23.4);
  # canaryd (rustls) and HAProxy take TLS 1.2 and 1.3 by default
  sed -i "s|listen 127.0.0.1:$P_NGINX backlog=4096;|listen 127.0.0.1:$P_NGINX $nginx_listen backlog=4096;\n        ssl_certificate $WORK/tls/cert.pem;\n        ssl_certificate_key $WORK/tls/key.pem;\n        ssl_protocols TLSv1.2 TLSv1.3;|" "$WORK/nginx-proxy.conf"
  # prefer-client-ciphers: HAProxy would pick the cipher suite by its own order; canaryd
  # (rustls) and nginx (ssl_prefer_server_ciphers off) follow the client's, and so must it, or
  # h2load's AES-128-GCM would meet HAProxy's AES-256-GCM only
  sed -i -e "s|^\(\s*\)bind 127.0.0.1:$P_HAPROXY\$|\1bind 127.0.0.1:$P_HAPROXY ssl crt $WORK/tls/cert-key.pem alpn $haproxy_alpn prefer-client-ciphers|" \
    -e "s|set-header X-Forwarded-Proto http\$|set-header X-Forwarded-Proto https|" "$WORK/haproxy.cfg"
  if ! grep -q "$P_NGINX $nginx_listen backlog" "$WORK/nginx-proxy.conf" || ! grep -q "$P_HAPROXY ssl crt" "$WORK/haproxy.cfg"; then
    die "could not give the peers TLS listeners"
  fi
  CANARYD_LISTEN_EXTRA="tls_cert = \"$WORK/tls/cert.pem\"
tls_key = \"$WORK/tls/key.pem\""
fi
# canaryd watches its config file's whole directory: keep the file alone in a directory of its
# own, or every result file written next to it wakes canaryd's watcher (measured: enough CPU
# and stalls to about double canaryd's CPU per request at the fixed rate).
mkdir -p "$WORK/canaryd-etc"
canaryd_toml "$WORK/canaryd-etc/canaryd.toml" "$P_CANARYD" "$P_ADMIN" "$UP_S" "$UP_C" 10 "$CANARYD_LISTEN_EXTRA"
if ((H2UP)); then
  sed -i 's|^url = "http://127.0.0.1:[0-9]*"$|&\nhttp2 = true|' "$WORK/canaryd-etc/canaryd.toml"
  [[ $(grep -c '^http2 = true$' "$WORK/canaryd-etc/canaryd.toml") == 2 ]] || die "could not set http2 = true on canaryd's upstreams"
fi
if ((SHADOW)); then
  # The same config, with every GET copied to a shadow: one answering after 1 s (a Python
  # upstream with a fixed delay), one on a port nothing listens on (P_DEAD stays closed).
  for kind in slow dead; do
    port=$P_SLOW
    if [[ $kind == dead ]]; then port=$P_DEAD; fi
    mkdir -p "$WORK/canaryd-shadow-$kind-etc"
    { cat "$WORK/canaryd-etc/canaryd.toml"
      printf '\n[[upstream]]\nname = "shadow"\nurl = "http://127.0.0.1:%s"\nweight = 0\n' "$port"
      printf '\n[shadow]\nupstream = "shadow"\npercent = 100\n'
    } > "$WORK/canaryd-shadow-$kind-etc/canaryd.toml"
    "$BIN" check --config "$WORK/canaryd-shadow-$kind-etc/canaryd.toml" >&2 \
      || die "canaryd rejected the generated shadow config"
  done
  spawn shadow-slow "$WORK/shadow-slow.log" python3 "$TOOLS/upstream.py" --port "$P_SLOW" \
    --name shadow --delay-ms 1000
  # Its answers take 1 s, longer than wait_http's tries: wait for the port instead.
  for ((i = 0; i < 100; i++)); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$P_SLOW") 2>/dev/null; then break; fi
    sleep 0.1
  done
  (exec 3<>"/dev/tcp/127.0.0.1/$P_SLOW") 2>/dev/null || die "the slow shadow did not start"
fi
"$BIN" check --config "$WORK/canaryd-etc/canaryd.toml" >&2 || die "canaryd rejected the generated config"
nginx -t -q -p "$WORK" -c "$WORK/nginx-proxy.conf" -e "$WORK/nginx-check.log" \
  || die "nginx rejected the generated config"
haproxy -c -q -f "$WORK/haproxy.cfg" || die "haproxy rejected the generated config"

if [[ $H2_UPSTREAM == haproxy ]]; then
  spawn upstream "$WORK/upstream.log" haproxy -f "$WORK/upstream-haproxy.cfg" -db
else
  spawn upstream "$WORK/upstream.log" nginx -p "$WORK" -c "$WORK/upstream.conf" -e "$WORK/upstream.error.log"
fi
UP_PID=$SPAWN_PID
UP_CURL=()
if ((H2UP)); then UP_CURL=(--http2-prior-knowledge); fi
wait_http "http://127.0.0.1:$UP_S/" 10 "$UP_PID" "${UP_CURL[@]}" || die "the upstream pair did not start ($WORK/upstream.log, upstream.error.log)"
wait_http "http://127.0.0.1:$UP_C/" 10 "$UP_PID" "${UP_CURL[@]}" || die "the upstream pair did not start"

# ---------------------------------------------------------------- targets
T_PID='' T_URL='' T_H1_URL=''
start_target() {
  local name=$1
  case $name in
    direct)
      T_PID='' T_URL="http://127.0.0.1:$UP_S/" ;;
    canaryd|canaryd-pgo|canaryd-base|canaryd-shadow-slow|canaryd-shadow-dead)
      local bin=$BIN etc="$WORK/canaryd-etc"
      if [[ $name == canaryd-pgo ]]; then bin=$PGO_BIN; fi
      if [[ $name == canaryd-base ]]; then bin=$BASE_BIN; fi
      if [[ $name == canaryd-shadow-* ]]; then etc="$WORK/$name-etc"; fi
      spawn "$name" "$WORK/$name.log" env TOKIO_WORKER_THREADS="$WORKERS" RUST_LOG=warn \
        "$bin" run --config "$etc/canaryd.toml"
      T_PID=$SPAWN_PID T_URL="$SCHEME://127.0.0.1:$P_CANARYD/"
      wait_http "http://127.0.0.1:$P_ADMIN/readyz" 10 "$T_PID" || die "$name did not start ($WORK/$name.log)" ;;
    nginx)
      spawn nginx "$WORK/nginx-proxy.log" nginx -p "$WORK" -c "$WORK/nginx-proxy.conf" -e "$WORK/nginx-proxy.error.log"
      T_PID=$SPAWN_PID T_URL="$SCHEME://127.0.0.1:$P_NGINX/" ;;
    haproxy)
      spawn haproxy "$WORK/haproxy.log" haproxy -f "$WORK/haproxy.cfg" -db
      T_PID=$SPAWN_PID T_URL="$SCHEME://127.0.0.1:$P_HAPROXY/" ;;
  esac
  # T_H1_URL: where the split check speaks HTTP/1.1 (none for h2e2e's h2c-only direct)
  T_H1_URL=$T_URL
  if [[ $PROTO == h2c || $PROTO == h2e2e ]]; then
    case $name in
      nginx) T_H1_URL="http://127.0.0.1:$P_NGINX_H1/" ;;
      haproxy) T_H1_URL="http://127.0.0.1:$P_HAPROXY_H1/" ;;
      direct) T_H1_URL='' ;;
    esac
  fi
  if [[ -n $T_H1_URL && $T_H1_URL != "$T_URL" ]]; then
    wait_http "$T_H1_URL" 10 "$T_PID" || die "$name does not serve $T_H1_URL (logs in $WORK)"
  fi
  check_protocol "$name"
}
# check_protocol NAME: the target answers 200 on T_URL over the mode's protocol (HTTP/2 where
# the clients speak it, and TLS 1.3 in the TLS modes), or the run stops. The first time, what
# was negotiated goes to $WORK/tls-NAME.
check_protocol() {
  local name=$1 want=1.1 args=(--http1.1) got tls
  case $PROTO in
    h2c|h2e2e) want=2 args=(--http2-prior-knowledge) ;;
    h2tls) want=2 args=(--http2) ;;  # over https: ALPN offering h2 and http/1.1
  esac
  wait_http "$T_URL" 10 "$T_PID" "${args[@]}" || die "$name does not serve $T_URL (logs in $WORK; KEEP_TMP=1 keeps them)"
  got=$(curl -sk -o /dev/null --max-time 5 -H 'x-user-id: user1' -w '%{http_version} %{response_code}' "${args[@]}" "$T_URL") || true
  if [[ $got != "$want 200" ]]; then
    die "$name answered '$got' (HTTP version, status) on $T_URL, not HTTP/$want 200 (logs in $WORK; KEEP_TMP=1 keeps them)"
  fi
  if ((TLS)); then
    tls=$(curl -skv -o /dev/null --max-time 5 "${args[@]}" "$T_URL" 2>&1 | sed -n 's/^\* SSL connection using //p' | head -1) || true
    [[ $tls == TLSv1.3* ]] || die "$name negotiated '$tls' with curl, not TLS 1.3"
    [[ -f "$WORK/tls-$name" ]] || echo "$tls" > "$WORK/tls-$name"
  fi
}
stop_target() {
  if [[ -n $T_PID ]]; then stop_pid "$T_PID" TERM 15; fi
  T_PID=
}


FAILED=()
split_check() {
  local name=$1 uids=$2 extra=() users=1000
  if [[ -z $T_H1_URL ]]; then
    # h2e2e's direct: h2c only, no HTTP/1.1 to check over; check_protocol saw it answer 200
    echo "user1 user1" > "$uids"
    return
  fi
  if [[ $name == canaryd* ]]; then extra=(--exact-md5 10); fi
  if ! python3 "$TOOLS/splitcheck.py" "$T_H1_URL" "$name" --users "$users" --emit-uids "$uids" "${extra[@]}" >&2; then
    FAILED+=("$name: split check")
  fi
}

# sample PID -> "cpu hwm rss" of the target's process tree ("0 0 0" for direct)
sample() { if [[ -n ${1:-} ]]; then proc_stat "$1"; else echo "0 0 0 0"; fi; }

THR="$WORK/throughput.tsv" LAT="$WORK/latency.tsv"
printf 'round\ttarget\trequests\trps\terrors\tcpu_s\thwm_kib\trss_kib\tupstream_cpu_s\tseconds\tgen_cpu_s\tforeign_cpu_s\n' > "$THR"
printf 'round\ttarget\trate\tresponses\tp50_ms\tp99_ms\tp999_ms\tnon2xx\tmissing\tcpu_s\thwm_kib\trss_kib\tupstream_cpu_s\tseconds\tgen_cpu_s\tforeign_cpu_s\n' > "$LAT"

# CPU seconds used by the load generator(s) of the last run: sum of /usr/bin/time outputs
gen_cpu() { cat "$@" 2>/dev/null | awk 'NF == 2 && $1 ~ /^[0-9.]+$/ {s += $1 + $2} END {printf "%.3f", s}'; }
# CPU seconds of processes that are not ours (other work on a shared machine) since mark
foreign_mark() { python3 "$TOOLS/procstat.py" --foreign $$ "$WORK/foreign.json"; }
foreign_cpu() { python3 "$TOOLS/procstat.py" --foreign $$ "$WORK/foreign.json" --diff; }

run_wrk() { # run_wrk SECONDS OUTFILE  (generator CPU seconds go to OUTFILE.time)
  if ((H2)); then
    # h2load sends one header set: the stable arm's user (uids file of the split check).
    local st ca
    read -r st ca < "$WORK/uids-$CUR"
    timeout $(($1 + 30)) /usr/bin/time -f '%U %S' -o "$2.time" \
      h2load -D "$1" -c "$H2_CONNS" -m "$H2_STREAMS" -t 1 -H "x-user-id: $st" "$T_URL" > "$2" 2>&1 \
      || { log "h2load failed against $T_URL: $(tail -3 "$2")"; return 1; }
    # HTTP/2 it must be: h2c with prior knowledge, or h2 by ALPN over TLS
    local alpn=h2c
    if ((TLS)); then alpn=h2; fi
    grep -qx "Application protocol: $alpn" "$2" \
      || { log "h2load did not speak $alpn to $T_URL: $(grep -i 'protocol' "$2" | tr '\n' ' ')"; return 1; }
    if ((TLS)) && [[ ! -f "$WORK/gen-tls-$CUR" ]]; then
      # what h2load negotiated: "TLSv1.3 / TLS_AES_256_GCM_SHA384"
      awk -F': ' '/^TLS Protocol:/ {p = $2} /^Cipher:/ {c = $2} END {print p " / " c}' "$2" > "$WORK/gen-tls-$CUR"
    fi
    return 0
  fi
  timeout $(($1 + 30)) /usr/bin/time -f '%U %S' -o "$2.time" \
    wrk -t1 -c"$CONNS" -d"${1}s" --timeout 5s -s "$TOOLS/userid.lua" "$T_URL" > "$2" 2>&1 \
    || { log "wrk failed against $T_URL: $(tail -3 "$2")"; return 1; }
}

throughput_phase() {
  local r=$1 name=$2 out="$WORK/wrk-$1-$2.txt"
  CUR=$name
  start_target "$name"
  if ((r == 1)) || [[ ! -f "$WORK/uids-$name" ]]; then split_check "$name" "$WORK/uids-$name"; fi
  if ((WARMUP)); then run_wrk "$WARMUP" "$WORK/warmup.txt" || true; fi
  local s0 u0 s1 u1 t0 t1 fc
  foreign_mark
  s0=$(sample "$T_PID"); u0=$(proc_stat "$UP_PID"); t0=$(date +%s.%N)
  if ! run_wrk "$DURATION" "$out"; then FAILED+=("$name: wrk"); stop_target; return; fi
  t1=$(date +%s.%N); s1=$(sample "$T_PID"); u1=$(proc_stat "$UP_PID")
  fc=$(foreign_cpu)
  local requests rps errors
  local gen=wrk
  if ((H2)); then gen=h2load; fi
  read -r requests rps errors < <(python3 "$TOOLS/parse.py" "$gen" "$out")
  ((requests > 0)) || FAILED+=("$name: no request served")
  ((errors == 0)) || FAILED+=("$name: $errors errors under wrk")
  python3 - "$r" "$name" "$requests" "$rps" "$errors" "$s0" "$s1" "$u0" "$u1" "$t0" "$t1" \
    "$(gen_cpu "$out.time")" "$fc" > "$WORK/row" <<'EOF'
import sys
r, name, req, rps, err, s0, s1, u0, u1, t0, t1, gen, fc = sys.argv[1:]
s0, s1, u0, u1 = (x.split() for x in (s0, s1, u0, u1))
print("\t".join([r, name, req, rps, err, f"{float(s1[0]) - float(s0[0]):.3f}", s1[1], s1[2],
                 f"{float(u1[0]) - float(u0[0]):.3f}", f"{float(t1) - float(t0):.3f}", gen, fc]))
EOF
  log "  $name: $rps req/s, $errors errors"
  stop_target
}

run_oha() { # run_oha RATE SECONDS PREFIX: one oha per arm (90% stable user, 10% canary user)
  local rate=$1 secs=$2 prefix=$3 st ca
  read -r st ca < "$WORK/uids-$CUR"
  local rs rc
  rs=$(python3 -c "print(max(1, round($rate * 0.9)))"); rc=$(python3 -c "print(max(1, $rate - $rs))")
  local pids=() ok=1
  timeout $((secs + 30)) /usr/bin/time -f '%U %S' -o "$prefix-stable.time" \
    oha -z "${secs}s" -q "$rs" -c "$OHA_CONNS_STABLE" "${OHA_FLAGS[@]}" --latency-correction --no-tui \
    --worker-threads 1 --output-format csv -H "x-user-id: $st" -o "$prefix-stable.csv" "$T_URL" > "$prefix-stable.log" 2>&1 &
  pids+=($!)
  timeout $((secs + 30)) /usr/bin/time -f '%U %S' -o "$prefix-canary.time" \
    oha -z "${secs}s" -q "$rc" -c "$OHA_CONNS_CANARY" "${OHA_FLAGS[@]}" --latency-correction --no-tui \
    --worker-threads 1 --output-format csv -H "x-user-id: $ca" -o "$prefix-canary.csv" "$T_URL" > "$prefix-canary.log" 2>&1 &
  pids+=($!)
  local p
  for p in "${pids[@]}"; do wait "$p" || ok=0; done
  ((ok)) || { log "oha failed against $T_URL: $(cat "$prefix"-{stable,canary}.log | tail -3)"; return 1; }
}

CUR=
latency_phase() {
  local r=$1 name=$2 rate=$3 prefix="$WORK/oha-$1-$2"
  CUR=$name
  start_target "$name"
  if [[ ! -f "$WORK/uids-$name" ]]; then split_check "$name" "$WORK/uids-$name"; fi
  if ((WARMUP)); then run_oha "$rate" "$WARMUP" "$WORK/oha-warmup" || true; fi
  local s0 u0 s1 u1 t0 t1 fc
  foreign_mark
  s0=$(sample "$T_PID"); u0=$(proc_stat "$UP_PID"); t0=$(date +%s.%N)
  if ! run_oha "$rate" "$DURATION" "$prefix"; then FAILED+=("$name: oha"); stop_target; return; fi
  t1=$(date +%s.%N); s1=$(sample "$T_PID"); u1=$(proc_stat "$UP_PID")
  fc=$(foreign_cpu)
  local resp p50 p99 p999 non2xx missing
  read -r resp p50 p99 p999 non2xx missing < <(python3 "$TOOLS/parse.py" oha "$rate" "$DURATION" "$prefix"-{stable,canary}.csv)
  ((resp > 0)) || FAILED+=("$name: no response at fixed rate")
  ((non2xx == 0)) || FAILED+=("$name: $non2xx non-2xx at fixed rate")
  python3 - "$r" "$name" "$rate" "$resp" "$p50" "$p99" "$p999" "$non2xx" "$missing" "$s0" "$s1" "$u0" "$u1" "$t0" "$t1" \
    "$(gen_cpu "$prefix"-{stable,canary}.time)" "$fc" > "$WORK/row" <<'EOF'
import sys
a = sys.argv[1:]
s0, s1, u0, u1 = (x.split() for x in a[9:13])
t0, t1, gen, fc = a[13:17]
print("\t".join(a[:9] + [f"{float(s1[0]) - float(s0[0]):.3f}", s1[1], s1[2],
                         f"{float(u1[0]) - float(u0[0]):.3f}", f"{float(t1) - float(t0):.3f}", gen, fc]))
EOF
  log "  $name @ $rate req/s: p50 $p50 ms, p99 $p99 ms, p99.9 $p999 ms ($missing missing)"
  stop_target
}

# ---------------------------------------------------------------- run
# The machine may be shared (builds, test suites). Before the first measurement, wait up to
# 2 min for other processes to use under 0.2 of a core. A measurement during which they used
# 0.2 core or more is thrown away and taken again after waiting for quiet (at most twice);
# what others used is recorded for every kept measurement.
QUIET_LIMIT=0.2 RETRIES=0 QUIET_SPENT=0
wait_quiet() {
  local fc t0=$SECONDS
  while ((QUIET_SPENT + SECONDS - t0 < QUIET_WAIT)); do
    foreign_mark; sleep 2; fc=$(foreign_cpu)
    if python3 -c "import sys; sys.exit(0 if $fc / 2 < $QUIET_LIMIT else 1)"; then
      QUIET_SPENT=$((QUIET_SPENT + SECONDS - t0)); return 0
    fi
    log "other processes are using $(python3 -c "print(round($fc / 2, 2))") cores; waiting for a quiet machine"
    sleep 3
  done
  QUIET_SPENT=$((QUIET_SPENT + SECONDS - t0))
  log "WARNING: the machine stayed busy (waited ${QUIET_SPENT}s in all, --quiet-wait $QUIET_WAIT); measuring anyway"
  return 1
}
# measure PHASE_FN TSV ARGS...: run the phase, keep its row, retry if others disturbed it
measure() {
  local fn=$1 tsv=$2 attempt cores; shift 2
  for attempt in 1 2 3; do
    rm -f "$WORK/row"
    "$fn" "$@"
    [[ -s "$WORK/row" ]] || return 0
    cores=$(awk -F'\t' '{printf "%.2f", $NF / $(NF - 2)}' "$WORK/row")
    if ((SMOKE)) || ((attempt == 3)) || ((QUIET_SPENT >= QUIET_WAIT)) \
      || python3 -c "import sys; sys.exit(0 if $cores < $QUIET_LIMIT else 1)"; then
      cat "$WORK/row" >> "$tsv"
      return 0
    fi
    RETRIES=$((RETRIES + 1))
    log "  other processes used $cores cores during that measurement; measuring again"
    wait_quiet || true
  done
}
if ((!SMOKE)); then wait_quiet || true; fi
STARTED=$(date -u '+%Y-%m-%d %H:%M UTC')
LOAD_AT_START=$(cut -d' ' -f1-3 /proc/loadavg)
log "work directory $WORK; rounds=$ROUNDS duration=${DURATION}s connections=$CONNS workers=$WORKERS"
if ((LAT_ONLY)); then
  ((HAVE_OHA)) || die "--latency-only measures nothing without oha"
  log "phase 1 skipped (--latency-only)"
else
  if ((H2)); then
    log "phase 1: throughput at saturation (h2load -c $H2_CONNS -m $H2_STREAMS -t 1 -D $DURATION, --proto $PROTO)"
  else
    log "phase 1: throughput at saturation (wrk -t1 -c$CONNS -d${DURATION}s, --proto $PROTO)"
  fi
  for ((r = 1; r <= ROUNDS; r++)); do
    log "round $r/$ROUNDS"
    while read -r t; do measure throughput_phase "$THR" "$r" "$t"; done < <(order_for_round "$r")
  done
fi

if ((HAVE_OHA)); then
  if [[ $RATE == auto ]]; then
    RATE=$(python3 - "$THR" "$RATE_PCT" <<'EOF'
import statistics, sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1])][1:]
by = {}
for r in rows:
    if r[1] != "direct":
        by.setdefault(r[1], []).append(float(r[3]))
if not by:  # only the direct baseline was measured
    by = {"direct": [float(r[3]) for r in rows]}
slowest = min(statistics.median(v) for v in by.values())
print(max(100, int(slowest * float(sys.argv[2]) / 100 / 100) * 100))
EOF
)
    RATE_NOTE="$RATE_PCT% of the slowest proxy's median saturation throughput, rounded down to 100"
  else
    RATE_NOTE="set with --rate"
  fi
  log "phase 2: latency at a fixed $RATE req/s (oha --latency-correction, ${DURATION}s)"
  for ((r = 1; r <= ROUNDS; r++)); do
    log "round $r/$ROUNDS"
    while read -r t; do measure latency_phase "$LAT" "$r" "$t" "$RATE"; done < <(order_for_round "$r")
  done
else
  RATE=0 RATE_NOTE="skipped: oha not installed"
fi

if ((${#FAILED[@]})); then
  log "FAILED: ${FAILED[*]}"
  log "(logs are in $WORK; rerun with KEEP_TMP=1 to keep them)"
  exit 1
fi

if ((SMOKE)); then
  python3 "$TOOLS/report.py" --thr "$THR" --lat "$LAT" --summary-only >&2
  log "smoke OK: ${TARGETS[*]} all served the split without errors"
  exit 0
fi

VERSIONS=$(
  echo "- canaryd: $(canaryd_version "$BIN"), TOKIO_WORKER_THREADS=$WORKERS"
  if ((PGO)); then echo "- canaryd-pgo: the same commit built by \`benches/load/pgo.sh\`"; fi
  if [[ -n $AGAINST ]]; then echo "- canaryd-base: $("$BASE_BIN" --version) (git $BASE_REV, \`--against $AGAINST\`), \`cargo build --release\`"; fi
  echo "- nginx: $(nginx -v 2>&1 | sed 's/^nginx version: //'), worker_processes $WORKERS"
  echo "- HAProxy: $(haproxy -v | head -1 | awk '{print $3}'), nbthread $WORKERS"
  echo "- wrk: $(wrk -v 2>&1 | head -1 | awk '{print $2}'); oha: $(oha --version | awk '{print $2}')"
  h2gen="h2load $(h2load --version 2>/dev/null | awk '{print $2}') -c $H2_CONNS -m $H2_STREAMS -t 1 at saturation (one stable user)"
  ssl="OpenSSL $(openssl version 2>/dev/null | awk '{print $2}')"
  up_h2="the upstream nginx's two servers \`listen ... http2\`"
  if [[ $H2_UPSTREAM == haproxy ]]; then
    up_h2="\`--h2-upstream haproxy\`: the upstream pair is HAProxy $(haproxy -v | head -1 | awk '{print $3}') with two \`bind ... proto h2\` frontends answering by \`http-request return\`, instead of nginx"
  fi
  case $PROTO in
    h1) echo "- Protocols (--proto h1): HTTP/1.1 from the clients and to the upstreams: wrk -t1 -c$CONNS at saturation, oha at the fixed rate" ;;
    h1tls) echo "- Protocols (--proto h1tls): HTTPS from the clients (TLS 1.3, HTTP/1.1), HTTP/1.1 to the upstreams: wrk -t1 -c$CONNS over https ($ssl) at saturation, oha --insecure at the fixed rate; canaryd \`tls_cert\`/\`tls_key\` (rustls), nginx \`listen ... ssl\`, HAProxy \`bind ... ssl crt ... alpn http/1.1 prefer-client-ciphers\` (both $ssl); one self-signed ECDSA P-256 certificate" ;;
    h2c) echo "- Protocols (--proto h2c): HTTP/2 downstream (h2c, prior knowledge), HTTP/1.1 upstreams: $h2gen, oha --http2 -p $H2_STREAMS at the fixed rate; nginx \`listen ... http2\`, HAProxy \`bind ... proto h2\`" ;;
    h2tls) echo "- Protocols (--proto h2tls): HTTP/2 over TLS 1.3 downstream (ALPN h2), HTTP/1.1 upstreams: $h2gen over https, oha --http2 -p $H2_STREAMS --insecure at the fixed rate; canaryd \`tls_cert\`/\`tls_key\` (rustls), nginx \`listen ... ssl http2\`, HAProxy \`bind ... ssl crt ... alpn h2,http/1.1 prefer-client-ciphers\` (both $ssl); one self-signed ECDSA P-256 certificate" ;;
    h2e2e) echo "- Protocols (--proto h2e2e): HTTP/2 end to end, h2c (prior knowledge) from the clients and to the upstreams ($up_h2): $h2gen, oha --http2 -p $H2_STREAMS at the fixed rate; canaryd \`http2 = true\` on both upstreams, nginx \`listen ... http2\` + \`grpc_pass grpc://\$arm\` (keepalive 512), HAProxy \`bind ... proto h2\` + \`server ... proto h2\`" ;;
  esac
  if ((TLS)); then
    line=""
    for f in "$WORK"/tls-*; do
      [[ -f $f ]] || continue
      line+="${line:+; }${f##*/tls-}: $(cat "$f")"
      if [[ -f "$WORK/gen-tls-${f##*/tls-}" ]]; then line+=" (h2load: $(cat "$WORK/gen-tls-${f##*/tls-}"))"; fi
    done
    echo "- TLS negotiated by curl: $line"
  fi
)
REPORT_EXTRA=()
if ((LAT_ONLY)); then REPORT_EXTRA+=(--latency-only); fi
REPORT_EXTRA+=(--proto "$PROTO" --upstream "$H2_UPSTREAM")
if ((H2)); then REPORT_EXTRA+=(--h2load "-c $H2_CONNS -m $H2_STREAMS -t 1"); fi
python3 "$TOOLS/report.py" --thr "$THR" --lat "$LAT" --out "$OUT" \
  --date "$STARTED" --machine "$(machine_info | sed "s/^- Load average at start: .*/- Load average at start: $LOAD_AT_START/")" \
  --versions "$VERSIONS" --command "benches/load/compare.sh ${ORIG_ARGS[*]:-}" \
  --rate "$RATE" --rate-note "$RATE_NOTE" --duration "$DURATION" --connections "$CONNS" \
  --oha-connections "$OHA_CONNS_STABLE + $OHA_CONNS_CANARY" --rounds "$ROUNDS" --workers "$WORKERS" --retries "$RETRIES" \
  "${REPORT_EXTRA[@]}"
log "wrote $OUT"
