"""Loader workers ignore SLURM's signals, yet never keep the process from exiting."""

import subprocess
import sys
import textwrap

import pytest

# an iterator left alive at exit (as a traceback keeps it), its workers mid-epoch
_LEFT_ALIVE = textwrap.dedent("""
    from pipeline.workers import SignalSafeLoader
    batches = iter(SignalSafeLoader(list(range(4096)), batch_size=8, num_workers=2, persistent_workers=True))
    next(batches), next(batches)
    print("workers", *(w.pid for w in batches._workers), flush=True)
""")


@pytest.mark.parametrize("how", ["returns", "raises"])
def test_a_process_with_live_workers_exits_when_its_script_ends(how):
    script = _LEFT_ALIVE + ("raise SystemExit('stopped with one line')\n" if how == "raises" else "")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.stdout.startswith("workers ")
    assert done.returncode == (1 if how == "raises" else 0), done.stderr
    for pid in done.stdout.split()[1:]:  # and the workers are gone
        assert subprocess.run(["kill", "-0", pid], capture_output=True).returncode != 0
