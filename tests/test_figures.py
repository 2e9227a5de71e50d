"""The report's figures read as they claim: accuracy-vs-cost labels never overlap, learning curves give
each configuration its own colour with the legend outside the axes and intervals only where three
or more seeds allow them, the gradient figure plots the body's 3x3 convs only, and feature-reuse heatmaps
name their normalization and show the init matrices below the trained ones. Figures from tables built
here (no store, no torch)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_hex

from densenet_exp.analysis import figures
from densenet_exp import record, report
from densenet_exp.measures import run_figures

DATA = "fashion_mnist"
ACC, PARAMS, FLOPS = record.TEST_ACC, record.PARAMS, record.FLOPS_PER_IMAGE


def drawn(fig):
    """The renderer of `fig` once drawn (layout done, labels placed)."""
    if not isinstance(fig.canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)
    fig.canvas.draw()
    return fig.canvas.get_renderer()


def crowded_summary() -> pd.DataFrame:
    """Twelve configurations, eight of them within a few percent of each other in cost and accuracy
    (where labels beside the points would run into each other), one with a single seed (no interval)."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(12):
        family = ("densenet", "resnet", "plain")[i % 3]
        params = 2.5e5 * (1 + 0.02 * i) if i < 8 else 4e4 * (i - 6)
        acc = 0.82 + 0.003 * rng.standard_normal()
        half = 0.0 if i == 5 else 0.02
        rows.append({"data": DATA, "family": family, "variant": f"config-{i:02d}",
                     f"{PARAMS} mean": params, f"{FLOPS} mean": params * 200, f"{ACC} mean": acc,
                     f"{ACC} ci_low": acc - half if half else np.nan, f"{ACC} ci_high": acc + half if half else np.nan})
    return pd.DataFrame(rows)


def test_accuracy_vs_cost_numbers_overlap_no_other_number_no_point_and_stay_in_the_axes():
    summary = crowded_summary()
    fig = figures.plot_accuracy_vs_cost(summary, DATA)
    renderer = drawn(fig)
    axes = [ax for ax in fig.axes if ax.get_xlabel()]
    assert len(axes) == 2
    for ax, cost in zip(axes, (PARAMS, FLOPS)):
        labels = [t for t in ax.texts if t.get_text().isdigit()]
        assert sorted(int(t.get_text()) for t in labels) == list(range(1, 13))
        boxes = [t.get_window_extent(renderer) for t in labels]
        for i, a in enumerate(boxes):
            assert all(not a.overlaps(b) for b in boxes[i + 1:]), labels[i].get_text()
            frame = ax.get_window_extent(renderer)
            assert frame.contains(a.x0, a.y0) and frame.contains(a.x1, a.y1)
        points = ax.transData.transform(summary[[f"{cost} mean", f"{ACC} mean"]].to_numpy(float))
        for box, label in zip(boxes, labels):
            inside = [i for i, (x, y) in enumerate(points) if box.contains(x, y)]
            assert inside == [], f"label {label.get_text()} covers point(s) {inside}"
    # The legend table: one numbered entry per configuration, outside both axes.
    (legend,) = fig.legends
    entries = [t.get_text() for t in legend.get_texts()]
    assert entries[0].startswith("1  ") and len(entries) == 12 and all(f"config-{i:02d}" in " ".join(entries)
                                                                        for i in range(12))
    box = legend.get_window_extent(renderer)
    assert all(not box.overlaps(ax.get_window_extent(renderer)) for ax in axes)


KEYS = {"dense-a": "a0a0a0a0", "dense-b": "b1b1b1b1", "res-a": "c2c2c2c2"}  # each configuration's config_key


