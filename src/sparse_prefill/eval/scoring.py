"""Scoring a generated answer against reference strings, as RULER does."""

from __future__ import annotations

from typing import Sequence

__all__ = ["string_match_all"]


def string_match_all(prediction: str, references: Sequence[str]) -> float:
    """Fraction of ``references`` found in ``prediction``, case-insensitively.

    RULER's score for every synthetic task: 1.0 or 0.0 with one reference (a needle, exact match),
    recall with several (all values of a key, all variables of a chain, the most common words).
    """
    if not references:
        raise ValueError("references must hold at least one string")
    text = prediction.lower()
    return sum(reference.lower() in text for reference in references) / len(references)
