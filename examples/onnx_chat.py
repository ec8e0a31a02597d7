"""Chat with an exported model using onnxruntime alone, as an edge device would: no torch, no transformers.

    optimum-cli rom export --model smollm2-rom-0.5 --output smollm2-rom-0.5-onnx --int8
    python examples/onnx_chat.py --model smollm2-rom-0.5-onnx                      # interactive
    python examples/onnx_chat.py --model smollm2-rom-0.5-onnx --prompt "What is the capital of France?"

Needs only ``onnxruntime``, ``numpy`` and ``tokenizers`` (``pip install onnxruntime numpy tokenizers``):
copy this file and the exported directory to the device. The conversation is formatted with
SmolLM2's chat template (ChatML), and the KV cache carries over from turn to turn, so each turn
only runs the new tokens. Graphs from ``optimum-cli rom export`` keep the cache in preallocated
buffers that onnxruntime's GroupQueryAttention updates in place; graphs from the stock
``optimum-cli export onnx`` get their cache passed back and forth.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime
from tokenizers import Tokenizer

DEFAULT_SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


class OnnxCausalLM:
    """A causal LM directory (``model.onnx`` + ``config.json``) on onnxruntime, with a KV cache.

    ``forward(ids)`` appends ``ids`` to the cached context and returns the logits of the last token.
    """

    def __init__(self, directory: str | Path, threads: int | None = None, max_length: int = 2048) -> None:
        directory = Path(directory)
        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        self.session = onnxruntime.InferenceSession(
            str(directory / "model.onnx"), options, providers=["CPUExecutionProvider"]
        )
        self.config = json.loads((directory / "config.json").read_text())
        metadata = self.session.get_modelmeta().custom_metadata_map
        self.in_place_cache = metadata.get("optimum_rom.graph") == "fused"
        self.max_length = min(max_length, self.config.get("max_position_embeddings", max_length))
        self.cache_names = [
            i.name for i in self.session.get_inputs() if i.name.startswith("past_key_values.")
        ]
        self.cache_shape = {i.name: i.shape for i in self.session.get_inputs()}
        self.reset()

    def reset(self) -> None:
        """Forget the context."""
        self.length = 0
        if self.in_place_cache:  # fixed buffers, written in place by GroupQueryAttention
            self.cache = {
                name: onnxruntime.OrtValue.ortvalue_from_numpy(self._zeros(name, self.max_length))
                for name in self.cache_names
            }
        else:
            self.cache = {name: self._zeros(name, 0) for name in self.cache_names}

    def _zeros(self, name: str, length: int) -> np.ndarray:
        _, heads, _, head_dim = self.cache_shape[name]
        return np.zeros((1, heads, length, head_dim), np.float32)

    def forward(self, ids: list[int] | np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64).reshape(1, -1)
        start, end = self.length, self.length + ids.shape[1]
        if end > self.max_length:
            raise ValueError(f"the context would reach {end} tokens, more than max_length={self.max_length}")
        inputs = {
            "input_ids": ids,
            "attention_mask": np.ones((1, end), np.int64),
            "position_ids": np.arange(start, end, dtype=np.int64)[None],
        }
        if self.in_place_cache:
            binding = self.session.io_binding()
            for name, value in inputs.items():
                binding.bind_cpu_input(name, value)
            binding.bind_output("logits", "cpu")
            for name, buffer in self.cache.items():
                binding.bind_ortvalue_input(name, buffer)
                binding.bind_ortvalue_output(name.replace("past_key_values.", "present."), buffer)
            self.session.run_with_iobinding(binding)
            logits = binding.get_outputs()[0].numpy()
        else:
            names = [o.name for o in self.session.get_outputs()]
            outputs = dict(zip(names, self.session.run(None, {**inputs, **self.cache}), strict=True))
            logits = outputs["logits"]
            self.cache = {
                name: outputs[name.replace("past_key_values.", "present.")] for name in self.cache_names
            }
        self.length = end
        return logits[0, -1]

    def generate(self, prompt: list[int], max_new_tokens: int, stop: set[int], sampler=None, on_token=None):
        """Tokens generated after ``prompt`` (the context keeps both), greedy unless ``sampler`` is given."""
        logits = self.forward(prompt)
        generated: list[int] = []
        for _ in range(max_new_tokens):
            token = int(sampler(logits) if sampler else logits.argmax())
            generated.append(token)
            if on_token:
                on_token(generated)
            if token in stop or self.length >= self.max_length:
                break
            logits = self.forward([token])
        return generated


def chat_turn(role: str, content: str) -> str:
    return f"<|im_start|>{role}\n{content}<|im_end|>\n"


ASSISTANT_PREFIX = "<|im_start|>assistant\n"


def chat_prompt(messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    """SmolLM2's chat template (ChatML, with its default system prompt)."""
    text = "" if messages and messages[0]["role"] == "system" else chat_turn("system", DEFAULT_SYSTEM_PROMPT)
    text += "".join(chat_turn(m["role"], m["content"]) for m in messages)
    return text + (ASSISTANT_PREFIX if add_generation_prompt else "")


