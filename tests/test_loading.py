"""Strict loading of Hugging Face checkpoints: every stored tensor is taken by a mapping, every Megatron
parameter comes from the checkpoint, in every spelling transformers itself reads; unreadable files
and generic checkpoints (``model=auto``); the MoE router's precision on bfloat16 models."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file, save_file

import variants
from hybridquant import hf_reference, model, schema
from hybridquant.errors import UserError

schema.register()

IDS = torch.tensor([[11, 57, 98, 200, 3, 77, 140, 9, 31, 250, 64, 12]])


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A checkpoint as transformers' save_pretrained writes it (``backbone.embedding.weight``)."""
    return variants.write(tmp_path_factory.mktemp("saved") / "nemotron-h-finetune", seed=11)


def _megatron_logits(path, layout, dtype="float32"):
    from hybridquant import forward

    loaded = model.load_hf(str(path), layout, dtype, "local")
    return forward.run(loaded.chunks, [IDS], loaded.hf_vocab_size)[0]


def _rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _rewrite(src, dst, change):
    """A copy of checkpoint ``src`` whose tensors ``change(dict)`` edits."""
    shutil.copytree(src, dst)
    state = load_file(str(dst / "model.safetensors"))
    save_file(change(state), str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_checkpoint_saved_by_transformers_loads_every_tensor(saved, world1):
    # Before strict loading, this name left the Megatron embeddings random (logits rel. error ~1).
    assert "backbone.embedding.weight" in load_file(str(saved / "model.safetensors"))
    ref = hf_reference.logits(hf_reference.load(saved, IDS.shape[1]), IDS)
    assert _rel(_megatron_logits(saved, world1), ref) < 1e-4


def test_every_spelling_transformers_reads_loads_the_same(saved, world1, tmp_path):
    """``model.`` prefix, Hub ``embeddings`` name, fused 3-D expert tensors: the same model."""
    import re

    def respell(state):
        out, fused = {}, {}
        for k, v in state.items():
            m = re.match(r"backbone\.(layers\.\d+\.mixer\.experts)\.(\d+)\.(up_proj|down_proj)\.weight$", k)
            if m:
                fused.setdefault(f"model.{m[1]}.{m[3]}", {})[int(m[2])] = v
            else:
                out[k.replace("backbone.embedding.", "model.embeddings.").replace("backbone.", "model.")] = v
        out.update({k: torch.stack([v[i] for i in sorted(v)]) for k, v in fused.items()})
        return out

    respelled = _rewrite(saved, tmp_path / "respelled", respell)
    names = set(load_file(str(respelled / "model.safetensors")))
    assert "model.embeddings.weight" in names and "model.layers.1.mixer.experts.up_proj" in names
    assert torch.equal(_megatron_logits(respelled, world1), _megatron_logits(saved, world1))


def test_a_tensor_no_mapping_takes_is_an_error(saved, world1, tmp_path):
    extra = _rewrite(saved, tmp_path / "extra", lambda s: {**s, "backbone.layers.0.mixer.scale_extra": torch.ones(3)})
    with pytest.raises(UserError, match=r"1 tensor\(s\) of the checkpoint are used by no Megatron parameter "
                                        r"\(backbone\.layers\.0\.mixer\.scale_extra\)"):
        model.load_hf(str(extra), world1, "float32", "local")


def test_a_parameter_without_tensor_is_an_error(saved, world1, tmp_path):
    missing = _rewrite(saved, tmp_path / "missing",
                       lambda s: {k: v for k, v in s.items() if k != "backbone.layers.2.mixer.D"})
    with pytest.raises(UserError, match=r"1 Megatron parameter\(s\) have no tensor in the checkpoint "
                                        r"\(decoder\.layers\.2\.mixer\.D\)"):
        model.load_hf(str(missing), world1, "float32", "local")


def test_two_spellings_of_one_tensor_are_an_error(saved, world1, tmp_path):
    both = _rewrite(saved, tmp_path / "both",
                    lambda s: {**s, "backbone.embeddings.weight": s["backbone.embedding.weight"].clone()})
    with pytest.raises(UserError, match="two spellings of 'backbone.embeddings.weight'"):
        model.load_hf(str(both), world1, "float32", "local")


@pytest.mark.parametrize("damage", ["header", "data", "index_file", "index_tensor"])
def test_unreadable_weights_name_the_file(saved, world1, tmp_path, damage):
    broken = tmp_path / "broken"
    shutil.copytree(saved, broken)
    weights = broken / "model.safetensors"
    blob = weights.read_bytes()
    if damage == "header":
        weights.write_bytes(blob[:20])
    elif damage == "data":
        weights.write_bytes(blob[: len(blob) - 1000])
    else:
        names = list(load_file(str(weights)))
        weight_map = {n: "model.safetensors" for n in names}
        if damage == "index_file":
            weight_map[names[0]] = "model-00002-of-00002.safetensors"
        else:
            weight_map["backbone.layers.0.mixer.not_there"] = "model.safetensors"
        (broken / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(UserError) as info:
        model.load_hf(str(broken), world1, "float32", "local")
    message = str(info.value)
    assert "\n" not in message
    expected = {"header": f"{weights} is not a readable safetensors file (truncated or corrupt",
                "data": f"{weights} is not a readable safetensors file (truncated or corrupt",
                "index_file": f"{broken / 'model-00002-of-00002.safetensors'} is missing",
                "index_tensor": f"{weights} lacks tensors its model.safetensors.index.json lists there"}[damage]
    assert message.startswith(expected), message


def test_router_runs_in_fp32_on_a_bfloat16_model(tiny_checkpoint, world1):
    """No recipe option (router_dtype: null) keeps megatron-bridge's Nemotron-H setting: FP32 routing,
    as transformers and vLLM do, even when the model computes in bfloat16."""
    from hybridquant import forward

    loaded = model.load_hf(str(tiny_checkpoint), world1, "bfloat16", "local", router_dtype=None)
    assert loaded.provider.moe_router_dtype == "fp32"
    seen = []
    routers = [m for n, m in loaded.module.named_modules() if n.endswith("mlp.router")]
    hooks = [r.register_forward_hook(lambda mod, args, out: seen.append(out[0].dtype)) for r in routers]
    try:
        forward.run(loaded.chunks, [IDS], loaded.hf_vocab_size)
    finally:
        for h in hooks:
            h.remove()
    assert len(seen) == len(routers) == 5 and set(seen) == {torch.float32}


# --- model=auto ------------------------------------------------------------------------------

def _compose(repo, *overrides):
    with initialize_config_dir(config_dir=str(repo / "conf"), version_base="1.3"):
        return compose("quantize", overrides=["+quant=mamba_moe_fp8_conservative", *overrides])


def test_model_auto_takes_the_architecture_from_the_checkpoint(repo, tmp_path):
    from hybridquant.stages import quantize

    path = variants.write(tmp_path / "my-nemotron", {"hybrid_override_pattern": "*EM-", "n_routed_experts": 6},
                          dtype="bfloat16")
    cfg = _compose(repo, "model=auto", f"model.path={path}", "parallel.ep=2")
    p = quantize.plan(cfg, layout=quantize.layout_from(cfg, world_size=2))
    assert p.pattern == "*EM-"
    assert p.model_cfg["name"] == "my-nemotron" and p.model_cfg["dtype"] == "bfloat16"
    assert cfg.run_name == "my-nemotron-mamba_moe_fp8_conservative-tp1pp1ep2etp1"
    # layouts are checked against the checkpoint's architecture
    cfg = _compose(repo, "model=auto", f"model.path={path}", "parallel.ep=4")
    with pytest.raises(UserError, match="ep=4 does not divide n_routed_experts=6"):
        quantize.plan(cfg, layout=quantize.layout_from(cfg, world_size=4))


def test_named_model_refuses_another_checkpoint_and_says_how(repo, saved):
    from hybridquant.stages import quantize

    other = saved.parent / "other"
    if not other.exists():
        variants.write(other, {"hybrid_override_pattern": "ME*E"})
    with pytest.raises(UserError, match=r"checkpoint is not tiny: hybrid_override_pattern is 'ME\*E'.*model=auto"):
        quantize.plan(_compose(repo, f"model.path={other}"), layout=None)


def test_model_auto_needs_a_path(repo):
    from hybridquant.stages import quantize

    with pytest.raises(UserError, match=r"model.path must be set \(model=auto needs model.path="):
        quantize.plan(_compose(repo, "model=auto"))


def test_unreadable_weights_are_refused_before_any_process_group(repo, saved, tmp_path):
    """Planning (before torchrun's ranks create their process groups, so before anything is written)
    opens every weight file: a truncated checkpoint leaves no run directory behind."""
    from hybridquant.stages import quantize

    broken = tmp_path / "truncated"
    shutil.copytree(saved, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4096])
    with pytest.raises(UserError, match=f"{weights} is not a readable safetensors file"):
        quantize.plan(_compose(repo, "model=auto", f"model.path={broken}"))
