"""A chunked (state-space-duality) Mamba2 scan in plain PyTorch: what megatron-core's ``MambaMixer``
runs instead of mamba_ssm's sequential reference scan on CPU (``compat/cpu.py``), and, on request,
instead of mamba_ssm's Triton kernels on GPU.

The recurrence, per head ``h`` (group ``g`` of the head), position ``t``:

    state_t = exp(dt_t A_h) state_{t-1} + dt_t x_t B_t^T        state: (headdim, dstate)
    y_t     = state_t C_t + D_h x_t          (then y_t * silu(z_t) when z is given)

The sequence is cut into chunks of ``chunk_size`` positions. Inside a chunk the recurrence is the
quadratic form  y = (L * (C B^T)) (dt x)  with the decay matrix L[i, j] = exp(a_i - a_j) for j <= i
(a = cumulative sum of dt A within the chunk) and 0 above the diagonal; each chunk also produces
the state it leaves behind, and the states are passed between chunks by the same kind of decay
matrix over chunk boundaries. Everything except the decay exponents is a batched matrix product.

Numerics: the cumulative sums of the log-decay are taken in float64, differences of them are formed
in float64 (so exp(a_i - a_j) is computed from the segment's own sum, not from two large cumulative
sums that cancel), rounded to float32 and masked with -inf above the diagonal *before* the
exponential (so no exp of a positive number, no inf * 0), and where exp would give a subnormal
(factors < 1.2e-38, far below the rounding of any output they add to). Every decay factor is <= 1. The rest runs in
float32 (float64 inputs stay float64). The result equals the sequential scan within float32
rounding (``tests/test_ssd.py`` states and asserts the bound); it does not depend on the chunk size
beyond rounding, and sequences that are not a multiple of it are padded with dt = 0 (decay 1, no
input), which changes neither the outputs nor the final state.

Which scan megatron's MambaMixer calls is chosen by ``HYBRIDQUANT_MAMBA_SCAN`` (read at every call)
or, in process, by ``use(...)``:

* ``chunked``: this module (the default on CPU);
* ``sequential``: mamba_ssm's own pure-torch reference ops (``mamba_split_conv1d_scan_ref`` /
  ``selective_scan_ref``, a Python loop over positions), as before; CPU only;
* ``kernels``: mamba_ssm's fused Triton kernels (the default on GPU, where megatron calls them
  unpatched).

On GPU, ``chunked`` is installed only when ``HYBRIDQUANT_MAMBA_SCAN=chunked`` is set when the
compatibility layer is applied (``compat.cpu.apply``).
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.nn.functional as F

ENV = "HYBRIDQUANT_MAMBA_SCAN"
MODES = ("chunked", "sequential", "kernels")
_override: str | None = None

NO_LIMIT = (0.0, float("inf"))


def mode(default: str = "chunked") -> str:
    """The scan selected now: ``use(...)`` if active, else ``$HYBRIDQUANT_MAMBA_SCAN``, else ``default``."""
    value = _override or os.environ.get(ENV, "").strip().lower() or default
    if value not in MODES:
        raise ValueError(f"{ENV}={value!r}: expected one of {', '.join(MODES)}")
    return value


@contextlib.contextmanager
def use(value: str):
    """Select the Mamba scan inside a ``with`` block (in this process)."""
    global _override
    if value not in MODES:
        raise ValueError(f"Mamba scan {value!r}: expected one of {', '.join(MODES)}")
    previous, _override = _override, value
    try:
        yield
    finally:
        _override = previous


# exp(x) for x below this is not a normal float32 (< 1.2e-38): such factors are set to exactly 0
# (their terms are below float32 rounding of any output they would add to), which also keeps the
# exponential off the slow subnormal path (~10x slower on x86)
_UNDERFLOW = -87.0


def _decay(segment: torch.Tensor, dtype: torch.dtype, mask: torch.Tensor | None = None) -> torch.Tensor:
    """exp of a float64 log-decay, rounded to ``dtype``; 0 where ``mask`` is False and where it underflows."""
    segment = segment.to(dtype)
    drop = segment < _UNDERFLOW
    if mask is not None:
        drop |= ~mask
    return torch.exp(segment.masked_fill_(drop, float("-inf")))


def chunk_scan(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None, seq_idx=None,
               cu_seqlens=None, dt_softplus=False, dt_limit=NO_LIMIT, return_final_states=False,
               return_varlen_states=False, state_dtype=None):
    """The Mamba2 selective scan, chunked.

    x: (batch, seqlen, nheads, headdim); dt: (batch, seqlen, nheads); A: (nheads,);
    B, C: (batch, seqlen, ngroups, dstate); D: (nheads, headdim) or (nheads,); z: like x;
    dt_bias: (nheads,); initial_states: (batch, nheads, headdim, dstate).
    dt is processed as mamba_ssm does: + dt_bias, softplus if ``dt_softplus``, clamped to ``dt_limit``
    when that is not (0, inf).
    Returns out (batch, seqlen, nheads, headdim) in x's dtype, and with ``return_final_states`` the
    state after the last position (batch, nheads, headdim, dstate), float32 (float64 for float64 x)
    unless ``state_dtype`` is given. The signature is mamba_ssm's ``mamba_chunk_scan_combined``;
    packed sequences (``seq_idx``, ``cu_seqlens``, varlen states) are refused.
    """
    if seq_idx is not None or cu_seqlens is not None or return_varlen_states:
        raise NotImplementedError("packed sequences (seq_idx, cu_seqlens) need the CUDA mamba kernels")
    batch, seqlen, nheads, headdim = x.shape
    ngroups, dstate = B.shape[-2:]
    if nheads % ngroups:
        raise ValueError(f"{nheads} heads are not a multiple of {ngroups} groups")
    per_group = nheads // ngroups
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    T = max(1, min(int(chunk_size), seqlen))
    chunks = -(-seqlen // T)
    pad = chunks * T - seqlen

    dt = dt.to(work)
    if dt_bias is not None:
        dt = dt + dt_bias.to(work)
    if dt_softplus:
        dt = F.softplus(dt)
    if tuple(dt_limit) != NO_LIMIT:
        dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])

    xw, Bw, Cw = x.to(work), B.to(work), C.to(work)
    if pad:  # dt = 0 on padding: decay 1, no input
        dt = F.pad(dt, (0, 0, 0, pad))
        xw = F.pad(xw, (0, 0, 0, 0, 0, pad))
        Bw = F.pad(Bw, (0, 0, 0, 0, 0, pad))
        Cw = F.pad(Cw, (0, 0, 0, 0, 0, pad))

    # chunked layouts: heads as (group, head in group) next to the chunk index
    xc = xw.view(batch, chunks, T, nheads, headdim).permute(0, 1, 3, 2, 4)        # b c h T p
    dtc = dt.view(batch, chunks, T, nheads).permute(0, 1, 3, 2).contiguous()      # b c h T
    Bc = Bw.view(batch, chunks, T, ngroups, dstate).permute(0, 1, 3, 2, 4)        # b c g T n
    Cc = Cw.view(batch, chunks, T, ngroups, dstate).permute(0, 1, 3, 2, 4)        # b c g T n

    # log-decay, cumulative within each chunk, in float64
    a = torch.cumsum(dtc.double() * A.double().view(1, 1, nheads, 1), dim=-1)   # b c h T
    causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
    L = _decay(a.unsqueeze(-1) - a.unsqueeze(-2), work, causal)                  # b c h T(i) T(j)
    xdt = (xc * dtc.unsqueeze(-1)).contiguous()                                   # b c h T p

    # 1. within each chunk: y_i = sum_j (C_i . B_j) L[i, j] dt_j x_j
    CB = torch.matmul(Cc, Bc.transpose(-1, -2))                                  # b c g T T
    M = L.view(batch, chunks, ngroups, per_group, T, T) * CB.unsqueeze(3)
    y = torch.matmul(M.view(batch, chunks, nheads, T, T), xdt)                   # b c h T p

    # 2. the state each chunk leaves behind, from its own inputs: sum_j exp(a_last - a_j) dt_j x_j B_j^T
    to_end = _decay(a[..., -1:] - a, work)                                        # b c h T
    xs = (xdt * to_end.unsqueeze(-1)).view(batch, chunks, ngroups, per_group, T, headdim)
    xs = xs.permute(0, 1, 2, 3, 5, 4).reshape(batch, chunks, ngroups, per_group * headdim, T)
    states = torch.matmul(xs, Bc).view(batch, chunks, nheads, headdim, dstate)   # b c h p n

    # 3. states at chunk boundaries: h_k = sum_{m <= k} exp(s_k - s_m) S_m, S_0 = initial state,
    #    S_m = the state chunk m-1 leaves; s = cumulative chunk log-decay (float64)
    if initial_states is None:
        first = states.new_zeros(batch, 1, nheads, headdim, dstate)
    else:
        first = initial_states.to(work).view(batch, 1, nheads, headdim, dstate)
    S = torch.cat([first, states], dim=1)                                        # b c+1 h p n
    s = F.pad(torch.cumsum(a[..., -1], dim=1), (0, 0, 1, 0)).transpose(1, 2)     # b h c+1
    lower = torch.ones(chunks + 1, chunks + 1, dtype=torch.bool, device=x.device).tril()
    W = _decay(s.unsqueeze(-1) - s.unsqueeze(-2), work, lower)
    H = torch.matmul(W, S.permute(0, 2, 1, 3, 4).reshape(batch, nheads, chunks + 1, headdim * dstate))
    H = H.view(batch, nheads, chunks + 1, headdim, dstate)
    final = H[:, :, -1] if state_dtype is None else H[:, :, -1].to(state_dtype)   # b h p n
    start = H[:, :, :-1].permute(0, 2, 1, 3, 4)                                   # b c h p n

    # 4. what the incoming state contributes: exp(a_i) C_i . h_start
    hs = start.reshape(batch, chunks, ngroups, per_group, headdim, dstate)
    hs = hs.permute(0, 1, 2, 5, 3, 4).reshape(batch, chunks, ngroups, dstate, per_group * headdim)
    y_in = torch.matmul(Cc, hs).view(batch, chunks, ngroups, T, per_group, headdim)
    y_in = y_in.permute(0, 1, 2, 4, 3, 5).reshape(batch, chunks, nheads, T, headdim)
    y = y + y_in * _decay(a, work).unsqueeze(-1)

    out = y.permute(0, 1, 3, 2, 4).reshape(batch, chunks * T, nheads, headdim)[:, :seqlen]
    if D is not None:
        Dw = D.to(work)
        out = out + xw[:, :seqlen] * (Dw if Dw.dim() == 2 else Dw.unsqueeze(-1))
    if z is not None:
        out = out * F.silu(z.to(work))
    out = out.to(x.dtype)
    return (out, final) if return_final_states else out


def causal_conv1d(x, weight, bias=None, activation=None):
    """Depthwise causal convolution, as causal-conv1d's reference: x (batch, dim, seqlen),
    weight (dim, width), bias (dim,); ``activation`` None or "silu"/"swish"."""
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"activation {activation!r}: expected None, silu or swish")
    seqlen, (dim, width) = x.shape[-1], weight.shape
    out = F.conv1d(x.to(weight.dtype), weight.unsqueeze(1), bias, padding=width - 1, groups=dim)[..., :seqlen]
    return (out if activation is None else F.silu(out)).to(x.dtype)


def split_conv1d_scan(zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size, initial_states=None,
                      seq_idx=None, dt_limit=NO_LIMIT, return_final_states=False, activation="silu",
                      rmsnorm_weight=None, rmsnorm_eps=1e-6, outproj_weight=None, outproj_bias=None,
                      headdim=None, ngroups=1, norm_before_gate=True, state_dtype=None, scan=None, **_unused):
    """What mamba_ssm's ``mamba_split_conv1d_scan_combined`` computes (megatron's training/calibration
    forward): split z | xBC | dt, causal conv1d + activation on xBC, chunked scan with dt softplus,
    z gating, optional output projection. zxbcdt: (batch, seqlen, 2 dim + 2 ngroups dstate + nheads).
    ``scan``: the scan to run, with ``chunk_scan``'s signature (default ``chunk_scan``; on GPU without
    causal-conv1d's compiled kernel, mamba_ssm's Triton ``mamba_chunk_scan_combined``: compat/gpu.py)."""
    if seq_idx is not None:
        raise NotImplementedError("packed sequences (seq_idx) need the CUDA mamba kernels")
    if rmsnorm_weight is not None:
        raise NotImplementedError("the fused gated RMSNorm needs the CUDA mamba kernels")
    if D.dim() == 1:
        if headdim is None:
            raise ValueError("headdim is required when D is per head")
        nheads = D.shape[0]
    else:
        nheads, headdim = D.shape
    batch, seqlen, width = zxbcdt.shape
    dim = nheads * headdim
    dstate = (width - 2 * dim - nheads) // ngroups // 2
    if width != 2 * dim + 2 * ngroups * dstate + nheads:
        raise ValueError(f"zxbcdt width {width} does not split into z, x, B, C, dt")
    z, xBC, dt = torch.split(zxbcdt, [dim, dim + 2 * ngroups * dstate, nheads], dim=-1)
    xBC = causal_conv1d(xBC.transpose(1, 2), conv1d_weight, conv1d_bias, activation=activation).transpose(1, 2)
    x, B, C = torch.split(xBC, [dim, ngroups * dstate, ngroups * dstate], dim=-1)
    result = (scan or chunk_scan)(
        x.reshape(batch, seqlen, nheads, headdim), dt.to(x.dtype), A,
        B.reshape(batch, seqlen, ngroups, dstate), C.reshape(batch, seqlen, ngroups, dstate), chunk_size,
        D=D.float(), z=z.reshape(batch, seqlen, nheads, headdim), dt_bias=dt_bias, dt_softplus=True,
        dt_limit=dt_limit, initial_states=initial_states, return_final_states=return_final_states,
        **({} if state_dtype is None else {"state_dtype": state_dtype}),
    )
    out, final = result if return_final_states else (result, None)
    out = out.reshape(batch, seqlen, dim)
    if outproj_weight is not None:
        out = F.linear(out, outproj_weight, outproj_bias)
    return (out, final) if return_final_states else out
