import json

import pytest
import torch

from optimum_rom.calibration import load_calibration


def test_text_file_gives_seeded_windows(tokenizer, calibration_file):
    data = load_calibration(calibration_file, tokenizer, num_samples=8, seq_len=32, seed=0)
    assert data.input_ids.shape == (8, 32) and data.input_ids.dtype == torch.long
    assert data.loss_mask is None  # plain text: every token is a target
    again = load_calibration(calibration_file, tokenizer, num_samples=8, seq_len=32, seed=0)
    assert torch.equal(data.input_ids, again.input_ids)
    other = load_calibration(calibration_file, tokenizer, num_samples=8, seq_len=32, seed=1)
    assert not torch.equal(data.input_ids, other.input_ids)


def test_jsonl_fields_and_list_of_strings(tokenizer, tmp_path):
    path = tmp_path / "qa.jsonl"
    rows = [{"question": f"What is {i} plus {i}?", "answer": f"It is {2 * i}."} for i in range(200)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    data = load_calibration(path, tokenizer, num_samples=4, seq_len=16, text_field="question,answer")
    assert "plus" in tokenizer.decode(data.input_ids.flatten())
    strings = [f"{r['question']} {r['answer']}" for r in rows]
    assert load_calibration(strings, tokenizer, num_samples=4, seq_len=16).input_ids.shape == (4, 16)


def test_bad_calibration_input_names_the_problem(tokenizer, tmp_path):
    with pytest.raises(FileNotFoundError, match="calibration file not found"):
        load_calibration(tmp_path / "missing.txt", tokenizer)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(ValueError, match="is empty"):
        load_calibration(empty, tokenizer)
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    with pytest.raises(ValueError, match="has no field 'text'.*text_field"):
        load_calibration(jsonl, tokenizer)
    short = tmp_path / "short.txt"
    short.write_text("just a few words")
    with pytest.raises(ValueError, match="fewer than seq_len=128"):
        load_calibration(short, tokenizer, seq_len=128)
    with pytest.raises(ValueError, match="list of strings is empty"):
        load_calibration([], tokenizer)
