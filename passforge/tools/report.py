"""The per-pass report: one JSON contract (docs/report-format.md), rendered as a terminal table and as one
self-contained HTML page with plots.
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import math
import platform
from collections.abc import Sequence

import torch

from passforge.passes.manager import PipelineResult
from passforge.runtime.profile import METRIC_FIELDS

SCHEMA_VERSION = 1


def build_report(result: PipelineResult, *, model: str, device: torch.device) -> dict[str, object]:
    """The JSON report: model, pipeline, a baseline row and one row per pass (null where n/a)."""
    baseline = {name: result.baseline.get(name) for name in METRIC_FIELDS}
    passes = []
    for record in result.records:
        row: dict[str, object] = {
            "name": record.name,
            "spec": record.spec,
            "status": record.status,
            "lossy": record.lossy,
            "time_s": record.time_s,
        }
        row.update({name: record.metrics.get(name) for name in METRIC_FIELDS})
        row.update(stats=record.stats, notes=record.notes, error=record.error, reproducer=record.reproducer)
        passes.append(row)
    return _json_safe({
        "schema": SCHEMA_VERSION,
        "model": model,
        "pipeline": result.pipeline,
        "device": str(device),
        "machine": {"platform": platform.platform(), "processor": platform.machine(), "torch": torch.__version__},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "baseline": baseline,
        "passes": passes,
    })


def _json_safe(value: object) -> object:
    """NaN and infinities become null: report.json is strict JSON that every reader accepts."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


_COLUMNS = (
    ("pass", "spec"), ("status", "status"), ("time s", "time_s"), ("nodes", "nodes"), ("params", "params"),
    ("MB", "param_bytes"), ("latency ms", "latency_ms"), ("peak MB", "peak_mem_bytes"),
    ("max err", "max_abs_err"), ("cos", "cos"), ("KL", "kl"), ("ppl", "ppl"),
)


def _fmt(key: str, value: object) -> str:
    if value is None:
        return "—"
    if key in ("param_bytes", "peak_mem_bytes"):
        return f"{value / 2**20:.2f}"
    if key in ("nodes", "params"):
        return f"{value:,}"
    if key in ("max_abs_err", "kl"):
        return f"{value:.2e}"
    if key == "cos":
        return f"{value:.6f}"
    if isinstance(value, float):
        return f"{value:.3f}" if key != "ppl" else f"{value:.4f}"
    return str(value)


def table_rows(report: dict[str, object]) -> list[list[str]]:
    rows = [[_fmt(k, {**report["baseline"], "spec": "(captured)", "status": "", "time_s": None}.get(k))
             for _, k in _COLUMNS]]
    rows += [[_fmt(k, row.get(k)) for _, k in _COLUMNS] for row in report["passes"]]
    return rows


def render_table(report: dict[str, object]) -> str:
    """The per-pass table as text (rich, no colour codes)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"passforge: {report['model']} — {report['pipeline']} on {report['device']}")
    for title, key in _COLUMNS:
        table.add_column(title, justify="left" if key in ("spec", "status") else "right")
    for row in table_rows(report):
        table.add_row(*row)
    console = Console(record=True, width=150, file=io.StringIO(), color_system=None)
    console.print(table)
    errors = [f"  {row['spec']}: {row['error']}" for row in report["passes"] if row.get("error")]
    text = console.export_text()
    return text + ("errors:\n" + "\n".join(errors) + "\n" if errors else "")


def _plot_png(report: dict[str, object], metrics: Sequence[tuple[str, str]]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = ["captured"] + [row["spec"] for row in report["passes"]]
    rows = [report["baseline"], *report["passes"]]
    present = [(key, title) for key, title in metrics if any(r.get(key) is not None for r in rows)]
    fig, axes = plt.subplots(1, max(len(present), 1), figsize=(4.2 * max(len(present), 1), 3.4), squeeze=False)
    for ax, (key, title) in zip(axes[0], present):
        values = [r.get(key) if r.get(key) is not None else float("nan") for r in rows]
        if key in ("param_bytes", "peak_mem_bytes"):
            values = [v / 2**20 for v in values]
        ax.plot(range(len(labels)), values, marker="o")
        ax.set_title(title, fontsize=10)
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def render_html(report: dict[str, object]) -> str:
    """One self-contained page: header, the table, plots (embedded PNG) of size, speed and accuracy."""
    head = "".join(f"<th>{html.escape(title)}</th>" for title, _ in _COLUMNS)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in table_rows(report)
    )
    size_speed = _plot_png(
        report, [("nodes", "nodes"), ("param_bytes", "parameters (MB)"), ("latency_ms", "latency (ms)"),
                 ("peak_mem_bytes", "peak memory (MB)")]
    )
    accuracy = _plot_png(report, [("max_abs_err", "max abs error"), ("cos", "cosine vs original"),
                                  ("kl", "KL vs original"), ("ppl", "perplexity")])
    errors = "".join(
        f"<li><b>{html.escape(row['spec'])}</b>: {html.escape(str(row['error']))}</li>"
        for row in report["passes"] if row.get("error")
    )
    title = html.escape(f"passforge report — {report['model']}")
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}td:first-child{{text-align:left}}</style></head>
<body><h1>{title}</h1>
<p>pipeline <code>{html.escape(str(report['pipeline']))}</code> on {html.escape(str(report['device']))},
{html.escape(str(report['date']))}, torch {html.escape(str(report['machine']['torch']))}</p>
<table><tr>{head}</tr>{body}</table>
{f'<h2>Errors</h2><ul>{errors}</ul>' if errors else ''}
<h2>Size and speed</h2><img alt="size and speed per pass" src="data:image/png;base64,{size_speed}">
<h2>Accuracy</h2><img alt="accuracy per pass" src="data:image/png;base64,{accuracy}">
</body></html>
"""
