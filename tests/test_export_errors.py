"""The export stage's bad input: a missing, damaged or foreign checkpoint and a full disk (on one rank
of two) end in one error line and leave no export behind."""

from __future__ import annotations

import json
import shutil

import pytest

from export_settings import FP8, export, export_in_process
from hybridquant.errors import UserError
from launch import error_lines

pytestmark = pytest.mark.distributed


def test_missing_checkpoint_is_one_line_error(tmp_path):
    """Refused before any process group exists (in this process; the launches below show the line)."""
    with pytest.raises(UserError, match="does not exist") as info:
        export_in_process(tmp_path / "nowhere", tmp_path / "out")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


def test_damaged_checkpoint_is_one_line_error_and_no_export(quantized, tmp_path):
    run_dir = quantized(*FP8)
    ckpt = tmp_path / "ckpt"
    shutil.copytree(run_dir / "checkpoint", ckpt)
    (data,) = ckpt.glob("*.distcp")
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    proc = export(ckpt, tmp_path / "out")
    errors = error_lines(proc)
    assert proc.returncode != 0 and len(errors) == 1 and "cannot be loaded" in errors[0], proc.stderr[-2000:]
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.partial").exists()


def test_checkpoint_of_another_model_cannot_be_loaded(quantized, world1, tmp_path):
    """The files of this checkpoint, the config of a wider model: refused on load, in one line (what the
    export stage prints, as for the corrupt checkpoint above)."""
    from hybridquant import checkpoint
    from hybridquant.errors import UserError

    ckpt = tmp_path / "ckpt"
    shutil.copytree(quantized(*FP8) / "checkpoint", ckpt)
    config = json.loads((ckpt / "hf" / "config.json").read_text())
    config["hidden_size"], config["head_dim"] = 64, 16
    (ckpt / "hf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="cannot be loaded") as info:
        checkpoint.load_quantized(ckpt, world1)
    assert "\n" not in str(info.value)


def test_disk_full_is_one_line_error_and_no_export(quantized, tmp_path):
    env = {"HYBRIDQUANT_FAULT": "0:export.write", "HYBRIDQUANT_FAULT_KIND": "enospc"}
    proc = export(quantized(*FP8), tmp_path / "out", env=env)
    errors = error_lines(proc)
    assert proc.returncode != 0 and len(errors) == 1, proc.stderr[-2000:]
    assert "writing the export to" in errors[0] and "No space left on device" in errors[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_disk_full_on_one_rank_is_an_error_and_no_export(quantized, tmp_path):
    """Rank 1 of 2 finds the disk full while writing its first file; rank 0 is mid-export."""
    run_dir = quantized(*FP8)
    env = {"HYBRIDQUANT_FAULT": "1:export.write", "HYBRIDQUANT_FAULT_KIND": "enospc"}
    proc = export(run_dir, tmp_path / "out", 2, "parallel.ep=2", env=env)
    errors = error_lines(proc)
    assert proc.returncode != 0, proc.stdout[-2000:]
    # rank 1's own line names the cause; rank 0 may report too before torchrun stops it (the order of
    # the lines depends on the schedule): then it says a peer failed first, if its write hit the removal
    (cause,) = [e for e in errors if "[rank 1]" in e]
    assert "writing the export to" in cause and "No space left on device" in cause, proc.stderr[-2000:]
    for other in (e for e in errors if e != cause):
        assert "[rank 0]" in other and "No space left on device" not in other, other
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.rglob("manifest.json"))
