"""Writing checkpoints: atomic output directories and a streaming safetensors writer.

Everything is written into a hidden sibling directory and renamed into place at the end
(a rename is atomic on one filesystem), so a partial run never looks like a finished checkpoint.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError

OUTPUT_MARKER = ".optimum-rom-output.json"


def check_output_dir(
    path: str | Path, overwrite: bool = False, inputs: Iterable[str | Path | None] = ()
) -> Path:
    """Refuse, before any work starts, an output that would destroy something the user has.

    Refused: a file; an existing non-empty directory without ``overwrite``; with ``overwrite``, a
    directory that is neither empty nor an optimum-rom output holding only the files it wrote (its
    marker lists them); an output that is, contains or is inside one of ``inputs`` (paths resolved,
    symlinks followed); the current directory or one of its parents (it cannot be replaced while
    in use); and a location that cannot be written. Returns the resolved output path.
    """
    given = path
    path = Path(path).expanduser().resolve()
    for source in inputs:
        if source is not None and Path(source).exists():
            _check_apart(given, path, Path(source).resolve())
    if path == Path.cwd() or path in Path.cwd().parents:
        raise ValueError(
            f"--output {given} is the current directory or one of its parents, which cannot be replaced "
            "while in use; give a new directory name, e.g. --output ./compressed"
        )
    if path.is_file():
        raise FileExistsError(f"output path {given} is a file; choose a directory")
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise FileExistsError(
                f"output directory {given} already exists and is not empty; pass overwrite=True "
                "(CLI: --overwrite) or choose another output directory"
            )
        foreign = _foreign_entry(path)
        if foreign is not None:
            raise FileExistsError(
                f"--overwrite only replaces an optimum-rom output or an empty directory, and {given} is not an "
                f"optimum-rom output (it holds {foreign}, which optimum-rom did not write); choose another "
                "output directory"
            )
    check_writable(path.parent)
    return path


def _check_apart(given: str | Path, output: Path, source: Path) -> None:
    if output == source or output in source.parents or source in output.parents:
        relation = "is" if output == source else "contains" if output in source.parents else "is inside"
        raise ValueError(
            f"--output {given} {relation} the input model {source}; writing there would destroy it: "
            "choose an output directory outside the input model"
        )


def _foreign_entry(directory: Path) -> str | None:
    """The first file or directory under ``directory`` that its optimum-rom marker does not list."""
    marker = directory / OUTPUT_MARKER
    ours = set(json.loads(marker.read_text())["files"]) if marker.is_file() else set()
    for item in sorted(directory.rglob("*")):
        name = item.relative_to(directory).as_posix()
        if name != OUTPUT_MARKER and name not in ours:
            return name
    return None


def stored_bytes(model: torch.nn.Module) -> int:
    """Bytes of a model's weights as saved (tied tensors once)."""
    unique = {tensor.data_ptr(): tensor for tensor in model.state_dict().values()}
    return sum(tensor.nbytes for tensor in unique.values())


def existing_parent(output: Path) -> Path:
    """The nearest existing directory above ``output``: where it would be created (and its disk)."""
    return next(p for p in Path(output).resolve().parents if p.exists())


def check_writable(directory: Path) -> None:
    """Fail now, not after the work, if nothing can be created in ``directory`` (or where it would be made)."""
    existing = next(p for p in (directory, *directory.parents) if p.exists())
    if os.statvfs(existing).f_flag & os.ST_RDONLY:
        raise OSError(
            errno.EROFS, f"{existing} is on a read-only file system; choose an output on a writable disk"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(
            errno.EACCES,
            f"permission denied: cannot create files in {existing}; choose an output directory you can "
            "write to, or change its permissions",
        )


def check_output_space(output: str | Path, needed: int) -> None:
    """Refuse a run whose output (``needed`` bytes) will not fit where it is going to be written."""
    ensure_free_space(existing_parent(Path(output)), needed)


@contextmanager
def exclusive(directory: Path, what: str) -> Iterator[None]:
    """Hold ``directory/.lock`` (an OS lock, released when the process ends, however it ends), so that
    two processes never write the same place; ``what`` names the place in the refusal."""
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / ".lock").open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FileExistsError(
                f"another optimum-rom process is writing {what}; wait for it to finish"
            ) from None
        yield


