"""The server's Prometheus metrics (`GET /metrics`, the text format of prometheus_client), one registry per app."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST
ENDPOINTS = ("/", "/predict", "/health", "/metadata", "/metrics", "/openapi.json", "/docs")  # anything else: other
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    def __init__(self, info: dict[str, str]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("bertpipe_requests", "HTTP requests answered, by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.errors = Counter("bertpipe_request_errors", "requests answered with a 4xx or 5xx, by endpoint and "
                              "status code", ["endpoint", "status"], registry=r)
        self.latency = Histogram("bertpipe_request_seconds", "time from a request's arrival to its response, "
                                 "by endpoint", ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("bertpipe_batch_size", "inputs per model batch", buckets=BATCH_BUCKETS,
                                    registry=r)
        self.batch_seconds = Histogram("bertpipe_batch_seconds", "model time per batch", buckets=LATENCY_BUCKETS,
                                       registry=r)
        self.inputs = Counter("bertpipe_inputs", "inputs answered", registry=r)
        self.truncated = Counter("bertpipe_inputs_truncated", "inputs cut to the run's max_len", registry=r)
        self.open = Gauge("bertpipe_open_requests", "requests to /predict being read or answered", registry=r)
        Gauge("bertpipe_model_info", "the run being served", list(info), registry=r).labels(**info).set(1)

    def observe(self, path: str, status: int, seconds: float) -> None:
        endpoint = path if path in ENDPOINTS else "other"
        self.requests.labels(endpoint, str(status)).inc()
        if status >= 400:
            self.errors.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)

    def text(self) -> bytes:
        return generate_latest(self.registry)
