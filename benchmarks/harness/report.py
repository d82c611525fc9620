"""One report writer: a markdown table, the JSON it came from, and a PNG, in one or more folders.

Every result file is `<stem>.json` ({"meta": ..., "rows": [...], ...}), `<stem>.md` and
`<stem>.png`. A later benchmark can add its rows to an earlier file as a section of its own
(`merge_section`), so a GPU check brings everything back in few files.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any, Callable, Iterable, Sequence

Column = tuple[str, Callable[[dict], Any]]


def cell(value: Any, fmt: str = "") -> str:
    """A table cell: "-" for a missing value, else `format(value, fmt)`."""
    return "-" if value is None else format(value, fmt)


def markdown_table(rows: Iterable[dict], columns: Sequence[Column]) -> str:
    """`| header | ... |` with one line per row; each column's function gives its cell."""
    lines = ["| " + " | ".join(h for h, _ in columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(str(fn(r)) for _, fn in columns) + " |" for r in rows]
    return "\n".join(lines)


def bar_plot(path: str, title: str, panels: Sequence[tuple[str, dict[str, dict[str, float]]]], *,
             log: bool = False, parity: bool = False) -> bool:
    """Grouped bars, one panel per (y label, {series: {group: value}}); groups keep their first-seen
    order. parity: a line at 1 (ratios). False (and a note) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no PNG (pip install matplotlib)", file=sys.stderr)
        return False
    groups = list(dict.fromkeys(g for _, data in panels for values in data.values() for g in values))
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(8.0, 0.5 * len(groups) + 3), 4.5 * len(panels)),
                             squeeze=False)
    for ax, (label, data) in zip(axes[:, 0], panels):
        width = 0.8 / max(1, len(data))
        for i, (series, values) in enumerate(data.items()):
            xs = [j for j, g in enumerate(groups) if values.get(g) is not None]
            ax.bar([x + (i - (len(data) - 1) / 2) * width for x in xs], [values[groups[x]] for x in xs], width,
                   label=series)
        if parity:
            ax.axhline(1.0, color="black", linewidth=0.8)
        if log:
            ax.set_yscale("log")
        ax.set_ylabel(label)
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels(groups, rotation=30, ha="right", fontsize=7)
        ax.grid(axis="y", which="both", alpha=0.3)
        ax.legend(fontsize=7)
    axes[0, 0].set_title(title, fontsize=8, wrap=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write(out_dirs: str | Sequence[str], stem: str, doc: dict, markdown: str,
          plot: Callable[[str], bool] | None = None) -> list[str]:
    """<stem>.json (doc), <stem>.md (markdown) and, when plot(path) draws one, <stem>.png, in each
    folder. Returns the paths written."""
    paths = []
    for d in [out_dirs] if isinstance(out_dirs, str) else out_dirs:
        os.makedirs(d, exist_ok=True)
        base = os.path.join(d, stem)
        with open(base + ".json", "w") as f:
            json.dump(doc, f, indent=1)
        with open(base + ".md", "w") as f:
            f.write(markdown.rstrip("\n") + "\n")
        paths += [base + ".json", base + ".md"]
        if plot is not None and plot(base + ".png"):
            paths.append(base + ".png")
    return paths


def merge_section(folder: str, stem: str, key: str, doc: dict, heading: str, markdown: str) -> None:
    """Put doc under `key` in folder/<stem>.json and markdown as the section `heading` of
    folder/<stem>.md, replacing an earlier one and keeping everything else."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, stem + ".json")
    results: dict = {}
    if os.path.exists(path):
        try:
            with open(path) as f:
                results = json.load(f)
        except ValueError:
            results = {f"unreadable_before_{key}": True}
    results[key] = doc
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    path = os.path.join(folder, stem + ".md")
    text = open(path).read() if os.path.exists(path) else ""
    text = text.split("\n" + heading)[0].rstrip("\n")
    with open(path, "w") as f:
        f.write((text + "\n\n" if text else "") + f"{heading}\n\n{markdown.rstrip()}\n")
