#!/usr/bin/env bash
# Measures what bearerd uses under load, to size the Kubernetes resources in
# deploy/kubernetes/components/sidecar/sidecar.yaml (the numbers are written there and in docs/kubernetes.md).
#
# Starts, all on 127.0.0.1 and on ports free at run time, the demo token endpoint and echo
# upstream (examples/demo_servers.rs) and release-built bearerd between them, then loads
# bearerd with wrk (Debian's wrk): GETs for 10 s at 16 connections; then, for 5 s each, GETs
# and 64 KiB POSTs at 256 connections (the cap the Kubernetes config sets) and at 1000 (near
# the default cap of 1024). Before and after each run it reads bearerd's memory (VmRSS,
# VmHWM) from /proc/PID/status and its CPU time (utime + stime) from /proc/PID/stat. It
# stops what it started, by PID. About 40 s once built.
#
#   bash scripts/measure-sidecar.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

readonly HOST=127.0.0.1
readonly TARGET_DIR="${CARGO_TARGET_DIR:-target}"

for tool in wrk curl python3; do
  command -v "$tool" >/dev/null || { echo "measure: $tool is missing (apt-get install -y $tool)" >&2; exit 1; }
done

cargo build --release --bin bearerd --example demo_servers

work=$(mktemp -d)
servers_pid=""
bearerd_pid=""
cleanup() {
  local pid
  for pid in $bearerd_pid $servers_pid; do
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  rm -rf "$work"
}
trap cleanup EXIT

# Four ports free now, chosen by the kernel.
read -r token_port echo_port proxy_port admin_port < <(python3 - <<'EOF'
import socket
socks = [socket.socket() for _ in range(4)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))
EOF
)

printf 'demo-secret\n' >"$work/secret"
cat >"$work/bearerd.toml" <<EOF
[admin]
listen = "$HOST:$admin_port"

[[upstream]]
name = "demo"
listen = "$HOST:$proxy_port"
url = "http://$HOST:$echo_port/api"

[upstream.token]
url = "http://$HOST:$token_port/oauth/token"
client_id = "demo-client"
client_secret_file = "secret"
scope = "demo"
EOF

wait_until() {
  local what=$1 tries=0
  shift
  until "$@" >/dev/null 2>&1; do
    if ((++tries > 100)); then
      echo "measure: $what not up after 10 s" >&2
      exit 1
    fi
    sleep 0.1
  done
}

set -m
"$TARGET_DIR/release/examples/demo_servers" --token-listen "$HOST:$token_port" \
  --echo-listen "$HOST:$echo_port" </dev/null >"$work/servers.log" 2>&1 &
servers_pid=$!
"$TARGET_DIR/release/bearerd" --config "$work/bearerd.toml" </dev/null >"$work/bearerd.log" 2>&1 &
bearerd_pid=$!
set +m
wait_until "bearerd /readyz" curl -fsS "http://$HOST:$admin_port/readyz"

ticks=$(getconf CLK_TCK)
# utime + stime of bearerd, in clock ticks (fields 14 and 15 of /proc/PID/stat; the command
# name in field 2 has no spaces here).
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$bearerd_pid/stat"; }
status_kib() { awk -v key="$1:" '$1 == key { print $2 }' "/proc/$bearerd_pid/status"; }
memory() {
  printf '  VmRSS %s KiB, VmHWM %s KiB, threads %s\n' \
    "$(status_kib VmRSS)" "$(status_kib VmHWM)" "$(status_kib Threads)"
}

echo "== bearerd $("$TARGET_DIR/release/bearerd" --version), $(nproc) cores; ready, idle"
memory

# A POST with a 64 KiB body: the largest that bearerd keeps in memory to replay after a 401.
cat >"$work/post64k.lua" <<'EOF'
wrk.method = "POST"
wrk.body = string.rep("x", 65536)
wrk.headers["Content-Type"] = "application/octet-stream"
EOF

# load CONNECTIONS SECONDS [WRK-ARGS...]
load() {
  local connections=$1 seconds=$2 before after rps
  shift 2
  before=$(cpu_ticks)
  wrk -t2 -c"$connections" -d"${seconds}s" --latency "$@" "http://$HOST:$proxy_port/hello?name=load" \
    >"$work/wrk.txt"
  after=$(cpu_ticks)
  rps=$(awk '/^Requests\/sec:/ { print $2 }' "$work/wrk.txt")
  echo "== wrk -t2 -c$connections -d${seconds}s${*:+ $*}"
  grep -E '^ +(Latency +[0-9]|50%|99%)|requests in|Non-2xx|Socket errors' "$work/wrk.txt" | sed 's/^ */  /'
  awk -v b="$before" -v a="$after" -v t="$ticks" -v s="$seconds" -v r="$rps" 'BEGIN {
    cpu = (a - b) / t
    printf "  %.0f req/s; bearerd CPU %.2f s in %d s = %.0f millicores; %.2f ms CPU per 1000 requests\n",
      r, cpu, s, 1000 * cpu / s, 1e6 * cpu / (r * s)
  }'
  memory
}

# In rising order of connections, as VmHWM only grows: after each run it is the most
# bearerd used with at most that many connections, whatever they sent.
load 16 10
load 256 5
load 256 5 -s "$work/post64k.lua"
load 1000 5
load 1000 5 -s "$work/post64k.lua"

echo "== after the load, idle 2 s"
sleep 2
memory

echo "== answers, by status, and bearerd's warnings"
curl -fsS "http://$HOST:$admin_port/metrics" | grep '^bearerd_requests_total' | sed 's/^/  /'
grep -E ' WARN ' "$work/bearerd.log" | sed -E 's/^[^ ]+ +//' | sort | uniq -c | sort -rn | head -5 | sed 's/^/  /'
