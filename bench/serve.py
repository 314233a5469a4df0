"""Benchmark `bertpipe serve`: requests/s and latency with dynamic batching against the same server with
max_batch=1, in the same command, on a finished run (default: the demo's SST-2 run, `make demo`).

Each configuration is a real `bertpipe serve` process on 127.0.0.1; a bounded load loop (aiohttp, one
connection per client) sends one dev sentence per request: first from 1 client, then from `--clients` at once,
each phase stopping at `--requests` or `--time-cap` seconds. Both configurations run `--repeats` times,
alternating, so drift on a shared machine hits both; the ratios are of the medians over repeats.

Goals: at `--clients` 32, batching serves at least 3x the requests/s of max_batch=1; at 1 client its median
latency is no worse than 1.2x.

    .venv/bin/python bench/serve.py [--run build/demo/runs/sst2] [--clients 32] [--requests 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
from common import ROOT, table

sys.path.insert(0, str(ROOT))


def dev_texts(run: Path) -> list[str]:
    """The dev sentences of the run's own task, as its config.yaml names them."""
    from pipeline.config import load_config
    from recipes.base import FinetuneConfig
    from recipes.tasks import get_task, read_splits

    cfg = load_config(FinetuneConfig, run / "config.yaml")
    return [ex.text for ex in read_splits(cfg.task, get_task(cfg.task.name))["dev"]]


class Server:
    """`bertpipe serve` in its own process, on a free port."""

    def __init__(self, run: Path, max_batch: int, max_wait_ms: float, threads: int | None):
        command = [sys.executable, "-m", "pipeline.cli", "serve", "--run", str(run), "--port", "0", "--quiet",
                   "--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms)]
        command += ["--threads", str(threads)] if threads else []
        self.proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True, start_new_session=True)
        line = self.proc.stdout.readline()
        if " on http://" not in line:
            self.proc.kill()
            sys.exit(f"bertpipe serve did not start: {line!r}")
        self.url = line.split(" on ")[1].split("/ ")[0]

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)


async def load(url: str, texts: list[str], clients: int, requests: int, cap: float) -> dict:
    """`requests` requests (or as many as `cap` seconds allow) from `clients` concurrent clients."""
    latencies: list[float] = []
    errors = 0
    issued = 0
    deadline = time.perf_counter() + cap

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal issued, errors
        while issued < requests and time.perf_counter() < deadline:
            text = texts[issued % len(texts)]
            issued += 1
            start = time.perf_counter()
            async with session.post(url + "/predict", json={"inputs": text}) as response:
                await response.read()
                errors += response.status != 200
            latencies.append(time.perf_counter() - start)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients)) as session:
        start = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(clients)))
        seconds = time.perf_counter() - start
    q = statistics.quantiles(latencies, n=100)
    return {"requests": len(latencies), "errors": errors, "seconds": round(seconds, 2),
            "req_per_s": round(len(latencies) / seconds, 1), "p50_ms": round(q[49] * 1000, 1),
            "p95_ms": round(q[94] * 1000, 1), "p99_ms": round(q[98] * 1000, 1)}


async def batches(url: str) -> tuple[float, float]:
    """(inputs, batches) the server's model has run so far, from its /metrics."""
    async with aiohttp.ClientSession() as session, session.get(url + "/metrics") as response:
        text = await response.text()
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
              if line.startswith("bertpipe_batch_size_")}
    return values["bertpipe_batch_size_sum"], values["bertpipe_batch_size_count"]


def measure(run: Path, texts: list[str], name: str, max_batch: int, args) -> list[dict]:
    server = Server(run, max_batch, args.max_wait_ms, args.threads)
    try:
        asyncio.run(load(server.url, texts, 4, 100, args.time_cap))  # warm-up: first calls, allocator, caches
        rows = []
        for clients, requests in ((1, args.single_requests), (args.clients, args.requests)):
            async def phase(clients=clients, requests=requests):
                inputs, count = await batches(server.url)
                result = await load(server.url, texts, clients, requests, args.time_cap)
                after = await batches(server.url)
                return result | {"mean_batch": round((after[0] - inputs) / max(after[1] - count, 1), 1)}
            rows.append({"server": name, "clients": clients} | asyncio.run(phase()))
        return rows
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, default=ROOT / "build" / "demo" / "runs" / "sst2")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=2000, help="requests in the concurrent phase")
    parser.add_argument("--single-requests", type=int, default=300, help="requests in the one-client phase")
    parser.add_argument("--time-cap", type=float, default=120.0, help="seconds per phase at most")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--threads", type=int, help="the servers' torch threads (default: torch's, one per core)")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    if not (args.run / "results.json").is_file():
        sys.exit(f"{args.run}: no finished run (make demo builds build/demo/runs/sst2)")
    texts = dev_texts(args.run)

    configs = [(f"batching (max_batch={args.max_batch})", args.max_batch), ("max_batch=1", 1)]
    rows = []
    for _ in range(args.repeats):
        for name, max_batch in configs:
            rows += measure(args.run, texts, name, max_batch, args)
    print(f"bertpipe serve on {args.run} ({len(texts)} dev sentences, one per request), max_wait_ms "
          f"{args.max_wait_ms:g}, threads {args.threads or 'default'}, {args.repeats} repeats")
    print(table(rows, ["server", "clients", "requests", "errors", "seconds", "req_per_s", "p50_ms", "p95_ms",
                       "p99_ms", "mean_batch"]))

    def median(name: str, clients: int, key: str) -> float:
        return statistics.median(r[key] for r in rows if r["server"] == name and r["clients"] == clients)

    batched, single = configs[0][0], configs[1][0]
    throughput = median(batched, args.clients, "req_per_s") / median(single, args.clients, "req_per_s")
    p50 = median(batched, 1, "p50_ms") / median(single, 1, "p50_ms")
    print(f"\nreq/s at {args.clients} clients: batching / max_batch=1 = {throughput:.2f}x (goal >= 3x)")
    print(f"p50 at 1 client: batching / max_batch=1 = {p50:.2f}x (goal <= 1.2x)")
    print(json.dumps({"throughput_ratio": round(throughput, 2), "single_p50_ratio": round(p50, 2)}))


if __name__ == "__main__":
    main()
