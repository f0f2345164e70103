"""llama.cpp itself, through llama-cpp-python's bindings (built once by launch/setup.sh): its quantizer,
which the GGUF export uses for every quantized type, and the judge the GGUF tests and benchmarks run
(its logits, its tokenizer, its own dequantization). Every function takes a .gguf file."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import torch

ALL_F32 = 0  # llama_ftype LLAMA_FTYPE_ALL_F32


def quantize(src: Path, dst: Path, ftype: int, requantize: bool = False) -> Path:
    """``llama_model_quantize``: llama.cpp's per-tensor types and fallbacks for ``ftype`` (a llama_ftype);
    ``requantize`` lets it read an already quantized file (to ALL_F32: llama.cpp's dequantization)."""
    import llama_cpp
    from llama_cpp._logger import set_verbose

    set_verbose(False)  # llama.cpp's errors still reach stderr; its per-tensor progress does not
    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.allow_requantize = requantize
    params.nthread = max(1, len(os.sched_getaffinity(0)))
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama.cpp could not quantize {Path(src).name} (ftype {ftype}); see its log above")
    return Path(dst)


def dequantize(src: Path, dst: Path) -> Path:
    """The file dequantized to F32 by llama.cpp itself."""
    return quantize(src, dst, ALL_F32, requantize=True)


def logits(path: Path, input_ids: list[int], n_ctx: int = 512) -> torch.Tensor:
    """llama.cpp's logits at every position of ``input_ids`` (float32 [len, vocab])."""
    import numpy as np
    from llama_cpp import Llama

    n = max(n_ctx, len(input_ids))
    llm = Llama(model_path=str(path), n_ctx=n, n_batch=n, logits_all=True, verbose=False, n_threads=1)
    try:
        llm.reset()
        llm.eval(list(input_ids))
        return torch.from_numpy(np.array(llm.scores[: len(input_ids)], dtype=np.float32))
    finally:
        llm.close()


def tokenize(path: Path, text: str) -> list[int]:
    """llama.cpp's tokenization of ``text`` (special tokens parsed, no BOS added)."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=64, vocab_only=True, verbose=False)
    try:
        return llm.tokenize(text.encode(), add_bos=False, special=True)
    finally:
        llm.close()
