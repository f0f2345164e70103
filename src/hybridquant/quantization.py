"""Calibrate and quantize a Megatron HybridModel with ModelOpt, and describe the result.

``quantize`` is ``mtq.quantize`` with a forward loop over this rank's calibration batches; the
Megatron plugin of ModelOpt inserts the quantizers and synchronises amax over DP, EP and TP.
``inventory`` lists every quantizer under its layout-independent name with its format and amax,
merged over all ranks, which is what summaries, reports and layout-parity checks read.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist

from hybridquant import forward, modules, parallel
from hybridquant.compat import patch_modelopt


def quantize(chunks: list, mtq_config: dict, batches: list[torch.Tensor], before_batch=None) -> None:
    """Insert quantizers per ``mtq_config`` and calibrate them on ``batches`` (in place).
    ``before_batch(i)`` is called before the i-th calibration forward."""
    import modelopt.torch.quantization as mtq

    patch_modelopt()

    def forward_loop(_model):
        parallel.fault_point("calibrate")
        for i, batch in enumerate(batches):
            if before_batch is not None:
                before_batch(i)
            forward.run(chunks, [batch])

    if len(chunks) != 1:
        raise NotImplementedError("virtual pipeline stages are not supported")
    chunks[0] = mtq.quantize(chunks[0], mtq_config, forward_loop)


def format_of(quantizer) -> str:
    """'FP8', 'NVFP4', 'INT8', ... for an enabled TensorQuantizer; 'BF16' when disabled."""
    if not quantizer.is_enabled:
        return "BF16"
    bits = quantizer.num_bits
    blocks = quantizer.block_sizes or {}
    if bits == (4, 3):
        return "FP8"
    if bits == (2, 1) and blocks.get("scale_bits") == (4, 3):
        return "NVFP4"
    if bits == (2, 1):
        return "MXFP4"
    if isinstance(bits, int):
        return f"INT{bits}"
    return f"E{bits[0]}M{bits[1]}"


@dataclass
class QuantizerRecord:
    name: str             # layout-independent module name
    kind: str | None
    layer: int | None
    role: str             # weight | input | output | k_bmm | v_bmm
    format: str
    amax: list[float] | None  # per-tensor amax; for per-block/per-channel weights the global amax (None if dynamic)
    blocks: dict | None = None  # per-block/per-channel weight amax of the whole (unsplit) weight: n, min, max, checksum
    shard: tuple[int, int] | None = None  # (TP rank, TP size) of a split weight's block amax
    replicas: int = 1
    replicas_agree: bool = True

    @property
    def amax_max(self) -> float | None:
        return max(self.amax) if self.amax else None


def _offsets(chunk) -> tuple[int, int]:
    from megatron.core import parallel_state

    layers = getattr(getattr(chunk, "decoder", None), "layers", None)
    layer_offset = (layers[0].layer_number - 1) if layers is not None and len(layers) else 0
    experts = getattr(chunk.config, "num_moe_experts", None) or 0
    ep = parallel_state.get_expert_model_parallel_world_size()
    expert_offset = parallel_state.get_expert_model_parallel_rank() * (experts // ep) if experts else 0
    return layer_offset, expert_offset


_MASK64 = (1 << 64) - 1


def block_checksum(amax: torch.Tensor, row0: int, col0: int, cols: int) -> int:
    """Position-aware checksum of a [rows, k] block of a weight's amax grid whose top-left element
    sits at (row0, col0) of a grid ``cols`` wide. Summing it over the shards of a split weight gives
    the checksum of the whole grid, whatever the split (exact: integer arithmetic mod 2**64)."""
    rows, k = amax.shape
    index = (torch.arange(rows, dtype=torch.int64).unsqueeze(1) + row0) * cols \
        + torch.arange(k, dtype=torch.int64).unsqueeze(0) + col0
    bits = amax.detach().float().contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    mixed = ((index + 1) * 0x1E3779B97F4A7C15) ^ (bits * 0x42B2AE3D27D4EB4F + 0x165667B19E3779F9)
    return int(mixed.sum().item()) & _MASK64


def _block_summary(owner, quantizer) -> tuple[list[float], dict, tuple[int, int] | None]:
    """Global amax, block statistics and TP shard of a weight quantizer with many amax values."""
    grid = quantizer.amax.detach().float().reshape(owner.weight.shape[0], -1)
    group = getattr(getattr(owner, "parallel_state", None), "tensor_parallel_group", None)
    size = group.world_size() if group is not None and group.is_initialized() else 1
    rank = group.rank() if size > 1 else 0
    rows, cols = grid.shape
    split_rows = size > 1 and getattr(owner, "_is_column_parallel", False)
    split_cols = size > 1 and getattr(owner, "_is_row_parallel", False) and cols > 1
    checksum = block_checksum(grid, rank * rows if split_rows else 0, rank * cols if split_cols else 0,
                              cols * size if split_cols else cols)
    global_amax = getattr(quantizer, "global_amax", None)
    top = float(global_amax) if global_amax is not None else float(grid.max())
    blocks = {"n": grid.numel(), "min": float(grid.min()), "max": float(grid.max()), "checksum": checksum}
    return [top], blocks, ((rank, size) if split_rows or split_cols else None)


def _local_records(chunk) -> list[QuantizerRecord]:
    from modelopt.torch.quantization.nn import TensorQuantizer

    layer_offset, expert_offset = _offsets(chunk)
    records = []
    for name, mod in chunk.named_modules():
        if not isinstance(mod, TensorQuantizer):
            continue
        owner, _, attr = name.rpartition(".")
        role = attr.removesuffix("_quantizer")
        gname = modules.global_name(owner, layer_offset, expert_offset)
        amax = mod.amax if mod.is_enabled else None
        values, blocks, shard = None, None, None
        if amax is not None and amax.numel() > 1 and role == "weight":
            values, blocks, shard = _block_summary(chunk.get_submodule(owner), mod)
        elif amax is not None:
            values = [float(v) for v in amax.detach().float().flatten().tolist()]
        records.append(QuantizerRecord(
            name=gname, kind=modules.kind_of(owner), layer=modules.layer_index(gname), role=role,
            format=format_of(mod), amax=values, blocks=blocks, shard=shard,
        ))
    return records


def _merge_shards(parts: list[QuantizerRecord]) -> QuantizerRecord:
    """One record for a weight split over TP ranks: block statistics of the whole weight."""
    first = parts[0]
    first.blocks = {"n": sum(p.blocks["n"] for p in parts), "min": min(p.blocks["min"] for p in parts),
                    "max": max(p.blocks["max"] for p in parts),
                    "checksum": sum(p.blocks["checksum"] for p in parts) & _MASK64}
    first.replicas_agree = all(p.amax == first.amax for p in parts)
    first.shard = None
    return first


def inventory(chunks: list) -> list[QuantizerRecord]:
    """All quantizers of the model, merged over ranks (identical on every rank)."""
    local = [r for chunk in chunks for r in _local_records(chunk)]
    gathered = [local]
    if dist.is_initialized() and dist.get_world_size() > 1:
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, local)
    shards: dict[tuple[str, str], dict[int, QuantizerRecord]] = defaultdict(dict)
    for rank_records in gathered:
        for rec in rank_records:
            if rec.shard is not None:
                shards[(rec.name, rec.role)].setdefault(rec.shard[0], rec)
    whole = [_merge_shards([parts[r] for r in sorted(parts)]) for parts in shards.values()]
    merged: dict[tuple[str, str], QuantizerRecord] = {}
    for rank_records in [whole, *gathered]:
        for rec in rank_records:
            if rec.shard is not None:
                continue
            key = (rec.name, rec.role)
            if key not in merged:
                merged[key] = rec
                continue
            seen = merged[key]
            seen.replicas += 1
            if seen.amax != rec.amax or seen.blocks != rec.blocks:
                seen.replicas_agree = False
    return sorted(merged.values(), key=lambda r: (r.layer if r.layer is not None else 10**9, r.name, r.role))


def quantized_modules(records: list[QuantizerRecord]) -> dict[str, str]:
    """Module name -> weight format, for modules whose weight quantizer is enabled."""
    return {r.name: r.format for r in records if r.role == "weight" and r.format != "BF16"}


def summary(records: list[QuantizerRecord]) -> dict[str, Any]:
    """Per module kind: module count, formats of weight/input quantizers, amax statistics."""
    by_kind: dict[str, dict] = defaultdict(lambda: {"modules": set(), "weight": defaultdict(int),
                                                     "input": defaultdict(int), "w_amax": [], "in_amax": []})
    for r in records:
        if r.role not in ("weight", "input"):
            continue
        entry = by_kind[r.kind or "other"]
        entry["modules"].add(r.name)
        entry[r.role][r.format] += 1
        if r.amax_max is not None:
            entry["w_amax" if r.role == "weight" else "in_amax"].append(r.amax_max)
    out = {}
    for kind in sorted(by_kind, key=lambda k: modules.ALL_KINDS.index(k) if k in modules.ALL_KINDS else 99):
        e = by_kind[kind]
        out[kind] = {
            "modules": len(e["modules"]),
            "weight_formats": dict(e["weight"]),
            "input_formats": dict(e["input"]),
            "weight_amax": _stats(e["w_amax"]),
            "input_amax": _stats(e["in_amax"]),
        }
    kv = [r for r in records if r.role in ("k_bmm", "v_bmm")]
    if kv:
        out["kv_cache"] = {
            "quantizers": len(kv),
            "formats": {f: sum(1 for r in kv if r.format == f) for f in sorted({r.format for r in kv})},
            "amax": _stats([r.amax_max for r in kv if r.amax_max is not None]),
        }
    return out


def _stats(values: list[float]) -> dict | None:
    if not values:
        return None
    return {"min": min(values), "median": statistics.median(values), "max": max(values), "n": len(values)}


def records_as_dicts(records: list[QuantizerRecord]) -> list[dict]:
    return [asdict(r) for r in records]
