"""The GPU check: quantize -> export -> evaluate of bench_medium on one CUDA GPU (NCCL, world size 1),
compared with the same runs on the CPU, plus calibration tokens/s, TFLOP/s and peak GPU memory.

    bash bench/gpu_check.sh            # on the lent machine: installs wheels/gpu/, runs this, then the gpu tests
    python bench/gpu_check.py --out DIR [--samples 16 --seq-len 256 --perf-samples 16 --perf-seq-len 2048]

What runs (each stage a torchrun job with one rank; docs/gpu.md):

1. ``probe``: versions, the device, whether Transformer-Engine and mamba-ssm / causal-conv1d's compiled
   extensions are there, which Mamba scan megatron's mixer calls after ``compat`` (compat/gpu.py), and
   the GPU's dense GEMM peak (8192^3 ``torch.matmul``: float32, TF32, bfloat16);
2. in the background: the **CPU reference** (``CUDA_VISIBLE_DEVICES=`` : gloo, the chunked scan):
   quantize -> export -> evaluate; and ModelOpt's FP8 CUDA extension JIT-built once (nvcc);
3. **GPU, IEEE float32** (``NVIDIA_TF32_OVERRIDE=0``, ``TRITON_F32_DEFAULT=ieee``, ModelOpt's FP8 fake
   quantization in plain torch: the CPU's arithmetic): the same three stages, compared with the CPU
   reference with tight bounds (float32 summation order);
4. **GPU, default numerics** (TF32 in the Triton scan's dot products, ModelOpt's CUDA extension when it
   built): the same quantize, compared with looser bounds; then calibration on longer samples
   (``--perf-*``), calibrated twice in one process, the second (warm: Triton autotuning, inductor
   compilation done) timed for tokens/s and TFLOP/s.

Each stage is run by this script's ``--stage`` worker, which calls the stage's ``run`` as the
pipeline/<stage>.py entry point does and records the peak GPU memory and wall time around it.
Exit status 0 only if every bound holds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

MODEL = "bench_medium"
RECIPE = ["+quant=mamba_moe_fp8_conservative", "quant.kv_cache=fp8"]
IEEE = {"NVIDIA_TF32_OVERRIDE": "0", "TRITON_F32_DEFAULT": "ieee", "HYBRIDQUANT_MODELOPT_CUDA_EXT": "0"}
CPU = {"CUDA_VISIBLE_DEVICES": ""}

# GPU vs CPU. IEEE: float32 everywhere, only the summation order differs (GEMM kernels, the Triton scan
# vs the chunked scan: 3e-7 apart on CPU); an activation on an FP8 rounding boundary may round the other
# way, hence the looser quantized bounds (the CPU alone, 4 threads vs 1, measured: amax 1.3e-6, probe
# logits 3.6e-7 before quantization and 1.7e-3 after, KL mean 4e-5). Default: TF32 (10-bit mantissa, 2^-11 relative per product)
# in the scan's dot products, summed over 12 layers.
BOUNDS = {
    "ieee": {"weight_amax": 0.0, "amax": 1e-4, "logits_before": 1e-4, "logits_after": 1e-2,
             "input_scale": 1e-4, "fp8_bytes_differing": 0.0, "kl_mean": 2e-2, "perplexity": 1e-4,
             "layer_rel_l2": 2e-2},
    "default": {"weight_amax": 0.0, "amax": 3e-2, "logits_before": 1e-2, "logits_after": 3e-2},
}


# --- workers (inside torchrun / child processes) --------------------------------------------------

def compose(config_name: str, overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from hybridquant import schema

    schema.register()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return hydra_compose(config_name, overrides=overrides)


def _cuda_memory() -> dict:
    import torch

    if not torch.cuda.is_available():
        return {}
    torch.cuda.synchronize()
    return {"cuda_peak_allocated_mib": torch.cuda.max_memory_allocated() / 2**20,
            "cuda_peak_reserved_mib": torch.cuda.max_memory_reserved() / 2**20}


def stage_worker(stage: str, root: Path, record: Path, overrides: list[str]) -> None:
    """One stage, as pipeline/<stage>.py runs it, with the peak GPU memory and wall time around it."""
    import torch

    from hybridquant import logs, parallel

    logs.setup()
    t0 = time.perf_counter()
    out: dict = {"stage": stage, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    if stage == "quantize":
        from hybridquant.stages import quantize

        cfg = compose("quantize", overrides)
        run_dir = root / "quantize" / cfg.run_name
        quantize.run(cfg, run_dir)
        out["run_dir"] = str(run_dir)
    elif stage == "export":
        from hybridquant.stages import export

        export.run(compose("export", overrides))
    elif stage == "evaluate":
        from hybridquant.stages import evaluate

        cfg = compose("evaluate", overrides)
        run_dir = root / "evaluate" / cfg.run_name
        evaluate.run(cfg, run_dir)
        out["run_dir"] = str(run_dir)
    elif stage == "calibrate-twice":  # the quantize stage's calibration, cold then warm
        from hybridquant.stages import quantize

        cfg = compose("quantize", overrides)
        plan = quantize.plan(cfg)
        parallel.init(plan.layout, seed=cfg.seed, backend=cfg.cluster.backend, timeout_s=cfg.cluster.timeout_s)
        for name in ("cold", "warm"):
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            result = quantize.calibrate(cfg, plan)
            out[name] = {**result.timings, **_cuda_memory(), "tokens": result.data.tokens,
                         "lengths": [int(s.shape[-1]) for s in result.data.samples]}
            del result
    else:
        raise SystemExit(f"unknown stage {stage}")
    out.update(_cuda_memory(), wall_s=time.perf_counter() - t0)
    if parallel.is_main():
        record.write_text(json.dumps(out, indent=2))
    parallel.shutdown()


def probe_worker(record: Path) -> None:
    """What this machine has and what megatron's Mamba mixer will call; the GPU's GEMM peak."""
    import importlib.metadata as md

    import torch

    from hybridquant.compat import cpu, gpu
    from hybridquant.compat.bridge_import import te_available

    out: dict = {"python": sys.version.split()[0], "cuda_available": torch.cuda.is_available(),
                 "torch_cuda": torch.version.cuda, "nccl": torch.distributed.is_nccl_available()}
    for name in ("torch", "triton", "transformers", "tokenizers", "megatron-core", "megatron-bridge",
                 "nvidia-modelopt", "mamba-ssm", "causal-conv1d", "hydra-core", "safetensors"):
        try:
            out.setdefault("versions", {})[name] = md.version(name)
        except md.PackageNotFoundError:
            out.setdefault("versions", {})[name] = None
    out["transformer_engine"] = te_available()
    out["missing_mamba_extensions"] = gpu.missing_extensions()
    cpu.apply()
    import megatron.core.ssm.mamba_mixer as mamba_mixer

    out["megatron_have_mamba_ssm"] = bool(mamba_mixer.HAVE_MAMBA_SSM)
    out["mixer_calls"] = {name: f"{fn.__module__}.{fn.__qualname__}" if fn is not None else None
                          for name in ("mamba_split_conv1d_scan_combined", "mamba_chunk_scan_combined",
                                       "causal_conv1d_fn")
                          for fn in [getattr(mamba_mixer, name)]}
    if torch.cuda.is_available():
        out["device"] = torch.cuda.get_device_name()
        out["gemm_tflops"] = gemm_peaks()
    record.write_text(json.dumps(out, indent=2))


def gemm_peaks(n: int = 8192, reps: int = 10) -> dict[str, float]:
    """Mean TFLOP/s of ``reps`` n^3 products after 3 warm-ups: float32 (IEEE), TF32, bfloat16."""
    import torch

    rates = {}
    for name, dtype, tf32 in (("float32", torch.float32, False), ("tf32", torch.float32, True),
                              ("bfloat16", torch.bfloat16, False)):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        a, b = (torch.randn(n, n, device="cuda", dtype=dtype) for _ in range(2))
        for _ in range(3):
            a @ b
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            a @ b
        end.record()
        torch.cuda.synchronize()
        rates[name] = 2 * n**3 * reps / (start.elapsed_time(end) / 1e3) / 1e12
        del a, b
    torch.backends.cuda.matmul.allow_tf32 = False
    return rates


# --- the orchestration (a plain process: it never touches the GPU itself) ------------------------

class Check:
    def __init__(self, out: Path):
        self.out = out
        self.t0 = time.monotonic()
        self.failures: list[str] = []

    def say(self, text: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.1f} s] {text}", flush=True)

    def bound(self, what: str, value: float, limit: float) -> None:
        ok = value <= limit
        self.say(f"  {'ok  ' if ok else 'FAIL'} {what}: {value:.3e} (bound {limit:.0e})")
        if not ok:
            self.failures.append(f"{what}: {value:.3e} > {limit:.0e}")


def env_for(extra: dict, threads: int) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS=str(threads), **extra)
    return env


def launch(stage: str, root: Path, overrides: list[str], env: dict, log: Path) -> subprocess.Popen:
    from hybridquant.parallel import free_port

    record = root / f"{stage}.json"
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node=1", f"--master_port={free_port()}",
           __file__, "--stage", stage, "--root", str(root), "--record", str(record), "--", *overrides]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)


def run_stage(stage: str, root: Path, overrides: list[str], env: dict) -> dict:
    log = root / f"{stage}.log"
    proc = launch(stage, root, overrides, env, log)
    if proc.wait() != 0:
        raise RuntimeError(f"{stage} in {root} failed (exit {proc.returncode}):\n{log.read_text()[-4000:]}")
    return json.loads((root / f"{stage}.json").read_text())


def pipeline(root: Path, env: dict, calib: list[str], evaluation: list[str]) -> dict:
    """quantize -> export -> evaluate (fake-quant, weight-only and the export) under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    q = run_stage("quantize", root, [*RECIPE, f"model={MODEL}", *calib, f"output_root={root}"], env)
    export_dir = root / "export"
    e = run_stage("export", root, [f"checkpoint={q['run_dir']}", f"output_dir={export_dir}"], env)
    v = run_stage("evaluate", root, [f"model={MODEL}", f"checkpoints=[{q['run_dir']},{export_dir}]",
                                     "evaluation.modes=[fake_quant,weight_only]", f"output_root={root}",
                                     *evaluation], env)
    return {"quantize": q, "export": e, "evaluate": v, "export_dir": str(export_dir)}


