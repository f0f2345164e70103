"""The release pipeline: quantize [-> qad] -> export -> evaluate -> model card, reproducibly and resumably.

A release directory (``<output_root>/release/<name>/``)::

    quantize/          the quantize run (Megatron checkpoint, report.json, config.yaml)
    qad/               with ``release.qad``: the quantized checkpoint distilled from the source (export's input)
    export/            the first of release.formats (ModelOpt-HF by default); export/README.md is its model card
    export_<format>/   each further format (gguf, compressed_tensors), with its own model card
    evaluate/          evaluation.json / .png of the quantize run and of the export vs the reference
    logs/<stage>.log   each stage's output
    .stages/<stage>.json  what each stage ran (command, fingerprint) and produced (size + sha256 per file)
    release.json       the release manifest, written last: resolved config, package versions, git
                       commit, seeds, calibration data sha256, sha256 of every file

Each stage's fingerprint covers its command (stage, overrides, ranks), the package versions and the
fingerprints and outputs of the stages before it. A stage whose record has the same fingerprint and
whose outputs are all still there (same sizes) is skipped; a changed config changes its fingerprint
and so re-runs it and every stage after it. ``verify`` re-hashes a release against release.json.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from hybridquant.errors import UserError
from hybridquant.reporting import sha256, write_json_atomic

log = logging.getLogger("hybridquant.release")

REPO = Path(__file__).resolve().parents[2]
MANIFEST = "release.json"
RECORDS = ".stages"
STAGES = ("quantize", "qad", "export", "evaluate", "card")


def export_dirs(formats: list[str]) -> list[str]:
    """The export stage of each format, and its directory: export, export_<format>, ..."""
    return ["export" if i == 0 else f"export_{fmt}" for i, fmt in enumerate(formats)]


def stage_names(formats: list[str]) -> tuple[str, ...]:
    return ("quantize", "qad", *export_dirs(formats), "evaluate", "card")
CARD = "README.md"
FORMAT = 1  # bump when what a stage record means changes: every stage then re-runs


@dataclass
class Stage:
    name: str
    outputs: list[str]                       # paths relative to the release directory
    overrides: list[str] = field(default_factory=list)
    ranks: int = 1
    run: Callable[[], None] | None = None    # in-process stages (the model card)
    script: str | None = None                # pipeline/<script>.py (default: the stage's name)

    def command(self) -> dict:
        command = {"stage": self.name, "overrides": self.overrides, "ranks": self.ranks}
        return {**command, "script": self.script} if self.script else command


# ------------------------------------------------------------------------------------------------
# The plan: what each stage runs, from the release config.

def _kv(prefix: str, values: dict) -> list[str]:
    return [f"{prefix}.{k}={_override_value(v)}" for k, v in values.items() if v is not None]


def _override_value(value: Any) -> str:
    """A value in Hydra's override grammar (lists and dicts of settings, e.g. qad.data)."""
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_override_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_override_value(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, str) and any(c in value for c in ":,[]{}=' "):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return str(value)


def ranks_of(parallel: dict) -> int:
    """World size of a layout: tp * pp * dp, with dp = ep * etp / tp when the experts need more ranks."""
    tp, pp, ep, etp = (parallel.get(k) or 1 for k in ("tp", "pp", "ep", "etp"))
    return pp * max(tp, ep * etp)


