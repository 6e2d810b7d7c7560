"""Write BumbleCore's own small English demo datasets and the demo tokenizer.

    python scripts/make_demo_data.py [--out bumblecore/demo_data]

The data is synthetic and deterministic (seeded), designed so that learning is visible within the
demo's budget (a few-million-parameter model, 2 CPU cores, minutes):

- pretrain.jsonl / pretrain_eval.jsonl: short stories over a small world (animals, colours, places,
  objects) plus sentences that state word-list facts in prose ("The first word of ... is ...").
  A small vocabulary and regular grammar make the loss fall fast.
- sft_train.jsonl / sft_eval.jsonl (Alpaca): word-list tasks with one exact answer: first word, last
  word, repeat the list, count the words, which word follows another. The eval questions use word
  lists never seen in training, so exact match measures the skill, not memory. A pretrained base
  model does not follow the chat format (exact match ~0); SFT teaches it.
- sft_multiturn.jsonl and sft_toolcall.jsonl (ShareGPT): a few multi-turn dialogues and tool calls,
  to show those formats train too.
- dpo_train.jsonl / dpo_eval.jsonl (preference, Alpaca): the same kind of task, chosen = the right
  answer, rejected = a plausible wrong one (a wrong word from the list, an off-by-one count).
- tokenizer/: a byte-level BPE trained on all of the above (bumblecore train_tokenizer).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

ANIMALS = ["fox", "bee", "cat", "dog", "owl", "frog", "bear", "deer", "duck", "goat", "wolf", "hare", "mole", "crow", "swan", "lion"]
COLOURS = ["red", "blue", "green", "gold", "gray", "pink", "black", "white", "brown", "purple"]
PLACES = ["river", "forest", "hill", "garden", "lake", "meadow", "village", "valley", "field", "cave"]
OBJECTS = ["apple", "stone", "leaf", "basket", "flower", "book", "lamp", "honey", "bell", "cup", "kite", "shell", "seed", "key", "ring", "map"]
VERBS = ["saw", "found", "carried", "painted", "hid", "dropped", "shared", "counted", "kept", "lost"]
ADJECTIVES = ["small", "big", "old", "quiet", "happy", "brave", "tiny", "kind", "lazy", "clever"]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
WORDS = ANIMALS + COLOURS + PLACES + OBJECTS

SYSTEM = "You are a helpful assistant."


def story(rng: random.Random) -> str:
    sentences = []
    for _ in range(rng.randint(3, 7)):
        a, b = rng.sample(ANIMALS, 2)
        sentences.append(rng.choice([
            f"The {rng.choice(ADJECTIVES)} {a} {rng.choice(VERBS)} a {rng.choice(COLOURS)} {rng.choice(OBJECTS)} near the {rng.choice(PLACES)}.",
            f"In the {rng.choice(PLACES)}, the {a} and the {b} {rng.choice(VERBS)} {rng.randint(2, 9)} {rng.choice(OBJECTS)}s.",
            f"Every morning the {a} walks to the {rng.choice(PLACES)} to find a {rng.choice(OBJECTS)}.",
            f"The {a} said to the {b}: \"My {rng.choice(OBJECTS)} is {rng.choice(COLOURS)}.\"",
            f"When the sky turned {rng.choice(COLOURS)}, the {rng.choice(ADJECTIVES)} {a} went home to the {rng.choice(PLACES)}.",
        ]))
    return " ".join(sentences)


def word_list(rng: random.Random, low: int = 3, high: int = 6) -> list[str]:
    return rng.sample(WORDS, rng.randint(low, high))


def task(rng: random.Random, words: list[str]) -> tuple[str, str, str]:
    """(instruction, answer, a plausible wrong answer) for one word list."""
    listed = " ".join(words)
    kind = rng.choice(["first", "last", "repeat", "count", "after"])
    if kind == "first":
        return f"What is the first word of: {listed}", words[0], rng.choice(words[1:])
    if kind == "last":
        return f"What is the last word of: {listed}", words[-1], rng.choice(words[:-1])
    if kind == "repeat":
        wrong = words[:]
        i = rng.randrange(len(wrong) - 1)
        wrong[i], wrong[i + 1] = wrong[i + 1], wrong[i]
        return f"Repeat these words: {listed}", listed, " ".join(wrong)
    if kind == "count":
        n = len(words)
        return f"How many words are in: {listed}", NUMBER_WORDS[n], NUMBER_WORDS[n + rng.choice([-1, 1])]
    i = rng.randrange(len(words) - 1)
    return f"Which word comes after {words[i]} in: {listed}", words[i + 1], rng.choice([w for w in words if w != words[i + 1]])


def prose_fact(rng: random.Random) -> str:
    words = word_list(rng)
    listed = " ".join(words)
    return rng.choice([
        f"The first word of \"{listed}\" is {words[0]}.",
        f"The last word of \"{listed}\" is {words[-1]}.",
        f"There are {NUMBER_WORDS[len(words)]} words in \"{listed}\".",
        f"Said again, \"{listed}\" is {listed}.",
    ])


def write_jsonl(path: Path, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def make(out: Path, seed: int = 1234, vocab_size: int = 2048) -> None:
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)

    documents = []
    for _ in range(2400):
        parts = [story(rng)]
        if rng.random() < 0.5:
            parts.append(" ".join(prose_fact(rng) for _ in range(rng.randint(1, 3))))
        documents.append({"text": " ".join(parts)})
    write_jsonl(out / "pretrain.jsonl", documents[:2200])
    write_jsonl(out / "pretrain_eval.jsonl", documents[2200:])

    # Held-out SFT/DPO questions use word lists that never appear in training.
    seen: set[tuple[str, ...]] = set()

    def fresh_list() -> list[str]:
        while True:
            words = word_list(rng)
            if tuple(words) not in seen:
                seen.add(tuple(words))
                return words

    sft_train = []
    for _ in range(3000):
        instruction, answer, _ = task(rng, fresh_list())
        sft_train.append({"instruction": instruction, "input": "", "output": answer})
    sft_eval = []
    for _ in range(200):
        instruction, answer, _ = task(rng, fresh_list())
        sft_eval.append({"instruction": instruction, "input": "", "output": answer})
    write_jsonl(out / "sft_train.jsonl", sft_train)
    write_jsonl(out / "sft_eval.jsonl", sft_eval)

    dialogues = []
    for _ in range(60):
        words = fresh_list()
        turns = []
        for _ in range(rng.randint(2, 3)):
            instruction, answer, _ = task(rng, words)
            turns += [{"from": "human", "value": instruction}, {"from": "gpt", "value": answer}]
        dialogues.append({"conversations": [{"from": "system", "value": SYSTEM}] + turns})
    write_jsonl(out / "sft_multiturn.jsonl", dialogues)

    tool = {"name": "count_words", "description": "Count the words of a text",
            "parameters": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}}
    tool_calls = []
    for _ in range(40):
        words = fresh_list()
        listed = " ".join(words)
        call = json.dumps({"name": "count_words", "arguments": {"text": listed}})
        tool_calls.append({"conversations": [
            {"from": "human", "value": f"Use the tool to count the words of: {listed}"},
            {"from": "function_call", "value": call},
            {"from": "observation", "value": json.dumps({"count": len(words)})},
            {"from": "gpt", "value": f"There are {NUMBER_WORDS[len(words)]} words."},
        ], "tools": json.dumps([tool])})
    write_jsonl(out / "sft_toolcall.jsonl", tool_calls)

    def pairs(n: int) -> list[dict]:
        records = []
        for _ in range(n):
            instruction, answer, wrong = task(rng, fresh_list())
            records.append({"instruction": instruction, "input": "", "chosen": answer, "rejected": wrong})
        return records

    write_jsonl(out / "dpo_train.jsonl", pairs(1200))
    write_jsonl(out / "dpo_eval.jsonl", pairs(100))

    from bumblecore.tokenizer import train_tokenizer

    corpus = [str(out / name) for name in ("pretrain.jsonl", "sft_train.jsonl", "sft_multiturn.jsonl", "sft_toolcall.jsonl", "dpo_train.jsonl")]
    train_tokenizer(corpus, vocab_size=vocab_size, output_dir=str(out / "tokenizer"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "bumblecore" / "demo_data"))
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--vocab_size", type=int, default=2048)
    args = parser.parse_args()
    make(Path(args.out), args.seed, args.vocab_size)


if __name__ == "__main__":
    main()
