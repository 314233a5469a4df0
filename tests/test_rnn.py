"""The RNN building blocks of recipes/rnn.py: the explicit Elman cell against nn.RNN (outputs and gradients),
exploding gradients and clipping, what a bidirectional RNN sees, packing, truncated BPTT."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from recipes.base import RnnConfig
from recipes.rnn import ElmanRNN, LabelLM, Recurrent


def _pair(layers: int = 2, bidirectional: bool = True, seed: int = 0) -> tuple[ElmanRNN, nn.RNN]:
    torch.manual_seed(seed)
    fused = nn.RNN(5, 7, layers, batch_first=True, bidirectional=bidirectional).double()
    explicit = ElmanRNN(5, 7, layers, bidirectional).double()
    explicit.load_state_dict(fused.state_dict())  # the same parameter names: a key copy
    return explicit, fused


@pytest.mark.parametrize(("layers", "bidirectional"), [(1, False), (2, True), (3, False)])
def test_explicit_cell_matches_nn_rnn_outputs_and_gradients(layers, bidirectional):
    explicit, fused = _pair(layers, bidirectional)
    x = torch.randn(3, 11, 5, dtype=torch.float64)
    h0 = torch.randn(layers * (2 if bidirectional else 1), 3, 7, dtype=torch.float64)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    out1, h1 = explicit(x1, h0=h0)
    out2, h2 = fused(x2, h0)
    torch.testing.assert_close(out1, out2)
    torch.testing.assert_close(h1, h2)
    weight = torch.randn_like(out1)
    ((out1 * weight).sum() + h1.pow(2).sum()).backward()
    ((out2 * weight).sum() + h2.pow(2).sum()).backward()
    torch.testing.assert_close(x1.grad, x2.grad)
    grads = dict(fused.named_parameters())
    for name, p in explicit.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, msg=name)


def _grad_norm(rnn: ElmanRNN, steps: int) -> float:
    """The gradient norm of the last output with respect to the weights, for a tiny input."""
    rnn.zero_grad()
    x = torch.full((1, steps, 4), 1e-4, dtype=torch.float64)
    out, _ = rnn(x)
    out[:, -1].sum().backward()
    return float(torch.nn.utils.clip_grad_norm_(rnn.parameters(), float("inf")))


def test_exploding_gradients_grow_without_clipping_and_stay_bounded_with_it():
    torch.manual_seed(0)
    rnn = ElmanRNN(4, 16).double()
    with torch.no_grad():  # a large recurrent matrix: all singular values 1.5, so W_hh^T multiplies norms by 1.5
        rnn.weight_hh_l0.copy_(1.5 * torch.linalg.qr(torch.randn(16, 16, dtype=torch.float64))[0])
        rnn.bias_ih_l0.zero_()
        rnn.bias_hh_l0.zero_()
    norms = [_grad_norm(rnn, steps) for steps in (5, 10, 20)]
    assert norms[1] > 5 * norms[0] and norms[2] > 50 * norms[1]  # geometric growth with the sequence length
    _grad_norm(rnn, 20)
    total = torch.nn.utils.clip_grad_norm_(rnn.parameters(), 1.0)  # what trainer.grad_clip does
    assert total > 1000
    clipped = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in rnn.parameters()]))
    assert clipped <= 1.0 + 1e-6


@pytest.mark.parametrize("explicit", [True, False])
def test_a_bidirectional_output_depends_on_the_future_a_unidirectional_one_does_not(explicit):
    for bidirectional in (True, False):
        torch.manual_seed(0)
        rnn = Recurrent(RnnConfig(cell="rnn", explicit=explicit, hidden=6, bidirectional=bidirectional), 4).eval()
        x = torch.randn(1, 8, 4)
        changed = x.clone()
        changed[0, 4] += 1.0  # x_{t+1} for t = 3
        lengths = torch.tensor([8])
        before, after = rnn(x, lengths)[0][0, 3], rnn(changed, lengths)[0][0, 3]
        assert (not torch.allclose(before, after)) == bidirectional
        assert not torch.allclose(rnn(x, lengths)[0][0, 4], rnn(changed, lengths)[0][0, 4])  # x_{t+1} matters


@pytest.mark.parametrize(("cell", "explicit"), [("rnn", True), ("rnn", False), ("lstm", False), ("gru", False)])
def test_padded_batches_give_what_each_sequence_gives_alone(cell, explicit):
    torch.manual_seed(0)
    rnn = Recurrent(RnnConfig(cell=cell, explicit=explicit, hidden=6, layers=2, bidirectional=True), 4).eval()
    lengths = torch.tensor([7, 3, 5])
    x = torch.randn(3, 7, 4)
    out, state = rnn(x, lengths)
    for i, n in enumerate(lengths.tolist()):
        alone, alone_state = rnn(x[i:i + 1, :n], lengths[i:i + 1])
        torch.testing.assert_close(out[i, :n], alone[0], atol=1e-5, rtol=1e-5)
        assert out[i, n:].abs().max() == 0 if n < 7 else True  # padding outputs zeros
        torch.testing.assert_close(rnn.summary(state)[i], rnn.summary(alone_state)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("cell", "explicit"), [("rnn", True), ("lstm", False)])
def test_truncated_bptt_keeps_the_forward_pass_and_cuts_the_gradient(cell, explicit):
    torch.manual_seed(0)
    full = Recurrent(RnnConfig(cell=cell, explicit=explicit, hidden=6), 4)
    cut = Recurrent(RnnConfig(cell=cell, explicit=explicit, hidden=6, truncate_bptt=4), 4)
    cut.load_state_dict(full.state_dict())
    lengths = torch.tensor([12, 6])
    x = torch.randn(2, 12, 4, requires_grad=True)
    out_full, _ = full(x, lengths)
    out_cut, _ = cut(x, lengths)
    torch.testing.assert_close(out_full, out_cut)  # the same values: only the graph is cut
    out_cut[0, 11].sum().backward()
    assert x.grad[0, :8].abs().max() == 0 and x.grad[0, 8:].abs().max() > 0  # gradients reach back 4 steps


def test_generation_returns_the_asked_length_and_avoids_banned_tokens():
    torch.manual_seed(0)
    lm = LabelLM(50, 0, RnnConfig(cell="gru", hidden=8, embed_dim=8, layers=2), num_labels=2).eval()
    ids = lm.generate(1, 13, start_id=2, num=4, temperature=0.8, top_k=5, banned=[0, 1, 2, 3])
    assert ids.shape == (4, 13)
    assert not torch.isin(ids, torch.tensor([0, 1, 2, 3])).any()
