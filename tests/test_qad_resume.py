"""A qad job killed (SIGKILL, as a preemption or the OOM killer) after a checkpoint, started again with
the same command, resumes there and reaches bit for bit the weights of an uninterrupted run, with real
ranks (expert parallel over two data-parallel ranks)."""

from __future__ import annotations

import json

import pytest
import torch

from launch import run_stage
from qad_settings import EP2, FAST


def state_of(directory, layout):
    """Every tensor of a saved quantized checkpoint (weights, ModelOpt amax), loaded in this process."""
    from hybridquant import checkpoint

    loaded, _ = checkpoint.load_quantized(directory, layout)
    return {k: v.clone() for k, v in loaded.chunks[0].state_dict().items() if torch.is_tensor(v)}


@pytest.mark.distributed
def test_killed_job_resumes_to_the_uninterrupted_weights(qad_run, qad_student, tmp_path, world1):
    overrides, nproc = EP2
    reference = qad_run(*overrides, nproc=nproc)
    run_dir = tmp_path / "run"
    args = [f"checkpoint={qad_student}", f"hydra.run.dir={run_dir}", *FAST, *overrides]
    killed = run_stage("qad", args, nproc=nproc, extra_env={"HYBRIDQUANT_FAULT": "1:step2",
                                                           "HYBRIDQUANT_FAULT_KIND": "kill"})
    assert killed.returncode != 0
    # What the killed job leaves: the step-2 checkpoint, no final checkpoint, no report.
    assert (run_dir / "checkpoints" / "step_000002" / "train_state" / "complete").is_file()
    assert not (run_dir / "report.json").exists() and not (run_dir / "checkpoint").exists()

    resumed = run_stage("qad", args, nproc=nproc)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming at step 2 of 3" in resumed.stderr + resumed.stdout
    # Only step 3 was trained again: the curve's first two steps are the killed job's.
    assert json.loads((run_dir / "qad.json").read_text()) == json.loads((reference / "qad.json").read_text())
    a, b = state_of(reference / "checkpoint", world1), state_of(run_dir / "checkpoint", world1)
    assert len(a) > 100 and set(a) == set(b)
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, differ[:5]
