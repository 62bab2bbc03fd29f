"""Synthetic label-free plates: determinism, truth consistency, morphology, files."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from scipy import ndimage as ndi

from metascreen.measure import measure_cells
from metascreen.synth import LAYOUT_COLUMNS, demo_layout, render_field, write_plate

SMALL = {"shape": (192, 192), "cells_per_field": (4, 8), "fields_per_well": 2}


def small_layout() -> pd.DataFrame:
    """Three wells of the demo layout: pure low, pure high and a 50 % mixture."""
    layout = demo_layout()
    return layout[layout["well"].isin(["A01", "A03", "A04"])].reset_index(drop=True)


def digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def plate(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_plate(tmp_path_factory.mktemp("plate"), layout=small_layout(), seed=3, **SMALL)


# ------------------------------------------------------------------ render_field


def test_render_field_is_deterministic_per_seed():
    a = render_field(np.random.default_rng(7), fraction_positive=0.5, n_cells=20)
    b = render_field(np.random.default_rng(7), fraction_positive=0.5, n_cells=20)
    c = render_field(np.random.default_rng(8), fraction_positive=0.5, n_cells=20)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[0], c[0])
    assert not np.array_equal(a[1], c[1])


def test_render_field_types_and_truth():
    image, labels, is_positive = render_field(np.random.default_rng(1), fraction_positive=0.5, n_cells=40)
    assert image.shape == labels.shape == (512, 512)
    assert image.dtype == np.uint16 and labels.dtype == np.int32 and is_positive.dtype == bool
    assert image.max() <= 4095  # 12-bit camera
    assert 1500 < np.median(image[labels == 0]) < 2500
    ids = np.unique(labels)
    np.testing.assert_array_equal(ids, np.arange(labels.max() + 1))  # 0 and 1..n, no gaps
    assert 35 <= labels.max() <= 40 and is_positive.shape == (labels.max(),)
    assert 0 < is_positive.sum() < is_positive.size
    # plausible sizes: cells away from the border are whole (>= ~250 px, less a clipped touch)
    areas = np.bincount(labels.ravel())[1:]
    centroids = np.array(ndi.center_of_mass(labels > 0, labels, ids[1:]))
    whole = np.all((centroids > 40) & (centroids < 472), axis=1)
    assert areas.max() < 1500 and np.all(areas[whole] >= 200)


@pytest.mark.parametrize(("fraction", "expected"), [(0.0, False), (1.0, True)])
def test_render_field_pure_types(fraction: float, expected: bool):
    _, labels, is_positive = render_field(np.random.default_rng(2), fraction_positive=fraction, n_cells=15)
    assert labels.max() == is_positive.size > 10
    assert np.all(is_positive == expected)


def test_empty_field_has_no_cells_but_noise():
    image, labels, is_positive = render_field(np.random.default_rng(3), fraction_positive=0.5, n_cells=0)
    assert labels.max() == 0 and is_positive.shape == (0,)
    assert image.std() > 10  # shot and read noise


def test_field_looks_label_free():
    """Phase-contrast-like: dark cell bodies, a bright halo just outside, uneven light."""
    image, labels, _ = render_field(np.random.default_rng(4), fraction_positive=0.5, n_cells=40)
    image = image.astype(float)
    cells = labels > 0
    ring = ndi.binary_dilation(cells, iterations=2) & ~cells
    far = ~ndi.binary_dilation(cells, iterations=15)
    background = np.median(image[far])
    assert np.median(image[cells]) < 0.95 * background
    assert np.median(image[ring]) > 1.02 * background
    # cells are textured (granules, rim, nucleus), not flat discs
    assert np.median(ndi.standard_deviation(image, labels, np.arange(1, labels.max() + 1))) > 60
    # the illumination is uneven: the smooth background varies by several percent
    smooth = ndi.uniform_filter(np.where(far, image, background), 64)[32:-32, 32:-32]
    assert smooth.max() / smooth.min() > 1.05


def test_out_of_focus_blurs_the_same_cells():
    sharp, labels_a, _ = render_field(np.random.default_rng(5), fraction_positive=0.5, n_cells=30)
    blurred, labels_b, _ = render_field(
        np.random.default_rng(5), fraction_positive=0.5, n_cells=30, out_of_focus=True
    )
    np.testing.assert_array_equal(labels_a, labels_b)

    def detail(image: np.ndarray) -> float:
        smooth = ndi.gaussian_filter(image.astype(float), 1.0)  # above the pixel noise
        return float(np.abs(ndi.laplace(smooth))[labels_a > 0].mean())

    assert detail(blurred) < 0.5 * detail(sharp)


def test_types_differ_in_elongation_but_overlap():
    tables = []
    for seed in range(6):
        image, labels, is_positive = render_field(np.random.default_rng(100 + seed), fraction_positive=0.5)
        table = measure_cells(labels, image)
        tables.append(table.assign(positive=is_positive[table["label"] - 1]))
    cells = pd.concat(tables)
    cells = cells[~cells["touches_border"]]
    low = cells.loc[~cells["positive"], "elongation"]
    high = cells.loc[cells["positive"], "elongation"]
    assert len(low) > 50 and len(high) > 50
    assert high.mean() - low.mean() > 0.3
    assert 0.15 < low.mean() < 0.35 and 0.5 < high.mean() < 0.75
    assert low.max() > high.min()  # overlapping distributions
    # sizes: round cells ~18-30 px across, elongated ones ~40-70 px long
    assert cells.loc[~cells["positive"], "major_axis_length"].median() < 30
    assert 35 < cells.loc[cells["positive"], "major_axis_length"].median() < 60
    # no single elongation threshold separates the two types perfectly
    thresholds = np.sort(cells["elongation"].to_numpy())
    accuracy = [((cells["elongation"] > t) == cells["positive"]).mean() for t in thresholds]
    assert 0.85 < max(accuracy) < 1.0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"fraction_positive": -0.1},
        {"fraction_positive": 1.5},
        {"fraction_positive": 0.5, "shape": (32, 512)},
        {"fraction_positive": 0.5, "shape": (512,)},
        {"fraction_positive": 0.5, "n_cells": -1},
        {"fraction_positive": 0.5, "clumping": 2.0},
    ],
)
def test_render_field_rejects_bad_arguments(kwargs: dict):
    with pytest.raises(ValueError):
        render_field(np.random.default_rng(0), **kwargs)


# ------------------------------------------------------------------ demo_layout


def test_demo_layout():
    layout = demo_layout()
    assert tuple(layout.columns) == LAYOUT_COLUMNS
    assert len(layout) == 24 and layout["well"].is_unique
    assert set(layout["well"]) == {f"{r}{c:02d}" for r in "ABCD" for c in range(1, 7)}
    assert (layout["plate"] == "demo").all() and (layout["condition"] == "untreated").all()
    counts = layout["sample"].value_counts().to_dict()
    assert counts == {
        "ctrl_low": 4,
        "ctrl_high": 4,
        "mix50": 4,
        "mix10": 3,
        "mix25": 3,
        "mix75": 3,
        "mix90": 3,
    }
    per_sample = layout.drop_duplicates("sample").set_index("sample")
    assert per_sample.loc["ctrl_low", ["cell_line", "train_class", "nominal_fraction"]].tolist() == [
        "LoMet",
        "low_potential",
        0.0,
    ]
    assert per_sample.loc["ctrl_high", ["cell_line", "train_class", "nominal_fraction"]].tolist() == [
        "HiMet",
        "high_potential",
        1.0,
    ]
    mixes = per_sample.loc[["mix10", "mix25", "mix50", "mix75", "mix90"]]
    np.testing.assert_allclose(mixes["nominal_fraction"], [0.1, 0.25, 0.5, 0.75, 0.9])
    assert (mixes["train_class"] == "").all() and (mixes["cell_line"] == "LoMet+HiMet").all()
    # spread: every sample occupies at least two rows and never twice in a row
    rows = layout.assign(row=layout["well"].str[0])
    assert (rows.groupby("sample")["row"].nunique() >= 2).all()
    assert not rows.duplicated(["sample", "row"]).any()


# ------------------------------------------------------------------ write_plate


def test_write_plate_file_names(plate: Path):
    names = {p.name for p in (plate / "images").iterdir()}
    expected = {f"demo_{w}_s{s}_w1.TIF" for w in ("A01", "A03", "A04") for s in (1, 2)}
    assert names == expected
    assert all(re.fullmatch(r"demo_[A-P]\d{2}_s\d+_w\d+\.TIF", n) for n in names)
    masks = {p.name for p in (plate / "truth" / "masks").iterdir()}
    assert masks == {n.replace("_w1.TIF", ".tif") for n in expected}
    image = tifffile.imread(plate / "images" / "demo_A03_s2_w1.TIF")
    assert image.shape == (192, 192) and image.dtype == np.uint16
    with tifffile.TiffFile(plate / "images" / "demo_A03_s2_w1.TIF") as tif:
        assert len(tif.pages) == 1 and tif.pages[0].compression == tifffile.COMPRESSION.ADOBE_DEFLATE


def test_write_plate_truth_tables_match_masks(plate: Path):
    cells = pd.read_csv(plate / "truth" / "cells.csv")
    assert list(cells.columns) == [
        "plate",
        "well",
        "field",
        "label",
        "cell_type",
        "is_positive",
        "area",
        "centroid_y",
        "centroid_x",
    ]
    for (well, field), group in cells.groupby(["well", "field"]):
        mask = tifffile.imread(plate / "truth" / "masks" / f"demo_{well}_s{field + 1}.tif")
        ids = np.unique(mask)
        np.testing.assert_array_equal(group["label"], ids[ids > 0])
        np.testing.assert_array_equal(group["area"], np.bincount(mask.ravel())[ids[ids > 0]])
    assert set(cells["field"]) == {0, 1}
    assert ((cells["cell_type"] == "high_potential") == cells["is_positive"]).all()
    # a pure-low well, a pure-high well and a mixture
    by_well = cells.groupby("well")["is_positive"].mean()
    assert by_well["A01"] == 0.0 and by_well["A04"] == 1.0 and 0.0 < by_well["A03"] < 1.0

    per_well = pd.read_csv(plate / "truth" / "per_well.csv", keep_default_na=False)
    assert list(per_well.columns) == [
        "plate",
        "well",
        "sample",
        "n_cells",
        "fraction_positive",
        "nominal_fraction",
    ]
    per_well = per_well.set_index("well")
    np.testing.assert_array_equal(per_well.loc[by_well.index, "n_cells"], cells.groupby("well").size())
    np.testing.assert_allclose(per_well.loc[by_well.index, "fraction_positive"], by_well)
    assert per_well.loc["A03", "nominal_fraction"] == 0.5

    per_sample = pd.read_csv(plate / "truth" / "per_sample.csv").set_index("sample")
    assert list(per_sample.columns) == ["n_wells", "n_cells", "fraction_positive", "nominal_fraction"]
    assert per_sample.loc["mix50", "n_cells"] == (cells["well"] == "A03").sum()
    assert per_sample.loc["mix50", "fraction_positive"] == pytest.approx(by_well["A03"])

    platemap = pd.read_csv(plate / "platemap.csv", keep_default_na=False)
    pd.testing.assert_frame_equal(platemap, small_layout())


def test_write_plate_is_deterministic_and_order_independent(plate: Path, tmp_path: Path):
    again = write_plate(tmp_path / "again", layout=small_layout(), seed=3, **SMALL)
    assert digests(again) == digests(plate)
    reordered = write_plate(tmp_path / "reordered", layout=small_layout().iloc[::-1], seed=3, **SMALL)
    for name in ("demo_A03_s1_w1.TIF", "demo_A04_s2_w1.TIF"):
        assert (reordered / "images" / name).read_bytes() == (plate / "images" / name).read_bytes()
    other = write_plate(tmp_path / "other", layout=small_layout(), seed=4, **SMALL)
    assert (other / "images" / "demo_A03_s1_w1.TIF").read_bytes() != (
        plate / "images" / "demo_A03_s1_w1.TIF"
    ).read_bytes()


def test_write_plate_z_stacks_and_channels(tmp_path: Path):
    layout = small_layout().iloc[:1]
    out = write_plate(tmp_path, layout=layout, z_planes=3, channels=2, **{**SMALL, "fields_per_well": 1})
    assert {p.name for p in (out / "images").iterdir()} == {"demo_A01_s1_w1.TIF", "demo_A01_s1_w2.TIF"}
    stacks = []
    for channel in (1, 2):
        with tifffile.TiffFile(out / "images" / f"demo_A01_s1_w{channel}.TIF") as tif:
            assert len(tif.pages) == 3
            assert tif.is_imagej and tif.series[0].axes == "ZYX"
            stacks.append(tif.asarray())
    phase, brightfield = stacks
    assert phase.shape == brightfield.shape == (3, 192, 192)
    assert not np.array_equal(phase, brightfield)
    # the middle plane is the sharpest
    cells = tifffile.imread(out / "truth" / "masks" / "demo_A01_s1.tif") > 0
    sharpness = [np.abs(ndi.laplace(ndi.gaussian_filter(p.astype(float), 1.0)))[cells].mean() for p in phase]
    assert sharpness[1] > 1.5 * max(sharpness[0], sharpness[2])
    # same cells in every channel: the truth does not depend on the channel count
    single = write_plate(tmp_path / "single", layout=layout, **{**SMALL, "fields_per_well": 1})
    np.testing.assert_array_equal(
        tifffile.imread(out / "truth" / "masks" / "demo_A01_s1.tif"),
        tifffile.imread(single / "truth" / "masks" / "demo_A01_s1.tif"),
    )


def test_write_plate_empty_fields(tmp_path: Path):
    out = write_plate(tmp_path, layout=small_layout(), p_empty=1.0, **SMALL)
    assert pd.read_csv(out / "truth" / "cells.csv").empty
    for mask in (out / "truth" / "masks").iterdir():
        assert tifffile.imread(mask).max() == 0
    per_well = pd.read_csv(out / "truth" / "per_well.csv")
    assert (per_well["n_cells"] == 0).all() and per_well["fraction_positive"].isna().all()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"layout": small_layout().drop(columns="sample")}, "missing columns"),
        ({"layout": small_layout().assign(well=["A1", "A03", "A04"])}, "well ids"),
        ({"layout": small_layout().assign(well="A01")}, "more than once"),
        ({"layout": small_layout().assign(nominal_fraction=[0.0, 1.5, 1.0])}, "nominal_fraction"),
        ({"layout": small_layout().iloc[:0]}, "no wells"),
        ({"shape": (16, 16)}, "shape"),
        ({"cells_per_field": (5, 2)}, "cells_per_field"),
        ({"fields_per_well": 0}, "fields_per_well"),
        ({"z_planes": 0}, "z_planes"),
        ({"channels": 0}, "channels"),
        ({"p_empty": 1.5}, "p_empty"),
        ({"p_out_of_focus": -0.5}, "p_out_of_focus"),
    ],
)
def test_write_plate_rejects_bad_arguments(tmp_path: Path, change: dict, message: str):
    with pytest.raises(ValueError, match=message):
        write_plate(tmp_path, **{"layout": small_layout(), **SMALL, **change})
    assert not any(tmp_path.iterdir())  # validated before anything is written
