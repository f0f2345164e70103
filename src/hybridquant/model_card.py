"""The model card (README.md of each exported checkpoint), generated from what the release produced:

    python -m hybridquant.model_card <release dir>

model and source, the recipe as the recipe table prints it (module kind x format), the calibration
data, the evaluation table, and how to serve the export: vLLM and SGLang (ModelOpt), vLLM
(compressed-tensors), llama.cpp and Ollama (GGUF). One card per export directory (export/,
export_<format>/).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from omegaconf import OmegaConf

from hybridquant import evaluation_report, modules
from hybridquant.errors import UserError

CARD = "README.md"
# SGLang's name for ModelOpt checkpoints, by the export's quant_algo.
SGLANG_QUANTIZATION = {"FP8": "modelopt_fp8", "NVFP4": "modelopt_fp4", "MIXED_PRECISION": "modelopt_fp4"}


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"model card: cannot read {path} ({exc})") from exc


def recipe_markdown(quant: dict, model: dict) -> str:
    """The recipe table for this model (ModelOpt's own decisions, read back on the meta device)."""
    from hybridquant import parallel, recipe_table

    parallel.init(parallel.Layout(), seed=0, backend="gloo")
    try:
        return recipe_table.markdown(recipe_table.build(quant, model), per_layer=False)
    finally:
        parallel.shutdown()


def calibration_markdown(calib: dict, cfg: dict) -> str:
    lines = [f"- source: `{calib['source']}` (sha256 `{calib['sha256'][:16]}…`)",
             f"- {calib['samples']} samples, {calib['tokens']} tokens, at most {cfg['calib']['max_seq_len']} tokens "
             f"each, sampling seed {cfg['calib']['seed']}" + (", every token routed to every expert for statistics"
                                                               if calib.get("all_experts") else "")]
    if calib.get("domains"):
        tokens = calib.get("domain_tokens") or {}
        order = sorted(calib["domains"].items(), key=lambda kv: (-kv[1], kv[0]))
        if tokens:  # reports since per-domain tokens were recorded
            mix = ", ".join(f"{k} {v} ({tokens.get(k, 0):,} tokens)" for k, v in order)
            lines.append(f"- domains (samples, tokens): {mix}")
        else:
            lines.append(f"- domains (samples): {', '.join(f'{k} {v}' for k, v in order)}")
    return "\n".join(lines)


def usage_markdown(name: str, quant_algo: str) -> str:
    sglang = SGLANG_QUANTIZATION.get(quant_algo, "modelopt")
    return f"""```bash
# vLLM (reads hf_quant_config.json / quantization_config: quant_method modelopt)
vllm serve {name} --trust-remote-code --mamba_ssm_cache_dtype float32
# SGLang
python -m sglang.launch_server --model-path {name} --quantization {sglang} --trust-remote-code
```

Keep the Mamba SSM state cache in float32 (`--mamba_ssm_cache_dtype float32`): the recipe quantizes
GEMMs, not the recurrent state."""


def compressed_tensors_usage(name: str, quant: dict) -> str:
    kv = " --kv-cache-dtype fp8" if quant.get("kv_cache_scheme") else ""
    return f"""```bash
# vLLM (reads config.json: quantization_config, quant_method compressed-tensors)
vllm serve {name} --trust-remote-code --mamba_ssm_cache_dtype float32{kv}
```

Keep the Mamba SSM state cache in float32 (`--mamba_ssm_cache_dtype float32`): the recipe quantizes
GEMMs, not the recurrent state."""


def gguf_types(manifest: dict) -> list[str]:
    """The GGUF types in the order they were asked for (the first is the Modelfile's)."""
    return manifest["quantization"].split(",")


def gguf_usage(name: str, manifest: dict) -> str:
    first = manifest["gguf"][gguf_types(manifest)[0]]["file"]
    return f"""```bash
# llama.cpp
llama-cli -m {first} -cnv
llama-server -m {first} --port 8080
# Ollama (Modelfile: this file, the ChatML template, stop at <|im_end|>)
ollama create {name} -f Modelfile && ollama run {name}
```"""


def gguf_markdown(export_dir: Path, manifest: dict) -> str:
    lines = ["| type | file | size (MiB) | tensors by GGML type (llama.cpp's choice) |", "|---|---|---|---|"]
    for gguf_type in gguf_types(manifest):
        entry = manifest["gguf"][gguf_type]
        size = manifest["files"][entry["file"]]["bytes"] / 2**20
        types = ", ".join(f"{k} {v}" for k, v in entry["tensor_types"].items())
        lines.append(f"| {gguf_type} | `{entry['file']}` | {size:.1f} | {types} |")
    return "\n".join(lines) + "\n\n" + "\n".join(f"{n}." for n in manifest.get("notes", []))


def format_facts(export_dir: Path, name: str) -> dict:
    """What the card says about one export: its format line, tags, exclusions and serving commands."""
    manifest = _read_json(export_dir / "manifest.json")
    fmt = manifest.get("export_format", "modelopt")
    if fmt == "modelopt":
        hf_quant = _read_json(export_dir / "hf_quant_config.json")["quantization"]
        excluded = hf_quant.get("exclude_modules", [])
        return {"format": "Hugging Face safetensors in ModelOpt format (`hf_quant_config.json`, `config.json: "
                          "quantization_config`)",
                "tag": "modelopt", "algo": hf_quant["quant_algo"] + (", FP8 KV cache"
                                                                    if hf_quant.get("kv_cache_quant_algo") else ""),
                "excluded": excluded, "usage": usage_markdown(name, hf_quant["quant_algo"]), "extra": ""}
    if fmt == "compressed_tensors":
        quant = _read_json(export_dir / "config.json")["quantization_config"]
        return {"format": f"Hugging Face safetensors in compressed-tensors format (`{quant['format']}`, "
                          f"compressed-tensors {quant.get('version')})",
                "tag": "compressed-tensors", "algo": manifest["quantization"], "excluded": quant.get("ignore", []),
                "usage": compressed_tensors_usage(name, quant), "extra": ""}
    return {"format": "GGUF for llama.cpp and Ollama (" + ", ".join(gguf_types(manifest)) + ")", "tag": "gguf",
            "algo": "GGUF " + ", ".join(gguf_types(manifest)), "excluded": [], "usage": gguf_usage(name, manifest),
            "extra": "## Files\n\n" + gguf_markdown(export_dir, manifest) + "\n\n"}


def render(release_dir: Path, export_name: str = "export") -> str:
    release_dir = Path(release_dir)
    qcfg = OmegaConf.to_container(OmegaConf.load(release_dir / "quantize" / "config.yaml"), resolve=True)
    report = _read_json(release_dir / "quantize" / "report.json")
    evaluation = _read_json(release_dir / "evaluate" / "evaluation.json")
    facts = format_facts(release_dir / export_name, release_dir.name)
    from hybridquant import readers

    hf_config = readers.config(release_dir / export_name)
    model, quant = qcfg["model"], qcfg["quant"]
    if report.get("stage") == "autoquant":  # the per-layer recipe it chose, not its base recipe
        quant = report["recipe"]
    name = release_dir.name
    pattern = hf_config.get("hybrid_override_pattern", "")
    kinds = modules.decoder_symbols(pattern) if pattern else ""
    counts = ", ".join(f"{kinds.count(s)} {label}" for s, label in (("M", "Mamba-2"), ("E", "MoE"), ("*", "attention"),
                                                                   ("-", "MLP")) if kinds.count(s))
    layout = report["layout"]
    if facts["tag"] == "gguf":
        intro = (f"{model['name']} in GGUF for llama.cpp and Ollama ({facts['algo'].removeprefix('GGUF ')}), each type "
                 f"quantized by llama.cpp's own quantizer from the checkpoint's weights. The release's ModelOpt recipe "
                 f"`{quant['name']}` is in its other exports: its calibrated FP8/NVFP4 scales have no GGUF type.")
        sections = f"{qad_markdown(release_dir)}{facts['extra']}"
    else:
        intro = (f"{model['name']} quantized with NVIDIA ModelOpt post-training quantization, recipe `{quant['name']}`\n"
                 f"({facts['algo']}).\n{quant.get('description', '').strip()}")
        excluded = ", ".join(f"`{m}`" for m in facts["excluded"][:12]) or "none"
        sections = (f"## Recipe\n\n{recipe_markdown(quant, model)}\n\n{qad_markdown(release_dir)}Excluded from "
                    f"quantization (BF16/FP32): {excluded}{' …' if len(facts['excluded']) > 12 else ''}\n\n"
                    f"## Calibration data\n\n{calibration_markdown(report['calibration'], qcfg)}\n")
    return f"""---
library_name: transformers
base_model: {model.get('path') or model['name']}
tags: [nemotron-h, mamba, moe, {facts['tag']}, {quant_algo_tag(facts['algo'].split(',')[0].split(' + ')[0])}]
---

# {name}

{intro}

## Model

- source checkpoint: `{model.get('path') or model['name'] + ' (embedded, built from conf/model)'}`
- architecture: Nemotron-H hybrid, {len(kinds)} layers ({counts}), hidden size {hf_config.get('hidden_size')},
  {hf_config.get('n_routed_experts', '-')} routed experts (top-{hf_config.get('num_experts_per_tok', '-')})
- format: {facts['format']}
- calibrated at TP{layout['tp']} PP{layout['pp']} EP{layout['ep']} ETP{layout['etp']} ({layout['world_size']} rank{'s' if layout['world_size'] > 1 else ''})

{sections}
## Evaluation

{evaluation_report.markdown(evaluation)}

## Usage

{facts['usage']}

## Reproduce

The release directory this checkpoint was exported into (`runs/release/{name}/`) holds `release.json`:
the resolved configuration, package versions, git commit, seeds, calibration data sha256 and the
sha256 of every file of the release (this one included). `python pipeline/verify.py runs/release/{name}`
re-hashes a copy against it; `python pipeline/release.py experiment=<experiment>` rebuilds it.
"""


def qad_markdown(release_dir: Path) -> str:
    """The distillation the checkpoint went through after quantization (nothing without a qad stage)."""
    path = Path(release_dir) / "qad" / "report.json"
    if not path.is_file():
        return ""
    r = _read_json(path)
    s, before, after = r["settings"], r["heldout"]["before"], r["heldout"]["after"]
    data = ", ".join(f"`{d['path']}` ({d.get('weight', 1)})" for d in s["data"])
    return (f"After calibration the quantized model was trained by quantization-aware distillation (QAD) from the "
            f"BF16 source: {r['steps']} steps of {r['global_batch_size']} samples ({r['tokens']} tokens of {data}), "
            f"logit KL (ModelOpt), LR {s['lr']} {s['lr_schedule']}, "
            f"{'scales learned (LSQ)' if r.get('learned_scales') else 'scales as calibrated'}. Held-out KL to the "
            f"source {before['kl_mean']:.4g} -> {after['kl_mean']:.4g}, perplexity {before['perplexity']:.3f} -> "
            f"{after['perplexity']:.3f} (source {after['teacher_perplexity']:.3f}).\n\n")


def quant_algo_tag(algo: str) -> str:
    return algo.lower().replace("_", "-").replace(" ", "-")


def export_dirs(release_dir: Path) -> list[str]:
    """The release's export directories (export/, export_<format>/), each with its manifest."""
    return sorted(p.name for p in Path(release_dir).iterdir()
                  if p.is_dir() and (p.name == "export" or p.name.startswith("export_")) and (p / "manifest.json").is_file())


def write(release_dir: Path) -> list[Path]:
    paths = []
    for name in export_dirs(release_dir):
        text = render(release_dir, name)
        path = Path(release_dir) / name / CARD
        tmp = path.with_name(f".{CARD}.tmp")
        tmp.write_text(text)
        tmp.replace(path)
        paths.append(path)
    if not paths:
        raise UserError(f"model card: {release_dir} has no export directory")
    return paths


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m hybridquant.model_card <release dir>", file=sys.stderr)
        return 2
    try:
        paths = write(Path(argv[0]))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for path in paths:
        print(f"model card: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
