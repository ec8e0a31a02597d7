"""onnxruntime inference of dense vs ROM-factorized SmolLM2, fp32 and int8: size, speed, memory, quality.

    python benchmarks/ort_speed.py                       # ROM 0.8 and 0.5, 1 and 2 threads, 3 repeats
    python benchmarks/ort_speed.py --ratios 0.8 --threads 1 --repeats 1 --perplexity-windows 4   # quick look

For the dense model and each ROM ratio (uniform allocation, 128 x 128 calibration tokens of
WikiText-2 valid) it exports ``optimum-cli rom export`` directories: fp32, int8 weight-only
(MatMulNBits) and int8 dynamic (optimum's ORTQuantizer), plus fp32 through the stock
``optimum-cli export onnx`` graph. Each configuration then runs in its own subprocess with
onnxruntime only (``examples/onnx_chat.py``'s runtime, no torch loaded): a 512-token prompt
(prefill tokens/s), 128 greedy new tokens with the KV cache (decode tokens/s), peak RSS.
Configurations are interleaved over the repeats and the median is kept, so load from other
processes hits all of them alike; ratios are against the dense fp32 model of the same run.
WikiText-2 test perplexity (512-token windows) is measured through ``ORTModelForCausalLM``.

Writes ``results.json``, ``results.md`` (the tables) and ``ort_speed.png`` to ``--output``;
compressed checkpoints and exports are cached in ``--work-dir`` and reused.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
SHARED_DATA = REPOSITORY.parent / "shared" / "data"
CHAT_EXAMPLE = REPOSITORY / "examples" / "onnx_chat.py"


@dataclass(frozen=True)
class Variant:
    """One exported model: which checkpoint, which graph, which weights."""

    name: str
    checkpoint: str  # "dense" or a ROM ratio such as "0.8"
    graph: str = "fused"
    int8: str | None = None

    @property
    def directory_name(self) -> str:
        return self.name.replace(" ", "_").replace("+", "").replace("(", "").replace(")", "")


# -- worker: one configuration, onnxruntime only ------------------------------------------------
def worker(directory: Path, threads: int, prompt_tokens: int, new_tokens: int) -> dict:
    """Prefill and decode timings of one exported model in this (fresh) process; no torch imported."""
    import importlib.util

    import numpy as np

    spec = importlib.util.spec_from_file_location("onnx_chat", CHAT_EXAMPLE)
    chat = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(chat)
    model = chat.OnnxCausalLM(directory, threads=threads, max_length=prompt_tokens + new_tokens + 1)
    vocab = model.config["vocab_size"]
    prompt = np.random.default_rng(0).integers(0, vocab, prompt_tokens)
    model.forward(prompt)  # warm-up: onnxruntime allocates and packs weights on the first runs
    prefill = []
    for _ in range(2):
        model.reset()
        started = time.perf_counter()
        logits = model.forward(prompt)
        prefill.append(time.perf_counter() - started)
    token = int(logits.argmax())
    started, cpu_started = time.perf_counter(), time.process_time()
    for _ in range(new_tokens):
        token = int(model.forward([token]).argmax())
    decode, decode_cpu = time.perf_counter() - started, time.process_time() - cpu_started
    assert "torch" not in sys.modules
    return {
        "prefill_tokens_per_s": prompt_tokens / min(prefill),
        "decode_tokens_per_s": new_tokens / decode,
        "decode_tokens_per_cpu_s": new_tokens / decode_cpu,
        "peak_rss_mb": peak_rss_mb(),
    }


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM; ``ru_maxrss`` would include the parent's, copied at fork)."""
    status = Path("/proc/self/status").read_text().splitlines()
    return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024


