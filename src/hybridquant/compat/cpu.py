"""Run megatron-core's HybridModel on a machine without CUDA.

megatron-core 0.19 assumes a GPU in a handful of places that are not about the maths. This module
is the only place the project touches them; every change is narrow, idempotent and applied only
when CUDA is absent (``apply()`` is a no-op on a GPU machine):

* ``torch.cuda.current_device()`` is used as a *device argument* (rotary tables, TP gather/scatter,
  pipeline p2p buffers): on CPU it returns the CPU device.
* The MoE all-to-all dispatcher records CUDA streams/events: on CPU they are inert singletons.
* ``mamba_ssm``/``causal_conv1d`` ship their fused kernels as CUDA/Triton code but also pure-torch
  reference implementations of the same functions (``*_ref``). Megatron's ``MambaMixer`` calls the
  kernels through module globals; on CPU those globals point at stand-ins that run the Mamba2 scan
  chunked (``compat/ssd.py``: matrix form, batched matmuls) or, with
  ``HYBRIDQUANT_MAMBA_SCAN=sequential``, the packages' reference ops (``mamba_split_conv1d_scan_ref``,
  a Python loop over positions; one bench_medium layer 21x slower at 256 tokens, 45x at 1,024; the
  same result within float32 rounding).
* Its static-batching inference path (prefill, then one token per step) calls mamba_ssm's Triton
  ``mamba_chunk_scan_combined`` for the prompt's final state and megatron's own Triton
  ``selective_state_update`` / ``causal_conv1d_update`` for a step: on CPU the prefill is the same
  chunked scan (or ``selective_scan_ref``, which returns the final state, when sequential is
  selected) and a step is ``selective_state_update_ref`` and ``causal_conv1d_update_ref``, one token
  at a time. The dynamic-batching arguments (state indices, intermediate states, packed sequences)
  are refused.
* ``HybridStack.final_norm`` and ModelOpt's TE-free hybrid spec instantiate Transformer-Engine norms
  unconditionally: on CPU they use megatron's own ``WrappedTorchNorm`` (same RMSNorm maths, same
  parameter name ``weight``), which refuses sequence parallelism: there its weights are marked
  ``sequence_parallel`` so that their gradients are all-reduced over TP, as TE's are.
* The MoE all-to-all dispatcher asks for its split sizes "as numpy" to hand them to
  ``all_to_all_single``; its helper only converts CUDA tensors, and gloo needs plain sequences, so
  CPU split-size tensors are converted too.
* gloo lacks reduce-scatter and unequal all-gather, which expert-tensor parallelism uses: on gloo
  groups they are computed with all-reduce / padded all-gather instead (same result).
* Pipeline schedules allocate their loss accumulator with ``device="cuda"``: on CPU that allocation
  lands on the CPU.
* MoE latent projections (Nemotron-3-Super: ``fc1_latent_proj``/``fc2_latent_proj``) are built only
  as Transformer-Engine ``TELinear(parallel_mode="duplicated")``: without TE, megatron asserts.
  On CPU they are a plain linear with the same full weight on every rank, the same parameter names
  and a replicated checkpoint entry.
* Tied embeddings under pipeline parallelism: the last stage's copy of the embedding is filled from
  the first stage by an all-reduce that megatron runs on ``weight.data.cuda()``: on CPU, while that
  set-up runs, ``Tensor.cuda()`` leaves a CPU tensor where it is.
* megatron-core's optimiser (``FP32Optimizer`` / ``Float16OptimizerWithFloat16Params``, global-norm
  gradient clipping, megatron's own l2-norm fallback) allocates its scale, overflow flags and norm
  accumulators with ``device="cuda"``: on CPU they land on the CPU (the ``torch`` those modules see remaps the device
  of ``tensor``/``zeros``); and it checks parameter and gradient types by CUDA type name
  (``'torch.cuda.FloatTensor'``...): ``cuda_type_names()``, entered around building the optimiser and
  its step, gives CPU tensors the CUDA name of their dtype (``Tensor.type()`` with no argument only).
* megatron's ``jit_fuser`` is ``torch.compile``: on CPU every new input shape (each calibration
  sample length, each generated token) is compiled by inductor's C++ backend, seconds each (the
  first 6 generation steps of the tiny model: 30 s, against 0.1 s per eager forward). On CPU,
  TorchDynamo is disabled, so these element-wise helpers run eagerly.
"""

