"""Turning stored records into a summary (JSON), a markdown table and PNG plots."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

__all__ = ["summarize", "write_report"]

_ORDER = {"dense": 0, "sparse": 1, "a-shape": 3}


def _labels(records: Sequence[dict]) -> list[str]:
    """Method labels in a stable order: dense, sparse, searched sparse configs, a-shape, others."""
    return sorted({r["label"] for r in records}, key=lambda label: (_ORDER.get(label, 2), label))


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _se(values: Sequence[float]) -> float:
    """Standard error of the mean: the sample standard deviation (n - 1) over sqrt(n); NaN below 2 values."""
    n = len(values)
    if n < 2:
        return float("nan")
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def _combined(cells: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """Mean and standard error of an equal-weight mean of independent means given as (mean, se):
    the se is sqrt(sum of se^2) / count. Cells whose mean is NaN (no data) are left out."""
    cells = [(m, s) for m, s in cells if not math.isnan(m)]
    if not cells:
        return float("nan"), float("nan")
    return _mean([m for m, _ in cells]), math.sqrt(sum(s * s for _, s in cells)) / len(cells)


def _prompt(record: dict) -> Any:
    """What a record was asked: its ``key``, else whichever of (task, length, index, depth) it has."""
    if "key" in record:
        return record["key"]
    return tuple((name, record[name]) for name in ("task", "length", "index", "depth") if name in record)


def _stratum(task: str, record: dict) -> Any:
    """The cell a record's score is averaged in: its length (needle), its (task, length) (RULER)."""
    return (record["task"], record["length"]) if task == "ruler" else record["length"]


NOISE_SE = 2  # a difference is called beyond noise when |mean| > NOISE_SE standard errors


def _difference(diffs: Sequence[float]) -> dict[str, Any]:
    """Paired differences in points: their mean, its standard error, the pairs and the pairs that differ."""
    return _difference_cell(_mean(diffs), _se(diffs), len(diffs), sum(d != 0 for d in diffs))


def _difference_cell(diff: float, se: float, pairs: int, differing: int) -> dict[str, Any]:
    beyond = bool(not math.isnan(se) and abs(diff) > NOISE_SE * se)
    return {"diff": diff, "se": se, "pairs": pairs, "differing": differing, "beyond_noise": beyond}


def _merged(cells: Sequence[dict]) -> dict[str, Any]:
    """Equal-weight mean of difference cells (RULER's tasks, or a task's lengths), SEs combined."""
    diff, se = _combined([(c["diff"], c["se"]) for c in cells])
    return _difference_cell(diff, se, sum(c["pairs"] for c in cells), sum(c["differing"] for c in cells))


def _by_prompt(label: str, records: Sequence[dict]) -> dict[Any, dict]:
    mine: dict[Any, dict] = {}
    for r in records:
        prompt = _prompt(r)
        if prompt in mine:
            raise ValueError(f"two {label!r} records for the same prompt {prompt!r}: a record per prompt and label")
        mine[prompt] = r
    return mine


def _against_dense(task: str, mine: Sequence[dict], dense: dict[Any, dict],
                   lengths: Sequence[int]) -> dict[str, Any]:
    """Paired differences (this label's score − dense's, in points) over the prompts both answered."""
    diffs: dict[Any, list[float]] = {}
    unpaired = 0
    for r in mine:
        partner = dense.get(_prompt(r))
        if partner is None:
            unpaired += 1
            continue
        diffs.setdefault(_stratum(task, r), []).append(100 * (r["score"] - partner["score"]))
    result: dict[str, Any] = {"unpaired": unpaired}
    if task == "needle":
        result["by_length"] = {n: _difference(diffs[n]) for n in lengths if n in diffs}
        result["average"] = _difference([d for values in diffs.values() for d in values])
        return result
    tasks = sorted({t for t, _ in diffs})
    by_task = {t: {n: _difference(diffs[t, n]) for n in lengths if (t, n) in diffs} for t in tasks}
    result["by_task"] = by_task
    result["task_averages"] = {t: _merged(list(by_task[t].values())) for t in tasks}
    result["by_length"] = {n: _merged([by_task[t][n] for t in tasks if n in by_task[t]])
                           for n in lengths if any(n in by_task[t] for t in tasks)}
    result["average"] = (_merged(list(result["task_averages"].values())) if tasks
                         else _difference_cell(float("nan"), float("nan"), 0, 0))
    return result


