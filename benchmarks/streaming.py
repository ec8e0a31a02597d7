"""Compression time and memory: SmolLM2 per preset, streamed vs in-memory, peak memory vs depth, 7B.

    python benchmarks/streaming.py --work /tmp/rom-streaming            # presets, smollm2, depth
    python benchmarks/streaming.py --part presets                       # SmolLM2: uniform, paper, auto
    python benchmarks/streaming.py --part smollm2                       # streamed vs in memory
    python benchmarks/streaming.py --part depth --blocks 12 24          # 1.5B-class random Llama
    python benchmarks/streaming.py --part moonshot --moonshot-blocks 2  # 7B-shaped, projected to 32
    python benchmarks/streaming.py --part moonshot --moonshot-scoring direction  # best's damage score

Part "presets": SmolLM2-135M at 0.8 with each preset, streamed from disk; time and peak RSS of
the compressing process and WikiText-2 test perplexity (seq 512, 40 windows) of the result.
Part "smollm2": uniform and auto, each streamed and in memory: the largest logit difference of
the two checkpoints, and the time and memory ratios. Part "depth": random Llama models (hidden
2048, MLP 6144; 24 blocks is 1.44B parameters, 5.8 GB in float32) saved as sharded safetensors,
each compressed to params_ratio 0.8 with ``--depth-preset`` on random-token windows, in its own
process started with MKL_DISABLE_FAST_MM=1 (see LOW_MEMORY_ENV). Part "moonshot": ``auto`` on a
random Llama with 7B's shapes (bfloat16 shards, written one block at a time) of
``--moonshot-blocks`` blocks: per-block time of each walk and the projection to 32 blocks; a
stopped run continues when the same command runs again (its row then has the compression walk's
per-block seconds only: the walks that measured the plan ran in the first process).
Calibration is 128-token windows throughout. Results go to <work>/streaming.json and a markdown
table on stdout.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

CHILD = """
import json, sys, time, torch
from transformers import AutoConfig
from optimum_rom import LowRankOptimizer, RomConfig
from optimum_rom.memory import peak_resident_mib
source, output, mode, calibration, preset, options = sys.argv[1:7]
optimizer = LowRankOptimizer.from_pretrained(source)
if mode == "in-memory":
    optimizer.model  # load it whole: compression then runs in memory
config = RomConfig.from_preset(preset, **{"params_ratio": 0.8, **json.loads(options)})
if calibration == "random":
    vocab = AutoConfig.from_pretrained(source).vocab_size
    shape = (config.num_samples, config.seq_len)
    calibration = torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(0))
import optimum_rom.calibration.walker as walker, optimum_rom.streaming as streaming
events = []  # (phase, block, seconds since start): when each block of each walk was done with
def timed(cls, phase):
    done = cls.done
    def record(self, index, *args):
        done(self, index, *args)
        events.append((phase, index, time.perf_counter() - started))
    cls.done = record
