"""GGUF files read back independently of the exporter: llama.cpp's ``gguf`` package reads the file and
dequantizes every tensor (K-quants included), the tensor names and transforms of llama.cpp's Nemotron-H
are undone, and the Hugging Face config is rebuilt from the GGUF metadata alone (the per-layer
head_count_kv / feed_forward_length arrays give the hybrid pattern), so that a file missing a key or
holding a wrong one does not read as the model it came from.

``path`` is a .gguf file, or an export directory holding exactly one.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

_BLK = re.compile(r"^blk\.(\d+)\.(.+)$")
_GLOBAL = {"token_embd.weight": "backbone.embeddings.weight", "output_norm.weight": "backbone.norm_f.weight",
           "output.weight": "lm_head.weight"}
_LAYER = {
    "attn_norm.weight": "norm.weight", "ssm_in.weight": "mixer.in_proj.weight", "ssm_in.bias": "mixer.in_proj.bias",
    "ssm_conv1d.weight": "mixer.conv1d.weight", "ssm_conv1d.bias": "mixer.conv1d.bias", "ssm_dt.bias": "mixer.dt_bias",
    "ssm_a": "mixer.A_log", "ssm_d": "mixer.D", "ssm_norm.weight": "mixer.norm.weight",
    "ssm_out.weight": "mixer.out_proj.weight", "ssm_out.bias": "mixer.out_proj.bias",
    "attn_q.weight": "mixer.q_proj.weight", "attn_k.weight": "mixer.k_proj.weight",
    "attn_v.weight": "mixer.v_proj.weight", "attn_output.weight": "mixer.o_proj.weight",
    "attn_output.bias": "mixer.o_proj.bias", "ffn_gate_inp.weight": "mixer.gate.weight",
    "exp_probs_b.bias": "mixer.gate.e_score_correction_bias",
    "ffn_up_shexp.weight": "mixer.shared_experts.up_proj.weight",
    "ffn_down_shexp.weight": "mixer.shared_experts.down_proj.weight",
    "ffn_latent_down.weight": "mixer.fc1_latent_proj.weight", "ffn_latent_up.weight": "mixer.fc2_latent_proj.weight",
    "ffn_up.weight": "mixer.up_proj.weight", "ffn_down.weight": "mixer.down_proj.weight",
    "ffn_up.bias": "mixer.up_proj.bias", "ffn_down.bias": "mixer.down_proj.bias",
}


def gguf_file(path: Path) -> Path | None:
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir():
        files = sorted(p for p in path.glob("*.gguf") if not p.name.startswith("."))
        if len(files) == 1:
            return files[0]
        if len(files) > 1:
            raise ValueError(f"{path} holds {len(files)} GGUF files ({', '.join(f.name for f in files)}): give one")
    return None


def is_export(path: Path) -> bool:
    try:
        return gguf_file(path) is not None
    except ValueError:
        return True  # a GGUF export, of several types: reading it names the choice


def _field(reader, key: str, default=None):
    field = reader.get_field(key)
    if field is None:
        if default is not None:
            return default
        raise ValueError(f"the GGUF file has no {key}")
    return field.contents()


def metadata(path: Path) -> dict:
    """Every key of the file (arrays as lists), for tests and model cards."""
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_file(path)))
    return {key: field.contents() for key, field in reader.fields.items()}


def tensor_types(path: Path) -> dict[str, str]:
    """GGUF tensor name -> its GGML type name (F32, Q4_K, Q5_0, ...)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_file(path)))
    return {t.name: t.tensor_type.name for t in reader.tensors}


