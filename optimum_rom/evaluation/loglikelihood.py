"""Log-likelihoods of continuations, with the choices of one question packed into one sequence.

Why: a multiple-choice item asks for log P(choice | context) of every choice, and the harness
sends one (context, choice) request per choice, so the stock ``HFLM`` runs the shared context
through the model once per choice. On a CPU the forward pass is the whole cost: ARC's four short
answers behind a 25-token question cost four contexts. Here the requests that share a context
become one *packed* row, ``context + choice_1 + choice_2 + ...``, with position ids restarting
after the context for every choice and a block attention mask in which each choice sees the
context and its own earlier tokens only; every choice is then scored exactly as it would be
alone. Only positions that are scored are projected onto the vocabulary (``logits_to_keep``):
SmolLM2's lm_head is a fifth of its weights.

Packing needs a model that honours a 4D attention mask and explicit position ids (the Llama
family in transformers does); the first packed row is checked against the same requests run
one per row, and if they disagree (or the model refuses the mask) every request gets its own row.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

Request = tuple[object, list[int], list[int]]  # (harness request key, context ids, continuation ids)
Answer = tuple[float, bool]  # (sum of log-probs, continuation is the greedy decoding)

logger = logging.getLogger(__name__)


@dataclass
class Pack:
    """One model row: a context and the continuations scored after it (indices into the requests)."""

    context: list[int]
    members: list[int]

    def length(self, requests: list[Request]) -> int:
        return len(self.context) + sum(len(requests[i][2]) - 1 for i in self.members)


def continuation_loglikelihoods(lm, requests: list[Request], disable_tqdm: bool = False) -> list[Answer]:
    """(log P(continuation | context), is greedy) per harness request, in the order given.

    ``lm`` is the harness's HFLM: its ``model``, ``max_length``, ``batch_size``, ``device`` and
    ``cache_hook`` are used. Contexts are left-truncated the way the harness does.
    """
    packs = pack_requests(requests, lm.max_length)
    if not _packing_agrees(lm, requests, packs):
        logger.warning(
            "%s does not honour 4D attention masks; scoring choices one by one", type(lm.model).__name__
        )
        packs = [Pack(p.context, [i]) for p in packs for i in p.members]
    packs.sort(key=lambda p: p.length(requests), reverse=True)
    answers: list[Answer | None] = [None] * len(requests)
    progress = tqdm(total=len(requests), disable=disable_tqdm, desc="loglikelihood", unit="request")
    for start in range(0, len(packs), lm.batch_size):
        batch = packs[start : start + lm.batch_size]
        for index, answer in zip(
            [i for p in batch for i in p.members], _score(lm.model, requests, batch, lm.device), strict=True
        ):
            answers[index] = answer
            if requests[index][0] is not None:
                lm.cache_hook.add_partial("loglikelihood", requests[index][0], answer)
        progress.update(sum(len(p.members) for p in batch))
    progress.close()
    return answers  # type: ignore[return-value]


def pack_requests(requests: list[Request], max_length: int) -> list[Pack]:
    """Group requests by their (harness-truncated) context, in first-seen order."""
    packs: dict[tuple[int, ...], Pack] = {}
    for index, (_, context, continuation) in enumerate(requests):
        whole = (context + continuation)[-(max_length + 1) :]
        truncated = whole[: len(whole) - len(continuation)]
        if not truncated or not continuation:
            raise ValueError(f"request {index}: empty context or continuation after truncation")
        packs.setdefault(tuple(truncated), Pack(truncated, [])).members.append(index)
    return list(packs.values())


def _score(model, requests: list[Request], packs: list[Pack], device) -> list[Answer]:
    """Answers for every member of ``packs`` (pack by pack, member by member): one forward pass."""
    rows = [_layout(requests, pack) for pack in packs]
    width = max(len(tokens) for tokens, _, _ in rows)
    input_ids = torch.zeros(len(rows), width, dtype=torch.long)
    position_ids = torch.zeros(len(rows), width, dtype=torch.long)
    segment = torch.full((len(rows), width), -1, dtype=torch.long)  # -1 padding, 0 context, i + 1 choice i
    for row, (tokens, positions, segments) in enumerate(rows):
        input_ids[row, : len(tokens)] = torch.tensor(tokens)
        position_ids[row, : len(tokens)] = torch.tensor(positions)
        segment[row, : len(tokens)] = torch.tensor(segments)
    # Every scored position lies after the last-but-one context token of its row: keep that tail.
    keep = width - min(len(pack.context) - 1 for pack in packs)
    packed = any(len(pack.members) > 1 for pack in packs)
    with torch.no_grad():  # rows of one request each need only the model's own causal mask
        logits = model(
            input_ids=input_ids.to(device),
            position_ids=position_ids.to(device) if packed else None,
            attention_mask=_block_mask(segment, model.dtype).to(device) if packed else None,
            logits_to_keep=keep,
        ).logits
    log_probs = F.log_softmax(logits.float(), dim=-1).cpu()
    offset = width - keep  # absolute position of each row's first kept log-probs
    answers = []
    for pack, row_log_probs in zip(packs, log_probs, strict=True):
        start = len(pack.context)
        for index in pack.members:
            continuation = requests[index][2]
            # Token 0 is predicted at the last context position, token j at the choice's token j - 1.
            positions = [len(pack.context) - 1] + list(range(start, start + len(continuation) - 1))
            start += len(continuation) - 1
            scored = row_log_probs[[p - offset for p in positions]]
            target = torch.tensor(continuation)
            total = float(scored.gather(1, target[:, None]).sum())
            answers.append((total, bool((scored.argmax(dim=-1) == target).all())))
    return answers


def _layout(requests: list[Request], pack: Pack) -> tuple[list[int], list[int], list[int]]:
    """Tokens, position ids and segment ids of one packed row (a choice's last token is never input)."""
    tokens, positions, segments = list(pack.context), list(range(len(pack.context))), [0] * len(pack.context)
    for number, index in enumerate(pack.members, 1):
        fed = requests[index][2][:-1]
        tokens += fed
        positions += range(len(pack.context), len(pack.context) + len(fed))
        segments += [number] * len(fed)
    return tokens, positions, segments


def _block_mask(segment: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive (batch, 1, query, key) mask: causal, and a choice sees the context and itself only."""
    width = segment.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    query, key = segment[:, :, None], segment[:, None, :]
    allowed = causal & (key != -1) & ((key == 0) | (key == query))
    allowed |= torch.eye(width, dtype=torch.bool)  # padding rows attend to themselves, not to nothing (NaN)
    mask = torch.zeros(allowed.shape, dtype=dtype)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def _packing_agrees(lm, requests: list[Request], packs: list[Pack]) -> bool:
    """Whether the first pack where the mask matters scores the same as its requests one per row.

    The mask matters once a choice after the first feeds tokens (a choice of one token is read off
    the last context position); without such a pack, packing is plain causal attention anyway.
    """
    pack = next((p for p in packs if any(len(requests[i][2]) > 1 for i in p.members[1:])), None)
    if pack is None:
        return True
    try:
        packed = _score(lm.model, requests, [pack], lm.device)
    except (TypeError, ValueError, RuntimeError):  # the model rejects a 4D mask or position ids
        return False
    alone = _score(lm.model, requests, [Pack(pack.context, [i]) for i in pack.members], lm.device)
    return all(abs(a[0] - b[0]) < 1e-3 for a, b in zip(packed, alone, strict=True))
