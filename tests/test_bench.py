"""Every benchmark under bench/ starts: `--help` answers from each script, run as the README runs it."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import ROOT

BENCH = ROOT / "bench"
SCRIPTS = sorted(p for p in BENCH.glob("*.py") if p.name != "common.py")


def test_no_benchmark_shadows_a_package_of_the_project():
    # `python bench/x.py` puts bench/ first on sys.path: a bench/recipes.py made `import recipes` find itself
    assert not {p.stem for p in BENCH.glob("*.py")} & {"pipeline", "recipes", "tokenization", "tests"}


@pytest.mark.slow
def test_every_benchmark_answers_help():
    procs = {p.name: subprocess.Popen([sys.executable, str(p), "--help"], cwd=ROOT, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True) for p in SCRIPTS}
    failed = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        if proc.returncode != 0 or "usage:" not in out:
            failed[name] = (err or out).strip().splitlines()[-1:]
    assert len(SCRIPTS) >= 15 and not failed, failed