from __future__ import annotations

import contextlib
import sys
import types

import torch

from hybridquant.compat import ssd

_APPLIED = False


class _InertEvent:
    def synchronize(self):
        pass

    def wait(self, *args, **kwargs):
        pass

    def record(self, *args, **kwargs):
        pass

    def query(self):
        return True


class _InertStream:
    _instance = None

    def __new__(cls, *args, **kwargs):
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def wait_stream(self, stream):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        return _InertEvent()

    def synchronize(self):
        pass

    def query(self):
        return True


def _patch_torch_cuda() -> None:
    stream = _InertStream()
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.Stream = _InertStream
    torch.cuda.Event = _InertEvent
    torch.cuda.current_stream = lambda *a, **k: stream
    torch.cuda.default_stream = lambda *a, **k: stream
    torch.cuda.stream = lambda s=None: contextlib.nullcontext()
    torch.cuda.synchronize = lambda *a, **k: None


def _patch_mamba_kernels_before_import() -> None:
    """mamba_ssm imports its compiled extensions at module import; they are not built on CPU."""
    for name in ("selective_scan_cuda", "causal_conv1d_cuda"):
        sys.modules.setdefault(name, types.ModuleType(name))
    import causal_conv1d.causal_conv1d_interface as conv_interface
    import mamba_ssm.ops.triton.layernorm_gated as layernorm_gated
    import mamba_ssm.ops.selective_scan_interface as scan_interface
    import mamba_ssm.ops.triton.ssd_combined as ssd_combined

    scan_interface.selective_scan_fn = scan_interface.selective_scan_ref

    def causal_conv1d(x, weight, bias=None, activation=None, **_unused):
        return conv_interface.causal_conv1d_ref(x, weight, bias, activation=activation)

    ssd_combined.causal_conv1d_fn = causal_conv1d

    def gated_rms_norm_forward(self, x, z=None):
        return layernorm_gated.rms_norm_ref(
            x, self.weight, self.bias, z=z, eps=self.eps, group_size=self.group_size,
            norm_before_gate=self.norm_before_gate,
        )

    layernorm_gated.RMSNorm.forward = gated_rms_norm_forward


SCAN_RANGE = "hybridquant.mamba_scan"  # profiler range around megatron's calls of the scan (conv1d included)


def _cpu_scan_mode() -> str:
    mode = ssd.mode()
    if mode == "kernels":
        raise RuntimeError(f"{ssd.ENV}=kernels: mamba_ssm's Triton kernels need CUDA; use chunked or sequential")
    return mode


def _patch_mamba_mixer() -> None:
    import megatron.core.ssm.mamba_mixer as mamba_mixer
    from mamba_ssm.ops.triton import ssd_combined

    def split_conv1d_scan(zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size, initial_states=None,
                          seq_idx=None, dt_limit=(0.0, float("inf")), return_final_states=False, activation="silu",
                          rmsnorm_weight=None, rmsnorm_eps=1e-6, outproj_weight=None, outproj_bias=None,
                          headdim=None, ngroups=1, norm_before_gate=True, **_unused):
        kwargs = dict(dt_limit=dt_limit, activation=activation, rmsnorm_weight=rmsnorm_weight,
                      rmsnorm_eps=rmsnorm_eps, outproj_weight=outproj_weight, outproj_bias=outproj_bias,
                      headdim=headdim, ngroups=ngroups, norm_before_gate=norm_before_gate)
        with torch.profiler.record_function(SCAN_RANGE):
            if _cpu_scan_mode() == "chunked":
                return ssd.split_conv1d_scan(zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size,
                                             initial_states=initial_states, seq_idx=seq_idx,
                                             return_final_states=return_final_states, **kwargs)
            if seq_idx is not None or initial_states is not None or return_final_states:
                raise NotImplementedError("packed sequences and initial/final states need the chunked scan "
                                          "or the CUDA mamba kernels")
            return ssd_combined.mamba_split_conv1d_scan_ref(zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D,
                                                            chunk_size, **kwargs)

    mamba_mixer.mamba_split_conv1d_scan_combined = split_conv1d_scan
    mamba_mixer.causal_conv1d_fn = None  # the mixer then runs its own nn.Conv1d


