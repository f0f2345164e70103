"""Precision of the Mamba SSM state cache in token-by-token inference: fp32, fp16 or fp16_stochastic.

A step rewrites the recurrent state ``h = exp(dt*A) h + dt B x`` of every Mamba layer, so a 16-bit
cache rounds it once per token. Round to nearest has a systematic error for a slowly decaying
state and it accumulates over a long sequence; stochastic rounding's error has zero mean. Serving
stacks expose the same choice: vLLM's ``--mamba-ssm-cache-dtype float16`` with
``--enable-mamba-cache-stochastic-rounding`` and ``--mamba-cache-philox-rounds``, SGLang's options
of the same names, FlashInfer's ``selective_state_update(rand_seed=..., philox_rounds=...)``.

* ``fp32``: the state is held in FP32 (megatron would otherwise hold it in the parameter dtype).
* ``fp16``: held in FP16. An update reads the stored state into FP32, computes the step and the
  layer output in FP32 and stores the new state rounded to nearest even, as megatron's and
  mamba_ssm's kernels do with an FP16 state.
* ``fp16_stochastic``: the same, stored with stochastic rounding as PTX ``cvt.rs.f16x2.f32``
  defines it and FlashInfer emulates it: 13 random bits ``r`` land below the FP16 ulp of the value
  and the sum is truncated, ``|y| = floor(|x| / ulp + r / 2**13) * ulp``, with ``ulp`` the FP16
  ulp of ``|x|``'s binade and ``2**-24`` in the subnormal range. FP16 drops 13 of FP32's 23
  mantissa bits, hence 13 random bits (16 is the BF16 case). A magnitude that rounds past 65504
  becomes inf, as with round to nearest (``cvt.rs`` without ``.satfinite``). The bits are the
  first word of Philox4x32 with ``philox_rounds`` rounds (5 by default; Random123's 10 in the
  known-answer tests), key = seed, counter = (element, step, layer, 0): a run is reproducible and
  every layer, token and state element draws its own bits.

The hook is narrow. ``install()`` wraps megatron's static-batching cache allocation
(``MambaMixer._get_states_from_cache``), which re-types the SSM state to the storage dtype when the
inference context carries a precision (``attach``), and the two functions that produce a state: the
prefill scan (its final state) and the one-token ``selective_state_update``. A mixer without a
precision on its context runs unchanged. The wrappers go around whatever those functions are: the
Triton kernels on a GPU, the reference ops of ``compat.cpu`` on CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from hybridquant.compat import cpu as cpu_compat
from hybridquant.errors import UserError

STATE_DTYPES = ("fp32", "fp16", "fp16_stochastic")
PHILOX_ROUNDS = 5
RANDOM_BITS = 13  # FP32 mantissa bits that FP16 drops

_M0, _M1 = 0xD2511F53, 0xCD9E8D57  # Philox4x32 multipliers
_W0, _W1 = 0x9E3779B9, 0xBB67AE85  # Weyl increments of the key
_U32 = 0xFFFFFFFF


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of ``a * b`` (uint32 values held in int64, in 16-bit halves so
    that no product overflows)."""
    low_half = a * (b & 0xFFFF)
    high_half = a * (b >> 16)
    low = low_half + ((high_half & 0xFFFF) << 16)
    return (high_half >> 16) + (low >> 32), low & _U32


def philox4x32(counter: torch.Tensor, key: tuple[int, int], rounds: int) -> torch.Tensor:
    """Philox4x32 with ``rounds`` rounds (Salmon et al., SC'11; Random123's ``philox4x32_R``).
    ``counter``: [..., 4] uint32 words in int64; returns the [..., 4] output words likewise."""
    c0, c1, c2, c3 = counter.unbind(-1)
    k0, k1 = key
    for _ in range(rounds):
        hi0, lo0 = _mulhilo(_M0, c0)
        hi1, lo1 = _mulhilo(_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _W0) & _U32, (k1 + _W1) & _U32
    return torch.stack((c0, c1, c2, c3), dim=-1)


