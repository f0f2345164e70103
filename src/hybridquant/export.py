"""The export core: a quantized Megatron model streamed into a deployment format, one parameter at a time.

Runs on every rank at the layout the model is loaded with (the calibration layout by default); there
is no resharding pass and no rank ever holds more than its own shard plus one decoder layer:

1. megatron-bridge's conversion tasks name each Megatron parameter's HF tensor(s) and gather it over
   TP/EP and broadcast it over PP, one parameter at a time (``export_hf_weights``).
2. Before that, every rank reads the calibrated scales of its own quantized modules with ModelOpt's
   export functions (weight_scale, weight_scale_2, input_scale, KV-cache k/v scales); the scales of
   all ranks are merged (they are scalars), and ranks that hold the same module must agree on them.
3. An export hook on every task hands the gathered weight and its scales to the format
   (``hybridquant.formats``), which turns them into its tensors. Static NVFP4 block scales (MSE
   calibration) are not a function of the weight, so they are gathered with the weight's own mapping.
4. Tensors are grouped by decoder layer. Group ``g`` is written by rank ``g % world_size`` as soon as
   the stream has left it (the format may rewrite a whole group: GGUF stacks experts): files are
   sorted and named by content, never by rank, so every layout writes the same bytes. Rank 0 then
   lets the format write its metadata (or assemble its file) and lists every file in the manifest.

ModelOpt's own Megatron exporter is not used: it is only correct at TP=1/EP=1 and corrupts
``exclude_modules`` names for Nemotron-H (docs/compat.md).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.distributed as dist

from hybridquant import modules, parallel
from hybridquant.reporting import sha256  # noqa: F401 - export.sha256 is the manifest's hash
from hybridquant.errors import UserError

INDEX = "model.safetensors.index.json"
MANIFEST = "manifest.json"
_GROUP = re.compile(r"^(.*?\.layers\.\d+)\.")
_QKV = re.compile(r"^decoder\.layers\.(\d+)\.self_attention\.linear_qkv\.weight$")
# ModelOpt layer formats this exporter writes (quant_utils.get_quantization_format, plus "nvfp4_static"
# as ModelOpt's get_quant_config names MSE-calibrated NVFP4).
NVFP4_FORMATS = ("nvfp4", "nvfp4_static", "w4a16_nvfp4")
SUPPORTED = ("fp8", *NVFP4_FORMATS)


@dataclasses.dataclass
class WeightMeta:
    """How one exported weight is quantized: ModelOpt's layer format and its per-tensor scales."""
    qformat: str
    block_size: int
    scales: dict[str, torch.Tensor]   # suffix (weight_scale | weight_scale_2 | input_scale) -> fp32 tensor

    @property
    def static(self) -> bool:
        return self.qformat == "nvfp4_static"

    def same_as(self, other: "WeightMeta") -> bool:
        return (self.qformat, self.block_size, sorted(self.scales)) == \
            (other.qformat, other.block_size, sorted(other.scales)) and \
            all(torch.equal(self.scales[k], other.scales[k]) for k in self.scales)


@dataclasses.dataclass
class Plan:
    """What every rank knows before the weights stream: identical on all ranks."""
    metas: dict[str, WeightMeta]      # HF weight name -> quantization
    kv_scales: dict[str, torch.Tensor]  # HF name (...k_proj.k_scale) -> scale
    kv_format: str | None
    linear_modules: list[str]         # HF names of every linear layer (quantized or not), for exclusions
    groups: list[str]                 # tensor groups in file order ('' = outside decoder layers)


def group_of(hf_name: str) -> str:
    m = _GROUP.match(hf_name)
    return m.group(1) if m else ""


def _group_key(group: str) -> tuple[str, int]:
    if not group:
        return ("", -1)
    prefix, _, index = group.rpartition(".")
    return (prefix, int(index))


def _hf_names(task) -> list[str]:
    hf = task.mapping.hf_param
    return [hf] if isinstance(hf, str) else list(hf.values())


