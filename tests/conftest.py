"""Shared fixtures. Megatron's parallel state is process-global: in-process tests share one world of
size 1 (gloo); multi-rank behaviour is tested by launching real torchrun jobs (tests/launch.py)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def tiny_model_cfg() -> dict:
    return yaml.safe_load((REPO / "conf" / "model" / "tiny.yaml").read_text())


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_model_cfg) -> Path:
    from hybridquant import tiny

    return tiny.materialize(tiny_model_cfg["arch"], tiny_model_cfg["seed"])


@pytest.fixture(scope="session")
def world1():
    """A world of one process with Megatron's model-parallel groups (all of size 1)."""
    warnings.filterwarnings("ignore")
    from hybridquant import logs, parallel

    logs.setup("WARNING")
    layout = parallel.Layout()
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(key, None)
    parallel.init(layout, seed=1234)
    yield layout
    parallel.shutdown()


@pytest.fixture(scope="session")
def calib_batches(tiny_checkpoint):
    from transformers import AutoTokenizer

    from hybridquant import calib

    tok = AutoTokenizer.from_pretrained(str(tiny_checkpoint))
    return calib.load("package:calib.jsonl", tok, num_samples=8, max_seq_len=128, seed=0).samples


@pytest.fixture(scope="session")
def quantized(tmp_path_factory):
    """``quantized(recipe, *overrides, nproc=1)``: the run directory of a real quantize run (torchrun),
    made once per test session for each distinct call and shared by the tests that read it, also across
    pytest-xdist workers (the first to ask runs it under a file lock; the others wait and reuse it)."""
    import fcntl
    import hashlib
    import json

    from launch import run_stage

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base

    def key_of(recipe, overrides, nproc) -> str:
        return hashlib.sha256(json.dumps([recipe, list(overrides), nproc]).encode()).hexdigest()[:12]

    def get(recipe: str, *overrides: str, nproc: int = 1):
        root = shared / f"quantize-{key_of(recipe, overrides, nproc)}"
        with open(f"{root}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (root / "stdout.txt").exists():
                root.mkdir(exist_ok=True)
                proc = run_stage("quantize", [f"+quant={recipe}", f"output_root={root}", *overrides], nproc=nproc)
                assert proc.returncode == 0, proc.stderr[-3000:]
                (root / "stdout.txt").write_text(proc.stdout)  # last: marks the run complete
        (run_dir,) = (root / "quantize").iterdir()
        return run_dir

    get.stdout = lambda recipe, *overrides, nproc=1: (
        shared / f"quantize-{key_of(recipe, overrides, nproc)}" / "stdout.txt").read_text()
    return get
