#!/usr/bin/env bash
# bearerd's hot path under valgrind, counted per request: the repeatable form of the method in
# docs/benchmarks.md ("Profile and what changed the numbers").
#
#   scripts/bench/valgrind.sh [--tool callgrind|cachegrind|dhat] [--connections N] [--close]
#                             [--top] BEARERD_BINARY [SECONDS]
#
# Starts the demo servers (examples/demo_servers.rs) as token endpoint and upstream, and
# BEARERD_BINARY (a release build) under valgrind with an upstream URL that has a base path
# (/api); waits until a request through bearerd answers 200; runs
# `wrk -t1 -cN -dSECONDS s` (default 16 connections, 10 s) at bearerd's listener; stops bearerd
# with SIGTERM so that valgrind writes its output; and prints one Markdown table row on stdout.
#
#   callgrind  (default) instructions:
#              | binary | conns | seconds | requests | total Ir | Ir per request
#              | request path Ir per request |
#              (the last: the app connection's and the upstream connection's tasks only,
#              without start-up; the figure to compare between builds. Compare binaries in
#              one set of alternating runs: between sets taken apart in time a binary can
#              move by 200, see docs/benchmarks.md "The HTTP/1.1 path and traces, cut back")
#   cachegrind instructions and simulated cache misses (valgrind's model of this machine's
#              caches: L1, and the core's L2 as the last level; no hardware counters needed):
#              | binary | conns | requests | Ir/req | I1 misses/req | D refs/req
#              | D1 misses/req | LL misses/req |
#   dhat       heap allocations:
#              | binary | conns | requests | allocations/req | bytes allocated/req
#              | heap at its peak (bytes) | blocks at the peak |
#
# Totals cover bearerd's whole life (start-up, the token request, the readiness probes, the
# shutdown), divided by the requests wrk completed; start-up is a few hundred requests' worth
# at most, so compare runs of the same length. The heap peak is the largest heap bearerd held
# at any moment: with N connections open it includes N app connections and N upstream
# connections, so the difference between two connection counts, divided by the difference in
# connections, is one connection pair's heap.
#
# --close wrk sends `Connection: close`: every request opens a new app connection, so the
#         per-connection work (accept, telling HTTP/1.1 from HTTP/2, hyper's connection, the
#         watchdog task) counts once per request; the conns column reads "N close".
#
# --top   callgrind/cachegrind: also write the 15 functions with the most self and the 15 with
#         the most inclusive cost (callgrind_annotate / cg_annotate) to OUTPUT.top.txt; dhat:
#         the heap at its peak by side (app connections, upstream connections, the replay
#         copy of request heads, the rest), the 15 allocation sites with the most bytes at
#         the peak and the 15 with the most allocations, to the same kind of file.
#
# Environment:
#   VALGRIND_OUT_DIR   where the valgrind output (and .top.txt) is kept
#                      (default: $CARGO_TARGET_DIR or target, /bench-valgrind)
#   DEMO_SERVERS       the demo servers binary (default: $CARGO_TARGET_DIR or target,
#                      /release/examples/demo_servers, built with cargo when missing)
#   KEEP_TMP=1         keep the temporary directory (config, logs, wrk output)
#   EXTRA_CONFIG       a TOML file appended to the config written here, for a run with a
#                      feature on (e.g. a [telemetry] table pointing at an OTLP receiver)
#
# Ports are free loopback ports picked by the OS. Every process started here is stopped by
# its PID, also on error or Ctrl-C. Needs valgrind, wrk, curl and python3.
set -euo pipefail

readonly ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
readonly HOST=127.0.0.1
readonly TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
readonly READY_TIMEOUT=120   # seconds for bearerd under valgrind to answer 200
readonly STOP_TIMEOUT=120    # seconds for bearerd to exit after SIGTERM

usage() {
  echo "usage: $0 [--tool callgrind|cachegrind|dhat] [--connections N] [--close] [--top]" \
    "BEARERD_BINARY [SECONDS]" >&2
  exit 2
}
log() { echo "valgrind.sh: $*" >&2; }
die() { log "$*"; exit 1; }

