"""Hugging Face Nemotron-H checkpoint -> Megatron-core HybridModel, through megatron-bridge.

The bridge owns the HF<->Megatron name mapping and the TP/EP/PP splitting of weights; this module
only chooses the layer spec and the settings that quantization needs:

* Transformer-Engine layer spec where TE is installed on a CUDA machine (the production path);
  otherwise ModelOpt's TE-free hybrid spec with local attention (CPU, or a GPU without TE).
* Experts as ``SequentialMLP`` (no grouped GEMM): ModelOpt then quantizes each expert's linears
  and keeps per-expert weight scales, which is what the exported checkpoint needs.
* No fusions that have no CPU implementation.

Model code here runs no collectives: gathering TP-sharded logits is done by the caller
(``parallel.gather_logits``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from hybridquant import hf_checkpoint, modules
from hybridquant.compat import cpu as cpu_compat
from hybridquant.compat.bridge_import import import_auto_bridge, te_available

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    bridge: Any
    provider: Any
    chunks: list  # megatron model chunks (one per virtual pipeline stage; we use one)

    @property
    def module(self) -> torch.nn.Module:
        return self.chunks[0]

    @property
    def hf_vocab_size(self) -> int:
        return int(self.bridge.hf_pretrained.config.vocab_size)


def select_spec(spec: str):
    """'auto' picks TE on CUDA when TE is installed, else the TE-free spec."""
    import megatron.core.post_training.modelopt.hybrid.model_specs as modelopt_specs

    if spec == "auto":
        spec = "te" if torch.cuda.is_available() and te_available() else "local"
    if spec == "te":
        return modelopt_specs.get_hybrid_stack_modelopt_spec(use_default_te_spec=True, moe_grouped_gemm=False)
    if spec == "local":
        return modelopt_specs.get_hybrid_stack_modelopt_spec(local_core_attention=True, remap_te_layernorm=True)
    raise ValueError(f"model spec must be auto, te or local, got {spec!r}")


def make_provider(hf_path: str, layout, dtype: str, spec: str = "auto", restore_modelopt_state: bool = False,
                  router_dtype: str | None = None, training: dict[str, Any] | None = None):
    """Return (bridge, provider) configured for ``layout`` but not yet built. ``router_dtype='fp32'``
    runs the MoE router (logits, top-k, expert weighting) in FP32 whatever the model dtype; ``None``
    keeps megatron-bridge's setting for the model. ``training``: transformer-config settings of a
    training run (loss normalisation, auxiliary losses), applied last."""
    cpu_compat.apply()
    AutoBridge = import_auto_bridge()
    bridge = AutoBridge.from_hf_pretrained(hf_path, torch_dtype=DTYPES[dtype])
    return bridge, _configure(bridge, layout, dtype, spec, restore_modelopt_state, router_dtype, training)


def provider_from_config(hf_config, layout, dtype: str, spec: str = "auto", router_dtype: str | None = None):
    """A provider from a Hugging Face config alone (no checkpoint, no weights): for describing a model."""
    cpu_compat.apply()
    AutoBridge = import_auto_bridge()
    return _configure(AutoBridge.from_hf_config(hf_config), layout, dtype, spec, False, router_dtype)


def _configure(bridge, layout, dtype: str, spec: str, restore_modelopt_state: bool, router_dtype: str | None,
               training: dict[str, Any] | None = None):
    torch_dtype = DTYPES[dtype]
    provider = bridge.to_megatron_provider(load_weights=False)
    provider.tensor_model_parallel_size = layout.tp
    provider.pipeline_model_parallel_size = layout.pp
    provider.expert_model_parallel_size = layout.ep
    provider.expert_tensor_parallel_size = layout.etp
    provider.sequence_parallel = False
    provider.hybrid_stack_spec = select_spec(spec)
    settings: dict[str, Any] = dict(
        moe_grouped_gemm=False,
        moe_permute_fusion=False,
        moe_shared_expert_overlap=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        first_last_layers_bf16=False,
        bf16=torch_dtype == torch.bfloat16,
        fp16=torch_dtype == torch.float16,
        params_dtype=torch_dtype,
        pipeline_dtype=torch_dtype,
        # The production dispatcher: data-parallel ranks may hold sequences of different lengths
        # (calibration samples keep their natural length), which all-to-all supports.
        moe_token_dispatcher_type="alltoall",
        # Calibration must see the routing the model really does: no capacity dropping.
        moe_expert_capacity_factor=None,
        restore_modelopt_state=restore_modelopt_state,
    )
    # null keeps the bridge's choice for the model (Nemotron-H: fp32, as transformers and vLLM route).
    if router_dtype is not None:
        settings["moe_router_dtype"] = router_dtype
    for key, value in (training or {}).items():
        if not hasattr(provider, key):
            raise AttributeError(f"megatron's transformer config has no setting {key!r}")
        settings[key] = value
    for key, value in settings.items():
        setattr(provider, key, value)
    provider.finalize()
    return provider


def build(provider) -> list:
    """Instantiate this rank's model chunks (random weights) for an already-initialised layout."""
    chunks = provider.provide_distributed_model(
        wrap_with_ddp=False, use_cpu_initialization=not torch.cuda.is_available(),
        bf16=provider.bf16, fp16=provider.fp16,
    )
    for chunk in chunks:
        chunk.eval()
    return chunks


