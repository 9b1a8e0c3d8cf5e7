#!/usr/bin/env bash
# Supply-chain checks with cargo-deny (`make deny`, part of `make test`), configured by deny.toml:
#   1. licences, bans and sources: `cargo deny --offline check licenses bans sources`. Must pass.
#   2. advisories (RustSec): needs the advisory database, a git repository on GitHub. The script
#      first fetches it on its own (`cargo deny fetch db`, bounded by a timeout), so that "the
#      database cannot be reached" is told apart from "advisories found" (both exit 1 from
#      `cargo deny check advisories`). Unreachable (a network error, or no answer within
#      DENY_DB_TIMEOUT=60 s): one SKIPPED line, and this script still passes (set
#      DENY_REQUIRE_ADVISORIES=1 to make that a failure). Any other fetch error fails. Reached:
#      the check runs on the fresh database and any advisory, or a yanked crate, fails it.
#
# Installs cargo-deny into $CARGO_HOME/bin (~/.cargo/bin) when it is missing:
#   cargo install cargo-deny --locked --version $CARGO_DENY_VERSION
# which builds it from crates.io (about 120 crates): 3.5 to 5 minutes on this 2-core machine
# (measured 3m30s on an idle machine, 5m11s with other builds running). Later runs install nothing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# The version deny.toml was written and checked against; a newer one is fine to move to.
readonly CARGO_DENY_VERSION="${CARGO_DENY_VERSION:-0.20.2}"
# Seconds allowed for fetching the advisory database (a shallow git clone, a few MB).
readonly DB_TIMEOUT="${DENY_DB_TIMEOUT:-60}"

say() { printf 'cargo-deny: %s\n' "$*"; }

# `cargo deny` rather than `cargo-deny`: cargo finds subcommands in $CARGO_HOME/bin even when
# that is not on PATH.
if ! cargo deny --version >/dev/null 2>&1; then
  say "not installed; cargo install cargo-deny --locked --version $CARGO_DENY_VERSION (3.5 to 5 minutes)"
  start=$SECONDS
  cargo install cargo-deny --locked --version "$CARGO_DENY_VERSION"
  say "installed in $((SECONDS - start)) s"
fi
say "using $(cargo deny --version)"

# cargo-deny reads the graph with `cargo metadata`, which needs every package's manifest, the
# Windows and macOS ones too; a build downloads only the host's. With --offline nothing is
# downloaded, so on a fresh machine fetch the locked crates from crates.io first.
cargo fetch --locked --quiet

# 1. Licences, bans, sources: deny.toml and Cargo.lock only, no network. Duplicate versions
#    are warnings, shown without their inclusion graphs (`cargo deny check bans` shows them).
say "check licenses bans sources (offline)"
cargo deny --offline check --hide-inclusion-graph licenses bans sources

# 2. Advisories.
fetch_log=$(mktemp)
trap 'rm -f "$fetch_log"' EXIT
fetch_rc=0
GIT_TERMINAL_PROMPT=0 timeout --kill-after=10 "$DB_TIMEOUT" cargo deny fetch db >"$fetch_log" 2>&1 || fetch_rc=$?
if [ "$fetch_rc" -ne 0 ]; then
  # Only a network failure means "cannot be reached" (git's `fatal: unable to access ...`,
  # a name that does not resolve, a refused or timed-out connection, or no answer at all).
  # Any other fetch failure (no git, a database cargo-deny cannot parse, a full disk) is a
  # real problem and fails the script.
  if [ "$fetch_rc" -eq 124 ] || [ "$fetch_rc" -eq 137 ]; then
    why="no answer within ${DB_TIMEOUT} s"
  elif why=$(grep -m1 -iE 'unable to access|could not resolve|name resolution|failed to connect|could not connect|connection (refused|timed out|reset)|network is unreachable|no route to host|operation timed out' "$fetch_log"); then
    why=$(printf '%s' "$why" | sed -e 's/^fatal: *//' -e 's/^.*\[ERROR\] *//' | tr -d '\r' | cut -c1-200)
  else
    say "advisory database fetch FAILED (not a network error; cargo deny fetch db exited $fetch_rc):" >&2
    sed 's/^/  /' "$fetch_log" >&2
    exit 1
  fi
  line="advisory check SKIPPED: the RustSec advisory database cannot be reached from this machine ($why); run \`cargo deny check advisories\` where GitHub is reachable"
  if [ "${DENY_REQUIRE_ADVISORIES:-0}" = 1 ]; then
    say "${line/SKIPPED/FAILED}" >&2
    sed 's/^/  /' "$fetch_log" >&2
    exit 1
  fi
  say "$line"
  exit 0
fi

# The database was just fetched: check against it without fetching again, so that a non-zero
# exit here means advisories (or a yanked crate) found, never a network problem.
say "check advisories (RustSec database fetched)"
cargo deny --offline check advisories
