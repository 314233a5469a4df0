"""Bad input and faults on real data (the Wikipedia sample; broken files made here): each stops with one line on
stderr and a non-zero exit, never a traceback, and changes nothing outside the output's own temporary name
(the directory tree is hashed before and after). A stage replaces only what it wrote; a checkpoint's code never
runs; a resumed pretraining run refuses a config change that breaks exact resume and applies the others."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import test_pretrain
import torch
from conftest import ROOT
from tree import changes, snapshot

from pipeline.errors import BertpipeError
from pipeline.tracking import read_metrics

ENV = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}


def one_line(err: str) -> str:
    """The single line a refused command printed on stderr."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and len(lines) == 1, err[-3000:]
    return lines[0]


def refused(result: tuple[int, str, str], code: int = 1) -> str:
    got, _, err = result
    assert got == code, err[-3000:]
    return one_line(err)


def inputs(*files) -> str:
    return "corpus.inputs=[" + ",".join(f"{{path: '{f}'}}" for f in files) + "]"


def foreign_dir(path: Path) -> Path:
    """A user's directory, not bertpipe's."""
    path.mkdir(parents=True)
    (path / "notes.txt").write_text("a user's own file\n")
    (path / "manifest.json").write_text('{"mine": true}\n')
    return path


def copy_vocab(vocab: Path, out: Path) -> Path:
    shutil.copytree(vocab, out)
    return out


# ---- never replace what bertpipe did not write -------------------------------------------------------------


def test_vocab_refuses_a_foreign_directory_a_file_and_a_path_under_a_file(wiki_files, tmp_path, cli):
    foreign = foreign_dir(tmp_path / "mine")
    (tmp_path / "file").write_text("a user's file\n")
    before = snapshot(tmp_path)
    for out, expected in ((foreign, "was not written by bertpipe"), (tmp_path / "file", "is a file"),
                          (tmp_path / "file" / "vocab", "file is a file, not a directory")):
        for force in ([], ["--force"]):  # --force replaces only bertpipe's own outputs
            line = refused(cli("vocab", inputs(wiki_files[0]), f"output_dir={out}", "vocab_size=3000", "--quiet",
                               *force))
            assert expected in line and str(out) in line, line
    assert changes(before, snapshot(tmp_path)) == []


def test_shard_refuses_a_foreign_directory_a_file_and_another_stages_output(wiki_files, wiki_vocab, tmp_path, cli):
    foreign = foreign_dir(tmp_path / "mine")
    (tmp_path / "file").write_text("a user's file\n")
    before, vocab_before = snapshot(tmp_path), snapshot(wiki_vocab)
    for out, expected in ((foreign, "was not written by bertpipe"), (tmp_path / "file", "is a file"),
                          (wiki_vocab, "holds bertpipe's vocab output, not a shard output")):
        line = refused(cli("shard", inputs(wiki_files[0]), f"vocab_dir={wiki_vocab}", f"output_dir={out}",
                           "workers=1", "--quiet", "--force"))
        assert expected in line, line
    assert changes(before, snapshot(tmp_path)) == [] and changes(vocab_before, snapshot(wiki_vocab)) == []


def test_export_replaces_its_own_export_only(wiki_vocab, tmp_path, cli):
    from pipeline.hf_interop import save_model
    from pipeline.model import BertForPreTraining, from_preset

    torch.manual_seed(0)
    checkpoint = save_model(BertForPreTraining(from_preset("tiny", 30_000)), tmp_path / "ckpt")
    out = tmp_path / "hf"
    for _ in range(2):  # a second export replaces the first: it is bertpipe's
        code, _, err = cli("export", checkpoint, out, "--vocab", wiki_vocab, "--quiet")
        assert code == 0, err
    assert json.loads((out / "bertpipe.json").read_text())["stage"] == "export"
    users = tmp_path / "bert-base-uncased"  # a downloaded model: an HF directory bertpipe did not write
    shutil.copytree(out, users)
    (users / "bertpipe.json").unlink()
    before = snapshot(tmp_path)
    line = refused(cli("export", checkpoint, users, "--vocab", wiki_vocab, "--quiet"))
    assert "was not written by bertpipe" in line and str(users) in line
    assert changes(before, snapshot(tmp_path)) == []


