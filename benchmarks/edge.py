"""Bytes, quality and speed on onnxruntime: dense vs ROM, each in fp32, int8 and int4 weights.

    python benchmarks/edge.py                                  # dense + ROM auto 0.9 / 0.8 / 0.7 / 0.5
    python benchmarks/edge.py --ratios 0.8 --weights fp32 int4 --threads 1 --repeats 1   # quick look
    python benchmarks/edge.py --phases speed report            # re-measure speed, reuse the rest

The user's alternative to low-rank compression is quantization, so every model is compared in the
bytes it occupies. For the dense model and each ROM ratio (``--preset auto``, 128 x 128 calibration
windows of the dense model's own answers mixed 50/50 with WikiText-2 valid, as the quality
benchmark's ``rom-auto-mix50``) it exports ``optimum-cli rom export`` directories in every
``--weights`` format, then measures on onnxruntime:

- bytes of ``model.onnx`` on disk, WikiText-2 test perplexity (512-token windows) and the chat task
  (answer loss / agreement against the dense PyTorch model's answers), through ORTModelForCausalLM;
- prefill and decode tokens/s at every ``--threads`` count, each configuration in its own process
  with onnxruntime only (``examples/onnx_chat.py``'s runtime), interleaved over ``--repeats``
  (median kept) so load from other processes hits all alike;
- the machine's memory bandwidth in the same run (onnxruntime reading 256 MB at the same thread
  count: a ReduceSum and a one-row MatMul, the better of the two), and from it each model's decode
  bound: bytes a decode step must read (the weights, except tables read one row at a time, plus the
  KV cache at the mean decode position) over the bandwidth; beside it, what MatMulNBits itself does on one large matrix (8 and 4 bits), since a
  compute-bound kernel cannot reach the bandwidth;
- ``profile``: decode steps through onnxruntime's profiler, per op type: the linears' time and the
  GB/s they read at, attention and the other nodes (work that factorizing the linears does not
  shrink).

Writes ``results.json``, ``results.md`` (tables, Pareto front, goals) and ``edge.png`` (perplexity
and chat answer loss vs bytes, front marked) to ``--output``; checkpoints and exports are cached in
``--work-dir`` and each phase's results in ``results.json``, so a rerun redoes only what is missing.
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
PHASES = ("checkpoints", "exports", "quality", "speed", "profile", "report")
BANDWIDTH_BYTES = 256 * 2**20


@dataclass(frozen=True)
class Variant:
    """One exported model: which checkpoint, which weights, which graph."""

    checkpoint: str  # "dense" or a ROM ratio such as "0.8"
    weights: str = "fp32"
    graph: str = "fused"
    block_size: int = 32
    embedding_bits: int = 8

    @property
    def name(self) -> str:
        model = "dense" if self.checkpoint == "dense" else f"ROM {self.checkpoint}"
        blocks = f"/{self.block_size}" if self.block_size != 32 else ""
        table = " e4" if self.embedding_bits == 4 else ""
        return f"{model} {self.weights}{blocks}{table}" + (" (stock graph)" if self.graph != "fused" else "")

    @property
    def directory_name(self) -> str:
        return self.name.replace(" ", "_").replace("(", "").replace(")", "").replace("/", "_b")


# -- workers: one configuration, onnxruntime only -----------------------------------------------
def _onnx_chat():
    """``examples/onnx_chat.py`` as a module: the runtime a device runs (onnxruntime only)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("onnx_chat", CHAT_EXAMPLE)
    chat = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(chat)
    return chat


def speed_worker(directory: Path, threads: int, prompt_tokens: int, new_tokens: int) -> dict:
    """Prefill and decode timings of one exported model in this (fresh) process; no torch imported."""

    import numpy as np

    chat = _onnx_chat()
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
    started = time.perf_counter()
    for _ in range(new_tokens):
        token = int(model.forward([token]).argmax())
    decode = time.perf_counter() - started
    assert "torch" not in sys.modules
    return {
        "prefill_tokens_per_s": prompt_tokens / min(prefill),
        "decode_tokens_per_s": new_tokens / decode,
        "peak_rss_mb": peak_rss_mb(),
    }


