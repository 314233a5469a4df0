"""`bertpipe serve`: a finished run behind a real-time HTTP API (FastAPI on uvicorn) with dynamic batching.

`serve(cfg)` loads the run the way `bertpipe predict` does (recipes.predict.Predictor: safetensors weights,
meta.json and tokenizer files, nothing unpickled) and serves it until SIGINT or SIGTERM, after which it
finishes the requests in flight. `Running(cfg)` does the same in a background thread of this process, on a
free port when `port` is 0 (tests, notebooks).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import socket
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from pipeline.errors import BertpipeError

log = logging.getLogger("bertpipe.serve")
LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass
class ServeConfig:
    run: str  # a finished `bertpipe finetune` run directory (or its model/ directory)
    host: str = "127.0.0.1"  # loopback only unless told otherwise (there is no authentication)
    port: int = 8000  # 0: a free port, printed at start
    max_batch: int = 32  # inputs per forward pass, gathered across concurrent requests
    max_wait_ms: float = 5.0  # how long a batch with room waits for more, while clients are concurrent
    max_inputs: int = 256  # inputs in one request; more is a 413
    max_body_bytes: int = 1_000_000  # bytes in one request body; more is a 413
    device: str = "cpu"
    threads: int | None = None  # torch's threads for the model (default: torch's own, one per core)
    beam: int | None = None  # translation: beam size (default: the run's; 1 = greedy)
    log_inputs: bool = False  # log every request's inputs (off: no text of a request is logged)

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.max_inputs < 1 or self.max_body_bytes < 1 or self.max_wait_ms < 0:
            raise BertpipeError("--max-batch, --max-inputs and --max-body-bytes must be positive, --max-wait-ms "
                                "at least 0")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise BertpipeError(f"--device {self.device}: no CUDA GPU is visible")
        if self.threads is not None and self.threads < 1:
            raise BertpipeError("--threads must be at least 1")
        if not 0 <= self.port <= 65535:
            raise BertpipeError(f"--port {self.port}: not a port number (0 picks a free one)")

    @property
    def settings(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k in ("max_batch", "max_wait_ms", "max_inputs",
                                                                "max_body_bytes", "device", "threads")}


def run_metadata(run: str | Path, predictor, settings: dict) -> dict:
    """What GET /metadata answers: the task, its labels and input shape, the model and the run's input hashes."""
    from recipes.base import MODEL_DIR

    run = Path(run)
    run_dir = run.parent if run.name == MODEL_DIR and not (run / "results.json").is_file() else run
    results_path = run_dir / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    return {"task": predictor.spec.name, "task_kind": predictor.kind, "input": predictor.shape,
            "labels": list(predictor.spec.labels), "max_len": predictor.meta["max_len"],
            "model": results.get("model", {"kind": predictor.meta["kind"]}), "params": results.get("params"),
            "metrics": results.get("metrics", {}), "inputs": results.get("inputs", {}), "run": run_dir.name,
            "server": settings}


def build(cfg: ServeConfig):
    """The FastAPI app for cfg.run, its model loaded."""
    from recipes.predict import Predictor
    from recipes.serve.app import build_app

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    options = {"beam": cfg.beam} if cfg.beam is not None else {}
    predictor = Predictor(cfg.run, cfg.device, batch_size=cfg.max_batch, **options)
    return build_app(predictor, cfg.settings, run_metadata(cfg.run, predictor, cfg.settings), cfg.log_inputs)


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads: a port in use fails at once, in one line."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)  # connections wait in the backlog until uvicorn serves: the printed address works at once
    except OSError as err:
        sock.close()
        raise BertpipeError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    return sock


class Server:
    """A run's app on uvicorn, on a bound socket; `url` has the real port (also when port is 0)."""

    def __init__(self, cfg: ServeConfig, quiet: bool = False):
        import uvicorn

        self.sock = bind(cfg.host, cfg.port)
        try:
            app = build(cfg)
        except BaseException:
            self.sock.close()
            raise
        if cfg.host not in LOOPBACK:
            log.warning("listening on %s: anyone who can reach this machine can use the model (no authentication)",
                        cfg.host)
        host, port = self.sock.getsockname()[:2]
        self.url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
        self.uvicorn = uvicorn.Server(uvicorn.Config(app, log_level="warning" if quiet else "info",
                                                     access_log=not quiet, log_config=None,
                                                     timeout_graceful_shutdown=10))

    @property
    def app(self):
        return self.uvicorn.config.app

    def run(self) -> None:
        """Serve until SIGINT/SIGTERM (in the main thread) or `stop()`; requests in flight are finished."""
        try:
            self.uvicorn.run(sockets=[self.sock])
        finally:
            self.sock.close()

    def stop(self) -> None:
        self.uvicorn.should_exit = True


