"""The shard stage: documents -> sentences -> token ids -> NSP pairs -> Parquet shards with a manifest.

Work is cut into chunks: runs of consecutive documents of about `chunk_chars` characters (at least two
documents each). A chunk is the unit of parallelism, of resume and of the NotNext pool, and its random
draws come from a generator seeded by (seed, chunk index). So the output depends only on the inputs and the
seed, not on how many workers or array tasks made it. Each chunk becomes a part file; a merge then cuts the
parts, in chunk order, into shards of exactly `rows_per_shard` rows (the last one shorter) and writes the
manifest. Everything is built under `<output_dir>.incomplete/` and renamed into place at the end.

Held-out evaluation documents (`eval_documents`) are drawn, with the seed, from the whole corpus before any
chunk is cut: they form chunks of their own (their own NotNext pool), written as the `eval` split
(`eval.NNNNN.parquet`, the manifest's "eval" entry), so no evaluation document lends a segment to training.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import queue
import random
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from itertools import chain
from multiprocessing import get_context

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.artifacts import claim_output, library_versions, mark, remove_own, sha256_json, swap_into
from pipeline.config import to_dict
from pipeline.corpus import Corpus, CorpusConfig, Document
from pipeline.errors import BertpipeError
from pipeline.instances import IS_NEXT, document_instances, gather, split_sentences
from pipeline.log import progress
from pipeline.store import Store
from pipeline.vocab import load_vocab, vocab_hash
from tokenization import load_tokenizer, special_ids

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
PARTS = "_parts"
# instances x (max_seq_len - 3) / tokens: about 1.2 on real text (short instances push it above 1); a corpus far
# below it is mostly sentences too long to pair (a file without line breaks or punctuation)
LOW_YIELD = 0.25
SCHEMA = pa.schema([
    pa.field("input_ids", pa.list_(pa.int32())),  # [CLS] A [SEP] B [SEP], unmasked, unpadded
    pa.field("token_type_ids", pa.list_(pa.int8())),  # 0 for [CLS] A [SEP], 1 for B [SEP]
    pa.field("next_sentence_label", pa.int8()),  # 0: B follows A (IsNext), 1: B is from another document
    pa.field("doc_a", pa.string()),  # id of A's document
    pa.field("doc_b", pa.string()),  # id of B's document
    pa.field("sent_a", pa.list_(pa.int32(), 2)),  # [first, last] sentence index of A in its document
    pa.field("sent_b", pa.list_(pa.int32(), 2)),  # [first, last] sentence index of B in its document
    pa.field("target_len", pa.int16()),  # the drawn target length (short with probability short_seq_prob)
])


@dataclass
class ShardConfig:
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    vocab_dir: str = "build/vocab"
    output_dir: str = "build/shards"  # any fsspec URL
    max_seq_len: int = 128  # 512 for phase 2
    short_seq_prob: float = 0.1  # share of instances with a random shorter target length
    dupe_factor: int = 1  # pairings per document; 1 suffices since masking happens at load time
    rows_per_shard: int = 8192
    chunk_chars: int = 1_000_000  # characters per chunk: the unit of work and resume, and the NotNext pool
    seed: int = 12345
    workers: int = 0  # processes on this node; 0 = every core this process may use
    compression_level: int = 3  # zstd
    eval_documents: float = 0.0  # held-out documents, drawn with the seed: < 1 a share of the corpus, >= 1 a count

    def __post_init__(self) -> None:
        if not 8 <= self.max_seq_len <= 4096:
            raise ValueError(f"max_seq_len must be within 8..4096, not {self.max_seq_len}")
        if not 0 <= self.short_seq_prob <= 1:
            raise ValueError(f"short_seq_prob must be within 0..1, not {self.short_seq_prob}")
        for key, low in (("dupe_factor", 1), ("rows_per_shard", 1), ("chunk_chars", 1), ("workers", 0)):
            if getattr(self, key) < low:
                raise ValueError(f"{key} must be at least {low}, not {getattr(self, key)}")
        if not 1 <= self.compression_level <= 22:
            raise ValueError(f"compression_level must be within 1..22 (zstd's levels), not {self.compression_level}")
        if self.eval_documents < 0 or (self.eval_documents >= 1 and self.eval_documents != int(self.eval_documents)):
            raise ValueError(f"eval_documents must be a share in [0, 1) or a whole number of documents, not "
                             f"{self.eval_documents:g}")

    def settings(self) -> dict:
        keys = ("max_seq_len", "short_seq_prob", "dupe_factor", "rows_per_shard", "chunk_chars", "seed")
        held = {"eval_documents": self.eval_documents} if self.eval_documents else {}  # keeps older keys valid
        return {k: getattr(self, k) for k in keys} | held | {"encoding_errors": self.corpus.encoding_errors,
                                                             "format_version": FORMAT_VERSION}


class _Chunker:
    """Cuts a stream of documents, pushed one at a time, into chunks (see `chunks`)."""

    def __init__(self, chunk_chars: int):
        self.chunk_chars = chunk_chars
        self.index, self.pending, self.current, self.size = 0, None, [], 0

    def add(self, doc: Document) -> Iterator[tuple[int, list[Document]]]:
        self.current.append(doc)
        self.size += len(doc.text)
        if self.size >= self.chunk_chars and len(self.current) >= 2:
            if self.pending is not None:
                yield self.index, self.pending
                self.index += 1
            self.pending, self.current, self.size = self.current, [], 0

    def finish(self) -> Iterator[tuple[int, list[Document]]]:
        pending, current = self.pending, self.current
        if pending is not None and len(current) == 1:  # a lone last document joins the chunk before it
            pending, current = pending + current, []
        if pending is not None:
            yield self.index, pending
            self.index += 1
        if len(current) == 1:
            raise BertpipeError("the corpus holds a single document: NotNext pairs need at least two")
        if current:
            yield self.index, current
            self.index += 1


def chunks(documents: Iterator[Document], chunk_chars: int) -> Iterator[tuple[int, list[Document]]]:
    """Consecutive documents, about `chunk_chars` characters and at least two documents per chunk."""
    chunker = _Chunker(chunk_chars)
    for doc in documents:
        yield from chunker.add(doc)
    yield from chunker.finish()


def split_chunks(documents: Iterator[Document], chunk_chars: int,
                 held_out: set[int]) -> Iterator[tuple[str, int, list[Document]]]:
    """(split, index, documents): the training documents' chunks and, apart, the held-out documents' (by
    position in the corpus), from one pass over the corpus. Without held-out documents the training chunks
    are exactly `chunks(documents)`."""
    train, held = _Chunker(chunk_chars), _Chunker(chunk_chars)
    for position, doc in enumerate(documents):
        split, chunker = ("eval", held) if position in held_out else ("train", train)
        for index, docs in chunker.add(doc):
            yield split, index, docs
    for index, docs in train.finish():
        yield "train", index, docs
    if held_out:
        for index, docs in held.finish():
            yield "eval", index, docs


def draw_eval_documents(cfg: ShardConfig, corpus: Corpus) -> dict:
    """The held-out documents: their positions in corpus order, their ids, and the corpus's document count.

    A count or a share of the documents, drawn with the seed: the same documents whatever the workers, array
    tasks or `rows_per_shard`. Counting needs one pass over the corpus (reading, no tokenizing).
    """
    if not cfg.eval_documents:
        return {"positions": [], "ids": [], "of": 0}
    ids = [doc.id for doc in corpus.documents()]
    total = len(ids)
    want = int(cfg.eval_documents) if cfg.eval_documents >= 1 else round(cfg.eval_documents * total)
    if want < 2:
        raise BertpipeError(f"eval_documents={cfg.eval_documents:g} holds out {want} of the corpus's {total} "
                            "documents: the held-out split needs at least two (NotNext pairs)")
    if want > total - 2:
        raise BertpipeError(f"eval_documents={cfg.eval_documents:g} holds out {want} of the corpus's {total} "
                            "documents: training needs at least two")
    positions = sorted(random.Random(f"{cfg.seed}:eval-documents").sample(range(total), want))
    return {"positions": positions, "ids": [ids[p] for p in positions], "of": total}


class ChunkBuilder:
    """Turns one chunk of documents into a Parquet part; one per process, holding the tokenizer."""

    def __init__(self, cfg: ShardConfig):
        self.cfg = cfg
        self.tokenizer = load_tokenizer(cfg.vocab_dir)
        self.ids = special_ids(self.tokenizer)

    def build(self, index: int, docs: list[Document], split: str = "train") -> tuple[bytes, dict]:
        cfg = self.cfg
        rng = random.Random(f"{cfg.seed}:{index}" if split == "train" else f"{cfg.seed}:{split}:{index}")
        sentences = [split_sentences(d.text) for d in docs]
        flat_sentences = list(chain.from_iterable(sentences))
        encoded = self.tokenizer.encode_batch_fast(flat_sentences, add_special_tokens=False)
        token_lists = [e.ids for e in encoded]
        lengths = np.fromiter(map(len, token_lists), dtype=np.int64, count=len(token_lists))
        flat = np.fromiter(chain.from_iterable(token_lists), dtype=np.int32, count=int(lengths.sum()))
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        bounds = np.cumsum([0] + [len(s) for s in sentences])
        starts = [offsets[bounds[d]:bounds[d + 1]] for d in range(len(docs))]
        lens = [lengths[bounds[d]:bounds[d + 1]] for d in range(len(docs))]
        usable = [d for d in range(len(docs)) if lens[d].sum() > 0]
        if len(usable) < 2:
            log.warning("chunk %d has fewer than two documents with text; it yields no instances", index)
            usable = []
        starts, lens = [starts[d] for d in usable], [lens[d] for d in usable]
        instances = [inst for _ in range(cfg.dupe_factor) for d in range(len(usable))
                     for inst in document_instances(d, starts, lens, cfg.max_seq_len, cfg.short_seq_prob, rng)]
        rng.shuffle(instances)
        table = self._table(flat, instances, [docs[d].id for d in usable])
        stats = {"documents": len(docs), "sentences": len(flat_sentences), "tokens": int(lengths.sum()),
                 "characters": sum(len(d.text) for d in docs), "instances": len(instances),
                 "is_next": sum(x.label == IS_NEXT for x in instances)}
        buf = io.BytesIO()
        # parts are temporary: light compression, the shards get the configured level
        pq.write_table(table.replace_schema_metadata({"bertpipe.stats": json.dumps(stats)}), buf,
                       compression="zstd", compression_level=1)
        return buf.getvalue(), stats

    def _table(self, flat: np.ndarray, instances: list, doc_ids: list[str]) -> pa.Table:
        offsets, ids, types = gather(flat, instances, self.ids.cls, self.ids.sep)
        offsets32 = pa.array(offsets.astype(np.int32))

        def pairs(key: str) -> pa.Array:
            values = np.array([getattr(x, key) for x in instances], dtype=np.int32).reshape(-1)
            return pa.FixedSizeListArray.from_arrays(pa.array(values, pa.int32()), 2)

        return pa.Table.from_arrays([
            pa.ListArray.from_arrays(offsets32, pa.array(ids, pa.int32())),
            pa.ListArray.from_arrays(offsets32, pa.array(types, pa.int8())),
            pa.array(np.array([x.label for x in instances], dtype=np.int8)),
            pa.array([doc_ids[x.doc_a] for x in instances], pa.string()),
            pa.array([doc_ids[x.doc_b] for x in instances], pa.string()),
            pairs("sents_a"),
            pairs("sents_b"),
            pa.array(np.array([x.target for x in instances], dtype=np.int16)),
        ], schema=SCHEMA)


def _watch_parent() -> None:
    """Exit when the parent dies (kill -9, OOM): a worker must not outlive the run that started it."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


