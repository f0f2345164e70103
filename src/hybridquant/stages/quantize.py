"""The quantize stage: HF checkpoint -> Megatron HybridModel -> ModelOpt PTQ -> checkpoint + report.

Run directory (``hydra.run.dir``)::

    config.yaml        the resolved configuration
    checkpoint/        quantized Megatron distributed checkpoint with ModelOpt state
    probe.pt           held-out token ids and their logits before and after quantization
    report.json        summary, every quantizer's amax, expert coverage, calibration data, timings

``report.json`` is written only after everything else succeeded, and an old one is removed first,
so its presence means the run directory is complete.
"""

from __future__ import annotations

import logging
import resource
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from hybridquant import (calib, checkpoint, coverage, forward, memory, model, modules, parallel, quantization,
                         recipes, reporting, rundir, source)
from hybridquant.errors import UserError

log = logging.getLogger("hybridquant.quantize")


@dataclass
class Plan:
    """What a run will do, checked before any process group exists."""
    recipe: DictConfig
    layout: parallel.Layout
    mtq_config: dict                  # for the whole model; each rank quantizes with local_config()
    model_cfg: dict
    pattern: str                      # the model's hybrid layer pattern

    def local_config(self, chunk) -> dict:
        """The ModelOpt config for this rank's layers (per-layer rules use rank-local indices)."""
        return recipes.modelopt_config(self.recipe, self.pattern, modules.global_layers(chunk))


@dataclass
class Calibrated:
    loaded: model.LoadedModel
    hf_path: Path
    data: calib.CalibSet
    probe_ids: torch.Tensor
    logits_before: torch.Tensor
    logits_after: torch.Tensor
    records: list
    coverage: dict
    timings: dict = field(default_factory=dict)


def layout_from(cfg: DictConfig, world_size: int | None = None) -> parallel.Layout:
    p = cfg.parallel
    return parallel.Layout(tp=p.tp, pp=p.pp, ep=p.ep, etp=p.etp,
                           world_size=world_size or parallel.world_size_from_env())


def plan(cfg: DictConfig, layout: parallel.Layout | None = None) -> Plan:
    recipe = recipes.require_recipe(cfg)
    layout = layout or layout_from(cfg)
    model_cfg, hf_cfg = source.prepare(source.config_dict(cfg.model))
    arch = source.architecture(model_cfg, hf_cfg)
    parallel.validate(layout, arch)
    calib.validate(cfg.calib)
    calib.require_positive("probe_samples", cfg.probe_samples)
    if cfg.calib.all_experts and layout.etp > 1:
        raise UserError("calib.all_experts=true needs parallel.etp=1")
    pattern = arch["hybrid_override_pattern"]
    return Plan(recipe=recipe, layout=layout, mtq_config=recipes.modelopt_config(recipe, pattern),
                model_cfg=model_cfg, pattern=pattern)


def calibrate(cfg: DictConfig, p: Plan) -> Calibrated:
    """Load, calibrate and quantize for the current (initialised) layout. Collective."""
    from megatron.core import parallel_state
    from transformers import AutoTokenizer

    timings = {}
    t = time.perf_counter()
    hf_path = source.resolve(p.model_cfg)
    loaded = model.load_hf(str(hf_path), p.layout, p.model_cfg["dtype"], p.model_cfg["spec"],
                           router_dtype=recipes.router_dtype(p.recipe))
    timings["load_s"] = time.perf_counter() - t

    tokenizer = AutoTokenizer.from_pretrained(str(hf_path))
    data = calib.from_config(cfg.calib, tokenizer)
    check_even_split(p.mtq_config, len(data.samples), parallel_state.get_data_parallel_world_size())
    local = calib.shard(data.samples, parallel_state.get_data_parallel_rank(),
                        parallel_state.get_data_parallel_world_size())
    probe_ids = probe_batch(tokenizer, cfg.probe_path, cfg.probe_samples, cfg.calib.max_seq_len)
    vocab = loaded.hf_vocab_size
    logits_before = parallel.from_any_rank(forward.run(loaded.chunks, [probe_ids], vocab)[0])

    t = time.perf_counter()
    with coverage.ExpertCoverage(loaded.chunks, all_experts=cfg.calib.all_experts) as counts:
        def count_own_samples_only(i: int) -> None:
            counts.counting = i < local.own

        quantization.quantize(loaded.chunks, p.local_config(loaded.chunks[0]), local.batches,
                              before_batch=count_own_samples_only)
    timings["calibrate_s"] = time.perf_counter() - t
    logits_after = parallel.from_any_rank(forward.run(loaded.chunks, [probe_ids], vocab)[0])
    records = quantization.inventory(loaded.chunks)
    check_recipe(p.recipe, records, p.pattern)
    return Calibrated(loaded=loaded, hf_path=hf_path, data=data, probe_ids=probe_ids, logits_before=logits_before,
                      logits_after=logits_after, records=records,
                      coverage=counts.report(all_experts=cfg.calib.all_experts), timings=timings)


