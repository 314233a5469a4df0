"""The FastAPI app of `bertpipe serve`: endpoints, errors as one-line JSON, the body limit, metrics, the page.

    POST /predict    {"inputs": X} -> {"results": [...]}: one answer per input, batched across requests
    GET  /           a page to try it: type a sentence, see the label's bars or the words coloured by tag
    GET  /health     {"status": "ok"} once the model is loaded
    GET  /metadata   task, labels, input shape, model kind and size, the run's input hashes (results.json)
    GET  /metrics    Prometheus text format: requests, errors, latency, batch sizes
    GET  /openapi.json, /docs   the schema (serve/schema.py) and its browser

Every 4xx and 5xx is `{"error": "<what is wrong>", "status": N}`. Nothing of a request's text is logged unless
`log_inputs` is set.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from recipes.predict import InputError, Predictor
from recipes.serve.batcher import Batcher
from recipes.serve.metrics import CONTENT_TYPE, Metrics
from recipes.serve.schema import ErrorResponse, PredictRequest, PredictResponse

log = logging.getLogger("bertpipe.serve")
PAGE = Path(__file__).with_name("page.html")
OVERLAP_SECONDS = 0.5  # the batcher waits while requests have overlapped within this long
DRAIN_BYTES = 16_000_000  # a refused body up to this size is read to its end before the 413 goes out
ERRORS = {code: {"model": ErrorResponse} for code in (400, 413, 415, 422, 500)}


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status_code=status)


def _where(loc: tuple) -> str:
    """`inputs[2].a` from pydantic's ('body', 'inputs', 2, 'a'); `body` for the body itself."""
    parts = [p for p in loc if p != "body"]
    text = ""
    for p in parts:
        text += f"[{p}]" if isinstance(p, int) else (f".{p}" if text else str(p))
    return text or "body"


def describe_validation(err: RequestValidationError) -> tuple[int, str]:
    """A status and one line for pydantic's errors: 400 for a body that is not JSON, 415 for a body that was
    not sent as JSON, else 422; the inputs' text is never part of the message."""
    errors = err.errors()
    first = errors[0] if errors else {"type": "", "msg": "invalid request", "loc": ()}
    if first["type"] == "json_invalid":
        detail, at = first.get("ctx", {}).get("error", "syntax error"), first["loc"][-1]
        return 400, f"body: not valid JSON at character {at}: {detail}"
    if first["loc"] == ("body",) and isinstance(first.get("input"), bytes):  # FastAPI reads only JSON types
        return 415, "body: send it as JSON, with the header Content-Type: application/json"
    messages = []
    for e in errors[:3]:
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = 'unexpected field (a request is {"inputs": ..., "pretokenized": false})'
        elif e["type"] == "missing":
            msg = 'empty (a request is {"inputs": ...})' if _where(e["loc"]) == "body" else "missing"
        elif e["type"] in ("model_attributes_type", "dict_type") and _where(e["loc"]) == "body":
            msg = 'expected a JSON object {"inputs": ...}'
        messages.append(f"{_where(e['loc'])}{'' if msg.startswith(('[', '.', ':')) else ': '}{msg}")
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    return 422, "; ".join(messages) + more


@dataclass
class InFlight:
    """The /predict requests open now, and when two last overlapped: the batcher waits for more inputs only on a
    server whose clients have lately been concurrent (a lone client's request never waits)."""

    open: int = 0
    overlapped: float = -math.inf

    def start(self) -> None:
        self.open += 1
        if self.open > 1:
            self.overlapped = time.monotonic()

    def end(self) -> None:
        self.open -= 1

    def concurrent(self) -> bool:
        return time.monotonic() - self.overlapped < OVERLAP_SECONDS


