"""Calibration throughput: the quantize stage's path vs transformers + ModelOpt, FLOP/s vs GEMM peak.

    .venv/bin/python bench/calibration_throughput.py                      # bench_medium, FP8 conservative
    .venv/bin/python bench/calibration_throughput.py --samples 32 --threads 2 --recipe mamba_moe_fp8_aggressive
    .venv/bin/python bench/calibration_throughput.py --long --seq-len 4096 --samples 2   # 4,096-token samples

Same model (conf/model/bench_medium.yaml, ~58M parameters, pattern MEMEM*EMEM*E), same ModelOpt
config (the recipe's, ``recipes.modelopt_config``), same calibration samples (``calib.load``), same
machine, one run:

* **hybridquant**: the quantize stage's own ``calibrate`` (stages/quantize.py: HF checkpoint ->
  megatron-bridge -> Megatron HybridModel -> ``mtq.quantize`` with the stage's forward loop), under
  torchrun with 1 rank, and again with 2 ranks (EP2: experts split, tokens dispatched all-to-all);
* **transformers**: ``NemotronHForCausalLM.from_pretrained`` (its config as shipped) + ``mtq.quantize``
  with a forward loop over the same samples, in one process: the path a user would otherwise take.

Tokens/s = calibration tokens / the time ``mtq.quantize`` takes (the stage's ``calibrate_s``: inserting
quantizers, the calibration forwards, amax synchronisation). Printed: both rates and their ratio;
the model's matmul FLOPs per token (Mamba in/out projections, attention projections and causal
QK^T/PV, router, top-k routed experts + shared expert, lm_head; the SSM scan and conv1d are not
GEMMs and are not counted), the achieved FLOP/s divided by this machine's float32 dense GEMM peak
(``torch.matmul`` of 2048x2048 matrices on the same number of threads, measured in this run, before
and after); and where the calibration time goes, measured per rank: data (read + tokenize + shard,
timed around ``calib.load``), forward with every quantizer disabled (the same batches again after
calibration), quantizer statistics (calibrated forwards minus that), setup + amax sync (the rest of
``mtq.quantize``), communication (every torch.distributed collective, timed by wrapping them;
includes waiting for the peer).

``--long``: every sample is exactly ``--seq-len`` tokens (shipped text rows concatenated, each sample
starting at another row, then truncated), e.g. 4,096-token samples; by default samples are the
shipped rows, truncated to ``--seq-len``. The Mamba scan is whatever ``HYBRIDQUANT_MAMBA_SCAN``
selects (``chunked`` by default, ``sequential`` for mamba_ssm's reference loop: docs/compat.md); the
report prints it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from _common import (
    BENCH_MODEL,
    REPO,
    clean_env,
    gemm_peak_gflops,
    load_average,
    long_samples,
    materialize,
    model_bytes,
    torchrun,
)

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "_all_gather_base", "all_gather_object",
               "all_to_all", "all_to_all_single", "broadcast", "broadcast_object_list", "reduce_scatter_tensor",
               "_reduce_scatter_base", "barrier", "send", "recv", "isend", "irecv", "batch_isend_irecv")


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from hybridquant import schema

    schema.register()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return hydra_compose("quantize", overrides=overrides)


def overrides(args) -> list[str]:
    out = [f"+quant={args.recipe}", f"model={args.model}", f"calib.num_samples={args.samples}",
           f"calib.max_seq_len={args.seq_len}"]
    return out + ([f"calib.path={args.calib_path}"] if args.calib_path else [])


# --- FLOPs ---------------------------------------------------------------------------------------

def flops(hf_config: dict, lengths: list[int]) -> dict[str, float]:
    """Matmul FLOPs (2 per multiply-add) of forwarding sequences of ``lengths``, by component."""
    c = hf_config
    h, pattern = c["hidden_size"], c["hybrid_override_pattern"]
    tokens = sum(lengths)
    d_inner = c["mamba_num_heads"] * c["mamba_head_dim"]
    in_proj = 2 * d_inner + 2 * c["n_groups"] * c["ssm_state_size"] + c["mamba_num_heads"]
    q, kv = c["num_attention_heads"] * c["head_dim"], c["num_key_value_heads"] * c["head_dim"]
    causal_pairs = sum(n * (n + 1) // 2 for n in lengths)  # query-key pairs under the causal mask
    experts = c["num_experts_per_tok"] * 2 * h * c["moe_intermediate_size"]  # up + down per routed expert
    shared = c.get("n_shared_experts", 1) * 2 * h * c["moe_shared_expert_intermediate_size"]
    out = {"mamba in/out_proj": pattern.count("M") * 2 * tokens * (h * in_proj + d_inner * h),
           "attention projections": pattern.count("*") * 2 * tokens * (h * (q + 2 * kv) + q * h),
           "attention QK^T, PV": pattern.count("*") * 2 * 2 * q * causal_pairs,
           "router": pattern.count("E") * 2 * tokens * h * c["n_routed_experts"],
           "routed experts (top-k)": pattern.count("E") * 2 * tokens * experts,
           "shared expert": pattern.count("E") * 2 * tokens * shared,
           "dense MLP": pattern.count("-") * 2 * tokens * 2 * h * c.get("intermediate_size", 0),
           "lm_head": 2 * tokens * h * c["vocab_size"]}
    return {k: float(v) for k, v in out.items() if v}


# --- timing helpers (inside workers) -------------------------------------------------------------
# Every duration is [wall seconds, CPU seconds of this process]: on a shared machine the CPU time a
# process got is a load-robust measure of its work; the wall time also holds what it waited for.

def now() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def since(t0) -> list[float]:
    wall, cpu = now()
    return [wall - t0[0], cpu - t0[1]]


def total(spans) -> list[float]:
    return [sum(s[0] for s in spans), sum(s[1] for s in spans)]


class CommTimer:
    """Wall time spent inside torch.distributed collectives (wrapped at module level)."""

    def __init__(self):
        self.seconds, self.calls = [0.0, 0.0], 0

    def install(self) -> None:
        import torch.distributed as dist
        from megatron.core.tensor_parallel import mappings

        for name in COLLECTIVES:
            real = getattr(dist, name, None)
            if real is not None:
                setattr(dist, name, self._wrap(real))
        # megatron binds these at import time (tensor-parallel and expert-parallel gathers/scatters)
        for name in ("dist_all_gather_func", "dist_reduce_scatter_func"):
            real = getattr(mappings, name, None)
            if real is not None:
                setattr(mappings, name, self._wrap(real))

    def _wrap(self, fn):
        def timed(*args, **kwargs):
            t = now()
            try:
                return fn(*args, **kwargs)
            finally:
                wall, cpu = since(t)
                self.seconds = [self.seconds[0] + wall, self.seconds[1] + cpu]
                self.calls += 1
        return timed


class ForwardTimer:
    """Durations of a module's forward calls, and the communication inside them."""

    def __init__(self, module, comm: CommTimer):
        self.spans, self.comm_spans, self._start, self._comm = [], [], None, comm
        self.handles = [module.register_forward_pre_hook(self._pre), module.register_forward_hook(self._post)]

    def _pre(self, *_):
        self._start, self._comm0 = now(), list(self._comm.seconds)

    def _post(self, *_):
        self.spans.append(since(self._start))
        self.comm_spans.append([a - b for a, b in zip(self._comm.seconds, self._comm0)])

    @property
    def elapsed(self) -> list[float]:
        return total(self.spans)

    @property
    def comm_inside(self) -> list[float]:
        return total(self.comm_spans)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


