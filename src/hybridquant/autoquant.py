"""AutoQuantize on a Megatron HybridModel: a weight format per layer (and module kind) from ModelOpt's
sensitivity scores and a cost model, solved as one allocation under a budget at any layout.

The search space is what the base recipe quantizes: every module kind of its ``quantized_kinds`` in
every layer it does not keep in BF16. Everything else (attention, conv1d, router, embeddings,
lm_head, the kept layers) stays as the base recipe has it, also while scores are taken (the base
recipe is ModelOpt's fixed part of the search, its KV-cache quantizers included), and costs nothing:
effective bits are over the searched weights (4.5 = all NVFP4, 8 = all FP8, 16 = all BF16).

``mtq.auto_quantize`` does the work: calibration of each candidate format, the scores (``gradient``:
the second-order Taylor estimate from the LM loss; ``kl_div``: the KL divergence of the logits),
the per-rank score checkpoint and the solve. ``compat.modelopt_autoquant`` makes the solve global
over pipeline stages and fixes two layout dependencies of the scores.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from hybridquant import forward, modules, parallel, recipes
from hybridquant.compat import modelopt_autoquant, patch_modelopt
from hybridquant.errors import UserError
from hybridquant.model import causal_inputs

log = logging.getLogger("hybridquant.autoquant")

METHODS = ("gradient", "kl_div")
COST_MODELS = ("weight", "active_moe")
# Module kinds ModelOpt groups into one decision (all experts of a layer, fc1 and fc2: one format).
_GROUPED = {"routed_expert.fc1": "routed_expert", "routed_expert.fc2": "routed_expert"}


@dataclass
class Options:
    effective_bits: float
    formats: list[str]
    presets: dict[str, str]
    method: str
    cost_model: str
    score_samples: int
    also_solve: list[float] = field(default_factory=list)


def options(conf, calib_samples: int) -> Options:
    """The ``autoquant.*`` settings, checked before any process group exists."""
    presets = dict(conf.presets)
    formats = list(conf.formats)
    if not formats:
        raise UserError("autoquant.formats is empty: name at least one of " + ", ".join(sorted(presets)))
    for name in formats:
        if name not in presets:
            raise UserError(f"autoquant.formats: {name!r} is not in autoquant.presets ({', '.join(sorted(presets))})")
        if name == recipes.BF16:
            raise UserError("autoquant.formats: BF16 is always a candidate; list only quantized formats")
    if conf.method not in METHODS:
        raise UserError(f"autoquant.method must be one of {', '.join(METHODS)}, got {conf.method!r}")
    if conf.cost_model not in COST_MODELS:
        raise UserError(f"autoquant.cost_model must be one of {', '.join(COST_MODELS)}, got {conf.cost_model!r}")
    budgets = [float(conf.effective_bits), *(float(b) for b in conf.also_solve or [])]
    lowest = min(format_bits(presets[name]) for name in formats)
    for bits in budgets:
        if not lowest <= bits <= 16:
            raise UserError(f"autoquant budget {bits:g} effective bits is outside [{lowest:g}, 16] "
                            f"(the most compact candidate, {', '.join(formats)}, has {lowest:g})")
    score = int(conf.score_samples)
    if not 1 <= score <= calib_samples:
        raise UserError(f"autoquant.score_samples={score} must be between 1 and calib.num_samples={calib_samples}")
    return Options(effective_bits=float(conf.effective_bits), formats=formats, presets=presets, method=conf.method,
                   cost_model=conf.cost_model, score_samples=score, also_solve=budgets[1:])


def format_bits(preset: str) -> float:
    """Effective bits ModelOpt's cost model gives the weights of a preset (NVFP4 4.5, FP8 8)."""
    from modelopt.torch.quantization.algorithms import QuantRecipe

    return QuantRecipe(preset).compression * 16.0


