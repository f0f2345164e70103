"""What each Megatron module of a Nemotron-H is, and its layout-independent name.

Kinds are the vocabulary recipes, summaries and recipe tables speak: a module's kind depends only on
its role in the architecture, never on the parallel layout. Global names replace the rank-local
layer and expert indices with global ones, so quantizers from different layouts can be compared.
"""

from __future__ import annotations

import re

# (kind, where the module sits): inside a decoder layer ("layers.*." is prefixed; '*' is an expert
# index) or, for the two model-level modules, the whole name.
_KINDS = [
    ("routed_expert.fc1", "mlp.experts.local_experts.*.linear_fc1"),
    ("routed_expert.fc2", "mlp.experts.local_experts.*.linear_fc2"),
    ("shared_expert.fc1", "mlp.shared_experts.linear_fc1"),
    ("shared_expert.fc2", "mlp.shared_experts.linear_fc2"),
    ("moe_latent.fc1", "mlp.fc1_latent_proj"),
    ("moe_latent.fc2", "mlp.fc2_latent_proj"),
    ("router", "mlp.router"),
    ("mamba.in_proj", "mixer.in_proj"),
    ("mamba.out_proj", "mixer.out_proj"),
    ("mamba.conv1d", "mixer.conv1d"),
    ("attention.qkv", "self_attention.linear_qkv"),
    ("attention.proj", "self_attention.linear_proj"),
    ("attention.core", "self_attention.core_attention"),
    ("dense_mlp.fc1", "mlp.linear_fc1"),
    ("dense_mlp.fc2", "mlp.linear_fc2"),
]
_MODEL_KINDS = [("embedding", "embedding.word_embeddings"), ("lm_head", "output_layer")]
_PATH = dict(_KINDS)


def _regex(path: str) -> str:
    return re.escape(path).replace(r"\*", r"\d+")


_COMPILED = ([(kind, re.compile(r"\.layers\.\d+\." + _regex(path) + "$")) for kind, path in _KINDS]
             + [(kind, re.compile("^" + _regex(path) + "$")) for kind, path in _MODEL_KINDS])

# Kinds with a weight GEMM: the modules a recipe may put in a low-precision format.
GEMM_KINDS = [k for k, _ in _KINDS + _MODEL_KINDS if k not in ("router", "mamba.conv1d", "attention.core")]
# Shown in recipe tables and summaries, in this order.
ALL_KINDS = [k for k, _ in _KINDS + _MODEL_KINDS]
# Kinds that live inside decoder layers (a recipe may treat them per layer).
LAYER_KINDS = [k for k, _ in _KINDS]


def quantizer_pattern(kind: str, local_layer: int, quantizer: str = "*") -> str:
    """ModelOpt ``quantizer_name`` wildcard for the quantizers of ``kind`` in one rank-local layer:
    all of them, or one (``weight_quantizer``, ``input_quantizer``)."""
    if kind not in _PATH:
        raise ValueError(f"{kind!r} is not a per-layer module kind; per-layer kinds: {', '.join(LAYER_KINDS)}")
    return f"*decoder.layers.{local_layer}.{_PATH[kind]}.{quantizer}"


# The module kinds each hybrid-pattern symbol's layer holds (by kind prefix).
_SYMBOL_KINDS = {"M": ("mamba.",), "E": ("routed_expert.", "shared_expert.", "moe_latent.", "router"),
                 "-": ("dense_mlp.",), "*": ("attention.",)}


def kinds_in_layer(symbol: str) -> list[str]:
    """Per-layer module kinds of a layer with hybrid-pattern ``symbol`` (M, E, -, *)."""
    prefixes = _SYMBOL_KINDS.get(symbol, ())
    return [k for k in LAYER_KINDS if k.startswith(prefixes)] if prefixes else []


def module_pattern(kind: str, local_layer: int) -> str:
    """fnmatch pattern of the modules of ``kind`` in one rank-local layer (experts: all of them)."""
    if kind not in _PATH:
        raise ValueError(f"{kind!r} is not a per-layer module kind; per-layer kinds: {', '.join(LAYER_KINDS)}")
    return f"*decoder.layers.{local_layer}.{_PATH[kind]}"


_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
_EXPERT = re.compile(r"\.local_experts\.(\d+)\.")


def strip_wrappers(name: str) -> str:
    """Drop DDP/Float16Module prefixes ('module.module.decoder...' -> 'decoder...')."""
    while name.startswith("module."):
        name = name[len("module."):]
    return name


def unwrap(chunk):
    """The HybridModel inside a model chunk (bf16/fp16 models come wrapped in megatron's Float16Module)."""
    from megatron.core.utils import unwrap_model

    return unwrap_model(chunk)


def global_layers(chunk) -> list[int]:
    """Global indices of the decoder layers a model chunk holds, in order."""
    return [layer.layer_number - 1 for layer in unwrap(chunk).decoder.layers]


def kind_of(module_name: str) -> str | None:
    name = strip_wrappers(module_name)
    for kind, rx in _COMPILED:
        if rx.search(name):
            return kind
    return None


def layer_index(module_name: str) -> int | None:
    m = _LAYER.match(strip_wrappers(module_name))
    return int(m.group(1)) if m else None


def global_name(module_name: str, layer_offset: int = 0, expert_offset: int = 0) -> str:
    """Rank-local Megatron name -> layout-independent name.

    ``decoder.layers.{i}`` becomes the global layer index ``i + layer_offset`` (pipeline stage
    offset) and ``local_experts.{j}`` becomes ``experts.{j + expert_offset}`` (EP rank offset).
    """
    name = strip_wrappers(module_name)
    name = _LAYER.sub(lambda m: f"decoder.layers.{int(m.group(1)) + layer_offset}.", name, count=1)
    return _EXPERT.sub(lambda m: f".experts.{int(m.group(1)) + expert_offset}.", name, count=1)


def decoder_symbols(pattern: str) -> str:
    """The decoder layers of a hybrid pattern, one symbol each (pipeline '|' and MTP '/...' dropped)."""
    return pattern.replace("|", "").split("/")[0]


def adjacent_to_attention(pattern: str) -> list[int]:
    """Indices of Mamba layers ('M') directly before or after an attention layer ('*')."""
    layers = decoder_symbols(pattern)
    out = []
    for i, c in enumerate(layers):
        if c == "M" and ((i > 0 and layers[i - 1] == "*") or (i + 1 < len(layers) and layers[i + 1] == "*")):
            out.append(i)
    return out
