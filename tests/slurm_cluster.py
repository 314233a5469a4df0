"""A real single-node SLURM (munged, slurmctld, slurmd on localhost) started and stopped by the tests.

Needs root (the daemons run as root here) and Debian's slurm packages, which it installs with apt-get when
they are missing. Its config, state and spool live in a temporary directory; clients find it through
SLURM_CONF.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import psutil

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]


class Unavailable(Exception):
    """SLURM cannot be started here (no root, no apt): the tests skip with this message."""


def _install() -> None:
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged")):
        return
    if not shutil.which("apt-get"):
        raise Unavailable("slurm is not installed and apt-get is missing")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=False, capture_output=True, env=env)
    proc = subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise Unavailable(f"apt-get install {' '.join(PACKAGES)} failed: {proc.stderr.strip()[-300:]}")


def _start_munge() -> None:
    if any(p.info["name"] == "munged" for p in psutil.process_iter(["name"])):
        return
    for d in ("/run/munge", "/var/log/munge", "/var/lib/munge"):
        os.makedirs(d, exist_ok=True)
        shutil.chown(d, "munge", "munge")
    if not Path("/etc/munge/munge.key").exists():
        subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/mungekey", "--create"], check=True)
    subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True)


class Cluster:
    def __init__(self, root: Path):
        self.root = root
        self.host = socket.gethostname().split(".")[0]
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def write_conf(self) -> None:
        for d in ("state", "spool", "run", "log"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        memory = int(psutil.virtual_memory().total / 2**20 * 0.8)
        self.conf.write_text(f"""\
ClusterName=bertpipe-test
SlurmctldHost={self.host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation={self.root}/state
SlurmdSpoolDir={self.root}/spool
SlurmctldPidFile={self.root}/run/slurmctld.pid
SlurmdPidFile={self.root}/run/slurmd.pid
SlurmctldLogFile={self.root}/log/slurmctld.log
SlurmdLogFile={self.root}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
MpiDefault=none
MinJobAge=3600
KillWait=30
NodeName={self.host} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} RealMemory={memory} State=UNKNOWN
PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP
""")

    def start(self) -> None:
        _install()
        if os.geteuid() != 0:
            raise Unavailable("starting slurmctld and slurmd needs root")
        _start_munge()
        self.write_conf()
        subprocess.run(["/usr/sbin/slurmctld", "-i", "-f", str(self.conf)], check=True, env=self.env)
        subprocess.run(["/usr/sbin/slurmd", "-f", str(self.conf)], check=True, env=self.env)
        deadline = time.time() + 60
        while time.time() < deadline:
            out = self.run("sinfo", "-h", "-o", "%T", check=False).stdout.strip()
            if out in ("idle", "mixed", "allocated"):
                return
            time.sleep(0.5)
        raise RuntimeError(f"slurmd did not come up: sinfo says {out!r}")

    def stop(self) -> None:
        for name in ("slurmd", "slurmctld"):
            pid_file = self.root / "run" / f"{name}.pid"
            if pid_file.exists():
                pid = int(pid_file.read_text().split()[0])
                try:
                    os.kill(pid, signal.SIGTERM)
                    psutil.Process(pid).wait(timeout=30)
                except (ProcessLookupError, psutil.NoSuchProcess):
                    pass

    def run(self, *args: str, check: bool = True, cwd: str | Path | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), capture_output=True, text=True, env=self.env, check=check, cwd=cwd)

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, ExitCode, Restarts, ...)."""
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(item.split("=", 1) for item in out.split() if "=" in item)

    def states(self, job_id: str) -> list[str]:
        """The JobState of a job, or of every task of an array job (one line each in `scontrol show job`)."""
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return [item.split("=", 1)[1] for line in out.splitlines() for item in line.split()
                if item.startswith("JobState=")]

    def wait(self, job_ids: list[str], states=("COMPLETED",), timeout: float = 900) -> dict[str, str]:
        """Wait until every job (every task of an array) is in a final state; return each job's state: the
        first task's state that is not COMPLETED, else COMPLETED."""
        final = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED"}
        deadline = time.time() + timeout
        while time.time() < deadline:
            now = {j: self.states(j) or ["?"] for j in job_ids}
            if all(s in final for tasks in now.values() for s in tasks):
                return {j: next((s for s in tasks if s != "COMPLETED"), "COMPLETED") for j, tasks in now.items()}
            time.sleep(1)
        raise TimeoutError(f"jobs still not finished: {now}")