# -- main: prepare, measure, report -------------------------------------------------------------
def variants_for(ratios: list[str], stock: bool) -> list[Variant]:
    variants = [Variant("dense", "dense"), Variant("dense + int8", "dense", int8="weight-only")]
    for ratio in ratios:
        variants += [
            Variant(f"ROM {ratio}", ratio),
            Variant(f"ROM {ratio} + int8", ratio, int8="weight-only"),
            Variant(f"ROM {ratio} + int8 dynamic", ratio, int8="dynamic"),
        ]
    if stock:
        variants.append(Variant("dense (stock graph)", "dense", graph="optimum"))
        variants += [Variant(f"ROM {ratio} (stock graph)", ratio, graph="optimum") for ratio in ratios]
    return variants


def prepare_checkpoints(args, ratios: list[str]) -> dict[str, dict]:
    """The dense model and one ROM checkpoint per ratio (compressed once, cached in the work dir)."""
    from optimum_rom import LowRankOptimizer, RomConfig
    from optimum_rom.model_sources import resolve_model_path
    from optimum_rom.structure import count_parameters

    checkpoints = {}
    dense = LowRankOptimizer.from_pretrained(args.model)
    checkpoints["dense"] = {
        "path": str(resolve_model_path(args.model)[0]),
        "parameters": count_parameters(dense.model),
    }
    for ratio in ratios:
        path = args.work_dir / f"rom-{ratio}"
        if not (path / "config.json").is_file():
            optimizer = LowRankOptimizer.from_pretrained(args.model)
            config = RomConfig(params_ratio=float(ratio), allocation="uniform", num_samples=128, seq_len=128)
            optimizer.compress(config, calibration=args.calibration, save_dir=path)
            print(f"compressed ROM {ratio} in {optimizer.report.seconds:.0f} s")
        from transformers import AutoModelForCausalLM

        checkpoints[ratio] = {
            "path": str(path),
            "parameters": count_parameters(AutoModelForCausalLM.from_pretrained(path)),
        }
    return checkpoints


def export_variants(args, variants: list[Variant], checkpoints: dict[str, dict]) -> dict[str, dict]:
    from optimum_rom import export_onnx

    exports = {}
    for variant in variants:
        path = args.work_dir / "onnx" / variant.directory_name
        report_file = path / "export_report.json"
        if not report_file.is_file():
            source = checkpoints[variant.checkpoint]["path"]
            report = export_onnx(source, path, int8=variant.int8, graph=variant.graph, overwrite=True)
            report_file.write_text(json.dumps(report.to_dict(), indent=2))
            print(f"exported {variant.name}: {report.onnx_bytes / 1e6:.1f} MB in {report.seconds:.0f} s")
        exports[variant.name] = json.loads(report_file.read_text())
    return exports


def measure_speed(args, variants: list[Variant]) -> dict[str, dict]:
    """Median over interleaved repeats of each (variant, threads) run in its own subprocess."""
    runs: dict[tuple[str, int], list[dict]] = {}
    for repeat in range(args.repeats):
        order = variants if repeat % 2 == 0 else variants[::-1]
        for variant in order:
            for threads in args.threads:
                command = [
                    sys.executable, __file__, "--worker", str(args.work_dir / "onnx" / variant.directory_name),
                    "--threads", str(threads), "--prompt-tokens", str(args.prompt_tokens),
                    "--new-tokens", str(args.new_tokens),
                ]  # fmt: skip
                result = subprocess.run(command, capture_output=True, text=True)
                if result.returncode != 0:
                    raise RuntimeError(f"{variant.name} with {threads} thread(s) failed:\n{result.stderr}")
                runs.setdefault((variant.name, threads), []).append(json.loads(result.stdout))
                print(f"  repeat {repeat + 1}: {variant.name}, {threads} thread(s): {result.stdout.strip()}")
    return {
        f"{name}|{threads}": {key: statistics.median(r[key] for r in results) for key in results[0]}
        for (name, threads), results in runs.items()
    }


