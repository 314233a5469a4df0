"""`bertpipe serve` over real HTTP: answers equal `bertpipe predict`'s for every task kind, dynamic batching under
many concurrent clients (each answer its own request's), the bad requests (each a one-line 4xx JSON error, the
server still serving), /health, /metadata, /metrics and the OpenAPI schema, and the command itself started as a
process, listening on 127.0.0.1 only, logging no request text, stopped by SIGTERM.

The runs are conftest's `tiny_runs`; one server per run for the whole module, in a thread of this process (the
command's own test starts one process).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import aiohttp
import psutil
import pytest
import torch
from conftest import ROOT, finished_run
from prometheus_client.parser import text_string_to_metric_families

from recipes.predict import Predictor
from recipes.seq2seq import translate
from recipes.serve.batcher import Batcher
from recipes.serve.server import Running, ServeConfig
from recipes.tasks import TASKS

CLIENTS = 32
TOLERANCE = 2e-4  # probabilities are rounded to 4 places; padding in a batch moves them by less than this


def call(url: str, path: str, body: object = None, raw: bytes | None = None,
         headers: dict | None = None) -> tuple[int, dict | str]:
    """(status, JSON body or text) of a GET (no body) or POST."""
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    headers = headers if headers is not None else {"Content-Type": "application/json"} if data is not None else {}
    request = urllib.request.Request(url + path, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            status, text, kind = response.status, response.read().decode(), response.headers["Content-Type"]
    except urllib.error.HTTPError as err:
        status, text, kind = err.code, err.read().decode(), err.headers["Content-Type"]
    return status, json.loads(text) if kind.startswith("application/json") else text


@pytest.fixture(scope="module")
def servers(tiny_runs):
    """A running server for each tiny run: name -> base URL."""
    with (Running(ServeConfig(run=str(tiny_runs["sst2"]), port=0, max_wait_ms=20)) as sst2,
          Running(ServeConfig(run=str(tiny_runs["ud_pos"]), port=0)) as pos,
          Running(ServeConfig(run=str(tiny_runs["multi30k"]), port=0, beam=2)) as translation):
        yield {"sst2": sst2, "ud_pos": pos, "multi30k": translation}


@pytest.fixture(scope="module")
def dev_sentences(data) -> list[str]:
    return [ex.text for ex in TASKS["sst2"].read(data / "finetune" / "sst2" / "dev.tsv")]


def metric_values(url: str) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics: (name, sorted labels) -> value."""
    status, text = call(url, "/metrics")
    assert status == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def assert_same(served: dict, expected: dict) -> None:
    """A served classification equals the unbatched one: the same label, probabilities within TOLERANCE."""
    assert served["text"] == expected["text"]
    assert served["label"] == expected["label"]
    for name, p in expected["probabilities"].items():
        assert abs(served["probabilities"][name] - p) <= TOLERANCE, (served, expected)


# ---- the batcher -----------------------------------------------------------------------------------------


def run_batcher(batcher: Batcher, requests: list[list]) -> list:
    """Submit every request at once from one event loop; their results in order."""
    async def all_at_once():
        return await asyncio.gather(*(batcher.submit(values) for values in requests))

    batcher.start()
    try:
        return asyncio.run(all_at_once())
    finally:
        batcher.stop()


def test_the_batcher_answers_each_request_in_order_across_batches():
    sizes: list[int] = []
    batcher = Batcher(lambda values: [v * 10 for v in values], max_batch=8, max_wait_ms=50,
                      on_batch=lambda size, seconds: sizes.append(size))
    requests = [list(range(i, i + 1 + i % 5)) for i in range(60)]  # 1 to 5 values each, 180 in all
    assert run_batcher(batcher, requests) == [[v * 10 for v in values] for values in requests]
    assert sum(sizes) == 180 and max(sizes) == 8 and len(sizes) < 60  # batches of inputs, not of requests


