"""Compression time and memory: SmolLM2 per preset, streamed vs in-memory, and peak memory vs depth.

    python benchmarks/streaming.py --work /tmp/rom-streaming            # all parts
    python benchmarks/streaming.py --part presets                       # SmolLM2: uniform, paper, auto
    python benchmarks/streaming.py --part depth --blocks 12 24          # 1.5B-class random Llama

Part "depth": random Llama models of 12 and 24 blocks (hidden 2048, MLP 6144, 24 blocks is
1.44B parameters, 5.8 GB in float32) saved as sharded safetensors, each compressed to
params_ratio 0.8 (ROM, uniform, 128 x 128 calibration tokens) in its own process, started with
MKL_DISABLE_FAST_MM=1 (see LOW_MEMORY_ENV); peak RSS and time per run. Part "smollm2": the same
compression of SmolLM2-135M streamed from disk and in memory; identical outputs, and the time
and memory ratio. Part "presets": SmolLM2-135M at 0.8 with each preset (uniform and paper stream
from disk; auto, which measures gradients, runs in memory), time and peak RSS of the compressing
process and WikiText-2 test perplexity (seq 512, 40 windows) of the result.
Results go to <work>/streaming.json and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

CHILD = """
import json, resource, sys, time, torch
from transformers import AutoConfig
from optimum_rom import LowRankOptimizer, RomConfig
source, output, mode, calibration, preset = sys.argv[1:6]
optimizer = LowRankOptimizer.from_pretrained(source)
if mode == "in-memory":
    optimizer.model  # load it whole: compression then runs in memory
if calibration == "random":
    vocab = AutoConfig.from_pretrained(source).vocab_size
    calibration = torch.randint(0, vocab, (128, 128), generator=torch.Generator().manual_seed(0))
started = time.perf_counter()
config = RomConfig.from_preset(preset, params_ratio=0.8)
optimizer.compress(config, calibration=calibration, save_dir=output, overwrite=True, progress=False)
print(json.dumps({"seconds": time.perf_counter() - started, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "params_before": optimizer.report.params_before, "params_after": optimizer.report.params_after,
                  "streamed": optimizer.report.streamed}))
"""


# MKL (torch's BLAS/LAPACK) pools its large work buffers unless this is set when the process starts;
# on the 2048-wide model the pool holds ~0.25 GB at the peak (measured: 1520 -> 1277 MiB, +4% time).
LOW_MEMORY_ENV = {"MKL_DISABLE_FAST_MM": "1"}


def run_child(
    source: Path, output: Path, mode: str, calibration: str, preset: str = "uniform", env: dict | None = None
) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(source), str(output), mode, calibration, preset],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
    )
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def random_llama(directory: Path, blocks: int) -> Path:
    """A randomly initialized Llama of ``blocks`` blocks, saved once as sharded safetensors."""
    if (directory / "config.json").is_file():
        return directory
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from optimum_rom.model_sources import DEFAULT_MODEL, fetch_known_model

    config = LlamaConfig(
        vocab_size=32000, hidden_size=2048, intermediate_size=6144, num_hidden_layers=blocks,
        num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=2048, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(directory, max_shard_size="2GB")
    # A tokenizer is saved with every checkpoint; any will do for token-id calibration.
    AutoTokenizer.from_pretrained(fetch_known_model(DEFAULT_MODEL)).save_pretrained(directory)
    return directory


def depth_part(work: Path, block_counts: list[int]) -> list[dict]:
    rows = []
    for blocks in block_counts:
        source = random_llama(work / f"llama-{blocks}", blocks)
        size_gb = sum(f.stat().st_size for f in source.glob("*.safetensors")) / 1e9
        result = run_child(source, work / f"llama-{blocks}-rom", "streamed", "random", env=LOW_MEMORY_ENV)
        rows.append({"model": f"random Llama, {blocks} blocks", "fp32_gb": size_gb, **result})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def smollm2_part(work: Path, calibration: str) -> list[dict]:
    import torch
    from transformers import AutoModelForCausalLM

    from optimum_rom.model_sources import DEFAULT_MODEL, fetch_known_model

    source = fetch_known_model(DEFAULT_MODEL)
    rows = []
    for mode in ("streamed", "in-memory"):
        result = run_child(source, work / f"smollm2-{mode}", mode, calibration)
        rows.append({"model": f"SmolLM2-135M, {mode}", "fp32_gb": 0.538, **result})
        print(json.dumps(rows[-1]), flush=True)
    ids = torch.arange(100, 164)[None]
    logits = [
        AutoModelForCausalLM.from_pretrained(work / f"smollm2-{mode}")(ids).logits
        for mode in ("streamed", "in-memory")
    ]
    rows.append({"identical_logits": bool(torch.equal(*logits))})
    return rows


def presets_part(work: Path, calibration: str, eval_data: Path) -> list[dict]:
    from transformers import AutoModelForCausalLM

    from optimum_rom.evaluation import text_perplexity
    from optimum_rom.model_sources import DEFAULT_MODEL, fetch_known_model, load_model

    source = fetch_known_model(DEFAULT_MODEL)
    dense, tokenizer = load_model(source)
    rows = [
        {
            "model": "SmolLM2-135M, dense",
            "perplexity": text_perplexity(dense, tokenizer, eval_data, 512, 40).perplexity,
        }
    ]
    del dense
    for preset in ("uniform", "paper", "auto"):
        output = work / f"smollm2-{preset}"
        result = run_child(source, output, "streamed", calibration, preset)
        model = AutoModelForCausalLM.from_pretrained(output)
        result["perplexity"] = text_perplexity(model, tokenizer, eval_data, 512, 40).perplexity
        rows.append({"model": f"SmolLM2-135M, {preset}", "fp32_gb": 0.538, **result})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work", type=Path, default=Path("/tmp/rom-streaming"))
    parser.add_argument("--part", choices=["all", "presets", "depth", "smollm2"], default="all")
    parser.add_argument(
        "--eval-data", type=Path, default=Path(__file__).parents[2] / "shared/data/wiki.test.raw"
    )
    parser.add_argument("--blocks", type=int, nargs="+", default=[12, 24])
    parser.add_argument(
        "--calibration",
        default=str(Path(__file__).parents[1] / "optimum_rom/data/wikitext2_valid_excerpt.txt"),
    )
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    rows = []
    if args.part in ("all", "presets"):
        rows += presets_part(args.work, args.calibration, args.eval_data)
    if args.part in ("all", "smollm2"):
        rows += smollm2_part(args.work, args.calibration)
    if args.part in ("all", "depth"):
        rows += depth_part(args.work, args.blocks)
    (args.work / "streaming.json").write_text(json.dumps(rows, indent=2))
    print("\n| run | fp32 size | peak RSS | time | WikiText-2 ppl |\n|---|---|---|---|---|")
    for row in rows:
        if "seconds" in row or "perplexity" in row:
            size = f"{row['fp32_gb']:.2f} GB" if "fp32_gb" in row else ""
            rss = f"{row['peak_rss_mb'] / 1024:.2f} GB" if "peak_rss_mb" in row else ""
            seconds = f"{row['seconds']:.0f} s" if "seconds" in row else ""
            perplexity = f"{row['perplexity']:.2f}" if "perplexity" in row else ""
            print(f"| {row['model']} | {size} | {rss} | {seconds} | {perplexity} |")
    print(
        f"\ntotal {time.perf_counter() - started:.0f} s; this process peaked at "
        f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB"
    )


if __name__ == "__main__":
    main()
