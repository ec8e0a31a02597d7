import gzip
import json

import pytest
import torch

from optimum_rom.evaluation import answer_loss
from optimum_rom.task_data import IGNORE_INDEX, TaskFormat, load_pairs, split_pairs, tokenize_pairs

from .conftest import SHARED_DATA, tiny_model


def write_jsonl(path, rows, compress=False):
    text = "\n".join(json.dumps(r) for r in rows) + "\n"
    if compress:
        with gzip.open(path, "wt") as handle:
            handle.write(text)
    else:
        path.write_text(text)
    return path


def test_gsm8k_preset_formats_question_and_answer(tmp_path):
    path = write_jsonl(tmp_path / "gsm.jsonl", [{"question": "1+1?", "answer": "1+1=2\n#### 2"}])
    [pair] = load_pairs(path, "gsm8k")
    assert pair.prompt == "Question: 1+1?\nAnswer:" and pair.answer == " 1+1=2\n#### 2"


def test_code_preset_reads_gzipped_humaneval_style_records(tmp_path):
    row = {"prompt": "def f(x):\n    '''double'''\n", "canonical_solution": "    return 2 * x\n"}
    [pair] = load_pairs(write_jsonl(tmp_path / "code.jsonl.gz", [row], compress=True), "code")
    assert pair.prompt.startswith("def f") and pair.answer == "    return 2 * x\n"


@pytest.mark.skipif(not (SHARED_DATA / "gsm8k.train.jsonl").exists(), reason="needs ../shared/data")
def test_real_gsm8k_file_loads_and_splits_reproducibly():
    pairs = load_pairs(SHARED_DATA / "gsm8k.train.jsonl", "gsm8k")
    assert len(pairs) == 7473 and "####" in pairs[0].answer
    train, validation = split_pairs(pairs, 200, seed=0)
    assert len(validation) == 200 and len(train) == 7273
    assert split_pairs(pairs, 200, seed=0)[1] == validation
    assert not set(p.prompt for p in validation) & set(p.prompt for p in train[:2000])


def test_labels_mask_the_prompt_exactly(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"q": "What is two plus two?", "a": "Four."}])
    [pair] = load_pairs(path, TaskFormat("q", "a", "Q: {prompt}\nA:", " {answer}"))
    [example] = tokenize_pairs(tokenizer, [pair])
    prompt_length = len(tokenizer(pair.prompt, add_special_tokens=False)["input_ids"])
    assert (example["labels"][:prompt_length] == IGNORE_INDEX).all()
    answer_ids = example["labels"][prompt_length:]
    assert tokenizer.decode(answer_ids[:-1]) == pair.answer and answer_ids[-1] == tokenizer.eos_token_id


def test_answer_loss_counts_only_answer_tokens(tokenizer, tmp_path):
    rows = [{"q": f"Count to {i}.", "a": " ".join(str(n) for n in range(i))} for i in range(2, 9)]
    pairs = load_pairs(write_jsonl(tmp_path / "count.jsonl", rows), TaskFormat("q", "a"))
    model = tiny_model("qwen2")
    result = answer_loss(model, tokenizer, pairs, batch_size=3, progress=False)
    # Reference: one example at a time with transformers' own loss, weighted by answer tokens.
    total = tokens = 0
    for example in tokenize_pairs(tokenizer, pairs):
        count = int((example["labels"][1:] != IGNORE_INDEX).sum())
        loss = model(input_ids=example["input_ids"][None], labels=example["labels"][None]).loss.item()
        total, tokens = total + loss * count, tokens + count
    assert result.answer_tokens == tokens and result.examples == len(pairs)
    assert result.loss == pytest.approx(total / tokens, rel=1e-4)
    assert torch.isfinite(torch.tensor(result.perplexity))


def test_bad_task_data(tmp_path):
    with pytest.raises(FileNotFoundError, match="task data not found"):
        load_pairs(tmp_path / "none.jsonl")
    path = write_jsonl(tmp_path / "x.jsonl", [{"text": "hello"}])
    with pytest.raises(ValueError, match="has no field 'question'"):
        load_pairs(path, "gsm8k")
    with pytest.raises(ValueError, match="unknown task preset"):
        load_pairs(path, "chess")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        load_pairs(tmp_path / "empty.jsonl", "gsm8k")
