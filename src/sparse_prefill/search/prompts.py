"""Calibration prompts for the search: natural text and synthetic retrieval, exactly ``n_tokens`` long.

Heads behave differently on prose and on prompts that make the model look far back for one fact,
so the search sees both, in turn (prompt ``i`` is of kind ``KINDS[i % 3]``):

- ``text``: a window of the calibration text, starting at a different place for every prompt;
- ``needle``: the same kind of window with one sentence planted at a random depth
  ("The secret passphrase is 48213.") and a question about it at the end, in the chat template;
- ``kv``: RULER-style key-value retrieval: lines "The value of key amber-river is 73120.", then a
  question about one of the keys, in the chat template.

Every prompt is built from its index and a seed alone, so an interrupted search rebuilds exactly the
prompts it still needs. Nothing is downloaded: the text is whatever the caller passes (by default
the King James Bible from Debian's ``bible`` command when installed, else the excerpt shipped in
``sparse_prefill/data``).
"""

from __future__ import annotations

import random
import re
import shutil
import subprocess
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["KINDS", "CalibrationPrompt", "calibration_prompt", "default_corpus"]

KINDS = ("text", "needle", "kv")
_GOLDEN = 0.6180339887498949  # spreads window starts evenly over the text for any number of prompts
_CHARS_PER_TOKEN = 8  # generous: English BPE averages ~4 characters a token
_MARKER = "\u0000BODY\u0000"


@dataclass(frozen=True)
class CalibrationPrompt:
    """``input_ids`` long [1, n_tokens]; ``kind`` one of :data:`KINDS`; ``description`` for logs."""

    kind: str
    input_ids: torch.Tensor
    description: str


def default_corpus() -> tuple[str, str]:
    """``(text, name)``: the whole King James Bible via Debian's ``bible`` command, else the shipped excerpt."""
    if shutil.which("bible") is not None:
        out = subprocess.run(["bible", "-f", "Genesis1:1-Revelation22:21"], capture_output=True, text=True, check=True).stdout
        # `bible -f` prints "Ge1:1 In the beginning ..." per verse; keep the verse text.
        text = " ".join(re.sub(r"^\S+\d+:\d+ ", "", line).strip() for line in out.splitlines() if line.strip())
        if len(text) > 100_000:
            return text, "King James Bible (Debian bible-kjv)"
    from ..models import kjv_text

    return kjv_text(), "Genesis 37-43, King James Version (sparse_prefill/data)"


def _ids(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def _window(tokenizer: Any, corpus: str, n_tokens: int, fraction: float) -> list[int]:
    """``n_tokens`` token ids of ``corpus`` starting near ``fraction`` of the way through it."""
    if n_tokens <= 0:
        return []
    span = n_tokens * _CHARS_PER_TOKEN
    start = int(fraction * max(0, len(corpus) - span))
    start = corpus.find(" ", start) + 1 if start > 0 else 0  # begin on a word
    ids = _ids(tokenizer, corpus[start : start + span])
    if len(ids) < n_tokens:
        ids = _ids(tokenizer, corpus)
        if len(ids) < n_tokens:
            raise ValueError(f"the calibration text holds {len(ids)} tokens, fewer than the {n_tokens} a prompt needs; "
                             "pass a longer text (--text FILE)")
        first = int(fraction * (len(ids) - n_tokens))
        ids = ids[first:]
    return ids[:n_tokens]


def _framed(tokenizer: Any, instruction: str, question: str) -> tuple[list[int], list[int]]:
    """Token ids before and after the body of a chat-formatted user message."""
    from ..models import chat_prompt

    frame = chat_prompt(tokenizer, f"{instruction}{_MARKER}{question}")
    before, after = frame.split(_MARKER)
    return _ids(tokenizer, before), _ids(tokenizer, after)


def calibration_prompt(tokenizer: Any, corpus: str, n_tokens: int, index: int, seed: int = 0) -> CalibrationPrompt:
    """The ``index``-th calibration prompt: exactly ``n_tokens`` tokens, of kind ``KINDS[index % 3]``."""
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < 256:
        raise ValueError(f"n_tokens must be an int >= 256, got n_tokens={n_tokens!r}")
    kind = KINDS[index % len(KINDS)]
    rng = random.Random(seed * 1_000_003 + index)
    fraction = ((index + 1) * _GOLDEN + seed * 0.1) % 1.0
    if kind == "text":
        ids = _window(tokenizer, corpus, n_tokens, fraction)
        description = f"text window at {fraction:.0%} of the calibration text"
    elif kind == "needle":
        answer = str(rng.randrange(10_000, 100_000))
        depth = rng.random()
        before, after = _framed(
            tokenizer, "Read the following text.\n\n",
            "\n\nQuestion: What is the secret passphrase mentioned in the text above? Answer with the passphrase only.",
        )
        needle = _ids(tokenizer, f" The secret passphrase is {answer}. ")
        room = n_tokens - len(before) - len(after) - len(needle)
        haystack = _window(tokenizer, corpus, room, fraction)
        at = int(depth * len(haystack))
        ids = before + haystack[:at] + needle + haystack[at:] + after
        description = f"needle {answer} at depth {depth:.0%}"
    else:
        words = sorted({w.lower() for w in re.findall(r"[A-Za-z]{4,}", corpus[:200_000])})
        if len(words) < 20:
            raise ValueError("the calibration text needs at least 20 distinct words of 4+ letters for key-value prompts")
        lines, keys = [], []
        # Each line is about 16 tokens; make enough to fill the room, then keep the ones that fit.
        for _ in range(n_tokens // 8 + 8):
            key = f"{rng.choice(words)}-{rng.choice(words)}"
            lines.append(_ids(tokenizer, f"The value of key {key} is {rng.randrange(10_000, 100_000)}.\n"))
            keys.append(key)
        ends = [0]
        for line in lines:
            ends.append(ends[-1] + len(line))
        probe = rng.randrange(len(lines))
        for _ in range(8):  # the question's length moves the cut: ask about a key that survives it
            before, after = _framed(
                tokenizer, "Below is a list of keys and their values. Remember them.\n\n",
                f"\nQuestion: What is the value of key {keys[probe]}? Answer with the number only.",
            )
            room = n_tokens - len(before) - len(after)
            fitting = sum(end <= room for end in ends[1:])
            if probe < fitting:
                break
            probe = rng.randrange(max(fitting, 1))
        body = [token for line in lines for token in line]
        ids = before + body[:room] + after
        description = f"key-value retrieval of {keys[probe]} among {fitting} keys"
    if len(ids) != n_tokens:
        raise ValueError(f"n_tokens={n_tokens} leaves no room for the body of a {kind} prompt")
    return CalibrationPrompt(kind, torch.tensor([ids], dtype=torch.long), description)
