"""funkflow report: a PNG that is really a plot, and one HTML page that holds everything."""

from __future__ import annotations

import base64
import io

import numpy as np

from funkflow.pipeline.app.cli import main
from funkflow.pipeline.app.stages import run_pipeline


def test_report_writes_a_non_blank_png_and_a_self_contained_page(tiny_config, tmp_path):
    from PIL import Image

    run_pipeline(tiny_config(tmp_path / "run", "train.epochs=6"))
    assert main(["report", str(tmp_path / "run")]) == 0
    png = (tmp_path / "run" / "learning_curves.png").read_bytes()
    image = np.asarray(Image.open(io.BytesIO(png)).convert("L"))
    assert image.shape == (420, 1100)
    assert (image < 128).mean() > 0.005 and (image > 200).mean() > 0.5  # drawn lines on a white ground
    assert len(np.unique(image)) > 20
    page = (tmp_path / "run" / "report.html").read_text()
    assert base64.b64encode(png).decode() in page  # the image travels inside the page
    assert "test_rmse" in page and "train:" in page and "<td>6</td>" in page


def test_the_figure_names_the_run_tells_the_baselines_apart_and_counts_whole_epochs(tiny_config, tmp_path):
    import json

    from funkflow.pipeline.app.report import learning_curves_figure

    run_dir = tmp_path / "nightly-2026-12-03"
    run_pipeline(tiny_config(run_dir, "train.epochs=3"))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run_dir / "summary.json").read_text())
    fig = learning_curves_figure(rows, summary, 3, run_dir.name)
    assert "nightly-2026-12-03" in fig._suptitle.get_text()
    by_epoch = fig.axes[0]
    baselines = {line.get_label(): (line.get_color(), str(line.get_linestyle()))
                 for line in by_epoch.get_lines() if line.get_label().startswith("baseline")}
    assert {label.split(" 0.")[0].split(" 1.")[0] for label in baselines} == {
        "baseline, biases only", "baseline, global mean"}
    assert len(set(baselines.values())) == 2  # each its own colour and dash
    ticks = [t for t in by_epoch.get_xticks() if by_epoch.get_xlim()[0] <= t <= by_epoch.get_xlim()[1]]
    assert ticks and all(float(t).is_integer() for t in ticks)


def test_the_page_says_plainly_when_the_model_is_worse_than_the_biases(tiny_config, tmp_path, capsys):
    import json

    run_dir = tmp_path / "run"
    summary = run_pipeline(tiny_config(run_dir, "train.epochs=8"))
    assert summary["test_rmse"] < summary["baselines"]["biases"]["rmse"]
    assert main(["report", str(run_dir), "--out", str(tmp_path / "good")]) == 0
    assert "worse than the biases-only baseline" not in (tmp_path / "good" / "report.html").read_text()
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text())
    summary["test_rmse"] = summary["baselines"]["biases"]["rmse"] + 0.01  # as a model that adds error reads
    summary_path.write_text(json.dumps(summary))
    capsys.readouterr()
    assert main(["report", str(run_dir), "--out", str(tmp_path / "bad")]) == 0
    captured = capsys.readouterr()
    assert "worse than the biases-only baseline" in (tmp_path / "bad" / "report.html").read_text()
    assert "worse than the biases-only baseline" in captured.err
    assert captured.out.split() == [str(tmp_path / "bad" / name) for name in ("learning_curves.png", "report.html")]
