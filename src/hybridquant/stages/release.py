"""The release stage: run (or skip) quantize -> export -> evaluate -> model card for one experiment,
then write the release manifest (hybridquant.release)."""

from __future__ import annotations

import time
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from hybridquant import release, reporting
from hybridquant.errors import UserError


def check(cfg: DictConfig) -> None:
    if cfg.release is None:
        raise UserError("choose a release with experiment=NAME (conf/experiment/: "
                        + ", ".join(sorted(p.stem for p in (release.REPO / "conf" / "experiment").glob("*.yaml"))) + ")")
    missing = [f"release.{k}" for k in _missing(cfg.release)]
    if missing:
        raise UserError(f"experiment {cfg.release.name} needs {', '.join(missing)} (set it on the command line)")
    stages = release.stage_names(list(cfg.release.formats or ["modelopt"]))
    unknown = sorted(set(cfg.force) - set(stages))
    if unknown:
        raise UserError(f"force={list(cfg.force)}: unknown stage(s) {unknown}; stages: {', '.join(stages)}")
    unknown = sorted(set(cfg.release.overrides) - set(release.STAGES))
    if unknown:
        raise UserError(f"release.overrides has unknown stage(s) {unknown}")


def _missing(node, prefix: str = "") -> list[str]:
    """Dotted keys of mandatory values (???) the experiment left for the command line."""
    from omegaconf import DictConfig as Dict

    out = []
    keys = node.keys() if isinstance(node, Dict) else range(len(node))
    for key in keys:
        if OmegaConf.is_missing(node, key):
            out.append(f"{prefix}{key}")
        elif OmegaConf.is_config(node[key]):
            out += _missing(node[key], f"{prefix}{key}.")
    return out


def run(cfg: DictConfig) -> Path:
    t0 = time.perf_counter()
    check(cfg)
    release_dir = (Path(cfg.output_root) / "release" / cfg.release.name).resolve()
    release_dir.mkdir(parents=True, exist_ok=True)
    (release_dir / release.MANIFEST).unlink(missing_ok=True)  # until it is rewritten, the release is incomplete
    versions = reporting.versions()
    # The stages get the same cluster choice and settings as this command line.
    cluster_overrides = [o for o in HydraConfig.get().overrides.task if o.lstrip("+~").startswith("cluster")]
    runner = release.Runner(cfg.cluster, cluster_overrides, release_dir / "logs")
    stages = release.plan(cfg, release_dir)
    print(f"release {cfg.release.name}: {release_dir}", flush=True)
    done = release.execute(stages, release_dir, runner, versions, list(cfg.force))
    manifest = release.manifest(cfg, release_dir, stages, done, versions)
    release.write_json_atomic(release_dir / release.MANIFEST, manifest)
    ran = [s for s, d in done.items() if d["ran"]]
    print(f"release {cfg.release.name} complete in {time.perf_counter() - t0:.1f} s: "
          f"{len(ran)} stage(s) run ({', '.join(ran) or 'none'}), {len(done) - len(ran)} up to date; "
          f"{len(manifest['files'])} files in {release.MANIFEST}", flush=True)
    print(f"model: {release_dir / 'export'}", flush=True)
    return release_dir