def plan(cfg: DictConfig, release_dir: Path) -> list[Stage]:
    r = OmegaConf.to_container(cfg.release, resolve=True)
    d = release_dir
    # With release.autoquant set, the quantize stage is an autoquant run on the base recipe `quant`.
    searched = [*_kv("autoquant", r["autoquant"]), f"autoquant.scores_dir={d / 'autoquant_scores'}"] \
        if r.get("autoquant") else []
    quantize = Stage("quantize", ["quantize"], [
        f"model={r['model']}", f"+quant={r['quant']}", f"seed={cfg.seed}", *_kv("calib", r["calib"]),
        *_kv("parallel", r["quantize_parallel"]), *searched, f"hydra.run.dir={d / 'quantize'}",
        *r["overrides"].get("quantize", [])], ranks_of(r["quantize_parallel"]),
        script="autoquant" if searched else None)
    # With release.qad set, the quantized checkpoint is distilled from the source before export.
    qad = None
    if r.get("qad"):
        qad_layout = {k: v for k, v in (r.get("qad_parallel") or {}).items() if v is not None}
        qad = Stage("qad", ["qad"], [
            f"checkpoint={d / 'quantize'}", f"seed={cfg.seed}", *_kv("qad", r["qad"]), *_kv("parallel", qad_layout),
            f"hydra.run.dir={d / 'qad'}", *r["overrides"].get("qad", [])],
            ranks_of(qad_layout) if qad_layout else ranks_of(r["quantize_parallel"]))
    trained = d / ("qad" if qad else "quantize")
    export_layout = {k: v for k, v in r["export_parallel"].items() if v is not None}
    formats = list(r.get("formats") or ["modelopt"])
    if len(set(formats)) != len(formats):
        raise UserError(f"release.formats lists a format twice: {formats}")
    unknown = sorted(set(r.get("export_options") or {}) - set(formats))
    if unknown:
        raise UserError(f"release.export_options has options for {unknown[0]!r}, which release.formats does not list")
    exports = [Stage(name, [name], [
        f"checkpoint={trained}", f"output_dir={d / name}", "export.overwrite=true", f"seed={cfg.seed}",
        f"export.format={fmt}", *_kv(f"export.options.{fmt}", (r.get("export_options") or {}).get(fmt) or {}),
        *_kv("parallel", export_layout), *r["overrides"].get("export", [])],
        ranks_of(export_layout) if export_layout else ranks_of(r["quantize_parallel"]),
        script=None if name == "export" else "export")
        for name, fmt in zip(export_dirs(formats), formats)]
    evaluate = Stage("evaluate", ["evaluate"], [
        f"checkpoints=[{','.join(str(x) for x in [d / 'quantize', *([trained] if qad else []), *(d / e.name for e in exports)])}]",
        f"model={r['model']}", f"seed={cfg.seed}",
        *_kv("evaluation", r["evaluation"]), *_kv("parallel", r["evaluate_parallel"]),
        f"hydra.run.dir={d / 'evaluate'}", *r["overrides"].get("evaluate", [])], ranks_of(r["evaluate_parallel"]))
    card_stage = Stage("card", [f"{e.name}/{CARD}" for e in exports], [f"format={FORMAT}"], 1,
                       run=lambda: run_module("card", ["hybridquant.model_card", str(d)], d / "logs"))
    return [quantize, *([qad] if qad else []), *exports, evaluate, card_stage]


# ------------------------------------------------------------------------------------------------
# Hashing and records.

def files_under(root: Path, paths: list[str]) -> list[Path]:
    out = []
    for rel in paths:
        p = root / rel
        out += sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else ([p] if p.is_file() else [])
    return out


def digest_files(root: Path, files: list[Path]) -> dict[str, dict]:
    return {str(f.relative_to(root)): {"bytes": f.stat().st_size, "sha256": sha256(f)} for f in files}


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def record_path(release_dir: Path, stage: str) -> Path:
    return release_dir / RECORDS / f"{stage}.json"


def read_record(release_dir: Path, stage: str) -> dict | None:
    path = record_path(release_dir, stage)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def intact(release_dir: Path, record: dict) -> bool:
    """Every output the stage recorded is still there with its size (verify re-hashes)."""
    for rel, entry in record["outputs"].items():
        p = release_dir / rel
        if not p.is_file() or p.stat().st_size != entry["bytes"]:
            return False
    return bool(record["outputs"])


# ------------------------------------------------------------------------------------------------
# Running stages.

