"""Parallel layout (TP/PP/EP/ETP/DP): validation, process groups, and the few collectives stages need.

The layout is checked against the world size and the model's shapes *before* any process group
exists, so a layout that cannot work ends in one line that names the rule and the numbers.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import sys
import traceback
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.distributed as dist

from hybridquant import cluster, modules
from hybridquant.errors import UserError

log = logging.getLogger(__name__)


class LayoutError(UserError, ValueError):
    """A parallel layout that cannot work for this world size or model."""


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    ep: int = 1
    etp: int = 1
    world_size: int = 1

    @property
    def dp(self) -> int:
        return self.world_size // (self.tp * self.pp)

    @property
    def expert_dp(self) -> int:
        return self.world_size // (self.etp * self.ep * self.pp)

    @property
    def tag(self) -> str:
        parts = [f"tp{self.tp}", f"pp{self.pp}", f"ep{self.ep}"]
        if self.etp != 1:
            parts.append(f"etp{self.etp}")
        if self.dp != 1:
            parts.append(f"dp{self.dp}")
        return "_".join(parts)


def validate(layout: Layout, arch: Mapping[str, Any]) -> None:
    """Raise LayoutError for a layout that cannot run ``arch`` (HF config fields)."""
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise LayoutError(message)

    for name in ("tp", "pp", "ep", "etp"):
        need(getattr(layout, name) >= 1, f"parallel.{name} must be >= 1, got {getattr(layout, name)}")
    w, tp, pp, ep, etp = layout.world_size, layout.tp, layout.pp, layout.ep, layout.etp
    need(w % (tp * pp) == 0,
         f"world size {w} is not divisible by tp*pp = {tp}*{pp} = {tp * pp} (data parallel = world / (tp*pp))")
    need(w % (etp * ep * pp) == 0,
         f"world size {w} is not divisible by etp*ep*pp = {etp}*{ep}*{pp} = {etp * ep * pp} (expert layout)")
    heads, kv = int(arch["num_attention_heads"]), int(arch["num_key_value_heads"])
    need(heads % tp == 0, f"tp={tp} does not divide num_attention_heads={heads}")
    # Megatron replicates KV groups when TP exceeds them (tp=8 with 2 KV heads), so either divides.
    need(kv % tp == 0 or tp % kv == 0,
         f"tp={tp} and num_key_value_heads={kv} (KV groups): neither divides the other")
    m_heads, m_groups = int(arch["mamba_num_heads"]), int(arch["n_groups"])
    need(m_heads % tp == 0, f"tp={tp} does not divide mamba_num_heads={m_heads}")
    need(m_groups % tp == 0, f"tp={tp} does not divide Mamba n_groups={m_groups}")
    experts = int(arch["n_routed_experts"])
    need(experts % ep == 0, f"ep={ep} does not divide n_routed_experts={experts}")
    for key in ("moe_intermediate_size", "moe_shared_expert_intermediate_size"):
        size = int(arch[key])
        divisor = etp if key == "moe_intermediate_size" else tp
        need(size % divisor == 0, f"{'etp' if divisor == etp else 'tp'}={divisor} does not divide {key}={size}")
    layers = len(modules.decoder_symbols(arch["hybrid_override_pattern"]))
    need(pp <= layers, f"pp={pp} is larger than the number of layers ({layers})")


def free_port() -> int:
    """A TCP port free on this host now (for a rendezvous on localhost)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def world_size_from_env() -> int:
    cluster.torch_env_from_slurm()  # one SLURM task per rank: rendezvous from the job's environment
    return int(os.environ.get("WORLD_SIZE", "1"))


def init(layout: Layout, seed: int, backend: str = "auto", timeout_s: int = 600) -> None:
    """Create the default process group and Megatron's model-parallel groups for ``layout``."""
    from datetime import timedelta

    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    cluster.torch_env_from_slurm()
    if "RANK" not in os.environ:  # a plain `python pipeline/x.py`: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.etp,
        distributed_timeout_minutes=timeout_s / 60,  # Megatron's groups default to 30 minutes
    )
    model_parallel_cuda_manual_seed(seed, inference_rng_tracker=True)


def shutdown() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def gather_tp_logits(local_logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Concatenate vocab-sharded logits over the TP group and drop Megatron's vocab padding."""
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    full = local_logits
    if tp > 1:
        parts = [torch.empty_like(local_logits) for _ in range(tp)]
        dist.all_gather(parts, local_logits.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
        full = torch.cat(parts, dim=-1)
    return full[..., :vocab_size]


def fail_fast(fn):
    """Run a rank's entry point so that an exception ends this process at once, non-zero.

    A rank that raises while its peers wait in a collective would otherwise hang the job until the
    collective times out; exiting tears down the process group, and torchrun stops the others.
    The error is printed as one line (the full traceback with HYBRIDQUANT_TRACEBACK=1).
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SystemExit:
            raise
        except BaseException as exc:  # noqa: BLE001 - every failure must end the rank
            if os.environ.get("HYBRIDQUANT_TRACEBACK") == "1" or not isinstance(exc, UserError):
                traceback.print_exc()
            print(f"error: [rank {os.environ.get('RANK', '0')}] {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(1)

    return wrapper


def gather_objects(obj) -> list:
    """``obj`` of every rank, in rank order, on every rank (small picklable objects)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def from_any_rank(obj):
    """The value held by the first rank that has one (others pass None), on every rank.
    For small objects such as probe logits that exist only on the last pipeline stage."""
    return next((g for g in gather_objects(obj) if g is not None), None)


def from_last_stage(value: int) -> int:
    """The integer (a sampled token) that the last pipeline stage holds, on every rank of this rank's
    pipeline; other stages pass anything. Ranks of the last stage must already agree."""
    from megatron.core import parallel_state

    if not dist.is_initialized() or parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return value
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.broadcast(t, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                   group=parallel_state.get_pipeline_model_parallel_group())
    return int(t)


def fault_point(name: str) -> None:
    """Fault injection for testing failure handling with real ranks.

    ``HYBRIDQUANT_FAULT=<rank>:<point>`` makes that rank fail at that point (``load``, ``calibrate``
    (inside the first calibration forward, while peers are in collectives), ``save``).
    ``HYBRIDQUANT_FAULT_KIND`` says how: ``raise`` (default: an exception, as a bad file or a failed
    assertion), ``enospc`` (the OSError of a full disk, at ``export.write``), ``kill`` (SIGKILL, as the kernel's OOM killer does) or ``hang`` (blocks outside any
    collective; its peers' collectives then time out after ``cluster.timeout_s``).
    ``HYBRIDQUANT_FAULT_MARK=<file>``: the rank writes the time (``time.time()``) of the fault there.
    """
    spec = os.environ.get("HYBRIDQUANT_FAULT")
    if not spec:
        return
    fault_rank, _, point = spec.partition(":")
    if point != name or int(fault_rank) != rank():
        return
    kind = os.environ.get("HYBRIDQUANT_FAULT_KIND", "raise")
    mark = os.environ.get("HYBRIDQUANT_FAULT_MARK")
    if mark:  # when the fault happened, for timing how fast the job then ends
        import time

        with open(mark, "w") as f:
            f.write(f"{time.time()}\n")
    if kind == "enospc":
        import errno

        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if kind == "kill":
        import signal

        os.kill(os.getpid(), signal.SIGKILL)
    if kind == "hang":
        import time

        time.sleep(10**6)
    raise RuntimeError(f"injected fault at {name} on rank {fault_rank}")
