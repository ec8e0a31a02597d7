"""Every evaluation task by name, the files each reads from a data directory, and one entry point.

A data directory is laid out like the project's shared data folder: ``wiki.test.raw``,
``boolq_validation.jsonl``, ``piqa_validation.jsonl``, ``hellaswag_validation.jsonl``,
``winogrande_xl_validation.jsonl``, ``arc_easy_test.jsonl``, ``arc_challenge_test.jsonl``,
``openbookqa_test.jsonl``, ``gsm8k.test.jsonl`` (+ ``gsm8k.train.jsonl`` for few-shot
exemplars), ``HumanEval.jsonl.gz`` and ``chat_prompts.jsonl``. Only the files of the requested tasks
must exist; the chat task falls back to the prompts bundled with the package.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..calibration.data import BUNDLED
from ..chat import Answerer, read_conversations, weights_identity
from ..task_data import load_pairs, split_pairs
from .chat import evaluate_chat
from .gsm8k import evaluate_gsm8k
from .harness import MULTIPLE_CHOICE_TASKS, evaluate_multiple_choice, make_lm
from .humaneval import evaluate_humaneval
from .perplexity import text_perplexity
from .task_loss import answer_loss


@dataclass
class EvaluationOptions:
    """Knobs shared by the tasks; ``limit`` caps the items of every per-item task."""

    limit: int | None = None
    seq_len: int = 512  # WikiText-2 window
    max_windows: int | None = None  # WikiText-2 windows scored (None: all)
    num_fewshot: int = 5  # GSM8K exemplars
    max_new_tokens: int | None = None  # generation cap of GSM8K / HumanEval / chat (None: 256 / 384 / 64)
    batch_size: int = 16
    # chat: the dense model whose answers are the reference (None: the compressed checkpoint's
    # quantization_config.source_model, or the model itself when it is dense)
    reference: str | None = None
    # answer-loss tasks: score only the records `split_pairs(..., holdout, holdout_seed)` holds out
    holdout: int = 0
    holdout_seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be a positive number of items, got {self.limit}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")

    def generation_cap(self) -> dict[str, int]:
        return {} if self.max_new_tokens is None else {"max_new_tokens": self.max_new_tokens}


@dataclass
class EvaluationContext:
    """What a task runner gets: the model, its tokenizer, the options and the task's files."""

    model: Any
    tokenizer: Any
    options: EvaluationOptions
    _lm: Any = field(default=None, repr=False)

    def harness_lm(self):
        """One lm-evaluation-harness LM for all multiple-choice tasks of a run."""
        if self._lm is None:
            self._lm = make_lm(self.model, self.tokenizer, self.options.batch_size)
        return self._lm


@dataclass(frozen=True)
class Task:
    files: tuple[str, ...]  # file names inside the data directory, in the order ``run`` takes them
    run: Callable[..., dict[str, Any]]
    headline: tuple[str, ...]  # the metrics a table shows
    bundled: dict[str, Path] = field(default_factory=dict)  # files the package provides when none is given


def _wikitext2(context: EvaluationContext, text: Path) -> dict[str, Any]:
    options = context.options
    return text_perplexity(
        context.model, context.tokenizer, text, options.seq_len, options.max_windows, options.progress
    ).to_dict()


def _multiple_choice(name: str) -> Callable[..., dict[str, Any]]:
    def run(context: EvaluationContext, documents: Path) -> dict[str, Any]:
        return evaluate_multiple_choice(context.harness_lm(), name, documents, context.options.limit)

    return run


def _gsm8k(context: EvaluationContext, test: Path, train: Path) -> dict[str, Any]:
    options = context.options
    return evaluate_gsm8k(
        context.model,
        context.tokenizer,
        test,
        train,
        limit=options.limit,
        num_fewshot=options.num_fewshot,
        batch_size=min(options.batch_size, 8),
        progress=options.progress,
        **options.generation_cap(),
    )


def _answer_loss(preset: str) -> Callable[..., dict[str, Any]]:
    """Cross-entropy on the answers of a prompt/answer file (only its held-out part with ``holdout``)."""

    def run(context: EvaluationContext, test: Path) -> dict[str, Any]:
        options = context.options
        pairs = load_pairs(test, preset)
        if options.holdout:
            pairs = split_pairs(pairs, options.holdout, seed=options.holdout_seed)[1]
        result = answer_loss(
            context.model, context.tokenizer, pairs[: options.limit], progress=options.progress
        )
        return result.to_dict()

    return run


