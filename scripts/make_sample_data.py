"""Write the bundled sample data under `dbrx_tune/data/samples/` (deterministic for a given seed).

The data is a toy task family chosen so that a tiny random-init DBRX learns it in a few minutes on a CPU
and so that learning is checkable with a rule:

* colour lookup: "What colour is a banana?" -> "A banana is yellow." (16 fruits, 8 colours, several
  phrasings and optional system turns; held-out rows reuse the facts under unseen prompt combinations),
* word echo: "Repeat these words: fox lamp river" -> "fox lamp river" (held-out word sequences are new).

Files written (train/test prompts never overlap):

    sft_train.jsonl / sft_test.jsonl                `messages` (some with a system turn, some multi-turn)
    sft_prompt_completion_train.jsonl               conversational `prompt` / `completion`
    preference_train.jsonl / preference_test.jsonl  conversational `prompt` / `chosen` / `rejected`
    prompts_train.jsonl / prompts_test.jsonl        conversational `prompt` + gold `answer` (rule rewards)

Preference pairs prefer the correct answer over a garbled answer or a refusal (and, in one pair in ten, over
an answer that is wrong only in content: a wrong colour or one echoed word replaced), so the signal is simple
enough for a tiny reward model to pass 90% held-out accuracy while content errors still reward reading the prompt.

Usage: python scripts/make_sample_data.py [--seed 0] [--out dbrx_tune/data/samples]
"""

from __future__ import annotations

import argparse
import json
import logging
import random
from collections.abc import Callable, Iterator
from pathlib import Path

logger = logging.getLogger("make_sample_data")

FRUIT_COLOURS = {
    "apple": "red",
    "banana": "yellow",
    "lemon": "yellow",
    "lime": "green",
    "cherry": "red",
    "grape": "purple",
    "plum": "purple",
    "blueberry": "blue",
    "strawberry": "red",
    "pear": "green",
    "coconut": "brown",
    "blackberry": "black",
    "pumpkin": "orange",
    "tangerine": "orange",
    "avocado": "green",
    "raspberry": "red",
}
COLOURS = sorted(set(FRUIT_COLOURS.values()))
COLOUR_QUESTIONS = (
    "What colour is {a} {fruit}?",
    "What is the colour of {a} {fruit}?",
    "Tell me the colour of {a} {fruit}.",
    "Which colour does {a} {fruit} have?",
    "{A} {fruit} has which colour?",
    "Do you know the colour of {a} {fruit}?",
    "What colour does {a} {fruit} have?",
    "Name the colour of {a} {fruit}.",
)
ECHO_WORDS = (
    "fox",
    "lamp",
    "river",
    "stone",
    "cloud",
    "bread",
    "chair",
    "moon",
    "tree",
    "boat",
    "salt",
    "drum",
    "glass",
    "horse",
    "paper",
    "rain",
    "seed",
    "wolf",
    "bell",
    "coin",
    "door",
    "frog",
    "kite",
    "rope",
)
ECHO_QUESTIONS = ("Repeat these words: {words}", "Say back exactly: {words}", "Echo: {words}")
SYSTEM_PROMPTS = (None, "You are a helpful assistant.", "Answer in one short sentence.", "You are a concise assistant.")

REFUSALS = (
    "I do not know.",
    "I am not sure about that.",
    "Sorry, I cannot help with that.",
    "That is a hard question.",
)
# Rejected answers: mostly wrong in form (garbled or a refusal), which a tiny reward model learns in a few hundred
# steps; a few are wrong only in content, so a stronger model has more to learn.
WRONG_KINDS = (("content", 0.1), ("garbled", 0.45), ("refusal", 0.45))

Message = dict[str, str]
# One question: (user text, gold answer text, short gold answer for rule rewards, wrong answers).
Item = tuple[str, str, str, Callable[[random.Random], str]]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _wrong_kind(rng: random.Random) -> str:
    return rng.choices([kind for kind, _ in WRONG_KINDS], weights=[w for _, w in WRONG_KINDS])[0]


def colour_item(rng: random.Random) -> Item:
    fruit = rng.choice(sorted(FRUIT_COLOURS))
    colour = FRUIT_COLOURS[fruit]
    a = _article(fruit)
    question = rng.choice(COLOUR_QUESTIONS).format(a=a, A=a.capitalize(), fruit=fruit)
    answer = f"{a.capitalize()} {fruit} is {colour}."

    def wrong(r: random.Random) -> str:
        kind = _wrong_kind(r)
        if kind == "content":
            return f"{a.capitalize()} {fruit} is {r.choice([c for c in COLOURS if c != colour])}."
        if kind == "refusal":
            return r.choice(REFUSALS)
        words = answer.rstrip(".").split()
        while " ".join(words) == answer.rstrip("."):
            r.shuffle(words)
        return " ".join(words) + "."

    return question, answer, colour, wrong


