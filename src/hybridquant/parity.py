"""Layout parity: calibrate the same model on the same data under several parallel layouts and
compare every quantizer's amax under its layout-independent name.

``worker`` runs inside one torchrun job and loops over layouts that fit its world size (Megatron's
model-parallel groups are rebuilt for each); ``compare`` lines the results up against a reference.
"""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path
from typing import Iterable, Mapping

import torch

from hybridquant import parallel

_LAYOUT = re.compile(r"(tp|pp|ep|etp|dp)(\d+)")


def layout_sizes(spec: str) -> dict[str, int]:
    """'tp2ep2' -> {'tp': 2, 'ep': 2}; '1x1x1' -> {}."""
    found = _LAYOUT.findall(spec)
    if "".join(f"{k}{v}" for k, v in found) != spec and spec != "1x1x1":
        raise ValueError(f"bad layout {spec!r}: use e.g. tp2, pp2ep2, dp2, 1x1x1")
    return {k: int(v) for k, v in found}


def parse_layout(spec: str, world_size: int) -> parallel.Layout:
    """'tp2ep2' -> Layout(tp=2, ep=2, world_size=...). 'dpN' names the data-parallel size only;
    it must equal what the world size leaves (world / (tp*pp))."""
    sizes = layout_sizes(spec)
    layout = parallel.Layout(tp=sizes.get("tp", 1), pp=sizes.get("pp", 1), ep=sizes.get("ep", 1),
                             etp=sizes.get("etp", 1), world_size=world_size)
    if "dp" in sizes and sizes["dp"] != layout.dp:
        raise ValueError(f"layout {spec!r} needs world size {sizes['dp'] * layout.tp * layout.pp}, got {world_size}")
    return layout


def amax_by_name(records) -> dict[str, list[float]]:
    return {f"{r.name}.{r.role}": r.amax for r in records if r.amax is not None}


def blocks_by_name(records) -> dict[str, dict]:
    return {f"{r.name}.{r.role}": r.blocks for r in records if r.blocks is not None}


def worker(cfgs: dict, cases: Mapping[str, Iterable[str]], out_file: Path) -> None:
    """Collective over the torchrun world: for each recipe (``cfgs``: recipe name -> composed
    config) calibrate under each of its layouts (``cases``); rank 0 writes ``{recipe: {layout: result}}``."""
    from megatron.core import parallel_state

    from hybridquant.stages import quantize as stage

    results: dict[str, dict] = {}
    world = parallel.world_size_from_env()
    for recipe, cfg in cfgs.items():
        for spec in cases[recipe]:
            layout = parse_layout(spec, world)
            plan = stage.plan(cfg, layout)
            t0 = time.perf_counter()
            parallel.init(layout, seed=cfg.seed, backend=cfg.cluster.backend, timeout_s=cfg.cluster.timeout_s)
            result = stage.calibrate(cfg, plan)
            wall = time.perf_counter() - t0
            rss = stage.gather_peak_rss_mb()
            if parallel.is_main():
                results.setdefault(recipe, {})[spec] = {
                    "layout": {"tp": layout.tp, "pp": layout.pp, "ep": layout.ep, "etp": layout.etp,
                               "dp": layout.dp, "world_size": world},
                    "amax": amax_by_name(result.records),
                    "blocks": blocks_by_name(result.records),
                    "logits_before": result.logits_before.tolist(),
                    "logits_after": result.logits_after.tolist(),
                    "coverage": result.coverage["tokens_per_expert"],
                    "wall_s": wall,
                    "peak_rss_mb_per_rank": rss,
                }
            del result
            parallel_state.destroy_model_parallel()
    if parallel.is_main():
        Path(out_file).write_text(json.dumps(results))
    parallel.barrier()


def compare(reference: dict, other: dict) -> dict:
    ref, got = reference["amax"], other["amax"]
    common = sorted(set(ref) & set(got))
    diffs = [max(abs(a - b) for a, b in zip(ref[k], got[k])) if len(ref[k]) == len(got[k]) else math.inf
             for k in common]
    rel = [d / max(max(abs(v) for v in ref[k]), 1e-30) for d, k in zip(diffs, common)]
    worst = max(range(len(common)), key=lambda i: diffs[i]) if common else None
    logits_ref, logits = torch.tensor(reference["logits_after"]), torch.tensor(other["logits_after"])
    before_ref, before = torch.tensor(reference["logits_before"]), torch.tensor(other["logits_before"])
    return {
        "matched": len(common),
        "missing": sorted(set(ref) - set(got)),
        "extra": sorted(set(got) - set(ref)),
        "max_abs_amax_diff": max(diffs) if diffs else 0.0,
        "max_rel_amax_diff": max(rel) if rel else 0.0,
        "identical": sum(1 for d in diffs if d == 0.0),
        "worst": common[worst] if worst is not None else None,
        "max_abs_logit_diff": (logits - logits_ref).abs().max().item(),
        "max_abs_logit_diff_unquantized": (before - before_ref).abs().max().item(),
        "coverage_equal": reference["coverage"] == other["coverage"],
        # per-block weight amax (whole weight, whatever the split): block statistics and checksum equal
        "blocks_matched": len(set(reference["blocks"]) & set(other["blocks"])),
        "blocks_identical": sum(1 for k, v in reference["blocks"].items() if other["blocks"].get(k) == v),
    }
