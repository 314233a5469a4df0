"""Checkpoints between bertpipe and HF transformers, both ways, with outputs compared in fp32 on padded batches."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from conftest import ROOT
from test_model import full_labels, make_batch, perturb, transformers_model

from pipeline.config import load_config
from pipeline.errors import BertpipeError
from pipeline.hf_interop import export_hf, load_hf, load_weights, read_config, read_state_dict, save_model
from pipeline.model import BertForPreTraining, from_preset
from pipeline.vocab import VocabConfig, build_vocab

ATOL = 1e-5


@pytest.fixture(scope="module")
def vocab_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("vocab") / "demo"
    return build_vocab(load_config(VocabConfig, ROOT / "recipes/vocab/demo.yaml", [f"output_dir={out}"]))


@pytest.fixture
def model(vocab_dir) -> BertForPreTraining:
    """A randomly initialized tiny model over the demo vocabulary, every tensor moved off its init."""
    vocab_size = len((vocab_dir / "vocab.txt").read_text(encoding="utf-8").splitlines())
    return perturb(BertForPreTraining(from_preset("tiny", vocab_size))).eval()


def hf_outputs(hf_model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' MLM logits gathered at the masked positions, and its NSP logits."""
    with torch.no_grad():
        out = hf_model(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"],
                       attention_mask=batch["attention_mask"])
    positions = batch["mlm_positions"][:, :, None].expand(-1, -1, out.prediction_logits.size(-1))
    return torch.gather(out.prediction_logits, 1, positions), out.seq_relationship_logits


