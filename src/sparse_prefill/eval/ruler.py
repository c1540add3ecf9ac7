"""RULER-style synthetic tasks, generated offline from fixed seeds.

Seven of RULER's tasks (Hsieh et al., 2024), in our own wording:

- ``niah_single``: one key-value fact in a haystack; give the value.
- ``niah_multikey``: four facts with different keys (three distractors); give one key's value.
- ``niah_multivalue``: four values of one key; give them all.
- ``niah_multiquery``: four facts; give the values of all four keys.
- ``vt`` (variable tracking): a chain ``VAR A = 12345, VAR B = VAR A, ...`` hidden in repeated
  filler sentences; name every variable that holds the value.
- ``cwe`` (common words): a numbered word list where ten words repeat often; name those ten.
- ``fwe`` (frequent words): a text of coded words drawn from a Zipf law (exponent 2); name the
  three most frequent.

Keys are adjective-noun pairs and the word lists come from ``wonderwords``; values are seven-digit
numbers. Every task is scored by :func:`~sparse_prefill.eval.scoring.score_answer`, as in RULER:
exact match with one reference, recall with several. Prompts are chat- or completion-style
(:func:`~sparse_prefill.eval.prompts.frame_prompt`): the same message and answer prefix either way.
"""

from __future__ import annotations

import importlib.resources
import random
import string
from typing import Any, Callable, Sequence

from .prompts import Sample, fill_to_length, fit_items_to_length, frame_prompt
from .texts import load_text

__all__ = ["TASKS", "ruler_samples"]

TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe")
_FACTS = 4  # needles in the multi-key/value/query tasks
_CHAIN = 5  # variables in the variable-tracking chain (four hops)
_VT_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def _words(kind: str) -> list[str]:
    try:
        assets = importlib.resources.files("wonderwords") / "assets"
    except ModuleNotFoundError as error:
        raise RuntimeError("RULER-style tasks need the wonderwords package: pip install 'sparse-prefill[eval]'") from error
    words = (assets / f"{kind}list.txt").read_text(encoding="utf-8").split()
    return sorted({w.lower() for w in words if w.isalpha()})


def _keys(rng: random.Random, n: int) -> list[str]:
    adjectives, nouns = _words("adjective"), _words("noun")
    keys: list[str] = []
    while len(keys) < n:
        key = f"{rng.choice(adjectives)}-{rng.choice(nouns)}"
        if key not in keys:
            keys.append(key)
    return keys


