"""The config options a user can set from the command line, declared once: default, choices, help.

The config classes take their defaults and choices from here, and ``optimum-cli rom compress``
builds its flags from here (a flag left out keeps the config's or the preset's value). This
module imports nothing: optimum-cli loads it at every start-up, by file, without importing the
package (which would import torch into every ``optimum-cli`` call).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Option:
    """One config field as a command-line flag (``--field-name``; a ``True`` boolean becomes ``--no-...``)."""

    field: str
    default: object
    help: str
    choices: tuple | None = None
    type: type | None = None  # None: taken from the default (str for a None default)
    many: bool = False  # a list of values (nargs="+")

    @property
    def flag(self) -> str:
        name = self.field.replace("_", "-")
        return f"--no-{name}" if self.default is True else f"--{name}"


# What a precision option may name (see optimum_rom.precision): training steps and calibration walks alike.
PRECISIONS = ("auto", "float32", "bfloat16")

# Basis Selection trains on whole prompt/answer examples, so its shape defaults differ from ROM's windows.
BASIS_SELECTION_SHAPE = {"num_samples": 1024, "seq_len": 256}

COMMON = (
    Option("params_ratio", 0.8, "fraction of parameters kept, of what --ratio-of says (0.8 removes 20%%)"),
    Option(
        "ratio_of",
        "model",
        "what --params-ratio is a fraction of: the whole model, embeddings included (default), or the "
        "decoder linears only, as papers count",
        choices=("model", "linears"),
    ),
    Option(
        "num_samples",
        128,
        "calibration windows (rom, default 128) or training examples (basis-selection, default "
        f"{BASIS_SELECTION_SHAPE['num_samples']})",
    ),
    Option(
        "seq_len",
        128,
        "tokens per calibration window (rom, default 128) or per prompt + answer (basis-selection, default "
        f"{BASIS_SELECTION_SHAPE['seq_len']})",
    ),
    Option("seed", 0, "seeds the calibration sampling (and --holdout's split)"),
    Option(
        "training_precision",
        "auto",
        "what training steps (refinement, healing, basis-selection) multiply in: bfloat16 (autocast; "
        "weights, gradients and optimizer stay float32), float32, or auto = bfloat16 where the CPU or GPU "
        "has native bfloat16 arithmetic",
        choices=PRECISIONS,
    ),
    Option(
        "target_modules", None, "linear names to factorize (default: every linear in the blocks)", many=True
    ),
)
ROM = (
    Option(
        "allocation",
        "uniform",
        "rom: where the budget goes (overrides the preset's): uniform per block, paper = trailing blocks only, "
        "adaptive = where measured damage is smallest",
        choices=("uniform", "paper", "adaptive"),
    ),
    Option(
        "scoring",
        "matrix",
        "rom: --allocation adaptive's damage estimate: the loss gradient's size per linear (matrix), or "
        "along each output direction (direction)",
        choices=("matrix", "direction"),
    ),
    Option(
        "metric",
        "features",
        "rom: the error each factorization minimizes: of its output features (features, the paper), or "
        "weighted by the loss gradients' covariance at its output (fisher; needs --allocation adaptive, "
        "which measures the gradients), or that weighted error over the features' own principal "
        "directions: each keeps the ones whose variance times gradient energy is largest (scored)",
        choices=("features", "fisher", "scored"),
    ),
    Option(
        "fisher_damping",
        0.1,
        "rom: with --metric fisher, the share of the plain feature error in the metric, in (0, 1] "
        "(1 = --metric features)",
    ),
    Option("num_trailing_blocks", None, "rom: blocks compressed by --allocation paper", type=int),
    Option(
        "target",
        "local",
        "rom: fit each linear to its own outputs (local, the paper) or to the dense model's (dense)",
        choices=("local", "dense"),
    ),
    Option(
        "calibration_precision",
        "auto",
        "rom: what the calibration walks' block forwards (statistics, damage measuring, the next block's "
        "inputs) multiply in: float32, bfloat16 (autocast; statistics still summed in float32/float64, "
        "hidden states kept float32), or auto = bfloat16 where the CPU or GPU has native bfloat16 arithmetic",
        choices=PRECISIONS,
    ),
    Option(
        "factorization_precision",
        "float32",
        "rom: what each linear's basis and spectrum are computed in from the float64 sums: float32 "
        "(faster) or float64",
        choices=("float32", "float64"),
    ),
    Option("refine_epochs", 0, "rom: epochs of block-output refinement after each block's fits"),
    Option("refine_lr", 1e-4, "rom: learning rate of block refinement (Adam)"),
    Option(
        "refine_schedule",
        "constant",
        "rom: refinement's learning rate: constant, or cosine (10%% warm-up, cosine decay, gradients clipped to 1)",
        choices=("constant", "cosine"),
    ),
    Option(
        "refine_target",
        "local",
        "rom: what refinement tunes each block towards: the dense block's outputs on the inputs the compressed "
        "block sees (local), or the dense model's own hidden states after that block (dense: earlier blocks' "
        "errors get corrected too)",
        choices=("local", "dense"),
    ),
    Option(
        "refine_params",
        "factors",
        "rom: what refinement trains: the factors, or every parameter of the block (norms, dense linears too)",
        choices=("factors", "block"),
    ),
    Option("heal_minutes", 0.0, "rom: fine-tune for this many minutes after compressing (0 = off)"),
    Option(
        "heal_params",
        "lora",
        "rom: what healing trains: LoRA adapters, merged back, or every parameter of the decoder blocks "
        "(full: 12 more bytes per parameter)",
        choices=("lora", "full"),
    ),
    Option(
        "heal_schedule",
        "constant",
        "rom: healing's learning rate: constant, or cosine over the healing time (10%% warm-up, cosine "
        "decay to zero at the end of the budget)",
        choices=("constant", "cosine"),
    ),
    Option(
        "heal_lr",
        None,
        "rom: healing's (peak) learning rate (default: the one measured for --heal-params: 2e-4 for "
        "lora, 5e-5 for full)",
        type=float,
    ),
    Option(
        "time_budget",
        0.0,
        "rom: minutes the whole run may take: what compression leaves goes to healing (0 = no budget; "
        "--preset best: 60)",
    ),
    Option(
        "heal_distill",
        True,
        "rom: heal on the data's own next tokens instead of the dense model's distribution",
    ),
)
BASIS_SELECTION = (
    Option(
        "bases",
        "activation",
        "basis-selection: activation = SVD in the metric of the task's activations; svd = of the weights",
        choices=("activation", "svd"),
    ),
    Option("num_rounds", 4, "basis-selection: pruning rounds"),
    Option("steps_per_round", 5, "basis-selection: training steps per round"),
    Option("batch_size", 4, "basis-selection: examples per step"),
    Option("new_rank", 8, "basis-selection: new bases per matrix"),
    Option(
        "fine_tune_steps", 0, "basis-selection: LoRA fine-tune steps on the factors after merging (0 = off)"
    ),
    Option("gradient_checkpointing", False, "basis-selection: less training memory, more time"),
)
_BY_FIELD = {option.field: option for option in (*COMMON, *ROM, *BASIS_SELECTION)}


def default(field: str) -> object:
    return _BY_FIELD[field].default


def choices(field: str) -> tuple:
    return _BY_FIELD[field].choices
