# The two commands of the README: `make demo` and `make test`. Both create the virtualenv, install
# the pinned dependencies and fetch the embedded data when missing, and reuse them when present.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
DATA := data/ml-100k
RUN := runs/ml100k
MODELS := models
GRPC_PORT ?= 8500
REST_PORT ?= 8501
SHELL := /bin/bash
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

$(RUN)/reranker/checkpoints/final.index: $(RUN)/checkpoints/final.index
	$(BIN)/cascade train reranker --run $(RUN)

$(RUN)/copywriter/config.json: $(RUN)/checkpoints/final.index
	$(BIN)/cascade train copywriter --run $(RUN)

STAGES := $(RUN)/checkpoints/final.index $(RUN)/reranker/checkpoints/final.index $(RUN)/copywriter/config.json

$(RUN)/.exported: $(STAGES)
	$(BIN)/cascade export --run $(RUN) --model-base-path $(MODELS) --index bruteforce
	touch $@

demo: data $(STAGES) $(RUN)/.exported
	$(BIN)/cascade evaluate retrieval --run $(RUN)
	$(BIN)/cascade evaluate reranker --run $(RUN)
	$(BIN)/cascade evaluate copywriter --run $(RUN)
	$(BIN)/cascade report --run $(RUN)
	$(BIN)/cascade recommend --model-base-path $(MODELS) --model cascade --user 42 --user new-user-not-in-data
	@echo "--- the same through TF Serving's API: cascade serve on localhost:$(GRPC_PORT) (gRPC) and :$(REST_PORT) (REST)"
	@$(BIN)/cascade serve --model-base-path $(MODELS) --port $(GRPC_PORT) --rest_api_port $(REST_PORT) \
	    --enable_batching --batching_parameters_file $(MODELS)/batching_parameters.txt \
	    > $(RUN)/serve.log 2>&1 & server=$$!; trap 'kill -TERM $$server; wait $$server' EXIT; \
	  $(BIN)/cascade recommend --server localhost:$(GRPC_PORT) --wait 300 --model cascade --user 42 --user new-user-not-in-data && \
	  $(BIN)/cascade recommend --rest http://localhost:$(REST_PORT) --model cascade --user 7 --top 5

# Two workers, each module's tests in one of them (its module fixtures built once); TEST_WORKERS=0
# runs the suite in this process.
TEST_WORKERS ?= 2

test: data
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadscope

clean:
	rm -rf $(RUN) $(MODELS)
