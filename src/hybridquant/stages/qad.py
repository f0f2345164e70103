"""The qad stage: a quantized checkpoint (quantize / autoquant run) distilled from its BF16 source.

Run directory (``hydra.run.dir``)::

    config.yaml        the resolved configuration
    qad_state.json     what the run trains (checkpoint, teacher, settings, layout): a resumed run must match
    checkpoints/step_NNNNNN/   a quantized checkpoint every ``qad.save_every`` steps, each with
                       ``train_state/rank<r>.pt`` (optimiser, LR schedule, step, RNG) for resuming
    checkpoint/        the final quantized checkpoint: export, evaluate, generate and release read it
                       as they read a quantize run's
    qad.json           the loss curve (every step) and the held-out KL / perplexity evaluations
    qad.png            the curves (``plot``)
    report.json        summary (written last: its presence means the run completed)

A killed or preempted job started again with the same command resumes from the last checkpoint
under ``checkpoints/``: the student's weights, the optimiser and schedule state are restored, the
data stream skips the samples already trained on, and the final weights are the ones an
uninterrupted run reaches (bit for bit on CPU).
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from hybridquant import checkpoint, evaluate, forward, model, parallel, qad, reporting, rundir, source
from hybridquant.errors import UserError

STATE = "qad_state.json"
CURVE = "qad.json"
PLOT = "qad.png"
STALE = ("report.json", "checkpoint", "checkpoint.partial", CURVE, PLOT)


@dataclass
class Plan:
    directory: Path            # the student's quantized checkpoint
    meta: dict[str, Any]
    layout: parallel.Layout
    teacher: Path
    opts: qad.Options
    step_tokens: list[int]     # loss tokens of every step (the data stream, counted before training)
    tokenizer: Any             # the checkpoint's
    heldout: list[str]         # held-out texts: evaluated on, never trained on

    @property
    def steps(self) -> int:
        return len(self.step_tokens)

    @property
    def samples_per_rank(self) -> int:
        return self.opts.global_batch_size // self.layout.dp

    def blend(self) -> qad.Blend:
        """The training stream from its start (the same on every rank)."""
        o = self.opts
        return qad.Blend(o.data, self.tokenizer, o.max_seq_len, o.seed, self.heldout, o.thinking)


def plan(cfg: DictConfig, world_size: int | None = None) -> Plan:
    """Everything checked, and the data counted, before any process group or model exists."""
    from transformers import AutoTokenizer

    opts = qad.options(cfg.qad)
    directory, meta, layout = checkpoint.open_at_layout(cfg.checkpoint, cfg.parallel,
                                                        world_size or parallel.world_size_from_env())
    teacher = Path(cfg.teacher or meta.get("source") or "")
    if not (teacher / "config.json").is_file():
        raise UserError(f"teacher {teacher} is not a Hugging Face checkpoint directory (set teacher=<BF16 checkpoint>)")
    _same_model(source.read_config(checkpoint.hf_dir(directory)), source.read_config(teacher), teacher)
    if opts.global_batch_size % layout.dp:
        raise UserError(f"qad.global_batch_size={opts.global_batch_size} is not a multiple of the data-parallel "
                        f"size {layout.dp} (every rank trains the same number of samples per step)")
    p = Plan(directory=directory, meta=meta, layout=layout, teacher=teacher, opts=opts, step_tokens=[],
             tokenizer=AutoTokenizer.from_pretrained(str(checkpoint.hf_dir(directory))),
             heldout=qad.heldout_texts(opts.heldout_path, opts.heldout_samples))
    stream = iter(p.blend())
    while sum(p.step_tokens) < opts.tokens:
        p.step_tokens.append(sum(next(stream)[1].shape[1] - 1 for _ in range(opts.global_batch_size)))
    return p


def _same_model(student: dict, teacher: dict, teacher_path: Path) -> None:
    keys = (*source.IDENTITY_FIELDS, "num_hidden_layers", "intermediate_size")
    differ = [k for k in keys if student.get(k) != teacher.get(k)]
    if differ:
        raise UserError(f"teacher {teacher_path} is not the checkpoint's model ({', '.join(differ)} differ)")


def fingerprint(cfg: DictConfig, p: Plan) -> dict[str, Any]:
    return {"checkpoint": str(p.directory.resolve()), "checkpoint_metadata": p.meta, "teacher": str(p.teacher.resolve()),
            "qad": OmegaConf.to_container(cfg.qad, resolve=True), "layout": reporting.layout_dict(p.layout),
            "seed": cfg.seed, "steps": p.steps}


def _step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:06d}"


def last_checkpoint(run_dir: Path) -> int:
    """The last complete intermediate checkpoint's step (0: none)."""
    steps = []
    for d in (run_dir / "checkpoints").glob("step_*"):
        if (d / checkpoint.METADATA).is_file() and (d / "train_state" / "complete").is_file():
            steps.append(int(d.name.removeprefix("step_")))
    return max(steps, default=0)


