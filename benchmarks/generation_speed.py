"""How fast the dense model answers prompts (what self-calibration and the chat task pay), and how
close that is to the machine.

    python benchmarks/generation_speed.py                 # batch 1, 4, 16, 64; 1 thread; 256 new tokens
    python benchmarks/generation_speed.py --threads 2 --batches 16,64 --repeats 1

For each batch size it times ``optimum_rom.generation.generate_tokens`` (transformers' ``generate``
with the KV cache, greedy) on prompts of the bundled chat set of similar length: one new token (the
prefill) and ``--new-tokens`` (the difference is the decode), as self-calibration answers (up to 256
tokens). Each row runs twice: as ``generate_tokens`` runs it (key/value heads shared by query heads
read in place, ``generation_attention``; a KV cache written in place, ``growing_cache``) and
as transformers' ``generate`` runs by itself (its ``sdpa`` copies the shared heads per query head
under a padding mask, its cache copies itself at every step): the baseline of the same run. In
the same run it measures the two
limits of a decode step: its matmuls at the measured matmul rate (FLOP bound) and one read of the
weights at the measured memory bandwidth. The ratio of the larger limit to the measured step says
how close generation is to the machine (what is left is per-step overhead: the Python of 30 blocks,
the cache, the sampling loop); the rows are interleaved over the repeats so that load from other
processes hits them alike.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

from optimum_rom import generation, load_model
from optimum_rom.calibration.data import BUNDLED_PROMPTS
from optimum_rom.chat import prompt_ids, read_conversations
from optimum_rom.generation import generate_tokens
from optimum_rom.model_sources import DEFAULT_MODEL


def matmul_gflops(size: int = 1024, repeats: int = 20) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - started) / 1e9


def bandwidth_gbs(megabytes: int = 512, repeats: int = 5) -> float:
    """Read + write bandwidth of a large copy (what streaming the weights once per step costs)."""
    source = torch.empty(megabytes * 2**20 // 4)
    target = torch.empty_like(source)
    target.copy_(source)
    started = time.perf_counter()
    for _ in range(repeats):
        target.copy_(source)
    return 2 * source.numel() * 4 * repeats / (time.perf_counter() - started) / 1e9


GENERATIONS = ("optimum-rom", "transformers")


@contextlib.contextmanager
def _generation(name: str):
    """``"transformers"``: ``generate_tokens`` without its attention and cache (the baseline row)."""
    if name == "optimum-rom":
        yield
        return
    attention, cache = generation.generation_attention, generation.growing_cache
    generation.generation_attention, generation.growing_cache = (
        contextlib.nullcontext,
        lambda model, tokens: None,
    )
    try:
        yield
    finally:
        generation.generation_attention, generation.growing_cache = attention, cache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--batches", default="1,4,16,64")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, tokenizer = load_model(args.model)
    conversations = read_conversations(BUNDLED_PROMPTS, need_answer=False)
    prompts = [prompt_ids(tokenizer, c) for c in conversations]
    parameters = model.num_parameters()
    # per token, every weight is a multiply-add except the input embedding (a lookup), and a tied
    # output head counts once among the parameters but is a matmul too
    head = model.get_output_embeddings().weight
    embedding = model.get_input_embeddings().weight
    flops_per_token = 2 * (parameters - embedding.numel() + head.numel())
    weight_bytes = 4 * parameters

    prompts.sort(key=len)  # batches of similar length, as generate_tokens makes them: no padding to speak of
    batches = [int(b) for b in args.batches.split(",")]
    rows = [(batch, generator) for batch in batches for generator in GENERATIONS]
    prefill: dict[tuple, list[float]] = {row: [] for row in rows}
    decode: dict[tuple, list[float]] = {row: [] for row in rows}
    gflops, bandwidth = [], []
    for _ in range(args.repeats):
        gflops.append(matmul_gflops())
        bandwidth.append(bandwidth_gbs())
        for batch, generator in rows:
            chunk = prompts[len(prompts) // 2 - batch // 2 :][:batch]
            times = []
            with _generation(generator):
                for new_tokens in (1, args.new_tokens):
                    started = time.perf_counter()
                    answers = generate_tokens(
                        model, tokenizer, chunk, new_tokens, batch_size=batch, progress=False
                    )
                    times.append(time.perf_counter() - started)
            steps = max(len(a) for a in answers) - 1  # rows stop together or the longest runs alone
            prefill[batch, generator].append(times[0] / sum(len(p) for p in chunk))
            decode[batch, generator].append((times[1] - times[0]) / max(steps, 1))
    rate, speed = statistics.median(gflops), statistics.median(bandwidth)
    print(f"{args.threads} thread(s): matmul {rate:.1f} GFLOP/s, memory copy {speed:.1f} GB/s (medians)")
    print(
        "| batch | generation | prefill ms/token | decode ms/step | tokens/s | FLOP bound ms/step "
        "| weight read ms | bound / measured | decode vs transformers |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for batch, generator in rows:
        step = statistics.median(decode[batch, generator])
        baseline = statistics.median(decode[batch, "transformers"])
        flop_ms = 1e3 * batch * flops_per_token / (rate * 1e9)
        read_ms = 1e3 * weight_bytes / (speed * 1e9)
        print(
            f"| {batch} | {generator} | {1e3 * statistics.median(prefill[batch, generator]):.1f} "
            f"| {1e3 * step:.0f} | {batch / step:.0f} | {flop_ms:.0f} | {read_ms:.0f} "
            f"| {max(flop_ms, read_ms) / (1e3 * step):.0%} | {step / baseline:.2f}x |"
        )
    print(f"prefill FLOP bound: {1e3 * flops_per_token / (rate * 1e9):.1f} ms/token")


if __name__ == "__main__":
    main()