def compare_quantize(check: Check, got_dir: Path, ref_dir: Path, bounds: dict, tag: str) -> None:
    import torch

    got, ref = (json.loads((Path(d) / "report.json").read_text()) for d in (got_dir, ref_dir))
    got_amax = {(q["name"], q["role"]): q["amax"] for q in got["quantizers"]}
    ref_amax = {(q["name"], q["role"]): q["amax"] for q in ref["quantizers"]}
    if got_amax.keys() != ref_amax.keys():
        check.failures.append(f"{tag}: quantizers differ ({len(got_amax)} vs {len(ref_amax)})")
        return
    weight, other, worst = 0.0, 0.0, None
    for key, want in ref_amax.items():
        have = got_amax[key]
        if (have is None) != (want is None):
            check.failures.append(f"{tag}: {key} calibrated on one device only")
            continue
        if want is None:
            continue
        diff = max(abs(a - b) / max(abs(b), 1e-30) for a, b in zip(have, want))
        if key[1] == "weight":
            weight = max(weight, diff)
        elif diff > other:
            other, worst = diff, key
    check.say(f"{tag}: {len(ref_amax)} quantizers; largest activation amax difference at {worst}")
    check.bound(f"{tag} weight amax (max relative)", weight, bounds["weight_amax"])
    check.bound(f"{tag} amax (max relative)", max(weight, other), bounds["amax"])
    got_p, ref_p = (torch.load(Path(d) / "probe.pt", map_location="cpu") for d in (got_dir, ref_dir))
    for key in ("logits_before", "logits_after"):
        rel = float((got_p[key].double() - ref_p[key].double()).norm() / ref_p[key].double().norm())
        check.bound(f"{tag} probe {key} (relative L2)", rel, bounds[key])


