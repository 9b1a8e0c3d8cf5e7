# bearerd — the two commands a newcomer needs are `make demo` and `make test`.

CARGO ?= cargo

.PHONY: all build test lint test-deps demo clean

all: build

build:
	$(CARGO) build --release --bin bearerd

## Formatting, lints, and every test. This is what CI runs (.ci/run).
test: lint test-deps
	$(CARGO) test --all-targets --locked
	$(CARGO) test --doc --locked

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets --locked -- -D warnings

## Debian's prometheus package (promtool, prometheus) when missing.
test-deps:
	bash scripts/install-test-deps.sh

## bearerd with a local demo token endpoint and echo upstream; prints the curl line to try.
demo:
	bash scripts/demo.sh

clean:
	$(CARGO) clean
