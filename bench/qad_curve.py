"""The held-out KL curve of qad runs side by side (e.g. the same settings at two layouts).

    .venv/bin/python bench/qad_curve.py runs/qad/<run-a> runs/qad/<run-b> [--plot docs/qad_curve.png]

Prints, per evaluation step, each run's held-out KL(teacher || student) and perplexity, the largest
relative difference between runs, and the KL reduction of each run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--plot", type=Path)
    args = ap.parse_args()
    curves, names = [], []
    for run in args.runs:
        report = json.loads((run / "report.json").read_text())
        curves.append(json.loads((run / "qad.json").read_text()))
        lay = report["layout"]
        names.append(f"tp{lay['tp']}pp{lay['pp']}ep{lay['ep']} x{lay['world_size']}")
    steps = [e["step"] for e in curves[0]["evals"]]
    print("step | " + " | ".join(f"{n}: KL / ppl" for n in names) + " | max rel. diff of KL")
    for i, step in enumerate(steps):
        kls = [c["evals"][i]["kl_mean"] for c in curves]
        cells = [f"{c['evals'][i]['kl_mean']:.5f} / {c['evals'][i]['perplexity']:.3f}" for c in curves]
        print(f"{step:4d} | " + " | ".join(cells) + f" | {max(abs(k - kls[0]) / kls[0] for k in kls):.2e}")
    teacher = curves[0]["evals"][0]["teacher_perplexity"]
    for n, c in zip(names, curves):
        b, a = c["evals"][0], c["evals"][-1]
        print(f"{n}: KL {b['kl_mean']:.5f} -> {a['kl_mean']:.5f} ({100 * (a['kl_mean'] / b['kl_mean'] - 1):+.1f}%), "
              f"perplexity {b['perplexity']:.3f} -> {a['perplexity']:.3f} (BF16 teacher {teacher:.3f}), "
              f"top-1 {b['top1_agreement']:.3f} -> {a['top1_agreement']:.3f}")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
        for n, c in zip(names, curves):
            a.plot([s["step"] for s in c["steps"]], [s["kd_loss"] for s in c["steps"]], marker=".", label=n)
            b.plot([e["step"] for e in c["evals"]], [e["kl_mean"] for e in c["evals"]], marker="o", label=n)
        a.set_title("training KL per token")
        b.set_title("held-out KL(BF16 || quantized)")
        for ax in (a, b):
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
