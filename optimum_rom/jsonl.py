"""Reading jsonl(.gz) files of records, with errors that name the file, the line and the fix."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path


def _decoded(handle, path: Path) -> Iterator[str]:
    """The lines of a text handle; a file that is not UTF-8 text is one ValueError naming it."""
    lines = 0
    try:
        for line in handle:
            lines += 1
            yield line
    except UnicodeDecodeError as error:
        raise ValueError(
            f"{path}:{lines + 1} is not valid UTF-8 ({error.reason}); save the file as UTF-8 "
            "(or it is not a text file)"
        ) from None


def read_jsonl(path: str | Path, fields: tuple[str, ...] = (), hint: str = "") -> Iterator[dict]:
    """The records of ``path`` in order, blank lines skipped.

    A line that is not JSON, or a record without one of ``fields``, raises one ValueError with
    ``path:line``, the record's fields and ``hint`` (how to name other fields).
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        for line_number, line in enumerate(_decoded(handle, path), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{line_number} is not valid JSON ({error.msg})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{line_number} is not a JSON object")
            missing = [f for f in fields if f not in record]
            if missing:
                raise ValueError(
                    f"{path}:{line_number} has no field {missing[0]!r}; its fields are {sorted(record)}. {hint}".rstrip()
                )
            yield record
