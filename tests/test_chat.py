"""Chat data: rendering with the template, calibration windows, self-calibration, the chat task."""

import json
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from optimum_rom import LowRankOptimizer, RomConfig
from optimum_rom.calibration.data import ChatCalibration, load_calibration
from optimum_rom.chat import Answerer, AnswerSettings, cached_answers, render, weights_identity
from optimum_rom.evaluation import EvaluationOptions, evaluate

from .conftest import tiny_model

CONVERSATION = [
    {"role": "user", "content": "What is two plus two?"},
    {"role": "assistant", "content": "Two plus two is four."},
]
PROMPTS = [[{"role": "user", "content": f"Tell me about the number {i}."}] for i in range(12)]


def write_chats(path, count=40):
    records = [
        {"messages": [{"role": "user", "content": f"Question {i}: what is {i} times {i}?"},
                      {"role": "assistant", "content": f"The answer is {i * i}, since {i} times {i} is {i * i}."}]}
        for i in range(count)
    ]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_rendering_marks_what_the_assistant_wrote_and_its_end_of_turn(chat_tokenizer):
    rendered = render(chat_tokenizer, CONVERSATION)
    assert rendered.ids == chat_tokenizer.apply_chat_template(CONVERSATION)
    said = [token for token, mine in zip(rendered.ids, rendered.assistant, strict=True) if mine]
    assert chat_tokenizer.decode(said) == "Two plus two is four.</s>\n"
    asked = [token for token, mine in zip(rendered.ids, rendered.assistant, strict=True) if not mine]
    assert "What is two" in chat_tokenizer.decode(asked)


def test_chat_file_windows_start_where_conversations_start(chat_tokenizer, tmp_path):
    chats = write_chats(tmp_path / "chats.jsonl")
    data = load_calibration(chats, chat_tokenizer, num_samples=8, seq_len=48)

    assert data.input_ids.shape == (8, 48) and data.loss_mask.dtype == torch.bool
    opening = render(chat_tokenizer, CONVERSATION).ids[:3]  # "<s>user\n"
    assert all(row[:3].tolist() == opening for row in data.input_ids)
    targets = chat_tokenizer.decode(data.input_ids[data.loss_mask])
    assert "The answer is" in targets and "Question" not in targets
    assert (data.labels() == -100).sum() == (~data.loss_mask).sum()


def test_chat_calibration_mixes_in_plain_text(chat_tokenizer, calibration_file, tmp_path):
    chats = write_chats(tmp_path / "chats.jsonl")
    mixed = ChatCalibration(conversations=chats, text=calibration_file, text_share=0.25)
    data = load_calibration(mixed, chat_tokenizer, num_samples=16, seq_len=48)

    plain = data.loss_mask.all(dim=1)  # plain-text windows: every token a target
    assert len(data) == 16 and int(plain.sum()) == 4
    assert plain.tolist() != [False] * 12 + [True] * 4  # shuffled, so any prefix holds the mix


def test_self_calibration_answers_once_then_reads_the_cache(chat_tokenizer):
    model = tiny_model("llama")
    loads = []

    def load():
        loads.append(1)
        return model

    dense = Answerer(weights_identity(model), load)
    settings = AnswerSettings(max_new_tokens=8)
    first = cached_answers(dense, chat_tokenizer, PROMPTS, settings, progress=False)
    again = cached_answers(
        Answerer(weights_identity(model), load), chat_tokenizer, PROMPTS, settings, progress=False
    )

    assert len(loads) == 1 and first == again
    assert all(sum(c.assistant) == 8 for c in first)  # a random model never ends its turn: cut at 8
    source = ChatCalibration(prompts=PROMPTS, max_new_tokens=8, text_share=0.0)
    data = load_calibration(source, chat_tokenizer, num_samples=4, seq_len=24, answerer=dense, progress=False)
    assert len(loads) == 1 and data.input_ids.shape == (4, 24)


def test_a_streamed_and_an_in_memory_run_of_one_model_share_its_answers(
    model_dir, chat_tokenizer, tmp_path, monkeypatch
):
    from optimum_rom import chat

    source = model_dir("llama", with_tokenizer=chat_tokenizer)
    answered = []
    generate = chat.generate_tokens
    monkeypatch.setattr(
        chat,
        "generate_tokens",
        lambda m, t, prompts, *a, **k: answered.append(len(prompts)) or generate(m, t, prompts, *a, **k),
    )
    calibration = ChatCalibration(prompts=PROMPTS, max_new_tokens=8, text_share=0.0)
    config = RomConfig(params_ratio=0.8, num_samples=4, seq_len=24)

    streamed = LowRankOptimizer.from_pretrained(source)
    streamed.compress(config, calibration=calibration, save_dir=tmp_path / "streamed", progress=False)
    in_memory = LowRankOptimizer.from_pretrained(source)
    assert in_memory.model.num_parameters() > 0  # loading the model first selects the in-memory path
    in_memory.compress(config, calibration=calibration, save_dir=tmp_path / "in-memory", progress=False)

    assert streamed.report.streamed and not in_memory.report.streamed
    assert len(answered) == 1  # one generation: the second run read the first one's answers