def _scalar(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().float().cpu()
    return t.reshape(()) if t.numel() == 1 else t.contiguous()


def conversion_tasks(bridge, chunks: list) -> list:
    """megatron-bridge's tasks for this rank, ordered by tensor group (stable: the same order on every
    rank, whatever experts it holds), without the holes the bridge leaves for unmapped names."""
    tasks = [t for t in bridge._model_bridge.build_conversion_tasks(bridge.hf_pretrained, chunks) if t is not None]
    return sorted(tasks, key=lambda t: _group_key(group_of(_hf_names(t)[0])))


def _local_weight_metas(tasks: list) -> tuple[dict[str, WeightMeta], set[str]]:
    from modelopt.torch.export.quant_utils import (get_activation_scaling_factor, get_quantization_format,
                                                   get_weight_block_size, get_weight_scaling_factor,
                                                   get_weight_scaling_factor_2)
    from modelopt.torch.quantization.nn import NVFP4StaticQuantizer

    metas: dict[str, WeightMeta] = {}
    linears: set[str] = set()
    for task in tasks:
        module, weight = task.megatron_module, task.param_weight
        if module is None or weight is None or weight is not getattr(module, "weight", None):
            continue
        names = [n[: -len(".weight")] for n in _hf_names(task) if n.endswith(".weight")]
        quantizer = getattr(module, "weight_quantizer", None)
        if quantizer is not None or "router" in task.global_param_name:
            linears.update(names)  # routers carry no quantizer but are linear layers vLLM must skip
        if quantizer is None or not quantizer.is_enabled:
            continue
        qformat = get_quantization_format(module)
        if isinstance(quantizer, NVFP4StaticQuantizer) and qformat == "nvfp4":
            qformat = "nvfp4_static"
        if qformat not in SUPPORTED:
            raise UserError(f"{task.global_param_name} is quantized as ModelOpt format {qformat!r}, which the "
                            f"export does not write (supported: {', '.join(SUPPORTED)})")
        scales = {}
        if qformat == "fp8":
            scales["weight_scale"] = _scalar(get_weight_scaling_factor(module))
        else:
            scales["weight_scale_2"] = _scalar(get_weight_scaling_factor_2(module))
        input_scale = get_activation_scaling_factor(module)
        if input_scale is not None:
            scales["input_scale"] = _scalar(input_scale)
        meta = WeightMeta(qformat, int(get_weight_block_size(module)), scales)
        for name in names:
            metas[name + ".weight"] = meta
    return metas, linears


def _local_kv_scales(tasks: list, chunks: list) -> tuple[dict[str, torch.Tensor], set[str]]:
    from modelopt.torch.export.quant_utils import get_kv_cache_dtype, get_kv_cache_scaling_factor

    qkv_names = {}
    for task in tasks:
        m = _QKV.match(task.global_param_name)
        if m and isinstance(task.mapping.hf_param, dict):
            qkv_names[int(m.group(1))] = task.mapping.hf_param
    scales, formats = {}, set()
    for chunk in chunks:
        for layer in modules.unwrap(chunk).decoder.layers:
            core = getattr(getattr(layer, "self_attention", None), "core_attention", None)
            quantizer = getattr(core, "k_bmm_quantizer", None)
            if quantizer is None or not quantizer.is_enabled:
                continue
            index = layer.layer_number - 1
            if index not in qkv_names:
                raise RuntimeError(f"no Hugging Face q/k/v names for attention layer {index}")
            formats.add(get_kv_cache_dtype(core))
            k_scale, v_scale = get_kv_cache_scaling_factor(core)
            for key, scale in (("k", k_scale), ("v", v_scale)):
                base = qkv_names[index][key][: -len(".weight")]
                scales[f"{base}.{key}_scale"] = _scalar(scale)
    return scales, formats


def _merge(parts: list[dict], what: str, same) -> dict:
    merged: dict = {}
    for part in parts:
        for name, value in part.items():
            if name in merged and not same(merged[name], value):
                raise RuntimeError(f"ranks disagree on the {what} of {name}: {merged[name]} vs {value}")
            merged.setdefault(name, value)
    return merged


def plan(tasks: list, chunks: list) -> Plan:
    """Collective: the quantization of every exported weight, known to every rank."""
    metas, linears = _local_weight_metas(tasks)
    kv, kv_formats = _local_kv_scales(tasks, chunks)
    local = (metas, kv, sorted(kv_formats), sorted(linears))
    parts = [local]
    if dist.is_initialized() and dist.get_world_size() > 1:
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, local)
    all_metas = _merge([p[0] for p in parts], "quantization", WeightMeta.same_as)
    all_kv = _merge([p[1] for p in parts], "KV-cache scale", torch.equal)
    kv_formats = sorted({f for p in parts for f in p[2]})
    if len(kv_formats) > 1:
        raise UserError(f"the KV cache is quantized in more than one format ({kv_formats}); vLLM needs one")
    groups = sorted({group_of(n) for t in tasks for n in _hf_names(t)}
                    | {group_of(n) for n in all_kv}, key=_group_key)
    return Plan(metas=all_metas, kv_scales=all_kv, kv_format=kv_formats[0] if kv_formats else None,
                linear_modules=sorted({n for p in parts for n in p[3]}), groups=groups)


