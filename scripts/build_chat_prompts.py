"""Build the bundled chat prompt sets from the project's shared data folder (run once; output committed).

    python scripts/build_chat_prompts.py            # writes optimum_rom/data/chat_prompts_{calibration,evaluation}.jsonl

Two disjoint sets of single-turn user prompts, each a mix of instructions, questions, math word
problems, science questions, code requests and summarization:

- ``calibration``: what the dense model answers to make its own calibration transcripts.
- ``evaluation``: what the ``chat`` evaluation task asks; no calibration prompt is in it.

Sources (licences in ``optimum_rom/data/README.md``): Self-Instruct's 175 seed tasks, GSM8K
(calibration: its train part; evaluation: the 500-problem held-out split the benchmarks score),
ARC-Easy (train / test), WikiText-2 paragraphs to summarize (valid split / the bundled test
excerpt) and prompts
written for this project. The split is seeded, so the files are reproducible.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from optimum_rom.task_data import split_pairs

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
DATA = ROOT / "optimum_rom" / "data"
MAX_PROMPT_CHARS = 1200  # a few seed tasks quote whole documents: too long for a 135M model's chat

WRITTEN_CALIBRATION = [
    "Explain why the sky is blue in simple terms.",
    "What are the main differences between a virus and a bacterium?",
    "Give me a short recipe for pancakes.",
    "How do I politely decline a meeting invitation? Write a short email.",
    "What is photosynthesis?",
    "List five countries in South America and their capitals.",
    "Write a haiku about autumn leaves.",
    "What should I pack for a weekend camping trip?",
    "Explain what a black hole is to a ten-year-old.",
    "What is the difference between weather and climate?",
    "Suggest three names for a small coffee shop.",
    "How many minutes are there in a day? Show your calculation.",
    'Rewrite this sentence in a more formal tone: "Hey, can you send me that report real quick?"',
    "What are some good habits for getting better sleep?",
    "Translate 'thank you very much' into French.",
    'Who wrote "Romeo and Juliet"?',
    "Describe the water cycle in four steps.",
    "What is the boiling point of water in Fahrenheit?",
    "Give me two arguments for and two against working from home.",
    "Write the opening of a short story about a robot that learns to paint.",
    "What is the largest planet in our solar system?",
    "How do vaccines work?",
    "Explain the rules of tic-tac-toe.",
    "What does GDP stand for, and what does it measure?",
    'Correct the grammar: "She don\'t like apples and he have a car."',
    "What is a good way to start learning a new language?",
    "What is the Pythagorean theorem?",
    "Write a short thank-you note to a teacher.",
    "Write a Python function that checks whether a string is a palindrome.",
    "Write a Python function that returns the factorial of n.",
    "How do I read a text file line by line in Python?",
    "Write a Python function that reverses a list without using reverse().",
    "Explain what a for loop does in Python, with an example.",
    "Write a Python function that counts the vowels in a string.",
    "Write a SQL query that selects all users older than 30 from a table named users.",
    "What is the difference between a list and a tuple in Python?",
    "Write a Python function that returns the largest number in a list.",
    "Write a JavaScript function that adds two numbers.",
    "Write a Python function that checks whether a number is prime.",
    "How do I sort a dictionary by its values in Python?",
    "Write a Python function that computes the n-th Fibonacci number.",
    "Explain what this code does: `print([x * x for x in range(5)])`",
    "Write a Python class for a bank account with deposit and withdraw methods.",
    "Write a bash command that counts the lines in a file named data.txt.",
    "Write a Python function that removes duplicates from a list while keeping the order.",
    "What does the len function do in Python?",
    "Write a Python function that converts Celsius to Fahrenheit.",
    "Fix the bug in this code: `def add(a, b): return a - b`",
    "Write a Python function that returns the sum of the even numbers in a list.",
    "How do I create a virtual environment in Python?",
    "Write a Python function that merges two sorted lists into one sorted list.",
    "What is recursion? Give a short Python example.",
]
WRITTEN_EVALUATION = [
    "What is the capital of France?",
    "Write a Python function that returns the square of a number.",
    "Give me three tips for staying healthy.",
    "Translate 'good morning' into Spanish.",
    "What is the tallest mountain in the world?",
    "Explain how a rainbow forms.",
    "Write a short poem about the sea.",
    "What are the three states of matter?",
    "How can I save money on groceries?",
    "Who painted the Mona Lisa?",
    "Summarize the benefits of regular exercise in two sentences.",
    "What is the difference between a noun and a verb?",
    "Suggest a fun activity for a rainy afternoon.",
    "Write a Python function that checks whether a number is even.",
    "Write a Python function that returns the length of the longest word in a sentence.",
    "How do I write to a file in Python?",
    "Write a Python function that returns the average of a list of numbers.",
    "What is a dictionary in Python?",
    "Write a Python function that capitalizes the first letter of every word in a string.",
    "Write a SQL query that counts the rows in a table named orders.",
    "Write a Python function that returns the smallest of three numbers.",
    'Explain what `if __name__ == "__main__":` means in Python.',
    "Write a Python function that checks whether a list is sorted.",
    "Write a JavaScript function that returns the length of a string.",
]
COUNTS = {  # source -> (calibration, evaluation)
    "self-instruct": (120, 55),
    "gsm8k": (64, 24),
    "arc-easy": (64, 24),
    "wikitext2": (24, 12),  # the valid split has only 24 long paragraphs without <unk>
}


def record(source: str, index: int, prompt: str) -> dict:
    return {"id": f"{source}-{index}", "source": source, "messages": [{"role": "user", "content": prompt}]}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def self_instruct(rng: random.Random) -> tuple[list[str], list[str]]:
    prompts = []
    for task in read_jsonl(SHARED / "seed_tasks.jsonl"):
        given = task["instances"][0]["input"].strip()
        prompt = task["instruction"].strip() + (f"\n\n{given}" if given else "")
        if len(prompt) <= MAX_PROMPT_CHARS:
            prompts.append(prompt)
    rng.shuffle(prompts)
    calibration, evaluation = COUNTS["self-instruct"]
    return prompts[:calibration], prompts[calibration : calibration + evaluation]


def gsm8k(rng: random.Random) -> tuple[list[str], list[str]]:
    questions = [r["question"].strip() for r in read_jsonl(SHARED / "gsm8k.train.jsonl")]
    train, held_out = split_pairs(questions, validation=500, seed=0)  # the benchmarks' held-out split
    calibration, evaluation = COUNTS["gsm8k"]
    return rng.sample(train, calibration), rng.sample(held_out, evaluation)


def arc_question(item: dict) -> str:
    choices = ", ".join(f"{c['label']}) {c['text']}" for c in item["choices"])
    return f"{item['question']}\nChoices: {choices}"


def arc_easy(rng: random.Random) -> tuple[list[str], list[str]]:
    calibration, evaluation = COUNTS["arc-easy"]
    train = [arc_question(i) for i in read_jsonl(SHARED / "arc_easy_train.jsonl")]
    test = [arc_question(i) for i in read_jsonl(SHARED / "arc_easy_test.jsonl")]
    return rng.sample(train, calibration), rng.sample(test, evaluation)


def detokenize(text: str) -> str:
    """WikiText's tokenized release (`` @-@ ``, `` , ``, ``<unk>``) back to plain prose."""
    text = text.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".")
    text = re.sub(r" ([,.;:!?)%]|'s\b|n't\b)", r"\1", text)
    text = re.sub(r"([($]) ", r"\1", text)
    return re.sub(r"\s+", " ", text).strip()


