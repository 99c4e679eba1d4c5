# The two commands of the README: `make demo` and `make test`. Both create the virtualenv, install
# the pinned dependencies and fetch the embedded data when missing, and reuse them when present.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
DATA := data/ml-100k
RUN := runs/ml100k
MODELS := models
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: demo test setup data clean

setup: $(INSTALLED)

$(BIN)/python:
	@$(PYTHON) -c 'import sys; v = sys.version_info[:2]; sys.exit(0 if v == (3, 11) else f"Python 3.11 is needed, found {sys.version.split()[0]}: set PYTHON=/path/to/python3.11")'
	$(PYTHON) -m venv $(VENV)

$(INSTALLED): setup.cfg pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

data: $(INSTALLED)
	$(BIN)/cascade data fetch movielens-100k --out $(DATA)

$(RUN)/checkpoints/final.index: | $(INSTALLED) data
	$(BIN)/cascade train retrieval --data $(DATA) --run $(RUN)

$(RUN)/.exported: $(RUN)/checkpoints/final.index
	$(BIN)/cascade export --run $(RUN) --model-base-path $(MODELS) --index bruteforce
	touch $@

demo: data $(RUN)/checkpoints/final.index $(RUN)/.exported
	$(BIN)/cascade evaluate retrieval --run $(RUN)
	$(BIN)/cascade recommend --model-base-path $(MODELS) --user 42 --user new-user-not-in-data

test: data
	$(BIN)/python -m pytest

clean:
	rm -rf $(RUN) $(MODELS)
