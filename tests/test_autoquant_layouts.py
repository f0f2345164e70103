"""AutoQuantize at every layout with real ranks: the same formats and scores as one process (the
global allocation over pipeline stages, scores counted once under TP, KL scoring over stages)."""

from __future__ import annotations

import json

import pytest

from aq_settings import LAYOUTS, SCORE_RTOL, read

pytestmark = pytest.mark.distributed


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_layout_makes_the_same_allocation(layout, runs):
    _, reference, ref_rows = read(runs("single"))
    report, recipe, rows = read(runs(layout))
    assert recipe["layers"] == reference["layers"], layout
    assert [(r["layer"], r["kind"]) for r in rows] == [(r["layer"], r["kind"]) for r in ref_rows]
    for got, want in zip(rows, ref_rows):
        for fmt in ("NVFP4", "FP8"):
            g, w = got["candidates"][fmt], want["candidates"][fmt]
            assert g["cost"] == w["cost"], (layout, got["layer"], got["kind"])
            assert g["score"] == pytest.approx(w["score"], rel=SCORE_RTOL), (layout, got["layer"], got["kind"], fmt)
    assert report["autoquant"]["effective_bits"] == pytest.approx(
        json.loads((runs("single") / "report.json").read_text())["autoquant"]["effective_bits"])


@pytest.mark.slow
def test_kl_div_scores_over_pipeline_stages_match_one_process(runs):
    _, single, single_rows = read(runs("single", "autoquant.method=kl_div"))
    report, staged, staged_rows = read(runs("pp2", "autoquant.method=kl_div"))
    assert report["autoquant"]["method"] == "kl_div"
    assert staged["layers"] == single["layers"]
    for got, want in zip(staged_rows, single_rows):
        for fmt in ("NVFP4", "FP8"):
            assert got["candidates"][fmt]["score"] == pytest.approx(want["candidates"][fmt]["score"], rel=SCORE_RTOL)
