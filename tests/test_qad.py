"""The qad stage run as users run it (torchrun): distillation lowers the held-out KL to the BF16 source,
the same curve at other layouts (EP2 over two data-parallel ranks, TP2 with sequence parallelism), a
checkpoint that export reads unchanged, the release preset; and its one-line errors (in process)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from omegaconf import OmegaConf

from launch import error_lines, run_stage
from qad_settings import EP2, FAST, TP2
from hybridquant import calib, checkpoint, qad, readers, recipes
from hybridquant.errors import UserError


def read(run_dir):
    return json.loads((run_dir / "report.json").read_text()), json.loads((run_dir / "qad.json").read_text())


def curve_of(run_dir):
    _, curve = read(run_dir)
    return [s["kd_loss"] for s in curve["steps"]], [e["kl_mean"] for e in curve["evals"]]


@pytest.mark.distributed
def test_single_process_run_distils_and_writes_a_quantized_checkpoint(qad_run, qad_student):
    run_dir = qad_run()
    report, curve = read(run_dir)
    assert report["stage"] == "qad" and report["steps"] == 3 and report["recipe"] == "mamba_moe_nvfp4_aggressive"
    # Every step trained on the global batch's loss tokens (4 samples of 63 tokens: 62 next-token targets each).
    assert [s["tokens"] for s in curve["steps"]] == [248, 248, 248] and report["tokens"] == 744
    assert [e["step"] for e in curve["evals"]] == [0, 2, 3]
    before, after = report["heldout"]["before"], report["heldout"]["after"]
    # The fake-quantized student moves towards its teacher on text it never trained on.
    assert after["kl_mean"] < 0.97 * before["kl_mean"], (before, after)
    assert abs(after["perplexity"] - after["teacher_perplexity"]) < abs(before["perplexity"] - before["teacher_perplexity"])
    assert (run_dir / "qad.png").stat().st_size > 0
    # The final checkpoint is a quantized checkpoint like quantize's, recording where it came from.
    meta = checkpoint.read_metadata(run_dir / "checkpoint")
    student_meta = checkpoint.read_metadata(qad_student / "checkpoint")
    assert meta["recipe"] == student_meta["recipe"] and meta["source"] == student_meta["source"]
    assert meta["qad"]["step"] == 3 and meta["qad"]["from"] == str((qad_student / "checkpoint").resolve())
    assert not (run_dir / "checkpoint" / "train_state").exists()
    assert (run_dir / "checkpoints" / "step_000003" / "train_state" / "rank0.pt").is_file()
    # The held-out KL before training is the quantize run's own quantization error on that text.
    assert before["kl_mean"] > 1e-3 and before["positions"] == 4 * 63


@pytest.mark.distributed
@pytest.mark.parametrize("layout", ["EP2", "TP2"])
def test_other_layouts_give_the_same_curve(qad_run, layout):
    overrides, nproc = {"EP2": EP2, "TP2": TP2}[layout]
    losses1, kls1 = curve_of(qad_run())
    losses, kls = curve_of(qad_run(*overrides, nproc=nproc))
    report, _ = read(qad_run(*overrides, nproc=nproc))
    assert report["layout"]["world_size"] == 2
    # The first step's loss is computed on identical weights: equal to float32 rounding. Later values
    # carry rounding through Adam (whose update is close to lr * sign(gradient) for small gradients).
    assert losses[0] == pytest.approx(losses1[0], rel=1e-5)
    assert losses == pytest.approx(losses1, rel=2e-2) and kls == pytest.approx(kls1, rel=2e-2)
    assert kls[0] == pytest.approx(kls1[0], rel=1e-5)


@pytest.mark.distributed
def test_export_reads_the_distilled_checkpoint_unchanged(qad_run, tmp_path):
    """export (at another layout: one process) takes a qad run as it takes a quantize run; the
    independent reader's logits equal the distilled weights' held-out result, not the student's."""
    run_dir = qad_run(*EP2[0], nproc=EP2[1])
    out = tmp_path / "export"
    proc = run_stage("export", [f"checkpoint={run_dir}", f"output_dir={out}", "parallel.ep=1"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert readers.provenance(out)["recipe"] == "mamba_moe_nvfp4_aggressive"
    hf = json.loads((out / "hf_quant_config.json").read_text())["quantization"]
    assert hf["quant_algo"] == "NVFP4"


# ---------------------------------------------------------------------------------------------------
# In process: options, data, plan errors (no ranks needed)

def _qad_conf(**changes):
    conf = OmegaConf.load(recipes.CONF_DIR / "qad" / "default.yaml")
    for k, v in changes.items():
        OmegaConf.update(conf, k, v, merge=False)
    return conf


@pytest.mark.parametrize("changes, message", [
    ({"data": []}, "qad.data is empty"),
    ({"data": [{"path": "x.jsonl", "weight": 0}]}, "qad.data[0].weight must be > 0"),
    ({"data": [{"path": "x.jsonl", "wieght": 1}]}, "qad.data[0] has unknown keys ['wieght']"),
    ({"tokens": 0}, "qad.tokens must be >= 1"),
    ({"global_batch_size": 0}, "qad.global_batch_size must be >= 1"),
    ({"lr_schedule": "step"}, "qad.lr_schedule must be one of constant, cosine, linear"),
    ({"min_lr": 1.0}, "qad.lr must be > 0 and min_lr in [0, lr]"),
    ({"max_seq_len": 1}, "qad.max_seq_len must be >= 2"),
])
def test_bad_options_are_one_line_errors(changes, message):
    with pytest.raises(UserError) as err:
        qad.options(_qad_conf(**changes))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_blend_keeps_the_shares_and_refuses_held_out_text(tmp_path, tiny_checkpoint):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_checkpoint))
    heldout = qad.heldout_texts("package:heldout.jsonl", 4)
    sources = [qad.Source("package:chat.jsonl", 0.6), qad.Source("package:calib.jsonl", 0.4)]
    picks = [pick for _, (pick, _) in zip(range(50), qad.Blend(sources, tok, 32, 0, heldout))]
    assert picks.count(0) == 30 and picks.count(1) == 20
    for n in range(1, 51):  # smooth: every prefix within one sample of its share
        assert abs(picks[:n].count(0) - 0.6 * n) <= 1
    # Same seed, same stream; another seed, another order.
    a = [x.tolist() for _, x in zip(range(6), (s for _, s in qad.Blend(sources, tok, 32, 0, heldout)))]
    b = [x.tolist() for _, x in zip(range(6), (s for _, s in qad.Blend(sources, tok, 32, 0, heldout)))]
    c = [x.tolist() for _, x in zip(range(6), (s for _, s in qad.Blend(sources, tok, 32, 1, heldout)))]
    assert a == b and a != c
    # A source that holds a held-out sample is refused when that row comes up.
    leaky = tmp_path / "leaky.jsonl"
    rows = [{"text": f"training text number {i}"} for i in range(3)] + [{"text": heldout[0]}]
    leaky.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(UserError, match="also held-out text"):
        for _ in zip(range(10), qad.Blend([qad.Source(str(leaky), 1.0)], tok, 32, 0, heldout)):
            pass


