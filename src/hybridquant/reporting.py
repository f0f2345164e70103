"""Run reports: JSON written atomically, and the human summary printed at the end of a stage."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from hybridquant import quantization

PACKAGES = ("torch", "megatron-core", "megatron-bridge", "nvidia-modelopt", "transformers", "hydra-core",
            "mamba-ssm", "transformer-engine")


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            out[name] = None
    return out


def sha256(path: Path, chunk: int = 1 << 24) -> str:
    """Hex sha256 of a file, read in chunks (checkpoints are large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_json_atomic(path: Path, data: Any) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def logit_change(before: torch.Tensor, after: torch.Tensor) -> dict[str, float]:
    diff = (after.float() - before.float())
    return {
        "max_abs_diff": diff.abs().max().item(),
        "relative_error": (diff.norm() / before.float().norm()).item(),
        "top1_agreement": (after.argmax(-1) == before.argmax(-1)).float().mean().item(),
    }


def layout_dict(layout) -> dict[str, int]:
    return {"tp": layout.tp, "pp": layout.pp, "ep": layout.ep, "etp": layout.etp, "dp": layout.dp,
            "world_size": layout.world_size}


def quantize_report(*, cfg, recipe, layout, result, peak_rss_mb, checkpoint_dir) -> dict[str, Any]:
    data = result.data
    return {
        "stage": "quantize",
        "model": cfg.model.name,
        "recipe": OmegaConf.to_container(recipe, resolve=True),
        "layout": layout_dict(layout),
        "calibration": {"source": data.source, "sha256": data.sha256, "samples": len(data.samples),
                        "tokens": data.tokens, "domains": data.domains,
                        "domain_tokens": getattr(data, "domain_tokens", {}),
                        "all_experts": bool(cfg.calib.all_experts)},
        "summary": quantization.summary(result.records),
        "quantized_modules": quantization.quantized_modules(result.records),
        "quantizers": quantization.records_as_dicts(result.records),
        "expert_coverage": result.coverage,
        "probe": logit_change(result.logits_before, result.logits_after),
        "timings_s": result.timings,
        "peak_rss_mb_per_rank": peak_rss_mb,
        "checkpoint": str(checkpoint_dir),
        "versions": versions(),
    }


def _fmt_formats(formats: dict[str, int]) -> str:
    return ", ".join(f"{k}×{v}" for k, v in sorted(formats.items())) or "-"


def _fmt_stats(stats: dict | None) -> str:
    if not stats:
        return "-"
    return f"{stats['min']:.3g} / {stats['median']:.3g} / {stats['max']:.3g}"


def format_quantize_summary(report: dict[str, Any]) -> str:
    lay = report["layout"]
    lines = [
        f"quantized {report['model']} with {report['recipe']['name']} "
        f"(tp={lay['tp']} pp={lay['pp']} ep={lay['ep']} etp={lay['etp']} dp={lay['dp']})",
        f"calibration: {report['calibration']['samples']} samples, {report['calibration']['tokens']} tokens"
        + (" (all-expert)" if report["calibration"]["all_experts"] else ""),
        "",
        f"{'module kind':<20} {'modules':>7}  {'weights':<16} {'inputs':<16} {'weight amax min/med/max':<26} input amax min/med/max",
    ]
    for kind, s in report["summary"].items():
        if kind == "kv_cache":
            continue
        lines.append(
            f"{kind:<20} {s['modules']:>7}  {_fmt_formats(s['weight_formats']):<16} {_fmt_formats(s['input_formats']):<16} "
            f"{_fmt_stats(s['weight_amax']):<26} {_fmt_stats(s['input_amax'])}"
        )
    if "kv_cache" in report["summary"]:
        kv = report["summary"]["kv_cache"]
        lines.append(f"{'kv_cache':<20} {kv['quantizers']:>7}  {_fmt_formats(kv['formats']):<16} {'':<16} {_fmt_stats(kv['amax'])}")
    cov = report["expert_coverage"]
    idle = sum(len(v) for v in cov["experts_without_tokens"].values())
    total = sum(len(v) for v in cov["tokens_per_expert"].values())
    lines += ["", f"expert coverage: {total - idle}/{total} experts received calibration tokens"
              + (f"; without tokens (layer: experts): {cov['experts_without_tokens']}" if idle else "")]
    probe = report["probe"]
    lines += [
        "",
        f"held-out logits after vs before quantization: relative error {probe['relative_error']:.4f}, "
        f"top-1 agreement {probe['top1_agreement']:.3f}",
        f"checkpoint: {report['checkpoint']}",
        f"time: {report['timings_s']['total_s']:.1f} s; peak RSS per rank (MiB): "
        + ", ".join(f"{x:.0f}" for x in report["peak_rss_mb_per_rank"]),
    ]
    return "\n".join(lines)
