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
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAYOUTS = {"1x1x1": (1, []), "tp2": (2, ["parallel.tp=2"]), "ep2": (2, ["parallel.ep=2"]),
           "pp2": (2, ["parallel.pp=2"])}
# A Nemotron-H of ~100M parameters with the tiny model's layer pattern and features.
MEDIUM = ["model.arch.hidden_size=768", "model.arch.head_dim=96", "model.arch.num_attention_heads=8",
          "model.arch.mamba_num_heads=24", "model.arch.mamba_head_dim=64", "model.arch.ssm_state_size=64",
          "model.arch.n_routed_experts=16", "model.arch.moe_intermediate_size=768",
          "model.arch.moe_shared_expert_intermediate_size=1536", "model.arch.intermediate_size=1536"]


def stage(name: str, nproc: int, overrides: list[str]) -> str:
    from hybridquant.parallel import free_port

    cmd = [str(Path(sys.executable).parent / "torchrun"), f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
           str(REPO / "pipeline" / f"{name}.py"), *overrides]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name} {' '.join(overrides)} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


def quantize(root: Path, nproc: int, overrides: list[str]) -> Path:
    stage("quantize", nproc, [f"output_root={root}", *overrides])
    (run_dir,) = (root / "quantize").iterdir()
    return run_dir


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


_RANK = re.compile(r"rank (\d+): shard ([\d.]+), RSS after load (\d+), peak (?:during export|of the process) (\d+)")


def memory(args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        run_dir = quantize(tmp / "q", 1, [f"+quant={args.recipe}", "calib.num_samples=2", "calib.max_seq_len=64",
                                          "model.dtype=bfloat16", *MEDIUM])
        model_bytes, layer_bytes = _model_bytes(run_dir / "checkpoint" / "hf" / "config.json")
        print(f"model: {model_bytes / 2**20:.0f} MiB in bfloat16, largest decoder layer {layer_bytes / 2**20:.1f} MiB")
        print(f"{'world':>5} {'layout':>8} {'rank':>4} {'shard MiB':>10} {'RSS loaded':>11} {'peak export':>12} "
              f"{'increment':>10} {'incr/model':>11} {'incr/layer':>11}")
        for world, layout in ((1, []), (2, ["parallel.ep=2"]), (2, ["parallel.tp=2"])):
            tag = layout[0].split(".")[1].replace("=", "") if layout else "1x1x1"
            out = stage("export", world, [f"checkpoint={run_dir}", f"output_dir={tmp / f'export-{tag}'}", *layout])
            line = next(line for line in out.splitlines() if line.startswith("memory per rank"))
            for rank, shard, loaded, peak in _RANK.findall(line):
                incr = (float(peak) - float(loaded)) * 2**20
                print(f"{world:>5} {tag:>8} {rank:>4} {float(shard):>10.0f} {loaded:>11} {peak:>12} "
                      f"{incr / 2**20:>10.0f} {incr / model_bytes:>11.3f} {incr / layer_bytes:>11.2f}")


def _model_bytes(config_path: Path) -> tuple[int, int]:
    """Parameter bytes of the whole model and of its largest decoder layer, from the HF config (meta device)."""
    import torch
    from transformers import AutoConfig, NemotronHForCausalLM

    config = AutoConfig.from_pretrained(str(config_path.parent))
    with torch.device("meta"):
        model = NemotronHForCausalLM(config).to(torch.bfloat16)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    layers = [sum(p.numel() * p.element_size() for p in layer.parameters()) for layer in model.model.layers]
    return total, max(layers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["layouts", "memory"])
    parser.add_argument("--recipe", default="mamba_moe_fp8_conservative")
    parser.add_argument("--samples", type=int, default=8)
    args = parser.parse_args()
    {"layouts": layouts, "memory": memory}[args.what](args)


if __name__ == "__main__":
    main()
