"""Expert coverage during calibration, and all-expert calibration.

``ExpertCoverage`` hooks every MoE router while calibration runs and counts, per layer and global
expert index, how many calibration tokens the model routed to each expert (summed over data-parallel
ranks: every DP rank routes its own tokens; TP ranks route the same tokens and are not summed).

With ``all_experts=True`` the router's choice is kept for the model's output but every token is
also *dispatched* to every expert: the routing map is all-true while the routing probabilities of
the experts the router did not choose stay exactly zero. Every expert's quantizers then see every
calibration token, and each token's output is the routed one (the extra experts' outputs are
multiplied by 0 before they are summed). This works across EP ranks because it goes through the
model's own token dispatcher.

Experts that receive no token still get a weight amax (ModelOpt computes it from the weight); their
input amax follows ModelOpt's Megatron policy: input amax is shared by all experts of a layer (the
max over the layer's experts, synchronised over EP), so no expert is left without one. The report
names the policy and lists the experts that saw no token.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from hybridquant import modules

INPUT_AMAX_POLICY = (
    "layer_max: every expert's input amax is the max over all experts of its layer "
    "(ModelOpt Megatron plugin, synchronised over EP); experts without tokens inherit it"
)


class ExpertCoverage:
    def __init__(self, chunks: list, all_experts: bool = False):
        self.chunks = chunks
        self.all_experts = all_experts
        self.counts: dict[int, torch.Tensor] = {}  # global layer index -> tokens the router sent to each expert
        self.seen: dict[int, torch.Tensor] = {}    # ... tokens each expert computed on (all of them with all_experts)
        self._handles = []
        self._topk: list[tuple[object, int]] = []
        self.counting = True  # off while a rank repeats samples to keep forward counts equal

    def __enter__(self) -> "ExpertCoverage":
        from megatron.core.transformer.moe.router import TopKRouter

        for chunk in self.chunks:
            layers = modules.unwrap(chunk).decoder.layers
            offset = layers[0].layer_number - 1 if len(layers) else 0
            for name, mod in chunk.named_modules():
                if isinstance(mod, TopKRouter):
                    layer = modules.layer_index(name) + offset
                    self._handles.append(mod.register_forward_hook(self._hook(layer)))
            if self.all_experts and chunk.config.num_moe_experts:
                # The router keeps its own top-k (read at construction); the dispatcher sizes its
                # buffers from the config's, which must now count every expert.
                self._topk.append((chunk.config, chunk.config.moe_router_topk))
                chunk.config.moe_router_topk = chunk.config.num_moe_experts
        return self

    def _hook(self, layer: int):
        def hook(_module, _inputs, output):
            probs, routing_map = output
            counts = routing_map.sum(dim=0).to(torch.float64).cpu() * self.counting
            self.counts[layer] = self.counts.get(layer, torch.zeros_like(counts)) + counts
            if self.all_experts:
                routing_map = torch.ones_like(routing_map)
            seen = routing_map.sum(dim=0).to(torch.float64).cpu() * self.counting
            self.seen[layer] = self.seen.get(layer, torch.zeros_like(seen)) + seen
            return probs, routing_map

        return hook

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for config, topk in self._topk:
            config.moe_router_topk = topk
        self._topk.clear()

    def _merged(self, counts: dict[int, torch.Tensor]) -> dict[str, list[int]]:
        """Collective: per-layer counts summed over DP ranks, merged over pipeline stages."""
        from megatron.core import parallel_state

        local = {layer: counts[layer].clone() for layer in sorted(counts)}
        if dist.is_initialized() and parallel_state.get_data_parallel_world_size() > 1:
            for layer in local:
                dist.all_reduce(local[layer], group=parallel_state.get_data_parallel_group())
        merged = {layer: [int(v) for v in t.tolist()] for layer, t in local.items()}
        if dist.is_initialized() and dist.get_world_size() > 1:
            everyone = [None] * dist.get_world_size()
            dist.all_gather_object(everyone, merged)
            merged = {}
            for part in everyone:
                merged.update(part)
        return {str(layer): c for layer, c in sorted(merged.items())}

    def report(self, all_experts: bool) -> dict:
        """Collective. ``tokens_per_expert``: what the router chose; ``tokens_seen_per_expert``: what
        each expert's quantizers calibrated on (every token, with all-expert calibration)."""
        per_layer = self._merged(self.counts)
        seen = self._merged(self.seen)
        untouched = {layer: [e for e, c in enumerate(counts) if c == 0] for layer, counts in seen.items()}
        return {
            "tokens_per_expert": per_layer,
            "tokens_seen_per_expert": seen,
            "experts_without_tokens": {k: v for k, v in untouched.items() if v},
            "all_expert_calibration": all_experts,
            "input_amax_policy": INPUT_AMAX_POLICY,
            "weight_amax_policy": "from the weights (independent of routing)",
        }
