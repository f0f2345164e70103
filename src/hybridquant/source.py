"""Where the BF16 Hugging Face checkpoint comes from, and a check that it is the model named.

``model.path: null`` materialises the embedded tiny model (and trains it when ``model.train`` is set:
``model=tiny_trained``); a local directory is used as is; any
other string is a Hub id, resolved through the local Hugging Face cache (clusters pre-download;
nothing here downloads).

``model=auto`` (``conf/model/auto.yaml``) names no architecture: any Nemotron-H checkpoint given by
``model.path`` is taken with the architecture its config.json declares, its run named after the
directory, its dtype the checkpoint's. The named configs keep refusing a checkpoint that is another
model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from hybridquant import tiny
from hybridquant.errors import UserError

# Fields that identify an architecture; a checkpoint whose config disagrees is another model.
IDENTITY_FIELDS = (
    "hybrid_override_pattern", "hidden_size", "vocab_size", "num_attention_heads", "num_key_value_heads",
    "head_dim", "mamba_num_heads", "mamba_head_dim", "ssm_state_size", "n_groups", "n_routed_experts",
    "num_experts_per_tok", "moe_intermediate_size", "moe_shared_expert_intermediate_size", "moe_latent_size",
)


def resolve(model_cfg: Mapping[str, Any]) -> Path:
    """Local directory of the HF checkpoint for ``model_cfg``. Safe to call from every rank at once:
    materialisation takes a file lock and the first caller writes the cache entry."""
    path = model_cfg.get("path")
    if path is None and model_cfg.get("train"):
        from hybridquant import train

        return train.materialize(model_cfg)
    if path is None:
        return tiny.materialize(model_cfg["arch"], int(model_cfg["seed"]))
    local = Path(path)
    if local.is_dir():
        return local
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(path, local_files_only=True))
    except Exception as exc:  # noqa: BLE001 - any failure means "not available here"
        raise UserError(f"model.path={path!r} is neither a local directory nor a Hub id in the local cache") from exc


def read_config(hf_dir: Path) -> dict[str, Any]:
    cfg_file = Path(hf_dir) / "config.json"
    if not cfg_file.is_file():
        raise UserError(f"{hf_dir} is not a Hugging Face checkpoint (no config.json)")
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{cfg_file} is corrupt: {exc}") from exc
    if "hybrid_override_pattern" not in cfg and "layers_block_type" in cfg:
        mapping = {"mamba": "M", "moe": "E", "attention": "*", "mlp": "-"}
        cfg["hybrid_override_pattern"] = "".join(mapping[t] for t in cfg["layers_block_type"])
    return cfg


def check_identity(model_cfg: Mapping[str, Any], hf_cfg: Mapping[str, Any]) -> None:
    """One-line error if the checkpoint is not the architecture the model config describes."""
    arch = model_cfg.get("arch") or {}
    for key in IDENTITY_FIELDS:
        if key in arch and key in hf_cfg and arch[key] != hf_cfg[key]:
            raise UserError(
                f"checkpoint is not {model_cfg['name']}: {key} is {hf_cfg[key]!r}, the model config says {arch[key]!r} "
                f"(model=auto model.path=DIR takes any Nemotron-H checkpoint with the architecture it declares)"
            )


NEEDS_PATH = "model.path must be set (model=auto needs model.path=<checkpoint directory or Hub id>)"


def config_dict(node) -> dict[str, Any]:
    """A Hydra ``model`` node as a plain dict; a mandatory value left unset is a one-line error."""
    from omegaconf import OmegaConf

    for key in ("path", "name"):
        if OmegaConf.is_missing(node, key):
            raise UserError(NEEDS_PATH if key == "path" else f"model.{key} must be set")
    return OmegaConf.to_container(node, resolve=True)


def prepare(model_cfg: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The model config with ``dtype: auto`` resolved, and the checkpoint's config.json (None for the
    embedded tiny model, which is materialised later, once): what a stage plans with, before any
    process group exists. A checkpoint that is not the named model is refused here."""
    model_cfg = dict(model_cfg)
    hf_cfg = None
    if model_cfg.get("path") is not None:
        directory = resolve(model_cfg)
        hf_cfg = read_config(directory)
        check_identity(model_cfg, hf_cfg)
        from hybridquant import hf_checkpoint

        hf_checkpoint.CheckpointTensors(directory)  # unreadable weight files: refused before any process group
    elif not model_cfg.get("arch"):
        raise UserError(f"{NEEDS_PATH}: model {model_cfg.get('name')!r} names no architecture")
    if model_cfg.get("dtype", "auto") == "auto":
        model_cfg["dtype"] = checkpoint_dtype(hf_cfg or {})
    return model_cfg, hf_cfg


DTYPE_NAMES = ("float32", "bfloat16", "float16")


def checkpoint_dtype(hf_cfg: Mapping[str, Any]) -> str:
    """The dtype a checkpoint declares (transformers writes ``dtype``, older ones ``torch_dtype``)."""
    value = hf_cfg.get("dtype") or hf_cfg.get("torch_dtype") or "bfloat16"
    value = str(value).removeprefix("torch.")
    if value not in DTYPE_NAMES:
        raise UserError(f"the checkpoint's config.json declares dtype {value!r}; set model.dtype to one of "
                        f"{', '.join(DTYPE_NAMES)}")
    return value


def checkpoint_name(path: str | None) -> str:
    """A run name for a checkpoint: its directory's name (a Hub id's repository name)."""
    if not path:
        return "auto"
    return Path(str(path).rstrip("/")).name or "auto"


def architecture(model_cfg: Mapping[str, Any], hf_cfg: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The architecture fields to validate layouts against: the checkpoint's, else the config's."""
    merged = dict(model_cfg.get("arch") or {})
    if hf_cfg:
        merged.update({k: v for k, v in hf_cfg.items() if k in IDENTITY_FIELDS or k not in merged})
    return merged
