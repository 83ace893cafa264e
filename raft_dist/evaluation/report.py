"""The eval report: a markdown comparison (terminal and report.md), every number in
report.json, every answer in predictions.jsonl, and the robustness curve as robustness.png."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from raft_dist.atomic import write_atomic, write_json_atomic

REPORT_JSON, REPORT_MD, PREDICTIONS, PLOT = (
    "report.json",
    "report.md",
    "predictions.jsonl",
    "robustness.png",
)
# (report key, column title); the first three are compared between the first and last model.
COLUMNS = (
    ("em", "EM"),
    ("f1", "F1"),
    ("contained", "contained"),
    ("follows_format", "format"),
    ("quote_verbatim", "quotes verbatim"),
    ("quote_from_oracle", "quotes from oracle"),
)
COMPARED = ("em", "f1", "contained")


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def set_section(report: dict, set_info: dict) -> list[str]:
    name = set_info["name"]
    models = report["models"]
    lines = [
        f"### {name}: {set_info['data']} ({set_info['questions']} questions)",
        "",
    ]
    header = ["model", "n", *(title for _, title in COLUMNS), "skipped (too long)"]
    rows = []
    for entry in models:
        metrics = entry["sets"][name]
        overall = metrics["all"]
        rows.append(
            [
                entry["model"],
                _fmt(overall["n"]),
                *(_fmt(overall[key]) for key, _ in COLUMNS),
                _fmt(metrics["skipped_too_long"]),
            ]
        )
    lines += _table(header, rows)
    if len(models) >= 2:
        first, last = models[0], models[-1]
        parts = []
        for key in COMPARED:
            a, b = first["sets"][name]["all"][key], last["sets"][name]["all"][key]
            if a is not None and b is not None:
                parts.append(f"{key} {b - a:+.3f}")
        if parts:
            lines += ["", f"{last['model']} vs {first['model']}: " + ", ".join(parts)]
    split_rows = []
    for entry in models:
        for group in ("oracle_present", "oracle_absent"):
            m = entry["sets"][name][group]
            if m["n"]:
                split_rows.append(
                    [
                        entry["model"],
                        group.replace("_", " "),
                        _fmt(m["n"]),
                        _fmt(m["em"]),
                        _fmt(m["f1"]),
                        _fmt(m["contained"]),
                    ]
                )
    if split_rows:
        lines += ["", "Oracle present vs absent:", ""]
        lines += _table(["model", "oracle", "n", "EM", "F1", "contained"], split_rows)
    counts = sorted({int(k) for e in models for k in e["sets"][name]["robustness"]})
    if counts:
        lines += ["", "Robustness (EM with the oracle plus k distractors):", ""]
        curve_rows = []
        for entry in models:
            curve = entry["sets"][name]["robustness"]
            curve_rows.append(
                [entry["model"], *(_fmt(curve.get(str(k), {}).get("em")) for k in counts)]
            )
        lines += _table(["model", *(f"k={k}" for k in counts)], curve_rows)
        short = {k: v for k, v in set_info["short_of_distractors"].items() if v}
        if short:
            lines.append(f"(questions left out for want of distractors: {short})")
    return lines


def render_markdown(report: dict) -> str:
    settings = report["settings"]
    gen = report["models"][0]["generation"] if report["models"] else {}
    lines = [
        "## raft-dist eval",
        "",
        f"Greedy decoding, at most {gen.get('max_new_tokens')} new tokens, batch "
        f"{gen.get('batch_size')}, {settings['dtype']} on {settings['device']}, "
        f"{settings['processes']} process(es), seed {settings['seed']}.",
        "",
        "Models: "
        + "; ".join(
            f"{m['model']} (base {m['base']}"
            + (f", adapter {m['adapter']}" if m["adapter"] else "")
            + f", {m['seconds']:.0f} s)"
            for m in report["models"]
        ),
        "",
    ]
    for set_info in report["sets"]:
        lines += set_section(report, set_info) + [""]
    lines.append(
        "EM/F1: SQuAD-normalised, on the text after the last <ANSWER>: (to the end of that "
        "line). contained: the gold answer's tokens appear in order anywhere in the output. "
        "format: share of outputs with a final answer line."
    )
    return "\n".join(lines) + "\n"


def plot_robustness(report: dict, path: Path) -> bool:
    """One panel per eval set, one line per model; False when there is no curve to draw."""
    sets = [
        s
        for s in report["sets"]
        if any(m["sets"][s["name"]]["robustness"] for m in report["models"])
    ]
    if not sets:
        return False
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(sets), figsize=(5 * len(sets), 3.6), squeeze=False)
    for ax, set_info in zip(axes[0], sets, strict=True):
        for entry in report["models"]:
            curve = entry["sets"][set_info["name"]]["robustness"]
            ks = sorted(int(k) for k in curve)
            ax.plot(ks, [curve[str(k)]["em"] or 0.0 for k in ks], marker="o", label=entry["model"])
        ax.set_title(f"{set_info['name']} ({set_info['robustness_questions']} questions per point)")
        ax.set_xlabel("distractors next to the oracle")
        ax.set_ylabel("exact match")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return True


def write_report(report: dict, predictions: list[dict], out: Path) -> dict[str, Path]:
    """Every file of the report; report.json (written last) lists them under "files"."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out / REPORT_JSON,
        "markdown": out / REPORT_MD,
        "predictions": out / PREDICTIONS,
    }
    if plot_robustness(report, out / PLOT):
        paths["plot"] = out / PLOT
    report["files"] = {k: str(v) for k, v in paths.items()}
    write_atomic(paths["markdown"], render_markdown(report).encode("utf-8"))
    lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in predictions)
    write_atomic(paths["predictions"], lines.encode("utf-8"))
    write_json_atomic(paths["json"], report)
    return paths
