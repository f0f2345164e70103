"""GGUF for llama.cpp and Ollama: one ``<model>-<TYPE>.gguf`` per requested type, plus an Ollama Modelfile.

Written with the ``gguf`` package (llama.cpp's own writer) under the tensor names, architecture and
metadata that llama.cpp's converter (``convert_hf_to_gguf.py``, ``NemotronHModel``) writes for Nemotron-H:
architecture ``nemotron_h_moe`` (``nemotron_h`` without experts), experts stacked per layer into
``ffn_{up,down}_exps``, ``ssm_a = -exp(A_log)``, the Mamba norm split per group, q/k rows in the order
the converter writes them, the router, norms, conv1d and SSM parameters kept in F32, and the tokenizer
(GPT-2 BPE vocabulary, merges, special tokens, chat template).

GGUF types are llama.cpp's own quantizations of the source weights, not the recipe's FP8/NVFP4 scales:
the decoder layers stream from the checkpoint as for every format (any layout), each group is written
in GGUF's names and the source's dtype, and rank 0 assembles a lossless base file (F32 for float32
sources, BF16 otherwise). F32/F16/BF16 files are written from the same groups; quantized types
(Q8_0, Q4_K_M, ...) are made from the base file by llama.cpp's ``llama_model_quantize``, which assigns
the per-tensor types of its mixtures (Q6_K for the output and some attn_v / ffn_down, F32 for what
it never quantizes) and falls back per tensor where a row does not divide into its blocks.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hybridquant import formats, llamacpp
from hybridquant.errors import UserError

# llama.cpp's file types (include/llama.h, llama_ftype): the float ones are written here, the others by
# llama.cpp's quantizer from the base file.
FLOAT_TYPES = {"F32": 0, "F16": 1, "BF16": 32}
QUANT_TYPES = {"Q8_0": 7, "Q4_K_M": 15, "Q5_K_M": 17, "Q6_K": 18}
TYPES = {**FLOAT_TYPES, **QUANT_TYPES}
PRE_TOKENIZERS_WITHOUT_SPLIT = "default"  # see _pre_tokenizer
CONTEXT_LENGTH_SSM = 2 ** 20               # what the converter writes for hybrid models without RoPE

_LAYER = re.compile(r"^backbone\.layers\.(\d+)\.(.+)$")
_EXPERT = re.compile(r"^mixer\.experts\.(\d+)\.(up|down)_proj\.weight$")
# Hub name (after backbone.layers.N.) -> (GGUF name after blk.N., kept in F32)
_LAYER_TENSORS = {
    "norm.weight": ("attn_norm.weight", True),
    "mixer.in_proj.weight": ("ssm_in.weight", False),
    "mixer.in_proj.bias": ("ssm_in.bias", True),
    "mixer.conv1d.weight": ("ssm_conv1d.weight", True),
    "mixer.conv1d.bias": ("ssm_conv1d.bias", True),
    "mixer.dt_bias": ("ssm_dt.bias", True),
    "mixer.A_log": ("ssm_a", True),
    "mixer.D": ("ssm_d", True),
    "mixer.norm.weight": ("ssm_norm.weight", True),
    "mixer.out_proj.weight": ("ssm_out.weight", False),
    "mixer.out_proj.bias": ("ssm_out.bias", True),
    "mixer.q_proj.weight": ("attn_q.weight", False),
    "mixer.k_proj.weight": ("attn_k.weight", False),
    "mixer.v_proj.weight": ("attn_v.weight", False),
    "mixer.o_proj.weight": ("attn_output.weight", False),
    "mixer.o_proj.bias": ("attn_output.bias", True),
    "mixer.gate.weight": ("ffn_gate_inp.weight", True),
    "mixer.gate.e_score_correction_bias": ("exp_probs_b.bias", True),
    "mixer.shared_experts.up_proj.weight": ("ffn_up_shexp.weight", False),
    "mixer.shared_experts.down_proj.weight": ("ffn_down_shexp.weight", False),
    "mixer.fc1_latent_proj.weight": ("ffn_latent_down.weight", False),
    "mixer.fc2_latent_proj.weight": ("ffn_latent_up.weight", False),
    "mixer.up_proj.weight": ("ffn_up.weight", False),
    "mixer.down_proj.weight": ("ffn_down.weight", False),
    "mixer.up_proj.bias": ("ffn_up.bias", True),
    "mixer.down_proj.bias": ("ffn_down.bias", True),
}
_GLOBAL_TENSORS = {
    "backbone.embeddings.weight": ("token_embd.weight", False),
    "backbone.norm_f.weight": ("output_norm.weight", True),
    "lm_head.weight": ("output.weight", False),
}
F32_PREFIX = "f32:"   # parts mark the tensors that stay F32 in every type


def pattern_of(config: dict) -> str:
    pattern = config.get("hybrid_override_pattern")
    if pattern:
        return pattern
    kinds = {"mamba": "M", "attention": "*", "moe": "E", "mlp": "-"}
    return "".join(kinds[k] for k in config["layers_block_type"])


def architecture(config: dict) -> str:
    pattern = pattern_of(config)
    if "E" in pattern and "-" in pattern:
        raise UserError("llama.cpp's nemotron_h_moe cannot hold dense MLP layers ('-') beside MoE layers ('E'): "
                        f"pattern {pattern} has both, so it has no GGUF form")
    return "nemotron_h_moe" if "E" in pattern else "nemotron_h"


def permute_qk(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """The row order llama.cpp's converter gives q/k of models converted from Llama-style checkpoints
    (interleaved halves of each head). Nemotron-H has no RoPE and q and k are permuted alike, so the
    attention scores are unchanged; it is done to write what the converter writes."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


