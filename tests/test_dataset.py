"""The pretraining loader: split over ranks and workers, shuffled, and resumed exactly from its state."""

from __future__ import annotations

import pytest
import torch

from pipeline.collate import MaskingConfig, MLMCollator
from pipeline.dataset import PretrainingLoader, ShardSet, stream_indices
from pipeline.errors import BertpipeError
from tokenization import load_tokenizer, special_ids


def take(loader, n):
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            break
    return out


def make(shards, collator, rank, **kw):
    return PretrainingLoader(shards, collator, 16, rank=rank, world_size=2, workers=2, seed=3,
                             shuffle_buffer=500, **kw)


@pytest.fixture(scope="module")
def setup(wiki_shards, wiki_vocab):
    shards = ShardSet(str(wiki_shards))
    return shards, MLMCollator(special_ids(load_tokenizer(wiki_vocab)), MaskingConfig())


def test_streams_partition_each_epoch(wiki_shards):
    shards = ShardSet(str(wiki_shards))
    offsets = shards.offsets.tolist()
    seen = [list(stream_indices(offsets, s, 4, seed=1, buffer=100, epochs=1)) for s in range(4)]
    flat = [r for s in seen for r in s]
    assert sorted(flat) == list(range(shards.rows))  # every row once, over all streams
    assert seen[0][:50] != sorted(seen[0][:50])  # shuffled


def test_resume_over_two_ranks_and_two_workers_continues_exactly(setup):
    shards, collator = setup
    uninterrupted = [take(make(shards, collator, r), 11) for r in range(2)]
    first = [make(shards, collator, r) for r in range(2)]
    head = [take(loader, 5) for loader in first]
    states = [loader.state_dict() for loader in first]
    resumed = []
    for r in range(2):
        loader = make(shards, collator, r)
        loader.load_state_dict(states[r])
        resumed.append(take(loader, 6))
    for r in range(2):
        for a, b in zip(uninterrupted[r], head[r] + resumed[r], strict=True):
            assert all(torch.equal(a[k], b[k]) for k in a)  # same rows, same masking
    rows = [set(torch.cat([b["rows"] for b in uninterrupted[r]]).tolist()) for r in range(2)]
    assert not rows[0] & rows[1]  # ranks read different rows


def test_resume_refuses_a_different_layout(setup):
    shards, collator = setup
    loader = make(shards, collator, 0)
    take(loader, 2)
    other = PretrainingLoader(shards, collator, 16, rank=0, world_size=4, workers=2, seed=3, shuffle_buffer=500)
    with pytest.raises(BertpipeError, match="world_size was 2, is now 4"):
        other.load_state_dict(loader.state_dict())
