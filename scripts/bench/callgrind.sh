#!/usr/bin/env bash
# Instructions per request under callgrind: the repeatable form of the method in
# docs/benchmarks.md ("Profile and what changed the numbers").
#
#   scripts/bench/callgrind.sh [--top] BEARERD_BINARY [SECONDS]
#
# Starts the demo servers (examples/demo_servers.rs) as token endpoint and upstream, and
# BEARERD_BINARY (a release build) under `valgrind --tool=callgrind` with an upstream URL
# that has a base path (/api); waits until a request through bearerd answers 200; runs
# `wrk -t1 -c16 -dSECONDS s` (default 10) at bearerd's listener; stops bearerd with SIGTERM
# so that callgrind writes its output; and prints one Markdown table row on stdout:
#
#   | binary | seconds | requests | total Ir | Ir per request |
#
# Total Ir covers bearerd's whole life (start-up, the token request, the readiness probes,
# the shutdown), as in the table of docs/benchmarks.md; it is divided by the requests wrk
# completed. Progress goes to stderr.
#
# --top   also write the 15 functions with the most self Ir and the 15 with the most
#         inclusive Ir (callgrind_annotate) to OUTPUT.top.txt, next to the output file.
#
# Environment:
#   CALLGRIND_OUT_DIR  where callgrind.out.* (and .top.txt) are kept
#                      (default: $CARGO_TARGET_DIR or target, /bench-callgrind)
#   DEMO_SERVERS       the demo servers binary (default: $CARGO_TARGET_DIR or target,
#                      /release/examples/demo_servers, built with cargo when missing)
#   KEEP_TMP=1         keep the temporary directory (config, logs, wrk output)
#
# Ports are free loopback ports picked by the OS. Every process started here is stopped by
# its PID, also on error or Ctrl-C. Needs valgrind, wrk, curl and python3.
set -euo pipefail

readonly ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
readonly HOST=127.0.0.1
readonly TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
readonly CONNECTIONS=16
readonly READY_TIMEOUT=120   # seconds for bearerd under valgrind to answer 200
readonly STOP_TIMEOUT=120    # seconds for bearerd to exit after SIGTERM

usage() {
  echo "usage: $0 [--top] BEARERD_BINARY [SECONDS]" >&2
  exit 2
}
log() { echo "callgrind.sh: $*" >&2; }
die() { log "$*"; exit 1; }

top=0
args=()
for arg in "$@"; do
  case $arg in
    --top) top=1 ;;
    -h | --help) usage ;;
    -*) usage ;;
    *) args+=("$arg") ;;
  esac
