"""Materialise a small Nemotron-H as a real Hugging Face checkpoint directory, deterministically.

The architecture comes from the model config (``conf/model/tiny.yaml``), the weights from a seed.
The result is a directory like the Hub's: ``config.json`` (with ``hybrid_override_pattern``),
``model.safetensors`` under the Hub's tensor names, ``generation_config.json`` and a byte-level
tokenizer. It is cached under a key that covers everything it is made from, written to a temporary
directory and renamed into place, so concurrent ranks and interrupted runs never see half a model.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import zlib
from pathlib import Path
from typing import Any, Mapping

import torch

from hybridquant import tokenizer as byte_tokenizer

# Bump when the way weights or files are produced changes: old cache entries are then ignored.
FORMAT_VERSION = 7  # 7: the tokenizer's NUL-pair merge (llama.cpp needs merges)



# transformers 5.x `save_pretrained` writes Nemotron-H in the Hub layout (per-expert tensors,
# `backbone.` prefix) except for one name: it writes `backbone.embedding.weight` where the Hub
# checkpoints and megatron-bridge's mapping use `backbone.embeddings.weight`. A mismatch loads
# silently with random embeddings, so the tiny checkpoint is written with the Hub's name.
_EMBEDDING_FIX = {"backbone.embedding.weight": "backbone.embeddings.weight"}


def cache_root() -> Path:
    return Path(os.environ.get("HYBRIDQUANT_CACHE", Path.home() / ".cache" / "hybridquant"))


def checkpoint_key(arch: Mapping[str, Any], seed: int) -> str:
    blob = json.dumps({"arch": dict(arch), "seed": seed, "format": FORMAT_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def hf_config(arch: Mapping[str, Any]):
    from transformers import NemotronHConfig

    return NemotronHConfig(
        **dict(arch),
        architectures=["NemotronHForCausalLM"],
        bos_token_id=byte_tokenizer.BOS_ID,
        eos_token_id=byte_tokenizer.EOS_ID,
        pad_token_id=byte_tokenizer.PAD_ID,
        use_mamba_kernels=False,
        torch_dtype="float32",
    )


_RESIDUAL_WRITERS = ("out_proj", "o_proj", "down_proj")


def _init_weights(model: torch.nn.Module, seed: int) -> None:
    """Deterministic weights with realistic spread: each tensor from its own generator keyed by
    (seed, name), so the values do not depend on construction order or library version."""
    num_layers = model.config.num_hidden_layers
    with torch.no_grad():
        tensors = list(model.named_parameters()) + [
            (n, b) for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")
        ]
        for name, param in tensors:
            gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            leaf = name.rsplit(".", 1)[-1]
            if "norm" in name:
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=gen))
            elif leaf == "A_log":
                param.copy_(torch.log(torch.empty(param.shape).uniform_(1.0, 16.0, generator=gen)))
            elif leaf == "D":
                param.copy_(torch.ones(param.shape))
            elif leaf == "dt_bias":
                dt = torch.exp(torch.empty(param.shape).uniform_(-6.9, -2.3, generator=gen))
                param.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
            elif leaf == "e_score_correction_bias":
                param.copy_(0.05 * torch.randn(param.shape, generator=gen))
            elif param.dim() >= 2:  # [out, in] or [experts, out, in] or conv [channels, 1, width]
                std = param.shape[-1] ** -0.5
                if any(p in name for p in _RESIDUAL_WRITERS):  # GPT-2 style residual scaling
                    std /= (2 * num_layers) ** 0.5
                param.copy_(std * torch.randn(param.shape, generator=gen))
            else:  # biases
                param.copy_(0.02 * torch.randn(param.shape, generator=gen))


def _write(directory: Path, arch: Mapping[str, Any], seed: int) -> None:
    from safetensors.torch import load_file, save_file
    from transformers import GenerationConfig, NemotronHForCausalLM

    config = hf_config(arch)
    model = NemotronHForCausalLM(config).float().eval()
    _init_weights(model, seed)
    model.save_pretrained(str(directory))
    weights = directory / "model.safetensors"
    state = load_file(str(weights))
    save_file({_EMBEDDING_FIX.get(k, k): v for k, v in state.items()}, str(weights), metadata={"format": "pt"})
    # Hub configs carry the pattern string; keep both spellings for every reader.
    cfg_path = directory / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["hybrid_override_pattern"] = config.hybrid_override_pattern
    cfg["num_hidden_layers"] = config.num_hidden_layers
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    GenerationConfig(
        bos_token_id=byte_tokenizer.BOS_ID,
        eos_token_id=[byte_tokenizer.EOS_ID, byte_tokenizer.IM_END_ID],
        pad_token_id=byte_tokenizer.PAD_ID,
    ).save_pretrained(str(directory))
    byte_tokenizer.save_tokenizer(directory)
    (directory / "TINY_MODEL.json").write_text(
        json.dumps({"seed": seed, "format": FORMAT_VERSION, "arch": dict(arch)}, indent=2, sort_keys=True)
    )


def materialize(arch: Mapping[str, Any], seed: int, root: Path | None = None) -> Path:
    """Return the path of the cached checkpoint for (arch, seed), creating it if needed."""
    root = Path(root) if root is not None else cache_root()
    target = root / "models" / f"tiny-{checkpoint_key(arch, seed)}"
    if (target / "model.safetensors").exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".materialize.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "model.safetensors").exists():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".tiny-", dir=target.parent))
        try:
            _write(staging, arch, seed)
            staging.rename(target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return target
