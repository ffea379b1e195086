# shellcheck shell=bash
# Shared helpers for benches/load/compare.sh and benches/load/reliability.sh.
# Sourced, never executed. Expects `set -euo pipefail` in the caller and $LOAD_DIR set to
# benches/load. Every process started through `spawn` is recorded and killed by `cleanup`.

REPO_DIR="$(cd "$LOAD_DIR/../.." && pwd)"
TOOLS="$LOAD_DIR/tools"
export CONF="$LOAD_DIR/conf"

# pids of every process group we started (setsid), killed on exit
SPAWNED=()

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# spawn NAME LOGFILE CMD...  -> sets SPAWN_PID (a session leader, so its group can be killed).
# Not to be called in $(...): the pid must be recorded in this shell.
SPAWN_PID=
spawn() {
  local name=$1 logf=$2; shift 2
  setsid "$@" >"$logf" 2>&1 < /dev/null &
  SPAWN_PID=$!
  SPAWNED+=("$SPAWN_PID")
  log "started $name (pid $SPAWN_PID): $*"
}

# stop_pid PID [SIGNAL] [TIMEOUT_S]: signal the process group, wait for it, SIGKILL after timeout
stop_pid() {
  local pid=$1 sig=${2:-TERM} t=${3:-10} i
  [[ -n "$pid" ]] || return 0
  kill -0 "$pid" 2>/dev/null || return 0
  kill "-$sig" -- "-$pid" 2>/dev/null || kill "-$sig" "$pid" 2>/dev/null || true
  for ((i = 0; i < t * 20; i++)); do
    kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
    sleep 0.05
  done
  log "pid $pid did not stop on SIG$sig within ${t}s; SIGKILL"
  kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

cleanup_spawned() {
  local pid
  for pid in "${SPAWNED[@]:-}"; do
    if [[ -n "$pid" ]]; then stop_pid "$pid" TERM 5; fi
  done
  SPAWNED=()
}

# show_logs DIR: the last lines of every non-empty log in DIR (on failure, before DIR goes)
show_logs() {
  local f
  for f in "$1"/*.log; do
    [[ -s $f ]] || continue
    log "--- last lines of $(basename "$f"):"
    tail -n 5 "$f" >&2
  done
  log "(KEEP_TMP=1 keeps the whole work directory)"
}

# free_ports N: N distinct free loopback TCP ports chosen by the kernel (bind to port 0)
free_ports() {
  python3 - "$1" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
for s in socks:
    s.close()
EOF
}

# wait_http URL TIMEOUT_S [PID [CURL_ARGS...]]: until URL answers any HTTP status; fail early if
# PID died. Certificates are not verified (-k: the TLS modes of compare.sh use a self-signed
# one); CURL_ARGS add curl options, e.g. --http2-prior-knowledge for an h2c-only listener.
wait_http() {
  local url=$1 t=$2 pid=${3:-} i
  shift $(($# < 3 ? $# : 3))
  for ((i = 0; i < t * 10; i++)); do
    if curl -sk -o /dev/null --max-time 1 "$@" "$url"; then return 0; fi
    if [[ -n "$pid" ]] && ! kill -0 "$pid" 2>/dev/null; then
      log "process $pid exited while waiting for $url"
      return 1
    fi
    sleep 0.1
  done
  log "timed out after ${t}s waiting for $url"
  return 1
}

# wait_tcp PORT TIMEOUT_S [PID]: until 127.0.0.1:PORT accepts a TCP connection
wait_tcp() {
  local port=$1 t=$2 pid=${3:-} i
  for ((i = 0; i < t * 10; i++)); do
    if python3 -c "import socket,sys; socket.create_connection(('127.0.0.1', $port), 0.5).close()" 2>/dev/null; then
      return 0
    fi
    if [[ -n "$pid" ]] && ! kill -0 "$pid" 2>/dev/null; then
      log "process $pid exited while waiting for port $port"
      return 1
    fi
    sleep 0.1
  done
  log "timed out after ${t}s waiting for 127.0.0.1:$port"
  return 1
}

# self_signed_cert DIR: a self-signed ECDSA P-256 certificate for 127.0.0.1 and localhost,
# valid for 2 days: DIR/cert.pem, DIR/key.pem (PKCS#8) and DIR/cert-key.pem (both, for HAProxy)
self_signed_cert() {
  local dir=$1
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
    -subj "/CN=localhost" -addext "subjectAltName=IP:127.0.0.1,DNS:localhost" \
    -keyout "$dir/key.pem" -out "$dir/cert.pem" 2>"$dir/openssl.log" \
    || die "openssl could not make a self-signed certificate ($(tail -1 "$dir/openssl.log"))"
  cat "$dir/cert.pem" "$dir/key.pem" > "$dir/cert-key.pem"
}

# render TEMPLATE OUT KEY=VALUE...: replace every @KEY@ in TEMPLATE
render() {
  local tmpl=$1 out=$2; shift 2
  local args=() kv
  for kv in "$@"; do
    args+=(-e "s|@${kv%%=*}@|${kv#*=}|g")
  done
  sed "${args[@]}" "$tmpl" > "$out"
  if grep -q '@[A-Z_]*@' "$out"; then
    die "unrendered placeholder in $out: $(grep -o '@[A-Z_]*@' "$out" | sort -u | tr '\n' ' ')"
  fi
}

# render_peers WORKERS UP_S UP_C NGINX_PORT HAPROXY_PORT: writes $WORK/upstream.conf (the nginx
# upstream pair on UP_S and UP_C), $WORK/nginx-proxy.conf and $WORK/haproxy.cfg (the same split
# through nginx and HAProxy, listening on their ports), each with WORKERS workers.
render_peers() {
  local workers=$1 up_s=$2 up_c=$3 p_nginx=$4 p_haproxy=$5
  render "$CONF/upstream-nginx.conf.tmpl" "$WORK/upstream.conf" \
    WORKERS="$workers" DIR="$WORK" STABLE_PORT="$up_s" CANARY_PORT="$up_c"
  render "$CONF/nginx-proxy.conf.tmpl" "$WORK/nginx-proxy.conf" \
    WORKERS="$workers" DIR="$WORK" STABLE_PORT="$up_s" CANARY_PORT="$up_c" PORT="$p_nginx"
  render "$CONF/haproxy.cfg.tmpl" "$WORK/haproxy.cfg" \
    WORKERS="$workers" DIR="$WORK" STABLE_PORT="$up_s" CANARY_PORT="$up_c" PORT="$p_haproxy" \
    HASH_TYPE=consistent
}

# proc_stat PID: "cpu_seconds hwm_kib rss_kib nprocs" summed over PID and all its descendants
proc_stat() { python3 "$TOOLS/procstat.py" "$1"; }

# Builds canaryd in release unless $CANARYD_BIN is given; copies the binary to $1 so a
# concurrent rebuild of target/ cannot swap it mid-run. Prints the binary path.
prepare_canaryd() {
  local dest=$1
  if [[ -n "${CANARYD_BIN:-}" ]]; then
    [[ -x "$CANARYD_BIN" ]] || die "CANARYD_BIN=$CANARYD_BIN is not an executable"
    log "using CANARYD_BIN=$CANARYD_BIN (no build)"
    cp "$CANARYD_BIN" "$dest"
  else
    log "cargo build --release (in $REPO_DIR)"
    if ! (cd "$REPO_DIR" && timeout 1200 cargo build --release --bin canaryd) >&2; then
      die "cargo build --release failed (set CANARYD_BIN=/path/to/canaryd to benchmark a prebuilt binary)"
    fi
    local target=${CARGO_TARGET_DIR:-target}
    [[ $target == /* ]] || target="$REPO_DIR/$target"
    cp "$target/release/canaryd" "$dest"
  fi
  echo "$dest"
}

# prepare_pgo_canaryd DEST [INSTALL]: the PGO build of canaryd at DEST: a copy of
# $CANARYD_PGO_BIN if set, else built by pgo.sh (INSTALL=0 passes --no-install).
prepare_pgo_canaryd() {
  local dest=$1 install=${2:-1} args=(--out "$1")
  if [[ -n "${CANARYD_PGO_BIN:-}" ]]; then
    [[ -x "$CANARYD_PGO_BIN" ]] || die "CANARYD_PGO_BIN=$CANARYD_PGO_BIN is not an executable"
    log "using CANARYD_PGO_BIN=$CANARYD_PGO_BIN (no build)"
    cp "$CANARYD_PGO_BIN" "$dest"
  else
    ((install)) || args+=(--no-install)
    "$LOAD_DIR/pgo.sh" "${args[@]}" >/dev/null || die "the PGO build failed (benches/load/pgo.sh)"
  fi
}

# prepare_rev_canaryd REV DEST: canaryd as of git revision REV at DEST (the `--against REV`
# of compare.sh, instructions.sh and wakeups.sh), and BASE_REV set to REV's short hash. A copy
# of $CANARYD_BASE_BIN if set, else built with `cargo build --release` in a temporary worktree
# (its own target directory under $WORK: a few minutes), removed again whether the build
# succeeds or not.
BASE_REV=
prepare_rev_canaryd() {
  local dest=$2 tree="$WORK/rev-tree" ok=1 rev
  rev=$(cd "$REPO_DIR" && git rev-parse --short "$1^{commit}") || die "unknown revision $1"
  BASE_REV=$rev
  if [[ -n "${CANARYD_BASE_BIN:-}" ]]; then
    [[ -x "$CANARYD_BASE_BIN" ]] || die "CANARYD_BASE_BIN=$CANARYD_BASE_BIN is not an executable"
    log "using CANARYD_BASE_BIN=$CANARYD_BASE_BIN as $rev (no build)"
    cp "$CANARYD_BASE_BIN" "$dest"
    return
  fi
  log "building $rev in a worktree"
  (cd "$REPO_DIR" && git worktree add --detach "$tree" "$rev") >&2 || die "git worktree add $rev failed"
  (cd "$tree" && CARGO_TARGET_DIR="$WORK/rev-target" timeout 1800 cargo build --release --bin canaryd) >&2 || ok=0
  ((ok)) && cp "$WORK/rev-target/release/canaryd" "$dest"
  (cd "$REPO_DIR" && git worktree remove --force "$tree") >&2 || true
  ((ok)) || die "building $rev failed"
}

# canaryd_toml OUT LISTEN_PORT ADMIN_PORT STABLE_PORT CANARY_PORT CANARY_WEIGHT [EXTRA_LISTEN_LINES]
canaryd_toml() {
  local out=$1 lp=$2 ap=$3 sp=$4 cp=$5 w=$6 extra=${7:-}
  local sw
  sw=$(python3 -c "print(100 - $w)")
  cat > "$out" <<EOF
# generated by benches/load (metrics and the rollback circuit on, access log off)
[listen]
addr = "127.0.0.1:$lp"
access_log = false
$extra

[admin]
addr = "127.0.0.1:$ap"

[routing]
sticky_header = "x-user-id"
response_header = "x-canaryd-upstream"

[[upstream]]
name = "stable"
url = "http://127.0.0.1:$sp"
weight = $sw

[[upstream]]
name = "canary"
url = "http://127.0.0.1:$cp"
weight = $w

[rollback]
enabled = true
EOF
}

# machine_info: markdown bullet lines describing this machine
machine_info() {
  local cpu
  cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
  echo "- Machine: $(nproc) CPUs ($cpu), $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo) RAM, kernel $(uname -r)"
  echo "- Load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
}

# canaryd_version BIN: version plus the git state of the tree it was built from (or, with
# CANARYD_BIN, that the binary was prebuilt and where the tree was)
canaryd_version() {
  local v rev dirty=""
  v=$("$1" --version 2>/dev/null || echo "canaryd (unknown version)")
  rev=$(cd "$REPO_DIR" && git rev-parse --short HEAD 2>/dev/null || echo "?")
  if [[ -n "$(cd "$REPO_DIR" && git status --porcelain -- src Cargo.toml Cargo.lock 2>/dev/null)" ]]; then
    dirty=" + uncommitted changes in src/Cargo"
  fi
  if [[ -n "${CANARYD_BIN:-}" ]]; then
    # a prebuilt binary: the tree's commit says nothing certain about what it was built from
    echo "$v (prebuilt, CANARYD_BIN=$CANARYD_BIN; the tree was at git $rev$dirty)"
  else
    echo "$v (git $rev$dirty)"
  fi
}

# setup_workdir NAME: creates $WORK (/tmp/canaryd-NAME.XXXXXX) and installs the exit traps that
# kill every spawned process, show logs on failure, and remove $WORK (kept with KEEP_TMP=1).
setup_workdir() {
  WORK=$(mktemp -d "/tmp/canaryd-$1.XXXXXX")
  trap on_exit EXIT
  trap 'log "interrupted"; exit 130' INT TERM
}

on_exit() {
  local rc=$?
  trap - EXIT INT TERM
  cleanup_spawned
  if ((rc != 0)) && [[ ${KEEP_TMP:-0} != 1 ]]; then show_logs "$WORK"; fi
  if [[ ${KEEP_TMP:-0} == 1 ]]; then log "work directory kept: $WORK"; else rm -rf "$WORK"; fi
  exit "$rc"
}

# order_for_round R: the target order of round R, one per line (TARGETS rotated: each round
# starts one target later)
order_for_round() {
  local r=$1 n=${#TARGETS[@]} i
  for ((i = 0; i < n; i++)); do echo "${TARGETS[$(((i + r - 1) % n))]}"; done
}

# wait_exit PID TIMEOUT_S: until PID (our child) exits; returns its exit code, 124 on timeout
wait_exit() {
  local pid=$1 t=$2 i rc=0
  for ((i = 0; i < t * 20; i++)); do
    if ! kill -0 "$pid" 2>/dev/null; then
      wait "$pid" || rc=$?
      return "$rc"
    fi
    sleep 0.05
  done
  return 124
}
