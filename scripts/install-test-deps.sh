#!/usr/bin/env bash
# Installs what `make test` needs beyond the Rust toolchain, when it is missing, so that the
# tests run the same on a fresh machine and in CI:
#   promtool, prometheus  (Debian's prometheus package) for tests/observability.rs
#   node, npm             (Debian's nodejs and npm packages) for tests/interop_oidc.rs, whose
#                         npm packages scripts/interop.sh installs
set -euo pipefail

missing=()
if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null; then
  missing+=(prometheus)
fi
if ! command -v node >/dev/null; then
  missing+=(nodejs npm)
elif ! command -v npm >/dev/null; then
  missing+=(npm)
fi
[ ${#missing[@]} -eq 0 ] && exit 0

sudo=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "install-test-deps: need root or sudo to install: ${missing[*]}" >&2; exit 1; }
  sudo="sudo"
fi
echo "install-test-deps: installing ${missing[*]} (Debian packages)"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
