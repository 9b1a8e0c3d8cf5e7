#!/usr/bin/env bash
# Installs what `make test` needs beyond the Rust toolchain, when it is missing, so that the
# tests run the same on a fresh machine and in CI:
#   promtool, prometheus  (Debian's prometheus package) for tests/spawned/observability.rs
#   node, npm             (Debian's nodejs and npm packages) for tests/interop/oidc.rs, whose
#                         npm packages scripts/interop.sh installs
#   redis-server          (Debian's redis-server package) for tests/spawned/cache.rs, which starts its
#                         own servers on loopback ports; the distribution's service is not
#                         left running
#   tinyproxy             (Debian's tinyproxy package) for tests/spawned/egress.rs, which starts its
#                         own proxies on loopback ports; the distribution's service is not left
#                         running
#   curl, wget, python3 with requests   the clients tests/spawned/routing.rs sends through a forward
#                         listener with their proxy settings
#   chromium              (Debian's chromium package) for tests/spawned/status_page.rs, which loads
#                         the status page in it, headless (about 90 MB to download, a minute)
#   java, javac, keytool  (Debian's default-jdk-headless: OpenJDK 17 on bookworm) for
#                         tests/interop/intercept.rs, whose Java app runs as a single-file source
#                         program (which needs the JDK's compiler, not a JRE alone)
#   go                    (Debian's golang-go: Go 1.19 on bookworm) for tests/interop/intercept.rs,
#                         whose Go app runs with `go run` (standard library only)
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
if ! command -v redis-server >/dev/null; then
  missing+=(redis-server)
fi
# Debian installs it in /usr/bin; a PATH without it still finds it there (tests/support/tinyproxy.rs).
if ! command -v tinyproxy >/dev/null && [ ! -x /usr/bin/tinyproxy ] && [ ! -x /usr/sbin/tinyproxy ]; then
  missing+=(tinyproxy)
fi
if ! command -v chromium >/dev/null; then
  missing+=(chromium)
fi
if ! command -v javac >/dev/null || ! command -v java >/dev/null || ! command -v keytool >/dev/null; then
  missing+=(default-jdk-headless)
fi
if ! command -v go >/dev/null; then
  missing+=(golang-go)
fi
for tool in curl wget python3; do
  command -v "$tool" >/dev/null || missing+=("$tool")
done
if command -v python3 >/dev/null && ! python3 -c 'import requests' 2>/dev/null; then
  missing+=(python3-requests)
fi
[ ${#missing[@]} -eq 0 ] && exit 0

sudo=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "install-test-deps: need root or sudo to install: ${missing[*]}" >&2; exit 1; }
  sudo="sudo"
fi

# Debian starts a package's service when it installs it, unless /usr/sbin/policy-rc.d says
# no (exit 101), as container images' usually does. Where there is none, one that says no is
# put there for the install and removed after it.
policy=/usr/sbin/policy-rc.d
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\n# install-test-deps: no service starts during the install.\nexit 101\n' |
    $sudo tee "$policy" >/dev/null
  $sudo chmod 755 "$policy"
  trap '$sudo rm -f "$policy"' EXIT
fi

echo "install-test-deps: installing ${missing[*]} (Debian packages)"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null

# On a machine run by systemd the unit is enabled all the same: disable it, and stop it
# should anything have started it. The tests' servers are their own.
if [[ " ${missing[*]} " == *" redis-server "* ]] && [ -d /run/systemd/system ]; then
  $sudo systemctl disable --now redis-server.service >/dev/null 2>&1 || true
fi
if [[ " ${missing[*]} " == *" tinyproxy "* ]] && [ -d /run/systemd/system ]; then
  $sudo systemctl disable --now tinyproxy.service >/dev/null 2>&1 || true
fi