def profile_worker(directory: Path, threads: int, prompt_tokens: int, steps: int) -> dict:
    """Decode steps through onnxruntime's own profiler: time and weight bytes read, per op type."""
    import collections

    import onnx
    import onnxruntime

    chat = _onnx_chat()
    model = chat.OnnxCausalLM(directory, threads=threads, max_length=prompt_tokens + steps + 1)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.enable_profiling = True
    options.profile_file_prefix = str(Path("/tmp") / f"edge-profile-{os.getpid()}")
    model.session = onnxruntime.InferenceSession(
        str(directory / "model.onnx"), options, providers=["CPUExecutionProvider"]
    )
    prompt = list(range(100, 100 + prompt_tokens))
    token = int(model.forward(prompt).argmax())
    for _ in range(steps):
        token = int(model.forward([token]).argmax())
    trace_file = Path(model.session.end_profiling())
    trace = json.loads(trace_file.read_text())
    trace_file.unlink()
    runs = [e for e in trace if e.get("cat") == "Session" and e["name"] == "model_run"][-steps:]
    graph = onnx.load(str(directory / "model.onnx"), load_external_data=False).graph
    node_bytes, node_type = weight_bytes_by_node(graph), {n.name: n.op_type for n in graph.node}
    ops: dict[str, dict] = collections.defaultdict(lambda: {"ms": 0.0, "nodes": set(), "bytes": 0})
    for event in trace:
        if event.get("cat") != "Node" or not event["name"].endswith("_kernel_time"):
            continue
        if event["ts"] < runs[0]["ts"]:
            continue
        node = event["name"][: -len("_kernel_time")]
        op = ops[node_type.get(node, event["args"].get("op_name", "?"))]
        op["ms"] += event["dur"] / 1e3 / steps
        if node not in op["nodes"]:
            op["nodes"].add(node)
            op["bytes"] += node_bytes.get(node, 0)
    return {
        "step_ms": sum(r["dur"] for r in runs) / 1e3 / steps,
        "ops": {name: {**op, "nodes": len(op["nodes"])} for name, op in ops.items()},
    }


