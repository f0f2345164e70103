"""Where the BF16 Hugging Face checkpoint comes from, and a check that it is the model named.

``model.path: null`` materialises the embedded tiny model (and trains it when ``model.train`` is set:
``model=tiny_trained``); a local directory is used as is; any
other string is a Hub id, resolved through the local Hugging Face cache (clusters pre-download;
nothing here downloads).
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
                f"checkpoint is not {model_cfg['name']}: {key} is {hf_cfg[key]!r}, the model config says {arch[key]!r}"
            )


def architecture(model_cfg: Mapping[str, Any], hf_cfg: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The architecture fields to validate layouts against: the checkpoint's, else the config's."""
    merged = dict(model_cfg.get("arch") or {})
    if hf_cfg:
        merged.update({k: v for k, v in hf_cfg.items() if k in IDENTITY_FIELDS or k not in merged})
    return merged
