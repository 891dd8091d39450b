# sessiond developer entry points. Everything runs from the project's own venv (.venv), built on demand,
# so a fresh clone needs only `make test` (and, for the service tests, the local servers: scripts/services.sh).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Reinstall only when the dependencies may have changed: the stamp is older than pyproject.toml.
STAMP := $(VENV)/.sessiond-installed
# pytest is interrupted (SIGINT, so it prints what was running) after this many seconds; CI's budget is 30 min.
TEST_TIMEOUT ?= 1200
# Dump every thread's stack when one test runs longer than this (diagnoses hangs without killing the run).
HANG_DUMP ?= 300
PYTEST_ARGS ?=
TYPED := protocol runtime actors transport storage api client

.PHONY: all venv run web test services tools lint bench clean distclean

all: test

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -e '.[dev,bench]'
	touch $(STAMP)

# The web app at http://127.0.0.1:8080/app/ (built when Node 20+ is installed) with dev login on, unless a JWT key is
# configured (dev login refuses to run with a real key) or SESSIOND_DEV_LOGIN says otherwise.
run: venv web
	@if [ -z "$$SESSIOND_JWT_SECRET$$SESSIOND_JWT_SECRET_FILE$$SESSIOND_JWT_PUBLIC_KEY_FILE" ]; then \
		export SESSIOND_DEV_LOGIN=$${SESSIOND_DEV_LOGIN-1}; \
	else echo "sessiond: a JWT key is configured, so no dev login: sign in with a token (sessiond token --user U)"; fi; \
	echo "sessiond: open http://127.0.0.1:$${SESSIOND_HTTP_PORT:-8080}/app/"; \
	exec $(BIN)/sessiond serve

# Build sdk-ts then web/ into web/dist (npm ci only when node_modules is older than the lockfile). Without Node 20+
# it says so and does nothing: the server runs without the app (/app/ answers 404 saying how to build it).
web:
	@if ! command -v npm >/dev/null 2>&1 || ! node -e 'process.exit(parseInt(process.versions.node) < 20 ? 1 : 0)' \
		2>/dev/null; then echo "make: Node 20+ with npm not found: the web app (/app/) was not built" >&2; exit 0; fi; \
	for pkg in sdk-ts web; do \
		[ $$pkg/node_modules/.package-lock.json -nt $$pkg/package-lock.json ] \
			|| (cd $$pkg && npm ci --no-audit --no-fund) || exit 1; \
		(cd $$pkg && npm run build) || exit 1; \
	done

services:
	scripts/services.sh ensure

tools:
	scripts/tools.sh ensure

# Lint first, but run the tests even when lint fails (one CI run reports both); fail if either failed.
test: venv
	@lint=0; \
	echo "+ ruff check ."; $(BIN)/ruff check . || lint=1; \
	echo "+ mypy $(TYPED)"; $(BIN)/mypy $(TYPED) || lint=1; \
	echo "+ scripts/services.sh ensure"; scripts/services.sh ensure || exit 1; \
	echo "+ scripts/tools.sh ensure"; scripts/tools.sh ensure || exit 1; \
	echo "+ pytest -q $(PYTEST_ARGS)"; \
	timeout -s INT -k 30 $(TEST_TIMEOUT) $(BIN)/pytest -q -o faulthandler_timeout=$(HANG_DUMP) $(PYTEST_ARGS) \
		|| exit $$?; \
	if [ $$lint -ne 0 ]; then echo "make test: tests passed but ruff or mypy failed (see above)" >&2; fi; \
	exit $$lint

lint: venv
	@rc=0; \
	echo "+ ruff check ."; $(BIN)/ruff check . || rc=1; \
	echo "+ mypy $(TYPED)"; $(BIN)/mypy $(TYPED) || rc=1; \
	exit $$rc

bench: venv
	$(BIN)/python -m bench --help

# Build and tool caches; keeps the venv and the embedded data dir (.sessiond holds real data).
clean:
	rm -rf build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