_done_queue = None  # in a worker process: where it reports each finished chunk to the parent's progress bar


def _init_worker(done) -> None:
    global _done_queue
    _done_queue = done
    _watch_parent()


def _part_name(split: str, index: int) -> str:
    return f"{'part' if split == 'train' else split}.{index:06d}.parquet"


def _run_worker(cfg: ShardConfig, work_url: str, lane: int, lanes: int, have: set[str],
                held_out: list[int]) -> dict[str, int]:
    """Build the parts of every chunk `c` (of either split) with `c % lanes == lane` that is not in `have`.

    Every worker reads the whole document stream itself (about 100 MB/s) to find the chunk boundaries and
    tokenizes only its own chunks, so nothing is shipped between processes. Returns the chunks per split.
    """
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker: --workers sets the parallelism
    builder, store, totals = ChunkBuilder(cfg), Store(work_url), {"train": 0, "eval": 0}
    for split, index, docs in split_chunks(Corpus(cfg.corpus).documents(), cfg.chunk_chars, set(held_out)):
        totals[split] = index + 1
        name = _part_name(split, index)
        if index % lanes != lane or name in have:
            continue
        data, _ = builder.build(index, docs, split)
        digest = store.write_bytes(f"{PARTS}/{name}", data)
        store.write_bytes(f"{PARTS}/{name}.sha256", digest.encode())  # written after its part: how resume trusts it
        if _done_queue is not None:
            _done_queue.put(1)
    return totals


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _task_from_env(task_index: int | None, num_tasks: int | None) -> tuple[int, int]:
    """Array-task coordinates from the arguments, else from SLURM's array variables, else (0, 1)."""
    if num_tasks is None and "SLURM_ARRAY_TASK_COUNT" in os.environ:
        num_tasks = int(os.environ["SLURM_ARRAY_TASK_COUNT"])
    if task_index is None and "SLURM_ARRAY_TASK_ID" in os.environ:
        task_index = int(os.environ["SLURM_ARRAY_TASK_ID"]) - int(os.environ.get("SLURM_ARRAY_TASK_MIN", 0))
    task_index, num_tasks = task_index or 0, num_tasks or 1
    if not 0 <= task_index < num_tasks:
        raise BertpipeError(f"task index {task_index} is outside 0..{num_tasks - 1}")
    return task_index, num_tasks