def _gather_static_block_scales(task, block_size: int) -> dict[str, torch.Tensor]:
    """Collective over the task's ranks: the MSE-calibrated NVFP4 block scales of a whole weight.

    Each owner computes its shard's scales with ModelOpt, widens them to the weight's shape (every
    scale repeated over its block; E4M3 values are exact in the weight dtype) and the weight's own
    bridge mapping gathers them exactly as it gathers the weight, whatever its split."""
    from modelopt.torch.export.quant_utils import get_weight_scaling_factor

    module, weight = task.megatron_module, task.param_weight
    local = None
    if module is not None and weight is not None:
        scale = get_weight_scaling_factor(module)
        local = scale.float().repeat_interleave(block_size, dim=-1).to(weight.dtype).contiguous()
        for attr in ("tensor_model_parallel", "partition_dim", "partition_stride"):
            if hasattr(weight, attr):
                setattr(local, attr, getattr(weight, attr))
    mapping = copy.copy(task.mapping)  # its shape/dtype broadcast caches belong to the weight
    mapping._tensor_spec_output_cache = {}
    mapping._broadcast_obj_cache = {}
    gathered = mapping.megatron_to_hf(local, module)
    return {name: t[..., ::block_size].float().to(torch.float8_e4m3fn).cpu() for name, t in gathered.items()}


class GroupWriter:
    """Writes the tensor groups this rank owns, one group in memory at a time.

    A group becomes one safetensors file, or several when it exceeds ``max_shard_bytes``; its
    tensors are sorted by name first, so the bytes depend only on the content."""

    def __init__(self, directory: Path, plan_: Plan, max_shard_bytes: int, fmt):
        self.directory = Path(directory)
        self.plan = plan_
        self.format = fmt
        self.max_shard_bytes = max_shard_bytes
        self.index = {g: i for i, g in enumerate(plan_.groups)}
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.current: str | None = None
        self.buffer: dict[str, torch.Tensor] = {}
        self.done: set[str] = set()
        self.files: list[dict[str, Any]] = []

    def owns(self, group: str) -> bool:
        return self.index[group] % self.world == self.rank

    def add(self, name: str, tensor: torch.Tensor) -> None:
        group = group_of(name)
        if group != self.current:
            self.flush()
            if group in self.done:
                raise RuntimeError(f"tensor {name} arrived after its group {group!r} was written")
            self.current = group
        if name in self.buffer:
            raise RuntimeError(f"tensor {name} exported twice")
        if any(t.untyped_storage().data_ptr() == tensor.untyped_storage().data_ptr() for t in self.buffer.values()):
            tensor = tensor.clone()  # tied embeddings: one tensor under two names, stored as two
        self.buffer[name] = tensor

    def flush(self) -> None:
        if self.current is None:
            return
        group, self.current = self.current, None
        self.done.add(group)
        tensors, self.buffer = self.format.group(group, self.buffer), {}
        parts: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for name in sorted(tensors):
            nbytes = tensors[name].numel() * tensors[name].element_size()
            if parts[-1] and size + nbytes > self.max_shard_bytes:
                parts.append({})
                size = 0
            parts[-1][name] = tensors[name]
            size += nbytes
        for part_index, part in enumerate(parts):
            self._write(self.index[group], part_index, part)

    def _write(self, group_index: int, part_index: int, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        parallel.fault_point("export.write")
        path = self.directory / f"part-{group_index:05d}-{part_index:03d}.safetensors"
        save_file(tensors, str(path), metadata={"format": "pt"})
        self.files.append({"group": group_index, "part": part_index, "path": path.name,
                           "sha256": sha256(path), "bytes": path.stat().st_size,
                           "tensors": {n: [str(t.dtype).removeprefix("torch."), list(t.shape)]
                                       for n, t in tensors.items()}})

    def close(self) -> list[dict[str, Any]]:
        self.flush()
        missing = [g for g in self.plan.groups if self.owns(g) and g not in self.done]
        for group in missing:  # a group with no streamed tensor (only KV scales): still written
            self.current = group
            self.flush()
        return self.files


def stream(bridge, chunks: list, tasks: list, plan_: Plan, writer: GroupWriter) -> None:
    """Collective: every task's weights gathered, turned into the format's tensors by the rank that
    writes them, written."""
    fmt = writer.format
    static_cache: dict[int, dict[str, torch.Tensor]] = {}

    def hook_for(task):
        def hook(hf_name: str, tensor: torch.Tensor) -> Iterable[tuple[str, torch.Tensor]]:
            meta = plan_.metas.get(hf_name)
            block_scale = None
            if meta is not None and meta.static and fmt.uses_scales:
                if id(task) not in static_cache:  # collective: every rank, once per task
                    static_cache.clear()
                    static_cache[id(task)] = _gather_static_block_scales(task, meta.block_size)
                block_scale = static_cache[id(task)][hf_name]
            if not writer.owns(group_of(hf_name)):
                return
            yield from fmt.weight(hf_name, tensor, meta, block_scale)
        return hook

    hooked = [dataclasses.replace(task, export_hook=hook_for(task)) for task in tasks]
    for name, tensor in bridge.export_hf_weights(chunks, cpu=True, show_progress=False, conversion_tasks=hooked):
        writer.add(name, tensor)


def finish(directory: Path, fmt, files: list[dict[str, Any]], provenance: dict[str, Any]) -> dict[str, Any] | None:
    """Collective: the format writes its files from every rank's shards (rank 0), then the manifest lists
    every file with its sha256. Returns the manifest on rank 0."""
    parts = [files]
    if dist.is_initialized() and dist.get_world_size() > 1:
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, files)
    if not parallel.is_main():
        return None
    directory = Path(directory)
    shards = sorted((f for p in parts for f in p), key=lambda f: (f["group"], f["part"]))
    summary = fmt.finish(directory, shards)
    hashed = {s["path"]: {"sha256": s["sha256"], "bytes": s["bytes"]} for s in shards}  # written by their ranks
    listed = {}
    for path in sorted(directory.iterdir()):
        if path.name != MANIFEST:
            listed[path.name] = hashed.get(path.name) or {"sha256": sha256(path), "bytes": path.stat().st_size}
    manifest = {"format": "hybridquant-export/1", "export_format": fmt.name, **provenance, **summary,
                "files": dict(sorted(listed.items()))}
    write_json(directory / MANIFEST, manifest)
    return manifest


