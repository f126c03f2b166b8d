# Two set-up commands: `make demo` and `make test`. Both install missing build prerequisites
# where they can (Pingora needs cmake and a C compiler) or stop with the command to run.

CARGO ?= cargo
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test prereqs js-deps bench bench-load lint fuzz

demo: prereqs
	$(CARGO) run --release -- demo

test: prereqs js-deps
	$(CARGO) test --all-targets

bench: prereqs
	$(CARGO) bench

# The whole-gateway load harness (docs/bench-load.md): the generator backend directly, behind
# nginx and behind Sluice, on loopback; about 5 minutes. DURATION (seconds of events per stream,
# default 10), REPS (default 1), ONLY (e.g. nginx,sluice) and SCENARIOS (e.g. 1,5 or 1-4) scale
# or narrow it. The report is printed and written to target/bench-load/report.md.
bench-load: prereqs
	$(CARGO) build --release --bin sluice --example load
	ulimit -n 65536 2>/dev/null || ulimit -n $$(ulimit -Hn); \
	DURATION='$(DURATION)' REPS='$(REPS)' ONLY='$(ONLY)' SCENARIOS='$(SCENARIOS)' \
	  target/release/examples/load --sluice target/release/sluice

# Fuzz every network parser for FUZZ_SECONDS each (default 60; `make test`: 2), see fuzz/README.md.
fuzz: prereqs
	FUZZ_SECONDS=$(or $(FUZZ_SECONDS),60) $(CARGO) test --release --test fuzz -- --nocapture

lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings

prereqs:
	@command -v $(CARGO) >/dev/null 2>&1 || { echo "Rust is missing: install it with https://rustup.rs (curl --proto '=https' -sSf https://sh.rustup.rs | sh)"; exit 1; }
	@missing=""; \
	command -v cmake >/dev/null 2>&1 || missing="$$missing cmake"; \
	command -v cc >/dev/null 2>&1 || missing="$$missing gcc"; \
	command -v make >/dev/null 2>&1 || missing="$$missing make"; \
	if [ -n "$$missing" ]; then \
	  if command -v apt-get >/dev/null 2>&1 && { [ "$$(id -u)" = 0 ] || command -v sudo >/dev/null 2>&1; }; then \
	    echo "installing build prerequisites:$$missing"; \
	    $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing >/dev/null; \
	  elif command -v brew >/dev/null 2>&1; then \
	    brew install $$missing; \
	  else \
	    echo "Pingora needs:$$missing. Install them, e.g.: sudo apt-get install -y$$missing"; exit 1; \
	  fi; \
	fi

# Node packages for the third-party client tests (the AI SDK). Without Node.js those tests
# are skipped with a message.
js-deps:
	@if command -v npm >/dev/null 2>&1; then \
	  npm ci --prefix tests/js --no-audit --no-fund --loglevel=error; \
	else \
	  echo "Node.js not found: the AI SDK client tests will be skipped (install nodejs and npm to run them)"; \
	fi
