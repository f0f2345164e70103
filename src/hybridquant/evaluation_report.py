"""An evaluation (the ``evaluation.json`` record) as a terminal table, as Markdown (the release model
card embeds it), and as a plot of the per-layer output error."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

COLUMNS = ("checkpoint", "numerics", "KL mean", "KL p99", "KL max", "top-1", "perplexity", "Δ perplexity",
           "worst layer")
MODES = {"fake_quant": "weights + activations", "weight_only": "weights only", "export": "export (weights)"}


def _fmt(x: float) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if x == 0:
        return "0"
    return f"{x:.2e}" if 0 < abs(x) < 1e-3 else f"{x:.4f}"


def rows(record: dict[str, Any]) -> list[list[str]]:
    """One row per evaluated checkpoint (and mode), after the reference's."""
    ref = record["reference"]
    out = [[f"{ref['name']} (reference)", record["reference"]["dtype"], "0", "0", "0", "1.000",
            f"{ref['perplexity']:.3f}", "", ""]]
    for r in record["results"]:
        worst = max(r["layers"], key=lambda x: x["rel_l2"], default=None)
        out.append([r["label"], MODES.get(r["mode"], r["mode"]), _fmt(r["kl_mean"]), _fmt(r["kl_p99"]),
                    _fmt(r["kl_max"]), f"{r['top1_agreement']:.3f}", f"{r['perplexity']:.3f}",
                    f"{100 * (r['perplexity'] / ref['perplexity'] - 1):+.2f}%",
                    f"{worst['layer']} {worst['kind']} {worst['rel_l2']:.3f}" if worst else "-"])
    return out


def layer_rows(record: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Layer × checkpoint grid of relative L2 errors (the numerics named only where results differ in them)."""
    named = len({r["mode"] for r in record["results"]}) > 1
    header = ["layer"] + [f"{r['label']} [{MODES.get(r['mode'], r['mode'])}]" if named else r["label"]
                          for r in record["results"]]
    errors = [{x["layer"]: x for x in r["layers"]} for r in record["results"]]
    layers = sorted({i for e in errors for i in e})
    symbols = record["pattern"]
    grid = [[f"{i} {symbols[i]}"] + [_fmt(e[i]["rel_l2"]) if i in e else "-" for e in errors] for i in layers]
    return header, grid


def caption(record: dict[str, Any]) -> str:
    data = record["data"]
    return (f"{record['model']} on {data['samples']} held-out samples ({data['positions']} next-token positions, "
            f"{Path(data['path']).name}, up to {data['max_seq_len']} tokens each); KL(reference ‖ quantized) in "
            f"nats per token; layer error: relative L2 of the layer's output")


def markdown(record: dict[str, Any], per_layer: bool = False) -> str:
    """The evaluation table as GitHub Markdown (the model card embeds it)."""
    def line(cells):
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    lines = [line(COLUMNS), line(["---"] * len(COLUMNS)), *(line(r) for r in rows(record)), "",
             f"*{caption(record)}.*"]
    if per_layer:
        header, grid = layer_rows(record)
        lines += ["", line(header), line(["---"] * len(header)), *(line(r) for r in grid)]
    return "\n".join(lines)


def print_table(record: dict[str, Any], console=None) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console(width=160)
    table = Table(title=escape(f"evaluation of {record['model']} (layout {record['layout']['tag']})"),
                  caption=escape(caption(record)))
    for i, name in enumerate(COLUMNS):
        table.add_column(name, justify="left" if i < 2 else "right")
    for r in rows(record):
        table.add_row(*map(escape, r))
    console.print(table)
    header, grid = layer_rows(record)
    layers = Table(title="per-layer relative L2 error of the layer output")
    for i, name in enumerate(header):
        layers.add_column(escape(name), justify="left" if i == 0 else "right")
    for r in grid:
        layers.add_row(*map(escape, r))
    console.print(layers)


def plot(record: dict[str, Any], path: Path) -> None:
    """Per-layer relative L2 error, one line per checkpoint (and mode), log scale, as a PNG (layers a
    checkpoint leaves exact, error 0, have no point)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6.0, 0.25 * len(record["pattern"]) + 3), 4.0), dpi=120)
    for r in record["results"]:
        xs = [x["layer"] for x in r["layers"]]
        ys = [x["rel_l2"] if x["rel_l2"] > 0 else float("nan") for x in r["layers"]]  # exact: no point on a log axis
        ax.plot(xs, ys, marker="o", markersize=3, label=f"{r['label']} [{MODES.get(r['mode'], r['mode'])}]")
    symbols = record["pattern"]
    ax.set_xticks(range(len(symbols)))
    ax.set_xticklabels([f"{i}\n{c}" for i, c in enumerate(symbols)], fontsize=6)
    ax.set_yscale("log")
    ax.set_xlabel("decoder layer (M Mamba, E MoE, * attention)")
    ax.set_ylabel("relative L2 error of the layer output")
    ax.set_title(f"{record['model']}: output error per layer vs the reference", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(str(path), format="png")
    plt.close(fig)
