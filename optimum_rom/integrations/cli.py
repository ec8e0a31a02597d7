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
    from ..configs import RomConfig
    from ..optimizer import LowRankOptimizer

    config = RomConfig(
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
    from ..evaluation import text_perplexity
    from ..export import is_onnx_model_dir, load_onnx_model
    from ..model_sources import load_model
    from ..structure import count_parameters

    if args.task != "wikitext2":
        raise ValueError(f"unknown task {args.task!r}; available: wikitext2")
    data = Path(args.data)
    if not data.is_file():
        raise FileNotFoundError(f"--data file not found: {data}")
    started = time.perf_counter()
    onnx = is_onnx_model_dir(args.model)  # an `optimum-cli rom export` directory runs on onnxruntime
    model, tokenizer = load_onnx_model(args.model) if onnx else load_model(args.model)
    result = text_perplexity(model, tokenizer, data, seq_len=args.seq_len, max_windows=args.max_windows)
    size = {"onnx_bytes": model.path.stat().st_size} if onnx else {"parameters": count_parameters(model)}
    report = {
        "model": str(args.model),
        **size,
        "tasks": {"wikitext2": result.to_dict()},
        "seconds": time.perf_counter() - started,
    }
    print(f"{'task':<12}{'metric':<12}{'value':>10}")
    print(f"{'wikitext2':<12}{'perplexity':<12}{result.perplexity:>10.3f}")
    print(json.dumps(report, indent=2))
    if args.output_json:
        Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output_json).write_text(json.dumps(report, indent=2) + "\n")


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
