"""The generate stage run as users run it: a checkpoint calibrated at 1x1x1 loaded at other layouts
(resharded on load) must generate the same token ids, greedy and sampled, in both chat modes."""

from __future__ import annotations

import json

import pytest

from launch import error_lines, run_stage

pytestmark = pytest.mark.distributed

FP8 = ("mamba_moe_fp8_conservative", "calib.num_samples=8", "quant.kv_cache=none")
TOKENS = "generation.max_new_tokens=6"
THINK = 6  # <think>; </think> follows it (hybridquant.tokenizer.SPECIAL_TOKENS)
SAMPLED = ("generation.do_sample=true", "generation.seed=3", "generation.temperature=1.0", "generation.top_p=0.9",
           "generation.mode=instruct")


@pytest.fixture(scope="module")
def generated(quantized, tmp_path_factory):
    runs = {}

    def get(*overrides, nproc=1):
        if (overrides, nproc) not in runs:
            out = tmp_path_factory.mktemp("generate") / "completions.json"
            proc = run_stage("generate", [f"checkpoint={quantized(*FP8)}", TOKENS, f"output={out}", *overrides],
                             nproc=nproc)
            assert proc.returncode == 0, proc.stderr[-3000:]
            runs[(overrides, nproc)] = (json.loads(out.read_text()), proc.stdout)
        return runs[(overrides, nproc)]
    return get


def _ids(record):
    return [r["completion_ids"] for r in record["results"]]


def test_unsharded_generation_prints_completions_of_chat_prompts(generated):
    from hybridquant import tokenizer

    record, stdout = generated()
    assert record["layout"] == "tp1_pp1_ep1" and record["mode"] == "thinking"
    assert "thinking mode, greedy, cache=recurrent" in stdout and "--- prompt: What is 17 times 23?" in stdout
    for r in record["results"]:
        assert r["prompt_ids"][0] == tokenizer.IM_START_ID
        assert r["prompt_ids"][-2:] == [THINK, tokenizer.BYTE_OFFSET + ord("\n")]  # "<think>\n"
        assert 1 <= len(r["completion_ids"]) <= 6 and r["completion"] in stdout


def test_greedy_generation_at_another_layout_matches_unsharded(generated):
    """Sharded runs recompute the sequence per token; the reference decodes recurrently (KV cache and
    Mamba states, one token per step): both paths give the same ids (TP and EP: the sampled test)."""
    reference, _ = generated()
    sharded, stdout = generated("parallel.pp=2", nproc=2)
    assert sharded["layout"] != reference["layout"] and sharded["cache"] == "recompute"
    assert _ids(sharded) == _ids(reference)


def test_sampled_generation_is_reproducible_across_layouts(generated):
    greedy, _ = generated()
    sampled, stdout = generated(*SAMPLED)
    assert "instruct mode, sampled" in stdout
    sharded, _ = generated(*SAMPLED, "parallel.tp=2", "parallel.ep=2", nproc=2)
    assert sharded["layout"] == "tp2_pp1_ep2"
    assert _ids(sharded) == _ids(sampled)
    assert _ids(sampled) != _ids(greedy)
    for thinking, instruct in zip(greedy["results"], sampled["results"]):
        assert instruct["prompt_ids"][-2:] == [THINK, THINK + 1]  # "<think></think>": no reasoning
        assert instruct["prompt_ids"][:-1] == thinking["prompt_ids"][:-1]


def test_unknown_mode_is_one_line_error(quantized):
    proc = run_stage("generate", [f"checkpoint={quantized(*FP8)}", "generation.mode=chat"])
    errors = error_lines(proc)
    assert proc.returncode != 0 and len(errors) == 1 and "generation.mode" in errors[0], proc.stderr[-2000:]