def check_resume(run_dir: Path, wanted: dict[str, Any], resume: bool) -> int:
    """The step to continue from (0: start). Every rank, before any process group exists."""
    if not resume:
        return 0
    differ = rundir.settings_differ(run_dir / STATE, wanted, f"remove {run_dir} or set qad.resume=false")
    if differ is None:
        return 0
    if differ:
        raise UserError(f"{run_dir} holds a qad run with other settings ({', '.join(differ)}); "
                        "remove it, choose another run directory or set qad.resume=false")
    return last_checkpoint(run_dir)


def run(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    from megatron.core import parallel_state

    t_start = time.perf_counter()
    p = plan(cfg)
    run_dir = Path(run_dir)
    wanted = fingerprint(cfg, p)
    start = check_resume(run_dir, wanted, cfg.qad.resume)
    parallel.init(p.layout, seed=cfg.seed, backend=cfg.cluster.backend, timeout_s=cfg.cluster.timeout_s)
    # Every rank must agree on where to continue (a checkpoint one rank cannot see is not used).
    start = min(parallel.gather_objects(start))
    if parallel.is_main():
        rundir.prepare(run_dir, cfg, stale=STALE)
        if not start:
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        reporting.write_json_atomic(run_dir / STATE, wanted)
    parallel.barrier()
    parallel.fault_point("load")

    timings: dict[str, float] = {}
    t = time.perf_counter()
    training = p.opts.training_settings(p.layout.tp)
    resume_dir = _step_dir(run_dir, start) if start else p.directory
    student, _ = checkpoint.load_quantized(resume_dir, p.layout, training=training)
    teacher = model.load_hf(str(p.teacher), p.layout, p.meta["dtype"], router_dtype=p.meta.get("router_dtype"),
                            training=training)
    timings["load_s"] = time.perf_counter() - t
    vocab = student.hf_vocab_size

    heldout = _heldout_samples(p)
    teacher_logits = _logits(teacher.chunks, heldout, vocab)
    learned_scales = qad.set_scales_trainable(student.chunks, p.opts.learn_scales)
    qad.distill(student.chunks, teacher.chunks, p.opts)
    ddp = qad.wrap_ddp(student.chunks)
    opt, scheduler = qad.optimizer(ddp, p.opts, p.steps)

    curve = {"steps": [], "evals": []}
    if start:
        curve = _restore(resume_dir, opt, scheduler)
        if parallel.is_main():
            print(f"qad: resuming at step {start} of {p.steps} from {resume_dir}", flush=True)
    else:
        curve["evals"].append(_evaluate(ddp, teacher_logits, heldout, vocab, 0))
    if parallel.is_main():
        first = curve["evals"][0]
        print(f"qad: {p.steps} steps x {p.opts.global_batch_size} samples ({sum(p.step_tokens)} tokens), "
              f"layout {p.layout.tag}; held-out KL before: {first['kl_mean']:.4g}", flush=True)

    dp_rank, dp = parallel_state.get_data_parallel_rank(), p.layout.dp
    stream = iter(p.blend())
    for _ in range(start * p.opts.global_batch_size):  # the samples already trained on
        next(stream)
    t_train, tokens_done = time.perf_counter(), 0
    for step in range(start + 1, p.steps + 1):
        batch = [next(stream)[1] for _ in range(p.opts.global_batch_size)]
        for chunk in ddp:
            chunk.train()
        result = qad.train_step(ddp, batch[dp_rank::dp], opt, scheduler)
        loss = parallel.from_any_rank(result.loss_sum / max(result.tokens, 1) if _last_stage() else None)
        curve["steps"].append({"step": step, "kd_loss": loss, "tokens": result.tokens, "lr": result.lr,
                               "grad_norm": result.grad_norm})
        tokens_done += result.tokens
        if step % p.opts.eval_every == 0 or step == p.steps:
            curve["evals"].append(_evaluate(ddp, teacher_logits, heldout, vocab, step))
        _progress(step, p, loss, result, tokens_done, time.perf_counter() - t_train, curve["evals"][-1])
        if step % p.opts.save_every == 0 or step == p.steps:
            _save_step(student, run_dir, step, p, opt, scheduler, curve)
            parallel.fault_point(f"step{step}")
    timings["train_s"] = time.perf_counter() - t_train
    return _finish(cfg, p, run_dir, student, curve, timings, t_start, learned_scales)


def _last_stage() -> bool:
    from megatron.core import parallel_state

    return parallel_state.is_pipeline_last_stage()


def _heldout_samples(p: Plan) -> list[torch.Tensor]:
    opts, out = p.opts, []
    for text in p.heldout:
        ids = p.tokenizer(text, add_special_tokens=False)["input_ids"][:opts.max_seq_len]
        if len(ids) >= 2:
            out.append(torch.tensor([ids], dtype=torch.long))
    if not out:
        raise UserError(f"qad.heldout_path {opts.heldout_path}: no held-out sample of at least 2 tokens")
    return out


def _logits(chunks: list, samples: list, vocab: int) -> list:
    """Logits of each sample (padded for sequence parallelism, trimmed back); None off the last stage."""
    multiple = qad.sequence_multiple()
    out = forward.run(chunks, [qad.padded(s, multiple) for s in samples], vocab)
    return [None if x is None else x[:, :s.shape[1]] for x, s in zip(out, samples)]


def _evaluate(ddp: list, teacher_logits: list, samples: list, vocab: int, step: int) -> dict[str, Any]:
    """Held-out KL(teacher || student), top-1 agreement and perplexities, on every rank."""
    for chunk in ddp:
        chunk.eval()
    with qad.student_only(ddp):
        student_logits = _logits(ddp, samples, vocab)
    metrics = None
    if teacher_logits[0] is not None:
        m = evaluate.token_metrics(teacher_logits, student_logits, samples)
        teacher_ppl = evaluate.perplexity(teacher_logits, samples)["perplexity"]
        metrics = {"step": step, "kl_mean": m["kl_mean"], "kl_p99": m["kl_p99"], "top1_agreement": m["top1_agreement"],
                   "perplexity": m["perplexity"], "teacher_perplexity": teacher_ppl, "positions": m["positions"]}
    return parallel.from_any_rank(metrics)


def _progress(step: int, p: Plan, loss: float, result: qad.StepResult, tokens_done: int, seconds: float,
              last_eval: dict) -> None:
    if not parallel.is_main():
        return
    rate = tokens_done / max(seconds, 1e-9)
    remaining = sum(p.step_tokens[step:]) / max(rate, 1e-9)
    width = 20
    filled = int(width * step / p.steps)
    bar = "#" * filled + "." * (width - filled)
    print(f"qad [{bar}] step {step}/{p.steps} | kd loss {loss:.4g} | lr {result.lr:.3g} | grad norm "
          f"{result.grad_norm:.3g} | {rate:.0f} tok/s | ETA {_clock(remaining)} | held-out KL "
          f"{last_eval['kl_mean']:.4g} (step {last_eval['step']})", flush=True)


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _metadata(p: Plan, step: int) -> dict[str, Any]:
    meta = dict(p.meta)
    meta["layout"] = reporting.layout_dict(p.layout)
    meta["qad"] = {"from": str(p.directory.resolve()), "teacher": str(p.teacher.resolve()), "step": step,
                   "steps": p.steps, "tokens": sum(p.step_tokens[:step])}
    return meta


def _save_step(student, run_dir: Path, step: int, p: Plan, opt, scheduler, curve: dict) -> None:
    """A resumable checkpoint: the quantized student + every rank's training state. Collective."""
    target = _step_dir(run_dir, step)
    partial = target.with_name(target.name + ".partial")
    if parallel.is_main():
        shutil.rmtree(partial, ignore_errors=True)
        partial.parent.mkdir(parents=True, exist_ok=True)
    parallel.barrier()
    checkpoint.save(student.chunks, partial, str(checkpoint.hf_dir(p.directory)), _metadata(p, step))
    parallel.barrier()
    state_dir = partial / "train_state"
    if parallel.is_main():
        state_dir.mkdir()
    parallel.barrier()
    torch.save({"optimizer": opt.state_dict(), "scheduler": scheduler.state_dict(), "step": step, "curve": curve,
                "rng": torch.get_rng_state()}, state_dir / f"rank{parallel.rank()}.pt")
    parallel.barrier()
    if parallel.is_main():
        (state_dir / "complete").write_text(f"{step}\n")
        shutil.rmtree(target, ignore_errors=True)
        partial.rename(target)
        for old in (run_dir / "checkpoints").glob("step_*"):  # keep the newest only
            if old.name != target.name and not old.name.endswith(".partial"):
                shutil.rmtree(old, ignore_errors=True)
    parallel.barrier()


def _restore(step_dir: Path, opt, scheduler) -> dict:
    path = step_dir / "train_state" / f"rank{parallel.rank()}.pt"
    if not path.is_file():
        raise UserError(f"{step_dir} has no training state for rank {parallel.rank()} (saved at another world size?)")
    state = torch.load(path, weights_only=False)
    opt.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    return state["curve"]


def _finish(cfg: DictConfig, p: Plan, run_dir: Path, student, curve: dict, timings: dict, t_start: float,
            learned_scales: int = 0) -> dict:
    """The final checkpoint (a copy of the last step's), the curves, then report.json. Collective."""
    last = _step_dir(run_dir, p.steps)
    report: dict[str, Any] = {}
    if parallel.is_main():
        final = run_dir / "checkpoint"
        shutil.rmtree(final, ignore_errors=True)
        shutil.copytree(last, run_dir / "checkpoint.partial", ignore=shutil.ignore_patterns("train_state"))
        (run_dir / "checkpoint.partial").rename(final)
        reporting.write_json_atomic(run_dir / CURVE, curve)
        if cfg.plot:
            _plot(curve, run_dir / PLOT, p)
        before, after = curve["evals"][0], curve["evals"][-1]
        timings["total_s"] = time.perf_counter() - t_start
        report = {
            "stage": "qad",
            "checkpoint": str(final),
            "student": str(p.directory.resolve()), "teacher": str(p.teacher.resolve()),
            "recipe": p.meta.get("recipe"), "model": p.meta.get("model"),
            "layout": reporting.layout_dict(p.layout),
            "steps": p.steps, "tokens": sum(p.step_tokens), "global_batch_size": p.opts.global_batch_size,
            "settings": OmegaConf.to_container(cfg.qad, resolve=True), "learned_scales": learned_scales,
            "heldout": {"before": before, "after": after,
                        "kl_reduction": 1.0 - after["kl_mean"] / before["kl_mean"] if before["kl_mean"] else 0.0},
            "timings": {k: round(v, 2) for k, v in timings.items()},
        }
        reporting.write_json_atomic(run_dir / "report.json", report)
        print(f"qad: held-out KL vs teacher {before['kl_mean']:.4g} -> {after['kl_mean']:.4g} "
              f"({-100 * report['heldout']['kl_reduction']:+.1f}%); perplexity {before['perplexity']:.3f} -> "
              f"{after['perplexity']:.3f} (teacher {after['teacher_perplexity']:.3f}); top-1 "
              f"{before['top1_agreement']:.3f} -> {after['top1_agreement']:.3f}", flush=True)
        print(f"checkpoint: {final}", flush=True)
        print(f"time: {timings['total_s']:.1f} s", flush=True)
    parallel.barrier()
    return report


def _plot(curve: dict, path: Path, p: Plan) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    a.plot([s["step"] for s in curve["steps"]], [s["kd_loss"] for s in curve["steps"]], marker=".")
    a.set_xlabel("step")
    a.set_ylabel("training KL (per token)")
    a.set_title("distillation loss")
    b.plot([e["step"] for e in curve["evals"]], [e["kl_mean"] for e in curve["evals"]], marker="o")
    b.set_xlabel("step")
    b.set_ylabel("held-out KL(teacher || student)")
    b.set_title(f"held-out ({p.meta.get('recipe')}, {p.layout.tag})")
    for ax in (a, b):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.rename(path)