@dataclass
class ShardPlan:
    cfg: ShardConfig
    out: Store
    work: Store  # <output_dir>.incomplete
    key: str
    inputs: list[dict]
    vocab_sha256: str


def _plan(cfg: ShardConfig, corpus: Corpus) -> ShardPlan:
    """Every check that needs no work: the output and its temporary name are free or ours, the vocabulary
    loads and matches its manifest, the corpus exists. Nothing is written."""
    out = Store(cfg.output_dir)
    work = Store(out.url + ".incomplete")
    claim_output(out.url, "shard")
    load_vocab(cfg.vocab_dir)
    vocab_sha = vocab_hash(cfg.vocab_dir)
    inputs = corpus.fingerprint()
    key = sha256_json({"inputs": inputs, "settings": cfg.settings(), "vocab": vocab_sha})
    return ShardPlan(cfg, out, work, key, inputs, vocab_sha)


def build_shards(cfg: ShardConfig, task_index: int | None = None, num_tasks: int | None = None,
                 merge: bool | None = None, force: bool = False) -> str:
    """Run the shard stage (or this array task's share of it); returns the output URL.

    With several tasks, each writes its parts and a marker; `merge` (default: only when there is one task)
    cuts the parts into shards once every task's marker is there.
    """
    task_index, num_tasks = _task_from_env(task_index, num_tasks)
    merge = num_tasks == 1 if merge is None else merge
    corpus = Corpus(cfg.corpus)
    plan = _plan(cfg, corpus)
    done = plan.out.read_json("manifest.json")
    if done and done.get("key") == plan.key and not force:
        log.info("shards in %s are up to date (inputs, vocab and settings unchanged)", plan.out.url)
        return plan.out.url
    _prepare_work_dir(plan, force)
    marker = plan.work.read_json(f"{PARTS}/task-{task_index:05d}-of-{num_tasks:05d}.json")
    if not plan.work.exists("manifest.json") and (
            marker is None or not _task_intact(plan.work, task_index, num_tasks, marker)):
        try:
            _write_parts(plan, task_index, num_tasks)
        except BaseException:
            if num_tasks == 1 and not any(n.startswith("part.") for n in plan.work.listdir(PARTS)):
                plan.work.remove()  # nothing finished worth resuming: leave no debris
            raise
    if merge:
        _merge(plan, num_tasks)
        swap_into(plan.work.url, plan.out.url, "shard")
        log.info("wrote %s", plan.out.url)
    return plan.out.url


