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
        except OSError:
            return


@contextlib.contextmanager
def removed_if_empty_on_failure(run_dir: Path, stop: Path):
    """On failure, the main rank removes the run directory if nothing was written to it. Only the main
    rank: another rank failing first must not remove the directory the main rank is about to write."""
    try:
        yield
    except BaseException:
        if os.environ.get("RANK", "0") == "0":
            remove_if_empty(run_dir, stop)
        raise
