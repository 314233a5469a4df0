"""A real two-node SLURM on localhost (munged, slurmctld, and one slurmd per node) started and stopped by the tests.

The nodes n1 and n2 are two `slurmd -N NAME` daemons on 127.0.0.1, each on its own port with its own spool,
pid and log file, and, where `unshare` is allowed, its own hostname (a UTS namespace), so a job step sees
`hostname` n1 or n2 as on a cluster. Needs root (the daemons run as root here) and Debian's slurm packages,
which it installs with apt-get when they are missing. Its config, state and spool live in a temporary
directory; clients find it through SLURM_CONF.
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
NODES = {"n1": 16818, "n2": 16819}  # node name: slurmd port (fixed: run SLURM tests under the flock)


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
        for d in ("state", "run", "log", *(f"spool/{n}" for n in NODES)):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        memory = int(psutil.virtual_memory().total / 2**20 * 0.8 / len(NODES))
        nodes = "\n".join(f"NodeName={name} NodeHostname={self.host} NodeAddr=127.0.0.1 Port={port} "
                          f"CPUs={os.cpu_count()} RealMemory={memory} State=UNKNOWN" for name, port in NODES.items())
        self.conf.write_text(f"""\
ClusterName=bertpipe-test
SlurmctldHost={self.host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation={self.root}/state
SlurmdSpoolDir={self.root}/spool/%n
SlurmctldPidFile={self.root}/run/slurmctld.pid
SlurmdPidFile={self.root}/run/slurmd-%n.pid
SlurmctldLogFile={self.root}/log/slurmctld.log
SlurmdLogFile={self.root}/log/slurmd-%n.log
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
{nodes}
PartitionName=debug Nodes={",".join(NODES)} Default=YES MaxTime=INFINITE State=UP
""")

    def start(self) -> None:
        _install()
        if os.geteuid() != 0:
            raise Unavailable("starting slurmctld and slurmd needs root")
        _start_munge()
        self.write_conf()
        subprocess.run(["/usr/sbin/slurmctld", "-i", "-f", str(self.conf)], check=True, env=self.env)
        own_hostname = subprocess.run(["unshare", "--uts", "true"], capture_output=True).returncode == 0
        for name in NODES:
            slurmd = f"exec /usr/sbin/slurmd -f {self.conf} -N {name}"
            command = ["unshare", "--uts", "sh", "-c", f"hostname {name} && {slurmd}"] if own_hostname \
                else ["sh", "-c", slurmd]
            subprocess.run(command, check=True, env=self.env)
        # a second slurmd that failed to bind its port still shows as idle in sinfo: wait for every pid file
        pid_files = [self.root / "run" / f"slurmd-{name}.pid" for name in NODES]
        deadline = time.time() + 60
        states = []
        while time.time() < deadline:
            states = self.run("sinfo", "-h", "-N", "-o", "%T", check=False).stdout.split()
            if all(p.exists() for p in pid_files) and len(states) == len(NODES) and \
                    all(s in ("idle", "mixed", "allocated") for s in states):
                return
            time.sleep(0.5)
        raise RuntimeError(f"the slurmd daemons did not come up: sinfo says {states!r}, pid files "
                           f"{[p.name for p in pid_files if p.exists()]}")

    def stop(self) -> None:
        for name in (*(f"slurmd-{n}" for n in NODES), "slurmctld"):
            pid_file = self.root / "run" / f"{name}.pid"
            if pid_file.exists():
                pid = int(pid_file.read_text().split()[0])
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    continue
                # stopped once its pid file is gone or it is a zombie (PID 1 may reap it late here)
                deadline = time.time() + 30
                while time.time() < deadline and pid_file.exists():
                    try:
                        if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                            break
                    except psutil.NoSuchProcess:
                        break
                    time.sleep(0.1)

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
