#!/usr/bin/env bash
# Builds canaryd with profile-guided optimisation (PGO): an instrumented build serves a
# training load, LLVM merges the profile it writes, and a second build uses it.
#
#   benches/load/pgo.sh                    # writes target/pgo/canaryd (~6 min on 2 cores)
#   benches/load/pgo.sh --out PATH         # writes the binary to PATH instead
#
# Options:
#   --train S        seconds of training load (default 20: 3/4 GET, 1/4 POST)
#   --no-install     fail instead of apt-get installing llvm-profdata or wrk
#
# The training load is compare.sh's: one nginx upstream pair, canaryd with metrics and the
# rollback circuit on, `wrk -c64` with a random x-user-id per request (tools/userid.lua), then
# POSTs with a 1 KiB body. The profile steers code layout and inlining towards that path; code
# it does not reach (TLS, HTTP/2, WebSockets) is built as usual, optimised for size.
#
# Needs llvm-profdata of the LLVM major version rustc uses (`rustc -vV`): taken from rustup's
# llvm-tools if installed, else from Debian's llvm-N package (installed here with apt-get).
# The instrumented and optimised builds use target/pgo-gen and target/pgo-use, so
# target/release is left alone.
set -euo pipefail

LOAD_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=lib/common.sh
source "$LOAD_DIR/lib/common.sh"

TRAIN=20 INSTALL=1
OUT="$REPO_DIR/target/pgo/canaryd"
while (($#)); do
  case $1 in
    --train) TRAIN=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --no-install) INSTALL=0; shift ;;
    -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1' "$0"; exit 0 ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
done
[[ $TRAIN =~ ^[1-9][0-9]*$ ]] || die "--train must be a positive number of seconds, got '$TRAIN'"

setup_workdir pgo

