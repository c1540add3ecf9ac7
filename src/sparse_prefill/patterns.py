"""Sparse attention patterns and the per-(layer, head) configuration that assigns them.

A pattern is a small frozen dataclass holding a budget; it lives with the rest of its kind (kept
set, estimator, the GPU plan's share, cost) in :mod:`sparse_prefill.kinds`, and what it keeps for
a given input is defined in docs/semantics.md. This module re-exports the patterns.

``PatternConfig`` maps every (layer, query head) of a model to one pattern and round-trips through
JSON. Its budgets may be stated for a reference length with a rule that scales them to the prompt
(:meth:`PatternConfig.layer_at`). :meth:`PatternConfig.from_minference` reads the reference
implementation's published format.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

from .kinds import PATTERN_TYPES, AShape, BlockCoverage, BlockSparse, Dense, Pattern, VerticalSlash
from .kinds.common import check_positive_int as _check_positive_int

__all__ = [
    "AShape",
    "VerticalSlash",
    "BlockSparse",
    "BlockCoverage",
    "Dense",
    "Pattern",
    "PatternConfig",
    "SCALING_RULES",
    "pattern_from_dict",
    "scale_pattern",
]

CONFIG_FORMAT = "sparse-prefill/pattern-config"
CONFIG_VERSION = 1


# How a config's budgets follow the prompt length. "fixed": the same token counts at every length
# (the share of pairs kept falls as 1/length). "proportional": counts grow with the length (the
# share stays what it was at the reference length).
SCALING_RULES = ("fixed", "proportional")


def scale_pattern(pattern: Pattern, factor: float) -> Pattern:
    """``pattern`` with its length-like budgets multiplied by ``factor`` (rounded, at least 1).

    Scaled: ``AShape.local``, ``VerticalSlash.vertical`` and ``slash``, ``BlockSparse.top_k``. Not
    scaled: ``AShape.sink`` (the sink tokens are the first few of any prompt), ``last_q``, and
    Block-Coverage (its budget is a share of each row's mass, which follows the prompt by itself).
    """
    if not (isinstance(factor, (int, float)) and not isinstance(factor, bool) and 0 < factor < math.inf):
        raise ValueError(f"factor must be a positive finite number, got factor={factor!r}")
    return check_is_pattern(pattern).scaled(factor)


def pattern_from_dict(data: Any, where: str = "pattern") -> Pattern:
    """Build a pattern from its ``to_dict()`` form, e.g. ``{"type": "a_shape", "sink": 4, "local": 1024}``."""
    if not isinstance(data, Mapping) or "type" not in data:
        raise ValueError(f"{where} must be an object with a 'type' key, got {data!r}")
    kind = data["type"]
    if kind not in PATTERN_TYPES:
        raise ValueError(f"{where}: unknown pattern type {kind!r}; expected one of {sorted(PATTERN_TYPES)}")
    fields = {key: value for key, value in data.items() if key != "type"}
    try:
        return PATTERN_TYPES[kind](**fields)
    except TypeError as error:
        # Unknown or missing fields arrive as TypeError from the dataclass constructor.
        raise ValueError(f"{where}: bad fields for {kind!r}: {error}") from error


def check_is_pattern(value: Any, where: str = "pattern") -> Pattern:
    if not isinstance(value, tuple(PATTERN_TYPES.values())):
        raise TypeError(
            f"{where} must be one of {', '.join(cls.__name__ for cls in PATTERN_TYPES.values())}, "
            f"got {type(value).__name__}"
        )
    return value


# The reference implementation's names, and how its (v, s) pair maps onto our patterns.
_MINFERENCE_NAMES = {
    "vertical_and_slash": lambda v, s: VerticalSlash(vertical=v, slash=s),
    "stream_llm": lambda v, s: AShape(sink=v, local=s),
    "block_sparse": lambda v, s: BlockSparse(top_k=v),
}


@dataclass(frozen=True)
class PatternConfig:
    """One pattern per (layer, query head) of a model.

    ``layers[l][h]`` is the pattern of query head ``h`` in layer ``l``; every layer has the same
    number of heads. ``metadata`` is free-form JSON (model name, search settings, per-head recall).

    ``reference_length`` (tokens) and ``scaling`` (one of :data:`SCALING_RULES`) say how the budgets
    follow the prompt: with ``"proportional"`` they are stated for ``reference_length`` tokens and
    multiplied by ``min(seq_len, scaling_limit) / reference_length`` (``scaling_limit`` None: no
    limit; beyond the limit they stay fixed); with ``"fixed"`` (the default) they are used as they
    are. :meth:`layer_at` applies the rule.
    """

    layers: tuple[tuple[Pattern, ...], ...]
    metadata: Mapping[str, Any] = field(default_factory=dict)
    reference_length: int | None = None
    scaling: str = "fixed"
    scaling_limit: int | None = None

    def __post_init__(self) -> None:
        if self.scaling not in SCALING_RULES:
            raise ValueError(f"PatternConfig.scaling must be one of {SCALING_RULES}, got scaling={self.scaling!r}")
        if self.reference_length is not None:
            _check_positive_int("PatternConfig", "reference_length", self.reference_length)
        elif self.scaling == "proportional":
            raise ValueError("PatternConfig.scaling='proportional' needs reference_length (the length the budgets are for)")
        if self.scaling_limit is not None:
            _check_positive_int("PatternConfig", "scaling_limit", self.scaling_limit)
            if self.scaling != "proportional":
                raise ValueError(f"PatternConfig.scaling_limit applies to scaling='proportional', got scaling={self.scaling!r}")
        layers = tuple(tuple(heads) for heads in self.layers)
        if not layers:
            raise ValueError("PatternConfig.layers must hold at least one layer, got 0 layers")
        n_heads = len(layers[0])
        for index, heads in enumerate(layers):
            if len(heads) != n_heads or n_heads == 0:
                raise ValueError(
                    f"PatternConfig.layers: every layer needs the same, non-zero number of heads; "
                    f"layer 0 has {n_heads}, layer {index} has {len(heads)}"
                )
            for head, pattern in enumerate(heads):
                check_is_pattern(pattern, f"PatternConfig.layers[{index}][{head}]")
        if not isinstance(self.metadata, Mapping):
            raise TypeError(
                f"PatternConfig.metadata must be a mapping (a JSON object), got {type(self.metadata).__name__}"
            )
        object.__setattr__(self, "layers", layers)
        object.__setattr__(self, "metadata", dict(self.metadata))

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def uniform(cls, n_layers: int, n_heads: int, pattern: Pattern, **metadata: Any) -> "PatternConfig":
        """The same pattern on every head of every layer."""
        _check_positive_int("PatternConfig.uniform", "n_layers", n_layers)
        _check_positive_int("PatternConfig.uniform", "n_heads", n_heads)
        check_is_pattern(pattern)
        return cls(tuple((pattern,) * n_heads for _ in range(n_layers)), metadata)

    # --- access -------------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def n_heads(self) -> int:
        return len(self.layers[0])

    def __getitem__(self, key: tuple[int, int]) -> Pattern:
        layer, head = key
        return self.layers[layer][head]

    def layer(self, index: int) -> tuple[Pattern, ...]:
        return self.layers[index]

    def layer_at(self, index: int, seq_len: int) -> tuple[Pattern, ...]:
        """Layer ``index``'s patterns for a prompt of ``seq_len`` tokens, budgets scaled by the rule."""
        _check_positive_int("PatternConfig.layer_at", "seq_len", seq_len)
        if self.scaling == "fixed" or seq_len == self.reference_length:
            return self.layers[index]
        factor = min(seq_len, self.scaling_limit or seq_len) / self.reference_length
        return tuple(scale_pattern(pattern, factor) for pattern in self.layers[index])

    def at_length(self, seq_len: int) -> "PatternConfig":
        """The whole config with budgets scaled to ``seq_len`` tokens (rule ``"fixed"`` from then on)."""
        layers = tuple(self.layer_at(index, seq_len) for index in range(self.n_layers))
        return PatternConfig(layers, self.metadata, reference_length=seq_len, scaling="fixed")

    def __iter__(self) -> Iterator[tuple[Pattern, ...]]:
        return iter(self.layers)

    def check_model(self, n_layers: int, n_heads: int) -> None:
        """Raise ``ValueError`` unless this config was made for a model of this shape."""
        if (self.n_layers, self.n_heads) != (n_layers, n_heads):
            raise ValueError(
                f"pattern config is for {self.n_layers} layers x {self.n_heads} query heads, "
                f"but the model has {n_layers} layers x {n_heads} query heads"
            )

    # --- JSON ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = {
            "format": CONFIG_FORMAT,
            "version": CONFIG_VERSION,
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "layers": [[pattern.to_dict() for pattern in heads] for heads in self.layers],
            "metadata": self.metadata,
        }
        # Optional key: files without it (all files written before it existed) mean "fixed".
        if self.reference_length is not None:
            data["scaling"] = {"rule": self.scaling, "reference_length": self.reference_length}
            if self.scaling_limit is not None:
                data["scaling"]["limit"] = self.scaling_limit
        return data

    @classmethod
    def from_dict(cls, data: Any) -> "PatternConfig":
        if not isinstance(data, Mapping):
            raise ValueError(f"pattern config must be a JSON object, got {type(data).__name__}")
        if data.get("format") != CONFIG_FORMAT:
            raise ValueError(
                f"pattern config 'format' must be {CONFIG_FORMAT!r}, got {data.get('format')!r} "
                "(use PatternConfig.from_minference for the reference implementation's files)"
            )
        if data.get("version") != CONFIG_VERSION:
            raise ValueError(f"pattern config 'version' must be {CONFIG_VERSION}, got {data.get('version')!r}")
        layers = data.get("layers")
        if not isinstance(layers, list) or not all(isinstance(heads, list) for heads in layers):
            raise ValueError("pattern config 'layers' must be a list of lists of patterns")
        metadata = data.get("metadata", {})
        if metadata is None:
            metadata = {}
        if not isinstance(metadata, Mapping):
            raise ValueError(f"pattern config 'metadata' must be a JSON object, got {type(metadata).__name__}: {metadata!r:.80}")
        scaling = data.get("scaling", {"rule": "fixed", "reference_length": None})
        if not isinstance(scaling, Mapping) or not {"rule", "reference_length"} <= set(scaling) <= {
            "rule", "reference_length", "limit"
        }:
            raise ValueError(
                "pattern config 'scaling' must be an object {\"rule\": \"fixed\"|\"proportional\", "
                f"\"reference_length\": tokens, optional \"limit\": tokens}}, got {scaling!r}"
            )
        config = cls(
            tuple(
                tuple(pattern_from_dict(p, f"layers[{l}][{h}]") for h, p in enumerate(heads))
                for l, heads in enumerate(layers)
            ),
            metadata,
            reference_length=scaling["reference_length"],
            scaling=scaling["rule"],
            scaling_limit=scaling.get("limit"),
        )
        declared = (data.get("n_layers"), data.get("n_heads"))
        if declared != (config.n_layers, config.n_heads):
            raise ValueError(
                f"pattern config declares n_layers, n_heads = {declared} but holds "
                f"{config.n_layers} layers x {config.n_heads} heads"
            )
        return config

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(self.to_dict(), handle, indent=1)
            handle.write("\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PatternConfig":
        """Load our JSON format, or the reference implementation's (a JSON list of layers)."""
        data = _read_json(path)
        if isinstance(data, list):
            return cls.from_minference(data)
        return cls.from_dict(data)

    @classmethod
    def from_minference(cls, data: Any) -> "PatternConfig":
        """Read the reference implementation's format.

        ``data`` is a path or the parsed JSON: a list with one object per layer, each mapping the
        head index as a string to ``[name, v, s, score]``. Names: ``vertical_and_slash``
        (v verticals, s slashes), ``stream_llm`` (v sink, s local) and ``block_sparse`` (v blocks).
        The score is kept in ``metadata["scores"]``.
        """
        if isinstance(data, (str, os.PathLike)):
            data = _read_json(data)
        if not isinstance(data, list) or not data:
            raise ValueError("MInference config must be a non-empty JSON list with one object per layer")
        layers, scores = [], []
        for l, layer in enumerate(data):
            if not isinstance(layer, Mapping) or not layer:
                raise ValueError(f"MInference config layer {l} must be a non-empty object mapping head -> entry")
            try:
                heads = sorted(int(key) for key in layer)
            except ValueError:
                raise ValueError(f"MInference config layer {l}: head keys must be integers as strings, got {list(layer)}")
            if heads != list(range(len(heads))):
                raise ValueError(f"MInference config layer {l}: heads must be numbered 0..{len(heads) - 1}, got {heads}")
            patterns, layer_scores = [], []
            for h in heads:
                entry = layer[str(h)]
                if not (isinstance(entry, list) and len(entry) == 4):
                    raise ValueError(f"MInference config layer {l} head {h}: expected [name, v, s, score], got {entry!r}")
                name, v, s, score = entry
                if name not in _MINFERENCE_NAMES:
                    raise ValueError(
                        f"MInference config layer {l} head {h}: unknown pattern {name!r}; "
                        f"expected one of {sorted(_MINFERENCE_NAMES)}"
                    )
                if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and float(x) == int(x) for x in (v, s)):
                    raise ValueError(f"MInference config layer {l} head {h}: v and s must be whole numbers, got {v!r}, {s!r}")
                if not isinstance(score, (int, float)) or not math.isfinite(score):
                    raise ValueError(f"MInference config layer {l} head {h}: score must be a finite number, got {score!r}")
                patterns.append(_MINFERENCE_NAMES[name](int(v), int(s)))
                layer_scores.append(float(score))
            layers.append(tuple(patterns))
            scores.append(layer_scores)
        return cls(tuple(layers), {"source": "minference", "scores": scores})


def _read_json(path: str | os.PathLike) -> Any:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"pattern config path must be a str or path, got {type(path).__name__}")
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise ValueError(f"pattern config file not found: {os.fspath(path)!r}") from None
    except IsADirectoryError:
        raise ValueError(f"pattern config {os.fspath(path)!r} is a directory; expected a JSON file") from None
    except UnicodeDecodeError as error:
        raise ValueError(
            f"pattern config {os.fspath(path)!r} is not UTF-8 JSON text (byte {error.object[error.start]:#04x} at "
            f"offset {error.start})"
        ) from None
    except OSError as error:
        raise ValueError(f"cannot read pattern config {os.fspath(path)!r}: {error.strerror or error}") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"pattern config {os.fspath(path)!r} is not valid JSON: {error}") from error
