"""The Basis Selection pass: prune in rounds while training coefficients and new bases on the task.

Round ``t`` of ``N``: every matrix prunes its smallest-coefficient bases down to the cubic
schedule's count for ``t``, then ``steps_per_round`` optimizer steps train the coefficients of
the survivors and the new bases on the answer tokens of the target data. The last round prunes
to the final count, so its steps adapt the model at its final size. Kept and new bases are then
merged and re-factorized into FactorizedLinear layers at exactly the planned ranks. The optional
fine-tune (``fine_tune_steps``) is the optimizer's healing stage, which follows any pass.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ...allocation import RankPlan
from ...checkpoint import WorkDir
from ...configs import BasisSelectionConfig
from ...training import frozen_except
from ..base import CompressionPass, PassData
from .model import (
    add_new_bases,
    attach_basis_layers,
    kept_bases,
    merge_into_factorized,
    new_bases_ranks,
    plan_basis_selection,
    token_windows,
)
from .state import load_round, restore_round, run_fingerprint, save_round
from .training import train_steps

logger = logging.getLogger(__name__)


def run_basis_selection(
    model: nn.Module,
    config: BasisSelectionConfig,
    examples: list[dict[str, torch.Tensor]],
    plan: RankPlan | None = None,
    progress: bool = True,
    work_dir: str | Path | None = None,
) -> RankPlan:
    """Compress ``model`` in place for the task ``examples`` (tokenized, answer-only labels).

    With a ``work_dir``, the state after every round is kept there and a rerun of the same job
    continues after the last completed round.
    """
    plan = plan or plan_basis_selection(model, config)
    if not plan.ranks:
        return plan
    if work_dir is None:
        _rounds(model, config, examples, plan, progress, None)
        return plan
    with WorkDir(Path(work_dir), run_fingerprint(model, config, examples)) as work:
        if work.discarded:
            logger.warning(
                "ignoring the saved Basis Selection state in %s: it belongs to a different model, config or "
                "data set; starting from round 0",
                work_dir,
            )
        _rounds(model, config, examples, plan, progress, work)
    return plan


def _rounds(
    model: nn.Module,
    config: BasisSelectionConfig,
    examples: list[dict[str, torch.Tensor]],
    plan: RankPlan,
    progress: bool,
    work: WorkDir | None,
) -> None:
    saved = load_round(work) if work is not None else None
    windows = None
    if config.bases == "activation":
        windows = token_windows(examples, config.calibration_windows, config.seq_len)
    layers = attach_basis_layers(model, list(plan.ranks), windows, progress)
    new_ranks = new_bases_ranks(plan.ranks, config.new_rank)
    full = {name: layer.rank for name, layer in layers.items()}
    target = {name: plan.ranks[name] - new_ranks[name] for name in layers}
    steps = config.steps_per_round
    with frozen_except(model, train=True, gradient_checkpointing=config.gradient_checkpointing):
        peft_model = add_new_bases(model, new_ranks, layers)
        new_bases = {n: p for n, p in peft_model.named_parameters() if "lora_" in n}
        completed = 0
        if saved is not None:
            completed, tensors = saved
            restore_round(tensors, layers, new_bases)
        bar = tqdm(
            total=config.num_rounds * steps,
            initial=completed * steps,
            desc="basis selection",
            unit="step",
            disable=not progress,
        )
        with bar:
            for round_index in range(completed + 1, config.num_rounds + 1):
                for name, layer in layers.items():
                    layer.prune_to(kept_bases(full[name], target[name], round_index, config.num_rounds))
                kept = sum(layer.rank for layer in layers.values()) / sum(full.values())
                param_groups = [
                    {
                        "params": [layer.coefficient_root for layer in layers.values()],
                        "lr": config.learning_rate,
                    },
                    {"params": list(new_bases.values()), "lr": config.new_bases_learning_rate},
                ]
                train_steps(
                    peft_model,
                    param_groups,
                    examples,
                    first_step=(round_index - 1) * steps,
                    steps=steps,
                    batch_size=config.batch_size,
                    seed=config.seed,
                    bar=bar,
                    status={"round": f"{round_index}/{config.num_rounds}", "bases": f"{kept:.0%}"},
                    precision=config.training_precision,
                )
                if work is not None:
                    save_round(work, round_index, layers, new_bases)
        merge_into_factorized(peft_model, layers)


class BasisSelectionPass(CompressionPass):
    """Basis Selection: trains on the target task's examples, resumable after every round."""

    config_class = BasisSelectionConfig
    data = PassData.TASK
    resumable = True

    def plan(
        self, model: nn.Module, config: BasisSelectionConfig, data=None, progress: bool = True, **_
    ) -> RankPlan:
        return plan_basis_selection(model, config)

    def apply(self, model, config, data, plan, *, progress=True, stream=None, work_dir=None) -> None:
        run_basis_selection(model, config, data, plan, progress, work_dir)
