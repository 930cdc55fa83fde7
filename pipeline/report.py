"""``funkflow report RUN_DIR``: learning curves as a PNG, and one self-contained HTML page.

The PNG has two panels, RMSE per epoch and per second of training, with the
train and validation curves, the test RMSE, the floor when known and the
baselines. The HTML page embeds that PNG (base64) beside the summary and the
run's config, so it can be mailed or archived as one file. Plotting needs
matplotlib (``pip install 'funkflow[report]'``).
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

from funkflow.pipeline.errors import DataError, UsageError
from funkflow.tasks.io import write_bytes, write_text


def _rows(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise DataError(f"{run_dir}: no metrics.jsonl; train first")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def learning_curves_png(rows: list[dict[str, Any]], summary: dict[str, Any] | None) -> bytes:
    """The two-panel learning-curve figure as PNG bytes."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("funkflow report needs matplotlib: pip install 'funkflow[report]'") from None
    epochs = [r["epoch"] for r in rows]
    elapsed, total = [], 0.0
    for r in rows:
        total += r["seconds"]
        elapsed.append(total)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=100)
    for ax, x, label in ((axes[0], epochs, "epoch"), (axes[1], elapsed, "seconds of training")):
        ax.plot(x, [r["train_rmse"] for r in rows], marker="o", ms=3, label="train (as the pass met it)")
        if any(r.get("val_rmse") is not None for r in rows):
            ax.plot(x, [r.get("val_rmse") for r in rows], marker="o", ms=3, label="validation")
        if summary:
            lines = [("test", summary.get("test_rmse"), "tab:green"), ("floor", summary.get("floor_rmse"), "black")]
            lines += [(f"baseline: {name}", m["rmse"], "tab:gray") for name, m in summary.get("baselines", {}).items()]
            for name, value, color in lines:
                if value is not None:
                    ax.axhline(value, ls="--", lw=1, color=color, label=f"{name} {value:.4f}")
        ax.set_xlabel(label)
        ax.set_ylabel("RMSE")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("funkflow learning curves")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def report(run_dir: Path, out_dir: Path | None = None) -> tuple[Path, Path]:
    """Write ``learning_curves.png`` and ``report.html`` (to ``out_dir``, default the run directory)."""
    out_dir = out_dir or run_dir
    rows = _rows(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else None
    png = learning_curves_png(rows, summary)
    out_dir.mkdir(parents=True, exist_ok=True)
    png_path, html_path = out_dir / "learning_curves.png", out_dir / "report.html"
    write_bytes(png, png_path)
    config = (run_dir / "config.yaml").read_text() if (run_dir / "config.yaml").is_file() else ""
    table = "".join(f"<tr><td>{r['epoch']}</td><td>{r['train_rmse']:.4f}</td><td>"
                    f"{'' if r.get('val_rmse') is None else format(r['val_rmse'], '.4f')}</td><td>{r['lr']:.4g}</td>"
                    f"<td>{r['seconds']:.2f}</td></tr>" for r in rows)
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>funkflow report: {html.escape(str(run_dir))}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}td,th{{padding:2px 10px;text-align:right}}
pre{{background:#f4f4f4;padding:1em;overflow:auto}}</style></head><body>
<h1>funkflow run {html.escape(str(run_dir))}</h1>
<h2>Summary</h2><pre>{html.escape(json.dumps(summary, indent=2)) if summary else "not evaluated yet"}</pre>
<h2>Learning curves</h2><img alt="learning curves" src="data:image/png;base64,{base64.b64encode(png).decode()}">
<h2>Epochs</h2><table><tr><th>epoch</th><th>train RMSE</th><th>validation RMSE</th><th>lr</th><th>seconds</th></tr>
{table}</table>
<h2>Config</h2><pre>{html.escape(config)}</pre>
</body></html>
"""
    write_text(page, html_path)
    return png_path, html_path