def build_on_meta(provider) -> torch.nn.Module:
    """The whole model (one process, every layer) with no storage behind its tensors: its structure."""
    provider.perform_initialization = False
    with torch.device("meta"):
        return provider.provide(pre_process=True, post_process=True)


def load_hf(hf_path: str, layout, dtype: str, spec: str = "auto", router_dtype: str | None = None,
            training: dict[str, Any] | None = None) -> LoadedModel:
    """Build the Megatron model for ``layout`` and load the HF weights into it, strictly: every tensor
    of the checkpoint must be taken by a mapping and every Megatron parameter written (one error line
    naming them otherwise, on every rank). Collective when the layout has more than one rank."""
    tensors = hf_checkpoint.CheckpointTensors(hf_path)  # unreadable files fail before anything is built
    bridge, provider = make_provider(hf_path, layout, dtype, spec, router_dtype=router_dtype, training=training)
    chunks = build(provider)
    targets = _mark_unloaded(chunks)
    from megatron.bridge.models.hf_pretrained.state import StateDict

    bridge.hf_pretrained._state_dict_accessor = StateDict(hf_checkpoint.bridge_source(tensors))
    bridge.load_hf_weights(chunks)
    if provider.share_embeddings_and_output_weights:
        hf_checkpoint.account_tied_head(tensors)
    not_loaded = [name for name, tensor in targets if torch.isnan(tensor).any()]
    hf_checkpoint.check_complete(tensors, not_loaded, layers=modules.global_layers(chunks[0]))
    return LoadedModel(bridge=bridge, provider=provider, chunks=chunks)


def _mark_unloaded(chunks: list) -> list[tuple[str, torch.Tensor]]:
    """Fill every floating-point parameter and persistent buffer (what the bridge loads) with NaN, so
    that one the load leaves alone stays recognisable. Returns (name, tensor) for each."""
    targets = []
    with torch.no_grad():
        for chunk in chunks:
            inner = modules.unwrap(chunk)
            non_persistent = {f"{m}.{b}" if m else b for m, mod in inner.named_modules()
                              for b in getattr(mod, "_non_persistent_buffers_set", ())}
            named = list(inner.named_parameters()) + [(n, b) for n, b in inner.named_buffers()
                                                      if n not in non_persistent]
            for name, tensor in named:
                if "_extra_state" in name or not tensor.is_floating_point():
                    continue
                tensor.fill_(float("nan"))
                targets.append((name, tensor))
    return targets


def causal_inputs(input_ids: torch.Tensor):
    """Position ids and an explicit causal mask (True = masked) for a [batch, seq] id tensor."""
    batch, seq = input_ids.shape
    device = input_ids.device
    position_ids = torch.arange(seq, device=device).unsqueeze(0).expand(batch, seq)
    mask = torch.ones(1, 1, seq, seq, dtype=torch.bool, device=device).triu(diagonal=1)
    return position_ids, mask
