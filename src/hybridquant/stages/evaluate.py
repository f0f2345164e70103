"""The evaluate stage: quantized checkpoints vs their unquantized reference, on held-out text.

The reference is the Hugging Face checkpoint the quantize runs came from (``model=...``, else the
source recorded in the first quantize checkpoint), loaded through megatron-bridge at the requested
layout exactly as quantize loads it. Each quantized checkpoint is then scored against it
(``hybridquant.evaluate``):

* a quantize run (Megatron distributed checkpoint + ModelOpt state) is loaded at the same layout and
  run with its fake quantization: ``fake_quant`` (weights, activations and KV cache as calibrated)
  and/or ``weight_only`` (only the weight quantizers: the numerics an export holds);
* an exported ModelOpt-HF directory is dequantized into transformers' NemotronHForCausalLM
  (``hybridquant.readers``, one reader per export format) and run in one process (rank 0); the reference's outputs are gathered
  there for it.

Per-layer errors come from the pipeline stage that owns each layer; logits from the last stage.

Run directory ``runs/evaluate/<run_name>/``::

    config.yaml        the resolved configuration
    evaluation.png     per-layer relative L2 error of every checkpoint
    evaluation.json    every number (written last, atomically: its presence means the run completed)

Bad input (no checkpoints, a missing or incomplete one, a checkpoint of another model, evaluation
text that is the calibration or training text) is refused before any model is loaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from hybridquant import (calib, checkpoint, evaluate, evaluation_report, parallel, readers, recipes, reporting, rundir,
                         source)
from hybridquant.errors import UserError

log = logging.getLogger("hybridquant.evaluate")

MODES = ("fake_quant", "weight_only")
RESULT = "evaluation.json"
PLOT = "evaluation.png"
# Recipe options a quantize run may have changed from its recipe file; shown in the checkpoint's label.
LABEL_OPTIONS = ("kv_cache", "activations", "algorithm")


@dataclass
class Entry:
    """One quantized checkpoint to evaluate."""
    path: Path                # the checkpoint directory (Megatron) or the export directory
    kind: str                 # megatron | export
    label: str
    meta: dict[str, Any]      # checkpoint metadata (Megatron) or export manifest provenance
    run_dir: Path | None = None


@dataclass
class Plan:
    layout: parallel.Layout
    reference: Path           # HF checkpoint directory
    reference_name: str
    dtype: str
    spec: str
    pattern: str
    entries: list[Entry]
    modes: list[str]
    data: Path
    data_sha256: str
    notes: dict[str, Any] = field(default_factory=dict)


def plan(cfg: DictConfig, world_size: int | None = None) -> Plan:
    """Everything checked from files alone, before any process group exists."""
    paths = list(cfg.checkpoints or [])
    if not paths:
        raise UserError("no quantized checkpoints to evaluate: set checkpoints=[<quantize run dir or export dir>,...]")
    modes = list(cfg.evaluation.modes)
    if not modes or any(m not in MODES for m in modes):
        raise UserError(f"evaluation.modes={modes} must be a non-empty list of {', '.join(MODES)}")
    if cfg.evaluation.num_samples < 1 or cfg.evaluation.max_seq_len < 2:
        raise UserError("evaluation.num_samples must be >= 1 and evaluation.max_seq_len >= 2")
    entries = [_entry(str(f)) for p in paths for f in readers.expand(Path(p))]
    _unique_labels(entries)

    model_cfg = source.config_dict(cfg.model) if cfg.get("model") is not None else None
    if model_cfg is not None:
        model_cfg, hf_cfg = source.prepare(model_cfg)
        name, dtype, spec = model_cfg["name"], model_cfg["dtype"], model_cfg.get("spec", "auto")
        # None: materialised (or trained) after the checks, once
        reference = source.resolve(model_cfg) if hf_cfg is not None else None
    else:
        megatron = [e for e in entries if e.kind == "megatron"]
        if not megatron:
            raise UserError("exported checkpoints alone do not say where their reference is: set model=<preset> "
                            "(and model.path=<HF checkpoint> for a real model)")
        first = megatron[0].meta
        name, dtype, spec = first.get("model", "?"), first.get("dtype", "bfloat16"), "auto"
        reference = Path(first.get("source", ""))
        if not (reference / "config.json").is_file():
            raise UserError(f"the reference {reference} recorded in {megatron[0].path} no longer exists: set "
                            f"model=<preset> (and model.path=<HF checkpoint> for a real model)")

    for e in entries:
        if e.meta.get("model") not in (None, name):
            raise UserError(f"{e.path} is a checkpoint of model {e.meta['model']!r}, the reference is {name!r}")
    if reference is None:
        reference = source.resolve(model_cfg)
    ref_cfg = source.read_config(reference)
    for e in entries:
        try:
            source.check_identity({"name": name, "arch": {k: ref_cfg[k] for k in source.IDENTITY_FIELDS
                                                           if k in ref_cfg}}, _config_of(e))
        except UserError as exc:
            raise UserError(f"{e.path}: {exc}") from None

    layout = parallel.Layout(tp=cfg.parallel.tp, pp=cfg.parallel.pp, ep=cfg.parallel.ep, etp=cfg.parallel.etp,
                             world_size=world_size or parallel.world_size_from_env())
    parallel.validate(layout, source.architecture({"arch": {}}, ref_cfg))
    data = calib.resolve_path(cfg.evaluation.path)
    digest = hashlib.sha256(data.read_bytes()).hexdigest()
    _check_not_seen(digest, data, entries, reference)
    return Plan(layout=layout, reference=Path(reference), reference_name=name, dtype=dtype, spec=spec,
                pattern=ref_cfg["hybrid_override_pattern"], entries=entries, modes=modes, data=data,
                data_sha256=digest)


def _entry(path: str) -> Entry:
    given = Path(path)
    if not given.exists():
        raise UserError(f"checkpoint {given} does not exist")
    if readers.is_export(given):
        prov = readers.provenance(given)
        return Entry(path=given, kind="export", label=f"{prov.get('recipe') or given.name} ({readers.describe(given)})",
                     meta={"model": prov.get("model"), "recipe": prov.get("recipe")})
    directory = checkpoint.resolve(given)
    meta = checkpoint.read_metadata(directory)  # one-line error for anything that is not a checkpoint
    run_dir = directory.parent if directory.name == "checkpoint" else None
    return Entry(path=directory, kind="megatron", label=_label(meta, run_dir), meta=meta, run_dir=run_dir)


def _label(meta: dict, run_dir: Path | None) -> str:
    """The recipe's name, plus the options the quantize run changed from the recipe file."""
    name = meta.get("recipe") or "?"
    if meta.get("qad"):  # a distilled checkpoint: its recipe, after QAD
        return f"{name} + QAD ({meta['qad']['step']} steps)"
    report = _report(run_dir)
    recipe_file = recipes.CONF_DIR / "quant" / f"{name}.yaml"
    if not report or not recipe_file.is_file():
        return name
    declared = OmegaConf.to_container(OmegaConf.load(recipe_file))
    changed = [f"{k}={report['recipe'].get(k)}" for k in LABEL_OPTIONS
               if report["recipe"].get(k) != declared.get(k)]
    return " ".join([name, *changed])


