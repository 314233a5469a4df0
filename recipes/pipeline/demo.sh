# The demo pipeline: what `make demo` and `slurm/submit_pipeline.sh recipes/pipeline/demo.sh` run, on the CPU.
# Python's own documentation (embedded, no download) -> a 4k vocabulary -> seq-128 shards -> a tiny BERT
# (L2/H128, 300 steps) -> fine-tuned on sentiment beside the same BERT from random initialization and LSTM,
# BiLSTM and GRU baselines -> the leaderboard.
# Sourced by bash with DATA_DIR set; every variable may be preset in the environment.
VOCAB_CONFIG=${VOCAB_CONFIG:-recipes/vocab/demo.yaml}
SHARD_CONFIG=${SHARD_CONFIG:-recipes/shard/demo.yaml}
SHARD_TASKS=${SHARD_TASKS:-1}
PRETRAIN_CONFIG=${PRETRAIN_CONFIG:-recipes/pretrain/tiny-cpu.yaml}
FINETUNE_CONFIGS=${FINETUNE_CONFIGS:-recipes/finetune/sst2.yaml}
BASELINE_CONFIGS=${BASELINE_CONFIGS:-recipes/baselines/sst2-bert-scratch.yaml recipes/baselines/sst2-lstm.yaml \
recipes/baselines/sst2-bilstm.yaml recipes/baselines/sst2-gru.yaml}
CORPUS_FILES=${CORPUS_FILES:-}  # the vocab and shard configs read the embedded corpus: no file to watch
PRETRAIN_OVERRIDES=${PRETRAIN_OVERRIDES:-track.wandb=offline}
# SST-2 when the data directory has it; else the word-order task built offline from the embedded corpus
# (real sentence vs. its words shuffled: labels no bag-of-words model can guess).
if [ -f "${DATA_DIR:-}/finetune/sst2/train.tsv" ]; then
  TASK_OVERRIDES=${TASK_OVERRIDES:-task.max_train=8000 task.max_len=64 trainer.max_epochs=2}
else
  TASK_OVERRIDES=${TASK_OVERRIDES:-task.name=word_order task.train=pydoc task.dev=null task.holdout=0.1 \
task.max_len=64 trainer.max_epochs=10}  # 1,585 training sentences: more epochs
fi
FINETUNE_OVERRIDES=${FINETUNE_OVERRIDES:-$TASK_OVERRIDES trainer.lr=2.0e-4 \
trainer.val_check_interval=1.0 trainer.accelerator=cpu track.wandb=offline}
BASELINE_OVERRIDES=${BASELINE_OVERRIDES:-$TASK_OVERRIDES trainer.accelerator=cpu track.wandb=offline}
# `make glue PROFILE=recipes/pipeline/demo.sh` (needs DATA_DIR's GLUE files): bertpipe glue on the demo's tiny BERT,
# the same preset from random weights and the BiLSTM pair baselines, CPU-sized: 2,000 training examples per task
# (all of WNLI's 635), 3 epochs, batch 16, three seeds for every task, a quarter of dev between epochs (the final
# score sees all of it); the tiny BERTs at lr 2e-4, the BiLSTMs at hidden 128, embeddings 64.
GLUE_TASKS=${GLUE_TASKS:-cola,sst2,mrpc,stsb,rte,wnli}
GLUE_SEEDS=${GLUE_SEEDS:-3}
GLUE_PRESET=${GLUE_PRESET:-tiny}
GLUE_CPU="task.max_train=2000 trainer.max_epochs=3 trainer.batch_size=16 trainer.limit_val_batches=0.25 \
trainer.checkpoint=false trainer.accelerator=cpu track.wandb=disabled"
GLUE_OVERRIDES=${GLUE_OVERRIDES:-$GLUE_CPU trainer.lr=2.0e-4}
GLUE_BASELINE_OVERRIDES=${GLUE_BASELINE_OVERRIDES:-$GLUE_CPU model.rnn.hidden=128 model.rnn.embed_dim=64}
