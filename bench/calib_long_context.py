"""Peak resident memory of the quantize stage against calibration sample length (long-context
calibration, as the Cascade-2 release does at 12,288 tokens), on the tiny model.

    .venv/bin/python bench/calib_long_context.py                        # 1024, 4096, 12288 tokens
    .venv/bin/python bench/calib_long_context.py --lengths 2048 12288 --samples 2 --recipe mamba_moe_fp8_aggressive

For each length L: a JSONL file of ``--samples`` samples, each the shipped calibration text
concatenated until it is longer than L tokens (the tiny model's tokenizer is byte-level), then the
real quantize stage (torchrun, one rank, ``calib.max_seq_len=L``): every sample is truncated to
exactly L tokens, no padding. Printed per length: tokens per sample, the stage's peak RSS
(report.json's ``peak_rss_mb_per_rank``: load + calibrate + save), peak RSS minus the 1024-token
run's (or the shortest length's), and calibration seconds. Also printed: the resident memory of a
process that has only imported the stage's libraries, the per-process constant in every number.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from _common import load_average, long_samples, quantize, quantize_report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", nargs="+", type=int, default=[1024, 4096, 12288])
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--recipe", default="mamba_moe_fp8_conservative")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    from memory import import_baseline_mib

    baseline = import_baseline_mib()
    results = []
    with tempfile.TemporaryDirectory(prefix="hq-longctx-") as tmp:
        data = Path(tmp) / "long.jsonl"
        long_samples(data, args.samples, 2 * max(args.lengths))  # chat markup is one token per tag, not per byte
        for length in sorted(args.lengths):
            run_dir = quantize(Path(tmp) / f"run{length}", 1, [
                f"+quant={args.recipe}", f"calib.path={data}", f"calib.num_samples={args.samples}",
                f"calib.max_seq_len={length}"], threads=args.threads)
            report = quantize_report(run_dir)
            cal = report["calibration"]
            assert cal["tokens"] == args.samples * length, cal  # every sample exactly `length` tokens
            results.append({"length": length, "tokens": cal["tokens"], "peak": report["peak_rss_mb_per_rank"][0],
                            "calibrate_s": report["timings_s"]["calibrate_s"]})
    first = results[0]["peak"]
    print(f"tiny model, {args.recipe}, {args.samples} samples per run, 1 rank, {args.threads} thread(s); "
          f"load average {load_average()}")
    print(f"RSS of a process that only imported the stage's libraries: {baseline:.0f} MiB")
    print(f"{'tokens/sample':>13} {'peak RSS MiB':>12} {'vs shortest':>11} {'calibrate s':>11}")
    for r in results:
        print(f"{r['length']:>13} {r['peak']:>12.0f} {r['peak'] - first:>+11.0f} {r['calibrate_s']:>11.1f}")


if __name__ == "__main__":
    main()
