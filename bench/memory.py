"""Peak resident memory per rank of quantize (load + calibrate + save) and export, at world sizes 1, 2, 4,
divided by the model's bytes per rank (model bytes / world size).

    .venv/bin/python bench/memory.py                                   # 1x1x1, TP2, EP2, TP2xEP2
    .venv/bin/python bench/memory.py --layouts 1x1x1 ep2 ep4 --recipe mamba_moe_nvfp4_conservative

Real torchrun runs of the real stages on this machine (gloo on CPU) with conf/model/bench_medium.yaml
(~58M parameters, float32). For each layout: the quantize stage (its report.json has every rank's peak
RSS, ``ru_maxrss``: loading the HF checkpoint, calibration, saving) and then the export stage of that
checkpoint at the same layout (it prints every rank's RSS after loading the checkpoint and its peak
while exporting). Also measured: the resident memory of a process that has only imported what the
stages import (torch, megatron-core, megatron-bridge, ModelOpt, transformers) — a per-rank constant
that no sharding removes — so the table shows both peak / (model / world) and
(peak - that baseline) / (model / world).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import (
    BENCH_MODEL,
    REPO,
    clean_env,
    export_memory,
    load_average,
    materialize,
    model_bytes,
    quantize,
    quantize_report,
    stage,
)

LAYOUTS = {"1x1x1": (1, []), "tp2": (2, ["parallel.tp=2"]), "ep2": (2, ["parallel.ep=2"]),
           "pp2": (2, ["parallel.pp=2"]), "tp2ep2": (4, ["parallel.tp=2", "parallel.ep=2"]),
           "ep4": (4, ["parallel.ep=4"]), "tp4": (4, ["parallel.tp=4"])}

_BASELINE = """
import torch, transformers, megatron.core, modelopt.torch.quantization
from hybridquant.compat.bridge_import import import_auto_bridge
from hybridquant import memory
import_auto_bridge()
print(memory.peak_mib())
"""


def import_baseline_mib() -> float:
    proc = subprocess.run([sys.executable, "-c", _BASELINE], cwd=REPO, env=clean_env(), capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"baseline process failed:\n{proc.stderr[-2000:]}")
    return float(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layouts", nargs="+", default=["1x1x1", "tp2", "ep2", "tp2ep2"])
    parser.add_argument("--recipe", default="mamba_moe_fp8_conservative")
    parser.add_argument("--model", default=BENCH_MODEL)
    parser.add_argument("--samples", type=int, default=8)
    args = parser.parse_args()
    unknown = [name for name in args.layouts if name not in LAYOUTS]
    if unknown:
        raise SystemExit(f"error: unknown layout(s) {', '.join(unknown)} (known: {', '.join(LAYOUTS)})")

    hf_dir = materialize(args.model)
    total, _ = model_bytes(hf_dir, "float32")
    baseline = import_baseline_mib()
    print(f"machine: {load_average()} at start")
    print(f"model: {args.model}, {total / 2**20:.0f} MiB (float32); recipe {args.recipe}, {args.samples} calibration "
          f"samples; baseline (imports only) {baseline:.0f} MiB per process")
    print(f"{'world':>5} {'layout':>7} {'rank':>4} {'model/world':>11} | {'quantize peak':>13} {'ratio':>6} "
          f"{'-baseline':>9} | {'export load':>11} {'export peak':>11} {'ratio':>6} {'-baseline':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name in args.layouts:
            world, layout = LAYOUTS[name]
            run_dir = quantize(tmp / name, world, [f"+quant={args.recipe}", f"model={args.model}",
                                                   f"calib.num_samples={args.samples}", *layout])
            q_peaks = quantize_report(run_dir)["peak_rss_mb_per_rank"]
            e_ranks = export_memory(stage("export", world, [f"checkpoint={run_dir}", f"output_dir={tmp / f'{name}-export'}"]))
            share = total / world / 2**20
            for rank, (q, e) in enumerate(zip(q_peaks, e_ranks)):
                e_peak = max(e["peak"], e["loaded"])
                print(f"{world:>5} {name:>7} {rank:>4} {share:>9.0f} M | {q:>11.0f} M {q / share:>6.1f} "
                      f"{(q - baseline) / share:>9.2f} | {e['loaded']:>9.0f} M {e_peak:>9.0f} M {e_peak / share:>6.1f} "
                      f"{(e_peak - baseline) / share:>9.2f}")
    print("ratio = peak RSS / (model bytes / world); -baseline = (peak - baseline) / (model bytes / world)")
    print(f"machine: {load_average()} at end")


if __name__ == "__main__":
    main()
