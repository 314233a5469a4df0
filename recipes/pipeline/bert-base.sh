# BERT-base as in the paper's recipe, on the Wikipedia and book samples of DATA_DIR: a 30k uncased vocabulary,
# phase 1 at seq 128, fine-tuned on SST-2, CoNLL-2003 and UD POS, beside the RNN baselines.
# Sourced by bash with DATA_DIR set; every variable may be preset in the environment. For phase 2 (seq 512),
# submit again with PRETRAIN_CONFIG=recipes/pretrain/bert-base-512.yaml SHARD_CONFIG=recipes/shard/wiki-512.yaml.
VOCAB_CONFIG=${VOCAB_CONFIG:-recipes/vocab/wiki.yaml}
SHARD_CONFIG=${SHARD_CONFIG:-recipes/shard/wiki-128.yaml}
SHARD_TASKS=${SHARD_TASKS:-8}
PRETRAIN_CONFIG=${PRETRAIN_CONFIG:-recipes/pretrain/bert-base-128.yaml}
FINETUNE_CONFIGS=${FINETUNE_CONFIGS:-recipes/finetune/sst2.yaml recipes/finetune/conll2003.yaml \
recipes/finetune/ud_pos.yaml}
BASELINE_CONFIGS=${BASELINE_CONFIGS:-recipes/baselines/sst2-lstm.yaml recipes/baselines/sst2-bilstm.yaml \
recipes/baselines/sst2-gru.yaml recipes/baselines/sst2-rnn.yaml recipes/baselines/conll2003-bilstm.yaml \
recipes/baselines/ud_pos-bilstm.yaml}
# what the vocab and shard configs read: make rebuilds from the vocabulary on when one of them changes
CORPUS_FILES=${CORPUS_FILES:-$(ls "${DATA_DIR:?}"/pretrain/wikipedia/AA/wiki_* "$DATA_DIR"/pretrain/books/*.txt)}
PRETRAIN_OVERRIDES=${PRETRAIN_OVERRIDES:-}
FINETUNE_OVERRIDES=${FINETUNE_OVERRIDES:-}
BASELINE_OVERRIDES=${BASELINE_OVERRIDES:-}
# `make glue`: bertpipe glue on the pretrained BERT-base, BERT-base from random weights and the BiLSTM baselines,
# with the recipes' settings (BERT's GLUE settings; seeds: 5 for RTE, MRPC, STS-B, CoLA, 3 for SST-2 and WNLI)
GLUE_TASKS=${GLUE_TASKS:-cola,sst2,mrpc,stsb,rte,wnli}
GLUE_SEEDS=${GLUE_SEEDS:-}
GLUE_PRESET=${GLUE_PRESET:-base}
GLUE_OVERRIDES=${GLUE_OVERRIDES:-}
GLUE_BASELINE_OVERRIDES=${GLUE_BASELINE_OVERRIDES:-}
