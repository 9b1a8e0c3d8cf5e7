#!/usr/bin/env bash
# Runs tests/interop.rs: bearerd against a real Django OAuth Toolkit server.
#
# Makes the Python virtualenv target/interop-venv from tests/interop/requirements.txt when it
# is missing or the requirements changed (a stamp in the virtualenv keeps their hash), then
# runs the interop tests (ignored by a plain `cargo test`) with BEARERD_INTEROP_PYTHON naming
# its interpreter. Each test starts its own server on a loopback port; nothing else is
# contacted but PyPI, for the install. Needs python3 (3.10 or later) with venv; installs
# Debian's python3 and python3-venv with apt-get (as root or through sudo) when missing.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
CARGO="${CARGO:-cargo}"
requirements=tests/interop/requirements.txt
venv=target/interop-venv
stamp="$venv/.requirements.sha256"

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

say "running: BEARERD_INTEROP_PYTHON=$venv/bin/python $CARGO test --locked --test interop -- --ignored --test-threads=1"
BEARERD_INTEROP_PYTHON="$PWD/$venv/bin/python" \
  "$CARGO" test --locked --test interop -- --ignored --test-threads=1
