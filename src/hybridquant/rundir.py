"""Run directories: Hydra creates a stage's run directory before the stage starts; a run that fails
before writing anything must not leave an empty directory behind that looks like a run."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def remove_if_empty(run_dir: Path, stop: Path) -> None:
    """Remove ``run_dir`` and its parents below ``stop`` while they are empty."""
    run_dir, stop = Path(run_dir).resolve(), Path(stop).resolve()
    for directory in [run_dir, *run_dir.parents]:
        if directory == stop or stop not in directory.parents:
            return
        try:
            directory.rmdir()  # only succeeds when empty
        except FileNotFoundError:
            continue  # another rank removed it first: its parents may still be left to remove
        except OSError:
            return


@contextlib.contextmanager
def removed_if_empty_on_failure(run_dir: Path, stop: Path):
    """On failure, remove the run directory if nothing was written to it. Before the process group
    exists no rank can be writing (creating it is a rendezvous of all ranks), so any rank may; after,
    only the main rank: another rank failing first must not remove the directory the main rank is
    about to write into."""
    try:
        yield
    except BaseException:
        import torch.distributed as dist

        if os.environ.get("RANK", "0") == "0" or not dist.is_initialized():
            remove_if_empty(run_dir, stop)
        raise


def prepare(run_dir: Path, cfg, stale: tuple[str, ...]) -> None:
    """Start a stage's run directory (main rank): create it, remove what an earlier run left there
    (``stale``: its completion marker first, partial outputs), write the resolved ``config.yaml``."""
    import shutil

    from omegaconf import OmegaConf

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    for name in stale:
        path = run_dir / name
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))


def settings_differ(record: Path, wanted: dict, remedy: str) -> list[str] | None:
    """Keys in which the settings recorded in the JSON file ``record`` differ from ``wanted`` (None: no
    record yet). A corrupt record is a one-line error ending with ``remedy``."""
    import json

    from hybridquant.errors import UserError

    if not Path(record).is_file():
        return None
    try:
        have = json.loads(Path(record).read_text())
    except ValueError:
        raise UserError(f"{record} is corrupt; {remedy}") from None
    return sorted(k for k in set(have) | set(wanted) if have.get(k) != wanted.get(k))
