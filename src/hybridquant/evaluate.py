"""How far a quantized model is from its reference on held-out text: the metrics, without collectives.

For each held-out token position ``t`` with reference next-token distribution ``p`` and quantized
distribution ``q`` (softmax of the logits, over the HF vocabulary):

* ``KL(p || q) = sum_v p_v (log p_v - log q_v)`` in nats; reported as the mean over positions, the
  99th percentile and the maximum;
* top-1 agreement: the share of positions where ``argmax q == argmax p``;
* perplexity of each model: ``exp`` of the mean negative log-likelihood of the actual next token
  (positions ``0 .. T-2`` of every sample);
* per decoder layer ``i``: the relative L2 error of the layer's output (the residual stream after
  the layer) over all tokens, ``||h_q - h_ref|| / ||h_ref||``. The quantized model runs on its own
  outputs, so the error accumulates through the depth, as it does when the model is served.

Layer outputs are captured with forward hooks, from a Megatron model (``[seq, batch, hidden]``, only
the layers this pipeline stage holds, under their global numbers) or from transformers'
NemotronHForCausalLM (``[batch, seq, hidden]``). Gathering results over ranks is the stage's job.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch

from hybridquant import modules


@dataclass
class Outputs:
    """One model's outputs on the evaluation samples (logits only on the last pipeline stage)."""
    logits: list                                  # per sample: [1, seq, vocab] float32, or None
    layers: dict[int, list] = field(default_factory=dict)  # global layer -> per sample [tokens, hidden]


def megatron_layers(chunks: list) -> dict[int, torch.nn.Module]:
    """This rank's decoder layers by global index (pipeline stages number their layers from 0)."""
    return {layer.layer_number - 1: layer for chunk in chunks for layer in modules.unwrap(chunk).decoder.layers}


def hf_layers(model) -> dict[int, torch.nn.Module]:
    """transformers' decoder blocks (the base model is ``model`` in transformers 5, ``backbone`` before)."""
    return dict(enumerate(model.get_decoder().layers))


class LayerCapture(contextlib.AbstractContextManager):
    """Record every listed layer's output, per forward call, as float32 [tokens, hidden] rows."""

    def __init__(self, layers: dict[int, torch.nn.Module], seq_first: bool):
        self.outputs: dict[int, list] = {i: [] for i in layers}
        self._handles = [layer.register_forward_hook(self._hook(i, seq_first)) for i, layer in layers.items()]

    def _hook(self, index: int, seq_first: bool):
        def hook(_module, _inputs, output):
            hidden = output[0] if isinstance(output, tuple) else output
            if seq_first:
                hidden = hidden.transpose(0, 1)
            self.outputs[index].append(hidden.detach().reshape(-1, hidden.shape[-1]).float().cpu())
        return hook

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        return False


@torch.no_grad()
def hf_outputs(model, samples: list[torch.Tensor]) -> Outputs:
    """transformers' model on every sample (one forward each), with its layer outputs."""
    with LayerCapture(hf_layers(model), seq_first=False) as capture:
        logits = [model(ids, use_cache=False).logits.float() for ids in samples]
    return Outputs(logits=logits, layers=capture.outputs)


def nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of each actual next token, positions 0..T-2, float64."""
    logp = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    return -logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1).reshape(-1)


def token_metrics(reference: list, quantized: list, samples: list[torch.Tensor]) -> dict[str, float]:
    """KL(reference || quantized) per position (mean, p99, max), top-1 agreement, perplexity."""
    kls, agree, nlls = [], [], []
    for ref, q, ids in zip(reference, quantized, samples):
        logp = torch.log_softmax(ref.double(), dim=-1)
        logq = torch.log_softmax(q.double(), dim=-1)
        kls.append((logp.exp() * (logp - logq)).sum(-1).clamp_min(0.0).reshape(-1))
        agree.append((ref.argmax(-1) == q.argmax(-1)).reshape(-1))
        nlls.append(nll(q, ids))
    kl, nll_all = torch.cat(kls), torch.cat(nlls)
    return {"kl_mean": kl.mean().item(), "kl_p99": torch.quantile(kl, 0.99).item(), "kl_max": kl.max().item(),
            "top1_agreement": torch.cat(agree).float().mean().item(), "nll": nll_all.mean().item(),
            "perplexity": math.exp(nll_all.mean().item()), "positions": int(kl.numel())}


def perplexity(logits: list, samples: list[torch.Tensor]) -> dict[str, float]:
    values = torch.cat([nll(x, ids) for x, ids in zip(logits, samples)])
    return {"nll": values.mean().item(), "perplexity": math.exp(values.mean().item()), "positions": int(values.numel())}


def layer_sums(reference: dict[int, list], quantized: dict[int, list]) -> dict[int, tuple[float, float]]:
    """Per layer (of those both hold): (sum ||h_q - h_ref||^2, sum ||h_ref||^2) over every token, float64."""
    out = {}
    for index in sorted(set(reference) & set(quantized)):
        diff = sum(((q.double() - r.double()) ** 2).sum().item() for r, q in zip(reference[index], quantized[index]))
        ref = sum((r.double() ** 2).sum().item() for r in reference[index])
        out[index] = (diff, ref)
    return out


def layer_errors(sums: dict[int, tuple[float, float]], pattern: str) -> list[dict]:
    """Relative L2 error per global layer, with the layer's kind (M Mamba, E MoE, * attention, - MLP)."""
    symbols = modules.decoder_symbols(pattern)
    return [{"layer": i, "kind": symbols[i], "rel_l2": math.sqrt(d / r) if r > 0 else float("nan")}
            for i, (d, r) in sorted(sums.items())]


@contextlib.contextmanager
def weights_only(chunks: list):
    """Only the weight quantizers on (activation and KV-cache quantizers off): the numerics an exported
    checkpoint holds, before a serving engine adds its own activation quantization."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    switched = [m for chunk in chunks for name, m in chunk.named_modules()
                if isinstance(m, TensorQuantizer) and not name.endswith("weight_quantizer") and m.is_enabled]
    for m in switched:
        m.disable()
    try:
        yield
    finally:
        for m in switched:
            m.enable()
