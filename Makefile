# bearerd — the two commands a newcomer needs are `make demo` and `make test`.

CARGO ?= cargo

.PHONY: all build test lint test-deps check-deploy deny interop demo clean

all: build

build:
	$(CARGO) build --release --bin bearerd

## Formatting, lints, and every test. This is what CI runs (.ci/run).
test: lint test-deps check-deploy deny
	$(CARGO) test --all-targets --locked
	$(CARGO) test --doc --locked
	$(MAKE) --no-print-directory interop

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets --locked -- -D warnings

## Debian's prometheus package (promtool, prometheus) when missing.
test-deps:
	bash scripts/install-test-deps.sh

## deploy/: kustomize builds validated against the Kubernetes schemas, promtool on the alerts
## and their unit tests and on the dashboard's queries; tools into target/deploy-venv.
check-deploy:
	bash scripts/check-deploy.sh

## cargo-deny (deny.toml): licences, bans, sources offline; RustSec advisories when reachable.
deny:
	bash scripts/deny.sh

## bearerd against a real Django OAuth Toolkit server (tests/interop/django.rs), in a Python
## virtualenv under target/ that scripts/interop.sh makes or updates from PyPI, and against
## node's oidc-provider (tests/interop/oidc.rs), npm packages from tests/interop/oidc's lock.
interop:
	CARGO="$(CARGO)" bash scripts/interop.sh

## bearerd with a local demo token endpoint and echo upstream; prints the curl line to try.
demo:
	bash scripts/demo.sh

## bearerd against nginx and the bare upstream with wrk, the HTTP/2 cell with h2load, plus the
## cold-start herd (not part of test; about 7 minutes; BENCH_SECONDS=3 BENCH_ROUNDS=1 for a
## quick look). docs/benchmarks.md.
.PHONY: bench
bench:
	$(CARGO) build --release --bin bearerd
	python3 scripts/bench/run.py

## cargo-fuzz (libFuzzer) on the parsers, FUZZ_SECONDS (60) per target; not part of test (fuzz/).
.PHONY: fuzz
fuzz:
	CARGO="$(CARGO)" bash scripts/fuzz.sh

clean:
	$(CARGO) clean