def serve(cfg: ServeConfig, quiet: bool = False) -> None:
    """Serve cfg.run until SIGINT/SIGTERM; prints the address (with the real port when port is 0)."""
    server = Server(cfg, quiet)
    print(f"serving {cfg.run} on {server.url}/ (the page at /, the API's docs at /docs)", flush=True)
    stops: list[int] = []
    # uvicorn stops gracefully on SIGINT/SIGTERM, then raises the signal again with the handlers it found: these,
    # so a server stopped on purpose exits 0 rather than by the signal's default action
    previous = {sig: signal.signal(sig, lambda signum, frame: stops.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if stops:
        log.info("stopped by %s after finishing the requests in flight", signal.Signals(stops[0]).name)


class Running:
    """`with Running(cfg) as url:` serves cfg.run from a thread of this process, stopped on exit."""

    def __init__(self, cfg: ServeConfig, quiet: bool = True):
        self.cfg, self.quiet = cfg, quiet

    def __enter__(self) -> str:
        self.server = Server(self.cfg, self.quiet)
        self.thread = threading.Thread(target=self.server.run, name="bertpipe-serve", daemon=True)
        self.thread.start()
        while not self.server.uvicorn.started:
            if not self.thread.is_alive():
                raise BertpipeError(f"the server on {self.server.url} stopped while starting")
            time.sleep(0.02)
        return self.server.url

    def __exit__(self, *exc) -> None:
        self.server.stop()
        self.thread.join(timeout=30)


def serve_command(argv: list[str]) -> int:
    from pipeline.log import setup_logging

    d = ServeConfig(run="")
    parser = argparse.ArgumentParser(
        prog="bertpipe serve",
        description="Serve a finished finetune run over HTTP: POST /predict (batched across concurrent requests), "
                    "a page to try it at /, /health, /metadata, /metrics (Prometheus) and the OpenAPI schema at "
                    "/openapi.json (browsable at /docs). Stop with Ctrl-C or SIGTERM.")
    parser.add_argument("--run", required=True, metavar="RUN_DIR", help="a finished `bertpipe finetune` run directory")
    parser.add_argument("--host", default=d.host, help=f"address to listen on (default {d.host}: this machine only)")
    parser.add_argument("--port", type=int, default=d.port, help=f"default {d.port}; 0 picks a free port")
    parser.add_argument("--max-batch", type=int, default=d.max_batch,
                        help=f"inputs per forward pass, across requests (default {d.max_batch}; 1 = no batching)")
    parser.add_argument("--max-wait-ms", type=float, default=d.max_wait_ms,
                        help=f"how long a batch with room waits for more inputs while clients send concurrent "
                             f"requests (default {d.max_wait_ms:g}); a lone client's request never waits")
    parser.add_argument("--max-inputs", type=int, default=d.max_inputs,
                        help=f"inputs in one request (default {d.max_inputs})")
    parser.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes,
                        help=f"bytes in one request body (default {d.max_body_bytes:,})")
    parser.add_argument("--beam", type=int, help="translation: beam size (default: the run's; 1 = greedy)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="torch threads for the model (default: one per core); on a "
                        "busy CPU, fewer threads than cores leave one to read requests")
    parser.add_argument("--log-inputs", action="store_true", help="log each request's inputs (default: no text "
                        "of a request is logged)")
    parser.add_argument("--quiet", action="store_true", help="warnings and errors only; no access log")
    args = parser.parse_args(argv)
    setup_logging(args.quiet)
    cfg = ServeConfig(run=args.run, host=args.host, port=args.port, max_batch=args.max_batch,
                      max_wait_ms=args.max_wait_ms, max_inputs=args.max_inputs, max_body_bytes=args.max_body_bytes,
                      device=args.device, threads=args.threads, beam=args.beam, log_inputs=args.log_inputs)
    serve(cfg, args.quiet)
    return 0
