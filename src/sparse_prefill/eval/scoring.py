"""Scoring a generated answer against reference strings, as RULER does."""

from __future__ import annotations

from typing import Sequence

__all__ = ["answer_text", "score_answer", "string_match_all"]

# Where a base model, having answered, goes on writing the prompt's own frame: a new question or answer.
_COMPLETION_TURNS = ("\nQuestion:", "\nAnswer:")


def string_match_all(prediction: str, references: Sequence[str]) -> float:
    """Fraction of ``references`` found in ``prediction``, case-insensitively.

    RULER's score for every synthetic task: 1.0 or 0.0 with one reference (a needle, exact match),
    recall with several (all values of a key, all variables of a chain, the most common words).
    """
    if not references:
        raise ValueError("references must hold at least one string")
    text = prediction.lower()
    return sum(reference.lower() in text for reference in references) / len(references)


def answer_text(prediction: str, prompt_style: str = "chat") -> str:
    """The part of a generation that is the answer.

    A chat model ends its turn (an end-of-turn token stops the generation): all of it. A base model
    given a completion-style prompt never ends a turn and, once it has answered, often goes on with
    the frame, writing a new ``Question:`` or ``Answer:`` line: the answer is what comes before it, so
    nothing written after the model's own answer (a second attempt, a made-up next question) scores.
    """
    if prompt_style == "chat":
        return prediction
    if prompt_style != "completion":
        raise ValueError(f"prompt_style must be chat or completion, got prompt_style={prompt_style!r}")
    end = min((at for at in (prediction.find(turn) for turn in _COMPLETION_TURNS) if at >= 0), default=len(prediction))
    return prediction[:end]


def score_answer(prediction: str, references: Sequence[str], prompt_style: str = "chat") -> float:
    """:func:`string_match_all` on the answer part of ``prediction`` (:func:`answer_text`)."""
    return string_match_all(answer_text(prediction, prompt_style), references)
