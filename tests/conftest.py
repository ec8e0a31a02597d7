"""Shared fixtures: a small real tokenizer and tiny random models of several architectures; the
reference a measurement is checked against where two test modules share it."""

from __future__ import annotations

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    GemmaConfig,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

import optimum_rom  # noqa: E402
from optimum_rom.calibration.gradients import LOSS_GROUP  # noqa: E402

CALIBRATION_TEXT = Path(optimum_rom.__file__).parent / "data" / "wikitext2_valid_excerpt.txt"
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
VOCAB_SIZE = 512

ARCHITECTURES = ["llama", "qwen2", "mistral", "gemma"]


def tiny_config(arch: str, vocab_size: int = VOCAB_SIZE):
    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    if arch == "llama":
        return LlamaConfig(**common, tie_word_embeddings=False)
    if arch == "qwen2":  # q/k/v carry biases, embeddings tied
        return Qwen2Config(**common, tie_word_embeddings=True)
    if arch == "mistral":
        return MistralConfig(**common, sliding_window=None, tie_word_embeddings=False)
    if arch == "gemma":  # scaled embeddings, GeGLU, tied
        return GemmaConfig(**common, head_dim=16)
    raise ValueError(arch)


def tiny_model(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch))
    model.eval()
    return model


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    """A byte-level BPE tokenizer trained on the bundled WikiText excerpt (no hub needed)."""
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=["<unk>", "<s>", "</s>"])
    backend.train([str(CALIBRATION_TEXT)], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


CHAT_TEMPLATE = (  # ChatML with the tiny tokenizer's special tokens; </s> ends a turn
    "{% for message in messages %}<s>{{ message['role'] }}\n{{ message['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)


@pytest.fixture(scope="session")
def chat_tokenizer(tokenizer):
    """The tiny tokenizer with a chat template, as an Instruct model's tokenizer has."""
    chat = copy.deepcopy(tokenizer)
    chat.chat_template = CHAT_TEMPLATE
    return chat


@pytest.fixture(scope="session", autouse=True)
def answer_cache(tmp_path_factory):
    """Cached model answers (self-calibration, the chat task) go to a scratch folder, not the user's cache."""
    os.environ["OPTIMUM_ROM_CACHE"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture
def calibration_file() -> Path:
    return CALIBRATION_TEXT


@pytest.fixture
def model_dir(tmp_path, tokenizer):
    """Save a tiny model + tokenizer as an ordinary Hugging Face directory; returns a factory by arch."""

    def make(arch: str = "llama", with_tokenizer=None) -> Path:
        directory = tmp_path / f"dense-{arch}"
        tiny_model(arch).save_pretrained(directory)
        (with_tokenizer or tokenizer).save_pretrained(directory)
        return directory

    return make


@pytest.fixture
def compressed_dir(model_dir, calibration_file, tmp_path):
    """Compress a tiny model with ROM and save it; returns a factory ``(arch, name, **config) -> directory``
    (every linear of every block factorized at the default ratio 0.8)."""
    from optimum_rom import LowRankOptimizer, RomConfig

    def make(arch: str = "llama", name: str | None = None, **config) -> Path:
        directory = tmp_path / (name or f"rom-{arch}")
        config = RomConfig(**{"params_ratio": 0.8, "num_samples": 8, "seq_len": 32, **config})
        optimizer = LowRankOptimizer.from_pretrained(model_dir(arch))
        optimizer.compress(config, calibration=calibration_file, save_dir=directory, progress=False)
        return directory

    return make


def whole_model_output_gradients(model, data, sites, bases=None, covariances=False):
    """Mean squared loss gradient at each linear's output, by autograd through the whole model; for a
    linear in ``bases``, ``diag(U^T G U)`` of the gradient's second moment ``G`` (mean over tokens of
    ``g g^T``): its energy along each basis column. With ``covariances``, every linear's ``G`` itself."""
    bases = bases or {}
    if covariances:
        bases = {site.name: None for site in sites}
    totals = {site.name: 0.0 for site in sites}
    counts = dict.fromkeys(totals, 0)

    def record(name):
        def hook(module, grad_input, grad_output):
            gradient = grad_output[0].double()
            if name in bases:
                tokens = gradient.reshape(-1, gradient.shape[-1])
                totals[name] = totals[name] + tokens.T @ tokens
                counts[name] += len(tokens)
            else:
                totals[name] += gradient.pow(2).sum().item()
                counts[name] += gradient.numel()

        return hook

    hooks = [model.get_submodule(site.name).register_full_backward_hook(record(site.name)) for site in sites]
    for ids, labels in zip(data.input_ids.split(LOSS_GROUP), data.labels().split(LOSS_GROUP), strict=True):
        if (labels[:, 1:] != -100).any():  # a group of sequences with no target token has no loss
            embedded = model.get_input_embeddings()(ids).detach().requires_grad_()
            model(inputs_embeds=embedded, labels=labels, use_cache=False).loss.backward()
    for hook in hooks:
        hook.remove()
    for name, basis in bases.items():
        if basis is not None:
            totals[name] = torch.einsum("ij,ik,kj->j", basis.double(), totals[name], basis.double())
    return {name: totals[name] / counts[name] for name in totals}