def _report(run_dir: Path | None) -> dict | None:
    path = run_dir / "report.json" if run_dir else None
    return json.loads(path.read_text()) if path and path.is_file() else None


def _unique_labels(entries: list[Entry]) -> None:
    seen: dict[str, int] = {}
    for e in entries:
        seen[e.label] = seen.get(e.label, 0) + 1
        if seen[e.label] > 1:
            e.label = f"{e.label} #{seen[e.label]}"


def _config_of(e: Entry) -> dict:
    return source.read_config(checkpoint.hf_dir(e.path)) if e.kind == "megatron" else readers.config(e.path)


def _check_not_seen(digest: str, data: Path, entries: list[Entry], reference: Path) -> None:
    """The evaluation text must be neither a checkpoint's calibration text nor the model's training text."""
    for e in entries:
        report = _report(e.run_dir)
        if report and report.get("calibration", {}).get("sha256") == digest:
            raise UserError(f"evaluation.path {data} is the calibration text of {e.path}: use held-out text")
    training = Path(reference) / "TRAINING.json"
    if training.is_file():
        text = Path(json.loads(training.read_text()).get("text", ""))
        if text.is_file() and hashlib.sha256(text.read_bytes()).hexdigest() == digest:
            raise UserError(f"evaluation.path {data} is the text the reference model was trained on")


