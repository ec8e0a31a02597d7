"""Zero-shot multiple-choice tasks through lm-evaluation-harness, on hand-made local files."""

import json

import pytest
import torch
from lm_eval.api.model import LM

from optimum_rom import LowRankOptimizer, SvdConfig
from optimum_rom.evaluation.harness import MULTIPLE_CHOICE_TASKS, evaluate_multiple_choice, make_lm
from optimum_rom.evaluation.loglikelihood import continuation_loglikelihoods

from .conftest import SHARED_DATA, tiny_model


class ScriptedLM(LM):
    """Log-likelihoods from a table keyed by continuation text; records every request it sees."""

    def __init__(self, scores: dict[str, float]) -> None:
        super().__init__()
        self.scores = scores
        self.requests: list[tuple[str, str]] = []

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        self.requests += [r.args for r in requests]
        return [(self.scores[continuation], False) for _, continuation in (r.args for r in requests)]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError

    def generate_until(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def arc_item(question, texts, answer):
    return {
        "id": question,
        "question": question,
        "choices": [{"label": label, "text": text} for label, text in zip("ABCD", texts, strict=False)],
        "answerKey": answer,
    }


def test_acc_and_acc_norm_are_the_harness_scores_of_the_log_likelihoods(tmp_path):
    # Item 1: "red" is the most likely choice (right). Item 2: "go" has the highest total log-likelihood,
    # but per character "walk slowly" wins, which is the right answer: acc misses it, acc_norm gets it.
    path = write_jsonl(
        tmp_path / "arc.jsonl",
        [arc_item("Colour of blood?", ["red", "blue"], "A"), arc_item("Move?", ["go", "walk slowly"], "B")],
    )
    lm = ScriptedLM({" red": -1.0, " blue": -3.0, " go": -4.0, " walk slowly": -6.0})
    result = evaluate_multiple_choice(lm, "arc_easy", path)
    assert (result["acc"], result["acc_norm"], result["items"]) == (0.5, 1.0, 2)
    assert ("Question: Colour of blood?\nAnswer:", " red") in lm.requests


def test_limit_takes_the_first_items(tmp_path):
    rows = [arc_item(f"Q{i}?", ["yes", "no"], "A") for i in range(5)]
    lm = ScriptedLM({" yes": -1.0, " no": -2.0})
    result = evaluate_multiple_choice(lm, "arc_challenge", write_jsonl(tmp_path / "a.jsonl", rows), limit=3)
    assert result["items"] == 3 and result["acc"] == 1.0
    assert {context for context, _ in lm.requests} == {f"Question: Q{i}?\nAnswer:" for i in range(3)}


def test_each_task_reads_its_file_format_and_builds_the_harness_prompts(tmp_path):
    files = {
        "boolq": {
            "question": "is water wet",
            "passage": "Water is wet.",
            "idx": 0,
            "title": "t",
            "label": True,
        },
        "piqa": {"goal": "Open a jar", "sol1": "twist the lid", "sol2": "eat the lid", "label": 0},
        "hellaswag": {
            "activity_label": "Cooking",
            "ctx": "A man cuts onions. he",
            "endings": ["cries.", "flies.", "sings.", "swims."],
            "label": 0,
        },
        "winogrande": {
            "sentence": "The cup fell off the table because _ was slippery.",
            "option1": "the cup",
            "option2": "the table",
            "answer": "1",
        },  # fmt: skip
        "openbookqa": {
            "question_stem": "Plants need",
            "answerKey": "A",
            "choices": [{"label": "A", "text": "light"}, {"label": "B", "text": "sand"}],
        },  # fmt: skip
    }
    scores = {
        " yes": -1.0, " no": -2.0, " twist the lid": -1.0, " eat the lid": -5.0, " cries.": -1.0,
        " flies.": -3.0, " sings.": -3.0, " swims.": -3.0, " was slippery.": -1.0, " light": -1.0, " sand": -4.0,
    }  # fmt: skip
    expected_contexts = {
        "boolq": "Water is wet.\nQuestion: is water wet?\nAnswer:",
        "piqa": "Question: Open a jar\nAnswer:",
        "hellaswag": "Cooking: A man cuts onions. he",
        "winogrande": "The cup fell off the table because the cup",
        "openbookqa": "Plants need",
    }
    for name, row in files.items():
        lm = ScriptedLM(scores)
        result = evaluate_multiple_choice(lm, name, write_jsonl(tmp_path / f"{name}.jsonl", [row]))
        assert result["acc"] == 1.0, name
        assert set(result) >= set(MULTIPLE_CHOICE_TASKS[name].metrics)
        assert expected_contexts[name] in {context for context, _ in lm.requests}, (name, lm.requests)


def test_a_malformed_file_names_the_line(tmp_path):
    path = write_jsonl(
        tmp_path / "piqa.jsonl", [{"goal": "g", "sol1": "a", "sol2": "b", "label": 0}, {"x": 1}]
    )
    with pytest.raises(ValueError, match=r"piqa.jsonl:2 has no field 'goal'; its fields are \['x'\]"):
        evaluate_multiple_choice(ScriptedLM({}), "piqa", path)


def harness_requests(seed: int = 0):
    """Token requests like the harness sends: single ones, and questions whose choices share a context."""
    generator = torch.Generator().manual_seed(seed)

    def ids(length):
        return torch.randint(3, 500, (length,), generator=generator).tolist()

    requests = [(None, ids(c), ids(x)) for c, x in [(5, 1), (12, 3), (30, 7), (3, 2), (17, 1), (9, 9)]]
    for context_length, choice_lengths in [(8, [1, 1]), (20, [4, 1, 6, 2]), (2, [3, 3, 3]), (40, [5, 7])]:
        context = ids(context_length)
        requests += [(None, context, ids(length)) for length in choice_lengths]
    return requests


@pytest.mark.parametrize(
    "arch,factorized",
    [("llama", False), ("llama", True), ("qwen2", False), ("mistral", False), ("gemma", False)],
)
def test_fast_log_likelihoods_equal_the_stock_harness_ones(tokenizer, arch, factorized):
    from lm_eval.models.huggingface import HFLM

    model = tiny_model(arch)
    if factorized:
        model = LowRankOptimizer(model, tokenizer).compress(SvdConfig(params_ratio=0.8), progress=False)
    requests = harness_requests()

    fast = make_lm(model, tokenizer, batch_size=3)._loglikelihood_tokens(requests, disable_tqdm=True)
    stock = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=3)._loglikelihood_tokens(
        requests, disable_tqdm=True
    )
    assert [g for _, g in fast] == [g for _, g in stock]
    assert [s for s, _ in fast] == pytest.approx([s for s, _ in stock], abs=1e-4)