@dataclass
class Runner:
    """Runs a pipeline stage: torchrun here, or a SLURM job (launch/submit.py's launcher)."""
    cluster: DictConfig
    cluster_overrides: list[str]
    logs: Path

    def __call__(self, stage: Stage) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        log_path = self.logs / f"{stage.name}.log"
        script = str(REPO / "pipeline" / f"{stage.script or stage.name}.py")
        if self.cluster.name == "slurm":  # a job through launch/submit.py, waited on
            per_node = min(self.cluster.tasks_per_node, stage.ranks)
            nodes = -(-stage.ranks // per_node)
            cmd = [sys.executable, str(REPO / "launch" / "submit.py"), stage.script or stage.name, *stage.overrides,
                   *self.cluster_overrides, f"cluster.nodes={nodes}", f"cluster.tasks_per_node={per_node}"]
        else:
            from hybridquant.parallel import free_port

            cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={stage.ranks}",
                   f"--master_port={free_port()}", script, *stage.overrides, *self.cluster_overrides]
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                                 "MASTER_PORT")}
        with open(log_path, "w") as out:
            out.write("$ " + " ".join(cmd) + "\n")
            out.flush()
            code = subprocess.call(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        if code:
            raise UserError(f"stage {stage.name} failed (exit {code}): {_first_error(log_path)}; log: {log_path}")
        for line in log_path.read_text(errors="replace").splitlines():
            if line.startswith(("submitted SLURM job", "SLURM job")):
                print(f"  {line}", flush=True)


def run_module(name: str, args: list[str], logs: Path) -> None:
    """An in-tree step that needs no ranks (the model card), in its own process, logged like a stage."""
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"{name}.log"
    with open(log_path, "w") as out:
        code = subprocess.call([sys.executable, "-m", *args], stdout=out, stderr=subprocess.STDOUT)
    if code:
        raise UserError(f"stage {name} failed (exit {code}): {_first_error(log_path)}; log: {log_path}")


def _first_error(log_path: Path) -> str:
    lines = log_path.read_text(errors="replace").splitlines()
    errors = [line.removeprefix("error: ") for line in lines if line.startswith("error:")]
    return errors[0] if errors else (lines[-1] if lines else "no output")


def execute(stages: list[Stage], release_dir: Path, runner: Runner, versions: dict, force: list[str]) -> dict:
    """Run or skip each stage in order; returns {stage: {"ran": bool, "seconds": float, ...}}."""
    upstream: list[dict] = []
    done: dict[str, dict] = {}
    for stage in stages:
        fingerprint = digest({"format": FORMAT, "command": stage.command(), "versions": versions,
                              "upstream": upstream})
        record = read_record(release_dir, stage.name)
        if (stage.name not in force and record and record.get("fingerprint") == fingerprint
                and intact(release_dir, record)):
            print(f"[{stage.name}] up to date, skipped (fingerprint {fingerprint[:12]})", flush=True)
            done[stage.name] = {"ran": False, "seconds": 0.0, "fingerprint": fingerprint}
        else:
            why = "forced" if stage.name in force else "no record" if not record else \
                "config or inputs changed" if record.get("fingerprint") != fingerprint else "outputs changed"
            print(f"[{stage.name}] running ({why})", flush=True)
            record_path(release_dir, stage.name).unlink(missing_ok=True)
            for rel in stage.outputs:  # a re-run starts clean: no stale file survives into the release
                target = release_dir / rel
                # export replaces its directory itself; an unfinished qad run (no record) resumes from its
                # last checkpoint, and refuses one-line if its settings have changed since
                if target.is_dir() and not stage.name.startswith("export") and not (stage.name == "qad" and not record):
                    shutil.rmtree(target)
                elif target.is_file():
                    target.unlink()
            t = time.perf_counter()
            stage.run() if stage.run else runner(stage)
            seconds = time.perf_counter() - t
            outputs = digest_files(release_dir, [f for f in files_under(release_dir, stage.outputs)
                                                 if not _owned_by_later(f, release_dir, stage)])
            if not outputs:
                raise UserError(f"stage {stage.name} wrote nothing to {', '.join(stage.outputs)}")
            record = {"stage": stage.name, "fingerprint": fingerprint, "command": stage.command(),
                      "seconds": round(seconds, 2), "outputs": outputs}
            record_path(release_dir, stage.name).parent.mkdir(exist_ok=True)
            write_json_atomic(record_path(release_dir, stage.name), record)
            print(f"[{stage.name}] done in {seconds:.1f} s ({len(outputs)} files)", flush=True)
            done[stage.name] = {"ran": True, "seconds": round(seconds, 2), "fingerprint": fingerprint}
        upstream.append({"stage": stage.name, "fingerprint": fingerprint,
                         "outputs": digest(record["outputs"])})
    return done


def _owned_by_later(path: Path, release_dir: Path, stage: Stage) -> bool:
    """The model card lives in the export directory but belongs to the card stage."""
    return stage.name.startswith("export") and path.relative_to(release_dir) == Path(stage.name) / CARD


# ------------------------------------------------------------------------------------------------
# The release manifest and its verification.

def release_files(release_dir: Path) -> list[Path]:
    """The files the manifest covers: everything but itself, the stage records and the logs."""
    return [f for f in files_under(release_dir, ["."])
            if f.relative_to(release_dir).parts[0] not in (MANIFEST, RECORDS, "logs")]


def git_state() -> dict:
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)

    head = git("rev-parse", "HEAD")
    if head.returncode:
        return {"commit": None, "dirty": None}
    return {"commit": head.stdout.strip(), "dirty": bool(git("status", "--porcelain", "--untracked-files=no").stdout.strip())}


