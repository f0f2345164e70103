"""Shared fixtures. Megatron's parallel state is process-global: in-process tests share one world of
size 1 (gloo); multi-rank behaviour is tested by launching real torchrun jobs (tests/launch.py)."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

# One thread per process: `make test` runs one pytest worker per core and every stage subprocess with
# one thread (tests/launch.py); more would oversubscribe the cores (waiting OpenMP threads spin), which
# made in-process tests cost ~60% more CPU time on an idle machine and far more on a loaded one.
os.environ.setdefault("OMP_NUM_THREADS", "1")
if "torch" in sys.modules:  # already imported by a plugin: the variable came too late for it
    sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


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


def _shared_root(tmp_path_factory) -> Path:
    """A directory all pytest-xdist workers of this session share (the base temp directory's parent)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def _key(*parts) -> str:
    import hashlib
    import json

    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:12]


def _once(root: Path, make) -> Path:
    """``make(root)`` run once per session for ``root``, whichever worker asks first (under a file lock;
    the others wait and reuse it). ``root/stdout.txt``, written last, marks it complete."""
    import fcntl

    with open(f"{root}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / "stdout.txt").exists():
            root.mkdir(exist_ok=True)
            (root / "stdout.txt").write_text(make(root))
    return root


@pytest.fixture(scope="session")
def quantized(tmp_path_factory):
    """``quantized(recipe, *overrides, nproc=1)``: the run directory of a real quantize run (torchrun),
    made once per test session for each distinct call and shared by the tests that read it, also across
    pytest-xdist workers (the first to ask runs it under a file lock; the others wait and reuse it)."""
    from launch import run_stage

    shared = _shared_root(tmp_path_factory)

    def root_of(recipe, overrides, nproc) -> Path:
        return shared / f"quantize-{_key(recipe, list(overrides), nproc)}"

    def get(recipe: str, *overrides: str, nproc: int = 1):
        def make(root: Path) -> str:
            proc = run_stage("quantize", [f"+quant={recipe}", f"output_root={root}", *overrides], nproc=nproc)
            assert proc.returncode == 0, proc.stderr[-3000:]
            return proc.stdout

        (run_dir,) = (_once(root_of(recipe, overrides, nproc), make) / "quantize").iterdir()
        return run_dir

    get.stdout = lambda recipe, *overrides, nproc=1: (root_of(recipe, overrides, nproc) / "stdout.txt").read_text()
    return get


@pytest.fixture(scope="session")
def exported(quantized, tmp_path_factory):
    """``exported(recipe, *overrides, nproc=1)``: ``(run_dir, export_dir, export stdout)`` of the quantize
    run ``quantized(recipe, *overrides, nproc=nproc)`` exported by the export stage at its calibration
    layout (``nproc`` ranks), once per session and shared across files and workers like ``quantized``."""
    from launch import run_stage

    shared = _shared_root(tmp_path_factory)

    def get(recipe: str, *overrides: str, nproc: int = 1, export_args: tuple = (), export_nproc: int | None = None):
        run_dir = quantized(recipe, *overrides, nproc=nproc)
        ranks = nproc if export_nproc is None else export_nproc

        def make(root: Path) -> str:
            proc = run_stage("export", [f"checkpoint={run_dir}", f"output_dir={root / 'export'}", *export_args],
                             nproc=ranks)
            assert proc.returncode == 0, proc.stderr[-3000:]
            return proc.stdout

        key = _key(recipe, list(overrides), nproc) if not export_args and export_nproc is None else \
            _key(recipe, list(overrides), nproc, list(export_args), ranks)
        root = _once(shared / f"export-{key}", make)
        return run_dir, root / "export", (root / "stdout.txt").read_text()

    return get

@pytest.fixture(scope="session")
def export_of(exported):
    """``export_of(key)``: the checkpoint of tests/export_settings.py's recipe ``key`` exported at its
    calibration layout, ``(run_dir, export_dir, export stdout)``: the ``exported`` run, shared by the
    export test files."""
    from export_settings import RECIPES

    def get(key, *export_args: str, export_nproc: int | None = None):
        args, nproc, _ = RECIPES[key]
        return exported(*args, nproc=nproc, export_args=export_args, export_nproc=export_nproc)
    return get


# Test files, longest first (worker seconds of a full run, 2 workers on 2 cores, ranks preloaded: slurm
# ~215, release ~180, layout parity ~150, autoquant layouts ~120, autoquant ~90, qad ~90, variations,
# parallel, export_ct, evaluate ~65-70); the others follow in collection order. pytest-xdist's loadfile
# hands whole files to the workers in collection order: started last, a long file keeps one worker busy
# while the other has nothing left (alphabetically, test_variations came last). A shared run
# (``quantized``, ``exported``) counts for the first file that asks for it.
LONGEST_FIRST = ("test_slurm.py", "test_release.py", "test_layout_parity.py", "test_autoquant_layouts.py",
                 "test_autoquant.py", "test_qad.py", "test_variations.py", "test_parallel.py", "test_export_ct.py",
                 "test_evaluate.py", "test_recipes.py", "test_quantize_stage.py", "test_export_layouts.py",
                 "test_export_gguf.py", "test_export.py", "test_generate.py", "test_lm_eval.py", "test_calib.py",
                 "test_qad_resume.py", "test_preload.py", "test_export_errors.py")


def pytest_collection_modifyitems(config, items):
    """Files longest first (LONGEST_FIRST; the order within a file is kept). ``gpu`` tests run only
    where CUDA is available (a lent GPU machine: bench/gpu_check.sh)."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in gpu_items:
        item.add_marker(skip)


@pytest.fixture(scope="session")
def autoquant_run(tmp_path_factory):
    """``autoquant_run(*overrides, nproc=1)``: the run directory of a real autoquant run (torchrun), made
    once per session for each distinct call and shared across test files and xdist workers."""
    from launch import run_stage

    shared = _shared_root(tmp_path_factory)

    def get(*overrides: str, nproc: int = 1):
        def make(root: Path) -> str:
            proc = run_stage("autoquant", [f"output_root={root}", *overrides], nproc=nproc)
            assert proc.returncode == 0, proc.stderr[-3000:]
            return proc.stdout

        root = _once(shared / f"autoquant-{_key(list(overrides), nproc)}", make)
        (run_dir,) = [d for d in (root / "autoquant").iterdir() if d.name != "scores"]
        return run_dir
    return get


@pytest.fixture(scope="session")
def runs(autoquant_run):
    """``runs(name, *extra)``: the shared autoquant run (tests/aq_settings.py) at a layout: ``single``
    (one process) or a LAYOUTS key."""
    from aq_settings import BASE, FAST, LAYOUTS

    def get(name, *extra):
        overrides, nproc = ([], 1) if name == "single" else LAYOUTS[name]
        return autoquant_run(f"+quant={BASE}", *FAST, *overrides, *extra, nproc=nproc)
    return get


@pytest.fixture(scope="session")
def qad_student(quantized):
    """The quantized checkpoint the qad tests distil (tests/qad_settings.py), shared like ``quantized``."""
    from qad_settings import STUDENT

    return quantized(*STUDENT)


@pytest.fixture(scope="session")
def qad_run(qad_student, tmp_path_factory):
    """``qad_run(*overrides, nproc=1)``: the run directory of a real, uninterrupted qad run (torchrun) of
    ``qad_student`` with tests/qad_settings.py's FAST settings, once per session for each distinct call,
    shared across test files and xdist workers."""
    from launch import run_stage
    from qad_settings import FAST

    shared = _shared_root(tmp_path_factory)

    def get(*overrides: str, nproc: int = 1):
        def make(root: Path) -> str:
            proc = run_stage("qad", [f"checkpoint={qad_student}", f"hydra.run.dir={root / 'run'}", *FAST, *overrides],
                             nproc=nproc)
            assert proc.returncode == 0, proc.stderr[-3000:]
            return proc.stdout

        return _once(shared / f"qad-{_key(list(overrides), nproc)}", make) / "run"
    return get
