# pathloop: make install | test | demo | bench | lint
# VENV may point at a venv shared between CI runs (CI clones afresh each time).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
CONSTRAINTS := constraints.txt
STAMP := $(VENV)/.pathloop-install-stamp
export HF_HUB_OFFLINE := 1
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: install test demo bench lint browsers clean

install: $(STAMP)

# torch first, pinned by the constraints file in every later pip call so nothing swaps it.
# The stamp depends on pyproject/constraints, so a second `make install` is a no-op.
$(STAMP): pyproject.toml $(CONSTRAINTS)
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q -c $(CONSTRAINTS) torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q -c $(CONSTRAINTS) -e ".[dev]"
	@touch $(STAMP)

# Debian's Chromium for the review-UI browser test (no browser download: Playwright uses it).
browsers:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || echo "chromium not installed: the browser test will be skipped"

test: install browsers
	$(PY) -m pytest -q -ra --durations=25

demo: install
	$(VENV)/bin/pathloop demo

bench: install
	$(PY) -m pathloop.bench --out BENCHMARKS.md --json benchmarks.json

lint: install
	$(VENV)/bin/ruff check pathloop jobs serve tests
	$(VENV)/bin/ruff format --check pathloop jobs serve tests

clean:
	rm -rf runs out .pytest_cache
