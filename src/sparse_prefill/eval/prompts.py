"""Building prompts of a target token length: filler text with sentences hidden at given depths."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from ..models import PROMPT_STYLES, chat_prompt, completion_prompt

__all__ = ["Sample", "fill_to_length", "fit_items_to_length", "frame_prompt", "token_count"]


@dataclass(frozen=True)
class Sample:
    """One generation prompt and what a correct answer must contain.

    ``prompt`` is framed in ``prompt_style`` (:func:`frame_prompt`) and ends where the model starts
    answering (after ``answer_prefix`` when a task primes the answer). ``references``: strings the
    answer must contain (scored by :func:`sparse_prefill.eval.scoring.score_answer`). ``length``: the
    requested length; ``n_tokens``: the prompt's real length.
    """

    task: str
    length: int
    index: int
    prompt: str
    n_tokens: int
    references: tuple[str, ...]
    max_new_tokens: int
    meta: dict[str, Any] = field(default_factory=dict)
    prompt_style: str = "chat"

    @property
    def key(self) -> str:
        depth = self.meta.get("depth")
        return f"{self.task}/{self.length}/{self.index}" + ("" if depth is None else f"/d{depth:g}")


def token_count(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False).input_ids)


def frame_prompt(tokenizer: Any, message: str, answer_prefix: str = "", style: str = "chat") -> str:
    """A task's ``message`` (document and question) as the model reads it, ending in ``answer_prefix``.

    ``"chat"``: the message as the user's turn of the tokenizer's chat template, the prefix opening
    the assistant's turn. ``"completion"`` (base models): the message as a document, then a line
    ``Answer: <answer_prefix>`` (:func:`sparse_prefill.models.completion_prompt`).
    """
    if style == "chat":
        return chat_prompt(tokenizer, message) + answer_prefix
    if style == "completion":
        return completion_prompt(tokenizer, message, answer_prefix)
    raise ValueError(f"style must be one of {', '.join(PROMPT_STYLES)}, got style={style!r}")


def fill_to_length(
    tokenizer: Any,
    filler: str,
    length: int,
    make_message: Callable[[str], str],
    inserts: Sequence[tuple[float, str]] = (),
    answer_prefix: str = "",
    style: str = "chat",
) -> tuple[str, int]:
    """A prompt of at most ``length`` tokens: ``make_message(body)`` framed in ``style``
    (:func:`frame_prompt`), where body is the start of ``filler`` with each ``(depth, sentence)`` of
    ``inserts`` placed at that fraction of it, on a sentence boundary. Returns ``(prompt, n_tokens)``;
    the prompt falls short of ``length`` by at most about one sentence of filler.
    """
    fixed = frame_prompt(tokenizer, make_message(" ".join(sentence for _, sentence in inserts)), answer_prefix, style)
    budget = length - token_count(tokenizer, fixed) - 2 * len(inserts)
    if budget < 16:
        raise ValueError(f"length={length} tokens leaves no room for filler after the task's own text")
    # Tokenise only as much filler as can be needed (~8 characters a token at most).
    ids = tokenizer(filler[: 8 * budget + 1000], add_special_tokens=False).input_ids
    if len(ids) < budget:
        raise ValueError(f"length={length} needs {budget} tokens of filler text, which holds only {len(ids)}")
    body = tokenizer.decode(ids[:budget])
    end = max(body.rfind(". "), body.rfind(".\n"))
    body = body[: end + 1] if end > 0 else body
    for depth, sentence in sorted(inserts, key=lambda insert: -insert[0]):  # deepest first: earlier offsets stay valid
        at = _boundary(body, int(depth * len(body)))
        body = f"{body[:at]} {sentence}{body[at:]}" if at else f"{sentence} {body}"
    prompt = frame_prompt(tokenizer, make_message(body), answer_prefix, style)
    return prompt, token_count(tokenizer, prompt)


def _boundary(text: str, at: int) -> int:
    """The end of the sentence that contains offset ``at`` (0 stays 0, past the end is the end)."""
    if at <= 0:
        return 0
    ends = [i for i in (text.find(". ", at - 1), text.find(".\n", at - 1)) if i >= 0]
    return min(ends) + 1 if ends else len(text)


def fit_items_to_length(
    tokenizer: Any, length: int, render: Callable[[int], str], most: int = 1 << 20
) -> tuple[int, str, int]:
    """The largest ``n`` (up to ``most``) whose prompt ``render(n)`` has at most ``length`` tokens.

    For list-shaped tasks (word lists) whose size sets the length. Returns ``(n, prompt, n_tokens)``.
    """
    low, high = 1, most
    first = token_count(tokenizer, render(low))
    if first > length:
        raise ValueError(f"length={length} tokens is too short for this task (its smallest prompt has {first})")
    while low < high:  # binary search on a token count that grows with n
        middle = (low + high + 1) // 2
        if token_count(tokenizer, render(middle)) <= length:
            low = middle
        else:
            high = middle - 1
    prompt = render(low)
    return low, prompt, token_count(tokenizer, prompt)
