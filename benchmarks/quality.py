"""Quality vs size: compress one model with every method at every params ratio, evaluate each.

    python benchmarks/quality.py                                  # SmolLM2-135M-Instruct, the README table
    python benchmarks/quality.py --tasks wikitext2,gsm8k_loss     # the cheap metrics first
    python benchmarks/quality.py --methods svd --ratios 0.9,0.8   # a subset

Writes to ``--output`` (default ``runs/quality``): ``results.json`` (every metric, timings,
settings), ``results.md`` (tables) and ``quality.png`` (each headline metric vs params
ratio, one line per method), plus ``models/<method>-<ratio>/`` (the compressed checkpoints).
The run is resumable: every (model, task) result is saved in ``results.json`` as soon as it
exists and skipped on the next run with the same settings; saved checkpoints are reloaded
instead of compressed again.

Methods are the ``METHODS`` table (name -> config factory for a params ratio, and the calibration
source when it is not the ``--calibration`` text): adding a method to the benchmark is one line
there. The ``-chat`` rows calibrate on the dense model's own answers to the bundled prompts, the
``-mixNN`` rows on those mixed with NN% windows of the ``--calibration`` text.

Data: ``--data-dir`` is a folder laid out for ``optimum-cli rom evaluate``. Without it, one is
built in ``<output>/data`` from the project's shared data folder (``--shared-data``):
ARC-Challenge uses ``arc_challenge_train.jsonl`` as a stand-in for its test split, HellaSwag
has only the 200 validation items of ``hellaswag_validation.first200.jsonl``, and the GSM8K
"test" file is the 500-problem held-out split of ``gsm8k.train.jsonl``
(``split_pairs(load_pairs(...), validation=500, seed=0)``), the train file its other part.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from optimum_rom import LowRankConfig, LowRankOptimizer, RomConfig, SvdConfig
from optimum_rom.calibration.data import CalibrationSource, ChatCalibration
from optimum_rom.checkpoint import exclusive, write_text_atomically
from optimum_rom.evaluation.suite import TASKS, ZERO_SHOT_TASKS, EvaluationOptions, parse_tasks, summarize
from optimum_rom.evaluation.suite import evaluate as run_tasks
from optimum_rom.memory import peak_resident_mib, reset_peak_resident
from optimum_rom.model_sources import DEFAULT_MODEL
from optimum_rom.task_data import load_pairs, split_pairs

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
BUNDLED_CALIBRATION = ROOT / "optimum_rom" / "data" / "wikitext2_valid_excerpt.txt"
DENSE = "dense"


@dataclass(frozen=True)
class Method:
    """A table row's recipe: its config for a params ratio (calibration shape from the command line)
    and, when it does not calibrate on the ``--calibration`` text, its calibration source."""

    config: Callable[..., LowRankConfig]
    calibration: Callable[[Path], CalibrationSource] | None = None


def _auto(heal_minutes: float = 0, **options) -> Callable[..., LowRankConfig]:
    return lambda ratio, **calib: RomConfig.from_preset(
        "auto", params_ratio=ratio, heal_minutes=heal_minutes, **options, **calib
    )


def _uniform(**options) -> Callable[..., LowRankConfig]:
    return lambda ratio, **calib: RomConfig(params_ratio=ratio, allocation="uniform", **options, **calib)


def _best(minutes: float, **options) -> Callable[..., LowRankConfig]:
    return lambda ratio, **calib: RomConfig.from_preset(
        "best", params_ratio=ratio, time_budget=minutes, **options, **calib
    )


def _chat(text_share: float, sample: bool = False) -> Callable[[Path], CalibrationSource]:
    return lambda text: ChatCalibration(text=text, text_share=text_share, sample=sample)


METHODS: dict[str, Method] = {
    "rom-paper": Method(lambda ratio, **calib: RomConfig(params_ratio=ratio, allocation="paper", **calib)),
    "rom-uniform": Method(_uniform()),
    "svd": Method(lambda ratio, **calib: SvdConfig(params_ratio=ratio)),
    "rom-auto": Method(_auto()),
    "rom-auto-heal15": Method(_auto(15)),
    # the training steps (refinement, healing) in float32 instead of the default autocast bfloat16
    "rom-auto-float32": Method(_auto(training_precision="float32")),
    "rom-auto-heal15-float32": Method(_auto(15, training_precision="float32")),
    # the calibration walks' block forwards in bfloat16 (autocast) instead of float32
    "rom-auto-calibration-bfloat16": Method(_auto(calibration_precision="bfloat16")),
    "rom-uniform-calibration-bfloat16": Method(_uniform(calibration_precision="bfloat16")),
    "rom-auto-mix50-calibration-bfloat16": Method(_auto(calibration_precision="bfloat16"), _chat(0.5)),
    # each linear's basis and spectrum in float64 instead of the default float32
    "rom-uniform-factorization-float64": Method(_uniform(factorization_precision="float64")),
    "rom-auto-mix50-factorization-float64": Method(_auto(factorization_precision="float64"), _chat(0.5)),
    "rom-auto-chat": Method(_auto(), _chat(0.0)),
    "rom-auto-chat-heal15": Method(_auto(15), _chat(0.0)),
    "rom-auto-chat-sampled": Method(_auto(), _chat(0.0, sample=True)),
    **{f"rom-auto-mix{share}": Method(_auto(), _chat(share / 100)) for share in (25, 50, 75)},
    **{f"rom-auto-mix{share}-heal15": Method(_auto(15), _chat(share / 100)) for share in (25, 50, 75)},
    # healing's learning rate decayed over its time (cosine) instead of constant, beside the -heal15 rows
    "rom-auto-mix50-heal15-cosine": Method(_auto(15, heal_schedule="cosine"), _chat(0.5)),
    # healing's learning rate 5x LoRA's default 2e-4, beside rom-auto-mix50-heal15
    "rom-auto-mix50-heal15-lr1e-3": Method(_auto(15, heal_lr=1e-3), _chat(0.5)),
    "rom-best60-mix50-cosine": Method(_best(60, heal_schedule="cosine"), _chat(0.5)),
    # healing every parameter of the blocks instead of LoRA adapters
    "rom-auto-heal15-full": Method(_auto(15, heal_params="full")),
    "rom-auto-mix50-heal15-full": Method(_auto(15, heal_params="full"), _chat(0.5)),
    # before that healing, the Fisher metric or 8 refinement epochs (beside rom-auto-heal15-full at 0.5)
    "rom-auto-fisher-heal15-full": Method(_auto(15, metric="fisher", heal_params="full")),
    "rom-auto-refine8-heal15-full": Method(_auto(15, refine_epochs=8, heal_params="full")),
    "rom-auto-fisher-refine8-heal15-full": Method(
        _auto(15, metric="fisher", refine_epochs=8, heal_params="full")
    ),
    "rom-auto-fisher-heal15": Method(_auto(15, metric="fisher")),
    # refinement levers, each beside rom-auto (2 epochs, constant lr, factors only)
    **{f"rom-auto-refine{epochs}": Method(_auto(refine_epochs=epochs)) for epochs in (8, 25)},
    "rom-auto-cosine": Method(_auto(refine_schedule="cosine")),
    "rom-auto-block": Method(_auto(refine_params="block")),
    # the same levers on the chat models' default calibration, beside rom-auto-mix50
    "rom-auto-mix50-refine8": Method(_auto(refine_epochs=8), _chat(0.5)),
    "rom-auto-mix50-cosine": Method(_auto(refine_schedule="cosine"), _chat(0.5)),
    "rom-auto-mix50-block": Method(_auto(refine_params="block"), _chat(0.5)),
    # refinement towards the dense model's own stream (AA-SVD's anchor) instead of the dense block's outputs
    "rom-auto-anchored": Method(_auto(refine_target="dense")),
    "rom-auto-mix50-anchored": Method(_auto(refine_target="dense"), _chat(0.5)),
    # damage scored per linear instead of auto's per output direction, beside rom-auto / rom-auto-mix50
    "rom-auto-matrix": Method(_auto(scoring="matrix")),
    "rom-auto-mix50-matrix": Method(_auto(scoring="matrix"), _chat(0.5)),
    # each fit in the loss gradients' metric instead of the plain feature error, beside the above
    "rom-auto-fisher": Method(_auto(metric="fisher")),
    "rom-auto-matrix-fisher": Method(_auto(scoring="matrix", metric="fisher")),
    "rom-auto-mix50-fisher": Method(_auto(metric="fisher"), _chat(0.5)),
    "rom-auto-mix50-matrix-fisher": Method(_auto(scoring="matrix", metric="fisher"), _chat(0.5)),
    # the features' own directions kept by variance x gradient energy instead of variance, beside the above
    "rom-auto-scored": Method(_auto(metric="scored")),
    "rom-auto-mix50-scored": Method(_auto(metric="scored"), _chat(0.5)),
    # --preset best: auto, then healing for what is left of a 20- or 60-minute budget
    **{f"rom-best{minutes}": Method(_best(minutes)) for minutes in (20, 60)},
    **{f"rom-best{minutes}-mix50": Method(_best(minutes), _chat(0.5)) for minutes in (20, 60)},
    # part of the budget spent on 8 refinement epochs instead of healing
    **{
        f"rom-best{minutes}-mix50-refine8": Method(_best(minutes, refine_epochs=8), _chat(0.5))
        for minutes in (20, 60)
    },
    "rom-auto-refine8-cosine-block": Method(
        _auto(refine_epochs=8, refine_schedule="cosine", refine_params="block")
    ),
}
DEFAULT_TASKS = ["wikitext2", "chat", *ZERO_SHOT_TASKS, "gsm8k_loss"]
GSM8K_HELD_OUT = 500  # the held-out split the application-specific pass does not train on
GSM8K_FILES = ("gsm8k.test.jsonl", "gsm8k.train.jsonl")  # written from the split, not linked
STAND_INS = {
    "arc_challenge_test.jsonl": "arc_challenge_train.jsonl",  # no ARC-Challenge test file in the shared data
    "hellaswag_validation.jsonl": "hellaswag_validation.first200.jsonl",  # only 200 items
}


def build_data_dir(shared: Path, target: Path) -> Path:
    """An evaluation data folder made from the shared data (see the module docstring)."""
    if not shared.is_dir():
        raise FileNotFoundError(f"shared data folder not found: {shared}; pass --shared-data or --data-dir")
    target.mkdir(parents=True, exist_ok=True)
    needed = {name for task in TASKS.values() for name in task.files if name not in task.bundled}
    needed -= set(GSM8K_FILES)
    for name in sorted(needed):
        source = shared / STAND_INS.get(name, name)
        if source.is_file() and not (target / name).exists():
            (target / name).symlink_to(source.resolve())
    gsm8k = shared / "gsm8k.train.jsonl"
    if gsm8k.is_file() and not (target / "gsm8k.test.jsonl").exists():
        write_gsm8k_split(gsm8k, target)
    return target


def write_gsm8k_split(gsm8k_train: Path, target: Path) -> None:
    """``gsm8k.test.jsonl`` = the held-out split, ``gsm8k.train.jsonl`` = the rest, in the original schema."""
    records = [
        json.loads(line) for line in gsm8k_train.read_text(encoding="utf-8").splitlines() if line.strip()
    ]
    train_ids, test_ids = split_pairs(list(range(len(records))), validation=GSM8K_HELD_OUT, seed=0)
    for name, ids in (("gsm8k.train.jsonl", train_ids), ("gsm8k.test.jsonl", test_ids)):
        partial = target / f".{name}.partial"
        partial.write_text("".join(json.dumps(records[i]) + "\n" for i in ids), encoding="utf-8")
        os.replace(partial, target / name)
    expected = split_pairs(load_pairs(gsm8k_train, "gsm8k"), validation=GSM8K_HELD_OUT, seed=0)[1]
    if load_pairs(target / "gsm8k.test.jsonl", "gsm8k") != expected:
        raise RuntimeError("the written GSM8K held-out file differs from split_pairs' held-out split")


class ResultStore:
    """``results.json``: one entry per model (``method@ratio``), one result per task, saved after each."""

    def __init__(self, path: Path, settings: dict[str, Any]) -> None:
        self.path = path
        self.data: dict[str, Any] = {"settings": settings, "runs": {}}
        if path.is_file():
            existing = json.loads(path.read_text())
            if existing.get("settings") != settings:
                raise ValueError(
                    f"{path} was produced with other settings ({existing.get('settings')}); "
                    "use another --output or the same options to resume"
                )
            self.data = existing

    def run(self, key: str) -> dict[str, Any]:
        return self.data["runs"].setdefault(key, {"tasks": {}})

    def done(self, key: str, task: str) -> bool:
        return task in self.data["runs"].get(key, {}).get("tasks", {})

    def save(self) -> None:
        write_text_atomically(self.path, json.dumps(self.data, indent=2) + "\n")


def model_key(method: str, ratio: float) -> str:
    return DENSE if method == DENSE else f"{method}@{ratio:g}"


def load_or_compress(args, method: str, ratio: float, store: ResultStore):
    """The (model, tokenizer) of one table row: dense, a saved checkpoint, or a fresh compression."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    checkpoint = args.output / "models" / f"{method}-{ratio:g}"
    if method != DENSE and (checkpoint / "config.json").is_file():
        return AutoModelForCausalLM.from_pretrained(checkpoint), AutoTokenizer.from_pretrained(checkpoint)
    optimizer = LowRankOptimizer.from_pretrained(args.model)
    if method == DENSE:
        return optimizer.model, optimizer.tokenizer
    recipe = METHODS[method]
    config = recipe.config(ratio, num_samples=args.num_samples, seq_len=args.calibration_seq_len)
    calibration = recipe.calibration(args.calibration) if recipe.calibration else args.calibration
    reset_peak_resident()
    optimizer.compress(config, calibration=calibration, save_dir=checkpoint, overwrite=True)
    report = optimizer.report.to_dict()
    report["peak_resident_mib"] = peak_resident_mib()
    store.run(model_key(method, ratio))["compression"] = report
    store.save()
    return optimizer.model, optimizer.tokenizer


