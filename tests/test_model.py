"""The BERT model: HF's weight names and sizes, the masked-only MLM head, padding, and the training options."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import transformers

from pipeline.hf_interop import hf_config
from pipeline.model import PRESETS, BertConfig, BertForPreTraining, autocast, count_parameters, from_preset

MASK, CLS, SEP = 4, 2, 3


def make_batch(vocab_size: int, batch: int = 4, seq: int = 32, seed: int = 0) -> dict[str, torch.Tensor]:
    """A collated batch as DESIGN.md defines it: rows of different lengths (padded), ~15% of tokens masked."""
    g = torch.Generator().manual_seed(seed)
    lengths = [seq, seq - 7, seq // 2, seq - 1][:batch] + [seq] * max(0, batch - 4)
    max_pred = round(0.15 * seq)
    out = {k: torch.zeros(batch, n, dtype=torch.long) for k, n in
           [("input_ids", seq), ("token_type_ids", seq), ("attention_mask", seq), ("mlm_positions", max_pred)]}
    out["mlm_labels"] = torch.full((batch, max_pred), -100)
    for row, n in enumerate(lengths):
        ids = torch.randint(5, vocab_size, (n,), generator=g)
        mid = n // 2
        ids[0], ids[mid], ids[n - 1] = CLS, SEP, SEP
        out["input_ids"][row, :n] = ids
        out["token_type_ids"][row, mid + 1:n] = 1
        out["attention_mask"][row, :n] = 1
        candidates = torch.tensor([i for i in range(1, n - 1) if i != mid])
        k = min(max_pred, max(1, round(0.15 * n)))
        positions = candidates[torch.randperm(len(candidates), generator=g)[:k]].sort().values
        out["mlm_positions"][row, :k] = positions
        out["mlm_labels"][row, :k] = ids[positions]
        out["input_ids"][row, positions] = MASK
    out["next_sentence_label"] = torch.randint(0, 2, (batch,), generator=g)
    assert (out["mlm_labels"] == -100).any(), "some rows must have padded prediction slots"
    return out


def transformers_model(config: BertConfig, cls=transformers.BertForPreTraining) -> transformers.PreTrainedModel:
    return cls(transformers.BertConfig(**hf_config(config)))


def perturb(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Move every tensor off its initial value (LayerNorm 1/0, zero biases), so a wrongly mapped one shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def full_labels(batch: dict[str, torch.Tensor], seq: int) -> torch.Tensor:
    """The (B, S) labels a full-vocabulary head takes: the token at each masked position, -100 elsewhere."""
    labels = torch.full((len(batch["input_ids"]), seq), -100)
    real = batch["mlm_labels"] != -100
    rows = torch.arange(len(labels))[:, None].expand_as(real)
    labels[rows[real], batch["mlm_positions"][real]] = batch["mlm_labels"][real]
    return labels


def test_state_dict_names_and_shapes_equal_transformers():
    config = from_preset("tiny", vocab_size=1000)
    ours = BertForPreTraining(config).state_dict()
    theirs = transformers_model(config).state_dict()
    assert list(ours) == list(theirs)
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


def test_decoder_is_tied_and_initialization_is_berts():
    torch.manual_seed(0)
    model = BertForPreTraining(from_preset("mini", vocab_size=5000))
    head = model.cls.predictions
    assert head.decoder.weight is model.bert.embeddings.word_embeddings.weight
    assert head.decoder.bias is head.bias
    for name, p in model.named_parameters():
        if "LayerNorm.weight" in name:
            assert torch.all(p == 1), name
        elif name.endswith("bias") or "LayerNorm" in name:
            assert torch.all(p == 0), name
        else:
            # the sample std of n normal draws is off by about 1/sqrt(2n) of itself: 3% for the 512 token-type
            # weights, so a fixed 5% failed one draw in ten; allow 5 of those standard errors
            assert p.std().item() == pytest.approx(0.02, rel=max(0.02, 5 / math.sqrt(2 * p.numel()))), name
    assert torch.all(model.bert.embeddings.word_embeddings.weight[0] == 0)  # [PAD]


@pytest.mark.parametrize("vocab_size", [30522, 30000])
@pytest.mark.parametrize("preset", list(PRESETS))
def test_parameter_count_equals_transformers(preset, vocab_size):
    config = from_preset(preset, vocab_size)
    with torch.device("meta"):
        theirs = transformers_model(config).num_parameters()
    assert count_parameters(config) == theirs


def test_base_and_large_have_the_papers_sizes():
    assert count_parameters(from_preset("base")) == 110_106_428  # "110M"
    assert count_parameters(from_preset("large")) == 336_226_108  # "340M"


def test_masked_only_head_gives_the_loss_and_gradients_of_a_full_vocabulary_head():
    config = from_preset("mini", vocab_size=3000)
    model = perturb(BertForPreTraining(config)).eval()
    batch = make_batch(config.vocab_size, batch=6, seq=48)

    out = model(**batch)
    assert out.mlm_logits.shape == (*batch["mlm_positions"].shape, config.vocab_size)
    out.mlm_loss.backward()
    masked_grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]  # None: NSP only
    model.zero_grad()

    inputs = {k: batch[k] for k in ("input_ids", "token_type_ids", "attention_mask")}
    full = model(**inputs).mlm_logits  # every position onto the vocabulary, as transformers does
    assert full.shape == (6, 48, config.vocab_size)
    full_loss = F.cross_entropy(full.flatten(0, 1), full_labels(batch, 48).flatten(), ignore_index=-100)
    full_loss.backward()

    torch.testing.assert_close(out.mlm_loss, full_loss, rtol=1e-6, atol=1e-6)
    for p, g in zip(model.parameters(), masked_grads, strict=True):
        if g is not None:
            torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)
    assert out.loss == out.mlm_loss + out.nsp_loss


def test_padding_does_not_change_the_real_tokens():
    config = from_preset("tiny", vocab_size=1000)
    model = perturb(BertForPreTraining(config)).eval()
    batch = make_batch(config.vocab_size)
    row = 2  # half padding
    n = int(batch["attention_mask"][row].sum())
    alone = {k: batch[k][row:row + 1, :n] for k in ("input_ids", "token_type_ids", "attention_mask")}
    with torch.no_grad():
        padded = model(**batch)
        single = model(**alone, mlm_positions=batch["mlm_positions"][row:row + 1])
    torch.testing.assert_close(padded.mlm_logits[row], single.mlm_logits[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(padded.nsp_logits[row], single.nsp_logits[0], rtol=1e-5, atol=1e-5)


def test_without_labels_there_is_no_loss_and_the_encoder_runs_alone():
    config = from_preset("tiny", vocab_size=1000)
    model = BertForPreTraining(config).eval()
    batch = make_batch(config.vocab_size)
    out = model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"], batch["mlm_positions"])
    assert out.loss is None and out.mlm_loss is None and out.nsp_loss is None
    assert out.nsp_logits.shape == (4, 2)
    encoded = model.bert(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
    assert encoded.last_hidden_state.shape == (4, 32, 128) and encoded.pooler_output.shape == (4, 128)


def test_gradient_checkpointing_gives_the_same_gradients():
    def grads(checkpointing: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        config = from_preset("tiny", vocab_size=1000, gradient_checkpointing=checkpointing,
                             hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        model = BertForPreTraining(config).train()
        model(**make_batch(config.vocab_size)).loss.backward()
        return [p.grad for p in model.parameters()]

    for a, b in zip(grads(False), grads(True), strict=True):
        torch.testing.assert_close(a, b)


def test_bf16_autocast_stays_close_to_fp32():
    config = from_preset("tiny", vocab_size=1000)
    model = BertForPreTraining(config).eval()
    batch = make_batch(config.vocab_size)
    with torch.no_grad():
        fp32 = model(**batch)
        with autocast("cpu", "bf16"):
            bf16 = model(**batch)
    assert bf16.mlm_logits.dtype == torch.bfloat16 and bf16.loss.dtype == torch.float32
    assert bf16.loss.item() == pytest.approx(fp32.loss.item(), rel=0.02)
    with pytest.raises(ValueError, match="unknown precision"):
        autocast("cpu", "fp8")


@pytest.mark.slow
def test_compiled_model_matches_eager():
    config = from_preset("tiny", vocab_size=1000)
    model = BertForPreTraining(config).eval()
    batch = make_batch(config.vocab_size)
    with torch.no_grad():
        eager = model(**batch)
        compiled = torch.compile(model)(**batch)
    torch.testing.assert_close(compiled.mlm_logits, eager.mlm_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(compiled.loss, eager.loss, rtol=1e-5, atol=1e-5)


def test_param_groups_exempt_biases_and_layernorm_from_weight_decay():
    model = BertForPreTraining(from_preset("tiny", vocab_size=1000))
    decay, no_decay = model.param_groups(weight_decay=0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(n.endswith("bias") or "LayerNorm" in n for n in map(names.get, map(id, no_decay["params"])))
    assert not any(n.endswith("bias") or "LayerNorm" in n for n in map(names.get, map(id, decay["params"])))
    assert sum(p.numel() for p in decay["params"] + no_decay["params"]) == model.num_parameters()
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.01, 0.0)
    assert isinstance(model.configure_optimizer(lr=1e-4), torch.optim.AdamW)


def test_flops_per_token_follows_the_stated_convention():
    with torch.device("meta"):
        model = BertForPreTraining(from_preset("large"))
    L, d, V, s = 24, 1024, 30522, 128
    encoder = L * (12 * d * d + 13 * d)  # q, k, v, out, two feed-forward matrices, their biases, two LayerNorms
    assert model.num_parameters(only_encoder=True) == encoder
    expected = 6 * encoder + 12 * L * d * s + 6 * (d * d + d * V) * 0.15
    assert model.flops_per_token(s) == pytest.approx(expected)
    assert model.flops_per_token(s) == pytest.approx(1.88e9, rel=0.01)


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="unknown preset"):
        from_preset("huge")
    with pytest.raises(ValueError, match="not a multiple"):
        BertConfig(hidden_size=100, num_attention_heads=12)


def test_model_info_prints_the_parameter_count(cli):
    code, out, _ = cli("model-info", "--preset", "base")
    assert code == 0 and "110,106,428" in out
    code, out, _ = cli("model-info", "--vocab-size", "30000", "--compare-hf")
    assert code == 0 and out.count(" yes") == len(PRESETS)
    assert "335,691,058" in out and "109,705,010" in out


@pytest.mark.parametrize("command", ["model-info", "export"])
def test_subcommands_have_help(cli, capsys, command):
    with pytest.raises(SystemExit) as exit_info:
        cli(command, "--help")
    assert exit_info.value.code == 0
    assert f"usage: bertpipe {command}" in capsys.readouterr().out