def _value(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def _fact(key: str, value: str) -> str:
    return f"The special code for {key} is {value}."


def _niah(task: str, rng: random.Random) -> tuple[list[str], str, str, tuple[str, ...], int]:
    """(facts to hide, question, answer prefix, references, max_new_tokens) of one needle task."""
    if task == "niah_single":
        key, value = _keys(rng, 1)[0], _value(rng)
        question = f"What is the special code for {key}? Answer with the number only."
        return [_fact(key, value)], question, f"The special code for {key} is", (value,), 12
    if task == "niah_multikey":
        keys = _keys(rng, _FACTS)
        values = [_value(rng) for _ in keys]
        asked = rng.randrange(_FACTS)
        question = f"What is the special code for {keys[asked]}? Answer with the number only."
        return [_fact(k, v) for k, v in zip(keys, values)], question, f"The special code for {keys[asked]} is", (values[asked],), 12
    if task == "niah_multivalue":
        key = _keys(rng, 1)[0]
        values = [_value(rng) for _ in range(_FACTS)]
        question = f"The text gives {_FACTS} special codes for {key}. List all of them, numbers only."
        return [_fact(key, v) for v in values], question, f"The special codes for {key} are:", tuple(values), 48
    keys = _keys(rng, _FACTS)  # niah_multiquery
    values = [_value(rng) for _ in keys]
    question = f"What are the special codes for {', '.join(keys[:-1])} and {keys[-1]}? List the numbers only."
    return [_fact(k, v) for k, v in zip(keys, values)], question, "The special codes are:", tuple(values), 48


def _variable_tracking(tokenizer: Any, length: int, rng: random.Random, style: str) -> tuple[str, int, tuple[str, ...], int]:
    names: list[str] = []
    while len(names) < _CHAIN:
        name = "".join(rng.choices(string.ascii_uppercase, k=5))
        if name not in names:
            names.append(name)
    value = str(rng.randint(10000, 99999))
    chain = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
    depths = sorted(rng.uniform(0.05, 0.95) for _ in chain)  # in order: each assignment after the one it uses
    filler = _VT_FILLER * (8 * length // len(_VT_FILLER) + 16)

    def message(body: str) -> str:
        return (
            "Memorize every variable assignment in the text below; some variables copy others.\n\n"
            f"{body}\n\nQuestion: Which variables hold the value {value}, directly or through other variables? "
            "List all of their names."
        )

    prompt, n_tokens = fill_to_length(tokenizer, filler, length, message, list(zip(depths, chain)),
                                      answer_prefix=f"The variables that hold {value} are:", style=style)
    return prompt, n_tokens, tuple(names), 32


def _common_words(tokenizer: Any, length: int, rng: random.Random, style: str) -> tuple[str, int, tuple[str, ...], int]:
    nouns = _words("noun")
    rng.shuffle(nouns)
    common, rare = nouns[:10], nouns[10:]
    # Repeats shrink with length so that the ten still stand out in a short list.
    common_times, rare_times = (30, 3) if length >= 8192 else (10, 2) if length >= 4096 else (5, 1)
    base = rng.random()

    def render(n_rare: int) -> str:
        words = common * common_times + rare[:n_rare] * rare_times
        random.Random(f"{base}/{n_rare}").shuffle(words)  # the same n, the same list: the length search needs it
        listing = "\n".join(f"{i + 1}. {word}" for i, word in enumerate(words))
        return frame_prompt(tokenizer, (
            f"Below is a numbered list of words. Ten of them appear more often than the rest.\n\n{listing}\n\n"
            "Question: Which ten words appear most often in the list above?"
        ), "The ten most frequent words are:", style)

    _, prompt, n_tokens = fit_items_to_length(tokenizer, length, render, most=len(rare))
    return prompt, n_tokens, tuple(common), 64


def _frequent_words(tokenizer: Any, length: int, rng: random.Random, style: str) -> tuple[str, int, tuple[str, ...], int]:
    vocabulary: list[str] = []
    while len(vocabulary) < 1000:
        word = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 6)))
        if word not in vocabulary:
            vocabulary.append(word)
    weights = [1.0 / (rank + 1) ** 2 for rank in range(len(vocabulary))]  # Zipf, exponent 2
    stream = rng.choices(vocabulary, weights=weights, k=4 * length)

    def render(n: int) -> str:
        return frame_prompt(tokenizer, (
            "Below is a text of coded words. Keep count of how often each coded word appears.\n\n"
            f"{' '.join(stream[:n])}\n\nQuestion: Which three coded words appear most often in the text above?"
        ), "The three most frequent coded words are:", style)

    n, prompt, n_tokens = fit_items_to_length(tokenizer, length, render, most=len(stream))
    counts: dict[str, int] = {}
    for word in stream[:n]:
        counts[word] = counts.get(word, 0) + 1
    top = sorted(counts, key=lambda word: -counts[word])[:3]
    return prompt, n_tokens, tuple(top), 24


def ruler_samples(
    tokenizer: Any,
    lengths: Sequence[int],
    tasks: Sequence[str] = TASKS,
    *,
    samples: int = 10,
    haystack: str = "pg",
    seed: int = 0,
    style: str = "chat",
) -> list[Sample]:
    """``samples`` prompts per (task, length), framed in ``style`` (``"chat"`` or ``"completion"``); the
    needle tasks hide their facts in ``haystack``."""
    unknown = [task for task in tasks if task not in TASKS]
    if unknown:
        raise ValueError(f"unknown RULER task(s) {', '.join(unknown)}; expected some of {', '.join(TASKS)}")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be a positive int, got samples={samples!r}")
    text = load_text(haystack) if any(task.startswith("niah") for task in tasks) else ""
    builders: dict[str, Callable[[Any, int, random.Random, str], tuple[str, int, tuple[str, ...], int]]] = {
        "vt": _variable_tracking, "cwe": _common_words, "fwe": _frequent_words,
    }
    out = []
    for task in tasks:
        for length in lengths:
            for index in range(samples):
                rng = random.Random(f"ruler/{task}/{seed}/{length}/{index}")
                if task in builders:
                    prompt, n_tokens, references, new_tokens = builders[task](tokenizer, length, rng, style)
                else:
                    facts, question, prefix, references, new_tokens = _niah(task, rng)
                    depths = [rng.uniform(0.0, 1.0) for _ in facts]

                    def message(body: str, question: str = question) -> str:
                        return f"Read the following text.\n\n{body}\n\nQuestion: {question}"

                    prompt, n_tokens = fill_to_length(
                        tokenizer, text, length, message, list(zip(depths, facts)), answer_prefix=prefix, style=style
                    )
                out.append(Sample(task, length, index, prompt, n_tokens, references, new_tokens, prompt_style=style))
    return out