SCAN_RANGE = "hybridquant.mamba_scan"  # hybridquant.compat.cpu.SCAN_RANGE (the megatron workers only)
GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_scaled_dot_product_flash_attention_for_cpu")


def forward_profile(run_forwards) -> dict:
    """Self CPU time of one pass of ``run_forwards`` by operator: the GEMM share and the largest others."""
    import torch.profiler

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        run_forwards()
    averages = prof.key_averages()
    events = [(e.key, e.self_cpu_time_total / 1e6) for e in averages]
    total = sum(t for _, t in events)
    gemm = sum(t for k, t in events if k in GEMM_OPS)
    # the Mamba scan (conv1d included), inclusive of the operators it calls: compat/cpu.py's profiler range
    scan = sum(e.cpu_time_total for e in averages if e.key == SCAN_RANGE) / 1e6
    others = sorted(((k, t) for k, t in events if k not in GEMM_OPS), key=lambda kt: -kt[1])[:4]
    return {"total_s": total, "gemm_s": gemm, "scan_s": scan, "top_other": others}


def disable_quantizers(model) -> int:
    from modelopt.torch.quantization.nn import TensorQuantizer

    enabled = [m for m in model.modules() if isinstance(m, TensorQuantizer) and m.is_enabled]
    for m in enabled:
        m.disable()
    return len(enabled)