def test_a_failing_batch_fails_only_its_own_requests():
    def answer(values):
        if "bad" in values:
            raise ValueError("no")
        return [v.upper() for v in values]

    batcher = Batcher(answer, max_batch=1)
    batcher.start()

    async def go():
        return await asyncio.gather(batcher.submit(["ok"]), batcher.submit(["bad"]), batcher.submit(["fine"]),
                                    return_exceptions=True)

    try:
        first, second, third = asyncio.run(go())
    finally:
        batcher.stop()
    assert first == ["OK"] and isinstance(second, ValueError) and third == ["FINE"]


def test_a_lone_request_is_not_held_back_for_a_batch():
    """With nothing else coming (should_wait false) a request runs at once, whatever max_wait_ms; with more said
    to be coming, a batch with room waits for them up to max_wait_ms."""
    batcher = Batcher(lambda values: values, max_batch=32, max_wait_ms=60_000, should_wait=lambda: False)
    start = time.perf_counter()
    assert run_batcher(batcher, [["alone"]]) == [["alone"]]
    assert time.perf_counter() - start < 30
    batcher = Batcher(lambda values: values, max_batch=32, max_wait_ms=300, should_wait=lambda: True)
    start = time.perf_counter()
    assert run_batcher(batcher, [["waits"]]) == [["waits"]]
    assert time.perf_counter() - start >= 0.3


# ---- answers ---------------------------------------------------------------------------------------------


def test_classification_equals_predict(servers, tiny_runs, dev_sentences):
    texts = dev_sentences[:5]
    expected = Predictor(tiny_runs["sst2"], batch_size=1)(texts)
    status, body = call(servers["sst2"], "/predict", {"inputs": texts})
    assert status == 200 and len(body["results"]) == 5
    for served, want in zip(body["results"], expected, strict=True):
        assert_same(served, want)
        assert set(served) == {"text", "label", "probability", "probabilities", "truncated"}
        assert served["probability"] == max(served["probabilities"].values()) and not served["truncated"]
    status, body = call(servers["sst2"], "/predict", {"inputs": texts[0]})  # one text, not a list
    assert status == 200 and len(body["results"]) == 1
    assert_same(body["results"][0], expected[0])


def test_tagging_equals_predict(servers, tiny_runs):
    texts = ["The cat sat on the mat.", "I would like to book a flight to Boston tomorrow morning."]
    expected = Predictor(tiny_runs["ud_pos"], batch_size=1)(texts)
    status, body = call(servers["ud_pos"], "/predict", {"inputs": texts})
    assert status == 200
    for served, want in zip(body["results"], expected, strict=True):
        assert served["words"] == want["words"] and served["tags"] == want["tags"]
        assert all(t in TASKS["ud_pos"].labels for t in served["tags"])
        assert len(served["probabilities"]) == len(served["words"]) and not served["truncated"]
    assert body["results"][0]["words"] == ["The", "cat", "sat", "on", "the", "mat", "."]
    status, body = call(servers["ud_pos"], "/predict", {"inputs": "New  York-based co-writer", "pretokenized": True})
    assert status == 200 and body["results"][0]["words"] == ["New", "York-based", "co-writer"]


def test_translation_equals_translate(servers, tiny_runs):
    texts = ["A man rides a bike.", "Two dogs play in the snow.", "A woman is reading a book on a bench."]
    status, body = call(servers["multi30k"], "/predict", {"inputs": texts})
    assert status == 200
    assert [r["translation"] for r in body["results"]] == translate(tiny_runs["multi30k"], texts, beam=2,
                                                                    batch_size=1)
    assert [r["text"] for r in body["results"]] == texts


def test_a_text_over_max_len_is_truncated_and_said_so(servers, tiny_runs):
    long = " ".join(["a gorgeous , witty , seductive movie ."] * 40)  # about 320 pieces; the run reads 64
    status, body = call(servers["sst2"], "/predict", {"inputs": [long, "a dull mess ."]})
    assert status == 200 and [r["truncated"] for r in body["results"]] == [True, False]
    assert_same(body["results"][0], Predictor(tiny_runs["sst2"])([long])[0])
    status, body = call(servers["ud_pos"], "/predict", {"inputs": " ".join(["word"] * 100)})
    result = body["results"][0]
    assert status == 200 and result["truncated"] and len(result["tags"]) == 100
    assert result["probabilities"][-1] is None and result["tags"][-1] == TASKS["ud_pos"].default_tag