def samples(tokenizer, path: Path, n: int, max_len: int) -> list[torch.Tensor]:
    """The first ``n`` samples with at least 2 tokens, each [1, len] at its natural length (<= max_len)."""
    out = []
    for row in calib.read_jsonl(path):
        ids = tokenizer(row["text"], add_special_tokens=False)["input_ids"][:max_len]
        if len(ids) >= 2:
            out.append(torch.tensor([ids], dtype=torch.long))
        if len(out) == n:
            return out
    raise UserError(f"{path} has only {len(out)} usable samples, evaluation.num_samples={n}")


def megatron_outputs(chunks: list, batch: list[torch.Tensor], vocab: int) -> evaluate.Outputs:
    from hybridquant import forward

    with evaluate.LayerCapture(evaluate.megatron_layers(chunks), seq_first=True) as capture:
        logits = forward.run(chunks, batch, vocab)
    return evaluate.Outputs(logits=[None if x is None else x.float() for x in logits], layers=capture.outputs)


def score(ref: evaluate.Outputs, out: evaluate.Outputs, batch: list[torch.Tensor], pattern: str) -> dict:
    """Collective: token metrics from the last stage, layer errors from every stage, on every rank."""
    local = None if out.logits[0] is None else evaluate.token_metrics(ref.logits, out.logits, batch)
    tokens = parallel.from_any_rank(local)
    sums: dict[int, tuple[float, float]] = {}
    for part in _gather(evaluate.layer_sums(ref.layers, out.layers)):
        for index, value in part.items():
            sums.setdefault(index, value)  # TP/DP replicas hold the same layer's numbers
    return {**tokens, "layers": evaluate.layer_errors(sums, pattern)}