def _prepare_work_dir(plan: ShardPlan, force: bool) -> None:
    """Resume a work dir built from the same inputs and settings; start over otherwise."""
    state = plan.work.read_json(f"{PARTS}/key.json")
    if state is None or state.get("key") != plan.key or force:
        if state is not None:
            log.info("inputs or settings changed since the interrupted run: starting over")
        remove_own(plan.work.url, "shard")
        plan.work.makedirs(PARTS)
        mark(plan.work.url, "shard")
        plan.work.write_json(f"{PARTS}/key.json", {"key": plan.key})
    elif plan.work.listdir(PARTS):
        log.info("resuming the interrupted run in %s", plan.work.url)


def _good_parts(work: Store, names: list[str]) -> set[str]:
    """Which of the parts `names` are finished and still match the sha256 written beside them. The others
    (damaged, or cut off before their checksum) are removed with any `.tmp` left of them, to be built again;
    `names` are only ever parts this process may write (another array task's are not touched)."""
    listed = set(work.listdir(PARTS))
    good = set()
    for name in names:
        expected = work.read_bytes(f"{PARTS}/{name}.sha256").decode() if f"{name}.sha256" in listed else None
        if name in listed and expected and hashlib.sha256(work.read_bytes(f"{PARTS}/{name}")).hexdigest() == expected:
            good.add(name)
            continue
        if name in listed and expected:
            log.warning("part %s in %s is damaged (its sha256 differs): building it again", name, work.url)
        for leftover in (name, f"{name}.sha256", f"{name}.tmp", f"{name}.sha256.tmp"):
            if leftover in listed:
                work.remove(f"{PARTS}/{leftover}")
    return good