def top_p_sampler(temperature: float, top_p: float, seed: int = 0):
    rng = np.random.default_rng(seed)

    def sample(logits: np.ndarray) -> int:
        probabilities = np.exp((logits - logits.max()) / temperature)
        probabilities /= probabilities.sum()
        order = np.argsort(-probabilities)
        keep = order[: int(np.searchsorted(np.cumsum(probabilities[order]), top_p)) + 1]
        return int(rng.choice(keep, p=probabilities[keep] / probabilities[keep].sum()))

    return sample


class Chat:
    """A conversation whose whole history stays in the model's KV cache: each turn runs only its new tokens."""

    def __init__(self, model: OnnxCausalLM, tokenizer: Tokenizer, stop: set[int], system: str | None = None):
        self.model, self.tokenizer, self.stop, self.system = model, tokenizer, stop, system
        self.end_of_turn = tokenizer.encode("<|im_end|>", add_special_tokens=False).ids

    def reply(self, user: str, max_new_tokens: int, sampler=None, stream=None) -> str:
        if self.model.length == 0:
            system = [{"role": "system", "content": self.system}] if self.system else []
            text = chat_prompt([*system, {"role": "user", "content": user}])
        else:  # the cache ends with the previous turn's <|im_end|>
            text = "\n" + chat_turn("user", user) + ASSISTANT_PREFIX
        printed = 0

        def show(tokens: list[int], final: bool = False) -> None:
            nonlocal printed
            text = self.decode(tokens)
            complete = final or not text.endswith("\ufffd")  # a character split over tokens: wait for it
            if stream and len(text) > printed and complete:
                stream(text[printed:])
                printed = len(text)

        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        tokens = self.model.generate(ids, max_new_tokens, self.stop, sampler, on_token=show)
        show(tokens, final=True)
        self.generated_tokens = len(tokens)
        closed = tokens and tokens[-1] in self.stop
        self.model.forward(tokens[-1:] if closed else self.end_of_turn)  # close the turn in the cache too
        return self.decode(tokens)

    def decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode([t for t in tokens if t not in self.stop])


def stop_tokens(directory: Path, tokenizer: Tokenizer) -> set[int]:
    """End-of-turn ids: the generation config's eos ids and ChatML's ``<|im_end|>``."""
    stop: set[int] = set()
    generation = directory / "generation_config.json"
    if generation.is_file():
        eos = json.loads(generation.read_text()).get("eos_token_id")
        stop.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    end_of_turn = tokenizer.token_to_id("<|im_end|>")
    if end_of_turn is not None:
        stop.add(end_of_turn)
    return stop


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="directory written by `optimum-cli rom export`")
    parser.add_argument(
        "--prompt", action="append", help="a user turn (repeatable); omit for an interactive chat"
    )
    parser.add_argument("--system", default=None, help="system prompt (default: SmolLM2's)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy; e.g. 0.2 with --top-p 0.9")
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    parser.add_argument("--max-length", type=int, default=2048, help="longest conversation, in tokens")
    args = parser.parse_args()

    directory = Path(args.model)
    if not (directory / "model.onnx").is_file():
        parser.error(f"{directory} has no model.onnx; create it with `optimum-cli rom export`")
    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    chat = Chat(
        OnnxCausalLM(directory, args.threads, args.max_length), tokenizer, stop_tokens(directory, tokenizer)
    )
    sampler = top_p_sampler(args.temperature, args.top_p) if args.temperature > 0 else None

    def answer(user: str) -> None:
        started = time.perf_counter()
        chat.reply(user, args.max_new_tokens, sampler, stream=lambda text: print(text, end="", flush=True))
        print()
        seconds = time.perf_counter() - started
        print(f"[{chat.generated_tokens} tokens in {seconds:.2f} s]", file=sys.stderr)

    for user in args.prompt or []:
        answer(user)
    if not args.prompt:
        print("Chat with the model (Ctrl-D to quit).", file=sys.stderr)
        while True:
            try:
                user = input("> ")
            except EOFError:
                break
            answer(user)


if __name__ == "__main__":
    main()
