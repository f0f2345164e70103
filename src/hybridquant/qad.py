"""Quantization-aware distillation (QAD): the BF16 teacher's logits taught to the fake-quantized student.

The pieces, each from the library that owns it:

* distillation: ModelOpt's ``mtd.convert(student, mode=[("kd_loss", ...)])`` with its Megatron plugin
  (``setup_distillation_config``: ``LogitsKLLoss``, TP-aware, built on the last pipeline stage;
  ``adjust_distillation_model_for_mcore``: the teacher runs inside the student's forward without
  autograd, and under PP both hidden states travel between stages concatenated;
  ``get_tensor_shapes_adjust_fn_for_distillation``: the matching p2p shapes);
* fake quantization: the student's ModelOpt quantizers as calibrated (amax are buffers: frozen);
  their straight-through gradients reach the weights;
* gradients and optimiser: megatron-core's ``DistributedDataParallel`` (gradient buffers, the
  data-parallel and expert-data-parallel reductions, tied-embedding and layer-norm reductions in
  ``finalize_model_grads``), ``get_megatron_optimizer`` (Adam, gradient clipping by the global norm
  over every model-parallel rank) and ``OptimizerParamScheduler`` (warm-up, constant / cosine);
* loss normalisation: per token over the whole global batch (``calculate_per_token_loss``), so that
  samples keep their natural length and any DP size gives the same gradient.

Every micro-batch is one sample of its own length: megatron's schedule runs once per sample
(``num_microbatches=1``, fixed shapes as the distillation p2p needs), gradients accumulate in the DDP
buffers, and ``finalize_model_grads`` reduces them once per step.

Data (``Blend``): JSONL / Parquet / datasets sources with weights, each shuffled by the seed and
cycled when exhausted, interleaved by smooth weighted round robin (the shares hold by sample count
at every prefix); conversations are rendered with the checkpoint's chat template
(``calib.row_text``); a row that is also a held-out text is refused. The stream depends only on the
data, the seed and the settings, so a resumed run skips exactly the samples already trained on.
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from hybridquant import calib
from hybridquant.errors import UserError
from hybridquant.model import causal_inputs

SCHEDULES = ("constant", "cosine", "linear")


@dataclass(frozen=True)
class Source:
    path: str
    weight: float
    split: str | None = None
    subset: str | None = None
    text_column: str = "text"
    messages_column: str = "messages"


@dataclass
class Options:
    data: list[Source]
    tokens: int                     # token budget: training stops after the step that reaches it
    global_batch_size: int          # samples per optimiser step, over all data-parallel ranks
    max_seq_len: int
    lr: float
    min_lr: float
    lr_schedule: str
    warmup_steps: int
    weight_decay: float
    adam_beta1: float
    adam_beta2: float
    clip_grad: float
    temperature: float
    top_k: int | None
    skip_lm_loss: bool
    kd_loss_scale: float
    learn_scales: bool
    save_every: int
    eval_every: int
    heldout_path: str
    heldout_samples: int
    seed: int
    thinking: bool | None
    moe_aux_loss_coeff: float
    update_expert_bias: bool

    def training_settings(self, tp: int) -> dict[str, Any]:
        """Megatron transformer-config settings of the student (and the teacher it is built like: under
        PP both hidden states travel together, so their sequence layout must match)."""
        settings: dict[str, Any] = {"calculate_per_token_loss": True, "moe_aux_loss_coeff": self.moe_aux_loss_coeff,
                                    "sequence_parallel": tp > 1}
        if not self.update_expert_bias:
            settings["moe_router_bias_update_rate"] = 0.0
        return settings


def options(conf) -> Options:
    """``qad.*`` checked (one line per problem) before anything is loaded."""
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise UserError(f"qad.{message}")

    data = conf.get("data")
    need(bool(data), "data is empty: give a list of {path, weight} sources")
    sources = []
    for i, entry in enumerate(data):
        need(hasattr(entry, "get") and entry.get("path"), f"data[{i}] needs a path")
        weight = entry.get("weight", 1.0)
        need(isinstance(weight, (int, float)) and weight > 0, f"data[{i}].weight must be > 0, got {weight!r}")
        unknown = set(entry) - {"path", "weight", "split", "subset", "text_column", "messages_column"}
        need(not unknown, f"data[{i}] has unknown keys {sorted(unknown)}")
        sources.append(Source(path=str(entry.path), weight=float(weight), split=entry.get("split"),
                              subset=entry.get("subset"), text_column=entry.get("text_column", "text"),
                              messages_column=entry.get("messages_column", "messages")))
    for name in ("tokens", "global_batch_size", "heldout_samples", "save_every", "eval_every"):
        need(int(conf[name]) >= 1, f"{name} must be >= 1, got {conf[name]}")
    need(int(conf.max_seq_len) >= 2, f"max_seq_len must be >= 2, got {conf.max_seq_len}")
    need(conf.lr_schedule in SCHEDULES, f"lr_schedule must be one of {', '.join(SCHEDULES)}, got {conf.lr_schedule!r}")
    need(conf.lr > 0 and 0 <= conf.min_lr <= conf.lr, f"lr must be > 0 and min_lr in [0, lr] (lr={conf.lr}, "
                                                       f"min_lr={conf.min_lr})")
    need(int(conf.warmup_steps) >= 0, f"warmup_steps must be >= 0, got {conf.warmup_steps}")
    need(conf.clip_grad >= 0, f"clip_grad must be >= 0 (0: no clipping), got {conf.clip_grad}")
    need(conf.temperature > 0, f"temperature must be > 0, got {conf.temperature}")
    need(conf.top_k is None or int(conf.top_k) >= 1, f"top_k must be null or >= 1, got {conf.top_k}")
    need(conf.kd_loss_scale > 0, f"kd_loss_scale must be > 0, got {conf.kd_loss_scale}")
    return Options(data=sources, tokens=int(conf.tokens), global_batch_size=int(conf.global_batch_size),
                   max_seq_len=int(conf.max_seq_len), lr=float(conf.lr), min_lr=float(conf.min_lr),
                   lr_schedule=str(conf.lr_schedule), warmup_steps=int(conf.warmup_steps),
                   weight_decay=float(conf.weight_decay), adam_beta1=float(conf.adam_beta1),
                   adam_beta2=float(conf.adam_beta2), clip_grad=float(conf.clip_grad),
                   temperature=float(conf.temperature), top_k=None if conf.top_k is None else int(conf.top_k),
                   skip_lm_loss=bool(conf.skip_lm_loss), kd_loss_scale=float(conf.kd_loss_scale),
                   learn_scales=bool(conf.learn_scales), save_every=int(conf.save_every), eval_every=int(conf.eval_every),
                   heldout_path=str(conf.heldout_path), heldout_samples=int(conf.heldout_samples),
                   seed=int(conf.seed), thinking=conf.thinking, moe_aux_loss_coeff=float(conf.moe_aux_loss_coeff),
                   update_expert_bias=bool(conf.update_expert_bias))


# ---------------------------------------------------------------------------------------------------
# Data


def heldout_texts(path: str, n: int) -> list[str]:
    rows = calib.read_jsonl(calib.resolve_path(path))[:n]
    texts = [r.get("text") for r in rows if isinstance(r, dict)]
    if len(texts) < n or not all(isinstance(t, str) for t in texts):
        raise UserError(f"qad.heldout_path {path} must hold at least {n} rows with a 'text' string "
                        f"(qad.heldout_samples={n})")
    return texts


class Blend:
    """The training samples: an endless, deterministic stream of [1, seq] id tensors."""

    def __init__(self, sources: list[Source], tokenizer, max_seq_len: int, seed: int, heldout: list[str],
                 thinking: bool | None = None, min_seq_len: int = 2):
        self.sources, self.tokenizer, self.max_seq_len = sources, tokenizer, max_seq_len
        self.seed, self.thinking, self.min_seq_len = seed, thinking, min_seq_len
        self.heldout = set(heldout)
        self.rows = [calib.open_rows(s.path, split=s.split, subset=s.subset, text_column=s.text_column,
                                     messages_column=s.messages_column) for s in sources]
        for s, rows in zip(sources, self.rows):
            if len(rows) == 0:
                raise UserError(f"qad.data source {s.path} has no rows")
        self.drawn = [0] * len(sources)      # samples taken from each source
        self.epochs = [0] * len(sources)     # completed passes over each source

    def _order(self, i: int, epoch: int) -> list[int]:
        order = list(range(len(self.rows[i])))
        random.Random(f"{self.seed}:{i}:{epoch}").shuffle(order)
        return order

    def _source_stream(self, i: int) -> Iterator[torch.Tensor]:
        s, rows = self.sources[i], self.rows[i]
        epoch = 0
        while True:
            usable = 0
            for index in self._order(i, epoch):
                row = rows[index]
                where = rows.where(index)
                text = calib.row_text(row, self.tokenizer, text_column=s.text_column,
                                      messages_column=s.messages_column, thinking=self.thinking, where=where)
                if text in self.heldout:
                    raise UserError(f"{where}: this sample is also held-out text (qad.heldout_path): not training on it")
                ids = self.tokenizer(text, add_special_tokens=False)["input_ids"][:self.max_seq_len]
                if len(ids) < self.min_seq_len:
                    continue
                usable += 1
                yield torch.tensor([ids], dtype=torch.long)
            if not usable:
                raise UserError(f"qad.data source {s.path} has no sample of at least {self.min_seq_len} tokens")
            epoch += 1
            self.epochs[i] = epoch

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor]]:
        streams = [self._source_stream(i) for i in range(len(self.sources))]
        weights = [s.weight for s in self.sources]
        total = sum(weights)
        credit = [0.0] * len(weights)
        while True:  # smooth weighted round robin: exact shares at every prefix, deterministic
            for i, w in enumerate(weights):
                credit[i] += w
            pick = max(range(len(weights)), key=lambda i: credit[i])
            credit[pick] -= total
            self.drawn[pick] += 1
            yield pick, next(streams[pick])


# ---------------------------------------------------------------------------------------------------
# Model: distillation wrapper, DDP, optimiser, schedule


def distill(student_chunks: list, teacher_chunks: list, opts: Options):
    """Convert each student chunk in place into ModelOpt's DistillationModel around its teacher chunk
    (same layout: the same layers on every rank). Returns the distillation config."""
    import modelopt.torch.distill as mtd
    from modelopt.torch.distill.plugins import megatron as mtd_mcore

    from hybridquant import modules

    if len(student_chunks) != 1:
        raise UserError("qad needs one model chunk per rank (ModelOpt's distillation has no interleaved PP)")
    student, teacher = modules.unwrap(student_chunks[0]), modules.unwrap(teacher_chunks[0])
    for p in teacher.parameters():
        p.requires_grad_(False)
    teacher.eval()
    cfg = mtd_mcore.DistillationConfig(logit_layers=("output_layer", "output_layer"), skip_lm_loss=opts.skip_lm_loss,
                                       kd_loss_scale=opts.kd_loss_scale, logit_kl_temperature=opts.temperature,
                                       logit_kl_topk=opts.top_k)
    cfg = mtd_mcore.setup_distillation_config(cfg, student.config, teacher.config)
    kd = {"teacher_model": teacher, "criterion": cfg.criterion, "loss_balancer": cfg.loss_balancer}
    model = mtd.convert(student, mode=[("kd_loss", kd)])
    if model is not student:  # converted in place: wrappers (Float16Module) keep pointing at it
        raise RuntimeError("ModelOpt's distillation conversion returned a new module")
    mtd_mcore.adjust_distillation_model_for_mcore(model, cfg)
    return cfg


def set_scales_trainable(chunks: list, learn: bool) -> int:
    """Quantizer scales (amax) that are parameters: ModelOpt makes them so only for its LSQ algorithm
    (learned NVFP4 block scales, a recipe with ``algorithm: {method: lsq}``); calibrated amax are buffers.
    ``learn``: train them with the weights (there must be some), else freeze them. Returns their count."""
    scales = [p for chunk in chunks for name, p in chunk.named_parameters() if "_amax" in name.rsplit(".", 1)[-1]]
    if learn and not scales:
        raise UserError("qad.learn_scales=true, but the checkpoint's scales are calibrated buffers, not parameters: "
                        "quantize with ModelOpt's LSQ algorithm (recipe algorithm {method: lsq}) to learn them, "
                        "or set qad.learn_scales=false")
    for p in scales:
        p.requires_grad_(learn)
    return len(scales)


def distillation_model(chunk):
    """The DistillationModel inside a (DDP / Float16Module) wrapped chunk."""
    from megatron.core.utils import unwrap_model

    return unwrap_model(chunk)


@contextlib.contextmanager
def student_only(chunks: list):
    """The plain student forward (no teacher, no concatenated PP tensors): for evaluation."""
    model = distillation_model(chunks[0])
    saved = {k: model.__dict__.pop(k) for k in ("forward", "set_input_tensor") if k in model.__dict__}
    try:
        with model.only_student_forward(), model.hide_teacher_model():
            yield
    finally:
        model.__dict__.update(saved)


def wrap_ddp(chunks: list) -> list:
    """megatron-core's DistributedDataParallel around each chunk (gradient buffers, DP reductions)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                               use_distributed_optimizer=False, check_for_nan_in_grad=True)
    wrapped = []
    for chunk in chunks:
        config = distillation_model(chunk).config
        wrapped.append(DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk))
    return wrapped