def _task_intact(work: Store, task_index: int, num_tasks: int, marker: dict) -> bool:
    """Whether every part (of both splits) of a finished task is still there and undamaged."""
    mine = [_part_name(split, c) for split, key in (("train", "chunks"), ("eval", "eval_chunks"))
            for c in range(task_index, marker.get(key, 0), num_tasks)]
    return len(_good_parts(work, mine)) == len(mine)


def _write_parts(plan: ShardPlan, task_index: int, num_tasks: int) -> None:
    """This task's parts: chunk c belongs to task c % num_tasks, and to worker (c // num_tasks) % workers."""
    cfg, work = plan.cfg, plan.work
    mine = sorted({n.split(".parquet")[0] + ".parquet" for n in work.listdir(PARTS)  # either split's parts
                   if n.startswith(("part.", "eval.")) and ".parquet" in n
                   and int(n.split(".")[1]) % num_tasks == task_index})
    have = _good_parts(work, mine)
    if have:
        log.info("resuming: %d part(s) already done", len(have))
    held_out = _held_out(plan)["positions"]
    workers = cfg.workers or _cpu_count()
    lanes = num_tasks * workers
    desc = f"shard (task {task_index}/{num_tasks})" if num_tasks > 1 else "shard"
    with progress(unit="chunk", desc=desc) as bar:
        if workers == 1:
            totals = _run_worker(cfg, work.url, task_index, lanes, have, held_out)
        else:
            ctx = get_context("fork")  # the parent holds no threads yet; fork skips re-importing in every worker
            done = ctx.Queue()
            with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(done,)) as pool:
                futures = [pool.submit(_run_worker, cfg, work.url, task_index + w * num_tasks, lanes, have,
                                       held_out) for w in range(workers)]
                while not all(f.done() for f in futures):
                    with contextlib.suppress(queue.Empty):
                        bar.update(done.get(timeout=0.5))
                totals = futures[0].result()
    work.write_json(f"{PARTS}/task-{task_index:05d}-of-{num_tasks:05d}.json",
                    {"chunks": totals["train"], "eval_chunks": totals["eval"]})


def _held_out(plan: ShardPlan) -> dict:
    """The held-out documents, drawn once per build and kept in the work directory (every task draws the
    same ones; a resumed or merging task reads them back)."""
    name = f"{PARTS}/eval.json"
    drawn = plan.work.read_json(name)
    if drawn is None:
        drawn = draw_eval_documents(plan.cfg, Corpus(plan.cfg.corpus))
        plan.work.write_json(name, drawn)
    return drawn


