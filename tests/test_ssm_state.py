"""The Mamba SSM state cache precision (``hybridquant.ssm_state``) and the token-by-token decoding it
applies to (``hybridquant.decode``): recurrent steps reproduce the full-sequence forward, the FP16
roundings are what they claim to be, and a 16-bit state stays close to FP32 on the tiny model."""

from __future__ import annotations

import pytest
import torch

from hybridquant import calib, decode, forward, model
from hybridquant.errors import UserError
from hybridquant.ssm_state import StatePrecision, philox4x32, random_bits, stochastic_round_fp16

# Random123's kat_vectors: philox4x32 R, counter[4], key[2] -> output[4].
PHILOX_KAT = [
    (7, (0, 0, 0, 0), (0, 0), (0x5F6FB709, 0x0D893F64, 0x4F121F81, 0x4F730A48)),
    (7, (0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x5207DDC2, 0x45165E59, 0x4D8EE751, 0x8C52F662)),
    (7, (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0x4DFCCABA, 0x190A87F0, 0xC47362BA, 0xB6B5242A)),
    (10, (0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    (10, (0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (10, (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]
PROMPT = 16      # tokens prefilled; the rest of a sequence goes through recurrent steps
LONG = 160       # tokens of the long sequence


@pytest.mark.parametrize("rounds, counter, key, expected", PHILOX_KAT)
def test_philox_matches_random123_known_answers(rounds, counter, key, expected):
    out = philox4x32(torch.tensor([counter], dtype=torch.int64), key, rounds)
    assert out[0].tolist() == list(expected)


def test_random_bits_are_deterministic_uniform_and_keyed_by_seed_layer_and_step():
    shape = torch.Size([8, 16, 16])
    bits = random_bits(shape, seed=7, layer=3, step=100)
    assert bits.shape == shape and bits.dtype == torch.int64
    assert torch.equal(bits, random_bits(shape, seed=7, layer=3, step=100))
    assert 0 <= bits.min() and bits.max() < 2**13
    assert abs(bits.float().mean().item() / (2**13 - 1) - 0.5) < 0.02  # 2048 draws: sd of the mean ~0.0064
    for other in (dict(seed=8, layer=3, step=100), dict(seed=7, layer=4, step=100), dict(seed=7, layer=3, step=101)):
        assert (bits == random_bits(shape, **other)).float().mean() < 0.01  # 1/8192 by chance


def _fp16_neighbours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The FP16 values next to ``x`` toward zero and away from zero (bit patterns, as int32)."""
    nearest = x.abs().half()
    toward = nearest.view(torch.int16).int() - (nearest.float() > x.abs()).int()
    return toward, toward + 1


def _magnitude_bits(h: torch.Tensor) -> torch.Tensor:
    return h.view(torch.int16).int() & 0x7FFF


def test_fp16_round_to_nearest_is_torch_half():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, generator=g) * torch.exp2(torch.randint(-32, 18, (4096,), generator=g).float())
    x = torch.cat([x, torch.tensor([0.0, -0.0, 65504.0, 65519.0, 65520.0, 1e6, float("inf"), float("nan")])])
    stored = StatePrecision("fp16").store(x, layer=1, step=0)
    assert stored.dtype == torch.float16
    assert torch.equal(stored.view(torch.int16), x.half().view(torch.int16))
    with pytest.raises(UserError, match="fp16_stochastic"):
        StatePrecision("bf16")


def test_stochastic_rounding_returns_a_neighbour_and_keeps_fp16_values():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(50_000, generator=g) * torch.exp2(torch.randint(-30, 16, (50_000,), generator=g).float())
    y = stochastic_round_fp16(x, random_bits(x.shape, seed=0, layer=0, step=0))
    toward, away = _fp16_neighbours(x)
    got = _magnitude_bits(y)
    assert torch.all((got == toward) | (got == away))
    assert torch.all(torch.signbit(y) == torch.signbit(x))
    assert 0.2 < (got == away).float().mean() < 0.8  # both neighbours occur
    # Every finite FP16 value, both signs, with any noise: nothing to round.
    exact = torch.arange(0x7C00, dtype=torch.int32)
    exact = torch.cat([exact, exact | 0x8000]).to(torch.int16).view(torch.float16)
    for noise in (0, 1, 4096, 8191):
        y = stochastic_round_fp16(exact.float(), torch.full(exact.shape, noise, dtype=torch.int64))
        assert torch.equal(y.view(torch.int16), exact.view(torch.int16))


def test_stochastic_rounding_of_subnormals_matches_the_fixed_ulp_reference():
    """FlashInfer's reference for cvt.rs on FP16 subnormals (ulp 2**-24): |y| = floor(|x| 2**24 + r / 2**13),
    computed here in FP64, for every one of the 8192 noise values at the underflow and
    subnormal/normal boundaries."""
    fractions = torch.tensor([0, 2**-15, 2**-13, 0.25, 0.5, 0.75, 1, 1.25, 1.5, 1022.5, 1023, 1023.5, 1024])
    fractions = torch.cat([fractions, torch.nextafter(fractions, torch.tensor(-float("inf")))])
    fractions = fractions[fractions >= 0]
    x = (torch.cat([fractions, -fractions]) * 2**-24).repeat_interleave(8192)
    noise = torch.arange(8192, dtype=torch.int64).repeat(x.numel() // 8192)
    expected = torch.floor(x.double().abs() * 2**24 + noise.double() / 8192).int()
    y = stochastic_round_fp16(x, noise)
    assert torch.equal(_magnitude_bits(y), expected)
    assert torch.all(torch.signbit(y) == torch.signbit(x))


def test_stochastic_rounding_overflows_to_inf_like_round_to_nearest():
    x = torch.tensor([65504.0, 65519.0, 65519.0, -65535.0, 1e6, float("inf"), -float("inf"), float("nan")])
    noise = torch.tensor([8191, 0, 8191, 0, 0, 0, 0, 0])
    y = stochastic_round_fp16(x, noise).float()
    assert y[:3].tolist() == [65504.0, 65504.0, float("inf")]
    assert y[3] == -65504.0 and y[4] == float("inf") and y[5] == float("inf") and y[6] == -float("inf")
    assert torch.isnan(y[7])


@pytest.mark.parametrize("value", [1 + 0.3 * 2**-10, -(3 + 0.77 * 2**-9), 21.92 * 2**-24, 1234.567])
def test_stochastic_rounding_is_unbiased(value):
    n = 200_000
    x = torch.full((n,), value)
    value = x[0].item()  # the FP32 value being rounded
    y = StatePrecision("fp16_stochastic", seed=3).store(x, layer=5, step=42).double()
    lo, hi = (y.min().item(), y.max().item()) if value > 0 else (y.max().item(), y.min().item())
    ulp, p_away = hi - lo, (value - lo) / (hi - lo)
    sd_of_mean = abs(ulp) * (p_away * (1 - p_away) / n) ** 0.5
    bias = y.mean().item() - value
    assert abs(bias) < 5 * sd_of_mean, (bias, sd_of_mean)
    assert abs(x.half().double().mean().item() - value) > 20 * abs(bias)  # round to nearest is biased
    assert abs((y == hi).double().mean().item() - p_away) < 0.005


# --- the tiny model --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def loaded(world1, tiny_checkpoint):
    return model.load_hf(str(tiny_checkpoint), world1, "float32", "local")


@pytest.fixture(scope="module")
def heldout_ids(tiny_checkpoint):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_checkpoint))
    text = "\n\n".join(row["text"] for row in calib.read_jsonl(calib.resolve_path("package:heldout.jsonl"))[:4])
    return torch.tensor([tok(text, add_special_tokens=False)["input_ids"][:LONG]])


@pytest.fixture(scope="module")
def decoded(loaded, heldout_ids):
    """Logits at every position and the final session for each state dtype."""
    return {dtype: decode.teacher_forced_logits(loaded, heldout_ids, StatePrecision(dtype), PROMPT)
            for dtype in ("fp32", "fp16", "fp16_stochastic")}


def test_recurrent_steps_reproduce_the_full_sequence_forward(loaded, heldout_ids, decoded):
    full = forward.run(loaded.chunks, [heldout_ids], loaded.hf_vocab_size)[0]
    steps, session = decoded["fp32"]
    assert steps.shape == full.shape == (1, LONG, loaded.hf_vocab_size)
    assert session.position == LONG
    assert (steps - full).abs().max() < 1e-4  # measured 7e-6: FP32 summation order only
    assert torch.equal(steps.argmax(-1), full.argmax(-1))


def test_greedy_generates_the_forward_argmax(loaded, heldout_ids):
    prompt = heldout_ids[:, :PROMPT]
    generated = decode.greedy(loaded, prompt, max_new_tokens=8)
    assert len(generated) == 8
    full = forward.run(loaded.chunks, [torch.cat([prompt, torch.tensor([generated[:-1]])], dim=1)],
                       loaded.hf_vocab_size)[0]
    assert full[0, PROMPT - 1:].argmax(-1).tolist() == generated
    stop = generated[2]
    assert decode.greedy(loaded, prompt, max_new_tokens=8, stop_ids=(stop,)) == generated[: generated.index(stop) + 1]


def _ssm_states(session: decode.Session) -> list[torch.Tensor]:
    from megatron.core.ssm.mamba_mixer import MambaMixer

    layers = [m.layer_number for m in session.model.modules() if isinstance(m, MambaMixer)]
    return [session.context.key_value_memory_dict[n][1] for n in layers]


def test_sixteen_bit_state_stays_close_to_fp32_over_a_long_sequence(decoded):
    reference, session = decoded["fp32"]
    assert [s.dtype for s in _ssm_states(session)] == [torch.float32] * 5  # the tiny pattern's Mamba layers
    errors = {}
    for dtype in ("fp16", "fp16_stochastic"):
        logits, session = decoded[dtype]
        assert [s.dtype for s in _ssm_states(session)] == [torch.float16] * 5
        assert torch.isfinite(logits).all()
        errors[dtype] = ((logits - reference).norm() / reference.norm()).item()
        assert 0 < errors[dtype] < 1e-2, errors
        assert (logits.argmax(-1) == reference.argmax(-1)).float().mean() > 0.98
    assert not torch.equal(decoded["fp16"][0], decoded["fp16_stochastic"][0])
