"""GSM8K answer extraction and scoring, greedy generation, HumanEval in the sandbox, the code answer loss."""

import json

import pytest
import torch

from optimum_rom.evaluation import gsm8k, humaneval
from optimum_rom.evaluation.generation import cut_at_stop, greedy_generate
from optimum_rom.evaluation.gsm8k import extract_flexible, extract_strict, reference_answer
from optimum_rom.evaluation.sandbox import run_program
from optimum_rom.generation import end_of_turn_ids, generate_tokens, growing_cache

from .conftest import ARCHITECTURES, tiny_model


@pytest.mark.parametrize(
    ("output", "strict", "flexible"),
    [
        (" She has 3 + 4 = 7 apples.\n#### 7", "7", "7"),
        (" The total is $1,200.\n#### 1,200", "1200", "1200"),
        (" 10 - 12 = -2\n#### -2.", "-2", "-2"),
        (" So the answer is 18.", None, "18"),
        (" I do not know.", None, None),
        (
            " 5 cakes, then 6.\n#### 6\n\nExtra 99",
            "6",
            "99",
        ),  # strict takes the first ####, flexible the last number
    ],
)
def test_gsm8k_answer_extraction(output, strict, flexible):
    assert extract_strict(output) == strict
    assert extract_flexible(output) == flexible


def test_gsm8k_reference_is_the_number_after_the_marks():
    assert reference_answer("Natalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72") == "72"
    assert reference_answer("...\n#### 1,000") == "1000"


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_gsm8k_scores_exact_match_with_train_exemplars(tmp_path, monkeypatch):
    test = write_jsonl(tmp_path / "test.jsonl", [
        {"question": "1+1?", "answer": "1+1=2\n#### 2"},
        {"question": "2+2?", "answer": "2+2=4\n#### 4"},
        {"question": "3+3?", "answer": "3+3=6\n#### 6"},
    ])  # fmt: skip
    train = write_jsonl(tmp_path / "train.jsonl", [{"question": "5+5?", "answer": "5+5=10\n#### 10"}])
    seen = []

    def scripted_generate(model, tokenizer, prompts, stop, *args, **kwargs):
        seen.extend(prompts)
        return [" 1+1=2\n#### 2", " 2+2=4, so 4", " 3+3=7\n#### 7"][: len(prompts)]

    monkeypatch.setattr(gsm8k, "greedy_generate", scripted_generate)
    result = gsm8k.evaluate_gsm8k(None, None, test, train, num_fewshot=1, progress=False)
    assert result["exact_match_strict"] == pytest.approx(1 / 3)
    assert result["exact_match_flexible"] == pytest.approx(2 / 3)
    assert seen[0] == "Question: 5+5?\nAnswer: 5+5=10\n#### 10\n\nQuestion: 1+1?\nAnswer:"
    assert gsm8k.evaluate_gsm8k(None, None, test, train, limit=1, num_fewshot=1)["items"] == 1
    with pytest.raises(ValueError, match="num_fewshot=5 but"):
        gsm8k.evaluate_gsm8k(None, None, test, train, num_fewshot=5)


@pytest.mark.parametrize("arch", ARCHITECTURES)  # 4 query heads sharing 2 key/value heads
def test_batched_generation_answers_as_transformers_does_one_prompt_at_a_time(arch, tokenizer):
    """Left-padded batches, the grouped-query attention and the growing KV cache of
    generate_tokens against transformers' own generate, one unpadded prompt at a time."""
    model = tiny_model(arch)
    texts = ["The", "In the year of the", "A b c d e f g h i j k l m n", "He said that"]
    prompts = [tokenizer(text).input_ids for text in texts]
    batched = generate_tokens(model, tokenizer, prompts, max_new_tokens=40, batch_size=4, progress=False)
    stops = end_of_turn_ids(model, tokenizer)
    for prompt, answer in zip(prompts, batched, strict=True):
        alone = model.generate(
            torch.tensor([prompt]), max_new_tokens=40, do_sample=False, pad_token_id=min(stops)
        )[0, len(prompt) :].tolist()
        ends = next((i + 1 for i, token in enumerate(alone) if token in stops), len(alone))
        assert answer == alone[:ends]
    assert max(map(len, batched)) > 20  # answers long enough for the cache to matter
    assert model.config._attn_implementation == "sdpa"  # as it was before generating
    texts_batched = greedy_generate(
        model, tokenizer, texts, stop=[], max_new_tokens=6, batch_size=4, progress=False
    )
    assert texts_batched == [
        greedy_generate(model, tokenizer, [t], [], 6, 1, progress=False)[0] for t in texts
    ]


