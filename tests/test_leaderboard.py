"""The leaderboard: every results.json under a folder, ranked per task, as Markdown, CSV and a bar chart."""

from __future__ import annotations

import csv
import json

import pytest

from pipeline.errors import BertpipeError
from pipeline.leaderboard import gather


def result(directory, task, kind, metrics, **extra):
    directory.mkdir(parents=True)
    (directory / "results.json").write_text(json.dumps({
        "task": task, "split": "dev", "metrics": metrics, "model": {"kind": kind, "size": "tiny"},
        "params": 1000, "train_seconds": 12.5, "examples_per_second": 80.0, "inputs": {}, **extra}))


def test_runs_are_ranked_per_task_and_written_three_ways(tmp_path, cli):
    result(tmp_path / "sst2-lstm", "sst2", "lstm", {"accuracy": 0.71, "f1": 0.70})
    result(tmp_path / "sst2-bert", "sst2", "bert", {"accuracy": 0.80, "f1": 0.79}, main_metric="accuracy")
    result(tmp_path / "deep" / "ner-gru", "conll2003", "gru", {"f1": 0.55, "accuracy": 0.9})
    result(tmp_path / "ae", "digits", "vae", {"reconstruction_mse": 0.02})
    result(tmp_path / "ae2", "digits", "undercomplete", {"reconstruction_mse": 0.01})
    rows = gather(tmp_path)
    assert [(r["task"], r["model"]) for r in rows] == [
        ("conll2003", "gru tiny"), ("digits", "undercomplete tiny"), ("digits", "vae tiny"),
        ("sst2", "bert tiny"), ("sst2", "lstm tiny")]
    assert rows[0]["metric"] == "f1" and rows[1]["higher_is_better"] is False and rows[0]["run"] == "deep/ner-gru"
    assert {r["metric"] for r in rows if r["task"] == "sst2"} == {"accuracy"}  # the metric a run names, for all
    code, out, _ = cli("leaderboard", tmp_path)
    assert code == 0 and "| sst2 | bert tiny | accuracy ↑ | 0.8000 |" in out
    with open(tmp_path / "leaderboard.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 5
    png = (tmp_path / "leaderboard.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_empty_or_broken_folders_are_clear_errors(tmp_path, cli):
    with pytest.raises(BertpipeError, match="no results.json"):
        gather(tmp_path)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "results.json").write_text("{not json")
    code, _, err = cli("leaderboard", tmp_path)
    assert code == 1 and "not a readable results.json" in err
