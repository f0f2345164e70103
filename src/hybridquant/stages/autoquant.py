"""The autoquant stage: base recipe + budget -> per-layer formats (ModelOpt AutoQuantize) -> recipe file
-> quantized checkpoint made with that recipe, exactly as ``pipeline/quantize.py +quant=file
quant.path=<run>/recipe.yaml`` makes it.

Run directory (``hydra.run.dir``)::

    config.yaml        the resolved configuration
    recipe.yaml        the chosen formats as a recipe (per layer and module kind)
    autoquant.json     per decision: layer, kind, chosen format, score and cost of every candidate
    autoquant.md       the same as a table
    sensitivity.png    the scores per layer and format (autoquant.plot)
    checkpoint/        the quantized Megatron checkpoint (export, evaluate, generate, release read it)
    probe.pt           held-out logits before and after quantization
    report.json        the quantize report plus an ``autoquant`` section (written last)

Scores are kept per rank in ``autoquant.scores_dir`` (outside the run directory: another budget
reuses them); ``meta.json`` there says what they were computed for, and a run with other settings
is refused rather than given foreign scores.
"""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from hybridquant import (
    autoquant,
    calib,
    modules,
    model,
    parallel,
    recipes,
    reporting,
    rundir,
    source,
)
from hybridquant.errors import UserError
from hybridquant.schema import QuantConf
from hybridquant.stages import quantize

log = logging.getLogger("hybridquant.autoquant")

STALE = (*quantize.STALE, "recipe.yaml", "autoquant.json", "autoquant.md", "sensitivity.png")


@dataclass
class Plan:
    base: quantize.Plan
    options: autoquant.Options


def plan(cfg: DictConfig) -> Plan:
    base = quantize.plan(cfg)
    opts = autoquant.options(cfg.autoquant, calib.validate(cfg.calib))
    autoquant.search_space(base.recipe, base.pattern, list(range(len(modules.decoder_symbols(base.pattern)))))
    if opts.score_samples % base.layout.dp:
        raise UserError(f"autoquant.score_samples={opts.score_samples} is not a multiple of the data-parallel size "
                        f"{base.layout.dp} (each rank scores the same number of its own samples)")
    if base.recipe.get("layers"):
        raise UserError(f"recipe {base.recipe.name!r} already has per-layer formats; give autoquant a base recipe")
    return Plan(base=base, options=opts)


def fingerprint(cfg: DictConfig, p: Plan) -> dict[str, Any]:
    """What the scores depend on (a score checkpoint is reused only for the same)."""
    return {
        "model": p.base.model_cfg.get("path") or p.base.model_cfg["name"],
        "model_seed": p.base.model_cfg.get("seed"),
        "dtype": p.base.model_cfg["dtype"],
        "base_recipe": recipes._plain(p.base.recipe),
        "layout": reporting.layout_dict(p.base.layout),
        "calib": OmegaConf.to_container(cfg.calib, resolve=True),
        "formats": {f: p.options.presets[f] for f in p.options.formats},
        "method": p.options.method,
        "cost_model": p.options.cost_model,
        "score_samples": p.options.score_samples,
    }


def check_scores_dir(scores_dir: Path, wanted: dict[str, Any]) -> bool:
    """Whether ``scores_dir`` holds scores for ``wanted`` (False: none yet); scores computed for other
    settings are an error. Every rank, before any process group exists."""
    differ = rundir.settings_differ(scores_dir / "meta.json", wanted, f"remove {scores_dir}")
    if differ is None:
        return False
    if differ:
        raise UserError(f"{scores_dir} holds scores computed with other settings ({', '.join(differ)}); "
                        "remove it or set autoquant.scores_dir")
    return True


def claim_scores_dir(scores_dir: Path, wanted: dict[str, Any]) -> None:
    """Main rank: create the score directory for ``wanted`` or check that it holds scores for it."""
    if check_scores_dir(scores_dir, wanted):
        return
    scores_dir.mkdir(parents=True, exist_ok=True)
    for stale in scores_dir.glob("scores*.pth"):
        stale.unlink()
    reporting.write_json_atomic(scores_dir / "meta.json", wanted)


