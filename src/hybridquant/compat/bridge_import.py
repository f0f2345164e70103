"""Import megatron-bridge where Transformer-Engine is not installed.

megatron-bridge 0.6.2 imports ``transformer_engine.pytorch`` at module level in its LoRA layers
(``megatron/bridge/peft/lora_layers.py``), which ``AutoBridge`` pulls in even though the HF<->Megatron
conversion never touches TE. Transformer-Engine cannot be installed usefully without CUDA, and the
GPU machines we test on do not always have it either.

``import_auto_bridge()`` puts an inert ``transformer_engine`` package in ``sys.modules`` for the
duration of that one import and removes it afterwards, so no other library (megatron-core, ModelOpt)
ever mistakes it for a real installation. Anything taken from the stand-in raises ImportError when
used, so a code path that really needs TE fails loudly instead of computing with a fake.

The package ``__init__`` of ``megatron.bridge`` (and of ``megatron.bridge.models``) imports the
bridge, provider and Hugging Face classes of every model family megatron-bridge supports, and its
diffusion models (~2 CPU-seconds in every process that builds a model). Only the Nemotron-H bridge is
used here: the two packages are entered without running their ``__init__`` (their submodules import
as usual), and ``AutoBridge`` is imported with the Nemotron-H bridge registered.
"""

from __future__ import annotations

import importlib.util
import sys
import types

_TE_MODULES = ("transformer_engine", "transformer_engine.pytorch", "transformer_engine.pytorch.ops")
_EVERY_FAMILY_PACKAGES = ("megatron.bridge", "megatron.bridge.models")


def _missing(qualname: str) -> type:
    def refuse(*args, **kwargs):
        raise ImportError(
            f"{qualname} needs Transformer-Engine, which is not installed "
            "(install the project's [gpu] extra on a CUDA machine)"
        )

    return type(qualname.rsplit(".", 1)[-1], (), {"__init__": refuse, "__call__": refuse})


class _MissingTransformerEngine(types.ModuleType):
    """Every attribute is a class that cannot be instantiated: annotations and isinstance checks at
    import time work (isinstance is always False), any real use raises ImportError."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        value = _missing(f"{self.__name__}.{name}")
        setattr(self, name, value)
        return value


def te_available() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def import_auto_bridge():
    """Return ``megatron.bridge.AutoBridge`` with the Nemotron-H bridge registered, importing it
    without TE when TE is absent."""
    if te_available() or "megatron.bridge" in sys.modules:
        return _import_nemotron_h_bridge()
    # Libraries that probe for TE must have done so against the real environment first.
    import megatron.core  # noqa: F401
    import megatron.core.models.hybrid.hybrid_layer_specs  # noqa: F401
    import modelopt.torch.quantization  # noqa: F401

    inserted = []
    for name in _TE_MODULES:
        if name not in sys.modules:
            module = _MissingTransformerEngine(name)
            module.__path__ = []  # a package, so submodule imports resolve to the stand-ins
            sys.modules[name] = module
            inserted.append(name)
            parent, _, child = name.rpartition(".")
            if parent:
                setattr(sys.modules[parent], child, module)
    try:
        return _import_nemotron_h_bridge()
    finally:
        for name in inserted:
            sys.modules.pop(name, None)


def _import_nemotron_h_bridge():
    """``AutoBridge`` and the Nemotron-H bridge, without the every-family package ``__init__``s."""
    for name in _EVERY_FAMILY_PACKAGES:
        if name not in sys.modules:
            package = importlib.util.module_from_spec(importlib.util.find_spec(name))  # __path__, no __init__
            sys.modules[name] = package
            parent, _, child = name.rpartition(".")
            setattr(sys.modules[parent], child, package)
    import megatron.bridge.models.nemotronh  # noqa: F401 - registers NemotronHBridge with AutoBridge
    from megatron.bridge.models.conversion.auto_bridge import AutoBridge

    bridge_package = sys.modules["megatron.bridge"]
    if not hasattr(bridge_package, "AutoBridge"):
        bridge_package.AutoBridge = AutoBridge  # as the real package __init__ exports it
    return AutoBridge