def searched_kinds(recipe) -> list[str]:
    """Per-layer kinds the base recipe quantizes (its declared non-BF16 kinds)."""
    declared = recipes._plain(recipe.get("quantized_kinds") or {})
    return [k for k in modules.LAYER_KINDS if declared.get(k, recipes.BF16) != recipes.BF16]


def search_space(recipe, pattern: str, local_layers: list[int]) -> tuple[list[str], list[str]]:
    """Module-name patterns (rank-local) searched, and those excluded from the cost (everything else)."""
    kinds = searched_kinds(recipe)
    if not kinds:
        raise UserError(f"recipe {recipe.name!r} quantizes no per-layer module kind: nothing to search")
    kept = recipes.kept_bf16(recipe, pattern)
    symbols = modules.decoder_symbols(pattern)
    searched, excluded = [], ["*output_layer", "*embedding*"]
    for local, layer in enumerate(local_layers):
        for kind in modules.kinds_in_layer(symbols[layer]):
            path = modules.module_pattern(kind, local)
            if kind in kinds and layer not in kept.get(kind, ()):
                searched.append(path)
            else:
                excluded.append(path)
    return searched, excluded


def active_expert_ratio(provider) -> float:
    """Routed experts active per token (top-k / experts), from the Megatron config; ModelOpt infers it
    only from Hugging Face config names."""
    experts = getattr(provider, "num_moe_experts", None)
    topk = getattr(provider, "moe_router_topk", None)
    if not experts or not topk:
        raise UserError("autoquant.cost_model=active_moe needs a MoE model (no routed experts found)")
    return float(topk) / float(experts)


def group_key(name: str, layer_offset: int) -> str:
    """Layout-independent key of a ModelOpt decision ('<global layer>:<kind>'; experts grouped)."""
    module = modules.strip_wrappers(name.removesuffix(".quant_recipe"))
    kind = modules.kind_of(module)
    layer = modules.layer_index(module)
    if layer is None:
        return f"-1:{kind or module}"
    return f"{layer + layer_offset}:{_GROUPED.get(kind, kind)}"


def _pp_size() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_pipeline_model_parallel_world_size()


def _train_step(chunks: list, ids: torch.Tensor) -> None:
    """Forward and backward of the LM loss (mean next-token cross entropy of one sample) through all
    pipeline stages; gradients reach ModelOpt's score hooks."""
    ids = ids.to(next(chunks[0].parameters()).device)
    position_ids, mask = causal_inputs(ids)
    labels = torch.roll(ids, -1, dims=1)

    def loss_of(per_token):
        return per_token[:, :-1].float().mean()

    if _pp_size() == 1:
        loss_of(chunks[0](ids, position_ids, mask, labels=labels)).backward()
        return
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def step(data_iterator, model):
        out = model(next(data_iterator), position_ids, mask, labels=labels)
        return out, lambda output: (loss_of(output), {})

    get_forward_backward_func()(forward_step_func=step, data_iterator=iter([ids]), model=chunks, num_microbatches=1,
                                seq_length=ids.shape[1], micro_batch_size=ids.shape[0], forward_only=False)


def _logits_step(chunks: list, ids: torch.Tensor):
    """Forward only; the last stage gets TP-local logits (ModelOpt's KL is TP-aware), others None."""
    return forward._forward_one(chunks, ids)


class PhaseTimer:
    """Wall time of ModelOpt's scoring phase (the rest of auto_quantize is calibration and the solve)."""

    def __init__(self):
        self.seconds = 0.0

    def __enter__(self):
        from modelopt.torch.quantization import algorithms

        self._patched = []
        for cls in (algorithms.AutoQuantizeGradientSearcher, algorithms.AutoQuantizeKLDivSearcher):
            original = cls.__dict__["estimate_sensitivity_scores"]

            def timed(searcher, _original=original):
                t = time.perf_counter()
                try:
                    return _original(searcher)
                finally:
                    self.seconds += time.perf_counter() - t

            cls.estimate_sensitivity_scores = timed
            self._patched.append((cls, original))
        return self

    def __exit__(self, *exc):
        for cls, original in self._patched:
            cls.estimate_sensitivity_scores = original


