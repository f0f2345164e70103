"""The evaluate stage run as users run it (torchrun, 2 pipeline stages) on the trained tiny model: a
quantize run and its export scored against the unquantized reference in one process; the recipes'
expected ordering; an export evaluates like its checkpoint's weight-only numerics; bad input."""

from __future__ import annotations

import json
import math
import shutil

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from hybridquant import schema
from hybridquant.errors import UserError
from launch import error_lines, run_python, run_stage

pytestmark = pytest.mark.distributed
schema.register()

TRAINED = "model=tiny_trained"
CALIB = ("calib.num_samples=4", "calib.max_seq_len=64")
FP8 = ("mamba_moe_fp8_conservative", TRAINED, *CALIB)
EVAL = ("evaluation.num_samples=4", "evaluation.max_seq_len=64")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def evaluated(exported, tmp_path_factory):
    """One quantize run, its export, and one evaluation of both at PP2 (fake-quant and weight-only)."""
    run_dir, export_dir, _ = exported(*FP8)
    _, ct_dir, _ = exported(*FP8, export_args=("export.format=compressed_tensors",))
    _, gguf_dir, _ = exported(*FP8, export_args=("export.format=gguf", "export.options.gguf.types=[Q8_0]"))
    root = tmp_path_factory.mktemp("evaluate")
    proc = run_stage("evaluate", [f"checkpoints=[{run_dir},{export_dir},{ct_dir},{gguf_dir}]", TRAINED,
                                  f"output_root={root}",
                                  "parallel.pp=2", "evaluation.modes=[fake_quant,weight_only]", *EVAL], nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = root / "evaluate" / "tiny_trained-tp1pp2ep1etp1"
    return json.loads((out / "evaluation.json").read_text()), out, proc, run_dir


def _rows(record):
    return {(r["label"], r["mode"]): r for r in record["results"]}


def test_evaluate_stage_writes_json_plot_and_prints_the_table(evaluated):
    from hybridquant import evaluation_report

    record, out, proc, _ = evaluated
    assert record["layout"]["pp"] == 2 and record["model"] == "tiny_trained"
    assert sorted(_rows(record)) == [("mamba_moe_fp8_conservative", "fake_quant"),
                                     ("mamba_moe_fp8_conservative", "weight_only"),
                                     ("mamba_moe_fp8_conservative (GGUF Q8_0)", "export"),
                                     ("mamba_moe_fp8_conservative (compressed-tensors export)", "export"),
                                     ("mamba_moe_fp8_conservative (export)", "export")]
    pattern = record["pattern"]
    for r in record["results"]:
        # Every layer, from both pipeline stages, under its global number and kind.
        assert [(x["layer"], x["kind"]) for x in r["layers"]] == list(enumerate(pattern))
        assert 0 < r["kl_mean"] <= r["kl_p99"] <= r["kl_max"] and 0.5 < r["top1_agreement"] <= 1
        assert r["positions"] == record["data"]["tokens"]
    fake = _rows(record)[("mamba_moe_fp8_conservative", "fake_quant")]
    # The recipe keeps Mamba in high precision: a leading Mamba layer is exact, every MoE layer is not.
    first = pattern.index("E")
    assert all(x["rel_l2"] == 0 for x in fake["layers"][:first])
    assert all(x["rel_l2"] > 0 for x in fake["layers"] if x["kind"] == "E")
    # The trained reference predicts the held-out text far better than chance (vocabulary 512).
    assert record["reference"]["perplexity"] < 30
    assert (out / "evaluation.png").read_bytes()[:8] == PNG_MAGIC
    assert (out / "config.yaml").is_file()
    assert "evaluation of tiny_trained (layout tp1_pp2_ep1)" in proc.stdout
    assert "mamba_moe_fp8_conservative (export)" in proc.stdout and "weights only" in proc.stdout
    md = evaluation_report.markdown(record, per_layer=True)
    assert md.startswith("| checkpoint | numerics | KL mean |")
    assert "| tiny_trained (reference) |" in md and "| 0 M |" in md


def test_export_evaluates_like_its_checkpoint_with_weight_quantizers_only(evaluated):
    """An export holds quantized weights only (a serving engine quantizes activations itself): its
    dequantized weights in transformers must score like the Megatron checkpoint with only its weight
    quantizers on, to float rounding of two implementations."""
    record, *_ = evaluated
    rows = _rows(record)
    weights = rows[("mamba_moe_fp8_conservative", "weight_only")]
    for label in ("export", "compressed-tensors export"):  # the same FP8 weights in two formats
        export = rows[(f"mamba_moe_fp8_conservative ({label})", "export")]
        for key in ("kl_mean", "kl_p99", "kl_max", "perplexity"):
            assert export[key] == pytest.approx(weights[key], rel=1e-3, abs=1e-6), (label, key)
        assert abs(export["top1_agreement"] - weights["top1_agreement"]) <= 1 / export["positions"]
        for a, b in zip(export["layers"], weights["layers"]):
            assert a["rel_l2"] == pytest.approx(b["rel_l2"], rel=1e-3, abs=1e-5), (label, a["layer"])
    # GGUF Q8_0 is llama.cpp's quantization of every linear, not the recipe's: scored, and close to BF16.
    gguf = rows[("mamba_moe_fp8_conservative (GGUF Q8_0)", "export")]
    print(f"GGUF Q8_0 of the trained tiny model: KL {gguf['kl_mean']:.2e}, top-1 {gguf['top1_agreement']:.3f}")
    assert 0 < gguf["kl_mean"] < 0.05 and gguf["top1_agreement"] > 0.9


def _compose(repo, recipe, *overrides):
    with initialize_config_dir(config_dir=str(repo / "conf"), version_base="1.3"):
        return compose("quantize", overrides=[f"+quant={recipe}", TRAINED, *CALIB, *overrides])


def test_recipes_order_by_kl_and_evaluation_is_deterministic_and_layout_free(repo, evaluated, world1):
    """On the trained model: FP8 conservative < FP8 aggressive < NVFP4 aggressive, and NVFP4 with MSE
    weight block scales < NVFP4 with max scales. Calibrated in this process by the quantize stage's own
    code; the FP8 checkpoint of the stage run scores as the 2-stage evaluation did (deterministic, layout-free)."""
    from transformers import AutoTokenizer

    from hybridquant import checkpoint, evaluate, model, source
    from hybridquant.stages import evaluate as stage
    from hybridquant.stages import quantize

    record, _, _, run_dir = evaluated
    cfg = _compose(repo, "mamba_moe_fp8_conservative")
    reference = source.resolve(OmegaConf.to_container(cfg.model, resolve=True))
    tokenizer = AutoTokenizer.from_pretrained(str(reference))
    batch = stage.samples(tokenizer, stage.calib.resolve_path("package:heldout.jsonl"), 4, 64)
    loaded = model.load_hf(str(reference), world1, "float32", "auto")
    vocab = loaded.hf_vocab_size
    ref = stage.megatron_outputs(loaded.chunks, batch, vocab)

    def kl_of(chunks):
        return evaluate.token_metrics(ref.logits, stage.megatron_outputs(chunks, batch, vocab).logits, batch)

    saved, _ = checkpoint.load_quantized(run_dir / "checkpoint", world1)
    first, again = kl_of(saved.chunks), kl_of(saved.chunks)
    assert first == again
    staged = _rows(record)[("mamba_moe_fp8_conservative", "fake_quant")]
    for key in ("kl_mean", "kl_max", "top1_agreement", "perplexity"):
        assert first[key] == pytest.approx(staged[key], rel=1e-6), key

    kl = {"fp8_conservative": first["kl_mean"]}
    for name, recipe, overrides in [("fp8_aggressive", "mamba_moe_fp8_aggressive", ()),
                                    ("nvfp4_aggressive", "mamba_moe_nvfp4_aggressive", ()),
                                    ("nvfp4_aggressive_mse", "mamba_moe_nvfp4_aggressive", ("quant.algorithm=mse",))]:
        cfg = _compose(repo, recipe, *overrides)
        calibrated = quantize.calibrate(cfg, quantize.plan(cfg, world1))
        kl[name] = kl_of(calibrated.loaded.chunks)["kl_mean"]
    print("KL mean per recipe:", {k: f"{v:.3e}" for k, v in kl.items()})
    assert kl["fp8_conservative"] < kl["fp8_aggressive"] < kl["nvfp4_aggressive"]
    assert kl["nvfp4_aggressive_mse"] < kl["nvfp4_aggressive"]


def _eval_cfg(repo, *overrides):
    with initialize_config_dir(config_dir=str(repo / "conf"), version_base="1.3"):
        return compose("evaluate", overrides=list(overrides))


def test_bad_input_is_refused_before_anything_is_loaded(repo, quantized, tmp_path):
    from hybridquant.stages import evaluate as stage

    run_dir = quantized(*FP8)
    cases = {
        "no quantized checkpoints": ("checkpoints=[]",),
        "does not exist": (f"checkpoints=[{tmp_path / 'nowhere'}]",),
        "is a checkpoint of model 'tiny_trained', the reference is 'tiny'": (f"checkpoints=[{run_dir}]", "model=tiny"),
        "is the calibration text": (f"checkpoints=[{run_dir}]", "evaluation.path=package:calib.jsonl"),
        "evaluation.modes": (f"checkpoints=[{run_dir}]", "evaluation.modes=[int4]"),
    }
    other = tmp_path / "other"  # this checkpoint's files, the config of a wider model
    shutil.copytree(run_dir / "checkpoint", other)
    config = json.loads((other / "hf" / "config.json").read_text())
    config["hidden_size"] = 64
    (other / "hf" / "config.json").write_text(json.dumps(config))
    cases["hidden_size is 64"] = (f"checkpoints=[{other}]", TRAINED)
    export = tmp_path / "export"  # an export's marker files: its reference cannot be found from it
    export.mkdir()
    for name in ("hf_quant_config.json", "model.safetensors.index.json"):
        (export / name).write_text("{}")
    cases["exported checkpoints alone"] = (f"checkpoints=[{export}]",)
    for expected, overrides in cases.items():
        with pytest.raises(UserError, match=expected.replace("(", r"\(").replace(")", r"\)")):
            stage.plan(_eval_cfg(repo, *overrides), world_size=1)


def test_bad_input_is_one_line_error_and_no_evaluation(quantized, tmp_path):
    proc = run_python("pipeline/evaluate.py", [f"checkpoints=[{quantized(*FP8)},{tmp_path / 'nowhere'}]",
                                                f"output_root={tmp_path}"])
    errors = error_lines(proc)
    assert proc.returncode != 0 and len(errors) == 1 and "does not exist" in errors[0], proc.stderr[-2000:]
    assert not list(tmp_path.rglob("evaluation.json")) and not (tmp_path / "evaluate").exists()


def test_markdown_table_has_one_row_per_result():
    from hybridquant import evaluation_report

    layers = [{"layer": 0, "kind": "M", "rel_l2": 0.0}, {"layer": 1, "kind": "E", "rel_l2": 0.02}]
    record = {"model": "m", "pattern": "ME", "layout": {"tag": "tp1_pp1_ep1"},
              "reference": {"name": "m", "dtype": "bfloat16", "perplexity": 4.0},
              "data": {"samples": 2, "positions": 10, "path": "/x/heldout.jsonl", "max_seq_len": 8},
              "results": [{"label": "a|b", "mode": "fake_quant", "kl_mean": 1e-4, "kl_p99": 0.01, "kl_max": 0.1,
                           "top1_agreement": 0.9, "perplexity": 4.4, "layers": layers}]}
    lines = evaluation_report.markdown(record).splitlines()
    assert lines[2].startswith("| m (reference) | bfloat16 |")
    assert lines[3] == ("| a\\|b | weights + activations | 1.00e-04 | 0.0100 | 0.1000 | 0.900 | 4.400 | +10.00% "
                        "| 1 E 0.020 |")
    assert math.isclose(record["results"][0]["perplexity"] / 4.0, 1.1)