def run(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    from megatron.core import parallel_state
    from transformers import AutoTokenizer

    t_start = time.perf_counter()
    p = plan(cfg)
    run_dir = Path(run_dir)
    scores_dir = Path(cfg.autoquant.scores_dir)
    check_scores_dir(scores_dir, fingerprint(cfg, p))
    parallel.init(p.base.layout, seed=cfg.seed, backend=cfg.cluster.backend, timeout_s=cfg.cluster.timeout_s)
    if parallel.is_main():
        rundir.prepare(run_dir, cfg, stale=STALE)
        claim_scores_dir(scores_dir, fingerprint(cfg, p))
    parallel.barrier()
    parallel.fault_point("load")

    t = time.perf_counter()
    hf_path = source.resolve(p.base.model_cfg)
    loaded = model.load_hf(str(hf_path), p.base.layout, p.base.model_cfg["dtype"], p.base.model_cfg["spec"],
                           router_dtype=recipes.router_dtype(p.base.recipe))
    tokenizer = AutoTokenizer.from_pretrained(str(hf_path))
    data = calib.from_config(cfg.calib, tokenizer)
    dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    local = calib.shard(data.samples, dp_rank, dp)
    load_s = time.perf_counter() - t

    t = time.perf_counter()
    result = autoquant.search(loaded.chunks, p.base.recipe, p.base.pattern, p.options, local.batches,
                              p.options.score_samples // dp, scores_dir, loaded.provider)
    search_s = time.perf_counter() - t
    parallel.fault_point("scored")
    del loaded
    gc.collect()

    names = {p.options.presets[f]: f for f in p.options.formats} | {autoquant.modelopt_autoquant.NO_QUANT: recipes.BF16}
    bits = autoquant.achieved_bits(result.allocation.stats, result.allocation.choice)
    recipe_name = f"{cfg.model.name}-{p.base.recipe.name}-aq{p.options.effective_bits:g}"
    doc = autoquant.recipe_document(p.base.recipe, p.options, result.layers, recipe_name, bits)
    rows = autoquant.table(result, names)
    recipe_file = run_dir / "recipe.yaml"
    if parallel.is_main():
        _write_text_atomic(recipe_file, "# Written by pipeline/autoquant.py; reproduce with:\n"
                                        f"#   pipeline/quantize.py +quant=file quant.path={recipe_file}\n"
                                        + OmegaConf.to_yaml(OmegaConf.create(doc)))
        reporting.write_json_atomic(run_dir / "autoquant.json", {"rows": rows, "effective_bits": bits})
        _write_text_atomic(run_dir / "autoquant.md", markdown(rows, bits, p.options))
        if cfg.autoquant.plot:
            plot(rows, p.options, bits, run_dir / "sensitivity.png")
    parallel.barrier()

    # Quantize with the recipe just written, as pipeline/quantize.py would.
    qcfg = cfg.copy()
    with open_dict(qcfg):
        qcfg.quant = OmegaConf.merge(OmegaConf.structured(QuantConf), {
            "name": recipe_name, "path": str(recipe_file), "preset": "(from quant.path)"})
    qp = quantize.plan(qcfg, layout=p.base.layout)
    calibrated = quantize.calibrate(qcfg, qp)
    calibrated.timings.update({"search_load_s": load_s, "search_s": search_s, "scoring_s": result.score_s,
                               "search_calibrate_s": search_s - result.score_s})
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["format"]] = counts.get(row["format"], 0) + 1
    extra = {"stage": "autoquant", "autoquant": {
        "base_recipe": p.base.recipe.name, "method": p.options.method, "cost_model": p.options.cost_model,
        "formats": p.options.formats, "effective_bits_budget": p.options.effective_bits,
        "effective_bits": bits, "satisfied": result.allocation.satisfied, "decisions": counts,
        "score_samples": p.options.score_samples, "scores_restored": result.restored, "scores_dir": str(scores_dir),
        "recipe_file": str(recipe_file),
        "also_solved": {f"{b:g}": {"effective_bits": r["effective_bits"], "satisfied": r["satisfied"],
                                   "layers": {str(k): v for k, v in r["layers"].items()}}
                        for b, r in result.resolved.items()},
    }}
    report = quantize.finish(qcfg, qp, run_dir, calibrated, t_start, extra=extra)
    if parallel.is_main():
        print(f"autoquant: {bits:.3f} effective bits (budget {p.options.effective_bits:g}), "
              + ", ".join(f"{k}×{v}" for k, v in sorted(counts.items()))
              + f"; scores {'restored from' if result.restored else 'saved in'} {scores_dir}; recipe {recipe_file}",
              flush=True)
    return report


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def markdown(rows: list[dict], bits: float, opts: autoquant.Options) -> str:
    formats = [*opts.formats, recipes.BF16]
    head = "| layer | kind | modules | format | " + " | ".join(f"score {f} | cost {f}" for f in formats) + " |"
    lines = [(f"AutoQuantize ({opts.method}, {opts.cost_model} cost): {bits:.3f} effective bits "
             f"(budget {opts.effective_bits:g})"), "", head, "|" + "---|" * (4 + 2 * len(formats))]
    for r in rows:
        cells = []
        for f in formats:
            c = r["candidates"].get(f)
            cells += [f"{c['score']:.3e}", f"{c['cost']:.0f}"] if c else ["-", "-"]
        lines.append(f"| {r['layer']} | {r['kind']} | {r['modules']} | {r['format']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], opts: autoquant.Options, bits: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['layer']}:{r['kind']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.3 * len(rows) + 2), 4.5), dpi=120)
    for i, fmt in enumerate(opts.formats):
        ys = [max(r["candidates"].get(fmt, {}).get("score", 0.0), 1e-12) for r in rows]
        ax.scatter(range(len(rows)), ys, label=f"{fmt} score", marker="os^v"[i % 4], s=18)
    chosen = [r["candidates"].get(r["format"], {}).get("score", 0.0) for r in rows]
    ax.scatter(range(len(rows)), [max(y, 1e-12) for y in chosen], facecolors="none", edgecolors="k", s=70,
               label="chosen (BF16: score 0)")
    ax.set_yscale("log")
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(labels, rotation=90, fontsize=6)
    ax.set_ylabel("sensitivity score")
    ax.set_title(f"AutoQuantize {opts.method}: {bits:.2f} effective bits (budget {opts.effective_bits:g})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(str(path), format="png")
    plt.close(fig)