# ---------------------------------------------------------------- tools
LLVM_MAJOR=$(rustc -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')
[[ -n $LLVM_MAJOR ]] || die "cannot read rustc's LLVM version from 'rustc -vV'"
find_profdata() {
  local c
  for c in "$(rustc --print sysroot)"/lib/rustlib/*/bin/llvm-profdata \
           "$(command -v "llvm-profdata-$LLVM_MAJOR" || true)" \
           "/usr/lib/llvm-$LLVM_MAJOR/bin/llvm-profdata"; do
    if [[ -x $c ]]; then echo "$c"; return 0; fi
  done
  return 1
}
apt_install() {
  ((INSTALL)) || die "missing: $* (run without --no-install to apt-get install it)"
  [[ $(id -u) == 0 ]] || die "missing: $*; install it (apt-get install $*) or run as root"
  log "installing $* (apt-get)"
  apt-get update -qq >&2 || log "apt-get update failed; trying the install anyway"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >&2 || die "apt-get install $* failed"
}
if ! PROFDATA=$(find_profdata); then
  apt_install "llvm-$LLVM_MAJOR"
  PROFDATA=$(find_profdata) || die "llvm-$LLVM_MAJOR installed but no llvm-profdata found"
fi
for t in nginx wrk curl; do command -v "$t" >/dev/null || apt_install "$t"; done
log "rustc's LLVM is $LLVM_MAJOR; using $PROFDATA"

# ---------------------------------------------------------------- instrumented build
log "instrumented build (target/pgo-gen)"
(cd "$REPO_DIR" && RUSTFLAGS="-Cprofile-generate=$WORK/build-profiles" \
  CARGO_TARGET_DIR="$REPO_DIR/target/pgo-gen" timeout 1800 cargo build --release --bin canaryd) >&2 \
  || die "instrumented build failed"
GEN_BIN="$WORK/canaryd-instrumented"
cp "$REPO_DIR/target/pgo-gen/release/canaryd" "$GEN_BIN"

# ---------------------------------------------------------------- training
read -r UP_S UP_C P_CANARYD P_ADMIN <<<"$(free_ports 4)"
mkdir -p "$WORK/upstream-tmp" "$WORK/canaryd-etc" "$WORK/profiles"
render "$CONF/upstream-nginx.conf.tmpl" "$WORK/upstream.conf" \
  WORKERS=1 DIR="$WORK" STABLE_PORT="$UP_S" CANARY_PORT="$UP_C"
canaryd_toml "$WORK/canaryd-etc/canaryd.toml" "$P_CANARYD" "$P_ADMIN" "$UP_S" "$UP_C" 10
spawn upstream "$WORK/upstream.log" nginx -p "$WORK" -c "$WORK/upstream.conf" -e "$WORK/upstream.error.log"
UP_PID=$SPAWN_PID
wait_http "http://127.0.0.1:$UP_S/" 10 "$UP_PID" || die "the upstream nginx did not start"

# The profile is written when canaryd exits normally (SIGTERM, drain, exit 0).
spawn canaryd "$WORK/canaryd.log" env LLVM_PROFILE_FILE="$WORK/profiles/canaryd-%p.profraw" \
  TOKIO_WORKER_THREADS=1 RUST_LOG=warn "$GEN_BIN" run --config "$WORK/canaryd-etc/canaryd.toml"
C_PID=$SPAWN_PID
wait_http "http://127.0.0.1:$P_ADMIN/readyz" 10 "$C_PID" || die "instrumented canaryd did not start"
cat > "$WORK/post.lua" <<'EOF'
-- POSTs with a 1 KiB body and a random x-user-id
local body = string.rep("x", 1024)
function request()
  return wrk.format("POST", "/", { ["Host"] = "bench.local", ["x-user-id"] = "user" .. math.random(10000),
    ["Content-Type"] = "application/octet-stream" }, body)
end
EOF
URL="http://127.0.0.1:$P_CANARYD/"
get_s=$((TRAIN * 3 / 4 > 0 ? TRAIN * 3 / 4 : 1)); post_s=$((TRAIN - get_s > 0 ? TRAIN - get_s : 1))
log "training: ${get_s}s of GETs, ${post_s}s of POSTs through $URL"
wrk -t1 -c64 -d"${get_s}s" -s "$TOOLS/userid.lua" "$URL" > "$WORK/wrk-get.txt" || die "wrk failed: $(tail -3 "$WORK/wrk-get.txt")"
wrk -t1 -c16 -d"${post_s}s" -s "$WORK/post.lua" "$URL" > "$WORK/wrk-post.txt" || die "wrk failed: $(tail -3 "$WORK/wrk-post.txt")"
log "  $(grep -h 'requests in' "$WORK/wrk-get.txt" "$WORK/wrk-post.txt" | awk '{s += $1} END {print s}') requests"
kill -TERM "$C_PID"
for _ in $(seq 300); do kill -0 "$C_PID" 2>/dev/null || break; sleep 0.1; done
kill -0 "$C_PID" 2>/dev/null && die "instrumented canaryd did not exit after SIGTERM"
shopt -s nullglob
raws=("$WORK"/profiles/*.profraw)
((${#raws[@]})) || die "the instrumented canaryd wrote no profile ($WORK/canaryd.log)"
"$PROFDATA" merge -o "$WORK/canaryd.profdata" "${raws[@]}" >&2 || die "llvm-profdata merge failed"

# ---------------------------------------------------------------- optimised build
log "optimised build with the profile (target/pgo-use)"
(cd "$REPO_DIR" && RUSTFLAGS="-Cprofile-use=$WORK/canaryd.profdata" \
  CARGO_TARGET_DIR="$REPO_DIR/target/pgo-use" timeout 1800 cargo build --release --bin canaryd) >&2 \
  || die "optimised build failed"
mkdir -p "$(dirname "$OUT")"
cp "$REPO_DIR/target/pgo-use/release/canaryd" "$OUT.tmp" && mv "$OUT.tmp" "$OUT"
log "wrote $OUT ($(CANARYD_BIN="" canaryd_version "$OUT"), PGO)"
echo "$OUT"
