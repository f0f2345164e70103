"""Export: the same bytes from every layout, and the memory an export needs per rank.

    .venv/bin/python bench/export.py layouts   # calibrate at 1x1x1, TP2, EP2, PP2; export each; compare sha256
    .venv/bin/python bench/export.py memory    # a ~100M-parameter Nemotron-H exported by 1 and 2 ranks

Both run the real stages with torchrun on this machine (gloo on CPU).

``layouts`` prints, per calibration layout, how many safetensors files and tensors are identical to
the 1x1x1 calibration's export and, for tensors that differ, which ones and their largest relative
difference. ``memory`` prints, per world size and rank, the rank's parameter bytes, its resident
memory after loading the checkpoint, its peak while exporting, and the export's increment divided by
the full model's bytes and by its largest decoder layer's bytes (the streaming bound).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from _common import export_memory, model_bytes, quantize, stage

LAYOUTS = {"1x1x1": (1, []), "tp2": (2, ["parallel.tp=2"]), "ep2": (2, ["parallel.ep=2"]),
           "pp2": (2, ["parallel.pp=2"])}
# A Nemotron-H of ~100M parameters with the tiny model's layer pattern and features.
MEDIUM = ["model.arch.hidden_size=768", "model.arch.head_dim=96", "model.arch.num_attention_heads=8",
          "model.arch.mamba_num_heads=24", "model.arch.mamba_head_dim=64", "model.arch.ssm_state_size=64",
          "model.arch.n_routed_experts=16", "model.arch.moe_intermediate_size=768",
          "model.arch.moe_shared_expert_intermediate_size=1536", "model.arch.intermediate_size=1536"]


def tensors_of(directory: Path) -> dict:
    from safetensors import safe_open

    out = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            out.update({name: f.get_tensor(name) for name in f.keys()})
    return out


def layouts(args) -> None:
    from hybridquant import export

    recipe = [f"+quant={args.recipe}", f"calib.num_samples={args.samples}"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        exports = {}
        for name, (nproc, layout) in LAYOUTS.items():
            run_dir = quantize(tmp / name, nproc, [*recipe, *layout])
            exports[name] = tmp / f"{name}-export"
            stage("export", nproc, [f"checkpoint={run_dir}", f"output_dir={exports[name]}"])
        reference = tensors_of(exports["1x1x1"])
        files = {p.name: export.sha256(p) for p in exports["1x1x1"].glob("*.safetensors")}
        print(f"recipe {args.recipe}, {args.samples} calibration samples; each calibration exported at its own layout")
        print(f"{'calibrated at':14} {'files identical':>16} {'tensors identical':>18}  differing tensors (max relative diff)")
        for name, directory in exports.items():
            same_files = sum(export.sha256(directory / f) == h for f, h in files.items())
            tensors = tensors_of(directory)
            differ = {n: _rel(reference[n], t) for n, t in tensors.items() if not _equal(reference[n], t)}
            kinds = sorted({n.rsplit(".", 1)[-1] for n in differ})
            detail = ", ".join(f"{k}: {max(v for n, v in differ.items() if n.endswith(k)):.1e}" for k in kinds) or "-"
            print(f"{name:14} {same_files:>7}/{len(files):<8} {len(tensors) - len(differ):>8}/{len(tensors):<9}  {detail}")


def _equal(a, b) -> bool:
    import torch

    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def _rel(a, b) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / a.norm().clamp_min(1e-30)).item()


def memory(args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        run_dir = quantize(tmp / "q", 1, [f"+quant={args.recipe}", "calib.num_samples=2", "calib.max_seq_len=64",
                                          "model.dtype=bfloat16", *MEDIUM])
        total, layer_bytes = model_bytes(run_dir / "checkpoint" / "hf", "bfloat16")
        print(f"model: {total / 2**20:.0f} MiB in bfloat16, largest decoder layer {layer_bytes / 2**20:.1f} MiB")
        print(f"{'world':>5} {'layout':>8} {'rank':>4} {'shard MiB':>10} {'RSS loaded':>11} {'peak export':>12} "
              f"{'increment':>10} {'incr/model':>11} {'incr/layer':>11}")
        for world, layout in ((1, []), (2, ["parallel.ep=2"]), (2, ["parallel.tp=2"])):
            tag = layout[0].split(".")[1].replace("=", "") if layout else "1x1x1"
            out = stage("export", world, [f"checkpoint={run_dir}", f"output_dir={tmp / f'export-{tag}'}", *layout])
            for r in export_memory(out):
                incr = (r["peak"] - r["loaded"]) * 2**20
                print(f"{world:>5} {tag:>8} {r['rank']:>4} {r['shard']:>10.0f} {r['loaded']:>11.0f} {r['peak']:>12.0f} "
                      f"{incr / 2**20:>10.0f} {incr / total:>11.3f} {incr / layer_bytes:>11.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["layouts", "memory"])
    parser.add_argument("--recipe", default="mamba_moe_fp8_conservative")
    parser.add_argument("--samples", type=int, default=8)
    args = parser.parse_args()
    {"layouts": layouts, "memory": memory}[args.what](args)


if __name__ == "__main__":
    main()
