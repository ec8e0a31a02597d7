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
from dataclasses import asdict
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


def run_command(name: str, args: Namespace) -> None:
    commands = {"compress": compress, "evaluate": evaluate, "export": export}
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
    from ..configs import RomConfig, SvdConfig
    from ..optimizer import LowRankOptimizer

    config_class = {"rom": RomConfig, "svd": SvdConfig}[args.method]
    config = config_class(
        params_ratio=args.params_ratio,
        allocation=args.allocation,
        num_trailing_blocks=args.num_trailing_blocks,
        num_samples=args.num_samples,
        seq_len=args.seq_len,
        seed=args.seed,
        target_modules=args.target_modules,
    )
    calibration = args.calibration or default_calibration_file()
    optimizer = LowRankOptimizer.from_pretrained(args.model)
    optimizer.compress(
        config,
        calibration=calibration,
        save_dir=args.output,
        text_field=args.text_field,
        overwrite=args.overwrite,
    )
    report = optimizer.report
    print(
        f"compressed {args.model} with {args.method} ({args.allocation}): {report.params_before:,} -> "
        f"{report.params_after:,} parameters ({report.ratio:.3f}), {report.factorized_modules} linears factorized, "
        f"{report.seconds:.1f} s; saved to {args.output}"
    )


def evaluate(args: Namespace) -> None:
    from ..evaluation.suite import EvaluationOptions, format_table, parse_tasks, task_files
    from ..evaluation.suite import evaluate as run_tasks
    from ..export import is_onnx_model_dir, load_onnx_model
    from ..model_sources import load_model
    from ..structure import count_parameters

    tasks = parse_tasks(args.task)
    files = {"wiki.test.raw": Path(args.data)} if args.data else {}
    if args.data and not Path(args.data).is_file():
        raise FileNotFoundError(f"--data file not found: {args.data}")
    task_files(tasks, args.data_dir, files)  # every missing file is reported before the model loads
    options = EvaluationOptions(
        limit=args.limit,
        seq_len=args.seq_len,
        max_windows=args.max_windows,
        num_fewshot=args.num_fewshot,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
    )
    started = time.perf_counter()
    onnx = is_onnx_model_dir(args.model)  # an `optimum-cli rom export` directory runs on onnxruntime
    if onnx and set(tasks) != {"wikitext2"}:
        raise ValueError(
            f"ONNX models are evaluated on wikitext2 only (asked for {', '.join(tasks)}); "
            "evaluate the PyTorch checkpoint for the other tasks"
        )
    model, tokenizer = load_onnx_model(args.model) if onnx else load_model(args.model)
    load_seconds = time.perf_counter() - started
    results = run_tasks(model, tokenizer, tasks, args.data_dir, options, files)
    quantization = getattr(model.config, "quantization_config", None)
    report = {
        "model": str(args.model),
        **({"onnx_bytes": model.path.stat().st_size} if onnx else {"parameters": count_parameters(model)}),
        "config": {
            "tasks": tasks,
            "data_dir": args.data_dir,
            "data": args.data,
            **asdict(options),
            "quantization_config": quantization.to_dict()
            if hasattr(quantization, "to_dict")
            else quantization,
        },
        **results,
        "load_seconds": load_seconds,
        "seconds": time.perf_counter() - started,
    }
    print(format_table(results["tasks"], results["summary"]))
    if args.output_json:
        write_json(Path(args.output_json), report)
        print(f"results written to {args.output_json}")


def write_json(path: Path, data: dict) -> None:
    """Write ``data`` so that the file is either complete or absent (temporary file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    partial.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(partial, path)


def export(args: Namespace) -> None:
    from ..export import export_onnx

    report = export_onnx(args.model, args.output, int8=args.int8, graph=args.graph, overwrite=args.overwrite)
    weights = f"int8 {report.int8}" if report.int8 else "fp32"
    print(
        f"exported {args.model} to {args.output}: {report.graph} graph, {weights}, "
        f"{report.onnx_bytes / 1e6:.1f} MB, {report.factorized_linears} factorized linears kept as two thin MatMuls, "
        f"logits within {report.logits_max_abs_diff:.2g} of PyTorch (max |logit| {report.logits_max_abs:.3g}), "
        f"{report.seconds:.1f} s"
    )