def test_conversations_are_rendered_with_the_chat_template(tiny_checkpoint):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_checkpoint))
    rows = calib.open_rows("package:chat.jsonl")
    blend = qad.Blend([qad.Source("package:chat.jsonl", 1.0)], tok, 10_000, 0, [])
    _, ids = next(iter(blend))
    text = tok.decode(ids[0])
    rendered = {calib.row_text(rows[i], tok) for i in range(len(rows))}
    assert text in rendered


def _plan_cfg(student, tmp_path, **changes):
    from hydra import compose, initialize_config_dir

    from hybridquant import schema

    schema.register()
    overrides = [f"checkpoint={student}", f"output_root={tmp_path}", *FAST]
    overrides += [f"{k}={v}" for k, v in changes.items()]
    with initialize_config_dir(config_dir=str(recipes.CONF_DIR), version_base="1.3"):
        return compose(config_name="qad", overrides=overrides)


def test_plan_counts_the_budget_and_refuses_bad_runs(qad_student, tmp_path):
    from hybridquant.stages import qad as stage

    p = stage.plan(_plan_cfg(qad_student, tmp_path), world_size=1)
    assert p.steps == 3 and p.step_tokens == [248, 248, 248] and p.samples_per_rank == 4
    assert math.isclose(sum(p.step_tokens), 744)
    with pytest.raises(UserError, match=r"qad.global_batch_size=3 is not a multiple of the data-parallel size 2"):
        stage.plan(_plan_cfg(qad_student, tmp_path, **{"qad.global_batch_size": 3}), world_size=2)
    with pytest.raises(UserError, match="is not a Hugging Face checkpoint directory"):
        stage.plan(_plan_cfg(qad_student, tmp_path, teacher=str(tmp_path)), world_size=1)
    with pytest.raises(UserError, match="does not exist"):
        stage.plan(_plan_cfg(tmp_path / "nothing", tmp_path), world_size=1)


