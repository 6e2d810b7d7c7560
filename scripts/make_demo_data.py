"""Write BumbleCore's own small English demo datasets and the demo tokenizer.

    python scripts/make_demo_data.py [--out bumblecore/demo_data]

The data is synthetic and deterministic (seeded), designed so that learning is visible within the
demo's budget (a few-million-parameter model, 2 CPU cores, minutes):

- pretrain.jsonl / pretrain_eval.jsonl: short stories over a small world (animals, colours, places,
  objects) plus sentences that state word-list facts in prose ("There are two animals in ...").
  A small vocabulary and regular grammar make the loss fall fast.
- sft_train.jsonl / sft_eval.jsonl (Alpaca): word-list questions with one exact answer: how many
  words, how many animals / colours / places / objects, is one of a kind there (see `task`). The
  eval questions use word lists never seen in training, so exact match measures the skill, not
  memory. A pretrained base model does not follow the chat format (exact match ~0); SFT teaches it.
- sft_multiturn.jsonl and sft_toolcall.jsonl (ShareGPT): a few multi-turn dialogues and tool calls,
  to show those formats train too.
- dpo_train.jsonl / dpo_eval.jsonl (preference, Alpaca): the same kind of task, chosen = the right
  answer, rejected = a plausible wrong one (an off-by-one count, the other of yes / no).
- tokenizer/: a byte-level BPE trained on all of the above (bumblecore train_tokenizer).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

ANIMALS = [
    "fox",
    "bee",
    "cat",
    "dog",
    "owl",
    "frog",
    "bear",
    "deer",
    "duck",
    "goat",
    "wolf",
    "hare",
    "mole",
    "crow",
    "swan",
    "lion",
]
COLOURS = ["red", "blue", "green", "gold", "gray", "pink", "black", "white", "brown", "purple"]
PLACES = ["river", "forest", "hill", "garden", "lake", "meadow", "village", "valley", "field", "cave"]
OBJECTS = [
    "apple",
    "stone",
    "leaf",
    "basket",
    "flower",
    "book",
    "lamp",
    "honey",
    "bell",
    "cup",
    "kite",
    "shell",
    "seed",
    "key",
    "ring",
    "map",
]
VERBS = ["saw", "found", "carried", "painted", "hid", "dropped", "shared", "counted", "kept", "lost"]
ADJECTIVES = ["small", "big", "old", "quiet", "happy", "brave", "tiny", "kind", "lazy", "clever"]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
WORDS = ANIMALS + COLOURS + PLACES + OBJECTS

SYSTEM = "You are a helpful assistant."


def story(rng: random.Random) -> str:
    sentences = []
    for _ in range(rng.randint(3, 7)):
        a, b = rng.sample(ANIMALS, 2)
        sentences.append(
            rng.choice(
                [
                    f"The {rng.choice(ADJECTIVES)} {a} {rng.choice(VERBS)} a {rng.choice(COLOURS)} {rng.choice(OBJECTS)} near the {rng.choice(PLACES)}.",
                    f"In the {rng.choice(PLACES)}, the {a} and the {b} {rng.choice(VERBS)} {rng.randint(2, 9)} {rng.choice(OBJECTS)}s.",
                    f"Every morning the {a} walks to the {rng.choice(PLACES)} to find a {rng.choice(OBJECTS)}.",
                    f'The {a} said to the {b}: "My {rng.choice(OBJECTS)} is {rng.choice(COLOURS)}."',
                    f"When the sky turned {rng.choice(COLOURS)}, the {rng.choice(ADJECTIVES)} {a} went home to the {rng.choice(PLACES)}.",
                ]
            )
        )
    return " ".join(sentences)


def word_list(rng: random.Random, low: int = 3, high: int = 6) -> list[str]:
    return rng.sample(WORDS, rng.randint(low, high))


KINDS = {"animals": ANIMALS, "colours": COLOURS, "places": PLACES, "objects": OBJECTS}


def task(rng: random.Random, words: list[str]) -> tuple[str, str, str]:
    """(instruction, answer, a plausible wrong answer) for one word list.

    Three kinds of question over the list: how many words, how many of one kind (animals, colours,
    places, objects), and whether one of a kind is there. They need the whole list taken in, not a
    word copied out of it: copying a word from the context takes an induction circuit, which a
    few-million-parameter model does not form within the demo's few hundred steps (measured: such
    questions stayed at exact match ~0 after SFT, while counting reached ~1.0).
    """
    listed = " ".join(words)
    kind = rng.choice(["count", "count_kind", "count_kind", "has_kind"])
    if kind == "count":
        n = len(words)
        return f"How many words are in: {listed}", NUMBER_WORDS[n], NUMBER_WORDS[n + rng.choice([-1, 1])]
    name = rng.choice(list(KINDS))
    n = sum(w in KINDS[name] for w in words)
    if kind == "count_kind":
        wrong = n + 1 if n == 0 else n + rng.choice([-1, 1])
        return f"How many {name} are in: {listed}", NUMBER_WORDS[n], NUMBER_WORDS[wrong]
    return f"Is there one of the {name} in: {listed}", ("yes" if n else "no"), ("no" if n else "yes")


def prose_fact(rng: random.Random) -> str:
    words = word_list(rng)
    listed = " ".join(words)
    name = rng.choice(list(KINDS))
    n = sum(w in KINDS[name] for w in words)
    return rng.choice(
        [
            f'There are {NUMBER_WORDS[len(words)]} words in "{listed}".',
            f'There are {NUMBER_WORDS[n]} {name} in "{listed}".',
            f'In "{listed}" there {"is one of the" if n else "is none of the"} {name}.',
        ]
    )


def write_jsonl(path: Path, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def make(out: Path, seed: int = 1234, vocab_size: int = 768) -> None:
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

    tool = {
        "name": "count_words",
        "description": "Count the words of a text",
        "parameters": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]},
    }
    tool_calls = []
    for _ in range(40):
        words = fresh_list()
        listed = " ".join(words)
        call = json.dumps({"name": "count_words", "arguments": {"text": listed}})
        tool_calls.append(
            {
                "conversations": [
                    {"from": "human", "value": f"Use the tool to count the words of: {listed}"},
                    {"from": "function_call", "value": call},
                    {"from": "observation", "value": json.dumps({"count": len(words)})},
                    {"from": "gpt", "value": f"There are {NUMBER_WORDS[len(words)]} words."},
                ],
                "tools": json.dumps([tool]),
            }
        )
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

    corpus = [
        str(out / name)
        for name in (
            "pretrain.jsonl",
            "sft_train.jsonl",
            "sft_multiturn.jsonl",
            "sft_toolcall.jsonl",
            "dpo_train.jsonl",
        )
    ]
    train_tokenizer(corpus, vocab_size=vocab_size, output_dir=str(out / "tokenizer"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "bumblecore" / "demo_data"))
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--vocab_size", type=int, default=768)
    args = parser.parse_args()
    make(Path(args.out), args.seed, args.vocab_size)


if __name__ == "__main__":
    main()
