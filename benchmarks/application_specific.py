"""Application-specific compression: Basis Selection vs generic ROM at equal size, on GSM8K.

    .venv/bin/python benchmarks/application_specific.py                       # ratios 0.8 and 0.6
    .venv/bin/python benchmarks/application_specific.py --ratios 0.8 --svd-bases

For SmolLM2-135M-Instruct and each params ratio it compresses the model with ROM (the ``auto``
preset, its best mode; ``--rom-presets auto paper uniform`` for more), calibrated on GSM8K train
text, and with Basis Selection (trained on GSM8K train), then measures every model, the dense one
included, on

* the target task: the answer loss on the 500 held-out GSM8K records (`--eval-examples N`: the first N)
  (``split_pairs(load_pairs(gsm8k.train.jsonl), validation=500, seed=0)``; nothing is trained
  or calibrated on them: ROM's calibration text is the train split's question + answer);
* general text: WikiText-2 test perplexity (seq 512, 40 windows);

and the compression wall time (and CPU time: the machine is shared, so wall time varies with
the load). Results are written to a JSON file row by row; a rerun skips the rows it has.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from optimum_rom import BasisSelectionConfig, LowRankOptimizer, RomConfig
from optimum_rom.evaluation import answer_loss, text_perplexity
from optimum_rom.model_sources import DEFAULT_MODEL
from optimum_rom.task_data import load_pairs, split_pairs

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--gsm8k", type=Path, default=SHARED_DATA / "gsm8k.train.jsonl")
    parser.add_argument("--wikitext", type=Path, default=SHARED_DATA / "wiki.test.raw")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.8, 0.6])
    parser.add_argument(
        "--methods",
        nargs="+",
        default=["dense", "rom", "basis-selection"],
        choices=["dense", "rom", "basis-selection"],
    )
    parser.add_argument("--rom-presets", nargs="+", default=["auto"], choices=["auto", "paper", "uniform"])
    parser.add_argument(
        "--svd-bases", action="store_true", help="also run Basis Selection on plain SVD bases"
    )
    parser.add_argument(
        "--eval-examples", type=int, default=500, help="score the first N of the 500 held-out records"
    )
    parser.add_argument("--output", type=Path, default=Path("runs/application_specific.json"))
    args = parser.parse_args()
    for path in (args.gsm8k, args.wikitext):
        if not path.is_file():
            raise SystemExit(f"data file not found: {path} (give --gsm8k / --wikitext)")

    train, held_out = split_pairs(load_pairs(args.gsm8k, "gsm8k"), validation=500, seed=0)
    held_out = held_out[: args.eval_examples]
    calibration_text = [pair.prompt + pair.answer for pair in train]
    results = json.loads(args.output.read_text()) if args.output.is_file() else {}

    def record(name: str, compress=None) -> None:
        if name in results:
            print(f"{name}: already measured in {args.output}")
            return
        optimizer = LowRankOptimizer.from_pretrained(args.model)
        row = {}
        if compress is not None:
            started, cpu = time.perf_counter(), time.process_time()
            compress(optimizer)
            row.update(optimizer.report.to_dict())
            row.update(
                compress_seconds=time.perf_counter() - started, compress_cpu_seconds=time.process_time() - cpu
            )
        row.update(measure(optimizer, held_out, args.wikitext))
        results[name] = row
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(results, indent=2) + "\n")
        print(f"{name}: {row}", flush=True)

    if "dense" in args.methods:
        record("dense")
    for ratio in args.ratios:
        for preset in args.rom_presets if "rom" in args.methods else ():
            config = RomConfig.from_preset(preset, params_ratio=ratio)
            record(f"rom-{preset}-{ratio}", lambda o, c=config: o.compress(c, calibration=calibration_text))
        bases = ["activation", "svd"] if args.svd_bases else ["activation"]
        for kind in bases if "basis-selection" in args.methods else ():
            config = BasisSelectionConfig(params_ratio=ratio, bases=kind)
            record(f"basis-selection-{kind}-{ratio}", lambda o, c=config: o.compress(c, train_dataset=train))
    if "dense" in results:
        print_table(results)


def measure(optimizer: LowRankOptimizer, held_out, wikitext: Path) -> dict:
    model, tokenizer = optimizer.model, optimizer.tokenizer
    task = answer_loss(model, tokenizer, held_out)
    text = text_perplexity(model, tokenizer, wikitext, seq_len=512, max_windows=40)
    return {
        "parameters": model.num_parameters(),
        "gsm8k_answer_loss": task.loss,
        "gsm8k_answer_tokens": task.answer_tokens,
        "wikitext2_perplexity": text.perplexity,
    }


def print_table(results: dict) -> None:
    dense = results["dense"]["parameters"]
    print(
        "\n| model | params (ratio) | GSM8K held-out answer loss | WikiText-2 ppl | compression wall / CPU s |"
    )
    print("|---|---|---|---|---|")
    for name, row in results.items():
        seconds = (
            "" if name == "dense" else f"{row['compress_seconds']:.0f} / {row['compress_cpu_seconds']:.0f}"
        )
        print(
            f"| {name} | {row['parameters'] / 1e6:.1f}M ({row['parameters'] / dense:.3f}) | "
            f"{row['gsm8k_answer_loss']:.3f} | {row['wikitext2_perplexity']:.2f} | {seconds} |"
        )


if __name__ == "__main__":
    main()