@pytest.fixture(scope="module")
def stsb_run(tiny_vocab, tmp_path_factory) -> Path:
    """A tiny BERT (random init) on 500 STS-B pairs: a sentence-pair regression run, trained in seconds."""
    return finished_run("finetune/glue-stsb", tmp_path_factory.mktemp("stsb") / "stsb", "model.encoder=null",
                        "model.preset=tiny", f"model.vocab_dir={tiny_vocab}", "task.max_len=64", "task.max_train=500",
                        "task.max_eval=50", "trainer.batch_size=32", "trainer.max_epochs=1", "trainer.lr=2e-3")


def test_a_pair_run_serves_scores_equal_to_predict_pair(stsb_run, cli):
    """STS-B: `{"a", "b"}` inputs get the score `bertpipe predict --pair` prints, a text gets a 422."""
    pairs = [("A man is playing a guitar.", "A man plays the guitar."),
             ("A woman slices an onion.", "Two dogs run on the beach.")]
    code, out, err = cli("predict", "--run", stsb_run, *(x for a, b in pairs for x in ("--pair", a, b)))
    assert code == 0, err
    lines = [line.split("\t") for line in out.splitlines()]
    assert [tuple(line[1:]) for line in lines] == pairs
    with Running(ServeConfig(run=str(stsb_run), port=0)) as url:
        status, meta = call(url, "/metadata")
        assert status == 200 and meta["input"] == "pair" and meta["task_kind"] == "regress"
        status, body = call(url, "/predict", {"inputs": [{"a": a, "b": b} for a, b in pairs]})
        assert status == 200
        for served, line, (a, b) in zip(body["results"], lines, pairs, strict=True):
            assert (served["text_a"], served["text_b"]) == (a, b) and not served["truncated"]
            assert abs(served["score"] - float(line[0])) <= TOLERANCE and "label" not in served
        status, body = call(url, "/predict", {"inputs": "just one sentence"})
        assert status == 422 and "takes a pair" in body["error"]


# ---- dynamic batching under load -------------------------------------------------------------------------


async def _load(url: str, requests: list[list[str]], clients: int) -> list[tuple[int, dict]]:
    """Send every request (a list of texts) from `clients` concurrent connections; (status, body) in order."""
    answers: list = [None] * len(requests)
    queue: asyncio.Queue = asyncio.Queue()
    for i in range(len(requests)):
        queue.put_nowait(i)

    async def client(session: aiohttp.ClientSession) -> None:
        while not queue.empty():
            i = queue.get_nowait()
            async with session.post(url + "/predict", json={"inputs": requests[i]}) as response:
                answers[i] = (response.status, await response.json())

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients)) as session:
        await asyncio.gather(*(client(session) for _ in range(clients)))
    return answers


def separated(results: list[dict], gap: float) -> list[dict]:
    """Results whose positive probabilities are all more than `gap` apart: answers that cannot be mistaken for
    one another (a tiny model's probabilities crowd around 0.5, many equal to 4 places)."""
    kept: list[dict] = []
    for r in sorted(results, key=lambda r: r["probabilities"]["positive"]):
        if not kept or r["probabilities"]["positive"] - kept[-1]["probabilities"]["positive"] > gap:
            kept.append(r)
    return kept


