# Plain runner. `make study` runs the whole study and builds the book (`make study-12k`: its protocol-size edition); `make test` runs the tests (`make test-fast`
# the tier without slow tests); `make lab` opens
# the notebooks in JupyterLab with the project's environment as the kernel. All create .venv from the pinned
# requirements on first use. `make gpu-check` measures extraction, scale and training on a CUDA machine.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Real data: DCMFG_DATA names a folder of dataset folders; default to ../shared/data where it exists.
DCMFG_DATA ?= $(firstword $(wildcard $(CURDIR)/../shared/data))
export DCMFG_DATA
# The protocol-size edition reads a folder of its own (never under DCMFG_DATA: `dataset: auto` must not find it).
DCMFG_DATA_12K ?= $(firstword $(wildcard $(CURDIR)/../shared/data-12k))

.PHONY: study study-12k test test-fast setup browser lab gpu-check clean

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -r requirements.txt
	$(BIN)/pip install --no-deps -e .
	touch $(STAMP)

# Headless Chromium (Debian) checks the rendered book in the tests; chromium-driver lets Selenium drive the explorer
# in JupyterLab (tests/test_explorer_browser.py).
browser:
	@{ command -v chromium && command -v chromedriver; } >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	  else echo "chromium missing: sudo apt-get install chromium chromium-driver (the browser tests will be skipped)"; fi; }

study: $(STAMP)
	$(BIN)/dcmfg study run

# The study at protocol size (configs/study-mirflickr12k.yaml) into book-mirflickr12k/_build/html; it prints each
# chapter's wall and CPU time and the runs it trained, resumed or reused (a cut-off build picks up where it stopped).
study-12k: $(STAMP)
	@test -n "$(DCMFG_DATA_12K)" || { echo "study-12k: set DCMFG_DATA_12K to the folder that holds mirflickr-12k/ (or a mirflickr25k/ folder)"; exit 2; }
	DCMFG_DATA=$(DCMFG_DATA_12K) $(BIN)/dcmfg study run --params mirflickr12k --out-book book-mirflickr12k

test: $(STAMP) browser
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest

# The edit-test loop: every test not marked slow (no study, book, browser, wheel, torchrun or real training run).
test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest -m "not slow"

# JupyterLab on this machine (http://127.0.0.1:8888, token printed); its Python 3 kernel is .venv's interpreter.
lab: $(STAMP)
	$(BIN)/jupyter lab --ip=127.0.0.1 --notebook-dir=notebooks

gpu-check: $(STAMP)
	bash benchmarks/gpu_check.sh

clean:
	rm -rf book/_build
