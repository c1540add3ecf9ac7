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


def summarize(task: str, records: Sequence[dict]) -> dict[str, Any]:
    """Scores per method label: by length (and depth or RULER task), and overall."""
    labels, lengths = _labels(records), sorted({r["length"] for r in records})
    summary: dict[str, Any] = {"task": task, "labels": labels, "lengths": lengths, "methods": {}}
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
        by_length = {n: 100 * _mean([r["score"] for r in mine if r["length"] == n]) for n in lengths}
        entry: dict[str, Any] = {"average": 100 * _mean([r["score"] for r in mine]), "by_length": by_length}
        if task == "needle":
            depths = sorted({r["depth"] for r in mine})
            entry["depths"] = depths
            entry["grid"] = [[100 * _mean([r["score"] for r in mine if r["length"] == n and r["depth"] == d])
                              for n in lengths] for d in depths]
        if task == "ruler":
            tasks = sorted({r["task"] for r in mine})
            entry["by_task"] = {t: {n: 100 * _mean([r["score"] for r in mine if r["task"] == t and r["length"] == n])
                                    for n in lengths} for t in tasks}
            # RULER's average: every task weighs the same, whatever its sample count.
            entry["average"] = _mean([_mean([v for v in entry["by_task"][t].values() if not math.isnan(v)]) for t in tasks])
        summary["methods"][label] = entry
    return summary


def _markdown(summary: dict[str, Any]) -> str:
    task, lengths, methods = summary["task"], summary["lengths"], summary["methods"]
    head = "| method | " + " | ".join(f"{n // 1024}K" if n % 1024 == 0 else str(n) for n in lengths)
    if task == "ppl":
        lines = [head + " |", "|---" * (len(lengths) + 1) + "|"]
        for label, entry in methods.items():
            cells = [f"{entry['by_length'][n]['ppl']:.3f}" if n in entry["by_length"] else "–" for n in lengths]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        return "Perplexity (whole window) by window length.\n\n" + "\n".join(lines) + "\n"
    lines = [head + " | average |", "|---" * (len(lengths) + 2) + "|"]
    for label, entry in methods.items():
        cells = [f"{entry['by_length'][n]:.1f}" for n in lengths]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {entry['average']:.1f} |")
    text = f"{'Needle retrieval' if task == 'needle' else 'RULER-style average'} (%) by prompt length.\n\n" + "\n".join(lines) + "\n"
    if task == "ruler":
        tasks = sorted({t for entry in methods.values() for t in entry["by_task"]})
        rows = ["| method | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
        for label, entry in methods.items():
            cells = [f"{_mean([v for v in entry['by_task'][t].values() if not math.isnan(v)]):.1f}" if t in entry["by_task"] else "–"
                     for t in tasks]
            rows.append(f"| {label} | " + " | ".join(cells) + " |")
        text += "\nPer task (%), averaged over lengths.\n\n" + "\n".join(rows) + "\n"
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


def _length_names(lengths: Sequence[int]) -> list[str]:
    return [f"{n // 1024}K" if n % 1024 == 0 else str(n) for n in lengths]


NEEDLE_PANELS_PER_ROW = 6


def _heatmap(axis, entry: dict, lengths: Sequence[int], title: str):
    image = axis.imshow(entry["grid"], cmap="RdYlGn", vmin=0, vmax=100, aspect="auto", origin="upper")
    axis.set_xticks(range(len(lengths)), _length_names(lengths))
    axis.set_yticks(range(len(entry["depths"])), [f"{100 * d:.0f}%" for d in entry["depths"]])
    # Two lines: panels are narrow when there are few lengths, and labels like
    # 'sparse (uniform) + snapkv 1024 k9' would run into their neighbours.
    axis.set_title(f"{title}\naverage {entry['average']:.1f}%", fontsize=9)
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
            averages = [_mean([entry["by_task"][t][n] for t in entry["by_task"]
                               if not math.isnan(entry["by_task"][t][n])]) for n in lengths]
            lines.plot(range(len(lengths)), averages, marker="o", label=label, color=colors(i % colors.N))
        lines.set_xticks(range(len(lengths)), names)
        lines.set_xlabel("prompt length (tokens)")
        lines.set_ylim(0, 105)
        lines.set_title("average over tasks", fontsize=10)
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
