"""The suite's preloaded ranks (tests/preload.py) behave as fresh interpreters would, as torchrun sees them:
argv, working directory, ``sys.path[0]``, environment, ``__main__``, distinct hash seeds and random
state per rank, exit codes and signals; a rank whose client is killed dies with it; an environment
the preloaded modules did not see gets a fresh interpreter."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest

from launch import REPO, torchrun

PROBE = REPO / "tests" / "workers" / "preload_probe.py"

pytestmark = [pytest.mark.distributed,
              pytest.mark.skipif(os.environ.get("HYBRIDQUANT_TEST_PRELOAD") == "0", reason="preloading is off")]


def ranks(out_dir, n):
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(n)]


def test_a_preloaded_rank_sees_what_a_fresh_one_would(tmp_path):
    proc = torchrun(PROBE, [str(tmp_path), "--flag", "x y"], nproc=2, extra_env={"HYBRIDQUANT_PROBE": "v1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 0 wrote rank0.json" in proc.stdout and "rank 1 wrote rank1.json" in proc.stdout
    seen = ranks(tmp_path, 2)
    for rank, s in enumerate(seen):
        assert s["preloaded"], "the rank was not forked from the preload server"
        assert s["argv"] == [str(PROBE), str(tmp_path), "--flag", "x y"]
        assert s["main"] == str(PROBE) and s["path0"] == str(PROBE.parent) and s["cwd"] == str(REPO)
        assert s["env"] == {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "HYBRIDQUANT_PROBE": "v1"}
    # Each rank its own string-hash seed and random state, as separate interpreters have.
    assert seen[0]["hash"] != seen[1]["hash"] and seen[0]["random"] != seen[1]["random"]
    again = tmp_path / "again"
    again.mkdir()
    assert torchrun(PROBE, [str(again)], nproc=1).returncode == 0
    assert ranks(again, 1)[0]["random"] != seen[0]["random"]  # reseeded in every fork


def test_exit_codes_and_signals_reach_torchrun(tmp_path):
    proc = torchrun(PROBE, [str(tmp_path)], nproc=2, extra_env={"HYBRIDQUANT_PROBE_END": "0,3"})
    assert proc.returncode != 0
    assert "exitcode  : 3" in proc.stderr, proc.stderr[-3000:]
    proc = torchrun(PROBE, [str(tmp_path)], nproc=2, extra_env={"HYBRIDQUANT_PROBE_END": "0,kill"})
    assert proc.returncode != 0
    assert "exitcode  : -9" in proc.stderr and "SIGKILL" in proc.stderr, proc.stderr[-3000:]
    assert all(s["preloaded"] for s in ranks(tmp_path, 2))


def test_a_rank_ends_when_its_process_is_killed(tmp_path):
    """torchrun's worker process is the client: SIGKILL it (as torchrun does to a worker that ignores
    SIGTERM, or the OOM killer) and the rank forked for it ends too, and torchrun reports the kill."""
    result = {}
    job = threading.Thread(target=lambda: result.update(proc=torchrun(
        PROBE, [str(tmp_path)], nproc=2, timeout=120, extra_env={"HYBRIDQUANT_PROBE_END": "sleep"})))
    job.start()
    deadline = time.monotonic() + 60
    while len(list(tmp_path.glob("rank*.json"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(0.5)  # both files written completely
    seen = ranks(tmp_path, 2)
    assert all(s["preloaded"] for s in seen)
    clients = _clients_of(tmp_path)
    assert len(clients) == 2, clients
    for pid in clients:
        os.kill(pid, signal.SIGKILL)
    job.join(timeout=90)
    assert not job.is_alive() and result["proc"].returncode != 0
    assert "SIGKILL" in result["proc"].stderr, result["proc"].stderr[-3000:]
    deadline = time.monotonic() + 30
    while any(_alive(s["pid"]) for s in seen) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [s["pid"] for s in seen if _alive(s["pid"])], "a forked rank outlived its process"


def test_an_environment_the_preload_did_not_see_gets_a_fresh_interpreter(tmp_path):
    proc = torchrun(PROBE, [str(tmp_path)], nproc=1, extra_env={"TOKENIZERS_PARALLELISM": "probe"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    (seen,) = ranks(tmp_path, 1)
    assert not seen["preloaded"]
    assert seen["argv"] == [str(PROBE), str(tmp_path)] and seen["main"] == str(PROBE)


def _clients_of(out_dir) -> list[int]:
    """The client processes (``python -u tests/preload.py PROBE OUT_DIR``) of the job writing to ``out_dir``."""
    pids = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = open(f"/proc/{entry}/cmdline", "rb").read().decode().split("\0")
        except OSError:
            continue
        if argv[2:5] == [str(REPO / "tests" / "preload.py"), str(PROBE), str(out_dir)]:
            pids.append(int(entry))
    return pids


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped) is not alive
        return open(f"/proc/{pid}/stat").read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False