class Guard:
    """Plain ASGI middleware around every request: the body limit (413 with the JSON error, for bodies with and
    without Content-Length), the /predict requests in flight (InFlight) and the metrics."""

    def __init__(self, app, metrics: Metrics, flight: InFlight, max_body_bytes: int):
        self.app, self.metrics, self.flight, self.max_body = app, metrics, flight, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status, path = time.perf_counter(), 500, scope["path"]
        counted = path == "/predict"

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        received = 0

        async def drain() -> None:
            """Read the rest of a refused body (up to DRAIN_BYTES), so the client gets the 413 rather than a
            connection reset while it is still sending."""
            nonlocal received
            while received <= DRAIN_BYTES:
                message = await receive()
                received += len(message.get("body", b""))
                if message["type"] != "http.request" or not message.get("more_body"):
                    return

        async def receive_limited():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body:  # a body without Content-Length (chunked) that runs past the limit
                if message.get("more_body"):
                    await drain()
                raise HTTPException(413, self._too_large(received, counted=True))
            return message

        if counted:
            self.flight.start()
            self.metrics.open.inc()
        try:
            length = dict(scope["headers"]).get(b"content-length", b"0")
            if length.isdigit() and int(length) > self.max_body:
                await drain()
                await error(413, self._too_large(int(length)))(scope, receive, send_status)
            else:
                await self.app(scope, receive_limited, send_status)
        finally:
            if counted:
                self.flight.end()
                self.metrics.open.dec()
            self.metrics.observe(path, status, time.perf_counter() - start)

    def _too_large(self, size: int, counted: bool = False) -> str:
        size_text = f"{'at least ' if counted else ''}{size:,} bytes"
        return f"body: {size_text}, over this server's limit of {self.max_body:,} (--max-body-bytes)"


def build_app(predictor: Predictor, settings: dict, metadata: dict, log_inputs: bool = False) -> FastAPI:
    """The app for one loaded run. `settings`: max_batch, max_wait_ms, max_inputs, max_body_bytes."""
    spec = predictor.spec
    metrics = Metrics({"task": spec.name, "task_kind": predictor.kind, "model_kind": predictor.meta["kind"],
                       "size": str(metadata.get("model", {}).get("size", ""))})
    flight = InFlight()
    batcher = Batcher(predictor.answer, settings["max_batch"], settings["max_wait_ms"],
                      should_wait=flight.concurrent, on_batch=metrics.observe_batch)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        yield
        batcher.stop()

    app = FastAPI(title="bertpipe serve", version="1", lifespan=lifespan,
                  summary=f"{spec.name} ({predictor.kind}) from a finished bertpipe finetune run",
                  description=__doc__.split("\n\n")[1])
    app.state.batcher, app.state.metrics = batcher, metrics

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        return error(*describe_validation(err))

    @app.exception_handler(StarletteHTTPException)  # FastAPI's own and the router's (404, 405)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        if isinstance(err.__cause__, UnicodeDecodeError):  # FastAPI's 400 for a body json.loads cannot decode
            return error(400, f"body: not valid UTF-8 (byte {err.__cause__.start})")
        return error(err.status_code, str(err.detail))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, err: Exception) -> JSONResponse:
        log.error("%s %s failed: %s: %s", request.method, request.url.path, type(err).__name__, err)
        return error(500, f"internal error: {type(err).__name__}")

    @app.post("/predict", response_model=PredictResponse, responses=ERRORS,
              summary="Answer one input or a list: labels with probabilities, tags per word, or translations")
    async def predict(body: PredictRequest) -> JSONResponse:
        items = body.items()
        if not items:
            raise HTTPException(422, "inputs: empty list")
        if len(items) > settings["max_inputs"]:
            raise HTTPException(413, f"inputs: {len(items):,} in one request; this server takes at most "
                                     f"{settings['max_inputs']:,} (--max-inputs)")
        try:
            prepared = predictor.prepare(items, body.pretokenized)
        except InputError as err:
            where = f"inputs[{err.index}]" if isinstance(body.inputs, list) else "inputs"
            raise HTTPException(422, f"{where}: {err.reason}") from None
        if log_inputs:
            log.info("inputs: %s", json.dumps(items, ensure_ascii=False))
        results = await batcher.submit(prepared)
        metrics.inputs.inc(len(results))
        metrics.truncated.inc(sum(r["truncated"] for r in results))
        return JSONResponse({"results": results})

    @app.get("/health", summary="Whether the model is loaded and the batcher running")
    async def health() -> dict:
        return {"status": "ok", "task": spec.name}

    @app.get("/metadata", summary="The run being served: task, labels, input shape, model, input hashes")
    async def get_metadata() -> dict:
        return metadata

    @app.get("/metrics", summary="Prometheus text format")
    async def get_metrics() -> Response:
        return Response(metrics.text(), media_type=CONTENT_TYPE)

    page = PAGE.read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    app.add_middleware(Guard, metrics=metrics, flight=flight, max_body_bytes=settings["max_body_bytes"])
    return app
