"""`bertpipe export RUN_DIR` and `model-info --checkpoint RUN_DIR` on real pretraining runs: DeepSpeed on 2 CPU
ranks for every ZeRO stage, fp32 and bf16 (fp16 needs a GPU), and a torch.compile'd model. Each export loads in
transformers.BertForPreTraining with logits equal to bertpipe's, and holds the optimizer's fp32 master weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from conftest import ROOT
from test_model import make_batch
from test_pretrain import BIN, free_port, run, why

from pipeline.config import load_config
from pipeline.hf_interop import DS_MODEL_STATES, load_hf
from pipeline.shard import ShardConfig, build_shards
from pipeline.vocab import VocabConfig, build_vocab


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory) -> tuple[Path, Path]:
    """The demo's 4k vocabulary and seq-128 shards of the embedded corpus (seconds to build)."""
    root = tmp_path_factory.mktemp("demo")
    vocab = build_vocab(load_config(VocabConfig, ROOT / "recipes/vocab/demo.yaml", [f"output_dir={root / 'vocab'}"]))
    shards = build_shards(load_config(ShardConfig, ROOT / "recipes/shard/demo.yaml",
                                      [f"vocab_dir={vocab}", f"output_dir={root / 'shards'}", "workers=1"]))
    return vocab, Path(shards)


def pretrain(demo_data, run_dir: Path, ranks: int, *overrides: str) -> None:
    vocab, shards = demo_data
    launcher = [str(BIN / "torchrun"), "--nproc_per_node", str(ranks), "--master_port", str(free_port())] \
        if ranks > 1 else []
    proc = run([*launcher, str(BIN / "bertpipe"), "pretrain", "--config", "recipes/pretrain/tiny-cpu.yaml",
                f"data.shards={shards}", f"data.vocab_dir={vocab}", f"run_dir={run_dir}", "data.micro_batch=4",
                f"data.global_batch={4 * ranks}", "data.loader_workers=0", "max_steps=2", "eval_every=0",
                "checkpoint_every=0", "track.wandb=disabled", "optim.warmup_steps=1", *overrides], timeout=900)
    assert proc.returncode == 0, why(proc)


def check_export(run_dir: Path, tmp_path: Path, cli) -> dict[str, torch.Tensor]:
    """Export the run directory, load it in transformers, compare logits with bertpipe's load of the run."""
    code, out, err = cli("export", run_dir, tmp_path / "hf", "--vocab", run_dir / "export", "--quiet")
    assert code == 0, err
    assert out.strip() == str(tmp_path / "hf")
    ours, report = load_hf(run_dir)
    assert report.missing == [] and report.unexpected == []
    hf, info = transformers.BertForPreTraining.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    batch = make_batch(ours.config.vocab_size, batch=4, seq=48, seed=7)
    with torch.no_grad():
        mine = ours.eval()(**batch)
        theirs = hf.eval()(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"],
                           attention_mask=batch["attention_mask"])
    expected = torch.gather(theirs.prediction_logits, 1,
                            batch["mlm_positions"][:, :, None].expand(-1, -1, ours.config.vocab_size))
    torch.testing.assert_close(mine.mlm_logits, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(mine.nsp_logits, theirs.seq_relationship_logits, rtol=0, atol=1e-5)
    # the end-of-run export is the same consolidation of the same checkpoint
    at_end = transformers.BertForPreTraining.from_pretrained(run_dir / "export").state_dict()
    assert all(torch.equal(at_end[k], v) for k, v in hf.state_dict().items())
    code, out, _ = cli("model-info", "--checkpoint", run_dir)
    assert code == 0 and f"{ours.num_parameters():,}" in out and out.startswith(f"loaded {run_dir}")
    return hf.state_dict()


@pytest.mark.slow
@pytest.mark.parametrize(("zero", "precision"), [(0, "bf16"), (1, "bf16"), (2, "fp32"), (3, "fp32"), (3, "bf16")])
def test_export_of_a_real_two_rank_run(demo_data, tmp_path, cli, zero, precision):
    run_dir = tmp_path / f"zero{zero}-{precision}"
    pretrain(demo_data, run_dir, 2, f"zero_stage={zero}", f"precision={precision}")
    state = check_export(run_dir, tmp_path, cli)
    weights = state["bert.embeddings.word_embeddings.weight"]
    assert weights.dtype == torch.float32
    if precision == "bf16":  # the optimizer's fp32 master copy, not the bf16 weights the model ran with
        assert not torch.equal(weights, weights.bfloat16().float())
    if zero == 0 and precision == "bf16":
        # on GPUs DeepSpeed's fused optimizer (FusedAdam; fp16 too) keeps one flat fp32 tensor per group instead:
        # the same checkpoint laid out that way gives the same weights
        path = run_dir / "checkpoints" / "step-00000002" / DS_MODEL_STATES[0]
        states = torch.load(path, weights_only=True)
        groups = states["optimizer"].pop("fp32_groups")
        states["optimizer"]["fp32_groups_flat"] = [torch.cat([t.flatten() for t in group]) for group in groups]
        torch.save(states, path)
        flat = load_hf(run_dir)[0].state_dict()
        assert all(torch.equal(flat[k], v) for k, v in state.items())


@pytest.mark.slow
def test_export_of_a_compiled_run_has_no_compile_prefix(demo_data, tmp_path, cli):
    """model.compile=true compiles in place: checkpoints and exports keep HF's names (no `_orig_mod.`)."""
    run_dir = tmp_path / "compiled"
    pretrain(demo_data, run_dir, 1, "model.compile=true", "max_steps=1")
    states = torch.load(run_dir / "checkpoints" / "step-00000001" / DS_MODEL_STATES[0], weights_only=True)
    assert list(states["module"])[0] == "bert.embeddings.word_embeddings.weight"
    assert not any("_orig_mod" in k for k in states["module"])
    check_export(run_dir, tmp_path, cli)