def hf_layout(directory: Path, shards: list[dict[str, Any]], source_hf: Path,
              config_update: dict[str, Any]) -> int:
    """The Hugging Face checkpoint layout for safetensors formats: shards renamed
    model-0000K-of-0000N.safetensors in group order, the index, config.json (the source's, updated) and
    the source's other files (tokenizer, generation config, chat template). Returns the tensor count."""
    weight_map, total = {}, 0
    for number, shard in enumerate(shards, start=1):
        final = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        (directory / shard["path"]).rename(directory / final)
        shard["path"] = final
        for name, (dtype, shape) in shard["tensors"].items():
            weight_map[name] = final
            total += _nbytes(dtype, shape)
    write_json(directory / INDEX, {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})
    config = json.loads((source_hf / "config.json").read_text())
    config.update(config_update)
    write_json(directory / "config.json", config)
    for src in sorted(source_hf.iterdir()):  # tokenizer, generation config, chat template
        if src.is_file() and src.name != "config.json":
            (directory / src.name).write_bytes(src.read_bytes())
    return len(weight_map)


def _nbytes(dtype: str, shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n * getattr(torch, dtype).itemsize


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def verify(directory: Path) -> list[str]:
    """Files whose sha256 or size differ from the manifest, or are missing or unlisted."""
    directory = Path(directory)
    manifest = json.loads((directory / MANIFEST).read_text())
    problems = []
    for name, entry in manifest["files"].items():
        path = directory / name
        if not path.is_file():
            problems.append(f"{name}: missing")
        elif path.stat().st_size != entry["bytes"] or sha256(path) != entry["sha256"]:
            problems.append(f"{name}: content differs from the manifest")
    # The model card (README.md) is written after the export, by the release; its manifest covers it.
    extra = sorted(p.name for p in directory.iterdir()
                   if p.name not in manifest["files"] and p.name not in (MANIFEST, "README.md"))
    problems += [f"{name}: not in the manifest" for name in extra]
    return problems
