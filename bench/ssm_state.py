"""SSM state cache precision on the tiny model: how far FP16 states move the logits from FP32 ones.

    .venv/bin/python bench/ssm_state.py                        # 64, 256, 1024, 2048 tokens
    .venv/bin/python bench/ssm_state.py --lengths 64,256 --json ssm_state.json

The shipped held-out text (``heldout.jsonl``, concatenated) is tokenized with the tiny checkpoint's
tokenizer and decoded token by token (``hybridquant.decode``: one prefilled token, then one
recurrent step per token) with the SSM state held in each of ``fp32``, ``fp16`` (round to nearest,
the baseline) and ``fp16_stochastic`` (seed and Philox rounds from ``conf/inference/default.yaml``).
A position's logits depend only on the tokens up to it, so one pass over the longest length gives
every shorter one. For each length L and state dtype, over all positions < L and over the last
``--window`` positions before L, against the FP32-state logits: relative L2 error, the median of
the per-position relative errors (the smooth drift), max |error|, top-1 agreement, and the number of
positions where an MoE router picked other experts than with the FP32 state. A routing change is
discrete: that position's logits jump and the next few follow, so max |error| and relative L2
mostly count routing changes, the median the rounding drift. ``fp32 vs forward`` is the FP32-state
decoding against the full-sequence forward: the floor that summation order alone gives. Also the
relative error of each Mamba layer's final SSM state.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]


def tokens(checkpoint: Path, count: int) -> torch.Tensor:
    from transformers import AutoTokenizer

    from hybridquant import calib

    rows = calib.read_jsonl(calib.resolve_path("package:heldout.jsonl"))
    ids = AutoTokenizer.from_pretrained(str(checkpoint))("\n\n".join(r["text"] for r in rows),
                                                         add_special_tokens=False)["input_ids"]
    if len(ids) < count:
        raise SystemExit(f"the held-out text has {len(ids)} tokens, fewer than {count}")
    return torch.tensor([ids[:count]])


def compare(logits: torch.Tensor, reference: torch.Tensor, rerouted: torch.Tensor, end: int, window: int) -> dict:
    """Errors of [1, n, vocab] logits over positions < ``end`` and the last ``window`` of them;
    ``rerouted``: [n] bool, positions whose expert choice differs from the reference's."""
    def errors(a, b, r):
        return {"rel_l2": ((a - b).norm() / b.norm()).item(),
                "median_rel": ((a - b).norm(dim=-1) / b.norm(dim=-1)).median().item(),
                "max_abs": (a - b).abs().max().item(), "top1": (a.argmax(-1) == b.argmax(-1)).double().mean().item(),
                "rerouted": int(r.sum())}

    a, b, r = logits[0, :end], reference[0, :end], rerouted[:end]
    return {"all": errors(a, b, r), "tail": errors(a[-window:], b[-window:], r[-window:])}


def record_routing(module: torch.nn.Module) -> tuple[list[torch.Tensor], int]:
    """A list that every MoE router's forward appends its [tokens, experts] expert choice to, and
    the number of routers."""
    from megatron.core.transformer.moe.router import TopKRouter

    choices: list[torch.Tensor] = []
    routers = [m for m in module.modules() if isinstance(m, TopKRouter)]
    for router in routers:
        router.register_forward_hook(lambda mod, args, out: choices.append(out[1].reshape(-1, out[1].shape[-1])))
    return choices, len(routers)


def by_router(choices: list[torch.Tensor], routers: int) -> torch.Tensor:
    """[routers, positions, experts] from the calls of a decoding (layer after layer, token after token)."""
    return torch.stack([torch.cat(choices[i::routers]) for i in range(routers)])


def ssm_states(session) -> list[torch.Tensor]:
    from megatron.core.ssm.mamba_mixer import MambaMixer

    layers = [m.layer_number for m in session.model.modules() if isinstance(m, MambaMixer)]
    return [session.context.key_value_memory_dict[n][1].float() for n in layers]