def _patch_mamba_inference() -> None:
    import megatron.core.ssm.mamba_mixer as mamba_mixer
    from causal_conv1d.causal_conv1d_interface import causal_conv1d_update_ref
    from einops import rearrange, repeat
    from mamba_ssm.ops.selective_scan_interface import selective_scan_ref
    from mamba_ssm.ops.triton.selective_state_update import selective_state_update_ref

    def chunk_scan(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None,
                   seq_idx=None, cu_seqlens=None, dt_softplus=False, dt_limit=(0.0, float("inf")),
                   return_final_states=False, return_varlen_states=False, **_unused):
        if seq_idx is not None or cu_seqlens is not None or return_varlen_states:
            raise NotImplementedError("packed sequences need the CUDA mamba kernels")
        with torch.profiler.record_function(SCAN_RANGE):
            if _cpu_scan_mode() == "chunked":
                return ssd.chunk_scan(x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias,
                                      dt_softplus=dt_softplus, dt_limit=dt_limit, initial_states=initial_states,
                                      return_final_states=return_final_states)
            if initial_states is not None or dt_limit != (0.0, float("inf")):
                raise NotImplementedError("initial states and dt limits need the chunked scan or the CUDA mamba "
                                          "kernels")
            return sequential_scan(x, dt, A, B, C, D, z, dt_bias, dt_softplus, return_final_states)

    def sequential_scan(x, dt, A, B, C, D, z, dt_bias, dt_softplus, return_final_states):
        headdim, dstate = x.shape[-1], B.shape[-1]
        if D is not None:  # per head, or per head and channel
            D = (rearrange(D, "h p -> (h p)") if D.dim() == 2 else repeat(D, "h -> (h p)", p=headdim)).float()
        out, last = selective_scan_ref(  # over channels (h p), as mamba_ssm's ssd_selective_scan
            rearrange(x, "b l h p -> b (h p) l"), repeat(dt, "b l h -> b (h p) l", p=headdim),
            repeat(A, "h -> (h p) n", p=headdim, n=dstate).float(),
            rearrange(B, "b l g n -> b g n l"), rearrange(C, "b l g n -> b g n l"), D=D,
            z=None if z is None else rearrange(z, "b l h p -> b (h p) l"),
            delta_bias=None if dt_bias is None else repeat(dt_bias, "h -> (h p)", p=headdim),
            delta_softplus=dt_softplus, return_last_state=True,
        )
        out = rearrange(out, "b (h p) l -> b l h p", p=headdim)
        return (out, rearrange(last, "b (h p) n -> b h p n", p=headdim)) if return_final_states else out

    def state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                     state_batch_indices=None, intermediate_ssm_states=None):
        if state_batch_indices is not None or intermediate_ssm_states is not None:
            raise NotImplementedError("dynamic batching needs the CUDA mamba kernels")
        return torch.stack([  # x, dt, B, C, z: [batch, tokens, heads|groups, ...]
            selective_state_update_ref(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], D=D,
                                       z=None if z is None else z[:, t], dt_bias=dt_bias, dt_softplus=dt_softplus)
            for t in range(x.shape[1])
        ], dim=1)

    def conv_update(x, conv_state, weight, bias, silu_activation, conv_state_indices=None,
                    intermediate_conv_states=None):
        if conv_state_indices is not None or intermediate_conv_states is not None:
            raise NotImplementedError("dynamic batching needs the CUDA causal-conv1d kernels")
        out = causal_conv1d_update_ref(rearrange(x, "b s d -> b d s"), conv_state, weight, bias,
                                       activation="silu" if silu_activation else None)
        return rearrange(out, "b d s -> b s d")

    mamba_mixer.mamba_chunk_scan_combined = chunk_scan
    mamba_mixer.selective_state_update = state_update
    mamba_mixer.causal_conv1d_update = conv_update


def _patch_te_norms() -> None:
    import megatron.core.models.hybrid.hybrid_block as hybrid_block
    import megatron.core.post_training.modelopt.hybrid.model_specs as modelopt_specs

    hybrid_block.TENorm = _SequenceParallelTorchNorm
    modelopt_specs.Norm = _SequenceParallelTorchNorm


