"""Exported checkpoints read back independently of the exporter, one reader per format
(``hybridquant.readers.<format>``: ``is_export(path)`` and ``read(path, dtype)`` -> dequantized weights under
the Hub's names, their stored formats, the model's config). ``build_model`` makes transformers'
NemotronHForCausalLM from them: the evaluate stage and lm_eval score exports this way, the tests use
the readers as the independent judge where the real consumer does not run here.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import torch

READERS = ("modelopt", "compressed_tensors", "gguf")


def _reader(name: str):
    return importlib.import_module(f"hybridquant.readers.{name}")


def format_of(path: Path) -> str | None:
    """The export format of ``path`` (a directory, or a .gguf file), or None."""
    for name in READERS:
        if _reader(name).is_export(Path(path)):
            return name
    return None


def expand(path: Path) -> list[Path]:
    """A GGUF export directory holding several types -> each of its files; anything else -> itself."""
    path = Path(path)
    if path.is_dir():
        files = sorted(f for f in path.glob("*.gguf") if not f.name.startswith("."))
        if len(files) > 1:
            return files
    return [path]


def is_export(path: Path) -> bool:
    return format_of(path) is not None


def provenance(path: Path) -> dict:
    """What the exporter recorded about the export's origin (model, recipe, calibration layout)."""
    path = Path(path)
    manifest = (path if path.is_dir() else path.parent) / "manifest.json"
    return json.loads(manifest.read_text()) if manifest.is_file() else {}


def config(path: Path) -> dict:
    """The model's Hugging Face config as the export states it (a GGUF file: rebuilt from its metadata)."""
    if format_of(path) == "gguf":
        from gguf import GGUFReader

        from hybridquant.readers import gguf

        return gguf.config_from_metadata(GGUFReader(str(gguf.gguf_file(expand(path)[0]))))
    return json.loads((Path(path) / "config.json").read_text())


def describe(path: Path) -> str:
    """How an export is named in reports: 'export' (ModelOpt), 'compressed-tensors export', 'GGUF Q4_K_M'."""
    name = format_of(path)
    if name == "gguf":
        from hybridquant.readers import gguf

        file = gguf.gguf_file(path)
        types = {v["file"]: t for t, v in (provenance(file).get("gguf") or {}).items()}
        return f"GGUF {types.get(file.name, file.stem)}"
    return {"modelopt": "export", "compressed_tensors": "compressed-tensors export"}[name]


def read(path: Path, dtype=torch.float32):
    name = format_of(path)
    if name is None:
        raise ValueError(f"{path} is not an export this project reads")
    return _reader(name).read(Path(path), dtype)


def build_model(path: Path, workdir: Path, max_seq_len: int = 512, dtype=torch.float32):
    """transformers' NemotronHForCausalLM with the export's dequantized weights, loaded the way
    transformers loads any checkpoint (its own name mapping), from a plain copy written to ``workdir``."""
    from safetensors.torch import save_file

    from hybridquant import hf_reference

    weights, formats, config = read(path, dtype)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(json.dumps(config))
    save_file(weights, str(workdir / "model.safetensors"), metadata={"format": "pt"})
    return hf_reference.load(str(workdir), max_seq_len=max_seq_len, dtype=dtype, strict=True), formats
