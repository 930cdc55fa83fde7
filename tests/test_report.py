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