def enabled_weight_quantizers(model) -> int:
    from modelopt.torch.quantization.nn import TensorQuantizer

    return sum(1 for n, m in model.named_modules()
               if isinstance(m, TensorQuantizer) and n.endswith("weight_quantizer") and m.is_enabled)


# --- workers -------------------------------------------------------------------------------------

def megatron_worker(args) -> None:
    """The quantize stage's calibrate(), instrumented (under torchrun)."""
    import torch
    import torch.distributed as dist

    from hybridquant import calib, forward, memory, parallel, quantization
    from hybridquant.stages import quantize as stage

    cfg = compose(overrides(args) + args.layout)
    p = stage.plan(cfg)
    parallel.init(p.layout, seed=cfg.seed, backend="gloo", timeout_s=600)
    comm = CommTimer()
    comm.install()
    seen: dict = {}
    real_load, real_quantize = calib.load, quantization.quantize

    def timed_load(*a, **kw):
        t = now()
        data = real_load(*a, **kw)
        seen["data_s"] = since(t)
        return data

    def timed_quantize(chunks, mtq_config, batches, before_batch=None):
        seen["batches"] = batches
        fwd = ForwardTimer(chunks[0], comm)
        comm0, t = list(comm.seconds), now()
        real_quantize(chunks, mtq_config, batches, before_batch=before_batch)
        seen["quantize_s"] = since(t)
        seen["comm_quantize_s"] = [a - b for a, b in zip(comm.seconds, comm0)]
        fwd.remove()
        seen["calib_forward_s"], seen["comm_calib_forward_s"] = fwd.elapsed, fwd.comm_inside
        seen["calib_forwards"] = len(fwd.spans)

    calib.load, quantization.quantize = timed_load, timed_quantize
    result = stage.calibrate(cfg, p)
    calib.load, quantization.quantize = real_load, real_quantize

    chunk = result.loaded.chunks[0]
    weight_quantizers = enabled_weight_quantizers(chunk)
    disable_quantizers(chunk)
    fwd = ForwardTimer(chunk, comm)
    forward.run(result.loaded.chunks, seen["batches"])
    fwd.remove()
    profile = forward_profile(lambda: forward.run(result.loaded.chunks, seen["batches"]))
    row = {"rank": dist.get_rank(), "world": dist.get_world_size(), "layout": p.layout.tag,
           "tokens_global": result.data.tokens, "tokens_local": sum(b.numel() for b in seen["batches"]),
           "lengths": [s.shape[1] for s in result.data.samples], "calibrate_s": result.timings["calibrate_s"],
           "load_s": result.timings["load_s"], "plain_forward_s": fwd.elapsed,
           "comm_plain_forward_s": fwd.comm_inside, "weight_quantizers": weight_quantizers,
           "peak_rss_mib": memory.peak_mib(), "threads": torch.get_num_threads(), "profile": profile,
           **{k: v for k, v in seen.items() if k != "batches"}}
    rows = memory.gather(row)
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps(rows))
    parallel.shutdown()


def hf_worker(args) -> None:
    """transformers' NemotronHForCausalLM + mtq.quantize, as a user would do it (one process)."""
    import modelopt.torch.quantization as mtq
    import torch
    from transformers import AutoTokenizer, NemotronHForCausalLM

    from hybridquant import calib, source
    from hybridquant.stages import quantize as stage

    cfg = compose(overrides(args))
    p = stage.plan(cfg)
    hf_dir = source.resolve(p.model_cfg)
    t = time.perf_counter()
    model = NemotronHForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    load_s = time.perf_counter() - t
    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
    t = now()
    data = calib.load(cfg.calib.path, tokenizer, cfg.calib.num_samples, cfg.calib.max_seq_len, cfg.calib.seed)
    data_s = since(t)
    with torch.no_grad():  # warm-up, as the stage's probe forward is for the Megatron model
        model(data.samples[0], use_cache=False)

    def forward_loop(m):
        with torch.no_grad():
            for batch in data.samples:
                m(batch, use_cache=False)

    comm = CommTimer()
    fwd = ForwardTimer(model, comm)
    t = now()
    model = mtq.quantize(model, p.mtq_config, forward_loop)
    quantize_s = since(t)
    fwd.remove()
    calib_forward = fwd.elapsed
    weight_quantizers = enabled_weight_quantizers(model)
    disable_quantizers(model)
    fwd = ForwardTimer(model, comm)
    forward_loop(model)
    fwd.remove()
    profile = forward_profile(lambda: forward_loop(model))
    row = {"profile": profile, "rank": 0, "world": 1, "layout": "transformers", "tokens_global": data.tokens, "tokens_local": data.tokens,
           "lengths": [s.shape[1] for s in data.samples], "calibrate_s": quantize_s[0], "quantize_s": quantize_s,
           "load_s": load_s, "data_s": data_s, "calib_forward_s": calib_forward, "calib_forwards": len(fwd.spans),
           "comm_calib_forward_s": [0.0, 0.0], "comm_quantize_s": comm.seconds, "plain_forward_s": fwd.elapsed,
           "comm_plain_forward_s": [0.0, 0.0], "weight_quantizers": weight_quantizers, "threads": torch.get_num_threads()}
    Path(args.out).write_text(json.dumps([row]))


