"""Writing output directories so that a failed or interrupted run never looks finished.

Everything is written into a hidden sibling directory and renamed into place at the end
(a rename is atomic on one filesystem); on any error the partial directory is removed.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def check_output_dir(path: str | Path, overwrite: bool = False) -> Path:
    """Refuse, before any work starts, to write over an existing non-empty directory."""
    path = Path(path)
    if path.is_file():
        raise FileExistsError(f"output path {path} is a file; choose a directory")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(
            f"output directory {path} already exists and is not empty; pass overwrite=True "
            "(CLI: --overwrite) or choose another output directory"
        )
    return path


@contextmanager
def atomic_directory(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``path`` only if the block finishes."""
    path = check_output_dir(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.parent / f".{path.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if path.exists():
        previous = path.parent / f".{path.name}.previous-{os.getpid()}"
        os.replace(path, previous)
        os.replace(partial, path)
        shutil.rmtree(previous, ignore_errors=True)
    else:
        os.replace(partial, path)


def default_work_dir(output: str | Path) -> Path:
    """Where a resumable pass keeps its progress: a hidden sibling of the output directory."""
    output = Path(output)
    return output.parent / f".{output.name}.work"