def manifest(cfg: DictConfig, release_dir: Path, stages: list[Stage], done: dict, versions: dict) -> dict:
    q = release_dir / "quantize"
    qcfg = OmegaConf.to_container(OmegaConf.load(q / "config.yaml"), resolve=True)
    report = json.loads((q / "report.json").read_text())
    ecfg_path = release_dir / "evaluate" / "config.yaml"
    ecfg = OmegaConf.to_container(OmegaConf.load(ecfg_path), resolve=True) if ecfg_path.exists() else {}
    files = digest_files(release_dir, release_files(release_dir))
    seeds = {"pipeline": cfg.seed, "calibration": qcfg["calib"]["seed"], "model": qcfg["model"].get("seed"),
             "evaluation": ecfg.get("seed")}
    if isinstance(qcfg["model"].get("train"), dict):
        seeds["model_training"] = qcfg["model"]["train"].get("seed")
    return {
        "format": FORMAT,
        "name": cfg.release.name,
        "config": OmegaConf.to_container(cfg, resolve=True),
        "stage_configs": {"quantize": qcfg, "evaluate": ecfg},
        "stages": {s.name: {**s.command(), **done[s.name]} for s in stages},
        "versions": versions,
        "git": git_state(),
        "seeds": seeds,
        "calibration": report["calibration"],
        "files": files,
    }


def verify(release_dir: Path) -> list[str]:
    """Differences between a release directory and its manifest (re-hashes every file)."""
    release_dir = Path(release_dir)
    path = release_dir / MANIFEST
    if not path.is_file():
        raise UserError(f"{release_dir} is not a release directory (no {MANIFEST})")
    try:
        listed = json.loads(path.read_text())["files"]
    except (ValueError, KeyError) as exc:
        raise UserError(f"{path} is not a release manifest ({exc})") from exc
    problems = []
    for rel, entry in sorted(listed.items()):
        p = release_dir / rel
        if not p.is_file():
            problems.append(f"{rel}: missing")
        elif p.stat().st_size != entry["bytes"] or sha256(p) != entry["sha256"]:
            problems.append(f"{rel}: sha256 differs from the manifest")
    present = {str(f.relative_to(release_dir)) for f in release_files(release_dir)}
    problems += [f"{rel}: not in the manifest" for rel in sorted(present - set(listed))]
    return problems