def compare_export(check: Check, got_dir: Path, ref_dir: Path, bounds: dict) -> None:
    import torch
    from safetensors.torch import load_file

    files = sorted(p.name for p in Path(ref_dir).glob("*.safetensors"))
    if files != sorted(p.name for p in Path(got_dir).glob("*.safetensors")):
        check.failures.append("export: other safetensors files")
        return
    fp8, fp8_diff, scale_rel, other_rel, tensors = 0, 0, 0.0, 0.0, 0
    for name in files:
        want, have = load_file(str(Path(ref_dir) / name)), load_file(str(Path(got_dir) / name))
        if want.keys() != have.keys():
            check.failures.append(f"export {name}: other tensors")
            continue
        for key, w in want.items():
            h = have[key]
            tensors += 1
            if w.dtype == torch.float8_e4m3fn:
                fp8 += w.numel()
                fp8_diff += int((h.view(torch.uint8) != w.view(torch.uint8)).sum())
                continue
            rel = float((h.double() - w.double()).abs().max() / max(w.double().abs().max().item(), 1e-30))
            if key.endswith(("input_scale", "k_scale", "v_scale")):
                scale_rel = max(scale_rel, rel)
            else:
                other_rel = max(other_rel, rel)
    check.say(f"export: {tensors} tensors in {len(files)} files; {fp8} FP8 weight values")
    check.bound("export FP8 weight bytes differing (fraction)", fp8_diff / max(fp8, 1), bounds["fp8_bytes_differing"])
    check.bound("export weight scales and unquantized tensors (max relative)", other_rel, 0.0)
    check.bound("export activation / KV scales (max relative)", scale_rel, bounds["input_scale"])