class WorkDir:
    """A directory where a long run keeps its progress, so that the same run started again continues.

    The journal (``progress.json``) names the run by its ``fingerprint`` and records how far it got;
    it is written after the state it refers to is on disk. Entered by a run with another fingerprint
    (another model, config or data), the directory is emptied first. A lock keeps two processes out.
    """

    JOURNAL = "progress.json"

    def __init__(self, path: Path, fingerprint: str, what: str | None = None) -> None:
        self.path = Path(path)
        self.fingerprint = fingerprint
        self.what = what or str(self.path)
        self.progress: dict = {}
        self.discarded = False  # the directory held another run's progress, now gone
        self._lock: contextlib.AbstractContextManager | None = None

    def __enter__(self) -> WorkDir:
        self._lock = exclusive(self.path, self.what)
        self._lock.__enter__()
        journal = self.path / self.JOURNAL
        previous = json.loads(journal.read_text()) if journal.is_file() else {}
        if previous and previous.get("fingerprint") == self.fingerprint:
            self.progress = previous
        else:
            self.discarded = bool(previous)
            self.clear()
        return self

    def clear(self) -> None:
        self.progress = {}
        for item in self.path.iterdir():
            if item.name != ".lock":
                shutil.rmtree(item) if item.is_dir() else item.unlink()

    @property
    def resumed(self) -> bool:
        return bool(self.progress)

    def record(self, **progress) -> None:
        """Atomically update the journal (after the state it refers to is on disk)."""
        self.progress = {"fingerprint": self.fingerprint, **progress}
        write_text_atomically(self.path / self.JOURNAL, json.dumps(self.progress))

    def __exit__(self, *exc) -> None:
        if self._lock is not None:
            self._lock.__exit__(*exc)


class PartialOutput:
    """The hidden ``.<name>.partial`` directory a run writes into, renamed to ``<name>`` when done.

    A lock file keeps two runs from writing the same output. A resumable run keeps its
    directory when it is killed, interrupted or stopped by the system (full disk, memory) after
    it journaled some progress (``progress.json`` and the state it names); the next run with the
    same ``fingerprint`` continues from it, any other run starts afresh. Every other failure
    leaves nothing behind. ``size`` is the planned size of the output, for a disk-full message.
    """

    def __init__(
        self,
        output: str | Path,
        overwrite: bool = False,
        fingerprint: str = "",
        resumable: bool = False,
        size: int | None = None,
    ):
        self.output = check_output_dir(output, overwrite)
        self.path = partial_dir(self.output)
        self.resumable = resumable
        self.size = size
        self.work = WorkDir(self.path, fingerprint, what=str(self.output))

    def __enter__(self) -> PartialOutput:
        self.work.__enter__()
        if not self.resumable:  # a run that cannot resume always starts from an empty directory
            self.work.clear()
        return self

    @property
    def progress(self) -> dict:
        return self.work.progress

    @property
    def resumed(self) -> bool:
        return self.work.resumed

    def record(self, **progress) -> None:
        """Atomically update the journal (after the state it refers to is on disk)."""
        self.work.record(**progress)

    def finish(self) -> Path:
        """Drop the journal, mark the directory as ours and move it into place.

        The previous output, if any, is removed only once the new one is in place. Modes follow
        the user's umask: some writers (safetensors) create their files 0600.
        """
        (self.path / WorkDir.JOURNAL).unlink(missing_ok=True)
        (self.path / ".lock").unlink(missing_ok=True)
        entries = sorted(item.relative_to(self.path).as_posix() for item in self.path.rglob("*"))
        (self.path / OUTPUT_MARKER).write_text(json.dumps({"files": entries}, indent=1) + "\n")
        apply_umask(self.path)
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
        self.work.__exit__(kind, error, traceback)
        if error is None:
            return
        keep = self.resumable and self.progress and rerun_can_continue(error)
        if not keep:
            shutil.rmtree(self.path, ignore_errors=True)
        if is_disk_full(error) and not isinstance(error, DiskFullError):
            free = shutil.disk_usage(self.output.parent).free
            needed = f"it needs {_size(self.size)}, " if self.size else ""
            kept = " to continue from the finished work" if keep else ""
            raise DiskFullError(
                errno.ENOSPC,
                f"disk full while writing {self.output}: {needed}{_size(free)} are free; free some space "
                f"and run the same command again{kept}",
            ) from None