def _cut(plan: ShardPlan, part_prefix: str, shard_prefix: str, total: int) -> tuple[list[dict], dict[str, int]]:
    """Cut `total` parts (`<part_prefix>.NNNNNN.parquet`), in chunk order, into shards of `rows_per_shard` rows
    named `<shard_prefix>.NNNNN.parquet`; returns their manifest entries and the summed chunk statistics."""
    cfg, work = plan.cfg, plan.work
    stats: dict[str, int] = {}
    shards, buffer, buffered, shard_index = [], [], 0, 0

    def flush(rows: int) -> None:
        nonlocal buffer, buffered, shard_index
        table = pa.concat_tables(buffer)
        name = f"{shard_prefix}.{shard_index:05d}.parquet"
        head, buffer = table.slice(0, rows), [table.slice(rows)]
        buffered -= rows
        if work.exists(name):  # written before an interruption; shards are deterministic
            data = work.read_bytes(name)
        else:
            sink = io.BytesIO()
            pq.write_table(head.replace_schema_metadata(None), sink, compression="zstd",
                           compression_level=cfg.compression_level, row_group_size=min(rows, 1024))
            data = sink.getvalue()
            work.write_bytes(name, data)
        shards.append({"name": name, "rows": rows, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
        shard_index += 1

    for index in progress(range(total), unit="part", desc="merge" if shard_prefix == "shard" else "merge eval"):
        part = f"{PARTS}/{part_prefix}.{index:06d}.parquet"
        if not work.exists(part):
            raise BertpipeError(f"cannot merge: {part_prefix} {index} of {total} is missing in {work.url}")
        table = pq.read_table(io.BytesIO(work.read_bytes(part)))
        for k, v in json.loads(table.schema.metadata[b"bertpipe.stats"]).items():
            stats[k] = stats.get(k, 0) + v
        buffer.append(table)
        buffered += table.num_rows
        while buffered >= cfg.rows_per_shard:
            flush(cfg.rows_per_shard)
    if buffered:
        flush(buffered)
    return shards, stats


def _merge(plan: ShardPlan, num_tasks: int) -> None:
    """Cut the parts, in chunk order, into shards of `rows_per_shard` rows; write the manifest last."""
    cfg, work = plan.cfg, plan.work
    if work.exists("manifest.json"):  # interrupted after the manifest: only the rename is left
        return
    markers = [work.read_json(f"{PARTS}/task-{t:05d}-of-{num_tasks:05d}.json") for t in range(num_tasks)]
    missing = [t for t, m in enumerate(markers) if m is None]
    if missing:
        raise BertpipeError(f"cannot merge: array task(s) {missing} of {num_tasks} have not finished")
    start = time.perf_counter()
    names = [_part_name(split, c) for split, key in (("train", "chunks"), ("eval", "eval_chunks"))
             for c in range(markers[0].get(key, 0))]
    good = _good_parts(work, names)
    if len(good) < len(names):  # damaged since its task finished: this process builds it again
        log.warning("building %d missing or damaged part(s) again", len(names) - len(good))
        _run_worker(cfg, work.url, 0, 1, good, _held_out(plan)["positions"])
    shards, stats = _cut(plan, "part", "shard", markers[0]["chunks"])
    if not shards:
        raise BertpipeError("the corpus yielded no pretraining instances")
    used = stats["instances"] * (cfg.max_seq_len - 3) / max(stats["tokens"] * cfg.dupe_factor, 1)
    if used < LOW_YIELD:
        log.warning("only %s instances from %s tokens, about %.0f%% of what real sentences yield: are the documents "
                    "a few giant lines or sentences? Check the corpus's format and line breaks",
                    f"{stats['instances']:,}", f"{stats['tokens']:,}", 100 * used / 1.2)
    manifest_eval = None
    if cfg.eval_documents:
        held = _held_out(plan)
        eval_shards, eval_stats = _cut(plan, "eval", "eval", markers[0].get("eval_chunks", 0))
        if not eval_shards:
            raise BertpipeError(f"the {len(held['ids'])} held-out documents yielded no instances")
        manifest_eval = {"documents": len(held["ids"]), "of_documents": held["of"],
                         "doc_ids": held["ids"], "shards": eval_shards,
                         "rows": sum(s["rows"] for s in eval_shards), "counts": eval_stats}
    work.write_json("manifest.json", {
        "stage": "shard",
        "format_version": FORMAT_VERSION,
        "key": plan.key,
        "shards": shards,
        "rows": sum(s["rows"] for s in shards),
        "schema": {f.name: str(f.type) for f in SCHEMA},
        "vocab_sha256": plan.vocab_sha256,
        "vocab_dir": cfg.vocab_dir,
        "inputs": plan.inputs,
        "settings": cfg.settings(),
        "config": to_dict(cfg),
        "counts": stats,
        **({"eval": manifest_eval} if manifest_eval else {}),
        "merge_seconds": round(time.perf_counter() - start, 3),
        "versions": library_versions("tokenizers", "pyarrow", "blingfire"),
    })
    work.remove(PARTS)