def curves_table(checks_per_epoch: int = 1) -> pd.DataFrame:
    """Three epochs of val/acc, as results.learning_curves gives them: two configurations of three
    seeds, one of a single seed. With two checks per epoch the mid-epoch check is 0.2 below the
    end-of-epoch one, so a point that averaged the two checks of a run would hold a value no run had."""
    rows = []
    for variant, family, seeds in (("dense-a", "densenet", 3), ("dense-b", "densenet", 3), ("res-a", "resnet", 1)):
        for seed in range(seeds):
            for check in range(1, 3 * checks_per_epoch + 1):
                end = check % checks_per_epoch == 0
                rows.append({"data": DATA, "family": family, "variant": variant, "config_key": KEYS[variant], "seed": seed,
                             "run_id": f"{variant}-{seed}", "check": check, "epoch": check / checks_per_epoch,
                             "value": 0.5 + 0.1 * check / checks_per_epoch + 0.01 * seed - (0 if end else 0.2),
                             "lr_drops": (1, 2)})
    return pd.DataFrame(rows)


def test_learning_curves_one_colour_per_configuration_legend_outside_and_no_interval_from_one_seed():
    fig = figures.plot_learning_curves(curves_table(), DATA)
    renderer = drawn(fig)
    (ax,) = fig.axes
    lines = {c.get_label(): c.lines[0] for c in ax.containers}  # one error-bar container per configuration
    assert len(lines) == 3
    assert len({to_hex(line.get_color()) for line in lines.values()}) == 3  # two DenseNets, two colours
    assert ax.get_legend() is None and len(fig.legends) == 1
    assert not fig.legends[0].get_window_extent(renderer).overlaps(ax.get_window_extent(renderer))
    # Error bars: the three-seed configurations have spread; the single seed draws none.
    heights = {}
    for container in ax.containers:
        segments = container.lines[2][0].get_segments()
        heights[container.get_label()] = [abs(s[1][1] - s[0][1]) for s in segments]
    single = next(k for k in heights if k.startswith("res-a"))
    assert heights[single] == [0, 0, 0] and "n=1" in single
    assert all(h > 0 for k, v in heights.items() if k != single for h in v)


def test_learning_curve_points_hold_one_value_per_run_at_each_check():
    curves = curves_table(checks_per_epoch=2)
    points = figures.curve_points(curves)
    for (variant, check), point in points.set_index(["variant", "check"]).iterrows():
        at_check = curves[(curves["variant"] == variant) & (curves["check"] == check)]
        assert point["runs"] == at_check["run_id"].nunique() == len(at_check)
        assert point["mean"] == pytest.approx(at_check["value"].mean())  # not pooled with the epoch's other check
        assert point["epoch"] == at_check["epoch"].iloc[0]
    assert sorted(points["epoch"].unique()) == [0.5, 1.0, 1.5, 2.0, 2.5, 3.0]
    with pytest.raises(ValueError, match="one value per run per point"):
        figures.curve_points(pd.concat([curves, curves.iloc[[0]]]))
    # Two configurations under one name stay apart, each named by its key.
    one_name = figures.curve_points(curves.replace({"variant": {"dense-a": "dense", "dense-b": "dense"}}))
    assert set(one_name["variant"]) == {"dense [a0a0a0]", "dense [b1b1b1]", "res-a"}
    assert one_name.loc[one_name["variant"] != "res-a", "runs"].eq(3).all()


def test_learning_curves_name_points_with_fewer_runs_than_planned_and_mark_the_lr_drops():
    curves = curves_table(checks_per_epoch=2)
    curves = curves[~((curves["run_id"] == "dense-a-2") & (curves["check"] == 6))]  # a run without its last check
    fig = figures.plot_learning_curves(curves, DATA, planned={"dense-b": 4})
    drawn(fig)
    (ax,) = fig.axes
    notes = [t.get_text() for t in ax.texts if t.get_text().startswith("n=")]
    assert sorted(notes) == ["n=2"] + ["n=3"] * 6  # dense-a's last check; dense-b: 3 of 4 planned at every check
    drops = [line.get_xdata()[0] for line in ax.get_lines() if line.get_linestyle() == ":"]
    assert drops == [1, 2] and "fewer runs than planned" in ax.get_title()


