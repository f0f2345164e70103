"""The export stage at other layouts than its checkpoint's calibration layout: the same files, byte for
byte (TP2xEP2, PP2, a static NVFP4 checkpoint resharded to one process), and an output directory that
is only replaced when asked to."""

from __future__ import annotations

import json

import pytest

from export_settings import export, export_in_process
from hybridquant.errors import UserError

pytestmark = pytest.mark.distributed


def _shard_digests(directory):
    manifest = json.loads((directory / "manifest.json").read_text())
    return {name: entry["sha256"] for name, entry in manifest["files"].items() if name.endswith(".safetensors")}


def test_export_at_tp2_ep2_writes_the_same_bytes(export_of, tmp_path):
    """The same calibration exported by 2 ranks and by one: at TP2×EP2 every dense weight is gathered
    over TP and every expert over EP (PP2, where every layer comes from one of two stages: below)."""
    run_dir, single, _ = export_of("fp8")
    proc = export(run_dir, tmp_path / "out", 2, "parallel.tp=2", "parallel.ep=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _shard_digests(tmp_path / "out") == _shard_digests(single)
    assert (tmp_path / "out" / "manifest.json").read_bytes() == (single / "manifest.json").read_bytes()


def test_static_nvfp4_export_gathers_block_scales_at_any_layout(export_of, tmp_path):
    """MSE block scales are not a function of the weight: exported at ETP2 (their calibration layout)
    and by one process (resharded on load), they must be the same bytes."""
    run_dir, sharded, _ = export_of("static_mixed")
    proc = export(run_dir, tmp_path / "single", 1, "parallel.etp=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _shard_digests(tmp_path / "single") == _shard_digests(sharded)


def test_non_empty_output_dir_needs_overwrite_and_pp2_writes_the_same_files(export_of, tmp_path):
    """A non-empty output directory is refused without export.overwrite=true and replaced with it; the
    export written there by 2 pipeline stages (every layer from one of them) is the one-process export,
    every file byte for byte."""
    run_dir, reference, _ = export_of("fp8")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="export.overwrite=true") as refused:  # before any process group
        export_in_process(run_dir, out)
    assert "\n" not in str(refused.value)
    assert (out / "notes.txt").read_text() == "mine"
    proc = export(run_dir, out, 2, "parallel.pp=2", "export.overwrite=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (out / "notes.txt").exists()
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference.iterdir())
    for path in reference.iterdir():
        assert (out / path.name).read_bytes() == path.read_bytes(), path.name
