"""A Hugging Face Nemotron-H checkpoint's tensors, read strictly.

megatron-bridge loads a checkpoint by asking, for each Megatron parameter, for the HF tensor its
mapping names; a tensor it does not find is skipped with a log warning and the parameter keeps its
random initialisation, and a tensor nobody asks for is ignored. A checkpoint saved by transformers
itself (``backbone.embedding.weight`` where the Hub has ``backbone.embeddings.weight``) therefore
"quantizes" with random embeddings. This module is the bridge's tensor source instead of its own:

* every ``*.safetensors`` file (the index's, or all in the directory) is opened before anything is
  built: a truncated or corrupt file, or an index naming a missing file or tensor, is one line that
  names the file;
* tensors are offered under the bridge's (the Hub's) names, whichever spelling transformers itself
  reads was used: ``backbone.`` or ``model.`` prefix, ``embedding`` or ``embeddings``, per-expert or
  fused 3-D expert tensors (served one expert at a time). Two spellings of one tensor are an error;
* every read is recorded, so that after loading :func:`unconsumed` names what no mapping took.

Which Megatron parameters the load did not write is the caller's check (``model.load_hf``): every
parameter starts as NaN there, so one the bridge skipped is still NaN afterwards.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from hybridquant.errors import UserError

INDEX = "model.safetensors.index.json"

# transformers' own renames for nemotron_h (its conversion mapping), towards the bridge's names.
_FUSED_EXPERTS = re.compile(r"^(?P<layer>backbone\.layers\.\d+\.mixer\.experts)\.(?P<proj>up_proj|down_proj)(\.weight)?$")


def canonical_name(name: str) -> str:
    """The bridge's (Hub) spelling of a tensor name that transformers reads."""
    if name.startswith("model."):
        name = "backbone." + name[len("model."):]
    if name == "backbone.embedding.weight":
        name = "backbone.embeddings.weight"
    return name


@dataclass(frozen=True)
class _Entry:
    file: str
    key: str                 # the name in the file
    expert: int | None = None  # a slice of a fused [experts, out, in] tensor


def _open_error(file: Path, exc: Exception) -> UserError:
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return UserError(f"{file} is not a readable safetensors file (truncated or corrupt: {detail})")


