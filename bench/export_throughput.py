"""Export throughput: bytes/s the export stage writes, divided by the disk's raw sequential write speed.

    .venv/bin/python bench/export_throughput.py                 # bench_medium, FP8 conservative, 1 and 2 ranks
    .venv/bin/python bench/export_throughput.py --worlds 1 --recipe mamba_moe_nvfp4_conservative --probe-mib 512

One run, one directory: a ~230M-parameter Nemotron-H (conf/model/bench_medium.yaml widened by
``LARGE``: the export stage prints its phase times to 0.1 s, so the export must take seconds) is
quantized once (1 process), then exported by the real export stage (torchrun) with 1 rank and with 2 (resharded to
EP2 on load), each into the same temporary directory. The export's rate is the bytes of the
safetensors files it wrote divided by its export phase (``time: ... export X s``: conversion,
quantization of the weights, writing, hashing; the checkpoint load is printed separately). The
disk's rate is a sequential write of ``--probe-mib`` MiB of random bytes in 4 MiB blocks to a file in
that directory, timed to the end of ``fsync`` (the device), and the same without fsync (the page
cache, which is where the export's writes land: the stage does not fsync), measured before and
after the exports; the ratio uses the faster of the two measurements of each kind.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from _common import (
    BENCH_MODEL,
    disk_write_mib_s,
    export_timing,
    load_average,
    model_bytes,
    quantize,
    stage,
)

# bench_medium at twice the width: ~230M parameters (float32), the same layer pattern.
LARGE = ["model.arch.hidden_size=1024", "model.arch.num_attention_heads=16", "model.arch.mamba_num_heads=32",
         "model.arch.moe_intermediate_size=1024", "model.arch.moe_shared_expert_intermediate_size=2048",
         "model.arch.intermediate_size=2048"]
LAYOUT = {1: [], 2: ["parallel.ep=2"], 4: ["parallel.tp=2", "parallel.ep=2"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worlds", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--recipe", default="mamba_moe_fp8_conservative")
    parser.add_argument("--model", default=BENCH_MODEL)
    parser.add_argument("--probe-mib", type=int, default=256)
    parser.add_argument("--no-widen", action="store_true", help="the model as configured, not widened by LARGE")
    parser.add_argument("--dir", help="where to export and probe the disk (default: a temporary directory)")
    args = parser.parse_args()
    if any(w not in LAYOUT for w in args.worlds) or args.probe_mib < 4:
        raise SystemExit(f"error: --worlds takes {sorted(LAYOUT)}, --probe-mib at least 4")

    print(f"machine: {load_average()} at start")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        tmp = Path(tmp)
        disk = {"fsync": [disk_write_mib_s(tmp, args.probe_mib)], "buffered": [disk_write_mib_s(tmp, args.probe_mib, False)]}
        run_dir = quantize(tmp / "q", 1, [f"+quant={args.recipe}", f"model={args.model}", "calib.num_samples=4",
                                          "calib.max_seq_len=64", *([] if args.no_widen else LARGE)])
        total, _ = model_bytes(run_dir / "checkpoint" / "hf", "float32")
        runs = {}
        for world in args.worlds:
            out = stage("export", world, [f"checkpoint={run_dir}", f"output_dir={tmp / f'export-{world}'}",
                                          *LAYOUT[world]])
            runs[world] = export_timing(out)
        disk["fsync"].append(disk_write_mib_s(tmp, args.probe_mib))
        disk["buffered"].append(disk_write_mib_s(tmp, args.probe_mib, False))
    fsync, buffered = max(disk["fsync"]), max(disk["buffered"])
    print(f"model: {args.model}{'' if args.no_widen else ' widened'}, {total / 4 / 1e6:.0f}M parameters "
          f"({total / 2**20:.0f} MiB float32), recipe {args.recipe}")
    print(f"disk under {Path(tmp).parent}: sequential write {args.probe_mib} MiB: with fsync "
          + " / ".join(f"{x:.0f}" for x in disk["fsync"]) + " MiB/s (before / after), without fsync "
          + " / ".join(f"{x:.0f}" for x in disk["buffered"]) + " MiB/s")
    print(f"{'world':>5} {'files':>5} {'MiB':>7} {'load s':>7} {'export s':>8} {'MiB/s':>7} "
          f"{'/ disk fsync':>12} {'/ disk buffered':>15}")
    for world, r in runs.items():
        rate = r["mib"] / r["export_s"]
        print(f"{world:>5} {r['files']:>5} {r['mib']:>7.1f} {r['load_s']:>7.1f} {r['export_s']:>8.2f} {rate:>7.1f} "
              f"{rate / fsync:>12.3f} {rate / buffered:>15.3f}")
    print(f"machine: {load_average()} at end")


if __name__ == "__main__":
    main()
