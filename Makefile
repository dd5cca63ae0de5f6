# Two entry points: `make demo` (the whole study on synthetic data) and `make test`.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.klgrade-installed

.PHONY: demo test lint install clean

$(STAMP): pyproject.toml constraints.txt
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) (set PYTHON=python3 to use another 3.11+)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	PIP_NO_CACHE_DIR=1 $(BIN)/pip install -q --upgrade pip
	# torch/torchvision are pinned by constraints.txt so pip never resolves another build
	# no wheel cache: the CUDA build of torch is ~6 GB installed, a cached copy would double it
	PIP_NO_CACHE_DIR=1 $(BIN)/pip install -c constraints.txt -e ".[all,dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=$${HF_HUB_OFFLINE:-1} $(BIN)/klgrade demo --out demo_out

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

test: $(STAMP) lint
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest

clean:
	rm -rf demo_out .pytest_cache