def run_benchmark(args) -> ResultStore:
    settings = {
        "model": str(args.model),
        "limit": args.limit,
        "seq_len": args.seq_len,
        "max_windows": args.max_windows,
        "calibration": str(args.calibration),
        "num_samples": args.num_samples,
        "calibration_seq_len": args.calibration_seq_len,
    }
    args.output.mkdir(parents=True, exist_ok=True)
    store = ResultStore(args.output / "results.json", settings)
    options = EvaluationOptions(
        limit=args.limit,
        seq_len=args.seq_len,
        max_windows=args.max_windows,
        batch_size=args.batch_size,
        reference=str(args.model),
    )
    rows = [(DENSE, 1.0)] + [(m, r) for r in args.ratios if r < 1.0 for m in args.methods]
    pending = [
        (method, ratio, task)
        for method, ratio in rows
        for task in args.tasks
        if not store.done(model_key(method, ratio), task)
    ]
    print(f"{len(pending)} evaluations to run ({len(rows) * len(args.tasks) - len(pending)} already done)")
    loaded: tuple[str, Any, Any] | None = None
    for method, ratio, task in tqdm(pending, desc="benchmark", unit="evaluation"):
        key = model_key(method, ratio)
        if loaded is None or loaded[0] != key:
            loaded = None  # the previous model is freed first: a compression's peak is its own
            loaded = (key, *load_or_compress(args, method, ratio, store))
            store.run(key).update(method=method, ratio=ratio, parameters=loaded[1].num_parameters())
        tqdm.write(f"{key}: {task}")
        result = run_tasks(loaded[1], loaded[2], [task], args.data_dir, options)["tasks"][task]
        store.run(key)["tasks"][task] = result
        store.save()
        write_reports(store, args)
    write_reports(store, args)
    return store


