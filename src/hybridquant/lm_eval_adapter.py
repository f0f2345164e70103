"""lm-evaluation-harness (EleutherAI ``lm_eval``) over an exported checkpoint.

Two backends evaluate the directory ``pipeline/export.py`` writes (ModelOpt's Hugging Face format):

* ``hf`` (CPU, or any machine without vLLM): the checkpoint is read by ``hybridquant.readers``
  (safetensors; FP8: ``weight · weight_scale``; NVFP4: E2M1 codes · per-16 block scale ·
  ``weight_scale_2``), loaded into transformers' ``NemotronHForCausalLM``, which lm_eval's own
  ``HFLM`` then drives (loglikelihood, loglikelihood_rolling, generate_until). This measures the
  exported *weights*; activations and the KV cache stay in float32 (their quantization happens in
  the serving engine).
* ``vllm`` (GPU clusters): lm_eval's vLLM backend loads the export as vLLM serves it
  (``quantization="modelopt"``, ``"modelopt_fp4"`` for NVFP4: FP8/NVFP4 GEMMs, FP8 KV cache where
  exported, Mamba SSM cache in float32), i.e. the deployment.

The model is registered with lm_eval as ``hybridquant-export`` (``pretrained=<export dir>``).

``continuation`` is a small multiple-choice task shipped with the project (conf/lm_eval/): a piece of
held-out corpus text and four candidate continuations of it, one the real one, the others the text
at the same offset of other held-out samples. It needs no download; ``build_continuation_rows``
regenerates its data file from the corpus.
"""

from __future__ import annotations

import json
import random
import tempfile
from pathlib import Path
from typing import Any

import torch

from hybridquant.errors import UserError

REPO = Path(__file__).resolve().parents[2]
TASK_DIR = REPO / "conf" / "lm_eval"
TASK_DATA = Path(__file__).resolve().parent / "data" / "lm_eval" / "continuation.jsonl"
MODEL_NAME = "hybridquant-export"


# --- reading an export --------------------------------------------------------------------------

def check_export(directory: Path) -> Path:
    """The export directory, or a one-line error saying why it is not one."""
    from hybridquant import readers

    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"export directory not found: {directory}")
    fmt = readers.format_of(directory)
    if fmt == "gguf":
        raise UserError(f"{directory} is a GGUF export: lm-eval-harness runs Hugging Face exports (modelopt, "
                        f"compressed_tensors); score GGUF files with pipeline/evaluate.py or llama.cpp")
    if fmt is None:
        for name in ("config.json", "model.safetensors.index.json", "hf_quant_config.json"):
            if not (directory / name).is_file():
                raise UserError(f"{directory} is not an export of pipeline/export.py (no {name})")
        raise UserError(f"{directory} is not an export of pipeline/export.py")
    return directory


def load_model(directory: Path, max_length: int = 2048, dtype: torch.dtype = torch.float32):
    """(transformers NemotronHForCausalLM with the export's dequantized weights, its tokenizer), through
    the package's independent reader of exports (``hybridquant.readers``: safetensors and the
    published format, transformers' own name mapping, strict loading)."""
    from safetensors import SafetensorError
    from transformers import AutoTokenizer

    from hybridquant import readers

    directory = check_export(Path(directory))
    with tempfile.TemporaryDirectory(prefix="hybridquant-lm-eval-") as tmp:
        try:
            model, _ = readers.build_model(directory, Path(tmp), max_seq_len=max_length, dtype=dtype)
        except (OSError, SafetensorError, KeyError, AssertionError) as exc:
            raise UserError(f"{directory}: cannot read the export ({type(exc).__name__}: {exc})") from exc
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    return model, tokenizer


# --- the lm_eval model --------------------------------------------------------------------------

def _register() -> type:
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM

    @register_model(MODEL_NAME)
    class ExportedNemotronH(HFLM):
        """lm_eval's HFLM over the dequantized export (``pretrained`` = export directory)."""

        def __init__(self, pretrained: str, max_length: int = 2048, batch_size: int | str = 8,
                     device: str = "cpu", dtype: str = "float32", **kwargs):
            torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
            model, tokenizer = load_model(Path(pretrained), int(max_length), torch_dtype)
            super().__init__(pretrained=model.to(device), tokenizer=tokenizer, max_length=int(max_length),
                             batch_size=batch_size, device=device, **kwargs)
            self._mixers = [m for m in model.modules() if hasattr(m, "chunk_size")]

        def _fit_chunks(self, seq_len: int) -> None:
            # transformers' pure-torch Mamba2 scan is exact only within one chunk, and pads every
            # sequence to a multiple of the chunk (hybridquant.hf_reference): one chunk per call,
            # as long as this call's sequences, not as long as max_length.
            chunk = 1 << max(int(seq_len) - 1, 15).bit_length()
            for mixer in self._mixers:
                mixer.chunk_size = chunk

        def _model_call(self, inps, attn_mask=None, labels=None):
            self._fit_chunks(inps.shape[1])
            return super()._model_call(inps, attn_mask=attn_mask, labels=labels)

        def _model_generate(self, context, max_length, stop, **generation_kwargs):
            self._fit_chunks(max_length)
            return super()._model_generate(context, max_length, stop, **generation_kwargs)

    return ExportedNemotronH


_MODEL_CLASS: type | None = None


def model_class() -> type:
    global _MODEL_CLASS
    if _MODEL_CLASS is None:
        _MODEL_CLASS = _register()
    return _MODEL_CLASS


# --- the shipped task ---------------------------------------------------------------------------

