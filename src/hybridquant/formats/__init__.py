"""Export formats, by name: ``export.format=<name>`` selects ``hybridquant.formats.<name>``.

A format is one module with a ``Format`` class (see ``modelopt.py``); its options are
``export.options.<name>`` in conf/export.yaml, and the names listed there are the formats there are.
The export core (``hybridquant.export``) gathers every weight with its calibrated scales and hands it
to the format; the format turns it into its tensors (``weight``), may rewrite a whole decoder layer
(``group``), and writes its metadata or assembles its files at the end (``finish``, rank 0). Each format
has an independent reader in ``hybridquant.readers``.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from hybridquant.errors import UserError


class Format:
    """The default behaviour of a format; ``hybridquant.formats.<name>.Format`` subclasses it."""
    name = ""
    uses_scales = True          # False: the format quantizes the source weights itself (GGUF)

    @classmethod
    def check(cls, options: Mapping[str, Any], source_hf: Path) -> None:
        """Refuse bad options, or a model the format cannot hold (UserError), before any process group exists."""
        if options:
            raise UserError(f"export.options.{cls.name} takes no options (given: {', '.join(sorted(options))})")

    def __init__(self, options: Mapping[str, Any], plan, source_hf: Path, model_name: str):
        self.options = dict(options)
        self.plan = plan
        self.source_hf = Path(source_hf)    # the checkpoint's Hugging Face files (config, tokenizer)
        self.model_name = model_name

    def weight(self, hf_name: str, tensor: torch.Tensor, meta, block_scale) -> Iterable[tuple[str, torch.Tensor]]:
        """The tensors one gathered weight becomes (``meta``: its calibrated quantization, or None)."""
        yield hf_name, tensor.detach().cpu().contiguous()

    def group(self, group: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One decoder layer's tensors, complete, before they are written ('' = outside the layers)."""
        return tensors

    def finish(self, directory: Path, shards: list[dict]) -> dict[str, Any]:
        """Rank 0, after every shard is written: the format's own files. Returns the manifest's summary
        fields (at least ``quantization`` and ``tensors``)."""
        raise NotImplementedError


def _class(name: str) -> type[Format]:
    return importlib.import_module(f"hybridquant.formats.{name}").Format


def check_options(name: str, options: Mapping[str, Any], source_hf: Path) -> None:
    _class(name).check(options, Path(source_hf))


def get(name: str, options: Mapping[str, Any], plan, source_hf: Path, model_name: str) -> Format:
    return _class(name)(options, plan, source_hf, model_name)
