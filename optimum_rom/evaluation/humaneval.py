"""HumanEval pass@1: greedy completion of each function, checked by its unit tests in the sandbox.

The completion is cut at the stop sequences of the Codex paper (a new top-level ``def``,
``class``, ``if``, ``print`` or comment), then ``prompt + completion + test + check(entry_point)``
runs in a separate process (see :mod:`.sandbox`): never in the evaluating process.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..jsonl import read_jsonl
from .generation import greedy_generate
from .sandbox import run_program

STOP = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]
FIELDS = ("task_id", "prompt", "test", "entry_point")


def read_humaneval(path: str | Path, limit: int | None = None) -> list[dict[str, str]]:
    """Problems of a HumanEval jsonl or jsonl.gz file: ``{task_id, prompt, test, entry_point, ...}``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"HumanEval file not found: {path}")
    problems = []
    for record in read_jsonl(path, FIELDS, "A HumanEval problem has task_id, prompt, test and entry_point."):
        problems.append(record)
        if limit is not None and len(problems) >= limit:
            break
    if not problems:
        raise ValueError(f"HumanEval file {path} is empty")
    return problems


def check_program(problem: dict[str, str], completion: str) -> str:
    """The program that passes iff ``completion`` makes the problem's tests pass."""
    return f"{problem['prompt']}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def evaluate_humaneval(
    model,
    tokenizer,
    path: str | Path,
    limit: int | None = None,
    max_new_tokens: int = 384,
    timeout: float = 10.0,
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, Any]:
    """pass@1 (greedy) on the first ``limit`` problems of ``path``."""
    started = time.perf_counter()
    problems = read_humaneval(path, limit)
    completions = greedy_generate(
        model,
        tokenizer,
        [p["prompt"] for p in problems],
        STOP,
        max_new_tokens,
        batch_size,
        desc="humaneval",
        progress=progress,
    )
    outcomes = [
        run_program(check_program(problem, completion), timeout)
        for problem, completion in tqdm(
            list(zip(problems, completions, strict=True)),
            desc="humaneval tests",
            unit="program",
            disable=not progress,
        )
    ]
    statuses = [o.status for o in outcomes]
    return {
        "pass@1": sum(o.passed for o in outcomes) / len(problems),
        "items": len(problems),
        "timeouts": statuses.count("timeout"),
        "seconds": time.perf_counter() - started,
    }
