"""Run the project's real entry points as subprocesses (torchrun for multi-rank), as a user would."""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import preload
from hybridquant.parallel import free_port

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
TORCHRUN_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def run_stage(stage: str, overrides: list[str], nproc: int = 1, timeout: int = 600,
              extra_env: dict | None = None) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node=nproc pipeline/<stage>.py overrides`` (``torchrun``)."""
    return torchrun(REPO / "pipeline" / f"{stage}.py", overrides, nproc, timeout, extra_env)


def torchrun(script: Path, args: list[str], nproc: int = 1, timeout: int = 600,
             extra_env: dict | None = None) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node=nproc script args``, one thread per rank, each rank forked from a
    preloaded interpreter (tests/preload.py) unless ``HYBRIDQUANT_TEST_PRELOAD=0``."""
    base = _base_env()
    env = {**base, **(extra_env or {})}
    worker = [str(script)]
    if os.environ.get("HYBRIDQUANT_TEST_PRELOAD", "1") != "0":
        worker = [str(Path(preload.__file__)), str(script)]
        env[preload.SOCKETS_ENV] = os.pathsep.join(_servers(base, min(nproc, preload.SLOTS)))
    cmd = [str(VENV_BIN / "torchrun"), f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
           *worker, *args]
    return _run_in_own_session(cmd, env, timeout)


def _base_env() -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in TORCHRUN_KEYS:
        env.pop(key, None)
    return env


_SERVERS: list[tuple[subprocess.Popen, str]] = []


def _servers(env: dict, count: int) -> list[str]:
    """Sockets of this process's first ``count`` preload servers, started on first use (~12 s each)."""
    while len(_SERVERS) < count:
        if not _SERVERS:
            atexit.register(_stop_servers)
        root = tempfile.mkdtemp(prefix="hq-preload-")
        path = os.path.join(root, "socket")
        with open(os.path.join(root, "log"), "w") as log:
            proc = subprocess.Popen([sys.executable, "-u", preload.__file__, "--serve", path], cwd=REPO, env=env,
                                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        _SERVERS.append((proc, path))
    for proc, path in _SERVERS[:count]:
        deadline = time.monotonic() + 300
        while not os.path.exists(path):
            if proc.poll() is not None or time.monotonic() > deadline:
                log = Path(path).with_name("log").read_text()[-3000:]
                raise RuntimeError(f"the preload server did not start (HYBRIDQUANT_TEST_PRELOAD=0 runs without): {log}")
            time.sleep(0.1)
    return [path for _, path in _SERVERS[:count]]


def _stop_servers() -> None:
    import shutil

    for proc, path in _SERVERS:
        proc.kill()
        proc.wait()
        shutil.rmtree(os.path.dirname(path), ignore_errors=True)


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
    for key in TORCHRUN_KEYS:
        env.pop(key, None)
    return subprocess.run([sys.executable, str(REPO / script), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in (proc.stderr + proc.stdout).splitlines() if line.startswith("error:")]