class IgnoresAttentionMasks(torch.nn.Module):
    """A causal LM that applies its own causal mask whatever it is given, like models without 4D-mask support."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.dtype = model.dtype

    def forward(self, input_ids, position_ids=None, attention_mask=None, logits_to_keep=0):
        return self.model(input_ids=input_ids, logits_to_keep=logits_to_keep)


def test_a_model_that_ignores_packing_masks_is_scored_one_request_per_row(tokenizer):
    from types import SimpleNamespace

    from lm_eval.models.huggingface import HFLM

    model = tiny_model("llama")
    requests = harness_requests(seed=1)
    stock = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4)._loglikelihood_tokens(
        requests, disable_tqdm=True
    )
    lm = SimpleNamespace(model=IgnoresAttentionMasks(model), max_length=2048, batch_size=4, device="cpu")
    fast = continuation_loglikelihoods(lm, requests, disable_tqdm=True)
    assert [s for s, _ in fast] == pytest.approx([s for s, _ in stock], abs=1e-4)


@pytest.mark.skipif(not (SHARED_DATA / "arc_easy_test.jsonl").exists(), reason="needs ../shared/data")
def test_the_shared_data_files_load_in_every_task():
    lm = ScriptedLM({})
    lm.loglikelihood = lambda requests, disable_tqdm=False: [
        (-float(len(r.args[1])), False) for r in requests
    ]
    files = {
        **{name: spec.file_name for name, spec in MULTIPLE_CHOICE_TASKS.items()},
        "arc_challenge": "arc_challenge_train.jsonl",
        "hellaswag": "hellaswag_validation.first200.jsonl",
    }
    for name, file_name in files.items():
        result = evaluate_multiple_choice(lm, name, SHARED_DATA / file_name, limit=20)
        assert result["items"] == 20 and 0 <= result["acc"] <= 1, name
