"""Narrow fixes to ModelOpt 0.47's AutoQuantize on Megatron models.

1. One allocation for the whole model under pipeline parallelism. The searchers solve the budget
over ``self.candidate_stats``, which holds only this rank's layers: scores and costs are reduced over
TP, DP and EP but not over pipeline stages, so each stage would solve its own budget (Megatron-LM
refuses auto-quantize at PP>1 for this reason). ``global_allocation`` replaces the solve: every
rank's candidate statistics are gathered under layout-independent keys, rank 0 runs ModelOpt's own
solver (the LP of the gradient method, the threshold search of the KL method) on all of them, and
each rank takes the choices of its own layers. ModelOpt then applies them as usual. Measured on the
tiny model at PP2 (6 bits): without it 11 of 25 formats differ from the single-process allocation,
with it none.

2. Scores counted more than once under TP. ``QuantRecipeHparam.get_score`` sums a module's per-rank
scores over its TP, DP and EP groups, which is right only when those ranks hold disjoint parts of the
computation. Two cases are not: a row-parallel linear's output is all-reduced, so every TP rank sees
the whole output perturbation and gradient and computes the whole layer's score (TP x the score;
column-parallel linears hold disjoint output slices and sum correctly); and expert linears are summed
over the expert-data-parallel group, which with ETP < TP holds TP peers that route the same tokens
through the same experts (TP/ETP x). Measured at TP2 on the tiny model (6 bits): every mamba
out_proj, shared-expert fc2 and routed-expert group scored exactly 2x its single-process value, which
changed 4 of 25 formats (at 5.5 bits with only the expert over-count, 6 of 25). The
per-rank scores of such modules are divided by that count before ModelOpt sums them.

3. KL-divergence scoring under pipeline parallelism. ModelOpt's loop runs one forward per
(local hparam, format); pipeline stages hold different hparams, so their forwards (collective) do not
pair up, and the logits exist only on the last stage. Under PP>1 the loop runs over the model's
hparams in one global order; the stage that owns one switches it, every stage runs the forward, and
the last stage's KL is sent to the owner (``kl_scores_over_pipeline``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.distributed as dist

NO_QUANT = "NONE"


def _name(recipe) -> str:
    return str(recipe).split("(")[0]


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _merge(local: dict, key_of: Callable[[str], str]) -> dict:
    """Every rank's candidate statistics under layout-independent keys (identical on every rank).
    Ranks of one stage hold the same statistics for a key after ModelOpt's TP/DP/EP reductions."""
    mine = {key_of(name): {"formats": [_name(f) for f in stat["formats"]], "scores": [float(s) for s in stat["scores"]],
                           "costs": [float(c) for c in stat["costs"]],
                           "uncompressed_cost": float(stat.get("uncompressed_cost", max(stat["costs"]))),
                           "module_names": list(stat.get("module_names", [])), "is_fixed": bool(stat.get("is_fixed")),
                           "allow_no_quant": bool(stat.get("allow_no_quant", True))}
            for name, stat in local.items()}
    return dict(sorted(_union_dicts(mine).items(), key=lambda kv: _sort_key(kv[0])))


def _sort_key(key: str):
    layer, _, rest = key.partition(":")
    return (int(layer) if layer.lstrip("-").isdigit() else 10**9, rest)


class Allocation:
    """What ``global_allocation`` saw and chose: the merged statistics and the chosen format per key."""

    def __init__(self):
        self.stats: dict = {}
        self.choice: dict[str, str] = {}
        self.satisfied = False
        self.max_cost = 0.0
        self.total_cost = 0.0


def solve(searcher_cls, stats: dict, effective_bits: float) -> tuple[dict[str, int], bool, float, float]:
    """ModelOpt's solver of ``searcher_cls`` on ``stats`` (merged statistics): key -> chosen index."""
    searcher = searcher_cls()
    searcher.candidate_stats = {k: {"formats": v["formats"], "scores": v["scores"], "costs": v["costs"]}
                                for k, v in stats.items()}
    searcher.config = {**searcher.default_search_config}
    searcher.cost_model = "weight"
    total = sum(v["uncompressed_cost"] for v in stats.values())
    max_cost = total * effective_bits / 16.0
    run = searcher_cls.run_search_with_stats
    best, satisfied = getattr(run, "modelopt_original", run)(searcher, max_cost, verbose=False)
    choice = {k: stats[k]["formats"].index(info["format"]) for k, info in best.items()}
    return choice, satisfied, max_cost, total


@contextlib.contextmanager
def global_allocation(key_of: Callable[[str], str]):
    """Within this context, ModelOpt's AutoQuantize solves one budget over all ranks' layers."""
    from modelopt.torch.quantization import algorithms

    allocation = Allocation()
    originals = {}

    def patched(cls):
        original = cls.run_search_with_stats

        def run_search_with_stats(self, max_weight_size, verbose=False):
            local = self.candidate_stats
            keys = {name: key_of(name) for name in local}
            stats = _merge(local, key_of)
            result = None
            if not dist.is_initialized() or dist.get_rank() == 0:
                result = solve(cls, stats, self.constraints["effective_bits"])
            if _world() > 1:
                box = [result]
                dist.broadcast_object_list(box, src=0)
                result = box[0]
            choice, satisfied, max_cost, total = result
            allocation.stats, allocation.satisfied = stats, satisfied
            allocation.max_cost, allocation.total_cost = max_cost, total
            allocation.choice = {k: stats[k]["formats"][i] for k, i in choice.items()}
            best = {}
            for name, stat in local.items():
                index = choice[keys[name]]
                if [_name(f) for f in stat["formats"]] != stats[keys[name]]["formats"]:
                    raise RuntimeError(f"AutoQuantize: {name} has other candidate formats than {keys[name]} on another rank")
                best[name] = {"format": stat["formats"][index], "costs": stat["costs"][index],
                              "scores": stat["scores"][index]}
            return best, satisfied

        originals[cls] = original
        run_search_with_stats.modelopt_original = original
        cls.run_search_with_stats = run_search_with_stats

    for cls in (algorithms.AutoQuantizeGradientSearcher, algorithms.AutoQuantizeKLDivSearcher):
        patched(cls)
    try:
        yield allocation
    finally:
        for cls, original in originals.items():
            cls.run_search_with_stats = original