@dataclass
class SearchResult:
    allocation: modelopt_autoquant.Allocation
    restored: bool
    score_s: float                          # ModelOpt's scoring phase (0 when restored)
    layers: dict[int, dict[str, str]]       # global layer -> kind -> format (searched kinds only)
    resolved: dict[float, dict] = field(default_factory=dict)  # other budgets: effective bits, formats


SCORES_FILE = "scores.pth"  # ModelOpt saves scores<rank>.pth next to it, one per rank


def rank_file(scores_dir: Path) -> Path:
    return scores_dir / f"scores{dist.get_rank() if dist.is_initialized() else 0}.pth"


def checkpoint_usable(scores_dir: Path) -> bool:
    """Whether every rank has a complete score checkpoint (calibration and scores); collective. When
    any rank lacks one, all start afresh (mixed restores would desynchronise the ranks' forwards)."""
    own = rank_file(scores_dir)
    ok = False
    if own.is_file():
        try:
            state = torch.load(own, weights_only=False)
            ok = bool(state.get("candidate_stats"))
        except Exception:  # noqa: BLE001 - a truncated file (killed while saving) is simply not usable
            ok = False
    usable = all(parallel.gather_objects(ok))
    if not usable:
        own.unlink(missing_ok=True)
    parallel.barrier()
    return usable


def search(chunks: list, recipe, pattern: str, opts: Options, batches: list[torch.Tensor], score_steps: int,
           scores_dir: Path, provider) -> SearchResult:
    """Run ModelOpt's AutoQuantize on this rank's model chunk with one global allocation: candidate
    formats calibrated on ``batches`` (this rank's), scores from the first ``score_steps``. Collective."""
    import modelopt.torch.quantization as mtq

    patch_modelopt()
    if len(chunks) != 1:
        raise NotImplementedError("virtual pipeline stages are not supported")
    local_layers = modules.global_layers(chunks[0])
    layer_offset = local_layers[0] if local_layers else 0
    searched, excluded = search_space(recipe, pattern, local_layers)
    fixed = recipes.modelopt_config(recipe, pattern, local_layers)
    cost: dict[str, Any] = {"excluded_module_name_patterns": excluded}
    if opts.cost_model == "active_moe":
        cost["active_moe_expert_ratio"] = active_expert_ratio(provider)
    constraints = {"effective_bits": opts.effective_bits, "cost_model": opts.cost_model, "cost": cost}
    restored = checkpoint_usable(scores_dir)
    parallel.barrier()

    def calib_step(model, ids):
        forward.run(chunks, [ids])

    key_of = lambda name: group_key(name, layer_offset)
    with modelopt_autoquant.global_allocation(key_of) as allocation, \
            modelopt_autoquant.scores_counted_once(), \
            modelopt_autoquant.kl_scores_over_pipeline(key_of), PhaseTimer() as scoring:
        kwargs: dict[str, Any] = {}
        if opts.method == "gradient":
            kwargs["forward_backward_step"] = lambda model, ids: _train_step(chunks, ids)
            forward_step = calib_step
        else:
            forward_step = lambda model, ids: _logits_step(chunks, ids)
        try:
            chunks[0], _state = mtq.auto_quantize(
                chunks[0], constraints=constraints, data_loader=batches, forward_step=forward_step,
                fixed_quantization_config=fixed, method=opts.method, checkpoint=str(scores_dir / SCORES_FILE),
                module_search_spaces=[{"module_name_patterns": searched,
                                       "quantization_formats": [opts.presets[f] for f in opts.formats]}],
                num_calib_steps=len(batches), num_score_steps=score_steps, verbose=False, **kwargs)
        except ValueError as exc:  # ModelOpt's own checks (infeasible budget, grouping): one line
            raise UserError(f"autoquant: {str(exc).splitlines()[0]}") from None
    score_s = scoring.seconds
    names = {opts.presets[f]: f for f in opts.formats} | {modelopt_autoquant.NO_QUANT: recipes.BF16}
    layers = _layers_of(allocation.choice, names, allocation.stats)
    resolved = {}
    cls = _searcher_cls(opts.method)
    for bits in opts.also_solve:
        choice, satisfied, _max_cost, _total = modelopt_autoquant.solve(cls, allocation.stats, bits)
        chosen = {k: allocation.stats[k]["formats"][i] for k, i in choice.items()}
        resolved[bits] = {"satisfied": satisfied, "effective_bits": achieved_bits(allocation.stats, chosen),
                          "layers": _layers_of(chosen, names, allocation.stats)}
    return SearchResult(allocation=allocation, restored=restored, score_s=score_s, layers=layers, resolved=resolved)


