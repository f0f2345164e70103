#!/usr/bin/env python
"""Submit any pipeline stage to SLURM (submitit) and wait for it:

    python launch/submit.py quantize cluster=slurm +quant=mamba_moe_fp8_conservative \
        cluster.nodes=2 parallel.tp=8 parallel.pp=2 parallel.ep=8

Exit status 0 only when the job COMPLETED; otherwise one `error:` line with the job id, its final
SLURM state and the stage's own error message. `--no-wait` prints the job id and returns.
Recipe sweeps: `python pipeline/quantize.py --multirun cluster=slurm +quant=a,b,c` (one array job).
"""

import argparse
import sys

from hybridquant import launcher
from hybridquant.errors import UserError


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-wait", action="store_true", help="submit, print the job id and return")
    parser.add_argument("--timeout", type=float, default=None, help="give up waiting after this many seconds")
    parser.add_argument("stage", help=f"one of: {', '.join(launcher.stages())}")
    parser.add_argument("overrides", nargs=argparse.REMAINDER, help="Hydra overrides for the stage")
    args = parser.parse_args(argv)
    try:
        job, cfg = launcher.submit(args.stage, args.overrides)
        c = cfg.cluster
        ranks = c.nodes * c.tasks_per_node
        print(f"submitted SLURM job {job.job_id}: {args.stage}, {c.nodes} node(s), {ranks} rank(s) "
              f"({c.mode}); logs: {job.paths.folder}", flush=True)
        if args.no_wait:
            return 0
        outcome = launcher.wait(job, cfg, timeout_s=args.timeout)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print(f"\ninterrupted; the job keeps running (scancel {job.job_id} stops it)", file=sys.stderr)
        return 130
    if outcome.state != "COMPLETED":
        cause = outcome.errors[0].removeprefix("error: ") if outcome.errors else f"see {job.paths.stderr}"
        print(f"error: SLURM job {outcome.job_id} ({args.stage}) {outcome.state} after {outcome.seconds:.1f} s: {cause}",
              file=sys.stderr, flush=True)
        return 1
    where = f"; run directory: {outcome.run_dir}" if outcome.run_dir else ""
    print(f"SLURM job {outcome.job_id} ({args.stage}) COMPLETED in {outcome.seconds:.1f} s{where}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