def summarize(task: str, records: Sequence[dict]) -> dict[str, Any]:
    """Scores per method label: by length (and depth or RULER task), and overall, with standard errors;
    for every label but ``dense``, its paired difference against dense on the same prompts.

    Needle: a length's score is the mean over its samples, ± the standard error of that mean; the
    average is the mean over all samples, ± likewise. RULER: a length's score is the mean over tasks
    of each task's mean there (every task weighs the same), ± sqrt(sum of the tasks' squared standard
    errors) / tasks; a task's average is the mean over lengths of its means, the average the mean over
    tasks of those, each ± combined the same way. The differences against dense (``vs_dense``) pair
    records by prompt (``key``, else task, length, index, depth) and are averaged the same way, from
    the per-pair differences; records with no dense partner are left out and counted (``unpaired``).
    Perplexity (``ppl``): per length, from the summed losses of all windows, no standard error.
    """
    labels, lengths = _labels(records), sorted({r["length"] for r in records})
    summary: dict[str, Any] = {"task": task, "labels": labels, "lengths": lengths, "methods": {}}
    if task != "ppl":
        summary["noise_rule"] = f"a difference against dense is beyond noise when |diff| > {NOISE_SE} se"
    dense = _by_prompt("dense", [r for r in records if r["label"] == "dense"]) if "dense" in labels else None
    for label in labels:
        mine = [r for r in records if r["label"] == label]
        if task == "ppl":
            by_length = {}
            for n in lengths:
                rows = [r for r in mine if r["length"] == n]
                if rows:
                    sums = [sum(r["bucket_loss_sums"][b] for r in rows) for b in range(len(rows[0]["bucket_loss_sums"]))]
                    counts = [sum(r["bucket_counts"][b] for r in rows) for b in range(len(rows[0]["bucket_counts"]))]
                    by_length[n] = {
                        "ppl": math.exp(sum(sums) / sum(counts)),
                        "bucket_ppl": [math.exp(s / c) for s, c in zip(sums, counts)],
                        "windows": len(rows),
                    }
            summary["methods"][label] = {"by_length": by_length}
            continue
        _by_prompt(label, mine)  # one record per prompt, or the pairing below means nothing
        scores = {n: [100 * r["score"] for r in mine if r["length"] == n] for n in lengths}
        entry: dict[str, Any] = {"average": _mean([s for values in scores.values() for s in values]),
                                 "average_se": _se([s for values in scores.values() for s in values]),
                                 "by_length": {n: _mean(scores[n]) for n in lengths},
                                 "se_by_length": {n: _se(scores[n]) for n in lengths},
                                 "n_by_length": {n: len(scores[n]) for n in lengths}}
        if task == "needle":
            depths = sorted({r["depth"] for r in mine})
            entry["depths"] = depths
            entry["grid"] = [[100 * _mean([r["score"] for r in mine if r["length"] == n and r["depth"] == d])
                              for n in lengths] for d in depths]
        if task == "ruler":
            tasks = sorted({r["task"] for r in mine})
            cells = {t: {n: [100 * r["score"] for r in mine if r["task"] == t and r["length"] == n] for n in lengths}
                     for t in tasks}
            entry["by_task"] = {t: {n: _mean(cells[t][n]) for n in lengths} for t in tasks}
            entry["by_task_se"] = {t: {n: _se(cells[t][n]) for n in lengths} for t in tasks}
            # RULER's averages: every task weighs the same, whatever its sample count.
            for n in lengths:
                entry["by_length"][n], entry["se_by_length"][n] = _combined(
                    [(entry["by_task"][t][n], entry["by_task_se"][t][n]) for t in tasks])
            entry["task_averages"] = {}
            for t in tasks:
                mean, se = _combined([(entry["by_task"][t][n], entry["by_task_se"][t][n]) for n in lengths])
                entry["task_averages"][t] = {"mean": mean, "se": se}
            entry["average"], entry["average_se"] = _combined(
                [(a["mean"], a["se"]) for a in entry["task_averages"].values()])
        if dense is not None and label != "dense":
            entry["vs_dense"] = _against_dense(task, mine, dense, lengths)
        summary["methods"][label] = entry
    return summary


def _length_names(lengths: Sequence[int]) -> list[str]:
    return [f"{n // 1024}K" if n % 1024 == 0 else str(n) for n in lengths]


def _score_cell(mean: float, se: float) -> str:
    if math.isnan(mean):
        return "–"
    return f"{mean:.1f} ± {se:.1f}" if not math.isnan(se) else f"{mean:.1f} ± –"


def _difference_text(cell: dict | None) -> str:
    if cell is None or cell["pairs"] == 0:
        return "–"
    diff = round(cell["diff"], 1) + 0.0  # no "-0.0"
    se = f"{cell['se']:.1f}" if not math.isnan(cell["se"]) else "–"
    text = f"{diff:+.1f} ± {se} ({cell['differing']}/{cell['pairs']})"
    return f"**{text}**" if cell["beyond_noise"] else text


