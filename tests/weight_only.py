"""The quantized Megatron model's logits with only its weight quantizers on: what an exported checkpoint's
weights alone must reproduce (activation and KV-cache quantization happen in the serving engine)."""

from __future__ import annotations


def logits(run_dir, world, input_ids):
    from modelopt.torch.quantization.nn import TensorQuantizer

    from hybridquant import checkpoint, forward

    loaded, _ = checkpoint.load_quantized(run_dir / "checkpoint", world)
    for name, module in loaded.module.named_modules():
        if isinstance(module, TensorQuantizer) and not name.endswith("weight_quantizer"):
            module.disable()
    return forward.run(loaded.chunks, [input_ids], loaded.hf_vocab_size)[0]