top=0
tool=callgrind
connections=16
close=0
args=()
while (($#)); do
  case $1 in
    --top) top=1 ;;
    --tool) (($# >= 2)) || usage; tool=$2; shift ;;
    --connections) (($# >= 2)) || usage; connections=$2; shift ;;
    --close) close=1 ;;
    -h | --help) usage ;;
    -*) usage ;;
    *) args+=("$1") ;;
  esac
  shift
done
case $tool in callgrind | cachegrind | dhat) ;; *) usage ;; esac
[[ $connections =~ ^[1-9][0-9]*$ ]] || die "--connections must be a positive integer"
# --close: the header wrk adds, and how the conns column and the output file name say so.
wrk_headers=()
conns_label=$connections
if ((close)); then
  wrk_headers=(-H "Connection: close")
  conns_label="$connections close"
fi
((${#args[@]} >= 1 && ${#args[@]} <= 2)) || usage
bearerd_bin="$(realpath -- "${args[0]}")"
seconds="${args[1]:-10}"
[[ -x $bearerd_bin ]] || die "not an executable file: ${args[0]}"
[[ $seconds =~ ^[1-9][0-9]*$ ]] || die "SECONDS must be a positive integer, not '$seconds'"
for needed in valgrind callgrind_annotate cg_annotate wrk curl python3; do
  command -v "$needed" >/dev/null || die "$needed is needed"
done

demo_servers="${DEMO_SERVERS:-$TARGET_DIR/release/examples/demo_servers}"
if [[ ! -x $demo_servers ]]; then
  [[ -z ${DEMO_SERVERS:-} ]] || die "DEMO_SERVERS is not executable: $DEMO_SERVERS"
  log "building the demo servers"
  (cd "$ROOT" && cargo build --release --example demo_servers >&2)
fi

out_dir="${VALGRIND_OUT_DIR:-$TARGET_DIR/bench-valgrind}"
mkdir -p "$out_dir"
out_dir="$(realpath -- "$out_dir")"
out_file="$out_dir/$tool.out.$(basename "$bearerd_bin").c$connections$( ((close)) && echo .close).$(date -u +%Y%m%dT%H%M%SZ).$$"

tmp="$(mktemp -d "${TMPDIR:-/tmp}/bearerd-valgrind.XXXXXX")"
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
name = "valgrind"
listen = "$HOST:$proxy_port"
url = "http://$HOST:$echo_port/api"

[upstream.token]
url = "http://$HOST:$token_port/oauth/token"
client_id = "demo-client"
client_secret_file = "$ROOT/examples/demo-secret.txt"
auth = "basic"
scope = "demo"
EOF
if [[ -n ${EXTRA_CONFIG:-} ]]; then
  [[ -r $EXTRA_CONFIG ]] || die "EXTRA_CONFIG is not a readable file: $EXTRA_CONFIG"
  { echo; cat -- "$EXTRA_CONFIG"; } >>"$tmp/bearerd.toml"
fi

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

case $tool in
  callgrind) tool_args=(--tool=callgrind --callgrind-out-file="$out_file") ;;
  cachegrind)
    # cachegrind models two levels, L1 and a last level. This VM reports a 32 MiB L3 that
    # would hold all of bearerd's data at any connection count, so the last level simulated
    # is the core's own L2 (from sysfs), which is what a growing working set spills out of.
    # CACHEGRIND_LL=size,ways,line overrides it.
    l2=/sys/devices/system/cpu/cpu0/cache/index2
    ll="${CACHEGRIND_LL:-}"
    if [[ -z $ll && -r $l2/size && $(cat "$l2/level") == 2 ]]; then
      ll="$(($(sed 's/K$//' "$l2/size") * 1024)),$(cat "$l2/ways_of_associativity"),$(cat "$l2/coherency_line_size")"
    fi
    tool_args=(--tool=cachegrind --cache-sim=yes ${ll:+"--LL=$ll"} --cachegrind-out-file="$out_file")
    ;;
  dhat) tool_args=(--tool=dhat --dhat-out-file="$out_file") ;;