def test_export_loads_in_transformers_with_equal_outputs(model, vocab_dir, tmp_path):
    out = export_hf(model, tmp_path / "hf", vocab_dir)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["config.json", "model.safetensors", "vocab.txt", "tokenizer.json", "tokenizer_config.json",
         "special_tokens_map.json", "bertpipe.json"])  # the marker that lets bertpipe replace its own export
    assert json.loads((out / "config.json").read_text())["architectures"] == ["BertForPreTraining"]

    hf, info = transformers.BertForPreTraining.from_pretrained(out, output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    hf.eval()
    batch = make_batch(model.config.vocab_size, batch=5, seq=40)
    with torch.no_grad():
        ours = model(**batch)
        theirs_loss = hf(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"],
                         attention_mask=batch["attention_mask"], labels=full_labels(batch, 40),
                         next_sentence_label=batch["next_sentence_label"]).loss
    mlm, nsp = hf_outputs(hf, batch)
    torch.testing.assert_close(ours.mlm_logits, mlm, rtol=0, atol=ATOL)
    torch.testing.assert_close(ours.nsp_logits, nsp, rtol=0, atol=ATOL)
    torch.testing.assert_close(ours.loss, theirs_loss, rtol=0, atol=ATOL)

    tokenizer = transformers.BertTokenizerFast.from_pretrained(out)
    assert len(tokenizer) == model.config.vocab_size
    assert tokenizer.convert_tokens_to_ids(["[PAD]", "[CLS]", "[SEP]", "[MASK]"]) == [0, 2, 3, 4]


def test_transformers_checkpoint_loads_into_bertpipe_with_equal_outputs(tmp_path):
    config = from_preset("tiny", vocab_size=1000)
    hf = perturb(transformers_model(config), seed=1).eval()
    hf.save_pretrained(tmp_path / "hf")

    ours, report = load_hf(tmp_path / "hf")
    assert report.missing == [] and report.unexpected == []
    assert ours.config == config
    ours.eval()
    batch = make_batch(config.vocab_size, batch=5, seq=40, seed=3)
    with torch.no_grad():
        out = ours(**batch)
    mlm, nsp = hf_outputs(hf, batch)
    torch.testing.assert_close(out.mlm_logits, mlm, rtol=0, atol=ATOL)
    torch.testing.assert_close(out.nsp_logits, nsp, rtol=0, atol=ATOL)


def test_bert_model_directory_loads_the_encoder_and_initializes_the_heads(tmp_path):
    config = from_preset("tiny", vocab_size=1000)
    hf = perturb(transformers_model(config, transformers.BertModel), seed=2).eval()
    hf.save_pretrained(tmp_path / "encoder")  # keys without the "bert." prefix

    ours, report = load_hf(tmp_path / "encoder")
    assert report.initialized == ["cls.predictions", "cls.predictions.transform.dense",
                                  "cls.predictions.transform.LayerNorm", "cls.seq_relationship"]
    assert "cls.seq_relationship" in str(report)
    batch = make_batch(config.vocab_size)
    inputs = {k: batch[k] for k in ("input_ids", "token_type_ids", "attention_mask")}
    with torch.no_grad():
        mine, theirs = ours.eval().bert(**inputs), hf(**inputs)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(mine.last_hidden_state[real], theirs.last_hidden_state[real], rtol=0, atol=ATOL)
    torch.testing.assert_close(mine.pooler_output, theirs.pooler_output, rtol=0, atol=ATOL)


def test_masked_lm_directory_loads_and_reports_pooler_and_nsp_head_initialized(tmp_path, cli):
    config = from_preset("tiny", vocab_size=1000)
    hf = perturb(transformers_model(config, transformers.BertForMaskedLM), seed=3).eval()
    hf.save_pretrained(tmp_path / "mlm")

    ours, report = load_hf(tmp_path / "mlm")
    assert report.initialized == ["bert.pooler.dense", "cls.seq_relationship"]
    batch = make_batch(config.vocab_size)
    with torch.no_grad():
        out = ours.eval()(**batch)
        logits = hf(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"],
                    attention_mask=batch["attention_mask"]).logits
    expected = torch.gather(logits, 1, batch["mlm_positions"][:, :, None].expand(-1, -1, config.vocab_size))
    torch.testing.assert_close(out.mlm_logits, expected, rtol=0, atol=ATOL)

    code, text, _ = cli("model-info", "--checkpoint", tmp_path / "mlm")
    assert code == 0 and "initialized (not in the checkpoint): bert.pooler.dense, cls.seq_relationship" in text
    assert f"{ours.num_parameters():,}" in text


def test_old_pickled_checkpoint_with_gamma_beta_names_loads(tmp_path):
    """A pytorch_model.bin as the original BERT conversions wrote it: tied copies, LayerNorm gamma/beta, buffers."""
    config = from_preset("tiny", vocab_size=1000)
    hf = perturb(transformers_model(config), seed=4).eval()
    state = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
             for k, v in hf.state_dict().items()}
    state["bert.embeddings.position_ids"] = torch.arange(512)[None]
    (tmp_path / "old").mkdir()
    torch.save(state, tmp_path / "old" / "pytorch_model.bin")

    ours = BertForPreTraining(config)
    report = load_weights(ours, tmp_path / "old")
    assert report.missing == [] and report.unexpected == []
    batch = make_batch(config.vocab_size)
    with torch.no_grad():
        out = ours.eval()(**batch)
    mlm, nsp = hf_outputs(hf, batch)
    torch.testing.assert_close(out.mlm_logits, mlm, rtol=0, atol=ATOL)
    torch.testing.assert_close(out.nsp_logits, nsp, rtol=0, atol=ATOL)


class _RunsCodeWhenUnpickled:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickles_with_arbitrary_objects_are_refused_unopened(tmp_path):
    marker = tmp_path / "code-ran"
    torch.save({"bert.embeddings.word_embeddings.weight": torch.zeros(2), "x": _RunsCodeWhenUnpickled(marker)},
               tmp_path / "pytorch_model.bin")
    with pytest.raises(BertpipeError, match="not a loadable weights file"):
        read_state_dict(tmp_path / "pytorch_model.bin")
    assert not marker.exists()


def test_shape_mismatch_names_the_key_and_both_shapes(model, tmp_path):
    save_model(model, tmp_path / "ckpt")
    vocab_size = model.config.vocab_size
    other_vocab = BertForPreTraining(from_preset("tiny", vocab_size + 100))
    with pytest.raises(BertpipeError) as err:
        load_weights(other_vocab, tmp_path / "ckpt")
    assert (f"bert.embeddings.word_embeddings.weight: checkpoint has ({vocab_size}, 128), "
            f"config expects ({vocab_size + 100}, 128)") in str(err.value)

    other_hidden = BertForPreTraining(from_preset("tiny", vocab_size, hidden_size=256, intermediate_size=1024))
    with pytest.raises(BertpipeError) as err:
        load_weights(other_hidden, tmp_path / "ckpt")
    assert f"checkpoint has ({vocab_size}, 128), config expects ({vocab_size}, 256)" in str(err.value)