def write_reports(store: ResultStore, args) -> None:
    (args.output / "results.md").write_text(markdown_tables(store.data))
    plot(store.data, args.output / "quality.png")


DECIMALS = {
    "WikiText-2 ppl": 2,
    "GSM8K answer loss": 3,
    "chat answer CE": 3,
}  # the rest: accuracies in %, 1 decimal


def _format(column: str, value: float) -> str:
    return f"{value:.3g}" if value >= 1e5 else f"{value:.{DECIMALS.get(column, 1)}f}"


def _headline(run: dict[str, Any]) -> dict[str, float]:
    """The metrics of one row that the table and plot show."""
    tasks = run["tasks"]
    values = {}
    if "wikitext2" in tasks:
        values["WikiText-2 ppl"] = tasks["wikitext2"]["perplexity"]
    for name in ZERO_SHOT_TASKS:
        if name in tasks:
            values[name] = 100 * tasks[name]["acc"]
    zero_shot = [n for n in ZERO_SHOT_TASKS if n in tasks]
    if len(zero_shot) == len(ZERO_SHOT_TASKS):
        values["zero-shot avg"] = 100 * summarize(tasks)["zero_shot_acc_mean"]
    if "gsm8k_loss" in tasks:
        values["GSM8K answer loss"] = tasks["gsm8k_loss"]["loss"]
    if "chat" in tasks:
        chat = tasks["chat"]
        values.update(
            {"chat answer CE": chat["answer_ce"], "chat = dense (16 tok) %": 100 * chat["agreement"]}
        )
        values["chat empty %"] = 100 * chat["empty"]
    return values