class _SequenceParallelTorchNorm:
    """megatron's ``WrappedTorchNorm``, also under sequence parallelism (which megatron trains MoE layers
    under TP with): the norm's maths is per position, so only its weight gradient differs, being a sum
    over this rank's positions; ``sequence_parallel=True`` on its parameters makes
    ``finalize_model_grads`` all-reduce those over TP, as for Transformer-Engine's norms."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **kwargs):
        from megatron.core.transformer.torch_norm import WrappedTorchNorm

        if not config.sequence_parallel:
            return WrappedTorchNorm(config, hidden_size, eps, **kwargs)
        config.sequence_parallel = False  # WrappedTorchNorm refuses it; restored at once
        try:
            norm = WrappedTorchNorm(config, hidden_size, eps, **kwargs)
        finally:
            config.sequence_parallel = True
        for param in norm.parameters():
            param.sequence_parallel = True
        return norm


def _patch_schedules() -> None:
    import megatron.core.pipeline_parallel.schedules as schedules

    real_zeros = torch.zeros

    def zeros(*args, **kwargs):
        if kwargs.get("device") == "cuda":
            kwargs["device"] = "cpu"
        return real_zeros(*args, **kwargs)

    proxy = types.ModuleType("torch")
    proxy.__dict__.update(torch.__dict__)
    proxy.zeros = zeros
    schedules.torch = proxy


def _cpu_device_torch(module) -> None:
    """``module``'s ``torch`` with ``tensor``/``zeros`` placing ``device="cuda"`` tensors on the CPU."""
    def on_cpu(fn):
        def call(*args, **kwargs):
            if str(kwargs.get("device")) == "cuda":
                kwargs["device"] = "cpu"
            return fn(*args, **kwargs)
        return call

    proxy = types.ModuleType("torch")
    proxy.__dict__.update(torch.__dict__)
    proxy.zeros, proxy.tensor = on_cpu(torch.zeros), on_cpu(torch.tensor)
    module.torch = proxy


def _patch_optimizer() -> None:
    import megatron.core.optimizer.clip_grads as clip_grads
    import megatron.core.optimizer.optimizer as optimizer
    import megatron.core.utils as utils  # local_multi_tensor_l2_norm (no apex / TE)

    for module in (optimizer, clip_grads, utils):
        _cpu_device_torch(module)


@contextlib.contextmanager
def cuda_type_names():
    """While active (and only without CUDA), ``t.type()`` of a CPU tensor answers the CUDA type name of its
    dtype, for megatron-core's optimiser checks. No-op on a CUDA machine."""
    if torch.cuda.is_available():
        yield
        return
    real = torch.Tensor.type

    def type_name(tensor, *args, **kwargs):
        name = real(tensor, *args, **kwargs)
        if args or kwargs or not isinstance(name, str) or tensor.is_cuda:
            return name
        return name.replace("torch.", "torch.cuda.", 1)

    torch.Tensor.type = type_name
    try:
        yield
    finally:
        torch.Tensor.type = real


def _patch_moe_alltoall() -> None:
    import megatron.core.transformer.moe.token_dispatcher as token_dispatcher

    move = token_dispatcher.maybe_move_tensor_to_cpu

    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if torch.is_tensor(tensor) and not tensor.is_cuda and as_numpy:
            return tensor.numpy()
        return move(tensor, as_numpy=as_numpy, record_stream=record_stream)

    token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu


def _patch_uneven_collectives() -> None:
    """gloo has no reduce-scatter and no all-gather of unequal sizes; expert-tensor parallelism
    (ETP>1) uses both with per-rank token counts. Equivalent gloo formulations: gather padded
    tensors and trim; all-reduce and keep this rank's slice."""
    import torch.distributed as dist
    from megatron.core.tensor_parallel import mappings

    gather, reduce_scatter = mappings._gather_along_first_dim, mappings._reduce_scatter_along_first_dim

    def is_gloo(group) -> bool:
        return dist.get_backend(group) == "gloo"

    def gather_along_first_dim(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or group.size() == 1 or not is_gloo(group):
            return gather(input_, group, output_split_sizes, use_global_buffer)
        longest = max(output_split_sizes)
        padded = input_.new_zeros((longest, *input_.shape[1:]))
        padded[: input_.shape[0]] = input_
        parts = [torch.empty_like(padded) for _ in range(group.size())]
        dist.all_gather(parts, padded.contiguous(), group=group)
        return torch.cat([part[:n] for part, n in zip(parts, output_split_sizes)], dim=0)

    def reduce_scatter_along_first_dim(input_, group, input_split_sizes=None, use_global_buffer=False):
        if group.size() == 1 or not is_gloo(group):
            return reduce_scatter(input_, group, input_split_sizes, use_global_buffer)
        total = input_.clone()
        dist.all_reduce(total, group=group)
        sizes = input_split_sizes or [input_.shape[0] // group.size()] * group.size()
        return torch.split(total, sizes, dim=0)[group.rank()].contiguous()

    mappings._gather_along_first_dim = gather_along_first_dim
    mappings._reduce_scatter_along_first_dim = reduce_scatter_along_first_dim


class _DuplicatedLinear(torch.nn.Module):
    """``TELinear(parallel_mode="duplicated")`` without TE: y = x W^T (+ b), W whole on every rank."""

    def __init__(self, input_size, output_size, *, config, init_method, bias, skip_bias_add, **_unused):
        super().__init__()
        # where megatron's own layers put their parameters: the current GPU unless it initialises on the
        # CPU, else the default device (the meta device while a model is described: recipe_table)
        device = None if getattr(config, "use_cpu_initialization", False) or not torch.cuda.is_available() \
            else torch.cuda.current_device()
        self.weight = torch.nn.Parameter(torch.empty(output_size, input_size, dtype=config.params_dtype,
                                                     device=device))
        self.bias = torch.nn.Parameter(torch.zeros(output_size, dtype=config.params_dtype, device=device)) \
            if bias else None
        if config.perform_initialization:
            init_method(self.weight)
        self.skip_bias_add = skip_bias_add

    def forward(self, x):
        out = torch.nn.functional.linear(x, self.weight, None if self.skip_bias_add else self.bias)
        return out, (self.bias if self.skip_bias_add else None)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        return make_sharded_tensors_for_checkpoint(self.state_dict(prefix="", keep_vars=True), prefix, {},
                                                   sharded_offsets)


def _patch_moe_latent_projections() -> None:
    import megatron.core.transformer.moe.moe_layer as moe_layer

    if not moe_layer.HAVE_TE:
        moe_layer.HAVE_TE = True  # only consulted for the latent projections' assertion
        moe_layer.TELinear = _DuplicatedLinear


def _patch_tied_embedding_setup() -> None:
    from megatron.core.models.common.language_module.language_module import LanguageModule

    original = LanguageModule.setup_embeddings_and_output_layer

    def setup_embeddings_and_output_layer(self, *args, **kwargs):
        real_cuda = torch.Tensor.cuda
        torch.Tensor.cuda = lambda tensor, *a, **k: tensor
        try:
            return original(self, *args, **kwargs)
        finally:
            torch.Tensor.cuda = real_cuda

    LanguageModule.setup_embeddings_and_output_layer = setup_embeddings_and_output_layer


def _disable_dynamo() -> None:
    import torch._dynamo

    torch._dynamo.config.disable = True


def apply() -> bool:
    """Apply the CPU stand-ins once, if CUDA is absent. Returns True when applied. On a CUDA machine,
    only what it lacks (Transformer-Engine, the compiled Mamba extensions) is stood in for
    (``compat/gpu.py``)."""
    global _APPLIED
    if _APPLIED:
        return True
    if torch.cuda.is_available():
        from hybridquant.compat import gpu

        gpu.apply()
        return False
    _patch_torch_cuda()
    _patch_mamba_kernels_before_import()
    _patch_mamba_mixer()
    _patch_mamba_inference()
    _patch_te_norms()
    _patch_schedules()
    _patch_optimizer()
    _patch_moe_alltoall()
    _patch_uneven_collectives()
    _patch_moe_latent_projections()
    _patch_tied_embedding_setup()
    _disable_dynamo()
    _APPLIED = True
    return True