esac
# valgrind runs the tool in its own process: this PID is bearerd's.
log "bearerd $bearerd_bin under $tool, listening on $HOST:$proxy_port"
valgrind "${tool_args[@]}" \
  "$bearerd_bin" --config "$tmp/bearerd.toml" </dev/null >"$tmp/bearerd.log" 2>&1 &
bearerd_pid=$!

readonly URL="http://$HOST:$proxy_port/"
deadline=$((SECONDS + READY_TIMEOUT))
until [[ $(curl -s -o /dev/null -w '%{http_code}' --max-time 5 "$URL" || true) == 200 ]]; do
  kill -0 "$bearerd_pid" 2>/dev/null || die "bearerd exited before answering 200"
  ((SECONDS < deadline)) || die "bearerd did not answer 200 within $READY_TIMEOUT s"
  sleep 0.5
done

log "wrk -t1 -c$connections -d${seconds}s ${wrk_headers[*]} $URL"
wrk -t1 -c"$connections" -d"${seconds}s" --timeout 10s "${wrk_headers[@]}" "$URL" \
  >"$tmp/wrk.out" 2>&1 ||
  die "wrk failed: $(cat "$tmp/wrk.out")"
requests="$(sed -nE 's/^ *([0-9]+) requests in .*/\1/p' "$tmp/wrk.out")"
[[ -n $requests && $requests -gt 0 ]] || die "no requests completed: $(cat "$tmp/wrk.out")"
if grep -qE 'Non-2xx|Socket errors' "$tmp/wrk.out"; then
  log "warning: wrk saw errors: $(grep -E 'Non-2xx|Socket errors' "$tmp/wrk.out" | tr -s ' ')"
fi

log "stopping bearerd (SIGTERM to $bearerd_pid); $tool writes its output"
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

[[ -s $out_file ]] || die "$tool wrote no output to $out_file"
log "$tool output: $out_file"
label="$(basename "$bearerd_bin")"

if [[ $tool == dhat ]]; then
  python3 - "$out_file" "$requests" "$label" "$conns_label" "$top" <<'PY'
import json, sys
path, requests, label, conns, top = sys.argv[1], int(sys.argv[2]), *sys.argv[3:5], sys.argv[5] == "1"
data = json.load(open(path))
pps = data["pps"]
blocks = sum(pp["tbk"] for pp in pps)
total = sum(pp["tb"] for pp in pps)
peak = sum(pp.get("gb", 0) for pp in pps)
peak_blocks = sum(pp.get("gbk", 0) for pp in pps)
print(f"| {label} | {conns} | {requests} | {blocks / requests:,.1f} | {total / requests:,.0f} "
      f"| {peak:,} | {peak_blocks:,} |")
if top:
    frames = data["ftbl"]
    def where(pp):
        # The first frame that is not the allocator or Rust's allocation shims.
        for i in pp["fs"]:
            f = frames[i]
            if not any(s in f for s in ("alloc::alloc", "__rust_", "malloc", "realloc",
                                        "calloc", "raw_vec", "RawVec", "finish_grow")):
                return f
        return frames[pp["fs"][-1]] if pp["fs"] else "?"
    # Which side of a connection pair holds each allocation, by the frames of its stack.
    def side(pp):
        names = [frames[i] for i in pp["fs"]]
        if any("forward::copy" in f or "KeptHead" in f for f in names):
            return "replay copy of the request head"
        if any(s in f for f in names for s in ("pool::Pool::connect", "pool::Sender",
                                               "client::dispatch", "dispatch::Client")):
            return "upstream connection"
        if any("proxy::serve" in f for f in names):
            return "app connection"
        return "other (start-up, token, metrics)"
    sides = {}
    for pp in pps:
        sides[side(pp)] = sides.get(side(pp), 0) + pp.get("gb", 0)
    with open(path + ".top.txt", "w") as out:
        out.write(f"# {label}, wrk -c{conns}: {requests} requests\n## bytes at the peak by side\n")
        for name, size in sorted(sides.items(), key=lambda kv: -kv[1]):
            out.write(f"{size:>10,} B  {name}\n")
        out.write("\n## bytes at the peak\n")
        for pp in sorted(pps, key=lambda pp: -pp.get("gb", 0))[:15]:
            out.write(f"{pp.get('gb', 0):>10,} B {pp.get('gbk', 0):>6,} blocks  {where(pp)}\n")
        out.write("\n## allocations per request\n")
        for pp in sorted(pps, key=lambda pp: -pp["tbk"])[:15]:
            out.write(f"{pp['tbk'] / requests:>8.2f} x {pp['tb'] / max(pp['tbk'], 1):>8,.0f} B"
                      f"  {where(pp)}\n")
    print(f"valgrind.sh: top sites: {path}.top.txt", file=sys.stderr)
