"""The search: calibration prompts through the model, every head's candidates scored, one budget shared.

For each calibration prompt the model runs densely; at every searched layer an attention function
registered with transformers (its public ``AttentionInterface``) receives the post-RoPE Q/K, scores
the whole candidate grid on them (:func:`~sparse_prefill.search.candidates.score_grid`) and hands
the call to transformers' SDPA; the forward stops after the last layer still needed. Scores are
summed per layer into ``<work dir>/layer-NN.json`` after every layer, so an interrupted search picks
up where it stopped: per layer and prompt, nothing is computed twice.

When every prompt is in, the candidates' mean recall and mean cost decide: every head gets the
candidate that buys the most recall under one shared cost budget. The recall that counts mixes the
mean over all query rows with the mean over the last 256 (``last_weight``): the end of a prompt is
where a question is asked, and a head that retrieves from far back can keep most of its mass over
all rows while losing what the last rows read
(:func:`~sparse_prefill.search.allocate.allocate`). Cost is what the GPU kernel computes, in units
of the causal pairs of one head: 64 x 64 per tile plus ``COLUMN_PAIR_COST`` per gathered-column
pair. The default budget is what the uniform default pattern
(MInference's budget, :func:`sparse_prefill.kinds.vertical_slash.minference_budget`) costs on the same prompts, so
the result compares with it at equal cost.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..checks import check_device, check_writable_directory
from ..configs import model_signature
from ..patterns import SCALING_RULES, Pattern, PatternConfig, VerticalSlash
from .allocate import allocate
from .candidates import CandidateGrid, score_grid
from .prompts import KINDS, calibration_prompt, default_corpus
from .stats import BLOCK, COLUMN_PAIR_COST, causal_pairs

__all__ = ["SearchResult", "search", "run_layers", "model_signature"]

WORK_FORMAT = "sparse-prefill/search-work-2"  # 2: recall over the last rows too
SEARCH_ATTENTION = "sparse_prefill_search"


class _StopForward(Exception):
    """Raised inside the last needed layer: the rest of the forward is not needed."""


def run_layers(model: Any, input_ids: torch.Tensor, layers: Sequence[int],
               on_layer: Callable[[int, torch.Tensor, torch.Tensor, float], None]) -> None:
    """Run ``model`` on ``input_ids`` [1, n] and call ``on_layer(layer, q, k, scale)`` at each of ``layers``.

    ``q`` [q_heads, n, head_dim] and ``k`` [kv_heads, n, head_dim] are what the attention receives
    (after RoPE, K not repeated). The forward stops once the last of ``layers`` has been seen.
    """
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    wanted = set(layers)
    last = max(wanted)

    def attention(module, query, key, value, attention_mask, **kwargs):
        if module.layer_idx in wanted:
            scale = kwargs.get("scaling") or query.shape[-1] ** -0.5
            on_layer(module.layer_idx, query[0], key[0], float(scale))
            if module.layer_idx == last:
                raise _StopForward
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(SEARCH_ATTENTION, attention)
    AttentionMaskInterface.register(SEARCH_ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    previous = model.config._attn_implementation
    model.set_attn_implementation(SEARCH_ATTENTION)
    try:
        with torch.no_grad():
            model(input_ids, use_cache=False, logits_to_keep=1)
    except _StopForward:
        pass
    finally:
        model.set_attn_implementation(previous)


@dataclass
class SearchResult:
    """What :func:`search` returns: the config and where it and its heatmap were written."""

    config: PatternConfig
    config_path: Path
    plot_path: Path | None
    summary: dict


def _write_json(path: Path, data: Any) -> None:
    # Write then rename: an interruption never leaves a half-written file behind.
    temporary = path.with_suffix(path.suffix + ".tmp")
    temporary.write_text(json.dumps(data))
    os.replace(temporary, path)


def _progress(total: int, initial: int, enabled: bool):
    if not enabled:
        return contextlib.nullcontext(None)
    try:
        from tqdm import tqdm
    except ImportError:
        return contextlib.nullcontext(None)
    return tqdm(total=total, initial=initial, desc="search", unit="layer-prompt", file=sys.stderr)


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {name}={value!r}")
    return value


def check_out(out: str | os.PathLike, work_dir: str | os.PathLike | None = None,
              names: tuple[str, str] = ("out", "work_dir")) -> tuple[Path, Path]:
    """``out`` as a file path and the work directory, both proven writable; ``ValueError`` naming ``names``.

    Checked before the search runs: a directory as ``out`` (``--out /tmp``) failed only when the
    config was written after the whole search, and its work directory ``/tmp.parts`` landed at the
    filesystem root.
    """
    out = Path(out)
    if out.is_dir() or out.name in ("", ".", ".."):
        raise ValueError(f"{names[0]} {os.fspath(out)!r} is a directory; give the config file to write, e.g. "
                         f"{os.path.join(os.fspath(out), 'patterns.json')!r}")
    work = Path(work_dir) if work_dir is not None else out.with_name(out.name + ".parts")
    check_writable_directory(out.parent, names[0])
    check_writable_directory(work, names[1])
    return out, work


def search(
    model: Any = "default",
    out: str | os.PathLike = "patterns.json",
    *,
    samples: int = 8,
    length: int = 8192,
    budget_flops: float | None = None,
    target_density: float | None = None,
    scaling: str = "proportional",
    scaling_limit: int | None | str = "uniform",
    layers: Sequence[int] | None = None,
    text: str | None = None,
    text_name: str | None = None,
    seed: int = 0,
    grid: CandidateGrid | None = None,
    column_pair_cost: float = COLUMN_PAIR_COST,
    last_weight: float = 0.5,
    device: str | torch.device | None = None,
    work_dir: str | os.PathLike | None = None,
    progress: bool = True,
    plot: bool = True,
) -> SearchResult:
    """Search every head's pattern and budget for ``model``; write the config JSON and its heatmap PNG.

    Parameters
    ----------
    model : str, path or LoadedModel
        ``"default"`` (SmolLM2-135M-Instruct), a GGUF file or transformers directory, or a model
        already loaded with :func:`sparse_prefill.models.load_model`.
    out : path
        The config JSON; the heatmap goes next to it with the suffix ``.png``, and the per-layer
        work (what makes the search resumable) in ``<out>.parts/`` unless ``work_dir`` is given.
    samples : int
        Calibration prompts (>= 1), of the kinds in :data:`~sparse_prefill.search.prompts.KINDS` in turn.
    length : int
        Tokens per prompt, the config's reference length: a multiple of 64, at least 256, at most
        the model's context.
    budget_flops, target_density : float, optional
        At most one. The attention FLOPs (4 x head_dim per computed pair, gathered-column pairs
        weighted by ``COLUMN_PAIR_COST``) of one prompt of ``length`` tokens over all searched
        heads; or the mean share of the causal pairs a head may compute. Neither: the cost of the
        uniform default pattern on the same prompts.
    scaling : "fixed" or "proportional"
        How the written config's budgets follow prompts of other lengths (see ``PatternConfig``).
    scaling_limit : int, None or "uniform"
        With ``"proportional"``: the length beyond which budgets stop growing. ``"uniform"`` (the
        default) takes the uniform default pattern's: its slash budget ``seq_len // 8`` stops at
        6096, at 48768 tokens; so the config costs what the uniform default costs at every length.
    layers : sequence of int, optional
        Search only these layers (the others get the uniform default pattern); all by default.
    text : str, optional
        Calibration text; by default :func:`~sparse_prefill.search.prompts.default_corpus`.
    seed : int
    grid : CandidateGrid, optional
    column_pair_cost : float
        What one gathered-column pair costs in tile pairs (see ``stats.COLUMN_PAIR_COST``).
    last_weight : float
        Weight in [0, 1] of the recall over the last 256 query rows in the score each head
        maximises; the rest is the recall over all rows.
    device : str or torch.device, optional
        Where the model runs; CUDA when available, else the CPU.
    """
    from ..kinds.vertical_slash import minference_budget
    from ..models import LoadedModel, load_model

    samples = _check_int("samples", samples, 1)
    length = _check_int("length", length, 256)
    if length % BLOCK:
        raise ValueError(f"length must be a multiple of {BLOCK} (the kernel's block), got length={length}")
    if budget_flops is not None and target_density is not None:
        raise ValueError("give at most one of budget_flops and target_density")
    if budget_flops is not None and not (isinstance(budget_flops, (int, float)) and 0 < budget_flops < float("inf")):
        raise ValueError(f"budget_flops must be a positive number, got budget_flops={budget_flops!r}")
    if target_density is not None and not (isinstance(target_density, (int, float)) and 0 < target_density <= 1):
        raise ValueError(f"target_density must be in (0, 1], got target_density={target_density!r}")
    if isinstance(last_weight, bool) or not isinstance(last_weight, (int, float)) or not 0 <= last_weight <= 1:
        raise ValueError(f"last_weight must be a number in [0, 1], got last_weight={last_weight!r}")
    if scaling not in SCALING_RULES:
        raise ValueError(f"scaling must be one of {SCALING_RULES}, got scaling={scaling!r}")
    if scaling_limit == "uniform":
        scaling_limit = 8 * minference_budget(2**31).slash if scaling == "proportional" else None
    if scaling_limit is not None:  # checked now, not by the PatternConfig written after the whole search
        if scaling != "proportional":
            raise ValueError(f"scaling_limit applies to scaling='proportional', got scaling={scaling!r}")
        _check_int("scaling_limit", scaling_limit, 1)
    device = check_device(device)
    out, work = check_out(out, work_dir)

    if isinstance(model, LoadedModel):
        loaded = model
    else:
        loaded = load_model(model, device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    if length > loaded.context_length:
        raise ValueError(f"length={length} is beyond the model's context of {loaded.context_length} tokens; "
                         "search at or below it (the config's scaling rule carries the budgets to longer prompts)")
    model_config = loaded.model.config
    text_config = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    n_layers, n_heads = int(text_config.num_hidden_layers), int(text_config.num_attention_heads)
    head_dim = int(getattr(text_config, "head_dim", None) or text_config.hidden_size // n_heads)
    searched = sorted(set(range(n_layers) if layers is None else layers))
    if not searched or any(isinstance(l, bool) or not isinstance(l, int) or not 0 <= l < n_layers for l in searched):
        raise ValueError(f"layers must be layer numbers in 0..{n_layers - 1}, got layers={layers!r}")
    if text is None:
        text, text_name = default_corpus()
    text_name = text_name or "given text"

    uniform = minference_budget(length)
    grid = (grid or CandidateGrid()).with_vertical_slash(uniform.vertical, uniform.slash)
    candidates = grid.patterns()
    uniform_index = candidates.index(VerticalSlash(uniform.vertical, BLOCK * -(-uniform.slash // BLOCK), grid.last_q))

    fingerprint = {
        "format": WORK_FORMAT, "model": Path(loaded.source).name, "length": length, "seed": seed, "grid": grid.to_dict(),
        "text": hashlib.sha256(text.encode()).hexdigest()[:16],
    }
    settings_path = work / "search.json"
    if settings_path.exists():
        previous = json.loads(settings_path.read_text())
        if previous != fingerprint:
            changed = sorted(k for k in fingerprint if previous.get(k) != fingerprint[k])
            raise ValueError(f"{work} holds a search with other settings ({', '.join(changed)} differ); "
                             "delete it or pass another work directory to start over")
    else:
        _write_json(settings_path, fingerprint)

    def layer_path(layer: int) -> Path:
        return work / f"layer-{layer:02d}.json"

    state: dict[int, dict] = {}
    for layer in searched:
        path = layer_path(layer)
        state[layer] = json.loads(path.read_text()) if path.exists() else {"samples": [], "kinds": []}

    done = sum(min(len(state[l]["samples"]), samples) for l in searched)
    with _progress(samples * len(searched), done, progress) as bar:
        for index in range(samples):
            needed = [l for l in searched if index not in state[l]["samples"]]
            if not needed:
                continue
            prompt = calibration_prompt(loaded.tokenizer, text, length, index, seed)

            def on_layer(layer: int, q: torch.Tensor, k: torch.Tensor, scale: float) -> None:
                if layer not in needed:
                    return
                scores = score_grid(q, k, scale, grid)
                entry = state[layer]
                for name in ("recall", "recall_last", "tile_pairs", "column_pairs", "coverage"):
                    value = getattr(scores, name)
                    entry[name] = (torch.tensor(entry[name], dtype=torch.float64) + value).tolist() if name in entry else value.tolist()
                entry["samples"].append(index)
                entry["kinds"].append(prompt.kind)
                _write_json(layer_path(layer), entry)
                if bar is not None:
                    bar.update(1)

            run_layers(loaded.model, prompt.input_ids.to(loaded.model.device), needed, on_layer)

    # Means over the prompts of each layer: [layers, heads, candidates].
    def mean(name: str) -> torch.Tensor:
        return torch.stack([torch.tensor(state[l][name], dtype=torch.float64) / len(state[l]["samples"]) for l in searched])

    recall_all, recall_last, coverage = mean("recall"), mean("recall_last"), mean("coverage")
    recall = (1 - last_weight) * recall_all + last_weight * recall_last  # what each head maximises
    density = (mean("tile_pairs") + column_pair_cost * mean("column_pairs")) / causal_pairs(length)
    flat_recall, flat_density = recall.flatten(0, 1), density.flatten(0, 1)
    uniform_total = float(flat_density[:, uniform_index].sum())
    flops_per_unit = 4 * head_dim * causal_pairs(length)  # one unit of density = all causal pairs of one head
    if budget_flops is not None:
        budget, rule = budget_flops / flops_per_unit, "budget_flops"
    elif target_density is not None:
        budget, rule = target_density * flat_density.shape[0], "target_density"
    else:
        budget, rule = uniform_total, "uniform default's cost"
    try:
        chosen = allocate(flat_recall, flat_density, budget).view(len(searched), n_heads)
    except ValueError as error:
        raise ValueError(f"{rule}: {error} (density {budget / flat_density.shape[0]:.4g} per head, "
                         f"{budget * flops_per_unit:.4g} FLOPs)") from None

    pick = lambda values: values.gather(2, chosen[:, :, None])[:, :, 0]  # noqa: E731
    layer_patterns: list[tuple[Pattern, ...]] = []
    by_layer = {l: i for i, l in enumerate(searched)}
    for layer in range(n_layers):
        if layer in by_layer:
            layer_patterns.append(tuple(candidates[c] for c in chosen[by_layer[layer]].tolist()))
        else:
            layer_patterns.append((uniform,) * n_heads)
    chosen_recall, chosen_density, chosen_coverage = pick(recall_all), pick(density), pick(coverage)
    chosen_last = pick(recall_last)
    objective = recall
    recall = recall_all  # reported: the library's recall, over all rows
    summary = {
        "objective": float(pick(objective).mean()),
        "uniform_objective": float(objective[:, :, uniform_index].mean()),
        "recall": float(chosen_recall.mean()),
        "uniform_recall": float(recall[:, :, uniform_index].mean()),
        "recall_last": float(chosen_last.mean()),
        "uniform_recall_last": float(recall_last[:, :, uniform_index].mean()),
        "density": float(chosen_density.mean()),
        "uniform_density": float(density[:, :, uniform_index].mean()),
        "min_head_recall": float(chosen_recall.min()),
        "uniform_min_head_recall": float(recall[:, :, uniform_index].min()),
        "pattern_counts": {kind: sum(layer_patterns[l][h].kind == kind for l in searched for h in range(n_heads))
                           for kind in ("dense", "vertical_slash", "block_sparse", "a_shape")},
    }
    rounded = lambda t: [[round(float(x), 5) if x == x else None for x in row] for row in t]  # noqa: E731  (NaN -> null)
    metadata = {
        "source": "sparse_prefill.search",
        "created": time.strftime("%Y-%m-%d"),
        "model": Path(loaded.source).name,
        "model_signature": model_signature(model_config),
        "length": length,
        "samples": samples,
        "prompt_kinds": [KINDS[i % len(KINDS)] for i in range(samples)],
        "text": text_name,
        "seed": seed,
        "searched_layers": searched,
        "cost": (f"density: pairs the GPU kernel computes (64x64 per tile, gathered-column pairs x{column_pair_cost}) "
                 "over the causal pairs, per head, mean over prompts"),
        "column_pair_cost": column_pair_cost,
        "budget": {"rule": rule, "density_per_head": budget / flat_density.shape[0], "flops": budget * flops_per_unit},
        "last_weight": last_weight,
        "recall": rounded(chosen_recall),
        "recall_last": rounded(chosen_last),
        "density": rounded(chosen_density),
        "coverage": rounded(chosen_coverage),
        "uniform_default": {"pattern": uniform.to_dict(), "recall": rounded(recall[:, :, uniform_index]),
                            "recall_last": rounded(recall_last[:, :, uniform_index]),
                            "density": rounded(density[:, :, uniform_index])},
        "summary": summary,
    }
    config = PatternConfig(tuple(layer_patterns), metadata, reference_length=length, scaling=scaling,
                           scaling_limit=scaling_limit)
    config.save(out)
    plot_path = None
    if plot:
        from .plot import plot_config

        plot_path = plot_config(config, out.with_suffix(".png"))
    return SearchResult(config=config, config_path=out, plot_path=plot_path, summary=summary)