def test_resume_refuses_a_run_directory_with_other_settings(tmp_path):
    from hybridquant.stages import qad as stage

    (tmp_path / stage.STATE).write_text(json.dumps({"qad": {"lr": 1.0}, "layout": {"tp": 1}}))
    with pytest.raises(UserError) as err:
        stage.check_resume(tmp_path, {"qad": {"lr": 2.0}, "layout": {"tp": 1}}, resume=True)
    assert "holds a qad run with other settings (qad)" in str(err.value)
    assert stage.check_resume(tmp_path, {"qad": {"lr": 2.0}}, resume=False) == 0


@pytest.mark.distributed
def test_a_bad_run_is_one_line_and_leaves_nothing(qad_student, tmp_path):
    proc = run_stage("qad", [f"checkpoint={qad_student}", f"output_root={tmp_path}", *FAST,
                             f"teacher={tmp_path}"])
    assert proc.returncode != 0
    assert error_lines(proc) == [f"error: [rank 0] UserError: teacher {tmp_path} is not a Hugging Face checkpoint directory "
                                 "(set teacher=<BF16 checkpoint>)"]
    assert not any(tmp_path.iterdir())


def test_release_preset_adds_qad_between_quantize_and_export(tmp_path):
    from hydra import compose, initialize_config_dir

    from hybridquant import release, schema

    schema.register()
    with initialize_config_dir(config_dir=str(recipes.CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="release", overrides=["experiment=tiny_qad"])
    stages = release.plan(cfg, tmp_path)
    assert [s.name for s in stages] == ["quantize", "qad", "export", "evaluate", "card"]
    quantize, qad_stage, export, evaluate, _ = stages
    assert f"checkpoint={tmp_path / 'quantize'}" in qad_stage.overrides
    assert "qad.data=[{path:'package:chat.jsonl',weight:0.6},{path:'package:calib.jsonl',weight:0.4}]" \
        in qad_stage.overrides
    assert f"hydra.run.dir={tmp_path / 'qad'}" in qad_stage.overrides and qad_stage.ranks == 1
    assert f"checkpoint={tmp_path / 'qad'}" in export.overrides
    assert f"checkpoints=[{tmp_path / 'quantize'},{tmp_path / 'qad'},{tmp_path / 'export'}]" in evaluate.overrides
    # The override strings are Hydra's: the qad stage composes them to the preset's values.
    from hydra import compose as compose_again

    with initialize_config_dir(config_dir=str(recipes.CONF_DIR), version_base="1.3"):
        qcfg = compose_again(config_name="qad", overrides=[o for o in qad_stage.overrides if not o.startswith("hydra.")])
    assert OmegaConf.to_container(qcfg.qad.data) == [{"path": "package:chat.jsonl", "weight": 0.6},
                                                     {"path": "package:calib.jsonl", "weight": 0.4}]
    assert qcfg.qad.lr == 3.0e-4 and qcfg.qad.tokens == 8000


def test_scales_are_frozen_unless_learned_and_learning_needs_lsq_parameters():
    """Calibrated amax are buffers (nothing to learn); amax parameters (ModelOpt's LSQ) train only on request."""
    model = torch.nn.Module()
    model.layer = torch.nn.Linear(2, 2)
    with pytest.raises(UserError, match="quantize with ModelOpt's LSQ algorithm"):
        qad.set_scales_trainable([model], learn=True)
    assert qad.set_scales_trainable([model], learn=False) == 0
    model.layer.weight_quantizer = torch.nn.Module()
    model.layer.weight_quantizer._amax_post = torch.nn.Parameter(torch.ones(2))
    assert qad.set_scales_trainable([model], learn=False) == 1
    assert not model.layer.weight_quantizer._amax_post.requires_grad and model.layer.weight.requires_grad
    assert qad.set_scales_trainable([model], learn=True) == 1 and model.layer.weight_quantizer._amax_post.requires_grad


def test_cuda_type_names_only_while_active():
    from hybridquant.compat import cpu

    t = torch.zeros(2)
    with cpu.cuda_type_names():
        assert t.type() == "torch.cuda.FloatTensor" and t.bfloat16().type() == "torch.cuda.BFloat16Tensor"
        assert t.type(torch.float64).dtype == torch.float64
    assert t.type() == "torch.FloatTensor"
