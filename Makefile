# Set-up and entry points. Every target does its own set-up on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: venv browser lint test demo serve clean

SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)

venv: $(STAMP)

$(STAMP): requirements.txt requirements-test.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements-test.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $(STAMP)

# The gallery test opens the demo's page in Debian's Chromium through chromedriver.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium chromium-driver >/dev/null; }

# The lint gate runs before the tests and fails the build (rules in pyproject.toml).
lint: $(STAMP)
	$(BIN)/ruff check clipbeam tests benchmarks

test: $(STAMP) browser lint
	$(BIN)/python -m pytest -q tests

demo: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m clipbeam.demo --output demo-output

# Search the demo's index from a browser at http://127.0.0.1:8765/ (runs the demo first if needed).
serve: $(STAMP)
	test -f demo-output/index/index.json || $(MAKE) demo
	$(BIN)/python -m clipbeam serve --index demo-output/index

clean:
	rm -rf $(VENV) demo-output .pytest_cache