def _file_keys(file: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape for one file; validates the header and that the data is all there."""
    from safetensors import safe_open

    if not file.is_file():
        raise UserError(f"{file} is missing (named by the checkpoint's {INDEX})")
    try:
        size = file.stat().st_size
        with safe_open(str(file), framework="pt", device="cpu"):  # safetensors' own header validation
            pass
        with open(file, "rb") as raw:  # the header's data offsets must also lie inside the file
            header_len = int.from_bytes(raw.read(8), "little")
            header = json.loads(raw.read(header_len))
        header.pop("__metadata__", None)
        end = max((v["data_offsets"][1] for v in header.values()), default=0)
        if 8 + header_len + end > size:
            raise ValueError(f"data ends at byte {8 + header_len + end}, the file has {size}")
        shapes = {k: tuple(v["shape"]) for k, v in header.items()}
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise _open_error(file, exc) from exc
    return shapes


class CheckpointTensors:
    """Canonical tensor name -> where it is stored, for a checkpoint directory (validated on creation)."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.entries: dict[str, _Entry] = {}
        self.consumed: set[str] = set()
        index = self.directory / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise UserError(f"{index} is corrupt: {exc}") from exc
            files = sorted(set(weight_map.values()))
        else:
            weight_map = None
            files = sorted(p.name for p in self.directory.glob("*.safetensors"))
        if not files:
            raise UserError(f"{self.directory} has no *.safetensors weights")
        for file in files:
            shapes = _file_keys(self.directory / file)
            if weight_map is not None:
                listed = {k for k, f in weight_map.items() if f == file}
                absent = sorted(listed - set(shapes))
                if absent:
                    raise UserError(f"{self.directory / file} lacks tensors its {INDEX} lists there: {absent[:4]}")
                shapes = {k: v for k, v in shapes.items() if k in listed}
            for key, shape in shapes.items():
                self._add(file, key, shape)

    def _add(self, file: str, key: str, shape: tuple[int, ...]) -> None:
        name = canonical_name(key)
        fused = _FUSED_EXPERTS.match(name)
        if fused and len(shape) == 3:
            for e in range(shape[0]):
                self._put(f"{fused['layer']}.{e}.{fused['proj']}.weight", _Entry(file, key, e))
        else:
            self._put(name, _Entry(file, key))

    def _put(self, name: str, entry: _Entry) -> None:
        if name in self.entries:
            raise UserError(f"{self.directory}: tensors {self.entries[name].key!r} and {entry.key!r} are two "
                            f"spellings of {name!r}; a checkpoint must hold one")
        self.entries[name] = entry

    def keys(self) -> list[str]:
        return sorted(self.entries)

    def load(self, names: list[str]) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        by_file: dict[str, list[str]] = {}
        for name in names:
            if name not in self.entries:
                raise KeyError(f"{name} is not in {self.directory}")
            by_file.setdefault(self.entries[name].file, []).append(name)
        out = {}
        for file, group in by_file.items():
            try:
                with safe_open(str(self.directory / file), framework="pt", device="cpu") as f:
                    for name in group:
                        entry = self.entries[name]
                        out[name] = (f.get_tensor(entry.key) if entry.expert is None
                                     else f.get_slice(entry.key)[entry.expert].contiguous())
            except Exception as exc:  # noqa: BLE001
                raise _open_error(self.directory / file, exc) from exc
        self.consumed.update(out)
        return out

    def source_names(self, names) -> list[str]:
        """The names as stored in the files (a fused expert tensor once)."""
        return sorted({self.entries[n].key for n in names})


HEAD, EMBEDDINGS = "lm_head.weight", "backbone.embeddings.weight"


def account_tied_head(tensors: CheckpointTensors) -> None:
    """With tied embeddings the model has no output weight of its own. A stored ``lm_head.weight`` is
    accounted for when it is the embedding itself; a different one would be silently unused (as
    transformers also ignores it), so it is an error."""
    if HEAD not in tensors.entries or EMBEDDINGS not in tensors.entries:
        return
    loaded = tensors.load([HEAD, EMBEDDINGS])
    if not torch.equal(loaded[HEAD], loaded[EMBEDDINGS]):
        raise UserError(f"{tensors.directory}: config.json ties the output layer to the embeddings "
                        f"(tie_word_embeddings: true), but the checkpoint has its own, different {HEAD}, "
                        f"which would go unused: untie them in config.json or remove {HEAD}")


def bridge_source(tensors: CheckpointTensors):
    """``tensors`` as a megatron-bridge ``StateSource`` (the bridge must already be imported)."""
    from megatron.bridge.models.hf_pretrained.state import StateSource

    class _Source(StateSource):
        def get_all_keys(self):
            return tensors.keys()

        def load_tensors(self, keys):
            return tensors.load(list(keys))

    return _Source()


def unconsumed(tensors: CheckpointTensors, consumed_anywhere: set[str]) -> list[str]:
    """Stored tensor names that no rank's mapping read."""
    return tensors.source_names(set(tensors.entries) - consumed_anywhere)


def check_complete(tensors: CheckpointTensors, not_loaded: list[str], layers: list[int]) -> None:
    """After every rank loaded its part: one error, raised on every rank, if any stored tensor was
    taken by no rank or any rank has a parameter the load did not write. Collective."""
    from hybridquant import parallel

    names = tensors.keys()  # the same sorted list on every rank: consumption travels as a bit mask
    mask = bytearray((len(names) + 7) // 8)
    for i, name in enumerate(names):
        if name in tensors.consumed:
            mask[i // 8] |= 1 << (i % 8)
    local = {"consumed": bytes(mask), "not_loaded": [_global_name(n, layers) for n in not_loaded]}
    views = parallel.gather_objects(local)
    anywhere = bytearray(len(mask))
    for view in views:
        anywhere = bytearray(a | b for a, b in zip(anywhere, view["consumed"]))
    consumed = {name for i, name in enumerate(names) if anywhere[i // 8] >> (i % 8) & 1}
    unused = unconsumed(tensors, consumed)
    missing = sorted({name for v in views for name in v["not_loaded"]})
    problems = []
    if unused:
        problems.append(f"{len(unused)} tensor(s) of the checkpoint are used by no Megatron parameter "
                        f"({_shown(unused)})")
    if missing:
        problems.append(f"{len(missing)} Megatron parameter(s) have no tensor in the checkpoint ({_shown(missing)})")
    if problems:
        raise UserError(f"{tensors.directory} does not load exactly into the Nemotron-H model its config.json "
                        f"describes: " + "; ".join(problems))


def _shown(names: list[str], limit: int = 6) -> str:
    return ", ".join(names[:limit]) + (f", ... {len(names) - limit} more" if len(names) > limit else "")


def _global_name(local: str, layers: list[int]) -> str:
    """``decoder.layers.<local>.`` with the global layer number (pipeline stages number from 0)."""
    match = re.match(r"^(decoder\.layers\.)(\d+)(\..*)$", local)
    if not match or int(match[2]) >= len(layers):
        return local
    return f"{match[1]}{layers[int(match[2])]}{match[3]}"
