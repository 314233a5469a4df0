"""Reading shards for training: a verified shard set, a resumable shuffled stream of batches, and its loader.

Each rank's DataLoader workers serve separate streams (stream = rank * workers + worker): every stream takes
every S-th row of the epoch's row order (S = world size x workers), shuffles row indices through a buffer and
cuts them into batches, masked by a generator seeded by (seed, stream, batch). Since everything a stream does
follows from how many batches it has served, a loader's state is just those counts: a resumed loader replays
the index shuffle (cheap integer work, no data read) and continues exactly where it stopped.
"""

from __future__ import annotations

import hashlib
import io
import logging
import random
from collections import OrderedDict
from collections.abc import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.collate import MLMCollator
from pipeline.errors import BertpipeError
from pipeline.store import Store
from pipeline.vocab import vocab_hash

log = logging.getLogger(__name__)


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


def stream_indices(offsets: list[int], stream: int, streams: int, seed: int, buffer: int,
                   epochs: int | None = None) -> Iterator[int]:
    """Global row indices for one stream.

    Each epoch visits the shards in a fresh random order (the same for every stream); the stream takes every
    `streams`-th row of the concatenated epochs and shuffles them through a buffer of `buffer` indices.
    """
    rng = random.Random(f"{seed}:stream:{stream}")
    pool: list[int] = []
    position, epoch = 0, 0
    while epochs is None or epoch < epochs:
        order = list(range(len(offsets) - 1))
        random.Random(f"{seed}:epoch:{epoch}").shuffle(order)
        for i in order:
            lo, hi = offsets[i], offsets[i + 1]
            for row in range(lo + (stream - position) % streams, hi, streams):
                if len(pool) < buffer:
                    pool.append(row)
                    continue
                k = rng.randrange(buffer)
                yield pool[k]
                pool[k] = row
            position += hi - lo
        epoch += 1
    rng.shuffle(pool)
    yield from pool


class PretrainingStream(IterableDataset):
    """Masked batches of one rank; each DataLoader worker serves its own stream."""

    def __init__(self, shards: ShardSet, collator: MLMCollator, batch_size: int, *, rank: int = 0,
                 world_size: int = 1, workers: int = 0, seed: int = 0, shuffle_buffer: int = 10_000,
                 epochs: int | None = None, served: dict[int, int] | None = None, shift: int = 0):
        super().__init__()
        self.shards, self.collator, self.batch_size = shards, collator, batch_size
        self.rank, self.world_size, self.workers = rank, world_size, max(workers, 1)
        self.seed, self.shuffle_buffer, self.epochs = seed, shuffle_buffer, epochs
        self.served = served or {}
        self.shift = shift
        if shards.rows < world_size * self.workers:
            raise BertpipeError(f"{shards.rows} rows cannot feed {world_size * self.workers} streams "
                                "(ranks x loader workers)")

    def stream_id(self, worker: int) -> int:
        return self.rank * self.workers + (worker + self.shift) % self.workers

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        stream = self.stream_id(info.id if info else 0)
        indices = stream_indices(self.shards.offsets.tolist(), stream, self.world_size * self.workers, self.seed,
                                 self.shuffle_buffer, self.epochs)
        batch_index = self.served.get(stream, 0)
        for _ in range(batch_index * self.batch_size):  # replay: index work only, no data read
            next(indices, None)
        while True:
            rows = [r for _, r in zip(range(self.batch_size), indices, strict=False)]
            if not rows:
                return
            ids, types, labels = self.shards.fetch(rows)
            rng = np.random.default_rng([self.seed, stream, batch_index])
            batch = self.collator(ids, types, labels, rng)
            batch["rows"] = torch.tensor(rows, dtype=torch.int64)
            batch["stream"] = torch.tensor(stream)
            batch["batch_index"] = torch.tensor(batch_index)
            yield batch
            batch_index += 1


class PretrainingLoader:
    """A DataLoader over a PretrainingStream that knows how far each stream got: state_dict() resumes it."""

    def __init__(self, shards: ShardSet, collator: MLMCollator, batch_size: int, *, rank: int = 0,
                 world_size: int = 1, workers: int = 0, seed: int = 0, shuffle_buffer: int = 10_000,
                 epochs: int | None = None, prefetch: int = 2):
        self.shards, self.collator, self.batch_size = shards, collator, batch_size
        self.rank, self.world_size, self.workers = rank, world_size, workers
        self.seed, self.shuffle_buffer, self.epochs, self.prefetch = seed, shuffle_buffer, epochs, prefetch
        self.served: dict[int, int] = {}
        self.consumed = 0

    def __iter__(self) -> Iterator[dict]:
        stream = PretrainingStream(
            self.shards, self.collator, self.batch_size, rank=self.rank, world_size=self.world_size,
            workers=self.workers, seed=self.seed, shuffle_buffer=self.shuffle_buffer, epochs=self.epochs,
            served=dict(self.served), shift=self.consumed % max(self.workers, 1),
        )
        # its own generator: a DataLoader otherwise draws its workers' base seed from the global RNG, which
        # would shift dropout after a resume
        loader = DataLoader(stream, batch_size=None, num_workers=self.workers,
                            prefetch_factor=self.prefetch if self.workers else None,
                            persistent_workers=False, multiprocessing_context="fork" if self.workers else None,
                            pin_memory=torch.cuda.is_available(),  # pinned: copied to the GPU asynchronously
                            generator=torch.Generator().manual_seed(self.seed))
        for batch in loader:
            self.served[int(batch["stream"])] = int(batch["batch_index"]) + 1
            self.consumed += 1
            yield batch

    def state_dict(self) -> dict:
        return {"version": 1, "rank": self.rank, "world_size": self.world_size, "workers": self.workers,
                "seed": self.seed, "batch_size": self.batch_size, "shuffle_buffer": self.shuffle_buffer,
                "rows": self.shards.rows, "served": {str(k): v for k, v in self.served.items()},
                "consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`; the settings that shape the streams must be the ones it was saved with."""
        for key, now in (("world_size", self.world_size), ("workers", self.workers), ("seed", self.seed),
                         ("batch_size", self.batch_size), ("shuffle_buffer", self.shuffle_buffer),
                         ("rows", self.shards.rows)):
            if state[key] != now:
                raise BertpipeError(f"cannot resume the data loader: {key} was {state[key]}, is now {now}")
        self.served = {int(k): v for k, v in state["served"].items()}
        self.consumed = state["consumed"]