PY
  exit 0
fi

if [[ $tool == cachegrind ]]; then
  if ((top)); then
    cg_annotate "$out_file" 2>/dev/null | sed -n 1,60p >"$out_file.top.txt"
    log "top functions: $out_file.top.txt"
  fi
  python3 - "$out_file" "$requests" "$label" "$conns_label" <<'PY'
import sys
path, requests, label, conns = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
events = summary = None
for line in open(path):
    if line.startswith("events:"):
        events = line.split()[1:]
    elif line.startswith("summary:"):
        summary = [int(v) for v in line.split()[1:]]
if events is None or summary is None:
    sys.exit("valgrind.sh: no events/summary line in " + path)
v = dict(zip(events, summary))
per = lambda n: f"{n / requests:,.1f}"
print(f"| {label} | {conns} | {requests} | {per(v['Ir'])} | {per(v['I1mr'])} "
      f"| {per(v['Dr'] + v['Dw'])} | {per(v['D1mr'] + v['D1mw'])} "
      f"| {per(v['ILmr'] + v['DLmr'] + v['DLmw'])} |")
PY
  exit 0
fi

# The totals line (older valgrind: summary) of the only event, Ir.
total_ir="$(sed -nE 's/^(totals|summary): *([0-9]+).*/\2/p' "$out_file" | tail -n 1)"
[[ -n $total_ir ]] || die "no totals/summary line in $out_file"

if ((top)); then
  {
    echo "# $bearerd_bin, wrk -t1 -c$connections -d${seconds}s: $requests requests, $total_ir Ir"
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

per_request="$(python3 -c "import sys; print(f'{int(sys.argv[1]) / int(sys.argv[2]):,.0f}')" \
  "$total_ir" "$requests")"
total_fmt="$(python3 -c "import sys; print(f'{int(sys.argv[1]):,}')" "$total_ir")"
# The request path alone: the inclusive instructions of the app connection's task and of the
# upstream connection's task, per request. Whole-program totals carry start-up, a share that
# depends on how many requests valgrind's speed let a run complete; this figure does not.
path_per_request="$(callgrind_annotate --inclusive=yes --threshold=100 "$out_file" 2>/dev/null |
  python3 -c '
import re, sys
roots = {
    "bearerd::proxy::serve::{{closure}}::{{closure}}",  # the app connection task
    "bearerd::proxy::pool::run_http1::{{closure}}",  # an HTTP/1.1 upstream connection
    "bearerd::proxy::pool::Pool::connect::{{closure}}::{{closure}}",  # the same before b7a60c4
}
total = 0
for line in sys.stdin:
    m = re.match(r"\s*([\d,]+) \([\s\d.]+%\)\s+\S*?:(.*) \[", line)
    if m and m.group(2) in roots:
        total += int(m.group(1).replace(",", ""))
print(f"{total / int(sys.argv[1]):,.0f}" if total else "?")
' "$requests")"
echo "| $label | $conns_label | $seconds | $requests | $total_fmt | $per_request | $path_per_request |"