def _gather(obj) -> list:
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _to_main(obj) -> list:
    """Every rank's ``obj``, in rank order, on rank 0 (others get an empty list). Collective."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size() if parallel.is_main() else None
    dist.gather_object(obj, out, dst=0)
    return out or []


def _reference_on_main(ref: evaluate.Outputs) -> evaluate.Outputs | None:
    """Collective: the reference's logits (last stage) and every layer's outputs (each stage's own), on
    rank 0, which runs the exports; None elsewhere."""
    parts = _to_main((ref.logits if ref.logits[0] is not None else None, ref.layers))
    if not parallel.is_main():
        return None
    layers: dict[int, list] = {}
    for _, part in parts:
        for index, value in part.items():
            layers.setdefault(index, value)
    return evaluate.Outputs(logits=next(logits for logits, _ in parts if logits is not None), layers=layers)


def run(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from hybridquant import model

    t0 = time.perf_counter()
    p = plan(cfg)
    run_dir = Path(run_dir)
    parallel.init(p.layout, seed=cfg.seed, backend=cfg.cluster.backend, timeout_s=cfg.cluster.timeout_s)
    if parallel.is_main():
        rundir.prepare(run_dir, cfg, stale=(RESULT, PLOT))
    tokenizer = AutoTokenizer.from_pretrained(str(p.reference))
    batch = samples(tokenizer, p.data, cfg.evaluation.num_samples, cfg.evaluation.max_seq_len)
    timings: dict[str, float] = {}

    t = time.perf_counter()
    loaded = model.load_hf(str(p.reference), p.layout, p.dtype, p.spec)
    vocab = loaded.hf_vocab_size
    ref = megatron_outputs(loaded.chunks, batch, vocab)
    del loaded
    ref_ppl = parallel.from_any_rank(None if ref.logits[0] is None else evaluate.perplexity(ref.logits, batch))
    timings["reference_s"] = time.perf_counter() - t

    results = []
    ref_all = _reference_on_main(ref) if any(e.kind == "export" for e in p.entries) else None
    for e in p.entries:
        t = time.perf_counter()
        if e.kind == "megatron":
            loaded, _ = checkpoint.load_quantized(e.path, p.layout)
            for mode in p.modes:
                if mode == "weight_only":
                    with evaluate.weights_only(loaded.chunks):
                        out = megatron_outputs(loaded.chunks, batch, vocab)
                else:
                    out = megatron_outputs(loaded.chunks, batch, vocab)
                results.append(_result(e, mode, score(ref, out, batch, p.pattern)))
            del loaded
        else:
            results.append(_result(e, "export", _score_export(e, ref_all, batch, cfg, p.pattern)))
        timings[f"{e.label}_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t0

    record: dict[str, Any] = {}
    if parallel.is_main():
        record = _record(cfg, p, ref_ppl, results, batch, timings)
        if cfg.evaluation.plot:
            _write_plot(record, run_dir / PLOT)
        reporting.write_json_atomic(run_dir / RESULT, record)
        evaluation_report.print_table(record)
        print(f"evaluation: {run_dir / RESULT}" + (f", plot: {run_dir / PLOT}" if cfg.evaluation.plot else ""),
              flush=True)
        print(f"time: {timings['total_s']:.1f} s", flush=True)
    parallel.barrier()
    return record


def _score_export(e: Entry, ref: evaluate.Outputs, batch, cfg, pattern: str) -> dict | None:
    """Rank 0 runs the dequantized export in transformers; the others wait. Collective."""
    result = None
    if parallel.is_main():
        with tempfile.TemporaryDirectory(prefix="hybridquant-dequantized-") as work:
            hf_model, _ = readers.build_model(e.path, Path(work), max_seq_len=cfg.evaluation.max_seq_len)
        out = evaluate.hf_outputs(hf_model, batch)
        result = {**evaluate.token_metrics(ref.logits, out.logits, batch),
                  "layers": evaluate.layer_errors(evaluate.layer_sums(ref.layers, out.layers), pattern)}
        del hf_model
    return parallel.from_any_rank(result)


def _result(e: Entry, mode: str, scores: dict) -> dict:
    return {"label": e.label, "mode": mode, "kind": e.kind, "path": str(e.path), "recipe": e.meta.get("recipe"),
            **scores}


def _record(cfg, p: Plan, ref_ppl: dict, results: list, batch, timings: dict) -> dict[str, Any]:
    return {
        "stage": "evaluate",
        "model": p.reference_name,
        "reference": {"name": p.reference_name, "path": str(p.reference), "dtype": p.dtype, **ref_ppl},
        "pattern": "".join(_symbols(p.pattern)),
        "layout": {**reporting.layout_dict(p.layout), "tag": p.layout.tag},
        "data": {"path": str(p.data), "sha256": p.data_sha256, "samples": len(batch),
                 "tokens": sum(int(b.numel()) for b in batch), "positions": ref_ppl["positions"],
                 "max_seq_len": cfg.evaluation.max_seq_len},
        "modes": p.modes,
        "results": results,
        "timings_s": timings,
        "versions": reporting.versions(),
    }


def _symbols(pattern: str) -> str:
    from hybridquant import modules

    return modules.decoder_symbols(pattern)


def _write_plot(record: dict, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    evaluation_report.plot(record, tmp)
    os.replace(tmp, path)