def compare_evaluate(check: Check, got_dir: Path, ref_dir: Path, bounds: dict) -> None:
    got, ref = (json.loads((Path(d) / "evaluation.json").read_text()) for d in (got_dir, ref_dir))
    rows = lambda record: {(r["label"], r["mode"]): r for r in record["results"]}  # noqa: E731
    got_rows, ref_rows = rows(got), rows(ref)
    if got_rows.keys() != ref_rows.keys():
        check.failures.append("evaluate: other results")
        return
    ppl = abs(got["reference"]["perplexity"] / ref["reference"]["perplexity"] - 1)
    check.bound("evaluate reference perplexity (relative)", ppl, bounds["perplexity"])
    for key, want in ref_rows.items():
        have = got_rows[key]
        kl = abs(have["kl_mean"] / want["kl_mean"] - 1)
        layers = max(abs(a["rel_l2"] - b["rel_l2"]) / max(b["rel_l2"], 1e-12)
                     for a, b in zip(have["layers"], want["layers"]) if b["rel_l2"] > 0)
        check.say(f"evaluate {key[0]} [{key[1]}]: KL mean {have['kl_mean']:.3e} (CPU {want['kl_mean']:.3e}), "
                  f"top-1 {have['top1_agreement']:.4f} (CPU {want['top1_agreement']:.4f})")
        check.bound(f"evaluate {key[1]} KL mean (relative)", kl, bounds["kl_mean"])
        check.bound(f"evaluate {key[1]} per-layer error (max relative)", layers, bounds["layer_rel_l2"])


