"""What the ``optimum-cli rom ...`` commands do (their arguments are declared in
``optimum/commands/register/register_rom.py``, which optimum-cli imports at start-up).

User mistakes (missing files, bad ratios, existing outputs, ...) end the command with one line
``optimum-cli rom <command>: error: ...`` and exit code 2; set ``OPTIMUM_ROM_DEBUG=1`` for the traceback.
"""

from __future__ import annotations

import errno
import json
import os
import sys
from argparse import Namespace
from dataclasses import replace
from pathlib import Path

USER_ERRORS = (
    FileNotFoundError,
    FileExistsError,
    IsADirectoryError,
    NotADirectoryError,
    ValueError,
    TypeError,
)


def run_command(name: str, args: Namespace) -> None:
    commands = {"compress": compress, "evaluate": evaluate, "export": export}
    try:
        commands[name](args)
    except (*USER_ERRORS, OSError, MemoryError, ArithmeticError) as error:
        if os.environ.get("OPTIMUM_ROM_DEBUG"):
            raise
        print(f"optimum-cli rom {name}: error: {describe_error(error)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"optimum-cli rom {name}: interrupted; {_resume_hint(args)}", file=sys.stderr)
        sys.exit(130)


# What to do about an OS error the code did not foresee (ours carry their own advice).
OS_ERROR_FIXES = {
    errno.EACCES: "check the permissions of that path",
    errno.EPERM: "check the permissions of that path",
    errno.EROFS: "it is on a read-only file system; use a writable disk",
    errno.ENOSPC: "the disk is full; free some space and run the same command again",
    errno.EDQUOT: "the disk quota is exhausted; free some space and run the same command again",
    errno.EIO: "the disk reported an I/O error; check the device",
}


def describe_error(error: BaseException) -> str:
    """One line: the message, and for an OS error its cause, the path and what to do."""
    if not isinstance(error, OSError) or error.strerror is None:
        return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    path = f" ({error.filename})" if error.filename and str(error.filename) not in error.strerror else ""
    fix = OS_ERROR_FIXES.get(error.errno) if error.filename else None
    return f"{error.strerror}{path}" + (f"; {fix}" if fix else "")


def _resume_hint(args: Namespace) -> str:
    """What an interrupted command left: resumable progress next to its output, or nothing."""
    from ..checkpoint import default_work_dir, partial_dir

    output = getattr(args, "output", None)
    if output is not None:
        for kept in (partial_dir(output), default_work_dir(output)):
            if kept.is_dir() and any(kept.iterdir()):
                return f"the finished work is kept in {kept}: run the same command again to continue from it"
    return f"nothing was written{f' to {output}' if output else ''}"


def compress(args: Namespace) -> None:
    from ..configs import BasisSelectionConfig, RomConfig, SvdConfig
    from ..configs.options import BASIS_SELECTION, COMMON, ROM
    from ..optimizer import LowRankOptimizer
    from ..task_data import resolve_task_format

    common = _given(args, *(o.field for o in COMMON))
    if args.method == "basis-selection":
        if args.task_data is None:
            raise ValueError(
                "--method basis-selection trains on the target application: give --task-data PATH "
                "(a jsonl of prompt/answer records, e.g. GSM8K's train.jsonl)"
            )
        if args.calibration is not None:
            raise ValueError("--calibration is for --method rom; basis-selection takes --task-data")
        config = BasisSelectionConfig(**common, **_given(args, *(o.field for o in BASIS_SELECTION)))
        task = resolve_task_format(args.task, args.prompt_field, args.answer_field)
        data = {"train_dataset": args.task_data, "task": task, "holdout": args.holdout}
        description = "basis-selection"
    else:
        if args.method == "svd":
            config = SvdConfig(**common, **_given(args, "allocation", "num_trailing_blocks"))
        else:
            config = RomConfig.from_preset(args.preset, **common, **_given(args, *(o.field for o in ROM)))
        description = f"{args.method} ({config.allocation})"
    optimizer = LowRankOptimizer.from_pretrained(args.model)
    if args.method != "basis-selection":
        data = {"calibration": _calibration(args, optimizer.tokenizer), "text_field": args.text_field}
    optimizer.compress(config, save_dir=args.output, overwrite=args.overwrite, **data)
    report = optimizer.report
    print(
        f"compressed {args.model} with {description}: {report.params_before:,} -> "
        f"{report.params_after:,} parameters ({report.ratio:.3f} of the model, {report.linear_ratio:.3f} of the "
        f"decoder linears), {report.factorized_modules} linears factorized, "
        f"{report.seconds:.1f} s"
        + (
            f", healed {report.healing['steps']} steps in {report.healing['seconds']:.0f} s"
            if report.healing
            else ""
        )
        + f"; saved to {args.output}"
    )


def _calibration(args: Namespace, tokenizer):
    """The calibration source the options describe (``None``: the library's default for the model)."""
    from ..calibration.data import as_chat_calibration

    mix = _given(args, "calibration_mix", "mix_text", "sample_answers", "answer_tokens")
    given_self = args.calibration in (None, "self") and getattr(tokenizer, "chat_template", None)
    chat = as_chat_calibration("self" if given_self else args.calibration, args.chat)
    if chat is None:
        if mix:
            raise ValueError(
                "--calibration-mix, --mix-text, --sample-answers and --answer-tokens shape chat calibration, "
                f"and {args.calibration or 'the default calibration'} is plain text"
            )
        return args.calibration
    names = {
        "calibration_mix": "text_share",
        "mix_text": "text",
        "sample_answers": "sample",
        "answer_tokens": "max_new_tokens",
    }
    return replace(chat, **{names[key]: value for key, value in mix.items()})


def _given(args: Namespace, *names: str) -> dict:
    """Config keyword arguments for the options the user gave (the rest keep the config's defaults)."""
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def evaluate(args: Namespace) -> None:
    from ..evaluation.suite import EvaluationOptions, evaluate_model, format_table, parse_tasks

    tasks = parse_tasks(args.task)
    files = {"wiki.test.raw": Path(args.data)} if args.data else {}
    if args.data and not Path(args.data).is_file():
        raise FileNotFoundError(f"--data file not found: {args.data}")
    if args.task_data:
        files.update(task_data_override(tasks, args.task_data))
    options = EvaluationOptions(
        limit=args.limit,
        seq_len=args.seq_len,
        max_windows=args.max_windows,
        num_fewshot=args.num_fewshot,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        holdout=args.holdout,
        holdout_seed=args.seed,
        reference=args.reference,
    )
    report = evaluate_model(args.model, tasks, args.data_dir, options, files)
    print(format_table(report["tasks"], report["summary"]))
    for sample in report["tasks"].get("chat", {}).get("samples", []):
        print(f"\n> {sample['prompt']}\ndense: {sample['dense']}\nmodel: {sample['model']}")
    if args.output_json:
        from ..checkpoint import write_text_atomically

        Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
        write_text_atomically(Path(args.output_json), json.dumps(report, indent=2) + "\n")
        print(f"results written to {args.output_json}")


def task_data_override(tasks: list[str], task_data: str) -> dict[str, Path]:
    """``--task-data`` replaces the data file of the one single-file task that was asked for."""
    from ..evaluation.suite import SINGLE_FILE_TASKS, TASKS

    chosen = [name for name in tasks if name in SINGLE_FILE_TASKS]
    if len(chosen) != 1:
        raise ValueError(
            f"--task-data is the data file of one of the tasks {', '.join(SINGLE_FILE_TASKS)}; "
            f"--task asks for {len(chosen)} of them"
        )
    return {TASKS[chosen[0]].files[0]: Path(task_data)}


def export(args: Namespace) -> None:
    from ..export import export_onnx
    from ..export.weights import BLOCK_SIZE

    weights = (
        "int4" if args.int4 else {None: "fp32", "weight-only": "int8", "dynamic": "int8-dynamic"}[args.int8]
    )
    for flag, value in (("--block-size", args.block_size), ("--embedding-bits", args.embedding_bits)):
        if value is not None and weights not in ("int8", "int4"):
            raise ValueError(f"{flag} is for the weight-only formats: add --int8 or --int4")
    report = export_onnx(
        args.model,
        args.output,
        weights=weights,
        block_size=args.block_size or BLOCK_SIZE,
        embedding_bits=args.embedding_bits or 8,
        graph=args.graph,
        overwrite=args.overwrite,
    )
    blocks = f" weight-only, blocks of {report.block_size}" if report.block_size else ""
    print(
        f"exported {args.model} to {args.output}: {report.graph} graph, {report.weights}{blocks}, "
        f"{report.onnx_bytes / 1e6:.1f} MB, {report.factorized_linears} factorized linears kept as two thin MatMuls, "
        f"logits within {report.logits_max_abs_diff:.2g} of PyTorch (max |logit| {report.logits_max_abs:.3g}), "
        f"{report.seconds:.1f} s"
    )
