"""Writing checkpoints: atomic output directories and a streaming safetensors writer.

Everything is written into a hidden sibling directory and renamed into place at the end
(a rename is atomic on one filesystem), so a partial run never looks like a finished checkpoint.
"""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch


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


class PartialOutput:
    """The hidden ``.<name>.partial`` directory a run writes into, renamed to ``<name>`` when done.

    A lock file keeps two runs from writing the same output. A resumable run keeps its
    directory when it fails or is killed, together with a journal (``progress.json`` and the
    state it names); the next run with the same ``fingerprint`` continues from it, any other
    run starts afresh.
    """

    JOURNAL = "progress.json"

    def __init__(
        self, output: str | Path, overwrite: bool = False, fingerprint: str = "", resumable: bool = False
    ):
        self.output = check_output_dir(output, overwrite)
        self.path = partial_dir(self.output)
        self.fingerprint = fingerprint
        self.resumable = resumable
        self.progress: dict = {}
        self._lock = None

    def __enter__(self) -> PartialOutput:
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock = (self.path / ".lock").open("w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise FileExistsError(
                f"another optimum-rom process is writing {self.output}; wait for it to finish"
            ) from None
        journal = self.path / self.JOURNAL
        previous = json.loads(journal.read_text()) if journal.is_file() else {}
        if self.resumable and previous.get("fingerprint") == self.fingerprint:
            self.progress = previous
        else:
            for item in self.path.iterdir():
                if item.name != ".lock":
                    shutil.rmtree(item) if item.is_dir() else item.unlink()
        return self

    @property
    def resumed(self) -> bool:
        return bool(self.progress)

    def record(self, **progress) -> None:
        """Atomically update the journal (after the state it refers to is on disk)."""
        self.progress = {"fingerprint": self.fingerprint, **progress}
        temporary = self.path / f"{self.JOURNAL}.tmp"
        temporary.write_text(json.dumps(self.progress))
        os.replace(temporary, self.path / self.JOURNAL)

    def finish(self) -> Path:
        """Drop the journal and move the finished directory into place."""
        (self.path / self.JOURNAL).unlink(missing_ok=True)
        (self.path / ".lock").unlink(missing_ok=True)
        if self.output.exists():
            previous = self.output.parent / f".{self.output.name}.previous"
            shutil.rmtree(previous, ignore_errors=True)
            os.replace(self.output, previous)
            os.replace(self.path, self.output)
            shutil.rmtree(previous, ignore_errors=True)
        else:
            os.replace(self.path, self.output)
        return self.output

    def __exit__(self, kind, error, traceback) -> None:
        if self._lock is not None:
            self._lock.close()
        if error is not None and not self.resumable:
            shutil.rmtree(self.path, ignore_errors=True)


@contextmanager
def atomic_directory(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``path`` only if the block finishes."""
    with PartialOutput(path, overwrite) as partial:
        yield partial.path
        partial.finish()


_SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


class SafetensorsWriter:
    """Writes one standard ``.safetensors`` file tensor by tensor, in any order.

    ``safetensors.torch.save_file`` needs every tensor in memory at once; a streamed
    compression knows every name, shape and dtype before it starts (the ranks come from the
    plan), so the header and the offsets are written first and each tensor goes to its place
    as soon as its block is done. The whole file is reserved up front, so a full disk is
    reported before any work, not hours later.
    """

    def __init__(
        self, path: Path, specs: dict[str, TensorSpec], metadata: dict[str, str] | None = None
    ) -> None:
        self.path = Path(path)
        self.specs = specs
        header: dict[str, object] = {"__metadata__": dict(metadata or {})}
        offset = 0
        self.offsets: dict[str, int] = {}
        for name, spec in specs.items():
            header[name] = {
                "dtype": _SAFETENSORS_DTYPES[spec.dtype],
                "shape": list(spec.shape),
                "data_offsets": [offset, offset + spec.nbytes],
            }
            self.offsets[name] = offset
            offset += spec.nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        self.data_start = 8 + len(encoded)
        self.size = self.data_start + offset
        self._header = len(encoded).to_bytes(8, "little") + encoded

    def create(self) -> None:
        """Create the file with its header and reserve its full size on disk."""
        ensure_free_space(self.path.parent, self.size)
        with self.path.open("wb") as handle:
            handle.write(self._header)
            try:
                os.posix_fallocate(handle.fileno(), 0, self.size)
            except OSError as error:
                raise_disk_error(error, self.path, self.size)

    def write(self, tensors: dict[str, torch.Tensor]) -> None:
        """Write tensors (cast to their declared dtype) at their offsets and flush them to disk."""
        with self.path.open("r+b") as handle:
            for name, tensor in tensors.items():
                spec = self.specs[name]
                if tuple(tensor.shape) != spec.shape:
                    raise ValueError(
                        f"{name}: shape {tuple(tensor.shape)} differs from the planned {spec.shape}"
                    )
                data = memoryview(
                    tensor.detach().to("cpu", spec.dtype).contiguous().flatten().view(torch.uint8).numpy()
                )
                position = self.data_start + self.offsets[name]
                try:
                    while data:  # pwrite may write less than asked
                        written = os.pwrite(handle.fileno(), data, position)
                        data, position = data[written:], position + written
                except OSError as error:
                    raise_disk_error(error, self.path, self.size)
            os.fsync(handle.fileno())


def ensure_free_space(directory: Path, needed: int) -> None:
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise OSError(
            errno.ENOSPC,
            f"not enough disk space in {directory}: the checkpoint needs {needed / 2**30:.2f} GiB, "
            f"{free / 2**30:.2f} GiB are free; free some space or choose another output directory",
        )


def raise_disk_error(error: OSError, path: Path, size: int) -> None:
    if error.errno == errno.ENOSPC:
        raise OSError(
            errno.ENOSPC,
            f"disk full while writing {path} ({size / 2**30:.2f} GiB); free some space and run the same "
            "command again to continue",
        ) from None
    raise error


def partial_dir(output: str | Path) -> Path:
    """Where a run writes before its output is complete: a hidden sibling of the output directory."""
    output = Path(output)
    return output.parent / f".{output.name}.partial"


def default_work_dir(output: str | Path) -> Path:
    """Where a resumable pass keeps its progress: a hidden sibling of the output directory."""
    output = Path(output)
    return output.parent / f".{output.name}.work"
