"""Training memory and step time of Basis Selection, with and without gradient checkpointing.

    .venv/bin/python benchmarks/basis_selection_memory.py --data gsm8k.train.jsonl

Each setting runs in a fresh process (so peak RSS is its own): load SmolLM2-135M-Instruct, build
the basis layers (plain SVD bases: the memory is the same for both kinds, and SVD is quicker),
train one round of ``--steps`` steps at ``--batch-size``, merge. Reports the process's peak RSS
and the mean step time (CPU time too: the machine may be shared).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def measure(data: Path, batch_size: int, steps: int, checkpointing: bool) -> dict:
    """One setting, in this process."""
    import optimum_rom.passes.basis_selection.run as run_module
    from optimum_rom import BasisSelectionConfig, LowRankOptimizer
    from optimum_rom.task_data import load_pairs, split_pairs

    train, _ = split_pairs(load_pairs(data, "gsm8k"), validation=500, seed=0)
    optimizer = LowRankOptimizer.from_pretrained("smollm2-135m-instruct")
    config = BasisSelectionConfig(
        params_ratio=0.8,
        bases="svd",
        num_rounds=1,
        steps_per_round=steps,
        batch_size=batch_size,
        gradient_checkpointing=checkpointing,
    )
    timings = []
    original = run_module.train_steps

    def timed(*args, **kwargs):
        started, cpu = time.perf_counter(), time.process_time()
        result = original(*args, **kwargs)
        timings.append(((time.perf_counter() - started) / steps, (time.process_time() - cpu) / steps))
        return result

    run_module.train_steps = timed
    optimizer.compress(config, train_dataset=train, progress=False)
    return {
        "gradient_checkpointing": checkpointing,
        "batch_size": batch_size,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
        "step_seconds": timings[0][0],
        "step_cpu_seconds": timings[0][1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=SHARED_DATA / "gsm8k.train.jsonl")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--one", choices=["on", "off"], help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.data, args.batch_size, args.steps, args.one == "on")))
        return
    if not args.data.is_file():
        raise SystemExit(f"data file not found: {args.data} (give --data)")
    print(
        "| gradient checkpointing | batch | peak RSS | s / step (wall) | s / step (CPU) |\n|---|---|---|---|---|"
    )
    for setting in ("off", "on"):
        command = [sys.executable, __file__, "--data", str(args.data), "--batch-size", str(args.batch_size)]
        command += ["--steps", str(args.steps), "--one", setting]
        output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        row = json.loads(output.strip().splitlines()[-1])
        print(
            f"| {setting} | {row['batch_size']} | {row['peak_rss_gb']:.2f} GB | {row['step_seconds']:.1f} | "
            f"{row['step_cpu_seconds']:.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
