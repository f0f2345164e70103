"""Layout parity table: every quantizer's amax under TP/PP/EP/ETP/DP layouts vs one process.

    .venv/bin/python bench/layout_parity.py                          # the four presets, all layouts
    .venv/bin/python bench/layout_parity.py --recipes mamba_moe_fp8_aggressive --separate

Runs real torchrun jobs on this machine (gloo on CPU): the reference layout 1x1x1 with one process,
the others with --nproc processes (data parallel fills what a layout leaves). By default all
multi-process layouts share one torchrun job (model-parallel groups are rebuilt per layout);
--separate gives each layout its own job, so wall time and peak RSS are per layout.
Prints: layout -> quantizers matched, identical, max |amax - amax_1x1x1|, max relative, per-block
weight amax identical to 1x1x1 (whole weight, e.g. static NVFP4 block scales), max |logit diff| before
and after quantization, wall time, peak RSS per rank.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_LAYOUTS = ["tp2", "pp2", "ep2", "tp2ep2", "tp2pp2", "pp2ep2", "dp2", "dp4", "ep2etp2"]


def world_for(spec: str, nproc: int) -> int:
    """Processes a layout runs on: a layout that names its data-parallel size fixes the world
    (dp2 = 2 processes of pure data parallelism); the others fill --nproc with data parallelism."""
    from hybridquant import parity

    sizes = parity.layout_sizes(spec)
    return sizes["dp"] * sizes.get("tp", 1) * sizes.get("pp", 1) if "dp" in sizes else nproc


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from hybridquant import schema

    schema.register()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return hydra_compose("quantize", overrides=overrides)


def torchrun(nproc: int, args: list[str]) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node=nproc`` this script with ``args``, one thread per rank."""
    from hybridquant.parallel import free_port

    from _common import clean_env

    cmd = [str(Path(sys.executable).parent / "torchrun"), f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
           __file__, *args]
    return subprocess.run(cmd, cwd=REPO, env=clean_env(), capture_output=True, text=True)


def launch(nproc: int, cases: dict[str, list[str]], out: Path, overrides: list[str], run=torchrun) -> float:
    """One torchrun job (``run(nproc, args)``) calibrating each recipe under its layouts (``cases``:
    recipe -> layouts)."""
    import time

    t0 = time.perf_counter()
    proc = run(nproc, ["--worker", "--cases", json.dumps(cases), "--out", str(out), "--", *overrides])
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun {cases} failed:\n{proc.stderr[-4000:]}")
    return time.perf_counter() - t0


def measure(cases: dict[str, list[str]], nproc: int, separate: bool, overrides: list[str], run=torchrun) -> dict:
    """Run the reference and the layouts of every recipe (``cases``: recipe -> layouts);
    {recipe: {layout: row}}. One torchrun job (``run``, as ``launch``) per world size covers all recipes
    and layouts (one per layout with ``separate``)."""
    from hybridquant import parity

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        by_world: dict[int, dict[str, list[str]]] = {1: {r: ["1x1x1"] for r in cases}}
        for recipe, layouts in cases.items():
            for layout in layouts:
                by_world.setdefault(world_for(layout, nproc), {}).setdefault(recipe, []).append(layout)
        jobs = [(w, {r: [layout]}) for w, group in by_world.items() for r, ls in group.items() for layout in ls] \
            if separate else list(by_world.items())
        results: dict[str, dict] = {r: {} for r in cases}
        for i, (world, group) in enumerate(jobs):
            job_wall = launch(world, group, tmp / f"run{i}.json", overrides, run)
            for recipe, part in json.loads((tmp / f"run{i}.json").read_text()).items():
                for spec, res in part.items():
                    res["job_wall_s"] = job_wall if separate else None
                results[recipe].update(part)
    rows = {}
    for recipe, per_layout in results.items():
        ref = per_layout["1x1x1"]
        rows[recipe] = {spec: {**parity.compare(ref, res), "wall_s": res["wall_s"], "job_wall_s": res["job_wall_s"],
                               "peak_rss_mb_per_rank": res["peak_rss_mb_per_rank"], "layout": res["layout"]}
                        for spec, res in per_layout.items()}
    return rows


def table(recipe: str, rows: dict) -> str:
    head = (f"{recipe}\n{'layout':<10} {'tp pp ep etp dp':<16} {'matched':>7} {'identical':>9} "
            f"{'max|Δamax|':>11} {'max rel':>9} {'blocks=':>7} {'|Δlogit| bf16':>13} {'|Δlogit| q':>11} {'wall s':>7}  peak RSS/rank MiB")
    lines = [head]
    for spec, r in rows.items():
        lay = r["layout"]
        wall = r["job_wall_s"] if r.get("job_wall_s") else r["wall_s"]
        lines.append(
            f"{spec:<10} {lay['tp']:>2} {lay['pp']:>2} {lay['ep']:>2} {lay['etp']:>3} {lay['dp']:>2}      "
            f"{r['matched']:>7} {r['identical']:>9} {r['max_abs_amax_diff']:>11.3e} {r['max_rel_amax_diff']:>9.2e} "
            f"{str(r['blocks_identical']) + '/' + str(r['blocks_matched']):>7} {r['max_abs_logit_diff_unquantized']:>13.3e} {r['max_abs_logit_diff']:>11.3e} {wall:>7.1f}  " + ",".join(f"{x:.0f}" for x in r["peak_rss_mb_per_rank"])
        )
        if r["missing"] or r["extra"]:
            lines.append(f"{'':<10} missing {r['missing'][:3]} extra {r['extra'][:3]}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", default="mamba_moe_fp8_conservative,mamba_moe_fp8_aggressive,"
                    "mamba_moe_nvfp4_conservative,mamba_moe_nvfp4_aggressive")
    ap.add_argument("--layouts", default=",".join(DEFAULT_LAYOUTS))
    ap.add_argument("--nproc", type=int, default=4)
    ap.add_argument("--separate", action="store_true", help="one torchrun job per layout (per-layout time/RSS)")
    ap.add_argument("--json", type=Path, help="also write the rows as JSON")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--cases", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. calib.num_samples=16")
    args = ap.parse_args()

    if args.worker:
        from hybridquant import logs, parallel, parity

        logs.setup("WARNING")
        cases = json.loads(args.cases)
        cfgs = {r: compose([f"+quant={r}", *args.overrides]) for r in cases}
        parallel.fail_fast(parity.worker)(cfgs, cases, args.out)
        parallel.shutdown()
        return

    cases = {recipe: args.layouts.split(",") for recipe in args.recipes.split(",")}
    all_rows = measure(cases, args.nproc, args.separate, args.overrides)
    for recipe, rows in all_rows.items():
        print(table(recipe, rows), flush=True)
        print()
    if args.json:
        args.json.write_text(json.dumps(all_rows, indent=2))


if __name__ == "__main__":
    main()