def test_a_kv_cache_reserved_too_small_grows_and_keeps_every_token_in_order():
    cache = growing_cache(tiny_model("llama"), tokens=2)
    keys = torch.randn(3, 2, 7, 16)  # batch, key/value heads, tokens, head size
    for start, end in [(0, 3), (3, 4), (4, 5), (5, 7)]:  # a prompt, then one token at a time
        held, _ = cache.update(keys[:, :, start:end], -keys[:, :, start:end], layer_idx=1)
        assert torch.equal(held, keys[:, :, :end])
    assert cache.get_seq_length(layer_idx=1) == 7


def test_generation_is_cut_before_the_first_stop_string():
    assert cut_at_stop(" 4\n\nQuestion: next", ["Question:", "</s>"]) == " 4\n\n"
    assert cut_at_stop("    return x\ndef g():\n#", humaneval.STOP) == "    return x"
    assert cut_at_stop("no stop here", ["Question:"]) == "no stop here"


@pytest.mark.parametrize(
    ("program", "status"),
    [
        ("assert sum([1, 2]) == 3\n", "passed"),
        ("assert sum([1, 2]) == 4\n", "failed"),
        ("raise RuntimeError('boom')\n", "failed"),
        ("while True:\n    pass\n", "timeout"),
        ("import socket\nsocket.create_connection(('127.0.0.1', 9))\n", "failed"),
        ("import os\nos.fork() or __import__('time').sleep(60)\n", "timeout"),  # children die with it
    ],
)
def test_sandbox_runs_programs_in_a_separate_process(program, status):
    result = run_program(program, timeout=2)
    assert result.status == status, result.detail
    assert result.passed == (status == "passed")


def test_sandbox_reports_the_error_and_blocks_the_network():
    result = run_program("import socket\nsocket.socket()\n", timeout=5)
    assert not result.passed and "network access is disabled" in result.detail
    assert "boom" in run_program("raise RuntimeError('boom')", timeout=5).detail


def test_humaneval_pass_at_1_runs_the_tests_on_the_completions(tmp_path, monkeypatch):
    problems = [
        {"task_id": f"t/{i}", "prompt": f"def f{i}(x):\n    '''Return x + {i}.'''\n",
         "test": f"def check(candidate):\n    assert candidate(1) == {1 + i}\n", "entry_point": f"f{i}"}
        for i in range(4)
    ]  # fmt: skip
    path = write_jsonl(tmp_path / "HumanEval.jsonl", problems)
    completions = [
        "    return x + 0\n",  # right
        "    return x - 1\n",  # wrong answer
        "    while True:\n        pass\n",  # never returns
        "    raise ValueError(x)\n",  # exception
    ]
    monkeypatch.setattr(humaneval, "greedy_generate", lambda *args, **kwargs: completions)
    result = humaneval.evaluate_humaneval(None, None, path, timeout=2, progress=False)
    assert result["pass@1"] == 0.25 and result["items"] == 4 and result["timeouts"] == 1


def test_humaneval_generation_uses_the_function_prompt(tokenizer, tmp_path):
    problem = {
        "task_id": "t/0",
        "prompt": "def f(x):\n",
        "test": "def check(c):\n    pass\n",
        "entry_point": "f",
    }
    path = write_jsonl(tmp_path / "h.jsonl", [problem])
    model = tiny_model("llama")
    seen = []
    forward = model.forward
    model.forward = lambda input_ids=None, **kwargs: (
        seen.append(input_ids) or forward(input_ids=input_ids, **kwargs)
    )
    result = humaneval.evaluate_humaneval(model, tokenizer, path, max_new_tokens=4, timeout=5, progress=False)
    assert result["items"] == 1
    assert tokenizer.decode(seen[0][0], skip_special_tokens=True).endswith("def f(x):\n")


def test_code_loss_scores_the_canonical_solutions_of_the_humaneval_file(tokenizer, tmp_path):
    import gzip

    from optimum_rom.evaluation import EvaluationOptions, answer_loss, evaluate
    from optimum_rom.task_data import PromptAnswer

    problems = [
        {"task_id": f"t/{i}", "prompt": f"def f{i}(x):\n", "canonical_solution": f"    return x * {i}\n",
         "test": "", "entry_point": f"f{i}"}
        for i in range(3)
    ]  # fmt: skip
    with gzip.open(tmp_path / "HumanEval.jsonl.gz", "wt") as handle:
        handle.writelines(json.dumps(p) + "\n" for p in problems)
    model = tiny_model("llama")

    scored = evaluate(model, tokenizer, ["code_loss"], tmp_path, EvaluationOptions(progress=False))
    pairs = [PromptAnswer(p["prompt"], p["canonical_solution"]) for p in problems]
    expected = answer_loss(model, tokenizer, pairs, progress=False)
    assert scored["tasks"]["code_loss"]["loss"] == pytest.approx(expected.loss)