def _markdown(summary: dict[str, Any]) -> str:
    task, lengths, methods = summary["task"], summary["lengths"], summary["methods"]
    head = "| method | " + " | ".join(_length_names(lengths))
    if task == "ppl":
        lines = [head + " |", "|---" * (len(lengths) + 1) + "|"]
        for label, entry in methods.items():
            cells = [f"{entry['by_length'][n]['ppl']:.3f}" if n in entry["by_length"] else "–" for n in lengths]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        return "Perplexity (whole window) by window length.\n\n" + "\n".join(lines) + "\n"
    rule = "|---" * (len(lengths) + 2) + "|"
    lines = [head + " | average |", rule]
    for label, entry in methods.items():
        cells = [_score_cell(entry["by_length"][n], entry["se_by_length"][n]) for n in lengths]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {_score_cell(entry['average'], entry['average_se'])} |")
    if task == "needle":
        caption = ("Needle retrieval (%) by prompt length, ± the standard error of the mean over the samples "
                   "(the average: over all samples).")
    else:
        caption = ("RULER-style average (%) by prompt length, ± standard error: each task's mean ± its standard "
                   "error over samples, averaged with every task weighing the same (SE = sqrt(sum of the tasks' "
                   "SE²) / tasks).")
    text = caption + "\n\n" + "\n".join(lines) + "\n"
    compared = {label: entry["vs_dense"] for label, entry in methods.items() if "vs_dense" in entry}
    if compared:
        rows = [head + " | average |", rule]
        for label, versus in compared.items():
            cells = [_difference_text(versus["by_length"].get(n)) for n in lengths]
            rows.append(f"| {label} | " + " | ".join(cells) + f" | {_difference_text(versus['average'])} |")
        unpaired = [f"{label} {versus['unpaired']}" for label, versus in compared.items() if versus["unpaired"]]
        text += ("\nDifference against dense (paired, ± SE; pairs differing), in points: each record minus "
                 "dense's on the same prompt" + (", tasks weighing the same" if task == "ruler" else "")
                 + f". **Bold**: beyond noise, |difference| > {NOISE_SE} SE.\n\n" + "\n".join(rows) + "\n"
                 + "\nRecords with no dense record on the same prompt, left out of the differences: "
                 + (", ".join(unpaired) if unpaired else "none") + ".\n")
    if task == "ruler":
        tasks = sorted({t for entry in methods.values() for t in entry["by_task"]})
        rows = ["| method | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
        for label, entry in methods.items():
            averages = entry["task_averages"]
            cells = [_score_cell(averages[t]["mean"], averages[t]["se"]) if t in averages else "–" for t in tasks]
            rows.append(f"| {label} | " + " | ".join(cells) + " |")
        text += "\nPer task (%), averaged over lengths, ± standard error.\n\n" + "\n".join(rows) + "\n"
    return text


def write_report(task: str, records: Sequence[dict], out: Path) -> dict[str, Any]:
    """Write ``{task}_summary.json``, ``{task}.md`` and the plots into ``out``; return the summary."""
    summary = summarize(task, records)
    (out / f"{task}_summary.json").write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    (out / f"{task}.md").write_text(_markdown(summary), encoding="utf-8")
    if records:
        {"needle": _plot_needle, "ruler": _plot_ruler, "ppl": _plot_ppl}[task](summary, out)
    return summary


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


NEEDLE_PANELS_PER_ROW = 6


def _heatmap(axis, entry: dict, lengths: Sequence[int], title: str):
    image = axis.imshow(entry["grid"], cmap="RdYlGn", vmin=0, vmax=100, aspect="auto", origin="upper")
    axis.set_xticks(range(len(lengths)), _length_names(lengths))
    axis.set_yticks(range(len(entry["depths"])), [f"{100 * d:.0f}%" for d in entry["depths"]])
    # Two lines: panels are narrow when there are few lengths, and labels like
    # 'sparse (uniform) + snapkv 1024 k9' would run into their neighbours.
    axis.set_title(f"{title}\naverage {_score_cell(entry['average'], entry['average_se'])}%", fontsize=9)
    return image


def _plot_needle(summary: dict, out: Path) -> None:
    plt = _pyplot()
    lengths, methods = summary["lengths"], summary["methods"]
    for label, entry in methods.items():
        figure, axis = plt.subplots(figsize=(1.2 + 0.8 * len(lengths), 4.5))
        image = _heatmap(axis, entry, lengths, label)
        axis.set_ylabel("needle depth")
        axis.set_xlabel("prompt length (tokens)")
        figure.colorbar(image, ax=axis, label="retrieved (%)")
        figure.tight_layout()
        figure.savefig(out / f"needle_{label.replace(' ', '_').replace('(', '').replace(')', '')}.png", dpi=120)
        plt.close(figure)
    # At most NEEDLE_PANELS_PER_ROW panels a row: a KV-cache comparison has a dozen methods.
    columns = min(len(methods), NEEDLE_PANELS_PER_ROW)
    rows = math.ceil(len(methods) / columns)
    panel_width = max(0.7 * len(lengths) + 1.0, 2.6)
    figure, axes = plt.subplots(rows, columns, figsize=(2 + panel_width * columns, 0.6 + 4.4 * rows),
                                squeeze=False, sharey=True, layout="constrained")
    panels = [axis for row in axes for axis in row]
    for axis, (label, entry) in zip(panels, methods.items()):
        image = _heatmap(axis, entry, lengths, label)
    for axis in panels[len(methods):]:
        axis.axis("off")
    for row in axes:
        row[0].set_ylabel("needle depth")
    figure.supxlabel("prompt length (tokens)", fontsize=10)
    figure.colorbar(image, ax=panels, label="retrieved (%)")
    figure.suptitle("Needle in a haystack: exact match by length and depth", fontsize=11)
    figure.savefig(out / "needle_side_by_side.png", dpi=120, bbox_inches="tight")
    plt.close(figure)


def _plot_ruler(summary: dict, out: Path) -> None:
    """Scores as an annotated method x task grid (readable for any number of methods, unlike bars),
    and the average over tasks by length when there is more than one length."""
    plt = _pyplot()
    lengths, methods = summary["lengths"], summary["methods"]
    tasks = sorted({t for entry in methods.values() for t in entry["by_task"]})
    labels = list(methods)
    grid = []
    for label in labels:
        by_task = methods[label]["by_task"]
        row = [_mean([v for v in by_task.get(t, {}).values() if not math.isnan(v)]) for t in tasks]
        grid.append(row + [_mean([v for v in row if not math.isnan(v)])])
    columns = tasks + ["average"]
    with_lines = len(lengths) > 1
    height = 1.2 + 0.32 * len(labels)
    figure, axes = plt.subplots(1, 2 if with_lines else 1, squeeze=False, layout="constrained",
                                figsize=(4 + 0.9 * len(columns) + (5 if with_lines else 0), max(3.5, height)),
                                gridspec_kw={"width_ratios": [1.6, 1]} if with_lines else None)
    table = axes[0][0]
    table.imshow(grid, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            table.text(j, i, "–" if math.isnan(value) else f"{value:.0f}", ha="center", va="center", fontsize=8)
    table.set_xticks(range(len(columns)), columns, rotation=20)
    table.set_yticks(range(len(labels)), labels, fontsize=8)
    names = _length_names(lengths)
    where = f"averaged over {', '.join(names)}" if len(names) > 1 else f"at {names[0]}"
    table.set_title(f"RULER-style score (%), {where}", fontsize=10)
    if with_lines:
        lines = axes[0][1]
        colors = plt.get_cmap("tab20" if len(labels) > 10 else "tab10")
        for i, label in enumerate(labels):
            entry = methods[label]
            averages = [entry["by_length"][n] for n in lengths]
            errors = [0.0 if math.isnan(entry["se_by_length"][n]) else entry["se_by_length"][n] for n in lengths]
            # Offset a little per method so that equal scores and their error bars stay apart.
            step = min(0.03, 0.4 / len(labels))
            where = [x + step * (i - (len(labels) - 1) / 2) for x in range(len(lengths))]
            lines.errorbar(where, averages, yerr=errors, marker="o", capsize=3, label=label, color=colors(i % colors.N))
        lines.set_xticks(range(len(lengths)), names)
        lines.set_xlabel("prompt length (tokens)")
        lines.set_ylim(0, 105)
        lines.set_title("average over tasks, ± standard error", fontsize=10)
        lines.grid(alpha=0.3)
        lines.legend(fontsize=7)
    figure.savefig(out / "ruler.png", dpi=120)
    plt.close(figure)


def _plot_ppl(summary: dict, out: Path) -> None:
    plt = _pyplot()
    lengths, methods = summary["lengths"], summary["methods"]
    figure, axes = plt.subplots(1, len(lengths), figsize=(4.2 * len(lengths), 3.8), squeeze=False)
    for axis, n in zip(axes[0], lengths):
        for label, entry in methods.items():
            if n not in entry["by_length"]:
                continue
            buckets = entry["by_length"][n]["bucket_ppl"]
            centres = [(b + 0.5) * n / len(buckets) for b in range(len(buckets))]
            axis.plot(centres, buckets, marker=".", label=f"{label} ({entry['by_length'][n]['ppl']:.2f})")
        axis.set_title(f"{_length_names([n])[0]}-token windows", fontsize=10)
        axis.set_xlabel("token position")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    axes[0][0].set_ylabel("perplexity of the bucket")
    figure.suptitle("Perplexity by position", fontsize=11)
    figure.tight_layout()
    figure.savefig(out / "ppl.png", dpi=120)
    plt.close(figure)