done
((${#args[@]} >= 1 && ${#args[@]} <= 2)) || usage
bearerd_bin="$(realpath -- "${args[0]}")"
seconds="${args[1]:-10}"
[[ -x $bearerd_bin ]] || die "not an executable file: ${args[0]}"
[[ $seconds =~ ^[1-9][0-9]*$ ]] || die "SECONDS must be a positive integer, not '$seconds'"
for tool in valgrind callgrind_annotate wrk curl python3; do
  command -v "$tool" >/dev/null || die "$tool is needed"
done

demo_servers="${DEMO_SERVERS:-$TARGET_DIR/release/examples/demo_servers}"
if [[ ! -x $demo_servers ]]; then
  [[ -z ${DEMO_SERVERS:-} ]] || die "DEMO_SERVERS is not executable: $DEMO_SERVERS"
  log "building the demo servers"
  (cd "$ROOT" && cargo build --release --example demo_servers >&2)
fi

out_dir="${CALLGRIND_OUT_DIR:-$TARGET_DIR/bench-callgrind}"
mkdir -p "$out_dir"
out_dir="$(realpath -- "$out_dir")"
out_file="$out_dir/callgrind.out.$(basename "$bearerd_bin").$(date -u +%Y%m%dT%H%M%SZ).$$"

tmp="$(mktemp -d "${TMPDIR:-/tmp}/bearerd-callgrind.XXXXXX")"
servers_pid=""
bearerd_pid=""

# Stops what is still running (bearerd first, so it never sees its upstream vanish) and
# removes the temporary directory.
cleanup() {
  local status=$? pid
  trap - EXIT INT TERM
  for pid in $bearerd_pid $servers_pid; do
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  if ((status != 0)); then
    log "failed (status $status); logs:"
    tail -n 20 "$tmp"/*.log >&2 2>/dev/null || true
  fi
  if [[ ${KEEP_TMP:-0} == 1 ]]; then
    log "kept $tmp"
  else
    rm -rf -- "$tmp"
  fi
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Four distinct free ports, held open together while the OS picks them.
read -r token_port echo_port proxy_port admin_port < <(python3 -c '
import socket
socks = [socket.socket() for _ in range(4)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))
for s in socks:
    s.close()
')

cat >"$tmp/bearerd.toml" <<EOF
[admin]
listen = "$HOST:$admin_port"

[[upstream]]
name = "callgrind"
listen = "$HOST:$proxy_port"
url = "http://$HOST:$echo_port/api"

[upstream.token]
url = "http://$HOST:$token_port/oauth/token"
client_id = "demo-client"
client_secret_file = "$ROOT/examples/demo-secret.txt"
auth = "basic"
scope = "demo"
EOF

port_open() { (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null; }

# wait_for_port NAME PORT PID: up to 10 s; fails if PID exits first.
wait_for_port() {
  local name=$1 port=$2 pid=$3 tries=0
  until port_open "$port"; do
    kill -0 "$pid" 2>/dev/null || die "$name exited before listening on $HOST:$port"
    ((++tries <= 100)) || die "$name is not listening on $HOST:$port after 10 s"
    sleep 0.1
  done
}

"$demo_servers" --token-listen "$HOST:$token_port" --echo-listen "$HOST:$echo_port" \
  </dev/null >"$tmp/demo_servers.log" 2>&1 &
servers_pid=$!
wait_for_port "the demo servers" "$token_port" "$servers_pid"
wait_for_port "the demo servers" "$echo_port" "$servers_pid"

# valgrind runs the tool in its own process: this PID is bearerd's.
log "bearerd $bearerd_bin under callgrind, listening on $HOST:$proxy_port"
valgrind --tool=callgrind --callgrind-out-file="$out_file" \
  "$bearerd_bin" --config "$tmp/bearerd.toml" </dev/null >"$tmp/bearerd.log" 2>&1 &
bearerd_pid=$!

readonly URL="http://$HOST:$proxy_port/"
deadline=$((SECONDS + READY_TIMEOUT))
until [[ $(curl -s -o /dev/null -w '%{http_code}' --max-time 5 "$URL" || true) == 200 ]]; do
  kill -0 "$bearerd_pid" 2>/dev/null || die "bearerd exited before answering 200"
  ((SECONDS < deadline)) || die "bearerd did not answer 200 within $READY_TIMEOUT s"
  sleep 0.5
done

log "wrk -t1 -c$CONNECTIONS -d${seconds}s $URL"
wrk -t1 -c"$CONNECTIONS" -d"${seconds}s" --timeout 10s "$URL" >"$tmp/wrk.out" 2>&1 ||
  die "wrk failed: $(cat "$tmp/wrk.out")"
requests="$(sed -nE 's/^ *([0-9]+) requests in .*/\1/p' "$tmp/wrk.out")"
[[ -n $requests && $requests -gt 0 ]] || die "no requests completed: $(cat "$tmp/wrk.out")"
if grep -qE 'Non-2xx|Socket errors' "$tmp/wrk.out"; then
  log "warning: wrk saw errors: $(grep -E 'Non-2xx|Socket errors' "$tmp/wrk.out" | tr -s ' ')"
fi

log "stopping bearerd (SIGTERM to $bearerd_pid); callgrind writes its output"
kill -TERM "$bearerd_pid"
deadline=$((SECONDS + STOP_TIMEOUT))
while kill -0 "$bearerd_pid" 2>/dev/null; do
  ((SECONDS < deadline)) || die "bearerd still running $STOP_TIMEOUT s after SIGTERM"
  sleep 0.2
done
status=0
wait "$bearerd_pid" || status=$?
bearerd_pid=""
((status == 0)) || log "warning: bearerd exited with status $status"

kill -TERM "$servers_pid" 2>/dev/null || true
wait "$servers_pid" 2>/dev/null || true
servers_pid=""

[[ -s $out_file ]] || die "callgrind wrote no output to $out_file"
# The totals line (older valgrind: summary) of the only event, Ir.
total_ir="$(sed -nE 's/^(totals|summary): *([0-9]+).*/\2/p' "$out_file" | tail -n 1)"
[[ -n $total_ir ]] || die "no totals/summary line in $out_file"

if ((top)); then
  {
    echo "# $bearerd_bin, wrk -t1 -c$CONNECTIONS -d${seconds}s: $requests requests, $total_ir Ir"
    echo "## self"
    callgrind_annotate --inclusive=no "$out_file" 2>/dev/null |
      awk '/^ *[0-9,]+ / && n++ < 16'
    echo
    echo "## inclusive"
    callgrind_annotate --inclusive=yes "$out_file" 2>/dev/null |
      awk '/^ *[0-9,]+ / && n++ < 16'
  } >"$out_file.top.txt"
  log "top functions: $out_file.top.txt"
fi
log "callgrind output: $out_file"

per_request="$(python3 -c "import sys; print(f'{int(sys.argv[1]) / int(sys.argv[2]):,.0f}')" \
  "$total_ir" "$requests")"
total_fmt="$(python3 -c "import sys; print(f'{int(sys.argv[1]):,}')" "$total_ir")"
echo "| $(basename "$bearerd_bin") | $seconds | $requests | $total_fmt | $per_request |"