def measure(lengths: list[int], window: int) -> dict:
    from hybridquant import decode, forward, logs, model, parallel, tiny
    from hybridquant.ssm_state import STATE_DTYPES, StatePrecision

    logs.setup("WARNING")
    model_cfg = yaml.safe_load((REPO / "conf" / "model" / "tiny.yaml").read_text())
    inference_cfg = yaml.safe_load((REPO / "conf" / "inference" / "default.yaml").read_text())
    checkpoint = tiny.materialize(model_cfg["arch"], model_cfg["seed"])
    layout = parallel.Layout()
    parallel.init(layout, seed=1234)
    try:
        loaded = model.load_hf(str(checkpoint), layout, "float32", "local")
        ids = tokens(checkpoint, max(lengths))
        full = forward.run(loaded.chunks, [ids], loaded.hf_vocab_size)[0]
        choices, routers = record_routing(loaded.module)
        logits, states, routing, wall = {}, {}, {}, {}
        for dtype in STATE_DTYPES:
            precision = StatePrecision.from_config({**inference_cfg, "ssm_state_dtype": dtype})
            choices.clear()
            t0 = time.perf_counter()
            logits[dtype], session = decode.teacher_forced_logits(loaded, ids, precision)
            wall[dtype] = time.perf_counter() - t0
            states[dtype], routing[dtype] = ssm_states(session), by_router(choices, routers)
            print(f"decoded {ids.shape[1]} tokens with {dtype} state in {wall[dtype]:.0f} s", flush=True)
    finally:
        parallel.shutdown()
    unchanged = torch.zeros(ids.shape[1], dtype=torch.bool)  # the forward's routing is not recorded
    rows = {"fp32 vs forward": {n: compare(logits["fp32"], full, unchanged, n, window) for n in lengths}}
    for dtype in STATE_DTYPES[1:]:
        rerouted = (routing[dtype] != routing["fp32"]).any(-1).any(0)
        rows[dtype] = {n: compare(logits[dtype], logits["fp32"], rerouted, n, window) for n in lengths}
    state_errors = {dtype: [((s - r).norm() / r.norm()).item() for s, r in zip(states[dtype], states["fp32"])]
                    for dtype in STATE_DTYPES[1:]}
    return {"rows": rows, "final_state_rel_error": state_errors, "wall_s": wall, "window": window,
            "seed": inference_cfg["seed"], "philox_rounds": inference_cfg["philox_rounds"]}


def table(result: dict) -> str:
    w = result["window"]
    head = f"{'rel L2':>8} {'median':>8} {'max|Δ|':>8} {'top-1':>7} {'rerouted':>8}"
    lines = [f"{'state':<16} {'tokens':>6} | {head} | {head}",
             f"{'':<16} {'':>6} | {'all positions < tokens':^43} | {f'last {w} positions':^43}"]
    lengths = next(iter(result["rows"].values()))
    for n in lengths:
        for name, per_length in result["rows"].items():
            r = per_length[n]
            lines.append(f"{name:<16} {n:>6} | " + " | ".join(
                f"{r[k]['rel_l2']:>8.2e} {r[k]['median_rel']:>8.2e} {r[k]['max_abs']:>8.2e} {r[k]['top1']:>7.2%} "
                f"{r[k]['rerouted']:>8}" for k in ("all", "tail")))
    lines.append("")
    lines.append("final SSM state, relative error vs fp32, per Mamba layer:")
    for dtype, errors in result["final_state_rel_error"].items():
        lines.append(f"  {dtype:<16} " + " ".join(f"{e:.2e}" for e in errors))
    lines.append(f"(fp16_stochastic: seed {result['seed']}, {result['philox_rounds']} Philox rounds)")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="64,256,1024,2048")
    ap.add_argument("--window", type=int, default=64, help="tail window (positions)")
    ap.add_argument("--json", type=Path, help="also write the result as JSON")
    args = ap.parse_args()
    result = measure(sorted(int(n) for n in args.lengths.split(",")), args.window)
    print(table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
