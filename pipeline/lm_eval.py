"""Evaluate an exported checkpoint with lm-evaluation-harness.

    .venv/bin/python pipeline/lm_eval.py --export runs/export/tiny-fp8 --output results.json
    .venv/bin/python pipeline/lm_eval.py --export <dir> --tasks hybridquant_continuation,hellaswag --limit 100
    python pipeline/lm_eval.py --export <dir> --backend vllm --tasks gsm8k --model-args tensor_parallel_size=8

``--backend hf`` (default, CPU): the export's weights dequantized into transformers' NemotronHForCausalLM.
``--backend vllm`` (GPU): lm_eval's vLLM backend with quantization=modelopt, as the export is served.
Prints one line per task and writes lm_eval's results (metrics, sample counts, configs) as JSON.
See docs/benchmarks.md.
"""

import sys
from pathlib import Path

# This file is named like the harness's package: run as a script, its directory would come first on
# sys.path and `import lm_eval` would find this file instead.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import json
import os


def parse_model_args(text: str) -> dict:
    out = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--model-args takes key=value[,key=value...], got {item!r}")
        out[key.strip()] = value.strip()
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export", help="directory written by pipeline/export.py")
    parser.add_argument("--tasks", default="hybridquant_continuation", help="comma-separated lm_eval task names")
    parser.add_argument("--output", help="write the results JSON here")
    parser.add_argument("--backend", choices=["hf", "vllm"], default="hf")
    parser.add_argument("--batch-size", default="8")
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--limit", type=int, help="at most this many documents per task")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model-args", default="", help="extra model arguments, key=value,... (e.g. for vLLM)")
    parser.add_argument("--include-path", action="append", default=[], help="more lm_eval task YAML directories")
    parser.add_argument("--log-samples", action="store_true", help="keep per-document outputs in the JSON")
    parser.add_argument("--write-task-data", action="store_true",
                        help="regenerate the shipped task's data file from the held-out corpus and exit")
    args = parser.parse_args(argv)

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from hybridquant import logs
    from hybridquant.errors import UserError

    logs.setup("WARNING")
    try:
        from hybridquant import lm_eval_adapter

        if args.write_task_data:
            lm_eval_adapter.TASK_DATA.write_text(lm_eval_adapter.continuation_jsonl())
            print(f"wrote {lm_eval_adapter.TASK_DATA}")
            return 0
        if not args.export:
            raise UserError("--export <directory written by pipeline/export.py> is required")
        if args.limit is not None and args.limit < 1:
            raise UserError(f"--limit must be at least 1, got {args.limit}")
        if args.max_length < 16:
            raise UserError(f"--max-length must be at least 16, got {args.max_length}")
        batch = args.batch_size if args.batch_size.startswith("auto") else int(args.batch_size)
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        if not tasks:
            raise UserError("--tasks names no task")
        results = lm_eval_adapter.evaluate(
            Path(args.export), tasks, backend=args.backend, batch_size=batch, max_length=args.max_length,
            limit=args.limit, device=args.device, seed=args.seed, model_args=parse_model_args(args.model_args),
            log_samples=args.log_samples, include=[Path(p) for p in args.include_path],
        )
    except (UserError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for line in lm_eval_adapter.summary_lines(results):
        print(line)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
        print(f"results: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
