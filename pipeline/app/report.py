"""``funkflow report RUN_DIR``: learning curves as a PNG, and one self-contained HTML page.

The PNG has two panels, RMSE per epoch and per second of training, with the
train and validation curves, the epoch the model kept, the test RMSE, the
floor when known and the baselines. A tuned run adds ``tune.png``: each
trial's best validation RMSE against each searched value, and the trials'
curves. Each figure is titled with the run's name; the page says plainly when the model's test RMSE is
worse than the biases-only baseline's. The HTML page embeds the PNGs (base64) beside the summary, the trials
and the run's config, so it can be mailed or archived as one file. Plotting
needs matplotlib (``pip install 'funkflow[report]'``).
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

from funkflow.pipeline.app.tune import RungResult, read_tune_log
from funkflow.pipeline.core.errors import DataError, UsageError
from funkflow.pipeline.core.rundir import RunDir
from funkflow.tasks.io import write_bytes, write_text


def _rows(run_dir: Path) -> list[dict[str, Any]]:
    run = RunDir(run_dir)
    if not run.metrics.is_file():
        raise DataError(f"{run_dir}: no metrics.jsonl; train first")
    return run.metrics_rows()


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("funkflow report needs matplotlib: pip install 'funkflow[report]'") from None
    return plt


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    _pyplot().close(fig)
    return buffer.getvalue()


# Each baseline its own colour and dash, so that the two cannot be mistaken for each other.
BASELINE_STYLES: dict[str, tuple[str, Any]] = {"biases": ("tab:purple", "-."), "global_mean": ("tab:brown", ":")}
BASELINE_NAMES = {"biases": "biases only", "global_mean": "global mean"}


def _whole_epochs(axis) -> None:
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True))


def _readable_log_axis(axis) -> None:
    """Ticks at 1, 2 and 5 of each decade, printed as plain numbers (0.005, 0.01, 0.02), not powers of ten."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axis.set_minor_formatter(NullFormatter())


def worse_than_biases(summary: dict[str, Any] | None) -> str | None:
    """A plain sentence when the model's test RMSE is worse than the biases-only baseline's."""
    if not summary or summary.get("test_rmse") is None:
        return None
    biases = summary.get("baselines", {}).get("biases")
    if biases is None or summary["test_rmse"] <= biases["rmse"]:
        return None
    return (f"The model's test RMSE {summary['test_rmse']:.4f} is worse than the biases-only baseline's "
            f"{biases['rmse']:.4f}: the factors add error. Try a larger model.reg, fewer epochs or funkflow tune.")


def learning_curves_figure(rows: list[dict[str, Any]], summary: dict[str, Any] | None,
                           kept_epoch: int | None = None, title: str = ""):
    """The two-panel learning-curve figure; ``kept_epoch``: the epoch the model is from; ``title``: the run
    it shows."""
    plt = _pyplot()
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
            lines: list[tuple[str, Any, str, Any]] = [("test", summary.get("test_rmse"), "tab:green", "--"),
                                                      ("floor", summary.get("floor_rmse"), "black", "--")]
            lines += [(f"baseline, {BASELINE_NAMES.get(name, name)}", m["rmse"],
                       *BASELINE_STYLES.get(name, ("tab:gray", ":")))
                      for name, m in summary.get("baselines", {}).items()]
            for name, value, color, dash in lines:
                if value is not None:
                    ax.axhline(value, ls=dash, lw=1, color=color, label=f"{name} {value:.4f}")
        if kept_epoch is not None and 0 < kept_epoch <= len(rows):
            ax.axvline(x[kept_epoch - 1], ls=":", lw=1.2, color="tab:red", label=f"model: epoch {kept_epoch}")
        ax.set_xlabel(label)
        ax.set_ylabel("RMSE")
        ax.grid(alpha=0.3)
    _whole_epochs(axes[0].xaxis)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"funkflow learning curves: {title}" if title else "funkflow learning curves")
    fig.tight_layout()
    return fig


