"""Compress SmolLM2-135M-Instruct for GSM8K-style math with Basis Selection, on the CPU.

    python examples/basis_selection_gsm8k.py --data gsm8k.train.jsonl
    python examples/basis_selection_gsm8k.py --data gsm8k.train.jsonl --params-ratio 0.6 --fine-tune-steps 20

``--data`` is GSM8K's ``train.jsonl`` (records ``{"question", "answer"}``, e.g. from
github.com/openai/grade-school-math). The example holds out ``--holdout`` records (seeded),
trains on the rest, and reports the loss on the held-out answers before and after, together
with the parameter count. The compressed checkpoint reloads with plain ``AutoModelForCausalLM``.
"""

from __future__ import annotations

import argparse
import time

from transformers import AutoModelForCausalLM

from optimum_rom import BasisSelectionConfig, LowRankOptimizer
from optimum_rom.evaluation import answer_loss
from optimum_rom.model_sources import DEFAULT_MODEL
from optimum_rom.task_data import load_pairs, split_pairs


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", required=True, help="GSM8K train.jsonl")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model directory, .gguf file or known model")
    parser.add_argument("--params-ratio", type=float, default=0.8)
    parser.add_argument(
        "--holdout", type=int, default=500, help="records kept out of training, for evaluation"
    )
    parser.add_argument("--eval-examples", type=int, default=200, help="held-out records scored (0: all)")
    parser.add_argument("--num-rounds", type=int, default=6)
    parser.add_argument("--steps-per-round", type=int, default=6)
    parser.add_argument("--fine-tune-steps", type=int, default=0)
    parser.add_argument("--output", default="runs/basis-selection-gsm8k")
    args = parser.parse_args()

    train, held_out = split_pairs(load_pairs(args.data, "gsm8k"), validation=args.holdout, seed=0)
    held_out = held_out[: args.eval_examples or None]
    optimizer = LowRankOptimizer.from_pretrained(args.model)
    dense = answer_loss(optimizer.model, optimizer.tokenizer, held_out)
    print(f"dense: {optimizer.model.num_parameters():,} parameters, held-out answer loss {dense.loss:.3f}")

    config = BasisSelectionConfig(
        params_ratio=args.params_ratio,
        num_rounds=args.num_rounds,
        steps_per_round=args.steps_per_round,
        fine_tune_steps=args.fine_tune_steps,
    )
    # Interrupted? Run the same command again: it continues after the last completed round.
    optimizer.compress(config, train_dataset=train, save_dir=args.output, overwrite=True)
    report = optimizer.report

    started = time.perf_counter()
    reloaded = AutoModelForCausalLM.from_pretrained(args.output)
    load_seconds = time.perf_counter() - started
    compressed = answer_loss(reloaded, optimizer.tokenizer, held_out)

    print(f"\nBasis Selection for GSM8K on {args.model}, trained on {len(train)} records")
    print(f"{'':<36}{'dense':>14}{'compressed':>14}")
    print(f"{'parameters':<36}{report.params_before:>14,}{report.params_after:>14,}")
    print(f"{'params ratio':<36}{1:>14.3f}{report.ratio:>14.3f}")
    print(
        f"{f'held-out answer loss ({dense.examples} records)':<36}{dense.loss:>14.3f}{compressed.loss:>14.3f}"
    )
    print(
        f"\ncompression {report.seconds:.0f} s ({report.factorized_modules} linears factorized); checkpoint "
        f"{args.output} reloads with AutoModelForCausalLM in {load_seconds:.1f} s"
    )


if __name__ == "__main__":
    main()
