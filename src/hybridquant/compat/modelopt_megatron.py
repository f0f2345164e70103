"""Narrow fixes to ModelOpt 0.47's Megatron plugin: MoE experts under TP/EP/ETP, KV cache without TE.

1. Quantizer amax in distributed checkpoints carry the wrong replica ids for experts.
``_MegatronParallelLinear.sharded_state_dict`` wraps amax with ``make_sharded_tensors_for_checkpoint``
without the layer's process groups, so the global TP and DP groups are used. megatron-core's own
linears pass ``tp_group=self.tp_group`` (the *expert* TP group for experts) and the data-parallel
group from the metadata (the *expert* DP group). With the global groups, at TP2×EP2 no rank owns
replica 0 of an expert amax and at EP2×ETP2 two ranks do: ``dist_checkpointing.save`` rejects the
sharding (and the other ranks hang). We pass the same groups the weights use.

2. ``_MegatronSequentialMLP._setup`` raises ``ValueError("TP+EP is not supported by
QuantSequentialMLP")`` whenever tensor and expert parallelism are both > 1. The limitation is real
only when the experts themselves are tensor-parallel (expert_tensor_parallel_size > 1): the amax
sync it sets up would then mix TP shards of different experts. With ETP=1 the experts are whole on
each rank and the plugin's EP/DP synchronisation is correct; we let that case through (measured:
amax identical to the single-process run) and keep ModelOpt's refusal for ETP>1 with TP>1.

3. KV-cache quantization exists only for Transformer Engine's attention: ModelOpt registers
``TEDotProductAttention`` (q/k/v_bmm quantizers on the post-RoPE tensors) and nothing for
megatron-core's own ``DotProductAttention``, so with the TE-free layer spec (CPU) ``quant.kv_cache``
silently adds no quantizer. We register the core module with the same three quantizers, parallel
state and restore behaviour (and class-level extra-state hooks, without which the quantizer
state is not saved and the amax does not reload); with TE present ModelOpt's class is used unchanged.

4. Static NVFP4 weights (per-block amax fixed at calibration, as the MSE FP8-scale sweep of the
Nemotron-3-Super recipe produces) on tensor-parallel linears: ModelOpt refuses them
(``_check_nvfp4_static_tp_supported`` raises NotImplementedError). What does go wrong when a weight
is split across ranks is the per-tensor global amax (the FP8 scale of the block scales): it is
computed from the local shard only, so every block scale the MSE sweep picks differs from the
unsplit model's (measured at EP2xETP2: 0 of 80 expert block grids equal). It is reduced (max) over
the layer's TP group before the sweep uses it; then all 80 grids are bit-identical. The rest already
works: a static block quantizer has axis (0,), so the TP amax sync leaves the shard-local block amax
alone and the checkpoint shards them like the weight (an ETP2 checkpoint reloads in one process
with every block equal).
"""

from __future__ import annotations

_APPLIED = False


def apply() -> bool:
    global _APPLIED
    if _APPLIED:
        return True
    import functools

    import modelopt.torch.quantization.plugins.megatron as plugin

    sharded_state_dict = plugin._MegatronParallelLinear.sharded_state_dict

    def sharded_state_dict_with_layer_groups(self, prefix="", sharded_offsets=(), metadata=None):
        metadata = plugin.ensure_metadata_has_dp_cp_group(metadata)
        make = plugin.make_sharded_tensors_for_checkpoint
        plugin.make_sharded_tensors_for_checkpoint = functools.partial(
            make, tp_group=self.tp_group, dp_cp_group=metadata["dp_cp_group"]
        )
        try:
            return sharded_state_dict(self, prefix, sharded_offsets, metadata)
        finally:
            plugin.make_sharded_tensors_for_checkpoint = make

    plugin._MegatronParallelLinear.sharded_state_dict = sharded_state_dict_with_layer_groups

    setup = plugin._MegatronSequentialMLP._setup

    def _setup(self):
        cfg = self.config
        etp = cfg.expert_tensor_parallel_size or cfg.tensor_model_parallel_size
        if etp == 1 and cfg.tensor_model_parallel_size > 1 and cfg.expert_model_parallel_size > 1:
            tp = cfg.tensor_model_parallel_size
            cfg.tensor_model_parallel_size = 1  # hide TP from the check only; experts are not TP-sharded
            try:
                return setup(self)
            finally:
                cfg.tensor_model_parallel_size = tp
        return setup(self)

    plugin._MegatronSequentialMLP._setup = _setup
    _register_core_attention(plugin)
    _static_block_weights_under_tp(plugin)
    _APPLIED = True
    return True


def _register_core_attention(plugin) -> None:
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from modelopt.torch.quantization.nn import QuantModule, QuantModuleRegistry, TensorQuantizer

    if DotProductAttention in QuantModuleRegistry:
        return

    @QuantModuleRegistry.register({DotProductAttention: "megatron_DotProductAttention"})
    class _QuantDotProductAttention(QuantModule):
        def _setup(self):
            self.q_bmm_quantizer = TensorQuantizer()
            self.k_bmm_quantizer = TensorQuantizer()
            self.v_bmm_quantizer = TensorQuantizer()
            self.parallel_state = plugin.ParallelState(
                plugin.get_data_parallel_group(with_context_parallel=True),
                plugin.mcore_parallel.get_tensor_model_parallel_group(),
            )

        def forward(self, query, key, value, *args, **kwargs):
            return super().forward(self.q_bmm_quantizer(query), self.k_bmm_quantizer(key),
                                   self.v_bmm_quantizer(value), *args, **kwargs)

        # ModelOpt keeps quantizer state in ``_extra_state`` through callbacks it binds to the
        # instance; torch only saves extra state for classes that define these (TE's do, core's not).
        def get_extra_state(self):
            return None

        def set_extra_state(self, state):
            pass

        def modelopt_post_restore(self, name=""):
            # dtype/device were recorded on the module by ModelOpt's attention hook
            self.to(device=self.device, dtype=self.dtype)

        def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
            state = self.state_dict(prefix="", keep_vars=True)
            return plugin.make_sharded_tensors_for_checkpoint(state, prefix, {}, sharded_offsets)


def _static_block_weights_under_tp(plugin) -> None:
    import torch
    import torch.distributed as dist
    from modelopt.torch.quantization import model_calib
    from modelopt.torch.quantization.nn import QuantModule, TensorQuantizer

    plugin._check_nvfp4_static_tp_supported = lambda model: None

    finalize = model_calib._finalize_with_shared_state

    def finalize_with_global_amax_over_tp(model, weight_patterns):
        finalize(model, weight_patterns)
        by_group: dict[int, tuple] = {}
        for module in model.modules():
            quantizer = getattr(module, "weight_quantizer", None)
            state = getattr(module, "parallel_state", None)
            if not isinstance(module, QuantModule) or state is None or not isinstance(quantizer, TensorQuantizer):
                continue
            if not getattr(quantizer, "is_nvfp4_static", False) or getattr(quantizer, "global_amax", None) is None:
                continue
            group = state.tensor_parallel_group
            if group.is_initialized() and group.world_size() > 1:
                by_group.setdefault(id(group.group), (group.group, []))[1].append(quantizer)
        for group, quantizers in by_group.values():  # same modules, same order on every rank of a group
            values = torch.stack([q.global_amax.float().reshape(()) for q in quantizers])
            dist.all_reduce(values, op=dist.ReduceOp.MAX, group=group)
            for q, value in zip(quantizers, values):
                q.global_amax = value.to(q.global_amax.dtype)

    model_calib._finalize_with_shared_state = finalize_with_global_amax_over_tp