def random_bits(shape: torch.Size, seed: int, layer: int, step: int, rounds: int = PHILOX_ROUNDS,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """``RANDOM_BITS`` random bits per element of a tensor of ``shape`` (int64)."""
    element = torch.arange(math.prod(shape), dtype=torch.int64, device=device)
    counter = torch.stack((element, torch.full_like(element, step & _U32), torch.full_like(element, layer & _U32),
                           torch.zeros_like(element)), dim=-1)
    words = philox4x32(counter, (seed & _U32, (seed >> 32) & _U32), rounds)
    return (words[:, 0] & ((1 << RANDOM_BITS) - 1)).view(shape)


def stochastic_round_fp16(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """FP32 ``x`` to FP16: ``bits`` (``RANDOM_BITS`` each) added below the FP16 ulp, then truncated."""
    raw = x.float().view(torch.int32).to(torch.int64) & _U32
    biased = (raw >> 23) & 0xFF
    significand = (raw & 0x7FFFFF) | ((biased > 0).to(torch.int64) << 23)
    exponent = biased.clamp(min=1) - 150                    # |x| = significand * 2**exponent
    ulp = (exponent + 23 - 10).clamp(min=-24)               # FP16: 10 mantissa bits, subnormals below 2**-14
    dropped = (ulp - exponent).clamp(max=24 + RANDOM_BITS)  # from there on every result is 0 anyway
    units = (significand + (bits << (dropped - RANDOM_BITS))) >> dropped
    magnitude = units.float() * torch.exp2(ulp.float())     # exact, or >= 2**16 and so inf in FP16
    return torch.where(biased == 0xFF, x, magnitude.copysign(x)).to(torch.float16)


@dataclass(frozen=True)
class StatePrecision:
    dtype: str = "fp32"  # one of STATE_DTYPES
    seed: int = 0
    philox_rounds: int = PHILOX_ROUNDS

    def __post_init__(self):
        if self.dtype not in STATE_DTYPES:
            raise UserError(f"ssm_state_dtype must be one of {', '.join(STATE_DTYPES)}, got {self.dtype!r}")

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "StatePrecision":
        """From the ``inference`` config group (``conf/inference/``)."""
        return cls(dtype=cfg["ssm_state_dtype"], seed=int(cfg["seed"]), philox_rounds=int(cfg["philox_rounds"]))

    @property
    def storage(self) -> torch.dtype:
        return torch.float32 if self.dtype == "fp32" else torch.float16

    def store(self, state: torch.Tensor, layer: int, step: int) -> torch.Tensor:
        """The FP32 ``state`` of ``layer`` after ``step`` as the cache holds it."""
        if self.dtype == "fp16_stochastic":
            bits = random_bits(state.shape, self.seed, layer, step, self.philox_rounds, state.device)
            return stochastic_round_fp16(state, bits)
        return state.to(self.storage)


# The mixer whose state is being updated: (precision, layer, step), set by the cache lookup at the
# start of its forward and taken by the one state update that follows it.
_pending: tuple[StatePrecision, int, int] | None = None


def _take() -> tuple[StatePrecision, int, int] | None:
    global _pending
    current, _pending = _pending, None
    return current


def attach(context, precision: StatePrecision) -> None:
    """Hold the SSM states of a static inference context's Mamba layers at ``precision``."""
    install()
    context.ssm_state_precision = precision


def install() -> None:
    """Wrap megatron's state allocation and state producers (idempotent)."""
    import megatron.core.ssm.mamba_mixer as mamba_mixer

    cpu_compat.apply()  # the wrappers go around the CPU stand-ins, so those come first
    if getattr(mamba_mixer, "_hybridquant_ssm_state", False):
        return
    get_states, scan, update = (mamba_mixer.MambaMixer._get_states_from_cache,
                                mamba_mixer.mamba_chunk_scan_combined, mamba_mixer.selective_state_update)

    def get_states_from_cache(self, inference_context, batch_size, **kwargs):
        global _pending
        conv_state, ssm_state = get_states(self, inference_context, batch_size, **kwargs)
        precision = getattr(inference_context, "ssm_state_precision", None)
        _pending = None if precision is None else (precision, self.layer_number, inference_context.sequence_len_offset)
        if precision is not None and ssm_state.dtype != precision.storage:  # just allocated (zeros)
            ssm_state = ssm_state.to(precision.storage)
            inference_context.key_value_memory_dict[self.layer_number] = (conv_state, ssm_state)
        return conv_state, ssm_state

    def chunk_scan(*args, **kwargs):
        current = _take()
        out = scan(*args, **kwargs)
        if current is None or not kwargs.get("return_final_states"):
            return out
        precision, layer, step = current
        y, final_state = out
        return y, precision.store(final_state.float(), layer, step)

    def state_update(state, *args, **kwargs):
        current = _take()
        if current is None or current[0].dtype == "fp32":
            return update(state, *args, **kwargs)
        precision, layer, step = current
        work = state.float()
        y = update(work, *args, **kwargs)
        state.copy_(precision.store(work, layer, step))
        return y

    mamba_mixer.MambaMixer._get_states_from_cache = get_states_from_cache
    mamba_mixer.mamba_chunk_scan_combined = chunk_scan
    mamba_mixer.selective_state_update = state_update
    mamba_mixer._hybridquant_ssm_state = True
