"""lm-evaluation-harness over an exported checkpoint: the tiny model quantized, exported by the real
stages, evaluated by pipeline/lm_eval.py as a process on the shipped task, results read back."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from launch import REPO


pytestmark = pytest.mark.distributed

FP8 = ("mamba_moe_fp8_conservative", "calib.num_samples=8", "quant.kv_cache=none")  # as tests/export_settings.py
TASK = "hybridquant_continuation"
LIMIT = 24  # of the task's 40 rows: the CPU reference scan is slow (lm_eval_adapter._fit_chunks)


def test_shipped_task_data_is_what_its_generator_makes():
    from hybridquant import lm_eval_adapter

    text = lm_eval_adapter.continuation_jsonl()
    assert lm_eval_adapter.TASK_DATA.read_text() == text
    rows = [json.loads(line) for line in text.splitlines()]
    assert len(rows) == 40
    assert all(len(set(r["choices"])) == 4 and 0 <= r["label"] < 4 for r in rows)
    assert TASK in lm_eval_adapter.shipped_tasks()


def _evaluate(export_dir, output=None, *extra):
    cmd = [sys.executable, str(REPO / "pipeline" / "lm_eval.py"), "--export", str(export_dir), "--tasks", TASK,
           "--batch-size", "32", "--limit", str(LIMIT), *(["--output", str(output)] if output else []), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_exported_checkpoint_evaluates_deterministically(exported, tmp_path):
    _, export_dir, _ = exported(*FP8)  # the export tests/test_export.py reads back

    # The same run twice, as separate processes (concurrently), plus bad input.
    runs = [_evaluate(export_dir, tmp_path / f"results{i}.json") for i in range(2)]
    bad = _evaluate(tmp_path / "missing")

    results = []
    for i, p in enumerate(runs):
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
        assert out.startswith(f"{TASK}: acc "), out
        results.append(json.loads((tmp_path / f"results{i}.json").read_text()))
    for r in results:
        metrics = r["results"][TASK]
        assert 0.0 <= metrics["acc,none"] <= 1.0 and 0.0 <= metrics["acc_norm,none"] <= 1.0
        assert r["n-samples"][TASK] == {"original": 40, "effective": LIMIT}
        assert r["hybridquant"]["manifest"]["recipe"] == "mamba_moe_fp8_conservative"
    assert results[0]["results"] == results[1]["results"]

    out, err = bad.communicate(timeout=300)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert bad.returncode != 0 and len(errors) == 1 and "export directory not found" in errors[0], err[-2000:]
