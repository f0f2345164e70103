"""Launching on a real SLURM: a single-node cluster on localhost (slurm/local_cluster.sh: munged,
MariaDB, slurmdbd, slurmctld, slurmd), jobs submitted as users submit them (launch/submit.py with
submitit, Hydra --multirun through hydra-submitit-launcher, the sbatch templates), outputs read back,
states read from SLURM's accounting.

If the cluster cannot be installed or started, these tests fail; they never skip."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

import slurm_cluster as sc

pytestmark = [pytest.mark.distributed, pytest.mark.slurm]

REPO = Path(__file__).resolve().parents[1]
ARRAY_RECIPES = ["mamba_moe_fp8_conservative", "mamba_moe_nvfp4_aggressive"]  # two sweep points: two array tasks


@pytest.fixture(scope="module")
def slurm():
    try:
        was_running, log = sc.start()
    except (RuntimeError, subprocess.TimeoutExpired, PermissionError) as exc:
        pytest.fail(str(exc))
    print(log)
    yield
    if not was_running:  # stop only the daemons this session started (by their PID files)
        sc.stop()


def reports(root: Path) -> dict[str, dict]:
    return {p.name: json.loads((p / "report.json").read_text()) for p in sorted((root / "quantize").iterdir())
            if p.is_dir() and (p / "report.json").exists()}


def test_submitit_job_runs_a_two_rank_quantize(slurm, tmp_path):
    t0 = time.monotonic()
    proc = sc.submit_stage("quantize", [*sc.CPU, "cluster.tasks_per_node=2", "+quant=mamba_moe_fp8_conservative",
                                        "parallel.ep=2", *sc.SMALL, f"output_root={tmp_path}"], cwd=tmp_path)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    job = re.search(r"submitted SLURM job (\d+)", proc.stdout).group(1)
    print(f"submitit job {job}: {elapsed:.1f} s")
    (name, report), = reports(tmp_path).items()
    assert name == f"tiny-mamba_moe_fp8_conservative-tp1pp1ep2etp1-slurm{job}"
    assert f"run directory: {tmp_path / 'quantize' / name}" in proc.stdout
    assert report["layout"]["world_size"] == 2 and report["layout"]["ep"] == 2
    assert len(report["peak_rss_mb_per_rank"]) == 2
    assert sc.states(job) == {job: "COMPLETED"}
    assert sc.step_tasks(job).get(f"{job}.0") == 2  # srun started two tasks, one rank each


def test_multirun_sweep_becomes_an_array_job(slurm, tmp_path):
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(REPO / "pipeline" / "quantize.py"), "--multirun", *sc.CPU, "cluster.tasks_per_node=1",
         f"+quant={','.join(ARRAY_RECIPES)}", *sc.SMALL, f"output_root={tmp_path}"],
        cwd=tmp_path, env=sc.env(), capture_output=True, text=True, timeout=600)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = reports(tmp_path)
    assert len(found) == len(ARRAY_RECIPES), list(found)
    array_ids = {re.search(r"-slurm(\d+)_(\d+)$", name).group(1) for name in found}
    assert len(array_ids) == 1, found.keys()  # one array job ...
    (array,) = array_ids
    print(f"hydra-submitit array job {array}: {elapsed:.1f} s")
    for i, recipe in enumerate(ARRAY_RECIPES):  # ... one task per sweep point, each in its own directory
        report = found[f"tiny-{recipe}-tp1pp1ep1etp1-slurm{array}_{i}"]
        assert report["recipe"]["name"] == recipe
    assert sc.states(array) == {f"{array}_{i}": "COMPLETED" for i in range(len(ARRAY_RECIPES))}


def test_sbatch_stage_template_runs_srun_torchrun(slurm, tmp_path):
    t0 = time.monotonic()
    job = sc.sbatch(["--nodes=1", "--gpus-per-node=0", "--cpus-per-task=2", f"--output={tmp_path}/%j.out",
                     str(REPO / "slurm" / "stage.sbatch"), "quantize", "+quant=mamba_moe_nvfp4_aggressive",
                     "parallel.pp=2", *sc.SMALL, f"output_root={tmp_path}"],
                    cwd=REPO, extra_env={"HQ_NPROC_PER_NODE": "2"})
    print(f"sbatch job {job}: {time.monotonic() - t0:.1f} s")
    log = (tmp_path / f"{job}.out").read_text()
    assert sc.states(job) == {job: "COMPLETED"}, log[-3000:]
    (name, report), = reports(tmp_path).items()
    assert name == f"tiny-mamba_moe_nvfp4_aggressive-tp1pp2ep1etp1-slurm{job}"
    assert report["layout"]["world_size"] == 2
    assert "2 rank(s), rendezvous" in log


def test_sbatch_sweep_template_is_an_array_of_recipes(slurm, tmp_path):
    t0 = time.monotonic()
    job = sc.sbatch([f"--array=0-{len(ARRAY_RECIPES) - 1}", "--gpus-per-node=0", "--cpus-per-task=1",
                     f"--output={tmp_path}/%A_%a.out",
                     str(REPO / "slurm" / "sweep.sbatch"), *sc.SMALL, f"output_root={tmp_path}"],
                    cwd=REPO, extra_env={"HQ_RECIPES": " ".join(ARRAY_RECIPES)})
    print(f"sbatch array job {job}: {time.monotonic() - t0:.1f} s")
    assert sc.states(job) == {f"{job}_{i}": "COMPLETED" for i in range(len(ARRAY_RECIPES))}
    found = reports(tmp_path)
    assert sorted(found) == sorted(f"tiny-{r}-tp1pp1ep1etp1-slurm{job}_{i}" for i, r in enumerate(ARRAY_RECIPES))


def test_a_failing_job_is_reported_as_failed(slurm, tmp_path):
    t0 = time.monotonic()
    proc = sc.submit_stage("quantize", [*sc.CPU, "cluster.tasks_per_node=2", "+quant=mamba_moe_fp8_conservative",
                                        "parallel.ep=2", *sc.SMALL, f"output_root={tmp_path}"], cwd=tmp_path,
                           extra_env={"HYBRIDQUANT_FAULT": "1:load"}, timeout=300)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 1
    job = re.search(r"submitted SLURM job (\d+)", proc.stdout).group(1)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-2000:]
    assert f"SLURM job {job} (quantize) FAILED" in errors[0] and "injected fault at load on rank 1" in errors[0]
    assert sc.states(job) == {job: "FAILED"}
    assert not (tmp_path / "quantize").exists() or reports(tmp_path) == {}
    print(f"failed job {job} reported after {elapsed:.1f} s")


def test_a_cancelled_job_is_reported_as_cancelled(slurm, tmp_path):
    # The job hangs (as a stuck rank would) until it is cancelled.
    cmd = [sys.executable, str(REPO / "launch" / "submit.py"), "quantize", *sc.CPU, "cluster.tasks_per_node=1",
           "+quant=mamba_moe_fp8_conservative", *sc.SMALL, f"output_root={tmp_path}"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=sc.env(HYBRIDQUANT_FAULT="0:load", HYBRIDQUANT_FAULT_KIND="hang"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        job = re.search(r"submitted SLURM job (\d+)", proc.stdout.readline()).group(1)
        deadline = time.monotonic() + 120
        while sc.states(job, settle_s=0).get(job) != "RUNNING":
            assert time.monotonic() < deadline, "the job never started"
            time.sleep(0.5)
        subprocess.run(["scancel", job], check=True)
        t0 = time.monotonic()
        _, stderr = proc.communicate(timeout=90)
        reported_after = time.monotonic() - t0
    finally:
        proc.kill()
    assert proc.returncode == 1
    assert f"SLURM job {job} (quantize) CANCELLED" in stderr, stderr[-2000:]
    assert sc.states(job) == {job: "CANCELLED"}
    print(f"cancelled job {job} reported {reported_after:.1f} s after scancel")
    assert reported_after < 60
