"""The export stage: quantized Megatron checkpoint -> a deployment checkpoint in ``export.format``
(modelopt: Hugging Face + ModelOpt for vLLM/SGLang; gguf: llama.cpp/Ollama; compressed_tensors: vLLM
through llm-compressor's format). Each format's files are described in its module under
``hybridquant.formats``; every output directory ends with ``manifest.json``, every file with its sha256
(written last).

Everything is written into a hidden sibling directory that is renamed to ``output_dir`` only when
complete, so a failed export never leaves a directory that looks like one.
"""

from __future__ import annotations

import logging
import re
import shutil
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from safetensors import SafetensorError

from hybridquant import checkpoint, export, formats, memory, parallel
from hybridquant.errors import UserError

log = logging.getLogger("hybridquant.export")

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str | int) -> int:
    """'5GB', '500MiB', 1000000 -> bytes."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(str(text))
    if not m or (m.group(2) or "").lower() not in _UNITS:
        raise UserError(f"export.max_shard_size={text!r} is not a size such as 5GB or 500MiB")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()])


def check_output(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"output_dir {out} exists and is not empty (set export.overwrite=true to replace it)")


def partial_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.partial"


def run(cfg: DictConfig) -> dict[str, Any] | None:
    t0 = time.perf_counter()
    ckpt, meta, layout = checkpoint.open_at_layout(cfg.checkpoint, cfg.parallel, parallel.world_size_from_env())
    hf_dir = checkpoint.hf_dir(ckpt)
    out = Path(cfg.output_dir).resolve()
    check_output(out, cfg.export.overwrite)
    max_shard_bytes = parse_size(cfg.export.max_shard_size)
    fmt_name = str(cfg.export.format)
    known = list(cfg.export.options)
    if fmt_name not in known:
        raise UserError(f"export.format={fmt_name!r} is not a format (one of: {', '.join(sorted(known))})")
    fmt_options = OmegaConf.to_container(cfg.export.options[fmt_name], resolve=True) or {}
    formats.check_options(fmt_name, fmt_options, hf_dir)

    parallel.init(layout, seed=cfg.seed, backend=cfg.cluster.backend, timeout_s=cfg.cluster.timeout_s)
    tmp = partial_dir(out)
    if parallel.is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    parallel.barrier()
    try:
        manifest, timings, rss = _export(ckpt, meta, layout, tmp, hf_dir, max_shard_bytes, fmt_name, fmt_options)
        rss = memory.gather(rss)
        if parallel.is_main():
            _replace(tmp, out)
            timings["total_s"] = time.perf_counter() - t0
            _print_summary(out, manifest, layout, rss, timings)
        parallel.barrier()
    except (OSError, SafetensorError) as exc:  # a full disk, or a peer rank removed the failed export
        cause = (getattr(exc, "strerror", None) or str(exc)) if tmp.is_dir() else \
            "another rank failed first and removed the partial export"
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"writing the export to {out} failed: {cause}") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _export(ckpt: Path, meta: dict, layout, tmp: Path, hf_dir: Path, max_shard_bytes: int, fmt_name: str,
            fmt_options: dict):
    from transformers import AutoConfig

    from hybridquant.compat.bridge_import import import_auto_bridge

    timings = {}
    t = time.perf_counter()
    loaded, _ = checkpoint.load_quantized(ckpt, layout)
    timings["load_s"] = time.perf_counter() - t
    rss = {"loaded_mib": memory.rss_mib(), "shard_mib": _local_bytes(loaded.chunks) / 2**20}
    rss["phase_peak"] = memory.reset_peak()  # from here the peak is the export's own
    t = time.perf_counter()
    # Conversion tasks from the config alone: the checkpoint has no HF weights to enumerate.
    bridge = import_auto_bridge().from_hf_config(AutoConfig.from_pretrained(str(hf_dir)))
    tasks = export.conversion_tasks(bridge, loaded.chunks)
    plan = export.plan(tasks, loaded.chunks)
    fmt = formats.get(fmt_name, fmt_options, plan, hf_dir, str(meta.get("model") or hf_dir.name))
    writer = export.GroupWriter(tmp, plan, max_shard_bytes, fmt)
    export.stream(bridge, loaded.chunks, tasks, plan, writer)
    files = writer.close()
    provenance = {"model": meta.get("model"), "recipe": meta.get("recipe"),
                  "calibration_layout": meta.get("layout")}
    manifest = export.finish(tmp, fmt, files, provenance)
    timings["export_s"] = time.perf_counter() - t
    rss["peak_mib"] = memory.peak_mib()
    return manifest, timings, rss


def _local_bytes(chunks: list) -> int:
    """Bytes of this rank's parameters (its shard of the model)."""
    return sum(p.numel() * p.element_size() for chunk in chunks for p in chunk.parameters())


def _replace(tmp: Path, out: Path) -> None:
    """Put the finished export at ``out``; an old one (overwrite) goes only after the new one is whole."""
    old = out.parent / f".{out.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def _print_summary(out: Path, manifest: dict, layout, rss: list[dict], timings: dict) -> None:
    weights = [name for name in manifest["files"] if name.endswith((".safetensors", ".gguf"))]
    size = sum(manifest["files"][name]["bytes"] for name in weights)
    kind = "gguf" if manifest["export_format"] == "gguf" else "safetensors"
    print(f"exported {manifest['model']} ({manifest['recipe']}) as {manifest['export_format']} "
          f"({manifest['quantization']}) at {layout.tag}: {manifest['tensors']} tensors in {len(weights)} {kind} "
          f"files, {size / 2**20:.1f} MiB", flush=True)
    for line in manifest.get("notes", []):
        print(line, flush=True)
    print(f"output: {out}", flush=True)
    print(f"time: {timings['total_s']:.1f} s (load {timings['load_s']:.1f} s, export {timings['export_s']:.1f} s)",
          flush=True)
    what = "peak during export" if all(r["phase_peak"] for r in rss) else "peak of the process"
    print("memory per rank (MiB): " + "; ".join(
        f"rank {i}: shard {r['shard_mib']:.1f}, RSS after load {r['loaded_mib']:.0f}, {what} {r['peak_mib']:.0f} "
        f"(+{r['peak_mib'] - r['loaded_mib']:.1f})" for i, r in enumerate(rss)), flush=True)