timed(walker.ReadOnlyBlocks, "measure"); timed(streaming.StreamingBlocks, "compress")
import functools, optimum_rom.passes.rom as rom
from optimum_rom.calibration import gradients, sensitivity, statistics
phases = {}  # seconds spent inside each of these, over the whole run
def phase(owner, attribute, name):
    original = getattr(owner, attribute)
    @functools.wraps(original)
    def measured(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            phases[name] = phases.get(name, 0.0) + time.perf_counter() - start
    setattr(owner, attribute, measured)
phase(sensitivity, "collect_block_statistics", "measure: forward + Gram matrices")
phase(statistics.LinearStatistics, "output_eigenpairs", "measure: output eigenpairs")
phase(statistics.LinearStatistics, "output_spectrum", "measure: output spectra")
phase(gradients.OutputGradients, "backward", "backward walk")
phase(gradients.OutputGradients, "_block_backward", "backward walk: the blocks")
phase(rom, "collect_block_statistics", "compress: forward + Gram matrices")
phase(rom, "rom_factorize", "compress: factorizations")
phase(rom, "refine_block", "compress: refinement")
started = time.perf_counter()
optimizer.compress(config, calibration=calibration, save_dir=output, overwrite=True, progress=False)
print(json.dumps({"seconds": time.perf_counter() - started, "peak_rss_mb": peak_resident_mib(),
                  "params_before": optimizer.report.params_before, "params_after": optimizer.report.params_after,
                  "streamed": optimizer.report.streamed, "events": events, "phases": phases}))
"""


# MKL (torch's BLAS/LAPACK) pools its large work buffers unless this is set when the process starts;
# on the 2048-wide model the pool holds ~0.25 GB at the peak (measured: 1520 -> 1277 MiB, +4% time).
LOW_MEMORY_ENV = {"MKL_DISABLE_FAST_MM": "1"}


def run_child(
    source: Path,
    output: Path,
    mode: str,
    calibration: str,
    preset: str = "uniform",
    env: dict | None = None,
    **options,
) -> dict:
    """Compress in a process of its own (its peak RSS is the run's); ``options`` override the preset."""
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            CHILD,
            str(source),
            str(output),
            mode,
            calibration,
            preset,
            json.dumps(options),
        ],
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


SEVEN_B = dict(hidden=4096, mlp=11008, heads=32, vocab=32000, blocks=32)  # Llama-2-7B's shapes


def llama_7b_shaped(directory: Path, blocks: int) -> Path:
    """A random Llama with 7B's shapes and ``blocks`` blocks, written shard by shard in bfloat16.

    The model is never built: each block's tensors are drawn (normal, std 0.02; norms 1) and saved
    as one shard, so writing a 13 GB checkpoint needs one block of memory.
    """
    if (directory / "config.json").is_file():
        return directory
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig

    from optimum_rom.model_sources import DEFAULT_MODEL, fetch_known_model

    hidden, mlp, vocab = SEVEN_B["hidden"], SEVEN_B["mlp"], SEVEN_B["vocab"]
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=blocks,
        num_attention_heads=SEVEN_B["heads"], num_key_value_heads=SEVEN_B["heads"],
        max_position_embeddings=4096, tie_word_embeddings=False, torch_dtype="bfloat16",
    )  # fmt: skip
    generator = torch.Generator().manual_seed(0)

    def normal(*shape):
        return (torch.randn(*shape, generator=generator) * 0.02).to(torch.bfloat16)

    directory.mkdir(parents=True, exist_ok=True)
    shards = {"model-embed.safetensors": {"model.embed_tokens.weight": normal(vocab, hidden)}}
    for index in range(blocks):
        prefix = f"model.layers.{index}"
        shapes = {
            "self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (hidden, hidden),
            "self_attn.v_proj": (hidden, hidden), "self_attn.o_proj": (hidden, hidden),
            "mlp.gate_proj": (mlp, hidden), "mlp.up_proj": (mlp, hidden), "mlp.down_proj": (hidden, mlp),
        }  # fmt: skip
        block = {f"{prefix}.{name}.weight": normal(*shape) for name, shape in shapes.items()}
        for norm in ("input_layernorm", "post_attention_layernorm"):
            block[f"{prefix}.{norm}.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
        shards[f"model-block-{index:02d}.safetensors"] = block
    shards["model-head.safetensors"] = {
        "model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16),
        "lm_head.weight": normal(vocab, hidden),
    }
    weight_map, total = {}, 0
    for file, tensors in shards.items():
        save_file(tensors, directory / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        tensors.clear()  # one shard in memory at a time
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    AutoTokenizer.from_pretrained(fetch_known_model(DEFAULT_MODEL)).save_pretrained(directory)
    config.save_pretrained(directory)  # last: a directory with a config is complete
    return directory


def moonshot_part(work: Path, blocks: int, samples: int, scoring: str | None = None) -> list[dict]:
    """``auto`` at 0.8 on a 7B-shaped model of ``blocks`` blocks, and the projection to all 32.

    With fewer than 32 blocks the embeddings are a larger share of the model, so the size target
    is stated on the decoder linears: the share 0.8 of the whole 7B model leaves them.
    """
    if blocks < 2:  # before the hours of work: the per-block times are differences between blocks
        raise ValueError("the per-block times need at least 2 blocks (--moonshot-blocks)")
    hidden, mlp, vocab = SEVEN_B["hidden"], SEVEN_B["mlp"], SEVEN_B["vocab"]
    per_block = 4 * hidden * hidden + 3 * hidden * mlp
    linears = SEVEN_B["blocks"] * per_block
    total = linears + 2 * vocab * hidden + (2 * SEVEN_B["blocks"] + 1) * hidden
    linear_ratio = 1 - 0.2 * total / linears
    source = llama_7b_shaped(work / f"llama-7b-shaped-{blocks}", blocks)
    size_gb = sum(f.stat().st_size for f in source.glob("*.safetensors")) / 1e9
    from optimum_rom import RomConfig

    scoring = scoring or RomConfig.from_preset("auto").scoring  # None: the preset's own
    result = run_child(
        source, work / f"llama-7b-shaped-{blocks}-auto-{scoring}", "streamed", "random", "auto",
        env=LOW_MEMORY_ENV, params_ratio=round(linear_ratio, 4), ratio_of="linears", num_samples=samples,
        seq_len=128, scoring=scoring,
    )  # fmt: skip
    events = result.pop("events")
    measured = [t for phase, _, t in events if phase == "measure"]
    compressed = [t for phase, _, t in events if phase == "compress"]
    row = {
        "model": f"7B-shaped random Llama, {blocks} of 32 blocks, auto, damage per {scoring}",
        "bf16_gb": size_gb, **result, "linear_ratio_target": round(linear_ratio, 4),
    }  # fmt: skip
    if len(measured) < 2:  # a resumed run: the plan was measured before, the walks' pace is not known
        row["compress_blocks_s"] = [round(b - a, 1) for a, b in itertools.pairwise(compressed)]
    else:
        # a block's time in each walk after the first block (the first compresses faster here), and
        # its share of the backward walk; the rest of the run (set-up, the head's gradient) is counted once
        measure_block = (measured[-1] - measured[0]) / (blocks - 1)
        compress_block = (compressed[-1] - compressed[0]) / (blocks - 1)
        backward_block = result["phases"]["backward walk: the blocks"] / blocks
        per_block_seconds = measure_block + compress_block + backward_block
        row.update(
            measure_block_s=measure_block, compress_block_s=compress_block, backward_block_s=backward_block,
            projected_32_blocks_h=(result["seconds"] + (SEVEN_B["blocks"] - blocks) * per_block_seconds) / 3600,
        )  # fmt: skip
    print(json.dumps(row), flush=True)
    return [row]


def depth_part(work: Path, block_counts: list[int], preset: str, samples: int) -> list[dict]:
    rows = []
    for blocks in block_counts:
        source = random_llama(work / f"llama-{blocks}", blocks)
        size_gb = sum(f.stat().st_size for f in source.glob("*.safetensors")) / 1e9
        output = work / f"llama-{blocks}-{preset}"
        result = run_child(
            source, output, "streamed", "random", preset, env=LOW_MEMORY_ENV, num_samples=samples, seq_len=128
        )
        rows.append({"model": f"random Llama, {blocks} blocks, {preset}", "fp32_gb": size_gb, **result})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def smollm2_part(work: Path, calibration: str, presets: list[str]) -> list[dict]:
    """Each streaming preset from disk and in memory: the same checkpoint, and the time and memory ratio."""
    import torch
    from transformers import AutoModelForCausalLM

    from optimum_rom.model_sources import DEFAULT_MODEL, fetch_known_model

    source = fetch_known_model(DEFAULT_MODEL)
    rows = []
    for preset in presets:
        runs = {}
        for mode in ("streamed", "in-memory"):
            runs[mode] = run_child(source, work / f"smollm2-{preset}-{mode}", mode, calibration, preset)
            rows.append({"model": f"SmolLM2-135M, {preset}, {mode}", "fp32_gb": 0.538, **runs[mode]})
            print(json.dumps(rows[-1]), flush=True)
        ids = torch.arange(100, 164)[None]
        streamed, in_memory = (
            AutoModelForCausalLM.from_pretrained(work / f"smollm2-{preset}-{mode}")(ids).logits
            for mode in ("streamed", "in-memory")
        )
        rows.append(
            {
                "preset": preset,
                "max_logit_difference": (streamed - in_memory).abs().max().item(),
                "time_ratio": runs["streamed"]["seconds"] / runs["in-memory"]["seconds"],
                "rss_ratio": runs["streamed"]["peak_rss_mb"] / runs["in-memory"]["peak_rss_mb"],
            }
        )
        print(json.dumps(rows[-1]), flush=True)
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
    parser.add_argument("--part", choices=["all", "presets", "depth", "smollm2", "moonshot"], default="all")
    parser.add_argument(
        "--eval-data", type=Path, default=Path(__file__).parents[2] / "shared/data/wiki.test.raw"
    )
    parser.add_argument("--blocks", type=int, nargs="+", default=[12, 24])
    parser.add_argument("--smollm2-presets", nargs="+", default=["uniform", "auto"])
    parser.add_argument("--depth-preset", default="auto", help="preset of the depth part")
    parser.add_argument(
        "--depth-samples", type=int, default=128, help="calibration windows (of 128 tokens) of the depth part"
    )
    parser.add_argument(
        "--moonshot-blocks", type=int, default=2, help="blocks of the 7B-shaped model (32: all)"
    )
    parser.add_argument(
        "--moonshot-samples", type=int, default=128, help="its calibration windows of 128 tokens"
    )
    parser.add_argument(
        "--moonshot-scoring", choices=["matrix", "direction"], help="its damage scoring (default: auto's)"
    )
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
        rows += smollm2_part(args.work, args.calibration, args.smollm2_presets)
    if args.part in ("all", "depth"):
        rows += depth_part(args.work, args.blocks, args.depth_preset, args.depth_samples)
    if args.part == "moonshot":  # hours: only when asked for
        rows += moonshot_part(args.work, args.moonshot_blocks, args.moonshot_samples, args.moonshot_scoring)
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
