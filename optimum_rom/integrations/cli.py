"""What the ``optimum-cli rom ...`` commands do (their arguments are declared in
``optimum/commands/register/register_rom.py``, which optimum-cli imports at start-up).

User mistakes (missing files, bad ratios, existing outputs, ...) end the command with one line
``optimum-cli rom <command>: error: ...`` and exit code 2; set ``OPTIMUM_ROM_DEBUG=1`` for the traceback.
"""

from __future__ import annotations

import json
import os
import sys
import time
from argparse import Namespace
from importlib import resources
from pathlib import Path

USER_ERRORS = (
    FileNotFoundError,
    FileExistsError,
    IsADirectoryError,
    NotADirectoryError,
    ValueError,
    TypeError,
)

ANSWER_LOSS_TASKS = ("gsm8k", "code")  # evaluate: loss on the answers of a prompt/answer jsonl


def run_command(name: str, args: Namespace) -> None:
    commands = {"compress": compress, "evaluate": evaluate}
    try:
        commands[name](args)
    except USER_ERRORS as error:
        if os.environ.get("OPTIMUM_ROM_DEBUG"):
            raise
        print(f"optimum-cli rom {name}: error: {error}", file=sys.stderr)
        sys.exit(2)


def default_calibration_file() -> Path:
    """The bundled calibration text (an excerpt of WikiText-2 validation)."""
    return Path(str(resources.files("optimum_rom") / "data" / "wikitext2_valid_excerpt.txt"))


def compress(args: Namespace) -> None:
    from ..optimizer import LowRankOptimizer

    common = dict(params_ratio=args.params_ratio, seed=args.seed, target_modules=args.target_modules)
    common.update(_given(args, "num_samples", "seq_len"))
    if args.method == "basis-selection":
        config, data = _basis_selection_job(args, common)
        description = "basis-selection"
    else:
        from ..configs import RomConfig

        config = RomConfig(allocation=args.allocation, num_trailing_blocks=args.num_trailing_blocks, **common)
        data = {"calibration": args.calibration or default_calibration_file(), "text_field": args.text_field}
        description = f"{args.method} ({args.allocation})"
    optimizer = LowRankOptimizer.from_pretrained(args.model)
    optimizer.compress(config, save_dir=args.output, overwrite=args.overwrite, **data)
    report = optimizer.report
    print(
        f"compressed {args.model} with {description}: {report.params_before:,} -> "
        f"{report.params_after:,} parameters ({report.ratio:.3f}), {report.factorized_modules} linears factorized, "
        f"{report.seconds:.1f} s; saved to {args.output}"
    )


def _basis_selection_job(args: Namespace, common: dict) -> tuple:
    """The config and the training pairs of ``--method basis-selection`` (checked before the model loads)."""
    from ..configs import BasisSelectionConfig
    from ..task_data import load_pairs, resolve_task_format, split_pairs

    if args.task_data is None:
        raise ValueError(
            "--method basis-selection trains on the target application: give --task-data PATH "
            "(a jsonl of prompt/answer records, e.g. GSM8K's train.jsonl)"
        )
    if args.calibration is not None:
        raise ValueError("--calibration is for --method rom; basis-selection takes --task-data")
    options = _given(
        args,
        "bases",
        "num_rounds",
        "steps_per_round",
        "batch_size",
        "new_rank",
        "fine_tune_steps",
        "gradient_checkpointing",
    )
    config = BasisSelectionConfig(**common, **options)
    task = resolve_task_format(args.task, args.prompt_field, args.answer_field)
    pairs = load_pairs(args.task_data, task)
    if args.holdout:
        pairs = split_pairs(pairs, args.holdout, seed=args.seed)[0]
    return config, {"train_dataset": pairs}


def _given(args: Namespace, *names: str) -> dict:
    """Config keyword arguments for the options the user gave (the rest keep the config's defaults)."""
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def evaluate(args: Namespace) -> None:
    from ..evaluation import text_perplexity
    from ..model_sources import load_model
    from ..structure import count_parameters

    if args.task in ANSWER_LOSS_TASKS:
        return _evaluate_answer_loss(args)
    if args.task != "wikitext2":
        raise ValueError(f"unknown task {args.task!r}; available: wikitext2, {', '.join(ANSWER_LOSS_TASKS)}")
    data = Path(args.data)
    if not data.is_file():
        raise FileNotFoundError(f"--data file not found: {data}")
    started = time.perf_counter()
    model, tokenizer = load_model(args.model)
    result = text_perplexity(model, tokenizer, data, seq_len=args.seq_len, max_windows=args.max_windows)
    _report(args, count_parameters(model), started, result, "perplexity", result.perplexity)


def _report(args: Namespace, parameters: int, started: float, result, metric: str, value: float) -> None:
    report = {
        "model": str(args.model),
        "parameters": parameters,
        "tasks": {args.task: result.to_dict()},
        "seconds": time.perf_counter() - started,
    }
    print(f"{'task':<12}{'metric':<12}{'value':>10}")
    print(f"{args.task:<12}{metric:<12}{value:>10.3f}")
    print(json.dumps(report, indent=2))
    if args.output_json:
        Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output_json).write_text(json.dumps(report, indent=2) + "\n")


def _evaluate_answer_loss(args: Namespace) -> None:
    """Target-task loss: cross-entropy on the answers of a prompt/answer jsonl (``--holdout``: its held-out part)."""
    from ..evaluation import answer_loss
    from ..model_sources import load_model
    from ..structure import count_parameters
    from ..task_data import load_pairs, split_pairs

    pairs = load_pairs(args.data, args.task)
    if args.holdout:
        pairs = split_pairs(pairs, args.holdout, seed=args.seed)[1]
    started = time.perf_counter()
    model, tokenizer = load_model(args.model)
    result = answer_loss(model, tokenizer, pairs)
    _report(args, count_parameters(model), started, result, "answer loss", result.loss)