def tune_figure(results: list[RungResult], title: str = ""):
    """Each trial's best validation RMSE (at the last rung it reached) against each searched value, and the
    trials' validation curves, the winner's in bold; ``title``: the run."""
    plt = _pyplot()
    last = {}
    for result in sorted(results, key=lambda r: r.rung):
        last[result.trial] = result
    trials = list(last.values())
    best = min(trials, key=lambda r: (-r.rung, r.best_val, r.trial))
    keys = sorted(best.params)
    fig, axes = plt.subplots(1, len(keys) + 1, figsize=(3.2 * (len(keys) + 1), 3.4), dpi=100, squeeze=False)
    for ax, key in zip(axes[0], keys):
        ax.scatter([r.params[key] for r in trials], [r.best_val for r in trials], c=[r.rung for r in trials],
                   cmap="viridis", s=14)
        ax.scatter([best.params[key]], [best.best_val], marker="*", s=120, color="tab:red")
        ax.set_xscale("log")
        _readable_log_axis(ax.xaxis)
        ax.tick_params(axis="x", labelrotation=40, labelsize=8)
        ax.set_xlabel(key)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("best validation RMSE (colour: rung reached)")
    curves = axes[0][-1]
    for r in trials:
        winner = r is best
        curves.plot(range(1, len(r.val_rmse) + 1), r.val_rmse, lw=2 if winner else 0.7,
                    color="tab:red" if winner else "tab:gray", alpha=1 if winner else 0.5)
    curves.set_xlabel("epoch")
    _whole_epochs(curves.xaxis)
    curves.set_ylabel("validation RMSE")
    curves.grid(alpha=0.3)
    fig.suptitle(f"funkflow tune{': ' + title if title else ''}: {len(trials)} trials, trial {best.trial} won")
    fig.tight_layout()
    return fig


def report(run_dir: Path, out_dir: Path | None = None) -> tuple[list[Path], str | None]:
    """Write ``learning_curves.png``, ``tune.png`` for a tuned run, and ``report.html`` (to ``out_dir``,
    default the run directory). Returns the files written, and the warning the page shows when the model is
    worse than the biases-only baseline."""
    out_dir = out_dir or run_dir
    rows = _rows(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else None
    train_record = run_dir / "stages" / "train.json"
    kept = json.loads(train_record.read_text()).get("best_epoch") if train_record.is_file() else None
    title = run_dir.resolve().name
    png = _png(learning_curves_figure(rows, summary, kept, title))
    out_dir.mkdir(parents=True, exist_ok=True)
    png_path, html_path = out_dir / "learning_curves.png", out_dir / "report.html"
    write_bytes(png, png_path)
    written = [png_path]
    warning = worse_than_biases(summary)
    trials = read_tune_log(run_dir)
    tune_section = ""
    if trials:
        tune_image = _png(tune_figure(trials, title))
        write_bytes(tune_image, out_dir / "tune.png")
        written.append(out_dir / "tune.png")
        cells = "".join(f"<tr><td>{r.trial}</td><td>{r.epochs}</td><td>{r.best_val:.4f}</td><td>{r.best_epoch}</td>"
                        f"<td>{html.escape(', '.join(f'{k} {v:g}' for k, v in r.params.items()))}</td></tr>"
                        for r in sorted(trials, key=lambda r: (-r.rung, r.best_val, r.trial)))
        tune_section = (f'<h2>Tune</h2><img alt="trials" src="data:image/png;base64,'
                        f'{base64.b64encode(tune_image).decode()}"><table><tr><th>trial</th><th>epochs (rung)</th>'
                        f"<th>best validation RMSE</th><th>at epoch</th><th>values</th></tr>{cells}</table>")
    config = (run_dir / "config.yaml").read_text() if (run_dir / "config.yaml").is_file() else ""
    table = "".join(f"<tr><td>{r['epoch']}</td><td>{r['train_rmse']:.4f}</td><td>"
                    f"{'' if r.get('val_rmse') is None else format(r['val_rmse'], '.4f')}</td><td>{r['lr']:.4g}</td>"
                    f"<td>{r['seconds']:.2f}</td></tr>" for r in rows)
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>funkflow report: {html.escape(str(run_dir))}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}td,th{{padding:2px 10px;text-align:right}}
pre{{background:#f4f4f4;padding:1em;overflow:auto}}</style></head><body>
<h1>funkflow run {html.escape(str(run_dir))}</h1>
{f'<p style="color:#a00"><strong>{html.escape(warning)}</strong></p>' if warning else ""}
<h2>Summary</h2><pre>{html.escape(json.dumps(summary, indent=2)) if summary else "not evaluated yet"}</pre>
<h2>Learning curves</h2><img alt="learning curves" src="data:image/png;base64,{base64.b64encode(png).decode()}">
{tune_section}
<h2>Epochs</h2><table><tr><th>epoch</th><th>train RMSE</th><th>validation RMSE</th><th>lr</th><th>seconds</th></tr>
{table}</table>
<h2>Config</h2><pre>{html.escape(config)}</pre>
</body></html>
"""
    write_text(page, html_path)
    return [*written, html_path], warning
