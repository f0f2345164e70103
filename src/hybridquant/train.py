"""A briefly trained tiny model: the embedded Nemotron-H trained on the shipped calibration text.

The random tiny model (``tiny.materialize``) has near-uniform next-token distributions, on which every
quantization recipe looks alike. A few dozen optimiser steps on the project's own text give it real
structure (byte statistics, frequent words, the chat format), so recipe comparisons mean something.

    .venv/bin/python pipeline/train.py                 # model=tiny_trained: train once, print losses
    torchrun ... pipeline/quantize.py model=tiny_trained +quant=...   # trains on first use

Deterministic: one thread, fixed seeds, ``torch.use_deterministic_algorithms``. It never sees the
held-out text (``package:heldout.jsonl``): training reads only ``train.path`` and refuses a file that
shares a sample with the held-out set. The result is cached under ``tiny.cache_root()`` with a key
over everything it is made from (architecture, init seed, training settings, the text's sha256,
torch's version), written to a temporary directory and renamed into place.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping

import torch

from hybridquant import calib, tiny
from hybridquant.errors import UserError

# Bump when the way the model is trained or written changes: old cache entries are then ignored.
TRAIN_FORMAT = 1
HELDOUT = "package:heldout.jsonl"
RECORD = "TRAINING.json"
_DEFAULTS = {"path": "package:calib.jsonl", "steps": 40, "batch_size": 16, "seq_len": 64, "lr": 5.0e-3,
             "warmup": 4, "weight_decay": 0.0, "seed": 0, "eval_samples": 8}


def settings(train_cfg: Mapping[str, Any] | None) -> dict[str, Any]:
    out = dict(_DEFAULTS)
    unknown = set(train_cfg or {}) - set(out)
    if unknown:
        raise UserError(f"model.train has unknown keys {sorted(unknown)}; known: {sorted(out)}")
    out.update(train_cfg or {})
    return out


def training_key(arch: Mapping[str, Any], seed: int, train_cfg: Mapping[str, Any], text_sha256: str) -> str:
    blob = json.dumps({"arch": dict(arch), "seed": seed, "tiny_format": tiny.FORMAT_VERSION,
                       "train": dict(train_cfg), "text": text_sha256, "train_format": TRAIN_FORMAT,
                       "torch": torch.__version__.split("+")[0]}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def materialize(model_cfg: Mapping[str, Any], root: Path | None = None) -> Path:
    """The cached trained checkpoint for ``model_cfg`` (``arch``, ``seed``, ``train``), trained if needed.
    Safe to call from every rank at once: the first caller trains under a file lock."""
    root = Path(root) if root is not None else tiny.cache_root()
    arch, seed = model_cfg["arch"], int(model_cfg["seed"])
    cfg = settings(model_cfg.get("train"))
    text = calib.resolve_path(cfg["path"])
    key = training_key(arch, seed, cfg, hashlib.sha256(text.read_bytes()).hexdigest())
    target = root / "models" / f"tiny-trained-{key}"
    if (target / RECORD).exists():
        return target
    base = tiny.materialize(arch, seed, root)  # takes its own lock: before ours
    with open(root / ".train.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / RECORD).exists():
            return target
        staging = Path(tempfile.mkdtemp(prefix=".tiny-trained-", dir=target.parent))
        try:
            for item in base.iterdir():
                if item.is_file() and item.name not in ("model.safetensors", "TINY_MODEL.json"):
                    shutil.copy2(item, staging / item.name)
            record = train(base, staging, cfg, text)
            record.update(key=key, arch=dict(arch), seed=seed, train_format=TRAIN_FORMAT)
            (staging / RECORD).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
            staging.rename(target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return target


def read_record(directory: Path) -> dict[str, Any]:
    return json.loads((Path(directory) / RECORD).read_text())


@contextlib.contextmanager
def _deterministic():
    """One thread and deterministic kernels while training; the caller's settings afterwards."""
    threads, strict = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(strict)
        torch.set_num_threads(threads)


