"""Forward passes of a (possibly pipeline-parallel) Megatron HybridModel, without autograd.

With PP=1 this is a plain call; with PP>1 it runs megatron-core's forward-only pipeline schedule,
one microbatch per batch (calibration samples keep their natural length, so each has its own
shape). Logits come back only on the last pipeline stage, gathered over TP, trimmed to the HF
vocabulary and on the CPU (where the callers' token ids, metrics and saved probes are, on a GPU too);
other stages get ``None`` entries.
"""

from __future__ import annotations

from typing import Iterable

import torch

from hybridquant.model import causal_inputs
from hybridquant.parallel import gather_tp_logits


def _pp_size() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_pipeline_model_parallel_world_size()


def run(chunks: list, batches: Iterable[torch.Tensor], vocab_size: int | None = None) -> list:
    """Forward every [batch, seq] id tensor; return logits per batch if ``vocab_size`` is given."""
    outputs: list = []
    with torch.no_grad():
        for ids in batches:
            logits = _forward_one(chunks, ids)
            if vocab_size is not None:
                outputs.append(None if logits is None else gather_tp_logits(logits, vocab_size).cpu())
    return outputs


def _forward_one(chunks: list, ids: torch.Tensor):
    device = next(chunks[0].parameters()).device
    ids = ids.to(device)
    position_ids, mask = causal_inputs(ids)
    if _pp_size() == 1:
        return chunks[0](ids, position_ids, mask)

    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    captured = {}

    def step(data_iterator, model):
        batch = next(data_iterator)
        out = model(batch, position_ids, mask)

        def keep(output_tensor):
            captured["logits"] = output_tensor.detach()
            return output_tensor.new_zeros(()), {}

        return out, keep

    get_forward_backward_func()(
        forward_step_func=step, data_iterator=iter([ids]), model=chunks, num_microbatches=1,
        seq_length=ids.shape[1], micro_batch_size=ids.shape[0], forward_only=True,
    )
    if parallel_state.is_pipeline_last_stage():
        return captured["logits"]
    return None