def throughput(check: Check, perf: dict, peaks: dict) -> None:
    from calibration_throughput import flops

    from hybridquant import source

    hf_config = source.read_config(source.resolve(_model_cfg()))
    for name in ("cold", "warm"):
        run = perf[name]
        total = sum(flops(hf_config, run["lengths"]).values())
        seconds = run["calibrate_s"]
        tflops = total / seconds / 1e12
        check.say(f"calibration ({name}): {run['tokens']} tokens in {seconds:.2f} s: {run['tokens'] / seconds:,.0f} "
                  f"tokens/s, {tflops:.2f} TFLOP/s of matmuls ({total / run['tokens'] / 1e6:.1f} MFLOP/token) = "
                  + ", ".join(f"{tflops / peak:.4f} of the {kind} GEMM peak {peak:.0f}" for kind, peak in peaks.items())
                  + f"; peak GPU memory {run.get('cuda_peak_allocated_mib', 0):,.0f} MiB allocated, "
                  f"{run.get('cuda_peak_reserved_mib', 0):,.0f} MiB reserved (load {run['load_s']:.1f} s)")


def _model_cfg() -> dict:
    import yaml

    return yaml.safe_load((REPO / "conf" / "model" / f"{MODEL}.yaml").read_text())


def build_modelopt_extension(log: Path, env: dict) -> subprocess.Popen:
    code = ("from modelopt.torch.quantization.extensions import get_cuda_ext_fp8\n"
            "assert get_cuda_ext_fp8(raise_if_failed=True) is not None\n")
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp")) / "gpu-check")
    ap.add_argument("--samples", type=int, default=16, help="calibration samples of the compared runs")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-samples", type=int, default=8)
    ap.add_argument("--perf-samples", type=int, default=16, help="calibration samples of the timed run")
    ap.add_argument("--perf-seq-len", type=int, default=2048, help="tokens per sample of the timed run")
    ap.add_argument("--cpu-threads", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    ap.add_argument("--ext-timeout", type=float, default=240, help="seconds for ModelOpt's FP8 CUDA extension build")
    ap.add_argument("--stage")
    ap.add_argument("--root", type=Path)
    ap.add_argument("--record", type=Path)
    ap.add_argument("--probe", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--dry-run-on-cpu", action="store_true",
                    help="run the GPU steps on the CPU (checks this script, not a GPU; bounds still apply)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    if args.stage:
        from hybridquant import parallel

        parallel.fail_fast(stage_worker)(args.stage, args.root, args.record, args.overrides)
        return 0
    if args.probe:
        probe_worker(args.probe)
        return 0

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    check = Check(out)
    calib = [f"calib.num_samples={args.samples}", f"calib.max_seq_len={args.seq_len}"]
    evaluation = [f"evaluation.num_samples={args.eval_samples}", f"evaluation.max_seq_len={args.seq_len}"]

    from hybridquant import source

    check.say(f"materialising {MODEL}: {source.resolve(_model_cfg())}")
    proc = subprocess.run([sys.executable, __file__, "--probe", str(out / "probe.json")], cwd=REPO,
                          env=env_for({}, 4), capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
        return 2
    probe = json.loads((out / "probe.json").read_text())
    check.say("probe: " + json.dumps(probe))
    if not probe["cuda_available"] and not args.dry_run_on_cpu:
        print("error: no CUDA device", file=sys.stderr)
        return 2
    gpu_env = CPU if args.dry_run_on_cpu else {}

    # the CPU reference and the FP8 extension build run while the GPU works
    cpu_root = out / "cpu"
    cpu_root.mkdir(parents=True, exist_ok=True)
    import threading

    cpu_result: dict = {}

    def cpu_pipeline():
        try:
            cpu_result["runs"] = pipeline(cpu_root, env_for(CPU, args.cpu_threads), calib, evaluation)
        except Exception as exc:  # noqa: BLE001 - reported below
            cpu_result["error"] = str(exc)

    cpu_thread = threading.Thread(target=cpu_pipeline)
    cpu_thread.start()
    ext = build_modelopt_extension(out / "modelopt_ext.log", env_for({}, 4))
    ext_started = time.monotonic()
    check.say(f"CPU reference started ({args.cpu_threads} threads), ModelOpt FP8 CUDA extension build started")

    ieee = pipeline(out / "cuda-ieee", env_for({**IEEE, **gpu_env}, 4), calib, evaluation)
    check.say("GPU (IEEE float32): quantize {:.1f} s, export {:.1f} s, evaluate {:.1f} s; peak GPU memory (MiB "
              "allocated): quantize {:,.0f}, export {:,.0f}, evaluate {:,.0f}".format(
                  *(ieee[s]["wall_s"] for s in ("quantize", "export", "evaluate")),
                  *(ieee[s].get("cuda_peak_allocated_mib", 0) for s in ("quantize", "export", "evaluate"))))

    try:
        ext.wait(timeout=max(1.0, args.ext_timeout - (time.monotonic() - ext_started)))
    except subprocess.TimeoutExpired:
        ext.kill()
    ext_ok = ext.returncode == 0
    check.say(f"ModelOpt FP8 CUDA extension: {'built' if ext_ok else 'not available (plain-torch FP8)'}; "
              f"log {out / 'modelopt_ext.log'}")
    default_env = env_for({**({} if ext_ok else {"HYBRIDQUANT_MODELOPT_CUDA_EXT": "0"}), **gpu_env}, 4)
    default_root = out / "cuda-default"
    default_root.mkdir(parents=True, exist_ok=True)
    default = run_stage("quantize", default_root, [*RECIPE, f"model={MODEL}", *calib, f"output_root={default_root}"],
                        default_env)

    from _common import long_samples

    perf_root = out / "cuda-perf"
    perf_root.mkdir(parents=True, exist_ok=True)
    long_samples(perf_root / "long.jsonl", args.perf_samples, args.perf_seq_len, domain="long")
    perf = run_stage("calibrate-twice", perf_root,
                     [*RECIPE, f"model={MODEL}", f"calib.path={perf_root / 'long.jsonl'}",
                      f"calib.num_samples={args.perf_samples}", f"calib.max_seq_len={args.perf_seq_len}",
                      f"output_root={perf_root}"], default_env)
    throughput(check, perf, probe.get("gemm_tflops", {}))

    cpu_thread.join()
    if "error" in cpu_result:
        print(f"error: the CPU reference failed: {cpu_result['error']}", file=sys.stderr)
        return 1
    ref = cpu_result["runs"]
    check.say(f"CPU reference: quantize {ref['quantize']['wall_s']:.1f} s, export {ref['export']['wall_s']:.1f} s, "
              f"evaluate {ref['evaluate']['wall_s']:.1f} s")
    compare_quantize(check, Path(ieee["quantize"]["run_dir"]), Path(ref["quantize"]["run_dir"]), BOUNDS["ieee"],
                     "GPU IEEE vs CPU")
    compare_export(check, Path(ieee["export_dir"]), Path(ref["export_dir"]), BOUNDS["ieee"])
    compare_evaluate(check, Path(ieee["evaluate"]["run_dir"]), Path(ref["evaluate"]["run_dir"]), BOUNDS["ieee"])
    compare_quantize(check, Path(default["run_dir"]), Path(ref["quantize"]["run_dir"]), BOUNDS["default"],
                     "GPU default (TF32) vs CPU")
    summary = {"probe": probe, "failures": check.failures, "cuda_ieee": ieee, "cuda_default": default,
               "perf": perf, "cpu": ref, "modelopt_extension": ext_ok, "elapsed_s": time.monotonic() - check.t0}
    (out / "gpu_check.json").write_text(json.dumps(summary, indent=2))
    if check.failures:
        print("GPU check FAILED: " + "; ".join(check.failures), flush=True)
        return 1
    print(f"GPU check passed in {time.monotonic() - check.t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":  # the checkpoint writer re-imports this module in a helper process
    sys.exit(main())
