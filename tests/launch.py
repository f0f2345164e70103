"""Run the project's real entry points as subprocesses (torchrun for multi-rank), as a user would."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from hybridquant.parallel import free_port

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def run_stage(stage: str, overrides: list[str], nproc: int = 1, timeout: int = 600,
              extra_env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [str(VENV_BIN / "torchrun"), f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
           str(REPO / "pipeline" / f"{stage}.py"), *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(extra_env or {})}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return _run_in_own_session(cmd, env, timeout)


def _run_in_own_session(cmd: list[str], env: dict, timeout: int) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own process group, output to files, and end what it leaves behind: a rank killed
    by a fault test orphans its helpers (multiprocessing's resource tracker, the checkpoint writer's
    queue manager), which would hold captured pipes open and outlive the test."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=err, text=True, start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(cmd, proc.returncode, out.read(), err.read())


def run_python(script: str, args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return subprocess.run([sys.executable, str(REPO / script), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in (proc.stderr + proc.stdout).splitlines() if line.startswith("error:")]
