"""Where a run comes from: its identity (SLURM job / array task, torchrun rendezvous) and the
torch.distributed rendezvous taken from the SLURM task environment.

Run directories are named ``<run name><suffix>`` where the suffix is this launch's identity, so two
array tasks, or two jobs of the same recipe, never write into one directory, while the ranks of one
job all agree on it (they share the job id). A plain local ``torchrun`` has no identity beyond its
run name and reuses ``runs/<stage>/<run name>`` (a rerun replaces its outputs).
"""

from __future__ import annotations

import os

_TORCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def launch_id(env: os._Environ | dict | None = None) -> str:
    """``slurm<array job>_<task>`` for an array task, ``slurm<job>`` for a job, ``torchrun-<id>`` for a
    torchrun rendezvous with an explicit id (``--rdzv-id``/``--standalone``), else ``""``."""
    env = os.environ if env is None else env
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"slurm{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    if env.get("SLURM_JOB_ID"):
        return f"slurm{env['SLURM_JOB_ID']}"
    run_id = env.get("TORCHELASTIC_RUN_ID", "")
    if run_id and run_id != "none":
        return f"torchrun-{run_id}"
    return ""


def launch_suffix() -> str:
    """The run directory suffix for this launch (Hydra resolver ``${launch_suffix:}``)."""
    ident = launch_id()
    return f"-{ident}" if ident else ""


def in_slurm_step() -> bool:
    """Inside a task started by ``srun`` (not the batch script itself, which runs once per job)."""
    return "SLURM_PROCID" in os.environ and "SLURM_STEP_ID" in os.environ and \
        os.environ.get("SLURM_STEP_ID") not in ("batch", "extern")


def torch_env_from_slurm() -> bool:
    """One SLURM task per rank (srun / submitit, no torchrun): export RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR (the step's first node) and MASTER_PORT (from the job id) for ``env://``.
    Does nothing when a launcher already set them (torchrun inside srun). Returns whether it did."""
    if "RANK" in os.environ or not in_slurm_step():
        return False
    from submitit.helpers import TorchDistributedEnvironment

    dist_env = TorchDistributedEnvironment()
    os.environ.update(RANK=str(dist_env.rank), WORLD_SIZE=str(dist_env.world_size),
                      LOCAL_RANK=str(dist_env.local_rank), LOCAL_WORLD_SIZE=str(dist_env.local_world_size),
                      MASTER_ADDR=dist_env.master_addr, MASTER_PORT=str(dist_env.master_port))
    return True
