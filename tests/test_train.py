"""The trained tiny model: deterministic, cached under a key over its inputs, never trained on the
held-out text, and clearly better than the random model it starts from."""

from __future__ import annotations

import pytest
import yaml

from hybridquant import calib, source, train
from hybridquant.errors import UserError

SHORT = {"steps": 2, "batch_size": 2, "seq_len": 32, "eval_samples": 1}


def _model_cfg(repo, **train_cfg):
    cfg = yaml.safe_load((repo / "conf" / "model" / "tiny.yaml").read_text())
    return {**cfg, "name": "tiny_trained", "train": train_cfg}


def test_training_is_deterministic_cached_and_keyed_by_its_settings(repo, tmp_path):
    cfg = _model_cfg(repo, **SHORT)
    first = train.materialize(cfg, root=tmp_path / "a")
    second = train.materialize(cfg, root=tmp_path / "b")
    assert first.name == second.name
    assert (first / "model.safetensors").read_bytes() == (second / "model.safetensors").read_bytes()
    assert train.read_record(first)["train_losses"] == train.read_record(second)["train_losses"]
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert train.materialize(cfg, root=tmp_path / "a") == first  # cached: not trained again
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    assert not [p for p in (tmp_path / "a" / "models").iterdir() if p.name.startswith(".")]  # no staging left
    longer = _model_cfg(repo, **{**SHORT, "steps": 3})
    text = calib.resolve_path("package:calib.jsonl")
    digest = __import__("hashlib").sha256(text.read_bytes()).hexdigest()
    assert train.training_key(cfg["arch"], cfg["seed"], train.settings(longer["train"]), digest) != \
        train.training_key(cfg["arch"], cfg["seed"], train.settings(cfg["train"]), digest)
    with pytest.raises(UserError, match="unknown keys"):
        train.settings({"step": 3})


def test_training_refuses_the_heldout_text(tiny_checkpoint):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_checkpoint))
    with pytest.raises(UserError, match="shares .* samples with the held-out text"):
        train.token_stream(tokenizer, calib.resolve_path("package:heldout.jsonl"))


def test_trained_preset_predicts_far_better_than_the_random_model(repo):
    cfg = yaml.safe_load((repo / "conf" / "model" / "tiny_trained.yaml").read_text())
    tiny = yaml.safe_load((repo / "conf" / "model" / "tiny.yaml").read_text())
    model_cfg = {**tiny, **{k: v for k, v in cfg.items() if k != "defaults"}}
    record = train.read_record(source.resolve(model_cfg))
    print(f"held-out loss: random {record['heldout_loss_random']:.3f}, trained {record['heldout_loss_trained']:.3f}; "
          f"training {record['train_s']} s")
    assert record["heldout_loss_trained"] < 0.5 * record["heldout_loss_random"]
    assert record["train_loss_last"] < record["train_loss_first"] - 3


def test_train_and_evaluate_configs_compose(repo):
    from hydra import compose, initialize_config_dir

    from hybridquant import schema

    schema.register()
    with initialize_config_dir(config_dir=str(repo / "conf"), version_base="1.3"):
        cfg = compose("train")
        assert cfg.model.name == "tiny_trained" and cfg.model.train.steps > 0 and cfg.model.path is None
        assert cfg.model.arch == compose("quantize", overrides=["model=tiny"]).model.arch
        cfg = compose("evaluate", overrides=["model=tiny_trained", "checkpoints=[a,b]"])
        assert list(cfg.checkpoints) == ["a", "b"] and cfg.evaluation.path == "package:heldout.jsonl"
        assert compose("evaluate").model is None
