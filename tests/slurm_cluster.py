"""The local single-node SLURM cluster the SLURM tests run against (slurm/local_cluster.sh), and small
helpers to submit to it as a user would: sbatch, sacct, launch/submit.py."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "slurm" / "local_cluster.sh"
# The local cluster has CPUs only: no GPU request, one CPU per rank.
CPU = ["cluster=slurm", "cluster.gpus_per_node=null", "cluster.cpus_per_task=1", "cluster.time_min=15"]
# A quantize run small enough for a test: a few short calibration samples.
SMALL = ["calib.num_samples=2", "calib.max_seq_len=32", "probe_samples=1"]


def start() -> tuple[bool, str]:
    """Start the cluster (installing its packages if needed); (was it already running, log)."""
    running = subprocess.run([str(SCRIPT), "status"], capture_output=True).returncode == 0
    proc = subprocess.run([str(SCRIPT), "start"], capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"the local SLURM cluster did not start (slurm/local_cluster.sh start, exit "
                           f"{proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return running, proc.stderr


def stop() -> None:
    subprocess.run([str(SCRIPT), "stop"], capture_output=True, timeout=120)


def env(**extra: str) -> dict:
    """The submitter's environment: jobs inherit it (sbatch --export=ALL), venv first on PATH."""
    e = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1",
         "HQ_PYTHON": sys.executable, **extra}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"):
        e.pop(key, None)
    return e


def submit_stage(stage: str, overrides: list[str], cwd: Path, extra_env: dict | None = None, args=(),
                 timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "launch" / "submit.py"), *args, stage, *overrides],
                          cwd=cwd, env=env(**(extra_env or {})), capture_output=True, text=True, timeout=timeout)


def sbatch(args: list[str], cwd: Path, extra_env: dict | None = None, timeout: int = 600) -> str:
    """Submit and wait (sbatch --wait); returns the job id whatever the outcome."""
    proc = subprocess.run(["sbatch", "--parsable", "--wait", *args], cwd=cwd, env=env(**(extra_env or {})),
                          capture_output=True, text=True, timeout=timeout)
    match = re.match(r"^(\d+)", proc.stdout.strip())
    assert match, f"sbatch printed no job id: {proc.stdout!r} {proc.stderr!r}"
    return match.group(1)


def states(job_id: str, settle_s: float = 30.0) -> dict[str, str]:
    """sacct's state of every allocation of the job (array tasks as <job>_<i>), once none is pending/running."""
    deadline = time.monotonic() + settle_s
    while True:
        out = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "JobID,State"],
                             capture_output=True, text=True).stdout
        rows = dict(line.split("|")[:2] for line in out.splitlines() if line)
        if rows and all(s.split()[0] not in ("PENDING", "RUNNING", "COMPLETING") for s in rows.values()):
            return {k: v.split()[0] for k, v in rows.items()}
        if time.monotonic() > deadline:
            return {k: v.split()[0] for k, v in rows.items()}
        time.sleep(0.5)


def step_tasks(job_id: str) -> dict[str, int]:
    """Number of tasks of each job step (``<job>.0`` ...)."""
    out = subprocess.run(["sacct", "-n", "-P", "-j", job_id, "-o", "JobID,NTasks"], capture_output=True,
                         text=True).stdout
    return {k: int(v) for k, v in (line.split("|")[:2] for line in out.splitlines() if line) if v.isdigit()}