def test_a_checkpoint_of_another_model_is_not_loaded_as_heads_only(tmp_path):
    from safetensors.torch import save_file

    save_file({"encoder.weight": torch.zeros(3)}, tmp_path / "model.safetensors")
    with pytest.raises(BertpipeError, match="not a BERT checkpoint"):
        load_weights(BertForPreTraining(from_preset("tiny", 1000)), tmp_path / "model.safetensors")


def test_bertpipe_checkpoint_round_trips_as_a_directory_and_a_lone_file(model, tmp_path):
    """(Pretraining run directories, read from their DeepSpeed checkpoints, are tested on real runs in
    test_run_export.py.)"""
    save_model(model, tmp_path / "ckpt")
    assert read_config(tmp_path / "ckpt") == model.config
    lone = tmp_path / "elsewhere" / "weights.safetensors"
    lone.parent.mkdir()
    shutil.copy(tmp_path / "ckpt" / "model.safetensors", lone)  # the config travels in the metadata

    batch = make_batch(model.config.vocab_size)
    with torch.no_grad():
        expected = model(**batch).loss
    for source in (tmp_path / "ckpt", lone):
        loaded, report = load_hf(source)
        assert report.missing == [] and loaded.config == model.config
        with torch.no_grad():
            assert torch.equal(loaded.eval()(**batch).loss, expected), source


def test_weights_saved_from_a_compiled_model_load_without_the_compile_prefix(model, tmp_path):
    from safetensors.torch import save_file

    compiled = torch.compile(model)  # the wrapper (not compiled until called) names every tensor _orig_mod.*
    state = {k: v.contiguous() for k, v in compiled.state_dict().items() if "decoder" not in k}
    assert all(k.startswith("_orig_mod.") for k in state)
    save_file(state, tmp_path / "model.safetensors")
    save_model(model, tmp_path / "config-only")
    shutil.copy(tmp_path / "config-only" / "model_config.json", tmp_path / "model_config.json")
    loaded, report = load_hf(tmp_path)
    assert report.missing == [] and report.unexpected == []
    batch = make_batch(model.config.vocab_size)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(**batch).loss, model(**batch).loss)


def test_export_command(model, vocab_dir, tmp_path, cli):
    save_model(model, tmp_path / "ckpt")
    code, out, err = cli("export", tmp_path / "ckpt", tmp_path / "hf", "--vocab", vocab_dir, "--quiet")
    assert code == 0, err
    assert out.strip() == str(tmp_path / "hf")
    assert (tmp_path / "hf" / "model.safetensors").is_file() and (tmp_path / "hf" / "tokenizer.json").is_file()
    assert not (tmp_path / "hf.incomplete").exists()
    reloaded, report = load_hf(tmp_path / "hf")  # an exported dir imports back
    assert report.missing == [] and reloaded.config == model.config

    small = BertForPreTraining(from_preset("tiny", 1000))
    save_model(small, tmp_path / "small")
    code, _, err = cli("export", tmp_path / "small", tmp_path / "hf2", "--vocab", vocab_dir, "--quiet")
    assert code == 1 and "the model's vocabulary 1000" in err and err.count("\n") == 1
    assert not (tmp_path / "hf2").exists() and not (tmp_path / "hf2.incomplete").exists()

    code, _, err = cli("export", tmp_path / "missing", tmp_path / "hf3")
    assert code == 1 and "checkpoint not found" in err


def test_model_info_takes_the_vocabulary_size_from_a_vocab_directory(vocab_dir, cli):
    code, out, _ = cli("model-info", "--preset", "tiny", "--vocab", vocab_dir, "--compare-hf")
    assert code == 0 and "vocabulary: 4,000 entries" in out and " yes" in out
    code, _, err = cli("model-info", "--vocab", vocab_dir.parent / "nowhere")
    assert code == 1 and "vocab directory not found" in err
