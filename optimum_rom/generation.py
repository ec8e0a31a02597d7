"""Batched generation from token ids: what evaluation (GSM8K, HumanEval, chat) and self-calibration share.

Prompts of similar length are batched together and left-padded. On a CPU the decode step of a
small model is bound by reading the weights, so a wide batch costs little more per step than a
narrow one: the batch is the main lever on generation speed. transformers' ``generate`` runs it,
with two changes that keep its tokens and remove copies a long answer would make at every step:
grouped-query attention read in place (:func:`generation_attention`) and a KV cache written in
place (:func:`growing_cache`).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import AttentionInterface, DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

GROUPED_SDPA = "sdpa_grouped_query"


def end_of_turn_ids(model, tokenizer) -> set[int]:
    """Token ids that end an answer: the generation config's ``eos_token_id`` (the model's own
    end-of-turn marker for chat models), else the tokenizer's eos token."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if configured is None:
        configured = tokenizer.eos_token_id
    if configured is None:
        return set()
    return {configured} if isinstance(configured, int) else set(configured)


@contextmanager
def evaluating(model):
    """``model.eval()`` for the duration, its training flag restored after (onnxruntime models,
    which are not ``nn.Module`` s, have neither and pass through)."""
    if not isinstance(model, torch.nn.Module):
        yield model
        return
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _grouped_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' ``sdpa`` attention, except that key/value heads shared by several query heads
    (grouped-query attention) are left to torch's kernel (``enable_gqa``) when a mask is passed too.

    Hand-rolled because transformers copies every key/value head once per query head it serves
    (``repeat_kv``) whenever there is a mask, which CUDA's fast kernels need; torch's CPU kernel
    reads the shared heads in place, with the same result. Batched generation is left-padded, so
    it always passes a mask, and those copies (the whole KV cache times the group size, in every
    layer at every decode step, on freshly mapped pages) cost a long answer more than the model's
    matmuls. Only :func:`generation_attention` selects it, for models on a CPU.
    """
    if attention_mask is not None and attention_mask.ndim == 4:
        attention_mask = attention_mask[:, :, :, : key.shape[-2]]
    if is_causal is None:
        is_causal = query.shape[2] > 1 and attention_mask is None and getattr(module, "is_causal", True)
    output = F.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=attention_mask,
        dropout_p=dropout,
        scale=scaling,
        is_causal=is_causal,
        enable_gqa=key.shape[1] != query.shape[1],
    )
    return output.transpose(1, 2).contiguous(), None


AttentionInterface.register(GROUPED_SDPA, _grouped_sdpa)
AttentionMaskInterface.register(GROUPED_SDPA, sdpa_mask)


@contextmanager
def generation_attention(model):
    """For the duration, a CPU model on transformers' ``sdpa`` attention runs :func:`_grouped_sdpa`
    instead (any other model passes through unchanged)."""
    config = getattr(model, "config", None)
    if (
        not isinstance(model, torch.nn.Module)
        or getattr(config, "_attn_implementation", None) != "sdpa"
        or model.device.type != "cpu"
    ):
        yield model
        return
    config._attn_implementation = GROUPED_SDPA
    try:
        yield model
    finally:
        config._attn_implementation = "sdpa"


class _GrowingLayer(DynamicLayer):
    """transformers' ``DynamicLayer`` (one layer's KV cache), its keys and values kept in buffers
    sized for ``reserve`` tokens (the prompt and the answer), doubled if more come.

    Hand-rolled because ``DynamicLayer`` appends a decode step's keys and values with
    ``torch.cat``, a copy of the whole cache in every layer at every step: a long answer's decode
    turns quadratic in its length. Here a step writes its token into the buffer; ``keys`` /
    ``values`` are views of the filled part, as transformers reads them. A layer whose tensors
    were replaced (``crop``, beam reordering) starts a buffer from them at its next update.
    """

    def __init__(self, reserve: int = 0) -> None:
        super().__init__()
        self.reserve = reserve

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, cache_kwargs: dict | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states)
        length = self.get_seq_length()
        end = length + key_states.shape[-2]
        held = getattr(self, "_held", None)
        if held is None or held[0].data_ptr() != self.keys.data_ptr() or end > held[0].shape[-2]:
            capacity = max(end, 2 * length, self.reserve)
            held = tuple(
                torch.empty(
                    (*states.shape[:-2], capacity, states.shape[-1]), dtype=states.dtype, device=states.device
                )
                for states in (key_states, value_states)
            )
            if length:
                held[0][..., :length, :] = self.keys
                held[1][..., :length, :] = self.values
            self._held = held
        held[0][..., length:end, :] = key_states
        held[1][..., length:end, :] = value_states
        self.keys, self.values = held[0][..., :end, :], held[1][..., :end, :]
        return self.keys, self.values


def growing_cache(model, tokens: int) -> DynamicCache:
    """A KV cache for ``generate`` of ``tokens`` in all (prompt and answer): transformers' own for
    ``model``, its full-attention layers :class:`_GrowingLayer` s (sliding-window layers keep their
    own, which never grows past the window)."""
    cache = DynamicCache(config=model.config)
    cache.layers = [_GrowingLayer(tokens) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def generate_tokens(
    model,
    tokenizer,
    prompts: list[list[int]],
    max_new_tokens: int,
    batch_size: int = 16,
    *,
    sample: bool = False,
    temperature: float = 0.7,
    top_p: float = 0.9,
    seed: int = 0,
    stop_strings: list[str] | None = None,
    desc: str = "generate",
    progress: bool = True,
) -> list[list[int]]:
    """The new tokens of each prompt (token ids), up to and including the first end-of-turn token.

    Greedy unless ``sample`` (nucleus sampling at ``temperature`` / ``top_p``, seeded per batch, so a
    rerun draws the same answers). A row stops at an end-of-turn token, a stop string or
    ``max_new_tokens``.
    """
    stops = end_of_turn_ids(model, tokenizer)
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = min(stops) if stops else 0
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outputs: list[list[int]] = [[] for _ in prompts]
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": None}
    greedy = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    with evaluating(model), generation_attention(model):
        for number, batch in enumerate(tqdm(batches, desc=desc, unit="batch", disable=not progress)):
            width = max(len(prompts[i]) for i in batch)
            input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
            attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, index in enumerate(batch):
                tokens = prompts[index]
                input_ids[row, width - len(tokens) :] = torch.tensor(tokens)
                attention_mask[row, width - len(tokens) :] = 1
            if sample:
                torch.manual_seed(seed * 1_000_003 + number)
            with torch.no_grad():
                generated = model.generate(
                    input_ids=input_ids.to(model.device),
                    attention_mask=attention_mask.to(model.device),
                    max_new_tokens=max_new_tokens,
                    num_beams=1,
                    **(
                        {"past_key_values": growing_cache(model, width + max_new_tokens)}
                        if isinstance(model, torch.nn.Module)
                        else {}
                    ),
                    pad_token_id=pad,
                    stop_strings=stop_strings or None,
                    tokenizer=tokenizer if stop_strings else None,
                    **(sampling if sample else greedy),
                )
            for row, index in enumerate(batch):
                outputs[index] = _until_stop(generated[row, width:].tolist(), stops)
    return outputs


def _until_stop(tokens: list[int], stops: set[int]) -> list[int]:
    for position, token in enumerate(tokens):
        if token in stops:
            return tokens[: position + 1]
    return tokens