class Format(formats.Format):
    name = "gguf"
    uses_scales = False

    @classmethod
    def check(cls, options, source_hf):
        unknown = sorted(set(options) - {"types", "pre"})
        if unknown:
            raise UserError(f"export.options.gguf has no option {unknown[0]!r} (options: types, pre)")
        types = options.get("types")
        if not isinstance(types, list) or not types:
            raise UserError("export.options.gguf.types must be a non-empty list, e.g. [Q4_K_M, Q8_0]")
        for t in types:
            if t not in TYPES:
                raise UserError(f"export.options.gguf.types: {t!r} is not a GGUF type this export writes "
                                f"(one of: {', '.join(TYPES)})")
        if len(set(types)) != len(types):
            raise UserError(f"export.options.gguf.types lists a type twice: {types}")
        config = json.loads((source_hf / "config.json").read_text())
        architecture(config)
        if not any(k in config for k in ("layer_norm_eps", "layer_norm_epsilon", "norm_epsilon")):
            raise UserError("config.json has no layer_norm_epsilon, which llama.cpp's Nemotron-H needs")
        if not options.get("pre"):
            _pre_tokenizer(source_hf)

    def __init__(self, options, plan, source_hf, model_name):
        super().__init__(options, plan, source_hf, model_name)
        self.config = json.loads((self.source_hf / "config.json").read_text())
        self.arch = architecture(self.config)
        self.pattern = pattern_of(self.config)
        self.types = list(self.options["types"])

    # -- streaming: one decoder layer at a time, on the rank that writes it ----------------------

    def group(self, group, tensors):
        out: dict[str, torch.Tensor] = {}
        experts: dict[str, dict[int, torch.Tensor]] = {"up": {}, "down": {}}
        for name, tensor in tensors.items():
            m = _LAYER.match(name)
            if m is None:
                if name not in _GLOBAL_TENSORS:
                    raise UserError(f"tensor {name} has no GGUF name (llama.cpp's {self.arch} has none)")
                gguf_name, f32 = _GLOBAL_TENSORS[name]
                out[self._key(gguf_name, f32)] = self._stored(tensor, f32)
                continue
            layer, rest = int(m.group(1)), m.group(2)
            e = _EXPERT.match(rest)
            if e:
                experts[e.group(2)][int(e.group(1))] = tensor
                continue
            if rest not in _LAYER_TENSORS:
                raise UserError(f"tensor {name} has no GGUF name (llama.cpp's {self.arch} has none)")
            gguf_name, f32 = _LAYER_TENSORS[rest]
            out[self._key(f"blk.{layer}.{gguf_name}", f32)] = self._stored(self._transform(rest, tensor), f32)
        if any(experts.values()):
            layer = int(_LAYER.match(next(iter(tensors))).group(1))
            count = int(self.config["n_routed_experts"])
            for kind, parts in experts.items():
                if sorted(parts) != list(range(count)):
                    raise UserError(f"layer {layer}: experts {sorted(parts)} of the {kind} projection arrived, "
                                    f"n_routed_experts is {count}")
                stacked = torch.stack([parts[j] for j in range(count)], dim=0)
                out[self._key(f"blk.{layer}.ffn_{kind}_exps.weight", False)] = self._stored(stacked, False)
        return out

    @staticmethod
    def _key(name: str, f32: bool) -> str:
        return F32_PREFIX + name if f32 else name

    @staticmethod
    def _stored(tensor: torch.Tensor, f32: bool) -> torch.Tensor:
        tensor = tensor.detach().cpu()
        return (tensor.float() if f32 else tensor).contiguous()

    def _transform(self, rest: str, t: torch.Tensor) -> torch.Tensor:
        if rest == "mixer.conv1d.weight":
            return t.squeeze(1)
        if rest == "mixer.A_log":
            return -torch.exp(t.float()).reshape(-1, 1)
        if rest == "mixer.D":
            return t.reshape(-1, 1)
        if rest == "mixer.norm.weight":
            return t.reshape(int(self.config["n_groups"]), -1)
        if rest == "mixer.q_proj.weight":
            return permute_qk(t, int(self.config["num_attention_heads"]))
        if rest == "mixer.k_proj.weight":
            return permute_qk(t, int(self.config["num_key_value_heads"]))
        return t

    # -- rank 0: the files --------------------------------------------------------------------------

    def finish(self, directory: Path, shards):
        entries = []  # (gguf name, f32, part path, stored key, shape, dtype), in the groups' order, sorted within each
        for shard in shards:
            for key in sorted(shard["tensors"], key=lambda k: k.removeprefix(F32_PREFIX)):
                dtype, shape = shard["tensors"][key]
                entries.append((key.removeprefix(F32_PREFIX), key.startswith(F32_PREFIX), directory / shard["path"],
                                key, tuple(shape), dtype))
        source_dtype = next((dtype for _, f32, _, _, _, dtype in entries if not f32), "float32")
        base_type = "F32" if source_dtype == "float32" else "BF16"
        stem = re.sub(r"[^A-Za-z0-9._-]+", "-", self.model_name)
        quantized = [t for t in self.types if t in QUANT_TYPES]
        written: dict[str, Path] = {}
        for gguf_type in dict.fromkeys([t for t in self.types if t in FLOAT_TYPES] + ([base_type] if quantized else [])):
            name = f"{stem}-{gguf_type}.gguf" if gguf_type in self.types else f".base-{gguf_type}.gguf"
            written[gguf_type] = directory / name
            self._write_float(written[gguf_type], gguf_type, entries)
        for shard in shards:
            (directory / shard["path"]).unlink()
        for gguf_type in quantized:
            written[gguf_type] = directory / f"{stem}-{gguf_type}.gguf"
            llamacpp.quantize(written[base_type], written[gguf_type], QUANT_TYPES[gguf_type])
        if base_type not in self.types and base_type in written:
            written.pop(base_type).unlink()
        notes = [f"GGUF {', '.join(quantized)}: quantized by llama.cpp from the checkpoint's {source_dtype} weights "
                 f"(the recipe's calibrated scales are not GGUF types and are not used)"] if quantized else []
        (directory / "Modelfile").write_text(modelfile(written[self.types[0]].name))
        return {"quantization": ",".join(self.types), "tensors": len(entries),
                "gguf": {t: {"file": written[t].name, "tensor_types": _type_counts(written[t])} for t in self.types},
                "notes": notes}

    def _write_float(self, path: Path, gguf_type: str, entries) -> None:
        """A float GGUF from the parts, streamed: tensor infos from the parts' headers, then one tensor at a time."""
        import gguf
        from safetensors import safe_open

        def as_stored(tensor: torch.Tensor, f32: bool) -> np.ndarray:
            if f32 or gguf_type == "F32":
                return tensor.float().numpy()
            if gguf_type == "F16":
                return tensor.to(torch.float16).numpy()
            return tensor.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)

        writer = gguf.GGUFWriter(str(path), self.arch)
        self._metadata(writer, gguf_type)
        for name, f32, _, _, shape, _ in entries:
            n = int(np.prod(shape)) if shape else 1
            if f32 or gguf_type == "F32":
                writer.add_tensor_info(name, shape, np.dtype(np.float32), 4 * n)
            elif gguf_type == "F16":
                writer.add_tensor_info(name, shape, np.dtype(np.float16), 2 * n)
            else:
                writer.add_tensor_info(name, shape, np.dtype(np.uint16), 2 * n, raw_dtype=gguf.GGMLQuantizationType.BF16)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        handles: dict[Path, Any] = {}
        for _, f32, part, key, _, _ in entries:
            if part not in handles:
                handles.clear()  # parts come in order: one open at a time
                handles[part] = safe_open(str(part), framework="pt")
            writer.write_tensor_data(as_stored(handles[part].get_tensor(key), f32))
        writer.close()

    def _metadata(self, w, gguf_type: str) -> None:
        import gguf

        c, a = self.config, self.arch
        pattern = self.pattern
        layers = len(pattern)
        w.add_type("model")
        w.add_name(self.model_name)
        w.add_file_type(FLOAT_TYPES[gguf_type])
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_uint32(f"{a}.block_count", layers)
        w.add_uint32(f"{a}.context_length", CONTEXT_LENGTH_SSM)
        w.add_uint32(f"{a}.embedding_length", int(c["hidden_size"]))
        mlp = "E" if a == "nemotron_h_moe" else "-"
        ff = int(c["moe_intermediate_size"]) if a == "nemotron_h_moe" else int(c["intermediate_size"])
        w.add_array(f"{a}.feed_forward_length", [ff if s == mlp else 0 for s in pattern])
        w.add_uint32(f"{a}.attention.head_count", int(c["num_attention_heads"]))
        w.add_array(f"{a}.attention.head_count_kv", [int(c["num_key_value_heads"]) if s == "*" else 0 for s in pattern])
        if "rope_theta" in c:
            w.add_float32(f"{a}.rope.freq_base", float(c["rope_theta"]))
        for key in ("rms_norm_eps", "norm_eps"):
            if key in c:
                w.add_float32(f"{a}.attention.layer_norm_rms_epsilon", float(c[key]))
                break
        key = next(k for k in ("layer_norm_eps", "layer_norm_epsilon", "norm_epsilon") if k in c)  # checked
        w.add_float32(f"{a}.attention.layer_norm_epsilon", float(c[key]))
        if a == "nemotron_h_moe":
            w.add_uint32(f"{a}.expert_count", int(c["n_routed_experts"]))
            w.add_uint32(f"{a}.expert_used_count", int(c["num_experts_per_tok"]))
            w.add_uint32(f"{a}.expert_group_count", int(c.get("n_group") or 1))
            if c.get("topk_group") is not None:
                w.add_uint32(f"{a}.expert_group_used_count", int(c["topk_group"]))
        w.add_uint32(f"{a}.vocab_size", int(c["vocab_size"]))
        w.add_uint32(f"{a}.rope.dimension_count", int(c["hidden_size"]) // int(c["num_attention_heads"]))
        w.add_uint32(f"{a}.ssm.conv_kernel", int(c["conv_kernel"]))
        w.add_uint32(f"{a}.ssm.state_size", int(c["ssm_state_size"]))
        w.add_uint32(f"{a}.ssm.group_count", int(c["n_groups"]))
        w.add_uint32(f"{a}.ssm.inner_size", int(c["mamba_num_heads"]) * int(c["mamba_head_dim"]))
        w.add_uint32(f"{a}.ssm.time_step_rank", int(c["mamba_num_heads"]))
        w.add_bool(f"{a}.rope.scaling.finetuned", False)
        head_dim = int(c.get("head_dim") or c.get("attention_head_dim"))
        w.add_uint32(f"{a}.attention.key_length", head_dim)
        w.add_uint32(f"{a}.attention.value_length", head_dim)
        if a == "nemotron_h_moe":
            w.add_uint32(f"{a}.expert_feed_forward_length", int(c["moe_intermediate_size"]))
            w.add_uint32(f"{a}.expert_shared_feed_forward_length", int(c["moe_shared_expert_intermediate_size"]))
            w.add_uint32(f"{a}.expert_shared_count", int(c["n_shared_experts"]))
            w.add_bool(f"{a}.expert_weights_norm", bool(c["norm_topk_prob"]))
            w.add_float32(f"{a}.expert_weights_scale", float(c["routed_scaling_factor"]))
            if c.get("moe_latent_size"):
                w.add_uint32(f"{a}.moe_latent_size", int(c["moe_latent_size"]))
        self._tokenizer(w)

    def _tokenizer(self, w) -> None:
        import gguf
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(self.source_hf))
        vocab_size = -(-int(self.config["vocab_size"]) // 8) * 8
        by_id = {i: t for t, i in tok.get_vocab().items()}
        if max(by_id) >= vocab_size:
            raise UserError(f"the tokenizer has token id {max(by_id)}, beyond the model's vocab_size {vocab_size}")
        added = tok.get_added_vocab()
        decoder = tok.added_tokens_decoder
        tokens, types = [], []
        for i in range(vocab_size):
            if i not in by_id:
                tokens.append(f"[PAD{i}]")
                types.append(gguf.TokenType.UNUSED)
            elif by_id[i] in added:
                special = decoder[i].special if i in decoder else False
                tokens.append(by_id[i])
                types.append(gguf.TokenType.CONTROL if special or _looks_special(by_id[i])
                             else gguf.TokenType.USER_DEFINED)
            else:
                tokens.append(by_id[i])
                types.append(gguf.TokenType.NORMAL)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(self.options.get("pre") or _pre_tokenizer(self.source_hf))
        w.add_token_list(tokens)
        w.add_token_types(types)
        special = gguf.SpecialVocab(str(self.source_hf), load_merges=True, n_vocab=vocab_size)
        if not special.merges:
            raise UserError(f"the tokenizer in {self.source_hf} has no BPE merges; llama.cpp's GPT-2 vocabulary "
                            f"needs them")
        special.add_to_gguf(w, quiet=True)


def _looks_special(token: str) -> bool:
    """The converter's rule for added tokens that are control tokens though not marked special."""
    return (token.startswith("<|") and token.endswith("|>")) or token in ("<pad>", "<mask>") \
        or token.startswith("<unused") or (token.startswith("<｜") and token.endswith("｜>"))


def _pre_tokenizer(source_hf: Path) -> str:
    """llama.cpp's pre-tokenizer name for the checkpoint's tokenizer. A byte-level tokenizer that does not
    split its input (the project's own) gets 'default'; every real tokenizer splits by a regex, and its
    name must be given (export.options.gguf.pre): llama.cpp recognises tokenizers by a hash of their
    output on its own test text, which this exporter does not guess at."""
    spec = json.loads((source_hf / "tokenizer.json").read_text())
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    if all(s.get("type") == "ByteLevel" and not s.get("use_regex", True) for s in steps):
        return PRE_TOKENIZERS_WITHOUT_SPLIT
    raise UserError("the tokenizer splits its input with a pre-tokenizer llama.cpp knows by name only: set "
                    "export.options.gguf.pre (Nemotron-H's own tokenizer: pixtral, as llama.cpp's converter names it)")


def _type_counts(path: Path) -> dict[str, int]:
    """How many tensors of the file have each GGML type (llama.cpp's choice per tensor, fallbacks included)."""
    from gguf import GGUFReader

    counts: dict[str, int] = {}
    for t in GGUFReader(str(path)).tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return dict(sorted(counts.items()))


def modelfile(gguf_name: str) -> str:
    """An Ollama Modelfile for the ChatML format Nemotron-H's chat models use (stops at <|im_end|>)."""
    return (f"FROM ./{gguf_name}\n"
            'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n'
            '{{ end }}<|im_start|>assistant\n"""\n'
            'PARAMETER stop "<|im_end|>"\n'
            'PARAMETER stop "</s>"\n')