def test_finetune_refuses_a_foreign_run_directory(wiki_vocab, data, tmp_path, cli):
    foreign = foreign_dir(tmp_path / "mine")
    before = snapshot(tmp_path)
    line = refused(cli("finetune", "--config", ROOT / "recipes/baselines/sst2-pooled.yaml", f"run_dir={foreign}",
                       f"model.vocab_dir={wiki_vocab}", "--quiet", "--force"))
    assert "was not written by bertpipe" in line
    assert changes(before, snapshot(tmp_path)) == []


def test_glue_refuses_a_foreign_directory_a_file_and_another_stages_output(wiki_vocab, tmp_path, cli):
    foreign = foreign_dir(tmp_path / "mine")
    (foreign / "glue.md").write_text("my notes on GLUE\n")  # a name the table would take
    (tmp_path / "file").write_text("a user's file\n")
    before, vocab_before = snapshot(tmp_path), snapshot(wiki_vocab)
    for out, expected in ((foreign, "was not written by bertpipe"), (tmp_path / "file", "is a file"),
                          (wiki_vocab, "holds bertpipe's vocab output, not a glue output")):
        line = refused(cli("glue", "--recipes", ROOT / "recipes/baselines/glue-{task}-bilstm.yaml", "--vocab",
                           wiki_vocab, "--tasks", "rte", "--seeds", "1", "--out", out, "--quiet", "--force"))
        assert expected in line and str(out) in line, line
    assert changes(before, snapshot(tmp_path)) == [] and changes(vocab_before, snapshot(wiki_vocab)) == []


def test_glue_array_tasks_starting_together_all_claim_one_out(tmp_path):
    """The tasks of a SLURM array share --out: each finds it absent, empty or GLUE's, never half made."""
    import multiprocessing

    from recipes.glue import claim_out

    outs = [tmp_path / "glue"] * 12 + [tmp_path / "empty"] * 12
    (tmp_path / "empty").mkdir()
    with multiprocessing.get_context("fork").Pool(12) as pool:
        pool.map(claim_out, outs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "glue"]  # no staged directory left behind
    for out in ("glue", "empty"):
        assert [p.name for p in (tmp_path / out).iterdir()] == ["bertpipe.json"]
        assert json.loads((tmp_path / out / "bertpipe.json").read_text())["stage"] == "glue"
    before = tmp_path / "before-markers"  # a table written before markers existed is GLUE's
    before.mkdir()
    (before / "results.json").write_text('{"kind": "glue"}\n')
    claim_out(before)
    assert json.loads((before / "bertpipe.json").read_text())["stage"] == "glue"


# ---- read-only file system, full disk ----------------------------------------------------------------------


