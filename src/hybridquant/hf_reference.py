"""transformers' NemotronHForCausalLM as an independent reference implementation, on CPU.

Without the CUDA kernels, transformers 5.12 runs Nemotron-H's Mamba2 mixer through a pure-torch
path that departs from the kernels (which megatron-core and vLLM run) in two ways:

* it clamps the SSM step ``dt`` from below at ``time_step_min`` (an initialisation
  hyper-parameter), where the kernels clamp with ``time_step_limit`` (default: no clamp);
* its chunked scan does not carry state across chunks correctly: with ``seq_len > chunk_size``
  its output differs from its own single-chunk result by O(0.1) in float64 (tests/test_reference.py).

``load`` therefore sets ``time_step_min=0`` (softplus output is positive, so no clamp) and a
``chunk_size`` covering the longest sequence compared, which makes the reference agree with
mamba_ssm's own reference scan to float rounding. Neither changes any weight.
"""

from __future__ import annotations

import torch


def load(path: str, max_seq_len: int = 512, dtype: torch.dtype = torch.float32, strict: bool = False):
    """The model; with ``strict``, a checkpoint that leaves any weight missing or unused is refused."""
    from transformers import NemotronHForCausalLM

    chunk = 1 << max(int(max_seq_len) - 1, 1).bit_length()
    model, info = NemotronHForCausalLM.from_pretrained(
        str(path), dtype=dtype, time_step_min=0.0, chunk_size=chunk, use_mamba_kernels=False,
        output_loading_info=True,
    )
    if strict:
        problems = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
        if problems:
            raise ValueError(f"{path} does not match NemotronHForCausalLM: {problems}")
    return model.eval()


@torch.no_grad()
def logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids, use_cache=False).logits