def add_output_file(output: Path, name: str, text: str) -> None:
    """Write one more file into a finished output and list it in the output's marker."""
    marker = output / OUTPUT_MARKER
    listed = sorted(set(json.loads(marker.read_text())["files"]) | {name})
    write_text_atomically(output / name, text)
    write_text_atomically(marker, json.dumps({"files": listed}, indent=1) + "\n")


def write_text_atomically(path: Path, text: str) -> None:
    """The file is either the old one or the new one, never half written."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def rerun_can_continue(error: BaseException) -> bool:
    """Failures the same command can get past (not bad input, which would fail the same way)."""
    return isinstance(error, (KeyboardInterrupt, MemoryError, OSError)) or is_disk_full(error)


def apply_umask(directory: Path) -> None:
    """Give ``directory`` and everything in it the modes the user's umask asks for."""
    umask = os.umask(0)  # reading the umask means setting it: put it straight back
    os.umask(umask)
    for item in (directory, *directory.rglob("*")):
        item.chmod((0o777 if item.is_dir() else 0o666) & ~umask)


@contextmanager
def atomic_directory(path: str | Path, overwrite: bool = False, size: int | None = None) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``path`` only if the block finishes."""
    with PartialOutput(path, overwrite, size=size) as partial:
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


class DiskFullError(OSError):
    """Not enough disk space, with a message that says how much is needed and what to do."""


def ensure_free_space(directory: Path, needed: int) -> None:
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise DiskFullError(
            errno.ENOSPC,
            f"not enough disk space in {directory}: {_size(needed)} are needed, {_size(free)} are free; "
            "free some space (or choose another output directory) and run the same command again",
        )


def raise_disk_error(error: OSError, path: Path, size: int) -> None:
    if is_disk_full(error):
        raise DiskFullError(
            errno.ENOSPC,
            f"disk full while writing {path} ({_size(size)}); free some space and run the same command "
            "again to continue",
        ) from None
    raise error


def is_disk_full(error: BaseException) -> bool:
    """A full disk or quota, as an OSError or as safetensors' own error, which only quotes the OS error."""
    codes = (errno.ENOSPC, errno.EDQUOT)
    if isinstance(error, OSError):
        return error.errno in codes
    return isinstance(error, SafetensorError) and any(f"(os error {code})" in str(error) for code in codes)


def _size(nbytes: int) -> str:
    if nbytes >= 2**30:
        return f"{nbytes / 2**30:.2f} GiB"
    return f"{nbytes / 2**20:.1f} MiB" if nbytes >= 2**20 else f"{nbytes:,} bytes"


def partial_dir(output: str | Path) -> Path:
    """Where a run writes before its output is complete: a hidden sibling of the output directory."""
    output = Path(output)
    return output.parent / f".{output.name}.partial"


def default_work_dir(output: str | Path) -> Path:
    """Where a resumable pass keeps its progress: a hidden sibling of the output directory."""
    output = Path(output)
    return output.parent / f".{output.name}.work"