def paragraphs(path: Path, max_words: int = 150) -> list[str]:
    """Body paragraphs (not headings, no ``<unk>``) of at least 60 words, cut after the last whole
    sentence within ``max_words``."""
    found = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("=") or "<unk>" in line:
            continue
        kept: list[str] = []
        for sentence in re.split(r"(?<=[.!?]) ", detokenize(line)):
            if len(" ".join(kept + [sentence]).split()) > max_words:
                break
            kept.append(sentence)
        if len(" ".join(kept).split()) >= 60:
            found.append(" ".join(kept))
    return found


def wikitext2(rng: random.Random) -> tuple[list[str], list[str]]:
    calibration, evaluation = COUNTS["wikitext2"]
    template = "Summarize the following text in two sentences.\n\n{}"
    valid = paragraphs(SHARED / "wikitext2.valid.tokens")
    test = paragraphs(DATA / "wikitext2_test_excerpt.txt")
    return (
        [template.format(p) for p in rng.sample(valid, calibration)],
        [template.format(p) for p in rng.sample(test, evaluation)],
    )


def main() -> None:
    rng = random.Random(0)
    sets: dict[str, list[dict]] = {"calibration": [], "evaluation": []}
    for source, build in (
        ("self-instruct", self_instruct),
        ("gsm8k", gsm8k),
        ("arc-easy", arc_easy),
        ("wikitext2", wikitext2),
    ):
        for name, prompts in zip(sets, build(rng), strict=True):
            sets[name] += [record(source, i, p) for i, p in enumerate(prompts)]
    sets["calibration"] += [record("optimum-rom", i, p) for i, p in enumerate(WRITTEN_CALIBRATION)]
    # The written prompts open the evaluation set: the chat task shows its first answers side by side.
    sets["evaluation"] = [record("optimum-rom-eval", i, p) for i, p in enumerate(WRITTEN_EVALUATION)] + sets[
        "evaluation"
    ]
    seen = {r["messages"][0]["content"] for r in sets["calibration"]}
    overlap = [r["id"] for r in sets["evaluation"] if r["messages"][0]["content"] in seen]
    if overlap:
        raise RuntimeError(f"evaluation prompts also in calibration: {overlap}")
    for name, records in sets.items():
        path = DATA / f"chat_prompts_{name}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
        print(f"{path.relative_to(ROOT)}: {len(records)} prompts")


if __name__ == "__main__":
    main()