def bandwidth_worker(threads: int) -> dict:
    """Read bandwidth as onnxruntime sees it, the better of two 256 MB probes (best of 5 runs each): a
    ReduceSum over a float tensor and a float MatMul of one row by a constant matrix (a decode GEMV).
    Also what onnxruntime's quantized kernel does with one row (MatMulNBits, 8 and 4 bits, blocks of
    32, accuracy level 4, 64M weights): where it runs below the bandwidth, that kernel is the limit."""
    import numpy as np
    from onnx import helper, numpy_helper

    rows, columns = 4096, BANDWIDTH_BYTES // 4 // 4096
    matrix = numpy_helper.from_array(np.full((rows, columns), 0.01, np.float32), "w")
    row = np.ones((1, rows), np.float32)
    rates = {
        "reduce_sum": _probe_rate(
            [helper.make_node("ReduceSum", ["x"], ["y"], keepdims=0)], [], np.ones(BANDWIDTH_BYTES // 4, np.float32),
            BANDWIDTH_BYTES, threads,
        ),
        "gemv": _probe_rate([helper.make_node("MatMul", ["x", "w"], ["y"])], [matrix], row, BANDWIDTH_BYTES, threads),
    }  # fmt: skip
    outputs, block = 16384, 32
    for bits in (8, 4):
        codes = np.random.default_rng(0).integers(
            0, 256, (outputs, rows // block, block * bits // 8), np.uint8
        )
        scales = np.full(outputs * rows // block, 0.01, np.float32)
        node = helper.make_node(
            "MatMulNBits", ["x", "codes", "scales"], ["y"], domain="com.microsoft",
            K=rows, N=outputs, bits=bits, block_size=block, accuracy_level=4,
        )  # fmt: skip
        initializers = [numpy_helper.from_array(codes, "codes"), numpy_helper.from_array(scales, "scales")]
        rates[f"int{bits}_gemv"] = _probe_rate(
            [node], initializers, row, codes.nbytes + scales.nbytes, threads
        )
    return {
        **{f"{name}_gb_per_s": rate for name, rate in rates.items()},
        "bandwidth_gb_per_s": max(rates["reduce_sum"], rates["gemv"]),
    }


def _probe_rate(nodes, initializers, data, read_bytes: int, threads: int) -> float:
    """GB/s of a one-node graph over ``data`` (best of 5 runs after a warm-up)."""
    import onnxruntime
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        nodes,
        "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(data.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializers,
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 9
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    session = onnxruntime.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    feed = {"x": data}
    session.run(None, feed)
    return read_bytes / min(_timed(session.run, None, feed) for _ in range(5)) / 1e9


def _timed(function, *args) -> float:
    started = time.perf_counter()
    function(*args)
    return time.perf_counter() - started


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM; ``ru_maxrss`` would include the parent's, copied at fork)."""
    status = Path("/proc/self/status").read_text().splitlines()
    return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024


def run_worker(args, *worker_args: str) -> dict:
    command = [sys.executable, __file__, *worker_args]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(worker_args)} failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# -- phases -------------------------------------------------------------------------------------
def variants_for(args) -> list[Variant]:
    variants = [Variant(c, w) for c in ["dense", *args.ratios] for w in args.weights]
    variants += [Variant("dense", "int8", block_size=size) for size in args.dense_int8_blocks]
    variants += [Variant("dense", "int4", block_size=size) for size in args.dense_int4_blocks]
    variants += [
        Variant("dense", "int4", block_size=size, embedding_bits=4) for size in args.dense_int4_e4_blocks
    ]
    if args.dynamic:
        variants += [Variant(c, "int8-dynamic") for c in ["dense", *args.ratios]]
    if args.stock:
        variants += [Variant(c, graph="optimum") for c in ["dense", *args.ratios]]
    return variants


def prepare_checkpoints(args) -> dict[str, dict]:
    """The dense model and one ROM auto checkpoint per ratio (compressed once, cached in the work dir)."""
    from transformers import AutoModelForCausalLM

    from optimum_rom import ChatCalibration, LowRankOptimizer, RomConfig
    from optimum_rom.model_sources import resolve_model_path
    from optimum_rom.structure import count_parameters, decoder_linear_parameters

    dense = LowRankOptimizer.from_pretrained(args.model).model
    sizes = (count_parameters(dense), decoder_linear_parameters(dense))
    checkpoints = {
        "dense": {
            "path": str(resolve_model_path(args.model)[0]),
            "parameters": sizes[0],
            "linear_parameters": sizes[1],
        }
    }
    for ratio in args.ratios:
        path = args.work_dir / f"rom-auto-{ratio}"
        if not (path / "config.json").is_file():
            optimizer = LowRankOptimizer.from_pretrained(args.model)
            config = RomConfig.from_preset("auto", params_ratio=float(ratio), num_samples=128, seq_len=128)
            calibration = ChatCalibration(text=args.calibration, text_share=0.5)
            optimizer.compress(config, calibration=calibration, save_dir=path, overwrite=True)
            print(f"compressed ROM {ratio} in {optimizer.report.seconds:.0f} s")
        model = AutoModelForCausalLM.from_pretrained(path)
        checkpoints[ratio] = {
            "path": str(path),
            "parameters": count_parameters(model),
            "linear_parameters": decoder_linear_parameters(model),
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
            report = export_onnx(
                source, path, weights=variant.weights, block_size=variant.block_size,
                embedding_bits=variant.embedding_bits, graph=variant.graph, overwrite=True,
            )  # fmt: skip
            report_file.write_text(json.dumps(report.to_dict(), indent=2))
            print(f"exported {variant.name}: {report.onnx_bytes / 1e6:.1f} MB in {report.seconds:.0f} s")
        exports[variant.name] = {**json.loads(report_file.read_text()), **decode_bytes(path / "model.onnx")}
    return exports


def weight_bytes_by_node(graph) -> dict[str, int]:
    """Initializer bytes each node reads in a decode step. Tables only gathered from (one row a token:
    an untied embedding, the rotary caches) are not counted; a table a tied head also reads is counted
    at the head (through the Transpose onnxruntime folds away); a weight several nodes read, once."""
    readers: dict[str, set[str]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, set()).add(node.op_type)
    row_readers = {"Gather", "GatherBlockQuantized", "Reshape"}  # Reshape: of a gathered table's scales
    sizes = {
        init.name: len(init.raw_data)
        for init in graph.initializer
        if "rotary" not in init.name and not readers.get(init.name, set()) <= row_readers
    }
    by_node: dict[str, int] = {}
    for node in graph.node:
        if node.op_type in row_readers:
            continue
        fresh = [name for name in node.input if name in sizes]
        if node.op_type == "Transpose" and fresh:
            sizes[node.output[0]] = sizes[fresh[0]]  # folded: its reader reads the table
        else:
            by_node[node.name] = by_node.get(node.name, 0) + sum(sizes[name] for name in fresh)
        for name in fresh:
            del sizes[name]
    return by_node


def decode_bytes(onnx_file: Path) -> dict:
    """Bytes one decode step reads from the weights (``weight_bytes_by_node``) and the KV cache per position."""
    import onnx

    graph = onnx.load(str(onnx_file), load_external_data=False).graph
    weights = sum(weight_bytes_by_node(graph).values())
    per_position = 0
    for cache in graph.input:
        if cache.name.startswith("past_key_values"):
            dims = cache.type.tensor_type.shape.dim  # batch, kv heads, positions, head size (float32)
            per_position += 4 * dims[1].dim_value * dims[3].dim_value
    return {"decode_weight_bytes": weights, "kv_bytes_per_position": per_position}


def measure_quality(args, variants: list[Variant], done: dict) -> dict[str, dict]:
    """WikiText-2 perplexity and the chat task of every (fused-graph) variant, through onnxruntime."""
    from optimum_rom.evaluation import EvaluationOptions
    from optimum_rom.evaluation.suite import evaluate_model

    quality = dict(done)
    for variant in variants:
        if variant.name in quality or variant.graph != "fused":
            continue  # the stock graph holds the same weights as the fused fp32 one
        options = EvaluationOptions(
            max_windows=args.perplexity_windows, limit=args.chat_prompts, progress=False
        )
        files = {"wiki.test.raw": args.eval_data}
        report = evaluate_model(
            args.work_dir / "onnx" / variant.directory_name,
            ["wikitext2", "chat"],
            options=options,
            files=files,
        )
        tasks = report["tasks"]
        quality[variant.name] = {
            "perplexity": tasks["wikitext2"]["perplexity"],
            **{k: tasks["chat"][k] for k in ("answer_ce", "token_agreement", "agreement", "empty")},
            "samples": tasks["chat"]["samples"],
        }
        print(f"{variant.name}: perplexity {quality[variant.name]['perplexity']:.2f}, "
              f"answer CE {quality[variant.name]['answer_ce']:.3f} ({report['seconds']:.0f} s)")  # fmt: skip
        args.save({"quality": quality})
    return quality


def measure_speed(args, variants: list[Variant]) -> dict[str, dict]:
    """Median over interleaved repeats of each (variant, threads) run, and the bandwidth at each thread count."""
    runs: dict[str, list[dict]] = {}
    for repeat in range(args.repeats):
        order = variants if repeat % 2 == 0 else variants[::-1]
        for threads in args.threads:
            runs.setdefault(f"bandwidth|{threads}", []).append(
                run_worker(args, "--bandwidth-worker", "--threads", str(threads))
            )
            for variant in order:
                directory = args.work_dir / "onnx" / variant.directory_name
                result = run_worker(
                    args, "--worker", str(directory), "--threads", str(threads),
                    "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens),
                )  # fmt: skip
                runs.setdefault(f"{variant.name}|{threads}", []).append(result)
                print(f"  repeat {repeat + 1}: {variant.name}, {threads} thread(s): {result}")
    return {
        key: {metric: statistics.median(r[metric] for r in results) for metric in results[0]}
        for key, results in runs.items()
    }


def measure_profile(args, variants: list[Variant]) -> dict[str, dict]:
    """Each fused-graph variant's decode steps per op type, at the first ``--threads`` count."""
    threads = args.threads[0]
    profiles = {}
    for variant in variants:
        if variant.graph != "fused":
            continue
        directory = args.work_dir / "onnx" / variant.directory_name
        profiles[variant.name] = run_worker(
            args, "--profile-worker", str(directory), "--threads", str(threads),
            "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.profile_steps),
        )  # fmt: skip
        print(f"profiled {variant.name}: {profiles[variant.name]['step_ms']:.1f} ms a step")
    return {"threads": threads, "steps": args.profile_steps, "models": profiles}


# -- report -------------------------------------------------------------------------------------
LINEAR_OPS = ("MatMulNBits", "MatMul", "Gemm")
ATTENTION_OPS = ("GroupQueryAttention", "MultiHeadAttention", "Attention")


def profile_table(results: dict) -> list[str]:
    """Where a decode step's time goes: the linears against the bandwidth, attention, everything else."""
    profile = results.get("profile")
    if not profile:
        return []
    threads = profile["threads"]
    probes = results["speed"][f"bandwidth|{threads}"]
    bandwidth = probes["bandwidth_gb_per_s"]
    probe = {"fp32": probes["gemv_gb_per_s"]}
    probe.update(
        {w: probes[f"{w}_gemv_gb_per_s"] for w in ("int8", "int4") if f"{w}_gemv_gb_per_s" in probes}
    )
    weights = {v["name"]: v["weights"] for v in results["variants"]}
    lines = [
        "",
        f"Decode steps by op type (onnxruntime's profiler, {threads} thread(s), {profile['steps']} steps after "
        f"the {results['prompt_tokens']}-token prompt; kernel times, so the profiler's own overhead is left "
        f"out of the columns but not of the step). Linears: MatMulNBits, MatMul, Gemm; their GB/s are the "
        f"weight bytes they read over their time, against the bandwidth ({bandwidth:.1f} GB/s) and against "
        "the same kernel on one large matrix (one row by 64M weights: "
        + ", ".join(f"{w} {rate:.1f} GB/s" for w, rate in probe.items())
        + ").",
        "",
        "| model | step ms | linears ms | linears MB | linears GB/s | of bandwidth | of the kernel on a large matrix "
        "| attention ms | other ops ms | other nodes | µs a node |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, run in profile["models"].items():
        ops = run["ops"]
        linear = [ops[o] for o in LINEAR_OPS if o in ops]
        attention = sum(ops[o]["ms"] for o in ATTENTION_OPS if o in ops)
        others = [op for o, op in ops.items() if o not in LINEAR_OPS and o not in ATTENTION_OPS]
        linear_ms, linear_bytes = sum(o["ms"] for o in linear), sum(o["bytes"] for o in linear)
        other_ms, other_nodes = sum(o["ms"] for o in others), sum(o["nodes"] for o in others)
        rate = linear_bytes / (linear_ms / 1e3) / 1e9
        kernel = probe.get(weights.get(name, ""))
        lines.append(
            f"| {name} | {run['step_ms']:.2f} | {linear_ms:.2f} | {linear_bytes / 1e6:.1f} | {rate:.1f} | "
            f"{100 * rate / bandwidth:.0f}% | {f'{100 * rate / kernel:.0f}%' if kernel else ''} | {attention:.2f} | "
            f"{other_ms:.2f} | {other_nodes} | {1e3 * other_ms / max(other_nodes, 1):.1f} |"
        )
    return lines


def pareto_front(points: dict[str, tuple[float, float]]) -> set[str]:
    """Names no other point beats on both axes (fewer bytes and lower loss, one of them strictly)."""
    return {
        name
        for name, (size, loss) in points.items()
        if not any(
            (other_size <= size and other_loss <= loss) and (other_size < size or other_loss < loss)
            for other, (other_size, other_loss) in points.items()
            if other != name
        )
    }


def decode_bound(results: dict, name: str, threads: int) -> float:
    """Tokens/s if a decode step only had to read its bytes at the measured bandwidth."""
    export = results["exports"][name]
    position = results["prompt_tokens"] + results["new_tokens"] / 2
    step_bytes = export["decode_weight_bytes"] + export["kv_bytes_per_position"] * position
    return results["speed"][f"bandwidth|{threads}"]["bandwidth_gb_per_s"] * 1e9 / step_bytes


def tables(results: dict) -> str:
    exports, quality, speed = results["exports"], results["quality"], results["speed"]
    names = [v["name"] for v in results["variants"]]
    dense = "dense fp32"
    measured = [n for n in names if n in quality]
    fronts = {
        metric: pareto_front({n: (exports[n]["onnx_bytes"], quality[n][metric]) for n in measured})
        for metric in ("perplexity", "answer_ce")
    }
    bandwidths = ", ".join(
        f"{speed[f'bandwidth|{t}']['bandwidth_gb_per_s']:.1f} GB/s at {t} thread(s)"
        for t in results["threads"]
    )
    lines = [
        f"SmolLM2-135M-Instruct on onnxruntime {results['onnxruntime']}, {results['cpu']} (load average "
        f"{results['load_average']:.1f} during the speed runs; bandwidth measured in the same run: {bandwidths}). "
        f"Perplexity: WikiText-2 test, {results['perplexity_windows']} windows of 512 tokens. Chat: "
        f"{results['chat_prompts']} prompts, greedy, against the dense PyTorch model's answers. Speed: a "
        f"{results['prompt_tokens']}-token prompt, then {results['new_tokens']} greedy tokens with the KV cache, "
        f"median of {results['repeats']} interleaved runs. Bound: decode tokens/s if a step only read its bytes "
        "(weights + KV cache) at the measured bandwidth. * = on the Pareto front of that column vs bytes.",
        "",
        "| model | params (of model / of linears) | MB on disk | vs dense fp32 | perplexity | answer CE "
        "| token agr | first16 | empty | "
        + " | ".join(f"prefill tok/s {t}t | decode tok/s {t}t | of bound {t}t" for t in results["threads"])
        + " |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * (3 * len(results["threads"])),
    ]
    for variant in results["variants"]:
        name, checkpoint = variant["name"], results["checkpoints"][variant["checkpoint"]]
        dense_checkpoint = results["checkpoints"]["dense"]
        q = quality.get(name)
        size = (
            f"{checkpoint['parameters'] / dense_checkpoint['parameters']:.3f} / "
            f"{checkpoint['linear_parameters'] / dense_checkpoint['linear_parameters']:.3f}"
        )
        row = [
            name,
            size,
            f"{exports[name]['onnx_bytes'] / 1e6:.1f}",
            f"{exports[name]['onnx_bytes'] / exports[dense]['onnx_bytes']:.3f}x",
        ]
        if q:
            star = {m: "*" if name in fronts[m] else "" for m in fronts}
            row += [
                f"{q['perplexity']:.2f}{star['perplexity']}",
                f"{q['answer_ce']:.3f}{star['answer_ce']}",
                f"{100 * q['token_agreement']:.1f}%",
                f"{100 * q['agreement']:.1f}%",
                f"{100 * q['empty']:.1f}%",
            ]
        else:
            row += ["same weights"] + [""] * 4
        for threads in results["threads"]:
            s = speed.get(f"{name}|{threads}")
            if s is None:
                row += ["", "", ""]
                continue
            row += [
                f"{s['prefill_tokens_per_s']:.0f}",
                f"{s['decode_tokens_per_s']:.1f}",
                f"{100 * s['decode_tokens_per_s'] / decode_bound(results, name, threads):.0f}%",
            ]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Pareto front vs bytes:", ""]
    for metric, front in fronts.items():
        ordered = sorted(front, key=lambda n: exports[n]["onnx_bytes"])
        lines.append(f"- {metric}: " + ", ".join(f"{n} ({exports[n]['onnx_bytes'] / 1e6:.0f} MB, "
                                                 f"{quality[n][metric]:.3g})" for n in ordered))  # fmt: skip
    lines += profile_table(results)
    lines += ["", "Goals:", ""] + goals(results, fronts)
    return "\n".join(lines) + "\n"


def goals(results: dict, fronts: dict[str, set[str]]) -> list[str]:
    exports, quality = results["exports"], results["quality"]
    lines = []

    def verdict(met: bool) -> str:
        return "met" if met else "NOT met"

    if "dense int4" in quality and "dense fp32" in quality:
        change = quality["dense int4"]["perplexity"] / quality["dense fp32"]["perplexity"] - 1
        lines.append(
            f"- dense int4 perplexity {100 * change:+.1f}% vs fp32 (goal within 10%): {verdict(change <= 0.1)}"
        )
    if "ROM 0.8 int4" in exports:
        share = exports["ROM 0.8 int4"]["onnx_bytes"] / exports["dense fp32"]["onnx_bytes"]
        lines.append(
            f"- ROM 0.8 int4 at {share:.3f}x the dense fp32 bytes (goal <= 0.2x): {verdict(share <= 0.2)}"
        )
    for metric, front in fronts.items():
        rom = sorted(n for n in front if n.startswith("ROM") and not n.endswith("fp32"))
        lines.append(
            f"- ROM + quantization on the {metric} front: {', '.join(rom) if rom else 'none'} "
            f"(goal: at least one): {verdict(bool(rom))}"
        )
    for threads in results["threads"]:
        shares = {
            v["name"]: results["speed"][f"{v['name']}|{threads}"]["decode_tokens_per_s"]
            / decode_bound(results, v["name"], threads)
            for v in results["variants"]
            if f"{v['name']}|{threads}" in results["speed"]
        }
        if shares:
            worst = min(shares, key=shares.get)
            lines.append(
                f"- decode at {threads} thread(s): {100 * min(shares.values()):.0f}% ({worst}) to "
                f"{100 * max(shares.values()):.0f}% of the bandwidth bound (goal >= 80% for every model): "
                f"{verdict(min(shares.values()) >= 0.8)}"
            )
    return lines


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    exports, quality = results["exports"], results["quality"]
    names = [v["name"] for v in results["variants"] if v["name"] in quality]
    figure, axes = plt.subplots(1, 2, figsize=(14, 5.5))
    colors = {"fp32": "tab:blue", "int8": "tab:orange", "int4": "tab:green", "int8-dynamic": "tab:gray"}
    for axis, metric, label in zip(
        axes,
        ("perplexity", "answer_ce"),
        ("WikiText-2 perplexity", "chat answer CE (nats/token)"),
        strict=True,
    ):
        points = {n: (exports[n]["onnx_bytes"] / 1e6, quality[n][metric]) for n in names}
        front = pareto_front(points)
        for name, (size, value) in points.items():
            weights = name.split()[1 if name.startswith("dense") else 2].split("/")[0]
            axis.scatter(size, value, color=colors.get(weights, "black"), marker="o" if name.startswith("ROM") else "s",
                         s=60, edgecolors="black" if name in front else "none", linewidths=1.5)  # fmt: skip
            axis.annotate(name.replace(" fp32", "").replace(" int", " i"), (size, value), fontsize=7,
                          xytext=(4, 3), textcoords="offset points")  # fmt: skip
        ordered = sorted(front, key=lambda n: points[n][0])
        axis.step([points[n][0] for n in ordered], [points[n][1] for n in ordered], where="post",
                  color="black", linewidth=0.8, linestyle="--", label="Pareto front")  # fmt: skip
        axis.set_xscale("log")
        axis.set_xlabel("model.onnx bytes (MB, log scale)")
        axis.set_ylabel(label)
        axis.legend(handles=[plt.Line2D([], [], color=c, marker="o", linestyle="", label=w) for w, c in colors.items()
                             if any(f" {w}" in n for n in names)] + [plt.Line2D([], [], color="black", linestyle="--",
                             label="Pareto front")])  # fmt: skip
    figure.suptitle(
        "SmolLM2-135M-Instruct on onnxruntime: dense (squares) and ROM (circles) by weight format"
    )
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
    parser.add_argument("--ratios", nargs="+", default=["0.9", "0.8", "0.7", "0.5"])
    parser.add_argument(
        "--weights", nargs="+", default=["fp32", "int8", "int4"], choices=["fp32", "int8", "int4"]
    )
    parser.add_argument(
        "--dense-int8-blocks", nargs="*", type=int, default=[128],
        help="also the dense model in int8 with these block sizes (fewer scales: faster, less exact)",
    )  # fmt: skip
    parser.add_argument(
        "--dense-int4-blocks", nargs="*", type=int, default=[64],
        help="also the dense model in int4 with these block sizes (fewer scales: smaller, less exact)",
    )  # fmt: skip
    parser.add_argument(
        "--dense-int4-e4-blocks", nargs="*", type=int, default=[64],
        help="also the dense model in int4 with the embedding table at 4 bits too, at these block sizes",
    )  # fmt: skip
    parser.add_argument("--dynamic", action="store_true", help="also int8 dynamic (optimum's ORTQuantizer)")
    parser.add_argument(
        "--stock", action="store_true", help="also fp32 through the stock optimum-cli exporter"
    )
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--perplexity-windows", type=int, default=16)
    parser.add_argument("--chat-prompts", type=int, default=32)
    parser.add_argument("--phases", nargs="+", default=list(PHASES), choices=PHASES)
    parser.add_argument("--eval-data", type=Path, default=SHARED_DATA / "wiki.test.raw")
    parser.add_argument("--calibration", type=Path, default=SHARED_DATA / "wikitext2.valid.tokens")
    parser.add_argument("--work-dir", type=Path, default=REPOSITORY / "runs" / "edge" / "work")
    parser.add_argument("--output", type=Path, default=REPOSITORY / "runs" / "edge")
    parser.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--bandwidth-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--profile-worker", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--profile-steps", type=int, default=64, help="decode steps the profile phase times")
    args = parser.parse_args()

    if args.worker is not None:
        print(json.dumps(speed_worker(args.worker, args.threads[0], args.prompt_tokens, args.new_tokens)))
        return
    if args.profile_worker is not None:
        print(
            json.dumps(
                profile_worker(args.profile_worker, args.threads[0], args.prompt_tokens, args.new_tokens)
            )
        )
        return
    if args.bandwidth_worker:
        print(json.dumps(bandwidth_worker(args.threads[0])))
        return
    for needed in (args.calibration, args.eval_data):
        if not needed.is_file():
            parser.error(f"{needed} not found (the shared data folder, or pass --calibration / --eval-data)")

    import onnxruntime

    results_file = args.output / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}

    def save(update: dict) -> None:
        results.update(update)
        args.output.mkdir(parents=True, exist_ok=True)
        results_file.write_text(json.dumps(results, indent=2) + "\n")

    args.save = save
    variants = variants_for(args)
    save({
        "variants": [{**vars(v), "name": v.name} for v in variants], "ratios": args.ratios,
        "threads": args.threads, "repeats": args.repeats, "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens, "perplexity_windows": args.perplexity_windows,
        "chat_prompts": args.chat_prompts, "onnxruntime": onnxruntime.__version__, "cpu": cpu_description(),
    })  # fmt: skip
    started = time.perf_counter()
    if "checkpoints" in args.phases or "checkpoints" not in results:
        save({"checkpoints": prepare_checkpoints(args)})
    if "exports" in args.phases or "exports" not in results:
        save({"exports": export_variants(args, variants, results["checkpoints"])})
    if "quality" in args.phases:
        save({"quality": measure_quality(args, variants, results.get("quality", {}))})
    if "speed" in args.phases:
        load_before = os.getloadavg()[0]
        speed = measure_speed(args, variants)
        save({"speed": speed, "load_average": (load_before + os.getloadavg()[0]) / 2})
    if "profile" in args.phases:
        save({"profile": measure_profile(args, variants)})
    if "report" in args.phases:
        report = tables(results)
        (args.output / "results.md").write_text(report)
        plot(results, args.output / "edge.png")
        print(report)
    print(
        f"wrote {args.output}/results.json, results.md, edge.png in {(time.perf_counter() - started) / 60:.0f} min"
    )


if __name__ == "__main__":
    main()