@pytest.fixture
def mount(tmp_path):
    """mount("tmpfs", size) or mount("ro"): a real small or read-only file system under tmp_path (root only)."""
    points: list[Path] = []

    def make(kind: str, size: str = "64k") -> Path:
        point = tmp_path / f"{kind}-{len(points)}"
        point.mkdir()
        if kind == "tmpfs":
            commands = [["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)]]
        else:
            source = tmp_path / f"source-{len(points)}"
            source.mkdir()
            commands = [["mount", "--bind", str(source), str(point)], ["mount", "-o", "remount,bind,ro", str(point)]]
        for command in commands:
            proc = subprocess.run(command, capture_output=True, text=True) if os.geteuid() == 0 else None
            if proc is None or proc.returncode:
                reason = "mounting needs root" if proc is None else proc.stderr.strip()
                if command is not commands[0]:
                    subprocess.run(["umount", str(point)])
                if os.environ.get("CI"):
                    pytest.fail(f"file system tests must run in CI: {reason}")
                pytest.skip(f"cannot mount a test file system: {reason}")
        points.append(point)
        return point

    yield make
    for point in reversed(points):
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def test_vocab_on_a_read_only_file_system_and_a_full_disk(wiki_files, tmp_path, cli, mount):
    read_only = mount("ro")
    line = refused(cli("vocab", inputs(wiki_files[0]), f"output_dir={read_only / 'vocab'}", "vocab_size=3000",
                       "--quiet"))
    assert "Read-only file system" in line and "vocab.incomplete" in line, line
    full = mount("tmpfs", "64k")  # room for the marker, not for a 3,000-entry vocabulary
    line = refused(cli("vocab", inputs(wiki_files[0]), f"output_dir={full / 'vocab'}", "vocab_size=3000", "--quiet"))
    assert "No space left on device" in line and str(full / "vocab") in line, line
    assert list(full.iterdir()) == [] and list(read_only.iterdir()) == []  # nothing half-written


def test_shard_on_a_full_disk_leaves_no_tmp_file_and_the_rerun_finishes(wiki_files, wiki_vocab, tmp_path, cli,
                                                                       mount):
    files, settings = wiki_files[40:42], ["chunk_chars=300000", "rows_per_shard=2000", "workers=1", "--quiet"]
    reference = tmp_path / "reference"
    code, _, err = cli("shard", inputs(*files), f"vocab_dir={wiki_vocab}", f"output_dir={reference}", *settings)
    assert code == 0, err
    full = mount("tmpfs", "600k")  # a few parts fit, the shards do not
    out = full / "shards"
    line = refused(cli("shard", inputs(*files), f"vocab_dir={wiki_vocab}", f"output_dir={out}", *settings))
    assert "No space left on device" in line and "shards.incomplete" in line, line
    leftovers = [p for p in full.rglob("*") if p.is_file()]
    assert not [p for p in leftovers if p.name.endswith(".tmp")] and not out.exists()
    parts = [p for p in leftovers if p.name.startswith("part.") and p.suffix == ".parquet"]
    assert parts  # finished parts stay, for the rerun to reuse
    subprocess.run(["mount", "-o", "remount,size=20m", str(full)], check=True)
    code, _, err = cli("shard", inputs(*files), f"vocab_dir={wiki_vocab}", f"output_dir={out}", *settings)
    assert code == 0, err
    assert {p.name: p.read_bytes() for p in out.glob("shard.*")} == \
        {p.name: p.read_bytes() for p in reference.glob("shard.*")}


# ---- shard: the vocabulary and the parts are checked -------------------------------------------------------


def test_shard_refuses_a_truncated_or_missing_tokenizer_and_a_truncated_vocab(wiki_files, wiki_vocab, tmp_path, cli):
    broken = {"tokenizer.json truncated": ("tokenizer.json", 5000), "tokenizer.json missing": ("tokenizer.json", None),
              "vocab.txt truncated": ("vocab.txt", 20_000)}
    for i, (name, keep) in enumerate(broken.values()):
        vocab = copy_vocab(wiki_vocab, tmp_path / f"vocab{i}")
        if keep is None:
            (vocab / name).unlink()
        else:
            (vocab / name).write_bytes((vocab / name).read_bytes()[:keep])
        before = snapshot(tmp_path)
        line = refused(cli("shard", inputs(wiki_files[0]), f"vocab_dir={vocab}", f"output_dir={tmp_path / 'out'}",
                           "workers=1", "--quiet"))
        assert str(vocab / name) in line, line
        assert changes(before, snapshot(tmp_path)) == []


def test_a_corpus_error_before_any_part_leaves_no_work_directory(wiki_files, wiki_vocab, tmp_path, cli):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\u00e9 au lait\n".encode("latin-1"))
    out = tmp_path / "shards"
    line = refused(cli("shard", inputs(bad, wiki_files[0]), f"vocab_dir={wiki_vocab}", f"output_dir={out}",
                       "workers=1", "--quiet"))
    assert f"{bad}: invalid UTF-8 at byte offset 3" in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latin1.txt"]  # no <out>.incomplete with a key.json


def test_a_truncated_vocab_is_refused_by_export_and_finetune(wiki_vocab, data, tmp_path, cli):
    from pipeline.hf_interop import save_model
    from pipeline.model import BertForPreTraining, from_preset

    vocab = copy_vocab(wiki_vocab, tmp_path / "vocab")
    (vocab / "vocab.txt").write_bytes((vocab / "vocab.txt").read_bytes()[:100_000])
    checkpoint = save_model(BertForPreTraining(from_preset("tiny", 30_000)), tmp_path / "ckpt")
    before = snapshot(tmp_path)
    line = refused(cli("export", checkpoint, tmp_path / "hf", "--vocab", vocab, "--quiet"))
    assert f"{vocab / 'vocab.txt'} does not match the sha256 in its manifest" in line, line
    line = refused(cli("finetune", "--config", ROOT / "recipes/baselines/sst2-pooled.yaml",
                       f"run_dir={tmp_path / 'run'}", f"model.vocab_dir={vocab}", "task.max_train=100", "--quiet"))
    assert f"{vocab / 'vocab.txt'} does not match the sha256 in its manifest" in line, line
    assert changes(before, snapshot(tmp_path)) == []


def test_a_damaged_part_is_found_by_its_checksum_and_built_again(wiki_files, wiki_vocab, tmp_path, cli):
    files, settings = wiki_files[42:44], ["chunk_chars=300000", "rows_per_shard=2000", "workers=1", "--quiet"]
    reference = tmp_path / "reference"
    assert cli("shard", inputs(*files), f"vocab_dir={wiki_vocab}", f"output_dir={reference}", *settings)[0] == 0
    out = tmp_path / "shards"
    code, _, err = cli("shard", inputs(*files), f"vocab_dir={wiki_vocab}", f"output_dir={out}", "--no-merge",
                       *settings)  # every part written, not merged yet: as if stopped before the merge
    assert code == 0, err
    part = tmp_path / "shards.incomplete" / "_parts" / "part.000001.parquet"
    part.write_bytes(part.read_bytes()[:1000])
    code, _, err = cli("shard", inputs(*files), f"vocab_dir={wiki_vocab}", f"output_dir={out}", "--merge",
                       "--workers", "1", "chunk_chars=300000", "rows_per_shard=2000")
    assert code == 0, err
    assert "part.000001.parquet" in err and "damaged" in err
    assert {p.name: p.read_bytes() for p in out.glob("shard.*")} == \
        {p.name: p.read_bytes() for p in reference.glob("shard.*")}


def test_shard_settings_name_the_key_and_its_range(wiki_files, wiki_vocab, tmp_path, cli):
    base = [inputs(wiki_files[0]), f"vocab_dir={wiki_vocab}", f"output_dir={tmp_path / 'out'}", "--quiet"]
    for override, expected in (("compression_level=99", "compression_level must be within 1..22"),
                               ("dupe_factor=0", "dupe_factor must be at least 1"),
                               ("workers=-1", "workers must be at least 0")):
        line = refused(cli("shard", *base, override), code=2)
        assert expected in line, line
    assert not (tmp_path / "out").exists()


def test_an_override_that_is_not_yaml_gets_a_hint_to_quote(wiki_vocab, tmp_path, cli):
    line = refused(cli("shard", "corpus.inputs=[{path: /data/wiki_0[0-9]}]", f"vocab_dir={wiki_vocab}",
                       f"output_dir={tmp_path / 'out'}"), code=2)
    assert "corpus.inputs=[{path: /data/wiki_0[0-9]}]" in line and "quote" in line, line
    assert list(tmp_path.iterdir()) == []


def test_a_paragraph_without_breaks_and_a_low_instance_yield_are_warned(wiki_files, wiki_vocab, tmp_path, cli):
    # real articles with their line breaks and sentence ends lost: one 1.7 MB line, a single "sentence"
    text = " ".join(w.strip(".,;:!?()\"'") for f in wiki_files[44:46] for w in f.read_text().split()
                    if not w.startswith(("<", "url=", "id=", "title=")))
    junk = tmp_path / "no-breaks.txt"
    junk.write_text(text)
    paragraphs = [line for line in wiki_files[46].read_text().splitlines() if line and not line.startswith("<")]
    real = tmp_path / "articles.txt"  # plain text: a document per paragraph
    real.write_text("\n\n".join(paragraphs)[:200_000])
    code, _, err = cli("vocab", inputs(real, junk), f"output_dir={tmp_path / 'vocab'}", "vocab_size=3000", "--quiet")
    assert code == 0, err
    assert f"{junk}: document {junk.name}:0 holds a paragraph of {len(text.strip()):,} characters" in err, err
    code, _, err = cli("shard", inputs(real, junk), f"vocab_dir={wiki_vocab}", f"output_dir={tmp_path / 's'}",
                       "workers=1", "--quiet")
    assert code == 0, err
    assert "of what real sentences yield" in err, err


# ---- pretrain: bad input stops before step 1, with one line from rank 0 ------------------------------------


def pretrain_cmd(shards: Path, vocab: Path, run_dir: Path, *overrides: str, ranks: int = 1) -> list[str]:
    return test_pretrain.command(shards, vocab, run_dir, "data.global_batch=16", "track.wandb=disabled", "--quiet",
                                 *overrides, ranks=ranks)


def run_all(commands: list[list[str]], timeout: int = 600) -> list[subprocess.CompletedProcess]:
    """Launch the commands together (each waits mostly on imports), then wait for all."""
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV) for c in commands]
    done = []
    for command, proc in zip(commands, procs, strict=True):
        out, err = proc.communicate(timeout=timeout)
        done.append(subprocess.CompletedProcess(command, proc.returncode, out, err))
    return done


