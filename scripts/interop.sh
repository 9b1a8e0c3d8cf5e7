#!/usr/bin/env bash
# Runs tests/interop/django.rs, bearerd against a real Django OAuth Toolkit server, and
# tests/interop/oidc.rs, bearerd against node's oidc-provider (every client authentication
# method, DPoP, mutual TLS), and tests/interop/telemetry.rs, bearerd's traces decoded by an
# OTLP/HTTP receiver built on the opentelemetry-proto package, and tests/interop/websocket.rs,
# a Python websockets client and server with bearerd between them, and tests/interop/intercept.rs,
# Python requests, Node undici, a Java 11+ app (its JDK's java, BEARERD_INTEROP_JAVA) and a Go app
# (BEARERD_INTEROP_GO) through TLS interception.
#
# Makes the Python virtualenv target/interop-venv from tests/interop/requirements.txt when it
# is missing or the requirements changed (a stamp in the virtualenv keeps their hash), and
# tests/interop/oidc/node_modules with `npm ci` when it is missing or package-lock.json
# changed (a stamp in node_modules keeps its hash); checks the oidc-provider server alone
# (tests/interop/oidc/selfcheck.mjs), then runs the interop tests (ignored by a plain
# `cargo test`) with BEARERD_INTEROP_PYTHON naming the virtualenv's interpreter,
# BEARERD_INTEROP_NODE node and BEARERD_INTEROP_OIDC_SERVER the server script. Each test
# starts its own servers on loopback ports; nothing else is contacted but PyPI and the npm
# registry, for the installs. Needs python3 (3.10 or later) with venv, and node (18.12 or
# later) with npm; installs Debian's python3, python3-venv, nodejs and npm with apt-get (as
# root or through sudo) when missing.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
NODE="${NODE:-node}"
NPM="${NPM:-npm}"
CARGO="${CARGO:-cargo}"
requirements=tests/interop/requirements.txt
venv=target/interop-venv
stamp="$venv/.requirements.sha256"
oidc=tests/interop/oidc
node_stamp="$oidc/node_modules/.package-lock.sha256"

say() { echo "interop: $*"; }

apt_install() {
  local sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || { say "need root or sudo to install: $*" >&2; exit 1; }
    sudo="sudo"
  fi
  say "installing $* (Debian packages)"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# Debian's own python3 has venv without ensurepip unless python3-venv is installed.
if ! command -v "$PYTHON" >/dev/null; then
  [ "$PYTHON" = python3 ] || { say "$PYTHON is missing" >&2; exit 1; }
  apt_install python3 python3-venv
elif ! "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null; then
  apt_install python3-venv
fi
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
  || { say "$PYTHON is $("$PYTHON" --version 2>&1); Django 5.2 needs 3.10 or later" >&2; exit 1; }

# The stamp covers the requirements and the interpreter the virtualenv was made with.
want="$( (cat "$requirements"; "$PYTHON" -c 'import sys; print(sys.version)') | sha256sum | cut -d' ' -f1)"
if [ -x "$venv/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  say "virtualenv $venv is up to date with $requirements"
else
  say "making virtualenv $venv with $("$PYTHON" --version 2>&1)"
  rm -rf "$venv"
  "$PYTHON" -m venv "$venv"
  say "installing $requirements (pip)"
  timeout 600 "$venv/bin/python" -m pip install --quiet --no-input --disable-pip-version-check \
    -r "$requirements"
  "$venv/bin/python" -m pip check
  echo "$want" >"$stamp"
  say "installed: $("$venv/bin/python" -m pip freeze --disable-pip-version-check | grep -iE '^(django|django-oauth-toolkit|oauthlib|waitress)==' | tr '\n' ' ')"
fi

# node and npm: Debian's nodejs (18 in bookworm, 20 in trixie) runs oidc-provider 8.
if ! command -v "$NODE" >/dev/null; then
  [ "$NODE" = node ] || { say "$NODE is missing" >&2; exit 1; }
  apt_install nodejs npm
elif ! command -v "$NPM" >/dev/null; then
  [ "$NPM" = npm ] || { say "$NPM is missing" >&2; exit 1; }
  apt_install npm
fi
"$NODE" -e 'const [a, b] = process.versions.node.split(".").map(Number); process.exit(a > 18 || (a === 18 && b >= 12) ? 0 : 1)' \
  || { say "$NODE is $("$NODE" --version); oidc-provider 8 needs 18.12 or later" >&2; exit 1; }

want="$(sha256sum "$oidc/package-lock.json" | cut -d' ' -f1)"
if [ -f "$node_stamp" ] && [ "$(cat "$node_stamp")" = "$want" ]; then
  say "$oidc/node_modules is up to date with package-lock.json"
else
  say "installing $oidc/package-lock.json (npm ci, node $("$NODE" --version))"
  (cd "$oidc" && timeout 600 "$NPM" ci --no-audit --no-fund --prefer-offline --loglevel=error)
  echo "$want" >"$node_stamp"
  say "installed: $(cd "$oidc" && "$NODE" -p 'const v = (p) => require(`./node_modules/${p}/package.json`).version; `oidc-provider==${v("oidc-provider")} jose==${v("jose")}`')"
fi

# The oidc-provider server alone, before bearerd meets it: each client authentication
# method, introspection, and the resource server's DPoP and certificate checks.
say "checking the oidc-provider server: $NODE $oidc/selfcheck.mjs"
(cd "$oidc" && timeout 300 "$NODE" selfcheck.mjs)

# A JDK (java runs the app from source, which takes its compiler; keytool makes the
# truststore): Debian's default-jdk-headless when there is none.
JAVA="${JAVA:-java}"
if ! command -v "$JAVA" >/dev/null; then
  [ "$JAVA" = java ] || { say "$JAVA is missing" >&2; exit 1; }
  apt_install default-jdk-headless
elif ! command -v javac >/dev/null || ! command -v keytool >/dev/null; then
  apt_install default-jdk-headless
fi
java_version="$("$JAVA" -XshowSettings:properties -version 2>&1 | sed -n 's/^ *java.specification.version = //p')"
[ "${java_version%%.*}" -ge 11 ] 2>/dev/null \
  || { say "$JAVA is Java ${java_version:-unknown}; the interception test needs 11 or later" >&2; exit 1; }
java_path="$(command -v "$JAVA")"

# Go for the interception test's Go app (`go run`, standard library only): Debian's golang-go.
command -v go >/dev/null || apt_install golang-go
go_path="$(command -v go)"

node_path="$(command -v "$NODE")"
say "running: BEARERD_INTEROP_PYTHON=$venv/bin/python BEARERD_INTEROP_NODE=$node_path BEARERD_INTEROP_JAVA=$java_path BEARERD_INTEROP_GO=$go_path BEARERD_INTEROP_OIDC_SERVER=$oidc/server.mjs $CARGO test --locked --test interop -- --ignored --test-threads=1"
BEARERD_INTEROP_PYTHON="$PWD/$venv/bin/python" \
  BEARERD_INTEROP_NODE="$node_path" \
  BEARERD_INTEROP_JAVA="$java_path" \
  BEARERD_INTEROP_GO="$go_path" \
  BEARERD_INTEROP_OIDC_SERVER="$PWD/$oidc/server.mjs" \
  "$CARGO" test --locked --test interop -- --ignored --test-threads=1
