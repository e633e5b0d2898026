# lora2 developer commands. PYTHON picks the interpreter that creates the virtual environment.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
GLUE_DIR ?= $(abspath ../shared/data/glue)
export HF_HUB_OFFLINE ?= 1
export LORA2_GLUE_DIR ?= $(GLUE_DIR)

.PHONY: setup example test lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# the CPU build of torch first: an unpinned torch would pull several GB of CUDA packages
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev,data,baselines,model]"

setup: $(PY)

example: setup
	$(PY) examples/quickstart.py --data-dir $(LORA2_GLUE_DIR)

test: setup
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) runs .pytest_cache