def copy_shards(shards: Path, out: Path) -> Path:
    shutil.copytree(shards, out)
    return out


@pytest.mark.slow
def test_pretrain_bad_inputs_stop_before_step_1(wiki_shards, wiki_vocab, tmp_path):
    truncated = copy_shards(wiki_shards, tmp_path / "truncated")
    (truncated / "shard.00002.parquet").write_bytes((truncated / "shard.00002.parquet").read_bytes()[:5000])
    deleted = copy_shards(wiki_shards, tmp_path / "deleted")
    (deleted / "shard.00001.parquet").unlink()
    vocab = copy_vocab(wiki_vocab, tmp_path / "vocab")
    (vocab / "vocab.txt").write_bytes((vocab / "vocab.txt").read_bytes()[:100_000])
    (tmp_path / "a-file").write_text("a user's file\n")
    foreign = foreign_dir(tmp_path / "mine")
    cases = {  # run_dir, shards, vocab -> what the line must say
        "truncated shard": (tmp_path / "r1", truncated, wiki_vocab, "shard.00002.parquet in"),
        "deleted shard": (tmp_path / "r2", deleted, wiki_vocab, "shard shard.00001.parquet in"),
        "truncated vocab": (tmp_path / "r3", wiki_shards, vocab, f"{vocab / 'vocab.txt'} does not match"),
        "run_dir is a file": (tmp_path / "a-file", wiki_shards, wiki_vocab, "a-file is a file"),
        "foreign run_dir": (foreign, wiki_shards, wiki_vocab, "was not written by bertpipe"),
    }
    before = snapshot(tmp_path)
    procs = run_all([pretrain_cmd(s, v, r, "max_steps=2") for r, s, v, _ in cases.values()])
    for (name, (_, _, _, expected)), proc in zip(cases.items(), procs, strict=True):
        assert proc.returncode == 1, (name, proc.stderr[-3000:])
        assert expected in one_line(proc.stderr), (name, proc.stderr)
    assert changes(before, snapshot(tmp_path)) == []  # no run directory, not even a config.yaml


