"""Submit a pipeline stage to SLURM with submitit, as one (multi-node) job, and wait for its verdict.

    python launch/submit.py quantize cluster=slurm +quant=mamba_moe_fp8_conservative parallel.tp=8 ...

The stage's configuration is composed here first (a bad override fails before anything is queued);
the job runs the stage's own entry point (``pipeline/<stage>.py``) with the same overrides:

- ``cluster.mode=tasks``: ``srun`` starts ``nodes x tasks_per_node`` tasks, one rank each; every rank
  takes its torch.distributed rendezvous from the SLURM environment (hybridquant.cluster).
- ``cluster.mode=torchrun``: one task per node runs ``torchrun --nproc_per_node=tasks_per_node`` with a
  c10d rendezvous on the job's first node, id = the job id.

Hydra ``--multirun`` sweeps with ``cluster=slurm`` do not come through here: hydra-submitit-launcher
turns them into one SLURM array job (conf/cluster/slurm.yaml selects it).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from hybridquant.errors import UserError

REPO = Path(__file__).resolve().parents[2]
PIPELINE = REPO / "pipeline"
# States after which a job will not run again (sacct). Anything else (PENDING, RUNNING, ...) is waited on.
FINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED",
                "BOOT_FAIL", "DEADLINE")


def stages() -> list[str]:
    return sorted(p.stem for p in PIPELINE.glob("*.py") if (REPO / "conf" / f"{p.stem}.yaml").exists())


def compose(stage: str, overrides: list[str]):
    """The stage's full configuration (with Hydra's), as the stage will compose it."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from hybridquant import schema

    if stage not in stages():
        raise UserError(f"unknown stage {stage!r}; stages: {', '.join(stages())}")
    schema.register()
    try:
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            return hydra_compose(config_name=stage, overrides=list(overrides), return_hydra_config=True)
    except (HydraException, OmegaConfBaseException) as exc:
        raise UserError(f"{stage}: {str(exc).splitlines()[0]}") from exc


@contextlib.contextmanager
def _environ(**values: str):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_dir(cfg, job_id: str) -> Path | None:
    """Where the stage run of SLURM job ``job_id`` writes (stages with a Hydra run directory)."""
    with _environ(SLURM_JOB_ID=str(job_id)):
        path = str(cfg.hydra.run.dir)
    return None if path in (".", "") else Path(path)


@dataclass
class StageTask:
    """What every task of the job runs (pickled by submitit, imported from the installed package)."""
    stage: str
    overrides: list[str]
    mode: str = "tasks"
    procs_per_node: int = 1
    cwd: str = "."                    # the submitter's working directory (relative paths mean the same)

    def command(self) -> list[str]:
        script = str(PIPELINE / f"{self.stage}.py")
        if self.mode == "tasks":  # the rank's rendezvous comes from SLURM (hybridquant.cluster)
            return [sys.executable, script, *self.overrides]
        import submitit
        from submitit.helpers import TorchDistributedEnvironment

        env = submitit.JobEnvironment()
        master = f"{env.hostnames[0]}:{TorchDistributedEnvironment().master_port}"
        return [sys.executable, "-m", "torch.distributed.run", f"--nnodes={env.num_nodes}",
                f"--node_rank={env.node}", f"--nproc_per_node={self.procs_per_node}", "--rdzv_backend=c10d",
                f"--rdzv_endpoint={master}", f"--rdzv_id={env.job_id}", script, *self.overrides]

    def __call__(self) -> int:
        code = subprocess.call(self.command(), cwd=self.cwd)
        if code:
            raise RuntimeError(f"{self.stage} exited with status {code} "
                               f"(task {os.environ.get('SLURM_PROCID', '?')} on {os.uname().nodename})")
        return code


def executor_for(cluster, stage: str):
    import submitit

    folder = Path(cluster.log_dir) / "%j"
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
    tasks = cluster.tasks_per_node if cluster.mode == "tasks" else 1
    srun_args = ["--kill-on-bad-exit=1"]  # one rank failing ends the job, not a collective timeout later
    if cluster.container_image:
        srun_args += [f"--container-image={cluster.container_image}"]
        if cluster.container_mounts:
            srun_args += [f"--container-mounts={cluster.container_mounts}"]
    executor.update_parameters(
        name=f"hq-{stage}", nodes=cluster.nodes, tasks_per_node=tasks, timeout_min=cluster.time_min,
        gpus_per_node=cluster.gpus_per_node, cpus_per_task=cluster.cpus_per_task, mem_gb=cluster.mem_gb,
        slurm_partition=cluster.partition, slurm_account=cluster.account, slurm_qos=cluster.qos,
        slurm_setup=list(cluster.setup) or None, slurm_srun_args=srun_args,
        slurm_additional_parameters=dict(cluster.additional_parameters) or None)
    return executor


@dataclass
class Outcome:
    job_id: str
    state: str
    seconds: float
    run_dir: Path | None
    errors: list[str]


def submit(stage: str, overrides: list[str]):
    """Queue ``stage`` on SLURM; returns (job, composed config)."""
    import shutil

    cfg = compose(stage, overrides)
    cluster = cfg.cluster
    if cluster.name != "slurm":
        raise UserError(f"launch/submit.py submits to SLURM; add cluster=slurm (cluster is {cluster.name!r})")
    if cluster.mode not in ("tasks", "torchrun"):
        raise UserError(f"cluster.mode={cluster.mode!r}: use tasks or torchrun")
    if shutil.which("sbatch") is None:
        raise UserError("sbatch is not on PATH: run this on a SLURM login node")
    task = StageTask(stage, list(overrides), cluster.mode, cluster.tasks_per_node, os.getcwd())
    try:
        job = executor_for(cluster, stage).submit(task)
    except Exception as exc:  # sbatch refused the job: its message is the useful part
        raise UserError(f"sbatch refused the {stage} job: {str(exc).strip().splitlines()[-1]}") from exc
    return job, cfg


def wait(job, cfg, poll_s: float = 2.0, timeout_s: float | None = None) -> Outcome:
    """Wait until the job reaches a final state (as sacct reports it) and collect its verdict."""
    t0 = time.monotonic()
    while not job.done(force_check=True):
        if timeout_s is not None and time.monotonic() - t0 > timeout_s:
            raise UserError(f"SLURM job {job.job_id} is still {job.state} after {timeout_s:.0f} s")
        time.sleep(poll_s)
    state = job.watcher.get_state(job.job_id, mode="force")
    for _ in range(int(30 / poll_s)):  # the result file can appear before accounting has the final state
        if state.split()[0] in FINAL_STATES:
            break
        time.sleep(poll_s)
        state = job.watcher.get_state(job.job_id, mode="force")
    state = state.split()[0]  # "CANCELLED by 0" -> CANCELLED
    ok = state == "COMPLETED" and job.paths.result_pickle.exists()
    return Outcome(job_id=str(job.job_id), state=state if ok or state != "COMPLETED" else "FAILED",
                   seconds=time.monotonic() - t0, run_dir=run_dir(cfg, job.job_id),
                   errors=[] if ok else task_errors(job))


def task_errors(job) -> list[str]:
    """The stage's one-line ``error:`` messages from every task's log, root cause first (the task that
    failed first stopped writing its log first)."""
    def finished(i: int) -> float:
        path = job.task(i).paths.stderr
        return path.stat().st_mtime if path.exists() else float("inf")

    lines: list[str] = []
    for i in sorted(range(job.num_tasks), key=finished):
        text = (job.task(i).stderr() or "") + (job.task(i).stdout() or "")
        lines += [line for line in text.splitlines() if line.startswith("error:") and line not in lines]
    return lines