def grads_rows(variant: str, family: str, seed: int, layers: list[tuple[str, str, str]], recorded: bool) -> list[dict]:
    """relative_grads rows of one run: 10 for every layer but the body convs (0.01 to 0.1); without the
    role column where not `recorded` (a file from before the probe recorded roles)."""
    return [{"data": DATA, "family": family, "variant": variant, "seed": seed, "run_id": f"{variant}-{seed}",
             "phase": "init", "step": 0, "depth": d, "relative_depth": d / (len(layers) - 1), "layer": name,
             "kind": kind, "role": role if recorded else None, "grad_norm": 1.0, "weight_norm": 1.0,
             "relative_grad": 10.0 if role != "body" else 0.01 * (d + 1)}
            for d, (name, kind, role) in enumerate(layers)]


def test_gradient_figure_plots_the_body_convs_only_by_their_position_among_them():
    dense = [("features.conv0", "Conv2d", "stem"), ("a.conv1", "Conv2d", "bottleneck"), ("a.conv2", "Conv2d", "body"),
             ("t.conv", "Conv2d", "transition"), ("b.conv1", "Conv2d", "bottleneck"), ("b.conv2", "Conv2d", "body"),
             ("c.conv2", "Conv2d", "body"), ("classifier", "Linear", "classifier")]
    resnet = [("conv1", "Conv2d", "stem"), ("layer1.0.conv1", "Conv2d", "body"), ("layer1.0.conv2", "Conv2d", "body"),
              ("fc", "Linear", "classifier")]
    grads = pd.DataFrame([*(r for s in range(2) for r in grads_rows("dense", "densenet", s, dense, recorded=True)),
                          *(r for s in range(2) for r in grads_rows("res", "resnet", s, resnet, recorded=False))])
    fig = figures.plot_relative_grads(grads, DATA)
    ax = fig.axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    x, y = lines["dense (DenseNet)"].get_data()
    assert list(x) == [0, 0.5, 1] and max(y) < 1  # the three 3x3 convs; no stem, bottleneck or classifier (10)
    x, y = lines["res (ResNet)"].get_data()
    assert list(x) == [0, 1] and max(y) < 1
    assert "3x3" in ax.get_xlabel() and len(fig.legends) == 1


def test_feature_reuse_heatmap_names_its_normalization_and_shows_init_below_trained():
    uniform = np.array([[1.0, 1.0, 1.0], [np.nan, 1.0, 1.0], [np.nan, np.nan, 1.0]])
    trained = uniform * np.array([[2.0], [1.0], [1.0]])  # training doubled the weight on the block input
    fig = run_figures.plot_feature_reuse([trained, trained], "t", init=[uniform, uniform], normalization="column mean")
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
    old = run_figures.plot_feature_reuse([trained], "old")
    assert sum(1 for ax in old.axes if ax.images) == 1
    assert any("no init matrix recorded" in t.get_text() for t in [*old.texts, old._supxlabel] if t is not None)
    assert "block max = 1" in next(ax for ax in old.axes if not ax.images).get_ylabel().replace("\n", " ")
    with pytest.raises(ValueError, match="normalization='row'"):
        run_figures.plot_feature_reuse([trained], normalization="row")


def test_report_feature_reuse_figures_set_the_mean_init_matrix_below_the_trained_one(tmp_path):
    block = np.array([[1.0, 2.0], [np.nan, 3.0]])
    runs = pd.DataFrame({"run_id": ["a", "b", "c"], "variant": ["d", "d", "e"], "data": DATA, "model": ["d", "d", "e"],
                         "growth_rate": 12, "compression": 0.5, "bottleneck": True, "config_key": ["k1", "k1", "k2"]})
    matrices = {"a": [block], "b": [block], "c": [block]}
    made = report.feature_reuse_figures(runs, matrices, tmp_path, init={"a": [block], "b": [block * 3]})
    captions = dict((path.name, caption) for path, caption in made)
    assert len(captions) == 2 and all(path.is_file() for path, _ in made)
    assert "at initialization: mean of 2 runs" in next(c for n, c in captions.items() if "_d" in n)
    assert "no init matrix recorded" in next(c for n, c in captions.items() if "_e" in n)
    assert all("1 = uniform weighting" in c for c in captions.values())