@pytest.mark.slow
def test_under_torchrun_only_rank_0_prints_the_line_and_no_traceback_follows(wiki_shards, wiki_vocab, tmp_path):
    truncated = copy_shards(wiki_shards, tmp_path / "truncated")
    (truncated / "shard.00001.parquet").write_bytes((truncated / "shard.00001.parquet").read_bytes()[:5000])
    before = snapshot(tmp_path)
    (proc,) = run_all([pretrain_cmd(truncated, wiki_vocab, tmp_path / "run", "max_steps=2", "data.global_batch=32",
                                    ranks=2)])
    assert proc.returncode != 0  # torchrun's agent is ended without its ChildFailedError report: exit 137
    line = one_line(proc.stderr)  # once, from rank 0, though rank 1 found the damaged shard
    assert line.startswith("bertpipe pretrain: error: shard shard.00001.parquet") and "truncated" in line
    assert changes(before, snapshot(tmp_path)) == []


# ---- pretrain: resume checks the config, trims the metrics, never unpickles code ---------------------------


def planted(checkpoint: Path, name: str, target: Path, zip_format: bool = True) -> None:
    """Replace `name` in a checkpoint with a pickle whose loading would create `target`, and rewrite meta.json's
    size and sha256 for it: whoever can write a checkpoint can rewrite its hashes too."""

    class Payload:
        def __reduce__(self):
            return pathlib.Path.touch, (target,)

    torch.save({"module": Payload()}, checkpoint / name, _use_new_zipfile_serialization=zip_format)
    meta = json.loads((checkpoint / "meta.json").read_text())
    data = (checkpoint / name).read_bytes()
    meta["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (checkpoint / "meta.json").write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def zero1_run(wiki_shards, wiki_vocab, tmp_path_factory) -> Path:
    """A ZeRO-1 run of 4 steps with checkpoints at steps 2 and 4 (its model and optimizer in separate files)."""
    run_dir = tmp_path_factory.mktemp("pretrain") / "zero1"
    (proc,) = run_all([pretrain_cmd(wiki_shards, wiki_vocab, run_dir, "max_steps=4", "checkpoint_every=2",
                                    "zero_stage=1", "export=false")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def resume_cmd(run_dir: Path, shards: Path, vocab: Path, *overrides: str) -> list[str]:
    return pretrain_cmd(shards, vocab, run_dir, "max_steps=4", "checkpoint_every=2", "zero_stage=1",
                        "export=false", *overrides)


@pytest.mark.slow
def test_a_resume_refuses_changes_that_break_exact_resume_before_writing(zero1_run, wiki_shards, wiki_vocab,
                                                                         tmp_path):
    run_dir = shutil.copytree(zero1_run, tmp_path / "run")
    before = snapshot(tmp_path)
    (proc,) = run_all([resume_cmd(run_dir, wiki_shards, wiki_vocab, "max_steps=6", "data.micro_batch=8",
                                  "data.loader_workers=2", "seed=7")])
    assert proc.returncode == 1, proc.stderr[-3000:]
    line = one_line(proc.stderr)
    for key in ("data.micro_batch (16 -> 8)", "data.loader_workers (1 -> 2)", "seed (1234 -> 7)"):
        assert key in line, line
    assert "max_steps" not in line  # a change a resume applies
    assert changes(before, snapshot(tmp_path)) == []  # config.yaml included


@pytest.mark.slow
def test_a_resume_applies_a_new_lr_records_it_and_trims_the_metrics(zero1_run, wiki_shards, wiki_vocab, tmp_path):
    from pipeline.config import load_config
    from pipeline.pretrain import PretrainConfig, lr_factor

    run_dir = shutil.copytree(zero1_run, tmp_path / "run")
    # as if killed after logging step 4 but before its checkpoint: the latest checkpoint is step 2
    shutil.rmtree(run_dir / "checkpoints" / "step-00000004")
    (run_dir / "checkpoints" / "latest").write_text("step-00000002\n")
    with open(run_dir / "metrics.jsonl", "a") as fh:
        fh.write('{"event": "train", "step": 5, "lo')  # and cut off in the middle of a line
    (proc,) = run_all([resume_cmd(run_dir, wiki_shards, wiki_vocab, "max_steps=6", "optim.lr=3e-3")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    train = [r for r in read_metrics(run_dir) if r["event"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 7))  # steps 3 and 4 once, not twice
    new = load_config(PretrainConfig, ROOT / "recipes/pretrain/tiny-cpu.yaml", ["max_steps=6", "optim.lr=3e-3"])
    old = load_config(PretrainConfig, ROOT / "recipes/pretrain/tiny-cpu.yaml", ["max_steps=4"])
    for r in train:  # the LR each step used: the old schedule up to step 2, the new one after the resume
        cfg = old if r["step"] <= 2 else new
        assert r["lr"] == pytest.approx(cfg.optim.lr * lr_factor(r["step"] - 1, cfg), rel=1e-6), r
    assert train[2]["lr"] > 2 * old.optim.lr * lr_factor(2, old)
    (resume,) = [r for r in read_metrics(run_dir) if r["event"] == "resume"]
    assert resume["step"] == 2 and resume["changes"] == {"max_steps": [4, 6], "optim.lr": [0.001, 0.003]}
    import yaml

    recorded = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert recorded["optim"]["lr"] == 3e-3 and recorded["max_steps"] == 6


@pytest.mark.slow
def test_a_planted_pickle_is_refused_and_never_runs(zero1_run, wiki_shards, wiki_vocab, tmp_path):
    target = tmp_path / "pwned"
    # the test can fail: loaded the way DeepSpeed loads it, the pickle runs
    probe = tmp_path / "probe"
    probe.mkdir()
    planted_probe = shutil.copytree(zero1_run / "checkpoints" / "step-00000004", probe / "ckpt")
    planted(planted_probe, "mp_rank_00_model_states.pt", tmp_path / "ran")
    torch.load(planted_probe / "mp_rank_00_model_states.pt", weights_only=False)
    assert (tmp_path / "ran").exists()

    runs = {}
    for name, file, zip_format in (("model", "mp_rank_00_model_states.pt", True),
                                   ("optimizer", "zero_pp_rank_0_mp_rank_00_optim_states.pt", False)):
        runs[name] = shutil.copytree(zero1_run, tmp_path / name)
        planted(runs[name] / "checkpoints" / "step-00000004", file, target, zip_format)
    before = snapshot(tmp_path)
    procs = run_all([resume_cmd(r, wiki_shards, wiki_vocab, "max_steps=6") for r in runs.values()])
    for name, proc in zip(runs, procs, strict=True):
        assert proc.returncode == 1, (name, proc.stderr[-3000:])
        line = one_line(proc.stderr)
        assert "refusing to load" in line and "not only tensors" in line, line
    assert not target.exists()
    assert changes(before, snapshot(tmp_path)) == []

    # the export's consolidation (zero_to_fp32, which passes weights_only=False) refuses them too
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from pipeline.checkpoint import weights_only
    from pipeline.hf_interop import consolidated_state

    for run_dir in runs.values():
        with pytest.raises(BertpipeError, match="(refusing to load|cannot read DeepSpeed checkpoint) .*step-00000004"):
            consolidated_state(run_dir / "checkpoints", "step-00000004")
    # past the opcode scan: weights-only even where zero_to_fp32 asks for weights_only=False
    with weights_only(), pytest.raises(Exception, match="Weights only load failed"):
        get_fp32_state_dict_from_zero_checkpoint(str(runs["model"] / "checkpoints"), tag="step-00000004")
    assert not target.exists()


@pytest.mark.slow
def test_deepspeed_checkpoints_of_every_zero_stage_load_weights_only(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "deepspeed_safe_load.py"), str(tmp_path)],
                          capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [(r["stage"], r["precision"]) for r in records] == [(s, p) for s in range(4) for p in ("fp32", "bf16")]
    for r in records:
        assert r["step"] == 1 and r["tensors"] == 48, r
        if r["stage"] < 3:
            assert r["restored_equal"] and r["consolidated_close"], r
        assert any(f.endswith("optim_states.pt") for f in r["files"]) == (r["stage"] > 0), r


# ---- predict ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_predict_refuses_a_missing_or_truncated_model(wiki_vocab, data, tmp_path, cli):
    run_dir = tmp_path / "run"
    code, _, err = cli("finetune", "--config", ROOT / "recipes/baselines/sst2-pooled.yaml", f"run_dir={run_dir}",
                       f"model.vocab_dir={wiki_vocab}", "task.max_train=300", "task.max_eval=100",
                       "trainer.max_epochs=1", "task.max_len=64", "trainer.checkpoint=false", "track.wandb=disabled",
                       "--quiet")
    assert code == 0, err
    assert cli("predict", "--run", run_dir, "a fine film")[0] == 0
    weights = run_dir / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4000])
    line = refused(cli("predict", "--run", run_dir, "a fine film"))
    assert str(weights) in line and "truncated" in line, line
    weights.unlink()
    line = refused(cli("predict", "--run", run_dir, "a fine film"))
    assert str(weights) in line and "missing" in line, line