def test_concurrent_clients_each_get_their_own_answer(servers, tiny_runs, dev_sentences):
    """32 clients send 400 requests of dev sentences whose answers all differ (a quarter of the requests three
    texts, the rest one): every answer is its own request's, equal to the unbatched prediction, and the server
    really batched across requests."""
    expected = {r["text"]: r for r in separated(Predictor(tiny_runs["sst2"], batch_size=1)(dev_sentences),
                                                 2 * TOLERANCE)}
    pool = list(expected)
    assert len(pool) >= 80, f"only {len(pool)} distinguishable answers"
    requests = [[pool[(3 * i + k) % len(pool)] for k in range(3 if i % 4 == 0 else 1)] for i in range(400)]
    before = metric_values(servers["sst2"])
    answers = asyncio.run(_load(servers["sst2"], requests, CLIENTS))

    for sent, (status, body) in zip(requests, answers, strict=True):
        assert status == 200, body
        assert [r["text"] for r in body["results"]] == sent
        for result in body["results"]:
            assert_same(result, expected[result["text"]])
    after = metric_values(servers["sst2"])
    batches = after[("bertpipe_batch_size_count", ())] - before[("bertpipe_batch_size_count", ())]
    inputs = after[("bertpipe_batch_size_sum", ())] - before[("bertpipe_batch_size_sum", ())]
    assert inputs == sum(map(len, requests))
    assert inputs / batches > 2, f"{batches:.0f} batches for {inputs:.0f} inputs: no dynamic batching"
    key = ("bertpipe_requests_total", (("endpoint", "/predict"), ("status", "200")))
    assert after[key] - before.get(key, 0) == len(requests)


# ---- bad requests ----------------------------------------------------------------------------------------