def _humaneval(context: EvaluationContext, problems: Path) -> dict[str, Any]:
    options = context.options
    return evaluate_humaneval(
        context.model,
        context.tokenizer,
        problems,
        limit=options.limit,
        batch_size=min(options.batch_size, 8),
        progress=options.progress,
        **options.generation_cap(),
    )


def _chat(context: EvaluationContext, prompts: Path) -> dict[str, Any]:
    options = context.options
    conversations = read_conversations(prompts, need_answer=False)[: options.limit]
    return evaluate_chat(
        context.model,
        context.tokenizer,
        conversations,
        reference_answerer(context.model, options.reference),
        max_new_tokens=options.max_new_tokens or 64,
        batch_size=options.batch_size,
        progress=options.progress,
    )


def reference_answerer(model, reference: str | None) -> Answerer:
    """The dense model the chat task compares with: ``reference``, else the one a compressed checkpoint
    records, else the PyTorch model an ONNX export was made from, else (a dense model) the model itself."""
    from ..model_sources import load_model

    quantization = getattr(model.config, "quantization_config", None)
    if reference is None and quantization is None:
        reference = getattr(model.config, "exported_from", None)
        if reference is None:
            return Answerer(weights_identity(model), lambda: model)
    if reference is None:
        reference = (quantization if isinstance(quantization, dict) else vars(quantization)).get(
            "source_model"
        )
    if reference is None:
        raise ValueError(
            "the chat task compares the model's answers with its dense model's, and this checkpoint does not record "
            "which model it was compressed from: name it with --reference MODEL (Python: EvaluationOptions(reference=...))"
        )
    try:
        dense, _ = load_model(reference)
    except FileNotFoundError as error:
        raise FileNotFoundError(
            f"{error}; the chat task needs the dense model the checkpoint was compressed from: give it with --reference"
        ) from None
    return Answerer(weights_identity(dense), lambda: dense)


TASKS: dict[str, Task] = {
    "wikitext2": Task(("wiki.test.raw",), _wikitext2, ("perplexity",)),
    **{
        name: Task((spec.file_name,), _multiple_choice(name), spec.metrics)
        for name, spec in MULTIPLE_CHOICE_TASKS.items()
    },
    "gsm8k": Task(
        ("gsm8k.test.jsonl", "gsm8k.train.jsonl"), _gsm8k, ("exact_match_strict", "exact_match_flexible")
    ),
    "gsm8k_loss": Task(("gsm8k.test.jsonl",), _answer_loss("gsm8k"), ("loss", "perplexity")),
    "code_loss": Task(("HumanEval.jsonl.gz",), _answer_loss("code"), ("loss", "perplexity")),
    "humaneval": Task(("HumanEval.jsonl.gz",), _humaneval, ("pass@1",)),
    "chat": Task(
        ("chat_prompts.jsonl",),
        _chat,
        ("answer_ce", "token_agreement", "agreement", "empty"),
        bundled={"chat_prompts.jsonl": BUNDLED / "chat_prompts_evaluation.jsonl"},
    ),
}
ZERO_SHOT_TASKS = tuple(MULTIPLE_CHOICE_TASKS)
ANSWER_LOSS_TASKS = ("gsm8k_loss", "code_loss")
SINGLE_FILE_TASKS = (*ANSWER_LOSS_TASKS, "chat")  # whose one data file --task-data may replace
# What an onnxruntime model (an `optimum-cli rom export` directory) can be scored on: a forward and generate.
ONNX_TASKS = {"wikitext2", "chat"}


def parse_tasks(tasks: str | list[str]) -> list[str]:
    """Task names from a list or a comma-separated string; unknown names are one clear error."""
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise ValueError(f"unknown task {unknown[0]!r}; available: {', '.join(TASKS)}")
    if not names:
        raise ValueError(f"no task given; available: {', '.join(TASKS)}")
    return list(dict.fromkeys(names))


def task_files(
    tasks: list[str], data_dir: str | Path | None, overrides: dict[str, Path] | None = None
) -> dict[str, list[Path]]:
    """The files each task reads; every missing one is reported at once, before any work."""
    overrides = overrides or {}
    if data_dir is not None and not Path(data_dir).is_dir():
        raise NotADirectoryError(f"--data-dir {data_dir} is not a directory")
    files, missing = {}, []
    for name in tasks:
        paths = []
        for file_name in TASKS[name].files:
            bundled = TASKS[name].bundled.get(file_name)
            if file_name in overrides:
                path = Path(overrides[file_name])
            elif data_dir is not None and (bundled is None or (Path(data_dir) / file_name).is_file()):
                path = Path(data_dir) / file_name
            elif bundled is not None:
                path = bundled
            else:
                raise ValueError(
                    f"task {name!r} reads {file_name}: give the folder that holds it (--data-dir)"
                )
            paths.append(path)
            if not path.is_file():
                missing.append(f"{path} (task {name})")
        files[name] = paths
    if missing:
        raise FileNotFoundError(
            "evaluation data not found: " + "; ".join(missing) + ". --data-dir must hold these files"
        )
    return files


