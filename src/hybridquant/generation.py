"""Text generation from a (possibly sharded) Megatron HybridModel: prompt formatting, sampling, the
decoding loop.

Two ways to produce each next token's logits, chosen by ``cache``:

* ``recurrent``: the prompt is prefilled once and every new token advances the attention KV cache
  and the Mamba convolution/SSM states by one step (``decode``; one process, TP = PP = 1).
* ``recompute``: the whole sequence is run again for every new token (``forward.run``), which works
  at every TP/PP/EP layout; what sharding changes is only the order of floating-point reductions.

The loop itself runs no collectives: the caller passes ``agree``, which makes every rank use the
token chosen on the last pipeline stage (``parallel.from_last_stage``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from hybridquant import decode, forward
from hybridquant.errors import UserError
from hybridquant.model import LoadedModel
from hybridquant.ssm_state import StatePrecision

MODES = ("thinking", "instruct", "raw")
CACHES = ("auto", "recurrent", "recompute")


@dataclass(frozen=True)
class Sampling:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0          # 0: no top-k cut
    top_p: float = 1.0      # 1.0: no nucleus cut
    seed: int = 0

    def __post_init__(self):
        if self.do_sample and self.temperature <= 0:
            raise UserError(f"generation.temperature must be > 0 when sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"generation.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise UserError(f"generation.top_k must be >= 0, got {self.top_k}")

    def generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed)

    def choose(self, logits: torch.Tensor, generator: torch.Generator) -> int:
        """The next token from the last position's logits [vocab]."""
        logits = logits.float()
        if not self.do_sample:
            return int(logits.argmax())
        logits = logits / self.temperature
        if self.top_k:
            kth = torch.topk(logits, min(self.top_k, logits.numel())).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if self.top_p < 1:
            sorted_probs, order = torch.sort(probs, descending=True)
            before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
            sorted_probs[before >= self.top_p] = 0  # keep the smallest prefix whose mass reaches top_p
            probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
        return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))


def format_prompt(tokenizer, text: str, mode: str) -> list[int]:
    """Token ids of one user prompt: the chat template in thinking or instruct mode, or raw text."""
    if mode not in MODES:
        raise UserError(f"generation.mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "raw":
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    if not tokenizer.chat_template:
        raise UserError(f"generation.mode={mode} needs a chat template, and the checkpoint's tokenizer has none "
                        "(use generation.mode=raw)")
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                        enable_thinking=(mode == "thinking"), tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)  # a BatchEncoding or a plain list


def stop_ids(tokenizer, generation_config: dict) -> tuple[int, ...]:
    """End-of-turn tokens: the generation config's eos ids, the tokenizer's eos and ChatML's <|im_end|>."""
    ids = generation_config.get("eos_token_id") or []
    ids = [ids] if isinstance(ids, int) else list(ids)
    ids.append(tokenizer.eos_token_id)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if im_end is not None and im_end != tokenizer.unk_token_id:
        ids.append(im_end)
    return tuple(sorted({int(i) for i in ids if i is not None}))


def resolve_cache(cache: str, layout) -> str:
    if cache not in CACHES:
        raise UserError(f"generation.cache must be one of {', '.join(CACHES)}, got {cache!r}")
    single = layout.world_size == 1
    if cache == "recurrent" and not single:
        raise UserError(f"generation.cache=recurrent runs in one process (tp=pp=ep=1); this run is {layout.tag} "
                        f"on {layout.world_size} ranks (use generation.cache=recompute)")
    if cache == "auto":
        return "recurrent" if single else "recompute"
    return cache


def generate(loaded: LoadedModel, prompt: list[int], max_new_tokens: int, sampling: Sampling, stops: Iterable[int],
             cache: str, agree: Callable[[int], int] = lambda token: token,
             precision: StatePrecision = StatePrecision()) -> list[int]:
    """Up to ``max_new_tokens`` ids continuing ``prompt``, ending at (and including) a stop id."""
    stops = set(stops)
    generator = sampling.generator()
    out: list[int] = []
    with torch.inference_mode():
        if cache == "recurrent":
            session = decode.start(loaded, len(prompt) + max_new_tokens, precision)
            logits = decode.prefill(session, torch.tensor([prompt]))
        for _ in range(max_new_tokens):
            if cache == "recurrent":
                if out:
                    logits = decode.step(session, out[-1])
            else:
                logits = forward.run(loaded.chunks, [torch.tensor([prompt + out])], loaded.hf_vocab_size)[0]
            token = sampling.choose(logits[0, -1], generator) if logits is not None else -1
            out.append(agree(token))
            if out[-1] in stops:
                break
    return out
