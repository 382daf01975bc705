"""The report card: eval.json and eval.md beside a model, and several runs side by side.

eval.json holds the model, gptforge's version, the date, the settings and one entry per
task and metric (task, metric, value, stderr, n, shots, data_sha256: the sha256 of each data
file read). An evaluation adds to the eval.json already there, replacing entries with the
same task, metric and shots, so tasks can be run one at a time.
"""

from __future__ import annotations

import datetime
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

from gptforge.errors import BadInputError, NotFoundError
from gptforge.fileio import atomic_write, atomic_write_json

EVAL_JSON = "eval.json"
EVAL_MD = "eval.md"
# Metrics where lower is better; the report says so next to their name.
LOWER_IS_BETTER = frozenset({"perplexity"})


def _key(entry: dict) -> tuple:
    return entry["task"], entry["metric"], entry["shots"]


def write_eval(out_dir: str | os.PathLike, model: str, results: Sequence, settings: dict | None = None) -> Path:
    """Write (or add to) eval.json and eval.md in `out_dir`, atomically; return eval.json's path.

    `results` are `MetricResult`s (or their `to_json()` dicts); `settings` (batch size, limit,
    seed, device, dtype, tokens/s, ...) are stored as given.
    """
    from gptforge import __version__

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    entries = [r if isinstance(r, dict) else r.to_json() for r in results]
    path = out / EVAL_JSON
    old: list[dict] = []
    if path.is_file():
        try:
            previous = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            previous = {}
        if isinstance(previous, dict) and previous.get("model") == model:
            new_keys = {_key(e) for e in entries}
            old = [e for e in previous.get("results", []) if _key(e) not in new_keys]
    record = {
        "model": model,
        "gptforge_version": __version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "settings": dict(settings or {}),
        "results": old + entries,
    }
    atomic_write_json(path, record)
    with atomic_write(out / EVAL_MD, "w", encoding="utf-8", newline="\n") as f:
        f.write(eval_markdown(record))
    return path


def _fmt(value: float | None, metric: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.3f}" if metric in LOWER_IS_BETTER else f"{100 * value:.2f}"


def eval_markdown(record: dict) -> str:
    """One run's eval.json as a markdown table (accuracies in percent)."""
    lines = [f"# Evaluation of {record['model']}", "",
             f"gptforge {record.get('gptforge_version', '?')}, {record.get('date', '?')}", "",
             "| task | metric | shots | value | ± stderr | n |", "|---|---|---:|---:|---:|---:|"]
    for e in record["results"]:
        name = e["metric"] + (" (lower is better)" if e["metric"] in LOWER_IS_BETTER else " (%)")
        lines.append(f"| {e['task']} | {name} | {e['shots']} | {_fmt(e['value'], e['metric'])} | "
                     f"{_fmt(e.get('stderr'), e['metric'])} | {e['n']} |")
    return "\n".join(lines) + "\n"


def read_eval(source: str | os.PathLike) -> dict:
    """The eval.json of a run directory (or the file itself)."""
    path = Path(source)
    if not path.exists():
        raise NotFoundError(f"{path} is neither a run folder nor an {EVAL_JSON}: check the path, or run "
                            f"`gptforge eval --model ... --out {path}` first")
    if path.is_dir():
        path = path / EVAL_JSON
    if not path.is_file():
        raise NotFoundError(f"{path} does not exist: run `gptforge eval --model ... --out {path.parent}` first")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise BadInputError(f"{path} is not JSON ({exc.msg}); run the evaluation again to rewrite it") from None
    if not isinstance(record, dict) or not isinstance(record.get("results"), list):
        raise BadInputError(f"{path} is not a gptforge eval.json (no 'results' list)")
    return record


def _label(source: str | os.PathLike, record: dict) -> str:
    path = Path(source)
    return path.name if path.is_dir() else path.parent.name or record.get("model", str(source))


def compare_table(sources: Sequence[str | os.PathLike]) -> tuple[list[str], list[tuple[str, list[str]]], list]:
    """Rows of several runs side by side: (run labels, [(row name, cells)], raw values per row)."""
    records = [read_eval(s) for s in sources]
    labels = [_label(s, r) for s, r in zip(sources, records)]
    keys: list[tuple] = []
    for record in records:
        for e in record["results"]:
            if _key(e) not in keys:
                keys.append(_key(e))
    rows, raw = [], []
    for key in keys:
        task, metric, shots = key
        found = [next((e for e in r["results"] if _key(e) == key), None) for r in records]
        cells = ["-" if e is None else f"{_fmt(e['value'], metric)} ± {_fmt(e.get('stderr'), metric)}"
                 for e in found]
        unit = "" if metric in LOWER_IS_BETTER else " %"
        rows.append((f"{task} {metric}{unit} ({shots}-shot)", cells))
        raw.append((key, found))
    return labels, rows, raw


def format_table(labels: Sequence[str], rows: Sequence[tuple[str, list[str]]]) -> str:
    """A plain-text (markdown) table of `compare_table`'s rows."""
    header = ["task / metric", *labels]
    body = [[name, *cells] for name, cells in rows]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, body)])


def plot_report(sources: Sequence[str | os.PathLike], out: str | os.PathLike) -> Path:
    """Draw a bar chart of several runs' accuracies (one group of bars per task and metric,
    error bars of one standard error) into the PNG `out`; a run without an entry gets no bar,
    and perplexities are left out."""
    from gptforge.plotting import _pyplot

    labels, _, raw = compare_table(sources)
    raw = [(key, found) for key, found in raw if key[1] not in LOWER_IS_BETTER]
    if not raw:
        raise BadInputError("the runs hold no accuracy to plot")
    plt = _pyplot()
    width = 0.8 / len(labels)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(raw) * max(1, len(labels) / 2)), 4))
    for j, label in enumerate(labels):
        xs = [i + (j - (len(labels) - 1) / 2) * width for i in range(len(raw))]
        values = [100 * found[j]["value"] if found[j] else math.nan for _, found in raw]  # NaN: no bar
        errors = [100 * (found[j].get("stderr") or 0.0) if found[j] else 0.0 for _, found in raw]
        ax.bar(xs, values, width, yerr=errors, capsize=3, label=label)
    ax.set_xticks(range(len(raw)))
    ax.set_xticklabels([f"{t}\n{m} ({s}-shot)" for (t, m, s), _ in raw], fontsize=8)
    ax.set_ylabel("Accuracy (%)")
    ax.legend(loc="best")
    fig.tight_layout()
    path = Path(out)
    with atomic_write(path) as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
    return path
