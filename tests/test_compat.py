"""The narrow stand-ins for library limitations, each with the limitation shown."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch


def test_modelopt_nvfp4_fake_quant_needs_cuda_without_our_path():
    import modelopt.torch.quantization.tensor_quant as tq

    from hybridquant.compat import modelopt_cpu

    modelopt_op = tq._dynamic_block_quantize_impl  # ModelOpt's own implementation
    x = torch.randn(8, 64)
    with pytest.raises(AssertionError, match="CUDA"):
        modelopt_op(x, 16, x.abs().amax(), 4, 2, 8, 4)
    modelopt_cpu.apply()
    y = tq.dynamic_block_quantize_op(x, 16, x.abs().amax(), 4, 2, 8, 4)
    assert y.shape == x.shape and not torch.equal(x, y)


def test_modelopt_static_nvfp4_needs_triton_on_cuda_without_our_path():
    import modelopt.torch.quantization.nn.modules.tensor_quantizer as tensor_quantizer
    import modelopt.torch.quantization.tensor_quant as tq

    from hybridquant.compat import modelopt_cpu

    x = torch.randn(8, 64)
    amax = x.reshape(-1, 16).abs().amax(dim=1)
    with pytest.raises(RuntimeError, match="triton"):
        tq.static_blockwise_fp4_fake_quant(x, amax, amax.max(), True, 448.0, torch.float32, False)  # ModelOpt's own
    modelopt_cpu.apply()
    y = tensor_quantizer.static_blockwise_fp4_fake_quant(x, amax, amax.max(), True, 448.0, torch.float32, False)
    assert y.shape == x.shape and not torch.equal(x, y)
    assert ((y - x).reshape(-1, 16).abs() <= amax.unsqueeze(1) / 6 * (1 + 2.0 ** -4)).all()


def test_cpu_nvfp4_equals_modelopt_packed_representation():
    """The values the model computes with are exactly what ModelOpt's NVFP4 codec packs."""
    from modelopt.torch.quantization.qtensor import NVFP4QTensor

    from hybridquant.compat.modelopt_cpu import nvfp4_fake_quant

    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 128, generator=g) * 0.05
    fake = nvfp4_fake_quant(w, 16, w.abs().amax())
    packed, block_scale, global_scale = NVFP4QTensor.quantize(w, 16, weights_scaling_factor_2=w.abs().amax() / (6 * 448))
    assert packed._quantized_data.dtype == torch.uint8 and packed._quantized_data.shape == (32, 64)
    assert block_scale.dtype == torch.float8_e4m3fn and block_scale.shape == (32, 8)
    deq = packed.dequantize(dtype=torch.float32, scale=block_scale, double_scale=global_scale, block_sizes={-1: 16})
    assert torch.equal(fake, deq)
    # and the error is what NVFP4 allows: |w - q(w)| <= half an E2M1 step at each block's scale
    rel = ((fake - w).norm() / w.norm()).item()
    assert 0 < rel < 0.15


def test_bridge_imports_without_transformer_engine_and_leaves_no_stand_in():
    from hybridquant.compat import bridge_import, cpu

    cpu.apply()
    auto_bridge = bridge_import.import_auto_bridge()
    assert auto_bridge.__name__ == "AutoBridge"
    if not bridge_import.te_available():
        assert "transformer_engine" not in sys.modules
        import megatron.core.extensions.transformer_engine as mte

        assert mte.HAVE_TE is False
        from megatron.bridge.peft import lora_layers

        with pytest.raises(ImportError, match="Transformer-Engine"):
            lora_layers.te.Linear(4, 4)


def test_torch_norm_under_sequence_parallelism_refused_by_megatron_and_stood_in(world1):
    """megatron trains MoE layers under TP only with sequence parallelism, and its TE-free norm refuses
    it; the CPU stand-in builds the same norm and marks its weight for the TP all-reduce of gradients."""
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    from hybridquant.compat import cpu

    cpu.apply()
    config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1, normalization="RMSNorm")
    config.sequence_parallel = True  # as the TP>1 training config has it (this world has one rank)
    with pytest.raises(AssertionError, match="sequence parallel not supported by torch LayerNorm"):
        WrappedTorchNorm(config, 8)
    norm = cpu._SequenceParallelTorchNorm(config, 8)
    assert config.sequence_parallel and isinstance(norm, torch.nn.RMSNorm)
    assert all(p.sequence_parallel for p in norm.parameters())
    config.sequence_parallel = False
    assert not hasattr(next(cpu._SequenceParallelTorchNorm(config, 8).parameters()), "sequence_parallel")


def test_megatron_optimizer_allocations_land_on_the_cpu(world1):
    """megatron-core's optimiser and norm helpers allocate with device='cuda' (no GPU here: an error)."""
    import megatron.core.optimizer.clip_grads as clip_grads
    import megatron.core.utils as mcore_utils

    from hybridquant.compat import cpu

    cpu.apply()
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError):
            torch.zeros(1, device="cuda")
    for module in (clip_grads, mcore_utils):
        assert module.torch.zeros(1, device="cuda").device.type == "cpu"
        assert module.torch.tensor([1.0], device="cuda").device.type == "cpu"
    grads = [torch.full((3,), 2.0), torch.full((4,), 1.0)]
    norm = clip_grads.get_grad_norm_fp32(grads)  # megatron's own l2-norm fallback, on CPU
    assert norm == pytest.approx((3 * 4.0 + 4 * 1.0) ** 0.5)


def test_bridge_import_registers_nemotron_h_without_every_model_family():
    """megatron.bridge's package __init__ imports every family's bridge (and its diffusion models); ours
    enters the package without it and registers Nemotron-H alone, which AutoBridge then converts."""
    from hybridquant.compat import bridge_import, cpu

    cpu.apply()
    auto_bridge = bridge_import.import_auto_bridge()
    assert auto_bridge.list_supported_models() == ["NemotronHForCausalLM"]
    others = [name for name in sys.modules if name.startswith(("megatron.bridge.models.qwen", "megatron.bridge.models.llama",
                                                               "megatron.bridge.diffusion"))]
    assert others == []
    import megatron.bridge
    import megatron.bridge.models.nemotronh

    assert megatron.bridge.AutoBridge is auto_bridge
    assert "NemotronHBridge" in vars(megatron.bridge.models.nemotronh)
    source = (Path(megatron.bridge.__path__[0]) / "models" / "__init__.py").read_text()
    assert "megatron.bridge.models.qwen" in source  # what the skipped __init__ would have imported


def test_synchronous_checkpoint_save_starts_no_helper_process(world1, tmp_path):
    """megatron-core hands a synchronous save's write results back through a spawned Manager process;
    with ours the save starts no process, and what it wrote loads back."""
    import multiprocessing

    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from hybridquant.compat import cpu
    from hybridquant.compat.dist_checkpoint import in_process_write_results

    cpu.apply()  # the writer's host copy calls torch.cuda.synchronize
    assert "Manager()" in Path(filesystem_async.__file__).read_text()  # the default queue's process
    original = filesystem_async.get_write_results_queue
    weight = torch.arange(12.0).reshape(3, 4)
    with in_process_write_results():
        dist_checkpointing.save({"w": ShardedTensor.from_rank_offsets("w", weight)}, str(tmp_path))
    assert multiprocessing.active_children() == [] and filesystem_async._results_queue is None
    assert filesystem_async.get_write_results_queue is original
    loaded = dist_checkpointing.load({"w": ShardedTensor.from_rank_offsets("w", torch.empty(3, 4))}, str(tmp_path))
    assert torch.equal(loaded["w"], weight)