def evaluate(
    model,
    tokenizer,
    tasks: str | list[str],
    data_dir: str | Path | None = None,
    options: EvaluationOptions | None = None,
    files: dict[str, Path] | None = None,
) -> dict[str, Any]:
    """Run ``tasks`` on ``model``; returns ``{"tasks": {name: metrics + seconds}, "summary": {...}}``.

    ``files`` overrides single file names (e.g. ``{"wiki.test.raw": Path(...)}``).
    """
    options = options or EvaluationOptions()
    names = parse_tasks(tasks)
    paths = task_files(names, data_dir, files)
    context = EvaluationContext(model, tokenizer, options)
    results: dict[str, dict[str, Any]] = {}
    for name in names:
        started = time.perf_counter()
        results[name] = TASKS[name].run(context, *paths[name])
        results[name]["seconds"] = time.perf_counter() - started
    return {"tasks": results, "summary": summarize(results)}


def summarize(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The zero-shot average (mean acc over the multiple-choice tasks that were run)."""
    zero_shot = [results[n]["acc"] for n in ZERO_SHOT_TASKS if n in results]
    if not zero_shot:
        return {}
    return {"zero_shot_acc_mean": sum(zero_shot) / len(zero_shot), "zero_shot_tasks": len(zero_shot)}


def format_table(results: dict[str, dict[str, Any]], summary: dict[str, Any] | None = None) -> str:
    """A plain-text table: task, metric, value, items, seconds."""
    lines = [f"{'task':<14}{'metric':<22}{'value':>10}{'items':>8}{'seconds':>10}"]
    for name, metrics in results.items():
        for metric in TASKS[name].headline:
            items = metrics.get("items", metrics.get("examples", metrics.get("windows", "")))
            lines.append(
                f"{name:<14}{metric:<22}{metrics[metric]:>10.4f}{items!s:>8}{metrics['seconds']:>10.1f}"
            )
    if summary and "zero_shot_acc_mean" in summary:
        label = f"avg of {summary['zero_shot_tasks']}"
        lines.append(f"{'zero-shot':<14}{'acc (' + label + ')':<22}{summary['zero_shot_acc_mean']:>10.4f}")
    return "\n".join(lines)


def evaluate_model(
    source: str | Path,
    tasks: str | list[str],
    data_dir: str | Path | None = None,
    options: EvaluationOptions | None = None,
    files: dict[str, Path] | None = None,
) -> dict[str, Any]:
    """Load the model at ``source`` (a checkpoint, a known model, or an ``optimum-cli rom export``
    directory, which runs on onnxruntime) and :func:`evaluate` it; returns the whole report (size,
    settings, results, times), as ``optimum-cli rom evaluate --output-json`` writes it.

    Every missing data file is reported before the model loads.
    """
    from ..export import is_onnx_model_dir, load_onnx_model
    from ..model_sources import load_model
    from ..structure import count_parameters

    options = options or EvaluationOptions()
    names = parse_tasks(tasks)
    task_files(names, data_dir, files)
    started = time.perf_counter()
    onnx = is_onnx_model_dir(source)
    if onnx and not set(names) <= ONNX_TASKS:
        raise ValueError(
            f"ONNX models are evaluated on {' and '.join(sorted(ONNX_TASKS))} (asked for {', '.join(names)}); "
            "evaluate the PyTorch checkpoint for the other tasks"
        )
    model, tokenizer = load_onnx_model(source) if onnx else load_model(source)
    load_seconds = time.perf_counter() - started
    results = evaluate(model, tokenizer, names, data_dir, options, files)
    quantization = getattr(model.config, "quantization_config", None)
    return {
        "model": str(source),
        **({"onnx_bytes": model.path.stat().st_size} if onnx else {"parameters": count_parameters(model)}),
        "config": {
            "tasks": names,
            "data_dir": None if data_dir is None else str(data_dir),
            "files": {name: str(path) for name, path in (files or {}).items()},
            **asdict(options),
            "quantization_config": quantization.to_dict()
            if hasattr(quantization, "to_dict")
            else quantization,
        },
        **results,
        "load_seconds": load_seconds,
        "seconds": time.perf_counter() - started,
    }