def measure_quality(args, variants: list[Variant]) -> dict[str, float]:
    from optimum_rom.evaluation import text_perplexity
    from optimum_rom.export import load_onnx_model

    perplexities = {}
    for variant in variants:
        if variant.graph != "fused":
            continue  # same weights as the fused fp32 graph
        model, tokenizer = load_onnx_model(args.work_dir / "onnx" / variant.directory_name)
        result = text_perplexity(
            model, tokenizer, args.eval_data, seq_len=512, max_windows=args.perplexity_windows
        )
        perplexities[variant.name] = result.perplexity
        print(f"{variant.name}: WikiText-2 perplexity {result.perplexity:.2f} ({result.seconds:.0f} s)")
    return perplexities


def speedup(results: dict, name: str, threads: int, key: str = "decode_tokens_per_s") -> float:
    return results["speed"][f"{name}|{threads}"][key] / results["speed"][f"dense|{threads}"][key]


def tables(results: dict) -> str:
    dense_bytes = results["exports"]["dense"]["onnx_bytes"]
    lines = [
        f"SmolLM2-135M-Instruct, onnxruntime {results['onnxruntime']}, {results['cpu']} shared with other jobs "
        f"(load average {results['load_average']:.1f} during the speed runs); prompt {results['prompt_tokens']} "
        f"tokens, then {results['new_tokens']} greedy new tokens with the KV cache; median of {results['repeats']} "
        "interleaved runs, each configuration in its own process. Speedups are against dense fp32 in the same run; "
        "the CPU-time speedup counts only the CPU time the process got, so it is less disturbed by the load "
        f"(perplexity: WikiText-2 test, {results['perplexity_windows']} windows of 512 tokens).",
    ]
    for threads in results["threads"]:
        lines += [
            "",
            f"**{threads} thread{'s' if threads > 1 else ''}**",
            "",
            "| model | parameters | ONNX MB | size vs dense | perplexity | prefill tok/s | decode tok/s "
            "| decode speedup | decode speedup (CPU time) | peak RSS MB |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for variant in results["variants"]:
            name = variant["name"]
            onnx_bytes = results["exports"][name]["onnx_bytes"]
            ppl = results["perplexity"].get(name)
            speed = results["speed"][f"{name}|{threads}"]
            row = [
                name,
                f"{results['checkpoints'][variant['checkpoint']]['parameters'] / 1e6:.1f}M",
                f"{onnx_bytes / 1e6:.1f}",
                f"{dense_bytes / onnx_bytes:.2f}x",
                f"{ppl:.2f}" if ppl else "same weights",
                f"{speed['prefill_tokens_per_s']:.0f}",
                f"{speed['decode_tokens_per_s']:.1f}",
                f"{speedup(results, name, threads):.2f}x",
                f"{speedup(results, name, threads, 'decode_tokens_per_cpu_s'):.2f}x",
                f"{speed['peak_rss_mb']:.0f}",
            ]
            lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Goals:", ""]
    dense_parameters = results["checkpoints"]["dense"]["parameters"]
    for ratio in results["ratios"]:
        name = f"ROM {ratio}"
        target = 0.9 * dense_parameters / results["checkpoints"][ratio]["parameters"]
        for threads in results["threads"]:
            wall, cpu = (
                speedup(results, name, threads),
                speedup(results, name, threads, "decode_tokens_per_cpu_s"),
            )
            verdict = "met" if wall >= target else "met in CPU time" if cpu >= target else "missed"
            lines.append(
                f"- {name}, {threads} thread(s): decode speedup {wall:.2f}x ({cpu:.2f}x in CPU time), "
                f"goal >= {target:.2f}x: {verdict}"
            )
        int8 = f"{name} + int8"
        smaller = results["exports"][name]["onnx_bytes"] / results["exports"][int8]["onnx_bytes"]
        line = f"- {int8}: {smaller:.2f}x smaller than {name} fp32 (goal >= 2x)"
        if name in results["perplexity"] and int8 in results["perplexity"]:
            increase = results["perplexity"][int8] / results["perplexity"][name] - 1
            line += f", perplexity {100 * increase:+.1f}% (goal < +5%)"
        lines.append(line)
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [v["name"] for v in results["variants"]]
    figure, (speed_axis, size_axis) = plt.subplots(1, 2, figsize=(13, 0.45 * len(names) + 1.5), sharey=True)
    height = 0.8 / len(results["threads"])
    for i, t in enumerate(results["threads"]):
        speedups = [speedup(results, n, t) for n in names]
        speed_axis.barh([k + i * height for k in range(len(names))], speedups, height, label=f"{t} thread(s)")
    speed_axis.axvline(1, color="gray", linewidth=0.8)
    speed_axis.set_xlabel("decode speedup vs dense fp32 (128 new tokens after a 512-token prompt)")
    speed_axis.legend()
    sizes = [results["exports"][n]["onnx_bytes"] / 1e6 for n in names]
    size_axis.barh(range(len(names)), sizes, 0.6, color="tab:green")
    size_axis.set_xlabel("ONNX file size (MB)")
    speed_axis.set_yticks([k + height * (len(results["threads"]) - 1) / 2 for k in range(len(names))], names)
    speed_axis.invert_yaxis()
    figure.suptitle("SmolLM2-135M-Instruct on onnxruntime (CPU)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def cpu_description() -> str:
    names = [
        line.split(":", 1)[1].strip()
        for line in Path("/proc/cpuinfo").read_text().splitlines()
        if line.startswith("model name")
    ]
    return f"{os.cpu_count()} cores of {names[0] if names else 'an unknown CPU'}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--ratios", nargs="+", default=["0.8", "0.5"])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument(
        "--perplexity-windows", type=int, default=40, help="0 skips the perplexity measurements"
    )
    parser.add_argument("--eval-data", type=Path, default=SHARED_DATA / "wiki.test.raw")
    parser.add_argument("--calibration", type=Path, default=SHARED_DATA / "wikitext2.valid.tokens")
    parser.add_argument("--no-stock", action="store_true", help="skip the stock optimum-cli export graphs")
    parser.add_argument("--work-dir", type=Path, default=REPOSITORY / "runs" / "ort_speed" / "work")
    parser.add_argument("--output", type=Path, default=REPOSITORY / "runs" / "ort_speed")
    parser.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker is not None:
        print(json.dumps(worker(args.worker, args.threads[0], args.prompt_tokens, args.new_tokens)))
        return
    for needed in (args.calibration, *([args.eval_data] if args.perplexity_windows else [])):
        if not needed.is_file():
            parser.error(f"{needed} not found (the shared data folder, or pass --calibration / --eval-data)")

    import onnxruntime

    started = time.perf_counter()
    variants = variants_for(args.ratios, stock=not args.no_stock)
    checkpoints = prepare_checkpoints(args, args.ratios)
    exports = export_variants(args, variants, checkpoints)
    load_before = os.getloadavg()[0]
    speed = measure_speed(args, variants)
    load_average = (load_before + os.getloadavg()[0]) / 2
    perplexity = measure_quality(args, variants) if args.perplexity_windows else {}
    results = {
        "variants": [vars(v) for v in variants],
        "checkpoints": checkpoints,
        "exports": exports,
        "speed": speed,
        "perplexity": perplexity,
        "ratios": args.ratios,
        "threads": args.threads,
        "repeats": args.repeats,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "perplexity_windows": args.perplexity_windows,
        "onnxruntime": onnxruntime.__version__,
        "cpu": cpu_description(),
        "load_average": load_average,
        "seconds": time.perf_counter() - started,
    }
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    report = tables(results)
    (args.output / "results.md").write_text(report)
    plot(results, args.output / "ort_speed.png")
    print(report)
    print(f"wrote {args.output}/results.json, results.md, ort_speed.png in {results['seconds'] / 60:.0f} min")


if __name__ == "__main__":
    main()
