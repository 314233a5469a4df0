"""What the reliability checks cost: each beside the plain work it guards, in the same command.

- pretrain's check of every shard against the manifest before step 1 (`ShardSet.check_files`: size, then
  sha256), beside reading the same files;
- the opcode scan of a checkpoint file that rank 0 runs before any rank loads it
  (`pipeline.checkpoint.scan`), beside loading that file weights-only (`pipeline.checkpoint.load_file`).

    .venv/bin/python bench/reliability.py [--shards DIR] [--preset mini]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ensure_wiki_shards, table  # noqa: E402


def best(fn, repeat: int = 3) -> float:
    """The fastest of `repeat` runs, in seconds (the files are in the page cache after the first)."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", help="a shard directory (default: build/shards/wiki-128, built if missing)")
    parser.add_argument("--preset", default="mini", help="the model whose checkpoint file is scanned and loaded")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from pipeline.checkpoint import load_file, scan
    from pipeline.dataset import ShardSet
    from pipeline.model import BertForPreTraining, from_preset

    shards = ShardSet(args.shards or str(ensure_wiki_shards()))
    paths = [Path(shards.store.path(s["name"])) for s in shards.shards]
    size_mb = sum(p.stat().st_size for p in paths) / 1e6
    read = best(lambda: [p.read_bytes() for p in paths])
    check = best(lambda: shards.check_files(range(len(paths))))
    rows = [{"run": "read every shard", "MB": f"{size_mb:.1f}", "seconds": f"{read:.3f}",
             "MB/s": f"{size_mb / read:.0f}"},
            {"run": "check_files (size + sha256)", "MB": f"{size_mb:.1f}", "seconds": f"{check:.3f}",
             "MB/s": f"{size_mb / check:.0f}"}]

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mp_rank_00_model_states.pt"
        model = BertForPreTraining(from_preset(args.preset, 30_522))
        torch.save({"module": model.state_dict(), "global_steps": 1}, path)
        ckpt_mb = path.stat().st_size / 1e6
        load = best(lambda: load_file(path))
        scanned = best(lambda: scan(path))
    rows += [{"run": f"load_file ({args.preset} model states)", "MB": f"{ckpt_mb:.1f}", "seconds": f"{load:.3f}",
              "MB/s": f"{ckpt_mb / load:.0f}"},
             {"run": "scan (pickle opcodes only)", "MB": f"{ckpt_mb:.1f}", "seconds": f"{scanned:.3f}",
              "MB/s": f"{ckpt_mb / scanned:.0f}"}]
    print(table(rows, ["run", "MB", "seconds", "MB/s"]))
    print(f"check_files / read: {check / read:.2f}x; scan / load_file: {scanned / load:.3f}x")


if __name__ == "__main__":
    main()
