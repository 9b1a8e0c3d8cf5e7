#!/usr/bin/env bash
# Fuzzes bearerd with cargo-fuzz (libFuzzer): every target in fuzz/fuzz_targets/ in turn, for
# FUZZ_SECONDS each (default 60), starting from the seeds committed in fuzz/corpus/<target>/.
#
# The fuzzer writes what it finds into its corpus, so it runs on a copy, fuzz/target/corpus/,
# which is kept between runs (delete it to start over from the seeds) and never dirties the
# repository. Crashes land in fuzz/artifacts/<target>/ (ignored by git); the script goes on
# with the other targets, then exits 1 if any target failed.
#
#   FUZZ_SECONDS=600 make fuzz             longer runs
#   FUZZ_TARGETS="config" make fuzz        some targets only
#
# Installs cargo-fuzz from crates.io when missing. Needs no clang: libfuzzer-sys builds
# libFuzzer with the system's C++ compiler, and rustc does the instrumentation.
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO="${CARGO:-cargo}"
FUZZ_SECONDS="${FUZZ_SECONDS:-60}"
# -max_len per target: above the largest real input of its kind (a token response of a few
# KiB; a config file, config.example.toml being 9 KiB; one request target and its headers; a
# control byte, four encodings and a secret of at most 64 characters).
declare -A MAX_LEN=([token_response]=8192 [config]=16384 [request_rewrite]=2048 [redaction]=512 [cache_entry]=20000)
FUZZ_TARGETS="${FUZZ_TARGETS:-token_response config request_rewrite redaction cache_entry}"

say() { echo "fuzz: $*"; }

# cargo-fuzz builds with a nightly-only rustc flag (-Zsanitizer=address, for AddressSanitizer
# over the dependencies' unsafe code), and the machine has one stable toolchain and no way to
# fetch a nightly. RUSTC_BOOTSTRAP=1 makes the stable compiler accept -Z flags. It is set here
# only, for the fuzz build in its own target directory (fuzz/target), never for the normal
# build or the tests.
export RUSTC_BOOTSTRAP=1

if ! "$CARGO" fuzz --version >/dev/null 2>&1; then
  say "installing cargo-fuzz (crates.io)"
  "$CARGO" install cargo-fuzz --locked
fi

say "building the targets (fuzz/target, address sanitizer, debug assertions)"
"$CARGO" fuzz build

logs=fuzz/target/logs
mkdir -p "$logs"
failed=()
for target in $FUZZ_TARGETS; do
  max_len="${MAX_LEN[$target]:-4096}"
  corpus="fuzz/target/corpus/$target"
  artifacts="fuzz/artifacts/$target"
  mkdir -p "$corpus" "$artifacts"
  # Seeds refreshed from the committed corpus; what earlier runs found is kept beside them.
  cp -p fuzz/corpus/"$target"/* "$corpus"/
  marker="$(mktemp)"
  say "$target: ${FUZZ_SECONDS}s, -max_len=$max_len, corpus $corpus ($(ls "$corpus" | wc -l) inputs)"
  status=0
  # -timeout: an input taking over 10 s is a hang worth reporting, not something to wait for.
  "$CARGO" fuzz run "$target" "$corpus" -- \
    -max_total_time="$FUZZ_SECONDS" -max_len="$max_len" -timeout=10 -print_final_stats=1 \
    >"$logs/$target.log" 2>&1 || status=$?
  # libFuzzer's last status line (coverage, features, corpus) and its run count.
  grep -E '^#[0-9]+' "$logs/$target.log" | tail -n 1 || true
  grep -E '^stat::number_of_executed_units' "$logs/$target.log" || true
  if [ "$status" -ne 0 ]; then
    failed+=("$target")
    say "$target FAILED (exit $status); log: $logs/$target.log"
    # The panic and its message, or the sanitizer's report.
    grep -E -A 1 -m 3 "panicked at" "$logs/$target.log" || true
    grep -E -m 3 "^==[0-9]+==ERROR|^SUMMARY" "$logs/$target.log" || true
    found="$(find "$artifacts" -type f -newer "$marker")"
    if [ -n "$found" ]; then
      say "input(s) that failed; reproduce with RUSTC_BOOTSTRAP=1 cargo fuzz run $target <file>,"
      say "shrink with RUSTC_BOOTSTRAP=1 cargo fuzz tmin $target <file>:"
      echo "$found" | sed 's/^/  /'
    fi
  fi
  rm -f "$marker"
done

if [ "${#failed[@]}" -ne 0 ]; then
  say "failed: ${failed[*]}"
  say "every crash must become a regular test (in tests/ or the module's unit tests) that fails"
  say "before the fix and passes after it; the artifact files are not committed."
  exit 1
fi
say "no crashes in ${FUZZ_SECONDS}s per target"