def _searcher_cls(method: str):
    from modelopt.torch.quantization import algorithms

    return algorithms.AutoQuantizeGradientSearcher if method == "gradient" else algorithms.AutoQuantizeKLDivSearcher


def _layers_of(choice: dict[str, str], names: dict[str, str], stats: dict) -> dict[int, dict[str, str]]:
    """Global layer -> kind -> format name of the searched decisions (the fixed ones are the base recipe's)."""
    out: dict[int, dict[str, str]] = {}
    for key, fmt in choice.items():
        layer, _, kind = key.partition(":")
        if int(layer) < 0 or stats[key]["is_fixed"]:
            continue
        kinds = [k for k, g in _GROUPED.items() if g == kind] or [kind]
        for k in kinds:
            out.setdefault(int(layer), {})[k] = names.get(fmt, fmt)
    return out


def achieved_bits(stats: dict, chosen: dict[str, str]) -> float:
    """Effective bits of a choice under the cost model (cost of the chosen formats / BF16 cost, x16)."""
    total = sum(s["uncompressed_cost"] for s in stats.values())
    used = sum(s["costs"][s["formats"].index(chosen[k])] for k, s in stats.items())
    return 16.0 * used / total if total else 16.0


def table(result: SearchResult, names: dict[str, str]) -> list[dict]:
    """One row per searched decision: layer, kinds, modules, chosen format, score and cost of each candidate."""
    rows = []
    for key, stat in result.allocation.stats.items():
        layer, _, kind = key.partition(":")
        if int(layer) < 0 or stat["is_fixed"]:
            continue
        chosen = result.allocation.choice[key]
        rows.append({
            "layer": int(layer), "kind": kind, "format": names.get(chosen, chosen),
            "modules": len(stat["module_names"]),
            "candidates": {names.get(f, f): {"score": s, "cost": c}
                           for f, s, c in zip(stat["formats"], stat["scores"], stat["costs"])},
        })
    return rows


def recipe_document(base, opts: Options, layers: dict[int, dict[str, str]], name: str, bits: float) -> dict:
    """The recipe ``pipeline/quantize.py +quant=file quant.path=<file>`` reproduces the run with."""
    base = recipes._plain(base)
    doc = {k: base[k] for k in ("preset", "kv_cache", "activations", "algorithm", "keep_bf16", "router_dtype",
                                "overrides") if k in base}
    used = sorted({f for kinds in layers.values() for f in kinds.values()} - {recipes.BF16})
    return {
        "name": name,
        "description": f"AutoQuantize ({opts.method}, {opts.cost_model} cost) of {base['name']} at "
                       f"{bits:.2f} effective bits over its quantized modules: " + ", ".join(opts.formats) + " or BF16 per layer",
        "format": "MIXED_PRECISION",
        "quantized_kinds": {k: "MIXED" for k in searched_kinds(base)},
        **doc,
        "formats": {f: opts.presets[f] for f in used},
        "layers": {str(layer): dict(sorted(kinds.items())) for layer, kinds in sorted(layers.items())},
    }