def echo_item(rng: random.Random) -> Item:
    words = rng.sample(ECHO_WORDS, rng.randint(2, 4))
    answer = " ".join(words)
    question = rng.choice(ECHO_QUESTIONS).format(words=answer)

    def wrong(r: random.Random) -> str:
        kind = _wrong_kind(r)
        if kind == "refusal":
            return r.choice(REFUSALS)
        out = list(words)
        if kind == "content":  # one word swapped for another: only a comparison with the prompt reveals it
            out[r.randrange(len(out))] = r.choice([w for w in ECHO_WORDS if w not in words])
            return " ".join(out)
        return " ".join(w for w in out[::-1] for _ in range(2))  # garbled: reversed and stuttered

    return question, answer, answer, wrong


def random_item(rng: random.Random) -> Item:
    return colour_item(rng) if rng.random() < 0.55 else echo_item(rng)


def _system(rng: random.Random) -> list[Message]:
    system = rng.choice(SYSTEM_PROMPTS)
    return [{"role": "system", "content": system}] if system else []


def _key(messages: list[Message]) -> str:
    """The prompt side of a sample; train and test must never share one."""
    return json.dumps([m for m in messages if m["role"] != "assistant"], sort_keys=True)


def unique(make: Callable[[random.Random], tuple[str, dict]], rng: random.Random, n: int) -> list[dict]:
    """Draw `n` pairwise distinct rows (a prompt may repeat with a different answer pair)."""
    rows: dict[str, dict] = {}
    while len(rows) < n:
        _, row = make(rng)
        rows.setdefault(json.dumps(row, sort_keys=True), row)
    return list(rows.values())


def sft_row(rng: random.Random) -> tuple[str, dict]:
    messages = _system(rng)
    for _ in range(2 if rng.random() < 0.2 else 1):
        question, answer, _, _ = random_item(rng)
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return _key(messages), {"messages": messages}


def prompt_completion_row(rng: random.Random) -> tuple[str, dict]:
    question, answer, _, _ = random_item(rng)
    prompt = [*_system(rng), {"role": "user", "content": question}]
    return _key(prompt), {"prompt": prompt, "completion": [{"role": "assistant", "content": answer}]}


def preference_row(rng: random.Random) -> tuple[str, dict]:
    question, answer, _, wrong = random_item(rng)
    prompt = [*_system(rng), {"role": "user", "content": question}]
    row = {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": answer}],
        "rejected": [{"role": "assistant", "content": wrong(rng)}],
    }
    return _key(prompt), row


def prompt_row(rng: random.Random) -> tuple[str, dict]:
    question, _, short_answer, _ = random_item(rng)
    prompt = [*_system(rng), {"role": "user", "content": question}]
    return _key(prompt), {"prompt": prompt, "answer": short_answer}


def split_disjoint(
    make: Callable[[random.Random], tuple[str, dict]], rng: random.Random, n_train: int, n_test: int
) -> tuple[list[dict], list[dict]]:
    """Draw test rows first, then train rows whose prompt keys are not among the test prompts."""
    test_keys: set[str] = set()

    def make_test(r: random.Random) -> tuple[str, dict]:
        key, row = make(r)
        test_keys.add(key)
        return key, row

    test = unique(make_test, rng, n_test) if n_test else []

    def make_train(r: random.Random) -> tuple[str, dict]:
        while True:
            key, row = make(r)
            if key not in test_keys:
                return key, row

    return unique(make_train, rng, n_train), test


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    logger.info("wrote %s (%d rows)", path, len(rows))


def generate(seed: int) -> Iterator[tuple[str, list[dict]]]:
    """Yield (file name, rows) for every bundled file; one RNG per file keeps files independent."""
    plan = (
        ("sft", sft_row, 800, 100),
        ("sft_prompt_completion", prompt_completion_row, 200, 0),
        ("preference", preference_row, 600, 100),
        ("prompts", prompt_row, 200, 50),
    )
    for offset, (name, make, n_train, n_test) in enumerate(plan):
        train, test = split_disjoint(make, random.Random(seed * 1000 + offset), n_train, n_test)
        yield f"{name}_train.jsonl", train
        if test:
            yield f"{name}_test.jsonl", test


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "dbrx_tune/data/samples")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    for name, rows in generate(args.seed):
        write_jsonl(args.out / name, rows)


if __name__ == "__main__":
    main()
