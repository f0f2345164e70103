"""Token-by-token (recurrent) inference of a HybridModel, with megatron-core's static inference context.

``prefill`` runs a prompt as one forward: attention layers fill their KV cache, Mamba layers their
convolution and SSM states. Each ``step`` then feeds one token: a Mamba layer advances its state by
one token (``MambaMixer._decode``), attention attends to its cache. This is how a hybrid model
generates, and the path whose SSM state precision ``ssm_state`` sets; ``forward.run`` scans whole
sequences instead. ``teacher_forced_logits`` scores a sequence this way (evaluation), ``greedy``
generates.

World size 1 (TP = PP = 1) and one sequence at a time. megatron-core 0.19's static-batching Mamba
step passes the mixer its [1, batch, ...] projection where the step kernels expect
[batch, 1, ...], so a batch of several sequences would be mixed into one; it is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hybridquant.errors import UserError
from hybridquant.model import LoadedModel, causal_inputs
from hybridquant.ssm_state import StatePrecision, attach


@dataclass
class Session:
    model: torch.nn.Module
    context: object  # megatron's StaticInferenceContext
    vocab_size: int

    @property
    def position(self) -> int:
        return self.context.sequence_len_offset


def start(loaded: LoadedModel, max_length: int, precision: StatePrecision = StatePrecision()) -> Session:
    """An empty cache for one sequence of up to ``max_length`` tokens."""
    from megatron.core import parallel_state
    from megatron.core.inference.contexts import StaticInferenceContext

    if parallel_state.get_tensor_model_parallel_world_size() != 1 or \
            parallel_state.get_pipeline_model_parallel_world_size() != 1:
        raise UserError("token-by-token decoding runs with tp=1 and pp=1")
    context = StaticInferenceContext(max_batch_size=1, max_sequence_length=max_length)
    context.config.materialize_only_last_token_logits = False  # logits at every prefill position
    attach(context, precision)
    return Session(model=loaded.module, context=context, vocab_size=loaded.hf_vocab_size)


def _forward(session: Session, ids: torch.Tensor) -> torch.Tensor:
    from megatron.core.inference.utils import InferenceMode

    if ids.dim() != 2 or ids.shape[0] != 1:
        raise UserError(f"decoding takes one sequence of token ids, shape [1, n]; got {tuple(ids.shape)}")
    end = session.position + ids.shape[1]
    if end > session.context.max_sequence_length:
        raise UserError(f"position {end} is past the cache's max_length {session.context.max_sequence_length}")
    ids = ids.to(next(session.model.parameters()).device)
    positions, mask = causal_inputs(ids)
    if session.position > 0:  # a step: one query that sees the whole cache
        positions, mask = positions + session.position, None
    with torch.no_grad(), InferenceMode.active():
        logits = session.model(ids, positions, mask, inference_context=session.context, runtime_gather_output=True)
    session.context.increment_sequence_len_offset(ids.shape[1])
    return logits[..., : session.vocab_size]


def prefill(session: Session, ids: torch.Tensor) -> torch.Tensor:
    """Run the prompt ``ids`` [1, n] into an empty cache; logits [1, n, vocab]."""
    if session.position != 0:
        raise UserError("prefill starts a sequence; this session already holds one")
    return _forward(session, ids)


def step(session: Session, token: int) -> torch.Tensor:
    """Feed one token at the next position; its logits [1, 1, vocab]."""
    if session.position == 0:
        raise UserError("step continues a sequence; prefill it first")
    return _forward(session, torch.tensor([[token]]))


def teacher_forced_logits(loaded: LoadedModel, ids: torch.Tensor, precision: StatePrecision = StatePrecision(),
                          prompt_length: int = 1) -> tuple[torch.Tensor, Session]:
    """Logits [1, n, vocab] at every position of ``ids`` [1, n]: the first ``prompt_length`` tokens
    are prefilled, each later token is fed by a step. Also returns the session (its final states)."""
    session = start(loaded, ids.shape[1], precision)
    logits = [prefill(session, ids[:, :prompt_length])]
    logits += [step(session, int(token)) for token in ids[0, prompt_length:]]
    return torch.cat(logits, dim=1), session


def greedy(loaded: LoadedModel, prompt: torch.Tensor, max_new_tokens: int,
           precision: StatePrecision = StatePrecision(), stop_ids: tuple[int, ...] = ()) -> list[int]:
    """Greedy continuation of ``prompt`` [1, n]: up to ``max_new_tokens`` ids, ending at a stop id."""
    session = start(loaded, prompt.shape[1] + max_new_tokens, precision)
    logits = prefill(session, prompt)
    generated: list[int] = []
    for _ in range(max_new_tokens):
        if generated:
            logits = step(session, generated[-1])
        generated.append(int(logits[0, -1].argmax()))
        if generated[-1] in stop_ids:
            break
    return generated
