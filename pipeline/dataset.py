"""Reading shards for training: a verified shard set, and a resumable loader whose order of samples is global.

The order is defined once for the run, whatever the number of ranks, loader workers or the micro-batch: epoch
e visits the shards in a fresh random order, its rows are cut into windows of `shuffle_buffer` consecutive
rows and each window is permuted, so only one window of indices is ever held. The p-th sample of the run is
position p of that order. Step s takes positions [s*G, (s+1)*G) (G = the global batch); micro-batch k of the
step holds the B positions from s*G + k*B and goes to rank k % M as its accumulation step k // M. Each row is
masked by draws keyed by (seed, position) and each micro-batch's dropout seed comes from its first position,
so a sample is masked alike however the batch is split. A loader's state is the position it reached, the same
on every rank: a run resumes exactly on any number of ranks, workers and micro-batch size.
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections import OrderedDict
from collections.abc import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import IterableDataset, get_worker_info

from pipeline.collate import MLMCollator
from pipeline.errors import BertpipeError
from pipeline.store import Store
from pipeline.vocab import vocab_hash
from pipeline.workers import SignalSafeLoader

log = logging.getLogger(__name__)
LOADER_STATE_VERSION = 2  # 1: per-rank streams (cannot continue in the global order)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
MASKING, DROPOUT = 1, 2  # what a key is drawn for


class ShardSet:
    """The shards of a shard directory (or a subset of them), checked against the manifest, read lazily.

    `split="eval"` reads the held-out split instead (the shard stage's `eval_documents`).
    """

    def __init__(self, url: str, shards: list[int] | None = None, verify: bool = True, cache: int = 4,
                 split: str = "train"):
        self.store = Store(url)
        manifest = self.store.read_json("manifest.json")
        if manifest is None or manifest.get("stage") != "shard":
            raise BertpipeError(f"no shard manifest in {url} (run `bertpipe shard` first)")
        self.manifest = manifest
        if split == "eval" and "eval" not in manifest:
            raise BertpipeError(f"shards in {url} have no held-out split: rebuild them with eval_documents set "
                                "(`bertpipe shard ... eval_documents=0.01`)")
        listed = manifest["shards"] if split == "train" else manifest["eval"]["shards"]
        picked = range(len(listed)) if shards is None else shards
        self.shards = [listed[i] for i in picked]
        self.offsets = np.cumsum([0] + [s["rows"] for s in self.shards])
        self.rows = int(self.offsets[-1])
        self.verify = verify
        self._cache: OrderedDict[int, tuple[np.ndarray, ...]] = OrderedDict()
        self._cache_size = cache

    @property
    def max_seq_len(self) -> int:
        return int(self.manifest["settings"]["max_seq_len"])

    def check_vocab(self, vocab_dir: str) -> None:
        """Fail unless the shards were tokenized with the vocabulary in `vocab_dir`."""
        have = vocab_hash(vocab_dir)
        if have != self.manifest["vocab_sha256"]:
            raise BertpipeError(
                f"shards in {self.store.url} were built with another vocabulary "
                f"(vocab.txt sha256 {self.manifest['vocab_sha256'][:12]}, {vocab_dir} has {have[:12]})"
            )

    def check_files(self, picked: Iterable[int]) -> None:
        """Check shards (indices into this set) against the manifest, size first, then sha256: a missing,
        truncated or damaged shard stops the run naming it before training reads a row of it."""
        for i in picked:
            info = self.shards[i]
            name, path = info["name"], self.store.path(info["name"])
            try:
                size = self.store.fs.size(path)
                if size != info["bytes"]:
                    raise BertpipeError(f"shard {name} in {self.store.url} is truncated or overwritten: {size:,} "
                                        f"bytes, the manifest says {info['bytes']:,}; rebuild the shards "
                                        "(bertpipe shard --force)")
                digest = hashlib.sha256()
                with self.store.fs.open(path, "rb") as fh:
                    while block := fh.read(1 << 22):
                        digest.update(block)
            except FileNotFoundError:
                raise BertpipeError(f"shard {name} in {self.store.url} is missing (the manifest lists it); "
                                    "rebuild the shards (bertpipe shard --force)") from None
            except OSError as err:
                raise BertpipeError(f"cannot read shard {name} in {self.store.url}: {err}") from None
            if digest.hexdigest() != info["sha256"]:
                raise BertpipeError(f"shard {name} in {self.store.url} is corrupt (its sha256 differs from the "
                                    "manifest's); rebuild the shards (bertpipe shard --force)")

    def locate(self, row: int) -> tuple[str, int]:
        """(shard name, row within it) of a global row index: where a bad batch came from."""
        i = int(np.searchsorted(self.offsets, row, side="right") - 1)
        return self.shards[i]["name"], int(row - self.offsets[i])

    def _load(self, i: int) -> tuple[np.ndarray, ...]:
        if i in self._cache:
            self._cache.move_to_end(i)
            return self._cache[i]
        info = self.shards[i]
        try:
            data = self.store.read_bytes(info["name"])
        except OSError as err:
            raise BertpipeError(f"cannot read shard {info['name']} in {self.store.url}: {err}") from None
        if self.verify and hashlib.sha256(data).hexdigest() != info["sha256"]:
            raise BertpipeError(f"shard {info['name']} in {self.store.url} is corrupt "
                                "(its sha256 differs from the manifest's)")
        try:
            table = pq.read_table(io.BytesIO(data), columns=["input_ids", "token_type_ids", "next_sentence_label"])
        except (pa.ArrowException, OSError) as err:
            raise BertpipeError(f"shard {info['name']} in {self.store.url} is not readable Parquet: {err}") from None
        ids = table.column("input_ids").combine_chunks()
        types = table.column("token_type_ids").combine_chunks()
        loaded = (ids.offsets.to_numpy(), ids.values.to_numpy(), types.values.to_numpy(),
                  table.column("next_sentence_label").to_numpy())
        self._cache[i] = loaded
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return loaded

    def fetch(self, rows: list[int]) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
        """input_ids, token_type_ids (one array per row) and NSP labels of global rows."""
        shard_of = np.searchsorted(self.offsets, rows, side="right") - 1
        ids, types, labels = [], [], np.empty(len(rows), dtype=np.int64)
        for k, (row, i) in enumerate(zip(rows, shard_of, strict=True)):
            offsets, values, type_values, nsp = self._load(int(i))
            local = row - int(self.offsets[i])
            lo, hi = offsets[local], offsets[local + 1]
            ids.append(values[lo:hi])
            types.append(type_values[lo:hi])
            labels[k] = nsp[local]
        return ids, types, labels


def _mix(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer, a bijective scramble of uint64s (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def sample_keys(seed: int, positions: np.ndarray, purpose: int) -> np.ndarray:
    """One uint64 key per global position: what the masking or dropout of that sample derives from."""
    with np.errstate(over="ignore"):
        base = _mix(np.uint64(seed % 2**64) * _GOLDEN + np.uint64(purpose))
        return _mix(base ^ (np.asarray(positions, dtype=np.uint64) * _GOLDEN))


class RowRandom:
    """The draws of numpy's Generator that MLMCollator uses (`random`, `integers`), but counter-based per row:
    value [i, j] of the n-th call depends only on keys[i], n and j (SplitMix64 on key + counter), so a row is
    masked alike whatever batch it shares and however wide that batch is padded. A numpy generator per row
    would cost about 60 us a row, ten times the whole collator."""

    def __init__(self, keys: np.ndarray):
        self.keys = np.asarray(keys, dtype=np.uint64)
        self.calls = 0

    def _bits(self, size: int | tuple[int, ...]) -> np.ndarray:
        shape = (size,) if isinstance(size, int) else tuple(size)
        if shape[0] != len(self.keys):
            raise ValueError(f"RowRandom draws per row: the first dimension must be {len(self.keys)}, not {shape[0]}")
        columns = int(np.prod(shape[1:], dtype=np.int64))
        self.calls += 1
        counter = (np.uint64(self.calls) << np.uint64(32)) + np.arange(columns, dtype=np.uint64)
        with np.errstate(over="ignore"):
            return _mix(self.keys[:, None] + counter[None, :] * _GOLDEN).reshape(shape)

    def random(self, size: int | tuple[int, ...]) -> np.ndarray:
        return (self._bits(size) >> np.uint64(11)).astype(np.float64) * (1.0 / 2**53)

    def integers(self, low: int, high: int, size: int | tuple[int, ...]) -> np.ndarray:
        return low + (self.random(size) * (high - low)).astype(np.int64)


class SampleOrder:
    """Which row is the p-th sample of the run, in bounded memory.

    Epoch e = p // rows visits the shards in an order drawn from (seed, e); its rows, concatenated in that
    order, are cut into windows of `window` rows and window w is permuted by a generator seeded by
    (seed, e, w). Only the current epoch's shard order and the last few windows' permutations are kept.
    """

    def __init__(self, offsets: list[int] | np.ndarray, seed: int, window: int):
        offsets = np.asarray(offsets, dtype=np.int64)
        self.first, self.sizes = offsets[:-1], np.diff(offsets)
        self.rows = int(offsets[-1])
        if self.rows == 0:
            raise BertpipeError("the shard set has no rows to train on")
        self.seed, self.window = seed, max(1, min(int(window), self.rows))
        self._epoch: tuple[int, np.ndarray, np.ndarray] | None = None
        self._windows: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()

    def _shards(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(start of each shard within the epoch's concatenation, its first global row), in visiting order."""
        if self._epoch is None or self._epoch[0] != epoch:
            order = np.random.default_rng([self.seed, 0, epoch]).permutation(len(self.sizes))
            starts = np.concatenate([[0], np.cumsum(self.sizes[order])[:-1]])
            self._epoch = (epoch, starts, self.first[order])
        return self._epoch[1], self._epoch[2]

    def _permutation(self, epoch: int, window: int) -> np.ndarray:
        key = (epoch, window)
        if key not in self._windows:
            length = min(self.window, self.rows - window * self.window)
            self._windows[key] = np.random.default_rng([self.seed, 1, epoch, window]).permutation(length)
            if len(self._windows) > 4:
                self._windows.popitem(last=False)
        return self._windows[key]

    def rows_at(self, positions: np.ndarray) -> np.ndarray:
        """Global row indices of global positions (any order, any epochs)."""
        positions = np.asarray(positions, dtype=np.int64)
        out = np.empty(len(positions), dtype=np.int64)
        epoch, within = np.divmod(positions, self.rows)
        window, offset = np.divmod(within, self.window)
        for e, w in sorted(set(zip(epoch.tolist(), window.tolist(), strict=True))):
            pick = (epoch == e) & (window == w)
            concatenated = w * self.window + self._permutation(e, w)[offset[pick]]
            starts, first = self._shards(e)
            shard = np.searchsorted(starts, concatenated, side="right") - 1
            out[pick] = first[shard] + concatenated - starts[shard]
        return out

    def shards_per_window(self) -> int:
        """The most shards one window can touch: the smallest shards that fit in it, plus one at each end."""
        fits = int(np.searchsorted(np.cumsum(np.sort(self.sizes)), self.window, side="right"))
        return min(len(self.sizes), fits + 2)


class PretrainingStream(IterableDataset):
    """One rank's micro-batches from number `start` on; DataLoader worker w of W serves start + w, + W, ..."""

    def __init__(self, loader: PretrainingLoader, start: int):
        super().__init__()
        self.loader, self.start = loader, start

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        index = self.start + worker
        while (batch := self.loader.micro_batch(index)) is not None:
            yield batch
            index += workers


class PretrainingLoader:
    """This rank's share of the global order, as masked micro-batches; state_dict() is the position reached.

    Rank r of M with micro-batch B and global batch G serves, for step s and accumulation step a
    (A = G / (M x B) of them), the B positions from s*G + (a*M + r)*B. `epochs` ends the order after that
    many passes (its last incomplete global batch is dropped, so every rank serves as many batches).
    """

    def __init__(self, shards: ShardSet, collator: MLMCollator, batch_size: int, *, rank: int = 0,
                 world_size: int = 1, workers: int = 0, seed: int = 0, shuffle_buffer: int = 10_000,
                 epochs: int | None = None, prefetch: int = 2, global_batch: int | None = None):
        self.shards, self.collator, self.batch_size = shards, collator, batch_size
        self.rank, self.world_size, self.workers = rank, world_size, workers
        self.seed, self.shuffle_buffer, self.epochs, self.prefetch = seed, shuffle_buffer, epochs, prefetch
        self.global_batch = global_batch or batch_size * world_size
        if self.global_batch % (batch_size * world_size):
            raise BertpipeError(f"a global batch of {self.global_batch} does not split into micro-batches of "
                                f"{batch_size} on {world_size} rank(s)")
        self.accumulation = self.global_batch // (batch_size * world_size)
        self.order = SampleOrder(shards.offsets, seed, shuffle_buffer)
        shards._cache_size = max(shards._cache_size, self.order.shards_per_window() + 1)
        self.origin = 0  # the global position this loader started from (a resumed run's)
        self.consumed = 0  # micro-batches this rank has served since then
        self.end = None if epochs is None else (epochs * shards.rows) // self.global_batch * self.global_batch

    def first_position(self, index: int) -> int:
        """The global position of this rank's micro-batch `index` (counted from the loader's origin)."""
        step, micro = divmod(index, self.accumulation)
        return self.origin + step * self.global_batch + (micro * self.world_size + self.rank) * self.batch_size

    def micro_batch(self, index: int) -> dict | None:
        """This rank's micro-batch `index`: masked, with its global rows, first position and dropout seed."""
        first = self.first_position(index)
        if self.end is not None and first + self.batch_size > self.end:
            return None
        positions = np.arange(first, first + self.batch_size, dtype=np.int64)
        rows = self.order.rows_at(positions)
        ids, types, labels = self.shards.fetch(rows.tolist())
        batch = self.collator(ids, types, labels, RowRandom(sample_keys(self.seed, positions, MASKING)))
        batch["rows"] = torch.from_numpy(rows)
        batch["position"] = torch.tensor(first)
        batch["seed"] = torch.tensor(int(sample_keys(self.seed, positions[:1], DROPOUT)[0] >> np.uint64(1)))
        return batch

    def __iter__(self) -> Iterator[dict]:
        stream = PretrainingStream(self, self.consumed)
        # its own generator: a DataLoader otherwise draws its workers' base seed from the global RNG
        loader = SignalSafeLoader(stream, batch_size=None, num_workers=self.workers,
                                  prefetch_factor=self.prefetch if self.workers else None,
                                  persistent_workers=False, multiprocessing_context="fork" if self.workers else None,
                                  pin_memory=torch.cuda.is_available(),  # pinned: copied to the GPU asynchronously
                                  generator=torch.Generator().manual_seed(self.seed))
        for batch in loader:
            self.consumed += 1
            yield batch

    def position(self) -> int:
        """The global position the next step starts at (only defined between steps)."""
        step, micro = divmod(self.consumed, self.accumulation)
        if micro:
            raise ValueError(f"the loader is inside a step ({micro} of {self.accumulation} micro-batches served)")
        return self.origin + step * self.global_batch

    def state_dict(self) -> dict:
        return {"version": LOADER_STATE_VERSION, "position": self.position(), "seed": self.seed,
                "shuffle_buffer": self.shuffle_buffer, "rows": self.shards.rows, "global_batch": self.global_batch,
                "world_size": self.world_size, "micro_batch": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`, on any number of ranks; the settings that shape the order must be the same."""
        if state.get("version") != LOADER_STATE_VERSION:
            raise BertpipeError("cannot resume the data loader: its saved state is per rank (an older bertpipe), "
                                "not a position in the global order; start a new run with model.init_from")
        for key, now in (("seed", self.seed), ("shuffle_buffer", self.shuffle_buffer), ("rows", self.shards.rows),
                         ("global_batch", self.global_batch)):
            if state[key] != now:
                raise BertpipeError(f"cannot resume the data loader: {key} was {state[key]}, is now {now}")
        self.origin, self.consumed = int(state["position"]), 0