def task_manager(tasks: list[str], include: list[Path] | None = None):
    """lm_eval's task index; the harness's own ~10,000 task YAMLs are indexed only when a task
    outside the shipped ones and ``include`` is asked for (indexing them takes ~20 s)."""
    from lm_eval.tasks import TaskManager

    paths = [str(p) for p in [TASK_DIR, *(include or [])]]
    manager = TaskManager(include_path=paths, include_defaults=False)
    if all(t in manager.all_tasks for t in tasks):
        return manager
    return TaskManager(include_path=paths)


def build_continuation_rows(rows: list[dict], n: int = 40, context_chars: int = 40, continuation_chars: int = 24,
                            choices: int = 4, seed: int = 0) -> list[dict]:
    """``n`` multiple-choice rows from held-out corpus samples: a context, and ``choices`` candidate
    continuations (the real one and the text at the same offset of other samples), answer shuffled."""
    rng = random.Random(seed)
    end = context_chars + continuation_chars
    usable = [r for r in rows if len(r["text"]) >= end]
    rng.shuffle(usable)
    out = []
    for i, row in enumerate(usable):
        if len(out) == n:
            break
        real = row["text"][context_chars:end]
        others = [r["text"][context_chars:end] for r in usable if r is not row]
        distractors = [c for c in dict.fromkeys(others) if c != real]
        if len(distractors) < choices - 1:
            continue
        picked = rng.sample(distractors, choices - 1)
        label = rng.randrange(choices)
        options = picked[:label] + [real] + picked[label:]
        out.append({"id": row["id"], "context": row["text"][:context_chars], "choices": options, "label": label})
    if len(out) < n:
        raise UserError(f"only {len(out)} held-out samples are long enough for the continuation task")
    return out


def continuation_jsonl() -> str:
    from hybridquant import calib

    rows = build_continuation_rows(calib.read_jsonl(calib.resolve_path("package:heldout.jsonl")))
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows)


# --- running ------------------------------------------------------------------------------------

def evaluate(export_dir: Path, tasks: list[str], *, backend: str = "hf", batch_size: int | str = 8,
             max_length: int = 2048, limit: int | None = None, device: str = "cpu", seed: int = 0,
             model_args: dict[str, Any] | None = None, log_samples: bool = False,
             include: list[Path] | None = None) -> dict[str, Any]:
    """lm_eval's ``simple_evaluate`` over an export; returns its result dict (JSON-serialisable)."""
    export_dir = check_export(Path(export_dir).resolve())
    from lm_eval import evaluator
    from lm_eval.utils import handle_non_serializable

    manager = task_manager(tasks, include)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise UserError(f"unknown lm_eval task(s) {', '.join(unknown)} (shipped: {', '.join(shipped_tasks())})")
    if backend == "hf":
        model = model_class()(pretrained=str(export_dir), max_length=max_length, batch_size=batch_size,
                              device=device, **(model_args or {}))
    elif backend == "vllm":
        try:
            from lm_eval.models.vllm_causallms import VLLM
        except ImportError as exc:
            raise UserError(f"--backend vllm needs vllm installed (GPU machines): {exc}") from exc

        args = {"pretrained": str(export_dir), "quantization": vllm_quantization(export_dir),
                "max_model_len": max_length, "mamba_ssm_cache_dtype": "float32", **(model_args or {})}
        model = VLLM(batch_size=batch_size, **args)
    else:
        raise UserError(f"backend must be hf or vllm, got {backend!r}")
    results = evaluator.simple_evaluate(
        model=model, tasks=[_resolved(t) for t in tasks], task_manager=manager, limit=limit,
        log_samples=log_samples, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
        fewshot_random_seed=seed, bootstrap_iters=0,
    )
    results = json.loads(json.dumps(results, default=handle_non_serializable))
    results["hybridquant"] = {"export": str(export_dir), "backend": backend,
                              "manifest": _manifest_summary(export_dir)}
    return results


# vLLM's name for each ModelOpt format; None lets vLLM read it from config.json's quantization_config.
_VLLM_QUANTIZATION = {"FP8": "modelopt", "NVFP4": "modelopt_fp4"}


def vllm_quantization(export_dir: Path) -> str | None:
    algo = json.loads((Path(export_dir) / "hf_quant_config.json").read_text())["quantization"].get("quant_algo")
    return _VLLM_QUANTIZATION.get(algo)


def _shipped() -> dict[str, dict]:
    import yaml

    return {cfg["task"]: cfg for cfg in (yaml.safe_load(p.read_text()) for p in sorted(TASK_DIR.glob("*.yaml")))}


def shipped_tasks() -> list[str]:
    return sorted(_shipped())


def _resolved(task: str) -> str | dict:
    """A shipped task as a config with its data files made absolute: the YAML names them relative to
    the repository root (so ``lm_eval --include_path conf/lm_eval`` works from there), this works from
    any directory."""
    cfg = _shipped().get(task)
    if cfg is None:
        return task
    files = cfg.get("dataset_kwargs", {}).get("data_files", {})
    cfg["dataset_kwargs"]["data_files"] = {split: str(REPO / f) for split, f in files.items()}
    return cfg


def _manifest_summary(export_dir: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((export_dir / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return {k: manifest.get(k) for k in ("model", "recipe", "quantization", "calibration_layout")}


def summary_lines(results: dict[str, Any]) -> list[str]:
    lines = []
    for task, metrics in results["results"].items():
        n = results.get("n-samples", {}).get(task, {}).get("effective")
        shown = ", ".join(f"{k.split(',')[0]} {v:.4f}" for k, v in metrics.items()
                          if isinstance(v, float) and "stderr" not in k)
        lines.append(f"{task}: {shown} ({n} samples)")
    return lines
