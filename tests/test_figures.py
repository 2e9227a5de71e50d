"""The report's figures read as they claim: feature-reuse heatmaps name their normalization and show
the init matrices below the trained ones. Figures from tables built here (no store, no torch)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from densenet_exp import figures, report

DATA = "fashion_mnist"


def test_feature_reuse_heatmap_names_its_normalization_and_shows_init_below_trained():
    uniform = np.array([[1.0, 1.0, 1.0], [np.nan, 1.0, 1.0], [np.nan, np.nan, 1.0]])
    trained = uniform * np.array([[2.0], [1.0], [1.0]])  # training doubled the weight on the block input
    fig = figures.plot_feature_reuse([trained, trained], "t", init=[uniform, uniform], normalization="column mean")
    heatmaps = [ax for ax in fig.axes if ax.images]
    assert [ax.get_title() for ax in heatmaps] == [
        "Dense block 1, trained", "Dense block 2, trained",
        "Dense block 1, at initialization (step 0)", "Dense block 2, at initialization (step 0)"]
    colorbar = next(ax for ax in fig.axes if not ax.images and ax.get_ylabel())
    assert "1 = uniform weighting" in colorbar.get_ylabel().replace("\n", " ")
    init_cells = heatmaps[2].images[0].get_array()
    np.testing.assert_allclose(init_cells[~init_cells.mask], 1.0)  # uniform: 1 everywhere
    assert heatmaps[0].images[0].get_array()[0, 1] == pytest.approx(2 / 1.5)  # column (2, 1) over its mean
    # Old runs recorded no init matrix: one row, and the figure says so.
    old = figures.plot_feature_reuse([trained], "old")
    assert sum(1 for ax in old.axes if ax.images) == 1
    assert any("no init matrix recorded" in t.get_text() for t in [*old.texts, old._supxlabel] if t is not None)
    assert "block max = 1" in next(ax for ax in old.axes if not ax.images).get_ylabel().replace("\n", " ")
    with pytest.raises(ValueError, match="normalization='row'"):
        figures.plot_feature_reuse([trained], normalization="row")


def test_report_feature_reuse_figures_set_the_mean_init_matrix_below_the_trained_one(tmp_path):
    block = np.array([[1.0, 2.0], [np.nan, 3.0]])
    runs = pd.DataFrame({"run_id": ["a", "b", "c"], "variant": ["d", "d", "e"], "data": DATA, "model": ["d", "d", "e"],
                         "growth_rate": 12, "compression": 0.5, "bottleneck": True})
    matrices = {"a": [block], "b": [block], "c": [block]}
    made = report.feature_reuse_figures(runs, matrices, tmp_path, init={"a": [block], "b": [block * 3]})
    captions = dict((path.name, caption) for path, caption in made)
    assert len(captions) == 2 and all(path.is_file() for path, _ in made)
    assert "at initialization: mean of 2 runs" in next(c for n, c in captions.items() if "_d" in n)
    assert "no init matrix recorded" in next(c for n, c in captions.items() if "_e" in n)
    assert all("1 = uniform weighting" in c for c in captions.values())