def token_stream(tokenizer, path: Path) -> torch.Tensor:
    """Every training sample's ids, each followed by EOS, as one stream. Refuses held-out text."""
    rows = calib.read_jsonl(path)
    heldout = {r["text"] for r in calib.read_jsonl(calib.resolve_path(HELDOUT))}
    shared = sum(r["text"] in heldout for r in rows)
    if shared:
        raise UserError(f"{path} shares {shared} samples with the held-out text {HELDOUT}: not training on it")
    ids: list[int] = []
    for row in rows:
        ids += tokenizer(row["text"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return torch.tensor(ids, dtype=torch.long)


def _load(path: Path, seq_len: int):
    from hybridquant import hf_reference

    return hf_reference.load(str(path), max_seq_len=seq_len, dtype=torch.float32, strict=True)


@torch.no_grad()
def heldout_loss(model, tokenizer, samples: int, seq_len: int) -> float:
    """Mean next-token loss on the first held-out samples (evaluation only; never trained on)."""
    rows = calib.read_jsonl(calib.resolve_path(HELDOUT))[:samples]
    total, count = 0.0, 0
    for row in rows:
        ids = tokenizer(row["text"], add_special_tokens=False)["input_ids"][:seq_len]
        if len(ids) < 2:
            continue
        x = torch.tensor([ids])
        loss = model(x, labels=x, use_cache=False).loss
        total, count = total + loss.item() * (len(ids) - 1), count + len(ids) - 1
    return total / max(count, 1)


def train(base: Path, out: Path, cfg: Mapping[str, Any], text: Path) -> dict[str, Any]:
    """Train the checkpoint at ``base``; write the weights (Hub tensor names) to ``out``."""
    from transformers import AutoTokenizer

    t0 = time.perf_counter()
    with _deterministic():
        torch.manual_seed(cfg["seed"])
        tokenizer = AutoTokenizer.from_pretrained(str(base))
        stream = token_stream(tokenizer, text)
        model = _load(base, cfg["seq_len"])
        before = heldout_loss(model, tokenizer, cfg["eval_samples"], cfg["seq_len"])
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
        gen = torch.Generator().manual_seed(cfg["seed"])
        seq, losses = cfg["seq_len"], []
        for step in range(cfg["steps"]):
            for group in opt.param_groups:
                group["lr"] = cfg["lr"] * _schedule(step, cfg["steps"], cfg["warmup"])
            starts = torch.randint(0, len(stream) - seq, (cfg["batch_size"],), generator=gen)
            batch = torch.stack([stream[s:s + seq] for s in starts.tolist()])
            loss = model(batch, labels=batch, use_cache=False).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(round(loss.item(), 4))
        model.eval()
        after = heldout_loss(model, tokenizer, cfg["eval_samples"], cfg["seq_len"])
        _save_weights(model, base, out)
    return {"train": dict(cfg), "train_loss_first": losses[0], "train_loss_last": losses[-1], "train_losses": losses,
            "heldout_loss_random": round(before, 4), "heldout_loss_trained": round(after, 4),
            "tokens_seen": cfg["steps"] * cfg["batch_size"] * seq, "text": str(text),
            "train_s": round(time.perf_counter() - t0, 1)}


def _schedule(step: int, steps: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10%."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(steps - warmup, 1)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def _save_weights(model, base: Path, out: Path) -> None:
    """``model.safetensors`` under the Hub tensor names of the base checkpoint (same names, same set)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with tempfile.TemporaryDirectory(dir=out) as scratch:
        model.save_pretrained(scratch)
        state = load_file(str(Path(scratch) / "model.safetensors"))
    state = {tiny._EMBEDDING_FIX.get(k, k): v.contiguous() for k, v in state.items()}
    with safe_open(str(base / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
    if set(state) != names:
        raise RuntimeError(f"trained weights differ in names from {base}: {sorted(set(state) ^ names)[:4]}")
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})


def summary(directory: Path) -> str:
    r = read_record(directory)
    t = r["train"]
    return "\n".join([
        f"trained tiny model: {directory}",
        f"training: {t['steps']} steps x {t['batch_size']} x {t['seq_len']} tokens of {Path(r['text']).name} "
        f"({r['tokens_seen']} tokens, {r['train_s']} s, one thread)",
        f"train loss: {r['train_loss_first']:.3f} (first step) -> {r['train_loss_last']:.3f} (last step)",
        f"held-out loss ({t['eval_samples']} samples): random model {r['heldout_loss_random']:.3f} "
        f"(perplexity {math.exp(r['heldout_loss_random']):.1f}) -> trained {r['heldout_loss_trained']:.3f} "
        f"(perplexity {math.exp(r['heldout_loss_trained']):.1f})",
    ])