def _rows(data: dict[str, Any]) -> list[tuple[str, float, dict[str, Any]]]:
    runs = data["runs"]
    order = {name: i for i, name in enumerate([DENSE, *METHODS])}
    rows = [(r.get("method", DENSE), r.get("ratio", 1.0), r) for r in runs.values() if "method" in r]
    return sorted(rows, key=lambda row: (-row[1], order.get(row[0], len(order))))


def markdown_tables(data: dict[str, Any]) -> str:
    rows = _rows(data)
    columns: list[str] = []
    for _, _, run in rows:
        columns += [c for c in _headline(run) if c not in columns]
    settings = data["settings"]
    dense_parameters = next(
        run["parameters"] if method == DENSE else run["compression"]["params_before"]
        for method, _, run in rows
        if method == DENSE or "compression" in run
    )
    lines = [
        f"Model: {settings['model']}; zero-shot: first {settings['limit']} items per task (acc, %); "
        f"WikiText-2: {settings['max_windows']} windows of {settings['seq_len']} tokens.",
        "",
        "| method | target | params | " + " | ".join(columns) + " |",
        "|---" * (3 + len(columns)) + "|",
    ]
    for method, ratio, run in rows:
        values = _headline(run)
        cells = [_format(c, values[c]) if c in values else "" for c in columns]
        size = f"{run['parameters'] / 1e6:.1f}M ({run['parameters'] / dense_parameters:.3f})"
        lines.append(f"| {method} | {ratio:g} | {size} | " + " | ".join(cells) + " |")
    task_names = [t for t in TASKS if any(t in run["tasks"] for _, _, run in rows)]
    lines += [
        "",
        "Wall time of each evaluation (s), and of the compression with the process's peak resident memory",
        "during it (streamed when the model is a directory):",
        "",
        "| method | target | compression | peak MiB | " + " | ".join(task_names) + " |",
        "|---" * (4 + len(task_names)) + "|",
    ]
    for method, ratio, run in rows:
        compression = run.get("compression", {})
        seconds, peak = compression.get("seconds"), compression.get("peak_resident_mib")
        cells = [f"{run['tasks'][t]['seconds']:.0f}" if t in run["tasks"] else "" for t in task_names]
        lines.append(
            f"| {method} | {ratio:g} | {'' if seconds is None else f'{seconds:.0f}'} | "
            f"{'' if peak is None else f'{peak:.0f}'} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines) + "\n"


def plot(data: dict[str, Any], path: Path) -> None:
    """One panel per headline metric, metric vs params ratio, one line per method (dense at 1.0 on each)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _rows(data)
    dense = next((_headline(run) for method, _, run in rows if method == DENSE), {})
    panels = [p for p in ("WikiText-2 ppl", "chat answer CE", "zero-shot avg", "GSM8K answer loss") if any(
        p in _headline(run) for _, _, run in rows
    )]  # fmt: skip
    if not panels:
        return
    figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for axis, panel in zip(axes[0], panels, strict=True):
        for method in METHODS:
            points = [
                (r, _headline(run)[panel]) for m, r, run in rows if m == method and panel in _headline(run)
            ]
            if points:  # each line starts at the dense model
                xs, ys = zip(*sorted(points + ([(1.0, dense[panel])] if panel in dense else [])), strict=True)
                axis.plot(xs, ys, marker="o", label=method)
        if panel == "WikiText-2 ppl":
            axis.set_yscale("log")
        axis.set_xlabel("params ratio kept")
        axis.set_title(panel)
        axis.grid(alpha=0.3)
        if axis.lines:  # only the dense point so far: nothing to label
            axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def parse_args(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument(
        "--ratios", default="1.0,0.9,0.8,0.7,0.5", help="params ratios (1.0 = the dense model)"
    )
    parser.add_argument("--methods", default=",".join(METHODS), help=f"any of {', '.join(METHODS)}")
    parser.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help="evaluation tasks, in run order")
    parser.add_argument(
        "--data-dir", type=Path, default=None, help="evaluation files (default: built, see above)"
    )
    parser.add_argument("--shared-data", type=Path, default=SHARED_DATA)
    parser.add_argument("--limit", type=int, default=500, help="items per zero-shot / loss task")
    parser.add_argument("--seq-len", type=int, default=512, help="WikiText-2 window")
    parser.add_argument("--max-windows", type=int, default=40, help="WikiText-2 windows")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--calibration", type=Path, default=BUNDLED_CALIBRATION)
    parser.add_argument("--num-samples", type=int, default=128, help="calibration sequences")
    parser.add_argument(
        "--calibration-seq-len", type=int, default=128, help="tokens per calibration sequence"
    )
    parser.add_argument("--output", type=Path, default=ROOT / "runs" / "quality")
    parser.add_argument("--fresh", action="store_true", help="delete previous results and checkpoints first")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: torch's choice); 1 is ~3x faster than 2 on a 2-core machine that other "
        "jobs keep busy, where threads wait for each other",
    )
    args = parser.parse_args(argv)
    args.ratios = [float(r) for r in args.ratios.split(",")]
    if any(not 0 < r <= 1 for r in args.ratios):
        parser.error(f"--ratios must be in (0, 1], got {args.ratios}")
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method {unknown[0]!r}; available: {', '.join(METHODS)}")
    try:
        args.tasks = parse_tasks(args.tasks)
    except ValueError as error:
        parser.error(str(error))
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.fresh and args.output.exists():
        shutil.rmtree(args.output)
    if args.data_dir is None:
        args.data_dir = build_data_dir(args.shared_data, args.output / "data")
    started = time.perf_counter()
    args.output.mkdir(parents=True, exist_ok=True)
    with exclusive(args.output, f"{args.output} (another benchmark)"):
        run_benchmark(args)
    print(markdown_tables(json.loads((args.output / "results.json").read_text())))
    print(f"done in {time.perf_counter() - started:.0f} s; results in {args.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
