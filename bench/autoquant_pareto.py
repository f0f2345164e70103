"""AutoQuantize vs the uniform recipes: KL and top-1 against BF16 for several budgets (a Pareto plot).

    .venv/bin/python bench/autoquant_pareto.py [--budgets 4.5 5 6 7] [--model tiny_trained] [--out DIR]

Runs the real stages with torchrun on one process: pipeline/autoquant.py on the base recipe
(mamba_moe_nvfp4_aggressive) for each budget (the first run scores, the others reuse its scores),
pipeline/quantize.py with each uniform recipe, then one pipeline/evaluate.py over all checkpoints
(fake quant, held-out text). Effective bits are counted the same way for every checkpoint: the weight
bits (NVFP4 4.5, FP8 8, BF16 16) of the modules the base recipe quantizes, weighted by their size.
Prints one row per checkpoint (effective bits, KL mean, top-1 agreement, perplexity), the wall time
of scoring vs calibration, and writes pareto.png + pareto.json under --out.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from _common import stage

UNIFORM = ["mamba_moe_nvfp4_aggressive", "mamba_moe_nvfp4_conservative", "mamba_moe_fp8_aggressive",
           "mamba_moe_fp8_conservative"]
BITS = {"NVFP4": 4.5, "FP8": 8.0, "BF16": 16.0}
GROUPED = {"routed_expert.fc1": "routed_expert", "routed_expert.fc2": "routed_expert"}


def effective_bits(report: dict, sizes: dict[tuple[int, str], float]) -> float:
    """Weight bits over the searched decisions (layer, kind) -> BF16 cost, from a quantize report."""
    formats: dict[tuple[int, str], str] = {}
    for q in report["quantizers"]:
        if q["role"] == "weight" and q["layer"] is not None and q["kind"]:
            formats.setdefault((q["layer"], GROUPED.get(q["kind"], q["kind"])), q["format"])
    total = sum(sizes.values())
    return 16.0 * sum(size * BITS[formats.get(key, "BF16")] / 16.0 for key, size in sizes.items()) / total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets", type=float, nargs="+", default=[4.5, 5.0, 6.0, 7.0])
    ap.add_argument("--model", default="tiny_trained")
    ap.add_argument("--base", default="mamba_moe_nvfp4_aggressive")
    ap.add_argument("--method", default="gradient")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="autoquant-pareto-"))
    out.mkdir(parents=True, exist_ok=True)
    common = [f"model={args.model}", f"output_root={out}", f"calib.num_samples={args.samples}",
              f"calib.max_seq_len={args.seq}"]

    runs: dict[str, Path] = {}
    timings = {}
    for bits in args.budgets:
        stage("autoquant", 1, [*common, f"+quant={args.base}", f"autoquant.effective_bits={bits}",
                               f"autoquant.score_samples={args.samples}", f"autoquant.method={args.method}"])
        (run,) = [d for d in (out / "autoquant").iterdir() if f"-aq{bits}-" in d.name]
        runs[f"autoquant {bits:g}"] = run
        timings[bits] = json.loads((run / "report.json").read_text())["timings_s"]
    for recipe in UNIFORM:
        stage("quantize", 1, [*common, f"+quant={recipe}"])
        (run,) = [d for d in (out / "quantize").iterdir() if f"-{recipe}-" in d.name]
        runs[recipe] = run

    first = runs[f"autoquant {args.budgets[0]:g}"]
    rows = json.loads((first / "autoquant.json").read_text())["rows"]
    sizes = {(r["layer"], r["kind"]): r["candidates"]["BF16"]["cost"] for r in rows}

    stage("evaluate", 1, [f"checkpoints=[{','.join(str(r) for r in runs.values())}]", f"model={args.model}",
                          f"output_root={out}", "evaluation.plot=false"])
    (evaluation,) = (out / "evaluate").glob("*/evaluation.json")
    results = {r["path"]: r for r in json.loads(evaluation.read_text())["results"]}
    table = []
    for label, run in runs.items():
        report = json.loads((run / "report.json").read_text())
        result = next(r for p, r in results.items() if Path(p).resolve() in (run.resolve(), (run / "checkpoint").resolve()))
        table.append({"label": label, "effective_bits": effective_bits(report, sizes), "kl_mean": result["kl_mean"],
                      "top1": result["top1_agreement"], "perplexity": result["perplexity"]})
    print(f"{'checkpoint':32s} {'eff. bits':>9s} {'KL mean':>10s} {'top-1':>7s} {'ppl':>8s}")
    for r in sorted(table, key=lambda r: r["effective_bits"]):
        print(f"{r['label']:32s} {r['effective_bits']:9.3f} {r['kl_mean']:10.4e} {r['top1']:7.3f} {r['perplexity']:8.3f}")
    for bits, t in timings.items():
        print(f"autoquant {bits:g}: scoring {t['scoring_s']:.1f} s, candidate calibration {t['search_calibrate_s']:.1f} s, "
              f"final calibration {t['calibrate_s']:.1f} s, total {t['total_s']:.1f} s")
    (out / "pareto.json").write_text(json.dumps({"rows": table, "timings": timings}, indent=2))
    plot(table, out / "pareto.png")
    print(f"written: {out / 'pareto.json'}, {out / 'pareto.png'}")


def plot(table: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    auto = sorted((r for r in table if r["label"].startswith("autoquant")), key=lambda r: r["effective_bits"])
    ax.plot([r["effective_bits"] for r in auto], [r["kl_mean"] for r in auto], "o-", label="autoquant")
    for r in table:
        if not r["label"].startswith("autoquant"):
            ax.scatter([r["effective_bits"]], [r["kl_mean"]], marker="s")
            ax.annotate(r["label"], (r["effective_bits"], r["kl_mean"]), fontsize=6)
    ax.set_yscale("log")
    ax.set_xlabel("effective bits (searched modules)")
    ax.set_ylabel("KL(BF16 || quantized), mean per token")
    ax.legend()
    fig.tight_layout()
    fig.savefig(str(path))
    plt.close(fig)


if __name__ == "__main__":
    main()
