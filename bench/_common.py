"""What the benchmark scripts share: running the real stages with torchrun, reading what they report,
the benchmark model and its size, and this machine's reference speeds (dense GEMM, disk)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH_MODEL = "bench_medium"  # conf/model/bench_medium.yaml: ~58M parameters, the tiny model's pattern


def clean_env(threads: int | None = None) -> dict:
    """The environment for a child job: no inherited torchrun variables; one thread unless told."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    else:
        env.setdefault("OMP_NUM_THREADS", "1")
    return env


def torchrun(nproc: int, script: Path, args: list[str], threads: int | None = None) -> str:
    """Run ``script`` under torchrun with ``nproc`` ranks; its stdout, or exit with its stderr's tail."""
    from hybridquant.parallel import free_port

    cmd = [str(Path(sys.executable).parent / "torchrun"), f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
           str(script), *args]
    proc = subprocess.run(cmd, cwd=REPO, env=clean_env(threads), capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{script.name} {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


def stage(name: str, nproc: int, overrides: list[str], threads: int | None = None) -> str:
    """A pipeline stage (pipeline/<name>.py) as users run it; its stdout."""
    return torchrun(nproc, REPO / "pipeline" / f"{name}.py", overrides, threads)


def quantize(root: Path, nproc: int, overrides: list[str], threads: int | None = None) -> Path:
    """A quantize run under ``root``; its run directory."""
    stage("quantize", nproc, [f"output_root={root}", *overrides], threads)
    (run_dir,) = (root / "quantize").iterdir()
    return run_dir


def quantize_report(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "report.json").read_text())


# What the export stage prints: "memory per rank (MiB): rank 0: shard 5.3, RSS after load 1240, peak ..."
_RANK = re.compile(r"rank (\d+): shard ([\d.]+), RSS after load (\d+), peak (?:during export|of the process) (\d+)")
_TIME = re.compile(r"^time: ([\d.]+) s \(load ([\d.]+) s, export ([\d.]+) s\)", re.MULTILINE)
_SIZE = re.compile(r"in (\d+) safetensors files, ([\d.]+) MiB")


def export_memory(stdout: str) -> list[dict]:
    """Per rank: shard MiB, RSS after loading the checkpoint, peak while exporting (MiB)."""
    line = next(line for line in stdout.splitlines() if line.startswith("memory per rank"))
    return [{"rank": int(r), "shard": float(s), "loaded": float(lo), "peak": float(p)}
            for r, s, lo, p in _RANK.findall(line)]


def export_timing(stdout: str) -> dict:
    """Total, load and export seconds, and the safetensors files and MiB the export stage wrote."""
    total, load, export = (float(x) for x in _TIME.search(stdout).groups())
    files, mib = _SIZE.search(stdout).groups()
    return {"total_s": total, "load_s": load, "export_s": export, "files": int(files), "mib": float(mib)}


def model_bytes(hf_dir: Path, dtype: str | None = None) -> tuple[int, int]:
    """Parameter bytes of a checkpoint's whole model and of its largest decoder layer (meta device,
    in ``dtype`` or the config's)."""
    import torch
    from transformers import AutoConfig, NemotronHForCausalLM

    config = AutoConfig.from_pretrained(str(hf_dir))
    with torch.device("meta"):
        model = NemotronHForCausalLM(config)
    if dtype is not None:
        model = model.to(getattr(torch, dtype))
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    layers = [sum(p.numel() * p.element_size() for p in layer.parameters()) for layer in model.model.layers]
    return total, max(layers)


def model_config(name: str = BENCH_MODEL) -> dict:
    import yaml

    return yaml.safe_load((REPO / "conf" / "model" / f"{name}.yaml").read_text())


def materialize(name: str = BENCH_MODEL) -> Path:
    """The model's HF checkpoint directory (made once, cached), before any timed run needs it."""
    from hybridquant import source

    return source.resolve(model_config(name))


def gemm_peak_gflops(threads: int, n: int = 2048, seconds: float = 3.0) -> tuple[float, float]:
    """Best observed float32 dense GEMM rate of ``torch.matmul`` on ``threads`` threads (GFLOP/s), per
    wall second and per CPU-second of this process (per core: load-robust)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(n, n), torch.randn(n, n)
        torch.matmul(a, b)
        wall, cpu, end = float("inf"), float("inf"), time.perf_counter() + seconds
        while time.perf_counter() < end:
            t, c = time.perf_counter(), time.process_time()
            torch.matmul(a, b)
            wall, cpu = min(wall, time.perf_counter() - t), min(cpu, time.process_time() - c)
        flop = 2 * n**3 / 1e9
        return flop / wall, flop / cpu
    finally:
        torch.set_num_threads(before)


def disk_write_mib_s(directory: Path, mib: int, fsync: bool = True, block_mib: int = 4) -> float:
    """Sequential write speed of the disk under ``directory``: ``mib`` MiB in ``block_mib`` blocks
    (incompressible bytes) to a new file, then fsync (or not), timed end to end; the file is removed."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    block = os.urandom(block_mib * 2**20)
    path = directory / f".disk-probe-{os.getpid()}"
    t = time.perf_counter()
    try:
        with open(path, "wb", buffering=0) as f:
            f.writelines(block for _ in range(max(1, mib // block_mib)))
            if fsync:
                os.fsync(f.fileno())
        elapsed = time.perf_counter() - t
    finally:
        path.unlink(missing_ok=True)
    return max(1, mib // block_mib) * block_mib / elapsed


def load_average() -> str:
    """The 1-minute load average and core count: whether a measurement was taken on a busy machine."""
    return f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"


def long_samples(path: Path, count: int, min_bytes: int, domain: str = "long_context") -> None:
    """Write ``count`` JSONL samples of more than ``min_bytes`` bytes (the tiny models' byte-level
    tokenizer: at least as many tokens): shipped text rows concatenated, each sample starting at
    another row (so samples differ)."""
    from hybridquant import calib

    rows = [r["text"] for r in calib.read_jsonl(calib.resolve_path("package:calib.jsonl"))]
    with open(path, "w", encoding="utf-8") as f:
        for k in range(count):
            parts, size, i = [], 0, k * 97
            while size <= min_bytes:
                parts.append(rows[i % len(rows)])
                size += len(rows[i % len(rows)].encode("utf-8")) + 2
                i += 1
            f.write(json.dumps({"id": f"long-{k}", "domain": domain, "text": "\n\n".join(parts)}) + "\n")