def optimizer(ddp_chunks: list, opts: Options, total_steps: int):
    """megatron-core's Adam (+ clipping by the global gradient norm) and its LR / WD scheduler."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    config = distillation_model(ddp_chunks[0]).config
    ocfg = OptimizerConfig(optimizer="adam", lr=opts.lr, min_lr=opts.min_lr, weight_decay=opts.weight_decay,
                           adam_beta1=opts.adam_beta1, adam_beta2=opts.adam_beta2, clip_grad=opts.clip_grad,
                           bf16=config.bf16, fp16=config.fp16, params_dtype=config.params_dtype,
                           use_distributed_optimizer=False)
    from hybridquant.compat import cpu as cpu_compat

    with cpu_compat.cuda_type_names():
        opt = get_megatron_optimizer(ocfg, ddp_chunks)
    warmup = min(opts.warmup_steps, max(total_steps - 1, 0))
    scheduler = OptimizerParamScheduler(
        opt, init_lr=0.0 if warmup else opts.lr, max_lr=opts.lr, min_lr=opts.min_lr, lr_warmup_steps=warmup,
        lr_decay_steps=max(total_steps, warmup + 1), lr_decay_style=opts.lr_schedule,
        start_wd=opts.weight_decay, end_wd=opts.weight_decay, wd_incr_steps=max(total_steps, 1),
        wd_incr_style="constant")
    return opt, scheduler


def _masked_sum(output, mask: torch.Tensor) -> torch.Tensor:
    """Sum of a per-token [b, s] loss over ``mask``; losses computed on TP shards (the plugin's
    ``tp_reduce`` flag) are completed over the TP group."""
    from megatron.core import parallel_state

    tp_reduce = False
    if isinstance(output, tuple):
        output, tp_reduce, sequence_parallel = output
        if sequence_parallel:
            raise RuntimeError("sequence-parallel distillation losses are not used here")
    total = (output.reshape(-1).float() * mask.reshape(-1).float()).sum()
    if tp_reduce and parallel_state.get_tensor_model_parallel_world_size() > 1:
        torch.distributed.all_reduce(total, group=parallel_state.get_tensor_model_parallel_group())
    return total


@dataclass
class StepResult:
    loss_sum: float      # distillation loss summed over the step's loss tokens (last stage; 0 elsewhere)
    tokens: int          # loss tokens of the step, all data-parallel ranks
    grad_norm: float
    lr: float


def sequence_multiple() -> int:
    """Sequence lengths must be multiples of this: TP size under sequence parallelism (megatron trains
    MoE layers under TP only with it), else 1."""
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_world_size()


def padded(ids: torch.Tensor, multiple: int) -> torch.Tensor:
    """``ids`` right-padded to a multiple of ``multiple``. Exact for the real positions of a causal model
    (attention, Mamba's convolution and scan look only backwards; MoE routing is per token, with no
    capacity limit); the padded positions are excluded from every loss and metric."""
    extra = -ids.shape[1] % multiple
    return torch.nn.functional.pad(ids, (0, extra), value=0) if extra else ids


def train_step(ddp_chunks: list, samples: list[torch.Tensor], opt, scheduler) -> StepResult:
    """One optimiser step on this rank's samples (its share of the global batch). Collective."""
    from megatron.core import parallel_state
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from modelopt.torch.distill.plugins.megatron import get_tensor_shapes_adjust_fn_for_distillation

    model = distillation_model(ddp_chunks[0])
    device = next(model.parameters()).device
    for chunk in ddp_chunks:
        chunk.zero_grad_buffer()
    opt.zero_grad()
    local_loss = torch.zeros((), dtype=torch.float64)
    local_tokens = 0

    multiple = sequence_multiple()
    for sample in samples:
        ids = padded(sample, multiple).to(device)
        position_ids, attention_mask = causal_inputs(ids)
        labels = torch.roll(ids, -1, dims=1)
        loss_mask = torch.zeros_like(ids, dtype=torch.float32)
        loss_mask[:, :sample.shape[1] - 1] = 1.0  # the last real position has no next token
        local_tokens += int(loss_mask.sum())

        def step(data_iterator, chunk, _pos=position_ids, _mask=attention_mask, _labels=labels, _lm=loss_mask):
            output = chunk(next(data_iterator), _pos, _mask, labels=_labels)

            def loss_func(output_tensor):
                lm = _masked_sum(output_tensor, _lm)
                kd = model.compute_kd_loss(student_loss=lm, loss_reduction_fn=lambda x: _masked_sum(x, _lm))
                n = _lm.sum().to(torch.int)
                nonlocal local_loss
                local_loss = local_loss + kd["kd_loss"].detach().double()
                return kd["kd_loss"], n, {"kd_loss": kd["kd_loss"].detach()}

            return output, loss_func

        adjust = get_tensor_shapes_adjust_fn_for_distillation(
            ddp_chunks, seq_length=ids.shape[1], micro_batch_size=1, decoder_seq_length=None)
        get_forward_backward_func()(forward_step_func=step, data_iterator=iter([ids]), model=ddp_chunks,
                                    num_microbatches=1, seq_length=ids.shape[1], micro_batch_size=1,
                                    forward_only=False, adjust_tensor_shapes_fn=adjust)

    # Per-token normalisation over the global batch: the token count of every DP rank.
    num_tokens = torch.tensor(local_tokens, dtype=torch.int)
    finalize_model_grads(ddp_chunks, num_tokens=num_tokens.clone())
    from hybridquant.compat import cpu as cpu_compat

    with cpu_compat.cuda_type_names():
        ok, grad_norm, _ = opt.step()
    if not ok:
        raise RuntimeError("the optimiser step failed (non-finite gradients)")
    scheduler.step(increment=1)
    dp = parallel_state.get_data_parallel_group()
    totals = torch.tensor([float(local_loss), float(local_tokens)], dtype=torch.float64)
    if torch.distributed.is_initialized() and parallel_state.get_data_parallel_world_size() > 1:
        torch.distributed.all_reduce(totals, group=dp)
    return StepResult(loss_sum=float(totals[0]), tokens=int(totals[1]), grad_norm=float(grad_norm or 0.0),
                      lr=float(opt.param_groups[0]["lr"]))

