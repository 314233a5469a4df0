# bertpipe: every stage is a target; `make demo` runs the pipeline on the embedded default, `make test` tests it.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
BUILD ?= build
DATA_DIR ?= $(abspath ../shared/data)
export DATA_DIR
BERTPIPE := $(BIN)/bertpipe
PYTEST_ARGS ?=

.PHONY: setup test test-fast lint demo vocab shards pretrain finetune leaderboard bench clean help

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | column -t -s $$'\t'

setup: $(STAMP)  ## create .venv with the pinned dependencies (torch first)

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c requirements.lock -e '.[dev]'
	@$(BIN)/python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $@

lint: $(STAMP)  ## ruff
	$(BIN)/ruff check pipeline tokenization recipes tests bench

test: lint  ## ruff + the whole test suite
	$(BIN)/pytest $(PYTEST_ARGS)

test-fast: lint  ## ruff + the tests not marked slow
	$(BIN)/pytest -m "not slow" $(PYTEST_ARGS)

# ---- stages --------------------------------------------------------------------------------------------
VOCAB_CONFIG ?= recipes/vocab/wiki.yaml

vocab: $(STAMP)  ## build the WordPiece vocabulary (VOCAB_CONFIG=..., OVERRIDES="key=value ...")
	$(BERTPIPE) vocab --config $(VOCAB_CONFIG) $(OVERRIDES)

SHARD_CONFIG ?= recipes/shard/wiki-128.yaml

shards: $(STAMP)  ## write Parquet shards (SHARD_CONFIG=..., OVERRIDES="key=value ...")
	$(BERTPIPE) shard --config $(SHARD_CONFIG) $(OVERRIDES)

PRETRAIN_CONFIG ?= recipes/pretrain/tiny-cpu.yaml
NPROC ?= 1

pretrain: $(STAMP)  ## pretrain BERT (PRETRAIN_CONFIG=..., NPROC=ranks on this node, OVERRIDES=...)
	if [ "$(NPROC)" = 1 ]; then $(BERTPIPE) pretrain --config $(PRETRAIN_CONFIG) $(OVERRIDES); \
	else $(BIN)/torchrun --nproc_per_node $(NPROC) $(BERTPIPE) pretrain --config $(PRETRAIN_CONFIG) $(OVERRIDES); fi

FINETUNE_CONFIG ?= recipes/finetune/sst2.yaml

finetune: $(STAMP)  ## fine-tune a recipe (FINETUNE_CONFIG=..., OVERRIDES="key=value ...")
	$(BERTPIPE) finetune --config $(FINETUNE_CONFIG) $(OVERRIDES)

leaderboard: $(STAMP)  ## gather every results.json under build/runs into build/runs/leaderboard.*
	$(BERTPIPE) leaderboard $(BUILD)/runs

# ---- the demo: the embedded default, on the CPU -------------------------------------------------------
demo: $(STAMP)  ## run the pipeline on the embedded default (Python's own documentation), no network, no data dir
	$(BERTPIPE) vocab --config recipes/vocab/demo.yaml output_dir=$(BUILD)/demo/vocab
	$(BERTPIPE) shard --config recipes/shard/demo.yaml vocab_dir=$(BUILD)/demo/vocab output_dir=$(BUILD)/demo/shards
	$(BERTPIPE) pretrain --config recipes/pretrain/tiny-cpu.yaml data.shards=$(BUILD)/demo/shards \
		data.vocab_dir=$(BUILD)/demo/vocab run_dir=$(BUILD)/demo/pretrain
	$(BERTPIPE) plot $(BUILD)/demo/pretrain

bench: $(STAMP)  ## run every stage's benchmark
	$(BIN)/python bench/vocab.py
	$(BIN)/python bench/shard.py
	$(BIN)/python bench/collate.py
	$(BIN)/python bench/model_cpu.py
	$(BIN)/python bench/pretrain.py
	$(BIN)/python bench/finetune.py

clean:  ## remove build outputs (keeps .venv)
	rm -rf $(BUILD)
