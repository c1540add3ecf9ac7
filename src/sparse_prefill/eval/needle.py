"""Needle in a haystack: one sentence with a random fact hidden at a depth of a long text."""

from __future__ import annotations

import random
from typing import Any, Sequence

from .prompts import Sample, fill_to_length
from .texts import load_text

__all__ = ["DEFAULT_DEPTHS", "needle_samples"]

DEFAULT_DEPTHS = tuple(i / 10 for i in range(11))  # 0%, 10%, ..., 100% of the haystack


def needle_samples(
    tokenizer: Any,
    lengths: Sequence[int],
    depths: Sequence[float] = DEFAULT_DEPTHS,
    *,
    haystack: str = "pg",
    seed: int = 0,
    style: str = "chat",
) -> list[Sample]:
    """One sample per (length, depth): ``"The secret passphrase is NNNNN."`` with a random five-digit
    number (fixed by ``seed``, length and depth) hidden at ``depth`` of ``haystack``'s first tokens,
    then the question, framed in ``style`` (``"chat"`` or ``"completion"``, see
    :func:`~sparse_prefill.eval.prompts.frame_prompt`). Exact match: the answer must contain the number.
    """
    for depth in depths:
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"depths must lie in [0, 1], got {depth!r}")
    text = load_text(haystack)
    samples = []
    for length in lengths:
        for depth in depths:
            rng = random.Random(f"needle/{seed}/{length}/{depth:g}")
            answer = str(rng.randint(10000, 99999))
            needle = f"The secret passphrase is {answer}."

            def message(body: str) -> str:
                return (
                    f"Read the following text.\n\n{body}\n\nQuestion: What is the secret passphrase mentioned "
                    "in the text above? Answer with the passphrase only."
                )

            # The answer starts primed, so that the few new tokens hold the number, not a preamble.
            prompt, n_tokens = fill_to_length(
                tokenizer, text, length, message, [(depth, needle)], answer_prefix="The secret passphrase is", style=style
            )
            samples.append(
                Sample("needle", length, 0, prompt, n_tokens, (answer,), max_new_tokens=10,
                       meta={"depth": round(depth, 4), "haystack": haystack}, prompt_style=style)
            )
    return samples