STALE = ("report.json", "checkpoint.partial")


def run(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    t_start = time.perf_counter()
    p = plan(cfg)
    run_dir = Path(run_dir)
    parallel.init(p.layout, seed=cfg.seed, backend=cfg.cluster.backend, timeout_s=cfg.cluster.timeout_s)
    if parallel.is_main():
        rundir.prepare(run_dir, cfg, stale=STALE)
    parallel.fault_point("load")
    result = calibrate(cfg, p)
    return finish(cfg, p, run_dir, result, t_start)


def finish(cfg: DictConfig, p: Plan, run_dir: Path, result: Calibrated, t_start: float,
           extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Save the checkpoint, the probe logits and report.json (last, with ``extra`` merged in). Collective."""
    parallel.fault_point("save")
    t = time.perf_counter()
    partial, final = run_dir / "checkpoint.partial", run_dir / "checkpoint"
    metadata = {"model": p.model_cfg["name"], "source": str(result.hf_path), "recipe": p.recipe.name,
                "layout": reporting.layout_dict(p.layout), "dtype": p.model_cfg["dtype"],
                "router_dtype": result.loaded.provider.moe_router_dtype}
    checkpoint.save(result.loaded.chunks, partial, str(result.hf_path), metadata)
    result.timings["save_s"] = time.perf_counter() - t
    result.timings["total_s"] = time.perf_counter() - t_start
    peak_rss = gather_peak_rss_mb()

    report: dict[str, Any] = {}
    if parallel.is_main():
        if final.exists():
            shutil.rmtree(final)
        partial.rename(final)
        torch.save({"input_ids": result.probe_ids, "logits_before": result.logits_before,
                    "logits_after": result.logits_after}, run_dir / "probe.pt")
        report = reporting.quantize_report(cfg=cfg, recipe=p.recipe, layout=p.layout, result=result,
                                           peak_rss_mb=peak_rss, checkpoint_dir=final)
        report.update(extra or {})
        reporting.write_json_atomic(run_dir / "report.json", report)
        print(reporting.format_quantize_summary(report), flush=True)
    parallel.barrier()
    return report


def probe_batch(tokenizer, path: str, n: int, max_len: int) -> torch.Tensor:
    """Held-out samples (never used for calibration), cut to a common length, as one batch."""
    rows = calib.read_jsonl(calib.resolve_path(path))[:n]
    ids = [tokenizer(r["text"], add_special_tokens=False)["input_ids"] for r in rows]
    length = min(min(len(x) for x in ids), max_len)
    return torch.tensor([x[:length] for x in ids], dtype=torch.long)


def check_recipe(recipe: DictConfig, records: list[quantization.QuantizerRecord], pattern: str) -> None:
    """Every weight must be in the format the recipe declares for its kind and layer (ModelOpt presets
    change between releases; a silent change in meaning must not reach a deployment)."""
    declared = recipes.declared_formats(recipe, pattern)
    wrong = sorted({(r.kind, r.format, want) for r in records if r.role == "weight"
                    for want in [declared(r.kind, r.layer)] if r.format != want})
    if wrong:
        shown = ", ".join(f"{kind} is {got}, declared {want}" for kind, got, want in wrong[:4])
        raise UserError(f"recipe {recipe.name}: quantized modules differ from its declaration ({shown})")


# Calibration algorithms whose activation statistics are maxima: a repeated sample changes nothing.
MAX_BASED = ("max", "mse")


def check_even_split(mtq_config: dict, samples: int, dp: int) -> None:
    """Uneven DP shards are evened out with repeated samples (calib.shard); that is exact only for
    max-based statistics."""
    algorithm = mtq_config.get("algorithm") or "max"
    method = algorithm if isinstance(algorithm, str) else algorithm.get("method", "max")
    if samples % dp and method not in MAX_BASED:
        raise UserError(f"calib.num_samples={samples} is not a multiple of the data-parallel size {dp}, "
                        f"which calibration algorithm {method!r} needs (averages would count repeated samples)")


def gather_peak_rss_mb() -> list[float]:
    """Peak resident memory of every rank, in MiB (collective)."""
    return [float(x) for x in memory.gather(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0)]