# --- the report ----------------------------------------------------------------------------------

def run_worker(kind: str, args, tmp: Path, nproc: int = 1, layout: list[str] | None = None) -> list[dict]:
    import subprocess

    out = tmp / f"{kind}-{nproc}.json"
    worker = ["--worker", kind, "--out", str(out), "--model", args.model, "--recipe", args.recipe,
              "--samples", str(args.samples), "--seq-len", str(args.seq_len),
              *(["--calib-path", args.calib_path] if args.calib_path else []), "--", *(layout or [])]
    if kind == "megatron":
        torchrun(nproc, Path(__file__), worker, threads=args.threads)
    else:
        proc = subprocess.run([sys.executable, __file__, *worker], cwd=REPO, env=clean_env(args.threads),
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"transformers worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def rank_tag(row: dict, rows: list) -> str:
    return f" rank {row['rank']}" if len(rows) > 1 else ""


def breakdown(row: dict, clock: int) -> str:
    """Where data + mtq.quantize went, in wall (clock 0) or CPU (clock 1) seconds."""
    r = {k: v[clock] for k, v in row.items() if isinstance(v, list) and len(v) == 2 and k.endswith("_s")}
    comm = r["comm_quantize_s"]
    forward = r["plain_forward_s"] - r["comm_plain_forward_s"]
    stats = (r["calib_forward_s"] - r["comm_calib_forward_s"]) - forward
    setup = r["quantize_s"] - r["calib_forward_s"] - (comm - r["comm_calib_forward_s"])
    whole = r["data_s"] + r["quantize_s"]
    parts = {"data": r["data_s"], "forward (quantizers off)": forward, "quantizer statistics": stats,
             "setup + amax sync": setup, "communication": comm}
    return ", ".join(f"{k} {v:.2f} s ({v / whole:.0%})" for k, v in parts.items()) + f"; total {whole:.2f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=BENCH_MODEL)
    parser.add_argument("--recipe", default="mamba_moe_fp8_conservative")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (OMP_NUM_THREADS)")
    parser.add_argument("--long", action="store_true", help="every sample exactly --seq-len tokens (rows concatenated)")
    parser.add_argument("--calib-path", help=argparse.SUPPRESS)
    parser.add_argument("--worker", choices=["megatron", "hf"], help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("layout", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return {"megatron": megatron_worker, "hf": hf_worker}[args.worker](args)
    if args.samples < 2 or args.seq_len < 16 or args.threads < 1:
        raise SystemExit("error: --samples must be at least 2, --seq-len at least 16, --threads at least 1")

    from hybridquant import source

    hf_dir = materialize(args.model)
    hf_config = source.read_config(hf_dir)
    from hybridquant.compat import ssd

    print(f"machine: {load_average()} at start; {args.threads} thread(s) per process; Mamba scan {ssd.mode()} "
          f"(${ssd.ENV})")
    peak = {1: gemm_peak_gflops(args.threads), 2: gemm_peak_gflops(2 * args.threads)}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.long:
            args.calib_path = str(tmp / "long.jsonl")
            long_samples(Path(args.calib_path), args.samples, args.seq_len, domain="long")
        hf = run_worker("hf", args, tmp)[0]
        meg = run_worker("megatron", args, tmp)
        meg2 = run_worker("megatron", args, tmp, nproc=2, layout=["parallel.ep=2"])
    peak_after = {1: gemm_peak_gflops(args.threads), 2: gemm_peak_gflops(2 * args.threads)}

    m = meg[0]
    params = model_bytes(hf_dir, "float32")[0] // 4
    f = flops(hf_config, m["lengths"])
    total_flops = sum(f.values())
    tokens = m["tokens_global"]
    print(f"model: {args.model}, {params / 1e6:.1f}M parameters (float32), pattern {hf_config['hybrid_override_pattern']}; "
          f"recipe {args.recipe}; {len(m['lengths'])} samples, {tokens} tokens (max {args.seq_len} per sample)")
    print(f"weight quantizers enabled: hybridquant {m['weight_quantizers']}, transformers {hf['weight_quantizers']}")
    if hf["weight_quantizers"] != m["weight_quantizers"]:
        print("  (the same ModelOpt config quantizes fewer weights on transformers' model: its routed experts are "
              "fused 3-D parameters, not Linear modules, and ModelOpt leaves them unquantized)")
    runs = {"hybridquant 1 rank": [*meg], "transformers": [hf], "hybridquant EP2": [*meg2]}
    wall = {k: r[0]["tokens_global"] / r[0]["calibrate_s"] for k, r in runs.items()}
    # CPU: every rank's CPU seconds in mtq.quantize, summed (the work done, whatever else ran)
    cpu = {k: r[0]["tokens_global"] / sum(x["quantize_s"][1] for x in r) for k, r in runs.items()}
    h, t, e = "hybridquant 1 rank", "transformers", "hybridquant EP2"
    print("calibration tokens/s (wall, the stage's calibrate_s): " + ", ".join(f"{k} {v:.0f}" for k, v in wall.items()))
    print("calibration tokens per CPU-second (all ranks): " + ", ".join(f"{k} {v:.0f}" for k, v in cpu.items()))
    print(f"ratio hybridquant / transformers (1 process each): {wall[h] / wall[t]:.2f} wall, {cpu[h] / cpu[t]:.2f} CPU")
    print(f"ratio hybridquant 2 ranks / 1 rank: {wall[e] / wall[h]:.2f} wall, {cpu[e] / cpu[h]:.2f} CPU")
    print(f"matmul FLOPs per token: {total_flops / tokens / 1e6:.1f} M (" + ", ".join(
        f"{k} {v / tokens / 1e6:.1f}" for k, v in f.items()) + ")")
    best = {w: (max(peak[w][0], peak_after[w][0]), max(peak[w][1], peak_after[w][1])) for w in peak}
    print("dense GEMM peak (float32 2048^3 torch.matmul), GFLOP/s per wall second / per CPU-second per core: "
          + "; ".join(f"{w * args.threads} thread(s) {peak[w][0]:.1f} / {peak[w][1]:.1f} before, "
                      f"{peak_after[w][0]:.1f} / {peak_after[w][1]:.1f} after" for w in peak))
    for name, rows in runs.items():
        world = rows[0]["world"]
        achieved_wall = total_flops / rows[0]["calibrate_s"] / 1e9
        achieved_cpu = total_flops / sum(x["quantize_s"][1] for x in rows) / 1e9
        print(f"achieved {name}: {achieved_wall:.2f} GFLOP/s wall / GEMM peak on {world * args.threads} thread(s) "
              f"{best[world][0]:.1f} = {achieved_wall / best[world][0]:.3f}; per CPU-second per core "
              f"{achieved_cpu:.2f} / {best[world][1]:.1f} = {achieved_cpu / best[world][1]:.3f}")
    for clock, label in ((0, "wall"), (1, "CPU")):
        print(f"where the time goes (data + mtq.quantize), {label} seconds per rank:")
        for name, rows in runs.items():
            for r in rows:
                print(f"  {name}{rank_tag(r, rows)}: "
                      f"{breakdown(r, clock)}")
    print("inside the forward (quantizers off, torch.profiler self CPU time): GEMM share (all matmuls), Mamba "
          "conv1d + scan (inclusive, its matmuls too), largest other operators:")
    for name, r in (("transformers", hf), ("hybridquant 1 rank", m), ("hybridquant EP2 rank 0", meg2[0])):
        prof = r["profile"]
        scan = f", Mamba conv1d + scan {prof['scan_s'] / prof['total_s']:.0%}" if prof.get("scan_s") else ""
        print(f"  {name}: GEMM {prof['gemm_s'] / prof['total_s']:.0%} of {prof['total_s']:.2f} s{scan}; "
              + ", ".join(f"{k} {t / prof['total_s']:.0%}" for k, t in prof["top_other"]))
    print(f"machine: {load_average()} at end")


if __name__ == "__main__":
    main()
