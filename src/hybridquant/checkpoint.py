"""Quantized Megatron checkpoints: megatron-core distributed checkpoint + ModelOpt state.

Layout of a saved checkpoint directory::

    checkpoint/
      <megatron dist-checkpoint files>   every rank writes only the shards it owns
      modelopt_state/                    ModelOpt's quantizer configuration + amax (sharded)
      hf/                                config.json, tokenizer, generation config of the source
      hybridquant.json                   what was saved: model, recipe, layout (written last)

The HF files make the checkpoint self-describing: loading rebuilds the Megatron model from them
(at any layout: dist-checkpointing reshards on load) without the source weights. A directory
without ``hybridquant.json`` is not a complete checkpoint.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from hybridquant import modules, parallel
from hybridquant.errors import UserError

METADATA = "hybridquant.json"
HF_DIR = "hf"
_HF_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json", "chat_template.jinja")


def save(chunks: list, directory: Path, hf_path: str, metadata: dict[str, Any]) -> None:
    """Collective: every rank calls it. ``directory`` must not exist yet."""
    from megatron.core import dist_checkpointing
    from modelopt.torch.opt.plugins.mcore_dist_checkpointing import save_sharded_modelopt_state

    from hybridquant.compat.dist_checkpoint import in_process_write_results

    directory = Path(directory)
    if parallel.is_main():
        directory.mkdir(parents=True)
        (directory / HF_DIR).mkdir()
        for name in _HF_FILES:
            src = Path(hf_path) / name
            if src.exists():
                shutil.copy2(src, directory / HF_DIR / name)
    parallel.barrier()
    with in_process_write_results():  # synchronous: no Manager process to hand the results back
        dist_checkpointing.save(chunks[0].sharded_state_dict(), str(directory))
        save_sharded_modelopt_state(chunks, str(directory))
    parallel.barrier()
    if parallel.is_main():
        (directory / METADATA).write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")
    parallel.barrier()


def resolve(path: str | Path) -> Path:
    """A quantized checkpoint given as its directory or as the quantize run directory that holds it."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist")
    if not (path / METADATA).exists() and (path / "checkpoint").is_dir():
        return path / "checkpoint"
    return path


def open_at_layout(path: str | Path, parallel_cfg, world_size: int) -> tuple[Path, dict[str, Any], "parallel.Layout"]:
    """A saved checkpoint (its directory or the run directory holding it), its metadata, and the layout
    to load it with: each size given in ``parallel_cfg``, else the one it was saved with (the
    calibration layout), checked against its model before any process group exists."""
    from hybridquant import source

    directory = resolve(path)
    meta = read_metadata(directory)
    saved = meta.get("layout", {})
    sizes = {name: getattr(parallel_cfg, name, None) or saved.get(name, 1) for name in ("tp", "pp", "ep", "etp")}
    layout = parallel.Layout(**sizes, world_size=world_size)
    parallel.validate(layout, source.read_config(hf_dir(directory)))
    return directory, meta, layout


def read_metadata(directory: Path) -> dict[str, Any]:
    path = Path(directory) / METADATA
    if not path.is_file():
        raise UserError(f"{directory} is not a complete quantized checkpoint (no {METADATA})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is corrupt: {exc}") from exc


def hf_dir(directory: Path) -> Path:
    return Path(directory) / HF_DIR


def load_into(chunks: list, directory: Path) -> None:
    """Restore ModelOpt state (quantizers) and weights + amax into freshly built ``chunks``."""
    from megatron.core import dist_checkpointing
    from modelopt.torch.opt.plugins.mcore_dist_checkpointing import restore_sharded_modelopt_state
    from torch.distributed.checkpoint.api import CheckpointException

    from hybridquant.compat import patch_modelopt

    patch_modelopt()
    try:
        restore_sharded_modelopt_state(chunks, str(directory))
        state = dist_checkpointing.load(chunks[0].sharded_state_dict(), str(directory))
        result = modules.unwrap(chunks[0]).load_state_dict(state, strict=False)  # Float16Module returns None
    except (Exception, CheckpointException) as exc:  # noqa: BLE001 - unreadable or foreign files: one line
        raise UserError(f"checkpoint {directory} cannot be loaded into the model its hf/config.json describes "
                        f"(corrupt, or saved from another model): {_cause(exc)}"[:600]) from exc
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if missing:
        raise UserError(f"checkpoint {directory} does not match the model: missing {missing[:4]}")
    for chunk in chunks:
        chunk.eval()


def _cause(exc: BaseException) -> str:
    """The root failure in one line (torch's CheckpointException wraps each rank's exception)."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        inner = next(iter(failures.values()))
        exc = inner[0] if isinstance(inner, tuple) else inner
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def load_quantized(directory: Path, layout, spec: str = "auto", training: dict[str, Any] | None = None):
    """Build the Megatron model described by a quantized checkpoint for ``layout`` (which may differ
    from the one it was saved with) and restore it. Process groups must exist. ``training``: see
    ``model.make_provider``."""
    from hybridquant import model

    meta = read_metadata(directory)
    bridge, provider = model.make_provider(str(hf_dir(directory)), layout, meta["dtype"], spec,
                                           router_dtype=meta.get("router_dtype"), training=training)
    chunks = model.build(provider)
    load_into(chunks, directory)
    return model.LoadedModel(bridge=bridge, provider=provider, chunks=chunks), meta