BAD = {  # name -> (body as bytes or JSON, headers or None, status, what the error must say)
    "invalid JSON": (b'{"inputs": "a dull', None, 400, "not valid JSON at character 11"),
    "no body": (b"", None, 422, "body: empty"),
    "not UTF-8": ('{"inputs": "caf\xe9"}'.encode("latin-1"), None, 400, "not valid UTF-8"),
    "not sent as JSON": (b'{"inputs": "fine"}', {"Content-Type": "text/plain"}, 415, "Content-Type: application/json"),
    "not an object": ([1, 2], None, 422, "expected a JSON object"),
    "missing inputs": ({"text": "fine"}, None, 422, "inputs: missing"),
    "a number": ({"inputs": 5}, None, 422, "inputs: a number"),
    "a number in a list": ({"inputs": ["fine", 7]}, None, 422, "inputs[1]: a number"),
    "an unknown object": ({"inputs": {"sentence": "fine"}}, None, 422, "an object with keys 'sentence'"),
    "a pair to a single-text run": ({"inputs": {"a": "fine", "b": "good"}}, None, 422, "takes a text, not a pair"),
    "a question to a single-text run": ({"inputs": {"question": "q?", "context": "c."}}, None, 422,
                                        "takes a text, not a question"),
    "pretokenized not a boolean": ({"inputs": "fine", "pretokenized": "maybe"}, None, 422, "pretokenized"),
    "an empty text": ({"inputs": "   "}, None, 422, "inputs: empty text"),
    "an empty text in a list": ({"inputs": ["fine", ""]}, None, 422, "inputs[1]: empty text"),
    "an empty list": ({"inputs": []}, None, 422, "inputs: empty list"),
    "10,000 texts": ({"inputs": ["fine"] * 10_000}, None, 413, "10,000 in one request"),
    "a 2 MB body": ({"inputs": "fine " * 400_000}, None, 413, "over this server's limit of 1,000,000"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_a_bad_request_gets_a_4xx_naming_the_problem(servers, name):
    body, headers, status, says = BAD[name]
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    got, answer = call(servers["sst2"], "/predict", raw=raw, headers=headers)
    assert got == status, answer
    assert set(answer) == {"error", "status"} and answer["status"] == status and says in answer["error"], answer
    assert "\n" not in answer["error"] and len(answer["error"]) < 200
    assert call(servers["sst2"], "/predict", {"inputs": "still serving ."})[0] == 200


def test_a_chunked_body_over_the_limit_is_refused_too(servers):
    """No Content-Length to check up front: the limit applies to the bytes as they arrive."""
    def chunks():
        yield b'{"inputs": "'
        for _ in range(2_000):
            yield b"fine " * 200
        yield b'"}'

    request = urllib.request.Request(servers["sst2"] + "/predict", data=chunks(),
                                     headers={"Content-Type": "application/json", "Transfer-Encoding": "chunked"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=60)
    assert err.value.code == 413 and "limit" in json.loads(err.value.read())["error"]


def test_errors_are_counted_and_unknown_paths_are_json_404s(servers):
    before = metric_values(servers["sst2"])
    assert call(servers["sst2"], "/predict", {"inputs": ""})[0] == 422
    status, body = call(servers["sst2"], "/nowhere")
    assert status == 404 and body["status"] == 404
    after = metric_values(servers["sst2"])
    key = ("bertpipe_request_errors_total", (("endpoint", "/predict"), ("status", "422")))
    assert after[key] == before.get(key, 0) + 1
    assert after[("bertpipe_request_errors_total", (("endpoint", "other"), ("status", "404")))] >= 1


# ---- health, metadata, metrics, OpenAPI ------------------------------------------------------------------


def test_health_metadata_metrics_and_openapi(servers, tiny_runs):
    url = servers["sst2"]
    assert call(url, "/health") == (200, {"status": "ok", "task": "sst2"})
    status, meta = call(url, "/metadata")
    results = json.loads((tiny_runs["sst2"] / "results.json").read_text())
    assert status == 200 and meta["task"] == "sst2" and meta["task_kind"] == "classify" and meta["input"] == "text"
    assert meta["labels"] == ["negative", "positive"] and meta["max_len"] == 64
    assert meta["model"] == results["model"] and meta["model"]["size"] == "tiny"
    assert meta["inputs"] == results["inputs"] and meta["inputs"]["train"][0]["sha256"]
    assert meta["params"] == results["params"] and meta["metrics"] == results["metrics"]
    assert meta["server"]["max_batch"] == 32 and meta["server"]["max_inputs"] == 256
    assert call(servers["ud_pos"], "/metadata")[1]["task_kind"] == "tag"
    assert call(servers["multi30k"], "/metadata")[1]["task_kind"] == "translate"

    call(url, "/predict", {"inputs": ["fine .", "bad ."]})
    samples = metric_values(url)
    assert samples[("bertpipe_requests_total", (("endpoint", "/predict"), ("status", "200")))] >= 1
    assert samples[("bertpipe_request_seconds_count", (("endpoint", "/predict"),))] >= 1
    assert samples[("bertpipe_inputs_total", ())] >= 2 and ("bertpipe_batch_size_bucket", (("le", "1.0"),)) in samples
    assert samples[("bertpipe_model_info", (("model_kind", "bert"), ("size", "tiny"), ("task", "sst2"),
                                            ("task_kind", "classify")))] == 1

    status, schema = call(url, "/openapi.json")
    assert status == 200 and {"/predict", "/health", "/metadata", "/metrics"} <= set(schema["paths"])
    body = schema["paths"]["/predict"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["$ref"].endswith("/PredictRequest")
    components = schema["components"]["schemas"]
    assert {"Pair", "QuestionContext", "PredictResponse", "ErrorResponse"} <= set(components)
    assert {"413", "422"} <= set(schema["paths"]["/predict"]["post"]["responses"])


def test_the_page_is_served(servers):
    status, page = call(servers["sst2"], "/")
    assert status == 200 and "<form" in page and 'fetch("predict"' in page


def test_inputs_are_logged_only_when_asked(tiny_runs, caplog):
    secret = "the zebra of quartz sang backwards ."
    caplog.set_level(logging.INFO)
    for log_inputs in (False, True):
        caplog.clear()
        with Running(ServeConfig(run=str(tiny_runs["sst2"]), port=0, log_inputs=log_inputs), quiet=False) as url:
            assert call(url, "/predict", {"inputs": secret})[0] == 200
            assert call(url, "/predict", {"inputs": [secret, 5]})[0] == 422
        assert "POST /predict" in caplog.text  # the access log
        assert (secret in caplog.text) == log_inputs, caplog.text


# ---- the command -----------------------------------------------------------------------------------------


def test_bertpipe_serve_listens_on_loopback_and_stops_on_sigterm(tiny_runs, tmp_path):
    secret = "a secret sentence nobody should log ."
    command = [sys.executable, "-m", "pipeline.cli", "serve", "--run", str(tiny_runs["sst2"]), "--port", "0"]
    with open(tmp_path / "serve.log", "w") as stderr, subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=stderr, text=True, start_new_session=True) as proc:
        try:
            line = proc.stdout.readline()  # "serving RUN on http://127.0.0.1:PORT/ ..."
            assert "http://127.0.0.1:" in line, (line, (tmp_path / "serve.log").read_text())
            url = line.split(" on ")[1].split("/ ")[0]
            assert call(url, "/predict", {"inputs": secret})[0] == 200
            assert call(url, "/predict", {"inputs": [secret, ""]})[0] == 422
            listening = [c.laddr for c in psutil.Process(proc.pid).net_connections()
                         if c.status == psutil.CONN_LISTEN]
            assert [a.ip for a in listening] == ["127.0.0.1"]
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    log = (tmp_path / "serve.log").read_text()
    assert "POST /predict" in log and secret not in log and "Traceback" not in log
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url + "/health", timeout=5)


def test_bertpipe_serve_refuses_what_it_cannot_serve_in_one_line(cli, tmp_path, tiny_runs):
    code, _, err = cli("serve", "--run", tmp_path)
    assert code == 1 and "not a finetune run directory" in err and len(err.strip().splitlines()) == 1
    code, _, err = cli("serve", "--run", tiny_runs["sst2"], "--max-batch", "0")
    assert code == 1 and "--max-batch" in err and len(err.strip().splitlines()) == 1
    if not torch.cuda.is_available():
        code, _, err = cli("serve", "--run", tiny_runs["sst2"], "--device", "cuda")
        assert code == 1 and "no CUDA GPU" in err and len(err.strip().splitlines()) == 1
    with Running(ServeConfig(run=str(tiny_runs["sst2"]), port=0)) as url:
        port = url.rsplit(":", 1)[1]
        start = time.perf_counter()
        code, _, err = cli("serve", "--run", tiny_runs["sst2"], "--port", port, "--quiet")
        assert code == 1 and f"cannot listen on 127.0.0.1:{port}" in err and len(err.strip().splitlines()) == 1
        assert time.perf_counter() - start < 60


@pytest.mark.slow
def test_serve_sbatch_serves_from_a_compute_node_until_scancel(slurm, tiny_runs, tmp_path):
    """slurm/serve.sbatch on a real slurmd: the log names the port, the server answers, scancel's SIGTERM stops
    it after the requests in flight and the job ends."""
    (tmp_path / "logs").mkdir()
    env = {**slurm.env, "BERTPIPE_HOME": str(ROOT), "BERTPIPE": str(Path(sys.executable).parent / "bertpipe"),
           "RUN": str(tiny_runs["sst2"]), "PORT": "0"}
    sub = subprocess.run(["sbatch", "--parsable", f"--chdir={tmp_path}", "--cpus-per-task=2",
                          str(ROOT / "slurm/serve.sbatch")], capture_output=True, text=True, env=env)
    assert sub.returncode == 0, sub.stderr
    job = sub.stdout.strip().split(";")[0]
    log = tmp_path / "logs" / f"bertpipe-serve-{job}.out"
    deadline, url = time.time() + 300, None
    while time.time() < deadline and url is None:
        assert slurm.job(job)["JobState"] in ("PENDING", "RUNNING"), (slurm.job(job), log.read_text())
        serving = [line for line in log.read_text().splitlines() if line.startswith("serving ")] if log.exists() else []
        url = serving[0].split(" on ")[1].split("/ ")[0] if serving else None
        time.sleep(0.3)
    assert url and url.startswith("http://127.0.0.1:"), log.read_text()
    status, body = call(url, "/predict", {"inputs": "a gorgeous , witty , seductive movie ."})
    assert status == 200 and body["results"][0]["label"] in ("negative", "positive")
    slurm.run("scancel", job)
    slurm.wait([job], states=("CANCELLED", "COMPLETED"), timeout=120)
    text = log.read_text()
    assert "ssh -N -L 8000:127.0.0.1:<port>" in text and "stopped by SIGTERM" in text, text
