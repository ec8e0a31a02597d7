"""Speed of the harness's log-likelihoods: stock ``HFLM`` vs our continuation-logits HFLM, same requests.

    python benchmarks/loglikelihood_speed.py --task arc_easy --limit 40

Both score the same harness requests (ARC-Easy by default, from the shared data folder) of
the same in-memory model in this one run, and must agree; the ratio is what matters on a
shared machine.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from optimum_rom.evaluation.harness import MULTIPLE_CHOICE_TASKS, harness_task, make_lm
from optimum_rom.model_sources import DEFAULT_MODEL, load_model

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def token_requests(lm, task):
    """The (context, continuation) token requests the harness would send for ``task``."""
    task.build_all_requests(limit=None, rank=0, world_size=1)
    pairs = [instance.args for instance in task.instances]
    return [((c, x), *lm._encode_pair(c, x)) for c, x in pairs]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--task", default="arc_easy", choices=list(MULTIPLE_CHOICE_TASKS))
    parser.add_argument(
        "--data", type=Path, default=None, help="task file (default: the shared data folder's)"
    )
    parser.add_argument("--limit", type=int, default=40)
    parser.add_argument("--stock-batch-sizes", default="1,16", help="stock HFLM batch sizes to time")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from lm_eval.models.huggingface import HFLM

    model, tokenizer = load_model(args.model)
    data = args.data or SHARED_DATA / MULTIPLE_CHOICE_TASKS[args.task].file_name
    fast = make_lm(model, tokenizer, args.batch_size)
    requests = token_requests(fast, harness_task(args.task, data, args.limit))
    tokens = sum(len(c) + len(x) for _, c, x in requests)
    print(f"{args.task}: {args.limit} items, {len(requests)} requests, {tokens} tokens")

    variants = {f"continuation-logits HFLM (batch {args.batch_size})": fast}
    for batch_size in [int(b) for b in args.stock_batch_sizes.split(",")]:
        variants[f"stock HFLM (batch {batch_size})"] = HFLM(
            pretrained=model, tokenizer=tokenizer, batch_size=batch_size
        )
    reference = fast._loglikelihood_tokens(requests, disable_tqdm=True)  # also warms up
    seconds = {name: [] for name in variants}
    for repeat in range(args.repeats):  # interleaved, so load changes hit every variant alike
        for name, lm in variants.items() if repeat % 2 == 0 else reversed(variants.items()):
            started = time.perf_counter()
            answers = lm._loglikelihood_tokens(requests, disable_tqdm=True)
            seconds[name].append(time.perf_counter() - started)
            largest = max(abs(a[0] - b[0]) for a, b in zip(answers, reference, strict=True))
            assert largest < 1e-3, f"{name} disagrees with the reference by {largest}"
    baseline = min(seconds[next(iter(variants))])
    for name, times in seconds.items():
        print(f"{name}: best of {args.repeats} {min(times):.1f} s ({min(times) / baseline:.2f}x)")


if __name__ == "__main__":
    main()
