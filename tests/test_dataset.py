"""The pretraining loader: one global order of samples, split over any ranks, workers and micro-batches, and
resumed exactly from its state on another world size."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.collate import MaskingConfig, MLMCollator
from pipeline.dataset import PretrainingLoader, SampleOrder, ShardSet
from pipeline.errors import BertpipeError
from tokenization import load_tokenizer, special_ids

GLOBAL = 32


def make(shards, collator, rank=0, world_size=1, micro=16, workers=0, global_batch=GLOBAL):
    return PretrainingLoader(shards, collator, micro, rank=rank, world_size=world_size, workers=workers, seed=3,
                             shuffle_buffer=5000, global_batch=global_batch)


def served(loaders, steps):
    """{position: (row, masked ids, masked slots, labels, NSP label)} over every rank, for `steps` steps."""
    out, per_step = {}, []
    for loader in loaders:
        batches = iter(loader)
        for step in range(steps):
            for _ in range(loader.accumulation):
                batch = next(batches)
                first = int(batch["position"])
                for i, row in enumerate(batch["rows"].tolist()):
                    valid = batch["mlm_labels"][i] != -100
                    length = int(batch["attention_mask"][i].sum())
                    out[first + i] = (row, batch["input_ids"][i, :length].tolist(),
                                      batch["mlm_positions"][i][valid].tolist(), batch["mlm_labels"][i][valid].tolist(),
                                      int(batch["next_sentence_label"][i]))
                    per_step.append((step, first + i))
        del batches
    return out, sorted(per_step)


@pytest.fixture(scope="module")
def setup(wiki_shards, wiki_vocab):
    return ShardSet(str(wiki_shards)), MLMCollator(special_ids(load_tokenizer(wiki_vocab)), MaskingConfig())


def test_the_order_visits_every_row_once_an_epoch_shuffled_within_windows(wiki_shards):
    shards = ShardSet(str(wiki_shards))
    order = SampleOrder(shards.offsets, seed=1, window=3000)
    rows = shards.rows
    first, second = order.rows_at(np.arange(rows)), order.rows_at(np.arange(rows, 2 * rows))
    assert sorted(first.tolist()) == list(range(rows)) == sorted(second.tolist())  # every row once per epoch
    assert (first != second).mean() > 0.99  # a new shard order and new permutations each epoch
    assert not (np.diff(first[:3000]) == 1).all()  # shuffled inside a window
    # bounded memory: a window permutes only its own 3,000 consecutive rows of the epoch's shard order
    shard_of = np.searchsorted(shards.offsets, first, side="right") - 1
    assert len(set(shard_of[:3000].tolist())) <= order.shards_per_window()
    assert len(order._windows) <= 4
    assert order.rows_at(np.array([rows + 5, 7]))[1] == first[7]  # positions in any order, any epoch


def test_any_split_over_ranks_workers_and_micro_batches_serves_the_same_masked_samples(setup):
    shards, collator = setup
    reference, steps = served([make(shards, collator)], 4)  # one rank, micro-batch 16, accumulation 2
    assert sorted(reference) == list(range(4 * GLOBAL))
    for world, micro, workers in ((2, 8, 2), (4, 8, 0), (2, 16, 1)):
        got, got_steps = served([make(shards, collator, r, world, micro, workers) for r in range(world)], 4)
        assert got == reference, (world, micro, workers)  # same rows, same masking, position by position
        assert got_steps == steps  # and each step covers the same positions


def test_a_resumed_loader_continues_the_order_on_another_world_size(setup):
    shards, collator = setup
    reference, _ = served([make(shards, collator)], 6)
    two = [make(shards, collator, r, 2, 16) for r in range(2)]
    head, _ = served(two, 3)
    states = [loader.state_dict() for loader in two]
    assert states[0] == states[1] and states[0]["position"] == 3 * GLOBAL  # one position, the same on every rank
    for world, micro, workers in ((1, 16, 0), (4, 8, 2)):
        loaders = [make(shards, collator, r, world, micro, workers) for r in range(world)]
        for loader in loaders:
            loader.load_state_dict(states[0])
        tail, _ = served(loaders, 3)
        assert not set(head) & set(tail)  # no sample twice ...
        assert {**head, **tail} == reference  # ... none skipped, each masked as in the uninterrupted order


def test_resume_refuses_another_order_or_an_older_state(setup):
    shards, collator = setup
    loader = make(shards, collator)
    state = loader.state_dict()
    for changed, message in ((dict(seed=4), "seed was 3, is now 4"), (dict(shuffle_buffer=10), "shuffle_buffer was"),
                             (dict(global_batch=64), "global_batch was 32, is now 64")):
        other = PretrainingLoader(shards, collator, 16, **{"seed": 3, "shuffle_buffer": 5000, "global_batch": 32,
                                                           **changed})
        with pytest.raises(BertpipeError, match=message):
            other.load_state_dict(state)
    with pytest.raises(BertpipeError, match="per rank"):
        loader.load_state_dict({"version": 1, "served": {"0": 3}})
    with pytest.raises(BertpipeError, match="does not split into micro-batches of 16 on 3 rank"):
        make(shards, collator, 0, 3)


def test_masking_keyed_per_sample_keeps_berts_rates(setup):
    shards, collator = setup
    batch = make(shards, collator, micro=256, global_batch=256).micro_batch(0)
    sp = collator.special
    chosen = batch["mlm_labels"] != -100
    original = ShardSet(str(shards.store.url)).fetch(batch["rows"].tolist())[0]
    candidates = sum(int(sp.regular[row].sum()) for row in original)
    picked = batch["input_ids"].gather(1, batch["mlm_positions"])[chosen]
    assert abs(int(chosen.sum()) / candidates - 0.15) < 0.01
    assert abs(float((picked == sp.mask).float().mean()) - 0.8) < 0.03
    kept = picked == batch["mlm_labels"][chosen]
    assert abs(float(kept.float().mean()) - 0.1) < 0.03  # 10% unchanged (plus the rare random hit of itself)
