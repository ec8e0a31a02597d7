"""Zero-shot multiple-choice tasks, scored by lm-evaluation-harness on local jsonl files.

The harness's own task definitions (its YAML files: prompts, choices, targets, metrics) are
loaded unchanged; only where the documents come from is replaced: a ``custom_dataset`` that
reads a local jsonl file and converts its records to the schema the harness's templates
expect. Nothing is downloaded, and acc / acc_norm are computed by the harness itself.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..jsonl import read_jsonl
from .loglikelihood import continuation_loglikelihoods

Record = dict[str, Any]


def _arc_like(record: Record, question_field: str) -> Record:
    """ARC / OpenBookQA files store choices as ``[{label, text}]``; the harness reads ``{text: [], label: []}``."""
    choices = record["choices"]
    return {
        question_field: record[question_field],
        "choices": {"text": [c["text"] for c in choices], "label": [c["label"] for c in choices]},
        "answerKey": record["answerKey"],
    }


def _hellaswag(record: Record) -> Record:
    """Our files hold ``ctx`` (= ctx_a + " " + ctx_b, ctx_b not capitalized); the harness builds it from
    ``ctx_a`` and ``ctx_b.capitalize()``, so ``ctx`` goes in as ``ctx_a`` with an empty ``ctx_b``."""
    return {
        "activity_label": record["activity_label"],
        "ctx_a": record["ctx"],
        "ctx_b": "",
        "endings": record["endings"],
        "label": str(record["label"]),
    }


def _boolq(record: Record) -> Record:
    return {"passage": record["passage"], "question": record["question"], "label": int(record["label"])}


def _identity(record: Record) -> Record:
    return record


@dataclass(frozen=True)
class MultipleChoiceTask:
    """A harness task definition plus the local file (in ``--data-dir``) that feeds it."""

    harness_yaml: str  # path inside lm_eval/tasks
    file_name: str
    fields: tuple[str, ...]  # what every record of the file must have
    adapt: Callable[[Record], Record]
    metrics: tuple[str, ...]  # the harness's metrics for this task


_ARC_FIELDS = ("question", "choices", "answerKey")
_BOTH = ("acc", "acc_norm")
MULTIPLE_CHOICE_TASKS: dict[str, MultipleChoiceTask] = {
    "boolq": MultipleChoiceTask(
        "super_glue/boolq/default.yaml",
        "boolq_validation.jsonl",
        ("passage", "question", "label"),
        _boolq,
        ("acc",),
    ),
    "piqa": MultipleChoiceTask(
        "piqa/piqa.yaml", "piqa_validation.jsonl", ("goal", "sol1", "sol2", "label"), _identity, _BOTH
    ),
    "hellaswag": MultipleChoiceTask(
        "hellaswag/hellaswag.yaml",
        "hellaswag_validation.jsonl",
        ("activity_label", "ctx", "endings", "label"),
        _hellaswag,
        _BOTH,
    ),
    "winogrande": MultipleChoiceTask(
        "winogrande/default.yaml",
        "winogrande_xl_validation.jsonl",
        ("sentence", "option1", "option2", "answer"),
        _identity,
        ("acc",),
    ),
    "arc_easy": MultipleChoiceTask(
        "arc/arc_easy.yaml", "arc_easy_test.jsonl", _ARC_FIELDS, lambda r: _arc_like(r, "question"), _BOTH
    ),
    "arc_challenge": MultipleChoiceTask(
        "arc/arc_challenge.yaml",
        "arc_challenge_test.jsonl",
        _ARC_FIELDS,
        lambda r: _arc_like(r, "question"),
        _BOTH,
    ),
    "openbookqa": MultipleChoiceTask(
        "openbookqa/openbookqa.yaml",
        "openbookqa_test.jsonl",
        ("question_stem", "choices", "answerKey"),
        lambda r: _arc_like(r, "question_stem"),
        _BOTH,
    ),
}


def read_records(path: Path, task: MultipleChoiceTask, limit: int | None = None) -> list[Record]:
    """The first ``limit`` records of a jsonl file in the harness's schema; errors name the file and line."""
    records = []
    for number, record in enumerate(read_jsonl(path, task.fields, f"Expected {', '.join(task.fields)}."), 1):
        try:
            records.append(task.adapt(record))
        except (KeyError, TypeError) as error:
            raise ValueError(
                f"{path}: record {number} does not have the expected format ({type(error).__name__}: {error})"
            ) from None
        if limit is not None and len(records) >= limit:
            break
    if not records:
        raise ValueError(f"{path} has no records")
    return records


def harness_task(name: str, path: Path, limit: int | None = None):
    """The harness's own task ``name`` (a ``ConfigurableTask``), reading its documents from ``path``."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets
    import lm_eval.tasks
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    quiet_harness()
    spec = MULTIPLE_CHOICE_TASKS[name]
    records = read_records(path, spec, limit)

    def local_documents(**_: Any) -> datasets.DatasetDict:
        return datasets.DatasetDict({"test": datasets.Dataset.from_list(records)})

    config = load_yaml(Path(lm_eval.tasks.__file__).parent / spec.harness_yaml, resolve_func=True)
    for key in ("tag", "group", "dataset_name", "training_split", "validation_split", "fewshot_split"):
        config.pop(key, None)
    config.update(
        task=name,
        dataset_path=str(path),
        custom_dataset=local_documents,
        test_split="test",
        num_fewshot=0,
    )
    return ConfigurableTask(config=config)


def quiet_harness() -> None:
    """Keep the harness's and datasets' per-task chatter (config notes, "Map" bars) out of the output."""
    import datasets

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    datasets.disable_progress_bars()


def make_lm(model, tokenizer, batch_size: int = 16):
    """The harness LM wrapping an in-memory model (dense or factorized)."""
    from lm_eval.models.huggingface import HFLM

    quiet_harness()

    class ContinuationLogitsHFLM(HFLM):
        """HFLM whose log-likelihoods pack the choices of a question into one row (see ``loglikelihood``).

        Same left-truncation and same (sum log-prob, is-greedy) answers as the stock HFLM, in
        fewer and shorter forward passes.
        """

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
            return continuation_loglikelihoods(self, requests, disable_tqdm)

    return ContinuationLogitsHFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


def evaluate_multiple_choice(lm, name: str, path: Path, limit: int | None = None) -> dict[str, Any]:
    """acc (and acc_norm where the harness reports it) of ``lm`` on task ``name`` read from ``path``."""
    from lm_eval.evaluator import evaluate

    started = time.perf_counter()
    task = harness_task(name, path, limit)
    output = evaluate(
        lm,
        {"tasks": {name: task}, "groups": {}, "group_map": {}},
        bootstrap_iters=0,
        log_samples=False,
        verbosity="ERROR",
    )
    metrics = output["results"][name]
    result: dict[str, Any] = {m: metrics[f"{m},none"] for m in MULTIPLE_CHOICE_TASKS[name].metrics}
    result["items"] = int(output["n-samples"][name]["effective"])
    result["seconds"] = time.perf_counter() - started
    return result