def test_an_interrupted_generation_keeps_the_answers_it_finished(chat_tokenizer, monkeypatch):
    from optimum_rom import chat

    model = tiny_model("llama")
    dense = Answerer(weights_identity(model), lambda: model)
    settings = AnswerSettings(max_new_tokens=4, batch_size=4)  # 12 prompts: 3 batches
    generate, batches = chat.generate_tokens, []

    def generate_until_the_third_batch(model, tokenizer, prompts, *args, **kwargs):
        batches.append(len(prompts))
        if len(batches) == 3:
            raise KeyboardInterrupt
        return generate(model, tokenizer, prompts, *args, **kwargs)

    monkeypatch.setattr(chat, "generate_tokens", generate_until_the_third_batch)
    with pytest.raises(KeyboardInterrupt):
        cached_answers(dense, chat_tokenizer, PROMPTS, settings, progress=False)
    batches.clear()
    cache = max((Path(os.environ["OPTIMUM_ROM_CACHE"]) / "answers").glob("*.jsonl"), key=os.path.getmtime)
    cache.write_text(cache.read_text() + '{"prompt": "torn')  # a write cut short by the kill
    answers = cached_answers(dense, chat_tokenizer, PROMPTS, settings, progress=False)
    assert batches == [4] and len(answers) == 12  # only the interrupted batch is generated again
    batches.clear()
    assert cached_answers(dense, chat_tokenizer, PROMPTS, settings, progress=False) == answers
    assert batches == []  # the batch written after the torn line was kept whole


def test_a_chat_model_is_self_calibrated_by_default(chat_tokenizer, model_dir, tmp_path):
    optimizer = LowRankOptimizer.from_pretrained(model_dir("llama", with_tokenizer=chat_tokenizer))
    config = RomConfig.from_preset("auto", params_ratio=0.8, num_samples=8, seq_len=64)
    model = optimizer.compress(config, save_dir=tmp_path / "rom", progress=False)

    saved = json.loads((tmp_path / "rom" / "config.json").read_text())["quantization_config"]
    assert saved["calibration"].startswith("self-generated answers to bundled prompts")
    assert "up to 64 tokens" in saved["calibration"]  # not 256: no window reads further into an answer
    assert saved["source_model"] == str(model_dir("llama").resolve())
    assert optimizer.report.ratio == pytest.approx(0.8, rel=0.01)
    assert model.num_parameters() == AutoModelForCausalLM.from_pretrained(tmp_path / "rom").num_parameters()


def test_the_chat_task_compares_answers_with_the_dense_model(chat_tokenizer, model_dir, tmp_path):
    dense_dir = model_dir("llama", with_tokenizer=chat_tokenizer)
    options = EvaluationOptions(limit=6, max_new_tokens=12, progress=False)
    dense = AutoModelForCausalLM.from_pretrained(dense_dir)
    own = evaluate(dense, chat_tokenizer, ["chat"], options=options)["tasks"]["chat"]
    assert (own["agreement"], own["token_agreement"], own["items"]) == (1.0, 1.0, 6)

    optimizer = LowRankOptimizer.from_pretrained(dense_dir)
    optimizer.compress(
        RomConfig(params_ratio=0.6, num_samples=8, seq_len=64), save_dir=tmp_path / "rom", progress=False
    )
    compressed = AutoModelForCausalLM.from_pretrained(tmp_path / "rom")
    scored = evaluate(compressed, chat_tokenizer, ["chat"], options=options)["tasks"]["chat"]

    assert scored["answer_ce"] > own["answer_ce"] and scored["token_agreement"] < 1.0
    assert scored["answer_tokens"] == own["answer_tokens"]  # the same dense answers, teacher-forced
    sample = scored["samples"][0]
    assert sample["dense"] == own["samples"][0]["model"] and sample["prompt"]


def test_bad_chat_input_is_one_clear_error(chat_tokenizer, tokenizer, tmp_path):
    missing = tmp_path / "bad.jsonl"
    missing.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    with pytest.raises(ValueError, match="record 1 has neither 'messages' nor 'prompt'"):
        load_calibration(ChatCalibration(conversations=missing), chat_tokenizer)
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"messages": [{"role": "user", "content": " "}]}) + "\n")
    with pytest.raises(ValueError, match="has no text content"):
        load_calibration(ChatCalibration(conversations=empty), chat_tokenizer)
    chats = write_chats(tmp_path / "chats.jsonl")
    with pytest.raises(ValueError, match="tokenizer has none"):
        load_calibration(chats, tokenizer)  # a chat file, but the model has no chat template
    with pytest.raises(ValueError, match="text_share must be in"):
        ChatCalibration(text_share=1.5)
