"""Nemotron-H checkpoints that are not the tiny model, written the way users get them: by transformers'
own ``save_pretrained`` (its tensor names and its config.json, nothing rewritten afterwards)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
TINY_ARCH = yaml.safe_load((REPO / "conf" / "model" / "tiny.yaml").read_text())["arch"]

# name -> (architecture changes, dtype, the multi-rank layout it is quantized at). Features that need
# the same layout share a checkpoint (one quantize + export each): attention as the first layer, a
# dense MLP layer and a vocabulary of 1000 (not a multiple of 64) at TP2; one Mamba group and tied
# embeddings at PP2 (the head's copy on the last stage); six experts with top-3 routing at EP2; bfloat16
# weights at EP2 (its own checkpoint: bfloat16 rounding would blunt the other features' bounds).
VARIANTS = {
    "attention_first_dense_vocab_1000": ({"hybrid_override_pattern": "*EM-EM*-E", "vocab_size": 1000}, "float32",
                                         ["parallel.tp=2"]),
    "mamba_one_group_tied": ({"n_groups": 1, "tie_word_embeddings": True}, "float32", ["parallel.pp=2"]),
    "six_experts_top3": ({"n_routed_experts": 6, "num_experts_per_tok": 3}, "float32", ["parallel.ep=2"]),
    "bf16": ({}, "bfloat16", ["parallel.ep=2"]),
}

def write(directory: Path, arch_changes: dict | None = None, dtype: str = "float32", seed: int = 7) -> Path:
    """A Nemotron-H checkpoint saved by transformers (random weights with the tiny model's spread)."""
    from transformers import NemotronHForCausalLM

    from hybridquant import tiny
    from hybridquant import tokenizer as byte_tokenizer

    arch = {**TINY_ARCH, **(arch_changes or {})}
    config = tiny.hf_config(arch)
    model = NemotronHForCausalLM(config).float().eval()
    tiny._init_weights(model, seed)
    if model.config.tie_word_embeddings:
        # transformers' Nemotron-H never ties (it loads lm_head.weight as its own tensor); megatron-bridge
        # does. A tied checkpoint both read alike stores the embedding a second time as lm_head.weight.
        with torch.no_grad():
            model.lm_head.weight.copy_(model.get_input_embeddings().weight)
    model = model.to(getattr(torch, dtype))
    model.config.dtype = dtype
    directory = Path(directory)
    model.save_pretrained(str(directory))
    byte_tokenizer.save_tokenizer(directory)
    return directory


def config(directory: Path) -> dict:
    return json.loads((Path(directory) / "config.json").read_text())
