"""The release pipeline as users run it: quantize -> export -> evaluate -> model card, twice (the
second run skips every stage), a changed config re-running its stage and everything after, the
manifest read back and verified, bad input."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from launch import error_lines

pytestmark = pytest.mark.distributed

REPO = Path(__file__).resolve().parents[1]
STAGES = ["quantize", "export", "export_gguf", "export_compressed_tensors", "evaluate", "card"]


def release(*args: str, cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run([sys.executable, str(REPO / "pipeline" / "release.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def verify(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "pipeline" / "verify.py"), str(path)], capture_output=True,
                          text=True, timeout=120)


def ran(proc) -> list[str]:
    return [s for s in STAGES if f"[{s}] running" in proc.stdout]


def skipped(proc) -> list[str]:
    return [s for s in STAGES if f"[{s}] up to date, skipped" in proc.stdout]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("release")
    first = release("experiment=tiny_fp8", f"output_root={root}", cwd=root)
    assert first.returncode == 0, first.stderr[-3000:]
    return root, root / "release" / "tiny-trained-fp8", first


def test_second_run_skips_every_stage(built):
    root, rdir, first = built
    assert ran(first) == STAGES
    logs = {p.name: p.stat().st_mtime_ns for p in (rdir / "logs").iterdir()}
    manifest_before = json.loads((rdir / "release.json").read_text())
    second = release("experiment=tiny_fp8", f"output_root={root}", cwd=root)
    assert second.returncode == 0, second.stderr[-3000:]
    assert skipped(second) == STAGES and ran(second) == []
    assert "0 stage(s) run" in second.stdout
    assert {p.name: p.stat().st_mtime_ns for p in (rdir / "logs").iterdir()} == logs  # no stage process started
    assert json.loads((rdir / "release.json").read_text())["files"] == manifest_before["files"]


def test_manifest_records_what_makes_the_release_reproducible(built):
    _, rdir, _ = built
    m = json.loads((rdir / "release.json").read_text())
    assert m["config"]["release"]["quant"] == "mamba_moe_fp8_conservative"
    for package in ("torch", "megatron-core", "nvidia-modelopt", "transformers"):
        assert m["versions"][package], package
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert m["git"]["commit"] == head
    assert m["seeds"]["pipeline"] == 1234 and m["seeds"]["calibration"] == 0
    calib = REPO / "src" / "hybridquant" / "data" / "corpus" / "calib.jsonl"
    assert m["calibration"]["sha256"] == hashlib.sha256(calib.read_bytes()).hexdigest()
    # every file of the release, with its sha256 as read back here
    on_disk = sorted(str(p.relative_to(rdir)) for p in rdir.rglob("*") if p.is_file()
                     and p.name != "release.json" and not p.relative_to(rdir).parts[0] in (".stages", "logs"))
    assert sorted(m["files"]) == on_disk
    for rel in ("export/README.md", "export/model.safetensors.index.json", "quantize/report.json",
                "evaluate/evaluation.json"):
        assert m["files"][rel]["sha256"] == hashlib.sha256((rdir / rel).read_bytes()).hexdigest()
    assert set(m["stages"]) == set(STAGES)


def test_model_card(built):
    _, rdir, _ = built
    card = (rdir / "export" / "README.md").read_text()
    evaluation = json.loads((rdir / "evaluate" / "evaluation.json").read_text())
    for needle in ("## Recipe", "| routed_expert.fc1 | FP8 |", "## Calibration data", "## Evaluation",
                   "vllm serve", "sglang.launch_server", "--quantization modelopt_fp8"):
        assert needle in card, needle
    for result in evaluation["results"]:  # the evaluation table is the evaluate stage's
        assert result["label"] in card
    assert f"{evaluation['reference']['perplexity']:.3f}" in card
    # The GGUF export of the same release: its own card, files, llama.cpp / Ollama commands, and both
    # types evaluated against the reference.
    gguf_card = (rdir / "export_gguf" / "README.md").read_text()
    for needle in ("GGUF for llama.cpp and Ollama (Q8_0, Q4_K_M)", "llama-cli -m tiny_trained-Q8_0.gguf",
                   "ollama create", "| Q4_K_M | `tiny_trained-Q4_K_M.gguf` |", "quantized by llama.cpp"):
        assert needle in gguf_card, needle
    labels = {r["label"] for r in evaluation["results"]}
    assert {"mamba_moe_fp8_conservative (GGUF Q8_0)", "mamba_moe_fp8_conservative (GGUF Q4_K_M)"} <= labels
    assert (rdir / "export_gguf" / "Modelfile").read_text().startswith("FROM ./tiny_trained-Q8_0.gguf")
    ct_card = (rdir / "export_compressed_tensors" / "README.md").read_text()
    for needle in ("compressed-tensors format (`float-quantized`", "vllm serve tiny-trained-fp8", "## Recipe",
                   "| routed_expert.fc1 | FP8 |"):
        assert needle in ct_card, needle
    assert "mamba_moe_fp8_conservative (compressed-tensors export)" in labels


def test_verify_detects_any_change(built, tmp_path):
    _, rdir, _ = built
    ok = verify(rdir)
    assert ok.returncode == 0, ok.stderr
    target = next((rdir / "export").glob("*.safetensors"))
    original = target.read_bytes()
    try:
        target.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
        (rdir / "export" / "extra.txt").write_text("x")
        bad = verify(rdir)
        assert bad.returncode == 1
        (line,) = error_lines(bad)
        assert f"export/{target.name}: sha256 differs" in line and "export/extra.txt: not in the manifest" in line
    finally:
        target.write_bytes(original)
        (rdir / "export" / "extra.txt").unlink(missing_ok=True)
    assert verify(rdir).returncode == 0


def test_changed_config_reruns_the_stage_and_everything_after(built):
    root, rdir, _ = built
    proc = release("experiment=tiny_fp8", f"output_root={root}", "release.evaluation.num_samples=3", cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert skipped(proc) == ["quantize", "export", "export_gguf", "export_compressed_tensors"]
    assert ran(proc) == ["evaluate", "card"]
    assert json.loads((rdir / "evaluate" / "evaluation.json").read_text())["data"]["samples"] == 3
    assert verify(rdir).returncode == 0


def test_bad_input(tmp_path):
    proc = release(f"output_root={tmp_path}", cwd=tmp_path)
    assert proc.returncode == 1 and "choose a release with experiment=NAME" in error_lines(proc)[0]
    proc = release("experiment=cascade2_fp8", f"output_root={tmp_path}", cwd=tmp_path)
    assert proc.returncode == 1 and "needs release.calib.path" in error_lines(proc)[0]
    assert not (tmp_path / "release").exists()
    proc = verify(tmp_path)
    assert proc.returncode == 1 and "is not a release directory" in error_lines(proc)[0]