def config_from_metadata(reader) -> dict:
    arch = _field(reader, "general.architecture")
    a = arch
    layers = int(_field(reader, f"{a}.block_count"))
    kv = list(_field(reader, f"{a}.attention.head_count_kv"))
    ff = list(_field(reader, f"{a}.feed_forward_length"))
    if len(kv) != layers or len(ff) != layers:
        raise ValueError("the GGUF per-layer arrays do not have block_count entries")
    moe = arch == "nemotron_h_moe"
    pattern = "".join("*" if kv[i] else ("E" if moe else "-") if ff[i] else "M" for i in range(layers))
    heads = int(_field(reader, f"{a}.ssm.time_step_rank"))
    config = {
        "architectures": ["NemotronHForCausalLM"], "model_type": "nemotron_h",
        "hybrid_override_pattern": pattern, "num_hidden_layers": layers,
        "vocab_size": len(_field(reader, "tokenizer.ggml.tokens")),
        "hidden_size": int(_field(reader, f"{a}.embedding_length")),
        "num_attention_heads": int(_field(reader, f"{a}.attention.head_count")),
        "num_key_value_heads": max(kv) if max(kv) else int(_field(reader, f"{a}.attention.head_count")),
        "head_dim": int(_field(reader, f"{a}.attention.key_length")),
        "mamba_num_heads": heads,
        "mamba_head_dim": int(_field(reader, f"{a}.ssm.inner_size")) // heads,
        "ssm_state_size": int(_field(reader, f"{a}.ssm.state_size")),
        "n_groups": int(_field(reader, f"{a}.ssm.group_count")),
        "conv_kernel": int(_field(reader, f"{a}.ssm.conv_kernel")),
        "layer_norm_epsilon": float(_field(reader, f"{a}.attention.layer_norm_epsilon")),
        "mamba_hidden_act": "silu", "mlp_hidden_act": "relu2",
        "max_position_embeddings": int(_field(reader, f"{a}.context_length")),
        "bos_token_id": int(_field(reader, "tokenizer.ggml.bos_token_id")),
        "eos_token_id": int(_field(reader, "tokenizer.ggml.eos_token_id")),
        "pad_token_id": int(_field(reader, "tokenizer.ggml.padding_token_id"))
        if reader.get_field("tokenizer.ggml.padding_token_id") is not None else None,
        "use_mamba_kernels": False,
    }
    if moe:
        config.update({
            "n_routed_experts": int(_field(reader, f"{a}.expert_count")),
            "num_experts_per_tok": int(_field(reader, f"{a}.expert_used_count")),
            "moe_intermediate_size": int(_field(reader, f"{a}.expert_feed_forward_length")),
            "moe_shared_expert_intermediate_size": int(_field(reader, f"{a}.expert_shared_feed_forward_length")),
            "n_shared_experts": int(_field(reader, f"{a}.expert_shared_count")),
            "routed_scaling_factor": float(_field(reader, f"{a}.expert_weights_scale")),
            "norm_topk_prob": bool(_field(reader, f"{a}.expert_weights_norm")),
            "n_group": int(_field(reader, f"{a}.expert_group_count")),
            "topk_group": int(_field(reader, f"{a}.expert_group_used_count", 1)),
        })
        if reader.get_field(f"{a}.moe_latent_size") is not None:
            config["moe_latent_size"] = int(_field(reader, f"{a}.moe_latent_size"))
    else:
        config["intermediate_size"] = max(ff)
    return config


def read(path: Path, dtype=torch.float32) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(weights under the Hub's names in ``dtype``, the GGML type of each, the config from the metadata)."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(str(gguf_file(path)))
    config = config_from_metadata(reader)
    weights: dict[str, torch.Tensor] = {}
    formats: dict[str, str] = {}
    names = {t.name for t in reader.tensors}
    for t in reader.tensors:
        values = torch.from_numpy(dequantize(t.data, t.tensor_type).copy())  # numpy order = reversed ggml shape
        m = _BLK.match(t.name)
        if m is None:
            if t.name not in _GLOBAL:
                raise ValueError(f"GGUF tensor {t.name} is not one of llama.cpp's Nemotron-H tensors")
            hub = [(_GLOBAL[t.name], values)]
        else:
            layer, rest = int(m.group(1)), m.group(2)
            prefix = f"backbone.layers.{layer}."
            if rest in ("ffn_up_exps.weight", "ffn_down_exps.weight"):
                kind = rest.split("_")[1]
                hub = [(f"{prefix}mixer.experts.{j}.{kind}_proj.weight", values[j]) for j in range(values.shape[0])]
            elif rest in _LAYER:
                hub = [(prefix + _LAYER[rest], _undo(_LAYER[rest], values, config))]
            else:
                raise ValueError(f"GGUF tensor {t.name} is not one of llama.cpp's Nemotron-H tensors")
        for name, value in hub:
            weights[name] = value.to(dtype).contiguous()
            formats[name] = t.tensor_type.name
    if "output.weight" not in names:
        config["tie_word_embeddings"] = True
    else:
        config["tie_word_embeddings"] = False
    config["use_conv_bias"] = any(n.endswith("ssm_conv1d.bias") for n in names)
    config["use_bias"] = any(n.endswith("ssm_in.bias") for n in names)
    config["mamba_proj_bias"] = config["use_bias"]
    config["attention_bias"] = any(n.endswith("attn_output.bias") for n in names)
    config["mlp_bias"] = any(n.endswith(("ffn_up.bias", "ffn_down.bias")) for n in names)
    return weights, formats, config


def unpermute_qk(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo the converter's q/k row order: within each head, GGUF row 2j+s is Hugging Face row s*hd/2+j."""
    rows = weight.shape[0]
    return weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _undo(hub_rest: str, values: torch.Tensor, config: dict) -> torch.Tensor:
    if hub_rest == "mixer.conv1d.weight":
        return values.unsqueeze(1)
    if hub_rest == "mixer.A_log":
        return torch.log(-values.double()).float().reshape(-1)
    if hub_rest == "mixer.D":
        return values.reshape(-1)
    if hub_rest == "mixer.norm.weight":
        return values.reshape(-1)
    if hub_rest == "mixer.q_proj.weight":
        return unpermute_qk(values, config["num_attention_heads"])
    if hub_rest == "mixer.k_proj.weight":
        return unpermute_qk(values, config["num_key_value_heads"])
    return values

