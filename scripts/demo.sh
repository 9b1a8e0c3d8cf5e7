#!/usr/bin/env bash
# `make demo`: bearerd between curl and two demo servers, everything on loopback.
#
# Builds bearerd and examples/demo_servers.rs, starts the demo token endpoint (:18080) and
# echo upstream (:18081), then bearerd with examples/demo.toml (:8081), sends one request
# through it, and keeps all of it running until Ctrl-C. On exit, it stops the two background
# processes it started, by their PIDs.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

readonly HOST=127.0.0.1
readonly TOKEN_PORT=18080 ECHO_PORT=18081 PROXY_PORT=8081 ADMIN_PORT=9464
readonly TARGET_DIR="${CARGO_TARGET_DIR:-target}"
readonly TRY_URL="http://$HOST:$PROXY_PORT/hello?name=world"

servers_pid=""
bearerd_pid=""

# Stops what this script started, bearerd first so that it never sees its upstream vanish.
cleanup() {
  local pid
  for pid in $bearerd_pid $servers_pid; do
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
}
trap cleanup EXIT
# Ctrl-C is how the demo ends: a success, so that make reports no error.
trap 'echo; echo "demo: stopping" >&2; exit 0' INT
trap 'exit 143' TERM

# Whether something accepts connections on HOST:$1.
port_open() {
  (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null
}

# wait_for_port NAME PORT PID: waits up to 10 s for PORT to accept connections; fails if
# process PID exits first.
wait_for_port() {
  local name=$1 port=$2 pid=$3 tries=0
  until port_open "$port"; do
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "demo: $name exited before listening on $HOST:$port; its messages are above" >&2
      return 1
    fi
    if ((++tries > 100)); then
      echo "demo: $name is still not listening on $HOST:$port after 10 s" >&2
      return 1
    fi
    sleep 0.1
  done
}

# start_background VAR COMMAND...: runs COMMAND in the background and stores its PID in VAR.
# Job control gives it a process group of its own, so that Ctrl-C reaches only this script,
# which then stops it once with SIGTERM: bearerd takes a second signal as "exit right now".
start_background() {
  local var=$1
  shift
  set -m
  "$@" </dev/null &
  printf -v "$var" '%s' "$!"
  set +m
}

if ! command -v curl >/dev/null; then
  echo "demo: curl is needed to send the demo request; please install it" >&2
  exit 1
fi

busy=""
for port in $TOKEN_PORT $ECHO_PORT $PROXY_PORT $ADMIN_PORT; do
  if port_open "$port"; then
    busy="$busy $HOST:$port"
  fi
done
if [[ -n $busy ]]; then
  echo "demo: already in use:$busy" >&2
  echo "demo: is another demo still running? Stop whatever listens there and try again." >&2
  exit 1
fi

echo "demo: building bearerd and the demo servers"
cargo build --release --bin bearerd --example demo_servers

start_background servers_pid "$TARGET_DIR/release/examples/demo_servers" \
  --token-listen "$HOST:$TOKEN_PORT" --echo-listen "$HOST:$ECHO_PORT"
wait_for_port "the demo servers" "$TOKEN_PORT" "$servers_pid"
wait_for_port "the demo servers" "$ECHO_PORT" "$servers_pid"

start_background bearerd_pid "$TARGET_DIR/release/bearerd" --config examples/demo.toml
wait_for_port bearerd "$PROXY_PORT" "$bearerd_pid"

cat <<EOF

=== bearerd demo ===
  token endpoint  http://$HOST:$TOKEN_PORT/oauth/token  (demo servers; tokens last 60 s)
  upstream        http://$HOST:$ECHO_PORT/api  (echo; answers 401 without a bearer token)
  bearerd         http://$HOST:$PROXY_PORT  -> upstream, with the token added (examples/demo.toml)

Try it, from another terminal:

  curl -s '$TRY_URL'

Sending it once now; the echo shows the request as the upstream got it:

EOF
if ! curl -sS --max-time 15 "$TRY_URL"; then
  echo "demo: the request through bearerd failed; see the messages above" >&2
fi
echo
echo "Running: bearerd refreshes the token before it expires (watch the log). Ctrl-C stops the demo."

status=0
wait "$bearerd_pid" || status=$?
bearerd_pid=""
echo "demo: bearerd exited on its own (status $status)" >&2
exit 1