def _group_size(state, attr: str) -> int:
    group = getattr(state, attr, None)
    return group.world_size() if group is not None and group.is_initialized() else 1


def duplicate_count(module) -> int:
    """How many ranks of the groups ModelOpt sums a module's score over compute that same score (the
    same tokens through the same weights), so that dividing by it counts it once (see 2. above)."""
    from megatron.core import parallel_state

    state = getattr(module, "parallel_state", None)
    if state is None:
        return 1
    expert_group = getattr(state, "expert_model_parallel_group", None)
    if expert_group is not None and expert_group.is_initialized():
        # Expert linears: summed over the expert-data-parallel group, which holds the TP peers of a rank
        # when ETP < TP; TP peers route the same tokens through the same (whole, ETP=1) experts.
        tp = parallel_state.get_tensor_model_parallel_world_size()
        return max(1, tp // _group_size(state, "tensor_parallel_group"))
    tp = _group_size(state, "tensor_parallel_group")
    if tp > 1 and getattr(module, "_is_row_parallel", False) and not getattr(module, "sequence_parallel", False):
        return tp  # the output is all-reduced: every TP rank sees the whole perturbation
    return 1


@contextlib.contextmanager
def scores_counted_once():
    """Divide per-rank scores by ``duplicate_count`` before ModelOpt sums them (see 2. above)."""
    from modelopt.torch.quantization import algorithms

    base = algorithms._AutoQuantizeBaseSearcher
    original = base.initialize_candidate_stats

    def initialize_candidate_stats(self):
        from modelopt.torch.opt.utils import named_hparams

        seen = set()
        for _, hparam in named_hparams(self.model, unique=True):
            if not isinstance(hparam, algorithms.QuantRecipeHparam) or id(hparam) in seen:
                continue
            seen.add(id(hparam))
            for per_module in hparam._importance_dict.values():
                for module, importance in per_module.items():
                    count = duplicate_count(module)
                    if importance is not None and count > 1:
                        per_module[module] = importance / count
        return original(self)

    base.initialize_candidate_stats = initialize_candidate_stats
    try:
        yield
    finally:
        base.initialize_candidate_stats = original


def _pp_group():
    from megatron.core import parallel_state

    return parallel_state.get_pipeline_model_parallel_group(), parallel_state.get_pipeline_model_parallel_last_rank()


@contextlib.contextmanager
def kl_scores_over_pipeline(key_of: Callable[[str], str]):
    """KL-divergence scoring in one global (hparam, format) order over pipeline stages (see 3. above)."""
    from megatron.core import parallel_state
    from modelopt.torch.opt.utils import named_hparams
    from modelopt.torch.quantization import algorithms

    cls = algorithms.AutoQuantizeKLDivSearcher
    original = cls.estimate_sensitivity_scores
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        yield
        return

    @torch.inference_mode()
    def estimate_sensitivity_scores(self):
        no_quant = algorithms.QuantRecipe(quant_cfg=None)
        mine = {}
        for name, hparam in named_hparams(self.model, unique=True):
            if isinstance(hparam, algorithms.QuantRecipeHparam) and hparam.is_configurable:
                mine[key_of(name)] = hparam
        formats = _union_dicts({k: [_name(r) for r in h.choices if r != no_quant] for k, h in mine.items()})
        order = sorted(formats, key=_sort_key)
        group, last = _pp_group()
        lm_head = algorithms._get_lm_head(self.model)
        device = next(self.model.parameters()).device

        def set_unquantized():
            for hparam in mine.values():
                hparam.active = no_quant

        self.model.eval()
        for _, data in zip(range(self.config["num_score_steps"]), self.config["data_loader"]):
            set_unquantized()
            logits = self.config["forward_step"](self.model, data)
            log_prob = algorithms._get_log_prob(logits, lm_head=lm_head) if logits is not None else None
            for key in order:
                hparam = mine.get(key)
                for fmt in formats[key]:
                    if hparam is not None:
                        hparam.active = next(r for r in hparam.choices if _name(r) == fmt)
                    quant_logits = self.config["forward_step"](self.model, data)
                    score = torch.zeros((), dtype=torch.float32, device=device)
                    if quant_logits is not None:
                        score = algorithms._get_kl_div_loss(log_prob, quant_logits, lm_head).float()
                    dist.broadcast(score, src=last, group=group)
                    if hparam is not None:
                        recipe = hparam.active
                        module = hparam.score_modules[0]
                        seen = hparam._importance_dict[recipe][module]
                        hparam._importance_dict[recipe][module] = score.clone() if seen is None else seen + score
                if hparam is not None:
                    hparam.active = no_quant

    cls.estimate_sensitivity_scores = estimate_sensitivity_scores
    try:
        yield
    finally:
        cls.estimate_sensitivity_scores = original


def _union_dicts(local: dict) -> dict:
    """Every rank's entries (the lowest rank's where several have a key), on every rank."""
    from hybridquant.parallel import gather_objects

    out: dict = {}
    for part in gather_objects(local):
        for k, v in part.items():
            out.setdefault(k, v)
    return out
