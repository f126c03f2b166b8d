# Two set-up commands: `make demo` and `make test`. Both install missing build prerequisites
# where they can (Pingora needs cmake and a C compiler; the Redis store's tests need
# redis-server) or stop with the command to run.

CARGO ?= cargo
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo demo-cluster test prereqs redis-prereq js-deps browser-prereq bench bench-load lint fuzz

demo: prereqs
	$(CARGO) run --release -- demo

# Three gateway instances sharing one Redis, and the mock agent: `sluice demo --instances 3`
# over a redis-server started here (the first free port from 6390, a temporary directory, no
# persistence) and stopped when the demo ends.
demo-cluster: prereqs redis-prereq
	$(CARGO) build --release --bin sluice
	@dir=$$(mktemp -d); pid=""; port=""; \
	trap 'if [ -n "$$pid" ]; then kill $$pid 2>/dev/null; wait $$pid 2>/dev/null; fi; rm -rf "$$dir"' EXIT; \
	trap 'exit 130' INT TERM; \
	for p in $$(seq 6390 6409); do \
	  redis-server --port $$p --bind 127.0.0.1 --save '' --appendonly no --dir "$$dir" \
	    --logfile "$$dir/redis.log" --daemonize no & pid=$$!; \
	  i=0; while [ $$i -lt 50 ] && kill -0 $$pid 2>/dev/null; do \
	    sleep 0.1; i=$$((i + 1)); \
	    if redis-cli -p $$p info server 2>/dev/null | tr -d '\r' | grep -qx "process_id:$$pid"; then port=$$p; break; fi; \
	  done; \
	  [ -n "$$port" ] && break; \
	  kill $$pid 2>/dev/null; wait $$pid 2>/dev/null; pid=""; \
	done; \
	if [ -z "$$port" ]; then echo "could not start redis-server on any port from 6390 to 6409"; cat "$$dir/redis.log" 2>/dev/null; exit 1; fi; \
	echo "redis-server (pid $$pid) listening on 127.0.0.1:$$port, data in $$dir (removed on exit)"; \
	$(CARGO) run --release -- demo --instances 3 --redis redis://127.0.0.1:$$port

test: prereqs redis-prereq js-deps
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
	DURATION='$(DURATION)' RATE='$(RATE)' REPS='$(REPS)' ONLY='$(ONLY)' SCENARIOS='$(SCENARIOS)' \
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

# The Redis store's tests start their own redis-server on a free port (never skipped), and so does
# demo-cluster: install it when missing (the Debian package brings redis-cli too).
# The Redis store's tests start their own redis-server (one of them speaks TLS to it, with a
# certificate made by openssl).
redis-prereq:
	@missing=""; \
	command -v redis-server >/dev/null 2>&1 || missing="$$missing redis-server"; \
	command -v openssl >/dev/null 2>&1 || missing="$$missing openssl"; \
	if [ -n "$$missing" ]; then \
	  if command -v apt-get >/dev/null 2>&1 && { [ "$$(id -u)" = 0 ] || command -v sudo >/dev/null 2>&1; }; then \
	    echo "installing$$missing (the Redis store's tests start their own redis-server)"; \
	    $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing >/dev/null; \
	  elif command -v brew >/dev/null 2>&1; then \
	    brew install $$(echo $$missing | sed 's/redis-server/redis/'); \
	  else \
	    echo "The Redis store's tests need$$missing (Redis 7.0+ or Valkey 7.2+). Install it, e.g.: sudo apt-get install -y$$missing"; exit 1; \
	  fi; \
	fi
	@v=$$(redis-server --version | sed -n 's/.* v=\([0-9]*\)\..*/\1/p'); \
	if [ -n "$$v" ] && [ "$$v" -lt 7 ]; then \
	  echo "redis-server $$v is too old: the Redis store needs Redis 7.0+ (or Valkey 7.2+ as redis-server)"; exit 1; \
	fi

# Node packages for the third-party client tests (the AI SDK). Without Node.js those tests
# are skipped with a message.
js-deps:
	@if command -v npm >/dev/null 2>&1; then \
	  npm ci --prefix tests/js --no-audit --no-fund --loglevel=error; \
	else \
	  echo "Node.js not found: the AI SDK client tests will be skipped (install nodejs and npm to run them)"; \
	fi

# Debian's Chromium, for the demo page's browser test (tests/browser.rs: skipped with a message
# without it, except under .ci/run, which installs it and sets SLUICE_REQUIRE_BROWSER=1).
browser-prereq:
	@[ -x /usr/bin/chromium ] || { $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium >/dev/null; }
